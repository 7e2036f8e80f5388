//! A minimum upload rate, so that a client dribbling bytes (slowloris on
//! the body) cannot hold a connection and a clamd slot for ever.
//!
//! Only time spent waiting for the client counts: while avgate itself is
//! not reading (clamd is busy with the previous chunk), the client is not
//! to blame.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

/// The client sent less than the minimum over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooSlow {
    pub min_bytes_per_sec: u64,
    pub window: Duration,
}

pub struct MinRate<S> {
    inner: S,
    min_bytes_per_sec: u64,
    window: Duration,
    /// Bytes received in the current window.
    bytes: u64,
    /// Time spent waiting for the client in the current window.
    waited: Duration,
    waiting_since: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    failed: bool,
}

impl<S> MinRate<S> {
    /// `min_bytes_per_sec == 0` disables the check.
    pub fn new(inner: S, min_bytes_per_sec: u64, window: Duration) -> MinRate<S> {
        MinRate {
            inner,
            min_bytes_per_sec,
            window: window.max(Duration::from_millis(100)),
            bytes: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            failed: false,
        }
    }

    fn required(&self) -> u64 {
        (self.min_bytes_per_sec as f64 * self.window.as_secs_f64()) as u64
    }

    /// Ends the current wait and judges the window if it is over.
    fn account_wait(&mut self, now: Instant) -> Result<(), TooSlow> {
        if let Some(since) = self.waiting_since.take() {
            self.waited += now - since;
        }
        if self.waited >= self.window {
            if self.bytes < self.required() {
                return Err(TooSlow {
                    min_bytes_per_sec: self.min_bytes_per_sec,
                    window: self.window,
                });
            }
            self.bytes = 0;
            self.waited = Duration::ZERO;
        }
        Ok(())
    }
}

impl<S, E> Stream for MinRate<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: From<TooSlow>,
{
    type Item = Result<Bytes, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        if this.min_bytes_per_sec == 0 {
            return Pin::new(&mut this.inner).poll_next(cx);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.bytes += chunk.len() as u64;
                if let Err(e) = this.account_wait(Instant::now()) {
                    this.failed = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(other) => Poll::Ready(other),
            Poll::Pending => {
                let now = Instant::now();
                if this.waiting_since.is_none() {
                    this.waiting_since = Some(now);
                }
                let waited = this.waited + (now - this.waiting_since.unwrap_or(now));
                if waited >= this.window {
                    if let Err(e) = this.account_wait(now) {
                        this.failed = true;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                    this.waiting_since = Some(now);
                }
                // Wake up when the window would be over if nothing arrives.
                let left = this
                    .window
                    .saturating_sub(this.waited + (now - this.waiting_since.unwrap_or(now)));
                this.timer.as_mut().reset(now + left);
                let _ = this.timer.as_mut().poll(cx);
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[derive(Debug)]
    enum E {
        Slow,
    }
    impl From<TooSlow> for E {
        fn from(_: TooSlow) -> E {
            E::Slow
        }
    }

    fn dribble(
        chunk: usize,
        every: Duration,
        n: usize,
    ) -> impl Stream<Item = Result<Bytes, E>> + Unpin {
        Box::pin(futures_util::stream::iter(0..n).then(move |_| async move {
            tokio::time::sleep(every).await;
            Ok(Bytes::from(vec![0u8; chunk]))
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_enough_client_passes() {
        let s = MinRate::new(
            dribble(1000, Duration::from_millis(100), 50),
            1000,
            Duration::from_secs(2),
        );
        let all: Vec<_> = s.collect().await;
        assert_eq!(all.len(), 50);
        assert!(all.iter().all(|r| r.is_ok()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dribbling_client_is_cut_off_after_one_window() {
        let start = Instant::now();
        let mut s = MinRate::new(
            dribble(10, Duration::from_millis(500), 1000),
            1000,
            Duration::from_secs(2),
        );
        let mut got = 0;
        while let Some(r) = s.next().await {
            match r {
                Ok(_) => got += 1,
                Err(E::Slow) => break,
            }
        }
        assert!(got <= 4, "{got} chunks before the cut");
        assert!(start.elapsed() <= Duration::from_millis(2600));
        assert!(s.next().await.is_none(), "the stream ends after the error");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_sending_is_cut_off_by_the_timer() {
        let start = Instant::now();
        let stalled = Box::pin(futures_util::stream::pending::<Result<Bytes, E>>());
        let mut s = MinRate::new(stalled, 1, Duration::from_secs(3));
        assert!(matches!(s.next().await, Some(Err(E::Slow))));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_secs(4),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn time_avgate_spends_not_reading_is_not_held_against_the_client() {
        let mut s = MinRate::new(
            dribble(2000, Duration::from_millis(100), 20),
            1000,
            Duration::from_secs(1),
        );
        let mut n = 0;
        while let Some(r) = s.next().await {
            assert!(r.is_ok());
            n += 1;
            // avgate is busy elsewhere (clamd) for a long time.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        assert_eq!(n, 20);
    }
}
