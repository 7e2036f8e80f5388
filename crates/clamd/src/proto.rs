//! The clamd wire protocol, without I/O.
//!
//! Everything here turns values into bytes or bytes into values; sockets,
//! timeouts and retries live in [`crate::conn`] and [`crate::pool`]. Keeping
//! the parser free of I/O lets it be unit-tested and fuzzed on its own.
//!
//! We always use the `z` command prefix: commands and replies end with NUL,
//! which cannot occur inside a signature name or a reason, so a reply is
//! exactly "everything up to the first NUL".

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest reply we accept from clamd. Real replies are a few hundred bytes
/// (STATS is the longest, ~1 KiB per thread pool); anything larger is a
/// broken or hostile peer and is refused rather than buffered without bound.
pub const MAX_REPLY_LEN: usize = 64 * 1024;

/// Smallest INSTREAM chunk we send (except the last data chunk of a stream).
/// Measured on loopback: 64 KiB chunks beat 4 KiB ones by ~35 %.
pub const MIN_CHUNK: usize = 64 * 1024;

/// Largest INSTREAM chunk we send. clamd reads a chunk into its own buffer;
/// keeping chunks moderate bounds both our and clamd's memory per stream.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// The zero-length chunk that ends an INSTREAM.
pub const END_OF_STREAM: [u8; 4] = [0, 0, 0, 0];

/// A clamd command that avgate sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Ping,
    Version,
    Stats,
    Reload,
    Instream,
    /// Scan a file descriptor passed with the next byte (Unix sockets only).
    Fildes,
    /// Start a session: later commands on the connection are answered
    /// `N: reply`, N counting from 1.
    IdSession,
}

impl Command {
    /// The bytes to send, `z`-prefixed and NUL-terminated.
    pub fn encode(self) -> &'static [u8] {
        match self {
            Command::Ping => b"zPING\0",
            Command::Version => b"zVERSION\0",
            Command::Stats => b"zSTATS\0",
            Command::Reload => b"zRELOAD\0",
            Command::Instream => b"zINSTREAM\0",
            Command::Fildes => b"zFILDES\0",
            Command::IdSession => b"zIDSESSION\0",
        }
    }
}

/// The 4-byte big-endian length header that precedes each INSTREAM chunk.
///
/// Returns `None` for a zero length (that is [`END_OF_STREAM`], not a chunk)
/// or a length that does not fit the u32 the protocol carries.
pub fn chunk_header(len: usize) -> Option<[u8; 4]> {
    match u32::try_from(len) {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n.to_be_bytes()),
    }
}

/// `data` as INSTREAM chunks: pieces of at most [`MAX_CHUNK`] bytes, each
/// with its length header (nothing for empty data).
pub fn chunks(data: &[u8]) -> impl Iterator<Item = ([u8; 4], &[u8])> {
    data.chunks(MAX_CHUNK)
        .filter_map(|piece| chunk_header(piece.len()).map(|header| (header, piece)))
}

/// Where a reply ends in a receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole reply (without its NUL) and the number of bytes it consumed.
    Complete(&'a [u8], usize),
    /// No NUL yet: read more.
    Incomplete,
}

/// Finds the first NUL-terminated reply in `buf`.
///
/// Mirrors mini-redis's `Frame::check`: decide whether a whole frame is
/// there before parsing it, so a partial read never yields half a reply.
pub fn frame(buf: &[u8]) -> Result<Frame<'_>, ParseError> {
    match buf.iter().position(|&b| b == 0) {
        Some(end) if end > MAX_REPLY_LEN => Err(ParseError::TooLong),
        Some(end) => Ok(Frame::Complete(&buf[..end], end + 1)),
        None if buf.len() > MAX_REPLY_LEN => Err(ParseError::TooLong),
        None => Ok(Frame::Incomplete),
    }
}

/// Why a reply could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    #[error("reply is longer than {MAX_REPLY_LEN} bytes")]
    TooLong,
    #[error("reply is not valid UTF-8")]
    NotUtf8,
    #[error("unexpected reply: {0:?}")]
    Unexpected(String),
}

/// The answer to one INSTREAM (or FILDES).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanReply {
    /// `stream: OK`: clamd scanned the stream and found nothing. Whether it
    /// scanned all of it depends on `AlertExceedsMax`; see the crate docs.
    Clean,
    /// `stream: <Name> FOUND`: the first signature that matched.
    Found(String),
    /// `stream: <reason> ERROR`: clamd could not scan the stream.
    Error(String),
    /// `INSTREAM size limit exceeded. ERROR`: the stream passed clamd's
    /// StreamMaxLength; clamd closed the connection without scanning.
    SizeLimitExceeded,
}

