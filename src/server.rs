//! The side HTTP server (axum): `GET /health`, `GET /ready` (503 unless models are loaded, the
//! consumer group has given this instance its share and a broker answers), `GET /models` and `GET /models/{name}` (versions, parameters,
//! thresholds, features), `POST /predict` (both models and the consensus) and
//! `POST /models/{name}/predict` (one model) for a list of transactions scored against their
//! accounts' live state read-only, `GET /accounts/{id}` and `GET /metrics` (Prometheus text).
//! It reads shared state and never changes it. Bad input gets a 4xx with a JSON body naming the
//! field and the reason. Every request is counted by matched route, method and status
//! (`vigil_http_requests_total`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::config::{Auth, RateLimit};
use crate::decode::{DecodeError, RawTransaction, validate};
use crate::models::{Contribution, ISOLATION_FOREST, LOF, ModelSet, Verdict};
use crate::pipeline::Engine;
use crate::publish::FEED_RECENT;
use crate::run::Shared;

const ENDPOINTS: [&str; 13] = [
    "GET /health",
    "GET /ready",
    "GET /models",
    "GET /models/{name}",
    "POST /predict",
    "POST /models/{name}/predict",
    "GET /accounts/{id}",
    "GET /alerts/recent",
    "GET /alerts/stream",
    "GET /metrics",
    "GET /openapi.json",
    "GET /docs",
    "GET /",
];

/// The OpenAPI 3.0 description of every route (a test keeps it and the router in step).
pub const OPENAPI: &str = include_str!("server/openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// A page that renders `/openapi.json` (self-contained: no external scripts or styles).
async fn docs() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("server/docs.html"))
}

/// The router, separate from the listener so tests can drive it directly.
pub fn router(shared: Shared) -> Router {
    let guarded = Router::new()
        .route("/", get(index))
        .route("/models", get(models))
        .route("/models/{name}", get(model))
        .route("/models/{name}/predict", post(predict_one_model))
        .route("/predict", post(predict))
        .route("/accounts/{id}", get(account))
        .route("/alerts/recent", get(recent_alerts))
        .route("/alerts/stream", get(alert_stream))
        .route("/openapi.json", get(openapi))
        .route("/docs", get(docs))
        .route_layer(middleware::from_fn_with_state(shared.clone(), guard));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(guarded)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(shared.clone(), track))
        .with_state(shared)
}

/// Authentication and per-client token buckets for the guarded routes.
pub struct Access {
    /// The exact `Authorization` header value that is accepted, if any is required.
    expected: Option<String>,
    scheme: &'static str,
    limit: RateLimit,
    buckets: dashmap::DashMap<String, (f64, Instant)>,
}

impl Access {
    /// No authentication, no limit.
    pub fn open() -> Self {
        Self::new(
            Auth::None,
            RateLimit {
                per_second: 0.0,
                burst: 1,
            },
        )
    }

    pub fn new(auth: Auth, limit: RateLimit) -> Self {
        use base64::Engine as _;
        let (expected, scheme) = match auth {
            Auth::None => (None, ""),
            Auth::Basic { username, password } => (
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("{username}:{password}"))
                )),
                "Basic realm=\"vigil\"",
            ),
            Auth::Bearer { token } => (Some(format!("Bearer {token}")), "Bearer"),
        };
        Self {
            expected,
            scheme,
            limit,
            buckets: Default::default(),
        }
    }

    fn authorized(&self, header: Option<&[u8]>) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let Some(given) = header else { return false };
        // Compares every byte whatever the first difference, so timing says nothing.
        given.len() == expected.len()
            && given
                .iter()
                .zip(expected.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Takes a token from `client`'s bucket; `Err(seconds)` until the next one when empty.
    fn take(&self, client: &str) -> Result<(), f64> {
        let RateLimit { per_second, burst } = self.limit;
        if per_second <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut bucket = self
            .buckets
            .entry(client.to_string())
            .or_insert((f64::from(burst), now));
        let (tokens, last) = *bucket;
        let tokens =
            (tokens + now.duration_since(last).as_secs_f64() * per_second).min(f64::from(burst));
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now);
            Ok(())
        } else {
            *bucket = (tokens, now);
            Err((1.0 - tokens) / per_second)
        }
    }
}

