//! The one error body. Every error avgate answers looks like this:
//!
//! ```json
//! {"status": "ERROR",
//!  "error": {"code": "engine_unavailable", "message": "..."},
//!  "filename": "report.pdf"}
//! ```
//!
//! `status: "ERROR"` is there so that a client that only checks `status`
//! never mistakes an error for a clean file. `code` is stable and
//! documented in docs/api.md; `message` is for humans and may change.

use super::JsonLine;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use crate::scan::pipeline::{BodyError, PipelineError};
use crate::scan::EngineError;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: u32 = 5;

/// Every `code` an error body can carry, each with its one HTTP status.
/// These are the stable contract clients program against (docs/api.md
/// lists them; a test holds the two together): never rename one, add new
/// ones instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidContentType,
    InvalidMultipart,
    InvalidBody,
    MissingFile,
    TooManyFiles,
    TooManyParts,
    FileTooLarge,
    FieldTooLarge,
    RequestTooLarge,
    NotFound,
    MethodNotAllowed,
    ServerBusy,
    EngineBusy,
    EngineUnavailable,
    EngineError,
    EngineTimeout,
    TokenInQuery,
    Unauthorized,
    Forbidden,
    QuotaExceeded,
    TokenConcurrencyLimit,
    StoreUnavailable,
    IpForbidden,
    RateLimited,
    TooManyAuthFailures,
    RequestTimeout,
    UploadTooSlow,
    InvalidJson,
    InvalidRequest,
    TokenNotFound,
    TokenNameTaken,
    TokenRevoked,
    PolicyExists,
    PolicyNotFound,
    PolicyRemoved,
    PolicyPending,
    HttpsRequired,
    UnsupportedEncoding,
}

