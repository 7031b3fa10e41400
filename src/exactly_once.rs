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
//! A commit that fails in a way the transaction survives by aborting — the group's generation
//! moved on between taking its metadata and committing (a member joined), or one of the
//! transaction's records was refused — is aborted and the instance *rewinds*: every partition it
//! owns is suspended (events fetched before are dropped), the consumer seeks back to the
//! committed offsets, and the next event of each partition restores its state from the
//! changelog as of the last commit, as a restart would, without leaving the group. A step that
//! timed out is tried again. Anything else (this producer fenced by a newer one with its
//! transactional id, or a librdkafka call that never returns: [`CallWatch`]) stops the instance,
//! and a restart — or the group's other members — resumes exactly from the last commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, TryLockError};
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

/// Runs `wait`, which blocks, off the async runtime's worker thread when called from one: a
/// commit can hold the gate for up to [`TRANSACTION_TIMEOUT`] while the broker is away, and
/// workers waiting on it must not take every runtime thread from the consumer, the ack stages
/// and the timers.
fn wait_blocking<T>(wait: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// How long to wait before rewinding after `aborts` transactions in a row were aborted: at once
/// after one (a commit that raced a rebalance), then 1 s doubling to 30 s while they keep
/// failing (a record the broker keeps refusing), so a lasting refusal is retried, never
/// skipped, without a restore every interval.
fn rewind_delay(aborts: u32) -> Duration {
    match aborts {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs(1 << (n - 2).min(5)).min(Duration::from_secs(30)),
    }
}

/// Whether `e` leaves the producer unusable (fenced by a newer one with the same transactional
/// id): the instance must stop. Every other failure of a transaction is survived by aborting it.
fn is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(e) => e.is_fatal(),
        other => other.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal),
    }
}

/// What the open transaction holds beyond its records.
#[derive(Default)]
struct Open {
    /// The next offset to consume, per input partition.
    offsets: HashMap<i32, i64>,
    alerts: Vec<Arc<serde_json::Value>>,
    dead_letters: u64,
    shadow_alerts: u64,
    changelog_records: u64,
    consumed: Vec<Instant>,
    /// A record of this transaction was refused: it must be aborted, not committed.
    doomed: Option<KafkaError>,
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
    /// Transactions aborted since the last one committed.
    aborts_in_a_row: AtomicU32,
    /// When the transaction call under way began ([`CallWatch`]).
    call: Arc<CallWatch>,
}

/// Watches librdkafka's blocking transaction calls: `send_offsets_to_transaction` can wait
/// forever, past its timeout, once the coordinator it had found is gone (librdkafka #5456 and
/// #5511, open in 2.12), and nothing in the process can cancel it; the workers then wait on the
/// gate forever. A call that has not returned [`HUNG_AFTER`] after it began makes the process
/// exit with code 1, as a liveness probe would: a restart resumes from the last commit.
#[derive(Debug, Default)]
struct CallWatch {
    /// Milliseconds since the epoch when the call under way began, 0 when none is.
    since_ms: AtomicI64,
}

/// How long a transaction call may block before the process gives up on it.
const HUNG_AFTER: Duration = Duration::from_secs(2 * TRANSACTION_TIMEOUT.as_secs());

impl CallWatch {
    fn now_ms() -> i64 {
        chrono::Utc::now().timestamp_millis()
    }

    fn during<T>(&self, call: impl FnOnce() -> T) -> T {
        self.since_ms.store(Self::now_ms(), Ordering::Relaxed);
        let result = call();
        self.since_ms.store(0, Ordering::Relaxed);
        result
    }

    /// How long the call under way has been blocking, if one is.
    fn blocking_for(&self) -> Option<Duration> {
        let since = self.since_ms.load(Ordering::Relaxed);
        (since > 0).then(|| Duration::from_millis((Self::now_ms() - since).max(0) as u64))
    }

