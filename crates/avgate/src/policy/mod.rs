//! False positives and known-bad files: an ignore list of signature names,
//! an allow list and a block list of file hashes (sha256).
//!
//! # Layout
//! - here: the entry types and their validation, [`Snapshot`] (the entries
//!   in force at one moment, with the lookups the verdict needs) and
//!   [`PolicyNote`], the `policy` field of a scan answer.
//! - [`manage`]: add, remove, list; shared by the CLI and the admin API,
//!   audited.
//! - [`cli`]: `avgate policy ...`, on the store directly.
//! - [`runtime`]: [`Policy`], the policy of a running server: re-read when
//!   the store's policy version changes (polled, so CLI changes arrive
//!   too), when an entry expires and on SIGHUP; applied inside the managed
//!   clamd through [`clamd`].
//! - [`clamd`]: the files avgate writes into the managed clamd's database
//!   directory (`.ign2`, `.sfp`, the readiness-probe signature).
//!
//! # Why ignores are applied inside clamd
//! clamd's INSTREAM reports only the FIRST signature that matches a file.
//! Dropping an ignored name after the scan would turn "A and B matched"
//! into "clean": B was never reported. So the ignore list becomes an
//! `.ign2` file of the managed clamd, which then does not load A at all and
//! reports B. The check after the scan ([`crate::scan::verdict`]) is only a
//! guard: a reported signature that is on the ignore list means clamd did
//! not apply it (an external clamd, a reload still pending), and the
//! finding stands, unless `policy.ignore_after_scan` accepts the risk.
//!
//! Allow and block entries name the sha256 of a whole file, which avgate
//! computes itself while streaming: they are exact and are applied after
//! the scan, by any clamd. The managed clamd also gets the allow list as
//! an `.sfp` file, so that an allowed file inside an archive is not
//! reported either.

pub mod clamd;
pub mod cli;
pub mod manage;
pub mod runtime;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::Humantime;
use crate::store::clock;

pub use runtime::Policy;

/// The signature a blocked file is reported with.
pub const BLOCKLIST_SIGNATURE: &str = "avgate.Blocklist";
/// Prefix of policy entry ids.
pub const ID_PREFIX: &str = "pol_";
/// Suffix clamd gives names from unsigned databases; `.ign2` wants the
/// bare name.
const UNOFFICIAL: &str = ".UNOFFICIAL";
const MAX_NAME_LEN: usize = 200;
const MAX_REASON_LEN: usize = 500;
const MAX_AUTHOR_LEN: usize = 100;

/// What an entry does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A signature name that is a false positive everywhere.
    Ignore,
    /// The sha256 of a file known to be good.
    Allow,
    /// The sha256 of a file known to be bad.
    Block,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Ignore => "ignore",
            Kind::Allow => "allow",
            Kind::Block => "block",
        }
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Kind, String> {
        match s {
            "ignore" => Ok(Kind::Ignore),
            "allow" => Ok(Kind::Allow),
            "block" => Ok(Kind::Block),
            other => Err(format!(
                "unknown policy kind {other:?} (ignore, allow or block)"
            )),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry as stored. Entries are never deleted: a removed one keeps
/// who removed it and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    /// `pol_...`.
    pub id: String,
    pub kind: Kind,
    /// A bare signature name (ignore) or a lowercase sha256 (allow, block).
    pub value: String,
    pub reason: String,
    pub author: String,
    /// Unix seconds.
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub removed_at: Option<i64>,
    pub removed_by: Option<String>,
}

impl PolicyRecord {
    /// An entry for unit tests: reason `r`, author `a`, created at 0.
    #[cfg(test)]
    pub(crate) fn for_test(id: &str, kind: Kind, value: &str, expires_at: Option<i64>) -> Self {
        PolicyRecord {
            id: id.into(),
            kind,
            value: value.into(),
            reason: "r".into(),
            author: "a".into(),
            created_at: 0,
            expires_at,
            removed_at: None,
            removed_by: None,
        }
    }

    pub fn is_active(&self, now: i64) -> bool {
        self.removed_at.is_none() && self.expires_at.is_none_or(|t| t > now)
    }

    /// `active`, `expired` or `removed`.
    pub fn status(&self, now: i64) -> &'static str {
        if self.removed_at.is_some() {
            "removed"
        } else if self.is_active(now) {
            "active"
        } else {
            "expired"
        }
    }
}

/// A new entry as written by a person (CLI flags or the admin API's body).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyOptions {
    pub kind: String,
    /// The signature name (ignore) or the sha256 (allow, block).
    pub value: String,
    pub reason: String,
    /// From now: `30d`, `12h`. None or `never`: no expiry.
    #[serde(default)]
    pub expires: Option<String>,
    /// Who asked for it; defaults to the caller (token name, user).
    #[serde(default)]
    pub author: Option<String>,
}

