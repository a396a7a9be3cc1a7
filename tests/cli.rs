//! The binary's subcommands (issue 6): `token`, `listen`, `publish`,
//! `healthcheck`, `--help`/`--version` and bad arguments, each run as the real
//! binary against a real redis-server and gateway.

mod common;

use std::process::Command;

use common::procs::{self, Output, Proc};
use common::*;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_ws-notify");

/// The binary with a clean environment (PATH only) plus `env`.
fn cli(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.args(args).envs(env.iter().copied());
    cmd
}

#[track_caller]
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    procs::run(&format!("ws-notify {args:?}"), cli(args, env), secs(30))
}

fn ws_url(gw: &Gateway) -> String {
    format!("ws://127.0.0.1:{}/ws", gw.port)
}

// ---------------------------------------------------------------------------
// token
// ---------------------------------------------------------------------------

#[test]
fn token_is_accepted_by_the_gateway() {
    let (_redis, gw) = setup(&[]);
    let out = run(
        &["token", "--sub", "alice", "--ttl", "1h"],
        &[("JWT_SECRET_KEY", &gw.secret)],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let token = out.stdout.trim();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token:?}");
    let (_ws, hello) = ws_open(gw.port, token);
    assert_eq!(hello["user_id"], "alice", "{hello}");

    // The header says HS256; the claims carry the user, iat and exp = iat + 1h.
    let claims = token_claims(token);
    assert_eq!(claims["sub"], "alice");
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 3600, "{claims}");
    assert!((iat - now_secs()).abs() < 60, "{claims}");
}

#[test]
fn token_follows_the_gateway_claim_rules() {
    // The gateway requires a custom user claim, an issuer and an audience:
    // the token command, given the same environment, satisfies all three.
    let rules = [
        ("JWT_USER_CLAIM", "uid"),
        ("JWT_ISSUER", "https://auth.example"),
        ("JWT_AUDIENCE", "notifications"),
    ];
    let (_redis, gw) = setup(&rules);
    let mut env = rules.to_vec();
    env.push(("JWT_SECRET_KEY", &gw.secret));
    let out = run(
        &[
            "token",
            "--sub=bob",
            "--claim",
            "role=admin",
            "--claim",
            "tier=3",
        ],
        &env,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let token = out.stdout.trim();
    let (_ws, hello) = ws_open(gw.port, token);
    assert_eq!(hello["user_id"], "bob", "{hello}");
    let claims = token_claims(token);
    assert_eq!(claims["role"], "admin");
    assert_eq!(claims["tier"], 3);
    assert_eq!(claims["iss"], "https://auth.example");
    assert_eq!(claims["aud"], "notifications");
}

#[test]
fn token_errors_exit_2() {
    let secret = [("JWT_SECRET_KEY", "s")];
    for (args, env, expect) in [
        (&["token"][..], &secret[..], "--sub <user> is required"),
        (&["token", "--sub"], &secret, "--sub needs a value"),
        (&["token", "--sub", "a", "--ttl", "soon"], &secret, "--ttl"),
        (&["token", "--sub", "a", "--ttl", "-1h"], &secret, "--ttl"),
        (
            &["token", "--sub", "a", "--claim", "novalue"],
            &secret,
            "key=value",
        ),
        (
            &["token", "--sub", "a", "--bogus"],
            &secret,
            "unknown option --bogus",
        ),
        (&["token", "--sub", "a"], &[], "JWT_SECRET_KEY"),
    ] {
        let out = run(args, env);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
        assert!(
            out.stderr.contains(expect),
            "{args:?}: stderr {:?}",
            out.stderr
        );
    }
}

// ---------------------------------------------------------------------------
// listen
// ---------------------------------------------------------------------------

fn listen(gw: &Gateway, token_args: &[&str], env: &[(&str, &str)]) -> Proc {
    let url = ws_url(gw);
    let mut args = vec!["listen", "--url", url.as_str()];
    args.extend_from_slice(token_args);
    Proc::spawn("ws-notify listen", cli(&args, env))
}

#[track_caller]
fn json_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"))
}

