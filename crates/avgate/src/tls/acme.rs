//! Certificates from an ACME CA (Let's Encrypt by default).
//!
//! rustls-acme does the protocol: it loads the cached certificate (or
//! orders one), answers the CA's validation through the resolver it gives
//! us, and renews once two thirds of the certificate's lifetime have passed
//! (day 60 of Let's Encrypt's 90), retrying with back-off. We drive its
//! state machine in one task and log what it does.
//!
//! The ACME account key and the certificates (with their private keys) are
//! cached in `<data_dir>/acme`, a directory only the owner may enter, in
//! files only the owner may read.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use futures_util::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_acme::{AccountCache, AcmeState, CertCache, ResolvesServerCertAcme, UseChallenge};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::{AcmeChallenge, AcmeConfig};

pub const LETS_ENCRYPT: &str = rustls_acme::acme::LETS_ENCRYPT_PRODUCTION_DIRECTORY;
pub const LETS_ENCRYPT_STAGING: &str = rustls_acme::acme::LETS_ENCRYPT_STAGING_DIRECTORY;

/// The directory URL for the `directory` setting: `production` (the
/// default), `staging`, or a URL.
pub fn directory_url(setting: &str) -> &str {
    match setting {
        "" | "production" | "letsencrypt" => LETS_ENCRYPT,
        "staging" | "letsencrypt-staging" => LETS_ENCRYPT_STAGING,
        url => url,
    }
}

/// An ACME client, prepared but not yet running.
pub struct Acme {
    state: AcmeState<std::io::Error>,
    domains: Vec<String>,
    directory: String,
    http01: bool,
}

impl Acme {
    pub fn prepare(config: &AcmeConfig, data_dir: &Path) -> anyhow::Result<Acme> {
        let directory = directory_url(&config.directory).to_owned();
        let client = Arc::new(directory_client(config.ca_root.as_deref())?);
        let cache = DirCache::create(data_dir.join("acme"))?;
        let challenge = match config.challenge {
            AcmeChallenge::TlsAlpn01 => UseChallenge::TlsAlpn01,
            AcmeChallenge::Http01 => UseChallenge::Http01,
        };
        let state = rustls_acme::AcmeConfig::new_with_client_config(&config.domains, client)
            .contact(config.email.iter().map(|e| format!("mailto:{e}")))
            .directory(&directory)
            .challenge_type(challenge)
            .cache(cache)
            .state();
        Ok(Acme {
            state,
            domains: config.domains.clone(),
            directory,
            http01: config.challenge == AcmeChallenge::Http01,
        })
    }

    /// Serves the current certificate (none until the first is obtained:
    /// handshakes fail until then).
    pub fn resolver(&self) -> Arc<ResolvesServerCertAcme> {
        self.state.resolver()
    }

    /// The server configuration for TLS-ALPN-01 validation connections.
    pub fn challenge_config(&self) -> Arc<ServerConfig> {
        self.state
            .challenge_rustls_config_with_provider(super::provider())
    }

    pub fn uses_http01(&self) -> bool {
        self.http01
    }

    /// Loads, orders and renews certificates until `stop` is cancelled.
    pub async fn run(mut self, stop: CancellationToken) {
        tracing::info!(
            domains = ?self.domains,
            directory = %self.directory,
            challenge = if self.http01 { "http-01" } else { "tls-alpn-01" },
            "ACME: loading or ordering a certificate"
        );
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                event = self.state.next() => event,
            };
            use rustls_acme::EventOk;
            match event {
                None => return,
                Some(Ok(EventOk::DeployedCachedCert)) => {
                    tracing::info!(domains = ?self.domains, "ACME: serving the cached certificate")
                }
                Some(Ok(EventOk::DeployedNewCert)) => {
                    tracing::info!(domains = ?self.domains, "ACME: obtained a new certificate")
                }
                Some(Ok(event)) => tracing::debug!(?event, "ACME"),
                Some(Err(e)) => {
                    // rustls-acme retries by itself, with back-off.
                    tracing::error!(error = %e, domains = ?self.domains, "ACME: will retry")
                }
            }
        }
    }
}

