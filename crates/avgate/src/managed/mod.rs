//! The managed clamd: with no `--clamd`, avgate runs its own.
//!
//! avgate writes a clamd.conf into its data directory (limits aligned with
//! its own, `AlertExceedsMax yes`, a Unix socket), runs clamd in the
//! foreground as a child, restarts it with back-off when it dies and stops
//! it on shutdown. clamd keeps parsing hostile files in its own process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The built-in test signatures: EICAR and the test program that every file
/// of Debian's clamav-testfiles package carries.
const TEST_SIGNATURES: &[(&str, &str)] = &[
    (
        "avgate-test.ndb",
        include_str!("../../../../signatures/avgate-test.ndb"),
    ),
    (
        "avgate-test.hdb",
        include_str!("../../../../signatures/avgate-test.hdb"),
    ),
];

/// Where freshclam keeps the official database on Debian and Ubuntu.
pub const SYSTEM_DATABASE: &str = "/var/lib/clamav";

/// Which signatures the engine runs with, for /version and the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    /// freshclam's official database.
    Official,
    /// Only avgate's built-in test signatures: finds test files, not malware.
    TestSignaturesOnly,
    /// A database directory named in the configuration.
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
    pub database_dir: String,
    pub database: &'static str,
}

/// A prepared (configured, not yet started) managed clamd.
pub struct ManagedClamd {
    executable: PathBuf,
    config_path: PathBuf,
    pid_path: PathBuf,
    pub socket: PathBuf,
    pub database: DatabaseKind,
    /// StreamMaxLength written into its config.
    pub stream_max_length: u64,
    pub max_threads: usize,
    backoff_max: Duration,
    status: Mutex<ManagedStatus>,
}

impl ManagedClamd {
    /// Finds clamd, chooses the database and writes clamd.conf.
    pub fn prepare(config: &Config) -> anyhow::Result<ManagedClamd> {
        let executable = find_clamd(config.managed.clamd_path.as_deref())?;
        let dir = config.data_dir.join("clamd");
        create_private_dir(&config.data_dir)?;
        create_private_dir(&dir)?;

        let (database_dir, database) = choose_database(config, &dir)?;
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
        let tmp = dir.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        create_private_dir(&tmp)?;
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

        Ok(ManagedClamd {
            executable,
            pid_path: dir.join("clamd.pid"),
            socket,
            database,
            stream_max_length,
            max_threads: config.managed.max_threads,
            backoff_max: config.managed.restart_backoff_max.0,
            status: Mutex::new(ManagedStatus {
                state: "starting",
                pid: None,
                restarts: 0,
                last_exit: None,
                config: config_path.display().to_string(),
                database_dir: database_dir.display().to_string(),
                database: database.as_str(),
            }),
            config_path,
        })
    }

