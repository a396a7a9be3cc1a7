//! Every message is delivered or counted, and memory stays bounded in bytes
//! (README: "Endpoints" for the metrics and their accounting, "Operations" for
//! the limits): a message read from Redis is either dropped as a message
//! (`ws_notify_messages_dropped_total`) or reaches each connection of its user,
//! where it is written to the socket (`ws_notify_messages_delivered_total`),
//! dropped for that connection (`ws_notify_deliveries_dropped_total`), or still
//! waits in its queue (`ws_notify_deliveries_queued`).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const MIB: f64 = 1024.0 * 1024.0;
const DELIVERED: &str = "ws_notify_messages_delivered_total";
const QUEUED: &str = "ws_notify_deliveries_queued";
const BUFFER_FULL: &str = r#"ws_notify_deliveries_dropped_total{reason="buffer_full"}"#;
const UNSENT_ON_CLOSE: &str = r#"ws_notify_deliveries_dropped_total{reason="unsent_on_close"}"#;
const MESSAGE_DROPS: [&str; 4] = [
    r#"ws_notify_messages_dropped_total{reason="offline_user"}"#,
    r#"ws_notify_messages_dropped_total{reason="invalid"}"#,
    r#"ws_notify_messages_dropped_total{reason="invalid_channel"}"#,
    r#"ws_notify_messages_dropped_total{reason="queue_full"}"#,
];

/// A connected TCP socket whose receive buffer was made small before the
/// connect (so the window it announces stays small): a client that reads
/// nothing fills up after a few KiB.
fn small_window_socket(port: u16) -> TcpStream {
    // SAFETY: plain socket/setsockopt/connect calls on a descriptor this function
    // owns; on success it is handed to a TcpStream, which closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let size: libc::c_int = 4096;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let error = std::io::Error::last_os_error();
        let stream = TcpStream::from_raw_fd(fd);
        assert_eq!(rc, 0, "connect: {error}");
        stream
    }
}

/// A WebSocket session on a small-window socket, `connected` already read.
#[track_caller]
fn open_small_window(gw: &Gateway, user: &str) -> RawWs {
    let mut stream = small_window_socket(gw.port);
    stream
        .write_all(upgrade_request(&format!("/ws?token={}", gw.token(user)), &[]).as_bytes())
        .expect("write upgrade");
    let (resp, leftover) =
        read_http_response(&mut stream, Instant::now() + PROMPT).expect("upgrade response");
    assert_eq!(resp.status, 101, "upgrade refused: {resp:?}");
    let mut ws = RawWs::from_upgraded(stream, leftover);
    ws.expect_connected(PROMPT);
    ws
}

/// `{"type":"bulk","payload":"xxx..."}` of about `size` bytes.
fn bulk_message(size: usize) -> Vec<u8> {
    format!(r#"{{"type":"bulk","payload":"{}"}}"#, "x".repeat(size)).into_bytes()
}

/// Publishes `count` messages round robin to `users`, `per_pipeline` PUBLISH
/// commands per write (a pipelined publisher, as a backend flushing a batch).
fn publish_pipelined(redis: &RedisServer, users: &[String], payload: &[u8], count: usize) {
    const PER_PIPELINE: usize = 16;
    let mut conn = redis.connection().expect("connect to redis");
    let mut sent = 0;
    while sent < count {
        let mut pipe = redis::pipe();
        for i in sent..count.min(sent + PER_PIPELINE) {
            pipe.cmd("PUBLISH")
                .arg(format!("user_noti:{}", users[i % users.len()]))
                .arg(payload)
                .ignore();
        }
        pipe.exec(&mut conn).expect("pipelined PUBLISH");
        sent = count.min(sent + PER_PIPELINE);
    }
}

/// A process's `VmHWM` (peak resident set) from `/proc/<pid>/status`, bytes.
fn peak_rss(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"));
    kib * 1024.0
}

/// The accounting figures of one `/metrics` answer.
struct Figures {
    received: f64,
    delivered: f64,
    queued: f64,
    buffer_full: f64,
    unsent_on_close: f64,
    message_drops: f64,
}

impl Figures {
    /// Waits until `cond` holds for the figures; fails with the last ones.
    #[track_caller]
    fn wait(
        gw: &Gateway,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&Figures) -> bool,
    ) -> Figures {
        let deadline = Instant::now() + timeout;
        loop {
            let figures = Figures::read(gw);
            if cond(&figures) {
                return figures;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting until {what}: {figures}"
            );
            thread::sleep(ms(20));
        }
    }

    fn read(gw: &Gateway) -> Figures {
        let text = gw.metrics_text();
        let value = |name: &str| {
            metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
        };
        Figures {
            received: value("ws_notify_messages_received_total"),
            delivered: value(DELIVERED),
            queued: value(QUEUED),
            buffer_full: value(BUFFER_FULL),
            unsent_on_close: value(UNSENT_ON_CLOSE),
            message_drops: MESSAGE_DROPS.iter().map(|name| value(name)).sum(),
        }
    }

    /// Messages accounted for when each has exactly one recipient connection.
    fn accounted_one_recipient(&self) -> f64 {
        self.delivered + self.queued + self.buffer_full + self.unsent_on_close + self.message_drops
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received {}, delivered {}, queued {}, buffer_full {}, unsent_on_close {}, message drops {}",
            self.received,
            self.delivered,
            self.queued,
            self.buffer_full,
            self.unsent_on_close,
            self.message_drops
        )
    }
}

