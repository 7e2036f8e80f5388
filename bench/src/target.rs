//! The things being compared: avgate over HTTP (multipart POST /v1/scan,
//! field `file`) and raw clients talking straight to the same clamd socket
//! with the workspace's `clamd` crate: zINSTREAM (the baseline of the
//! targets) and FILDES with an in-memory file (what avgate itself does for
//! small files on a Unix socket, so the comparison that shows avgate's own
//! overhead).
//!
//! Small-file loads use a [`Worker`] per concurrent client: for avgate one
//! keep-alive HTTP/1.1 connection driven by hyper with the multipart body
//! built in one piece, so that the load generator spends about as little
//! per request as the raw client does (reqwest's multipart streaming cost
//! twice the raw client's CPU per request on the same 2 cores).

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Request};
use hyper_util::rt::TokioIo;
use reqwest::multipart::{Form, Part};

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
        }
    }

    /// Scans `size` bytes of fresh random data, generated while sending.
    pub async fn scan_random(&self, target: Target, size: u64) -> anyhow::Result<Outcome> {
        let body = data::random_stream(size, self.chunk);
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
        avgate_outcome(status, &body, expected_size)
    }
}

/// One client of a small-file load, scanning one payload at a time.
pub struct Worker {
    ctx: Ctx,
    target: Target,
    /// avgate: the worker's keep-alive connection, opened on first use and
    /// again after an error.
    http: Option<SendRequest<Full<Bytes>>>,
}

const BOUNDARY: &str = "avgate-bench-7d1f0c9a5e";

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
                let result = self.post(&data).await;
                if result.is_err() {
                    self.http = None; // a fresh connection for the next one
                }
                result
            }
        }
    }

    async fn post(&mut self, data: &Bytes) -> anyhow::Result<Outcome> {
        let sender = match &mut self.http {
            Some(sender) => sender,
            None => self.http.insert(connect(&self.ctx.scan_url).await?),
        };
        sender.ready().await?;
        let mut body = BytesMut::with_capacity(data.len() + 256);
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"payload.bin\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
        let mut request = Request::post(&self.ctx.scan_url)
            .header(header::HOST, "127.0.0.1")
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .header(header::ACCEPT, "application/json");
        if let Some(token) = &self.ctx.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = sender
            .send_request(request.body(Full::new(body.freeze()))?)
            .await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        avgate_outcome(status, &body, data.len() as u64)
    }
}

/// An HTTP/1.1 connection to the host of `url` (always 127.0.0.1).
async fn connect(url: &str) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let authority = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .context("an http:// URL")?;
    let stream = tokio::net::TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Checks avgate's answer: success, the size sent, and a verdict.
fn avgate_outcome(
    status: reqwest::StatusCode,
    body: &[u8],
    expected_size: u64,
) -> anyhow::Result<Outcome> {
    let json: serde_json::Value = serde_json::from_slice(body)
        .with_context(|| format!("HTTP {status}: {}", String::from_utf8_lossy(body)))?;
    if !status.is_success() {
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