/// Authentication, then the client's rate limit, on every route but health, readiness and
/// metrics.
async fn guard(State(s): State<Shared>, request: Request, next: Next) -> Response {
    let access = &s.access;
    if !access.authorized(
        request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    ) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong credentials",
            Some("Authorization"),
        )
        .into_response();
        if let Ok(v) = header::HeaderValue::from_str(access.scheme) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return r;
    }
    let client = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map_or_else(|| "local".to_string(), |c| c.0.ip().to_string());
    if let Err(wait) = access.take(&client) {
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "rate limit: {} requests per second per client (bursts of {})",
                access.limit.per_second, access.limit.burst
            ),
            None,
        )
        .into_response();
        if let Ok(v) = header::HeaderValue::from_str(&format!("{}", wait.ceil().max(1.0) as u64)) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    next.run(request).await
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
        axum::response::Html(include_str!("server/page.html")).into_response()
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

/// 503 while the models load (or train) at start.
fn models_loading() -> ApiError {
    error(
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
            "threshold": m.isolation_forest.threshold,
            "training_scores": m.isolation_forest.training_scores,
            "columns": m.isolation_forest.encoder.columns,
        })),
        LOF => Some(json!({
            "name": LOF,
            "version": m.version,
            "parameters": m.lof.params,
            "k": m.lof.k,
            "index": models.lof.index.kind(),
            "threshold": m.lof.threshold,
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
    })))
}

fn unknown_model(name: &str) -> ApiError {
    error(
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

/// A 4xx/5xx answer with a JSON body: `error` (what is wrong), `field` (which one, if one is
/// at fault) and any details.
pub struct ApiError(StatusCode, serde_json::Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> ApiError {
    ApiError(status, json!({ "error": message.into(), "field": field }))
}

/// Transactions in one request at the most; larger batches are split by the client.
pub const MAX_BATCH: usize = 10_000;
/// Request bodies above this size get a 413.
pub const BODY_LIMIT: usize = 8 * 1024 * 1024;
/// Transactions scored together by one core; larger batches are shared between the cores.
const PART: usize = 128;

/// A prediction request: a transaction, a list of them, or
/// `{"transactions": [...], "as_new_account": true}`. Items stay raw JSON until the scoring
/// threads read them, so that reading a large batch is shared between the cores too.
struct Batch<'a> {
    items: Vec<&'a RawValue>,
    as_new_account: bool,
}

fn unprocessable(message: impl Into<String>, field: Option<&str>) -> ApiError {
    error(StatusCode::UNPROCESSABLE_ENTITY, message, field)
}

fn parse_batch(body: &[u8]) -> Result<Batch<'_>, ApiError> {
    let not_json = |e: serde_json::Error| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
            None,
        )
    };
    let (items, as_new_account) = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => (serde_json::from_slice(body).map_err(not_json)?, false),
        Some(b'{') => {
            let mut object: BTreeMap<String, &RawValue> =
                serde_json::from_slice(body).map_err(not_json)?;
            match object.remove("transactions") {
                // Not a wrapper: the object is one transaction.
                None => (vec![serde_json::from_slice(body).map_err(not_json)?], false),
                Some(list) => {
                    let items = serde_json::from_str(list.get()).map_err(|_| {
                        unprocessable(
                            "`transactions` must be a list of transactions",
                            Some("transactions"),
                        )
                    })?;
                    let as_new = match object.remove("as_new_account") {
                        None => false,
                        Some(flag) => serde_json::from_str(flag.get()).map_err(|_| {
                            unprocessable(
                                "`as_new_account` must be true or false",
                                Some("as_new_account"),
                            )
                        })?,
                    };
                    if let Some(extra) = object.keys().next() {
                        return Err(unprocessable(
                            format!(
                                "unknown key `{extra}`; expected `transactions` and `as_new_account`"
                            ),
                            Some(extra),
                        ));
                    }
                    (items, as_new)
                }
            }
        }
        _ => {
            // Still say so when the body is not JSON at all.
            serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(not_json)?;
            return Err(unprocessable(
                "expected a transaction, a list of transactions, or {\"transactions\": [...]}",
                None,
            ));
        }
    };
    let items: Vec<&RawValue> = items;
    if items.is_empty() {
        return Err(unprocessable(
            "no transactions to score",
            Some("transactions"),
        ));
    }
    if items.len() > MAX_BATCH {
        return Err(unprocessable(
            format!(
                "{} transactions; at most {MAX_BATCH} per request",
                items.len()
            ),
            Some("transactions"),
        ));
    }
    Ok(Batch {
        items,
        as_new_account,
    })
}

