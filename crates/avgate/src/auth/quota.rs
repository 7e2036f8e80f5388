//! Monthly quotas and per-token concurrency.
//!
//! A scan request first takes a [`Meter`] ([`Auth::meter`]): a slot among
//! the token's `max_concurrent`, and a check that the month's quotas are
//! not used up (for bytes: that the request's Content-Length fits in what
//! is left). Then each file takes a [`FileReservation`]: one file counted,
//! atomically and only below the file quota, before it is scanned, so
//! that concurrent requests cannot overshoot. A scanned file commits its
//! reservation with its real size; one that was not scanned gives it back.
//!
//! A byte quota is checked as the bytes arrive: each file reserves bytes
//! in the store in steps ([`ByteBudget`]) ahead of what it sends to the
//! engines, so that neither a request without a Content-Length (chunked,
//! HTTP/2) nor several at once can take the count past the quota. A
//! scanned file gives back what it reserved beyond its size; one that was
//! not scanned gives back all of it.
//!
//! A reservation runs to its end in a task of its own: a client that hangs
//! up while the store is slow drops its request, and a reservation made
//! after that, with no one left to give it back, would count against the
//! quota for the rest of the month. The task gives it back instead.
//!
//! Every token's use is counted, with or without quotas, so that
//! `avgate token usage` answers for all of them. A token without quotas
//! needs no reservation: its scans are counted in memory once done and
//! written to the store in batches ([`super::usage`]), so that its scans
//! cost the store nothing.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::usage::UsageBuffer;
use super::{store_failed, Auth, Principal, Quotas};
use crate::http::error::{ApiError, Code};
use crate::scan::pipeline::BodyError;
use crate::store::clock::{self, Month};
use crate::store::{Store, StoreError};

/// Seconds a client is told to wait when its token's scans are all busy.
const CONCURRENCY_RETRY_SECS: u64 = 1;

/// Most bytes a file reserves against a byte quota ahead of what has
/// arrived: about one store write per MiB of a large upload.
const RESERVE_STEP: u64 = 1 << 20;

/// One semaphore per token that has a `max_concurrent`. Tokens are few and
/// their limit never changes, so entries are kept for the process's life.
#[derive(Default)]
pub struct Concurrency {
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Concurrency {
    fn try_acquire(&self, token_id: &str, max: usize) -> Option<OwnedSemaphorePermit> {
        let semaphore = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(token_id.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))))
            .clone();
        semaphore.try_acquire_owned().ok()
    }
}

/// Quota accounting for one request.
pub struct Meter {
    /// `None`: anonymous, nothing to count.
    token: Option<Counted>,
    _slot: Option<OwnedSemaphorePermit>,
}

struct Counted {
    store: Arc<dyn Store>,
    usage: Arc<UsageBuffer>,
    id: String,
    month: Month,
    quotas: Quotas,
    /// The request's Content-Length: no file in it is larger.
    declared: Option<u64>,
}

impl Auth {
    /// Checks the token's concurrency and its quotas before a request's
    /// body is read. `declared` is the request's Content-Length.
    pub async fn meter(
        &self,
        principal: &Principal,
        declared: Option<u64>,
    ) -> Result<Meter, ApiError> {
        let Some(id) = principal.token_id.clone() else {
            return Ok(Meter {
                token: None,
                _slot: None,
            });
        };
        let slot = match principal.max_concurrent {
            Some(max) => Some(
                self.concurrency
                    .try_acquire(&id, max)
                    .ok_or_else(|| concurrency_limit(max))?,
            ),
            None => None,
        };
        let month = Month::current();
        let quotas = principal.quotas;
        if quotas.monthly_files.is_some() || quotas.monthly_bytes.is_some() {
            let used = self.store.usage(&id, month).await.map_err(store_failed)?;
            if let Some(max) = quotas.monthly_files {
                if used.files >= max {
                    return Err(quota_exceeded(month, format!("{max} files")));
                }
            }
            if let Some(max) = quotas.monthly_bytes {
                let would_be = used.bytes.saturating_add(declared.unwrap_or(0));
                if used.bytes >= max {
                    return Err(quota_exceeded(month, format!("{max} bytes")));
                }
                if would_be > max {
                    return Err(ApiError::new(
                        Code::QuotaExceeded,
                        format!(
                            "this request ({} bytes) does not fit in what is left of this token's monthly quota for {month}: {} of {max} bytes",
                            declared.unwrap_or(0),
                            max - used.bytes
                        ),
                    )
                    .with_retry_after(until_next_month(month)));
                }
            }
        }
        Ok(Meter {
            token: Some(Counted {
                store: self.store.clone(),
                usage: self.usage.clone(),
                id,
                month,
                quotas,
                declared,
            }),
            _slot: slot,
        })
    }
}

