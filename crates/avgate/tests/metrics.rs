//! Operators' view: Prometheus metrics on their own listener (checked by
//! value after known scans, and by promtool), the alert rules and the
//! Grafana dashboard in deploy/, and the one JSON log line per scan of a
//! real `avgate serve`.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::binary::Server;
use common::*;
use serde_json::Value;

/// sha256 of the EICAR test string.
const EICAR_SHA256: &str = "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f";

/// Metrics that the deploy/ files use but that a test instance does not
/// always have, and why.
const CONDITIONAL: &[&str] = &[
    // Only with a signed (official) database; the tests run test signatures.
    "avgate_backend_database_version",
    // Only when the pool can date the database: a signed one, or its files
    // in a directory it knows (managed mode: checked in the binary test).
    "avgate_backend_database_age_seconds",
    // Only in managed mode (checked in the binary test below).
    "avgate_managed_clamd_restarts_total",
    "avgate_managed_clamd_temp_free_bytes",
    "avgate_managed_clamd_temp_size_bytes",
];

/// One sample of the text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A small parser for the text format 0.0.4 as avgate writes it (label
/// values without escaped quotes or commas).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("name value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').expect("closing brace");
                    let labels = rest
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once("=\"").expect("k=\"v\"");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            Sample {
                name: name.to_owned(),
                labels,
                value: value
                    .parse()
                    .unwrap_or_else(|_| panic!("value in {line:?}")),
            }
        })
        .collect()
}

/// The sum of the series of `name` that carry all of `labels`; `None`
/// when there is none.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (scripts/setup.sh test: Debian package prometheus)");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