/// One invalid transaction of a batch.
#[derive(Serialize)]
struct Invalid {
    index: usize,
    field: Option<&'static str>,
    code: &'static str,
    reason: String,
}

/// What a prediction response shows: both models and the consensus, or one model.
#[derive(Clone, Copy)]
enum View {
    Both { policy: &'static str },
    One(usize),
}

#[derive(Serialize)]
struct Consensus {
    policy: &'static str,
    alert: bool,
    margin: f64,
    severity: &'static str,
}

#[derive(Serialize)]
struct BothModels<'a> {
    transaction_id: &'a str,
    account_id: &'a str,
    account_state: &'static str,
    models: &'a [Verdict; 2],
    consensus: Consensus,
    top_features: &'a [Contribution],
}

#[derive(Serialize)]
struct OneModel<'a> {
    #[serde(flatten)]
    verdict: &'a Verdict,
    transaction_id: &'a str,
    account_id: &'a str,
    account_state: &'static str,
    top_features: &'a [Contribution],
}

/// One part of a batch: its predictions as JSON values separated by commas, or every invalid
/// item of the part (none: scoring failed).
type PartResult = Result<Vec<u8>, Vec<Invalid>>;

/// Reads, validates, scores and serialises one part of a batch.
fn score_part(
    s: &Shared,
    engine: &Engine,
    items: &[&RawValue],
    first_index: usize,
    as_new_account: bool,
    view: View,
) -> PartResult {
    let mut transactions = Vec::with_capacity(items.len());
    let mut invalid = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let checked = serde_json::from_str::<RawTransaction>(item.get())
            .map_err(|e| DecodeError::Malformed {
                format: "JSON",
                detail: e.to_string(),
            })
            .and_then(validate)
            .and_then(|tx| engine.check_time(&tx, None, None).map(|()| tx));
        match checked {
            Ok(tx) => transactions.push(tx),
            Err(e) => invalid.push(Invalid {
                index: first_index + i,
                field: e.field(),
                code: e.code(),
                reason: e.to_string(),
            }),
        }
    }
    if !invalid.is_empty() {
        return Err(invalid);
    }
    let accounts: Vec<_> = transactions
        .iter()
        .map(|tx| {
            (!as_new_account)
                .then(|| s.account(&tx.account_id))
                .flatten()
        })
        .collect();
    let requests: Vec<_> = accounts
        .iter()
        .zip(&transactions)
        .map(|(a, tx)| (a.as_ref().map(|(_, a)| a), tx))
        .collect();
    let predictions = engine.predict_many(&requests);
    let mut out = Vec::with_capacity(items.len() * 1024);
    for (i, (tx, p)) in transactions.iter().zip(&predictions).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let account_state = if p.known_account { "live" } else { "new" };
        let written = match view {
            View::Both { policy } => serde_json::to_writer(
                &mut out,
                &BothModels {
                    transaction_id: &tx.transaction_id,
                    account_id: &tx.account_id,
                    account_state,
                    models: &p.verdicts,
                    consensus: Consensus {
                        policy,
                        alert: p.alert,
                        margin: p.margin,
                        severity: p.severity,
                    },
                    top_features: &p.top,
                },
            ),
            View::One(model) => serde_json::to_writer(
                &mut out,
                &OneModel {
                    verdict: &p.verdicts[model],
                    transaction_id: &tx.transaction_id,
                    account_id: &tx.account_id,
                    account_state,
                    top_features: &p.top,
                },
            ),
        };
        // Writing plain structs into a Vec cannot fail; a failure would be a bug worth a 500.
        if written.is_err() {
            return Err(Vec::new());
        }
    }
    Ok(out)
}