/// A validated [`PolicyOptions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    pub kind: Kind,
    pub value: String,
    pub reason: String,
    pub expires_at: Option<i64>,
    pub author: Option<String>,
}

impl PolicyOptions {
    /// Checks and normalizes every field; `now` anchors a relative expiry.
    pub fn validate(&self, now: i64) -> Result<PolicySpec, String> {
        let kind: Kind = self.kind.trim().parse()?;
        let value = match kind {
            Kind::Ignore => signature_name(&self.value)?,
            Kind::Allow | Kind::Block => sha256(&self.value)?,
        };
        let reason = text("reason", &self.reason, MAX_REASON_LEN)?;
        if reason.is_empty() {
            return Err("a reason is required: say why (a ticket, the vendor's answer)".into());
        }
        let author = match self.author.as_deref() {
            Some(a) => Some(text("author", a, MAX_AUTHOR_LEN)?).filter(|a| !a.is_empty()),
            None => None,
        };
        let expires_at = match self.expires.as_deref().map(str::trim) {
            None | Some("never") | Some("") => None,
            Some(s) => {
                let d = s
                    .parse::<Humantime>()
                    .map_err(|e| format!("expires: {e}"))?
                    .0;
                if d.as_secs() == 0 {
                    return Err("expires: must be at least 1s in the future".into());
                }
                Some(now.saturating_add(d.as_secs().min(i64::MAX as u64) as i64))
            }
        };
        Ok(PolicySpec {
            kind,
            value,
            reason,
            expires_at,
            author,
        })
    }
}

/// A signature name as clamd's `.ign2` wants it: without `.UNOFFICIAL`,
/// without the characters that separate fields in clamd's databases.
/// avgate's own names and the "not fully scanned" ones cannot be ignored:
/// they are how avgate fails closed, not detections.
pub fn signature_name(raw: &str) -> Result<String, String> {
    let name = raw.trim();
    let name = name.strip_suffix(UNOFFICIAL).unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "a signature name has 1 to {MAX_NAME_LEN} characters"
        ));
    }
    // `#` first would make the line a comment in clamd's .ign2: listed as
    // ignored, it would hide nothing.
    if name.starts_with('#')
        || !name.bytes().all(|b| {
            b.is_ascii_graphic() && !matches!(b, b':' | b';' | b'/' | b'\\' | b'*' | b'"' | b'\'')
        })
    {
        return Err(format!(
            "{name:?} is not a signature name as clamd reports them (printable ASCII without \
             spaces or : ; / \\ * \" ', not starting with #)"
        ));
    }
    if crate::scan::verdict::is_unscannable(name) || name.starts_with("avgate.") {
        return Err(format!(
            "{name:?} says a file was not (fully) scanned or is avgate's own: it cannot be ignored"
        ));
    }
    Ok(name.to_owned())
}

/// A sha256 in hex, lowercased.
pub fn sha256(raw: &str) -> Result<String, String> {
    let s = raw.trim().to_ascii_lowercase();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{:?} is not a sha256 (64 hex digits, as `sha256sum FILE` prints)",
            raw.trim()
        ));
    }
    Ok(s)
}

fn text(what: &str, raw: &str, max: usize) -> Result<String, String> {
    let s = raw.trim();
    if s.chars().count() > max {
        return Err(format!("{what}: at most {max} characters"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{what}: no control characters (newlines, tabs)"));
    }
    // Shown in listings and the audit trail: nothing that reorders or
    // hides text there (bidi overrides, zero-width characters).
    if s.chars()
        .any(crate::scan::filename::is_invisible_formatting)
    {
        return Err(format!(
            "{what}: no invisible formatting characters (bidi controls, zero-width characters)"
        ));
    }
    Ok(s.to_owned())
}

/// A new entry id: `pol_` and 12 random base62 characters.
pub fn new_id() -> Result<String, getrandom::Error> {
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::from(ID_PREFIX);
    let mut buf = [0u8; 32];
    while out.len() < ID_PREFIX.len() + 12 {
        getrandom::fill(&mut buf)?;
        for b in buf {
            // 248 = 4 x 62: no modulo bias.
            if b < 248 && out.len() < ID_PREFIX.len() + 12 {
                out.push(BASE62[(b % 62) as usize] as char);
            }
        }
    }
    Ok(out)
}

/// The bare name of a signature as clamd reports it.
pub fn bare_name(reported: &str) -> &str {
    reported.strip_suffix(UNOFFICIAL).unwrap_or(reported)
}

/// Where ignores can be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClamdMode {
    /// avgate runs clamd and writes the ignore list into its database.
    Managed,
    /// External backends: avgate cannot change what they load.
    External,
}

/// The entries in force at one moment, and how to apply them.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The store's policy version this was read at.
    pub version: u64,
    pub clamd: ClamdMode,
    /// `policy.ignore_after_scan`: a reported ignored signature becomes OK
    /// (first-match risk accepted) instead of staying FOUND.
    pub ignore_after_scan: bool,
    ignore: HashMap<String, Arc<PolicyRecord>>,
    allow: HashMap<String, Arc<PolicyRecord>>,
    block: HashMap<String, Arc<PolicyRecord>>,
    /// The first time an entry in force expires.
    next_expiry: Option<i64>,
}

