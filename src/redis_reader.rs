//! The Redis reader thread: connect, subscribe, read, hand over.
//!
//! ```text
//!  Redis --PSUBSCRIBE <prefix>*  (pattern mode)
//!        --SUBSCRIBE <prefix><user> ... (channel mode: the users the loop asks for)
//!        --SSUBSCRIBE <prefix><user> ... (sharded mode: one link per cluster
//!          master, each user at the master of its channel's slot: [`sharded`])
//!      --> [redis-reader thread: its own mio Poll: the link's socket + a Waker]
//!      pubsub::Link: RESP frames parsed in the read buffer, no allocation
//!      strip the prefix, copy (user id, payload) into one `Published`
//!      --> handover::Handoff (bounded; one wake per batch) --> [event loop]
//!      channel mode: subscriptions::Changes in, Confirmations out
//! ```
//!
//! The thread owns one pub/sub link (`pubsub::link`), whose socket it waits
//! on in its own `mio::Poll` together with a `Waker` for subscription
//! changes. It never parses JSON and never waits on the event loop: it reads
//! a message, hands it over and reads on, so Redis never sees a slow
//! subscriber (Redis disconnects a pub/sub client whose output buffer passes
//! its limit, losing messages). Every wait on Redis is bounded in total:
//! connect, AUTH and the subscriptions within `io_wait`, and any command's
//! reply (a pong included) within `io_wait` of sending it, however the bytes
//! trickle in. It pings Redis once the link has carried no frame for
//! `ping_interval`; on any error it reconnects forever with exponential
//! backoff (capped by `REDIS_RECONNECT_MAX`) and full jitter, and subscribes
//! again to everything still wanted. A panic inside a session is caught: the
//! thread marks itself unsubscribed (so `/health` says 503), logs it, counts
//! it and reconnects. Health crosses to the loop thread through
//! [`RedisStatus`]; messages through [`crate::handover`].

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, warn};
use mio::{Events, Poll, Token, Waker};
use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, TlsCertificates};

mod sharded;

use crate::clock;
use crate::config::{RedisConfig, SubscribeMode};
use crate::handover::{
    self, Handoff, Inbox, Published, PushOutcome, QUEUE_BYTES_CAPACITY, QUEUE_CAPACITY,
};
use crate::logging::RateLimited;
use crate::message::user_id_from_channel;
use crate::pubsub::link::{Command, Event, Fill, Link, LinkError, Target};
use crate::pubsub::resp::SubscriptionKind;
use crate::redis_status::RedisStatus;
use crate::subscriptions::{self, Change, Changes, Confirmations, PerUser};

/// First reconnect delay cap; doubles per consecutive failure up to
/// `REDIS_RECONNECT_MAX`.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// A connection that stayed subscribed this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// ... or this many ping intervals when that is shorter: a session whose pings
/// Redis kept answering that long was healthy (with the default 5 s interval
/// both are 30 s).
const HEALTHY_PINGS: u32 = 6;
/// Longest the thread blocks (poll or sleep) before looking at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(250);
/// Bounds for the connect and reply waits derived from `ping_interval`.
const MIN_IO_WAIT: Duration = Duration::from_secs(1);
const MAX_IO_WAIT: Duration = Duration::from_secs(30);
/// At most one warning of each kind per period.
const WARN_PERIOD: Duration = Duration::from_secs(10);
/// Channels named in one SUBSCRIBE or UNSUBSCRIBE command: a connect storm
/// of 10,000 users is ten commands, written at once.
const CHANNELS_PER_COMMAND: usize = 1000;
/// Reads in a row before the thread looks at changes, the stop flag and the
/// deadlines again (a flood never ends in `WouldBlock`).
const READS_PER_TURN: usize = 64;
/// The poll tokens of the reader's own `Poll`.
const LINK_TOKEN: Token = Token(0);
const CHANGES_TOKEN: Token = Token(1);
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
    /// loop's mio::Waker (the hand-over and the confirmations wake it).
    /// Returns the per-user queues in `channel` mode. Fails if the thread or
    /// its poll cannot be started or the TLS settings are unusable
    /// (unreadable or invalid `REDIS_TLS_CA_FILE`); Redis being unreachable
    /// is not an error here, the thread keeps retrying.
    pub fn spawn(
        config: RedisConfig,
        waker: Arc<mio::Waker>,
    ) -> io::Result<(RedisReader, Inbox, Arc<RedisStatus>, Option<PerUser>)> {
        let target = Target::from_config(&config)?;
        let poll = Poll::new()?;
        let (per_user, loop_end) = if config.subscribe_mode.per_user() {
            // One waker per Poll (mio's rule): the reader's own.
            let reader_waker = Arc::new(Waker::new(poll.registry(), CHANGES_TOKEN)?);
            let (requests, changes, confirmations, confirmed) =
                subscriptions::channel(Arc::clone(&waker), reader_waker);
            (
                Some(Wanted::new(changes, confirmations)),
                Some(PerUser {
                    requests,
                    confirmed,
                }),
            )
        } else {
            (None, None)
        };
        let (handoff, inbox) = handover::channel(waker, QUEUE_CAPACITY, QUEUE_BYTES_CAPACITY);
        let status = Arc::new(RedisStatus::new());
        status.set_mode(config.subscribe_mode);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = ReaderThread::new(
            config,
            target,
            poll,
            per_user,
            handoff,
            Arc::clone(&status),
            Arc::clone(&stop),
        );
        let thread = std::thread::Builder::new()
            .name("redis-reader".into())
            .spawn(move || thread.run())?;
        Ok((RedisReader { stop, thread }, inbox, status, loop_end))
    }

    /// Asks the thread to stop (it notices within `STOP_CHECK`, 250 ms, or a
    /// TCP connect in progress); does not join.
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