    /// Checks every second, on a thread of its own, until the process ends.
    fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let watch = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("vigil-txn-watch".into())
            .spawn(move || {
                while let Some(w) = watch.upgrade() {
                    if let Some(hung) = w.blocking_for().filter(|d| *d > HUNG_AFTER) {
                        tracing::error!(
                            seconds = hung.as_secs(),
                            "a transaction call has not returned (librdkafka #5456); exiting so that a restart resumes from the last commit"
                        );
                        std::thread::sleep(Duration::from_millis(200));
                        std::process::exit(1);
                    }
                    drop(w);
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
            .map(|_| ())
    }
}

/// One event's part of the open transaction.
pub struct EventRecords<'a> {
    pub partition: i32,
    pub offset: i64,
    pub assignment: u64,
    pub kind: OutcomeKind,
    pub outcome: Option<FutureRecord<'a, [u8], [u8]>>,
    /// A challenger's alert for the shadow topic.
    pub shadow: Option<FutureRecord<'a, [u8], [u8]>>,
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
        let call = Arc::new(CallWatch::default());
        if let Err(e) = call.start() {
            tracing::warn!(error.message = %e, "cannot watch transaction calls for hangs");
        }
        Ok(Self {
            producer,
            topic: input_topic.to_string(),
            gate: RwLock::new(()),
            open: Mutex::new(Open::default()),
            metrics,
            feed,
            shutdown,
            aborts_in_a_row: AtomicU32::new(0),
            call,
        })
    }

