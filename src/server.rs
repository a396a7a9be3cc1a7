//! The event loop: one thread, one mio `Poll`, owning the listener, the waker, the
//! signal pipe and a `Slab` of connections (the slab key is the mio `Token`).
//!
//! Each turn: wait for events (the timeout is the earliest deadline), accept until
//! `WouldBlock`, run the read path of readable connections, deliver a bounded batch
//! of Redis messages (each encoded once, queued on every connection of the user),
//! flush each touched connection once, then fire the deadlines that are due.
//! Deadlines live in a heap with at most a couple of entries per connection, so
//! their cost grows with the deadlines that fire, not with the connections held.
//!
//! The loop does not look inside a connection: it hands it events and carries out
//! what the connection answers (see `conn`): reregister, arm a timer, remove,
//! evaluate a request head, account for an ended session. The loop's own work is
//! the poll registry, the listener, the hub, the timers, the metrics, and never
//! anything slow: `/health` reads counts the loop keeps, `/metrics` samples /proc
//! at most once a second, and log lines go to the log writer's buffer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::io::{self, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::{TcpListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;

use crate::auth::Authenticator;
use crate::clock::Timestamp;
use crate::config::Config;
use crate::conn::CloseReason;
use crate::conn::handshake::{self, ConnectionCounts, Decision, Endpoints, HandshakeRules};
use crate::conn::refresh::{self, Outcome};
use crate::conn::{Connection, Ended, Limits, Next, Queued, SessionParams, Step, websocket_config};
use crate::handover::{Inbox, Published};
use crate::history::StreamId;
use crate::history::reader::{
    Answer, HistoryReader, HistorySettings, Outcome as HistoryOutcome, Request,
};
use crate::http::{self, Rejection};
use crate::hub::Hub;
use crate::logging::RateLimited;
use crate::message::{self, ConnectedHistory, Frame, InvalidMessage, MessageEncoder, Recovery};
use crate::metrics::{self, Gauges, Metrics, ProcessFigures, ProcessSampler};
use crate::redis_reader::RedisReader;
use crate::redis_status::RedisStatus;
use crate::user_channels::{Admission, UserChannels, Waiter};

// Reserved tokens sit at the top of the range so a slab key is directly a token.
const LISTENER_TOKEN: Token = Token(usize::MAX - 1);
const WAKER_TOKEN: Token = Token(usize::MAX - 2);
const SIGNAL_TOKEN: Token = Token(usize::MAX - 3);
const ADMIN_LISTENER_TOKEN: Token = Token(usize::MAX - 4);

/// Events taken from one `poll`.
const EVENTS_CAPACITY: usize = 1024;
/// Redis messages delivered per loop turn, so sockets are never starved for long.
/// Large because a turn writes each touched connection once: under a backlog, a big
/// batch puts several messages into one `writev` per connection (measured with
/// ws-notify-bench one-to-one: 4096 -> ~35k/s, 16384 -> ~78k/s, 65536 -> ~135k/s).
const INBOX_BATCH: usize = 65_536;
/// WebSocket messages read from one connection per turn before others get their turn.
const READ_BUDGET: usize = 64;
/// Connections still in their handshake, on top of `WS_MAX_CONNECTIONS`, that the
/// connection table is sized for before it has to grow.
const HANDSHAKE_HEADROOM: usize = 1024;
/// How long accepting pauses when the process is out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Time to write an HTTP answer and see the client go.
const RESPOND_WAIT: Duration = Duration::from_secs(5);
/// One "request refused" line per reason per period; the rest are counted in the next.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(5);
/// Per-user subscription modes: how long a new connection waits for Redis to
/// confirm its user's channel before it is closed with 1013 (try again later).
/// A healthy Redis confirms in a round trip; the reader's reconnect backoff and
/// resubscription after an outage fit in it.
pub const SUBSCRIBE_WAIT: Duration = Duration::from_secs(10);

/// The event loop and everything it owns.
pub struct Server {
    poll: Poll,
    /// None once shutdown has begun.
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    /// The `/health` and `/metrics` listener (`WS_ADMIN_ADDR`); None when unset
    /// or once shutdown has begun.
    admin_listener: Option<TcpListener>,
    admin_addr: Option<SocketAddr>,
    /// Read end of the pipe the signal handler writes to.
    signals: UnixStream,
    conns: Slab<Connection>,
    hub: Hub,
    /// (deadline, slab key, connection id); stale entries are skipped when popped.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    metrics: Metrics,
    /// Resident memory and open descriptors for `/metrics`, sampled at most once a second.
    process_sampler: ProcessSampler,
    inbox: Inbox,
    /// Reused buffer for one batch of Redis messages.
    inbound: Vec<Published>,
    reader: RedisReader,
    /// Reads users' history off the loop; None when history is off.
    history: Option<HistoryReader>,
    /// Reused buffer for the history reader's answers.
    history_answers: Vec<Answer>,
    /// Per-user subscription modes: the users whose channels this instance
    /// needs and the queues to the reader; None in pattern mode.
    channels: Option<UserChannels>,
    /// Reused buffer for the connections a turn's confirmations release.
    released: Vec<(Rc<str>, Waiter)>,
    redis: Arc<RedisStatus>,
    authenticator: Authenticator,
    config: Config,
    /// `WS_MAX_CONNECTIONS`, lowered to what the open-file limit can hold.
    max_connections: usize,
    limit_warnings: RateLimited,
    encoder: MessageEncoder,
    ws_config: WebSocketConfig,
    /// The settings connections decide by (the shutdown deadline included).
    limits: Limits,
    /// Connections with output queued during this turn, flushed once at its end.
    to_flush: Vec<usize>,
    /// Connections that used their read budget and have more to read.
    read_again: Vec<usize>,
    started: Instant,
    next_connection_id: u64,
    accept_paused_until: Option<Instant>,
    invalid_warnings: RateLimited,
    accept_warnings: RateLimited,
    /// One limiter per refusal reason (indexed by `Rejection as usize`).
    refusal_lines: [RateLimited; Rejection::ALL.len()],
    /// This process's connection id prefix (see [`ConnectionName`]).
    instance: String,
    /// The clients still to close while a `SHUTDOWN_DRAIN` runs.
    drain: Option<Drain>,
}

