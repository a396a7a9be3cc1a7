//! One client connection, owned by the event loop's slab. The connection decides,
//! the loop carries out: the loop hands it an event (`on_ready`, `read`,
//! `on_deadline`, `shut_down`, `queue_message`) and gets back a [`Step`] (evaluate
//! the request head, answer pongs, read again next turn, a session [`Ended`]); then
//! `settle` writes what is queued and answers [`Next`]: keep it (reregister with
//! this interest, arm a timer at this deadline) or remove it. The loop keeps the
//! poll registry, the timer heap, the hub and the metrics; the connection's fields
//! are its own.
//!
//! Life cycle (each state owns its data; transitions replace the state by value):
//!
//! ```text
//! Handshake --(head complete, refused or /health, /metrics)--> Respond --> Done
//!     |                                                        (answer written, write side shut,
//!     |                                                         input drained until EOF or deadline)
//!     +--(valid upgrade)--> Open --(server closes: 1001, 1013, 4001, 4008, 1002, 1007, 1009)--> Closing --> Done
//!                             |                                   (close frame queued, waiting for the
//!                             +--(client close: reply queued)-->   peer's close, the flush, or the deadline)
//!                             +--(EOF, I/O error, pong timeout)--> Done
//! ```
//!
//! `Done` is terminal: the next `settle` answers `Next::Remove`, so a connection is
//! never kept without a deadline in the loop's timer heap. Every kept state has one
//! (see `Connection::deadline`).
//!
//! Reading and writing are separate paths: `fill_head`/`read_frames` read until
//! `WouldBlock` (mio is edge-triggered) or a budget; `flush` writes the
//! `OutboundQueue` until it is empty or the socket is full, and the connection asks
//! for `WRITABLE` only while output is pending. Unit tests drive the transitions
//! over an in-memory socket (`mock::MockStream`) with `WouldBlock` and short writes.
//!
//! An open session's token can be replaced in place (`refresh`): the read path
//! collects `{"type":"refresh"}` requests, the loop checks them with the upgrade's
//! rules (`Connection::answer_refreshes`), and the `token_expiring` notice is one
//! more deadline of the session.

pub mod handshake;
pub mod outbound;
pub mod refresh;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::protocol::{Message, Role, WebSocketConfig, WebSocketContext};

use crate::history::StreamId;
use crate::latency::Stamp;
use crate::message::Frame;
use crate::metrics::WriteMetrics;
use handshake::Endpoints;
pub use outbound::Deliveries;
use outbound::{FlushResult, FrameLimit, OutboundQueue};

/// Largest amount read from a socket in one `read` call during the handshake.
const HEAD_READ_CHUNK: usize = 1024;
/// Initial read buffer of a session (tungstenite allocates it up front and grows it
/// to a frame's size when one is larger). Clients send little: small pings and
/// pongs, `{"type":"ping"}`; every idle connection pays for this buffer.
const WS_READ_BUFFER: usize = 128;

/// tungstenite's settings for a server connection: small read buffer, no write
/// buffering (writes go straight into the outbound queue), and the message limit,
/// raised to what a refresh request may take (`read_frames` holds every other
/// message to `max_message_size`).
pub fn websocket_config(max_message_size: usize) -> WebSocketConfig {
    let largest = max_message_size.max(refresh::MAX_REFRESH_BYTES);
    WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(outbound::MAX_CONTROL_BYTES)
        .max_message_size(Some(largest))
        .max_frame_size(Some(largest))
}

/// Why a connection ended; feeds the log line and the metrics label alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame.
    ClientClosed,
    /// EOF or a socket error without a close frame.
    ConnectionLost,
    /// Nothing received within `WS_PONG_WAIT`.
    PongTimeout,
    /// Output made no progress within `WS_WRITE_WAIT` (close 4008).
    SlowClient,
    /// The token's `exp` passed (close 4001).
    TokenExpired,
    /// RFC 6455 violation (close 1002).
    ProtocolError,
    /// Text that is not UTF-8 (close 1007).
    InvalidUtf8,
    /// A data frame over `WS_MAX_MESSAGE_SIZE` (close 1009).
    MessageTooBig,
    /// The server is shutting down (close 1001).
    Shutdown,
    /// Anything else the server could not handle (close 1011).
    InternalError,
    /// Per-user subscription modes: Redis did not confirm the user's channel
    /// within the loop's bound (close 1013, try again later).
    SubscriptionTimeout,
}

impl CloseReason {
    pub const ALL: [CloseReason; 11] = [
        CloseReason::ClientClosed,
        CloseReason::ConnectionLost,
        CloseReason::PongTimeout,
        CloseReason::SlowClient,
        CloseReason::TokenExpired,
        CloseReason::ProtocolError,
        CloseReason::InvalidUtf8,
        CloseReason::MessageTooBig,
        CloseReason::Shutdown,
        CloseReason::InternalError,
        CloseReason::SubscriptionTimeout,
    ];

    /// Label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ConnectionLost => "connection_lost",
            CloseReason::PongTimeout => "pong_timeout",
            CloseReason::SlowClient => "slow_client",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::Shutdown => "shutdown",
            CloseReason::InternalError => "internal_error",
            CloseReason::SubscriptionTimeout => "subscription_timeout",
        }
    }

    /// The close frame the server sends for this reason, if any (README, close codes).
    pub fn close_frame(self) -> Option<(u16, &'static str)> {
        match self {
            CloseReason::ClientClosed | CloseReason::ConnectionLost | CloseReason::PongTimeout => {
                None
            }
            CloseReason::SlowClient => Some((4008, "slow client")),
            CloseReason::TokenExpired => Some((4001, "token expired")),
            CloseReason::ProtocolError => Some((1002, "protocol error")),
            CloseReason::InvalidUtf8 => Some((1007, "invalid utf-8")),
            CloseReason::MessageTooBig => Some((1009, "message too big")),
            CloseReason::Shutdown => Some((1001, "server shutting down")),
            CloseReason::InternalError => Some((1011, "internal error")),
            CloseReason::SubscriptionTimeout => Some((1013, "try again later")),
        }
    }

    /// Whether the server waits for the client's close reply (a clean close) rather
    /// than failing the connection at once (RFC 6455 7.1.7).
    fn awaits_reply(self) -> bool {
        matches!(
            self,
            CloseReason::SlowClient
                | CloseReason::TokenExpired
                | CloseReason::Shutdown
                | CloseReason::SubscriptionTimeout
        )
    }
}

/// The state of a connection; each variant owns what that state needs, and a
/// transition replaces the state by value.
enum State {
    /// Reading the HTTP request head.
    Handshake { head: Vec<u8>, deadline: Instant },
    /// Final bytes are queued: an HTTP answer, or the last close frame of a session.
    /// Once they are written the write side is shut and input is read and dropped
    /// until EOF or the deadline (a lingering close), so the peer gets those bytes
    /// rather than a reset for unread input.
    Respond { deadline: Instant, write_shut: bool },
    /// A WebSocket session.
    Open(Box<Session>),
    /// The server's close frame is queued; waiting for the client's close reply.
    Closing(Box<Closing>),
    /// Finished: the next `settle` tells the loop to remove the connection. Also
    /// the placeholder while a state is moved out, so a transition that forgot to
    /// put a state back ends the connection rather than leaving it without a timer.
    Done,
}

/// An open WebSocket session.
struct Session {
    ws: WebSocketContext,
    /// Shared with the hub's key.
    user_id: Rc<str>,
    /// When the token's `exp` (plus `JWT_LEEWAY`) passes: close 4001.
    expires_at: Instant,
    /// The token's `exp`, its expiry notice and the refresh rate.
    token: refresh::TokenState,
    /// Last time any byte arrived.
    last_seen: Instant,
    /// When the next ping frame is due.
    next_ping: Instant,
    /// History on: the state of the history read and what follows it; None
    /// without history, and again once a live message is newer than the read.
    resume: Option<Box<Resume>>,
}

/// A session's wait before `connected` (the user's channel subscription in
/// per-user modes, then the history read) and the history read's aftermath
/// (README: "History and resume", "Subscription modes"). Boxed in `Session`:
/// every idle connection pays for the fields it holds inline, and most
/// sessions have no resume state at all.
struct Resume {
    /// While the session waits for its user's channel subscription: when it
    /// gives up (close 1013).
    subscribe_by: Option<Instant>,
    /// While the subscription or the history read is awaited: the live
    /// messages that arrived meanwhile, with their ids and read times, held
    /// back so that `connected` and the replay go first.
    held: Option<Vec<(Frame, Option<StreamId>, Stamp)>>,
    /// Live messages dropped while held (the hold is bounded like the queue):
    /// the resume cannot be complete.
    held_dropped: usize,
    /// After the history read: the newest id it covered. A live message with an
    /// id up to it was already replayed (or precedes the client's position): the
    /// pub/sub copy can arrive after the read's answer, so it is skipped here
    /// until the first newer id shows every later one is new.
    replayed_through: Option<StreamId>,
}

/// A session waiting for the client to answer the server's close frame.
struct Closing {
    ws: WebSocketContext,
    deadline: Instant,
}

/// What a connection's socket must offer besides reading and writing.
pub trait Stream: Read + Write {
    /// Shuts the write side (a lingering close).
    fn shutdown_write(&self) -> io::Result<()>;
    /// The client's address, for the log.
    fn peer_addr(&self) -> io::Result<SocketAddr>;
}

impl Stream for TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::peer_addr(self)
    }
}

/// The loop's settings that the connection's decisions depend on.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub ping_interval: Duration,
    pub pong_wait: Duration,
    /// How long output may make no progress, and how long a close may take.
    pub write_wait: Duration,
    /// WebSocket messages read from one connection per turn.
    pub read_budget: usize,
    /// `WS_MAX_MESSAGE_SIZE`: largest client data message, a refresh request aside.
    pub max_message_size: usize,
    /// Set once shutdown has begun: closing handshakes must end by then.
    pub shutdown_deadline: Option<Instant>,
}

