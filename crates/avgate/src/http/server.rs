//! The connection loop: bounded connections, TLS, header limits and
//! deadlines, HTTP/1.1 and HTTP/2, graceful shutdown.
//!
//! We run hyper ourselves rather than `axum::serve` because the latter
//! exposes none of these limits.
//!
//! Deadlines a connection lives under, whatever its protocol:
//! - its first bytes (the HTTP/2 preface, or enough of an HTTP/1 request
//!   line for hyper-util to tell) within `header_timeout` ([`PrefaceDeadline`]);
//! - an HTTP/1 request head within `header_timeout` (hyper);
//! - its first request within `header_timeout`, then never more than
//!   `idle_timeout` without a request in progress ([`Activity`]): hyper
//!   keeps an HTTP/2 connection open forever otherwise, even one that sent
//!   its preface and nothing else.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, StatusCode};
use axum::Router;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::linger::LingerBody;
use super::ClientAddr;
use crate::tls::TlsAcceptor;

/// Largest request head (request line and headers) we accept.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct ServerLimits {
    pub max_connections: usize,
    /// Connections one client address may hold; `None`: no such limit.
    pub per_ip: Option<PerIpLimit>,
    pub header_timeout: Duration,
    /// Longest a connection stays open with no request in progress.
    pub idle_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// At most `max` open connections per client address (an IPv6 /64, which
/// one host can fill with addresses of its own), so that one client cannot
/// hold every connection slot and shut the others out: it only needs to
/// keep them busy (a request every few seconds, even refused ones), and
/// each open connection is a slot. Its peers in `exempt` (trusted
/// proxies, which carry many clients) are not limited. Past the limit a
/// new connection is closed as soon as it is accepted.
#[derive(Clone)]
pub struct PerIpLimit {
    pub max: usize,
    pub exempt: Arc<Vec<ipnet::IpNet>>,
    /// Counts the connections closed that way.
    pub refused: prometheus::IntCounter,
}

/// Open connections per client address.
#[derive(Default)]
struct OpenPerIp {
    open: Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// When the last refusal was logged: one warning a minute at most.
    warned: Mutex<Option<Instant>>,
}

/// One connection counted in [`OpenPerIp`] until dropped.
struct PerIpSlot {
    table: Arc<OpenPerIp>,
    key: std::net::IpAddr,
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl OpenPerIp {
    /// A slot for a connection from `ip`, or `None` past `limit`;
    /// `Some(None)`: not counted (exempt).
    fn enter(
        self: &Arc<Self>,
        ip: std::net::IpAddr,
        limit: &PerIpLimit,
    ) -> Option<Option<PerIpSlot>> {
        if crate::perimeter::network::contains(&limit.exempt, ip) {
            return Some(None);
        }
        let key = crate::perimeter::rate_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= limit.max {
            return None;
        }
        *n += 1;
        Some(Some(PerIpSlot {
            table: self.clone(),
            key,
        }))
    }

    /// Whether a refusal is to be logged now (once a minute at most).
    fn warn_now(&self) -> bool {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        let due = warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if due {
            *warned = Some(Instant::now());
        }
        due
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops
/// accepting, lets in-flight requests finish (up to `shutdown_timeout`) and
/// returns. With `tls`, every connection is TLS and every response carries
/// HSTS.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    tls: Option<Arc<TlsAcceptor>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(64);
    let builder = Arc::new(builder);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = Arc::new(OpenPerIp::default());
    // Every connection task, from accept to close (TLS handshake included),
    // so that shutdown can wait for them; and the signal that asks them to
    // finish their requests and close.
    let tasks = TaskTracker::new();
    let closing = CancellationToken::new();
    tokio::pin!(shutdown);

    loop {
        // Take a connection slot first: past the limit, new connections wait
        // in the kernel's backlog instead of costing us memory.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let per_ip_slot = match &limits.per_ip {
            None => None,
            Some(limit) => match per_ip.enter(peer.ip(), limit) {
                Some(slot) => slot,
                None => {
                    limit.refused.inc();
                    if per_ip.warn_now() {
                        tracing::warn!(
                            client = %peer.ip(),
                            max_connections_per_ip = limit.max,
                            "a client address holds max_connections_per_ip connections: new ones from it are closed at once \
                             (avgate_connections_refused_total counts them; one warning a minute)"
                        );
                    }
                    drop(stream);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            builder: builder.clone(),
            app: app.clone(),
            peer,
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            closing: closing.clone(),
        };
        let tls = tls.clone();
        // The handshake runs here, in the connection's own task: a slow or
        // silent client never holds up the accept loop.
        tasks.spawn(async move {
            match tls {
                None => connection.serve(stream, false).await,
                Some(tls) => match tls.accept(stream).await {
                    Ok(Some(stream)) => connection.serve(stream, true).await,
                    Ok(None) => {} // an ACME validation, already answered
                    Err(e) => {
                        tracing::debug!(error = %e, client = %peer, "TLS handshake failed")
                    }
                },
            }
            drop(per_ip_slot);
            drop(permit);
        });
    }

    drop(listener);
    tracing::info!("no longer accepting connections; waiting for in-flight requests");
    closing.cancel();
    tasks.close();
    tokio::select! {
        _ = tasks.wait() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(limits.shutdown_timeout) => {
            // TaskTracker counts the connection tasks still open: the
            // requests about to be cut off (at most one each on HTTP/1).
            tracing::warn!(
                connections = tasks.len(),
                "shutdown deadline reached with requests still in flight; they are cut off"
            );
        }
    }
}

/// At shutdown, how long a connection with nothing in progress is given to
/// close by itself (an HTTP/2 client acknowledging the GOAWAY) before it is
/// dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// One accepted connection, up to the point where its bytes are known.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: Router,
    peer: SocketAddr,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// Cancelled at shutdown: finish the requests in progress, then close.
    closing: CancellationToken,
}

impl Connection {
    async fn serve<I>(self, io: I, tls: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            builder,
            app,
            peer,
            header_timeout,
            idle_timeout,
            closing,
        } = self;
        let activity = Arc::new(Activity::new());
        let requests = activity.clone();
        let linger_closing = closing.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ClientAddr(peer));
            let in_progress = requests.start();
            // A body still being read (or drained) keeps the connection
            // from counting as idle.
            let (request, linger) = LingerBody::wrap(request, &linger_closing, || requests.start());
            app.clone().oneshot(request).map(move |response| {
                drop(in_progress);
                response.map(|mut response| {
                    if response.status() == StatusCode::REQUEST_TIMEOUT {
                        // Cut off for sending too slowly: no more time.
                        linger.stop();
                    }
                    if tls {
                        response.headers_mut().insert(
                            header::STRICT_TRANSPORT_SECURITY,
                            HeaderValue::from_static(crate::tls::HSTS),
                        );
                    }
                    response
                })
            })
        });
        let conn = builder.serve_connection_with_upgrades(
            TokioIo::new(PrefaceDeadline::new(io, header_timeout)),
            service,
        );
        tokio::pin!(conn);
        // Once a graceful close has begun: HTTP/1 closes once the request in
        // progress is answered; HTTP/2 sends GOAWAY and closes once the open
        // streams are done *and* the client has acknowledged a PING, which a
        // silent client never does. So the connection is also dropped once
        // nothing has been in progress for `grace` since the close began:
        // requests in progress (HTTP/2 still accepts streams for a round
        // trip after the first GOAWAY) always finish first.
        let mut closing_since: Option<Instant> = None;
        let mut grace = header_timeout;
        let mut shutdown = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, client = %peer, "connection ended with an error");
                    }
                    return;
                }
                _ = closing.cancelled(), if !shutdown => {
                    // Shutting down: no reason to wait long for a client.
                    shutdown = true;
                    grace = grace.min(SHUTDOWN_GRACE);
                }
                _ = activity.idle(header_timeout, idle_timeout), if closing_since.is_none() => {
                    tracing::debug!(client = %peer, "closing an idle connection");
                }
                _ = activity.quiet(closing_since.unwrap_or_else(Instant::now), grace), if closing_since.is_some() => {
                    return;
                }
            }
            if closing_since.is_none() {
                conn.as_mut().graceful_shutdown();
                closing_since = Some(Instant::now());
            }
        }
    }
}

