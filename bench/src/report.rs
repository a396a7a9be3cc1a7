//! Measurements of the server from outside (RSS from /proc, counters from
//! /metrics) and the final report: one JSON line on stdout, a table on stderr.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::counts::Failures;
use crate::histogram::Histogram;

/// Resident set size of `pid` in KiB (`VmRSS` in /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Open file descriptors of `pid` (entries of /proc/<pid>/fd).
pub fn fd_count(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(dir.filter(|e| e.is_ok()).count() as u64)
}

/// CPU time (user + system) of process `pid` in seconds, from /proc/<pid>/stat.
pub fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and ')': fields resume after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

/// CPU time (user + system) of this process, all threads, in seconds.
fn own_cpu() -> f64 {
    // SAFETY: rusage is plain old data filled in by getrusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid `who` and pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU consumed so far by the bench, the server and Redis, at one instant.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: Instant,
    bench: f64,
    server: Option<f64>,
    redis: Option<f64>,
}

/// CPU seconds used between two marks (the machine has few cores: this shows
/// which process was the bottleneck).
#[derive(Debug, Clone, Copy)]
pub struct CpuSpan {
    pub wall: f64,
    pub bench: f64,
    pub server: Option<f64>,
    pub redis: Option<f64>,
}

impl CpuMark {
    pub fn take(server_pid: Option<u32>, redis_pid: Option<u32>) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            bench: own_cpu(),
            server: server_pid.and_then(process_cpu),
            redis: redis_pid.and_then(process_cpu),
        }
    }

    /// What was used from `earlier` to this mark.
    pub fn since(&self, earlier: &CpuMark) -> CpuSpan {
        let diff = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        CpuSpan {
            wall: self.at.duration_since(earlier.at).as_secs_f64(),
            bench: self.bench - earlier.bench,
            server: diff(self.server, earlier.server),
            redis: diff(self.redis, earlier.redis),
        }
    }
}

impl CpuSpan {
    pub fn to_json(self) -> Value {
        let r = |v: f64| (v * 1000.0).round() / 1000.0;
        json!({
            "wall": r(self.wall),
            "bench": r(self.bench),
            "server": self.server.map(r),
            "redis": self.redis.map(r),
        })
    }

    pub fn describe(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2} s"));
        format!(
            "wall {:.2} s | bench {:.2} s | server {} | redis {}",
            self.wall,
            self.bench,
            opt(self.server),
            opt(self.redis)
        )
    }
}

/// Series kept from /metrics: those whose name starts with one of these.
const METRICS_KEPT: [&str; 3] = [
    "ws_notify_messages_",
    "ws_notify_deliveries_dropped_total",
    "ws_notify_redis_reconnects_total",
];
/// The server's drop counters: dropped messages, and dropped deliveries (one
/// message to one connection); their reasons are distinct.
pub const DROP_COUNTERS: [&str; 2] = [
    "ws_notify_messages_dropped_total",
    "ws_notify_deliveries_dropped_total",
];
/// Re-subscriptions: a Redis that disconnected a slow subscriber loses messages.
const RECONNECTS: &str = "ws_notify_redis_reconnects_total";

/// Fetches the server's /metrics and returns the `ws_notify_messages_*` series,
/// the dropped deliveries and the Redis reconnect count (name with labels -> value).
pub fn scrape_metrics(server: SocketAddrV4, host: &str) -> io::Result<BTreeMap<String, f64>> {
    scrape_series(server, host, &METRICS_KEPT)
}

/// Fetches the server's /metrics and returns the series whose name starts
/// with one of `prefixes` (name with labels -> value).
pub fn scrape_series(
    server: SocketAddrV4,
    host: &str,
    prefixes: &[&str],
) -> io::Result<BTreeMap<String, f64>> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(server), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    stream.take(4 << 20).read_to_string(&mut body)?;
    if !body.starts_with("HTTP/1.1 200") {
        let status = body.lines().next().unwrap_or("no answer").to_string();
        return Err(io::Error::other(format!("/metrics: {status}")));
    }
    Ok(parse_series(&body, prefixes))
}

#[cfg(test)]
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    parse_series(text, &METRICS_KEPT)
}

fn parse_series(text: &str, prefixes: &[&str]) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// `after - before` per series (the server's counters are cumulative).
pub fn metrics_delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

