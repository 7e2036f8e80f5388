//! One connection to one clamd: connect, send a command, stream a file.
//!
//! Every operation here has a deadline, because clamd never says "busy":
//! past its MaxQueue it stops reading and a client without timeouts hangs.

use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;

use crate::proto::{self, Command, Frame, ScanReply, Stats, Version};

/// Where a clamd listens: `tcp://host:port` or `unix:/path/to/clamd.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            let rest = rest.trim_end_matches('/');
            // host:port, where host may be a bracketed IPv6 literal.
            match rest.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Address::Tcp(rest.to_owned()))
                }
                _ => Err(format!("{s:?}: expected tcp://HOST:PORT")),
            }
        } else if let Some(rest) = s.strip_prefix("unix:") {
            // Accept unix:/path and unix:///path alike.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.starts_with('/') {
                Ok(Address::Unix(PathBuf::from(path)))
            } else {
                Err(format!("{s:?}: expected unix:/ABSOLUTE/PATH"))
            }
        } else {
            Err(format!(
                "{s:?}: expected tcp://HOST:PORT or unix:/PATH (e.g. unix:/run/clamav/clamd.ctl)"
            ))
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(hostport) => write!(f, "tcp://{hostport}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Deadlines for one connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Establishing the connection.
    pub connect: Duration,
    /// Any single read or write while streaming: a clamd that stops reading
    /// (its queue is full, or it hangs) is given up on after this long.
    pub io: Duration,
    /// From the end of a stream (or a command) to clamd's reply: the
    /// longest a scan may take. Should be a little above clamd's MaxScanTime.
    pub reply: Duration,
}

impl Timeouts {
    /// A health probe's deadlines: a tiny scan must not wait a whole
    /// MaxScanTime.
    pub fn for_probe(self) -> Timeouts {
        Timeouts {
            reply: self.reply.min(Duration::from_secs(10)),
            io: self.io.min(Duration::from_secs(10)),
            ..self
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            io: Duration::from_secs(30),
            reply: Duration::from_secs(130),
        }
    }
}

/// Why talking to clamd failed. None of these is a verdict.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("clamd closed the connection without a reply")]
    Closed,
    #[error("unexpected reply from clamd: {0}")]
    Protocol(#[from] proto::ParseError),
    /// clamd answered before the stream was complete (it stopped reading,
    /// for example past StreamMaxLength) and the rest could not be sent.
    #[error("clamd answered before the stream ended: {0:?}")]
    EarlyReply(ScanReply),
    /// FILDES over TCP: file descriptors only travel over Unix sockets.
    #[error("passing a file descriptor needs a Unix-socket backend")]
    FdNeedsUnixSocket,
    /// clamd's replies and our commands are out of step (a reply nobody
    /// asked for, two replies to one command): none of them can be trusted.
    #[error("clamd's replies are out of step with the commands: {0}")]
    Desync(&'static str),
}

impl Error {
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout(_))
    }
}

/// Either kind of socket. Both halves are `Unpin`, so delegating needs no
/// pin projection (and no unsafe).
#[derive(Debug)]
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Socket::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

/// One open connection to clamd.
#[derive(Debug)]
pub struct Connection {
    socket: Socket,
    buf: Vec<u8>,
    timeouts: Timeouts,
}

impl Connection {
    pub async fn connect(addr: &Address, timeouts: Timeouts) -> Result<Connection, Error> {
        let connect = async {
            match addr {
                Address::Tcp(hostport) => {
                    let s = TcpStream::connect(hostport.as_str()).await?;
                    // Chunk headers are tiny writes; do not let Nagle hold them.
                    s.set_nodelay(true)?;
                    Ok(Socket::Tcp(s))
                }
                Address::Unix(path) => Ok(Socket::Unix(UnixStream::connect(path).await?)),
            }
        };
        let socket = timeout(timeouts.connect, connect)
            .await
            .map_err(|_| Error::Timeout("connecting"))?
            .map_err(|source| Error::Connect {
                addr: addr.to_string(),
                source,
            })?;
        Ok(Connection {
            socket,
            buf: Vec::with_capacity(256),
            timeouts,
        })
    }

    pub async fn ping(&mut self) -> Result<(), Error> {
        let reply = self.command(Command::Ping).await?;
        Ok(proto::parse_pong(&reply)?)
    }

    pub async fn version(&mut self) -> Result<Version, Error> {
        let reply = self.command(Command::Version).await?;
        Ok(Version::parse(&reply)?)
    }

