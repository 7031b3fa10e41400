//! The side HTTP server (axum), one file per concern:
//! - here: the router, its layers (compression, request ids, timeouts, tracing, request
//!   metrics) and the small routes — `GET /health`, `GET /ready` (503 unless models are
//!   loaded, the consumer group has given this instance its share and a broker answers),
//!   `GET /models`, `GET /models/{name}`, `POST /models/reload` (the models in `models.dir`
//!   installed in one step, and the challenger in `models.challenger_dir`),
//!   `POST /models/challenger/promote` (the challenger decides from the next event on), `GET /metrics` (Prometheus text), the page and the API
//!   description;
//! - [`access`]: authentication and per-client rate limits of every route but health,
//!   readiness and metrics;
//! - [`predict`]: `POST /predict` (both models and the consensus) and
//!   `POST /models/{name}/predict` (one model) for a list of transactions scored against their
//!   accounts' live state, read-only;
//! - [`alerts`]: `GET /accounts/{id}`, `GET /alerts/recent` and the live `GET /alerts/stream`;
//! - [`triage`]: the alert index — `GET /alerts` (search), `GET /alerts/{id}` — analysts'
//!   verdicts, `PUT /alerts/{id}/verdict`, `GET /models/{name}/calibration` from them, and
//!   `PUT`/`DELETE /models/{name}/threshold` to act on it;
//! - [`problem`]: every error answer as an RFC 9457 problem naming the field and the reason.
//!
//! It reads shared state and changes nothing but which models serve and the verdicts. Every request is counted by matched route,
//! method and status (`vigil_http_requests_total`) and carries an `x-request-id` (the caller's,
//! or a new UUID), echoed in the answer and in the request's tracing span.

pub mod access;
mod alerts;
mod predict;
pub mod problem;
mod triage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, FromRef, MatchedPath, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower_http::compression::CompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::models::{ISOLATION_FOREST, LOF, ModelSet};
use crate::run::Shared;
pub use access::{Access, AccessSettings, Auth, RateLimit};
pub use predict::{BODY_LIMIT, MAX_BATCH};
pub use problem::ApiError;

const ENDPOINTS: [&str; 21] = [
    "GET /health",
    "GET /ready",
    "GET /models",
    "GET /models/{name}",
    "POST /models/reload",
    "POST /models/challenger/promote",
    "POST /predict",
    "POST /models/{name}/predict",
    "GET /models/{name}/calibration",
    "PUT /models/{name}/threshold",
    "DELETE /models/{name}/threshold",
    "GET /accounts/{id}",
    "GET /alerts",
    "GET /alerts/recent",
    "GET /alerts/stream",
    "GET /alerts/{id}",
    "PUT /alerts/{id}/verdict",
    "GET /metrics",
    "GET /openapi.json",
    "GET /docs",
    "GET /",
];

/// The OpenAPI 3.0 description of every route (a test keeps it and the router in step).
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// A page that renders `/openapi.json` (self-contained: no external scripts or styles).
async fn docs() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("docs.html"))
}

/// What the handlers read: the stream's shared state and the access settings, apart.
#[derive(Clone)]
struct AppState {
    shared: Shared,
    access: Arc<Access>,
}

impl FromRef<AppState> for Shared {
    fn from_ref(state: &AppState) -> Self {
        state.shared.clone()
    }
}

impl FromRef<AppState> for Arc<Access> {
    fn from_ref(state: &AppState) -> Self {
        state.access.clone()
    }
}

/// The HTTP server's settings (`server.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    pub addr: SocketAddr,
    pub access: AccessSettings,
    /// A request still unanswered after this gets a 408 (the live alert stream is not
    /// affected: its answer starts at once).
    pub request_timeout: Duration,
}

/// How long a request may take when nothing else is said.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The router, separate from the listener so tests can drive it directly.
pub fn router(shared: Shared, access: Arc<Access>) -> Router {
    router_with_timeout(shared, access, DEFAULT_REQUEST_TIMEOUT)
}

