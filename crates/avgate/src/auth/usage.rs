//! Use of tokens that have no quota, counted in memory and written to the
//! store in batches.
//!
//! A token with a monthly quota is counted in the store before each file
//! (an atomic reservation, see [`super::quota`]), because the count decides
//! who may scan, here and in other processes. A token without one decides
//! nothing with its count: it only has to reach the store, for `avgate
//! token usage` and the admin API. Those scans are added up here and written
//! every [`FLUSH_INTERVAL`] in one transaction, and once more when the
//! server stops (after the last request is answered), so a clean shutdown
//! loses nothing. What a crash can lose is at most the last interval's
//! counts of quota-free tokens.
//!
//! The admin API's usage answer flushes first, so within this process it
//! is exact; another process (the CLI) sees the counts up to
//! [`FLUSH_INTERVAL`] late.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Auth;
use crate::store::clock::Month;
use crate::store::{Store, StoreError, Usage, UsageDelta};

/// How often counted use is written to the store.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Use counted and not yet written.
#[derive(Default)]
pub struct UsageBuffer {
    /// By month, then token id.
    pending: Mutex<HashMap<Month, HashMap<String, Usage>>>,
    /// One flush at a time: when a flush returns, everything counted
    /// before it was called is in the store (or is pending again, on error).
    flushing: tokio::sync::Mutex<()>,
}

impl UsageBuffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Month, HashMap<String, Usage>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `files` and `bytes` for a token's month.
    pub fn add(&self, token_id: &str, month: Month, files: u64, bytes: u64) {
        let mut pending = self.lock();
        let tokens = pending.entry(month).or_default();
        let usage = match tokens.get_mut(token_id) {
            Some(usage) => usage,
            None => tokens.entry(token_id.to_owned()).or_default(),
        };
        usage.files = usage.files.saturating_add(files);
        usage.bytes = usage.bytes.saturating_add(bytes);
    }

    /// What is counted and not written yet.
    pub fn pending(&self, token_id: &str, month: Month) -> Usage {
        self.lock()
            .get(&month)
            .and_then(|tokens| tokens.get(token_id))
            .copied()
            .unwrap_or_default()
    }

    fn take(&self) -> Vec<UsageDelta> {
        std::mem::take(&mut *self.lock())
            .into_iter()
            .flat_map(|(month, tokens)| {
                tokens.into_iter().map(move |(token_id, usage)| UsageDelta {
                    token_id,
                    month,
                    usage,
                })
            })
            .collect()
    }

    /// Writes everything counted so far. On failure the counts stay
    /// pending, for the next flush.
    pub async fn flush(&self, store: &dyn Store) -> Result<(), StoreError> {
        let _one_at_a_time = self.flushing.lock().await;
        let batch = self.take();
        if batch.is_empty() {
            return Ok(());
        }
        if let Err(e) = store.add_usage(&batch).await {
            for d in batch {
                self.add(&d.token_id, d.month, d.usage.files, d.usage.bytes);
            }
            return Err(e);
        }
        Ok(())
    }
}

impl Auth {
    /// Writes the use counted in memory to the store. It runs as a task of
    /// its own: a caller that goes away (a client that hangs up) cannot
    /// stop it half-way.
    pub async fn flush_usage(&self) -> Result<(), StoreError> {
        let (usage, store) = (self.usage.clone(), self.store.clone());
        tokio::spawn(async move { usage.flush(store.as_ref()).await })
            .await
            .map_err(|e| StoreError::Backend(format!("usage flush task failed: {e}")))?
    }

    /// Flushes every `interval` until `stop`. The last flush, once the
    /// server has answered its last request, is the caller's
    /// ([`Auth::flush_usage`]).
    pub async fn flush_usage_every(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            match self.flush_usage().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("token usage is written to the state store again");
                }
                Ok(()) => {}
                Err(e) => {
                    // Once per outage; the counts are kept meanwhile.
                    if !failing {
                        tracing::error!(error = %e, "cannot write token usage to the state store; will retry");
                    }
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn token(id: &str, name: &str) -> crate::store::TokenRecord {
        let hash = crate::auth::token::Token::generate().unwrap().hash();
        crate::store::TokenRecord::plain(id, name, hash)
    }

    fn month(s: &str) -> Month {
        s.parse().unwrap()
    }

    #[test]
    fn counts_add_up_per_token_and_month() {
        let b = UsageBuffer::default();
        b.add("tok_a", month("2026-11"), 1, 10);
        b.add("tok_a", month("2026-11"), 1, 5);
        b.add("tok_a", month("2026-12"), 1, 1);
        b.add("tok_b", month("2026-11"), 2, 0);
        assert_eq!(
            b.pending("tok_a", month("2026-11")),
            Usage {
                files: 2,
                bytes: 15
            }
        );
        let mut batch = b.take();
        batch.sort_by(|x, y| (&x.token_id, x.month).cmp(&(&y.token_id, y.month)));
        assert_eq!(batch.len(), 3);
        assert_eq!(batch[0].usage.bytes, 15);
        assert!(b.take().is_empty(), "taken once");
    }

    #[tokio::test]
    async fn a_flush_writes_everything_and_a_failed_one_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        for (id, name) in [("tok_a", "a"), ("tok_b", "b")] {
            store.insert_token(&token(id, name)).await.unwrap();
        }
        let b = UsageBuffer::default();
        let m = month("2026-11");
        b.add("tok_a", m, 1, 100);
        b.add("tok_a", m, 1, 23);
        b.flush(&store).await.unwrap();
        b.add("tok_a", m, 1, 1);
        b.flush(&store).await.unwrap();
        b.flush(&store).await.unwrap();
        assert_eq!(
            store.usage("tok_a", m).await.unwrap(),
            Usage {
                files: 3,
                bytes: 124
            }
        );
        assert_eq!(b.pending("tok_a", m), Usage::default());

        // A store that cannot take them: the counts stay pending, and are
        // written once it can.
        let conn = rusqlite::Connection::open(store.path()).unwrap();
        conn.execute_batch("ALTER TABLE usage RENAME TO usage_away")
            .unwrap();
        b.add("tok_b", m, 1, 7);
        assert!(b.flush(&store).await.is_err());
        assert_eq!(b.pending("tok_b", m), Usage { files: 1, bytes: 7 });
        conn.execute_batch("ALTER TABLE usage_away RENAME TO usage")
            .unwrap();
        b.add("tok_b", m, 1, 3);
        b.flush(&store).await.unwrap();
        assert_eq!(
            store.usage("tok_b", m).await.unwrap(),
            Usage {
                files: 2,
                bytes: 10
            }
        );
    }
}
