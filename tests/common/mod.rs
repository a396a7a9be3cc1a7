//! Shared harness for the integration tests: a real `redis-server` and the real
//! `ws-notify` binary, each on a free port, plus small HTTP, WebSocket and JWT
//! clients.
//!
//! Every child process is owned by a guard that kills it on drop (and prints the
//! gateway's output when the test is failing); readiness is polled with
//! deadlines, never waited for with fixed sleeps. Each test starts its own
//! processes, so tests run in parallel.
#![allow(dead_code)]

use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::{Message, WebSocket};

/// How long "promptly" is: the deadline for things that should happen at once.
pub const PROMPT: Duration = Duration::from_secs(5);
/// How often the polling helpers look again.
const POLL: Duration = Duration::from_millis(20);
/// Read timeout of client sockets, so that reads can honour deadlines.
const READ_TICK: Duration = Duration::from_millis(20);
/// The RFC 6455 example key and its accept value (section 1.3).
pub const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// In an environment list, this value removes the variable instead of setting it.
pub const UNSET: &str = "\0unset";

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

/// A port that was free a moment ago (bound to 127.0.0.1:0, read, dropped).
/// Callers retry when a bind race makes the child fail to listen on it.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// `n_words` random 64-bit words as hex (per-test secrets and nonces).
pub fn random_hex(n_words: usize) -> String {
    let mut out = String::new();
    for i in 0..n_words {
        let word = RandomState::new().hash_one((i, Instant::now(), std::process::id()));
        out.push_str(&format!("{word:016x}"));
    }
    out
}

/// Polls `cond` every 20 ms until it holds; fails the test after `timeout`.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        thread::sleep(POLL);
    }
}

/// Polls `f` every 20 ms until it returns `Some`; fails the test after `timeout`.
#[track_caller]
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(POLL);
    }
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads once with the deadline as the limit: `Ok(0)` is EOF, `Err(TimedOut)`
/// when the deadline passed without data.
fn read_until_deadline(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> io::Result<usize> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        stream.set_read_timeout(Some((deadline - now).min(Duration::from_millis(100))))?;
        match stream.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------
// redis-server
// ---------------------------------------------------------------------------

/// A `redis-server` child on a free port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    args: Vec<String>,
    username: Option<String>,
    password: Option<String>,
    child: Option<Child>,
    conn: Mutex<Option<redis::Connection>>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[], None, None)
    }

    /// With `requirepass` (default user) or, with a username, an ACL user that
    /// may do everything.
    pub fn start_with_auth(username: Option<&str>, password: &str) -> Self {
        match username {
            None => Self::start_with(&["--requirepass", password], None, Some(password)),
            Some(user) => {
                // One argument per word: redis-server joins them into one config line.
                let pass = format!(">{password}");
                Self::start_with(
                    &["--user", user, "on", &pass, "~*", "&*", "+@all"],
                    Some(user),
                    Some(password),
                )
            }
        }
    }

    /// Extra `redis-server` arguments; `username`/`password` are what the
    /// harness itself uses to PING and PUBLISH.
    pub fn start_with(args: &[&str], username: Option<&str>, password: Option<&str>) -> Self {
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = RedisServer {
                port: free_port(),
                args: args.iter().map(|s| s.to_string()).collect(),
                username: username.map(str::to_string),
                password: password.map(str::to_string),
                child: None,
                conn: Mutex::new(None),
            };
            match server.spawn_and_wait(Duration::from_secs(10)) {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    fn spawn_and_wait(&mut self, timeout: Duration) -> Result<(), String> {
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn redis-server (is it installed?): {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + timeout;
        loop {
            if self.ping() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited: {status}",
                    self.port
                ));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "redis-server on port {} did not answer PING",
                    self.port
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// `redis://[user:pass@]127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        let auth = match (&self.username, &self.password) {
            (Some(u), Some(p)) => format!("{u}:{p}@"),
            (None, Some(p)) => format!(":{p}@"),
            _ => String::new(),
        };
        format!("redis://{auth}127.0.0.1:{}/", self.port)
    }

    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(1))
    }

    fn ping(&self) -> bool {
        self.connection()
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends a signal to redis-server (SIGSTOP/SIGCONT to make it hang).
    pub fn signal(&self, sig: libc::c_int) {
        let child = self.child.as_ref().expect("redis-server is not running");
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill(redis-server, {sig}) failed");
    }

    /// SIGKILL and reap; the port is free afterwards.
    pub fn kill(&mut self) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(mut child) = self.child.take() {
            // The child may have exited already; either way we reap it next.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills (if running) and starts again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait(Duration::from_secs(5)) {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!("redis restart failed: {e}"),
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    /// PUBLISH; returns the number of receivers Redis reports.
    pub fn publish(&self, channel: &str, payload: impl AsRef<[u8]>) -> i64 {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(self.connection().expect("connect to redis for PUBLISH"));
            }
            let conn = guard.as_mut().expect("connection just set");
            match redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload.as_ref())
                .query::<i64>(conn)
            {
                Ok(n) => return n,
                Err(e) if attempt == 0 => {
                    eprintln!("PUBLISH failed ({e}), reconnecting");
                    *guard = None;
                }
                Err(e) => panic!("PUBLISH {channel}: {e}"),
            }
        }
        unreachable!()
    }

    /// Publishes to the default channel of `user`.
    pub fn notify(&self, user: &str, payload: impl AsRef<[u8]>) -> i64 {
        self.publish(&format!("user_noti:{user}"), payload)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------

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
            let port = free_port();
            let mut cmd = build_command(port, redis_port, &secret, extra_env);
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
                secret: secret.clone(),
                child,
                logs,
                exit: None,
            };
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(status)) = gw.child.try_wait() {
                    gw.exit = Some(status);
                    last = format!(
                        "ws-notify exited with {status} before answering /health; output:\n{}",
                        gw.logs()
                    );
                    break;
                }
                if try_http(
                    port,
                    b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
                    Duration::from_secs(2),
                )
                .is_ok()
                {
                    return gw;
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
        panic!("{last}");
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

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}) failed: {}",
            self.child.id(),
            io::Error::last_os_error()
        );
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

