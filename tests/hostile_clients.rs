//! Hostile and broken clients (issue 3): every attack gets a defined answer,
//! the gateway keeps serving everyone else (a normal client still connects and
//! gets its message afterwards), and repeating an attack does not grow the
//! process's memory (`ws_notify_resident_memory_bytes`, with a generous band).
//!
//! What `http_contract.rs` and `connection_lifecycle.rs` already cover (unmasked
//! frames, reserved bits and opcodes, big control frames, invalid UTF-8 text,
//! 1009, head over 8 KiB, pieces of 7 bytes, `alg: none`, expiry, nbf, iss/aud,
//! bad user claims, 503/429, slow clients' 4008) is extended here, not repeated.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const MIB: f64 = 1024.0 * 1024.0;
const INVALID: &str = "invalid or expired token";
const BAD_REQUEST: &str = "bad request";
const TOO_LARGE: &str = "request header too large";

/// Runs `attack` once to warm up (allocator arenas, first-use buffers), then
/// `rounds` more times, and asserts the resident memory grew by less than
/// `band_mib`.
#[track_caller]
fn assert_memory_flat(
    gw: &Gateway,
    what: &str,
    rounds: usize,
    band_mib: f64,
    mut attack: impl FnMut(usize),
) {
    attack(0);
    let before = gw.resident_bytes();
    let start = Instant::now();
    for round in 1..=rounds {
        attack(round);
    }
    let after = gw.resident_bytes();
    eprintln!(
        "{what}: {rounds} rounds in {:?}, RSS {:.1} -> {:.1} MiB",
        start.elapsed(),
        before / MIB,
        after / MIB
    );
    assert!(
        after - before < band_mib * MIB,
        "{what}: RSS grew from {:.1} to {:.1} MiB over {rounds} rounds",
        before / MIB,
        after / MIB
    );
}

/// Sends raw request bytes and returns the answer.
#[track_caller]
fn send_head(gw: &Gateway, bytes: &[u8]) -> HttpResponse {
    raw_request(gw.port, bytes)
}

/// An upgrade request for `/ws?token=<token>` with `extra` headers, as bytes.
fn upgrade_bytes(token: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    upgrade_request(&format!("/ws?token={token}"), extra).into_bytes()
}

/// Writes `bytes` on a fresh connection and expects the 101 answer; returns
/// the session.
#[track_caller]
fn upgrade_raw(port: u16, bytes: &[u8]) -> RawWs {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.write_all(bytes).expect("write upgrade");
    let (resp, leftover) =
        read_http_response(&mut stream, Instant::now() + PROMPT).expect("read upgrade response");
    assert_eq!(resp.status, 101, "upgrade refused: {resp:?}");
    assert_eq!(
        resp.header("sec-websocket-accept"),
        Some(SAMPLE_ACCEPT),
        "{resp:?}"
    );
    RawWs::from_upgraded(stream, leftover)
}

// ---- request heads ------------------------------------------------------------

