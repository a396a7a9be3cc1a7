//! The recipes in deploy/ against the real server: every metric the Grafana
//! dashboard and the Prometheus alert rules query is one the binary exports;
//! the Kubernetes manifest names the image's port and user and a probe path the
//! server answers, and its settings start the real binary; the systemd unit
//! passes `systemd-analyze verify` and stops later than the server's shutdown
//! limit.
//!
//! YAML is read with PyYAML (Debian's python3-yaml) and the unit checked with
//! systemd's own tool; see tests/common/python.rs for when a test skips.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::procs;
use common::python::{python_with, required_tool_absent, run_python};
use common::*;
use serde_json::Value;
use ws_notify::config::parse_duration;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn repo_file(path: &str) -> PathBuf {
    Path::new(ROOT).join(path)
}

#[track_caller]
fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Prints every document of a YAML file as one JSON array.
const YAML_TO_JSON: &str = r#"
import json, sys, yaml
with open(sys.argv[1], encoding="utf-8") as f:
    print(json.dumps(list(yaml.safe_load_all(f))))
"#;

/// The documents of a YAML file in the repository, parsed by PyYAML.
#[track_caller]
fn yaml_documents(python: &Path, path: &str) -> Vec<Value> {
    let json = run_python(
        python,
        &format!("yaml {path}"),
        YAML_TO_JSON,
        &repo_file(path),
    );
    match serde_json::from_str(json.trim()) {
        Ok(Value::Array(docs)) => docs,
        other => panic!("{path}: not a list of YAML documents: {other:?}"),
    }
}

fn python_yaml(test: &str) -> Option<PathBuf> {
    python_with(test, &["yaml"], "python3-yaml")
}

/// The metric names a PromQL expression uses: identifiers that start with
/// `ws_notify_` or `process_` (label names and functions do not).
fn metric_names_in(expr: &str) -> Vec<String> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let preceded_by_word = rest[..start].chars().next_back().is_some_and(is_word);
        let word_len = rest[start..]
            .find(|c| !is_word(c))
            .unwrap_or(rest.len() - start);
        let word = &rest[start..start + word_len];
        if !preceded_by_word && (word.starts_with("ws_notify_") || word.starts_with("process_")) {
            names.push(word.to_string());
        }
        rest = &rest[start + word_len..];
    }
    names
}

/// Every sample name in a Prometheus text scrape (histograms included with
/// their `_bucket`, `_sum` and `_count` samples).
fn exported_sample_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every string under a key named `expr`, `query` or `definition`, anywhere in
/// a Grafana dashboard (panel targets and template variables).
fn dashboard_queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match v {
                    Value::String(s) if matches!(key.as_str(), "expr" | "query" | "definition") => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// The default of a variable in template.env (its `KEY=value` line).
#[track_caller]
fn template_default(key: &str) -> Option<String> {
    read("template.env")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

/// How long the server may take to stop after SIGTERM with these settings:
/// SHUTDOWN_TIMEOUT, plus SHUTDOWN_DRAIN where the server has it (each from
/// `setting`, else template.env's default).
#[track_caller]
fn shutdown_budget(setting: impl Fn(&str) -> Option<String>) -> Duration {
    ["SHUTDOWN_TIMEOUT", "SHUTDOWN_DRAIN"]
        .iter()
        .filter_map(|key| setting(key).or_else(|| template_default(key)))
        .map(|text| parse_duration(&text).unwrap_or_else(|e| panic!("{text:?}: {e}")))
        .sum()
}

// ---- Grafana dashboard and Prometheus alert rules ----------------------------------

#[test]
fn dashboard_and_alerts_query_only_metrics_the_server_exports() {
    let Some(python) = python_yaml("dashboard_and_alerts_query_only_metrics_the_server_exports")
    else {
        return;
    };
    let (_redis, gw) = setup(&[]);
    let scrape = gw.metrics_text();
    let exported = exported_sample_names(&scrape);

    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/ws-notify-dashboard.json"))
        .expect("the dashboard is JSON");
    let mut dashboard_exprs = Vec::new();
    dashboard_queries(&dashboard, &mut dashboard_exprs);
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64()),
            "panel id repeated: {title}"
        );
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} queries nothing");
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            assert!(!metric_names_in(expr).is_empty(), "{title}: {expr}");
        }
    }

    let alerts = yaml_documents(&python, "deploy/prometheus/ws-notify-alerts.yml");
    assert_eq!(alerts.len(), 1, "one YAML document");
    let mut alert_exprs = Vec::new();
    for group in alerts[0]["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().expect("expr");
            assert!(rule["labels"]["severity"].is_string(), "{name}");
            assert!(rule["annotations"]["summary"].is_string(), "{name}");
            if let Some(wait) = rule.get("for") {
                let wait = wait.as_str().expect("for: a duration");
                parse_duration(wait).unwrap_or_else(|e| panic!("{name} for {wait}: {e}"));
            }
            alert_exprs.push(expr.to_string());
        }
    }

    let names_of = |exprs: &[String]| -> BTreeSet<String> {
        exprs.iter().flat_map(|e| metric_names_in(e)).collect()
    };
    let (in_dashboard, in_alerts) = (names_of(&dashboard_exprs), names_of(&alert_exprs));
    for name in in_dashboard.iter().chain(&in_alerts) {
        assert!(
            exported.contains(name),
            "deploy/ queries {name}, which the server does not export; /metrics:\n{scrape}"
        );
    }
    // What the recipes are for.
    for name in [
        "ws_notify_connections",
        "ws_notify_users",
        "ws_notify_messages_received_total",
        "ws_notify_messages_delivered_total",
        "ws_notify_messages_dropped_total",
        "ws_notify_redis_connected",
        "ws_notify_redis_reconnects_total",
        "ws_notify_connections_rejected_total",
        "ws_notify_log_lines_dropped_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(
            in_dashboard.contains(name),
            "no dashboard panel shows {name}"
        );
    }
    for name in [
        "ws_notify_redis_connected",
        "ws_notify_messages_dropped_total",
        "process_open_fds",
        "process_max_fds",
        "ws_notify_redis_reconnects_total",
        "ws_notify_redis_reader_restarts_total",
    ] {
        assert!(in_alerts.contains(name), "no alert rule watches {name}");
    }
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names_in(
            r#"sum by (reason) (rate(ws_notify_messages_dropped_total{instance=~"$instance"}[$__rate_interval])) / process_max_fds"#
        ),
        ["ws_notify_messages_dropped_total", "process_max_fds"]
    );
    assert_eq!(
        metric_names_in("histogram_quantile(0.99, rate(ws_notify_x_seconds_bucket[5m]))"),
        ["ws_notify_x_seconds_bucket"]
    );
    assert!(metric_names_in("my_process_open_fds + up").is_empty());
}

