//! The managed clamd: with no `--clamd`, avgate runs its own.
//!
//! avgate writes a clamd.conf into its data directory (limits aligned with
//! its own, `AlertExceedsMax yes`, a Unix socket), runs clamd in the
//! foreground as a child, restarts it with back-off when it dies and stops
//! it on shutdown. clamd keeps parsing hostile files in its own process.
//!
//! - [`database`]: the database directory avgate owns (links to the
//!   official files, test signatures, avgate's own files).
//! - [`updates`]: freshclam on a schedule, or following the system's.
//!
//! Reloads (one backend at a time, waiting until each is ready again) are
//! driven by [`crate::signatures`]; this module tells it when the managed
//! clamd has started and finished loads ([`ClamdLog`]).

pub mod database;
pub mod updates;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{ByteSize, Config};
use database::{create_private_dir, DatabaseLayout, Fingerprint, SyncReport};
use updates::{UpdateMode, UpdatesStatus};

/// Where freshclam keeps the official database on Debian and Ubuntu.
pub const SYSTEM_DATABASE: &str = "/var/lib/clamav";

/// Which signatures the engine runs with, for /version and the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    /// freshclam's official database.
    Official,
    /// Only avgate's built-in test signatures: finds test files, not malware.
    TestSignaturesOnly,
    /// No official database, but custom signature files (from
    /// `managed.database_dir` or avgate's freshclam), next to the test
    /// signatures.
    Custom,
    /// External clamd backends: their database is theirs.
    External,
}

impl DatabaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DatabaseKind::Official => "official",
            DatabaseKind::TestSignaturesOnly => "test-signatures-only",
            DatabaseKind::Custom => "custom",
            DatabaseKind::External => "external",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ManagedStatus {
    /// `starting`, `running`, `restarting`, `stopped`.
    pub state: &'static str,
    pub pid: Option<u32>,
    pub restarts: u64,
    pub last_exit: Option<String>,
    pub config: String,
    /// clamd's DatabaseDirectory (avgate's own; see [`database`]).
    pub database_dir: String,
    pub database: &'static str,
    /// Where the official database is linked from, if there is one.
    pub database_source: Option<String>,
    /// Signatures clamd reported after its last reload.
    pub signatures: Option<u64>,
    pub updates: UpdatesStatus,
}

/// How one database load of the managed clamd ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// `Activating the newly loaded database...`, after `Database
    /// correctly reloaded (N signatures)`. Only from then on do scans use
    /// the new engine, and is a new RELOAD heard: one that clamd reads
    /// between the two lines is dropped (clamd 1.4 clears its reload flag
    /// when it activates the engine).
    Loaded { signatures: u64 },
    /// `Database reload failed, keeping the previous instance`, with the
    /// error clamd gave before it.
    Failed(String),
}

/// Loads counted from clamd's log. clamd runs one load at a time, so the
/// n-th load to end is the n-th that started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadCounts {
    /// clamd processes started: a new one loads the directory as it is.
    pub processes: u64,
    /// `Reading databases from` lines: loads started, by avgate's
    /// RELOAD or anyone else's (`clamdscan --reload`, SIGUSR2). The line
    /// comes at once after a RELOAD clamd took; a RELOAD that comes during
    /// a load does not start another.
    pub started: u64,
    /// Loads that ended, either way.
    pub ended: u64,
}

impl LoadCounts {
    /// A load is running (one that a clamd which died left unfinished
    /// does not count: a new process starts with none).
    pub fn loading(&self) -> bool {
        self.started > self.ended
    }
}

/// What the running clamd's log lines tell (its stdout and stderr, read in
/// order from one pipe), for the supervisor and for reloads.
pub struct ClamdLog {
    counts: Mutex<LoadCounts>,
    /// How the last loads ended, by number (1 = the first to end).
    outcomes: Mutex<std::collections::VecDeque<(u64, LoadOutcome)>>,
    /// Bumped at every change of the counts: wakes whoever waits.
    changed: watch::Sender<()>,
    /// The last error lines (the file it cannot load, say), for
    /// `last_exit` when it dies.
    last_problem: Mutex<Option<String>>,
}

/// Outcomes kept: far more than loads that can end while one reload waits.
const OUTCOMES_KEPT: usize = 64;

impl ClamdLog {
    fn new() -> Self {
        ClamdLog {
            counts: Mutex::new(LoadCounts::default()),
            outcomes: Mutex::new(std::collections::VecDeque::new()),
            changed: watch::channel(()).0,
            last_problem: Mutex::new(None),
        }
    }

