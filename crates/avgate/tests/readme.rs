//! The README's examples, run as a user would paste them: the quick-start
//! curl, the raw-body curl and the Python client, against a real avgate
//! with tokens required and a real clamd; and the curl examples of
//! docs/api.md. Only the address is changed
//! (the tests never use the fixed port 8080). A token comes from
//! `avgate token create`, as the README says.
//!
//! The Node.js example needs Node 20+, which Debian 12 and Ubuntu 22.04 do
//! not package: its test is `#[ignore]`d, and scripts/test.sh runs it
//! where `node` is 20 or later (and says so when it is not). The Go
//! fragment is put into a `main` package as it stands and built with the
//! distribution's Go (scripts/setup.sh test installs golang-go).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// The README's text.
fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).unwrap()
}

/// The first fenced code block after the line that starts with `marker`.
fn block_after(text: &str, marker: &str) -> String {
    let start = text
        .find(marker)
        .unwrap_or_else(|| panic!("README has no `{marker}`"));
    let rest = &text[start..];
    let open = rest.find("```").expect("a code block follows");
    let body = &rest[open..];
    let body = &body[body.find('\n').unwrap() + 1..];
    let close = body.find("```").expect("the code block ends");
    body[..close].to_owned()
}

/// A gateway with tokens required and a token made by the CLI.
async fn gateway_with_token(clamd: &Clamd, dir: &Path) -> (Gateway, String) {
    let token = create_token_with_cli(dir, "readme");
    let mut cfg = config(&[clamd.address()]);
    cfg.auth.required = true;
    cfg.data_dir = dir.to_owned();
    (Gateway::start(cfg).await, token)
}

/// Runs `program` with `args` and then `code` in `dir`, with `TOKEN` set,
/// and the README's address replaced by the gateway's in `code`.
fn run(gw: &Gateway, dir: &Path, token: &str, program: &str, args: &[&str], code: &str) -> Output {
    let code = code.replace("http://127.0.0.1:8080", &format!("http://{}", gw.addr));
    Command::new(program)
        .args(args)
        .arg(code)
        .current_dir(dir)
        .env("TOKEN", token)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/setup.sh test installs it): {e}"))
}

/// Each answer's file name and status, the pair a user checks.
fn names_and_statuses<'a>(
    answers: impl IntoIterator<Item = &'a serde_json::Value>,
) -> Vec<(serde_json::Value, serde_json::Value)> {
    answers
        .into_iter()
        .map(|a| (a["filename"].clone(), a["status"].clone()))
        .collect()
}

