//! The command line as an operator meets it: what a wrong value says, and
//! that it says where the value came from (a flag, or the environment
//! variable behind it, which the operator may not know is read).

use std::process::Command;

/// `avgate check-config` with `args` and `env`: its exit code and stderr.
fn check_config(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_avgate"));
    command
        .arg("check-config")
        .arg("--data-dir")
        .arg(dir.path())
        .args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_value_says_what_to_write_and_where_it_came_from() {
    let (code, stderr) = check_config(&[], &[("AVGATE_MAX_SIZE", "1.5GB")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("whole numbers only"), "{stderr}");
    assert!(
        stderr.contains("the environment variable AVGATE_MAX_SIZE"),
        "{stderr}"
    );

    // Given as a flag, it is the flag's: no note about the environment.
    let (code, stderr) = check_config(&["--max-size", "1.5GB"], &[("AVGATE_MAX_SIZE", "1.5GB")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!stderr.contains("environment variable"), "{stderr}");

    let (code, stderr) = check_config(&[], &[("AVGATE_LISTEN", "localhost:8080")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("host name"), "{stderr}");
    assert!(stderr.contains("AVGATE_LISTEN"), "{stderr}");

    // AVGATE_LOG wins over log_level: a typo in it is refused, not ignored.
    let (code, stderr) = check_config(&[], &[("AVGATE_LOG", "avgate=loud")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("AVGATE_LOG"), "{stderr}");

    // A size ClamAV cannot scan.
    let (code, stderr) = check_config(&["--max-size", "3GiB"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("2047MiB"), "{stderr}");

    let (code, stderr) = check_config(&["--max-size", "2047MiB"], &[]);
    assert_eq!(code, Some(0), "{stderr}");

    // A path that is not UTF-8 beside a bad value: the error, not a panic.
    use std::os::unix::ffi::OsStrExt;
    let out = Command::new(env!("CARGO_BIN_EXE_avgate"))
        .arg("check-config")
        .arg("--data-dir")
        .arg(std::ffi::OsStr::from_bytes(b"/tmp/avgate-\xff"))
        .args(["--max-size", "1.5GB"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("whole numbers only"), "{stderr}");
}
