//! Router-level tests of the side server, driven with `tower::ServiceExt::oneshot`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::shared;

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use vigil::run::Shared;
use vigil::server::router;

async fn get(shared: &Shared, path: &str) -> (StatusCode, String) {
    let response = router(shared.clone())
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
async fn ready_is_503_until_partitions_are_assigned() {
    let s = shared();
    let (status, body) = get(&s, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["models_loaded"], true);
    assert_eq!(v["partitions_assigned"], 0);

    s.status.assigned.store(3, Ordering::Relaxed);
    let (status, _) = get(&s, "/ready").await;
    assert_eq!(status, StatusCode::OK);

    s.status.models_loaded.store(false, Ordering::Relaxed);
    let (status, _) = get(&s, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn models_lists_both_detectors_with_parameters_thresholds_and_columns() {
    let s = shared();
    let (status, body) = get(&s, "/models").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], s.models.manifest.version.as_str());
    let forest = &v["models"][0];
    assert_eq!(forest["name"], "isolation_forest");
    assert_eq!(forest["parameters"]["trees"], 100);
    assert_eq!(forest["sample_size"], 256);
    assert_eq!(
        forest["threshold"].as_f64(),
        Some(s.models.forest.threshold)
    );
    assert_eq!(forest["columns"].as_array().unwrap().len(), 23);
    let lof = &v["models"][1];
    assert_eq!(lof["name"], "lof");
    assert_eq!(lof["k"], 20);
    assert_eq!(lof["index"], "kdtree");
    assert_eq!(lof["columns"].as_array().unwrap().len(), 29);
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
    ] {
        assert!(body.contains(name), "missing {name}");
    }
}

#[tokio::test]
async fn unknown_paths_get_a_json_404() {
    let (status, body) = get(&shared(), "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "not found");
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
