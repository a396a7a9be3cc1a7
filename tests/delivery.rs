//! Redis -> gateway -> WebSocket delivery (README: "Messages from the server"
//! and "Publishing").

mod common;

use common::*;
use serde_json::{Value, json};

#[test]
fn connected_message_on_open() {
    let (_redis, gw) = setup(&[]);
    let mut ws = ws_connect(gw.port, &gw.token("alice")).expect("connect");
    let msg = recv_json(&mut ws, PROMPT);
    assert_message(&msg, "connected");
    assert_eq!(msg["payload"]["user_id"], "alice", "{msg}");
    let id = msg["payload"]["connection_id"]
        .as_str()
        .unwrap_or_else(|| panic!("connection_id: {msg}"));
    assert!(!id.is_empty(), "empty connection_id");

    // Each connection has its own id.
    let (_ws2, hello2) = ws_open(gw.port, &gw.token("alice"));
    assert_ne!(
        hello2["connection_id"], msg["payload"]["connection_id"],
        "connection ids are unique"
    );
}

#[test]
fn delivers_to_one_connection() {
    let (redis, gw) = setup(&[]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    assert!(
        redis.notify("alice", r#"{"type":"hello","payload":{"n":1}}"#) >= 1,
        "gateway not subscribed"
    );
    let msg = recv_json(&mut ws, PROMPT);
    assert_message(&msg, "hello");
    assert_eq!(msg["payload"], json!({"n": 1}));
}

#[test]
fn delivers_to_every_connection_of_a_user_and_not_to_others() {
    let (redis, gw) = setup(&[]);
    let mut alice: Vec<Ws> = (0..3)
        .map(|_| ws_open(gw.port, &gw.token("alice")).0)
        .collect();
    let (mut bob, _) = ws_open(gw.port, &gw.token("bob"));
    gw.wait_active_connections(4);
    assert_eq!(gw.unique_users(), 2);

    redis.notify("alice", r#"{"type":"for_alice","payload":1}"#);
    for ws in alice.iter_mut() {
        let msg = recv_json(ws, PROMPT);
        assert_message(&msg, "for_alice");
        assert_eq!(msg["payload"], 1);
    }
    // Bob's first message is the one meant for him: he got nothing before it.
    redis.notify("bob", r#"{"type":"for_bob","payload":2}"#);
    let msg = recv_json(&mut bob, PROMPT);
    assert_message(&msg, "for_bob");
    // And Alice's connections did not get Bob's message: their next one is theirs.
    redis.notify("alice", r#"{"type":"again","payload":3}"#);
    for ws in alice.iter_mut() {
        assert_eq!(recv_json(ws, PROMPT)["type"], "again");
    }
}

#[test]
fn messages_arrive_in_publish_order_one_per_frame() {
    let (redis, gw) = setup(&[]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    for i in 0..50 {
        redis.notify("alice", format!(r#"{{"type":"seq","payload":{i}}}"#));
    }
    for i in 0..50 {
        // recv_json fails if a frame held several messages (not one JSON value).
        let msg = recv_json(&mut ws, PROMPT);
        assert_eq!(msg["payload"], i, "message {i}: {msg}");
    }
}

#[test]
fn unusual_user_ids_get_their_messages() {
    let (redis, gw) = setup(&[]);
    let (mut alice, _) = ws_open(gw.port, &gw.token("alice"));
    // Colons (the prefix ends with one) and characters outside ASCII.
    for user in ["org:42:alice", "jos\u{e9}-\u{1f600}"] {
        let (mut ws, hello) = ws_open(gw.port, &gw.token(user));
        assert_eq!(hello["user_id"], user);
        assert!(redis.notify(user, r#"{"type":"odd_id","payload":"\u00e9"}"#) >= 1);
        let msg = recv_json(&mut ws, PROMPT);
        assert_message(&msg, "odd_id");
        assert_eq!(msg["payload"], "\u{e9}", "{user}");
    }
    // "alice" (the last segment of "org:42:alice") is a different user: the
    // first message she gets is her own.
    redis.notify("alice", r#"{"type":"plain","payload":null}"#);
    assert_eq!(recv_json(&mut alice, PROMPT)["type"], "plain");
}

#[test]
fn large_payload_is_delivered_intact() {
    let (redis, gw) = setup(&[("LOGGER_LEVEL", "info")]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    let big = "y".repeat(1 << 20);
    redis.notify(
        "alice",
        format!(r#"{{"type":"big","payload":{{"data":"{big}"}}}}"#),
    );
    let msg = recv_json(&mut ws, PROMPT);
    assert_message(&msg, "big");
    assert_eq!(msg["payload"]["data"].as_str().map(str::len), Some(1 << 20));
    // And the connection goes on normally afterwards.
    redis.notify("alice", r#"{"type":"small","payload":1}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "small");
}

#[test]
fn payload_bytes_are_passed_through() {
    let (redis, gw) = setup(&[]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));

    redis.notify("alice", r#"{"type":"t","payload":{"b":1.50,"a":[1,2]}}"#);
    let text = recv_text(&mut ws, PROMPT);
    assert!(
        text.contains(r#""payload":{"b":1.50,"a":[1,2]}"#),
        "payload not passed through byte for byte: {text}"
    );
    assert!(
        text.starts_with(r#"{"type":"t","#),
        "message should start with the type: {text}"
    );
    let msg: Value = serde_json::from_str(&text).expect("JSON");
    assert_message(&msg, "t");

    // Whitespace and number spelling inside the payload survive too.
    redis.notify(
        "alice",
        r#"{ "payload" : [1, 2.50, "x\u00e9", 1e3] , "type" : "spaced" }"#,
    );
    let text = recv_text(&mut ws, PROMPT);
    assert!(
        text.contains(r#"[1, 2.50, "x\u00e9", 1e3]"#),
        "payload not passed through: {text}"
    );
    assert_message(&serde_json::from_str(&text).expect("JSON"), "spaced");
}

#[test]
fn type_is_escaped_correctly() {
    let (redis, gw) = setup(&[]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    redis.notify(
        "alice",
        r#"{"type":"quote\"back\\slash\u00e9\n","payload":true}"#,
    );
    let msg = recv_json(&mut ws, PROMPT);
    assert_message(&msg, "quote\"back\\slash\u{e9}\n");
    assert_eq!(msg["payload"], true);
}

#[test]
fn missing_payload_becomes_null() {
    let (redis, gw) = setup(&[]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    redis.notify("alice", r#"{"type":"bare"}"#);
    let text = recv_text(&mut ws, PROMPT);
    assert!(text.contains(r#""payload":null"#), "{text}");
    let msg: Value = serde_json::from_str(&text).expect("JSON");
    assert_message(&msg, "bare");
    assert_eq!(msg["payload"], Value::Null);
}

#[test]
fn invalid_payloads_are_dropped_and_counted() {
    let (redis, gw) = setup(&[]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    let invalid = [
        "not json",
        r#"[1,2]"#,
        r#""just a string""#,
        r#"{"payload":1}"#,
        r#"{"type":5,"payload":1}"#,
        r#"{"type":null}"#,
        r#"{"type":"x","payload":1"#,
        "",
    ];
    for payload in invalid {
        redis.notify("alice", payload);
    }
    redis.notify("alice", r#"{"type":"valid","payload":"after"}"#);
    // The next message the client sees is the valid one.
    let msg = recv_json(&mut ws, PROMPT);
    assert_message(&msg, "valid");
    assert_eq!(msg["payload"], "after");
    gw.wait_metric_at_least(
        r#"ws_notify_messages_dropped_total{reason="invalid"}"#,
        invalid.len() as f64,
    );
    // Invalid messages are logged with the channel (rate-limited, so at least once).
    wait_until(
        PROMPT,
        "a log line about the invalid message on user_noti:alice",
        || {
            gw.logs()
                .lines()
                .any(|l| l.contains("user_noti:alice") && l.to_lowercase().contains("invalid"))
        },
    );
}

#[test]
fn messages_for_offline_users_are_counted() {
    let (redis, gw) = setup(&[]);
    let before = gw.metric(r#"ws_notify_messages_dropped_total{reason="offline_user"}"#);
    redis.notify("nobody", r#"{"type":"x","payload":1}"#);
    redis.notify("nobody", r#"{"type":"x","payload":2}"#);
    gw.wait_metric_at_least(
        r#"ws_notify_messages_dropped_total{reason="offline_user"}"#,
        before + 2.0,
    );
    gw.wait_metric_at_least("ws_notify_messages_received_total", 2.0);
}

#[test]
fn user_entry_disappears_with_its_last_connection() {
    let (redis, gw) = setup(&[]);
    let (mut a1, _) = ws_open(gw.port, &gw.token("alice"));
    let (mut a2, _) = ws_open(gw.port, &gw.token("alice"));
    gw.wait_active_connections(2);
    assert_eq!(gw.unique_users(), 1);
    close_ws(&mut a1);
    gw.wait_active_connections(1);
    assert_eq!(gw.unique_users(), 1);
    // The remaining connection still gets messages.
    redis.notify("alice", r#"{"type":"still","payload":1}"#);
    assert_eq!(recv_json(&mut a2, PROMPT)["type"], "still");
    close_ws(&mut a2);
    gw.wait_empty();
}

#[test]
fn custom_channel_prefix() {
    let (redis, gw) = setup(&[("REDIS_CHANNEL_PREFIX", "app:notify:")]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    // The default prefix is not subscribed any more.
    assert_eq!(redis.notify("alice", r#"{"type":"old","payload":1}"#), 0);
    assert!(redis.publish("app:notify:alice", r#"{"type":"new","payload":2}"#) >= 1);
    let msg = recv_json(&mut ws, PROMPT);
    assert_message(&msg, "new");
}

#[test]
fn custom_user_claim() {
    let (redis, gw) = setup(&[("JWT_USER_CLAIM", "uid")]);
    let mut c = claims("ignored-sub", 3600);
    c["uid"] = json!("carol");
    let (mut ws, hello) = ws_open(gw.port, &token_with_claims(&gw.secret, &c));
    assert_eq!(hello["user_id"], "carol");
    redis.notify("carol", r#"{"type":"c","payload":1}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "c");
}

#[test]
fn two_instances_one_redis() {
    let redis = RedisServer::start();
    let a = Gateway::start(redis.port, &[]);
    // The second instance accepts the first one's tokens only with the same secret.
    let secret = a.secret.clone();
    let b = Gateway::start(redis.port, &[("JWT_SECRET_KEY", &secret)]);
    a.wait_redis_connected(PROMPT);
    b.wait_redis_connected(PROMPT);
    let t = token(&secret, "alice", 3600);
    let (mut on_a, _) = ws_open(a.port, &t);
    let (mut on_b, _) = ws_open(b.port, &t);
    assert!(
        redis.notify("alice", r#"{"type":"both","payload":1}"#) >= 2,
        "both instances subscribed"
    );
    assert_message(&recv_json(&mut on_a, PROMPT), "both");
    assert_message(&recv_json(&mut on_b, PROMPT), "both");
    // A message for a user connected to one instance only reaches that one.
    let (mut bob_b, _) = ws_open(b.port, &token(&secret, "bob", 3600));
    redis.notify("bob", r#"{"type":"bob","payload":1}"#);
    assert_eq!(recv_json(&mut bob_b, PROMPT)["type"], "bob");
    a.wait_metric_at_least(
        r#"ws_notify_messages_dropped_total{reason="offline_user"}"#,
        1.0,
    );
}

#[test]
fn invalid_message_warnings_are_rate_limited() {
    let (redis, gw) = setup(&[("LOGGER_LEVEL", "info")]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    let (_spammer, _) = ws_open(gw.port, &gw.token("spammer"));
    for i in 0..300 {
        redis.publish("user_noti:spammer", format!("not json {i}"));
    }
    redis.notify("alice", r#"{"type":"done","payload":1}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "done");
    gw.wait_metric_at_least(
        r#"ws_notify_messages_dropped_total{reason="invalid"}"#,
        300.0,
    );
    let logs = gw.logs();
    let lines = logs.lines().filter(|l| l.contains("spammer")).count();
    assert!(lines >= 1, "invalid messages are not logged at all");
    assert!(
        lines <= 20,
        "{lines} log lines for 300 invalid messages: not rate-limited"
    );
}

#[test]
fn invalid_messages_for_offline_users_are_counted_invalid() {
    // README, "Publishing": anything that is not a JSON object with a string
    // `type` is dropped, counted as invalid and logged with the channel,
    // whether or not the user has a connection here.
    let (redis, gw) = setup(&[("LOGGER_LEVEL", "info")]);
    redis.publish("user_noti:nobody-here", "not json");
    gw.wait_metric_at_least(r#"ws_notify_messages_dropped_total{reason="invalid"}"#, 1.0);
    wait_until(
        PROMPT,
        "a log line naming the channel user_noti:nobody-here",
        || gw.logs().contains("user_noti:nobody-here"),
    );
}

#[test]
fn fan_out_to_many_users_and_connections() {
    let (redis, gw) = setup(&[("LOGGER_LEVEL", "info")]);
    let users: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let mut conns: Vec<(usize, Ws)> = Vec::new();
    for (u, user) in users.iter().enumerate() {
        for _ in 0..3 {
            conns.push((u, ws_open(gw.port, &gw.token(user)).0));
        }
    }
    gw.wait_active_connections(conns.len() as u64);
    assert_eq!(gw.unique_users(), users.len() as u64);
    for round in 0..5 {
        for user in &users {
            redis.notify(
                user,
                format!(r#"{{"type":"fan","payload":{{"user":"{user}","round":{round}}}}}"#),
            );
        }
    }
    for (u, ws) in conns.iter_mut() {
        for round in 0..5 {
            let msg = recv_json(ws, PROMPT);
            assert_eq!(msg["payload"]["user"], users[*u].as_str(), "{msg}");
            assert_eq!(msg["payload"]["round"], round, "{msg}");
        }
    }
    gw.wait_metric_at_least(
        "ws_notify_messages_delivered_total",
        (conns.len() * 5) as f64,
    );
}
