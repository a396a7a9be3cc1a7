//! Client threads: the one connection loop of every preset. Each thread runs
//! its own mio `Poll` (edge-triggered, non-blocking sockets, read until
//! `WouldBlock`) over its share of the connections; the codec is `frame.rs`.
//!
//! A connection is a small state machine:
//!
//! ```text
//! Connecting --writable, connected--> Upgrading --101 + accept key--> AwaitConnected
//!   --`connected` message--> Open   (hold, soak: until the run ends or the server ends it)
//!                        \-> Closing (handshake preset: close frame sent at once)
//! Open --soak Close command--> Draining --last expected message seen (or --close-timeout)-->
//!   Closing (masked close frame sent) --server close + EOF (or the timeout)--> gone
//! ```
//!
//! What a thread does with its connections is its `Mode`:
//! - `Hold`: thread `t` of `T` opens connections `t, t + T, t + 2T, ...` below
//!   N once and keeps them; connection `i` is user `i % U`.
//! - `Churn` (handshake preset): connect, handshake, close, again, until an
//!   instant, `max_in_flight` connections at a time.
//! - `Soak`: slots `t, t + T, ...` (slot `i` is user `i % U`) are kept open;
//!   the coordinator (`soak/`) sends `Close` commands, the slot's connection
//!   drains, closes and the slot reopens at once. The thread answers with
//!   `Event`s (opened, close frame out, gone) so the coordinator can count
//!   exactly what each connection should have received.
//!
//! At most `max_in_flight` handshakes are outstanding per thread. Every
//! received bench message is counted and its publish-to-receive latency
//! recorded in the thread's own histogram; the main thread reads a few
//! atomics for progress and merges the reports at the end.
//!
//! Counting in soak mode (the coordinator decides what is expected):
//! - `w`, read from `Shared::issued` when `connected` arrives, is the first
//!   message sequence number that was certainly published after the server had
//!   registered this connection. Messages with a lower `seq` may or may not
//!   reach it: they are excluded (counted apart as `before_open`). In the other
//!   presets nothing is published before every connection is open, so `w` is 0.
//! - While Draining, the connection's user gets no new messages; the connection
//!   waits for the last one published to its user (in-order delivery: Redis to
//!   the gateway and the gateway to each connection keep order), then closes.
//!   Anything arriving after our close frame is counted apart (`after_close`),
//!   never as delivered.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::error::Error;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::mpsc::{Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::args::{Options, Preset};
use crate::counts::{Fail, Report, StillOpen};
use crate::frame::{
    self, CONNECTED_PREFIX, MAX_RESPONSE_HEAD, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG,
    OP_TEXT, Upgrade,
};
use crate::{sock, token};

/// Poll timeout: how late a thread notices the stop flag, a command or a due (re)connect.
const POLL_TIMEOUT: Duration = Duration::from_millis(5);
/// How often connections that are not open are checked for their deadline.
const DEADLINE_SCAN: Duration = Duration::from_millis(100);
/// Initial size of the thread's read buffer (grows only for a larger frame).
const READ_BUFFER: usize = 64 << 10;
/// Close frame payload: status 1000, normal closure (RFC 6455 section 7.4.1).
const CLOSE_NORMAL: [u8; 2] = 1000u16.to_be_bytes();
/// Soak: wait before reopening a slot whose handshake failed.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Soak: wait before reopening a slot whose open connection the server ended.
const RETRY_AFTER_LOSS: Duration = Duration::from_millis(100);

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
    /// Churn: the thread has finished. Soak: unused.
    pub settled: AtomicBool,
}

/// State shared by the main thread and the client threads.
pub struct Shared {
    /// Set by the main thread to end the client threads.
    pub stop: AtomicBool,
    /// Soak: messages with `seq < issued` may have been sent to Redis. The
    /// coordinator stores it (SeqCst) before it sends each pipeline.
    pub issued: AtomicU64,
    /// One per thread.
    pub counters: Vec<Counters>,
    /// Hold: open connections per user, what a message to a user should reach.
    pub user_conns: Vec<AtomicU32>,
}

