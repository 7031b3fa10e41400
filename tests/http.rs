//! Router-level tests of the side server, driven with `tower::ServiceExt::oneshot`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::shared;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use vigil::run::Shared;
use vigil::server::{Access, AccessSettings, Auth, RateLimit, router};

/// The router with no authentication and no rate limit.
fn app(shared: &Shared) -> axum::Router {
    router(shared.clone(), Access::open())
}

async fn get(shared: &Shared, path: &str) -> (StatusCode, String) {
    let response = app(shared)
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn health_is_always_ok() {
    let (status, body) = get(&shared(), "/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, r#"{"status":"ok"}"#);
}

#[tokio::test]
async fn ready_needs_the_models_a_place_in_the_group_and_a_broker_that_answers() {
    let s = shared();
    let (status, body) = get(&s, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["models_loaded"], true);
    assert_eq!(v["group_joined"], false);
    assert_eq!(v["broker_reachable"], false);
    assert_eq!(v["seconds_since_broker_answered"], serde_json::Value::Null);

    // In the group with no partition (more instances than partitions): a ready standby.
    s.status.joined.store(true, Ordering::Relaxed);
    s.status.broker_answered();
    let (status, body) = get(&s, "/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["standby"], true);
    assert_eq!(v["partitions_assigned"], 0);

    s.status.assign(&[0, 1, 2]);
    let (_, body) = get(&s, "/ready").await;
    assert!(body.contains(r#""standby":false"#), "{body}");

    // Silent brokers for longer than the timeout, then one answers again.
    s.status.set_broker_timeout(Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(120));
    let (status, body) = get(&s, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains(r#""broker_reachable":false"#), "{body}");
    s.status.broker_answered();
    let (status, _) = get(&s, "/ready").await;
    assert_eq!(status, StatusCode::OK);

    s.status.models_loaded.store(false, Ordering::Relaxed);
    let (status, _) = get(&s, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

/// The server starts before the models load (training from the bundled dataset when there is
/// no artifact): meanwhile `/ready` and every route that needs the models answer 503 and say so.
#[tokio::test]
async fn while_the_models_load_ready_and_the_model_routes_answer_503_then_serve_them() {
    let s = Shared::loading().unwrap();
    s.status.joined.store(true, Ordering::Relaxed);
    s.status.broker_answered();
    let (status, body) = get(&s, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains(r#""models_loaded":false"#), "{body}");
    for path in ["/models", "/models/lof"] {
        let (status, body) = get(&s, path).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert!(body.contains("the models are loading"), "{path}: {body}");
    }
    let tx = common::kafka::dataset_events()[0].clone();
    let predict = app(&s)
        .oneshot(
            Request::post("/predict")
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&tx).unwrap()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(predict.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (_, metrics) = get(&s, "/metrics").await;
    assert!(metrics.contains("vigil_ready 0"), "{metrics}");

    s.install(common::trained_models());
    let (status, body) = get(&s, "/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = get(&s, "/models").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(s.models().unwrap().version()), "{body}");
}

#[tokio::test]
async fn models_lists_both_detectors_with_parameters_thresholds_and_columns() {
    let s = shared();
    let (status, body) = get(&s, "/models").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], s.models().unwrap().manifest.version.as_str());
    let forest = &v["models"][0];
    assert_eq!(forest["name"], "isolation_forest");
    assert_eq!(forest["parameters"]["trees"], 100);
    assert_eq!(forest["parameters"]["seed"], 42);
    assert_eq!(forest["sample_size"], 256);
    assert_eq!(
        forest["threshold"].as_f64(),
        Some(s.models().unwrap().forest.threshold.get())
    );
    assert_eq!(
        forest["columns"].as_array().unwrap().len(),
        vigil::config::FOREST_NUMERIC.len()
    );
    let lof = &v["models"][1];
    assert_eq!(lof["name"], "lof");
    assert_eq!(lof["k"], 35);
    // What every event is compared with: what LOF's cost per event grows with.
    assert_eq!(
        lof["reference_rows"],
        s.models().unwrap().lof.model.reference_rows()
    );
    assert_eq!(lof["parameters"]["reference_rows"], 0);
    // `auto` (the default) resolves as scikit-learn does: brute force above 15 columns.
    assert_eq!(lof["parameters"]["index"], "auto");
    assert_eq!(lof["index"], "brute");
    // The numerics, TransactionType (2) and Channel (3) one-hot.
    assert_eq!(
        lof["columns"].as_array().unwrap().len(),
        vigil::config::LOF_NUMERIC.len() + 5
    );
    assert_eq!(v["training"]["rows_valid"], 2512);
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_the_documented_names() {
    let s = shared();
    s.metrics
        .events_invalid
        .with_label_values(&["out_of_range"])
        .inc();
    s.metrics.model_flags.with_label_values(&["lof"]).inc();
    let (status, body) = get(&s, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for name in [
        "vigil_events_consumed_total",
        "vigil_events_invalid_total{reason=\"out_of_range\"} 1",
        "vigil_alerts_published_total",
        "vigil_model_flags_total{model=\"lof\"} 1",
        "vigil_processing_seconds_bucket",
        "vigil_accounts_tracked",
        "vigil_model_info{version=",
        "vigil_build_info{features=\"\",version=",
    ] {
        assert!(body.contains(name), "missing {name}");
    }
}

#[tokio::test]
async fn unknown_paths_get_a_problem_document_404_listing_the_routes() {
    let response = app(&shared())
        .oneshot(Request::get("/nope").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], 404);
    assert_eq!(v["title"], "Not Found");
    assert_eq!(v["detail"], "no route /nope");
    assert!(v["endpoints"].as_array().is_some_and(|e| !e.is_empty()));
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_large_answers_are_gzipped_for_clients_that_ask() {
    let s = shared();
    let call = |headers: &[(&str, &str)]| {
        let mut r = Request::get("/models");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        app(&s).oneshot(r.body(Body::empty()).unwrap())
    };
    let plain = call(&[]).await.unwrap();
    let id = plain.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert!(plain.headers().get("content-encoding").is_none());
    let plain_len = plain.into_body().collect().await.unwrap().to_bytes().len();
    let gzipped = call(&[("accept-encoding", "gzip"), ("x-request-id", "case-42")])
        .await
        .unwrap();
    assert_eq!(
        gzipped.headers()["x-request-id"],
        "case-42",
        "the caller's id is kept"
    );
    assert_eq!(gzipped.headers()["content-encoding"], "gzip");
    let gzipped_len = gzipped
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len();
    assert!(
        gzipped_len * 2 < plain_len,
        "{gzipped_len} of {plain_len} bytes"
    );
}

#[tokio::test]
async fn requests_are_counted_by_matched_route_and_status_and_unknown_paths_share_one_label() {
    let s = shared();
    get(&s, "/health").await;
    get(&s, "/health").await;
    get(&s, "/ready").await;
    get(&s, "/wp-admin/a").await;
    get(&s, "/wp-admin/b").await;
    let (_, body) = get(&s, "/metrics").await;
    for line in [
        r#"vigil_http_requests_total{method="GET",route="/health",status="200"} 2"#,
        r#"vigil_http_requests_total{method="GET",route="/ready",status="503"} 1"#,
        r#"vigil_http_requests_total{method="GET",route="unmatched",status="404"} 2"#,
        r#"vigil_http_request_duration_seconds_count{route="/health"} 2"#,
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing `{line}` in\n{body}"
        );
    }
}

#[tokio::test]
async fn known_series_exist_at_zero_before_their_first_event() {
    let (_, body) = get(&shared(), "/metrics").await;
    for line in [
        r#"vigil_events_invalid_total{reason="malformed"} 0"#,
        r#"vigil_events_invalid_total{reason="bad_timestamp"} 0"#,
        r#"vigil_model_flags_total{model="isolation_forest"} 0"#,
        r#"vigil_model_score_count{model="lof"} 0"#,
        "vigil_ready 0",
    ] {
        assert!(body.lines().any(|l| l == line), "missing `{line}`");
    }
    assert!(body.contains("vigil_process_resident_memory_bytes "));
}

async fn post(
    shared: &Shared,
    path: &str,
    body: impl Into<Body>,
) -> (StatusCode, serde_json::Value) {
    let response = app(shared)
        .oneshot(
            Request::post(path)
                .header("content-type", "application/json")
                .body(body.into())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, v)
}

fn dataset_rows(n: usize) -> Vec<vigil::decode::Transaction> {
    vigil::train::in_event_time_order(vigil::train::bundled_history().unwrap().events)
        .into_iter()
        .take(n)
        .collect()
}

/// Folds `events` into partition 0 of the shared state, as the stream would.
fn live_state(s: &Shared, events: &[vigil::decode::Transaction]) {
    let engine = s.engine().unwrap();
    let mut state = vigil::state::PartitionState::default();
    for (i, tx) in events.iter().enumerate() {
        engine.warm(&mut state, i as i64, None, &serde_json::to_vec(tx).unwrap());
    }
    s.store.insert(0, state);
}

#[tokio::test]
async fn predict_gives_each_models_score_threshold_flag_the_consensus_and_the_reasons() {
    let s = shared();
    let tx = &dataset_rows(1)[0];
    let (status, v) = post(&s, "/predict", serde_json::to_vec(&[tx]).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let p = &v["predictions"][0];
    assert_eq!(p["transaction_id"], tx.transaction_id.as_str());
    assert_eq!(p["account_state"], "new");
    let expected = s
        .engine()
        .unwrap()
        .predict(None, tx, &mut Default::default());
    for (i, name) in ["isolation_forest", "lof"].iter().enumerate() {
        let m = &p["models"][i];
        assert_eq!(m["model"], *name);
        assert_eq!(m["score"].as_f64(), Some(expected.verdicts[i].score));
        assert_eq!(
            m["threshold"].as_f64(),
            Some(expected.verdicts[i].threshold)
        );
        assert_eq!(m["flagged"].as_bool(), Some(expected.verdicts[i].flagged));
    }
    assert_eq!(p["consensus"]["policy"], "all");
    assert_eq!(p["consensus"]["alert"].as_bool(), Some(expected.alert));
    // An ordinary first transaction has nothing unusual to say: no normal fact is a reason.
    assert_eq!(p["top_features"], serde_json::json!([]), "{p}");
    assert!(p["consensus"]["severity"].as_str().is_some());

    // One far from every account's habits gets its reasons, each worded for a person.
    let mut odd = tx.clone();
    (odd.amount, odd.balance, odd.login_attempts, odd.duration) = (9800.0, 10200.0, 5, 1900);
    let (status, v) = post(&s, "/predict", serde_json::to_vec(&[&odd]).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let reasons = v["predictions"][0]["top_features"].as_array().unwrap();
    assert_eq!(reasons.len(), 3, "{v}");
    for r in reasons {
        assert!(r["detail"].as_str().is_some_and(|d| !d.is_empty()), "{r}");
        assert!(
            r["share"].as_f64().is_some_and(|x| x > 0.0 && x <= 1.0),
            "{r}"
        );
    }

    // One model only.
    let (status, v) = post(&s, "/models/lof/predict", serde_json::to_vec(tx).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["predictions"][0]["model"], "lof");
    assert_eq!(
        v["predictions"][0]["score"].as_f64(),
        Some(expected.verdicts[1].score)
    );
}

#[tokio::test]
async fn predict_reads_the_accounts_live_state_without_changing_it_unless_asked_to_score_as_new() {
    let s = shared();
    let rows = dataset_rows(2512);
    let account = rows[2000].account_id.clone();
    let history: Vec<_> = rows[..2000].to_vec();
    live_state(&s, &history);
    let before = s.account(&account).expect("the account has live state").1;
    let tx = rows[2000..]
        .iter()
        .find(|t| t.account_id == account)
        .unwrap_or(&rows[2000]);

    let (status, v) = post(&s, "/predict", serde_json::to_vec(&[tx]).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["predictions"][0]["account_state"], "live");
    let live = s
        .engine()
        .unwrap()
        .predict(Some(&before), tx, &mut Default::default());
    assert_eq!(
        v["predictions"][0]["models"][1]["score"].as_f64(),
        Some(live.verdicts[1].score)
    );
    assert_eq!(
        s.account(&account).unwrap().1,
        before,
        "a prediction changed the state"
    );

    let body = serde_json::json!({ "transactions": [tx], "as_new_account": true });
    let (status, v) = post(&s, "/predict", body.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["predictions"][0]["account_state"], "new");
    let fresh = s
        .engine()
        .unwrap()
        .predict(None, tx, &mut Default::default());
    assert_eq!(
        v["predictions"][0]["models"][1]["score"].as_f64(),
        Some(fresh.verdicts[1].score)
    );

    let (status, v) = get(&s, &format!("/accounts/{account}")).await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["transactions"].as_u64(), Some(before.transactions));
    assert!(v["ip_addresses"]["most_frequent"].is_string());
    let (status, v) = get(&s, "/accounts/AC99999").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v.contains("\"field\":\"id\""));
}

#[tokio::test]
async fn every_kind_of_bad_prediction_request_gets_a_4xx_json_error_naming_what_is_wrong() {
    let s = shared();
    let tx = serde_json::to_value(&dataset_rows(1)[0]).unwrap();
    let mut bad_amount = tx.clone();
    bad_amount["TransactionAmount"] = serde_json::json!(-3);
    let mut no_account = tx.clone();
    no_account.as_object_mut().unwrap().remove("AccountID");
    let mut year_9999 = tx.clone();
    year_9999["TransactionDate"] = serde_json::json!("9999-12-31 23:59:59");
    let mut year_0 = tx.clone();
    year_0["TransactionDate"] = serde_json::json!("0000-01-01 00:00:00");
    let too_many: Vec<_> = std::iter::repeat_n(tx.clone(), vigil::server::MAX_BATCH + 1).collect();
    let cases: Vec<(&str, Body, StatusCode, Option<&str>)> = vec![
        (
            "/predict",
            Body::from("{not json"),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/predict",
            Body::from("42"),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            "/predict",
            Body::from("[]"),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("transactions"),
        ),
        (
            "/predict",
            Body::from(r#"{"transactions": 5}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("transactions"),
        ),
        (
            "/predict",
            Body::from(format!(
                r#"{{"transactions": [{tx}], "as_new_account": "yes"}}"#
            )),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("as_new_account"),
        ),
        (
            "/predict",
            Body::from(format!(r#"{{"transactions": [{tx}], "colour": 1}}"#)),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("colour"),
        ),
        (
            "/predict",
            Body::from(serde_json::to_vec(&[&tx, &bad_amount]).unwrap()),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("TransactionAmount"),
        ),
        (
            "/predict",
            Body::from(serde_json::to_vec(&[&no_account]).unwrap()),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("AccountID"),
        ),
        (
            "/predict",
            Body::from(serde_json::to_vec(&[&year_9999]).unwrap()),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("TransactionDate"),
        ),
        (
            "/predict",
            Body::from(serde_json::to_vec(&[&year_0]).unwrap()),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("TransactionDate"),
        ),
        (
            "/predict",
            Body::from(serde_json::to_vec(&too_many).unwrap()),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            "/predict",
            Body::from(vec![b' '; vigil::server::BODY_LIMIT + 1]),
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
        ),
        (
            "/models/svm/predict",
            Body::from(tx.to_string()),
            StatusCode::NOT_FOUND,
            Some("name"),
        ),
    ];
    for (path, body, status, field) in cases {
        let (got, v) = post(&s, path, body).await;
        assert_eq!(got, status, "{path}: {v}");
        assert!(v["detail"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        assert_eq!(v["status"], got.as_u16(), "{v}");
        if let Some(field) = field {
            assert_eq!(v["field"], field, "{v}");
        }
    }
    let (_, v) = post(
        &s,
        "/predict",
        serde_json::to_vec(&[&tx, &bad_amount]).unwrap(),
    )
    .await;
    assert_eq!(v["invalid"][0]["index"], 1);
    assert_eq!(v["invalid"][0]["code"], "out_of_range");
    let (_, v) = post(&s, "/predict", serde_json::to_vec(&[&year_9999]).unwrap()).await;
    assert_eq!(v["invalid"][0]["code"], "implausible_time", "{v}");

    let (status, body) = get(&s, "/predict").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body.contains("GET is not allowed"), "{body}");
}

#[tokio::test]
async fn each_model_is_described_by_name_and_an_unknown_name_is_a_json_404() {
    let s = shared();
    let (status, body) = get(&s, "/models/isolation_forest").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["threshold"].as_f64(),
        Some(s.models().unwrap().forest.threshold.get())
    );
    let (status, body) = get(&s, "/models/lof").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"k\":35"), "{body}");
    let (status, body) = get(&s, "/models/svm").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("isolation_forest and lof"), "{body}");
}

#[tokio::test]
async fn recent_alerts_are_newest_first_and_bad_query_parameters_are_named() {
    let s = shared();
    for i in 0..5 {
        s.alerts.publish(std::sync::Arc::new(
            serde_json::json!({ "alert_id": format!("a{i}") }),
        ));
    }
    let (status, body) = get(&s, "/alerts/recent?limit=2").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["count"], 2);
    assert_eq!(v["alerts"][0]["alert_id"], "a4");
    assert_eq!(v["alerts"][1]["alert_id"], "a3");
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=lots", "limit"),
        ("limit=201", "limit"),
        ("colour=red", "colour"),
    ] {
        let (status, body) = get(&s, &format!("/alerts/recent?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["field"], field, "{query}");
    }
}

#[tokio::test]
async fn the_alert_stream_sends_each_published_alert_as_a_server_sent_event_and_ends_at_shutdown() {
    use futures::StreamExt;
    let s = shared();
    let response = app(&s)
        .oneshot(Request::get("/alerts/stream").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body().into_data_stream();
    s.alerts.publish(std::sync::Arc::new(
        serde_json::json!({ "alert_id": "x1", "account_id": "AC1" }),
    ));
    let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.next())
        .await
        .expect("an event within 5 s")
        .unwrap()
        .unwrap();
    let text = String::from_utf8(frame.to_vec()).unwrap();
    let (data, id) = sse_alert(&text);
    assert_eq!(data["alert_id"], "x1");
    assert!(id.ends_with(".1"), "{text}");

    s.alerts.closed.cancel();
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), body.next())
        .await
        .expect("the stream ends at shutdown");
    assert!(end.is_none());
}

/// An SSE `alert` event's data and id.
fn sse_alert(text: &str) -> (serde_json::Value, String) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_string()
    };
    assert_eq!(field("event: "), "alert", "{text}");
    (
        serde_json::from_str(&field("data: ")).unwrap(),
        field("id: "),
    )
}

#[tokio::test]
async fn a_client_reconnecting_with_last_event_id_gets_what_it_missed_then_the_live_alerts() {
    let s = shared();
    let publish = |n: usize| {
        s.alerts.publish(std::sync::Arc::new(
            serde_json::json!({ "alert_id": format!("a{n}") }),
        ))
    };
    let open = |last: Option<String>| {
        let mut r = Request::get("/alerts/stream");
        if let Some(id) = last {
            r = r.header("last-event-id", id);
        }
        app(&s).oneshot(r.body(Body::empty()).unwrap())
    };
    let mut first = open(None).await.unwrap().into_body().into_data_stream();
    publish(1);
    let (_, seen) = sse_alert(&next_frame(&mut first).await);
    drop(first);
    // Published while the client was away.
    publish(2);
    publish(3);
    let mut again = open(Some(seen))
        .await
        .unwrap()
        .into_body()
        .into_data_stream();
    publish(4);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(sse_alert(&next_frame(&mut again).await).0["alert_id"].clone());
    }
    assert_eq!(got, ["a2", "a3", "a4"], "none missed, none twice, in order");

    // Further back than the feed holds: told how many are lost, then what is held.
    for n in 5..=(vigil::publish::FEED_RECENT + 10) {
        publish(n);
    }
    let epoch = seen_epoch(&s);
    let mut late = open(Some(format!("{epoch}.4")))
        .await
        .unwrap()
        .into_body()
        .into_data_stream();
    let text = next_frame(&mut late).await;
    // 210 published, 200 held (11 to 210): 5 to 10 are lost.
    assert!(text.starts_with("event: lagged\ndata: 6\n"), "{text}");
    assert_eq!(sse_alert(&next_frame(&mut late).await).0["alert_id"], "a11");
    // An id of an earlier process (another epoch) resumes from now.
    let mut other = open(Some("1.3".into()))
        .await
        .unwrap()
        .into_body()
        .into_data_stream();
    publish(999);
    assert_eq!(
        sse_alert(&next_frame(&mut other).await).0["alert_id"],
        "a999"
    );
}

/// The next SSE frame of a stream, as text.
async fn next_frame(body: &mut axum::body::BodyDataStream) -> String {
    use futures::StreamExt;
    let frame = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("an event within 5 s")
        .unwrap()
        .unwrap();
    String::from_utf8(frame.to_vec()).unwrap()
}

/// The epoch part of this feed's positions.
fn seen_epoch(s: &Shared) -> String {
    let item = vigil::publish::FeedItem {
        seq: 0,
        alert: std::sync::Arc::new(serde_json::Value::Null),
    };
    let position = s.alerts.position(&item);
    position.split('.').next().unwrap().to_string()
}

#[tokio::test]
async fn the_openapi_document_describes_exactly_the_routes_the_server_has() {
    let s = shared();
    let (status, body) = get(&s, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let spec: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(spec["openapi"], "3.0.3");
    let mut documented: Vec<String> = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    documented.sort();
    let (_, index) = get(&s, "/").await;
    let index: serde_json::Value = serde_json::from_str(&index).unwrap();
    let mut served: Vec<String> = index["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .filter(|e| e != "GET /" && e != "GET /docs")
        .collect();
    served.sort();
    assert_eq!(documented, served);
    // Every documented route answers (GETs without parameters here; the rest have own tests).
    for route in &served {
        if let Some(path) = route
            .strip_prefix("GET ")
            .filter(|p| !p.contains('{') && *p != "/alerts/stream")
        {
            let (status, _) = get(&s, path).await;
            assert_ne!(status, StatusCode::NOT_FOUND, "{route}");
        }
    }
    let (status, page) = get(&s, "/docs").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("openapi.json") && !page.contains("http://") && !page.contains("https://")
    );
}

async fn get_with(
    (shared, access): &(Shared, std::sync::Arc<Access>),
    path: &str,
    auth: Option<&str>,
) -> axum::response::Response {
    let mut r = Request::get(path);
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    router(shared.clone(), access.clone())
        .oneshot(r.body(Body::empty()).unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn bearer_and_basic_auth_guard_everything_but_health_readiness_and_metrics() {
    let with = |auth| {
        let access = Access::new(AccessSettings {
            auth,
            ..AccessSettings::default()
        });
        (shared(), access)
    };
    let s = with(Auth::Bearer {
        token: "0123456789abcdef".into(),
    });
    let r = get_with(&s, "/models", None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["field"], "Authorization");
    assert_eq!(
        get_with(&s, "/models", Some("Bearer wrong-token-000000"))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get_with(&s, "/models", Some("Bearer 0123456789abcdef"))
            .await
            .status(),
        StatusCode::OK
    );
    for open_path in ["/health", "/ready", "/metrics"] {
        assert_ne!(
            get_with(&s, open_path, None).await.status(),
            StatusCode::UNAUTHORIZED,
            "{open_path}"
        );
    }

    let s = with(Auth::Basic {
        username: "ops".into(),
        password: "s3cret".into(),
    });
    // base64("ops:s3cret")
    assert_eq!(
        get_with(&s, "/docs", Some("Basic b3BzOnMzY3JldA=="))
            .await
            .status(),
        StatusCode::OK
    );
    let r = get_with(&s, "/docs", Some("Basic b3BzOndyb25n")).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"vigil\"");
}

#[tokio::test]
async fn a_client_over_its_rate_limit_gets_429_with_retry_after_and_health_is_never_limited() {
    let access = Access::new(AccessSettings {
        rate_limit: RateLimit {
            per_second: 0.5,
            burst: 3,
        },
        ..AccessSettings::default()
    });
    let s = (shared(), access);
    for _ in 0..3 {
        assert_eq!(get_with(&s, "/models", None).await.status(), StatusCode::OK);
    }
    let r = get_with(&s, "/models", None).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "2");
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("rate limit"));
    for _ in 0..10 {
        assert_eq!(get_with(&s, "/health", None).await.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_rate_limit() {
    use axum::extract::ConnectInfo;
    let access = Access::new(AccessSettings {
        rate_limit: RateLimit {
            per_second: 0.5,
            burst: 2,
        },
        trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
        ..AccessSettings::default()
    });
    let s = shared();
    let call = |peer: &str, forwarded: &str| {
        let request = Request::get("/models")
            .header("x-forwarded-for", forwarded)
            .extension(ConnectInfo(peer.parse::<std::net::SocketAddr>().unwrap()))
            .body(Body::empty())
            .unwrap();
        let app = router(s.clone(), access.clone());
        async move { app.oneshot(request).await.unwrap().status() }
    };
    for _ in 0..2 {
        assert_eq!(call("10.0.0.5:4000", "203.0.113.1").await, StatusCode::OK);
    }
    assert_eq!(
        call("10.0.0.5:4000", "203.0.113.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client through the same proxy has its own allowance.
    assert_eq!(call("10.0.0.5:4000", "203.0.113.2").await, StatusCode::OK);
    // Straight from an untrusted peer, a forged header changes nothing.
    for forged in ["198.51.100.1", "198.51.100.2"] {
        assert_eq!(call("192.0.2.9:4000", forged).await, StatusCode::OK);
    }
    assert_eq!(
        call("192.0.2.9:4000", "198.51.100.3").await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn a_large_batch_is_scored_in_parallel_and_answered_in_request_order() {
    let s = shared();
    let rows = dataset_rows(2512);
    let (status, v) = post(&s, "/predict", serde_json::to_vec(&rows).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let predictions = v["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), rows.len());
    let engine = s.engine().unwrap();
    for (i, (p, tx)) in predictions.iter().zip(&rows).enumerate().step_by(97) {
        assert_eq!(
            p["transaction_id"],
            tx.transaction_id.as_str(),
            "order at {i}"
        );
        let want = engine.predict(None, tx, &mut Default::default());
        assert_eq!(
            p["models"][0]["score"].as_f64(),
            Some(want.verdicts[0].score)
        );
    }
}

#[tokio::test]
async fn a_browser_gets_the_self_contained_page_and_other_clients_the_route_list() {
    let s = shared();
    let response = app(&s)
        .oneshot(
            Request::get("/")
                .header("accept", "text/html,application/xhtml+xml")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    for part in [
        "Live alerts",
        "Check a transaction",
        "Account lookup",
        "alerts/stream",
        "predict",
    ] {
        assert!(page.contains(part), "no {part}");
    }
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page loads nothing from elsewhere"
    );
    let (_, body) = get(&s, "/").await;
    assert!(body.contains("\"endpoints\""));
}

#[tokio::test]
async fn an_account_shows_its_latest_scores_newest_first() {
    let s = shared();
    let rows = dataset_rows(2512);
    let engine = s.engine().unwrap();
    let mut state = vigil::state::PartitionState::default();
    let mut scratch = Default::default();
    let mut last: std::collections::HashMap<String, (usize, f64)> = Default::default();
    for (i, tx) in rows.iter().enumerate() {
        let source = vigil::publish::SourceCoordinates {
            topic: "t".into(),
            partition: 0,
            offset: i as i64,
            published_at: None,
        };
        let outcome = engine.process(
            &mut state,
            &source,
            &serde_json::to_vec(tx).unwrap(),
            &mut scratch,
        );
        let forest = match outcome {
            vigil::pipeline::Outcome::Clean(sc, _) | vigil::pipeline::Outcome::Alert(_, sc) => {
                sc.verdicts[0].score
            }
            vigil::pipeline::Outcome::Invalid(e) => panic!("{e}"),
        };
        let e = last.entry(tx.account_id.to_string()).or_insert((0, 0.0));
        *e = (e.0 + 1, forest);
    }
    s.store.insert(0, state);
    let (account, (events, forest)) = last.iter().max_by_key(|(_, (n, _))| *n).unwrap();
    let (status, body) = get(&s, &format!("/accounts/{account}")).await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let recent = v["recent_scores"].as_array().unwrap();
    assert_eq!(recent.len(), (*events).min(vigil::state::RECENT_SCORES));
    assert_eq!(
        recent[0]["isolation_forest"].as_f64(),
        Some(f64::from(*forest as f32))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_the_models_in_one_step_while_predictions_keep_being_answered() {
    let dir = tempfile::tempdir().unwrap();
    let models_dir = dir.path().join("current");
    let (a, b) = (
        std::sync::Arc::new(common::trained_models()),
        std::sync::Arc::new(common::reseeded_models(7)),
    );
    assert_ne!(a.version(), b.version());
    a.save(&models_dir).unwrap();
    let cfg =
        vigil::config::Config::from_yaml(&format!("models:\n  dir: {}\n", models_dir.display()))
            .unwrap();
    let s = Shared::loading().unwrap().with_decisions(&cfg).unwrap();
    s.install(vigil::models::ModelSet::load(&models_dir, cfg.models.lof.index).unwrap());
    let tx = dataset_rows(40)[39].clone();
    let scores_of = |m: &std::sync::Arc<vigil::models::ModelSet>| {
        let engine = vigil::pipeline::Engine::new(
            m.clone(),
            vigil::decode::Decoder::Json,
            vigil::config::Policy::All,
            3,
        );
        let p = engine.predict(None, &tx, &mut Default::default());
        (p.verdicts[0].score, p.verdicts[1].score)
    };
    let (from_a, from_b) = (scores_of(&a), scores_of(&b));
    assert_ne!(from_a.0, from_b.0);

    // An unchanged directory is no change.
    let (status, v) = post(&s, "/models/reload", Body::empty()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["changed"], false);

    // Predictions in a loop while the directory gets the new version and is reloaded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let body = serde_json::json!({"transactions": [&tx], "as_new_account": true}).to_string();
    let caller = {
        let (s, stop, body) = (s.clone(), stop.clone(), body.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (status, v) = post(&s, "/predict", body.clone()).await;
                assert_eq!(status, StatusCode::OK, "{v}");
                let m = &v["predictions"][0]["models"];
                seen.push((
                    m[0]["score"].as_f64().unwrap(),
                    m[1]["score"].as_f64().unwrap(),
                ));
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.save(&models_dir).unwrap();
    let (status, v) = post(&s, "/models/reload", Body::empty()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["version"], b.version());
    assert_eq!(v["previous"], a.version());
    assert_eq!(v["changed"], true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = caller.await.unwrap();
    // Each answer is one version's, forest and LOF alike; both versions answered.
    assert!(
        seen.iter().all(|s| *s == from_a || *s == from_b),
        "an answer mixed versions"
    );
    assert!(
        seen.contains(&from_a) && seen.contains(&from_b),
        "{} answers",
        seen.len()
    );
    let (_, metrics) = get(&s, "/metrics").await;
    assert!(metrics.contains(&format!(
        "vigil_model_info{{version=\"{}\"}} 1",
        b.version()
    )));
    assert!(
        !metrics.contains(a.version()),
        "the old version's series is gone"
    );

    // A broken directory leaves the models serving; so does one with other features.
    std::fs::write(models_dir.join("manifest.json"), b"{\"version\": ").unwrap();
    let (status, v) = post(&s, "/models/reload", Body::empty()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(s.models().unwrap().version(), b.version());
    common::models_for_another_window()
        .save(&models_dir)
        .unwrap();
    let (status, v) = post(&s, "/models/reload", Body::empty()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("restart"), "{v}");
    assert_eq!(s.models().unwrap().version(), b.version());
    let (_, metrics) = get(&s, "/metrics").await;
    assert!(
        metrics.contains("vigil_model_reloads_total{outcome=\"loaded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vigil_model_reloads_total{outcome=\"refused\"} 2"),
        "{metrics}"
    );

    // Without a models.dir there is nothing to reload.
    let (status, _) = post(&shared(), "/models/reload", Body::empty()).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_challenger_built_for_other_account_state_is_refused_and_nothing_is_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let (models_dir, challenger_dir) = (dir.path().join("current"), dir.path().join("next"));
    common::trained_models().save(&models_dir).unwrap();
    let cfg = vigil::config::Config::from_yaml(&format!(
        "models:\n  dir: {}\n  challenger_dir: {}\n",
        models_dir.display(),
        challenger_dir.display()
    ))
    .unwrap();
    let s = Shared::loading().unwrap().with_decisions(&cfg).unwrap();
    s.install(vigil::models::ModelSet::load(&models_dir, cfg.models.lof.index).unwrap());

    // An empty challenger directory shadows nothing, and there is nothing to promote.
    let (status, v) = post(&s, "/models/reload", Body::empty()).await;
    assert_eq!(
        (status, &v["challenger"]),
        (StatusCode::OK, &serde_json::Value::Null),
        "{v}"
    );
    let (status, v) = post(&s, "/models/challenger/promote", Body::empty()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("challenger_dir"),
        "{v}"
    );

    // A version trained with another window would read account state the stream does not keep.
    common::models_for_another_window()
        .save(&challenger_dir)
        .unwrap();
    let (status, v) = post(&s, "/models/reload", Body::empty()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(s.challenger().is_none());
    let (_, models) = get(&s, "/models").await;
    let models: serde_json::Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["challenger"], serde_json::Value::Null);

    // The challenger directory cannot be the serving one.
    let same = format!(
        "models:\n  dir: {0}\n  challenger_dir: {0}\n",
        models_dir.display()
    );
    let e = vigil::config::Config::from_yaml(&same).unwrap_err();
    assert!(e.to_string().contains("models.challenger_dir"), "{e}");
}

#[tokio::test]
async fn calibration_measures_precision_from_verdicts_and_finds_the_threshold_for_a_target() {
    use vigil::triage::{Verdict, VerdictRecord};
    let s = shared();
    // Thirty alerts over two days: the LOF scores of the frauds above those of the false alarms.
    for i in 0..30 {
        let (score, verdict) = match i {
            0..10 => (3.0 + f64::from(i) * 0.1, Some(Verdict::Fraud)),
            10..20 => (1.5 + f64::from(i) * 0.01, Some(Verdict::Legitimate)),
            _ => (2.0, None),
        };
        let id = format!("a{i}");
        let alert = serde_json::json!({
            "alert_id": id, "transaction_id": format!("T{i}"), "account_id": "AC1",
            "event_time": format!("2024-01-0{}T10:00:00Z", 1 + i % 2), "severity": "low",
            "margin": 0.1, "reason": "", "top_features": [],
            "models": [{"model": "isolation_forest", "score": 0.6 + f64::from(i) * 0.001}, {"model": "lof", "score": score}],
        });
        s.triage.index.add(&alert, 1).unwrap();
        if let Some(verdict) = verdict {
            s.triage
                .index
                .set_verdict(&VerdictRecord {
                    alert_id: id,
                    transaction_id: format!("T{i}"),
                    account_id: "AC1".into(),
                    verdict,
                    note: String::new(),
                    analyst: None,
                    decided_at: "2026-12-07T00:00:00Z".into(),
                    model_version: String::new(),
                })
                .unwrap();
        }
    }
    let (status, body) = get(&s, "/models/lof/calibration").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            c["alerts"].as_u64(),
            c["judged"].as_u64(),
            c["fraud"].as_u64()
        ),
        (Some(30), Some(20), Some(10))
    );
    assert_eq!(c["precision"]["value"], 0.5);
    assert_eq!(c["by_day"].as_array().unwrap().len(), 2);
    assert!(c.get("suggestion").is_none());

    let (_, body) = get(&s, "/models/lof/calibration?target_precision=0.7").await;
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    let t = c["suggestion"]["threshold"].as_f64().unwrap();
    assert!(t > 1.69 && t < 2.0, "{c}");
    assert_eq!(c["suggestion"]["frauds_kept"], 10);
    assert!(c["suggestion"]["precision"]["low"].as_f64().unwrap() >= 0.7);

    let (_, body) = get(&s, "/models/isolation_forest/calibration?alerts_per_day=5").await;
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(c["suggestion"]["alerts"], 10, "{c}");
    // The ten highest forest scores are alerts 20 to 29, scored 0.620 to 0.629.
    let t = c["suggestion"]["threshold"].as_f64().unwrap();
    assert!((t - 0.6195).abs() < 1e-9, "{t}");

    for (path, status, field) in [
        (
            "/models/lof/calibration?target_precision=1.5",
            StatusCode::BAD_REQUEST,
            "target_precision",
        ),
        (
            "/models/lof/calibration?alerts_per_day=-1",
            StatusCode::BAD_REQUEST,
            "alerts_per_day",
        ),
        (
            "/models/lof/calibration?target_precision=0.5&alerts_per_day=3",
            StatusCode::BAD_REQUEST,
            "alerts_per_day",
        ),
        (
            "/models/lof/calibration?colour=red",
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        ("/models/ridge/calibration", StatusCode::NOT_FOUND, "name"),
    ] {
        let (got, body) = get(&s, path).await;
        assert_eq!(got, status, "{path}: {body}");
        let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(problem["field"], field, "{path}");
    }
}
