//! Signature freshness and reloads: database age in /readyz and /version,
//! readiness failing on a stale database, reloads under load with no
//! failed request (managed clamd, and external clamds one at a time), and
//! freshclam runs on a schedule (a fake freshclam: there is no mirror to
//! reach from here).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use avgate::auth::manage::{self, Actor, TokenOptions};
use avgate::config::{Config, Humantime};
use avgate::store::{clock, SqliteStore};
use common::*;
use serde_json::Value;
use tokio::task::JoinHandle;

/// avgate in this process, keeping its `Running` for direct calls.
struct Gw {
    running: Option<avgate::app::Running>,
    base: String,
    client: reqwest::Client,
}

impl Gw {
    async fn start(config: Config) -> Gw {
        let running = avgate::app::start(config).await.expect("avgate starts");
        let gw = Gw {
            base: format!("http://{}", running.addr),
            running: Some(running),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
        };
        gw.wait_for("/readyz", Duration::from_secs(60), "ready", |s, _| s == 200)
            .await;
        gw
    }

    fn state(&self) -> &avgate::http::AppState {
        &self.running.as_ref().unwrap().state
    }

    fn running(&self) -> &avgate::app::Running {
        self.running.as_ref().unwrap()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        json(r).await
    }

    async fn wait_for(
        &self,
        path: &str,
        limit: Duration,
        what: &str,
        f: impl Fn(u16, &Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let (status, body) = self.get(path).await;
            if f(status, &body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Scans `data` until it is FOUND as `signature` (a new database is
    /// loaded), for at most `limit`.
    async fn scan_until_found(&self, data: &[u8], signature: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let (status, body) = self.scan("sample.txt", data.to_vec()).await;
            if status == 200 && body["status"] == "FOUND" {
                assert_eq!(body["signature"], signature, "{body}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{signature} not loaded: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// /readyz once no reload is running (clamd scans with a new file
    /// before its reload is over: the probe, the report).
    async fn after_reloads(&self) -> Value {
        self.wait_for(
            "/readyz",
            Duration::from_secs(30),
            "the reload done",
            |_, v| v["signatures"]["reloading"] == false,
        )
        .await
    }

    async fn scan(&self, name: &str, data: Vec<u8>) -> (u16, Value) {
        scan(&self.client, &self.base, name, data).await
    }

    async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stopper().cancel();
            running.wait().await;
        }
    }
}

async fn scan(client: &reqwest::Client, base: &str, name: &str, data: Vec<u8>) -> (u16, Value) {
    post_file(client, &format!("{base}/v1/scan"), name, data).await
}

/// A managed clamd in `root/data`, without updates and with an empty
/// source directory: the built-in test signatures.
fn managed_config(root: &Path) -> Config {
    let system = root.join("system");
    std::fs::create_dir_all(&system).unwrap();
    let mut c = config(&[]);
    c.data_dir = root.join("data");
    c.managed.database_dir = Some(system);
    c.updates.enabled = Some(false);
    c
}

fn short_tempdir(prefix: &str) -> tempfile::TempDir {
    // The managed clamd's socket path must fit a Unix socket address.
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

/// An `.ndb` line that finds `pattern` anywhere.
fn ndb(name: &str, pattern: &[u8]) -> String {
    format!("{name}:0:*:{}\n", hex::encode(pattern))
}

fn set_mtime(path: &Path, t: SystemTime) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(t).unwrap();
}

/// Clients scanning clean files and EICAR in a loop, checking every answer.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Tally>>,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failures: Vec<String>,
    /// When each correct answer arrived.
    answered: Vec<Instant>,
}

impl Load {
    fn start(base: &str, clients: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|c| {
                let (base, stop) = (base.to_owned(), stop.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::builder()
                        .timeout(Duration::from_secs(60))
                        .build()
                        .unwrap();
                    let mut tally = Tally::default();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let eicar = i.is_multiple_of(3);
                        let data = if eicar {
                            EICAR.to_vec()
                        } else {
                            random_bytes(1_000 + (i * 7_919 % 150_000) as usize, c * 1_000_003 + i)
                        };
                        let (status, body) = scan(&client, &base, "f.bin", data).await;
                        let right = status == 200
                            && if eicar {
                                body["status"] == "FOUND"
                                    && body["signature"]
                                        .as_str()
                                        .is_some_and(|s| s.starts_with("Eicar-Test-Signature"))
                            } else {
                                body["status"] == "OK"
                            };
                        if right {
                            tally.ok += 1;
                            tally.answered.push(Instant::now());
                        } else {
                            tally
                                .failures
                                .push(format!("eicar={eicar}: {status} {body}"));
                        }
                        i += 1;
                    }
                    tally
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::default();
        for task in self.tasks {
            let t = task.await.unwrap();
            all.ok += t.ok;
            all.failures.extend(t.failures);
            all.answered.extend(t.answered);
        }
        all
    }
}

/// Builds an unsigned database container (`.cud`, as `sigtool --unsigned`
/// makes it) holding `daily.ndb`: clamd reports its version and build date
/// in VERSION, like an official database's.
fn build_cud(version: u32, signatures: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("daily.ndb"), signatures).unwrap();
    std::fs::write(dir.path().join("COPYING"), "avgate test signatures\n").unwrap();
    let empty = dir.path().join("previous");
    std::fs::create_dir(&empty).unwrap();
    let mut child = Command::new("sigtool")
        .current_dir(dir.path())
        .args([
            "--unsigned",
            "--build=daily.cud",
            &format!("--cvd-version={version}"),
            "--no-cdiff",
            &format!("--datadir={}", empty.display()),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sigtool (Debian package clamav) is installed: scripts/setup.sh test");
    // sigtool asks for the builder's name.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"avgate-tests\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(dir.path().join("daily.cud")).unwrap()
}

/// Puts a `.cud` into a fixture clamd's database and waits until its
/// VERSION reports it.
async fn install_cud(clamd: &Clamd, cud: &[u8], version: u32) {
    std::fs::write(clamd.dir.path().join("db/daily.cud"), cud).unwrap();
    let address: clamd::Address = clamd.address().parse().unwrap();
    let timeouts = clamd::Timeouts::default();
    clamd::Connection::connect(&address, timeouts)
        .await
        .unwrap()
        .reload()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = clamd::Connection::connect(&address, timeouts)
            .await
            .unwrap()
            .version()
            .await
            .unwrap();
        if v.database == Some(version) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "clamd did not load the .cud: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_versions_and_ages_are_reported_per_backend() {
    let (a, b) = (Clamd::start(""), Clamd::start(""));
    let marker = |v: u32| {
        ndb(
            &format!("Avgate-Cud-{v}"),
            format!("avgate cud {v}").as_bytes(),
        )
    };
    install_cud(&a, &build_cud(27000, &marker(27000)), 27000).await;
    install_cud(&b, &build_cud(27001, &marker(27001)), 27001).await;
    let gw = Gw::start(config(&[a.address(), b.address()])).await;

    let version = gw
        .wait_for(
            "/version",
            Duration::from_secs(30),
            "both probed",
            |_, v| {
                v["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|b| b["database"].is_u64())
            },
        )
        .await;
    assert_eq!(version["versions_differ"], true, "{version}");
    let backends = version["backends"].as_array().unwrap();
    assert_eq!(backends[0]["database"], 27000, "{version}");
    assert_eq!(backends[1]["database"], 27001, "{version}");
    for b in backends {
        // Built seconds ago (clamd prints local time, read as UTC: allow a
        // time zone's worth).
        let age = b["database_age_seconds"].as_u64().expect("an age");
        assert!(age < 86_400, "{version}");
        assert_eq!(b["database_dated_by"], "version", "{version}");
        assert_eq!(b["stale"], false);
    }
    let (status, ready) = gw.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["signatures"]["versions_differ"], true, "{ready}");
    assert_eq!(ready["signatures"]["max_database_age_seconds"], 3 * 86_400);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_signed_database_fails_readiness_until_the_limit_allows_it() {
    let old =
        FakeClamd::with_version(Fault::None, "ClamAV 1.4.6/26000/Mon Jan  1 10:00:00 2024").await;
    let cfg = config(std::slice::from_ref(&old.address));
    let running = avgate::app::start(cfg.clone()).await.unwrap();
    let gw = Gw {
        base: format!("http://{}", running.addr),
        running: Some(running),
        client: reqwest::Client::new(),
    };
    // The backend scans, yet the gateway is not ready: its signatures are
    // years old.
    let body = gw
        .wait_for(
            "/readyz",
            Duration::from_secs(30),
            "the backend up",
            |_, v| v["backends"][0]["state"] == "up",
        )
        .await;
    let (status, body) = (gw.get("/readyz").await.0, body);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "stale_database", "{body}");
    assert!(body["reason"]
        .as_str()
        .unwrap()
        .contains("max_database_age"));
    let backend = &body["backends"][0];
    assert_eq!(backend["stale"], true);
    assert_eq!(backend["database"], 26000);
    assert!(backend["database_age_seconds"].as_u64().unwrap() > 300 * 86_400);
    // Scans are still served: readiness is the load balancer's signal.
    let (status, found) = gw.scan("eicar.com", EICAR.to_vec()).await;
    assert_eq!((status, found["status"].as_str()), (200, Some("FOUND")));

    // The limit is configuration that a reload (SIGHUP) applies at once.
    let mut relaxed = cfg;
    relaxed.max_database_age = Humantime(Duration::ZERO);
    let report = gw.running().reloader.reload(relaxed).await;
    assert!(
        report.backends.is_empty(),
        "external backends are not reloaded by default"
    );
    let (status, body) = gw.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["signatures"]["max_database_age_seconds"], Value::Null);
    gw.stop().await;
}

/// The managed clamd's unsigned database is dated by its files as clamd
/// loaded them: a reload clamd refuses changes neither the age nor the
/// kind shown, is counted as failed, and a clamd that cannot start because
/// of the refused file says so in `last_exit`; once the file is gone the
/// next clamd starts on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_database_age_and_kind_follow_what_clamd_loaded() {
    let root = short_tempdir("avg-age");
    let gw = Gw::start(managed_config(root.path())).await;
    let (_, ready) = gw.get("/readyz").await;
    let backend = &ready["backends"][0];
    assert_eq!(backend["database_dated_by"], "files", "{ready}");
    assert!(backend["database_age_seconds"].as_u64().unwrap() < 3600);
    assert_eq!(ready["managed_clamd"]["database"], "test-signatures-only");
    let db = gw
        .state()
        .managed
        .as_ref()
        .unwrap()
        .database_dir()
        .to_owned();
    assert_eq!(db, root.path().join("data/clamd/db"));

    // Four days without an update (the files dated back, then reloaded:
    // the date is that of what clamd loaded): not ready, with the reason.
    let files: Vec<PathBuf> = ["avgate-test.ndb", "avgate-test.hdb"]
        .iter()
        .map(|f| db.join(f))
        .collect();
    for f in &files {
        set_mtime(f, SystemTime::now() - Duration::from_secs(4 * 86_400));
    }
    let reload = |why: &'static str| {
        let signatures = gw.state().signatures.clone();
        async move { signatures.reload(why).await }
    };
    assert!(reload("test: dated back").await.ok);
    let stale = gw
        .wait_for("/readyz", Duration::from_secs(30), "stale", |s, _| s == 503)
        .await;
    assert_eq!(stale["status"], "stale_database", "{stale}");
    let age = |ready: &Value| {
        ready["backends"][0]["database_age_seconds"]
            .as_u64()
            .unwrap()
    };
    assert!(age(&stale) >= 4 * 86_400, "{stale}");

    // A new signature file that clamd refuses: the reload fails and clamd
    // keeps the old database, so it is still stale and still test
    // signatures only, however new the refused file is.
    let broken = root.path().join("system/update.ndb");
    std::fs::write(&broken, "Broken.Sig;Target:0;ZZZZ\n").unwrap();
    let report = reload("test: a broken file").await;
    assert!(!report.ok, "{report:?}");
    // Probes come and go meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, after) = gw.get("/readyz").await;
    assert_eq!(
        (status, after["status"].as_str()),
        (503, Some("stale_database")),
        "{after}"
    );
    assert!(age(&after) >= 4 * 86_400, "{after}");
    assert_eq!(
        after["managed_clamd"]["database"], "test-signatures-only",
        "{after}"
    );
    // For the alert (deploy/prometheus-alerts.yml, AvgateSignatureReloadFailed).
    let metrics = gw.state().metrics.render();
    for line in [
        "avgate_signature_reloads_total{result=\"ok\"} 1",
        "avgate_signature_reloads_total{result=\"failed\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }

    // The refused file is still there: a clamd that restarts now cannot
    // start, and says why.
    let pid = after["managed_clamd"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let failing = gw
        .wait_for(
            "/readyz",
            Duration::from_secs(30),
            "the restart failing",
            |_, v| {
                v["managed_clamd"]["last_exit"]
                    .as_str()
                    .is_some_and(|e| e.contains("exit status") && e.contains("update.ndb"))
            },
        )
        .await;
    assert_ne!(failing["status"], "ready", "{failing}");

    // Fixed and updated for real: the next clamd starts, with fresh
    // signatures, and is ready without a reload.
    std::fs::remove_file(&broken).unwrap();
    for f in &files {
        set_mtime(f, SystemTime::now());
    }
    let fresh = gw
        .wait_for("/readyz", Duration::from_secs(60), "fresh", |s, _| s == 200)
        .await;
    assert_eq!(
        fresh["managed_clamd"]["database"], "test-signatures-only",
        "{fresh}"
    );
    assert!(age(&fresh) < 3600, "{fresh}");
    gw.stop().await;
}

/// `count` hash signatures of random data in `db/bulk.hsb`, so that a load
/// of the database takes clamd a second or more.
fn write_bulk_signatures(db: &Path, count: u64, seed: u64) {
    std::fs::create_dir_all(db).unwrap();
    let mut bulk = String::with_capacity(count as usize * 90);
    for i in 0..count {
        bulk.push_str(&format!(
            "{}:{}:Avgate.Bulk-{i}\n",
            hex::encode(random_bytes(32, 2 * i + seed)),
            100 + i % 5_000
        ));
    }
    std::fs::write(db.join("bulk.hsb"), bulk).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_across_a_managed_reload_and_the_new_signature_is_found() {
    let root = short_tempdir("avg-rld");
    let cfg = managed_config(root.path());
    // Half a million hash signatures: clamd needs a second or more to load
    // them, so the reload below takes long enough to overlap many scans.
    let db = root.path().join("data/clamd/db");
    write_bulk_signatures(&db, 500_000, 1);
    let gw = Gw::start(cfg).await;

    let pattern = b"avgate reload test pattern 7f3a";
    let sample = [&b"some text around "[..], pattern, b" the pattern"].concat();
    let (_, before) = gw.scan("sample.txt", sample.clone()).await;
    assert_eq!(before["status"], "OK", "not detected yet: {before}");

    let load = Load::start(&gw.base, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A new signature file dropped into the managed clamd's directory,
    // then a reload through avgate's reload path.
    std::fs::write(
        db.join("avgate-reload.ndb"),
        ndb("Avgate-Reload-Test", pattern),
    )
    .unwrap();
    let started = Instant::now();
    let report = gw
        .state()
        .signatures
        .reload("test: a new signature file")
        .await;
    let finished = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tally = load.finish().await;

    assert!(report.ok, "{report:?}");
    assert_eq!(report.backends.len(), 1);
    assert_eq!(report.backends[0].outcome, "reloaded", "{report:?}");
    assert!(
        report.backends[0]
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("signatures"),
        "{report:?}"
    );
    assert!(
        tally.failures.is_empty(),
        "{} of {} requests failed or came back wrong across the reload: {:?}",
        tally.failures.len(),
        tally.ok + tally.failures.len() as u64,
        &tally.failures[..tally.failures.len().min(5)]
    );
    let during = tally
        .answered
        .iter()
        .filter(|t| **t > started && **t < finished)
        .count();
    eprintln!(
        "{} scans, {during} answered during the {:?} reload",
        tally.ok,
        finished - started
    );
    assert!(tally.ok > 20, "the load ran: {}", tally.ok);
    assert!(during > 0, "scans went on while clamd reloaded");

    let (status, after) = gw.scan("sample.txt", sample).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["status"], "FOUND", "{after}");
    assert_eq!(after["signature"], "Avgate-Reload-Test.UNOFFICIAL");
    let (_, ready) = gw.get("/readyz").await;
    assert_eq!(ready["signatures"]["reloads"], 1, "{ready}");
    assert_eq!(ready["signatures"]["last_reload"]["ok"], true, "{ready}");
    gw.stop().await;
}

/// clamd answers RELOADING to a RELOAD that comes while it loads another
/// database (someone else's `clamdscan --reload`, a SIGUSR2), but does not
/// load again: the files avgate linked meanwhile would not be in force. Nor
/// does it hear one that comes while it activates the engine it loaded.
/// avgate sends its RELOAD again once that load is over, however long it
/// takes (the last round's takes over 35 s: clamd is let run 0.5 % of the
/// time; longer than avgate waits for a RELOAD that starts nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_meets_another_load_is_sent_again_and_the_new_file_is_used() {
    let root = short_tempdir("avg-rl2");
    let cfg = managed_config(root.path());
    // Enough signatures that a load takes a second or more.
    let db = root.path().join("data/clamd/db");
    write_bulk_signatures(&db, 400_000, 7);
    let gw = Gw::start(cfg).await;
    let managed = gw.state().managed.clone().unwrap();
    let pattern = b"avgate second reload pattern 51c9";
    let sample = [&b"text before "[..], pattern, b" and after"].concat();

    for round in 0..3 {
        // Someone else's reload, straight to clamd's socket; avgate's own
        // comes while clamd loads for it.
        let loads = managed.log().counts().started;
        let mut s =
            std::os::unix::net::UnixStream::connect(root.path().join("data/clamd/clamd.sock"))
                .unwrap();
        s.write_all(b"zRELOAD\0").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while managed.log().counts().started == loads {
            assert!(Instant::now() < deadline, "clamd did not start loading");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let foreign_started = Instant::now();
        let throttle = if round == 2 {
            let (_, ready) = gw.get("/readyz").await;
            let pid = ready["managed_clamd"]["pid"].as_i64().unwrap() as i32;
            Some(throttle(pid, Duration::from_secs(35)))
        } else {
            None
        };
        // When the other load ends.
        let ended = {
            let managed = managed.clone();
            tokio::spawn(async move {
                while managed.log().counts().ended < loads + 1 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                foreign_started.elapsed()
            })
        };
        let name = format!("Avgate-Second-Reload-{round}");
        std::fs::write(db.join("avgate-second.ndb"), ndb(&name, pattern)).unwrap();
        let report = tokio::time::timeout(
            Duration::from_secs(180),
            gw.state().signatures.reload("test: during another load"),
        )
        .await
        .expect("the reload ended");
        let other_load = ended.await.unwrap();
        eprintln!("round {round}: the other load took {other_load:?}");
        if let Some(throttle) = throttle {
            throttle.join().unwrap();
            assert!(
                other_load > Duration::from_secs(35),
                "the other load was slowed down: {other_load:?}"
            );
        }
        assert!(report.ok, "round {round}: {report:?}");
        assert_eq!(report.backends[0].outcome, "reloaded", "{report:?}");
        // Its own load, after the other one.
        let counts = managed.log().counts();
        assert!(
            counts.started >= loads + 2,
            "round {round}: {counts:?} after {loads} loads"
        );
        // In force as soon as the reload says so.
        let (status, found) = gw.scan("sample.txt", sample.clone()).await;
        assert_eq!(status, 200, "{found}");
        assert_eq!(found["status"], "FOUND", "round {round}: {found}");
        assert_eq!(found["signature"], format!("{name}.UNOFFICIAL"), "{found}");
    }
    gw.stop().await;
}

/// A burst of reloads (SIGHUPs, policy changes) costs one reload after the
/// one running, not one each: the calls that queue behind it are answered
/// by the next, which began after them and saw their files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_reloads_is_merged() {
    let root = short_tempdir("avg-rl3");
    let gw = Gw::start(managed_config(root.path())).await;
    let signatures = gw.state().signatures.clone();
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let signatures = signatures.clone();
            tokio::spawn(async move { signatures.reload(&format!("burst {i}")).await })
        })
        .collect();
    for call in calls {
        let report = call.await.unwrap();
        assert!(report.ok, "{report:?}");
    }
    let (_, ready) = gw.get("/readyz").await;
    let reloads = ready["signatures"]["reloads"].as_u64().unwrap();
    assert!(
        (1..=2).contains(&reloads),
        "{reloads} reloads for 20 calls: {ready}"
    );
    // One asked for after the burst is a reload of its own.
    assert!(signatures.reload("after").await.ok);
    let (_, ready) = gw.get("/readyz").await;
    assert_eq!(
        ready["signatures"]["reloads"].as_u64(),
        Some(reloads + 1),
        "{ready}"
    );
    gw.stop().await;
}

/// Lets process `pid` run 10 ms in every 500 for `how_long` (SIGSTOP,
/// SIGCONT): a clamd on a very busy host.
fn throttle(pid: i32, how_long: Duration) -> std::thread::JoinHandle<()> {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(pid);
    std::thread::spawn(move || {
        let until = Instant::now() + how_long;
        // clamd runs 0.5 % of the time: a load that needs 0.2 s of CPU or
        // more (0.6 s and up here) cannot end while this lasts, however
        // fast the machine, and clamd still answers commands within 2 s.
        while Instant::now() < until {
            let _ = kill(pid, Signal::SIGSTOP);
            std::thread::sleep(Duration::from_millis(1990));
            let _ = kill(pid, Signal::SIGCONT);
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = kill(pid, Signal::SIGCONT);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_backends_are_reloaded_one_at_a_time_under_load() {
    let (a, b) = (Clamd::start(""), Clamd::start(""));
    let old = build_cud(27000, &ndb("Avgate-Cud-27000", b"avgate cud 27000"));
    install_cud(&a, &old, 27000).await;
    install_cud(&b, &old, 27000).await;
    // The reload is triggered over the admin API, with an admin token.
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let options = TokenOptions {
        name: "ops".into(),
        scope: Some(avgate::auth::Scope::Admin),
        ..Default::default()
    };
    let created = manage::create(
        &store,
        options.validate(clock::now()).unwrap(),
        &Actor::cli(),
    )
    .await
    .unwrap();
    let admin = created.token.expose().to_owned();
    let mut cfg = config(&[a.address(), b.address()]);
    cfg.data_dir = dir.path().to_owned();
    cfg.updates.reload_external = true;
    let gw = Gw::start(cfg).await;
    gw.wait_for(
        "/version",
        Duration::from_secs(30),
        "both probed",
        |_, v| {
            v["backends"]
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["database"] == 27000)
        },
    )
    .await;

    let pattern = b"avgate update test pattern 51c2";
    let sample = [&b"x "[..], pattern, b" y"].concat();
    let load = Load::start(&gw.base, 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A new database version reaches both hosts (as freshclam would put it).
    let new = build_cud(
        27001,
        &format!(
            "{}{}",
            ndb("Avgate-Cud-27001", b"avgate cud 27001"),
            ndb("Avgate-Update-Test", pattern)
        ),
    );
    for clamd in [&a, &b] {
        std::fs::write(clamd.dir.path().join("db/daily.cud"), &new).unwrap();
    }
    // Not admin: refused.
    let r = gw
        .client
        .post(format!("{}/v1/admin/reload", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = gw
        .client
        .post(format!("{}/v1/admin/reload", gw.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    let (status, report) = json(r).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tally = load.finish().await;

    assert_eq!(status, 200, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let steps = report["backends"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{report}");
    for step in steps {
        assert_eq!(step["outcome"], "reloaded", "{report}");
        assert_eq!(step["drained"], true, "the other backend served meanwhile");
        assert_eq!(step["database_before"], 27000);
        assert_eq!(step["database_after"], 27001);
    }
    assert!(
        steps[0]["finished_ms"].as_u64() <= steps[1]["started_ms"].as_u64(),
        "one at a time: {report}"
    );
    assert!(
        tally.failures.is_empty(),
        "{} requests failed across the reload: {:?}",
        tally.failures.len(),
        &tally.failures[..tally.failures.len().min(5)]
    );
    assert!(tally.ok > 20, "the load ran: {}", tally.ok);

    let (_, version) = gw.get("/version").await;
    assert_eq!(version["versions_differ"], false, "{version}");
    for _ in 0..4 {
        // Both backends have it (the pool spreads scans over them).
        let (status, found) = gw.scan("sample.txt", sample.clone()).await;
        assert_eq!(status, 200, "{found}");
        assert!(
            found["signature"]
                .as_str()
                .is_some_and(|s| s.starts_with("Avgate-Update-Test")),
            "{found}"
        );
    }
    gw.stop().await;
}

/// [`managed_config`] with `script` as avgate's freshclam, run every 2 s.
fn freshclam_config(root: &Path, script: PathBuf) -> Config {
    let mut cfg = managed_config(root);
    cfg.updates.enabled = Some(true);
    cfg.updates.freshclam_path = Some(script);
    cfg.updates.interval = Humantime(Duration::from_secs(2));
    cfg
}

/// `reloads` reloads done in all, the last one owed (clamd was not up, or
/// could not be reached) and successful.
fn assert_owed_reload_done(ready: &Value, reloads: u64) {
    let signatures = &ready["signatures"];
    assert_eq!(signatures["reloads"], reloads, "{ready}");
    assert_eq!(signatures["last_reload"]["ok"], true, "{ready}");
    assert_eq!(
        signatures["last_reload"]["reason"], "owed: clamd was not up or could not be reached",
        "{ready}"
    );
}

/// A stand-in for freshclam (no mirror is reachable from here), written
/// into `root`: it notes its arguments in `root/freshclam.calls`, reads its
/// DatabaseDirectory from the config avgate wrote and, the first time (once
/// the file `gate` exists, if one is given), "downloads" `signature` as
/// `avgate-update.ndb`; later runs find nothing new. Exit code 0 either
/// way, as freshclam's.
fn fake_freshclam(root: &Path, signature: &str, gate: Option<&Path>) -> PathBuf {
    let script = root.join("fake-freshclam");
    let gate = gate.map_or(String::new(), |g| format!("[ -e '{}' ] && ", g.display()));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             conf=''\n\
             for arg in \"$@\"; do case \"$arg\" in --config-file=*) conf=\"${{arg#--config-file=}}\";; esac; done\n\
             echo \"$@\" >> '{calls}'\n\
             dir=$(sed -n 's/^DatabaseDirectory //p' \"$conf\")\n\
             if {gate}[ ! -e \"$dir/avgate-update.ndb\" ]; then\n\
               printf '%s' '{sig}' > \"$dir/.new\" && mv \"$dir/.new\" \"$dir/avgate-update.ndb\"\n\
               echo 'avgate-update.ndb updated'\n\
             else\n\
               echo 'avgate-update.ndb is up-to-date'\n\
             fi\n",
            calls = root.join("freshclam.calls").display(),
            sig = signature.trim_end(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_while_clamd_is_down_is_loaded_once_it_is_back() {
    let root = short_tempdir("avg-down");
    let pattern = b"avgate update while down 77e2";
    let gate = root.path().join("publish");
    let script = fake_freshclam(
        root.path(),
        &ndb("Avgate-Update-While-Down", pattern),
        Some(&gate),
    );
    let mut cfg = freshclam_config(root.path(), script);
    cfg.clamd.health_interval = Humantime(Duration::from_millis(500));
    let gw = Gw::start(cfg).await;
    let sample = [&b"[ "[..], pattern, b" ]"].concat();

    // clamd keeps running, but nobody can connect to it by its path: its
    // backend goes down.
    let socket = root.path().join("data/clamd/clamd.sock");
    let hidden = root.path().join("data/clamd/hidden.sock");
    std::fs::rename(&socket, &hidden).unwrap();
    gw.wait_for("/readyz", Duration::from_secs(30), "clamd down", |s, _| {
        s == 503
    })
    .await;
    // The mirror publishes; freshclam fetches it while clamd is down.
    std::fs::write(&gate, b"").unwrap();
    let down = gw
        .wait_for("/readyz", Duration::from_secs(30), "an update", |_, v| {
            v["managed_clamd"]["updates"]["updates"] == 1
        })
        .await;
    // No reload sent to a clamd that is down (none done, none waiting):
    // it is owed.
    assert_eq!(down["signatures"]["reloads"], 0, "{down}");
    assert_eq!(down["signatures"]["reloading"], false, "{down}");
    assert_eq!(
        down["managed_clamd"]["updates"]["reload_owed"], true,
        "{down}"
    );

    // Back up: the owed reload follows by itself.
    std::fs::rename(&hidden, &socket).unwrap();
    gw.scan_until_found(
        &sample,
        "Avgate-Update-While-Down.UNOFFICIAL",
        Duration::from_secs(40),
    )
    .await;
    let ready = gw.after_reloads().await;
    assert_eq!(ready["managed_clamd"]["updates"]["updates"], 1, "{ready}");
    assert_owed_reload_done(&ready, 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clamd_that_restarts_loads_an_update_it_missed_without_a_reload() {
    let root = short_tempdir("avg-rst");
    let pattern = b"avgate update across a restart 3c90";
    let gate = root.path().join("publish");
    let script = fake_freshclam(
        root.path(),
        &ndb("Avgate-Update-Across-Restart", pattern),
        Some(&gate),
    );
    // The real clamd, behind a switch that keeps it from starting.
    let blocked = root.path().join("block-clamd");
    let wrapper = root.path().join("clamd-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n[ -e '{}' ] && exit 1\nexec /usr/sbin/clamd \"$@\"\n",
            blocked.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg = freshclam_config(root.path(), script);
    cfg.managed.clamd_path = Some(wrapper);
    cfg.managed.restart_backoff_max = Humantime(Duration::from_secs(1));
    let gw = Gw::start(cfg).await;
    let sample = [&b"{ "[..], pattern, b" }"].concat();

    // clamd dies and cannot start again for now.
    std::fs::write(&blocked, b"").unwrap();
    let (_, ready) = gw.get("/readyz").await;
    let pid = ready["managed_clamd"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    gw.wait_for("/readyz", Duration::from_secs(30), "clamd down", |s, _| {
        s == 503
    })
    .await;
    // /readyz says so at once: wait until a start has really failed too.
    gw.wait_for(
        "/readyz",
        Duration::from_secs(30),
        "a failed start",
        |_, v| v["managed_clamd"]["restarts"].as_u64() >= Some(2),
    )
    .await;
    // An update arrives meanwhile: owed, not sent.
    std::fs::write(&gate, b"").unwrap();
    gw.wait_for("/readyz", Duration::from_secs(30), "an update", |_, v| {
        v["managed_clamd"]["updates"]["updates"] == 1
    })
    .await;

    // clamd may start again: it starts with the update in its directory,
    // so nothing is left to reload.
    std::fs::remove_file(&blocked).unwrap();
    gw.scan_until_found(
        &sample,
        "Avgate-Update-Across-Restart.UNOFFICIAL",
        Duration::from_secs(60),
    )
    .await;
    let ready = gw.after_reloads().await;
    assert_eq!(ready["signatures"]["reloads"], 0, "{ready}");
    assert_eq!(
        ready["managed_clamd"]["updates"]["reload_owed"], false,
        "{ready}"
    );
    assert!(
        ready["managed_clamd"]["restarts"].as_u64().unwrap() >= 2,
        "{ready}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_reach_clamd_is_tried_again_until_it_does() {
    // A reload sent while the managed clamd cannot be reached (it is
    // starting, restarting or stuck) links the new files in, but clamd may
    // never read them: one that was starting loaded the directory just
    // before. The reload stays owed until one gets through.
    let root = short_tempdir("avg-miss");
    let gw = Gw::start(managed_config(root.path())).await;
    let pattern = b"avgate missed reload pattern 5b1c";
    let sample = [&b"<< "[..], pattern, b" >>"].concat();
    let (_, before) = gw.scan("sample.txt", sample.clone()).await;
    assert_eq!(before["status"], "OK", "not detected yet: {before}");

    std::fs::write(
        root.path().join("system/avgate-missed.ndb"),
        ndb("Avgate-Missed-Reload", pattern),
    )
    .unwrap();
    // clamd keeps listening, but nobody can connect to it by its path.
    let socket = root.path().join("data/clamd/clamd.sock");
    let hidden = root.path().join("data/clamd/hidden.sock");
    std::fs::rename(&socket, &hidden).unwrap();
    let restore = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        std::fs::rename(&hidden, &socket).unwrap();
    });
    let report = gw
        .state()
        .signatures
        .reload("test: clamd unreachable")
        .await;
    restore.await.unwrap();
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.backends[0].outcome, "failed", "{report:?}");

    // No file changes any more, no one asks: the owed reload comes by
    // itself, within the retry delay (10 s).
    gw.scan_until_found(
        &sample,
        "Avgate-Missed-Reload.UNOFFICIAL",
        Duration::from_secs(40),
    )
    .await;
    let ready = gw.after_reloads().await;
    assert_owed_reload_done(&ready, 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_freshclam_update_is_loaded_without_a_restart() {
    let root = short_tempdir("avg-fc");
    let pattern = b"avgate freshclam test pattern 0d9e";
    let calls = root.path().join("freshclam.calls");
    let script = fake_freshclam(root.path(), &ndb("Avgate-Freshclam-Test", pattern), None);

    let mut cfg = freshclam_config(root.path(), script);
    cfg.updates.private_mirror = Some("http://127.0.0.1:9".into());
    let gw = Gw::start(cfg).await;
    let sample = [&b"-- "[..], pattern, b" --"].concat();

    // Within a few checks the new signature is found, with no restart.
    gw.scan_until_found(
        &sample,
        "Avgate-Freshclam-Test.UNOFFICIAL",
        Duration::from_secs(60),
    )
    .await;
    // One reload (owed, when the first check came while clamd was still
    // starting), once it has finished.
    let ready = gw.after_reloads().await;
    assert_eq!(ready["signatures"]["reloads"], 1, "{ready}");
    // Later runs change nothing, and nothing is reloaded.
    gw.wait_for(
        "/readyz",
        Duration::from_secs(30),
        "another check",
        |_, v| v["managed_clamd"]["updates"]["last_result"] == "up to date",
    )
    .await;
    let (_, ready) = gw.get("/readyz").await;
    let updates = &ready["managed_clamd"]["updates"];
    assert_eq!(updates["mode"], "freshclam", "{ready}");
    assert_eq!(updates["updates"], 1, "{ready}");
    assert_eq!(ready["signatures"]["reloads"], 1, "{ready}");
    assert_eq!(ready["signatures"]["last_reload"]["ok"], true, "{ready}");

    // freshclam was run with the configuration avgate generated, which
    // points at avgate's own directories and the configured mirror.
    let calls = std::fs::read_to_string(&calls).unwrap();
    assert!(calls.lines().count() >= 2, "{calls}");
    let conf_path = root.path().join("data/clamd/freshclam.conf");
    assert!(
        calls.contains(&format!("--config-file={}", conf_path.display())),
        "{calls}"
    );
    let conf = std::fs::read_to_string(conf_path).unwrap();
    assert!(conf.contains(&format!(
        "DatabaseDirectory {}",
        root.path().join("data/clamd/freshclam").display()
    )));
    assert!(conf.contains("PrivateMirror http://127.0.0.1:9"), "{conf}");
    // clamd reads the file through a link in the directory avgate owns.
    let link = root.path().join("data/clamd/db/avgate-update.ndb");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    gw.stop().await;
}