impl ScanReply {
    /// Parses the answer to an INSTREAM: `stream: ...`.
    pub fn parse(reply: &[u8]) -> Result<ScanReply, ParseError> {
        let text = reply_text(reply)?;
        if text.starts_with("INSTREAM size limit exceeded") {
            return Ok(ScanReply::SizeLimitExceeded);
        }
        match text.strip_prefix("stream: ") {
            Some(body) => Self::parse_body(text, body),
            // clamd's own trouble with the stream comes without the
            // subject, e.g. `Error writing to temporary file ERROR` when
            // its TemporaryDirectory is full. It is this file's failure,
            // not a broken daemon.
            None => Self::parse_bare_error(text),
        }
    }

    /// Parses the answer to a FILDES: `fd[N]: ...` for a scan, or an
    /// error about the command itself, such as `No file descriptor
    /// received. ERROR` (which comes back as [`ScanReply::Error`]).
    pub fn parse_fildes(reply: &[u8]) -> Result<ScanReply, ParseError> {
        let text = reply_text(reply)?;
        let subject = text.split_once(": ").and_then(|(subject, body)| {
            let n = subject.strip_prefix("fd[")?.strip_suffix(']')?;
            (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(body)
        });
        match subject {
            Some(body) => Self::parse_body(text, body),
            None => Self::parse_bare_error(text),
        }
    }

    /// `<reason> ERROR`: an error about the command rather than a scan.
    fn parse_bare_error(text: &str) -> Result<ScanReply, ParseError> {
        match text.strip_suffix(" ERROR") {
            Some(reason) if !reason.trim().is_empty() => Ok(ScanReply::Error(reason.to_owned())),
            _ => Err(ParseError::Unexpected(truncate(text))),
        }
    }

    /// The part after `subject: `.
    fn parse_body(text: &str, body: &str) -> Result<ScanReply, ParseError> {
        if body == "OK" {
            return Ok(ScanReply::Clean);
        }
        if let Some(name) = body.strip_suffix(" FOUND") {
            if !name.is_empty() && !name.contains(['\n', '\r']) {
                return Ok(ScanReply::Found(name.to_owned()));
            }
        }
        if let Some(reason) = body.strip_suffix(" ERROR") {
            return Ok(ScanReply::Error(reason.to_owned()));
        }
        Err(ParseError::Unexpected(truncate(text)))
    }
}

/// The reply to command `id` of a session without its `id: ` prefix, or
/// `None` if it answers another command (or is not a session reply).
pub fn strip_session_id(reply: &str, id: u64) -> Option<&str> {
    let (n, rest) = reply.split_once(": ")?;
    (n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<u64>().ok()? == id).then_some(rest)
}

/// A reply as text. Replies end with NUL in z-mode, but a trailing newline
/// or spaces are tolerated so that a misconfigured proxy in between does
/// not turn a FOUND into a parse error.
fn reply_text(reply: &[u8]) -> Result<&str, ParseError> {
    let text = std::str::from_utf8(reply).map_err(|_| ParseError::NotUtf8)?;
    Ok(text.trim_end_matches(['\n', '\r', ' ']))
}

/// What `VERSION` reports: `ClamAV 1.4.6` without a signed database,
/// `ClamAV 1.4.6/27461/Tue Nov 24 09:25:11 2026` with one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub clamav: String,
    pub database: Option<u32>,
    pub database_date: Option<String>,
}

impl Version {
    pub fn parse(reply: &[u8]) -> Result<Version, ParseError> {
        let text = std::str::from_utf8(reply).map_err(|_| ParseError::NotUtf8)?;
        let text = text.trim_end_matches(['\n', '\r', ' ']);
        let Some(rest) = text.strip_prefix("ClamAV ") else {
            return Err(ParseError::Unexpected(truncate(text)));
        };
        let mut parts = rest.splitn(3, '/');
        let clamav = parts.next().unwrap_or_default().to_owned();
        if clamav.is_empty() {
            return Err(ParseError::Unexpected(truncate(text)));
        }
        let database = match parts.next() {
            Some(db) => Some(
                db.parse()
                    .map_err(|_| ParseError::Unexpected(truncate(text)))?,
            ),
            None => None,
        };
        let database_date = parts.next().map(str::to_owned);
        Ok(Version {
            clamav,
            database,
            database_date,
        })
    }
}

impl Version {
    /// When the loaded signed database was built, from `database_date`.
    /// `None` without a signed database or for a date that does not parse.
    pub fn database_time(&self) -> Option<SystemTime> {
        self.database_date.as_deref().and_then(parse_ctime)
    }
}

