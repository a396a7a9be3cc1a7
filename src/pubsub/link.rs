//! One pub/sub connection to Redis that owns its socket: TCP (optionally
//! TLS with rustls), non-blocking, registered in the `mio::Poll` of the
//! thread that drives it, with a reused read buffer and an output buffer for
//! partial writes.
//!
//! ```text
//!  Link::connect      TCP connect (bounded), TLS set up, AUTH [+ SELECT] queued
//!  Link::command      a packed command appended to the output, its replies awaited
//!  Link::flush        writes what it can; asks for WRITABLE only while bytes wait
//!  Link::fill         one read into the read buffer (Closed at EOF)
//!  Link::next_event   the next frame as an Event (borrowing the buffer), or None
//! ```
//!
//! The link knows which command each reply answers (Redis answers in order):
//! a confirmation of the command at the front of the queue is `solicited`,
//! one that is not (a `sunsubscribe` Redis sends when a slot moves) is not;
//! an error reply names the command it answers. The caller bounds the waits:
//! [`Link::oldest_unanswered`] says since when the oldest command waits.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::resp::{self, Frame, ProtocolError, SubscriptionKind};
use crate::config::RedisConfig;

/// The read buffer's size to start with and to shrink back to.
const INPUT_INITIAL: usize = 64 << 10;
/// A read is attempted only with at least this much room at the end of the buffer.
const MIN_READ: usize = 16 << 10;
/// An empty read buffer larger than this is shrunk back to `INPUT_INITIAL`
/// (after a message of several MiB), so one large message does not pin its
/// memory for the life of the link.
const INPUT_KEEP: usize = 4 << 20;
/// The read buffer never grows past what the largest frame the parser accepts
/// needs (a bulk of `MAX_BULK`, its header and the array around it).
const INPUT_MAX: usize = resp::MAX_BULK + (1 << 20);

/// Where and how to connect: resolved once from the configuration (the CA
/// file is read at start, so that a bad one is a start-up error).
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    tls: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Target {
    /// The server of `config`. Fails when `REDIS_TLS_CA_FILE` is unreadable
    /// or holds no certificate. The CA rules are those of
    /// `redis_reader::build_client`: the CA file's certificates, or else the
    /// system's roots (rustls-native-certs); the server name (SNI, and the
    /// name checked in the certificate) is the host.
    pub fn from_config(config: &RedisConfig) -> io::Result<Target> {
        Target::at(config, &config.host, config.port)
    }

    /// Like [`Target::from_config`] for another node (a cluster master) with
    /// the same credentials and TLS settings.
    pub fn at(config: &RedisConfig, host: &str, port: u16) -> io::Result<Target> {
        let tls = if config.use_tls {
            Some(Arc::new(tls_config(config)?))
        } else {
            None
        };
        Ok(Target {
            host: host.to_string(),
            port,
            username: config.username.clone().filter(|u| !u.is_empty()),
            password: config.password.clone().filter(|p| !p.is_empty()),
            db: config.db,
            tls,
        })
    }

    /// `host:port` (IPv6 in brackets), for logs.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn tls_config(config: &RedisConfig) -> io::Result<ClientConfig> {
    // rustls needs a process-wide crypto provider when more than one could be
    // compiled in; installing fails only if one is already installed, which is
    // just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = RootCertStore::empty();
    match &config.tls_ca_file {
        Some(path) => {
            let name = |e: &dyn fmt::Display| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("REDIS_TLS_CA_FILE {}: {e}", path.display()),
                )
            };
            let pem = std::fs::read(path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("REDIS_TLS_CA_FILE {}: {e}", path.display()),
                )
            })?;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| name(&e))?;
                roots.add(cert).map_err(|e| name(&e))?;
            }
            if roots.is_empty() {
                return Err(name(&"no certificate in the file"));
            }
        }
        None => {
            // Certificates the system store could not parse are skipped, as
            // redis-rs does.
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    Ok(ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// What a reply answers: the command at the front of the link's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Auth,
    Select,
    Ping,
    /// One of the (un)subscribe commands; Redis answers each channel argument
    /// with a confirmation.
    Subscription(SubscriptionKind),
}

impl Command {
    /// The command's name, for errors.
    pub fn name(self) -> &'static str {
        match self {
            Command::Auth => "AUTH",
            Command::Select => "SELECT",
            Command::Ping => "PING",
            Command::Subscription(kind) => kind.command(),
        }
    }
}

