//! Token refresh in place against the real binary (README: "Refreshing the
//! token"): `{"type":"refresh","token":..}` moves a connection's expiry or is
//! refused keeping it, refresh messages up to 8 KiB pass a smaller
//! `WS_MAX_MESSAGE_SIZE`, `token_expiring` comes `WS_TOKEN_EXPIRY_NOTICE` before
//! `exp`, and a flood of refreshes is bounded.
//!
//! No absolute timings: a refreshed connection is compared with a twin that
//! holds the same short token and does not refresh.

mod common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const INVALID: &str = "invalid or expired token";

/// `{"type":"refresh","token":<token>}`
fn refresh_message(token: &str) -> String {
    json!({"type": "refresh", "token": token}).to_string()
}

/// Sends a refresh and reads the answer (the next text message).
#[track_caller]
fn refresh(ws: &mut Ws, token: &str) -> Value {
    send_text(ws, &refresh_message(token));
    recv_json(ws, PROMPT)
}

/// Asserts a `refresh_failed` answer with `error`.
#[track_caller]
fn assert_failed(answer: &Value, error: &str) {
    assert_message(answer, "refresh_failed");
    assert_eq!(answer["payload"], json!({ "error": error }), "{answer}");
}

/// Asserts `answer` is of type `ty` and names `exp` (unix seconds) as `expires_at`.
#[track_caller]
fn assert_expires_at(answer: &Value, ty: &str, exp: i64) {
    assert_message(answer, ty);
    let at = answer["payload"]["expires_at"]
        .as_str()
        .and_then(parse_rfc3339_millis);
    assert_eq!(at, Some(exp * 1000), "{answer}");
}

