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
use crate::auth::manage::Actor;
use crate::cli::StoreArgs;
use crate::store::clock;

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
    /// Remove an entry (by id, pol_...): a running server drops it within
    /// `policy.refresh_interval` (2 s); a managed clamd, within its next
    /// reload (seconds; see docs/operations.md, "When a change applies").
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
    crate::cli::run_command(dispatch(args.command), |e| {
        e.downcast_ref::<PolicyError>()
            .is_some_and(|p| !matches!(p, PolicyError::Store(_)))
    })
}

async fn add(kind: &str, value: String, entry: EntryArgs) -> anyhow::Result<()> {
    let store = entry.store.open()?;
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

/// `allow add` and `block add`: the sha256 given, or the file's.
async fn add_hash(kind: &str, action: HashAction) -> anyhow::Result<()> {
    let HashAction::Add {
        sha256,
        file,
        entry,
    } = action;
    let value = match file {
        Some(path) => sha256_of(&path)?,
        None => sha256.unwrap_or_default(),
    };
    add(kind, value, entry).await
}

async fn dispatch(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Ignore {
            action: IgnoreAction::Add { name, entry },
        } => add("ignore", name, entry).await,
        PolicyCommand::Allow { action } => add_hash("allow", action).await,
        PolicyCommand::Block { action } => add_hash("block", action).await,
        PolicyCommand::List { store, all, json } => {
            let store = store.open_existing()?;
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
            let store = store.open_existing()?;
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
    crate::cli::table(
        header,
        &rows,
        "(no entries: avgate policy ignore|allow|block add ...)",
    )
}
