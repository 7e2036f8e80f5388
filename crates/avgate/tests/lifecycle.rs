//! Signals, against the real `avgate serve` binary with its managed clamd:
//! SIGTERM while an upload is in flight (and the log lines written at
//! exit), SIGHUP while one is in flight.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::binary::{alive, Server};
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

/// The binary without tokens, with the configuration file `config` if
/// any; without one, no freshclam (no mirror is reachable from the tests).
fn start(config: Option<&str>, env: &[(&str, &str)]) -> Server {
    let mut server = Server::builder("avg-life")
        .env("AVGATE_AUTH__REQUIRED", "false")
        .env("AVGATE_METRICS__LISTEN", "127.0.0.1:0")
        .env_remove("AVGATE_LOG");
    for (key, value) in env {
        server = server.env(key, value);
    }
    match config {
        Some(text) => server.config(text),
        None => server.env("AVGATE_UPDATES__ENABLED", "false"),
    }
    .start()
}

/// Starts a raw upload that sends `chunks` chunks of 64 KiB, a pause
/// between each (about 640 KiB/s: slow, well above the minimum upload
/// rate), then EICAR. `sent` counts the chunks handed to the client.
fn slow_upload(
    server: &Server,
    chunks: usize,
    sent: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<(u16, Value)> {
    const CHUNK: usize = 64 * 1024;
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let sent = sent.clone();
        async move {
            if i > chunks {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let data = if i == chunks {
                EICAR.to_vec()
            } else {
                random_bytes(CHUNK, i as u64 + 77)
            };
            sent.fetch_add(1, Ordering::SeqCst);
            Some((Ok::<_, std::io::Error>(bytes::Bytes::from(data)), i + 1))
        }
    });
    let request = server
        .client
        .post(server.url("/v1/scan/raw"))
        .header("content-type", "application/octet-stream")
        .header("x-filename", "slow.bin")
        .body(reqwest::Body::wrap_stream(stream))
        .timeout(Duration::from_secs(120));
    tokio::spawn(async move { json(request.send().await.expect("the upload is answered")).await })
}

/// Waits until the upload has reached clamd (a backend slot is taken).
async fn wait_in_flight(server: &Server) {
    server
        .wait_until(Duration::from_secs(30), "a scan in flight", |_, v| {
            v["backends"][0]["in_flight"].as_u64() >= Some(1)
        })
        .await;
}

