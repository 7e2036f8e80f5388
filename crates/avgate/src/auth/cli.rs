//! `avgate token create|list|revoke|usage`: token management on the store
//! directly (the server need not run). A running server sees a new token
//! at once, a revocation within a second (it caches verified tokens that
//! long) and the use of tokens without quotas up to a second late (it
//! counts them in memory and writes them every second).

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::manage::{self, Actor, ManageError, TokenOptions, TokenView, UsageView};
use super::Scope;
use crate::cli::StoreArgs;
use crate::config::ByteSize;
use crate::store::clock::{self, Month};

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (once: only its hash is kept).
    Create(CreateArgs),
    /// List tokens (never the tokens themselves).
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: a running server refuses it within a second.
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        /// The token's id (tok_...) or name.
        id_or_name: String,
    },
    /// Files and bytes scanned with a token in a month.
    Usage {
        #[command(flatten)]
        store: StoreArgs,
        /// The token's id (tok_...) or name.
        id_or_name: String,
        /// YYYY-MM (UTC) [default: this month].
        #[arg(long, value_parser = parse_month)]
        month: Option<Month>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// A name for people: letters, digits, '-', '_', '.'.
    #[arg(long)]
    pub name: String,
    #[arg(long, value_enum, default_value = "scan")]
    pub scope: ScopeArg,
    /// Lifetime, e.g. 90d, 12h [default: never expires].
    #[arg(long, value_name = "DURATION")]
    pub expires: Option<String>,
    /// Requests allowed, e.g. 10/s, 600/m [default: the configured rate].
    #[arg(long)]
    pub rate: Option<String>,
    /// Requests allowed at once above the rate [default: 2 x rate per second].
    #[arg(long)]
    pub burst: Option<u32>,
    /// Addresses the token may be used from (CIDR, IPv4 or IPv6); repeatable.
    #[arg(long = "allow-ip", value_name = "CIDR")]
    pub allow_ip: Vec<String>,
    /// Files per calendar month (UTC).
    #[arg(long, value_name = "N")]
    pub monthly_files: Option<u64>,
    /// Bytes per calendar month (UTC), e.g. 10GiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub monthly_bytes: Option<ByteSize>,
    /// Scans in progress at once with this token.
    #[arg(long, value_name = "N")]
    pub max_concurrent: Option<usize>,
    /// Print the token and its details as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ScopeArg {
    Scan,
    Admin,
}

fn parse_month(s: &str) -> Result<Month, String> {
    s.parse()
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse()
}

/// Runs a token command; the exit code follows `main`'s convention.
pub fn run(args: TokenArgs) -> ExitCode {
    crate::cli::run_command(dispatch(args.command), |e| {
        e.downcast_ref::<ManageError>().is_some_and(|m| {
            matches!(
                m,
                ManageError::Invalid(_)
                    | ManageError::NotFound(_)
                    | ManageError::NameTaken(_)
                    | ManageError::AlreadyRevoked(_)
            )
        })
    })
}

async fn dispatch(command: TokenCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        TokenCommand::Create(args) => {
            let store = args.store.open()?;
            let options = TokenOptions {
                name: args.name,
                scope: Some(match args.scope {
                    ScopeArg::Scan => Scope::Scan,
                    ScopeArg::Admin => Scope::Admin,
                }),
                expires: args.expires,
                rate: args.rate,
                burst: args.burst,
                allow_ips: args.allow_ip,
                monthly_files: args.monthly_files,
                monthly_bytes: args.monthly_bytes,
                max_concurrent: args.max_concurrent,
            };
            let spec = options
                .validate(clock::now())
                .map_err(ManageError::Invalid)?;
            let created = manage::create(&store, spec, &Actor::cli()).await?;
            if args.json {
                let mut value = serde_json::to_value(&created.view)?;
                value["token"] = created.token.expose().into();
                writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
            } else {
                // The token alone on the first line, so that
                // `avgate token create ... | head -1` gives just the token.
                writeln!(out, "{}", created.token.expose())?;
                writeln!(
                    out,
                    "id: {}  name: {}  scope: {}",
                    created.view.id, created.view.name, created.view.scope
                )?;
                eprintln!("Store this token now: it is not shown again (only its hash is kept).");
            }
        }
        TokenCommand::List { store, json } => {
            let store = store.open_existing()?;
            let tokens = manage::list(&store).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&tokens)?)?;
            } else {
                write!(out, "{}", table(&tokens))?;
            }
        }
        TokenCommand::Revoke { store, id_or_name } => {
            let store = store.open_existing()?;
            let view = manage::revoke(&store, &id_or_name, &Actor::cli()).await?;
            writeln!(out, "revoked {} ({})", view.id, view.name)?;
        }
        TokenCommand::Usage {
            store,
            id_or_name,
            month,
            json,
        } => {
            let store = store.open_existing()?;
            let usage = manage::usage(&store, &id_or_name, month).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&usage)?)?;
            } else {
                write!(out, "{}", usage_text(&usage))?;
            }
        }
    }
    Ok(())
}

fn of_limit(limit: Option<u64>) -> String {
    limit
        .map(|n| format!(" of {n}"))
        .unwrap_or_else(|| " (no quota)".into())
}

fn usage_text(u: &UsageView) -> String {
    // Bytes in the notation they were given in (`1MiB`), exact otherwise.
    let bytes_limit = u
        .monthly_bytes
        .map(|n| format!(" of {}", ByteSize(n)))
        .unwrap_or_else(|| " (no quota)".into());
    format!(
        "token  {} ({})\nmonth  {}\nfiles  {}{}\nbytes  {}{}\n",
        u.token_id,
        u.name,
        u.month,
        u.files,
        of_limit(u.monthly_files),
        ByteSize(u.bytes),
        bytes_limit,
    )
}

fn table(tokens: &[TokenView]) -> String {
    let header = [
        "ID", "NAME", "SCOPE", "STATUS", "CREATED", "EXPIRES", "LIMITS",
    ];
    let rows: Vec<[String; 7]> = tokens
        .iter()
        .map(|t| {
            let mut limits = Vec::new();
            if let Some(r) = t.rate {
                // As it was given (`1/m`), not as a fraction per second.
                let rate = crate::perimeter::ratelimit::Rate {
                    per_second: r.per_second,
                };
                limits.push(format!("rate={rate} burst={}", r.burst));
            }
            if !t.allow_ips.is_empty() {
                limits.push(format!("allow-ip={}", t.allow_ips.join(",")));
            }
            if let Some(n) = t.monthly_files {
                limits.push(format!("files/month={n}"));
            }
            if let Some(n) = t.monthly_bytes {
                limits.push(format!("bytes/month={}", ByteSize(n)));
            }
            if let Some(n) = t.max_concurrent {
                limits.push(format!("concurrent={n}"));
            }
            let day = |s: &str| s.get(..10).unwrap_or(s).to_owned();
            [
                t.id.clone(),
                t.name.clone(),
                t.scope.to_string(),
                t.status.to_owned(),
                day(&t.created_at),
                t.expires_at
                    .as_deref()
                    .map(day)
                    .unwrap_or_else(|| "never".into()),
                limits.join(" "),
            ]
        })
        .collect();
    crate::cli::table(
        header,
        &rows,
        "(no tokens: avgate token create --name NAME)",
    )
}
