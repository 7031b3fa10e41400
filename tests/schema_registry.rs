//! Avro through a Schema Registry against the real broker: events written by Confluent's own
//! serializer (confluent-kafka's `AvroSerializer`) with evolving writer schemas, alerts read back
//! by Confluent's own `AvroDeserializer` (tests/confluent_avro.py).
//!
//! No Schema Registry can be installed on this machine from a package registry (Confluent's is
//! not on Maven Central; Apicurio 3.3.3's modules are only partly there; Karapace is not on
//! PyPI), so the registry here is the part of the Confluent REST API both clients call,
//! served in-process: it stores schemas and hands out ids, which is all a registry does on this
//! path (compatibility rules are the producer's registry's business, not vigil's).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::kafka::*;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use rdkafka::message::{Headers, Message};
use serde_json::{Value, json};

/// Registered schemas: (subject, schema text); the id is the index plus one.
#[derive(Default)]
struct Schemas {
    registered: Vec<(String, String)>,
    /// `GET /schemas/ids/{id}` requests by vigil (its user agent is ureq's).
    fetched_by_vigil: BTreeMap<u32, usize>,
    /// vigil's next requests answered 503, as a registry in the middle of a restart does.
    unavailable_for_vigil: usize,
}

type Shared = Arc<Mutex<Schemas>>;

async fn register(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let Some(schema) = body["schema"].as_str() else {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error_code": 42201, "message": "no schema"})),
        );
    };
    let mut s = s.lock().unwrap();
    let known = s
        .registered
        .iter()
        .position(|(sub, text)| *sub == subject && text == schema);
    let id = match known {
        Some(i) => i + 1,
        None => {
            s.registered.push((subject, schema.to_string()));
            s.registered.len()
        }
    };
    (StatusCode::OK, Json(json!({ "id": id })))
}

async fn schema_by_id(
    State(s): State<Shared>,
    Path(id): Path<u32>,
    headers: HeaderMap,
) -> (StatusCode, Json<Value>) {
    let mut s = s.lock().unwrap();
    let agent = headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if agent.starts_with("ureq") {
        if s.unavailable_for_vigil > 0 {
            s.unavailable_for_vigil -= 1;
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error_code": 50003, "message": "restarting"})),
            );
        }
        *s.fetched_by_vigil.entry(id).or_default() += 1;
    }
    match s.registered.get((id as usize).wrapping_sub(1)) {
        Some((_, schema)) => (StatusCode::OK, Json(json!({ "schema": schema }))),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error_code": 40403, "message": format!("Schema {id} not found")})),
        ),
    }
}

async fn start_registry() -> (String, Shared) {
    let shared = Shared::default();
    let app = Router::new()
        .route("/subjects/{subject}/versions", post(register))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, shared)
}

/// Confluent's Python client with its Avro serde, or `None` with a note outside CI.
fn confluent_python() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import confluent_kafka.schema_registry.avro"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "confluent-kafka is not installed; tests/install-tools.sh installs it"
        );
        eprintln!("skipped: confluent-kafka (Python) is not installed");
    }
    ok
}

fn confluent_avro(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(common::repo().join("tests/confluent_avro.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "confluent_avro.py {}: {}",
        args[0],
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn events_of_evolved_writer_schemas_score_as_the_base_schema_and_alerts_read_with_confluents_deserializer()
 {
    let Some((brokers, t, work, models)) = setup("registry").await else {
        return;
    };
    if !confluent_python() {
        return;
    }
    let (registry, schemas) = start_registry().await;
    let events = dataset_events()[..1200].to_vec();
    let expected = offline_alerts(models, &events);
    assert!(!expected.is_empty());
    let jsonl = work.path().join("events.jsonl");
    let lines: Vec<String> = events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
    let avsc = common::repo().join("schemas/transaction.avsc");
    let poison: Value = serde_json::from_str(&confluent_avro(&[
        "produce",
        &brokers,
        &t.transactions,
        &registry,
        jsonl.to_str().unwrap(),
        avsc.to_str().unwrap(),
    ]))
    .unwrap();
    let input_subject = format!("{}-value", t.transactions);
    let writer_ids: Vec<u32> = {
        let s = schemas.lock().unwrap();
        (1..=s.registered.len() as u32)
            .filter(|&id| s.registered[id as usize - 1].0 == input_subject)
            .collect()
    };
    assert_eq!(writer_ids.len(), 4, "the base schema and three evolutions");
    schemas.lock().unwrap().unavailable_for_vigil = 2;

    let mut vigil = spawn_vigil(
        &brokers,
        &t,
        &work.path().join("model"),
        work.path(),
        &[
            ("VIGIL_ENCODING", "avro"),
            ("VIGIL_ALERTS__ENCODING", "avro"),
            ("VIGIL_SCHEMA_REGISTRY__URL", &registry),
        ],
    );
    let committed = wait_all_committed(&brokers, &t, &mut vigil, Duration::from_secs(120));
    assert_eq!(committed as usize, events.len() + 2);

    // Alerts: registered under <alerts topic>-value and read by Confluent's deserializer.
    let alert_subject = format!("{}-value", t.alerts);
    {
        let s = schemas.lock().unwrap();
        let (_, text) = s
            .registered
            .iter()
            .find(|(sub, _)| *sub == alert_subject)
            .expect("vigil registered the alert schema");
        let shipped: Value = serde_json::from_str(include_str!("../schemas/alert.avsc")).unwrap();
        assert_eq!(serde_json::from_str::<Value>(text).unwrap(), shipped);
    }
    let read = confluent_avro(&[
        "read-alerts",
        &brokers,
        &t.alerts,
        &registry,
        &expected.len().to_string(),
    ]);
    let mut live: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for line in read.lines() {
        let alert: Value = serde_json::from_str(line).unwrap();
        let id = alert["transaction_id"].as_str().unwrap().to_string();
        live.entry(id).or_default().push(alert);
    }
    assert_alerts_match_offline(&live, &expected);

    // Poison: an id the registry never gave, and a datum cut short by one byte.
    let dead = read_all(&brokers, &t.dead_letter, 2, Duration::from_secs(30));
    let mut reasons: BTreeMap<String, (String, String)> = BTreeMap::new();
    for m in &dead {
        let key = String::from_utf8_lossy(m.key().unwrap()).into_owned();
        let header = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|x| x.key == name))
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        reasons.insert(key, (header("error.code"), header("error")));
    }
    let (code, why) = &reasons[poison["unknown_id"].as_str().unwrap()];
    assert_eq!(code, "unusable_schema", "{why}");
    assert!(
        why.contains("schema id 987654, which is not registered"),
        "{why}"
    );
    let (code, why) = &reasons[poison["truncated"].as_str().unwrap()];
    assert_eq!(code, "malformed", "{why}");
    assert_eq!(dead.len(), 2, "{reasons:?}");

    // The registry's two 503s held the events back (asked again) instead of dead-lettering
    // them; each writer schema was then asked for once per worker at most, and cached.
    let addr = http_addr(work.path(), &t).unwrap();
    let metrics = metrics_text(&addr).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "vigil_schema_registry_failures_total 2"),
        "{metrics}"
    );
    let fetched = schemas.lock().unwrap().fetched_by_vigil.clone();
    for id in &writer_ids {
        assert!((1..=2).contains(&fetched[id]), "{fetched:?}");
    }
    assert!(sigterm(&mut vigil).success());
}
