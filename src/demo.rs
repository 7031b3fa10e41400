//! The embedded default: an in-process Kafka-protocol cluster (rdkafka's `MockCluster`), the
//! simulator feeding it, the stream processor and the side server, with a progress line every
//! few seconds. With `VIGIL_KAFKA__BROKERS` set, the same runs against that cluster instead.

use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::run::{RunError, Shared, producer, run_stream};
use crate::simulate::{Simulator, produce};

/// Partitions of the input topic in the embedded cluster.
const EMBEDDED_PARTITIONS: i32 = 3;

/// A running embedded cluster; dropping it stops the cluster.
pub struct Embedded {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl Embedded {
    /// Starts the cluster and creates vigil's three topics.
    pub fn start(cfg: &Config) -> Result<Self, RunError> {
        let cluster = MockCluster::new(1)?;
        let k = &cfg.kafka;
        cluster.create_topic(&k.transactions_topic, EMBEDDED_PARTITIONS, 1)?;
        cluster.create_topic(&k.alerts_topic, 1, 1)?;
        cluster.create_topic(&k.dead_letter_topic, 1, 1)?;
        Ok(Self { cluster })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub rate: f64,
    pub anomaly_share: f64,
    pub malformed_share: f64,
    pub seed: u64,
    pub duration: Option<Duration>,
}

/// Runs simulator + stream processor until `shutdown` (or the duration) ends it.
pub async fn run_demo(
    cfg: &Config,
    brokers: &str,
    shared: Shared,
    opts: DemoOptions,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let sim_producer = producer(&cfg.kafka, brokers)?;
    let topic = cfg.kafka.transactions_topic.clone();
    let sim_stop = shutdown.child_token();
    let stop = sim_stop.clone();
    let simulator = tokio::spawn(async move {
        let mut sim = Simulator::new(opts.seed, opts.anomaly_share, opts.malformed_share);
        match produce(&sim_producer, &topic, &mut sim, opts.rate, None, &stop).await {
            Ok(n) => tracing::info!(events = n, "simulator stopped"),
            Err(e) => tracing::error!(error = %e, "simulator failed"),
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
