//! Monitoring against the real thing: a running `vigil demo` scraped by a real Prometheus
//! (Debian's `prometheus`) with the shipped rules; the dashboards' and rules' metrics checked
//! against the live `/metrics`; the JSON log file; OTLP traces received by a collector stand-in
//! that decodes the protobuf the exporter sends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Process, eventually, repo, saved_models, start_demo, tool};
use prost::Message as _;
use serde_json::Value;

fn get_text(url: &str) -> Option<String> {
    reqwest::blocking::get(url).ok()?.text().ok()
}

fn prometheus_query(prom: SocketAddr, query: &str) -> Vec<Value> {
    let url = format!("http://{prom}/api/v1/query");
    let body: Value = reqwest::blocking::Client::new()
        .get(url)
        .query(&[("query", query)])
        .send()
        .and_then(|r| r.json())
        .unwrap_or(Value::Null);
    body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Starts Prometheus on loopback scraping `target` every second with the shipped rules.
fn start_prometheus(
    bin: &std::path::Path,
    dir: &std::path::Path,
    target: SocketAddr,
) -> (Process, SocketAddr) {
    let port = common::free_port();
    let rules = repo().join("monitoring/rules/vigil.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: vigil\n    static_configs:\n      - targets: [\"{target}\"]\n",
        rules.display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(bin)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = Process(child);
    eventually("Prometheus to be ready", Duration::from_secs(60), || {
        let r = reqwest::blocking::get(format!("http://{addr}/-/ready")).ok()?;
        r.status().is_success().then_some(())
    });
    (p, addr)
}

#[test]
fn prometheus_scrapes_vigil_and_fires_vigil_down_when_it_stops() {
    let Some(bin) = tool("prometheus") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut vigil, addr) = start_demo(&saved_models(), dir.path(), &["--rate", "200"], &[]);
    let (_prometheus, prom) = start_prometheus(&bin, dir.path(), addr);

    let throughput = eventually(
        "a throughput value from Prometheus",
        Duration::from_secs(60),
        || {
            let r = prometheus_query(
                prom,
                r#"rate(vigil_events_consumed_total{job="vigil"}[5s])"#,
            );
            let v: f64 = r.first()?["value"][1].as_str()?.parse().ok()?;
            (v > 0.0).then_some(v)
        },
    );
    assert!(throughput > 10.0, "{throughput} events/s");
    let up = prometheus_query(prom, r#"up{job="vigil"}"#);
    assert_eq!(up[0]["value"][1], "1");
    assert!(prometheus_query(prom, r#"ALERTS{alertname="VigilDown"}"#).is_empty());

    assert!(vigil.terminate().success());
    let state = eventually(
        "VigilDown to be pending or firing",
        Duration::from_secs(60),
        || {
            let r = prometheus_query(prom, r#"ALERTS{alertname="VigilDown"}"#);
            r.first()
                .and_then(|a| a["metric"]["alertstate"].as_str().map(str::to_string))
        },
    );
    assert!(state == "pending" || state == "firing", "{state}");
}

/// Every `vigil_*` and `vigil:*` name in a PromQL expression.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let mut token = String::new();
    let mut in_string = false;
    for c in expr.chars().chain([' ']) {
        if c == '"' {
            in_string = !in_string;
        }
        if !in_string && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            token.push(c);
            continue;
        }
        if token.starts_with("vigil_") || token.starts_with("vigil:") {
            into.insert(std::mem::take(&mut token));
        }
        token.clear();
    }
}

fn dashboard_exprs(v: &Value, into: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => into.push(e.clone()),
                    _ => dashboard_exprs(v, into),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, into)),
        _ => {}
    }
}

#[test]
fn every_metric_in_dashboards_and_rules_is_exported_by_a_running_vigil() {
    let mut used = BTreeSet::new();
    let mut recorded = BTreeSet::new();
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("monitoring/rules/vigil.yml")).unwrap(),
    )
    .unwrap();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            metric_names(rule["expr"].as_str().unwrap(), &mut used);
            if let Some(r) = rule["record"].as_str() {
                recorded.insert(r.to_string());
            }
        }
    }
    let mut dashboards = 0;
    for entry in std::fs::read_dir(repo().join("monitoring/grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut exprs = Vec::new();
        dashboard_exprs(&json, &mut exprs);
        assert!(!exprs.is_empty(), "{} has no queries", path.display());
        for e in exprs {
            metric_names(&e, &mut used);
        }
        dashboards += 1;
    }
    assert!(dashboards > 0);
    assert!(used.len() > 20, "{used:?}");

    let dir = tempfile::tempdir().unwrap();
    let (_vigil, addr) = start_demo(
        &saved_models(),
        dir.path(),
        &["--rate", "200", "--malformed-share", "0.02"],
        &[],
    );
    let url = format!("http://{addr}/metrics");
    // Lag arrives with librdkafka's first statistics, offsets with the first acknowledgement.
    let exported = eventually(
        "lag and offsets in /metrics",
        Duration::from_secs(60),
        || {
            let text = get_text(&url)?;
            let names: BTreeSet<String> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split(['{', ' ']).next())
                .map(str::to_string)
                .collect();
            (names.contains("vigil_consumer_lag") && names.contains("vigil_stored_offset"))
                .then_some(names)
        },
    );
    let missing: Vec<_> = used
        .iter()
        .filter(|n| {
            if n.contains(':') {
                !recorded.contains(*n)
            } else {
                !exported.contains(*n)
            }
        })
        .collect();
    assert!(
        missing.is_empty(),
        "used by dashboards or rules but not exported: {missing:?}"
    );
}