    /// Wakes on every change of [`ClamdLog::counts`]: subscribe before
    /// reading them.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    pub fn counts(&self) -> LoadCounts {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How load number `load` ended, if it has (and is recent).
    pub fn outcome(&self, load: u64) -> Option<LoadOutcome> {
        self.outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(n, _)| *n == load)
            .map(|(_, o)| o.clone())
    }

    fn update(&self, f: impl FnOnce(&mut LoadCounts)) {
        f(&mut self.counts.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.send_replace(());
    }

    fn process_started(&self) {
        self.update(|c| {
            c.processes += 1;
            c.ended = c.ended.max(c.started);
        });
    }

    fn load_started(&self) {
        self.update(|c| c.started += 1);
    }

    fn load_ended(&self, outcome: LoadOutcome) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.ended += 1;
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        outcomes.push_back((counts.ended, outcome));
        if outcomes.len() > OUTCOMES_KEPT {
            outcomes.pop_front();
        }
        drop((outcomes, counts));
        self.changed.send_replace(());
    }

    fn take_problem(&self) -> Option<String> {
        self.last_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// A prepared (configured, not yet started) managed clamd.
pub struct ManagedClamd {
    executable: PathBuf,
    /// Runs clamd so that it gets SIGTERM when avgate dies ([`find_setpriv`]).
    setpriv: Option<PathBuf>,
    config_path: PathBuf,
    pid_path: PathBuf,
    pub socket: PathBuf,
    /// StreamMaxLength written into its config.
    pub stream_max_length: u64,
    pub max_threads: usize,
    /// clamd's TemporaryDirectory: emptied at every start of clamd,
    /// removed at stop.
    temp_dir: PathBuf,
    /// The lock on `temp_dir` (see [`TempDir`]).
    temp_lock: Mutex<Option<std::fs::File>>,
    /// The lock on the data directory's `clamd/`, held for the process's
    /// life: one avgate per data directory.
    _instance_lock: std::fs::File,
    backoff_max: Duration,
    layout: DatabaseLayout,
    update_mode: UpdateMode,
    /// The database directory's kind and source as of the last sync.
    synced_kind: Mutex<(DatabaseKind, Option<String>)>,
    /// What clamd has loaded: the synced kind, taken over when clamd
    /// starts or confirms a reload. A reload clamd refuses leaves it.
    loaded_kind: Mutex<(DatabaseKind, Option<String>)>,
    /// The database files as of the last sync: a difference means reload.
    /// The files' state clamd was last given, `None` when a reload did not
    /// reach it (see [`ManagedClamd::reload_missed`]).
    synced: Mutex<Option<Fingerprint>>,
    /// One sync of the directory at a time (a reload's and a start's could
    /// meet: both would create and remove the same links).
    syncing: Mutex<()>,
    log: Arc<ClamdLog>,
    status: Mutex<ManagedStatus>,
}

impl ManagedClamd {
    /// Finds clamd, sets up the database directory and writes clamd.conf
    /// (and freshclam.conf when avgate runs freshclam).
    pub fn prepare(config: &Config) -> anyhow::Result<ManagedClamd> {
        let executable = find_clamd(config.managed.clamd_path.as_deref())?;
        let dir = config.data_dir.join("clamd");
        create_private_dir(&config.data_dir)?;
        create_private_dir(&dir)?;
        // Before anything here is touched: a second avgate on the same data
        // directory would rewrite clamd.conf, empty the first one's
        // temporary directory and kill its clamd as "left over".
        let instance_lock = lock_file(&dir.join("avgate.lock")).map_err(|e| match e {
            LockError::Held => anyhow::anyhow!(
                "another avgate is running with the data directory {}; give each avgate its own --data-dir",
                config.data_dir.display()
            ),
            LockError::Io(e) => anyhow::anyhow!("cannot lock {}: {e}", dir.join("avgate.lock").display()),
        })?;

        warn_about_apparmor(&executable, &config.data_dir);
        let update_mode = updates::decide(config, &dir)?;
        let layout = DatabaseLayout {
            dir: dir.join("db"),
            freshclam_dir: match &update_mode {
                UpdateMode::Freshclam(f) => Some(f.dir.clone()),
                UpdateMode::Follow { .. } => None,
            },
            system_dir: config
                .managed
                .database_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(SYSTEM_DATABASE)),
            configured: config.managed.database_dir.is_some(),
        };
        if layout.configured && !layout.system_dir.is_dir() {
            bail!(
                "managed.database_dir {} is not a directory",
                layout.system_dir.display()
            );
        }
        // Earlier versions kept the test signatures here.
        let _ = std::fs::remove_dir_all(dir.join("test-db"));
        layout.reset_test_signatures();
        let report = layout.sync()?;
        announce_database(&report, &layout, &update_mode);
        let database_dir = layout.dir.clone();
        let database = report.kind;
        let source = report
            .official_source
            .as_ref()
            .map(|p| p.display().to_string());
        let socket = dir.join("clamd.sock");
        // sun_path is 108 bytes on Linux, including the NUL.
        if socket.as_os_str().len() > 100 {
            bail!(
                "the data directory path is too long for a Unix socket ({}); choose a shorter --data-dir",
                socket.display()
            );
        }
        let stream_max_length = (config.max_size.0 + 1024 * 1024).min(4_000_000_000);
        // clamd spools each stream to a temporary file: keep those in our
        // private directory, and clear what a killed clamd left behind.
        let tmp = temp_dir(config, &dir);
        let temp_lock = make_temp_dir(&tmp)?;
        warn_if_temp_space_short(&tmp, stream_max_length, config.managed.max_threads);
        let conf = clamd_conf(
            config,
            &socket,
            &dir.join("clamd.pid"),
            &database_dir,
            &tmp,
            stream_max_length,
        );
        let config_path = dir.join("clamd.conf");
        std::fs::write(&config_path, conf)
            .with_context(|| format!("cannot write {}", config_path.display()))?;

        let status = ManagedStatus {
            state: "starting",
            pid: None,
            restarts: 0,
            last_exit: None,
            config: config_path.display().to_string(),
            database_dir: database_dir.display().to_string(),
            database: database.as_str(),
            database_source: report
                .official_source
                .as_ref()
                .map(|p| p.display().to_string()),
            signatures: None,
            updates: update_mode.initial_status(),
        };
        Ok(ManagedClamd {
            executable,
            setpriv: find_setpriv(),
            pid_path: dir.join("clamd.pid"),
            socket,
            stream_max_length,
            max_threads: config.managed.max_threads,
            temp_dir: tmp,
            temp_lock: Mutex::new(Some(temp_lock)),
            _instance_lock: instance_lock,
            backoff_max: config.managed.restart_backoff_max.0,
            synced: Mutex::new(Some(layout.fingerprint())),
            syncing: Mutex::new(()),
            layout,
            update_mode,
            synced_kind: Mutex::new((database, source.clone())),
            loaded_kind: Mutex::new((database, source)),
            log: Arc::new(ClamdLog::new()),
            status: Mutex::new(status),
            config_path,
        })
    }

    /// Room left for clamd's temporary files (for the metrics).
    pub fn temp_space(&self) -> Option<Space> {
        space(&self.temp_dir)
    }

    pub fn status(&self) -> ManagedStatus {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        status.updates.reload_owed = self.reload_owed();
        status
    }

    fn update(&self, f: impl FnOnce(&mut ManagedStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Which signatures clamd runs with: as of its start or its last
    /// reload that it confirmed.
    pub fn database(&self) -> DatabaseKind {
        self.loaded_kind.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// clamd has loaded the directory as last synced (it started, or
    /// confirmed a reload).
    fn database_loaded(&self) {
        let synced = self
            .synced_kind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.update(|s| {
            s.database = synced.0.as_str();
            s.database_source = synced.1.clone();
        });
        *self.loaded_kind.lock().unwrap_or_else(|e| e.into_inner()) = synced;
    }

    /// clamd's DatabaseDirectory, which avgate owns.
    pub fn database_dir(&self) -> &Path {
        &self.layout.dir
    }

    pub fn update_mode(&self) -> &UpdateMode {
        &self.update_mode
    }

    pub(crate) fn update_updates(&self, f: impl FnOnce(&mut UpdatesStatus)) {
        self.update(|s| f(&mut s.updates));
    }

    /// Records a reload clamd confirmed, with the signature count it
    /// reported: what it runs with is now the directory as last synced.
    pub(crate) fn record_signatures(&self, signatures: u64) {
        self.update(|s| s.signatures = Some(signatures));
        self.database_loaded();
    }

    /// Re-links the database directory to the current source files (see
    /// [`database`]). Call before reloading clamd.
    pub fn sync_database(&self) -> anyhow::Result<SyncReport> {
        let _one_at_a_time = self.syncing.lock().unwrap_or_else(|e| e.into_inner());
        // Read the files' state first: a change during the sync is then
        // seen again next time rather than lost.
        let fingerprint = self.layout.fingerprint();
        let report = self.layout.sync()?;
        let source = report
            .official_source
            .as_ref()
            .map(|p| p.display().to_string());
        let before = std::mem::replace(
            &mut *self.synced_kind.lock().unwrap_or_else(|e| e.into_inner()),
            (report.kind, source),
        )
        .0;
        if before != report.kind && report.kind == DatabaseKind::TestSignaturesOnly {
            // The official (or custom) database went away from its source:
            // clamd now detects test files only.
            tracing::error!(
                was = before.as_str(),
                now = report.kind.as_str(),
                "NO MALWARE SIGNATURES ANY MORE: the signature database is gone from its source \
                 (an unmounted managed.database_dir, a purged /var/lib/clamav?); clamd runs with \
                 avgate's test signatures only until it is back"
            );
        } else if before != report.kind {
            tracing::info!(
                was = before.as_str(),
                now = report.kind.as_str(),
                source = %report.official_source.as_ref().map_or("none".into(), |s| s.display().to_string()),
                "the managed clamd's signature database changed kind"
            );
        }
        *self.synced.lock().unwrap_or_else(|e| e.into_inner()) = Some(fingerprint);
        Ok(report)
    }

    /// clamd's address, as the pool knows the backend.
    pub fn address(&self) -> clamd::Address {
        clamd::Address::Unix(self.socket.clone())
    }

    /// [`ManagedClamd::sync_database`] off the async threads; a failure is
    /// logged here and returned.
    pub async fn resync(self: &Arc<Self>) -> anyhow::Result<SyncReport> {
        let this = self.clone();
        let synced = tokio::task::spawn_blocking(move || this.sync_database())
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")));
        if let Err(e) = &synced {
            tracing::error!(error = %format!("{e:#}"), "cannot update the managed database directory");
        }
        synced
    }

    /// The database files' state now.
    pub fn fingerprint(&self) -> Fingerprint {
        self.layout.fingerprint()
    }

    /// Whether the database files changed since the last sync.
    pub fn database_changed(&self) -> bool {
        let now = self.layout.fingerprint();
        *self.synced.lock().unwrap_or_else(|e| e.into_inner()) != Some(now)
    }

    /// A reload could not be sent to clamd (it was starting, restarting,
    /// or did not answer): the directory is synced but clamd may not have
    /// read it. A clamd that was starting may have loaded the directory
    /// just before the new files were linked in, so the reload is owed
    /// until one gets through: [`ManagedClamd::database_changed`] says so
    /// from now on.
    pub fn reload_missed(&self) {
        *self.synced.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether a reload is owed since one did not reach clamd.
    pub fn reload_owed(&self) -> bool {
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    /// Writes one of avgate's own files (`.ign2`, `.sfp`, extra signatures)
    /// into clamd's database directory. clamd uses it after the next reload
    /// ([`crate::signatures::Signatures::reload`]).
    pub fn write_local_file(&self, name: &str, contents: &[u8]) -> anyhow::Result<()> {
        self.layout.write_local_file(name, contents)
    }

    /// Removes one of avgate's own files; `false` when there was none.
    pub fn remove_local_file(&self, name: &str) -> anyhow::Result<bool> {
        self.layout.remove_local_file(name)
    }

    /// What clamd's log says about its loads and reloads.
    pub fn log(&self) -> &ClamdLog {
        &self.log
    }

    /// Runs clamd until `stop` is cancelled, restarting it when it exits.
    /// `on_exit` runs each time it exits on its own.
    pub async fn supervise(self: Arc<Self>, stop: CancellationToken, on_exit: impl Fn()) {
        const BACKOFF_START: Duration = Duration::from_millis(500);
        // A clamd that ran this long before dying is not crash-looping.
        const STABLE_AFTER: Duration = Duration::from_secs(60);
        let mut backoff = BACKOFF_START;
        loop {
            self.clean_up_stale().await;
            // What a clamd that died left there (spooled uploads) is
            // litter now; and a directory removed under it (by hand, by a
            // cleaner) would keep a new one from starting at all.
            if let Err(e) = self.renew_temp_dir() {
                tracing::error!(error = %e, "cannot make clamd's temporary directory");
            }
            // The directory as it is now: a clamd that starts loads the
            // newest files itself, and an update owed while it was down
            // needs no reload (nor a second engine's memory) once it is up.
            // (A failure is logged; clamd starts with the directory as it is.)
            let _ = self.resync().await;
            let started = Instant::now();
            let (mut child, forwarder) = match self.spawn() {
                Ok(spawned) => spawned,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start clamd");
                    self.update(|s| {
                        s.state = "restarting";
                        s.last_exit = Some(format!("{e:#}"));
                    });
                    if sleep_or_stop(backoff, &stop).await {
                        break;
                    }
                    backoff = (backoff * 2).min(self.backoff_max);
                    continue;
                }
            };
            let pid = child.id();
            tracing::info!(pid, config = %self.config_path.display(), "started clamd");
            self.update(|s| {
                s.state = "running";
                s.pid = pid;
            });
            let mut check = tokio::time::interval(TEMP_DIR_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            check.tick().await;
            let exit = loop {
                tokio::select! {
                    exit = child.wait() => break Some(exit),
                    _ = stop.cancelled() => break None,
                    _ = check.tick() => self.keep_temp_dir(),
                }
            };
            match exit {
                Some(exit) => {
                    let mut why = match exit {
                        Ok(status) => status.to_string(),
                        Err(e) => e.to_string(),
                    };
                    // What clamd said last is usually why (a signature
                    // file it cannot load): its last lines first.
                    let _ = tokio::time::timeout(Duration::from_secs(1), forwarder).await;
                    let problem = self.log.take_problem();
                    if let Some(problem) = problem {
                        why = format!("{why}; its last errors: {problem}");
                    }
                    tracing::error!(pid, exit = %why, "clamd exited; restarting");
                    on_exit();
                    if started.elapsed() > STABLE_AFTER {
                        backoff = BACKOFF_START;
                    }
                    self.update(|s| {
                        s.state = "restarting";
                        s.pid = None;
                        s.restarts += 1;
                        s.last_exit = Some(why);
                    });
                    if sleep_or_stop(backoff, &stop).await {
                        break;
                    }
                    backoff = (backoff * 2).min(self.backoff_max);
                }
                None => {
                    terminate(&mut child).await;
                    break;
                }
            }
        }
        // No litter in a shared directory such as /dev/shm.
        let _ = std::fs::remove_dir_all(&self.temp_dir);
        *self.temp_lock.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.update(|s| {
            s.state = "stopped";
            s.pid = None;
        });
        tracing::info!("managed clamd stopped");
    }

    /// Empties clamd's temporary directory (made anew, locked anew).
    fn renew_temp_dir(&self) -> anyhow::Result<()> {
        let mut held = self.temp_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Our own lock would make the directory look taken.
        *held = None;
        *held = Some(make_temp_dir(&self.temp_dir)?);
        Ok(())
    }

    /// Makes clamd's temporary directory again if it went away while
    /// clamd runs. Without it clamd 1.4 cannot make its per-scan
    /// directories, fails some scans in ways that can read as clean, and
    /// cannot start again. (Files it has open there are gone with it.)
    fn keep_temp_dir(&self) {
        if self.temp_dir.is_dir() {
            return;
        }
        tracing::error!(
            dir = %self.temp_dir.display(),
            "clamd's temporary directory was removed while clamd ran; making it again"
        );
        if let Err(e) = self.renew_temp_dir() {
            tracing::error!(error = %e, "cannot make clamd's temporary directory");
        }
    }

    /// Starts clamd, with a task that forwards its output to our log (it
    /// ends when clamd has exited and its output is read).
    fn spawn(&self) -> anyhow::Result<(Child, tokio::task::JoinHandle<()>)> {
        let mut command = match &self.setpriv {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "TERM", "--"]).arg(&self.executable);
                c
            }
            None => Command::new(&self.executable),
        };
        // stdout and stderr into one pipe, read by one task: clamd writes
        // a load's start (stdout) before its failure (stderr), and loads
        // are numbered by the order of those lines, which two pipes read
        // by two tasks could swap.
        let (output_w, output) = tokio::net::unix::pipe::pipe().context("cannot make a pipe")?;
        let output_w = output_w.into_blocking_fd().context("cannot make a pipe")?;
        command
            .arg("--config-file")
            .arg(&self.config_path)
            .arg("--foreground")
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                output_w.try_clone().context("cannot make a pipe")?,
            ))
            .stderr(Stdio::from(output_w))
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("cannot run {}", self.executable.display()))?;
        // Our copies of the pipe's writing end go with the command: the
        // reader then sees the end once clamd has exited.
        drop(command);
        // clamd's own log lines go into ours, tagged, so one log stream
        // tells the whole story.
        self.log.take_problem();
        let forwarder = tokio::spawn(forward_lines(output, self.log.clone()));
        // A new clamd loads the directory as it is (synced just before).
        self.database_loaded();
        self.log.process_started();
        Ok((child, forwarder))
    }

    /// A clamd left over from an avgate that was killed (SIGKILL leaves
    /// no chance to stop the child) would hold the socket: stop it.
    async fn clean_up_stale(&self) {
        if let Some(pid) = std::fs::read_to_string(&self.pid_path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            // Ours only: after a power loss the pid can belong to another
            // clamd (the host's clamav-daemon), started with another config.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let config = self.config_path.as_os_str().as_encoded_bytes();
            let ours = cmdline.split(|&b| b == 0).any(|arg| arg == config);
            if comm.trim() == "clamd" && ours {
                tracing::warn!(pid, "stopping a clamd left over from an earlier run");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let _ = std::fs::remove_file(&self.pid_path);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Warns when AppArmor will likely keep clamd out of avgate's data
/// directory: the clamav-daemon package confines `/usr/sbin/clamd` to its
/// own paths whoever starts it, and a confined clamd cannot read its
/// configuration or make its socket there (it then exits, and says so).
fn warn_about_apparmor(executable: &Path, data_dir: &Path) {
    let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|s| s.trim() == "Y");
    let profile = Path::new("/etc/apparmor.d/usr.sbin.clamd");
    let confined = enabled
        && std::fs::canonicalize(executable).is_ok_and(|e| e == Path::new("/usr/sbin/clamd"))
        && profile.exists()
        && !Path::new("/etc/apparmor.d/disable/usr.sbin.clamd").exists();
    if !confined {
        return;
    }
    let local = std::fs::read_to_string("/etc/apparmor.d/local/usr.sbin.clamd").unwrap_or_default();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if let Some(rules) = apparmor_rules_missing(data_dir, &local, home.as_deref()) {
        tracing::warn!(
            profile = %profile.display(),
            "AppArmor confines clamd to the ClamAV package's paths, and its rules do not \
             name avgate's data directory: the managed clamd will likely fail to start. \
             Add to /etc/apparmor.d/local/usr.sbin.clamd (and usr.bin.freshclam): {rules} \
             then run: apparmor_parser -r /etc/apparmor.d/usr.sbin.clamd \
             (scripts/setup.sh does this for the default data directories)"
        );
    }
}

/// The local AppArmor rules `data_dir` needs, unless `local` (the
/// profile's local overrides) has them: its own path, or, for the default
/// data directories, the rules scripts/setup.sh writes. /tmp is in the
/// package's profile already.
fn apparmor_rules_missing(data_dir: &Path, local: &str, home: Option<&Path>) -> Option<String> {
    let clamd_dir = data_dir.join("clamd");
    if data_dir.starts_with("/tmp") || local.contains(&format!("{}/", clamd_dir.display())) {
        return None;
    }
    let default = data_dir == Path::new("/var/lib/avgate")
        || home.is_some_and(|h| data_dir == h.join(".local/share/avgate"));
    if default && local.contains("@{HOME}/.local/share/avgate/clamd/") {
        return None;
    }
    let dir = clamd_dir.display();
    Some(format!("\"{dir}/ rw,\" and \"{dir}/** rwk,\""))
}

/// `setpriv` (util-linux, on every Debian and Ubuntu system) when it can
/// ask the kernel to send its child SIGTERM when avgate dies, however it
/// dies (SIGKILL, the OOM killer): avgate gets no chance to stop clamd
/// then, and an orphaned clamd would hold its memory (a gigabyte or more
/// with the official database) until the next start found it. avgate
/// itself has no unsafe code to make that call between fork and exec.
///
/// The signal comes when the *thread* that spawned the child ends: clamd
/// is spawned from the supervisor's task, on one of tokio's worker
/// threads, which live as long as the runtime (avgate never moves a
/// worker into the blocking pool, whose threads end when idle).
fn find_setpriv() -> Option<PathBuf> {
    let path = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| is_executable(p))?;
    let works = std::process::Command::new(&path)
        .args(["--pdeathsig", "TERM", "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    works.then_some(path)
}

async fn forward_lines(pipe: impl tokio::io::AsyncRead + Unpin, log: Arc<ClamdLog>) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    let mut last_error = String::new();
    // From `Database correctly reloaded (N signatures)`, for the
    // `Activating` line that follows it.
    let mut loaded = None;
    loop {
        buf.clear();
        // Bytes, not text: a line that is not UTF-8 (a file name) must not
        // stop the reading, or clamd would block once the pipe is full.
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match reload_line(line) {
            Some(ReloadLine::Loading) => {
                loaded = None;
                log.load_started();
            }
            Some(ReloadLine::Loaded { signatures }) => loaded = Some(signatures),
            Some(ReloadLine::Activating) => {
                if let Some(signatures) = loaded.take() {
                    // Errors before a reload that worked are not why it
                    // would exit later.
                    log.take_problem();
                    log.load_ended(LoadOutcome::Loaded { signatures });
                }
            }
            Some(ReloadLine::Failed) => log.load_ended(LoadOutcome::Failed(last_error.clone())),
            None if line.contains("ERROR") => last_error = line.to_owned(),
            None => {}
        }
        match clamd_line_level(line) {
            tracing::Level::WARN => {
                if line.contains("ERROR") || line.contains("LibClamAV Error") {
                    // The last few: libclamav says which file in one line
                    // and what is wrong with it in others.
                    let mut problem = log.last_problem.lock().unwrap_or_else(|e| e.into_inner());
                    let mut lines: Vec<&str> = problem
                        .as_deref()
                        .map_or(Vec::new(), |p| p.split(" / ").collect());
                    lines.push(line);
                    let keep = lines.len().saturating_sub(3);
                    *problem = Some(lines[keep..].join(" / "));
                }
                tracing::warn!(target: "clamd", "{line}")
            }
            tracing::Level::DEBUG => tracing::debug!(target: "clamd", "{line}"),
            _ => tracing::info!(target: "clamd", "{line}"),
        }
    }
}

/// How loud a line of clamd's own log is in ours.
fn clamd_line_level(line: &str) -> tracing::Level {
    // clamd's own lines say ERROR / WARNING; libclamav's say "LibClamAV
    // Error:" (the one that names a signature file it cannot load).
    if line.contains("ERROR")
        || line.contains("WARNING")
        || line.contains("LibClamAV Error")
        || line.contains("LibClamAV Warning")
    {
        tracing::Level::WARN
    } else if line.ends_with("FOUND") {
        // Per-scan detections (the readiness probe's too): avgate logs
        // every result itself, with more context.
        tracing::Level::DEBUG
    } else if line.starts_with("Limits:")
        || line.ends_with(" enabled.")
        || line.ends_with(" disabled.")
    {
        // clamd echoing its configuration, some 33 lines at every start
        // and reload: all of it is in the clamd.conf avgate wrote.
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    }
}

/// The lines of clamd's log (clamd 1.4) that mark a reload's steps.
#[derive(Debug, PartialEq, Eq)]
enum ReloadLine {
    /// `Reading databases from DIR` (the loading thread started).
    Loading,
    /// `Database correctly reloaded (N signatures)` (loaded, not in use).
    Loaded { signatures: u64 },
    /// `Activating the newly loaded database...` (in use).
    Activating,
    /// `Database reload failed, keeping the previous instance`, after the
    /// error lines.
    Failed,
}

fn reload_line(line: &str) -> Option<ReloadLine> {
    if line.starts_with("Reading databases from ") {
        return Some(ReloadLine::Loading);
    }
    if let Some(rest) = line.split("Database correctly reloaded (").nth(1) {
        let signatures = rest.split_whitespace().next()?.parse().ok()?;
        return Some(ReloadLine::Loaded { signatures });
    }
    if line.starts_with("Activating the newly loaded database") {
        return Some(ReloadLine::Activating);
    }
    line.contains("Database reload failed")
        .then_some(ReloadLine::Failed)
}

/// Sleeps, or returns true at once when asked to stop.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.cancelled() => true,
    }
}

