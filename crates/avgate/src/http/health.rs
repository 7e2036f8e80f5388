//! `GET /healthz`, `/readyz`, `/version`.

use std::time::UNIX_EPOCH;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::AppState;
use crate::managed::ManagedStatus;

/// The process is alive and serving HTTP; says nothing about clamd.
pub async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "alive" })).into_response()
}

#[derive(Serialize)]
struct Readiness {
    status: &'static str,
    backends: Vec<BackendView>,
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
}

pub fn backend_views(state: &AppState) -> Vec<BackendView> {
    state
        .pool
        .backends()
        .iter()
        .map(|b| {
            let s = b.status();
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
            }
        })
        .collect()
}

/// 200 only when at least one backend really scans: its last probe, a scan
/// of EICAR, came back FOUND.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let ready = state.pool.any_healthy();
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        backends: backend_views(&state),
        managed_clamd: state.managed.as_ref().map(|m| m.status()),
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

pub async fn version(State(state): State<AppState>) -> Response {
    Json(serde_json::json!({
        "avgate": env!("CARGO_PKG_VERSION"),
        "database": state.database.as_str(),
        "backends": backend_views(&state),
    }))
    .into_response()
}
