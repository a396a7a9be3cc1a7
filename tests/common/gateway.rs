//! The real `ws-notify` binary as a child process on a free port: started
//! with the test configuration, its output captured, polled for readiness,
//! signalled, and killed on drop.

use std::io::{self, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    POLL, PROMPT, UNSET, free_port, health, metric, metric_value, metrics_text, random_hex,
    send_signal, token, try_http, wait_for, wait_until,
};

/// The real `ws-notify` binary on a free port, killed on drop.
pub struct Gateway {
    pub port: u16,
    pub redis_port: u16,
    /// The HMAC secret of this instance (random per gateway).
    pub secret: String,
    child: Child,
    logs: Arc<Mutex<String>>,
    exit: Option<ExitStatus>,
}

fn build_command(port: u16, redis_port: u16, secret: &str, extra_env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ws-notify"));
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    let port = port.to_string();
    let redis_port = redis_port.to_string();
    let base = [
        ("WS_HOST", "127.0.0.1"),
        ("WS_PORT", port.as_str()),
        ("REDIS_HOST", "127.0.0.1"),
        ("REDIS_PORT", redis_port.as_str()),
        ("JWT_SECRET_KEY", secret),
        ("LOGGER_LEVEL", "debug"),
        ("LOGGER_ENCODING", "json"),
    ];
    for (k, v) in base.iter().chain(extra_env.iter()) {
        if *v == UNSET {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Copies a child's pipe into `logs` line by line until EOF.
fn capture(pipe: impl Read + Send + 'static, logs: Arc<Mutex<String>>) {
    thread::spawn(move || {
        let mut reader = io::BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match io::BufRead::read_until(&mut reader, b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    logs.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&text);
                }
            }
        }
    });
}

fn spawn_captured(mut cmd: Command) -> (Child, Arc<Mutex<String>>) {
    let mut child = cmd.spawn().expect("spawn ws-notify");
    let logs = Arc::new(Mutex::new(String::new()));
    capture(child.stdout.take().expect("stdout piped"), logs.clone());
    capture(child.stderr.take().expect("stderr piped"), logs.clone());
    (child, logs)
}

impl Gateway {
    /// Starts with the test configuration overridden by `extra_env` (a value of
    /// [`UNSET`] removes a variable) and waits until `/health` answers.
    pub fn start(redis_port: u16, extra_env: &[(&str, &str)]) -> Self {
        Self::start_with_nofile(redis_port, extra_env, None)
    }

    /// Like [`Gateway::start`], with the child's open-file limit set to
    /// `(soft, hard)`.
    pub fn start_with_nofile(
        redis_port: u16,
        extra_env: &[(&str, &str)],
        nofile: Option<(u64, u64)>,
    ) -> Self {
        let secret = random_hex(2);
        let mut last = String::new();
        for _ in 0..3 {
            match Self::launch(free_port(), redis_port, &secret, extra_env, nofile) {
                Ok(gw) => return gw,
                Err(exited) => last = exited,
            }
        }
        panic!("{last}");
    }

    /// Starts on `port` with the HMAC `secret` (for example the port and secret
    /// of an instance that has just stopped, to restart it in place: its
    /// clients' tokens stay valid) and waits until `/health` answers.
    pub fn start_on_port(
        port: u16,
        redis_port: u16,
        secret: &str,
        extra_env: &[(&str, &str)],
    ) -> Self {
        Self::launch(port, redis_port, secret, extra_env, None)
            .unwrap_or_else(|exited| panic!("{exited}"))
    }

