//! One client connection, owned by the event loop's slab.
//!
//! Life cycle (each state owns its data; transitions replace the state by value):
//!
//! ```text
//! Handshake --(head complete, refused or /health, /metrics)--> Respond --> gone
//!     |                                                        (answer written, write side shut,
//!     |                                                         input drained until EOF or deadline)
//!     +--(valid upgrade)--> Open --(server closes: 1001, 4001, 4008, 1002, 1007, 1009)--> Closing --> gone
//!                             |                                   (close frame queued, waiting for the
//!                             +--(client close: reply queued)-->   peer's close, the flush, or the deadline)
//!                             +--(EOF, I/O error, pong timeout)--> gone
//! ```
//!
//! Reading and writing are separate paths: `fill_head`/`read_messages` read until
//! `WouldBlock` (mio is edge-triggered) or a budget; `flush` writes the
//! `OutboundQueue` until it is empty or the socket is full.

pub mod handshake;
pub mod outbound;

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::rc::Rc;
use std::time::Instant;

use mio::net::TcpStream;
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::protocol::{Message, Role, WebSocketConfig, WebSocketContext};

use crate::message::Frame;
use outbound::{FlushResult, OutboundQueue};

/// Largest amount read from a socket in one `read` call during the handshake.
const HEAD_READ_CHUNK: usize = 1024;
/// Initial read buffer of a session (tungstenite allocates it up front and grows it
/// to a frame's size when one is larger). Clients send little: small pings and
/// pongs, `{"type":"ping"}`; every idle connection pays for this buffer.
const WS_READ_BUFFER: usize = 128;

/// tungstenite's settings for a server connection: small read buffer, no write
/// buffering (writes go straight into the outbound queue), and the message limit.
pub fn websocket_config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(outbound::MAX_CONTROL_BYTES)
        .max_message_size(Some(max_message_size))
        // Control frames may carry 125 bytes whatever the data limit is.
        .max_frame_size(Some(max_message_size.max(125)))
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
}

impl CloseReason {
    pub const ALL: [CloseReason; 10] = [
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
        }
    }

    /// The close frame the server sends for this reason, if any (DESIGN.md section 3).
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
        }
    }

    /// Whether the server waits for the client's close reply (a clean close) rather
    /// than failing the connection at once (RFC 6455 7.1.7).
    fn awaits_reply(self) -> bool {
        matches!(
            self,
            CloseReason::SlowClient | CloseReason::TokenExpired | CloseReason::Shutdown
        )
    }
}

/// The state of a connection; each variant owns what that state needs.
pub enum State {
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
    /// Transitional placeholder while a state is being replaced; never observed.
    Gone,
}

/// An open WebSocket session.
pub struct Session {
    pub ws: WebSocketContext,
    /// Shared with the hub's key.
    pub user_id: Rc<str>,
    /// When the token's `exp` passes.
    pub expires_at: Instant,
    /// Last time any byte arrived.
    pub last_seen: Instant,
    /// When the next ping frame is due.
    pub next_ping: Instant,
}

/// A session waiting for the client to answer the server's close frame.
pub struct Closing {
    pub ws: WebSocketContext,
    pub deadline: Instant,
}

/// One client connection.
pub struct Connection {
    pub socket: TcpStream,
    /// Unique for the life of the process (the `connection_id` clients see).
    pub id: u64,
    pub state: State,
    pub out: OutboundQueue,
    /// Last time output made progress (or became pending).
    pub last_write_progress: Instant,
    /// Earliest deadline this connection has in the timer heap.
    pub timer_at: Option<Instant>,
    /// Whether the socket is registered for `WRITABLE` too.
    pub writable_interest: bool,
    /// Whether the connection is in the loop's list of connections to flush.
    pub flush_pending: bool,
    /// When the connection was accepted.
    pub accepted_at: Instant,
}

/// How reading a request head went.
pub enum HeadRead {
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

impl Connection {
    pub fn new(socket: TcpStream, id: u64, now: Instant, handshake_deadline: Instant) -> Self {
        Connection {
            socket,
            id,
            state: State::Handshake {
                head: Vec::new(),
                deadline: handshake_deadline,
            },
            out: OutboundQueue::default(),
            last_write_progress: now,
            timer_at: None,
            writable_interest: false,
            flush_pending: false,
            accepted_at: now,
        }
    }

