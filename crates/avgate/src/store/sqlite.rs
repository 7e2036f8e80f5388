//! The embedded store: one SQLite file, `data_dir/avgate.db`.
//!
//! - Owner-only: the directory is created 0700, the file 0600 (and put
//!   back to 0600 if it was looser); SQLite gives its `-wal` and `-shm`
//!   files the database's mode.
//! - Migrations are numbered from 1 and recorded in `PRAGMA user_version`;
//!   each runs in an immediate transaction, so two processes opening the
//!   same file at once (the CLI while the server runs) do not race.
//! - One connection behind a mutex; every statement is short and runs on
//!   the blocking pool, never on an async worker.
//! - Every operation waits at most [`LOCK_WAIT`] in all, for the mutex and
//!   for SQLite's lock together. With a busy timeout per statement alone,
//!   operations queued behind the mutex while another process held the
//!   file's write lock would each wait it in turn: the hundredth request
//!   would be answered after a hundred timeouts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};

use super::clock::Month;
use super::{AuditRecord, Store, StoreError, TokenRecord, Usage, UsageDelta};
use crate::auth::token::TokenHash;
use crate::auth::{RateSpec, Scope};
use crate::policy::{Kind, PolicyRecord};

pub const FILE_NAME: &str = "avgate.db";

/// The longest an operation waits for the store, queued behind others or
/// for another process's write lock (`avgate token create` holds it for
/// milliseconds). Past it the operation fails, and a request that needed
/// it gets `503 store_unavailable`.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The schema, one step per version. Never edit a released step: add one.
const MIGRATIONS: &[&str] = &[
    // 1: tokens, monthly usage, audit trail.
    "CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        hash BLOB NOT NULL UNIQUE,
        scope TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        revoked_at INTEGER,
        rate_per_second REAL,
        rate_burst INTEGER,
        allow_ips TEXT NOT NULL DEFAULT '',
        monthly_files INTEGER,
        monthly_bytes INTEGER,
        max_concurrent INTEGER
    );
    CREATE UNIQUE INDEX tokens_active_name ON tokens(name) WHERE revoked_at IS NULL;
    CREATE TABLE usage (
        token_id TEXT NOT NULL REFERENCES tokens(id),
        month TEXT NOT NULL,
        files INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (token_id, month)
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        event TEXT NOT NULL,
        token_id TEXT,
        actor TEXT,
        client TEXT,
        detail TEXT
    );
    CREATE INDEX audit_at ON audit(at);",
    // 2: the false-positive policy (ignore, allow, block) and its version
    // counter, which running servers poll.
    "CREATE TABLE policy (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        reason TEXT NOT NULL,
        author TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        removed_at INTEGER,
        removed_by TEXT
    );
    CREATE INDEX policy_kind_value ON policy(kind, value);
    CREATE TABLE policy_version (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    );
    INSERT INTO policy_version (id, version) VALUES (1, 0);",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

