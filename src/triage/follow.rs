//! The triage index's Kafka side: [`follow`] reads the alerts topic from the start of the window
//! and the feedback topic whole into the [`AlertIndex`](super::AlertIndex), then keeps up with
//! both; [`VerdictPublisher`] writes verdicts. Assign-only, like a replay: no consumer group is
//! joined and nothing is committed, so every instance reads everything and the stream's group
//! never notices.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::{Triage, TriageError, VerdictRecord};
use crate::config::{Encoding, KafkaConfig};
use crate::ingest::{KafkaProducer, Partitions, client_config, ensure_topic, reader_config};
use crate::metrics::Metrics;

/// Publishes verdicts to the feedback topic, keyed by alert id.
#[derive(Clone)]
pub struct VerdictPublisher {
    producer: KafkaProducer,
    topic: String,
}

impl VerdictPublisher {
    /// Returns once the broker has the verdict (acks=all, idempotent), or says why not.
    pub async fn publish(&self, v: &VerdictRecord) -> Result<(), TriageError> {
        let payload = serde_json::to_vec(v).map_err(|e| TriageError::NotAVerdict(e.to_string()))?;
        self.publish_record(&v.alert_id, Some(&payload)).await
    }

    /// Any record of the feedback topic (`None`: a tombstone), acknowledged by the broker.
    pub async fn publish_record(
        &self,
        key: &str,
        payload: Option<&[u8]>,
    ) -> Result<(), TriageError> {
        let mut record = FutureRecord::to(&self.topic).key(key.as_bytes());
        if let Some(p) = payload {
            record = record.payload(p);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map(|_| ())
            .map_err(|(e, _)| TriageError::Publish(e.to_string()))
    }
}

/// The feedback topic's settings when vigil creates it: compacted, so the latest verdict per
/// alert is kept for good and older ones go.
const FEEDBACK_TOPIC_CONFIG: [(&str, &str); 2] = [
    ("cleanup.policy", "compact"),
    ("min.cleanable.dirty.ratio", "0.1"),
];

/// Alerts indexed in one transaction at most, when many are ready (catching up at start).
const INDEX_BATCH: usize = 1_000;

/// Follows the alerts and feedback topics into `triage.index` until `shutdown`, creating the
/// feedback topic if it is missing, and makes verdicts publishable once the broker answers.
/// Problems are logged and retried: the stream does not depend on any of this.
pub async fn follow(
    kafka: KafkaConfig,
    brokers: String,
    alert_encoding: Encoding,
    triage: Arc<Triage>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let feedback = triage.settings.feedback_topic.clone();
    let mut pause = Duration::from_secs(1);
    loop {
        // One partition: verdicts come at the pace of people.
        let one = Partitions::Fixed(1);
        match ensure_topic(&kafka, &brokers, &feedback, one, &FEEDBACK_TOPIC_CONFIG).await {
            Ok(created) => {
                if created {
                    tracing::info!(topic = %feedback, "created the feedback topic");
                }
                break;
            }
            Err(e) => tracing::warn!(topic = %feedback, error.message = %e,
                retry_in_s = pause.as_secs(), "cannot make sure the feedback topic exists yet"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
    match crate::run::producer(&kafka, &brokers) {
        Ok(producer) => triage.connect(Some(VerdictPublisher {
            producer,
            topic: feedback.clone(),
        })),
        Err(e) => tracing::error!(error.message = %e, "no producer for verdicts"),
    }
    let consumer: StreamConsumer = match client_config(&kafka, &brokers)
        .set(
            "group.id",
            format!("{}-triage-{}", kafka.group_id, std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error.message = %e, "no consumer for the alert index");
            return;
        }
    };
    let decoder = AlertDecoder::new(alert_encoding);
    let alerts = kafka.alerts_topic.clone();
    let mut assigned: Vec<(String, i32)> = Vec::new();
    let mut check = tokio::time::interval(Duration::from_secs(5));
    let mut forget = tokio::time::interval(Duration::from_secs(10));
    let mut problems = 0u64;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                triage.connect(None);
                return;
            }
            _ = check.tick() => {
                if let Err(e) = assign_new_partitions(&consumer, &[&alerts, &feedback], &mut assigned, triage.settings.window) {
                    tracing::debug!(error.message = %e, "alert index: partitions not assigned yet");
                }
            }
            _ = forget.tick() => {
                let window = i64::try_from(triage.settings.window.as_millis()).unwrap_or(i64::MAX);
                let (triage, metrics) = (triage.clone(), metrics.clone());
                // Off the runtime's threads, which the stream's workers share: a month's index
                // is counted and trimmed in its file.
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = triage.index.forget_before(now_ms().saturating_sub(window)) {
                        tracing::warn!(error.message = %e, "alert index: forgetting old alerts failed");
                    }
                    metrics.alert_index_size.set(triage.index.len().map_or(0, |n| n as i64));
                    metrics.alert_index_bytes.set(triage.index.bytes().map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)));
                })
                .await;
            }
            m = consumer.recv() => {
                // This record and whatever else is ready, up to a batch: one transaction for
                // them all (see `AlertIndex::add_all`), which is what makes rebuilding a large
                // window at start take seconds rather than minutes.
                let (mut batch, mut verdicts) = (Vec::new(), Vec::new());
                let mut skipped = Vec::new();
                let mut next = Some(m);
                while let Some(m) = next.take() {
                    let outcome = match &m {
                        Ok(m) if m.topic() == alerts => decoder
                            .decode(m.payload().unwrap_or_default())
                            .map(|alert| batch.push((alert, m.timestamp().to_millis().unwrap_or_else(now_ms)))),
                        Ok(m) => take_verdict(&triage, m).map(|v| verdicts.extend(v)),
                        Err(e) => Err(TriageError::Kafka(e.clone())),
                    };
                    skipped.extend(outcome.err());
                    if batch.len() + verdicts.len() < INDEX_BATCH {
                        next = consumer.recv().now_or_never();
                    }
                }
                if !batch.is_empty() || !verdicts.is_empty() {
                    let triage = triage.clone();
                    // On a blocking thread: the index's lock may be held by a search a while.
                    let written = tokio::task::spawn_blocking(move || {
                        let mut refused = triage
                            .index
                            .add_all(batch.iter().map(|(a, at)| (a, *at)))
                            .unwrap_or_else(|e| vec![e]);
                        refused.extend(verdicts.into_iter().filter_map(|change| match change {
                            VerdictChange::Set(v) => triage.index.set_verdict(&v).err(),
                            VerdictChange::Cleared(id) => triage.index.clear_verdict(&id).err(),
                        }));
                        refused
                    })
                    .await;
                    match written {
                        Ok(refused) => skipped.extend(refused),
                        Err(e) => tracing::error!(error.message = %e, "alert index: indexing stopped"),
                    }
                }
                for e in skipped {
                    problems += 1;
                    // Alerts and verdicts are vigil's own records: a bad one is a bug or a
                    // foreign producer, worth a line, not a flood.
                    if problems <= 10 || problems.is_power_of_two() {
                        tracing::warn!(error.message = %e, problems, "alert index: a record was skipped");
                    }
                }
            }
        }
    }
}

