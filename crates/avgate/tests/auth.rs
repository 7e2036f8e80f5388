//! API tokens against a real clamd: bad credentials of every kind are
//! refused on every scan route, quotas stop at exactly their number, the
//! per-token concurrency limit holds, the admin API works only for admin
//! tokens, and the real binary never writes a token to its logs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use avgate::auth::manage::{self, Actor, TokenOptions};
use avgate::auth::token::Token;
use avgate::config::Config;
use avgate::store::{clock, SqliteStore, Store, Usage};
use common::binary::Server;
use common::*;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde_json::{json, Value};

const SCAN_ROUTES: &[&str] = &["/v1/scan", "/scan", "/v1/scan/batch", "/v1/scan/raw"];

/// A gateway with tokens required, its store in `dir`, and the
/// failed-authentication limit out of the way (it has its own tests):
/// here every refusal must be the auth extractor's.
fn auth_config(clamd: &Clamd, dir: &Path) -> Config {
    let mut c = config(&[clamd.address()]);
    c.auth.required = true;
    c.data_dir = dir.to_owned();
    c.rate_limit.auth_failures = "100000/s".parse().unwrap();
    c.rate_limit.auth_failures_burst = 1_000_000;
    c
}

/// Creates a token in the store, as `avgate token create` does.
async fn issue(
    store: &SqliteStore,
    name: &str,
    edit: impl FnOnce(&mut TokenOptions),
) -> (String, String) {
    let mut options = TokenOptions {
        name: name.into(),
        ..Default::default()
    };
    edit(&mut options);
    let spec = options.validate(clock::now()).unwrap();
    let created = manage::create(store, spec, &Actor::cli()).await.unwrap();
    (created.token.expose().to_owned(), created.view.id)
}

/// Credentials as sent: zero or more `Authorization` values.
type Creds = Vec<HeaderValue>;

fn bearer(token: &str) -> Creds {
    vec![HeaderValue::from_str(&format!("Bearer {token}")).unwrap()]
}

/// POSTs `data` to a scan route (multipart or raw, as the route wants).
async fn post(gw: &Gateway, path: &str, creds: &Creds, data: &[u8]) -> (u16, Value, HeaderMap) {
    let mut request = gw.client.post(gw.url(path));
    for value in creds {
        request = request.header(AUTHORIZATION, value.clone());
    }
    request = if path.ends_with("/raw") || path.contains("/raw?") {
        request
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
    } else {
        let part = reqwest::multipart::Part::bytes(data.to_vec()).file_name("f.bin");
        request.multipart(reqwest::multipart::Form::new().part("file", part))
    };
    let r = request.send().await.expect("request");
    let headers = r.headers().clone();
    let (status, body) = json(r).await;
    (status, body, headers)
}

