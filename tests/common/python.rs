//! Python with the parsers the operations tests check our output with, written
//! by others: `prometheus_client`'s text parser and PyYAML (tests/metrics_format.rs,
//! tests/deploy.rs).
//!
//! `.ci/run` installs them from Debian (python3-prometheus-client,
//! python3-yaml) for Debian's `/usr/bin/python3`, which need not be the
//! `python3` first on PATH (pyenv, a venv): each candidate is asked whether
//! it imports the modules. Without one a test skips, saying why; with
//! `WS_NOTIFY_REQUIRE_CLIENTS=1` (set by `.ci/run`) it fails instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::procs;

/// The interpreters tried, in order.
const CANDIDATES: [&str; 2] = ["python3", "/usr/bin/python3"];

/// A Python interpreter that imports every one of `modules`, or `None` after
/// a printed skip (a failure when CI requires every tool).
pub fn python_with(test: &str, modules: &[&str], debian_packages: &str) -> Option<PathBuf> {
    let imports = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    let found = CANDIDATES.iter().find(|python| {
        Command::new(python)
            .args(["-c", &imports])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if let Some(python) = found {
        return Some(PathBuf::from(python));
    }
    let why = format!(
        "no Python among {CANDIDATES:?} imports {modules:?} (Debian: apt-get install {debian_packages})"
    );
    required_tool_absent(test, &why);
    None
}

/// Reports a missing tool: a printed skip, or a failure when CI asks for
/// every tool to be there.
pub fn required_tool_absent(test: &str, why: &str) {
    if std::env::var("WS_NOTIFY_REQUIRE_CLIENTS").is_ok_and(|v| v == "1") {
        panic!("{test}: {why} (WS_NOTIFY_REQUIRE_CLIENTS=1: .ci/run should have installed it)");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// Runs `python -c script arg` and returns its stdout; fails the test, showing
/// stderr, if the script fails or runs longer than 60 s.
#[track_caller]
pub fn run_python(python: &Path, what: &str, script: &str, arg: &Path) -> String {
    let mut cmd = Command::new(python);
    cmd.arg("-c").arg(script).arg(arg);
    let out = procs::run(what, cmd, Duration::from_secs(60));
    assert_eq!(
        out.code,
        Some(0),
        "{what} failed:\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    out.stdout
}