#[test]
fn json_log_lines_carry_timestamp_level_target_message_and_the_event_ids() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("logs/vigil.log");
    let (mut vigil, addr) = start_demo(
        &saved_models(),
        dir.path(),
        &[
            "--rate",
            "300",
            "--malformed-share",
            "0.03",
            "--anomaly-share",
            "0.05",
        ],
        &[("VIGIL_LOG__FILE", log.to_str().unwrap())],
    );
    eventually(
        "an alert and a dead letter in the log file",
        Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(&log).ok()?;
            (text.contains(r#""message":"alert""#) && text.contains("dead-letter topic"))
                .then_some(())
        },
    );
    // The alerts just logged are published, and the feed has them. An alert is logged when it
    // is scored and reaches the feed once the broker has it, a moment later.
    let recent: Value = eventually(
        "the logged alerts in the feed",
        Duration::from_secs(10),
        || {
            let recent: Value = reqwest::blocking::get(format!("http://{addr}/alerts/recent"))
                .ok()?
                .json()
                .ok()?;
            (recent["count"].as_u64()? > 0).then_some(recent)
        },
    );
    assert!(recent["alerts"][0]["transaction_id"].is_string());
    assert!(vigil.terminate().success());

    let text = std::fs::read_to_string(&log).unwrap();
    let (mut alerts, mut dead_letters) = (0, 0);
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(
                v[key].as_str().is_some_and(|s| !s.is_empty()),
                "no {key}: {line}"
            );
        }
        chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap()).unwrap();
        let per_event = match v["message"].as_str().unwrap() {
            "alert" => {
                alerts += 1;
                for key in ["transaction_id", "account_id", "alert_id"] {
                    assert!(v[key].as_str().is_some_and(|s| !s.is_empty()), "{line}");
                }
                true
            }
            m if m.contains("dead-letter topic") => {
                dead_letters += 1;
                assert!(v["code"].as_str().is_some(), "{line}");
                true
            }
            _ => false,
        };
        if per_event {
            for key in ["transaction_id", "account_id"] {
                assert!(v[key].is_string(), "no {key}: {line}");
            }
            for key in ["partition", "offset"] {
                assert!(v[key].is_i64(), "no {key}: {line}");
            }
        }
    }
    assert!(
        alerts > 0 && dead_letters > 0,
        "{alerts} alerts, {dead_letters} dead letters"
    );
    // The same events went to stdout, also as JSON.
    let stdout = std::fs::read_to_string(dir.path().join("stdout.log")).unwrap();
    assert!(stdout.lines().any(|l| l.contains(r#""message":"alert""#)));
}

/// An OTLP/HTTP collector stand-in: accepts POSTs and keeps their bodies.
fn otlp_receiver() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let keep = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        reader.read_line(&mut line).unwrap();
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                length = v.trim().parse().unwrap();
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    keep.lock().unwrap().push(body);
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                    );
                }
            });
        }
    });
    (addr, bodies)
}

#[test]
fn traces_export_an_event_span_with_a_child_per_stage_over_otlp() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;

    let (collector, bodies) = otlp_receiver();
    let dir = tempfile::tempdir().unwrap();
    let (mut vigil, _) = start_demo(
        &saved_models(),
        dir.path(),
        &[
            "--rate",
            "100",
            "--malformed-share",
            "0.05",
            "--anomaly-share",
            "0.05",
        ],
        &[
            (
                "VIGIL_TRACES__OTLP_ENDPOINT",
                &format!("http://{collector}"),
            ),
            ("VIGIL_TRACES__SAMPLE_RATIO", "1.0"),
        ],
    );
    std::thread::sleep(Duration::from_secs(3));
    // Shutdown flushes the spans still queued.
    assert!(vigil.terminate().success());

    let mut spans = Vec::new();
    let mut services = BTreeSet::new();
    for body in bodies.lock().unwrap().iter() {
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        for rs in request.resource_spans {
            for kv in rs.resource.iter().flat_map(|r| r.attributes.iter()) {
                if let (true, Some(Any::StringValue(s))) = (
                    kv.key == "service.name",
                    kv.value.as_ref().and_then(|v| v.value.clone()),
                ) {
                    services.insert(s);
                }
            }
            spans.extend(rs.scope_spans.into_iter().flat_map(|s| s.spans));
        }
    }
    assert_eq!(services, BTreeSet::from(["vigil".to_string()]));
    let events: std::collections::HashMap<Vec<u8>, _> = spans
        .iter()
        .filter(|s| s.name == "event")
        .map(|s| (s.span_id.clone(), s))
        .collect();
    assert!(events.len() > 50, "{} event spans", events.len());
    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for stage in [
        "decode",
        "features",
        "models",
        "consensus",
        "publish",
        "acknowledge",
    ] {
        assert!(names.contains(stage), "no {stage} span in {names:?}");
    }
    for s in spans.iter().filter(|s| s.name != "event") {
        let parent = events
            .get(&s.parent_span_id)
            .unwrap_or_else(|| panic!("{} span without its event span", s.name));
        assert_eq!(parent.trace_id, s.trace_id);
    }
    let attrs = |s: &opentelemetry_proto::tonic::trace::v1::Span| -> BTreeSet<String> {
        s.attributes.iter().map(|kv| kv.key.clone()).collect()
    };
    let outcomes: BTreeSet<String> = events
        .values()
        .filter_map(|s| {
            s.attributes
                .iter()
                .find(|kv| kv.key == "outcome")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Any::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
        })
        .collect();
    assert!(
        outcomes.contains("clean") && outcomes.contains("dead_letter"),
        "{outcomes:?}"
    );
    let scored = events
        .values()
        .find(|s| attrs(s).contains("transaction_id"))
        .expect("an event span with the transaction id");
    for key in ["partition", "offset", "account_id", "outcome"] {
        assert!(attrs(scored).contains(key), "no {key} on the event span");
    }
}
