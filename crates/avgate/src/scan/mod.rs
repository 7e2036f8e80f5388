//! Scanning: the engine interface, the ClamAV engine, the upload pipeline
//! and the one place where a verdict is decided.

pub mod clamav;
pub mod filename;
pub mod pipeline;
pub mod verdict;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

/// A detection engine. Scans are streamed: [`Engine::begin`] opens one,
/// the pipeline feeds it chunks, [`EngineScan::finish`] asks for the result.
#[async_trait]
pub trait Engine: Send + Sync {
    /// Short stable name, e.g. `clamav`.
    fn name(&self) -> &'static str;

    /// Opens a scan. `size` is what the client said of the file's size, so
    /// that an engine can refuse early what it cannot scan, or wait for a
    /// file that is known to be small.
    async fn begin(&self, size: SizeHint) -> Result<Box<dyn EngineScan>, EngineError>;
}

/// What is known of a file's size before its bytes arrive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SizeHint {
    /// The size, declared (a raw body's Content-Length).
    pub exact: Option<u64>,
    /// A bound on it (the Content-Length of a multipart request around the
    /// file's part).
    pub at_most: Option<u64>,
}

impl SizeHint {
    /// A size the client declared (a raw body's Content-Length).
    pub fn declared(size: Option<u64>) -> SizeHint {
        SizeHint {
            exact: size,
            at_most: None,
        }
    }

    /// A file inside a request of `length` bytes (a multipart part).
    pub fn within(length: Option<u64>) -> SizeHint {
        SizeHint {
            exact: None,
            at_most: length,
        }
    }

    /// The most the file can be, when anything is known.
    pub fn upper_bound(&self) -> Option<u64> {
        match (self.exact, self.at_most) {
            (Some(exact), _) => Some(exact),
            (None, bound) => bound,
        }
    }
}

/// One scan in progress.
#[async_trait]
pub trait EngineScan: Send {
    /// Feeds the next chunk. An engine that has already reached a verdict
    /// (clamd stopped reading) accepts and drops further chunks.
    async fn feed(&mut self, chunk: Bytes) -> Result<(), EngineError>;

    /// Ends the input and waits for the engine's answer.
    async fn finish(self: Box<Self>) -> Result<EngineReport, EngineError>;
}

/// What an engine said about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    /// Scanned in full, nothing found.
    Clean,
    /// A signature matched. Names such as `Heuristics.Limits.Exceeded.*`
    /// mean "not fully scanned"; [`verdict::decide`] tells them apart.
    Found(String),
}

#[derive(Debug, Clone)]
pub struct EngineReport {
    pub detection: Detection,
    pub engine: EngineInfo,
}

/// Which engine answered, for the `engine` field of a scan result.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EngineInfo {
    pub name: &'static str,
    /// e.g. `ClamAV 1.4.6`.
    pub version: Option<String>,
    /// Signature database version; null with an unsigned (test) database.
    pub database: Option<u32>,
    pub database_date: Option<String>,
    /// The backend that scanned this file.
    pub backend: String,
}

/// Why an engine could not produce a result. None of these is a verdict,
/// and every one of them ends as `status: ERROR`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// No backend is healthy.
    #[error("no scan engine is available: {0}")]
    Unavailable(String),
    /// All backends are at their concurrency limit.
    #[error("all scan engines are busy")]
    Busy,
    #[error("the scan engine timed out: {0}")]
    Timeout(String),
    /// The engine failed mid-scan (connection reset, ERROR reply, garbage).
    #[error("the scan engine failed: {0}")]
    Failed(String),
}
