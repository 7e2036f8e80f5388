//! The policy as files of the managed clamd's database directory (which
//! avgate owns, see [`crate::managed::database`]):
//!
//! - `avgate-policy.ign2`: the ignored signature names, bare (clamd's
//!   `.UNOFFICIAL` suffix is not part of the name it matches). clamd does
//!   not load them at all, so a second signature on the same file is
//!   still reported.
//! - `avgate-policy.sfp`: the allowed sha256s, `sha256:*:name:73` (`*`:
//!   any size, which needs functionality level 73). clamd then reports an
//!   allowed file as clean, also inside an archive.
//! - `avgate-policy-block.hsb`: the blocked sha256s,
//!   `sha256:*:avgate.Blocklist.<id>:73`, so that clamd also finds a
//!   blocked file inside an archive (the check after the scan sees only
//!   the file as uploaded). Dated 1970 like the probe's file: it must not
//!   make the database look fresh.
//! - `avgate-probe.hsb`: the EICAR test file under avgate's own name,
//!   while any signature is ignored. avgate's readiness probe scans EICAR
//!   and wants FOUND; an ignored EICAR signature would take every backend
//!   out of rotation. clamd reports a body signature before a whole-file
//!   hash, so this name shows only when the EICAR signatures are ignored,
//!   and only for the exact 68-byte test file (which then stays FOUND).
//!
//! Empty lists are removed rather than written: clamd refuses an empty
//! `.sfp`. Nothing here talks to clamd: the caller reloads it.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use sha2::{Digest, Sha256};

use super::{Kind, Snapshot};
use crate::managed::ManagedClamd;

pub const IGNORE_FILE: &str = "avgate-policy.ign2";
pub const ALLOW_FILE: &str = "avgate-policy.sfp";
pub const BLOCK_FILE: &str = "avgate-policy-block.hsb";
pub const PROBE_FILE: &str = "avgate-probe.hsb";
/// The name the readiness-probe signature is reported with (plus
/// `.UNOFFICIAL`).
pub const PROBE_SIGNATURE: &str = "avgate.ReadinessProbe";

/// What the database directory should hold; `None`: no such file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Files {
    pub ignore: Option<String>,
    pub allow: Option<String>,
    pub block: Option<String>,
    pub probe: Option<String>,
}

fn eicar_sha256() -> String {
    hex::encode(Sha256::digest(clamd::EICAR))
}

impl Files {
    /// The files for the entries of `snapshot` in force at `now`.
    pub fn render(snapshot: &Snapshot, now: i64) -> Files {
        let ignores = snapshot.entries(Kind::Ignore, now);
        let ignore: String = ignores.iter().map(|r| format!("{}\n", r.value)).collect();
        // EICAR's own hash stays out of both: allowed, it would hide the
        // probe; blocked, it would change the probe's answer. The check
        // after the scan allows or blocks that file all the same.
        let eicar = eicar_sha256();
        let hash_lines = |kind: Kind, name: &str| -> String {
            snapshot
                .entries(kind, now)
                .iter()
                .filter(|r| r.value != eicar)
                .map(|r| format!("{}:*:{name}.{}:73\n", r.value, r.id))
                .collect()
        };
        let allow = hash_lines(Kind::Allow, "avgate.Allow");
        let block = hash_lines(Kind::Block, super::BLOCKLIST_SIGNATURE);
        Files {
            block: Some(block).filter(|s| !s.is_empty()),
            probe: (!ignore.is_empty())
                .then(|| format!("{eicar}:{}:{PROBE_SIGNATURE}\n", clamd::EICAR.len())),
            ignore: Some(ignore).filter(|s| !s.is_empty()),
            allow: Some(allow).filter(|s| !s.is_empty()),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Files::default()
    }

    /// Ignored names, for the logs.
    pub fn ignored_count(&self) -> usize {
        self.ignore.as_deref().map_or(0, |s| s.lines().count())
    }

    pub fn allowed_count(&self) -> usize {
        self.allow.as_deref().map_or(0, |s| s.lines().count())
    }

    /// The sha256s in the `.sfp`.
    pub fn allowed_hashes(&self) -> impl Iterator<Item = &str> {
        self.allow
            .as_deref()
            .unwrap_or("")
            .lines()
            .filter_map(|l| l.split(':').next())
    }
}

/// Where the files go: the managed clamd (its own writer), or a plain
/// directory (unit tests).
pub trait Directory {
    fn path(&self) -> &Path;
    fn write(&self, name: &str, contents: &[u8]) -> anyhow::Result<()>;
    fn remove(&self, name: &str) -> anyhow::Result<bool>;
}

impl Directory for ManagedClamd {
    fn path(&self) -> &Path {
        self.database_dir()
    }

