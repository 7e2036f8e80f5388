//! Typed, strict, layered configuration.
//!
//! Layers, lowest first: built-in defaults, the TOML file (`--config`),
//! environment variables (`AVGATE_KEY`, `AVGATE_SECTION__KEY`), command-line
//! flags. Every layer is merged as TOML values and deserialized once with
//! `deny_unknown_fields`, so a typo in any layer is an error at start-up,
//! not a silently ignored setting.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::perimeter::ratelimit::Rate;

/// Environment variables that are not configuration keys.
const ENV_NOT_KEYS: &[&str] = &["AVGATE_CONFIG", "AVGATE_LOG"];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the public HTTP listener.
    pub listen: SocketAddr,
    /// Where avgate keeps its state (the managed clamd's config, socket and
    /// test database).
    pub data_dir: PathBuf,
    /// Largest file accepted, per file.
    pub max_size: ByteSize,
    /// Most files in one batch request.
    pub max_files_per_request: usize,
    /// Most multipart parts of any kind in one request.
    pub max_parts: usize,
    /// Largest multipart part that is not a file (form fields).
    pub max_field_size: ByteSize,
    /// Uploads scanned at once; past this, requests get 503 at once.
    pub max_concurrent_scans: usize,
    /// Open client connections; past this, new ones wait in the kernel.
    pub max_connections: usize,
    /// Open connections from one client address (an IPv6 /64), so that
    /// one client cannot take every connection; trusted proxies are not
    /// limited.
    pub max_connections_per_ip: usize,
    /// Threads that run avgate's own work (HTTP, TLS, hashing, talking to
    /// clamd). 0: half the CPUs, at least one (see `runtime_workers`).
    pub worker_threads: usize,
    /// Bytes of each upload kept so that a scan can be replayed on another
    /// backend if its clamd dies mid-stream. Larger uploads are answered
    /// 503 in that case instead.
    pub replay_buffer: ByteSize,
    /// Time to read a request's headers; also the longest a new connection
    /// may wait before its first request.
    pub header_timeout: Humantime,
    /// Longest a client connection stays open with no request in progress
    /// (HTTP/1 keep-alive and HTTP/2 alike).
    pub idle_timeout: Humantime,
    /// How long SIGTERM waits for in-flight scans.
    pub shutdown_timeout: Humantime,
    /// Longest a whole request (upload and scan) may take; then 408.
    pub request_timeout: Humantime,
    /// Slowest acceptable upload in bytes per second, judged over
    /// `min_upload_window` of time spent waiting for the client; 0 disables.
    pub min_upload_rate: ByteSize,
    pub min_upload_window: Humantime,
    pub network: NetworkConfig,
    pub rate_limit: RateLimitConfig,
    /// `auto` (JSON unless stdout is a terminal), `json` or `text`.
    pub log_format: LogFormat,
    /// How long an `info` log line may wait to be written with others
    /// (warnings and errors never wait); 0 writes each line at once.
    pub log_flush_interval: Humantime,
    pub clamd: ClamdConfig,
    pub managed: ManagedConfig,
    pub auth: AuthConfig,
    /// A plain-HTTP listener beside a TLS `listen` (e.g. `0.0.0.0:80`):
    /// answers ACME HTTP-01 and redirects everything else to HTTPS.
    pub http_listen: Option<SocketAddr>,
    /// With a certificate or ACME domains, `listen` speaks HTTPS only.
    pub tls: TlsConfig,
    /// Prometheus metrics, on their own listener.
    pub metrics: MetricsConfig,
    /// Oldest acceptable signature database, per backend: past it /readyz
    /// answers 503 and a warning is logged. 0 disables the check.
    pub max_database_age: Humantime,
    /// Log filter (`info`, `avgate=debug,clamd=warn`); `AVGATE_LOG`, when
    /// set, wins. Applied again on SIGHUP.
    pub log_level: Option<String>,
    /// Signature updates (managed mode) and reloads.
    pub updates: UpdatesConfig,
    /// The false-positive policy (ignore, allow, block lists).
    pub policy: PolicyConfig,
}

/// How the policy (`avgate policy ...`, `/v1/admin/policy`) is applied.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// How often the store's policy version is checked, so that changes
    /// made with the CLI (or by another host) apply without a restart.
    pub refresh_interval: Humantime,
    /// An ignored signature that clamd reports anyway (an external clamd
    /// never loads avgate's ignore list) is answered OK instead of FOUND.
    /// clamd reports only the first match, so a second signature on such a
    /// file goes unseen: off by default.
    pub ignore_after_scan: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            refresh_interval: Humantime(Duration::from_secs(2)),
            ignore_after_scan: false,
        }
    }
}

/// Signature updates: freshclam run by avgate for its managed clamd, and
/// which backends a signature reload covers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdatesConfig {
    /// Run freshclam on a schedule (managed mode only). Unset: yes, unless
    /// a freshclam daemon (the clamav-freshclam service) is running on this
    /// host at start-up; avgate then follows /var/lib/clamav instead.
    pub enabled: Option<bool>,
    /// Between checks (±10 % random jitter). Below 1h only with
    /// `private_mirror`: the official mirrors answer 429 to clients that
    /// check too often.
    pub interval: Humantime,
    /// freshclam's DatabaseMirror (default database.clamav.net).
    #[serde(serialize_with = "serialize_url_redacted")]
    pub database_mirror: Option<String>,
    /// freshclam's PrivateMirror: a mirror of your own (URL), used instead
    /// of the official network.
    #[serde(serialize_with = "serialize_url_redacted")]
    pub private_mirror: Option<String>,
    /// The freshclam executable; found on PATH or in /usr/bin when unset.
    pub freshclam_path: Option<PathBuf>,
    /// Also RELOAD external backends (one at a time) on a signature reload.
    pub reload_external: bool,
}

impl Default for UpdatesConfig {
    fn default() -> Self {
        UpdatesConfig {
            enabled: None,
            interval: Humantime(Duration::from_secs(6 * 3600)),
            database_mirror: None,
            private_mirror: None,
            freshclam_path: None,
            reload_external: false,
        }
    }
}

