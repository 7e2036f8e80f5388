//! The ClamAV engine: streams a file to one clamd of the pool, and fails
//! over to another when its backend dies and the bytes can be replayed.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use clamd::{AcquireError, Instream, Lease, Pool, ScanReply};

use super::{Detection, Engine, EngineError, EngineInfo, EngineReport, EngineScan};

/// Reported when a file is larger than a backend's StreamMaxLength: clamd
/// would cut the stream off unscanned, so we say so instead of sending it.
pub const STREAM_MAX_SIGNATURE: &str = "avgate.Limits.Exceeded.StreamMaxLength";

#[derive(Clone)]
pub struct ClamavEngine {
    inner: Arc<Settings>,
}

struct Settings {
    pool: Arc<Pool>,
    queue_timeout: Duration,
    replay_limit: usize,
    /// StreamMaxLength per backend (same order as the pool), when known.
    stream_max: Vec<Option<u64>>,
}

impl ClamavEngine {
    pub fn new(
        pool: Arc<Pool>,
        queue_timeout: Duration,
        replay_limit: usize,
        stream_max: Vec<Option<u64>>,
    ) -> ClamavEngine {
        ClamavEngine {
            inner: Arc::new(Settings {
                pool,
                queue_timeout,
                replay_limit,
                stream_max,
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
    /// command and again for the data).
    async fn begin(&self, size_hint: Option<u64>) -> Result<Box<dyn EngineScan>, EngineError> {
        let mut scan = ClamavScan {
            settings: self.inner.clone(),
            tried: Vec::new(),
            lease: None,
            stream: None,
            replay: Some(Vec::new()),
            replay_bytes: 0,
            sent: 0,
            early: None,
            last_error: None,
        };
        scan.acquire().await?;
        if let (Some(size), Some(limit)) = (size_hint, scan.stream_max()) {
            if size > limit {
                scan.give_up_unscanned();
            }
        }
        Ok(Box::new(scan))
    }
}

struct ClamavScan {
    settings: Arc<Settings>,
    /// Backends this scan already failed on (by pool index).
    tried: Vec<usize>,
    lease: Option<Lease>,
    stream: Option<Instream>,
    /// Everything sent so far, while it fits in `replay_limit`; `None` once
    /// it no longer does (a failure then cannot be retried).
    replay: Option<Vec<Bytes>>,
    replay_bytes: usize,
    sent: u64,
    /// A reply that arrived before the stream ended (or our own decision
    /// not to send it); later chunks are dropped.
    early: Option<ScanReply>,
    /// Why the last backend tried could not be used.
    last_error: Option<String>,
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

    fn stream_max(&self) -> Option<u64> {
        let index = self.lease.as_ref()?.index();
        self.settings.stream_max.get(index).copied().flatten()
    }

    fn give_up_unscanned(&mut self) {
        self.early = Some(ScanReply::Found(STREAM_MAX_SIGNATURE.into()));
        // Dropping the connection mid-stream is fine: clamd sees EOF.
        self.stream = None;
        self.replay = None;
    }

    /// After a backend failed: mark it down and, if every byte sent so far
    /// is still held, replay them on another backend.
    async fn fail_over(&mut self, error: clamd::Error) -> Result<(), EngineError> {
        if let Some(lease) = self.lease.take() {
            tracing::warn!(backend = %lease.backend().address, error = %error, "clamd backend failed mid-scan");
            lease.backend().mark_down(&error);
        }
        self.stream = None;
        let Some(replay) = self.replay.clone() else {
            return Err(engine_error(error));
        };
        loop {
            self.open().await?;
            let stream = self.stream.as_mut().expect("open() sets the stream");
            let mut failed = None;
            for chunk in &replay {
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
                Some(e) => {
                    if let Some(lease) = self.lease.take() {
                        lease.backend().mark_down(&e);
                    }
                    self.stream = None;
                }
            }
        }
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
                lease.backend().status().version,
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

#[async_trait]
impl EngineScan for ClamavScan {
    async fn feed(&mut self, chunk: Bytes) -> Result<(), EngineError> {
        if self.early.is_some() {
            return Ok(());
        }
        if let Some(limit) = self.stream_max() {
            if self.sent + chunk.len() as u64 > limit {
                self.give_up_unscanned();
                return Ok(());
            }
        }
        if let Some(replay) = &mut self.replay {
            if self.replay_bytes + chunk.len() <= self.settings.replay_limit {
                self.replay_bytes += chunk.len();
                replay.push(chunk.clone());
            } else {
                self.replay = None;
            }
        }
        if self.stream.is_none() {
            // The first bytes: now the connection.
            self.open().await?;
        }
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
            Err(e) if e.is_timeout() => {
                // A clamd that stopped reading is stuck, not dead: no replay
                // (it may be the file), but keep it out of rotation.
                if let Some(lease) = &self.lease {
                    lease.backend().mark_down(&e);
                }
                Err(engine_error(e))
            }
            Err(e) => self.fail_over(e).await,
        }
    }

    async fn finish(mut self: Box<Self>) -> Result<EngineReport, EngineError> {
        loop {
            if let Some(reply) = self.early.take() {
                return self.report(reply);
            }
            if self.stream.is_none() {
                // An empty file: nothing was fed, nothing opened yet.
                self.open().await?;
            }
            let stream = self
                .stream
                .take()
                .ok_or_else(|| EngineError::Failed("no stream".into()))?;
            match stream.finish().await {
                Ok(reply) => return self.report(reply),
                Err(clamd::Error::EarlyReply(reply)) => return self.report(reply),
                Err(e) if e.is_timeout() => {
                    if let Some(lease) = &self.lease {
                        lease.backend().mark_down(&e);
                    }
                    return Err(engine_error(e));
                }
                Err(e @ clamd::Error::Protocol(_)) => return Err(engine_error(e)),
                Err(e) => self.fail_over(e).await?,
            }
        }
    }
}

fn engine_error(e: clamd::Error) -> EngineError {
    if e.is_timeout() {
        EngineError::Timeout(e.to_string())
    } else {
        EngineError::Failed(e.to_string())
    }
}
