//! Triage routes over the alert index ([`crate::triage`]): `GET /alerts` (search with filters
//! and paging), `GET /alerts/{id}` (one alert and its verdict), `PUT /alerts/{id}/verdict`
//! (an analyst's verdict, answered once the feedback topic has it) and
//! `GET /models/{name}/calibration` (the model's precision by the verdicts, and the threshold
//! for a target precision or alert budget), and `PUT`/`DELETE /models/{name}/threshold` (serve
//! the model with another threshold, recorded on the feedback topic, or the trained one again).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::problem::ApiError;
use crate::models::{ISOLATION_FOREST, LOF};
use crate::run::Shared;
use crate::triage::calibration::{Calibration, Target, calibrate};
use crate::triage::{
    AlertQuery, Indexed, MAX_NOTE_CHARS, MAX_PAGE, Page, Status, ThresholdDecision, TriageError,
    Verdict, VerdictRecord,
};

const PARAMETERS: [&str; 9] = [
    "account",
    "from",
    "to",
    "min_margin",
    "severity",
    "reason",
    "status",
    "limit",
    "offset",
];

fn bad(field: &str, detail: String) -> ApiError {
    ApiError::bad_request(detail, Some(field))
}

fn index_failed(e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error.message = %e, "alert index");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the alert index failed",
        None,
    )
}

/// An event time for a filter: RFC 3339, or the dataset's `YYYY-MM-DD HH:MM:SS` (UTC).
fn time(field: &str, value: &str) -> Result<i64, ApiError> {
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| t.timestamp())
        .ok()
        .or_else(|| crate::decode::parse_time(value))
        .ok_or_else(|| {
            bad(
                field,
                format!("`{value}` is not a time (RFC 3339, or YYYY-MM-DD HH:MM:SS in UTC)"),
            )
        })
}