/// A scoring thread panicked or wrote nothing: a bug, not the client's input.
fn scoring_failed() -> ApiError {
    error(StatusCode::INTERNAL_SERVER_ERROR, "scoring failed", None)
}

/// Scores a request off the async runtime, each transaction against a copy of its account's
/// state; answers `{"predictions": [...]}` in request order, or a 422 listing every invalid
/// transaction. Large batches are cut into parts that every core takes from in turn, so that
/// the cores finish together however the cost varies along the batch.
async fn answer_batch(s: Shared, body: Bytes, view: View) -> Result<Response, ApiError> {
    // One model set for the whole request, whatever is installed meanwhile.
    let engine = s.engine().ok_or_else(models_loading)?;
    tokio::task::spawn_blocking(move || {
        let batch = parse_batch(&body)?;
        let items = &batch.items;
        let parts: Vec<&[&RawValue]> = items.chunks(PART).collect();
        let next = AtomicUsize::new(0);
        let work = || {
            let mut done = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(part) = parts.get(n) else {
                    return done;
                };
                done.push((
                    n,
                    score_part(&s, &engine, part, n * PART, batch.as_new_account, view),
                ));
            }
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut parts: Vec<(usize, PartResult)> = std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..cores.min(parts.len()))
                .map(|_| scope.spawn(work))
                .collect();
            let mut all = work();
            for helper in helpers {
                all.extend(helper.join().unwrap_or_default());
            }
            all
        });
        parts.sort_unstable_by_key(|p| p.0);
        if parts.len() != items.len().div_ceil(PART) {
            return Err(scoring_failed());
        }
        let parts: Vec<_> = parts.into_iter().map(|(_, p)| p).collect();
        let mut body = Vec::with_capacity(
            parts
                .iter()
                .map(|p| p.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
                + 20,
        );
        body.extend_from_slice(b"{\"predictions\":[");
        let mut invalid = Vec::new();
        let mut failed = false;
        for (n, part) in parts.into_iter().enumerate() {
            match part {
                Ok(bytes) => {
                    if n > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(&bytes);
                }
                Err(bad) if bad.is_empty() => failed = true,
                Err(bad) => invalid.extend(bad),
            }
        }
        if !invalid.is_empty() {
            let n = invalid.len();
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({
                    "error": format!("{n} of {} transactions are invalid", items.len()),
                    "field": invalid.first().and_then(|i| i.field),
                    "invalid": invalid,
                }),
            ));
        }
        if failed {
            return Err(scoring_failed());
        }
        body.extend_from_slice(b"]}");
        Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
    })
    .await
    .unwrap_or_else(|_| Err(scoring_failed()))
}

async fn predict(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| error(r.status(), r.body_text(), None))?;
    let policy = s.policy.as_str();
    answer_batch(s, body, View::Both { policy }).await
}

async fn predict_one_model(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let i = [ISOLATION_FOREST, LOF]
        .iter()
        .position(|m| *m == name)
        .ok_or_else(|| unknown_model(&name))?;
    let body = body.map_err(|r| error(r.status(), r.body_text(), None))?;
    answer_batch(s, body, View::One(i)).await
}

