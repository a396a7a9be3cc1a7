//! Logging seen from outside: a stalled log consumer costs log lines (counted in
//! `/metrics`), never delivery; console lines cannot be forged by values that
//! come from clients.

mod common;

use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::Instant;

use common::*;

/// The gateway with its stderr connected to a pipe that nobody reads: once the
/// pipe's 64 KiB are full, every write to it would block. Killed on drop.
struct StalledLogGateway {
    port: u16,
    secret: String,
    child: Child,
    /// Held open and never read.
    _stderr: ChildStderr,
}

impl StalledLogGateway {
    fn start(redis_port: u16) -> StalledLogGateway {
        let port = free_port();
        let secret = random_hex(2);
        let mut child = Command::new(env!("CARGO_BIN_EXE_ws-notify"))
            .env_clear()
            .env("WS_HOST", "127.0.0.1")
            .env("WS_PORT", port.to_string())
            .env("REDIS_HOST", "127.0.0.1")
            .env("REDIS_PORT", redis_port.to_string())
            .env("JWT_SECRET_KEY", &secret)
            .env("LOGGER_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ws-notify");
        let stderr = child.stderr.take().expect("stderr piped");
        let gw = StalledLogGateway {
            port,
            secret,
            child,
            _stderr: stderr,
        };
        wait_until(secs(15), "/health reports Redis connected", || {
            try_http(port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n", PROMPT)
                .is_ok_and(|r| r.status == 200)
        });
        gw
    }
}

impl Drop for StalledLogGateway {
    fn drop(&mut self) {
        // Kill errors only mean it has already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_stalled_log_consumer_costs_lines_not_delivery() {
    // Each refused request logs a debug line of about 130 bytes: 6,000 of them are
    // far more than the pipe (64 KiB) and the gateway's log buffer (256 KiB) hold.
    const NOISY_REQUESTS: usize = 6_000;
    let redis = RedisServer::start();
    let gw = StalledLogGateway::start(redis.port);
    let (mut ws, _) = ws_open(gw.port, &token(&gw.secret, "steady", 3600));

    let request = b"GET /not-here HTTP/1.1\r\nHost: t\r\n\r\n";
    for i in 0..NOISY_REQUESTS {
        // Before the fix the loop blocked in write(2) to stderr here, for good.
        let response = try_http(gw.port, request, PROMPT).unwrap_or_else(|e| {
            panic!("request {i}: the gateway stopped answering while its log consumer stalls: {e}")
        });
        assert_eq!(response.status, 404, "request {i}");
    }

    let published = Instant::now();
    assert_eq!(
        redis.notify("steady", r#"{"type":"despite_logs","payload":1}"#),
        1
    );
    assert_message(&recv_json(&mut ws, PROMPT), "despite_logs");
    let dropped = metric(gw.port, "ws_notify_log_lines_dropped_total");
    assert!(
        dropped > 0.0,
        "no log line counted as dropped after {NOISY_REQUESTS} debug lines into a stalled pipe"
    );
    eprintln!(
        "delivered {:?} after publishing; {dropped} log lines dropped",
        published.elapsed()
    );
}

#[test]
fn console_lines_cannot_be_forged_by_a_user_claim() {
    let (_redis, gw) = setup(&[("LOGGER_ENCODING", "console")]);
    let users = [
        (
            "evil\nINFO  ws_notify::server fake line injected",
            "evil\\nINFO  ws_notify::server fake line injected",
        ),
        ("nul\0byte", "nul\\u{0}byte"),
        ("esc\u{1b}[31mred\r", "esc\\u{1b}[31mred\\r"),
    ];
    let mut open = Vec::new();
    for (user, _) in users {
        let (ws, hello) = ws_open(gw.port, &gw.token(user));
        assert_eq!(hello["user_id"], user);
        open.push(ws);
    }
    for (_, escaped) in users {
        let expected = format!("client connected user_id={escaped} connection_id=");
        wait_until(PROMPT, &expected, || gw.logs().contains(&expected));
    }
    let logs = gw.logs();
    for line in logs.lines() {
        // Every line is a whole record: it starts with its timestamp.
        assert!(
            line.len() > 24 && line.as_bytes()[..4].iter().all(u8::is_ascii_digit),
            "a line that is not a record: {line:?}\n{logs}"
        );
    }
    assert!(
        !logs.contains(['\0', '\u{1b}', '\r']),
        "raw control characters in the log:\n{logs:?}"
    );
}
