//! The HTTP side of the wire contract (DESIGN.md section 3): the upgrade, every
//! row of the error table, token sources and JWT rules, /health and /metrics.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Instant;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

const INVALID: &str = "invalid or expired token";

/// Upgrade with `?token=` on a hand-written request; returns the response.
fn upgrade_with_token(gw: &Gateway, token: &str) -> HttpResponse {
    raw_request(gw.port, upgrade_request(&format!("/ws?token={token}"), &[]))
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
fn token_from_authorization_bearer() {
    let (_redis, gw) = setup(&[]);
    let bearer = format!("Bearer {}", gw.token("alice"));
    let ws = ws_connect_with(gw.port, "/ws", &[("Authorization", &bearer)]).expect("connect");
    let (_ws, hello) = expect_connected(ws);
    assert_eq!(hello["user_id"], "alice");
}

#[test]
fn authorization_header_wins_over_query() {
    let (_redis, gw) = setup(&[]);
    let bearer = format!("Bearer {}", gw.token("alice"));
    let path = format!("/ws?token={}", gw.token("mallory"));
    let ws = ws_connect_with(gw.port, &path, &[("Authorization", &bearer)]).expect("connect");
    let (_ws, hello) = expect_connected(ws);
    assert_eq!(hello["user_id"], "alice");
}

#[test]
fn token_from_cookie() {
    let (_redis, gw) = setup(&[("JWT_COOKIE_NAME", "auth")]);
    let cookie = format!("theme=dark; auth={}; other=1", gw.token("alice"));
    let ws = ws_connect_with(gw.port, "/ws", &[("Cookie", &cookie)]).expect("connect");
    let (_ws, hello) = expect_connected(ws);
    assert_eq!(hello["user_id"], "alice");
    // The cookie comes before the query parameter.
    let path = format!("/ws?token={}", gw.token("mallory"));
    let ws = ws_connect_with(gw.port, &path, &[("Cookie", &cookie)]).expect("connect");
    assert_eq!(expect_connected(ws).1["user_id"], "alice");
}

#[test]
fn cookie_is_ignored_without_jwt_cookie_name() {
    let (_redis, gw) = setup(&[]);
    let cookie = format!("auth={}", gw.token("alice"));
    let (status, body) = refused(ws_connect_with(gw.port, "/ws", &[("Cookie", &cookie)]));
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON"),
        json!({"error": "missing token parameter"})
    );
}

#[test]
fn token_from_percent_encoded_query() {
    let (_redis, gw) = setup(&[]);
    let encoded = percent_encode_all(&gw.token("alice"));
    let ws =
        ws_connect_with(gw.port, &format!("/ws?x=1&token={encoded}&y=2"), &[]).expect("connect");
    assert_eq!(expect_connected(ws).1["user_id"], "alice");
}

// ---- the error table ----------------------------------------------------------

#[test]
fn no_token_is_401() {
    let (_redis, gw) = setup(&[]);
    raw_request(gw.port, upgrade_request("/ws", &[])).assert_error(401, "missing token parameter");
    raw_request(gw.port, upgrade_request("/ws?token=", &[]))
        .assert_error(401, "missing token parameter");
    // Same through tungstenite's client.
    let (status, body) = refused(ws_connect_with(gw.port, "/ws", &[]));
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON"),
        json!({"error": "missing token parameter"})
    );
}

#[test]
fn bad_signature_is_401() {
    let (_redis, gw) = setup(&[]);
    upgrade_with_token(&gw, &token("some-other-secret", "alice", 3600)).assert_error(401, INVALID);
    upgrade_with_token(&gw, "not.a.jwt").assert_error(401, INVALID);
    upgrade_with_token(&gw, "garbage").assert_error(401, INVALID);
}

#[test]
fn wrong_algorithm_is_401() {
    let (_redis, gw) = setup(&[]);
    upgrade_with_token(&gw, &unsigned_token(&claims("alice", 3600))).assert_error(401, INVALID);
}

#[test]
fn hs384_and_hs512_are_accepted() {
    let (_redis, gw) = setup(&[]);
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let t = token_alg(&gw.secret, alg, &claims("alice", 3600));
        let (_ws, hello) = ws_open(gw.port, &t);
        assert_eq!(hello["user_id"], "alice", "{alg:?}");
    }
}

#[test]
fn expired_token_is_401() {
    let (_redis, gw) = setup(&[]);
    upgrade_with_token(&gw, &token(&gw.secret, "alice", -3600)).assert_error(401, INVALID);
}

