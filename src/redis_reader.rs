//! The Redis reader thread (DESIGN.md sections 1 and 3, "Redis → server").
//!
//! ```text
//!  Redis --PSUBSCRIBE <prefix>*--> [redis-reader thread]
//!      strip prefix, copy (user id, payload) into one `Published`
//!      --> unbounded mpsc + `queued` counter (bound: QUEUE_CAPACITY, past it drop + count)
//!      --> mio::Waker, only when `wake_pending` was clear: the loop is asleep
//!  [event loop] Inbox::drain_into (bounded batch); Inbox::rearm before it
//!      blocks clears `wake_pending`, so pushes while it is busy cost no wake
//! ```
//!
//! The thread owns one blocking redis-rs connection. It never parses JSON and
//! never waits on the event loop: it reads a message, hands it over and reads
//! on, so Redis never sees a slow subscriber (Redis disconnects a pub/sub
//! client whose output buffer passes its limit, losing messages). It pings
//! Redis every `ping_interval` (idle or not) and treats a missing pong as a
//! lost connection; on any error it reconnects forever with exponential
//! backoff and full jitter. Health crosses to the loop thread through
//! [`RedisStatus`] (atomics, plus a mutex only for the rare error text).

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};
use redis::{
    Client, Connection, ConnectionAddr, IntoConnectionInfo, PubSub, RedisConnectionInfo,
    TlsCertificates, Value,
};

use crate::clock;
use crate::config::RedisConfig;
use crate::logging::RateLimited;
use crate::message::user_id_from_channel;

/// Hand-over bound; past it messages are dropped and counted. Large enough to
/// absorb a publisher burst of a few seconds while the loop catches up (about
/// 64 MiB at 128 bytes a message, used only while a backlog exists): a smaller
/// bound drops messages, and not reading at all would let Redis' own pub/sub
/// output limit (32 MiB by default) disconnect us, which loses more.
pub const QUEUE_CAPACITY: usize = 524_288;

/// First reconnect delay cap; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest reconnect delay cap.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that stayed subscribed this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// ... or this many ping intervals when that is shorter: a session whose pings
/// Redis kept answering that long was healthy (with the default 5 s interval
/// both are 30 s).
const HEALTHY_PINGS: u32 = 6;
/// Longest the thread blocks (read or sleep) before looking at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(250);
/// Bounds for connect and pong waits derived from `ping_interval`.
const MIN_IO_WAIT: Duration = Duration::from_secs(1);
const MAX_IO_WAIT: Duration = Duration::from_secs(30);
/// How long leaving a connection may wait for the server's unsubscribe replies.
const TEARDOWN_WAIT: Duration = Duration::from_millis(100);
/// At most one warning of each kind per period.
const WARN_PERIOD: Duration = Duration::from_secs(10);

/// One published message as handed to the event loop: the channel with the
/// prefix already removed (the user id bytes, valid UTF-8, never empty) and
/// the raw payload, in one allocation.
pub struct Published {
    /// The user id followed by the payload.
    bytes: Box<[u8]>,
    user_id_len: usize,
}

impl Published {
    /// Copies `user_id` and `payload` into one allocation.
    pub fn new(user_id: &[u8], payload: &[u8]) -> Published {
        let mut bytes = Vec::with_capacity(user_id.len() + payload.len());
        bytes.extend_from_slice(user_id);
        bytes.extend_from_slice(payload);
        Published {
            bytes: bytes.into_boxed_slice(),
            user_id_len: user_id.len(),
        }
    }

    /// The user id: the channel name without the prefix.
    pub fn user_id(&self) -> &[u8] {
        &self.bytes[..self.user_id_len]
    }

    /// The message exactly as published.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.user_id_len..]
    }
}

impl fmt::Debug for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Published")
            .field("user_id", &String::from_utf8_lossy(self.user_id()))
            .field("payload_len", &self.payload().len())
            .finish()
    }
}

/// `u64::MAX` stands for "none" in the optional atomics below.
const NONE: u64 = u64::MAX;

/// Health of the Redis side, written by the reader, read by /health and
/// /metrics on the loop thread (atomics + a Mutex only for the rare error text).
#[derive(Debug)]
pub struct RedisStatus {
    subscribed: AtomicBool,
    /// Last ping round trip in microseconds; `NONE` while not connected.
    ping_micros: AtomicU64,
    pings: AtomicU64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    received: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_invalid_channel: AtomicU64,
    /// `NONE` until the first message.
    last_message_unix_millis: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Default for RedisStatus {
    fn default() -> Self {
        RedisStatus::new()
    }
}

impl RedisStatus {
    /// Not subscribed, nothing received, no error.
    pub fn new() -> RedisStatus {
        RedisStatus {
            subscribed: AtomicBool::new(false),
            ping_micros: AtomicU64::new(NONE),
            pings: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            dropped_invalid_channel: AtomicU64::new(0),
            last_message_unix_millis: AtomicU64::new(NONE),
            last_error: Mutex::new(None),
        }
    }

    /// Connected and `PSUBSCRIBE` confirmed by Redis.
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// Last ping round trip; None while not connected.
    pub fn ping_micros(&self) -> Option<u64> {
        some_unless_none(self.ping_micros.load(Ordering::Relaxed))
    }

    /// Pings answered since start.
    pub fn pings(&self) -> u64 {
        self.pings.load(Ordering::Relaxed)
    }

    /// The last connection error (kept after a reconnect, for diagnosis);
    /// never contains the password.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Successful re-subscriptions after the first.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Connection attempts that failed before being subscribed.
    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Ordering::Relaxed)
    }

    /// Messages read from Redis (including the ones dropped afterwards).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Messages dropped because the hand-over queue was full.
    pub fn dropped_queue_full(&self) -> u64 {
        self.dropped_queue_full.load(Ordering::Relaxed)
    }

    /// Messages dropped because their channel had no user id after the prefix
    /// (empty, or not UTF-8).
    pub fn dropped_invalid_channel(&self) -> u64 {
        self.dropped_invalid_channel.load(Ordering::Relaxed)
    }

    /// When the last message was read from Redis.
    pub fn last_message_unix_millis(&self) -> Option<u64> {
        some_unless_none(self.last_message_unix_millis.load(Ordering::Relaxed))
    }

    fn set_subscribed(&self, subscribed: bool) {
        self.subscribed.store(subscribed, Ordering::Release);
        if !subscribed {
            self.ping_micros.store(NONE, Ordering::Relaxed);
        }
    }

    fn set_ping(&self, round_trip: Duration) {
        let micros = u64::try_from(round_trip.as_micros()).unwrap_or(NONE - 1);
        self.ping_micros
            .store(micros.min(NONE - 1), Ordering::Relaxed);
        self.pings.fetch_add(1, Ordering::Relaxed);
    }

    fn set_error(&self, error: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(error);
    }
}