/// What the loop must do after the connection handled an event (before `settle`).
#[must_use]
#[derive(Debug)]
pub enum Step {
    /// Nothing besides `settle`.
    Continue,
    /// The request head grew: the loop evaluates it and calls `respond` or `open`.
    EvaluateHead,
    /// Frames were read: answer `pongs` `{"type":"ping"}` requests and the refresh
    /// requests (`Connection::answer_refreshes`); `more` when the read budget ran
    /// out and the connection must be read again next turn.
    Read {
        pongs: usize,
        more: bool,
        refreshes: refresh::Requests,
    },
    /// The session ended: the loop updates the hub, the metrics and the log.
    Ended(Ended),
    /// The request head did not arrive in time (counted by the loop).
    HandshakeTimedOut { connection_id: u64 },
}

/// What the loop must do once the connection has settled.
#[must_use]
#[derive(Debug)]
pub enum Next {
    /// Keep it: reregister the socket with this interest if given, and push a timer
    /// entry at `arm` if given (the connection's deadline moved earlier).
    Keep {
        reregister: Option<Interest>,
        arm: Option<Instant>,
    },
    /// Deregister and drop it; report the session's end first if there is one.
    Remove(Option<Ended>),
}

/// A session that ended, for the hub, the metrics and the log line.
#[derive(Debug)]
pub struct Ended {
    pub user_id: Rc<str>,
    pub connection_id: u64,
    pub reason: CloseReason,
    /// Since the connection was accepted.
    pub lived: Duration,
}

/// How queueing a message went.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Queued {
    /// Queued, and the connection was not yet marked for this turn's flush: the
    /// loop adds it to its list (once per connection per turn).
    First,
    /// Queued; the connection is already marked.
    Again,
    /// `WS_SEND_BUFFER` frames or `WS_SEND_BUFFER_BYTES` bytes are already
    /// waiting: dropped.
    Dropped,
    /// Already sent from the history on resume: skipped.
    Duplicate,
}

/// One client connection.
pub struct Connection<S = TcpStream> {
    socket: S,
    /// Unique for the life of the process (the `connection_id` clients see).
    id: u64,
    state: State,
    out: OutboundQueue,
    /// `WS_SEND_BUFFER_BYTES` of the session (set by `open`).
    send_buffer_bytes: usize,
    /// When the connection was accepted.
    accepted_at: Instant,
    /// Last time output made progress (or became pending).
    last_write_progress: Instant,
    /// Earliest deadline this connection has in the loop's timer heap.
    timer_at: Option<Instant>,
    /// Whether the socket is registered for `WRITABLE` too.
    writable_interest: bool,
    /// Whether the connection is in the loop's list of connections to flush.
    flush_pending: bool,
    /// The paths its listener serves.
    endpoints: Endpoints,
}

impl<S: Stream> Connection<S> {
    /// A connection in its handshake; the loop registers it for `READABLE` and
    /// calls `settle` to arm its deadline.
    pub fn new(
        socket: S,
        id: u64,
        now: Instant,
        handshake_deadline: Instant,
        endpoints: Endpoints,
    ) -> Self {
        Connection {
            socket,
            id,
            state: State::Handshake {
                head: Vec::new(),
                deadline: handshake_deadline,
            },
            out: OutboundQueue::default(),
            send_buffer_bytes: usize::MAX,
            accepted_at: now,
            last_write_progress: now,
            timer_at: None,
            writable_interest: false,
            flush_pending: false,
            endpoints,
        }
    }

    /// The paths the listener that accepted it serves.
    pub fn endpoints(&self) -> Endpoints {
        self.endpoints
    }

    /// The `connection_id` clients see.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The socket, for the poll registry only.
    pub fn socket_mut(&mut self) -> &mut S {
        &mut self.socket
    }

