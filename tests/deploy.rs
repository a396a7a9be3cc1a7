//! The recipes in deploy/ against the real server: every metric the Grafana
//! dashboard and the Prometheus alert rules query is one the binary exports,
//! and a real Prometheus scraping the real binary finds data for every panel's
//! query and evaluates every alert rule without error; the Kubernetes manifest
//! names the image's port and user and a probe path the server answers, and its
//! settings start the real binary; the systemd unit passes `systemd-analyze
//! verify`, keeps an exposure score of at most 2.0 (`systemd-analyze
//! security`) and stops later than the server's shutdown limit.
//!
//! YAML is read with PyYAML (Debian's python3-yaml), the unit checked with
//! systemd's own tool, the rules with Prometheus's (Debian's prometheus
//! package); `.ci/run` installs them. Without one a test prints `SKIPPED`,
//! except under `WS_NOTIFY_REQUIRE_CLIENTS=1` (CI), where it fails.

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
        "ws_notify_delivery_latency_seconds_bucket",
        "ws_notify_bytes_written_total",
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
        "ws_notify_delivery_latency_seconds_bucket",
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

    // The hardening keeps systemd's exposure score at most 2.0 on its 0-10
    // scale (the threshold is given in tenths): the unit scores 1.4, and
    // dropping a few options (the syscall filter, the kernel protections)
    // brings it above 4.
    let mut security = Command::new("systemd-analyze");
    security
        .args(["security", "--offline=yes", "--threshold=20"])
        .arg(&copy);
    let out = procs::run(
        "systemd-analyze security",
        security,
        Duration::from_secs(60),
    );
    assert_eq!(
        out.code,
        Some(0),
        "exposure above 2.0:\n{}\n{}",
        out.stdout,
        out.stderr
    );
}

// ---- A real Prometheus --------------------------------------------------------------

/// Whether `prometheus` and `promtool` (Debian: prometheus) run; if not, a
/// printed skip (a failure when CI requires every tool).
fn prometheus_tools(test: &str) -> bool {
    let works = |program: &str| {
        Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works("prometheus") && works("promtool") {
        return true;
    }
    required_tool_absent(
        test,
        "prometheus and promtool not found (Debian: apt-get install prometheus)",
    );
    false
}

/// Percent-encodes a query parameter.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on a free port that scrapes one gateway every second
/// and evaluates deploy/'s alert rules every second; killed on drop.
struct Prometheus {
    port: u16,
    _proc: procs::Proc,
    _dir: TempDir,
}

impl Prometheus {
    fn start(gateway_port: u16) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config = dir.file("prometheus.yml");
        let rules = repo_file("deploy/prometheus/ws-notify-alerts.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [\"{}\"]\n\
                 scrape_configs:\n  - job_name: ws-notify\n    static_configs:\n      \
                 - targets: [\"127.0.0.1:{gateway_port}\"]\n",
                rules.display()
            ),
        )
        .expect("write prometheus.yml");
        // A port taken between free_port and the bind ends the process: retry.
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut cmd = Command::new("prometheus");
            cmd.arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.file("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"));
            let mut proc = procs::Proc::spawn("prometheus", cmd);
            // Its first start creates the database: allow a loaded machine time.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let ready = try_http(
                    port,
                    b"GET /-/ready HTTP/1.0\r\nHost: t\r\n\r\n",
                    Duration::from_secs(2),
                );
                if ready.is_ok_and(|r| r.status == 200) {
                    return Prometheus {
                        port,
                        _proc: proc,
                        _dir: dir,
                    };
                }
                if proc.wait(Duration::ZERO).is_some() {
                    last_error = proc.stderr();
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "prometheus not ready within 60 s; stderr:\n{}",
                    proc.stderr()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("prometheus exited before it was ready; stderr:\n{last_error}");
    }

    /// `GET /api/v1/<path>` (HTTP/1.0: the body ends at EOF, never chunked).
    #[track_caller]
    fn api(&self, path_and_query: &str) -> Value {
        let resp = raw_request(
            self.port,
            format!("GET /api/v1/{path_and_query} HTTP/1.0\r\nHost: t\r\n\r\n"),
        );
        let body: Value = serde_json::from_str(&resp.body)
            .unwrap_or_else(|e| panic!("{path_and_query}: {e}: {}", resp.body));
        assert_eq!(body["status"], "success", "{path_and_query}: {body}");
        body["data"].clone()
    }

    /// The series an instant query returns.
    #[track_caller]
    fn query(&self, promql: &str) -> Vec<Value> {
        let data = self.api(&format!("query?query={}", url_encode(promql)));
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

/// A dashboard query as Prometheus would receive it from Grafana: the
/// variables replaced by what "All" and a short range stand for.
fn as_grafana_sends_it(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$instance", ".*")
}

#[test]
fn dashboard_queries_and_alert_rules_run_on_a_real_prometheus() {
    let test = "dashboard_queries_and_alert_rules_run_on_a_real_prometheus";
    if !prometheus_tools(test) {
        return;
    }
    let mut check = Command::new("promtool");
    check
        .args(["check", "rules"])
        .arg(repo_file("deploy/prometheus/ws-notify-alerts.yml"));
    let out = procs::run("promtool check rules", check, Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);

    let (mut redis, gw) = setup(&[]);
    let prometheus = Prometheus::start(gw.port);
    // rate() and increase() need two samples in their range: wait for three scrapes.
    wait_until(secs(60), "three scrapes of the gateway", || {
        prometheus
            .query(r#"count_over_time(ws_notify_build_info{job="ws-notify"}[1m])"#)
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .is_some_and(|n| n >= 3.0)
    });

    // Every panel's query parses and finds data.
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/ws-notify-dashboard.json"))
        .expect("the dashboard is JSON");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = as_grafana_sends_it(target["expr"].as_str().expect("expr"));
            assert!(
                !prometheus.query(&expr).is_empty(),
                "panel {}: {expr} finds no series",
                panel["title"]
            );
        }
    }
    // The Instance drop-down's label_values(metric, label).
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        let Some(definition) = variable["definition"].as_str() else {
            continue;
        };
        let inner = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .expect("label_values(metric, label)");
        let (metric, label) = inner.split_once(',').expect("metric, label");
        let series = prometheus.query(metric.trim());
        assert!(
            series.iter().any(|s| s["metric"][label.trim()].is_string()),
            "{definition}: no value"
        );
    }

    // Every alert rule evaluates without error.
    wait_until(PROMPT, "every alert rule evaluated", || {
        let data = prometheus.api("rules");
        let rules: Vec<&Value> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        assert!(!rules.is_empty(), "no rules loaded: {data}");
        for rule in &rules {
            assert_ne!(rule["health"], "err", "{rule}");
        }
        rules.iter().all(|r| r["health"] == "ok")
    });
    // And the Redis alert sees an outage (pending: it fires after its 1m).
    redis.kill();
    wait_until(secs(30), "WsNotifyRedisDisconnected pending", || {
        prometheus.api("alerts")["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["labels"]["alertname"] == "WsNotifyRedisDisconnected")
    });
}