    fn write(&self, name: &str, contents: &[u8]) -> anyhow::Result<()> {
        self.write_local_file(name, contents)
    }

    fn remove(&self, name: &str) -> anyhow::Result<bool> {
        self.remove_local_file(name)
    }
}

/// Makes the directory hold `files`. The order keeps every intermediate
/// state safe for a reload that happens meanwhile: the probe signature
/// arrives before the ignore list and leaves after it.
pub fn write(dir: &dyn Directory, files: &Files) -> anyhow::Result<()> {
    let put = |name: &str, contents: &Option<String>| -> anyhow::Result<()> {
        match contents {
            Some(c) => dir.write(name, c.as_bytes()),
            None => dir.remove(name).map(drop),
        }
        .with_context(|| format!("policy file {name}"))
    };
    if files.probe.is_some() {
        put(PROBE_FILE, &files.probe)?;
        age_out(&dir.path().join(PROBE_FILE));
    }
    put(BLOCK_FILE, &files.block)?;
    if files.block.is_some() {
        age_out(&dir.path().join(BLOCK_FILE));
    }
    put(ALLOW_FILE, &files.allow)?;
    put(IGNORE_FILE, &files.ignore)?;
    if files.probe.is_none() {
        put(PROBE_FILE, &None)?;
    }
    Ok(())
}

/// How far after the epoch [`age_out`] dates a file.
pub(crate) const AGED_OUT_SECS: u64 = 1;

/// Dates a file at the epoch. For an unsigned database the age that
/// readiness checks is that of the newest signature file: avgate's probe
/// signature must not make a stale database look fresh.
pub(crate) fn age_out(path: &Path) {
    let result = std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(UNIX_EPOCH + Duration::from_secs(AGED_OUT_SECS)));
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot date the probe signature file");
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::policy::{ClamdMode, PolicyRecord};

    struct Plain(PathBuf);

    impl Directory for Plain {
        fn path(&self) -> &Path {
            &self.0
        }
        fn write(&self, name: &str, contents: &[u8]) -> anyhow::Result<()> {
            Ok(std::fs::write(self.0.join(name), contents)?)
        }
        fn remove(&self, name: &str) -> anyhow::Result<bool> {
            Ok(std::fs::remove_file(self.0.join(name)).is_ok())
        }
    }

    #[test]
    fn files_follow_the_entries_in_force() {
        let eicar = eicar_sha256();
        assert_eq!(
            eicar,
            "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"
        );
        let sha = "ab".repeat(32);
        let records = vec![
            PolicyRecord::for_test("pol_b", Kind::Ignore, "Win.Test.B", None),
            PolicyRecord::for_test("pol_a", Kind::Ignore, "Win.Test.A", None),
            PolicyRecord::for_test("pol_c", Kind::Allow, &sha, None),
            PolicyRecord::for_test("pol_e", Kind::Allow, &eicar, None),
            PolicyRecord::for_test("pol_d", Kind::Block, &"cd".repeat(32), None),
            PolicyRecord::for_test("pol_f", Kind::Block, &eicar, None),
        ];
        let s = Snapshot::build(&records, 1, 10, ClamdMode::Managed, false);
        let files = Files::render(&s, 10);
        assert_eq!(files.ignore.as_deref(), Some("Win.Test.A\nWin.Test.B\n"));
        assert_eq!(
            files.allow.as_deref(),
            Some(format!("{sha}:*:avgate.Allow.pol_c:73\n").as_str())
        );
        assert_eq!(
            files.probe.as_deref(),
            Some(format!("{eicar}:68:avgate.ReadinessProbe\n").as_str())
        );
        assert_eq!(
            files.block.as_deref(),
            Some(format!("{}:*:avgate.Blocklist.pol_d:73\n", "cd".repeat(32)).as_str())
        );
        assert_eq!((files.ignored_count(), files.allowed_count()), (2, 1));

        let dir = tempfile::tempdir().unwrap();
        let plain = Plain(dir.path().to_owned());
        write(&plain, &files).unwrap();
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            names(dir.path()),
            [BLOCK_FILE, IGNORE_FILE, ALLOW_FILE, PROBE_FILE]
        );
        // Signature files of avgate's own never date the database.
        for file in [PROBE_FILE, BLOCK_FILE] {
            let time = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .modified()
                .unwrap();
            assert!(time < UNIX_EPOCH + Duration::from_secs(60), "{file}");
        }

        // Nothing in force: nothing written, and the files go away.
        let none = Files::render(&Snapshot::build(&[], 2, 10, ClamdMode::Managed, false), 10);
        assert!(none.is_empty());
        write(&plain, &none).unwrap();
        assert!(names(dir.path()).is_empty());
    }
}