/// The listener an accept is for.
#[derive(Clone, Copy)]
enum Listener {
    /// `WS_HOST:WS_PORT`.
    Main,
    /// `WS_ADMIN_ADDR`.
    Admin,
}

/// A gentle drain (`SHUTDOWN_DRAIN`): the connections open when shutdown began,
/// closed a few per turn so the closes spread evenly over the window. The quota
/// comes from the time elapsed since the start, so no timer per connection.
struct Drain {
    started: Instant,
    window: Duration,
    /// (slab key, connection id) of every connection at the start.
    keys: Vec<(usize, u64)>,
    /// How many of `keys` are closed so far.
    closed: usize,
}

impl Drain {
    /// How many connections should be closed by `now`: the first at once, then
    /// evenly, so the last one goes at about `window * (n - 1) / n`.
    fn due(&self, now: Instant) -> usize {
        let total = self.keys.len() as u128;
        let window = self.window.as_nanos();
        if window == 0 {
            return self.keys.len();
        }
        let elapsed = now.saturating_duration_since(self.started).as_nanos();
        (total * elapsed / window + 1).min(total) as usize
    }

    /// When the next close is due (None when all are closed).
    fn next_at(&self) -> Option<Instant> {
        if self.closed >= self.keys.len() {
            return None;
        }
        let total = self.keys.len() as u128;
        let offset = self.window.as_nanos() * self.closed as u128 / total;
        Some(self.started + Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX)))
    }
}

/// A connection id as clients and logs see it: the instance prefix drawn at
/// start, a dash and the connection's counter (`k3f9a2-17`), so ids do not
/// collide across instances and restarts.
#[derive(Clone, Copy)]
struct ConnectionName<'a> {
    instance: &'a str,
    id: u64,
}

impl fmt::Display for ConnectionName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.instance, self.id)
    }
}

