//! The HTTP surface: router, shared state, the connection loop.

pub mod admin;
pub mod error;
pub mod health;
pub mod linger;
pub mod multipart;
pub mod observe;
pub mod policy;
pub mod redirect;
pub mod scan;
pub mod server;
pub mod signatures;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use clamd::Pool;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::managed::{DatabaseKind, ManagedClamd};
use crate::perimeter::{self, ClientIp, Perimeter};
use crate::scan::Engine;
use error::ApiError;

/// A JSON response body that ends with a newline, so that a terminal
/// prompt after `curl` starts on its own line (JSON parsers ignore it).
pub struct JsonLine<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for JsonLine<T> {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(256);
        match serde_json::to_writer(&mut body, &self.0) {
            Ok(()) => {
                body.push(b'\n');
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    body,
                )
                    .into_response()
            }
            Err(e) => (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot serialize the answer: {e}"),
            )
                .into_response(),
        }
    }
}

/// The limits the handlers enforce.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_size: u64,
    pub max_files: usize,
    pub max_parts: usize,
    pub max_field_size: u64,
}

/// Everything a handler may need; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub engines: Arc<[Arc<dyn Engine>]>,
    pub pool: Arc<Pool>,
    pub managed: Option<Arc<ManagedClamd>>,
    pub database: DatabaseKind,
    pub limits: Arc<Limits>,
    pub scan_slots: Arc<Semaphore>,
    pub perimeter: Arc<Perimeter>,
    /// Tokens, quotas, audit: see [`crate::auth`].
    pub auth: Arc<crate::auth::Auth>,
    /// Prometheus metrics (served on their own listener).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Database age per backend, signature reloads.
    pub signatures: Arc<crate::signatures::Signatures>,
    /// The false-positive policy in force (ignore, allow, block).
    pub policy: Arc<crate::policy::Policy>,
}

/// The client's address, set by the connection loop.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

pub fn router(state: AppState) -> Router {
    // Everything that costs a scan or touches state goes through the
    // perimeter; health and version stay open for load balancers.
    let protected = Router::new()
        .route("/v1/scan", post(scan::scan_one))
        .route("/scan", post(scan::scan_one))
        .route("/v1/scan/batch", post(scan::scan_batch))
        .route("/v1/scan/raw", post(scan::scan_raw))
        // Each admin handler takes an AdminPrincipal: admin tokens only.
        .route(
            "/v1/admin/tokens",
            get(admin::list_tokens).post(admin::create_token),
        )
        .route("/v1/admin/tokens/{id}", delete(admin::revoke_token))
        .route("/v1/admin/tokens/{id}/usage", get(admin::token_usage))
        .route("/v1/admin/audit", get(admin::audit))
        .route("/v1/admin/policy", get(policy::list).post(policy::add))
        .route("/v1/admin/policy/{id}", delete(policy::remove))
        .route("/v1/admin/reload", post(signatures::reload))
        .route_layer(middleware::from_fn_with_state(
            state.perimeter.clone(),
            perimeter::guard,
        ));
    let observed = Observed {
        perimeter: state.perimeter.clone(),
        metrics: state.metrics.clone(),
    };
    Router::new()
        .merge(protected)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/version", get(health::version))
        .route("/v1/version", get(health::version))
        // A leaked token pasted into a wrong URL is still called one.
        .fallback(|uri: axum::http::Uri| async move {
            token_in_url(&uri).unwrap_or_else(ApiError::not_found)
        })
        .method_not_allowed_fallback(|uri: axum::http::Uri| async move {
            token_in_url(&uri).unwrap_or_else(ApiError::method_not_allowed)
        })
        .with_state(state)
        .layer(middleware::from_fn_with_state(observed, request_context))
}

/// `/healthz` and `/readyz` alone, for the metrics listener.
pub fn health_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .with_state(state)
}

/// The plain-HTTP listener beside HTTPS ([`redirect::router`]), with the
/// same request context as the API: its answers carry an `X-Request-Id`,
/// are counted and logged.
pub fn redirect_router(
    state: &AppState,
    https_port: u16,
    http01: Option<Arc<rustls_acme::ResolvesServerCertAcme>>,
) -> Router {
    let observed = Observed {
        perimeter: state.perimeter.clone(),
        metrics: state.metrics.clone(),
    };
    redirect::router(https_port, http01)
        .layer(middleware::from_fn_with_state(observed, request_context))
}

/// The refusal for a token in the path, if there is one.
fn token_in_url(uri: &axum::http::Uri) -> Option<ApiError> {
    crate::auth::contains_token(uri.path())
        .then(|| crate::auth::Refusal::token_in_url().into_api_error())
}

/// What [`request_context`] needs.
#[derive(Clone)]
struct Observed {
    perimeter: Arc<Perimeter>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// Gives each request an id (returned as `X-Request-Id`); once it is
/// answered, counts it in the metrics and logs it, by matched route rather
/// than raw path. One layer for all of it: each `from_fn` layer costs
/// every request a boxed service and a clone of the router below it.
async fn request_context(
    State(Observed { perimeter, metrics }): State<Observed>,
    mut request: Request,
    next: Next,
) -> Response {
    let id = observe::RequestId::next();
    let started = Instant::now();
    let method = request.method().clone();
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched
        .as_ref()
        .map_or(crate::metrics::UNMATCHED, |p| p.as_str());
    let client = request
        .extensions()
        .get::<ClientAddr>()
        .map(|peer| perimeter.ip_policy.client_ip(peer.0, request.headers()));
    if let Some(ip) = client {
        request.extensions_mut().insert(ClientIp(ip));
    }
    request.extensions_mut().insert(id.clone());
    let client = client.map(|ip| ip.to_string()).unwrap_or_default();
    let span = tracing::info_span!("request", request_id = %id.0, client = %client);
    let mut response = next.run(request).instrument(span.clone()).await;
    if let Ok(value) = HeaderValue::from_str(&id.0) {
        const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
        response.headers_mut().insert(REQUEST_ID, value);
    }
    let elapsed = started.elapsed();
    metrics.request_done(route, &method, &response, elapsed);
    let status = response.status().as_u16();
    // The error's code, so that a refusal before any scan (no `scanned`
    // line) says which one it was.
    let code = response
        .extensions()
        .get::<error::ErrorCode>()
        .map(|c| c.0.as_str());
    span.in_scope(|| {
        // `code` is left out of the line when there is none.
        tracing::info!(
            method = %method,
            route = %route,
            status,
            code,
            duration_ms = elapsed.as_millis() as u64,
            "request"
        )
    });
    response
}
