//! The soak preset: hold N connections for `--duration`, close and
//! reopen `--churn` of them every second, publish at a steady `--rate` to
//! users that have connections, and check that every expected message
//! arrived and that the server's RSS and fd count come back to their
//! starting band.
//!
//! ```text
//!  main thread (coordinator): every second pick K open slots -> block their users -> Close
//!        │  publish ~1 ms batches to open, unblocked users; ledger of who should get what
//!        ▼ commands                                  ▲ events: Opened{w}, CloseSent, Done
//!  client thread 0..T: mio Poll per thread; drain -> close -> reconnect the slot
//! ```
//!
//! # What is expected, exactly
//!
//! Message `seq` goes to one user (chosen by the coordinator at publish time);
//! the connections of that user that should receive it are exactly those
//! that were open before it was published and are still open after the
//! server has delivered it. Both ends are made exact rather than guessed from
//! clocks:
//!
//! - Open side: a connection reads `w = issued` when its `connected` message
//!   arrives, where `issued` is stored (SeqCst) before each pipeline is sent.
//!   The server registers a connection in its hub before it writes
//!   `connected`, so every `seq >= w` reached Redis, and the gateway, after
//!   the registration: expected. Messages `seq < w` may or may not arrive
//!   (published around the open): excluded from both sides.
//! - Close side: when slot `i` is chosen for churn, its user is *blocked* —
//!   the coordinator, which is also the only publisher, publishes nothing to
//!   that user until the close frame is out — and the connection is told the
//!   last `seq` published to its user. It waits (at most `--close-timeout`)
//!   until it has received that one (delivery is in order: Redis to the
//!   gateway over one subscription, the gateway to each connection through a
//!   FIFO queue), then sends its masked close frame. So the connection
//!   expects exactly the messages to its user with `w <= seq < cut`, where
//!   `cut` is `issued` when the user was blocked, and nothing after its close
//!   frame is counted. Other connections of the blocked user simply get no
//!   messages meanwhile (none are published to the user); the publish rate
//!   stays steady because the next eligible user takes the message.
//! - A connection the server ends by itself (counted as lost) expects the
//!   messages up to `issued` when the loss was noticed.
//!
//! The coordinator keeps, per user, the ascending list of `seq`s published to
//! it, so a connection's expected count is two binary searches; each
//! connection reports its own delivered count, so a shortfall (missing) and a
//! surplus (duplicates) are both seen per connection, not netted out.

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::args::Options;
use crate::client::{self, Close, Ended, Event, Mode, Report, Shared, StillOpen};
use crate::publish::{self, Publisher};
use crate::report::{self, CpuMark, CpuSpan, Table};
use crate::sock;

/// Counters whose change over the run is reported.
const DELTA_SERIES: [&str; 5] = [
    "ws_notify_messages_",
    "ws_notify_disconnects_total",
    "ws_notify_connections_",
    "ws_notify_redis_reconnects_total",
    "ws_notify_accept_fd_exhausted_total",
];
/// The server's own count of open connections, read with every sample.
const CONNECTIONS_GAUGE: &str = "ws_notify_connections";
/// Interval of the churn ticks.
const CHURN_TICK: Duration = Duration::from_secs(1);
/// Longest the coordinator sleeps between looks at its events and clocks.
const MAX_NAP: Duration = Duration::from_millis(2);
/// Connecting the first N: give up when none opened for this long.
const START_STALL: Duration = Duration::from_secs(30);
/// After the run: how long to wait for churned slots to be open again.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);
/// After the bench dropped its connections: wait before the last sample.
const AFTER_DISCONNECT: Duration = Duration::from_secs(2);

/// The coordinator's view of one connection slot.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// Connecting, or between a close and the reconnect.
    Idle,
    Open {
        generation: u64,
        w: u64,
    },
    /// Chosen for churn: its user is blocked until the close frame is out.
    Draining {
        generation: u64,
        w: u64,
        cut: u64,
    },
    /// Close frame sent; waiting for `Done`.
    Closing {
        generation: u64,
        w: u64,
        cut: u64,
    },
}