    /// The client's address, for the log.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.socket.peer_addr().ok()
    }

    /// The bytes of the request head read so far.
    pub fn head(&self) -> &[u8] {
        match &self.state {
            State::Handshake { head, .. } => head,
            _ => &[],
        }
    }

    /// The socket is ready: write what waits, then read (the request head, frames,
    /// or the input a lingering close drops). What is written is recorded in `writes`.
    pub fn on_ready(
        &mut self,
        readable: bool,
        writable: bool,
        limits: &Limits,
        now: Instant,
        writes: &mut WriteMetrics,
    ) -> Step {
        if writable && !self.out.is_empty() && self.flush(now, writes).is_err() {
            return self.end(CloseReason::ConnectionLost, limits, now);
        }
        if !readable {
            return Step::Continue;
        }
        match &self.state {
            State::Handshake { .. } => match self.fill_head() {
                HeadRead::Progress => Step::EvaluateHead,
                HeadRead::WouldBlock => Step::Continue,
                HeadRead::Closed => {
                    self.state = State::Done;
                    Step::Continue
                }
            },
            State::Respond {
                write_shut: true, ..
            } => {
                if self.drain_input() {
                    self.state = State::Done;
                }
                Step::Continue
            }
            State::Open(_) | State::Closing(_) => self.read(limits, now),
            State::Respond { .. } | State::Done => Step::Continue,
        }
    }

    /// Reads WebSocket frames until `WouldBlock`, the budget, or the session's end.
    pub fn read(&mut self, limits: &Limits, now: Instant) -> Step {
        let (ws, discard_writes, refresh_room) = match &mut self.state {
            State::Open(session) => (&mut session.ws, false, session.token.room(now)),
            // Replies to the peer's close are not needed: ours is already queued.
            State::Closing(closing) => (&mut closing.ws, true, 0),
            _ => return Step::Continue,
        };
        let mut refreshes = refresh::Requests::with_room(refresh_room);
        let read = read_frames(
            ws,
            &mut self.socket,
            &mut self.out,
            limits.read_budget,
            discard_writes,
            limits.max_message_size,
            &mut refreshes,
        );
        // Pong messages and refreshes answer only an open session.
        let mut pongs = 0;
        if let State::Open(session) = &mut self.state {
            pongs = read.ping_requests;
            session.token.take_room(&refreshes);
            if read.bytes_read > 0 {
                session.last_seen = now;
            }
        } else {
            refreshes = refresh::Requests::default();
        }
        match read.result {
            FramesRead::WouldBlock => Step::Read {
                pongs,
                more: false,
                refreshes,
            },
            FramesRead::BudgetSpent => Step::Read {
                pongs,
                more: true,
                refreshes,
            },
            FramesRead::Closed(reason) => self.end(reason, limits, now),
        }
    }

    /// Answers a plain HTTP request; the connection closes once the answer is written.
    pub fn respond(&mut self, answer: &[u8], now: Instant, deadline: Instant) {
        debug_assert!(
            matches!(self.state, State::Handshake { .. }),
            "respond outside the handshake"
        );
        self.queue_control(answer, now);
        self.state = State::Respond {
            deadline,
            write_shut: false,
        };
    }

    /// Completes the upgrade: queues the 101 answer and the `connected` message and
    /// hands bytes that followed the head to the WebSocket reader (the loop then
    /// calls `read`, for frames that came with the request).
    pub fn open(
        &mut self,
        answer: &[u8],
        connected: Frame,
        head_len: usize,
        session: SessionParams,
    ) {
        self.open_session(answer, Some(connected), None, head_len, session);
    }

    /// Completes the upgrade like `open`, but `connected` waits for the user's
    /// history read: live messages are held until `finish_history`.
    pub fn open_awaiting_history(
        &mut self,
        answer: &[u8],
        head_len: usize,
        session: SessionParams,
    ) {
        self.open_session(answer, None, None, head_len, session);
    }

    /// Completes the upgrade like `open_awaiting_history`, but the session
    /// first waits for its user's channel subscription (per-user modes): the
    /// loop calls `subscription_confirmed` when Redis confirmed it; past
    /// `subscribe_by` the session closes with 1013.
    pub fn open_awaiting_subscription(
        &mut self,
        answer: &[u8],
        head_len: usize,
        session: SessionParams,
        subscribe_by: Instant,
    ) {
        self.open_session(answer, None, Some(subscribe_by), head_len, session);
    }

    fn open_session(
        &mut self,
        answer: &[u8],
        connected: Option<Frame>,
        subscribe_by: Option<Instant>,
        head_len: usize,
        session: SessionParams,
    ) {
        let State::Handshake { head, .. } = std::mem::replace(&mut self.state, State::Done) else {
            debug_assert!(false, "open outside the handshake");
            return;
        };
        // Bytes pipelined after the head (a first frame sent with the request) are not
        // lost. Copied out rather than reusing `head`: tungstenite would keep the head
        // buffer's whole allocation (kilobytes) as its read buffer for the session's life.
        let rest = head.get(head_len..).unwrap_or_default().to_vec();
        let ws = WebSocketContext::from_partially_read(rest, Role::Server, Some(session.ws_config));
        self.queue_control(answer, session.now);
        self.send_buffer_bytes = session.send_buffer_bytes;
        let resume = match connected {
            Some(connected) => {
                // The first message is always accepted: the queue is empty.
                self.out.push_reply(connected, FrameLimit::NONE);
                None
            }
            None => Some(Box::new(Resume {
                subscribe_by,
                held: Some(Vec::new()),
                held_dropped: 0,
                replayed_through: None,
            })),
        };
        self.state = State::Open(Box::new(Session {
            ws,
            user_id: session.user_id,
            expires_at: session.expires_at,
            token: refresh::TokenState::new(session.token_exp, session.expiry_notice, session.now),
            last_seen: session.now,
            next_ping: session.now + session.ping_interval,
            resume,
        }));
    }

    /// Queues a published message like `queue_message`; while the session waits
    /// for its history read the message is held instead (up to `limit`, counted
    /// as queued: `Queued::Again`, nothing to flush yet), and one the history
    /// read already covered is skipped (`Queued::Duplicate`).
    pub fn queue_published(
        &mut self,
        frame: Frame,
        id: Option<StreamId>,
        read_at: Stamp,
        limit: usize,
        now: Instant,
    ) -> Queued {
        if let State::Open(session) = &mut self.state
            && let Some(resume) = &mut session.resume
        {
            if let Some(held) = &mut resume.held {
                if held.len() >= limit {
                    resume.held_dropped += 1;
                    return Queued::Dropped;
                }
                held.push((frame, id, read_at));
                return Queued::Again;
            }
            if let (Some(id), Some(through)) = (id, resume.replayed_through) {
                if id <= through {
                    return Queued::Duplicate;
                }
                // Every later id is new: the resume is over.
                session.resume = None;
            }
        }
        self.queue_message(frame, read_at, limit, now)
    }

    /// The user's channel subscription is confirmed: the session stops
    /// waiting for it. It still holds live messages until `finish_history`
    /// (the loop asks for the history read, or finishes at once without
    /// history). False when the session was not waiting for it (it closed
    /// meanwhile, or was confirmed already).
    pub fn subscription_confirmed(&mut self) -> bool {
        match &mut self.state {
            State::Open(session) => session
                .resume
                .as_mut()
                .and_then(|resume| resume.subscribe_by.take())
                .is_some(),
            _ => false,
        }
    }

    /// Whether the session still waits for its subscription or its history
    /// read (nothing but the 101 has been sent).
    fn awaits_connected(&self) -> bool {
        matches!(
            &self.state,
            State::Open(session) if session.resume.as_ref().is_some_and(|r| r.held.is_some())
        )
    }

    /// Live messages dropped while waiting for the history read (a resume is
    /// then incomplete: they were published after the read's position).
    pub fn held_dropped(&self) -> usize {
        match &self.state {
            State::Open(session) => session.resume.as_ref().map_or(0, |r| r.held_dropped),
            _ => 0,
        }
    }

    /// The history read is done: queues `connected`, the replayed messages in
    /// order, then the held live messages except those with an id up to
    /// `seen` (the newest id the read covered: already replayed, or older than
    /// the client's position); `skipped` hears the read time of each one
    /// skipped. Returns how many were skipped, or None when the session is not
    /// waiting for history (closed meanwhile). The loop settles the connection
    /// afterwards.
    pub fn finish_history(
        &mut self,
        connected: Frame,
        replay: Vec<(StreamId, Frame)>,
        seen: Option<StreamId>,
        now: Instant,
        mut skipped: impl FnMut(Stamp),
    ) -> Option<usize> {
        let State::Open(session) = &mut self.state else {
            return None;
        };
        let resume = session.resume.as_mut()?;
        if resume.subscribe_by.is_some() {
            debug_assert!(false, "history finished before the subscription");
            return None;
        }
        let held = resume.held.take()?;
        resume.replayed_through = seen;
        if self.out.is_empty() {
            self.last_write_progress = now;
        }
        // Bounded by the history size and the send buffer: always accepted.
        // `connected` and the replay are the server's own answer to this
        // connection (the replay is counted as such), not deliveries of messages
        // read from Redis; the held live messages are deliveries.
        self.out.push_reply(connected, FrameLimit::NONE);
        for (_, frame) in replay {
            self.out.push_reply(frame, FrameLimit::NONE);
        }
        let mut skipped_count = 0;
        for (frame, id, read_at) in held {
            if let (Some(id), Some(seen)) = (id, resume.replayed_through) {
                if id <= seen {
                    skipped_count += 1;
                    skipped(read_at);
                    continue;
                }
                resume.replayed_through = None;
            }
            self.out.push_message(frame, read_at, FrameLimit::NONE);
        }
        if resume.replayed_through.is_none() {
            session.resume = None;
        }
        Some(skipped_count)
    }

    /// Queues a published message's frame (a delivery; its message was read from
    /// Redis at `read_at`), unless `limit` frames or `WS_SEND_BUFFER_BYTES` bytes
    /// are already waiting. The hot path: no allocation, no system call (the loop
    /// flushes once per turn).
    pub fn queue_message(
        &mut self,
        frame: Frame,
        read_at: Stamp,
        limit: usize,
        now: Instant,
    ) -> Queued {
        let limit = FrameLimit {
            frames: limit,
            bytes: self.send_buffer_bytes,
        };
        if self.out.is_empty() {
            self.last_write_progress = now;
        }
        if !self.out.push_message(frame, read_at, limit) {
            return Queued::Dropped;
        }
        if self.flush_pending {
            Queued::Again
        } else {
            self.flush_pending = true;
            Queued::First
        }
    }

    /// Queues a message of the server's own (a pong, any answer to the client)
    /// within the same bounds as published messages, but not as a delivery (see
    /// `take_deliveries`). False when the queue is full. Not marked for the
    /// turn's flush: the loop settles a connection right after handling it.
    pub fn queue_reply(&mut self, frame: Frame, limit: usize, now: Instant) -> bool {
        let limit = FrameLimit {
            frames: limit,
            bytes: self.send_buffer_bytes,
        };
        if self.out.is_empty() {
            self.last_write_progress = now;
        }
        self.out.push_reply(frame, limit)
    }

    /// Queues `count` pong messages for `{"type":"ping"}` requests (replies, not
    /// deliveries); returns how many were dropped for a full queue. While the
    /// session waits for its subscription or history read none are sent:
    /// `connected` comes first.
    pub fn queue_pongs(&mut self, pong: &Frame, count: usize, limit: usize, now: Instant) -> usize {
        if self.awaits_connected() {
            return count;
        }
        (0..count)
            .filter(|_| !self.queue_reply(pong.clone(), limit, now))
            .count()
    }

    /// Checks and answers the refresh requests `read` reported (README, "Refreshing
    /// the token"): each answer is queued as a reply (bounded by `limit`, not a delivery);
    /// `outcome` hears how each request ended and whether its answer was dropped
    /// for a full queue. A session that is no longer open ignores them.
    pub fn answer_refreshes(
        &mut self,
        requests: refresh::Requests,
        rules: &refresh::Rules<'_>,
        limit: usize,
        now: Instant,
        mut outcome: impl FnMut(refresh::Outcome, bool),
    ) {
        let State::Open(session) = &mut self.state else {
            return;
        };
        let Session {
            token,
            user_id,
            expires_at,
            ..
        } = &mut **session;
        let mut answers = Vec::with_capacity(requests.len());
        token.answer(
            requests,
            user_id,
            expires_at,
            rules,
            now,
            |frame, result| {
                answers.push((frame, result));
            },
        );
        for (frame, result) in answers {
            let dropped = !self.queue_reply(frame, limit, now);
            outcome(result, dropped);
        }
    }

    /// Deliveries written in full, or thrown away unsent, since the last call
    /// (the loop adds them to its metrics after each `settle` and on removal).
    pub fn take_deliveries(&mut self) -> Deliveries {
        self.out.take_deliveries()
    }

    /// Whether the timer entry at `at` is this connection's current one (an entry
    /// superseded by an earlier one is stale). The entry is consumed: `settle` arms
    /// the next.
    pub fn timer_fired(&mut self, at: Instant) -> bool {
        if self.timer_at == Some(at) {
            self.timer_at = None;
            true
        } else {
            false
        }
    }

    /// The connection's earliest deadline passed: act on whichever ones are due.
    pub fn on_deadline(&mut self, limits: &Limits, now: Instant) -> Step {
        match &mut self.state {
            State::Handshake { deadline, .. } if now >= *deadline => {
                self.state = State::Done;
                Step::HandshakeTimedOut {
                    connection_id: self.id,
                }
            }
            State::Respond { deadline, .. } if now >= *deadline => {
                self.state = State::Done;
                Step::Continue
            }
            State::Closing(closing) if now >= closing.deadline => {
                self.state = State::Done;
                Step::Continue
            }
            State::Open(session) => {
                let stalled =
                    !self.out.is_empty() && now >= self.last_write_progress + limits.write_wait;
                let subscribe_by = session.resume.as_ref().and_then(|r| r.subscribe_by);
                if now >= session.expires_at {
                    self.end(CloseReason::TokenExpired, limits, now)
                } else if now >= session.last_seen + limits.pong_wait {
                    self.end(CloseReason::PongTimeout, limits, now)
                } else if subscribe_by.is_some_and(|by| now >= by) {
                    self.end(CloseReason::SubscriptionTimeout, limits, now)
                } else if stalled {
                    self.end(CloseReason::SlowClient, limits, now)
                } else {
                    let notice = session.token.take_notice(now);
                    if now >= session.next_ping {
                        session.next_ping = now + limits.ping_interval;
                        // A full control budget means pings are already waiting unsent.
                        self.queue_control(&PING_FRAME, now);
                    }
                    if let Some(notice) = notice {
                        // Once per token, like `connected`: always queued.
                        if self.out.is_empty() {
                            self.last_write_progress = now;
                        }
                        self.out.push_reply(notice, FrameLimit::NONE);
                    }
                    Step::Continue
                }
            }
            _ => Step::Continue,
        }
    }

    /// Shutdown began (`limits.shutdown_deadline` is set): a session is closed with
    /// 1001, a closing one must end by the deadline, anything else ends now.
    pub fn shut_down(&mut self, limits: &Limits, now: Instant) -> Step {
        match &mut self.state {
            State::Open(_) => self.end(CloseReason::Shutdown, limits, now),
            State::Closing(closing) => {
                if let Some(deadline) = limits.shutdown_deadline {
                    closing.deadline = closing.deadline.min(deadline);
                }
                Step::Continue
            }
            _ => {
                self.state = State::Done;
                Step::Continue
            }
        }
    }

    /// The loop drops the connection whatever its state (a failed registration):
    /// an open session ends as lost, and deliveries still queued are unsent (see
    /// `take_deliveries`).
    pub fn abort(&mut self, now: Instant) -> Option<Ended> {
        let ended = match self.end(CloseReason::ConnectionLost, &Limits::NONE, now) {
            Step::Ended(ended) => Some(ended),
            _ => None,
        };
        self.state = State::Done;
        self.out.discard_all();
        ended
    }

    /// After any activity: write what is queued (recorded in `writes`), finish a
    /// final answer, and tell the loop the interest and deadline to keep, or to
    /// remove the connection.
    pub fn settle(&mut self, limits: &Limits, now: Instant, writes: &mut WriteMetrics) -> Next {
        self.flush_pending = false;
        if !self.out.is_empty() && self.flush(now, writes).is_err() {
            let ended = match self.end(CloseReason::ConnectionLost, limits, now) {
                Step::Ended(ended) => Some(ended),
                _ => None,
            };
            return Next::Remove(ended);
        }
        if let State::Respond {
            write_shut: write_shut @ false,
            ..
        } = &mut self.state
            && self.out.is_empty()
        {
            // The final bytes are out: linger until the peer closes (or the deadline).
            *write_shut = true;
            // The peer may already be gone; nothing else is done with the socket's output.
            let _ = self.socket.shutdown_write();
            if self.drain_input() {
                self.state = State::Done;
            }
        }
        let Some(deadline) = self.deadline(limits) else {
            return Next::Remove(None);
        };
        let want_writable = !self.out.is_empty();
        let reregister = (want_writable != self.writable_interest).then(|| {
            self.writable_interest = want_writable;
            if want_writable {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            }
        });
        let arm = self.timer_at.is_none_or(|armed| deadline < armed).then(|| {
            self.timer_at = Some(deadline);
            deadline
        });
        debug_assert!(self.timer_at.is_some_and(|armed| armed <= deadline));
        Next::Keep { reregister, arm }
    }

    /// The next deadline of this state; None once `Done`.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        match &self.state {
            State::Handshake { deadline, .. } | State::Respond { deadline, .. } => Some(*deadline),
            State::Closing(closing) => Some(closing.deadline),
            State::Open(session) => {
                let mut next = session
                    .expires_at
                    .min(session.last_seen + limits.pong_wait)
                    .min(session.next_ping);
                if let Some(notice_at) = session.token.notice_at() {
                    next = next.min(notice_at);
                }
                if let Some(by) = session.resume.as_ref().and_then(|r| r.subscribe_by) {
                    next = next.min(by);
                }
                if !self.out.is_empty() {
                    next = next.min(self.last_write_progress + limits.write_wait);
                }
                Some(next)
            }
            State::Done => None,
        }
    }

    /// Ends the connection for `reason`. An open session queues its close frame (if
    /// the reason has one) and then waits for the client's reply in `Closing`, or
    /// lingers in `Respond` when it is failed (RFC 6455 7.1.7) or the client's close
    /// was just answered; with nothing to send it is `Done`. A closing one that
    /// gets the client's reply finishes like a final answer.
    fn end(&mut self, reason: CloseReason, limits: &Limits, now: Instant) -> Step {
        let close_by = limits.shutdown_deadline.unwrap_or(now + limits.write_wait);
        match std::mem::replace(&mut self.state, State::Done) {
            State::Open(session) => {
                let Session {
                    ws,
                    user_id,
                    resume,
                    ..
                } = *session;
                if let Some(held) = resume.and_then(|resume| resume.held) {
                    // Held before `connected` (counted as queued when held): never sent.
                    self.out.count_unsent(held.len());
                }
                if reason == CloseReason::SlowClient {
                    // The client is not reading: what it has not started to receive is
                    // dropped (counted unsent) so the close frame is next in line.
                    self.out.discard_unsent_messages();
                }
                let has_frame = match reason.close_frame() {
                    Some((code, text)) => {
                        self.queue_control(&close_frame(code, text), now);
                        true
                    }
                    // tungstenite has queued the reply to the client's close.
                    None => reason == CloseReason::ClientClosed,
                };
                if has_frame {
                    self.state = if reason.awaits_reply() {
                        State::Closing(Box::new(Closing {
                            ws,
                            deadline: close_by,
                        }))
                    } else {
                        State::Respond {
                            deadline: close_by,
                            write_shut: false,
                        }
                    };
                }
                Step::Ended(Ended {
                    user_id,
                    connection_id: self.id,
                    reason,
                    lived: now.saturating_duration_since(self.accepted_at),
                })
            }
            // The client answered our close, so it has read it; with nothing left to
            // send, close now: a client stops sending after its close (RFC 6455
            // 5.5.1), so there is no unread input to turn the close into a reset, and
            // the server closes the TCP connection first (7.1.1). Lingering until the
            // client's EOF would hold the slot, and a shutdown, for a client that
            // waits for us to close.
            State::Closing(closing)
                if reason == CloseReason::ClientClosed && !self.out.is_empty() =>
            {
                self.state = State::Respond {
                    deadline: closing.deadline,
                    write_shut: false,
                };
                Step::Continue
            }
            // Any other end of a connection without a session: nothing to report.
            _ => Step::Continue,
        }
    }

    /// Queues bytes that only this connection sends (pings, HTTP answers).
    fn queue_control(&mut self, bytes: &[u8], now: Instant) -> bool {
        if self.out.is_empty() {
            self.last_write_progress = now;
        }
        self.out.push_control(bytes)
    }

    /// Writes queued output. Err means the socket is dead.
    fn flush(&mut self, now: Instant, writes: &mut WriteMetrics) -> io::Result<FlushResult> {
        let (written, result) = self.out.flush(&mut self.socket, writes)?;
        if written > 0 {
            self.last_write_progress = now;
        }
        Ok(result)
    }

    /// Reads request-head bytes until `WouldBlock`, EOF, or one byte past the head limit.
    fn fill_head(&mut self) -> HeadRead {
        let State::Handshake { head, .. } = &mut self.state else {
            return HeadRead::WouldBlock;
        };
        let limit = handshake::MAX_HEAD_BYTES + 1;
        let mut progressed = false;
        while head.len() < limit {
            let old_len = head.len();
            let want = HEAD_READ_CHUNK.min(limit - old_len);
            head.resize(old_len + want, 0);
            let result = self.socket.read(&mut head[old_len..]);
            match result {
                Ok(0) => {
                    head.truncate(old_len);
                    return HeadRead::Closed;
                }
                Ok(n) => {
                    head.truncate(old_len + n);
                    progressed = true;
                }
                Err(e) => {
                    head.truncate(old_len);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ => return HeadRead::Closed,
                    }
                }
            }
        }
        if progressed {
            HeadRead::Progress
        } else {
            HeadRead::WouldBlock
        }
    }

    /// Reads and throws away input (a `Respond` after its answer). True on EOF or error.
    fn drain_input(&mut self) -> bool {
        let mut sink = [0u8; 512];
        for _ in 0..64 {
            match self.socket.read(&mut sink) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        false
    }
}