/// Prometheus metrics (`GET /metrics`), never on the public listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// The metrics listener: plain HTTP, no authentication. Keep it on
    /// loopback or a network only the monitoring system reaches.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClamdConfig {
    /// External clamd daemons (`tcp://HOST:PORT`, `unix:/PATH`). Empty: avgate
    /// starts and supervises its own clamd.
    pub backends: Vec<String>,
    /// Scans at once per backend: keep below that clamd's MaxThreads (one
    /// thread for the health probe).
    pub max_concurrent_per_backend: usize,
    pub connect_timeout: Humantime,
    /// Longest pause while streaming to clamd.
    pub io_timeout: Humantime,
    /// Longest wait for clamd's verdict after the last byte.
    pub scan_timeout: Humantime,
    /// Longest wait for a free backend slot before answering 503.
    pub queue_timeout: Humantime,
    /// How often backends are probed (down ones four times as often).
    pub health_interval: Humantime,
    /// StreamMaxLength of the external backends, when known: larger files
    /// are reported unscannable without being sent.
    pub stream_max_length: Option<ByteSize>,
    /// Files up to this size (at most `replay_buffer`) are held until
    /// complete and sent in one go on a reused clamd session (IDSESSION):
    /// to a clamd on a Unix socket as the descriptor of an in-memory file
    /// (FILDES), so clamd skips the socket copy and its temporary file;
    /// to a TCP one as one INSTREAM write. 0: every file is streamed on a
    /// connection of its own.
    pub small_file_max_size: ByteSize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManagedConfig {
    /// The clamd executable; found on PATH or in /usr/sbin when unset.
    pub clamd_path: Option<PathBuf>,
    /// Where the signature files come from (default /var/lib/clamav):
    /// avgate links them into its own database directory, or uses its
    /// built-in test signatures while there is no official database.
    pub database_dir: Option<PathBuf>,
    /// Our concurrency limit for the managed clamd, whose MaxThreads is one
    /// more (a thread for the health probe).
    pub max_threads: usize,
    /// clamd's DisableCache: caching clean results by hash is a big win in
    /// production and a distortion in benchmarks.
    pub disable_cache: bool,
    /// Where clamd's TemporaryDirectory goes: a subdirectory of its own is
    /// made here. Unset: `<data_dir>/clamd/tmp`. clamd makes and removes a
    /// directory there for every scan, spools each stream into it and
    /// extracts archives into it, so a tmpfs (`/dev/shm`) saves it a
    /// filesystem's journal and discards, at the price of memory.
    pub temp_dir: Option<PathBuf>,
    /// Longest back-off between restarts of a crashing clamd.
    pub restart_backoff_max: Humantime,
}

/// API tokens (see `avgate token --help`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Every scan needs a token. Off: a request without a token is served
    /// anonymously (a token that is sent is still checked).
    pub required: bool,
    /// Allows `required = false` on a listen address that is not loopback.
    pub allow_unauthenticated_public: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            required: true,
            allow_unauthenticated_public: false,
        }
    }
}

/// Who may connect, and whose X-Forwarded-For is believed. CIDR ranges
/// or single addresses, IPv4 or IPv6.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Empty: every address (that is not denied).
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    /// Reverse proxies in front of avgate. Only from these peers is the
    /// right-most untrusted X-Forwarded-For address taken as the client.
    pub trusted_proxies: Vec<String>,
}

/// Token buckets. A token's own `--rate`/`--burst` replace the per-token
/// defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub enabled: bool,
    pub per_ip: Rate,
    pub per_ip_burst: u32,
    pub per_token: Rate,
    pub per_token_burst: u32,
    /// Failed authentications per client address (brute force).
    pub auth_failures: Rate,
    pub auth_failures_burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        let rate = |s: &str| s.parse::<Rate>().expect("valid default rate");
        RateLimitConfig {
            enabled: true,
            per_ip: rate("10/s"),
            per_ip_burst: 20,
            per_token: rate("10/s"),
            per_token_burst: 20,
            auth_failures: rate("10/m"),
            auth_failures_burst: 10,
        }
    }
}

/// Built-in TLS: certificate files (`cert` and `key`) or ACME.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first; reloaded when it changes.
    pub cert: Option<PathBuf>,
    /// PEM private key; reloaded when it changes.
    pub key: Option<PathBuf>,
    /// How often `cert` and `key` are checked for changes.
    pub reload_interval: Humantime,
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Humantime,
    pub acme: AcmeConfig,
}

/// Automatic certificates from an ACME CA (Let's Encrypt by default).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcmeConfig {
    /// Names on the certificate; not empty turns ACME on.
    pub domains: Vec<String>,
    /// Contact address for the CA's account (optional).
    pub email: Option<String>,
    /// `production` (Let's Encrypt, the default), `staging` (Let's
    /// Encrypt's staging CA) or the URL of an ACME directory.
    pub directory: String,
    /// `tls-alpn-01` on the TLS listener (port 443), or `http-01` on
    /// `http_listen` (port 80).
    pub challenge: AcmeChallenge,
    /// An extra PEM root trusted for the ACME directory's own HTTPS (a
    /// private ACME server).
    pub ca_root: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum AcmeChallenge {
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    #[serde(rename = "http-01")]
    Http01,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            domains: Vec::new(),
            email: None,
            directory: "production".into(),
            challenge: AcmeChallenge::default(),
            ca_root: None,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            reload_interval: Humantime(Duration::from_secs(5)),
            handshake_timeout: Humantime(Duration::from_secs(10)),
            acme: AcmeConfig::default(),
        }
    }
}

