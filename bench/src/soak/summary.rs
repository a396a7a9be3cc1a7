//! What the soak measured, as one JSON line and a table.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::counts::Report;
use crate::report::{self, CpuSpan, Table};

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

    /// Dropped messages and dropped deliveries by reason (distinct reasons).
    fn drops(&self) -> Option<BTreeMap<String, f64>> {
        let mut drops = BTreeMap::new();
        for name in report::DROP_COUNTERS {
            drops.extend(self.reasons(name)?);
        }
        Some(drops)
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
            "server_drops": self.drops(),
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
        match (self.drops(), self.reasons("ws_notify_disconnects_total")) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_from_labels() {
        let mut m = BTreeMap::new();
        m.insert(
            "ws_notify_disconnects_total{reason=\"client_closed\"}".to_string(),
            7.0,
        );
        m.insert(
            "ws_notify_deliveries_dropped_total{reason=\"buffer_full\"}".to_string(),
            1.0,
        );
        let d = by_reason(&m, "ws_notify_disconnects_total");
        assert_eq!(d.len(), 1);
        assert_eq!(d["client_closed"], 7.0);
        assert_eq!(describe_reasons(&d), "client_closed=7");
    }
}
