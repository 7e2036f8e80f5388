//! Prometheus metrics, served on their own listener (`metrics.listen`,
//! loopback by default), never on the public one.
//!
//! Counters and histograms are updated where things happen: requests in
//! `http::request_context` (by matched route, never the raw path, and by the
//! error body's `code`), scans in [`crate::http::observe`]. What the pool
//! and the managed clamd know (backend health, in-flight, signature
//! versions, restarts) is read when Prometheus scrapes, so it costs the
//! hot path nothing.
//!
//! The output is the Prometheus text format 0.0.4, the one
//! `promtool check metrics` reads. Every metric is named in
//! docs/operations.md ("Monitoring"), which the dashboard and the alert
//! rules in deploy/ use.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clamd::{BackendStatus, Health, Pool};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::http::error::ErrorCode;
use crate::managed::{DatabaseKind, ManagedClamd};
use crate::scan::pipeline::ScanResult;
use crate::scan::verdict::Kind;
use crate::signatures::Signatures;

/// Buckets for scan and request durations, in seconds: from a small file
/// on a warm clamd (a few ms) to `clamd.scan_timeout` (130 s by default).
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The label for a route that matched nothing (404s): raw paths are never
/// used as label values, or any client could create series at will.
pub const UNMATCHED: &str = "unmatched";

/// The metrics of one avgate instance. Cheap to update from many tasks.
pub struct Metrics {
    registry: Registry,
    scans: IntCounterVec,
    scanned_bytes: IntCounter,
    /// Connections closed at once: their address had
    /// `max_connections_per_ip` open already.
    pub connections_refused: IntCounter,
    scan_duration: Histogram,
    scans_in_flight: IntGauge,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    rejections: IntCounterVec,
    backend_scan_duration: HistogramVec,
    /// Read from the pool and the managed clamd at each scrape.
    sources: Sources,
    scraped: Scraped,
    /// One scrape at a time: the scraped values are set, then gathered.
    scrape_lock: Mutex<()>,
}

struct Sources {
    pool: Arc<Pool>,
    managed: Option<Arc<ManagedClamd>>,
    signatures: Option<Arc<Signatures>>,
}

/// The metrics set from a snapshot when scraped.
struct Scraped {
    backend_up: IntGaugeVec,
    backend_in_flight: IntGaugeVec,
    backend_max_concurrent: IntGaugeVec,
    backend_fd_passing: IntGaugeVec,
    backend_failures: IntCounterVec,
    backend_error_replies: IntCounterVec,
    backend_info: IntGaugeVec,
    backend_database_version: IntGaugeVec,
    backend_database_age: prometheus::GaugeVec,
    backend_last_probe: prometheus::GaugeVec,
    /// Set at start; in managed mode read again at each scrape, since the
    /// managed clamd's database can change kind while it runs (official
    /// once freshclam has it, or back to test signatures if it goes).
    database_info: IntGaugeVec,
    /// Signature reloads by result (ok, failed).
    reloads: IntCounterVec,
    /// Only in managed mode.
    managed_restarts: Option<IntCounter>,
    /// Only in managed mode: the file system of clamd's temporary
    /// directory (a tmpfs with `managed.temp_dir`, which node_exporter
    /// skips under /dev and /run).
    /// Free and total bytes.
    managed_temp: Option<(IntGauge, IntGauge)>,
}