impl Snapshot {
    pub fn empty(clamd: ClamdMode, ignore_after_scan: bool) -> Snapshot {
        Snapshot::build(&[], 0, clock::now(), clamd, ignore_after_scan)
    }

    /// The entries of `records` in force at `now`. Of two live entries for
    /// the same value (which the store prevents), the older wins.
    pub fn build(
        records: &[PolicyRecord],
        version: u64,
        now: i64,
        clamd: ClamdMode,
        ignore_after_scan: bool,
    ) -> Snapshot {
        let mut snapshot = Snapshot {
            version,
            clamd,
            ignore_after_scan,
            ignore: HashMap::new(),
            allow: HashMap::new(),
            block: HashMap::new(),
            next_expiry: None,
        };
        for r in records.iter().filter(|r| r.is_active(now)) {
            let map = match r.kind {
                Kind::Ignore => &mut snapshot.ignore,
                Kind::Allow => &mut snapshot.allow,
                Kind::Block => &mut snapshot.block,
            };
            map.entry(r.value.clone())
                .or_insert_with(|| Arc::new(r.clone()));
            if let Some(t) = r.expires_at {
                snapshot.next_expiry = Some(snapshot.next_expiry.map_or(t, |n| n.min(t)));
            }
        }
        snapshot
    }

    /// The ids of the entries in force: two snapshots with the same ids
    /// apply the same policy.
    pub fn ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = [&self.ignore, &self.allow, &self.block]
            .iter()
            .flat_map(|m| m.values().map(|r| r.id.as_str()))
            .collect();
        ids.sort_unstable();
        ids
    }

    pub fn next_expiry(&self) -> Option<i64> {
        self.next_expiry
    }

    fn live<'a>(
        map: &'a HashMap<String, Arc<PolicyRecord>>,
        key: &str,
        now: i64,
    ) -> Option<&'a PolicyRecord> {
        // Checked again here: the snapshot may be a few seconds old.
        map.get(key)
            .map(|r| r.as_ref())
            .filter(|r| r.is_active(now))
    }

    pub fn blocked(&self, sha256: &str, now: i64) -> Option<&PolicyRecord> {
        Snapshot::live(&self.block, sha256, now)
    }

    /// Whether `reported` is clamd's name for a block entry that is no
    /// longer in force (`avgate.Blocklist.<id>`, from the managed clamd's
    /// `.hsb`, removed or expired): clamd loaded it before the change and
    /// reports it until it reloads. Such a finding is no verdict.
    pub fn withdrawn_block(&self, reported: &str, now: i64) -> bool {
        let Some(id) = reported
            .strip_prefix(BLOCKLIST_SIGNATURE)
            .and_then(|rest| rest.strip_prefix('.'))
        else {
            return false;
        };
        let id = id.strip_suffix(UNOFFICIAL).unwrap_or(id);
        !self.entries(Kind::Block, now).iter().any(|r| r.id == id)
    }

    pub fn allowed(&self, sha256: &str, now: i64) -> Option<&PolicyRecord> {
        Snapshot::live(&self.allow, sha256, now)
    }

    /// The ignore entry for a signature as clamd reported it.
    pub fn ignored(&self, reported: &str, now: i64) -> Option<&PolicyRecord> {
        if crate::scan::verdict::is_unscannable(reported) {
            return None;
        }
        Snapshot::live(&self.ignore, bare_name(reported), now)
    }

    /// Entries of one kind in force at `now`, sorted by value.
    pub fn entries(&self, kind: Kind, now: i64) -> Vec<&PolicyRecord> {
        let map = match kind {
            Kind::Ignore => &self.ignore,
            Kind::Allow => &self.allow,
            Kind::Block => &self.block,
        };
        let mut v: Vec<&PolicyRecord> = map
            .values()
            .map(|r| r.as_ref())
            .filter(|r| r.is_active(now))
            .collect();
        v.sort_by(|a, b| a.value.cmp(&b.value));
        v
    }
}