    pub fn status(&self) -> ManagedStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut ManagedStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Runs clamd until `stop` is cancelled, restarting it when it exits.
    pub async fn supervise(self: Arc<Self>, stop: CancellationToken) {
        const BACKOFF_START: Duration = Duration::from_millis(500);
        // A clamd that ran this long before dying is not crash-looping.
        const STABLE_AFTER: Duration = Duration::from_secs(60);
        let mut backoff = BACKOFF_START;
        loop {
            self.clean_up_stale().await;
            let started = Instant::now();
            let mut child = match self.spawn() {
                Ok(child) => child,
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
            tokio::select! {
                exit = child.wait() => {
                    let why = match exit {
                        Ok(status) => status.to_string(),
                        Err(e) => e.to_string(),
                    };
                    tracing::error!(pid, exit = %why, "clamd exited; restarting");
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
                _ = stop.cancelled() => {
                    terminate(&mut child).await;
                    break;
                }
            }
        }
        self.update(|s| {
            s.state = "stopped";
            s.pid = None;
        });
        tracing::info!("managed clamd stopped");
    }

    fn spawn(&self) -> anyhow::Result<Child> {
        let mut child = Command::new(&self.executable)
            .arg("--config-file")
            .arg(&self.config_path)
            .arg("--foreground")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", self.executable.display()))?;
        // clamd's own log lines go into ours, tagged, so one log stream
        // tells the whole story.
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err));
        }
        Ok(child)
    }

    /// A clamd left over from an avgate that was killed (SIGKILL leaves
    /// no chance to stop the child) would hold the socket: stop it.
    async fn clean_up_stale(&self) {
        if let Some(pid) = std::fs::read_to_string(&self.pid_path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "clamd" {
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

async fn forward_lines(pipe: impl tokio::io::AsyncRead + Unpin) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.contains("ERROR") || line.contains("WARNING") {
            tracing::warn!(target: "clamd", "{line}");
        } else if line.ends_with("FOUND") {
            // Per-scan detections (the readiness probe's too): avgate logs
            // every result itself, with more context.
            tracing::debug!(target: "clamd", "{line}");
        } else {
            tracing::info!(target: "clamd", "{line}");
        }
    }
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

fn find_clamd(configured: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = configured {
        if path.is_file() {
            return Ok(path.to_owned());
        }
        bail!("managed.clamd_path {} does not exist", path.display());
    }
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path_dirs)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    for dir in candidates {
        let candidate = dir.join("clamd");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "clamd was not found (PATH, /usr/sbin): install it (apt-get install clamav-daemon) \
         or point avgate at a running clamd with --clamd unix:/run/clamav/clamd.ctl"
    )
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    } else if let Ok(meta) = std::fs::metadata(dir) {
        if meta.permissions().mode() & 0o002 != 0 {
            tracing::warn!(dir = %dir.display(), "the data directory is world-writable");
        }
    }
    Ok(())
}

/// Does `dir` hold an official (signed) database?
fn has_official_database(dir: &Path) -> bool {
    ["main.cvd", "main.cld", "daily.cvd", "daily.cld"]
        .iter()
        .any(|f| dir.join(f).is_file())
}

fn choose_database(config: &Config, dir: &Path) -> anyhow::Result<(PathBuf, DatabaseKind)> {
    if let Some(db) = &config.managed.database_dir {
        if !db.is_dir() {
            bail!("managed.database_dir {} is not a directory", db.display());
        }
        let kind = if has_official_database(db) {
            DatabaseKind::Official
        } else {
            DatabaseKind::Custom
        };
        return Ok((db.clone(), kind));
    }
    let system = Path::new(SYSTEM_DATABASE);
    if has_official_database(system) {
        return Ok((system.to_owned(), DatabaseKind::Official));
    }
    let test_db = dir.join("test-db");
    create_private_dir(&test_db)?;
    for (name, content) in TEST_SIGNATURES {
        std::fs::write(test_db.join(name), content)
            .with_context(|| format!("cannot write {}", test_db.join(name).display()))?;
    }
    tracing::warn!(
        database = %test_db.display(),
        "NO MALWARE SIGNATURES: {SYSTEM_DATABASE} holds no official ClamAV database, so clamd runs with \
         avgate's test signatures only (EICAR and clamav-testfiles). It will not detect real malware. \
         Run `freshclam` (apt-get install clamav-freshclam) and restart avgate."
    );
    Ok((test_db, DatabaseKind::TestSignaturesOnly))
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
    // MaxFileSize equals MaxScanSize on purpose. avgate enforces the upload
    // size itself; inside clamd, MaxFileSize also applies to each file
    // extracted from an archive, and clamd 1.4 skips the part of such a
    // member past MaxFileSize WITHOUT an alert even with AlertExceedsMax
    // (a zip holding 151 MiB of zeros and then EICAR came back OK). Going
    // past MaxScanSize is alerted, so the two limits must coincide.
    let scan_size = (config.max_size.0.saturating_mul(4)).clamp(400 << 20, CLAMD_MAX);
    let max_size = scan_size;
    // clamd must give up (and say so) before we stop waiting for it.
    let scan_timeout = config.clamd.scan_timeout.0;
    let max_scan_time = if scan_timeout > Duration::from_secs(20) {
        scan_timeout - Duration::from_secs(10)
    } else {
        scan_timeout * 4 / 5
    };
    let threads = config.managed.max_threads;
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
         SelfCheck 3600\n",
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
    fn generated_conf_sets_fail_closed_options_and_limits() {
        let config = Config::load(None, vec![], &Overrides::default()).unwrap();
        let conf = clamd_conf(
            &config,
            Path::new("/d/clamd.sock"),
            Path::new("/d/clamd.pid"),
            Path::new("/d/db"),
            Path::new("/d/tmp"),
            config.max_size.0 + 1,
        );
        for line in [
            "AlertExceedsMax yes",
            "AlertEncrypted yes",
            "LocalSocket /d/clamd.sock",
            "DatabaseDirectory /d/db",
            "MaxFileSize 629145600",
            "MaxScanSize 629145600",
            "TemporaryDirectory /d/tmp",
            "StreamMaxLength 157286401",
            "MaxThreads 8",
            "MaxScanTime 120000",
            "Foreground yes",
        ] {
            assert!(
                conf.lines().any(|l| l == line),
                "missing {line:?} in\n{conf}"
            );
        }
    }

    #[test]
    fn test_signatures_are_embedded() {
        let all: String = TEST_SIGNATURES.iter().map(|(_, c)| *c).collect();
        assert!(all.contains("Eicar-Test-Signature"));
        assert!(all.contains("ClamAV-Test-File"));
    }
}

