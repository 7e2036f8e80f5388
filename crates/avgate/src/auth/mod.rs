//! API tokens: who is calling, what they may do, how much they have used.
//!
//! # Layout
//! - [`token`]: the token format (prefix, 256 random bits, CRC32 checksum),
//!   its hash, the constant-time comparison. No I/O.
//! - [`Auth`] (here): turns a request's `Authorization` header into a
//!   [`Principal`], or a [`Refusal`] that the client sees as one 401.
//! - [`extract`]: the axum extractors. [`Principal`] on scan routes;
//!   [`AdminPrincipal`], which only an admin-scoped token yields, on the
//!   admin API: an admin operation cannot be reached without one.
//! - [`cache`]: verified tokens kept for a second, so that a scan does
//!   not wait for the store to authenticate.
//! - [`quota`]: monthly file and byte quotas, per-token concurrency.
//! - [`usage`]: use of tokens without quotas, counted in memory and
//!   written to the store every second and on shutdown.
//! - [`manage`]: create, list, revoke, usage: shared by the CLI and the
//!   admin API, audited.
//! - [`audit`]: the audit trail (store + JSON lines with target `audit`).
//! - [`cli`]: `avgate token ...`.
//!
//! Rate limits and address lists are the perimeter's
//! ([`crate::perimeter`]); a [`Principal`] carries the token's own
//! settings for them ([`Principal::rate`], [`Principal::allow_ips`]).

pub mod audit;
pub mod cache;
pub mod cli;
pub mod extract;
pub mod manage;
pub mod quota;
pub mod token;
pub mod usage;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::http::{header, HeaderMap, Uri};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::http::error::{ApiError, Code};
use crate::store::{clock, Store, StoreError, TokenRecord};
use token::{FormatError, Token, TokenHash};

/// What a token may do. `admin` includes `scan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Scan,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Scan => "scan",
            Scope::Admin => "admin",
        }
    }

    /// Whether a token of this scope may do what `needed` covers.
    pub fn allows(self, needed: Scope) -> bool {
        match needed {
            Scope::Scan => true,
            Scope::Admin => self == Scope::Admin,
        }
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Scope, String> {
        match s {
            "scan" => Ok(Scope::Scan),
            "admin" => Ok(Scope::Admin),
            other => Err(format!("unknown scope {other:?} (scan or admin)")),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token's own request rate: a token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RateSpec {
    pub per_second: f64,
    pub burst: u32,
}

/// Monthly quotas (calendar months, UTC). `None`: unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Quotas {
    pub monthly_files: Option<u64>,
    pub monthly_bytes: Option<u64>,
}

/// Who is calling, as established by the auth extractor. Every principal
/// may scan; admin rights come only as an [`AdminPrincipal`].
#[derive(Debug, Clone)]
pub struct Principal {
    /// `None` when authentication is disabled and no token was sent.
    pub token_id: Option<String>,
    pub name: String,
    pub scope: Scope,
    /// The token's own rate; `None`: the configured default applies.
    pub rate: Option<RateSpec>,
    /// Addresses the token may be used from; empty: any.
    pub allow_ips: Vec<IpNet>,
    pub quotas: Quotas,
    /// Scans at once for this token; `None`: only the global limit.
    pub max_concurrent: Option<usize>,
    /// Unix seconds.
    pub expires_at: Option<i64>,
}

impl Principal {
    /// The caller when authentication is disabled and no token was sent.
    pub fn anonymous() -> Principal {
        Principal {
            token_id: None,
            name: "anonymous".into(),
            scope: Scope::Scan,
            rate: None,
            allow_ips: Vec::new(),
            quotas: Quotas::default(),
            max_concurrent: None,
            expires_at: None,
        }
    }

    fn from_record(t: &TokenRecord) -> Principal {
        Principal {
            token_id: Some(t.id.clone()),
            name: t.name.clone(),
            scope: t.scope,
            rate: t.rate,
            allow_ips: t.allow_ips.clone(),
            quotas: Quotas {
                monthly_files: t.monthly_files,
                monthly_bytes: t.monthly_bytes,
            },
            max_concurrent: t.max_concurrent,
            expires_at: t.expires_at,
        }
    }
}

/// A principal with the admin scope. Its only constructor checks the scope,
/// so a handler that takes one cannot run for anybody else.
#[derive(Debug, Clone)]
pub struct AdminPrincipal(Principal);

impl AdminPrincipal {
    pub fn check(principal: &Principal) -> Option<AdminPrincipal> {
        (principal.token_id.is_some() && principal.scope.allows(Scope::Admin))
            .then(|| AdminPrincipal(principal.clone()))
    }

    pub fn principal(&self) -> &Principal {
        &self.0
    }

    /// The admin token's id.
    pub fn token_id(&self) -> &str {
        self.0.token_id.as_deref().unwrap_or_default()
    }
}

/// Why a request was not authenticated. The reason goes to the audit
/// trail; the client gets one indistinguishable 401 for all but
/// `TokenInQuery` (its own 400, so the mistake can be fixed) and
/// `WrongScope` (403), and 503 when the store failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    Missing,
    /// Not `Bearer <token>`, or not a token's shape.
    Malformed,
    Checksum,
    Unknown,
    Revoked,
    Expired,
    WrongScope,
    TokenInQuery,
    StoreFailed,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Missing => "missing",
            RefusalReason::Malformed => "malformed",
            RefusalReason::Checksum => "bad_checksum",
            RefusalReason::Unknown => "unknown",
            RefusalReason::Revoked => "revoked",
            RefusalReason::Expired => "expired",
            RefusalReason::WrongScope => "wrong_scope",
            RefusalReason::TokenInQuery => "token_in_query",
            RefusalReason::StoreFailed => "store_failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: RefusalReason,
    /// The token concerned, when it was found (revoked, expired, scope).
    pub token_id: Option<String>,
}

