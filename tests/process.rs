//! The process: configuration errors, graceful shutdown, logging, file
//! descriptor exhaustion (DESIGN.md sections 4 and 5; issue 2 items 2, 3, 12, 13).

mod common;

use std::net::TcpStream;
use std::time::Instant;

use common::*;
use serde_json::Value;

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
    let redis = RedisServer::start();
    let gw = Gateway::start(
        redis.port,
        &[
            ("WS_PING_INTERVAL", "1m30s"),
            ("WS_PONG_WAIT", "2m"),
            ("WS_WRITE_WAIT", "1500ms"),
            ("WS_HANDSHAKE_TIMEOUT", "2.5s"),
            ("SHUTDOWN_TIMEOUT", "1h"),
            ("JWT_LEEWAY", "0s"),
        ],
    );
    gw.wait_redis_connected(PROMPT);
    let (_ws, hello) = ws_open(gw.port, &gw.token("alice"));
    assert_eq!(hello["user_id"], "alice");
}

#[test]
fn sigterm_closes_clients_with_1001_and_exits_0() {
    let redis = RedisServer::start();
    let mut gw = Gateway::start(redis.port, &[("SHUTDOWN_TIMEOUT", "2s")]);
    let (mut a, _) = ws_open(gw.port, &gw.token("alice"));
    let (mut b, _) = ws_open(gw.port, &gw.token("bob"));
    gw.wait_active_connections(2);
    let start = Instant::now();
    gw.signal(libc::SIGTERM);
    assert_eq!(expect_close(&mut a, PROMPT).0, 1001, "close code to alice");
    assert_eq!(expect_close(&mut b, PROMPT).0, 1001, "close code to bob");
    let status = gw
        .wait_exit(secs(4))
        .expect("still running 4 s after SIGTERM with SHUTDOWN_TIMEOUT=2s");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(start.elapsed() < secs(3), "took {:?}", start.elapsed());
}

#[test]
fn sigint_exits_0() {
    let redis = RedisServer::start();
    let mut gw = Gateway::start(redis.port, &[("SHUTDOWN_TIMEOUT", "2s")]);
    let (mut a, _) = ws_open(gw.port, &gw.token("alice"));
    gw.signal(libc::SIGINT);
    assert_eq!(expect_close(&mut a, PROMPT).0, 1001);
    let status = gw.wait_exit(secs(4)).expect("still running after SIGINT");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[test]
fn sigterm_without_clients_or_redis_exits_0() {
    let mut gw = Gateway::start(free_port(), &[("SHUTDOWN_TIMEOUT", "2s")]);
    gw.signal(libc::SIGTERM);
    let status = gw.wait_exit(secs(4)).expect("still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[test]
fn shutdown_timeout_bounds_a_client_that_never_replies() {
    let redis = RedisServer::start();
    let mut gw = Gateway::start(redis.port, &[("SHUTDOWN_TIMEOUT", "1s")]);
    let mut raw = RawWs::open(gw.port, &gw.token("alice"));
    let start = Instant::now();
    gw.signal(libc::SIGTERM);
    // It reads the close frame but never answers it.
    assert_eq!(raw.expect_close(PROMPT).0, 1001);
    let status = gw
        .wait_exit(secs(4))
        .expect("still running 4 s after SIGTERM with SHUTDOWN_TIMEOUT=1s");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(start.elapsed() < secs(3), "took {:?}", start.elapsed());
}

#[test]
fn second_signal_exits_at_once() {
    let redis = RedisServer::start();
    let mut gw = Gateway::start(redis.port, &[("SHUTDOWN_TIMEOUT", "30s")]);
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
    let start = Instant::now();
    gw.signal(libc::SIGTERM);
    gw.wait_exit(secs(2))
        .expect("still running 2 s after the second SIGTERM");
    assert!(
        start.elapsed() < secs(1),
        "second signal took {:?}",
        start.elapsed()
    );
}

#[test]
fn json_logs_and_no_tokens_in_them() {
    let redis = RedisServer::start();
    let gw = Gateway::start(
        redis.port,
        &[("LOGGER_LEVEL", "debug"), ("LOGGER_ENCODING", "json")],
    );
    gw.wait_redis_connected(PROMPT);
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
    ws.close(None).expect("close");
    let _ = close_or_gone(&mut ws, PROMPT);
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
    ws.close(None).expect("close");
    let _ = close_or_gone(&mut ws, PROMPT);
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
    let redis = RedisServer::start();
    let gw = Gateway::start(
        redis.port,
        &[("LOGGER_ENCODING", "console"), ("LOGGER_LEVEL", "info")],
    );
    gw.wait_redis_connected(PROMPT);
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

/// The fields of a /proc stat file after the parenthesised command name: the
/// first of them is field 3 of proc(5).
fn stat_fields(path: &str) -> Vec<String> {
    let stat = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    after.split_whitespace().map(str::to_string).collect()
}

/// user + system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    // utime and stime are fields 14 and 15.
    let fields = stat_fields(&format!("/proc/{pid}/stat"));
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Each thread's name and nice value (field 19).
fn thread_nice_values(pid: u32) -> Vec<(String, i64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/pid/task") {
        let task = task.expect("task entry").path();
        let name = std::fs::read_to_string(task.join("comm")).expect("read comm");
        let fields = stat_fields(&task.join("stat").to_string_lossy());
        threads.push((name.trim().to_string(), fields[16].parse().expect("nice")));
    }
    threads.sort();
    threads
}

#[test]
fn the_event_loop_runs_below_the_redis_reader() {
    let own = stat_fields("/proc/self/stat")[16]
        .parse::<i64>()
        .expect("nice");
    let redis = RedisServer::start();
    for (value, steps) in [(None, 10), (Some("3"), 3), (Some("0"), 0)] {
        let env: Vec<(&str, &str)> = value.map(|v| ("WS_LOOP_NICE", v)).into_iter().collect();
        let gw = Gateway::start(redis.port, &env);
        gw.wait_redis_connected(PROMPT);
        let threads = thread_nice_values(gw.pid());
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
    assert!(
        gw.logs().contains("WS_MAX_CONNECTIONS"),
        "no warning about the open-file limit"
    );

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
    wait_until(PROMPT, "the gateway has used up its descriptors", || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
            >= 44
    });
    let ticks_before = cpu_ticks(gw.pid());
    let t0 = Instant::now();
    // Measuring CPU over a window is the point here, not waiting for an event.
    std::thread::sleep(secs(1));
    let used = cpu_ticks(gw.pid()) - ticks_before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = used as f64 / hz / t0.elapsed().as_secs_f64();
    assert!(
        cpu < 0.5,
        "gateway uses {:.0}% CPU while out of descriptors (busy loop?)",
        cpu * 100.0
    );
    assert!(gw.is_running(), "gateway died when out of descriptors");

    drop(held);
    // It recovers: new clients are served again.
    let (mut ws, _) = wait_for(
        secs(10),
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
    let before = cpu_ticks(gw.pid());
    let t0 = Instant::now();
    // Measuring CPU over a window is the point here, not waiting for an event.
    std::thread::sleep(secs(1));
    let used = cpu_ticks(gw.pid()) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = used as f64 / hz / t0.elapsed().as_secs_f64();
    assert!(
        cpu < 0.2,
        "idle gateway with 20 connections uses {:.0}% CPU",
        cpu * 100.0
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
