//! The real `avgate serve` binary, started as a user would: its own
//! temporary directory (data directory, logs, configuration file), a free
//! loopback port, JSON logs on stdout written to a file. Stopped on drop
//! with SIGTERM, so that it takes its managed clamd along, then SIGKILL.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use super::{free_port, json};

/// `avgate serve` before it starts: what a test adds to the command line,
/// the environment and the configuration file.
pub struct ServerBuilder {
    root: tempfile::TempDir,
    port: u16,
    command: Command,
    config: Option<String>,
    stderr_to_file: bool,
    data: PathBuf,
}

impl ServerBuilder {
    /// Extra command-line arguments.
    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.command.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.command.env(key, value);
        self
    }

    /// Keeps a variable of the test's own environment away from avgate.
    pub fn env_remove(mut self, key: &str) -> Self {
        self.command.env_remove(key);
        self
    }

    /// Writes `text` to `avgate.toml` in the server's directory and passes
    /// it with `--config` (see [`Server::config_path`]).
    pub fn config(mut self, text: &str) -> Self {
        self.config = Some(text.to_owned());
        self
    }

    /// Writes stderr to a file ([`Server::stderr_text`]) instead of the
    /// test's own.
    pub fn stderr_to_file(mut self) -> Self {
        self.stderr_to_file = true;
        self
    }

    /// The data directory the server will have, for the CLI before it runs.
    pub fn data_dir(&self) -> PathBuf {
        self.data.clone()
    }

    /// Another server's data directory (a restart), instead of a new one.
    pub fn reuse_data_dir(mut self, data: &Path) -> Self {
        self.data = data.to_owned();
        self
    }

    pub fn start(mut self) -> Server {
        let root = self.root.path();
        let log = root.join("stdout.log");
        let stderr_log = root.join("stderr.log");
        if let Some(text) = &self.config {
            let path = root.join("avgate.toml");
            std::fs::write(&path, text).unwrap();
            self.command.arg("--config").arg(path);
        }
        self.command.arg("--data-dir").arg(&self.data);
        self.command
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(match self.stderr_to_file {
                true => Stdio::from(std::fs::File::create(&stderr_log).unwrap()),
                false => Stdio::inherit(),
            });
        Server {
            child: self.command.spawn().unwrap(),
            base: format!("http://127.0.0.1:{}", self.port),
            client: reqwest::Client::new(),
            data: self.data_dir(),
            log,
            stderr_log,
            root: self.root,
        }
    }
}

/// A running `avgate serve`.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub client: reqwest::Client,
    /// The data directory (`--data-dir`).
    pub data: PathBuf,
    log: PathBuf,
    stderr_log: PathBuf,
    root: tempfile::TempDir,
}

impl Server {
    /// `avgate serve --listen 127.0.0.1:PORT --data-dir DIR/data` with JSON
    /// logs and a quick health interval, in a temporary directory named
    /// with `prefix` (short: a managed clamd's socket must fit a Unix
    /// socket address).
    pub fn builder(prefix: &str) -> ServerBuilder {
        let root = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_avgate"));
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("AVGATE_CLAMD__HEALTH_INTERVAL", "400ms")
            .env("AVGATE_LOG_FORMAT", "json")
            .stdin(Stdio::null());
        ServerBuilder {
            data: root.path().join("data"),
            root,
            port,
            command,
            config: None,
            stderr_to_file: false,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The configuration file given with [`ServerBuilder::config`].
    pub fn config_path(&self) -> PathBuf {
        self.root.path().join("avgate.toml")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// /readyz, unless the server does not answer (yet, or any more).
    pub async fn readyz(&self) -> Option<(u16, Value)> {
        let r = self.client.get(self.url("/readyz")).send().await.ok()?;
        Some(json(r).await)
    }

    /// Polls /readyz until `f` accepts its answer; returns that body.
    pub async fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        f: impl Fn(u16, &Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((status, body)) = self.readyz().await {
                if f(status, &body) {
                    return body;
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until /readyz answers 200; returns its body.
    pub async fn wait_ready(&self, limit: Duration) -> Value {
        self.wait_until(limit, "ready", |s, _| s == 200).await
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "avgate did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(limit)
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Everything written to stdout: the log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// The log, one JSON value a line (panics on a line that is not JSON).
    pub fn log_lines(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// The log once `done` holds for it: `info` lines reach the log up to
    /// `log_flush_interval` after they happen.
    pub async fn log_lines_when(
        &self,
        limit: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let lines = self.log_lines();
            if done(&lines) {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "the log did not get there in {limit:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything written to stderr, with [`ServerBuilder::stderr_to_file`].
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap()
    }
}

impl Drop for Server {
    /// SIGTERM first, so that avgate stops its clamd; SIGKILL would leave
    /// the clamd behind.
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // exited (and reaped): its pid may be another's now
        }
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a process is alive (a zombie is not).
pub fn alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}