/// The metric names (`avgate_*`) used in a deploy/ file, without the
/// histogram suffixes.
fn names_used_in(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut names: Vec<String> = text
        .match_indices("avgate_")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .fold(n, |n, s| n.strip_suffix(s).map(str::to_owned).unwrap_or(n))
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_scans_by_label_and_pass_promtool() {
    let clamd = Clamd::start("");
    let mut config = config(&[clamd.address()]);
    config.max_size = avgate::config::ByteSize(1024);
    let gw = Gateway::start(config).await;
    let metrics_addr = gw.metrics_addr.expect("the metrics listener is on");
    assert_ne!(metrics_addr.port(), gw.addr.port());

    let (status, body) = gw.scan("eicar.com", EICAR.to_vec()).await;
    assert_eq!((status, body["verdict"].as_str()), (200, Some("infected")));
    let (status, body) = gw.scan("notes.txt", b"nothing to see".to_vec()).await;
    assert_eq!((status, body["verdict"].as_str()), (200, Some("clean")));
    let (status, body) = gw
        .post_raw("/v1/scan/raw", "application/octet-stream", vec![0; 4096])
        .await;
    assert_eq!(status, 413, "{body}");
    let r = gw
        .client
        .get(gw.url("/no/such/path-4711?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Never on the public listener.
    let r = gw.client.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404, "the public listener serves no metrics");
    // Health on the metrics listener too, in plain HTTP whatever the public
    // one speaks (a container's health check); nothing else of the API.
    let on_metrics = |path: &str| gw.client.get(format!("http://{metrics_addr}{path}")).send();
    let (status, ready) = json(on_metrics("/readyz").await.unwrap()).await;
    assert_eq!(
        (status, ready["status"].as_str()),
        (200, Some("ready")),
        "{ready}"
    );
    assert_eq!(on_metrics("/healthz").await.unwrap().status(), 200);
    for path in ["/version", "/v1/scan"] {
        assert_eq!(on_metrics(path).await.unwrap().status(), 404, "{path}");
    }

    let text = scrape_metrics(&gw.client, metrics_addr).await;
    let s = parse(&text);
    let backend = clamd.address();
    let v = |name: &str, labels: &[(&str, &str)]| value(&s, name, labels);
    let expect = |name: &str, labels: &[(&str, &str)], want: f64| {
        assert_eq!(v(name, labels), Some(want), "{name} {labels:?} in\n{text}");
    };

    expect(
        "avgate_scans_total",
        &[("verdict", "infected"), ("engine", "clamav")],
        1.0,
    );
    expect(
        "avgate_scans_total",
        &[("verdict", "clean"), ("engine", "clamav")],
        1.0,
    );
    expect("avgate_scans_total", &[], 2.0);
    expect(
        "avgate_scanned_bytes_total",
        &[],
        (EICAR.len() + "nothing to see".len()) as f64,
    );
    expect("avgate_scan_duration_seconds_count", &[], 2.0);
    expect(
        "avgate_scan_duration_seconds_bucket",
        &[("le", "+Inf")],
        2.0,
    );
    expect("avgate_scans_in_flight", &[], 0.0);
    expect(
        "avgate_http_requests_total",
        &[("route", "/v1/scan"), ("method", "POST"), ("status", "200")],
        2.0,
    );
    expect(
        "avgate_http_request_duration_seconds_count",
        &[("route", "/v1/scan")],
        2.0,
    );
    expect(
        "avgate_http_requests_total",
        &[("route", "/v1/scan/raw"), ("status", "413")],
        1.0,
    );
    expect(
        "avgate_http_requests_total",
        &[("route", "unmatched"), ("method", "GET"), ("status", "404")],
        2.0,
    );
    assert!(
        !text.contains("/no/such") && !text.contains("/metrics\""),
        "raw paths must not become labels:\n{text}"
    );
    expect(
        "avgate_rejections_total",
        &[("code", "file_too_large")],
        1.0,
    );
    expect("avgate_rejections_total", &[("code", "not_found")], 2.0);
    expect("avgate_backend_up", &[("backend", &backend)], 1.0);
    expect("avgate_backend_in_flight", &[("backend", &backend)], 0.0);
    expect(
        "avgate_backend_max_concurrent",
        &[("backend", &backend)],
        8.0,
    );
    // A real clamd on a Unix socket takes descriptors.
    expect("avgate_backend_fd_passing", &[("backend", &backend)], 1.0);
    expect(
        "avgate_backend_scan_duration_seconds_count",
        &[("backend", &backend)],
        2.0,
    );
    expect("avgate_backend_info", &[("backend", &backend)], 1.0);
    assert!(
        s.iter()
            .any(|x| x.name == "avgate_backend_info" && !x.labels["clamav"].is_empty()),
        "{text}"
    );
    expect("avgate_database_info", &[("kind", "external")], 1.0);
    expect("avgate_build_info", &[], 1.0);
    assert!(
        v(
            "avgate_backend_last_probe_timestamp_seconds",
            &[("backend", &backend)]
        )
        .is_some_and(|t| t > 1.7e9),
        "{text}"
    );

    let (ok, report) = promtool(&["check", "metrics"], Some(&text));
    assert!(ok, "promtool check metrics:\n{report}\n{text}");

    // The dashboard, the alert rules and the operations guide only use
    // metrics that exist, and the guide describes every one.
    let present: Vec<&str> = s.iter().map(|x| x.name.as_str()).collect();
    let documented = names_used_in(&repo_root().join("docs/operations.md"));
    for name in &present {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(*name, |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(
            documented.iter().any(|d| d == base),
            "docs/operations.md does not describe {base}"
        );
    }
    for file in [
        "deploy/grafana-dashboard.json",
        "deploy/prometheus-alerts.yml",
        "docs/operations.md",
    ] {
        for name in names_used_in(&repo_root().join(file)) {
            let exists = present.iter().any(|p| {
                *p == name
                    || p.strip_prefix(name.as_str())
                        .is_some_and(|s| s.starts_with('_'))
            });
            assert!(
                exists || CONDITIONAL.contains(&name.as_str()),
                "{file} uses {name}, which avgate does not export"
            );
        }
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_turned_off() {
    let mut config = config(&["tcp://127.0.0.1:1".to_owned()]);
    config.metrics.enabled = false;
    let gw = Gateway::start_unready(config).await;
    assert_eq!(gw.metrics_addr, None);
    gw.stop().await;
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let rules = repo_root().join("deploy/prometheus-alerts.yml");
    let (ok, report) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "promtool check rules:\n{report}");
    assert!(report.contains("SUCCESS"), "{report}");
}

/// Every rule in the file is in the operations guide's table of alerts,
/// and the table names no rule the file does not have.
#[test]
fn the_alerts_table_lists_the_alert_rules() {
    let rules = std::fs::read_to_string(repo_root().join("deploy/prometheus-alerts.yml")).unwrap();
    let guide = std::fs::read_to_string(repo_root().join("docs/operations.md")).unwrap();
    let mut in_file: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect();
    let table = &guide[guide.find("### Alerts").expect("an Alerts section")..];
    let mut in_table: Vec<&str> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| name.starts_with("Avgate"))
        .collect();
    in_file.sort();
    in_table.sort();
    assert!(in_file.len() >= 10, "{in_file:?}");
    assert_eq!(in_table, in_file);
}

#[test]
fn the_grafana_dashboard_is_valid_and_asks_for_a_prometheus_datasource() {
    let text = std::fs::read_to_string(repo_root().join("deploy/grafana-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(
        dash["schemaVersion"].as_u64().unwrap() >= 36,
        "Grafana 9/10 schema"
    );
    assert_eq!(dash["uid"], "avgate");
    let variables = dash["templating"]["list"].as_array().unwrap();
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["query"], "prometheus");
    let name = datasource["name"].as_str().unwrap();

    let panels = dash["panels"].as_array().unwrap();
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let mut queries = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap();
        assert_eq!(panel["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(
            panel["datasource"]["uid"],
            format!("${{{name}}}"),
            "{title}"
        );
        let grid = &panel["gridPos"];
        assert!(
            grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
            "{title} fits the 24-column grid"
        );
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains("avgate_"), "{title}: {expr}");
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
}

/// The real binary in managed mode, with a token: each scan logs one JSON
/// line with its context, the token's name but never the token, and no
/// file content; `--metrics-listen` moves the metrics listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scan_logs_one_json_line_with_its_context_and_no_content() {
    let server = Server::builder("avg-met");
    let data = server.data_dir();
    let metrics_port = free_port();

    let token = create_token_with_cli(&data, "partner-a");

    let mut server = server
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .env_remove("AVGATE_AUTH__REQUIRED")
        .start();
    server.wait_ready(Duration::from_secs(90)).await;
    let (base, client) = (server.base.clone(), server.client.clone());

    // EICAR over multipart with the token; a clean file over the raw
    // endpoint, whose content and hostile name must not reach the log.
    let part = reqwest::multipart::Part::bytes(EICAR.to_vec()).file_name("eicar.com");
    let r = client
        .post(format!("{base}/v1/scan"))
        .bearer_auth(&token)
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    let infected_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let (status, infected) = json(r).await;
    assert_eq!(
        (status, infected["verdict"].as_str()),
        (200, Some("infected"))
    );

    const CONTENT: &str = "quarterly-figures-7f3a9c-do-not-log";
    let r = client
        // "../../etc/q3 report<RIGHT-TO-LEFT OVERRIDE>fdp.exe"
        .post(format!(
            "{base}/v1/scan/raw?filename=..%2F..%2Fetc%2Fq3%20report%E2%80%AEfdp.exe"
        ))
        .bearer_auth(&token)
        .header("content-type", "application/octet-stream")
        .body(CONTENT)
        .send()
        .await
        .unwrap();
    let clean_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let (status, clean) = json(r).await;
    assert_eq!(
        (status, clean["verdict"].as_str()),
        (200, Some("clean")),
        "{clean}"
    );

    // Refused before any scan: the request line says why.
    let r = client
        .post(format!("{base}/v1/scan"))
        .bearer_auth(&token)
        .multipart(reqwest::multipart::Form::new().text("note", "no file"))
        .send()
        .await
        .unwrap();
    let refused_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(r.status(), 400);

    let text = scrape_metrics(
        &client,
        format!("127.0.0.1:{metrics_port}").parse().unwrap(),
    )
    .await;
    let s = parse(&text);
    assert_eq!(
        value(&s, "avgate_managed_clamd_restarts_total", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(value(&s, "avgate_scans_total", &[]), Some(2.0), "{text}");
    // The file system of <data_dir>/clamd/tmp, as statvfs sees it.
    let free = value(&s, "avgate_managed_clamd_temp_free_bytes", &[]).unwrap();
    let size = value(&s, "avgate_managed_clamd_temp_size_bytes", &[]).unwrap();
    assert!(0.0 < free && free <= size, "{text}");
    let df = rustix::fs::statvfs(server.data.join("clamd/tmp")).unwrap();
    assert_eq!(size, (df.f_blocks * df.f_frsize) as f64);
    let df_free = (df.f_bavail * df.f_frsize) as f64;
    assert!((free - df_free).abs() < 1e9, "{free} against {df_free} now");
    let age = value(&s, "avgate_backend_database_age_seconds", &[]);
    assert!(
        age.is_some_and(|a| (0.0..86400.0).contains(&a)),
        "the managed clamd's test database was just written:\n{text}"
    );
    let (ok, report) = promtool(&["check", "metrics"], Some(&text));
    assert!(
        ok,
        "promtool check metrics (managed mode):\n{report}\n{text}"
    );

    // Stop it so that every line is written.
    server.terminate(Duration::from_secs(30));

    let log = server.log_text();
    let lines = server.log_lines();
    let scanned: Vec<&Value> = lines.iter().filter(|l| l["message"] == "scanned").collect();
    assert_eq!(scanned.len(), 2, "one line per scan:\n{log}");

    let line = |id: &str| {
        *scanned
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no scan line with request_id {id}:\n{log}"))
    };
    let eicar = line(&infected_id);
    assert_eq!(eicar["level"], "INFO");
    assert_eq!(eicar["client"], "127.0.0.1");
    assert_eq!(eicar["token"], "partner-a");
    assert_eq!(eicar["filename"], "eicar.com");
    assert_eq!(eicar["size"], EICAR.len());
    assert_eq!(eicar["sha256"], EICAR_SHA256);
    assert_eq!(eicar["status"], "FOUND");
    assert_eq!(eicar["verdict"], "infected");
    assert_eq!(eicar["signature"], infected["signature"]);
    assert!(eicar["signature"]
        .as_str()
        .unwrap()
        .starts_with("Eicar-Test-Signature"));
    assert_eq!(eicar["engine"], "clamav");
    assert_eq!(eicar["backend"], infected["engine"]["backend"]);
    assert!(eicar["backend"].as_str().unwrap().starts_with("unix:"));
    assert!(eicar["duration_ms"].is_u64(), "{eicar}");

    let other = line(&clean_id);
    assert_eq!(other["verdict"], "clean");
    assert_eq!(other["signature"], "");
    assert_eq!(other["size"], CONTENT.len());
    assert_eq!(other["sha256"], clean["sha256"]);
    assert_eq!(other["filename"], "q3 reportfdp.exe", "sanitized");
    assert_eq!(other["filename"], clean["filename"], "as answered");

    let request_line = |id: &str| {
        lines
            .iter()
            .find(|l| l["message"] == "request" && l["span"]["request_id"] == id)
            .unwrap_or_else(|| panic!("no request line for {id}:\n{log}"))
    };
    let refused = request_line(&refused_id);
    assert_eq!(
        (refused["status"].as_u64(), refused["code"].as_str()),
        (Some(400), Some("missing_file")),
        "{refused}"
    );
    let answered = request_line(&infected_id);
    assert_eq!(answered["status"], 200, "{answered}");
    assert!(answered.get("code").is_none(), "{answered}");

    assert!(!log.contains(&token), "a token in the log");
    assert!(!log.contains(&token[4..20]), "part of a token in the log");
    assert!(!log.contains("EICAR-STANDARD"), "file content in the log");
    assert!(!log.contains(CONTENT), "file content in the log");
}
