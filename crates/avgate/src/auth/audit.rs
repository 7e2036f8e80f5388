//! The audit trail: token creation and revocation, policy entries added
//! and removed, admin API calls and refused authentications. Each event
//! goes to the store (`audit` table) and to the log as a JSON line with
//! target `audit`, so that it can be
//! filtered (`AVGATE_LOG=info,audit=info`) and shipped on its own.
//!
//! A token itself is never part of an event: its id is.

use crate::store::{clock, AuditRecord, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    TokenCreated,
    TokenRevoked,
    AdminCall,
    AuthRefused,
    PolicyAdded,
    PolicyRemoved,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::TokenCreated => "token_created",
            Event::TokenRevoked => "token_revoked",
            Event::AdminCall => "admin_call",
            Event::AuthRefused => "auth_refused",
            Event::PolicyAdded => "policy_added",
            Event::PolicyRemoved => "policy_removed",
        }
    }
}

/// One event, before it is written.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub token_id: Option<String>,
    /// A token id, `cli` or `bootstrap`.
    pub actor: Option<String>,
    pub client: Option<String>,
    pub detail: Option<String>,
}

/// Logs `event` and appends it to the store. A store failure is logged,
/// not returned: the operation it describes has already happened.
pub async fn record(store: &dyn Store, event: Event, entry: Entry) {
    let _ = record_first(store, event, entry).await;
}

/// [`record`] for an operation that has not happened yet and must not
/// happen unrecorded (an admin call): a store failure is returned too.
pub async fn record_first(store: &dyn Store, event: Event, entry: Entry) -> Result<(), StoreError> {
    let name = event.as_str();
    let token_id = entry.token_id.as_deref().unwrap_or("");
    let actor = entry.actor.as_deref().unwrap_or("");
    let client = entry.client.as_deref().unwrap_or("");
    let detail = entry.detail.as_deref().unwrap_or("");
    if event == Event::AuthRefused {
        tracing::warn!(target: "audit", event = name, token_id, actor, client, detail, "authentication refused");
    } else {
        tracing::info!(target: "audit", event = name, token_id, actor, client, detail, "{name}");
    }
    let record = AuditRecord {
        at: clock::now(),
        event: name.to_owned(),
        token_id: entry.token_id,
        actor: entry.actor,
        client: entry.client,
        detail: entry.detail,
    };
    let written = store.append_audit(&record).await;
    if let Err(e) = &written {
        tracing::error!(error = %e, event = name, "cannot write the audit trail");
    }
    written
}