/// Parses a date in C's `ctime` format without its newline, as clamd's
/// VERSION prints the database date: `Tue Nov 24 09:25:11 2026`, the day
/// padded with a space (`Tue Nov  3 ...`).
///
/// clamd formats it in its own local time zone and does not say which;
/// it is read as UTC. That is exact for a clamd running in UTC (servers,
/// containers) and off by the zone's offset (hours) elsewhere, which is
/// small against a maximum database age of days.
pub fn parse_ctime(text: &str) -> Option<SystemTime> {
    let mut words = text.split_whitespace();
    let _weekday = words.next()?;
    let month = match words.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let day: u32 = words.next()?.parse().ok()?;
    let mut clock = words.next()?.split(':').map(|n| n.parse::<u32>().ok());
    let (hour, minute, second) = (clock.next()??, clock.next()??, clock.next()??);
    let year: i64 = words.next()?.parse().ok()?;
    if words.next().is_some() || clock.next().is_some() {
        return None;
    }
    if !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 || year < 1970 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    u64::try_from(seconds)
        .ok()
        .map(|s| UNIX_EPOCH + std::time::Duration::from_secs(s))
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar
/// (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClamAV {}", self.clamav)?;
        if let Some(db) = self.database {
            write!(f, "/{db}")?;
        }
        if let Some(date) = &self.database_date {
            write!(f, "/{date}")?;
        }
        Ok(())
    }
}

/// The parts of `STATS` we use. clamd documents the format as subject to
/// change, so only these fields are read and anything else is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub threads_live: u32,
    pub threads_idle: u32,
    pub threads_max: u32,
    pub queue: u32,
}

impl Stats {
    pub fn parse(reply: &[u8]) -> Result<Stats, ParseError> {
        let text = std::str::from_utf8(reply).map_err(|_| ParseError::NotUtf8)?;
        let mut stats = Stats::default();
        let (mut saw_threads, mut saw_end) = (false, false);
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("THREADS:") {
                // "THREADS: live 1  idle 0 max 12 idle-timeout 30"
                let words: Vec<&str> = rest.split_whitespace().collect();
                for pair in words.windows(2) {
                    let value = pair[1].parse().ok();
                    match (pair[0], value) {
                        ("live", Some(v)) => stats.threads_live = v,
                        ("idle", Some(v)) => stats.threads_idle = v,
                        ("max", Some(v)) => stats.threads_max = v,
                        _ => {}
                    }
                }
                saw_threads = true;
            } else if let Some(rest) = line.strip_prefix("QUEUE:") {
                // "QUEUE: 0 items"
                if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                    stats.queue = n;
                }
            } else if line == "END" {
                saw_end = true;
            }
        }
        if saw_threads && saw_end {
            Ok(stats)
        } else {
            Err(ParseError::Unexpected(truncate(text)))
        }
    }
}

/// `zPING` must be answered `PONG`.
pub fn parse_pong(reply: &[u8]) -> Result<(), ParseError> {
    match reply.strip_suffix(b"\n").unwrap_or(reply) {
        b"PONG" => Ok(()),
        other => Err(ParseError::Unexpected(truncate(&String::from_utf8_lossy(
            other,
        )))),
    }
}

/// `zRELOAD` must be answered `RELOADING`.
pub fn parse_reloading(reply: &[u8]) -> Result<(), ParseError> {
    match reply.strip_suffix(b"\n").unwrap_or(reply) {
        b"RELOADING" => Ok(()),
        other => Err(ParseError::Unexpected(truncate(&String::from_utf8_lossy(
            other,
        )))),
    }
}

