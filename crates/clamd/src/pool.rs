//! Several clamd backends: health, least-busy choice, per-backend limits.
//!
//! clamd never answers "busy", so the pool is the only thing standing
//! between a burst of uploads and a clamd that silently stops accepting:
//! each backend gets at most `max_concurrent` scans from us (no more than
//! its MaxThreads), and a caller that cannot get a slot in time is told so.
//!
//! Callers that find every slot taken wait in one queue and are served
//! first come, first served: a freed slot is handed to the oldest waiter
//! that may use it (its excluded backends aside), which then does not have
//! to race newer callers for it, and nobody else is woken.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::conn::{Address, Connection, Error, Session, Timeouts};
use crate::proto::{ScanReply, Version};

/// The EICAR test string, used as a readiness probe: a clamd whose database
/// failed to load still answers PING with PONG, but cannot find this.
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// How one backend is configured.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub address: Address,
    /// At most this many scans at once on this backend. Keep it at or below
    /// that clamd's MaxThreads, or requests queue inside clamd where no
    /// timeout of ours can see them.
    pub max_concurrent: usize,
}

/// What a health probe last saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not probed yet.
    Unknown,
    /// A real scan of the test string came back FOUND.
    Up,
    /// The last probe or scan failed; the reason is kept for /readyz.
    Down(String),
}

/// One clamd and what we know about it.
#[derive(Debug)]
pub struct Backend {
    pub address: Address,
    pub max_concurrent: usize,
    slots: Arc<Semaphore>,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
    scans: AtomicU64,
    failures: AtomicU64,
    /// Scans it answered with an ERROR reply (the file not scanned there).
    error_replies: AtomicU64,
    /// Being reloaded: new scans go to the other backends while there are
    /// healthy ones (see [`Backend::set_draining`]).
    draining: AtomicBool,
    state: Mutex<BackendState>,
    /// Sessions (IDSESSION connections) waiting for their next scan, the
    /// most recently used last. At most `max_concurrent`.
    idle: Mutex<Vec<Session>>,
    /// Worth passing file descriptors to (FILDES): a Unix socket whose
    /// clamd has not refused one.
    fd_passing: AtomicBool,
}

/// Sessions idle longer than this are closed rather than reused: clamd
/// closes them itself when no command comes for its ReadTimeout (120 s by
/// default), and a session it has closed costs a failed attempt.
pub const SESSION_MAX_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct BackendState {
    health: Health,
    version: Option<Version>,
    last_probe: Option<SystemTime>,
    probe_signature: Option<String>,
    database_time: Option<SystemTime>,
    dated_by: Option<DatabaseDating>,
    /// The backend's database directory on this host, when known: dates an
    /// unsigned database by its files.
    database_dir: Option<PathBuf>,
    /// Loads of the database so far (see [`Backend::database_reloaded`]),
    /// and the load the files were last dated after: they are dated again
    /// while the two differ.
    loads: u64,
    dated_load: Option<u64>,
}

/// Where a backend's database time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseDating {
    /// The build date of its signed database, from VERSION.
    Version,
    /// The newest signature file in its database directory (an unsigned
    /// database: custom or test signatures).
    Files,
}

impl DatabaseDating {
    pub fn as_str(self) -> &'static str {
        match self {
            DatabaseDating::Version => "version",
            DatabaseDating::Files => "files",
        }
    }
}

/// A snapshot for status pages and metrics.
#[derive(Debug, Clone)]
pub struct BackendStatus {
    pub address: String,
    pub health: Health,
    pub version: Option<Version>,
    pub in_flight: usize,
    pub max_concurrent: usize,
    pub scans: u64,
    pub failures: u64,
    pub error_replies: u64,
    pub last_probe: Option<SystemTime>,
    /// The signature name the probe matched (tells test vs. official DB).
    pub probe_signature: Option<String>,
    /// When the loaded signature database was built (signed) or last
    /// changed (unsigned), as of the last successful probe.
    pub database_time: Option<SystemTime>,
    pub dated_by: Option<DatabaseDating>,
    /// Out of rotation for a signature reload.
    pub draining: bool,
    /// Small files go to it as file descriptors (see [`Backend::fd_passing`]).
    pub fd_passing: bool,
}

