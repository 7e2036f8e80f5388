//! Test fixtures: a real clamd, an in-process avgate, hand-written fake
//! clamds for the faults a real one cannot produce, HTTP helpers.
#![allow(dead_code)] // each test binary uses a different subset

pub mod binary;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use avgate::config::{ByteSize, Config, Humantime, Overrides};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const EICAR: &[u8] = clamd::EICAR;
pub const TESTFILES: &str = "/usr/share/clamav-testfiles";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A loopback port nobody listens on (at the time of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real clamd on a Unix socket in a temporary directory, loaded with the
/// repository's test signatures. Killed on drop.
pub struct Clamd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Option<Child>,
    extra: String,
    /// RLIMIT_FSIZE in KiB: clamd then cannot write a temporary file past
    /// it, as when its TemporaryDirectory is full.
    file_size_limit_kib: Option<u64>,
}

impl Clamd {
    /// Starts clamd with the defaults avgate's managed mode uses, plus
    /// `extra` clamd.conf lines (later lines override earlier ones).
    pub fn start(extra: &str) -> Clamd {
        Self::start_limited(extra, None)
    }

    /// A clamd that cannot write temporary files of more than
    /// `limit_kib` KiB: what it does when its TemporaryDirectory is full
    /// (it answers `Error writing to temporary file ERROR`), without
    /// needing a full filesystem.
    pub fn with_file_size_limit(limit_kib: u64) -> Clamd {
        Self::start_limited("", Some(limit_kib))
    }

    fn start_limited(extra: &str, file_size_limit_kib: Option<u64>) -> Clamd {
        let dir = tempfile::Builder::new()
            .prefix("avg-clamd")
            .tempdir()
            .unwrap();
        let db = dir.path().join("db");
        std::fs::create_dir(&db).unwrap();
        for f in ["avgate-test.ndb", "avgate-test.hdb"] {
            std::fs::copy(repo_root().join("signatures").join(f), db.join(f)).unwrap();
        }
        let socket = dir.path().join("clamd.sock");
        let mut clamd = Clamd {
            socket,
            child: None,
            extra: extra.to_owned(),
            file_size_limit_kib,
            dir,
        };
        clamd.spawn();
        clamd
    }

    /// The clamd process's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn address(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.path().join("clamd.conf")
    }

    fn spawn(&mut self) {
        // clamd keeps the FIRST value of a repeated option, so the extra
        // lines replace defaults rather than follow them.
        let mut options: Vec<(String, String)> = [
            ("Foreground", "yes".to_owned()),
            ("LocalSocket", self.socket.display().to_string()),
            (
                "DatabaseDirectory",
                self.dir.path().join("db").display().to_string(),
            ),
            ("AlertExceedsMax", "yes".into()),
            ("AlertEncrypted", "yes".into()),
            ("MaxThreads", "8".into()),
            ("StreamMaxLength", "200M".into()),
            ("MaxFileSize", "200M".into()),
            ("MaxScanSize", "400M".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for line in self.extra.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line.trim().split_once(' ').expect("KEY VALUE");
            options.retain(|(key, _)| key != k);
            options.push((k.to_owned(), v.to_owned()));
        }
        let conf: String = options.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
        std::fs::write(self.conf_path(), conf).unwrap();
        let _ = std::fs::remove_file(&self.socket);
        let mut command = match self.file_size_limit_kib {
            None => Command::new(clamd_binary()),
            Some(kib) => {
                // Past the limit a write fails with EFBIG, once SIGXFSZ
                // (which would kill clamd) is ignored; both survive exec.
                let mut sh = Command::new("bash");
                sh.arg("-c")
                    .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\" \"$@\""))
                    .arg(clamd_binary());
                sh
            }
        };
        let child = command
            .arg("--config-file")
            .arg(self.conf_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("clamd starts");
        self.child = Some(child);
        wait_for_clamd(&self.socket);
    }

    /// Kills clamd (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A clamdscan config that talks to this clamd.
    pub fn clamdscan_conf(&self) -> PathBuf {
        let path = self.dir.path().join("clamdscan.conf");
        std::fs::write(&path, format!("LocalSocket {}\n", self.socket.display())).unwrap();
        path
    }
}

impl Drop for Clamd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// clamd lives in /usr/sbin, which a normal user's PATH may lack.
fn clamd_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("clamd"))
        .find(|p| p.is_file())
        .expect("clamd must be installed (scripts/setup.sh test)")
}