fn router_with_timeout(shared: Shared, access: Arc<Access>, timeout: Duration) -> Router {
    let state = AppState {
        shared: shared.clone(),
        access: access.clone(),
    };
    let guarded = Router::new()
        .route("/", get(index))
        .route("/models", get(models))
        .route("/models/{name}", get(model))
        .route("/models/reload", post(reload))
        .route("/models/challenger/promote", post(promote))
        .route("/models/{name}/predict", post(predict::predict_one_model))
        .route("/models/{name}/calibration", get(triage::calibration))
        .route(
            "/models/{name}/threshold",
            put(triage::set_threshold).delete(triage::reset_threshold),
        )
        .route("/predict", post(predict::predict))
        .route("/accounts/{id}", get(alerts::account))
        .route("/alerts/recent", get(alerts::recent_alerts))
        .route("/alerts/stream", get(alerts::alert_stream))
        .route("/alerts", get(triage::search))
        .route("/alerts/{id}", get(triage::one))
        .route("/alerts/{id}/verdict", put(triage::decide))
        .route("/openapi.json", get(openapi))
        .route("/docs", get(docs))
        .route_layer(middleware::from_fn_with_state(access, access::guard));
    // Outermost last: the request id is set first and echoed last, the metrics see the final
    // status, and every error leaves as a problem document.
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(guarded)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(middleware::from_fn(problem::every_error_is_a_problem))
        .layer(CompressionLayer::new())
        .layer(middleware::from_fn_with_state(shared, track))
        // A 5xx is logged at debug like any answer: /ready's 503 while a broker is away would
        // otherwise put an error in the log at every probe.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// A request's tracing span, with its id. Target `http`, not this module's: logged with
/// `log.filter: info,http=debug`, and kept out of the OTLP export, which carries the stream's
/// per-event spans. Its 5xx answers are logged at debug like any other: `/ready`'s 503 while a
/// broker is away would otherwise put an error in the log at every probe.
fn request_span(request: &Request) -> tracing::Span {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::debug_span!(
        target: "http",
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %id
    )
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

/// The web page for people (live alerts, a transaction check, account lookup, the models) to a
/// browser; the list of endpoints to anything that does not ask for HTML.
async fn index(headers: axum::http::HeaderMap) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        axum::response::Html(include_str!("page.html")).into_response()
    } else {
        Json(json!({ "service": "vigil", "endpoints": ENDPOINTS })).into_response()
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(s): State<Shared>) -> Response {
    let models = s
        .status
        .models_loaded
        .load(std::sync::atomic::Ordering::Relaxed);
    let partitions = s.status.assigned();
    let joined = s.status.joined.load(std::sync::atomic::Ordering::Relaxed);
    let body = json!({
        "ready": s.status.ready(),
        "models_loaded": models,
        "group_joined": joined,
        "partitions_assigned": partitions,
        // More instances than partitions: this one waits to take over.
        "standby": joined && partitions == 0,
        "broker_reachable": s.status.broker_reachable(),
        "partitions_restoring": s.status.restoring(),
        "seconds_since_broker_answered": s.status.since_broker_contact().map(|d| d.as_secs_f64()),
    });
    let code = if s.status.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Loads `models.dir` again and installs what it holds, in one step (see [`Shared::reload`]):
/// 200 with the version now serving and the one before, 409 when the new version needs other
/// account state than the stream keeps, 422 when the directory holds no usable artifact.
async fn reload(State(s): State<Shared>) -> Result<Json<crate::run::Reloaded>, ApiError> {
    off_the_runtime(move || s.reload()).await
}

async fn promote(State(s): State<Shared>) -> Result<Json<crate::run::Promoted>, ApiError> {
    off_the_runtime(move || s.promote()).await
}

/// Runs a model change (it reads and writes files, and builds LOF's index) off the runtime's
/// threads.
async fn off_the_runtime<T: Send + 'static>(
    change: impl FnOnce() -> Result<T, crate::run::ReloadError> + Send + 'static,
) -> Result<Json<T>, ApiError> {
    use crate::run::ReloadError;
    let answer = tokio::task::spawn_blocking(change).await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model change failed",
            None,
        )
    })?;
    answer.map(Json).map_err(|e| {
        let status = match &e {
            ReloadError::Loading => StatusCode::SERVICE_UNAVAILABLE,
            ReloadError::NoDirectory
            | ReloadError::NoChallenger
            | ReloadError::Incompatible { .. } => StatusCode::CONFLICT,
            ReloadError::Unloadable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ReloadError::Unwritable { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string(), None)
    })
}