impl Code {
    pub const ALL: &'static [Code] = &[
        Code::InvalidContentType,
        Code::InvalidMultipart,
        Code::InvalidBody,
        Code::MissingFile,
        Code::TooManyFiles,
        Code::TooManyParts,
        Code::FileTooLarge,
        Code::FieldTooLarge,
        Code::RequestTooLarge,
        Code::NotFound,
        Code::MethodNotAllowed,
        Code::ServerBusy,
        Code::EngineBusy,
        Code::EngineUnavailable,
        Code::EngineError,
        Code::EngineTimeout,
        Code::TokenInQuery,
        Code::Unauthorized,
        Code::Forbidden,
        Code::QuotaExceeded,
        Code::TokenConcurrencyLimit,
        Code::StoreUnavailable,
        Code::IpForbidden,
        Code::RateLimited,
        Code::TooManyAuthFailures,
        Code::RequestTimeout,
        Code::UploadTooSlow,
        Code::InvalidJson,
        Code::InvalidRequest,
        Code::TokenNotFound,
        Code::TokenNameTaken,
        Code::TokenRevoked,
        Code::PolicyExists,
        Code::PolicyNotFound,
        Code::PolicyRemoved,
        Code::PolicyPending,
        Code::HttpsRequired,
        Code::UnsupportedEncoding,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidContentType => "invalid_content_type",
            Code::InvalidMultipart => "invalid_multipart",
            Code::InvalidBody => "invalid_body",
            Code::MissingFile => "missing_file",
            Code::TooManyFiles => "too_many_files",
            Code::TooManyParts => "too_many_parts",
            Code::FileTooLarge => "file_too_large",
            Code::FieldTooLarge => "field_too_large",
            Code::RequestTooLarge => "request_too_large",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::ServerBusy => "server_busy",
            Code::EngineBusy => "engine_busy",
            Code::EngineUnavailable => "engine_unavailable",
            Code::EngineError => "engine_error",
            Code::EngineTimeout => "engine_timeout",
            Code::TokenInQuery => "token_in_query",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::QuotaExceeded => "quota_exceeded",
            Code::TokenConcurrencyLimit => "token_concurrency_limit",
            Code::StoreUnavailable => "store_unavailable",
            Code::IpForbidden => "ip_forbidden",
            Code::RateLimited => "rate_limited",
            Code::TooManyAuthFailures => "too_many_auth_failures",
            Code::RequestTimeout => "request_timeout",
            Code::UploadTooSlow => "upload_too_slow",
            Code::InvalidJson => "invalid_json",
            Code::InvalidRequest => "invalid_request",
            Code::TokenNotFound => "token_not_found",
            Code::TokenNameTaken => "token_name_taken",
            Code::TokenRevoked => "token_revoked",
            Code::PolicyExists => "policy_exists",
            Code::PolicyNotFound => "policy_not_found",
            Code::PolicyRemoved => "policy_removed",
            Code::PolicyPending => "policy_pending",
            Code::HttpsRequired => "https_required",
            Code::UnsupportedEncoding => "unsupported_encoding",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Code::InvalidContentType => StatusCode::BAD_REQUEST,
            Code::InvalidMultipart => StatusCode::BAD_REQUEST,
            Code::InvalidBody => StatusCode::BAD_REQUEST,
            Code::MissingFile => StatusCode::BAD_REQUEST,
            Code::TooManyFiles => StatusCode::BAD_REQUEST,
            Code::TooManyParts => StatusCode::BAD_REQUEST,
            Code::FileTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::FieldTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::ServerBusy => StatusCode::SERVICE_UNAVAILABLE,
            Code::EngineBusy => StatusCode::SERVICE_UNAVAILABLE,
            Code::EngineUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::EngineError => StatusCode::SERVICE_UNAVAILABLE,
            Code::EngineTimeout => StatusCode::GATEWAY_TIMEOUT,
            Code::TokenInQuery => StatusCode::BAD_REQUEST,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Forbidden => StatusCode::FORBIDDEN,
            Code::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            Code::TokenConcurrencyLimit => StatusCode::TOO_MANY_REQUESTS,
            Code::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::IpForbidden => StatusCode::FORBIDDEN,
            Code::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Code::TooManyAuthFailures => StatusCode::TOO_MANY_REQUESTS,
            Code::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Code::UploadTooSlow => StatusCode::REQUEST_TIMEOUT,
            Code::InvalidJson => StatusCode::BAD_REQUEST,
            Code::InvalidRequest => StatusCode::BAD_REQUEST,
            Code::TokenNotFound => StatusCode::NOT_FOUND,
            Code::TokenNameTaken => StatusCode::CONFLICT,
            Code::TokenRevoked => StatusCode::CONFLICT,
            Code::PolicyExists => StatusCode::CONFLICT,
            Code::PolicyNotFound => StatusCode::NOT_FOUND,
            Code::PolicyRemoved => StatusCode::CONFLICT,
            Code::PolicyPending => StatusCode::SERVICE_UNAVAILABLE,
            Code::HttpsRequired => StatusCode::FORBIDDEN,
            Code::UnsupportedEncoding => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    pub filename: Option<String>,
    /// Extra top-level fields (e.g. the results of a partial batch).
    /// Boxed: rarely set, and it would double the size of every Result.
    pub extra: Option<Box<(&'static str, Value)>>,
    /// Seconds for `Retry-After`; 503s get a default.
    pub retry_after: Option<u64>,
}

/// The `code` of an error response, left in the response's extensions
/// for the metrics middleware (rejections by reason).
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub Code);