impl BackendStatus {
    /// How old the loaded signature database is, when known.
    pub fn database_age(&self) -> Option<Duration> {
        self.database_time
            .map(|t| SystemTime::now().duration_since(t).unwrap_or_default())
    }
}

impl Backend {
    fn new(config: BackendConfig) -> Backend {
        let max = config.max_concurrent.max(1);
        let unix = matches!(config.address, Address::Unix(_));
        Backend {
            address: config.address,
            max_concurrent: max,
            slots: Arc::new(Semaphore::new(max)),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(false),
            scans: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            error_replies: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            idle: Mutex::new(Vec::new()),
            fd_passing: AtomicBool::new(unix),
            state: Mutex::new(BackendState {
                health: Health::Unknown,
                version: None,
                last_probe: None,
                probe_signature: None,
                database_time: None,
                dated_by: None,
                database_dir: None,
                loads: 0,
                dated_load: None,
            }),
        }
    }

    /// Dates an unsigned database (one whose VERSION carries no date) by
    /// the newest signature file in `dir`, this backend's database
    /// directory on this host.
    pub fn set_database_dir(&self, dir: Option<PathBuf>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.database_dir = dir;
        state.dated_load = None;
    }

    /// Takes the backend out of rotation (or puts it back): while other
    /// backends are healthy, new scans go to them. Scans already running
    /// here are not touched. Used to reload one backend at a time.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// What the last probe learnt of clamd's version and database.
    pub fn version(&self) -> Option<Version> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.version.clone()
    }

    pub fn status(&self) -> BackendStatus {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        BackendStatus {
            address: self.address.to_string(),
            health: state.health.clone(),
            version: state.version.clone(),
            in_flight: self.in_flight(),
            max_concurrent: self.max_concurrent,
            scans: self.scans.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            error_replies: self.error_replies.load(Ordering::Relaxed),
            last_probe: state.last_probe,
            probe_signature: state.probe_signature.clone(),
            database_time: state.database_time,
            dated_by: state.dated_by,
            draining: self.is_draining(),
            fd_passing: self.fd_passing(),
        }
    }

    /// Whether files may be passed to this backend as descriptors: on a
    /// Unix socket, until its clamd refuses one.
    pub fn fd_passing(&self) -> bool {
        self.fd_passing.load(Ordering::Relaxed)
    }

    /// Stops passing descriptors to this backend (its clamd refused one,
    /// or this host cannot make in-memory files). True the first time.
    pub fn stop_fd_passing(&self) -> bool {
        self.fd_passing.swap(false, Ordering::Relaxed)
    }

    fn set_health(&self, health: Health) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let was_up = state.health == Health::Up;
        match (&health, was_up) {
            (Health::Up, false) => tracing::info!(backend = %self.address, "clamd backend is up"),
            (Health::Down(why), true) => {
                tracing::warn!(backend = %self.address, reason = %why, "clamd backend is down")
            }
            _ => {}
        }
        self.healthy.store(health == Health::Up, Ordering::Release);
        if health != Health::Up {
            // Whatever was open to a failing clamd is not worth reusing.
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
        } else if !was_up && matches!(self.address, Address::Unix(_)) {
            // Back after being down: possibly another clamd (a restart, a
            // new configuration), so descriptors are worth trying again. A
            // refusal turns them off once more, with one warning.
            self.fd_passing.store(true, Ordering::Relaxed);
        }
        state.health = health;
    }

    /// Takes the backend out of rotation after a failed scan; the health
    /// checker probes it back in.
    pub fn mark_down(&self, why: &Error) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.set_health(Health::Down(why.to_string()));
    }

    /// Counts a scan that clamd answered with an ERROR reply. The backend
    /// stays in: clamd answered, and the cause (its temporary directory
    /// full, a file it cannot handle) may be that one file's.
    pub fn note_error_reply(&self) {
        self.error_replies.fetch_add(1, Ordering::Relaxed);
    }

    /// Says that clamd has (re)loaded its database (it started, or
    /// confirmed a reload): with a database directory set, its files are
    /// dated at the next successful probe, and not again until the next
    /// call. A file clamd refused (a reload that failed) then does not make
    /// the database it kept look fresh.
    pub fn database_reloaded(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).loads += 1;
    }

    /// The date of the database as of its last load (see
    /// [`Backend::database_reloaded`]).
    async fn date_by_files(&self) -> Option<(SystemTime, DatabaseDating)> {
        let (dir, load) = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let dir = state.database_dir.clone()?;
            if state.dated_load == Some(state.loads) {
                return state.database_time.zip(state.dated_by);
            }
            (dir, state.loads)
        };
        let newest =
            tokio::task::spawn_blocking(move || crate::database::newest_signature_mtime(&dir));
        let newest = newest.await.ok()??;
        // Dated: not again until the next load.
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .dated_load = Some(load);
        Some((newest, DatabaseDating::Files))
    }

    /// Probes readiness with a real scan of EICAR, then asks for VERSION.
    ///
    /// A probe that times out while every slot of ours is taken is no
    /// verdict on clamd: its threads are busy with our scans, so it queues
    /// the probe behind them (clamd never says "busy"), and scans of large
    /// files take longer than a probe may wait. Marking it down then would
    /// turn a busy backend into 503s for everyone. It stays as it was; a
    /// clamd that really hangs is caught by those scans' own timeouts.
    pub async fn probe(&self, timeouts: Timeouts) -> Result<Version, Error> {
        let busy_at_start = self.in_flight() >= self.max_concurrent;
        let result = async {
            let conn = Connection::connect(&self.address, timeouts).await?;
            let reply = conn.scan_bytes(EICAR).await?;
            let ScanReply::Found(signature) = reply else {
                return Err(Error::Protocol(crate::proto::ParseError::Unexpected(
                    format!("the EICAR probe was answered {reply:?}, not FOUND: is the signature database loaded?"),
                )));
            };
            let version = Connection::connect(&self.address, timeouts)
                .await?
                .version()
                .await?;
            Ok((signature, version))
        }
        .await;
        let now = SystemTime::now();
        // A signed database carries its date; an unsigned one is dated by
        // its files, when we know where they are.
        let dating = match &result {
            Ok((_, version)) => match version.database_time() {
                Some(t) => Some((t, DatabaseDating::Version)),
                None => self.date_by_files().await,
            },
            Err(_) => None,
        };
        match result {
            Ok((signature, version)) => {
                {
                    let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.version = Some(version.clone());
                    state.last_probe = Some(now);
                    state.probe_signature = Some(signature);
                    state.database_time = dating.map(|(t, _)| t);
                    state.dated_by = dating.map(|(_, by)| by);
                }
                self.set_health(Health::Up);
                Ok(version)
            }
            Err(e) => {
                self.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .last_probe = Some(now);
                let busy = busy_at_start || self.in_flight() >= self.max_concurrent;
                if e.is_timeout() && busy {
                    tracing::debug!(
                        backend = %self.address,
                        in_flight = self.in_flight(),
                        "health probe timed out with every slot busy: the backend stays as it was"
                    );
                } else {
                    self.set_health(Health::Down(e.to_string()));
                }
                Err(e)
            }
        }
    }
}

