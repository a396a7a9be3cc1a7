//! The `resume` preset (README.md, "Load testing"): what a mass reconnect
//! with history costs the server.
//!
//! ```text
//!  main ── seed ── connect N (one user each) ── close all ── FCALL M messages ── reconnect all ── report
//!                   │ keep each `position`                  (pipelined)          │ `since=<position>`
//!  thread 0..T: mio Poll, connections t, t + T, ...                              └ count each replay
//! ```
//!
//! `seed` publishes one message to every user first, as a client that resumes
//! has seen one: its `position` is then an entry the stream still holds, and
//! the recovery can be complete (`since=0-0` never is).
//!
//! The preset has its own small client loop: its connections live through
//! phases that the main thread announces (`Shared::phase`), which the hold,
//! churn and soak loop of `client.rs` has no notion of. It shares that loop's
//! codec (`frame.rs`) and sockets (`sock.rs`).
//!
//! Accounting is exact and per client: message `k` goes to user `k % U`, so
//! user `u` expects `u, u + U, u + 2U, ...` in that order (the server replays
//! a user's stream in order). A jump ahead counts the skipped messages as
//! missing, a step back is a duplicate, anything else is foreign; at the end
//! what a client never reached is missing too.

use std::collections::VecDeque;
use std::error::Error;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::{Value, json};
use slab::Slab;

use crate::args::Options;
use crate::frame::{
    self, CONNECTED_PREFIX, MAX_RESPONSE_HEAD, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG,
    OP_TEXT, Upgrade,
};
use crate::histogram::Histogram;
use crate::publish::Publisher;
use crate::report::{self, CpuMark, CpuSpan};
use crate::{sock, token};

/// Phases, in order; the main thread moves `Shared::phase` forward.
const CONNECT: u8 = 0;
const CLOSE: u8 = 1;
const RECONNECT: u8 = 2;
const STOP: u8 = 3;

const POLL_TIMEOUT: Duration = Duration::from_millis(5);
const TICK: Duration = Duration::from_millis(2);
const PROGRESS_PRINT: Duration = Duration::from_secs(1);
const READ_BUFFER: usize = 64 << 10;
const CLOSE_NORMAL: [u8; 2] = 1000u16.to_be_bytes();
/// After the last client has everything, how long to keep reading for a
/// late duplicate before stopping.
const EXTRA_WAIT: Duration = Duration::from_millis(200);

/// One thread's progress, read by the main thread (single writer).
#[derive(Default)]
#[repr(align(128))]
struct Progress {
    opened: AtomicU64,
    failed: AtomicU64,
    /// `phase + 1` once every connection of that phase is open (or, in the
    /// replay, has everything) or has failed; 0 before.
    settled: AtomicU8,
    /// CLOSE: every socket of this thread is closed.
    closed: AtomicBool,
    replayed: AtomicU64,
}

struct Shared {
    phase: AtomicU8,
    threads: Vec<Progress>,
}

impl Shared {
    fn sum(&self, field: impl Fn(&Progress) -> &AtomicU64) -> u64 {
        self.threads.iter().map(|p| field(p).load(Relaxed)).sum()
    }

    fn all_closed(&self) -> bool {
        self.threads.iter().all(|p| p.closed.load(Relaxed))
    }

    fn all_settled(&self, phase: u8) -> bool {
        self.threads
            .iter()
            .all(|p| p.settled.load(Relaxed) == phase + 1)
    }

