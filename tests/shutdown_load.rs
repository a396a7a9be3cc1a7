//! Graceful shutdown under load (README, "Operations"): thousands of clients
//! each get close 1001 and the process exits 0 without waiting for
//! `SHUTDOWN_TIMEOUT` once they answer; clients that never answer hold the exit
//! until the timeout; a second signal exits at once with 1.
//!
//! `process.rs` covers the same rules with one or two clients; these cases
//! hold thousands of raw sockets (a few threads, each owning its share). One
//! table of cases, run one after another (they share the machine's 2 cores).
//!
//! No case asserts how fast the machine is: "did not wait for the timeout" is
//! shown by a timeout of an hour and an exit within a generous deadline, and
//! "waited for the timeout" by an exit no sooner than it.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Connections opened before their answers are read, per thread.
const WAVE: usize = 50;

/// A generous deadline for anything thousands of sockets wait for on a loaded
/// machine (failing only when something never happens).
const DEADLINE: Duration = Duration::from_secs(60);

/// `SHUTDOWN_TIMEOUT` for cases whose exit must not wait for it.
const NEVER: &str = "1h";

/// Opens `count` WebSocket sessions (users `<prefix>-0`...), `WAVE` requests at
/// a time, and reads each one's `connected` frame.
fn open_sessions(port: u16, tokens: &[String], count: usize) -> Vec<RawWs> {
    let mut sessions = Vec::with_capacity(count);
    while sessions.len() < count {
        let wave = WAVE.min(count - sessions.len());
        let mut pending = Vec::with_capacity(wave);
        for i in 0..wave {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let token = &tokens[(sessions.len() + i) % tokens.len()];
            stream
                .write_all(upgrade_request(&format!("/ws?token={token}"), &[]).as_bytes())
                .expect("write upgrade");
            pending.push(stream);
        }
        for mut stream in pending {
            let (resp, leftover) = read_http_response(&mut stream, Instant::now() + DEADLINE)
                .expect("upgrade response");
            assert_eq!(resp.status, 101, "{resp:?}");
            let mut raw = RawWs::from_upgraded(stream, leftover);
            raw.expect_connected(DEADLINE);
            sessions.push(raw);
        }
    }
    sessions
}

/// How a client answers the server's close frame.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnClose {
    /// Sends its close reply at once, waits for the server to close the TCP
    /// connection, then closes its own side (RFC 6455 7.1.1; what browsers do).
    Reply,
    /// Sends its close reply and keeps the TCP connection open (it "SHOULD wait
    /// for the server to close the connection" and reads nothing more).
    ReplyAndHold,
    /// Reads the close frame and never answers.
    Ignore,
}

/// `threads` threads open `per_thread` sessions each, wait at `ready`, then
/// read every session's close frame; each returns (close codes, sessions).
fn hold_clients(
    gw: &Gateway,
    threads: usize,
    per_thread: usize,
    on_close: OnClose,
    ready: Arc<Barrier>,
) -> Vec<thread::JoinHandle<(Vec<u16>, Vec<RawWs>)>> {
    let tokens: Vec<String> = (0..100).map(|i| gw.token(&format!("user{i}"))).collect();
    (0..threads)
        .map(|_| {
            let (port, tokens, ready) = (gw.port, tokens.clone(), ready.clone());
            thread::spawn(move || {
                let mut sessions = open_sessions(port, &tokens, per_thread);
                ready.wait();
                let mut codes = Vec::with_capacity(sessions.len());
                for raw in sessions.iter_mut() {
                    let (code, _) = raw.expect_close(DEADLINE);
                    codes.push(code);
                    if on_close != OnClose::Ignore {
                        // The server may have finished with this socket already.
                        let _ = raw.send_masked(0x88, &code.to_be_bytes());
                    }
                }
                if on_close == OnClose::Reply {
                    for raw in sessions.iter_mut() {
                        assert!(
                            raw.wait_gone(DEADLINE),
                            "the server kept the connection open after the close handshake"
                        );
                        // Already closed by the peer is fine.
                        let _ = raw.stream.shutdown(std::net::Shutdown::Both);
                    }
                }
                (codes, sessions)
            })
        })
        .collect()
}

#[track_caller]
fn check_nofile(clients: usize) {
    let limit = raise_own_nofile_limit();
    assert!(
        limit >= (clients + 512) as u64,
        "open-file limit {limit} is too low for {clients} client sockets"
    );
}

