//! The plain-HTTP listener next to a TLS one (`http_listen`, usually port
//! 80): answers ACME HTTP-01 challenges and sends everything else to
//! HTTPS with 308, which keeps the method and body; except requests that
//! carry credentials (see [`to_https`]).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rustls_acme::ResolvesServerCertAcme;

#[derive(Clone)]
struct Redirect {
    /// The port of the TLS listener, added to the location unless 443.
    https_port: u16,
    http01: Option<Arc<ResolvesServerCertAcme>>,
}

/// The redirecting router, without the request context (ids, metrics,
/// the request log line) that [`super::redirect_router`] adds.
pub fn router(https_port: u16, http01: Option<Arc<ResolvesServerCertAcme>>) -> Router {
    Router::new()
        .route("/.well-known/acme-challenge/{token}", get(challenge))
        .fallback(to_https)
        .with_state(Redirect { https_port, http01 })
}

fn bad_request(message: &str) -> Response {
    super::error::ApiError::new(super::error::Code::InvalidRequest, message).into_response()
}

async fn challenge(
    State(redirect): State<Redirect>,
    Path(token): Path<String>,
    request: Request,
) -> Response {
    let key_auth = redirect
        .http01
        .as_ref()
        .and_then(|acme| acme.get_http_01_key_auth(&token));
    match key_auth {
        Some(key_auth) => {
            tracing::info!("answering an ACME HTTP-01 validation");
            (
                [(header::CONTENT_TYPE, "application/octet-stream")],
                key_auth,
            )
                .into_response()
        }
        None => to_https(State(redirect), request).await,
    }
}

async fn to_https(State(redirect): State<Redirect>, request: Request) -> Response {
    // A client that sends its token over plain HTTP has leaked it already;
    // a redirect would make that work, and leak it on every request. It is
    // told to use HTTPS instead (the usual answer of APIs, unlike sites).
    if request.headers().contains_key(header::AUTHORIZATION) {
        return super::error::ApiError::new(
            super::error::Code::HttpsRequired,
            "this API is served over HTTPS only: use https:// (a token sent here went over the \
             network unencrypted: treat it as leaked)",
        )
        .into_response();
    }
    // Which one a proxy in front would take is anyone's guess.
    if request.headers().get_all(header::HOST).iter().count() > 1 {
        return bad_request("more than one Host header");
    }
    // The host the client asked for (HTTP/1.1 Host, or an HTTP/2 or
    // absolute-form authority), without its port.
    let authority = request.uri().authority().cloned().or_else(|| {
        request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
    });
    let Some(authority) = authority else {
        return bad_request("a valid Host header is required to redirect to HTTPS");
    };
    let port = match redirect.https_port {
        443 => String::new(),
        port => format!(":{port}"),
    };
    // `OPTIONS *` asks about the server, not a resource: its root.
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let location = format!("https://{}{port}{path}", authority.host());
    match HeaderValue::from_str(&location) {
        Ok(location) => (
            StatusCode::PERMANENT_REDIRECT,
            [(header::LOCATION, location)],
        )
            .into_response(),
        Err(_) => bad_request("the requested URL cannot be redirected to HTTPS"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    async fn get(uri: &str, host: Option<&str>) -> Response {
        let mut request = Request::builder().uri(uri);
        if let Some(host) = host {
            request = request.header("host", host);
        }
        router(8443, None)
            .oneshot(request.body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn redirects_keep_host_path_and_query() {
        let r = get("/v1/scan?x=1", Some("avscan.example.com:8080")).await;
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(
            r.headers()["location"],
            "https://avscan.example.com:8443/v1/scan?x=1"
        );
        let r = router(443, None)
            .oneshot(
                Request::builder()
                    .uri("/")
                    .header("host", "avscan.example.com")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.headers()["location"], "https://avscan.example.com/");
    }

    #[tokio::test]
    async fn a_request_with_a_token_is_refused_not_redirected() {
        let request = Request::builder()
            .method("POST")
            .uri("/v1/scan")
            .header("host", "avscan.example.com")
            .header("authorization", "Bearer avg_x")
            .body(axum::body::Body::empty())
            .unwrap();
        let r = router(443, None).oneshot(request).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(!r.headers().contains_key("location"));
        let body = axum::body::to_bytes(r.into_body(), 4096).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("\"https_required\""));
    }

    /// The JSON error shape and a code, as every other answer of avgate.
    async fn assert_invalid_request(r: Response) {
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let body = axum::body::to_bytes(r.into_body(), 4096).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    }

    #[tokio::test]
    async fn unknown_challenges_and_missing_or_doubled_hosts() {
        let r = get("/.well-known/acme-challenge/abc", Some("a.example")).await;
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_invalid_request(get("/", None).await).await;
        assert_invalid_request(get("/", Some("evil.example/path")).await).await;
        let two_hosts = Request::builder()
            .uri("/")
            .header("host", "a.example")
            .header("host", "b.example")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_invalid_request(router(443, None).oneshot(two_hosts).await.unwrap()).await;
    }

    /// `OPTIONS *` (asterisk-form) goes to the server's root, not to a
    /// URL with a `*` glued to the port.
    #[tokio::test]
    async fn options_star_goes_to_the_root() {
        let request = Request::builder()
            .method("OPTIONS")
            .uri("*")
            .header("host", "a.example")
            .body(axum::body::Body::empty())
            .unwrap();
        let r = router(8443, None).oneshot(request).await.unwrap();
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()["location"], "https://a.example:8443/");
    }
}
