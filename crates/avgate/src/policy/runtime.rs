//! The policy of a running server.
//!
//! Two tasks ([`Policy::run`]):
//! - the **refresher** publishes a new [`Snapshot`] when the store's policy
//!   version changed (checked every `policy.refresh_interval`, so changes
//!   made with the CLI or by another host arrive within seconds), when an
//!   entry expires, on SIGHUP, and at once after a change through the
//!   admin API ([`Policy::refresh`]). Scans read the newest snapshot when
//!   they decide their verdict.
//! - the **applier** (managed clamd only) turns each snapshot into the
//!   database files of [`super::clamd`] and, when they changed, reloads
//!   clamd ([`crate::signatures::Signatures::reload`], which waits until
//!   clamd has loaded them and passes its probe again). Until then the
//!   check after the scan keeps a newly ignored finding FOUND, and a file
//!   whose allow entry was removed, which clamd still calls clean, gets
//!   no verdict ([`Policy::clamd_may_allow`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::clamd::{self as files, Files};
use super::{ClamdMode, PolicyRecord, Snapshot};
use crate::config::Config;
use crate::managed::ManagedClamd;
use crate::signatures::Signatures;
use crate::store::{clock, Store, StoreError};

/// Wait before trying again after clamd could not be given the files.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// What the managed clamd has loaded of the policy, for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct ClamdStatus {
    /// `managed`: ignores are applied inside clamd; `external`: they cannot
    /// be (see `policy.ignore_after_scan`).
    pub mode: &'static str,
    /// `applied`, `pending` (written, reload in progress), `failed`
    /// (retried), or `after_scan_only` (external).
    pub state: &'static str,
    /// The store's policy version that clamd's files reflect.
    pub applied_version: Option<u64>,
    pub ignored: usize,
    pub allowed: usize,
    pub applied_at: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    ignore_after_scan: bool,
    refresh_interval: Duration,
}

impl Settings {
    fn of(config: &Config) -> Settings {
        Settings {
            ignore_after_scan: config.policy.ignore_after_scan,
            refresh_interval: config
                .policy
                .refresh_interval
                .0
                .max(Duration::from_millis(50)),
        }
    }
}

/// The store's entries as of a version.
#[derive(Default)]
struct Cache {
    version: Option<u64>,
    records: Arc<Vec<PolicyRecord>>,
}

struct Target {
    managed: Arc<ManagedClamd>,
    signatures: Arc<Signatures>,
}

pub struct Policy {
    store: Arc<dyn Store>,
    mode: ClamdMode,
    settings: Mutex<Settings>,
    current: watch::Sender<Arc<Snapshot>>,
    /// Serializes refreshes (the refresher, admin API calls).
    cache: tokio::sync::Mutex<Cache>,
    wake: Notify,
    target: Option<Target>,
    clamd: Mutex<ClamdStatus>,
    /// The files the managed clamd was last given, and their version.
    written: Mutex<Option<(Files, u64)>>,
    /// The sha256s the managed clamd has loaded as allowed, or may load at
    /// any moment (written since, a reload or a restart away): see
    /// [`Policy::clamd_may_allow`].
    clamd_allows: Mutex<Arc<HashSet<String>>>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Reads the policy from the store and, with a managed clamd, writes
    /// its files: call before clamd starts, which then loads them.
    pub async fn start(
        store: Arc<dyn Store>,
        config: &Config,
        managed: Option<Arc<ManagedClamd>>,
        signatures: Arc<Signatures>,
    ) -> anyhow::Result<Arc<Policy>> {
        let settings = Settings::of(config);
        let mode = match managed {
            Some(_) => ClamdMode::Managed,
            None => ClamdMode::External,
        };
        let policy = Arc::new(Policy {
            store,
            mode,
            settings: Mutex::new(settings),
            current: watch::channel(Arc::new(Snapshot::empty(mode, settings.ignore_after_scan))).0,
            cache: tokio::sync::Mutex::new(Cache::default()),
            wake: Notify::new(),
            target: managed.map(|managed| Target {
                managed,
                signatures,
            }),
            clamd: Mutex::new(ClamdStatus {
                mode: match mode {
                    ClamdMode::Managed => "managed",
                    ClamdMode::External => "external",
                },
                state: match mode {
                    ClamdMode::Managed => "pending",
                    ClamdMode::External => "after_scan_only",
                },
                applied_version: None,
                ignored: 0,
                allowed: 0,
                applied_at: None,
                error: None,
            }),
            written: Mutex::new(None),
            clamd_allows: Mutex::new(Arc::new(HashSet::new())),
        });
        policy.refresh().await?;
        let snapshot = policy.snapshot();
        if let Some(target) = &policy.target {
            let rendered = Files::render(&snapshot, clock::now());
            let managed = target.managed.clone();
            let to_write = rendered.clone();
            tokio::task::spawn_blocking(move || {
                files::write(managed.as_ref(), &to_write)?;
                // clamd loads these files when it starts: recorded as
                // loaded, so that the database watcher does not reload
                // clamd for them once more.
                managed.sync_database().map(drop)
            })
            .await??;
            policy.record_applied(rendered, snapshot.version);
        }
        if mode == ClamdMode::External
            && !snapshot
                .entries(super::Kind::Ignore, clock::now())
                .is_empty()
        {
            tracing::warn!(
                ignore_after_scan = settings.ignore_after_scan,
                "the ignore list cannot be applied inside an external clamd: {}",
                if settings.ignore_after_scan {
                    "ignored findings are answered OK after the scan (policy.ignore_after_scan), \
                     and a second signature on such a file goes unseen"
                } else {
                    "ignored findings stay FOUND (set policy.ignore_after_scan = true to accept the risk)"
                }
            );
        }
        Ok(policy)
    }