impl Limits {
    /// For ending a connection that is dropped at once (no close deadline matters).
    const NONE: Limits = Limits {
        ping_interval: Duration::ZERO,
        pong_wait: Duration::ZERO,
        write_wait: Duration::ZERO,
        read_budget: 0,
        max_message_size: 0,
        shutdown_deadline: None,
    };
}

/// How reading a request head went.
enum HeadRead {
    /// New bytes arrived (or the buffer is at its limit); evaluate the head.
    Progress,
    /// Nothing new; wait for the next readable event.
    WouldBlock,
    /// The client went away.
    Closed,
}

/// How reading WebSocket frames went.
#[derive(Debug, PartialEq, Eq)]
pub enum FramesRead {
    /// The socket has no more bytes for now.
    WouldBlock,
    /// The per-turn budget was used up; read again next turn.
    BudgetSpent,
    /// The connection must end for this reason.
    Closed(CloseReason),
}

/// What `Connection::open` needs besides the answer.
pub struct SessionParams {
    pub user_id: Rc<str>,
    /// When the session closes with 4001: the token's `exp` plus `JWT_LEEWAY`.
    pub expires_at: Instant,
    /// The token's `exp`, unix seconds.
    pub token_exp: u64,
    /// `WS_TOKEN_EXPIRY_NOTICE`: `token_expiring` this long before `exp` (zero = none).
    pub expiry_notice: Duration,
    pub now: Instant,
    pub ping_interval: Duration,
    pub ws_config: WebSocketConfig,
    /// `WS_SEND_BUFFER_BYTES`.
    pub send_buffer_bytes: usize,
}

/// The I/O tungstenite sees: reads come from the socket, writes go into the
/// outbound queue (so every byte leaves through one ordered path).
struct WsIo<'a, S> {
    socket: &'a mut S,
    out: &'a mut OutboundQueue,
    bytes_read: usize,
    discard_writes: bool,
}

impl<S: Read> Read for WsIo<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.socket.read(buf)?;
        self.bytes_read += n;
        Ok(n)
    }
}

impl<S> Write for WsIo<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.discard_writes || self.out.push_control(buf) {
            Ok(buf.len())
        } else {
            // Control budget spent (a client that pings without reading): tungstenite keeps
            // at most one pending pong and retries later.
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What one `read_frames` call saw.
#[derive(Debug, PartialEq, Eq)]
pub struct FramesReport {
    pub result: FramesRead,
    /// `{"type":"ping"}` messages that asked for a pong message.
    pub ping_requests: usize,
    pub bytes_read: usize,
}

/// The WebSocket read path: reads up to `budget` messages from `socket` through
/// tungstenite; control replies (pongs, close replies) go into `out` unless
/// `discard_writes`. A data message over `max_message_size` closes with 1009,
/// unless it is a refresh request (tungstenite's own limit bounds those, see
/// [`websocket_config`]); refresh requests are collected into `refreshes`. The
/// server runs it on a socket, the fuzz target on bytes in memory.
pub fn read_frames<S: Read>(
    ws: &mut WebSocketContext,
    socket: &mut S,
    out: &mut OutboundQueue,
    budget: usize,
    discard_writes: bool,
    max_message_size: usize,
    refreshes: &mut refresh::Requests,
) -> FramesReport {
    let mut io = WsIo {
        socket,
        out,
        bytes_read: 0,
        discard_writes,
    };
    let mut ping_requests = 0;
    let mut result = FramesRead::BudgetSpent;
    for _ in 0..budget {
        match ws.read(&mut io) {
            Ok(Message::Text(text)) => {
                let text = text.as_bytes();
                if let Some(token) = refresh::parse_request(text) {
                    refreshes.push(token);
                } else if text.len() > max_message_size {
                    result = FramesRead::Closed(CloseReason::MessageTooBig);
                    break;
                } else if is_ping_request(text) {
                    ping_requests += 1;
                }
            }
            Ok(Message::Binary(data)) if data.len() > max_message_size => {
                result = FramesRead::Closed(CloseReason::MessageTooBig);
                break;
            }
            Ok(Message::Close(_)) => {
                // tungstenite queued the close reply; move it into the outbound queue.
                flush_context(ws, &mut io);
                result = FramesRead::Closed(CloseReason::ClientClosed);
                break;
            }
            // Pings are answered by tungstenite (the pong goes through `io`); pongs,
            // binary frames and other text only count as activity.
            Ok(_) => {}
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                result = FramesRead::WouldBlock;
                break;
            }
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                result = FramesRead::Closed(close_reason_for(&e));
                break;
            }
        }
    }
    if !matches!(result, FramesRead::Closed(_)) {
        // Move an automatic pong into the queue now rather than on the next read.
        flush_context(ws, &mut io);
    }
    FramesReport {
        result,
        ping_requests,
        bytes_read: io.bytes_read,
    }
}

