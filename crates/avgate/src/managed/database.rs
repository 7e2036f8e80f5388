//! The managed clamd's database directory, which avgate owns.
//!
//! clamd reads `<data_dir>/clamd/db`, never `/var/lib/clamav` directly, so
//! avgate can put its own files next to the signatures (the `.ign2` and
//! `.sfp` of false-positive handling) without owning the system directory.
//! The directory holds:
//!
//! - **symbolic links** to the database files of the sources: avgate's own
//!   freshclam directory (`<data_dir>/clamd/freshclam`, when avgate runs
//!   freshclam) and `/var/lib/clamav` (or `managed.database_dir`). Links go
//!   by name, so they keep working when freshclam replaces a file (it
//!   renames a new one into place); [`DatabaseLayout::sync`] adds and
//!   removes links when names come and go (`daily.cvd` becoming
//!   `daily.cld`).
//! - the built-in **test signatures**, only while no source holds an
//!   official database (beside custom signatures, if any: the readiness
//!   probe needs EICAR found);
//! - **local files**: regular files written by avgate
//!   ([`DatabaseLayout::write_local_file`]) or dropped in by an operator.
//!   `sync` never touches them.
//!
//! Nothing here talks to clamd: after a change, the caller reloads it
//! ([`crate::signatures::Signatures::reload`]).

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context};
use clamd::database::{has_official, is_database_file};

use super::DatabaseKind;

/// The built-in test signatures: EICAR and the test program that every file
/// of Debian's clamav-testfiles package carries (and `Avgate-Test-Second`,
/// a text pattern with which tests put two findings into one file).
pub const TEST_SIGNATURES: &[(&str, &str)] = &[
    (
        "avgate-test.ndb",
        include_str!("../../../../signatures/avgate-test.ndb"),
    ),
    (
        "avgate-test.hdb",
        include_str!("../../../../signatures/avgate-test.hdb"),
    ),
];

/// Names of the official databases: never written as local files.
const OFFICIAL_STEMS: &[&str] = &["main", "daily", "bytecode"];

/// Where the managed clamd's signatures come from and go.
#[derive(Debug, Clone)]
pub struct DatabaseLayout {
    /// clamd's `DatabaseDirectory`: links, test signatures, local files.
    pub dir: PathBuf,
    /// avgate's freshclam `DatabaseDirectory`, when avgate runs freshclam.
    pub freshclam_dir: Option<PathBuf>,
    /// `/var/lib/clamav`, or `managed.database_dir`.
    pub system_dir: PathBuf,
    /// `system_dir` was named in the configuration.
    pub configured: bool,
}

/// What [`DatabaseLayout::sync`] found and did.
#[derive(Debug, Clone)]
pub struct SyncReport {
    pub kind: DatabaseKind,
    /// The directory the official database is linked from, if any.
    pub official_source: Option<PathBuf>,
    /// Names linked into the database directory.
    pub linked: Vec<String>,
    /// Whether anything in the directory changed.
    pub changed: bool,
}

/// The database files of the sources and of the directory itself, with
/// their sizes and times: when it changes, clamd should reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