impl TlsConfig {
    /// Whether `listen` speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || !self.acme.domains.is_empty()
    }

    fn validate(&self, http_listen: Option<SocketAddr>) -> Result<(), String> {
        let acme = &self.acme;
        if self.cert.is_some() != self.key.is_some() {
            return Err("tls.cert and tls.key must be set together".into());
        }
        if self.cert.is_some() && !acme.domains.is_empty() {
            return Err("use either tls.cert/tls.key or tls.acme.domains, not both".into());
        }
        if acme.domains.is_empty()
            && (acme.email.is_some()
                || acme.ca_root.is_some()
                || !matches!(acme.directory.as_str(), "" | "production"))
        {
            return Err("tls.acme settings need tls.acme.domains (--acme-domain)".into());
        }
        for domain in &acme.domains {
            let valid = rustls::pki_types::DnsName::try_from(domain.as_str()).is_ok()
                && domain.contains('.')
                && !domain.starts_with('*');
            if !valid {
                return Err(format!(
                    "tls.acme.domains: {domain:?} is not a DNS name a certificate can be ordered for"
                ));
            }
        }
        let directory = &acme.directory;
        if !matches!(directory.as_str(), "" | "production" | "staging")
            && !directory.starts_with("https://")
        {
            return Err(format!(
                "tls.acme.directory: {directory:?} is not production, staging or an https:// URL"
            ));
        }
        if !self.enabled() && http_listen.is_some() {
            return Err(
                "http_listen redirects to HTTPS: it needs TLS (tls.cert or tls.acme)".into(),
            );
        }
        if acme.challenge == AcmeChallenge::Http01 && http_listen.is_none() {
            return Err(
                "tls.acme.challenge = \"http-01\" needs http_listen (e.g. 0.0.0.0:80)".into(),
            );
        }
        for (name, value) in [
            ("tls.reload_interval", self.reload_interval),
            ("tls.handshake_timeout", self.handshake_timeout),
        ] {
            if value.0.is_zero() {
                return Err(format!("{name} must be above 0"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: default_data_dir(),
            max_size: ByteSize(150 * 1024 * 1024),
            max_files_per_request: 16,
            max_parts: 32,
            max_field_size: ByteSize(64 * 1024),
            max_concurrent_scans: 128,
            max_connections: 1024,
            max_connections_per_ip: 128,
            worker_threads: 0,
            replay_buffer: ByteSize(1024 * 1024),
            header_timeout: Humantime(Duration::from_secs(10)),
            idle_timeout: Humantime(Duration::from_secs(60)),
            shutdown_timeout: Humantime(Duration::from_secs(30)),
            request_timeout: Humantime(Duration::from_secs(15 * 60)),
            min_upload_rate: ByteSize(16 * 1024),
            min_upload_window: Humantime(Duration::from_secs(30)),
            network: NetworkConfig::default(),
            rate_limit: RateLimitConfig::default(),
            log_format: LogFormat::Auto,
            log_flush_interval: Humantime(Duration::from_millis(100)),
            clamd: ClamdConfig::default(),
            managed: ManagedConfig::default(),
            auth: AuthConfig::default(),
            http_listen: None,
            tls: TlsConfig::default(),
            metrics: MetricsConfig::default(),
            max_database_age: Humantime(Duration::from_secs(3 * 86_400)),
            log_level: None,
            updates: UpdatesConfig::default(),
            policy: PolicyConfig::default(),
        }
    }
}

impl Default for ClamdConfig {
    fn default() -> Self {
        ClamdConfig {
            backends: Vec::new(),
            max_concurrent_per_backend: 8,
            connect_timeout: Humantime(Duration::from_secs(2)),
            io_timeout: Humantime(Duration::from_secs(30)),
            scan_timeout: Humantime(Duration::from_secs(130)),
            queue_timeout: Humantime(Duration::from_secs(10)),
            health_interval: Humantime(Duration::from_secs(5)),
            stream_max_length: None,
            small_file_max_size: ByteSize(1024 * 1024),
        }
    }
}

impl Default for ManagedConfig {
    fn default() -> Self {
        ManagedConfig {
            clamd_path: None,
            database_dir: None,
            max_threads: 8,
            disable_cache: false,
            temp_dir: None,
            restart_backoff_max: Humantime(Duration::from_secs(30)),
        }
    }
}

pub(crate) fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() => Path::new(&home).join(".local/share/avgate"),
        _ => PathBuf::from("/var/lib/avgate"),
    }
}