/// The `policy` field of a scan answer: present when a policy entry
/// decided the answer, or when an ignore entry matched but could not be
/// applied safely (then `applied` is false and the finding stands).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyNote {
    pub rule: Kind,
    /// The entry; absent for the readiness-probe case (no single entry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the rule changed the answer.
    pub applied: bool,
    /// The engine's finding the rule concerned: the one an allow entry
    /// overrode, the one ignored, or the one that stands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Why an ignore was not applied, or the risk that was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl PolicyNote {
    pub fn of(entry: &PolicyRecord, applied: bool, signature: Option<String>) -> PolicyNote {
        PolicyNote {
            rule: entry.kind,
            id: Some(entry.id.clone()),
            reason: Some(entry.reason.clone()),
            applied,
            signature,
            note: None,
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> PolicyNote {
        self.note = Some(note.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(kind: &str, value: &str) -> PolicyOptions {
        PolicyOptions {
            kind: kind.into(),
            value: value.into(),
            reason: "ticket 42".into(),
            ..Default::default()
        }
    }

    #[test]
    fn values_are_normalized_and_checked() {
        let spec = options("ignore", " Win.Test.Foo-1.UNOFFICIAL ")
            .validate(100)
            .unwrap();
        assert_eq!(
            (spec.kind, spec.value.as_str()),
            (Kind::Ignore, "Win.Test.Foo-1")
        );
        let upper = "275A021BBFB6489E54D471899F7DB9D1663FC695EC2FE2A2C4538AABF651FD0F";
        let spec = options("allow", upper).validate(100).unwrap();
        assert_eq!(spec.value, upper.to_ascii_lowercase());
        for (kind, bad) in [
            ("ignore", ""),
            ("ignore", "a:b"),
            ("ignore", "two words"),
            ("ignore", "line\nbreak"),
            // A comment line in .ign2: it would hide nothing.
            ("ignore", "#Win.Test.Foo-1"),
            ("ignore", "Heuristics.Limits.Exceeded.MaxFileSize"),
            ("ignore", "Heuristics.Encrypted.Zip"),
            ("ignore", "avgate.Blocklist"),
            ("allow", "abc"),
            ("block", &"g".repeat(64)),
            ("deny", "x"),
        ] {
            assert!(options(kind, bad).validate(0).is_err(), "{kind} {bad:?}");
        }
    }

    #[test]
    fn a_reason_is_required_and_expiry_is_relative() {
        let mut o = options("ignore", "X");
        o.reason = "  ".into();
        assert!(o.validate(0).is_err());
        o.reason = "why\nnot".into();
        assert!(o.validate(0).is_err());
        // Text that reads backwards in a listing or the audit trail.
        o.reason = "FP \u{202E}gnp.exe".into();
        assert!(o.validate(0).is_err());
        o.reason = "FP, vendor ticket 7".into();
        o.expires = Some("30d".into());
        assert_eq!(
            o.validate(1_000).unwrap().expires_at,
            Some(1_000 + 30 * 86_400)
        );
        o.expires = Some("never".into());
        assert_eq!(o.validate(1_000).unwrap().expires_at, None);
        o.expires = Some("0s".into());
        assert!(o.validate(1_000).is_err());
    }

    #[test]
    fn a_snapshot_holds_the_live_entries_and_checks_expiry_again() {
        let mut removed = PolicyRecord::for_test("pol_3", Kind::Ignore, "Gone", None);
        removed.removed_at = Some(5);
        let records = vec![
            PolicyRecord::for_test("pol_1", Kind::Ignore, "Win.Test.Foo", Some(200)),
            PolicyRecord::for_test("pol_2", Kind::Block, &"b".repeat(64), None),
            removed,
            PolicyRecord::for_test("pol_4", Kind::Allow, &"a".repeat(64), Some(50)),
        ];
        let s = Snapshot::build(&records, 7, 100, ClamdMode::Managed, false);
        assert_eq!(s.ids(), ["pol_1", "pol_2"]);
        assert_eq!(s.next_expiry(), Some(200));
        assert_eq!(
            s.ignored("Win.Test.Foo.UNOFFICIAL", 150).unwrap().id,
            "pol_1"
        );
        assert!(
            s.ignored("Win.Test.Foo", 200).is_none(),
            "expired meanwhile"
        );
        assert!(s.ignored("Gone", 150).is_none());
        assert!(s.blocked(&"b".repeat(64), 150).is_some());
        assert!(s.allowed(&"a".repeat(64), 150).is_none());
        assert!(new_id().unwrap().starts_with(ID_PREFIX));
        assert_eq!(new_id().unwrap().len(), 16);
    }
}
