//! The ClamAV engine: streams a file to one clamd of the pool, and fails
//! over to another when its backend dies, or once when it answers ERROR,
//! and the bytes can be replayed.
//!
//! Small files (`clamd.small_file_max_size`) take a shortcut: they are
//! held until complete (they are held for replay anyway) and sent in one
//! go on a clamd session that earlier scans left open, instead of a new
//! connection per file. To a clamd on a Unix socket they go as an
//! in-memory file (memfd) whose descriptor clamd receives (FILDES): clamd
//! scans it in place instead of reading a stream and writing it to its
//! temporary directory first, which on a 1 KiB file is about a quarter of
//! clamd's CPU. Whatever the shortcut cannot do, the stream does: a
//! refused descriptor (an old or confined clamd) falls back to INSTREAM
//! and stops descriptors for that backend.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use clamd::{AcquireError, Instream, Lease, Pool, ScanReply};

use super::{Detection, Engine, EngineError, EngineInfo, EngineReport, EngineScan, SizeHint};

/// Reported when a file is larger than a backend's StreamMaxLength: clamd
/// would cut the stream off unscanned, so we say so instead of sending it.
pub const STREAM_MAX_SIGNATURE: &str = "avgate.Limits.Exceeded.StreamMaxLength";

#[derive(Clone)]
pub struct ClamavEngine {
    inner: Arc<Settings>,
}

/// How the engine uses its pool.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Longest wait for a backend slot.
    pub queue_timeout: Duration,
    /// Bytes of each upload held so that a failed scan can be replayed.
    pub replay_limit: usize,
    /// Largest file held until complete and sent in one go over a session
    /// (capped at `replay_limit`); 0: every file is streamed.
    pub small_file_max: usize,
    /// StreamMaxLength per backend (same order as the pool), when known.
    pub stream_max: Vec<Option<u64>>,
}

struct Settings {
    pool: Arc<Pool>,
    queue_timeout: Duration,
    replay_limit: usize,
    small_file_max: usize,
    stream_max: Vec<Option<u64>>,
    memory_files: MemoryFiles,
}

impl ClamavEngine {
    pub fn new(pool: Arc<Pool>, settings: EngineSettings) -> ClamavEngine {
        ClamavEngine {
            inner: Arc::new(Settings {
                pool,
                queue_timeout: settings.queue_timeout,
                replay_limit: settings.replay_limit,
                small_file_max: settings.small_file_max.min(settings.replay_limit),
                stream_max: settings.stream_max,
                memory_files: MemoryFiles::default(),
            }),
        }
    }
}

#[async_trait]
impl Engine for ClamavEngine {
    fn name(&self) -> &'static str {
        "clamav"
    }

    /// Takes a backend slot now (a busy pool is answered before the body
    /// is read); the connection is opened with the first bytes, so that the
    /// INSTREAM command and the data reach clamd together, as from a client
    /// that has the file at hand (clamd otherwise wakes up once for the
    /// command and again for the data), or at the end for a file passed as
    /// a descriptor.
    ///
    /// A file known to be small (its request is no larger than
    /// `small_file_max`) takes its slot only once it is all here: reading
    /// it costs nothing worth refusing early, and the slot (one of clamd's
    /// threads) then goes straight to a scan instead of idling while the
    /// upload is read.
    async fn begin(&self, size: SizeHint) -> Result<Box<dyn EngineScan>, EngineError> {
        let mut scan = ClamavScan {
            settings: self.inner.clone(),
            tried: Vec::new(),
            lease: None,
            slot_later: false,
            stream: None,
            replay: Some(Vec::new()),
            replay_bytes: 0,
            sent: 0,
            early: None,
            last_error: None,
            moved_after_whole_file: false,
        };
        let small = self.inner.small_file_max;
        if small > 0 && size.upper_bound().is_some_and(|n| n <= small as u64) {
            scan.slot_later = true;
            return Ok(Box::new(scan));
        }
        scan.acquire().await?;
        if size.exact.is_some_and(|n| scan.over_stream_max(n)) {
            scan.give_up_unscanned();
        }
        Ok(Box::new(scan))
    }
}