/// Values given on the command line (and through their own `AVGATE_*`
/// variables, which clap reads): the top layer.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub clamd: Vec<String>,
    pub max_size: Option<ByteSize>,
    pub data_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub http_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub acme_domains: Vec<String>,
    pub acme_email: Option<String>,
    /// `production`, `staging` or a URL.
    pub acme_directory: Option<String>,
    pub acme_ca_root: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl Config {
    /// The configuration as a TOML file that loads back to the same
    /// settings (`avgate check-config`); mirror credentials are masked.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot be shown as TOML: {e}\n"))
    }

    /// The async runtime's worker threads: `worker_threads`, or half the
    /// CPUs (at least one) when it is 0. avgate's own work per scan is a
    /// fraction of clamd's (a third of it for a small file, a tenth for a
    /// large one), and clamd usually runs on the same machine: threads
    /// beyond that only compete with clamd's for the CPUs. On 2 CPUs, one
    /// worker instead of two took 10-20 % less avgate CPU per small scan
    /// and served about 5 % more of them at 32 clients (docs/performance.md).
    pub fn runtime_workers(&self) -> usize {
        if self.worker_threads > 0 {
            return self.worker_threads;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cpus / 2).max(1)
    }

    /// Loads the configuration from all layers.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut table = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            warn_if_world_writable(path);
            // The file alone first: its mistakes are then reported with its
            // name and the line (the merged table has neither).
            toml::from_str::<Config>(&text).map_err(|e| ConfigError::Invalid {
                origin: path.display().to_string(),
                message: e.to_string(),
            })?;
            table = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Invalid {
                    origin: path.display().to_string(),
                    message: e.to_string(),
                })?;
        }
        // The variables alone too, for the same reason.
        let mut from_env = toml::Table::new();
        for (key, value) in env {
            let Some(name) = key.strip_prefix("AVGATE_") else {
                continue;
            };
            if key == "AVGATE_LOG" {
                // It wins over log_level, so a typo in it must not pass
                // silently (the filter would fall back to info).
                tracing_subscriber::EnvFilter::try_new(&value).map_err(|e| {
                    ConfigError::Invalid {
                        origin: format!("environment variable {key}"),
                        message: format!("{value:?} is not a log filter: {e}"),
                    }
                })?;
            }
            if ENV_NOT_KEYS.contains(&key.as_str()) || flag_env(&key) {
                continue;
            }
            if kubernetes_service_link(name) {
                // A Kubernetes Service named "avgate" injects these into
                // every pod; they are not ours.
                continue;
            }
            let path: Vec<String> = name.split("__").map(|p| p.to_ascii_lowercase()).collect();
            let invalid = |message| ConfigError::Invalid {
                origin: format!("environment variable {key}"),
                message,
            };
            // Each alone, so that a mistake names its variable.
            let mut alone = toml::Table::new();
            set_path(&mut alone, &path, env_value(&value)).map_err(invalid)?;
            Config::deserialize(toml::Value::Table(alone)).map_err(|e| invalid(e.to_string()))?;
            set_path(&mut from_env, &path, env_value(&value)).map_err(invalid)?;
            set_path(&mut table, &path, env_value(&value)).map_err(invalid)?;
        }
        if !from_env.is_empty() {
            Config::deserialize(toml::Value::Table(from_env)).map_err(|e| {
                ConfigError::Invalid {
                    origin: "environment (AVGATE_* variables)".into(),
                    message: e.to_string(),
                }
            })?;
        }
        overrides.apply(&mut table);
        let config: Config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Invalid {
                origin: "configuration".into(),
                message: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            origin: "configuration".into(),
            message,
        };
        for list in [
            &self.network.allow,
            &self.network.deny,
            &self.network.trusted_proxies,
        ] {
            crate::perimeter::network::parse_nets(list).map_err(invalid)?;
        }
        for backend in &self.clamd.backends {
            backend.parse::<clamd::Address>().map_err(invalid)?;
        }
        for (name, zero) in [
            ("max_size", self.max_size.0 == 0),
            ("header_timeout", self.header_timeout.0.is_zero()),
            ("idle_timeout", self.idle_timeout.0.is_zero()),
            ("request_timeout", self.request_timeout.0.is_zero()),
            ("max_files_per_request", self.max_files_per_request == 0),
            ("max_parts", self.max_parts == 0),
            ("max_concurrent_scans", self.max_concurrent_scans == 0),
            ("max_connections", self.max_connections == 0),
            ("max_connections_per_ip", self.max_connections_per_ip == 0),
            (
                "clamd.max_concurrent_per_backend",
                self.clamd.max_concurrent_per_backend == 0,
            ),
            ("managed.max_threads", self.managed.max_threads == 0),
            // A bucket that holds nothing refuses everything, forever.
            ("rate_limit.per_ip_burst", self.rate_limit.per_ip_burst == 0),
            (
                "rate_limit.per_token_burst",
                self.rate_limit.per_token_burst == 0,
            ),
            (
                "rate_limit.auth_failures_burst",
                self.rate_limit.auth_failures_burst == 0,
            ),
            (
                // 0 would restart a clamd that keeps dying in a tight loop.
                "managed.restart_backoff_max",
                self.managed.restart_backoff_max.0.is_zero(),
            ),
        ] {
            if zero {
                return Err(invalid(format!("{name} must be above 0")));
            }
        }
        // libclamav scans no file of 2 GiB or more (it lowers a larger
        // MaxFileSize to this and answers such files "exceeds max"): a
        // larger max_size would accept uploads only to call them all
        // unscannable.
        if self.max_size.0 > CLAMAV_MAX_FILE_SIZE {
            return Err(invalid(format!(
                "max_size ({}) is above what ClamAV can scan: at most {CLAMAV_MAX_FILE_SIZE} bytes, just under 2 GiB (for example \"2047MiB\")",
                self.max_size.describe()
            )));
        }
        if self.min_upload_rate.0 > 0 && self.min_upload_window.0 < Duration::from_millis(100) {
            return Err(invalid(format!(
                "min_upload_window ({}) must be at least 100ms: shorter pauses happen on any network",
                self.min_upload_window
            )));
        }
        if let Some(dir) = &self.managed.temp_dir {
            if !dir.is_absolute() {
                return Err(invalid(format!(
                    "managed.temp_dir must be an absolute path, not {}",
                    dir.display()
                )));
            }
        }
        self.tls.validate(self.http_listen).map_err(invalid)?;
        self.validate_updates().map_err(invalid)?;
        let metrics = self.metrics.listen;
        if self.metrics.enabled
            && metrics.port() != 0
            && (metrics == self.listen || Some(metrics) == self.http_listen)
        {
            return Err(invalid(format!(
                "metrics.listen ({metrics}) must differ from listen and http_listen: metrics are never served on a public listener"
            )));
        }
        if !self.auth.required
            && !self.listen.ip().is_loopback()
            && !self.auth.allow_unauthenticated_public
        {
            return Err(invalid(format!(
                "auth.required = false on {}, which is not a loopback address: anyone who reaches it could scan without a token. \
                 Keep authentication on, listen on 127.0.0.1, or also set auth.allow_unauthenticated_public = true",
                self.listen
            )));
        }
        Ok(())
    }

    fn validate_updates(&self) -> Result<(), String> {
        let updates = &self.updates;
        if updates.interval.0 < Duration::from_secs(3600) && updates.private_mirror.is_none() {
            return Err(format!(
                "updates.interval = {:?} is too short for the official mirrors, which answer 429 to \
                 clients that check too often: use 1h or more, or set updates.private_mirror",
                updates.interval.0
            ));
        }
        if updates.interval.0.is_zero() {
            return Err("updates.interval must be above 0".into());
        }
        for (name, value) in [
            ("updates.database_mirror", &updates.database_mirror),
            ("updates.private_mirror", &updates.private_mirror),
        ] {
            // One line of freshclam.conf each.
            if value
                .as_deref()
                .is_some_and(|v| v.trim().is_empty() || v.contains(char::is_whitespace))
            {
                return Err(format!("{name} must be a host name or URL without spaces"));
            }
        }
        if let Some(filter) = &self.log_level {
            tracing_subscriber::EnvFilter::try_new(filter)
                .map_err(|e| format!("log_level {filter:?}: {e}"))?;
        }
        Ok(())
    }

    /// The external backends, parsed. Empty means managed mode.
    pub fn backends(&self) -> Vec<clamd::Address> {
        self.clamd
            .backends
            .iter()
            .filter_map(|b| b.parse().ok()) // validated in load()
            .collect()
    }
}

impl Overrides {
    fn apply(&self, table: &mut toml::Table) {
        use toml::Value;
        if let Some(listen) = self.listen {
            table.insert("listen".into(), Value::String(listen.to_string()));
        }
        if !self.clamd.is_empty() {
            let clamd = table
                .entry("clamd")
                .or_insert_with(|| Value::Table(Default::default()));
            if let Value::Table(clamd) = clamd {
                clamd.insert(
                    "backends".into(),
                    Value::Array(self.clamd.iter().cloned().map(Value::String).collect()),
                );
            }
        }
        if let Some(size) = self.max_size {
            table.insert("max_size".into(), Value::Integer(size.0 as i64));
        }
        if let Some(dir) = &self.data_dir {
            table.insert("data_dir".into(), Value::String(dir.display().to_string()));
        }
        if let Some(format) = self.log_format {
            let name = match format {
                LogFormat::Auto => "auto",
                LogFormat::Json => "json",
                LogFormat::Text => "text",
            };
            table.insert("log_format".into(), Value::String(name.into()));
        }
        if let Some(addr) = self.http_listen {
            table.insert("http_listen".into(), Value::String(addr.to_string()));
        }
        // A section that is not a table fails deserialization anyway.
        let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let file = |f: &PathBuf| Value::String(f.display().to_string());
        let mut set = |p: &[&str], v: Value| {
            let _ = set_path(table, &path(p), v);
        };
        if let Some(cert) = &self.tls_cert {
            set(&["tls", "cert"], file(cert));
        }
        if let Some(key) = &self.tls_key {
            set(&["tls", "key"], file(key));
        }
        if !self.acme_domains.is_empty() {
            let domains = self.acme_domains.iter().cloned().map(Value::String);
            set(&["tls", "acme", "domains"], Value::Array(domains.collect()));
        }
        if let Some(email) = &self.acme_email {
            set(&["tls", "acme", "email"], Value::String(email.clone()));
        }
        if let Some(directory) = &self.acme_directory {
            set(
                &["tls", "acme", "directory"],
                Value::String(directory.clone()),
            );
        }
        if let Some(ca_root) = &self.acme_ca_root {
            set(&["tls", "acme", "ca_root"], file(ca_root));
        }
        if let Some(addr) = self.metrics_listen {
            set(&["metrics", "listen"], Value::String(addr.to_string()));
        }
    }
}