/// One user's channel on the reader's side, in channel and sharded modes.
#[derive(Debug)]
struct UserChannel {
    /// The loop's last change for it was a Subscribe (false: an Unsubscribe
    /// whose reply is still to come; the entry goes with that reply).
    wanted: bool,
    /// The loop's number of that Subscribe, echoed in the confirmation.
    request: u64,
    /// (S)SUBSCRIBE and (S)UNSUBSCRIBE commands sent on its link and not
    /// answered. Only the reply to the last one tells where the channel
    /// stands: Redis answers in order, and a SUBSCRIBE's reply followed by an
    /// UNSUBSCRIBE's does not mean subscribed.
    in_flight: u32,
    /// Redis confirmed it on the current link and nothing was sent since.
    confirmed: bool,
}

/// What the loop's Subscribe asks of a channel.
enum SubscribeStep {
    /// Confirmed with nothing in flight: confirm again at once.
    ConfirmNow,
    /// A command is in flight: confirmed (with the new request) on its reply.
    AwaitReply,
    /// Not wanted so far: send a SUBSCRIBE (`sent` once it is queued).
    Send,
}

/// Where a channel stands after the reply to one of its commands.
enum Settled {
    /// More replies to come.
    InFlight,
    /// Unsubscribed: forget the entry.
    Forget,
    /// Newly confirmed: tell the loop, with `request`.
    Confirmed,
    /// Nothing changed.
    Unchanged,
}

impl UserChannel {
    /// A channel nobody has asked for yet (a Subscribe follows).
    fn new(request: u64) -> UserChannel {
        UserChannel {
            wanted: false,
            request,
            in_flight: 0,
            confirmed: false,
        }
    }

    /// The loop's Subscribe numbered `request`.
    fn subscribe(&mut self, request: u64) -> SubscribeStep {
        self.request = request;
        if !self.wanted {
            self.wanted = true;
            SubscribeStep::Send
        } else if self.confirmed && self.in_flight == 0 {
            SubscribeStep::ConfirmNow
        } else {
            SubscribeStep::AwaitReply
        }
    }

    /// The loop's Unsubscribe: None when it was not wanted, else whether it
    /// had been confirmed (send an UNSUBSCRIBE, or forget it without a link).
    fn unsubscribe(&mut self) -> Option<bool> {
        if !self.wanted {
            return None;
        }
        self.wanted = false;
        Some(std::mem::take(&mut self.confirmed))
    }

    /// A command for it was queued on its link.
    fn sent(&mut self) {
        self.in_flight += 1;
    }

    /// Redis answered one of its commands.
    fn answered(&mut self) -> Settled {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight > 0 {
            Settled::InFlight
        } else if !self.wanted {
            Settled::Forget
        } else if !self.confirmed {
            self.confirmed = true;
            Settled::Confirmed
        } else {
            Settled::Unchanged
        }
    }

    /// Its link is gone: nothing is confirmed or in flight any more. Returns
    /// whether it had been confirmed.
    fn link_gone(&mut self) -> bool {
        self.in_flight = 0;
        std::mem::take(&mut self.confirmed)
    }
}

