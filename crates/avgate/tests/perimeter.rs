//! The perimeter against real sockets: rate limits, IP lists, trusted
//! proxies, slow and idle clients.

mod common;

use std::time::{Duration, Instant};

use avgate::auth::manage::{self, Actor, TokenOptions};
use avgate::config::{ByteSize, Humantime};
use avgate::store::{clock, SqliteStore, Store};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn scan_with(gw: &Gateway, headers: &[(&str, &str)]) -> reqwest::Response {
    let part = reqwest::multipart::Part::bytes(EICAR.to_vec()).file_name("eicar.com");
    let mut req = gw
        .client
        .post(gw.url("/v1/scan"))
        .multipart(reqwest::multipart::Form::new().part("file", part));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_past_the_burst_gets_429_with_retry_after() {
    let clamd = Clamd::start("");
    let mut cfg = config(&[clamd.address()]);
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.per_ip = "1/m".parse().unwrap();
    cfg.rate_limit.per_ip_burst = 3;
    let gw = Gateway::start(cfg).await;
    for i in 0..3 {
        let r = scan_with(&gw, &[]).await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.headers()["ratelimit-limit"], "3");
        assert_eq!(
            r.headers()["ratelimit-remaining"],
            (2 - i).to_string().as_str()
        );
    }
    let r = scan_with(&gw, &[]).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    let (_, body) = json(r).await;
    assert_eq!(body["status"], "ERROR");
    assert_eq!(body["error"]["code"], "rate_limited");
    // Health checks are not rate limited.
    for _ in 0..10 {
        let r = gw.client.get(gw.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_lists_refuse_before_reading_the_body() {
    let clamd = Clamd::start("");

    // Not on the allow list.
    let mut cfg = config(&[clamd.address()]);
    cfg.network.allow = vec!["203.0.113.0/24".into()];
    let gw = Gateway::start(cfg).await;
    let r = scan_with(&gw, &[]).await;
    assert_eq!(r.status(), 403);
    assert_eq!(json(r).await.1["error"]["code"], "ip_forbidden");
    gw.stop().await;

    // Denied, even though allowed.
    let mut cfg = config(&[clamd.address()]);
    cfg.network.allow = vec!["127.0.0.0/8".into()];
    cfg.network.deny = vec!["127.0.0.1".into()];
    let gw = Gateway::start(cfg).await;
    assert_eq!(scan_with(&gw, &[]).await.status(), 403);
    gw.stop().await;

    // IPv6: allowed ::1, then denied ::1.
    for (allow, deny, want) in [(vec!["::1/128"], vec![], 200), (vec![], vec!["::1"], 403)] {
        let mut cfg = config(&[clamd.address()]);
        cfg.listen = "[::1]:0".parse().unwrap();
        cfg.network.allow = allow.into_iter().map(String::from).collect();
        cfg.network.deny = deny.into_iter().map(String::from).collect();
        let gw = Gateway::start(cfg).await;
        assert_eq!(scan_with(&gw, &[]).await.status(), want);
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    let clamd = Clamd::start("");
    let denied = "203.0.113.7";

    // avgate behind a trusted proxy (the test client, on 127.0.0.1).
    let mut cfg = config(&[clamd.address()]);
    cfg.network.trusted_proxies = vec!["127.0.0.1".into()];
    cfg.network.deny = vec![denied.into()];
    let gw = Gateway::start(cfg).await;
    let cases = [
        (denied.to_string(), 403),
        // The proxy appended the real client on the right.
        (format!("198.51.100.1, {denied}"), 403),
        // The client forged the left entry; the right-most untrusted is real.
        (format!("{denied}, 198.51.100.1"), 200),
        // Proxy chains: trusted hops on the right are skipped.
        (format!("{denied}, 127.0.0.1"), 403),
    ];
    for (xff, want) in cases {
        let r = scan_with(&gw, &[("x-forwarded-for", &xff)]).await;
        assert_eq!(r.status(), want, "X-Forwarded-For: {xff}");
    }
    gw.stop().await;

    // No trusted proxies: a forged header changes nothing.
    let mut cfg = config(&[clamd.address()]);
    cfg.network.deny = vec![denied.into()];
    let gw = Gateway::start(cfg).await;
    let r = scan_with(&gw, &[("x-forwarded-for", denied)]).await;
    assert_eq!(r.status(), 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waits_retry_after_gets_through() {
    let clamd = Clamd::start("");
    let mut cfg = config(&[clamd.address()]);
    cfg.rate_limit.enabled = true;
    // One request every 3 s: the wait after a refusal is just under 3 s,
    // which must be announced as 3, not 2.
    cfg.rate_limit.per_ip = "20/m".parse().unwrap();
    cfg.rate_limit.per_ip_burst = 1;
    let gw = Gateway::start(cfg).await;
    assert_eq!(scan_with(&gw, &[]).await.status(), 200);
    let refused = scan_with(&gw, &[]).await;
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        refused.headers()["ratelimit-reset"].to_str().unwrap(),
        wait.to_string()
    );
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(scan_with(&gw, &[]).await.status(), 200, "waited {wait} s");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_client_cannot_step_around_the_rate_limit_within_its_64() {
    let clamd = Clamd::start("");
    // Behind a trusted proxy, so that the test can speak for IPv6 clients.
    let mut cfg = config(&[clamd.address()]);
    cfg.network.trusted_proxies = vec!["127.0.0.1".into()];
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.per_ip = "1/m".parse().unwrap();
    cfg.rate_limit.per_ip_burst = 2;
    let gw = Gateway::start(cfg).await;
    let from = |client: &'static str| scan_with_forwarded(&gw, client);
    assert_eq!(from("2001:db8:0:1::1").await, 200);
    assert_eq!(from("2001:db8:0:1::2").await, 200);
    // A third address of the same /64: the same client, over its burst.
    assert_eq!(from("2001:db8:0:1:abcd::99").await, 429);
    // Another /64, and an IPv4 client, have buckets of their own.
    assert_eq!(from("2001:db8:0:2::1").await, 200);
    assert_eq!(from("198.51.100.1").await, 200);
    assert_eq!(from("198.51.100.2").await, 200);
    gw.stop().await;
}

async fn scan_with_forwarded(gw: &Gateway, client: &str) -> u16 {
    scan_with(gw, &[("x-forwarded-for", client)])
        .await
        .status()
        .as_u16()
}

/// Reads until the server closes the connection (or `limit` passes);
/// returns what it sent and how long that took.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&got).into(),
                    Some(started.elapsed()),
                )
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into(), None),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off_while_others_are_served() {
    let clamd = Clamd::start("");
    let mut cfg = config(&[clamd.address()]);
    cfg.header_timeout = Humantime(Duration::from_secs(2));
    cfg.min_upload_rate = ByteSize(10_000);
    cfg.min_upload_window = Humantime(Duration::from_secs(2));
    let gw = std::sync::Arc::new(Gateway::start(cfg).await);
    let addr = gw.addr;

    // Idle: connects and says nothing.
    let idle = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        read_until_closed(&mut s, Duration::from_secs(10)).await
    });
    // Slow headers: one byte every 200 ms, never finishing.
    let slow_header = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let head = b"POST /v1/scan/raw HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for b in head.iter() {
            if s.write_all(&[*b]).await.is_err() {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            if started.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        // Still open after 10 s: the deadline did not work.
        Duration::from_secs(3600)
    });
    // Slow body: complete headers, then 10 bytes every 500 ms.
    let slow_body = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /v1/scan/raw HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while started.elapsed() < Duration::from_secs(10) {
            if s.write_all(&[b'a'; 10]).await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    });

    // Meanwhile a normal client is served, repeatedly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        let started = Instant::now();
        gw.scan_expecting("eicar.com", EICAR.to_vec(), "FOUND")
            .await;
        assert!(started.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let (_, closed) = idle.await.unwrap();
    let closed = closed.expect("idle connection still open after 10 s");
    assert!(
        closed < Duration::from_secs(4),
        "idle closed after {closed:?}"
    );
    let took = slow_header.await.unwrap();
    assert!(
        took < Duration::from_secs(5),
        "slow-header client held {took:?}"
    );
    let (answer, took) = slow_body.await.unwrap();
    assert!(
        took < Duration::from_secs(6),
        "slow-body client held {took:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("upload_too_slow"), "{answer}");
}

/// Tokens for the tests below, created in the store as the CLI does.
/// A connection from 127.0.0.2 (loopback too): another client address
/// than the test's HTTP client, which uses 127.0.0.1.
async fn connect_from_127_0_0_2(gw: &Gateway) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    socket.connect(gw.addr).await.unwrap()
}

/// Sends `GET /healthz` on `s` and reads the start of the answer.
async fn healthz_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: avgate\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A connection from 127.0.0.2 that is served (`/healthz` answered), kept
/// open.
async fn served_from_127_0_0_2(gw: &Gateway) -> TcpStream {
    let mut s = connect_from_127_0_0_2(gw).await;
    let answer = healthz_on(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    s
}

/// One client address cannot hold every connection: past
/// `max_connections_per_ip` its new connections are closed at once, while
/// other clients still get in (and a trusted proxy, which carries many
/// clients, is not limited); a connection it closes makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_every_connection() {
    let clamd = Clamd::start("");
    let mut cfg = config(&[clamd.address()]);
    cfg.max_connections_per_ip = 3;
    let gw = Gateway::start(cfg).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(served_from_127_0_0_2(&gw).await);
    }
    // The fourth: closed before it is read.
    let mut fourth = connect_from_127_0_0_2(&gw).await;
    let _ = fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: avgate\r\n\r\n")
        .await;
    let (answer, closed) = read_until_closed(&mut fourth, Duration::from_secs(5)).await;
    assert!(answer.is_empty(), "{answer}");
    assert!(
        closed.is_some_and(|t| t < Duration::from_secs(2)),
        "{closed:?}"
    );
    let metrics = gw.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "avgate_connections_refused_total 1"),
        "{metrics}"
    );
    // Another address meanwhile: served.
    let r = gw.client.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // One closed: room for the next.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _again = served_from_127_0_0_2(&gw).await;
    gw.stop().await;

    let mut cfg = config(&[clamd.address()]);
    cfg.max_connections_per_ip = 1;
    cfg.network.trusted_proxies = vec!["127.0.0.2/32".into()];
    let gw = Gateway::start(cfg).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(served_from_127_0_0_2(&gw).await);
    }
    gw.stop().await;
}