    /// The policy in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.borrow().clone()
    }

    /// Whether the managed clamd may call this file clean because of an
    /// allow entry it still has loaded. An allow entry that is removed (or
    /// expires) leaves the snapshot at once, but clamd's `.sfp` only with
    /// the next successful reload: meanwhile clamd answers OK for that
    /// hash, and that OK is not a verdict (see the scan pipeline).
    pub fn clamd_may_allow(&self, sha256: &str) -> bool {
        self.clamd_allows().is_some_and(|a| a.contains(sha256))
    }

    /// The hashes of [`Policy::clamd_may_allow`] as they are now (managed
    /// clamd only). A scan takes them when it starts: clamd reloads with
    /// the old engine serving the scans already running, so a hash dropped
    /// by a reload during a scan still counts for that scan.
    pub fn clamd_allows(&self) -> Option<Arc<HashSet<String>>> {
        self.target.as_ref()?;
        Some(
            self.clamd_allows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    pub fn clamd_status(&self) -> ClamdStatus {
        self.clamd.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the store again if its policy version moved, and publishes the
    /// entries in force now. True when the policy in force changed.
    pub async fn refresh(&self) -> Result<bool, StoreError> {
        let mut cache = self.cache.lock().await;
        let version = self.store.policy_version().await?;
        if cache.version != Some(version) {
            cache.records = Arc::new(self.store.list_policy().await?);
            cache.version = Some(version);
        }
        let settings = *self.settings.lock().unwrap_or_else(|e| e.into_inner());
        let next = Snapshot::build(
            &cache.records,
            version,
            clock::now(),
            self.mode,
            settings.ignore_after_scan,
        );
        let changed = self.current.send_if_modified(|current| {
            let same = current.ids() == next.ids()
                && current.ignore_after_scan == next.ignore_after_scan
                && current.version == next.version;
            if !same {
                tracing::info!(
                    version = next.version,
                    ignore = next.entries(super::Kind::Ignore, clock::now()).len(),
                    allow = next.entries(super::Kind::Allow, clock::now()).len(),
                    block = next.entries(super::Kind::Block, clock::now()).len(),
                    "policy in force"
                );
                *current = Arc::new(next);
            }
            !same
        });
        Ok(changed)
    }

    /// Asks the refresher to look at the store now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs the refresher and, with a managed clamd, the applier, until
    /// `stop`. `config` changes on SIGHUP: the settings are taken again and
    /// the store is read.
    pub async fn run(
        self: Arc<Self>,
        config: watch::Receiver<Arc<Config>>,
        stop: CancellationToken,
    ) {
        let refresher = self.clone().refresher(config, stop.clone());
        let applier = self.clone().applier(stop);
        tokio::join!(refresher, applier);
    }

    async fn refresher(
        self: Arc<Self>,
        config: watch::Receiver<Arc<Config>>,
        stop: CancellationToken,
    ) {
        let mut config = Some(config);
        let mut failing = false;
        loop {
            let interval = self
                .settings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refresh_interval;
            let until_expiry = self.snapshot().next_expiry().map(|t| {
                Duration::from_secs((t - clock::now()).max(0) as u64) + Duration::from_millis(20)
            });
            let wait = until_expiry.map_or(interval, |e| e.min(interval));
            let reconfigured = async {
                match config.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                ok = reconfigured => {
                    match config.as_mut().filter(|_| ok) {
                        Some(rx) => {
                            let settings = Settings::of(&rx.borrow_and_update());
                            *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = settings;
                            tracing::info!(
                                ignore_after_scan = settings.ignore_after_scan,
                                refresh_interval_ms = settings.refresh_interval.as_millis() as u64,
                                "SIGHUP: policy settings taken again, policy re-read"
                            );
                        }
                        // No more SIGHUPs (the reloader is gone): poll on.
                        None => config = None,
                    }
                }
            }
            match self.refresh().await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("the policy can be read from the store again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::error!(error = %e, "cannot read the policy from the store; the last one read stays in force");
                }
                Err(_) => {}
            }
        }
    }

    /// Gives the managed clamd each new policy (files, then a reload).
    async fn applier(self: Arc<Self>, stop: CancellationToken) {
        let Some(target) = &self.target else {
            return;
        };
        let mut snapshots = self.current.subscribe();
        let mut retry: Option<tokio::time::Instant> = None;
        // The files on disk differ from what clamd is known to have loaded.
        let mut dirty = false;
        loop {
            let retry_wait = async {
                match retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = snapshots.changed() => if changed.is_err() { return },
                _ = retry_wait => {}
            }
            let snapshot = snapshots.borrow_and_update().clone();
            let rendered = Files::render(&snapshot, clock::now());
            let written = self
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if !dirty && written.as_ref().is_some_and(|(f, _)| *f == rendered) {
                // Same files (e.g. only a block entry changed): nothing for clamd.
                self.update_clamd(|s| {
                    if s.state == "applied" {
                        s.applied_version = Some(snapshot.version);
                    }
                });
                continue;
            }
            retry = None;
            dirty = true;
            self.update_clamd(|s| s.state = "pending");
            // From the write on, clamd may load these (a restart is enough);
            // the ones it has stay until a reload is known to be done.
            {
                let mut allows = self.clamd_allows.lock().unwrap_or_else(|e| e.into_inner());
                let mut more = (**allows).clone();
                more.extend(rendered.allowed_hashes().map(str::to_owned));
                *allows = Arc::new(more);
            }
            let managed = target.managed.clone();
            let to_write = rendered.clone();
            let write =
                tokio::task::spawn_blocking(move || files::write(managed.as_ref(), &to_write))
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")));
            if let Err(e) = write {
                tracing::error!(error = %format!("{e:#}"), "cannot write the policy files of the managed clamd; retrying");
                self.update_clamd(|s| {
                    s.state = "failed";
                    s.error = Some(format!("{e:#}"));
                });
                retry = Some(tokio::time::Instant::now() + RETRY_AFTER);
                continue;
            }
            let report = tokio::select! {
                report = target.signatures.reload("policy") => report,
                _ = stop.cancelled() => return,
            };
            let socket = target.managed.address().to_string();
            let outcome = report.backends.iter().find(|b| b.backend == socket);
            match outcome {
                Some(b) if b.outcome != "failed" => {
                    tracing::info!(
                        version = snapshot.version,
                        ignored = rendered.ignored_count(),
                        allowed = rendered.allowed_count(),
                        took_ms = b.finished_ms - b.started_ms,
                        "the managed clamd applies the policy"
                    );
                    self.record_applied(rendered, snapshot.version);
                    dirty = false;
                }
                other => {
                    let why = other
                        .and_then(|b| b.detail.clone())
                        .or(report.error.clone())
                        .unwrap_or_else(|| "the managed clamd was not reloaded".into());
                    tracing::error!(error = %why, "the managed clamd did not take the new policy; new ignores wait (their findings stay FOUND), removed ignores still hide their signature, and files whose allow entry was removed get 503 policy_pending; retrying");
                    self.update_clamd(|s| {
                        s.state = "failed";
                        s.error = Some(why);
                    });
                    retry = Some(tokio::time::Instant::now() + RETRY_AFTER);
                }
            }
        }
    }

    fn record_applied(&self, files: Files, version: u64) {
        self.update_clamd(|s| {
            s.state = "applied";
            s.applied_version = Some(version);
            s.ignored = files.ignored_count();
            s.allowed = files.allowed_count();
            s.applied_at = Some(clock::rfc3339(clock::now()));
            s.error = None;
        });
        *self.clamd_allows.lock().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(files.allowed_hashes().map(str::to_owned).collect());
        *self.written.lock().unwrap_or_else(|e| e.into_inner()) = Some((files, version));
    }

    fn update_clamd(&self, f: impl FnOnce(&mut ClamdStatus)) {
        f(&mut self.clamd.lock().unwrap_or_else(|e| e.into_inner()));
    }
}