/// The connection still answers: `{"type":"ping"}` gets its pong.
#[track_caller]
fn assert_open(ws: &mut Ws) {
    send_text(ws, r#"{"type":"ping"}"#);
    assert_message(&recv_json(ws, PROMPT), "pong");
}

#[test]
fn a_refresh_moves_the_expiry_past_the_first_tokens_exp() {
    let (_redis, gw) = setup(&[("WS_TOKEN_EXPIRY_NOTICE", "0")]);
    let short = token(&gw.secret, "alice", 4);
    let (mut refreshed, _) = ws_open(gw.port, &short);
    let (mut twin, _) = ws_open(gw.port, &short);

    let exp = now_secs() + 3600;
    let long = token_with_claims(&gw.secret, &json!({"sub": "alice", "exp": exp}));
    let answer = refresh(&mut refreshed, &long);
    assert_expires_at(&answer, "refreshed", exp);

    // The twin, same token without a refresh, is closed at the old expiry...
    let (code, reason) = expect_close(&mut twin, secs(30));
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    // ...and the refreshed connection, past that expiry, still serves.
    assert_open(&mut refreshed);
    assert_eq!(gw.active_connections(), 1);
    assert_eq!(
        gw.metric(r#"ws_notify_token_refreshes_total{result="refreshed"}"#),
        1.0
    );
    assert!(!gw.logs().contains(&long), "a token was logged");
}

#[test]
fn refused_refreshes_keep_the_old_expiry() {
    let (_redis, gw) = setup(&[("WS_TOKEN_EXPIRY_NOTICE", "0")]);
    let (mut ws, _) = ws_open(gw.port, &token(&gw.secret, "alice", 5));
    let bad_signature = token("not-the-secret", "alice", 3600);
    let refused = [
        ("bad signature", bad_signature.clone()),
        ("expired", token(&gw.secret, "alice", -10)),
        ("another user", token(&gw.secret, "mallory", 3600)),
        ("alg none", unsigned_token(&claims("alice", 3600))),
        ("not a token", "x".to_owned()),
    ];
    for (what, token) in &refused {
        let answer = refresh(&mut ws, token);
        assert_failed(&answer, INVALID);
        assert!(answer["timestamp"].is_string(), "{what}: {answer}");
    }
    // A refresh without a string token is answered the same way.
    send_text(&mut ws, r#"{"type":"refresh","token":7}"#);
    assert_failed(&recv_json(&mut ws, PROMPT), INVALID);

    // The first token's expiry still holds.
    let (code, reason) = expect_close(&mut ws, secs(30));
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    assert_eq!(
        gw.metric(r#"ws_notify_token_refreshes_total{result="invalid"}"#),
        5.0
    );
    assert_eq!(
        gw.metric(r#"ws_notify_token_refreshes_total{result="other_user"}"#),
        1.0
    );
    let logs = gw.logs();
    for (what, token) in refused.iter().filter(|(_, token)| token.len() > 16) {
        assert!(
            !logs.contains(token.as_str()),
            "{what}: the token was logged"
        );
    }
}

/// A token for `user` whose refresh message is exactly `len` bytes: a padding
/// claim brings the token near the size, JSON whitespace makes it exact.
fn refresh_message_of_len(secret: &str, user: &str, len: usize) -> String {
    let mut pad = String::new();
    loop {
        let token = token_with_claims(
            secret,
            &json!({"sub": user, "exp": now_secs() + 3600, "pad": pad}),
        );
        let message = refresh_message(&token);
        if message.len() + 64 > len {
            let mut message = message;
            message.pop(); // the closing brace
            while message.len() + 1 < len {
                message.push(' ');
            }
            message.push('}');
            assert_eq!(message.len(), len);
            return message;
        }
        pad.push_str(&"p".repeat(64));
    }
}

#[test]
fn a_refresh_may_take_8_kib_whatever_the_message_limit_says() {
    let (_redis, gw) = setup(&[
        ("WS_MAX_MESSAGE_SIZE", "512"),
        ("WS_TOKEN_EXPIRY_NOTICE", "0"),
    ]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    send_text(&mut ws, &refresh_message_of_len(&gw.secret, "alice", 8192));
    assert_message(&recv_json(&mut ws, PROMPT), "refreshed");
    // Every other message is still held to WS_MAX_MESSAGE_SIZE.
    let ordinary = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(576));
    assert_eq!(ordinary.len(), 600);
    send_text(&mut ws, &ordinary);
    assert_eq!(expect_close(&mut ws, PROMPT).0, 1009);

    // A refresh one byte over 8 KiB closes with 1009 as well.
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    send_text(&mut ws, &refresh_message_of_len(&gw.secret, "alice", 8193));
    assert_eq!(expect_close(&mut ws, PROMPT).0, 1009);
    gw.wait_active_connections(0);
}

#[test]
fn an_rs256_token_refreshes_under_the_default_message_limit() {
    let fixture = |name: &str| {
        format!(
            "{}/tests/fixtures/test-only-rsa-{name}.pem",
            env!("CARGO_MANIFEST_DIR")
        )
    };
    let redis = RedisServer::start();
    let gw = Gateway::start(
        redis.port,
        &[
            ("JWT_SECRET_KEY", UNSET),
            ("JWT_PUBLIC_KEY_FILE", &fixture("public")),
            ("WS_TOKEN_EXPIRY_NOTICE", "0"),
        ],
    );
    let pem = std::fs::read(fixture("private")).expect("fixture key");
    let key = EncodingKey::from_rsa_pem(&pem).expect("RSA key");
    let sign = |claims: &Value| {
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &key).expect("sign")
    };
    let (mut ws, _) = ws_open(gw.port, &sign(&claims("rosa", 600)));
    // Claims as an identity provider issues them: the token is about 1 KiB.
    let exp = now_secs() + 3600;
    let token = sign(&json!({
        "sub": "rosa", "exp": exp, "iat": now_secs(), "iss": "https://id.example.com/",
        "aud": ["notify", "api"], "email": "rosa@example.com", "name": "Rosa Example",
        "roles": ["reader", "writer", "admin"], "sid": "f3a9c2e7-5b1d-4e8a-9c3f-2d7b6a1e0f94",
    }));
    let message = refresh_message(&token);
    assert!(message.len() > 512, "{} bytes", message.len());
    send_text(&mut ws, &message);
    assert_expires_at(&recv_json(&mut ws, PROMPT), "refreshed", exp);
    assert_open(&mut ws);
}

#[test]
fn token_expiring_comes_once_between_connected_and_the_4001_close() {
    let (_redis, gw) = setup(&[("WS_TOKEN_EXPIRY_NOTICE", "2s")]);
    let exp = now_secs() + 3;
    let short = token_with_claims(&gw.secret, &json!({"sub": "alice", "exp": exp}));
    let (mut ws, _) = ws_open(gw.port, &short);
    assert_expires_at(&recv_json(&mut ws, secs(30)), "token_expiring", exp);
    // Nothing else until the close: the notice is not repeated.
    let (code, reason) = expect_close_with_no_message_before(&mut ws, secs(30));
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
}

#[test]
fn a_refresh_rearms_the_notice_for_the_new_expiry() {
    let (_redis, gw) = setup(&[("WS_TOKEN_EXPIRY_NOTICE", "2s")]);
    let first_exp = now_secs() + 3;
    let first = token_with_claims(&gw.secret, &json!({"sub": "alice", "exp": first_exp}));
    let (mut ws, _) = ws_open(gw.port, &first);
    let notice = recv_json(&mut ws, secs(30));
    assert_expires_at(&notice, "token_expiring", first_exp);

    // Refreshed on the notice, as a client does, with a token 5 s later.
    let next_exp = first_exp + 5;
    let next = token_with_claims(&gw.secret, &json!({"sub": "alice", "exp": next_exp}));
    assert_expires_at(&refresh(&mut ws, &next), "refreshed", next_exp);
    // A new notice for the new token, then (no refresh this time) the close.
    assert_expires_at(&recv_json(&mut ws, secs(30)), "token_expiring", next_exp);
    let (code, _) = expect_close_with_no_message_before(&mut ws, secs(30));
    assert_eq!(code, 4001);
}

#[test]
fn a_refresh_to_a_token_inside_the_notice_window_gets_no_notice() {
    let (_redis, gw) = setup(&[("WS_TOKEN_EXPIRY_NOTICE", "10s")]);
    let first = token(&gw.secret, "alice", 60);
    let (mut ws, _) = ws_open(gw.port, &first);
    // A token that has less than the notice left: `refreshed` says when it
    // expires, and no `token_expiring` follows it (a client that refreshes on
    // every notice would otherwise loop), only the close at its exp.
    let short_exp = now_secs() + 3;
    let short = token_with_claims(&gw.secret, &json!({"sub": "alice", "exp": short_exp}));
    assert_expires_at(&refresh(&mut ws, &short), "refreshed", short_exp);
    let (code, reason) = expect_close_with_no_message_before(&mut ws, secs(30));
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
}

/// Reads until the server's close frame, failing on any text or binary
/// message before it.
#[track_caller]
fn expect_close_with_no_message_before(ws: &mut Ws, timeout: std::time::Duration) -> (u16, String) {
    use tungstenite::Message;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match recv_message(ws, left) {
            None => panic!("no close within {timeout:?}"),
            Some(Message::Ping(_) | Message::Pong(_)) => {}
            Some(Message::Close(frame)) => {
                // Sends our close reply; the server may already be gone.
                let _ = ws.flush();
                let frame = frame.expect("a close code");
                return (u16::from(frame.code), frame.reason.as_str().to_owned());
            }
            Some(other) => panic!("expected the close, got {other:?}"),
        }
    }
}

#[test]
fn a_refresh_flood_gets_at_most_ten_checks_a_minute() {
    let (_redis, gw) = setup(&[("WS_TOKEN_EXPIRY_NOTICE", "0")]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    let valid = gw.token("alice");
    const SENT: usize = 40;
    for _ in 0..SENT {
        send_text(&mut ws, &refresh_message(&valid));
    }
    let answers: Vec<Value> = (0..SENT).map(|_| recv_json(&mut ws, PROMPT)).collect();
    let refreshed = answers.iter().filter(|a| a["type"] == "refreshed").count();
    let too_many = answers
        .iter()
        .filter(|a| a["type"] == "refresh_failed" && a["payload"]["error"] == "too many refreshes")
        .count();
    assert_eq!((refreshed, too_many), (10, SENT - 10), "{answers:?}");
    assert_eq!(
        gw.metric(r#"ws_notify_token_refreshes_total{result="rate_limited"}"#),
        (SENT - 10) as f64
    );
    // The connection is unharmed.
    assert_open(&mut ws);
}

#[test]
fn a_bad_notice_value_stops_the_start_naming_it() {
    for value in ["soon", "60", "-1s"] {
        let (code, output) = Gateway::run_expect_exit(&[("WS_TOKEN_EXPIRY_NOTICE", value)]);
        assert_eq!(code, Some(2), "{value}: {output}");
        assert!(
            output.contains("WS_TOKEN_EXPIRY_NOTICE"),
            "{value}: {output}"
        );
    }
}
