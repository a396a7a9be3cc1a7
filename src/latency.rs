//! Delivery latency (`ws_notify_delivery_latency_seconds`): the time from the
//! Redis reader taking a message off its connection to the event loop handing
//! the message's frame to a client's socket, one observation per delivery (one
//! message, one connection).
//!
//! ```text
//!  [redis-reader]  Instant::now() it already takes per message -> Stamp in `Published`
//!  [event loop]    the Stamp rides with the frame in the OutboundQueue; one
//!                  Instant::now() per write system call that completes a
//!                  delivery; every delivery it completes is observed with it
//! ```
//!
//! A `Stamp` is the microseconds since the hand-over's `Epoch` in a `u32`, so a
//! queued delivery stays small; it wraps after 71 minutes, and a latency is the
//! wrapping difference of two stamps, right for any latency under 35 minutes
//! (the queues' bounds keep a delivery far younger). The histogram is owned by
//! the event loop: plain integers, no lock, no allocation per observation.

use std::fmt::Write as _;
use std::time::Instant;

/// The time base both ends stamp against: created with the hand-over, before
/// the reader thread starts.
#[derive(Clone, Copy, Debug)]
pub struct Epoch(Instant);

impl Epoch {
    pub fn new() -> Epoch {
        Epoch(Instant::now())
    }

    /// `at` as a stamp (an instant before the epoch is the epoch).
    pub fn stamp(self, at: Instant) -> Stamp {
        let since = at.saturating_duration_since(self.0);
        // Truncated to 32 bits on purpose: see the module comment.
        let micros = since
            .as_secs()
            .wrapping_mul(1_000_000)
            .wrapping_add(u64::from(since.subsec_micros()));
        Stamp(micros as u32)
    }
}

impl Default for Epoch {
    fn default() -> Epoch {
        Epoch::new()
    }
}

/// A monotonic instant as microseconds since the `Epoch`, modulo 2^32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamp(u32);

impl Stamp {
    /// Microseconds from `self` to `later`. Zero when `later` is in fact
    /// earlier: the two threads read the clock independently, and the loop's
    /// turn time can precede the reader's stamp of a message it drains.
    pub fn micros_until(self, later: Stamp) -> u32 {
        let elapsed = later.0.wrapping_sub(self.0);
        if elapsed > i32::MAX as u32 {
            0
        } else {
            elapsed
        }
    }
}

#[cfg(test)]
impl Stamp {
    /// `micros` after `self`, for tests elsewhere.
    pub fn later(self, micros: u32) -> Stamp {
        Stamp(self.0.wrapping_add(micros))
    }
}

/// Upper bounds of the finite buckets, in microseconds, with their `le` labels
/// (seconds). The last bucket, `+Inf`, is implicit.
const BUCKETS: [(u32, &str); 14] = [
    (50, "0.00005"),
    (100, "0.0001"),
    (250, "0.00025"),
    (500, "0.0005"),
    (1_000, "0.001"),
    (2_500, "0.0025"),
    (5_000, "0.005"),
    (10_000, "0.01"),
    (25_000, "0.025"),
    (50_000, "0.05"),
    (100_000, "0.1"),
    (250_000, "0.25"),
    (500_000, "0.5"),
    (1_000_000, "1"),
];

/// The histogram, with the epoch the loop stamps its writes against.
#[derive(Default)]
pub struct DeliveryLatency {
    epoch: Epoch,
    /// Observations per bucket (not cumulative); the last is above 1 s.
    counts: [u64; BUCKETS.len() + 1],
    sum_micros: u64,
}

impl DeliveryLatency {
    /// A histogram stamping against `epoch` (the hand-over's).
    pub fn new(epoch: Epoch) -> DeliveryLatency {
        DeliveryLatency {
            epoch,
            ..DeliveryLatency::default()
        }
    }

    /// The current time as a stamp: one clock read (a vDSO call, no system call).
    pub fn now(&self) -> Stamp {
        self.epoch.stamp(Instant::now())
    }

    /// One delivery read from Redis at `read_at` and written at `written_at`.
    pub fn observe(&mut self, read_at: Stamp, written_at: Stamp) {
        let micros = read_at.micros_until(written_at);
        // Most deliveries fall in the first buckets: a short linear scan.
        let bucket = BUCKETS
            .iter()
            .position(|&(bound, _)| micros <= bound)
            .unwrap_or(BUCKETS.len());
        self.counts[bucket] += 1;
        self.sum_micros += u64::from(micros);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The Prometheus text of the histogram (`_bucket{le}`, cumulative, `_sum`
    /// in seconds, `_count`).
    pub fn render(&self, out: &mut String) {
        const NAME: &str = "ws_notify_delivery_latency_seconds";
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "# HELP {NAME} From reading a message from Redis to writing its frame to a client's socket, per delivery.\n\
             # TYPE {NAME} histogram"
        );
        let mut cumulative = 0;
        for (&(_, le), count) in BUCKETS.iter().zip(self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{NAME}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(
            out,
            "{NAME}_bucket{{le=\"+Inf\"}} {count}\n{NAME}_sum {}\n{NAME}_count {count}",
            self.sum_micros as f64 / 1e6
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_wrap_and_a_reversed_pair_is_zero() {
        let epoch = Epoch::new();
        let at = |micros: u64| epoch.stamp(epoch.0 + Duration::from_micros(micros));
        assert_eq!(at(10).micros_until(at(260)), 250);
        // Across the 32-bit wrap (71.6 minutes after the epoch).
        let wrap = 1u64 << 32;
        assert_eq!(at(wrap - 100).micros_until(at(wrap + 400)), 500);
        assert_eq!(at(500).micros_until(at(400)), 0, "clock read out of order");
        if let Some(before) = epoch.0.checked_sub(Duration::from_secs(1)) {
            assert_eq!(epoch.stamp(before), Stamp(0));
        }
    }

    #[test]
    fn buckets_are_inclusive_upper_bounds_and_cumulative() {
        let mut h = DeliveryLatency::default();
        let zero = Stamp(0);
        for micros in [0, 50, 51, 1_000, 1_000_000, 1_000_001, 30_000_000] {
            h.observe(zero, Stamp(micros));
        }
        assert_eq!(h.count(), 7);
        let mut text = String::new();
        h.render(&mut text);
        for line in [
            "ws_notify_delivery_latency_seconds_bucket{le=\"0.00005\"} 2\n",
            "ws_notify_delivery_latency_seconds_bucket{le=\"0.0001\"} 3\n",
            "ws_notify_delivery_latency_seconds_bucket{le=\"0.001\"} 4\n",
            "ws_notify_delivery_latency_seconds_bucket{le=\"0.5\"} 4\n",
            "ws_notify_delivery_latency_seconds_bucket{le=\"1\"} 5\n",
            "ws_notify_delivery_latency_seconds_bucket{le=\"+Inf\"} 7\n",
            "ws_notify_delivery_latency_seconds_sum 32.001102\n",
            "ws_notify_delivery_latency_seconds_count 7\n",
            "# TYPE ws_notify_delivery_latency_seconds histogram\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert_eq!(text.lines().count(), 2 + 15 + 2);
    }
}
