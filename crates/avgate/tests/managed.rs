//! The real `avgate serve` binary with its managed clamd, end to end:
//! started as a user would, polled until ready, then hurt.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::binary::{alive, Server, ServerBuilder};
use common::*;
use futures_util::StreamExt;

/// The binary as the tests here run it: no tokens (they have their own
/// end-to-end test, tests/auth.rs), no freshclam (no mirror is reachable
/// from the tests).
fn builder(prefix: &str) -> ServerBuilder {
    Server::builder(prefix)
        .env("AVGATE_AUTH__REQUIRED", "false")
        // Not the fixed default port: tests run side by side.
        .env("AVGATE_METRICS__LISTEN", "127.0.0.1:0")
        .env("AVGATE_UPDATES__ENABLED", "false")
}

fn start() -> Server {
    builder("avg-srv").start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_its_own_clamd_restarts_it_and_stops_it() {
    // Health probes far apart, so that what /readyz says right after the
    // crash below comes from the supervisor, not from a probe.
    let mut server = builder("avg-srv")
        .env("AVGATE_CLAMD__HEALTH_INTERVAL", "20s")
        .start();
    let ready = server.wait_ready(Duration::from_secs(60)).await;
    let managed = &ready["managed_clamd"];
    assert_eq!(managed["state"], "running", "{ready}");
    let clamd_pid = managed["pid"].as_i64().unwrap();

    // A scan through the managed clamd.
    let (status, body) = post_file(
        &server.client,
        &server.url("/scan"),
        "eicar.com",
        EICAR.to_vec(),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("FOUND")),
        "{body}"
    );

    let (_, version) = json(
        server
            .client
            .get(server.url("/version"))
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

    // The managed clamd crashes: /readyz says so at once, then it is
    // restarted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(clamd_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let down = server
        .wait_until(Duration::from_secs(2), "not ready", |s, _| s == 503)
        .await;
    assert_eq!(down["status"], "not_ready", "{down}");
    assert_eq!(down["backends"][0]["state"], "down", "{down}");
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
    let status = server.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(!alive(new_pid), "the managed clamd outlived avgate");

    // Logs are JSON lines, and file contents never appear in them.
    let log = server.log_text();
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

/// One avgate per data directory: a second one (started by mistake, or a
/// second container on the same volume) is refused before it touches
/// anything, and the first keeps its clamd and clamd's temporary files.
/// clamd's temporary directory, removed while clamd runs, is made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_avgate_on_the_same_data_dir_is_refused_and_touches_nothing() {
    let first = builder("avg-one").start();
    let ready = first.wait_ready(Duration::from_secs(60)).await;
    let clamd_pid = ready["managed_clamd"]["pid"].as_i64().unwrap();
    let tmp = first.data.join("clamd/tmp");
    std::fs::write(tmp.join("spooled-upload"), "x").unwrap();
    let conf = std::fs::read(first.data.join("clamd/clamd.conf")).unwrap();

    let mut second = builder("avg-two")
        .reuse_data_dir(&first.data)
        .stderr_to_file()
        .start();
    let status = second.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{status:?}");
    let stderr = second.stderr_text();
    assert!(
        stderr.contains("another avgate is running with the data directory"),
        "{stderr}"
    );
    assert!(
        alive(clamd_pid),
        "the second avgate killed the first one's clamd"
    );
    assert!(
        tmp.join("spooled-upload").exists(),
        "the second avgate emptied clamd's temporary directory"
    );
    assert_eq!(
        std::fs::read(first.data.join("clamd/clamd.conf")).unwrap(),
        conf
    );
    let (status, body) =
        post_file(&first.client, &first.url("/scan"), "e.com", EICAR.to_vec()).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("FOUND")),
        "{body}"
    );

    // The temporary directory goes away under clamd (by hand, a cleaner):
    // it is made again, and once clamd passes a probe again archives,
    // which clamd extracts there, are scanned again.
    std::fs::remove_dir_all(&tmp).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !tmp.is_dir() {
        assert!(std::time::Instant::now() < deadline, "not made again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first
        .wait_until(Duration::from_secs(10), "ready again", |s, _| s == 200)
        .await;
    let zip = std::fs::read(Path::new(TESTFILES).join("clam.zip")).unwrap();
    let (status, body) = post_file(&first.client, &first.url("/scan"), "clam.zip", zip).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("FOUND")),
        "{body}"
    );
    assert!(first
        .log_text()
        .contains("temporary directory was removed while clamd ran"));
}

