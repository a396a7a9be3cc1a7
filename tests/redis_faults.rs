//! The Redis reader against a Redis that is down, dies, comes back, or wants
//! credentials, and a reader that panics (README "Operations"; issues 2 and 10).

mod common;

use std::time::Instant;

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

/// (what, the Redis, the port in REDIS_PORT, the gateway's environment).
type WorkingCredentials<'a> = (&'a str, &'a RedisServer, u16, Vec<(&'a str, &'a str)>);

/// Credentials that Redis accepts, given each way: the gateway subscribes and
/// delivers.
#[test]
fn redis_credentials_that_work() {
    let requirepass = RedisServer::start_with_auth(None, "s3cret");
    let acl = RedisServer::start_with_auth(Some("gateway"), "pw123");
    let url_server = RedisServer::start_with_auth(None, "pw");
    let url = format!("redis://:pw@127.0.0.1:{}/2", url_server.port);
    let cases: [WorkingCredentials; 3] = [
        (
            "requirepass",
            &requirepass,
            requirepass.port,
            vec![("REDIS_PASSWORD", "s3cret")],
        ),
        (
            "ACL user and database",
            &acl,
            acl.port,
            vec![
                ("REDIS_USERNAME", "gateway"),
                ("REDIS_PASSWORD", "pw123"),
                ("REDIS_DB", "3"),
            ],
        ),
        // REDIS_PORT points nowhere; REDIS_URL wins.
        (
            "REDIS_URL",
            &url_server,
            free_port(),
            vec![("REDIS_URL", &url)],
        ),
    ];
    for (what, redis, redis_port, env) in cases {
        let gw = Gateway::start(redis_port, &env);
        gw.wait_redis_connected(PROMPT);
        let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
        redis.notify("alice", format!(r#"{{"type":"auth","payload":"{what}"}}"#));
        assert_eq!(recv_json(&mut ws, PROMPT)["payload"], what);
    }
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

/// A panic on the reader thread (the release profile unwinds) must not leave
/// `/health` claiming a subscription nobody reads: the session is restarted,
/// counted, logged, and delivery resumes. The panic comes from the debug-only
/// fault hook `WS_NOTIFY_TEST_PANIC_ON_CHANNEL`.
#[test]
fn a_panicking_reader_is_restarted_and_delivery_resumes() {
    let (redis, gw) = setup(&[
        FAST_REDIS,
        ("WS_NOTIFY_TEST_PANIC_ON_CHANNEL", "user_noti:boom"),
    ]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    assert_eq!(gw.metric("ws_notify_redis_reader_restarts_total"), 0.0);
    assert!(redis.notify("boom", r#"{"type":"fault","payload":1}"#) >= 1);
    gw.wait_metric_at_least("ws_notify_redis_reader_restarts_total", 1.0);
    wait_until(PROMPT, "an error line about the panic", || {
        gw.logs()
            .lines()
            .any(|l| l.contains("\"error\"") && l.contains("reader panicked"))
    });
    gw.wait_redis_connected(PROMPT);
    assert_eq!(gw.metric("ws_notify_redis_reconnects_total"), 1.0);
    wait_until(PROMPT, "the recovery line", || {
        gw.logs().contains("re-subscribed to Redis")
    });
    assert!(redis.notify("alice", r#"{"type":"after_panic","payload":2}"#) >= 1);
    assert_message(&recv_json(&mut ws, PROMPT), "after_panic");
}

/// A short outage costs its length plus at most the reconnect cap (default
/// 2 s), not twice its length: the delay between attempts no longer grows to
/// 30 s. The recovery is logged with how long it took; the start-up line is
/// not repeated.
#[test]
fn a_short_outage_costs_its_length_plus_the_reconnect_cap() {
    let (mut redis, gw) = setup(&[FAST_REDIS]);
    let cap = secs(2);
    let killed = Instant::now();
    redis.kill();
    wait_until(PROMPT, "/health notices Redis is gone", || {
        gw.health().0 == 503
    });
    // The outage itself: long enough that an uncapped backoff (100 ms
    // doubling) waits several seconds between attempts by the end of it.
    let outage = secs(6);
    std::thread::sleep(outage.saturating_sub(killed.elapsed()));
    redis.restart();
    let back = Instant::now();
    gw.wait_redis_connected(secs(30));
    let recovered_after = back.elapsed();
    eprintln!(
        "Redis down for {:?}, re-subscribed {recovered_after:?} after it came back",
        back - killed
    );
    // The cap plus a generous margin for a loaded machine (connect, PSUBSCRIBE,
    // the first ping, the test's /health polling).
    assert!(
        recovered_after < cap + secs(3),
        "re-subscribed {recovered_after:?} after Redis came back (cap {cap:?})"
    );
    let logs = gw.logs();
    let recovery = logs
        .lines()
        .find(|l| l.contains("re-subscribed to Redis"))
        .unwrap_or_else(|| panic!("no recovery line:\n{logs}"));
    let recovery: serde_json::Value = serde_json::from_str(recovery).expect("a JSON line");
    assert_eq!(
        recovery["redis"],
        format!("127.0.0.1:{}", redis.port),
        "{recovery}"
    );
    assert!(
        recovery["attempts"].as_u64().is_some_and(|n| n >= 1),
        "{recovery}"
    );
    assert!(recovery["down_ms"].as_u64().is_some(), "{recovery}");
    let startup_lines = logs
        .lines()
        .filter(|l| l.contains(r#""message":"subscribed to Redis""#))
        .count();
    assert_eq!(
        startup_lines, 1,
        "the start-up line is not repeated:\n{logs}"
    );
    assert_serving(&redis, &gw, "alice");
}

#[test]
fn reconnect_max_must_be_a_positive_duration() {
    for value in ["0s", "2", "soon"] {
        let (code, output) = Gateway::run_expect_exit(&[("REDIS_RECONNECT_MAX", value)]);
        assert_eq!(code, Some(2), "REDIS_RECONNECT_MAX={value}: {output}");
        assert!(output.contains("REDIS_RECONNECT_MAX"), "{value}: {output}");
    }
}

/// A CA file that cannot be read is a configuration error (exit 2 naming the
/// variable), not a failure to listen.
#[test]
fn unreadable_redis_ca_file_exits_2_naming_it() {
    let missing = std::env::temp_dir().join(format!("ws-notify-missing-ca-{}.crt", random_hex(1)));
    let missing = missing.to_str().expect("temp paths are UTF-8");
    let (code, output) =
        Gateway::run_expect_exit(&[("REDIS_USE_TLS", "true"), ("REDIS_TLS_CA_FILE", missing)]);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("REDIS_TLS_CA_FILE"), "{output}");
    assert!(!output.contains("cannot listen"), "{output}");
}

/// A signal that interrupts the reader while it waits for a pong (here:
/// SIGSTOP/SIGCONT of the gateway while a frozen Redis holds the pong back) is
/// not a lost connection: the pong arrives later and the subscription stays.
#[test]
fn a_signal_during_the_pong_wait_is_not_a_lost_connection() {
    let (redis, gw) = setup(&[FAST_REDIS, ("LOGGER_LEVEL", "info")]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    for round in 0..5 {
        // With Redis frozen, the next ping (every 200 ms) waits up to its 1 s
        // pong wait; the gateway is stopped and continued inside that wait, and
        // Redis is resumed well before it ends.
        redis.signal(libc::SIGSTOP);
        std::thread::sleep(ms(300));
        gw.signal(libc::SIGSTOP);
        // A SIGCONT sent before the stop took effect would cancel it.
        wait_until(PROMPT, "the gateway to stop", || {
            process_state(gw.pid()) == 'T'
        });
        gw.signal(libc::SIGCONT);
        std::thread::sleep(ms(50));
        redis.signal(libc::SIGCONT);
        assert_eq!(
            redis.notify("alice", format!(r#"{{"type":"round","payload":{round}}}"#)),
            1
        );
        assert_eq!(recv_json(&mut ws, PROMPT)["payload"], round);
    }
    assert_eq!(gw.metric("ws_notify_redis_reconnects_total"), 0.0);
    let logs = gw.logs();
    assert!(!logs.contains("reconnecting"), "{logs}");
}

/// The state letter of /proc/<pid>/stat (`R`, `S`, `T` for stopped, ...).
fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // The command name in parentheses may contain spaces; the state follows it.
    let after = stat.rfind(')').expect("comm in /proc/<pid>/stat");
    stat[after + 1..]
        .trim_start()
        .chars()
        .next()
        .expect("state letter")
}
