//! Built-in TLS against real components: certificates made here with
//! rcgen, openssl's s_client for old protocol versions, and pebble (an
//! ACME test CA) for automatic certificates and their renewal.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use avgate::config::{AcmeChallenge, Humantime};
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

const HSTS: &str = "max-age=31536000";

/// A private CA that issues server certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, as PEM, and the certificate as DER.
struct Issued {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    fn issue(&self, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Replaces a file the way deployment tools do: write aside, rename over.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// An HTTPS client that trusts only `root_pem` and, with `resolve`, sends
/// that name to the given address. Every request makes a new connection
/// with a full handshake (no session resumption), so that each one sees
/// the certificate served at that moment.
fn https_client(root_pem: &str, resolve: Option<(&str, SocketAddr)>) -> reqwest::ClientBuilder {
    https_client_alpn(root_pem, resolve, &[b"h2", b"http/1.1"])
}

fn https_client_alpn(
    root_pem: &str,
    resolve: Option<(&str, SocketAddr)>,
    alpn: &[&[u8]],
) -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(client_tls(root_pem, alpn))
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30));
    if let Some((name, addr)) = resolve {
        builder = builder.resolve(name, addr);
    }
    builder
}

/// A TLS client configuration that trusts only `root_pem`, offers `alpn`
/// and never resumes a session.
fn client_tls(root_pem: &str, alpn: &[&[u8]]) -> rustls::ClientConfig {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.resumption = rustls::client::Resumption::disabled();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tls
}

/// The certificate the server presented, as DER.
fn peer_cert(response: &reqwest::Response) -> Vec<u8> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("a TLS response carries the peer certificate")
        .to_vec()
}

