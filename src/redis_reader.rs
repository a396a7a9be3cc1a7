//! The Redis reader thread: connect, `PSUBSCRIBE <prefix>*`, read, hand over.
//!
//! ```text
//!  Redis --PSUBSCRIBE <prefix>*--> [redis-reader thread]
//!      strip the prefix, copy (user id, payload) into one `Published`
//!      --> handover::Handoff (bounded; one wake per batch) --> [event loop]
//! ```
//!
//! The thread owns one blocking redis-rs connection. It never parses JSON and
//! never waits on the event loop: it reads a message, hands it over and reads
//! on, so Redis never sees a slow subscriber (Redis disconnects a pub/sub
//! client whose output buffer passes its limit, losing messages). It pings
//! Redis once the link has been quiet for `ping_interval` and treats a missing pong as a
//! lost connection; on any error it reconnects forever with exponential
//! backoff (capped by `REDIS_RECONNECT_MAX`) and full jitter. A panic inside a
//! session is caught: the thread marks itself unsubscribed (so `/health` says
//! 503), logs it, counts it and reconnects. Health crosses to the loop thread
//! through [`RedisStatus`]; messages through [`crate::handover`].

use std::hash::{BuildHasher, Hash, Hasher};
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, warn};
use redis::{
    Client, Connection, ConnectionAddr, IntoConnectionInfo, PubSub, RedisConnectionInfo,
    TlsCertificates, Value,
};

use crate::clock;
use crate::config::RedisConfig;
use crate::handover::{
    self, Handoff, Inbox, Published, PushOutcome, QUEUE_BYTES_CAPACITY, QUEUE_CAPACITY,
};
use crate::logging::RateLimited;
use crate::message::user_id_from_channel;
use crate::redis_status::RedisStatus;

/// First reconnect delay cap; doubles per consecutive failure up to
/// `REDIS_RECONNECT_MAX`.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
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
/// Debug builds only: a message on the channel named by this variable makes
/// the reader panic, so that tests can check that a dead session is noticed
/// and restarted. Compiled out of release builds.
#[cfg(debug_assertions)]
const TEST_PANIC_CHANNEL: &str = "WS_NOTIFY_TEST_PANIC_ON_CHANNEL";

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
        let (handoff, inbox) = handover::channel(waker, QUEUE_CAPACITY, QUEUE_BYTES_CAPACITY);
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

    /// True once the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
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
/// doubling up to `max` (`REDIS_RECONNECT_MAX`). The actual delay is uniform
/// in `[0, cap]` ("full jitter", so that a fleet does not reconnect in step).
fn backoff_cap(attempt: u32, max: Duration) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(20))
        .min(max)
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
    /// Was subscribed, then the connection failed (or the session panicked).
    Lost(String),
}

/// Where the thread stands between sessions, for the start-up and recovery
/// log lines and the reconnect counter.
enum Subscription {
    /// Not subscribed yet since start.
    Never,
    Active,
    /// Lost at `since`; `attempts` sessions started since then.
    Lost {
        since: Instant,
        attempts: u32,
    },
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
    subscription: Subscription,
    jitter: Jitter,
    warn_connection: RateLimited,
    warn_queue_full: RateLimited,
    warn_bad_channel: RateLimited,
    /// See [`TEST_PANIC_CHANNEL`].
    #[cfg(debug_assertions)]
    panic_on_channel: Option<String>,
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
            subscription: Subscription::Never,
            jitter: Jitter::seeded(),
            warn_connection: RateLimited::new(WARN_PERIOD),
            warn_queue_full: RateLimited::new(WARN_PERIOD),
            warn_bad_channel: RateLimited::new(WARN_PERIOD),
            #[cfg(debug_assertions)]
            panic_on_channel: std::env::var(TEST_PANIC_CHANNEL).ok(),
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn run(mut self) {
        let _dead_reader = DeadReaderGuard(Arc::clone(&self.status));
        let mut attempt: u32 = 0;
        while !self.stopping() {
            let started = Instant::now();
            let error = match self.session_catching_panics() {
                SessionEnd::Stopped | SessionEnd::InboxClosed => break,
                SessionEnd::ConnectFailed(error) => {
                    let error = scrub(error, self.config.password.as_deref());
                    self.status.set_error(error.clone());
                    self.status.count_connect_failure();
                    error
                }
                // Already recorded (and scrubbed).
                SessionEnd::Lost(error) => {
                    if started.elapsed() >= self.healthy_after {
                        attempt = 0;
                    }
                    error
                }
            };
            let delay = self
                .jitter
                .delay(backoff_cap(attempt, self.config.reconnect_max));
            if let Some(suppressed) = self.warn_connection.check(Instant::now()) {
                warn!(
                    redis = self.addr.as_str(),
                    error:% = error,
                    retry_in_ms = delay.as_millis() as u64,
                    suppressed;
                    "Redis unavailable; reconnecting"
                );
            }
            attempt = attempt.saturating_add(1);
            self.sleep_unless_stopped(delay);
        }
        self.status.set_subscribed(false);
        debug!("Redis reader stopped");
    }