/// Moves tungstenite's pending control frames into the queue. A full control
/// budget (`WouldBlock`) or a closed context leaves nothing more to do here.
fn flush_context<S: Read>(ws: &mut WebSocketContext, io: &mut WsIo<'_, S>) {
    // Errors: WouldBlock (retried on the next read) or the context already closed.
    let _ = ws.flush(io);
}

/// Maps a tungstenite read error to why the connection ends (RFC 6455 7.4.1 codes).
fn close_reason_for(error: &WsError) -> CloseReason {
    match error {
        WsError::Capacity(_) => CloseReason::MessageTooBig,
        WsError::Utf8(_) => CloseReason::InvalidUtf8,
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            CloseReason::ConnectionLost
        }
        WsError::Protocol(_) => CloseReason::ProtocolError,
        WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => {
            CloseReason::ConnectionLost
        }
        _ => CloseReason::InternalError,
    }
}

/// Whether a client text message is `{"type":"ping"}` (browsers cannot send ping frames).
fn is_ping_request(text: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
    }
    // Cheap pre-check: most client messages are not pings.
    if !text.windows(4).any(|w| w == b"ping") {
        return false;
    }
    serde_json::from_slice::<Typed<'_>>(text).is_ok_and(|t| t.kind == "ping")
}

/// An unmasked server close frame (RFC 6455 5.5.1): code, then a UTF-8 reason (≤ 123 bytes).
fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut frame = Vec::with_capacity(4 + reason.len());
    frame.push(0x88);
    frame.push((2 + reason.len()) as u8);
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    frame
}

/// An empty unmasked server ping frame.
const PING_FRAME: [u8; 2] = [0x89, 0x00];

/// An in-memory socket for the unit tests of the connection and its queue.
#[cfg(test)]
pub(crate) mod mock {
    use std::cell::Cell;
    use std::io::{self, Read, Write};
    use std::net::SocketAddr;

    /// Reads come from `input` in short pieces, then `WouldBlock` (or EOF once
    /// `eof` is set); writes take at most `write_chunk` bytes per call while
    /// `writes_left` lasts, then `WouldBlock`; `broken` fails every write.
    pub struct MockStream {
        pub input: Vec<u8>,
        pub read_pos: usize,
        pub eof: bool,
        pub written: Vec<u8>,
        pub write_chunk: usize,
        pub writes_left: usize,
        pub broken: bool,
        pub write_shut: Cell<bool>,
    }

    impl MockStream {
        /// A socket with `input` to read that takes every write.
        pub fn new(input: &[u8]) -> MockStream {
            MockStream {
                input: input.to_vec(),
                read_pos: 0,
                eof: false,
                written: Vec::new(),
                write_chunk: usize::MAX,
                writes_left: usize::MAX,
                broken: false,
                write_shut: Cell::new(false),
            }
        }
    }

    impl Read for MockStream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let left = self.input.len() - self.read_pos;
            if left == 0 {
                return if self.eof {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            // Short reads: at most 7 bytes at a time.
            let n = buf.len().min(left).min(7);
            buf[..n].copy_from_slice(&self.input[self.read_pos..self.read_pos + n]);
            self.read_pos += n;
            Ok(n)
        }
    }

    impl Write for MockStream {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.broken {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if self.writes_left == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.writes_left -= 1;
            let n = buf.len().min(self.write_chunk);
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl super::Stream for MockStream {
        fn shutdown_write(&self) -> io::Result<()> {
            self.write_shut.set(true);
            Ok(())
        }

        fn peer_addr(&self) -> io::Result<SocketAddr> {
            Ok(SocketAddr::from(([127, 0, 0, 1], 40_000)))
        }
    }

    /// A masked client frame (RFC 6455 5.3), FIN set, payload under 64 KiB.
    pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x80 | opcode];
        match u16::try_from(payload.len()) {
            Ok(len @ 0..=125) => frame.push(0x80 | len as u8),
            Ok(len) => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&len.to_be_bytes());
            }
            Err(_) => panic!("test frames stay under 64 KiB"),
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::mock::{MockStream, client_frame};
    use super::*;
    use std::sync::Arc;

    fn read_all(bytes: Vec<u8>, max_message_size: usize) -> (FramesReport, Vec<u8>) {
        let mut ws = WebSocketContext::new(Role::Server, Some(websocket_config(max_message_size)));
        let mut socket = MockStream::new(&bytes);
        let mut out = OutboundQueue::default();
        let mut refreshes = refresh::Requests::with_room(2);
        let report = read_frames(
            &mut ws,
            &mut socket,
            &mut out,
            64,
            false,
            max_message_size,
            &mut refreshes,
        );
        assert!(refreshes.is_empty(), "{refreshes:?}");
        let mut written = Vec::new();
        out.flush(&mut written, &mut WriteMetrics::default())
            .expect("flush into a Vec");
        (report, written)
    }

    #[test]
    fn ping_frame_is_answered_with_a_pong_in_the_queue() {
        let (report, written) = read_all(client_frame(0x9, b"hi"), 512);
        assert_eq!(report.result, FramesRead::WouldBlock);
        assert_eq!(written, b"\x8a\x02hi");
    }

