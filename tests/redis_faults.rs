//! The Redis reader against a Redis that is down, dies, comes back, or wants
//! credentials (DESIGN.md sections 1 and 4; issue 2 items 2 and 7).

mod common;

use common::*;

/// Short reader timings so that faults are noticed quickly.
const FAST_REDIS: (&str, &str) = ("REDIS_PING_INTERVAL", "200ms");

#[track_caller]
fn assert_degraded(gw: &Gateway) {
    let (status, body) = gw.health();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["redis"]["status"], "disconnected", "{body}");
}

#[test]
fn starts_while_redis_is_down_and_connects_when_it_comes_up() {
    let mut redis = RedisServer::start();
    redis.kill();
    let gw = Gateway::start(redis.port, &[FAST_REDIS]);
    assert_degraded(&gw);
    // Clients can connect while Redis is down.
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    redis.restart();
    gw.wait_redis_connected(secs(15));
    assert!(redis.notify("alice", r#"{"type":"late","payload":1}"#) >= 1);
    assert_message(&recv_json(&mut ws, PROMPT), "late");
}

#[test]
fn health_is_503_while_redis_is_down_and_200_after() {
    let (mut redis, gw) = setup(&[FAST_REDIS]);
    redis.kill();
    let mut last = (0, serde_json::Value::Null);
    wait_until(PROMPT, "/health reports 503 degraded", || {
        last = gw.health();
        last.0 == 503
    });
    assert_degraded(&gw);
    assert_eq!(gw.metric("ws_notify_redis_connected"), 0.0);
    redis.restart();
    gw.wait_redis_connected(secs(15));
    let (_, body) = gw.health();
    assert_eq!(body["status"], "healthy", "{body}");
    gw.wait_metric_at_least("ws_notify_redis_reconnects_total", 1.0);
    assert_eq!(gw.metric("ws_notify_redis_connected"), 1.0);
}

#[test]
fn redis_restart_keeps_clients_and_resubscribes() {
    let (mut redis, gw) = setup(&[FAST_REDIS]);
    let (mut a, _) = ws_open(gw.port, &gw.token("alice"));
    let (mut b, _) = ws_open(gw.port, &gw.token("bob"));
    redis.notify("alice", r#"{"type":"before","payload":1}"#);
    assert_eq!(recv_json(&mut a, PROMPT)["type"], "before");

    redis.kill();
    wait_until(PROMPT, "/health reports Redis disconnected", || {
        gw.health().0 == 503
    });
    // Clients stay connected and served while Redis is away.
    send_text(&mut a, r#"{"type":"ping"}"#);
    assert_eq!(recv_json(&mut a, PROMPT)["type"], "pong");
    assert_eq!(gw.active_connections(), 2);

    redis.restart();
    gw.wait_redis_connected(secs(15));
    assert!(
        redis.notify("alice", r#"{"type":"after","payload":1}"#) >= 1,
        "not re-subscribed"
    );
    redis.notify("bob", r#"{"type":"after","payload":2}"#);
    assert_message(&recv_json(&mut a, PROMPT), "after");
    assert_message(&recv_json(&mut b, PROMPT), "after");
    assert_eq!(gw.active_connections(), 2);
}

#[test]
fn redis_killed_twice() {
    let (mut redis, gw) = setup(&[FAST_REDIS]);
    let (mut a, _) = ws_open(gw.port, &gw.token("alice"));
    for round in 0..2 {
        redis.kill();
        wait_until(PROMPT, "/health reports Redis disconnected", || {
            gw.health().0 == 503
        });
        redis.restart();
        gw.wait_redis_connected(secs(15));
        redis.notify("alice", format!(r#"{{"type":"round","payload":{round}}}"#));
        assert_eq!(recv_json(&mut a, PROMPT)["payload"], round);
    }
}

#[test]
fn redis_password() {
    let redis = RedisServer::start_with_auth(None, "s3cret");
    let gw = Gateway::start(redis.port, &[("REDIS_PASSWORD", "s3cret")]);
    gw.wait_redis_connected(PROMPT);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    redis.notify("alice", r#"{"type":"auth","payload":1}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "auth");
}

#[test]
fn wrong_redis_password_stays_degraded() {
    let redis = RedisServer::start_with_auth(None, "s3cret");
    let gw = Gateway::start(redis.port, &[("REDIS_PASSWORD", "wrong"), FAST_REDIS]);
    // Give the reader a few attempts; it must not claim to be connected.
    wait_until(
        PROMPT,
        "a log line about the failed Redis connection",
        || {
            gw.logs()
                .lines()
                .map(str::to_lowercase)
                .any(|l| l.contains("redis") && (l.contains("warn") || l.contains("error")))
        },
    );
    assert_degraded(&gw);
}

#[test]
fn redis_username_and_password() {
    let redis = RedisServer::start_with_auth(Some("gateway"), "pw123");
    let gw = Gateway::start(
        redis.port,
        &[
            ("REDIS_USERNAME", "gateway"),
            ("REDIS_PASSWORD", "pw123"),
            ("REDIS_DB", "3"),
        ],
    );
    gw.wait_redis_connected(PROMPT);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    redis.notify("alice", r#"{"type":"acl","payload":1}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "acl");
}

#[test]
fn redis_url_overrides_host_and_port() {
    let redis = RedisServer::start_with_auth(None, "pw");
    let url = format!("redis://:pw@127.0.0.1:{}/2", redis.port);
    // REDIS_PORT points nowhere; REDIS_URL wins.
    let gw = Gateway::start(free_port(), &[("REDIS_URL", &url)]);
    gw.wait_redis_connected(PROMPT);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    redis.notify("alice", r#"{"type":"url","payload":1}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "url");
}

#[test]
fn reconnects_back_off_while_redis_is_down() {
    let gw = Gateway::start(free_port(), &[FAST_REDIS, ("LOGGER_LEVEL", "info")]);
    let failures = "ws_notify_redis_connect_failures_total";
    gw.wait_metric_at_least(failures, 1.0);
    let first = gw.metric(failures);
    // Counting attempts over a window is the point here, not waiting for an event.
    std::thread::sleep(secs(2));
    let attempts = gw.metric(failures) - first;
    // 100 ms doubling with full jitter: a handful of attempts in 2 s, not a busy loop.
    assert!(
        attempts >= 1.0,
        "the reader stopped trying ({attempts} attempts in 2 s)"
    );
    assert!(
        attempts <= 30.0,
        "{attempts} connection attempts in 2 s: no backoff"
    );
    assert_degraded(&gw);
}

#[test]
fn redis_that_hangs_is_detected_by_the_ping() {
    let (mut redis, gw) = setup(&[FAST_REDIS]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    // A stopped Redis keeps its sockets open but answers nothing.
    redis.signal(libc::SIGSTOP);
    let stopped = std::time::Instant::now();
    wait_until(PROMPT, "/health notices the hung Redis", || {
        gw.health().0 == 503
    });
    eprintln!("hung Redis noticed after {:?}", stopped.elapsed());
    redis.signal(libc::SIGCONT);
    gw.wait_redis_connected(secs(15));
    assert!(redis.notify("alice", r#"{"type":"back","payload":1}"#) >= 1);
    assert_message(&recv_json(&mut ws, PROMPT), "back");
    redis.kill();
}