/// The variables that back command-line flags; clap reads those, so the
/// generic environment layer must not read them a second time.
fn flag_env(key: &str) -> bool {
    matches!(
        key,
        "AVGATE_LISTEN"
            | "AVGATE_CLAMD"
            | "AVGATE_MAX_SIZE"
            | "AVGATE_DATA_DIR"
            | "AVGATE_LOG_FORMAT"
    )
}

/// `AVGATE_PORT`, `AVGATE_PORT_8080_TCP_ADDR`, `AVGATE_SERVICE_HOST`...
fn kubernetes_service_link(name: &str) -> bool {
    name == "PORT" || name.starts_with("PORT_") || name.starts_with("SERVICE_")
}

/// An environment value as TOML: numbers, booleans and arrays keep their
/// type (`AVGATE_MAX_PARTS=8`, `AVGATE_CLAMD__BACKENDS='["unix:/a"]'`);
/// anything else is a string.
fn env_value(raw: &str) -> toml::Value {
    let parsed = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"));
    parsed.unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty key".into()),
        [key] => {
            table.insert(key.clone(), value);
            Ok(())
        }
        [section, rest @ ..] => {
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            match entry {
                toml::Value::Table(inner) => set_path(inner, rest, value),
                _ => Err(format!("{section} is not a section")),
            }
        }
    }
}

fn warn_if_world_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o002 != 0 {
            // To stderr, not the log: the configuration is read before
            // logging is set up (and check-config sets none up).
            eprintln!(
                "avgate: warning: the configuration file {} is world-writable: anyone on this host can change avgate's settings (chmod o-w it)",
                path.display()
            );
        }
    }
}

/// A size: an integer number of bytes or a string like `150MiB`, `25M`,
/// `64KiB`, `1G`. K/M/G are binary (1024) multiples, as in clamd.conf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        if unit.starts_with(['.', ',']) {
            return Err(format!(
                "{s:?}: whole numbers only; use a smaller unit (1536MiB, not 1.5GiB)"
            ));
        }
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a size (examples: 150MiB, 25M, 1048576)"))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => return Err(format!("{s:?}: unknown size unit {unit:?} (use K, M or G)")),
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", n >> 30)
        } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", n >> 20)
        } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}")
        }
    }
}

impl ByteSize {
    /// For messages: `150MiB (157286400 bytes)`, in the notation of the
    /// configuration and exact; `67884 bytes` when those are the same.
    pub fn describe(self) -> String {
        let short = self.to_string();
        if short == self.0.to_string() {
            format!("{short} bytes")
        } else {
            format!("{short} ({} bytes)", self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let expected = "a size: a number of bytes, or a string such as \"150MiB\"";
        match int_or_str(d, expected)? {
            IntOrStr::Int(n) => Ok(ByteSize(n)),
            IntOrStr::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A number or a string, for the values that take either (`max_size =
/// 1024` or `"150MiB"`); anything else is refused with `expected`.
enum IntOrStr {
    Int(u64),
    Str(String),
}

fn int_or_str<'de, D: Deserializer<'de>>(
    d: D,
    expected: &'static str,
) -> Result<IntOrStr, D::Error> {
    struct Either(&'static str);
    impl serde::de::Visitor<'_> for Either {
        type Value = IntOrStr;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<IntOrStr, E> {
            Ok(IntOrStr::Int(n))
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<IntOrStr, E> {
            u64::try_from(n)
                .map(IntOrStr::Int)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<IntOrStr, E> {
            Ok(IntOrStr::Str(s.to_owned()))
        }
    }
    d.deserialize_any(Either(expected))
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The largest file libclamav scans: INT_MAX - 2 bytes, just under 2 GiB
/// (it lowers a larger MaxFileSize to this, with a warning).
pub const CLAMAV_MAX_FILE_SIZE: u64 = i32::MAX as u64 - 2;

/// A duration written as `500ms`, `30s`, `5m`, `1h` (or a number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Humantime(pub Duration);

impl FromStr for Humantime {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        if unit.starts_with(['.', ',']) {
            return Err(format!(
                "{s:?}: whole numbers only; use a smaller unit (1500ms, not 1.5s)"
            ));
        }
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (examples: 500ms, 30s, 5m)"))?;
        let millis_per_unit: u64 = match unit.trim() {
            "ms" => 1,
            "" | "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?} (use ms, s, m, h, d)"
                ))
            }
        };
        n.checked_mul(millis_per_unit)
            .map(Duration::from_millis)
            .and_then(Humantime::checked)
            .ok_or_else(|| {
                format!(
                    "{s:?} is longer than {} days, the most a duration may be",
                    Humantime::MAX.as_secs() / 86_400
                )
            })
    }
}

impl Humantime {
    /// The longest duration accepted: a hundred years. Anything longer is a
    /// mistake, and would overflow the clock arithmetic it feeds.
    pub const MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

    fn checked(d: Duration) -> Option<Humantime> {
        (d <= Humantime::MAX).then_some(Humantime(d))
    }
}

/// The largest unit that writes it whole: `90s`, `5m`, `1500ms`.
impl fmt::Display for Humantime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        match ms / 1000 {
            0 => write!(f, "0s"),
            s if s.is_multiple_of(86_400) => write!(f, "{}d", s / 86_400),
            s if s.is_multiple_of(3600) => write!(f, "{}h", s / 3600),
            s if s.is_multiple_of(60) => write!(f, "{}m", s / 60),
            s => write!(f, "{s}s"),
        }
    }
}

impl Serialize for Humantime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A mirror URL as printed by `check-config`: user and password replaced,
/// since such URLs may carry credentials.
fn serialize_url_redacted<S: Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        None => s.serialize_none(),
        Some(url) => s.serialize_some(&redact_credentials(url)),
    }
}