// ---------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------

/// `{"sub": sub, "exp": now + exp_offset_secs}`, to be extended by tests.
pub fn claims(sub: &str, exp_offset_secs: i64) -> Value {
    json!({ "sub": sub, "exp": now_secs() + exp_offset_secs })
}

/// HS256 token for `sub` expiring `exp_offset_secs` from now.
pub fn token(secret: &str, sub: &str, exp_offset_secs: i64) -> String {
    token_with_claims(secret, &claims(sub, exp_offset_secs))
}

/// HS256 token with arbitrary claims.
pub fn token_with_claims(secret: &str, claims: &Value) -> String {
    token_alg(secret, Algorithm::HS256, claims)
}

pub fn token_alg(secret: &str, alg: Algorithm, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode JWT")
}

/// An `alg: none` token (no signature), which must always be refused.
pub fn unsigned_token(claims: &Value) -> String {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let body = base64url(claims.to_string().as_bytes());
    format!("{header}.{body}.")
}

pub fn base64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Every byte as `%XX`.
pub fn percent_encode_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

// ---------------------------------------------------------------------------
// HTTP over a raw TcpStream
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): status {} body {:?}",
                self.status, self.body
            )
        })
    }

    /// Asserts `status` and the exact body `{"error": error}`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, error: &str) {
        assert_eq!(self.status, status, "status; body {:?}", self.body);
        assert_eq!(self.json(), json!({ "error": error }), "error body");
        if let Some(ct) = self.header("content-type") {
            assert!(ct.starts_with("application/json"), "content-type {ct:?}");
        }
    }
}