    /// Spawns on `port` and waits for `/health`; `Err` when the process exited
    /// first (the port may have been taken meanwhile).
    fn launch(
        port: u16,
        redis_port: u16,
        secret: &str,
        extra_env: &[(&str, &str)],
        nofile: Option<(u64, u64)>,
    ) -> Result<Self, String> {
        let mut cmd = build_command(port, redis_port, secret, extra_env);
        if let Some((soft, hard)) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs in the
            // child between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: soft as libc::rlim_t,
                        rlim_max: hard as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let (child, logs) = spawn_captured(cmd);
        let mut gw = Gateway {
            port,
            redis_port,
            secret: secret.to_string(),
            child,
            logs,
            exit: None,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = gw.child.try_wait() {
                gw.exit = Some(status);
                return Err(format!(
                    "ws-notify exited with {status} before answering /health; output:\n{}",
                    gw.logs()
                ));
            }
            if try_http(
                port,
                b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
                Duration::from_secs(2),
            )
            .is_ok()
            {
                return Ok(gw);
            }
            if Instant::now() >= deadline {
                panic!(
                    "ws-notify did not answer GET /health within 15 s; output:\n{}",
                    gw.logs()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Runs the binary with the test configuration (no Redis, no readiness
    /// wait) and expects it to exit within 10 s: returns (exit code, output).
    pub fn run_expect_exit(extra_env: &[(&str, &str)]) -> (Option<i32>, String) {
        let cmd = build_command(free_port(), free_port(), &random_hex(2), extra_env);
        let (mut child, logs) = spawn_captured(cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                // The capture threads end at EOF, shortly after the exit.
                let collected = || logs.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let until = Instant::now() + Duration::from_millis(500);
                while Arc::strong_count(&logs) > 1 && Instant::now() < until {
                    thread::sleep(Duration::from_millis(5));
                }
                return (status.code(), collected());
            }
            if Instant::now() >= deadline {
                // Best effort: the test fails below either way.
                let _ = child.kill();
                let _ = child.wait();
                let out = logs.lock().unwrap_or_else(|e| e.into_inner()).clone();
                panic!("ws-notify did not exit within 10 s with env {extra_env:?}; output:\n{out}");
            }
            thread::sleep(POLL);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the server's output contains `needle` (the log writer
    /// writes on its own thread, so a line can come after the state it tells).
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(timeout, &format!("a log line with {needle:?}"), || {
            self.logs().contains(needle).then_some(())
        });
    }

    pub fn signal(&self, sig: libc::c_int) {
        send_signal(self.child.id(), sig);
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit {
                return Some(status);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_none()
    }

    /// A token for `user` signed with this gateway's secret, valid for an hour.
    pub fn token(&self, user: &str) -> String {
        token(&self.secret, user, 3600)
    }

    pub fn health(&self) -> (u16, Value) {
        health(self.port)
    }

    pub fn active_connections(&self) -> u64 {
        let (_, body) = self.health();
        body["websocket"]["active_connections"]
            .as_u64()
            .unwrap_or_else(|| panic!("no websocket.active_connections in /health: {body}"))
    }

    pub fn unique_users(&self) -> u64 {
        let (_, body) = self.health();
        body["websocket"]["total_unique_users"]
            .as_u64()
            .unwrap_or_else(|| panic!("no websocket.total_unique_users in /health: {body}"))
    }

    #[track_caller]
    pub fn wait_active_connections(&self, n: u64) {
        let mut last = 0;
        let what = format!("active_connections == {n}");
        wait_until(PROMPT, &what, || {
            last = self.active_connections();
            last == n
        });
    }

    /// Waits until no connection and no user is left.
    #[track_caller]
    pub fn wait_empty(&self) {
        self.wait_active_connections(0);
        wait_until(PROMPT, "total_unique_users == 0", || {
            self.unique_users() == 0
        });
    }

    /// Waits until /health says 200 and Redis connected (the gateway is subscribed).
    #[track_caller]
    pub fn wait_redis_connected(&self, timeout: Duration) {
        let mut last = (0, Value::Null);
        wait_until(timeout, "/health reports Redis connected", || {
            last = self.health();
            last.0 == 200 && last.1["redis"]["status"] == "connected"
        });
    }

    pub fn metrics_text(&self) -> String {
        metrics_text(self.port)
    }

    pub fn metric(&self, name_with_labels: &str) -> f64 {
        metric(self.port, name_with_labels)
    }

    /// `ws_notify_resident_memory_bytes` from /metrics.
    #[track_caller]
    pub fn resident_bytes(&self) -> f64 {
        let text = self.metrics_text();
        metric_value(&text, "ws_notify_resident_memory_bytes")
            .unwrap_or_else(|| panic!("no ws_notify_resident_memory_bytes in /metrics:\n{text}"))
    }

    /// Waits until the metric is at least `min`; on timeout prints /metrics.
    #[track_caller]
    pub fn wait_metric_at_least(&self, name_with_labels: &str, min: f64) {
        let deadline = Instant::now() + PROMPT;
        loop {
            let text = self.metrics_text();
            let value = metric_value(&text, name_with_labels).unwrap_or(0.0);
            if value >= min {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out waiting for {name_with_labels} >= {min} (is {value}); /metrics:\n{text}"
                );
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // Either it is still running and this kills it, or it has just exited.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "----- ws-notify on port {} output -----\n{}----- end -----",
                self.port,
                self.logs()
            );
        }
    }
}