impl DatabaseLayout {
    /// Makes the directory match the sources: links in, stale links out,
    /// test signatures in or out. Local files are left alone.
    pub fn sync(&self) -> anyhow::Result<SyncReport> {
        create_private_dir(&self.dir)?;
        let fresh = self
            .freshclam_dir
            .as_deref()
            .filter(|d| d.is_dir())
            .map(Path::to_path_buf);
        let official_source = [fresh.as_deref(), Some(self.system_dir.as_path())]
            .into_iter()
            .flatten()
            .find(|d| has_official(d))
            .map(Path::to_path_buf);

        // What should be linked: everything avgate's freshclam fetched,
        // then the system directory's files unless avgate's freshclam has
        // the official database itself (two `daily`s would both load).
        let mut wanted: BTreeMap<String, PathBuf> = BTreeMap::new();
        if let Some(fresh) = &fresh {
            for name in database_files(fresh) {
                wanted.insert(name.clone(), fresh.join(name));
            }
        }
        let fresh_is_official = fresh.is_some() && official_source == fresh;
        if !fresh_is_official {
            for name in database_files(&self.system_dir) {
                wanted
                    .entry(name.clone())
                    .or_insert_with(|| self.system_dir.join(name));
            }
        }
        let test_names: Vec<&str> = TEST_SIGNATURES.iter().map(|(n, _)| *n).collect();
        // Without an official database the test signatures stay, beside
        // any custom ones: the readiness probe needs EICAR found.
        let with_test_signatures = official_source.is_none();
        let kind = if official_source.is_some() {
            DatabaseKind::Official
        } else if wanted
            .keys()
            .any(|n| !test_names.contains(&n.as_str()) && clamd::database::is_signature_file(n))
        {
            // Signatures of one's own; allow and ignore lists alone
            // (.sfp, .ign2) detect nothing, so they do not count.
            DatabaseKind::Custom
        } else {
            DatabaseKind::TestSignaturesOnly
        };
        // The test signatures are ours to write, and a local file (a
        // regular file in the directory) wins over a link of its name.
        wanted.retain(|name, _| {
            !test_names.contains(&name.as_str())
                && !std::fs::symlink_metadata(self.dir.join(name)).is_ok_and(|m| m.is_file())
        });

        let mut changed = false;
        // Links that should not be there, or point elsewhere.
        for entry in std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot read {}", self.dir.display()))?
        {
            let entry = entry?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !entry.file_type()?.is_symlink() {
                continue;
            }
            let keep = wanted
                .get(&name)
                .is_some_and(|target| std::fs::read_link(&path).is_ok_and(|t| &t == target));
            if !keep {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
                changed = true;
            }
        }
        for (name, target) in &wanted {
            let path = self.dir.join(name);
            if std::fs::symlink_metadata(&path).is_ok() {
                continue; // the right link, kept above
            }
            // Atomically: clamd may be reading the directory right now.
            let tmp = self.dir.join(format!(".{name}.link"));
            let _ = std::fs::remove_file(&tmp);
            symlink(target, &tmp).with_context(|| format!("cannot link {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            changed = true;
        }
        for (name, content) in TEST_SIGNATURES {
            let path = self.dir.join(name);
            if with_test_signatures {
                // Dated by age_out while custom signatures were there: now
                // they date the database again, so they must not look
                // decades old (a stale_database that only a restart would
                // clear).
                let aged_out = kind != DatabaseKind::Custom
                    && std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| {
                            t <= std::time::UNIX_EPOCH
                                + std::time::Duration::from_secs(
                                    crate::policy::clamd::AGED_OUT_SECS,
                                )
                        });
                if aged_out || std::fs::read_to_string(&path).ok().as_deref() != Some(*content) {
                    write_atomically(&path, content.as_bytes())?;
                    changed = true;
                }
                if kind == DatabaseKind::Custom {
                    // The custom signatures date the database: the test
                    // files, rewritten at every start, must not make a
                    // stale one look fresh.
                    crate::policy::clamd::age_out(&path);
                }
            } else if std::fs::symlink_metadata(&path).is_ok() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
                changed = true;
            }
        }
        Ok(SyncReport {
            kind,
            official_source,
            linked: wanted.into_keys().collect(),
            changed,
        })
    }

    /// Removes the built-in test signatures, so that the next
    /// [`sync`](Self::sync) writes them anew: their time then says when
    /// this avgate started with them.
    pub fn reset_test_signatures(&self) {
        for (name, _) in TEST_SIGNATURES {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    /// Writes one of avgate's own database files (an `.ign2` ignore list,
    /// an `.sfp` allow list, extra signatures) into the database directory,
    /// atomically. clamd sees it at its next reload.
    pub fn write_local_file(&self, name: &str, contents: &[u8]) -> anyhow::Result<()> {
        self.check_local_name(name)?;
        create_private_dir(&self.dir)?;
        let path = self.dir.join(name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            // A link of that name (from a source) gives way to the local file.
            std::fs::remove_file(&path)?;
        }
        write_atomically(&path, contents)
    }

    /// Removes one of avgate's own files; `false` when there was none.
    pub fn remove_local_file(&self, name: &str) -> anyhow::Result<bool> {
        self.check_local_name(name)?;
        let path = self.dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => {
                std::fs::remove_file(&path)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn check_local_name(&self, name: &str) -> anyhow::Result<()> {
        let stem = name.split('.').next().unwrap_or_default();
        if name.contains('/') || !is_database_file(name) {
            bail!("{name:?} is not a database file name clamd loads (e.g. avgate-local.ign2)");
        }
        if OFFICIAL_STEMS.contains(&stem) || TEST_SIGNATURES.iter().any(|(n, _)| *n == name) {
            bail!("{name:?} is reserved for the official or test signatures");
        }
        Ok(())
    }

    /// The state of the files a reload would read that [`sync`](Self::sync)
    /// does not write itself: the sources' database files and the local
    /// files (not the links, not the test signatures). Taken before a
    /// sync, it tells whether anything changed since.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut files = Vec::new();
        let mut add = |path: PathBuf| {
            if let Ok(meta) = std::fs::metadata(&path) {
                files.push((path, meta.len(), meta.modified().ok()));
            }
        };
        for dir in [
            self.freshclam_dir.as_deref(),
            Some(self.system_dir.as_path()),
        ]
        .into_iter()
        .flatten()
        {
            for name in database_files(dir) {
                add(dir.join(name));
            }
        }
        for name in database_files(&self.dir) {
            let path = self.dir.join(&name);
            let local = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
            if local && !TEST_SIGNATURES.iter().any(|(n, _)| *n == name) {
                add(path);
            }
        }
        files.sort();
        Fingerprint(files)
    }
}

/// The names of the database files in `dir` (regular files or links to
/// them), sorted. A missing directory has none.
fn database_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.is_file()))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| is_database_file(n))
        .collect();
    names.sort();
    names
}

fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // A name clamd does not load, in the same directory (rename is atomic).
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub(super) fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    } else if let Ok(meta) = std::fs::metadata(dir) {
        if meta.permissions().mode() & 0o002 != 0 {
            tracing::warn!(dir = %dir.display(), "the data directory is world-writable");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs {
        _root: tempfile::TempDir,
        layout: DatabaseLayout,
    }

    fn dirs(with_freshclam: bool) -> Dirs {
        let root = tempfile::tempdir().unwrap();
        let layout = DatabaseLayout {
            dir: root.path().join("db"),
            freshclam_dir: with_freshclam.then(|| root.path().join("freshclam")),
            system_dir: root.path().join("system"),
            configured: false,
        };
        std::fs::create_dir_all(&layout.system_dir).unwrap();
        if let Some(f) = &layout.freshclam_dir {
            std::fs::create_dir_all(f).unwrap();
        }
        Dirs {
            _root: root,
            layout,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn test_signatures_until_an_official_database_appears_then_links() {
        let d = dirs(false);
        let l = &d.layout;
        let report = l.sync().unwrap();
        assert_eq!(report.kind, DatabaseKind::TestSignaturesOnly);
        assert!(report.changed);
        assert_eq!(names(&l.dir), ["avgate-test.hdb", "avgate-test.ndb"]);
        assert!(!l.sync().unwrap().changed, "a second sync changes nothing");

        // freshclam fills the system directory.
        for f in ["main.cvd", "daily.cvd", "bytecode.cvd", "freshclam.dat"] {
            std::fs::write(l.system_dir.join(f), f).unwrap();
        }
        let report = l.sync().unwrap();
        assert_eq!(report.kind, DatabaseKind::Official);
        assert_eq!(
            report.official_source.as_deref(),
            Some(l.system_dir.as_path())
        );
        assert_eq!(names(&l.dir), ["bytecode.cvd", "daily.cvd", "main.cvd"]);
        assert_eq!(
            std::fs::read_link(l.dir.join("daily.cvd")).unwrap(),
            l.system_dir.join("daily.cvd")
        );

        // An incremental update turns daily.cvd into daily.cld.
        std::fs::remove_file(l.system_dir.join("daily.cvd")).unwrap();
        std::fs::write(l.system_dir.join("daily.cld"), "new").unwrap();
        assert!(l.sync().unwrap().changed);
        assert_eq!(names(&l.dir), ["bytecode.cvd", "daily.cld", "main.cvd"]);
        assert_eq!(
            std::fs::read_to_string(l.dir.join("daily.cld")).unwrap(),
            "new"
        );
    }

    #[test]
    fn avgates_freshclam_directory_wins_and_local_files_stay() {
        let d = dirs(true);
        let l = &d.layout;
        let fresh = l.freshclam_dir.clone().unwrap();
        for f in ["main.cvd", "daily.cvd"] {
            std::fs::write(l.system_dir.join(f), "system").unwrap();
        }
        // A custom database fetched by avgate's freshclam, no official one
        // yet: both directories are linked.
        std::fs::write(fresh.join("custom.ndb"), "x").unwrap();
        l.write_local_file("avgate-local.ign2", b"Some.Signature\n")
            .unwrap();
        let report = l.sync().unwrap();
        assert_eq!(report.kind, DatabaseKind::Official);
        assert_eq!(
            names(&l.dir),
            ["avgate-local.ign2", "custom.ndb", "daily.cvd", "main.cvd"]
        );
        // avgate's freshclam gets the official database: the system
        // directory is no longer used at all.
        for f in ["main.cvd", "daily.cld"] {
            std::fs::write(fresh.join(f), "ours").unwrap();
        }
        let report = l.sync().unwrap();
        assert_eq!(report.official_source.as_deref(), Some(fresh.as_path()));
        assert_eq!(
            names(&l.dir),
            ["avgate-local.ign2", "custom.ndb", "daily.cld", "main.cvd"]
        );
        assert_eq!(
            std::fs::read_to_string(l.dir.join("main.cvd")).unwrap(),
            "ours"
        );
        assert_eq!(
            std::fs::read_to_string(l.dir.join("avgate-local.ign2")).unwrap(),
            "Some.Signature\n"
        );
        assert!(l.remove_local_file("avgate-local.ign2").unwrap());
        assert!(!l.remove_local_file("avgate-local.ign2").unwrap());
    }

    #[test]
    fn custom_signatures_keep_the_test_signatures_beside_them() {
        let d = dirs(true);
        let l = &d.layout;
        std::fs::write(l.freshclam_dir.as_ref().unwrap().join("custom.ndb"), "x").unwrap();
        let report = l.sync().unwrap();
        assert_eq!(report.kind, DatabaseKind::Custom);
        assert_eq!(
            names(&l.dir),
            ["avgate-test.hdb", "avgate-test.ndb", "custom.ndb"]
        );
    }

    #[test]
    fn beside_custom_signatures_the_test_files_do_not_date_the_database() {
        let d = dirs(true);
        let l = &d.layout;
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(30 * 86_400);
        let custom = l.freshclam_dir.as_ref().unwrap().join("custom.ndb");
        std::fs::write(&custom, "x").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&custom)
            .unwrap()
            .set_modified(old)
            .unwrap();
        l.reset_test_signatures();
        assert_eq!(l.sync().unwrap().kind, DatabaseKind::Custom);
        let newest = clamd::database::newest_signature_mtime(&l.dir).unwrap();
        assert!(
            newest <= old + std::time::Duration::from_secs(1),
            "a 30-day-old custom database looks fresh"
        );
    }

    #[test]
    fn without_the_custom_signatures_the_test_files_date_the_database_again() {
        let d = dirs(true);
        let l = &d.layout;
        let custom = l.freshclam_dir.as_ref().unwrap().join("custom.ndb");
        std::fs::write(&custom, "x").unwrap();
        assert_eq!(l.sync().unwrap().kind, DatabaseKind::Custom);
        std::fs::remove_file(&custom).unwrap();
        let report = l.sync().unwrap();
        assert_eq!(report.kind, DatabaseKind::TestSignaturesOnly);
        let newest = clamd::database::newest_signature_mtime(&l.dir).unwrap();
        let age = std::time::SystemTime::now().duration_since(newest).unwrap();
        assert!(age < std::time::Duration::from_secs(60), "{age:?} old");
    }

    #[test]
    fn allow_and_ignore_lists_alone_are_still_test_signatures_only() {
        // They detect nothing: "custom" would hide that no real signature
        // is loaded (and keep the test-signatures alert from firing).
        let d = dirs(true);
        let l = &d.layout;
        let dir = l.freshclam_dir.as_ref().unwrap();
        std::fs::write(dir.join("local.ign2"), "Some.Sig\n").unwrap();
        std::fs::write(dir.join("local.sfp"), "").unwrap();
        assert_eq!(l.sync().unwrap().kind, DatabaseKind::TestSignaturesOnly);
    }

    #[test]
    fn local_file_names_are_checked() {
        let d = dirs(false);
        for bad in [
            "../x.ign2",
            "notes.txt",
            "daily.ign2",
            "avgate-test.ndb",
            ".x.ndb",
        ] {
            assert!(d.layout.write_local_file(bad, b"").is_err(), "{bad}");
        }
        d.layout.write_local_file("local.sfp", b"").unwrap();
    }

    #[test]
    fn the_fingerprint_follows_changes_in_every_source() {
        let d = dirs(true);
        let l = &d.layout;
        l.sync().unwrap();
        let before = l.fingerprint();
        assert_eq!(before, l.fingerprint());
        std::fs::write(l.freshclam_dir.as_ref().unwrap().join("new.hdb"), "x").unwrap();
        let after = l.fingerprint();
        assert_ne!(before, after);
        // Linking it in is the sync's own change, not a new one.
        l.sync().unwrap();
        assert_eq!(after, l.fingerprint());
        std::fs::write(l.dir.join("dropped.ndb"), "y").unwrap();
        assert_ne!(after, l.fingerprint());
        // freshclam's own state is not a database.
        let now = l.fingerprint();
        std::fs::write(l.system_dir.join("freshclam.dat"), "z").unwrap();
        assert_eq!(now, l.fingerprint());
    }
}