/// A pid file left by a crash (a power loss) may name a process that is
/// now another clamd: it is stopped only if it runs avgate's own config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pid_file_naming_another_clamd_leaves_it_alone() {
    let other = Clamd::start("");
    let other_pid = other.pid().unwrap();
    let server = builder("avg-pid");
    let clamd_dir = server.data_dir().join("clamd");
    std::fs::create_dir_all(&clamd_dir).unwrap();
    std::fs::write(clamd_dir.join("clamd.pid"), format!("{other_pid}\n")).unwrap();
    let server = server.start();
    server.wait_ready(Duration::from_secs(60)).await;
    assert!(
        alive(other_pid.into()),
        "avgate killed a clamd that was not its own"
    );
    let client = reqwest::Client::new();
    let (status, body) = post_file(&client, &server.url("/scan"), "e.com", EICAR.to_vec()).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("FOUND")),
        "{body}"
    );
}

/// An avgate that is killed outright (SIGKILL, the OOM killer) cannot stop
/// its clamd: the kernel does (clamd runs under `setpriv --pdeathsig`), so
/// no orphaned clamd holds its memory and socket; the next avgate on the
/// same data directory starts as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_avgate_takes_its_clamd_along() {
    let mut server = start();
    let ready = server.wait_ready(Duration::from_secs(60)).await;
    let clamd_pid = ready["managed_clamd"]["pid"].as_i64().unwrap();
    server.signal(nix::sys::signal::Signal::SIGKILL);
    server.wait_exit(Duration::from_secs(10));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while alive(clamd_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "clamd {clamd_pid} outlived the avgate that was killed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let again = builder("avg-kill").reuse_data_dir(&server.data).start();
    let ready = again.wait_ready(Duration::from_secs(60)).await;
    assert_ne!(ready["managed_clamd"]["pid"].as_i64(), Some(clamd_pid));
    let client = reqwest::Client::new();
    let (status, body) = post_file(&client, &again.url("/scan"), "e.com", EICAR.to_vec()).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("FOUND")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_150_mib_upload_is_streamed_with_bounded_memory() {
    let server = start();
    server.wait_ready(Duration::from_secs(60)).await;
    let rss_before = server.peak_rss_kib();

    const SIZE: u64 = 150 << 20;
    const CHUNK: u64 = 256 << 10;
    let stream = futures_util::stream::iter(0..SIZE / CHUNK)
        .map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(random_bytes(CHUNK as usize, i + 11))));
    let part =
        reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), SIZE)
            .file_name("big.bin");
    let r = server
        .client
        .post(server.url("/v1/scan"))
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
    let peak_mib = server.peak_rss_kib() / 1024;
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
    let server = start();
    server.wait_ready(Duration::from_secs(60)).await;
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
    let (status, body) = post_file(&server.client, &server.url("/v1/scan"), "bomb.zip", zip).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FOUND", "{body}");
}