/// SIGTERM, then SIGKILL if clamd has not exited after a few seconds.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_ok()
        {
            return;
        }
        tracing::warn!(pid, "clamd did not stop on SIGTERM; killing it");
    }
    let _ = child.kill().await;
}

/// A file that can be run: what `clamd_path` and `freshclam_path` must be.
pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The clamd to run: `managed.clamd_path`, else the first on PATH or in
/// /usr/sbin. Also what `check-config` checks.
pub(crate) fn find_clamd(configured: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = configured {
        if is_executable(path) {
            return Ok(path.to_owned());
        }
        bail!(
            "managed.clamd_path {} is not an executable file",
            path.display()
        );
    }
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path_dirs)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    for dir in candidates {
        let candidate = dir.join("clamd");
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    bail!(
        "clamd was not found (PATH, /usr/sbin): install it (apt-get install clamav-daemon) \
         or point avgate at a running clamd with --clamd unix:/run/clamav/clamd.ctl"
    )
}

/// Says at start-up which signatures clamd will run with, loudly when
/// they are only the test signatures.
fn announce_database(report: &SyncReport, layout: &DatabaseLayout, mode: &UpdateMode) {
    match report.kind {
        DatabaseKind::TestSignaturesOnly | DatabaseKind::Custom => {
            let next = match mode {
                UpdateMode::Freshclam(f) => format!(
                    "avgate runs freshclam ({}) shortly and then every {}, and switches to the official \
                     database as soon as it has one (freshclam needs to reach a mirror)",
                    f.executable.display(),
                    crate::config::Humantime(f.interval)
                ),
                UpdateMode::Follow { why } => format!(
                    "updates: {why}. Run `freshclam` (apt-get install clamav-freshclam): avgate switches \
                     to the official database when {} has one",
                    layout.system_dir.display()
                ),
            };
            tracing::warn!(
                database = %layout.dir.display(),
                kind = report.kind.as_str(),
                linked = %report.linked.join(","),
                "NO MALWARE SIGNATURES: no official ClamAV database yet, so clamd runs with avgate's \
                 test signatures (EICAR and clamav-testfiles) and any custom ones. It will not detect \
                 real malware. {next}."
            );
        }
        kind => tracing::info!(
            database = %layout.dir.display(),
            kind = kind.as_str(),
            source = %report.official_source.as_ref().map_or("none".into(), |s| s.display().to_string()),
            linked = %report.linked.join(","),
            "signature database"
        ),
    }
}