struct ClamavScan {
    settings: Arc<Settings>,
    /// Backends this scan already failed on (by pool index).
    tried: Vec<usize>,
    lease: Option<Lease>,
    /// No slot taken yet: a small file, held until it is complete.
    slot_later: bool,
    stream: Option<Instream>,
    /// Every byte received so far, while it fits in `replay_limit`; `None`
    /// once it no longer does (a failure then cannot be retried). Before a
    /// stream is open, this is also what waits to go as a descriptor.
    replay: Option<Vec<Bytes>>,
    replay_bytes: usize,
    /// Bytes sent on the current stream.
    sent: u64,
    /// A reply that arrived before the stream ended (or our own decision
    /// not to send it); later chunks are dropped.
    early: Option<ScanReply>,
    /// Why the last backend tried could not be used.
    last_error: Option<String>,
    /// Already sent to another backend once after one had the whole file
    /// and did not scan it (an ERROR reply, or a hang-up without a reply:
    /// clamd may have died on this very file). Once only: a file that makes
    /// every clamd fail must not cost each backend a scan, or a crash.
    moved_after_whole_file: bool,
}

impl ClamavScan {
    /// Takes a slot on a backend not tried yet.
    async fn acquire(&mut self) -> Result<(), EngineError> {
        let lease = match self
            .settings
            .pool
            .acquire(self.settings.queue_timeout, &self.tried)
            .await
        {
            Ok(lease) => lease,
            Err(AcquireError::Busy) => return Err(EngineError::Busy),
            Err(_) => {
                return Err(EngineError::Unavailable(
                    self.last_error
                        .clone()
                        .unwrap_or_else(|| "no clamd backend is healthy".into()),
                ))
            }
        };
        self.tried.push(lease.index());
        self.lease = Some(lease);
        self.slot_later = false;
        Ok(())
    }

    /// Starts an INSTREAM on the slot held (taking one first if none is),
    /// trying the next backend when one cannot be reached.
    async fn open(&mut self) -> Result<(), EngineError> {
        loop {
            if self.lease.is_none() {
                self.acquire().await?;
            }
            let lease = self.lease.as_ref().expect("a slot is held");
            let timeouts = self.settings.pool.timeouts();
            let started = async { lease.connect(timeouts).await?.instream().await };
            match started.await {
                Ok(stream) => {
                    self.stream = Some(stream);
                    self.sent = 0;
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(backend = %lease.backend().address, error = %e, "clamd backend failed; trying another");
                    lease.backend().mark_down(&e);
                    self.last_error = Some(e.to_string());
                    self.lease = None;
                }
            }
        }
    }

    /// Opens a stream and sends everything held so far, moving on to the
    /// next backend while one fails. Needs every byte still held.
    async fn start_stream(&mut self) -> Result<(), EngineError> {
        let Some(held) = self.replay.clone() else {
            return Err(EngineError::Failed(
                "the upload is too large to be sent again".into(),
            ));
        };
        loop {
            self.open().await?;
            let stream = self.stream.as_mut().expect("open() sets the stream");
            let mut failed = None;
            for chunk in &held {
                if let Err(e) = stream.send(chunk).await {
                    failed = Some(e);
                    break;
                }
                self.sent += chunk.len() as u64;
            }
            match failed {
                None => return Ok(()),
                Some(clamd::Error::EarlyReply(reply)) => {
                    self.early = Some(reply);
                    self.stream = None;
                    return Ok(());
                }
                Some(e) if e.is_timeout() => return Err(self.stalled(e)),
                Some(e) => {
                    if let Some(lease) = self.lease.take() {
                        lease.backend().mark_down(&e);
                    }
                    self.last_error = Some(e.to_string());
                    self.stream = None;
                }
            }
        }
    }

    /// Whether `size` bytes are more than the current backend's
    /// StreamMaxLength (when it is known).
    fn over_stream_max(&self, size: u64) -> bool {
        let Some(lease) = &self.lease else {
            return false;
        };
        let limit = self
            .settings
            .stream_max
            .get(lease.index())
            .copied()
            .flatten();
        limit.is_some_and(|max| size > max)
    }

    fn give_up_unscanned(&mut self) {
        self.early = Some(ScanReply::Found(STREAM_MAX_SIGNATURE.into()));
        // Dropping the connection mid-stream is fine: clamd sees EOF.
        self.stream = None;
        self.replay = None;
    }

    /// After an early ERROR reply the rest of the upload is still held
    /// (while it fits), so that the file may go to another backend at the
    /// end; after any other early reply it is dropped.
    fn hold_after_early_reply(&mut self, chunk: Bytes) {
        if matches!(self.early, Some(ScanReply::Error(_))) {
            self.hold(chunk);
        }
    }