    /// Sends one event's outcome and changelog records into the open transaction and counts its
    /// offset in, unless its partition was revoked meanwhile (`Ok(false)`: its new owner
    /// processes it) or a record was refused (`Ok(false)` too: the commit rewinds to redo it).
    /// Waits (blocking) while a commit runs or the producer's queue is full.
    pub fn add(&self, status: &GroupStatus, event: EventRecords<'_>) -> Result<bool, KafkaError> {
        let _gate = self.open_gate();
        let shadow_alert = event.shadow.is_some();
        let sent = status.while_owned(event.partition, event.assignment, || {
            for mut record in event.outcome.into_iter().chain(event.shadow) {
                loop {
                    match self.producer.send_result(record) {
                        Ok(_) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            record = back;
                            wait_blocking(|| std::thread::sleep(Duration::from_millis(2)));
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
                                wait_blocking(|| std::thread::sleep(Duration::from_millis(2)));
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
            Some(Err(e)) if is_fatal(&e) => Err(e),
            Some(Err(e)) => {
                // Its offset is not counted; the commit aborts and rewinds to redo it.
                let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
                open.doomed.get_or_insert(e);
                Ok(false)
            }
            Some(Ok(())) => {
                let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
                open.offsets.insert(event.partition, event.offset + 1);
                match event.kind {
                    OutcomeKind::DeadLetter => open.dead_letters += 1,
                    OutcomeKind::Alert | OutcomeKind::Clean => {}
                }
                open.alerts.extend(event.alert);
                open.shadow_alerts += u64::from(shadow_alert);
                if event.changelog.is_some() {
                    open.changelog_records += event.changes.len() as u64;
                }
                open.consumed.push(event.consumed_at);
                Ok(true)
            }
        }
    }

    /// The gate for reading, at once unless a commit holds it.
    fn open_gate(&self) -> RwLockReadGuard<'_, ()> {
        match self.gate.try_read() {
            Ok(gate) => gate,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                wait_blocking(|| self.gate.read().unwrap_or_else(PoisonError::into_inner))
            }
        }
    }

    /// Commits the open transaction with its offsets and opens the next; then runs `then` while
    /// no event can be added (a revocation). Blocking. A transaction that must be aborted is,
    /// and every partition still owned is suspended for the consumer to rewind
    /// ([`GroupStatus::suspend_all`]); `Ok` then too, the stream goes on. An error is returned
    /// only when the instance must stop (it is asked to).
    pub fn commit(
        &self,
        group: Option<&ConsumerGroupMetadata>,
        status: &GroupStatus,
        then: impl FnOnce(),
    ) -> Result<(), KafkaError> {
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut open =
            std::mem::take(&mut *self.open.lock().unwrap_or_else(PoisonError::into_inner));
        let result = match open.doomed.take() {
            Some(refused) => Err(refused),
            None => self.commit_open(group, &open),
        };
        then();
        match result {
            Ok(()) => {
                if !open.offsets.is_empty() {
                    self.aborts_in_a_row.store(0, Ordering::Relaxed);
                }
                self.committed(open);
                Ok(())
            }
            Err(e) if !is_fatal(&e) => {
                self.aborts_in_a_row.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error.message = %e, "transaction aborted; rewinding to the last commit");
                let restarted = self.call.during(|| {
                    self.producer
                        .abort_transaction(TRANSACTION_TIMEOUT)
                        .and_then(|()| self.producer.begin_transaction())
                });
                match restarted {
                    Ok(()) => {
                        let suspended = status.suspend_all();
                        self.metrics.transaction_rewinds.inc();
                        tracing::info!(
                            partition_count = suspended,
                            "partitions suspended until the consumer has rewound them"
                        );
                        Ok(())
                    }
                    Err(abort) => self.stop(abort),
                }
            }
            Err(e) => {
                if let Err(abort) = self
                    .call
                    .during(|| self.producer.abort_transaction(TRANSACTION_TIMEOUT))
                {
                    tracing::error!(error.message = %abort, "abort failed too");
                }
                self.stop(e)
            }
        }
    }

    /// How long to wait before rewinding ([`rewind_delay`]).
    pub fn rewind_delay(&self) -> Duration {
        rewind_delay(self.aborts_in_a_row.load(Ordering::Relaxed))
    }

    fn stop(&self, e: KafkaError) -> Result<(), KafkaError> {
        tracing::error!(error.message = %e, "transaction failed; stopping (a restart resumes from the last commit)");
        self.shutdown.cancel();
        Err(e)
    }

    /// Runs one step of a commit again while it fails with an error that says so (a timeout:
    /// the broker is slow or away), until the instance is asked to stop.
    fn retrying(&self, step: impl Fn() -> Result<(), KafkaError>) -> Result<(), KafkaError> {
        loop {
            match self.call.during(&step) {
                Err(KafkaError::Transaction(e))
                    if e.is_retriable() && !self.shutdown.is_cancelled() =>
                {
                    tracing::warn!(error.message = %e, "transaction step not done yet; trying again");
                }
                done => return done,
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
        self.retrying(|| {
            self.producer
                .send_offsets_to_transaction(&offsets, group, TRANSACTION_TIMEOUT)
        })?;
        self.retrying(|| self.producer.commit_transaction(TRANSACTION_TIMEOUT))?;
        self.call.during(|| self.producer.begin_transaction())
    }

    /// What a commit makes visible: the alert feed, the counters, the positions.
    fn committed(&self, open: Open) {
        let m = &self.metrics;
        m.alerts.inc_by(open.alerts.len() as u64);
        m.dead_letters.inc_by(open.dead_letters);
        m.shadow_alerts.inc_by(open.shadow_alerts);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_abort_rewinds_at_once_and_repeated_ones_back_off_to_30_s() {
        let delays: Vec<u64> = (0..9).map(|n| rewind_delay(n).as_secs()).collect();
        assert_eq!(delays, [0, 0, 1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn only_a_fatal_error_stops_the_instance() {
        assert!(is_fatal(&KafkaError::MessageProduction(
            RDKafkaErrorCode::Fatal
        )));
        assert!(!is_fatal(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        assert!(!is_fatal(&KafkaError::Global(
            RDKafkaErrorCode::InvalidGroupId
        )));
    }
}