/// Debian's clamd.conf, read to check an external clamd on this host.
pub const SYSTEM_CLAMD_CONF: &str = "/etc/clamav/clamd.conf";

/// What a local clamd.conf says about one backend, when it describes it.
#[derive(Debug, PartialEq, Eq)]
pub struct ExternalCheck {
    pub alert_exceeds_max: bool,
}

/// Reads `conf` and, if it configures the clamd at `address` (same
/// LocalSocket, or same TCPSocket port), reports whether it sets
/// `AlertExceedsMax yes`. `None` when it cannot tell.
pub fn check_external_conf(address: &clamd::Address, conf: &str) -> Option<ExternalCheck> {
    let mut local_socket = None;
    let mut tcp_port = None;
    let mut alert = false;
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
            _ => {}
        }
    }
    let matches = match address {
        clamd::Address::Unix(path) => local_socket.as_deref() == Some(path.as_path()),
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
    })
}

/// Warns at start-up when an external clamd on this host is known to
/// answer OK for files it did not fully scan.
pub fn warn_about_external_clamd(address: &clamd::Address, conf_path: &Path) {
    let Ok(conf) = std::fs::read_to_string(conf_path) else {
        return;
    };
    if let Some(check) = check_external_conf(address, &conf) {
        if !check.alert_exceeds_max {
            tracing::warn!(
                backend = %address,
                config = %conf_path.display(),
                "this clamd runs without `AlertExceedsMax yes`: it answers OK for files over its \
                 MaxFileSize/MaxScanSize or scans past MaxScanTime without scanning them. \
                 Set AlertExceedsMax yes (and AlertEncrypted yes) in its clamd.conf."
            );
        }
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
                alert_exceeds_max: false
            })
        );
        let other: clamd::Address = "unix:/tmp/other.sock".parse().unwrap();
        assert_eq!(check_external_conf(&other, conf), None);
        let conf = "TCPSocket 3310\nAlertExceedsMax yes\n";
        let tcp: clamd::Address = "tcp://127.0.0.1:3310".parse().unwrap();
        assert_eq!(
            check_external_conf(&tcp, conf),
            Some(ExternalCheck {
                alert_exceeds_max: true
            })
        );
        let remote: clamd::Address = "tcp://10.0.0.5:3310".parse().unwrap();
        assert_eq!(check_external_conf(&remote, conf), None);
    }
}
