//! Graceful shutdown under load (issue 3, "Shutdown and restarts"; DESIGN.md
//! section 5): thousands of clients each get close 1001 and the process exits
//! 0 well inside `SHUTDOWN_TIMEOUT`; clients that never answer hold the exit
//! only until the timeout; a second signal exits at once.
//!
//! `process.rs` covers the same rules with one or two clients; these tests
//! hold thousands of raw sockets (a few threads, each owning its share).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Connections opened before their answers are read, per thread.
const WAVE: usize = 50;

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
            let (resp, leftover) = read_http_response(&mut stream, Instant::now() + secs(20))
                .expect("upgrade response");
            assert_eq!(resp.status, 101, "{resp:?}");
            let mut raw = RawWs::from_upgraded(stream, leftover);
            raw.expect_connected(secs(20));
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
                    let (code, _) = raw.expect_close(secs(20));
                    codes.push(code);
                    if on_close != OnClose::Ignore {
                        // The server may have finished with this socket already.
                        let _ = raw.send_masked(0x88, &code.to_be_bytes());
                    }
                }
                if on_close == OnClose::Reply {
                    for raw in sessions.iter_mut() {
                        assert!(
                            raw.wait_gone(secs(20)),
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

#[test]
fn sigterm_with_5000_clients_closes_each_with_1001_and_exits_0() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 1250;
    const CLIENTS: usize = THREADS * PER_THREAD;
    check_nofile(CLIENTS);
    let redis = RedisServer::start();
    let mut gw = Gateway::start(
        redis.port,
        &[("SHUTDOWN_TIMEOUT", "10s"), ("LOGGER_LEVEL", "warn")],
    );
    gw.wait_redis_connected(PROMPT);
    let ready = Arc::new(Barrier::new(THREADS + 1));
    let start = Instant::now();
    let holders = hold_clients(&gw, THREADS, PER_THREAD, OnClose::Reply, ready.clone());
    ready.wait();
    let connected_in = start.elapsed();
    gw.wait_active_connections(CLIENTS as u64);
    // Still serving: a message reaches every connection of a user.
    assert!(redis.notify("user7", r#"{"type":"before","payload":1}"#) >= 1);

    let term = Instant::now();
    gw.signal(libc::SIGTERM);
    let status = gw
        .wait_exit(secs(12))
        .expect("still running 12 s after SIGTERM with SHUTDOWN_TIMEOUT=10s");
    let exited_in = term.elapsed();
    let mut codes = Vec::with_capacity(CLIENTS);
    for h in holders {
        let (c, _sessions) = h.join().expect("client thread");
        codes.extend(c);
    }
    eprintln!(
        "{CLIENTS} clients connected in {connected_in:?}; exit {status} {exited_in:?} after SIGTERM"
    );
    assert_eq!(codes.len(), CLIENTS);
    let not_1001: Vec<&u16> = codes.iter().filter(|c| **c != 1001).collect();
    assert!(
        not_1001.is_empty(),
        "{} clients got another close code: {:?}",
        not_1001.len(),
        &not_1001[..not_1001.len().min(10)]
    );
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        exited_in < secs(5),
        "took {exited_in:?} to shut down with every client answering"
    );
}

#[test]
fn clients_that_never_answer_hold_the_exit_only_until_the_timeout() {
    const THREADS: usize = 2;
    const PER_THREAD: usize = 250;
    check_nofile(THREADS * PER_THREAD);
    let redis = RedisServer::start();
    let mut gw = Gateway::start(
        redis.port,
        &[("SHUTDOWN_TIMEOUT", "1500ms"), ("LOGGER_LEVEL", "warn")],
    );
    let ready = Arc::new(Barrier::new(THREADS + 1));
    let holders = hold_clients(&gw, THREADS, PER_THREAD, OnClose::Ignore, ready.clone());
    ready.wait();
    gw.wait_active_connections((THREADS * PER_THREAD) as u64);
    let term = Instant::now();
    gw.signal(libc::SIGTERM);
    let status = gw
        .wait_exit(secs(6))
        .expect("still running 6 s after SIGTERM with SHUTDOWN_TIMEOUT=1500ms");
    let exited_in = term.elapsed();
    for h in holders {
        let (codes, _sessions) = h.join().expect("client thread");
        assert!(codes.iter().all(|c| *c == 1001), "close codes {codes:?}");
    }
    eprintln!("exit {status} {exited_in:?} after SIGTERM, nobody answering");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    // The wait for answers lasted the timeout, not longer.
    assert!(
        exited_in >= ms(1400),
        "exited after {exited_in:?}, before the timeout"
    );
    assert!(exited_in < secs(4), "exited only after {exited_in:?}");
}

#[test]
fn second_sigterm_under_load_exits_at_once_with_code_1() {
    const THREADS: usize = 2;
    const PER_THREAD: usize = 250;
    check_nofile(THREADS * PER_THREAD);
    let redis = RedisServer::start();
    let mut gw = Gateway::start(
        redis.port,
        &[("SHUTDOWN_TIMEOUT", "30s"), ("LOGGER_LEVEL", "warn")],
    );
    let ready = Arc::new(Barrier::new(THREADS + 1));
    let holders = hold_clients(&gw, THREADS, PER_THREAD, OnClose::Ignore, ready.clone());
    ready.wait();
    gw.wait_active_connections((THREADS * PER_THREAD) as u64);
    gw.signal(libc::SIGTERM);
    // Every client has its 1001 (the first signal is being handled) and none answers.
    let mut sessions = Vec::new();
    for h in holders {
        let (codes, s) = h.join().expect("client thread");
        assert!(codes.iter().all(|c| *c == 1001), "close codes {codes:?}");
        sessions.extend(s);
    }
    assert!(
        gw.is_running(),
        "exited before the timeout with clients that never answered"
    );
    let second = Instant::now();
    gw.signal(libc::SIGTERM);
    let status = gw
        .wait_exit(secs(3))
        .expect("still running 3 s after the second SIGTERM");
    let exited_in = second.elapsed();
    eprintln!("second SIGTERM: exit {status} after {exited_in:?}");
    assert!(
        exited_in < Duration::from_secs(1),
        "second signal took {exited_in:?}"
    );
    assert_eq!(
        status.code(),
        Some(1),
        "README: a second signal exits at once with code 1"
    );
    // The sockets are closed by the exit.
    for raw in sessions.iter_mut().take(20) {
        assert!(raw.wait_gone(PROMPT), "a socket outlived the process");
    }
}

#[test]
fn clients_that_answer_and_keep_their_socket_do_not_hold_the_exit() {
    // The close handshake is complete once the client answers (DESIGN.md
    // section 5: "wait for the close replies"); the server closes the TCP
    // connection first (RFC 6455 7.1.1) and does not wait for the client to.
    const THREADS: usize = 2;
    const PER_THREAD: usize = 250;
    check_nofile(THREADS * PER_THREAD);
    let redis = RedisServer::start();
    let mut gw = Gateway::start(
        redis.port,
        &[("SHUTDOWN_TIMEOUT", "10s"), ("LOGGER_LEVEL", "warn")],
    );
    let ready = Arc::new(Barrier::new(THREADS + 1));
    let holders = hold_clients(
        &gw,
        THREADS,
        PER_THREAD,
        OnClose::ReplyAndHold,
        ready.clone(),
    );
    ready.wait();
    gw.wait_active_connections((THREADS * PER_THREAD) as u64);
    let term = Instant::now();
    gw.signal(libc::SIGTERM);
    let status = gw
        .wait_exit(secs(12))
        .expect("still running 12 s after SIGTERM with SHUTDOWN_TIMEOUT=10s");
    let exited_in = term.elapsed();
    let mut sessions = Vec::new();
    for h in holders {
        let (codes, s) = h.join().expect("client thread");
        assert!(codes.iter().all(|c| *c == 1001), "close codes {codes:?}");
        sessions.extend(s);
    }
    eprintln!("exit {status} {exited_in:?} after SIGTERM, every client answering and holding");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        exited_in < secs(5),
        "took {exited_in:?}: the server waited for clients to close their side"
    );
}