fn some_unless_none(value: u64) -> Option<u64> {
    (value != NONE).then_some(value)
}

/// State shared by both ends of the hand-over.
struct Shared {
    /// Messages sent and not yet drained; the queue's bound is enforced on it.
    queued: AtomicUsize,
    capacity: usize,
    /// Set by the reader when it wakes the loop, cleared by the loop just
    /// before it blocks in poll: while set, the loop is awake (or about to be)
    /// and will look at the queue, so pushes do not wake it again. Each wake
    /// is an eventfd write plus, on two cores, usually a context switch: a
    /// third of the reader's time under a flood when it was per message.
    wake_pending: AtomicBool,
    waker: Arc<mio::Waker>,
    /// `waker.wake()` calls, for tests and diagnosis.
    wakes: AtomicU64,
}

impl Shared {
    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            self.wakes.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.waker.wake() {
                // Practically impossible (eventfd write); the next push or the
                // loop's own drain will try again.
                warn!("cannot wake the event loop: {e}");
                self.wake_pending.store(false, Ordering::Release);
            }
        }
    }
}

/// The loop's end of the hand-over.
pub struct Inbox {
    rx: Receiver<Published>,
    shared: Arc<Shared>,
}

impl Inbox {
    /// Moves up to `max` messages into `out` (a reused Vec; appended to).
    /// Leaves the wake flag set: the loop calls [`Inbox::rearm`] before it
    /// blocks, which also tells it about anything left.
    pub fn drain_into(&self, out: &mut Vec<Published>, max: usize) -> usize {
        let mut moved = 0;
        while moved < max {
            match self.rx.try_recv() {
                Ok(published) => {
                    out.push(published);
                    moved += 1;
                }
                Err(_) => break,
            }
        }
        if moved > 0 {
            self.shared.queued.fetch_sub(moved, Ordering::AcqRel);
        }
        moved
    }

    /// Called by the loop just before it blocks: clears the wake flag so the
    /// next push wakes it. Returns true (and sets the flag again) when
    /// messages are already waiting; the loop should then drain instead of
    /// blocking.
    pub fn rearm(&self) -> bool {
        // A push whose swap saw the flag still set is ordered before this
        // swap, so its `queued` increment is visible to the load below
        // (AcqRel on the same atomic); a later push sees it clear and wakes.
        self.shared.wake_pending.swap(false, Ordering::AcqRel);
        if self.shared.queued.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.shared.wake_pending.store(true, Ordering::Release);
        true
    }

    /// Messages waiting in the hand-over.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }
}

/// The reader's end of the hand-over.
struct Handoff {
    tx: Sender<Published>,
    shared: Arc<Shared>,
}

#[derive(Debug, PartialEq, Eq)]
enum PushOutcome {
    Queued,
    Full,
    /// The Inbox is gone: the event loop has exited.
    Closed,
}

impl Handoff {
    fn push(&self, published: Published) -> PushOutcome {
        // Counted before the send so the loop's decrement never runs ahead of it.
        if self.shared.queued.fetch_add(1, Ordering::AcqRel) >= self.shared.capacity {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return PushOutcome::Full;
        }
        if self.tx.send(published).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return PushOutcome::Closed;
        }
        self.shared.wake();
        PushOutcome::Queued
    }
}

/// An unbounded std channel whose length is bounded by the `queued` counter.
/// (Deliberately not `sync_channel(QUEUE_CAPACITY)`: std's bounded channel
/// allocates and touches every slot up front, about 2 MiB of resident memory
/// at start for 65,536 slots, against a 5 MiB start budget; the list channel
/// grows in small blocks only while there is a backlog and frees them as the
/// loop drains.)
fn handoff(waker: Arc<mio::Waker>, capacity: usize) -> (Handoff, Inbox) {
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        capacity,
        wake_pending: AtomicBool::new(false),
        waker,
        wakes: AtomicU64::new(0),
    });
    (
        Handoff {
            tx,
            shared: Arc::clone(&shared),
        },
        Inbox { rx, shared },
    )
}

/// The handle to the reader thread.
pub struct RedisReader {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl RedisReader {
    /// Starts the reader thread (named "redis-reader"). `waker` is the event
    /// loop's mio::Waker. Fails if the thread cannot be started or the TLS
    /// settings are unusable (unreadable or invalid `REDIS_TLS_CA_FILE`);
    /// Redis being unreachable is not an error here, the thread keeps retrying.
    pub fn spawn(
        config: RedisConfig,
        waker: Arc<mio::Waker>,
    ) -> io::Result<(RedisReader, Inbox, Arc<RedisStatus>)> {
        let client = build_client(&config)?;
        let (handoff, inbox) = handoff(waker, QUEUE_CAPACITY);
        let status = Arc::new(RedisStatus::new());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = ReaderThread::new(
            config,
            client,
            handoff,
            Arc::clone(&status),
            Arc::clone(&stop),
        );
        let thread = std::thread::Builder::new()
            .name("redis-reader".into())
            .spawn(move || thread.run())?;
        Ok((RedisReader { stop, thread }, inbox, status))
    }

