//! Signature freshness and reloads, for every backend.
//!
//! - **Freshness**: each backend's database time comes from the pool's
//!   probes (clamd's VERSION for a signed database, the files' times for an
//!   unsigned one in the managed directory). A backend in rotation whose
//!   database is older than `max_database_age` makes /readyz fail, and a
//!   warning is logged, at most once an hour per backend
//!   ([`Signatures::monitor`]).
//! - **Reloads** ([`Signatures::reload`]): the managed clamd's directory is
//!   re-linked, then each backend to reload (the managed clamd; external
//!   ones with `updates.reload_external`) gets a RELOAD, **one at a time**:
//!   while another backend is healthy, the one being reloaded is taken out
//!   of rotation; avgate waits until clamd has finished loading (its log
//!   line for the managed clamd, a new VERSION for an external one) and
//!   until the EICAR probe passes again before going on to the next. clamd
//!   runs with `ConcurrentDatabaseReload yes`, so even a single backend
//!   keeps scanning with its old engine meanwhile (and needs about twice
//!   its memory while the new one loads).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clamd::{Backend, BackendStatus, Connection, Health, Pool, Timeouts, Version};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::managed::{LoadCounts, LoadOutcome, ManagedClamd};
use crate::store::clock;

/// Longest wait for the managed clamd to finish loading a database (the
/// official one takes 6–14 s on a quiet host; much longer on a busy one).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long the managed clamd may take to start loading after a RELOAD
/// (its `Reading databases from` line, at once on any host) before the
/// RELOAD is sent again: clamd answers RELOADING but drops a RELOAD that
/// it reads while it activates an engine (someone else's reload). A
/// second RELOAD during a load is harmless.
const RELOAD_TAKEN: Duration = Duration::from_secs(15);
/// RELOADs sent for one reload at most.
const RELOAD_SENDS: u32 = 3;
/// How long an external backend is watched for a new database version
/// after RELOAD. An unsigned database does not change VERSION: the reload
/// is then reported `unconfirmed` after this long.
const EXTERNAL_SETTLE: Duration = Duration::from_secs(60);
/// Longest wait for the EICAR probe to pass after a reload.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for scans already running on a backend taken out of
/// rotation, before its RELOAD is sent anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often freshness is checked for the log, and how often a stale
/// backend is warned about.
const CHECK_EVERY: Duration = Duration::from_secs(30);
const WARN_EVERY: Duration = Duration::from_secs(3600);

/// Freshness and reloads of the pool's signature databases.
pub struct Signatures {
    pool: Arc<Pool>,
    managed: Option<Arc<ManagedClamd>>,
    /// Seconds; 0: no limit. Changes on SIGHUP.
    max_age: AtomicU64,
    reload_external: AtomicBool,
    one_at_a_time: tokio::sync::Mutex<()>,
    /// Reload calls so far, to merge those that queue (see [`Signatures::reload`]).
    requested: AtomicU64,
    history: Mutex<History>,
}

#[derive(Default)]
struct History {
    reloads: u64,
    failed: u64,
    last: Option<ReloadReport>,
    /// The calls the last reload answers: every one made before it began.
    covered: u64,
}

/// What one reload did, backend by backend, in order.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub reason: String,
    pub at: String,
    pub duration_ms: u64,
    /// Every backend reloaded and ready again.
    pub ok: bool,
    /// Re-linking the managed database directory failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub backends: Vec<BackendReload>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendReload {
    pub backend: String,
    /// `reloaded`, `unconfirmed` (an external backend whose VERSION did not
    /// change: it may still be loading) or `failed`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Taken out of rotation meanwhile (another backend was healthy).
    pub drained: bool,
    pub database_before: Option<u32>,
    pub database_after: Option<u32>,
    /// Since the start of the reload: the backends' intervals never overlap.
    pub started_ms: u64,
    pub finished_ms: u64,
}

/// For /readyz.
#[derive(Debug, Clone, Serialize)]
pub struct SignaturesStatus {
    /// `null`: no limit.
    pub max_database_age_seconds: Option<u64>,
    pub versions_differ: bool,
    pub reloading: bool,
    pub reloads: u64,
    pub last_reload: Option<ReloadReport>,
}

/// Whether a backend's database is older than `max_age` (`None`: no
/// limit). A backend whose database time is unknown (an external clamd
/// with an unsigned database) is never stale.
pub fn is_stale(status: &BackendStatus, max_age: Option<Duration>) -> bool {
    match (max_age, status.database_age()) {
        (Some(max), Some(age)) => age > max,
        _ => false,
    }
}

