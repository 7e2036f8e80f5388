//! Failing engines: avgate must answer ERROR (503/504), never OK, and
//! keep serving from the backends that still work.

mod common;

use std::time::{Duration, Instant};

use avgate::config::Humantime;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clamd_stopped_gives_503_error_then_recovers() {
    let mut clamd = Clamd::start("");
    let gw = Gateway::start(config(&[clamd.address()])).await;
    clamd.kill();

    let (status, body) = gw.scan("clean.txt", b"clean".to_vec()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "ERROR");
    assert_eq!(body["error"]["code"], "engine_unavailable");
    assert_eq!(body["filename"], "clean.txt");

    // Retry-After tells clients when to come back.
    let part = reqwest::multipart::Part::bytes(b"x".to_vec()).file_name("x");
    let r = gw
        .client
        .post(gw.url("/v1/scan"))
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));

    let (status, ready) = gw.readyz().await;
    assert_eq!(status, 503);
    assert_eq!(ready["backends"][0]["state"], "down");

    // Back up: probed back in without a restart of avgate.
    clamd.restart();
    gw.wait_ready(Duration::from_secs(20)).await;
    gw.scan_expecting("eicar.com", EICAR.to_vec(), "FOUND")
        .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_never_answers_is_never_ready() {
    // Accepts connections and never says a word: the readiness probe times
    // out, so avgate answers 503 at once instead of hanging.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("tcp://{}", listener.local_addr().unwrap());
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let mut cfg = config(&[addr]);
    cfg.clamd.io_timeout = Humantime(Duration::from_millis(500));
    cfg.clamd.scan_timeout = Humantime(Duration::from_secs(1));
    let gw = Gateway::start_unready(cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let (status, body) = gw.scan("a.txt", b"data".to_vec()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "ERROR");
    assert!(started.elapsed() < Duration::from_secs(5));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clamd_that_stalls_mid_scan_gives_504_within_the_timeout() {
    let fake = FakeClamd::start(Fault::StallReply).await;
    let mut cfg = config(std::slice::from_ref(&fake.address));
    cfg.clamd.scan_timeout = Humantime(Duration::from_secs(2));
    let gw = Gateway::start(cfg).await;
    let started = Instant::now();
    let (status, body) = gw.scan("a.bin", random_bytes(200_000, 1)).await;
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["status"], "ERROR");
    assert_eq!(body["error"]["code"], "engine_timeout");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "{took:?}"
    );
    assert_eq!(fake.scans.load(std::sync::atomic::Ordering::Relaxed), 1);
    gw.stop().await;
}

