//! `/metrics` of the real binary, read by a Prometheus text parser nobody on
//! this team wrote (`prometheus_client.parser` from Python): every family
//! parses and is declared once, the standard `process_*` metrics are there with
//! sane values, `ws_notify_build_info` carries the version, counters follow
//! the naming conventions, the delivery latency histogram is consistent with
//! itself and with the delivered counter, and the bytes written count the
//! frames delivered. The parser comes from Debian's
//! python3-prometheus-client (installed by `.ci/run`); see tests/common/python.rs
//! for when the test skips.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use common::python::{python_with, run_python};
use common::*;
use serde::Deserialize;
use tungstenite::Message;

/// Prints every family the parser yields as one JSON line.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
text = open(sys.argv[1], encoding="utf-8").read()
print(json.dumps([
    {"name": f.name, "type": f.type, "help": f.documentation,
     "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
    for f in text_string_to_metric_families(text)
], allow_nan=False))
"#;

#[derive(Debug, Deserialize)]
struct Family {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    help: String,
    samples: Vec<Sample>,
}

#[derive(Debug, Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// A family by the parser's name for it.
#[track_caller]
fn family<'a>(families: &HashMap<&str, &'a Family>, name: &str, text: &str) -> &'a Family {
    families
        .get(name)
        .unwrap_or_else(|| panic!("no family {name} in /metrics:\n{text}"))
}

/// The one sample of a family without labels.
#[track_caller]
fn value(families: &HashMap<&str, &Family>, name: &str, text: &str) -> f64 {
    let f = family(families, name, text);
    assert_eq!(f.samples.len(), 1, "{f:?}");
    f.samples[0].value
}