const CHUNKS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_upload_in_flight_finish_then_exits_0() {
    // info lines wait for up to an hour here: only the exit writes them.
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut server = start(
        None,
        &[
            ("AVGATE_LOG_FLUSH_INTERVAL", "1h"),
            ("AVGATE_METRICS__LISTEN", &metrics.to_string()),
        ],
    );
    let ready = server.wait_ready(Duration::from_secs(60)).await;
    let clamd_pid = ready["managed_clamd"]["pid"].as_i64().unwrap();

    let sent = Arc::new(AtomicUsize::new(0));
    let upload = slow_upload(&server, CHUNKS, sent.clone());
    wait_in_flight(&server).await;
    // An info line (this request's) waits rather than being written.
    let version = server.client.get(server.url("/version")).send().await;
    assert_eq!(version.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let route_seen = |lines: &[Value]| lines.iter().any(|l| l["route"] == "/version");
    assert!(
        !route_seen(&server.log_lines()),
        "an info line was written before its interval:\n{}",
        server.log_text()
    );
    server.signal(Signal::SIGTERM);

    // New connections are refused at once, while the upload goes on.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let probe = reqwest::Client::new()
            .get(server.url("/healthz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if probe.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sent.load(Ordering::SeqCst) <= CHUNKS,
        "the listener closed while the upload was still being sent"
    );
    // The drain can be watched: the metrics listener is still up, and
    // shows the scan in flight.
    let text = scrape_metrics(&reqwest::Client::new(), metrics).await;
    assert!(
        text.lines().any(|l| l == "avgate_scans_in_flight 1"),
        "{text}"
    );

    let (status, body) = upload.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FOUND", "every byte was scanned: {body}");
    assert_eq!(body["signature"], "Eicar-Test-Signature.UNOFFICIAL");
    assert_eq!(body["size"], (CHUNKS * 64 * 1024 + EICAR.len()) as u64);

    let status = server.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
    assert!(!alive(clamd_pid), "the managed clamd outlived avgate");

    // The exit wrote what waited, the last line last.
    let lines = server.log_lines();
    assert!(route_seen(&lines), "the request line was lost");
    let scanned = lines
        .iter()
        .find(|l| l["message"] == "scanned")
        .unwrap_or_else(|| panic!("the scan's line was lost:\n{}", server.log_text()));
    assert_eq!(scanned["filename"], "slow.bin");
    assert_eq!(scanned["status"], "FOUND");
    assert_eq!(lines.last().unwrap()["message"], "stopped");
}

/// The operator who does not want to wait: a second SIGTERM (or Ctrl-C)
/// exits at once, takes the managed clamd along, and the log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once_and_takes_clamd_along() {
    let mut server = start(None, &[("AVGATE_LOG_FLUSH_INTERVAL", "1h")]);
    let ready = server.wait_ready(Duration::from_secs(60)).await;
    let clamd_pid = ready["managed_clamd"]["pid"].as_i64().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    // About 10 s of upload: the first SIGTERM would wait for it.
    let upload = slow_upload(&server, 100, sent.clone());
    wait_in_flight(&server).await;
    server.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        alive(server.pid().into()),
        "the first SIGTERM waits for the upload"
    );
    let second = Instant::now();
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(second.elapsed() < Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(clamd_pid) {
        assert!(
            Instant::now() < deadline,
            "the managed clamd outlived avgate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The upload was cut off, never answered as if scanned.
    let cut = upload.await;
    assert!(cut.is_err() || cut.unwrap().0 != 200);
    let log = server.log_text();
    assert!(log.contains("second stop signal"), "{log}");
    // The info lines that waited were written with the warning.
    assert!(
        log.contains("shutting down: finishing in-flight scans"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_configuration_and_signatures_without_dropping_a_request() {
    let mut server = start(
        Some("max_database_age = \"3d\"\nlog_level = \"info\"\n[updates]\nenabled = false\n"),
        &[],
    );
    let ready = server.wait_ready(Duration::from_secs(60)).await;
    let clamd_pid = ready["managed_clamd"]["pid"].as_i64().unwrap();

    let sent = Arc::new(AtomicUsize::new(0));
    let upload = slow_upload(&server, CHUNKS, sent.clone());
    wait_in_flight(&server).await;

    // A new signature file, a tighter maximum age and debug logging, then
    // SIGHUP while the upload is in flight.
    let pattern = b"avgate sighup test pattern 3b81";
    std::fs::write(
        server.data.join("clamd/db/avgate-sighup.ndb"),
        format!("Avgate-Sighup-Test:0:*:{}\n", hex::encode(pattern)),
    )
    .unwrap();
    std::fs::write(
        server.config_path(),
        "max_database_age = \"1s\"\nlog_level = \"debug\"\n[updates]\nenabled = false\n",
    )
    .unwrap();
    server.signal(Signal::SIGHUP);

    let (status, body) = upload.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FOUND", "{body}");
    assert_eq!(body["size"], (CHUNKS * 64 * 1024 + EICAR.len()) as u64);

    // The signatures were reloaded: the new one is found.
    let after = server
        .wait_until(Duration::from_secs(60), "the reload", |_, v| {
            v["signatures"]["reloads"] == 1 && !v["signatures"]["reloading"].as_bool().unwrap()
        })
        .await;
    assert_eq!(after["signatures"]["last_reload"]["ok"], true, "{after}");
    assert_eq!(after["signatures"]["last_reload"]["reason"], "SIGHUP");
    let (status, found) = post_file(
        &server.client,
        &server.url("/v1/scan"),
        "sample.txt",
        [&b"< "[..], pattern, b" >"].concat(),
    )
    .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(
        found["signature"], "Avgate-Sighup-Test.UNOFFICIAL",
        "{found}"
    );

    // The new maximum age applies: the test signatures, written at start,
    // are older than a second now.
    let stale = server
        .wait_until(Duration::from_secs(30), "stale", |s, _| s == 503)
        .await;
    assert_eq!(stale["status"], "stale_database", "{stale}");
    assert_eq!(stale["signatures"]["max_database_age_seconds"], 1);

    // Same process, same clamd: nothing was restarted.
    assert!(server.child.try_wait().unwrap().is_none());
    assert_eq!(stale["managed_clamd"]["pid"].as_i64(), Some(clamd_pid));
    assert_eq!(stale["managed_clamd"]["restarts"], 0);

    // The new log level applies too: debug lines after the reload.
    let lines = server
        .log_lines_when(Duration::from_secs(10), |lines| {
            lines
                .iter()
                .skip_while(|l| l["message"] != "configuration reloaded")
                .any(|l| l["level"] == "DEBUG")
        })
        .await;
    let reloaded = lines
        .iter()
        .position(|l| l["message"] == "configuration reloaded")
        .expect("the reload is logged");
    assert!(
        lines[..reloaded].iter().all(|l| l["level"] != "DEBUG"),
        "no debug lines before"
    );
    assert!(
        lines[reloaded..].iter().any(|l| l["level"] == "DEBUG"),
        "debug lines after the reload"
    );

    let status = server.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
}

/// Past `shutdown_timeout` the uploads still in flight are cut off: the
/// log says so, with how many connections were still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_deadline_says_how_many_connections_it_cut_off() {
    let mut server = start(None, &[("AVGATE_SHUTDOWN_TIMEOUT", "1s")]);
    server.wait_ready(Duration::from_secs(60)).await;
    let sent = Arc::new(AtomicUsize::new(0));
    let upload = slow_upload(&server, CHUNKS, sent.clone());
    wait_in_flight(&server).await;
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert!(
        sent.load(Ordering::SeqCst) <= CHUNKS,
        "the upload ended before the deadline: the test did not test it"
    );
    assert!(upload.await.is_err(), "the cut-off upload was answered");
    let lines = server.log_lines();
    let deadline = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("shutdown deadline reached"))
        })
        .unwrap_or_else(|| panic!("no deadline line:\n{}", server.log_text()));
    assert_eq!(deadline["level"], "WARN", "{deadline}");
    // The upload's (an idle keep-alive connection closes at once).
    assert!(deadline["connections"].as_u64() >= Some(1), "{deadline}");
}