/// Why no backend could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AcquireError {
    #[error("no clamd backend is healthy")]
    NoneHealthy,
    #[error("all clamd backends are busy")]
    Busy,
}

/// The set of backends.
#[derive(Debug)]
pub struct Pool {
    backends: Vec<Arc<Backend>>,
    queue: Arc<Queue>,
    timeouts: Timeouts,
}

/// Hands out slots: at once while nobody waits, else in arrival order.
struct Queue {
    backends: Vec<Arc<Backend>>,
    waiters: Mutex<Waiters>,
}

#[derive(Default)]
struct Waiters {
    next_id: u64,
    queue: VecDeque<Waiter>,
}

/// A caller waiting for a slot. It gets its lease (or, once no backend it
/// may use is healthy, the error) through `answer`.
struct Waiter {
    id: u64,
    exclude: Vec<usize>,
    answer: oneshot::Sender<Result<Lease, AcquireError>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("waiting", &self.lock().queue.len())
            .finish()
    }
}

/// What one attempt to take a slot found.
enum Pick {
    Lease(Lease),
    /// Healthy backends exist, but none has a free slot.
    Busy,
    NoneHealthy,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot on the least busy healthy backend not in `exclude`.
    /// Called with the waiters locked, so that slots are only ever taken
    /// in queue order.
    fn pick(self: &Arc<Self>, exclude: &[usize]) -> Pick {
        let mut candidates: Vec<(usize, &Arc<Backend>)> = self
            .backends
            .iter()
            .enumerate()
            .filter(|(i, b)| b.is_healthy() && !exclude.contains(i))
            .collect();
        if candidates.is_empty() {
            return Pick::NoneHealthy;
        }
        // A backend being reloaded takes scans only when no other can.
        if candidates.iter().any(|(_, b)| !b.is_draining()) {
            candidates.retain(|(_, b)| !b.is_draining());
        }
        // Least busy relative to its capacity first.
        candidates.sort_by_key(|(_, b)| (b.in_flight() * 1000) / b.max_concurrent);
        for (index, backend) in candidates {
            if let Ok(permit) = backend.slots.clone().try_acquire_owned() {
                backend.in_flight.fetch_add(1, Ordering::Relaxed);
                backend.scans.fetch_add(1, Ordering::Relaxed);
                return Pick::Lease(Lease {
                    index,
                    backend: backend.clone(),
                    queue: self.clone(),
                    permit: Some(permit),
                });
            }
        }
        Pick::Busy
    }

