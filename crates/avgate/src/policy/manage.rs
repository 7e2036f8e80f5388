//! Policy management: the operations behind `avgate policy ...` and the
//! admin API, each audited. A running server notices a change through
//! the store's policy version (see [`super::runtime`]).

use serde::Serialize;

use super::{Kind, PolicyRecord, PolicySpec};
use crate::auth::audit::{self, Entry, Event};
use crate::auth::manage::Actor;
use crate::store::clock;
use crate::store::{Store, StoreError};

/// An entry as shown to people.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyView {
    pub id: String,
    pub kind: Kind,
    /// The signature name (ignore) or the sha256 (allow, block).
    pub value: String,
    pub reason: String,
    pub author: String,
    /// `active`, `expired` or `removed`.
    pub status: &'static str,
    pub created_at: String,
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_by: Option<String>,
}

impl PolicyView {
    pub fn of(r: &PolicyRecord, now: i64) -> PolicyView {
        PolicyView {
            id: r.id.clone(),
            kind: r.kind,
            value: r.value.clone(),
            reason: r.reason.clone(),
            author: r.author.clone(),
            status: r.status(now),
            created_at: clock::rfc3339(r.created_at),
            expires_at: r.expires_at.map(clock::rfc3339),
            removed_at: r.removed_at.map(clock::rfc3339),
            removed_by: r.removed_by.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Invalid(String),
    #[error("an entry of kind {kind} for {value} is already in force ({id}); remove it first")]
    Exists {
        kind: Kind,
        value: String,
        id: String,
    },
    #[error("no policy entry with id {0:?}")]
    NotFound(String),
    #[error("policy entry {0} was already removed")]
    AlreadyRemoved(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Adds an entry. `default_author` names the caller when the spec does
/// not (the admin token's name, the user running the CLI).
pub async fn add(
    store: &dyn Store,
    spec: PolicySpec,
    default_author: &str,
    actor: &Actor,
) -> Result<PolicyView, PolicyError> {
    let now = clock::now();
    let id = super::new_id()
        .map_err(|e| PolicyError::Store(StoreError::Backend(format!("no randomness: {e}"))))?;
    let record = PolicyRecord {
        id,
        kind: spec.kind,
        value: spec.value,
        reason: spec.reason,
        author: spec.author.unwrap_or_else(|| default_author.to_owned()),
        created_at: now,
        expires_at: spec.expires_at,
        removed_at: None,
        removed_by: None,
    };
    if !store.insert_policy(&record, now).await? {
        let existing = store
            .list_policy()
            .await?
            .into_iter()
            .find(|r| r.kind == record.kind && r.value == record.value && r.is_active(now))
            .map(|r| r.id)
            .unwrap_or_default();
        return Err(PolicyError::Exists {
            kind: record.kind,
            value: record.value,
            id: existing,
        });
    }
    audit::record(
        store,
        Event::PolicyAdded,
        Entry {
            token_id: None,
            actor: Some(actor.id.clone()),
            client: actor.client.clone(),
            detail: Some(format!(
                "{} {} {} expires={} author={:?} reason={:?}",
                record.id,
                record.kind,
                record.value,
                record
                    .expires_at
                    .map_or_else(|| "never".to_owned(), clock::rfc3339),
                record.author,
                record.reason,
            )),
        },
    )
    .await;
    Ok(PolicyView::of(&record, now))
}

/// Every entry (with `all`, removed and expired ones too), oldest first.
pub async fn list(store: &dyn Store, all: bool) -> Result<Vec<PolicyView>, PolicyError> {
    let now = clock::now();
    Ok(store
        .list_policy()
        .await?
        .iter()
        .filter(|r| all || r.is_active(now))
        .map(|r| PolicyView::of(r, now))
        .collect())
}

/// Removes an entry: it stops applying at once (the guard after the scan)
/// and in the managed clamd after its reload.
pub async fn remove(store: &dyn Store, id: &str, actor: &Actor) -> Result<PolicyView, PolicyError> {
    let now = clock::now();
    let found = store
        .list_policy()
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(|| PolicyError::NotFound(id.to_owned()))?;
    if !store.remove_policy(&found.id, now, &actor.id).await? {
        return Err(PolicyError::AlreadyRemoved(found.id));
    }
    audit::record(
        store,
        Event::PolicyRemoved,
        Entry {
            token_id: None,
            actor: Some(actor.id.clone()),
            client: actor.client.clone(),
            detail: Some(format!("{} {} {}", found.id, found.kind, found.value)),
        },
    )
    .await;
    let removed = PolicyRecord {
        removed_at: Some(now),
        removed_by: Some(actor.id.clone()),
        ..found
    };
    Ok(PolicyView::of(&removed, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyOptions;
    use crate::store::SqliteStore;

    fn spec(kind: &str, value: &str, expires: Option<&str>) -> PolicySpec {
        PolicyOptions {
            kind: kind.into(),
            value: value.into(),
            reason: "false positive, vendor ticket 7".into(),
            expires: expires.map(str::to_owned),
            author: None,
        }
        .validate(clock::now())
        .unwrap()
    }

    #[tokio::test]
    async fn entries_are_added_once_removed_once_versioned_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let cli = Actor::cli();
        assert_eq!(store.policy_version().await.unwrap(), 0);

        let added = add(&store, spec("ignore", "Win.Test.Fp-1", None), "alice", &cli)
            .await
            .unwrap();
        assert_eq!((added.author.as_str(), added.status), ("alice", "active"));
        assert_eq!(store.policy_version().await.unwrap(), 1);
        // The same value twice is refused, and changes nothing.
        let again = add(
            &store,
            spec("ignore", "Win.Test.Fp-1.UNOFFICIAL", None),
            "bob",
            &cli,
        )
        .await;
        assert!(
            matches!(&again, Err(PolicyError::Exists { id, .. }) if *id == added.id),
            "{again:?}"
        );
        assert_eq!(store.policy_version().await.unwrap(), 1);
        // Another kind with the same value is another entry.
        let sha = "a".repeat(64);
        add(&store, spec("allow", &sha, None), "alice", &cli)
            .await
            .unwrap();
        assert!(matches!(
            add(&store, spec("allow", &sha, None), "alice", &cli).await,
            Err(PolicyError::Exists { .. })
        ));
        add(&store, spec("block", &sha, Some("1h")), "alice", &cli)
            .await
            .unwrap();
        assert_eq!(list(&store, false).await.unwrap().len(), 3);

        let removed = remove(&store, &added.id, &cli).await.unwrap();
        assert_eq!(removed.status, "removed");
        assert_eq!(removed.removed_by.as_deref(), Some("cli"));
        assert!(matches!(
            remove(&store, &added.id, &cli).await,
            Err(PolicyError::AlreadyRemoved(_))
        ));
        assert!(matches!(
            remove(&store, "pol_nothing", &cli).await,
            Err(PolicyError::NotFound(_))
        ));
        assert_eq!(list(&store, false).await.unwrap().len(), 2);
        assert_eq!(list(&store, true).await.unwrap().len(), 3);
        // Removed: the value may be added again.
        add(&store, spec("ignore", "Win.Test.Fp-1", None), "alice", &cli)
            .await
            .unwrap();

        let events: Vec<String> = store
            .recent_audit(10)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.event)
            .collect();
        assert_eq!(
            events,
            [
                "policy_added",
                "policy_removed",
                "policy_added",
                "policy_added",
                "policy_added"
            ]
        );
    }

    #[tokio::test]
    async fn an_expired_entry_does_not_block_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let now = clock::now();
        let old = PolicyRecord {
            id: "pol_old".into(),
            kind: Kind::Block,
            value: "c".repeat(64),
            reason: "r".into(),
            author: "a".into(),
            created_at: now - 100,
            expires_at: Some(now - 10),
            removed_at: None,
            removed_by: None,
        };
        assert!(store.insert_policy(&old, now - 100).await.unwrap());
        let view = add(
            &store,
            spec("block", &"c".repeat(64), None),
            "a",
            &Actor::cli(),
        )
        .await
        .unwrap();
        assert_eq!(view.status, "active");
        let all = list(&store, true).await.unwrap();
        assert_eq!(all[0].status, "expired");
    }
}
