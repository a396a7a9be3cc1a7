//! Counters and their rendering for `/metrics` (Prometheus text 0.0.4, and the Go
//! service's JSON shape with `?format=json`) and `/health`.
//!
//! The counters are plain integers owned by the event loop (no atomics on the hot
//! path); the Redis side's numbers come from `RedisStatus` atomics.
//!
//! Accounting (README "Endpoints"): every message read from Redis is either
//! dropped as a message (`messages_dropped_total`: offline user, invalid, invalid
//! channel, hand-over queue full) or goes to each connection of its user as one
//! delivery. Each delivery is dropped at once (`deliveries_dropped_total`,
//! `buffer_full`), or queued; a queued one is later written to the socket in
//! full (`messages_delivered_total`) or thrown away unsent when the connection
//! closes first (`deliveries_dropped_total`, `unsent_on_close`); until then it
//! is in `deliveries_queued`.
//!
//! Each delivery written is also observed in the latency histogram
//! (`crate::latency`), at the same point where it is counted written (and where
//! a resume counts one delivered without a write), so the histogram's `_count`
//! equals `messages_delivered_total`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::clock::Timestamp;
use crate::conn::refresh::Outcome;
use crate::conn::{CloseReason, Deliveries};
use crate::http::Rejection;
use crate::latency::{DeliveryLatency, Epoch, Stamp};
use crate::process_stats;
use crate::redis_status::RedisStatus;

/// Counters bumped by the event loop.
#[derive(Default)]
pub struct Metrics {
    /// WebSocket upgrades completed.
    pub connections_accepted: u64,
    /// Requests answered with an error, by `Rejection as usize`.
    pub rejected: [u64; Rejection::ALL.len()],
    /// Clients that did not finish their request head in time.
    pub handshake_timeouts: u64,
    /// Deliveries (one message, one connection) taken into a connection's queue.
    pub queued: u64,
    /// Deliveries written to the socket in full.
    pub delivered: u64,
    /// Messages for users with no connection here.
    pub dropped_offline: u64,
    /// Deliveries dropped because a connection's queue was full
    /// (`WS_SEND_BUFFER` frames or `WS_SEND_BUFFER_BYTES` bytes).
    pub dropped_buffer_full: u64,
    /// Queued deliveries thrown away unwritten because their connection closed.
    pub dropped_unsent_on_close: u64,
    /// Published messages that are not `{"type": string, "payload": any}`.
    pub dropped_invalid: u64,
    /// Connections ended, by `CloseReason as usize`.
    pub disconnects: [u64; CloseReason::ALL.len()],
    /// `accept` failures for lack of file descriptors (EMFILE/ENFILE).
    pub accept_fd_exhausted: u64,
    /// Token refresh requests, by `refresh::Outcome::index`.
    pub refreshes: [u64; Outcome::LABELS.len()],
    /// Connections that asked to resume (`since`).
    pub resumes: u64,
    /// Messages sent to resuming connections from the history.
    pub resume_replayed: u64,
    /// Resumes answered `complete:false`.
    pub resumes_incomplete: u64,
    /// Bytes written and delivery latency, recorded by `OutboundQueue::flush`.
    pub writes: WriteMetrics,
}

/// What the loop records as it writes to client sockets. `OutboundQueue::flush`
/// adds to it directly (the loop lends it to the connection it settles), so no
/// connection carries counters of its own for these.
#[derive(Default)]
pub struct WriteMetrics {
    /// Bytes written to client sockets: every byte, HTTP answers included.
    pub bytes: u64,
    /// Deliveries by the time from their read from Redis to their write.
    pub latency: DeliveryLatency,
}

impl WriteMetrics {
    /// Stamping the writes against `epoch` (the hand-over's).
    pub fn new(epoch: Epoch) -> WriteMetrics {
        WriteMetrics {
            bytes: 0,
            latency: DeliveryLatency::new(epoch),
        }
    }
}

