//! The things being compared: avgate over HTTP (multipart POST /v1/scan,
//! field `file`) and raw clients talking straight to the same clamd socket
//! with the workspace's `clamd` crate: zINSTREAM (the baseline of the
//! targets) and FILDES with an in-memory file (what avgate itself does for
//! small files on a Unix socket, so the comparison that shows avgate's own
//! overhead).
//!
//! Small-file loads use a [`Worker`] per concurrent client: for avgate one
//! keep-alive HTTP/1.1 connection on which the worker writes each request
//! (head and multipart body prepared once) and reads the answer itself, as
//! wrk and similar load generators do. The generator shares the 2 CPUs
//! with clamd and avgate, so what it spends per request is taken from
//! them: reqwest's streamed multipart cost 0.08 ms per request, hyper's
//! client connection (a task of its own to wake twice per request) 0.04,
//! as much as the raw client's connect-write-read-close.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::multipart::{Form, Part};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::data;

/// Chunk size the client produces for streamed uploads (both targets),
/// unless `--chunk-kib` says otherwise. The raw client sends each chunk as
/// one INSTREAM chunk.
pub const DEFAULT_CHUNK: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// zINSTREAM on a new connection per scan, as clamdscan --stream does.
    Raw,
    /// FILDES with a memfd on a new connection per scan.
    RawFildes,
    Avgate,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Raw => "raw",
            Target::RawFildes => "raw-fildes",
            Target::Avgate => "avgate",
        }
    }

    pub fn parse(name: &str) -> anyhow::Result<Target> {
        match name {
            "raw" => Ok(Target::Raw),
            "raw-fildes" => Ok(Target::RawFildes),
            "avgate" => Ok(Target::Avgate),
            other => bail!("unknown target {other:?} (raw, raw-fildes, avgate)"),
        }
    }
}

/// What a scan came back with, from either target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Clean,
    Found(String),
}

/// Everything a request needs; cheap to clone.
#[derive(Clone)]
pub struct Ctx {
    pub http: reqwest::Client,
    /// e.g. `http://127.0.0.1:8080/v1/scan`.
    pub scan_url: String,
    pub clamd: clamd::Address,
    pub timeouts: clamd::Timeouts,
    /// API token sent as `Authorization: Bearer`, when avgate wants one.
    pub token: Option<String>,
    /// Size of the pieces a streamed upload is generated in.
    pub chunk: usize,
}

impl Ctx {
    pub fn new(
        base_url: &str,
        clamd: clamd::Address,
        token: Option<String>,
    ) -> anyhow::Result<Ctx> {
        let base = base_url.trim_end_matches('/');
        if !(base.starts_with("http://127.0.0.1:") || base.starts_with("http://localhost:")) {
            bail!("{base_url}: the benchmark only talks to 127.0.0.1");
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(300))
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Ctx {
            http,
            scan_url: format!("{base}/v1/scan"),
            clamd,
            timeouts: clamd::Timeouts {
                connect: Duration::from_secs(5),
                io: Duration::from_secs(60),
                reply: Duration::from_secs(300),
            },
            token,
            chunk: DEFAULT_CHUNK,
        })
    }

    /// One client of a small-file load.
    pub fn worker(&self, target: Target) -> Worker {
        Worker {
            ctx: self.clone(),
            target,
            http: None,
            head: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Scans `size` bytes of random data from `seed`, generated while
    /// sending.
    pub async fn scan_random(
        &self,
        target: Target,
        size: u64,
        seed: u64,
    ) -> anyhow::Result<Outcome> {
        let body = data::random_stream(size, self.chunk, seed);
        match target {
            Target::Raw => {
                let conn = clamd::Connection::connect(&self.clamd, self.timeouts).await?;
                let mut stream = conn.instream().await?;
                futures_util::pin_mut!(body);
                while let Some(chunk) = body.next().await {
                    stream.send(&chunk?).await?;
                }
                raw_outcome(stream.finish().await?)
            }
            Target::RawFildes => bail!("large uploads are streamed; FILDES is for small files"),
            Target::Avgate => {
                let part = Part::stream_with_length(reqwest::Body::wrap_stream(body), size)
                    .file_name("random.bin")
                    .mime_str("application/octet-stream")?;
                self.post(Form::new().part("file", part), size).await
            }
        }
    }

    async fn post(&self, form: Form, expected_size: u64) -> anyhow::Result<Outcome> {
        let mut request = self.http.post(&self.scan_url).multipart(form);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        avgate_outcome(status.as_u16(), &body, expected_size)
    }
}

/// One client of a small-file load, scanning one payload at a time.
pub struct Worker {
    ctx: Ctx,
    target: Target,
    /// avgate: the worker's keep-alive connection, opened on first use and
    /// again after an error or a `Connection: close`.
    http: Option<TcpStream>,
    /// avgate: the request head up to the body's length, made once.
    head: Option<String>,
    /// avgate: what was read of the answer.
    buf: Vec<u8>,
}

macro_rules! boundary {
    () => {
        "avgate-bench-7d1f0c9a5e"
    };
}
const BOUNDARY: &str = boundary!();
/// The form around each payload: the same for every request.
const PART_HEAD: &str = concat!(
    "--",
    boundary!(),
    "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"payload.bin\"\r\n",
    "Content-Type: application/octet-stream\r\n\r\n"
);
const PART_TAIL: &str = concat!("\r\n--", boundary!(), "--\r\n");

impl Worker {
    /// Scans a small payload held in memory.
    pub async fn scan(&mut self, data: Bytes) -> anyhow::Result<Outcome> {
        let ctx = &self.ctx;
        match self.target {
            Target::Raw => {
                let conn = clamd::Connection::connect(&ctx.clamd, ctx.timeouts).await?;
                let mut stream = conn.instream().await?;
                stream.send(&data).await?;
                raw_outcome(stream.finish().await?)
            }
            Target::RawFildes => {
                use std::io::Write;
                use std::os::fd::AsFd;
                let memfd = rustix::fs::memfd_create("bench", rustix::fs::MemfdFlags::CLOEXEC)?;
                let mut file = std::fs::File::from(memfd);
                file.write_all(&data)?;
                let conn = clamd::Connection::connect(&ctx.clamd, ctx.timeouts).await?;
                raw_outcome(conn.scan_fd(file.as_fd()).await?)
            }
            Target::Avgate => {
                let limit = ctx.timeouts.io;
                let result = tokio::time::timeout(limit, self.post(&data))
                    .await
                    .unwrap_or_else(|_| Err(anyhow!("no answer within {limit:?}")));
                if result.is_err() {
                    self.http = None; // a fresh connection for the next one
                }
                result
            }
        }
    }

    async fn post(&mut self, data: &Bytes) -> anyhow::Result<Outcome> {
        let (path, authority) = split_url(&self.ctx.scan_url)?;
        let head = self.head.get_or_insert_with(|| {
            let mut head = format!(
                "POST {path} HTTP/1.1\r\nHost: {authority}\r\n\
                 Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\
                 Accept: application/json\r\n"
            );
            if let Some(token) = &self.ctx.token {
                head.push_str(&format!("Authorization: Bearer {token}\r\n"));
            }
            head
        });
        let length = PART_HEAD.len() + data.len() + PART_TAIL.len();
        let mut request = Vec::with_capacity(head.len() + 32 + length);
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(format!("Content-Length: {length}\r\n\r\n").as_bytes());
        request.extend_from_slice(PART_HEAD.as_bytes());
        request.extend_from_slice(data);
        request.extend_from_slice(PART_TAIL.as_bytes());

        let stream = match &mut self.http {
            Some(stream) => stream,
            None => {
                let stream = TcpStream::connect(authority).await?;
                stream.set_nodelay(true)?;
                self.http.insert(stream)
            }
        };
        stream.write_all(&request).await?;
        let (status, body, close) = read_response(stream, &mut self.buf).await?;
        if close {
            self.http = None;
        }
        avgate_outcome(status, body, data.len() as u64)
    }
}

/// `http://127.0.0.1:PORT/path` as (`/path`, `127.0.0.1:PORT`).
fn split_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let rest = url.strip_prefix("http://").context("an http:// URL")?;
    let slash = rest.find('/').unwrap_or(rest.len());
    let path = if slash == rest.len() {
        "/"
    } else {
        &rest[slash..]
    };
    Ok((path, &rest[..slash]))
}