/// Who has which connections, who may be published to, and the delivered
/// and expected counts of connections that have ended.
struct Ledger {
    slots: Vec<Slot>,
    /// Open (not churning) connections per user, as the coordinator knows them.
    user_open: Vec<u32>,
    /// Churning connections per user whose close frame is not out yet.
    blocked: Vec<u32>,
    /// `seq`s published to each user, ascending.
    seqs: Vec<Vec<u64>>,
    /// Slots in `Slot::Open`.
    open: usize,
    expected: u64,
    delivered: u64,
    missing: u64,
    extra: u64,
    /// Connections that got fewer messages than expected.
    short_connections: u64,
    /// Events that did not match the slot's state (a bench bug if not 0).
    anomalies: u64,
}

impl Ledger {
    fn new(connections: usize, users: usize) -> Ledger {
        Ledger {
            slots: vec![Slot::Idle; connections],
            user_open: vec![0; users],
            blocked: vec![0; users],
            seqs: vec![Vec::new(); users],
            open: 0,
            expected: 0,
            delivered: 0,
            missing: 0,
            extra: 0,
            short_connections: 0,
            anomalies: 0,
        }
    }

    fn user(&self, slot: usize) -> usize {
        slot % self.user_open.len()
    }

    /// Messages to `user` with `from <= seq < to`.
    fn count(&self, user: usize, from: u64, to: u64) -> u64 {
        if to <= from {
            return 0;
        }
        let seqs = &self.seqs[user];
        (seqs.partition_point(|&s| s < to) - seqs.partition_point(|&s| s < from)) as u64
    }

    /// Books an ended connection: expected `w <= seq < end`, got `delivered`.
    fn settle(&mut self, user: usize, w: u64, end: u64, delivered: u64) {
        let expected = self.count(user, w, end);
        self.expected += expected;
        self.delivered += delivered;
        if delivered < expected {
            self.missing += expected - delivered;
            self.short_connections += 1;
        } else {
            self.extra += delivered - expected;
        }
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Opened {
                slot,
                generation,
                w,
            } => {
                if !matches!(self.slots[slot], Slot::Idle) {
                    self.anomalies += 1;
                }
                let user = self.user(slot);
                self.slots[slot] = Slot::Open { generation, w };
                self.user_open[user] += 1;
                self.open += 1;
            }
            Event::CloseSent { slot, generation } => match self.slots[slot] {
                Slot::Draining {
                    generation: g,
                    w,
                    cut,
                } if g == generation => {
                    let user = self.user(slot);
                    self.blocked[user] -= 1;
                    self.slots[slot] = Slot::Closing { generation, w, cut };
                }
                _ => self.anomalies += 1,
            },
            Event::Done {
                slot,
                generation,
                delivered,
                ended,
            } => {
                let user = self.user(slot);
                let lost_at = match ended {
                    Ended::Lost { issued } => issued,
                    Ended::Churned => u64::MAX,
                };
                let (g, w, end) = match self.slots[slot] {
                    Slot::Open { generation: g, w } => {
                        self.user_open[user] -= 1;
                        self.open -= 1;
                        (g, w, lost_at)
                    }
                    Slot::Draining {
                        generation: g,
                        w,
                        cut,
                    } => {
                        self.blocked[user] -= 1;
                        (g, w, cut.min(lost_at))
                    }
                    Slot::Closing {
                        generation: g,
                        w,
                        cut,
                    } => (g, w, cut.min(lost_at)),
                    Slot::Idle => {
                        self.anomalies += 1;
                        return;
                    }
                };
                if g != generation || end == u64::MAX {
                    self.anomalies += 1;
                }
                self.settle(user, w, end, delivered);
                self.slots[slot] = Slot::Idle;
            }
        }
    }

    /// Books a connection still open at the end of the run.
    fn settle_open(&mut self, still: StillOpen, issued: u64) {
        let user = self.user(still.slot);
        let (g, w, end) = match self.slots[still.slot] {
            Slot::Open { generation, w } => (generation, w, issued),
            Slot::Draining { generation, w, cut } | Slot::Closing { generation, w, cut } => {
                (generation, w, cut)
            }
            Slot::Idle => {
                self.anomalies += 1;
                return;
            }
        };
        if g != still.generation {
            self.anomalies += 1;
        }
        self.settle(user, w, end, still.delivered);
        self.slots[still.slot] = Slot::Idle;
    }

    /// Expected so far, ended connections plus the live ones up to `issued`.
    fn expected_now(&self, issued: u64) -> u64 {
        let live: u64 = self
            .slots
            .iter()
            .enumerate()
            .map(|(slot, s)| match *s {
                Slot::Idle => 0,
                Slot::Open { w, .. } => self.count(self.user(slot), w, issued),
                Slot::Draining { w, cut, .. } | Slot::Closing { w, cut, .. } => {
                    self.count(self.user(slot), w, cut)
                }
            })
            .sum();
        self.expected + live
    }

    /// The next user after `cursor` (round robin) with an open connection
    /// and no connection being closed.
    fn pick_user(&self, cursor: &mut usize) -> Option<usize> {
        let users = self.user_open.len();
        for _ in 0..users {
            let user = *cursor;
            *cursor = (*cursor + 1) % users;
            if self.user_open[user] > 0 && self.blocked[user] == 0 {
                return Some(user);
            }
        }
        None
    }
}