/// Marks a backend as draining for as long as it lives.
struct Drain<'a>(&'a Backend);

impl Drop for Drain<'_> {
    fn drop(&mut self) {
        self.0.set_draining(false);
    }
}

impl Signatures {
    /// Reloads so far: (done, failed).
    pub fn reload_counts(&self) -> (u64, u64) {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        (history.reloads - history.failed, history.failed)
    }

    pub fn new(
        pool: Arc<Pool>,
        managed: Option<Arc<ManagedClamd>>,
        config: &Config,
    ) -> Arc<Signatures> {
        if let Some(m) = &managed {
            // Dates the managed clamd's unsigned database by its files.
            let address = m.address();
            for backend in pool.backends().iter().filter(|b| b.address == address) {
                backend.set_database_dir(Some(m.database_dir().to_path_buf()));
            }
        }
        if managed.is_none() && config.updates.enabled == Some(true) {
            tracing::warn!(
                "updates.enabled applies to the managed clamd only: with external backends, \
                 run freshclam next to each clamd"
            );
        }
        let signatures = Signatures {
            pool,
            managed,
            max_age: AtomicU64::new(0),
            reload_external: AtomicBool::new(false),
            one_at_a_time: tokio::sync::Mutex::new(()),
            requested: AtomicU64::new(0),
            history: Mutex::new(History::default()),
        };
        signatures.apply_config(config);
        Arc::new(signatures)
    }

    /// Takes the settings that may change at runtime (SIGHUP).
    pub fn apply_config(&self, config: &Config) {
        self.max_age
            .store(config.max_database_age.0.as_secs(), Ordering::Relaxed);
        self.reload_external
            .store(config.updates.reload_external, Ordering::Relaxed);
    }

    pub fn max_age(&self) -> Option<Duration> {
        match self.max_age.load(Ordering::Relaxed) {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        }
    }

    /// Backends in rotation whose database is too old.
    pub fn stale_backends(&self) -> Vec<BackendStatus> {
        let max = self.max_age();
        self.pool
            .backends()
            .iter()
            .map(|b| b.status())
            .filter(|s| s.health == Health::Up && is_stale(s, max))
            .collect()
    }

    pub fn status(&self) -> SignaturesStatus {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        SignaturesStatus {
            max_database_age_seconds: self.max_age().map(|d| d.as_secs()),
            versions_differ: self.pool.database_versions_differ(),
            reloading: self.one_at_a_time.try_lock().is_err(),
            reloads: history.reloads,
            last_reload: history.last.clone(),
        }
    }

    /// Whether the managed clamd answers scans (its backend is up); true
    /// when there is none.
    pub fn managed_up(&self) -> bool {
        let Some(m) = &self.managed else {
            return true;
        };
        let address = m.address();
        self.pool
            .backends()
            .iter()
            .any(|b| b.address == address && b.is_healthy())
    }

