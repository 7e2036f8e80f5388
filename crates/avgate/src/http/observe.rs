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

impl RequestId {
    /// A new id: 32 hex digits, unique within the process and, by a random
    /// per-process half, across restarts and gateways. The other half is a
    /// counter passed through a keyed bijection, so ids do not tell clients
    /// how many requests were served, and making one costs no system call
    /// (a random UUID per request was one `getrandom` each).
    pub fn next() -> RequestId {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::OnceLock;
        static SEED: OnceLock<(u64, u64)> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let (prefix, key) = *SEED.get_or_init(|| {
            let mut bytes = [0u8; 16];
            // Without the OS generator, the clock and pid still make the
            // prefix differ between processes; ids stay unique within one.
            if getrandom::fill(&mut bytes).is_err() {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                bytes[..8].copy_from_slice(&now.to_le_bytes());
                bytes[8..].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
            }
            let (a, b) = bytes.split_at(8);
            (
                u64::from_le_bytes(a.try_into().expect("8 bytes")),
                u64::from_le_bytes(b.try_into().expect("8 bytes")),
            )
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        RequestId(format!("{prefix:016x}{:016x}", permute(n ^ key)))
    }
}

/// splitmix64's finaliser: a bijection on u64 (so distinct inputs give
/// distinct outputs) that spreads every input bit over the output.
fn permute(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_hex_and_do_not_count_visibly() {
        let ids: Vec<String> = (0..10_000).map(|_| RequestId::next().0).collect();
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
        // Same process: same first half; the second half is not a counter.
        assert!(ids.iter().all(|id| id[..16] == ids[0][..16]));
        let tail = |i: usize| u64::from_str_radix(&ids[i][16..], 16).unwrap();
        assert!((1..100).any(|i| tail(i).abs_diff(tail(i - 1)) > 1 << 32));
    }
}