// ---- Kubernetes ---------------------------------------------------------------------

/// The `EXPOSE` port and the numeric `USER` of the Dockerfile's final stage.
fn dockerfile_port_and_user() -> (u64, u64) {
    let dockerfile = read("Dockerfile");
    let last = |directive: &str| {
        dockerfile
            .lines()
            .filter_map(|l| l.strip_prefix(directive))
            .next_back()
            .unwrap_or_else(|| panic!("Dockerfile has no {directive}"))
            .trim()
            .to_string()
    };
    let port = last("EXPOSE ").parse().expect("EXPOSE <port>");
    let user = last("USER ");
    let uid = user.split(':').next().unwrap_or_default();
    (port, uid.parse().expect("USER <uid>:<gid>"))
}

/// A probe's or a Service's port: a number, or the name of a container port.
#[track_caller]
fn resolve_port(port: &Value, container_ports: &[Value]) -> u64 {
    if let Some(number) = port.as_u64() {
        return number;
    }
    let name = port.as_str().expect("a port number or name");
    container_ports
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

#[test]
fn kubernetes_manifest_fits_the_image_and_the_server() {
    let Some(python) = python_yaml("kubernetes_manifest_fits_the_image_and_the_server") else {
        return;
    };
    let docs = yaml_documents(&python, "deploy/kubernetes/ws-notify.yaml");
    let of_kind = |kind: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in the manifest"))
    };
    let (deployment, service) = (of_kind("Deployment"), of_kind("Service"));
    let (image_port, image_uid) = dockerfile_port_and_user();

    let pod = &deployment["spec"]["template"];
    let containers = pod["spec"]["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    let ports = container["ports"].as_array().expect("ports").clone();
    assert_eq!(ports.len(), 1, "one port: WebSocket, /health and /metrics");
    assert_eq!(
        ports[0]["containerPort"], image_port,
        "the Dockerfile's EXPOSE"
    );

    let env = container["env"].as_array().expect("env");
    let plain: BTreeMap<String, String> = env
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    if let Some(port) = plain.get("WS_PORT") {
        assert_eq!(
            port,
            &image_port.to_string(),
            "WS_PORT is the container port"
        );
    }
    for secret in ["JWT_SECRET_KEY", "REDIS_PASSWORD"] {
        let entry = env
            .iter()
            .find(|e| e["name"] == secret)
            .unwrap_or_else(|| panic!("{secret} not set"));
        assert!(
            entry["valueFrom"]["secretKeyRef"]["name"].is_string(),
            "{secret} comes from a Secret: {entry}"
        );
    }

    // Probes: readiness on the path the server reports Redis on, liveness on TCP.
    let readiness = &container["readinessProbe"]["httpGet"];
    let path = readiness["path"].as_str().expect("readiness httpGet path");
    assert_eq!(path, "/health");
    assert_eq!(resolve_port(&readiness["port"], &ports), image_port);
    let liveness = &container["livenessProbe"]["tcpSocket"];
    assert_eq!(resolve_port(&liveness["port"], &ports), image_port);

    // The kubelet's SIGKILL comes after the server's own shutdown limit.
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let budget = shutdown_budget(|key| plain.get(key).cloned());
    assert!(
        Duration::from_secs(grace) > budget + Duration::from_secs(5),
        "terminationGracePeriodSeconds {grace} leaves no margin over {budget:?}"
    );

    // Non-root as the image's user, nothing writable, no privileges.
    assert_eq!(pod["spec"]["securityContext"]["runAsUser"], image_uid);
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(container["resources"]["requests"].is_object());
    assert!(container["resources"]["limits"]["memory"].is_string());

    // The Service reaches the container port of these pods.
    let pod_labels = pod["metadata"]["labels"].as_object().expect("pod labels");
    for (key, value) in service["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(pod_labels.get(key), Some(value), "selector {key}");
    }
    let service_ports = service["spec"]["ports"].as_array().expect("service ports");
    for port in service_ports {
        assert_eq!(resolve_port(&port["targetPort"], &ports), image_port);
    }

    // The manifest's settings start the real server (a bad value would exit 2),
    // which answers the readiness path 200 while subscribed to Redis and 503
    // when not, while the liveness port keeps accepting.
    let mut settings: Vec<(&str, &str)> = plain
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "WS_HOST" | "WS_PORT" | "REDIS_HOST" | "REDIS_PORT"
            )
        })
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    settings.push(("LOGGER_LEVEL", "debug"));
    let mut redis = RedisServer::start();
    let gw = Gateway::start(redis.port, &settings);
    gw.wait_redis_connected(PROMPT);
    assert_eq!(http_get(gw.port, path, &[]).status, 200);
    redis.kill();
    wait_until(
        PROMPT,
        "the readiness path answers 503 without Redis",
        || http_get(gw.port, path, &[]).status == 503,
    );
    TcpStream::connect(("127.0.0.1", gw.port)).expect("the liveness port accepts");
}

