//! Per-user subscription modes (README, "Subscription modes"):
//! `REDIS_SUBSCRIBE_MODE=channel` against the default `pattern`, on one real
//! `redis-server`. `connected` means the user's channel is subscribed, the last
//! connection's channel is unsubscribed after the linger, and a Redis restart
//! resubscribes everything still needed.

mod common;

use std::time::{Duration, Instant};

use common::*;

const CHANNEL_MODE: (&str, &str) = ("REDIS_SUBSCRIBE_MODE", "channel");
const PATTERN_MODE: (&str, &str) = ("REDIS_SUBSCRIBE_MODE", "pattern");
const RECEIVED: &str = "ws_notify_messages_received_total";

/// Subscribers of `channel` that Redis counts (`PUBSUB NUMSUB`).
fn numsub(redis: &RedisServer, channel: &str) -> i64 {
    let mut con = redis.connection().expect("connect to redis");
    let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query(&mut con)
        .expect("PUBSUB NUMSUB");
    counts.first().map_or(0, |(_, n)| *n)
}

#[test]
fn each_instance_reads_its_own_users_in_channel_mode_and_every_user_in_pattern_mode() {
    let redis = RedisServer::start();
    let start = |mode| {
        let gw = Gateway::start(redis.port, &[mode, ("LOGGER_LEVEL", "info")]);
        gw.wait_redis_connected(PROMPT);
        gw
    };
    // Users a* on the first instance of each mode, b* on the second.
    let (channel_a, channel_b) = (start(CHANNEL_MODE), start(CHANNEL_MODE));
    let (pattern_a, pattern_b) = (start(PATTERN_MODE), start(PATTERN_MODE));
    let a_users: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
    let b_users: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    let mut clients = Vec::new();
    for (users, instances) in [
        (&a_users, [&channel_a, &pattern_a]),
        (&b_users, [&channel_b, &pattern_b]),
    ] {
        for user in users {
            for gw in instances {
                clients.push((user.clone(), ws_open(gw.port, &gw.token(user)).0));
            }
        }
    }
    let before: Vec<f64> = [&channel_a, &channel_b, &pattern_a, &pattern_b]
        .iter()
        .map(|gw| gw.metric(RECEIVED))
        .collect();
    // One message per user, then a marker per half: Redis writes to each
    // subscriber in publish order, so once an instance's clients have their
    // marker, every message it could have read is counted.
    for user in a_users.iter().chain(&b_users) {
        redis.notify(user, r#"{"type":"n","payload":1}"#);
    }
    for user in ["a0", "b0"] {
        redis.notify(user, r#"{"type":"marker","payload":2}"#);
    }
    for (user, ws) in clients.iter_mut() {
        assert_eq!(recv_json(ws, PROMPT)["type"], "n", "{user}");
        if user == "a0" || user == "b0" {
            assert_eq!(recv_json(ws, PROMPT)["type"], "marker", "{user}");
        }
    }
    // The pattern instances read all 22 (waited for: their other users' messages
    // carry no marker of their own).
    for (gw, before) in [&pattern_a, &pattern_b].into_iter().zip(&before[2..]) {
        gw.wait_metric_at_least(RECEIVED, before + 22.0);
    }
    let grown: Vec<f64> = [&channel_a, &channel_b, &pattern_a, &pattern_b]
        .iter()
        .zip(&before)
        .map(|(gw, before)| gw.metric(RECEIVED) - before)
        .collect();
    assert_eq!(
        grown,
        vec![11.0, 11.0, 22.0, 22.0],
        "messages read from Redis: channel a, channel b, pattern a, pattern b"
    );
}

#[test]
fn a_message_published_right_after_connected_is_always_delivered() {
    const REPETITIONS: usize = 1000;
    let (redis, gw) = setup(&[CHANNEL_MODE, ("LOGGER_LEVEL", "warn")]);
    let started = Instant::now();
    for i in 0..REPETITIONS {
        // A new user each time: each `connected` waits for a new subscription.
        let user = format!("fresh{i}");
        let (mut ws, hello) = ws_open(gw.port, &gw.token(&user));
        assert_eq!(hello["user_id"], user.as_str(), "{hello}");
        let receivers = redis.notify(&user, format!(r#"{{"type":"right_after","payload":{i}}}"#));
        assert!(receivers >= 1, "{user}: not subscribed after connected");
        let msg = recv_json(&mut ws, PROMPT);
        assert_eq!(msg["type"], "right_after", "{user}: {msg}");
        assert_eq!(msg["payload"], i, "{user}: {msg}");
        close_ws(&mut ws);
    }
    eprintln!(
        "{REPETITIONS} connects and deliveries in {:?}",
        started.elapsed()
    );
}

#[test]
fn the_last_disconnect_unsubscribes_after_the_linger() {
    let (redis, gw) = setup(&[CHANNEL_MODE, ("REDIS_UNSUBSCRIBE_LINGER", "200ms")]);
    let channel = "user_noti:alice";
    let (mut first, _) = ws_open(gw.port, &gw.token("alice"));
    let (mut second, _) = ws_open(gw.port, &gw.token("alice"));
    assert_eq!(
        numsub(&redis, channel),
        1,
        "subscribed once for two connections"
    );
    close_ws(&mut first);
    gw.wait_active_connections(1);
    // Watched for several lingers: one connection is left, the channel stays.
    let until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < until {
        assert_eq!(
            numsub(&redis, channel),
            1,
            "unsubscribed with a connection left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    close_ws(&mut second);
    wait_until(PROMPT, "PUBSUB NUMSUB user_noti:alice == 0", || {
        numsub(&redis, channel) == 0
    });

    // Back after the unsubscribe: subscribed again before `connected`.
    let (mut again, _) = ws_open(gw.port, &gw.token("alice"));
    assert_eq!(numsub(&redis, channel), 1);
    assert!(redis.notify("alice", r#"{"type":"back","payload":1}"#) >= 1);
    assert_message(&recv_json(&mut again, PROMPT), "back");
    close_ws(&mut again);
    wait_until(PROMPT, "unsubscribed again", || {
        numsub(&redis, channel) == 0
    });
}

#[test]
fn after_a_redis_restart_every_connected_user_receives_the_next_message() {
    let (mut redis, gw) = setup(&[CHANNEL_MODE, ("REDIS_PING_INTERVAL", "200ms")]);
    let users: Vec<String> = (0..20).map(|i| format!("user{i}")).collect();
    let mut clients: Vec<Ws> = users
        .iter()
        .map(|user| ws_open(gw.port, &gw.token(user)).0)
        .collect();
    redis.kill();
    wait_until(PROMPT, "/health reports Redis disconnected", || {
        gw.health().0 == 503
    });
    redis.restart();
    // Healthy only once every needed channel is subscribed again.
    gw.wait_redis_connected(secs(60));
    for (user, ws) in users.iter().zip(clients.iter_mut()) {
        let receivers = redis.notify(user, r#"{"type":"after_restart","payload":1}"#);
        assert!(receivers >= 1, "{user}: not resubscribed");
        assert_message(&recv_json(ws, PROMPT), "after_restart");
    }
}

#[test]
fn a_subscription_redis_cannot_confirm_closes_with_1013() {
    let (mut redis, gw) = setup(&[CHANNEL_MODE, ("REDIS_PING_INTERVAL", "200ms")]);
    let (mut connected, _) = ws_open(gw.port, &gw.token("alice"));
    redis.kill();
    wait_until(PROMPT, "/health reports Redis disconnected", || {
        gw.health().0 == 503
    });
    // A user whose channel is not subscribed: no `connected`, then 1013 once
    // the loop's bound (10 s) passes.
    let mut waiting = ws_connect(gw.port, &gw.token("bob")).expect("upgrade");
    let (code, reason) = expect_close(&mut waiting, secs(20));
    assert_eq!((code, reason.as_str()), (1013, "try again later"));
    assert_eq!(
        gw.metric("ws_notify_disconnects_total{reason=\"subscription_timeout\"}"),
        1.0
    );
    // Alice's channel was confirmed before: she stays.
    redis.restart();
    gw.wait_redis_connected(secs(60));
    assert!(redis.notify("alice", r#"{"type":"still_here","payload":1}"#) >= 1);
    assert_message(&recv_json(&mut connected, PROMPT), "still_here");
    assert_serving(&redis, &gw, "bob");
}

/// Connects with `?since=` (when given) and reads `connected`; returns its payload.
#[track_caller]
fn open_since(gw: &Gateway, user: &str, since: Option<&str>) -> (Ws, serde_json::Value) {
    let query = match since {
        Some(since) => format!("/ws?token={}&since={since}", gw.token(user)),
        None => format!("/ws?token={}", gw.token(user)),
    };
    let ws = ws_connect_with(gw.port, &query, &[]).unwrap_or_else(|e| panic!("connect: {e}"));
    expect_connected(ws)
}

#[test]
fn with_history_the_read_follows_the_subscription_and_a_resume_is_complete() {
    let (redis, gw) = setup(&[CHANNEL_MODE, ("WS_HISTORY_SIZE", "100")]);
    wait_function_loaded(&redis);
    let mut con = redis.connection().expect("redis");
    let (mut ws, hello) = open_since(&gw, "alice", None);
    assert_eq!(hello["position"], "0-0", "{hello}");
    let first = fcall(&mut con, "alice", r#"{"type":"one","payload":1}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["id"], first.as_str());
    close_ws(&mut ws);
    // Missed while away, then a resume: replayed after `connected`.
    let missed = fcall(&mut con, "alice", r#"{"type":"two","payload":2}"#);
    let (mut ws, hello) = open_since(&gw, "alice", Some(&first));
    assert_eq!(hello["recovery"]["complete"], true, "{hello}");
    assert_eq!(hello["recovery"]["count"], 1, "{hello}");
    assert_eq!(recv_json(&mut ws, PROMPT)["id"], missed.as_str());
    let live = fcall(&mut con, "alice", r#"{"type":"three","payload":3}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["id"], live.as_str());
}

#[test]
fn without_history_a_resume_waits_for_the_subscription_and_is_incomplete() {
    let (redis, gw) = setup(&[CHANNEL_MODE]);
    let (mut ws, hello) = open_since(&gw, "alice", Some("1-0"));
    assert_eq!(hello["recovery"]["complete"], false, "{hello}");
    assert_eq!(hello["recovery"]["count"], 0, "{hello}");
    assert!(redis.notify("alice", r#"{"type":"live","payload":1}"#) >= 1);
    assert_message(&recv_json(&mut ws, PROMPT), "live");
    assert_eq!(gw.metric("ws_notify_resumes_incomplete_total"), 1.0);
}
