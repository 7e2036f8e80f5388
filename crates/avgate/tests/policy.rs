//! The false-positive policy against real clamds: ignores applied inside
//! the managed clamd (also right after a restart) never hide a second
//! signature on the same file, allow and block entries change verdicts at
//! once, changes made with the CLI reach a running server, entries stop
//! applying when they expire, an external clamd's ignored findings stay
//! FOUND unless the operator opts in, and the admin API is for admin
//! tokens only.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use avgate::auth::manage::{self, Actor, TokenOptions};
use avgate::auth::Scope;
use avgate::config::{Config, Humantime};
use avgate::store::{clock, SqliteStore, Store};
use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The pattern of the repository's second test signature
/// (`Avgate-Test-Second` in signatures/avgate-test.ndb).
const SECOND: &[u8] = b"AVGATE-TEST-SECOND-SIGNATURE-5c1e7d9a";
const EICAR_NAME: &str = "Eicar-Test-Signature.UNOFFICIAL";
const SECOND_NAME: &str = "Avgate-Test-Second.UNOFFICIAL";
/// Generous: the machine running the tests may be busy.
const PATIENCE: Duration = Duration::from_secs(60);

/// EICAR first, then the second pattern: clamd reports the first match
/// by position, so without the policy this is "Eicar-Test-Signature".
fn eicar_then_second() -> Vec<u8> {
    [EICAR, b"\n", SECOND, b"\n"].concat()
}

