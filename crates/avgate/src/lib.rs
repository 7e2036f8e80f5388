//! avgate: a streaming malware-scanning gateway in front of ClamAV's clamd.
//!
//! # Layout
//! - [`config`]: typed, layered configuration (defaults, file, env, flags).
//! - [`http`]: the router, one module per resource, the one error body
//!   ([`http::error`]), and the connection loop ([`http::server`]).
//! - [`scan`]: the [`scan::Engine`] trait, the ClamAV engine over the
//!   `clamd` crate, the upload pipeline (stream -> sha256 + engines) and
//!   [`scan::verdict`], the one place where OK / FOUND is decided.
//! - [`managed`]: the clamd that avgate runs itself when none is given.
//! - [`app`]: wires these together and runs them until shutdown.
//!
//! A scan travels: request -> limits -> multipart or raw body as a stream
//! of chunks -> pipeline (sha256, size, engines) -> verdict -> JSON.

pub mod app;
pub mod cli;
pub mod config;
pub mod http;
pub mod managed;
pub mod scan;