    /// clamd answered ERROR: the file was not scanned there. That says
    /// more often something about that clamd than about the file (its
    /// temporary directory full, out of memory), so once per scan, when
    /// every byte is still held and another backend is healthy, the file
    /// goes to that one. Once only: a file that makes every clamd fail
    /// must not cost every backend a scan. Returns whether the scan moved;
    /// if not, the reply is the answer.
    async fn moved_after_error(&mut self, reply: &ScanReply) -> bool {
        let ScanReply::Error(reason) = reply else {
            return false;
        };
        let Some(lease) = self.lease.take() else {
            return false;
        };
        let failed = lease.backend().clone();
        failed.note_error_reply();
        if self.moved_after_whole_file || self.replay.is_none() {
            self.lease = Some(lease);
            return false;
        }
        self.moved_after_whole_file = true;
        // Frees the slot before waiting for another one. The pool skips
        // the backends already tried, and answers at once when no other
        // one is healthy.
        drop(lease);
        if self.acquire().await.is_err() {
            // No other backend: the ERROR is the answer.
            return false;
        }
        tracing::warn!(backend = %failed.address, %reason, "clamd could not scan the file; sending it to another backend");
        self.stream = None;
        self.sent = 0;
        self.last_error = Some(format!("clamd: {reason}"));
        if self.over_stream_max(self.replay_bytes as u64) {
            self.give_up_unscanned();
        }
        true
    }

    /// A backend had the whole file and hung up without a reply: the file
    /// may go to one more backend ([`ClamavScan::moved_after_whole_file`]),
    /// not to a third; then the failure is the answer.
    fn moving_after_whole_file(&mut self, error: &clamd::Error) -> Result<(), EngineError> {
        if !std::mem::replace(&mut self.moved_after_whole_file, true) {
            return Ok(());
        }
        if let Some(lease) = self.lease.take() {
            tracing::warn!(backend = %lease.backend().address, %error, "a second clamd hung up on this file without a reply; not sending it to a third");
            lease.backend().mark_down(error);
        }
        Err(EngineError::Failed(error.to_string()))
    }

    /// Keeps `chunk` for a replay (or a descriptor) while it fits.
    fn hold(&mut self, chunk: Bytes) {
        if let Some(replay) = &mut self.replay {
            if self.replay_bytes + chunk.len() <= self.settings.replay_limit {
                self.replay_bytes += chunk.len();
                replay.push(chunk);
            } else {
                self.replay = None;
            }
        }
    }

    /// Whether a file of `size` bytes, all of them held, is still small
    /// enough to be sent in one go at the end.
    fn may_hold(&self, size: usize) -> bool {
        (self.lease.is_some() || self.slot_later)
            && self.replay.is_some()
            && size <= self.settings.small_file_max
    }

