//! Client threads: each runs its own mio `Poll` (edge-triggered, non-blocking
//! sockets, read until `WouldBlock`) over its share of the connections.
//!
//! A connection is a small state machine:
//!
//! ```text
//! Connecting --writable, connected--> Upgrading --101 + accept key--> AwaitConnected
//!     --`connected` message--> Open            (hold: stays until the run ends)
//!                          \-> Closing --EOF--> done   (churn: close frame sent, the
//!                                                       server answers and closes)
//! ```
//!
//! Thread `t` of `T` owns connections `t, t + T, t + 2T, ...`; connection `i`
//! belongs to user `i % U`. At most `max_in_flight` handshakes are outstanding
//! per thread. Every received bench message is counted and its
//! publish-to-receive latency recorded in the thread's own histogram; the main
//! thread reads a few atomics for progress and merges the reports at the end.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::frame::{
    self, CONNECTED_PREFIX, FrameHead, MAX_RESPONSE_HEAD, OP_CLOSE, OP_CONTINUATION, OP_PING,
    OP_PONG, OP_TEXT, Upgrade,
};
use crate::histogram::Histogram;
use crate::sock;

/// Poll timeout: how late a thread notices the stop flag or a due refill.
const POLL_TIMEOUT: Duration = Duration::from_millis(10);
/// How often connections that are not open yet are checked for their deadline.
const DEADLINE_SCAN: Duration = Duration::from_millis(200);
/// Initial size of the thread's read buffer (grows only for a larger frame).
const READ_BUFFER: usize = 64 << 10;
/// Close frame payload: status 1000, normal closure (RFC 6455 section 7.4.1).
const CLOSE_NORMAL: [u8; 2] = 1000u16.to_be_bytes();

/// Microseconds since the Unix epoch (the clock the publisher stamps `t` with).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Progress counters one thread publishes for the main thread (single writer).
#[derive(Default)]
#[repr(align(128))]
pub struct Counters {
    pub opened: AtomicU64,
    pub failed: AtomicU64,
    pub delivered: AtomicU64,
    pub lost: AtomicU64,
    /// Hold: every connection of this thread is open or has failed.
    /// Churn: the thread has finished.
    pub settled: AtomicBool,
}

/// State shared by the main thread and the client threads.
pub struct Shared {
    /// Set by the main thread to end the client threads.
    pub stop: AtomicBool,
    /// One per thread.
    pub counters: Vec<Counters>,
    /// Open connections per user (hold mode): what a message to a user should reach.
    pub user_conns: Vec<AtomicU32>,
}