impl Metrics {
    /// Registers every metric. `database` and `max_concurrent_scans` are
    /// fixed for the life of the process.
    pub fn new(
        pool: Arc<Pool>,
        managed: Option<Arc<ManagedClamd>>,
        signatures: Option<Arc<Signatures>>,
        database: DatabaseKind,
        max_concurrent_scans: usize,
    ) -> Metrics {
        let registry = Registry::new();
        let r = Registrar(&registry);

        let build = r.gauge_vec(
            "avgate_build_info",
            "avgate's version, as a label; always 1.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let database_info = r.gauge_vec(
            "avgate_database_info",
            "Which signatures the engine runs with (official, test-signatures-only, custom, external); always 1.",
            &["kind"],
        );
        database_info.with_label_values(&[database.as_str()]).set(1);
        r.gauge(
            "avgate_scans_max_concurrent",
            "Scans at once (max_concurrent_scans); past it, requests get 503 server_busy.",
        )
        .set(max_concurrent_scans as i64);

        let scraped = Scraped {
            database_info,
            backend_up: r.gauge_vec(
                "avgate_backend_up",
                "1 when the backend's last health probe (a real scan of EICAR) found it, else 0.",
                &["backend"],
            ),
            backend_in_flight: r.gauge_vec(
                "avgate_backend_in_flight",
                "Scans running on the backend now.",
                &["backend"],
            ),
            backend_max_concurrent: r.gauge_vec(
                "avgate_backend_max_concurrent",
                "Scans at once avgate allows on the backend.",
                &["backend"],
            ),
            backend_fd_passing: r.gauge_vec(
                "avgate_backend_fd_passing",
                "1 when small files go to the backend as file descriptors (a Unix socket whose clamd has not refused one).",
                &["backend"],
            ),
            backend_failures: r.counter_vec(
                "avgate_backend_failures_total",
                "Scans or connections that failed on the backend and took it out of rotation.",
                &["backend"],
            ),
            backend_error_replies: r.counter_vec(
                "avgate_backend_error_replies_total",
                "Scans the backend answered with an ERROR reply (the file not scanned there; the backend stays in rotation).",
                &["backend"],
            ),
            backend_info: r.gauge_vec(
                "avgate_backend_info",
                "The backend's ClamAV version, as a label; always 1.",
                &["backend", "clamav"],
            ),
            backend_database_version: r.gauge_vec(
                "avgate_backend_database_version",
                "Version of the backend's signature database (daily), when it reports one.",
                &["backend"],
            ),
            backend_database_age: r.float_gauge_vec(
                "avgate_backend_database_age_seconds",
                "Age of the backend's signature database, when known.",
                &["backend"],
            ),
            backend_last_probe: r.float_gauge_vec(
                "avgate_backend_last_probe_timestamp_seconds",
                "Unix time of the backend's last health probe.",
                &["backend"],
            ),
            reloads: r.counter_vec(
                "avgate_signature_reloads_total",
                "Signature reloads (freshclam updates, policy changes, POST /v1/admin/reload), by result: ok, or failed (clamd refused the new files or could not be reached, and keeps its previous database).",
                &["result"],
            ),
            managed_restarts: managed.as_ref().map(|_| {
                r.counter(
                    "avgate_managed_clamd_restarts_total",
                    "Times the managed clamd exited and was started again.",
                )
            }),
            managed_temp: managed.as_ref().map(|_| {
                (
                    r.gauge(
                        "avgate_managed_clamd_temp_free_bytes",
                        "Free space for the managed clamd's temporary files (spooled streams, extracted archives).",
                    ),
                    r.gauge(
                        "avgate_managed_clamd_temp_size_bytes",
                        "Size of the file system holding the managed clamd's temporary files.",
                    ),
                )
            }),
        };

        Metrics {
            scans: r.counter_vec(
                "avgate_scans_total",
                "Files scanned, by verdict (clean, infected, unscannable, error) and engine.",
                &["verdict", "engine"],
            ),
            scanned_bytes: r.counter(
                "avgate_scanned_bytes_total",
                "Bytes of files scanned to a verdict.",
            ),
            connections_refused: r.counter(
                "avgate_connections_refused_total",
                "Connections closed as soon as accepted: their client address had max_connections_per_ip open.",
            ),
            scan_duration: r.histogram(
                "avgate_scan_duration_seconds",
                "Time from a file's first byte to its verdict (upload included), for files that got one.",
            ),
            scans_in_flight: r.gauge(
                "avgate_scans_in_flight",
                "Files being scanned now.",
            ),
            requests: r.counter_vec(
                "avgate_http_requests_total",
                "Requests on the public listener, by matched route, method and status.",
                &["route", "method", "status"],
            ),
            request_duration: r.histogram_vec(
                "avgate_http_request_duration_seconds",
                "Time to answer a request on the public listener, by matched route.",
                &["route"],
            ),
            rejections: r.counter_vec(
                "avgate_rejections_total",
                "Requests answered with an error body, by its code (docs/api.md).",
                &["code"],
            ),
            backend_scan_duration: r.histogram_vec(
                "avgate_backend_scan_duration_seconds",
                "Scan duration (as avgate_scan_duration_seconds) by the backend that scanned.",
                &["backend"],
            ),
            sources: Sources {
                pool,
                managed,
                signatures,
            },
            scraped,
            scrape_lock: Mutex::new(()),
            registry,
        }
    }

    /// Counts a file as being scanned until the guard is dropped (also
    /// when the client goes away mid-scan and the handler is dropped).
    pub fn scan_started(&self) -> InFlight {
        self.scans_in_flight.inc();
        InFlight(self.scans_in_flight.clone())
    }