#[test]
fn expired_token_has_no_default_leeway() {
    // JWT_LEEWAY defaults to 0s (DESIGN.md section 4), not a library's 60 s.
    let (_redis, gw) = setup(&[]);
    upgrade_with_token(&gw, &token(&gw.secret, "alice", -10)).assert_error(401, INVALID);
}

#[test]
fn leeway_accepts_recently_expired_tokens() {
    let (_redis, gw) = setup(&[("JWT_LEEWAY", "1m")]);
    let (_ws, hello) = ws_open(gw.port, &token(&gw.secret, "alice", -10));
    assert_eq!(hello["user_id"], "alice");
    upgrade_with_token(&gw, &token(&gw.secret, "alice", -3600)).assert_error(401, INVALID);
}

#[test]
fn missing_exp_is_401() {
    let (_redis, gw) = setup(&[]);
    upgrade_with_token(
        &gw,
        &token_with_claims(&gw.secret, &json!({"sub": "alice"})),
    )
    .assert_error(401, INVALID);
}

#[test]
fn future_nbf_is_401() {
    let (_redis, gw) = setup(&[]);
    let mut c = claims("alice", 3600);
    c["nbf"] = json!(now_secs() + 600);
    upgrade_with_token(&gw, &token_with_claims(&gw.secret, &c)).assert_error(401, INVALID);
}

#[test]
fn empty_or_missing_or_non_string_user_claim_is_401() {
    let (_redis, gw) = setup(&[]);
    let exp = now_secs() + 3600;
    for c in [
        json!({"sub": "", "exp": exp}),
        json!({"sub": 42, "exp": exp}),
        json!({"sub": null, "exp": exp}),
        json!({"sub": ["alice"], "exp": exp}),
        json!({"exp": exp}),
    ] {
        let resp = upgrade_with_token(&gw, &token_with_claims(&gw.secret, &c));
        assert_eq!(resp.status, 401, "claims {c}: {resp:?}");
        resp.assert_error(401, INVALID);
    }
}

#[test]
fn issuer_and_audience_are_checked_when_set() {
    let (_redis, gw) = setup(&[
        ("JWT_ISSUER", "https://issuer.example"),
        ("JWT_AUDIENCE", "ws-notify"),
    ]);
    let good = || {
        let mut c = claims("alice", 3600);
        c["iss"] = json!("https://issuer.example");
        c["aud"] = json!("ws-notify");
        c
    };
    let (_ws, hello) = ws_open(gw.port, &token_with_claims(&gw.secret, &good()));
    assert_eq!(hello["user_id"], "alice");

    let mut wrong_iss = good();
    wrong_iss["iss"] = json!("https://evil.example");
    upgrade_with_token(&gw, &token_with_claims(&gw.secret, &wrong_iss)).assert_error(401, INVALID);

    let mut wrong_aud = good();
    wrong_aud["aud"] = json!("someone-else");
    upgrade_with_token(&gw, &token_with_claims(&gw.secret, &wrong_aud)).assert_error(401, INVALID);

    let mut no_iss = good();
    no_iss.as_object_mut().expect("object").remove("iss");
    upgrade_with_token(&gw, &token_with_claims(&gw.secret, &no_iss)).assert_error(401, INVALID);
}

#[test]
fn origin_not_allowed_is_403() {
    let (_redis, gw) = setup(&[("WS_ALLOWED_ORIGINS", "https://a.example,https://b.example")]);
    let path = format!("/ws?token={}", gw.token("alice"));
    raw_request(
        gw.port,
        upgrade_request(&path, &[("Origin", "https://evil.example")]),
    )
    .assert_error(403, "origin not allowed");
    raw_request(
        gw.port,
        upgrade_request(&path, &[("Origin", "https://a.example.evil")]),
    )
    .assert_error(403, "origin not allowed");
    let ws = ws_connect_with(gw.port, &path, &[("Origin", "https://b.example")])
        .expect("allowed origin");
    assert_eq!(expect_connected(ws).1["user_id"], "alice");
}

#[test]
fn any_origin_when_not_configured() {
    let (_redis, gw) = setup(&[]);
    let path = format!("/ws?token={}", gw.token("alice"));
    let ws = ws_connect_with(gw.port, &path, &[("Origin", "https://whatever.example")])
        .expect("connect");
    expect_connected(ws);
}

