//! `avgate policy ignore|allow|block add`, `list`, `remove`: the policy on
//! the store directly. A running server applies a change within
//! `policy.refresh_interval` (it polls the store's policy version).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use sha2::{Digest, Sha256};

use super::manage::{self, PolicyError, PolicyView};
use super::PolicyOptions;
use crate::auth::cli::StoreArgs;
use crate::auth::manage::Actor;
use crate::config::{Config, Overrides};
use crate::store::clock;
use crate::store::SqliteStore;

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Signature names that are false positives (applied inside the
    /// managed clamd, so other signatures on the same file still count).
    Ignore {
        #[command(subcommand)]
        action: IgnoreAction,
    },
    /// Files known to be good, by sha256: answered OK whatever is found.
    Allow {
        #[command(subcommand)]
        action: HashAction,
    },
    /// Files known to be bad, by sha256: answered FOUND (avgate.Blocklist).
    Block {
        #[command(subcommand)]
        action: HashAction,
    },
    /// The entries in force (--all: removed and expired ones too).
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        all: bool,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove an entry (by id, pol_...): it stops applying at once.
    Remove {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum IgnoreAction {
    /// Ignore a signature, e.g. `Win.Test.Fp-1` (a `.UNOFFICIAL` suffix is dropped).
    Add {
        /// The signature name as a scan answer shows it.
        name: String,
        #[command(flatten)]
        entry: EntryArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum HashAction {
    /// Add a file by its sha256, or by the file itself (--file).
    Add {
        /// 64 hex digits, as `sha256sum` prints.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        sha256: Option<String>,
        /// Hash this file instead (read here, never uploaded).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        #[command(flatten)]
        entry: EntryArgs,
    },
}

#[derive(Debug, Args)]
pub struct EntryArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Why: a ticket, the vendor's answer. Shown in scan answers.
    #[arg(long)]
    pub reason: String,
    /// Lifetime, e.g. 30d, 12h [default: never expires].
    #[arg(long, value_name = "DURATION")]
    pub expires: Option<String>,
    /// Who asked for it [default: $SUDO_USER or $USER].
    #[arg(long)]
    pub author: Option<String>,
    /// Print the new entry as JSON.
    #[arg(long)]
    pub json: bool,
}

fn open(args: &StoreArgs) -> anyhow::Result<SqliteStore> {
    let overrides = Overrides {
        data_dir: args.data_dir.clone(),
        ..Default::default()
    };
    let config = Config::load(args.config.as_deref(), std::env::vars(), &overrides)?;
    Ok(SqliteStore::open(&config.data_dir)?)
}

/// The user running the CLI, for `author`.
fn user() -> String {
    ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "cli".into())
}

fn sha256_of(path: &PathBuf) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Runs a policy command; the exit code follows `main`'s convention
/// (2: invalid input, unknown id, an entry already in force).
pub fn run(args: PolicyArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("avgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(args.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("avgate: {e:#}");
            let usage = e
                .downcast_ref::<PolicyError>()
                .is_some_and(|p| !matches!(p, PolicyError::Store(_)))
                || e.downcast_ref::<crate::config::ConfigError>().is_some();
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

async fn add(kind: &str, value: String, entry: EntryArgs) -> anyhow::Result<()> {
    let store = open(&entry.store)?;
    let spec = PolicyOptions {
        kind: kind.into(),
        value,
        reason: entry.reason,
        expires: entry.expires,
        author: entry.author,
    }
    .validate(clock::now())
    .map_err(PolicyError::Invalid)?;
    let view = manage::add(&store, spec, &user(), &Actor::cli()).await?;
    let mut out = std::io::stdout().lock();
    if entry.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&view)?)?;
    } else {
        writeln!(
            out,
            "added {}: {} {}{}",
            view.id,
            view.kind,
            view.value,
            view.expires_at
                .as_deref()
                .map(|t| format!(" (until {t})"))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

async fn dispatch(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Ignore {
            action: IgnoreAction::Add { name, entry },
        } => add("ignore", name, entry).await,
        PolicyCommand::Allow {
            action:
                HashAction::Add {
                    sha256,
                    file,
                    entry,
                },
        } => {
            let value = match file {
                Some(path) => sha256_of(&path)?,
                None => sha256.unwrap_or_default(),
            };
            add("allow", value, entry).await
        }
        PolicyCommand::Block {
            action:
                HashAction::Add {
                    sha256,
                    file,
                    entry,
                },
        } => {
            let value = match file {
                Some(path) => sha256_of(&path)?,
                None => sha256.unwrap_or_default(),
            };
            add("block", value, entry).await
        }
        PolicyCommand::List { store, all, json } => {
            let store = open(&store)?;
            let entries = manage::list(&store, all).await?;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&entries)?)?;
            } else {
                write!(out, "{}", table(&entries))?;
            }
            Ok(())
        }
        PolicyCommand::Remove { store, id } => {
            let store = open(&store)?;
            let view = manage::remove(&store, id.trim(), &Actor::cli()).await?;
            writeln!(
                std::io::stdout().lock(),
                "removed {}: {} {}",
                view.id,
                view.kind,
                view.value
            )?;
            Ok(())
        }
    }
}

fn table(entries: &[PolicyView]) -> String {
    let header = [
        "ID", "KIND", "VALUE", "STATUS", "EXPIRES", "AUTHOR", "REASON",
    ];
    let rows: Vec<[String; 7]> = entries
        .iter()
        .map(|e| {
            [
                e.id.clone(),
                e.kind.to_string(),
                e.value.clone(),
                e.status.to_owned(),
                e.expires_at.clone().unwrap_or_else(|| "never".into()),
                e.author.clone(),
                e.reason.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
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
    for row in &rows {
        out.push_str(&line(row));
    }
    if rows.is_empty() {
        out.push_str("(no entries: avgate policy ignore|allow|block add ...)\n");
    }
    out
}
