//! Signature updates for the managed clamd.
//!
//! Two modes, chosen at start-up ([`decide`]):
//!
//! - **freshclam**: avgate runs `freshclam` itself every `updates.interval`
//!   (6 h by default, ±10 % random jitter: the official mirrors answer 429
//!   to clients that check too often or all at the same minute), with a
//!   freshclam.conf it writes into `<data_dir>/clamd/` and a database
//!   directory it owns (`<data_dir>/clamd/freshclam`). When freshclam exits
//!   0 and a database file changed, the managed clamd is reloaded.
//! - **follow**: something else keeps the database fresh (the
//!   clamav-freshclam service updating `/var/lib/clamav`), or updates are
//!   off. avgate only notices when the files change and reloads.
//!
//! In both modes the database files are checked every [`WATCH_INTERVAL`]
//! and clamd is reloaded when they changed (clamd's own `SelfCheck` is off:
//! reloads are avgate's, one at a time, after re-linking the directory).
//! An update while the managed clamd is not up, or a reload that could not
//! reach it, is owed: checked every [`RELOAD_RETRY`], and sent once clamd
//! is up.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::ManagedClamd;
use crate::config::Config;
use crate::signatures::Signatures;

/// How often the database files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// How often an owed reload (clamd was not up, or could not be reached)
/// is tried again.
pub const RELOAD_RETRY: Duration = Duration::from_secs(10);
/// Longest a freshclam run may take (the first download of the official
/// database is ~300 MB).
const RUN_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A first check (or an overdue one) happens this soon after start-up,
/// at most; a random part of it, so a fleet restarted at once does not hit
/// the mirrors in the same second.
const FIRST_CHECK_MAX_DELAY: Duration = Duration::from_secs(60);
/// The official mirror network.
pub const OFFICIAL_MIRROR: &str = "database.clamav.net";

/// How the managed clamd's signatures are kept fresh.
#[derive(Debug, Clone)]
pub enum UpdateMode {
    /// avgate runs freshclam on a schedule.
    Freshclam(Freshclam),
    /// avgate does not run freshclam; it reloads when the files change.
    Follow { why: String },
}

/// Everything needed to run freshclam once.
#[derive(Debug, Clone)]
pub struct Freshclam {
    pub executable: PathBuf,
    /// The generated freshclam.conf.
    pub config_path: PathBuf,
    /// freshclam's DatabaseDirectory, owned by avgate.
    pub dir: PathBuf,
    pub interval: Duration,
    /// Its modification time is the last check, across restarts.
    stamp: PathBuf,
}

/// For /readyz: what the updater did last and will do next.
#[derive(Debug, Clone, Serialize)]
pub struct UpdatesStatus {
    /// `freshclam` or `follow`.
    pub mode: &'static str,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<u64>,
    pub last_check: Option<String>,
    /// `updated`, `up to date`, or why it failed.
    pub last_result: Option<String>,
    pub next_check: Option<String>,
    /// freshclam runs that changed the database.
    pub updates: u64,
    /// A reload is owed: clamd was not up for an update, or a reload could
    /// not reach it. Sent once clamd is up.
    pub reload_owed: bool,
}

impl UpdateMode {
    pub fn initial_status(&self) -> UpdatesStatus {
        let (mode, reason, interval) = match self {
            UpdateMode::Freshclam(f) => (
                "freshclam",
                format!("avgate runs {}", f.executable.display()),
                Some(f.interval.as_secs()),
            ),
            UpdateMode::Follow { why } => ("follow", why.clone(), None),
        };
        UpdatesStatus {
            mode,
            reason,
            interval_seconds: interval,
            last_check: None,
            last_result: None,
            next_check: None,
            updates: 0,
            reload_owed: false,
        }
    }
}