    /// One session; a panic in it (a bug: the release profile unwinds) is
    /// caught and becomes a lost connection, so the thread reconnects instead
    /// of dying while `/health` still says subscribed.
    fn session_catching_panics(&mut self) -> SessionEnd {
        match panic::catch_unwind(AssertUnwindSafe(|| self.session())) {
            Ok(end) => end,
            Err(payload) => {
                let text = payload
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(no message)");
                let error = scrub(
                    format!("reader panicked: {text}"),
                    self.config.password.as_deref(),
                );
                // The error first, so /health never shows "disconnected" without a reason.
                self.status.set_error(error.clone());
                self.status.set_subscribed(false);
                self.status.count_reader_restart();
                self.lost_subscription();
                error!(
                    redis = self.addr.as_str(),
                    error = error.as_str();
                    "Redis reader failed; reconnecting"
                );
                SessionEnd::Lost(error)
            }
        }
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
    fn session(&mut self) -> SessionEnd {
        if let Subscription::Lost { attempts, .. } = &mut self.subscription {
            *attempts += 1;
        }
        let mut con = match self.connect_and_subscribe() {
            Ok(con) => con,
            Err(error) => return SessionEnd::ConnectFailed(error),
        };
        let mut pubsub = con.as_pubsub();
        let end = match self.ping(&mut pubsub) {
            Err(error) => SessionEnd::ConnectFailed(error),
            Ok(()) => {
                self.subscribed();
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
                self.lost_subscription();
                end
            }
        };
        // Dropping a redis-rs PubSub sends UNSUBSCRIBE + PUNSUBSCRIBE and waits
        // for the replies (its `impl Drop`); keep that wait short on a
        // connection we are abandoning anyway.
        if let Err(e) = pubsub.set_read_timeout(Some(TEARDOWN_WAIT)) {
            debug!(error:% = e; "Redis teardown failed");
        }
        drop(pubsub);
        end
    }

    /// Marks the subscription in place and logs it: the start-up line the
    /// first time, the recovery (how long it was lost, how many attempts) after.
    fn subscribed(&mut self) {
        match std::mem::replace(&mut self.subscription, Subscription::Active) {
            Subscription::Never => info!(
                redis = self.addr.as_str(),
                pattern = self.pattern.as_str();
                "subscribed to Redis"
            ),
            Subscription::Lost { since, attempts } => {
                self.status.count_reconnect();
                info!(
                    redis = self.addr.as_str(),
                    down_ms = since.elapsed().as_millis() as u64,
                    attempts;
                    "re-subscribed to Redis"
                );
            }
            Subscription::Active => {}
        }
        self.status.set_subscribed(true);
    }

    /// Starts the outage clock if the subscription was in place.
    fn lost_subscription(&mut self) {
        if matches!(self.subscription, Subscription::Active) {
            self.subscription = Subscription::Lost {
                since: Instant::now(),
                attempts: 0,
            };
        }
    }

    fn connect_and_subscribe(&self) -> Result<Connection, String> {
        let mut con = self
            .client
            .get_connection_with_timeout(self.io_wait)
            .map_err(|e| self.connect_error("connect", &e))?;
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
            Ok(Value::ServerError(e)) if e.code() == "NOAUTH" => {
                return Err(format!("PSUBSCRIBE: {}: {e}", self.credentials_hint()));
            }
            Ok(Value::ServerError(e)) => return Err(format!("PSUBSCRIBE: {e}")),
            Ok(other) => return Err(format!("PSUBSCRIBE: unexpected reply {other:?}")),
            Err(e) => return Err(self.connect_error("PSUBSCRIBE", &e)),
        }
        con.set_read_timeout(Some(self.read_slice))
            .map_err(|e| format!("PSUBSCRIBE: {e}"))?;
        Ok(con)
    }