/// GETs `url` until it answers 200; returns that response.
async fn wait_for_200(client: &reqwest::Client, url: &str, limit: Duration) -> reqwest::Response {
    let deadline = Instant::now() + limit;
    loop {
        let last = match client.get(url).send().await {
            Ok(r) if r.status() == 200 => return r,
            Ok(r) => format!("HTTP {}", r.status()),
            Err(e) => format!("{e:?}"),
        };
        assert!(
            Instant::now() < deadline,
            "{url} did not answer 200 within {limit:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `openssl s_client` against the port, offering only one protocol
/// version. Returns whether the handshake succeeded, and its output.
async fn openssl_handshake(port: u16, version_flag: &'static str) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "localhost", version_flag])
            // Debian's openssl refuses to offer TLS < 1.2 at its default
            // security level: lower it so the old versions are really sent.
            .args(["-cipher", "DEFAULT@SECLEVEL=0"])
            .stdin(Stdio::null())
            .output()
            .expect("openssl must be installed (scripts/setup.sh test)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_certificate_files_http2_hsts_old_versions_refused_and_reload() {
    let clamd = Clamd::start("");
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("avgate test CA");
    let first = ca.issue(&["localhost", "127.0.0.1"]);
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, &first.cert_pem).unwrap();
    std::fs::write(&key_file, &first.key_pem).unwrap();

    let mut config = config(&[clamd.address()]);
    config.auth.required = false; // tokens have tests of their own
    config.tls.cert = Some(cert_file.clone());
    config.tls.key = Some(key_file.clone());
    config.tls.reload_interval = Humantime(Duration::from_millis(200));
    config.tls.handshake_timeout = Humantime(Duration::from_secs(1));
    config.header_timeout = Humantime(Duration::from_secs(2));
    config.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let gw = Gateway::start_unready(config).await;
    let port = gw.addr.port();
    let base = format!("https://localhost:{port}");
    let client = https_client(&ca.pem(), None).build().unwrap();
    wait_for_200(&client, &format!("{base}/readyz"), Duration::from_secs(30)).await;

    // A real scan over HTTPS: HTTP/2 by ALPN, verified against our CA, HSTS.
    let part = reqwest::multipart::Part::bytes(EICAR.to_vec()).file_name("eicar.com");
    let r = client
        .post(format!("{base}/v1/scan"))
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN chose h2");
    assert_eq!(r.headers()["strict-transport-security"], HSTS);
    assert_eq!(peer_cert(&r), first.der);
    let (status, body) = json(r).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("FOUND")),
        "{body}"
    );

    // HTTP/1.1 is offered too, with HSTS as well.
    let h1 = https_client_alpn(&ca.pem(), None, &[b"http/1.1"])
        .http1_only()
        .build()
        .unwrap();
    let r = h1.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.headers()["strict-transport-security"], HSTS);

    // Plain HTTP on the TLS port gets nowhere.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = plain
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(r.is_err(), "plain HTTP was answered on the TLS port: {r:?}");

    // The HTTP listener redirects to HTTPS (308 keeps the method), without HSTS.
    let http_port = gw.http_addr.expect("http_listen is bound").port();
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!(
            "http://127.0.0.1:{http_port}/v1/scan/raw?filename=a.txt"
        ))
        .header("host", "localhost")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        format!("https://localhost:{port}/v1/scan/raw?filename=a.txt").as_str()
    );
    assert!(r.headers().get("strict-transport-security").is_none());
    // Like every answer of avgate's, with an id to find it in the log by.
    assert_eq!(r.headers()["x-request-id"].len(), 32, "{:?}", r.headers());

    // TLS 1.2 and 1.3 are accepted; 1.0 and 1.1 are refused by the server
    // with an alert in answer to the ClientHello, not merely left
    // unoffered by openssl ("no protocols available").
    for (flag, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (ok, out) = openssl_handshake(port, flag).await;
        assert!(
            ok && out.contains(&format!("New, {name}, Cipher is")),
            "{flag}: {out}"
        );
    }
    for flag in ["-tls1_1", "-tls1"] {
        let (ok, out) = openssl_handshake(port, flag).await;
        assert!(!ok, "{flag} was accepted: {out}");
        assert!(out.contains("SSL alert number"), "{flag}: {out}");
        assert!(!out.contains("no protocols available"), "{flag}: {out}");
    }

    // A client that never says hello is dropped at the handshake deadline,
    // and holds up no one meanwhile.
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    let r = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .expect("the silent connection was not closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );

    // The server's ALPN choice, seen by a raw TLS client: h2 first. A client
    // that then sends no request is closed at the header deadline.
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls(
        &ca.pem(),
        &[b"h2", b"http/1.1"],
    )));
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let started = Instant::now();
    let read = tokio::time::timeout(
        Duration::from_secs(6),
        tokio::io::AsyncReadExt::read(&mut tls, &mut buf),
    )
    .await
    .expect("a TLS client that sent nothing was not closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // A broken new certificate file: the old certificate stays in service.
    replace(&cert_file, "-----BEGIN CERTIFICATE-----\nnot base64\n");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(
        peer_cert(&r),
        first.der,
        "a bad file replaced the certificate"
    );

    // A new pair is served without a restart.
    let second = ca.issue(&["localhost"]);
    replace(&key_file, &second.key_pem);
    replace(&cert_file, &second.cert_pem);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client.get(format!("{base}/healthz")).send().await.unwrap();
        if peer_cert(&r) == second.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.stop().await;
}

/// pebble, an ACME test CA, on free loopback ports. Killed on drop.
struct Pebble {
    child: Child,
    dir: tempfile::TempDir,
    /// The ACME directory URL.
    directory: String,
    /// Trusts pebble's own HTTPS (a CA made here).
    https_ca: PathBuf,
    client: reqwest::Client,
    management: u16,
}

struct PebbleOptions {
    /// Lifetime of the certificates pebble issues, in seconds.
    validity_secs: u64,
    /// Skip validation (PEBBLE_VA_ALWAYS_VALID).
    always_valid: bool,
    /// Where pebble's validation connects to for HTTP-01 and TLS-ALPN-01.
    http_port: u16,
    tls_port: u16,
    /// A DNS server for pebble's validation lookups.
    dns: Option<SocketAddr>,
}