/// Keeps error messages (which end up in logs) short even when a peer
/// sends something huge.
fn truncate(text: &str) -> String {
    const MAX: usize = 200;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_z_prefixed_and_nul_terminated() {
        for cmd in [
            Command::Ping,
            Command::Version,
            Command::Stats,
            Command::Reload,
            Command::Instream,
            Command::Fildes,
            Command::IdSession,
        ] {
            let bytes = cmd.encode();
            assert_eq!(bytes[0], b'z', "{cmd:?}");
            assert_eq!(*bytes.last().unwrap(), 0, "{cmd:?}");
            assert_eq!(bytes.iter().filter(|&&b| b == 0).count(), 1);
        }
    }

    #[test]
    fn chunk_header_is_big_endian_and_never_zero() {
        assert_eq!(chunk_header(1), Some([0, 0, 0, 1]));
        assert_eq!(chunk_header(65536), Some([0, 1, 0, 0]));
        assert_eq!(chunk_header(0), None);
        assert_eq!(chunk_header(u32::MAX as usize), Some([255; 4]));
        #[cfg(target_pointer_width = "64")]
        assert_eq!(chunk_header(u32::MAX as usize + 1), None);
    }

    #[test]
    fn data_is_cut_into_headed_chunks_of_at_most_max_chunk() {
        assert_eq!(chunks(b"").count(), 0);
        let small: Vec<_> = chunks(b"abc").collect();
        assert_eq!(small, vec![([0, 0, 0, 3], &b"abc"[..])]);
        let big = vec![7u8; MAX_CHUNK + 5];
        let pieces: Vec<_> = chunks(&big).collect();
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].0, chunk_header(MAX_CHUNK).unwrap());
        assert_eq!(pieces[0].1.len(), MAX_CHUNK);
        assert_eq!(pieces[1], ([0, 0, 0, 5], &big[MAX_CHUNK..]));
    }

    #[test]
    fn frame_waits_for_nul_and_reports_consumed_bytes() {
        assert_eq!(frame(b"stream: O").unwrap(), Frame::Incomplete);
        assert_eq!(
            frame(b"stream: OK\0rest").unwrap(),
            Frame::Complete(b"stream: OK", 11)
        );
        assert_eq!(frame(b"\0").unwrap(), Frame::Complete(b"", 1));
    }

    #[test]
    fn frame_refuses_unbounded_replies() {
        let long = vec![b'a'; MAX_REPLY_LEN + 1];
        assert_eq!(frame(&long), Err(ParseError::TooLong));
        let mut long_with_nul = long.clone();
        long_with_nul.push(0);
        assert_eq!(frame(&long_with_nul), Err(ParseError::TooLong));
    }

    #[test]
    fn scan_replies() {
        assert_eq!(ScanReply::parse(b"stream: OK").unwrap(), ScanReply::Clean);
        assert_eq!(
            ScanReply::parse(b"stream: Eicar-Test-Signature.UNOFFICIAL FOUND").unwrap(),
            ScanReply::Found("Eicar-Test-Signature.UNOFFICIAL".into())
        );
        assert_eq!(
            ScanReply::parse(b"stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND").unwrap(),
            ScanReply::Found("Heuristics.Limits.Exceeded.MaxFileSize".into())
        );
        assert_eq!(
            ScanReply::parse(b"stream: Can't allocate memory ERROR").unwrap(),
            ScanReply::Error("Can't allocate memory".into())
        );
        assert_eq!(
            ScanReply::parse(b"INSTREAM size limit exceeded. ERROR").unwrap(),
            ScanReply::SizeLimitExceeded
        );
        // What clamd 1.4 answers when its TemporaryDirectory is full.
        assert_eq!(
            ScanReply::parse(b"Error writing to temporary file ERROR").unwrap(),
            ScanReply::Error("Error writing to temporary file".into())
        );
        // Newline-terminated (n-mode) replies are tolerated.
        assert_eq!(ScanReply::parse(b"stream: OK\n").unwrap(), ScanReply::Clean);
    }

    #[test]
    fn scan_reply_garbage_is_an_error_never_clean() {
        for bad in [
            &b""[..],
            b"OK",
            b"stream:OK",
            b"stream: ",
            b"stream:  FOUND",
            b"stream: FOUND",
            b"UNKNOWN COMMAND",
            b"stream: OKAY",
            b"\xff\xfe",
            b"1: stream: OK",
            b" ERROR",
            b"   ERROR",
            b"ERROR",
        ] {
            assert!(
                ScanReply::parse(bad).is_err(),
                "{:?} parsed",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn fildes_replies() {
        assert_eq!(
            ScanReply::parse_fildes(b"fd[11]: OK").unwrap(),
            ScanReply::Clean
        );
        assert_eq!(
            ScanReply::parse_fildes(b"fd[7]: ClamAV-Test-File.UNOFFICIAL FOUND").unwrap(),
            ScanReply::Found("ClamAV-Test-File.UNOFFICIAL".into())
        );
        assert_eq!(
            ScanReply::parse_fildes(b"No file descriptor received. ERROR").unwrap(),
            ScanReply::Error("No file descriptor received.".into())
        );
        assert_eq!(
            ScanReply::parse_fildes(b"fd[7]: Can't allocate memory ERROR").unwrap(),
            ScanReply::Error("Can't allocate memory".into())
        );
        for bad in [
            &b"stream: OK"[..],
            b"fd[]: OK",
            b"fd[x]: OK",
            b"fd[1] OK",
            b"fd[1]: OKAY",
            b"OK",
            b" ERROR",
            b"",
        ] {
            assert!(
                ScanReply::parse_fildes(bad).is_err(),
                "{:?} parsed",
                String::from_utf8_lossy(bad)
            );
        }
        // An INSTREAM reply parser never takes a FILDES reply as clean.
        assert!(ScanReply::parse(b"fd[11]: OK").is_err());
    }

    #[test]
    fn session_replies_carry_the_command_number() {
        assert_eq!(strip_session_id("1: stream: OK", 1), Some("stream: OK"));
        assert_eq!(
            strip_session_id("12: fd[9]: Eicar FOUND", 12),
            Some("fd[9]: Eicar FOUND")
        );
        assert_eq!(strip_session_id("2: stream: OK", 1), None);
        assert_eq!(strip_session_id("stream: OK", 1), None);
        assert_eq!(strip_session_id("+1: stream: OK", 1), None);
        assert_eq!(strip_session_id(": stream: OK", 1), None);
    }

    #[test]
    fn version_with_and_without_database() {
        assert_eq!(
            Version::parse(b"ClamAV 1.4.6").unwrap(),
            Version {
                clamav: "1.4.6".into(),
                database: None,
                database_date: None
            }
        );
        let v = Version::parse(b"ClamAV 1.4.6/27461/Tue Nov 24 09:25:11 2026").unwrap();
        assert_eq!(v.clamav, "1.4.6");
        assert_eq!(v.database, Some(27461));
        assert_eq!(v.database_date.as_deref(), Some("Tue Nov 24 09:25:11 2026"));
        assert_eq!(v.to_string(), "ClamAV 1.4.6/27461/Tue Nov 24 09:25:11 2026");
        assert!(Version::parse(b"PONG").is_err());
        assert!(Version::parse(b"ClamAV ").is_err());
        assert!(Version::parse(b"ClamAV 1.0/notanumber/x").is_err());
    }

    #[test]
    fn database_dates_parse_as_utc() {
        let at = |s| parse_ctime(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs());
        // date -u -d '2026-11-24 09:25:11' +%s
        assert_eq!(at("Tue Nov 24 09:25:11 2026"), Some(1_795_512_311));
        assert_eq!(at("Thu Jan  1 00:00:00 1970"), Some(0));
        assert_eq!(at("Tue Feb 29 12:00:00 2028"), Some(1_835_438_400));
        assert_eq!(at("Wed Nov  4 01:02:03 2026"), Some(1_793_754_123));
        for bad in [
            "",
            "Tue Nov 24 09:25:11",
            "Tue Foo 24 09:25:11 2026",
            "Tue Nov 24 09:25 2026",
            "Tue Nov 24 25:00:00 2026",
            "Tue Nov 32 09:25:11 2026",
            "Tue Nov 24 09:25:11 2026 extra",
            "Tue Nov 24 09:25:11:00 2026",
        ] {
            assert_eq!(at(bad), None, "{bad:?}");
        }
        let v = Version::parse(b"ClamAV 1.4.6/27461/Tue Nov 24 09:25:11 2026").unwrap();
        assert_eq!(
            v.database_time(),
            Some(UNIX_EPOCH + std::time::Duration::from_secs(1_795_512_311))
        );
        assert_eq!(
            Version::parse(b"ClamAV 1.4.6").unwrap().database_time(),
            None
        );
    }

    #[test]
    fn stats_reads_threads_and_queue() {
        let reply = b"POOLS: 1\n\nSTATE: VALID PRIMARY\nTHREADS: live 2  idle 1 max 12 idle-timeout 30\nQUEUE: 3 items\n\tSTATS 0.000028\n\nMEMSTATS: heap N/A mmap N/A used N/A free N/A releasable N/A pools 1 pools_used 1306.837M pools_total 1306.883M\nEND";
        let stats = Stats::parse(reply).unwrap();
        assert_eq!(
            stats,
            Stats {
                threads_live: 2,
                threads_idle: 1,
                threads_max: 12,
                queue: 3
            }
        );
        assert!(Stats::parse(b"THREADS: live 1\n").is_err(), "no END");
        assert!(Stats::parse(b"END").is_err(), "no THREADS");
    }

    #[test]
    fn pong_and_reloading() {
        assert!(parse_pong(b"PONG").is_ok());
        assert!(parse_pong(b"PONG\n").is_ok());
        assert!(parse_pong(b"PING").is_err());
        assert!(parse_reloading(b"RELOADING").is_ok());
        assert!(parse_reloading(b"stream: OK").is_err());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        let s = "é".repeat(300);
        let t = truncate(&s);
        assert!(t.ends_with("..."));
        assert!(t.len() <= 203);
    }
}
