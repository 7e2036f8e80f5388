//! Built-in TLS: certificate files that are reloaded when they change, or
//! certificates from an ACME CA (Let's Encrypt) that renew themselves.
//!
//! - [`files`]: PEM files polled for changes; a bad new file keeps the old
//!   certificate.
//! - [`acme`]: rustls-acme drives ordering and renewal; its account and
//!   certificates are cached in the data directory.
//! - [`TlsAcceptor`]: the handshake, done in each connection's own task
//!   (never in the accept loop) and bounded by a deadline. TLS-ALPN-01
//!   validation connections are answered here and never reach HTTP.
//!
//! Only TLS 1.2 and 1.3 with rustls' default (modern, forward-secret)
//! cipher suites, ALPN `h2` and `http/1.1`.

pub mod acme;
pub mod files;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::ResolvesServerCert;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The value of the `Strict-Transport-Security` header on TLS responses.
pub const HSTS: &str = "max-age=31536000";

/// ring: aws-lc-rs would need cmake and a long C build. Passed explicitly
/// everywhere, so no process-wide default provider is needed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration for avgate's listener: TLS 1.2 and 1.3 only,
/// ALPN h2 then http/1.1, certificates from `resolver`.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> ServerConfig {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// Accepts TLS connections for the HTTP server.
pub struct TlsAcceptor {
    config: Arc<ServerConfig>,
    /// For ACME TLS-ALPN-01 validation connections (ALPN `acme-tls/1`).
    challenge: Option<Arc<ServerConfig>>,
    handshake_timeout: Duration,
}

impl TlsAcceptor {
    /// Completes the handshake within the deadline. `Ok(None)`: it was an
    /// ACME validation connection, answered and closed.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Option<TlsStream<TcpStream>>> {
        match tokio::time::timeout(self.handshake_timeout, self.handshake(tcp)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }

    async fn handshake(&self, tcp: TcpStream) -> io::Result<Option<TlsStream<TcpStream>>> {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        if let Some(challenge) = &self.challenge {
            if rustls_acme::is_tls_alpn_challenge(&start.client_hello()) {
                tracing::info!("answering an ACME TLS-ALPN-01 validation");
                let mut tls = start.into_stream(challenge.clone()).await?;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                return Ok(None);
            }
        }
        Ok(Some(start.into_stream(self.config.clone()).await?))
    }
}

/// TLS for a running service: the acceptor for the public listener and,
/// with ACME HTTP-01, what the plain HTTP listener must answer.
pub struct Tls {
    pub acceptor: Arc<TlsAcceptor>,
    /// Set when ACME uses HTTP-01: answers `/.well-known/acme-challenge/`.
    pub http01: Option<Arc<rustls_acme::ResolvesServerCertAcme>>,
}

/// Sets TLS up from the configuration (`None`: plain HTTP) and spawns its
/// background task (file reloading or ACME ordering and renewal), which
/// ends when `stop` is cancelled.
pub fn start(
    config: &Config,
    stop: CancellationToken,
) -> anyhow::Result<Option<(Tls, tokio::task::JoinHandle<()>)>> {
    let tls = &config.tls;
    let handshake_timeout = tls.handshake_timeout.0;
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        let files = files::CertFiles {
            cert: cert.clone(),
            key: key.clone(),
        };
        let resolver = Arc::new(files::ReloadingCert::load(files)?);
        let acceptor = TlsAcceptor {
            config: Arc::new(server_config(resolver.clone())),
            challenge: None,
            handshake_timeout,
        };
        let task = tokio::spawn(resolver.watch(tls.reload_interval.0, stop));
        let tls = Tls {
            acceptor: Arc::new(acceptor),
            http01: None,
        };
        return Ok(Some((tls, task)));
    }
    if !tls.acme.domains.is_empty() {
        let acme = acme::Acme::prepare(&tls.acme, &config.data_dir)?;
        let resolver = acme.resolver();
        let acceptor = TlsAcceptor {
            config: Arc::new(server_config(resolver.clone())),
            challenge: Some(acme.challenge_config()),
            handshake_timeout,
        };
        let http01 = acme.uses_http01().then(|| resolver.clone());
        let task = tokio::spawn(acme.run(stop));
        let tls = Tls {
            acceptor: Arc::new(acceptor),
            http01,
        };
        return Ok(Some((tls, task)));
    }
    Ok(None)
}