/// clamd's TemporaryDirectory: `<data_dir>/clamd/tmp`, or under
/// `managed.temp_dir` a directory named after the data directory, so that
/// two avgates sharing `/dev/shm` never clear each other's files at start.
fn temp_dir(config: &Config, clamd_dir: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    match &config.managed.temp_dir {
        None => clamd_dir.join("tmp"),
        Some(base) => {
            let data_dir =
                std::path::absolute(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
            let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
            base.join(format!("avgate-clamd-{}", hex::encode(&digest[..4])))
        }
    }
}

/// Empties clamd's temporary directory by making it anew. In a shared,
/// world-writable directory such as /dev/shm another user may have put a
/// symlink or a directory of theirs at this (predictable) name, to read
/// the uploads clamd spools: `remove_dir_all` removes a symlink, not its
/// target, and the directory is then created by us, never found.
///
/// The directory is locked (flock) while avgate uses it, and one that
/// another avgate holds is refused, not emptied: two avgates in containers
/// that share `/dev/shm` and have the same data directory path would
/// otherwise share it, and one would delete the files (and at its stop the
/// directory) of the other's clamd.
fn make_temp_dir(tmp: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::DirBuilderExt;
    if tmp.is_dir() && !tmp.is_symlink() {
        match lock_file(tmp) {
            Ok(_free) => {}
            Err(LockError::Held) => bail!(
                "clamd's temporary directory {} is in use by another avgate (the same data directory path with the same managed.temp_dir on a shared file system); give this one another managed.temp_dir or data_dir",
                tmp.display()
            ),
            Err(LockError::Io(_)) => {}
        }
    }
    let _ = std::fs::remove_dir_all(tmp);
    // A shared parent such as /dev/shm is world-writable by design: only
    // a missing one is made (private).
    if let Some(parent) = tmp.parent().filter(|p| !p.exists()) {
        create_private_dir(parent)?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(tmp)
        .with_context(|| {
            format!(
                "cannot create clamd's temporary directory {} (something there could not be removed)",
                tmp.display()
            )
        })?;
    lock_file(tmp).map_err(|e| match e {
        LockError::Held => anyhow::anyhow!(
            "{} was locked by another avgate as it was made",
            tmp.display()
        ),
        LockError::Io(e) => anyhow::anyhow!("cannot lock {}: {e}", tmp.display()),
    })
}

/// How often the supervisor checks that clamd's temporary directory is
/// still there.
const TEMP_DIR_CHECK: Duration = Duration::from_secs(2);

enum LockError {
    Held,
    Io(std::io::Error),
}

/// An exclusive, non-blocking flock on a file (created 0600 if missing) or
/// a directory; held while the returned handle is open. The kernel drops
/// it when the process ends, however it ends.
fn lock_file(path: &Path) -> Result<std::fs::File, LockError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = if path.is_dir() {
        std::fs::File::open(path)
    } else {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
    }
    .map_err(LockError::Io)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(LockError::Held),
        Err(e) => Err(LockError::Io(e.into())),
    }
}

