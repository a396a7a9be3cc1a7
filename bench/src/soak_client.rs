//! Soak client threads: each keeps its share of the connection slots open
//! (thread `t` of `T` owns slots `t, t + T, ...`; slot `i` is user `i % U`),
//! closes a slot's connection when the coordinator (the main thread, see
//! `soak.rs`) asks, and reopens the slot at once.
//!
//! A connection's life:
//!
//! ```text
//! Connecting -> Upgrading -> AwaitConnected --`connected`: Opened{w}--> Open
//!     --Close command--> Draining --last expected seq seen (or --close-timeout)-->
//!     Closing (masked close frame sent: CloseSent) --server close + EOF (or
//!     --close-timeout)--> Done{Churned}; the slot reconnects
//! ```
//!
//! Counting (the coordinator decides what is expected; see `soak.rs`):
//! - `w`, read from `SoakShared::issued` when `connected` arrives, is the
//!   first message sequence number that was certainly published after the
//!   server had registered this connection. Messages with a lower `seq` may or
//!   may not reach it: they are excluded (counted apart as `before_open`).
//! - While Draining, the connection's user gets no new messages; the
//!   connection waits for the last one published to its user (in-order
//!   delivery: Redis to the gateway and the gateway to each connection keep
//!   order), then closes. Anything arriving after our close frame is counted
//!   apart (`after_close`), never as delivered.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::client::{Counters, Fail, Failures, unix_micros};
use crate::frame::{
    self, CONNECTED_PREFIX, MAX_RESPONSE_HEAD, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG,
    OP_TEXT, Upgrade,
};
use crate::histogram::Histogram;
use crate::sock;

/// Poll timeout: how late a thread sees a command or the stop flag.
const POLL_TIMEOUT: Duration = Duration::from_millis(5);
/// How often deadlines (handshake, drain, close) are checked.
const DEADLINE_SCAN: Duration = Duration::from_millis(100);
/// Wait before reconnecting a slot whose handshake failed.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Wait before reconnecting a slot whose open connection the server ended.
const RETRY_AFTER_LOSS: Duration = Duration::from_millis(100);
const READ_BUFFER: usize = 64 << 10;
/// Close frame payload: status 1000, normal closure.
const CLOSE_NORMAL: [u8; 2] = 1000u16.to_be_bytes();

/// State shared by the coordinator and the soak client threads.
pub struct SoakShared {
    pub stop: AtomicBool,
    /// Messages with `seq < issued` may have been sent to Redis. The
    /// coordinator stores it (SeqCst) before it sends each pipeline.
    pub issued: AtomicU64,
    /// One per thread (`settled` unused).
    pub counters: Vec<Counters>,
}

impl SoakShared {
    pub fn new(threads: usize) -> SoakShared {
        SoakShared {
            stop: AtomicBool::new(false),
            issued: AtomicU64::new(0),
            counters: (0..threads).map(|_| Counters::default()).collect(),
        }
    }

    pub fn sum(&self, field: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        self.counters.iter().map(|c| field(c).load(Relaxed)).sum()
    }
}

/// Coordinator to thread.
#[derive(Debug)]
pub struct Close {
    pub slot: usize,
    pub generation: u64,
    /// The last message published to the slot's user before the user was
    /// blocked: the connection waits until it has seen it (if it is `>= w`).
    pub wait_for: Option<u64>,
}

/// How an opened connection ended.
#[derive(Debug, Clone, Copy)]
pub enum Ended {
    /// Closed by churn (cleanly, or after `--close-timeout`).
    Churned,
    /// Closed or reset by the server; `issued` when it was noticed.
    Lost { issued: u64 },
}

/// Thread to coordinator.
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

/// A connection still open when the run ended.
#[derive(Debug, Clone, Copy)]
pub struct StillOpen {
    pub slot: usize,
    pub generation: u64,
    pub delivered: u64,
}

/// What one thread saw.
#[derive(Default)]
pub struct SoakReport {
    pub latency: Histogram,
    pub handshake: Histogram,
    pub failures: Failures,
    pub opened: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Churn closes that completed (server close + EOF, or timeout).
    pub churn_closed: u64,
    /// Draining connections that did not see their last message in time.
    pub drain_timeouts: u64,
    /// Closing connections the server did not close in time.
    pub close_timeouts: u64,
    /// Bench messages with `seq < w` (published around the open: excluded).
    pub before_open: u64,
    /// Bench messages after our close frame (excluded).
    pub after_close: u64,
    pub other_frames: u64,
    pub pings: u64,
    pub masked_frames: u64,
    pub still_open: Vec<StillOpen>,
}