fn stdout_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_curl_finds_eicar() {
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let (gw, token) = gateway_with_token(&clamd, dir.path()).await;

    // The block writes eicar.com with printf and posts it; its first line
    // is where the user pastes the token, which TOKEN already holds.
    let block = block_after(&readme(), "Then, from another terminal:");
    let script: String = block
        .lines()
        .filter(|l| !l.starts_with("export TOKEN="))
        .map(|l| format!("{l}\n"))
        .collect();
    let out = run(&gw, dir.path(), &token, "sh", &["-c"], &script);
    let body = stdout_json(&out);
    assert_eq!(body["filename"], "eicar.com", "{body}");
    assert_eq!(body["status"], "FOUND", "{body}");
    assert_eq!(body["size"], 68, "the README's EICAR string: {body}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raw_body_curl_and_the_python_client_tell_clean_from_infected() {
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let (gw, token) = gateway_with_token(&clamd, dir.path()).await;
    let text = readme();
    let curl = block_after(&text, "**curl**, raw body:");
    let python = block_after(&text, "**Python** (requests):");
    let invoice = dir.path().join("invoice.pdf");

    // A clean file: curl's answer says OK, and the Python client goes on.
    std::fs::write(&invoice, random_bytes(200_000, 21)).unwrap();
    let body = stdout_json(&run(&gw, dir.path(), &token, "sh", &["-c"], &curl));
    assert_eq!(body["filename"], "invoice.pdf", "{body}");
    assert_eq!(body["status"], "OK", "{body}");
    let out = run(&gw, dir.path(), &token, "python3", &["-c"], &python);
    assert!(
        out.status.success(),
        "the Python client rejected a clean file: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An infected one: FOUND, and the Python client raises.
    let mut infected = random_bytes(100_000, 22);
    infected.extend_from_slice(EICAR);
    std::fs::write(&invoice, infected).unwrap();
    let body = stdout_json(&run(&gw, dir.path(), &token, "sh", &["-c"], &curl));
    assert_eq!(body["status"], "FOUND", "{body}");
    let out = run(&gw, dir.path(), &token, "python3", &["-c"], &python);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the Python client accepted EICAR");
    assert!(
        stderr.contains("RuntimeError: rejected") && stderr.contains("FOUND"),
        "{stderr}"
    );

    // No file to send: both fail, neither scans an empty body instead
    // (`curl --data-binary @file` would send one, and get OK).
    std::fs::remove_file(&invoice).unwrap();
    let out = run(&gw, dir.path(), &token, "sh", &["-c"], &curl);
    assert!(!out.status.success(), "curl went on without the file");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = run(&gw, dir.path(), &token, "python3", &["-c"], &python);
    assert!(
        !out.status.success(),
        "the Python client went on without the file"
    );

    // Not scanned (clamd gone): the Python client must not accept it.
    drop(clamd);
    std::fs::write(&invoice, random_bytes(1000, 23)).unwrap();
    let out = run(&gw, dir.path(), &token, "python3", &["-c"], &python);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the Python client accepted an unscanned file"
    );
    assert!(stderr.contains("engine_unavailable"), "{stderr}");
    gw.stop().await;
}

/// The README's Go fragment as the body of a function that returns an
/// error, in a program that prints what a caller would look at.
fn go_program(fragment: &str, addr: std::net::SocketAddr) -> String {
    let fragment = fragment.replace("http://127.0.0.1:8080", &format!("http://{addr}"));
    format!(
        r#"package main

import (
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
)

func scan() error {{
{fragment}
	fmt.Printf("{{\"clean\":%t,\"status\":%q,\"http\":%d}}\n", clean, result.Status, resp.StatusCode)
	return nil
}}

func main() {{
	if err := scan(); err != nil {{
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}}
}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_client_tells_clean_from_infected() {
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let (gw, token) = gateway_with_token(&clamd, dir.path()).await;
    let source = dir.path().join("client.go");
    std::fs::write(
        &source,
        go_program(&block_after(&readme(), "**Go**:"), gw.addr),
    )
    .unwrap();
    // Its own build cache, so that the test needs no writable home.
    let built = Command::new("go")
        .args(["build", "-o", "client", "client.go"])
        .current_dir(dir.path())
        .env("GOCACHE", dir.path().join("gocache"))
        .env("GOPATH", dir.path().join("gopath"))
        .env("GO111MODULE", "off")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run go (scripts/setup.sh test installs golang-go): {e}")
        });
    assert!(
        built.status.success(),
        "the README's Go example does not build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let client = || {
        Command::new(dir.path().join("client"))
            .current_dir(dir.path())
            .env("TOKEN", &token)
            .output()
            .unwrap()
    };
    let invoice = dir.path().join("invoice.pdf");

    std::fs::write(&invoice, random_bytes(200_000, 41)).unwrap();
    let out = stdout_json(&client());
    assert_eq!(
        out,
        serde_json::json!({"clean": true, "status": "OK", "http": 200})
    );

    let mut infected = random_bytes(100_000, 42);
    infected.extend_from_slice(EICAR);
    std::fs::write(&invoice, infected).unwrap();
    let out = stdout_json(&client());
    assert_eq!(
        out,
        serde_json::json!({"clean": false, "status": "FOUND", "http": 200})
    );

    // No file: the request fails; no empty file is scanned instead.
    std::fs::remove_file(&invoice).unwrap();
    let out = client();
    assert!(
        !out.status.success(),
        "the Go client went on without the file"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Not scanned (clamd gone): not clean.
    drop(clamd);
    std::fs::write(&invoice, random_bytes(1000, 43)).unwrap();
    let out = stdout_json(&client());
    assert_eq!(
        out,
        serde_json::json!({"clean": false, "status": "ERROR", "http": 503})
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Node.js 20+; scripts/test.sh runs it where node is 20 or later"]
async fn the_node_client_tells_clean_from_infected() {
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let (gw, token) = gateway_with_token(&clamd, dir.path()).await;
    // The example ends with `clean`; print it, and the status.
    let node = block_after(&readme(), "**Node.js**")
        + "console.log(JSON.stringify({ clean, status: result.status }));\n";
    let invoice = dir.path().join("invoice.pdf");
    let module = |code: &str| {
        run(
            &gw,
            dir.path(),
            &token,
            "node",
            &["--input-type=module", "-e"],
            code,
        )
    };

    std::fs::write(&invoice, random_bytes(200_000, 31)).unwrap();
    let out = stdout_json(&module(&node));
    assert_eq!(out, serde_json::json!({"clean": true, "status": "OK"}));

    let mut infected = random_bytes(100_000, 32);
    infected.extend_from_slice(EICAR);
    std::fs::write(&invoice, infected).unwrap();
    let out = stdout_json(&module(&node));
    assert_eq!(out, serde_json::json!({"clean": false, "status": "FOUND"}));

    std::fs::remove_file(&invoice).unwrap();
    let out = module(&node);
    assert!(
        !out.status.success(),
        "the Node.js client went on without the file"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_reference_curl_examples_work() {
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let (gw, token) = gateway_with_token(&clamd, dir.path()).await;
    let api = std::fs::read_to_string(repo_root().join("docs/api.md")).unwrap();
    let at = |heading: &str| &api[api.find(heading).unwrap()..];
    let one = block_after(at("### `POST /v1/scan` (and `POST /scan`)"), "```sh");
    let batch = block_after(at("### `POST /v1/scan/batch`"), "```sh");
    let raw = block_after(at("### `POST /v1/scan/raw`"), "```sh");
    std::fs::write(dir.path().join("report.pdf"), random_bytes(3000, 61)).unwrap();
    std::fs::write(dir.path().join("a.pdf"), random_bytes(3000, 62)).unwrap();
    std::fs::write(dir.path().join("b.zip"), EICAR).unwrap();

    let body = stdout_json(&run(&gw, dir.path(), &token, "sh", &["-c"], &one));
    assert_eq!(
        (&body["filename"], &body["status"]),
        (&"report.pdf".into(), &"OK".into()),
        "{body}"
    );

    let body = stdout_json(&run(&gw, dir.path(), &token, "sh", &["-c"], &batch));
    let results = body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(
        names_and_statuses(results),
        [
            ("a.pdf".into(), "OK".into()),
            ("b.zip".into(), "FOUND".into())
        ],
        "{body}"
    );

    // Two commands, two answers; the second names the file as its query.
    let out = run(&gw, dir.path(), &token, "sh", &["-c"], &raw);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<serde_json::Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        names_and_statuses(&answers),
        [
            ("report.pdf".into(), "OK".into()),
            ("rapport été.pdf".into(), "OK".into())
        ],
        "{answers:?}"
    );
    gw.stop().await;
}

/// `Key Value` lines of a clamd.conf text (comments, after `#`, dropped).
fn clamd_options(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn the_external_clamd_settings_agree_wherever_they_are_written() {
    // The README, configuration.md and deploy/clamd.conf each show what an
    // external clamd needs; they must not drift apart.
    let deploy =
        clamd_options(&std::fs::read_to_string(repo_root().join("deploy/clamd.conf")).unwrap());
    let reference = std::fs::read_to_string(repo_root().join("docs/configuration.md")).unwrap();
    let shown = [
        (
            "README.md",
            block_after(&readme(), "Each clamd must run with"),
        ),
        (
            "docs/configuration.md",
            block_after(&reference, "For example, for avgate's defaults:"),
        ),
    ];
    let required = [
        "AlertExceedsMax",
        "AlertEncrypted",
        "StreamMaxLength",
        "MaxFileSize",
        "MaxScanSize",
        "PCREMaxFileSize",
        "MaxHTMLNormalize",
        "MaxEmbeddedPE",
    ];
    for (name, block) in shown {
        let options = clamd_options(&block);
        for key in required {
            assert!(options.contains_key(key), "{name} does not show {key}");
        }
        for (key, value) in &options {
            assert_eq!(
                deploy.get(key),
                Some(value),
                "{name} and deploy/clamd.conf differ on {key}"
            );
        }
    }
}

/// The AppArmor rules scripts/setup.sh adds for avgate's data directories
/// are valid in both ClamAV profiles, as the Debian packages ship them:
/// apparmor_parser compiles each profile with them (without loading it; no
/// AppArmor in the kernel here, so whether clamd then starts under them
/// is not checked).
#[test]
fn the_apparmor_rules_of_the_setup_script_compile() {
    let setup = std::fs::read_to_string(repo_root().join("scripts/setup.sh")).unwrap();
    let rules: String = setup
        .split("<<'RULES'\n")
        .nth(1)
        .and_then(|rest| rest.split("\nRULES\n").next())
        .expect("a RULES here-document in scripts/setup.sh")
        .to_owned();
    assert!(rules.contains("/var/lib/avgate/clamd/** rwk,"), "{rules}");
    let base = tempfile::tempdir().unwrap();
    for dir in ["abstractions", "tunables", "abi"] {
        let from = Path::new("/etc/apparmor.d").join(dir);
        let status = Command::new("cp")
            .arg("-r")
            .arg(&from)
            .arg(base.path())
            .status()
            .unwrap();
        assert!(status.success(), "copy {}", from.display());
    }
    std::fs::create_dir(base.path().join("local")).unwrap();
    for profile in ["usr.sbin.clamd", "usr.bin.freshclam"] {
        std::fs::copy(
            Path::new("/etc/apparmor.d").join(profile),
            base.path().join(profile),
        )
        .unwrap();
        std::fs::write(base.path().join("local").join(profile), &rules).unwrap();
        let out = Command::new("apparmor_parser")
            .args(["--skip-kernel-load", "--skip-cache", "--base"])
            .arg(base.path())
            .arg("--preprocess")
            .arg(profile)
            .current_dir(base.path())
            .output()
            .expect("apparmor_parser (package apparmor)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{profile}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("/var/lib/avgate/clamd/** rwk,"),
            "{profile}: the rules are in"
        );
        let compiled = Command::new("apparmor_parser")
            .args(["--skip-kernel-load", "--skip-cache", "--base"])
            .arg(base.path())
            .arg(profile)
            .current_dir(base.path())
            .output()
            .unwrap();
        assert!(
            compiled.status.success(),
            "{profile}: {}",
            String::from_utf8_lossy(&compiled.stderr)
        );
    }
}