fn query_of(pairs: Vec<(String, String)>) -> Result<AlertQuery, ApiError> {
    let mut q = AlertQuery {
        limit: 50,
        ..AlertQuery::default()
    };
    for (name, value) in pairs {
        let whole = |field: &str, max: usize| {
            value
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| {
                    bad(
                        field,
                        format!("{field} `{value}` is not a whole number from 0 to {max}"),
                    )
                })
        };
        match name.as_str() {
            "account" => q.account = Some(value),
            "from" => q.from = Some(time("from", &value)?),
            "to" => q.to = Some(time("to", &value)?),
            "min_margin" => {
                q.min_margin = Some(
                    value
                        .parse::<f64>()
                        .ok()
                        .filter(|m| m.is_finite())
                        .ok_or_else(|| {
                            bad(
                                "min_margin",
                                format!("min_margin `{value}` is not a number"),
                            )
                        })?,
                );
            }
            "severity" => match value.as_str() {
                "low" | "medium" | "high" => q.severity = Some(value),
                _ => {
                    return Err(bad(
                        "severity",
                        format!("severity `{value}` is not one of low, medium, high"),
                    ));
                }
            },
            "reason" => q.reason = Some(value),
            "status" => {
                q.status = Some(Status::parse(&value).ok_or_else(|| {
                    bad(
                        "status",
                        format!(
                            "status `{value}` is not one of unreviewed, fraud, legitimate, needs_review"
                        ),
                    )
                })?);
            }
            "limit" => {
                q.limit = whole("limit", MAX_PAGE)?;
                if q.limit == 0 {
                    return Err(bad("limit", format!("limit must be from 1 to {MAX_PAGE}")));
                }
            }
            "offset" => q.offset = whole("offset", 1_000_000)?,
            other => {
                return Err(bad(
                    other,
                    format!(
                        "unknown query parameter `{other}`; the filters are {}",
                        PARAMETERS.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(q)
}

/// `GET /alerts`: the indexed alerts that match every filter given, newest event first.
pub(super) async fn search(
    State(s): State<Shared>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<Page>, ApiError> {
    let q = query_of(pairs)?;
    let triage = s.triage.clone();
    tokio::task::spawn_blocking(move || triage.index.search(&q))
        .await
        .map_err(|e| index_failed(&e))?
        .map(Json)
        .map_err(|e| index_failed(&e))
}

/// Who gave a verdict or decision: a name of at most 100 characters, or nobody.
fn analyst_of(analyst: Option<String>) -> Result<Option<String>, ApiError> {
    match analyst {
        Some(a) if a.chars().count() > 100 => Err(ApiError::unprocessable(
            "the analyst's name is longer than 100 characters",
            Some("analyst"),
        )),
        a => Ok(a.filter(|a| !a.trim().is_empty())),
    }
}

fn unknown_alert(id: &str, days: f64) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no alert `{id}` was published in the last {days:.0} days (alerts.index_window_days)"
        ),
        Some("id"),
    )
}

/// `GET /alerts/{id}`: the alert as published and the latest verdict on it.
pub(super) async fn one(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Indexed>, ApiError> {
    let days = s.triage.settings.window.as_secs_f64() / 86_400.0;
    indexed_alert(&s, &id)
        .await?
        .map(Json)
        .ok_or_else(|| unknown_alert(&id, days))
}

/// One alert from the index, looked up on a blocking thread: the index is one connection behind
/// a lock that a search or a batch of new alerts may hold for a while, and waiting for it here
/// would hold up one of the runtime's threads, which the stream's workers share.
async fn indexed_alert(s: &Shared, id: &str) -> Result<Option<Indexed>, ApiError> {
    let (triage, id) = (s.triage.clone(), id.to_string());
    tokio::task::spawn_blocking(move || triage.index.get(&id))
        .await
        .map_err(|e| index_failed(&e))?
        .map_err(|e| index_failed(&e))
}

/// What an analyst sends: the verdict, a note, and who they are (optional).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VerdictRequest {
    verdict: String,
    #[serde(default)]
    note: String,
    #[serde(default)]
    analyst: Option<String>,
}

/// `PUT /alerts/{id}/verdict`: publishes the verdict to the feedback topic and answers with it
/// once the broker has it; the latest verdict on an alert is the one that counts.
pub(super) async fn decide(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Json(request): Json<VerdictRequest>,
) -> Result<Json<VerdictRecord>, ApiError> {
    let verdict = Verdict::parse(&request.verdict).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "verdict `{}` is not one of fraud, legitimate, needs_review",
                request.verdict
            ),
            Some("verdict"),
        )
    })?;
    if request.note.chars().count() > MAX_NOTE_CHARS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the note is longer than {MAX_NOTE_CHARS} characters"),
            Some("note"),
        ));
    }
    let analyst = analyst_of(request.analyst)?;
    let days = s.triage.settings.window.as_secs_f64() / 86_400.0;
    let alert = indexed_alert(&s, &id)
        .await?
        .ok_or_else(|| unknown_alert(&id, days))?
        .alert;
    let field = |k: &str| {
        alert
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let record = VerdictRecord {
        alert_id: id,
        transaction_id: field("transaction_id"),
        account_id: field("account_id"),
        verdict,
        note: request.note,
        analyst,
        decided_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        model_version: field("model_version"),
    };
    match s.triage.clone().decide(record).await {
        Ok(record) => {
            s.metrics
                .verdicts
                .with_label_values(&[verdict.as_str()])
                .inc();
            Ok(Json(record))
        }
        Err(e) => {
            tracing::warn!(error.message = %e, "a verdict was not published");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the verdict was not recorded: {e}; send it again"),
                None,
            ))
        }
    }
}

fn target_of(pairs: Vec<(String, String)>) -> Result<Option<Target>, ApiError> {
    let mut target = None;
    for (name, value) in pairs {
        let number = value.parse::<f64>().ok().filter(|x| x.is_finite());
        let parsed = match name.as_str() {
            "target_precision" => number
                .filter(|p| *p > 0.0 && *p < 1.0)
                .map(Target::Precision)
                .ok_or_else(|| {
                    bad(
                        "target_precision",
                        format!("target_precision `{value}` is not a number between 0 and 1"),
                    )
                }),
            "alerts_per_day" => number
                .filter(|n| *n > 0.0)
                .map(Target::AlertsPerDay)
                .ok_or_else(|| {
                    bad(
                        "alerts_per_day",
                        format!("alerts_per_day `{value}` is not a positive number"),
                    )
                }),
            other => Err(bad(
                other,
                format!(
                    "unknown query parameter `{other}`; give target_precision or alerts_per_day"
                ),
            )),
        }?;
        if target.replace(parsed).is_some() {
            return Err(bad(
                &name,
                "give one of target_precision and alerts_per_day, once".into(),
            ));
        }
    }
    Ok(target)
}