impl SoakReport {
    pub fn merge(&mut self, other: SoakReport) {
        self.latency.merge(&other.latency);
        self.handshake.merge(&other.handshake);
        self.failures.merge(&other.failures);
        self.opened += other.opened;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.churn_closed += other.churn_closed;
        self.drain_timeouts += other.drain_timeouts;
        self.close_timeouts += other.close_timeouts;
        self.before_open += other.before_open;
        self.after_close += other.after_close;
        self.other_frames += other.other_frames;
        self.pings += other.pings;
        self.masked_frames += other.masked_frames;
        self.still_open.extend(other.still_open);
    }
}

/// What one thread is to do.
pub struct SoakPlan {
    pub thread: usize,
    pub threads: usize,
    pub connections: usize,
    pub users: usize,
    pub max_in_flight: usize,
    pub connect_timeout: Duration,
    pub close_timeout: Duration,
    pub server: SocketAddrV4,
    pub sources: Arc<[Ipv4Addr]>,
    pub requests: Arc<Vec<Box<[u8]>>>,
    pub accept: Arc<[u8]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Upgrading,
    AwaitConnected,
    Open,
    Draining,
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

/// How a connection ends.
#[derive(Debug, Clone, Copy)]
enum End {
    /// EOF, reset, a server close frame or a protocol error: what it means
    /// depends on the state.
    Gone,
    /// The handshake failed for this reason.
    Failed(Fail),
}

struct Conn {
    stream: TcpStream,
    state: State,
    slot: usize,
    user: u32,
    generation: u64,
    /// Start of the current phase (handshake, drain, close) for its deadline.
    since: Instant,
    /// Connect start, for the handshake latency.
    started: Instant,
    w: u64,
    delivered: u64,
    /// Highest bench `seq >= w` received.
    last_seq: Option<u64>,
    wait_for: Option<u64>,
    inbuf: Vec<u8>,
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

struct Ctx {
    plan: SoakPlan,
    shared: Arc<SoakShared>,
    events: Sender<Event>,
    report: SoakReport,
    /// Connections of this thread still in their handshake.
    in_flight: usize,
    rng: u64,
}

impl Ctx {
    fn mask(&mut self) -> [u8; 4] {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng as u32).to_le_bytes()
    }

    fn send(&self, event: Event) {
        // The coordinator outlives the threads; a send can only fail after it
        // gave up, when nothing is counted any more.
        let _ = self.events.send(event);
    }

    /// Sends the masked close frame and tells the coordinator.
    fn start_close(&mut self, conn: &mut Conn, now: Instant) {
        let mask = self.mask();
        frame::push_masked_control(&mut conn.outbuf, OP_CLOSE, &CLOSE_NORMAL, mask);
        conn.state = State::Closing;
        conn.since = now;
        self.send(Event::CloseSent {
            slot: conn.slot,
            generation: conn.generation,
        });
    }

    /// Handles the response head and every complete frame in `buf`.
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
                // The answer to our close: the server closes TCP next.
                OP_CLOSE if conn.state == State::Closing => {}
                OP_CLOSE => {
                    let mask = self.mask();
                    let status = payload.get(..2).unwrap_or(&CLOSE_NORMAL).to_vec();
                    frame::push_masked_control(&mut conn.outbuf, OP_CLOSE, &status, mask);
                    let _ = flush(conn);
                    return (pos, Some(End::Gone));
                }
                _ => {}
            }
        }
        (pos, None)
    }

    fn opened(&mut self, conn: &mut Conn) {
        let now = Instant::now();
        // Read after `connected` arrived, so after the server registered this
        // connection: every message from `w` on was published later.
        conn.w = self.shared.issued.load(SeqCst);
        conn.state = State::Open;
        self.in_flight -= 1;
        self.report.opened += 1;
        self.report
            .handshake
            .record(now.duration_since(conn.started).as_micros() as u64);
        self.send(Event::Opened {
            slot: conn.slot,
            generation: conn.generation,
            w: conn.w,
        });
    }
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
    if conn.outbuf.capacity() > 0 && conn.state != State::Connecting {
        conn.outbuf = Vec::new();
    }
    Ok(())
}

/// One soak client thread.
pub struct SoakClient {
    ctx: Ctx,
    poll: Poll,
    commands: Receiver<Close>,
    conns: Slab<Conn>,
    /// Slab key of each owned slot's connection (index: slot / threads).
    slot_key: Vec<Option<usize>>,
    /// Slots to (re)connect, each not before its instant, earliest first.
    pending: BinaryHeap<Reverse<(Instant, usize)>>,
    generation: u64,
    scratch: Vec<u8>,
}