    #[test]
    fn text_ping_requests_are_counted() {
        let mut bytes = client_frame(0x1, br#"{"type":"ping"}"#);
        bytes.extend(client_frame(0x1, br#"{"type":"other"}"#));
        bytes.extend(client_frame(0x1, br#"{"type":"ping"}"#));
        let (report, _) = read_all(bytes, 512);
        assert_eq!(report.ping_requests, 2);
        assert_eq!(report.result, FramesRead::WouldBlock);
    }

    #[test]
    fn client_close_is_answered() {
        let (report, written) = read_all(client_frame(0x8, &1000u16.to_be_bytes()), 512);
        assert_eq!(report.result, FramesRead::Closed(CloseReason::ClientClosed));
        assert_eq!(written, b"\x88\x02\x03\xe8");
    }

    #[test]
    fn violations_map_to_close_reasons() {
        let unmasked = vec![0x81, 0x02, b'h', b'i'];
        assert_eq!(
            read_all(unmasked, 512).0.result,
            FramesRead::Closed(CloseReason::ProtocolError)
        );
        let too_big = client_frame(0x1, &[b'a'; 100]);
        assert_eq!(
            read_all(too_big, 64).0.result,
            FramesRead::Closed(CloseReason::MessageTooBig)
        );
        let bad_utf8 = client_frame(0x1, &[0xff, 0xfe]);
        assert_eq!(
            read_all(bad_utf8, 512).0.result,
            FramesRead::Closed(CloseReason::InvalidUtf8)
        );
        let reserved_opcode = client_frame(0x3, b"");
        assert_eq!(
            read_all(reserved_opcode, 512).0.result,
            FramesRead::Closed(CloseReason::ProtocolError)
        );
    }

    #[test]
    fn the_budget_bounds_one_turn() {
        let bytes: Vec<u8> = (0..10).flat_map(|_| client_frame(0x2, b"x")).collect();
        let mut ws = WebSocketContext::new(Role::Server, Some(websocket_config(512)));
        let mut socket = MockStream::new(&bytes);
        let mut out = OutboundQueue::default();
        let mut refreshes = refresh::Requests::default();
        let first = read_frames(
            &mut ws,
            &mut socket,
            &mut out,
            4,
            false,
            512,
            &mut refreshes,
        );
        assert_eq!(first.result, FramesRead::BudgetSpent);
        let rest = read_frames(
            &mut ws,
            &mut socket,
            &mut out,
            64,
            false,
            512,
            &mut refreshes,
        );
        assert_eq!(rest.result, FramesRead::WouldBlock);
    }

    /// A refresh request whose token pads the message to exactly `len` bytes.
    fn refresh_message(len: usize) -> Vec<u8> {
        let empty = br#"{"type":"refresh","token":""}"#.len();
        format!(
            r#"{{"type":"refresh","token":"{}"}}"#,
            "a".repeat(len - empty)
        )
        .into_bytes()
    }

    /// Reads `bytes` at the server's read path with `WS_MAX_MESSAGE_SIZE` 512 and
    /// room for `room` refreshes.
    fn read_with_refreshes(bytes: &[u8], room: usize) -> (FramesRead, refresh::Requests) {
        let mut ws = WebSocketContext::new(Role::Server, Some(websocket_config(512)));
        let mut socket = MockStream::new(bytes);
        let mut out = OutboundQueue::default();
        let mut refreshes = refresh::Requests::with_room(room);
        let report = read_frames(
            &mut ws,
            &mut socket,
            &mut out,
            64,
            false,
            512,
            &mut refreshes,
        );
        (report.result, refreshes)
    }

    #[test]
    fn a_refresh_up_to_8_kib_passes_a_smaller_message_limit() {
        let message = refresh_message(refresh::MAX_REFRESH_BYTES);
        let (result, refreshes) = read_with_refreshes(&client_frame(0x1, &message), 4);
        assert_eq!(result, FramesRead::WouldBlock);
        assert_eq!(refreshes.len(), 1);
        // One byte more is over tungstenite's limit.
        let message = refresh_message(refresh::MAX_REFRESH_BYTES + 1);
        let (result, refreshes) = read_with_refreshes(&client_frame(0x1, &message), 4);
        assert_eq!(result, FramesRead::Closed(CloseReason::MessageTooBig));
        assert!(refreshes.is_empty());
    }

    #[test]
    fn other_messages_over_the_limit_still_close_with_1009() {
        let mut text = br#"{"type":"ping","pad":""#.to_vec();
        text.resize(600, b'x');
        text.extend_from_slice(br#""}"#);
        for frame in [client_frame(0x1, &text), client_frame(0x2, &[0; 513])] {
            let (result, _) = read_with_refreshes(&frame, 4);
            assert_eq!(result, FramesRead::Closed(CloseReason::MessageTooBig));
        }
        // At the limit: read.
        let (result, _) = read_with_refreshes(&client_frame(0x2, &[0; 512]), 4);
        assert_eq!(result, FramesRead::WouldBlock);
    }

    #[test]
    fn refreshes_past_the_room_are_counted_without_their_tokens() {
        let bytes: Vec<u8> = (0..5)
            .flat_map(|_| client_frame(0x1, br#"{"type":"refresh","token":"t"}"#))
            .collect();
        let (result, refreshes) = read_with_refreshes(&bytes, 2);
        assert_eq!(result, FramesRead::WouldBlock);
        assert_eq!(refreshes.len(), 5);
        assert_eq!(
            format!("{refreshes:?}"),
            "Requests { tokens: 2, refused: 3 }"
        );
    }

    #[test]
    fn ping_request_detection() {
        assert!(is_ping_request(br#"{"type":"ping"}"#));
        assert!(is_ping_request(br#" {"type" : "ping", "x": 1} "#));
        assert!(!is_ping_request(br#"{"type":"pong"}"#));
        assert!(!is_ping_request(br#"{"kind":"ping"}"#));
        assert!(!is_ping_request(b"ping"));
    }

    #[test]
    fn close_frame_layout() {
        assert_eq!(
            close_frame(4008, "slow client"),
            b"\x88\x0d\x0f\xa8slow client"
        );
        assert_eq!(close_frame(1000, "").len(), 4);
    }

    // ----- State transitions -----------------------------------------------------

    const LIMITS: Limits = Limits {
        ping_interval: Duration::from_secs(30),
        pong_wait: Duration::from_secs(60),
        write_wait: Duration::from_secs(10),
        read_budget: 64,
        max_message_size: 512,
        shutdown_deadline: None,
    };
    const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
    const SESSION_LIFE: Duration = Duration::from_secs(3600);

    fn handshaking(input: &[u8], start: Instant) -> Connection<MockStream> {
        Connection::new(
            MockStream::new(input),
            7,
            start,
            start + HANDSHAKE_WAIT,
            Endpoints::All,
        )
    }

    /// A connection whose session is open and whose 101 and `connected` are written.
    fn open_session(start: Instant) -> Connection<MockStream> {
        let token_exp = crate::clock::unix_secs_now() + SESSION_LIFE.as_secs();
        open_session_with(start, token_exp, Duration::ZERO)
    }

    /// `open_session` for a token expiring at `token_exp` with this expiry notice.
    fn open_session_with(
        start: Instant,
        token_exp: u64,
        expiry_notice: Duration,
    ) -> Connection<MockStream> {
        let mut conn = handshaking(b"", start);
        conn.open(
            b"HTTP/1.1 101\r\n\r\n",
            Arc::from(&b"CONNECTED"[..]),
            0,
            session_params(start, token_exp, expiry_notice),
        );
        assert!(matches!(
            conn.settle(&LIMITS, start, &mut WriteMetrics::default()),
            Next::Keep {
                reregister: None,
                arm: Some(_)
            }
        ));
        assert_eq!(conn.socket.written, b"HTTP/1.1 101\r\n\r\nCONNECTED");
        conn.socket.written.clear();
        conn
    }

    /// The session of user `alice` with a token expiring at `token_exp`.
    fn session_params(start: Instant, token_exp: u64, expiry_notice: Duration) -> SessionParams {
        SessionParams {
            user_id: Rc::from("alice"),
            expires_at: refresh::expiry_instant(token_exp, Duration::ZERO, start),
            token_exp,
            expiry_notice,
            now: start,
            ping_interval: LIMITS.ping_interval,
            ws_config: websocket_config(512),
            send_buffer_bytes: 1 << 20,
        }
    }

    /// What the loop does when the connection's timer entry fires at `now`.
    fn deadline_passes(conn: &mut Connection<MockStream>, now: Instant) -> Step {
        let armed = conn.timer_at.expect("a kept connection is armed");
        assert!(
            armed <= now,
            "woken at {now:?} before its entry at {armed:?}"
        );
        assert!(conn.timer_fired(armed));
        conn.on_deadline(&LIMITS, now)
    }

    fn ended(step: Step) -> Ended {
        match step {
            Step::Ended(ended) => ended,
            other => panic!("expected the session to end, got {other:?}"),
        }
    }

    /// The socket turns readable (input or EOF) and the connection has nothing to
    /// report: it is finished and the loop removes it.
    #[track_caller]
    fn assert_read_ends_it(conn: &mut Connection<MockStream>, now: Instant) {
        assert!(matches!(
            conn.on_ready(true, false, &LIMITS, now, &mut WriteMetrics::default()),
            Step::Continue
        ));
        assert!(assert_removed(conn.settle(&LIMITS, now, &mut WriteMetrics::default())).is_none());
    }

    #[track_caller]
    fn assert_removed(next: Next) -> Option<Ended> {
        match next {
            Next::Remove(ended) => ended,
            other => panic!("expected removal, got {other:?}"),
        }
    }

    #[test]
    fn a_request_head_is_answered_then_lingers_until_eof() {
        let start = Instant::now();
        let mut conn = handshaking(b"GET /health HTTP/1.1\r\n", start);
        assert!(matches!(
            conn.settle(&LIMITS, start, &mut WriteMetrics::default()),
            Next::Keep { reregister: None, arm: Some(at) } if at == start + HANDSHAKE_WAIT
        ));
        assert!(matches!(
            conn.on_ready(true, false, &LIMITS, start, &mut WriteMetrics::default()),
            Step::EvaluateHead
        ));
        assert_eq!(conn.head(), b"GET /health HTTP/1.1\r\n");

        // The answer meets a full socket: ask for WRITABLE.
        conn.socket.writes_left = 0;
        conn.respond(b"HTTP/1.1 200 OK\r\n\r\n", start, start + RESPOND);
        let next = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        assert!(
            matches!(next, Next::Keep { reregister: Some(i), arm: Some(_) } if i.is_writable()),
            "{next:?}"
        );
        // Written in short pieces once the socket drains; then the write side is shut.
        conn.socket.writes_left = usize::MAX;
        conn.socket.write_chunk = 5;
        assert!(matches!(
            conn.on_ready(false, true, &LIMITS, start, &mut WriteMetrics::default()),
            Step::Continue
        ));
        let next = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        assert!(
            matches!(next, Next::Keep { reregister: Some(i), arm: None } if !i.is_writable()),
            "{next:?}"
        );
        assert_eq!(conn.socket.written, b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(conn.socket.write_shut.get());
        // The client's EOF ends the linger.
        conn.socket.eof = true;
        assert_read_ends_it(&mut conn, start);
    }
    const RESPOND: Duration = Duration::from_secs(5);

    #[test]
    fn a_handshake_times_out_at_its_deadline_and_not_before() {
        let start = Instant::now();
        let mut conn = handshaking(b"GET", start);
        let Next::Keep { arm: Some(at), .. } =
            conn.settle(&LIMITS, start, &mut WriteMetrics::default())
        else {
            panic!("not armed");
        };
        assert!(conn.timer_fired(at));
        assert!(matches!(
            conn.on_deadline(&LIMITS, at - Duration::from_millis(1)),
            Step::Continue
        ));
        // Re-armed after a deadline that was not due yet.
        assert!(matches!(
            conn.settle(&LIMITS, start, &mut WriteMetrics::default()),
            Next::Keep { arm: Some(again), .. } if again == at
        ));
        assert!(matches!(
            conn.on_deadline(&LIMITS, at),
            Step::HandshakeTimedOut { connection_id: 7 }
        ));
        assert!(assert_removed(conn.settle(&LIMITS, at, &mut WriteMetrics::default())).is_none());
    }

    #[test]
    fn eof_during_the_handshake_removes_the_connection() {
        let start = Instant::now();
        let mut conn = handshaking(b"", start);
        conn.socket.eof = true;
        assert_read_ends_it(&mut conn, start);
    }

    #[test]
    fn a_stale_timer_entry_is_ignored_and_a_kept_connection_is_always_armed() {
        let start = Instant::now();
        let mut conn = open_session(start);
        // Armed at the first ping; nothing earlier since.
        assert!(matches!(
            conn.settle(&LIMITS, start, &mut WriteMetrics::default()),
            Next::Keep { arm: None, .. }
        ));
        assert!(!conn.timer_fired(start + Duration::from_secs(1)));
        let ping_at = start + LIMITS.ping_interval;
        assert!(conn.timer_fired(ping_at));
        // Pending output brings the write-stall deadline forward: armed again, earlier.
        conn.socket.writes_left = 0;
        assert_eq!(
            conn.queue_message(Arc::from(&b"m"[..]), Stamp::default(), 10, start),
            Queued::First
        );
        assert!(matches!(
            conn.settle(&LIMITS, start, &mut WriteMetrics::default()),
            Next::Keep { reregister: Some(_), arm: Some(at) } if at == start + LIMITS.write_wait
        ));
    }

    #[test]
    fn messages_are_queued_up_to_the_limit_and_marked_once_per_turn() {
        let start = Instant::now();
        let mut conn = open_session(start);
        let frame: Frame = Arc::from(&b"msg;"[..]);
        assert_eq!(
            conn.queue_message(frame.clone(), Stamp::default(), 2, start),
            Queued::First
        );
        assert_eq!(
            conn.queue_message(frame.clone(), Stamp::default(), 2, start),
            Queued::Again
        );
        assert_eq!(
            conn.queue_message(frame.clone(), Stamp::default(), 2, start),
            Queued::Dropped
        );
        assert!(matches!(
            conn.settle(&LIMITS, start, &mut WriteMetrics::default()),
            Next::Keep {
                reregister: None,
                ..
            }
        ));
        assert_eq!(conn.socket.written, b"msg;msg;");
        // The next turn marks it again.
        assert_eq!(
            conn.queue_message(frame, Stamp::default(), 2, start),
            Queued::First
        );
    }

    #[test]
    fn a_ping_goes_out_when_due() {
        let start = Instant::now();
        let mut conn = open_session(start);
        let at = start + LIMITS.ping_interval;
        assert!(conn.timer_fired(at));
        assert!(matches!(conn.on_deadline(&LIMITS, at), Step::Continue));
        assert!(matches!(
            conn.settle(&LIMITS, at, &mut WriteMetrics::default()),
            Next::Keep { arm: Some(_), .. }
        ));
        assert_eq!(conn.socket.written, PING_FRAME);
    }

    #[test]
    fn client_activity_defers_the_pong_timeout() {
        let start = Instant::now();
        let mut conn = open_session(start);
        let later = start + Duration::from_secs(50);
        conn.socket.input = client_frame(0xA, b"");
        assert!(matches!(
            conn.on_ready(true, false, &LIMITS, later, &mut WriteMetrics::default()),
            Step::Read {
                pongs: 0,
                more: false,
                ..
            }
        ));
        let quiet_until = start + LIMITS.pong_wait;
        assert!(matches!(
            conn.on_deadline(&LIMITS, quiet_until),
            Step::Continue
        ));
    }

    #[test]
    fn ping_requests_ask_the_loop_for_pongs() {
        let start = Instant::now();
        let mut conn = open_session(start);
        let mut input = client_frame(0x1, br#"{"type":"ping"}"#);
        input.extend(client_frame(0x1, br#"{"type":"ping"}"#));
        conn.socket.input = input;
        let Step::Read {
            pongs: 2,
            more: false,
            ..
        } = conn.on_ready(true, false, &LIMITS, start, &mut WriteMetrics::default())
        else {
            panic!("expected two pong requests");
        };
        let pong: Frame = Arc::from(&b"PONG;"[..]);
        assert_eq!(
            conn.queue_pongs(&pong, 2, 1, start),
            1,
            "one over the limit"
        );
        let _ = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        assert_eq!(conn.socket.written, b"PONG;");
    }

    #[test]
    fn a_silent_client_is_dropped_at_the_pong_timeout_without_a_close_frame() {
        let start = Instant::now();
        let mut conn = open_session(start);
        let at = start + LIMITS.pong_wait;
        let ended = ended(conn.on_deadline(&LIMITS, at));
        assert_eq!(ended.reason, CloseReason::PongTimeout);
        assert_eq!(&*ended.user_id, "alice");
        assert_eq!(ended.connection_id, 7);
        assert_eq!(ended.lived, LIMITS.pong_wait);
        assert!(assert_removed(conn.settle(&LIMITS, at, &mut WriteMetrics::default())).is_none());
        assert!(conn.socket.written.is_empty());
    }

    #[test]
    fn an_expired_token_closes_with_4001_and_waits_for_the_reply() {
        let start = Instant::now();
        let mut conn = open_session(start);
        let at = start + SESSION_LIFE;
        assert_eq!(
            ended(deadline_passes(&mut conn, at)).reason,
            CloseReason::TokenExpired
        );
        let next = conn.settle(&LIMITS, at, &mut WriteMetrics::default());
        assert!(
            matches!(next, Next::Keep { arm: Some(by), .. } if by == at + LIMITS.write_wait),
            "{next:?}"
        );
        assert_eq!(conn.socket.written, close_frame(4001, "token expired"));
        // The client's close reply, with nothing left to send: removed at once.
        conn.socket.input = client_frame(0x8, &4001u16.to_be_bytes());
        assert_read_ends_it(&mut conn, at);
    }

    #[test]
    fn a_client_that_never_replies_to_the_close_is_dropped_at_the_deadline() {
        let start = Instant::now();
        let mut conn = open_session(start);
        let at = start + SESSION_LIFE;
        let _ = ended(deadline_passes(&mut conn, at));
        let Next::Keep { arm: Some(by), .. } =
            conn.settle(&LIMITS, at, &mut WriteMetrics::default())
        else {
            panic!("closing is armed");
        };
        assert!(conn.timer_fired(by));
        assert!(matches!(conn.on_deadline(&LIMITS, by), Step::Continue));
        assert!(assert_removed(conn.settle(&LIMITS, by, &mut WriteMetrics::default())).is_none());
    }

    #[test]
    fn a_slow_client_loses_its_unsent_messages_and_gets_4008() {
        let start = Instant::now();
        let mut conn = open_session(start);
        conn.socket.writes_left = 0;
        for _ in 0..3 {
            let _ = conn.queue_message(Arc::from(&b"unread"[..]), Stamp::default(), 10, start);
        }
        let _ = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        let at = start + LIMITS.write_wait;
        assert_eq!(
            ended(conn.on_deadline(&LIMITS, at)).reason,
            CloseReason::SlowClient
        );
        conn.socket.writes_left = usize::MAX;
        let _ = conn.settle(&LIMITS, at, &mut WriteMetrics::default());
        assert_eq!(conn.socket.written, close_frame(4008, "slow client"));
        assert_eq!(
            conn.take_deliveries(),
            Deliveries {
                written: 0,
                unsent: 3
            }
        );
    }

    #[test]
    fn deliveries_left_in_the_queue_of_a_removed_connection_are_unsent() {
        let start = Instant::now();
        let mut conn = open_session(start);
        let message: Frame = Arc::from(&b"message"[..]);
        let _ = conn.queue_message(message.clone(), Stamp::default(), 10, start);
        let _ = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        conn.socket.writes_left = 1;
        conn.socket.write_chunk = 3;
        let _ = conn.queue_message(message.clone(), Stamp::default(), 10, start);
        let _ = conn.queue_message(message, Stamp::default(), 10, start);
        let _ = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        assert_eq!(conn.socket.written, b"messagemes");
        // A pong is no delivery.
        assert_eq!(conn.queue_pongs(&Arc::from(&b"PONG"[..]), 1, 10, start), 0);
        assert_eq!(
            conn.take_deliveries(),
            Deliveries {
                written: 1,
                unsent: 0
            }
        );
        assert!(conn.abort(start).is_some());
        assert_eq!(
            conn.take_deliveries(),
            Deliveries {
                written: 0,
                unsent: 2
            },
            "one half written, one not started"
        );
    }

    #[test]
    fn queued_bytes_are_bounded_but_one_large_message_goes_out() {
        let start = Instant::now();
        let mut conn = open_session(start);
        conn.socket.writes_left = 0;
        let large: Frame = Arc::from(vec![b'x'; (1 << 20) + 1]);
        let small: Frame = Arc::from(&b"small"[..]);
        assert_eq!(
            conn.queue_message(large.clone(), Stamp::default(), 10, start),
            Queued::First
        );
        assert_eq!(
            conn.queue_message(small.clone(), Stamp::default(), 10, start),
            Queued::Dropped
        );
        conn.socket.writes_left = usize::MAX;
        let _ = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        assert_eq!(
            conn.queue_message(small.clone(), Stamp::default(), 10, start),
            Queued::First
        );
        assert_eq!(
            conn.queue_message(small, Stamp::default(), 10, start),
            Queued::Again
        );
        assert_eq!(
            conn.queue_message(large, Stamp::default(), 10, start),
            Queued::Dropped
        );
    }

    #[test]
    fn a_write_error_ends_the_session_as_lost() {
        let start = Instant::now();
        let mut conn = open_session(start);
        conn.socket.broken = true;
        let _ = conn.queue_message(Arc::from(&b"m"[..]), Stamp::default(), 10, start);
        let ended = assert_removed(conn.settle(&LIMITS, start, &mut WriteMetrics::default()))
            .expect("the session ended");
        assert_eq!(ended.reason, CloseReason::ConnectionLost);
    }

    #[test]
    fn a_protocol_violation_closes_with_1002_and_lingers() {
        let start = Instant::now();
        let mut conn = open_session(start);
        conn.socket.input = vec![0x81, 0x02, b'h', b'i']; // unmasked
        assert_eq!(
            ended(conn.on_ready(true, false, &LIMITS, start, &mut WriteMetrics::default())).reason,
            CloseReason::ProtocolError
        );
        let _ = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        assert_eq!(conn.socket.written, close_frame(1002, "protocol error"));
        assert!(
            conn.socket.write_shut.get(),
            "failed, not waiting for a reply"
        );
    }

    #[test]
    fn shutdown_closes_sessions_with_1001_by_the_deadline_and_ends_the_rest() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(30);
        let limits = Limits {
            shutdown_deadline: Some(deadline),
            ..LIMITS
        };
        let mut conn = open_session(start);
        assert_eq!(
            ended(conn.shut_down(&limits, start)).reason,
            CloseReason::Shutdown
        );
        assert!(matches!(
            conn.settle(&limits, start, &mut WriteMetrics::default()),
            Next::Keep { .. }
        ));
        assert_eq!(conn.deadline(&limits), Some(deadline));
        assert_eq!(
            conn.socket.written,
            close_frame(1001, "server shutting down")
        );

        let mut handshake = handshaking(b"GET", start);
        assert!(matches!(
            handshake.shut_down(&limits, start),
            Step::Continue
        ));
        assert!(
            assert_removed(handshake.settle(&limits, start, &mut WriteMetrics::default()))
                .is_none()
        );
    }

    // ----- Token refresh -----------------------------------------------------------

    const SECRET: &str = "conn-test-secret-0123456789abcdef";

    fn authenticator() -> crate::auth::Authenticator {
        crate::auth::Authenticator::new(&crate::config::JwtConfig {
            secret: Some(SECRET.to_owned()),
            public_key_file: None,
            algorithm: None,
            user_claim: "sub".to_owned(),
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
            cookie_name: None,
        })
        .expect("HMAC rules")
    }

    fn token(user: &str, exp: u64) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"sub": user, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign")
    }

    fn expires_at(conn: &Connection<MockStream>) -> Instant {
        match &conn.state {
            State::Open(session) => session.expires_at,
            _ => panic!("not open"),
        }
    }

    /// The client sends `{"type":"refresh","token":..}`; the loop checks it and the
    /// answer is written. Returns the outcome and the answer's text.
    fn refresh_with(
        conn: &mut Connection<MockStream>,
        token: &str,
        now: Instant,
    ) -> (refresh::Outcome, String) {
        let message = format!(r#"{{"type":"refresh","token":"{token}"}}"#);
        conn.socket
            .input
            .extend(client_frame(0x1, message.as_bytes()));
        let Step::Read { refreshes, .. } =
            conn.on_ready(true, false, &LIMITS, now, &mut WriteMetrics::default())
        else {
            panic!("expected a read");
        };
        let authenticator = authenticator();
        let rules = refresh::Rules {
            authenticator: &authenticator,
            leeway: Duration::ZERO,
            notice: Duration::from_secs(60),
        };
        let mut outcomes = Vec::new();
        conn.answer_refreshes(refreshes, &rules, 10, now, |outcome, dropped| {
            assert!(!dropped);
            outcomes.push(outcome);
        });
        let _ = conn.settle(&LIMITS, now, &mut WriteMetrics::default());
        let answer = String::from_utf8_lossy(&conn.socket.written[2..]).into_owned();
        conn.socket.written.clear();
        assert_eq!(outcomes.len(), 1, "{outcomes:?}");
        (outcomes[0], answer)
    }

    #[test]
    fn a_refresh_for_the_same_user_moves_the_expiry_and_rearms_the_notice() {
        let start = Instant::now();
        let now_secs = crate::clock::unix_secs_now();
        let mut conn = open_session_with(start, now_secs + 100, Duration::ZERO);
        let old = expires_at(&conn);
        let (outcome, answer) = refresh_with(&mut conn, &token("alice", now_secs + 3600), start);
        assert_eq!(outcome, refresh::Outcome::Refreshed);
        assert!(
            answer.starts_with(r#"{"type":"refreshed","payload":{"expires_at":""#),
            "{answer}"
        );
        assert!(expires_at(&conn) >= old + Duration::from_secs(3400));
        let State::Open(session) = &conn.state else {
            panic!("open");
        };
        assert!(session.token.notice_at().is_some(), "notice re-armed");
    }

    #[test]
    fn a_refused_refresh_keeps_the_old_expiry() {
        let start = Instant::now();
        let now_secs = crate::clock::unix_secs_now();
        let mut conn = open_session_with(start, now_secs + 100, Duration::ZERO);
        let old = expires_at(&conn);
        let cases = [
            (
                token("mallory", now_secs + 3600),
                refresh::Outcome::OtherUser,
            ),
            (
                token("alice", now_secs - 10),
                refresh::Outcome::Invalid(crate::auth::AuthError::Expired),
            ),
            (
                format!("{}x", token("alice", now_secs + 3600)),
                refresh::Outcome::Invalid(crate::auth::AuthError::BadSignature),
            ),
        ];
        for (token, expected) in cases {
            let (outcome, answer) = refresh_with(&mut conn, &token, start);
            assert_eq!(outcome, expected);
            assert!(
                answer.starts_with(
                    r#"{"type":"refresh_failed","payload":{"error":"invalid or expired token"}"#
                ),
                "{answer}"
            );
            assert_eq!(expires_at(&conn), old);
        }
    }

    #[test]
    fn token_expiring_goes_out_once_in_the_connections_deadline() {
        let start = Instant::now();
        let now_secs = crate::clock::unix_secs_now();
        // `exp` about 70 s away, notice 60 s: due within about 10 s, before the first ping.
        let mut conn = open_session_with(start, now_secs + 70, Duration::from_secs(60));
        let at = conn.timer_at.expect("armed");
        assert!(at <= start + Duration::from_secs(10), "{at:?}");
        assert!(matches!(deadline_passes(&mut conn, at), Step::Continue));
        let _ = conn.settle(&LIMITS, at, &mut WriteMetrics::default());
        let text = String::from_utf8_lossy(&conn.socket.written[2..]).into_owned();
        assert!(
            text.starts_with(r#"{"type":"token_expiring","payload":{"expires_at":""#),
            "{text}"
        );
        conn.socket.written.clear();
        // Next: the ping; the notice does not come again.
        let ping_at = start + LIMITS.ping_interval;
        assert_eq!(conn.timer_at, Some(ping_at));
        assert!(matches!(
            deadline_passes(&mut conn, ping_at),
            Step::Continue
        ));
        let _ = conn.settle(&LIMITS, ping_at, &mut WriteMetrics::default());
        assert_eq!(conn.socket.written, PING_FRAME);
    }

    #[test]
    fn abort_reports_an_open_session_once() {
        let start = Instant::now();
        let mut conn = open_session(start);
        assert_eq!(
            conn.abort(start).map(|e| e.reason),
            Some(CloseReason::ConnectionLost)
        );
        assert!(conn.abort(start).is_none());
    }

    #[test]
    fn a_resume_sends_connected_the_replay_then_new_live_messages_once() {
        let start = Instant::now();
        let mut conn = handshaking(b"", start);
        conn.open_awaiting_history(
            b"HTTP/1.1 101\r\n\r\n",
            0,
            session_params(
                start,
                crate::clock::unix_secs_now() + SESSION_LIFE.as_secs(),
                Duration::ZERO,
            ),
        );
        let id = |seq| Some(StreamId { ms: 9, seq });
        let frame = |text: &str| -> Frame { Arc::from(text.as_bytes()) };
        // Live messages while the read is in flight are held, not written.
        assert_eq!(
            conn.queue_published(frame("L2"), id(2), Stamp::default().later(7), 8, start),
            Queued::Again
        );
        assert_eq!(
            conn.queue_published(frame("P"), None, Stamp::default(), 8, start),
            Queued::Again
        );
        // A `{"type":"ping"}` before `connected` is not answered (counted dropped):
        // `connected` comes first, and a held pong would count as a delivery.
        assert_eq!(conn.queue_pongs(&frame("G"), 1, 8, start), 1);
        let _ = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        assert_eq!(conn.socket.written, b"HTTP/1.1 101\r\n\r\n");
        // The read covered up to 9-3: held 9-2 was replayed.
        let replay = vec![
            (StreamId { ms: 9, seq: 1 }, frame("R1")),
            (StreamId { ms: 9, seq: 2 }, frame("R2")),
        ];
        let mut skipped = Vec::new();
        assert_eq!(
            conn.finish_history(frame("C"), replay, id(3), start, |read_at| skipped
                .push(read_at)),
            Some(1)
        );
        assert_eq!(skipped, [Stamp::default().later(7)], "L2's read time");
        // The pub/sub copy of a replayed message can arrive after the read: skipped;
        // from the first newer id on, everything is new.
        assert_eq!(
            conn.queue_published(frame("L3"), id(3), Stamp::default(), 8, start),
            Queued::Duplicate
        );
        assert_eq!(
            conn.queue_published(frame("L4"), id(4), Stamp::default(), 8, start),
            Queued::First
        );
        assert_eq!(
            conn.queue_published(frame("L5"), id(5), Stamp::default(), 8, start),
            Queued::Again
        );
        let _ = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        assert_eq!(conn.socket.written, b"HTTP/1.1 101\r\n\r\nCR1R2PL4L5");
        // Only once: finishing again does nothing.
        assert_eq!(
            conn.finish_history(frame("C"), Vec::new(), None, start, |_| {}),
            None
        );
        // The hold is bounded like the queue; what it drops is counted.
        let mut conn = handshaking(b"", start);
        conn.open_awaiting_history(
            b"",
            0,
            session_params(
                start,
                crate::clock::unix_secs_now() + SESSION_LIFE.as_secs(),
                Duration::ZERO,
            ),
        );
        assert_eq!(
            conn.queue_published(frame("A"), id(5), Stamp::default(), 1, start),
            Queued::Again
        );
        assert_eq!(
            conn.queue_published(frame("B"), id(6), Stamp::default(), 1, start),
            Queued::Dropped
        );
        assert_eq!(conn.held_dropped(), 1);
    }

    /// A session opened at `start` (101 queued) that waits for its user's
    /// subscription until `by`.
    fn awaiting_subscription(start: Instant, by: Instant) -> Connection<MockStream> {
        let token_exp = crate::clock::unix_secs_now() + SESSION_LIFE.as_secs();
        let mut conn = handshaking(b"", start);
        conn.open_awaiting_subscription(
            b"HTTP/1.1 101\r\n\r\n",
            0,
            session_params(start, token_exp, Duration::ZERO),
            by,
        );
        conn
    }

    #[test]
    fn a_session_awaiting_its_subscription_holds_messages_until_confirmed() {
        let start = Instant::now();
        let by = start + Duration::from_secs(10);
        let mut conn = awaiting_subscription(start, by);
        let frame = |text: &str| -> Frame { Arc::from(text.as_bytes()) };
        assert_eq!(
            conn.queue_published(frame("M1"), None, Stamp::default(), 8, start),
            Queued::Again
        );
        assert_eq!(conn.queue_pongs(&frame("G"), 1, 8, start), 1, "no pong yet");
        let _ = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        assert_eq!(conn.socket.written, b"HTTP/1.1 101\r\n\r\n");
        assert_eq!(conn.timer_at, Some(by), "the wait is the earliest deadline");
        assert!(conn.subscription_confirmed());
        assert!(!conn.subscription_confirmed(), "once");
        // Still holding (the history read may follow) until finished: without
        // history, at once with an empty replay.
        assert_eq!(
            conn.queue_published(frame("M2"), None, Stamp::default(), 8, start),
            Queued::Again
        );
        assert_eq!(
            conn.finish_history(frame("C"), Vec::new(), None, start, |_| {}),
            Some(0)
        );
        assert_eq!(
            conn.queue_published(frame("M3"), None, Stamp::default(), 8, start),
            Queued::First
        );
        let _ = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        assert_eq!(conn.socket.written, b"HTTP/1.1 101\r\n\r\nCM1M2M3");
        // The passed wait no longer matters.
        assert!(matches!(conn.on_deadline(&LIMITS, by), Step::Continue));
    }

    #[test]
    fn a_subscription_not_confirmed_in_time_closes_with_1013() {
        let start = Instant::now();
        let by = start + Duration::from_secs(10);
        let mut conn = awaiting_subscription(start, by);
        let _ = conn.queue_published(Arc::from(&b"held"[..]), None, Stamp::default(), 8, start);
        let _ = conn.settle(&LIMITS, start, &mut WriteMetrics::default());
        let ended = ended(deadline_passes(&mut conn, by));
        assert_eq!(ended.reason, CloseReason::SubscriptionTimeout);
        assert_eq!(ended.reason.label(), "subscription_timeout");
        let _ = conn.settle(&LIMITS, by, &mut WriteMetrics::default());
        let mut expected = b"HTTP/1.1 101\r\n\r\n".to_vec();
        expected.extend(close_frame(1013, "try again later"));
        assert_eq!(
            conn.socket.written, expected,
            "the held message is not sent"
        );
        assert!(!conn.subscription_confirmed(), "closed: nothing to release");
        assert_eq!(
            conn.take_deliveries(),
            Deliveries {
                written: 0,
                unsent: 1
            },
            "the held message is accounted for"
        );
    }
}