impl Meter {
    /// Counts one file before it is scanned; refuses past the file quota.
    pub async fn reserve_file(&self) -> Result<FileReservation, ApiError> {
        let Some(t) = &self.token else {
            return Ok(FileReservation { held: None });
        };
        if t.quotas == Quotas::default() {
            // No quota to hold: counted in memory once scanned.
            return Ok(FileReservation {
                held: Some(Held::Memory(t.usage.clone(), t.id.clone(), t.month)),
            });
        }
        let limit = t.quotas.monthly_files;
        let month = t.month;
        if !reserve_detached(
            t.store.clone(),
            t.id.clone(),
            move |store, id| async move { store.reserve_file(&id, month, limit).await },
            move |store, id| async move { store.release_file(&id, month).await },
        )
        .await
        .map_err(store_failed)?
        {
            let max = limit.unwrap_or_default();
            return Err(quota_exceeded(t.month, format!("{max} files")));
        }
        let budget = t.quotas.monthly_bytes.map(|limit| {
            Arc::new(ByteBudget {
                store: t.store.clone(),
                id: t.id.clone(),
                month: t.month,
                limit,
                ceiling: t.declared,
                counts: Mutex::new(ByteCounts::default()),
            })
        });
        Ok(FileReservation {
            held: Some(Held::Store(t.store.clone(), t.id.clone(), t.month, budget)),
        })
    }
}

/// A file's bytes against its token's byte quota, reserved in the store
/// as they arrive.
pub struct ByteBudget {
    store: Arc<dyn Store>,
    id: String,
    month: Month,
    limit: u64,
    /// No more is reserved for the file than this (the request's size).
    ceiling: Option<u64>,
    counts: Mutex<ByteCounts>,
}

#[derive(Default, Clone, Copy)]
struct ByteCounts {
    /// Bytes of the file that have arrived.
    seen: u64,
    /// Bytes counted in the store for it.
    reserved: u64,
}

impl ByteBudget {
    /// Counts `n` more bytes of the file; refuses once they do not fit in
    /// what is left of the quota (the file is then not scanned).
    pub async fn take(&self, n: u64) -> Result<(), BodyError> {
        let (need, ahead) = {
            let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let before = c.seen;
            c.seen += n;
            let need = c.seen.saturating_sub(c.reserved);
            // Ahead by as much as had arrived before, up to a step: few
            // store writes for a large file. A file that arrives in one
            // piece holds its size, and none holds more than its request
            // could carry: what it holds ahead is out of reach for the
            // token's other uploads, which would be refused for it.
            let mut ahead = need + before.min(RESERVE_STEP);
            if let Some(ceiling) = self.ceiling {
                ahead = ahead.min(ceiling.saturating_sub(c.reserved)).max(need);
            }
            (need, ahead)
        };
        if need == 0 {
            return Ok(());
        }
        let amounts = if ahead > need {
            &[ahead, need][..]
        } else {
            &[need][..]
        };
        for &amount in amounts {
            let (month, limit) = (self.month, self.limit);
            let granted = reserve_detached(
                self.store.clone(),
                self.id.clone(),
                move |store, id| async move { store.reserve_bytes(&id, month, amount, limit).await },
                move |store, id| async move { store.release_bytes(&id, month, amount).await },
            )
            .await
            .map_err(|e| BodyError::StoreFailed(e.to_string()))?;
            if granted {
                self.counts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .reserved += amount;
                return Ok(());
            }
        }
        Err(BodyError::QuotaExceeded {
            message: format!(
                "this token's monthly quota ({} bytes) for {} is used up by this upload; it resets on {}",
                self.limit,
                self.month,
                clock::rfc3339(self.month.next().start())
            ),
            retry_after: until_next_month(self.month),
        })
    }