/// Six random hex characters (from getrandom(2); the pid and the clock if that
/// fails), drawn once per process.
fn draw_instance_prefix() -> String {
    let mut bytes = [0u8; 3];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the array.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if filled != bytes.len() as isize {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mixed = nanos ^ std::process::id().rotate_left(12);
        bytes.copy_from_slice(&mixed.to_le_bytes()[..3]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ConnectionCounts for Hub {
    fn open_connections(&self) -> usize {
        self.connection_count()
    }

    fn connections_of(&self, user_id: &str) -> usize {
        Hub::connections_of(self, user_id).map_or(0, <[usize]>::len)
    }
}

impl Server {
    /// Binds the listener, installs the signal pipe and starts the Redis reader.
    pub fn bind(config: Config, authenticator: Authenticator) -> io::Result<Server> {
        let address = config
            .listen_addr_text()
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "WS_HOST resolves to no address",
                )
            })?;
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(address)?;
        widen_listen_backlog(&listener)?;
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER_TOKEN, Interest::READABLE)?;

        let mut admin_listener = match config.admin_addr_text() {
            Some(text) => {
                let named =
                    |e: io::Error| io::Error::new(e.kind(), format!("WS_ADMIN_ADDR {text}: {e}"));
                let address = text
                    .to_socket_addrs()
                    .map_err(named)?
                    .next()
                    .ok_or_else(|| {
                        named(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "resolves to no address",
                        ))
                    })?;
                Some(TcpListener::bind(address).map_err(named)?)
            }
            None => None,
        };
        let admin_addr = match &mut admin_listener {
            Some(admin) => {
                poll.registry()
                    .register(admin, ADMIN_LISTENER_TOKEN, Interest::READABLE)?;
                Some(admin.local_addr()?)
            }
            None => None,
        };

        let mut signals = install_signal_pipe()?;
        poll.registry()
            .register(&mut signals, SIGNAL_TOKEN, Interest::READABLE)?;

        let waker = Arc::new(Waker::new(poll.registry(), WAKER_TOKEN)?);
        // One waker per poll: the history reader shares it (the loop checks both queues).
        let (reader, inbox, redis, per_user) =
            RedisReader::spawn(config.redis.clone(), Arc::clone(&waker))?;
        let channels =
            per_user.map(|queues| UserChannels::new(queues, config.redis.unsubscribe_linger));
        let history = if config.history_size > 0 {
            let settings = HistorySettings {
                redis: config.redis.clone(),
                size: config.history_size,
                ttl: config.history_ttl,
            };
            Some(HistoryReader::spawn(settings, waker, Arc::clone(&redis))?)
        } else {
            None
        };

        let max_connections = connection_limit_for(
            raise_open_file_limit(config.max_connections),
            config.max_connections,
        );
        let ws_config = websocket_config(config.max_message_size);
        let limits = Limits {
            ping_interval: config.ping_interval,
            pong_wait: config.pong_wait,
            write_wait: config.write_wait,
            read_budget: READ_BUDGET,
            max_message_size: config.max_message_size,
            shutdown_deadline: None,
        };
        Ok(Server {
            poll,
            listener: Some(listener),
            local_addr,
            admin_listener,
            admin_addr,
            signals,
            // Sized for the connection limit up front: pages are only touched as
            // connections arrive, and growing by doubling would leave the old copies'
            // memory in the heap (resident) after the copy.
            conns: Slab::with_capacity(max_connections + HANDSHAKE_HEADROOM),
            hub: Hub::with_capacity(max_connections),
            // About two live entries per connection (see `schedule`).
            timers: BinaryHeap::with_capacity(2 * (max_connections + HANDSHAKE_HEADROOM)),
            metrics: Metrics::new(inbox.epoch()),
            process_sampler: ProcessSampler::default(),
            inbox,
            inbound: Vec::with_capacity(INBOX_BATCH),
            reader,
            history,
            history_answers: Vec::new(),
            channels,
            released: Vec::new(),
            redis,
            authenticator,
            config,
            max_connections,
            limit_warnings: RateLimited::new(Duration::from_secs(10)),
            encoder: MessageEncoder::new(),
            ws_config,
            limits,
            to_flush: Vec::new(),
            read_again: Vec::new(),
            started: Instant::now(),
            next_connection_id: 1,
            accept_paused_until: None,
            invalid_warnings: RateLimited::new(Duration::from_secs(10)),
            accept_warnings: RateLimited::new(Duration::from_secs(10)),
            refusal_lines: std::array::from_fn(|_| RateLimited::new(REFUSAL_LOG_PERIOD)),
            instance: draw_instance_prefix(),
            drain: None,
        })
    }

    /// The name of connection `id` in logs and in the `connected` message.
    fn connection_name(&self, id: u64) -> ConnectionName<'_> {
        ConnectionName {
            instance: &self.instance,
            id,
        }
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address `/health` and `/metrics` are served on when `WS_ADMIN_ADDR` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Runs until a graceful shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        lower_loop_priority(self.config.loop_nice);
        let admin = self.admin_addr.map(|a| a.to_string()).unwrap_or_default();
        info!(
            address:% = self.local_addr,
            admin_address = admin.as_str(),
            instance = self.instance.as_str();
            "listening"
        );
        loop {
            // From here on a push wakes the poll below (while messages wait, the
            // poll does not block and pushes cost no wake).
            self.inbox.rearm();
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER_TOKEN => self.accept(Listener::Main, now),
                    ADMIN_LISTENER_TOKEN => self.accept(Listener::Admin, now),
                    // The inbox is drained below whenever messages wait.
                    WAKER_TOKEN => {}
                    SIGNAL_TOKEN => self.on_signal(now),
                    Token(key) => {
                        let readable =
                            event.is_readable() || event.is_read_closed() || event.is_error();
                        self.on_socket(key, readable, event.is_writable(), now);
                    }
                }
            }
            self.read_leftovers(now);
            // Confirmations before the turn's messages (see `subscriptions`).
            if self.channels.is_some() {
                self.release_confirmed(now);
            }
            if self.inbox.has_waiting() {
                self.deliver_inbox(now);
            }
            if self
                .history
                .as_ref()
                .is_some_and(HistoryReader::answers_waiting)
            {
                self.deliver_history(now);
            }
            self.flush_touched(now);
            self.fire_timers(now);
            self.drain_some(now);
            if self.accept_paused_until.is_some_and(|until| now >= until) {
                self.accept_paused_until = None;
                self.accept(Listener::Main, now);
                self.accept(Listener::Admin, now);
            }
            if let Some(channels) = &mut self.channels {
                channels.expire(now);
                // The turn's subscribes and unsubscribes in one batch.
                channels.send();
            }
            if let Some(deadline) = self.limits.shutdown_deadline
                && (self.conns.is_empty() || now >= deadline)
            {
                let open = self.conns.len();
                let unsent = self.drop_all(now);
                info!(dropped = open, unsent_messages = unsent; "shutdown complete");
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        let delivering = self.limits.shutdown_deadline.is_none() || self.drain.is_some();
        if (self.inbox.has_waiting() && delivering)
            || !self.read_again.is_empty()
            || self
                .channels
                .as_ref()
                .is_some_and(UserChannels::confirmations_waiting)
        {
            return Some(Duration::ZERO);
        }
        let next = [
            self.timers.peek().map(|Reverse((at, _, _))| *at),
            self.channels.as_ref().and_then(UserChannels::next_deadline),
            self.accept_paused_until,
            self.limits.shutdown_deadline,
            self.drain.as_ref().and_then(Drain::next_at),
        ]
        .into_iter()
        .flatten()
        .min();
        // Round up so a deadline is never woken for a millisecond early, spinning.
        next.map(|at| at.saturating_duration_since(now) + Duration::from_micros(500))
    }

    fn accept(&mut self, on: Listener, now: Instant) {
        if self.accept_paused_until.is_some() {
            return;
        }
        let endpoints = match on {
            Listener::Main if self.admin_addr.is_some() => Endpoints::WebSocket,
            Listener::Main => Endpoints::All,
            Listener::Admin => Endpoints::Admin,
        };
        loop {
            let listener = match on {
                Listener::Main => &self.listener,
                Listener::Admin => &self.admin_listener,
            };
            let accepted = match listener {
                Some(listener) => listener.accept(),
                None => return,
            };
            match accepted {
                Ok((mut socket, _)) => {
                    // A burst can keep this loop busy for a while: the handshake
                    // deadline counts from this connection's own accept.
                    let now = Instant::now();
                    // Small frames must go out at once.
                    let _ = socket.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if let Err(e) =
                        self.poll
                            .registry()
                            .register(&mut socket, Token(key), Interest::READABLE)
                    {
                        warn!(error:% = e; "cannot register an accepted socket");
                        continue;
                    }
                    let id = self.next_connection_id;
                    self.next_connection_id += 1;
                    entry.insert(Connection::new(
                        socket,
                        id,
                        now,
                        now + self.config.handshake_timeout,
                        endpoints,
                    ));
                    self.settle(key, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // EMFILE/ENFILE (or ENOBUFS/ENOMEM): the pending connection stays in the
                    // backlog; pause instead of spinning on an always-ready listener.
                    if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) {
                        self.metrics.accept_fd_exhausted += 1;
                    }
                    if let Some(suppressed) = self.accept_warnings.check(now) {
                        warn!(
                            error:% = e,
                            pause_ms = ACCEPT_PAUSE.as_millis() as u64,
                            suppressed;
                            "accept failed, pausing accepts"
                        );
                    }
                    self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
            }
        }
    }

    /// Reads the signal numbers the handlers wrote: SIGINT and SIGTERM start a
    /// graceful shutdown (a second one exits at once); the ignored ones are logged.
    fn on_signal(&mut self, now: Instant) {
        let mut buf = [0u8; 16];
        let mut stops = 0;
        loop {
            match self.signals.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    for &signal in &buf[..n] {
                        match i32::from(signal) {
                            libc::SIGINT | libc::SIGTERM => stops += 1,
                            signal => info!(
                                signal = signal_hook::low_level::signal_name(signal)
                                    .unwrap_or("unknown");
                                "signal ignored (SIGINT or SIGTERM stops the gateway)"
                            ),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if stops == 0 {
            return;
        }
        if self.limits.shutdown_deadline.is_some() || stops > 1 {
            warn!("second signal: exiting without waiting for clients");
            crate::logging::flush();
            std::process::exit(1);
        }
        self.begin_shutdown(now);
    }

    /// Graceful shutdown (README, Operations): stop accepting, send 1001 to every
    /// client (at once, or spread over `SHUTDOWN_DRAIN`), stop the Redis reader
    /// once the last one is sent (the clients still waiting in a drain get their
    /// messages meanwhile), and wait for the close replies up to
    /// `SHUTDOWN_TIMEOUT` after that.
    fn begin_shutdown(&mut self, now: Instant) {
        let drain = self.config.shutdown_drain;
        let deadline = now + drain + self.config.shutdown_timeout;
        self.limits.shutdown_deadline = Some(deadline);
        info!(
            connections = self.conns.len(),
            drain_ms = drain.as_millis() as u64,
            timeout_ms = self.config.shutdown_timeout.as_millis() as u64;
            "shutting down"
        );
        for mut listener in [self.listener.take(), self.admin_listener.take()]
            .into_iter()
            .flatten()
        {
            // The listener is dropped (closed) right after; a failed deregister changes nothing.
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<(usize, u64)> = self.conns.iter().map(|(key, c)| (key, c.id())).collect();
        self.drain = Some(Drain {
            started: now,
            window: drain,
            keys,
            closed: 0,
        });
        self.drain_some(now);
    }

    /// Closes the connections of a running drain that are due by `now`.
    fn drain_some(&mut self, now: Instant) {
        let Some(drain) = &mut self.drain else {
            return;
        };
        let due = drain.due(now);
        let from = drain.closed;
        drain.closed = due.max(from);
        let batch = drain.keys[from..drain.closed].to_vec();
        if drain.closed >= drain.keys.len() {
            self.drain = None;
            self.reader.stop();
        }
        for (key, id) in batch {
            if let Some(conn) = self.conns.get_mut(key)
                && conn.id() == id
            {
                let step = conn.shut_down(&self.limits, now);
                self.carry_out(key, step, now);
                self.settle(key, now);
            }
        }
    }

    fn on_socket(&mut self, key: usize, readable: bool, writable: bool, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let step = conn.on_ready(
            readable,
            writable,
            &self.limits,
            now,
            &mut self.metrics.writes,
        );
        self.carry_out(key, step, now);
        self.settle(key, now);
    }

    /// Does what a connection's event left for the loop: evaluate a request head,
    /// answer ping requests, read again next turn, account for an ended session.
    fn carry_out(&mut self, key: usize, step: Step, now: Instant) {
        match step {
            Step::Continue => {}
            Step::EvaluateHead => self.evaluate_head(key, now),
            Step::Read {
                pongs,
                more,
                refreshes,
            } => {
                if pongs > 0
                    && let Some(conn) = self.conns.get_mut(key)
                {
                    let pong = self.encoder.encode_pong(&Timestamp::now());
                    let dropped = conn.queue_pongs(&pong, pongs, self.config.send_buffer, now);
                    // A pong is no delivery: not in the delivery accounting.
                    if dropped > 0 {
                        debug!(
                            "{dropped} pongs dropped, queue full (connection_id={})",
                            conn.id()
                        );
                    }
                }
                if !refreshes.is_empty() {
                    self.answer_refreshes(key, refreshes, now);
                }
                if more {
                    self.read_again.push(key);
                }
            }
            Step::Ended(ended) => self.report_end(key, ended, now),
            Step::HandshakeTimedOut { connection_id } => {
                self.metrics.handshake_timeouts += 1;
                debug!(
                    connection_id:% = self.connection_name(connection_id);
                    "handshake timeout"
                );
            }
        }
    }

    /// Checks a session's refresh requests with the upgrade's rules and queues the
    /// answers (README, "Refreshing the token"). Never logs a token.
    fn answer_refreshes(&mut self, key: usize, requests: refresh::Requests, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let rules = refresh::Rules {
            authenticator: &self.authenticator,
            leeway: self.config.jwt.leeway,
            notice: self.config.token_expiry_notice,
        };
        let connection_id = ConnectionName {
            instance: &self.instance,
            id: conn.id(),
        };
        let metrics = &mut self.metrics;
        conn.answer_refreshes(
            requests,
            &rules,
            self.config.send_buffer,
            now,
            |outcome, dropped| {
                metrics.refreshes[outcome.index()] += 1;
                if dropped {
                    metrics.dropped_buffer_full += 1;
                }
                match outcome {
                    Outcome::Invalid(error) => {
                        debug!(connection_id:% = connection_id, error:% = error; "refresh refused")
                    }
                    outcome => debug!(
                        connection_id:% = connection_id,
                        outcome = Outcome::LABELS[outcome.index()];
                        "refresh answered"
                    ),
                }
            },
        );
    }

    /// The request head grew: the handshake decision (a pure function of the head,
    /// the rules and the counts) and what the loop does with it.
    fn evaluate_head(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let rules = HandshakeRules {
            authenticator: &self.authenticator,
            allowed_origins: &self.config.allowed_origins,
            cookie_name: self.config.jwt.cookie_name.as_deref(),
            max_connections: self.max_connections,
            max_connections_per_user: self.config.max_connections_per_user,
            endpoints: conn.endpoints(),
        };
        let respond_deadline = now + RESPOND_WAIT;
        match handshake::evaluate(conn.head(), &rules, &self.hub) {
            Decision::NeedMore => {}
            Decision::Reject(rejection) => {
                self.metrics.rejected[rejection as usize] += 1;
                if rejection == Rejection::ConnectionLimit
                    && let Some(suppressed) = self.limit_warnings.check(now)
                {
                    warn!(
                        max_connections = self.max_connections,
                        suppressed;
                        "connection limit reached: new clients get 503"
                    );
                }
                if let Some(suppressed) = self.refusal_lines[rejection as usize].check(now) {
                    let remote = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                    info!(
                        status = rejection.status(),
                        reason = rejection.label(),
                        connection_id:% = ConnectionName { instance: &self.instance, id: conn.id() },
                        remote = remote.as_str(),
                        suppressed;
                        "request refused"
                    );
                }
                conn.respond(&rejection.response(), now, respond_deadline);
            }
            Decision::Health { head_only } => {
                // O(1): counts the loop keeps, no /proc listing.
                let (status, body) = metrics::render_health(
                    &gauges(&self.hub, self.started, None),
                    &self.redis,
                    &Timestamp::now(),
                );
                let mut answer = http::response(status, "application/json", "", body.as_bytes());
                if head_only {
                    // HEAD: the same head (Content-Length included), no body.
                    answer.truncate(answer.len() - body.len());
                }
                conn.respond(&answer, now, respond_deadline);
            }
            Decision::Metrics { json } => {
                let process = self.process_sampler.figures(now);
                let gauges = gauges(&self.hub, self.started, Some(process));
                let answer = if json {
                    let body = self
                        .metrics
                        .render_json(&gauges, &self.redis, &Timestamp::now());
                    http::response(200, "application/json", "", body.as_bytes())
                } else {
                    let mut body = self.metrics.render_prometheus(&gauges, &self.redis);
                    metrics::render_redis_ping_and_handover(
                        &mut body,
                        &self.redis,
                        self.inbox.queued(),
                    );
                    http::response(
                        200,
                        "text/plain; version=0.0.4; charset=utf-8",
                        "",
                        body.as_bytes(),
                    )
                };
                conn.respond(&answer, now, respond_deadline);
            }
            Decision::Upgrade(upgrade) => {
                self.metrics.connections_accepted += 1;
                let user_id = self.hub.add(&upgrade.user_id, key);
                let name = ConnectionName {
                    instance: &self.instance,
                    id: conn.id(),
                }
                .to_string();
                // Per-user modes: `connected` waits for the user's channel.
                let admission = match &mut self.channels {
                    None => Admission::Open,
                    Some(channels) => {
                        let waiter = Waiter {
                            key,
                            connection_id: conn.id(),
                            since: upgrade.since,
                        };
                        let may_subscribe = self.limits.shutdown_deadline.is_none();
                        channels.admit(&user_id, waiter, may_subscribe)
                    }
                };
                let connected = if admission != Admission::Open || self.history.is_some() {
                    // Sent once the subscription is confirmed (`release_confirmed`)
                    // and the history read is done (`finish_history`).
                    None
                } else {
                    Some(connected_without_history(
                        &mut self.encoder,
                        &mut self.metrics,
                        &upgrade.user_id,
                        &name,
                        upgrade.since.is_some(),
                    ))
                };
                let expires_at =
                    refresh::expiry_instant(upgrade.expires_at, self.config.jwt.leeway, now);
                let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                info!(
                    user_id = upgrade.user_id.as_str(),
                    connection_id = name.as_str(),
                    remote = peer.as_str();
                    "client connected"
                );
                let answer = http::switching_protocols(&upgrade.accept_key);
                let session = SessionParams {
                    user_id,
                    expires_at,
                    token_exp: upgrade.expires_at,
                    expiry_notice: self.config.token_expiry_notice,
                    now,
                    ping_interval: self.config.ping_interval,
                    ws_config: self.ws_config,
                    send_buffer_bytes: self.config.send_buffer_bytes,
                };
                let awaits_history = connected.is_none() && admission == Admission::Open;
                match (connected, admission) {
                    (Some(connected), _) => {
                        conn.open(&answer, connected, upgrade.head_len, session)
                    }
                    (None, Admission::Open) => {
                        conn.open_awaiting_history(&answer, upgrade.head_len, session)
                    }
                    (None, Admission::Wait | Admission::Refuse) => conn.open_awaiting_subscription(
                        &answer,
                        upgrade.head_len,
                        session,
                        now + SUBSCRIBE_WAIT,
                    ),
                }
                let step = if admission == Admission::Refuse {
                    // Shutting down: no new subscription; closed like the others (1001).
                    conn.shut_down(&self.limits, now)
                } else {
                    // Frames that came with the request head are already buffered: read them now.
                    conn.read(&self.limits, now)
                };
                if awaits_history {
                    self.request_history(key, upgrade.user_id, upgrade.since, now);
                }
                self.carry_out(key, step, now);
            }
        }
    }

    /// Connections that had more to read than one turn's budget.
    fn read_leftovers(&mut self, now: Instant) {
        if self.read_again.is_empty() {
            return;
        }
        let mut keys = std::mem::take(&mut self.read_again);
        for key in keys.drain(..) {
            if let Some(conn) = self.conns.get_mut(key) {
                let step = conn.read(&self.limits, now);
                self.carry_out(key, step, now);
            }
            self.settle(key, now);
        }
        if self.read_again.is_empty() {
            self.read_again = keys;
        }
    }

    /// Delivers one batch of Redis messages: each is validated and encoded once,
    /// then queued on every connection of its user.
    fn deliver_inbox(&mut self, now: Instant) {
        if self.inbox.drain_into(&mut self.inbound, INBOX_BATCH) == 0 {
            return;
        }
        let received_at = Timestamp::now();
        let mut inbound = std::mem::take(&mut self.inbound);
        for published in inbound.drain(..) {
            let Some(keys) = self.hub.connections_of(published.user_id()) else {
                // Not encoded, but still validated: a publisher's mistake is counted as
                // invalid whichever instance sees it.
                match message::validate_published(published.payload()) {
                    Ok(()) => {
                        self.metrics.dropped_offline += 1;
                        debug!(
                            "no connection for user_id={}: message dropped",
                            published.user_id()
                        );
                    }
                    Err(invalid) => self.invalid_message(&published, invalid, now),
                }
                continue;
            };
            let (frame, id) = match self
                .encoder
                .encode_published_with_id(published.payload(), &received_at)
            {
                Ok(encoded) => encoded,
                Err(invalid) => {
                    self.invalid_message(&published, invalid, now);
                    continue;
                }
            };
            debug!(
                "routing message for user_id={} to {} connections",
                published.user_id(),
                keys.len()
            );
            for &key in keys {
                let Some(conn) = self.conns.get_mut(key) else {
                    continue;
                };
                match conn.queue_published(
                    frame.clone(),
                    id,
                    published.read_at(),
                    self.config.send_buffer,
                    now,
                ) {
                    Queued::First => {
                        self.metrics.queued += 1;
                        self.to_flush.push(key);
                    }
                    Queued::Again => self.metrics.queued += 1,
                    Queued::Dropped => self.metrics.dropped_buffer_full += 1,
                    // The client got it in its resume's replay: delivered.
                    Queued::Duplicate => {
                        self.metrics.queued += 1;
                        self.metrics.delivered_by_replay(published.read_at());
                    }
                }
            }
        }
        // Keep the buffer's capacity for the next batch.
        self.inbound = inbound;
    }

    /// Per-user modes: the connections whose user's channel Redis confirmed
    /// stop waiting. With history on their history read starts now (after the
    /// subscription, so nothing published falls between the two); without,
    /// they get `connected` and the messages held meanwhile.
    fn release_confirmed(&mut self, now: Instant) {
        let Some(channels) = &mut self.channels else {
            return;
        };
        let mut released = std::mem::take(&mut self.released);
        channels.take_confirmed(&mut released);
        for (user_id, waiter) in released.drain(..) {
            let Some(conn) = self.conns.get_mut(waiter.key) else {
                continue;
            };
            // A reused slot, or a session that closed meanwhile: nothing to release.
            if conn.id() != waiter.connection_id || !conn.subscription_confirmed() {
                continue;
            }
            if self.history.is_some() {
                self.request_history(waiter.key, user_id.to_string(), waiter.since, now);
                continue;
            }
            let name = ConnectionName {
                instance: &self.instance,
                id: waiter.connection_id,
            }
            .to_string();
            let connected = connected_without_history(
                &mut self.encoder,
                &mut self.metrics,
                &user_id,
                &name,
                waiter.since.is_some(),
            );
            if conn
                // No replay and no `seen`: nothing is skipped.
                .finish_history(connected, Vec::new(), None, now, |_| {})
                .is_some()
            {
                self.settle(waiter.key, now);
            }
        }
        self.released = released;
    }

    /// Asks the history reader for a connection's history (its position, and the
    /// messages after `since`); a reader that is gone answers at once.
    fn request_history(
        &mut self,
        key: usize,
        user_id: String,
        since: Option<StreamId>,
        now: Instant,
    ) {
        let Some(history) = &self.history else {
            return;
        };
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let request = Request {
            key,
            connection_id: conn.id(),
            user_id,
            since,
        };
        if let Err(request) = history.request(request) {
            warn!("history reader is gone: resuming clients get complete:false");
            self.finish_history(request.unavailable(), now);
        }
    }

    /// Sends every connection whose history read is done its `connected`, its
    /// replay, then the live messages held meanwhile.
    fn deliver_history(&mut self, now: Instant) {
        let Some(history) = &self.history else {
            return;
        };
        let mut answers = std::mem::take(&mut self.history_answers);
        history.drain_answers(&mut answers);
        for answer in answers.drain(..) {
            self.finish_history(answer, now);
        }
        self.history_answers = answers;
    }

    fn finish_history(&mut self, answer: Answer, now: Instant) {
        let Some(conn) = self.conns.get_mut(answer.key) else {
            return;
        };
        if conn.id() != answer.connection_id {
            return; // the connection closed; its slot was reused
        }
        let (position, replay, complete) = match answer.outcome {
            // Held messages up to `since` are ones the client already has.
            HistoryOutcome::Unavailable => (None, Vec::new(), false),
            HistoryOutcome::Read(read) => {
                self.metrics.dropped_invalid += read.invalid as u64;
                (Some(read.position), read.replay, read.complete)
            }
        };
        // Live messages dropped while held (a client publishing faster than the
        // read) are gone for this connection: not complete.
        let complete = complete && conn.held_dropped() == 0;
        let recovery = answer.since.map(|_| Recovery {
            complete,
            count: replay.len(),
        });
        if let Some(recovery) = recovery {
            self.metrics.resumes += 1;
            self.metrics.resume_replayed += recovery.count as u64;
            self.metrics.resumes_incomplete += u64::from(!recovery.complete);
        }
        let history = ConnectedHistory { position, recovery };
        let name = ConnectionName {
            instance: &self.instance,
            id: answer.connection_id,
        }
        .to_string();
        let connected = self.encoder.encode_connected_with_history(
            &answer.user_id,
            &name,
            &history,
            &Timestamp::now(),
        );
        // Everything up to the read's position was in the read (or is older than
        // the client's position); without a read, what precedes `since`.
        let seen = position.or(answer.since);
        // Held live messages the replay already carried: delivered (they were
        // counted as queued when held).
        let metrics = &mut self.metrics;
        if let Some(skipped) = conn.finish_history(connected, replay, seen, now, |read_at| {
            metrics.delivered_by_replay(read_at)
        }) {
            debug!(
                "history sent user_id={} connection_id={} recovery={recovery:?} duplicates_skipped={skipped}",
                answer.user_id, answer.connection_id
            );
            self.settle(answer.key, now);
        }
    }

    /// Counts and (rate-limited) logs a published message that is not valid.
    fn invalid_message(&mut self, published: &Published, invalid: InvalidMessage, now: Instant) {
        self.metrics.dropped_invalid += 1;
        if let Some(suppressed) = self.invalid_warnings.check(now) {
            let channel = format!(
                "{}{}",
                self.config.redis.channel_prefix,
                published.user_id()
            );
            warn!(
                channel = channel.as_str(),
                reason = invalid.as_str(),
                suppressed;
                "invalid message dropped"
            );
        }
    }

    /// Flushes every connection that got output this turn, once.
    fn flush_touched(&mut self, now: Instant) {
        let mut keys = std::mem::take(&mut self.to_flush);
        for key in keys.drain(..) {
            self.settle(key, now);
        }
        self.to_flush = keys;
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, key, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.id() != id || !conn.timer_fired(at) {
                continue; // superseded by an earlier entry, or the slot was reused
            }
            let step = conn.on_deadline(&self.limits, now);
            self.carry_out(key, step, now);
            self.settle(key, now);
        }
    }

    /// A session ended: the hub, the user's channel, the metrics and the log line.
    fn report_end(&mut self, key: usize, ended: Ended, now: Instant) {
        let last = self.hub.remove(&ended.user_id, key);
        if let Some(channels) = &mut self.channels {
            channels.left(&ended.user_id, key, ended.connection_id, last, now);
        }
        self.metrics.disconnects[ended.reason as usize] += 1;
        let level = if ended.reason == CloseReason::Shutdown {
            log::Level::Debug
        } else {
            log::Level::Info
        };
        log::log!(
            level,
            user_id = ended.user_id.as_ref(),
            connection_id:% = self.connection_name(ended.connection_id),
            reason = ended.reason.label(),
            duration_ms = ended.lived.as_millis() as u64;
            "client disconnected"
        );
    }

    /// After any activity: the connection writes what is queued and says what to
    /// keep (interest, deadline) or that it is finished; the loop carries it out.
    fn settle(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let next = conn.settle(&self.limits, now, &mut self.metrics.writes);
        self.metrics.count_deliveries(conn.take_deliveries());
        match next {
            Next::Keep { reregister, arm } => {
                if let Some(interest) = reregister
                    && self
                        .poll
                        .registry()
                        .reregister(conn.socket_mut(), Token(key), interest)
                        .is_err()
                {
                    self.remove(key, now);
                    return;
                }
                if let Some(at) = arm {
                    self.timers.push(Reverse((at, key, conn.id())));
                }
            }
            Next::Remove(ended) => {
                if let Some(ended) = ended {
                    self.report_end(key, ended, now);
                }
                self.remove(key, now);
            }
        }
    }

    /// Drops every connection left at the end of a shutdown; returns the
    /// deliveries that were still queued on them (counted unsent).
    fn drop_all(&mut self, now: Instant) -> u64 {
        let before = self.metrics.dropped_unsent_on_close;
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.remove(key, now);
        }
        self.metrics.dropped_unsent_on_close - before
    }

    /// Drops a connection: deregisters and closes its socket (a session still open
    /// is accounted as lost, deliveries still queued as unsent).
    fn remove(&mut self, key: usize, now: Instant) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        if let Some(ended) = conn.abort(now) {
            self.report_end(key, ended, now);
        }
        self.metrics.count_deliveries(conn.take_deliveries());
        // The socket is closed right after; a failed deregister leaves nothing behind.
        let _ = self.poll.registry().deregister(conn.socket_mut());
    }
}

/// The `connected` message without history; a client that asks to resume
/// (`since`) gets `recovery` with `complete:false`, since nothing can be proven
/// about the gap (counted as an incomplete resume).
fn connected_without_history(
    encoder: &mut MessageEncoder,
    metrics: &mut Metrics,
    user_id: &str,
    connection_name: &str,
    resumes: bool,
) -> Frame {
    if !resumes {
        return encoder.encode_connected(user_id, connection_name, &Timestamp::now());
    }
    metrics.resumes += 1;
    metrics.resumes_incomplete += 1;
    let history = ConnectedHistory {
        position: None,
        recovery: Some(Recovery {
            complete: false,
            count: 0,
        }),
    };
    encoder.encode_connected_with_history(user_id, connection_name, &history, &Timestamp::now())
}

fn gauges(hub: &Hub, started: Instant, process: Option<ProcessFigures>) -> Gauges {
    Gauges {
        connections: hub.connection_count(),
        users: hub.user_count(),
        uptime_seconds: started.elapsed().as_secs(),
        process,
    }
}

/// Signals that stop the gateway gracefully.
const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];
/// Signals whose default action would kill the process without a close frame
/// (`systemctl reload`, `docker kill -s HUP`): logged and otherwise ignored.
const IGNORED_SIGNALS: [libc::c_int; 3] = [libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2];