/// Reads one HTTP response: the head, then `Content-Length` bytes or up to EOF.
/// A `101` returns right after its head.
pub fn read_http_response(
    stream: &mut TcpStream,
    deadline: Instant,
) -> io::Result<(HttpResponse, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(pos) = find(&buf, b"\r\n\r\n") {
            break pos + 4;
        }
        let n = read_until_deadline(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "EOF before a complete response head; got {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut header_storage = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut header_storage);
    match parsed.parse(&buf[..head_end]) {
        Ok(httparse::Status::Complete(_)) => {}
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "bad response head ({other:?}): {:?}",
                    String::from_utf8_lossy(&buf[..head_end])
                ),
            ));
        }
    }
    let status = parsed.code.unwrap_or(0);
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let mut rest = buf.split_off(head_end);
    if status == 101 {
        return Ok((
            HttpResponse {
                status,
                headers,
                body: String::new(),
            },
            rest,
        ));
    }
    let content_length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    loop {
        if let Some(len) = content_length
            && rest.len() >= len
        {
            let leftover = rest.split_off(len);
            let body = String::from_utf8_lossy(&rest).into_owned();
            return Ok((
                HttpResponse {
                    status,
                    headers,
                    body,
                },
                leftover,
            ));
        }
        match read_until_deadline(stream, &mut chunk, deadline) {
            Ok(0) => break,
            Ok(n) => rest.extend_from_slice(&chunk[..n]),
            // A reset after a body without Content-Length ends it like EOF.
            Err(e) if content_length.is_none() && e.kind() == io::ErrorKind::ConnectionReset => {
                break;
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(len) = content_length {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("EOF after {} of {len} body bytes", rest.len()),
        ));
    }
    let body = String::from_utf8_lossy(&rest).into_owned();
    Ok((
        HttpResponse {
            status,
            headers,
            body,
        },
        Vec::new(),
    ))
}

/// Sends `request` bytes and reads one response.
pub fn try_http(port: u16, request: &[u8], timeout: Duration) -> io::Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    stream.set_nodelay(true)?;
    stream.write_all(request)?;
    read_http_response(&mut stream, deadline).map(|(r, _)| r)
}

/// Sends a hand-written request and returns the response; fails the test on I/O errors.
#[track_caller]
pub fn raw_request(port: u16, request: impl AsRef<[u8]>) -> HttpResponse {
    let request = request.as_ref();
    try_http(port, request, PROMPT).unwrap_or_else(|e| {
        panic!(
            "request {:?} to port {port} failed: {e}",
            String::from_utf8_lossy(&request[..request.len().min(300)])
        )
    })
}

/// `GET path_and_query` with extra headers.
#[track_caller]
pub fn http_get(port: u16, path_and_query: &str, headers: &[(&str, &str)]) -> HttpResponse {
    raw_request(port, request_head("GET", path_and_query, headers))
}

/// A request head with `Host` and the given headers.
pub fn request_head(method: &str, path_and_query: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("{method} {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// A complete WebSocket upgrade request (RFC 6455's sample key) plus `extra` headers.
pub fn upgrade_request(path_and_query: &str, extra: &[(&str, &str)]) -> String {
    let mut headers = vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", SAMPLE_KEY),
        ("Sec-WebSocket-Version", "13"),
    ];
    headers.extend_from_slice(extra);
    request_head("GET", path_and_query, &headers)
}

#[track_caller]
pub fn health(port: u16) -> (u16, Value) {
    let resp = http_get(port, "/health", &[]);
    let status = resp.status;
    (status, resp.json())
}

#[track_caller]
pub fn metrics_text(port: u16) -> String {
    let resp = http_get(port, "/metrics", &[]);
    assert_eq!(resp.status, 200, "/metrics status; body {:?}", resp.body);
    resp.body
}

#[track_caller]
pub fn metrics_json(port: u16) -> Value {
    let resp = http_get(port, "/metrics?format=json", &[]);
    assert_eq!(
        resp.status, 200,
        "/metrics?format=json status; body {:?}",
        resp.body
    );
    resp.json()
}

/// The value of the sample `name_with_labels` (exactly as written in the
/// exposition, e.g. `ws_notify_messages_dropped_total{reason="invalid"}`).
pub fn metric_value(text: &str, name_with_labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(name_with_labels)?;
            let mut fields = rest.split_whitespace();
            if !rest.starts_with([' ', '\t']) {
                return None;
            }
            fields.next()?.parse::<f64>().ok()
        })
}