    /// A file that got a verdict.
    pub fn scan_done(&self, result: &ScanResult) {
        let verdict = verdict_label(result.verdict.verdict);
        self.scans
            .with_label_values(&[verdict, result.engine.name])
            .inc();
        self.scanned_bytes.inc_by(result.size);
        // duration_ms is what the client sees in the answer; ms are plenty
        // for buckets that start at 5 ms.
        let seconds = result.duration_ms as f64 / 1000.0;
        self.scan_duration.observe(seconds);
        if !result.engine.backend.is_empty() {
            self.backend_scan_duration
                .with_label_values(&[&result.engine.backend])
                .observe(seconds);
        }
    }

    /// A file that could not be scanned because an engine failed (down,
    /// busy, timed out): `verdict="error"`.
    pub fn scan_failed(&self, engine: &str) {
        self.scans.with_label_values(&["error", engine]).inc();
    }

    /// An answered request, by matched route (never the raw path), method
    /// and status, its duration, and an error answer by its `code`.
    pub fn request_done(
        &self,
        route: &str,
        method: &Method,
        response: &Response,
        elapsed: Duration,
    ) {
        let status = response.status();
        self.requests
            .with_label_values(&[route, method_label(method), status.as_str()])
            .inc();
        self.request_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
            self.rejections.with_label_values(&[code.as_str()]).inc();
        }
    }

    /// Reads the backends and the managed clamd, then renders everything
    /// in the text format 0.0.4.
    pub fn render(&self) -> String {
        let _one_at_a_time = self.scrape_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh();
        let families = self.registry.gather();
        TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot render the metrics");
                String::new()
            })
    }

    fn refresh(&self) {
        let s = &self.scraped;
        // Labels that no longer apply (a version that changed, a database
        // version that is gone) must not linger.
        s.backend_info.reset();
        s.backend_database_version.reset();
        s.backend_database_age.reset();
        for backend in self.sources.pool.backends() {
            let status = backend.status();
            let label = [status.address.as_str()];
            let up = matches!(status.health, Health::Up);
            s.backend_up.with_label_values(&label).set(i64::from(up));
            s.backend_in_flight
                .with_label_values(&label)
                .set(status.in_flight as i64);
            s.backend_max_concurrent
                .with_label_values(&label)
                .set(status.max_concurrent as i64);
            s.backend_fd_passing
                .with_label_values(&label)
                .set(i64::from(status.fd_passing));
            catch_up(
                &s.backend_failures.with_label_values(&label),
                status.failures,
            );
            catch_up(
                &s.backend_error_replies.with_label_values(&label),
                status.error_replies,
            );
            if let Some(probe) = status.last_probe.and_then(unix_seconds) {
                s.backend_last_probe.with_label_values(&label).set(probe);
            }
            if let Some(version) = &status.version {
                s.backend_info
                    .with_label_values(&[status.address.as_str(), version.clamav.as_str()])
                    .set(1);
                if let Some(db) = version.database {
                    s.backend_database_version
                        .with_label_values(&label)
                        .set(i64::from(db));
                }
            }
            if let Some(age) = database_age(&status) {
                s.backend_database_age
                    .with_label_values(&label)
                    .set(age.as_secs_f64());
            }
        }
        if let Some(managed) = &self.sources.managed {
            s.database_info.reset();
            s.database_info
                .with_label_values(&[managed.database().as_str()])
                .set(1);
        }
        if let Some(signatures) = &self.sources.signatures {
            let (ok, failed) = signatures.reload_counts();
            catch_up(&s.reloads.with_label_values(&["ok"]), ok);
            catch_up(&s.reloads.with_label_values(&["failed"]), failed);
        }
        if let (Some(counter), Some(managed)) = (&s.managed_restarts, &self.sources.managed) {
            catch_up(counter, managed.status().restarts);
        }
        if let (Some((free, size)), Some(managed)) = (&s.managed_temp, &self.sources.managed) {
            if let Some(space) = managed.temp_space() {
                free.set(space.free as i64);
                size.set(space.size as i64);
            }
        }
    }
}

/// The age of a backend's signature database, as the pool dates it: the
/// build date of a signed database, else the newest signature file when
/// its directory is known (managed mode, or an external clamd on this
/// host). Unknown: no `avgate_backend_database_age_seconds` sample, and the
/// `AvgateSignaturesStale` alert stays quiet for that backend.
fn database_age(status: &BackendStatus) -> Option<Duration> {
    status.database_age()
}