    /// Serves the waiters, oldest first, with the slots free now; answers
    /// those that no healthy backend is left for; drops those that gave
    /// up. A lease whose waiter gave up at that very moment is put in
    /// `undelivered`: the caller drops it once the lock is released, which
    /// frees its slot for the next waiter. Returns whether a waiter was
    /// given a slot.
    fn serve(self: &Arc<Self>, waiters: &mut Waiters, undelivered: &mut Vec<Lease>) -> bool {
        let mut served = false;
        // Once a waiter that excludes nothing finds no slot, no other such
        // waiter can find one: skip them.
        let mut full = false;
        let mut i = 0;
        while i < waiters.queue.len() {
            let waiter = &waiters.queue[i];
            if waiter.answer.is_closed() {
                waiters.queue.remove(i);
                continue;
            }
            if full && waiter.exclude.is_empty() {
                i += 1;
                continue;
            }
            let answer = match self.pick(&waiter.exclude) {
                Pick::Busy => {
                    full |= waiter.exclude.is_empty();
                    i += 1;
                    continue;
                }
                Pick::NoneHealthy => Err(AcquireError::NoneHealthy),
                Pick::Lease(lease) => Ok(lease),
            };
            let waiter = waiters.queue.remove(i).expect("the waiter is there");
            let leased = answer.is_ok();
            match waiter.answer.send(answer) {
                Err(Ok(lease)) => {
                    lease.backend.scans.fetch_sub(1, Ordering::Relaxed);
                    undelivered.push(lease);
                }
                Ok(()) => served |= leased,
                Err(Err(_)) => {}
            }
        }
        served
    }

    /// Serves the waiters: a slot was freed or a backend's health changed.
    /// Returns whether a waiter was given a slot.
    fn dispatch(self: &Arc<Self>) -> bool {
        let mut undelivered = Vec::new();
        let served = {
            let mut waiters = self.lock();
            if waiters.queue.is_empty() {
                return false;
            }
            self.serve(&mut waiters, &mut undelivered)
        };
        // Outside the lock: each drop frees its slot and dispatches again.
        drop(undelivered);
        served
    }
}