/// Server RSS and fds at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    pub label: String,
    /// Seconds since the start sample.
    pub at: f64,
    pub rss_kib: Option<u64>,
    pub fds: Option<u64>,
    /// The server's `ws_notify_connections` gauge.
    pub server_connections: Option<f64>,
    /// Connections the bench had open.
    pub bench_open: usize,
}

impl Sample {
    fn to_json(&self) -> Value {
        json!({
            "at": self.label,
            "t": (self.at * 10.0).round() / 10.0,
            "rss_kib": self.rss_kib,
            "fds": self.fds,
            "server_connections": self.server_connections,
            "bench_open": self.bench_open,
        })
    }
}

/// Everything the soak measured.
pub struct SoakSummary {
    pub connections: usize,
    pub users: usize,
    pub threads: usize,
    pub churn_per_sec: usize,
    pub rate: f64,
    pub source_addrs: usize,
    /// Seconds from the start sample to the end of publishing.
    pub run_secs: f64,
    pub report: Report,
    pub churn_requested: u64,
    /// Churn ticks that found fewer than `--churn` open slots.
    pub churn_short_ticks: u64,
    pub published: u64,
    pub unheard: u64,
    /// Publish slots with no eligible user (nothing published).
    pub skipped: u64,
    pub expected: u64,
    pub delivered: u64,
    pub missing: u64,
    pub extra: u64,
    pub short_connections: u64,
    pub anomalies: u64,
    pub samples: Vec<Sample>,
    pub server_metrics: Option<BTreeMap<String, f64>>,
    pub metrics_error: Option<String>,
    pub cpu: CpuSpan,
}

/// `{reason="x"}` series of `name` as reason -> value.
fn by_reason(metrics: &BTreeMap<String, f64>, name: &str) -> BTreeMap<String, f64> {
    let prefix = format!("{name}{{reason=\"");
    metrics
        .iter()
        .filter_map(|(k, v)| {
            let reason = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            Some((reason.to_string(), *v))
        })
        .collect()
}

