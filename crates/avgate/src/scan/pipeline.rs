//! The upload pipeline: body chunks -> sha256 + size + engines -> verdict.
//!
//! Nothing here holds the whole file. Chunks are coalesced to at least
//! [`clamd::proto::MIN_CHUNK`] (small writes cost clamd throughput) and
//! handed on; the only other copy is an engine's bounded replay buffer.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::verdict::{self, Verdict};
use super::{Engine, EngineError, EngineInfo, EngineScan, SizeHint};

/// A failure to read the client's body, already classified by the caller
/// (which knows the transport).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the file is larger than the limit")]
    TooLarge,
    /// The multipart framing around the file is broken (e.g. truncated).
    #[error("{0}")]
    Multipart(String),
    /// The body could not be read (client went away, bad chunked encoding).
    #[error("{0}")]
    Read(String),
    /// The client sent too slowly.
    #[error("the upload was slower than {} bytes/s over {}s", .0.min_bytes_per_sec, .0.window.as_secs())]
    TooSlow(crate::perimeter::slowbody::TooSlow),
    /// The token's monthly byte quota ran out while the file arrived.
    #[error("{message}")]
    QuotaExceeded { message: String, retry_after: u64 },
    /// The store that counts the quota failed.
    #[error("{0}")]
    StoreFailed(String),
}

impl From<crate::perimeter::slowbody::TooSlow> for BodyError {
    fn from(e: crate::perimeter::slowbody::TooSlow) -> BodyError {
        BodyError::TooSlow(e)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("the file is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error(transparent)]
    Body(BodyError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// clamd called the file clean, but may have done so only because of
    /// an allow entry that was removed and that it has not dropped yet.
    #[error(
        "the allow entry for this file was removed and the managed clamd has not reloaded yet"
    )]
    PolicyPending,
}

/// The answer for one scanned file.
#[derive(Debug, Clone, Serialize)]
pub struct ScanResult {
    pub filename: Option<String>,
    #[serde(flatten)]
    pub verdict: Verdict,
    pub sha256: String,
    pub size: u64,
    pub duration_ms: u64,
    pub engine: EngineInfo,
}

/// Streams `body` through every engine and decides the verdict, with the
/// policy in force when the engines have answered.
///
/// `declared` is what the client said of the size (an exact size is checked
/// against `max_size` before anything is read); the real size is counted
/// as bytes arrive.
pub async fn scan<S>(
    engines: &[Arc<dyn Engine>],
    policy: &crate::policy::Policy,
    filename: Option<String>,
    body: S,
    declared: SizeHint,
    max_size: u64,
) -> Result<ScanResult, PipelineError>
where
    S: Stream<Item = Result<Bytes, BodyError>>,
{
    if declared.exact.is_some_and(|n| n > max_size) {
        return Err(PipelineError::TooLarge { limit: max_size });
    }
    let started = Instant::now();
    let clamd_allowed = policy.clamd_allows();
    let mut scans: Vec<Box<dyn EngineScan>> = Vec::with_capacity(engines.len());
    for engine in engines {
        scans.push(engine.begin(declared).await?);
    }

    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut pending = BytesMut::new();
    futures_util::pin_mut!(body);
    while let Some(chunk) = body.next().await {
        // BodyError::TooLarge is the whole request crossing its limit
        // (several files); this file's own limit is counted just below.
        let chunk = chunk.map_err(PipelineError::Body)?;
        size += chunk.len() as u64;
        if size > max_size {
            return Err(PipelineError::TooLarge { limit: max_size });
        }
        let ready = if pending.is_empty() && chunk.len() >= clamd::proto::MIN_CHUNK {
            Some(chunk.clone())
        } else {
            pending.extend_from_slice(&chunk);
            (pending.len() >= clamd::proto::MIN_CHUNK).then(|| pending.split().freeze())
        };
        if let Some(ready) = ready {
            feed(&mut scans, ready).await?;
        }
        // Hashed once it is on its way: clamd, another process, reads it
        // while we hash, instead of waiting for us.
        hasher.update(&chunk);
    }
    if !pending.is_empty() {
        feed(&mut scans, pending.freeze()).await?;
    }

    let mut reports = Vec::with_capacity(scans.len());
    for scan in scans {
        reports.push(scan.finish().await?);
    }
    let sha256 = hex::encode(hasher.finalize());
    let snapshot = policy.snapshot();
    let verdict = verdict::decide_with_policy(&reports, &sha256, &snapshot);
    if verdict.status == verdict::Status::OK
        && verdict.policy.is_none()
        && (clamd_allowed.is_some_and(|a| a.contains(&sha256)) || policy.clamd_may_allow(&sha256))
    {
        return Err(PipelineError::PolicyPending);
    }
    // A block clamd still knows (inside an archive) that was removed: the
    // same, the other way round; after clamd's reload the file is judged
    // on its own again.
    if verdict.policy.is_none()
        && verdict
            .signature
            .as_deref()
            .is_some_and(|s| snapshot.withdrawn_block(s, crate::store::clock::now()))
    {
        return Err(PipelineError::PolicyPending);
    }
    let engine = reports
        .into_iter()
        .next()
        .map(|r| r.engine)
        .ok_or_else(|| EngineError::Unavailable("no engine is configured".into()))?;
    Ok(ScanResult {
        filename,
        verdict,
        sha256,
        size,
        duration_ms: started.elapsed().as_millis() as u64,
        engine,
    })
}

async fn feed(scans: &mut [Box<dyn EngineScan>], chunk: Bytes) -> Result<(), EngineError> {
    for scan in scans.iter_mut() {
        scan.feed(chunk.clone()).await?;
    }
    Ok(())
}