async fn account(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (partition, a) = s.account(&id).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            format!("account `{id}` has no state on this instance (unknown, expired, or on a partition another instance owns)"),
            Some("id"),
        )
    })?;
    let usual = |f: &crate::state::FrequentValues| {
        json!({
            "most_frequent": f.most_frequent(),
            "seen": f.slots().iter().map(|s| json!({"value": &*s.value, "count": s.count})).collect::<Vec<_>>(),
        })
    };
    Ok(Json(json!({
        "account_id": id,
        "partition": partition,
        "transactions": a.transactions,
        "last_transaction": a.last_time.map(crate::decode::format_time),
        "recent_amounts": a.recent_amounts,
        "recent_durations": a.recent_durations,
        "ip_addresses": usual(&a.ips),
        "locations": usual(&a.locations),
        "devices": usual(&a.devices),
        "merchants": usual(&a.merchants),
        "recent_scores": a.recent_scores.iter().rev().map(|r| json!({
            "event_time": crate::decode::format_time(r.time),
            "isolation_forest": r.forest,
            "lof": r.lof,
            "alert": r.alert,
        })).collect::<Vec<_>>(),
    })))
}

/// `?limit=N` (1 to [`FEED_RECENT`], default 50): the latest alerts, newest first.
async fn recent_alerts(
    State(s): State<Shared>,
    RawQuery(query): RawQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut limit = 50;
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("limit", v)) => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=FEED_RECENT).contains(n))
                    .ok_or_else(|| {
                        error(
                            StatusCode::BAD_REQUEST,
                            format!("limit `{v}` is not a whole number from 1 to {FEED_RECENT}"),
                            Some("limit"),
                        )
                    })?;
            }
            _ => {
                let name = pair.split('=').next().unwrap_or(pair);
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter `{name}`; only `limit` is accepted"),
                    Some(name),
                ));
            }
        }
    }
    let alerts = s.alerts.recent(limit);
    let alerts: Vec<&serde_json::Value> = alerts.iter().map(|a| &**a).collect();
    Ok(Json(json!({ "count": alerts.len(), "alerts": alerts })))
}

/// Server-Sent Events: `event: alert` with the alert JSON as each one is acknowledged by the
/// broker; `event: lagged` with how many were skipped if the client reads too slowly.
async fn alert_stream(
    State(s): State<Shared>,
) -> Sse<impl futures::Stream<Item = Result<Event, axum::Error>>> {
    let feed = s.alerts.clone();
    let stream = futures::stream::unfold(feed.subscribe(), move |mut rx| {
        let closed = feed.closed.clone();
        async move {
            let next = tokio::select! {
                _ = closed.cancelled() => return None,
                next = rx.recv() => next,
            };
            let event = match next {
                Ok(alert) => Event::default().event("alert").json_data(&*alert),
                Err(RecvError::Lagged(n)) => {
                    Ok(Event::default().event("lagged").data(n.to_string()))
                }
                Err(RecvError::Closed) => return None,
            };
            Some((event, rx))
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn method_not_allowed(request: Request) -> ApiError {
    error(
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
        Json(json!({ "error": "not found", "field": null, "endpoints": ENDPOINTS })),
    )
        .into_response()
}

/// Starts [`serve`] on a runtime of its own (thread `vigil-http`), so health, readiness and
/// metrics answer even while every thread of the stream's runtime is blocked (a commit or a
/// rebalance waiting out a broker that is away); returns where it listens once it does, and
/// the thread, which ends when `shutdown` is cancelled and open connections are done.
pub async fn start(
    addr: SocketAddr,
    shared: Shared,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vigil-http")
        .enable_all()
        .build()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("vigil-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                if let Err(e) = serve(addr, shared, shutdown, tx).await {
                    tracing::error!(error.message = %e, %addr, "HTTP server failed");
                }
            })
        })?;
    match rx.await {
        Ok(bound) => Ok((bound, thread)),
        Err(_) => Err(std::io::Error::other(format!(
            "the HTTP server did not start on {addr} (see the log)"
        ))),
    }
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
    // Open alert streams end at shutdown; graceful shutdown waits for every connection.
    let feed = shared.alerts.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        feed.closed.cancel();
    });
    axum::serve(
        listener,
        router(shared).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled_owned().await })
    .await
}
