//! Logging seen from outside: a stalled log consumer costs log lines (counted in
//! `/metrics`), never delivery; console lines cannot be forged by values that
//! come from clients.

mod common;

use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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
    // Each message for a user with no connection logs a debug line of about 150
    // bytes: 6,000 of them are far more than the pipe (64 KiB) and the gateway's
    // log buffer (256 KiB) hold.
    const NOISY_REQUESTS: usize = 6_000;
    let redis = RedisServer::start();
    let gw = StalledLogGateway::start(redis.port);
    let (mut ws, _) = ws_open(gw.port, &token(&gw.secret, "steady", 3600));

    for _ in 0..NOISY_REQUESTS {
        redis.notify("nobody-here", r#"{"type":"noise","payload":0}"#);
    }
    // Before the fix the loop blocked in write(2) to stderr, for good.
    let request = b"GET /not-here HTTP/1.1\r\nHost: t\r\n\r\n";
    let response = try_http(gw.port, request, PROMPT).unwrap_or_else(|e| {
        panic!("the gateway stopped answering while its log consumer stalls: {e}")
    });
    assert_eq!(response.status, 404);

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
            // A value with a space is quoted.
            "\"evil\\nINFO  ws_notify::server fake line injected\"",
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

/// The JSON log lines of `logs` (every line must be one).
#[track_caller]
fn json_lines(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

/// The JSON lines whose `message` is `message`.
fn lines_with_message(gw: &Gateway, message: &str) -> Vec<Value> {
    json_lines(&gw.logs())
        .into_iter()
        .filter(|v| v["message"] == message)
        .collect()
}

/// Waits for a JSON line with `message` for which `matches` holds, and returns it.
#[track_caller]
fn wait_line(gw: &Gateway, message: &str, matches: impl Fn(&Value) -> bool) -> Value {
    wait_for(PROMPT, message, || {
        lines_with_message(gw, message)
            .into_iter()
            .find(|v| matches(v))
    })
}

/// A connection id as the README describes it: six hex characters, a dash, a counter.
#[track_caller]
fn assert_connection_id(id: &str) -> &str {
    let (prefix, counter) = id.split_once('-').unwrap_or_else(|| panic!("{id:?}"));
    assert_eq!(prefix.len(), 6, "{id:?}");
    assert!(prefix.bytes().all(|b| b.is_ascii_hexdigit()), "{id:?}");
    assert!(counter.parse::<u64>().is_ok(), "{id:?}");
    prefix
}

#[test]
fn connect_and_disconnect_lines_carry_their_facts_as_members() {
    let (_redis, gw) = setup(&[("LOGGER_LEVEL", "info")]);
    let (mut ws, hello) = ws_open(gw.port, &gw.token("alice"));
    let id = hello["connection_id"]
        .as_str()
        .expect("a string id")
        .to_string();
    assert_connection_id(&id);

    let connected = wait_line(&gw, "client connected", |v| v["user_id"] == "alice");
    assert_eq!(connected["level"], "info");
    assert_eq!(connected["target"], "ws_notify::server");
    assert_eq!(connected["connection_id"], id.as_str(), "{connected}");
    let remote = connected["remote"].as_str().expect("remote");
    assert!(remote.starts_with("127.0.0.1:"), "{connected}");

    close_ws(&mut ws);
    let gone = wait_line(&gw, "client disconnected", |v| v["user_id"] == "alice");
    assert_eq!(gone["level"], "info");
    assert_eq!(gone["connection_id"], id.as_str(), "{gone}");
    assert_eq!(gone["reason"], "client_closed", "{gone}");
    assert!(gone["duration_ms"].is_u64(), "{gone}");
}

#[test]
fn console_lines_keep_key_value_pairs() {
    let (_redis, gw) = setup(&[("LOGGER_ENCODING", "console"), ("LOGGER_LEVEL", "info")]);
    let (_ws, hello) = ws_open(gw.port, &gw.token("alice"));
    let id = hello["connection_id"]
        .as_str()
        .expect("a string id")
        .to_string();
    let expected = format!("client connected user_id=alice connection_id={id} remote=127.0.0.1:");
    wait_until(PROMPT, &expected, || gw.logs().contains(&expected));
}

#[test]
fn refusals_are_logged_at_info_once_per_reason_and_period_with_a_count() {
    const BAD: usize = 20;
    let (_redis, gw) = setup(&[("LOGGER_LEVEL", "info")]);
    let bad_token = token(&random_hex(2), "mallory", 3600);
    let refuse = |path: &str| {
        let resp = raw_request(gw.port, upgrade_request(path, &[]));
        assert_eq!(resp.status, 401, "{resp:?}");
    };
    for _ in 0..BAD {
        refuse(&format!("/ws?token={bad_token}"));
    }
    refuse("/ws");
    let missing = wait_line(&gw, "request refused", |v| v["reason"] == "missing_token");
    assert_eq!(missing["status"], 401);
    assert_eq!(missing["suppressed"], 0);
    let first = wait_line(&gw, "request refused", |v| v["reason"] == "invalid_token");
    assert_eq!(first["level"], "info");
    assert_eq!(first["status"], 401);
    assert_eq!(first["suppressed"], 0);
    assert!(
        first["remote"]
            .as_str()
            .is_some_and(|r| r.starts_with("127.0.0.1:")),
        "{first}"
    );
    // Past the period (5 s), the next refusal reports how many were left out.
    std::thread::sleep(Duration::from_millis(5_500));
    refuse(&format!("/ws?token={bad_token}"));
    let invalid_lines = || {
        lines_with_message(&gw, "request refused")
            .into_iter()
            .filter(|v| v["reason"] == "invalid_token")
            .collect::<Vec<_>>()
    };
    // Every refusal is a line or counted in one.
    wait_until(PROMPT, "every invalid_token refusal accounted for", || {
        let lines = invalid_lines();
        let counted: u64 = lines
            .iter()
            .map(|v| 1 + v["suppressed"].as_u64().unwrap())
            .sum();
        counted == BAD as u64 + 1
    });
    let lines = invalid_lines();
    assert!(lines.len() < BAD, "not rate-limited: {} lines", lines.len());
    assert!(
        lines.last().unwrap()["suppressed"].as_u64().unwrap() >= 1,
        "{lines:?}"
    );
    let logs = gw.logs();
    let signature = bad_token.rsplit('.').next().unwrap();
    assert!(!logs.contains(signature), "a token was logged:\n{logs}");
}

#[test]
fn the_start_up_line_has_the_version_and_the_configuration_without_secrets() {
    let password = random_hex(2);
    let redis = RedisServer::start_with_auth(None, &password);
    let gw = Gateway::start(
        redis.port,
        &[("REDIS_URL", &redis.url()), ("SHUTDOWN_DRAIN", "3s")],
    );
    gw.wait_redis_connected(PROMPT);
    let start = wait_line(&gw, "starting ws-notify", |_| true);
    assert_eq!(start["level"], "info");
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(start["listen"], format!("127.0.0.1:{}", gw.port));
    assert_eq!(start["redis_port"], redis.port);
    assert_eq!(start["max_connections"], 10_000);
    assert_eq!(start["shutdown_drain"], "3s");
    assert_eq!(start["redis_subscribe_mode"], "pattern");
    assert_eq!(start["redis_unsubscribe_linger"], "5s");
    assert_eq!(start["history_size"], 0);
    assert_eq!(start["jwt_secret_key"], "***");
    assert_eq!(start["redis_password"], "***");
    let logs = gw.logs();
    assert!(
        !logs.contains(&password),
        "the Redis password was logged:\n{logs}"
    );
    assert!(
        !logs.contains(&gw.secret),
        "the JWT secret was logged:\n{logs}"
    );
    // It comes first.
    assert_eq!(
        json_lines(&logs)[0]["message"],
        "starting ws-notify",
        "{logs}"
    );
}

#[test]
fn configuration_errors_in_the_chosen_encoding() {
    let (code, out) = Gateway::run_expect_exit(&[("SHUTDOWN_DRAIN", "soon")]);
    assert_eq!(code, Some(2), "{out}");
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["level"], "error");
    assert_eq!(lines[0]["message"], "invalid configuration");
    assert_eq!(lines[0]["variable"], "SHUTDOWN_DRAIN");
    assert!(
        lines[0]["error"]
            .as_str()
            .unwrap()
            .contains("SHUTDOWN_DRAIN"),
        "{out}"
    );

    // Found after logging is set up (the token rules): the same shape.
    let (code, out) = Gateway::run_expect_exit(&[("JWT_LEEWAY", "48h")]);
    assert_eq!(code, Some(2), "{out}");
    let errors: Vec<Value> = json_lines(&out)
        .into_iter()
        .filter(|v| v["level"] == "error")
        .collect();
    assert_eq!(errors.len(), 1, "{out}");
    assert_eq!(errors[0]["message"], "invalid configuration");
    assert_eq!(errors[0]["variable"], "JWT_LEEWAY");

    let (code, out) =
        Gateway::run_expect_exit(&[("SHUTDOWN_DRAIN", "soon"), ("LOGGER_ENCODING", "console")]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.starts_with("ws-notify: invalid configuration: SHUTDOWN_DRAIN"),
        "{out}"
    );
}

#[test]
fn redis_down_and_up_are_logged_with_members() {
    let (mut redis, gw) = setup(&[("LOGGER_LEVEL", "info"), ("REDIS_RECONNECT_MAX", "200ms")]);
    let subscribed = wait_line(&gw, "subscribed to Redis", |_| true);
    let address = format!("127.0.0.1:{}", redis.port);
    assert_eq!(subscribed["redis"], address.as_str());
    redis.kill();
    let down = wait_line(&gw, "Redis unavailable; reconnecting", |_| true);
    assert_eq!(down["level"], "warn");
    assert_eq!(down["redis"], address.as_str());
    assert!(
        down["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{down}"
    );
    assert!(down["retry_in_ms"].is_u64(), "{down}");
    assert!(down["suppressed"].is_u64(), "{down}");
    redis.restart();
    let up = wait_line(&gw, "re-subscribed to Redis", |_| true);
    assert_eq!(up["level"], "info");
    assert_eq!(up["redis"], address.as_str());
    assert!(up["attempts"].as_u64().is_some_and(|n| n >= 1), "{up}");
    assert!(up["down_ms"].is_u64(), "{up}");
}

#[test]
fn rust_log_raises_one_module() {
    // README, Configuration: RUST_LOG=ws_notify::server=debug raises that module
    // alone; the others stay at LOGGER_LEVEL.
    for module in ["ws_notify::server", "ws_notify::redis_reader"] {
        let filter = format!("{module}=debug");
        let (redis, mut gw) = setup(&[("LOGGER_LEVEL", "info"), ("RUST_LOG", &filter)]);
        // The server logs a message for nobody at debug.
        redis.notify("nobody-here", r#"{"type":"t","payload":1}"#);
        gw.wait_metric_at_least(
            r#"ws_notify_messages_dropped_total{reason="offline_user"}"#,
            1.0,
        );
        gw.signal(libc::SIGTERM);
        assert_eq!(gw.wait_exit(PROMPT).and_then(|s| s.code()), Some(0));
        let lines = json_lines(&gw.logs());
        assert!(
            lines.iter().any(|v| v["level"] == "info"),
            "{filter}: no info line"
        );
        let debug: Vec<&Value> = lines.iter().filter(|v| v["level"] == "debug").collect();
        for line in &debug {
            assert_eq!(line["target"], module, "{filter}: {line}");
        }
        let server_debug = debug.iter().any(|v| v["target"] == "ws_notify::server");
        assert_eq!(
            server_debug,
            module == "ws_notify::server",
            "{filter}: server debug lines: {debug:?}"
        );
    }
}

#[test]
fn connection_ids_differ_across_instances() {
    let redis = RedisServer::start();
    let one = Gateway::start(redis.port, &[]);
    let two = Gateway::start(redis.port, &[]);
    let (_a, first) = ws_open(one.port, &one.token("alice"));
    let (_b, second) = ws_open(two.port, &two.token("alice"));
    let first = first["connection_id"].as_str().expect("a string id");
    let second = second["connection_id"].as_str().expect("a string id");
    assert_ne!(
        assert_connection_id(first),
        assert_connection_id(second),
        "two instances drew the same prefix"
    );
}