const TOKEN_COLUMNS: &str = "id, name, hash, scope, created_at, expires_at, revoked_at, \
     rate_per_second, rate_burst, allow_ips, monthly_files, monthly_bytes, max_concurrent";

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<tokio::sync::Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `data_dir/avgate.db` and brings its
    /// schema up to date. Blocking: call it at start-up or from
    /// `spawn_blocking`.
    pub fn open(data_dir: &Path) -> Result<SqliteStore, StoreError> {
        let path = data_dir.join(FILE_NAME);
        let open_err = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        create_private_dir(data_dir).map_err(|e| open_err(e.to_string()))?;
        create_private_file(&path).map_err(|e| open_err(e.to_string()))?;
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_err(e.to_string()))?;
        conn.busy_timeout(LOCK_WAIT)
            .map_err(|e| open_err(e.to_string()))?;
        // WAL: readers (the CLI, `token usage`) do not block the writer, and
        // a commit appends to the log instead of rewriting pages.
        // synchronous = NORMAL: in WAL mode a commit is then not fsynced
        // (only checkpoints are), which makes a write a fraction of the cost.
        // A commit still survives the process crashing or being killed; only
        // an OS crash or power loss can lose the last commits (never corrupt
        // the file), an acceptable risk for usage counters and the audit
        // trail. It is a per-connection setting, hence set on every open.
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .map_err(|e| open_err(e.to_string()))?;
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(|e| open_err(e.to_string()))?;
        // Every statement is prepared once per connection (prepare_cached);
        // room for all of them.
        conn.set_prepared_statement_cache_capacity(64);
        migrate(&mut conn, &path)?;
        Ok(SqliteStore {
            conn: Arc::new(tokio::sync::Mutex::new(conn)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection, on the blocking pool, waiting at most
    /// [`LOCK_WAIT`] in all for the connection and SQLite's lock.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let deadline = Instant::now() + LOCK_WAIT;
        let busy = || {
            StoreError::Backend(format!(
                "the state store stayed locked for {} s (another process holding a write transaction on {}?)",
                LOCK_WAIT.as_secs(),
                self.path.display()
            ))
        };
        let mut conn = tokio::time::timeout(LOCK_WAIT, self.conn.clone().lock_owned())
            .await
            .map_err(|_| busy())?;
        let task = tokio::task::spawn_blocking(move || {
            // What is left of this operation's wait, for SQLite's lock. At
            // least a millisecond: 0 would turn the timeout off.
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            conn.busy_timeout(left).map_err(backend)?;
            f(&mut conn)
        });
        task.await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Applies the migrations the file does not have yet.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    let version: u32 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(backend)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.display().to_string(),
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(step).map_err(backend)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)
            .map_err(backend)?;
        tracing::info!(path = %path.display(), version = i + 1, "state store migrated");
    }
    tx.commit().map_err(backend)
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    } else if std::fs::metadata(dir)?.permissions().mode() & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), "the data directory is readable by others; avgate.db itself is owner-only");
    }
    Ok(())
}

/// Creates the file 0600 if it does not exist; tightens it if it does.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            for suffix in ["", "-wal", "-shm"] {
                let file = PathBuf::from(format!("{}{suffix}", path.display()));
                if let Ok(meta) = std::fs::metadata(&file) {
                    if meta.permissions().mode() & 0o077 != 0 {
                        tracing::warn!(path = %file.display(), "the state store was readable by others; made owner-only");
                        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
                    }
                }
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn token_from_row(row: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    let hash: Vec<u8> = row.get(2)?;
    let hash: [u8; 32] = hash.try_into().map_err(|_| bad_column(2, "hash"))?;
    let scope: String = row.get(3)?;
    let scope = scope.parse::<Scope>().map_err(|_| bad_column(3, "scope"))?;
    let per_second: Option<f64> = row.get(7)?;
    let burst: Option<u32> = row.get(8)?;
    let allow_ips: String = row.get(9)?;
    let allow_ips = allow_ips
        .split_whitespace()
        .map(|s| s.parse())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad_column(9, "allow_ips"))?;
    Ok(TokenRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        hash: TokenHash(hash),
        scope,
        created_at: row.get(4)?,
        expires_at: row.get(5)?,
        revoked_at: row.get(6)?,
        rate: per_second
            .zip(burst)
            .map(|(per_second, burst)| RateSpec { per_second, burst }),
        allow_ips,
        monthly_files: row.get::<_, Option<i64>>(10)?.map(|n| n as u64),
        monthly_bytes: row.get::<_, Option<i64>>(11)?.map(|n| n as u64),
        max_concurrent: row.get::<_, Option<i64>>(12)?.map(|n| n as usize),
    })
}

fn bad_column(i: usize, name: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        i,
        rusqlite::types::Type::Text,
        format!("invalid {name} in the tokens table").into(),
    )
}

const POLICY_COLUMNS: &str =
    "id, kind, value, reason, author, created_at, expires_at, removed_at, removed_by";

fn policy_from_row(row: &Row<'_>) -> rusqlite::Result<PolicyRecord> {
    let kind: String = row.get(1)?;
    let kind = kind.parse::<Kind>().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            1,
            rusqlite::types::Type::Text,
            "invalid kind in the policy table".into(),
        )
    })?;
    Ok(PolicyRecord {
        id: row.get(0)?,
        kind,
        value: row.get(2)?,
        reason: row.get(3)?,
        author: row.get(4)?,
        created_at: row.get(5)?,
        expires_at: row.get(6)?,
        removed_at: row.get(7)?,
        removed_by: row.get(8)?,
    })
}

