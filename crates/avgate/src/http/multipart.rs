//! A strict, streaming `multipart/form-data` reader.
//!
//! avgate's verdict is only worth something if the file it scanned is the
//! file the application behind it stores. Many deployments forward the
//! client's request and parse it again (Flask, Django, PHP, Go), so any
//! body that two parsers can read differently is a way round the scan: a
//! decoy part for avgate, the malware for the application. General-purpose
//! parsers are lenient in different ways (first or last of two `name`
//! parameters, of two headers, of two boundaries; case of parameter names;
//! `name*`), so this one refuses every such body instead of picking a
//! reading:
//!
//! - the request's Content-Type: `multipart/form-data` with exactly one
//!   `boundary` that RFC 2046 allows;
//! - part headers: CRLF line endings, no folded lines, no control
//!   characters, no header twice; a `Content-Disposition: form-data` with
//!   a `name`, parameter names compared without case, none twice, none
//!   with RFC 2231's `*` (RFC 7578 forbids them in form data; continuations
//!   such as `name*0` too), no `\"` inside a quoted value (escape-aware and
//!   literal parsers end the value in different places), no unquoted
//!   `name` or `boundary` that starts with `'` (PHP reads it as quoted);
//! - framing: the boundary string appears only at the start of a
//!   delimiter line (RFC 2046: it must not occur inside a part; not after
//!   a bare LF or CR, not mid-line); nothing but blank lines before the
//!   first delimiter or after the closing one (RFC 2046 allows a preamble
//!   and an epilogue, but parsers disagree on them and no client sends
//!   them).
//!
//! [`Parser`] is the framing without I/O; [`Multipart`] and [`Field`] read
//! it from the request body with the size limits in place.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use memchr::memmem;

use crate::scan::pipeline::BodyError;

/// The most a part's header block may take.
pub const MAX_PART_HEADERS: usize = 16 * 1024;
/// The most headers a part may have.
const MAX_HEADER_COUNT: usize = 16;
/// RFC 2046's limit on a boundary's length.
const MAX_BOUNDARY: usize = 70;

/// Why a body was refused; the message is for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

fn malformed<T>(message: impl Into<String>) -> Result<T, Malformed> {
    Err(Malformed(message.into()))
}

/// The boundary of a `multipart/form-data` Content-Type, or why there is
/// none usable.
pub fn boundary(content_type: &[u8]) -> Result<Vec<u8>, Malformed> {
    let (media_type, params) = parse_header_value(content_type)?;
    if !media_type.eq_ignore_ascii_case(b"multipart/form-data") {
        return malformed("not multipart/form-data");
    }
    let mut found = None;
    for (name, value) in params {
        if name == "boundary" {
            if found.is_some() {
                return malformed("two boundary parameters");
            }
            found = Some(value);
        }
    }
    let Some(boundary) = found else {
        return malformed("no boundary parameter");
    };
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(b);
    if boundary.is_empty()
        || boundary.len() > MAX_BOUNDARY
        || !boundary.iter().all(allowed)
        || boundary.ends_with(b" ")
    {
        return malformed(
            "the boundary is not one RFC 2046 allows (1 to 70 letters, digits and '()+_,-./:=? )",
        );
    }
    Ok(boundary)
}

/// What a part's headers say, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartHeaders {
    /// The form field's name (`name` in Content-Disposition).
    pub name: String,
    /// The client's file name, as sent (not yet sanitized).
    pub filename: Option<String>,
    /// Content-Transfer-Encoding, if the part has one.
    pub transfer_encoding: Option<String>,
    /// The `charset` of the part's Content-Type, if it has one.
    pub charset: Option<String>,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// A header value of the form `value *( ";" name "=" value )` (RFC 9110's
