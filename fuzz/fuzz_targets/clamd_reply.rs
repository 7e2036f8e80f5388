//! Arbitrary bytes as clamd replies: the sans-I/O parsers in
//! `clamd::proto` must never panic, never accept a reply without a
//! terminator, and never call anything clean that is not exactly
//! `stream: OK` (INSTREAM) or `fd[N]: OK` (FILDES).
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run clamd_reply` from the repository
//! root (see fuzz/README.md).

#![no_main]

use clamd::proto::{self, Frame, ScanReply, Stats, Version, MAX_REPLY_LEN};
use libfuzzer_sys::fuzz_target;

/// The exact tolerance `ScanReply::parse` documents: trailing newlines,
/// carriage returns and spaces (a proxy in n-mode), nothing else.
fn trimmed(text: &str) -> &str {
    text.trim_end_matches(['\n', '\r', ' '])
}

fn check_scan_reply(reply: &[u8]) {
    let Ok(parsed) = ScanReply::parse(reply) else {
        return;
    };
    // Whatever parsed was UTF-8.
    let text = std::str::from_utf8(reply).expect("a parsed reply is UTF-8");
    let text = trimmed(text);
    match parsed {
        // The one property the gateway's fail-closed rule rests on.
        ScanReply::Clean => assert_eq!(text, "stream: OK", "Clean from {text:?}"),
        ScanReply::Found(name) => {
            assert!(!name.is_empty(), "empty signature from {text:?}");
            assert!(
                !name.contains(['\n', '\r']),
                "multi-line name from {text:?}"
            );
            assert_eq!(text, format!("stream: {name} FOUND"));
        }
        // About the stream (`stream: ... ERROR`) or about the command
        // itself, e.g. `Error writing to temporary file ERROR`.
        ScanReply::Error(reason) => assert!(
            text == format!("stream: {reason} ERROR")
                || (!reason.trim().is_empty() && text == format!("{reason} ERROR")),
            "Error({reason:?}) from {text:?}"
        ),
        ScanReply::SizeLimitExceeded => {
            assert!(text.starts_with("INSTREAM size limit exceeded"))
        }
    }
}

/// FILDES replies: `fd[N]: ...`, or an error about the command itself.
fn check_fildes_reply(reply: &[u8]) {
    let Ok(parsed) = ScanReply::parse_fildes(reply) else {
        return;
    };
    let text = trimmed(std::str::from_utf8(reply).expect("a parsed reply is UTF-8"));
    let subject_ok = |body: &str| {
        text.strip_suffix(body)
            .and_then(|s| s.strip_prefix("fd["))
            .and_then(|s| s.strip_suffix("]: "))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    match parsed {
        ScanReply::Clean => assert!(subject_ok("OK"), "Clean from {text:?}"),
        ScanReply::Found(name) => {
            assert!(!name.is_empty() && !name.contains(['\n', '\r']), "{text:?}");
            assert!(subject_ok(&format!("{name} FOUND")), "Found from {text:?}");
        }
        ScanReply::Error(reason) => assert!(text.ends_with(&format!("{reason} ERROR"))),
        ScanReply::SizeLimitExceeded => panic!("FILDES has no size limit reply: {text:?}"),
    }
}

fn check_version(reply: &[u8]) {
    let Ok(v) = Version::parse(reply) else {
        return;
    };
    assert!(!v.clamav.is_empty());
    let text = trimmed(std::str::from_utf8(reply).expect("UTF-8"));
    assert!(text.starts_with("ClamAV "));
    // Display is not byte-identical to the input ("/027461" prints as
    // "/27461"), but printing and parsing again must give the same value.
    assert_eq!(Version::parse(v.to_string().as_bytes()), Ok(v));
}

fn check_stats(reply: &[u8]) {
    if Stats::parse(reply).is_ok() {
        let text = std::str::from_utf8(reply).expect("UTF-8");
        assert!(text.contains("THREADS:") && text.contains("END"));
    }
}

fn check_pong(reply: &[u8]) {
    if proto::parse_pong(reply).is_ok() {
        assert!(reply == b"PONG" || reply == b"PONG\n", "{reply:?}");
    }
    if proto::parse_reloading(reply).is_ok() {
        assert!(
            reply == b"RELOADING" || reply == b"RELOADING\n",
            "{reply:?}"
        );
    }
}

fn check_all_parsers(reply: &[u8]) {
    check_scan_reply(reply);
    check_fildes_reply(reply);
    check_version(reply);
    check_stats(reply);
    check_pong(reply);
}

fuzz_target!(|data: &[u8]| {
    // 1. The parsers on the raw input, as if it were one whole reply.
    check_all_parsers(data);

    // 2. The framer on the raw input, as a receive buffer: split it into
    //    replies the way conn.rs does, and parse each.
    let mut buf = data;
    loop {
        match proto::frame(buf) {
            Ok(Frame::Complete(reply, used)) => {
                assert!(used >= 1 && used <= buf.len());
                assert_eq!(used, reply.len() + 1, "consumes the reply and its NUL");
                assert_eq!(buf[reply.len()], 0, "a reply ends at a NUL");
                assert!(!reply.contains(&0), "a reply holds no NUL");
                assert!(reply.len() <= MAX_REPLY_LEN);
                check_all_parsers(reply);
                buf = &buf[used..];
            }
            Ok(Frame::Incomplete) => {
                assert!(!buf.contains(&0), "incomplete although a NUL is there");
                assert!(buf.len() <= MAX_REPLY_LEN, "unbounded buffering");
                break;
            }
            Err(_) => {
                // Refused only for length: the reply (or the NUL-less
                // buffer) is longer than the limit.
                let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                assert!(end > MAX_REPLY_LEN);
                break;
            }
        }
    }

    // 3. Chunk headers: big-endian, never zero (that is END_OF_STREAM).
    if data.len() >= 4 {
        let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        match proto::chunk_header(n) {
            Some(h) => {
                assert_ne!(n, 0);
                assert_eq!(u32::from_be_bytes(h) as usize, n);
                assert_ne!(h, proto::END_OF_STREAM);
            }
            None => assert_eq!(n, 0),
        }
    }
});