async fn token(dir: &std::path::Path, name: &str, edit: impl FnOnce(&mut TokenOptions)) -> String {
    let store = SqliteStore::open(dir).unwrap();
    let mut options = TokenOptions {
        name: name.into(),
        ..Default::default()
    };
    edit(&mut options);
    let spec = options.validate(clock::now()).unwrap();
    let created = manage::create(&store, spec, &Actor::cli()).await.unwrap();
    created.token.expose().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_lock_out_the_address_even_for_a_good_token() {
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let good = token(dir.path(), "good", |_| {}).await;
    let mut cfg = config(&[clamd.address()]);
    cfg.auth.required = true;
    cfg.data_dir = dir.path().to_owned();
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.auth_failures = "1/m".parse().unwrap();
    cfg.rate_limit.auth_failures_burst = 3;
    let gw = Gateway::start(cfg).await;

    let r = scan_with(&gw, &[("authorization", &format!("Bearer {good}"))]).await;
    assert_eq!(r.status(), 200, "a good token works at first");
    for i in 0..3 {
        let r = scan_with(&gw, &[("authorization", "Bearer avg_guess")]).await;
        assert_eq!(r.status(), 401, "attempt {i}");
    }
    // The address has used up its failures: refused before the token is
    // even looked at, so guessing cannot go on.
    let r = scan_with(&gw, &[("authorization", &format!("Bearer {good}"))]).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(json(r).await.1["error"]["code"], "too_many_auth_failures");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_has_its_own_rate_and_address_list() {
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let slow = token(dir.path(), "slow", |o| {
        o.rate = Some("1/m".into());
        o.burst = Some(2);
    })
    .await;
    let elsewhere = token(dir.path(), "elsewhere", |o| {
        o.allow_ips = vec!["203.0.113.0/24".into(), "2001:db8::/32".into()];
    })
    .await;
    let other = token(dir.path(), "other", |_| {}).await;
    let mut cfg = config(&[clamd.address()]);
    cfg.auth.required = true;
    cfg.data_dir = dir.path().to_owned();
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.per_ip_burst = 1000;
    let gw = Gateway::start(cfg).await;
    let auth = |t: &str| format!("Bearer {t}");

    for i in 0..2 {
        let r = scan_with(&gw, &[("authorization", &auth(&slow))]).await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.headers()["ratelimit-limit"], "2");
    }
    let r = scan_with(&gw, &[("authorization", &auth(&slow))]).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(json(r).await.1["error"]["code"], "rate_limited");
    // Another token from the same address is not affected.
    let r = scan_with(&gw, &[("authorization", &auth(&other))]).await;
    assert_eq!(r.status(), 200);

    // A token bound to other addresses is refused from here, and that is
    // in the audit trail (a leaked token used elsewhere looks like this).
    let r = scan_with(&gw, &[("authorization", &auth(&elsewhere))]).await;
    assert_eq!(r.status(), 403);
    assert_eq!(json(r).await.1["error"]["code"], "ip_forbidden");
    let store = SqliteStore::open(dir.path()).unwrap();
    let elsewhere_id = store
        .find_token("elsewhere")
        .await
        .unwrap()
        .expect("the token")
        .id;
    // Each such use counts as a failed authentication: the address is
    // soon refused before any token is looked at, so a leaked token used
    // from elsewhere cannot fill the audit table at the request rate.
    let mut codes = Vec::new();
    for _ in 0..20 {
        let r = scan_with(&gw, &[("authorization", &auth(&elsewhere))]).await;
        codes.push(json(r).await.1["error"]["code"].clone());
    }
    assert_eq!(codes.last().unwrap(), "too_many_auth_failures", "{codes:?}");
    let audit = store.recent_audit(1000).await.unwrap();
    let used_elsewhere = audit
        .iter()
        .filter(|r| {
            r.event == "auth_refused"
                && r.token_id.as_deref() == Some(elsewhere_id.as_str())
                && r.detail
                    .as_deref()
                    .unwrap_or("")
                    .starts_with("ip_forbidden")
        })
        .count();
    assert!(
        (1..=11).contains(&used_elsewhere),
        "{used_elsewhere} ip_forbidden rows: {audit:?}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_slow_requests_are_not() {
    let clamd = Clamd::start("");
    let mut cfg = config(&[clamd.address()]);
    cfg.header_timeout = Humantime(Duration::from_secs(1));
    cfg.idle_timeout = Humantime(Duration::from_secs(2));
    cfg.min_upload_rate = ByteSize(0);
    let gw = std::sync::Arc::new(Gateway::start(cfg).await);
    let addr = gw.addr;

    // HTTP/2: the connection preface and an empty SETTINGS frame, then
    // nothing. hyper alone would keep this open forever.
    let h2_idle = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        read_until_closed(&mut s, Duration::from_secs(10)).await
    });
    // HTTP/1.1 keep-alive: one request, answered, then silence.
    let h1_idle = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_until_closed(&mut s, Duration::from_secs(10)).await
    });
    // A raw upload that takes 4 s (twice the idle timeout), 4 KiB every
    // 100 ms: in progress all along, so never idle.
    let slow_upload = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /v1/scan/raw?filename=slow.bin HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let chunk = random_bytes(4096, 7);
        for _ in 0..40 {
            s.write_all(b"1000\r\n").await.unwrap();
            s.write_all(&chunk).await.unwrap();
            s.write_all(b"\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s.write_all(b"0\r\n\r\n").await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        String::from_utf8_lossy(&answer[..n]).into_owned()
    });

    let (sent, closed) = h2_idle.await.unwrap();
    let closed = closed.expect("an HTTP/2 connection without requests still open after 10 s");
    assert!(closed < Duration::from_secs(4), "closed after {closed:?}");
    // The server's SETTINGS, then a GOAWAY frame (type 7).
    assert!(!sent.is_empty());
    let (answer, closed) = h1_idle.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let closed = closed.expect("an idle keep-alive connection still open after 10 s");
    assert!(closed < Duration::from_secs(5), "closed after {closed:?}");

    let answer = slow_upload.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"status\":\"OK\""), "{answer}");
    assert!(answer.contains("\"size\":163840"), "{answer}");
}