/// Chooses the mode and, for freshclam, writes its configuration.
///
/// `updates.enabled` unset means: on, unless a freshclam daemon
/// (`freshclam -d`, which is what the clamav-freshclam service runs) is
/// running on this host at start-up. That daemon keeps `/var/lib/clamav`
/// fresh, and a second updater would only double the load on the mirrors.
pub fn decide(config: &Config, clamd_dir: &Path) -> anyhow::Result<UpdateMode> {
    let updates = &config.updates;
    let explicit = updates.enabled;
    if explicit == Some(false) {
        return Ok(UpdateMode::Follow {
            why: "updates.enabled = false: something else must update the database".into(),
        });
    }
    if explicit.is_none() {
        if let Some(pid) = freshclam_daemon() {
            return Ok(UpdateMode::Follow {
                why: format!(
                    "a freshclam daemon (pid {pid}) keeps {} fresh; avgate reloads when it changes",
                    super::SYSTEM_DATABASE
                ),
            });
        }
    }
    let executable = match find_freshclam(updates.freshclam_path.as_deref()) {
        Ok(path) => path,
        Err(e) if explicit.is_none() => {
            tracing::warn!("{e:#}; signature updates are off");
            return Ok(UpdateMode::Follow {
                why: "freshclam is not installed".into(),
            });
        }
        Err(e) => return Err(e),
    };
    let dir = clamd_dir.join("freshclam");
    super::database::create_private_dir(&dir)?;
    let config_path = clamd_dir.join("freshclam.conf");
    std::fs::write(
        &config_path,
        freshclam_conf(config, &dir, current_user().as_deref()),
    )
    .with_context(|| format!("cannot write {}", config_path.display()))?;
    Ok(UpdateMode::Freshclam(Freshclam {
        executable,
        config_path,
        dir,
        interval: updates.interval.0,
        stamp: clamd_dir.join("freshclam.last-check"),
    }))
}

/// freshclam.conf for avgate's own freshclam runs.
pub fn freshclam_conf(config: &Config, dir: &Path, user: Option<&str>) -> String {
    let updates = &config.updates;
    let mut conf = format!(
        "# Written by avgate at each start: change avgate's configuration ([updates]), not this file.\n\
         DatabaseDirectory {dir}\n\
         LogTime no\n\
         LogSyslog no\n\
         Bytecode yes\n\
         # Load each new database before it replaces the old one.\n\
         TestDatabases yes\n\
         ScriptedUpdates yes\n\
         ConnectTimeout 30\n\
         ReceiveTimeout 0\n\
         MaxAttempts 3\n\
         DatabaseMirror {mirror}\n",
        dir = dir.display(),
        mirror = updates.database_mirror.as_deref().unwrap_or(OFFICIAL_MIRROR),
    );
    // Run as root, freshclam drops to DatabaseOwner (default "clamav"),
    // which could not write our private directory.
    if let Some(user) = user {
        conf.push_str(&format!("DatabaseOwner {user}\n"));
    }
    if let Some(mirror) = &updates.private_mirror {
        conf.push_str(&format!("PrivateMirror {mirror}\n"));
    }
    conf
}

/// The name of the user avgate runs as, from /proc and /etc/passwd.
fn current_user() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .to_owned();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)? == uid).then(|| name.to_owned())
    })
}

/// The freshclam to run: `updates.freshclam_path`, else the first on PATH
/// or in /usr/bin. Also what `check-config` checks.
pub(crate) fn find_freshclam(configured: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = configured {
        if super::is_executable(path) {
            return Ok(path.to_owned());
        }
        bail!(
            "updates.freshclam_path {} is not an executable file",
            path.display()
        );
    }
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_dirs)
        .chain(["/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join("freshclam"))
        .find(|candidate| super::is_executable(candidate))
        .context("freshclam was not found (apt-get install clamav-freshclam)")
}

/// The pid of a running freshclam daemon, if there is one.
pub fn freshclam_daemon() -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != "freshclam" {
            continue;
        }
        if is_daemon_cmdline(&std::fs::read(entry.path().join("cmdline")).unwrap_or_default()) {
            return Some(pid);
        }
    }
    None
}

/// `freshclam -d ...` or `freshclam --daemon ...` (NUL-separated, as in
/// /proc/PID/cmdline). A one-shot freshclam, like avgate's, is not one.
fn is_daemon_cmdline(cmdline: &[u8]) -> bool {
    cmdline
        .split(|&b| b == 0)
        .skip(1)
        .any(|arg| arg == b"-d" || arg == b"--daemon")
}

/// The interval with ±10 % jitter; `random` is uniform in [0, 1).
pub fn jittered(interval: Duration, random: f64) -> Duration {
    interval.mul_f64(0.9 + 0.2 * random.clamp(0.0, 1.0))
}

fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// How one freshclam run ended.
#[derive(Debug)]
enum RunOutcome {
    /// Exit code 0: up to date, or updated.
    Success,
    Failed(String),
    Stopped,
}