/// Point-in-time numbers that are not counters.
pub struct Gauges {
    pub connections: usize,
    pub users: usize,
    pub uptime_seconds: u64,
    /// Absent for `/health`, which does not report them.
    pub process: Option<ProcessFigures>,
}

/// What /proc says about the process (see `process_stats`); `None` where it
/// could not be read.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessFigures {
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub virtual_bytes: Option<u64>,
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
    /// The soft open-file limit.
    pub max_fds: Option<u64>,
}

/// How long a sample of the process figures is reused.
const PROCESS_SAMPLE_PERIOD: Duration = Duration::from_secs(1);

/// Reads the process figures at most once per `PROCESS_SAMPLE_PERIOD`: counting
/// open descriptors lists /proc/self/fd (about a microsecond per descriptor, so
/// milliseconds with thousands of sockets) on the event loop, and a burst of
/// `/metrics` requests must not stall delivery for everyone. The other figures
/// cost one read of /proc/self/stat and one getrlimit per sample.
#[derive(Default)]
pub struct ProcessSampler {
    last: Option<(Instant, ProcessFigures)>,
}

impl ProcessSampler {
    /// The figures, sampled now if the last sample is older than the period.
    pub fn figures(&mut self, now: Instant) -> ProcessFigures {
        match self.last {
            Some((at, figures)) if now.saturating_duration_since(at) < PROCESS_SAMPLE_PERIOD => {
                figures
            }
            _ => {
                let stat = process_stats::stat();
                let figures = ProcessFigures {
                    resident_bytes: stat.map(|s| s.resident_bytes),
                    open_fds: process_stats::open_fds(),
                    virtual_bytes: stat.map(|s| s.virtual_bytes),
                    cpu_seconds: stat.map(|s| s.cpu_seconds),
                    start_time_seconds: process_stats::start_time_seconds(),
                    max_fds: process_stats::max_fds(),
                };
                self.last = Some((now, figures));
                figures
            }
        }
    }
}

impl Metrics {
    /// Counters at zero; deliveries are stamped against `epoch` (the hand-over's).
    pub fn new(epoch: Epoch) -> Metrics {
        Metrics {
            writes: WriteMetrics::new(epoch),
            ..Metrics::default()
        }
    }

    /// A delivery that needs no write (the client got the message in its
    /// resume's replay): counted delivered, and observed with the time now.
    pub fn delivered_by_replay(&mut self, read_at: Stamp) {
        self.delivered += 1;
        let now = self.writes.latency.now();
        self.writes.latency.observe(read_at, now);
    }

    /// Adds what a connection reports after it wrote or closed.
    pub fn count_deliveries(&mut self, deliveries: Deliveries) {
        self.delivered += u64::from(deliveries.written);
        self.dropped_unsent_on_close += u64::from(deliveries.unsent);
    }

    /// Deliveries queued and not yet written or dropped.
    pub fn deliveries_queued(&self) -> u64 {
        self.queued
            .saturating_sub(self.delivered + self.dropped_unsent_on_close)
    }

