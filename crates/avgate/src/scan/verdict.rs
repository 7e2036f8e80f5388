//! The one place where engine results become `status`, `verdict` and
//! `score`. Nothing else in avgate decides whether a file is clean.
//!
//! [`decide`] reads the engines' reports; [`decide_with_policy`] then gives
//! the false-positive policy ([`crate::policy`]) its say: block and allow
//! entries by the file's sha256, and the guard for ignored signatures.

use serde::Serialize;

use super::{Detection, EngineReport};
use crate::policy::{self, PolicyNote, Snapshot};
use crate::store::clock;

/// The coarse answer, for clients that only check one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    /// Every byte was scanned and nothing was found.
    OK,
    /// A signature matched, or the file could not be scanned in full.
    FOUND,
    /// No result (engine down, timeout...). Only in error answers.
    ERROR,
}

/// The finer answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Clean,
    Infected,
    /// Not fully scanned: a limit was hit or the content is encrypted.
    /// Reported as FOUND so that clients that block anything but OK stay
    /// safe.
    Unscannable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub status: Status,
    pub verdict: Kind,
    pub signature: Option<String>,
    /// 0 (clean) to 100 (known malware); see [`score`].
    pub score: u8,
    /// Set when a policy entry decided the answer, or an ignore entry
    /// could not be applied safely: see [`decide_with_policy`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyNote>,
}

/// Signature name prefixes that mean "this file was not (fully) scanned".
/// clamd reports these with `AlertExceedsMax yes` / `AlertEncrypted yes`.
const UNSCANNABLE_PREFIXES: &[&str] = &[
    "Heuristics.Limits.Exceeded.",
    "Heuristics.Encrypted.",
    // Our own name for a stream refused by clamd's StreamMaxLength.
    "avgate.Limits.Exceeded.",
];

/// Decides the verdict from every engine's report. With no report at all
/// there is nothing to call clean: that is a caller bug, answered FOUND.
pub fn decide(reports: &[EngineReport]) -> Verdict {
    worst_of(reports.iter().map(|r| &r.detection))
}

fn worst_of<'a>(detections: impl Iterator<Item = &'a Detection>) -> Verdict {
    let mut worst: Option<Verdict> = None;
    for detection in detections {
        let v = classify(detection);
        worst = Some(match worst {
            Some(w) if rank(&w) >= rank(&v) => w,
            _ => v,
        });
    }
    worst.unwrap_or(Verdict {
        status: Status::FOUND,
        verdict: Kind::Unscannable,
        signature: Some("avgate.NoEngineResult".into()),
        score: 50,
        policy: None,
    })
}

/// [`decide`], then the policy in `snapshot`, for a file whose sha256 is
/// `sha256`:
///
/// 1. a **blocked** hash is FOUND (`avgate.Blocklist`, score 100), whatever
///    the engines said;
/// 2. an **allowed** hash is OK, whatever the engines said: it is exactly
///    the file someone judged good;
/// 3. a reported signature on the **ignore** list means clamd did not
///    apply the ignore (an external clamd, or the managed one before its
///    reload). clamd reports only the first match, so dropping the name
///    here could hide a second signature: the finding stands, annotated,
///    unless `policy.ignore_after_scan` accepts that risk.
pub fn decide_with_policy(reports: &[EngineReport], sha256: &str, snapshot: &Snapshot) -> Verdict {
    let now = clock::now();
    let found = || decide(reports).signature;
    if let Some(entry) = snapshot.blocked(sha256, now) {
        return Verdict {
            status: Status::FOUND,
            verdict: Kind::Infected,
            signature: Some(policy::BLOCKLIST_SIGNATURE.into()),
            score: 100,
            policy: Some(PolicyNote::of(entry, true, found())),
        };
    }
    if let Some(entry) = snapshot.allowed(sha256, now) {
        return Verdict {
            policy: Some(PolicyNote::of(entry, true, found())),
            ..classify(&Detection::Clean)
        };
    }
    let mut notes = Vec::new();
    // Only the detections matter from here on: the engines' details stay
    // in `reports`.
    let kept: Vec<Detection> = reports
        .iter()
        .map(|report| {
            let Detection::Found(name) = &report.detection else {
                return Detection::Clean;
            };
            if let Some(entry) = snapshot.ignored(name, now) {
                let note = PolicyNote::of(entry, snapshot.ignore_after_scan, Some(name.clone()));
                if snapshot.ignore_after_scan {
                    notes.push(note.with_note(
                        "ignored after the scan (policy.ignore_after_scan): clamd reports only the first match, so another signature on this file would not be seen",
                    ));
                    return Detection::Clean;
                }
                notes.push(note.with_note(match snapshot.clamd {
                    policy::ClamdMode::Managed => {
                        "not applied yet: the managed clamd has not loaded this ignore (reload in progress or failed); the finding stands"
                    }
                    policy::ClamdMode::External => {
                        "not applied: an external clamd does not load avgate's ignore list, and dropping its first match could hide another; the finding stands (policy.ignore_after_scan accepts that risk)"
                    }
                }));
            } else if policy::bare_name(name) == policy::clamd::PROBE_SIGNATURE {
                notes.push(PolicyNote {
                    rule: policy::Kind::Ignore,
                    id: None,
                    reason: None,
                    applied: false,
                    signature: Some(name.clone()),
                    note: Some(
                        "this is the EICAR test file, avgate's readiness probe: it stays detected while its signatures are ignored"
                            .into(),
                    ),
                });
            }
            report.detection.clone()
        })
        .collect();
    let mut verdict = worst_of(kept.iter());
    // The note that explains this answer: an ignore that made it OK, or
    // the one about the finding reported.
    verdict.policy = notes.into_iter().find(|n| match verdict.status {
        Status::OK => n.applied,
        _ => !n.applied && n.signature == verdict.signature,
    });
    verdict
}

