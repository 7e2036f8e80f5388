//! `POST /v1/scan`, `/v1/scan/batch`, `/v1/scan/raw`: thin translations
//! from HTTP bodies to [`crate::scan::pipeline::scan`].

use super::JsonLine;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;

use super::error::{ApiError, Code};
use super::multipart::{self, Field, Multipart};
use super::observe::ScanContext;
use super::AppState;
use crate::auth::quota::Meter;
use crate::auth::Principal;
use crate::perimeter::slowbody::MinRate;
use crate::scan::filename;
use crate::scan::pipeline::{self, BodyError, ScanResult};
use crate::scan::verdict::Status;
use crate::scan::SizeHint;

/// The form field that holds the file.
const FILE_FIELD: &str = "file";

/// Room for multipart boundaries and part headers on top of the files.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;

/// `POST /v1/scan`: one multipart part named `file`.
pub async fn scan_one(
    State(state): State<AppState>,
    principal: Principal,
    request: Request,
) -> Result<Response, ApiError> {
    let request_length = content_length(request.headers());
    let meter = state.auth.meter(&principal, request_length).await?;
    let observe = ScanContext::new(&state, &request, &principal);
    let mut form = Form::open(&state, request, 1)?;
    let mut result: Option<ScanResult> = None;
    while let Some(part) = form.next_part().await? {
        match part {
            Part::File(field) => {
                if result.is_some() {
                    return Err(ApiError::new(Code::TooManyFiles,
                        "POST /v1/scan takes one part named \"file\"; use /v1/scan/batch for several",
                    ));
                }
                let name = part_filename(&field);
                let body = field_stream(field);
                // The part is no larger than the request around it.
                let size = SizeHint::within(request_length);
                result = Some(scan_file(&state, &meter, &observe, name, body, size).await?);
            }
            Part::Other => {}
        }
    }
    let result = result.ok_or_else(missing_file)?;
    Ok(JsonLine(result).into_response())
}

/// The answer to a batch: the worst status of all files, and each result.
#[derive(Serialize)]
struct BatchResult {
    status: Status,
    results: Vec<ScanResult>,
}

/// `POST /v1/scan/batch`: any number (up to the limit) of parts named
/// `file`, scanned one after the other.
pub async fn scan_batch(
    State(state): State<AppState>,
    principal: Principal,
    request: Request,
) -> Result<Response, ApiError> {
    let max_files = state.limits.max_files;
    let request_length = content_length(request.headers());
    let meter = state.auth.meter(&principal, request_length).await?;
    let observe = ScanContext::new(&state, &request, &principal);
    let mut form = Form::open(&state, request, max_files as u64)?;
    let mut results: Vec<ScanResult> = Vec::new();
    let partial = |results: &Vec<ScanResult>| serde_json::to_value(results).unwrap_or_default();
    loop {
        let part = match form.next_part().await {
            Ok(Some(part)) => part,
            Ok(None) => break,
            Err(e) => return Err(e.with_extra("results", partial(&results))),
        };
        let Part::File(field) = part else { continue };
        if results.len() >= max_files {
            return Err(ApiError::new(
                Code::TooManyFiles,
                format!("at most {max_files} files per request"),
            )
            .with_extra("results", partial(&results)));
        }
        let name = part_filename(&field);
        let body = field_stream(field);
        let size = SizeHint::within(request_length);
        match scan_file(&state, &meter, &observe, name, body, size).await {
            Ok(scanned) => results.push(scanned),
            Err(e) => return Err(e.with_extra("results", partial(&results))),
        }
    }
    if results.is_empty() {
        return Err(missing_file());
    }
    let status = if results.iter().any(|r| r.verdict.status != Status::OK) {
        Status::FOUND
    } else {
        Status::OK
    };
    Ok(JsonLine(BatchResult { status, results }).into_response())
}

/// `POST /v1/scan/raw`: the body is the file; the name comes from the
/// `X-Filename` header or the `filename` query parameter.
pub async fn scan_raw(
    State(state): State<AppState>,
    principal: Principal,
    request: Request,
) -> Result<Response, ApiError> {
    let max = state.limits.max_size;
    let headers = request.headers();
    refuse_ambiguous_body(headers)?;
    match content_type(headers) {
        None => {}
        Some(ct) if ct == "application/octet-stream" => {}
        Some(ct) => {
            return Err(ApiError::new(Code::InvalidContentType,
                format!("expected Content-Type: application/octet-stream, got {ct:?} (multipart uploads go to POST /v1/scan)"),
            ))
        }
    }
    let length = content_length(headers);
    if length.is_some_and(|n| n > max) {
        return Err(ApiError::too_large(max));
    }
    let raw_name = headers
        .get("x-filename")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| query_param(request.uri().query(), "filename"));
    let name = raw_name.as_deref().and_then(filename::sanitize);
    let meter = state.auth.meter(&principal, length).await?;
    let observe = ScanContext::new(&state, &request, &principal);
    let _slot = scan_slot(&state)?;
    let body = MinRate::new(
        request
            .into_body()
            .into_data_stream()
            .map_err(|e| BodyError::Read(e.to_string())),
        state.perimeter.min_upload_rate,
        state.perimeter.min_upload_window,
    );
    let size = SizeHint::declared(length);
    let scanned = scan_file(&state, &meter, &observe, name, body, size).await?;
    Ok(JsonLine(scanned).into_response())
}