    /// Scans a small file whose bytes are all held: on a session of the
    /// backend (reused if one is open), as a descriptor to a Unix socket,
    /// in one INSTREAM write otherwise. `None`: clamd could not take the
    /// descriptor (or the backend failed and the scan moved on to another
    /// one's stream); the caller goes on with a stream.
    async fn scan_held(&mut self) -> Result<Option<ScanReply>, EngineError> {
        let (Some(lease), Some(held)) = (&self.lease, &self.replay) else {
            return Ok(None);
        };
        let mut fd_refused = None;
        let file = if lease.backend().fd_passing() {
            match self.settings.memory_files.take(held) {
                Ok(file) => Some(file),
                Err(e) => {
                    // No memfd here (an old kernel, a seccomp filter).
                    fd_refused = Some(format!("cannot create an in-memory file: {e}"));
                    None
                }
            }
        } else {
            None
        };
        let timeouts = self.settings.pool.timeouts();
        let mut reused = lease.reuse_session();
        let outcome = loop {
            let was_reused = reused.is_some();
            let mut session = match reused.take() {
                Some(session) => session,
                None => match lease.new_session(timeouts).await {
                    Ok(session) => session,
                    Err(e) => break Held::BackendFailed(e, false),
                },
            };
            let result = match &file {
                Some(file) => {
                    use std::os::fd::AsFd;
                    session.scan_fd(file.file.as_fd()).await
                }
                None => session.scan_chunks(held).await,
            };
            match result {
                Ok(reply @ (ScanReply::Clean | ScanReply::Found(_))) => {
                    lease.keep_session(session);
                    if let Some(file) = file {
                        // clamd has answered: it reads the file no more.
                        self.settings.memory_files.give_back(file);
                    }
                    break Held::Reply(reply);
                }
                Ok(ScanReply::Error(reason)) if file.is_some() => {
                    // Either clamd refused the descriptor (one that cannot
                    // receive it, or is confined so that it may not read
                    // it) or the scan failed; a stream settles both.
                    if reason.contains("file descriptor") || reason.contains("ancillary") {
                        fd_refused = Some(reason);
                    } else {
                        tracing::debug!(backend = %lease.backend().address, %reason, "FILDES scan failed; streaming instead");
                    }
                    break Held::Stream;
                }
                Ok(reply) => break Held::Reply(reply),
                // clamd's answer before it had the whole file (past its
                // StreamMaxLength): the answer, and the backend is fine.
                Err(clamd::Error::EarlyReply(reply)) => break Held::Reply(reply),
                // clamd closes idle sessions on its own: a failure on a
                // reused one says nothing about the backend. Once more on a
                // new session.
                Err(e) if was_reused && !e.is_timeout() => {
                    tracing::debug!(backend = %lease.backend().address, error = %e, "reused clamd session failed; opening a new one");
                }
                Err(e) if e.is_timeout() => {
                    lease.backend().mark_down(&e);
                    return Err(engine_error(e));
                }
                Err(e @ (clamd::Error::Protocol(_) | clamd::Error::FdNeedsUnixSocket))
                    if file.is_some() =>
                {
                    fd_refused = Some(e.to_string());
                    break Held::Stream;
                }
                Err(e @ clamd::Error::Protocol(_)) => return Err(engine_error(e)),
                Err(e) => break Held::BackendFailed(e, true),
            }
        };
        if let Some(why) = fd_refused {
            self.stop_fd_passing(&why);
        }
        match outcome {
            Held::Reply(reply) => Ok(Some(reply)),
            Held::Stream => Ok(None),
            Held::BackendFailed(e, had_file) => {
                if had_file {
                    self.moving_after_whole_file(&e)?;
                }
                // Connection refused or reset: the stream goes to another
                // backend, with the held bytes.
                self.fail_over(e, had_file).await?;
                Ok(None)
            }
        }
    }

    /// Streams to the current backend from now on, and says so once.
    fn stop_fd_passing(&self, why: &str) {
        let Some(lease) = &self.lease else {
            return;
        };
        if lease.backend().stop_fd_passing() {
            tracing::warn!(
                backend = %lease.backend().address,
                reason = why,
                "clamd cannot scan passed file descriptors (FILDES); small files are streamed to it instead"
            );
        }
    }

    /// A deadline passed on the current backend (a write, the verdict): a
    /// clamd that stopped reading or answering is stuck, not gone, and it
    /// may be the file that stalls it. Out of rotation, but no replay on
    /// another backend: the client is told it timed out.
    fn stalled(&mut self, e: clamd::Error) -> EngineError {
        if let Some(lease) = &self.lease {
            lease.backend().mark_down(&e);
        }
        self.stream = None;
        engine_error(e)
    }

    /// After a backend failed: mark it down and, if every byte received so
    /// far is still held, send them again to another backend. `mid_scan`:
    /// it failed with (part of) the file, not while connecting.
    async fn fail_over(&mut self, error: clamd::Error, mid_scan: bool) -> Result<(), EngineError> {
        if let Some(lease) = self.lease.take() {
            tracing::warn!(backend = %lease.backend().address, error = %error, "clamd backend failed mid-scan");
            lease.backend().mark_down(&error);
        }
        self.last_error = Some(error.to_string());
        self.stream = None;
        if self.replay.is_none() {
            return Err(engine_error(error));
        }
        match self.start_stream().await {
            // No other backend to replay on, after one failed on this file:
            // that failure is the answer (engine_error), not "none there".
            Err(EngineError::Unavailable(_)) if mid_scan => Err(engine_error(error)),
            other => other,
        }
    }

    /// clamd's reply, reported; then the slot is freed. When a waiting
    /// scan was given the slot, this task yields, so that the waiter's
    /// command reaches clamd before this task writes its answer. Without
    /// it, tokio runs the woken waiter only after this task's next
    /// `Pending` (after the HTTP answer and its log line), and the clamd
    /// thread that just answered sits idle meanwhile: at 32 clients over
    /// 8 slots, that cost about 10 % of the small-file throughput
    /// (docs/performance.md).
    async fn done(&mut self, reply: ScanReply) -> Result<EngineReport, EngineError> {
        let report = self.report(reply);
        if self.lease.take().is_some_and(Lease::release) {
            tokio::task::yield_now().await;
        }
        report
    }