impl Shared {
    pub fn new(threads: usize, users: usize) -> Shared {
        Shared {
            stop: AtomicBool::new(false),
            issued: AtomicU64::new(0),
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
    /// Connections (hold) or slots (soak); unused when churning.
    pub connections: usize,
    pub users: usize,
    pub max_in_flight: usize,
    pub connect_timeout: Duration,
    /// Bound on each of the two waits of a close: Draining for the last
    /// expected message, Closing for the server's close.
    pub close_timeout: Duration,
    pub server: SocketAddrV4,
    /// Source addresses to spread connections over; empty: let the kernel choose.
    pub sources: Arc<[Ipv4Addr]>,
    /// One upgrade request per user.
    pub requests: Arc<Vec<Box<[u8]>>>,
}

/// What a thread does with its connections.
pub enum Mode {
    /// Open the thread's share of `connections` once and hold them.
    Hold,
    /// Connect, handshake, close, repeat until this instant.
    Churn { until: Instant },
    /// Keep the slots open; drain and close on command, then reopen.
    Soak {
        commands: Receiver<Close>,
        events: Sender<Event>,
    },
}

/// Coordinator to soak thread.
#[derive(Debug)]
pub struct Close {
    pub slot: usize,
    pub generation: u64,
    /// The last message published to the slot's user before the user was
    /// blocked: the connection waits until it has seen it (if it is `>= w`).
    pub wait_for: Option<u64>,
}

/// How an opened soak connection ended.
#[derive(Debug, Clone, Copy)]
pub enum Ended {
    /// Closed by churn (cleanly, or after `--close-timeout`).
    Churned,
    /// Closed or reset by the server; `issued` when it was noticed.
    Lost { issued: u64 },
}

/// Soak thread to coordinator.
#[derive(Debug)]
pub enum Event {
    /// The slot's connection got its `connected` message.
    Opened {
        slot: usize,
        generation: u64,
        w: u64,
    },
    /// The close frame went out: the user may be published to again.
    CloseSent { slot: usize, generation: u64 },
    /// An opened connection is gone.
    Done {
        slot: usize,
        generation: u64,
        delivered: u64,
        ended: Ended,
    },
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
    /// Soak: chosen for churn, waiting for the last message to its user.
    Draining,
    /// Close frame sent, waiting for the server to close.
    Closing,
}

impl State {
    fn handshaking(self) -> bool {
        matches!(
            self,
            State::Connecting | State::Upgrading | State::AwaitConnected
        )
    }
}

/// Why a connection is removed. What it counts as depends on its state (see
/// `Client::finish`): a failure while handshaking, a loss while open, a
/// cycle while closing.
#[derive(Debug, Clone, Copy)]
enum End {
    /// EOF, reset, a server close frame.
    Gone,
    /// A timeout or a protocol error; this reason is counted if it was handshaking.
    Failed(Fail),
}

struct Conn {
    stream: TcpStream,
    state: State,
    /// Connection number (hold, churn) or slot (soak).
    slot: usize,
    user: u32,
    /// Soak: tells this connection of the slot from the ones before it.
    generation: u64,
    /// Connect start, for the handshake latency.
    started: Instant,
    /// Start of the current phase (handshake, drain, close) for its deadline.
    since: Instant,
    /// First `seq` this connection counts (see the module comment).
    w: u64,
    delivered: u64,
    /// Highest bench `seq >= w` received.
    last_seq: Option<u64>,
    /// Soak, Draining: the last message to wait for.
    wait_for: Option<u64>,
    /// Bytes of an incomplete response head or frame, kept between reads.
    inbuf: Vec<u8>,
    /// Bytes not yet accepted by the socket (rare: the request, pongs, close).
    outbuf: Vec<u8>,
}

impl Conn {
    /// Draining and the last expected message has arrived (or none is due).
    fn drained(&self) -> bool {
        match self.wait_for {
            Some(last) if last >= self.w => self.last_seq.is_some_and(|s| s >= last),
            _ => true,
        }
    }
}

/// Everything but the connections, so frame handling can borrow both.
struct Ctx {
    plan: Plan,
    mode: Mode,
    shared: Arc<Shared>,
    report: Report,
    /// Connections holding a handshake slot: still handshaking, or (churn)
    /// not gone yet.
    in_flight: usize,
    /// Connections in `State::Open` (they have no deadline to check).
    open: usize,
    /// xorshift state for masking keys.
    rng: u64,
}

/// One client thread.
pub struct Client {
    ctx: Ctx,
    poll: Poll,
    conns: Slab<Conn>,
    /// Hold and soak: slots to (re)connect, each not before its instant,
    /// earliest first.
    pending: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Soak: slab key of each owned slot's connection (index: slot / threads).
    slot_key: Vec<Option<usize>>,
    /// Connections this thread has started.
    started: usize,
    /// Reused read buffer: leftover of the connection being read, then new bytes.
    scratch: Vec<u8>,
}

impl Client {
    pub fn new(plan: Plan, mode: Mode, shared: Arc<Shared>) -> io::Result<Client> {
        let now = Instant::now();
        let owned: Vec<usize> = match mode {
            Mode::Churn { .. } => Vec::new(),
            Mode::Hold | Mode::Soak { .. } => (plan.thread..plan.connections)
                .step_by(plan.threads)
                .collect(),
        };
        let rng =
            0x9E37_79B9_7F4A_7C15 ^ (plan.thread as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
        Ok(Client {
            slot_key: vec![None; owned.len()],
            pending: owned.into_iter().map(|slot| Reverse((now, slot))).collect(),
            ctx: Ctx {
                plan,
                mode,
                shared,
                report: Report::default(),
                in_flight: 0,
                open: 0,
                rng,
            },
            poll: Poll::new()?,
            conns: Slab::new(),
            started: 0,
            scratch: vec![0; READ_BUFFER],
        })
    }

    /// Runs until the stop flag or, churning, the end of the churn period;
    /// returns the counts and the connections still open.
    pub fn run(mut self) -> io::Result<Report> {
        let mut events = Events::with_capacity(1024);
        let mut next_scan = Instant::now() + DEADLINE_SCAN;
        while !self.ctx.shared.stop.load(SeqCst) {
            self.take_commands();
            let now = Instant::now();
            self.refill(now);
            let churn_over = matches!(self.ctx.mode, Mode::Churn { until } if now >= until);
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
        self.ctx.report.still_open = self
            .conns
            .iter()
            .filter(|(_, c)| !c.state.handshaking())
            .map(|(_, c)| StillOpen {
                slot: c.slot,
                generation: c.generation,
                delivered: c.delivered,
            })
            .collect();
        Ok(self.ctx.report)
    }

    fn publish_progress(&self) {
        let c = self.ctx.counters();
        let r = &self.ctx.report;
        c.opened.store(r.opened, Relaxed);
        c.failed.store(r.failures.total(), Relaxed);
        c.delivered.store(r.delivered, Relaxed);
        c.lost.store(r.lost, Relaxed);
        if matches!(self.ctx.mode, Mode::Hold) {
            c.settled
                .store(self.pending.is_empty() && self.ctx.in_flight == 0, Relaxed);
        }
    }

    /// Soak: carries out the coordinator's Close commands.
    fn take_commands(&mut self) {
        loop {
            let Mode::Soak { commands, .. } = &self.ctx.mode else {
                return;
            };
            let Ok(close) = commands.try_recv() else {
                return;
            };
            self.close(close);
        }
    }

    /// The next connection to start now: its slot (hold, soak) or number (churn).
    fn next_slot(&mut self, now: Instant) -> Option<usize> {
        if let Mode::Churn { until } = self.ctx.mode {
            let plan = &self.ctx.plan;
            return (now < until).then(|| plan.thread + self.started * plan.threads);
        }
        let &Reverse((not_before, slot)) = self.pending.peek()?;
        if not_before > now {
            return None;
        }
        self.pending.pop();
        Some(slot)
    }

    /// Starts connections until `max_in_flight` are outstanding.
    fn refill(&mut self, now: Instant) {
        while self.ctx.in_flight < self.ctx.plan.max_in_flight {
            let Some(slot) = self.next_slot(now) else {
                return;
            };
            let plan = &self.ctx.plan;
            let index = plan.thread + self.started * plan.threads;
            self.started += 1;
            let source =
                (!plan.sources.is_empty()).then(|| plan.sources[index % plan.sources.len()]);
            let user = (slot % plan.users) as u32;
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            let started = sock::connect(plan.server, source).and_then(|mut stream| {
                self.poll.registry().register(
                    &mut stream,
                    Token(key),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                Ok(stream)
            });
            match started {
                Ok(stream) => {
                    entry.insert(Conn {
                        stream,
                        state: State::Connecting,
                        slot,
                        user,
                        generation: self.started as u64,
                        started: now,
                        since: now,
                        w: 0,
                        delivered: 0,
                        last_seq: None,
                        wait_for: None,
                        inbuf: Vec::new(),
                        outbuf: Vec::new(),
                    });
                    self.ctx.in_flight += 1;
                    if matches!(self.ctx.mode, Mode::Soak { .. }) {
                        self.slot_key[slot / self.ctx.plan.threads] = Some(key);
                    }
                }
                Err(_) => {
                    self.ctx.report.failures.add(Fail::Socket);
                    if matches!(self.ctx.mode, Mode::Soak { .. }) {
                        self.pending
                            .push(Reverse((now + RETRY_AFTER_FAILURE, slot)));
                    }
                    // Out of fds or ports: try again after the next poll, not in a spin.
                    return;
                }
            }
        }
    }

    /// A Close command: drain, then close, the slot's connection if it is
    /// still the one the coordinator saw open. Otherwise the connection is
    /// already gone and its `Done` tells the coordinator.
    fn close(&mut self, close: Close) {
        let Some(key) = self.slot_key[close.slot / self.ctx.plan.threads] else {
            return;
        };
        let conn = &mut self.conns[key];
        if conn.generation != close.generation || conn.state != State::Open {
            return;
        }
        let now = Instant::now();
        conn.state = State::Draining;
        conn.since = now;
        conn.wait_for = close.wait_for;
        self.ctx.open -= 1;
        if conn.drained() {
            self.ctx.start_close(conn, now);
            if let Err(end) = flush(conn) {
                self.finish(key, end);
            }
        }
    }

    /// Ends handshakes older than `--connect-timeout`, drains and closes that
    /// took longer than the close timeout.
    fn expire(&mut self, now: Instant) {
        if self.conns.len() == self.ctx.open {
            return;
        }
        let plan = &self.ctx.plan;
        let due: Vec<(usize, State)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                let limit = match c.state {
                    State::Open => return false,
                    State::Draining | State::Closing => plan.close_timeout,
                    _ => plan.connect_timeout,
                };
                now.duration_since(c.since) > limit
            })
            .map(|(key, c)| (key, c.state))
            .collect();
        for (key, state) in due {
            match state {
                State::Draining => {
                    self.ctx.report.drain_timeouts += 1;
                    let conn = &mut self.conns[key];
                    self.ctx.start_close(conn, now);
                    if let Err(end) = flush(conn) {
                        self.finish(key, end);
                    }
                }
                State::Closing => {
                    self.ctx.report.close_timeouts += 1;
                    self.finish(key, End::Gone);
                }
                _ => self.finish(key, End::Failed(Fail::Timeout)),
            }
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
            end = flush(&mut self.conns[key]).err();
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
                Ok(0) => break Some(End::Gone),
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
                Err(_) => break Some(End::Gone),
            }
        };
        if end.is_none() && filled > 0 {
            conn.inbuf.extend_from_slice(&buf[..filled]);
        }
        self.scratch = buf;
        end
    }

    /// Removes a connection and counts how it ended; soak: tells the
    /// coordinator and queues the slot to reopen. Closing the socket also
    /// removes it from the epoll set, so there is no separate deregister.
    fn finish(&mut self, key: usize, end: End) {
        let conn = self.conns.remove(key);
        let now = Instant::now();
        let ctx = &mut self.ctx;
        let churn = matches!(ctx.mode, Mode::Churn { .. });
        if conn.state.handshaking() || churn {
            ctx.in_flight -= 1;
        }
        let (ended, reopen_at) = match conn.state {
            _ if conn.state.handshaking() => {
                ctx.report.failures.add(match end {
                    End::Failed(fail) => fail,
                    End::Gone => Fail::Closed,
                });
                (None, now + RETRY_AFTER_FAILURE)
            }
            State::Closing => {
                ctx.report.cycles += 1;
                (Some(Ended::Churned), now)
            }
            _ => {
                if conn.state == State::Open {
                    ctx.open -= 1;
                }
                ctx.report.lost += 1;
                if matches!(ctx.mode, Mode::Hold) {
                    ctx.shared.user_conns[conn.user as usize].fetch_sub(1, Relaxed);
                }
                let issued = ctx.shared.issued.load(SeqCst);
                (Some(Ended::Lost { issued }), now + RETRY_AFTER_LOSS)
            }
        };
        if let Mode::Soak { events, .. } = &ctx.mode {
            self.slot_key[conn.slot / ctx.plan.threads] = None;
            if let Some(ended) = ended {
                send(
                    events,
                    Event::Done {
                        slot: conn.slot,
                        generation: conn.generation,
                        delivered: conn.delivered,
                        ended,
                    },
                );
            }
            self.pending.push(Reverse((reopen_at, conn.slot)));
        }
    }
}

/// Sends an event to the soak coordinator.
fn send(events: &Sender<Event>, event: Event) {
    // The coordinator outlives the threads; a send can only fail after it
    // gave up, when nothing is counted any more.
    let _ = events.send(event);
}

/// Writes queued output until done or `WouldBlock`; `Err` when the socket is gone.
fn flush(conn: &mut Conn) -> Result<(), End> {
    while !conn.outbuf.is_empty() {
        match conn.stream.write(&conn.outbuf) {
            Ok(0) => return Err(End::Gone),
            Ok(n) => {
                conn.outbuf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
            Err(_) => return Err(End::Gone),
        }
    }
    if conn.outbuf.capacity() > 0 {
        // The request is sent once; do not keep its buffer per connection.
        conn.outbuf = Vec::new();
    }
    Ok(())
}

impl Ctx {
    fn counters(&self) -> &Counters {
        &self.shared.counters[self.plan.thread]
    }

    fn mask(&mut self) -> [u8; 4] {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng as u32).to_le_bytes()
    }

    /// Queues the masked close frame (soak: and tells the coordinator).
    fn start_close(&mut self, conn: &mut Conn, now: Instant) {
        let mask = self.mask();
        frame::push_masked_control(&mut conn.outbuf, OP_CLOSE, &CLOSE_NORMAL, mask);
        conn.state = State::Closing;
        conn.since = now;
        if let Mode::Soak { events, .. } = &self.mode {
            send(
                events,
                Event::CloseSent {
                    slot: conn.slot,
                    generation: conn.generation,
                },
            );
        }
    }

    /// Handles every complete unit in `buf` (the response head, then frames):
    /// returns the bytes consumed and, if the connection must end, how.
    fn consume(&mut self, conn: &mut Conn, buf: &mut [u8]) -> (usize, Option<End>) {
        let mut pos = 0;
        if conn.state == State::Upgrading {
            match frame::parse_upgrade(buf) {
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
            let head = match frame::parse_head(&buf[pos..]) {
                Ok(Some(head)) if head.total_len() <= buf.len() - pos => head,
                Ok(_) => break,
                Err(_) => return (pos, Some(End::Failed(Fail::Protocol))),
            };
            let payload = &mut buf[pos + head.header_len..pos + head.total_len()];
            pos += head.total_len();
            if let Some(mask) = head.mask {
                frame::apply_mask(payload, mask);
                self.report.masked_frames += 1;
            }
            match head.opcode {
                OP_TEXT | OP_CONTINUATION => match (conn.state, frame::parse_bench(payload)) {
                    (State::Open | State::Draining, Some((seq, t))) => {
                        if seq < conn.w {
                            self.report.before_open += 1;
                            continue;
                        }
                        let now = *now_us.get_or_insert_with(unix_micros);
                        self.report.latency.record(now.saturating_sub(t));
                        self.report.delivered += 1;
                        conn.delivered += 1;
                        conn.last_seq = conn.last_seq.max(Some(seq));
                        if conn.state == State::Draining && conn.drained() {
                            self.start_close(conn, Instant::now());
                        }
                    }
                    (State::Closing, Some(_)) => self.report.after_close += 1,
                    (State::AwaitConnected, None) if payload.starts_with(CONNECTED_PREFIX) => {
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
                    return (pos, Some(End::Gone));
                }
                _ => {}
            }
        }
        if pos > 0 && now_us.is_some() {
            self.report.last_receive = Some(Instant::now());
        }
        (pos, None)
    }

    /// The `connected` message arrived: the handshake is complete.
    fn opened(&mut self, conn: &mut Conn) {
        let now = Instant::now();
        let micros = now.duration_since(conn.started).as_micros() as u64;
        self.report.handshake.record(micros);
        self.report.opened += 1;
        self.report.first_open.get_or_insert(now);
        self.report.last_open = Some(now);
        if let Mode::Churn { .. } = self.mode {
            // The handshake slot is held until the connection is gone.
            return self.start_close(conn, now);
        }
        // Read after `connected` arrived, so after the server registered this
        // connection: every message from `w` on was published later.
        conn.w = self.shared.issued.load(SeqCst);
        conn.state = State::Open;
        self.in_flight -= 1;
        self.open += 1;
        match &self.mode {
            Mode::Hold => {
                self.shared.user_conns[conn.user as usize].fetch_add(1, Relaxed);
            }
            Mode::Soak { events, .. } => send(
                events,
                Event::Opened {
                    slot: conn.slot,
                    generation: conn.generation,
                    w: conn.w,
                },
            ),
            Mode::Churn { .. } => {}
        }
    }
}

/// Starts one client thread per `--threads`, thread `t` in `mode(t)`.
pub fn spawn(
    options: &Options,
    sources: &Arc<[Ipv4Addr]>,
    shared: &Arc<Shared>,
    mut mode: impl FnMut(usize) -> Mode,
) -> Result<Vec<JoinHandle<io::Result<Report>>>, Box<dyn Error>> {
    let requests = Arc::new(token::upgrade_requests(options)?);
    let mut handles = Vec::with_capacity(options.threads);
    for thread in 0..options.threads {
        let plan = Plan {
            thread,
            threads: options.threads,
            connections: options.connections,
            users: options.users,
            max_in_flight: options.concurrency.div_ceil(options.threads),
            connect_timeout: options.connect_timeout,
            // The handshake preset bounds its close by --connect-timeout.
            close_timeout: if options.preset == Preset::Soak {
                options.close_timeout
            } else {
                options.connect_timeout
            },
            server: options.server,
            sources: sources.clone(),
            requests: requests.clone(),
        };
        let client = Client::new(plan, mode(thread), shared.clone())?;
        handles.push(
            thread::Builder::new()
                .name(format!("bench-client-{thread}"))
                .spawn(move || client.run())?,
        );
    }
    Ok(handles)
}

/// Waits for every client thread and merges their reports.
pub fn join(handles: Vec<JoinHandle<io::Result<Report>>>) -> Result<Report, String> {
    let mut total = Report::default();
    let mut error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(report)) => total.merge(report),
            Ok(Err(e)) => error = Some(format!("client thread: {e}")),
            Err(_) => error = Some("a client thread panicked".into()),
        }
    }
    error.map_or(Ok(total), Err)
}
