//! The auth extractors: a handler that takes a [`Principal`] runs only
//! for an authenticated caller (or anyone, with `auth.required = false`);
//! one that takes an [`AdminPrincipal`] only for an admin-scoped token.
//!
//! Both run before the body is read. A refusal is audited, answered with
//! the one error body, and a 401 carries `WWW-Authenticate: Bearer`.
//! The principal is kept in the request's extensions, so a middleware that
//! extracts it first does not authenticate twice.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::audit::{self, Entry, Event};
use super::{AdminPrincipal, Principal, Refusal, RefusalReason};
use crate::http::error::{ApiError, Code};
use crate::http::{AppState, ClientAddr};
use crate::perimeter::ClientIp;

/// An extractor's refusal: the one error body, plus the challenge header
/// on 401.
#[derive(Debug)]
pub struct AuthRejection(pub ApiError);

impl IntoResponse for AuthRejection {
    fn into_response(self) -> Response {
        let unauthorized = self.0.code == Code::Unauthorized;
        let mut response = self.0.into_response();
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"avgate\""),
            );
        }
        response
    }
}

impl From<ApiError> for AuthRejection {
    fn from(e: ApiError) -> AuthRejection {
        AuthRejection(e)
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = AuthRejection;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(known) = parts.extensions.get::<Principal>() {
            return Ok(known.clone());
        }
        let principal = match state.auth.authenticate(&parts.headers, &parts.uri).await {
            Ok(p) => p,
            Err(refusal) => return Err(refuse(parts, state, refusal).await),
        };
        // The token's own address list and rate: enforced by the perimeter.
        if let Some(id) = &principal.token_id {
            let rate = principal.rate.map(|r| crate::perimeter::RateSpec {
                rate: crate::perimeter::ratelimit::Rate {
                    per_second: r.per_second,
                },
                burst: r.burst,
            });
            if let Err(e) = state
                .perimeter
                .check_token(parts, id, &principal.allow_ips, rate)
            {
                // A token used from outside its addresses: perhaps leaked.
                if e.code == Code::IpForbidden {
                    audit_refusal(parts, state, "ip_forbidden", Some(id.clone())).await;
                }
                return Err(e.into());
            }
        }
        parts.extensions.insert(principal.clone());
        Ok(principal)
    }
}

impl FromRequestParts<AppState> for AdminPrincipal {
    type Rejection = AuthRejection;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let principal = Principal::from_request_parts(parts, state).await?;
        let admin = match AdminPrincipal::check(&principal) {
            Some(admin) => admin,
            None => {
                let reason = if principal.token_id.is_none() {
                    RefusalReason::Missing
                } else {
                    RefusalReason::WrongScope
                };
                let refusal = Refusal {
                    reason,
                    token_id: principal.token_id,
                };
                return Err(refuse(parts, state, refusal).await);
            }
        };
        // Written before the call is made: an admin call the audit trail
        // cannot hold is not made (security.md).
        audit::record_first(
            state.auth.store.as_ref(),
            Event::AdminCall,
            Entry {
                token_id: None,
                actor: Some(admin.token_id().to_owned()),
                client: client(parts),
                detail: Some(format!(
                    "{} {}",
                    parts.method,
                    super::audit_path(parts.uri.path())
                )),
            },
        )
        .await
        .map_err(|_| AuthRejection(super::store_unavailable()))?;
        Ok(admin)
    }
}

/// Audits a refusal and turns it into the client's answer.
async fn refuse(parts: &Parts, state: &AppState, refusal: Refusal) -> AuthRejection {
    audit_refusal(
        parts,
        state,
        refusal.reason.as_str(),
        refusal.token_id.clone(),
    )
    .await;
    AuthRejection(refusal.into_api_error())
}

/// An `auth_refused` event: why, for which request, with which token.
async fn audit_refusal(parts: &Parts, state: &AppState, reason: &str, token_id: Option<String>) {
    audit::record(
        state.auth.store.as_ref(),
        Event::AuthRefused,
        Entry {
            token_id,
            actor: None,
            client: client(parts),
            detail: Some(format!(
                "{reason} ({} {})",
                parts.method,
                super::audit_path(parts.uri.path())
            )),
        },
    )
    .await;
}

fn client(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<ClientIp>()
        .map(|c| c.0.to_string())
        .or_else(|| {
            parts
                .extensions
                .get::<ClientAddr>()
                .map(|c| c.0.ip().to_string())
        })
}