impl Refusal {
    fn new(reason: RefusalReason) -> Refusal {
        Refusal {
            reason,
            token_id: None,
        }
    }

    /// A token in the URL (path or query).
    pub fn token_in_url() -> Refusal {
        Refusal::new(RefusalReason::TokenInQuery)
    }

    pub fn into_api_error(self) -> ApiError {
        match self.reason {
            RefusalReason::TokenInQuery => ApiError::new(
                Code::TokenInQuery,
                "API tokens in the URL end up in logs and browser histories and are refused; \
                 send it as \"Authorization: Bearer <token>\" (and consider this token leaked)",
            ),
            RefusalReason::WrongScope => ApiError::new(
                Code::Forbidden,
                "this token's scope does not allow this operation",
            ),
            RefusalReason::StoreFailed => store_unavailable(),
            _ => ApiError::new(
                Code::Unauthorized,
                "a valid API token is required: send \"Authorization: Bearer <token>\"",
            ),
        }
    }
}

pub(crate) fn store_unavailable() -> ApiError {
    ApiError::new(
        Code::StoreUnavailable,
        "the token store is unavailable; nothing was scanned",
    )
}

pub(crate) fn store_failed(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "state store failed");
    store_unavailable()
}

/// Query parameters that look like a credential.
const QUERY_TOKEN_KEYS: &[&str] = &[
    "token",
    "access_token",
    "api_key",
    "apikey",
    "api-key",
    "auth",
    "auth_token",
    "authorization",
    "bearer",
];

/// The authenticator: the store, the policy, the per-token concurrency
/// limits. One per process, shared by all requests.
pub struct Auth {
    pub store: Arc<dyn Store>,
    /// `auth.required`: without it, a request with no token is
    /// [`Principal::anonymous`]. A token that is sent is checked either way.
    pub required: bool,
    concurrency: quota::Concurrency,
    /// Tokens the store vouched for less than a second ago.
    tokens: cache::TokenCache,
    /// Use of tokens without quotas, not yet in the store.
    usage: Arc<usage::UsageBuffer>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

impl Auth {
    pub fn new(store: Arc<dyn Store>, required: bool) -> Auth {
        Auth {
            store,
            required,
            concurrency: quota::Concurrency::default(),
            tokens: cache::TokenCache::default(),
            usage: Arc::default(),
        }
    }

    /// Forgets the tokens verified so far, so that the next request of
    /// each asks the store. Call it after revoking a token in this process.
    pub fn forget_tokens(&self) {
        self.tokens.invalidate();
    }