/// A bare HTTP/2 client that writes frames itself: it can stay silent
/// where a real client (the h2 crate) would answer PINGs and GOAWAYs.
struct RawH2 {
    s: TcpStream,
    buf: Vec<u8>,
    /// Frames seen: type, flags, stream.
    seen: Vec<(u8, u8, u32)>,
    /// Answer the server's PINGs and SETTINGS (a live client) or not.
    ack: bool,
}

impl RawH2 {
    const HEADERS: u8 = 1;
    const GOAWAY: u8 = 7;

    async fn connect(addr: std::net::SocketAddr) -> RawH2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&Self::frame(4, 0, 0, &[])).await.unwrap();
        RawH2 {
            s,
            buf: Vec::new(),
            seen: Vec::new(),
            ack: true,
        }
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// HEADERS for `method` (0x82 GET, 0x83 POST, HPACK static entries)
    /// on `path`, with more header fields already encoded.
    async fn request(&mut self, stream: u32, method: u8, path: &str, more: &[u8], end: bool) {
        let mut block = vec![method, 0x86, 0x41, 0x01, b'x', 0x04, path.len() as u8];
        block.extend_from_slice(path.as_bytes());
        block.extend_from_slice(more);
        let flags = 0x4 | if end { 0x1 } else { 0 };
        let f = Self::frame(Self::HEADERS, flags, stream, &block);
        self.s.write_all(&f).await.unwrap();
    }

    /// Reads frames for `d`; false once the server has closed.
    async fn read_for(&mut self, d: Duration) -> bool {
        let until = Instant::now() + d;
        let mut tmp = [0u8; 16384];
        loop {
            while self.buf.len() >= 9 {
                let len = usize::from(self.buf[0]) << 16
                    | usize::from(self.buf[1]) << 8
                    | usize::from(self.buf[2]);
                if self.buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (self.buf[3], self.buf[4]);
                let stream = u32::from_be_bytes(self.buf[5..9].try_into().unwrap()) & 0x7fff_ffff;
                let payload = self.buf[9..9 + len].to_vec();
                self.buf.drain(..9 + len);
                self.seen.push((kind, flags, stream));
                let unacked = flags & 1 == 0;
                if self.ack && unacked && (kind == 4 || kind == 6) {
                    let ack = Self::frame(kind, 1, 0, if kind == 6 { &payload } else { &[] });
                    let _ = self.s.write_all(&ack).await;
                }
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            match tokio::time::timeout(until - now, self.s.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
                Err(_) => return true,
            }
        }
    }

    fn saw(&self, kind: u8, stream: u32) -> bool {
        self.seen
            .iter()
            .any(|&(k, _, s)| k == kind && (s == stream || kind == Self::GOAWAY))
    }
}