fn describe_reasons(map: &BTreeMap<String, f64>) -> String {
    let nonzero: Vec<String> = map
        .iter()
        .filter(|(_, v)| **v != 0.0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if nonzero.is_empty() {
        "none".to_string()
    } else {
        nonzero.join(" ")
    }
}

impl SoakSummary {
    /// Every expected message arrived once, no connection failed or was lost.
    pub fn complete(&self) -> bool {
        self.missing == 0
            && self.extra == 0
            && self.report.lost == 0
            && self.report.failures.total() == 0
            && self.anomalies == 0
    }

    fn metric(&self, name: &str) -> Option<f64> {
        self.server_metrics.as_ref()?.get(name).copied()
    }

    fn reasons(&self, name: &str) -> Option<BTreeMap<String, f64>> {
        Some(by_reason(self.server_metrics.as_ref()?, name))
    }

    /// Samples taken while the bench held its connections (not the one after it closed them).
    fn held(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| s.label != "closed")
    }

    fn band(&self, field: impl Fn(&Sample) -> Option<u64>) -> Value {
        let values: Vec<u64> = self.held().filter_map(&field).collect();
        let start = self.samples.first().and_then(&field);
        let end = self.held().last().and_then(&field);
        json!({
            "start": start,
            "min": values.iter().min(),
            "max": values.iter().max(),
            "end": end,
            "end_minus_start": start.zip(end).map(|(s, e)| e as i64 - s as i64),
            "closed": self.samples.iter().find(|s| s.label == "closed").and_then(&field),
        })
    }

    pub fn to_json(&self) -> Value {
        let f = &self.report.failures;
        let r = &self.report;
        json!({
            "preset": "soak",
            "connections": self.connections,
            "users": self.users,
            "threads": self.threads,
            "churn_per_sec": self.churn_per_sec,
            "rate": self.rate,
            "source_addrs": self.source_addrs,
            "run_seconds": (self.run_secs * 10.0).round() / 10.0,
            "opened": r.opened,
            "churn_requested": self.churn_requested,
            "churn_closed": r.cycles,
            "churn_opened": r.opened.saturating_sub(self.connections as u64),
            "churn_short_ticks": self.churn_short_ticks,
            "drain_timeouts": r.drain_timeouts,
            "close_timeouts": r.close_timeouts,
            "failed": f.total(),
            "failures": f.to_json(),
            "lost": r.lost,
            "handshake_us": report::quantiles(&r.handshake),
            "published": self.published,
            "publish_per_sec": (self.published as f64 / self.run_secs.max(1e-9)).round(),
            "published_unheard": self.unheard,
            "publish_skipped_no_user": self.skipped,
            "expected": self.expected,
            "delivered": self.delivered,
            "missing": self.missing,
            "extra": self.extra,
            "connections_short": self.short_connections,
            "excluded_before_open": r.before_open,
            "excluded_after_close": r.after_close,
            "latency_us": report::quantiles(&r.latency),
            "server_drops": self.reasons("ws_notify_messages_dropped_total"),
            "server_disconnects": self.reasons("ws_notify_disconnects_total"),
            "server_rejected": self.reasons("ws_notify_connections_rejected_total"),
            "server_accepted": self.metric("ws_notify_connections_accepted_total"),
            "server_received": self.metric("ws_notify_messages_received_total"),
            "server_delivered": self.metric("ws_notify_messages_delivered_total"),
            "server_redis_reconnects": self.metric("ws_notify_redis_reconnects_total"),
            "server_accept_fd_exhausted": self.metric("ws_notify_accept_fd_exhausted_total"),
            "server_rss_kib": self.band(|s| s.rss_kib),
            "server_fds": self.band(|s| s.fds),
            "samples": self.samples.iter().map(Sample::to_json).collect::<Vec<_>>(),
            "cpu_seconds": self.cpu.to_json(),
            "metrics_error": self.metrics_error,
            "other_frames": r.other_frames,
            "pings": r.pings,
            "masked_frames": r.masked_frames,
            "bench_anomalies": self.anomalies,
            "complete": self.complete(),
        })
    }

    pub fn to_table(&self) -> String {
        let mut t = Table::default();
        let r = &self.report;
        t.row(
            "preset",
            format!(
                "soak: {} connections, {} users, churn {}/s, {} msg/s, {:.0} s ({} threads, {} source addr)",
                self.connections,
                self.users,
                self.churn_per_sec,
                self.rate,
                self.run_secs,
                self.threads,
                self.source_addrs
            ),
        );
        t.row(
            "churn",
            format!(
                "{} requested, {} closed cleanly, {} opened after start ({} drain timeouts, {} close timeouts, {} short ticks)",
                self.churn_requested,
                r.cycles,
                r.opened.saturating_sub(self.connections as u64),
                r.drain_timeouts,
                r.close_timeouts,
                self.churn_short_ticks
            ),
        );
        t.row("failed handshakes", self.report.failures.describe());
        t.row("lost while open", r.lost.to_string());
        t.row("handshake us", report::describe(&r.handshake));
        t.row(
            "published",
            format!(
                "{} ({:.0}/s; {} heard by no subscriber; {} slots with no eligible user)",
                self.published,
                self.published as f64 / self.run_secs.max(1e-9),
                self.unheard,
                self.skipped
            ),
        );
        t.row(
            "delivered / expected",
            format!(
                "{} / {} (missing {}, extra {}, {} connections short)",
                self.delivered, self.expected, self.missing, self.extra, self.short_connections
            ),
        );
        t.row(
            "excluded",
            format!(
                "{} published around an open, {} after our close frame",
                r.before_open, r.after_close
            ),
        );
        t.row("latency us", report::describe(&r.latency));
        match (
            self.reasons("ws_notify_messages_dropped_total"),
            self.reasons("ws_notify_disconnects_total"),
        ) {
            (Some(drops), Some(disconnects)) => {
                t.row("server drops (this run)", describe_reasons(&drops));
                t.row("server disconnects", describe_reasons(&disconnects));
                if let Some(rejected) = self.reasons("ws_notify_connections_rejected_total") {
                    t.row("server rejections", describe_reasons(&rejected));
                }
                if let (Some(a), Some(rc), Some(d)) = (
                    self.metric("ws_notify_connections_accepted_total"),
                    self.metric("ws_notify_messages_received_total"),
                    self.metric("ws_notify_messages_delivered_total"),
                ) {
                    t.row(
                        "server accepted/recv/sent",
                        format!("{a} upgrades, {rc} messages received, {d} deliveries"),
                    );
                }
                if let Some(n) = self
                    .metric("ws_notify_redis_reconnects_total")
                    .filter(|n| *n > 0.0)
                {
                    t.row("server Redis reconnects", n.to_string());
                }
            }
            _ => t.row(
                "server /metrics",
                self.metrics_error.clone().unwrap_or("not read".into()),
            ),
        }
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        for s in &self.samples {
            t.row(
                &format!("server at {}", s.label),
                format!(
                    "t {:>6.1} s | RSS {} KiB | fds {} | server conns {} | bench open {}",
                    s.at,
                    opt(s.rss_kib),
                    opt(s.fds),
                    s.server_connections
                        .map_or("-".to_string(), |v| v.to_string()),
                    s.bench_open
                ),
            );
        }
        if let (Some(first), Some(last)) = (self.samples.first(), self.held().last()) {
            let delta = |a: Option<u64>, b: Option<u64>| {
                a.zip(b).map_or("-".to_string(), |(a, b)| {
                    format!("{:+}", b as i64 - a as i64)
                })
            };
            let max = |f: fn(&Sample) -> Option<u64>| opt(self.held().filter_map(f).max());
            t.row(
                "server end - start",
                format!(
                    "RSS {} KiB (max {} KiB) | fds {} (max {})",
                    delta(first.rss_kib, last.rss_kib),
                    max(|s| s.rss_kib),
                    delta(first.fds, last.fds),
                    max(|s| s.fds)
                ),
            );
        }
        t.row("cpu", self.cpu.describe());
        if r.other_frames + r.pings + r.masked_frames + self.anomalies > 0 {
            t.row(
                "other",
                format!(
                    "{} other text frames, {} pings, {} masked frames, {} bench anomalies",
                    r.other_frames, r.pings, r.masked_frames, self.anomalies
                ),
            );
        }
        t.row("complete", self.complete().to_string());
        t.finish()
    }
}

