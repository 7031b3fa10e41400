//! Durable state: the compacted changelog topic from which a partition's account state is
//! restored in time bounded by its accounts, not by its history — Kafka Streams' state-store
//! changelog, fitted to at-least-once delivery.
//!
//! Layout: one changelog partition per input partition; key: the account id; value: the
//! account's state ([`AccountState::to_bytes`]), or a tombstone once the account is forgotten
//! (so compaction drops it); header [`OFFSET_HEADER`]: the input offset through which the record
//! is current. The key [`COMPLETE_KEY`] (no account id can be it) marks the changelog as
//! complete: every account's state was written as of its offset. That happens once per
//! partition, after a restore from the input topic, when the changelog had no such mark.
//!
//! The order of writes is what makes a restore exact. An event's changelog record is sent only
//! once the event's outcome (alert, dead letter) is acknowledged, and every earlier event's
//! outcome and record were; its input offset is stored only once its record is acknowledged.
//! So with `covered` = 1 + the highest offset in a partition's changelog:
//! - every event before `covered` has a durable outcome, and its effect is in the changelog;
//! - events the group delivers again below `covered` (the committed offset lags the stored one
//!   by up to a second, and a crash loses that second) are skipped, not re-done: no duplicate
//!   alert, no event counted twice in the state;
//! - events from `covered` up to the committed offset with no record of their own (dead
//!   letters) are folded in from the input topic, which costs at most that gap.
//!
//! The changelog is written with the group's producer to the partition of the same number, and
//! its owner stops writing a partition before giving it up (see [`crate::ingest::GroupStatus`]'s
//! handover lock), so a revoked partition's late record cannot overwrite its new owner's.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::ingest::{KafkaProducer, client_config, reader_config};
use crate::state::{AccountState, PartitionState, StateFormatError};

/// The header holding the input offset a changelog record is current through.
pub const OFFSET_HEADER: &str = "vigil.offset";

/// The key of the record saying the changelog holds every account of its partition.
pub const COMPLETE_KEY: &[u8] = b"\0vigil.complete";

/// Topic configuration of a changelog vigil creates: compacted, with segments small enough
/// (16 MiB, or ten minutes) that what restore reads beyond one record per account — the segment
/// still being written, which compaction never touches — stays small, and cleaned once a tenth
/// of the log is superseded. Tombstones stay a day (`delete.retention.ms`, Kafka's default).
pub const TOPIC_CONFIG: [(&str, &str); 4] = [
    ("cleanup.policy", "compact"),
    ("segment.bytes", "16777216"),
    ("segment.ms", "600000"),
    ("min.cleanable.dirty.ratio", "0.1"),
];

/// Why the changelog cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("input topic `{0}` does not exist yet, so the changelog's partitions are unknown")]
    NoInputTopic(String),
    #[error(
        "changelog topic `{topic}` has {has} partitions, fewer than the input topic's {needs}; \
         give it as many (kafka-topics.sh --alter --partitions {needs}) or name another"
    )]
    TooFewPartitions {
        topic: String,
        has: usize,
        needs: usize,
    },
    #[error("changelog record at offset {offset} of partition {partition}: {source}")]
    Record {
        partition: i32,
        offset: i64,
        source: StateFormatError,
    },
    #[error(
        "changelog record at offset {offset} of partition {partition} has no {OFFSET_HEADER} header"
    )]
    NoOffset { partition: i32, offset: i64 },
    #[error("reading changelog partition {0} timed out")]
    Timeout(i32),
}

/// One record to write to the changelog.
#[derive(Debug, Clone, PartialEq)]
pub struct StateChange {
    key: Box<[u8]>,
    /// `None`: a tombstone.
    value: Option<Vec<u8>>,
    /// The input offset the record is current through.
    through: i64,
}

impl StateChange {
    /// An account's state after the event at `through`.
    pub fn account(id: &str, state: &AccountState, through: i64) -> Self {
        Self {
            key: id.as_bytes().into(),
            value: Some(state.to_bytes()),
            through,
        }
    }

    /// An account forgotten (idle past the TTL) by the event at `through`.
    pub fn forgotten(id: &str, through: i64) -> Self {
        Self {
            key: id.as_bytes().into(),
            value: None,
            through,
        }
    }

    /// Every account of `state` as it is after the event at `through`, then the mark that the
    /// changelog is complete.
    pub fn snapshot(state: &PartitionState, through: i64) -> Vec<Self> {
        let mut all: Vec<Self> = state
            .accounts
            .iter()
            .map(|(id, a)| Self::account(id, a, through))
            .collect();
        all.push(Self {
            key: COMPLETE_KEY.into(),
            value: Some(through.to_be_bytes().to_vec()),
            through,
        });
        all
    }

