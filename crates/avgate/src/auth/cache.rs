//! Verified tokens, kept in memory for a short while so that a scan does
//! not need the store to authenticate.
//!
//! - The key is the SHA-256 of the presented token (the store's lookup
//!   key); the token itself is never kept.
//! - Only tokens the store knows are kept, revoked and expired ones
//!   included (expiry is checked on every request against the clock, so
//!   it takes effect to the second). An unknown token is never cached:
//!   every attempt with one goes to the store (behind the perimeter's limit
//!   on failed authentications), so random tokens cannot fill memory, and a
//!   token created a moment ago by another process works at once.
//! - An entry lives [`TTL`]: a token revoked by another process (the CLI on
//!   the same file, another host on a shared store) is refused within that
//!   time. A revocation in this process ([`TokenCache::invalidate`]) empties
//!   the cache at once, and a lookup that was in flight meanwhile does not
//!   put its (possibly stale) answer back.
//! - At most [`MAX_ENTRIES`] entries (one per live token in use, so it is
//!   only a safety net): when full, expired entries go, then all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::token::TokenHash;
use crate::store::TokenRecord;

/// How long a verified token is trusted without asking the store again:
/// the longest a revocation made by another process takes to apply.
pub const TTL: Duration = Duration::from_secs(1);

/// The most tokens kept.
pub const MAX_ENTRIES: usize = 4096;

pub struct TokenCache {
    ttl: Duration,
    max_entries: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Bumped by every invalidation.
    generation: u64,
    entries: HashMap<[u8; 32], Entry>,
}

struct Entry {
    fetched: Instant,
    record: Arc<TokenRecord>,
}

/// Where a lookup stood when it went to the store: its answer is kept
/// only if no invalidation happened since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

impl Default for TokenCache {
    fn default() -> TokenCache {
        TokenCache::new(TTL, MAX_ENTRIES)
    }
}

impl TokenCache {
    pub fn new(ttl: Duration, max_entries: usize) -> TokenCache {
        TokenCache {
            ttl,
            max_entries: max_entries.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record for `hash` if it was fetched less than the TTL ago.
    /// Otherwise `Err` with the generation to hand to [`TokenCache::insert`]
    /// after asking the store.
    pub fn get(&self, hash: &TokenHash) -> Result<Arc<TokenRecord>, Generation> {
        let inner = self.lock();
        match inner.entries.get(&hash.0) {
            Some(e) if e.fetched.elapsed() < self.ttl => Ok(e.record.clone()),
            _ => Err(Generation(inner.generation)),
        }
    }

    /// Keeps what the store answered for `hash`, unless the cache was
    /// invalidated since `seen` (the answer may predate a revocation).
    pub fn insert(&self, hash: &TokenHash, record: Arc<TokenRecord>, seen: Generation) {
        let mut inner = self.lock();
        if inner.generation != seen.0 {
            return;
        }
        if inner.entries.len() >= self.max_entries && !inner.entries.contains_key(&hash.0) {
            let ttl = self.ttl;
            inner.entries.retain(|_, e| e.fetched.elapsed() < ttl);
            if inner.entries.len() >= self.max_entries {
                inner.entries.clear();
            }
        }
        inner.entries.insert(
            hash.0,
            Entry {
                fetched: Instant::now(),
                record,
            },
        );
    }

    /// Forgets every token: the next request of each asks the store.
    pub fn invalidate(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::Token;

    fn record(hash: TokenHash) -> Arc<TokenRecord> {
        Arc::new(TokenRecord::plain("tok_x", "x", hash))
    }

    fn hash() -> TokenHash {
        Token::generate().unwrap().hash()
    }

    #[test]
    fn entries_live_for_the_ttl() {
        let cache = TokenCache::new(Duration::from_millis(50), 10);
        let h = hash();
        let seen = cache.get(&h).unwrap_err();
        cache.insert(&h, record(h), seen);
        assert!(cache.get(&h).is_ok());
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get(&h).is_err(), "expired");
    }

    #[test]
    fn an_answer_from_before_an_invalidation_is_not_kept() {
        let cache = TokenCache::default();
        let h = hash();
        let seen = cache.get(&h).unwrap_err();
        cache.insert(&h, record(h), seen);
        assert!(cache.get(&h).is_ok());
        // A lookup starts, a revocation happens, the lookup ends.
        let (other, before) = (hash(), cache.get(&hash()).unwrap_err());
        cache.invalidate();
        assert!(cache.get(&h).is_err(), "invalidated at once");
        cache.insert(&other, record(other), before);
        assert!(cache.get(&other).is_err(), "a stale answer was kept");
        let after = cache.get(&other).unwrap_err();
        cache.insert(&other, record(other), after);
        assert!(cache.get(&other).is_ok());
    }

    #[test]
    fn the_size_is_capped() {
        let cache = TokenCache::new(Duration::from_secs(60), 8);
        for _ in 0..100 {
            let h = hash();
            let seen = cache.get(&h).unwrap_err();
            cache.insert(&h, record(h), seen);
            assert!(cache.len() <= 8);
        }
    }
}
