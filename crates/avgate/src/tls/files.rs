//! A certificate and key from PEM files, reloaded when either changes.
//!
//! The files are polled (inode, size, modification time) rather than
//! watched with inotify: it works the same for files edited in place,
//! replaced by rename, or behind a symlink that is switched (certbot's
//! `live/` directory). A new pair is used only once it loads and the key
//! matches the certificate; until then the old one stays in service, so a
//! half-written renewal (certificate replaced, key not yet) costs nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl CertFiles {
    /// Reads and checks the pair.
    pub fn load(&self) -> anyhow::Result<CertifiedKey> {
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("cannot read certificates from {}", self.cert.display()))?;
        anyhow::ensure!(
            !chain.is_empty(),
            "{} holds no PEM certificate",
            self.cert.display()
        );
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("cannot read a private key from {}", self.key.display()))?;
        CertifiedKey::from_der(chain, key, &super::provider()).with_context(|| {
            format!(
                "{} and {} do not make a usable certificate and key",
                self.cert.display(),
                self.key.display()
            )
        })
    }

    /// What tells us that a file changed.
    fn stamp(&self) -> Option<[FileStamp; 2]> {
        Some([FileStamp::of(&self.cert)?, FileStamp::of(&self.key)?])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        // metadata() follows symlinks: a switched link counts as a change.
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }
}

/// Serves the current certificate for every handshake.
#[derive(Debug)]
pub struct ReloadingCert {
    files: CertFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    /// Loads the files once; an error here stops start-up.
    pub fn load(files: CertFiles) -> anyhow::Result<ReloadingCert> {
        let key = files.load()?;
        tracing::info!(cert = %files.cert.display(), "TLS certificate loaded");
        Ok(ReloadingCert {
            files,
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// The certificate served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Polls the files every `interval` until `stop`; loads a changed pair.
    pub async fn watch(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut seen = self.files.stamp();
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let now = self.files.stamp();
            if now == seen {
                continue;
            }
            // Each change is tried once: a bad file is reported once, not
            // at every poll, and retried when it changes again.
            seen = now;
            let files = self.files.clone();
            match tokio::task::spawn_blocking(move || files.load()).await {
                Ok(Ok(key)) => {
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Ok(Err(e)) => tracing::error!(
                    error = format!("{e:#}"),
                    "the changed TLS certificate files are unusable; still serving the previous certificate"
                ),
                Err(e) => tracing::error!(error = %e, "TLS certificate reload failed"),
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> CertFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![format!("{name}.test")])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = CertFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a");
        let b = pair(dir.path(), "b");
        assert!(a.load().is_ok());
        let mixed = CertFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let err = format!("{:#}", mixed.load().unwrap_err());
        assert!(err.contains("do not make a usable"), "{err}");
    }

    #[test]
    fn empty_or_missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a");
        std::fs::write(&a.cert, "not a certificate\n").unwrap();
        let err = format!("{:#}", a.load().unwrap_err());
        assert!(err.contains("holds no PEM certificate"), "{err}");
        std::fs::remove_file(&a.key).unwrap();
        assert!(a.load().is_err());
    }
}
