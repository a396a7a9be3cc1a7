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

use crate::args::Options;
use crate::client::{self, Close, Event, Mode, Shared};
use crate::publish::{self, Publisher};
use crate::report::{self, CpuMark};
use crate::sock;

mod ledger;
mod summary;

use ledger::{Ledger, Slot};
use summary::Sample;
pub use summary::SoakSummary;

/// Counters whose change over the run is reported.
const DELTA_SERIES: [&str; 6] = [
    "ws_notify_messages_",
    "ws_notify_deliveries_dropped_total",
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