/// parameters): the first item, and the parameters with lower-case names.
/// Refuses what parsers disagree on: a parameter twice, RFC 2231 `name*`,
/// `\"` inside a quoted value, control characters.
#[allow(clippy::type_complexity)]
fn parse_header_value(value: &[u8]) -> Result<(&[u8], Vec<(String, Vec<u8>)>), Malformed> {
    if let Some(&b) = value
        .iter()
        .find(|&&b| (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        return malformed(format!("a control character (0x{b:02x}) in a header"));
    }
    let end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
    let first = value[..end].trim_ascii();
    let mut params: Vec<(String, Vec<u8>)> = Vec::new();
    let mut rest = &value[end..];
    loop {
        rest = rest.trim_ascii_start();
        let Some(after) = rest.strip_prefix(b";") else {
            if rest.is_empty() {
                break;
            }
            return malformed("unexpected text between header parameters");
        };
        rest = after.trim_ascii_start();
        if rest.is_empty() {
            break; // a trailing ";"
        }
        let name_len = rest.iter().take_while(|&&b| is_tchar(b)).count();
        if name_len == 0 {
            return malformed("a header parameter without a name");
        }
        let name = String::from_utf8_lossy(&rest[..name_len]).to_ascii_lowercase();
        rest = rest[name_len..].trim_ascii_start();
        let Some(after) = rest.strip_prefix(b"=") else {
            return malformed(format!("the parameter {name:?} has no value"));
        };
        rest = after.trim_ascii_start();
        let value = if let Some(quoted) = rest.strip_prefix(b"\"") {
            let Some(close) = quoted.iter().position(|&b| b == b'"') else {
                return malformed(format!("the parameter {name:?} has no closing quote"));
            };
            let inside = &quoted[..close];
            if inside.ends_with(b"\\") {
                return malformed(format!(
                    "the parameter {name:?} has a backslash before a quote, which parsers read differently; percent-encode the quote (%22)"
                ));
            }
            rest = &quoted[close + 1..];
            inside.to_vec()
        } else {
            // Unquoted: an RFC 9110 token, nothing more. Parsers end an
            // unquoted value at different characters ("(", "=", "/",
            // non-ASCII...), so text past a token is refused, not read.
            let len = rest.iter().take_while(|&&b| is_tchar(b)).count();
            if len == 0 {
                return malformed(format!("the parameter {name:?} has an empty value"));
            }
            // `'` is a token character, but PHP reads name='file' as
            // `file` in single quotes: the part would be "file" for PHP and
            // another field for avgate (and a boundary another boundary).
            // Not filename: .NET leaves a name like '98-report.pdf unquoted,
            // and it does not decide which part is the file.
            if rest[0] == b'\'' && (name == "name" || name == "boundary") {
                return malformed(format!(
                    "the parameter {name:?} starts with a single quote, which parsers read differently; use double quotes"
                ));
            }
            let token = rest[..len].to_vec();
            rest = &rest[len..];
            token
        };
        // filename* is what .NET's MultipartFormDataContent sends beside
        // filename with every file: only a label, and ignored (the name
        // reported is the plain filename). Any other RFC 2231 parameter is
        // refused, name* above all, and so are continuations (name*0,
        // name*1*...), which Werkzeug joins into `name`: name=""; name*0=
        // "file" is the file part for Flask and an ignored one otherwise.
        if name.contains('*') && name != "filename*" {
            return malformed(format!(
                "the parameter {name:?} (RFC 2231 encoding) is not allowed in form data (RFC 7578); send the plain parameter"
            ));
        }
        if params.iter().any(|(seen, _)| *seen == name) {
            return malformed(format!("the parameter {name:?} appears twice"));
        }
        params.push((name, value));
    }
    Ok((first, params))
}

/// Checks a part's header block (without its final empty line).
pub fn parse_part_headers(block: &[u8]) -> Result<PartHeaders, Malformed> {
    let mut seen: Vec<String> = Vec::new();
    let mut disposition = None;
    let mut transfer_encoding = None;
    let mut content_type = None;
    let lines = if block.is_empty() {
        Vec::new()
    } else {
        split_crlf(block)
    };
    if lines.len() > MAX_HEADER_COUNT {
        return malformed(format!("more than {MAX_HEADER_COUNT} headers in a part"));
    }
    for line in lines {
        if line.first().is_some_and(|&b| is_ows(b)) {
            return malformed("a folded (continued) header line in a part");
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return malformed("a part header line without a colon");
        };
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return malformed("a part header with an invalid name");
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        if seen.contains(&name) {
            return malformed(format!("the part header {name:?} appears twice"));
        }
        let value = line[colon + 1..].trim_ascii();
        if let Some(&b) = value
            .iter()
            .find(|&&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return malformed(format!(
                "a control character (0x{b:02x}) in the part header {name:?} (part header lines end with CRLF)"
            ));
        }
        match name.as_str() {
            "content-disposition" => disposition = Some(value),
            "content-transfer-encoding" => {
                transfer_encoding = Some(String::from_utf8_lossy(value).into_owned())
            }
            "content-type" => content_type = Some(value),
            _ => {}
        }
        seen.push(name);
    }
    let Some(disposition) = disposition else {
        return malformed("a part without Content-Disposition");
    };
    let (kind, params) = parse_header_value(disposition)?;
    if !kind.eq_ignore_ascii_case(b"form-data") {
        return malformed("a part whose Content-Disposition is not form-data");
    }
    let mut name = None;
    let mut filename = None;
    for (key, value) in params {
        match key.as_str() {
            "name" => name = Some(value),
            "filename" => filename = Some(String::from_utf8_lossy(&value).into_owned()),
            _ => {}
        }
    }
    let Some(name) = name else {
        return malformed("a part without a name in its Content-Disposition");
    };
    // A backslash in a name is an escape to some parsers ("fi\\le" is
    // "file" to Werkzeug) and a character to others.
    if name.contains(&b'\\') {
        return malformed("a backslash in a part name, which parsers read differently");
    }
    let Ok(name) = String::from_utf8(name) else {
        return malformed("a part name that is not UTF-8");
    };
    let charset = match content_type {
        Some(value) => parse_header_value(value)?
            .1
            .into_iter()
            .find(|(key, _)| key == "charset")
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned()),
        None => None,
    };
    Ok(PartHeaders {
        name,
        filename,
        transfer_encoding,
        charset,
    })
}