/// The main thread's state while the soak runs.
struct Coordinator<'a> {
    options: &'a Options,
    shared: Arc<Shared>,
    events: Receiver<Event>,
    commands: Vec<Sender<Close>>,
    publisher: Publisher,
    ledger: Ledger,
    /// Next `seq`; also what `shared.issued` holds once a batch is on its way.
    issued: u64,
    /// Publish slots used (published or skipped): drives the pacing.
    attempted: u64,
    published: u64,
    unheard: u64,
    skipped: u64,
    user_cursor: usize,
    churn_cursor: usize,
    churn_requested: u64,
    churn_short_ticks: u64,
    batch: Vec<(u64, usize)>,
    samples: Vec<Sample>,
    start: Option<Instant>,
    run_secs: f64,
    metrics_before: Option<BTreeMap<String, f64>>,
    metrics_after: Option<BTreeMap<String, f64>>,
    metrics_error: Option<String>,
}

impl Coordinator<'_> {
    fn absorb_events(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.ledger.apply(event);
        }
    }

    fn delivered_now(&self) -> u64 {
        self.shared.sum(|c| &c.delivered)
    }

    fn sample(&mut self, label: String) {
        let pid = self.options.server_pid;
        // /proc first: the /metrics request below holds one more server fd.
        let rss_kib = pid.and_then(report::rss_kib);
        let fds = pid.and_then(report::fd_count);
        let server_connections = report::scrape_series(
            self.options.server,
            &self.options.host,
            &[CONNECTIONS_GAUGE],
        )
        .ok()
        .and_then(|m| m.get(CONNECTIONS_GAUGE).copied());
        self.samples.push(Sample {
            label,
            at: self
                .start
                .map_or(0.0, |s| Instant::now().duration_since(s).as_secs_f64()),
            rss_kib,
            fds,
            server_connections,
            bench_open: self.ledger.open,
        });
    }

    fn scrape_deltas(&mut self) -> Option<BTreeMap<String, f64>> {
        if !self.options.metrics {
            return None;
        }
        match report::scrape_series(self.options.server, &self.options.host, &DELTA_SERIES) {
            Ok(m) => Some(m),
            Err(e) => {
                self.metrics_error = Some(e.to_string());
                None
            }
        }
    }

    /// Opens the first N connections.
    fn connect_all(&mut self) -> Result<(), Box<dyn Error>> {
        let n = self.options.connections;
        let begin = Instant::now();
        let mut next_print = begin + Duration::from_secs(1);
        let mut last_open = 0;
        let mut progress_at = begin;
        while self.ledger.open < n {
            thread::sleep(MAX_NAP);
            self.absorb_events();
            let now = Instant::now();
            if self.ledger.open != last_open {
                last_open = self.ledger.open;
                progress_at = now;
            } else if now.duration_since(progress_at) >= START_STALL {
                return Err(format!(
                    "only {} of {n} connections opened; none for {} s ({} failed handshakes)",
                    self.ledger.open,
                    START_STALL.as_secs(),
                    self.shared.sum(|c| &c.failed)
                )
                .into());
            }
            if now >= next_print {
                next_print = now + Duration::from_secs(1);
                eprintln!(
                    "connecting: {} open, {} failed ({:.1} s)",
                    self.ledger.open,
                    self.shared.sum(|c| &c.failed),
                    now.duration_since(begin).as_secs_f64()
                );
            }
        }
        Ok(())
    }

    /// Picks the next `--churn` open slots (round robin), blocks their users
    /// and tells their threads to drain and close them.
    fn churn_tick(&mut self) {
        let want = self.options.churn_per_sec;
        let slots = self.ledger.slots.len();
        let threads = self.commands.len();
        let mut chosen = 0;
        for _ in 0..slots {
            if chosen == want {
                break;
            }
            let slot = self.churn_cursor;
            self.churn_cursor = (self.churn_cursor + 1) % slots;
            let Slot::Open { generation, w } = self.ledger.slots[slot] else {
                continue;
            };
            let user = self.ledger.user(slot);
            // From here until CloseSent nothing is published to `user`:
            // `cut` ends what this connection expects, and the last message
            // already published to the user is what it waits for.
            let cut = self.issued;
            self.ledger.slots[slot] = Slot::Draining { generation, w, cut };
            self.ledger.user_open[user] -= 1;
            self.ledger.blocked[user] += 1;
            self.ledger.open -= 1;
            let wait_for = self.ledger.seqs[user].last().copied();
            // A thread ends only after the coordinator is done with it.
            let _ = self.commands[slot % threads].send(Close {
                slot,
                generation,
                wait_for,
            });
            chosen += 1;
        }
        self.churn_requested += chosen as u64;
        if chosen < want {
            self.churn_short_ticks += 1;
        }
    }

    /// Publishes the messages due by `now` at `--rate` (one pipeline).
    fn publish_due(
        &mut self,
        pub_start: Instant,
        rate: f64,
        now: Instant,
    ) -> redis::RedisResult<()> {
        let due = (now.duration_since(pub_start).as_secs_f64() * rate) as u64;
        let n = due
            .saturating_sub(self.attempted)
            .min(self.options.batch as u64);
        if n == 0 {
            return Ok(());
        }
        self.attempted += n;
        self.batch.clear();
        for _ in 0..n {
            match self.ledger.pick_user(&mut self.user_cursor) {
                Some(user) => {
                    let seq = self.issued;
                    self.issued += 1;
                    self.ledger.seqs[user].push(seq);
                    self.batch.push((seq, user));
                }
                None => self.skipped += 1,
            }
        }
        if self.batch.is_empty() {
            return Ok(());
        }
        // Before the send: a connection that reads `issued` later than this
        // store cannot have been registered after these messages went out.
        self.shared.issued.store(self.issued, SeqCst);
        self.unheard += self.publisher.publish(&self.batch)?;
        self.published += self.batch.len() as u64;
        Ok(())
    }

    fn progress(&self, elapsed: f64) {
        let delivered = self.delivered_now();
        let expected = self.ledger.expected_now(self.issued);
        let pid = self.options.server_pid;
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        eprintln!(
            "soak {elapsed:>6.1} s: {} open | churn {} reopened, {} requested | published {} | delivered {delivered} / expected {expected} ({} in flight or missing) | lost {} | failed {} | server RSS {} KiB, fds {}",
            self.ledger.open,
            self.shared
                .sum(|c| &c.opened)
                .saturating_sub(self.options.connections as u64),
            self.churn_requested,
            self.published,
            expected as i64 - delivered as i64,
            self.shared.sum(|c| &c.lost),
            self.shared.sum(|c| &c.failed),
            opt(pid.and_then(report::rss_kib)),
            opt(pid.and_then(report::fd_count)),
        );
    }

    /// Connect, then churn and publish for `--duration`, then let the churn
    /// settle and the last messages drain.
    fn drive(&mut self) -> Result<(), Box<dyn Error>> {
        let options = self.options;
        self.connect_all()?;
        self.start = Some(Instant::now());
        self.sample("start".into());
        self.metrics_before = self.scrape_deltas();
        let start = self.start.unwrap_or_else(Instant::now);
        eprintln!(
            "soak: {} connections open; churn {}/s and {} msg/s for {:.0} s",
            self.ledger.open,
            options.churn_per_sec,
            options.rate.unwrap_or(0.0),
            options.duration.as_secs_f64()
        );
        let rate = options.rate.unwrap_or(1_000.0);
        let end = start + options.duration;
        let mut next_churn = start + CHURN_TICK;
        let mut next_progress = start + options.progress_every;
        let mut next_sample = start + options.sample_every;
        let mut minute = 0u32;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            self.absorb_events();
            if now >= next_churn {
                next_churn += CHURN_TICK;
                if options.churn_per_sec > 0 {
                    self.churn_tick();
                }
            }
            self.publish_due(start, rate, now)?;
            if now >= next_sample {
                next_sample += options.sample_every;
                minute += 1;
                let secs = options.sample_every.as_secs_f64() * f64::from(minute);
                self.sample(format!("+{secs:.0}s"));
            }
            if now >= next_progress {
                next_progress += options.progress_every;
                self.progress(now.duration_since(start).as_secs_f64());
            }
            let next_message = start + Duration::from_secs_f64((self.attempted + 1) as f64 / rate);
            let wake = next_message.min(next_churn).min(end);
            let now = Instant::now();
            if wake > now {
                thread::sleep((wake - now).min(MAX_NAP));
            }
        }
        self.run_secs = start.elapsed().as_secs_f64();

        // Let the last churned slots close and reopen.
        let settle_until = Instant::now() + SETTLE_LIMIT;
        while self.ledger.open < options.connections && Instant::now() < settle_until {
            thread::sleep(MAX_NAP);
            self.absorb_events();
        }
        if self.ledger.open < options.connections {
            eprintln!(
                "warning: {} of {} slots open {} s after the run",
                self.ledger.open,
                options.connections,
                SETTLE_LIMIT.as_secs()
            );
        }
        publish::wait_for_deliveries(options.drain_timeout, MAX_NAP, || {
            self.absorb_events();
            (self.delivered_now(), self.ledger.expected_now(self.issued))
        });
        self.progress(start.elapsed().as_secs_f64());
        self.sample("end".into());
        self.metrics_after = self.scrape_deltas();
        Ok(())
    }
}