impl SoakClient {
    pub fn new(
        plan: SoakPlan,
        shared: Arc<SoakShared>,
        commands: Receiver<Close>,
        events: Sender<Event>,
    ) -> io::Result<SoakClient> {
        let now = Instant::now();
        let owned: Vec<usize> = (plan.thread..plan.connections)
            .step_by(plan.threads)
            .collect();
        let rng =
            0x9E37_79B9_7F4A_7C15 ^ (plan.thread as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
        Ok(SoakClient {
            slot_key: vec![None; owned.len()],
            pending: owned.into_iter().map(|slot| Reverse((now, slot))).collect(),
            ctx: Ctx {
                plan,
                shared,
                events,
                report: SoakReport::default(),
                in_flight: 0,
                rng,
            },
            poll: Poll::new()?,
            commands,
            conns: Slab::new(),
            generation: 0,
            scratch: vec![0; READ_BUFFER],
        })
    }

    /// Runs until the stop flag; returns the counts and the connections
    /// still open.
    pub fn run(mut self) -> io::Result<SoakReport> {
        let mut events = Events::with_capacity(1024);
        let mut next_scan = Instant::now() + DEADLINE_SCAN;
        while !self.ctx.shared.stop.load(SeqCst) {
            while let Ok(close) = self.commands.try_recv() {
                self.close(close);
            }
            self.refill(Instant::now());
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
        let still_open = self
            .conns
            .iter()
            .filter(|(_, c)| !c.state.handshaking())
            .map(|(_, c)| StillOpen {
                slot: c.slot,
                generation: c.generation,
                delivered: c.delivered,
            })
            .collect();
        self.ctx.report.still_open = still_open;
        Ok(self.ctx.report)
    }

    fn publish_progress(&self) {
        let c = &self.ctx.shared.counters[self.ctx.plan.thread];
        let r = &self.ctx.report;
        c.opened.store(r.opened, Relaxed);
        c.failed.store(r.failures.total(), Relaxed);
        c.delivered.store(r.delivered, Relaxed);
        c.lost.store(r.lost, Relaxed);
    }

    fn local(&self, slot: usize) -> usize {
        slot / self.ctx.plan.threads
    }

    fn refill(&mut self, now: Instant) {
        while self.ctx.in_flight < self.ctx.plan.max_in_flight {
            let Some(&Reverse((not_before, slot))) = self.pending.peek() else {
                return;
            };
            if not_before > now {
                return;
            }
            self.pending.pop();
            self.generation += 1;
            let sources = &self.ctx.plan.sources;
            let source =
                (!sources.is_empty()).then(|| sources[self.generation as usize % sources.len()]);
            let user = slot % self.ctx.plan.users;
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            let started = sock::connect(self.ctx.plan.server, source).and_then(|mut stream| {
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
                        user: user as u32,
                        generation: self.generation,
                        since: now,
                        started: now,
                        w: 0,
                        delivered: 0,
                        last_seq: None,
                        wait_for: None,
                        inbuf: Vec::new(),
                        outbuf: Vec::new(),
                    });
                    let local = self.local(slot);
                    self.slot_key[local] = Some(key);
                    self.ctx.in_flight += 1;
                }
                Err(_) => {
                    // Out of fds or ports: retry later, not in a spin.
                    self.ctx.report.failures.add(Fail::Socket);
                    self.pending
                        .push(Reverse((now + RETRY_AFTER_FAILURE, slot)));
                    return;
                }
            }
        }
    }

    /// A Close command: drain, then close, the slot's connection if it is
    /// still the one the coordinator saw open. Otherwise the connection is
    /// already gone and its `Done` tells the coordinator.
    fn close(&mut self, close: Close) {
        let local = self.local(close.slot);
        let Some(key) = self.slot_key[local] else {
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
        if conn.drained() {
            self.ctx.start_close(conn, now);
            if let Err(end) = flush(conn) {
                self.finish(key, end);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
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

    /// Removes a connection, reports how it ended and queues its slot to reconnect.
    fn finish(&mut self, key: usize, end: End) {
        let conn = self.conns.remove(key);
        let local = self.local(conn.slot);
        self.slot_key[local] = None;
        let now = Instant::now();
        let ctx = &mut self.ctx;
        if conn.state.handshaking() {
            ctx.in_flight -= 1;
            let fail = match end {
                End::Failed(fail) => fail,
                End::Gone => Fail::Closed,
            };
            ctx.report.failures.add(fail);
            self.pending
                .push(Reverse((now + RETRY_AFTER_FAILURE, conn.slot)));
            return;
        }
        let (ended, retry) = if conn.state == State::Closing {
            ctx.report.churn_closed += 1;
            (Ended::Churned, now)
        } else {
            ctx.report.lost += 1;
            let issued = ctx.shared.issued.load(SeqCst);
            (Ended::Lost { issued }, now + RETRY_AFTER_LOSS)
        };
        ctx.send(Event::Done {
            slot: conn.slot,
            generation: conn.generation,
            delivered: conn.delivered,
            ended,
        });
        self.pending.push(Reverse((retry, conn.slot)));
    }
}
