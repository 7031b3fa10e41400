//! The embedded default: an in-process Kafka-protocol cluster (rdkafka's `MockCluster`), the
//! simulator feeding it, the stream processor and the side server, with a progress line every
//! few seconds. With `VIGIL_KAFKA__BROKERS` set, the same runs against that cluster instead.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::decode::Decoder;
use crate::ingest::client_config;
use crate::models::ModelSet;
use crate::run::{RunError, Shared, producer, run_stream};
use crate::simulate::{Simulator, produce, produce_all};
use crate::train::{history_from_payloads, train};

/// Events of simulated history the demo writes before it starts scoring: with 2,000 accounts,
/// about five days, ten events per account.
pub const HISTORY_EVENTS: usize = 20_000;

/// Partitions of the input topic in the embedded cluster.
const EMBEDDED_PARTITIONS: i32 = 3;

/// A running embedded cluster; dropping it stops the cluster.
pub struct Embedded {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl Embedded {
    /// Starts the cluster and creates vigil's topics.
    pub fn start(cfg: &Config) -> Result<Self, RunError> {
        let cluster = MockCluster::new(1)?;
        let k = &cfg.kafka;
        cluster.create_topic(&k.transactions_topic, EMBEDDED_PARTITIONS, 1)?;
        cluster.create_topic(&k.alerts_topic, 1, 1)?;
        cluster.create_topic(&k.dead_letter_topic, 1, 1)?;
        if let Some(changelog) = &k.changelog_topic {
            cluster.create_topic(changelog, EMBEDDED_PARTITIONS, 1)?;
        }
        Ok(Self { cluster })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}

/// Gives the demo a past, as a bank's stream has one: writes `count` events of `sim`'s traffic
/// to the input topic and commits the consumer group's offsets at their end, so the stream folds
/// them into the account state unscored (as after a restart) and scores only what follows; and
/// returns the models trained on those events — a detector trained on its own bank's past, not
/// on the bundled dataset's accounts of five events each. A model already in `models.dir` is
/// used instead (and the history only warms the state).
pub async fn warm_up(
    cfg: &Config,
    brokers: &str,
    sim: &mut Simulator,
    count: usize,
) -> Result<ModelSet, RunError> {
    let started = Instant::now();
    let events: Vec<_> = (0..count).map(|_| sim.next_event()).collect();
    let topic = &cfg.kafka.transactions_topic;
    if count > 0 {
        produce_all(&producer(&cfg.kafka, brokers)?, topic, &events).await?;
        let (kafka, brokers, topic) = (cfg.kafka.clone(), brokers.to_string(), topic.clone());
        tokio::task::spawn_blocking(move || commit_ends(&kafka, &brokers, &topic))
            .await
            .map_err(|e| RunError::Task(e.to_string()))??;
    }
    let dir = &cfg.models.dir;
    if ModelSet::exists(dir) || count == 0 {
        return crate::run::load_or_train(cfg);
    }
    let history = history_from_payloads(
        "demo: simulated history",
        events.iter().map(|e| e.payload.as_slice()),
        &Decoder::Json,
    );
    let set = train(&history, &cfg.models, &cfg.features, cfg.policy)?;
    tracing::info!(
        events = count,
        version = set.version(),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "wrote simulated history to the input topic and trained on it (not saved: models.dir keeps what `vigil run` uses)"
    );
    Ok(set)
}

/// Commits the group's offset of every partition of `topic` at its end.
fn commit_ends(
    kafka: &crate::config::KafkaConfig,
    brokers: &str,
    topic: &str,
) -> Result<(), rdkafka::error::KafkaError> {
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = client_config(kafka, brokers)
        .set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut ends = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            let (_, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
            ends.add_partition_offset(topic, p.id(), Offset::Offset(high))?;
        }
    }
    consumer.commit(&ends, CommitMode::Sync)
}

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub rate: f64,
    pub duration: Option<Duration>,
}

/// Runs simulator (continuing `sim`) + stream processor until `shutdown` (or the duration)
/// ends it.
pub async fn run_demo(
    cfg: &Config,
    brokers: &str,
    shared: Shared,
    mut sim: Simulator,
    opts: DemoOptions,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let sim_producer = producer(&cfg.kafka, brokers)?;
    let topic = cfg.kafka.transactions_topic.clone();
    let sim_stop = shutdown.child_token();
    let stop = sim_stop.clone();
    let simulator = tokio::spawn(async move {
        match produce(&sim_producer, &topic, &mut sim, opts.rate, None, &stop).await {
            Ok(n) => tracing::info!(events = n, "simulator stopped"),
            Err(e) => tracing::error!(error.message = %e, "simulator failed"),
        }
    });
    if let Some(d) = opts.duration {
        let s = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            s.cancel();
        });
    }
    let progress = tokio::spawn(progress(shared.clone(), shutdown.clone()));
    let result = run_stream(cfg, brokers, shared, shutdown).await;
    sim_stop.cancel();
    let _ = simulator.await;
    progress.abort();
    result
}

/// One line every five seconds: throughput, alerts, dead letters, accounts.
async fn progress(shared: Shared, shutdown: CancellationToken) {
    let m = &shared.metrics;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    let (mut last, mut at) = (m.events_consumed.get(), Instant::now());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = m.events_consumed.get();
        let rate = (now - last) as f64 / at.elapsed().as_secs_f64();
        (last, at) = (now, Instant::now());
        let invalid: u64 = crate::decode::DecodeError::CODES
            .iter()
            .map(|r| m.events_invalid.with_label_values(&[r]).get())
            .sum();
        tracing::info!(
            events_per_s = format!("{rate:.0}"),
            consumed = now,
            alerts = m.alerts.get(),
            dead_letters = invalid,
            accounts = m.accounts_tracked.get(),
            "progress"
        );
    }
}