impl Pool {
    pub fn new(backends: Vec<BackendConfig>, timeouts: Timeouts) -> Arc<Pool> {
        let backends: Vec<Arc<Backend>> = backends
            .into_iter()
            .map(|b| Arc::new(Backend::new(b)))
            .collect();
        Arc::new(Pool {
            queue: Arc::new(Queue {
                backends: backends.clone(),
                waiters: Mutex::new(Waiters::default()),
            }),
            backends,
            timeouts,
        })
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    pub fn any_healthy(&self) -> bool {
        self.backends.iter().any(|b| b.is_healthy())
    }

    /// Whether the backends run different signature databases: among
    /// those that answered a probe, more than one database version (a
    /// backend without a signed database counts as one version of its own).
    pub fn database_versions_differ(&self) -> bool {
        let mut seen: Vec<Option<u32>> = Vec::new();
        for backend in &self.backends {
            if let Some(version) = backend.status().version {
                if !seen.contains(&version.database) {
                    seen.push(version.database);
                }
            }
        }
        seen.len() > 1
    }

    /// Takes a slot on the least busy healthy backend, skipping those in
    /// `exclude` (backends that already failed this request). Waits up to
    /// `wait` for a slot when all are busy, behind the callers that were
    /// already waiting (first come, first served).
    pub async fn acquire(&self, wait: Duration, exclude: &[usize]) -> Result<Lease, AcquireError> {
        let queue = &self.queue;
        let mut undelivered = Vec::new();
        let (id, mut answer) = {
            let mut waiters = queue.lock();
            let nobody_waits = waiters.queue.is_empty();
            if nobody_waits {
                match queue.pick(exclude) {
                    Pick::Lease(lease) => return Ok(lease),
                    Pick::NoneHealthy => return Err(AcquireError::NoneHealthy),
                    Pick::Busy if wait.is_zero() => return Err(AcquireError::Busy),
                    Pick::Busy => {}
                }
            }
            let (tx, rx) = oneshot::channel();
            let id = waiters.next_id;
            waiters.next_id += 1;
            waiters.queue.push_back(Waiter {
                id,
                exclude: exclude.to_vec(),
                answer: tx,
            });
            if !nobody_waits {
                // Those ahead first; a slot only we may use is ours now.
                queue.serve(&mut waiters, &mut undelivered);
            }
            (id, rx)
        };
        drop(undelivered);
        if !wait.is_zero() {
            if let Ok(answered) = tokio::time::timeout(wait, &mut answer).await {
                // The queue answers every waiter that has not given up.
                return answered.unwrap_or(Err(AcquireError::Busy));
            }
        }
        // Out of time: leave the queue. A lease handed over in the meantime
        // is ours all the same.
        queue.lock().queue.retain(|w| w.id != id);
        answer.try_recv().unwrap_or(Err(AcquireError::Busy))
    }

    /// Gives waiting requests a slot where one can be had now: after a
    /// backend came back in rotation outside the health checker (a reload
    /// done, draining over).
    pub fn wake_waiters(&self) {
        self.queue.dispatch();
    }

    /// Probes every backend once, concurrently.
    pub async fn probe_all(&self) {
        let probes = self.backends.iter().map(|b| {
            let b = b.clone();
            let timeouts = self.timeouts.for_probe();
            async move {
                let _ = b.probe(timeouts).await;
            }
        });
        futures_join_all(probes).await;
        // Backends that came up (or went down) change what waiters get.
        self.queue.dispatch();
    }

    /// Probes all backends every `interval` until `stop` resolves. Down
    /// backends are probed every `interval / 4` so they return quickly.
    pub async fn run_health_checks<F>(self: Arc<Self>, interval: Duration, stop: F)
    where
        F: std::future::Future<Output = ()>,
    {
        tokio::pin!(stop);
        let fast = (interval / 4).max(Duration::from_millis(100));
        let mut last_full = Instant::now() - interval;
        loop {
            if last_full.elapsed() >= interval {
                // A probe of a hung clamd takes its whole timeout: stopping
                // does not wait for it.
                tokio::select! {
                    _ = &mut stop => return,
                    _ = self.probe_all() => {}
                }
                last_full = Instant::now();
            } else {
                let down: Vec<_> = self
                    .backends
                    .iter()
                    .filter(|b| !b.is_healthy())
                    .cloned()
                    .collect();
                if !down.is_empty() {
                    let timeouts = self.timeouts.for_probe();
                    let probes = futures_join_all(down.into_iter().map(|b| async move {
                        let _ = b.probe(timeouts).await;
                    }));
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = probes => {}
                    }
                    self.queue.dispatch();
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(fast) => {}
            }
        }
    }
}

/// Runs futures concurrently on the current task (a tiny join_all, to keep
/// this crate free of a futures dependency).
async fn futures_join_all<I, F>(futs: I)
where
    I: IntoIterator<Item = F>,
    F: std::future::Future<Output = ()>,
{
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// A slot on one backend, held for the length of one scan.
pub struct Lease {
    index: usize,
    backend: Arc<Backend>,
    queue: Arc<Queue>,
    /// Taken (released) by `drop`, before the queue is served.
    permit: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("index", &self.index)
            .field("backend", &self.backend.address)
            .finish()
    }
}

impl Lease {
    /// The backend's position in the pool (to exclude it on a retry).
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    pub async fn connect(&self, timeouts: Timeouts) -> Result<Connection, Error> {
        Connection::connect(&self.backend.address, timeouts).await
    }

