//! Publish: alerts to the alerts topic and invalid events to the dead-letter topic, through one
//! idempotent producer; and the acknowledgement side — an event's offset is stored for commit
//! only after its outcome (alert, dead letter, or nothing to publish) is acknowledged, in order.
//!
//! Guarantee: at-least-once. Every consumed event's outcome is on the broker before its offset is
//! committed, so a crash or restart re-processes (never skips) events after the last commit.
//! A re-processed event yields the same `alert_id`, so consumers can drop duplicates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::Encoding;
use crate::decode::{DecodeError, Transaction, transaction_avro_value};
use crate::ingest::KafkaProducer;
use crate::models::{Contribution, Verdict};

/// Where an event came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceCoordinates {
    pub topic: std::sync::Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp (seconds since the epoch), if it has one: the moment it was
    /// published, which bounds how far ahead its event may be dated. Not part of the alert.
    #[serde(skip)]
    pub published_at: Option<i64>,
}

/// The alert record (schema: `schemas/alert.avsc`; JSON has the same field names).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub alert_id: String,
    pub transaction_id: String,
    pub account_id: String,
    pub event_time: String,
    pub detected_at: String,
    pub source: SourceCoordinates,
    pub policy: &'static str,
    pub model_version: String,
    pub models: Vec<Verdict>,
    /// low, medium or high ([`crate::consensus::severity`]).
    pub severity: &'static str,
    /// The policy's margin over the thresholds ([`crate::consensus::margin`]).
    pub margin: f64,
    pub reason: String,
    pub top_features: Vec<Contribution>,
    pub transaction: Transaction,
}

/// The Avro schema of an alert, as shipped in `schemas/alert.avsc`: self-contained (the
/// transaction record inside it is `schemas/transaction.avsc`'s, which a unit test checks).
pub const ALERT_AVSC: &str = include_str!("../schemas/alert.avsc");

/// An alert that could not be encoded (a bug, not bad input: alerts are vigil's own data).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("alert as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("alert as Avro: {0}")]
    Avro(#[from] apache_avro::Error),
}

/// Encodes alerts for the alerts topic: JSON, or an Avro datum of `schemas/alert.avsc`, bare or
/// in the Confluent wire format under the id the registry gave the schema.
#[derive(Debug, Clone)]
pub enum AlertEncoder {
    Json,
    Avro {
        schema: Box<apache_avro::Schema>,
        registered_as: Option<u32>,
    },
}

impl AlertEncoder {
    pub fn new(encoding: Encoding) -> Self {
        match encoding {
            Encoding::Json => Self::Json,
            Encoding::Avro => {
                // The shipped schema is checked by a unit test, so parsing cannot fail here.
                Self::Avro {
                    schema: Box::new(
                        apache_avro::Schema::parse_str(ALERT_AVSC)
                            .unwrap_or_else(|e| unreachable!("shipped schema: {e}")),
                    ),
                    registered_as: None,
                }
            }
        }
    }

    /// Avro alerts framed with `schema_id`, the id the registry gave `schemas/alert.avsc`.
    pub fn in_wire_format(self, schema_id: u32) -> Self {
        match self {
            Self::Avro { schema, .. } => Self::Avro {
                schema,
                registered_as: Some(schema_id),
            },
            json => json,
        }
    }

    /// The alert's bytes on the wire.
    pub fn encode(&self, alert: &Alert) -> Result<Vec<u8>, EncodeError> {
        Ok(match self {
            Self::Json => serde_json::to_vec(alert)?,
            Self::Avro {
                schema,
                registered_as,
            } => {
                let datum = apache_avro::to_avro_datum(schema, alert_avro_value(alert))?;
                match registered_as {
                    Some(id) => crate::decode::confluent_framed(*id, &datum),
                    None => datum,
                }
            }
        })
    }
}