fn classify(detection: &Detection) -> Verdict {
    match detection {
        Detection::Clean => Verdict {
            status: Status::OK,
            verdict: Kind::Clean,
            signature: None,
            score: 0,
            policy: None,
        },
        Detection::Found(name) => {
            let kind = if is_unscannable(name) {
                Kind::Unscannable
            } else {
                Kind::Infected
            };
            Verdict {
                status: Status::FOUND,
                verdict: kind,
                signature: Some(name.clone()),
                score: score(kind, name),
                policy: None,
            }
        }
    }
}

pub fn is_unscannable(signature: &str) -> bool {
    UNSCANNABLE_PREFIXES
        .iter()
        .any(|p| signature.starts_with(p))
}

/// The score says how sure the finding is, for clients that want a
/// threshold rather than a yes/no:
/// - 100: a signature of known malware (or a test signature),
/// - 80: a heuristic detection (`Heuristics.*`, e.g. phishing, broken
///   executables),
/// - 60: potentially unwanted software (`PUA.*`),
/// - 50: not fully scanned (unscannable),
/// - 0: clean.
pub fn score(kind: Kind, signature: &str) -> u8 {
    match kind {
        Kind::Clean => 0,
        Kind::Unscannable => 50,
        Kind::Infected if signature.starts_with("PUA.") => 60,
        Kind::Infected if signature.starts_with("Heuristics.") => 80,
        Kind::Infected => 100,
    }
}