/// One shutdown under load.
struct Case {
    name: &'static str,
    /// Client threads, and sessions each thread holds.
    threads: usize,
    per_thread: usize,
    on_close: OnClose,
    shutdown_timeout: &'static str,
    /// A second SIGTERM once every client has its close frame.
    second_signal: bool,
    exit_code: i32,
    /// The exit comes no sooner than this after the (first) SIGTERM.
    exits_after_at_least: Duration,
}

const CASES: [Case; 4] = [
    Case {
        name: "5000 clients answer at once and close their side after the server",
        threads: 4,
        per_thread: 1250,
        on_close: OnClose::Reply,
        shutdown_timeout: NEVER,
        second_signal: false,
        exit_code: 0,
        exits_after_at_least: Duration::ZERO,
    },
    Case {
        name: "clients answer and keep their socket: the exit does not wait for them",
        // The close handshake is complete once the client answers; the server
        // closes the TCP connection first (RFC 6455 7.1.1) and does not wait
        // for the client to.
        threads: 2,
        per_thread: 250,
        on_close: OnClose::ReplyAndHold,
        shutdown_timeout: NEVER,
        second_signal: false,
        exit_code: 0,
        exits_after_at_least: Duration::ZERO,
    },
    Case {
        name: "clients that never answer hold the exit until the timeout",
        threads: 2,
        per_thread: 250,
        on_close: OnClose::Ignore,
        shutdown_timeout: "1500ms",
        second_signal: false,
        exit_code: 0,
        exits_after_at_least: Duration::from_millis(1500),
    },
    Case {
        name: "a second SIGTERM exits at once with 1 (README: Operations)",
        threads: 2,
        per_thread: 250,
        on_close: OnClose::Ignore,
        shutdown_timeout: NEVER,
        second_signal: true,
        exit_code: 1,
        exits_after_at_least: Duration::ZERO,
    },
];

#[test]
fn shutdown_under_load() {
    for case in &CASES {
        run_case(case);
    }
}

#[track_caller]
fn run_case(case: &Case) {
    let name = case.name;
    let clients = case.threads * case.per_thread;
    check_nofile(clients);
    let (redis, mut gw) = setup(&[
        ("SHUTDOWN_TIMEOUT", case.shutdown_timeout),
        ("LOGGER_LEVEL", "warn"),
    ]);
    let ready = Arc::new(Barrier::new(case.threads + 1));
    let start = Instant::now();
    let holders = hold_clients(
        &gw,
        case.threads,
        case.per_thread,
        case.on_close,
        ready.clone(),
    );
    ready.wait();
    let connected_in = start.elapsed();
    gw.wait_active_connections(clients as u64);
    // Still serving: a message reaches every connection of a user.
    assert!(
        redis.notify("user7", r#"{"type":"before","payload":1}"#) >= 1,
        "{name}: not subscribed"
    );

    let term = Instant::now();
    gw.signal(libc::SIGTERM);
    let mut holders = Some(holders);
    let mut results = Vec::new();
    if case.second_signal {
        // Every client has its 1001 (the first signal is being handled).
        results = join(holders.take().expect("not joined yet"));
        assert!(
            gw.is_running(),
            "{name}: exited before the timeout with clients that never answered"
        );
        gw.signal(libc::SIGTERM);
    }
    let status = gw
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("{name}: still running {DEADLINE:?} after SIGTERM"));
    let exited_in = term.elapsed();
    if let Some(holders) = holders {
        results = join(holders);
    }
    eprintln!(
        "{name}: {clients} clients connected in {connected_in:?}; exit {status} {exited_in:?} after SIGTERM"
    );

    let codes: Vec<u16> = results
        .iter()
        .flat_map(|(codes, _)| codes.iter().copied())
        .collect();
    assert_eq!(codes.len(), clients, "{name}");
    let not_1001: Vec<&u16> = codes.iter().filter(|c| **c != 1001).collect();
    assert!(
        not_1001.is_empty(),
        "{name}: {} clients got another close code: {:?}",
        not_1001.len(),
        &not_1001[..not_1001.len().min(10)]
    );
    assert_eq!(
        status.code(),
        Some(case.exit_code),
        "{name}: exit status {status}"
    );
    assert!(
        exited_in >= case.exits_after_at_least,
        "{name}: exited after {exited_in:?}, before {:?}",
        case.exits_after_at_least
    );
    // The sockets that were still open are closed by the exit.
    for (_, sessions) in results.iter_mut() {
        for raw in sessions.iter_mut().take(10) {
            assert!(
                raw.wait_gone(DEADLINE),
                "{name}: a socket outlived the process"
            );
        }
    }
}