/// Raises a counter that mirrors a monotonic count kept elsewhere.
fn catch_up(counter: &IntCounter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

fn unix_seconds(t: SystemTime) -> Option<f64> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64())
}

/// The `verdict` label: the API's own words.
pub fn verdict_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Clean => "clean",
        Kind::Infected => "infected",
        Kind::Unscannable => "unscannable",
    }
}

/// Methods as labels: the standard ones, anything else as `other` (a
/// client chooses the method, and must not choose our label values).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Keeps `avgate_scans_in_flight` up while a file is being scanned.
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The metrics listener's router: `GET /metrics` (the health endpoints
/// are merged in by the caller).
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "metrics are at /metrics (and /healthz, /readyz)\n",
            )
        })
        .with_state(metrics)
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    // A few locks and some formatting: done in place, not worth a
    // blocking thread.
    let body = metrics.render();
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Binds the metrics listener (a failure stops start-up, like the public
/// listener's).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (metrics.listen, --metrics-listen)"))
}

/// Registers metrics; names are fixed at compile time, so a failure is a
/// programming error (a duplicate or invalid name) caught by any test.
struct Registrar<'a>(&'a Registry);

impl Registrar<'_> {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        self.0
            .register(Box::new(c.clone()))
            .expect("metric names are unique and valid");
        c
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric"))
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn float_gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::GaugeVec {
        self.add(prometheus::GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn histogram(&self, name: &str, help: &str) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
        self.add(Histogram::with_opts(opts).expect("valid metric"))
    }

    fn histogram_vec(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
        self.add(HistogramVec::new(opts, labels).expect("valid metric"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::verdict::{Status, Verdict};
    use crate::scan::EngineInfo;

    fn metrics() -> Metrics {
        let pool = Pool::new(
            vec![clamd::BackendConfig {
                address: "tcp://127.0.0.1:1".parse().unwrap(),
                max_concurrent: 3,
            }],
            clamd::Timeouts::default(),
        );
        Metrics::new(pool, None, None, DatabaseKind::External, 128)
    }

    fn result(kind: Kind, size: u64, ms: u64) -> ScanResult {
        ScanResult {
            filename: Some("a.txt".into()),
            verdict: Verdict {
                status: if kind == Kind::Clean {
                    Status::OK
                } else {
                    Status::FOUND
                },
                verdict: kind,
                signature: None,
                score: 0,
                policy: None,
            },
            sha256: String::new(),
            size,
            duration_ms: ms,
            engine: EngineInfo {
                name: "clamav",
                version: None,
                database: None,
                database_date: None,
                backend: "tcp://127.0.0.1:1".into(),
            },
        }
    }

    #[test]
    fn scans_are_counted_by_verdict_with_bytes_and_durations() {
        let m = metrics();
        let guard = m.scan_started();
        assert_eq!(m.scans_in_flight.get(), 1);
        m.scan_done(&result(Kind::Infected, 68, 3));
        m.scan_done(&result(Kind::Clean, 1000, 40));
        m.scan_failed("clamav");
        drop(guard);
        let text = m.render();
        for line in [
            "avgate_scans_total{engine=\"clamav\",verdict=\"infected\"} 1",
            "avgate_scans_total{engine=\"clamav\",verdict=\"clean\"} 1",
            "avgate_scans_total{engine=\"clamav\",verdict=\"error\"} 1",
            "avgate_scanned_bytes_total 1068",
            "avgate_scans_in_flight 0",
            "avgate_scan_duration_seconds_bucket{le=\"0.005\"} 1",
            "avgate_scan_duration_seconds_bucket{le=\"0.05\"} 2",
            "avgate_scan_duration_seconds_count 2",
            "avgate_backend_scan_duration_seconds_count{backend=\"tcp://127.0.0.1:1\"} 2",
            "avgate_backend_up{backend=\"tcp://127.0.0.1:1\"} 0",
            "avgate_backend_max_concurrent{backend=\"tcp://127.0.0.1:1\"} 3",
            "avgate_database_info{kind=\"external\"} 1",
            "avgate_scans_max_concurrent 128",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("avgate_managed_clamd_restarts_total"));
    }

    #[test]
    fn methods_chosen_by_clients_do_not_become_labels() {
        assert_eq!(method_label(&Method::POST), "POST");
        let odd = Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&odd), "other");
    }
}
