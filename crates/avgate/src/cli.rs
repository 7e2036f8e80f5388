//! The command line: `avgate serve` and friends.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{ByteSize, Config, LogFormat, Overrides};

#[derive(Debug, Parser)]
#[command(
    name = "avgate",
    version,
    about = "A streaming malware-scanning gateway in front of ClamAV's clamd"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway. Without --clamd, avgate starts and supervises its own clamd.
    Serve(ServeArgs),
    /// Check the configuration and print the effective one as TOML (exit 0 when valid, 2 when not).
    CheckConfig(ServeArgs),
    /// Manage API tokens: create, list, revoke, usage (works on the store directly).
    Token(crate::auth::cli::TokenArgs),
    /// False positives and known-bad files: ignore, allow and block lists
    /// (works on the store directly; a running server applies them within seconds).
    Policy(crate::policy::cli::PolicyArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (unknown keys are rejected).
    #[arg(long, short = 'c', env = "AVGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "AVGATE_LISTEN", value_name = "ADDR", value_parser = parse_listen)]
    pub listen: Option<SocketAddr>,
    /// An external clamd: tcp://HOST:PORT or unix:/PATH. Repeat for several
    /// (comma-separated in AVGATE_CLAMD). None: avgate runs its own.
    #[arg(
        long = "clamd",
        env = "AVGATE_CLAMD",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub clamd: Vec<String>,
    /// Largest file accepted, e.g. 150MiB [default: 150MiB].
    #[arg(long, env = "AVGATE_MAX_SIZE", value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<ByteSize>,
    /// State directory [default: ~/.local/share/avgate].
    #[arg(long, env = "AVGATE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log format [default: auto: JSON unless stdout is a terminal].
    #[arg(long, env = "AVGATE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormatArg>,
    /// TLS certificate chain (PEM); with --tls-key, --listen speaks HTTPS.
    /// Reloaded when the file changes.
    /// (The key may come from the file or the environment: the merged
    /// configuration must have both or neither.)
    #[arg(long, value_name = "FILE", help_heading = "TLS")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "FILE", help_heading = "TLS")]
    pub tls_key: Option<PathBuf>,
    /// Get certificates from Let's Encrypt (or --acme-directory) for this
    /// name; repeat for several. --listen then speaks HTTPS.
    #[arg(long = "acme-domain", value_name = "NAME", help_heading = "TLS")]
    pub acme_domains: Vec<String>,
    /// Contact address for the ACME account.
    #[arg(long, value_name = "ADDRESS", help_heading = "TLS")]
    pub acme_email: Option<String>,
    /// ACME directory: production (default), staging or a URL.
    #[arg(long, value_name = "URL", help_heading = "TLS")]
    pub acme_directory: Option<String>,
    /// Use Let's Encrypt's staging CA (untrusted certificates, loose rate limits).
    #[arg(long, conflicts_with = "acme_directory", help_heading = "TLS")]
    pub acme_staging: bool,
    /// Extra root CA (PEM) for the ACME directory's HTTPS (a private ACME server).
    #[arg(long, value_name = "FILE", help_heading = "TLS")]
    pub acme_ca_root: Option<PathBuf>,
    /// Plain-HTTP listener beside HTTPS, e.g. 0.0.0.0:80: ACME HTTP-01
    /// challenges, and a 308 redirect to HTTPS for everything else.
    #[arg(long, value_name = "ADDR", help_heading = "TLS", value_parser = parse_listen)]
    pub http_listen: Option<SocketAddr>,
    /// Prometheus metrics listener (GET /metrics) [default: 127.0.0.1:9464];
    /// never the public one. `metrics.enabled = false` turns it off
    /// [env: AVGATE_METRICS__LISTEN]
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    Auto,
    Json,
    Text,
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse()
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        "not an IP address and port: write 127.0.0.1:8080, 0.0.0.0:8443 or [::]:8443 \
         (a host name such as localhost is not accepted)"
            .to_owned()
    })
}

impl ServeArgs {
    pub fn load(&self) -> Result<Config, crate::config::ConfigError> {
        let overrides = Overrides {
            listen: self.listen,
            clamd: self.clamd.clone(),
            max_size: self.max_size,
            data_dir: self.data_dir.clone(),
            log_format: self.log_format.map(|f| match f {
                LogFormatArg::Auto => LogFormat::Auto,
                LogFormatArg::Json => LogFormat::Json,
                LogFormatArg::Text => LogFormat::Text,
            }),
            http_listen: self.http_listen,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            acme_domains: self.acme_domains.clone(),
            acme_email: self.acme_email.clone(),
            acme_directory: match self.acme_staging {
                true => Some("staging".into()),
                false => self.acme_directory.clone(),
            },
            acme_ca_root: self.acme_ca_root.clone(),
            metrics_listen: self.metrics_listen,
        };
        Config::load(self.config.as_deref(), std::env::vars(), &overrides)
    }
}