/// Free and total bytes of the file system holding a directory.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    pub free: u64,
    pub size: u64,
}

fn space(dir: &Path) -> Option<Space> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(Space {
        free: stat.f_bavail.saturating_mul(stat.f_frsize),
        size: stat.f_blocks.saturating_mul(stat.f_frsize),
    })
}

/// A scan that does not fit in clamd's temporary directory fails (clamd
/// answers an error, avgate 503): say so at start rather than at the
/// first large upload. Typical case: Docker's 64 MiB `/dev/shm`.
fn warn_if_temp_space_short(tmp: &Path, stream_max: u64, threads: usize) {
    let Some(Space { free, .. }) = space(tmp) else {
        return;
    };
    let wanted = stream_max.saturating_mul(threads as u64);
    if free < wanted {
        tracing::warn!(
            dir = %tmp.display(),
            free_mib = free >> 20,
            wanted_mib = wanted >> 20,
            "clamd's temporary directory has less free space than {threads} streams of {} MiB \
             (MaxThreads, StreamMaxLength): scans that do not fit fail with 503 engine_error",
            stream_max >> 20
        );
    }
}

/// clamd.conf for the managed clamd. Every limit avgate relies on is set
/// explicitly: packaged defaults differ from upstream ones (`clamconf`).
fn clamd_conf(
    config: &Config,
    socket: &Path,
    pid: &Path,
    database: &Path,
    tmp: &Path,
    stream_max: u64,
) -> String {
    // clamd's size options are 32-bit on some builds; stay below 4 GiB.
    const CLAMD_MAX: u64 = 4_000_000_000;
    let stream_max = stream_max.min(CLAMD_MAX);
    // libclamav lowers a larger MaxFileSize to this (and warns); MaxScanSize
    // stays equal to it, see below.
    let file_max = crate::config::CLAMAV_MAX_FILE_SIZE;
    // MaxFileSize equals MaxScanSize on purpose. avgate enforces the upload
    // size itself; inside clamd, MaxFileSize also applies to each file
    // extracted from an archive, and clamd 1.4 skips the part of such a
    // member past MaxFileSize WITHOUT an alert even with AlertExceedsMax
    // (a zip holding 151 MiB of zeros and then EICAR came back OK). Going
    // past MaxScanSize is alerted, so the two limits must coincide.
    let scan_size = (config.max_size.0.saturating_mul(4)).clamp(400 << 20, file_max);
    let max_size = scan_size;
    // clamd must give up (and say so) before we stop waiting for it.
    let scan_timeout = config.clamd.scan_timeout.0;
    let max_scan_time = if scan_timeout > Duration::from_secs(20) {
        scan_timeout - Duration::from_secs(10)
    } else {
        scan_timeout * 4 / 5
    };
    // One thread more than avgate's slots for it: a health probe then
    // finds a free thread even when every slot is busy with long scans,
    // instead of queueing behind them and timing out.
    let threads = config.managed.max_threads + 1;
    format!(
        "# Written by avgate at each start: change avgate's configuration, not this file.\n\
         Foreground yes\n\
         LocalSocket {socket}\n\
         LocalSocketMode 660\n\
         FixStaleSocket yes\n\
         PidFile {pid}\n\
         DatabaseDirectory {database}\n\
         TemporaryDirectory {tmp}\n\
         LogTime no\n\
         LogClean no\n\
         LogVerbose no\n\
         MaxThreads {threads}\n\
         MaxQueue {queue}\n\
         MaxConnectionQueueLength 64\n\
         StreamMaxLength {stream_max}\n\
         MaxFileSize {max_size}\n\
         MaxScanSize {scan_size}\n\
         # Past these, clamd skips PCRE subsignatures (100M by default),\n\
         # normalized-HTML signatures (40M) and embedded executables (40M)\n\
         # silently. Script normalization (20M) and tag-less HTML (8M) stay:\n\
         # raised, they made every large file scan much slower.\n\
         PCREMaxFileSize {max_size}\n\
         MaxHTMLNormalize {max_size}\n\
         MaxEmbeddedPE {max_size}\n\
         MaxRecursion 17\n\
         MaxFiles 10000\n\
         MaxScanTime {scan_ms}\n\
         ReadTimeout {read_timeout}\n\
         CommandReadTimeout 30\n\
         SendBufTimeout 500\n\
         IdleTimeout 30\n\
         AlertExceedsMax yes\n\
         AlertEncrypted yes\n\
         DisableCache {cache}\n\
         ConcurrentDatabaseReload yes\n\
         # avgate reloads clamd itself, after re-linking the database directory.\n\
         SelfCheck 0\n",
        socket = socket.display(),
        pid = pid.display(),
        database = database.display(),
        tmp = tmp.display(),
        queue = threads * 4,
        scan_ms = max_scan_time.as_millis(),
        // A client that pauses is cut off by avgate's minimum upload rate;
        // clamd must not drop the stream first (that looks like a dead
        // backend).
        read_timeout = (config.clamd.io_timeout.0.as_secs())
            .max(config.min_upload_window.0.as_secs() * 2)
            .max(300),
        cache = if config.managed.disable_cache {
            "yes"
        } else {
            "no"
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    #[test]
    fn clamds_own_lines_keep_problems_loud_and_its_config_echo_quiet() {
        use tracing::Level;
        for (line, level) in [
            (
                "Limits: Global size limit set to 629145600 bytes.",
                Level::DEBUG,
            ),
            ("PDF support enabled.", Level::DEBUG),
            ("Self checking disabled.", Level::DEBUG),
            (
                "fd[10]: Eicar-Test-Signature(44d88612fea8a8f36de82e1278abb02f:68) FOUND",
                Level::DEBUG,
            ),
            ("Database correctly reloaded (4 signatures)", Level::INFO),
            ("--- Stopped at Thu Nov 26 12:01:53 2026", Level::INFO),
            (
                "WARNING: Database reload failed, keeping the previous instance",
                Level::WARN,
            ),
            ("ERROR: Can't open/parse the config file", Level::WARN),
            (
                "LibClamAV Error: Can't load /d/db/broken.ndb: Malformed database",
                Level::WARN,
            ),
            (
                "LibClamAV Error: Can't create temporary directory for scan: /d/tmp/x",
                Level::WARN,
            ),
            // A warning about a feature is still a warning.
            ("WARNING: Bytecode support disabled.", Level::WARN),
        ] {
            assert_eq!(clamd_line_level(line), level, "{line}");
        }
    }

    #[test]
    fn a_temporary_directory_another_avgate_holds_is_refused_not_emptied() {
        let base = tempfile::tempdir().unwrap();
        let tmp = base.path().join("avgate-clamd-0000");
        let theirs = make_temp_dir(&tmp).unwrap();
        std::fs::write(tmp.join("spooled"), "x").unwrap();
        let err = make_temp_dir(&tmp).unwrap_err();
        assert!(
            err.to_string().contains("in use by another avgate"),
            "{err}"
        );
        assert!(tmp.join("spooled").exists());
        // Once its holder is gone, it is taken over, emptied.
        drop(theirs);
        let _ours = make_temp_dir(&tmp).unwrap();
        assert!(!tmp.join("spooled").exists());
    }

    /// clamd.conf for `config` in `/d`, and a check for its lines.
    fn conf_in_d(config: &Config, stream_max: u64) -> String {
        clamd_conf(
            config,
            Path::new("/d/clamd.sock"),
            Path::new("/d/clamd.pid"),
            Path::new("/d/db"),
            Path::new("/d/tmp"),
            stream_max,
        )
    }

    fn assert_lines(conf: &str, lines: &[&str]) {
        for line in lines {
            assert!(
                conf.lines().any(|l| l == *line),
                "missing {line:?} in\n{conf}"
            );
        }
    }

    #[test]
    fn generated_conf_sets_fail_closed_options_and_limits() {
        let config = Config::load(None, vec![], &Overrides::default()).unwrap();
        let conf = conf_in_d(&config, config.max_size.0 + 1);
        assert_lines(
            &conf,
            &[
                "AlertExceedsMax yes",
                "AlertEncrypted yes",
                "LocalSocket /d/clamd.sock",
                "DatabaseDirectory /d/db",
                "MaxFileSize 629145600",
                "MaxScanSize 629145600",
                "PCREMaxFileSize 629145600",
                "MaxHTMLNormalize 629145600",
                "MaxEmbeddedPE 629145600",
                "TemporaryDirectory /d/tmp",
                "StreamMaxLength 157286401",
                "MaxThreads 9",
                "MaxScanTime 120000",
                "Foreground yes",
                "ConcurrentDatabaseReload yes",
                "SelfCheck 0",
            ],
        );
    }

    #[test]
    fn the_largest_max_size_gives_limits_clamav_keeps() {
        // 4 x 2047 MiB would be far past what libclamav scans: it would
        // lower MaxFileSize alone (with a warning) and the two limits would
        // no longer coincide.
        let mut config = Config::load(None, vec![], &Overrides::default()).unwrap();
        config.max_size = crate::config::ByteSize(2047 << 20);
        let conf = conf_in_d(&config, config.max_size.0 + 1024 * 1024);
        assert_lines(
            &conf,
            &[
                "MaxFileSize 2147483645",
                "MaxScanSize 2147483645",
                "StreamMaxLength 2147483648",
            ],
        );
    }

    #[test]
    fn test_signatures_are_embedded() {
        let all: String = database::TEST_SIGNATURES.iter().map(|(_, c)| *c).collect();
        assert!(all.contains("Eicar-Test-Signature"));
        assert!(all.contains("ClamAV-Test-File"));
    }

    #[test]
    fn reload_steps_are_read_from_clamds_log() {
        assert_eq!(
            reload_line("Reading databases from /d/db"),
            Some(ReloadLine::Loading)
        );
        assert_eq!(
            reload_line("Database correctly reloaded (8693621 signatures)"),
            Some(ReloadLine::Loaded {
                signatures: 8_693_621
            })
        );
        assert_eq!(
            reload_line("Activating the newly loaded database..."),
            Some(ReloadLine::Activating)
        );
        assert_eq!(
            reload_line("WARNING: Database reload failed, keeping the previous instance"),
            Some(ReloadLine::Failed)
        );
        assert_eq!(reload_line("SelfCheck: Database status OK."), None);
    }

    /// A load ends with `Activating`, not with `correctly reloaded` (scans
    /// still use the old engine then, and a RELOAD sent then is lost); a
    /// failure ends it with the error before it; a new clamd process
    /// leaves no load running.
    #[tokio::test]
    async fn loads_are_counted_from_clamds_log() {
        let log = Arc::new(ClamdLog::new());
        let (mut w, r) = tokio::io::duplex(4096);
        let forward = tokio::spawn(forward_lines(r, log.clone()));
        async fn step(w: &mut tokio::io::DuplexStream, log: &ClamdLog, line: &str) -> LoadCounts {
            use tokio::io::AsyncWriteExt;
            w.write_all(format!("{line}\n").as_bytes()).await.unwrap();
            // Give the forwarder the line, then look.
            tokio::time::sleep(Duration::from_millis(50)).await;
            log.counts()
        }
        let counts = |started, ended| LoadCounts {
            processes: 0,
            started,
            ended,
        };
        assert_eq!(
            step(&mut w, &log, "Reading databases from /d").await,
            counts(1, 0)
        );
        assert!(log.counts().loading());
        let loaded = "Database correctly reloaded (3 signatures)";
        assert_eq!(step(&mut w, &log, loaded).await, counts(1, 0));
        let activating = "Activating the newly loaded database...";
        assert_eq!(step(&mut w, &log, activating).await, counts(1, 1));
        assert_eq!(log.outcome(1), Some(LoadOutcome::Loaded { signatures: 3 }));
        step(&mut w, &log, "Reading databases from /d").await;
        let error = "ERROR: reload_th: Database load failed: Malformed database";
        step(&mut w, &log, error).await;
        let failed = "WARNING: Database reload failed, keeping the previous instance";
        assert_eq!(step(&mut w, &log, failed).await, counts(2, 2));
        assert_eq!(log.outcome(2), Some(LoadOutcome::Failed(error.into())));
        // A line that is not UTF-8 does not stop the reading.
        {
            use tokio::io::AsyncWriteExt;
            w.write_all(b"LibClamAV Warning: \xff\xfe.ndb\n")
                .await
                .unwrap();
        }
        // A clamd that dies mid-load: the next process has none running.
        step(&mut w, &log, "Reading databases from /d").await;
        assert!(log.counts().loading());
        log.process_started();
        assert!(!log.counts().loading());
        assert_eq!(log.counts().processes, 1);
        drop(w);
        forward.await.unwrap();
    }
}

/// Debian's clamd.conf, read to check an external clamd on this host.
pub const SYSTEM_CLAMD_CONF: &str = "/etc/clamav/clamd.conf";

/// What a local clamd.conf says about one backend, when it describes it.
#[derive(Debug, PartialEq, Eq)]
pub struct ExternalCheck {
    pub alert_exceeds_max: bool,
    /// `PCREMaxFileSize` in bytes (clamd's default when the file does not
    /// set it); `None` when it does not parse.
    pub pcre_max_file_size: Option<u64>,
    /// `StreamMaxLength`, `MaxFileSize` and `MaxScanSize` in bytes, each
    /// clamd's default when the file does not set it; `None` when it does
    /// not parse.
    pub size_limits: [(&'static str, Option<u64>); 3],
}

impl ExternalCheck {
    /// The size limits under which a file of `max_size` is not scanned, as
    /// `Name size` (0 is "no limit" for them).
    fn limits_below(&self, max_size: u64) -> Vec<String> {
        self.size_limits
            .iter()
            .filter_map(|(name, limit)| {
                limit
                    .filter(|&n| n > 0 && n < max_size)
                    .map(|n| format!("{name} {}", ByteSize(n)))
            })
            .collect()
    }
}

/// clamd's `PCREMaxFileSize` when its clamd.conf does not set it.
const CLAMD_DEFAULT_PCRE_MAX_FILE_SIZE: u64 = 100 << 20;

/// Reads `conf` and, if it configures the clamd at `address` (same
/// LocalSocket, or same TCPSocket port), reports what it sets that avgate
/// cannot see through the protocol. `None` when it cannot tell.
pub fn check_external_conf(address: &clamd::Address, conf: &str) -> Option<ExternalCheck> {
    let mut local_socket = None;
    let mut tcp_port = None;
    let mut alert = false;
    let mut pcre_max = Some(CLAMD_DEFAULT_PCRE_MAX_FILE_SIZE);
    // clamd's own defaults (Debian's generated clamd.conf sets 25M, 25M
    // and 100M).
    let mut size_limits = [
        ("StreamMaxLength", Some(100 << 20)),
        ("MaxFileSize", Some(100 << 20)),
        ("MaxScanSize", Some(400 << 20)),
    ];
    for line in conf.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next()) else {
            continue;
        };
        match key {
            "LocalSocket" => local_socket = Some(PathBuf::from(value)),
            "TCPSocket" => tcp_port = value.parse::<u16>().ok(),
            "AlertExceedsMax" => {
                alert = matches!(value.to_ascii_lowercase().as_str(), "yes" | "true" | "1")
            }
            // avgate's sizes use clamd.conf's units (K, M: 1024 multiples).
            "PCREMaxFileSize" => pcre_max = value.parse::<ByteSize>().ok().map(|s| s.0),
            _ => {
                if let Some((_, limit)) = size_limits.iter_mut().find(|(name, _)| *name == key) {
                    *limit = value.parse::<ByteSize>().ok().map(|s| s.0);
                }
            }
        }
    }
    let matches = match address {
        clamd::Address::Unix(path) => local_socket.is_some_and(|s| same_path(&s, path)),
        clamd::Address::Tcp(hostport) => {
            let port = hostport
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok());
            let local = hostport.starts_with("127.")
                || hostport.starts_with("localhost")
                || hostport.starts_with("[::1]");
            local && port.is_some() && port == tcp_port
        }
    };
    matches.then_some(ExternalCheck {
        alert_exceeds_max: alert,
        pcre_max_file_size: pcre_max,
        size_limits,
    })
}

/// Whether two paths name the same file: Debian's clamd.conf says
/// `/var/run/clamav/clamd.ctl`, the docs (and systemd) `/run/...`, and
/// `/var/run` is a link to `/run`. The same inode when both exist, else
/// the same path once the directories' links are resolved.
fn same_path(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if a == b {
        return true;
    }
    if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return (ma.dev(), ma.ino()) == (mb.dev(), mb.ino());
    }
    let resolved = |p: &Path| {
        let dir = std::fs::canonicalize(p.parent()?).ok()?;
        Some(dir.join(p.file_name()?))
    };
    matches!((resolved(a), resolved(b)), (Some(x), Some(y)) if x == y)
}