/// Waits until clamd really scans (EICAR comes back FOUND). Synchronous
/// on purpose: fixtures are set up from inside async tests.
fn wait_for_clamd(socket: &Path) {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(60);
    let probe = || -> std::io::Result<String> {
        let mut s = std::os::unix::net::UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"zINSTREAM\0")?;
        s.write_all(&(EICAR.len() as u32).to_be_bytes())?;
        s.write_all(EICAR)?;
        s.write_all(&[0, 0, 0, 0])?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    };
    loop {
        if probe().is_ok_and(|r| r.contains("FOUND")) {
            return;
        }
        assert!(Instant::now() < deadline, "clamd did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A configuration for an in-process avgate on a free loopback port, with
/// quick health probes so tests do not wait.
pub fn config(backends: &[String]) -> Config {
    let mut c = Config::load(None, vec![], &Overrides::default()).unwrap();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.clamd.backends = backends.to_vec();
    c.clamd.health_interval = Humantime(Duration::from_millis(400));
    // Tests of other features send bursts from one address; the rate
    // limits have tests of their own.
    c.rate_limit.enabled = false;
    // Likewise tokens (tests/auth.rs turns them on); the listener is
    // loopback, where that is allowed.
    c.auth.required = false;
    c.data_dir = std::env::temp_dir().join("avgate-test-unused");
    // Tests run side by side: never the fixed default port.
    c.metrics.listen = "127.0.0.1:0".parse().unwrap();
    c
}

pub fn mib(n: u64) -> ByteSize {
    ByteSize(n << 20)
}

/// avgate running in this process.
pub struct Gateway {
    pub addr: SocketAddr,
    /// The plain-HTTP listener (`http_listen`), if any.
    pub http_addr: Option<SocketAddr>,
    /// The metrics listener, unless disabled.
    pub metrics_addr: Option<SocketAddr>,
    pub client: reqwest::Client,
    running: Option<avgate::app::Running>,
}

impl Gateway {
    /// Starts avgate and waits until /readyz says ready.
    pub async fn start(config: Config) -> Gateway {
        let gw = Gateway::start_unready(config).await;
        gw.wait_ready(Duration::from_secs(30)).await;
        gw
    }

    /// Starts avgate without waiting for a healthy backend.
    pub async fn start_unready(config: Config) -> Gateway {
        let running = avgate::app::start(config).await.expect("avgate starts");
        Gateway {
            addr: running.addr,
            http_addr: running.http_addr,
            metrics_addr: running.metrics_addr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            running: Some(running),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(r) = self.client.get(self.url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "avgate did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until /readyz lists every backend as up, so that a scan may
    /// go to any of them.
    pub async fn wait_all_backends_up(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let (_, ready) = self.readyz().await;
            let backends = ready["backends"].as_array().cloned().unwrap_or_default();
            if !backends.is_empty() && backends.iter().all(|b| b["state"] == "up") {
                return;
            }
            assert!(Instant::now() < deadline, "backends not all up: {ready}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The metrics listener's exposition text.
    pub async fn metrics_text(&self) -> String {
        let addr = self.metrics_addr.expect("the metrics listener is on");
        scrape_metrics(&self.client, addr).await
    }

    /// `GET /readyz`: status and JSON.
    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        json(self.client.get(self.url("/readyz")).send().await.unwrap()).await
    }

    /// POSTs one file as multipart field `file`; returns status and JSON.
    pub async fn scan(&self, filename: &str, data: Vec<u8>) -> (u16, serde_json::Value) {
        post_file(&self.client, &self.url("/v1/scan"), filename, data).await
    }

    /// Scans one file like [`Gateway::scan`] and asserts a 200 answer with
    /// `status` (`OK`, `FOUND`); returns the answer.
    pub async fn scan_expecting(
        &self,
        filename: &str,
        data: Vec<u8>,
        status: &str,
    ) -> serde_json::Value {
        let (code, body) = self.scan(filename, data).await;
        assert_eq!(
            (code, body["status"].as_str()),
            (200, Some(status)),
            "{filename}: {body}"
        );
        body
    }

    /// POSTs a hand-made body with the given content type.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (u16, serde_json::Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        json(r).await
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stopper().cancel();
            running.wait().await;
        }
    }
}

/// POSTs one file as multipart field `file` to `url`; returns status and JSON.
pub async fn post_file(
    client: &reqwest::Client,
    url: &str,
    filename: &str,
    data: Vec<u8>,
) -> (u16, serde_json::Value) {
    let part = reqwest::multipart::Part::bytes(data).file_name(filename.to_owned());
    let r = client
        .post(url)
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .expect("request");
    json(r).await
}

pub async fn json(r: reqwest::Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text:?} (HTTP {status})"));
    (status, value)
}

/// One part of a hand-made form: field name, file name, content.
pub type FormPart<'a> = (&'a str, Option<&'a [u8]>, &'a [u8]);

/// A multipart body built by hand, for shapes reqwest will not produce.
pub fn multipart_body(boundary: &str, parts: &[FormPart]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\""
        )
        .unwrap();
        if let Some(f) = filename {
            body.extend_from_slice(b"; filename=\"");
            body.extend_from_slice(f);
            body.extend_from_slice(b"\"");
        }
        body.extend_from_slice(b"\r\nContent-Type: application/octet-stream\r\n\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    body
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: fresh, incompressible-enough data without a rand dependency.
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// How a fake clamd misbehaves on a real scan. It answers the readiness
/// probe (EICAR) and VERSION correctly, so avgate thinks it is healthy.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Reads the whole stream, then never answers.
    StallReply,
    /// Reads the whole stream, then answers garbage.
    Malformed,
    /// Reads this many payload bytes, then drops the connection.
    DieAfter(usize),
    /// Reads this many payload bytes, answers `stream: OK` and drops the
    /// connection: a verdict on a stream it did not have in full.
    OkAfter(usize),
    /// As `OkAfter`, but answers only after a pause, by which time the
    /// client has written the rest of a small stream into the socket
    /// buffers, so that no write of its fails: only the reset that follows
    /// the answer says that bytes went unread.
    OkAfterPause(usize),
    /// Answers each scan truly, then at once also `stream: OK` for the
    /// next command, before it is sent (a reply nobody asked for).
    ReplyAhead,
    /// No fault: answers `stream: OK` (for tests of what VERSION says,
    /// such as a signed database's age, which a test clamd cannot have).
    None,
}

/// A hand-written clamd for faults a real one cannot be made to produce.
pub struct FakeClamd {
    pub address: String,
    pub scans: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FakeClamd {
    pub async fn start(fault: Fault) -> FakeClamd {
        FakeClamd::with_version(fault, "ClamAV 1.4.6").await
    }

    /// Answers VERSION with `version`.
    pub async fn with_version(fault: Fault, version: &'static str) -> FakeClamd {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("tcp://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let scans = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop2, scans2) = (stop.clone(), scans.clone());
        tokio::spawn(async move {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let scans = scans2.clone();
                tokio::spawn(async move {
                    let _ = fake_session(socket, fault, version, scans).await;
                });
            }
        });
        FakeClamd {
            address,
            scans,
            stop,
        }
    }
}

impl Drop for FakeClamd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn fake_session(
    mut s: tokio::net::TcpStream,
    fault: Fault,
    version: &str,
    scans: Arc<std::sync::atomic::AtomicUsize>,
) -> std::io::Result<()> {
    // Outside a session one command per connection; inside (IDSESSION, as
    // avgate uses for small files) one after the other, answered `N: ...`.
    let mut session: Option<u64> = None;
    loop {
        let cmd = read_command(&mut s).await?;
        if cmd == b"zIDSESSION" && session.is_none() {
            session = Some(0);
            continue;
        }
        let prefix = match &mut session {
            Some(n) => {
                *n += 1;
                format!("{n}: ")
            }
            None => String::new(),
        };
        let reply = |text: &str| [prefix.as_bytes(), text.as_bytes(), b"\0"].concat();
        match cmd.as_slice() {
            b"zVERSION" => s.write_all(&reply(version)).await?,
            b"zPING" => s.write_all(&reply("PONG")).await?,
            b"zEND" => return Ok(()),
            b"zINSTREAM" => {
                let mut payload = Vec::new();
                let mut total = 0usize;
                loop {
                    let len = s.read_u32().await? as usize;
                    if len == 0 {
                        break;
                    }
                    let mut chunk = vec![0u8; len];
                    s.read_exact(&mut chunk).await?;
                    total += len;
                    if payload.len() < 4096 {
                        payload.extend_from_slice(&chunk[..len.min(4096)]);
                    }
                    if let Fault::DieAfter(n) | Fault::OkAfter(n) | Fault::OkAfterPause(n) = fault {
                        if total >= n && payload != EICAR {
                            if let Fault::OkAfterPause(_) = fault {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                            }
                            if let Fault::OkAfter(_) | Fault::OkAfterPause(_) = fault {
                                s.write_all(&reply("stream: OK")).await?;
                            }
                            return Ok(()); // drop the connection mid-stream
                        }
                    }
                }
                if payload == EICAR {
                    s.write_all(&reply("stream: Eicar-Test-Signature FOUND"))
                        .await?;
                } else if let (Fault::ReplyAhead, Some(n)) = (fault, session) {
                    scans.fetch_add(1, Ordering::Relaxed);
                    // EICAR within the first 4 KiB (all that is kept).
                    let verdict = if payload.windows(EICAR.len()).any(|w| w == EICAR) {
                        "stream: Eicar-Test-Signature FOUND"
                    } else {
                        "stream: OK"
                    };
                    let ahead = format!("{}: stream: OK", n + 1);
                    s.write_all(&[&reply(verdict)[..], ahead.as_bytes(), b"\0"].concat())
                        .await?;
                } else {
                    scans.fetch_add(1, Ordering::Relaxed);
                    match fault {
                        Fault::StallReply => tokio::time::sleep(Duration::from_secs(3600)).await,
                        Fault::Malformed => {
                            s.write_all(&reply("stream: it is probably fine")).await?
                        }
                        Fault::DieAfter(_)
                        | Fault::OkAfter(_)
                        | Fault::OkAfterPause(_)
                        | Fault::ReplyAhead => {}
                        Fault::None => s.write_all(&reply("stream: OK")).await?,
                    }
                    if !matches!(fault, Fault::None) {
                        return Ok(());
                    }
                }
            }
            _ => {
                s.write_all(&reply("UNKNOWN COMMAND")).await?;
                return Ok(());
            }
        }
        if session.is_none() {
            return Ok(());
        }
    }
}

async fn read_command(s: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    let mut cmd = Vec::new();
    loop {
        let b = s.read_u8().await?;
        if b == 0 {
            return Ok(cmd);
        }
        cmd.push(b);
    }
}

/// Writes `head`, then all of `body`, and only then reads the answer, as
/// Python's requests and most scripts do. The error if a write or the
/// read failed (the connection was reset under the client).
pub async fn send_all_then_read(
    addr: std::net::SocketAddr,
    head: &str,
    body: &[u8],
) -> std::io::Result<String> {
    send_then_read(addr, head, body, false).await
}

/// Sends a request head and a body that ends before the request says it
/// does, closes the sending side (as a client whose upload broke off but
/// still waits for the answer), and reads the answer.
pub async fn send_cut_short_then_read(
    addr: std::net::SocketAddr,
    head: &str,
    body: &[u8],
) -> std::io::Result<String> {
    send_then_read(addr, head, body, true).await
}

async fn send_then_read(
    addr: std::net::SocketAddr,
    head: &str,
    body: &[u8],
    close_sending_side: bool,
) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    if close_sending_side {
        stream.shutdown().await?;
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// `GET /metrics` on a metrics listener: 200 in the Prometheus text format
/// 0.0.4; the text.
pub async fn scrape_metrics(client: &reqwest::Client, addr: SocketAddr) -> String {
    let r = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    r.text().await.unwrap()
}

/// A token made as the README says, with `avgate token create` on the
/// data directory (the first line of its output).
pub fn create_token_with_cli(data_dir: &Path, name: &str) -> String {
    create_token_with_cli_args(data_dir, name, &[])
}

/// [`create_token_with_cli`] with more `token create` options.
pub fn create_token_with_cli_args(data_dir: &Path, name: &str, args: &[&str]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_avgate"));
    command
        .args(["token", "create", "--name", name, "--data-dir"])
        .arg(data_dir)
        .args(args);
    let token = stdout_of(&mut command).lines().next().unwrap().to_owned();
    assert!(token.starts_with("avg_"), "{token}");
    token
}

/// Runs `command`, which must succeed (else its stderr is the failure);
/// its stdout.
pub fn stdout_of(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The body in HTTP/1.1 chunked framing, 64 KiB a chunk.
pub fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 1024 + 16);
    for chunk in body.chunks(64 * 1024) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Asserts that an answer (status and JSON, as [`json`] returns it) has
/// `status` and the error `code`.
pub fn assert_error(answer: &(u16, serde_json::Value), status: u16, code: &str) {
    let (got, body) = answer;
    assert_eq!(
        (*got, body["error"]["code"].as_str()),
        (status, Some(code)),
        "{body}"
    );
}

/// Asserts that a raw HTTP/1.1 answer has `status` and the error `code` in
/// its JSON body.
pub fn assert_raw_error(answer: &str, status: u16, code: &str) {
    assert!(
        answer.starts_with(&format!("HTTP/1.1 {status} ")),
        "{answer}"
    );
    assert!(answer.contains(&format!("\"code\":\"{code}\"")), "{answer}");
}
