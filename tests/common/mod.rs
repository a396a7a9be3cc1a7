//! Shared harness for the integration tests: a real `redis-server` and the real
//! `ws-notify` binary, each on a free port, plus small HTTP, WebSocket and JWT
//! clients.
//!
//! Every child process is owned by a guard that kills it on drop (and prints the
//! gateway's output when the test is failing); readiness is polled with
//! deadlines, never waited for with fixed sleeps. Each test starts its own
//! processes, so tests run in parallel.
//!
//! One module per concept, all re-exported here (`use common::*`):
//! - `redis_server`: `RedisServer`;
//! - `redis_cluster`: `RedisCluster`, a Redis Cluster of `redis-server`s;
//! - `gateway`: `Gateway`, the binary under test;
//! - `http`: raw HTTP requests and responses, `/health`, `/metrics`;
//! - `ws`: tungstenite's client and the `recv_*` helpers;
//! - `raw_ws`: `RawWs`, hand-made frames (`client_frame`, `masked_frame`);
//! - `tokens`: JWTs and the base64url codec;
//! - `messages`: checks of the messages the gateway sends;
//! - `files` and `tls`: temp dirs, openssl, a test PKI and a TLS redis-server;
//! - `procstat`: a process's descriptors, threads, nice values and CPU time;
//! - `procs`: other child processes (the CLI, real clients), read line by line;
//! - `python`: Python with the Prometheus and YAML parsers (operations tests).
#![allow(dead_code)]

pub mod files;
pub mod gateway;
pub mod http;
pub mod messages;
pub mod procs;
pub mod procstat;
pub mod python;
pub mod raw_ws;
pub mod redis_cluster;
pub mod redis_server;
pub mod tls;
pub mod tokens;
pub mod ws;

// Each test file uses only some of these.
#[allow(unused_imports)]
pub use self::{
    files::*, gateway::*, http::*, messages::*, procstat::*, raw_ws::*, redis_cluster::*,
    redis_server::*, tls::*, tokens::*, ws::*,
};

use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads once with the deadline as the limit: `Ok(0)` is EOF, `Err(TimedOut)`
/// when the deadline passed without data.
pub(crate) fn read_until_deadline(
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

/// Sends `sig` to the process `pid` (one of the test's own children).
#[track_caller]
pub fn send_signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a pid the test owns.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}) failed: {}",
        io::Error::last_os_error()
    );
}

/// Raises this test process's soft open-file limit to its hard limit (tests
/// that hold thousands of sockets), as the server does for itself; returns the
/// soft limit now in effect.
pub fn raise_own_nofile_limit() -> u64 {
    ws_notify::server::raise_open_file_limit(0)
}

/// A fresh Redis and a gateway (with `extra_env`) that is subscribed to it.
pub fn setup(extra_env: &[(&str, &str)]) -> (RedisServer, Gateway) {
    let redis = RedisServer::start();
    let gw = Gateway::start(redis.port, extra_env);
    gw.wait_redis_connected(PROMPT);
    (redis, gw)
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