    fn counts(&self) -> ByteCounts {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One file counted against a quota. [`FileReservation::commit`] once it is
/// scanned; dropped without it (the scan failed), the file is given back.
#[must_use = "commit the reservation once the file is scanned"]
pub struct FileReservation {
    held: Option<Held>,
}

enum Held {
    /// Counted in the store already (a token with quotas); its bytes too
    /// with a byte quota.
    Store(Arc<dyn Store>, String, Month, Option<Arc<ByteBudget>>),
    /// Nothing counted yet (a token without quotas): counted in memory on
    /// commit.
    Memory(Arc<UsageBuffer>, String, Month),
}

impl FileReservation {
    /// The byte budget the file's bytes must be taken from as they arrive,
    /// for a token with a byte quota.
    pub fn budget(&self) -> Option<Arc<ByteBudget>> {
        match &self.held {
            Some(Held::Store(_, _, _, budget)) => budget.clone(),
            _ => None,
        }
    }

    /// The file was scanned: keep it counted and add its bytes.
    pub async fn commit(mut self, bytes: u64) {
        match self.held.take() {
            Some(Held::Store(store, id, month, Some(budget))) => {
                // Counted as they arrived: give back the step reserved ahead.
                let excess = budget.counts().reserved.saturating_sub(bytes);
                if excess > 0 {
                    if let Err(e) = store.release_bytes(&id, month, excess).await {
                        tracing::error!(error = %e, token_id = %id, "cannot give back reserved bytes");
                    }
                }
            }
            Some(Held::Store(store, id, month, None)) => {
                if let Err(e) = store.add_bytes(&id, month, bytes).await {
                    tracing::error!(error = %e, token_id = %id, "cannot count scanned bytes");
                }
            }
            Some(Held::Memory(usage, id, month)) => usage.add(&id, month, 1, bytes),
            None => {}
        }
    }
}

impl Drop for FileReservation {
    fn drop(&mut self) {
        let Some(Held::Store(store, id, month, budget)) = self.held.take() else {
            return;
        };
        let reserved = budget.map_or(0, |b| b.counts().reserved);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = store.release_file(&id, month).await {
                    tracing::error!(error = %e, token_id = %id, "cannot give back an unscanned file's quota");
                }
                if reserved > 0 {
                    if let Err(e) = store.release_bytes(&id, month, reserved).await {
                        tracing::error!(error = %e, token_id = %id, "cannot give back an unscanned file's bytes");
                    }
                }
            });
        }
    }
}

/// Runs `reserve` (true: granted) in a task of its own and answers what it
/// answered. A granted reservation travels back with a [`GiveBack`]: if
/// nobody takes it (the request was dropped before or while the answer
/// arrived), dropping it runs `give_back` (see the module's
/// documentation).
async fn reserve_detached<R, G>(
    store: Arc<dyn Store>,
    id: String,
    reserve: impl FnOnce(Arc<dyn Store>, String) -> R,
    give_back: impl FnOnce(Arc<dyn Store>, String) -> G + Send + 'static,
) -> Result<bool, StoreError>
where
    R: Future<Output = Result<bool, StoreError>> + Send + 'static,
    G: Future<Output = Result<(), StoreError>> + Send + 'static,
{
    let (answer, answered) = tokio::sync::oneshot::channel();
    let reserve = reserve(store.clone(), id.clone());
    tokio::spawn(async move {
        let result = reserve.await;
        let guard = matches!(result, Ok(true)).then(|| GiveBack {
            undo: Some(Box::pin(async move {
                if let Err(e) = give_back(store, id.clone()).await {
                    tracing::error!(error = %e, token_id = %id, "cannot give back a reservation whose request was dropped");
                }
            })),
        });
        // Refused (the request is gone): the guard comes back and is
        // dropped here, which gives the reservation back.
        let _ = answer.send((result, guard));
    });
    match answered.await {
        Ok((result, guard)) => {
            if let Some(mut guard) = guard {
                guard.undo = None; // ours now
            }
            result
        }
        Err(_) => Err(StoreError::Backend(
            "the quota reservation task ended".into(),
        )),
    }
}

/// A granted reservation on its way to its request; given back if dropped
/// before the request takes it.
struct GiveBack {
    undo: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        if let Some(undo) = self.undo.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(undo);
            }
        }
    }
}

/// Seconds until the month after `month` starts (UTC).
fn until_next_month(month: Month) -> u64 {
    (month.next().start() - clock::now()).max(1) as u64
}

fn quota_exceeded(month: Month, what: String) -> ApiError {
    let next = month.next();
    let retry = until_next_month(month);
    ApiError::new(
        Code::QuotaExceeded,
        format!(
            "this token's monthly quota ({what}) is used up for {month}; it resets on {}",
            clock::rfc3339(next.start())
        ),
    )
    .with_retry_after(retry)
}

fn concurrency_limit(max: usize) -> ApiError {
    ApiError::new(
        Code::TokenConcurrencyLimit,
        format!("this token already has {max} scans in progress; retry when one is done"),
    )
    .with_retry_after(CONCURRENCY_RETRY_SECS)
}
