//! What the client threads count and hand back to the main thread: each
//! thread's `Report` (merged after `join`), failed handshakes by reason, and
//! the connections still open when a soak run ended.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{Value, json};

use crate::histogram::Histogram;

/// Why a connection never opened.
#[derive(Debug, Clone, Copy)]
pub enum Fail {
    Socket,
    Connect,
    Status(u16),
    Timeout,
    Closed,
    Protocol,
}

/// Why connections never opened.
#[derive(Default, Debug, Clone)]
pub struct Failures {
    /// socket/bind/connect(2) failed at once (e.g. out of fds or ports).
    pub socket: u64,
    /// The TCP connect failed (refused, reset).
    pub connect: u64,
    /// The server answered with this status instead of 101 (0: no valid answer).
    pub status: BTreeMap<u16, u64>,
    /// Not open within `--connect-timeout`.
    pub timeout: u64,
    /// Closed or reset by the server during the handshake.
    pub closed: u64,
    /// Unparsable or oversized frames or response head.
    pub protocol: u64,
}

impl Failures {
    pub fn add(&mut self, fail: Fail) {
        match fail {
            Fail::Socket => self.socket += 1,
            Fail::Connect => self.connect += 1,
            Fail::Status(code) => *self.status.entry(code).or_default() += 1,
            Fail::Timeout => self.timeout += 1,
            Fail::Closed => self.closed += 1,
            Fail::Protocol => self.protocol += 1,
        }
    }

    pub fn merge(&mut self, other: &Failures) {
        self.socket += other.socket;
        self.connect += other.connect;
        for (code, n) in &other.status {
            *self.status.entry(*code).or_default() += n;
        }
        self.timeout += other.timeout;
        self.closed += other.closed;
        self.protocol += other.protocol;
    }

    pub fn total(&self) -> u64 {
        self.socket
            + self.connect
            + self.status.values().sum::<u64>()
            + self.timeout
            + self.closed
            + self.protocol
    }

    /// For the JSON line: each reason, the statuses by code.
    pub fn to_json(&self) -> Value {
        let status: serde_json::Map<String, Value> = self
            .status
            .iter()
            .map(|(code, n)| (code.to_string(), (*n).into()))
            .collect();
        json!({
            "socket": self.socket,
            "connect": self.connect,
            "status": status,
            "timeout": self.timeout,
            "closed": self.closed,
            "protocol": self.protocol,
        })
    }

    /// For the table: `0`, or the total and the reasons that occurred.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (name, n) in [
            ("socket", self.socket),
            ("connect", self.connect),
            ("timeout", self.timeout),
            ("closed", self.closed),
            ("protocol", self.protocol),
        ] {
            if n > 0 {
                parts.push(format!("{name} {n}"));
            }
        }
        for (code, n) in &self.status {
            parts.push(format!("HTTP {code}: {n}"));
        }
        if parts.is_empty() {
            "0".to_string()
        } else {
            format!("{} ({})", self.total(), parts.join(", "))
        }
    }
}

/// What one thread saw; merged by the main thread.
#[derive(Default)]
pub struct Report {
    /// Publish-to-receive latency of bench messages, microseconds.
    pub latency: Histogram,
    /// Connect start to `connected` message, microseconds.
    pub handshake: Histogram,
    pub failures: Failures,
    pub opened: u64,
    pub delivered: u64,
    /// Open connections the server closed or reset.
    pub lost: u64,
    /// Connections the bench closed after their handshake (handshake preset:
    /// every cycle; soak: churn), cleanly or after the close timeout.
    pub cycles: u64,
    /// Closing connections the server did not close in time.
    pub close_timeouts: u64,
    /// Soak: draining connections that did not see their last message in time.
    pub drain_timeouts: u64,
    /// Soak: bench messages with `seq < w` (published around the open: excluded).
    pub before_open: u64,
    /// Bench messages after our close frame (excluded).
    pub after_close: u64,
    /// Text frames that were neither `connected` nor bench messages.
    pub other_frames: u64,
    pub pings: u64,
    /// Server frames that were masked (a server must not mask, RFC 6455 5.1).
    pub masked_frames: u64,
    pub first_open: Option<Instant>,
    pub last_open: Option<Instant>,
    pub last_receive: Option<Instant>,
    /// Connections open when the thread stopped.
    pub still_open: Vec<StillOpen>,
}

impl Report {
    pub fn merge(&mut self, other: Report) {
        self.latency.merge(&other.latency);
        self.handshake.merge(&other.handshake);
        self.failures.merge(&other.failures);
        self.opened += other.opened;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.cycles += other.cycles;
        self.close_timeouts += other.close_timeouts;
        self.drain_timeouts += other.drain_timeouts;
        self.before_open += other.before_open;
        self.after_close += other.after_close;
        self.other_frames += other.other_frames;
        self.pings += other.pings;
        self.masked_frames += other.masked_frames;
        self.first_open = min_opt(self.first_open, other.first_open);
        self.last_open = self.last_open.max(other.last_open);
        self.last_receive = self.last_receive.max(other.last_receive);
        self.still_open.extend(other.still_open);
    }
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A connection still open when the run ended.
#[derive(Debug, Clone, Copy)]
pub struct StillOpen {
    pub slot: usize,
    pub generation: u64,
    pub delivered: u64,
}