/// Joins the client threads: each one's close codes and sessions.
fn join(holders: Vec<thread::JoinHandle<(Vec<u16>, Vec<RawWs>)>>) -> Vec<(Vec<u16>, Vec<RawWs>)> {
    holders
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect()
}

/// `SHUTDOWN_DRAIN=2s` with 1,000 clients: the 1001 closes are spread over the
/// window (as the clients see them: first and last at least a second apart,
/// where without a drain they all come at once) and the exit is 0.
#[test]
fn a_drain_spreads_the_closes_over_its_window() {
    const THREADS: usize = 2;
    const PER_THREAD: usize = 500;
    check_nofile(THREADS * PER_THREAD);
    let (_redis, mut gw) = setup(&[
        ("SHUTDOWN_DRAIN", "2s"),
        ("SHUTDOWN_TIMEOUT", NEVER),
        ("LOGGER_LEVEL", "warn"),
    ]);
    let tokens: Vec<String> = (0..100).map(|i| gw.token(&format!("user{i}"))).collect();
    let ready = Arc::new(Barrier::new(THREADS + 1));
    let holders: Vec<_> = (0..THREADS)
        .map(|_| {
            let (port, tokens, ready) = (gw.port, tokens.clone(), ready.clone());
            thread::spawn(move || {
                let mut sessions = open_sessions(port, &tokens, PER_THREAD);
                ready.wait();
                // Sessions are closed in the order they were accepted, which is the
                // order this thread opened them: reading in order sees each close
                // when it comes.
                let mut closes = Vec::with_capacity(sessions.len());
                for raw in sessions.iter_mut() {
                    let (code, _) = raw.expect_close(DEADLINE);
                    closes.push((code, Instant::now()));
                    // The server may have finished with this socket already.
                    let _ = raw.send_masked(0x88, &code.to_be_bytes());
                }
                closes
            })
        })
        .collect();
    ready.wait();
    gw.wait_active_connections((THREADS * PER_THREAD) as u64);

    gw.signal(libc::SIGTERM);
    let closes: Vec<(u16, Instant)> = holders
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();
    let status = gw
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("still running {DEADLINE:?} after SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert_eq!(closes.len(), THREADS * PER_THREAD);
    assert!(
        closes.iter().all(|(code, _)| *code == 1001),
        "a close other than 1001"
    );
    let first = closes.iter().map(|(_, at)| *at).min().expect("closes");
    let last = closes.iter().map(|(_, at)| *at).max().expect("closes");
    let spread = last - first;
    // Half of the closes come in the first half of the spread, give or take.
    let halfway = first + spread / 2;
    let early = closes.iter().filter(|(_, at)| *at <= halfway).count();
    eprintln!("1000 closes over {spread:?}; {early} in the first half");
    assert!(
        spread >= Duration::from_secs(1),
        "the closes came within {spread:?}: not spread over SHUTDOWN_DRAIN=2s"
    );
    assert!(
        (200..=800).contains(&early),
        "{early} of 1000 closes in the first half of {spread:?}: not spread evenly"
    );
}

/// During a drain the clients not yet closed are still served: Redis is read
/// until the last 1001 is sent.
#[test]
fn clients_waiting_in_a_drain_still_get_their_messages() {
    let (redis, mut gw) = setup(&[
        ("SHUTDOWN_DRAIN", "20s"),
        ("SHUTDOWN_TIMEOUT", NEVER),
        ("LOGGER_LEVEL", "warn"),
    ]);
    let (mut first, _) = ws_open(gw.port, &gw.token("first"));
    let (mut second, _) = ws_open(gw.port, &gw.token("second"));
    gw.wait_active_connections(2);
    gw.signal(libc::SIGTERM);
    // The first is closed at once; the second only halfway through the window.
    assert_eq!(expect_close(&mut first, PROMPT).0, 1001);
    // A reader told to stop leaves Redis within 250 ms; give it four times that
    // to show it was not told (the second client is closed only at 10 s).
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        redis.notify("second", r#"{"type":"while_draining","payload":1}"#),
        1,
        "the reader stopped before the drain ended"
    );
    assert_message(&recv_json(&mut second, PROMPT), "while_draining");
    // A second signal ends the wait (README: exits at once with 1).
    gw.signal(libc::SIGTERM);
    let status = gw.wait_exit(PROMPT).expect("exit after a second signal");
    assert_eq!(status.code(), Some(1));
}