    fn report(&self, reply: ScanReply) -> Result<EngineReport, EngineError> {
        let detection = match reply {
            ScanReply::Clean => Detection::Clean,
            ScanReply::Found(name) => Detection::Found(name),
            ScanReply::SizeLimitExceeded => Detection::Found(STREAM_MAX_SIGNATURE.into()),
            ScanReply::Error(reason) => {
                return Err(EngineError::Failed(format!("clamd: {reason}")));
            }
        };
        let (backend, version) = match &self.lease {
            Some(lease) => (
                lease.backend().address.to_string(),
                lease.backend().version(),
            ),
            None => (String::new(), None),
        };
        Ok(EngineReport {
            detection,
            engine: EngineInfo {
                name: "clamav",
                version: version.as_ref().map(|v| format!("ClamAV {}", v.clamav)),
                database: version.as_ref().and_then(|v| v.database),
                database_date: version.and_then(|v| v.database_date),
                backend,
            },
        })
    }
}

/// In-memory files (memfd) for FILDES, kept for the next small file once
/// clamd has answered: creating one and closing it again (which frees its
/// pages) cost a small scan more than writing the next file over it.
#[derive(Default)]
struct MemoryFiles {
    idle: std::sync::Mutex<Vec<MemoryFile>>,
}

/// A file for one scan, with its size.
struct MemoryFile {
    file: std::fs::File,
    len: u64,
}

/// Files kept at most; more are closed. About the scans in flight at once.
const MEMORY_FILES_KEPT: usize = 64;

/// Largest file kept: a kept file holds its pages until the next file is
/// written over it, so idle ones hold at most 64 × 64 KiB. Larger files
/// are rarer and cost more to write than to create a new memfd.
const MEMORY_FILE_KEPT_MAX: u64 = 64 * 1024;

impl MemoryFiles {
    /// The held bytes as an in-memory file, a kept one when there is one.
    /// A kept file longer than them is cut to their size, so that nothing
    /// of an earlier file remains.
    fn take(&self, chunks: &[Bytes]) -> std::io::Result<MemoryFile> {
        use std::os::unix::fs::FileExt;
        let kept = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let MemoryFile { file, len: old_len } = match kept {
            Some(kept) => kept,
            None => MemoryFile {
                file: memory_file()?,
                len: 0,
            },
        };
        let mut len = 0u64;
        for chunk in chunks {
            file.write_all_at(chunk, len)?;
            len += chunk.len() as u64;
        }
        if len < old_len {
            file.set_len(len)?;
        }
        Ok(MemoryFile { file, len })
    }

    /// Keeps a file whose scan is over, unless it is large (one that
    /// failed is dropped by the caller).
    fn give_back(&self, file: MemoryFile) {
        if file.len > MEMORY_FILE_KEPT_MAX {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MEMORY_FILES_KEPT {
            idle.push(file);
        }
    }
}

/// A new anonymous in-memory file.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn memory_file() -> std::io::Result<std::fs::File> {
    use rustix::fs::{memfd_create, MemfdFlags};
    Ok(std::fs::File::from(memfd_create(
        "avgate-scan",
        MemfdFlags::CLOEXEC,
    )?))
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn memory_file() -> std::io::Result<std::fs::File> {
    Err(std::io::Error::other("no memfd on this system"))
}

#[async_trait]
impl EngineScan for ClamavScan {
    async fn feed(&mut self, chunk: Bytes) -> Result<(), EngineError> {
        if self.early.is_some() {
            self.hold_after_early_reply(chunk);
            return Ok(());
        }
        if self.over_stream_max(self.sent.max(self.replay_bytes as u64) + chunk.len() as u64) {
            self.give_up_unscanned();
            return Ok(());
        }
        if self.stream.is_none() {
            if self.may_hold(self.replay_bytes + chunk.len()) {
                // Held until the end, when it may go in one piece.
                self.hold(chunk);
                return Ok(());
            }
            // More than a small file: now the stream, with what was held
            // so far.
            self.start_stream().await?;
            if self.early.is_some() {
                self.hold_after_early_reply(chunk);
                return Ok(());
            }
        }
        self.hold(chunk.clone());
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| EngineError::Failed("no stream".into()))?;
        match stream.send(&chunk).await {
            Ok(()) => {
                self.sent += chunk.len() as u64;
                Ok(())
            }
            Err(clamd::Error::EarlyReply(reply)) => {
                self.early = Some(reply);
                self.stream = None;
                Ok(())
            }
            Err(e) if e.is_timeout() => Err(self.stalled(e)),
            Err(e) => self.fail_over(e, true).await,
        }
    }