/// Ten clients that never read (small receive windows), each its own user, while
/// a pipelined publisher sends 1,000 messages of 1 MiB for them: the gateway's
/// peak RSS stays far below the 1,000 MiB that went by, and every message is
/// written to its client or counted. Before `WS_SEND_BUFFER_BYTES` the queues
/// held up to 256 messages each and the peak was about 1 GiB.
#[test]
fn ten_clients_that_never_read_cost_bounded_memory_and_every_message_is_counted() {
    const CLIENTS: usize = 10;
    const MESSAGES: usize = 1000;
    // A GiB through one subscriber: Redis buffers for it without its default
    // 32 MiB pub/sub limit, so that a busy machine does not get the gateway cut
    // off (and messages lost in Redis, where nobody counts them).
    let redis = RedisServer::start_with(
        &["--client-output-buffer-limit", "pubsub", "0", "0", "0"],
        None,
        None,
    );
    let gw = Gateway::start(
        redis.port,
        &[
            // Nobody is closed for stalling while the test runs.
            ("WS_WRITE_WAIT", "5m"),
            ("WS_PONG_WAIT", "5m"),
            ("WS_PING_INTERVAL", "4m"),
            ("LOGGER_LEVEL", "info"),
        ],
    );
    gw.wait_redis_connected(PROMPT);
    let users: Vec<String> = (0..CLIENTS).map(|i| format!("reader{i}")).collect();
    let mut clients: Vec<RawWs> = users.iter().map(|u| open_small_window(&gw, u)).collect();
    gw.wait_active_connections(CLIENTS as u64);
    let start_rss = peak_rss(gw.pid());

    publish_pipelined(&redis, &users, &bulk_message(1024 * 1024), MESSAGES);
    Figures::wait(&gw, secs(60), "the gateway has read every message", |f| {
        f.received >= MESSAGES as f64
    });
    let mut figures = Figures::wait(
        &gw,
        secs(30),
        "every message is queued, written or counted",
        |f| f.accounted_one_recipient() == MESSAGES as f64,
    );
    let peak = peak_rss(gw.pid());
    eprintln!(
        "{MESSAGES} messages of 1 MiB for {CLIENTS} clients that never read: \
         peak RSS {:.1} MiB (at start {:.1} MiB); {figures}",
        peak / MIB,
        start_rss / MIB
    );
    assert!(
        peak < 128.0 * MIB,
        "peak RSS {:.1} MiB with {CLIENTS} clients that never read; {figures}",
        peak / MIB
    );
    assert_eq!(figures.received, MESSAGES as f64, "{figures}");
    assert!(
        figures.buffer_full > 0.0,
        "clients that never read had nothing dropped: {figures}"
    );

    // Now the clients read: what is queued is written, and what the gateway
    // counts as delivered is exactly what the clients get.
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = clients
        .drain(..)
        .map(|mut ws| {
            let (received, stop) = (received.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match ws.read_event(ms(100)) {
                        RawEvent::Frame { opcode: 1, .. } => {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        RawEvent::Frame { .. } | RawEvent::Timeout => {}
                        RawEvent::Eof | RawEvent::Error(_) => break,
                    }
                }
                ws
            })
        })
        .collect();
    figures = Figures::wait(&gw, secs(60), "the clients received every delivery", |f| {
        f.queued == 0.0 && received.load(Ordering::Relaxed) as f64 >= f.delivered
    });
    stop.store(true, Ordering::Relaxed);
    let clients: Vec<RawWs> = readers
        .into_iter()
        .map(|r| r.join().expect("reader thread"))
        .collect();
    assert_eq!(
        received.load(Ordering::Relaxed) as f64,
        figures.delivered,
        "frames the clients received against deliveries counted; {figures}"
    );
    drop(clients);
    gw.wait_active_connections(0);
    let end = Figures::read(&gw);
    assert_eq!(end.accounted_one_recipient(), MESSAGES as f64, "{end}");
    assert_eq!(end.queued, 0.0, "{end}");
}