    /// Messages and deliveries dropped for a reason that is a failure: the
    /// Go-compatible JSON's `failed`. A message for a user with no connection
    /// here is not one (another instance may hold the user).
    fn failed(&self, redis: &RedisStatus) -> u64 {
        self.dropped_invalid
            + redis.dropped_invalid_channel()
            + redis.dropped_queue_full()
            + self.dropped_buffer_full
            + self.dropped_unsent_on_close
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render_prometheus(&self, gauges: &Gauges, redis: &RedisStatus) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP ws_notify_{name} {help}");
            let _ = writeln!(out, "# TYPE ws_notify_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "ws_notify_{name}{labels} {value}");
            }
        };
        metric(
            "connections",
            "gauge",
            "Open WebSocket connections.",
            &[("", gauges.connections as u64)],
        );
        metric(
            "users",
            "gauge",
            "Users with at least one open connection.",
            &[("", gauges.users as u64)],
        );
        metric(
            "connections_accepted_total",
            "counter",
            "WebSocket upgrades completed.",
            &[("", self.connections_accepted)],
        );
        let rejected = by_reason(
            Rejection::ALL
                .iter()
                .map(|r| (r.label(), self.rejected[*r as usize]))
                .chain(std::iter::once((
                    "handshake_timeout",
                    self.handshake_timeouts,
                ))),
        );
        metric(
            "connections_rejected_total",
            "counter",
            "Connections refused before or during the upgrade, by reason.",
            &borrowed(&rejected),
        );
        metric(
            "messages_received_total",
            "counter",
            "Messages read from Redis.",
            &[("", redis.received())],
        );
        metric(
            "messages_delivered_total",
            "counter",
            "Deliveries (one message to one connection) written to the client's socket in full.",
            &[("", self.delivered)],
        );
        metric(
            "bytes_written_total",
            "counter",
            "Bytes written to client sockets (WebSocket frames and HTTP answers).",
            &[("", self.writes.bytes)],
        );
        metric(
            "deliveries_queued",
            "gauge",
            "Deliveries waiting in connections' queues.",
            &[("", self.deliveries_queued())],
        );
        metric(
            "messages_dropped_total",
            "counter",
            "Messages read from Redis and delivered to no connection, by reason.",
            &[
                ("{reason=\"offline_user\"}", self.dropped_offline),
                ("{reason=\"invalid\"}", self.dropped_invalid),
                (
                    "{reason=\"invalid_channel\"}",
                    redis.dropped_invalid_channel(),
                ),
                ("{reason=\"queue_full\"}", redis.dropped_queue_full()),
            ],
        );
        metric(
            "deliveries_dropped_total",
            "counter",
            "Deliveries (one message to one connection) dropped, by reason.",
            &[
                ("{reason=\"buffer_full\"}", self.dropped_buffer_full),
                ("{reason=\"unsent_on_close\"}", self.dropped_unsent_on_close),
            ],
        );
        let disconnects = by_reason(
            CloseReason::ALL
                .iter()
                .map(|r| (r.label(), self.disconnects[*r as usize])),
        );
        metric(
            "disconnects_total",
            "counter",
            "WebSocket connections ended, by reason.",
            &borrowed(&disconnects),
        );
        let refreshes: Vec<(String, u64)> = Outcome::LABELS
            .iter()
            .zip(self.refreshes)
            .map(|(label, value)| (format!("{{result=\"{label}\"}}"), value))
            .collect();
        metric(
            "token_refreshes_total",
            "counter",
            "Token refresh requests from clients, by result.",
            &borrowed(&refreshes),
        );
        metric(
            "resumes_total",
            "counter",
            "Connections that asked to resume with since.",
            &[("", self.resumes)],
        );
        metric(
            "resume_replayed_messages_total",
            "counter",
            "Messages replayed from the history to resuming connections.",
            &[("", self.resume_replayed)],
        );
        metric(
            "resumes_incomplete_total",
            "counter",
            "Resumes answered complete:false (history off, trimmed, expired or unreadable).",
            &[("", self.resumes_incomplete)],
        );
        metric(
            "accept_fd_exhausted_total",
            "counter",
            "accept() failures for lack of file descriptors (EMFILE/ENFILE).",
            &[("", self.accept_fd_exhausted)],
        );
        metric(
            "log_lines_dropped_total",
            "counter",
            "Log lines dropped because the log consumer could not keep up.",
            &[("", crate::logging::dropped_lines())],
        );
        metric(
            "redis_connected",
            "gauge",
            "1 while subscribed to Redis.",
            &[("", u64::from(redis.is_subscribed()))],
        );
        metric(
            "redis_reconnects_total",
            "counter",
            "Successful re-subscriptions to Redis after a lost connection.",
            &[("", redis.reconnects())],
        );
        metric(
            "redis_connect_failures_total",
            "counter",
            "Failed attempts to connect and subscribe to Redis.",
            &[("", redis.connect_failures())],
        );
        metric(
            "redis_reader_restarts_total",
            "counter",
            "Redis reader sessions that ended in a panic and were restarted.",
            &[("", redis.reader_restarts())],
        );
        let mode = match redis.mode() {
            crate::config::SubscribeMode::Pattern => "{mode=\"pattern\"}",
            crate::config::SubscribeMode::Channel => "{mode=\"channel\"}",
            crate::config::SubscribeMode::Sharded => "{mode=\"sharded\"}",
        };
        // Sharded mode: per master, labelled with its address.
        let nodes = redis.nodes();
        let node_label = |node: &str| node.replace('\\', "\\\\").replace('"', "\\\"");
        let by_node: Vec<(String, u64)> = nodes
            .iter()
            .map(|n| {
                let label = format!("{{mode=\"sharded\",node=\"{}\"}}", node_label(&n.node));
                (label, n.subscriptions)
            })
            .collect();
        let subscriptions: Vec<(&str, u64)> =
            if redis.mode() == crate::config::SubscribeMode::Sharded {
                by_node.iter().map(|(l, v)| (l.as_str(), *v)).collect()
            } else {
                vec![(mode, redis.subscriptions())]
            };
        metric(
            "redis_subscriptions",
            "gauge",
            "Subscriptions Redis confirmed and the reader holds (the pattern, or users' channels; per master in sharded mode).",
            &subscriptions,
        );
        if redis.mode() == crate::config::SubscribeMode::Sharded {
            let connected: Vec<(String, u64)> = nodes
                .iter()
                .map(|n| {
                    let label = format!("{{node=\"{}\"}}", node_label(&n.node));
                    (label, u64::from(n.connected))
                })
                .collect();
            let connected: Vec<(&str, u64)> =
                connected.iter().map(|(l, v)| (l.as_str(), *v)).collect();
            metric(
                "redis_node_connected",
                "gauge",
                "Sharded mode: 1 while the link to this master is up and answered its first ping.",
                &connected,
            );
        }
        metric(
            "redis_subscribe_total",
            "counter",
            "Channels sent in SUBSCRIBE commands, resubscribes included.",
            &[("", redis.subscribes())],
        );
        metric(
            "redis_unsubscribe_total",
            "counter",
            "Channels sent in UNSUBSCRIBE commands.",
            &[("", redis.unsubscribes())],
        );
        metric(
            "redis_resubscribes_total",
            "counter",
            "Channels subscribed again, by reason (after a reconnect; sharded mode: after their slot moved).",
            &[
                (
                    "{reason=\"reconnect\"}",
                    redis.resubscribes_after_reconnect(),
                ),
                (
                    "{reason=\"migration\"}",
                    redis.resubscribes_after_migration(),
                ),
            ],
        );
        metric(
            "uptime_seconds",
            "gauge",
            "Seconds since start.",
            &[("", gauges.uptime_seconds)],
        );
        let process = gauges.process.unwrap_or_default();
        if let Some(rss) = process.resident_bytes {
            metric(
                "resident_memory_bytes",
                "gauge",
                "Resident set size of the process.",
                &[("", rss)],
            );
        }
        if let Some(fds) = process.open_fds {
            metric(
                "open_fds",
                "gauge",
                "Open file descriptors of the process.",
                &[("", fds)],
            );
        }
        self.writes.latency.render(&mut out);
        render_standard_process(&mut out, &process);
        render_build_info(&mut out);
        out
    }

    /// The Go service's `/metrics` JSON shape.
    pub fn render_json(&self, gauges: &Gauges, redis: &RedisStatus, now: &Timestamp) -> String {
        serde_json::json!({
            "service": "websocket-service",
            "timestamp": now.as_str(),
            "uptime_seconds": gauges.uptime_seconds,
            "connections": {
                "active": gauges.connections,
                "total_unique_users": gauges.users,
            },
            "messages": {
                "received_from_redis": redis.received(),
                "sent_to_clients": self.delivered,
                "failed": self.failed(redis),
            },
        })
        .to_string()
    }
}