/// Reads one HTTP/1.1 answer with a Content-Length body (all avgate's
/// answers have one) into `buf`: its status, its body, and whether the
/// server closes the connection after it.
async fn read_response<'b>(
    stream: &mut TcpStream,
    buf: &'b mut Vec<u8>,
) -> anyhow::Result<(u16, &'b [u8], bool)> {
    buf.clear();
    let (status, head_len, body_len, close) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head_len) = response.parse(buf)? {
            let status = response.code.context("a status code")?;
            let mut body_len = None;
            let mut close = false;
            for h in response.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    body_len = Some(std::str::from_utf8(h.value)?.trim().parse::<usize>()?);
                } else if h.name.eq_ignore_ascii_case("connection") {
                    close = h.value.eq_ignore_ascii_case(b"close");
                }
            }
            let body_len = body_len.context("an answer without Content-Length")?;
            break (status, head_len, body_len, close);
        }
        if read_more(stream, buf).await? == 0 {
            bail!("the connection closed before the answer's head");
        }
    };
    while buf.len() < head_len + body_len {
        if read_more(stream, buf).await? == 0 {
            bail!("the connection closed inside the answer's body");
        }
    }
    if buf.len() > head_len + body_len {
        bail!("more bytes than the answer (the client sends one request at a time)");
    }
    Ok((status, &buf[head_len..], close))
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
    stream.read_buf(buf).await
}

/// Checks avgate's answer: success, the size sent, and a verdict.
fn avgate_outcome(status: u16, body: &[u8], expected_size: u64) -> anyhow::Result<Outcome> {
    let json: serde_json::Value = serde_json::from_slice(body)
        .with_context(|| format!("HTTP {status}: {}", String::from_utf8_lossy(body)))?;
    if !(200..300).contains(&status) {
        bail!("HTTP {status}: {json}");
    }
    let size = json["size"].as_u64();
    if size != Some(expected_size) {
        bail!("avgate scanned {size:?} bytes, {expected_size} were sent: {json}");
    }
    match json["status"].as_str() {
        Some("OK") => Ok(Outcome::Clean),
        Some("FOUND") => Ok(Outcome::Found(
            json["signature"].as_str().unwrap_or("").to_owned(),
        )),
        _ => Err(anyhow!("unexpected answer: {json}")),
    }
}

fn raw_outcome(reply: clamd::ScanReply) -> anyhow::Result<Outcome> {
    match reply {
        clamd::ScanReply::Clean => Ok(Outcome::Clean),
        clamd::ScanReply::Found(name) => Ok(Outcome::Found(name)),
        other => Err(anyhow!("clamd answered {other:?}")),
    }
}