/// `GET /models/{name}/calibration`: how precise the model's alerts were by the analysts'
/// verdicts (overall and per day), and with `target_precision` or `alerts_per_day` the
/// threshold that meets it. Changes nothing.
pub(super) async fn calibration(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<Calibration>, ApiError> {
    let target = target_of(pairs)?;
    let models = s.models().ok_or_else(super::models_loading)?;
    let (model, threshold) = match name.as_str() {
        ISOLATION_FOREST => (ISOLATION_FOREST, models.forest.threshold.get()),
        LOF => (LOF, models.lof.threshold.get()),
        _ => return Err(super::unknown_model(&name)),
    };
    let triage = s.triage.clone();
    let alerts = tokio::task::spawn_blocking(move || triage.index.scores(model))
        .await
        .map_err(|e| index_failed(&e))?
        .map_err(|e| index_failed(&e))?;
    Ok(Json(calibrate(model, threshold, &alerts, target)))
}

/// What an operator sends to change a threshold.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ThresholdRequest {
    threshold: f64,
    note: String,
    #[serde(default)]
    analyst: Option<String>,
}

fn threshold_not_recorded(e: &TriageError) -> ApiError {
    tracing::warn!(error.message = %e, "a threshold decision was not published");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the threshold was not changed: {e}; send it again"),
        None,
    )
}

/// `PUT /models/{name}/threshold`: serves the model of the loaded version with `threshold` from
/// now on, on every instance (the decision is published to the feedback topic first, and only
/// then applied); answered with the decision, which names the threshold it replaced.
pub(super) async fn set_threshold(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Json(request): Json<ThresholdRequest>,
) -> Result<Json<ThresholdDecision>, ApiError> {
    let models = s.models().ok_or_else(super::models_loading)?;
    let Some(current) = models.threshold_of(&name) else {
        return Err(super::unknown_model(&name));
    };
    if !request.threshold.is_finite() {
        return Err(ApiError::unprocessable(
            "the threshold is not a finite number",
            Some("threshold"),
        ));
    }
    if request.note.trim().is_empty() || request.note.chars().count() > MAX_NOTE_CHARS {
        return Err(ApiError::unprocessable(
            format!("say why, in a note of 1 to {MAX_NOTE_CHARS} characters"),
            Some("note"),
        ));
    }
    let analyst = analyst_of(request.analyst)?;
    let decision = ThresholdDecision {
        model: name.clone(),
        model_version: models.version().to_string(),
        threshold: request.threshold,
        previous: current.get(),
        note: request.note,
        analyst,
        decided_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    let key = ThresholdDecision::key(models.version(), &name);
    s.triage
        .decide_threshold(&key, Some(decision.clone()))
        .await
        .map_err(|e| threshold_not_recorded(&e))?;
    s.apply_thresholds();
    tracing::info!(model = %name, version = %decision.model_version, threshold = decision.threshold,
        previous = decision.previous, analyst = ?decision.analyst, note = %decision.note, "threshold changed");
    Ok(Json(decision))
}

/// `DELETE /models/{name}/threshold`: the model's trained threshold serves again, on every
/// instance; answered with the threshold now serving.
pub(super) async fn reset_threshold(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let models = s.models().ok_or_else(super::models_loading)?;
    let Some(current) = models.threshold_of(&name) else {
        return Err(super::unknown_model(&name));
    };
    let key = ThresholdDecision::key(models.version(), &name);
    s.triage
        .decide_threshold(&key, None)
        .await
        .map_err(|e| threshold_not_recorded(&e))?;
    s.apply_thresholds();
    tracing::info!(model = %name, version = %models.version(), threshold = current.get(), "threshold reset to the trained one");
    Ok(Json(serde_json::json!({
        "model": name,
        "model_version": models.version(),
        "threshold": current.get(),
        "trained_threshold": current.trained(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_filter_is_read_and_a_bad_one_names_its_field() {
        let q = query_of(pairs(&[
            ("account", "AC1"),
            ("from", "2024-01-01T00:00:00Z"),
            ("to", "2024-01-02 00:00:00"),
            ("min_margin", "0.5"),
            ("severity", "high"),
            ("reason", "new device"),
            ("status", "needs_review"),
            ("limit", "10"),
            ("offset", "20"),
        ]))
        .unwrap();
        assert_eq!(q.account.as_deref(), Some("AC1"));
        assert_eq!(q.to.unwrap() - q.from.unwrap(), 86_400);
        assert_eq!(q.status, Some(Status::Is(Verdict::NeedsReview)));
        assert_eq!((q.limit, q.offset), (10, 20));
        for (k, v) in [
            ("from", "yesterday"),
            ("min_margin", "NaN"),
            ("severity", "huge"),
            ("status", "done"),
            ("limit", "0"),
            ("limit", "501"),
            ("offset", "-1"),
            ("colour", "red"),
        ] {
            let e = query_of(pairs(&[(k, v)])).unwrap_err();
            assert_eq!(e.field(), Some(k), "{k}={v}");
        }
    }
}