impl Pebble {
    async fn start(options: PebbleOptions) -> Pebble {
        let dir = tempfile::Builder::new()
            .prefix("avg-pebble")
            .tempdir()
            .unwrap();
        let ca = Ca::new("pebble HTTPS test CA");
        let cert = ca.issue(&["localhost", "127.0.0.1"]);
        let https_ca = dir.path().join("https-ca.pem");
        std::fs::write(&https_ca, ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), &cert.cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &cert.key_pem).unwrap();
        let (acme, management) = (free_port(), free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": options.http_port,
                "tlsPort": options.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": options.validity_secs,
            }
        });
        let config_file = dir.path().join("pebble.json");
        std::fs::write(&config_file, config.to_string()).unwrap();
        let mut command = Command::new("pebble");
        command.arg("-config").arg(&config_file);
        if let Some(dns) = options.dns {
            command.arg("-dnsserver").arg(dns.to_string());
        }
        if options.always_valid {
            command.env("PEBBLE_VA_ALWAYS_VALID", "1");
        }
        let log = std::fs::File::create(dir.path().join("pebble.log")).unwrap();
        let child = command
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("pebble must be installed (scripts/setup.sh test)");
        let client = https_client(&ca.pem(), None).build().unwrap();
        let pebble = Pebble {
            child,
            directory: format!("https://127.0.0.1:{acme}/dir"),
            https_ca,
            client,
            management,
            dir,
        };
        wait_for_200(&pebble.client, &pebble.directory, Duration::from_secs(20)).await;
        pebble
    }

    /// The root that issues avgate's certificates; new in every run.
    async fn issuing_root(&self) -> String {
        let url = format!("https://127.0.0.1:{}/roots/0", self.management);
        wait_for_200(&self.client, &url, Duration::from_secs(10))
            .await
            .text()
            .await
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// avgate's configuration for certificates from `pebble`.
fn acme_config(
    pebble: &Pebble,
    clamd: &Clamd,
    data_dir: &Path,
    domain: &str,
) -> avgate::config::Config {
    let mut config = config(&[clamd.address()]);
    config.auth.required = false; // tokens have tests of their own
    config.data_dir = data_dir.to_owned();
    config.tls.acme.domains = vec![domain.to_owned()];
    config.tls.acme.email = Some("ops@example.com".into());
    config.tls.acme.directory = pebble.directory.clone();
    config.tls.acme.ca_root = Some(pebble.https_ca.clone());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_issues_from_pebble_caches_owner_only_and_renews_without_restart() {
    const DOMAIN: &str = "avgate.test";
    const VALIDITY: u64 = 30;
    let clamd = Clamd::start("");
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: VALIDITY,
        always_valid: true,
        http_port: free_port(),
        tls_port: free_port(),
        dns: None,
    })
    .await;
    let data = tempfile::tempdir().unwrap();
    let gw = Gateway::start_unready(acme_config(&pebble, &clamd, data.path(), DOMAIN)).await;
    let addr: SocketAddr = ([127, 0, 0, 1], gw.addr.port()).into();
    let root = pebble.issuing_root().await;
    let client = https_client(&root, Some((DOMAIN, addr))).build().unwrap();
    let base = format!("https://{DOMAIN}:{}", addr.port());

    // Issued, and verified against pebble's root by a real HTTPS client.
    let r = wait_for_200(&client, &format!("{base}/readyz"), Duration::from_secs(60)).await;
    let first = peer_cert(&r);
    assert_eq!(r.headers()["strict-transport-security"], HSTS);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let (status, body) = post_file(
        &client,
        &format!("{base}/v1/scan"),
        "eicar.com",
        EICAR.to_vec(),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("FOUND")),
        "{body}"
    );

    // The account and the certificate are cached, for the owner only.
    let cache = data.path().join("acme");
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&cache), 0o700);
    let deadline = Instant::now() + Duration::from_secs(10);
    let files = loop {
        let files: Vec<PathBuf> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let named = |p: &str| {
            files
                .iter()
                .any(|f| f.file_name().unwrap().to_string_lossy().starts_with(p))
        };
        if named("account-") && named("cert-") {
            break files;
        }
        assert!(Instant::now() < deadline, "cache incomplete: {files:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }

    // The certificate lives VALIDITY seconds; avgate renews it after two
    // thirds of that, without a restart.
    let deadline = Instant::now() + Duration::from_secs(VALIDITY * 3);
    let renewed = loop {
        match client.get(format!("{base}/healthz")).send().await {
            Ok(r) if r.status() == 200 && peer_cert(&r) != first => break peer_cert(&r),
            Ok(_) => {}
            Err(e) => panic!("HTTPS failed while waiting for the renewal: {e:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "no renewal within {:?}; pebble log:\n{}",
            Duration::from_secs(VALIDITY * 3),
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_ne!(renewed, first);
    gw.stop().await;
}

/// A configuration from TOML text, or its error message.
fn load(toml: &str) -> Result<avgate::config::Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("avgate.toml");
    std::fs::write(&file, toml).unwrap();
    avgate::config::Config::load(Some(&file), vec![], &Default::default())
        .map_err(|e| e.to_string())
}

#[test]
fn tls_settings_are_checked_at_start_up() {
    let c = load("http_listen = \"127.0.0.1:0\"\n[tls.acme]\ndomains = [\"a.example\"]\nchallenge = \"http-01\"\ndirectory = \"staging\"\n").unwrap();
    assert_eq!(c.tls.acme.challenge, AcmeChallenge::Http01);
    assert!(c.tls.enabled());
    for (toml, expected) in [
        ("[tls]\ncert = \"/c.pem\"\n", "set together"),
        (
            "[tls]\ncert = \"/c\"\nkey = \"/k\"\n[tls.acme]\ndomains = [\"a.example\"]\n",
            "not both",
        ),
        (
            "[tls.acme]\ndomains = [\"a.example\"]\nchallenge = \"http-01\"\n",
            "needs http_listen",
        ),
        ("http_listen = \"127.0.0.1:0\"\n", "needs TLS"),
        (
            "[tls.acme]\ndomains = [\"*.example.com\"]\n",
            "not a DNS name",
        ),
        ("[tls.acme]\ndomains = [\"localhost\"]\n", "not a DNS name"),
        (
            "[tls.acme]\ndomains = [\"a.example\"]\ndirectory = \"stagin\"\n",
            "https:// URL",
        ),
        (
            "[tls.acme]\nemail = \"ops@example.com\"\n",
            "need tls.acme.domains",
        ),
        (
            "[tls.acme]\ndomains = [\"a.example\"]\nchallenge = \"dns-01\"\n",
            "dns-01",
        ),
    ] {
        let err = load(toml).expect_err(toml);
        assert!(err.contains(expected), "{toml}: {err}");
    }
}

#[test]
fn tls_flags() {
    use avgate::cli::{Cli, Command};
    use clap::Parser;
    let args = |extra: &[&str]| {
        let argv = ["avgate", "check-config"].iter().chain(extra);
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::CheckConfig(args)) | Ok(Command::Serve(args)) => Ok(args),
            Ok(_) => unreachable!(),
            Err(e) => Err(e.to_string()),
        }
    };
    let c = args(&[
        "--acme-domain",
        "a.example",
        "--acme-domain",
        "b.example",
        "--acme-email",
        "ops@example.com",
        "--acme-staging",
        "--listen",
        "127.0.0.1:8443",
        "--http-listen",
        "127.0.0.1:8080",
    ])
    .unwrap()
    .load()
    .unwrap();
    assert_eq!(c.tls.acme.domains, ["a.example", "b.example"]);
    assert_eq!(c.tls.acme.directory, "staging");
    assert_eq!(c.tls.acme.email.as_deref(), Some("ops@example.com"));
    assert_eq!(c.http_listen, Some("127.0.0.1:8080".parse().unwrap()));
    let c = args(&["--tls-cert", "/c.pem", "--tls-key", "/k.pem"])
        .unwrap()
        .load()
        .unwrap();
    assert_eq!(c.tls.key.as_deref(), Some(Path::new("/k.pem")));
    // The key may come from another layer (file, environment), so the
    // pair is checked on the merged configuration, not by the flags.
    let alone = args(&["--tls-cert", "/c.pem"]).unwrap().load().unwrap_err();
    assert!(
        alone
            .to_string()
            .contains("tls.cert and tls.key must be set together"),
        "{alone}"
    );
    let both = args(&[
        "--acme-domain",
        "a.example",
        "--acme-staging",
        "--acme-directory",
        "https://x/dir",
    ]);
    assert!(
        both.is_err(),
        "--acme-staging and --acme-directory conflict"
    );
}

/// A DNS server for pebble's validation lookups: every name is 127.0.0.1
/// (A), with no IPv6 address and no CAA record. Ends with the runtime.
async fn start_dns() -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            if let Some(reply) = dns_reply(&buf[..n]) {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    });
    addr
}

