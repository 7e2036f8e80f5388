//! The state that outlives a request: tokens, usage counters, the audit
//! trail.
//!
//! [`Store`] is the interface; [`sqlite::SqliteStore`] is the embedded
//! implementation (`data_dir/avgate.db`). A shared backend for several
//! hosts (Redis, a SQL server) implements the same trait. Every method is
//! one short operation, and the ones that count ([`Store::reserve_file`])
//! are atomic, so that a quota holds under concurrent requests.

pub mod clock;
pub mod sqlite;

use async_trait::async_trait;
use ipnet::IpNet;

use crate::auth::token::TokenHash;
use crate::auth::{RateSpec, Scope};
use crate::policy::PolicyRecord;
use clock::Month;

pub use sqlite::SqliteStore;

/// A token as stored: everything but the token itself.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    /// `tok_...`: public, used in logs, URLs and the CLI.
    pub id: String,
    /// Unique among tokens that are not revoked.
    pub name: String,
    pub hash: TokenHash,
    pub scope: Scope,
    /// Unix seconds.
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub rate: Option<RateSpec>,
    pub allow_ips: Vec<IpNet>,
    pub monthly_files: Option<u64>,
    pub monthly_bytes: Option<u64>,
    pub max_concurrent: Option<usize>,
}

impl TokenRecord {
    /// A live `scan` token with no limits, for unit tests.
    #[cfg(test)]
    pub(crate) fn plain(id: &str, name: &str, hash: TokenHash) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            name: name.into(),
            hash,
            scope: Scope::Scan,
            created_at: 0,
            expires_at: None,
            revoked_at: None,
            rate: None,
            allow_ips: vec![],
            monthly_files: None,
            monthly_bytes: None,
            max_concurrent: None,
        }
    }

    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// `active`, `revoked` or `expired`.
    pub fn status(&self, now: i64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.is_expired(now) {
            "expired"
        } else {
            "active"
        }
    }
}

/// One token's use in one month.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub files: u64,
    pub bytes: u64,
}

/// Use counted in memory (tokens without quotas), to be added to one
/// token's month by [`Store::add_usage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    pub token_id: String,
    pub month: Month,
    pub usage: Usage,
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Unix seconds.
    pub at: i64,
    /// `token_created`, `token_revoked`, `admin_call`, `auth_refused`.
    pub event: String,
    /// The token concerned, when known.
    pub token_id: Option<String>,
    /// Who did it: a token id, `cli` or `bootstrap`.
    pub actor: Option<String>,
    /// The client address, for requests.
    pub client: Option<String>,
    /// Free text: a refusal reason, a route.
    pub detail: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("a token named {0:?} already exists")]
    NameTaken(String),
    #[error("{path} has schema version {found}; this avgate knows up to {known} (was it created by a newer avgate?)")]
    TooNew {
        path: String,
        found: u32,
        known: u32,
    },
    #[error("cannot open the state store {path}: {message}")]
    Open { path: String, message: String },
    #[error("the state store failed: {0}")]
    Backend(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Fails with [`StoreError::NameTaken`] when an unrevoked token has the
    /// same name.
    async fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError>;

    /// The token with this hash, revoked and expired ones included.
    async fn token_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError>;

    /// By id, else the unrevoked token of that name, else the newest
    /// revoked one of that name.
    async fn find_token(&self, id_or_name: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// Every token, oldest first.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// How many tokens were ever created (revoked ones count).
    async fn token_count(&self) -> Result<u64, StoreError>;

    /// Marks a token revoked; false when it does not exist or already was.
    async fn revoke_token(&self, id: &str, at: i64) -> Result<bool, StoreError>;

    async fn usage(&self, token_id: &str, month: Month) -> Result<Usage, StoreError>;

    /// Counts one file against `month`, atomically, unless that would take
    /// the count past `limit`: then nothing changes and the answer is false.
    async fn reserve_file(
        &self,
        token_id: &str,
        month: Month,
        limit: Option<u64>,
    ) -> Result<bool, StoreError>;

    /// Gives back a file reserved with [`Store::reserve_file`] that was not
    /// scanned after all.
    async fn release_file(&self, token_id: &str, month: Month) -> Result<(), StoreError>;

    async fn add_bytes(&self, token_id: &str, month: Month, bytes: u64) -> Result<(), StoreError>;

    /// Counts `bytes` against `month`, atomically, unless that would take
    /// the count past `limit`: then nothing changes and the answer is false.
    async fn reserve_bytes(
        &self,
        token_id: &str,
        month: Month,
        bytes: u64,
        limit: u64,
    ) -> Result<bool, StoreError>;

    /// Gives back bytes reserved with [`Store::reserve_bytes`] that were not
    /// scanned after all.
    async fn release_bytes(
        &self,
        token_id: &str,
        month: Month,
        bytes: u64,
    ) -> Result<(), StoreError>;

    /// Adds files and bytes that were counted elsewhere (in memory, for
    /// tokens that have no quota to check) to each token's month: the
    /// whole batch atomically, all of it or none.
    async fn add_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError>;

    async fn append_audit(&self, record: &AuditRecord) -> Result<(), StoreError>;

    /// The newest `limit` audit records, newest first.
    async fn recent_audit(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;

    /// Adds a policy entry, atomically unless one of the same kind and
    /// value is in force at `now` (not removed, not expired): then nothing
    /// changes and the answer is false. Bumps the policy version.
    async fn insert_policy(&self, entry: &PolicyRecord, now: i64) -> Result<bool, StoreError>;

    /// Every policy entry, removed and expired ones included, oldest first.
    async fn list_policy(&self) -> Result<Vec<PolicyRecord>, StoreError>;

    /// Marks an entry removed; false when there is none or it already was.
    /// Bumps the policy version.
    async fn remove_policy(&self, id: &str, at: i64, by: &str) -> Result<bool, StoreError>;

    /// A counter that every policy change increments: servers poll it to
    /// notice changes made elsewhere (the CLI, another host).
    async fn policy_version(&self) -> Result<u64, StoreError>;
}