    /// Re-links the managed database directory, then reloads the backends
    /// one at a time (see the module docs). Concurrent calls queue, and
    /// merge: a call answered by a reload that began after it was made
    /// (it saw every file there was then) gets that reload's report, so
    /// that a burst (SIGHUPs, policy changes, updates) costs one reload
    /// after the one running, not one each: with the official database
    /// each is many seconds of clamd's CPU and a second engine's memory.
    pub async fn reload(&self, reason: &str) -> ReloadReport {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _one_at_a_time = self.one_at_a_time.lock().await;
        {
            let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
            if history.covered >= ticket {
                if let Some(last) = &history.last {
                    tracing::info!(
                        reason,
                        "reload merged with one that began after it was asked for"
                    );
                    return last.clone();
                }
            }
        }
        let covers = self.requested.load(Ordering::SeqCst);
        let started = Instant::now();
        let at = clock::rfc3339(clock::now());
        let mut error = None;
        if let Some(managed) = &self.managed {
            if let Err(e) = managed.resync().await {
                error = Some(format!("{e:#}"));
            }
        }
        // A directory that could not be brought up to date may be half
        // linked: the managed clamd keeps what it has loaded rather than
        // load that (the error is in the report, and the next sync retries).
        let managed_address = self.managed.as_ref().map(|m| m.address());
        let external = self.reload_external.load(Ordering::Relaxed);
        let targets: Vec<&Arc<Backend>> = self
            .pool
            .backends()
            .iter()
            .filter(|b| match &managed_address {
                Some(managed) if *managed == b.address => error.is_none(),
                _ => external,
            })
            .collect();
        tracing::info!(
            reason,
            backends = %targets.iter().map(|b| b.address.to_string()).collect::<Vec<_>>().join(","),
            "reloading signatures, one backend at a time"
        );
        let mut backends = Vec::new();
        for backend in targets {
            let managed = self
                .managed
                .as_deref()
                .filter(|_| Some(&backend.address) == managed_address.as_ref());
            let result = self.reload_backend(backend, managed, started).await;
            // Back in rotation (no longer draining, probed up): requests
            // waiting for a slot get it now, not at the next health check.
            self.pool.wake_waiters();
            match result.outcome {
                "failed" => tracing::error!(
                    backend = %result.backend,
                    detail = ?result.detail,
                    "signature reload failed; the backend keeps its previous database"
                ),
                outcome => tracing::info!(
                    backend = %result.backend,
                    outcome,
                    database = result.database_after,
                    took_ms = result.finished_ms - result.started_ms,
                    "backend reloaded"
                ),
            }
            backends.push(result);
        }
        let report = ReloadReport {
            reason: reason.to_owned(),
            at,
            duration_ms: started.elapsed().as_millis() as u64,
            ok: error.is_none() && backends.iter().all(|b| b.outcome != "failed"),
            error,
            backends,
        };
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.reloads += 1;
        history.failed += u64::from(!report.ok);
        history.last = Some(report.clone());
        history.covered = covers;
        report
    }

    async fn reload_backend(
        &self,
        backend: &Arc<Backend>,
        managed: Option<&ManagedClamd>,
        t0: Instant,
    ) -> BackendReload {
        let started_ms = t0.elapsed().as_millis() as u64;
        let before = backend.status().version;
        let others_serve = self
            .pool
            .backends()
            .iter()
            .any(|b| !Arc::ptr_eq(b, backend) && b.is_healthy() && !b.is_draining());
        let _drain = others_serve.then(|| {
            backend.set_draining(true);
            Drain(backend)
        });
        if others_serve {
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            while backend.in_flight() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let timeouts = self.pool.timeouts().for_probe();
        // The loads clamd started before this RELOAD went out: one of them
        // ending is not this reload ending.
        let mut watch = managed.map(|m| {
            let mut changes = m.log().subscribe();
            changes.borrow_and_update();
            (changes, m.log().counts())
        });
        let result = send_reload(backend, timeouts).await;
        let mut outcome = "reloaded";
        let mut detail = None;
        if let Err(e) = result {
            outcome = "failed";
            detail = Some(format!("RELOAD: {e}"));
            if let Some(m) = managed {
                m.reload_missed();
            }
        } else if let (Some((changes, before)), Some(m)) = (&mut watch, managed) {
            match wait_for_managed(m, changes, before, backend, timeouts).await {
                Ok(Some(signatures)) => {
                    m.record_signatures(signatures);
                    backend.database_reloaded();
                    detail = Some(format!("{signatures} signatures"));
                }
                Ok(None) => detail = Some("clamd was restarted meanwhile".into()),
                Err(WaitError::Refused(why)) => {
                    outcome = "failed";
                    detail = Some(why);
                }
                Err(WaitError::NotDone(why)) => {
                    // Owed: tried again until a reload gets through.
                    m.reload_missed();
                    outcome = "failed";
                    detail = Some(why);
                }
            }
        } else if !wait_for_new_version(backend, before.as_ref(), timeouts).await {
            outcome = "unconfirmed";
            detail = Some(format!(
                "VERSION did not change within {EXTERNAL_SETTLE:?} (an unsigned database, or still loading)"
            ));
        }
        // Ready again: the EICAR probe passes (this also records the new
        // version and database time for /version).
        let deadline = Instant::now() + READY_TIMEOUT;
        let ready = loop {
            match backend.probe(timeouts).await {
                Ok(_) => break true,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => {
                    tracing::warn!(backend = %backend.address, error = %e, "backend not ready after reload");
                    break false;
                }
            }
        };
        if !ready && outcome != "failed" {
            outcome = "failed";
            detail = Some("the EICAR probe did not pass after the reload".into());
        }
        BackendReload {
            backend: backend.address.to_string(),
            outcome,
            detail,
            drained: others_serve,
            database_before: before.and_then(|v| v.database),
            database_after: backend.status().version.and_then(|v| v.database),
            started_ms,
            finished_ms: t0.elapsed().as_millis() as u64,
        }
    }

    /// Logs a warning for each stale backend in rotation, at most once an
    /// hour each, until `stop`.
    pub async fn monitor(self: Arc<Self>, stop: CancellationToken) {
        let mut warnings = StaleWarnings::default();
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let max = self.max_age();
            let statuses: Vec<BackendStatus> =
                self.pool.backends().iter().map(|b| b.status()).collect();
            let (warn, fresh) = warnings.check(&statuses, max, Instant::now());
            for status in warn {
                tracing::warn!(
                    backend = %status.address,
                    database_age_s = status.database_age().map(|a| a.as_secs()),
                    max_database_age_s = max.map(|m| m.as_secs()),
                    database = ?status.version.as_ref().and_then(|v| v.database),
                    "STALE SIGNATURES: the backend's database is older than max_database_age; \
                     /readyz fails until it is updated (check freshclam)"
                );
            }
            for address in fresh {
                tracing::info!(backend = %address, "the signature database is fresh again");
            }
        }
    }
}

