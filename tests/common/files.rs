//! Temporary directories and openssl, for key and certificate files.

use std::process::{Command, Stdio};

use super::random_hex;

/// A temporary directory, removed with its contents on drop.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("ws-notify-{tag}-{}", random_hex(2)));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.path.join(name)
    }

    /// The path of a file in the directory as a `&str` (for environment values).
    pub fn file_str(&self, name: &str) -> String {
        self.file(name)
            .to_str()
            .expect("temp paths are UTF-8")
            .to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: a leftover temp dir does not affect other tests.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs `openssl <args>` in `dir`; fails the test with its output on error.
#[track_caller]
pub fn openssl(dir: &TempDir, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(&dir.path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run openssl (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