/// Gauges the loop reads on a scrape: the last Redis ping round trip (left out
/// until the first ping) and the messages waiting in the hand-over queue.
pub fn render_redis_ping_and_handover(
    out: &mut String,
    redis: &RedisStatus,
    handover_queued: usize,
) {
    if let Some(micros) = redis.ping_micros() {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "# HELP ws_notify_redis_ping_seconds Round trip of the last PING to Redis.\n\
             # TYPE ws_notify_redis_ping_seconds gauge\n\
             ws_notify_redis_ping_seconds {}",
            micros as f64 / 1e6
        );
    }
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# HELP ws_notify_handover_queue_depth Messages read from Redis waiting for the event loop.\n\
         # TYPE ws_notify_handover_queue_depth gauge\n\
         ws_notify_handover_queue_depth {handover_queued}"
    );
}

/// The process metrics under the names every Prometheus client library uses
/// (`process_*`), so stock dashboards and alerts work; the figures that could
/// not be read are left out.
fn render_standard_process(out: &mut String, process: &ProcessFigures) {
    let count = |v: Option<u64>| v.map(|v| v as f64);
    let metrics = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            process.cpu_seconds,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            process.start_time_seconds,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            count(process.resident_bytes),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            count(process.virtual_bytes),
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            count(process.open_fds),
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            count(process.max_fds),
        ),
    ];
    for (name, kind, help, value) in metrics {
        if let Some(value) = value {
            // Writing to a String cannot fail.
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

/// `ws_notify_build_info{version="..."} 1`: the running version as a label,
/// to see which instances run what during a rollout.
fn render_build_info(out: &mut String) {
    let version = env!("CARGO_PKG_VERSION");
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# HELP ws_notify_build_info The running ws-notify version (always 1).\n\
         # TYPE ws_notify_build_info gauge\n\
         ws_notify_build_info{{version=\"{version}\"}} 1"
    );
}

/// Samples labelled `{reason="<label>"}`.
fn by_reason(samples: impl Iterator<Item = (&'static str, u64)>) -> Vec<(String, u64)> {
    samples
        .map(|(label, value)| (format!("{{reason=\"{label}\"}}"), value))
        .collect()
}

/// The samples as the renderer takes them.
fn borrowed(samples: &[(String, u64)]) -> Vec<(&str, u64)> {
    samples.iter().map(|(l, v)| (l.as_str(), *v)).collect()
}

/// `/health`: (HTTP status, JSON body). 503 while not subscribed to Redis.
pub fn render_health(gauges: &Gauges, redis: &RedisStatus, now: &Timestamp) -> (u16, String) {
    let subscribed = redis.is_subscribed();
    let mut redis_json = serde_json::json!({
        "status": if subscribed { "connected" } else { "disconnected" },
    });
    if let Some(micros) = redis.ping_micros().filter(|_| subscribed) {
        redis_json["ping_ms"] = serde_json::json!(micros as f64 / 1000.0);
    }
    if let Some(error) = redis.last_error().filter(|_| !subscribed) {
        redis_json["error"] = serde_json::json!(error);
    }
    if redis.mode() == crate::config::SubscribeMode::Sharded {
        let nodes: Vec<serde_json::Value> = redis
            .nodes()
            .iter()
            .map(|node| {
                let mut entry = serde_json::json!({
                    "node": node.node,
                    "status": if node.connected { "connected" } else { "disconnected" },
                    "subscriptions": node.subscriptions,
                });
                if let Some(ping) = node.ping.filter(|_| node.connected) {
                    entry["ping_ms"] = serde_json::json!(ping.as_micros() as f64 / 1000.0);
                }
                entry
            })
            .collect();
        redis_json["nodes"] = serde_json::json!(nodes);
    }
    let body = serde_json::json!({
        "status": if subscribed { "healthy" } else { "degraded" },
        "timestamp": now.as_str(),
        "redis": redis_json,
        "websocket": {
            "active_connections": gauges.connections,
            "total_unique_users": gauges.users,
        },
        "uptime_seconds": gauges.uptime_seconds,
    });
    (if subscribed { 200 } else { 503 }, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_figures_are_sampled_at_most_once_a_period() {
        let mut sampler = ProcessSampler::default();
        let start = Instant::now();
        let first = sampler.figures(start).open_fds.expect("/proc/self/fd");
        let files: Vec<std::fs::File> = (0..50)
            .map(|_| std::fs::File::open("/dev/null").expect("open /dev/null"))
            .collect();
        let cached = sampler.figures(start + PROCESS_SAMPLE_PERIOD / 2);
        assert_eq!(cached.open_fds, Some(first), "resampled within the period");
        let fresh = sampler.figures(start + PROCESS_SAMPLE_PERIOD);
        assert!(fresh.open_fds.expect("/proc/self/fd") >= first + 50);
        drop(files);
    }

    #[test]
    fn reasons_are_labelled() {
        let text = Metrics::default().render_prometheus(
            &Gauges {
                connections: 0,
                users: 0,
                uptime_seconds: 0,
                process: None,
            },
            &RedisStatus::default(),
        );
        assert!(text.contains("ws_notify_disconnects_total{reason=\"slow_client\"} 0\n"));
        assert!(
            text.contains("ws_notify_connections_rejected_total{reason=\"handshake_timeout\"} 0\n")
        );
        assert!(text.contains("ws_notify_log_lines_dropped_total "));
        assert!(text.contains("ws_notify_token_refreshes_total{result=\"rate_limited\"} 0\n"));
        assert!(!text.contains("open_fds"), "no process figures, no line");
        for reason in ["offline_user", "invalid", "invalid_channel", "queue_full"] {
            assert!(text.contains(&format!(
                "ws_notify_messages_dropped_total{{reason=\"{reason}\"}} 0\n"
            )));
        }
        for reason in ["buffer_full", "unsent_on_close"] {
            assert!(text.contains(&format!(
                "ws_notify_deliveries_dropped_total{{reason=\"{reason}\"}} 0\n"
            )));
        }
        assert!(!text.contains("process_"), "no process figures, no line");
    }

    #[test]
    fn standard_process_metrics_and_build_info() {
        let text = Metrics::default().render_prometheus(
            &Gauges {
                connections: 0,
                users: 0,
                uptime_seconds: 0,
                process: Some(ProcessFigures {
                    resident_bytes: Some(10_485_760),
                    open_fds: Some(12),
                    virtual_bytes: None,
                    cpu_seconds: Some(1.25),
                    start_time_seconds: Some(1_764_633_600.5),
                    max_fds: Some(1_048_576),
                }),
            },
            &RedisStatus::default(),
        );
        for line in [
            "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.25\n",
            "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 1764633600.5\n",
            "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 10485760\n",
            "# TYPE process_open_fds gauge\nprocess_open_fds 12\n",
            "# TYPE process_max_fds gauge\nprocess_max_fds 1048576\n",
            "ws_notify_resident_memory_bytes 10485760\n",
            "ws_notify_open_fds 12\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(
            !text.contains("process_virtual_memory_bytes"),
            "unread, left out"
        );
        let build_info = format!(
            "# TYPE ws_notify_build_info gauge\nws_notify_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build_info), "{text}");
        // Every family is declared once.
        let mut names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "a metric is declared twice");
    }

    #[test]
    fn queued_deliveries_are_what_is_neither_written_nor_dropped() {
        let mut metrics = Metrics {
            queued: 10,
            ..Metrics::default()
        };
        metrics.count_deliveries(Deliveries {
            written: 6,
            unsent: 3,
        });
        assert_eq!(metrics.deliveries_queued(), 1);
        assert_eq!((metrics.delivered, metrics.dropped_unsent_on_close), (6, 3));
    }
}
