//! `GET /healthz`, `/readyz`, `/version`.

use std::time::UNIX_EPOCH;

use super::JsonLine;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use crate::managed::ManagedStatus;

/// The process is alive and serving HTTP; says nothing about clamd.
pub async fn healthz() -> Response {
    JsonLine(serde_json::json!({ "status": "alive" })).into_response()
}

#[derive(Serialize)]
struct Readiness {
    /// `ready`, `not_ready` (no backend scans) or `stale_database`.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    backends: Vec<BackendView>,
    signatures: crate::signatures::SignaturesStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    managed_clamd: Option<ManagedStatus>,
}

#[derive(Serialize)]
pub struct BackendView {
    address: String,
    /// `up`, `down` or `unknown` (not probed yet).
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    in_flight: usize,
    max_concurrent: usize,
    /// Unix time of the last probe.
    last_probe: Option<u64>,
    clamav: Option<String>,
    database: Option<u32>,
    database_date: Option<String>,
    /// Seconds since the database was built (signed) or its newest file
    /// changed (unsigned, managed); `null` when unknown.
    database_age_seconds: Option<u64>,
    /// `version` (clamd's VERSION) or `files` (the files' times).
    database_dated_by: Option<&'static str>,
    /// Older than `max_database_age`.
    stale: bool,
    /// Out of rotation for a signature reload.
    draining: bool,
    /// Small files go to it as file descriptors (FILDES).
    fd_passing: bool,
}

pub fn backend_views(state: &AppState) -> Vec<BackendView> {
    let max_age = state.signatures.max_age();
    state
        .pool
        .backends()
        .iter()
        .map(|b| {
            let s = b.status();
            let stale = crate::signatures::is_stale(&s, max_age);
            let database_age_seconds = s.database_age().map(|a| a.as_secs());
            let (state, reason) = match s.health {
                clamd::Health::Up => ("up", None),
                clamd::Health::Down(why) => ("down", Some(why)),
                clamd::Health::Unknown => ("unknown", None),
            };
            BackendView {
                address: s.address,
                state,
                reason,
                in_flight: s.in_flight,
                max_concurrent: s.max_concurrent,
                last_probe: s
                    .last_probe
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
                clamav: s.version.as_ref().map(|v| v.clamav.clone()),
                database: s.version.as_ref().and_then(|v| v.database),
                database_date: s.version.and_then(|v| v.database_date),
                database_age_seconds,
                database_dated_by: s.dated_by.map(|d| d.as_str()),
                stale,
                draining: s.draining,
                fd_passing: s.fd_passing,
            }
        })
        .collect()
}

/// 200 only when at least one backend really scans (its last probe, a
/// scan of EICAR, came back FOUND) and no backend in rotation has a
/// database older than `max_database_age`.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let scans = state.pool.any_healthy();
    let stale = state.signatures.stale_backends();
    let ready = scans && stale.is_empty();
    let (status, reason) = if !scans {
        ("not_ready", None)
    } else if !stale.is_empty() {
        let names: Vec<&str> = stale.iter().map(|s| s.address.as_str()).collect();
        let reason = format!(
            "signature database older than max_database_age on {}",
            names.join(", ")
        );
        ("stale_database", Some(reason))
    } else {
        ("ready", None)
    };
    let body = Readiness {
        status,
        reason,
        backends: backend_views(&state),
        signatures: state.signatures.status(),
        managed_clamd: state.managed.as_ref().map(|m| m.status()),
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, JsonLine(body)).into_response()
}

pub async fn version(State(state): State<AppState>) -> Response {
    // The managed clamd's database can change kind at runtime (test
    // signatures until freshclam gets the official database).
    let database = state
        .managed
        .as_ref()
        .map_or(state.database, |m| m.database());
    JsonLine(serde_json::json!({
        "avgate": env!("CARGO_PKG_VERSION"),
        "database": database.as_str(),
        "versions_differ": state.pool.database_versions_differ(),
        "backends": backend_views(&state),
    }))
    .into_response()
}