#[test]
fn listen_prints_messages_as_json_lines() {
    let (redis, gw) = setup(&[]);
    let token = gw.token("carol");
    let mut listener = listen(&gw, &["--token", &token], &[]);

    let connected = json_line(&listener.expect_line(PROMPT));
    assert_message(&connected, "connected");
    assert_eq!(connected["payload"]["user_id"], "carol");
    gw.wait_active_connections(1);

    // A pretty-printed payload still comes out as one line, bytes otherwise kept.
    let published =
        "{\"type\":\"order_shipped\",\n \"payload\":{\"order_id\":42,\n \"items\":[1,2]}}";
    assert_eq!(redis.notify("carol", published), 1);
    let msg = json_line(&listener.expect_line(PROMPT));
    assert_message(&msg, "order_shipped");
    assert_eq!(msg["payload"], json!({"order_id": 42, "items": [1, 2]}));

    assert_eq!(
        redis.notify("carol", r#"{"type":"second","payload":"x"}"#),
        1
    );
    let msg = json_line(&listener.expect_line(PROMPT));
    assert_message(&msg, "second");
    assert_eq!(msg["payload"], "x");

    // Server shutdown: close 1001 is not a normal close, so exit 1.
    gw.signal(libc::SIGTERM);
    assert_eq!(listener.expect_exit(secs(30)), Some(1));
    assert!(
        listener.stderr().contains("closed: 1001"),
        "stderr: {}",
        listener.stderr()
    );
}

#[test]
fn listen_answers_pings() {
    // A raw client that never answers pings is the yardstick: once the gateway
    // has dropped it for a missed pong (1 s ping interval + 2 s pong wait, by
    // the gateway's own clock, however loaded the machine), listen, connected
    // before it, has been through the same pings and must still be there.
    let (redis, gw) = setup(&[("WS_PING_INTERVAL", "1s"), ("WS_PONG_WAIT", "2s")]);
    let token = gw.token("dora");
    let mut listener = listen(&gw, &[], &[("WS_TOKEN", &token)]);
    json_line(&listener.expect_line(PROMPT));
    gw.wait_active_connections(1);
    let mut silent = RawWs::open(gw.port, &gw.token("silent"));
    assert!(
        silent.wait_gone(secs(30)),
        "the gateway never dropped a client that does not answer pings"
    );
    assert_eq!(
        gw.metric(r#"ws_notify_disconnects_total{reason="pong_timeout"}"#),
        1.0,
        "only the silent client missed its pongs"
    );
    assert_eq!(gw.active_connections(), 1, "listen was dropped");
    assert_eq!(redis.notify("dora", r#"{"type":"still_here"}"#), 1);
    let msg = json_line(&listener.expect_line(PROMPT));
    assert_message(&msg, "still_here");
    assert_eq!(msg["payload"], Value::Null);
    assert!(listener.wait(secs(0)).is_none(), "listen exited");
}

#[test]
fn listen_closes_normally_and_exits_0_on_ctrl_c() {
    let (redis, gw) = setup(&[]);
    let mut listener = listen(&gw, &["--token", &gw.token("ivan")], &[]);
    json_line(&listener.expect_line(PROMPT));
    gw.wait_active_connections(1);
    assert_eq!(redis.notify("ivan", r#"{"type":"before","payload":1}"#), 1);
    assert_message(&json_line(&listener.expect_line(PROMPT)), "before");

    send_signal(listener.pid(), libc::SIGINT);
    assert_eq!(listener.expect_exit(secs(30)), Some(0), "exit code");
    let stderr = listener.stderr();
    assert!(
        stderr.contains("interrupted: sent close 1000; closed: 1000"),
        "stderr: {stderr}"
    );
    // The gateway saw a close frame from the client (not a dropped socket).
    gw.wait_metric_at_least(
        r#"ws_notify_disconnects_total{reason="client_closed"}"#,
        1.0,
    );
    assert_eq!(
        gw.metric(r#"ws_notify_disconnects_total{reason="connection_lost"}"#),
        0.0
    );
    gw.wait_active_connections(0);
}

#[test]
fn listen_exits_1_with_4001_when_the_token_expires() {
    let (_redis, gw) = setup(&[]);
    let short = token(&gw.secret, "erin", 2);
    // Token from the environment this time.
    let mut listener = listen(&gw, &[], &[("WS_TOKEN", &short)]);
    let connected = json_line(&listener.expect_line(PROMPT));
    assert_eq!(connected["type"], "connected");
    assert_eq!(listener.expect_exit(secs(30)), Some(1));
    let stderr = listener.stderr();
    assert!(
        stderr.contains("closed: 4001 token expired"),
        "stderr: {stderr}"
    );
    gw.wait_active_connections(0);
}

#[test]
fn listen_reports_a_refused_upgrade() {
    let (_redis, gw) = setup(&[]);
    let bad = token("not-the-secret", "frank", 3600);
    let mut listener = listen(&gw, &["--token", &bad], &[]);
    assert_eq!(listener.expect_exit(secs(30)), Some(1));
    let stderr = listener.stderr();
    assert!(
        stderr.contains("HTTP 401") && stderr.contains("invalid or expired token"),
        "stderr: {stderr}"
    );

    // Nothing listening: exit 1 as well.
    let closed = format!("ws://127.0.0.1:{}/ws", free_port());
    let out = run(&["listen", "--url", &closed, "--token", "x"], &[]);
    assert_eq!(out.code, Some(1), "{out:?}");
}

#[test]
fn listen_usage_errors_exit_2() {
    for (args, expect) in [
        (&["listen"][..], "no token"),
        (&["listen", "--url", "wss://h/ws", "--token", "t"], "wss://"),
        (
            &["listen", "--url", "http://h/ws", "--token", "t"],
            "not a ws:// URL",
        ),
        (&["listen", "--token", "t", "extra"], "unexpected argument"),
    ] {
        let out = run(args, &[]);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(out.stderr.contains(expect), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("Usage: ws-notify listen"),
            "{}",
            out.stderr
        );
    }
}

// ---------------------------------------------------------------------------
// publish
// ---------------------------------------------------------------------------

fn redis_env(redis: &RedisServer) -> [(&'static str, String); 2] {
    [
        ("REDIS_HOST", "127.0.0.1".to_string()),
        ("REDIS_PORT", redis.port.to_string()),
    ]
}

#[test]
fn publish_delivers_to_a_connected_client() {
    let (redis, gw) = setup(&[]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("gina"));
    let env = redis_env(&redis);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = run(
        &[
            "publish",
            "gina",
            "invoice_paid",
            r#"{"invoice":"INV-7","amount":120.50}"#,
        ],
        &env,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), "1", "receiver count");

    // The payload arrives byte for byte (120.50 is not re-serialised as 120.5).
    let text = recv_text(&mut ws, PROMPT);
    assert!(
        text.starts_with(
            r#"{"type":"invoice_paid","payload":{"invoice":"INV-7","amount":120.50},"timestamp":""#
        ),
        "{text}"
    );
    assert_message(&json_line(&text), "invoice_paid");

    // Payload omitted: null.
    let out = run(&["publish", "gina", "ping_only"], &env);
    assert_eq!(out.code, Some(0), "{out:?}");
    let msg = recv_json(&mut ws, PROMPT);
    assert_message(&msg, "ping_only");
    assert_eq!(msg["payload"], Value::Null);
}

#[test]
fn publish_uses_the_configured_prefix_and_redis_url() {
    let prefix = [("REDIS_CHANNEL_PREFIX", "app:notify:")];
    let redis = RedisServer::start_with_auth(None, "pub-pass");
    let url = redis.url();
    let mut gw_env = prefix.to_vec();
    gw_env.push(("REDIS_URL", &url));
    let gw = Gateway::start(redis.port, &gw_env);
    gw.wait_redis_connected(PROMPT);
    let (mut ws, _) = ws_open(gw.port, &gw.token("user:with:colons"));
    let out = run(
        &["publish", "--", "user:with:colons", "t", "-1.5e3"],
        &gw_env,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), "1");
    let text = recv_text(&mut ws, PROMPT);
    assert!(text.contains(r#""payload":-1.5e3"#), "{text}");
}

#[test]
fn publish_failures() {
    // Not JSON: refused before touching Redis.
    let out = run(&["publish", "u", "t", "{not json"], &[]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("not JSON"), "{}", out.stderr);
    let out = run(&["publish", "u"], &[]);
    assert_eq!(out.code, Some(2), "{out:?}");
    let out = run(&["publish", "u", "t", "1", "2"], &[]);
    assert_eq!(out.code, Some(2), "{out:?}");

    // Redis not there: exit 1 naming the address.
    let port = free_port().to_string();
    let out = run(
        &["publish", "u", "t", "{}"],
        &[("REDIS_HOST", "127.0.0.1"), ("REDIS_PORT", &port)],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!("127.0.0.1:{port}")),
        "{}",
        out.stderr
    );

    // A bad configuration variable: exit 2 naming it.
    let out = run(&["publish", "u", "t", "{}"], &[("REDIS_PORT", "nope")]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("REDIS_PORT"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------
// healthcheck
// ---------------------------------------------------------------------------

#[test]
fn healthcheck_healthy_degraded_and_closed() {
    let (mut redis, gw) = setup(&[]);
    let url = format!("http://127.0.0.1:{}/health", gw.port);
    let out = run(&["healthcheck", "--url", &url], &[]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("200"), "{out:?}");
    assert!(out.stdout.contains(r#""status":"healthy""#), "{out:?}");

    // The default URL comes from WS_HOST/WS_PORT, as in the container.
    let port = gw.port.to_string();
    let out = run(
        &["healthcheck"],
        &[("WS_HOST", "0.0.0.0"), ("WS_PORT", &port)],
    );
    assert_eq!(out.code, Some(0), "{out:?}");

    // Redis gone: /health says 503 degraded, the check fails.
    redis.kill();
    wait_until(PROMPT, "/health is 503", || gw.health().0 == 503);
    let out = run(&["healthcheck", "--url", &url], &[]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.contains("503") && out.stdout.contains("degraded"),
        "{out:?}"
    );

    // Nothing listening: exit 1.
    let closed = free_port().to_string();
    let out = run(&["healthcheck"], &[("WS_PORT", &closed)]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("refused"), "{out:?}");
}

#[test]
fn healthcheck_follows_ws_admin_addr() {
    let redis = RedisServer::start();
    let admin_port = free_port();
    let admin = format!("0.0.0.0:{admin_port}");
    let gw = Gateway::start(redis.port, &[("WS_ADMIN_ADDR", admin.as_str())]);
    wait_until(PROMPT, "healthy on the admin port", || {
        health(admin_port).0 == 200
    });
    // The main port answers /health 404 now; the default goes to the admin port.
    let port = gw.port.to_string();
    let env = [
        ("WS_PORT", port.as_str()),
        ("WS_ADMIN_ADDR", admin.as_str()),
    ];
    let out = run(&["healthcheck"], &env);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(r#""status":"healthy""#), "{out:?}");
}

#[test]
fn healthcheck_times_out_on_a_silent_server() {
    // A listener that accepts but never answers: exit 1 once its 2 s are up
    // (never sooner; how much later depends on the machine's load, and `run`
    // bounds it).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/health", silent.local_addr().expect("local_addr"));
    let started = std::time::Instant::now();
    let out = run(&["healthcheck", "--url", &url], &[]);
    let took = started.elapsed();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("no answer within 2000 ms"), "{out:?}");
    assert!(took >= ms(1900), "gave up after {took:?}");
}

#[test]
fn healthcheck_usage_errors_exit_2() {
    for args in [
        &["healthcheck", "--url", "https://h/health"][..],
        &["healthcheck", "--url"],
        &["healthcheck", "extra"],
    ] {
        let out = run(args, &[]);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
    }
    let out = run(&["healthcheck"], &[("WS_PORT", "99999")]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("WS_PORT"), "{out:?}");
}

// ---------------------------------------------------------------------------
// --help, --version, bad arguments
// ---------------------------------------------------------------------------

#[test]
fn help_and_version() {
    for flag in ["--help", "-h", "help"] {
        let out = run(&[flag], &[]);
        assert_eq!(out.code, Some(0), "{flag}: {out:?}");
        for command in ["serve", "token", "listen", "publish", "healthcheck"] {
            assert!(
                out.stdout.contains(command),
                "{flag}: no {command} in {}",
                out.stdout
            );
        }
        assert!(out.stderr.is_empty(), "{flag}: stderr {:?}", out.stderr);
    }
    for flag in ["--version", "-V"] {
        let out = run(&[flag], &[]);
        assert_eq!(out.code, Some(0), "{out:?}");
        assert_eq!(
            out.stdout.trim(),
            format!("ws-notify {}", env!("CARGO_PKG_VERSION"))
        );
    }
    for command in ["serve", "token", "listen", "publish", "healthcheck"] {
        let out = run(&[command, "--help"], &[]);
        assert_eq!(out.code, Some(0), "{command} --help: {out:?}");
        assert!(
            out.stdout
                .starts_with(&format!("Usage: ws-notify {command}"))
                || (command == "serve" && out.stdout.starts_with("Usage: ws-notify [serve]")),
            "{command} --help: {}",
            out.stdout
        );
        let out = run(&["help", command], &[]);
        assert_eq!(out.code, Some(0), "help {command}: {out:?}");
    }
}

#[test]
fn bad_arguments_print_usage_and_exit_2() {
    for args in [
        &["--bogus"][..],
        &["frobnicate"],
        &["serve", "now"],
        &["serve", "--port", "1"],
        &["help", "nothing"],
    ] {
        let out = run(args, &[]);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: stdout {:?}", out.stdout);
        assert!(
            out.stderr.contains("Usage:"),
            "{args:?}: stderr {:?}",
            out.stderr
        );
    }
}

#[test]
fn serve_subcommand_runs_the_server() {
    // `ws-notify serve` behaves as no arguments: a bad configuration is exit 2
    // naming the variable (the server starts for real in every other test).
    let out = run(&["serve"], &[("WS_PORT", "0x50"), ("JWT_SECRET_KEY", "s")]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("WS_PORT"), "{out:?}");
    let out = run(&[], &[("WS_PORT", "0x50"), ("JWT_SECRET_KEY", "s")]);
    assert_eq!(out.code, Some(2), "{out:?}");

    // And it serves.
    let redis = RedisServer::start();
    let port = free_port();
    let port_text = port.to_string();
    let redis_port = redis.port.to_string();
    let mut server = Proc::spawn(
        "ws-notify serve",
        cli(
            &["serve"],
            &[
                ("WS_HOST", "127.0.0.1"),
                ("WS_PORT", &port_text),
                ("REDIS_HOST", "127.0.0.1"),
                ("REDIS_PORT", &redis_port),
                ("JWT_SECRET_KEY", "serve-secret"),
                ("SHUTDOWN_TIMEOUT", "2s"),
            ],
        ),
    );
    wait_until(secs(15), "serve answers /health with 200", || {
        try_http(port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n", secs(1))
            .is_ok_and(|r| r.status == 200)
    });
    let (ws, hello) = ws_open(port, &token("serve-secret", "hank", 60));
    assert_eq!(hello["user_id"], "hank");
    drop(ws);
    send_signal(server.pid(), libc::SIGTERM);
    assert_eq!(server.expect_exit(secs(30)), Some(0));
}