/// `text` with the user and password of every URL in it replaced by `***`
/// (`http://user:pw@host/` → `http://***@host/`): for URLs printed or
/// logged, such as freshclam's lines about a private mirror.
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let authority_end = after
            .find(|c: char| c == '/' || c == '"' || c == '\'' || c.is_whitespace())
            .unwrap_or(after.len());
        match after[..authority_end].rsplit_once('@') {
            Some((_, host)) => {
                out.push_str("***@");
                out.push_str(host);
            }
            None => out.push_str(&after[..authority_end]),
        }
        rest = &after[authority_end..];
    }
    out.push_str(rest);
    out
}

impl<'de> Deserialize<'de> for Humantime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let expected = "a duration: a number of seconds, or a string such as \"30s\" or \"500ms\"";
        match int_or_str(d, expected)? {
            IntOrStr::Int(n) => Humantime::checked(Duration::from_secs(n)).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{n} seconds is longer than {} days, the most a duration may be",
                    Humantime::MAX.as_secs() / 86_400
                ))
            }),
            IntOrStr::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration from defaults and these environment variables.
    fn load_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(None, env(pairs), &Overrides::default())
    }

    /// The configuration from defaults and this file text.
    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("avgate.toml");
        std::fs::write(&file, text).unwrap();
        Config::load(Some(&file), vec![], &Overrides::default())
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_printed_configuration_loads_back_to_the_same_settings() {
        let c = load_text(
            r#"
max_size = "200MiB"
[clamd]
scan_timeout = "1500ms"
backends = ["unix:/run/clamav/clamd.ctl", "tcp://10.0.0.5:3310"]
[rate_limit]
per_ip = "90/m"
auth_failures = "5/h"
[network]
allow = ["10.0.0.0/8"]
[managed]
temp_dir = "/dev/shm"
[updates]
enabled = false
"#,
        )
        .unwrap();
        let printed = c.to_toml();
        assert!(printed.contains("max_size = \"200MiB\""), "{printed}");
        assert!(printed.contains("scan_timeout = \"1500ms\""), "{printed}");
        assert!(printed.contains("per_ip = \"90/m\""), "{printed}");
        assert!(printed.contains("auth_failures = \"5/h\""), "{printed}");
        let again = load_text(&printed).unwrap();
        assert_eq!(again.to_toml(), printed);
        assert_eq!(again.max_size, c.max_size);
        assert_eq!(again.clamd.backends, c.clamd.backends);
        assert_eq!(again.rate_limit.per_ip, c.rate_limit.per_ip);
    }

    #[test]
    fn printed_mirror_urls_hide_their_credentials() {
        let c = load_env(&[(
            "AVGATE_UPDATES__PRIVATE_MIRROR",
            "https://user:s3cret@mirror.internal/clamav",
        )])
        .unwrap();
        let printed = c.to_toml();
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("private_mirror = \"https://***@mirror.internal/clamav\""),
            "{printed}"
        );
    }

    #[test]
    fn defaults_are_safe() {
        let c = load_env(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.max_size.0, 150 * 1024 * 1024);
        assert!(c.clamd.backends.is_empty(), "managed clamd by default");
    }

    #[test]
    fn authentication_is_required_unless_loopback_or_explicitly_public() {
        let c = load_env(&[]).unwrap();
        assert!(c.auth.required, "tokens are required by default");
        let public = Overrides {
            listen: Some("0.0.0.0:8080".parse().unwrap()),
            ..Default::default()
        };
        let off = env(&[("AVGATE_AUTH__REQUIRED", "false")]);
        let err = Config::load(None, off.clone(), &public).unwrap_err();
        assert!(
            err.to_string().contains("allow_unauthenticated_public"),
            "{err}"
        );
        let c = Config::load(None, off.clone(), &Overrides::default()).unwrap();
        assert!(!c.auth.required, "loopback may run without tokens");
        let mut both = off;
        both.extend(env(&[(
            "AVGATE_AUTH__ALLOW_UNAUTHENTICATED_PUBLIC",
            "true",
        )]));
        assert!(Config::load(None, both, &public).is_ok());
    }

    /// `section.key` for every value in `table` (tables of tables walked).
    fn key_paths(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        for (key, value) in table {
            match value {
                toml::Value::Table(inner) => key_paths(inner, &format!("{prefix}{key}."), out),
                _ => out.push(format!("{prefix}{key}")),
            }
        }
    }

    /// The keys the defaults print with `check-config`: every key that has
    /// a default value (optional ones without a default, such as
    /// `tls.cert`, are not printed).
    fn keys_with_defaults() -> Vec<String> {
        let printed: toml::Table = toml::from_str(&load_env(&[]).unwrap().to_toml()).unwrap();
        let mut keys = Vec::new();
        key_paths(&printed, "", &mut keys);
        keys
    }

    /// The keys avgate.example.toml sets, and those it shows commented out
    /// (`# key = value`, where the value is TOML), as `section.key`; the
    /// latter with their line, uncommented.
    fn example_keys(text: &str) -> (Vec<String>, Vec<(String, String)>) {
        let table: toml::Table = toml::from_str(text).unwrap();
        let mut set = Vec::new();
        key_paths(&table, "", &mut set);
        let mut commented = Vec::new();
        let mut section = String::new();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = format!("{name}.");
            } else if let Some((key, value)) =
                line.strip_prefix("# ").and_then(|l| l.split_once(" = "))
            {
                let is_value = toml::from_str::<toml::Table>(&format!("v = {value}")).is_ok();
                if is_value && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    commented.push((format!("{section}{key}"), format!("{key} = {value}")));
                }
            }
        }
        (set, commented)
    }

    #[test]
    fn the_example_config_is_every_key_at_its_default() {
        let path = crate::repo::path("avgate.example.toml");
        let example = Config::load(Some(&path), vec![], &Overrides::default()).unwrap();
        // It says "every key, with its default": loading it changes nothing.
        assert_eq!(example.to_toml(), load_env(&[]).unwrap().to_toml());
        let (set, commented) = example_keys(&crate::repo::read("avgate.example.toml"));
        // data_dir's default depends on $HOME: shown commented out.
        let missing: Vec<String> = keys_with_defaults()
            .into_iter()
            .filter(|key| {
                !(set.contains(key)
                    || (key == "data_dir" && commented.iter().any(|(k, _)| k == key)))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "avgate.example.toml does not set {missing:?}"
        );
        // What it shows commented out, for keys without a default, must be
        // keys too.
        for (key, line) in &commented {
            let text = match key.rsplit_once('.') {
                Some((section, _)) => format!("[{section}]\n{line}"),
                None => line.clone(),
            };
            if let Err(e) = load_text(&text) {
                // A key may be refused alone (tls.cert needs tls.key); an
                // unknown one never is.
                assert!(!e.to_string().contains("unknown field"), "{key}: {e}");
            }
        }
    }

    #[test]
    fn the_configuration_reference_documents_every_key() {
        let reference = crate::repo::read("docs/configuration.md");
        // The text of each "### Top level" / "### `[section]`" part.
        let part = |section: &str| -> String {
            let heading = match section {
                "" => "### Top level".to_owned(),
                s => format!("### `[{s}]`"),
            };
            let start = reference
                .find(&heading)
                .unwrap_or_else(|| panic!("configuration.md has no {heading}"));
            let rest = &reference[start + heading.len()..];
            rest[..rest.find("\n### ").unwrap_or(rest.len())].to_owned()
        };
        let (set, commented) = example_keys(&crate::repo::read("avgate.example.toml"));
        let mut keys = keys_with_defaults();
        keys.extend(set);
        keys.extend(commented.into_iter().map(|(key, _)| key));
        keys.sort();
        keys.dedup();
        let missing: Vec<String> = keys
            .into_iter()
            .filter(|key| {
                let (section, leaf) = key.rsplit_once('.').unwrap_or(("", key));
                !part(section).contains(&format!("| `{leaf}` |"))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "docs/configuration.md has no row for {missing:?}"
        );
    }

    #[test]
    fn acme_settings_need_domains_but_the_default_directory_is_no_setting() {
        for text in ["directory = \"production\"", "domains = []"] {
            let c = load_text(&format!("[tls.acme]\n{text}")).unwrap();
            assert!(!c.tls.enabled(), "{text}");
        }
        for text in ["directory = \"staging\"", "email = \"ops@example.com\""] {
            let err = load_text(&format!("[tls.acme]\n{text}")).unwrap_err();
            assert!(
                err.to_string().contains("need tls.acme.domains"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn a_request_timeout_of_zero_is_refused() {
        // Every scan would get 408 at once.
        let err = load_env(&[("AVGATE_REQUEST_TIMEOUT", "0")]).unwrap_err();
        assert!(
            err.to_string().contains("request_timeout must be above 0"),
            "{err}"
        );
    }

    #[test]
    fn a_burst_of_zero_is_refused() {
        // An empty bucket would refuse every request, valid tokens too.
        for var in [
            "AVGATE_RATE_LIMIT__PER_IP_BURST",
            "AVGATE_RATE_LIMIT__PER_TOKEN_BURST",
            "AVGATE_RATE_LIMIT__AUTH_FAILURES_BURST",
        ] {
            let err = load_env(&[(var, "0")]).unwrap_err();
            assert!(
                err.to_string().contains("burst must be above 0"),
                "{var}: {err}"
            );
        }
    }

    #[test]
    fn worker_threads_default_to_half_the_cpus_and_can_be_set() {
        let c = load_env(&[]).unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(c.runtime_workers(), (cpus / 2).max(1));
        let c = load_env(&[("AVGATE_WORKER_THREADS", "3")]).unwrap();
        assert_eq!(c.runtime_workers(), 3);
    }

    #[test]
    fn log_lines_wait_100ms_by_default_and_0_writes_each_at_once() {
        let c = load_env(&[]).unwrap();
        assert_eq!(c.log_flush_interval.0, Duration::from_millis(100));
        let c = load_env(&[("AVGATE_LOG_FLUSH_INTERVAL", "0")]).unwrap();
        assert_eq!(c.log_flush_interval.0, Duration::ZERO);
    }

    #[test]
    fn metrics_listen_on_loopback_and_never_on_the_public_listener() {
        let c = load_env(&[]).unwrap();
        assert!(c.metrics.enabled);
        assert_eq!(c.metrics.listen.to_string(), "127.0.0.1:9464");
        let flag = Overrides {
            metrics_listen: Some("127.0.0.1:9464".parse().unwrap()),
            ..Default::default()
        };
        let c = Config::load(
            None,
            env(&[("AVGATE_METRICS__LISTEN", "127.0.0.1:1")]),
            &flag,
        );
        assert_eq!(c.unwrap().metrics.listen.port(), 9464, "flag beats env");
        let same = Overrides {
            metrics_listen: Some("127.0.0.1:8080".parse().unwrap()),
            ..Default::default()
        };
        let err = Config::load(None, vec![], &same).unwrap_err();
        assert!(err.to_string().contains("metrics.listen"), "{err}");
        let off = env(&[("AVGATE_METRICS__ENABLED", "false")]);
        assert!(Config::load(None, off, &same).is_ok());
    }

    #[test]
    fn updates_and_freshness_settings() {
        let c = load_env(&[]).unwrap();
        assert_eq!(c.max_database_age.0, Duration::from_secs(3 * 86_400));
        assert_eq!(c.updates.enabled, None, "auto by default");
        assert_eq!(c.updates.interval.0, Duration::from_secs(6 * 3600));
        assert!(!c.updates.reload_external);
        let c = load_env(&[
            ("AVGATE_UPDATES__ENABLED", "false"),
            ("AVGATE_MAX_DATABASE_AGE", "1d"),
            ("AVGATE_LOG_LEVEL", "avgate=debug,clamd=warn"),
        ])
        .unwrap();
        assert_eq!(c.updates.enabled, Some(false));
        assert_eq!(c.max_database_age.0, Duration::from_secs(86_400));
        // The official mirrors must not be asked every few seconds.
        let short = env(&[("AVGATE_UPDATES__INTERVAL", "10m")]);
        let err = Config::load(None, short.clone(), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("private_mirror"), "{err}");
        let mut private = short;
        private.extend(env(&[(
            "AVGATE_UPDATES__PRIVATE_MIRROR",
            "http://mirror.internal",
        )]));
        assert!(Config::load(None, private, &Overrides::default()).is_ok());
        let err = load_env(&[("AVGATE_LOG_LEVEL", "avgate=loud")]).unwrap_err();
        assert!(err.to_string().contains("log_level"), "{err}");
        let err = load_env(&[("AVGATE_LOG", "foo=bar=baz")]).unwrap_err();
        assert!(err.to_string().contains("AVGATE_LOG"), "{err}");
        load_env(&[("AVGATE_LOG", "info,audit=warn")]).unwrap();
    }

    #[test]
    fn managed_temp_dir_must_be_absolute() {
        let c = load_env(&[("AVGATE_MANAGED__TEMP_DIR", "/dev/shm")]).unwrap();
        assert_eq!(c.managed.temp_dir, Some(PathBuf::from("/dev/shm")));
        // clamd would resolve a relative one against its working directory.
        let err = load_env(&[("AVGATE_MANAGED__TEMP_DIR", "shm")]).unwrap_err();
        assert!(err.to_string().contains("managed.temp_dir"), "{err}");
    }

    #[test]
    fn precedence_is_flags_then_env_then_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("avgate.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\nmax_parts = 3\n[clamd]\nscan_timeout = \"9s\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("AVGATE_MAX_PARTS", "5"),
                ("AVGATE_CLAMD__SCAN_TIMEOUT", "7s"),
                ("OTHER", "x"),
                ("AVGATE_PORT", "tcp://10.0.0.1:8080"),
                ("AVGATE_SERVICE_HOST", "10.0.0.1"),
            ]),
            &Overrides {
                listen: Some("127.0.0.1:2".parse().unwrap()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 2, "flag beats file");
        assert_eq!(c.max_parts, 5, "env beats file");
        assert_eq!(c.clamd.scan_timeout.0, Duration::from_secs(7));
    }

    #[test]
    fn unknown_keys_are_rejected_in_every_layer() {
        // The file's errors name the file and the line.
        let err = load_text("listen = \"127.0.0.1:8080\"\n\n[clamd]\ntimeoutt = \"1s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("avgate.toml"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("timeoutt"), "{err}");
        // A variable's name its own: which one of several is wrong.
        let err = load_env(&[
            ("AVGATE_MAX_SIZE", "1MiB"),
            ("AVGATE_CLAMD__TIMEOUTT", "1s"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("timeoutt"), "{err}");
        assert!(
            err.to_string()
                .contains("environment variable AVGATE_CLAMD__TIMEOUTT"),
            "{err}"
        );
    }

    #[test]
    fn sizes_are_described_in_both_notations_once() {
        assert_eq!(ByteSize(150 << 20).describe(), "150MiB (157286400 bytes)");
        assert_eq!(ByteSize(67_884).describe(), "67884 bytes");
    }

    #[test]
    fn bad_backend_addresses_are_rejected() {
        let err = Config::load(
            None,
            vec![],
            &Overrides {
                clamd: vec!["localhost:3310".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("tcp://"), "{err}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!("150MiB".parse::<ByteSize>().unwrap().0, 150 << 20);
        assert_eq!("25M".parse::<ByteSize>().unwrap().0, 25 << 20);
        assert_eq!("1048576".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("2 GiB".parse::<ByteSize>().unwrap().0, 2 << 30);
        assert!("12X".parse::<ByteSize>().is_err());
        assert!("M".parse::<ByteSize>().is_err());
        assert!("99999999999999G".parse::<ByteSize>().is_err());
        let err = "1.5GB".parse::<ByteSize>().unwrap_err();
        assert!(err.contains("whole numbers only"), "{err}");
        let err = "1.5s".parse::<Humantime>().unwrap_err();
        assert!(err.contains("whole numbers only"), "{err}");
        assert_eq!(ByteSize(150 << 20).to_string(), "150MiB");
        assert_eq!(
            "500ms".parse::<Humantime>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            "2m".parse::<Humantime>().unwrap().0,
            Duration::from_secs(120)
        );
        assert!("2 weeks".parse::<Humantime>().is_err());
    }

    #[test]
    fn credentials_in_urls_are_masked_wherever_they_are() {
        assert_eq!(
            redact_credentials(
                "WARNING: remote_cvdhead: file not found: http://u:Sup3r@127.0.0.1:1//daily.cld"
            ),
            "WARNING: remote_cvdhead: file not found: http://***@127.0.0.1:1//daily.cld"
        );
        assert_eq!(
            redact_credentials("using https://a:b@m.example and ftp://c@n.example:21 now"),
            "using https://***@m.example and ftp://***@n.example:21 now"
        );
        for plain in ["http://m.example/x", "no url", "a://", "http://host@"] {
            let expected = if plain == "http://host@" {
                "http://***@"
            } else {
                plain
            };
            assert_eq!(redact_credentials(plain), expected);
        }
    }

    #[test]
    fn durations_too_long_for_the_clock_are_refused_not_wrapped() {
        // These wrapped around to a few seconds, or passed and then made
        // the clock arithmetic panic.
        for huge in [
            "94368760191893771d",
            "3381903080180084463m",
            "18446744073709551615s",
            "36501d",
        ] {
            assert!(huge.parse::<Humantime>().is_err(), "{huge}");
        }
        assert_eq!("36500d".parse::<Humantime>().unwrap().0, Humantime::MAX);
        for (key, value) in [
            ("AVGATE_REQUEST_TIMEOUT", "3381903080180084463m"),
            ("AVGATE_HEADER_TIMEOUT", "18446744073709551615s"),
            ("AVGATE_CLAMD__HEALTH_INTERVAL", "18446744073709551615"),
        ] {
            let err = load_env(&[(key, value)]).unwrap_err().to_string();
            assert!(err.contains("longer than"), "{key}: {err}");
        }
    }

    #[test]
    fn a_max_size_clamav_cannot_scan_and_a_tiny_upload_window_are_refused() {
        let err = load_text("max_size = \"2GiB\"").unwrap_err().to_string();
        assert!(err.contains("above what ClamAV can scan"), "{err}");
        assert!(err.contains("2047MiB"), "{err}");
        assert_eq!(
            load_text("max_size = \"2047MiB\"").unwrap().max_size.0,
            2047 << 20
        );
        let err = load_text("min_upload_window = \"50ms\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 100ms"), "{err}");
        // Without a minimum rate the window means nothing.
        load_text("min_upload_rate = 0\nmin_upload_window = \"50ms\"").unwrap();
    }

    #[test]
    fn a_value_of_the_wrong_kind_says_what_is_expected() {
        for (text, expected) in [
            ("max_size = -5", "a size: a number of bytes, or a string"),
            ("max_size = 1.5", "a size: a number of bytes, or a string"),
            (
                "header_timeout = 1.5",
                "a duration: a number of seconds, or a string",
            ),
            (
                "header_timeout = -1",
                "a duration: a number of seconds, or a string",
            ),
        ] {
            let err = load_text(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(!err.contains("untagged"), "{text}: {err}");
        }
    }
}