async fn admin(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = gw
        .client
        .request(method, gw.url(path))
        .header(AUTHORIZATION, format!("Bearer {token}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    json(request.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_bad_credential_is_ever_accepted() {
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let (good, _) = issue(&store, "good", |_| {}).await;
    let (revoked, revoked_id) = issue(&store, "revoked", |_| {}).await;
    manage::revoke(&store, &revoked_id, &Actor::cli())
        .await
        .unwrap();
    let (expired, expired_id) = {
        let spec = TokenOptions {
            name: "expired".into(),
            ..Default::default()
        }
        .validate(0)
        .map(|mut s| {
            s.expires_at = Some(clock::now() - 1);
            s
        })
        .unwrap();
        let c = manage::create(&store, spec, &Actor::cli()).await.unwrap();
        (c.token.expose().to_owned(), c.view.id)
    };
    let gw = Gateway::start(auth_config(&clamd, dir.path())).await;

    // The control: the good token scans on every route.
    for path in SCAN_ROUTES {
        let (status, body, _) = post(&gw, path, &bearer(&good), EICAR).await;
        assert_eq!(status, 200, "{path}: {body}");
    }

    let unknown = Token::generate().unwrap().expose().to_owned();
    let mut wrong_checksum = good.clone().into_bytes();
    let last = wrong_checksum.len() - 1;
    wrong_checksum[last] = if wrong_checksum[last] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let wrong_checksum = String::from_utf8(wrong_checksum).unwrap();
    let mut flipped_body = good.clone().into_bytes();
    flipped_body[10] = if flipped_body[10] == b'x' { b'y' } else { b'x' };
    let flipped_body = String::from_utf8(flipped_body).unwrap();
    let header = |s: &str| vec![HeaderValue::from_str(s).unwrap()];
    let mut attempts: Vec<(&str, Creds)> = vec![
        ("absent", vec![]),
        ("empty", header("")),
        ("scheme only", header("Bearer")),
        ("basic", header("Basic Z29vZDpwYXNzd29yZA==")),
        ("no scheme", header(&good)),
        ("other scheme", header(&format!("Token {good}"))),
        ("trailing junk", header(&format!("Bearer {good} x"))),
        ("one char more", header(&format!("Bearer {good}0"))),
        (
            "truncated",
            header(&format!("Bearer {}", &good[..good.len() - 1])),
        ),
        ("prefix only", header("Bearer avg_")),
        (
            "upper-case prefix",
            header(&format!("Bearer AVG_{}", &good[4..])),
        ),
        ("wrong checksum", bearer(&wrong_checksum)),
        ("a changed character", bearer(&flipped_body)),
        ("unknown", bearer(&unknown)),
        ("revoked", bearer(&revoked)),
        ("expired", bearer(&expired)),
        (
            "not ascii",
            vec![HeaderValue::from_bytes(b"Bearer avg_\xe9\xe9").unwrap()],
        ),
        (
            "good and bad",
            vec![bearer(&good).remove(0), bearer(&unknown).remove(0)],
        ),
    ];
    // Many random tokens with a valid checksum: none is known.
    let random: Vec<String> = (0..100)
        .map(|_| Token::generate().unwrap().expose().to_owned())
        .collect();
    for t in &random {
        attempts.push(("random", bearer(t)));
    }

    let mut messages = std::collections::HashSet::new();
    for round in 0..3 {
        for (what, creds) in &attempts {
            if *what == "random" && round > 0 {
                continue;
            }
            for path in SCAN_ROUTES {
                let (status, body, headers) = post(&gw, path, creds, EICAR).await;
                assert_eq!(status, 401, "{what} on {path}: {body}");
                assert_eq!(body["status"], "ERROR", "{what}");
                assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
                assert!(
                    headers["www-authenticate"]
                        .to_str()
                        .unwrap()
                        .starts_with("Bearer"),
                    "{what}"
                );
                messages.insert(body.to_string());
            }
        }
    }
    assert_eq!(messages.len(), 1, "refusals must look alike: {messages:?}");

    // A token in the query string is refused, even a good one, even with
    // a good header.
    for (query, creds) in [
        (format!("token={good}"), vec![]),
        (format!("access_token={good}"), bearer(&good)),
        (format!("api_key={good}"), vec![]),
        (format!("filename=a.txt&t={good}"), bearer(&good)),
        ("apikey=whatever".to_owned(), bearer(&good)),
        // Percent-encoded, as the handlers decode it: `?filename=` of the
        // raw endpoint would otherwise log the token as the file's name.
        (format!("filename=%61{}", &good[1..]), bearer(&good)),
        (
            format!(
                "filename={}%{:02X}{}",
                &good[..20],
                good.as_bytes()[20],
                &good[21..]
            ),
            bearer(&good),
        ),
    ] {
        for path in SCAN_ROUTES {
            let url = format!("{path}?{query}");
            let (status, body, _) = post(&gw, &url, &creds, EICAR).await;
            assert_eq!(status, 400, "{url}: {body}");
            assert_eq!(body["error"]["code"], "token_in_query", "{url}");
        }
    }

    // In the path, encoded or on a route that does not exist: refused as
    // a token in the URL, never echoed back.
    for path in [
        format!("/v1/admin/tokens/%61{}", &good[1..]),
        format!("/v1/scan/{good}"),
        format!("/v1/nope/%61{}", &good[1..]),
    ] {
        for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
            let (status, answer) = admin(&gw, method.clone(), &path, &good, None).await;
            assert_eq!(status, 400, "{method} {path}: {answer}");
            assert_eq!(answer["error"]["code"], "token_in_query", "{path}");
            assert!(!answer.to_string().contains(&good[4..]), "{answer}");
        }
    }

    // Wrong scope: a scan token does not reach the admin API.
    for (method, path) in [
        (reqwest::Method::GET, "/v1/admin/tokens"),
        (reqwest::Method::POST, "/v1/admin/tokens"),
        (reqwest::Method::DELETE, "/v1/admin/tokens/good"),
        (reqwest::Method::GET, "/v1/admin/tokens/good/usage"),
        (reqwest::Method::GET, "/v1/admin/audit"),
    ] {
        let body =
            (method == reqwest::Method::POST).then(|| json!({"name": "sneaky", "scope": "admin"}));
        let (status, answer) = admin(&gw, method.clone(), path, &good, body).await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert_eq!(answer["error"]["code"], "forbidden");
        let r = gw
            .client
            .request(method.clone(), gw.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method} {path} without a token");
    }
    assert!(
        store.find_token("sneaky").await.unwrap().is_none(),
        "a scan token created a token"
    );
    let (status, _, _) = post(&gw, "/v1/scan", &bearer(&good), EICAR).await;
    assert_eq!(status, 200, "the good token still works");

    // Public routes stay public.
    for path in ["/healthz", "/readyz", "/version"] {
        let r = gw.client.get(gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    // Every refusal is in the audit trail, with its reason; no token is.
    let audit = store.recent_audit(10_000).await.unwrap();
    let refused: Vec<_> = audit.iter().filter(|r| r.event == "auth_refused").collect();
    assert!(
        refused.len() > 3 * 18 * 4,
        "{} refusals recorded",
        refused.len()
    );
    for reason in [
        "missing",
        "malformed",
        "bad_checksum",
        "unknown",
        "revoked",
        "expired",
        "token_in_query",
        "wrong_scope",
    ] {
        assert!(
            refused
                .iter()
                .any(|r| r.detail.as_deref().unwrap_or("").starts_with(reason)),
            "no {reason} refusal in the audit trail"
        );
    }
    assert!(refused
        .iter()
        .any(|r| r.token_id.as_deref() == Some(revoked_id.as_str())));
    assert!(refused
        .iter()
        .any(|r| r.token_id.as_deref() == Some(expired_id.as_str())));
    let everything = format!("{audit:?}");
    for secret in [&good, &revoked, &expired, &unknown] {
        assert!(
            !everything.contains(&secret[4..]),
            "a token in the audit trail"
        );
    }
    gw.stop().await;
}

/// A client without a token that sends its whole upload before reading
/// gets the 401, not a reset: avgate refuses before reading the body, then
/// reads and discards the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_sent_in_full_still_gets_its_401() {
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(auth_config(&clamd, dir.path())).await;
    let upload = random_bytes(16 << 20, 21);
    let head = format!(
        "POST /v1/scan/raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        upload.len()
    );
    let answer = send_all_then_read(gw.addr, &head, &upload)
        .await
        .expect("the connection stays up until the answer is read");
    assert_raw_error(&answer, 401, "unauthorized");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_stop_at_exactly_their_number() {
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let (files3, files3_id) = issue(&store, "three-files", |o| o.monthly_files = Some(3)).await;
    let (batch2, batch2_id) = issue(&store, "two-files", |o| o.monthly_files = Some(2)).await;
    let (bytes100, bytes100_id) = issue(&store, "hundred-bytes", |o| {
        o.monthly_bytes = Some(avgate::config::ByteSize(100))
    })
    .await;
    let mut cfg = auth_config(&clamd, dir.path());
    cfg.max_size = avgate::config::ByteSize(4096);
    let gw = Gateway::start(cfg).await;
    let month = clock::Month::current();

    // Files: three scans, then 429 on every route.
    for i in 0..3 {
        let (status, body, _) = post(&gw, SCAN_ROUTES[i % 4], &bearer(&files3), b"clean").await;
        assert_eq!(status, 200, "scan {i}: {body}");
    }
    for path in SCAN_ROUTES {
        let (status, body, headers) = post(&gw, path, &bearer(&files3), b"clean").await;
        assert_eq!(status, 429, "{path}: {body}");
        assert_eq!(body["error"]["code"], "quota_exceeded");
        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=31 * 86_400).contains(&retry), "{retry}");
    }
    let used = store.usage(&files3_id, month).await.unwrap();
    assert_eq!((used.files, used.bytes), (3, 15));

    // A batch of three with two files left: two scanned, the third refused,
    // and the two results are in the answer.
    let form = (0..3).fold(reqwest::multipart::Form::new(), |f, i| {
        f.part(
            "file",
            reqwest::multipart::Part::bytes(b"clean".to_vec()).file_name(format!("{i}.txt")),
        )
    });
    let r = gw
        .client
        .post(gw.url("/v1/scan/batch"))
        .bearer_auth(&batch2)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "quota_exceeded");
    assert_eq!(body["results"].as_array().unwrap().len(), 2, "{body}");
    assert_eq!(store.usage(&batch2_id, month).await.unwrap().files, 2);

    // Bytes: what Content-Length says must fit; the real size is counted.
    for (size, want) in [(60, 200), (41, 429), (40, 200), (1, 429)] {
        let (status, body, _) =
            post(&gw, "/v1/scan/raw", &bearer(&bytes100), &vec![b'a'; size]).await;
        assert_eq!(status, want, "{size} bytes: {body}");
        if want == 429 {
            assert_eq!(body["error"]["code"], "quota_exceeded");
            // 41 bytes with 40 left is not "used up": the message says so.
            let message = body["error"]["message"].as_str().unwrap();
            if size == 41 {
                assert!(message.contains("40 of 100 bytes"), "{message}");
            } else {
                assert!(message.contains("used up"), "{message}");
            }
        }
    }
    let used = store.usage(&bytes100_id, month).await.unwrap();
    assert_eq!((used.files, used.bytes), (2, 100));

    // Without a Content-Length (chunked, as HTTP/2 or a pipe sends it),
    // the bytes are counted as they arrive: the quota still holds, and
    // uploads at the same time cannot share what is left between them.
    let (chunked, chunked_id) = issue(&store, "chunked-100", |o| {
        o.monthly_bytes = Some(avgate::config::ByteSize(100))
    })
    .await;
    let raw_chunked = |data: Vec<u8>| {
        let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(data)]);
        let request = gw
            .client
            .post(gw.url("/v1/scan/raw"))
            .bearer_auth(&chunked)
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(chunks));
        async move { json(request.send().await.unwrap()).await }
    };
    let (status, body) = raw_chunked(vec![b'a'; 4000]).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "quota_exceeded");
    let uploads: Vec<_> = (0..8).map(|_| raw_chunked(vec![b'b'; 30])).collect();
    let answers = futures_util::future::join_all(uploads).await;
    let scanned = answers.iter().filter(|(s, _)| *s == 200).count() as u64;
    for (status, body) in &answers {
        assert!(
            *status == 200 || body["error"]["code"] == "quota_exceeded",
            "{status}: {body}"
        );
    }
    assert!(
        (1..=3).contains(&scanned),
        "{scanned} of 8 fit in 100 bytes"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let used = store.usage(&chunked_id, month).await.unwrap();
        if used
            == (Usage {
                files: scanned,
                bytes: 30 * scanned,
            })
        {
            break;
        }
        assert!(Instant::now() < deadline, "{used:?} for {scanned} files");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Refused requests count nothing.
    let before = store.usage(&files3_id, month).await.unwrap();
    let (status, _, _) = post(&gw, "/v1/scan/raw", &bearer(&files3), b"x").await;
    assert_eq!(status, 429);
    assert_eq!(store.usage(&files3_id, month).await.unwrap(), before);

    // A file that was not scanned (over max_size, found out while
    // streaming) gives its place in the quota back.
    let (big, big_id) = issue(&store, "big-files", |o| o.monthly_files = Some(1)).await;
    let over = vec![b'a'; 4096 + 1];
    let (status, body, _) = post(&gw, "/v1/scan", &bearer(&big), &over).await;
    assert_eq!(status, 413, "{body}");
    let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(over.clone())]);
    let r = gw
        .client
        .post(gw.url("/v1/scan/raw"))
        .bearer_auth(&big)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.usage(&big_id, month).await.unwrap().files != 0 {
        assert!(Instant::now() < deadline, "the unscanned files still count");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body, _) = post(&gw, "/v1/scan", &bearer(&big), b"small").await;
    assert_eq!(
        status, 200,
        "the one file of the quota is still there: {body}"
    );
    gw.stop().await;
}