#[derive(Serialize)]
struct Body<'a> {
    status: &'static str,
    error: Detail<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    filename: Option<&'a str>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'static str,
    message: &'a str,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            filename: None,
            extra: None,
            retry_after: None,
        }
    }

    pub fn too_large(limit: u64) -> ApiError {
        ApiError::new(
            Code::FileTooLarge,
            // In the notation of max_size (150MiB), and exact.
            format!(
                "the file is larger than the limit of {}",
                crate::config::ByteSize(limit).describe()
            ),
        )
    }

    pub fn not_found() -> ApiError {
        ApiError::new(Code::NotFound, "no such endpoint")
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            Code::MethodNotAllowed,
            "this endpoint does not accept that method",
        )
    }

    pub fn server_busy() -> ApiError {
        ApiError::new(Code::ServerBusy, "too many scans in progress; retry later")
    }

    pub fn with_filename(mut self, filename: Option<String>) -> ApiError {
        self.filename = filename;
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    pub fn with_extra(mut self, key: &'static str, value: Value) -> ApiError {
        self.extra = Some(Box::new((key, value)));
        self
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        let code = match &e {
            EngineError::Unavailable(_) => Code::EngineUnavailable,
            EngineError::Busy => Code::EngineBusy,
            EngineError::Timeout(_) => Code::EngineTimeout,
            EngineError::Failed(_) => Code::EngineError,
        };
        // Engine failures are ours, not the client's: log the detail, send
        // a message that names the class of problem only.
        tracing::warn!(code = code.as_str(), error = %e, "scan failed");
        let message = match &e {
            EngineError::Unavailable(_) => "no scan engine is available; the file was not scanned",
            EngineError::Busy => "all scan engines are busy; the file was not scanned",
            EngineError::Timeout(_) => "the scan engine timed out; the file was not fully scanned",
            EngineError::Failed(_) => "the scan engine failed; the file was not scanned",
        };
        ApiError::new(code, message)
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> ApiError {
        match e {
            PipelineError::TooLarge { limit } => ApiError::too_large(limit),
            PipelineError::Body(BodyError::TooLarge) => {
                ApiError::new(Code::RequestTooLarge, "the request is too large")
            }
            PipelineError::Body(BodyError::Multipart(msg)) => ApiError::new(
                Code::InvalidMultipart,
                format!("malformed multipart body: {msg}"),
            ),
            PipelineError::Body(e @ BodyError::TooSlow(_)) => {
                ApiError::new(Code::UploadTooSlow, e.to_string())
            }
            PipelineError::Body(BodyError::QuotaExceeded {
                message,
                retry_after,
            }) => ApiError::new(Code::QuotaExceeded, message).with_retry_after(retry_after),
            PipelineError::Body(BodyError::StoreFailed(e)) => {
                tracing::error!(error = %e, "the token store failed while counting bytes");
                ApiError::new(
                    Code::StoreUnavailable,
                    "the token store is unavailable; the file was not scanned",
                )
            }
            PipelineError::Body(BodyError::Read(msg)) => ApiError::new(
                Code::InvalidBody,
                format!("the upload could not be read: {msg}"),
            ),
            PipelineError::Engine(e) => e.into(),
            PipelineError::PolicyPending => ApiError::new(
                Code::PolicyPending,
                "the allow entry for this file was just removed and the managed clamd is still \
                 loading the change; the file was not given a verdict: retry",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            status: "ERROR",
            error: Detail {
                code: self.code.as_str(),
                message: &self.message,
            },
            filename: self.filename.as_deref(),
        };
        let mut value = serde_json::to_value(body).unwrap_or(Value::Null);
        if let (Some(extra), Value::Object(map)) = (self.extra, &mut value) {
            let (key, extra) = *extra;
            map.insert(key.to_owned(), extra);
        }
        let status = self.code.status();
        let mut response = (status, JsonLine(value)).into_response();
        response.extensions_mut().insert(ErrorCode(self.code));
        let retry_after = match self.retry_after {
            Some(s) => Some(s),
            None if status == StatusCode::SERVICE_UNAVAILABLE => Some(RETRY_AFTER_SECS.into()),
            None => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table rows of `text` (lines starting with `|`) after the line
    /// `header`, up to the first line that is not a row.
    fn table_after<'a>(text: &'a str, header: &str) -> Vec<Vec<&'a str>> {
        let start = text
            .find(header)
            .unwrap_or_else(|| panic!("no table {header:?}"));
        text[start..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
            .collect()
    }

    #[test]
    fn codes_are_unique_snake_case_names() {
        let mut names: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Code::ALL.len());
    }

    #[test]
    fn the_api_reference_lists_every_code_with_its_status_and_no_other() {
        let api = crate::repo::read("docs/api.md");
        let rows = table_after(&api, "| Code | HTTP | Endpoints | Meaning |");
        let documented: Vec<(String, String)> = rows
            .iter()
            .map(|r| (r[0].trim_matches('`').to_owned(), r[1].to_owned()))
            .collect();
        for code in Code::ALL {
            let status = code.status().as_u16().to_string();
            assert!(
                documented.contains(&(code.as_str().to_owned(), status.clone())),
                "docs/api.md has no row `{}` | {status}",
                code.as_str()
            );
        }
        for (name, _) in &documented {
            assert!(
                Code::ALL.iter().any(|c| c.as_str() == name),
                "docs/api.md documents {name}, which avgate never answers"
            );
        }
    }

    #[test]
    fn the_readme_error_table_has_every_code_under_its_status() {
        let readme = crate::repo::read("README.md");
        let rows = table_after(&readme, "| HTTP | code | when |");
        for code in Code::ALL {
            let name = format!("`{}`", code.as_str());
            let status = code.status().as_u16().to_string();
            let row = rows
                .iter()
                .find(|r| r[1].split(", ").any(|c| c == name))
                .unwrap_or_else(|| panic!("README's error table has no {name}"));
            assert!(
                row[0].split(", ").any(|s| s == status),
                "README lists {name} under {}, not {status}",
                row[0]
            );
        }
    }
}