impl Freshclam {
    /// When the next check is due, from the last check recorded on disk.
    fn first_check(&self) -> Instant {
        let soon = FIRST_CHECK_MAX_DELAY.min(self.interval / 10);
        let soon = Instant::now() + soon.mul_f64(random_fraction());
        let last = std::fs::metadata(&self.stamp).and_then(|m| m.modified());
        let Ok(last) = last else {
            return soon; // never checked
        };
        let since = SystemTime::now().duration_since(last).unwrap_or_default();
        let interval = jittered(self.interval, random_fraction());
        match interval.checked_sub(since) {
            Some(left) => (Instant::now() + left).max(soon),
            None => soon, // overdue
        }
    }

    fn record_check(&self) {
        let _ = std::fs::write(&self.stamp, b"");
    }

    /// Runs freshclam once; its output goes into avgate's log.
    async fn run(&self, stop: &CancellationToken) -> RunOutcome {
        let spawned = Command::new(&self.executable)
            .arg(format!("--config-file={}", self.config_path.display()))
            .arg("--stdout")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                return RunOutcome::Failed(format!("cannot run {}: {e}", self.executable.display()))
            }
        };
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err));
        }
        tokio::select! {
            exit = tokio::time::timeout(RUN_TIMEOUT, child.wait()) => match exit {
                Ok(Ok(status)) if status.success() => RunOutcome::Success,
                Ok(Ok(status)) => RunOutcome::Failed(format!("freshclam failed ({status})")),
                Ok(Err(e)) => RunOutcome::Failed(format!("freshclam: {e}")),
                Err(_) => {
                    let _ = child.kill().await;
                    RunOutcome::Failed(format!("freshclam took longer than {RUN_TIMEOUT:?}; killed"))
                }
            },
            _ = stop.cancelled() => {
                let _ = child.kill().await;
                RunOutcome::Stopped
            }
        }
    }
}

async fn forward_lines(pipe: impl tokio::io::AsyncRead + Unpin) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        // freshclam names the mirror in its lines, with the user and
        // password of a private mirror's URL.
        let line = crate::config::redact_credentials(line);
        if line.contains("ERROR") || line.contains("WARNING") {
            tracing::warn!(target: "freshclam", "{line}");
        } else {
            tracing::info!(target: "freshclam", "{line}");
        }
    }
}

/// Runs freshclam on schedule (in freshclam mode) and reloads clamd when
/// the database files changed, until `stop`.
pub async fn run(managed: Arc<ManagedClamd>, signatures: Arc<Signatures>, stop: CancellationToken) {
    let freshclam = match managed.update_mode() {
        UpdateMode::Freshclam(f) => Some(f.clone()),
        UpdateMode::Follow { .. } => None,
    };
    let mut next_check = freshclam.as_ref().map(Freshclam::first_check);
    let mut next_watch = Instant::now() + WATCH_INTERVAL;
    if let Some(at) = next_check {
        managed.update_updates(|u| u.next_check = Some(rfc3339_in(at)));
    }
    loop {
        // Awake every RELOAD_RETRY too, for an owed reload (clamd was not
        // up for an update, or a reload from here, the admin API or a
        // policy change could not reach it): sent then, not at the next
        // watch.
        let wake = next_check
            .map_or(next_watch, |c| c.min(next_watch))
            .min(Instant::now() + RELOAD_RETRY);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        let now = Instant::now();
        if let (Some(fc), Some(due)) = (&freshclam, next_check) {
            if now >= due {
                tracing::info!(executable = %fc.executable.display(), "checking for signature updates");
                let before = managed.fingerprint();
                let outcome = fc.run(&stop).await;
                if matches!(outcome, RunOutcome::Stopped) {
                    // Cut short by a stop: no check happened. Recorded, it
                    // would make the next start wait a whole interval (on
                    // a first start: hours on the test signatures).
                    return;
                }
                fc.record_check();
                let next = Instant::now() + jittered(fc.interval, random_fraction());
                next_check = Some(next);
                // What this run changed: an owed reload is not an update.
                let changed =
                    matches!(outcome, RunOutcome::Success) && managed.fingerprint() != before;
                let result = match &outcome {
                    RunOutcome::Stopped => return,
                    RunOutcome::Success if changed => "updated".to_owned(),
                    RunOutcome::Success => "up to date".to_owned(),
                    RunOutcome::Failed(why) => {
                        tracing::warn!(
                            next_check_in_s = (next - Instant::now()).as_secs(),
                            "signature update failed: {why}"
                        );
                        why.clone()
                    }
                };
                managed.update_updates(|u| {
                    u.last_check = Some(crate::store::clock::rfc3339(crate::store::clock::now()));
                    u.last_result = Some(result.clone());
                    u.next_check = Some(rfc3339_in(next));
                    if changed {
                        u.updates += 1;
                    }
                });
                if changed {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = reload_or_owe(&managed, &signatures, "freshclam updated the database") => {}
                    }
                }
            }
        }
        let owed = managed.reload_owed();
        if now >= next_watch || owed {
            if now >= next_watch {
                next_watch = Instant::now() + WATCH_INTERVAL;
            }
            if managed.database_changed() {
                let reason = if owed {
                    "owed: clamd was not up or could not be reached"
                } else {
                    "the database files changed"
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = reload_or_owe(&managed, &signatures, reason) => {}
                }
            }
        }
    }
}