/// Which stale backends to warn about, at most once per [`WARN_EVERY`].
#[derive(Default)]
struct StaleWarnings {
    warned: HashMap<String, Instant>,
}

impl StaleWarnings {
    /// The backends to warn about now, and those that are fresh again.
    fn check<'a>(
        &mut self,
        statuses: &'a [BackendStatus],
        max: Option<Duration>,
        now: Instant,
    ) -> (Vec<&'a BackendStatus>, Vec<String>) {
        let (mut warn, mut fresh) = (Vec::new(), Vec::new());
        for status in statuses {
            let stale = status.health == Health::Up && is_stale(status, max);
            if !stale {
                if self.warned.remove(&status.address).is_some() {
                    fresh.push(status.address.clone());
                }
                continue;
            }
            let due = self
                .warned
                .get(&status.address)
                .is_none_or(|t| now.duration_since(*t) >= WARN_EVERY);
            if due {
                self.warned.insert(status.address.clone(), now);
                warn.push(status);
            }
        }
        (warn, fresh)
    }
}

/// `RELOAD` on a connection of its own (clamd answers `RELOADING`).
async fn send_reload(backend: &Backend, timeouts: Timeouts) -> Result<(), clamd::Error> {
    let mut conn = Connection::connect(&backend.address, timeouts).await?;
    conn.reload().await
}

/// Why a managed reload did not end with the new database in use.
enum WaitError {
    /// clamd loaded the files and refused them (it keeps its previous
    /// database; reloading again would fail again until they change).
    Refused(String),
    /// clamd did not load them (never took the RELOAD, is still at it, or
    /// ran out of memory loading them): the reload is owed.
    NotDone(String),
}

