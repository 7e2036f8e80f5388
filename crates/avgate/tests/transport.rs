//! How files travel to clamd: small files go to a clamd on a Unix socket
//! as the descriptor of an in-memory file (FILDES), everything else as a
//! stream (INSTREAM), and a clamd that cannot take descriptors still gets
//! every file. clamd's own log says which way each file came:
//! `/memfd:avgate-scan (deleted): ...` or `instream(local): ...`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use avgate::config::ByteSize;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BY_FD: &str = "/memfd:avgate-scan (deleted): ";
const BY_STREAM: &str = "instream(local): ";

/// A clamd that logs every verdict, clean ones too, and where it logs.
/// (The health probes log `instream(local): Eicar...` lines of their own,
/// so the streamed files below are told apart by their clean verdicts.)
fn logging_clamd() -> (Clamd, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("clamd.log");
    let clamd = Clamd::start(&format!("LogFile {}\nLogClean yes", log.display()));
    (clamd, dir, log)
}

/// How many lines of clamd's log contain `what`, waiting (a little) until
/// there are at least `expected`: clamd writes each line after its reply.
async fn logged(log: &Path, what: &str, expected: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let n = text.lines().filter(|l| l.contains(what)).count();
        if n >= expected || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_go_as_descriptors_and_large_ones_as_streams() {
    let (clamd, _logs, log) = logging_clamd();
    let gw = Gateway::start(config(&[clamd.address()])).await;

    gw.scan_expecting("eicar.com", EICAR.to_vec(), "FOUND")
        .await;
    let line = format!("{BY_FD}Eicar-Test-Signature.UNOFFICIAL FOUND");
    assert_eq!(
        logged(&log, &line, 1).await,
        1,
        "EICAR was not passed as a descriptor"
    );

    // Up to 1 MiB (the default) by descriptor; the pipeline hands the
    // engine 64 KiB pieces, all held until the end.
    let body = gw
        .scan_expecting("small.bin", random_bytes(1 << 20, 1), "OK")
        .await;
    assert_eq!(body["size"], 1 << 20);
    assert_eq!(logged(&log, &format!("{BY_FD}OK"), 1).await, 1);

    // One byte more: streamed.
    gw.scan_expecting("large.bin", random_bytes((1 << 20) + 1, 2), "OK")
        .await;
    assert_eq!(logged(&log, &format!("{BY_STREAM}OK"), 1).await, 1);

    // Streamed after being held: the held bytes are sent first, so a
    // signature at the very start is still found.
    let mut large = EICAR.to_vec();
    large.extend_from_slice(&random_bytes(3 << 20, 3));
    gw.scan_expecting("large-eicar.bin", large, "FOUND").await;

    // An empty file is streamed: there is nothing to hand over.
    let body = gw.scan_expecting("empty", Vec::new(), "OK").await;
    assert_eq!(body["size"], 0);
    assert_eq!(logged(&log, &format!("{BY_STREAM}OK"), 2).await, 2);
    assert_eq!(logged(&log, BY_FD, 0).await, 2, "only the two small files");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_passing_can_be_turned_off() {
    let (clamd, _logs, log) = logging_clamd();
    let mut c = config(&[clamd.address()]);
    c.clamd.small_file_max_size = ByteSize(0);
    let gw = Gateway::start(c).await;

    gw.scan_expecting("clean.txt", b"clean".to_vec(), "OK")
        .await;
    assert_eq!(logged(&log, &format!("{BY_STREAM}OK"), 1).await, 1);
    assert_eq!(logged(&log, BY_FD, 0).await, 0);
    gw.stop().await;
}

/// What passed through a [`relay`].
#[derive(Default)]
struct Seen {
    sessions: AtomicUsize,
    fildes: AtomicUsize,
}

/// A Unix-socket relay in front of a real clamd that forwards bytes but
/// not file descriptors (a plain read drops them), as a clamd that cannot
/// receive one behaves. Counts the sessions opened and the FILDES commands
/// sent through it.
async fn relay(clamd: &Clamd) -> (String, Arc<Seen>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let upstream = clamd.socket.clone();
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let counts = counts.clone();
            tokio::spawn(async move {
                let server = tokio::net::UnixStream::connect(&upstream).await?;
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut server_rx, &mut client_tx).await });
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = client_rx.read(&mut buf).await?;
                    if n == 0 {
                        return std::io::Result::Ok(());
                    }
                    let data = &buf[..n];
                    for (pattern, counter) in [
                        (&b"zIDSESSION\0"[..], &counts.sessions),
                        (&b"zFILDES\0"[..], &counts.fildes),
                    ] {
                        let hits = data
                            .windows(pattern.len())
                            .filter(|w| *w == pattern)
                            .count();
                        counter.fetch_add(hits, Ordering::SeqCst);
                    }
                    server_tx.write_all(data).await?;
                }
            });
        }
    });
    (format!("unix:{}", path.display()), seen, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clamd_that_refuses_descriptors_still_scans_every_file() {
    let (clamd, _logs, log) = logging_clamd();
    let (address, seen, _dir) = relay(&clamd).await;
    let gw = Gateway::start(config(&[address])).await;

    // The first small file tries FILDES, clamd answers "No file descriptor
    // received. ERROR", and the file is streamed instead: same verdict.
    gw.scan_expecting("clean.txt", b"clean".to_vec(), "OK")
        .await;
    gw.scan_expecting("eicar.com", EICAR.to_vec(), "FOUND")
        .await;
    gw.scan_expecting("clean2.txt", b"clean too".to_vec(), "OK")
        .await;

    // Tried once, then never again for this backend, which says so.
    assert_eq!(seen.fildes.load(Ordering::SeqCst), 1);
    let (_, ready) = gw.readyz().await;
    assert_eq!(ready["backends"][0]["fd_passing"], false, "{ready}");
    assert_eq!(logged(&log, &format!("{BY_STREAM}OK"), 2).await, 2);
    assert_eq!(logged(&log, BY_FD, 0).await, 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_reuse_one_clamd_session() {
    let (clamd, _logs, log) = logging_clamd();
    let (address, seen, _dir) = relay(&clamd).await;
    let gw = Gateway::start(config(&[address])).await;

    // The relay drops descriptors, so after the first file (which falls
    // back to a stream) small files go as INSTREAM inside a session.
    for i in 0..6 {
        gw.scan_expecting("clean.txt", format!("clean {i}").into_bytes(), "OK")
            .await;
    }
    gw.scan_expecting("eicar.com", EICAR.to_vec(), "FOUND")
        .await;
    // One session for the refused descriptor, one for the five files and
    // EICAR that followed, one after the other.
    assert_eq!(seen.sessions.load(Ordering::SeqCst), 2);
    assert_eq!(logged(&log, &format!("{BY_STREAM}OK"), 6).await, 6);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_clamd_closed_while_idle_is_replaced_not_an_error() {
    // clamd closes a session that sends no command for ReadTimeout (here
    // 1 s; 120 s by default), and avgate reuses sessions idle up to 10 s.
    let clamd = Clamd::start("ReadTimeout 1");
    let gw = Gateway::start(config(&[clamd.address()])).await;
    gw.scan_expecting("clean.txt", b"clean".to_vec(), "OK")
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for name in ["after-idle.txt", "again.txt"] {
        gw.scan_expecting(name, b"clean".to_vec(), "OK").await;
    }
    gw.scan_expecting("eicar.com", EICAR.to_vec(), "FOUND")
        .await;
    // The backend was never taken for down.
    let (status, ready) = gw.readyz().await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["backends"][0]["state"], "up");
    gw.stop().await;
}
