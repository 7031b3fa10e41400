//! The side HTTP server (axum): `GET /health`, `GET /ready` (503 until models are loaded and
//! partitions assigned), `GET /models` (versions, parameters, thresholds, features) and
//! `GET /metrics` (Prometheus text). It reads shared state and never changes it. Every request
//! is counted by matched route, method and status (`vigil_http_requests_total`).

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::run::Shared;

/// The router, separate from the listener so tests can drive it directly.
pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/models", get(models))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), track))
        .with_state(shared)
}

/// Counts and times every request. Unmatched paths share one label so that scanners cannot
/// grow the number of series.
async fn track(State(s): State<Shared>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method = request.method().clone();
    let started = Instant::now();
    let response = next.run(request).await;
    let m = &s.metrics;
    m.http_requests
        .with_label_values(&[route.as_str(), method.as_str(), response.status().as_str()])
        .inc();
    m.http_seconds
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn index() -> Json<serde_json::Value> {
    Json(json!({
        "service": "vigil",
        "endpoints": ["/health", "/ready", "/models", "/metrics"],
    }))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(s): State<Shared>) -> Response {
    let models = s
        .status
        .models_loaded
        .load(std::sync::atomic::Ordering::Relaxed);
    let partitions = s.status.assigned.load(std::sync::atomic::Ordering::Relaxed);
    let body = json!({
        "ready": s.status.ready(),
        "models_loaded": models,
        "partitions_assigned": partitions,
    });
    let code = if s.status.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn models(State(s): State<Shared>) -> Json<serde_json::Value> {
    let m = &s.models.manifest;
    Json(json!({
        "version": m.version,
        "created_at": m.created_at,
        "features": m.features,
        "training": m.training,
        "models": [
            {
                "name": crate::models::ISOLATION_FOREST,
                "parameters": m.isolation_forest.params,
                "sample_size": m.isolation_forest.sample_size,
                "threshold": m.isolation_forest.threshold,
                "training_scores": m.isolation_forest.training_scores,
                "columns": m.isolation_forest.encoder.columns,
            },
            {
                "name": crate::models::LOF,
                "parameters": m.lof.params,
                "k": m.lof.k,
                "index": s.models.lof.index.kind(),
                "threshold": m.lof.threshold,
                "training_scores": m.lof.training_scores,
                "columns": m.lof.encoder.columns,
            }
        ],
    }))
}

async fn metrics(State(s): State<Shared>) -> Response {
    s.metrics.ready.set(i64::from(s.status.ready()));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "not found", "endpoints": ["/health", "/ready", "/models", "/metrics"] })),
    )
        .into_response()
}

/// Serves until `shutdown` is cancelled. Returns the bound address through `bound`.
pub async fn serve(
    addr: SocketAddr,
    shared: Shared,
    shutdown: CancellationToken,
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let _ = bound.send(local);
    tracing::info!(addr = %local, "HTTP server listening");
    axum::serve(listener, router(shared))
        .with_graceful_shutdown(async move { shutdown.cancelled_owned().await })
        .await
}
