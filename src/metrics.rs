//! Counters and their rendering for `/metrics` (Prometheus text 0.0.4, and the Go
//! service's JSON shape with `?format=json`) and `/health`.
//!
//! The counters are plain integers owned by the event loop (no atomics on the hot
//! path); the Redis side's numbers come from `RedisStatus` atomics.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::clock::Timestamp;
use crate::conn::CloseReason;
use crate::http::Rejection;
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
    /// Message frames queued to connections (one per connection a message reaches).
    pub delivered: u64,
    /// Messages for users with no connection here.
    pub dropped_offline: u64,
    /// Deliveries dropped because a connection's queue was full.
    pub dropped_buffer_full: u64,
    /// Published messages that are not `{"type": string, "payload": any}`.
    pub dropped_invalid: u64,
    /// Connections ended, by `CloseReason as usize`.
    pub disconnects: [u64; CloseReason::ALL.len()],
    /// `accept` failures for lack of file descriptors (EMFILE/ENFILE).
    pub accept_fd_exhausted: u64,
    /// Connections that asked to resume (`since`).
    pub resumes: u64,
    /// Messages sent to resuming connections from the history.
    pub resume_replayed: u64,
    /// Resumes answered `complete:false`.
    pub resumes_incomplete: u64,
}

/// Point-in-time numbers that are not counters.
pub struct Gauges {
    pub connections: usize,
    pub users: usize,
    pub uptime_seconds: u64,
    /// Absent for `/health`, which does not report them.
    pub process: Option<ProcessFigures>,
}

/// The process's resident memory and open descriptors, read from /proc.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessFigures {
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
}

/// How long a sample of the process figures is reused.
const PROCESS_SAMPLE_PERIOD: Duration = Duration::from_secs(1);

/// Reads the process figures at most once per `PROCESS_SAMPLE_PERIOD`: counting
/// open descriptors lists /proc/self/fd (about a microsecond per descriptor, so
/// milliseconds with thousands of sockets) on the event loop, and a burst of
/// `/metrics` requests must not stall delivery for everyone.
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
                let figures = ProcessFigures {
                    resident_bytes: resident_bytes(),
                    open_fds: open_fds(),
                };
                self.last = Some((now, figures));
                figures
            }
        }
    }
}

impl Metrics {
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
            "Message frames queued to client connections.",
            &[("", self.delivered)],
        );
        metric(
            "messages_dropped_total",
            "counter",
            "Messages or deliveries dropped, by reason.",
            &[
                ("{reason=\"offline_user\"}", self.dropped_offline),
                ("{reason=\"buffer_full\"}", self.dropped_buffer_full),
                ("{reason=\"invalid\"}", self.dropped_invalid),
                ("{reason=\"queue_full\"}", redis.dropped_queue_full()),
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
                "failed": self.dropped_buffer_full + self.dropped_invalid + redis.dropped_queue_full(),
            },
        })
        .to_string()
    }
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

/// Resident set size from /proc/self/statm.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page_size).ok().map(|size| pages * size)
}

/// Entries of /proc/self/fd (minus the one the listing itself holds open).
fn open_fds() -> Option<u64> {
    let count = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(count.saturating_sub(1))
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
        assert!(!text.contains("open_fds"), "no process figures, no line");
    }
}