/// Everything the run measured.
pub struct Summary {
    pub preset: &'static str,
    pub churn: bool,
    pub target_connections: usize,
    pub users: usize,
    pub threads: usize,
    pub concurrency: usize,
    pub source_addrs: usize,
    pub opened: u64,
    pub failures: Failures,
    pub lost: u64,
    /// Seconds from the first connect to the last `connected` message.
    pub connect_secs: f64,
    pub handshake: Histogram,
    pub cycles: u64,
    pub close_timeouts: u64,
    pub messages: u64,
    pub published: u64,
    pub publish_secs: f64,
    pub unheard: u64,
    pub expected: u64,
    pub delivered: u64,
    /// Seconds from the first publish to the last receive.
    pub deliver_secs: f64,
    pub latency: Histogram,
    pub rss_before: Option<u64>,
    pub rss_connected: Option<u64>,
    pub rss_end: Option<u64>,
    pub server_metrics: Option<BTreeMap<String, f64>>,
    /// CPU used while connecting (or churning) and while publishing + draining.
    pub cpu_connect: CpuSpan,
    pub cpu_publish: Option<CpuSpan>,
    pub metrics_error: Option<String>,
    pub other_frames: u64,
    pub pings: u64,
    pub masked_frames: u64,
}

fn rate(count: u64, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// The stderr table: one `name value` row per line.
#[derive(Default)]
pub struct Table(String);

impl Table {
    pub fn row(&mut self, name: &str, value: String) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.0, "  {name:<26} {value}");
    }

    pub fn finish(self) -> String {
        self.0
    }
}

/// A histogram as a table cell: the quantiles, the maximum and the count.
pub fn describe(h: &Histogram) -> String {
    format!(
        "p50 {} | p90 {} | p99 {} | p99.9 {} | max {}  (n={})",
        h.quantile(0.5),
        h.quantile(0.9),
        h.quantile(0.99),
        h.quantile(0.999),
        h.max(),
        h.count()
    )
}

/// A histogram for the JSON line.
pub fn quantiles(h: &Histogram) -> Value {
    json!({
        "count": h.count(),
        "min": h.min(),
        "mean": (h.mean() * 10.0).round() / 10.0,
        "p50": h.quantile(0.5),
        "p90": h.quantile(0.9),
        "p99": h.quantile(0.99),
        "p99_9": h.quantile(0.999),
        "max": h.max(),
    })
}

impl Summary {
    pub fn failed(&self) -> u64 {
        self.failures.total()
    }

    /// Every connection opened and every expected message arrived.
    pub fn complete(&self) -> bool {
        self.failed() == 0 && self.delivered >= self.expected && (self.churn || self.lost == 0)
    }

    pub fn handshakes_per_sec(&self) -> f64 {
        rate(self.opened, self.connect_secs)
    }

    pub fn deliveries_per_sec(&self) -> f64 {
        rate(self.delivered, self.deliver_secs)
    }

    /// Server RSS growth per opened connection, bytes.
    pub fn rss_per_connection(&self) -> Option<f64> {
        if self.churn {
            // Connections do not accumulate: growth is not per connection.
            return None;
        }
        let (before, after) = (self.rss_before?, self.rss_connected?);
        (self.opened > 0).then(|| (after as f64 - before as f64) * 1024.0 / self.opened as f64)
    }

    /// The server's dropped messages and dropped deliveries by reason (the
    /// reasons of the two counters are distinct).
    fn drops(&self) -> Option<BTreeMap<String, f64>> {
        let metrics = self.server_metrics.as_ref()?;
        Some(
            metrics
                .iter()
                .filter_map(|(k, v)| {
                    let reason = DROP_COUNTERS
                        .iter()
                        .find_map(|name| k.strip_prefix(name)?.strip_prefix("{reason=\""))?;
                    Some((reason.trim_end_matches("\"}").to_string(), *v))
                })
                .collect(),
        )
    }

    fn server_counter(&self, name: &str) -> Option<f64> {
        self.server_metrics.as_ref()?.get(name).copied()
    }

    /// The machine-readable line.
    pub fn to_json(&self) -> Value {
        json!({
            "preset": self.preset,
            "connections": self.target_connections,
            "users": self.users,
            "threads": self.threads,
            "concurrency": self.concurrency,
            "source_addrs": self.source_addrs,
            "opened": self.opened,
            "failed": self.failed(),
            "failures": self.failures.to_json(),
            "lost": self.lost,
            "connect_seconds": self.connect_secs,
            "handshakes_per_sec": self.handshakes_per_sec().round(),
            "handshake_us": quantiles(&self.handshake),
            "closed_cleanly": self.cycles,
            "close_timeouts": self.close_timeouts,
            "messages": self.messages,
            "published": self.published,
            "publish_seconds": self.publish_secs,
            "publish_per_sec": rate(self.published, self.publish_secs).round(),
            "published_unheard": self.unheard,
            "expected": self.expected,
            "delivered": self.delivered,
            "missing": self.expected.saturating_sub(self.delivered),
            "deliver_seconds": self.deliver_secs,
            "delivered_per_sec": self.deliveries_per_sec().round(),
            "latency_us": quantiles(&self.latency),
            "server_rss_kib": {
                "before": self.rss_before,
                "connected": self.rss_connected,
                "end": self.rss_end,
            },
            "rss_per_connection_bytes": self.rss_per_connection().map(f64::round),
            "server_received": self.server_counter("ws_notify_messages_received_total"),
            "server_delivered": self.server_counter("ws_notify_messages_delivered_total"),
            "server_drops": self.drops(),
            "server_redis_reconnects": self.server_counter(RECONNECTS),
            "cpu_seconds": {
                "connect": self.cpu_connect.to_json(),
                "publish": self.cpu_publish.map(CpuSpan::to_json),
            },
            "metrics_error": self.metrics_error,
            "other_frames": self.other_frames,
            "pings": self.pings,
            "masked_frames": self.masked_frames,
            "complete": self.complete(),
        })
    }