/// A metric from /metrics; 0 when the sample is absent (counters with labels
/// may appear only once they count something).
#[track_caller]
pub fn metric(port: u16, name_with_labels: &str) -> f64 {
    metric_value(&metrics_text(port), name_with_labels).unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// WebSocket client (tungstenite)
// ---------------------------------------------------------------------------

pub type Ws = WebSocket<TcpStream>;

/// Connects to `/ws?token=<token>`.
pub fn ws_connect(port: u16, token: &str) -> Result<Ws, tungstenite::Error> {
    ws_connect_with(port, &format!("/ws?token={token}"), &[])
}

/// Connects to `path_and_query` with extra request headers (Authorization,
/// Cookie, Origin, ...). The returned socket has a short read timeout; the
/// `recv_*` helpers turn it into deadlines.
pub fn ws_connect_with(
    port: u16,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, tungstenite::Error> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(PROMPT))?;
    let mut request = format!("ws://127.0.0.1:{port}{path_and_query}").into_client_request()?;
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).expect("header name");
        let value = HeaderValue::from_str(v).expect("header value");
        request.headers_mut().append(name, value);
    }
    match tungstenite::client::client(request, stream) {
        Ok((ws, _response)) => {
            ws.get_ref().set_read_timeout(Some(READ_TICK))?;
            Ok(ws)
        }
        Err(HandshakeError::Failure(e)) => Err(e),
        Err(HandshakeError::Interrupted(_)) => {
            Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out").into())
        }
    }
}

/// The status and body of a refused upgrade.
#[track_caller]
pub fn refused(result: Result<Ws, tungstenite::Error>) -> (u16, String) {
    match result {
        Ok(_) => panic!("expected the upgrade to be refused, but it succeeded"),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("expected an HTTP error response, got {e}"),
    }
}

/// Connects with `token` and reads the `connected` message; returns the socket
/// and that message's payload.
#[track_caller]
pub fn ws_open(port: u16, token: &str) -> (Ws, Value) {
    let ws = ws_connect(port, token).unwrap_or_else(|e| panic!("WebSocket connect failed: {e}"));
    expect_connected(ws)
}

/// Reads the `connected` message of a fresh connection.
#[track_caller]
pub fn expect_connected(mut ws: Ws) -> (Ws, Value) {
    let msg = recv_json(&mut ws, PROMPT);
    assert_eq!(msg["type"], "connected", "first message: {msg}");
    let payload = msg["payload"].clone();
    (ws, payload)
}

/// The next frame of any kind (pings and pongs included); `None` on timeout.
/// Fails the test if the connection ends.
#[track_caller]
pub fn recv_message(ws: &mut Ws, timeout: Duration) -> Option<Message> {
    let deadline = Instant::now() + timeout;
    loop {
        match ws.read() {
            Ok(msg) => return Some(msg),
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                if Instant::now() >= deadline {
                    return None;
                }
            }
            Err(e) => panic!("WebSocket read failed: {e}"),
        }
    }
}

/// The next text message, skipping pings and pongs; fails on timeout or close.
#[track_caller]
pub fn recv_text(ws: &mut Ws, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match recv_message(ws, left) {
            None => panic!("no text message within {timeout:?}"),
            Some(Message::Text(t)) => return t.as_str().to_string(),
            Some(Message::Ping(_) | Message::Pong(_)) => continue,
            Some(Message::Close(frame)) => panic!("expected a text message, got close {frame:?}"),
            Some(other) => panic!("expected a text message, got {other:?}"),
        }
    }
}

#[track_caller]
pub fn recv_json(ws: &mut Ws, timeout: Duration) -> Value {
    let text = recv_text(ws, timeout);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("message is not JSON ({e}): {text:?}"))
}