/// A command sent and the replies still awaited for it.
struct Awaiting {
    command: Command,
    replies: usize,
    sent: Instant,
}

/// What the link read.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A published message (`message`, `pmessage` or `smessage`).
    Message {
        channel: &'a [u8],
        payload: &'a [u8],
    },
    /// A subscription confirmed or ended; `solicited` when it answers the
    /// command at the front of the queue.
    Subscription {
        kind: SubscriptionKind,
        channel: Option<&'a [u8]>,
        solicited: bool,
    },
    /// The answer to a PING, `round_trip` after it was queued.
    Pong { round_trip: Duration },
    /// `AUTH` or `SELECT` answered OK.
    Done(Command),
}

/// Why a link cannot go on.
#[derive(Debug)]
pub enum LinkError {
    /// TCP connect, TLS or a read or write failed.
    Io(&'static str, io::Error),
    /// Redis closed the connection.
    Closed,
    Protocol(ProtocolError),
    /// Redis answered `command` with an error.
    Refused {
        command: &'static str,
        error: String,
    },
    /// A reply that does not fit the command it answers.
    Unexpected {
        command: &'static str,
        what: &'static str,
    },
}

impl LinkError {
    /// True when Redis refused the credentials (AUTH failed, or a command
    /// needs authentication): the caller names the settings to check.
    pub fn is_auth_refusal(&self) -> bool {
        match self {
            LinkError::Refused { error, .. } => {
                error.starts_with("WRONGPASS") || error.starts_with("NOAUTH")
            }
            _ => false,
        }
    }
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Io(what, e) => write!(f, "{what}: {e}"),
            LinkError::Closed => f.write_str("read: connection closed by Redis"),
            LinkError::Protocol(e) => write!(f, "read: {e}"),
            LinkError::Refused { command, error } => write!(f, "{command}: {error}"),
            LinkError::Unexpected { command, what } => {
                write!(f, "{command}: unexpected reply ({what})")
            }
        }
    }
}

/// What a [`Link::fill`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// Bytes were read: parse them, then fill again.
    Read(usize),
    /// Nothing more to read now: wait for the next readable event.
    WouldBlock,
}

/// The socket, plain or wrapped in TLS.
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

struct TlsStream {
    tls: ClientConnection,
    socket: TcpStream,
}

impl Transport {
    fn socket(&mut self) -> &mut TcpStream {
        match self {
            Transport::Plain(socket) => socket,
            Transport::Tls(stream) => &mut stream.socket,
        }
    }

    /// Plaintext read; `Ok(0)` at EOF.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let stream = match self {
            Transport::Plain(socket) => return socket.read(buf),
            Transport::Tls(stream) => stream,
        };
        loop {
            match stream.tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // No plaintext buffered: read records from the socket.
            if stream.tls.read_tls(&mut stream.socket)? == 0 {
                return Ok(0);
            }
            stream
                .tls
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            // The handshake, and key updates, may have something to answer.
            stream.write_tls()?;
        }
    }

    /// Plaintext write; `WouldBlock` when nothing could be taken.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let stream = match self {
            Transport::Plain(socket) => return socket.write(buf),
            Transport::Tls(stream) => stream,
        };
        // rustls buffers the plaintext (also before the handshake is done) up
        // to its buffer limit, then takes nothing.
        let taken = stream.tls.writer().write(buf)?;
        stream.write_tls()?;
        if taken == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    /// TLS records still to be written to the socket.
    fn wants_write(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(stream) => stream.tls.wants_write(),
        }
    }

    fn write_tls(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(stream) => stream.write_tls(),
        }
    }
}

