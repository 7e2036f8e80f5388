//! The policy over the admin API. Every handler takes an
//! [`AdminPrincipal`]; the work is [`crate::policy::manage`]'s, shared with
//! the CLI, and a change is applied before the answer is sent (the check
//! after the scan) and given to the managed clamd right after.
//!
//! | | |
//! |---|---|
//! | `GET /v1/admin/policy?all=true` | entries (all: removed, expired too), version, the managed clamd's state |
//! | `POST /v1/admin/policy` | add: `{"kind":"ignore","value":"Win.Test.Fp-1","reason":"...","expires":"30d"}`; 201 |
//! | `DELETE /v1/admin/policy/{id}` | remove |

use super::JsonLine;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::admin::ApiJson;
use super::error::{ApiError, Code};
use super::AppState;
use crate::auth::manage::Actor;
use crate::auth::{store_failed, AdminPrincipal};
use crate::perimeter::ClientIp;
use crate::policy::manage::{self, PolicyError};
use crate::policy::PolicyOptions;
use crate::store::clock;

fn policy_error(e: PolicyError) -> ApiError {
    match e {
        PolicyError::Invalid(msg) => ApiError::new(Code::InvalidRequest, msg),
        PolicyError::Exists { .. } => ApiError::new(Code::PolicyExists, e.to_string()),
        PolicyError::NotFound(_) => ApiError::new(Code::PolicyNotFound, e.to_string()),
        PolicyError::AlreadyRemoved(_) => ApiError::new(Code::PolicyRemoved, e.to_string()),
        PolicyError::Store(e) => store_failed(e),
    }
}

fn actor(admin: &AdminPrincipal, client: Option<axum::Extension<ClientIp>>) -> Actor {
    Actor {
        id: admin.token_id().to_owned(),
        client: client.map(|c| c.0 .0.to_string()),
    }
}

/// Makes a change visible to scans before answering; the clamd files
/// follow in the background.
async fn apply_now(state: &AppState) {
    if let Err(e) = state.policy.refresh().await {
        // The refresher polls the store again shortly.
        tracing::warn!(error = %e, "cannot re-read the policy after a change");
        state.policy.wake();
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    all: bool,
}

/// `GET /v1/admin/policy?all=true`
pub async fn list(
    _admin: AdminPrincipal,
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|r| ApiError::new(Code::InvalidRequest, r.body_text()))?;
    let entries = manage::list(state.auth.store.as_ref(), query.all)
        .await
        .map_err(policy_error)?;
    let snapshot = state.policy.snapshot();
    Ok(JsonLine(serde_json::json!({
        "version": snapshot.version,
        "ignore_after_scan": snapshot.ignore_after_scan,
        "clamd": state.policy.clamd_status(),
        "entries": entries,
    }))
    .into_response())
}

/// `POST /v1/admin/policy`: answers 201 with the entry.
pub async fn add(
    admin: AdminPrincipal,
    State(state): State<AppState>,
    client: Option<axum::Extension<ClientIp>>,
    ApiJson(options): ApiJson<PolicyOptions>,
) -> Result<Response, ApiError> {
    let spec = options
        .validate(clock::now())
        .map_err(|m| ApiError::new(Code::InvalidRequest, m))?;
    let author = format!("token:{}", admin.principal().name);
    let view = manage::add(
        state.auth.store.as_ref(),
        spec,
        &author,
        &actor(&admin, client),
    )
    .await
    .map_err(policy_error)?;
    apply_now(&state).await;
    Ok((StatusCode::CREATED, JsonLine(view)).into_response())
}

/// `DELETE /v1/admin/policy/{id}`
pub async fn remove(
    admin: AdminPrincipal,
    State(state): State<AppState>,
    client: Option<axum::Extension<ClientIp>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = manage::remove(state.auth.store.as_ref(), &id, &actor(&admin, client))
        .await
        .map_err(policy_error)?;
    apply_now(&state).await;
    Ok(JsonLine(view).into_response())
}