/// Reads until the server's close frame (skipping other messages) and sends
/// the close reply; returns its code and reason.
#[track_caller]
pub fn expect_close(ws: &mut Ws, timeout: Duration) -> (u16, String) {
    match close_or_gone(ws, timeout) {
        Some(close) => close,
        None => panic!("connection ended without a close frame"),
    }
}

/// Like [`expect_close`] but returns `None` if the connection ended without a
/// close frame (EOF or reset). Fails on timeout.
#[track_caller]
pub fn close_or_gone(ws: &mut Ws, timeout: Duration) -> Option<(u16, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => {
                // Sends our close reply; the server may already be gone.
                let _ = ws.flush();
                return Some(match frame {
                    Some(f) => (u16::from(f.code), f.reason.as_str().to_string()),
                    None => (1005, String::new()),
                });
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            panic!("no close within {timeout:?}");
        }
    }
}

/// Asserts that no text or binary message arrives for `duration` (pings and
/// pongs are ignored). Use only where the absence is the point.
#[track_caller]
pub fn expect_no_message(ws: &mut Ws, duration: Duration) {
    let deadline = Instant::now() + duration;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match recv_message(ws, left) {
            None => return,
            Some(Message::Ping(_) | Message::Pong(_)) => {}
            Some(other) => panic!("expected no message, got {other:?}"),
        }
    }
}

#[track_caller]
pub fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_string()))
        .expect("send text frame");
}

// ---------------------------------------------------------------------------
// Message checks
// ---------------------------------------------------------------------------

/// Parses `YYYY-MM-DDTHH:MM:SS.mmmZ` into milliseconds since the epoch.
pub fn parse_rfc3339_millis(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if b[19] != b'.' || b[23] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec, milli) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + milli)
}

/// Asserts an RFC 3339 UTC timestamp with milliseconds within 10 s of now.
#[track_caller]
pub fn assert_timestamp(value: &Value) {
    let s = value
        .as_str()
        .unwrap_or_else(|| panic!("timestamp is not a string: {value}"));
    let t = parse_rfc3339_millis(s)
        .unwrap_or_else(|| panic!("timestamp {s:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ"));
    let skew = (t - now_millis()).abs();
    assert!(skew < 10_000, "timestamp {s:?} is {skew} ms away from now");
}