fn bump_policy_version(conn: &Connection) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE policy_version SET version = version + 1 WHERE id = 1")
        .and_then(|mut stmt| stmt.execute([]))
        .map(drop)
}

fn audit_from_row(row: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        at: row.get(0)?,
        event: row.get(1)?,
        token_id: row.get(2)?,
        actor: row.get(3)?,
        client: row.get(4)?,
        detail: row.get(5)?,
    })
}

/// SQLite integers are signed; counters and limits never get near 2^63.
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Adds files (?3) and bytes (?4) to a token's month (?1, ?2).
const ADD_USAGE: &str =
    "INSERT INTO usage (token_id, month, files, bytes) VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (token_id, month) DO UPDATE \
     SET files = files + excluded.files, bytes = bytes + excluded.bytes";

#[async_trait]
impl Store for SqliteStore {
    async fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let t = token.clone();
        self.call(move |conn| {
            let allow_ips: Vec<String> = t.allow_ips.iter().map(|n| n.to_string()).collect();
            let sql = format!(
                "INSERT INTO tokens ({TOKEN_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            );
            let result = conn.prepare_cached(&sql).and_then(|mut stmt| {
                stmt.execute(params![
                    t.id,
                    t.name,
                    t.hash.0.as_slice(),
                    t.scope.as_str(),
                    t.created_at,
                    t.expires_at,
                    t.revoked_at,
                    t.rate.map(|r| r.per_second),
                    t.rate.map(|r| r.burst),
                    allow_ips.join(" "),
                    t.monthly_files.map(int),
                    t.monthly_bytes.map(int),
                    t.max_concurrent.map(|n| n as i64),
                ])
            });
            match result {
                Ok(_) => Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(StoreError::NameTaken(t.name.clone()))
                }
                Err(e) => Err(backend(e)),
            }
        })
        .await
    }

    async fn token_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        let hash = *hash;
        self.call(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"
            ))
            .and_then(|mut stmt| stmt.query_row([hash.0.as_slice()], token_from_row))
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn find_token(&self, id_or_name: &str) -> Result<Option<TokenRecord>, StoreError> {
        let key = id_or_name.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1 OR name = ?1 \
                 ORDER BY id = ?1 DESC, revoked_at IS NULL DESC, created_at DESC LIMIT 1"
            ))
            .and_then(|mut stmt| stmt.query_row([key], token_from_row))
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, rowid"
                ))
                .map_err(backend)?;
            let rows = stmt.query_map([], token_from_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn token_count(&self) -> Result<u64, StoreError> {
        self.call(|conn| {
            conn.prepare_cached("SELECT COUNT(*) FROM tokens")
                .and_then(|mut stmt| stmt.query_row([], |r| r.get::<_, i64>(0)))
                .map(|n| n as u64)
                .map_err(backend)
        })
        .await
    }

    async fn revoke_token(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(
                "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            )
            .and_then(|mut stmt| stmt.execute(params![id, at]))
            .map(|n| n == 1)
            .map_err(backend)
        })
        .await
    }

    async fn usage(&self, token_id: &str, month: Month) -> Result<Usage, StoreError> {
        let id = token_id.to_owned();
        self.call(move |conn| {
            conn.prepare_cached("SELECT files, bytes FROM usage WHERE token_id = ?1 AND month = ?2")
                .and_then(|mut stmt| {
                    stmt.query_row(params![id, month.to_string()], |r| {
                        Ok(Usage {
                            files: r.get::<_, i64>(0)? as u64,
                            bytes: r.get::<_, i64>(1)? as u64,
                        })
                    })
                })
                .optional()
                .map(Option::unwrap_or_default)
                .map_err(backend)
        })
        .await
    }

    async fn reserve_file(
        &self,
        token_id: &str,
        month: Month,
        limit: Option<u64>,
    ) -> Result<bool, StoreError> {
        let id = token_id.to_owned();
        self.call(move |conn| {
            // One statement, so one write transaction: the check and the
            // increment cannot be split by another request, in this process
            // or another. A first file of the month inserts the row (when
            // the limit lets it), later ones update it (while below the
            // limit); either way one row changes exactly when it is granted.
            conn.prepare_cached(
                "INSERT INTO usage (token_id, month, files) \
                 SELECT ?1, ?2, 1 WHERE ?3 IS NULL OR ?3 > 0 \
                 ON CONFLICT (token_id, month) DO UPDATE SET files = files + 1 \
                 WHERE ?3 IS NULL OR files < ?3",
            )
            .and_then(|mut stmt| stmt.execute(params![id, month.to_string(), limit.map(int)]))
            .map(|n| n == 1)
            .map_err(backend)
        })
        .await
    }

    async fn release_file(&self, token_id: &str, month: Month) -> Result<(), StoreError> {
        let id = token_id.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(
                "UPDATE usage SET files = files - 1 WHERE token_id = ?1 AND month = ?2 AND files > 0",
            )
            .and_then(|mut stmt| stmt.execute(params![id, month.to_string()]))
            .map(drop)
            .map_err(backend)
        })
        .await
    }

    async fn add_bytes(&self, token_id: &str, month: Month, bytes: u64) -> Result<(), StoreError> {
        let id = token_id.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(ADD_USAGE)
                .and_then(|mut stmt| stmt.execute(params![id, month.to_string(), 0, int(bytes)]))
                .map(drop)
                .map_err(backend)
        })
        .await
    }

    async fn reserve_bytes(
        &self,
        token_id: &str,
        month: Month,
        bytes: u64,
        limit: u64,
    ) -> Result<bool, StoreError> {
        let id = token_id.to_owned();
        self.call(move |conn| {
            // One statement, as for files: the check and the increment
            // cannot be split by another request, here or in another process.
            conn.prepare_cached(
                "INSERT INTO usage (token_id, month, files, bytes) \
                 SELECT ?1, ?2, 0, ?3 WHERE ?3 <= ?4 \
                 ON CONFLICT (token_id, month) DO UPDATE SET bytes = bytes + ?3 \
                 WHERE bytes + ?3 <= ?4",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![id, month.to_string(), int(bytes), int(limit)])
            })
            .map(|n| n == 1)
            .map_err(backend)
        })
        .await
    }

    async fn release_bytes(
        &self,
        token_id: &str,
        month: Month,
        bytes: u64,
    ) -> Result<(), StoreError> {
        let id = token_id.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(
                "UPDATE usage SET bytes = MAX(bytes - ?3, 0) WHERE token_id = ?1 AND month = ?2",
            )
            .and_then(|mut stmt| stmt.execute(params![id, month.to_string(), int(bytes)]))
            .map(drop)
            .map_err(backend)
        })
        .await
    }

    async fn add_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let batch = batch.to_vec();
        self.call(move |conn| {
            // One transaction for the whole batch: one commit, and no
            // half-applied batch if it fails (the caller keeps it to retry).
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            {
                let mut stmt = tx.prepare_cached(ADD_USAGE).map_err(backend)?;
                for d in &batch {
                    stmt.execute(params![
                        d.token_id,
                        d.month.to_string(),
                        int(d.usage.files),
                        int(d.usage.bytes)
                    ])
                    .map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn append_audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let r = record.clone();
        self.call(move |conn| {
            conn.prepare_cached(
                "INSERT INTO audit (at, event, token_id, actor, client, detail) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    r.at, r.event, r.token_id, r.actor, r.client, r.detail
                ])
            })
            .map(drop)
            .map_err(backend)
        })
        .await
    }

    async fn recent_audit(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.call(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT at, event, token_id, actor, client, detail FROM audit \
                     ORDER BY id DESC LIMIT ?1",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([limit as i64], audit_from_row)
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn insert_policy(&self, entry: &PolicyRecord, now: i64) -> Result<bool, StoreError> {
        let e = entry.clone();
        self.call(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            // One statement: the check for a live duplicate and the insert
            // cannot be split by another writer.
            let inserted = tx
                .prepare_cached(&format!(
                    "INSERT INTO policy ({POLICY_COLUMNS}) \
                         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, NULL \
                         WHERE NOT EXISTS (SELECT 1 FROM policy WHERE kind = ?2 AND value = ?3 \
                         AND removed_at IS NULL AND (expires_at IS NULL OR expires_at > ?8))"
                ))
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        e.id,
                        e.kind.as_str(),
                        e.value,
                        e.reason,
                        e.author,
                        e.created_at,
                        e.expires_at,
                        now
                    ])
                })
                .map_err(backend)?
                == 1;
            if inserted {
                bump_policy_version(&tx).map_err(backend)?;
            }
            tx.commit().map_err(backend)?;
            Ok(inserted)
        })
        .await
    }

    async fn list_policy(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {POLICY_COLUMNS} FROM policy ORDER BY created_at, rowid"
                ))
                .map_err(backend)?;
            let rows = stmt.query_map([], policy_from_row).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn remove_policy(&self, id: &str, at: i64, by: &str) -> Result<bool, StoreError> {
        let (id, by) = (id.to_owned(), by.to_owned());
        self.call(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let removed = tx
                .prepare_cached(
                    "UPDATE policy SET removed_at = ?2, removed_by = ?3 \
                     WHERE id = ?1 AND removed_at IS NULL",
                )
                .and_then(|mut stmt| stmt.execute(params![id, at, by]))
                .map_err(backend)?
                == 1;
            if removed {
                bump_policy_version(&tx).map_err(backend)?;
            }
            tx.commit().map_err(backend)?;
            Ok(removed)
        })
        .await
    }

    async fn policy_version(&self) -> Result<u64, StoreError> {
        self.call(|conn| {
            conn.prepare_cached("SELECT version FROM policy_version WHERE id = 1")
                .and_then(|mut stmt| stmt.query_row([], |r| r.get::<_, i64>(0)))
                .map(|n| n as u64)
                .map_err(backend)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::auth::token::Token;

    fn record(name: &str) -> TokenRecord {
        TokenRecord {
            id: crate::auth::token::new_id().unwrap(),
            name: name.into(),
            hash: Token::generate().unwrap().hash(),
            scope: Scope::Scan,
            created_at: 1_000,
            expires_at: None,
            revoked_at: None,
            rate: Some(RateSpec {
                per_second: 2.5,
                burst: 5,
            }),
            allow_ips: vec![
                "203.0.113.0/24".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            monthly_files: Some(3),
            monthly_bytes: None,
            max_concurrent: Some(2),
        }
    }

    #[test]
    fn a_new_store_is_owner_only_and_at_the_latest_schema() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = SqliteStore::open(&data).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(store.path()), 0o600);
        for suffix in ["-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{suffix}", store.path().display()));
            if p.exists() {
                assert_eq!(mode(&p), 0o600, "{}", p.display());
            }
        }
        let version: u32 = store
            .conn
            .try_lock()
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(store);

        // Reopening migrates nothing and keeps the data; a loosened file is
        // tightened again.
        std::fs::set_permissions(data.join(FILE_NAME), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        SqliteStore::open(&data).unwrap();
        assert_eq!(mode(&data.join(FILE_NAME)), 0o600);
    }

    #[test]
    fn a_schema_from_a_newer_avgate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let err = SqliteStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { .. }), "{err}");
    }

    #[test]
    fn migrations_apply_one_step_at_a_time_from_version_0() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn, &path).unwrap();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for t in ["audit", "tokens", "usage"] {
            assert!(tables.iter().any(|n| n == t), "{tables:?}");
        }
        // Idempotent.
        migrate(&mut conn, &path).unwrap();
    }

    #[tokio::test]
    async fn tokens_round_trip_and_names_are_unique_among_live_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let a = record("partner-a");
        store.insert_token(&a).await.unwrap();
        assert_eq!(store.token_by_hash(&a.hash).await.unwrap(), Some(a.clone()));
        assert_eq!(store.find_token(&a.id).await.unwrap(), Some(a.clone()));
        assert_eq!(
            store.find_token("partner-a").await.unwrap(),
            Some(a.clone())
        );
        let again = record("partner-a");
        assert!(matches!(
            store.insert_token(&again).await,
            Err(StoreError::NameTaken(_))
        ));
        assert!(store.revoke_token(&a.id, 2_000).await.unwrap());
        assert!(!store.revoke_token(&a.id, 3_000).await.unwrap());
        // The name is free again once revoked; by name, the live one wins.
        store.insert_token(&again).await.unwrap();
        assert_eq!(
            store.find_token("partner-a").await.unwrap().unwrap().id,
            again.id
        );
        assert_eq!(store.token_count().await.unwrap(), 2);
        let listed = store.list_tokens().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].revoked_at, Some(2_000));
    }

    #[tokio::test]
    async fn file_reservations_stop_at_exactly_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let t = record("counted");
        store.insert_token(&t).await.unwrap();
        let month: Month = "2026-11".parse().unwrap();
        let mut granted = 0;
        for _ in 0..10 {
            if store.reserve_file(&t.id, month, Some(3)).await.unwrap() {
                granted += 1;
            }
        }
        assert_eq!(granted, 3);
        store.release_file(&t.id, month).await.unwrap();
        assert!(store.reserve_file(&t.id, month, Some(3)).await.unwrap());
        store.add_bytes(&t.id, month, 100).await.unwrap();
        store.add_bytes(&t.id, month, 23).await.unwrap();
        assert_eq!(
            store.usage(&t.id, month).await.unwrap(),
            Usage {
                files: 3,
                bytes: 123
            }
        );
        let other: Month = "2026-12".parse().unwrap();
        assert_eq!(store.usage(&t.id, other).await.unwrap(), Usage::default());
        assert!(store.reserve_file(&t.id, other, None).await.unwrap());
    }

    #[tokio::test]
    async fn audit_records_are_kept_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        for event in ["token_created", "auth_refused"] {
            store
                .append_audit(&AuditRecord {
                    at: 5,
                    event: event.into(),
                    token_id: None,
                    actor: Some("cli".into()),
                    client: None,
                    detail: None,
                })
                .await
                .unwrap();
        }
        let recent = store.recent_audit(10).await.unwrap();
        assert_eq!(recent.len(), 2);
        assert_eq!(recent[0].event, "auth_refused");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reservations_from_two_connections_stop_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        // Two connections to one file, as a server and the CLI (or two
        // servers) have.
        let a = SqliteStore::open(dir.path()).unwrap();
        let b = SqliteStore::open(dir.path()).unwrap();
        let t = record("raced");
        a.insert_token(&t).await.unwrap();
        let month: Month = "2026-11".parse().unwrap();
        let tries = (0..60).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let id = t.id.clone();
            tokio::spawn(async move { store.reserve_file(&id, month, Some(17)).await.unwrap() })
        });
        let mut granted = 0;
        for task in tries.collect::<Vec<_>>() {
            granted += usize::from(task.await.unwrap());
        }
        assert_eq!(granted, 17);
        assert_eq!(a.usage(&t.id, month).await.unwrap().files, 17);
        // A limit of 0 grants nothing, not even the first file.
        let other: Month = "2026-12".parse().unwrap();
        assert!(!a.reserve_file(&t.id, other, Some(0)).await.unwrap());
        assert_eq!(a.usage(&t.id, other).await.unwrap(), Usage::default());
    }

    #[tokio::test]
    async fn usage_batches_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (x, y) = (record("x"), record("y"));
        store.insert_token(&x).await.unwrap();
        store.insert_token(&y).await.unwrap();
        let month: Month = "2026-11".parse().unwrap();
        store.add_bytes(&x.id, month, 5).await.unwrap();
        let delta = |t: &TokenRecord, files, bytes| UsageDelta {
            token_id: t.id.clone(),
            month,
            usage: Usage { files, bytes },
        };
        store
            .add_usage(&[delta(&x, 2, 10), delta(&y, 1, 1)])
            .await
            .unwrap();
        store.add_usage(&[delta(&x, 1, 1)]).await.unwrap();
        store.add_usage(&[]).await.unwrap();
        assert_eq!(
            store.usage(&x.id, month).await.unwrap(),
            Usage {
                files: 3,
                bytes: 16
            }
        );
        assert_eq!(
            store.usage(&y.id, month).await.unwrap(),
            Usage { files: 1, bytes: 1 }
        );
    }
}