    /// Establishes who sent a request with these headers and URI.
    pub async fn authenticate(&self, headers: &HeaderMap, uri: &Uri) -> Result<Principal, Refusal> {
        // In the path too: `DELETE /v1/admin/tokens/avg_…` with a leaked
        // token would otherwise put it in the audit trail and the logs.
        if token_in_query(uri.query()) || contains_token(uri.path()) {
            return Err(Refusal::token_in_url());
        }
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            if headers.contains_key(header::AUTHORIZATION) {
                return Err(Refusal::new(RefusalReason::Malformed));
            }
            return if self.required {
                Err(Refusal::new(RefusalReason::Missing))
            } else {
                Ok(Principal::anonymous())
            };
        };
        let presented = bearer(value.as_bytes()).ok_or(Refusal::new(RefusalReason::Malformed))?;
        let token = Token::parse(presented).map_err(|e| {
            Refusal::new(match e {
                FormatError::Malformed => RefusalReason::Malformed,
                FormatError::Checksum => RefusalReason::Checksum,
            })
        })?;
        self.verify(&token).await
    }

    /// Looks the token up by its hash (in the cache, else in the store)
    /// and checks that it is live.
    async fn verify(&self, token: &Token) -> Result<Principal, Refusal> {
        let hash = token.hash();
        let (found, seen) = match self.tokens.get(&hash) {
            Ok(cached) => (Some(cached), None),
            Err(seen) => {
                let found = self.store.token_by_hash(&hash).await.map_err(|e| {
                    tracing::error!(error = %e, "state store failed during authentication");
                    Refusal::new(RefusalReason::StoreFailed)
                })?;
                (found.map(Arc::new), Some(seen))
            }
        };
        // The lookup is by hash, so an unknown token costs the same
        // comparison as a known one, against a hash nobody has.
        let stored = found.as_ref().map(|t| t.hash).unwrap_or(TokenHash([0; 32]));
        let matches = stored.ct_eq(&hash);
        let Some(record) = found.filter(|_| matches) else {
            // Unknown tokens are not cached (see `cache`).
            return Err(Refusal::new(RefusalReason::Unknown));
        };
        if let Some(seen) = seen {
            self.tokens.insert(&hash, record.clone(), seen);
        }
        let refuse = |reason| Refusal {
            reason,
            token_id: Some(record.id.clone()),
        };
        if record.revoked_at.is_some() {
            return Err(refuse(RefusalReason::Revoked));
        }
        if record.is_expired(clock::now()) {
            return Err(refuse(RefusalReason::Expired));
        }
        Ok(Principal::from_record(&record))
    }
}

/// The token in an `Authorization: Bearer <token>` value (RFC 6750: the
/// scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start();
    (!token.is_empty() && !token.contains(char::is_whitespace)).then_some(token)
}

/// Whether a query string carries a credential: a well-known parameter
/// name, or one of our tokens (checksum and all) under any name.
fn token_in_query(query: Option<&str>) -> bool {
    let Some(query) = query else { return false };
    query.split('&').any(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = key.to_ascii_lowercase();
        QUERY_TOKEN_KEYS.contains(&key.as_str()) || contains_token(value)
    })
}

/// A request path as the audit trail keeps it: any well-formed token in it
/// masked (a leaked one pasted into the URL), and at most 200 characters
/// (refusals of anonymous clients are recorded, and a path can be 64 KiB).
pub(crate) fn audit_path(path: &str) -> String {
    const MAX: usize = 200;
    // A token percent-encoded (`%61vg_...`) is masked too: the path is
    // kept decoded when it holds one.
    let decoded = path.contains('%').then(|| percent_decoded(path));
    let path = match &decoded {
        // Control characters it decodes to stay out of the table.
        Some(decoded) if find_token(decoded).is_some() => {
            &decoded.replace(char::is_control, "\u{fffd}")
        }
        _ => path,
    };
    let mut out = String::with_capacity(path.len().min(MAX + 3));
    let mut rest = path;
    while let Some(at) = find_token(rest) {
        out.push_str(&rest[..at]);
        out.push_str("avg_***");
        rest = &rest[at + token::TOKEN_LEN..];
    }
    out.push_str(rest);
    if out.chars().count() > MAX {
        out = out.chars().take(MAX).collect::<String>() + "...";
    }
    out
}

