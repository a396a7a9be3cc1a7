//! Child processes for the CLI and real-client tests: stdout read line by
//! line through a channel (so a test can wait for one line with a deadline),
//! stderr collected, the child killed on drop (used by tests/cli.rs and
//! tests/real_clients.rs).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A running child process, killed (and reaped) on drop.
pub struct Proc {
    pub what: String,
    child: Child,
    lines: Receiver<String>,
    stdout_seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout/stderr captured.
    #[track_caller]
    pub fn spawn(what: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what} ({cmd:?}): {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout piped");
        let out_reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr piped");
        let sink = stderr.clone();
        let err_reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => sink
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        });
        Proc {
            what: what.to_string(),
            child,
            lines,
            stdout_seen: Vec::new(),
            stderr,
            readers: vec![out_reader, err_reader],
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line, or `None` after `timeout` or at EOF.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.stdout_seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// The next stdout line; fails the test (showing stderr) after `timeout`.
    #[track_caller]
    pub fn expect_line(&mut self, timeout: Duration) -> String {
        match self.next_line(timeout) {
            Some(line) => line,
            None => panic!(
                "{}: no stdout line within {timeout:?}; stdout so far {:?}; stderr:\n{}",
                self.what,
                self.stdout_seen,
                self.stderr()
            ),
        }
    }

    /// Stdout lines until one satisfies `pred` (returned); fails after `timeout`.
    #[track_caller]
    pub fn expect_line_matching(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left) {
                Some(line) if pred(&line) => return line,
                Some(_) => {}
                None => panic!(
                    "{}: no stdout line {what} within {timeout:?}; stdout {:?}; stderr:\n{}",
                    self.what,
                    self.stdout_seen,
                    self.stderr()
                ),
            }
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits up to `timeout` for the exit; `None` if still running.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status.is_some() {
                return self.status;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                // The readers end at EOF, right after the exit.
                for reader in self.readers.drain(..) {
                    // A reader thread cannot panic in a way that matters here.
                    let _ = reader.join();
                }
                return self.status;
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit code; fails the test if the process does not exit in time.
    #[track_caller]
    pub fn expect_exit(&mut self, timeout: Duration) -> Option<i32> {
        match self.wait(timeout) {
            Some(status) => status.code(),
            None => panic!(
                "{} did not exit within {timeout:?}; stdout {:?}; stderr:\n{}",
                self.what,
                self.stdout_seen,
                self.stderr()
            ),
        }
    }

    /// Every remaining stdout line (after the process exited).
    pub fn rest_of_stdout(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            lines.push(line);
        }
        lines
    }

    /// SIGKILL (if still running) and reap.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            // It may have exited on its own a moment ago; either way it is
            // reaped next.
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "----- {} stdout (read) {:?} -----\n----- {} stderr -----\n{}----- end -----",
                self.what,
                self.stdout_seen,
                self.what,
                self.stderr()
            );
        }
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion, failing the test if it takes longer than `timeout`.
#[track_caller]
pub fn run(what: &str, cmd: Command, timeout: Duration) -> Output {
    let mut proc = Proc::spawn(what, cmd);
    let code = proc.expect_exit(timeout);
    let stdout = proc.rest_of_stdout().join("\n");
    Output {
        code,
        stdout,
        stderr: proc.stderr(),
    }
}