/// One signature only (EICAR), but not the exact 68-byte test file.
fn eicar_in_text() -> Vec<u8> {
    [b"a test note: ".as_slice(), EICAR, b"\n"].concat()
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A managed clamd (no `clamd.backends`) with its data in `dir`, the store
/// polled often, no freshclam.
fn managed_config(dir: &Path) -> Config {
    let mut c = config(&[]);
    c.data_dir = dir.to_owned();
    c.updates.enabled = Some(false);
    c.policy.refresh_interval = Humantime(Duration::from_millis(250));
    c
}

fn data_dir() -> tempfile::TempDir {
    // Short: the managed clamd's socket lives in it.
    tempfile::Builder::new()
        .prefix("avg-pol")
        .tempdir()
        .unwrap()
}

async fn admin_token(dir: &Path) -> String {
    let store = SqliteStore::open(dir).unwrap();
    let spec = TokenOptions {
        name: "admin".into(),
        scope: Some(Scope::Admin),
        ..Default::default()
    }
    .validate(clock::now())
    .unwrap();
    let created = manage::create(&store, spec, &Actor::cli()).await.unwrap();
    created.token.expose().to_owned()
}

async fn call(
    gw: &Gateway,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = gw.client.request(method, gw.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    json(request.send().await.unwrap()).await
}

async fn add(gw: &Gateway, token: &str, body: Value) -> Value {
    let (status, entry) = call(
        gw,
        Method::POST,
        "/v1/admin/policy",
        Some(token),
        Some(body),
    )
    .await;
    assert_eq!(status, 201, "{entry}");
    entry
}

async fn remove(gw: &Gateway, token: &str, id: &str) {
    let path = format!("/v1/admin/policy/{id}");
    let (status, body) = call(gw, Method::DELETE, &path, Some(token), None).await;
    assert_eq!(status, 200, "{body}");
}

/// Waits until the managed clamd has loaded the policy version now in
/// force; returns the policy listing.
async fn wait_applied(gw: &Gateway, token: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = call(gw, Method::GET, "/v1/admin/policy", Some(token), None).await;
        assert_eq!(status, 200, "{body}");
        let clamd = &body["clamd"];
        if clamd["state"] == "applied" && clamd["applied_version"] == body["version"] {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "the managed clamd did not apply the policy: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scans `data` until `done` holds for the answer; returns it.
async fn scan_until(gw: &Gateway, data: &[u8], what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = gw.scan("f.bin", data.to_vec()).await;
        assert_eq!(status, 200, "{body}");
        if done(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Scans `data` until it is OK; meanwhile only `503 policy_pending`.
async fn ok_past_pending(gw: &Gateway, data: &[u8]) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = gw.scan("f.bin", data.to_vec()).await;
        if answer.0 == 200 && answer.1["status"] == "OK" {
            return;
        }
        assert_error(&answer, 503, "policy_pending");
        assert!(Instant::now() < deadline, "still pending: {}", answer.1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn db_file(dir: &Path, name: &str) -> PathBuf {
    dir.join("clamd/db").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ignore_applied_inside_the_managed_clamd_never_hides_another_finding() {
    let dir = data_dir();
    let token = admin_token(dir.path()).await;
    let gw = Gateway::start(managed_config(dir.path())).await;

    let (_, before) = gw.scan("two.txt", eicar_then_second()).await;
    assert_eq!(before["signature"], EICAR_NAME, "{before}");

    // Another signature ignored: the readiness-probe hash is in place, and
    // EICAR is still reported under its own name (a body signature comes
    // before a whole-file hash).
    let other = add(
        &gw,
        &token,
        json!({"kind": "ignore", "value": "Avgate-Test-Second", "reason": "FP ticket 0"}),
    )
    .await;
    wait_applied(&gw, &token).await;
    assert!(db_file(dir.path(), "avgate-probe.hsb").exists());
    let (_, eicar) = gw.scan("eicar.com", EICAR.to_vec()).await;
    assert_eq!(eicar["signature"], EICAR_NAME, "{eicar}");
    assert!(eicar.get("policy").is_none(), "{eicar}");
    let (_, second) = gw.scan("second.txt", SECOND.to_vec()).await;
    assert_eq!(second["status"], "OK", "{second}");
    remove(&gw, &token, other["id"].as_str().unwrap()).await;
    wait_applied(&gw, &token).await;

    let entry = add(
        &gw,
        &token,
        json!({"kind": "ignore", "value": EICAR_NAME, "reason": "FP ticket 1", "expires": "30d"}),
    )
    .await;
    assert_eq!(
        entry["value"], "Eicar-Test-Signature",
        "stored bare: {entry}"
    );
    assert_eq!(entry["author"], "token:admin");
    // Until clamd has loaded the ignore, the finding it reports stands.
    let (_, meanwhile) = gw.scan("note.txt", eicar_in_text()).await;
    if meanwhile["status"] == "FOUND" {
        assert_eq!(meanwhile["policy"]["applied"], false, "{meanwhile}");
    }
    let listing = wait_applied(&gw, &token).await;
    assert_eq!(listing["clamd"]["ignored"], 1, "{listing}");
    assert_eq!(
        std::fs::read_to_string(db_file(dir.path(), "avgate-policy.ign2")).unwrap(),
        "Eicar-Test-Signature\n"
    );

    // The regression this design exists for: EICAR is ignored, and the
    // second signature on the same file is still reported.
    let (_, two) = gw.scan("two.txt", eicar_then_second()).await;
    assert_eq!(two["status"], "FOUND", "{two}");
    assert_eq!(two["signature"], SECOND_NAME, "{two}");
    assert_eq!(two["verdict"], "infected");
    // A file whose only finding is ignored is clean. clamd did not load the
    // signature at all, so nothing tells avgate it would have matched: no
    // `policy` field.
    let (_, one) = gw.scan("note.txt", eicar_in_text()).await;
    assert_eq!(one["status"], "OK", "{one}");
    assert!(one.get("policy").is_none(), "{one}");
    // The exact EICAR file is the readiness probe: it stays detected, and
    // the backends stay ready.
    let (_, probe) = gw.scan("eicar.com", EICAR.to_vec()).await;
    assert_eq!(probe["status"], "FOUND", "{probe}");
    assert_eq!(probe["signature"], "avgate.ReadinessProbe.UNOFFICIAL");
    assert_eq!(probe["policy"]["applied"], false);
    tokio::time::sleep(Duration::from_secs(1)).await; // a few health probes
    assert_eq!(gw.readyz().await.0, 200);

    // A restart: the files are written before clamd starts, so the first
    // scan already has the ignore applied.
    gw.stop().await;
    let gw = Gateway::start(managed_config(dir.path())).await;
    let (_, two) = gw.scan("two.txt", eicar_then_second()).await;
    assert_eq!(two["signature"], SECOND_NAME, "{two}");
    let (_, listing) = call(&gw, Method::GET, "/v1/admin/policy", Some(&token), None).await;
    assert_eq!(listing["clamd"]["state"], "applied", "{listing}");
    assert_eq!(listing["clamd"]["applied_version"], listing["version"]);

    // Removed: EICAR is found again, first as before.
    remove(&gw, &token, entry["id"].as_str().unwrap()).await;
    let listing = wait_applied(&gw, &token).await;
    assert_eq!(listing["clamd"]["ignored"], 0, "{listing}");
    assert!(!db_file(dir.path(), "avgate-policy.ign2").exists());
    assert!(!db_file(dir.path(), "avgate-probe.hsb").exists());
    let (_, again) = gw.scan("two.txt", eicar_then_second()).await;
    assert_eq!(again["signature"], EICAR_NAME, "{again}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_block_by_sha256_change_verdicts_at_once_and_expire() {
    let dir = data_dir();
    let token = admin_token(dir.path()).await;
    let gw = Gateway::start(managed_config(dir.path())).await;

    // Block: a clean file is FOUND from the next scan on.
    let clean = random_bytes(200_000, 41);
    let (_, ok) = gw.scan("report.pdf", clean.clone()).await;
    assert_eq!(ok["status"], "OK");
    let block = add(
        &gw,
        &token,
        json!({"kind": "block", "value": sha256(&clean), "reason": "seen in incident 7"}),
    )
    .await;
    let (_, blocked) = gw.scan("report.pdf", clean.clone()).await;
    assert_eq!(blocked["status"], "FOUND", "{blocked}");
    assert_eq!(blocked["verdict"], "infected");
    assert_eq!(blocked["signature"], "avgate.Blocklist");
    assert_eq!(blocked["score"], 100);
    assert_eq!(blocked["policy"]["rule"], "block");
    assert_eq!(blocked["policy"]["id"], block["id"]);
    assert_eq!(blocked["policy"]["reason"], "seen in incident 7");
    assert_eq!(blocked["policy"]["applied"], true);
    // Inside an archive too, once clamd has loaded the blocked hash.
    wait_applied(&gw, &token).await;
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("report.pdf"), &clean).unwrap();
    let status = Command::new("zip")
        .args(["-q", "-j"])
        .arg(work.path().join("report.zip"))
        .arg(work.path().join("report.pdf"))
        .status()
        .unwrap();
    assert!(status.success());
    let zipped = std::fs::read(work.path().join("report.zip")).unwrap();
    let (_, in_zip) = gw.scan("report.zip", zipped).await;
    assert_eq!(in_zip["status"], "FOUND", "{in_zip}");
    assert_eq!(in_zip["verdict"], "infected", "{in_zip}");
    let expected = format!(
        "avgate.Blocklist.{}.UNOFFICIAL",
        block["id"].as_str().unwrap()
    );
    assert_eq!(in_zip["signature"], expected.as_str(), "{in_zip}");

    // Allow: a detected file is OK from the next scan on, with the finding
    // it overrode (clamd has not loaded the .sfp yet).
    let second = [b"header\n".as_slice(), SECOND].concat();
    let (_, found) = gw.scan("tool.bin", second.clone()).await;
    assert_eq!(found["signature"], SECOND_NAME);
    let allow = add(
        &gw,
        &token,
        json!({"kind": "allow", "value": sha256(&second).to_uppercase(), "reason": "vendor confirmed FP"}),
    )
    .await;
    let (_, allowed) = gw.scan("tool.bin", second.clone()).await;
    assert_eq!(allowed["status"], "OK", "{allowed}");
    assert_eq!(allowed["verdict"], "clean");
    assert_eq!(allowed["signature"], Value::Null);
    assert_eq!(allowed["policy"]["rule"], "allow");
    assert_eq!(allowed["policy"]["id"], allow["id"]);
    assert_eq!(allowed["policy"]["applied"], true);
    // Allowing EICAR itself works after the scan; the probe keeps working.
    add(
        &gw,
        &token,
        json!({"kind": "allow", "value": sha256(EICAR), "reason": "test file"}),
    )
    .await;
    let (_, eicar) = gw.scan("eicar.com", EICAR.to_vec()).await;
    assert_eq!(eicar["status"], "OK", "{eicar}");
    let listing = wait_applied(&gw, &token).await;
    assert_eq!(
        listing["clamd"]["allowed"], 1,
        "EICAR stays out of the .sfp: {listing}"
    );
    let sfp = std::fs::read_to_string(db_file(dir.path(), "avgate-policy.sfp")).unwrap();
    assert_eq!(
        sfp,
        format!(
            "{}:*:avgate.Allow.{}:73\n",
            sha256(&second),
            allow["id"].as_str().unwrap()
        )
    );
    // Now clamd itself calls it clean; the answer still names the entry.
    let (_, allowed) = gw.scan("tool.bin", second.clone()).await;
    assert_eq!(allowed["status"], "OK", "{allowed}");
    assert_eq!(allowed["policy"]["id"], allow["id"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gw.readyz().await.0, 200);

    // Removing the allow entry: clamd drops the hash from its .sfp only
    // when it has reloaded, and until then calls the file clean. Such an
    // answer is no verdict: 503 policy_pending, then FOUND.
    remove(&gw, &token, allow["id"].as_str().unwrap()).await;
    // (Usually a few 503s: the reload takes a moment even with the test
    // signatures; an OK in between fails the test.)
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = gw.scan("tool.bin", second.clone()).await;
        if answer.1["status"] == "FOUND" {
            assert_eq!(answer.1["signature"], SECOND_NAME, "{}", answer.1);
            break;
        }
        assert_error(&answer, 503, "policy_pending");
        assert!(Instant::now() < deadline, "still pending: {}", answer.1);
    }

    // Removing the block entry: clamd reports the hash until it has
    // reloaded (also for the file as uploaded), and such an answer is no
    // verdict either: 503 policy_pending, then OK; never a FOUND meanwhile.
    remove(&gw, &token, block["id"].as_str().unwrap()).await;
    ok_past_pending(&gw, &clean).await;

    // Expiry: a block entry stops applying once it expires.
    let other = random_bytes(10_000, 42);
    add(
        &gw,
        &token,
        json!({"kind": "block", "value": sha256(&other), "reason": "for a while", "expires": "10s"}),
    )
    .await;
    let (_, blocked) = gw.scan("x.bin", other.clone()).await;
    assert_eq!(blocked["signature"], "avgate.Blocklist", "{blocked}");
    wait_applied(&gw, &token).await;
    // Expired: after the scan at once; clamd once it has reloaded.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = gw.scan("x.bin", other.clone()).await;
        if status == 200 && body["status"] == "OK" {
            break;
        }
        assert!(
            (status == 200 && body["signature"] == "avgate.Blocklist")
                || (status == 503 && body["error"]["code"] == "policy_pending"),
            "{status}: {body}"
        );
        assert!(Instant::now() < deadline, "still blocked: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // And an ignore entry: once it expires, clamd loads the signature again.
    let ignore = add(
        &gw,
        &token,
        json!({"kind": "ignore", "value": "Eicar-Test-Signature", "reason": "briefly", "expires": "20s"}),
    )
    .await;
    let listing = wait_applied(&gw, &token).await;
    assert_eq!(listing["clamd"]["ignored"], 1, "{listing}");
    let (_, two) = gw.scan("two.txt", eicar_then_second()).await;
    assert_eq!(two["signature"], SECOND_NAME, "{two}");
    scan_until(
        &gw,
        &eicar_then_second(),
        "the ignore entry to expire",
        |b| b["signature"] == EICAR_NAME,
    )
    .await;
    let (_, all) = call(
        &gw,
        Method::GET,
        "/v1/admin/policy?all=true",
        Some(&token),
        None,
    )
    .await;
    let expired = all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == ignore["id"])
        .unwrap();
    assert_eq!(expired["status"], "expired", "{all}");
    let listing = wait_applied(&gw, &token).await;
    assert_eq!(listing["clamd"]["ignored"], 0, "{listing}");
    gw.stop().await;
}

fn avgate(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_avgate"))
        .arg("policy")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("AVGATE_CONFIG")
        .env_remove("AVGATE_DATA_DIR")
        .env("USER", "carol")
        .env_remove("SUDO_USER")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "avgate failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_with_the_cli_reach_the_running_server() {
    let dir = data_dir();
    let token = admin_token(dir.path()).await;
    let gw = Gateway::start(managed_config(dir.path())).await;
    let clean = random_bytes(50_000, 43);
    let path = dir.path().join("clean.bin");
    std::fs::write(&path, &clean).unwrap();

    // block, by the file itself.
    let out = stdout(&avgate(
        dir.path(),
        &[
            "block",
            "add",
            "--file",
            path.to_str().unwrap(),
            "--reason",
            "incident 9",
            "--json",
        ],
    ));
    let block: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(block["value"], sha256(&clean));
    assert_eq!(block["author"], "carol");
    let found = scan_until(&gw, &clean, "the CLI's block entry", |b| {
        b["status"] == "FOUND"
    })
    .await;
    assert_eq!(found["signature"], "avgate.Blocklist");
    assert_eq!(found["policy"]["id"], block["id"]);

    // ignore: into the managed clamd, without a restart.
    let out = stdout(&avgate(
        dir.path(),
        &[
            "ignore",
            "add",
            "Eicar-Test-Signature",
            "--reason",
            "FP",
            "--expires",
            "30d",
            "--json",
        ],
    ));
    let ignore: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ignore["kind"], "ignore");
    scan_until(
        &gw,
        &eicar_then_second(),
        "the CLI's ignore entry in clamd",
        |b| b["signature"] == SECOND_NAME,
    )
    .await;

    let list: Value =
        serde_json::from_str(&stdout(&avgate(dir.path(), &["list", "--json"]))).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let table = stdout(&avgate(dir.path(), &["list"]));
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("Eicar-Test-Signature"), "{table}");

    // Mistakes are refused with exit code 2 and change nothing.
    for bad in [
        vec!["allow", "add", "not-a-hash", "--reason", "x"],
        vec![
            "ignore",
            "add",
            "Heuristics.Limits.Exceeded.MaxFileSize",
            "--reason",
            "x",
        ],
        vec!["ignore", "add", "Eicar-Test-Signature", "--reason", "again"],
        vec!["remove", "pol_doesnotexist"],
    ] {
        let o = avgate(dir.path(), &bad);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{bad:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    for entry in [&block, &ignore] {
        let out = stdout(&avgate(
            dir.path(),
            &["remove", entry["id"].as_str().unwrap()],
        ));
        assert!(out.starts_with("removed pol_"), "{out}");
    }
    scan_until(&gw, &clean, "the block entry's removal", |b| {
        b["status"] == "OK"
    })
    .await;
    scan_until(
        &gw,
        &eicar_then_second(),
        "the ignore entry's removal",
        |b| b["signature"] == EICAR_NAME,
    )
    .await;
    wait_applied(&gw, &token).await;

    // The audit trail has who did what.
    let (_, audit) = call(
        &gw,
        Method::GET,
        "/v1/admin/audit?limit=50",
        Some(&token),
        None,
    )
    .await;
    let policy_events: Vec<(String, String)> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"].as_str().unwrap().starts_with("policy_"))
        .map(|e| {
            (
                e["event"].as_str().unwrap().into(),
                e["actor"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(policy_events.len(), 4, "{audit}");
    assert!(policy_events.iter().all(|(_, actor)| actor == "cli"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_clamds_ignored_findings_stay_found_unless_the_operator_opts_in() {
    let clamd = Clamd::start("");
    let dir = data_dir();
    let token = admin_token(dir.path()).await;
    let store = SqliteStore::open(dir.path()).unwrap();
    let spec = avgate::policy::PolicyOptions {
        kind: "ignore".into(),
        value: "Eicar-Test-Signature".into(),
        reason: "FP".into(),
        ..Default::default()
    }
    .validate(clock::now())
    .unwrap();
    let entry = avgate::policy::manage::add(&store, spec, "ops", &Actor::cli())
        .await
        .unwrap();

    let mut c = config(&[clamd.address()]);
    c.data_dir = dir.path().to_owned();
    let gw = Gateway::start(c.clone()).await;
    let (_, eicar) = gw.scan("eicar.com", EICAR.to_vec()).await;
    assert_eq!(eicar["status"], "FOUND", "{eicar}");
    assert_eq!(eicar["signature"], EICAR_NAME);
    assert_eq!(eicar["policy"]["rule"], "ignore");
    assert_eq!(eicar["policy"]["id"], entry.id.as_str());
    assert_eq!(eicar["policy"]["applied"], false);
    assert!(eicar["policy"]["note"]
        .as_str()
        .unwrap()
        .contains("external"));
    let (_, listing) = call(&gw, Method::GET, "/v1/admin/policy", Some(&token), None).await;
    assert_eq!(listing["clamd"]["mode"], "external", "{listing}");
    assert_eq!(listing["clamd"]["state"], "after_scan_only");
    gw.stop().await;

    // The opt-in: OK after the scan, with the risk it carries. The file
    // with a second signature is OK too: clamd never reported it. This is
    // why ignores belong inside clamd.
    c.policy.ignore_after_scan = true;
    let gw = Gateway::start(c).await;
    let (_, eicar) = gw.scan("eicar.com", EICAR.to_vec()).await;
    assert_eq!(eicar["status"], "OK", "{eicar}");
    assert_eq!(eicar["policy"]["applied"], true);
    assert_eq!(eicar["policy"]["signature"], EICAR_NAME);
    assert!(eicar["policy"]["note"]
        .as_str()
        .unwrap()
        .contains("first match"));
    let (_, two) = gw.scan("two.txt", eicar_then_second()).await;
    assert_eq!(
        two["status"], "OK",
        "the documented first-match risk: {two}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_admin_api_is_for_admin_tokens_and_checks_its_input() {
    let clamd = Clamd::start("");
    let dir = data_dir();
    let admin = admin_token(dir.path()).await;
    let scan_token = {
        let store = SqliteStore::open(dir.path()).unwrap();
        let spec = TokenOptions {
            name: "partner".into(),
            ..Default::default()
        }
        .validate(clock::now())
        .unwrap();
        let created = manage::create(&store, spec, &Actor::cli()).await.unwrap();
        created.token.expose().to_owned()
    };
    let mut c = config(&[clamd.address()]);
    c.data_dir = dir.path().to_owned();
    c.auth.required = true;
    let gw = Gateway::start(c).await;
    let good = json!({"kind": "ignore", "value": "Win.Test.Fp-1", "reason": "FP"});

    for (token, expected) in [(None, 401), (Some(scan_token.as_str()), 403)] {
        let (s, _) = call(&gw, Method::GET, "/v1/admin/policy", token, None).await;
        assert_eq!(s, expected);
        let (s, _) = call(
            &gw,
            Method::POST,
            "/v1/admin/policy",
            token,
            Some(good.clone()),
        )
        .await;
        assert_eq!(s, expected);
        let (s, _) = call(&gw, Method::DELETE, "/v1/admin/policy/pol_x", token, None).await;
        assert_eq!(s, expected);
    }
    for (bad, code) in [
        (
            json!({"kind": "deny", "value": "X", "reason": "r"}),
            "invalid_request",
        ),
        (
            json!({"kind": "ignore", "value": "X", "reason": " "}),
            "invalid_request",
        ),
        (
            json!({"kind": "allow", "value": "abc", "reason": "r"}),
            "invalid_request",
        ),
        (
            json!({"kind": "ignore", "value": "a:b", "reason": "r"}),
            "invalid_request",
        ),
        (
            json!({"kind": "ignore", "value": "X", "reason": "r", "expires": "soon"}),
            "invalid_request",
        ),
        (
            json!({"kind": "ignore", "value": "X", "reason": "r", "extra": 1}),
            "invalid_json",
        ),
    ] {
        let (s, body) = call(
            &gw,
            Method::POST,
            "/v1/admin/policy",
            Some(&admin),
            Some(bad.clone()),
        )
        .await;
        assert_eq!(
            (s, body["error"]["code"].as_str()),
            (400, Some(code)),
            "{bad}: {body}"
        );
    }
    let (s, empty) = call(&gw, Method::GET, "/v1/admin/policy", Some(&admin), None).await;
    assert_eq!(s, 200);
    assert_eq!(empty["entries"], json!([]));
    let version = empty["version"].as_u64().unwrap();

    let entry = add(&gw, &admin, good.clone()).await;
    assert!(entry["id"].as_str().unwrap().starts_with("pol_"));
    assert_eq!(entry["status"], "active");
    assert_eq!(entry["expires_at"], Value::Null);
    let (s, dup) = call(
        &gw,
        Method::POST,
        "/v1/admin/policy",
        Some(&admin),
        Some(good.clone()),
    )
    .await;
    assert_eq!(
        (s, dup["error"]["code"].as_str()),
        (409, Some("policy_exists")),
        "{dup}"
    );
    let (_, listing) = call(&gw, Method::GET, "/v1/admin/policy", Some(&admin), None).await;
    assert_eq!(listing["entries"].as_array().unwrap().len(), 1);
    assert_eq!(listing["version"].as_u64().unwrap(), version + 1);

    assert_error(
        &call(
            &gw,
            Method::DELETE,
            "/v1/admin/policy/pol_nothing",
            Some(&admin),
            None,
        )
        .await,
        404,
        "policy_not_found",
    );
    let path = format!("/v1/admin/policy/{}", entry["id"].as_str().unwrap());
    let (s, removed) = call(&gw, Method::DELETE, &path, Some(&admin), None).await;
    assert_eq!(
        (s, removed["status"].as_str()),
        (200, Some("removed")),
        "{removed}"
    );
    assert_error(
        &call(&gw, Method::DELETE, &path, Some(&admin), None).await,
        409,
        "policy_removed",
    );
    let (_, active) = call(&gw, Method::GET, "/v1/admin/policy", Some(&admin), None).await;
    assert_eq!(active["entries"], json!([]));
    let (_, all) = call(
        &gw,
        Method::GET,
        "/v1/admin/policy?all=true",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(all["entries"][0]["status"], "removed", "{all}");

    // Audited with the admin token's id as the actor.
    let store = SqliteStore::open(dir.path()).unwrap();
    let events = store.recent_audit(100).await.unwrap();
    let admin_id = store.find_token("admin").await.unwrap().unwrap().id;
    for event in ["policy_added", "policy_removed"] {
        let e = events.iter().find(|e| e.event == event).unwrap();
        assert_eq!(e.actor.as_deref(), Some(admin_id.as_str()), "{e:?}");
    }
    gw.stop().await;
}