/// Asserts a server message has exactly `type`, `payload`, `timestamp`, with
/// the given type and a valid timestamp.
#[track_caller]
pub fn assert_message(msg: &Value, ty: &str) {
    let obj = msg
        .as_object()
        .unwrap_or_else(|| panic!("message is not an object: {msg}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["payload", "timestamp", "type"],
        "message keys of {msg}"
    );
    assert_eq!(msg["type"], ty, "message type of {msg}");
    assert_timestamp(&msg["timestamp"]);
}

// ---------------------------------------------------------------------------
// Raw WebSocket client, for what tungstenite's client will not send
// ---------------------------------------------------------------------------

pub enum RawEvent {
    Frame { opcode: u8, payload: Vec<u8> },
    Eof,
    Error(io::Error),
    Timeout,
}

/// A WebSocket connection with a hand-made handshake and hand-made frames.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Completes an upgrade on `path_and_query` and checks the 101 answer,
    /// including `Sec-WebSocket-Accept`.
    #[track_caller]
    pub fn handshake(port: u16, path_and_query: &str, extra: &[(&str, &str)]) -> RawWs {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .write_all(upgrade_request(path_and_query, extra).as_bytes())
            .expect("write upgrade");
        let (resp, leftover) = read_http_response(&mut stream, Instant::now() + PROMPT)
            .expect("read upgrade response");
        assert_eq!(resp.status, 101, "upgrade refused: {resp:?}");
        assert_eq!(
            resp.header("sec-websocket-accept"),
            Some(SAMPLE_ACCEPT),
            "accept key in {resp:?}"
        );
        RawWs {
            stream,
            buf: leftover,
        }
    }

    /// Handshake with `?token=` and reads the `connected` frame.
    #[track_caller]
    pub fn open(port: u16, token: &str) -> RawWs {
        let mut raw = Self::handshake(port, &format!("/ws?token={token}"), &[]);
        match raw.read_event(PROMPT) {
            RawEvent::Frame { opcode: 1, payload } => {
                let v: Value = serde_json::from_slice(&payload).expect("connected frame is JSON");
                assert_eq!(v["type"], "connected", "first frame: {v}");
            }
            _ => panic!("expected the connected text frame"),
        }
        raw
    }

    /// Writes one frame: `first_byte` is FIN/RSV/opcode (0x81 = final text
    /// frame); `mask` of `None` sends it unmasked (a protocol error from a client).
    pub fn send_frame(
        &mut self,
        first_byte: u8,
        payload: &[u8],
        mask: Option<[u8; 4]>,
    ) -> io::Result<()> {
        let mut frame = vec![first_byte];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                frame.extend_from_slice(&key);
                frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => frame.extend_from_slice(payload),
        }
        self.stream.write_all(&frame)
    }

    /// A masked frame, as a client must send.
    pub fn send_masked(&mut self, first_byte: u8, payload: &[u8]) -> io::Result<()> {
        self.send_frame(first_byte, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
    }

    fn parse_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let opcode = b[0] & 0x0f;
        let masked = b[1] & 0x80 != 0;
        let (len, mut pos) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        let key = if masked {
            let k: [u8; 4] = b.get(pos..pos + 4)?.try_into().ok()?;
            pos += 4;
            Some(k)
        } else {
            None
        };
        if b.len() < pos + len {
            return None;
        }
        let mut payload = b[pos..pos + len].to_vec();
        if let Some(k) = key {
            payload
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x ^= k[i % 4]);
        }
        self.buf.drain(..pos + len);
        Some((opcode, payload))
    }

    /// The next frame, EOF, an I/O error, or a timeout.
    pub fn read_event(&mut self, timeout: Duration) -> RawEvent {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 65536];
        loop {
            if let Some((opcode, payload)) = self.parse_frame() {
                return RawEvent::Frame { opcode, payload };
            }
            match read_until_deadline(&mut self.stream, &mut chunk, deadline) {
                Ok(0) => return RawEvent::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return RawEvent::Timeout,
                Err(e) => return RawEvent::Error(e),
            }
        }
    }

    /// Skips data and ping frames until a close frame; returns its code and reason.
    #[track_caller]
    pub fn expect_close(&mut self, timeout: Duration) -> (u16, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_event(left) {
                RawEvent::Frame { opcode: 8, payload } => {
                    assert!(payload.len() >= 2, "close frame without a code");
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
                }
                RawEvent::Frame { .. } => {}
                RawEvent::Eof => panic!("EOF before a close frame"),
                RawEvent::Error(e) => panic!("{e} before a close frame"),
                RawEvent::Timeout => panic!("no close frame within {timeout:?}"),
            }
        }
    }

    /// Reads and discards until EOF or a connection error; false on timeout.
    pub fn wait_gone(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_event(left) {
                RawEvent::Frame { .. } => {}
                RawEvent::Eof | RawEvent::Error(_) => return true,
                RawEvent::Timeout => return false,
            }
        }
    }
}

