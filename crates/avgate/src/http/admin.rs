//! The admin API: token management over HTTP. Every handler takes an
//! [`AdminPrincipal`], so none runs without an admin-scoped token; the
//! work is done by [`crate::auth::manage`], shared with the CLI.
//!
//! | | |
//! |---|---|
//! | `GET /v1/admin/tokens` | every token (never the secrets) |
//! | `POST /v1/admin/tokens` | create one; the answer carries the token, once |
//! | `DELETE /v1/admin/tokens/{id}` | revoke (id or name) |
//! | `GET /v1/admin/tokens/{id}/usage?month=YYYY-MM` | files and bytes in a month |
//! | `GET /v1/admin/audit?limit=N` | the newest audit records |

use super::JsonLine;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, Code};
use super::AppState;
use crate::auth::manage::{self, Actor, ManageError, TokenOptions};
use crate::auth::{store_failed, AdminPrincipal};
use crate::store::clock::{self, Month};
use crate::store::AuditRecord;

/// Most audit records in one answer.
const MAX_AUDIT: usize = 1000;

/// `axum::Json` whose rejections are the one error body (`invalid_json`).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_error(rejection)),
        }
    }
}

fn json_error(rejection: JsonRejection) -> ApiError {
    let code = match &rejection {
        JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Code::RequestTooLarge
        }
        _ => Code::InvalidJson,
    };
    ApiError::new(code, rejection.body_text())
}

fn query_error(rejection: QueryRejection) -> ApiError {
    ApiError::new(Code::InvalidRequest, rejection.body_text())
}

fn actor(admin: &AdminPrincipal, state_client: Option<String>) -> Actor {
    Actor {
        id: admin.token_id().to_owned(),
        client: state_client,
    }
}

fn manage_error(e: ManageError) -> ApiError {
    match e {
        ManageError::Invalid(msg) => ApiError::new(Code::InvalidRequest, msg),
        ManageError::NotFound(_) => ApiError::new(Code::TokenNotFound, e.to_string()),
        ManageError::AlreadyRevoked(_) => ApiError::new(Code::TokenRevoked, e.to_string()),
        ManageError::NameTaken(_) => ApiError::new(Code::TokenNameTaken, e.to_string()),
        ManageError::Store(e) => store_failed(e),
    }
}

#[derive(Serialize)]
struct TokenList {
    tokens: Vec<manage::TokenView>,
}

/// `GET /v1/admin/tokens`
pub async fn list_tokens(
    _admin: AdminPrincipal,
    State(state): State<AppState>,
) -> Result<Response, ApiError> {
    let tokens = manage::list(state.auth.store.as_ref())
        .await
        .map_err(manage_error)?;
    Ok(JsonLine(TokenList { tokens }).into_response())
}

/// `POST /v1/admin/tokens`: answers 201 with the token, the only time it is
/// shown.
pub async fn create_token(
    admin: AdminPrincipal,
    State(state): State<AppState>,
    client: Option<axum::Extension<crate::perimeter::ClientIp>>,
    ApiJson(options): ApiJson<TokenOptions>,
) -> Result<Response, ApiError> {
    let spec = options
        .validate(clock::now())
        .map_err(|m| ApiError::new(Code::InvalidRequest, m))?;
    let actor = actor(&admin, client.map(|c| c.0 .0.to_string()));
    let created = manage::create(state.auth.store.as_ref(), spec, &actor)
        .await
        .map_err(manage_error)?;
    let mut body = serde_json::to_value(&created.view).unwrap_or_default();
    body["token"] = created.token.expose().into();
    Ok((StatusCode::CREATED, JsonLine(body)).into_response())
}

/// `DELETE /v1/admin/tokens/{id}`
pub async fn revoke_token(
    admin: AdminPrincipal,
    State(state): State<AppState>,
    client: Option<axum::Extension<crate::perimeter::ClientIp>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let actor = actor(&admin, client.map(|c| c.0 .0.to_string()));
    let revoked = manage::revoke(state.auth.store.as_ref(), &id, &actor).await;
    // Verified tokens are cached for a second: the revoked one must not
    // be accepted from the cache, not even once.
    state.auth.forget_tokens();
    let view = revoked.map_err(manage_error)?;
    Ok(JsonLine(view).into_response())
}

#[derive(Deserialize)]
pub struct UsageQuery {
    month: Option<String>,
}

/// `GET /v1/admin/tokens/{id}/usage?month=YYYY-MM`
pub async fn token_usage(
    _admin: AdminPrincipal,
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let month = match query.month {
        Some(m) => Some(
            m.parse::<Month>()
                .map_err(|e| ApiError::new(Code::InvalidRequest, e))?,
        ),
        None => None,
    };
    // Use counted in memory first, so that the answer is exact.
    if let Err(e) = state.auth.flush_usage().await {
        tracing::warn!(error = %e, "cannot write token usage first; the answer may miss the last second");
    }
    let usage = manage::usage(state.auth.store.as_ref(), &id, month)
        .await
        .map_err(manage_error)?;
    Ok(JsonLine(usage).into_response())
}

#[derive(Deserialize)]
pub struct AuditQuery {
    limit: Option<usize>,
}

#[derive(Serialize)]
struct AuditView {
    at: String,
    event: String,
    token_id: Option<String>,
    actor: Option<String>,
    client: Option<String>,
    detail: Option<String>,
}

impl From<AuditRecord> for AuditView {
    fn from(r: AuditRecord) -> AuditView {
        AuditView {
            at: clock::rfc3339(r.at),
            event: r.event,
            token_id: r.token_id,
            actor: r.actor,
            client: r.client,
            detail: r.detail,
        }
    }
}

/// `GET /v1/admin/audit?limit=N` (default 100, at most 1000), newest first.
pub async fn audit(
    _admin: AdminPrincipal,
    State(state): State<AppState>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let limit = query.limit.unwrap_or(100).min(MAX_AUDIT);
    let records = state
        .auth
        .store
        .recent_audit(limit)
        .await
        .map_err(store_failed)?;
    let events: Vec<AuditView> = records.into_iter().map(AuditView::from).collect();
    Ok(JsonLine(serde_json::json!({ "events": events })).into_response())
}