/// The TLS client for the ACME directory: the web PKI roots, plus
/// `ca_root` for a private CA (an internal ACME server, or pebble).
pub(crate) fn directory_client(ca_root: Option<&Path>) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_root {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|c| c.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("cannot read tls.acme.ca_root {}", path.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "tls.acme.ca_root {} holds no PEM certificate",
            path.display()
        );
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("tls.acme.ca_root {}", path.display()))?;
        }
    }
    Ok(ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// rustls-acme's cache in a directory, with owner-only permissions (its
/// own `DirCache` writes with the umask's).
struct DirCache {
    dir: PathBuf,
}

impl DirCache {
    fn create(dir: PathBuf) -> anyhow::Result<DirCache> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {}", dir.display()))?;
        Ok(DirCache { dir })
    }

    /// One file per (names, directory): switching domains or CA never
    /// serves a certificate cached for other ones.
    fn path(&self, kind: &str, names: &[String], directory: &str) -> PathBuf {
        let mut hash = Sha256::new();
        for name in names {
            hash.update(name.as_bytes());
            hash.update([0]);
        }
        hash.update(directory.as_bytes());
        let digest = hex::encode(&hash.finalize()[..12]);
        self.dir.join(format!("{kind}-{digest}.pem"))
    }

    async fn read(path: PathBuf) -> std::io::Result<Option<Vec<u8>>> {
        tokio::task::spawn_blocking(move || match std::fs::read(&path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Writes a temporary file with mode 0600 and renames it into place:
    /// a crash never leaves half a key behind.
    async fn write(path: PathBuf, data: Vec<u8>) -> std::io::Result<()> {
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            let tmp = path.with_extension("tmp");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&data)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

#[async_trait]
impl CertCache for DirCache {
    type EC = std::io::Error;

    async fn load_cert(
        &self,
        domains: &[String],
        directory: &str,
    ) -> Result<Option<Vec<u8>>, Self::EC> {
        Self::read(self.path("cert", domains, directory)).await
    }

    async fn store_cert(
        &self,
        domains: &[String],
        directory: &str,
        cert: &[u8],
    ) -> Result<(), Self::EC> {
        Self::write(self.path("cert", domains, directory), cert.to_vec()).await
    }
}

#[async_trait]
impl AccountCache for DirCache {
    type EA = std::io::Error;

    /// A key that does not parse (the disk, a hand edit) would make every
    /// order fail, forever, with an error that names no file: it is moved
    /// aside (`.corrupt`) and a new account is made instead.
    async fn load_account(
        &self,
        contact: &[String],
        directory: &str,
    ) -> Result<Option<Vec<u8>>, Self::EA> {
        let path = self.path("account", contact, directory);
        let Some(key) = Self::read(path.clone()).await? else {
            return Ok(None);
        };
        if account_key_parses(&key) {
            return Ok(Some(key));
        }
        let aside = path.with_extension("pem.corrupt");
        std::fs::rename(&path, &aside)?;
        tracing::warn!(
            file = %path.display(),
            moved_to = %aside.display(),
            "the cached ACME account key does not parse; registering a new account"
        );
        Ok(None)
    }

    async fn store_account(
        &self,
        contact: &[String],
        directory: &str,
        account: &[u8],
    ) -> Result<(), Self::EA> {
        Self::write(self.path("account", contact, directory), account.to_vec()).await
    }
}

/// An account key as rustls-acme stores it: PKCS#8 DER, ECDSA.
fn account_key_parses(key: &[u8]) -> bool {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec()));
    rustls::crypto::ring::sign::any_ecdsa_type(&der).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_corrupt_account_key_is_moved_aside_and_a_new_one_made() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DirCache::create(dir.path().join("acme")).unwrap();
        let contact = ["mailto:ops@example.com".to_owned()];
        // A key as rustls-acme makes it.
        let good = rustls_acme::acme::Account::generate_key_pair();
        cache
            .store_account(&contact, "https://ca/dir", &good)
            .await
            .unwrap();
        assert_eq!(
            cache
                .load_account(&contact, "https://ca/dir")
                .await
                .unwrap(),
            Some(good)
        );
        let path = cache.path("account", &contact, "https://ca/dir");
        std::fs::write(&path, b"not a key").unwrap();
        assert_eq!(
            cache
                .load_account(&contact, "https://ca/dir")
                .await
                .unwrap(),
            None
        );
        assert!(!path.exists());
        assert_eq!(
            std::fs::read(path.with_extension("pem.corrupt")).unwrap(),
            b"not a key"
        );
    }

    #[test]
    fn directory_names() {
        assert_eq!(directory_url("production"), LETS_ENCRYPT);
        assert_eq!(directory_url("staging"), LETS_ENCRYPT_STAGING);
        assert_eq!(
            directory_url("https://acme.internal/dir"),
            "https://acme.internal/dir"
        );
    }

    #[tokio::test]
    async fn the_cache_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let data = tempfile::tempdir().unwrap();
        let cache = DirCache::create(data.path().join("acme")).unwrap();
        let names = vec!["a.example".to_owned()];
        assert!(cache.load_cert(&names, "x").await.unwrap().is_none());
        cache.store_cert(&names, "x", b"pem").await.unwrap();
        cache.store_account(&[], "x", b"key").await.unwrap();
        assert_eq!(cache.load_cert(&names, "x").await.unwrap().unwrap(), b"pem");
        assert!(
            cache.load_cert(&names, "y").await.unwrap().is_none(),
            "per directory"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data.path().join("acme")), 0o700);
        for entry in std::fs::read_dir(data.path().join("acme")).unwrap() {
            assert_eq!(mode(&entry.unwrap().path()), 0o600);
        }
    }
}
