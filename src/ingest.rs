//! Ingest: the Kafka side of reading — the client settings every client shares (`kafka.client`
//! over vigil's defaults), the group consumer (cooperative-sticky; offsets stored by vigil,
//! committed by librdkafka, or inside transactions in exactly-once mode), what readiness needs
//! to know ([`GroupStatus`]: the partitions owned, restores running, whether a broker answers),
//! librdkafka's log lines throttled ([`LogThrottle`]), and folding a partition's events from the
//! input topic into its account state ([`fold_input`]).
//!
//! State restore: when the first event vigil sees from a partition is not the one its state
//! expects (a restart, a rebalance, a seek), the state is restored first — from the changelog
//! ([`crate::changelog`]) and the input events after what it covers, or, without one, by
//! folding the partition's whole history from the input topic (not scored, not published).
//! Features after a restart are therefore exactly those of an uninterrupted run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, Statistics, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::pipeline::Engine;
use crate::state::PartitionState;

/// How many partitions [`ensure_topic`] gives a topic it creates.
#[derive(Debug, Clone, Copy)]
pub enum Partitions<'a> {
    Fixed(usize),
    /// As many as this topic has (one when it does not exist).
    Like(&'a str),
}

/// Creates `topic` with `partitions` and `config` (the broker's default replication) unless
/// it exists; whether it created it.
pub async fn ensure_topic(
    kafka: &KafkaConfig,
    brokers: &str,
    topic: &str,
    partitions: Partitions<'_>,
    config: &[(&str, &str)],
) -> Result<bool, KafkaError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        client_config(kafka, brokers).create()?;
    let count = |name: &str| -> Result<usize, KafkaError> {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(name), Duration::from_secs(10))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map_or(0, |t| t.partitions().len()))
    };
    if count(topic)? > 0 {
        return Ok(false);
    }
    let partitions = match partitions {
        Partitions::Fixed(n) => n,
        Partitions::Like(other) => count(other)?.max(1),
    };
    let mut new = NewTopic::new(
        topic,
        i32::try_from(partitions).unwrap_or(i32::MAX),
        TopicReplication::Fixed(-1),
    );
    for &(k, v) in config {
        new = new.set(k, v);
    }
    for result in admin.create_topics(&[new], &AdminOptions::new()).await? {
        match result {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(true)
}

/// Per-partition account state of this instance, shared read-only with the HTTP server.
pub type StateStore = DashMap<i32, PartitionState>;

/// What the rest of the process needs to know about the consumer group.
#[derive(Debug)]
pub struct GroupStatus {
    pub models_loaded: AtomicBool,
    /// The group has assigned this member its share (possibly none: a standby).
    pub joined: AtomicBool,
    /// Responses received from the brokers so far (librdkafka's statistics), and when that
    /// count last grew, in milliseconds of [`GroupStatus::clock_ms`].
    responses: AtomicU64,
    last_contact_ms: AtomicI64,
    /// How long the brokers may be silent before the instance is not ready.
    broker_timeout_ms: AtomicI64,
    /// The partitions this instance owns, each with the number of the assignment that gave it:
    /// an event fetched under an earlier one belongs to a partition revoked since (its new
    /// owner processes it), so it is dropped, not processed twice. [`SUSPENDED`] while the
    /// partition waits to be rewound to its last commit.
    owned: std::sync::Mutex<std::collections::HashMap<i32, u64>>,
    /// Woken when partitions are suspended.
    rewind: tokio::sync::Notify,
    assignments: AtomicU64,
    /// Partitions whose state is being restored now.
    restoring: AtomicI64,
}

impl Default for GroupStatus {
    fn default() -> Self {
        Self {
            models_loaded: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            responses: AtomicU64::new(0),
            last_contact_ms: AtomicI64::new(0),
            broker_timeout_ms: AtomicI64::new(15_000),
            owned: Default::default(),
            rewind: tokio::sync::Notify::new(),
            assignments: AtomicU64::new(0),
            restoring: AtomicI64::new(0),
        }
    }
}

impl GroupStatus {
    /// Ready to do useful work: models loaded, a member of the group (with partitions, or as a
    /// standby with none when there are more instances than partitions), no partition's state
    /// being restored, and a broker that has answered within the timeout.
    pub fn ready(&self) -> bool {
        self.models_loaded.load(Ordering::Relaxed)
            && self.joined.load(Ordering::Relaxed)
            && self.restoring() == 0
            && self.broker_reachable()
    }

    /// How many partitions' states are being restored now.
    pub fn restoring(&self) -> i64 {
        self.restoring.load(Ordering::Relaxed)
    }

    /// Counts a restore as running until the returned guard is dropped.
    pub fn restore_started(&self) -> RestoreGuard<'_> {
        self.restoring.fetch_add(1, Ordering::Relaxed);
        RestoreGuard(self)
    }

    /// Whether a broker answered within the timeout.
    pub fn broker_reachable(&self) -> bool {
        self.since_broker_contact()
            .is_some_and(|d| d.as_millis() as i64 <= self.broker_timeout_ms.load(Ordering::Relaxed))
    }

    /// Time since a broker last answered, if one ever did.
    pub fn since_broker_contact(&self) -> Option<Duration> {
        let last = self.last_contact_ms.load(Ordering::Relaxed);
        (last > 0).then(|| Duration::from_millis((Self::clock_ms() - last).max(0) as u64))
    }

    pub fn set_broker_timeout(&self, timeout: Duration) {
        self.broker_timeout_ms
            .store(timeout.as_millis() as i64, Ordering::Relaxed);
    }

    /// A broker answered just now (a fetched event, an assignment).
    pub fn broker_answered(&self) {
        self.last_contact_ms
            .store(Self::clock_ms(), Ordering::Relaxed);
    }

    /// The responses received so far, from statistics: a broker answered if the count moved
    /// (it falls when a broker leaves the cluster's metadata).
    fn responses_received(&self, total: u64) {
        if self.responses.swap(total, Ordering::Relaxed) != total {
            self.broker_answered();
        }
    }

    /// Partitions added to this instance's assignment (all of it under the eager protocol,
    /// the increment under cooperative-sticky).
    pub fn assign(&self, partitions: &[i32]) {
        let n = self.assignments.fetch_add(1, Ordering::Relaxed) + 1;
        self.owned().extend(partitions.iter().map(|&p| (p, n)));
        self.joined.store(true, Ordering::Relaxed);
    }

    /// Partitions taken from this instance.
    pub fn revoke(&self, partitions: &[i32]) {
        let mut owned = self.owned();
        for p in partitions {
            owned.remove(p);
        }
    }

    /// How many partitions this instance owns.
    pub fn assigned(&self) -> i64 {
        self.owned().len() as i64
    }

    /// The assignment under which this instance owns `partition`, if it does and the partition
    /// is not suspended.
    pub fn assignment_of(&self, partition: i32) -> Option<u64> {
        self.owned()
            .get(&partition)
            .copied()
            .filter(|&n| n != SUSPENDED)
    }

    /// Suspends every partition owned (exactly-once, after an aborted transaction): their
    /// events fetched so far are dropped, and none are taken until the consumer has sought
    /// back to the last commit and [resumed](Self::resume) them. Returns how many.
    pub fn suspend_all(&self) -> usize {
        let mut owned = self.owned();
        for n in owned.values_mut() {
            *n = SUSPENDED;
        }
        self.request_rewind();
        owned.len()
    }

    /// Asks the consumer to rewind the suspended partitions.
    pub fn request_rewind(&self) {
        self.rewind.notify_one();
    }

    /// The partitions suspended.
    pub fn suspended(&self) -> Vec<i32> {
        let mut parts: Vec<i32> = self
            .owned()
            .iter()
            .filter(|(_, n)| **n == SUSPENDED)
            .map(|(p, _)| *p)
            .collect();
        parts.sort_unstable();
        parts
    }

    /// Takes events of these suspended partitions again, under a new assignment number.
    pub fn resume(&self, partitions: &[i32]) {
        let n = self.assignments.fetch_add(1, Ordering::Relaxed) + 1;
        let mut owned = self.owned();
        for p in partitions {
            if let Some(a) = owned.get_mut(p).filter(|a| **a == SUSPENDED) {
                *a = n;
            }
        }
    }

    /// Returns once partitions have been suspended (at once if they were since the last call).
    pub async fn rewind_requested(&self) {
        self.rewind.notified().await;
    }

    /// Runs `f` if this instance still owns `partition` under `assignment`, holding off a
    /// revocation until it returns: what `f` writes for the partition (its changelog records)
    /// is queued before the partition is given up, never after.
    pub fn while_owned<T>(
        &self,
        partition: i32,
        assignment: u64,
        f: impl FnOnce() -> T,
    ) -> Option<T> {
        let owned = self.owned();
        (owned.get(&partition) == Some(&assignment)).then(f)
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<i32, u64>> {
        self.owned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Milliseconds since the first call, never 0: a monotonic clock that fits an atomic.
    fn clock_ms() -> i64 {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as i64
            + 1
    }
}

/// [`GroupStatus`]'s mark of a suspended partition (assignment numbers start at 1).
const SUSPENDED: u64 = 0;

/// Counts one running restore ([`GroupStatus::restore_started`]).
pub struct RestoreGuard<'a>(&'a GroupStatus);

impl Drop for RestoreGuard<'_> {
    fn drop(&mut self) {
        self.0.restoring.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Consumer context: logs rebalances, tracks the assignment, drops revoked partitions' state.
pub struct GroupContext {
    pub status: Arc<GroupStatus>,
    pub store: Arc<StateStore>,
    pub metrics: Metrics,
    pub logs: Arc<LogThrottle>,
    /// The producer of outcomes and changelog records, flushed before partitions are given up.
    pub producer: KafkaProducer,
    /// Exactly-once mode: the open transaction, committed before partitions are given up.
    pub transactions: Option<Arc<crate::exactly_once::Transactions>>,
}

/// At most one log line per kind of message every [`LogThrottle::EVERY`], with the count of
/// those held back: an unreachable broker makes librdkafka report the same failure several
/// times a second for each connection (700 lines in 15 s). Written here rather than taken from
/// a rate-limiting crate because the count of what was held back is part of the line.
#[derive(Debug, Default)]
pub struct LogThrottle {
    kinds: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>,
}

impl LogThrottle {
    pub const EVERY: Duration = Duration::from_secs(10);

    /// Whether to log a line of `kind` now: `Some(n)` with the `n` lines of its kind held back
    /// since the last one logged, or `None` to hold this one back. Kinds are librdkafka's
    /// facilities and error codes, a small fixed set.
    pub fn admit(&self, kind: &str) -> Option<u64> {
        self.admit_at(kind, std::time::Instant::now())
    }

    fn admit_at(&self, kind: &str, now: std::time::Instant) -> Option<u64> {
        let mut kinds = self
            .kinds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match kinds.get_mut(kind) {
            Some((at, held)) if now.duration_since(*at) < Self::EVERY => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                *at = now;
                Some(std::mem::take(held))
            }
            None => {
                kinds.insert(kind.to_string(), (now, 0));
                Some(0)
            }
        }
    }

    /// A librdkafka log line, if its facility was not logged in the last [`Self::EVERY`].
    pub fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let Some(held_back) = self.admit(facility) else {
            return;
        };
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, held_back, "{message}");
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility, held_back, "{message}");
            }
            _ => tracing::info!(target: "librdkafka", facility, held_back, "{message}"),
        }
    }

    /// A librdkafka client error, if its code was not logged in the last [`Self::EVERY`].
    pub fn error(&self, error: KafkaError, reason: &str) {
        let kind = format!("error {:?}", error.rdkafka_error_code());
        if let Some(held_back) = self.admit(&kind) {
            tracing::event!(target: "librdkafka", tracing::Level::ERROR, error.message = %error, held_back, "{reason}");
        }
    }
}