    /// A session that a previous scan left open on this backend, if one
    /// is fresh enough (see [`SESSION_MAX_IDLE`]). It may still turn out
    /// closed by clamd: retry such a failure on a new session.
    pub fn reuse_session(&self) -> Option<Session> {
        let mut idle = self.backend.idle.lock().unwrap_or_else(|e| e.into_inner());
        // The most recent is the likeliest to be open; older ones than the
        // limit are closed (dropped) on the way.
        while let Some(session) = idle.pop() {
            if session.idle_for() < SESSION_MAX_IDLE {
                return Some(session);
            }
            idle.clear();
        }
        None
    }

    /// Opens a new session on this backend.
    pub async fn new_session(&self, timeouts: Timeouts) -> Result<Session, Error> {
        self.connect(timeouts).await?.session().await
    }

    /// Keeps a session that just answered a verdict for the next scan.
    pub fn keep_session(&self, session: Session) {
        if !self.backend.healthy.load(Ordering::Acquire) {
            return;
        }
        let mut idle = self.backend.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.backend.max_concurrent {
            idle.push(session);
        }
    }

    /// Frees the slot now, and says whether a waiter was given it. A caller
    /// that gets `true` should let that waiter run before going on (yield):
    /// the waiter's scan then reaches clamd while the caller builds its
    /// answer, instead of after it, and clamd's thread does not sit idle
    /// meanwhile.
    pub fn release(mut self) -> bool {
        self.free()
    }