/// One file, the step every route shares: a place in the token's quota,
/// the scan, then the quota charged with the bytes really scanned. An
/// error names the file.
async fn scan_file<S>(
    state: &AppState,
    meter: &Meter,
    observe: &ScanContext,
    name: Option<String>,
    body: S,
    size: SizeHint,
) -> Result<ScanResult, ApiError>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, BodyError>>,
{
    let counted = meter
        .reserve_file()
        .await
        .map_err(|e| e.with_filename(name.clone()))?;
    // A byte quota is taken from as the bytes arrive, before the engines
    // get them: a missing Content-Length cannot get round it.
    let body = match counted.budget() {
        Some(budget) => futures_util::future::Either::Left(body.then(move |item| {
            let budget = budget.clone();
            async move {
                let chunk = item?;
                budget.take(chunk.len() as u64).await?;
                Ok(chunk)
            }
        })),
        None => futures_util::future::Either::Right(body),
    };
    let scan = pipeline::scan(
        &state.engines,
        &state.policy,
        name.clone(),
        body,
        size,
        state.limits.max_size,
    );
    let scanned = observe
        .scan(name.as_deref(), scan)
        .await
        .map_err(|e| ApiError::from(e).with_filename(name))?;
    counted.commit(scanned.size).await;
    Ok(scanned)
}

fn missing_file() -> ApiError {
    ApiError::new(
        Code::MissingFile,
        "no part named \"file\" in the form (curl -F \"file=@path\")",
    )
}

/// A slot among `max_concurrent_scans`. Past the limit we shed load at
/// once rather than queue without bound.
fn scan_slot(state: &AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    state
        .scan_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::server_busy())
}

/// Refuses a body that the application behind avgate could read as
/// something else than avgate scans:
/// - a content coding (gzip, deflate...) or a transfer coding other than
///   chunked: avgate would scan the encoded bytes, while a proxy or
///   application that decodes the body stores something else (clamd unpacks
///   gzip, but not zlib or raw deflate);
/// - two Content-Type headers: avgate would split the form at one boundary,
///   while servers that keep the last header (gunicorn) or join them
///   (RFC 9110, then Werkzeug takes the last boundary) split it at another.
fn refuse_ambiguous_body(headers: &HeaderMap) -> Result<(), ApiError> {
    if headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(ApiError::new(
            Code::InvalidContentType,
            "Content-Type appears more than once: servers differ on which one counts, so the body could be read as another file than the one scanned; send one",
        ));
    }
    let codings = |name| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(|c| String::from_utf8_lossy(c.trim_ascii()).to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect::<Vec<_>>()
    };
    if let Some(coding) = codings(header::CONTENT_ENCODING)
        .into_iter()
        .find(|c| c != "identity")
    {
        return Err(ApiError::new(
            Code::UnsupportedEncoding,
            format!("Content-Encoding: {coding} is not accepted: avgate scans the bytes as sent, so send the file itself, not encoded"),
        ));
    }
    if let Some(coding) = codings(header::TRANSFER_ENCODING)
        .into_iter()
        .find(|c| c != "chunked")
    {
        return Err(ApiError::new(
            Code::UnsupportedEncoding,
            format!("Transfer-Encoding: {coding} is not accepted (only chunked): avgate scans the bytes as sent"),
        ));
    }
    Ok(())
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
        .map(|ct| ct.split(';').next().unwrap_or("").trim().to_owned())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    url_decode_pairs(query?)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn url_decode_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// A multipart form being read, with every limit in place.
struct Form {
    multipart: Multipart,
    parts: usize,
    max_parts: usize,
    _slot: OwnedSemaphorePermit,
}

enum Part {
    File(Box<Field>),
    /// Any other part; already drained.
    Other,
}