fn alert_avro_value(a: &Alert) -> apache_avro::types::Value {
    use apache_avro::types::Value;
    let s = |v: &str| Value::String(v.to_string());
    let record = |fields: Vec<(&str, Value)>| {
        Value::Record(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    };
    record(vec![
        ("alert_id", s(&a.alert_id)),
        ("transaction_id", s(&a.transaction_id)),
        ("account_id", s(&a.account_id)),
        ("event_time", s(&a.event_time)),
        ("detected_at", s(&a.detected_at)),
        (
            "source",
            record(vec![
                ("topic", s(&a.source.topic)),
                ("partition", Value::Int(a.source.partition)),
                ("offset", Value::Long(a.source.offset)),
            ]),
        ),
        ("policy", s(a.policy)),
        ("model_version", s(&a.model_version)),
        (
            "models",
            Value::Array(
                a.models
                    .iter()
                    .map(|v| {
                        record(vec![
                            ("model", s(v.model)),
                            ("score", Value::Double(v.score)),
                            ("threshold", Value::Double(v.threshold)),
                            ("flagged", Value::Boolean(v.flagged)),
                            ("margin", Value::Double(v.margin)),
                        ])
                    })
                    .collect(),
            ),
        ),
        ("severity", s(a.severity)),
        ("margin", Value::Double(a.margin)),
        ("reason", s(&a.reason)),
        (
            "top_features",
            Value::Array(
                a.top_features
                    .iter()
                    .map(|c| {
                        record(vec![
                            ("feature", s(c.feature)),
                            ("value", Value::Double(c.value)),
                            ("share", Value::Double(c.share)),
                            ("forest_share", Value::Double(c.forest_share)),
                            ("lof_share", Value::Double(c.lof_share)),
                            ("detail", s(&c.detail)),
                        ])
                    })
                    .collect(),
            ),
        ),
        ("transaction", transaction_avro_value(&a.transaction)),
    ])
}

/// Deterministic alert id: the same event scored by the same model version always gets the
/// same id, so a re-delivery is recognisable.
pub fn alert_id(source: &SourceCoordinates, model_version: &str) -> String {
    let digest = Sha256::digest(format!(
        "{}/{}/{}/{model_version}",
        source.topic, source.partition, source.offset
    ));
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Most of an invalid event's bytes its dead letter carries. With [`DEAD_LETTER_MAX_ERROR`] and
/// [`DEAD_LETTER_MAX_COPIED_HEADERS`] a dead letter stays far below Kafka's default 1 MB message
/// limit, so the broker can never refuse one for its size — which would stop the partition for
/// good, since an event's offset is stored only once its dead letter is acknowledged. The full
/// size and a SHA-256 of the original bytes are in the `original.bytes` / `original.sha256`
/// headers, so a truncated event can still be matched with its producer's copy.
pub const DEAD_LETTER_MAX_PAYLOAD: usize = 64 * 1024;

/// Longest text of the `error` header (and of the log line): the reason may quote the value.
pub const DEAD_LETTER_MAX_ERROR: usize = 1024;

/// Budget in bytes for the original event's headers copied onto its dead letter; the rest are
/// left out and counted in `original.headers_dropped`.
pub const DEAD_LETTER_MAX_COPIED_HEADERS: usize = 16 * 1024;

/// The part of an invalid event's bytes that its dead letter carries.
pub fn dead_letter_payload(payload: &[u8]) -> &[u8] {
    &payload[..payload.len().min(DEAD_LETTER_MAX_PAYLOAD)]
}

/// `text` cut to at most `max` bytes at a character boundary, "…" marking the cut.
pub fn bounded_text(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

/// Dead-letter headers: the reason and where the event came from, the size (and, when the
/// payload is cut, the digest) of the original bytes, plus the original headers within
/// [`DEAD_LETTER_MAX_COPIED_HEADERS`].
pub fn dead_letter_headers(
    error: &DecodeError,
    source: &SourceCoordinates,
    payload: &[u8],
    original: Option<&OwnedHeaders>,
) -> OwnedHeaders {
    let partition = source.partition.to_string();
    let offset = source.offset.to_string();
    let message = error.to_string();
    let message = bounded_text(&message, DEAD_LETTER_MAX_ERROR);
    let size = payload.len().to_string();
    let mut headers = OwnedHeaders::new()
        .insert(Header {
            key: "error",
            value: Some(message.as_ref()),
        })
        .insert(Header {
            key: "error.code",
            value: Some(error.code()),
        })
        .insert(Header {
            key: "error.field",
            value: error.field(),
        })
        .insert(Header {
            key: "error.stage",
            value: Some(error.stage()),
        })
        .insert(Header {
            key: "source.topic",
            value: Some(&*source.topic),
        })
        .insert(Header {
            key: "source.partition",
            value: Some(partition.as_str()),
        })
        .insert(Header {
            key: "source.offset",
            value: Some(offset.as_str()),
        })
        .insert(Header {
            key: "original.bytes",
            value: Some(size.as_str()),
        });
    if payload.len() > DEAD_LETTER_MAX_PAYLOAD {
        let digest: String = Sha256::digest(payload)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        headers = headers.insert(Header {
            key: "original.sha256",
            value: Some(digest.as_str()),
        });
    }
    if let Some(original) = original {
        let (mut budget, mut dropped) = (DEAD_LETTER_MAX_COPIED_HEADERS, 0usize);
        for h in original.iter() {
            let bytes = h.key.len() + h.value.map_or(0, <[u8]>::len);
            if bytes > budget {
                dropped += 1;
                continue;
            }
            budget -= bytes;
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
        if dropped > 0 {
            headers = headers.insert(Header {
                key: "original.headers_dropped",
                value: Some(dropped.to_string().as_str()),
            });
        }
    }
    headers
}

/// Enqueues a record, waiting while the producer's local queue is full (back-pressure, never
/// drop). Returns the future of the broker's acknowledgement.
pub async fn enqueue(
    producer: &KafkaProducer,
    mut record: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// What was published for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// Scored, nothing to publish.
    Clean,
    Alert,
    DeadLetter,
}

impl OutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Alert => "alert",
            Self::DeadLetter => "dead_letter",
        }
    }
}

/// An event whose outcome is on its way to the broker; its offset may be stored once its
/// `deliveries` are acknowledged and every earlier event of the partition's were. Its `changes`
/// to the state changelog are sent once its outcome is acknowledged (see [`crate::changelog`]).
pub struct Pending {
    pub partition: i32,
    pub offset: i64,
    /// The assignment under which the event was processed ([`crate::ingest::GroupStatus`]).
    pub assignment: u64,
    pub kind: OutcomeKind,
    pub deliveries: Vec<DeliveryFuture>,
    pub changes: Vec<crate::changelog::StateChange>,
    pub consumed_at: Instant,
    /// The event's trace span (disabled unless traces are exported); it ends with this value.
    pub span: tracing::Span,
    /// The alert as JSON, for the alert feed once the broker has it.
    pub alert: Option<Arc<serde_json::Value>>,
    /// Whether one of `deliveries` is a challenger's alert to the shadow topic.
    pub shadow_alert: bool,
}

/// The alerts this instance published, for the page and the live stream: the latest
/// [`FEED_RECENT`] in memory and each new one as it comes. Each has a position, `<epoch>.<n>`
/// (the process's start in milliseconds, then a count), the SSE id by which a client that lost
/// its connection resumes where it was.
pub struct AlertFeed {
    recent: std::sync::Mutex<Recent>,
    live: tokio::sync::broadcast::Sender<FeedItem>,
    epoch: u64,
    /// Cancelled at shutdown, so that open streams end and the server can stop.
    pub closed: tokio_util::sync::CancellationToken,
}

#[derive(Default)]
struct Recent {
    items: std::collections::VecDeque<FeedItem>,
    published: u64,
}

/// One alert of the feed and its position.
#[derive(Debug, Clone)]
pub struct FeedItem {
    pub seq: u64,
    pub alert: Arc<serde_json::Value>,
}

/// What a subscriber resuming after a position gets: the alerts it missed that are still held,
/// how many it missed beyond those, and the live ones from there on, with nothing between.
pub struct Resumed {
    pub missed: Vec<FeedItem>,
    pub lost: u64,
    pub live: tokio::sync::broadcast::Receiver<FeedItem>,
}

/// Alerts `GET /alerts/recent` can return.
pub const FEED_RECENT: usize = 200;

impl Default for AlertFeed {
    fn default() -> Self {
        Self {
            recent: Default::default(),
            // A subscriber that falls this far behind skips ahead (and is told how many it lost).
            live: tokio::sync::broadcast::channel(1024).0,
            epoch: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            closed: Default::default(),
        }
    }
}

impl AlertFeed {
    pub fn publish(&self, alert: Arc<serde_json::Value>) {
        let Ok(mut recent) = self.recent.lock() else {
            return;
        };
        recent.published += 1;
        let item = FeedItem {
            seq: recent.published,
            alert,
        };
        if recent.items.len() == FEED_RECENT {
            recent.items.pop_front();
        }
        recent.items.push_back(item.clone());
        // Sent under the lock, so that a subscriber sees the positions in order and
        // [`Self::resume`] can split held and live alerts without a gap. No subscribers is
        // not an error.
        let _ = self.live.send(item);
    }

    /// The latest `n` alerts, newest first.
    pub fn recent(&self, n: usize) -> Vec<Arc<serde_json::Value>> {
        self.recent
            .lock()
            .map(|r| {
                r.items
                    .iter()
                    .rev()
                    .take(n)
                    .map(|i| i.alert.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// An item's position as a string (the SSE id).
    pub fn position(&self, item: &FeedItem) -> String {
        format!("{}.{}", self.epoch, item.seq)
    }

    /// The live alerts from now on, after those published since `last` (a position this feed
    /// gave; one of an earlier process, or none, resumes from now).
    pub fn resume(&self, last: Option<&str>) -> Resumed {
        let after = last
            .and_then(|l| l.trim().split_once('.'))
            .filter(|(epoch, _)| epoch.parse() == Ok(self.epoch))
            .and_then(|(_, seq)| seq.parse::<u64>().ok());
        let Ok(recent) = self.recent.lock() else {
            return Resumed {
                missed: Vec::new(),
                lost: 0,
                live: self.live.subscribe(),
            };
        };
        let live = self.live.subscribe();
        let Some(after) = after.filter(|&a| a < recent.published) else {
            return Resumed {
                missed: Vec::new(),
                lost: 0,
                live,
            };
        };
        let missed: Vec<FeedItem> = recent
            .items
            .iter()
            .filter(|i| i.seq > after)
            .cloned()
            .collect();
        let first_held = missed.first().map_or(recent.published + 1, |i| i.seq);
        Resumed {
            lost: first_held - after - 1,
            missed,
            live,
        }
    }
}

/// Why an outcome could not be acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("delivery of the outcome of partition {partition} offset {offset} failed: {source}")]
    Delivery {
        partition: i32,
        offset: i64,
        source: KafkaError,
    },
    #[error(
        "the producer was dropped before partition {partition} offset {offset} was acknowledged"
    )]
    Canceled { partition: i32, offset: i64 },
}

impl Pending {
    /// Waits for the broker to take every delivery (at once when there is none). A delivery the producer gave up on (an outage
    /// longer than its own retries, a topic that is gone, a revoked ACL) is sent again after a
    /// pause that doubles from 1 s to 30 s, until the broker takes it or `retry.shutdown` is
    /// cancelled. Nothing after it on its partition is stored meanwhile, so it is neither lost
    /// nor a reason to exit — and a restart would meet the same refusal: a crash loop.
    pub async fn acknowledged(mut self, retry: Retry<'_>) -> Result<Self, PublishError> {
        let (partition, offset) = (self.partition, self.offset);
        let mut pause = Duration::from_secs(1);
        while let Some(delivery) = self.deliveries.pop() {
            let span = tracing::trace_span!(parent: &self.span, "acknowledge");
            match tracing::Instrument::instrument(delivery, span).await {
                Ok(Ok(_)) => {}
                Ok(Err((source, refused))) => {
                    (retry.on_failure)(&source, pause);
                    tokio::select! {
                        () = retry.shutdown.cancelled() => {
                            return Err(PublishError::Delivery { partition, offset, source });
                        }
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(30));
                    let headers = refused.headers().cloned();
                    let mut record = FutureRecord::to(refused.topic());
                    if let Some(payload) = refused.payload() {
                        record = record.payload(payload);
                    }
                    if refused.partition() >= 0 {
                        // Where it was bound (a changelog record's partition is its input's).
                        record = record.partition(refused.partition());
                    }
                    if let Some(key) = refused.key() {
                        record = record.key(key);
                    }
                    if let Some(headers) = headers {
                        record = record.headers(headers);
                    }
                    self.deliveries
                        .push(enqueue(retry.producer, record).await.map_err(|source| {
                            PublishError::Delivery {
                                partition,
                                offset,
                                source,
                            }
                        })?);
                }
                Err(_) => return Err(PublishError::Canceled { partition, offset }),
            }
        }
        Ok(self)
    }
}

/// How [`Pending::acknowledged`] sends a refused outcome again.
pub struct Retry<'a> {
    pub producer: &'a KafkaProducer,
    /// Called with each refusal and the pause before the next attempt.
    pub on_failure: &'a (dyn Fn(&KafkaError, Duration) + Sync),
    pub shutdown: &'a tokio_util::sync::CancellationToken,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_avro_alert_decodes_back_with_the_shipped_schemas() {
        let tx = crate::train::bundled_history()
            .map(|h| h.events[0].clone())
            .unwrap_or_else(|e| panic!("{e}"));
        let alert = Alert {
            alert_id: "a1".into(),
            transaction_id: tx.transaction_id.to_string(),
            account_id: tx.account_id.to_string(),
            event_time: "2023-04-11T16:29:14Z".into(),
            detected_at: "2026-11-24T00:00:00.000Z".into(),
            source: SourceCoordinates {
                topic: "transactions".into(),
                partition: 2,
                offset: 9,
                published_at: None,
            },
            policy: "all",
            model_version: "v1".into(),
            models: vec![Verdict {
                model: "lof",
                score: 3.5,
                threshold: 1.2,
                flagged: true,
                margin: 2.3,
            }],
            severity: "high",
            margin: 2.3,
            reason: "amount".into(),
            top_features: vec![Contribution {
                feature: "amount_vs_habit",
                value: 6.2,
                share: 0.6,
                forest_share: 0.5,
                lof_share: 0.7,
                detail: "amount".into(),
            }],
            transaction: tx.clone(),
        };
        let encoder = AlertEncoder::new(Encoding::Avro);
        let bytes = encoder.encode(&alert).unwrap_or_else(|e| panic!("{e}"));
        // Read with the shipped file alone, as a consumer with only alert.avsc would.
        let schema = apache_avro::Schema::parse_str(include_str!("../schemas/alert.avsc"))
            .unwrap_or_else(|e| panic!("{e}"));
        let value = apache_avro::from_avro_datum(&schema, &mut bytes.as_slice(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let apache_avro::types::Value::Record(fields) = value else {
            panic!("not a record")
        };
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(
            get("alert_id"),
            Some(apache_avro::types::Value::String("a1".into()))
        );
        assert_eq!(
            get("transaction"),
            Some(crate::decode::transaction_avro_value(&tx))
        );
        let framed = AlertEncoder::new(Encoding::Avro)
            .in_wire_format(7)
            .encode(&alert)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            crate::decode::confluent_frame(&framed),
            Some((7, bytes.as_slice()))
        );
        let json = AlertEncoder::new(Encoding::Json)
            .encode(&alert)
            .unwrap_or_default();
        assert!(String::from_utf8_lossy(&json).contains("\"alert_id\":\"a1\""));
    }

    #[test]
    fn the_alert_schema_stands_alone_and_carries_the_transaction_schema_unchanged() {
        let alert = apache_avro::Schema::parse_str(ALERT_AVSC).unwrap_or_else(|e| panic!("{e}"));
        let apache_avro::Schema::Record(record) = &alert else {
            panic!("not a record: {alert:?}")
        };
        let inner = record
            .fields
            .iter()
            .find(|f| f.name == "transaction")
            .map(|f| f.schema.clone());
        assert_eq!(inner, Some(crate::decode::transaction_schema()));
    }

    #[test]
    fn alert_ids_are_deterministic_per_event_and_model_version() {
        let s = SourceCoordinates {
            topic: "transactions".into(),
            partition: 2,
            offset: 41,
            published_at: None,
        };
        let a = alert_id(&s, "v1");
        assert_eq!(a, alert_id(&s.clone(), "v1"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, alert_id(&s, "v2"));
        assert_ne!(a, alert_id(&SourceCoordinates { offset: 42, ..s }, "v1"));
    }

    #[test]
    fn dead_letter_headers_carry_reason_source_and_original_headers() {
        let e = DecodeError::Missing { field: "AccountID" };
        let s = SourceCoordinates {
            topic: "tx".into(),
            partition: 1,
            offset: 7,
            published_at: None,
        };
        let original = OwnedHeaders::new().insert(Header {
            key: "trace",
            value: Some("abc"),
        });
        let h = dead_letter_headers(&e, &s, b"{}", Some(&original));
        let get = |k: &str| {
            h.iter()
                .find(|x| x.key == k)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(
            get("error").as_deref(),
            Some("field `AccountID` is missing")
        );
        assert_eq!(get("error.code").as_deref(), Some("missing_field"));
        assert_eq!(get("error.stage").as_deref(), Some("validate"));
        assert_eq!(get("source.offset").as_deref(), Some("7"));
        assert_eq!(get("trace").as_deref(), Some("abc"));
        assert_eq!(get("original.bytes").as_deref(), Some("2"));
        assert_eq!(get("original.sha256"), None);
    }

    /// A dead letter the broker refused for its size would stop the partition for good.
    #[test]
    fn a_dead_letter_stays_far_below_the_message_limit_however_large_the_bad_event() {
        // A 900 KB enumeration value, which the reason quotes, in a 2 MB event with big headers.
        let value = "X".repeat(900_000);
        let e = DecodeError::NotAllowed {
            field: "TransactionType",
            value: value.clone(),
            allowed: "Debit, Credit".into(),
        };
        let payload = format!(
            "{{\"TransactionType\":\"{value}\",\"pad\":\"{}\"}}",
            "y".repeat(1_100_000)
        );
        let s = SourceCoordinates {
            topic: "tx".into(),
            partition: 0,
            offset: 1,
            published_at: None,
        };
        let mut original = OwnedHeaders::new();
        for i in 0..40 {
            original = original.insert(Header {
                key: &format!("h{i}"),
                value: Some(&"z".repeat(1_000)),
            });
        }
        let h = dead_letter_headers(&e, &s, payload.as_bytes(), Some(&original));
        let header_bytes: usize = h
            .iter()
            .map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len))
            .sum();
        let body = dead_letter_payload(payload.as_bytes());
        assert_eq!(body, &payload.as_bytes()[..DEAD_LETTER_MAX_PAYLOAD]);
        assert!(header_bytes + body.len() < 100 * 1024, "{header_bytes}");
        let get = |k: &str| {
            h.iter()
                .find(|x| x.key == k)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let error = get("error").unwrap_or_default();
        assert!(
            error.len() <= DEAD_LETTER_MAX_ERROR && error.ends_with('…'),
            "{}",
            error.len()
        );
        assert!(error.starts_with("field `TransactionType`"), "{error}");
        assert_eq!(get("original.bytes"), Some(payload.len().to_string()));
        let digest: String = Sha256::digest(payload.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(get("original.sha256"), Some(digest));
        assert_eq!(get("h0").map(|v| v.len()), Some(1_000));
        assert!(
            get("original.headers_dropped").is_some_and(|n| n.parse::<usize>().unwrap_or(0) > 20)
        );
    }

    #[test]
    fn bounded_text_cuts_at_a_character_boundary() {
        assert_eq!(bounded_text("short", 10), "short");
        let cut = bounded_text("ééééé", 6);
        assert!(cut.len() <= 6 && cut.ends_with('…'), "{cut}");
    }
}