    /// `what: error`, naming the variables to check when Redis refused the
    /// credentials (the password itself is never part of it).
    fn connect_error(&self, what: &str, e: &redis::RedisError) -> String {
        let refused = e.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"));
        if refused {
            format!("{what}: {}: {e}", self.credentials_hint())
        } else {
            format!("{what}: {e}")
        }
    }

    /// Which settings to look at when Redis refuses to authenticate us.
    fn credentials_hint(&self) -> String {
        let set = |value: &Option<String>| value.as_deref().is_some_and(|v| !v.is_empty());
        match (
            self.config.username.as_deref().filter(|u| !u.is_empty()),
            set(&self.config.password),
        ) {
            (Some(user), _) => format!(
                "Redis refused user {user:?}: check REDIS_USERNAME and REDIS_PASSWORD (or the credentials in REDIS_URL)"
            ),
            (None, true) => {
                "Redis refused the password: check REDIS_PASSWORD (or the password in REDIS_URL)"
                    .to_string()
            }
            (None, false) => {
                "Redis requires a password: set REDIS_PASSWORD (and REDIS_USERNAME for an ACL user)"
                    .to_string()
            }
        }
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
        let answered = match reply {
            Ok(Value::Array(reply)) if is_bulk(reply.first(), b"pong") => true,
            Ok(Value::ServerError(e)) => return Err(format!("PING: {e}")),
            Ok(other) => return Err(format!("PING: unexpected reply {other:?}")),
            Err(e) if e.is_timeout() => {
                return Err(format!(
                    "PING: no reply within {} ms",
                    self.io_wait.as_millis()
                ));
            }
            // A signal cut the wait for the pong short (see `read_messages`):
            // the connection is fine. The pong arrives later and `get_message`
            // skips it (it is not a message); the next ping measures again.
            Err(e) if is_interrupted(&e) => false,
            Err(e) => return Err(format!("PING: {e}")),
        };
        pubsub
            .set_read_timeout(Some(self.read_slice))
            .map_err(|e| format!("PING: {e}"))?;
        if answered {
            self.status.set_ping(round_trip);
        }
        Ok(())
    }