/// At shutdown, an HTTP/2 client that went silent after its request (it
/// will never acknowledge the GOAWAY's PING) does not hold the process for
/// the whole shutdown_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_http2_client_does_not_hold_up_shutdown() {
    let mut cfg = config(&["tcp://127.0.0.1:1".to_owned()]);
    cfg.header_timeout = Humantime(Duration::from_secs(20));
    cfg.idle_timeout = Humantime(Duration::from_secs(60));
    cfg.shutdown_timeout = Humantime(Duration::from_secs(10));
    let gw = Gateway::start_unready(cfg).await;
    let mut h2 = RawH2::connect(gw.addr).await;
    h2.request(1, 0x82, "/healthz", &[], true).await;
    assert!(h2.read_for(Duration::from_millis(500)).await);
    assert!(h2.saw(RawH2::HEADERS, 1), "answered: {:?}", h2.seen);
    h2.ack = false;
    let started = Instant::now();
    gw.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "stopping took {took:?}");
}

/// HTTP/2 still accepts a stream for a round trip after its first idle
/// GOAWAY. Such a request is answered before the connection is closed, even
/// when it takes longer than the grace the idle close gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_crosses_an_idle_http2_close_is_answered() {
    let mut cfg = config(&["tcp://127.0.0.1:1".to_owned()]);
    cfg.header_timeout = Humantime(Duration::from_secs(2));
    cfg.idle_timeout = Humantime(Duration::from_secs(2));
    cfg.min_upload_rate = ByteSize(0);
    let gw = Gateway::start_unready(cfg).await;
    let mut h2 = RawH2::connect(gw.addr).await;
    h2.request(1, 0x82, "/healthz", &[], true).await;
    // Silent until the idle close begins, as a client that has not seen
    // the GOAWAY yet.
    h2.ack = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h2.saw(RawH2::GOAWAY, 0) {
        assert!(
            h2.read_for(Duration::from_millis(20)).await,
            "closed: {:?}",
            h2.seen
        );
        assert!(Instant::now() < deadline, "no idle GOAWAY: {:?}", h2.seen);
    }
    // Now a raw upload of 60,000 bytes over about 4 s, twice the grace.
    let mut more = vec![0x5f, 24];
    more.extend_from_slice(b"application/octet-stream");
    more.extend_from_slice(&[0x5c, 5]);
    more.extend_from_slice(b"60000");
    h2.request(3, 0x83, "/v1/scan/raw", &more, false).await;
    h2.ack = true;
    for i in 0..6 {
        let data = RawH2::frame(0, u8::from(i == 5), 3, &[b'a'; 10_000]);
        h2.s.write_all(&data)
            .await
            .expect("the connection stays open");
        assert!(
            h2.read_for(Duration::from_millis(700)).await,
            "closed mid-upload: {:?}",
            h2.seen
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !h2.saw(RawH2::HEADERS, 3) {
        assert!(
            h2.read_for(Duration::from_millis(50)).await,
            "closed unanswered: {:?}",
            h2.seen
        );
        assert!(Instant::now() < deadline, "no answer: {:?}", h2.seen);
    }
    gw.stop().await;
}
