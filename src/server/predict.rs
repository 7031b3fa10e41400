//! `POST /predict` and `POST /models/{name}/predict`: a transaction or a batch of them, each
//! scored against a copy of its account's live state (never changing it), off the async
//! runtime and shared between the cores; answered in request order, or a 422 listing every
//! invalid transaction.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::problem::ApiError;
use super::{models_loading, unknown_model};
use crate::decode::{DecodeError, RawTransaction, validate};
use crate::models::{Contribution, ISOLATION_FOREST, LOF, Verdict};
use crate::pipeline::Engine;
use crate::run::Shared;

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
    ApiError::unprocessable(message, field)
}

fn parse_batch(body: &[u8]) -> Result<Batch<'_>, ApiError> {
    let not_json = |e: serde_json::Error| {
        ApiError::new(
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
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "scoring failed", None)
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
            return Err(ApiError::unprocessable(
                format!("{n} of {} transactions are invalid", items.len()),
                invalid.first().and_then(|i| i.field),
            )
            .with("invalid", json!(invalid)));
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

pub(super) async fn predict(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text(), None))?;
    let policy = s.policy.as_str();
    answer_batch(s, body, View::Both { policy }).await
}

pub(super) async fn predict_one_model(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let i = [ISOLATION_FOREST, LOF]
        .iter()
        .position(|m| *m == name)
        .ok_or_else(|| unknown_model(&name))?;
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text(), None))?;
    answer_batch(s, body, View::One(i)).await
}
