//! The HTTP side of the wire contract (README, "Connecting" and "Endpoints"):
//! the upgrade, every row of the error table, token sources and JWT rules,
//! /health and /metrics. Cases that differ only in their input are rows of a
//! table run against one gateway.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Instant;

use common::*;
use serde_json::{Value, json};

const INVALID: &str = "invalid or expired token";
const MISSING: &str = "missing token parameter";
const ORIGIN: &str = "origin not allowed";
/// The origin list of the cookie gateway.
const APP_ORIGIN: &str = "https://app.example";

/// Upgrade with `?token=` on a hand-written request; returns the response.
fn upgrade_with_token(gw: &Gateway, token: &str) -> HttpResponse {
    raw_request(gw.port, upgrade_request(&format!("/ws?token={token}"), &[]))
}

/// What an upgrade request must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// 101, and the `connected` message names this user.
    User(&'static str),
    /// This status with `{"error": <text>}`.
    Error(u16, &'static str),
}

/// One row of a table: a description, the request target, extra headers, and
/// what it must get.
struct Case {
    what: &'static str,
    target: String,
    headers: Vec<(&'static str, String)>,
    expect: Expect,
}

impl Case {
    fn new(what: &'static str, target: impl Into<String>, expect: Expect) -> Case {
        Case {
            what,
            target: target.into(),
            headers: Vec::new(),
            expect,
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Case {
        self.headers.push((name, value.into()));
        self
    }
}

/// Runs every case as a real WebSocket client (tungstenite) would.
#[track_caller]
fn run_upgrade_cases(gw: &Gateway, cases: &[Case]) {
    for case in cases {
        let headers: Vec<(&str, &str)> = case
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        let result = ws_connect_with(gw.port, &case.target, &headers);
        match case.expect {
            Expect::User(user) => {
                let ws = result.unwrap_or_else(|e| panic!("{}: refused: {e}", case.what));
                assert_eq!(expect_connected(ws).1["user_id"], user, "{}", case.what);
            }
            Expect::Error(status, error) => {
                let (got, body) = refused(result);
                assert_eq!(got, status, "{}: {body}", case.what);
                assert_eq!(
                    serde_json::from_str::<Value>(&body).expect("JSON body"),
                    json!({ "error": error }),
                    "{}",
                    case.what
                );
            }
        }
    }
}

// ---- the upgrade itself ---------------------------------------------------

#[test]
fn upgrade_answers_101_with_the_rfc_accept_key() {
    let (_redis, gw) = setup(&[]);
    let resp = upgrade_with_token(&gw, &gw.token("alice"));
    assert_eq!(resp.status, 101, "{resp:?}");
    assert_eq!(resp.header("sec-websocket-accept"), Some(SAMPLE_ACCEPT));
    assert!(
        resp.header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{resp:?}"
    );
}

#[test]
fn browser_style_upgrade_headers_are_accepted() {
    // Firefox sends `Connection: keep-alive, Upgrade`; header names and the
    // `websocket` token are case-insensitive (RFC 6455 section 4.2.1).
    let (_redis, gw) = setup(&[]);
    let path = format!("/ws?token={}", gw.token("alice"));
    let head = request_head(
        "GET",
        &path,
        &[
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-key", SAMPLE_KEY),
            ("sec-websocket-version", "13"),
            ("Origin", "https://app.example"),
            (
                "Sec-WebSocket-Extensions",
                "permessage-deflate; client_max_window_bits",
            ),
            ("User-Agent", "Mozilla/5.0"),
        ],
    );
    let resp = raw_request(gw.port, head);
    assert_eq!(resp.status, 101, "{resp:?}");
    assert_eq!(resp.header("sec-websocket-accept"), Some(SAMPLE_ACCEPT));
    // No extension was negotiated: frames stay plain.
    assert!(
        resp.header("sec-websocket-extensions").is_none(),
        "{resp:?}"
    );
}

#[test]
fn request_head_may_arrive_in_pieces() {
    let (_redis, gw) = setup(&[]);
    let request = upgrade_request(&format!("/ws?token={}", gw.token("alice")), &[]);
    let mut stream = TcpStream::connect(("127.0.0.1", gw.port)).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    for piece in request.as_bytes().chunks(7) {
        stream.write_all(piece).expect("write piece");
        // Spacing the pieces is the input under test, not a wait for something.
        std::thread::sleep(ms(2));
    }
    let (resp, _) = read_http_response(&mut stream, Instant::now() + PROMPT).expect("response");
    assert_eq!(resp.status, 101, "{resp:?}");
}

// ---- token sources ----------------------------------------------------------

#[test]
fn token_sources_in_order_with_cookies_only_from_listed_origins() {
    let (_redis, gw) = setup(&[
        ("JWT_COOKIE_NAME", "auth"),
        ("WS_ALLOWED_ORIGINS", APP_ORIGIN),
    ]);
    let alice = gw.token("alice");
    let bob = gw.token("bob");
    let stale = token("an-old-secret", "alice", 3600);
    let expired = token(&gw.secret, "alice", -3600);
    let bob_query = format!("/ws?token={bob}");
    use Expect::{Error, User};
    let cases = [
        Case::new("bearer", "/ws", User("alice"))
            .header("Authorization", format!("Bearer {alice}")),
        Case::new("bearer before query", bob_query.clone(), User("alice"))
            .header("Authorization", format!("Bearer {alice}")),
        Case::new(
            "percent-encoded query",
            format!("/ws?x=1&token={}&y=2", percent_encode_all(&alice)),
            User("alice"),
        ),
        Case::new("cookie from a listed origin", "/ws", User("alice"))
            .header("Origin", APP_ORIGIN)
            .header("Cookie", format!("theme=dark; auth={alice}; other=1")),
        Case::new("cookie before query", bob_query.clone(), User("alice"))
            .header("Origin", APP_ORIGIN)
            .header("Cookie", format!("auth={alice}")),
        // Cross-site WebSocket hijacking: a cookie needs a listed Origin.
        Case::new("cookie without Origin", "/ws", Error(403, ORIGIN))
            .header("Cookie", format!("auth={alice}")),
        Case::new("cookie from an unlisted origin", "/ws", Error(403, ORIGIN))
            .header("Origin", "https://evil.example")
            .header("Cookie", format!("auth={alice}")),
        Case::new(
            "cookie without Origin, query token",
            bob_query.clone(),
            User("bob"),
        )
        .header("Cookie", format!("auth={alice}")),
        // A stale cookie does not lock out a valid token after it.
        Case::new("stale cookie, valid query", bob_query.clone(), User("bob"))
            .header("Origin", APP_ORIGIN)
            .header("Cookie", "auth=garbage"),
        Case::new(
            "expired cookie, valid query",
            bob_query.clone(),
            User("bob"),
        )
        .header("Origin", APP_ORIGIN)
        .header("Cookie", format!("auth={expired}")),
        Case::new("empty cookie, then a valid one", "/ws", User("alice"))
            .header("Origin", APP_ORIGIN)
            .header("Cookie", format!("auth=; auth={alice}")),
        Case::new("stale cookie, then a valid one", "/ws", User("alice"))
            .header("Origin", APP_ORIGIN)
            .header("Cookie", format!("auth={stale}"))
            .header("Cookie", format!("auth={alice}")),
        Case::new("stale bearer, valid query", bob_query.clone(), User("bob"))
            .header("Authorization", format!("Bearer {stale}")),
        Case::new("only a stale cookie", "/ws", Error(401, INVALID))
            .header("Origin", APP_ORIGIN)
            .header("Cookie", format!("auth={stale}")),
        // WS_ALLOWED_ORIGINS does not lock out clients that send no Origin.
        Case::new("no Origin, query token", bob_query.clone(), User("bob")),
        Case::new("listed origin, query token", bob_query.clone(), User("bob"))
            .header("Origin", APP_ORIGIN),
        Case::new(
            "unlisted origin, valid token",
            bob_query.clone(),
            Error(403, ORIGIN),
        )
        .header("Origin", "https://app.example.evil"),
        Case::new("no token at all", "/ws", Error(401, MISSING)),
        Case::new("empty query token", "/ws?token=", Error(401, MISSING))
            .header("Origin", APP_ORIGIN)
            .header("Cookie", "auth=; theme=dark"),
        Case::new("non-bearer Authorization", "/ws", Error(401, MISSING))
            .header("Authorization", "Basic dXNlcjpwYXNz"),
    ];
    run_upgrade_cases(&gw, &cases);
}

#[test]
fn hundreds_of_stale_cookies_cost_two_token_checks() {
    let (_redis, gw) = setup(&[
        ("JWT_COOKIE_NAME", "auth"),
        ("WS_ALLOWED_ORIGINS", APP_ORIGIN),
    ]);
    let cookies: String = (0..300).map(|i| format!("auth=stale{i}; ")).collect();
    let path = format!("/ws?token={}", gw.token("many-cookies"));
    let headers = [("Origin", APP_ORIGIN), ("Cookie", cookies.as_str())];
    let ws = ws_connect_with(gw.port, &path, &headers).expect("the query token after the cap");
    assert_eq!(expect_connected(ws).1["user_id"], "many-cookies");
    // The refusals are logged (debug) before the connect line.
    wait_until(PROMPT, "the connect line", || {
        gw.logs().contains(r#""user_id":"many-cookies""#)
    });
    let refused = gw.logs().matches("(from cookie)").count();
    assert_eq!(refused, 2, "cookie tokens checked:\n{}", gw.logs());
}

#[test]
fn cookies_and_origins_are_ignored_without_configuration() {
    let (_redis, gw) = setup(&[]);
    let alice = gw.token("alice");
    use Expect::{Error, User};
    let cases = [
        Case::new("cookie without JWT_COOKIE_NAME", "/ws", Error(401, MISSING))
            .header("Cookie", format!("auth={alice}")),
        Case::new("any origin", format!("/ws?token={alice}"), User("alice"))
            .header("Origin", "https://whatever.example"),
    ];
    run_upgrade_cases(&gw, &cases);
}

// ---- JWT rules ----------------------------------------------------------------

#[test]
fn invalid_tokens_are_401() {
    let (_redis, gw) = setup(&[]);
    let exp = now_secs() + 3600;
    let mut future_nbf = claims("alice", 3600);
    future_nbf["nbf"] = json!(now_secs() + 600);
    let rows: Vec<(&str, String)> = vec![
        ("another secret", token("some-other-secret", "alice", 3600)),
        ("not a JWT", "not.a.jwt".to_string()),
        ("garbage", "garbage".to_string()),
        ("alg none", unsigned_token(&claims("alice", 3600))),
        ("expired an hour ago", token(&gw.secret, "alice", -3600)),
        // JWT_LEEWAY defaults to 0s, not a library's 60 s.
        ("expired 10 s ago", token(&gw.secret, "alice", -10)),
        (
            "no exp",
            token_with_claims(&gw.secret, &json!({"sub": "alice"})),
        ),
        (
            "nbf in the future",
            token_with_claims(&gw.secret, &future_nbf),
        ),
        (
            "empty sub",
            token_with_claims(&gw.secret, &json!({"sub": "", "exp": exp})),
        ),
        (
            "numeric sub",
            token_with_claims(&gw.secret, &json!({"sub": 42, "exp": exp})),
        ),
        (
            "null sub",
            token_with_claims(&gw.secret, &json!({"sub": null, "exp": exp})),
        ),
        (
            "array sub",
            token_with_claims(&gw.secret, &json!({"sub": ["alice"], "exp": exp})),
        ),
        (
            "no sub",
            token_with_claims(&gw.secret, &json!({"exp": exp})),
        ),
    ];
    for (what, bad) in &rows {
        let resp = upgrade_with_token(&gw, bad);
        assert_eq!(resp.status, 401, "{what}: {resp:?}");
        resp.assert_error(401, INVALID);
    }
}

#[test]
fn leeway_accepts_recently_expired_tokens() {
    let (_redis, gw) = setup(&[("JWT_LEEWAY", "1m")]);
    let (_ws, hello) = ws_open(gw.port, &token(&gw.secret, "alice", -10));
    assert_eq!(hello["user_id"], "alice");
    upgrade_with_token(&gw, &token(&gw.secret, "alice", -3600)).assert_error(401, INVALID);
}

#[test]
fn issuer_and_audience_are_checked_when_set() {
    let (_redis, gw) = setup(&[
        ("JWT_ISSUER", "https://issuer.example"),
        ("JWT_AUDIENCE", "ws-notify"),
    ]);
    let with = |iss: Option<&str>, aud: &str| {
        let mut c = claims("alice", 3600);
        if let Some(iss) = iss {
            c["iss"] = json!(iss);
        }
        c["aud"] = json!(aud);
        format!("/ws?token={}", token_with_claims(&gw.secret, &c))
    };
    use Expect::{Error, User};
    let cases = [
        Case::new(
            "right iss and aud",
            with(Some("https://issuer.example"), "ws-notify"),
            User("alice"),
        ),
        Case::new(
            "wrong iss",
            with(Some("https://evil.example"), "ws-notify"),
            Error(401, INVALID),
        ),
        Case::new(
            "wrong aud",
            with(Some("https://issuer.example"), "someone-else"),
            Error(401, INVALID),
        ),
        Case::new("no iss", with(None, "ws-notify"), Error(401, INVALID)),
    ];
    run_upgrade_cases(&gw, &cases);
}

// ---- the error table ----------------------------------------------------------

#[test]
fn every_row_of_the_error_table() {
    let (_redis, gw) = setup(&[("WS_ALLOWED_ORIGINS", "https://a.example,https://b.example")]);
    let path = format!("/ws?token={}", gw.token("alice"));
    let get = |target: &str, headers: &[(&str, &str)]| request_head("GET", target, headers);
    let (upgrade, connection) = (("Upgrade", "websocket"), ("Connection", "Upgrade"));
    let (v13, key) = (
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", SAMPLE_KEY),
    );
    let v12 = ("Sec-WebSocket-Version", "12");
    let bad_key = ("Sec-WebSocket-Key", "short");
    let h2c = ("Upgrade", "h2c");
    let evil = ("Origin", "https://evil.example");
    let full = [upgrade, connection, v13, key];
    let upgrade_required = "websocket upgrade required";
    let bad_key_error = "missing or invalid Sec-WebSocket-Key";
    let not_allowed = "method not allowed";
    // (what, request head, status, error), in the README's order.
    let rows: Vec<(&str, String, u16, &str)> = vec![
        // A monitoring probe's plain GET: the token is checked before the upgrade headers.
        ("plain GET /ws", get("/ws", &[]), 401, MISSING),
        ("empty token", get("/ws?token=", &full), 401, MISSING),
        (
            "unlisted origin",
            get(&path, &[upgrade, connection, v13, key, evil]),
            403,
            ORIGIN,
        ),
        ("POST", request_head("POST", &path, &full), 405, not_allowed),
        (
            "POST /health",
            request_head("POST", "/health", &[]),
            405,
            not_allowed,
        ),
        ("not an upgrade", get(&path, &[]), 426, upgrade_required),
        (
            "Upgrade: h2c",
            get(&path, &[h2c, connection, v13, key]),
            426,
            upgrade_required,
        ),
        (
            "version 12",
            get(&path, &[upgrade, connection, v12, key]),
            426,
            "unsupported Sec-WebSocket-Version (13 required)",
        ),
        (
            "no key",
            get(&path, &[upgrade, connection, v13]),
            400,
            bad_key_error,
        ),
        (
            "short key",
            get(&path, &[upgrade, connection, v13, bad_key]),
            400,
            bad_key_error,
        ),
        ("unknown path", get("/nope", &[]), 404, "not found"),
        (
            "a path that starts like /ws",
            get("/wsx", &[]),
            404,
            "not found",
        ),
        (
            "unknown path with an upgrade",
            get("/other", &full),
            404,
            "not found",
        ),
    ];
    for (what, head, status, error) in &rows {
        let resp = raw_request(gw.port, head);
        assert_eq!(resp.status, *status, "{what}: {resp:?}");
        resp.assert_error(*status, error);
    }
    // RFC 6455 section 4.4: tell the client which version we speak.
    let version = raw_request(gw.port, get(&path, &[upgrade, connection, v12, key]));
    assert_eq!(
        version.header("sec-websocket-version"),
        Some("13"),
        "{version:?}"
    );
    let post = raw_request(gw.port, request_head("POST", &path, &[]));
    assert_eq!(post.header("allow"), Some("GET"), "{post:?}");
}

#[test]
fn connection_limit_is_503_before_upgrade() {
    let (_redis, gw) = setup(&[("WS_MAX_CONNECTIONS", "2")]);
    let (_a, _) = ws_open(gw.port, &gw.token("alice"));
    let (b, _) = ws_open(gw.port, &gw.token("bob"));
    upgrade_with_token(&gw, &gw.token("carol")).assert_error(503, "connection limit reached");
    gw.wait_metric_at_least(
        "ws_notify_connections_rejected_total{reason=\"connection_limit\"}",
        1.0,
    );
    // After one leaves, a new one fits again.
    leave_then_upgrade(&gw, b, "carol");
}

/// Closes `ws`, then waits until an upgrade as `user` succeeds.
fn leave_then_upgrade(gw: &Gateway, mut ws: Ws, user: &str) {
    ws.close(None).expect("close");
    // Closed or already gone: either way the slot is being freed.
    let _ = close_or_gone(&mut ws, PROMPT);
    wait_until(PROMPT, "an upgrade succeeds again", || {
        upgrade_with_token(gw, &gw.token(user)).status == 101
    });
}

#[test]
fn per_user_limit_is_429() {
    let (_redis, gw) = setup(&[("WS_MAX_CONNECTIONS_PER_USER", "1")]);
    let (a, _) = ws_open(gw.port, &gw.token("alice"));
    upgrade_with_token(&gw, &gw.token("alice"))
        .assert_error(429, "too many connections for this user");
    // Another user is not affected.
    let (_b, _) = ws_open(gw.port, &gw.token("bob"));
    leave_then_upgrade(&gw, a, "alice");
}

#[test]
fn per_user_limit_defaults_to_100() {
    let (_redis, gw) = setup(&[]);
    let alice = gw.token("alice");
    let open: Vec<Ws> = (0..100)
        .map(|i| ws_connect(gw.port, &alice).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    gw.wait_active_connections(100);
    upgrade_with_token(&gw, &alice).assert_error(429, "too many connections for this user");
    let (_bob, hello) = ws_open(gw.port, &gw.token("bob"));
    assert_eq!(hello["user_id"], "bob");
    drop(open);
}

#[test]
fn request_head_over_8_kib_is_431() {
    let (_redis, gw) = setup(&[]);
    let pad = "x".repeat(9000);
    let path = format!("/ws?token={}", gw.token("alice"));
    let resp = raw_request(gw.port, upgrade_request(&path, &[("X-Pad", &pad)]));
    resp.assert_error(431, "request header too large");

    // A head just under the limit is fine.
    let pad = "x".repeat(7000);
    let resp = raw_request(gw.port, upgrade_request(&path, &[("X-Pad", &pad)]));
    assert_eq!(resp.status, 101, "{resp:?}");
}

#[test]
fn unfinished_request_head_is_closed_after_handshake_timeout() {
    let (_redis, gw) = setup(&[("WS_HANDSHAKE_TIMEOUT", "300ms")]);
    let mut stream = TcpStream::connect(("127.0.0.1", gw.port)).expect("connect");
    stream
        .write_all(b"GET /ws?token=abc HTTP/1.1\r\nHost: x\r\n")
        .expect("write half a head");
    let start = Instant::now();
    assert!(
        wait_eof(&mut stream, secs(3)),
        "connection still open 3 s after a 300ms handshake timeout"
    );
    let elapsed = start.elapsed();
    assert!(
        elapsed >= ms(200),
        "closed after {elapsed:?}, before the 300ms timeout"
    );

    // A client that sends nothing at all is closed as well.
    let mut idle = TcpStream::connect(("127.0.0.1", gw.port)).expect("connect");
    assert!(wait_eof(&mut idle, secs(3)), "silent connection still open");
}

#[test]
fn rejected_handshakes_are_counted() {
    let (_redis, gw) = setup(&[]);
    upgrade_with_token(&gw, "garbage").assert_error(401, INVALID);
    raw_request(gw.port, upgrade_request("/ws", &[])).assert_error(401, MISSING);
    let text = gw.metrics_text();
    let rejected: f64 = text
        .lines()
        .filter(|l| l.starts_with("ws_notify_connections_rejected_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    assert!(
        rejected >= 2.0,
        "rejected connections not counted; /metrics:\n{text}"
    );
}

// ---- /health and /metrics -----------------------------------------------------------

#[test]
fn health_body_shape() {
    let (_redis, gw) = setup(&[("REDIS_PING_INTERVAL", "200ms")]);
    gw.wait_redis_connected(PROMPT);
    let (_ws, _) = ws_open(gw.port, &gw.token("alice"));
    let body = get_json(&gw, "/health");
    assert_eq!(body["status"], "healthy", "{body}");
    assert_timestamp_any(&body["timestamp"]);
    assert_eq!(body["redis"]["status"], "connected", "{body}");
    assert_eq!(body["websocket"]["active_connections"], 1, "{body}");
    assert_eq!(body["websocket"]["total_unique_users"], 1, "{body}");
    assert!(body["uptime_seconds"].is_number(), "{body}");
    // The reader measures a ping round trip periodically.
    wait_until(PROMPT, "/health reports redis.ping_ms", || {
        gw.health().1["redis"]["ping_ms"].is_number()
    });
}

/// `GET path`, which must answer 200 with a JSON body; returns the body.
#[track_caller]
fn get_json(gw: &Gateway, path: &str) -> Value {
    let resp = http_get(gw.port, path, &[]);
    assert_eq!(resp.status, 200, "{path}: {resp:?}");
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{resp:?}"
    );
    resp.json()
}

/// /health's timestamp: RFC 3339 (the Go service used seconds or nanoseconds;
/// any RFC 3339 UTC time is accepted here).
fn assert_timestamp_any(v: &Value) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("timestamp not a string: {v}"));
    assert!(
        s.len() >= 20 && s.as_bytes()[10] == b'T',
        "timestamp {s:?} is not RFC 3339"
    );
    assert!(
        s.ends_with('Z') || s.ends_with("+00:00"),
        "timestamp {s:?} is not UTC"
    );
}

#[test]
fn metrics_prometheus_text_with_live_numbers() {
    let (redis, gw) = setup(&[]);
    gw.wait_redis_connected(PROMPT);
    let resp = http_get(gw.port, "/metrics", &[]);
    assert_eq!(resp.status, 200);
    let ct = resp.header("content-type").unwrap_or_default().to_string();
    assert!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "content-type {ct:?}"
    );
    // Ours are ws_notify_*; process_* are the Prometheus clients' standard names.
    let prefixed = |name: &str| name.starts_with("ws_notify_") || name.starts_with("process_");
    for line in resp.body.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let name = rest
                .strip_prefix("HELP ")
                .or_else(|| rest.strip_prefix("TYPE "));
            assert!(name.is_some_and(prefixed), "line {line:?}");
        } else {
            assert!(prefixed(line), "sample without the prefix: {line:?}");
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "bad sample value in {line:?}");
        }
    }

    let (mut a1, _) = ws_open(gw.port, &gw.token("alice"));
    let (_a2, _) = ws_open(gw.port, &gw.token("alice"));
    let (_b, _) = ws_open(gw.port, &gw.token("bob"));
    let text = gw.metrics_text();
    assert_eq!(
        metric_value(&text, "ws_notify_connections"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(metric_value(&text, "ws_notify_users"), Some(2.0), "{text}");
    assert_eq!(
        metric_value(&text, "ws_notify_redis_connected"),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric_value(&text, "ws_notify_uptime_seconds").is_some(),
        "{text}"
    );

    redis.notify("alice", r#"{"type":"m","payload":1}"#);
    recv_json(&mut a1, PROMPT);
    gw.wait_metric_at_least("ws_notify_messages_received_total", 1.0);
    gw.wait_metric_at_least("ws_notify_messages_delivered_total", 2.0);
    gw.wait_metric_at_least("ws_notify_connections_accepted_total", 3.0);
    a1.close(None).expect("close");
    let _ = close_or_gone(&mut a1, PROMPT);
    gw.wait_metric_at_least(
        r#"ws_notify_disconnects_total{reason="client_closed"}"#,
        1.0,
    );
    let text = gw.metrics_text();
    assert_eq!(
        metric_value(&text, "ws_notify_connections"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(metric_value(&text, "ws_notify_users"), Some(2.0), "{text}");
    // Every metric is declared once.
    let mut declared: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .collect();
    let count = declared.len();
    declared.sort_unstable();
    declared.dedup();
    assert_eq!(declared.len(), count, "a metric is declared twice:\n{text}");
    for name in ["ws_notify_resident_memory_bytes", "ws_notify_open_fds"] {
        assert!(
            metric_value(&text, name).is_some_and(|v| v > 0.0),
            "{name} in {text}"
        );
    }
}

#[test]
fn metrics_json_has_the_go_shape() {
    let (redis, gw) = setup(&[]);
    gw.wait_redis_connected(PROMPT);
    let (mut a, _) = ws_open(gw.port, &gw.token("alice"));
    let (_a2, _) = ws_open(gw.port, &gw.token("alice"));
    let (_b, _) = ws_open(gw.port, &gw.token("bob"));
    redis.notify("alice", r#"{"type":"m","payload":1}"#);
    recv_json(&mut a, PROMPT);

    let body = get_json(&gw, "/metrics?format=json");
    assert_eq!(body["service"], "websocket-service", "{body}");
    assert!(
        body["timestamp"].is_string() || body["timestamp"].is_number(),
        "{body}"
    );
    assert!(body["uptime_seconds"].is_number(), "{body}");
    assert_eq!(body["connections"]["active"], 3, "{body}");
    assert_eq!(body["connections"]["total_unique_users"], 2, "{body}");
    wait_until(PROMPT, "messages counted in /metrics?format=json", || {
        let m = metrics_json(gw.port);
        m["messages"]["received_from_redis"].as_u64() >= Some(1)
            && m["messages"]["sent_to_clients"].as_u64() >= Some(2)
    });
    assert!(
        metrics_json(gw.port)["messages"]["failed"].is_u64(),
        "{body}"
    );
}

#[test]
fn head_health_answers_like_get_without_a_body() {
    let (_redis, gw) = setup(&[]);
    let get = http_get(gw.port, "/health", &[]);
    assert_eq!(get.status, 200);
    let mut stream = TcpStream::connect(("127.0.0.1", gw.port)).expect("connect");
    stream
        .write_all(b"HEAD /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("write");
    stream.set_read_timeout(Some(PROMPT)).expect("timeout");
    let mut answer = Vec::new();
    // The server closes the connection after its answer (Connection: close).
    std::io::Read::read_to_end(&mut stream, &mut answer).expect("read to EOF");
    let answer = String::from_utf8(answer).expect("UTF-8");
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\n"),
        "a body after the head: {answer:?}"
    );
    let length: usize = answer
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length: {answer}"));
    assert!(length > 0, "the GET body's length is announced: {answer}");
}

#[test]
fn metrics_show_the_redis_round_trip_and_the_hand_over_depth() {
    let (_redis, gw) = setup(&[("REDIS_PING_INTERVAL", "200ms")]);
    wait_until(PROMPT, "a Redis ping round trip in /metrics", || {
        metric_value(&gw.metrics_text(), "ws_notify_redis_ping_seconds").is_some()
    });
    let text = gw.metrics_text();
    let ping = metric_value(&text, "ws_notify_redis_ping_seconds").unwrap();
    assert!(ping > 0.0 && ping < 5.0, "{ping}");
    assert!(
        text.contains("# TYPE ws_notify_redis_ping_seconds gauge"),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "ws_notify_handover_queue_depth"),
        Some(0.0),
        "{text}"
    );
    assert!(
        text.contains("# TYPE ws_notify_handover_queue_depth gauge"),
        "{text}"
    );
}

/// `WS_ADMIN_ADDR`: `/health` and `/metrics` move to a listener of their own,
/// which serves nothing else; the main port answers them 404 and serves
/// WebSocket clients as before.
#[test]
fn an_admin_address_takes_health_and_metrics_off_the_main_port() {
    let redis = RedisServer::start();
    let admin_port = free_port();
    let admin = format!("127.0.0.1:{admin_port}");
    let gw = Gateway::start(redis.port, &[("WS_ADMIN_ADDR", admin.as_str())]);
    wait_until(PROMPT, "healthy on the admin port", || {
        health(admin_port).0 == 200
    });
    assert!(metrics_text(admin_port).contains("\nws_notify_connections 0\n"));
    assert_eq!(metrics_json(admin_port)["service"], "websocket-service");
    let upgrade = upgrade_request(&format!("/ws?token={}", gw.token("ada")), &[]);
    for (what, request) in [
        ("an upgrade", upgrade),
        ("an unknown path", request_head("GET", "/nope", &[])),
    ] {
        let resp = raw_request(admin_port, &request);
        assert_eq!(resp.status, 404, "admin port, {what}: {resp:?}");
        resp.assert_error(404, "not found");
    }

    for path in ["/health", "/metrics", "/metrics?format=json"] {
        let resp = http_get(gw.port, path, &[]);
        assert_eq!(resp.status, 404, "main port, {path}: {resp:?}");
        resp.assert_error(404, "not found");
    }
    assert_serving(&redis, &gw, "ada");
    assert_eq!(
        metric(admin_port, "ws_notify_connections_accepted_total"),
        1.0
    );
}