    fn wait_for_phase(&self, phase: u8) {
        while self.phase.load(SeqCst) < phase {
            thread::sleep(TICK);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Upgrading,
    AwaitConnected,
    Open,
}

struct Conn {
    stream: TcpStream,
    state: State,
    slot: usize,
    started: Instant,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
}

/// One client's replay, checked message by message.
#[derive(Default, Clone)]
struct Account {
    /// Index `j` of the next expected message `user + j * U`.
    next: u64,
    /// Messages to this user: what the replay must bring.
    expected: u64,
    /// Messages skipped over (a later one arrived first).
    gaps: u64,
    duplicates: u64,
    foreign: u64,
    /// `recovery` of the second `connected`: (complete, count).
    recovery: Option<(bool, u64)>,
    /// Has every expected message (or ended without it).
    finished: bool,
}

impl Account {
    /// Counts message `seq` for `user` (message `k` goes to user `k % users`):
    /// `true` when it is the user's last message.
    fn record(&mut self, seq: u64, user: u64, users: u64, messages: u64) -> bool {
        let j = seq / users;
        if seq % users != user || seq >= messages {
            self.foreign += 1;
            return false;
        }
        if j < self.next {
            self.duplicates += 1;
            return false;
        }
        self.gaps += j - self.next;
        self.next = j + 1;
        self.next == self.expected
    }

    /// Messages skipped over or never reached.
    fn missing(&self) -> u64 {
        self.gaps + self.expected.saturating_sub(self.next)
    }
}

/// What one thread counted.
#[derive(Default)]
struct Counts {
    opened: u64,
    /// Messages to the clients that had a position: what the replay owes.
    expected: u64,
    failed: u64,
    no_position: u64,
    resumed: u64,
    resume_failed: u64,
    lost: u64,
    replayed: u64,
    missing: u64,
    duplicates: u64,
    foreign: u64,
    complete: u64,
    incomplete: u64,
    no_recovery: u64,
    count_mismatch: u64,
    other_frames: u64,
    handshake: Histogram,
    last_open: Option<Instant>,
    last_complete: Option<Instant>,
    last_receive: Option<Instant>,
}

impl Counts {
    fn merge(&mut self, o: Counts) {
        self.opened += o.opened;
        self.expected += o.expected;
        self.failed += o.failed;
        self.no_position += o.no_position;
        self.resumed += o.resumed;
        self.resume_failed += o.resume_failed;
        self.lost += o.lost;
        self.replayed += o.replayed;
        self.missing += o.missing;
        self.duplicates += o.duplicates;
        self.foreign += o.foreign;
        self.complete += o.complete;
        self.incomplete += o.incomplete;
        self.no_recovery += o.no_recovery;
        self.count_mismatch += o.count_mismatch;
        self.other_frames += o.other_frames;
        self.handshake.merge(&o.handshake);
        self.last_open = self.last_open.max(o.last_open);
        self.last_complete = self.last_complete.max(o.last_complete);
        self.last_receive = self.last_receive.max(o.last_receive);
    }
}

/// One client thread: connections `thread, thread + threads, ...` below N.
struct Worker {
    thread: usize,
    users: u64,
    messages: u64,
    max_in_flight: usize,
    connect_timeout: Duration,
    server: SocketAddrV4,
    sources: Arc<[Ipv4Addr]>,
    requests: Arc<Vec<Box<[u8]>>>,
    shared: Arc<Shared>,
    poll: Poll,
    conns: Slab<Conn>,
    slots: Vec<usize>,
    /// Each owned slot's `position` from the first `connected` (by index in `slots`).
    positions: Vec<Option<String>>,
    accounts: Vec<Account>,
    pending: VecDeque<usize>,
    in_flight: usize,
    /// Handshaking or, in the replay, not yet finished.
    unsettled: usize,
    started: usize,
    reconnecting: bool,
    counts: Counts,
    scratch: Vec<u8>,
    rng: u64,
}

impl Worker {
    fn index(&self, slot: usize) -> usize {
        slot / self.shared.threads.len()
    }

    fn run(mut self) -> io::Result<Counts> {
        // Phase 1: connect every slot, keep its position.
        self.pending = self.slots.iter().copied().collect();
        self.unsettled = self.slots.len();
        self.drive(|w| w.unsettled == 0)?;
        self.publish_progress();
        self.shared.wait_for_phase(CLOSE);
        // Dropping the streams closes the sockets (FIN); the server sees EOF.
        self.conns.clear();
        self.in_flight = 0;
        self.shared.threads[self.thread].closed.store(true, Relaxed);
        self.shared.wait_for_phase(RECONNECT);

        // Phase 2: reconnect every slot that has a position, with `since`.
        self.reconnecting = true;
        self.pending = self
            .slots
            .iter()
            .enumerate()
            .filter(|&(i, _)| self.positions[i].is_some())
            .map(|(_, &slot)| slot)
            .collect();
        self.unsettled = self.pending.len();
        self.drive(|w| w.shared.phase.load(SeqCst) >= STOP)?;
        for (account, position) in self.accounts.iter().zip(&self.positions) {
            if position.is_some() {
                self.counts.expected += account.expected;
                self.counts.missing += account.missing();
            }
            self.counts.duplicates += account.duplicates;
            self.counts.foreign += account.foreign;
        }
        Ok(self.counts)
    }

    fn publish_progress(&self) {
        let p = &self.shared.threads[self.thread];
        let (opened, failed) = if self.reconnecting {
            (self.counts.resumed, self.counts.resume_failed)
        } else {
            (self.counts.opened, self.counts.failed)
        };
        p.opened.store(opened, Relaxed);
        p.failed.store(failed, Relaxed);
        p.replayed.store(self.counts.replayed, Relaxed);
        if self.unsettled == 0 {
            let phase = if self.reconnecting {
                RECONNECT
            } else {
                CONNECT
            };
            p.settled.store(phase + 1, Relaxed);
        }
    }

    /// Polls until `done`.
    fn drive(&mut self, done: impl Fn(&Worker) -> bool) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_scan = Instant::now() + Duration::from_millis(100);
        while !done(self) {
            self.refill();
            match self.poll.poll(&mut events, Some(POLL_TIMEOUT)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                self.handle(event.token().0, readable, event.is_writable());
            }
            let now = Instant::now();
            if now >= next_scan {
                next_scan = now + Duration::from_millis(100);
                self.expire(now);
            }
            self.publish_progress();
        }
        Ok(())
    }

    /// The upgrade request of `slot`: its user's, with `since` when reconnecting.
    fn request(&self, slot: usize) -> Vec<u8> {
        let base = &self.requests[slot % self.users as usize];
        let position = self.positions[self.index(slot)].as_deref();
        match (self.reconnecting, position) {
            (true, Some(position)) => {
                // `GET /ws?token=... HTTP/1.1`: the id (digits and `-`) goes
                // before the version, no escaping needed.
                let at = base
                    .windows(9)
                    .position(|w| w == b" HTTP/1.1")
                    .unwrap_or(base.len());
                let mut r = Vec::with_capacity(base.len() + 32);
                r.extend_from_slice(&base[..at]);
                r.extend_from_slice(b"&since=");
                r.extend_from_slice(position.as_bytes());
                r.extend_from_slice(&base[at..]);
                r
            }
            _ => base.to_vec(),
        }
    }

    fn refill(&mut self) {
        while self.in_flight < self.max_in_flight {
            let Some(slot) = self.pending.pop_front() else {
                return;
            };
            let source = (!self.sources.is_empty())
                .then(|| self.sources[(slot + self.started) % self.sources.len()]);
            self.started += 1;
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            let registry = self.poll.registry();
            let stream = sock::connect(self.server, source).and_then(|mut s| {
                registry.register(&mut s, Token(key), Interest::READABLE | Interest::WRITABLE)?;
                Ok(s)
            });
            match stream {
                Ok(stream) => {
                    entry.insert(Conn {
                        stream,
                        state: State::Connecting,
                        slot,
                        started: Instant::now(),
                        inbuf: Vec::new(),
                        outbuf: Vec::new(),
                    });
                    self.in_flight += 1;
                }
                Err(_) => {
                    self.handshake_failed();
                    // Out of fds or ports: stop for this round.
                    return;
                }
            }
        }
    }

    fn handshake_failed(&mut self) {
        if self.reconnecting {
            self.counts.resume_failed += 1;
        } else {
            self.counts.failed += 1;
        }
        self.unsettled -= 1;
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state != State::Open && now.duration_since(c.started) > self.connect_timeout
            })
            .map(|(key, _)| key)
            .collect();
        for key in late {
            self.finish(key);
        }
    }

    fn handle(&mut self, key: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.state == State::Connecting {
            match conn.stream.take_error() {
                Ok(None) if writable => {
                    conn.state = State::Upgrading;
                    let slot = conn.slot;
                    let request = self.request(slot);
                    self.conns[key].outbuf = request;
                }
                Ok(None) => return,
                Ok(Some(_)) | Err(_) => return self.finish(key),
            }
        }
        let mut gone = flush(&mut self.conns[key]).is_err();
        if !gone && readable {
            gone = self.read(key);
        }
        if !gone {
            gone = flush(&mut self.conns[key]).is_err();
        }
        if gone {
            self.finish(key);
        }
    }

    /// Reads until `WouldBlock`; `true` when the connection is gone.
    fn read(&mut self, key: usize) -> bool {
        let mut buf = mem::take(&mut self.scratch);
        let mut conn_inbuf = mem::take(&mut self.conns[key].inbuf);
        let mut filled = conn_inbuf.len();
        if buf.len() < filled + READ_BUFFER / 2 {
            buf.resize(filled + READ_BUFFER, 0);
        }
        buf[..filled].copy_from_slice(&conn_inbuf);
        conn_inbuf.clear();
        let gone = loop {
            if filled == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            match self.conns[key].stream.read(&mut buf[filled..]) {
                Ok(0) => break true,
                Ok(n) => {
                    filled += n;
                    let (consumed, gone) = self.consume(key, &mut buf[..filled]);
                    if gone {
                        break true;
                    }
                    buf.copy_within(consumed..filled, 0);
                    filled -= consumed;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break true,
            }
        };
        if !gone && filled > 0 {
            conn_inbuf.extend_from_slice(&buf[..filled]);
        }
        self.conns[key].inbuf = conn_inbuf;
        self.scratch = buf;
        gone
    }

    /// Handles the complete response head and frames in `buf`: the bytes
    /// consumed and whether the connection must end.
    fn consume(&mut self, key: usize, buf: &mut [u8]) -> (usize, bool) {
        let mut pos = 0;
        if self.conns[key].state == State::Upgrading {
            match frame::parse_upgrade(buf) {
                Upgrade::Partial if buf.len() > MAX_RESPONSE_HEAD => return (0, true),
                Upgrade::Partial => return (0, false),
                Upgrade::Refused(_) => return (0, true),
                Upgrade::Switched(head_len) => {
                    pos = head_len;
                    self.conns[key].state = State::AwaitConnected;
                }
            }
        }
        loop {
            let head = match frame::parse_head(&buf[pos..]) {
                Ok(Some(head)) if head.total_len() <= buf.len() - pos => head,
                Ok(_) => break,
                Err(_) => return (pos, true),
            };
            let payload = &mut buf[pos + head.header_len..pos + head.total_len()];
            pos += head.total_len();
            if let Some(mask) = head.mask {
                frame::apply_mask(payload, mask);
            }
            match head.opcode {
                OP_TEXT | OP_CONTINUATION if !self.text(key, payload) => return (pos, true),
                OP_PING => {
                    let mask = self.mask();
                    frame::push_masked_control(&mut self.conns[key].outbuf, OP_PONG, payload, mask);
                }
                OP_CLOSE => {
                    let mask = self.mask();
                    let conn = &mut self.conns[key];
                    frame::push_masked_control(&mut conn.outbuf, OP_CLOSE, &CLOSE_NORMAL, mask);
                    // Best effort: the connection is being dropped either way.
                    let _ = flush(conn);
                    return (pos, true);
                }
                _ => {}
            }
        }
        (pos, false)
    }

    /// A text message; `false` when the connection must end (a `connected`
    /// without the history members).
    fn text(&mut self, key: usize, payload: &[u8]) -> bool {
        let conn = &self.conns[key];
        let (slot, state, started) = (conn.slot, conn.state, conn.started);
        let i = self.index(slot);
        if state == State::AwaitConnected && payload.starts_with(CONNECTED_PREFIX) {
            let connected: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
            let body = &connected["payload"];
            let now = Instant::now();
            if !self.reconnecting {
                let Some(position) = body["position"].as_str() else {
                    // History is off: ended as a failed handshake.
                    self.counts.no_position += 1;
                    return false;
                };
                self.conns[key].state = State::Open;
                self.in_flight -= 1;
                self.positions[i] = Some(position.to_string());
                self.counts.opened += 1;
                self.unsettled -= 1;
                return true;
            }
            self.conns[key].state = State::Open;
            self.in_flight -= 1;
            self.counts.resumed += 1;
            self.counts
                .handshake
                .record(now.duration_since(started).as_micros() as u64);
            self.counts.last_open = Some(now);
            let recovery = body["recovery"]
                .as_object()
                .and_then(|r| Some((r.get("complete")?.as_bool()?, r.get("count")?.as_u64()?)));
            let account = &mut self.accounts[i];
            account.recovery = recovery;
            match recovery {
                Some((true, _)) => self.counts.complete += 1,
                Some((false, _)) => self.counts.incomplete += 1,
                None => self.counts.no_recovery += 1,
            }
            if recovery.is_some_and(|(_, count)| count != account.expected) {
                self.counts.count_mismatch += 1;
            }
            if account.expected == 0 {
                self.client_finished(i, now);
            }
            return true;
        }
        if state != State::Open || !self.reconnecting {
            self.counts.other_frames += 1;
            return true;
        }
        let Some((_, seq, _)) = frame::parse_bench_with_id(payload) else {
            self.counts.other_frames += 1;
            return true;
        };
        let now = Instant::now();
        self.counts.replayed += 1;
        self.counts.last_receive = Some(now);
        let user = slot as u64 % self.users;
        let account = &mut self.accounts[i];
        if account.record(seq, user, self.users, self.messages) && !account.finished {
            self.client_finished(i, now);
        }
        true
    }

    fn client_finished(&mut self, i: usize, now: Instant) {
        self.accounts[i].finished = true;
        self.unsettled -= 1;
        self.counts.last_complete = Some(now);
    }

    /// Removes a connection that failed or was ended by the server.
    fn finish(&mut self, key: usize) {
        let conn = self.conns.remove(key);
        let i = self.index(conn.slot);
        match conn.state {
            State::Open if self.reconnecting => {
                if !self.accounts[i].finished {
                    self.counts.lost += 1;
                    self.accounts[i].finished = true;
                    self.unsettled -= 1;
                }
            }
            State::Open => {
                // Lost while held in phase 1: it will not reconnect.
                self.counts.lost += 1;
                self.positions[i] = None;
            }
            _ => {
                self.in_flight -= 1;
                self.handshake_failed();
            }
        }
    }

    fn mask(&mut self) -> [u8; 4] {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng as u32).to_le_bytes()
    }
}