    /// Reads messages until the connection fails or the thread is asked to
    /// stop, pinging once the link has carried nothing for `ping_interval`.
    /// Not under traffic: messages arriving prove the link alive, and redis-rs
    /// keeps every message that arrives before a pong in memory until the pong
    /// (a flood of 1 MiB messages queued in Redis ahead of a pong held hundreds
    /// of MiB). On an idle link nothing is queued ahead of the pong, and a
    /// Redis that freezes mid-flood goes quiet, so it is pinged and caught.
    fn read_messages(&mut self, pubsub: &mut PubSub<'_>) -> SessionEnd {
        let ping_interval = self.config.ping_interval;
        let mut last_activity = Instant::now();
        loop {
            if self.stopping() {
                return SessionEnd::Stopped;
            }
            if last_activity.elapsed() >= ping_interval {
                if let Err(error) = self.ping(pubsub) {
                    return SessionEnd::Lost(error);
                }
                last_activity = Instant::now();
            }
            match pubsub.get_message() {
                Ok(msg) => {
                    // Also the message's read time for the delivery latency
                    // (README "Endpoints"): no clock read of its own.
                    last_activity = Instant::now();
                    if let Some(end) = self.hand_over(&msg, last_activity) {
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

    /// Strips the prefix and queues the message, read at `read_at`, for the
    /// loop. Returns Some when the thread should end.
    fn hand_over(&mut self, msg: &redis::Msg, read_at: Instant) -> Option<SessionEnd> {
        self.status
            .count_received(clock::unix_millis(SystemTime::now()));
        let prefix = self.config.channel_prefix.as_str();
        // `get_channel_name` borrows after one UTF-8 check (the only one: the
        // user id crosses to the loop as a `str`), and answers "?" for a channel
        // that is not UTF-8; the real bytes are fetched only then, for the log.
        let name = msg.get_channel_name();
        #[cfg(debug_assertions)]
        if self.panic_on_channel.as_deref() == Some(name) {
            panic!("test fault: message on channel {name:?} ({TEST_PANIC_CHANNEL})");
        }
        let user_id = if name == "?" {
            None
        } else {
            user_id_from_channel(name, prefix)
        };
        let Some(user_id) = user_id else {
            self.status.count_dropped_invalid_channel();
            if let Some(suppressed) = self.warn_bad_channel.check(Instant::now()) {
                let channel: Vec<u8> = msg.get_channel().unwrap_or_default();
                warn!(
                    channel:% = String::from_utf8_lossy(&channel),
                    prefix,
                    suppressed;
                    "Redis message dropped: no user id after the channel prefix"
                );
            }
            return None;
        };
        let read_at = self.handoff.stamp(read_at);
        match self
            .handoff
            .push(Published::new(user_id, msg.get_payload_bytes(), read_at))
        {
            PushOutcome::Queued => None,
            PushOutcome::Full => {
                self.status.count_dropped_queue_full();
                if let Some(suppressed) = self.warn_queue_full.check(Instant::now()) {
                    warn!(
                        "Redis hand-over queue full ({} messages or {} MiB): dropping messages ({suppressed} more dropped since the last warning)",
                        self.handoff.capacity(),
                        self.handoff.byte_capacity() >> 20
                    );
                }
                None
            }
            PushOutcome::Closed => Some(SessionEnd::InboxClosed),
        }
    }
}

/// Marks Redis as not subscribed when the reader thread ends by a panic that
/// escaped [`ReaderThread::session_catching_panics`] (outside any session),
/// so `/health` says 503 rather than healthy with nobody reading.
struct DeadReaderGuard(Arc<RedisStatus>);

impl Drop for DeadReaderGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.set_error("reader thread died".to_string());
            self.0.set_subscribed(false);
            error!("the Redis reader thread died: no more messages from Redis");
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

    // The tests that need a real Redis are in tests/redis_reader.rs.

    #[test]
    fn eintr_is_recognised_through_redis_errors() {
        let interrupted = redis::RedisError::from(io::Error::from(io::ErrorKind::Interrupted));
        assert!(is_interrupted(&interrupted));
        let reset = redis::RedisError::from(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(!is_interrupted(&reset));
    }

    #[test]
    fn backoff_cap_bounds() {
        let max = Duration::from_secs(2);
        assert_eq!(backoff_cap(0, max), Duration::from_millis(100));
        assert_eq!(backoff_cap(1, max), Duration::from_millis(200));
        assert_eq!(backoff_cap(4, max), Duration::from_millis(1600));
        assert_eq!(backoff_cap(5, max), max, "capped by REDIS_RECONNECT_MAX");
        let mut previous = Duration::ZERO;
        for attempt in 0..200 {
            let cap = backoff_cap(attempt, max);
            assert!(cap >= previous && cap <= max, "attempt {attempt}");
            previous = cap;
        }
        assert_eq!(backoff_cap(u32::MAX, max), max);
        // A cap below the base wins from the first attempt.
        let tiny = Duration::from_millis(30);
        assert_eq!(backoff_cap(0, tiny), tiny);

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
}
