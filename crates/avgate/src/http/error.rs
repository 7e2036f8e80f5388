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

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::Value;

use crate::scan::pipeline::{BodyError, PipelineError};
use crate::scan::EngineError;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: u32 = 5;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
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
pub struct ErrorCode(pub &'static str);

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
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            filename: None,
            extra: None,
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn too_large(limit: u64) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "file_too_large",
            format!("the file is larger than the limit of {limit} bytes"),
        )
    }

    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint does not accept that method",
        )
    }

    pub fn server_busy() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_busy",
            "too many scans in progress; retry later",
        )
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
        let (status, code) = match &e {
            EngineError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "engine_unavailable"),
            EngineError::Busy => (StatusCode::SERVICE_UNAVAILABLE, "engine_busy"),
            EngineError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "engine_timeout"),
            EngineError::Failed(_) => (StatusCode::SERVICE_UNAVAILABLE, "engine_error"),
        };
        // Engine failures are ours, not the client's: log the detail, send
        // a message that names the class of problem only.
        tracing::warn!(code, error = %e, "scan failed");
        let message = match &e {
            EngineError::Unavailable(_) => "no scan engine is available; the file was not scanned",
            EngineError::Busy => "all scan engines are busy; the file was not scanned",
            EngineError::Timeout(_) => "the scan engine timed out; the file was not fully scanned",
            EngineError::Failed(_) => "the scan engine failed; the file was not scanned",
        };
        ApiError::new(status, code, message)
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> ApiError {
        match e {
            PipelineError::TooLarge { limit } => ApiError::too_large(limit),
            PipelineError::Body(BodyError::TooLarge) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "the request is too large",
            ),
            PipelineError::Body(BodyError::Multipart(msg)) => ApiError::bad_request(
                "invalid_multipart",
                format!("malformed multipart body: {msg}"),
            ),
            PipelineError::Body(e @ BodyError::TooSlow(_)) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "upload_too_slow",
                e.to_string(),
            ),
            PipelineError::Body(BodyError::Read(msg)) => ApiError::bad_request(
                "invalid_body",
                format!("the upload could not be read: {msg}"),
            ),
            PipelineError::Engine(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            status: "ERROR",
            error: Detail {
                code: self.code,
                message: &self.message,
            },
            filename: self.filename.as_deref(),
        };
        let mut value = serde_json::to_value(body).unwrap_or(Value::Null);
        if let (Some(extra), Value::Object(map)) = (self.extra, &mut value) {
            let (key, extra) = *extra;
            map.insert(key.to_owned(), extra);
        }
        let mut response = (self.status, Json(value)).into_response();
        response.extensions_mut().insert(ErrorCode(self.code));
        let retry_after = match self.retry_after {
            Some(s) => Some(s),
            None if self.status == StatusCode::SERVICE_UNAVAILABLE => Some(RETRY_AFTER_SECS.into()),
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