/// Sets up logging: JSON lines for machines, text for a terminal.
/// The filter (env-filter syntax) is `AVGATE_LOG` when set, else `level`
/// (the `log_level` key), else `info`; [`set_log_level`] changes it later.
/// Lines go to standard output, `info` ones gathered for up to
/// `flush_interval` ([`crate::logout`]); the returned guard writes what
/// waits when dropped, so keep it until the process ends.
pub fn init_logging(
    format: LogFormat,
    level: Option<&str>,
    flush_interval: std::time::Duration,
) -> crate::logout::FlushOnDrop {
    let output = crate::logout::LogOutput::stdout(flush_interval);
    let filter = tracing_subscriber::EnvFilter::try_from_env("AVGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(output.clone());
    if json {
        let builder = builder
            .fmt_fields(crate::logfmt::JsonFieldList)
            .event_format(crate::logfmt::JsonLines)
            .with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = LOG_FILTER.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.init();
    } else {
        // Colours only for a terminal: in a file they are escape codes.
        let builder = builder
            .with_ansi(std::io::stdout().is_terminal())
            .with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = LOG_FILTER.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.init();
    }
    output.flush_on_drop()
}

type SetFilter = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;

/// Swaps the log filter of [`init_logging`], at runtime.
static LOG_FILTER: std::sync::OnceLock<SetFilter> = std::sync::OnceLock::new();

/// Applies the `log_level` key again (SIGHUP). `Ok(false)` when nothing
/// changed: `AVGATE_LOG` is set (it wins) or logging was not set up here.
pub fn set_log_level(level: Option<&str>) -> Result<bool, String> {
    if std::env::var_os("AVGATE_LOG").is_some() {
        return Ok(false);
    }
    let Some(set) = LOG_FILTER.get() else {
        return Ok(false);
    };
    let filter = tracing_subscriber::EnvFilter::try_new(level.unwrap_or("info"))
        .map_err(|e| e.to_string())?;
    set(filter).map(|()| true)
}

/// Where the store is, for the commands that work on it directly (`token`,
/// `policy`): the same `--config` and `--data-dir` as `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// TOML configuration file (its data_dir is used).
    #[arg(long, short = 'c', env = "AVGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// State directory [default: ~/.local/share/avgate].
    #[arg(long, env = "AVGATE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl StoreArgs {
    /// Opens the store in the configured data directory, creating it if
    /// there is none yet (and saying so: a token written to a store the
    /// server does not use would be refused by it).
    pub fn open(&self) -> anyhow::Result<crate::store::SqliteStore> {
        let dir = self.data_dir()?;
        let new = !dir.join(crate::store::sqlite::FILE_NAME).exists();
        let store = crate::store::SqliteStore::open(&dir)?;
        if new {
            eprintln!(
                "avgate: created a new state store in {}; the server must run with this data directory (--data-dir) to use it",
                dir.display()
            );
        }
        Ok(store)
    }

    /// Opens the store in the configured data directory; an error if there
    /// is none, since reading an empty store made on the spot would hide a
    /// wrong --data-dir.
    pub fn open_existing(&self) -> anyhow::Result<crate::store::SqliteStore> {
        let dir = self.data_dir()?;
        if !dir.join(crate::store::sqlite::FILE_NAME).exists() {
            anyhow::bail!(
                "no state store in {} (no {}): is the data directory right? Use the server's --data-dir (or data_dir in its configuration)",
                dir.display(),
                crate::store::sqlite::FILE_NAME
            );
        }
        Ok(crate::store::SqliteStore::open(&dir)?)
    }

    fn data_dir(&self) -> anyhow::Result<PathBuf> {
        let overrides = Overrides {
            data_dir: self.data_dir.clone(),
            ..Default::default()
        };
        let config = Config::load(self.config.as_deref(), std::env::vars(), &overrides)?;
        Ok(config.data_dir)
    }
}

