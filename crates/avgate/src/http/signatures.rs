//! `POST /v1/admin/reload`: reloads the signature databases (as SIGHUP
//! does, without re-reading the configuration). Admin tokens only; the
//! call is audited by the [`AdminPrincipal`] extractor.
//!
//! Answers once every backend to reload is done, with what happened to
//! each: 200 when all were reloaded and are ready again, 503 otherwise
//! (the backends that failed keep their previous database).

use super::JsonLine;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::auth::AdminPrincipal;

pub async fn reload(admin: AdminPrincipal, State(state): State<AppState>) -> Response {
    let reason = format!("admin API ({})", admin.token_id());
    let report = state.signatures.reload(&reason).await;
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, JsonLine(report)).into_response()
}