/// Warns at start-up when an external clamd on this host is known to
/// answer OK for files it did not fully scan, or to skip its PCRE
/// signatures on files avgate accepts (`max_size`).
pub fn warn_about_external_clamd(address: &clamd::Address, conf_path: &Path, max_size: u64) {
    let Ok(conf) = std::fs::read_to_string(conf_path) else {
        return;
    };
    let Some(check) = check_external_conf(address, &conf) else {
        return;
    };
    if !check.alert_exceeds_max {
        tracing::warn!(
            backend = %address,
            config = %conf_path.display(),
            "this clamd runs without `AlertExceedsMax yes`: it answers OK for files over its \
             MaxFileSize/MaxScanSize or scans past MaxScanTime without scanning them. \
             Set AlertExceedsMax yes (and AlertEncrypted yes) in its clamd.conf."
        );
    }
    let below = check.limits_below(max_size);
    if !below.is_empty() {
        tracing::warn!(
            backend = %address,
            config = %conf_path.display(),
            limits = %below.join(", "),
            max_size = %ByteSize(max_size).describe(),
            "this clamd's size limits are below avgate's max_size: files between them and \
             max_size come back unscannable (FOUND, Heuristics.Limits.Exceeded.* or \
             avgate.Limits.Exceeded.StreamMaxLength), never scanned. Raise StreamMaxLength, \
             MaxFileSize and MaxScanSize in its clamd.conf to max_size or more (and set \
             clamd.stream_max_length to its StreamMaxLength), or lower max_size."
        );
    }
    if let Some(pcre_max) = check.pcre_max_file_size.filter(|&n| n < max_size) {
        tracing::warn!(
            backend = %address,
            config = %conf_path.display(),
            pcre_max_file_size = pcre_max,
            max_size,
            "this clamd's PCREMaxFileSize is below avgate's max_size: it skips its PCRE \
             signatures on larger files without saying so. Set PCREMaxFileSize to its \
             MaxFileSize in its clamd.conf."
        );
    }
}