    /// Enqueues the record on `partition` of `topic`; `Err` gives it back when the producer's
    /// queue is full.
    pub fn send(
        &self,
        producer: &KafkaProducer,
        topic: &str,
        partition: i32,
    ) -> Result<DeliveryFuture, KafkaError> {
        let through = self.through.to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: OFFSET_HEADER,
            value: Some(through.as_str()),
        });
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .partition(partition)
            .key(&self.key)
            .headers(headers);
        if let Some(value) = &self.value {
            record = record.payload(value.as_slice());
        }
        producer.send_result(record).map_err(|(e, _)| e)
    }
}

/// Makes sure `kafka.changelog_topic` exists with at least as many partitions as the input
/// topic, creating it ([`TOPIC_CONFIG`], the broker's default replication) if it does not.
/// Blocking (metadata requests): run it before the stream starts.
pub async fn ensure_topic(
    kafka: &KafkaConfig,
    brokers: &str,
    topic: &str,
) -> Result<(), ChangelogError> {
    let timeout = Duration::from_secs(10);
    let admin: AdminClient<DefaultClientContext> = client_config(kafka, brokers).create()?;
    let partitions = |name: &str| -> Result<Option<usize>, KafkaError> {
        let metadata = admin.inner().fetch_metadata(Some(name), timeout)?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map(|t| t.partitions().len())
            .filter(|&n| n > 0))
    };
    let needs = partitions(&kafka.transactions_topic)?
        .ok_or_else(|| ChangelogError::NoInputTopic(kafka.transactions_topic.clone()))?;
    match partitions(topic)? {
        Some(has) if has >= needs => return Ok(()),
        Some(has) => {
            return Err(ChangelogError::TooFewPartitions {
                topic: topic.to_string(),
                has,
                needs,
            });
        }
        None => {}
    }
    let mut new = NewTopic::new(topic, needs as i32, TopicReplication::Fixed(-1));
    for (k, v) in TOPIC_CONFIG {
        new = new.set(k, v);
    }
    for result in admin.create_topics(&[new], &AdminOptions::new()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code).into()),
        }
    }
    tracing::info!(
        topic,
        partition_count = needs,
        "created the state changelog topic"
    );
    Ok(())
}

/// A partition's state read back from its changelog.
#[derive(Debug)]
pub struct Restored {
    pub state: PartitionState,
    /// The first input offset the changelog does not cover.
    pub covered: i64,
    /// Records read.
    pub records: u64,
}

/// Reads changelog `partition` to its end. `None` when it has no [`COMPLETE_KEY`] mark yet
/// (empty, or written by an instance that restored from the input topic and did not finish its
/// snapshot): the state must then come from the input topic. Blocking.
pub fn restore(
    kafka: &KafkaConfig,
    brokers: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<Restored>, ChangelogError> {
    // Told its end even when the last offsets are transaction markers no poll returns.
    let consumer: BaseConsumer = reader_config(kafka, brokers, "changelog-restore")
        .set("isolation.level", "read_committed")
        .create()?;
    let timeout = Duration::from_secs(10);
    let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
    if high <= low {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let mut accounts = crate::state::Accounts::new();
    let (mut complete, mut last, mut records) = (false, None::<i64>, 0u64);
    loop {
        let m = match consumer.poll(timeout) {
            Some(Ok(m)) => m,
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ChangelogError::Timeout(partition)),
        };
        records += 1;
        let offset = m.offset();
        let through = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == OFFSET_HEADER))
            .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<i64>().ok())
            .ok_or(ChangelogError::NoOffset { partition, offset })?;
        last = Some(last.map_or(through, |l| l.max(through)));
        match (m.key().unwrap_or_default(), m.payload()) {
            (COMPLETE_KEY, _) => complete = true,
            (key, None) => {
                accounts.remove(String::from_utf8_lossy(key).as_ref());
            }
            (key, Some(value)) => {
                let state =
                    AccountState::from_bytes(value).map_err(|source| ChangelogError::Record {
                        partition,
                        offset,
                        source,
                    })?;
                accounts.insert(String::from_utf8_lossy(key).into(), Box::new(state));
            }
        }
        if offset + 1 >= high {
            break;
        }
    }
    Ok(match (complete, last) {
        (true, Some(last)) => Some(Restored {
            state: PartitionState::from_accounts(accounts, last + 1),
            covered: last + 1,
            records,
        }),
        _ => None,
    })
}