#[test]
fn connection_limit_is_503_before_upgrade() {
    let (_redis, gw) = setup(&[("WS_MAX_CONNECTIONS", "2")]);
    let (_a, _) = ws_open(gw.port, &gw.token("alice"));
    let (mut b, _) = ws_open(gw.port, &gw.token("bob"));
    upgrade_with_token(&gw, &gw.token("carol")).assert_error(503, "connection limit reached");
    gw.wait_metric_at_least(
        "ws_notify_connections_rejected_total{reason=\"connection_limit\"}",
        1.0,
    );
    // After one leaves, a new one fits again.
    b.close(None).expect("close");
    let _ = close_or_gone(&mut b, PROMPT);
    wait_until(PROMPT, "an upgrade succeeds again", || {
        upgrade_with_token(&gw, &gw.token("carol")).status == 101
    });
}

#[test]
fn per_user_limit_is_429() {
    let (_redis, gw) = setup(&[("WS_MAX_CONNECTIONS_PER_USER", "1")]);
    let (mut a, _) = ws_open(gw.port, &gw.token("alice"));
    upgrade_with_token(&gw, &gw.token("alice"))
        .assert_error(429, "too many connections for this user");
    // Another user is not affected.
    let (_b, _) = ws_open(gw.port, &gw.token("bob"));
    a.close(None).expect("close");
    let _ = close_or_gone(&mut a, PROMPT);
    wait_until(PROMPT, "alice may connect again", || {
        upgrade_with_token(&gw, &gw.token("alice")).status == 101
    });
}

#[test]
fn missing_websocket_key_is_400() {
    let (_redis, gw) = setup(&[]);
    let path = format!("/ws?token={}", gw.token("alice"));
    let head = request_head(
        "GET",
        &path,
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
        ],
    );
    let resp = raw_request(gw.port, head);
    assert_eq!(resp.status, 400, "{resp:?}");
    assert!(
        resp.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{resp:?}"
    );

    // A key that is not 16 base64 bytes is as bad as none.
    let head = request_head(
        "GET",
        &path,
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "short"),
            ("Sec-WebSocket-Version", "13"),
        ],
    );
    let resp = raw_request(gw.port, head);
    assert_eq!(resp.status, 400, "{resp:?}");
    assert!(resp.json()["error"].is_string(), "{resp:?}");
}

#[test]
fn not_an_upgrade_is_4xx() {
    let (_redis, gw) = setup(&[]);
    let resp = http_get(gw.port, &format!("/ws?token={}", gw.token("alice")), &[]);
    assert!([400, 426].contains(&resp.status), "{resp:?}");
    assert!(resp.json()["error"].is_string(), "{resp:?}");
}

#[test]
fn websocket_version_12_is_refused() {
    let (_redis, gw) = setup(&[]);
    let path = format!("/ws?token={}", gw.token("alice"));
    let head = request_head(
        "GET",
        &path,
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", SAMPLE_KEY),
            ("Sec-WebSocket-Version", "12"),
        ],
    );
    let resp = raw_request(gw.port, head);
    assert!([400, 426].contains(&resp.status), "{resp:?}");
    assert!(
        resp.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{resp:?}"
    );
    if resp.status == 426 {
        // RFC 6455 section 4.4: tell the client which version we speak.
        assert_eq!(resp.header("sec-websocket-version"), Some("13"), "{resp:?}");
    }
}

#[test]
fn post_to_ws_is_405() {
    let (_redis, gw) = setup(&[]);
    let path = format!("/ws?token={}", gw.token("alice"));
    let head = request_head(
        "POST",
        &path,
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", SAMPLE_KEY),
            ("Sec-WebSocket-Version", "13"),
            ("Content-Length", "0"),
        ],
    );
    let resp = raw_request(gw.port, head);
    assert_eq!(resp.status, 405, "{resp:?}");
    assert!(
        resp.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{resp:?}"
    );
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
fn unknown_path_is_404() {
    let (_redis, gw) = setup(&[]);
    http_get(gw.port, "/nope", &[]).assert_error(404, "not found");
    http_get(gw.port, "/wsx", &[]).assert_error(404, "not found");
    raw_request(
        gw.port,
        upgrade_request(&format!("/other?token={}", gw.token("a")), &[]),
    )
    .assert_error(404, "not found");
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
    raw_request(gw.port, upgrade_request("/ws", &[])).assert_error(401, "missing token parameter");
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
    let resp = http_get(gw.port, "/health", &[]);
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{resp:?}"
    );
    let body = resp.json();
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
    for line in resp.body.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(
                rest.starts_with("HELP ws_notify_") || rest.starts_with("TYPE ws_notify_"),
                "line {line:?}"
            );
        } else {
            assert!(
                line.starts_with("ws_notify_"),
                "sample without the prefix: {line:?}"
            );
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

    let resp = http_get(gw.port, "/metrics?format=json", &[]);
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{resp:?}"
    );
    let body = resp.json();
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