/// A change to the index's verdicts, read from the feedback topic.
enum VerdictChange {
    Set(VerdictRecord),
    /// A tombstone: the verdict on this alert withdrawn.
    Cleared(String),
}

/// Reads a feedback record: a threshold decision is recorded at once (in memory); a verdict is
/// returned, for the index.
fn take_verdict(
    triage: &Triage,
    m: &BorrowedMessage<'_>,
) -> Result<Option<VerdictChange>, TriageError> {
    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
    if key.starts_with(super::THRESHOLD_KEY_PREFIX) {
        let decision = m
            .payload()
            .map(serde_json::from_slice::<super::ThresholdDecision>)
            .transpose()
            .map_err(|e| TriageError::NotAVerdict(e.to_string()))?;
        triage.record_threshold(&key, decision);
        triage.thresholds_changed.notify_one();
        return Ok(None);
    }
    match m.payload() {
        None => Ok(Some(VerdictChange::Cleared(key))),
        Some(bytes) => serde_json::from_slice(bytes)
            .map(|v| Some(VerdictChange::Set(v)))
            .map_err(|e| TriageError::NotAVerdict(e.to_string())),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Assigns the partitions of `topics` not yet assigned: the alerts topic's from the first record
/// published within `window`, the feedback topic's from the beginning. A topic that does not
/// exist yet (no alert was ever published) is looked at again at the next call.
fn assign_new_partitions(
    consumer: &StreamConsumer,
    topics: &[&str; 2],
    assigned: &mut Vec<(String, i32)>,
    window: Duration,
) -> Result<(), KafkaError> {
    let timeout = Duration::from_secs(5);
    let mut new = TopicPartitionList::new();
    for (i, topic) in topics.iter().enumerate() {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        let Some(t) = metadata
            .topics()
            .iter()
            .find(|t| t.name() == *topic && t.error().is_none())
        else {
            continue;
        };
        for p in t.partitions() {
            let key = ((*topic).to_string(), p.id());
            if assigned.contains(&key) {
                continue;
            }
            let start = if i == 0 {
                let since =
                    now_ms().saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX));
                let mut at = TopicPartitionList::new();
                at.add_partition_offset(topic, p.id(), Offset::Offset(since))?;
                consumer
                    .offsets_for_times(at, timeout)?
                    .find_partition(topic, p.id())
                    .map_or(Offset::End, |e| match e.offset() {
                        // No record that recent: everything from now on.
                        Offset::Offset(o) => Offset::Offset(o),
                        _ => Offset::End,
                    })
            } else {
                Offset::Beginning
            };
            new.add_partition_offset(topic, p.id(), start)?;
            assigned.push(key);
        }
    }
    if new.count() > 0 {
        consumer.incremental_assign(&new)?;
        tracing::info!(
            partition_count = new.count(),
            "alert index: following new partitions"
        );
    }
    Ok(())
}