/// Channel mode: the users whose channel the loop wants, and the queues
/// between the loop and this thread.
struct Wanted {
    changes: Changes,
    confirmations: Confirmations,
    users: HashMap<Box<str>, UserChannel>,
    /// Entries of `users` that are confirmed.
    confirmed: usize,
    /// Reused buffer for `Changes::take`.
    taken: Vec<Change>,
}

impl Wanted {
    fn new(changes: Changes, confirmations: Confirmations) -> Wanted {
        Wanted {
            changes,
            confirmations,
            users: HashMap::new(),
            confirmed: 0,
            taken: Vec::new(),
        }
    }

    /// A new link: nothing is confirmed or in flight on it, and what was only
    /// waiting for its UNSUBSCRIBE reply is gone with the old one.
    fn new_link(&mut self) {
        self.users.retain(|_, user| user.wanted);
        for user in self.users.values_mut() {
            user.link_gone();
        }
        self.confirmed = 0;
    }

    /// The users to subscribe on a new link (after `new_link`), each counted
    /// as in flight.
    fn resubscribe(&mut self) -> impl Iterator<Item = &str> {
        self.users.iter_mut().map(|(user, channel)| {
            channel.sent();
            &**user
        })
    }

    /// Applies the loop's changes in order. With a link, a user confirmed
    /// with nothing in flight is confirmed again at once, and the others
    /// become SUBSCRIBE and UNSUBSCRIBE commands (runs of one kind batched,
    /// the order kept). Without one only the wanted set changes: the next
    /// link subscribes it.
    fn apply_changes(&mut self, mut link: Option<&mut Link>, prefix: &str, status: &RedisStatus) {
        self.taken.clear();
        self.changes.take(&mut self.taken);
        let mut batch = Batch::new(prefix);
        for change in self.taken.drain(..) {
            match change {
                Change::Subscribe(user, request) => {
                    if !self.users.contains_key(&user) {
                        self.users.insert(user.clone(), UserChannel::new(request));
                    }
                    let Some(channel) = self.users.get_mut(&user) else {
                        continue;
                    };
                    match channel.subscribe(request) {
                        SubscribeStep::ConfirmNow => self.confirmations.push(&user, request),
                        SubscribeStep::AwaitReply => {}
                        SubscribeStep::Send => {
                            if let Some(link) = link.as_deref_mut() {
                                channel.sent();
                                batch.add(link, status, SubscriptionKind::Subscribe, &user);
                            }
                        }
                    }
                }
                Change::Unsubscribe(user) => {
                    let Some(channel) = self.users.get_mut(&user) else {
                        continue;
                    };
                    let Some(was_confirmed) = channel.unsubscribe() else {
                        continue;
                    };
                    self.confirmed -= usize::from(was_confirmed);
                    match link.as_deref_mut() {
                        Some(link) => {
                            channel.sent();
                            batch.add(link, status, SubscriptionKind::Unsubscribe, &user);
                        }
                        None => {
                            self.users.remove(&user);
                        }
                    }
                }
            }
        }
        if let Some(link) = link {
            batch.finish(link, status);
        }
        status.set_subscriptions(self.confirmed as u64);
    }

    /// Redis answered a SUBSCRIBE or UNSUBSCRIBE of `user`'s channel. Once
    /// the last command sent for it is answered, a wanted channel is
    /// confirmed (the loop hears it with the request it asked last) and an
    /// unwanted one is forgotten.
    fn answered(&mut self, user: &str, status: &RedisStatus) {
        let Some(channel) = self.users.get_mut(user) else {
            return; // a reply from before a new link's `new_link`: nothing to do
        };
        match channel.answered() {
            Settled::Forget => {
                self.users.remove(user);
            }
            Settled::Confirmed => {
                self.confirmed += 1;
                status.set_subscriptions(self.confirmed as u64);
                self.confirmations.push(user, channel.request);
            }
            Settled::InFlight | Settled::Unchanged => {}
        }
    }
}

/// Builds (UN)SUBSCRIBE commands of up to `CHANNELS_PER_COMMAND` channels
/// and queues them on the link.
struct Batch<'a> {
    prefix: &'a str,
    current: Option<(SubscriptionKind, redis::Cmd, usize)>,
    /// Reused for `<prefix><user>`.
    channel: String,
}