#[test]
fn request_head_in_one_byte_writes_upgrades() {
    let (redis, gw) = setup(&[]);
    let request = upgrade_bytes(&gw.token("alice"), &[("Origin", "https://app.example")]);
    let mut stream = TcpStream::connect(("127.0.0.1", gw.port)).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let start = Instant::now();
    for (i, byte) in request.iter().enumerate() {
        stream
            .write_all(std::slice::from_ref(byte))
            .expect("write one byte");
        // Spacing the bytes (every 4th) is the input under test: each tends to
        // arrive in its own segment and be read on its own.
        if i % 4 == 0 {
            thread::sleep(Duration::from_micros(500));
        }
    }
    let (resp, leftover) =
        read_http_response(&mut stream, Instant::now() + PROMPT).expect("response");
    assert_eq!(resp.status, 101, "{resp:?}");
    eprintln!(
        "{} bytes one at a time in {:?}",
        request.len(),
        start.elapsed()
    );
    let mut raw = RawWs::from_upgraded(stream, leftover);
    assert_eq!(raw.expect_connected(PROMPT)["payload"]["user_id"], "alice");
    raw.send_masked(0x81, br#"{"type":"ping"}"#).expect("ping");
    assert_eq!(raw.expect_json(PROMPT)["type"], "pong");
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn head_size_limit_is_exactly_8_kib() {
    let (redis, gw) = setup(&[]);
    let token = gw.token("alice");
    let base = upgrade_bytes(&token, &[("X-Pad", "")]).len();
    // A head of exactly 8192 bytes is accepted; one more byte is 431.
    let pad = "p".repeat(8192 - base);
    let head = upgrade_bytes(&token, &[("X-Pad", &pad)]);
    assert_eq!(head.len(), 8192);
    let resp = send_head(&gw, &head);
    assert_eq!(resp.status, 101, "8192-byte head: {resp:?}");
    let pad = "p".repeat(8193 - base);
    let head = upgrade_bytes(&token, &[("X-Pad", &pad)]);
    assert_eq!(head.len(), 8193);
    send_head(&gw, &head).assert_error(431, TOO_LARGE);
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn header_count_limit_is_64_and_10000_tiny_headers_are_431() {
    let (redis, gw) = setup(&[]);
    let token = gw.token("alice");
    // upgrade_request sends Host and four WebSocket headers: 5 of the 64.
    let names: Vec<String> = (0..60).map(|i| format!("X-{i}")).collect();
    let extra: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let resp = send_head(&gw, &upgrade_bytes(&token, &extra[..59]));
    assert_eq!(resp.status, 101, "64 headers: {resp:?}");
    send_head(&gw, &upgrade_bytes(&token, &extra)).assert_error(431, TOO_LARGE);

    // 10,000 headers of 6 bytes (60 KB): answered after the first 65, while the
    // client is still writing; the rest is drained, not answered with a reset.
    let mut head = format!("GET /ws?token={token} HTTP/1.1\r\nHost: x\r\n").into_bytes();
    for _ in 0..10_000 {
        head.extend_from_slice(b"A: b\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let start = Instant::now();
    send_head(&gw, &head).assert_error(431, TOO_LARGE);
    eprintln!("10,000 headers answered in {:?}", start.elapsed());
    gw.wait_metric_at_least(
        r#"ws_notify_connections_rejected_total{reason="header_too_large"}"#,
        2.0,
    );
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn nul_cr_and_lf_in_the_head() {
    let (redis, gw) = setup(&[]);
    let token = gw.token("alice");
    let good = String::from_utf8(upgrade_bytes(&token, &[])).expect("ASCII");
    let refused: Vec<(&str, Vec<u8>)> = vec![
        (
            "NUL in a header value",
            upgrade_bytes(&token, &[("X-A", "a\0b")]),
        ),
        (
            "NUL in the path",
            good.replacen("/ws?", "/ws\0?", 1).into_bytes(),
        ),
        (
            "NUL in the method",
            good.replacen("GET", "G\0T", 1).into_bytes(),
        ),
        (
            "bare CR in a header value",
            upgrade_bytes(&token, &[("X-A", "a\rb")]),
        ),
        (
            "bare LF inside a header line",
            upgrade_bytes(&token, &[("X-A", "a\nb")]),
        ),
        (
            "LF inside the request line",
            good.replacen(" HTTP/1.1", "\n HTTP/1.1", 1).into_bytes(),
        ),
    ];
    for (what, bytes) in &refused {
        let resp = send_head(&gw, bytes);
        assert_eq!(resp.status, 400, "{what}: {resp:?}");
        resp.assert_error(400, BAD_REQUEST);
    }
    // Bare LF as every line end: httparse, like most servers, takes it as a line
    // terminator (RFC 9112 section 2.2: "a recipient MAY recognize a single LF as
    // a line terminator"), so this is a valid upgrade.
    let lf_only = good.replace("\r\n", "\n");
    let mut raw = upgrade_raw(gw.port, lf_only.as_bytes());
    assert_eq!(raw.expect_connected(PROMPT)["payload"]["user_id"], "alice");
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn non_utf8_bytes_in_path_and_token() {
    let (redis, gw) = setup(&[
        ("JWT_COOKIE_NAME", "auth"),
        ("WS_ALLOWED_ORIGINS", "https://app.example"),
    ]);
    let token = gw.token("alice");
    // httparse refuses a request target that is not UTF-8: 400.
    let mut path_bytes = b"GET /ws\xff\xfe?token=".to_vec();
    path_bytes.extend_from_slice(token.as_bytes());
    path_bytes.extend_from_slice(
        b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    send_head(&gw, &path_bytes).assert_error(400, BAD_REQUEST);
    let raw_token = b"GET /ws?token=\xff\xfe.\x80\x81.\xc0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    send_head(&gw, raw_token).assert_error(400, BAD_REQUEST);
    // UTF-8 that is not ASCII is a path like any other.
    send_head(&gw, "GET /w\u{e9}s HTTP/1.1\r\nHost: x\r\n\r\n".as_bytes())
        .assert_error(404, "not found");

    // Percent-encoded non-UTF-8 in the query token: decoded, then refused as a token.
    send_head(&gw, &upgrade_bytes("%FF%FE.%80%81.%C0", &[])).assert_error(401, INVALID);
    // Header values may carry obs-text (0x80-0xFF): a token made of it is refused
    // (from a listed Origin, so that the cookie counts).
    let with_header = |name: &str, value: &[u8]| {
        let mut head =
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
            Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
            Origin: https://app.example\r\n"
                .to_vec();
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n\r\n");
        head
    };
    send_head(
        &gw,
        &with_header("Authorization", b"Bearer \xff\xfe.\x80.\x81"),
    )
    .assert_error(401, INVALID);
    send_head(&gw, &with_header("Cookie", b"auth=\xff\xfe.\x80.\x81")).assert_error(401, INVALID);
    // A valid token with obs-text in an unrelated header is a valid upgrade.
    let mut head = with_header("User-Agent", b"caf\xe9/1.0");
    let token_header = format!("Authorization: Bearer {token}\r\n\r\n");
    head.truncate(head.len() - 2);
    head.extend_from_slice(token_header.as_bytes());
    let mut raw = upgrade_raw(gw.port, &head);
    assert_eq!(raw.expect_connected(PROMPT)["payload"]["user_id"], "alice");
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn thousand_query_parameters_with_the_token_last() {
    let (redis, gw) = setup(&[]);
    let token = gw.token("alice");
    let mut path = String::from("/ws?");
    for i in 0..1000 {
        path.push_str(&format!("{}=&", (b'a' + (i % 26) as u8) as char));
    }
    path.push_str(&format!("token={token}"));
    let mut raw = upgrade_raw(gw.port, upgrade_request(&path, &[]).as_bytes());
    assert_eq!(raw.expect_connected(PROMPT)["payload"]["user_id"], "alice");
    // 3,000 empty parameters (`&&&`) and no token: 401, not a crash.
    let path = format!("/ws?{}", "&".repeat(3000));
    send_head(&gw, upgrade_request(&path, &[]).as_bytes())
        .assert_error(401, "missing token parameter");
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn upgrade_and_connection_header_variants() {
    let (redis, gw) = setup(&[]);
    let path = format!("/ws?token={}", gw.token("alice"));
    let key = ("Sec-WebSocket-Key", SAMPLE_KEY);
    let version = ("Sec-WebSocket-Version", "13");
    let accepted: &[&[(&str, &str)]] = &[
        &[("UPGRADE", "WEBSOCKET"), ("CONNECTION", "UPGRADE")],
        &[("upgrade", "WebSocket"), ("connection", "upgrade")],
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade, keep-alive"),
        ],
        &[
            ("Upgrade", "websocket"),
            ("Connection", "keep-alive,Upgrade"),
        ],
        &[
            ("Upgrade", "websocket"),
            ("Connection", " keep-alive ,\tUpgrade\t"),
        ],
        // The list split over two Connection headers (RFC 9110 section 5.3).
        &[
            ("Upgrade", "websocket"),
            ("Connection", "keep-alive"),
            ("Connection", "Upgrade"),
        ],
        // Upgrade lists protocols; websocket among them (RFC 9110 section 7.8).
        &[
            ("Upgrade", "h2c, websocket"),
            ("Connection", "Upgrade, HTTP2-Settings"),
        ],
    ];
    for headers in accepted {
        let mut all = headers.to_vec();
        all.extend([key, version]);
        let resp = send_head(&gw, request_head("GET", &path, &all).as_bytes());
        assert_eq!(resp.status, 101, "{headers:?}: {resp:?}");
        assert_eq!(resp.header("sec-websocket-accept"), Some(SAMPLE_ACCEPT));
    }
    let refused: &[&[(&str, &str)]] = &[
        &[("Upgrade", "websockets"), ("Connection", "Upgrade")],
        &[("Upgrade", "web socket"), ("Connection", "Upgrade")],
        &[("Upgrade", "websocket"), ("Connection", "Upgraded")],
        &[("Upgrade", "websocket"), ("Connection", "keep-alive")],
        &[("Upgrade", "websocket"), ("Connection", "close")],
        &[("Upgrade", "h2c"), ("Connection", "Upgrade")],
        &[("Connection", "Upgrade")],
        &[("Upgrade", "websocket")],
    ];
    for headers in refused {
        let mut all = headers.to_vec();
        all.extend([key, version]);
        let resp = send_head(&gw, request_head("GET", &path, &all).as_bytes());
        assert_eq!(resp.status, 426, "{headers:?}: {resp:?}");
        resp.assert_error(426, "websocket upgrade required");
    }
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn http_versions_other_than_1_1_are_400() {
    let (redis, gw) = setup(&[]);
    let good = String::from_utf8(upgrade_bytes(&gw.token("alice"), &[])).expect("ASCII");
    for version in ["HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "http/1.1", "HTTP/1.1x"] {
        let head = good.replacen("HTTP/1.1", version, 1);
        let resp = send_head(&gw, head.as_bytes());
        assert_eq!(resp.status, 400, "{version}: {resp:?}");
        resp.assert_error(400, BAD_REQUEST);
    }
    // A request line with no version at all (HTTP/0.9 style).
    send_head(&gw, b"GET /ws\r\n\r\n").assert_error(400, BAD_REQUEST);
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn frame_pipelined_with_the_upgrade_is_not_lost() {
    let (redis, gw) = setup(&[]);
    let ping = masked_frame(0x81, br#"{"type":"ping"}"#);
    // The request and a whole frame in one write.
    let mut bytes = upgrade_bytes(&gw.token("alice"), &[]);
    bytes.extend_from_slice(&ping);
    let mut raw = upgrade_raw(gw.port, &bytes);
    assert_eq!(raw.expect_connected(PROMPT)["type"], "connected");
    assert_eq!(raw.expect_json(PROMPT)["type"], "pong");

    // The request, two frames and half a third in one write; the rest later.
    let mut bytes = upgrade_bytes(&gw.token("alice"), &[]);
    bytes.extend_from_slice(&ping);
    bytes.extend_from_slice(&masked_frame(0x89, b"frame-ping"));
    bytes.extend_from_slice(&ping[..5]);
    let mut raw = upgrade_raw(gw.port, &bytes);
    assert_eq!(raw.expect_connected(PROMPT)["type"], "connected");
    // Both answers, in either order: the pong frame is a control reply, the
    // pong message is queued after the read.
    let (mut pong_frame, mut pong_message) = (false, false);
    while !(pong_frame && pong_message) {
        match raw.read_event(PROMPT) {
            RawEvent::Frame {
                opcode: 0xa,
                payload,
            } => {
                assert_eq!(payload, b"frame-ping");
                pong_frame = true;
            }
            RawEvent::Frame { opcode: 1, payload } => {
                let v: Value = serde_json::from_slice(&payload).expect("JSON");
                assert_eq!(v["type"], "pong", "{v}");
                pong_message = true;
            }
            _ => panic!("expected a pong frame and a pong message for the pipelined frames"),
        }
    }
    raw.send_raw(&ping[5..]).expect("rest of the frame");
    assert_eq!(raw.expect_json(PROMPT)["type"], "pong");
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn repeated_head_attacks_keep_memory_flat() {
    let (redis, gw) = setup(&[("LOGGER_LEVEL", "info")]);
    let token = gw.token("alice");
    let big_pad = "p".repeat(9000);
    let mut many = format!("GET /ws?token={token} HTTP/1.1\r\nHost: x\r\n").into_bytes();
    for _ in 0..2000 {
        many.extend_from_slice(b"A: b\r\n");
    }
    many.extend_from_slice(b"\r\n");
    let mut pipelined = upgrade_bytes(&token, &[]);
    pipelined.extend_from_slice(&masked_frame(0x81, br#"{"type":"ping"}"#));
    let attacks: Vec<(u16, Vec<u8>)> = vec![
        (431, upgrade_bytes(&token, &[("X-Pad", &big_pad)])),
        (431, many),
        (400, upgrade_bytes(&token, &[("X-A", "a\0b")])),
        (400, b"GET /ws\xff HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        (
            400,
            String::from_utf8(upgrade_bytes(&token, &[]))
                .expect("ASCII")
                .replacen("HTTP/1.1", "HTTP/1.0", 1)
                .into_bytes(),
        ),
        (401, upgrade_bytes("%FF%FE.x.y", &[])),
        (
            426,
            request_head("GET", &format!("/ws?token={token}"), &[("Upgrade", "h2c")]).into_bytes(),
        ),
        (404, b"GET /nothing HTTP/1.1\r\n\r\n".to_vec()),
    ];
    assert_memory_flat(&gw, "head attacks", 100, 6.0, |_| {
        for (status, bytes) in &attacks {
            assert_eq!(send_head(&gw, bytes).status, *status);
        }
        let mut raw = upgrade_raw(gw.port, &pipelined);
        raw.expect_connected(PROMPT);
        assert_eq!(raw.expect_json(PROMPT)["type"], "pong");
    });
    assert_serving(&redis, &gw, "bob");
}

// ---- slowloris ------------------------------------------------------------------

#[test]
fn slowloris_half_heads_are_all_closed_at_the_handshake_timeout() {
    const N: usize = 2000;
    let limit = raise_own_nofile_limit();
    assert!(
        limit >= (N + 256) as u64,
        "open-file limit {limit} too low for {N} client sockets"
    );
    let (redis, gw) = setup(&[("WS_HANDSHAKE_TIMEOUT", "2s"), ("LOGGER_LEVEL", "info")]);
    // Warm-up: one normal session before measuring memory.
    assert_serving(&redis, &gw, "warmup");
    let rss_before = gw.resident_bytes();
    let half = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: x\r\nUpgr",
        gw.token("mallory")
    );

    // A watcher thread notes when each socket sees EOF while the rest are still
    // being opened, so a slow opening phase cannot inflate the lifetimes.
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<(RawFd, Instant)>();
    let watcher = thread::spawn(move || watch_for_eof(N, &opened_rx, secs(20)));
    let start = Instant::now();
    let mut socks = Vec::with_capacity(N);
    for _ in 0..N {
        let mut s = TcpStream::connect(("127.0.0.1", gw.port)).expect("connect");
        s.write_all(half.as_bytes()).expect("write half a head");
        opened_tx
            .send((s.as_raw_fd(), Instant::now()))
            .expect("watcher alive");
        socks.push(s);
    }
    let opened = start.elapsed();
    // A normal client is served while the 2,000 hold their slots.
    assert_serving(&redis, &gw, "alice");
    let served_at = Instant::now();
    let (opened_at, closed_at) = watcher.join().expect("watcher thread");
    let open = closed_at.iter().filter(|c| c.is_none()).count();
    assert_eq!(
        open, 0,
        "{open} of {N} half-open connections still open after 20 s"
    );
    let lifetimes: Vec<Duration> = closed_at
        .iter()
        .zip(&opened_at)
        .map(|(c, o)| c.expect("closed").saturating_duration_since(*o))
        .collect();
    let shortest = *lifetimes.iter().min().expect("N > 0");
    let longest = *lifetimes.iter().max().expect("N > 0");
    let still_open_when_served = closed_at
        .iter()
        .filter(|c| c.is_some_and(|c| c > served_at))
        .count();
    eprintln!(
        "{N} half heads opened in {opened:?}; closed after {shortest:?}..{longest:?}; \
         {still_open_when_served} still open when the normal client had its message"
    );
    assert!(
        still_open_when_served >= N / 2,
        "the normal client was served only after {} half heads had timed out",
        N - still_open_when_served
    );
    // Closed at the timeout: not before it, and not much after (a loaded machine).
    assert!(
        shortest >= ms(1900),
        "a connection was closed after {shortest:?}"
    );
    assert!(
        longest <= secs(6),
        "a connection was closed only after {longest:?}"
    );
    // The server answered nothing: EOF without a byte.
    for s in socks.iter_mut().take(50) {
        assert!(wait_eof(s, ms(100)), "expected EOF");
    }
    gw.wait_metric_at_least(
        r#"ws_notify_connections_rejected_total{reason="handshake_timeout"}"#,
        N as f64,
    );
    drop(socks);
    assert_serving(&redis, &gw, "bob");
    let rss_after = gw.resident_bytes();
    eprintln!("RSS {:.1} -> {:.1} MiB", rss_before / MIB, rss_after / MIB);
    assert!(
        rss_after - rss_before < 8.0 * MIB,
        "RSS grew from {:.1} to {:.1} MiB",
        rss_before / MIB,
        rss_after / MIB
    );
}

/// Polls the sockets sent on `opened` (up to `n`, each with the time it was opened)
/// until every one has seen EOF or `limit` has passed; returns when each was opened
/// and when it closed. The sender keeps the sockets open until this returns.
fn watch_for_eof(
    n: usize,
    opened: &std::sync::mpsc::Receiver<(RawFd, Instant)>,
    limit: Duration,
) -> (Vec<Instant>, Vec<Option<Instant>>) {
    let deadline = Instant::now() + limit;
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(n);
    let mut opened_at = Vec::with_capacity(n);
    let mut closed_at: Vec<Option<Instant>> = Vec::with_capacity(n);
    let mut closed = 0;
    while closed < n && Instant::now() < deadline {
        while let Ok((fd, at)) = opened.try_recv() {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            });
            opened_at.push(at);
            closed_at.push(None);
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
        assert!(rc >= 0, "poll: {}", std::io::Error::last_os_error());
        let now = Instant::now();
        for (pfd, closed_at) in fds.iter_mut().zip(&mut closed_at) {
            if pfd.fd >= 0 && pfd.revents != 0 {
                *closed_at = Some(now);
                pfd.fd = -1;
                closed += 1;
            }
        }
    }
    (opened_at, closed_at)
}

// ---- frames ------------------------------------------------------------------------

/// A broken frame sequence and the close code RFC 6455 asks for.
struct FrameCase {
    what: &'static str,
    bytes: Vec<u8>,
    code: u16,
}

fn frame_cases() -> Vec<FrameCase> {
    let mut close_bad_utf8 = 1000u16.to_be_bytes().to_vec();
    close_bad_utf8.extend_from_slice(b"bye \xff\xfe");
    let mut fragment_then_new_message = masked_frame(0x01, b"start");
    fragment_then_new_message.extend(masked_frame(0x81, b"new message"));
    // A header announcing 2^63 - 1 bytes (a legal length, far over the limit),
    // and one with the most significant bit set (RFC 6455 5.2: "the most
    // significant bit MUST be 0").
    let mut huge = vec![0x82, 0x80 | 127];
    huge.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4]);
    let mut msb = vec![0x82, 0x80 | 127];
    msb.extend_from_slice(&(1u64 << 63).to_be_bytes());
    msb.extend_from_slice(&[1, 2, 3, 4]);
    vec![
        FrameCase {
            what: "fragmented ping (control frame without FIN)",
            bytes: masked_frame(0x09, b"frag"),
            code: 1002,
        },
        FrameCase {
            what: "fragmented close",
            bytes: masked_frame(0x08, &1000u16.to_be_bytes()),
            code: 1002,
        },
        FrameCase {
            what: "continuation without a start (final)",
            bytes: masked_frame(0x80, b"orphan"),
            code: 1002,
        },
        FrameCase {
            what: "continuation without a start (not final)",
            bytes: masked_frame(0x00, b"orphan"),
            code: 1002,
        },
        FrameCase {
            what: "new data frame inside a fragmented message",
            bytes: fragment_then_new_message,
            code: 1002,
        },
        FrameCase {
            what: "invalid UTF-8 in a close reason",
            bytes: masked_frame(0x88, &close_bad_utf8),
            code: 1007,
        },
        FrameCase {
            what: "close frame with a 1-byte payload",
            bytes: masked_frame(0x88, &[0x03]),
            code: 1002,
        },
        FrameCase {
            what: "length 2^63 - 1",
            bytes: huge,
            code: 1009,
        },
        FrameCase {
            what: "length 2^63 (MSB set)",
            bytes: msb,
            // RFC 6455 allows either: 1002 for the reserved bit, or 1009 for the
            // size. tungstenite checks the size against the limit first.
            code: 1009,
        },
    ]
}

#[test]
fn broken_frames_close_with_the_rfc_code() {
    let (redis, gw) = setup(&[]);
    for case in frame_cases() {
        let mut raw = RawWs::open(gw.port, &gw.token("alice"));
        raw.send_raw(&case.bytes).expect("write");
        let (code, reason) = raw.expect_close(PROMPT);
        assert_eq!(code, case.code, "{}: close {code} {reason:?}", case.what);
        assert!(
            raw.wait_gone(PROMPT),
            "{}: connection not closed",
            case.what
        );
    }
    gw.wait_active_connections(0);
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn close_codes_a_client_may_not_send_are_1002() {
    let (redis, gw) = setup(&[]);
    // RFC 6455 7.4.1/7.4.2: 1005, 1006 and 1015 must not be sent; 0-999 and
    // 1016-2999 (unassigned) are invalid on the wire.
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999] {
        let mut raw = RawWs::open(gw.port, &gw.token("alice"));
        raw.send_masked(0x88, &code.to_be_bytes())
            .expect("write close");
        let (reply, _) = raw.expect_close(PROMPT);
        assert_eq!(reply, 1002, "client close code {code}");
    }
    // Valid codes are echoed (3000-4999 are for libraries and applications).
    for code in [1000u16, 1001, 1003, 1011, 3000, 4999] {
        let mut raw = RawWs::open(gw.port, &gw.token("alice"));
        raw.send_masked(0x88, &code.to_be_bytes())
            .expect("write close");
        let (reply, _) = raw.expect_close(PROMPT);
        assert_eq!(reply, code, "client close code {code}");
    }
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn data_after_the_clients_close_is_ignored() {
    let (redis, gw) = setup(&[]);
    let mut raw = RawWs::open(gw.port, &gw.token("alice"));
    gw.wait_active_connections(1);
    // A close and, in the same write, a ping request that must not be answered.
    let mut bytes = masked_frame(0x88, &1000u16.to_be_bytes());
    bytes.extend(masked_frame(0x81, br#"{"type":"ping"}"#));
    bytes.extend(masked_frame(0x89, b"late ping"));
    raw.send_raw(&bytes).expect("write");
    match raw.read_event(PROMPT) {
        RawEvent::Frame { opcode: 8, payload } => {
            assert_eq!(payload.get(..2), Some(&1000u16.to_be_bytes()[..]));
        }
        RawEvent::Frame { opcode, payload } => panic!(
            "expected the close reply first, got opcode {opcode} {:?}",
            String::from_utf8_lossy(&payload)
        ),
        _ => panic!("no close reply"),
    }
    // Nothing after the close reply; more data is not answered either (the write
    // may fail: the server may have closed already).
    let _ = raw.send_raw(&masked_frame(0x81, br#"{"type":"ping"}"#));
    match raw.read_event(PROMPT) {
        RawEvent::Eof | RawEvent::Error(_) => {}
        RawEvent::Frame { opcode, payload } => panic!(
            "frame after the close reply: opcode {opcode} {:?}",
            String::from_utf8_lossy(&payload)
        ),
        RawEvent::Timeout => panic!("connection still open after the close handshake"),
    }
    gw.wait_active_connections(0);
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn repeated_broken_frames_keep_memory_flat() {
    let (redis, gw) = setup(&[("LOGGER_LEVEL", "warn")]);
    let cases = frame_cases();
    let token = gw.token("alice");
    let mut open_frames = masked_frame(0x01, &[b'a'; 400]);
    open_frames.extend(masked_frame(0x00, &[b'a'; 100]));
    assert_memory_flat(&gw, "broken frames", 200, 6.0, |round| {
        let mut raw = RawWs::open(gw.port, &token);
        if round % (cases.len() + 1) == cases.len() {
            // An unfinished fragmented message, then the client vanishes.
            raw.send_raw(&open_frames).expect("write");
            drop(raw);
            return;
        }
        let case = &cases[round % (cases.len() + 1)];
        raw.send_raw(&case.bytes).expect("write");
        assert_eq!(raw.expect_close(PROMPT).0, case.code, "{}", case.what);
    });
    gw.wait_active_connections(0);
    assert_serving(&redis, &gw, "bob");
}

// ---- tokens ------------------------------------------------------------------------

/// A file of the committed test-only key material (tests/fixtures).
fn fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/test-only-{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}

fn rs256_token(private_pem: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        claims,
        &EncodingKey::from_rsa_pem(private_pem).expect("RSA private key"),
    )
    .expect("sign RS256")
}

fn hmac_token(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret))
        .expect("sign HMAC")
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let (private, public) = (
        read_fixture("rsa-private.pem"),
        read_fixture("rsa-public.pem"),
    );
    let other_private = read_fixture("rsa-other-private.pem");
    let redis = RedisServer::start();
    let key_file = fixture("rsa-public.pem");
    let gw = Gateway::start(
        redis.port,
        &[
            ("JWT_SECRET_KEY", UNSET),
            ("JWT_PUBLIC_KEY_FILE", &key_file),
        ],
    );
    gw.wait_redis_connected(PROMPT);
    let claims = claims("alice", 3600);
    // The real thing works.
    let good = rs256_token(&private, &claims);
    let (_ws, hello) = ws_open(gw.port, &good);
    assert_eq!(hello["user_id"], "alice");

    // Algorithm confusion: HMAC keyed with the public key as the server has it.
    let public_text = String::from_utf8(public.clone()).expect("PEM is text");
    // The same key as DER: the base64 body of the PEM.
    let body: String = public_text
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM body is base64");
    let mut forged = Vec::new();
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        forged.push(hmac_token(alg, &public, &claims));
        forged.push(hmac_token(alg, public_text.trim_end().as_bytes(), &claims));
        forged.push(hmac_token(alg, &der, &claims));
    }
    forged.push(unsigned_token(&claims));
    forged.push(rs256_token(&other_private, &claims));
    for (i, t) in forged.iter().enumerate() {
        let resp = send_head(&gw, &upgrade_bytes(t, &[]));
        assert_eq!(resp.status, 401, "forged token {i}: {resp:?}");
        resp.assert_error(401, INVALID);
    }
    assert_eq!(gw.active_connections(), 1);
    let logs = gw.logs();
    for t in forged.iter().chain([&good]) {
        assert_token_not_in(&logs, t);
    }
}

/// Fails if the token, or any of its parts longer than 10 characters, is in
/// `logs` (a part might be logged on its own).
#[track_caller]
fn assert_token_not_in(logs: &str, token: &str) {
    assert!(
        token.len() <= 10 || !logs.contains(token),
        "a token appears in the logs:\n{logs}"
    );
    for part in token.split('.').filter(|p| p.len() > 10) {
        assert!(
            !logs.contains(part),
            "part {part:?} of a token appears in the logs:\n{logs}"
        );
    }
}

#[test]
fn oversized_and_malformed_tokens() {
    let (redis, gw) = setup(&[
        ("JWT_COOKIE_NAME", "auth"),
        ("WS_ALLOWED_ORIGINS", "https://app.example"),
        ("LOGGER_LEVEL", "debug"),
    ]);
    let good = gw.token("alice");
    let (header, rest) = good.split_once('.').expect("JWT");
    let (payload, signature) = rest.split_once('.').expect("JWT");
    let mut tokens: Vec<String> = Vec::new();

    // 64 KiB cannot fit in the 8 KiB head however it is sent: 431 in the query,
    // in Authorization and in a cookie (the head limit comes before any look at
    // the token: README, "Connecting").
    let huge = format!("{header}.{}.{signature}", "A".repeat(64 * 1024));
    send_head(&gw, &upgrade_bytes(&huge, &[])).assert_error(431, TOO_LARGE);
    let bearer = format!("Bearer {huge}");
    send_head(
        &gw,
        request_head("GET", "/ws", &[("Authorization", &bearer)]).as_bytes(),
    )
    .assert_error(431, TOO_LARGE);
    let cookie = format!("auth={huge}");
    send_head(
        &gw,
        request_head("GET", "/ws", &[("Cookie", &cookie)]).as_bytes(),
    )
    .assert_error(431, TOO_LARGE);
    // The largest token that fits in a head is checked like any other: 401.
    let base = upgrade_bytes(&format!("{header}..{signature}"), &[]).len();
    let big = format!("{header}.{}.{signature}", "A".repeat(8192 - base));
    let head = upgrade_bytes(&big, &[]);
    assert_eq!(head.len(), 8192);
    send_head(&gw, &head).assert_error(401, INVALID);
    tokens.push(big);

    // Bad base64 and broken structure.
    let bad = [
        format!("{header}.{payload}.{}", "!!!!"),
        format!("{header}.{}.{signature}", "e30*"),
        format!("{header}.{payload}.{}=", signature),
        format!("{}.{payload}.{signature}", "eyJhbGciOiJIUzI1NiJ9%"),
        format!("{header}.{}.{signature}", base64url(b"not json")),
        format!("{header}.{}.{signature}", base64url(b"[1,2,3]")),
        format!("{}.{payload}.{signature}", base64url(b"{\"alg\":\"HS256\"")),
        // Standard-alphabet base64 (+ and /) where base64url is required.
        format!(
            "{header}.{payload}.{}",
            signature.replace('-', "+").replace('_', "/") + "+/"
        ),
        format!("{header}.{payload}"),
        format!("{header}.{payload}.{signature}.{signature}"),
        format!("{header}..{signature}"),
        "..".to_string(),
        ".".to_string(),
        "a.b.c".to_string(),
        // The right signature over a payload changed by one character.
        format!("{header}.{}X.{signature}", payload),
    ];
    for t in &bad {
        let encoded = percent_encode_all(t);
        let resp = send_head(&gw, &upgrade_bytes(&encoded, &[]));
        assert_eq!(resp.status, 401, "token {t:?}: {resp:?}");
        resp.assert_error(401, INVALID);
        tokens.push(t.clone());
    }
    // A last character that leaves non-zero padding bits (non-canonical base64).
    let mut sig = signature.to_string();
    let last = sig.pop().expect("signature");
    let flipped = if last == 'A' { 'B' } else { 'A' };
    let t = format!("{header}.{payload}.{sig}{flipped}");
    send_head(&gw, &upgrade_bytes(&t, &[])).assert_error(401, INVALID);
    tokens.push(t);

    // The good one still works, and none of the tokens was logged (debug level).
    let (mut ws, _) = ws_open(gw.port, &good);
    redis.notify("alice", r#"{"type":"ok","payload":1}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "ok");
    ws.close(None).expect("close");
    let _ = close_or_gone(&mut ws, PROMPT);
    gw.wait_active_connections(0);
    let logs = gw.logs();
    assert!(
        logs.contains("token refused"),
        "expected debug lines about refused tokens:\n{logs}"
    );
    for t in tokens.iter().chain([&good]) {
        assert_token_not_in(&logs, t);
    }
    assert_serving(&redis, &gw, "bob");
}

// ---- connection storms and slow readers ---------------------------------------------

/// Completes (or is refused) one upgrade; returns the status and the socket.
fn try_upgrade(port: u16, token: &str) -> (u16, String, TcpStream) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream
        .write_all(&upgrade_bytes(token, &[]))
        .expect("write upgrade");
    let (resp, _) =
        read_http_response(&mut stream, Instant::now() + secs(10)).expect("upgrade response");
    (resp.status, resp.body, stream)
}

#[test]
fn connection_storm_admits_exactly_the_limit() {
    const LIMIT: usize = 50;
    const CLIENTS: usize = 80;
    let (redis, gw) = setup(&[("WS_MAX_CONNECTIONS", "50"), ("LOGGER_LEVEL", "warn")]);
    let storm = |round: usize| {
        let start = Arc::new(Barrier::new(CLIENTS));
        let done = Arc::new(Barrier::new(CLIENTS + 1));
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let token = gw.token(&format!("storm{round}-{i}"));
                let (start, done) = (start.clone(), done.clone());
                let port = gw.port;
                thread::spawn(move || {
                    start.wait();
                    let (status, body, stream) = try_upgrade(port, &token);
                    // Hold the connection until every client has its answer.
                    done.wait();
                    drop(stream);
                    (status, body)
                })
            })
            .collect();
        done.wait();
        let results: Vec<(u16, String)> = handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect();
        let upgraded = results.iter().filter(|(s, _)| *s == 101).count();
        let refused: Vec<&(u16, String)> = results.iter().filter(|(s, _)| *s != 101).collect();
        assert_eq!(upgraded, LIMIT, "round {round}: {results:?}");
        for (status, body) in &refused {
            assert_eq!(*status, 503, "round {round}: {body}");
            assert_eq!(
                serde_json::from_str::<Value>(body).expect("JSON"),
                json!({"error": "connection limit reached"})
            );
        }
    };
    storm(0);
    // They all left: a new storm is admitted the same way.
    gw.wait_active_connections(0);
    storm(1);
    gw.wait_active_connections(0);
    gw.wait_metric_at_least(
        r#"ws_notify_connections_rejected_total{reason="connection_limit"}"#,
        (2 * (CLIENTS - LIMIT)) as f64,
    );
    assert_eq!(
        gw.metric(r#"ws_notify_connections_rejected_total{reason="connection_limit"}"#),
        (2 * (CLIENTS - LIMIT)) as f64
    );
    assert_serving(&redis, &gw, "bob");
}

/// A reconnect storm (every client of a restarted instance at once) waits in the
/// kernel's accept queue instead of losing SYNs: a dropped SYN costs its client a
/// one-second retransmit. The gateway is stopped while the burst arrives, so the
/// queue alone has to hold it.
#[test]
fn a_connect_burst_waits_in_the_accept_queue() {
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("read net.core.somaxconn")
        .trim()
        .parse()
        .expect("somaxconn is a number");
    // mio's own backlog is 128; the kernel admits one more than the backlog.
    let burst = somaxconn.min(1000);
    let (redis, gw) = setup(&[("LOGGER_LEVEL", "warn")]);
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], gw.port));
    gw.signal(libc::SIGSTOP);
    let mut queued = Vec::with_capacity(burst);
    let mut refused = None;
    for i in 0..burst {
        match TcpStream::connect_timeout(&address, ms(500)) {
            Ok(stream) => queued.push(stream),
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    gw.signal(libc::SIGCONT);
    if let Some((i, e)) = refused {
        panic!("connect {i} of a burst of {burst} was not queued: {e}");
    }
    // The queued connections are served once the gateway runs again.
    for (i, stream) in queued.iter_mut().enumerate().step_by(burst / 10) {
        stream
            .write_all(&upgrade_bytes(&gw.token(&format!("burst{i}")), &[]))
            .expect("write upgrade");
        let (resp, _) =
            read_http_response(stream, Instant::now() + secs(10)).expect("upgrade response");
        assert_eq!(resp.status, 101, "queued connection {i}: {}", resp.body);
    }
    drop(queued);
    assert_serving(&redis, &gw, "bob");
}

#[test]
fn a_reader_that_never_reads_costs_bounded_memory() {
    const MESSAGES: u32 = 400;
    let (redis, gw) = setup(&[
        ("WS_SEND_BUFFER", "8"),
        ("WS_WRITE_WAIT", "60s"),
        ("LOGGER_LEVEL", "info"),
    ]);
    // Reads its `connected` message, then nothing.
    let slow = RawWs::open(gw.port, &gw.token("alice"));
    let (mut fast1, _) = ws_open(gw.port, &gw.token("alice"));
    let (mut fast2, _) = ws_open(gw.port, &gw.token("alice"));
    gw.wait_active_connections(3);
    let filler = "x".repeat(64 * 1024);
    let mut publish = |seq: u32| {
        redis.notify(
            "alice",
            format!(r#"{{"type":"bulk","payload":{{"seq":{seq},"fill":"{filler}"}}}}"#),
        );
        for ws in [&mut fast1, &mut fast2] {
            let msg = recv_json(ws, PROMPT);
            assert_eq!(
                msg["payload"]["seq"], seq,
                "the reading clients get everything in order"
            );
        }
    };
    // Warm-up: the slow client's socket buffers and its queue fill up.
    for seq in 0..40 {
        publish(seq);
    }
    let before = gw.resident_bytes();
    for seq in 40..MESSAGES {
        publish(seq);
    }
    let after = gw.resident_bytes();
    let dropped = gw.metric(r#"ws_notify_deliveries_dropped_total{reason="buffer_full"}"#);
    eprintln!(
        "{MESSAGES} messages of 64 KiB; RSS {:.1} -> {:.1} MiB; {dropped} dropped for the slow client",
        before / MIB,
        after / MIB
    );
    assert!(
        dropped >= f64::from(MESSAGES / 2),
        "only {dropped} of {MESSAGES} dropped for a client that never reads"
    );
    // 8 queued frames of 64 KiB are 0.5 MiB; 25 MiB went by.
    assert!(
        after - before < 6.0 * MIB,
        "RSS grew from {:.1} to {:.1} MiB with one client that never reads",
        before / MIB,
        after / MIB
    );
    assert_eq!(
        gw.active_connections(),
        3,
        "the slow client was closed early"
    );
    drop(slow);
}