    /// The session's user, while open.
    pub fn user_id(&self) -> Option<&Rc<str>> {
        match &self.state {
            State::Open(session) => Some(&session.user_id),
            _ => None,
        }
    }

    /// Reads request-head bytes until `WouldBlock`, EOF, or one byte past the head limit.
    pub fn fill_head(&mut self) -> HeadRead {
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

    /// The bytes of the request head read so far.
    pub fn head(&self) -> &[u8] {
        match &self.state {
            State::Handshake { head, .. } => head,
            _ => &[],
        }
    }

    /// Queues a plain HTTP answer; the connection closes once it is written.
    pub fn respond(&mut self, answer: &[u8], now: Instant, deadline: Instant) {
        self.queue_control(answer, now);
        self.state = State::Respond {
            deadline,
            write_shut: false,
        };
    }

    /// Completes the upgrade: queues the 101 answer and the `connected` message and
    /// hands bytes that followed the head to the WebSocket reader.
    pub fn open(
        &mut self,
        answer: &[u8],
        connected: Frame,
        head_len: usize,
        session: SessionParams,
    ) {
        let State::Handshake { head, .. } = std::mem::replace(&mut self.state, State::Gone) else {
            return;
        };
        // Bytes pipelined after the head (a first frame sent with the request) are not
        // lost. Copied out rather than reusing `head`: tungstenite would keep the head
        // buffer's whole allocation (kilobytes) as its read buffer for the session's life.
        let rest = head.get(head_len..).unwrap_or_default().to_vec();
        let ws = WebSocketContext::from_partially_read(rest, Role::Server, Some(session.ws_config));
        self.queue_control(answer, session.now);
        // The first message is always accepted: the queue is empty.
        self.out.push_message(connected, usize::MAX);
        self.state = State::Open(Box::new(Session {
            ws,
            user_id: session.user_id,
            expires_at: session.expires_at,
            last_seen: session.now,
            next_ping: session.now + session.ping_interval,
        }));
    }

    /// Queues a message frame; false when `WS_SEND_BUFFER` frames are already waiting.
    pub fn queue_message(&mut self, frame: Frame, limit: usize, now: Instant) -> bool {
        if self.out.is_empty() {
            self.last_write_progress = now;
        }
        self.out.push_message(frame, limit)
    }

    /// Queues bytes that only this connection sends (pings, HTTP answers).
    pub fn queue_control(&mut self, bytes: &[u8], now: Instant) -> bool {
        if self.out.is_empty() {
            self.last_write_progress = now;
        }
        self.out.push_control(bytes)
    }

    /// Writes queued output. Err means the socket is dead.
    pub fn flush(&mut self, now: Instant) -> io::Result<FlushResult> {
        let (written, result) = self.out.flush(&mut self.socket)?;
        if written > 0 {
            self.last_write_progress = now;
        }
        Ok(result)
    }

    /// Reads WebSocket frames until `WouldBlock`, the budget, or the end of the session.
    /// Returns how many `{"type":"ping"}` messages asked for a pong.
    pub fn read_messages(&mut self, budget: usize, now: Instant) -> (FramesRead, usize) {
        let (ws, discard_writes) = match &mut self.state {
            State::Open(session) => (&mut session.ws, false),
            // Replies to the peer's close are not needed: ours is already queued.
            State::Closing(closing) => (&mut closing.ws, true),
            _ => return (FramesRead::WouldBlock, 0),
        };
        let read = read_frames(ws, &mut self.socket, &mut self.out, budget, discard_writes);
        if read.bytes_read > 0
            && let State::Open(session) = &mut self.state
        {
            session.last_seen = now;
        }
        (read.result, read.ping_requests)
    }

    /// Leaves `Open`: queues the close frame for `reason` (if it has one), then waits
    /// for the client's reply in `Closing`, or lingers in `Respond` when the connection
    /// is failed (RFC 6455 7.1.7) or the client's close was just answered. Returns
    /// false when there is nothing left to send (remove now).
    pub fn begin_close(&mut self, reason: CloseReason, now: Instant, deadline: Instant) -> bool {
        let State::Open(session) = std::mem::replace(&mut self.state, State::Gone) else {
            return false;
        };
        if reason == CloseReason::SlowClient {
            // The client is not reading: what it has not started to receive is dropped
            // so the close frame is next in line.
            self.out.discard_unsent_messages();
        }
        match reason.close_frame() {
            Some((code, text)) => {
                self.queue_control(&close_frame(code, text), now);
            }
            // tungstenite has queued the reply to the client's close.
            None if reason == CloseReason::ClientClosed => {}
            None => return false,
        }
        self.state = if reason.awaits_reply() {
            State::Closing(Box::new(Closing {
                ws: session.ws,
                deadline,
            }))
        } else {
            State::Respond {
                deadline,
                write_shut: false,
            }
        };
        true
    }

    /// The client answered the server's close: finish like any final answer.
    pub fn close_replied(&mut self) {
        if let State::Closing(closing) = &self.state {
            self.state = State::Respond {
                deadline: closing.deadline,
                write_shut: false,
            };
        }
    }

    /// After the final bytes of a `Respond` went out: stop sending, keep reading until
    /// EOF so the client sees them rather than a reset.
    pub fn shut_write(&mut self) {
        if let State::Respond { write_shut, .. } = &mut self.state
            && !*write_shut
        {
            *write_shut = true;
            // The peer may already be gone; nothing else is done with the socket's output.
            let _ = self.socket.shutdown(Shutdown::Write);
        }
    }

    /// Reads and throws away input (a `Respond` after its answer). True on EOF or error.
    pub fn drain_input(&mut self) -> bool {
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

/// What `Connection::open` needs besides the answer.
pub struct SessionParams {
    pub user_id: Rc<str>,
    pub expires_at: Instant,
    pub now: Instant,
    pub ping_interval: std::time::Duration,
    pub ws_config: WebSocketConfig,
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
/// `discard_writes`. The server runs it on a socket, the fuzz target on bytes in memory.
pub fn read_frames<S: Read>(
    ws: &mut WebSocketContext,
    socket: &mut S,
    out: &mut OutboundQueue,
    budget: usize,
    discard_writes: bool,
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
                if is_ping_request(text.as_bytes()) {
                    ping_requests += 1;
                }
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
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut frame = Vec::with_capacity(4 + reason.len());
    frame.push(0x88);
    frame.push((2 + reason.len()) as u8);
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    frame
}

/// An empty unmasked server ping frame.
pub const PING_FRAME: [u8; 2] = [0x89, 0x00];

#[cfg(test)]
mod tests {
    use super::*;

    /// Client bytes in memory; `WouldBlock` once they run out, like a drained socket.
    struct ClientBytes {
        data: Vec<u8>,
        pos: usize,
    }

    impl Read for ClientBytes {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.pos == self.data.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            // Short reads: at most 7 bytes at a time.
            let n = buf.len().min(self.data.len() - self.pos).min(7);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    /// A masked client frame (RFC 6455 5.3), FIN set, payload under 126 bytes.
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    fn read_all(bytes: Vec<u8>, max_message_size: usize) -> (FramesReport, Vec<u8>) {
        let mut ws = WebSocketContext::new(Role::Server, Some(websocket_config(max_message_size)));
        let mut socket = ClientBytes {
            data: bytes,
            pos: 0,
        };
        let mut out = OutboundQueue::default();
        let report = read_frames(&mut ws, &mut socket, &mut out, 64, false);
        let mut written = Vec::new();
        out.flush(&mut written).expect("flush into a Vec");
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
        let mut socket = ClientBytes {
            data: bytes,
            pos: 0,
        };
        let mut out = OutboundQueue::default();
        let first = read_frames(&mut ws, &mut socket, &mut out, 4, false);
        assert_eq!(first.result, FramesRead::BudgetSpent);
        let rest = read_frames(&mut ws, &mut socket, &mut out, 64, false);
        assert_eq!(rest.result, FramesRead::WouldBlock);
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
}