/// Waits for the managed clamd to load the files after the RELOAD just
/// sent (`before`: its loads until then): `Some(signatures)` once the new
/// engine is in use, `None` when a new clamd process started meanwhile (it
/// loads the directory as it is). The first load to start after a RELOAD
/// is the one that reads the directory as avgate left it.
///
/// clamd answers RELOADING to every RELOAD but does not act on one that
/// comes while it loads or activates another database (someone's
/// `clamdscan --reload`, a SIGUSR2): once that load is over, the RELOAD is
/// sent again. One that starts no load at all within [`RELOAD_TAKEN`]
/// (and nothing else running) is sent again too, [`RELOAD_SENDS`] times in
/// all.
async fn wait_for_managed(
    managed: &ManagedClamd,
    changes: &mut tokio::sync::watch::Receiver<()>,
    before: &LoadCounts,
    backend: &Backend,
    timeouts: Timeouts,
) -> Result<Option<u64>, WaitError> {
    use tokio::time::Instant;
    let log = managed.log();
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    // Loads started before the latest RELOAD went out.
    let mut base = before.started;
    let mut sends = 1;
    let mut resend_at = Instant::now() + RELOAD_TAKEN;
    // Another load ran, or ended, after the latest RELOAD went out: clamd
    // let that RELOAD join it or dropped it.
    let mut met_another = before.loading();
    let mut ended_at_send = before.ended;
    loop {
        let now = log.counts();
        if now.processes != before.processes {
            return Ok(None);
        }
        let ours_started = now.started > base;
        if !ours_started && now.ended > ended_at_send {
            met_another = true;
        }
        if ours_started {
            match log.outcome(base + 1) {
                Some(LoadOutcome::Loaded { signatures }) => return Ok(Some(signatures)),
                // Out of memory (a second engine beside the first): the
                // files may well load later. Owed.
                Some(LoadOutcome::Failed(why)) if why.contains("allocate memory") => {
                    return Err(WaitError::NotDone(format!("clamd: {why}")))
                }
                Some(LoadOutcome::Failed(why)) => {
                    return Err(WaitError::Refused(format!("clamd: {why}")))
                }
                None => {}
            }
        } else if now.loading() {
            met_another = true;
        } else if met_another || Instant::now() >= resend_at {
            if !met_another {
                if sends == RELOAD_SENDS {
                    return Err(WaitError::NotDone(format!(
                        "clamd started no load after {RELOAD_SENDS} RELOAD commands"
                    )));
                }
                sends += 1;
            }
            tracing::warn!(
                backend = %backend.address,
                after_another_load = met_another,
                "clamd did not take the RELOAD (it was loading another database, or did not answer with a load); sending it again"
            );
            met_another = false;
            base = now.started;
            ended_at_send = now.ended;
            resend_at = Instant::now() + RELOAD_TAKEN;
            if let Err(e) = send_reload(backend, timeouts).await {
                return Err(WaitError::NotDone(format!("RELOAD: {e}")));
            }
            continue;
        }
        // Nothing to do until the log says more (or it is time to send
        // again: only while no load runs).
        let until = if ours_started || now.loading() {
            deadline
        } else {
            resend_at.min(deadline)
        };
        match tokio::time::timeout_at(until, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(WaitError::NotDone("the managed clamd is gone".into())),
            Err(_) if until == deadline => {
                return Err(WaitError::NotDone(format!(
                    "clamd did not finish loading within {RELOAD_TIMEOUT:?}"
                )))
            }
            Err(_) => {}
        }
    }
}

/// Polls VERSION until it differs from `before`; false after
/// [`EXTERNAL_SETTLE`].
async fn wait_for_new_version(
    backend: &Backend,
    before: Option<&Version>,
    timeouts: Timeouts,
) -> bool {
    let deadline = Instant::now() + EXTERNAL_SETTLE;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = async {
            Connection::connect(&backend.address, timeouts)
                .await?
                .version()
                .await
        }
        .await;
        if let Ok(now) = now {
            if Some(&now) != before {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn status(age: Option<Duration>) -> BackendStatus {
        BackendStatus {
            address: "unix:/x".into(),
            health: Health::Up,
            version: None,
            in_flight: 0,
            max_concurrent: 1,
            scans: 0,
            failures: 0,
            error_replies: 0,
            last_probe: None,
            probe_signature: None,
            database_time: age.map(|a| SystemTime::now() - a),
            dated_by: age.map(|_| clamd::DatabaseDating::Version),
            draining: false,
            fd_passing: true,
        }
    }

    #[test]
    fn stale_backends_are_warned_about_once_an_hour() {
        let day = Duration::from_secs(86_400);
        let max = Some(3 * day);
        let stale = [status(Some(4 * day))];
        let mut w = StaleWarnings::default();
        let t0 = Instant::now();
        assert_eq!(w.check(&stale, max, t0).0.len(), 1, "at once");
        assert!(w.check(&stale, max, t0 + CHECK_EVERY).0.is_empty());
        assert!(w.check(&stale, max, t0 + WARN_EVERY / 2).0.is_empty());
        assert_eq!(
            w.check(&stale, max, t0 + WARN_EVERY).0.len(),
            1,
            "an hour later"
        );
        let fresh = [status(Some(day))];
        let (warn, back) = w.check(&fresh, max, t0 + WARN_EVERY * 2);
        assert!(warn.is_empty());
        assert_eq!(back, ["unix:/x"], "said once when fresh again");
        assert!(w.check(&fresh, max, t0 + WARN_EVERY * 3).1.is_empty());
        // A backend that is down is not judged.
        let mut down = status(Some(4 * day));
        down.health = Health::Down("gone".into());
        assert!(w.check(&[down], max, t0).0.is_empty());
    }

    #[test]
    fn staleness_needs_a_known_age_and_a_limit() {
        let day = Duration::from_secs(86_400);
        let three_days = Some(3 * day);
        assert!(!is_stale(&status(Some(day)), three_days));
        assert!(is_stale(&status(Some(4 * day)), three_days));
        assert!(!is_stale(&status(Some(4 * day)), None), "no limit");
        assert!(!is_stale(&status(None), three_days), "unknown age");
    }
}