/// Uploads at once that together fit a token's byte quota are all
/// scanned: one still arriving holds no more of the quota than its
/// request can carry, so it does not crowd the others out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_at_once_that_fit_a_byte_quota_are_all_scanned() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let (token, id) = issue(&store, "bq", |o| {
        o.monthly_bytes = Some(avgate::config::ByteSize(100 * 1024))
    })
    .await;
    let gw = Gateway::start(auth_config(&clamd, dir.path())).await;
    let month = clock::Month::current();

    // A: 46,080 bytes declared, 45,056 of them sent, then a pause.
    let data = random_bytes(46_080, 31);
    let mut a = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/scan/raw HTTP/1.1\r\nHost: avgate\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    );
    a.write_all(head.as_bytes()).await.unwrap();
    a.write_all(&data[..45_056]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.usage(&id, month).await.unwrap().bytes < 45_056 {
        assert!(Instant::now() < deadline, "A's bytes were never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = store.usage(&id, month).await.unwrap().bytes;
    assert!(held <= 46_080, "A holds {held} bytes of the quota");

    // B meanwhile: 46,080 more fit in 102,400.
    let (status, body, _) = post(
        &gw,
        "/v1/scan/raw",
        &bearer(&token),
        &random_bytes(46_080, 32),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    a.write_all(&data[45_056..]).await.unwrap();
    let mut answer = String::new();
    a.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let used = store.usage(&id, month).await.unwrap();
        if used
            == (Usage {
                files: 2,
                bytes: 92_160,
            })
        {
            break;
        }
        assert!(Instant::now() < deadline, "{used:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.stop().await;
}

/// Another process that holds the state store's write lock (an operator's
/// `sqlite3` left inside a transaction, a backup tool) must not turn into
/// verdicts or lost counts. A scan that has to count against a quota waits
/// for the lock (at most `LOCK_WAIT`, 10 s, queued or not), then gets 503
/// `store_unavailable` with Retry-After, unscanned; once the lock is gone
/// the same tokens scan again, and only the answered scans count (also
/// when a client hung up while its reservation waited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_store_refuses_quota_scans_with_503_and_counts_nothing() {
    use avgate::store::sqlite::LOCK_WAIT;
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let (files, files_id) = issue(&store, "files", |o| o.monthly_files = Some(10)).await;
    let (bytes, bytes_id) = issue(&store, "bytes", |o| {
        o.monthly_bytes = Some(avgate::config::ByteSize(1_000_000))
    })
    .await;
    let (ops, _) = issue(&store, "ops", |o| {
        o.scope = Some(avgate::auth::Scope::Admin)
    })
    .await;
    let gw = Gateway::start(auth_config(&clamd, dir.path())).await;
    let month = clock::Month::current();
    for token in [&files, &bytes] {
        let (status, body, _) = post(&gw, "/v1/scan", &bearer(token), EICAR).await;
        assert_eq!((status, body["status"].as_str()), (200, Some("FOUND")));
    }

    let locker = rusqlite::Connection::open(dir.path().join("avgate.db")).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let started = Instant::now();
    let (files_creds, bytes_creds) = (bearer(&files), bearer(&bytes));
    // Three at once: one store operation runs, two queue behind it.
    let (a, b, c) = tokio::join!(
        post(&gw, "/v1/scan", &files_creds, EICAR),
        post(&gw, "/v1/scan/raw", &bytes_creds, EICAR),
        post(&gw, "/v1/scan/batch", &files_creds, EICAR),
    );
    let waited = started.elapsed();
    for (status, body, headers) in [a, b, c] {
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["status"], "ERROR", "{body}");
        assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
        assert!(body.get("verdict").is_none(), "{body}");
        assert!(headers.contains_key("retry-after"), "{headers:?}");
    }
    // Each waited out the lock, and the queued ones not once per
    // operation ahead of them (3 x LOCK_WAIT).
    assert!(
        waited >= LOCK_WAIT - Duration::from_secs(1) && waited < LOCK_WAIT * 3 / 2,
        "answered after {waited:?}"
    );

    // An admin call is not made unless the audit trail has it.
    let (status, body) = admin(&gw, reqwest::Method::GET, "/v1/admin/tokens", &ops, None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");

    // A client that hangs up while its file's reservation waits for the
    // lock: the reservation, made once the lock is gone, is given back.
    let hung_up = tokio::spawn({
        let request = gw
            .client
            .post(gw.url("/v1/scan"))
            .bearer_auth(&files)
            .multipart(reqwest::multipart::Form::new().part(
                "file",
                reqwest::multipart::Part::bytes(EICAR.to_vec()).file_name("f.bin"),
            ));
        async move { request.send().await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    hung_up.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);

    for token in [&files, &bytes] {
        let (status, body, _) = post(&gw, "/v1/scan", &bearer(token), EICAR).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("FOUND")),
            "{body}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counted = store.usage(&files_id, month).await.unwrap().files;
        if counted == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{counted} files counted for 2 scanned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let used = store.usage(&bytes_id, month).await.unwrap();
    assert_eq!(
        (used.files, used.bytes),
        (2, 2 * EICAR.len() as u64),
        "the refused scan was counted"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_cannot_take_more_than_its_concurrent_scans() {
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let (one, one_id) = issue(&store, "one-at-a-time", |o| o.max_concurrent = Some(1)).await;
    let (other, _) = issue(&store, "other", |_| {}).await;
    let gw = Gateway::start(auth_config(&clamd, dir.path())).await;

    // A slow upload holds the token's only slot.
    let start_slow = || {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
        let request = gw
            .client
            .post(gw.url("/v1/scan/raw"))
            .bearer_auth(&one)
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(tokio_stream_from(rx)));
        let slow = tokio::spawn(async move { json(request.send().await.unwrap()).await });
        (tx, slow)
    };
    let (mut tx, mut slow) = start_slow();
    tx.send(Ok(b"first bytes ".to_vec())).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if slow.is_finished() {
            // It came while a probe below held the slot: it was refused
            // as it should be. Start it again.
            let (status, body) = slow.await.unwrap();
            assert_eq!(status, 429, "{body}");
            (tx, slow) = start_slow();
            tx.send(Ok(b"first bytes ".to_vec())).await.unwrap();
        }
        let (status, body, headers) = post(&gw, "/v1/scan/raw", &bearer(&one), b"x").await;
        if status == 429 && !slow.is_finished() {
            assert_eq!(body["error"]["code"], "token_concurrency_limit", "{body}");
            assert!(headers.contains_key("retry-after"));
            break;
        }
        assert!(status == 200 || status == 429, "{body}");
        assert!(
            Instant::now() < deadline,
            "the slow upload never held the slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another token is not held up.
    let (status, body, _) = post(&gw, "/v1/scan/raw", &bearer(&other), b"x").await;
    assert_eq!(status, 200, "{body}");

    tx.send(Ok(EICAR.to_vec())).await.unwrap();
    drop(tx);
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = post(&gw, "/v1/scan/raw", &bearer(&one), b"x").await;
    assert_eq!(status, 200, "the slot is free again: {body}");
    // Without quotas, use is counted in memory; a clean stop writes it.
    gw.stop().await;
    assert!(
        store
            .usage(&one_id, clock::Month::current())
            .await
            .unwrap()
            .files
            >= 2
    );
}

/// A stream of the channel's items (reqwest wants a Stream).
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_creates_lists_revokes_and_reports_usage() {
    use reqwest::Method;
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let (root, root_id) = issue(&store, "root", |o| {
        o.scope = Some(avgate::auth::Scope::Admin)
    })
    .await;
    let gw = Gateway::start(auth_config(&clamd, dir.path())).await;

    let (status, created) = admin(
        &gw,
        Method::POST,
        "/v1/admin/tokens",
        &root,
        Some(json!({
            "name": "partner-a",
            "expires": "90d",
            "allow_ips": ["127.0.0.0/8", "::1"],
            "monthly_files": 5,
            "monthly_bytes": "1MiB",
            "max_concurrent": 2
        })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(token.starts_with("avg_") && Token::parse(&token).is_ok());
    assert_eq!(created["scope"], "scan");
    assert_eq!(created["status"], "active");
    assert_eq!(created["monthly_files"], 5);
    assert_eq!(created["monthly_bytes"], 1 << 20);
    assert_eq!(created["allow_ips"], json!(["127.0.0.0/8", "::1/128"]));
    assert!(created["expires_at"].as_str().unwrap().ends_with('Z'));

    // The new token scans; its use is counted.
    let (status, body, _) = post(&gw, "/v1/scan", &bearer(&token), EICAR).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("FOUND")),
        "{body}"
    );

    let (status, list) = admin(&gw, Method::GET, "/v1/admin/tokens", &root, None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["root", "partner-a"]);
    assert!(!list.to_string().contains(&token[4..]), "a listed secret");
    assert!(list["tokens"][1].get("token").is_none());

    for key in [id.as_str(), "partner-a"] {
        let (status, usage) = admin(
            &gw,
            Method::GET,
            &format!("/v1/admin/tokens/{key}/usage"),
            &root,
            None,
        )
        .await;
        assert_eq!(status, 200, "{usage}");
        assert_eq!(usage["token_id"], id.as_str());
        assert_eq!(
            (usage["files"].as_u64(), usage["bytes"].as_u64()),
            (Some(1), Some(EICAR.len() as u64))
        );
        assert_eq!(usage["monthly_files"], 5);
        assert_eq!(usage["month"], clock::Month::current().to_string());
    }
    let (status, old) = admin(
        &gw,
        Method::GET,
        &format!("/v1/admin/tokens/{id}/usage?month=2020-01"),
        &root,
        None,
    )
    .await;
    assert_eq!((status, old["files"].as_u64()), (200, Some(0)));
    let (status, bad) = admin(
        &gw,
        Method::GET,
        &format!("/v1/admin/tokens/{id}/usage?month=2020-13"),
        &root,
        None,
    )
    .await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );

    // Mistakes get the one error shape.
    for (body, code) in [
        (json!({"name": "partner-a"}), "token_name_taken"),
        (json!({"name": "x", "rate": "fast"}), "invalid_request"),
        (json!({"name": "x", "scope": "root"}), "invalid_json"),
        (json!({"name": "x", "monthly_filez": 1}), "invalid_json"),
        (json!({"scope": "scan"}), "invalid_json"),
        (json!(["not", "an", "object"]), "invalid_json"),
    ] {
        let (status, answer) = admin(
            &gw,
            Method::POST,
            "/v1/admin/tokens",
            &root,
            Some(body.clone()),
        )
        .await;
        assert_eq!(answer["status"], "ERROR", "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
        assert!(status == 400 || status == 409, "{status}");
    }
    for (content_type, raw) in [
        ("application/json", "{\"name\": "),
        ("text/plain", "{\"name\": \"x\"}"),
    ] {
        let r = gw
            .client
            .post(gw.url("/v1/admin/tokens"))
            .bearer_auth(&root)
            .header("content-type", content_type)
            .body(raw)
            .send()
            .await
            .unwrap();
        let (status, answer) = json(r).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some("invalid_json")),
            "{answer}"
        );
    }

    // Revocation takes effect at once.
    let (status, revoked) = admin(
        &gw,
        Method::DELETE,
        &format!("/v1/admin/tokens/{id}"),
        &root,
        None,
    )
    .await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    let (status, _, _) = post(&gw, "/v1/scan", &bearer(&token), EICAR).await;
    assert_eq!(status, 401);
    let (status, again) = admin(
        &gw,
        Method::DELETE,
        &format!("/v1/admin/tokens/{id}"),
        &root,
        None,
    )
    .await;
    assert_eq!(
        (status, again["error"]["code"].as_str()),
        (409, Some("token_revoked"))
    );
    let (status, missing) = admin(
        &gw,
        Method::DELETE,
        "/v1/admin/tokens/tok_nope",
        &root,
        None,
    )
    .await;
    assert_eq!(
        (status, missing["error"]["code"].as_str()),
        (404, Some("token_not_found"))
    );

    // The audit trail has it all, and no secret.
    let (status, audit) = admin(&gw, Method::GET, "/v1/admin/audit?limit=500", &root, None).await;
    assert_eq!(status, 200);
    let events = audit["events"].as_array().unwrap();
    let has = |event: &str, token: &str| {
        events
            .iter()
            .any(|e| e["event"] == event && (token.is_empty() || e["token_id"] == token))
    };
    assert!(has("token_created", &id));
    assert!(has("token_revoked", &id));
    assert!(has("auth_refused", &id), "the revoked token's attempt");
    assert!(events
        .iter()
        .any(|e| e["event"] == "admin_call" && e["actor"] == root_id.as_str()));
    assert!(!audit.to_string().contains(&token[4..]));
    assert!(!audit.to_string().contains(&root[4..]));
    gw.stop().await;
}

/// The real binary, as a user runs it: the first start prints a token once
/// (on stderr), the CLI manages tokens while it runs, and neither token
/// ever reaches the logs, whatever the clients do with them.
/// The `token create` command of the box avgate prints on stderr, as a
/// user would paste it, for a token named `name`.
fn box_command(stderr: &str, name: &str) -> String {
    stderr
        .lines()
        .map(|l| l.trim_matches(|c: char| c == '|' || c.is_whitespace()))
        .find(|l| l.contains(" token create --name NAME"))
        .unwrap_or_else(|| panic!("no token create command in the box: {stderr}"))
        .replace("NAME", name)
}

/// Under systemd, stderr is the journal (`JOURNAL_STREAM` set): a first
/// token printed there would stay readable by the journal's readers. None
/// is made; the box says how to make one, and that command works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_first_token_is_printed_into_the_journal() {
    let clamd = Clamd::start("");
    let mut server = Server::builder("avg-jrn")
        .args(["--clamd", &clamd.address()])
        .env_remove("AVGATE_AUTH__REQUIRED")
        .env("AVGATE_METRICS__LISTEN", "127.0.0.1:0")
        .env("JOURNAL_STREAM", "8:4711")
        .stderr_to_file()
        .start();
    server.wait_ready(Duration::from_secs(60)).await;
    let stderr = server.stderr_text();
    assert!(!stderr.contains("avg_"), "a token in the journal: {stderr}");
    assert!(stderr.contains("no API token exists yet"), "{stderr}");
    let store = SqliteStore::open(&server.data).unwrap();
    assert_eq!(store.token_count().await.unwrap(), 0);
    let r = server
        .client
        .post(server.url("/v1/scan/raw"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The command in the box makes a token that works here.
    let command = box_command(&stderr, "ops");
    let token = stdout_of(Command::new("sh").arg("-c").arg(&command))
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let r = server
        .client
        .post(server.url("/v1/scan/raw"))
        .bearer_auth(&token)
        .body(EICAR.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    server.terminate(Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_a_first_token_once_and_never_logs_a_token() {
    let clamd = Clamd::start("");
    let mut server = Server::builder("avg-auth")
        .args(["--clamd", &clamd.address()])
        .env("AVGATE_LOG", "debug")
        .env("AVGATE_RATE_LIMIT__AUTH_FAILURES", "1000/s")
        .env_remove("AVGATE_AUTH__REQUIRED")
        // Not the fixed default port: tests run side by side.
        .env("AVGATE_METRICS__LISTEN", "127.0.0.1:0")
        .stderr_to_file()
        .start();
    let (base, data, client) = (&server.base, &server.data, &server.client);
    server.wait_ready(Duration::from_secs(60)).await;
    let stderr = server.stderr_text();
    let start = stderr
        .find("avg_")
        .unwrap_or_else(|| panic!("no token on stderr: {stderr}"));
    let first = stderr[start..start + 53].to_owned();
    Token::parse(&first).expect("the printed token is well-formed");
    assert!(
        stderr.contains(&format!(
            "curl -X POST {base}/v1/scan -H \"Authorization: Bearer $TOKEN\""
        )),
        "{stderr}"
    );
    // The box's command for more tokens works as pasted: it names this
    // server's store (not the default one), so its token works here.
    let more = box_command(&stderr, "pasted");
    assert!(
        more.contains(&format!("--data-dir {}", data.display())),
        "{more}"
    );
    let pasted = stdout_of(Command::new("sh").arg("-c").arg(&more))
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let r = client
        .get(format!("{base}/v1/admin/tokens"))
        .bearer_auth(&pasted)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a scan token, known to this server");

    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&data.join("avgate.db")), 0o600);

    let scan = |token: Option<String>, url: String| {
        let client = client.clone();
        async move {
            let part = reqwest::multipart::Part::bytes(EICAR.to_vec()).file_name("eicar.com");
            let mut r = client
                .post(url)
                .multipart(reqwest::multipart::Form::new().part("file", part));
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            json(r.send().await.unwrap()).await
        }
    };
    let (status, body) = scan(Some(first.clone()), format!("{base}/v1/scan")).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("FOUND")),
        "{body}"
    );
    let (status, _) = scan(None, format!("{base}/v1/scan")).await;
    assert_eq!(status, 401, "authentication is required by default");

    // The CLI, on the same data directory, while the server runs.
    let cli = |args: &[&str]| {
        stdout_of(
            Command::new(env!("CARGO_BIN_EXE_avgate"))
                .args(["token"])
                .args(args)
                .arg("--data-dir")
                .arg(data),
        )
    };
    let created = cli(&[
        "create",
        "--name",
        "ops",
        "--scope",
        "admin",
        "--expires",
        "30d",
        "--monthly-files",
        "100",
    ]);
    let second = created.lines().next().unwrap().to_owned();
    Token::parse(&second).expect("the first line is the token");
    assert!(created.contains("id: tok_"), "{created}");
    let list = cli(&["list"]);
    assert!(
        list.contains("default") && list.contains("ops") && list.contains("files/month=100"),
        "{list}"
    );
    assert!(!list.contains(&second[4..]) && !list.contains(&first[4..]));
    let listed: Value = serde_json::from_str(&cli(&["list", "--json"])).unwrap();
    // default, pasted (from the box's command) and ops.
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    // A token without quotas is counted in memory and written every
    // second: another process sees its use within about that.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let usage: Value = serde_json::from_str(&cli(&["usage", "default", "--json"])).unwrap();
        if usage["files"] == 1 {
            break;
        }
        assert_eq!(usage["files"], 0, "{usage}");
        assert!(
            Instant::now() < deadline,
            "the use never reached the store: {usage}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A partner's token with every limit the CLI offers: listed as given,
    // and in force on the running server at once.
    let partner = cli(&[
        "create",
        "--name",
        "partner",
        "--rate",
        "1/m",
        "--burst",
        "1",
        "--allow-ip",
        "127.0.0.1/32",
        "--allow-ip",
        "::1",
        "--monthly-files",
        "5",
        "--monthly-bytes",
        "1MiB",
        "--max-concurrent",
        "2",
    ]);
    let partner = partner.lines().next().unwrap().to_owned();
    let list = cli(&["list"]);
    assert!(
        list.contains(
            "rate=1/m burst=1 allow-ip=127.0.0.1/32,::1/128 files/month=5 bytes/month=1MiB concurrent=2"
        ),
        "{list}"
    );
    let (status, body) = scan(Some(partner.clone()), format!("{base}/v1/scan")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = scan(Some(partner.clone()), format!("{base}/v1/scan")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "burst 1 at 1/m: {body}"
    );
    let usage = cli(&[
        "usage",
        "partner",
        "--month",
        &clock::Month::current().to_string(),
    ]);
    assert!(
        usage.contains("files  1 of 5\nbytes  68 of 1MiB\n"),
        "{usage}"
    );

    // The admin token made by the CLI works at once over HTTP.
    let r = client
        .get(format!("{base}/v1/admin/tokens"))
        .bearer_auth(&second)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A leaked token pasted into the path (to revoke it, say) is refused
    // as a credential in the URL, and never reaches the audit trail or the
    // log (checked at the end).
    for creds in [Some(&second), None] {
        let mut r = client.delete(format!("{base}/v1/admin/tokens/{first}"));
        if let Some(t) = creds {
            r = r.bearer_auth(t);
        }
        let (status, body) = json(r.send().await.unwrap()).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("token_in_query")),
            "{body}"
        );
        assert!(!body.to_string().contains(&first[4..]));
    }

    // Clients that leak tokens: in the query string, mangled, revoked.
    for url in [
        format!("{base}/v1/scan?token={first}"),
        format!("{base}/v1/scan?access_token={second}"),
        format!("{base}/v1/scan/raw?filename=a&api_key={first}"),
    ] {
        let (status, body) = scan(None, url).await;
        assert_eq!(status, 400, "{body}");
    }
    let mut mangled = first.clone();
    mangled.replace_range(20..21, if &first[20..21] == "a" { "b" } else { "a" });
    let (status, _) = scan(Some(mangled), format!("{base}/v1/scan")).await;
    assert_eq!(status, 401);
    assert!(cli(&["revoke", "default"]).contains("revoked"));
    // The server keeps verified tokens for a second (auth::cache::TTL): a
    // revocation by another process applies within that.
    let revoked_at = Instant::now();
    loop {
        let (status, body) = scan(Some(first.clone()), format!("{base}/v1/scan")).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            revoked_at.elapsed() < Duration::from_millis(1500),
            "a token revoked by the CLI was still accepted after {:?}",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert!(server.terminate(Duration::from_secs(60)).success());

    let log = server.log_text();
    let stderr = server.stderr_text();
    for secret in [&first, &second] {
        assert!(!log.contains(&secret[4..]), "a token in the logs");
    }
    assert!(
        !stderr.contains(&second[4..]),
        "the CLI's token on the server's stderr"
    );
    assert_eq!(
        stderr.matches(&first[4..]).count(),
        2,
        "the first token is printed once, in its box (the token and the export line): {stderr}"
    );
    let audit: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v["target"] == "audit")
        .collect();
    for event in ["token_created", "auth_refused", "admin_call"] {
        assert!(
            audit.iter().any(|v| v["event"] == event),
            "no {event} audit line"
        );
    }
}

/// The token CLI as an operator meets it: a wrong --data-dir is an error,
/// not an empty list; a new store is announced; limits that cannot work
/// are refused before anything is written; a long allow list is listed.
#[test]
fn the_token_cli_catches_a_wrong_data_dir_and_impossible_limits() {
    let root = tempfile::tempdir().unwrap();
    let avgate = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_avgate"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let typo = root.path().join("typo");
    let typo = typo.to_str().unwrap();
    for command in [
        &["token", "list"][..],
        &["token", "usage", "x"],
        &["policy", "list"],
    ] {
        let (code, _, stderr) = avgate(&[command, &["--data-dir", typo]].concat());
        assert_eq!(code, Some(1), "{command:?}: {stderr}");
        assert!(
            stderr.contains("no state store in"),
            "{command:?}: {stderr}"
        );
    }
    assert!(!Path::new(typo).exists(), "a store was made for a typo");

    let data = root.path().join("data");
    let data = data.to_str().unwrap();
    let (code, _, stderr) = avgate(&["token", "create", "--data-dir", data, "--name", "first"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("created a new state store"), "{stderr}");
    let (_, _, stderr) = avgate(&["token", "create", "--data-dir", data, "--name", "second"]);
    assert!(!stderr.contains("created a new state store"), "{stderr}");

    let many_ips: Vec<String> = (0..300)
        .map(|i| format!("10.{}.{}.0/24", i / 250, i % 250))
        .collect();
    let with_ips = |n: usize| {
        let mut args = vec!["token", "create", "--data-dir", data, "--name"];
        args.push(if n > 256 { "too-many" } else { "many" });
        for ip in &many_ips[..n] {
            args.extend(["--allow-ip", ip.as_str()]);
        }
        avgate(&args)
    };
    for (what, args, message) in [
        (
            "expires under a second",
            vec!["--expires", "500ms"],
            "at least 1s",
        ),
        (
            "expires past the clock",
            vec!["--expires", "94368760191893771d"],
            "longer than",
        ),
        (
            "files past SQLite's integers",
            vec!["--monthly-files", "18446744073709551615"],
            "at most",
        ),
    ] {
        let (code, _, stderr) = avgate(
            &[
                &["token", "create", "--data-dir", data, "--name", "x"][..],
                &args,
            ]
            .concat(),
        );
        assert_eq!(code, Some(2), "{what}: {stderr}");
        assert!(stderr.contains(message), "{what}: {stderr}");
    }
    let (code, _, stderr) = with_ips(300);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("at most 256"), "{stderr}");
    let (code, _, stderr) = with_ips(256);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stdout, stderr) = avgate(&["token", "list", "--data-dir", data]);
    assert_eq!(code, Some(0), "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.contains(" many "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.chars().count() < 400, "{line}");
    let (_, json, _) = avgate(&["token", "list", "--json", "--data-dir", data]);
    let listed: Vec<Value> = serde_json::from_str(&json).unwrap();
    let mut names: Vec<&str> = listed.iter().map(|t| t["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(
        names,
        ["first", "many", "second"],
        "a refused token was written"
    );
}
