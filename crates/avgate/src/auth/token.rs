//! The token format, sans I/O.
//!
//! ```text
//! avg_ 5Hq0...(43 chars)... Wc3k9Z
//! |    |                    |
//! |    |                    checksum: CRC32 of everything before it, base62, 6 chars
//! |    43 base62 characters from the OS's CSPRNG: 256 bits
//! prefix: recognisable by people and secret scanners
//! ```
//!
//! As with GitHub's tokens, the checksum lets a secret scanner tell a real
//! leaked token from a random string without asking us, and lets avgate
//! refuse a mistyped token without touching the store. Only the SHA-256 of
//! a token is stored; the token itself exists in the answer to its creation
//! and nowhere else. [`Token`]'s `Debug` shows the prefix only.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const PREFIX: &str = "avg_";
const BODY_LEN: usize = 43;
const CHECKSUM_LEN: usize = 6;
/// Length of a whole token.
pub const TOKEN_LEN: usize = PREFIX.len() + BODY_LEN + CHECKSUM_LEN;
/// Prefix of a token id (not secret: logged, shown, used in URLs).
pub const ID_PREFIX: &str = "tok_";
const ID_BODY_LEN: usize = 12;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A secret API token. Not `Display`: use [`Token::expose`] where printing
/// it is the point (once, at creation).
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({PREFIX}***)")
    }
}

/// Why a string is not a well-formed token. Never shown to clients (every
/// refusal looks the same to them); kept for the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("malformed")]
    Malformed,
    #[error("bad checksum")]
    Checksum,
}

impl Token {
    /// A fresh token from the operating system's random generator.
    pub fn generate() -> Result<Token, getrandom::Error> {
        let mut token = String::with_capacity(TOKEN_LEN);
        token.push_str(PREFIX);
        token.push_str(&random_base62(BODY_LEN)?);
        token.push_str(&checksum(&token));
        Ok(Token(token))
    }

    /// Checks the shape and the checksum (no store involved).
    pub fn parse(s: &str) -> Result<Token, FormatError> {
        if s.len() != TOKEN_LEN || !s.starts_with(PREFIX) {
            return Err(FormatError::Malformed);
        }
        let rest = &s.as_bytes()[PREFIX.len()..];
        if !rest.iter().all(u8::is_ascii_alphanumeric) {
            return Err(FormatError::Malformed);
        }
        let (data, sum) = s.split_at(TOKEN_LEN - CHECKSUM_LEN);
        if checksum(data).as_bytes() != sum.as_bytes() {
            return Err(FormatError::Checksum);
        }
        Ok(Token(s.to_owned()))
    }

    /// The secret itself, for the one time it is handed out.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What the store keeps.
    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.0.as_bytes()).into())
    }
}

/// SHA-256 of a token. A token carries 256 random bits, so a fast hash is
/// enough: there is nothing to brute-force that is cheaper than the token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Constant-time comparison: how long it takes says nothing about how
    /// many leading bytes match.
    pub fn ct_eq(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}...)", hex::encode(&self.0[..4]))
    }
}

/// A new token id: `tok_` and 12 base62 characters.
pub fn new_id() -> Result<String, getrandom::Error> {
    Ok(format!("{ID_PREFIX}{}", random_base62(ID_BODY_LEN)?))
}

/// The checksum of `data`: its CRC32 in base62, zero-padded to 6 characters
/// (62^6 > 2^32).
pub fn checksum(data: &str) -> String {
    let mut n = crc32fast::hash(data.as_bytes());
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `len` uniformly random base62 characters: bytes at or above 248 (= 4 x 62)
/// are thrown away so that `% 62` has no bias.
fn random_base62(len: usize) -> Result<String, getrandom::Error> {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf)?;
        for b in buf {
            if b < 248 && out.len() < len {
                out.push(BASE62[(b % 62) as usize] as char);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_has_the_documented_shape() {
        let t = Token::generate().unwrap();
        let s = t.expose();
        assert_eq!(s.len(), TOKEN_LEN);
        assert_eq!(TOKEN_LEN, 53);
        assert!(s.starts_with("avg_"));
        assert!(s[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(Token::parse(s).unwrap(), t);
        // 43 base62 characters carry at least 256 bits.
        assert!(BODY_LEN as f64 * 62f64.log2() >= 256.0);
        assert_ne!(Token::generate().unwrap(), t, "tokens are random");
    }

    #[test]
    fn the_checksum_is_crc32_in_base62() {
        // Python: zlib.crc32(b"avg_test") == 2689752245, in base62: 2w1vQj
        assert_eq!(crc32fast::hash(b"avg_test"), 2_689_752_245);
        assert_eq!(checksum("avg_test"), "2w1vQj");
        assert_eq!(checksum("").len(), 6);
        assert_eq!(checksum(""), "000000", "crc32 of nothing is 0");
    }

    #[test]
    fn any_single_changed_character_is_caught() {
        let t = Token::generate().unwrap();
        let s = t.expose().as_bytes().to_vec();
        for i in PREFIX.len()..s.len() {
            for c in [b'0', b'a', b'Z', b'9'] {
                if s[i] == c {
                    continue;
                }
                let mut changed = s.clone();
                changed[i] = c;
                let changed = String::from_utf8(changed).unwrap();
                assert_eq!(
                    Token::parse(&changed),
                    Err(FormatError::Checksum),
                    "position {i}"
                );
            }
        }
    }

    #[test]
    fn malformed_tokens() {
        let t = Token::generate().unwrap();
        let s = t.expose();
        for bad in [
            String::new(),
            "avg_".into(),
            s[..s.len() - 1].to_owned(),
            format!("{s}0"),
            s.replacen("avg_", "gvg_", 1),
            s.replacen("avg_", "AVG_", 1),
            format!("{}-{}", &s[..10], &s[11..]),
            format!("{} ", &s[..s.len() - 1]),
            format!("{}é", &s[..s.len() - 2]),
        ] {
            assert_eq!(Token::parse(&bad), Err(FormatError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = Token::generate().unwrap();
        let shown = format!("{t:?} {:?}", t.hash());
        assert!(!shown.contains(&t.expose()[4..12]), "{shown}");
        assert!(shown.contains("avg_***"));
    }

    #[test]
    fn hashes_compare_in_constant_time_and_correctly() {
        let a = Token::generate().unwrap().hash();
        let b = Token::generate().unwrap().hash();
        assert!(a.ct_eq(&a));
        assert!(!a.ct_eq(&b));
        let mut last_differs = a;
        last_differs.0[31] ^= 1;
        assert!(!a.ct_eq(&last_differs));
    }

    #[test]
    fn ids() {
        let id = new_id().unwrap();
        assert!(id.starts_with("tok_") && id.len() == 16, "{id}");
        assert_ne!(id, new_id().unwrap());
    }
}
