//! What a scan leaves behind for operators: one log line per file and
//! the scan metrics.
//!
//! Every file that reaches an engine produces exactly one line with the
//! message `scanned`: request id, client address, token name (never the
//! token), sanitized filename, size, sha256, verdict, signature, engine,
//! backend and duration. A file that no engine could scan is logged the
//! same way, at `warn`, with `verdict: "error"`. A file refused for the
//! client's fault (too large, broken body) has no such line; its request
//! line and `avgate_rejections_total` show it. File contents never reach a
//! log.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::Request;

use super::AppState;
use crate::auth::Principal;
use crate::metrics::{verdict_label, Metrics};
use crate::perimeter::ClientIp;
use crate::scan::pipeline::{PipelineError, ScanResult};

/// The request's id, also sent back as `X-Request-Id`; set by the request
/// middleware.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Who asked for the scans of one request.
pub struct ScanContext {
    metrics: Arc<Metrics>,
    request_id: Option<String>,
    client: Option<IpAddr>,
    /// The token's name; `None` without a token.
    token: Option<String>,
    /// The engine named in `verdict="error"` counts: the first configured.
    engine: &'static str,
}

impl ScanContext {
    pub fn new(state: &AppState, request: &Request, principal: &Principal) -> ScanContext {
        let extensions = request.extensions();
        ScanContext {
            metrics: state.metrics.clone(),
            request_id: extensions.get::<RequestId>().map(|id| id.0.clone()),
            client: extensions.get::<ClientIp>().map(|ip| ip.0),
            token: principal.token_id.is_some().then(|| principal.name.clone()),
            engine: state.engines.first().map_or("none", |e| e.name()),
        }
    }

    /// Runs one file's scan, counting it in flight, then logs and counts
    /// the outcome. Errors that are the client's (too large, a broken
    /// body) are not scans: they are counted as rejections by their code.
    pub async fn scan<F>(
        &self,
        filename: Option<&str>,
        scan: F,
    ) -> Result<ScanResult, PipelineError>
    where
        F: Future<Output = Result<ScanResult, PipelineError>>,
    {
        let started = Instant::now();
        let in_flight = self.metrics.scan_started();
        let outcome = scan.await;
        drop(in_flight);
        match &outcome {
            Ok(result) => {
                self.metrics.scan_done(result);
                self.log(result);
            }
            Err(PipelineError::Engine(error)) => {
                self.metrics.scan_failed(self.engine);
                tracing::warn!(
                    request_id = self.request_id.as_deref(),
                    client = self.client.map(tracing::field::display),
                    token = self.token.as_deref(),
                    filename = filename.unwrap_or(""),
                    verdict = "error",
                    error = %error,
                    engine = self.engine,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "scanned"
                );
            }
            Err(_) => {}
        }
        outcome
    }

    fn log(&self, r: &ScanResult) {
        tracing::info!(
            request_id = self.request_id.as_deref(),
            client = self.client.map(tracing::field::display),
            token = self.token.as_deref(),
            filename = r.filename.as_deref().unwrap_or(""),
            size = r.size,
            sha256 = %r.sha256,
            status = ?r.verdict.status,
            verdict = verdict_label(r.verdict.verdict),
            signature = r.verdict.signature.as_deref().unwrap_or(""),
            score = r.verdict.score,
            policy = r.verdict.policy.as_ref().and_then(|p| p.id.as_deref()),
            engine = r.engine.name,
            backend = %r.engine.backend,
            duration_ms = r.duration_ms,
            "scanned"
        );
    }
}