/// Writes queued output until done or `WouldBlock`; `Err` when the socket is gone.
fn flush(conn: &mut Conn) -> Result<(), ()> {
    while !conn.outbuf.is_empty() {
        match conn.stream.write(&conn.outbuf) {
            Ok(0) => return Err(()),
            Ok(n) => {
                conn.outbuf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
            Err(_) => return Err(()),
        }
    }
    Ok(())
}

/// Messages to user `u` when message `k` goes to user `k % U`.
fn messages_for(user: u64, users: u64, messages: u64) -> u64 {
    messages / users + u64::from(user < messages % users)
}

/// What a resume run measured.
pub struct Summary {
    connections: usize,
    threads: usize,
    source_addrs: usize,
    counts: Counts,
    connect_secs: f64,
    published: u64,
    publish_secs: f64,
    /// From the first reconnect to the last `connected`, last client
    /// complete, last replayed message.
    resume_secs: f64,
    complete_secs: f64,
    replay_secs: f64,
    cpu_reconnect: CpuSpan,
    cpu_publish: CpuSpan,
}

impl Summary {
    /// Every client resumed with a complete recovery and exactly its messages.
    pub fn complete(&self) -> bool {
        let c = &self.counts;
        c.opened == self.connections as u64
            && c.resumed == c.opened
            && c.lost + c.missing + c.duplicates + c.foreign + c.incomplete + c.no_recovery == 0
            && c.count_mismatch == 0
    }

    pub fn to_json(&self) -> Value {
        let c = &self.counts;
        let rate = |n: u64, s: f64| if s > 0.0 { (n as f64 / s).round() } else { 0.0 };
        json!({
            "preset": "resume",
            "connections": self.connections,
            "threads": self.threads,
            "source_addrs": self.source_addrs,
            "opened": c.opened,
            "failed": c.failed,
            "no_position": c.no_position,
            "connect_secs": self.connect_secs,
            "published": self.published,
            "publish_secs": self.publish_secs,
            "fcall_per_sec": rate(self.published, self.publish_secs),
            "resumed": c.resumed,
            "resume_failed": c.resume_failed,
            "resume_secs": self.resume_secs,
            "resumed_per_sec": rate(c.resumed, self.resume_secs),
            "reconnect_handshake_us": report::quantiles(&c.handshake),
            "expected": c.expected,
            "replayed": c.replayed,
            "replay_secs": self.replay_secs,
            "replayed_per_sec": rate(c.replayed, self.replay_secs),
            "all_replayed_secs": self.complete_secs,
            "recovery_complete": c.complete,
            "recovery_incomplete": c.incomplete,
            "recovery_missing": c.no_recovery,
            "recovery_count_mismatch": c.count_mismatch,
            "missing": c.missing,
            "duplicates": c.duplicates,
            "foreign": c.foreign,
            "lost": c.lost,
            "other_frames": c.other_frames,
            "cpu_seconds": {
                "publish": self.cpu_publish.to_json(),
                "reconnect": self.cpu_reconnect.to_json(),
            },
            "complete": self.complete(),
        })
    }

    pub fn to_table(&self) -> String {
        let c = &self.counts;
        let mut t = String::new();
        let mut row = |name: &str, value: String| {
            // Writing to a String cannot fail.
            let _ = writeln!(t, "  {name:<26} {value}");
        };
        let per_sec = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        row(
            "preset",
            format!(
                "resume ({} threads, {} source addresses)",
                self.threads, self.source_addrs
            ),
        );
        row(
            "connected",
            format!(
                "{} of {} in {:.2} s, {} failed ({} without position)",
                c.opened, self.connections, self.connect_secs, c.failed, c.no_position
            ),
        );
        row(
            "published (FCALL)",
            format!(
                "{} in {:.3} s = {:.0}/s",
                self.published,
                self.publish_secs,
                per_sec(self.published, self.publish_secs)
            ),
        );
        row(
            "resumed",
            format!(
                "{} in {:.3} s = {:.0}/s, {} failed",
                c.resumed,
                self.resume_secs,
                per_sec(c.resumed, self.resume_secs),
                c.resume_failed
            ),
        );
        row("reconnect handshake µs", report::describe(&c.handshake));
        row(
            "replayed",
            format!(
                "{} of {} in {:.3} s = {:.0}/s",
                c.replayed,
                c.expected,
                self.replay_secs,
                per_sec(c.replayed, self.replay_secs)
            ),
        );
        row(
            "last client complete",
            format!("{:.3} s after the first reconnect", self.complete_secs),
        );
        row(
            "recovery",
            format!(
                "{} complete, {} incomplete, {} absent, {} with a wrong count",
                c.complete, c.incomplete, c.no_recovery, c.count_mismatch
            ),
        );
        row(
            "missing / duplicate",
            format!(
                "{} / {} (foreign {}, lost connections {}, other frames {})",
                c.missing, c.duplicates, c.foreign, c.lost, c.other_frames
            ),
        );
        row("cpu while publishing", self.cpu_publish.describe());
        row("cpu while reconnecting", self.cpu_reconnect.describe());
        row(
            "result",
            if self.complete() {
                "complete".to_string()
            } else {
                "INCOMPLETE".to_string()
            },
        );
        t
    }
}

/// Waits for every client thread and merges their counts.
fn join(handles: Vec<JoinHandle<io::Result<Counts>>>) -> Result<Counts, Box<dyn Error>> {
    let mut counts = Counts::default();
    for handle in handles {
        match handle.join() {
            Ok(Ok(c)) => counts.merge(c),
            Ok(Err(e)) => return Err(format!("client thread: {e}").into()),
            Err(_) => return Err("a client thread panicked".into()),
        }
    }
    Ok(counts)
}

/// Runs the preset.
pub fn run(options: &Options, sources: Arc<[Ipv4Addr]>) -> Result<Summary, Box<dyn Error>> {
    sock::raise_nofile_limit_for(options.connections + 32)?;
    let mut publisher = Publisher::for_options(options)?;
    if !publisher.has_history_function()? {
        return Err(format!(
            "Redis {} has no ws_notify function library: start ws-notify with WS_HISTORY_SIZE > 0",
            options.redis_url
        )
        .into());
    }
    publisher.use_fcall();
    // A resuming client has seen a message before: give every user one, so
    // `since` names an entry the stream holds (`since=0-0` is never complete).
    publisher.seed(options.batch)?;
    let threads = options.threads;
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(CONNECT),
        threads: (0..threads).map(|_| Progress::default()).collect(),
    });
    let requests = Arc::new(token::upgrade_requests(options)?);
    let cpu = || CpuMark::take(options.server_pid, options.redis_pid);
    let start = Instant::now();
    let mut handles: Vec<JoinHandle<io::Result<Counts>>> = Vec::with_capacity(threads);
    for thread in 0..threads {
        let slots: Vec<usize> = (thread..options.connections).step_by(threads).collect();
        let (users, messages) = (options.users as u64, options.messages);
        let accounts = slots
            .iter()
            .map(|&slot| Account {
                expected: messages_for(slot as u64 % users, users, messages),
                ..Account::default()
            })
            .collect();
        let worker = Worker {
            thread,
            users,
            messages,
            max_in_flight: options.concurrency.div_ceil(threads),
            connect_timeout: options.connect_timeout,
            server: options.server,
            sources: sources.clone(),
            requests: requests.clone(),
            shared: shared.clone(),
            poll: Poll::new()?,
            conns: Slab::new(),
            positions: vec![None; slots.len()],
            accounts,
            slots,
            pending: VecDeque::new(),
            in_flight: 0,
            unsettled: 0,
            started: 0,
            reconnecting: false,
            counts: Counts::default(),
            scratch: vec![0; READ_BUFFER],
            rng: 0x9E37_79B9_7F4A_7C15 ^ (thread as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407),
        };
        handles.push(
            thread::Builder::new()
                .name(format!("bench-resume-{thread}"))
                .spawn(move || worker.run())?,
        );
    }

    let progress = |what: &str, since: Instant| {
        eprintln!(
            "{what}: {} open, {} failed, {} replayed ({:.1} s)",
            shared.sum(|p| &p.opened),
            shared.sum(|p| &p.failed),
            shared.sum(|p| &p.replayed),
            since.elapsed().as_secs_f64()
        );
    };
    // A thread that ended early (a poll error) never settles: stop waiting,
    // and let `join` report it.
    let ended = || handles.iter().any(JoinHandle::is_finished);
    let mut next_print = start + PROGRESS_PRINT;
    while !shared.all_settled(CONNECT) && !ended() {
        thread::sleep(TICK);
        if Instant::now() >= next_print {
            next_print += PROGRESS_PRINT;
            progress("connecting", start);
        }
    }
    let connect_secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} connected in {connect_secs:.2} s; closing all",
        shared.sum(|p| &p.opened)
    );
    shared.phase.store(CLOSE, SeqCst);
    while !shared.all_closed() && !ended() {
        thread::sleep(TICK);
    }

    if ended() {
        shared.phase.store(STOP, SeqCst);
        return Err(join(handles)
            .err()
            .unwrap_or("a client thread ended early".into()));
    }
    eprintln!(
        "publishing {} messages with FCALL ws_notify_publish",
        options.messages
    );
    let cpu_before = cpu();
    let published = publisher.run(options.messages, None, options.batch)?;
    let cpu_publish = cpu().since(&cpu_before);

    let cpu_before = cpu();
    let first_reconnect = Instant::now();
    shared.phase.store(RECONNECT, SeqCst);
    eprintln!("reconnecting with since");
    // Until every client has everything, or nothing new for --drain-timeout.
    let mut next_print = first_reconnect + PROGRESS_PRINT;
    let mut seen = (0, 0);
    let mut progress_at = Instant::now();
    while !shared.all_settled(RECONNECT) && !ended() {
        thread::sleep(TICK);
        let now = Instant::now();
        let now_seen = (shared.sum(|p| &p.opened), shared.sum(|p| &p.replayed));
        if now_seen != seen {
            seen = now_seen;
            progress_at = now;
        } else if now.duration_since(progress_at) >= options.drain_timeout {
            eprintln!(
                "drain timeout: nothing new for {:.1} s",
                options.drain_timeout.as_secs_f64()
            );
            break;
        }
        if now >= next_print {
            next_print += PROGRESS_PRINT;
            progress("resuming", first_reconnect);
        }
    }
    let cpu_reconnect = cpu().since(&cpu_before);
    thread::sleep(EXTRA_WAIT);
    shared.phase.store(STOP, SeqCst);

    let counts = join(handles)?;
    let secs = |to: Option<Instant>| {
        to.map_or(0.0, |to| {
            to.saturating_duration_since(first_reconnect).as_secs_f64()
        })
    };
    Ok(Summary {
        connections: options.connections,
        threads,
        source_addrs: sources.len().max(1),
        connect_secs,
        published: published.sent,
        publish_secs: published.last.duration_since(published.first).as_secs_f64(),
        resume_secs: secs(counts.last_open),
        complete_secs: secs(counts.last_complete),
        replay_secs: secs(counts.last_receive),
        counts,
        cpu_reconnect,
        cpu_publish,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_per_user() {
        // 7 messages, 3 users: 3, 2, 2.
        assert_eq!(
            (0..3).map(|u| messages_for(u, 3, 7)).collect::<Vec<_>>(),
            [3, 2, 2]
        );
        assert_eq!(messages_for(5, 10, 100), 10);
    }

    #[test]
    fn replay_accounting_is_exact() {
        // User 1 of 3, 12 messages: it expects 1, 4, 7, 10.
        let (users, messages) = (3, 12);
        let fresh = || Account {
            expected: messages_for(1, users, messages),
            ..Account::default()
        };
        let mut a = fresh();
        let done: Vec<bool> = [1, 4, 7, 10]
            .iter()
            .map(|&seq| a.record(seq, 1, users, messages))
            .collect();
        assert_eq!(done, [false, false, false, true]);
        assert_eq!((a.missing(), a.duplicates, a.foreign), (0, 0, 0));

        // 4 skipped, 1 repeated, one for another user, one never published.
        let mut a = fresh();
        for seq in [1, 7, 1, 5, 13] {
            a.record(seq, 1, users, messages);
        }
        assert_eq!((a.missing(), a.duplicates, a.foreign), (2, 1, 2));
        // Cut short: 10 never arrived (missing), 4 was skipped (missing).
        assert_eq!((a.gaps, a.next), (1, 3));
    }
}
