//! avgate: a streaming malware-scanning gateway in front of ClamAV's clamd.
//!
//! # Layout
//! - [`config`]: typed, layered configuration (defaults, file, env, flags).
//! - [`auth`]: API tokens, the auth extractors, quotas, the audit trail.
//! - [`store`]: tokens, usage counters, the audit trail and the policy,
//!   behind a trait (SQLite in the data directory).
//! - [`http`]: the router, one module per resource, the one error body
//!   ([`http::error`]), and the connection loop ([`http::server`]).
//! - [`scan`]: the [`scan::Engine`] trait, the ClamAV engine over the
//!   `clamd` crate, the upload pipeline (stream -> sha256 + engines) and
//!   [`scan::verdict`], the one place where OK / FOUND is decided.
//! - [`policy`]: false positives and known-bad files: ignore, allow and
//!   block lists, applied inside the managed clamd and after the scan.
//! - [`managed`]: the clamd that avgate runs itself when none is given:
//!   its database directory and its freshclam.
//! - [`signatures`]: database age per backend (readiness) and reloads, one
//!   backend at a time; [`reload`]: what SIGHUP changes at runtime.
//! - [`metrics`]: Prometheus metrics and their own listener; the per-scan
//!   log line is [`http::observe`].
//! - [`perimeter`]: client address, IP lists, rate limits, slow clients.
//! - [`tls`]: certificate files or ACME (Let's Encrypt), the TLS handshake.
//! - [`app`]: wires these together and runs them until shutdown.
//!
//! A scan travels: request -> limits -> multipart or raw body as a stream
//! of chunks -> pipeline (sha256, size, engines) -> verdict (with the
//! policy) -> JSON.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod http;
pub mod logfmt;
pub mod logout;
pub mod managed;
pub mod metrics;
pub mod perimeter;
pub mod policy;
pub mod reload;
pub mod scan;
pub mod signatures;
pub mod store;
pub mod tls;

/// The repository's own files, for the unit tests that hold the docs and
/// the example configuration to the code.
#[cfg(test)]
pub(crate) mod repo {
    use std::path::PathBuf;

    pub fn path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(name)
    }

    pub fn read(name: &str) -> String {
        let path = path(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}