#[cfg(test)]
mod external_tests {
    use super::*;

    #[test]
    fn detects_a_local_clamd_without_alert_exceeds_max() {
        let conf = "# Debian\nLocalSocket /run/clamav/clamd.ctl\nAlertExceedsMax no\n";
        let unix: clamd::Address = "unix:/run/clamav/clamd.ctl".parse().unwrap();
        assert_eq!(
            check_external_conf(&unix, conf),
            Some(ExternalCheck {
                alert_exceeds_max: false,
                pcre_max_file_size: Some(100 << 20),
                size_limits: [
                    ("StreamMaxLength", Some(100 << 20)),
                    ("MaxFileSize", Some(100 << 20)),
                    ("MaxScanSize", Some(400 << 20)),
                ],
            })
        );
        let other: clamd::Address = "unix:/tmp/other.sock".parse().unwrap();
        assert_eq!(check_external_conf(&other, conf), None);
        // Debian's generated clamd.conf, with the alerts turned on.
        let conf = "TCPSocket 3310\nAlertExceedsMax yes\nPCREMaxFileSize 600M\n\
                    StreamMaxLength 25M\nMaxFileSize 25M\nMaxScanSize 100M\n";
        let tcp: clamd::Address = "tcp://127.0.0.1:3310".parse().unwrap();
        assert_eq!(
            check_external_conf(&tcp, conf),
            Some(ExternalCheck {
                alert_exceeds_max: true,
                pcre_max_file_size: Some(600 << 20),
                size_limits: [
                    ("StreamMaxLength", Some(25 << 20)),
                    ("MaxFileSize", Some(25 << 20)),
                    ("MaxScanSize", Some(100 << 20)),
                ],
            })
        );
        let debian = check_external_conf(&tcp, conf).unwrap();
        assert_eq!(
            debian.limits_below(150 << 20),
            [
                "StreamMaxLength 25MiB",
                "MaxFileSize 25MiB",
                "MaxScanSize 100MiB"
            ]
        );
        assert!(debian.limits_below(25 << 20).is_empty());
        let unlimited = "TCPSocket 3310\nStreamMaxLength 0\nMaxFileSize 0\nMaxScanSize 0\n";
        let unlimited = check_external_conf(&tcp, unlimited).unwrap();
        assert!(unlimited.limits_below(150 << 20).is_empty());
        let remote: clamd::Address = "tcp://10.0.0.5:3310".parse().unwrap();
        assert_eq!(check_external_conf(&remote, conf), None);
    }