/// Regression: clamd runs PCRE subsignatures (a large part of the official
/// logical signatures) only on files up to PCREMaxFileSize, 100M by
/// default, and normalized-HTML signatures only on HTML up to
/// MaxHTMLNormalize, 40M; past them it skips them without any alert. The
/// managed clamd.conf must let them see the whole of an accepted upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcre_and_html_signatures_still_match_in_large_files() {
    // Local signatures beside the built-in test ones: for PCRE, a marker as
    // the trigger, then the expression; for HTML, a string that only the
    // normalized HTML has (tags lower-cased).
    let signatures = tempfile::tempdir().unwrap();
    std::fs::write(
        signatures.path().join("local.ldb"),
        format!(
            "Local.Pcre.Marker;Engine:81-255,Target:0;0&1;{};0/AVGATE-PCRE-MARKER-[0-9]{{6}}-END/\n",
            hex::encode(b"AVGATE-PCRE-MARKER")
        ),
    )
    .unwrap();
    std::fs::write(
        signatures.path().join("local.ndb"),
        format!(
            "Local.Html.Marker:3:*:{}\n",
            hex::encode(b"<script>avgatehtmlmarker")
        ),
    )
    .unwrap();
    let server = builder("avg-pcre")
        .env(
            "AVGATE_MANAGED__DATABASE_DIR",
            signatures.path().to_str().unwrap(),
        )
        .start();
    server.wait_ready(Duration::from_secs(60)).await;
    let url = server.url("/v1/scan");
    let scan = |data: Vec<u8>| post_file(&server.client, &url, "m.bin", data);

    let tail = b"AVGATE-PCRE-MARKER-123456-END".to_vec();
    let (status, body) = scan(tail.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["signature"], "Local.Pcre.Marker.UNOFFICIAL", "{body}");

    let mut big = random_bytes(110 << 20, 51);
    big.extend_from_slice(&tail);
    let (status, body) = scan(big).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["signature"], "Local.Pcre.Marker.UNOFFICIAL", "{body}");

    let html = |filler: usize| {
        let mut page = b"<html><body><p>".to_vec();
        page.resize(page.len() + filler, b'a');
        page.extend_from_slice(b"</p><SCRIPT>avgatehtmlmarker</SCRIPT></body></html>");
        page
    };
    for size in [0, 50 << 20] {
        let (status, body) = scan(html(size)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["signature"], "Local.Html.Marker.UNOFFICIAL",
            "{size}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clamd_works_under_managed_temp_dir_beside_another_avgate() {
    use std::os::unix::fs::PermissionsExt;
    // What a user sets to put clamd's temporary files on a tmpfs, such as
    // /dev/shm, which other programs use too.
    let base = tempfile::Builder::new()
        .prefix("avg-shm")
        .tempdir()
        .unwrap();
    std::fs::write(base.path().join("keep.txt"), "not avgate's").unwrap();
    let config = format!("[managed]\ntemp_dir = \"{}\"\n", base.path().display());
    let with_temp_dir = || builder("avg-tmp").config(&config);
    let (a, b) = (with_temp_dir().start(), with_temp_dir().start());
    a.wait_ready(Duration::from_secs(60)).await;
    b.wait_ready(Duration::from_secs(60)).await;

    // Each avgate has a private directory of its own there, and its clamd
    // is told to use it.
    let mut dirs: Vec<_> = std::fs::read_dir(base.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    let mut used = Vec::new();
    for server in [&a, &b] {
        let conf = std::fs::read_to_string(server.data.join("clamd/clamd.conf")).unwrap();
        let dir = conf
            .lines()
            .find_map(|l| l.strip_prefix("TemporaryDirectory "))
            .unwrap()
            .to_owned();
        used.push(Path::new(&dir).to_owned());
    }
    let used_by_a = used[0].clone();
    used.sort();
    assert_eq!(used, dirs);
    for dir in &dirs {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
    }

    // clamd extracts archives there and spools streams there (files over
    // 1 MiB go to it as streams).
    let zip = std::fs::read(Path::new(TESTFILES).join("clam.zip")).unwrap();
    let (status, body) = post_file(&a.client, &a.url("/scan"), "clam.zip", zip).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("FOUND")),
        "{body}"
    );
    let big = random_bytes(3 << 20, 11);
    let (status, body) = post_file(&b.client, &b.url("/scan"), "big.bin", big).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("OK")),
        "{body}"
    );
    assert_eq!(body["size"], 3 << 20);

    // Stopped, each removes its directory, and nothing else in the shared
    // directory was touched.
    let (mut a, mut b) = (a, b);
    for server in [&mut a, &mut b] {
        assert!(server.terminate(Duration::from_secs(20)).success());
    }
    let left: Vec<_> = std::fs::read_dir(base.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["keep.txt"]);
    assert_eq!(
        std::fs::read_to_string(base.path().join("keep.txt")).unwrap(),
        "not avgate's"
    );

    // Someone else on the host plants a symlink at the (predictable) name,
    // to a directory of theirs, to read what clamd spools: avgate must
    // make a directory of its own instead.
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::symlink(&theirs, &used_by_a).unwrap();
    let again = with_temp_dir().reuse_data_dir(&a.data).start();
    again.wait_ready(Duration::from_secs(60)).await;
    let meta = std::fs::symlink_metadata(&used_by_a).unwrap();
    assert!(meta.is_dir() && !meta.file_type().is_symlink(), "{meta:?}");
    let big = random_bytes(3 << 20, 12);
    let (status, body) = post_file(&again.client, &again.url("/scan"), "big.bin", big).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("OK")),
        "{body}"
    );
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
}