/// When a connection last had something to do.
struct Activity {
    state: Mutex<ActivityState>,
}

struct ActivityState {
    in_progress: usize,
    /// The last time a request started or ended (or the connection opened).
    since: Instant,
    any_request: bool,
}

/// A request in progress; dropping it ends it.
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        state.in_progress -= 1;
        state.since = Instant::now();
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            state: Mutex::new(ActivityState {
                in_progress: 0,
                since: Instant::now(),
                any_request: false,
            }),
        }
    }

    fn start(self: &Arc<Self>) -> InProgress {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.in_progress += 1;
        state.any_request = true;
        state.since = Instant::now();
        InProgress(self.clone())
    }

    /// Resolves once no request has been in progress for `quiet` since
    /// `from` (or since the last one ended, if later).
    async fn quiet(&self, from: Instant, quiet: Duration) {
        self.quiet_for(Some(from), |_| quiet, quiet.min(Duration::from_secs(1)))
            .await
    }

    /// Resolves once the connection has had no request in progress for
    /// `idle_timeout` (`first_request` before its first request).
    async fn idle(&self, first_request: Duration, idle_timeout: Duration) {
        let limit = |any_request| match any_request {
            true => idle_timeout,
            false => first_request,
        };
        self.quiet_for(None, limit, idle_timeout).await
    }

    /// Resolves once nothing has been in progress for `limit(any request
    /// yet)` since the last request started or ended (and since `from`).
    /// While something is, looks again every `recheck`: requests have
    /// deadlines of their own.
    async fn quiet_for(
        &self,
        from: Option<Instant>,
        limit: impl Fn(bool) -> Duration,
        recheck: Duration,
    ) {
        loop {
            let (busy, deadline) = {
                let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let since = from.map_or(state.since, |from| state.since.max(from));
                (state.in_progress > 0, since + limit(state.any_request))
            };
            if busy {
                tokio::time::sleep(recheck).await;
            } else if Instant::now() >= deadline {
                return;
            } else {
                tokio::time::sleep_until(deadline.into()).await;
            }
        }
    }
}

/// Bytes hyper-util reads to tell HTTP/1 from HTTP/2 (the HTTP/2 preface).
const PREFACE_LEN: usize = 24;

/// Closes a connection whose first bytes do not arrive within the header
/// timeout. hyper's own header timeout only starts once hyper-util has
/// read enough to choose HTTP/1 or HTTP/2; without this, a client that
/// connects and says nothing (or drips the preface) would hold a
/// connection slot forever.
struct PrefaceDeadline<I> {
    io: I,
    /// Bytes still to be read before the deadline is lifted.
    remaining: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> PrefaceDeadline<I> {
    fn new(io: I, timeout: Duration) -> Self {
        PrefaceDeadline {
            io,
            remaining: PREFACE_LEN,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PrefaceDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                self.remaining = self.remaining.saturating_sub(read);
                if self.remaining == 0 {
                    self.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = match self.deadline.as_mut() {
                    Some(deadline) => deadline.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request within the header timeout",
                    )));
                }
                Poll::Pending
            }
            error => error,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for PrefaceDeadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