/// Worse verdicts win when several engines answer.
fn rank(v: &Verdict) -> u16 {
    let kind = match v.verdict {
        Kind::Clean => 0,
        Kind::Unscannable => 1,
        Kind::Infected => 2,
    };
    kind * 256 + u16::from(v.score)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::EngineInfo;

    fn report(d: Detection) -> EngineReport {
        EngineReport {
            detection: d,
            engine: EngineInfo {
                name: "clamav",
                version: None,
                database: None,
                database_date: None,
                backend: "test".into(),
            },
        }
    }

    #[test]
    fn clean_is_ok_with_no_signature() {
        let v = decide(&[report(Detection::Clean)]);
        assert_eq!(v.status, Status::OK);
        assert_eq!(v.verdict, Kind::Clean);
        assert_eq!(v.signature, None);
        assert_eq!(v.score, 0);
    }

    #[test]
    fn a_signature_is_infected() {
        let v = decide(&[report(Detection::Found(
            "Eicar-Test-Signature.UNOFFICIAL".into(),
        ))]);
        assert_eq!(
            (v.status, v.verdict, v.score),
            (Status::FOUND, Kind::Infected, 100)
        );
        let pua = decide(&[report(Detection::Found("PUA.Win.Tool.Foo".into()))]);
        assert_eq!((pua.verdict, pua.score), (Kind::Infected, 60));
    }

    #[test]
    fn limits_and_encryption_are_unscannable_never_ok() {
        for name in [
            "Heuristics.Limits.Exceeded.MaxFileSize",
            "Heuristics.Limits.Exceeded.MaxScanTime",
            "Heuristics.Limits.Exceeded.MaxRecursion",
            "Heuristics.Encrypted.Zip",
            "avgate.Limits.Exceeded.StreamMaxLength",
        ] {
            let v = decide(&[report(Detection::Found(name.into()))]);
            assert_eq!(v.status, Status::FOUND, "{name}");
            assert_eq!(v.verdict, Kind::Unscannable, "{name}");
            assert_eq!(v.signature.as_deref(), Some(name));
        }
    }

    #[test]
    fn no_report_is_never_clean() {
        assert_ne!(decide(&[]).status, Status::OK);
    }

    #[test]
    fn the_worst_engine_wins() {
        let v = decide(&[
            report(Detection::Clean),
            report(Detection::Found(
                "Heuristics.Limits.Exceeded.MaxFileSize".into(),
            )),
            report(Detection::Clean),
        ]);
        assert_eq!(v.verdict, Kind::Unscannable);
        let v = decide(&[
            report(Detection::Found("Heuristics.Encrypted.Zip".into())),
            report(Detection::Found("Win.Trojan.X".into())),
        ]);
        assert_eq!(v.signature.as_deref(), Some("Win.Trojan.X"));
    }

    mod with_policy {
        use super::*;
        use crate::policy::{ClamdMode, Kind as Rule, PolicyRecord};

        const FILE: &str = "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f";

        fn entry(id: &str, kind: Rule, value: &str) -> PolicyRecord {
            PolicyRecord {
                id: id.into(),
                kind,
                value: value.into(),
                reason: format!("reason {id}"),
                author: "ops".into(),
                created_at: 0,
                expires_at: None,
                removed_at: None,
                removed_by: None,
            }
        }

        fn snapshot(entries: &[PolicyRecord], mode: ClamdMode, after_scan: bool) -> Snapshot {
            Snapshot::build(entries, 1, clock::now(), mode, after_scan)
        }

        fn found(name: &str) -> EngineReport {
            report(Detection::Found(name.into()))
        }

        #[test]
        fn no_entry_changes_nothing() {
            let s = snapshot(&[], ClamdMode::Managed, false);
            for r in [report(Detection::Clean), found("Win.Test.X")] {
                assert_eq!(
                    decide_with_policy(std::slice::from_ref(&r), FILE, &s),
                    decide(&[r])
                );
            }
        }

        #[test]
        fn block_wins_over_everything_and_allow_over_any_finding() {
            let s = snapshot(
                &[
                    entry("pol_b", Rule::Block, FILE),
                    entry("pol_a", Rule::Allow, FILE),
                ],
                ClamdMode::Managed,
                false,
            );
            let v = decide_with_policy(&[report(Detection::Clean)], FILE, &s);
            assert_eq!(
                (v.status, v.verdict, v.score),
                (Status::FOUND, Kind::Infected, 100)
            );
            assert_eq!(v.signature.as_deref(), Some("avgate.Blocklist"));
            let note = v.policy.unwrap();
            assert_eq!(
                (note.rule, note.id.as_deref(), note.applied),
                (Rule::Block, Some("pol_b"), true)
            );
            assert_eq!(note.reason.as_deref(), Some("reason pol_b"));

            let s = snapshot(
                &[entry("pol_a", Rule::Allow, FILE)],
                ClamdMode::External,
                false,
            );
            for name in ["Win.Test.X", "Heuristics.Limits.Exceeded.MaxFileSize"] {
                let v = decide_with_policy(&[found(name)], FILE, &s);
                assert_eq!((v.status, v.verdict, v.score), (Status::OK, Kind::Clean, 0));
                assert_eq!(v.signature, None);
                let note = v.policy.unwrap();
                assert_eq!((note.rule, note.applied), (Rule::Allow, true));
                assert_eq!(
                    note.signature.as_deref(),
                    Some(name),
                    "the finding overridden"
                );
            }
            // Another file's hash: no say.
            let other = "1".repeat(64);
            assert_eq!(
                decide_with_policy(&[found("Win.Test.X")], &other, &s).status,
                Status::FOUND
            );
        }

        #[test]
        fn an_ignored_signature_reported_by_clamd_stays_found_by_default() {
            for mode in [ClamdMode::Managed, ClamdMode::External] {
                let s = snapshot(
                    &[entry("pol_i", Rule::Ignore, "Eicar-Test-Signature")],
                    mode,
                    false,
                );
                let v = decide_with_policy(&[found("Eicar-Test-Signature.UNOFFICIAL")], FILE, &s);
                assert_eq!(v.status, Status::FOUND, "{mode:?}");
                assert_eq!(
                    v.signature.as_deref(),
                    Some("Eicar-Test-Signature.UNOFFICIAL")
                );
                let note = v.policy.unwrap();
                assert_eq!(
                    (note.rule, note.id.as_deref(), note.applied),
                    (Rule::Ignore, Some("pol_i"), false)
                );
                assert!(note.note.unwrap().contains("the finding stands"));
            }
        }

        #[test]
        fn notes_are_plain_sentences() {
            let ignore = entry("pol_i", Rule::Ignore, "Win.Test.Fp");
            let probe = format!("{}.UNOFFICIAL", crate::policy::clamd::PROBE_SIGNATURE);
            let cases = [
                (ClamdMode::Managed, false, "Win.Test.Fp"),
                (ClamdMode::External, false, "Win.Test.Fp"),
                (ClamdMode::External, true, "Win.Test.Fp"),
                (ClamdMode::Managed, false, probe.as_str()),
            ];
            for (mode, after_scan, name) in cases {
                let s = snapshot(std::slice::from_ref(&ignore), mode, after_scan);
                let v = decide_with_policy(&[found(name)], FILE, &s);
                let note = v.policy.and_then(|p| p.note).expect("a note");
                // Clients show these to people (a line broken in the
                // source once put runs of spaces in them).
                assert!(!note.contains("  ") && !note.contains('\n'), "{note:?}");
            }
        }

        #[test]
        fn ignoring_after_the_scan_is_an_opt_in() {
            let s = snapshot(
                &[entry("pol_i", Rule::Ignore, "Win.Test.Fp")],
                ClamdMode::External,
                true,
            );
            let v = decide_with_policy(&[found("Win.Test.Fp")], FILE, &s);
            assert_eq!((v.status, v.verdict), (Status::OK, Kind::Clean));
            let note = v.policy.unwrap();
            assert!(note.applied);
            assert_eq!(note.signature.as_deref(), Some("Win.Test.Fp"));
            // Another engine's finding still counts, and the note about the
            // ignored one is not the answer's.
            let v = decide_with_policy(&[found("Win.Test.Fp"), found("Win.Trojan.Real")], FILE, &s);
            assert_eq!(v.signature.as_deref(), Some("Win.Trojan.Real"));
            assert_eq!(v.policy, None);
            // "Not fully scanned" is never ignored.
            let v =
                decide_with_policy(&[found("Heuristics.Limits.Exceeded.MaxScanTime")], FILE, &s);
            assert_eq!(v.verdict, Kind::Unscannable);
        }

        #[test]
        fn the_readiness_probe_signature_stays_found() {
            let s = snapshot(
                &[entry("pol_i", Rule::Ignore, "Eicar-Test-Signature")],
                ClamdMode::Managed,
                false,
            );
            let v = decide_with_policy(&[found("avgate.ReadinessProbe.UNOFFICIAL")], FILE, &s);
            assert_eq!((v.status, v.score), (Status::FOUND, 100));
            let note = v.policy.unwrap();
            assert!(!note.applied);
            assert_eq!(note.id, None);
        }

        #[test]
        fn expired_entries_no_longer_apply() {
            let mut e = entry("pol_b", Rule::Block, FILE);
            e.expires_at = Some(clock::now() + 1000);
            let s = Snapshot::build(&[e], 1, clock::now(), ClamdMode::Managed, false);
            assert_eq!(
                decide_with_policy(&[report(Detection::Clean)], FILE, &s).status,
                Status::FOUND
            );
            // Built before the expiry, read after it: checked again.
            let mut e = entry("pol_b", Rule::Block, FILE);
            e.expires_at = Some(clock::now() - 1);
            let s = Snapshot::build(&[e], 1, clock::now() - 10, ClamdMode::Managed, false);
            assert_eq!(
                decide_with_policy(&[report(Detection::Clean)], FILE, &s).status,
                Status::OK
            );
        }
    }
}