/// A client that stops reading is closed with 4008; the messages still queued
/// for it then are counted as `unsent_on_close`, so written + dropped
/// deliveries add up to what was published for it, and the client gets exactly
/// the deliveries counted as written.
#[test]
fn messages_queued_on_a_connection_that_closes_are_counted() {
    let (redis, gw) = setup(&[
        ("WS_SEND_BUFFER", "8"),
        ("WS_WRITE_WAIT", "1s"),
        ("LOGGER_LEVEL", "info"),
    ]);
    let mut slow = open_small_window(&gw, "alice");
    gw.wait_active_connections(1);
    // Publish in rounds until one finds the queue full: the kernel's buffers
    // are full then, and with the client not reading the queue stays full
    // until the gateway gives up on it.
    let message = bulk_message(64 * 1024);
    let mut published = 0;
    let mut dropped = 0.0;
    for _ in 0..200 {
        publish_pipelined(&redis, &["alice".to_string()], &message, 8);
        published += 8;
        let figures = Figures::wait(&gw, PROMPT, "the gateway has read the round", |f| {
            f.received == published as f64 && f.accounted_one_recipient() == published as f64
        });
        if figures.buffer_full > dropped {
            dropped = figures.buffer_full;
            break;
        }
    }
    assert!(dropped > 0.0, "the queue never filled up");
    wait_until(secs(30), "the client is closed as slow", || {
        gw.metric(r#"ws_notify_disconnects_total{reason="slow_client"}"#) >= 1.0
    });
    // It reads at last: what was written before, then the close frame.
    let mut frames = 0u64;
    let deadline = Instant::now() + secs(30);
    let close = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match slow.read_event(left) {
            RawEvent::Frame { opcode: 1, .. } => frames += 1,
            RawEvent::Frame { opcode: 8, payload } => break payload,
            RawEvent::Frame { .. } => {}
            RawEvent::Eof => panic!("EOF before the close frame"),
            RawEvent::Error(e) => panic!("{e} before the close frame"),
            RawEvent::Timeout => panic!("no close frame within 30 s"),
        }
    };
    assert_eq!(&close[..2], &4008u16.to_be_bytes(), "close code");
    drop(slow);
    gw.wait_active_connections(0);
    let figures = Figures::read(&gw);
    eprintln!("{published} published; {figures}; the client received {frames}");
    assert_eq!(
        figures.accounted_one_recipient(),
        published as f64,
        "{figures}"
    );
    assert_eq!(figures.delivered, frames as f64, "{figures}");
    assert!(
        figures.unsent_on_close >= 1.0,
        "nothing counted as unsent when the slow client was closed: {figures}"
    );
    assert_eq!(figures.queued, 0.0, "{figures}");
}

/// Messages on a channel that carries no user id are counted and shown.
#[test]
fn messages_on_channels_without_a_user_id_are_counted() {
    let (redis, gw) = setup(&[]);
    let message = r#"{"type":"x","payload":1}"#;
    redis.publish("user_noti:", message);
    let mut conn = redis.connection().expect("connect to redis");
    redis::cmd("PUBLISH")
        .arg(&b"user_noti:\xff\xfe"[..])
        .arg(message)
        .exec(&mut conn)
        .expect("PUBLISH on a channel that is not UTF-8");
    gw.wait_metric_at_least(
        r#"ws_notify_messages_dropped_total{reason="invalid_channel"}"#,
        2.0,
    );
    let json = metrics_json(gw.port);
    assert_eq!(json["messages"]["received_from_redis"], 2, "{json}");
    assert_eq!(json["messages"]["failed"], 2, "{json}");
}
