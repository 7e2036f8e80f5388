//! The real `avgate serve` binary with its managed clamd, end to end:
//! started as a user would, polled until ready, then hurt.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

struct Server {
    child: Child,
    base: String,
    client: reqwest::Client,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::Builder::new()
            .prefix("avg-srv")
            .tempdir()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.path().join("avgate.log");
        let child = Command::new(env!("CARGO_BIN_EXE_avgate"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("AVGATE_CLAMD__HEALTH_INTERVAL", "400ms")
            .env("AVGATE_LOG_FORMAT", "json")
            // Tokens have their own end-to-end test (tests/auth.rs).
            .env("AVGATE_AUTH__REQUIRED", "false")
            // Not the fixed default port: tests run side by side.
            .env("AVGATE_METRICS__LISTEN", "127.0.0.1:0")
            // No mirror is reachable from the tests: no freshclam runs.
            .env("AVGATE_UPDATES__ENABLED", "false")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            log,
            _dir: dir,
        }
    }

    async fn readyz(&self) -> Option<(u16, serde_json::Value)> {
        let r = self
            .client
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .ok()?;
        Some(json(r).await)
    }

    async fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        f: impl Fn(u16, &serde_json::Value) -> bool,
    ) -> serde_json::Value {
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

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Server {
    /// SIGTERM first, so that avgate stops its clamd; SIGKILL would leave
    /// the clamd behind.
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
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

fn alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_its_own_clamd_restarts_it_and_stops_it() {
    let mut server = Server::start();
    let ready = server
        .wait_until(Duration::from_secs(60), "ready", |s, _| s == 200)
        .await;
    let managed = &ready["managed_clamd"];
    assert_eq!(managed["state"], "running", "{ready}");
    let clamd_pid = managed["pid"].as_i64().unwrap();

    // A scan through the managed clamd.
    let part = reqwest::multipart::Part::bytes(EICAR.to_vec()).file_name("eicar.com");
    let r = server
        .client
        .post(format!("{}/scan", server.base))
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("FOUND")),
        "{body}"
    );

    let (_, version) = json(
        server
            .client
            .get(format!("{}/version", server.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let official = ["main.cvd", "main.cld", "daily.cvd", "daily.cld"]
        .iter()
        .any(|f| Path::new("/var/lib/clamav").join(f).exists());
    let want = if official {
        "official"
    } else {
        "test-signatures-only"
    };
    assert_eq!(version["database"], want, "{version}");

    // The managed clamd crashes: /readyz says so, then it is restarted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(clamd_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let down = server
        .wait_until(Duration::from_secs(10), "not ready", |s, _| s == 503)
        .await;
    assert_eq!(down["status"], "not_ready", "{down}");
    let back = server
        .wait_until(Duration::from_secs(60), "ready again", |s, _| s == 200)
        .await;
    assert!(
        back["managed_clamd"]["restarts"].as_u64().unwrap() >= 1,
        "{back}"
    );
    let new_pid = back["managed_clamd"]["pid"].as_i64().unwrap();
    assert_ne!(new_pid, clamd_pid);

    // SIGTERM: exit 0 and take clamd along.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "avgate did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(!alive(new_pid), "the managed clamd outlived avgate");

    // Logs are JSON lines, and file contents never appear in them.
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.lines().count() > 5);
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
    }
    assert!(!log.contains("EICAR-STANDARD"), "file content in the logs");
    assert!(
        log.contains("\"message\":\"scanned\""),
        "scan results are logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_150_mib_upload_is_streamed_with_bounded_memory() {
    let server = Server::start();
    server
        .wait_until(Duration::from_secs(60), "ready", |s, _| s == 200)
        .await;
    let rss_before = peak_rss_kib(server.pid());

    const SIZE: u64 = 150 << 20;
    const CHUNK: u64 = 256 << 10;
    let stream = futures_util::stream::iter(0..SIZE / CHUNK)
        .map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(random_bytes(CHUNK as usize, i + 11))));
    let part =
        reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), SIZE)
            .file_name("big.bin");
    let r = server
        .client
        .post(format!("{}/v1/scan", server.base))
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "OK", "{body}");
    assert_eq!(body["size"], SIZE);

    // The whole file went through; avgate's memory did not follow it.
    let peak_mib = peak_rss_kib(server.pid()) / 1024;
    eprintln!(
        "avgate peak RSS: {} MiB before, {peak_mib} MiB after a 150 MiB upload",
        rss_before / 1024
    );
    assert!(
        peak_mib < 64,
        "peak RSS {peak_mib} MiB for a 150 MiB upload"
    );
}

/// Regression: inside an archive, clamd skips the part of a member past
/// MaxFileSize without any alert, even with AlertExceedsMax. The managed
/// clamd.conf must not let a small zip hide EICAR behind 151 MiB of zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zip_member_larger_than_the_upload_limit_is_still_scanned_to_its_end() {
    let server = Server::start();
    server
        .wait_until(Duration::from_secs(60), "ready", |s, _| s == 200)
        .await;
    let dir = tempfile::tempdir().unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(dir.path().join("big.bin")).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..151 {
            f.write_all(&zeros).unwrap();
        }
        f.write_all(EICAR).unwrap();
    }
    let ok = Command::new("zip")
        .current_dir(dir.path())
        .args(["-q", "bomb.zip", "big.bin"])
        .status()
        .unwrap();
    assert!(ok.success());
    let zip = std::fs::read(dir.path().join("bomb.zip")).unwrap();
    assert!(zip.len() < 1 << 20, "the zip is small: {}", zip.len());
    let part = reqwest::multipart::Part::bytes(zip).file_name("bomb.zip");
    let r = server
        .client
        .post(format!("{}/v1/scan", server.base))
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FOUND", "{body}");
}
