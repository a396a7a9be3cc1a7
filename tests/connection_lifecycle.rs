//! An open connection's life: client frames, close codes, token expiry, slow
//! clients and keep-alive (README: "Protocol" and "Close codes").

mod common;

use std::time::Instant;

use common::*;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn ping_frame_gets_a_pong_frame() {
    let (_redis, gw) = setup(&[]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .expect("send ping");
    let deadline = Instant::now() + PROMPT;
    loop {
        match recv_message(&mut ws, deadline.saturating_duration_since(Instant::now())) {
            Some(Message::Pong(data)) => {
                assert_eq!(
                    &data[..],
                    b"are you there",
                    "pong must echo the ping's data"
                );
                break;
            }
            Some(Message::Ping(_)) => {}
            Some(other) => panic!("expected a pong, got {other:?}"),
            None => panic!("no pong"),
        }
    }
}

#[test]
fn text_ping_gets_a_pong_message() {
    let (_redis, gw) = setup(&[]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    send_text(&mut ws, r#"{"type":"ping"}"#);
    let text = recv_text(&mut ws, PROMPT);
    assert!(text.contains(r#""payload":null"#), "{text}");
    let msg: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_message(&msg, "pong");
}

#[test]
fn other_client_messages_are_ignored() {
    let (redis, gw) = setup(&[]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    send_text(&mut ws, "hello");
    send_text(&mut ws, r#"{"type":"subscribe","payload":1}"#);
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .expect("send binary");
    // Still open, and the next message is the published one.
    redis.notify("alice", r#"{"type":"after","payload":1}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "after");
    send_text(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "pong");
}

#[test]
fn client_close_is_answered_and_the_connection_removed() {
    let (_redis, gw) = setup(&[]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    gw.wait_active_connections(1);
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .expect("close");
    let (code, _) = expect_close(&mut ws, PROMPT);
    assert_eq!(code, 1000, "close reply code");
    gw.wait_empty();
}

#[test]
fn too_big_message_closes_with_1009() {
    let (_redis, gw) = setup(&[("WS_MAX_MESSAGE_SIZE", "512")]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    // 512 bytes is allowed.
    send_text(&mut ws, &"a".repeat(512));
    send_text(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "pong");
    send_text(&mut ws, &"a".repeat(1000));
    let (code, _) = expect_close(&mut ws, PROMPT);
    assert_eq!(code, 1009);
    gw.wait_active_connections(0);

    // Binary data frames have the same limit.
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    ws.send(Message::Binary(vec![0u8; 1000].into()))
        .expect("send binary");
    assert_eq!(expect_close(&mut ws, PROMPT).0, 1009);
}

/// Client frames that break RFC 6455, each on its own connection to one gateway,
/// and the close code each must get.
#[test]
fn protocol_violations_close_with_the_rfc_code() {
    // What the client sends, and the close code RFC 6455 asks for.
    let mut fragments = masked_frame(0x01, &[b'a'; 300]);
    fragments.extend(masked_frame(0x00, &[b'a'; 300]));
    fragments.extend(masked_frame(0x80, &[b'a'; 300]));
    let cases: [(&str, Vec<u8>, u16); 6] = [
        ("unmasked frame", client_frame(0x81, b"hi", None), 1002),
        ("reserved opcode 3", masked_frame(0x83, b"??"), 1002),
        // Without a negotiated extension (RFC 6455 section 5.2).
        ("RSV1 set", masked_frame(0xc1, b"hi"), 1002),
        // Control frames carry at most 125 bytes (RFC 6455 section 5.5).
        ("200-byte ping", masked_frame(0x89, &[b'p'; 200]), 1002),
        (
            "invalid UTF-8 text",
            masked_frame(0x81, &[b'o', b'k', 0xff, 0xfe]),
            1007,
        ),
        // Each fragment is under WS_MAX_MESSAGE_SIZE; the message is not.
        ("900 bytes in three fragments", fragments, 1009),
    ];
    let (_redis, gw) = setup(&[("WS_MAX_MESSAGE_SIZE", "512")]);
    for (what, bytes, expected) in cases {
        let mut raw = RawWs::open(gw.port, &gw.token("alice"));
        raw.send_raw(&bytes).expect("write");
        let (code, reason) = raw.expect_close(PROMPT);
        assert_eq!(code, expected, "{what}: close {code} {reason:?}");
        assert!(raw.wait_gone(PROMPT), "{what}: connection not closed");
        gw.wait_active_connections(0);
    }
}

#[test]
fn fragmented_message_is_reassembled() {
    let (_redis, gw) = setup(&[]);
    let mut raw = RawWs::open(gw.port, &gw.token("alice"));
    raw.send_masked(0x01, br#"{"type":"#)
        .expect("first fragment");
    // A control frame may come between fragments (RFC 6455 section 5.4).
    raw.send_masked(0x89, b"mid")
        .expect("ping between fragments");
    raw.send_masked(0x80, br#""ping"}"#).expect("last fragment");
    let mut got_pong_frame = false;
    let deadline = Instant::now() + PROMPT;
    loop {
        match raw.read_event(deadline.saturating_duration_since(Instant::now())) {
            RawEvent::Frame {
                opcode: 0xa,
                payload,
            } => {
                assert_eq!(payload, b"mid");
                got_pong_frame = true;
            }
            RawEvent::Frame { opcode: 1, payload } => {
                let v: serde_json::Value = serde_json::from_slice(&payload).expect("JSON");
                assert_eq!(v["type"], "pong", "{v}");
                break;
            }
            RawEvent::Frame { opcode: 9, .. } => {}
            RawEvent::Frame { opcode, .. } => panic!("unexpected opcode {opcode}"),
            _ => panic!("no pong message for the fragmented ping"),
        }
    }
    assert!(
        got_pong_frame,
        "the ping between fragments was not answered before the message"
    );
}

#[test]
fn raw_client_text_ping_works() {
    // The hand-made client is a valid client when it masks its frames.
    let (_redis, gw) = setup(&[]);
    let mut raw = RawWs::open(gw.port, &gw.token("alice"));
    raw.send_masked(0x81, br#"{"type":"ping"}"#).expect("write");
    match raw.read_event(PROMPT) {
        RawEvent::Frame { opcode: 1, payload } => {
            let v: serde_json::Value = serde_json::from_slice(&payload).expect("JSON");
            assert_eq!(v["type"], "pong");
        }
        _ => panic!("expected the pong text frame"),
    }
    raw.send_masked(0x88, &1000u16.to_be_bytes())
        .expect("write close");
    let (code, _) = raw.expect_close(PROMPT);
    assert_eq!(code, 1000);
    assert!(
        raw.wait_gone(PROMPT),
        "server should close the TCP connection after the close handshake"
    );
}

#[test]
fn token_expiry_closes_with_4001() {
    let (_redis, gw) = setup(&[]);
    let start = Instant::now();
    let (mut ws, _) = ws_open(gw.port, &token(&gw.secret, "alice", 2));
    let (code, reason) = expect_close(&mut ws, secs(30));
    let elapsed = start.elapsed();
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    assert!(
        elapsed >= ms(900),
        "closed after {elapsed:?}, before the token expired"
    );
    gw.wait_active_connections(0);
}

#[test]
fn slow_client_is_closed_with_4008_while_a_reading_one_gets_everything() {
    let (redis, gw) = setup(&[
        ("WS_SEND_BUFFER", "4"),
        ("WS_WRITE_WAIT", "500ms"),
        ("LOGGER_LEVEL", "info"),
    ]);
    // The slow client reads its `connected` message and then nothing more.
    let (mut slow, _) = ws_open(gw.port, &gw.token("alice"));
    let (mut fast, _) = ws_open(gw.port, &gw.token("alice"));
    gw.wait_active_connections(2);

    let filler = "x".repeat(64 * 1024);
    let full = r#"ws_notify_deliveries_dropped_total{reason="buffer_full"}"#;
    let slow_disconnect = r#"ws_notify_disconnects_total{reason="slow_client"}"#;
    let mut sent = 0u32;
    let mut saw_drop = false;
    // Publish one message at a time and let the reading client take each one,
    // so only the client that never reads falls behind.
    while sent < 600 {
        redis.notify(
            "alice",
            format!(r#"{{"type":"bulk","payload":{{"seq":{sent},"fill":"{filler}"}}}}"#),
        );
        let msg = recv_json(&mut fast, PROMPT);
        assert_eq!(
            msg["payload"]["seq"], sent,
            "the reading client must get every message in order"
        );
        sent += 1;
        if sent.is_multiple_of(8) {
            let text = gw.metrics_text();
            if metric_value(&text, full).unwrap_or(0.0) >= 1.0 {
                saw_drop = true;
            }
            if saw_drop && metric_value(&text, slow_disconnect).unwrap_or(0.0) >= 1.0 {
                break;
            }
        }
    }
    assert!(
        saw_drop,
        "no buffer-full drop after {sent} messages of 64 KiB; /metrics:\n{}",
        gw.metrics_text()
    );
    gw.wait_metric_at_least(slow_disconnect, 1.0);
    gw.wait_active_connections(1);

    // The slow client now reads what the kernel still holds, then sees 4008 or
    // the end of the connection; what it got is an in-order prefix.
    slow.get_mut()
        .set_read_timeout(Some(ms(20)))
        .expect("timeout");
    let mut last_seq: i64 = -1;
    let deadline = Instant::now() + secs(10);
    let end = loop {
        assert!(
            Instant::now() < deadline,
            "slow client neither closed nor at EOF"
        );
        match slow.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("JSON");
                let seq = v["payload"]["seq"].as_i64().expect("seq");
                assert!(seq > last_seq, "out of order: {seq} after {last_seq}");
                last_seq = seq;
            }
            Ok(Message::Close(frame)) => break frame.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break None,
        }
    };
    eprintln!("slow client: {sent} published, read up to seq {last_seq}, close code {end:?}");
    if let Some(code) = end {
        assert_eq!(code, 4008, "slow client close code");
    }
    assert!(
        last_seq < i64::from(sent) - 1,
        "the slow client got everything ({last_seq}), so it was not slow"
    );

    // The reading connection is unaffected.
    redis.notify("alice", r#"{"type":"after","payload":1}"#);
    assert_eq!(recv_json(&mut fast, PROMPT)["type"], "after");
}

#[test]
fn keepalive_pings_a_reading_client_which_stays_connected() {
    let (_redis, gw) = setup(&[("WS_PING_INTERVAL", "200ms"), ("WS_PONG_WAIT", "600ms")]);
    let (mut ws, _) = ws_open(gw.port, &gw.token("alice"));
    // Four pings span 800 ms of the gateway's clock, past the 600 ms pong wait
    // of the first: had the pongs not counted, it would have dropped us.
    let mut pings = 0;
    wait_until(secs(30), "four pings", || {
        // Reading answers pings with pongs (tungstenite does that for us).
        match recv_message(&mut ws, ms(100)) {
            Some(Message::Ping(_)) => pings += 1,
            Some(other) => panic!("unexpected {other:?}"),
            None => {}
        }
        pings >= 4
    });
    send_text(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "pong");
    assert_eq!(gw.active_connections(), 1);
}

#[test]
fn keepalive_drops_a_silent_client() {
    let (_redis, gw) = setup(&[("WS_PING_INTERVAL", "200ms"), ("WS_PONG_WAIT", "600ms")]);
    let mut raw = RawWs::open(gw.port, &gw.token("alice"));
    let start = Instant::now();
    // It never reads or writes; the gateway gives up on it.
    gw.wait_active_connections(1);
    wait_until(secs(30), "the silent client is dropped", || {
        gw.active_connections() == 0
    });
    assert!(
        start.elapsed() >= ms(500),
        "dropped after {:?}, before WS_PONG_WAIT",
        start.elapsed()
    );
    assert!(
        raw.wait_gone(PROMPT),
        "the socket of the silent client is still open"
    );
}

#[test]
fn keepalive_counts_any_client_frame_as_alive() {
    let (_redis, gw) = setup(&[("WS_PING_INTERVAL", "200ms"), ("WS_PONG_WAIT", "1s")]);
    let mut raw = RawWs::open(gw.port, &gw.token("alice"));
    // Sends a text ping every 100 ms and never answers pings. Eight pings span
    // 1.6 s of the gateway's clock, past the 1 s pong wait: still alive.
    let mut pings = 0;
    while pings < 8 {
        raw.send_masked(0x81, br#"{"type":"ping"}"#).expect("write");
        let tick = Instant::now() + ms(100);
        while let Some(left) = tick.checked_duration_since(Instant::now()) {
            match raw.read_event(left) {
                RawEvent::Frame { opcode: 9, .. } => pings += 1,
                RawEvent::Frame { .. } => {}
                RawEvent::Timeout => break,
                RawEvent::Eof => panic!("dropped after {pings} pings although it kept sending"),
                RawEvent::Error(e) => panic!("dropped after {pings} pings: {e}"),
            }
        }
    }
    assert_eq!(gw.active_connections(), 1);
}