    /// Asks the thread to stop (it notices within `STOP_CHECK`, 250 ms, or a
    /// connect/pong wait in progress); does not join.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Waits for the thread to end (after [`RedisReader::stop`], or once the
    /// Inbox is dropped). Dropping a `RedisReader` without stopping it
    /// detaches the thread.
    pub fn join(self) -> std::thread::Result<()> {
        self.thread.join()
    }
}

/// Builds the redis-rs client from the resolved configuration. The password
/// goes into redis-rs's `RedisConnectionInfo` (whose Debug redacts it), never
/// into a URL string.
pub(crate) fn build_client(config: &RedisConfig) -> io::Result<Client> {
    let invalid = |what: &str, e: redis::RedisError| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: {e}"))
    };
    let mut settings = RedisConnectionInfo::default().set_db(config.db);
    if let Some(username) = config.username.as_deref().filter(|u| !u.is_empty()) {
        settings = settings.set_username(username);
    }
    if let Some(password) = config.password.as_deref().filter(|p| !p.is_empty()) {
        settings = settings.set_password(password);
    }
    let addr = if config.use_tls {
        // rustls needs a process-wide crypto provider when more than one could
        // be compiled in; installing fails only if one is already installed,
        // which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        ConnectionAddr::TcpTls {
            host: config.host.clone(),
            port: config.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(config.host.clone(), config.port)
    };
    let info = addr
        .into_connection_info()
        .map_err(|e| invalid("Redis address", e))?
        .set_redis_settings(settings);
    match (&config.tls_ca_file, config.use_tls) {
        (Some(ca_file), true) => {
            let pem = std::fs::read(ca_file).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("REDIS_TLS_CA_FILE {}: {e}", ca_file.display()),
                )
            })?;
            let certificates = TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            Client::build_with_tls(info, certificates).map_err(|e| invalid("REDIS_TLS_CA_FILE", e))
        }
        // Without a CA file, redis-rs verifies against the system's roots
        // (rustls-native-certs).
        _ => Client::open(info).map_err(|e| invalid("Redis address", e)),
    }
}

/// Escapes Redis glob metacharacters so that `<prefix>*` matches the prefix
/// literally (a prefix containing `?`, `*`, `[` or `\` would otherwise match
/// channels that do not start with it).
fn subscribe_pattern(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 2);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    pattern
}

/// The delay cap for the `attempt`-th consecutive failure (0-based): 100 ms
/// doubling up to 30 s. The actual delay is uniform in `[0, cap]` ("full jitter").
fn backoff_cap(attempt: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(20))
        .min(BACKOFF_MAX)
}

/// Removes the configured password from error text, in case it ever shows up.
fn scrub(text: String, password: Option<&str>) -> String {
    match password.filter(|p| !p.is_empty()) {
        Some(password) if text.contains(password) => text.replace(password, "***"),
        _ => text,
    }
}

