//! The perimeter: what every request to a protected route goes through
//! before any of its body is read.
//!
//! 1. the client address (the socket peer, or behind a trusted proxy the
//!    right-most untrusted X-Forwarded-For hop),
//! 2. the global allow and deny lists (403),
//! 3. the failed-authentication limit per address (429, brute force),
//! 4. the request rate per address (429),
//! 5. after authentication: the token's own address list and rate
//!    ([`Perimeter::check_token`]),
//! 6. a deadline for the whole request (408); the minimum upload rate is
//!    enforced on the body stream ([`slowbody::MinRate`]).

pub mod network;
pub mod ratelimit;
pub mod slowbody;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;

use crate::http::error::{ApiError, Code};
use crate::http::ClientAddr;
use network::IpPolicy;
use ratelimit::{Decision, Limiter, Rate};

/// A rate and a burst.
#[derive(Debug, Clone, Copy)]
pub struct RateSpec {
    pub rate: Rate,
    pub burst: u32,
}

#[derive(Debug)]
pub struct Perimeter {
    pub ip_policy: IpPolicy,
    pub per_ip: Option<RateSpec>,
    /// For tokens without a rate of their own.
    pub per_token: Option<RateSpec>,
    pub auth_failures: RateSpec,
    pub request_timeout: Duration,
    pub min_upload_rate: u64,
    pub min_upload_window: Duration,
    ip_limiter: Limiter<IpAddr>,
    token_limiter: Limiter<String>,
    auth_fail_limiter: Limiter<IpAddr>,
}

/// The client address as decided by the perimeter, for handlers and logs.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

/// Where the token check leaves its rate decision, so the middleware can
/// put the RateLimit headers on the response.
#[derive(Debug, Clone, Default)]
pub struct RateSlot(Arc<Mutex<Option<Decision>>>);

impl RateSlot {
    fn set(&self, d: Decision) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
    }
    fn get(&self) -> Option<Decision> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Perimeter {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ip_policy: IpPolicy,
        per_ip: Option<RateSpec>,
        per_token: Option<RateSpec>,
        auth_failures: RateSpec,
        request_timeout: Duration,
        min_upload_rate: u64,
        min_upload_window: Duration,
    ) -> Perimeter {
        Perimeter {
            ip_policy,
            per_ip,
            per_token,
            auth_failures,
            request_timeout,
            min_upload_rate,
            min_upload_window,
            ip_limiter: Limiter::new(),
            token_limiter: Limiter::new(),
            auth_fail_limiter: Limiter::new(),
        }
    }

    /// The checks that need a token: its own address list and its rate.
    /// `rate` is the token's own; without one the default applies.
    pub fn check_token(
        &self,
        request: &axum::http::request::Parts,
        token_id: &str,
        allow_ips: &[IpNet],
        rate: Option<RateSpec>,
    ) -> Result<(), ApiError> {
        let ip = client_ip_of(request);
        if !allow_ips.is_empty() && !network::contains(allow_ips, ip) {
            // Audited (event auth_refused) by the token extractor.
            return Err(forbidden_ip());
        }
        let Some(spec) = rate.or(self.per_token) else {
            return Ok(());
        };
        let decision = self
            .token_limiter
            .check(&token_id.to_owned(), spec.rate, spec.burst);
        if let Some(slot) = request.extensions.get::<RateSlot>() {
            slot.set(decision);
        }
        match decision {
            Decision::Allowed { .. } => Ok(()),
            Decision::Limited { retry_after, .. } => Err(rate_limited(
                Code::RateLimited,
                "too many requests for this token",
                retry_after,
            )),
        }
    }
}

fn client_ip_of(parts: &axum::http::request::Parts) -> IpAddr {
    parts
        .extensions
        .get::<ClientIp>()
        .map(|c| c.0)
        .or_else(|| parts.extensions.get::<ClientAddr>().map(|c| c.0.ip()))
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// Whose buckets (and connection count, `max_connections_per_ip`) a client
/// address uses: the address itself, or for IPv6 its /64. One IPv6 host is
/// usually given a whole /64 (SLAAC, privacy addresses) and can pick any
/// address in it, so per-address buckets would let a single client step
/// around every per-address limit. An IPv4-mapped address is its IPv4 one.
pub(crate) fn rate_key(ip: IpAddr) -> IpAddr {
    match network::canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !(u128::MAX >> 64)).into()),
        v4 => v4,
    }
}

