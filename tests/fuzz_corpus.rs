//! Replays the fuzz corpus on stable Rust: every file in `fuzz/corpus/<target>/` and
//! `fuzz/artifacts/<target>/` (crashes found and fixed stay as regression inputs)
//! goes through the same check the cargo-fuzz target runs (`fuzz/checks.rs`).
//! Generated corpora (`fuzz/corpus-gen/`, not committed) are not replayed.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The regular files directly in `dir` (none when it does not exist), sorted.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .filter(|path| {
            // Editor and libFuzzer temporary files are not inputs.
            !path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Runs every input of `target`; returns how many ran and the failures.
fn replay(target: &str, check: fn(&[u8])) -> (usize, Vec<String>) {
    let mut ran = 0;
    let mut failures = Vec::new();
    for kind in ["corpus", "artifacts"] {
        for path in files_in(&fuzz_dir().join(kind).join(target)) {
            let data = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            ran += 1;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(non-string panic)");
                failures.push(format!("{}: {message}", path.display()));
            }
        }
    }
    (ran, failures)
}

fn replay_target(target: &str) {
    let check = checks::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, check)| *check)
        .expect("a known target");
    let (ran, failures) = replay(target, check);
    assert!(
        ran > 0,
        "no seed corpus for {target} in fuzz/corpus/{target}/"
    );
    assert!(
        failures.is_empty(),
        "{} of {ran} {target} inputs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn handshake_corpus() {
    replay_target("handshake");
}

#[test]
fn frames_corpus() {
    replay_target("frames");
}

#[test]
fn redis_message_corpus() {
    replay_target("redis_message");
}

#[test]
fn token_corpus() {
    replay_target("token");
}

#[test]
fn config_corpus() {
    replay_target("config");
}

#[test]
fn pubsub_frames_corpus() {
    replay_target("pubsub_frames");
}

/// Every directory under `fuzz/corpus/` and `fuzz/artifacts/` is a known target, so
/// a renamed target cannot silently stop being replayed.
#[test]
fn every_corpus_directory_is_a_target() {
    for kind in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            assert!(
                checks::TARGETS.iter().any(|(target, _)| *target == name),
                "fuzz/{kind}/{name} is not a fuzz target"
            );
        }
    }
}