/// Runs a store command to its end on a single-threaded runtime. The exit
/// code follows `main`'s convention: 0 success, 2 when `is_usage` says the
/// error is the user's (or the configuration is invalid), 1 otherwise.
pub fn run_command(
    command: impl std::future::Future<Output = anyhow::Result<()>>,
    is_usage: impl FnOnce(&anyhow::Error) -> bool,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("avgate: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("avgate: {e:#}");
            let usage = is_usage(&e) || e.downcast_ref::<crate::config::ConfigError>().is_some();
            std::process::ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// What `check-config` checks beyond the configuration's own rules: the
/// files that `serve` would read at start and refuse to start without.
pub fn check_files(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) {
        let files = crate::tls::files::CertFiles {
            cert: cert.clone(),
            key: key.clone(),
        };
        if let Err(e) = files.load() {
            problems.push(format!("tls: {e:#}"));
        }
    }
    if let Some(ca_root) = &config.tls.acme.ca_root {
        // Read as serve reads it at start.
        if let Err(e) = crate::tls::acme::directory_client(Some(ca_root)) {
            problems.push(format!("{e:#}"));
        }
    }
    let managed = config.clamd.backends.is_empty();
    if managed {
        // The lookups serve makes at start, so that the two agree.
        if let Err(e) = crate::managed::find_clamd(config.managed.clamd_path.as_deref()) {
            problems.push(format!("{e:#}"));
        }
        if config.updates.enabled == Some(true) {
            let freshclam = config.updates.freshclam_path.as_deref();
            if let Err(e) = crate::managed::updates::find_freshclam(freshclam) {
                problems.push(format!("{e:#}"));
            }
        }
        if let Some(dir) = &config.managed.database_dir {
            if !dir.is_dir() {
                problems.push(format!(
                    "managed.database_dir {} is not a directory",
                    dir.display()
                ));
            }
        }
    }
    problems
}

/// A table for people: columns padded to their widest cell, two spaces
/// apart, no trailing blanks; `empty` below the header when there are no
/// rows.
pub fn table<const N: usize>(header: [&str; N], rows: &[[String; N]], empty: &str) -> String {
    // A long cell (a token's allow list) is cut: the table stays readable,
    // and padding stays within what `format!` can do.
    const MAX_CELL: usize = 120;
    let cut = |cell: &String| -> String {
        if cell.chars().count() <= MAX_CELL {
            return cell.clone();
        }
        let kept: String = cell.chars().take(MAX_CELL - 1).collect();
        format!("{kept}…")
    };
    let rows: Vec<[String; N]> = rows.iter().map(|row| row.each_ref().map(cut)).collect();
    let rows = &rows[..];
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&header.map(String::from));
    for row in rows {
        out.push_str(&line(row));
    }
    if rows.is_empty() {
        out.push_str(empty);
        out.push('\n');
    }
    out
}

/// The environment variable a rejected value came from: the argument clap
/// names in `error` has one, it is set, and the flag is not on the command
/// line.
pub fn env_source_of(error: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.strip_prefix("--")?.split([' ', '=']).next()?;
    let on_command_line =
        // args_os: a path argument need not be UTF-8 (args() would panic).
        std::env::args_os().any(|a| {
            a.to_str()
                .is_some_and(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")))
        });
    if on_command_line {
        return None;
    }
    fn find(command: &clap::Command, long: &str) -> Option<String> {
        command
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env())
            .map(|v| v.to_string_lossy().into_owned())
            .or_else(|| command.get_subcommands().find_map(|c| find(c, long)))
    }
    let var = find(&<Cli as clap::CommandFactory>::command(), long)?;
    std::env::var_os(&var).is_some().then_some(var)
}

#[cfg(test)]
mod tests {
    use super::{check_files, table};
    use crate::config::Config;

    /// check-config reads the files serve would refuse to start without.
    #[test]
    fn check_files_reads_the_tls_and_acme_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            clamd: crate::config::ClamdConfig {
                backends: vec!["unix:/x".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(check_files(&config), Vec::<String>::new());
        config.tls.acme.ca_root = Some(dir.path().join("missing.pem"));
        let problems = check_files(&config);
        assert!(
            problems.len() == 1 && problems[0].contains("cannot read tls.acme.ca_root"),
            "{problems:?}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        config.tls.acme.ca_root = Some(empty);
        let problems = check_files(&config);
        assert!(
            problems[0].contains("holds no PEM certificate"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_table_cuts_long_cells_instead_of_failing() {
        // Wider than format!'s padding can go (65,535): this panicked.
        let wide = "10.0.0.0/24,".repeat(6_000);
        let out = table(
            ["NAME", "ALLOW"],
            &[["a".into(), wide], ["bb".into(), "x".into()]],
            "none",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(
            lines[1].starts_with("a     10.0.0.0/24,") && lines[1].ends_with('…'),
            "{}",
            lines[1]
        );
        assert!(lines[1].chars().count() < 130);
        assert_eq!(lines[2], "bb    x");
    }
}