/// Whether `s` (a raw path, or a raw query value) holds a well-formed
/// token, as sent or once percent-decoded (as the handlers read it: any
/// character of a token may come encoded, `%61vg_...`). The checksum keeps
/// `?filename=q3_avg_revenue.csv` from looking like one.
pub(crate) fn contains_token(s: &str) -> bool {
    // Every request's path and query come here: no copy unless encoded.
    if s.contains('%') {
        find_token(&percent_decoded(s)).is_some()
    } else {
        find_token(s).is_some()
    }
}

/// `s` with every `%XX` decoded (once, as a URL's reader does); invalid
/// UTF-8 replaced, invalid escapes kept as they are.
fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the first well-formed token (checksum and all) starts in `s`.
fn find_token(s: &str) -> Option<usize> {
    s.match_indices(token::PREFIX).map(|(i, _)| i).find(|&i| {
        s.get(i..i + token::TOKEN_LEN)
            .is_some_and(|candidate| Token::parse(candidate).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values() {
        assert_eq!(bearer(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer(b"bearer   abc "), Some("abc"));
        assert_eq!(bearer(b"BEARER abc"), Some("abc"));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer a b"), None);
        assert_eq!(bearer(b"abc"), None);
        assert_eq!(bearer(b"Bearer \xff"), None);
    }

    #[test]
    fn tokens_in_the_query_string_are_spotted() {
        let t = Token::generate().unwrap();
        let t = t.expose();
        for q in [
            "token=x".to_owned(),
            "filename=a.pdf&access_token=x".into(),
            "API_KEY=x".into(),
            "apikey".into(),
            format!("x={t}"),
            format!("filename=a.pdf&x={}", t.replace('_', "%5F")),
            format!("note=my+token+is+{t}+ok"),
            // Any character may come encoded, and is read decoded.
            format!("filename=%61{}", &t[1..]),
            format!("filename={}%{:02X}{}", &t[..10], t.as_bytes()[10], &t[11..]),
        ] {
            assert!(token_in_query(Some(&q)), "{q}");
        }
        for q in [
            "filename=report.pdf",
            "",
            "tokens_total=1",
            "filename=q3_avg_revenue_by_region_and_product_line_2026_final.csv",
            "x=avg_",
        ] {
            assert!(!token_in_query(Some(q)), "{q}");
        }
        assert!(!token_in_query(None));
        // And in the path, which the audit trail keeps masked.
        assert!(contains_token(&format!("/v1/admin/tokens/{t}")));
        assert!(!contains_token("/v1/admin/tokens/tok_abc123"));
        assert_eq!(
            audit_path(&format!("/v1/admin/tokens/{t}/usage")),
            "/v1/admin/tokens/avg_***/usage"
        );
        assert_eq!(audit_path("/v1/avg_/x"), "/v1/avg_/x");
        let encoded = format!("/v1/admin/tokens/%61{}", &t[1..]);
        assert!(contains_token(&encoded));
        assert_eq!(audit_path(&encoded), "/v1/admin/tokens/avg_***");
        assert_eq!(
            audit_path(&format!("/v1/%0d%0a/{encoded}")),
            "/v1/\u{fffd}\u{fffd}//v1/admin/tokens/avg_***"
        );
        assert_eq!(audit_path("/v1/a%20b"), "/v1/a%20b");
        assert_eq!(audit_path(&"/a".repeat(1000)).len(), 203);
    }

    #[test]
    fn scopes() {
        assert!(Scope::Admin.allows(Scope::Scan));
        assert!(Scope::Admin.allows(Scope::Admin));
        assert!(Scope::Scan.allows(Scope::Scan));
        assert!(!Scope::Scan.allows(Scope::Admin));
        assert_eq!("admin".parse::<Scope>().unwrap(), Scope::Admin);
        assert!("root".parse::<Scope>().is_err());
        assert!(AdminPrincipal::check(&Principal::anonymous()).is_none());
    }
}