#[test]
fn metrics_parse_with_the_prometheus_client_parser() {
    let Some(python) = python_with(
        "metrics_parse_with_the_prometheus_client_parser",
        &["prometheus_client.parser"],
        "python3-prometheus-client",
    ) else {
        return;
    };
    let before_start = unix_now();
    let (redis, gw) = setup(&[]);
    // Some traffic, so that the counters have moved.
    let (mut ws, _hello) = ws_open(gw.port, &gw.token("mia"));
    assert_eq!(redis.notify("mia", r#"{"type":"t","payload":1}"#), 1);
    assert_eq!(recv_json(&mut ws, PROMPT)["type"], "t");
    gw.wait_metric_at_least("ws_notify_messages_delivered_total", 1.0);
    // A second message, whose frame must be among the bytes written after this.
    let bytes_before = gw.metric("ws_notify_bytes_written_total");
    assert_eq!(redis.notify("mia", r#"{"type":"t","payload":2}"#), 1);
    let second = recv_text(&mut ws, PROMPT);
    ws.send(Message::Close(None)).expect("send close");
    gw.wait_metric_at_least("ws_notify_messages_delivered_total", 2.0);

    let text = gw.metrics_text();
    let scraped_at = unix_now();
    let dir = TempDir::new("metrics-format");
    let file = dir.file("metrics.txt");
    std::fs::write(&file, &text).expect("write the scrape");
    let json = run_python(&python, "prometheus_client parser", PARSE, &file);
    let families: Vec<Family> = serde_json::from_str(json.trim())
        .unwrap_or_else(|e| panic!("parser output ({e}): {json}\nscrape:\n{text}"));

    // Every sample line was parsed into a declared family, each family once.
    let sample_lines = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    let parsed: usize = families.iter().map(|f| f.samples.len()).sum();
    assert_eq!(parsed, sample_lines, "samples lost in parsing:\n{text}");
    let mut by_name = HashMap::new();
    for f in &families {
        assert!(
            by_name.insert(f.name.as_str(), f).is_none(),
            "family {} declared twice:\n{text}",
            f.name
        );
        assert_ne!(f.kind, "unknown", "{} has no # TYPE:\n{text}", f.name);
        assert_ne!(f.kind, "untyped", "{} has no # TYPE:\n{text}", f.name);
        assert!(!f.help.is_empty(), "{} has no # HELP", f.name);
        assert!(!f.samples.is_empty(), "{} has no sample", f.name);
        for s in &f.samples {
            assert!(s.value.is_finite() && s.value >= 0.0, "{s:?}");
        }
        if f.kind == "counter" && f.name.starts_with("ws_notify_") {
            for s in &f.samples {
                assert!(s.name.ends_with("_total"), "counter sample {s:?}");
            }
        }
    }
    let mut type_lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let declared = type_lines.len();
    type_lines.sort_unstable();
    type_lines.dedup();
    assert_eq!(type_lines.len(), declared, "a # TYPE repeated:\n{text}");

    // The standard process metrics, with values that make sense.
    // (The parser names a counter family without its _total.)
    let cpu = family(&by_name, "process_cpu_seconds", &text);
    assert_eq!(cpu.kind, "counter");
    assert_eq!(cpu.samples[0].name, "process_cpu_seconds_total");
    assert!(cpu.samples[0].value >= 0.0);
    let started = value(&by_name, "process_start_time_seconds", &text);
    // The boot time in /proc/stat is whole seconds and may drift from the wall
    // clock on a long-running host: "started within the last hour" holds anyway.
    assert!(
        started > before_start - 3600.0 && started < scraped_at + 1.0,
        "start time {started}, test ran {before_start}..{scraped_at}"
    );
    let rss = value(&by_name, "process_resident_memory_bytes", &text);
    assert!(rss > 0.0);
    assert!(value(&by_name, "process_virtual_memory_bytes", &text) >= rss);
    let open = value(&by_name, "process_open_fds", &text);
    let max = value(&by_name, "process_max_fds", &text);
    assert!(open > 0.0 && max >= open, "open {open}, max {max}");
    // The compatibility names report the same sample.
    assert_eq!(
        value(&by_name, "ws_notify_resident_memory_bytes", &text),
        rss
    );
    assert_eq!(value(&by_name, "ws_notify_open_fds", &text), open);

    let build = family(&by_name, "ws_notify_build_info", &text);
    assert_eq!(build.kind, "gauge");
    assert_eq!(build.samples.len(), 1, "{build:?}");
    assert_eq!(
        build.samples[0].labels,
        BTreeMap::from([("version".to_string(), env!("CARGO_PKG_VERSION").to_string())])
    );
    assert_eq!(build.samples[0].value, 1.0);

    // The traffic above is in the parsed numbers.
    let delivered = family(&by_name, "ws_notify_messages_delivered", &text).samples[0].value;
    assert!(delivered >= 2.0, "{delivered}");

    // Bytes written: at least the second message's frame (unmasked: a 2-byte
    // header up to 125 bytes of payload, 4 up to 65,535) since the scrape before it.
    let bytes = family(&by_name, "ws_notify_bytes_written", &text);
    assert_eq!(bytes.kind, "counter");
    assert_eq!(bytes.samples[0].name, "ws_notify_bytes_written_total");
    let header = if second.len() <= 125 { 2 } else { 4 };
    assert!(
        bytes.samples[0].value - bytes_before >= (second.len() + header) as f64,
        "bytes written grew from {bytes_before} to {}, the frame alone is {} bytes",
        bytes.samples[0].value,
        second.len() + header
    );

    // The latency histogram: the documented buckets, cumulative, +Inf is the
    // count, one observation per delivery, and the deliveries took some time.
    let latency = family(&by_name, "ws_notify_delivery_latency_seconds", &text);
    assert_eq!(latency.kind, "histogram");
    let samples = |suffix: &str| -> Vec<&Sample> {
        let name = format!("ws_notify_delivery_latency_seconds{suffix}");
        latency.samples.iter().filter(|s| s.name == name).collect()
    };
    let buckets = samples("_bucket");
    let bounds: Vec<f64> = buckets
        .iter()
        .map(|s| s.labels["le"].parse().expect("le is a number"))
        .collect();
    assert_eq!(
        bounds,
        [
            0.00005,
            0.0001,
            0.00025,
            0.0005,
            0.001,
            0.0025,
            0.005,
            0.01,
            0.025,
            0.05,
            0.1,
            0.25,
            0.5,
            1.0,
            f64::INFINITY
        ],
        "{latency:?}"
    );
    for pair in buckets.windows(2) {
        assert!(
            pair[0].value <= pair[1].value,
            "not cumulative: {latency:?}"
        );
    }
    let (sum, count) = (samples("_sum"), samples("_count"));
    assert_eq!((sum.len(), count.len()), (1, 1), "{latency:?}");
    let count = count[0].value;
    assert_eq!(buckets[buckets.len() - 1].value, count, "+Inf is the count");
    assert_eq!(count, delivered, "one observation per delivery");
    assert!(sum[0].value > 0.0, "{latency:?}");
    // A delivery on an idle loopback takes well under a second.
    assert_eq!(buckets[buckets.len() - 2].value, count, "{latency:?}");
}