fn forbidden_ip() -> ApiError {
    ApiError::new(
        Code::IpForbidden,
        "requests from this address are not allowed",
    )
}

fn rate_limited(code: Code, message: &str, retry_after: Duration) -> ApiError {
    // Rounded up: a client that waits exactly this long must get through.
    ApiError::new(code, message).with_retry_after(retry_after.as_secs_f64().ceil().max(1.0) as u64)
}

/// The middleware on protected routes.
pub async fn guard(State(p): State<Arc<Perimeter>>, mut request: Request, next: Next) -> Response {
    // request_context has usually decided the address already.
    let ip = match request.extensions().get::<ClientIp>() {
        Some(c) => c.0,
        None => {
            let peer = request
                .extensions()
                .get::<ClientAddr>()
                .map(|c| c.0)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            let ip = p.ip_policy.client_ip(peer, request.headers());
            request.extensions_mut().insert(ClientIp(ip));
            ip
        }
    };

    if !p.ip_policy.permits(ip) {
        tracing::warn!(target: "audit", client = %ip, "refused: address not allowed");
        return forbidden_ip().into_response();
    }
    let fails = p.auth_failures;
    if let Decision::Limited { retry_after, .. } =
        p.auth_fail_limiter
            .peek(&rate_key(ip), fails.rate, fails.burst)
    {
        return rate_limited(
            Code::TooManyAuthFailures,
            "too many failed authentications from this address",
            retry_after,
        )
        .into_response();
    }
    let ip_decision = p
        .per_ip
        .map(|s| p.ip_limiter.check(&rate_key(ip), s.rate, s.burst));
    if let Some(Decision::Limited { retry_after, .. }) = ip_decision {
        let mut response = rate_limited(
            Code::RateLimited,
            "too many requests from this address",
            retry_after,
        )
        .into_response();
        set_rate_headers(response.headers_mut(), ip_decision);
        return response;
    }

    let slot = RateSlot::default();
    request.extensions_mut().insert(slot.clone());
    let mut response = match tokio::time::timeout(p.request_timeout, next.run(request)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            Code::RequestTimeout,
            format!(
                "the request took longer than {}s",
                p.request_timeout.as_secs()
            ),
        )
        .into_response(),
    };
    // A token used from outside its addresses counts as a failure too: it
    // is audited, and a leaked token used elsewhere must not fill the
    // audit table at the per-address request rate.
    let token_elsewhere = response
        .extensions()
        .get::<crate::http::error::ErrorCode>()
        .is_some_and(|c| c.0 == Code::IpForbidden);
    if response.status() == StatusCode::UNAUTHORIZED || token_elsewhere {
        p.auth_fail_limiter
            .check(&rate_key(ip), fails.rate, fails.burst);
    }
    // The token's bucket is the one that matters to a partner; without a
    // token, the address's.
    set_rate_headers(response.headers_mut(), slot.get().or(ip_decision));
    response
}

/// `RateLimit-Limit`, `-Remaining`, `-Reset` (IETF httpapi draft names).
fn set_rate_headers(headers: &mut HeaderMap, decision: Option<Decision>) {
    let (limit, remaining, reset) = match decision {
        Some(Decision::Allowed {
            limit,
            remaining,
            reset,
        }) => (limit, remaining, reset),
        Some(Decision::Limited { limit, retry_after }) => (limit, 0, retry_after),
        None => return,
    };
    // Named by constants: a name given as a string is copied into a new
    // allocation on every insert.
    const LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
    const REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
    const RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
    headers.insert(LIMIT, HeaderValue::from(limit));
    headers.insert(REMAINING, HeaderValue::from(remaining));
    headers.insert(RESET, HeaderValue::from(reset.as_secs_f64().ceil() as u64));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_share_buckets_by_64_and_ipv4_by_address() {
        let key = |s: &str| rate_key(s.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("203.0.113.7"), "203.0.113.7");
        assert_ne!(key("203.0.113.7"), key("203.0.113.8"));
    }
}