impl Shared {
    pub fn new(threads: usize, users: usize) -> Shared {
        Shared {
            stop: AtomicBool::new(false),
            counters: (0..threads).map(|_| Counters::default()).collect(),
            user_conns: (0..users).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Sum of one counter over all threads.
    pub fn sum(&self, field: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        self.counters.iter().map(|c| field(c).load(Relaxed)).sum()
    }

    pub fn all_settled(&self) -> bool {
        self.counters.iter().all(|c| c.settled.load(Relaxed))
    }
}

/// What one thread is to do.
pub struct Plan {
    pub thread: usize,
    pub threads: usize,
    /// Total connections (hold mode; ignored when churning).
    pub connections: usize,
    pub users: usize,
    pub max_in_flight: usize,
    /// Churn mode: connect, handshake, close, repeat until this instant.
    pub churn_until: Option<Instant>,
    pub connect_timeout: Duration,
    pub server: SocketAddrV4,
    /// Source addresses to spread connections over; empty: let the kernel choose.
    pub sources: Arc<[Ipv4Addr]>,
    /// One upgrade request per user.
    pub requests: Arc<Vec<Box<[u8]>>>,
    /// Expected `Sec-WebSocket-Accept` value.
    pub accept: Arc<[u8]>,
}

/// Why connections never opened.
#[derive(Default, Debug, Clone)]
pub struct Failures {
    /// socket/bind/connect(2) failed at once (e.g. out of fds or ports).
    pub socket: u64,
    /// The TCP connect failed (refused, reset).
    pub connect: u64,
    /// The server answered with this status instead of 101 (0: no valid answer).
    pub status: BTreeMap<u16, u64>,
    /// Not open within `--connect-timeout`.
    pub timeout: u64,
    /// Closed or reset by the server during the handshake.
    pub closed: u64,
    /// Unparsable or oversized frames or response head.
    pub protocol: u64,
}

impl Failures {
    pub fn add(&mut self, fail: Fail) {
        match fail {
            Fail::Socket => self.socket += 1,
            Fail::Connect => self.connect += 1,
            Fail::Status(code) => *self.status.entry(code).or_default() += 1,
            Fail::Timeout => self.timeout += 1,
            Fail::Closed => self.closed += 1,
            Fail::Protocol => self.protocol += 1,
        }
    }

    pub fn merge(&mut self, other: &Failures) {
        self.socket += other.socket;
        self.connect += other.connect;
        for (code, n) in &other.status {
            *self.status.entry(*code).or_default() += n;
        }
        self.timeout += other.timeout;
        self.closed += other.closed;
        self.protocol += other.protocol;
    }

    pub fn total(&self) -> u64 {
        self.socket
            + self.connect
            + self.status.values().sum::<u64>()
            + self.timeout
            + self.closed
            + self.protocol
    }
}

/// What one thread saw; merged by the main thread.
#[derive(Default)]
pub struct Report {
    /// Publish-to-receive latency of bench messages, microseconds.
    pub latency: Histogram,
    /// Connect start to `connected` message, microseconds.
    pub handshake: Histogram,
    pub failures: Failures,
    pub opened: u64,
    pub delivered: u64,
    /// Open connections the server closed or reset.
    pub lost: u64,
    /// Churn: connections closed cleanly after their handshake.
    pub cycles: u64,
    /// Churn: closes that did not finish within `--connect-timeout`.
    pub close_timeouts: u64,
    /// Text frames that were neither `connected` nor bench messages.
    pub other_frames: u64,
    pub pings: u64,
    /// Server frames that were masked (a server must not mask, RFC 6455 5.1).
    pub masked_frames: u64,
    pub first_open: Option<Instant>,
    pub last_open: Option<Instant>,
    pub last_receive: Option<Instant>,
}

impl Report {
    pub fn merge(&mut self, other: &Report) {
        self.latency.merge(&other.latency);
        self.handshake.merge(&other.handshake);
        self.failures.merge(&other.failures);
        self.opened += other.opened;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.cycles += other.cycles;
        self.close_timeouts += other.close_timeouts;
        self.other_frames += other.other_frames;
        self.pings += other.pings;
        self.masked_frames += other.masked_frames;
        self.first_open = min_opt(self.first_open, other.first_open);
        self.last_open = self.last_open.max(other.last_open);
        self.last_receive = self.last_receive.max(other.last_receive);
    }
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Non-blocking connect in progress.
    Connecting,
    /// Request written (or queued); waiting for `101`.
    Upgrading,
    /// WebSocket open; waiting for the server's `connected` message.
    AwaitConnected,
    /// Counted as open; receiving messages.
    Open,
    /// Churn: close frame sent, waiting for the server to close.
    Closing,
}

/// Why a connection never opened.
#[derive(Debug, Clone, Copy)]
pub enum Fail {
    Socket,
    Connect,
    Status(u16),
    Timeout,
    Closed,
    Protocol,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy)]
enum End {
    /// Before it opened.
    Failed(Fail),
    /// An open connection ended by the server or the network.
    Lost,
    /// Churn: closed after a complete handshake.
    Cycle,
}

struct Conn {
    stream: TcpStream,
    state: State,
    user: u32,
    started: Instant,
    /// Bytes of an incomplete response head or frame, kept between reads.
    inbuf: Vec<u8>,
    /// Bytes not yet accepted by the socket (rare: the request, pongs, close).
    outbuf: Vec<u8>,
}

/// Everything but the connections, so frame handling can borrow both.
struct Ctx {
    plan: Plan,
    shared: Arc<Shared>,
    report: Report,
    in_flight: usize,
    /// xorshift state for masking keys.
    rng: u64,
}

/// One client thread.
pub struct Client {
    ctx: Ctx,
    poll: Poll,
    conns: Slab<Conn>,
    /// Reused read buffer: leftover of the connection being read, then new bytes.
    scratch: Vec<u8>,
    /// Next connection number of this thread (global index: thread + next * threads).
    next: usize,
}

impl Client {
    pub fn new(plan: Plan, shared: Arc<Shared>) -> io::Result<Client> {
        let rng =
            0x9E37_79B9_7F4A_7C15 ^ (plan.thread as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
        Ok(Client {
            ctx: Ctx {
                plan,
                shared,
                report: Report::default(),
                in_flight: 0,
                rng,
            },
            poll: Poll::new()?,
            conns: Slab::new(),
            scratch: vec![0; READ_BUFFER],
            next: 0,
        })
    }

    /// Runs until the stop flag (hold) or the end of the churn period.
    pub fn run(mut self) -> io::Result<Report> {
        let mut events = Events::with_capacity(1024);
        let mut next_scan = Instant::now() + DEADLINE_SCAN;
        loop {
            if self.ctx.shared.stop.load(Relaxed) {
                break;
            }
            let now = Instant::now();
            self.refill(now);
            let churn_over = self.ctx.plan.churn_until.is_some_and(|until| now >= until);
            if churn_over && self.conns.is_empty() {
                break;
            }
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
                next_scan = now + DEADLINE_SCAN;
                self.expire(now);
            }
            self.publish_progress();
        }
        self.publish_progress();
        self.ctx.counters().settled.store(true, Relaxed);
        Ok(self.ctx.report)
    }