// ---- systemd ------------------------------------------------------------------------

/// `key=value` lines of a unit file (all values of a repeated key).
fn unit_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with(['#', ';', '[']) || line.is_empty() {
            continue;
        }
        let (key, value) = line.split_once('=').expect("key=value");
        settings
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    settings
}

#[test]
fn systemd_unit_verifies_and_outlasts_the_shutdown_limit() {
    let unit = read("deploy/systemd/ws-notify.service");
    let settings = unit_settings(&unit);
    let one = |key: &str| -> &str {
        match settings.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("{key}: expected one value, got {other:?}"),
        }
    };
    let stop = parse_duration(one("TimeoutStopSec")).expect("TimeoutStopSec");
    let budget = shutdown_budget(|_| None);
    assert!(
        stop > budget + Duration::from_secs(5),
        "TimeoutStopSec {stop:?} leaves no margin over {budget:?}"
    );
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("EnvironmentFile"), "/etc/ws-notify/ws-notify.env");
    assert!(one("LimitNOFILE").parse::<u64>().is_ok_and(|n| n >= 65_536));
    assert_eq!(one("DynamicUser"), "yes");
    assert_eq!(one("CapabilityBoundingSet"), "");

    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        required_tool_absent(
            "systemd_unit_verifies_and_outlasts_the_shutdown_limit",
            "systemd-analyze not found (Debian: apt-get install systemd); the unit was not verified",
        );
        return;
    };
    assert!(version.status.success(), "systemd-analyze --version");
    // verify checks that ExecStart names an executable: point a copy at the
    // binary under test instead of /usr/local/bin; the rest is the file as is.
    let exec_start = one("ExecStart");
    let dir = TempDir::new("systemd-unit");
    let copy = dir.file("ws-notify.service");
    let binary = env!("CARGO_BIN_EXE_ws-notify");
    std::fs::write(
        &copy,
        unit.replace(
            &format!("ExecStart={exec_start}"),
            &format!("ExecStart={binary}"),
        ),
    )
    .expect("write the unit copy");
    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify").arg(&copy);
    let out = procs::run("systemd-analyze verify", verify, Duration::from_secs(60));
    // A warning (an unknown or misspelt key is only "ignoring") fails too.
    assert!(
        out.code == Some(0) && out.stderr.trim().is_empty() && out.stdout.trim().is_empty(),
        "systemd-analyze verify: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.code,
        out.stdout,
        out.stderr
    );
}