/// xorshift64* seeded from the time, the thread id and std's per-process
/// random hasher keys; only for backoff jitter.
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Jitter {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        SystemTime::now().hash(&mut hasher);
        std::thread::current().id().hash(&mut hasher);
        Jitter(hasher.finish() | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, cap]`.
    fn delay(&mut self, cap: Duration) -> Duration {
        let cap_nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX - 1);
        let r = (u128::from(self.next_u64()) * u128::from(cap_nanos + 1)) >> 64;
        Duration::from_nanos(r as u64)
    }
}

/// How a subscribed session (or an attempt at one) ended.
enum SessionEnd {
    Stopped,
    /// The Inbox was dropped: nobody is left to deliver to.
    InboxClosed,
    /// Could not connect or subscribe.
    ConnectFailed(String),
    /// Was subscribed, then the connection failed.
    Lost(String),
}

/// What the thread owns.
struct ReaderThread {
    config: RedisConfig,
    client: Client,
    handoff: Handoff,
    status: Arc<RedisStatus>,
    stop: Arc<AtomicBool>,
    /// `<escaped prefix>*`.
    pattern: String,
    /// `host:port`, for logs.
    addr: String,
    /// Connect timeout and pong wait.
    io_wait: Duration,
    /// Read timeout while waiting for messages: the stop flag is checked at least this often.
    read_slice: Duration,
    /// A session that lasted this long resets the backoff.
    healthy_after: Duration,
    jitter: Jitter,
    warn_connection: RateLimited,
    warn_queue_full: RateLimited,
    warn_bad_channel: RateLimited,
}

impl ReaderThread {
    fn new(
        config: RedisConfig,
        client: Client,
        handoff: Handoff,
        status: Arc<RedisStatus>,
        stop: Arc<AtomicBool>,
    ) -> ReaderThread {
        // A zero read timeout is an error for std sockets.
        let ping_interval = config.ping_interval.max(Duration::from_millis(1));
        ReaderThread {
            pattern: subscribe_pattern(&config.channel_prefix),
            addr: if config.host.contains(':') {
                format!("[{}]:{}", config.host, config.port)
            } else {
                format!("{}:{}", config.host, config.port)
            },
            io_wait: ping_interval.clamp(MIN_IO_WAIT, MAX_IO_WAIT),
            read_slice: ping_interval.min(STOP_CHECK),
            healthy_after: HEALTHY_AFTER.min(ping_interval.saturating_mul(HEALTHY_PINGS)),
            config,
            client,
            handoff,
            status,
            stop,
            jitter: Jitter::seeded(),
            warn_connection: RateLimited::new(WARN_PERIOD),
            warn_queue_full: RateLimited::new(WARN_PERIOD),
            warn_bad_channel: RateLimited::new(WARN_PERIOD),
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn run(mut self) {
        let mut attempt: u32 = 0;
        let mut subscribed_before = false;
        while !self.stopping() {
            let started = Instant::now();
            let error = match self.session(&mut subscribed_before) {
                SessionEnd::Stopped | SessionEnd::InboxClosed => break,
                SessionEnd::ConnectFailed(error) => {
                    let error = scrub(error, self.config.password.as_deref());
                    self.status.set_error(error.clone());
                    self.status.connect_failures.fetch_add(1, Ordering::Relaxed);
                    error
                }
                // Already recorded (and scrubbed) by `session`.
                SessionEnd::Lost(error) => {
                    if started.elapsed() >= self.healthy_after {
                        attempt = 0;
                    }
                    error
                }
            };
            let delay = self.jitter.delay(backoff_cap(attempt));
            if let Some(suppressed) = self.warn_connection.check(Instant::now()) {
                warn!(
                    "Redis {}: {error}; reconnecting in {} ms ({suppressed} similar warnings suppressed)",
                    self.addr,
                    delay.as_millis()
                );
            }
            attempt = attempt.saturating_add(1);
            self.sleep_unless_stopped(delay);
        }
        self.status.set_subscribed(false);
        debug!("Redis reader stopped");
    }

    /// Sleeps `delay` in short slices; returns early when asked to stop.
    fn sleep_unless_stopped(&self, delay: Duration) {
        let until = Instant::now() + delay;
        loop {
            let now = Instant::now();
            if self.stopping() || now >= until {
                return;
            }
            std::thread::sleep((until - now).min(STOP_CHECK));
        }
    }

    /// Connects, subscribes, and reads until the connection fails or the
    /// thread is asked to stop.
    fn session(&mut self, subscribed_before: &mut bool) -> SessionEnd {
        let mut con = match self.connect_and_subscribe() {
            Ok(con) => con,
            Err(error) => return SessionEnd::ConnectFailed(error),
        };
        let mut pubsub = con.as_pubsub();
        let end = match self.ping(&mut pubsub) {
            Err(error) => SessionEnd::ConnectFailed(error),
            Ok(()) => {
                if *subscribed_before {
                    self.status.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                *subscribed_before = true;
                self.status.set_subscribed(true);
                info!(
                    "subscribed to Redis at {} (pattern {:?})",
                    self.addr, self.pattern
                );
                let end = match self.read_messages(&mut pubsub) {
                    SessionEnd::Lost(error) => {
                        // The error first, so /health never shows "disconnected"
                        // without a reason.
                        let error = scrub(error, self.config.password.as_deref());
                        self.status.set_error(error.clone());
                        SessionEnd::Lost(error)
                    }
                    end => end,
                };
                self.status.set_subscribed(false);
                end
            }
        };
        // Dropping a redis-rs PubSub sends UNSUBSCRIBE + PUNSUBSCRIBE and waits
        // for the replies (its `impl Drop`); keep that wait short on a
        // connection we are abandoning anyway.
        if let Err(e) = pubsub.set_read_timeout(Some(TEARDOWN_WAIT)) {
            debug!("Redis teardown: {e}");
        }
        drop(pubsub);
        end
    }

    fn connect_and_subscribe(&self) -> Result<Connection, String> {
        let mut con = self
            .client
            .get_connection_with_timeout(self.io_wait)
            .map_err(|e| format!("connect: {e}"))?;
        con.set_write_timeout(Some(self.io_wait))
            .and_then(|()| con.set_read_timeout(Some(self.io_wait)))
            .map_err(|e| format!("connect: {e}"))?;
        // Subscribed by hand rather than with `PubSub::psubscribe`, which
        // discards the reply and so would take an error (e.g. ACL NOPERM on
        // the channels) for success.
        let command = redis::cmd("PSUBSCRIBE")
            .arg(&self.pattern)
            .get_packed_command();
        con.send_packed_command(&command)
            .map_err(|e| format!("PSUBSCRIBE: {e}"))?;
        match con.recv_response() {
            Ok(Value::Array(reply)) if is_bulk(reply.first(), b"psubscribe") => {}
            Ok(Value::ServerError(e)) => return Err(format!("PSUBSCRIBE: {e}")),
            Ok(other) => return Err(format!("PSUBSCRIBE: unexpected reply {other:?}")),
            Err(e) => return Err(format!("PSUBSCRIBE: {e}")),
        }
        con.set_read_timeout(Some(self.read_slice))
            .map_err(|e| format!("PSUBSCRIBE: {e}"))?;
        Ok(con)
    }

    /// `PING` in subscribed mode. RESP2 answers `["pong", ""]` (a plain `PONG`
    /// would mean the connection is not in subscribed mode after all). The
    /// wait is bounded by `io_wait`; a timeout or any other error is a lost
    /// connection. Messages that arrive before the pong are kept by redis-rs
    /// and returned by the next `get_message`.
    fn ping(&self, pubsub: &mut PubSub<'_>) -> Result<(), String> {
        pubsub
            .set_read_timeout(Some(self.io_wait))
            .map_err(|e| format!("PING: {e}"))?;
        let sent = Instant::now();
        let reply = pubsub.ping::<Value>();
        let round_trip = sent.elapsed();
        match reply {
            Ok(Value::Array(reply)) if is_bulk(reply.first(), b"pong") => {}
            Ok(Value::ServerError(e)) => return Err(format!("PING: {e}")),
            Ok(other) => return Err(format!("PING: unexpected reply {other:?}")),
            Err(e) if e.is_timeout() => {
                return Err(format!(
                    "PING: no reply within {} ms",
                    self.io_wait.as_millis()
                ));
            }
            Err(e) => return Err(format!("PING: {e}")),
        }
        pubsub
            .set_read_timeout(Some(self.read_slice))
            .map_err(|e| format!("PING: {e}"))?;
        self.status.set_ping(round_trip);
        Ok(())
    }

    fn read_messages(&mut self, pubsub: &mut PubSub<'_>) -> SessionEnd {
        let ping_interval = self.config.ping_interval;
        let mut last_ping = Instant::now();
        loop {
            if self.stopping() {
                return SessionEnd::Stopped;
            }
            // Also under constant traffic: a server that keeps sending but no
            // longer answers is caught too, and /health gets a fresh round trip.
            if last_ping.elapsed() >= ping_interval {
                if let Err(error) = self.ping(pubsub) {
                    return SessionEnd::Lost(error);
                }
                last_ping = Instant::now();
            }
            match pubsub.get_message() {
                Ok(msg) => {
                    if let Some(end) = self.hand_over(&msg) {
                        return end;
                    }
                }
                // The read slice passed without a message, or a signal cut it short
                // (a read with SO_RCVTIMEO fails with EINTR even under SA_RESTART,
                // and after every SIGSTOP/SIGCONT). The parser keeps what it read.
                Err(e) if e.is_timeout() || is_interrupted(&e) => {}
                Err(e) => return SessionEnd::Lost(format!("read: {e}")),
            }
        }
    }

    /// Strips the prefix and queues the message for the loop. Returns Some
    /// when the thread should end.
    fn hand_over(&mut self, msg: &redis::Msg) -> Option<SessionEnd> {
        self.status.received.fetch_add(1, Ordering::Relaxed);
        self.status.last_message_unix_millis.store(
            clock::unix_millis(SystemTime::now()).min(NONE - 1),
            Ordering::Relaxed,
        );
        let prefix = self.config.channel_prefix.as_str();
        // `get_channel_name` borrows, but answers "?" for a channel that is
        // not UTF-8; fetch the real bytes only then, for the log line.
        let name = msg.get_channel_name();
        let user_id = if name == "?" {
            None
        } else {
            user_id_from_channel(name.as_bytes(), prefix)
        };
        let Some(user_id) = user_id else {
            self.status
                .dropped_invalid_channel
                .fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.warn_bad_channel.check(Instant::now()) {
                let channel: Vec<u8> = msg.get_channel().unwrap_or_default();
                warn!(
                    "dropping Redis message on channel {:?}: no user id after prefix {prefix:?} ({suppressed} similar warnings suppressed)",
                    String::from_utf8_lossy(&channel)
                );
            }
            return None;
        };
        match self
            .handoff
            .push(Published::new(user_id.as_bytes(), msg.get_payload_bytes()))
        {
            PushOutcome::Queued => None,
            PushOutcome::Full => {
                self.status
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.warn_queue_full.check(Instant::now()) {
                    warn!(
                        "Redis hand-over queue full ({} messages): dropping messages ({suppressed} more dropped since the last warning)",
                        self.handoff.shared.capacity
                    );
                }
                None
            }
            PushOutcome::Closed => Some(SessionEnd::InboxClosed),
        }
    }
}

/// EINTR. redis-rs keeps its io::Error private (`source()` gives the `Arc` it
/// is stored in), so look through that wrapper; a unit test pins this down.
fn is_interrupted(error: &redis::RedisError) -> bool {
    type Shared = Arc<dyn std::error::Error + Send + Sync>;
    let Some(source) = std::error::Error::source(error) else {
        return false;
    };
    let io_error = match source.downcast_ref::<Shared>() {
        Some(shared) => shared.downcast_ref::<io::Error>(),
        None => source.downcast_ref::<io::Error>(),
    };
    io_error.is_some_and(|e| e.kind() == io::ErrorKind::Interrupted)
}

fn is_bulk(value: Option<&Value>, expected: &[u8]) -> bool {
    match value {
        Some(Value::BulkString(bytes)) => bytes.eq_ignore_ascii_case(expected),
        Some(Value::SimpleString(text)) => text.as_bytes().eq_ignore_ascii_case(expected),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll, Token, Waker};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};

    const WAKE: Token = Token(7);

    #[test]
    fn eintr_is_recognised_through_redis_errors() {
        let interrupted = redis::RedisError::from(io::Error::from(io::ErrorKind::Interrupted));
        assert!(is_interrupted(&interrupted));
        let reset = redis::RedisError::from(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(!is_interrupted(&reset));
    }

    fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn free_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        listener.local_addr().expect("local addr").port()
    }

    /// A real `redis-server` on its own port, killed on drop.
    struct RedisServer {
        port: u16,
        args: Vec<String>,
        child: Option<Child>,
    }

    impl RedisServer {
        fn start(extra: &[&str]) -> RedisServer {
            let mut server = RedisServer {
                port: free_port(),
                args: extra.iter().map(|s| s.to_string()).collect(),
                child: None,
            };
            server.restart();
            server
        }

        fn restart(&mut self) {
            let port = self.port.to_string();
            let child = Command::new("redis-server")
                .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
                .args(["--appendonly", "no", "--logfile", ""])
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server (is it installed?)");
            self.child = Some(child);
            // Ready when it answers anything to a PING (even NOAUTH).
            wait_until("redis-server to answer", Duration::from_secs(10), || {
                if let Some(child) = self.child.as_mut()
                    && let Ok(Some(exit)) = child.try_wait()
                {
                    panic!("redis-server exited at start: {exit}");
                }
                let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
                    return false;
                };
                let mut reply = [0u8; 1];
                stream
                    .set_read_timeout(Some(Duration::from_secs(1)))
                    .is_ok()
                    && stream.write_all(b"PING\r\n").is_ok()
                    && stream.read_exact(&mut reply).is_ok()
            });
        }

        fn kill(&mut self) {
            if let Some(mut child) = self.child.take() {
                // Already exited is fine for a test teardown.
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        fn signal(&self, signal: i32) {
            let pid = self.child.as_ref().expect("running").id() as libc::pid_t;
            // SAFETY: plain kill(2) on our own child process.
            assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        }

        fn connection(&self, password: Option<&str>) -> Connection {
            let mut info = RedisConnectionInfo::default();
            if let Some(password) = password {
                info = info.set_password(password);
            }
            let info = ("127.0.0.1", self.port)
                .into_connection_info()
                .expect("info")
                .set_redis_settings(info);
            Client::open(info)
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
                .expect("connect to test redis")
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            self.kill();
        }
    }

    fn publish(con: &mut Connection, channel: &str, payload: &[u8]) -> i64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query(con)
            .expect("PUBLISH")
    }

    fn config(port: u16) -> RedisConfig {
        RedisConfig {
            host: "127.0.0.1".into(),
            port,
            username: None,
            password: None,
            db: 0,
            use_tls: false,
            tls_ca_file: None,
            channel_prefix: "user_noti:".into(),
            ping_interval: Duration::from_millis(200),
        }
    }

    /// The event loop's side: a real Poll and Waker.
    struct LoopSide {
        poll: Poll,
        events: Events,
        waker: Arc<Waker>,
        wakes: u64,
    }

    impl LoopSide {
        fn new() -> LoopSide {
            let poll = Poll::new().expect("poll");
            let waker = Arc::new(Waker::new(poll.registry(), WAKE).expect("waker"));
            LoopSide {
                poll,
                events: Events::with_capacity(16),
                waker,
                wakes: 0,
            }
        }

        /// Drains on waker events and on `rearm`, as the loop does, until
        /// `want` messages arrived. `pause` simulates a loop busy with sockets.
        fn collect(&mut self, inbox: &Inbox, want: usize, pause: Duration) -> Vec<Published> {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut got = Vec::new();
            let mut pending = false;
            while got.len() < want {
                assert!(
                    Instant::now() < deadline,
                    "got {} of {want} messages",
                    got.len()
                );
                if !pending {
                    pending = inbox.rearm();
                }
                if !pending {
                    self.poll
                        .poll(&mut self.events, Some(Duration::from_millis(50)))
                        .expect("poll");
                    pending = self.events.iter().any(|e| e.token() == WAKE);
                    self.wakes += u64::from(pending);
                }
                if pending {
                    std::thread::sleep(pause);
                    pending = inbox.drain_into(&mut got, 64) == 64;
                }
            }
            got
        }
    }

    fn spawn(config: RedisConfig, side: &LoopSide) -> (RedisReader, Inbox, Arc<RedisStatus>) {
        RedisReader::spawn(config, Arc::clone(&side.waker)).expect("spawn reader")
    }

    fn wait_subscribed(status: &RedisStatus) {
        wait_until("subscribed", Duration::from_secs(10), || {
            status.is_subscribed()
        });
    }

    #[test]
    fn delivers_messages_with_user_id_and_raw_payload() {
        let server = RedisServer::start(&[]);
        let mut side = LoopSide::new();
        let (reader, inbox, status) = spawn(config(server.port), &side);
        wait_subscribed(&status);
        assert!(
            status.ping_micros().is_some(),
            "first ping right after subscribing"
        );
        assert_eq!(status.last_message_unix_millis(), None);

        let mut con = server.connection(None);
        assert_eq!(
            publish(&mut con, "user_noti:org:7:user:9", br#"{"type":"t"}"#),
            1
        );
        // A channel matching the pattern with an empty id is read and dropped.
        assert_eq!(publish(&mut con, "user_noti:", b"x"), 1);
        // Payloads are raw bytes, not necessarily UTF-8.
        assert_eq!(publish(&mut con, "user_noti:42", b"\xff\x00bin"), 1);
        // Not matching the pattern: Redis does not deliver it at all.
        assert_eq!(publish(&mut con, "other:42", b"x"), 0);

        let got = side.collect(&inbox, 2, Duration::ZERO);
        assert_eq!(got[0].user_id(), b"org:7:user:9");
        assert_eq!(got[0].payload(), br#"{"type":"t"}"#);
        assert_eq!(got[1].user_id(), b"42");
        assert_eq!(got[1].payload(), b"\xff\x00bin");
        assert_eq!(status.received(), 3);
        assert_eq!(status.dropped_invalid_channel(), 1);
        assert_eq!(status.dropped_queue_full(), 0);
        let last = status
            .last_message_unix_millis()
            .expect("last message time");
        assert!(last.abs_diff(clock::unix_millis(SystemTime::now())) < 60_000);
        assert_eq!(inbox.queued(), 0);

        reader.stop();
        reader.join().expect("reader thread");
        assert!(!status.is_subscribed());
    }

    #[test]
    fn prefix_glob_characters_match_literally() {
        let server = RedisServer::start(&[]);
        let side = LoopSide::new();
        let mut cfg = config(server.port);
        cfg.channel_prefix = "n?[a]*\\:".into();
        let (reader, inbox, status) = spawn(cfg, &side);
        wait_subscribed(&status);
        let mut con = server.connection(None);
        assert_eq!(publish(&mut con, "nX[a]*\\:1", b"glob"), 0);
        assert_eq!(publish(&mut con, "n?a*\\:1", b"glob"), 0);
        assert_eq!(publish(&mut con, "n?[a]*\\:1", b"literal"), 1);
        let mut side = side;
        let got = side.collect(&inbox, 1, Duration::ZERO);
        assert_eq!(got[0].user_id(), b"1");
        assert_eq!(got[0].payload(), b"literal");
        reader.stop();
    }

    #[test]
    fn wakes_are_coalesced_per_batch() {
        let server = RedisServer::start(&[]);
        let mut side = LoopSide::new();
        let (reader, inbox, status) = spawn(config(server.port), &side);
        wait_subscribed(&status);
        let mut con = server.connection(None);
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("PUBLISH")
                .arg(format!("user_noti:u{}", i % 10))
                .arg(i.to_string())
                .ignore();
        }
        pipe.query::<()>(&mut con).expect("pipelined PUBLISH");
        let got = side.collect(&inbox, 1000, Duration::from_millis(1));
        for (i, p) in got.iter().enumerate() {
            assert_eq!(p.payload(), i.to_string().as_bytes(), "in order");
            assert_eq!(p.user_id(), format!("u{}", i % 10).as_bytes());
        }
        let wakes = inbox.shared.wakes.load(Ordering::Relaxed);
        assert!(
            side.wakes <= 100 && wakes <= 100,
            "{} loop wakes / {wakes} waker calls for 1000 messages",
            side.wakes
        );
        reader.stop();
    }

    #[test]
    fn handoff_coalesces_bounds_and_rearms() {
        let side = LoopSide::new();
        let (handoff, inbox) = handoff(Arc::clone(&side.waker), 10);
        for i in 0..12u8 {
            let outcome = handoff.push(Published::new(b"u", &[i]));
            let want = if i < 10 {
                PushOutcome::Queued
            } else {
                PushOutcome::Full
            };
            assert_eq!(outcome, want, "push {i}");
        }
        assert_eq!(
            inbox.shared.wakes.load(Ordering::Relaxed),
            1,
            "one wake for the batch"
        );
        assert_eq!(inbox.queued(), 10);

        let mut out = Vec::new();
        assert_eq!(inbox.drain_into(&mut out, 4), 4);
        // The loop is still awake: pushes while it works do not wake it.
        assert_eq!(
            handoff.push(Published::new(b"u", &[10])),
            PushOutcome::Queued
        );
        assert_eq!(
            inbox.shared.wakes.load(Ordering::Relaxed),
            1,
            "still pending"
        );
        // Before blocking it re-arms and learns that 7 are left.
        assert!(inbox.rearm(), "messages left");
        assert_eq!(inbox.drain_into(&mut out, 100), 7);
        assert_eq!(inbox.drain_into(&mut out, 100), 0);
        let payloads: Vec<u8> = out.iter().map(|p| p.payload()[0]).collect();
        assert_eq!(payloads, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(inbox.queued(), 0);
        assert!(!inbox.rearm(), "nothing left: the loop may block");
        // Re-armed: the next push wakes again.
        assert_eq!(
            handoff.push(Published::new(b"u", b"x")),
            PushOutcome::Queued
        );
        assert_eq!(inbox.shared.wakes.load(Ordering::Relaxed), 2);

        drop(inbox);
        assert_eq!(
            handoff.push(Published::new(b"u", b"x")),
            PushOutcome::Closed
        );
    }

    #[test]
    fn reconnects_after_server_restart() {
        let mut server = RedisServer::start(&[]);
        let mut side = LoopSide::new();
        let (reader, inbox, status) = spawn(config(server.port), &side);
        wait_subscribed(&status);
        assert_eq!(status.reconnects(), 0);
        assert_eq!(status.last_error(), None);

        server.kill();
        wait_until("not subscribed", Duration::from_secs(10), || {
            !status.is_subscribed()
        });
        assert!(status.last_error().is_some());
        assert_eq!(status.ping_micros(), None);

        server.restart();
        wait_subscribed(&status);
        assert_eq!(status.reconnects(), 1);
        let mut con = server.connection(None);
        assert_eq!(publish(&mut con, "user_noti:back", b"again"), 1);
        let got = side.collect(&inbox, 1, Duration::ZERO);
        assert_eq!(got[0].payload(), b"again");
        reader.stop();
        reader.join().expect("reader thread");
    }

    #[test]
    fn frozen_server_is_caught_by_ping() {
        let server = RedisServer::start(&[]);
        let side = LoopSide::new();
        let (reader, _inbox, status) = spawn(config(server.port), &side);
        wait_subscribed(&status);
        server.signal(libc::SIGSTOP);
        // ping_interval (200 ms) + pong wait (1 s minimum) + slack.
        wait_until("frozen server noticed", Duration::from_secs(10), || {
            !status.is_subscribed()
        });
        let error = status.last_error().expect("error recorded");
        assert!(error.contains("PING"), "{error}");
        server.signal(libc::SIGCONT);
        wait_subscribed(&status);
        assert_eq!(status.reconnects(), 1);
        reader.stop();
    }

    #[test]
    fn pings_when_idle_and_under_traffic() {
        let server = RedisServer::start(&[]);
        let mut side = LoopSide::new();
        let mut cfg = config(server.port);
        cfg.ping_interval = Duration::from_millis(50);
        let (reader, inbox, status) = spawn(cfg, &side);
        wait_subscribed(&status);
        let idle_from = status.pings();
        wait_until("idle pings", Duration::from_secs(10), || {
            status.pings() >= idle_from + 3
        });
        // Traffic every 5 ms: reads never time out, pings must still happen.
        let mut con = server.connection(None);
        let busy_from = status.pings();
        let mut sent = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while status.pings() < busy_from + 3 {
            assert!(Instant::now() < deadline, "no pings under traffic");
            publish(&mut con, "user_noti:busy", b"m");
            sent += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        side.collect(&inbox, sent, Duration::ZERO);
        assert!(status.is_subscribed());
        assert_eq!(status.reconnects(), 0);
        assert_eq!(status.connect_failures(), 0);
        reader.stop();
    }

    #[test]
    fn authenticates_with_acl_user_and_selects_db() {
        let server = RedisServer::start(&[
            "--user",
            "default",
            "off",
            "--user",
            "notifier",
            "on",
            ">s3cret-pw",
            "~*",
            "&user_noti:*",
            "+@all",
            "--user",
            "publisher",
            "on",
            ">pub-pw",
            "~*",
            "&*",
            "+@all",
        ]);
        let mut side = LoopSide::new();

        // Wrong password: a connect failure, and the text never has the password.
        let mut bad = config(server.port);
        bad.username = Some("notifier".into());
        bad.password = Some("wrong-pw".into());
        let (reader, _inbox, status) = spawn(bad, &side);
        wait_until("auth failure", Duration::from_secs(10), || {
            status.connect_failures() >= 1
        });
        let error = status.last_error().expect("error recorded");
        assert!(!error.contains("wrong-pw"), "{error}");
        assert!(!status.is_subscribed());
        reader.stop();

        let mut good = config(server.port);
        good.username = Some("notifier".into());
        good.password = Some("s3cret-pw".into());
        good.db = 3;
        let (reader, inbox, status) = spawn(good, &side);
        wait_subscribed(&status);
        let mut con = Client::open(format!(
            "redis://publisher:pub-pw@127.0.0.1:{}/",
            server.port
        ))
        .and_then(|c| c.get_connection())
        .expect("publisher connection");
        assert_eq!(publish(&mut con, "user_noti:acl", b"ok"), 1);
        let got = side.collect(&inbox, 1, Duration::ZERO);
        assert_eq!(got[0].user_id(), b"acl");
        reader.stop();
    }

    #[test]
    fn channel_acl_refusal_is_a_connect_failure() {
        let server = RedisServer::start(&[
            "--user", "default", "off", "--user", "narrow", "on", ">pw", "~*", "&other:*", "+@all",
        ]);
        let side = LoopSide::new();
        let mut cfg = config(server.port);
        cfg.username = Some("narrow".into());
        cfg.password = Some("pw".into());
        let (reader, _inbox, status) = spawn(cfg, &side);
        wait_until("PSUBSCRIBE refused", Duration::from_secs(10), || {
            status.connect_failures() >= 1
        });
        let error = status.last_error().expect("error recorded");
        let lower = error.to_ascii_lowercase();
        assert!(
            lower.contains("psubscribe") && lower.contains("noperm"),
            "{error}"
        );
        assert!(!status.is_subscribed());
        reader.stop();
    }

    /// A scratch directory with a test CA and a server certificate for
    /// 127.0.0.1/localhost, removed on drop.
    struct TlsFiles {
        dir: std::path::PathBuf,
    }

    impl TlsFiles {
        fn create() -> TlsFiles {
            let dir = std::env::temp_dir().join(format!(
                "ws-notify-redis-tls-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            std::fs::write(
                dir.join("san.ext"),
                "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
            )
            .expect("write san.ext");
            let ec = [
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ];
            let steps: [&[&str]; 3] = [
                &[
                    &["req", "-x509"],
                    &ec[..],
                    &["-keyout", "ca.key", "-out", "ca.crt"],
                ]
                .concat(),
                &[
                    &["req"],
                    &ec[..],
                    &["-keyout", "server.key", "-out", "server.csr"],
                ]
                .concat(),
                &[
                    "x509",
                    "-req",
                    "-in",
                    "server.csr",
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    "server.crt",
                    "-days",
                    "1",
                    "-extfile",
                    "san.ext",
                ],
            ];
            for (step, subject) in steps
                .iter()
                .zip(["/CN=ws-notify test CA", "/CN=localhost", ""])
            {
                let mut command = Command::new("openssl");
                command.args(*step).current_dir(&dir);
                if !subject.is_empty() {
                    command.args(["-subj", subject, "-days", "1"]);
                }
                let out = command.output().expect("run openssl");
                assert!(
                    out.status.success(),
                    "openssl {step:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            TlsFiles { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.join(name).to_string_lossy().into_owned()
        }
    }

    impl Drop for TlsFiles {
        fn drop(&mut self) {
            // Best effort: a leftover temp dir is harmless.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn subscribes_over_tls_with_a_private_ca() {
        let files = TlsFiles::create();
        let tls_port = free_port().to_string();
        // The plain port (RedisServer's) is for readiness and publishing.
        let server = RedisServer::start(&[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &files.path("server.crt"),
            "--tls-key-file",
            &files.path("server.key"),
            "--tls-ca-cert-file",
            &files.path("ca.crt"),
            "--tls-auth-clients",
            "no",
        ]);
        let mut side = LoopSide::new();
        let mut cfg = config(tls_port.parse().expect("port"));
        cfg.use_tls = true;

        // Without the CA file the system roots do not know the test CA.
        let (reader, _inbox, status) = spawn(cfg.clone(), &side);
        wait_until(
            "untrusted certificate refused",
            Duration::from_secs(10),
            || status.connect_failures() >= 1,
        );
        assert!(!status.is_subscribed());
        let error = status.last_error().expect("error recorded");
        assert!(error.contains("UnknownIssuer"), "{error}");
        reader.stop();

        cfg.tls_ca_file = Some(files.dir.join("ca.crt"));
        let (reader, inbox, status) = spawn(cfg.clone(), &side);
        wait_subscribed(&status);
        let mut con = server.connection(None);
        assert_eq!(publish(&mut con, "user_noti:tls", b"secure"), 1);
        let got = side.collect(&inbox, 1, Duration::ZERO);
        assert_eq!(got[0].user_id(), b"tls");
        assert_eq!(got[0].payload(), b"secure");
        reader.stop();

        // An unreadable CA file is a start-up error.
        cfg.tls_ca_file = Some(files.dir.join("missing.crt"));
        let error = RedisReader::spawn(cfg, Arc::clone(&side.waker))
            .err()
            .expect("missing CA file refused");
        assert!(error.to_string().contains("REDIS_TLS_CA_FILE"), "{error}");
    }

    #[test]
    fn unreachable_server_counts_failures_and_stops_promptly() {
        let side = LoopSide::new();
        let (reader, _inbox, status) = spawn(config(free_port()), &side);
        wait_until("connect failures", Duration::from_secs(10), || {
            status.connect_failures() >= 2
        });
        assert!(!status.is_subscribed());
        assert!(status.last_error().is_some());
        let asked = Instant::now();
        reader.stop();
        reader.join().expect("reader thread");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
    }

    #[test]
    fn reader_ends_when_inbox_is_dropped() {
        let server = RedisServer::start(&[]);
        let side = LoopSide::new();
        let (reader, inbox, status) = spawn(config(server.port), &side);
        wait_subscribed(&status);
        drop(inbox);
        let mut con = server.connection(None);
        publish(&mut con, "user_noti:gone", b"x");
        wait_until("thread end", Duration::from_secs(10), || {
            reader.thread.is_finished()
        });
    }

    #[test]
    fn backoff_cap_bounds() {
        assert_eq!(backoff_cap(0), Duration::from_millis(100));
        assert_eq!(backoff_cap(1), Duration::from_millis(200));
        assert_eq!(backoff_cap(5), Duration::from_millis(3200));
        let mut previous = Duration::ZERO;
        for attempt in 0..200 {
            let cap = backoff_cap(attempt);
            assert!(cap >= previous && cap <= BACKOFF_MAX, "attempt {attempt}");
            previous = cap;
        }
        assert_eq!(backoff_cap(u32::MAX), BACKOFF_MAX);

        let mut jitter = Jitter::seeded();
        let cap = Duration::from_millis(100);
        let delays: Vec<_> = (0..1000).map(|_| jitter.delay(cap)).collect();
        assert!(delays.iter().all(|d| *d <= cap));
        assert!(delays.iter().any(|d| *d < cap / 4) && delays.iter().any(|d| *d > cap * 3 / 4));
        assert_eq!(jitter.delay(Duration::ZERO), Duration::ZERO);
        assert!(jitter.delay(Duration::MAX) <= Duration::MAX);
    }

    #[test]
    fn pattern_escaping_and_scrubbing() {
        assert_eq!(subscribe_pattern("user_noti:"), "user_noti:*");
        assert_eq!(subscribe_pattern("a*b?[c]\\:"), "a\\*b\\?\\[c\\]\\\\:*");
        assert_eq!(subscribe_pattern(""), "*");
        assert_eq!(
            scrub("bad pw hunter2 and hunter2".into(), Some("hunter2")),
            "bad pw *** and ***"
        );
        assert_eq!(scrub("text".into(), Some("")), "text");
        assert_eq!(scrub("text".into(), None), "text");
    }

    #[test]
    fn published_layout() {
        let p = Published::new(b"user:1", b"{\"type\":\"t\"}");
        assert_eq!(p.user_id(), b"user:1");
        assert_eq!(p.payload(), b"{\"type\":\"t\"}");
        let empty = Published::new(b"u", b"");
        assert_eq!(empty.payload(), b"");
        assert!(format!("{p:?}").contains("user:1"));
    }
}