/// Alerts as the stream publishes them (`alerts.encoding`): JSON, or an Avro datum of
/// `schemas/alert.avsc`, bare or in the Confluent wire format.
struct AlertDecoder {
    avro: Option<apache_avro::Schema>,
}

impl AlertDecoder {
    fn new(encoding: Encoding) -> Self {
        Self {
            avro: match encoding {
                Encoding::Json => None,
                Encoding::Avro => apache_avro::Schema::parse_str(crate::publish::ALERT_AVSC).ok(),
            },
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<serde_json::Value, TriageError> {
        let not_an_alert = TriageError::NotAnAlert;
        let Some(schema) = &self.avro else {
            return serde_json::from_slice(bytes).map_err(|e| not_an_alert(e.to_string()));
        };
        // The Confluent wire format: a zero byte and a four-byte schema id before the datum.
        let datum = match bytes {
            [0, _, _, _, _, rest @ ..] => rest,
            _ => bytes,
        };
        let value = apache_avro::from_avro_datum(schema, &mut &datum[..], None)
            .or_else(|_| apache_avro::from_avro_datum(schema, &mut &bytes[..], None))
            .map_err(|e| not_an_alert(e.to_string()))?;
        serde_json::Value::try_from(value).map_err(|e| not_an_alert(e.to_string()))
    }
}

/// Every verdict on the feedback `topic` as labels: each partition read to its end, the latest
/// record per alert id kept (a tombstone withdraws a verdict), as compaction would leave it.
/// Blocking.
pub fn read_verdicts(
    kafka: &KafkaConfig,
    brokers: &str,
    topic: &str,
) -> Result<super::VerdictLabels, TriageError> {
    let purpose = format!("verdicts-{}", std::process::id());
    let consumer: BaseConsumer = reader_config(kafka, brokers, &purpose).create()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(TriageError::NoTopic(topic.to_string()));
    }
    let mut latest: HashMap<String, Option<VerdictRecord>> = HashMap::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
        consumer.assign(&tpl)?;
        loop {
            let m = match consumer.poll(timeout) {
                Some(Ok(m)) => m,
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(KafkaError::Global(RDKafkaErrorCode::OperationTimedOut).into()),
            };
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let last = m.offset() + 1 >= high;
            if key.starts_with(super::THRESHOLD_KEY_PREFIX) {
                // A threshold decision, not a verdict.
                if last {
                    break;
                }
                continue;
            }
            let record = match m.payload() {
                None => None,
                Some(bytes) => Some(
                    serde_json::from_slice::<VerdictRecord>(bytes)
                        .map_err(|e| TriageError::NotAVerdict(e.to_string()))?,
                ),
            };
            latest.insert(key, record);
            if last {
                break;
            }
        }
    }
    Ok(super::VerdictLabels::from_latest(latest))
}