    async fn finish(mut self: Box<Self>) -> Result<EngineReport, EngineError> {
        loop {
            // Every reply comes through here (`early`), so that an ERROR
            // may move the file to another backend.
            if let Some(reply) = self.early.take() {
                if self.moved_after_error(&reply).await {
                    continue;
                }
                return self.done(reply).await;
            }
            if self.stream.is_none() {
                // Nothing sent yet: a small file, an empty one (streamed:
                // nothing to hand over), or a fallback.
                if self.replay_bytes > 0 && self.may_hold(self.replay_bytes) {
                    if self.lease.is_none() {
                        self.acquire().await?;
                        if self.over_stream_max(self.replay_bytes as u64) {
                            self.give_up_unscanned();
                            continue;
                        }
                    }
                    if let Some(reply) = self.scan_held().await? {
                        self.early = Some(reply);
                        continue;
                    }
                    if self.stream.is_some() || self.early.is_some() {
                        continue; // failed over to another backend's stream
                    }
                }
                self.start_stream().await?;
                continue;
            }
            let stream = self
                .stream
                .take()
                .ok_or_else(|| EngineError::Failed("no stream".into()))?;
            match stream.finish().await {
                Ok(reply) | Err(clamd::Error::EarlyReply(reply)) => self.early = Some(reply),
                Err(e) if e.is_timeout() => return Err(self.stalled(e)),
                Err(e @ clamd::Error::Protocol(_)) => return Err(engine_error(e)),
                Err(e) => {
                    self.moving_after_whole_file(&e)?;
                    self.fail_over(e, true).await?
                }
            }
        }
    }
}

/// How a held small file fared.
enum Held {
    Reply(ScanReply),
    /// Stream it instead (descriptor refused).
    Stream,
    /// Connection refused or reset; `true`: after clamd had the file.
    BackendFailed(clamd::Error, bool),
}

fn engine_error(e: clamd::Error) -> EngineError {
    if e.is_timeout() {
        EngineError::Timeout(e.to_string())
    } else {
        EngineError::Failed(e.to_string())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    fn contents(file: &MemoryFile) -> Vec<u8> {
        let mut file = file.file.try_clone().unwrap();
        file.rewind().unwrap();
        let mut out = Vec::new();
        file.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn a_kept_memory_file_holds_only_the_next_file() {
        let files = MemoryFiles::default();
        let big = files
            .take(&[Bytes::from(vec![b'x'; 5000]), Bytes::from_static(b"tail")])
            .unwrap();
        assert_eq!(contents(&big).len(), 5004);
        files.give_back(big);

        // Longer, then as long: written over, no more and no less.
        let longer = files.take(&[Bytes::from(vec![b'y'; 6000])]).unwrap();
        assert_eq!(contents(&longer), vec![b'y'; 6000]);
        files.give_back(longer);
        let same = files.take(&[Bytes::from(vec![b'z'; 6000])]).unwrap();
        assert_eq!(contents(&same), vec![b'z'; 6000]);
        files.give_back(same);

        // The same file again (one was kept), now with a shorter content:
        // nothing of the first one may be left for clamd to read.
        let small = files.take(&[Bytes::from_static(b"EICAR")]).unwrap();
        assert_eq!(contents(&small), b"EICAR");
        assert!(
            files.idle.lock().unwrap().is_empty(),
            "the kept file was used"
        );

        let empty = files.take(&[]).unwrap();
        assert!(contents(&empty).is_empty());
    }

    #[test]
    fn a_large_file_is_not_kept() {
        let files = MemoryFiles::default();
        let large = vec![b'x'; MEMORY_FILE_KEPT_MAX as usize + 1];
        files.give_back(files.take(&[Bytes::from(large)]).unwrap());
        assert!(files.idle.lock().unwrap().is_empty());
        let limit = vec![b'x'; MEMORY_FILE_KEPT_MAX as usize];
        files.give_back(files.take(&[Bytes::from(limit)]).unwrap());
        assert_eq!(files.idle.lock().unwrap().len(), 1);
    }

    #[test]
    fn no_more_than_the_limit_is_kept() {
        let files = MemoryFiles::default();
        for _ in 0..MEMORY_FILES_KEPT + 3 {
            files.give_back(MemoryFile {
                file: memory_file().unwrap(),
                len: 0,
            });
        }
        assert_eq!(files.idle.lock().unwrap().len(), MEMORY_FILES_KEPT);
    }
}
