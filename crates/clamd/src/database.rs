//! What a clamd database directory holds: which file names clamd loads,
//! which of them are signatures (rather than allow or ignore lists), and
//! how old the newest of them is.
//!
//! The age matters for a database without a signed `.cvd`/`.cld` (custom or
//! test signatures): clamd's VERSION then reports no date, and the files'
//! modification times are the only clock there is.

use std::path::Path;
use std::time::SystemTime;

/// File extensions clamd loads from its database directory (libclamav's
/// `CLI_DBEXT`, 1.4). Anything else in the directory is ignored by clamd.
pub const EXTENSIONS: &[&str] = &[
    "cvd", "cld", "cud", "db", "hdb", "hdu", "hsb", "hsu", "mdb", "mdu", "msb", "msu", "imp",
    "ndb", "ndu", "ldb", "ldu", "sdb", "zmd", "rmd", "idb", "gdb", "wdb", "pdb", "pwdb", "cbc",
    "ftm", "cfg", "cdb", "cat", "crb", "ioc", "yar", "yara", "fp", "sfp", "ign", "ign2", "info",
];

/// Files that only allow-list or ignore: they do not make a database newer.
const NOT_SIGNATURES: &[&str] = &["fp", "sfp", "ign", "ign2", "cfg", "info"];

/// Whether clamd would load a file of this name from its database directory.
pub fn is_database_file(name: &str) -> bool {
    !name.starts_with('.')
        && name
            .rsplit_once('.')
            .is_some_and(|(stem, ext)| !stem.is_empty() && EXTENSIONS.contains(&ext))
}

/// Whether a file of this name holds signatures (not an allow or ignore
/// list): the files whose age is the database's age.
pub fn is_signature_file(name: &str) -> bool {
    is_database_file(name)
        && name
            .rsplit_once('.')
            .is_some_and(|(_, ext)| !NOT_SIGNATURES.contains(&ext))
}

/// Whether a directory holds an official database: a `main` and a `daily`
/// (`.cvd` or `.cld`), as freshclam leaves them.
pub fn has_official(dir: &Path) -> bool {
    let any = |stem: &str| {
        ["cvd", "cld"]
            .iter()
            .any(|ext| dir.join(format!("{stem}.{ext}")).is_file())
    };
    any("main") && any("daily")
}

/// The modification time of the newest signature file in `dir`, following
/// symbolic links (a link's own time says nothing about its target). `None`
/// when there is none or the directory cannot be read.
pub fn newest_signature_mtime(dir: &Path) -> Option<SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_str().is_some_and(is_signature_file))
        .filter_map(|entry| std::fs::metadata(entry.path()).ok())
        .filter(|meta| meta.is_file())
        .filter_map(|meta| meta.modified().ok())
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn names_clamd_loads() {
        for yes in [
            "main.cvd",
            "daily.cld",
            "local.ign2",
            "x.ndb",
            "a.b.hdb",
            "t.yara",
        ] {
            assert!(is_database_file(yes), "{yes}");
        }
        for no in [
            "freshclam.dat",
            "mirrors.dat",
            "README",
            ".x.ndb.tmp",
            ".hidden.ndb",
            "ndb",
            ".ndb",
        ] {
            assert!(!is_database_file(no), "{no}");
        }
        assert!(is_signature_file("daily.cld"));
        assert!(!is_signature_file("local.ign2"));
        assert!(!is_signature_file("allow.sfp"));
    }

    #[test]
    fn newest_signature_file_dates_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let set = |name: &str, secs: u64| {
            let path = dir.path().join(name);
            std::fs::write(&path, "x").unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(UNIX_EPOCH + Duration::from_secs(secs))
                .unwrap();
        };
        assert_eq!(newest_signature_mtime(dir.path()), None);
        set("old.ndb", 1_000);
        set("new.hdb", 2_000);
        // Not signatures, or not loaded by clamd: ignored.
        set("later.ign2", 3_000);
        set("freshclam.dat", 4_000);
        std::os::unix::fs::symlink("/nonexistent/daily.cld", dir.path().join("daily.cld")).unwrap();
        assert_eq!(
            newest_signature_mtime(dir.path()),
            Some(UNIX_EPOCH + Duration::from_secs(2_000))
        );
        assert!(!has_official(dir.path()));
        set("main.cvd", 10);
        set("daily.cvd", 10);
        assert!(has_official(dir.path()));
    }
}