/// Reads a socket until EOF or an error (true) or the timeout (false).
pub fn wait_eof(stream: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut chunk = [0u8; 65536];
    loop {
        match read_until_deadline(stream, &mut chunk, deadline) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// A fresh Redis and a gateway (with `extra_env`) that is subscribed to it.
pub fn setup(extra_env: &[(&str, &str)]) -> (RedisServer, Gateway) {
    let redis = RedisServer::start();
    let gw = Gateway::start(redis.port, extra_env);
    gw.wait_redis_connected(PROMPT);
    (redis, gw)
}

// ---------------------------------------------------------------------------
// Hostile clients, Redis faults and load (issue 3)
// ---------------------------------------------------------------------------

/// Raises this test process's soft open-file limit to its hard limit (tests
/// that hold thousands of sockets), as the server does for itself; returns the
/// soft limit now in effect.
pub fn raise_own_nofile_limit() -> u64 {
    ws_notify::server::raise_open_file_limit(0)
}

/// Entries of `/proc/<pid>/<dir>` (`fd`, `task`); 0 if the process is gone.
fn proc_entries(pid: u32, dir: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{dir}"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Open file descriptors of a process, from `/proc/<pid>/fd`.
pub fn proc_fd_count(pid: u32) -> usize {
    proc_entries(pid, "fd")
}

/// Threads of a process, from `/proc/<pid>/task`.
pub fn proc_thread_count(pid: u32) -> usize {
    proc_entries(pid, "task")
}

/// The bytes of one client frame: `first_byte` is FIN/RSV/opcode, `mask` of
/// `None` leaves it unmasked (as [`RawWs::send_frame`] writes it).
pub fn client_frame(first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut frame = vec![first_byte];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => frame.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}

/// A masked client frame (the mask [`RawWs::send_masked`] uses).
pub fn masked_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    client_frame(first_byte, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
}

impl RawWs {
    /// Wraps a socket whose upgrade the test did by hand; `leftover` is what was
    /// read after the 101 head (the start of the WebSocket stream).
    pub fn from_upgraded(stream: TcpStream, leftover: Vec<u8>) -> RawWs {
        RawWs {
            stream,
            buf: leftover,
        }
    }

    /// Writes bytes as they are (several frames, or a broken one).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads the `connected` text frame of a fresh session; fails otherwise.
    #[track_caller]
    pub fn expect_connected(&mut self, timeout: Duration) -> Value {
        match self.read_event(timeout) {
            RawEvent::Frame { opcode: 1, payload } => {
                let v: Value = serde_json::from_slice(&payload).expect("connected frame is JSON");
                assert_eq!(v["type"], "connected", "first frame: {v}");
                v
            }
            RawEvent::Frame { opcode, .. } => {
                panic!("expected the connected frame, got opcode {opcode}")
            }
            RawEvent::Eof => panic!("EOF instead of the connected frame"),
            RawEvent::Error(e) => panic!("{e} instead of the connected frame"),
            RawEvent::Timeout => panic!("no connected frame within {timeout:?}"),
        }
    }

    /// The next text frame as JSON, skipping pings and pongs; fails otherwise.
    #[track_caller]
    pub fn expect_json(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_event(left) {
                RawEvent::Frame { opcode: 1, payload } => {
                    return serde_json::from_slice(&payload).unwrap_or_else(|e| {
                        panic!(
                            "text frame is not JSON ({e}): {:?}",
                            String::from_utf8_lossy(&payload)
                        )
                    });
                }
                RawEvent::Frame { opcode: 9 | 10, .. } => {}
                RawEvent::Frame { opcode, payload } => {
                    panic!("expected a text frame, got opcode {opcode} ({payload:?})")
                }
                RawEvent::Eof => panic!("EOF instead of a text frame"),
                RawEvent::Error(e) => panic!("{e} instead of a text frame"),
                RawEvent::Timeout => panic!("no text frame within {timeout:?}"),
            }
        }
    }
}

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

impl Gateway {
    /// `ws_notify_resident_memory_bytes` from /metrics.
    #[track_caller]
    pub fn resident_bytes(&self) -> f64 {
        let text = self.metrics_text();
        metric_value(&text, "ws_notify_resident_memory_bytes")
            .unwrap_or_else(|| panic!("no ws_notify_resident_memory_bytes in /metrics:\n{text}"))
    }
}

/// Asserts that the gateway still serves: a new client of `user` connects and
/// receives a message published for it.
#[track_caller]
pub fn assert_serving(redis: &RedisServer, gw: &Gateway, user: &str) {
    let (mut ws, hello) = ws_open(gw.port, &gw.token(user));
    assert_eq!(hello["user_id"], user, "{hello}");
    let n = redis.notify(user, r#"{"type":"still_serving","payload":1}"#);
    assert!(n >= 1, "the gateway is not subscribed ({n} receivers)");
    assert_message(&recv_json(&mut ws, PROMPT), "still_serving");
}