/// The context of vigil's producers: librdkafka's lines and errors through a [`LogThrottle`].
#[derive(Debug, Clone, Default)]
pub struct ThrottledLogs(pub Arc<LogThrottle>);

impl ClientContext for ThrottledLogs {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.0.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(error, reason);
    }
}

/// The producer of alerts, dead letters and simulated events.
pub type KafkaProducer = rdkafka::producer::FutureProducer<ThrottledLogs>;

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.logs.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.logs.error(error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        // Fetches and heartbeats get answers many times a second from a live broker, so a count
        // that stops growing means no broker is answering, even over an open connection (a
        // frozen broker keeps its sockets).
        self.status.responses_received(
            statistics
                .brokers
                .values()
                .filter(|b| b.nodeid >= 0)
                .map(|b| b.rx)
                .sum(),
        );
        for topic in statistics.topics.values() {
            for (partition, p) in &topic.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[&partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            if let Some(transactions) = &self.transactions {
                // Their outcomes so far and their offsets become visible together, now, and
                // nothing more is added for them after.
                let group = consumer.group_metadata();
                let _ = transactions
                    .commit(group.as_ref(), &self.status, || self.status.revoke(&parts));
                return;
            }
            // No changelog record of these partitions is queued after this (while_owned), and
            // those already queued reach the broker before the new owner reads the changelog.
            self.status.revoke(&parts);
            if let Err(e) =
                rdkafka::producer::Producer::flush(&self.producer, Duration::from_secs(10))
            {
                tracing::warn!(error.message = %e, partitions = ?parts, "producer not flushed before giving partitions up");
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                self.status.assign(&parts);
                self.status.broker_answered();
                self.metrics.partitions_assigned.set(self.status.assigned());
                tracing::info!(partitions = ?parts, "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                for p in &parts {
                    self.store.remove(p);
                    // Its new owner reports its lag.
                    let _ = self
                        .metrics
                        .consumer_lag
                        .remove_label_values(&[&p.to_string()]);
                }
                self.metrics.partitions_assigned.set(self.status.assigned());
                tracing::info!(partitions = ?parts, "partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(error.message = %e, "rebalance error"),
        }
    }
}

/// A record's timestamp in seconds since the epoch (producer's create time or the broker's
/// append time, as the topic is configured), if it has one.
pub fn published_at(m: &impl Message) -> Option<i64> {
    m.timestamp().to_millis().map(|ms| ms.div_euclid(1_000))
}

/// Client properties shared by every client vigil makes, overrides last.
pub fn client_config(kafka: &KafkaConfig, brokers: &str) -> ClientConfig {
    client_config_over(kafka, brokers, &[])
}

/// A consumer that reads partitions it assigns itself to their end and commits nothing (state
/// restores, replays, the verdicts): its group id is `<kafka.group_id>-<purpose>`, apart from
/// the stream's group, and it is told where each partition ends.
pub fn reader_config(kafka: &KafkaConfig, brokers: &str, purpose: &str) -> ClientConfig {
    let mut config = client_config(kafka, brokers);
    config
        .set("group.id", format!("{}-{purpose}", kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    config
}

/// Defaults of every client: reconnect within a second of a broker's return (librdkafka backs
/// off up to 10 s, which kept the stream idle that long after an outage).
const CLIENT_DEFAULTS: [(&str, &str); 1] = [("reconnect.backoff.max.ms", "1000")];

/// [`client_config`] on top of `defaults`: a property of `kafka.client` wins over a default.
/// (Merging through `ClientConfig::config_map` instead would copy its sanitised values, a
/// password reading "[sanitized for safety]".)
pub fn client_config_over(
    kafka: &KafkaConfig,
    brokers: &str,
    defaults: &[(&str, &str)],
) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in CLIENT_DEFAULTS.iter().chain(defaults) {
        c.set(*k, *v);
    }
    c.set("bootstrap.servers", brokers)
        .set("client.id", "vigil")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (k, v) in &kafka.client {
        c.set(k, v);
    }
    c
}

/// The group consumer. vigil stores each offset itself once the event's outcome is acknowledged;
/// librdkafka commits stored offsets every second and on close.
pub fn group_consumer(
    kafka: &KafkaConfig,
    brokers: &str,
    context: GroupContext,
) -> Result<StreamConsumer<GroupContext>, KafkaError> {
    let mut c = client_config_over(
        kafka,
        brokers,
        &[
            ("group.id", &kafka.group_id),
            ("enable.auto.commit", "true"),
            // Events of transactions that were aborted are not events.
            ("isolation.level", "read_committed"),
            ("auto.commit.interval.ms", "1000"),
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "false"),
            // A rebalance moves only the partitions that change owner; the others keep their
            // state and go on (the eager protocol revokes and restores every partition).
            ("partition.assignment.strategy", "cooperative-sticky"),
            // Feeds `vigil_consumer_lag` and readiness (GroupContext::stats), to the second.
            ("statistics.interval.ms", "1000"),
        ],
    );
    // Never overridable: the guarantees rest on them.
    c.set("enable.auto.offset.store", "false");
    if kafka.guarantee == crate::exactly_once::Guarantee::ExactlyOnce {
        // Offsets are committed inside the transactions, with the outcomes, and nowhere else.
        c.set("enable.auto.commit", "false");
    }
    let consumer: StreamConsumer<GroupContext> = c.create_with_context(context)?;
    consumer.subscribe(&[&kafka.transactions_topic])?;
    Ok(consumer)
}

/// Folds the events of `partition` from `from` (its low watermark when `None`, over an empty
/// state) up to, not including, `until` into `state`, without scoring or publishing them.
/// Blocking: run it on a blocking thread. Returns the number of events read.
pub fn fold_input(
    kafka: &KafkaConfig,
    brokers: &str,
    engine: &Engine,
    partition: i32,
    from: Option<i64>,
    until: i64,
    state: &mut PartitionState,
) -> Result<u64, KafkaError> {
    let topic = &kafka.transactions_topic;
    let consumer: BaseConsumer = reader_config(kafka, brokers, "restore").create()?;
    let (low, _) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    if from.is_none() {
        state.accounts.clear();
        state.watermark = None;
    }
    let start = from.map_or(low, |f| f.max(low));
    let mut replayed = 0;
    if start < until {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
        consumer.assign(&tpl)?;
        loop {
            match consumer.poll(Duration::from_secs(10)) {
                Some(Ok(m)) => {
                    if m.offset() >= until {
                        break;
                    }
                    engine.warm(
                        state,
                        m.offset(),
                        published_at(&m),
                        m.payload().unwrap_or_default(),
                    );
                    replayed += 1;
                    if m.offset() + 1 >= until {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(KafkaError::Global(
                        rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                    ));
                }
            }
        }
    }
    state.next_offset = Some(until);
    Ok(replayed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_log_line_is_held_back_for_ten_seconds_and_the_next_says_how_many() {
        let logs = LogThrottle::default();
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(logs.admit_at("FAIL", at(0)), Some(0));
        assert_eq!(logs.admit_at("FAIL", at(1)), None);
        assert_eq!(logs.admit_at("FAIL", at(9)), None);
        assert_eq!(logs.admit_at("CONNECT", at(9)), Some(0), "kinds are apart");
        assert_eq!(logs.admit_at("FAIL", at(10)), Some(2));
        assert_eq!(logs.admit_at("FAIL", at(11)), None);
    }

    #[test]
    fn client_properties_win_over_defaults_and_secrets_reach_librdkafka_intact() {
        let cfg = crate::config::Config::from_yaml(
            "kafka:\n  brokers: b:9092\n  client:\n    sasl.password: s3cret\n    linger.ms: '50'\n",
        )
        .unwrap();
        let c = client_config_over(&cfg.kafka, "b:9092", &[("linger.ms", "5"), ("acks", "all")]);
        assert_eq!(c.get("sasl.password"), Some("s3cret"));
        assert_eq!(c.get("linger.ms"), Some("50"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
    }
}
