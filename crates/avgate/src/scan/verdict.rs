//! The one place where engine results become `status`, `verdict` and
//! `score`. Nothing else in avgate decides whether a file is clean.

use serde::Serialize;

use super::{Detection, EngineReport};

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
    let mut worst: Option<Verdict> = None;
    for report in reports {
        let v = classify(&report.detection);
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
    })
}

fn classify(detection: &Detection) -> Verdict {
    match detection {
        Detection::Clean => Verdict {
            status: Status::OK,
            verdict: Kind::Clean,
            signature: None,
            score: 0,
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
}
