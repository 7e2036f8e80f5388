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
    // In a task of its own: a client that hangs up must not cut a reload
    // off halfway (clamd would go on loading, unwatched).
    let signatures = state.signatures.clone();
    let report = match tokio::spawn(async move { signatures.reload(&reason).await }).await {
        Ok(report) => report,
        Err(e) => {
            tracing::error!(error = %e, "the reload task failed");
            return super::error::ApiError::new(
                super::error::Code::EngineError,
                "the reload did not complete; see the log",
            )
            .into_response();
        }
    };
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, JsonLine(report)).into_response()
}
