//! Lingering close: after answering early, read the rest of the request
//! body and throw it away, for a bounded time and size.
//!
//! avgate answers many requests without reading their bodies: a
//! Content-Length over the limit (413), a missing token (401), a refused
//! address, a full queue. hyper then closes the connection with the rest
//! of the upload unread, and the kernel answers the client's next bytes
//! with a reset. A client that sends its whole body before it reads the
//! answer (Python's requests, reqwest, most scripts) gets "connection
//! reset" or "broken pipe" instead of our JSON error, and the reset can
//! even discard the answer already sitting in its receive buffer.
//!
//! nginx and Apache solve this the same way ("lingering close"): keep
//! reading and discarding for a while, so that the client finishes
//! sending and reads the answer. Here that happens when the handler drops
//! a body it did not read to its end: the rest is read in a task of its
//! own, for at most [`LINGER_TIME`] in all and [`LINGER_READ_TIMEOUT`]
//! between reads. After that (or at shutdown) the connection closes as
//! before. There is no bound in bytes, as in nginx: a file a little over
//! the limit is the usual case and must get its 413, whatever the limit;
//! the time bounds what a client can make us read, and reading to discard
//! costs less than any accepted upload.
//!
//! Not for HTTP/2: there h2 ends the stream once the answer is out and
//! every handle on it is gone, with NO_ERROR, which RFC 9113 (section 8.1)
//! provides for exactly this (stop sending, the answer is complete); the
//! connection stays up (`tests/scan.rs` checks both). Not for a client that asked
//! `Expect: 100-continue` and was never told to send: it has sent nothing
//! yet and sees the answer first. And not after a 408: the client was cut
//! off for sending too slowly, and lingering would give back the time the
//! limit took ([`LingerStop`]).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, Request, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio_util::sync::CancellationToken;

/// The longest we keep reading a body nobody wants (nginx's
/// `lingering_time`).
pub const LINGER_TIME: Duration = Duration::from_secs(30);
/// The longest we wait for the client's next bytes while lingering
/// (nginx's `lingering_timeout`).
pub const LINGER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A request body that, when dropped before its end, drains itself.
pub struct LingerBody<G: Send + Unpin + 'static> {
    body: Option<Incoming>,
    /// `None` when lingering does not apply to this request.
    linger: Option<Linger<G>>,
    /// The client sent `Expect: 100-continue` and the body has not been
    /// polled yet: it has not been asked for the body, and sent none.
    unasked: bool,
}

struct Linger<G> {
    /// Cancelled at shutdown (a child of the server's token) or by
    /// [`LingerStop`].
    stop: CancellationToken,
    /// Held while the body (or its draining) lives, e.g. to keep the
    /// connection from counting as idle.
    _guard: G,
}

impl<G: Send + Unpin + 'static> LingerBody<G> {
    /// Wraps `request`'s body. `guard` is dropped with the body, or once
    /// its draining ends; `closing` (or the returned [`LingerStop`]) cuts
    /// the draining short.
    pub fn wrap(
        request: Request<Incoming>,
        closing: &CancellationToken,
        guard: impl FnOnce() -> G,
    ) -> (Request<LingerBody<G>>, LingerStop) {
        let applies = request.version() <= Version::HTTP_11 && !request.body().is_end_stream();
        // Only looked up for bodies that may be drained.
        let unasked = applies
            && request
                .headers()
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        // Only requests with a body pay for a token of their own.
        let linger = applies.then(|| Linger {
            stop: closing.child_token(),
            _guard: guard(),
        });
        let stop = LingerStop(linger.as_ref().map(|l| l.stop.clone()));
        let request = request.map(|body| LingerBody {
            body: Some(body),
            linger,
            unasked,
        });
        (request, stop)
    }
}

/// Calls off the draining of one request's body, e.g. once its answer is
/// known to be a 408.
pub struct LingerStop(Option<CancellationToken>);

impl LingerStop {
    pub fn stop(&self) {
        if let Some(token) = &self.0 {
            token.cancel();
        }
    }
}

impl<G: Send + Unpin + 'static> Body for LingerBody<G> {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.unasked = false;
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = Pin::new(body).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = frame {
            // Read to its end (or broken): nothing left to linger for.
            self.linger = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl<G: Send + Unpin + 'static> Drop for LingerBody<G> {
    fn drop(&mut self) {
        let (Some(body), Some(linger)) = (self.body.take(), self.linger.take()) else {
            return;
        };
        if body.is_end_stream() || self.unasked {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body, linger));
        }
    }
}

/// Reads `body` to its end and discards it, within the bounds above.
/// Dropping it then lets hyper finish (or close) the connection.
async fn drain<G>(mut body: Incoming, linger: Linger<G>) {
    let give_up = tokio::time::sleep(LINGER_TIME);
    tokio::pin!(give_up);
    let mut discarded = 0u64;
    let outcome = loop {
        let frame = tokio::select! {
            biased;
            _ = linger.stop.cancelled() => break "called off",
            _ = &mut give_up => break "took too long",
            frame = tokio::time::timeout(LINGER_READ_TIMEOUT, body.frame()) => frame,
        };
        match frame {
            Ok(Some(Ok(frame))) => {
                discarded += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            Ok(None) => break "read to its end",
            Ok(Some(Err(_))) => break "connection error",
            Err(_) => break "client went silent",
        }
    };
    tracing::debug!(
        bytes = discarded,
        outcome,
        "discarded the rest of a request body"
    );
}
