//! Arbitrary bytes as a multipart body (boundary `XyZ`), fed to the
//! sans-I/O reader in `avgate::http::multipart` whole and cut into reads
//! at the sizes the first input byte picks. It must never panic, must read
//! the body the same way however it is cut (accepted with the same parts,
//! or refused), must never hand out content that holds the delimiter, and
//! must only accept a body that ends with the closing delimiter, and must
//! never hand out content that holds the boundary string.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run multipart` from the repository
//! root (see fuzz/README.md).

#![no_main]

use avgate::http::multipart::{Event, Parser, PartHeaders};
use libfuzzer_sys::fuzz_target;

type Parts = Vec<(PartHeaders, Vec<u8>)>;

fn read(body: &[u8], step: usize) -> Option<Parts> {
    let mut parser = Parser::new(b"XyZ");
    let mut parts: Parts = Vec::new();
    let mut fed = 0;
    let mut in_part = false;
    loop {
        let eof = fed >= body.len();
        match parser.next(eof) {
            Err(_) => return None,
            Ok(None) => {
                assert!(!eof, "asked for more after the end");
                let end = (fed + step).min(body.len());
                parser.push(&body[fed..end]);
                fed = end;
            }
            Ok(Some(Event::Part(h))) => {
                assert!(!in_part, "a part inside a part");
                in_part = true;
                parts.push((h, Vec::new()));
            }
            Ok(Some(Event::Data(d))) => {
                assert!(in_part, "content outside a part");
                parts.last_mut().unwrap().1.extend_from_slice(&d);
            }
            Ok(Some(Event::PartEnd)) => {
                assert!(in_part, "the end of no part");
                in_part = false;
            }
            Ok(Some(Event::End)) => {
                assert!(!in_part, "the end of the form inside a part");
                return Some(parts);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let whole = read(body, body.len().max(1));
    let step = usize::from(first % 16) + 1;
    assert_eq!(read(body, step), whole, "read {step} bytes at a time");
    if let Some(parts) = whole {
        assert!(
            body.windows(7).any(|w| w == b"--XyZ--"),
            "accepted without a closing delimiter"
        );
        for (_, content) in parts {
            assert!(
                !content.windows(5).any(|w| w == b"--XyZ"),
                "content holds the boundary string"
            );
        }
    }
});