/// 503 while the models load (or train) at start.
pub(super) fn models_loading() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the models are loading; /ready turns 200 once they are",
        None,
    )
}

/// One model's description, or `None` for an unknown name.
fn model_entry(models: &ModelSet, name: &str) -> Option<serde_json::Value> {
    let m = &models.manifest;
    match name {
        ISOLATION_FOREST => Some(json!({
            "name": ISOLATION_FOREST,
            "version": m.version,
            "parameters": m.isolation_forest.params,
            "sample_size": m.isolation_forest.sample_size,
            "threshold": models.forest.threshold.get(),
            "trained_threshold": m.isolation_forest.threshold,
            "training_scores": m.isolation_forest.training_scores,
            "columns": m.isolation_forest.encoder.columns,
        })),
        LOF => Some(json!({
            "name": LOF,
            "version": m.version,
            "parameters": m.lof.params,
            "k": m.lof.k,
            "reference_rows": models.lof.model.reference_rows(),
            "index": models.lof.index.kind(),
            "threshold": models.lof.threshold.get(),
            "trained_threshold": m.lof.threshold,
            "training_scores": m.lof.training_scores,
            "columns": m.lof.encoder.columns,
        })),
        _ => None,
    }
}

async fn models(State(s): State<Shared>) -> Result<Json<serde_json::Value>, ApiError> {
    let set = s.models().ok_or_else(models_loading)?;
    let m = &set.manifest;
    Ok(Json(json!({
        "version": m.version,
        "created_at": m.created_at,
        "features": m.features,
        "training": m.training,
        "policy": s.policy.as_str(),
        "models": [model_entry(&set, ISOLATION_FOREST), model_entry(&set, LOF)],
        "challenger": s.challenger().map(|c| json!({
            "version": c.manifest.version,
            "created_at": c.manifest.created_at,
            "training": c.manifest.training,
            "models": [model_entry(&c, ISOLATION_FOREST), model_entry(&c, LOF)],
            "agreement": s.shadow_tally.counts().into_iter()
                .map(|(a, n)| (a.as_str(), n))
                .collect::<std::collections::BTreeMap<_, _>>(),
        })),
    })))
}

pub(super) fn unknown_model(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no model `{name}`; the models are {ISOLATION_FOREST} and {LOF}"),
        Some("name"),
    )
}

async fn model(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let set = s.models().ok_or_else(models_loading)?;
    model_entry(&set, &name)
        .map(Json)
        .ok_or_else(|| unknown_model(&name))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
        None,
    )
}

async fn metrics(State(s): State<Shared>) -> Response {
    s.metrics.ready.set(i64::from(s.status.ready()));
    // Computed at the scrape from the serving models' window (a reload starts a new one).
    s.metrics.feature_drift.reset();
    if let Some(models) = s.models() {
        for (feature, psi) in models.drift.psi() {
            s.metrics
                .feature_drift
                .with_label_values(&[feature])
                .set(psi);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {}", request.uri().path()),
        None,
    )
    .with("endpoints", json!(ENDPOINTS))
}

/// Starts [`serve`] on `listener` on a runtime of its own (thread `vigil-http`), so health,
/// readiness and metrics answer even while every thread of the stream's runtime is blocked (a
/// commit or a rebalance waiting out a broker that is away). The thread ends when `shutdown` is
/// cancelled and open connections are done; join it to wait for that.
pub fn start(
    listener: std::net::TcpListener,
    shared: Shared,
    settings: &ServerSettings,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vigil-http")
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    let access = Access::new(settings.access.clone());
    let timeout = settings.request_timeout;
    std::thread::Builder::new()
        .name("vigil-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, shared, access, timeout, shutdown).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    tracing::error!(error.message = %e, "HTTP server failed");
                }
            })
        })
}

/// Serves `listener` until `shutdown` is cancelled and open connections are done.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Shared,
    access: Arc<Access>,
    timeout: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "HTTP server listening");
    // Open alert streams end at shutdown; graceful shutdown waits for every connection.
    let feed = shared.alerts.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        feed.closed.cancel();
    });
    let sweeper = access.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => sweeper.forget_idle_clients(),
            }
        }
    });
    axum::serve(
        listener,
        router_with_timeout(shared, access, timeout)
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled_owned().await })
    .await
}