/// Installs handlers that write the signal's number into a socket pair (the
/// self-pipe pattern) and returns the read end for the loop's poll.
fn install_signal_pipe() -> io::Result<UnixStream> {
    let (read_end, write_end) = std::os::unix::net::UnixStream::pair()?;
    read_end.set_nonblocking(true)?;
    write_end.set_nonblocking(true)?;
    let write_end = Arc::new(std::os::fd::OwnedFd::from(write_end));
    for signal in STOP_SIGNALS.into_iter().chain(IGNORED_SIGNALS) {
        let write_end = Arc::clone(&write_end);
        let action = move || {
            let byte = signal as u8;
            // SAFETY: send(2) is async-signal-safe and the descriptor lives as long as
            // the handler (the closure owns it). A full pipe (EAGAIN) loses only a
            // repeat: the loop is already woken by what is unread.
            unsafe {
                libc::send(
                    write_end.as_raw_fd(),
                    (&byte as *const u8).cast(),
                    1,
                    libc::MSG_DONTWAIT,
                );
            }
        };
        // SAFETY: the action only calls send(2), which is async-signal-safe.
        unsafe { signal_hook::low_level::register(signal, action) }?;
    }
    Ok(UnixStream::from_std(read_end))
}

/// Asks for the largest accept queue the kernel allows (it caps the value at
/// `net.core.somaxconn`, 4096 by default), as Go's net package does. mio listens with
/// 128: a reconnect storm after a deploy overflows that, and each dropped SYN costs
/// its client a one-second retransmit.
fn widen_listen_backlog(listener: &TcpListener) -> io::Result<()> {
    // SAFETY: listen(2) on a socket we own; calling it again only resizes the queue.
    if unsafe { libc::listen(listener.as_raw_fd(), libc::c_int::MAX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lowers the calling thread (the event loop; the Redis reader, started earlier,
/// keeps the process's priority) by `steps` nice steps, at most to 19. When CPU
/// is short the reader then wins it: it must keep pace with Redis, which cuts
/// off a subscriber whose output buffer passes its limit and loses whatever was
/// in it, while the loop's backlog waits in the bounded hand-over queue, where
/// overflow is counted. Nice weighs a thread only against the others of its
/// scheduling group (cgroup or session autogroup), and only when they compete.
fn lower_loop_priority(steps: i32) {
    if steps == 0 {
        return;
    }
    // SAFETY: gettid, getpriority and setpriority take and return plain integers.
    let (process_nice, lowered) = unsafe {
        let tid = libc::gettid() as libc::id_t;
        let process_nice = libc::getpriority(libc::PRIO_PROCESS, tid);
        let target = (process_nice + steps).min(19);
        let lowered = libc::setpriority(libc::PRIO_PROCESS, tid, target) == 0;
        (process_nice, lowered.then_some(target))
    };
    match lowered {
        Some(target) => info!(
            loop_nice = target,
            reader_nice = process_nice;
            "event loop priority lowered (WS_LOOP_NICE)"
        ),
        None => warn!(
            error:% = io::Error::last_os_error();
            "cannot lower the event loop's priority"
        ),
    }
}

/// Descriptors the process needs besides client sockets: stdin/stdout/stderr,
/// epoll, the waker, the listener, the signal socket pair, the Redis connection
/// (two while it reconnects), /proc reads for `/metrics`, with a margin.
const RESERVED_FDS: u64 = 16;
/// Most descriptors kept for sockets still in their handshake (or being refused)
/// once the authenticated connections reach the limit: enough for a burst of
/// refusals to be answered, small enough that 19,500 connections fit in 20,000.
const MAX_HANDSHAKE_FDS: u64 = 256;

/// Raises the soft open-file limit to the hard limit and warns when
/// `max_connections` cannot fit in it (see [`connection_limit_for`]). Returns the
/// soft limit in effect.
pub fn raise_open_file_limit(max_connections: usize) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    let soft: u64 = limit.rlim_cur;
    let effective = connection_limit_for(soft, max_connections);
    if effective < max_connections {
        warn!(
            open_file_limit = soft,
            max_connections,
            effective_max_connections = effective;
            "the open-file limit cannot hold WS_MAX_CONNECTIONS: the rest get 503; \
             raise the limit (ulimit -n, LimitNOFILE) to use the configured value"
        );
    }
    soft
}

/// The connection limit that fits in `soft_limit` descriptors: what the process
/// needs for itself and a share for sockets in their handshake are set aside, so
/// a client past the limit can still be accepted and answered 503 instead of
/// waiting in the kernel's backlog for a descriptor that never frees.
pub fn connection_limit_for(soft_limit: u64, max_connections: usize) -> usize {
    if soft_limit == libc::RLIM_INFINITY {
        return max_connections;
    }
    let available = soft_limit.saturating_sub(RESERVED_FDS);
    let handshakes = (available / 16).clamp(4, MAX_HANDSHAKE_FDS);
    let fits = usize::try_from(available.saturating_sub(handshakes)).unwrap_or(usize::MAX);
    max_connections.min(fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_spreads_the_closes_over_its_window() {
        let started = Instant::now();
        let mut drain = Drain {
            started,
            window: Duration::from_secs(2),
            keys: (0..1000).map(|k| (k, k as u64)).collect(),
            closed: 0,
        };
        let at = |ms: u64| started + Duration::from_millis(ms);
        assert_eq!(drain.due(at(0)), 1, "the first goes at once");
        assert_eq!(drain.due(at(1000)), 501);
        assert_eq!(drain.due(at(1998)), 1000);
        assert_eq!(drain.due(at(5000)), 1000);
        drain.closed = 500;
        assert_eq!(drain.next_at(), Some(at(1000)));
        drain.closed = 1000;
        assert_eq!(drain.next_at(), None);

        let at_once = Drain {
            started,
            window: Duration::ZERO,
            keys: vec![(1, 1), (2, 2)],
            closed: 0,
        };
        assert_eq!(at_once.due(started), 2);
    }

    #[test]
    fn connection_names_carry_the_instance_prefix() {
        let prefix = draw_instance_prefix();
        assert_eq!(prefix.len(), 6);
        assert!(prefix.bytes().all(|b| b.is_ascii_hexdigit()), "{prefix}");
        let name = ConnectionName {
            instance: &prefix,
            id: 17,
        };
        assert_eq!(name.to_string(), format!("{prefix}-17"));
    }

    #[test]
    fn the_connection_limit_fits_the_open_file_limit() {
        // Plenty of descriptors: the configured limit stands.
        assert_eq!(connection_limit_for(65_536, 10_000), 10_000);
        assert_eq!(connection_limit_for(libc::RLIM_INFINITY, 10_000), 10_000);
        // 20,000 descriptors hold 19,500 connections (the documented budget).
        assert!(connection_limit_for(20_000, 100_000) >= 19_500);
        // A tiny limit keeps room for the process and a few handshakes.
        assert_eq!(connection_limit_for(40, 10_000), 40 - 16 - 4);
        assert_eq!(connection_limit_for(10, 10_000), 0);
    }
}
