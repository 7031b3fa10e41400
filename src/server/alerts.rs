//! What the server knows of accounts and alerts: `GET /accounts/{id}` (an account's live state
//! and latest scores), `GET /alerts/recent` and `GET /alerts/stream` (Server-Sent Events, each
//! alert once the broker has acknowledged it).

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::problem::ApiError;
use futures::StreamExt as _;

use crate::publish::{FEED_RECENT, FeedItem, Resumed};
use crate::run::Shared;

pub(super) async fn account(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (partition, a) = s.account(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("account `{id}` has no state on this instance (unknown, expired, or on a partition another instance owns)"),
            Some("id"),
        )
    })?;
    let usual = |sketch: crate::state::Sketch| {
        let f = a.sketches.get(sketch);
        json!({
            "most_frequent": f.most_frequent(),
            "seen": f.slots().iter().map(|s| json!({"value": &*s.value, "count": s.count})).collect::<Vec<_>>(),
        })
    };
    Ok(Json(json!({
        "account_id": id,
        "partition": partition,
        "transactions": a.transactions,
        "last_transaction": a.last_time().map(crate::decode::format_time),
        "recent_amounts": a.recent_amounts().collect::<Vec<_>>(),
        "recent_durations": a.recent_durations().collect::<Vec<_>>(),
        "ip_addresses": usual(crate::state::Sketch::Ip),
        "locations": usual(crate::state::Sketch::Location),
        "devices": usual(crate::state::Sketch::Device),
        "merchants": usual(crate::state::Sketch::Merchant),
        "recent_scores": a.recent_scores().rev().map(|r| json!({
            "event_time": crate::decode::format_time(r.time),
            "isolation_forest": r.forest,
            "lof": r.lof,
            "alert": r.alert,
        })).collect::<Vec<_>>(),
    })))
}

/// `?limit=N` (1 to [`FEED_RECENT`], default 50): the latest alerts, newest first.
pub(super) async fn recent_alerts(
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
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            format!("limit `{v}` is not a whole number from 1 to {FEED_RECENT}"),
                            Some("limit"),
                        )
                    })?;
            }
            _ => {
                let name = pair.split('=').next().unwrap_or(pair);
                return Err(ApiError::new(
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
/// broker, its position as the event's `id`; `event: lagged` with how many were skipped if the
/// client reads too slowly or comes back after more than the feed holds. A client that sends
/// `Last-Event-ID` (a browser's EventSource does on every reconnect) first gets the alerts
/// published since that one, then the live ones, with none missed or repeated between.
pub(super) async fn alert_stream(
    State(s): State<Shared>,
    headers: HeaderMap,
) -> Sse<impl futures::Stream<Item = Result<Event, axum::Error>>> {
    let feed = s.alerts.clone();
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Resumed { missed, lost, live } = feed.resume(last.as_deref());
    let alert = {
        let feed = feed.clone();
        move |item: &FeedItem| {
            Event::default()
                .event("alert")
                .id(feed.position(item))
                .json_data(&*item.alert)
        }
    };
    let lagged = |n: u64| Ok(Event::default().event("lagged").data(n.to_string()));
    let backlog: Vec<_> = (lost > 0)
        .then(|| lagged(lost))
        .into_iter()
        .chain(missed.iter().map(&alert))
        .collect();
    let closed = feed.closed.clone();
    let live = futures::stream::unfold(live, move |mut rx| {
        let (closed, alert) = (closed.clone(), alert.clone());
        async move {
            let next = tokio::select! {
                _ = closed.cancelled() => return None,
                next = rx.recv() => next,
            };
            let event = match next {
                Ok(item) => alert(&item),
                Err(RecvError::Lagged(n)) => lagged(n),
                Err(RecvError::Closed) => return None,
            };
            Some((event, rx))
        }
    });
    Sse::new(futures::stream::iter(backlog).chain(live)).keep_alive(KeepAlive::default())
}