    pub async fn stats(&mut self) -> Result<Stats, Error> {
        let reply = self.command(Command::Stats).await?;
        Ok(Stats::parse(&reply)?)
    }

    /// Asks clamd to reload its database. With `ConcurrentDatabaseReload
    /// yes` (the default) scans go on on the old engine meanwhile.
    pub async fn reload(&mut self) -> Result<(), Error> {
        let reply = self.command(Command::Reload).await?;
        Ok(proto::parse_reloading(&reply)?)
    }

    /// Starts an INSTREAM scan on this connection.
    pub async fn instream(mut self) -> Result<Instream, Error> {
        self.write_all(Command::Instream.encode()).await?;
        Ok(Instream {
            conn: self,
            sent: 0,
        })
    }

    /// Scans an open file by handing clamd its descriptor (`FILDES`, Unix
    /// sockets only): clamd reads the file itself, with no copy through the
    /// socket and none into its TemporaryDirectory. clamd scans from the
    /// start of the file whatever the descriptor's offset.
    pub async fn scan_fd(mut self, fd: BorrowedFd<'_>) -> Result<ScanReply, Error> {
        self.send_fd(fd).await?;
        let reply = self.read_reply(self.timeouts.reply).await?;
        Ok(ScanReply::parse_fildes(&reply)?)
    }