/// Runs the soak preset.
pub fn run(
    options: &Options,
    sources: Arc<[std::net::Ipv4Addr]>,
) -> Result<SoakSummary, Box<dyn Error>> {
    sock::raise_nofile_limit_for(options.connections + options.concurrency + 32)?;
    if options.server_pid.is_none() {
        eprintln!("warning: no --server-pid: server RSS and fds are not sampled");
    }
    let publisher = Publisher::for_options(options)?;

    let shared = Arc::new(Shared::new(options.threads, options.users));
    let (event_tx, events) = mpsc::channel();
    let mut commands = Vec::with_capacity(options.threads);
    let cpu_start = CpuMark::take(options.server_pid, options.redis_pid);
    let handles = client::spawn(options, &sources, &shared, |_| {
        let (tx, rx) = mpsc::channel();
        commands.push(tx);
        Mode::Soak {
            commands: rx,
            events: event_tx.clone(),
        }
    })?;
    drop(event_tx);

    let mut co = Coordinator {
        options,
        shared: shared.clone(),
        events,
        commands,
        publisher,
        ledger: Ledger::new(options.connections, options.users),
        issued: 0,
        attempted: 0,
        published: 0,
        unheard: 0,
        skipped: 0,
        user_cursor: 0,
        churn_cursor: 0,
        churn_requested: 0,
        churn_short_ticks: 0,
        batch: Vec::new(),
        samples: Vec::new(),
        start: None,
        run_secs: 0.0,
        metrics_before: None,
        metrics_after: None,
        metrics_error: None,
    };
    let outcome = co.drive();
    let cpu = CpuMark::take(options.server_pid, options.redis_pid).since(&cpu_start);

    shared.stop.store(true, SeqCst);
    let joined = client::join(handles);
    outcome?;
    let mut total = joined?;
    // Events sent before the threads stopped, then the connections still open.
    co.absorb_events();
    let still_open = std::mem::take(&mut total.still_open);
    for still in still_open {
        co.ledger.settle_open(still, co.issued);
    }
    // The bench's sockets are closed now: one more sample once the server noticed.
    thread::sleep(AFTER_DISCONNECT);
    co.ledger.open = 0;
    co.sample("closed".into());

    let server_metrics = co
        .metrics_before
        .as_ref()
        .zip(co.metrics_after.as_ref())
        .map(|(before, after)| report::metrics_delta(before, after));
    let delivered_counted = total.delivered;
    if delivered_counted != co.ledger.delivered {
        // Every delivery belongs to exactly one ended or still-open connection.
        co.ledger.anomalies += 1;
    }
    Ok(SoakSummary {
        connections: options.connections,
        users: options.users,
        threads: options.threads,
        churn_per_sec: options.churn_per_sec,
        rate: options.rate.unwrap_or(1_000.0),
        source_addrs: sources.len().max(1),
        run_secs: co.run_secs,
        report: total,
        churn_requested: co.churn_requested,
        churn_short_ticks: co.churn_short_ticks,
        published: co.published,
        unheard: co.unheard,
        skipped: co.skipped,
        expected: co.ledger.expected,
        delivered: co.ledger.delivered,
        missing: co.ledger.missing,
        extra: co.ledger.extra,
        short_connections: co.ledger.short_connections,
        anomalies: co.ledger.anomalies,
        samples: co.samples,
        server_metrics,
        metrics_error: co.metrics_error,
        cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_is_the_window_between_open_and_cut() {
        // 4 slots, 2 users: slots 0 and 2 are user 0, 1 and 3 are user 1.
        let mut l = Ledger::new(4, 2);
        for slot in 0..4 {
            l.apply(Event::Opened {
                slot,
                generation: 1,
                w: if slot == 2 { 3 } else { 0 },
            });
        }
        assert_eq!(l.open, 4);
        // Messages 0..6 alternate users 0, 1.
        for seq in 0..6 {
            l.seqs[(seq % 2) as usize].push(seq);
        }
        // Slot 0 churns at cut 4 (user 0 got 0 and 2 before it).
        l.slots[0] = Slot::Draining {
            generation: 1,
            w: 0,
            cut: 4,
        };
        l.user_open[0] -= 1;
        l.blocked[0] += 1;
        l.open -= 1;
        let mut cursor = 0;
        assert_eq!(l.pick_user(&mut cursor), Some(1), "user 0 is blocked");
        l.apply(Event::CloseSent {
            slot: 0,
            generation: 1,
        });
        assert_eq!(l.blocked[0], 0);
        l.apply(Event::Done {
            slot: 0,
            generation: 1,
            delivered: 2,
            ended: Ended::Churned,
        });
        assert_eq!((l.expected, l.delivered, l.missing), (2, 2, 0));
        // Slot 2 opened at w = 3: of user 0's 0, 2, 4 only 4 is expected.
        assert_eq!(l.expected_now(6), 2 + 3 + 1 + 3);
        // Slot 1 (user 1: 1, 3, 5) is lost when issued = 4: 1 and 3 expected.
        l.apply(Event::Done {
            slot: 1,
            generation: 1,
            delivered: 1,
            ended: Ended::Lost { issued: 4 },
        });
        assert_eq!((l.expected, l.missing, l.short_connections), (4, 1, 1));
        l.settle_open(
            StillOpen {
                slot: 2,
                generation: 1,
                delivered: 2,
            },
            6,
        );
        assert_eq!((l.expected, l.extra), (5, 1));
        assert_eq!(l.anomalies, 0);
    }

    #[test]
    fn reasons_from_labels() {
        let mut m = BTreeMap::new();
        m.insert(
            "ws_notify_disconnects_total{reason=\"client_closed\"}".to_string(),
            7.0,
        );
        m.insert(
            "ws_notify_messages_dropped_total{reason=\"buffer_full\"}".to_string(),
            1.0,
        );
        let d = by_reason(&m, "ws_notify_disconnects_total");
        assert_eq!(d.len(), 1);
        assert_eq!(d["client_closed"], 7.0);
        assert_eq!(describe_reasons(&d), "client_closed=7");
    }
}
