//! Ingest: the Kafka side of reading — the group consumer (offsets stored by vigil, committed by
//! librdkafka), rebalance tracking for readiness, and rebuilding a partition's account state from
//! the input topic itself when the partition is (re)assigned.
//!
//! State restore: when the first event vigil sees from a partition is not the one its state
//! expects (a restart, a rebalance, a seek), the partition's earlier events are replayed through
//! the state code (not scored, not published) up to that event. Features after a restart are
//! therefore exactly those of an uninterrupted run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
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

/// Per-partition account state of this instance, shared read-only with the HTTP server.
pub type StateStore = DashMap<i32, PartitionState>;

/// What the rest of the process needs to know about the consumer group.
#[derive(Debug, Default)]
pub struct GroupStatus {
    pub assigned: AtomicI64,
    pub models_loaded: AtomicBool,
}

impl GroupStatus {
    /// Ready to do useful work: models loaded and at least one partition assigned.
    pub fn ready(&self) -> bool {
        self.models_loaded.load(Ordering::Relaxed) && self.assigned.load(Ordering::Relaxed) > 0
    }
}

/// Consumer context: logs rebalances, tracks the assignment, drops revoked partitions' state.
pub struct GroupContext {
    pub status: Arc<GroupStatus>,
    pub store: Arc<StateStore>,
    pub metrics: Metrics,
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
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
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let n = tpl.count() as i64;
                self.status.assigned.store(n, Ordering::Relaxed);
                self.metrics.partitions_assigned.set(n);
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(partitions = ?parts, "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements() {
                    self.store.remove(&e.partition());
                }
                // Another instance owns these partitions now and reports their lag.
                self.metrics.consumer_lag.reset();
                self.status.assigned.store(0, Ordering::Relaxed);
                self.metrics.partitions_assigned.set(0);
                tracing::info!(partitions = tpl.count(), "partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// Client properties shared by every client vigil makes, overrides last.
/// A record's timestamp in seconds since the epoch (producer's create time or the broker's
/// append time, as the topic is configured), if it has one.
pub fn published_at(m: &impl Message) -> Option<i64> {
    m.timestamp().to_millis().map(|ms| ms.div_euclid(1_000))
}

pub fn client_config(kafka: &KafkaConfig, brokers: &str) -> ClientConfig {
    client_config_over(kafka, brokers, &[])
}

/// [`client_config`] on top of `defaults`: a property of `kafka.client` wins over a default.
/// (Merging through `ClientConfig::config_map` instead would copy its sanitised values, a
/// password reading "[sanitized for safety]".)
pub fn client_config_over(
    kafka: &KafkaConfig,
    brokers: &str,
    defaults: &[(&str, &str)],
) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in defaults {
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
            ("auto.commit.interval.ms", "1000"),
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "false"),
            // Feeds `vigil_consumer_lag` (GroupContext::stats).
            ("statistics.interval.ms", "5000"),
        ],
    );
    // Never overridable: the at-least-once guarantee rests on it.
    c.set("enable.auto.offset.store", "false");
    let consumer: StreamConsumer<GroupContext> = c.create_with_context(context)?;
    consumer.subscribe(&[&kafka.transactions_topic])?;
    Ok(consumer)
}

/// Replays `partition` from its beginning up to (not including) `until` into `state`, without
/// scoring. Blocking: run it on a blocking thread. Returns the number of events replayed.
pub fn restore_partition(
    kafka: &KafkaConfig,
    brokers: &str,
    engine: &Engine,
    partition: i32,
    until: i64,
    state: &mut PartitionState,
) -> Result<u64, KafkaError> {
    let topic = &kafka.transactions_topic;
    let consumer: BaseConsumer = client_config(kafka, brokers)
        .set("group.id", format!("{}-restore", kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?;
    let (low, _) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    *state = PartitionState::default();
    if low >= until {
        state.next_offset = Some(until);
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let mut replayed = 0;
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
    state.next_offset = Some(until);
    Ok(replayed)
}

#[cfg(test)]
mod tests {
    use super::*;

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