/// Reloads clamd; while the managed clamd is not up (starting or
/// restarting: no RELOAD can reach it), leaves the reload owed instead, to
/// be sent once it is: a clamd that is starting may have read its
/// directory before the new files were linked in.
async fn reload_or_owe(managed: &ManagedClamd, signatures: &Signatures, reason: &str) {
    if !signatures.managed_up() {
        if !managed.reload_owed() {
            tracing::info!(
                reason,
                "clamd is not up yet; its signature reload waits until it is"
            );
        }
        managed.reload_missed();
        return;
    }
    signatures.reload(reason).await;
}

fn rfc3339_in(at: Instant) -> String {
    let left = at.saturating_duration_since(Instant::now()).as_secs() as i64;
    crate::store::clock::rfc3339(crate::store::clock::now() + left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    #[test]
    fn only_a_daemon_freshclam_counts() {
        assert!(is_daemon_cmdline(
            b"/usr/bin/freshclam\0-d\0--foreground=true\0"
        ));
        assert!(is_daemon_cmdline(b"freshclam\0--daemon\0"));
        assert!(!is_daemon_cmdline(
            b"freshclam\0--config-file=/x/freshclam.conf\0--stdout\0"
        ));
        assert!(!is_daemon_cmdline(b"-d\0"), "argv[0] is not an option");
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let six_h = Duration::from_secs(6 * 3600);
        assert_eq!(jittered(six_h, 0.0), six_h.mul_f64(0.9));
        assert_eq!(jittered(six_h, 0.5), six_h);
        assert!(jittered(six_h, 0.999_999) <= six_h.mul_f64(1.1));
        for _ in 0..100 {
            let r = random_fraction();
            assert!((0.0..1.0).contains(&r), "{r}");
        }
    }

    #[test]
    fn generated_freshclam_conf_points_at_our_directory_and_mirrors() {
        let mut config = Config::load(None, vec![], &Overrides::default()).unwrap();
        let conf = freshclam_conf(&config, Path::new("/d/freshclam"), Some("avgate"));
        for line in [
            "DatabaseDirectory /d/freshclam",
            "DatabaseMirror database.clamav.net",
            "DatabaseOwner avgate",
            "TestDatabases yes",
        ] {
            assert!(
                conf.lines().any(|l| l == line),
                "missing {line:?} in\n{conf}"
            );
        }
        assert!(!conf.contains("PrivateMirror"));
        config.updates.private_mirror = Some("https://mirror.internal/clamav".into());
        config.updates.database_mirror = Some("db.de.clamav.net".into());
        let conf = freshclam_conf(&config, Path::new("/d/freshclam"), None);
        assert!(
            conf.contains("\nPrivateMirror https://mirror.internal/clamav\n"),
            "{conf}"
        );
        assert!(
            conf.contains("\nDatabaseMirror db.de.clamav.net\n"),
            "{conf}"
        );
        assert!(!conf.contains("DatabaseOwner"));
    }

    #[test]
    fn the_first_check_follows_the_last_one_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let fc = Freshclam {
            executable: "/bin/true".into(),
            config_path: dir.path().join("freshclam.conf"),
            dir: dir.path().into(),
            interval: Duration::from_secs(6 * 3600),
            stamp: dir.path().join("stamp"),
        };
        let soon = Instant::now() + FIRST_CHECK_MAX_DELAY + Duration::from_secs(1);
        assert!(fc.first_check() <= soon, "never checked: soon");
        fc.record_check();
        let first = fc.first_check();
        assert!(
            first > Instant::now() + Duration::from_secs(5 * 3600),
            "checked just now"
        );
        // Checked seven hours ago: overdue.
        let file = std::fs::File::options()
            .write(true)
            .open(&fc.stamp)
            .unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(7 * 3600))
            .unwrap();
        assert!(fc.first_check() <= soon);
    }
}