    fn free(&mut self) -> bool {
        let Some(permit) = self.permit.take() else {
            return false;
        };
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
        // The slot is free before the oldest waiter is given it.
        drop(permit);
        self.queue.dispatch()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.free();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_of(n: usize, max: usize) -> Arc<Pool> {
        pool_on(
            (0..n).map(|i| Address::Tcp(format!("127.0.0.1:{}", 1 + i))),
            max,
        )
    }

    fn pool_on(addresses: impl IntoIterator<Item = Address>, max: usize) -> Arc<Pool> {
        let configs = addresses
            .into_iter()
            .map(|address| BackendConfig {
                address,
                max_concurrent: max,
            })
            .collect();
        Pool::new(configs, Timeouts::default())
    }

    /// A clamd whose threads are all busy: it accepts connections and
    /// reads commands, and answers nothing.
    async fn silent_clamd() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_probe_that_times_out_with_every_slot_busy_leaves_the_backend_up() {
        let (addr, _clamd) = silent_clamd().await;
        let pool = pool_on([Address::Tcp(addr)], 1);
        let backend = pool.backends()[0].clone();
        backend.set_health(Health::Up);
        let quick = Timeouts {
            connect: Duration::from_secs(1),
            io: Duration::from_millis(200),
            reply: Duration::from_millis(200),
        };
        // Our only slot is taken by a long scan: clamd queues the probe.
        let lease = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        assert!(backend.probe(quick).await.unwrap_err().is_timeout());
        assert!(backend.is_healthy(), "busy is not down");
        // With a slot free, the same silence is a clamd that does not answer.
        drop(lease);
        assert!(backend.probe(quick).await.unwrap_err().is_timeout());
        assert!(!backend.is_healthy());
    }

    #[tokio::test]
    async fn waiters_get_a_backend_that_comes_back_outside_the_health_checker() {
        let pool = pool_of(2, 1);
        let (a, b) = (pool.backends()[0].clone(), pool.backends()[1].clone());
        a.set_health(Health::Up);
        b.set_health(Health::Down("reloading".into()));
        let busy = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        // Queued: the only backend in rotation is busy for a long scan.
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(Duration::from_secs(5), &[]).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The other one passes its probe after a reload.
        b.set_health(Health::Up);
        let started = std::time::Instant::now();
        pool.wake_waiters();
        let lease = waiter
            .await
            .unwrap()
            .expect("a slot on the backend that came back");
        assert_eq!(lease.index(), 1);
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(busy);
    }

    #[tokio::test]
    async fn health_checks_stop_at_once_even_mid_probe() {
        let (addr, _clamd) = silent_clamd().await;
        let pool = pool_on([Address::Tcp(addr)], 1);
        let stop = tokio::time::sleep(Duration::from_millis(200));
        let started = std::time::Instant::now();
        // The probe of a clamd that never answers would wait 10 s.
        pool.run_health_checks(Duration::from_secs(60), stop).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn descriptors_are_tried_again_once_a_unix_backend_is_back_up() {
        let pool = pool_on(
            [
                Address::Unix("/run/clamd.sock".into()),
                Address::Tcp("127.0.0.1:1".into()),
            ],
            1,
        );
        let (unix, tcp) = (&pool.backends()[0], &pool.backends()[1]);
        unix.set_health(Health::Up);
        assert!(unix.fd_passing() && !tcp.fd_passing());
        // Refused (or no in-memory file could be made): off while it is up.
        assert!(unix.stop_fd_passing());
        unix.set_health(Health::Up);
        assert!(!unix.fd_passing());
        // Down and back (a restarted clamd): on again.
        unix.set_health(Health::Down("restarted".into()));
        unix.set_health(Health::Up);
        assert!(unix.fd_passing());
        tcp.set_health(Health::Down("x".into()));
        tcp.set_health(Health::Up);
        assert!(!tcp.fd_passing(), "never over TCP");
    }

    #[tokio::test]
    async fn no_healthy_backend_fails_at_once() {
        let pool = pool_of(2, 1);
        let err = pool
            .acquire(Duration::from_secs(10), &[])
            .await
            .unwrap_err();
        assert_eq!(err, AcquireError::NoneHealthy);
    }

    #[tokio::test]
    async fn least_busy_healthy_backend_is_chosen_and_limits_hold() {
        let pool = pool_of(2, 2);
        for b in pool.backends() {
            b.set_health(Health::Up);
        }
        let a = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        let b = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        assert_ne!(a.index(), b.index(), "spread over both backends");
        let c = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        let d = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        assert_eq!(
            pool.acquire(Duration::from_millis(50), &[])
                .await
                .unwrap_err(),
            AcquireError::Busy
        );
        // Releasing one slot wakes a waiter.
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.acquire(Duration::from_secs(5), &[])
                    .await
                    .map(|l| l.index())
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let freed = c.index();
        drop(c);
        assert_eq!(waiter.await.unwrap().unwrap(), freed);
        drop((a, b, d));
    }

    #[tokio::test]
    async fn a_draining_backend_gets_scans_only_when_no_other_can() {
        let pool = pool_of(2, 4);
        for b in pool.backends() {
            b.set_health(Health::Up);
        }
        pool.backends()[0].set_draining(true);
        let leases: Vec<_> = acquire_n(&pool, 3).await;
        assert!(leases.iter().all(|l| l.index() == 1), "draining skipped");
        pool.backends()[1].set_health(Health::Down("gone".into()));
        let lease = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        assert_eq!(lease.index(), 0, "the draining backend is the last resort");
        assert!(pool.backends()[0].status().draining);
    }

    #[test]
    fn differing_database_versions_are_noticed() {
        let pool = pool_of(3, 1);
        let set = |i: usize, reply: &[u8]| {
            pool.backends()[i].state.lock().unwrap().version = Some(Version::parse(reply).unwrap());
        };
        assert!(!pool.database_versions_differ(), "nothing probed yet");
        set(0, b"ClamAV 1.4.6/27461/Tue Nov 24 09:25:11 2026");
        set(1, b"ClamAV 1.4.6/27461/Tue Nov 24 09:25:11 2026");
        assert!(!pool.database_versions_differ());
        set(2, b"ClamAV 1.4.6/27460/Mon Nov 23 09:25:11 2026");
        assert!(pool.database_versions_differ());
        set(2, b"ClamAV 1.4.6");
        assert!(pool.database_versions_differ(), "signed vs. unsigned");
    }

    async fn acquire_n(pool: &Arc<Pool>, n: usize) -> Vec<Lease> {
        let mut leases = Vec::new();
        for _ in 0..n {
            leases.push(pool.acquire(Duration::ZERO, &[]).await.unwrap());
        }
        leases
    }

    #[tokio::test]
    async fn waiters_are_served_first_come_first_served() {
        let pool = pool_of(1, 1);
        pool.backends()[0].set_health(Health::Up);
        let held = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for n in 0..5 {
            let (waiting, tx) = (pool.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let lease = waiting.acquire(Duration::from_secs(10), &[]).await.unwrap();
                tx.send(n).unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(lease);
            }));
            // Each is in the queue before the next arrives.
            while pool.queue.lock().queue.len() < n + 1 {
                tokio::task::yield_now().await;
            }
        }
        // A newcomer does not jump the queue, even with no wait at all.
        assert_eq!(
            pool.acquire(Duration::ZERO, &[]).await.unwrap_err(),
            AcquireError::Busy
        );
        drop(held);
        let mut order = Vec::new();
        for _ in 0..5 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, [0, 1, 2, 3, 4]);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(pool.backends()[0].in_flight(), 0);
        assert!(pool.acquire(Duration::ZERO, &[]).await.is_ok());
    }