    fn publish_progress(&self) {
        let c = self.ctx.counters();
        let r = &self.ctx.report;
        c.opened.store(r.opened, Relaxed);
        c.failed.store(r.failures.total(), Relaxed);
        c.delivered.store(r.delivered, Relaxed);
        c.lost.store(r.lost, Relaxed);
        if self.ctx.plan.churn_until.is_none() {
            let all_started = self.global_index(self.next) >= self.ctx.plan.connections;
            c.settled
                .store(all_started && self.ctx.in_flight == 0, Relaxed);
        }
    }

    fn global_index(&self, n: usize) -> usize {
        self.ctx.plan.thread + n * self.ctx.plan.threads
    }

    /// Starts connections until `max_in_flight` are outstanding.
    fn refill(&mut self, now: Instant) {
        while self.ctx.in_flight < self.ctx.plan.max_in_flight {
            let index = self.global_index(self.next);
            match self.ctx.plan.churn_until {
                Some(until) if now >= until => return,
                Some(_) => {}
                None if index >= self.ctx.plan.connections => return,
                None => {}
            }
            self.next += 1;
            let sources = &self.ctx.plan.sources;
            let source = (!sources.is_empty()).then(|| sources[index % sources.len()]);
            let user = (index % self.ctx.plan.users) as u32;
            let entry = self.conns.vacant_entry();
            let started = sock::connect(self.ctx.plan.server, source).and_then(|mut stream| {
                self.poll.registry().register(
                    &mut stream,
                    Token(entry.key()),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                Ok(stream)
            });
            match started {
                Ok(stream) => {
                    entry.insert(Conn {
                        stream,
                        state: State::Connecting,
                        user,
                        started: now,
                        inbuf: Vec::new(),
                        outbuf: Vec::new(),
                    });
                    self.ctx.in_flight += 1;
                }
                Err(_) => {
                    self.ctx.report.failures.add(Fail::Socket);
                    if self.ctx.plan.churn_until.is_some() {
                        // Out of fds or ports: retry after the next poll, not in a spin.
                        return;
                    }
                }
            }
        }
    }

    /// Fails handshakes (and churn closes) older than `--connect-timeout`.
    fn expire(&mut self, now: Instant) {
        if self.ctx.in_flight == 0 {
            return;
        }
        let timeout = self.ctx.plan.connect_timeout;
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state != State::Open && now.duration_since(c.started) > timeout)
            .map(|(key, _)| key)
            .collect();
        for key in expired {
            let state = self.conns[key].state;
            if state == State::Closing {
                self.ctx.report.close_timeouts += 1;
            }
            self.finish(key, End::Failed(Fail::Timeout));
        }
    }

