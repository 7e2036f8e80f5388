//! An async client for ClamAV's clamd.
//!
//! # Layout
//! - [`proto`]: the wire protocol without I/O: command bytes, zINSTREAM
//!   framing, reply parsing. Unit-tested and fuzzed (see `fuzz/`).
//! - [`conn`]: one connection over TCP or a Unix socket, with a deadline on
//!   every operation.
//! - [`pool`]: several backends, health probes (a real scan of EICAR, not
//!   PING), least-busy choice and a concurrency limit per backend.
//! - [`database`]: which files of a database directory clamd loads, and
//!   how old its newest signatures are.
//!
//! # What clamd's answers do not tell you
//! INSTREAM reports only the first match. With `AlertExceedsMax no` (the
//! default), a file over MaxFileSize or a scan past MaxScanTime is answered
//! `stream: OK` without having been scanned: run clamd with
//! `AlertExceedsMax yes` to have those reported as
//! `Heuristics.Limits.Exceeded.*` instead.

pub mod conn;
pub mod database;
pub mod pool;
pub mod proto;

pub use conn::{Address, Connection, Error, Instream, Session, Timeouts};
pub use pool::{
    AcquireError, Backend, BackendConfig, BackendStatus, DatabaseDating, Health, Lease, Pool, EICAR,
};
pub use proto::{ScanReply, Stats, Version};