impl TlsStream {
    /// Writes TLS records until none are left or the socket would block.
    fn write_tls(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.socket) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// One pub/sub connection (see the module doc).
pub struct Link {
    transport: Transport,
    token: Token,
    /// WRITABLE is part of the registered interest.
    writable: bool,
    /// Read buffer: bytes `start..end` are read and not yet parsed.
    input: Vec<u8>,
    start: usize,
    end: usize,
    /// Packed commands; bytes before `written` are sent.
    output: Vec<u8>,
    written: usize,
    awaiting: VecDeque<Awaiting>,
}

impl Link {
    /// Connects (TCP within what is left until `deadline`, no Nagle), sets
    /// up TLS when the target asks for it, registers the socket under
    /// `token`, and queues `AUTH` (with a password) and `SELECT` (db other
    /// than 0). Nothing is written yet: queue the subscriptions, then
    /// [`Link::flush`], so they all leave together.
    pub fn connect(
        target: &Target,
        registry: &Registry,
        token: Token,
        deadline: Instant,
    ) -> Result<Link, LinkError> {
        let socket = connect_tcp(target, deadline)?;
        socket
            .set_nodelay(true)
            .and_then(|()| socket.set_nonblocking(true))
            .map_err(|e| LinkError::Io("connect", e))?;
        let socket = TcpStream::from_std(socket);
        let transport = match &target.tls {
            None => Transport::Plain(socket),
            Some(config) => {
                let name = ServerName::try_from(target.host.clone()).map_err(|e| {
                    LinkError::Io("TLS", io::Error::new(io::ErrorKind::InvalidInput, e))
                })?;
                let tls = ClientConnection::new(Arc::clone(config), name)
                    .map_err(|e| LinkError::Io("TLS", io::Error::other(e)))?;
                Transport::Tls(Box::new(TlsStream { tls, socket }))
            }
        };
        let mut link = Link {
            transport,
            token,
            writable: true,
            input: vec![0; INPUT_INITIAL],
            start: 0,
            end: 0,
            output: Vec::new(),
            written: 0,
            awaiting: VecDeque::new(),
        };
        registry
            .register(
                link.transport.socket(),
                token,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| LinkError::Io("connect", e))?;
        if let Some(password) = &target.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = &target.username {
                auth.arg(username);
            }
            auth.arg(password);
            link.command(&auth, Command::Auth, 1);
        }
        if target.db != 0 {
            link.command(redis::cmd("SELECT").arg(target.db), Command::Select, 1);
        }
        Ok(link)
    }

    /// Queues `cmd` (packed by redis-rs), which Redis answers with `replies`
    /// replies (one per channel for the subscribe commands, else 1).
    pub fn command(&mut self, cmd: &redis::Cmd, command: Command, replies: usize) {
        cmd.write_packed_command(&mut self.output);
        self.awaiting.push_back(Awaiting {
            command,
            replies: replies.max(1),
            sent: Instant::now(),
        });
    }

    /// Queues a `PING`.
    pub fn ping(&mut self) {
        self.command(&redis::cmd("PING"), Command::Ping, 1);
    }

    /// The command waiting longest for its reply and since when it waits.
    pub fn oldest_unanswered(&self) -> Option<(Command, Instant)> {
        self.awaiting.front().map(|a| (a.command, a.sent))
    }

    /// True while a PING waits for its pong.
    pub fn ping_in_flight(&self) -> bool {
        self.awaiting.iter().any(|a| a.command == Command::Ping)
    }

