//! What misbehaving clients and a clamd crash leave behind in a running
//! avgate: against the real binary and a real clamd, a storm of uploads
//! that break off, clients that hang up before the answer, oversized,
//! malformed and unauthenticated requests, with clamd killed and restarted
//! in the middle of it. Afterwards the process must hold no more file
//! descriptors than normal traffic left it with, no clamd slot, and no
//! token slot: a gateway that leaks one of them per odd request dies after
//! days in production, or refuses a partner for good.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::binary::Server;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The process's open file descriptors.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Waits until no scan is in flight on the backend, as /readyz says.
async fn wait_idle(server: &Server) {
    server
        .wait_until(Duration::from_secs(30), "no scan in flight", |s, body| {
            s == 200 && body["backends"][0]["in_flight"] == 0
        })
        .await;
}

/// The descriptor count once it has not moved for half a second.
async fn steady_fds(pid: i32) -> usize {
    let mut last = open_fds(pid);
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = open_fds(pid);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Waits until the descriptor count is at most `limit`; returns the last
/// count seen (connections the clients closed are noticed a moment later).
async fn fds_settled(pid: i32, limit: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = open_fds(pid);
        if n <= limit || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Normal traffic through a client that keeps no idle connection (so that
/// the count of the server's descriptors is not the client's pool): clean
/// 1 KiB files, EICAR and 2 MiB files (streamed, not held), 8 at a time.
async fn normal_traffic(server: &Server, token: &str, rounds: usize) {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .default_headers(headers)
        .build()
        .unwrap();
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let client = client.clone();
        let url = server.url("/v1/scan");
        workers.push(tokio::spawn(async move {
            for r in 0..rounds as u64 {
                let (data, want) = match (w + r) % 3 {
                    0 => (random_bytes(1024, w * 1000 + r), "OK"),
                    1 => (EICAR.to_vec(), "FOUND"),
                    _ => (random_bytes(2 << 20, w * 1000 + r), "OK"),
                };
                let (status, body) = post_file(&client, &url, "f.bin", data).await;
                assert_eq!(
                    (status, body["status"].as_str()),
                    (200, Some(want)),
                    "{body}"
                );
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
}

/// One misbehaving request of kind `kind`; returns the status line when
/// the client waits for one.
async fn misbehave(addr: SocketAddr, token: &str, kind: usize, seed: u64) -> Option<String> {
    let auth = format!("Authorization: Bearer {token}\r\n");
    let raw_head = |length: usize, auth: &str| {
        format!(
            "POST /v1/scan/raw HTTP/1.1\r\nHost: x\r\n{auth}X-Filename: storm.bin\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    if kind == 7 {
        // A body that ends before its Content-Length, then waits.
        let head = raw_head(4000, &auth).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
        let answer = send_cut_short_then_read(addr, &head, &random_bytes(1000, seed))
            .await
            .unwrap_or_default();
        return Some(status_line(answer.as_bytes()));
    }
    let mut stream = TcpStream::connect(addr).await.unwrap();
    match kind {
        // A small upload that breaks off (held until complete, then never).
        0 => {
            stream
                .write_all(raw_head(100_000, &auth).as_bytes())
                .await
                .unwrap();
            stream.write_all(&random_bytes(5000, seed)).await.unwrap();
            None
        }
        // A large one (streamed to clamd as it comes) that breaks off, with
        // a reset instead of a clean close.
        1 => {
            stream
                .write_all(raw_head(3 << 20, &auth).as_bytes())
                .await
                .unwrap();
            stream
                .write_all(&random_bytes(200 << 10, seed))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            stream.set_zero_linger().unwrap();
            None
        }
        // A whole multipart upload, and the client gone before the answer.
        2 => {
            let body = multipart_body("storm-b", &[("file", Some(b"gone.com"), EICAR)]);
            let head = format!(
                "POST /v1/scan HTTP/1.1\r\nHost: x\r\n{auth}\
                 Content-Type: multipart/form-data; boundary=storm-b\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(&body).await.unwrap();
            None
        }
        // Declared larger than max_size: 413 before the body.
        3 => read_status(stream, raw_head(5 << 20, &auth), Vec::new()).await,
        // Chunked, and larger than max_size once it has crossed it.
        4 => {
            let head = format!(
                "POST /v1/scan/raw HTTP/1.1\r\nHost: x\r\n{auth}X-Filename: big.bin\r\n\
                 Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            );
            read_status(stream, head, chunked(&random_bytes(4 << 20 | 4096, seed))).await
        }
        // No boundary.
        5 => {
            let head = format!(
                "POST /v1/scan HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\
                 Content-Type: multipart/form-data\r\nContent-Length: 5\r\n\r\n"
            );
            read_status(stream, head, b"hello".to_vec()).await
        }
        // A token that does not exist.
        _ => {
            let head = raw_head(4, "Authorization: Bearer avg_not-a-real-token\r\n");
            read_status(
                stream,
                head.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n"),
                b"data".to_vec(),
            )
            .await
        }
    }
}

/// The first line of an answer (empty if there was none).
fn status_line(answer: &[u8]) -> String {
    String::from_utf8_lossy(answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Sends `head` and `body` (a failed write is fine: avgate may answer and
/// stop reading first), reads the status line and hangs up.
async fn read_status(mut stream: TcpStream, head: String, body: Vec<u8>) -> Option<String> {
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(&body).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    while !answer.contains(&b'\n') {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    Some(status_line(&answer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn misbehaving_clients_and_a_clamd_crash_leave_no_descriptors_or_slots_behind() {
    let mut clamd = Clamd::start("");
    // Rates out of reach: this test is about what requests leave behind,
    // not about being refused for their number.
    let builder = Server::builder("avg-res")
        .env("AVGATE_METRICS__LISTEN", "127.0.0.1:0")
        .env_remove("AVGATE_LOG")
        .args(["--clamd", &clamd.address(), "--max-size", "4MiB"])
        .config(
            r#"
[rate_limit]
per_ip = "100000/s"
per_ip_burst = 100000
per_token = "100000/s"
per_token_burst = 100000
auth_failures = "100000/s"
auth_failures_burst = 100000
"#,
        );
    let token = create_token_with_cli(&builder.data_dir(), "normal");
    // A partner's token with 4 scans at once: a slot that is never given
    // back would refuse the partner for good.
    let partner =
        create_token_with_cli_args(&builder.data_dir(), "partner", &["--max-concurrent", "4"]);
    let server = builder.start();
    server.wait_ready(Duration::from_secs(30)).await;
    let pid = server.pid();
    let addr: SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();

    // What normal traffic leaves open: listeners, the store, the log,
    // pooled clamd sessions and in-memory files.
    normal_traffic(&server, &token, 6).await;
    wait_idle(&server).await;
    let baseline = steady_fds(pid).await;

    // The storm: 8 clients, 60 misbehaving requests each, half of them
    // with the partner's token. After their 20th, clamd is killed; after
    // their 40th, it is started again.
    const KINDS: usize = 8;
    let phase = std::sync::Arc::new(tokio::sync::Barrier::new(9));
    let mut storm = Vec::new();
    for w in 0..8usize {
        let token = match w % 2 {
            0 => token.clone(),
            _ => partner.clone(),
        };
        let phase = phase.clone();
        storm.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..60usize {
                if i == 20 || i == 40 {
                    // Until the test has killed (restarted) clamd.
                    phase.wait().await;
                    phase.wait().await;
                }
                let kind = (w + i) % KINDS;
                let line = misbehave(addr, &token, kind, (w * 100 + i) as u64).await;
                answers.push((kind, w % 2 == 1, line));
            }
            answers
        }));
    }
    phase.wait().await;
    tokio::task::block_in_place(|| clamd.kill());
    phase.wait().await;
    phase.wait().await;
    tokio::task::block_in_place(|| clamd.restart());
    phase.wait().await;
    let mut answers = Vec::new();
    for s in storm {
        answers.extend(s.await.unwrap());
    }
    // The requests that waited for an answer got the right one, and the
    // outage was seen.
    let outage = answers
        .iter()
        .filter(|(_, _, line)| {
            line.as_deref()
                .is_some_and(|l| l.starts_with("HTTP/1.1 503 "))
        })
        .count();
    assert!(outage > 0, "no request saw clamd down");
    for (kind, partner, line) in &answers {
        let Some(line) = line else { continue };
        let want = match kind {
            3 => "413",
            // Streamed: it needs a clamd before its body is read.
            4 if line.starts_with("HTTP/1.1 503 ") => "503",
            4 => "413",
            6 => "401",
            _ => "400",
        };
        // The partner's slots of requests it gave up on are freed once
        // avgate notices, which may be after its next request.
        let refused = *partner && line.starts_with("HTTP/1.1 429 ");
        assert!(
            line.starts_with(&format!("HTTP/1.1 {want} ")) || refused,
            "kind {kind}: {line:?}"
        );
    }

    server.wait_ready(Duration::from_secs(30)).await;
    wait_idle(&server).await;
    // Normal traffic again refills whatever pools the crash emptied.
    normal_traffic(&server, &token, 2).await;
    wait_idle(&server).await;
    // A few more than the baseline may be pooled (clamd sessions,
    // in-memory files, both bounded); one per misbehaving request is not.
    let after = fds_settled(pid, baseline + 8).await;
    assert!(
        after <= baseline + 8,
        "open descriptors: {baseline} after normal traffic, {after} after {} misbehaving requests: {:?}",
        answers.len(),
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .collect::<Vec<_>>()
    );

    // Every one of the token's 4 concurrent slots is free: 4 uploads held
    // open at once are all accepted, and a fifth is refused.
    let mut held = Vec::new();
    for _ in 0..4 {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
        tx.send(Ok(b"first bytes ".to_vec())).await.unwrap();
        let request = server
            .client
            .post(server.url("/v1/scan/raw"))
            .bearer_auth(&partner)
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
            )));
        let answer = tokio::spawn(async move { json(request.send().await.unwrap()).await });
        held.push((tx, answer));
    }
    // Chunked uploads are streamed: each holds a clamd slot as well.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (_, answer) in &held {
            assert!(
                !answer.is_finished(),
                "a held upload was answered at once: a token slot leaked"
            );
        }
        let (_, ready) = server.readyz().await.unwrap();
        if ready["backends"][0]["in_flight"] == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the held uploads never all started: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = json(
        server
            .client
            .post(server.url("/v1/scan/raw"))
            .bearer_auth(&partner)
            .header("content-type", "application/octet-stream")
            .body("x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("token_concurrency_limit")),
        "{body}"
    );
    for (tx, answer) in held {
        tx.send(Ok(EICAR.to_vec())).await.unwrap();
        drop(tx);
        let (status, body) = answer.await.unwrap();
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("FOUND")),
            "{body}"
        );
    }

    assert!(
        !server.log_text().contains("panicked"),
        "{}",
        server.log_text()
    );
}