    /// Sends `FILDES` and the descriptor.
    async fn send_fd(&mut self, fd: BorrowedFd<'_>) -> Result<(), Error> {
        if !matches!(self.socket, Socket::Unix(_)) {
            return Err(Error::FdNeedsUnixSocket);
        }
        // The command and the descriptor go separately: clamd refuses a
        // descriptor that arrives with the command ("ancillary data sent
        // without FILDES"), and wants at least one byte to carry it.
        self.write_all(Command::Fildes.encode()).await?;
        let Socket::Unix(socket) = &self.socket else {
            unreachable!("checked above");
        };
        let send = socket.async_io(Interest::WRITABLE, || {
            let fds = [fd];
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(io::Error::other("no room for the descriptor"));
            }
            let sent = rustix::net::sendmsg(
                socket,
                &[io::IoSlice::new(b"\0")],
                &mut control,
                SendFlags::NOSIGNAL,
            )?;
            Ok(sent)
        });
        match timeout(self.timeouts.io, send).await {
            Ok(Ok(1)) => Ok(()),
            Ok(Ok(_)) => Err(Error::Io(io::Error::other("descriptor not sent"))),
            Ok(Err(e)) => Err(Error::Io(e)),
            Err(_) => Err(Error::Timeout("passing the file to clamd")),
        }
    }

    /// Starts an `IDSESSION` on this connection: several commands, one
    /// after the other, without a new connection each.
    pub async fn session(mut self) -> Result<Session, Error> {
        self.write_all(Command::IdSession.encode()).await?;
        Ok(Session {
            conn: self,
            next_id: 1,
            idle_since: Instant::now(),
        })
    }

    /// Scans a buffer held in memory (probes, small payloads).
    pub async fn scan_bytes(self, data: &[u8]) -> Result<ScanReply, Error> {
        let mut stream = self.instream().await?;
        stream.send(data).await?;
        stream.finish().await
    }

    async fn command(&mut self, cmd: Command) -> Result<Vec<u8>, Error> {
        self.write_all(cmd.encode()).await?;
        self.read_reply(self.timeouts.reply).await
    }

    async fn write_all(&mut self, data: &[u8]) -> Result<(), Error> {
        timeout(self.timeouts.io, self.socket.write_all(data))
            .await
            .map_err(|_| Error::Timeout("writing to clamd"))??;
        Ok(())
    }

    /// Whether anything has come that nothing asked for yet: a reply, the
    /// connection's end or an error. Looked at without waiting and without
    /// reading it (a peek at the socket, not tokio's cached readiness,
    /// which may not know of bytes that just arrived).
    fn anything_arrived(&self) -> bool {
        use rustix::net::RecvFlags;
        if !self.buf.is_empty() {
            return true;
        }
        let mut byte = [0u8; 1];
        let flags = RecvFlags::PEEK | RecvFlags::DONTWAIT;
        let peeked = match &self.socket {
            Socket::Tcp(s) => rustix::net::recv(s, &mut byte[..], flags),
            Socket::Unix(s) => rustix::net::recv(s, &mut byte[..], flags),
        };
        !matches!(peeked, Err(rustix::io::Errno::AGAIN))
    }

    /// After its reply to a command outside a session clamd closes the
    /// connection, having read all we sent. A reset instead of that end
    /// means it closed with our bytes unread: it answered before it had
    /// the whole stream (the answer raced our last writes into the socket
    /// buffers, so they did not fail), and an OK then covers only part of
    /// the file. Waits at most `limit` for the end or the reset; neither
    /// by then is not held against the reply.
    async fn closed_cleanly(&mut self, limit: Duration) -> Result<(), Error> {
        let unread = |what: String| {
            Error::Protocol(proto::ParseError::Unexpected(format!(
                "clamd answered OK, then {what}: it had not read the whole stream"
            )))
        };
        if !self.buf.is_empty() {
            return Err(unread("sent more".into()));
        }
        let mut byte = [0u8; 1];
        match timeout(limit, self.socket.read(&mut byte)).await {
            Ok(Ok(0)) | Err(_) => Ok(()),
            Ok(Ok(_)) => Err(unread("sent more".into())),
            Ok(Err(e)) => Err(unread(format!("reset the connection ({e})"))),
        }
    }

    /// Reads one NUL-terminated reply.
    async fn read_reply(&mut self, limit: Duration) -> Result<Vec<u8>, Error> {
        let read = async {
            loop {
                if let Frame::Complete(reply, used) = proto::frame(&self.buf)? {
                    let reply = reply.to_vec();
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                let mut chunk = [0u8; 1024];
                let n = self.socket.read(&mut chunk).await?;
                if n == 0 {
                    return Err(Error::Closed);
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        timeout(limit, read)
            .await
            .map_err(|_| Error::Timeout("waiting for clamd's reply"))?
    }
}

/// A connection in `IDSESSION` mode, used for one command at a time, so
/// replies come back in order (clamd numbers them; we check the number).
///
/// clamd closes a session that sends no command for its `ReadTimeout` (120 s
/// by default), and the caller cannot tell in advance: a failure on a session that was
/// idle must be retried on a new connection, never taken for a verdict.
/// A session that answered anything but a verdict is not used again.
#[derive(Debug)]
pub struct Session {
    conn: Connection,
    next_id: u64,
    idle_since: Instant,
}

impl Session {
    /// How long this session has waited since its last reply.
    pub fn idle_for(&self) -> Duration {
        self.idle_since.elapsed()
    }

    /// A session is quiet between commands: anything that came meanwhile
    /// (a reply nobody asked for, its end) makes it unusable, before the
    /// next reply could be mistaken for the answer to the next command.
    fn check_quiet(&self) -> Result<(), Error> {
        if self.conn.anything_arrived() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// `FILDES` inside the session (see [`Connection::scan_fd`]).
    pub async fn scan_fd(&mut self, fd: BorrowedFd<'_>) -> Result<ScanReply, Error> {
        self.check_quiet()?;
        self.conn.send_fd(fd).await?;
        let reply = self.reply().await?;
        Ok(ScanReply::parse_fildes(reply.as_bytes())?)
    }

    /// `INSTREAM` of data held in memory, inside the session.
    pub async fn scan_chunks(&mut self, chunks: &[bytes::Bytes]) -> Result<ScanReply, Error> {
        self.check_quiet()?;
        let mut message = Vec::with_capacity(
            Command::Instream.encode().len() + chunks.iter().map(|c| c.len() + 4).sum::<usize>(),
        );
        message.extend_from_slice(Command::Instream.encode());
        for (header, piece) in chunks.iter().flat_map(|chunk| proto::chunks(chunk)) {
            message.extend_from_slice(&header);
            message.extend_from_slice(piece);
        }
        // The end marker goes on its own, once nothing has come back: a
        // reply before it is an early one (clamd stopped reading).
        let mut written = self.conn.write_all(&message).await;
        if written.is_ok() && self.conn.anything_arrived() {
            written = Err(Error::Io(io::ErrorKind::ConnectionAborted.into()));
        }
        if written.is_ok() {
            written = self.conn.write_all(&proto::END_OF_STREAM).await;
        }
        if let Err(e) = written {
            let Error::Io(_) = e else { return Err(e) };
            // clamd answers and closes past StreamMaxLength, and the write
            // then fails while its reply is readable (as for a stream,
            // [`Instream::send`]). The session is over either way.
            return Err(match self.reply_within(Duration::from_secs(1)).await {
                Ok(reply) => early_reply(reply.as_bytes()),
                Err(_) => e,
            });
        }
        let reply = ScanReply::parse(self.reply().await?.as_bytes())?;
        // A server that answered before it had read it all and hung up is
        // often seen by now (its end, or the reset for the bytes it left).
        // Best effort: one look, no wait, since a session stays open after
        // a healthy reply and every small file would pay for a wait. A
        // close that comes later spoils only the next command.
        if reply == ScanReply::Clean && self.conn.anything_arrived() {
            return Err(Error::Desync("clamd answered OK, then closed or sent more"));
        }
        Ok(reply)
    }

    /// Reads the next reply and checks that it answers our last command.
    async fn reply(&mut self) -> Result<String, Error> {
        self.reply_within(self.conn.timeouts.reply).await
    }

    async fn reply_within(&mut self, limit: Duration) -> Result<String, Error> {
        let reply = self.conn.read_reply(limit).await?;
        let text = String::from_utf8(reply).map_err(|_| proto::ParseError::NotUtf8)?;
        let Some(body) = proto::strip_session_id(&text, self.next_id) else {
            return Err(proto::ParseError::Unexpected(format!(
                "reply {text:?} does not answer session command {}",
                self.next_id
            ))
            .into());
        };
        // One command, one reply: more already read is a second one.
        if !self.conn.buf.is_empty() {
            return Err(Error::Desync("more than one reply to one command"));
        }
        self.next_id += 1;
        self.idle_since = Instant::now();
        Ok(body.to_owned())
    }
}

/// An INSTREAM in progress: feed it with [`Instream::send`], end it with
/// [`Instream::finish`].
#[derive(Debug)]
pub struct Instream {
    conn: Connection,
    sent: u64,
}

impl Instream {
    /// Sends `data` as one or more chunks (split at [`proto::MAX_CHUNK`]).
    ///
    /// If the write fails, clamd may already have answered (it closes the
    /// connection past StreamMaxLength, and the write then fails with EPIPE
    /// while its reply is still readable), so we try to read that reply and
    /// return it as [`Error::EarlyReply`].
    pub async fn send(&mut self, data: &[u8]) -> Result<(), Error> {
        for (header, chunk) in proto::chunks(data) {
            let write = write_all_vectored(&mut self.conn.socket, &header, chunk);
            match timeout(self.conn.timeouts.io, write).await {
                Ok(Ok(())) => self.sent += chunk.len() as u64,
                Ok(Err(e)) => return Err(self.reply_after_write_error(Error::Io(e)).await),
                Err(_) => return Err(Error::Timeout("sending data to clamd")),
            }
        }
        Ok(())
    }

    /// Bytes of payload sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Ends the stream and waits for clamd's verdict.
    pub async fn finish(mut self) -> Result<ScanReply, Error> {
        // A reply before the end marker is an early one: clamd stopped
        // reading (an OK then covers part of the file only).
        if self.conn.anything_arrived() {
            return Err(self
                .reply_after_write_error(Error::Io(io::ErrorKind::ConnectionAborted.into()))
                .await);
        }
        if let Err(e) = self.conn.write_all(&proto::END_OF_STREAM).await {
            return Err(match e {
                Error::Io(_) => self.reply_after_write_error(e).await,
                other => other,
            });
        }
        let reply = self.conn.read_reply(self.conn.timeouts.reply).await?;
        let reply = ScanReply::parse(&reply)?;
        if reply == ScanReply::Clean {
            // A server that closes with bytes unread resets the connection
            // right after its reply (the reset leaves with the reply). clamd
            // itself closes only once it has removed its temporary copy of
            // the stream (3 ms for 20 MB, 30 ms for 150 MiB here), which
            // every large clean scan would otherwise wait for.
            self.conn.closed_cleanly(Duration::from_millis(3)).await?;
        }
        Ok(reply)
    }

    async fn reply_after_write_error(&mut self, original: Error) -> Error {
        // A short wait: either the reply is already in our receive buffer,
        // or the connection is simply gone.
        match self.conn.read_reply(Duration::from_secs(1)).await {
            Ok(reply) => early_reply(&reply),
            Err(_) => original,
        }
    }
}

/// A reply clamd sent before it had the whole stream (it hung up, past
/// StreamMaxLength say), as the error it is: an OK covers only what clamd
/// read, so it is no verdict; a detection or an error stands as it is.
fn early_reply(reply: &[u8]) -> Error {
    match ScanReply::parse(reply) {
        Ok(ScanReply::Clean) => Error::Protocol(proto::ParseError::Unexpected(format!(
            "{} before the stream ended",
            String::from_utf8_lossy(reply)
        ))),
        Ok(reply) => Error::EarlyReply(reply),
        Err(e) => Error::Protocol(e),
    }
}

/// Writes `header` then `body` with as few system calls as the socket
/// allows (one, usually): a chunk's 4-byte length sent on its own costs
/// clamd a read and, over TCP, a packet of its own.
async fn write_all_vectored(socket: &mut Socket, header: &[u8], body: &[u8]) -> io::Result<()> {
    let (mut header, mut body) = (header, body);
    while !header.is_empty() || !body.is_empty() {
        let parts = [io::IoSlice::new(header), io::IoSlice::new(body)];
        let written = socket.write_vectored(&parts).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_header = written.min(header.len());
        header = &header[from_header..];
        body = &body[written - from_header..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        let tcp: Address = "tcp://127.0.0.1:3310".parse().unwrap();
        assert_eq!(tcp, Address::Tcp("127.0.0.1:3310".into()));
        assert_eq!(tcp.to_string(), "tcp://127.0.0.1:3310");
        let v6: Address = "tcp://[::1]:3310".parse().unwrap();
        assert_eq!(v6, Address::Tcp("[::1]:3310".into()));
        let unix: Address = "unix:/run/clamav/clamd.ctl".parse().unwrap();
        assert_eq!(unix, Address::Unix("/run/clamav/clamd.ctl".into()));
        assert_eq!(unix.to_string(), "unix:/run/clamav/clamd.ctl");
        let unix3: Address = "unix:///run/clamd.sock".parse().unwrap();
        assert_eq!(unix3, Address::Unix("/run/clamd.sock".into()));
        for bad in [
            "127.0.0.1:3310",
            "tcp://",
            "tcp://host",
            "tcp://host:notaport",
            "tcp://:3310",
            "unix:relative.sock",
            "http://x:1",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad} parsed");
        }
    }

    async fn fake_clamd(reply: &'static [u8]) -> Address {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            // Read until the end-of-stream marker, then answer.
            let mut seen = Vec::new();
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
                if seen.ends_with(&[0, 0, 0, 0]) {
                    break;
                }
            }
            s.write_all(reply).await.unwrap();
        });
        Address::Tcp(addr.to_string())
    }

    #[tokio::test]
    async fn a_stream_arrives_framed_exactly_when_writes_are_partial() {
        // A reader that starts late, so the sender's socket buffer fills
        // and its writes come back short, in the header or in the data.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = Address::Tcp(listener.local_addr().unwrap().to_string());
        let received = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 3001];
            while !seen.ends_with(&proto::END_OF_STREAM) {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "the stream ended early");
                seen.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"stream: OK\0").await.unwrap();
            seen
        });
        let data: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let pieces = [&data[..5], &data[5..3_000_000], &data[3_000_000..]];
        let conn = Connection::connect(&addr, Timeouts::default())
            .await
            .unwrap();
        let mut stream = conn.instream().await.unwrap();
        for piece in pieces {
            stream.send(piece).await.unwrap();
        }
        assert_eq!(stream.finish().await.unwrap(), ScanReply::Clean);

        let mut expected = b"zINSTREAM\0".to_vec();
        for piece in pieces {
            for (header, chunk) in proto::chunks(piece) {
                expected.extend_from_slice(&header);
                expected.extend_from_slice(chunk);
            }
        }
        expected.extend_from_slice(&proto::END_OF_STREAM);
        let seen = received.await.unwrap();
        assert_eq!(seen.len(), expected.len());
        assert!(
            seen == expected,
            "the bytes on the wire differ from the framing"
        );
    }

    #[tokio::test]
    async fn an_ok_before_the_stream_ended_is_not_a_verdict() {
        // A server that answers OK after the first chunk and hangs up: the
        // next write fails and the reply is read, but it covers only what
        // was read. A detection in the same place is still a detection.
        for (reply, detection) in [(&b"stream: OK\0"[..], false), (b"stream: X FOUND\0", true)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = Address::Tcp(listener.local_addr().unwrap().to_string());
            tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut head = vec![0u8; 100_000];
                s.read_exact(&mut head).await.unwrap();
                s.write_all(reply).await.unwrap();
            });
            let conn = Connection::connect(&addr, Timeouts::default())
                .await
                .unwrap();
            let mut stream = conn.instream().await.unwrap();
            let data = vec![7u8; 8 << 20];
            let err = match stream.send(&data).await {
                Ok(()) => stream.finish().await.unwrap_err(),
                Err(e) => e,
            };
            if detection {
                assert!(
                    matches!(&err, Error::EarlyReply(ScanReply::Found(name)) if name == "X"),
                    "{err:?}"
                );
            } else {
                assert!(matches!(err, Error::Protocol(_)), "{err:?}");
            }
        }
    }

    #[tokio::test]
    async fn malformed_reply_is_a_protocol_error() {
        let addr = fake_clamd(b"stream: maybe\0").await;
        let conn = Connection::connect(&addr, Timeouts::default())
            .await
            .unwrap();
        let err = conn.scan_bytes(b"hello").await.unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_clamd_that_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = Address::Tcp(listener.local_addr().unwrap().to_string());
        let _hold = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(s);
        });
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            io: Duration::from_millis(200),
            reply: Duration::from_millis(300),
        };
        let conn = Connection::connect(&addr, timeouts).await.unwrap();
        let started = std::time::Instant::now();
        let err = conn.scan_bytes(b"hello").await.unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// A clamd stand-in for one session: reads commands and streams, and
    /// answers each with the next of `replies`; returns what it was sent.
    async fn fake_session(
        replies: &'static [&'static [u8]],
    ) -> (Address, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            // Reads up to a NUL (a command), or None at EOF.
            async fn command(s: &mut tokio::net::TcpStream, seen: &mut Vec<u8>) -> Option<()> {
                loop {
                    let b = s.read_u8().await.ok()?;
                    seen.push(b);
                    if b == 0 {
                        return Some(());
                    }
                }
            }
            command(&mut s, &mut seen).await; // zIDSESSION
            for reply in replies {
                if command(&mut s, &mut seen).await.is_none() {
                    break;
                }
                loop {
                    let len = s.read_u32().await.unwrap();
                    seen.extend_from_slice(&len.to_be_bytes());
                    if len == 0 {
                        break;
                    }
                    let mut chunk = vec![0u8; len as usize];
                    s.read_exact(&mut chunk).await.unwrap();
                    seen.extend_from_slice(&chunk);
                }
                s.write_all(reply).await.unwrap();
            }
            seen
        });
        (Address::Tcp(addr.to_string()), seen)
    }

    #[tokio::test]
    async fn a_session_numbers_its_replies_and_checks_them() {
        let (addr, seen) = fake_session(&[b"1: stream: OK\0", b"2: stream: Eicar FOUND\0"]).await;
        let conn = Connection::connect(&addr, Timeouts::default())
            .await
            .unwrap();
        let mut session = conn.session().await.unwrap();
        let chunk = [bytes::Bytes::from_static(b"hello")];
        assert_eq!(session.scan_chunks(&chunk).await.unwrap(), ScanReply::Clean);
        assert_eq!(
            session.scan_chunks(&chunk).await.unwrap(),
            ScanReply::Found("Eicar".into())
        );
        // The session was opened once; each file went as one INSTREAM.
        let mut one_scan = b"zINSTREAM\0\0\0\0\x05hello\0\0\0\0".to_vec();
        let mut expected = b"zIDSESSION\0".to_vec();
        expected.append(&mut one_scan.clone());
        expected.append(&mut one_scan);
        assert_eq!(seen.await.unwrap(), expected);

        // A reply numbered for another command is an error, not a verdict.
        let (addr, _) = fake_session(&[b"2: stream: OK\0"]).await;
        let conn = Connection::connect(&addr, Timeouts::default())
            .await
            .unwrap();
        let mut session = conn.session().await.unwrap();
        let err = session.scan_chunks(&chunk).await.unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{err:?}");
    }

    #[tokio::test]
    async fn descriptors_need_a_unix_socket() {
        let addr = fake_clamd(b"stream: OK\0").await;
        let conn = Connection::connect(&addr, Timeouts::default())
            .await
            .unwrap();
        let file = tempfile::tempfile().unwrap();
        use std::os::fd::AsFd;
        let err = conn.scan_fd(file.as_fd()).await.unwrap_err();
        assert!(matches!(err, Error::FdNeedsUnixSocket), "{err:?}");
    }

    #[tokio::test]
    async fn connection_refused_is_a_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = Address::Tcp(listener.local_addr().unwrap().to_string());
        drop(listener);
        let err = Connection::connect(&addr, Timeouts::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    }
}