/// Lines of a block joined by CRLF; a lone CR or LF stays inside its line
/// (and is then refused as a control character).
fn split_crlf(block: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut rest = block;
    while let Some(at) = memmem::find(rest, b"\r\n") {
        lines.push(&rest[..at]);
        rest = &rest[at + 2..];
    }
    lines.push(rest);
    lines
}

/// What the parser found next.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A part starts (its headers are checked).
    Part(PartHeaders),
    /// Bytes of the current part's content.
    Data(Bytes),
    /// The current part's content is complete.
    PartEnd,
    /// The closing delimiter and what may follow it: the form is complete.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter.
    Preamble,
    /// Right after a delimiter: a line end (a part follows) or `--`.
    AfterDelimiter,
    Headers,
    Content,
    /// After the closing delimiter: optional padding, then a line end or
    /// the end of the body.
    CloseLine,
    Epilogue,
    Done,
}

/// The most padding (spaces, tabs) after a boundary on its line.
const MAX_PADDING: usize = 64;
/// The most blank bytes (CR, LF, spaces, tabs) before the first boundary
/// or after the last.
const MAX_BLANK: usize = 1024;

/// Blank: what may stand before the first boundary and after the last.
fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// The multipart framing, without I/O: [`Parser::push`] bytes as they
/// arrive, [`Parser::next`] until it needs more.
///
/// Every occurrence of `--boundary` in the body must begin a delimiter
/// line (after CRLF, or at the very start). Parsers that also split at a
/// bare LF or CR (Werkzeug), at a line that is only the boundary (PHP), or
/// at `--boundary` anywhere (Django) would otherwise see a part where this
/// one sees content. For the same reason text before the first boundary
/// (a preamble) and after the last (an epilogue) is refused, not skipped:
/// some parsers take a part from the preamble, others go on parsing after
/// the closing delimiter. Only blank lines may stand there.
pub struct Parser {
    /// "--" boundary.
    dash_boundary: memmem::Finder<'static>,
    buf: BytesMut,
    state: State,
    /// Blank bytes of the epilogue so far.
    blank: usize,
}