/// A clamd that stops reading (stopped, swapped out, its disk hung) while
/// the first part of a large upload goes to it: 504 `engine_timeout` after
/// `io_timeout`, as for any stall. Not a backend that is gone: the file is
/// not sent to the next one (it may be the file that stalls it), and the
/// client is not told that no engine is available.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clamd_that_stops_reading_the_first_bytes_gives_504() {
    let clamd = Clamd::start("");
    let mut cfg = config(&[clamd.address()]);
    cfg.clamd.io_timeout = Humantime(Duration::from_secs(2));
    cfg.clamd.health_interval = Humantime(Duration::from_secs(60));
    let gw = Gateway::start(cfg).await;
    let pid = nix::unistd::Pid::from_raw(clamd.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let (status, body) = gw.scan("big.bin", random_bytes(3 << 20, 8)).await;
    let took = started.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["status"], "ERROR");
    assert_eq!(body["error"]["code"], "engine_timeout", "{body}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_reply_is_an_error_not_a_verdict() {
    let fake = FakeClamd::start(Fault::Malformed).await;
    let gw = Gateway::start(config(std::slice::from_ref(&fake.address))).await;
    let (status, body) = gw.scan("a.txt", b"hello".to_vec()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "ERROR");
    assert_eq!(body["error"]["code"], "engine_error");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_clamd_cannot_spool_fails_alone_and_the_backend_stays_in() {
    // clamd spools a stream into its TemporaryDirectory; when that is full
    // it answers `Error writing to temporary file ERROR`. That file was not
    // scanned (503), but clamd is fine: the next scan must not find the
    // backend taken out.
    let clamd = Clamd::with_file_size_limit(4096);
    let gw = Gateway::start(config(&[clamd.address()])).await;
    let (status, body) = gw.scan("big.bin", random_bytes(16 << 20, 7)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "ERROR");
    assert_eq!(body["error"]["code"], "engine_error");

    let (status, body) = gw.scan("eicar.com", EICAR.to_vec()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FOUND");
    let (status, _) = gw.readyz().await;
    assert_eq!(status, 200);
    gw.stop().await;
}

/// Every file streamed (as a file of unknown size or over
/// small_file_max_size is), so that clamd spools it to its temporary
/// directory, which the tests below make too small.
fn spooled(backends: &[String]) -> avgate::config::Config {
    let mut cfg = config(backends);
    cfg.clamd.small_file_max_size = avgate::config::ByteSize(0);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_one_clamd_answers_error_for_is_scanned_on_another() {
    // The first backend cannot spool more than 256 KiB (its temporary
    // directory "full"); the second is fine. Of two idle backends the
    // first in the list gets the scan, so each file below meets the ERROR
    // first, and must then be scanned on the second.
    let full = Clamd::with_file_size_limit(256);
    let fine = Clamd::start("");
    // Under the replay buffer, so that it can be sent again.
    let mut cfg = spooled(&[full.address(), fine.address()]);
    cfg.replay_buffer = mib(1);
    let gw = Gateway::start(cfg).await;
    gw.wait_all_backends_up(Duration::from_secs(10)).await;

    let mut infected = random_bytes(600_000, 11);
    infected.extend_from_slice(EICAR);
    let (status, body) = gw.scan("infected.bin", infected).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FOUND", "{body}");
    assert_eq!(body["engine"]["backend"], fine.address());

    // A clean file is OK only because the second clamd scanned all of it.
    let (status, body) = gw.scan("clean.bin", random_bytes(700_000, 12)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "OK", "{body}");
    assert_eq!(body["engine"]["backend"], fine.address());

    // The first clamd answered, so it stays in rotation, and its ERRORs
    // are counted for the operator.
    let (status, ready) = gw.readyz().await;
    assert_eq!(status, 200);
    assert_eq!(ready["backends"][0]["state"], "up", "{ready}");
    let metrics = gw.metrics_text().await;
    let line = format!(
        "avgate_backend_error_replies_total{{backend=\"{}\"}} 2",
        full.address()
    );
    assert!(metrics.contains(&line), "no `{line}` in:\n{metrics}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reply_is_the_answer_when_no_other_backend_can_take_the_file() {
    // Past the replay buffer the file cannot be sent again; with one
    // backend there is nowhere to send it. Either way: 503, never OK.
    let full = Clamd::with_file_size_limit(256);
    let fine = Clamd::start("");
    let mut cfg = spooled(&[full.address(), fine.address()]);
    cfg.replay_buffer = avgate::config::ByteSize(128 * 1024);
    let gw = Gateway::start(cfg).await;
    gw.wait_all_backends_up(Duration::from_secs(10)).await;
    let answer = gw.scan("big.bin", random_bytes(600_000, 13)).await;
    assert_error(&answer, 503, "engine_error");
    assert_eq!(answer.1["status"], "ERROR");
    gw.stop().await;

    let gw = Gateway::start(spooled(&[full.address()])).await;
    let answer = gw.scan("big.bin", random_bytes(600_000, 14)).await;
    assert_error(&answer, 503, "engine_error");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dying_mid_stream_is_retried_elsewhere_when_replayable() {
    let dying = FakeClamd::start(Fault::DieAfter(100_000)).await;
    let clamd = Clamd::start("");
    let mut cfg = config(&[dying.address.clone(), clamd.address()]);
    cfg.replay_buffer = mib(1);
    let gw = Gateway::start(cfg).await;
    // Both backends up, so the first scan may go to either.
    gw.wait_all_backends_up(Duration::from_secs(10)).await;
    // Under the replay limit: the scan completes on the real clamd.
    let mut data = random_bytes(500_000, 2);
    data.extend_from_slice(EICAR);
    let (status, body) = gw.scan("replayed.bin", data).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FOUND", "{body}");
    assert_eq!(body["engine"]["backend"], clamd.address());
    gw.stop().await;
}

/// A file after which clamd hangs up without a reply (it may have crashed
/// parsing it) goes to one more backend, not to every one in turn: one
/// upload must not be able to crash a whole pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_two_backends_hang_up_on_is_not_sent_to_a_third() {
    let fakes = [
        FakeClamd::start(Fault::DieAfter(usize::MAX)).await,
        FakeClamd::start(Fault::DieAfter(usize::MAX)).await,
        FakeClamd::start(Fault::DieAfter(usize::MAX)).await,
    ];
    let addresses: Vec<String> = fakes.iter().map(|f| f.address.clone()).collect();
    let mut cfg = config(&addresses);
    cfg.replay_buffer = mib(4);
    let gw = Gateway::start(cfg).await;
    gw.wait_all_backends_up(Duration::from_secs(10)).await;
    // Held whole and sent on a session (small), then streamed (large).
    for (size, seed) in [(300_000, 20), (2_000_000, 21)] {
        let before: usize = fakes
            .iter()
            .map(|f| f.scans.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        let answer = gw.scan("crash.bin", random_bytes(size, seed)).await;
        assert_error(&answer, 503, "engine_error");
        assert_eq!(answer.1["status"], "ERROR");
        let after: usize = fakes
            .iter()
            .map(|f| f.scans.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        assert_eq!(
            after - before,
            2,
            "{size} bytes: the file went to {} backends",
            after - before
        );
        // The next round with every backend in rotation again.
        gw.wait_all_backends_up(Duration::from_secs(20)).await;
    }
    gw.stop().await;
}

/// The only backend hangs up on a file it had (or part of it) and there is
/// no other to send it to: clamd failed on this file (`engine_error`, as
/// docs/api.md says), rather than "no backend" (`engine_unavailable`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_backend_hanging_up_on_a_file_is_an_engine_error() {
    for (fault, size, seed, small_file_max) in [
        // Held whole and sent on a session.
        (Fault::DieAfter(usize::MAX), 300_000, 30, mib(1)),
        // Streamed (nothing is held for one write), replayable, cut off
        // part-way.
        (
            Fault::DieAfter(100_000),
            500_000,
            31,
            avgate::config::ByteSize(0),
        ),
    ] {
        let fake = FakeClamd::start(fault).await;
        let mut cfg = config(std::slice::from_ref(&fake.address));
        cfg.replay_buffer = mib(1);
        cfg.clamd.small_file_max_size = small_file_max;
        let gw = Gateway::start(cfg).await;
        gw.wait_all_backends_up(Duration::from_secs(10)).await;
        let answer = gw.scan("crash.bin", random_bytes(size, seed)).await;
        assert_error(&answer, 503, "engine_error");
        assert_eq!(answer.1["status"], "ERROR");
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ok_from_a_clamd_that_hung_up_mid_stream_is_not_a_verdict() {
    // The backend answers `stream: OK` after 100 kB of a 2 MiB stream and
    // closes the connection: avgate's next write fails, and it reads that
    // reply. clamd had part of the file, so OK would be a lie.
    let early = FakeClamd::start(Fault::OkAfter(100_000)).await;
    let mut cfg = config(std::slice::from_ref(&early.address));
    cfg.replay_buffer = avgate::config::ByteSize(64 * 1024);
    let gw = Gateway::start(cfg).await;
    let answer = gw.scan("big.bin", random_bytes(2 << 20, 4)).await;
    assert_error(&answer, 503, "engine_error");
    assert_eq!(answer.1["status"], "ERROR");
    gw.stop().await;
}

/// The same when every write succeeded: the stream fit in the socket
/// buffers, the terminator too, and clamd's OK came after it. Only the
/// reset after that OK (clamd closed with bytes unread) tells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ok_followed_by_a_reset_is_not_a_verdict() {
    let early = FakeClamd::start(Fault::OkAfterPause(100_000)).await;
    let mut cfg = config(std::slice::from_ref(&early.address));
    // Streamed (not held for one write on a session), and not replayable.
    cfg.clamd.small_file_max_size = avgate::config::ByteSize(0);
    cfg.replay_buffer = avgate::config::ByteSize(64 * 1024);
    let gw = Gateway::start(cfg).await;
    for seed in 0..3 {
        let answer = gw.scan("part.bin", random_bytes(200_000, 50 + seed)).await;
        assert_error(&answer, 503, "engine_error");
        gw.wait_all_backends_up(Duration::from_secs(10)).await;
    }
    gw.stop().await;
}

/// A reply that comes before its command was sent (clamd's replies out of
/// step with avgate's commands on a reused session) is never taken for
/// the next file's verdict: that file here holds EICAR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_ahead_of_its_command_is_not_the_next_verdict() {
    let ahead = FakeClamd::start(Fault::ReplyAhead).await;
    let cfg = config(std::slice::from_ref(&ahead.address));
    let gw = Gateway::start(cfg).await;
    gw.wait_all_backends_up(Duration::from_secs(10)).await;
    for seed in 0..4 {
        let (status, body) = gw.scan("first.bin", random_bytes(2_000, 70 + seed)).await;
        assert_ne!(body["status"], "OK", "{status} {body}");
        let mut infected = EICAR.to_vec();
        infected.extend_from_slice(&random_bytes(2_000, 80 + seed));
        let (status, body) = gw.scan("second.bin", infected).await;
        assert_ne!(body["status"], "OK", "{status} {body}");
        gw.wait_all_backends_up(Duration::from_secs(10)).await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dying_mid_stream_past_the_replay_buffer_gives_503() {
    let dying = FakeClamd::start(Fault::DieAfter(300_000)).await;
    let mut cfg = config(std::slice::from_ref(&dying.address));
    cfg.replay_buffer = avgate::config::ByteSize(64 * 1024);
    let gw = Gateway::start(cfg).await;
    let (status, body) = gw.scan("big.bin", random_bytes(2 << 20, 3)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "ERROR", "{body}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_backends_under_load_loses_no_answer() {
    let mut a = Clamd::start("");
    let b = Clamd::start("");
    let gw = Gateway::start(config(&[a.address(), b.address()])).await;
    let gw = std::sync::Arc::new(gw);

    const REQUESTS: usize = 240;
    const CONCURRENCY: usize = 8;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (gw, next) = (gw.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut wrong = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= REQUESTS {
                    return wrong;
                }
                // Alternate infected and clean, sizes around the chunk size.
                let (data, want) = if i % 2 == 0 {
                    let mut d = random_bytes(70_000 + i, i as u64 + 1);
                    d.extend_from_slice(EICAR);
                    (d, "FOUND")
                } else {
                    (random_bytes(70_000 + i, i as u64 + 1), "OK")
                };
                let (status, body) = gw.scan(&format!("f{i}"), data).await;
                if status != 200 || body["status"] != want {
                    wrong.push(format!("request {i}: HTTP {status} {body}"));
                }
            }
        }));
    }
    // Kill backend A a little into the run.
    while next.load(std::sync::atomic::Ordering::Relaxed) < REQUESTS / 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill();
    let mut wrong = Vec::new();
    for w in workers {
        wrong.extend(w.await.unwrap());
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    let (_, ready) = gw.readyz().await;
    assert_eq!(ready["backends"][0]["state"], "down", "{ready}");
    assert_eq!(ready["backends"][1]["state"], "up", "{ready}");
    drop(b);
}

/// A small upload takes a clamd slot only once all of it has arrived: a
/// client that sends one slowly does not keep a clamd thread from others.
/// A large one, streamed to clamd as it comes, holds its slot meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_small_upload_holds_no_clamd_slot_but_a_large_one_does() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let clamd = Clamd::start("");
    let mut cfg = config(&[clamd.address()]);
    cfg.clamd.max_concurrent_per_backend = 1;
    cfg.clamd.queue_timeout = Humantime(Duration::from_millis(300));
    let gw = Gateway::start(cfg).await;

    // Sends all but the last 100 bytes of a one-file form, then waits.
    let start_upload = |data: Vec<u8>| async move {
        let body = multipart_body("slow-b", &[("file", Some(b"slow.bin"), &data)]);
        let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST /v1/scan HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: multipart/form-data; boundary=slow-b\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let (now, later) = body.split_at(body.len() - 100);
        stream.write_all(now).await.unwrap();
        (stream, later.to_vec())
    };
    let finish_upload = |(mut stream, rest): (tokio::net::TcpStream, Vec<u8>)| async move {
        stream.write_all(&rest).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    };

    let small = start_upload(random_bytes(4096, 1)).await;
    // Time for avgate to take a slot if it (wrongly) would.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(backend_in_flight(&gw).await, 0);
    gw.scan_expecting("eicar.com", EICAR.to_vec(), "FOUND")
        .await;
    let answer = finish_upload(small).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"status\":\"OK\""), "{answer}");

    // Above small_file_max_size (1 MiB): the slot is taken as it starts.
    let large = start_upload(random_bytes(2 << 20, 2)).await;
    wait_backend_in_flight(&gw, 1).await;
    assert_error(
        &gw.scan("eicar.com", EICAR.to_vec()).await,
        503,
        "engine_busy",
    );
    let answer = finish_upload(large).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"status\":\"OK\""), "{answer}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_with_503_not_queued_without_bound() {
    let fake = FakeClamd::start(Fault::StallReply).await;
    let mut cfg = config(std::slice::from_ref(&fake.address));
    cfg.clamd.max_concurrent_per_backend = 1;
    cfg.clamd.queue_timeout = Humantime(Duration::from_millis(300));
    cfg.clamd.scan_timeout = Humantime(Duration::from_secs(3));
    let gw = std::sync::Arc::new(Gateway::start(cfg).await);
    // The first scan takes the backend's only slot and stalls.
    let first = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.scan("slow.bin", b"slow".to_vec()).await })
    };
    wait_backend_in_flight(&gw, 1).await;
    let started = Instant::now();
    let (status, body) = gw.scan("second.bin", b"second".to_vec()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "engine_busy");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_error(&first.await.unwrap(), 504, "engine_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_past_max_concurrent_scans_get_503_server_busy_at_once() {
    let fake = FakeClamd::start(Fault::StallReply).await;
    let mut cfg = config(std::slice::from_ref(&fake.address));
    cfg.max_concurrent_scans = 1;
    cfg.clamd.scan_timeout = Humantime(Duration::from_secs(3));
    let gw = std::sync::Arc::new(Gateway::start(cfg).await);
    let first = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.scan("slow.bin", b"slow".to_vec()).await })
    };
    wait_backend_in_flight(&gw, 1).await;
    let started = Instant::now();
    let r = gw
        .client
        .post(gw.url("/v1/scan/raw"))
        .header("content-type", "application/octet-stream")
        .body("second")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "5");
    assert_error(&json(r).await, 503, "server_busy");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    assert_error(&first.await.unwrap(), 504, "engine_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_request_timeout_gets_408_and_no_verdict() {
    let fake = FakeClamd::start(Fault::StallReply).await;
    let mut cfg = config(std::slice::from_ref(&fake.address));
    cfg.request_timeout = Humantime(Duration::from_secs(1));
    cfg.clamd.scan_timeout = Humantime(Duration::from_secs(30));
    let gw = Gateway::start(cfg).await;
    let started = Instant::now();
    // (The fake answers only its health probes, EICAR.)
    assert_error(
        &gw.scan("slow.bin", b"slow".to_vec()).await,
        408,
        "request_timeout",
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The abandoned scan gave its clamd slot back.
    wait_backend_in_flight(&gw, 0).await;
}

/// Scans in flight on the first backend, as /readyz reports them.
async fn backend_in_flight(gw: &Gateway) -> u64 {
    let (_, ready) = gw.readyz().await;
    ready["backends"][0]["in_flight"]
        .as_u64()
        .unwrap_or_else(|| panic!("no in_flight in {ready}"))
}

/// Waits (up to 10 s) until the first backend has `n` scans in flight.
async fn wait_backend_in_flight(gw: &Gateway, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend_in_flight(gw).await != n {
        assert!(Instant::now() < deadline, "never {n} scan(s) in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