impl Form {
    fn open(state: &AppState, request: Request, max_files: u64) -> Result<Form, ApiError> {
        let limits = &state.limits;
        let headers = request.headers();
        refuse_ambiguous_body(headers)?;
        let Some(ct) = headers.get(header::CONTENT_TYPE) else {
            return Err(ApiError::new(Code::InvalidContentType,
                "expected Content-Type: multipart/form-data with a part named \"file\" (or POST the bytes to /v1/scan/raw)",
            ));
        };
        let boundary = multipart::boundary(ct.as_bytes()).map_err(|why| {
            ApiError::new(Code::InvalidContentType,
                format!("expected Content-Type: multipart/form-data with one boundary, got {:?}: {why} (raw bodies go to POST /v1/scan/raw)", String::from_utf8_lossy(ct.as_bytes())),
            )
        })?;
        let max_body = limits
            .max_size
            .saturating_mul(max_files)
            .saturating_add(limits.max_parts as u64 * limits.max_field_size)
            .saturating_add(MULTIPART_OVERHEAD);
        if content_length(headers).is_some_and(|n| n > max_body) {
            return Err(if max_files == 1 {
                ApiError::too_large(limits.max_size)
            } else {
                ApiError::new(
                    Code::RequestTooLarge,
                    format!(
                        "the request is larger than the limit of {}",
                        crate::config::ByteSize(max_body).describe()
                    ),
                )
            });
        }
        let slot = scan_slot(state)?;
        let body: Body = request.into_body();
        let body = MinRate::new(
            body.into_data_stream()
                .map_err(|e| BodyError::Read(e.to_string())),
            state.perimeter.min_upload_rate,
            state.perimeter.min_upload_window,
        );
        // The file's own limit is the pipeline's (file_too_large, with its
        // limit); max_body still bounds the request.
        let multipart =
            Multipart::new(body, &boundary, max_body, limits.max_field_size, FILE_FIELD);
        Ok(Form {
            multipart,
            parts: 0,
            max_parts: limits.max_parts,
            _slot: slot,
        })
    }

    async fn next_part(&mut self) -> Result<Option<Part>, ApiError> {
        let Some(mut field) = self.multipart.next_field().await.map_err(multipart_error)? else {
            return Ok(None);
        };
        self.parts += 1;
        if self.parts > self.max_parts {
            return Err(ApiError::new(
                Code::TooManyParts,
                format!("at most {} parts per request", self.max_parts),
            ));
        }
        if field.headers.name == FILE_FIELD {
            if let Some(why) = ambiguous_file_part(&field.headers) {
                return Err(
                    ApiError::new(Code::InvalidMultipart, why).with_filename(part_filename(&field))
                );
            }
            return Ok(Some(Part::File(Box::new(field))));
        }
        // Other form fields are read and dropped (bounded by max_field_size).
        while let Some(chunk) = field.next().await {
            chunk.map_err(multipart_error)?;
        }
        Ok(Some(Part::Other))
    }
}

/// The file part's name, sanitized (see [`filename::sanitize`]).
fn part_filename(field: &Field) -> Option<String> {
    field
        .headers
        .filename
        .as_deref()
        .and_then(filename::sanitize)
}

/// Why the file part would not be the same bytes to every reader, if it
/// would not: the part's bytes are what gets scanned.
fn ambiguous_file_part(headers: &multipart::PartHeaders) -> Option<String> {
    // An encoded part (base64, quoted-printable) would be scanned as its
    // encoding while a consumer that decodes it gets something else; RFC
    // 7578 deprecates the header for form data and no browser or curl
    // sends it.
    if let Some(cte) = &headers.transfer_encoding {
        if !["7bit", "8bit", "binary"]
            .iter()
            .any(|ok| cte.eq_ignore_ascii_case(ok))
        {
            return Some(format!(
                "the file part has Content-Transfer-Encoding: {cte}; send its bytes as they are (no encoding)"
            ));
        }
    }
    // A text part in another charset is handed to the application decoded
    // by some parsers (busboy).
    if let Some(charset) = &headers.charset {
        if !["utf-8", "utf8", "us-ascii", "ascii"]
            .iter()
            .any(|ok| charset.eq_ignore_ascii_case(ok))
        {
            return Some(format!(
                "the file part has Content-Type charset={charset}, which some parsers decode; send the file as application/octet-stream"
            ));
        }
    }
    None
}

fn field_stream(
    field: Box<Field>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, BodyError>> {
    field.map(|r| r.map_err(body_error))
}

fn body_error(e: multipart::Error) -> BodyError {
    match e {
        multipart::Error::Body(body) => body,
        multipart::Error::FieldTooLarge | multipart::Error::RequestTooLarge => BodyError::TooLarge,
        multipart::Error::Malformed(why) => BodyError::Multipart(why.0),
    }
}

fn multipart_error(e: multipart::Error) -> ApiError {
    match e {
        multipart::Error::Body(body) => pipeline::PipelineError::Body(body).into(),
        multipart::Error::FieldTooLarge => {
            ApiError::new(Code::FieldTooLarge, "a form field is larger than the limit")
        }
        multipart::Error::RequestTooLarge => ApiError::new(
            Code::RequestTooLarge,
            "the request is larger than the limit",
        ),
        multipart::Error::Malformed(why) => ApiError::new(
            Code::InvalidMultipart,
            format!("malformed multipart body: {why}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        assert_eq!(
            query_param(Some("a=1&filename=my%20file.pdf"), "filename").as_deref(),
            Some("my file.pdf")
        );
        assert_eq!(
            query_param(Some("filename=a+b"), "filename").as_deref(),
            Some("a b")
        );
        assert_eq!(query_param(Some("x=1"), "filename"), None);
        assert_eq!(query_param(Some("filename=%zz"), "filename"), None);
    }
}