    #[tokio::test]
    async fn release_says_whether_a_waiter_got_the_slot() {
        let pool = pool_of(1, 1);
        pool.backends()[0].set_health(Health::Up);
        let lease = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        assert!(!lease.release(), "nobody waited");
        assert_eq!(pool.backends()[0].in_flight(), 0);

        let held = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        let waiting = pool.clone();
        let waiter =
            tokio::spawn(async move { waiting.acquire(Duration::from_secs(10), &[]).await });
        while pool.queue.lock().queue.is_empty() {
            tokio::task::yield_now().await;
        }
        assert!(held.release(), "the waiter was given the slot");
        let lease = waiter.await.unwrap().unwrap();
        assert_eq!(
            pool.backends()[0].in_flight(),
            1,
            "counted once, not freed twice"
        );
        drop(lease);
        assert_eq!(pool.backends()[0].in_flight(), 0);
    }

    #[tokio::test]
    async fn waiters_that_give_up_leave_no_slot_behind() {
        let pool = pool_of(1, 1);
        pool.backends()[0].set_health(Health::Up);
        let held = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        // One times out, one is cancelled (its request went away).
        assert_eq!(
            pool.acquire(Duration::from_millis(20), &[])
                .await
                .unwrap_err(),
            AcquireError::Busy
        );
        let cancelled = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(Duration::from_secs(10), &[]).await })
        };
        while pool.queue.lock().queue.is_empty() {
            tokio::task::yield_now().await;
        }
        cancelled.abort();
        let _ = cancelled.await;
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(Duration::from_secs(10), &[]).await })
        };
        // (Its arrival clears the cancelled one out of the queue.)
        while pool.queue.lock().queue.iter().all(|w| w.answer.is_closed()) {
            tokio::task::yield_now().await;
        }
        drop(held);
        let lease = waiter.await.unwrap().unwrap();
        assert_eq!(lease.index(), 0);
        assert!(pool.queue.lock().queue.is_empty());
        drop(lease);
        assert_eq!(pool.backends()[0].status().scans, 2);
        assert_eq!(pool.backends()[0].in_flight(), 0);
    }

    #[tokio::test]
    async fn a_waiter_excluding_the_busy_backend_is_not_held_up_by_others() {
        let pool = pool_of(2, 1);
        for b in pool.backends() {
            b.set_health(Health::Up);
        }
        let on_0 = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        let on_1 = pool.acquire(Duration::ZERO, &[]).await.unwrap();
        assert_eq!((on_0.index(), on_1.index()), (0, 1));
        // First in line: anything. Second: not backend 1 (it failed there).
        let first = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(Duration::from_secs(10), &[]).await })
        };
        while pool.queue.lock().queue.is_empty() {
            tokio::task::yield_now().await;
        }
        let second = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(Duration::from_secs(10), &[1]).await })
        };
        while pool.queue.lock().queue.len() < 2 {
            tokio::task::yield_now().await;
        }
        // Backend 1 frees up: the first waiter takes it.
        drop(on_1);
        assert_eq!(first.await.unwrap().unwrap().index(), 1);
        // Backend 0 goes down: the second waiter has nowhere to go.
        pool.backends()[0].mark_down(&Error::Closed);
        drop(on_0);
        assert_eq!(
            second.await.unwrap().unwrap_err(),
            AcquireError::NoneHealthy
        );
    }

    #[tokio::test]
    async fn excluded_and_down_backends_are_skipped() {
        let pool = pool_of(3, 1);
        pool.backends()[0].set_health(Health::Up);
        pool.backends()[2].set_health(Health::Up);
        let lease = pool.acquire(Duration::ZERO, &[0]).await.unwrap();
        assert_eq!(lease.index(), 2);
        pool.backends()[2].mark_down(&Error::Closed);
        drop(lease);
        assert_eq!(
            pool.acquire(Duration::ZERO, &[0]).await.unwrap_err(),
            AcquireError::NoneHealthy
        );
    }
}
