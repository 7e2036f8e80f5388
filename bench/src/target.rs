//! The two things being compared: avgate over HTTP (multipart POST
//! /v1/scan, field `file`) and a raw zINSTREAM client talking straight to
//! the same clamd socket with the workspace's `clamd` crate.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::multipart::{Form, Part};

use crate::data;

/// Chunk size the client produces for streamed uploads (both targets),
/// unless `--chunk-kib` says otherwise. The raw client sends each chunk as
/// one INSTREAM chunk.
pub const DEFAULT_CHUNK: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Raw,
    Avgate,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Raw => "raw",
            Target::Avgate => "avgate",
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

    /// Scans a small payload held in memory.
    pub async fn scan_bytes(&self, target: Target, data: Bytes) -> anyhow::Result<Outcome> {
        match target {
            Target::Raw => {
                let conn = clamd::Connection::connect(&self.clamd, self.timeouts).await?;
                let mut stream = conn.instream().await?;
                stream.send(&data).await?;
                raw_outcome(stream.finish().await?)
            }
            Target::Avgate => {
                let len = data.len() as u64;
                let part = Part::stream_with_length(reqwest::Body::from(data), len)
                    .file_name("payload.bin")
                    .mime_str("application/octet-stream")?;
                self.post(Form::new().part("file", part), len).await
            }
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
        let json: serde_json::Value = serde_json::from_slice(&body)
            .with_context(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&body)))?;
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
}

fn raw_outcome(reply: clamd::ScanReply) -> anyhow::Result<Outcome> {
    match reply {
        clamd::ScanReply::Clean => Ok(Outcome::Clean),
        clamd::ScanReply::Found(name) => Ok(Outcome::Found(name)),
        other => Err(anyhow!("clamd answered {other:?}")),
    }
}
