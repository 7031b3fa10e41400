//! Exactly-once mode (`kafka.guarantee: exactly_once`): every outcome — alert, dead letter, the
//! state changelog's records — and the input offsets they answer are written in one Kafka
//! transaction, so a `read_committed` consumer sees each outcome once, whatever crashes.
//!
//! One transaction is open at a time per instance. Workers send an event's records and count its
//! offset in while holding the transaction's gate for reading (only synchronous code: no await
//! inside); every `kafka.transaction_interval_ms` the committer takes the gate for writing — no event is
//! half-sent then — adds the offsets to the transaction (`send_offsets_to_transaction`, with the
//! group's metadata, so a fenced former owner cannot commit) and commits it. Before partitions
//! are given up in a rebalance the open transaction is committed the same way, so their new
//! owner starts exactly where this one stopped.
//!
//! A failed commit stops the instance (the transaction is aborted): its state is ahead of what
//! was committed, and a restart — or the group's other members — resumes exactly from the last
//! commit, with the state the changelog holds as of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::ingest::{GroupStatus, KafkaProducer};
use crate::metrics::Metrics;
use crate::publish::{AlertFeed, OutcomeKind};

/// Which delivery guarantee the stream gives its outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Offsets stored once outcomes are acknowledged: nothing lost, a crash may repeat about a
    /// second of outcomes (same `alert_id`); no transactions.
    AtLeastOnce,
    /// Outcomes and offsets in one transaction: `read_committed` consumers see each once.
    ExactlyOnce,
}

impl Guarantee {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AtLeastOnce => "at_least_once",
            Self::ExactlyOnce => "exactly_once",
        }
    }
}

/// How long a commit (or the start of the transactions) may take before it counts as failed.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// What the open transaction holds beyond its records.
#[derive(Default)]
struct Open {
    /// The next offset to consume, per input partition.
    offsets: HashMap<i32, i64>,
    alerts: Vec<Arc<serde_json::Value>>,
    dead_letters: u64,
    changelog_records: u64,
    consumed: Vec<Instant>,
}

/// The instance's transactional producer and its one open transaction.
pub struct Transactions {
    producer: KafkaProducer,
    topic: String,
    gate: RwLock<()>,
    open: Mutex<Open>,
    metrics: Metrics,
    feed: Arc<AlertFeed>,
    shutdown: CancellationToken,
}

/// One event's part of the open transaction.
pub struct EventRecords<'a> {
    pub partition: i32,
    pub offset: i64,
    pub assignment: u64,
    pub kind: OutcomeKind,
    pub outcome: Option<FutureRecord<'a, [u8], [u8]>>,
    pub changes: &'a [crate::changelog::StateChange],
    pub changelog: Option<&'a str>,
    pub alert: Option<Arc<serde_json::Value>>,
    pub consumed_at: Instant,
}

impl Transactions {
    /// Registers the producer's `transactional.id` (fencing an earlier producer with the same
    /// id, and aborting what it left open) and opens the first transaction. Blocking.
    pub fn begin(
        producer: KafkaProducer,
        input_topic: &str,
        metrics: Metrics,
        feed: Arc<AlertFeed>,
        shutdown: CancellationToken,
    ) -> Result<Self, KafkaError> {
        producer.init_transactions(TRANSACTION_TIMEOUT)?;
        producer.begin_transaction()?;
        Ok(Self {
            producer,
            topic: input_topic.to_string(),
            gate: RwLock::new(()),
            open: Mutex::new(Open::default()),
            metrics,
            feed,
            shutdown,
        })
    }

    /// Sends one event's outcome and changelog records into the open transaction and counts its
    /// offset in, unless its partition was revoked meanwhile (`Ok(false)`: its new owner
    /// processes it). Waits (blocking) while the producer's queue is full.
    pub fn add(&self, status: &GroupStatus, event: EventRecords<'_>) -> Result<bool, KafkaError> {
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let sent = status.while_owned(event.partition, event.assignment, || {
            if let Some(mut record) = event.outcome {
                loop {
                    match self.producer.send_result(record) {
                        Ok(_) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            record = back;
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err((e, _)) => return Err(e),
                    }
                }
            }
            if let Some(topic) = event.changelog {
                for change in event.changes {
                    loop {
                        match change.send(&self.producer, topic, event.partition) {
                            Ok(_) => break,
                            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                                std::thread::sleep(Duration::from_millis(2));
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            Ok(())
        });
        match sent {
            None => Ok(false),
            Some(Err(e)) => Err(e),
            Some(Ok(())) => {
                let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
                open.offsets.insert(event.partition, event.offset + 1);
                match event.kind {
                    OutcomeKind::DeadLetter => open.dead_letters += 1,
                    OutcomeKind::Alert | OutcomeKind::Clean => {}
                }
                open.alerts.extend(event.alert);
                if event.changelog.is_some() {
                    open.changelog_records += event.changes.len() as u64;
                }
                open.consumed.push(event.consumed_at);
                Ok(true)
            }
        }
    }

    /// Commits the open transaction with its offsets and opens the next; then runs `then` while
    /// no event can be added (a revocation). Blocking. A failure aborts the transaction and
    /// asks the instance to stop.
    pub fn commit(
        &self,
        group: Option<&ConsumerGroupMetadata>,
        then: impl FnOnce(),
    ) -> Result<(), KafkaError> {
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let open = std::mem::take(&mut *self.open.lock().unwrap_or_else(PoisonError::into_inner));
        let result = self.commit_open(group, &open);
        then();
        match result {
            Ok(()) => {
                self.committed(open);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "transaction failed; aborting it and stopping (a restart resumes from the last commit)");
                if let Err(abort) = self.producer.abort_transaction(TRANSACTION_TIMEOUT) {
                    tracing::error!(error = %abort, "abort failed too");
                }
                self.shutdown.cancel();
                Err(e)
            }
        }
    }

    fn commit_open(
        &self,
        group: Option<&ConsumerGroupMetadata>,
        open: &Open,
    ) -> Result<(), KafkaError> {
        if open.offsets.is_empty() {
            return Ok(());
        }
        // Always there: the stream's consumer has a group.
        let group = group.ok_or(KafkaError::Global(RDKafkaErrorCode::InvalidGroupId))?;
        let mut offsets = TopicPartitionList::new();
        for (&partition, &next) in &open.offsets {
            offsets.add_partition_offset(&self.topic, partition, Offset::Offset(next))?;
        }
        self.producer
            .send_offsets_to_transaction(&offsets, group, TRANSACTION_TIMEOUT)?;
        self.producer.commit_transaction(TRANSACTION_TIMEOUT)?;
        self.producer.begin_transaction()
    }

    /// What a commit makes visible: the alert feed, the counters, the positions.
    fn committed(&self, open: Open) {
        let m = &self.metrics;
        m.alerts.inc_by(open.alerts.len() as u64);
        m.dead_letters.inc_by(open.dead_letters);
        m.changelog_records.inc_by(open.changelog_records);
        for alert in open.alerts {
            self.feed.publish(alert);
        }
        for (partition, next) in open.offsets {
            m.stored_offset
                .with_label_values(&[&partition.to_string()])
                .set(next);
        }
        for consumed in open.consumed {
            m.end_to_end_seconds
                .observe(consumed.elapsed().as_secs_f64());
        }
    }
}
