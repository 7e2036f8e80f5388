//! The connection loop: bounded connections, TLS, header limits and
//! deadlines, HTTP/1.1 and HTTP/2, graceful shutdown.
//!
//! We run hyper ourselves rather than `axum::serve` because the latter
//! exposes none of these limits.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, HeaderValue};
use axum::Router;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::ClientAddr;
use crate::tls::TlsAcceptor;

/// Largest request head (request line and headers) we accept.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub shutdown_timeout: Duration,
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
    let graceful = GracefulShutdown::new();
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
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            builder: builder.clone(),
            app: app.clone(),
            peer,
            header_timeout: limits.header_timeout,
            // Taken now, before the handshake: shutdown waits for
            // connections that are still shaking hands too.
            watcher: graceful.watcher(),
        };
        let tls = tls.clone();
        // The handshake runs here, in the connection's own task: a slow or
        // silent client never holds up the accept loop.
        tokio::spawn(async move {
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
            drop(permit);
        });
    }

    drop(listener);
    tracing::info!("no longer accepting connections; waiting for in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(limits.shutdown_timeout) => {
            tracing::warn!("shutdown deadline reached with requests still in flight");
        }
    }
}

/// One accepted connection, up to the point where its bytes are known.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: Router,
    peer: SocketAddr,
    header_timeout: Duration,
    watcher: Watcher,
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
            watcher,
        } = self;
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ClientAddr(peer));
            app.clone().oneshot(request).map(move |response| {
                response.map(|mut response| {
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
        let conn = builder
            .serve_connection_with_upgrades(
                TokioIo::new(PrefaceDeadline::new(io, header_timeout)),
                service,
            )
            .into_owned();
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(error = %e, client = %peer, "connection ended with an error");
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