    /// Writes queued bytes until none are left or the socket would block, and
    /// registers WRITABLE interest only while some are left.
    pub fn flush(&mut self, registry: &Registry) -> Result<(), LinkError> {
        while self.written < self.output.len() {
            match self.transport.write(&self.output[self.written..]) {
                Ok(0) => {
                    return Err(LinkError::Io("write", io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LinkError::Io("write", e)),
            }
        }
        if self.written == self.output.len() {
            self.output.clear();
            self.written = 0;
        }
        self.transport
            .write_tls()
            .map_err(|e| LinkError::Io("write", e))?;
        let writable = !self.output.is_empty() || self.transport.wants_write();
        if writable != self.writable {
            let interest = if writable {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            registry
                .reregister(self.transport.socket(), self.token, interest)
                .map_err(|e| LinkError::Io("write", e))?;
            self.writable = writable;
        }
        Ok(())
    }

    /// One read into the read buffer.
    pub fn fill(&mut self) -> Result<Fill, LinkError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.input.len() > INPUT_KEEP {
                self.input.truncate(INPUT_INITIAL);
                self.input.shrink_to_fit();
            }
        }
        if self.input.len() - self.end < MIN_READ {
            // Move the unfinished frame to the front, or grow for a large one.
            if self.start > 0 {
                self.input.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.input.len() - self.end < MIN_READ {
                if self.input.len() >= INPUT_MAX {
                    return Err(LinkError::Protocol(ProtocolError::too_large()));
                }
                let len = (self.input.len() * 2).min(INPUT_MAX);
                self.input.resize(len, 0);
            }
        }
        loop {
            match self.transport.read(&mut self.input[self.end..]) {
                Ok(0) => return Err(LinkError::Closed),
                Ok(n) => {
                    self.end += n;
                    return Ok(Fill::Read(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LinkError::Io("read", e)),
            }
        }
    }

    /// True while read bytes wait to be parsed.
    pub fn has_input(&self) -> bool {
        self.start < self.end
    }

    /// The next event from the bytes read so far; `None` when a frame is not
    /// complete yet ([`Link::fill`] again).
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>, LinkError> {
        {
            let Some((frame, used)) =
                resp::parse(&self.input[self.start..self.end]).map_err(LinkError::Protocol)?
            else {
                return Ok(None);
            };
            self.start += used;
            let event = match frame {
                Frame::Message {
                    channel, payload, ..
                } => Event::Message { channel, payload },
                Frame::Subscription { kind, channel, .. } => {
                    let solicited = match self.awaiting.front_mut() {
                        Some(front) if front.command == Command::Subscription(kind) => {
                            front.replies -= 1;
                            if front.replies == 0 {
                                self.awaiting.pop_front();
                            }
                            true
                        }
                        _ => false,
                    };
                    Event::Subscription {
                        kind,
                        channel,
                        solicited,
                    }
                }
                Frame::Error(text) => {
                    let command = self.awaiting.front().map_or("read", |a| a.command.name());
                    return Err(LinkError::Refused {
                        command,
                        error: String::from_utf8_lossy(text).into_owned(),
                    });
                }
                Frame::Pong | Frame::Simple(_) | Frame::Integer(_) | Frame::Other => {
                    let Some(front) = self.awaiting.pop_front() else {
                        return Err(LinkError::Unexpected {
                            command: "read",
                            what: "a reply to no command",
                        });
                    };
                    match (front.command, frame) {
                        (Command::Ping, Frame::Pong | Frame::Simple(_)) => Event::Pong {
                            round_trip: front.sent.elapsed(),
                        },
                        (Command::Auth | Command::Select, Frame::Simple(_)) => {
                            Event::Done(front.command)
                        }
                        (command, _) => {
                            return Err(LinkError::Unexpected {
                                command: command.name(),
                                what: "not a confirmation, OK or pong",
                            });
                        }
                    }
                }
            };
            Ok(Some(event))
        }
    }

    /// Takes the socket out of the poll (before the link is dropped).
    pub fn deregister(&mut self, registry: &Registry) {
        if let Err(e) = registry.deregister(self.transport.socket()) {
            log::debug!(error:% = e; "Redis link deregister failed");
        }
    }
}

/// TCP connect to the first address that answers within what is left until
/// `deadline`.
fn connect_tcp(target: &Target, deadline: Instant) -> Result<std::net::TcpStream, LinkError> {
    let addrs = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| LinkError::Io("connect", e))?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for the host");
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            last = io::ErrorKind::TimedOut.into();
            break;
        }
        match std::net::TcpStream::connect_timeout(&addr, left) {
            Ok(socket) => return Ok(socket),
            Err(e) => last = e,
        }
    }
    Err(LinkError::Io("connect", last))
}