    #[test]
    fn apparmor_rules_are_asked_for_unless_present() {
        let setup = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup.sh"),
        )
        .unwrap();
        let home = Path::new("/home/ops");
        let user_default = home.join(".local/share/avgate");
        // Nothing yet: the rules for the directory, by name.
        let wanted = apparmor_rules_missing(&user_default, "", Some(home)).unwrap();
        assert!(
            wanted.contains("/home/ops/.local/share/avgate/clamd/** rwk,"),
            "{wanted}"
        );
        // What scripts/setup.sh writes covers both default directories...
        assert_eq!(
            apparmor_rules_missing(&user_default, &setup, Some(home)),
            None
        );
        let service = Path::new("/var/lib/avgate");
        assert_eq!(apparmor_rules_missing(service, &setup, Some(home)), None);
        // ...not another one, which its own rules do.
        let other = Path::new("/srv/avgate");
        assert!(apparmor_rules_missing(other, &setup, Some(home)).is_some());
        let own = "/srv/avgate/clamd/ rw,\n/srv/avgate/clamd/** rwk,\n";
        assert_eq!(apparmor_rules_missing(other, own, Some(home)), None);
        // /tmp is the package's already.
        assert_eq!(apparmor_rules_missing(Path::new("/tmp/x"), "", None), None);
    }

    /// `/run` and `/var/run` (a link to it) are one directory.
    #[test]
    fn a_socket_path_through_a_linked_directory_is_the_same_clamd() {
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join("run");
        std::fs::create_dir_all(run.join("clamav")).unwrap();
        std::fs::create_dir(root.path().join("var")).unwrap();
        std::os::unix::fs::symlink(&run, root.path().join("var/run")).unwrap();
        let linked = root.path().join("var/run/clamav/clamd.ctl");
        let direct = run.join("clamav/clamd.ctl");
        let conf = format!("LocalSocket {}\n", linked.display());
        let address =
            |p: &Path| -> clamd::Address { format!("unix:{}", p.display()).parse().unwrap() };
        // The socket not there yet (clamd stopped), then there.
        assert!(check_external_conf(&address(&direct), &conf).is_some());
        std::fs::write(&direct, "").unwrap();
        assert!(check_external_conf(&address(&direct), &conf).is_some());
        let other = run.join("clamav/other.ctl");
        std::fs::write(&other, "").unwrap();
        assert_eq!(check_external_conf(&address(&other), &conf), None);
    }

    #[test]
    fn clamd_conf_sizes_parse_as_clamd_reads_them() {
        let size = |v: &str| v.parse::<ByteSize>().ok().map(|s| s.0);
        assert_eq!(size("150M"), Some(150 << 20));
        assert_eq!(size("512k"), Some(512 << 10));
        assert_eq!(size("1048576"), Some(1 << 20));
        assert_eq!(size("lots"), None);
        assert_eq!(size("M"), None);
        assert_eq!(size(""), None);
    }
}