impl<'a> Batch<'a> {
    fn new(prefix: &'a str) -> Batch<'a> {
        Batch {
            prefix,
            current: None,
            channel: String::new(),
        }
    }

    fn add(&mut self, link: &mut Link, status: &RedisStatus, kind: SubscriptionKind, user: &str) {
        if self
            .current
            .as_ref()
            .is_some_and(|(k, _, n)| *k != kind || *n >= CHANNELS_PER_COMMAND)
        {
            self.finish(link, status);
        }
        let (_, cmd, channels) = self
            .current
            .get_or_insert_with(|| (kind, redis::cmd(kind.command()), 0));
        self.channel.clear();
        self.channel.push_str(self.prefix);
        self.channel.push_str(user);
        cmd.arg(self.channel.as_str());
        *channels += 1;
    }

    fn finish(&mut self, link: &mut Link, status: &RedisStatus) {
        if let Some((kind, cmd, channels)) = self.current.take() {
            link.command(&cmd, Command::Subscription(kind), channels);
            match kind {
                SubscriptionKind::Unsubscribe => status.count_unsubscribes(channels as u64),
                _ => status.count_subscribes(channels as u64),
            }
        }
    }
}

/// What the thread owns.
struct ReaderThread {
    config: RedisConfig,
    target: Target,
    /// The link's socket and, in channel mode, the changes' waker.
    poll: Poll,
    events: Events,
    /// Channel mode only.
    wanted: Option<Wanted>,
    handoff: Handoff,
    status: Arc<RedisStatus>,
    stop: Arc<AtomicBool>,
    /// `<escaped prefix>*`.
    pattern: String,
    /// `host:port`, for logs.
    addr: String,
    /// The bound of connect + AUTH + subscribe, and of every reply.
    io_wait: Duration,
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
        target: Target,
        poll: Poll,
        wanted: Option<Wanted>,
        handoff: Handoff,
        status: Arc<RedisStatus>,
        stop: Arc<AtomicBool>,
    ) -> ReaderThread {
        let ping_interval = config.ping_interval.max(Duration::from_millis(1));
        ReaderThread {
            pattern: subscribe_pattern(&config.channel_prefix),
            addr: match config.subscribe_mode {
                SubscribeMode::Sharded => crate::cluster::seeds(&config)
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                _ => target.addr(),
            },
            io_wait: ping_interval.clamp(MIN_IO_WAIT, MAX_IO_WAIT),
            healthy_after: HEALTHY_AFTER.min(ping_interval.saturating_mul(HEALTHY_PINGS)),
            config,
            target,
            poll,
            events: Events::with_capacity(16),
            wanted,
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
        self.status.set_subscriptions(0);
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
                self.status.set_subscriptions(0);
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

    /// Connects, subscribes (everything at once: AUTH, SELECT, the
    /// subscriptions and a PING leave in one write), and reads until the
    /// connection fails or the thread is asked to stop.
    fn session(&mut self) -> SessionEnd {
        if self.config.subscribe_mode == SubscribeMode::Sharded {
            return sharded::session(self);
        }
        if let Subscription::Lost { attempts, .. } = &mut self.subscription {
            *attempts += 1;
        }
        let connect_deadline = Instant::now() + self.io_wait;
        if let Some(wanted) = &mut self.wanted {
            wanted.new_link();
            wanted.apply_changes(None, &self.config.channel_prefix, &self.status);
        }
        let mut link = match Link::connect(
            &self.target,
            self.poll.registry(),
            LINK_TOKEN,
            connect_deadline,
        ) {
            Ok(link) => link,
            Err(e) => return SessionEnd::ConnectFailed(self.describe(&e)),
        };
        match &mut self.wanted {
            None => link.command(
                redis::cmd("PSUBSCRIBE").arg(&self.pattern),
                Command::Subscription(SubscriptionKind::Psubscribe),
                1,
            ),
            Some(wanted) => {
                let mut batch = Batch::new(&self.config.channel_prefix);
                for user in wanted.resubscribe() {
                    batch.add(&mut link, &self.status, SubscriptionKind::Subscribe, user);
                }
                batch.finish(&mut link, &self.status);
                if !matches!(self.subscription, Subscription::Never) {
                    self.status
                        .count_resubscribes_after_reconnect(wanted.users.len() as u64);
                }
            }
        }
        // Its pong comes after every confirmation above: the link is ready then.
        link.ping();
        let end = self.drive(&mut link, connect_deadline);
        link.deregister(self.poll.registry());
        self.status.set_subscriptions(0);
        end
    }

    /// The session's loop: flush, check the deadlines, poll, take changes,
    /// read and handle what was read.
    fn drive(&mut self, link: &mut Link, connect_deadline: Instant) -> SessionEnd {
        let mut ready = false;
        let mut last_frame = Instant::now();
        // Edge-triggered: read until WouldBlock before waiting again.
        let mut read_pending = true;
        let mut changes_pending = false;
        loop {
            if changes_pending {
                changes_pending = false;
                if let Some(wanted) = &mut self.wanted {
                    wanted.apply_changes(Some(link), &self.config.channel_prefix, &self.status);
                }
            }
            if let Err(e) = link.flush(self.poll.registry()) {
                return self.failed(ready, self.describe(&e));
            }
            let now = Instant::now();
            let checked = check_deadlines(
                link,
                LinkTimes {
                    ready,
                    connect_deadline,
                    last_frame,
                },
                self.io_wait,
                self.config.ping_interval,
                now,
                now + STOP_CHECK,
            );
            let wake_at = match checked {
                Err(error) => return self.failed(ready, error),
                // Flush the ping before waiting.
                Ok(Deadlines::Pinged) => continue,
                Ok(Deadlines::WakeAt(at)) => at,
            };
            let timeout = if read_pending || link.has_input() {
                Duration::ZERO
            } else {
                wake_at.saturating_duration_since(now)
            };
            match self.poll.poll(&mut self.events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.failed(ready, format!("poll: {e}")),
            }
            if self.stopping() {
                return SessionEnd::Stopped;
            }
            for event in self.events.iter() {
                match event.token() {
                    LINK_TOKEN => read_pending |= event.is_readable() || event.is_read_closed(),
                    CHANGES_TOKEN => changes_pending = true,
                    _ => {}
                }
            }
            if !read_pending {
                continue;
            }
            read_pending = false;
            for turn in 0..READS_PER_TURN {
                match link.fill() {
                    Ok(Fill::Read(_)) => {}
                    Ok(Fill::WouldBlock) => break,
                    Err(e) => return self.failed(ready, self.describe(&e)),
                }
                // One clock read per socket read: the read time of every
                // message it completed, for the delivery latency (README
                // "Endpoints"), and the link's last sign of life; and one
                // wall-clock read for the last message's time (`/health`).
                let read_at = Instant::now();
                let read_unix_millis = clock::unix_millis(SystemTime::now());
                let mut frames = 0u32;
                loop {
                    let event = match link.next_event() {
                        Ok(Some(event)) => event,
                        Ok(None) => break,
                        Err(e) => return self.failed(ready, self.describe(&e)),
                    };
                    frames += 1;
                    match event {
                        Event::Message { channel, payload } => {
                            if let Some(end) =
                                self.hand_over(channel, payload, read_at, read_unix_millis)
                            {
                                return end;
                            }
                        }
                        Event::Subscription {
                            kind,
                            channel,
                            solicited: _,
                        } => self.on_subscription(kind, channel),
                        Event::Pong { round_trip } => {
                            self.status.set_ping(round_trip);
                            if !ready {
                                ready = true;
                                self.subscribed();
                            }
                        }
                        Event::Done(_) => {}
                    }
                }
                if frames > 0 {
                    last_frame = read_at;
                }
                if turn + 1 == READS_PER_TURN {
                    read_pending = true;
                }
            }
        }
    }

    /// A confirmation (or end) of a subscription.
    fn on_subscription(&mut self, kind: SubscriptionKind, channel: Option<&[u8]>) {
        match kind {
            SubscriptionKind::Psubscribe => self.status.set_subscriptions(1),
            SubscriptionKind::Subscribe | SubscriptionKind::Unsubscribe => {
                let prefix = self.config.channel_prefix.as_bytes();
                let user = channel
                    .and_then(|c| c.strip_prefix(prefix))
                    .and_then(|u| std::str::from_utf8(u).ok());
                if let (Some(wanted), Some(user)) = (&mut self.wanted, user) {
                    wanted.answered(user, &self.status);
                }
            }
            _ => {}
        }
    }

    /// The session ends: before the link was ready it is a failed connect,
    /// after it a lost subscription (recorded here, scrubbed).
    fn failed(&mut self, ready: bool, error: String) -> SessionEnd {
        if !ready {
            return SessionEnd::ConnectFailed(error);
        }
        // The error first, so /health never shows "disconnected" without a reason.
        let error = scrub(error, self.config.password.as_deref());
        self.status.set_error(error.clone());
        self.status.set_subscriptions(0);
        self.status.set_subscribed(false);
        self.lost_subscription();
        SessionEnd::Lost(error)
    }

    /// A link error as text, naming the variables to check when Redis
    /// refused the credentials (the password itself is never part of it).
    fn describe(&self, e: &LinkError) -> String {
        match e {
            LinkError::Refused { command, error } if e.is_auth_refusal() => {
                format!("{command}: {}: {error}", self.credentials_hint())
            }
            _ => e.to_string(),
        }
    }

    /// Marks the subscription in place and logs it: the start-up line the
    /// first time, the recovery (how long it was lost, how many attempts) after.
    fn subscribed(&mut self) {
        match std::mem::replace(&mut self.subscription, Subscription::Active) {
            Subscription::Never => match &self.wanted {
                None => info!(
                    redis = self.addr.as_str(),
                    pattern = self.pattern.as_str();
                    "subscribed to Redis"
                ),
                Some(wanted) => info!(
                    redis = self.addr.as_str(),
                    mode = self.config.subscribe_mode.as_str(),
                    channels = wanted.users.len();
                    "subscribed to Redis"
                ),
            },
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

    /// Strips the prefix and queues the message, read at `read_at`
    /// (`read_unix_millis` on the wall clock), for the loop. Returns Some when
    /// the thread should end.
    fn hand_over(
        &mut self,
        channel: &[u8],
        payload: &[u8],
        read_at: Instant,
        read_unix_millis: u64,
    ) -> Option<SessionEnd> {
        self.status.count_received(read_unix_millis);
        let prefix = self.config.channel_prefix.as_str();
        // The one UTF-8 check: the user id crosses to the loop as a `str`.
        let name = std::str::from_utf8(channel).ok();
        #[cfg(debug_assertions)]
        if let Some(name) = name
            && self.panic_on_channel.as_deref() == Some(name)
        {
            panic!("test fault: message on channel {name:?} ({TEST_PANIC_CHANNEL})");
        }
        let Some(user_id) = name.and_then(|name| user_id_from_channel(name, prefix)) else {
            self.status.count_dropped_invalid_channel();
            if let Some(suppressed) = self.warn_bad_channel.check(Instant::now()) {
                warn!(
                    channel:% = String::from_utf8_lossy(channel),
                    prefix,
                    suppressed;
                    "Redis message dropped: no user id after the channel prefix"
                );
            }
            return None;
        };
        let read_at = self.handoff.stamp(read_at);
        match self.handoff.push(Published::new(user_id, payload, read_at)) {
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

/// What a link's deadlines say (see [`check_deadlines`]).
enum Deadlines {
    /// Nothing is due: wait until this instant at the latest.
    WakeAt(Instant),
    /// A ping was queued: flush it before waiting.
    Pinged,
}

/// The instants a link's deadlines are measured from.
struct LinkTimes {
    /// The link answered its first ping (everything sent at connect is answered).
    ready: bool,
    connect_deadline: Instant,
    last_frame: Instant,
}

/// One link's deadlines at `now` (the one-link session and each link of the
/// sharded one): connected and subscribed within `io_wait`, every reply
/// within `io_wait` of its command, whatever trickles in meanwhile, and a ping
/// once the link carried no frame for `ping_interval` (not under a flood:
/// messages prove the link alive, and a pong queued behind a backlog would
/// measure the backlog; a Redis that freezes mid-flood goes quiet, so it is
/// pinged and caught). `Err` names the deadline that passed.
fn check_deadlines(
    link: &mut Link,
    times: LinkTimes,
    io_wait: Duration,
    ping_interval: Duration,
    now: Instant,
    mut wake_at: Instant,
) -> Result<Deadlines, String> {
    if !times.ready {
        if now >= times.connect_deadline {
            return Err(format!("not subscribed within {} ms", io_wait.as_millis()));
        }
        wake_at = wake_at.min(times.connect_deadline);
    }
    if let Some((command, sent)) = link.oldest_unanswered() {
        let due = sent + io_wait;
        if now >= due {
            let (name, waited) = (command.name(), io_wait.as_millis());
            return Err(format!("{name}: no reply within {waited} ms"));
        }
        wake_at = wake_at.min(due);
    }
    if times.ready && !link.ping_in_flight() {
        let due = times.last_frame + ping_interval;
        if now >= due {
            link.ping();
            return Ok(Deadlines::Pinged);
        }
        wake_at = wake_at.min(due);
    }
    Ok(Deadlines::WakeAt(wake_at))
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

#[cfg(test)]
mod tests {
    use super::*;

    // The tests that need a real Redis are in tests/redis_reader.rs.

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
