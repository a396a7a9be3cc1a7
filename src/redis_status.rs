//! The health of the Redis side: written by the reader thread, read by
//! `/health` and `/metrics` on the event loop thread. Atomics, plus a mutex
//! only for the rare error text; nothing here is touched per message except
//! the `received` counter and the last message time.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use crate::config::SubscribeMode;

/// `u64::MAX` stands for "none" in the optional atomics below.
const NONE: u64 = u64::MAX;

/// Health of the Redis side (see the module doc).
#[derive(Debug)]
pub struct RedisStatus {
    subscribed: AtomicBool,
    /// Last ping round trip in microseconds; `NONE` while not connected.
    ping_micros: AtomicU64,
    pings: AtomicU64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    reader_restarts: AtomicU64,
    received: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_invalid_channel: AtomicU64,
    /// `NONE` until the first message.
    last_message_unix_millis: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// `SubscribeMode` as its index (pattern 0, channel 1, sharded 2).
    mode: AtomicU8,
    /// Channels (or the pattern) Redis confirmed and the reader still holds.
    subscriptions: AtomicU64,
    /// Channels sent in SUBSCRIBE / UNSUBSCRIBE commands.
    subscribes: AtomicU64,
    unsubscribes: AtomicU64,
    /// Channels subscribed again after a reconnect.
    resubscribes_reconnect: AtomicU64,
    /// Sharded mode: channels subscribed again at a new owner after Redis
    /// dropped them because their slot moved.
    resubscribes_migration: AtomicU64,
    /// Sharded mode: each master's link (replaced as a whole when it changes).
    nodes: Mutex<Vec<NodeHealth>>,
}

/// Sharded mode: one master's link, for `/health` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHealth {
    /// `host:port`.
    pub node: String,
    /// The link is up and answered its first ping.
    pub connected: bool,
    /// Channels Redis confirmed on this link.
    pub subscriptions: u64,
    /// The last ping round trip on this link.
    pub ping: Option<Duration>,
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
            reader_restarts: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            dropped_invalid_channel: AtomicU64::new(0),
            last_message_unix_millis: AtomicU64::new(NONE),
            last_error: Mutex::new(None),
            mode: AtomicU8::new(0),
            subscriptions: AtomicU64::new(0),
            subscribes: AtomicU64::new(0),
            unsubscribes: AtomicU64::new(0),
            resubscribes_reconnect: AtomicU64::new(0),
            resubscribes_migration: AtomicU64::new(0),
            nodes: Mutex::new(Vec::new()),
        }
    }

    /// How the reader subscribes (`REDIS_SUBSCRIBE_MODE`).
    pub fn mode(&self) -> SubscribeMode {
        match self.mode.load(Ordering::Relaxed) {
            1 => SubscribeMode::Channel,
            2 => SubscribeMode::Sharded,
            _ => SubscribeMode::Pattern,
        }
    }

    /// Subscriptions Redis confirmed and the reader holds: 1 for the pattern,
    /// the users' channels in `channel` mode.
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Channels sent in SUBSCRIBE commands (resubscribes included).
    pub fn subscribes(&self) -> u64 {
        self.subscribes.load(Ordering::Relaxed)
    }

    /// Channels sent in UNSUBSCRIBE commands.
    pub fn unsubscribes(&self) -> u64 {
        self.unsubscribes.load(Ordering::Relaxed)
    }

    /// Channels subscribed again after a reconnect.
    pub fn resubscribes_after_reconnect(&self) -> u64 {
        self.resubscribes_reconnect.load(Ordering::Relaxed)
    }

    /// Connected, the subscriptions in place when the link came up confirmed
    /// by Redis, and the first ping answered.
    /// Sharded mode: channels subscribed again after their slot moved.
    pub fn resubscribes_after_migration(&self) -> u64 {
        self.resubscribes_migration.load(Ordering::Relaxed)
    }

    /// Sharded mode: each master's link (empty in the other modes).
    pub fn nodes(&self) -> Vec<NodeHealth> {
        self.nodes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

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

    /// Sessions of the reader thread that ended in a panic and were restarted.
    pub fn reader_restarts(&self) -> u64 {
        self.reader_restarts.load(Ordering::Relaxed)
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

    pub(crate) fn set_subscribed(&self, subscribed: bool) {
        self.subscribed.store(subscribed, Ordering::Release);
        if !subscribed {
            self.ping_micros.store(NONE, Ordering::Relaxed);
        }
    }

    pub(crate) fn set_mode(&self, mode: SubscribeMode) {
        let index = match mode {
            SubscribeMode::Pattern => 0,
            SubscribeMode::Channel => 1,
            SubscribeMode::Sharded => 2,
        };
        self.mode.store(index, Ordering::Relaxed);
    }

    pub(crate) fn set_subscriptions(&self, held: u64) {
        self.subscriptions.store(held, Ordering::Relaxed);
    }

    pub(crate) fn count_subscribes(&self, channels: u64) {
        self.subscribes.fetch_add(channels, Ordering::Relaxed);
    }

    pub(crate) fn count_unsubscribes(&self, channels: u64) {
        self.unsubscribes.fetch_add(channels, Ordering::Relaxed);
    }

    pub(crate) fn count_resubscribes_after_migration(&self, channels: u64) {
        self.resubscribes_migration
            .fetch_add(channels, Ordering::Relaxed);
    }

    pub(crate) fn set_nodes(&self, nodes: Vec<NodeHealth>) {
        *self
            .nodes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = nodes;
    }

    pub(crate) fn count_resubscribes_after_reconnect(&self, channels: u64) {
        self.resubscribes_reconnect
            .fetch_add(channels, Ordering::Relaxed);
    }

    pub(crate) fn set_ping(&self, round_trip: Duration) {
        let micros = u64::try_from(round_trip.as_micros()).unwrap_or(NONE - 1);
        self.ping_micros
            .store(micros.min(NONE - 1), Ordering::Relaxed);
        self.pings.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_error(&self, error: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(error);
    }

    pub(crate) fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_connect_failure(&self) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_reader_restart(&self) {
        self.reader_restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// A message was read from Redis at `unix_millis`.
    pub(crate) fn count_received(&self, unix_millis: u64) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.last_message_unix_millis
            .store(unix_millis.min(NONE - 1), Ordering::Relaxed);
    }

    pub(crate) fn count_dropped_queue_full(&self) {
        self.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_dropped_invalid_channel(&self) {
        self.dropped_invalid_channel.fetch_add(1, Ordering::Relaxed);
    }
}

fn some_unless_none(value: u64) -> Option<u64> {
    (value != NONE).then_some(value)
}