impl Parser {
    pub fn new(boundary: &[u8]) -> Parser {
        let mut dash_boundary = b"--".to_vec();
        dash_boundary.extend_from_slice(boundary);
        // The body's first delimiter has no line end before it: one is
        // put there, so every delimiter looks the same.
        let mut buf = BytesMut::with_capacity(8 * 1024);
        buf.extend_from_slice(b"\r\n");
        Parser {
            dash_boundary: memmem::Finder::new(&dash_boundary).into_owned(),
            buf,
            state: State::Preamble,
            blank: 0,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next event, or `None` if more bytes are needed. With `eof`
    /// (no more bytes will come) it never answers `None`.
    pub fn next(&mut self, eof: bool) -> Result<Option<Event>, Malformed> {
        let result = self.step(eof);
        if result.is_err() {
            self.state = State::Done;
        }
        result
    }

    fn step(&mut self, eof: bool) -> Result<Option<Event>, Malformed> {
        let len = self.dash_boundary.needle().len();
        loop {
            match self.state {
                State::Preamble => {
                    let found = self.dash_boundary.find(&self.buf);
                    // What is before the boundary (or, while it has not come,
                    // all but what could be its start) must be blank.
                    let before = match found {
                        Some(at) => &self.buf[..at],
                        None => &self.buf[..self.buf.len().saturating_sub(len - 1)],
                    };
                    let blank = before.iter().all(|&b| is_blank(b));
                    if !blank || (found.is_some() && !before.ends_with(b"\r\n")) {
                        return malformed(
                            "text before the first boundary line (a preamble), which parsers read differently; start the body with the boundary line",
                        );
                    }
                    match found {
                        Some(at) => {
                            self.buf.advance(at + len);
                            self.state = State::AfterDelimiter;
                        }
                        None if eof => {
                            return malformed("the body has no multipart boundary line")
                        }
                        None if self.buf.len() > MAX_BLANK => {
                            return malformed("no multipart boundary line at the start of the body")
                        }
                        None => return Ok(None),
                    }
                }
                State::AfterDelimiter => {
                    let padding = self.buf.iter().take_while(|&&b| is_ows(b)).count();
                    let rest = &self.buf[padding..];
                    let more_needed = match (padding, rest) {
                        (_, _) if padding > MAX_PADDING => false,
                        (0, [b'-', b'-', ..]) => {
                            self.buf.advance(2);
                            self.state = State::CloseLine;
                            continue;
                        }
                        (_, [b'\r', b'\n', ..]) => {
                            self.buf.advance(padding + 2);
                            self.state = State::Headers;
                            continue;
                        }
                        (0, [b'-']) | (_, [] | [b'\r']) => true,
                        _ => false,
                    };
                    if !more_needed {
                        return malformed(
                            "the boundary string appears inside a part (it must not: RFC 2046), or a boundary line has text after it",
                        );
                    }
                    if eof {
                        return malformed("the body ended right after a boundary line");
                    }
                    return Ok(None);
                }
                State::Headers => {
                    let block_end = if self.buf.starts_with(b"\r\n") {
                        Some((0, 2))
                    } else {
                        memmem::find(&self.buf, b"\r\n\r\n").map(|at| (at, at + 4))
                    };
                    // The block so far, whole or not.
                    let block_len = block_end.map_or(self.buf.len(), |(end, _)| end);
                    if block_len > MAX_PART_HEADERS {
                        return malformed(format!(
                            "a part's headers are larger than {} KiB",
                            MAX_PART_HEADERS / 1024
                        ));
                    }
                    let Some((end, consumed)) = block_end else {
                        if eof {
                            return malformed("the body ended inside a part's headers");
                        }
                        return Ok(None);
                    };
                    if self.dash_boundary.find(&self.buf[..consumed]).is_some() {
                        return malformed("the boundary string inside a part's headers");
                    }
                    let headers = parse_part_headers(&self.buf[..end])?;
                    self.buf.advance(consumed);
                    self.state = State::Content;
                    return Ok(Some(Event::Part(headers)));
                }
                State::Content => match self.dash_boundary.find(&self.buf) {
                    Some(at) if at >= 2 && self.buf[at - 2..at] == *b"\r\n" => {
                        if at > 2 {
                            let data = self.buf.split_to(at - 2).freeze();
                            return Ok(Some(Event::Data(data)));
                        }
                        self.buf.advance(2 + len);
                        self.state = State::AfterDelimiter;
                        return Ok(Some(Event::PartEnd));
                    }
                    Some(_) => {
                        return malformed(
                            "the boundary string inside a part, not at the start of a line of its own (parsers that also split at a bare line feed, or anywhere, would see another part there)",
                        )
                    }
                    None if eof => {
                        return malformed("the body ended inside a part (no closing boundary)");
                    }
                    None => {
                        // Keep what could be a line end and the start of
                        // the boundary: the next search sees them whole.
                        let keep = len + 1;
                        if self.buf.len() > keep {
                            let ready = self.buf.len() - keep;
                            return Ok(Some(Event::Data(self.buf.split_to(ready).freeze())));
                        }
                        return Ok(None);
                    }
                },
                State::CloseLine => {
                    let padding = self.buf.iter().take_while(|&&b| is_ows(b)).count();
                    let rest = &self.buf[padding..];
                    if padding > MAX_PADDING {
                        return malformed("too much padding after the closing boundary");
                    }
                    if rest.starts_with(b"\r\n") {
                        self.buf.advance(padding + 2);
                        self.state = State::Epilogue;
                    } else if rest.is_empty() && eof {
                        self.buf.clear();
                        self.state = State::Epilogue;
                    } else if (rest.is_empty() || rest == b"\r") && !eof {
                        return Ok(None);
                    } else {
                        return malformed("text after the closing boundary on its line");
                    }
                }
                State::Epilogue => {
                    if !self.buf.iter().all(|&b| is_blank(b)) {
                        return malformed(
                            "text after the closing boundary (an epilogue), which some parsers read as more parts",
                        );
                    }
                    self.blank += self.buf.len();
                    self.buf.clear();
                    if self.blank > MAX_BLANK {
                        return malformed("too much after the closing boundary");
                    }
                    if eof {
                        self.state = State::Done;
                        return Ok(Some(Event::End));
                    }
                    return Ok(None);
                }
                State::Done => return Ok(Some(Event::End)),
            }
        }
    }
}

/// Why reading a form failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Body(BodyError),
    #[error(transparent)]
    Malformed(Malformed),
    #[error("the request is larger than the limit")]
    RequestTooLarge,
    #[error("a form field is larger than the limit")]
    FieldTooLarge,
}

struct Inner {
    body: BoxStream<'static, Result<Bytes, BodyError>>,
    parser: Parser,
    eof: bool,
    read: u64,
    max_request: u64,
    failed: bool,
}

impl Inner {
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, Error>> {
        loop {
            if self.failed {
                return Poll::Ready(Err(Error::Malformed(Malformed(
                    "the form could not be read".into(),
                ))));
            }
            match self.parser.next(self.eof) {
                Ok(Some(event)) => return Poll::Ready(Ok(event)),
                Ok(None) => {}
                Err(e) => {
                    self.failed = true;
                    return Poll::Ready(Err(Error::Malformed(e)));
                }
            }
            match self.body.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    self.read += chunk.len() as u64;
                    if self.read > self.max_request {
                        self.failed = true;
                        return Poll::Ready(Err(Error::RequestTooLarge));
                    }
                    self.parser.push(&chunk);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.failed = true;
                    return Poll::Ready(Err(Error::Body(e)));
                }
                Poll::Ready(None) => self.eof = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A form read from a request body, one part at a time.
pub struct Multipart {
    inner: Arc<Mutex<Inner>>,
    max_field: u64,
    file_field: &'static str,
}

impl Multipart {
    /// `max_request`: the most bytes the whole body may have;
    /// `max_field`: the most a part other than `file_field` may have (the
    /// file's own limit is the caller's).
    pub fn new(
        body: impl Stream<Item = Result<Bytes, BodyError>> + Send + 'static,
        boundary: &[u8],
        max_request: u64,
        max_field: u64,
        file_field: &'static str,
    ) -> Multipart {
        Multipart {
            inner: Arc::new(Mutex::new(Inner {
                body: body.boxed(),
                parser: Parser::new(boundary),
                eof: false,
                read: 0,
                max_request,
                failed: false,
            })),
            max_field,
            file_field,
        }
    }

    /// The next part; what is left of the previous one is skipped.
    pub async fn next_field(&mut self) -> Result<Option<Field>, Error> {
        loop {
            let event = std::future::poll_fn(|cx| {
                self.inner
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .poll_event(cx)
            })
            .await?;
            match event {
                Event::Part(headers) => {
                    if headers.name != self.file_field && alias_of(&headers.name, self.file_field) {
                        return Err(Error::Malformed(Malformed(format!(
                            "a part named {:?}, which some frameworks read as {:?} (PHP trims spaces and takes \"[...]\" as an array; ASP.NET ignores case); name the file part exactly {:?}",
                            headers.name, self.file_field, self.file_field
                        ))));
                    }
                    let limit = (headers.name != self.file_field).then_some(self.max_field);
                    return Ok(Some(Field {
                        inner: self.inner.clone(),
                        headers,
                        limit,
                        read: 0,
                        done: false,
                    }));
                }
                Event::Data(_) | Event::PartEnd => {}
                Event::End => return Ok(None),
            }
        }
    }
}

/// Whether some framework would take a part named `name` for `field`:
/// PHP drops leading spaces and reads `field[...]` as an array of that
/// name; ASP.NET model binding ignores case.
fn alias_of(name: &str, field: &str) -> bool {
    // An RFC 2047 encoded word ("=?utf-8?q?file?=") is decoded by some
    // (Python's email package).
    if name.contains("=?") {
        return true;
    }
    // Python's str.strip() removes any Unicode whitespace.
    let name = name.trim_matches(char::is_whitespace);
    name.eq_ignore_ascii_case(field)
        || name.get(..field.len()).is_some_and(|start| {
            start.eq_ignore_ascii_case(field) && name[field.len()..].starts_with('[')
        })
}

/// One part's content, as a stream of chunks. It ends at the part's
/// closing delimiter; a body that ends before it is an error.
pub struct Field {
    inner: Arc<Mutex<Inner>>,
    pub headers: PartHeaders,
    limit: Option<u64>,
    read: u64,
    done: bool,
}

impl Stream for Field {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let polled = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .poll_event(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Event::Data(chunk))) => {
                self.read += chunk.len() as u64;
                if self.limit.is_some_and(|limit| self.read > limit) {
                    self.done = true;
                    return Poll::Ready(Some(Err(Error::FieldTooLarge)));
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Ok(_)) => {
                // PartEnd (End and Part cannot come before it).
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the parser over `body` fed in pieces of `step` bytes; the
    /// parts as (headers, content), or the error.
    fn parse(body: &[u8], step: usize) -> Result<Vec<(PartHeaders, Vec<u8>)>, Malformed> {
        let mut parser = Parser::new(b"XyZ");
        let mut parts: Vec<(PartHeaders, Vec<u8>)> = Vec::new();
        let mut fed = 0;
        loop {
            let eof = fed >= body.len();
            match parser.next(eof)? {
                None => {
                    assert!(!eof, "asked for more after the end");
                    let end = (fed + step).min(body.len());
                    parser.push(&body[fed..end]);
                    fed = end;
                }
                Some(Event::Part(h)) => parts.push((h, Vec::new())),
                Some(Event::Data(d)) => parts.last_mut().unwrap().1.extend_from_slice(&d),
                Some(Event::PartEnd) => {}
                Some(Event::End) => return Ok(parts),
            }
        }
    }

    fn parse_all_steps(body: &[u8]) -> Result<Vec<(PartHeaders, Vec<u8>)>, Malformed> {
        let whole = parse(body, body.len().max(1));
        for step in [1, 2, 3, 5, 7, 64] {
            assert_eq!(parse(body, step), whole, "fed {step} bytes at a time");
        }
        whole
    }

    fn file(name: &str, filename: Option<&str>, content: &[u8]) -> (PartHeaders, Vec<u8>) {
        (
            PartHeaders {
                name: name.into(),
                filename: filename.map(Into::into),
                transfer_encoding: None,
                charset: None,
            },
            content.to_vec(),
        )
    }

    #[test]
    fn what_browsers_and_curl_send_is_read_exactly() {
        // A blank line before the first boundary and after the last.
        let body = b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n\
--XyZ  \r\ncontent-disposition: Form-Data; Name=note2; filename=\"\xc3\xa9t\xc3\xa9.txt\"\r\n\r\n\r\n\r\n\
--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"C:\\dir\\a.txt\"\r\n\
Content-Type: application/octet-stream\r\n\r\n\x00\r\n-\r\n--X\r\n--XyZ--\r\n\r\n";
        assert_eq!(
            parse_all_steps(body).unwrap(),
            vec![
                file("note", None, b"hello"),
                file("note2", Some("été.txt"), b"\r\n"),
                file("file", Some("C:\\dir\\a.txt"), b"\x00\r\n-\r\n--X"),
            ]
        );
        // "name=" inside another parameter's quoted value is part of that
        // value (a parser that searches for "name=" reads "file").
        let headers = b"Content-Disposition: form-data; filename=\"x; name=file;\"; name=\"decoy\"";
        let parsed = parse_part_headers(headers).unwrap();
        assert_eq!(
            (parsed.name.as_str(), parsed.filename.as_deref()),
            ("decoy", Some("x; name=file;"))
        );
        // .NET's MultipartFormDataContent: filename* beside filename, an
        // unquoted name; the plain filename is the one reported.
        let dotnet =
            b"Content-Disposition: form-data; name=file; filename=a.txt; filename*=utf-8''a.txt";
        let parsed = parse_part_headers(dotnet).unwrap();
        assert_eq!(
            (parsed.name.as_str(), parsed.filename.as_deref()),
            ("file", Some("a.txt"))
        );
        // It leaves a name that starts with an apostrophe unquoted too.
        let dotnet = b"Content-Disposition: form-data; name=file; filename='98-report.pdf; filename*=utf-8''%2798-report.pdf";
        let parsed = parse_part_headers(dotnet).unwrap();
        assert_eq!(parsed.filename.as_deref(), Some("'98-report.pdf"));
        // The first delimiter at the very start, no line end after the
        // closing one, an empty part.
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=file\r\n\r\n\r\n--XyZ--";
        assert_eq!(
            parse_all_steps(body).unwrap(),
            vec![file("file", None, b"")]
        );
    }

    #[test]
    fn every_ambiguous_or_broken_body_is_refused() {
        let part =
            |headers: &str| format!("--XyZ\r\n{headers}\r\n\r\ndata\r\n--XyZ--\r\n").into_bytes();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("name twice", part("Content-Disposition: form-data; name=\"file\"; name=\"decoy\"")),
            ("name in other case, twice", part("Content-Disposition: form-data; name=\"a\"; NAME=\"file\"")),
            ("two dispositions", part("Content-Disposition: form-data; name=\"decoy\"\r\nContent-Disposition: form-data; name=\"file\"")),
            ("two encodings", part("Content-Disposition: form-data; name=\"file\"\r\nContent-Transfer-Encoding: base64\r\ncontent-transfer-encoding: binary")),
            ("name*", part("Content-Disposition: form-data; name*=UTF-8''file")),
            ("filename* twice", part("Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''a; filename*=UTF-8''b")),
            // Werkzeug (Flask) joins continuations into `name`: "file".
            ("an RFC 2231 continuation of name", part("Content-Disposition: form-data; name=\"\"; name*0=\"file\"; filename=\"e.com\"")),
            ("an RFC 2231 continuation of filename", part("Content-Disposition: form-data; name=\"file\"; filename*0=\"a\"; filename*1=\"b\"")),
            // PHP reads 'file' as file in single quotes.
            ("a name in single quotes", part("Content-Disposition: form-data; name='file'; filename=\"e.com\"")),
            ("text before the first boundary", b"x\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab\r\n--XyZ--\r\n".to_vec()),
            ("a bare LF before the first boundary", b"\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab\r\n--XyZ--\r\n".to_vec()),
            ("a part after the closing boundary", b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab\r\n--XyZ--\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\ncd\r\n--XyZ--\r\n".to_vec()),
            ("text after the closing boundary", b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab\r\n--XyZ--\r\nepilogue".to_vec()),
            ("a bare LF before a boundary inside a part", b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nx\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab\r\n--XyZ--\r\n".to_vec()),
            ("a bare CR before a boundary inside a part", b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r--XyZ\r\n\r\n--XyZ--\r\n".to_vec()),
            ("the boundary mid-line inside a part", b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx--XyZ\r\n--XyZ--\r\n".to_vec()),
            ("the boundary right after the headers", b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n--XyZ--\r\n".to_vec()),
            ("the boundary in a header", part("Content-Disposition: form-data; name=\"file\"; filename=\"--XyZ\"")),
            ("too much padding after a boundary", format!("--XyZ{}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab\r\n--XyZ--\r\n", " ".repeat(70)).into_bytes()),
            ("too much padding after the closing boundary", format!("--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab\r\n--XyZ--{}", " ".repeat(70)).into_bytes()),
            ("too many blank lines after the closing boundary", format!("--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab\r\n--XyZ--\r\n{}", "\r\n".repeat(600)).into_bytes()),
            ("escaped quote", part("Content-Disposition: form-data; name=\"decoy\"; filename=\"a\\\"; name=\\\"file\"")),
            ("no disposition", part("Content-Type: text/plain")),
            ("no name", part("Content-Disposition: form-data; filename=\"a\"")),
            ("not form-data", part("Content-Disposition: attachment; name=\"file\"")),
            ("folded line", part("Content-Disposition: form-data;\r\n name=\"file\"")),
            ("no colon", part("Content-Disposition form-data; name=\"file\"")),
            ("an unquoted name with more than a token", part("Content-Disposition: form-data; name=file(x); filename=\"e\"")),
            ("an unquoted name with non-ASCII", part("Content-Disposition: form-data; name=file\u{a0}")),
            ("a backslash in a quoted name", part("Content-Disposition: form-data; name=\"fi\\le\"")),
            ("a comment hiding a parameter", part("Content-Disposition: form-data; a=(x; c=\"); name=file; d=(\"; name=decoy")),
            ("LF only", b"--XyZ\nContent-Disposition: form-data; name=\"file\"\n\ndata\n--XyZ--\n".to_vec()),
            ("lone LF in headers", part("Content-Disposition: form-data; name=\"file\"\nX: y")),
            ("NUL in a header", part("Content-Disposition: form-data; name=\"fi\0le\"")),
            ("unclosed quote", part("Content-Disposition: form-data; name=\"file")),
            ("boundary inside content", b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab\r\n--XyZab\r\n--XyZ--\r\n".to_vec()),
            ("text after closing boundary", b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab\r\n--XyZ--junk\r\n".to_vec()),
            ("no closing boundary", b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab".to_vec()),
            ("ends in the headers", b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n".to_vec()),
            ("no boundary at all", b"just some bytes".to_vec()),
            ("ends after a boundary", b"--XyZ".to_vec()),
        ];
        for (what, body) in cases {
            for step in [1, 4, body.len()] {
                assert!(
                    parse(&body, step).is_err(),
                    "{what} (fed {step} at a time) was accepted"
                );
            }
        }
        let huge = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\nX-Pad: {}\r\n\r\nab\r\n--XyZ--\r\n",
            "a".repeat(MAX_PART_HEADERS)
        );
        assert!(parse(huge.as_bytes(), 1000).is_err());
    }

    /// Bodies put together at random from the pieces that matter (the
    /// delimiter and its parts, line ends, header text): however a body is
    /// cut into reads, it is read the same way, accepted or refused.
    #[test]
    fn random_bodies_are_read_the_same_whatever_the_reads() {
        const PIECES: &[&[u8]] = &[
            b"--XyZ",
            b"\r\n--XyZ",
            b"\r\n--XyZ--",
            b"--",
            b"\r\n",
            b"\r",
            b"\n",
            b" ",
            b"-",
            b"X",
            b"XyZ",
            b"data",
            b"\0",
            b"Content-Disposition: form-data; name=\"file\"",
            b"Content-Disposition: form-data; name=a; filename=\"b\\c\"",
            b"Content-Transfer-Encoding: binary",
            b"\r\n\r\n",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let mut body = Vec::new();
            if next() % 2 == 0 {
                body.extend_from_slice(
                    b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n",
                );
            }
            for _ in 0..(next() % 12) {
                body.extend_from_slice(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            if next() % 2 == 0 {
                body.extend_from_slice(b"\r\n--XyZ--\r\n");
            }
            let whole = parse(&body, body.len().max(1));
            for step in [1, 2, 3, 6] {
                let cut = parse(&body, step);
                assert_eq!(
                    cut.as_ref().ok(),
                    whole.as_ref().ok(),
                    "{:?} read {step} bytes at a time: {cut:?} against {whole:?}",
                    String::from_utf8_lossy(&body)
                );
            }
            match whole {
                Ok(parts) => {
                    accepted += 1;
                    // What is accepted is all framing or content: the
                    // content never holds the boundary string.
                    for (_, content) in parts {
                        assert!(memmem::find(&content, b"--XyZ").is_none());
                    }
                }
                Err(_) => refused += 1,
            }
        }
        // Both outcomes were exercised.
        assert!(
            accepted > 1000 && refused > 1000,
            "{accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn names_some_framework_reads_as_file_are_aliases() {
        for alias in [
            " file",
            "file ",
            "FILE",
            "File",
            "file[]",
            "file[0]",
            "FILE[x]",
            "file\u{a0}",
            "\u{3000}file",
            "=?utf-8?q?file?=",
        ] {
            assert!(alias_of(alias, "file"), "{alias:?}");
        }
        for other in [
            "file", "files", "profile", "note", "fil", "file_", "file2[]",
        ] {
            assert!(other == "file" || !alias_of(other, "file"), "{other:?}");
        }
    }

    #[test]
    fn the_boundary_is_taken_only_when_unambiguous() {
        assert_eq!(
            boundary(b"multipart/form-data; boundary=abc").unwrap(),
            b"abc"
        );
        assert_eq!(
            boundary(b"Multipart/Form-Data;charset=utf-8;  BOUNDARY=\"a b:c\"").unwrap(),
            b"a b:c"
        );
        // Quoted, any character RFC 2046 allows; unquoted, a token only
        // (Werkzeug ends "XyZ(x)" at the parenthesis).
        assert_eq!(
            boundary(b"multipart/form-data; boundary=\"----=_Part_0_1\"").unwrap(),
            b"----=_Part_0_1"
        );
        for unquoted in [
            "----=_Part_0_1",
            "XyZ(x)",
            "XyZ,x",
            "XyZ?x",
            "XyZ:x",
            "XyZ/x",
        ] {
            let ct = format!("multipart/form-data; boundary={unquoted}");
            assert!(boundary(ct.as_bytes()).is_err(), "{unquoted}");
        }
        for bad in [
            &b"multipart/form-data; boundary=A; boundary=B"[..],
            b"multipart/form-data; boundary=A; Boundary=A",
            b"multipart/form-data",
            b"multipart/mixed; boundary=abc",
            b"application/octet-stream; boundary=abc",
            b"multipart/form-data; boundary=\"\"",
            b"multipart/form-data; boundary=\"ends with space \"",
            b"multipart/form-data; boundary=\"a\\\"b\"",
            b"multipart/form-data; boundary*=abc",
            b"multipart/form-data; boundary=ab\"c",
            b"multipart/form-data; boundary=abc extra",
        ] {
            assert!(boundary(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = format!("multipart/form-data; boundary={}", "a".repeat(71));
        assert!(boundary(long.as_bytes()).is_err());
    }
}
