//! The process: configuration errors, graceful shutdown, logging, file
//! descriptor exhaustion (README: "Configuration" and "Operations").
//!
//! Nothing here asserts how fast the machine is. "Did not wait for
//! `SHUTDOWN_TIMEOUT`" is shown by a timeout of an hour ([`NEVER`]) and an exit
//! within a generous deadline; "waited for it" by an exit no sooner than it;
//! "does not spin" by comparing the gateway's CPU time with a busy loop's over
//! the same window.

mod common;

use std::net::TcpStream;
use std::time::Instant;

use common::*;
use serde_json::Value;

/// CPU time a busy loop in the test gets while the gateway's is measured
/// (0.5 s at the usual 100 ticks a second).
const BUSY_TICKS: u64 = 50;

/// `SHUTDOWN_TIMEOUT` for tests whose exit must not wait for it.
const NEVER: &str = "1h";

/// A generous deadline for an exit or a recovery on a loaded machine.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

#[test]
fn config_errors_exit_2_naming_the_variable() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("JWT_SECRET_KEY", UNSET)], "JWT_SECRET_KEY"),
        (&[("JWT_SECRET_KEY", "")], "JWT_SECRET_KEY"),
        (&[("WS_PING_INTERVAL", "abc")], "WS_PING_INTERVAL"),
        (&[("WS_PONG_WAIT", "10")], "WS_PONG_WAIT"),
        (&[("SHUTDOWN_TIMEOUT", "5x")], "SHUTDOWN_TIMEOUT"),
        (&[("JWT_LEEWAY", "soon")], "JWT_LEEWAY"),
        (&[("WS_PORT", "99999")], "WS_PORT"),
        (&[("WS_PORT", "http")], "WS_PORT"),
        (&[("REDIS_PORT", "abc")], "REDIS_PORT"),
        (&[("WS_MAX_CONNECTIONS", "x")], "WS_MAX_CONNECTIONS"),
        (
            &[("WS_MAX_CONNECTIONS_PER_USER", "-1")],
            "WS_MAX_CONNECTIONS_PER_USER",
        ),
        (&[("WS_SEND_BUFFER", "many")], "WS_SEND_BUFFER"),
        (&[("WS_SEND_BUFFER_BYTES", "1MB")], "WS_SEND_BUFFER_BYTES"),
        (&[("WS_LOOP_NICE", "20")], "WS_LOOP_NICE"),
        (&[("WS_MAX_MESSAGE_SIZE", "big")], "WS_MAX_MESSAGE_SIZE"),
        (&[("REDIS_DB", "zero")], "REDIS_DB"),
        (&[("REDIS_USE_TLS", "maybe")], "REDIS_USE_TLS"),
        (&[("REDIS_URL", "ftp://x")], "REDIS_URL"),
        (&[("LOGGER_LEVEL", "loud")], "LOGGER_LEVEL"),
        (&[("LOGGER_ENCODING", "xml")], "LOGGER_ENCODING"),
        (
            &[
                ("JWT_SECRET_KEY", UNSET),
                ("JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem"),
            ],
            "JWT_PUBLIC_KEY_FILE",
        ),
    ];
    let mut failures = Vec::new();
    for (env, var) in cases {
        let (code, output) = Gateway::run_expect_exit(env);
        if code != Some(2) || !output.contains(var) || output.contains("panicked") {
            failures.push(format!(
                "{env:?}: exit {code:?}, output {:?}",
                output.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "expected exit 2 and a message naming the variable:\n{}",
        failures.join("\n")
    );
}

#[test]
fn go_style_durations_are_accepted() {
    let (_redis, gw) = setup(&[
        ("WS_PING_INTERVAL", "1m30s"),
        ("WS_PONG_WAIT", "2m"),
        ("WS_WRITE_WAIT", "1500ms"),
        ("WS_HANDSHAKE_TIMEOUT", "2.5s"),
        ("SHUTDOWN_TIMEOUT", "1h"),
        ("JWT_LEEWAY", "0s"),
    ]);
    let (_ws, hello) = ws_open(gw.port, &gw.token("alice"));
    assert_eq!(hello["user_id"], "alice");
}

#[test]
fn sigterm_closes_clients_with_1001_and_exits_0() {
    // Both clients answer the close (tungstenite does), so the exit does not
    // wait for the hour-long timeout.
    let (_redis, mut gw) = setup(&[("SHUTDOWN_TIMEOUT", NEVER)]);
    let (mut a, _) = ws_open(gw.port, &gw.token("alice"));
    let (mut b, _) = ws_open(gw.port, &gw.token("bob"));
    gw.wait_active_connections(2);
    gw.signal(libc::SIGTERM);
    assert_eq!(expect_close(&mut a, PROMPT).0, 1001, "close code to alice");
    assert_eq!(expect_close(&mut b, PROMPT).0, 1001, "close code to bob");
    let status = gw
        .wait_exit(DEADLINE)
        .expect("still running after SIGTERM although every client answered");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[test]
fn sigint_exits_0() {
    let (_redis, mut gw) = setup(&[("SHUTDOWN_TIMEOUT", NEVER)]);
    let (mut a, _) = ws_open(gw.port, &gw.token("alice"));
    gw.signal(libc::SIGINT);
    assert_eq!(expect_close(&mut a, PROMPT).0, 1001);
    let status = gw.wait_exit(DEADLINE).expect("still running after SIGINT");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[test]
fn sigterm_without_clients_or_redis_exits_0() {
    let mut gw = Gateway::start(free_port(), &[("SHUTDOWN_TIMEOUT", NEVER)]);
    gw.signal(libc::SIGTERM);
    let status = gw.wait_exit(DEADLINE).expect("still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[test]
fn shutdown_timeout_bounds_a_client_that_never_replies() {
    let (_redis, mut gw) = setup(&[("SHUTDOWN_TIMEOUT", "1s")]);
    let mut raw = RawWs::open(gw.port, &gw.token("alice"));
    let start = Instant::now();
    gw.signal(libc::SIGTERM);
    // It reads the close frame but never answers it.
    assert_eq!(raw.expect_close(PROMPT).0, 1001);
    let status = gw
        .wait_exit(DEADLINE)
        .expect("SHUTDOWN_TIMEOUT=1s did not end the wait for a silent client");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    // It did wait for the answer, as long as the timeout.
    assert!(
        start.elapsed() >= secs(1),
        "exited after {:?}",
        start.elapsed()
    );
}

#[test]
fn second_signal_exits_at_once() {
    let (redis, mut gw) = setup(&[("SHUTDOWN_TIMEOUT", NEVER)]);
    let mut raw = RawWs::open(gw.port, &gw.token("alice"));
    gw.signal(libc::SIGTERM);
    // The close frame shows the first signal was handled; the client never replies.
    assert_eq!(raw.expect_close(PROMPT).0, 1001);
    // Shutting down: no new connections are served.
    match TcpStream::connect(("127.0.0.1", gw.port)) {
        Err(_) => {}
        Ok(mut stream) => {
            use std::io::Write;
            // A write error is as good as a refusal here.
            let _ = stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
            if let Ok((resp, _)) = read_http_response(&mut stream, Instant::now() + ms(500)) {
                panic!("a new connection was served during shutdown: {resp:?}");
            }
        }
    }
    // The Redis reader stops: the gateway no longer subscribes.
    wait_until(PROMPT, "the gateway unsubscribes from Redis", || {
        redis.notify("alice", r#"{"type":"late","payload":1}"#) == 0
    });
    assert!(
        gw.is_running(),
        "exited before the shutdown timeout with a client that never replied"
    );
    // With an hour left of the timeout, an exit at all is "at once".
    gw.signal(libc::SIGTERM);
    let status = gw
        .wait_exit(DEADLINE)
        .expect("still running after the second SIGTERM");
    assert_eq!(
        status.code(),
        Some(1),
        "README: a second signal exits with 1"
    );
}

#[test]
fn json_logs_and_no_tokens_in_them() {
    let (redis, gw) = setup(&[("LOGGER_LEVEL", "debug"), ("LOGGER_ENCODING", "json")]);
    let good = gw.token("alice");
    let bad = token("wrong-secret", "mallory", 3600);
    let (mut ws, _) = ws_open(gw.port, &good);
    let resp = raw_request(gw.port, upgrade_request(&format!("/ws?token={bad}"), &[]));
    assert_eq!(resp.status, 401);
    let bearer = format!("Bearer {bad}");
    assert_eq!(
        refused(ws_connect_with(
            gw.port,
            "/ws",
            &[("Authorization", &bearer)]
        ))
        .0,
        401
    );
    redis.notify("alice", r#"{"type":"x","payload":1}"#);
    recv_json(&mut ws, PROMPT);
    close_ws(&mut ws);
    gw.wait_active_connections(0);

    let parse = |line: &str| {
        serde_json::from_str::<Value>(line)
            .ok()
            .filter(Value::is_object)
    };
    // Connect and disconnect are logged at info with the user id.
    wait_until(
        PROMPT,
        "info lines about alice connecting and disconnecting",
        || {
            let logs = gw.logs();
            let alice_info = logs
                .lines()
                .filter_map(parse)
                .filter(|v| {
                    v["level"]
                        .as_str()
                        .is_some_and(|l| l.eq_ignore_ascii_case("info"))
                })
                .filter(|v| v.to_string().contains("alice"))
                .count();
            alice_info >= 2
        },
    );
    let logs = gw.logs();
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v = parse(line).unwrap_or_else(|| panic!("log line is not a JSON object: {line:?}"));
        for key in ["time", "level", "target", "message"] {
            assert!(v.get(key).is_some(), "log line without {key:?}: {line}");
        }
    }
    for t in [&good, &bad] {
        let signature = t.rsplit('.').next().expect("signature");
        assert!(
            !logs.contains(signature),
            "a token appears in the logs:\n{logs}"
        );
    }
}

#[test]
fn logger_level_filters() {
    let (_redis, gw) = setup(&[("LOGGER_LEVEL", "error")]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    close_ws(&mut ws);
    gw.wait_active_connections(0);
    let logs = gw.logs();
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let lower = line.to_lowercase();
        assert!(
            !lower.contains("\"info\"") && !lower.contains("\"debug\""),
            "line below error level: {line}"
        );
    }
}

#[test]
fn console_encoding_starts() {
    let (_redis, gw) = setup(&[("LOGGER_ENCODING", "console"), ("LOGGER_LEVEL", "info")]);
    let (_ws, _) = ws_open(gw.port, &gw.token("alice"));
    wait_until(PROMPT, "a console log line", || {
        !gw.logs().trim().is_empty()
    });
    let logs = gw.logs();
    let first = logs.lines().next().unwrap_or_default();
    assert!(
        serde_json::from_str::<Value>(first).is_err(),
        "console encoding printed JSON: {first}"
    );
}

#[test]
fn ws_loop_nice_runs_the_event_loop_below_the_redis_reader() {
    let own = stat_fields("/proc/self/stat")[16]
        .parse::<i64>()
        .expect("nice");
    let redis = RedisServer::start();
    for (value, steps) in [(None, 0), (Some("10"), 10), (Some("3"), 3)] {
        let env: Vec<(&str, &str)> = value.map(|v| ("WS_LOOP_NICE", v)).into_iter().collect();
        let gw = Gateway::start(redis.port, &env);
        gw.wait_redis_connected(PROMPT);
        // A new thread names itself when it first runs: on a loaded machine the
        // log writer can still carry the process's name for a moment.
        let threads = wait_for(PROMPT, "every thread named", || {
            let threads = thread_nice_values(gw.pid());
            let named = ["log-writer", "redis-reader", "ws-notify"]
                .iter()
                .all(|name| threads.iter().filter(|(n, _)| n == name).count() == 1);
            named.then_some(threads)
        });
        let nice_of = |name: &str| {
            threads
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no thread {name} in {threads:?}"))
                .1
        };
        let expected_loop = (own + steps).min(19);
        assert_eq!(
            nice_of("redis-reader"),
            own,
            "WS_LOOP_NICE={value:?}: {threads:?}"
        );
        assert_eq!(
            nice_of("ws-notify"),
            expected_loop,
            "WS_LOOP_NICE={value:?}: {threads:?}"
        );
        // The event loop, the Redis reader and the log writer.
        assert_eq!(threads.len(), 3, "{threads:?}");
    }
}

#[test]
fn survives_running_out_of_file_descriptors() {
    let redis = RedisServer::start();
    let mut gw = Gateway::start_with_nofile(
        redis.port,
        &[("WS_HANDSHAKE_TIMEOUT", "30s")],
        Some((48, 48)),
    );
    gw.wait_redis_connected(PROMPT);
    // WS_MAX_CONNECTIONS (10000) cannot fit in 48 descriptors: a warning names it.
    gw.wait_log("cannot hold WS_MAX_CONNECTIONS", PROMPT);

    // More connections than descriptors; they send nothing.
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..80 {
        match TcpStream::connect(("127.0.0.1", gw.port)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    assert!(
        held.len() >= 60,
        "could only open {} connections",
        held.len()
    );
    // While it cannot accept, it must neither crash nor spin.
    let pid = gw.pid();
    wait_until(DEADLINE, "the gateway has used up its descriptors", || {
        proc_fd_count(pid) >= 44
    });
    // A gateway that spun on the listener would compete with the busy loop for
    // CPU and get a share comparable to it.
    let share = cpu_share_against_busy_loop(pid, BUSY_TICKS, DEADLINE);
    assert!(
        share < 0.5,
        "out of descriptors, the gateway used {:.0}% of a busy loop's CPU time (busy loop?)",
        share * 100.0
    );
    assert!(gw.is_running(), "gateway died when out of descriptors");

    drop(held);
    // It recovers: new clients are served again.
    let (mut ws, _) = wait_for(
        DEADLINE,
        "a WebSocket connection after the descriptors are free",
        || {
            let ws = ws_connect(gw.port, &gw.token("alice")).ok()?;
            Some(expect_connected(ws))
        },
    );
    redis.notify("alice", r#"{"type":"recovered","payload":1}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "recovered");
    gw.wait_metric_at_least("ws_notify_accept_fd_exhausted_total", 1.0);
}

#[test]
fn idle_gateway_does_not_spin() {
    let (_redis, gw) = setup(&[("LOGGER_LEVEL", "info")]);
    let _clients: Vec<Ws> = (0..20)
        .map(|i| ws_open(gw.port, &gw.token(&format!("user{i}"))).0)
        .collect();
    gw.wait_active_connections(20);
    let share = cpu_share_against_busy_loop(gw.pid(), BUSY_TICKS, DEADLINE);
    assert!(
        share < 0.2,
        "idle gateway with 20 connections used {:.0}% of a busy loop's CPU time",
        share * 100.0
    );
}

#[test]
fn raises_the_soft_open_file_limit_to_the_hard_limit() {
    let mut ours = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) },
        0
    );
    // A hard limit the child may have without privileges, above the soft one.
    let hard = ours.rlim_max.min(4096);
    assert!(
        hard > 64,
        "the test runner's hard open-file limit ({hard}) is too low"
    );
    let env = [("WS_MAX_CONNECTIONS", "10")];
    let gw = Gateway::start_with_nofile(free_port(), &env, Some((64, hard)));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let expected = hard.to_string();
    assert_eq!(
        fields[3..5],
        [expected.as_str(), expected.as_str()],
        "soft and hard: {line}"
    );
}

/// The yardstick of the two CPU checks above tells a spinning process from an
/// idle one (a shell busy loop and `sleep`), however loaded the machine is.
#[test]
fn the_busy_loop_yardstick_tells_spinning_from_idle() {
    let spawn = |script: &str| {
        std::process::Command::new("sh")
            .args(["-c", script])
            .spawn()
            .expect("spawn sh")
    };
    let mut spinning = spawn("while :; do :; done");
    let mut idle = spawn("exec sleep 600");
    let spinning_share = cpu_share_against_busy_loop(spinning.id(), BUSY_TICKS, DEADLINE);
    let idle_share = cpu_share_against_busy_loop(idle.id(), BUSY_TICKS, DEADLINE);
    for child in [&mut spinning, &mut idle] {
        // Both still run; kill cannot fail but for a race with an exit.
        let _ = child.kill();
        let _ = child.wait();
    }
    eprintln!("busy shell loop {spinning_share:.2}, sleep {idle_share:.2} of a busy loop");
    assert!(
        spinning_share > 0.5,
        "a busy shell loop got only {:.0}% of the test's busy loop",
        spinning_share * 100.0
    );
    assert!(idle_share < 0.2, "sleep got {:.0}%", idle_share * 100.0);
}