fn dns_reply(query: &[u8]) -> Option<Vec<u8>> {
    // Header (12 bytes), then the question: labels, type, class.
    let mut i = 12;
    loop {
        let len = *query.get(i)? as usize;
        i += 1 + len;
        if len == 0 {
            break;
        }
    }
    let question = query.get(12..i + 4)?;
    let is_a = query.get(i..i + 2)? == [0, 1];
    let mut reply = query[..2].to_vec(); // id
    reply.extend_from_slice(&[0x84 | (query[2] & 0x01), 0]); // answer, authoritative, RD
    reply.extend_from_slice(&[0, 1, 0, is_a as u8, 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if is_a {
        // name: pointer to the question's; A IN, TTL 60, 127.0.0.1
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
    }
    Some(reply)
}

/// pebble really validates here (no PEBBLE_VA_ALWAYS_VALID): it looks the
/// name up in our DNS and connects to avgate's TLS listener (TLS-ALPN-01)
/// or HTTP listener (HTTP-01), so a certificate proves avgate answered.
async fn acme_validated_for_real(challenge: AcmeChallenge) {
    const DOMAIN: &str = "scan.avgate.test";
    let clamd = Clamd::start("");
    let dns = start_dns().await;
    let (tls_port, http_port) = (free_port(), free_port());
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: 3600,
        always_valid: false,
        http_port,
        tls_port,
        dns: Some(dns),
    })
    .await;
    let data = tempfile::tempdir().unwrap();
    let mut config = acme_config(&pebble, &clamd, data.path(), DOMAIN);
    config.listen = ([127, 0, 0, 1], tls_port).into();
    config.http_listen = Some(([127, 0, 0, 1], http_port).into());
    config.tls.acme.challenge = challenge;
    let gw = Gateway::start_unready(config).await;
    let root = pebble.issuing_root().await;
    let client = https_client(&root, Some((DOMAIN, gw.addr)))
        .build()
        .unwrap();
    let url = format!("https://{DOMAIN}:{tls_port}/healthz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(&url).send().await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate through {challenge:?}; pebble log:\n{}",
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = pebble.log();
    assert!(log.contains("set VALID by completed challenge"), "{log}");
    if challenge == AcmeChallenge::Http01 {
        let probe =
            format!("validate w/ HTTP: http://{DOMAIN}:{http_port}/.well-known/acme-challenge/");
        assert!(log.contains(&probe), "{log}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_tls_alpn_01_is_answered_on_the_tls_listener() {
    acme_validated_for_real(AcmeChallenge::TlsAlpn01).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_http_01_is_answered_on_the_http_listener() {
    acme_validated_for_real(AcmeChallenge::Http01).await;
}
