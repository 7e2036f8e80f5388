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

pub fn router(https_port: u16, http01: Option<Arc<ResolvesServerCertAcme>>) -> Router {
    Router::new()
        .route("/.well-known/acme-challenge/{token}", get(challenge))
        .fallback(to_https)
        .with_state(Redirect { https_port, http01 })
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
        return (StatusCode::BAD_REQUEST, "a Host header is required\n").into_response();
    };
    let port = match redirect.https_port {
        443 => String::new(),
        port => format!(":{port}"),
    };
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let location = format!("https://{}{port}{path}", authority.host());
    match HeaderValue::from_str(&location) {
        Ok(location) => (
            StatusCode::PERMANENT_REDIRECT,
            [(header::LOCATION, location)],
        )
            .into_response(),
        Err(_) => StatusCode::BAD_REQUEST.into_response(),
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

    #[tokio::test]
    async fn unknown_challenges_and_missing_hosts() {
        let r = get("/.well-known/acme-challenge/abc", Some("a.example")).await;
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(get("/", None).await.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            get("/", Some("evil.example/path")).await.status(),
            StatusCode::BAD_REQUEST
        );
    }
}