    fn handle(&mut self, key: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.state == State::Connecting {
            // A failed connect reports an error (SO_ERROR); a completed one
            // makes the socket writable. No getpeername: it would cost one
            // more syscall per connection, and a write to a socket still
            // connecting only returns WouldBlock (kept queued until writable).
            match conn.stream.take_error() {
                Ok(None) if writable => {
                    conn.state = State::Upgrading;
                    let request = &self.ctx.plan.requests[conn.user as usize];
                    conn.outbuf.extend_from_slice(request);
                }
                Ok(None) => return,
                Ok(Some(_)) | Err(_) => return self.finish(key, End::Failed(Fail::Connect)),
            }
        }
        let mut end = flush(conn).err();
        if end.is_none() && readable {
            end = self.read(key);
        }
        if end.is_none() {
            let conn = &mut self.conns[key];
            end = flush(conn).err();
        }
        if let Some(end) = end {
            self.finish(key, end);
        }
    }

    /// Reads until `WouldBlock`, handling every complete frame.
    fn read(&mut self, key: usize) -> Option<End> {
        let conn = &mut self.conns[key];
        let mut buf = mem::take(&mut self.scratch);
        let mut filled = conn.inbuf.len();
        if buf.len() < filled + READ_BUFFER / 2 {
            buf.resize(filled + READ_BUFFER, 0);
        }
        buf[..filled].copy_from_slice(&conn.inbuf);
        conn.inbuf.clear();
        let end = loop {
            if filled == buf.len() {
                // A single frame larger than the buffer (bounded by MAX_FRAME_PAYLOAD).
                buf.resize(buf.len() * 2, 0);
            }
            match conn.stream.read(&mut buf[filled..]) {
                Ok(0) => break Some(eof_end(conn.state)),
                Ok(n) => {
                    filled += n;
                    let (consumed, end) = self.ctx.consume(conn, &mut buf[..filled]);
                    if end.is_some() {
                        break end;
                    }
                    buf.copy_within(consumed..filled, 0);
                    filled -= consumed;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break Some(eof_end(conn.state)),
            }
        };
        if end.is_none() && filled > 0 {
            conn.inbuf.extend_from_slice(&buf[..filled]);
        }
        self.scratch = buf;
        end
    }

    /// Removes a connection and counts how it ended. Closing the socket also
    /// removes it from the epoll set, so there is no separate deregister.
    fn finish(&mut self, key: usize, end: End) {
        let conn = self.conns.remove(key);
        let ctx = &mut self.ctx;
        if ctx.holds_slot(conn.state) {
            ctx.in_flight -= 1;
        }
        let end = if conn.state == State::Closing {
            End::Cycle
        } else {
            end
        };
        match end {
            End::Failed(fail) => ctx.report.failures.add(fail),
            End::Lost => {
                ctx.report.lost += 1;
                ctx.shared.user_conns[conn.user as usize].fetch_sub(1, Relaxed);
            }
            End::Cycle => ctx.report.cycles += 1,
        }
    }
}

/// How a connection ends when the server closes or resets it in `state`.
fn eof_end(state: State) -> End {
    match state {
        State::Connecting | State::Upgrading | State::AwaitConnected => End::Failed(Fail::Closed),
        State::Open => End::Lost,
        State::Closing => End::Cycle,
    }
}

/// Writes queued output until done or `WouldBlock`.
fn flush(conn: &mut Conn) -> Result<(), End> {
    while !conn.outbuf.is_empty() {
        match conn.stream.write(&conn.outbuf) {
            Ok(0) => return Err(eof_end(conn.state)),
            Ok(n) => {
                conn.outbuf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
            Err(_) => return Err(eof_end(conn.state)),
        }
    }
    if conn.outbuf.capacity() > 0 && conn.state != State::Closing {
        // The request is sent once; do not keep its buffer per connection.
        conn.outbuf = Vec::new();
    }
    Ok(())
}

impl Ctx {
    fn counters(&self) -> &Counters {
        &self.shared.counters[self.plan.thread]
    }

    /// Hold mode frees a handshake slot when the connection opens; churn mode
    /// when it is gone.
    fn holds_slot(&self, state: State) -> bool {
        self.plan.churn_until.is_some() || state != State::Open
    }

    fn mask(&mut self) -> [u8; 4] {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng as u32).to_le_bytes()
    }

    /// Handles every complete unit in `buf` (the response head, then frames):
    /// returns the bytes consumed and, if the connection must end, how.
    fn consume(&mut self, conn: &mut Conn, buf: &mut [u8]) -> (usize, Option<End>) {
        let mut pos = 0;
        if conn.state == State::Upgrading {
            match frame::parse_upgrade(buf, &self.plan.accept) {
                Upgrade::Partial if buf.len() > MAX_RESPONSE_HEAD => {
                    return (0, Some(End::Failed(Fail::Protocol)));
                }
                Upgrade::Partial => return (0, None),
                Upgrade::Refused(code) => return (0, Some(End::Failed(Fail::Status(code)))),
                Upgrade::Switched(head_len) => {
                    pos = head_len;
                    conn.state = State::AwaitConnected;
                }
            }
        }
        // One clock reading per read: frames that arrived together share it.
        let mut now_us = None;
        loop {
            let head: FrameHead = match frame::parse_head(&buf[pos..]) {
                Ok(Some(head)) if head.total_len() <= buf.len() - pos => head,
                Ok(_) => break,
                Err(_) => return (pos, Some(self.protocol_error(conn.state))),
            };
            let payload = &mut buf[pos + head.header_len..pos + head.total_len()];
            pos += head.total_len();
            if let Some(mask) = head.mask {
                frame::apply_mask(payload, mask);
                self.report.masked_frames += 1;
            }
            match head.opcode {
                OP_TEXT | OP_CONTINUATION => match conn.state {
                    State::Open => match frame::parse_bench(payload) {
                        Some((_seq, t)) => {
                            let now = *now_us.get_or_insert_with(unix_micros);
                            self.report.latency.record(now.saturating_sub(t));
                            self.report.delivered += 1;
                        }
                        None => self.report.other_frames += 1,
                    },
                    State::AwaitConnected if payload.starts_with(CONNECTED_PREFIX) => {
                        self.opened(conn);
                    }
                    _ => self.report.other_frames += 1,
                },
                OP_PING => {
                    self.report.pings += 1;
                    let mask = self.mask();
                    frame::push_masked_control(&mut conn.outbuf, OP_PONG, payload, mask);
                }
                OP_CLOSE if conn.state == State::Closing => {
                    // The server's answer to our close; it closes the TCP
                    // connection next (RFC 6455 section 7.1.1), so wait for EOF
                    // and leave TIME_WAIT on its side.
                }
                OP_CLOSE => {
                    // Answer the close (RFC 6455 section 5.5.1) and end.
                    let mask = self.mask();
                    let status = payload.get(..2).unwrap_or(&CLOSE_NORMAL).to_vec();
                    frame::push_masked_control(&mut conn.outbuf, OP_CLOSE, &status, mask);
                    // Best effort: the connection is being dropped either way.
                    let _ = flush(conn);
                    return (pos, Some(eof_end(conn.state)));
                }
                _ => {}
            }
        }
        if pos > 0 && now_us.is_some() {
            self.report.last_receive = Some(Instant::now());
        }
        (pos, None)
    }

    fn protocol_error(&self, state: State) -> End {
        match state {
            State::Open => End::Lost,
            State::Closing => End::Cycle,
            _ => End::Failed(Fail::Protocol),
        }
    }

    /// The `connected` message arrived: the handshake is complete.
    fn opened(&mut self, conn: &mut Conn) {
        let now = Instant::now();
        let micros = now.duration_since(conn.started).as_micros() as u64;
        self.report.handshake.record(micros);
        self.report.opened += 1;
        self.report.first_open.get_or_insert(now);
        self.report.last_open = Some(now);
        if self.plan.churn_until.is_some() {
            let mask = self.mask();
            frame::push_masked_control(&mut conn.outbuf, OP_CLOSE, &CLOSE_NORMAL, mask);
            conn.state = State::Closing;
        } else {
            conn.state = State::Open;
            self.in_flight -= 1;
            self.shared.user_conns[conn.user as usize].fetch_add(1, Relaxed);
        }
    }
}