    /// The human-readable table.
    pub fn to_table(&self) -> String {
        let mut t = Table::default();
        t.row(
            "preset",
            format!(
                "{} ({} threads, {} in flight, {} source addr)",
                self.preset, self.threads, self.concurrency, self.source_addrs
            ),
        );
        if self.churn {
            t.row(
                "handshakes",
                format!("{} in {:.2} s", self.opened, self.connect_secs),
            );
            t.row(
                "closed cleanly",
                format!("{} ({} close timeouts)", self.cycles, self.close_timeouts),
            );
        } else {
            t.row(
                "connections",
                format!(
                    "{} opened of {} ({} users)",
                    self.opened, self.target_connections, self.users
                ),
            );
            t.row("connect time", format!("{:.2} s", self.connect_secs));
        }
        t.row("failed", self.failures.describe());
        t.row("handshakes/s", format!("{:.0}", self.handshakes_per_sec()));
        t.row("handshake us", describe(&self.handshake));
        if !self.churn {
            t.row("lost while open", self.lost.to_string());
        }
        if self.messages > 0 {
            t.row(
                "published",
                format!(
                    "{} in {:.2} s ({:.0}/s; {} heard by no subscriber)",
                    self.published,
                    self.publish_secs,
                    rate(self.published, self.publish_secs),
                    self.unheard
                ),
            );
            t.row(
                "delivered / expected",
                format!(
                    "{} / {} (missing {})",
                    self.delivered,
                    self.expected,
                    self.expected.saturating_sub(self.delivered)
                ),
            );
            t.row(
                "delivered/s",
                format!(
                    "{:.0} (first publish to last receive: {:.2} s)",
                    self.deliveries_per_sec(),
                    self.deliver_secs
                ),
            );
            t.row("latency us", describe(&self.latency));
        }
        let kib = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} KiB"));
        if self.rss_before.is_some() {
            t.row(
                "server RSS",
                format!(
                    "before {} | connected {} | end {}",
                    kib(self.rss_before),
                    kib(self.rss_connected),
                    kib(self.rss_end)
                ),
            );
            if let Some(per) = self.rss_per_connection() {
                t.row("server RSS / connection", format!("{per:.0} bytes"));
            }
        }
        if let Some(drops) = self.drops() {
            let list: Vec<String> = drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
            t.row("server drops (this run)", list.join(" "));
            if let (Some(r), Some(d)) = (
                self.server_counter("ws_notify_messages_received_total"),
                self.server_counter("ws_notify_messages_delivered_total"),
            ) {
                t.row("server received/delivered", format!("{r} / {d}"));
            }
            if let Some(n) = self.server_counter(RECONNECTS).filter(|n| *n > 0.0) {
                t.row(
                    "server Redis reconnects",
                    format!("{n} (messages published meanwhile are lost)"),
                );
            }
        }
        t.row("cpu while connecting", self.cpu_connect.describe());
        if let Some(cpu) = &self.cpu_publish {
            t.row("cpu while publishing", cpu.describe());
        }
        if let Some(e) = &self.metrics_error {
            t.row("server /metrics", e.clone());
        }
        if self.other_frames + self.pings + self.masked_frames > 0 {
            t.row(
                "other frames",
                format!(
                    "{} text, {} pings, {} masked",
                    self.other_frames, self.pings, self.masked_frames
                ),
            );
        }
        t.row("complete", self.complete().to_string());
        t.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_message_series() {
        let text = "# HELP x\n# TYPE ws_notify_messages_dropped_total counter\n\
                    ws_notify_deliveries_dropped_total{reason=\"buffer_full\"} 12\n\
                    ws_notify_messages_dropped_total{reason=\"queue_full\"} 1\n\
                    ws_notify_messages_received_total 100\nws_notify_connections 5\n";
        let m = parse_metrics(text);
        assert_eq!(m.len(), 3);
        assert!(parse_metrics("ws_notify_redis_reconnects_total 3\n").contains_key(RECONNECTS));
        assert_eq!(m["ws_notify_messages_received_total"], 100.0);
        let mut before = BTreeMap::new();
        before.insert("ws_notify_messages_received_total".to_string(), 40.0);
        let d = metrics_delta(&before, &m);
        assert_eq!(d["ws_notify_messages_received_total"], 60.0);
        assert_eq!(
            d["ws_notify_deliveries_dropped_total{reason=\"buffer_full\"}"],
            12.0
        );
    }
}
