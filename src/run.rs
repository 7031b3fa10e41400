//! The wiring of the stream processor: one consumer task routes events by partition to worker
//! tasks (each owns its partitions' state, so an account is touched by one worker, in order);
//! workers run the synchronous [`Engine`] and hand each outcome to the producer; per-worker
//! ackers store offsets as outcomes are acknowledged, in order. Bounded channels push back on
//! the consumer; nothing is dropped.
//!
//! Shutdown (SIGTERM, Ctrl-C, or a fatal publish error) stops consuming, drains the queues,
//! waits for every outcome's acknowledgement, flushes the producer and commits before returning.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureRecord, Producer};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, KafkaConfig, Policy};
use crate::decode::Decoder;
use crate::ingest::{
    GroupContext, GroupStatus, KafkaProducer, LogThrottle, StateStore, ThrottledLogs,
    client_config_over, group_consumer, restore_partition,
};
use crate::metrics::Metrics;
use crate::models::{ModelError, ModelSet, Scratch};
use crate::pipeline::{Engine, EventTimeLimits, Outcome, Scored};
use crate::publish::{
    AlertEncoder, AlertFeed, DEAD_LETTER_MAX_ERROR, EncodeError, OutcomeKind, Pending,
    PublishError, Retry, SourceCoordinates, bounded_text, dead_letter_headers, dead_letter_payload,
    enqueue,
};
use crate::train::{HistoryError, bundled_history, train};

/// Errors that stop the stream processor.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("a worker task failed: {0}")]
    Task(String),
}

/// Loads the model artifact from `dir`, or trains one from the bundled dataset and saves it there.
pub fn load_or_train(cfg: &Config) -> Result<ModelSet, RunError> {
    let dir: &Path = &cfg.models.dir;
    if ModelSet::exists(dir) {
        let set = ModelSet::load(dir, cfg.models.lof.index)?;
        tracing::info!(dir = %dir.display(), version = set.version(), "loaded models");
        return Ok(set);
    }
    let started = Instant::now();
    let history = bundled_history()?;
    let set = train(&history, &cfg.models, &cfg.features, cfg.policy)?;
    set.save(dir)?;
    tracing::info!(
        dir = %dir.display(),
        version = set.version(),
        events = history.events.len(),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "no model found: trained one from the bundled dataset and saved it"
    );
    Ok(set)
}

/// The idempotent producer for alerts and dead letters.
pub fn producer(kafka: &KafkaConfig, brokers: &str) -> Result<KafkaProducer, KafkaError> {
    client_config_over(
        kafka,
        brokers,
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "5"),
            ("compression.type", "lz4"),
        ],
    )
    .create_with_context(ThrottledLogs::default())
}

/// Shared handles the server and the stream both use.
#[derive(Clone)]
pub struct Shared {
    pub metrics: Metrics,
    pub status: Arc<GroupStatus>,
    pub store: Arc<StateStore>,
    pub models: Arc<ModelSet>,
    pub alerts: Arc<AlertFeed>,
    /// The decision settings predictions use (the stream's own, from the configuration).
    pub policy: Policy,
    pub top_features: usize,
    pub event_time: EventTimeLimits,
    /// Authentication and per-client rate limits of the guarded HTTP routes.
    pub access: Arc<crate::server::Access>,
}

impl Shared {
    pub fn new(models: ModelSet) -> Result<Self, RunError> {
        let metrics = Metrics::new()?;
        let created = chrono::DateTime::parse_from_rfc3339(&models.manifest.created_at)
            .map(|t| t.timestamp())
            .unwrap_or(0);
        metrics.model_created_seconds.set(created);
        metrics
            .model_info
            .with_label_values(&[models.version()])
            .set(1);
        let status = Arc::new(GroupStatus::default());
        status.models_loaded.store(true, Ordering::Relaxed);
        Ok(Self {
            metrics,
            status,
            store: Arc::new(StateStore::new()),
            models: Arc::new(models),
            alerts: Arc::new(AlertFeed::default()),
            policy: Policy::All,
            top_features: 3,
            event_time: EventTimeLimits::default(),
            access: Arc::new(crate::server::Access::open()),
        })
    }

    /// Uses the configured consensus policy, number of explaining features and event-time
    /// limits.
    pub fn with_decisions(mut self, cfg: &Config) -> Self {
        self.policy = cfg.policy;
        self.top_features = cfg.top_features;
        self.event_time = cfg.event_time;
        self
    }

    /// The configured authentication and rate limit for the HTTP routes.
    pub fn with_access(
        mut self,
        auth: crate::config::Auth,
        limit: crate::config::RateLimit,
    ) -> Self {
        self.access = Arc::new(crate::server::Access::new(auth, limit));
        self
    }

    /// An engine over the shared models, for on-demand predictions.
    pub fn engine(&self) -> Engine {
        Engine::new(
            self.models.clone(),
            Decoder::Json,
            self.policy,
            self.top_features,
        )
        .with_event_time(self.event_time)
    }

    /// A copy of an account's live state, if any partition of this instance holds it.
    pub fn account(&self, id: &str) -> Option<(i32, crate::state::AccountState)> {
        self.store
            .iter()
            .find_map(|p| p.accounts.get(id).map(|a| (*p.key(), a.clone())))
    }
}

struct Worker {
    engine: Engine,
    alerts: AlertEncoder,
    kafka: KafkaConfig,
    brokers: String,
    producer: KafkaProducer,
    shared: Shared,
}

impl Worker {
    /// Makes sure the partition's state is the state just before `offset`.
    async fn ensure_state(&self, partition: i32, offset: i64) {
        let current = self
            .shared
            .store
            .get(&partition)
            .is_some_and(|s| s.next_offset == Some(offset));
        if current || !self.kafka.restore_state {
            return;
        }
        let (kafka, brokers, engine) = (
            self.kafka.clone(),
            self.brokers.clone(),
            self.engine.clone(),
        );
        let started = Instant::now();
        let restored = tokio::task::spawn_blocking(move || {
            let mut state = crate::state::PartitionState::default();
            let n = restore_partition(&kafka, &brokers, &engine, partition, offset, &mut state);
            (state, n)
        })
        .await;
        match restored {
            Ok((state, Ok(n))) => {
                self.shared.metrics.state_restored_events.inc_by(n);
                tracing::info!(
                    partition,
                    up_to_offset = offset,
                    events = n,
                    accounts = state.accounts.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "account state rebuilt from the input topic"
                );
                self.shared.store.insert(partition, state);
            }
            Ok((_, Err(e))) => {
                tracing::warn!(
                    partition,
                    error = %e,
                    "could not rebuild account state; continuing with empty state for this partition"
                );
                self.shared.store.insert(partition, Default::default());
            }
            Err(e) => {
                tracing::warn!(partition, error = %e, "state restore task failed; continuing with empty state");
                self.shared.store.insert(partition, Default::default());
            }
        }
    }

    fn record(&self, scored: &Scored) {
        let m = &self.shared.metrics;
        m.events_scored.inc();
        for v in &scored.verdicts {
            m.model_scores
                .with_label_values(&[v.model])
                .observe(v.score);
            if v.flagged {
                m.model_flags.with_label_values(&[v.model]).inc();
            }
        }
    }

    /// Processes one message and enqueues its outcome.
    async fn handle(&self, msg: &OwnedMessage, scratch: &mut Scratch) -> Result<Pending, RunError> {
        let consumed_at = Instant::now();
        let (partition, offset) = (msg.partition(), msg.offset());
        let span = tracing::trace_span!(
            "event",
            topic = msg.topic(),
            partition,
            offset,
            transaction_id = tracing::field::Empty,
            account_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let mut pending = self
            .handle_in(msg, scratch, consumed_at)
            .instrument(span.clone())
            .await?;
        span.record("outcome", pending.kind.as_str());
        pending.span = span;
        Ok(pending)
    }

    async fn handle_in(
        &self,
        msg: &OwnedMessage,
        scratch: &mut Scratch,
        consumed_at: Instant,
    ) -> Result<Pending, RunError> {
        let (partition, offset) = (msg.partition(), msg.offset());
        self.ensure_state(partition, offset).await;
        let source = SourceCoordinates {
            topic: msg.topic().to_string(),
            partition,
            offset,
            published_at: crate::ingest::published_at(msg),
        };
        let payload = msg.payload().unwrap_or_default();
        let outcome = {
            let mut state = self.shared.store.entry(partition).or_default();
            let started = Instant::now();
            let outcome = self.engine.process(&mut state, &source, payload, scratch);
            self.shared
                .metrics
                .processing_seconds
                .observe(started.elapsed().as_secs_f64());
            outcome
        };
        let mut feed = None;
        let (kind, delivery) = match outcome {
            Outcome::Clean(scored, _) => {
                self.record(&scored);
                (OutcomeKind::Clean, None)
            }
            Outcome::Alert(alert, scored) => {
                self.record(&scored);
                tracing::info!(
                    alert_id = %alert.alert_id,
                    transaction_id = %alert.transaction_id,
                    account_id = %alert.account_id,
                    partition,
                    offset,
                    forest = format!("{:.3}", scored.verdicts[0].score),
                    lof = format!("{:.2}", scored.verdicts[1].score),
                    reason = %alert.reason,
                    "alert"
                );
                let body = self.alerts.encode(&alert)?;
                feed = serde_json::to_value(&*alert).ok().map(Arc::new);
                let record = FutureRecord::to(&self.kafka.alerts_topic)
                    .key(alert.account_id.as_bytes())
                    .payload(body.as_slice());
                (
                    OutcomeKind::Alert,
                    Some(
                        enqueue(&self.producer, record)
                            .instrument(tracing::trace_span!("publish"))
                            .await?,
                    ),
                )
            }
            Outcome::Invalid(error) => {
                self.shared
                    .metrics
                    .events_invalid
                    .with_label_values(&[error.code()])
                    .inc();
                let (transaction_id, account_id) = self.engine.decoder.identify(payload);
                tracing::warn!(
                    transaction_id = transaction_id.as_deref().unwrap_or(""),
                    account_id = account_id.as_deref().unwrap_or(""),
                    partition,
                    offset,
                    code = error.code(),
                    field = error.field().unwrap_or(""),
                    error = %bounded_text(&error.to_string(), DEAD_LETTER_MAX_ERROR),
                    bytes = payload.len(),
                    "invalid event sent to the dead-letter topic"
                );
                let headers = dead_letter_headers(&error, &source, payload, msg.headers());
                let mut record = FutureRecord::to(&self.kafka.dead_letter_topic)
                    .payload(dead_letter_payload(payload))
                    .headers(headers);
                if let Some(key) = msg.key() {
                    record = record.key(key);
                }
                (
                    OutcomeKind::DeadLetter,
                    Some(
                        enqueue(&self.producer, record)
                            .instrument(tracing::trace_span!("publish"))
                            .await?,
                    ),
                )
            }
        };
        Ok(Pending {
            partition,
            offset,
            kind,
            delivery,
            consumed_at,
            span: tracing::Span::none(),
            alert: feed,
        })
    }

    async fn run(
        self,
        mut events: mpsc::Receiver<(OwnedMessage, u64)>,
        acks: mpsc::Sender<Pending>,
        shutdown: CancellationToken,
    ) -> Result<(), RunError> {
        let mut scratch = Scratch::default();
        while let Some((msg, assignment)) = events.recv().await {
            if self.shared.status.assignment_of(msg.partition()) != Some(assignment) {
                // Queued before its partition was revoked: the new owner processes it.
                self.shared.metrics.revoked_events_dropped.inc();
                continue;
            }
            let pending = match self.handle(&msg, &mut scratch).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, partition = msg.partition(), offset = msg.offset(),
                        "cannot publish an outcome; stopping without storing its offset");
                    shutdown.cancel();
                    return Err(e);
                }
            };
            if acks.send(pending).await.is_err() {
                // The acker stopped on a failed delivery; it already asked for shutdown.
                return Ok(());
            }
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
async fn acknowledge(
    mut pending: mpsc::Receiver<Pending>,
    consumer: Arc<StreamConsumer<GroupContext>>,
    producer: KafkaProducer,
    topic: String,
    metrics: Metrics,
    feed: Arc<AlertFeed>,
    logs: Arc<LogThrottle>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let on_failure = |e: &KafkaError, pause: Duration| {
        metrics.publish_failures.inc();
        if let Some(held_back) = logs.admit("outcome refused") {
            tracing::error!(error = %e, retry_in_s = pause.as_secs(), held_back,
                "outcome not acknowledged; sending it again, storing no offset past it");
        }
    };
    while let Some(p) = pending.recv().await {
        let retry = Retry {
            producer: &producer,
            on_failure: &on_failure,
            shutdown: &shutdown,
        };
        let p = match p.acknowledged(retry).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "stopped before the outcome was acknowledged; its offset is not stored");
                shutdown.cancel();
                return Err(e.into());
            }
        };
        if let Some(alert) = &p.alert {
            feed.publish(alert.clone());
        }
        match p.kind {
            OutcomeKind::Alert => metrics.alerts.inc(),
            OutcomeKind::DeadLetter => metrics.dead_letters.inc(),
            OutcomeKind::Clean => {}
        }
        if let Err(e) = consumer.store_offset(&topic, p.partition, p.offset) {
            // The partition was revoked meanwhile; its new owner re-processes from the last commit.
            tracing::debug!(error = %e, partition = p.partition, "offset not stored");
        }
        metrics
            .stored_offset
            .with_label_values(&[&p.partition.to_string()])
            .set(p.offset + 1);
        metrics
            .end_to_end_seconds
            .observe(p.consumed_at.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Keeps the state gauges current.
async fn report_state(shared: Shared, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let (mut accounts, mut bytes) = (0usize, 0usize);
                for p in shared.store.iter() {
                    accounts += p.accounts.len();
                    bytes += p.bytes();
                }
                shared.metrics.accounts_tracked.set(accounts as i64);
                shared.metrics.state_bytes.set(bytes as i64);
            }
        }
    }
}

/// Runs the stream processor until `shutdown` is cancelled, then drains and commits.
pub async fn run_stream(
    cfg: &Config,
    brokers: &str,
    shared: Shared,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let engine = Engine::new(
        shared.models.clone(),
        Decoder::new(cfg.encoding),
        cfg.policy,
        cfg.top_features,
    )
    .with_event_time(cfg.event_time);
    if engine.features() != &cfg.features {
        tracing::warn!(
            model = ?engine.features(),
            config = ?cfg.features,
            "features config differs from the model's; serving uses the model's"
        );
    }
    shared.status.set_broker_timeout(cfg.kafka.broker_timeout);
    let logs = Arc::new(LogThrottle::default());
    let context = GroupContext {
        status: shared.status.clone(),
        store: shared.store.clone(),
        metrics: shared.metrics.clone(),
        logs: logs.clone(),
    };
    let consumer = Arc::new(group_consumer(&cfg.kafka, brokers, context)?);
    let producer = producer(&cfg.kafka, brokers)?;
    tracing::info!(
        brokers,
        topic = %cfg.kafka.transactions_topic,
        group = %cfg.kafka.group_id,
        workers = cfg.workers,
        model = shared.models.version(),
        policy = cfg.policy.as_str(),
        "stream processor started"
    );

    let mut tasks: JoinSet<Result<(), RunError>> = JoinSet::new();
    let mut ackers: JoinSet<Result<(), RunError>> = JoinSet::new();
    let mut routes = Vec::with_capacity(cfg.workers);
    for _ in 0..cfg.workers {
        let (events_tx, events_rx) = mpsc::channel(cfg.queue_capacity);
        let (acks_tx, acks_rx) = mpsc::channel(cfg.queue_capacity);
        routes.push(events_tx);
        let worker = Worker {
            engine: engine.clone(),
            alerts: AlertEncoder::new(cfg.alert_encoding),
            kafka: cfg.kafka.clone(),
            brokers: brokers.to_string(),
            producer: producer.clone(),
            shared: shared.clone(),
        };
        tasks.spawn(worker.run(events_rx, acks_tx, shutdown.clone()));
        ackers.spawn(acknowledge(
            acks_rx,
            consumer.clone(),
            producer.clone(),
            cfg.kafka.transactions_topic.clone(),
            shared.metrics.clone(),
            shared.alerts.clone(),
            logs.clone(),
            shutdown.clone(),
        ));
    }
    let reporter = tokio::spawn(report_state(shared.clone(), shutdown.clone()));

    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = consumer.recv() => msg,
        };
        match msg {
            Ok(m) => {
                shared.status.broker_answered();
                shared.metrics.events_consumed.inc();
                let Some(assignment) = shared.status.assignment_of(m.partition()) else {
                    continue;
                };
                let route = m.partition().unsigned_abs() as usize % routes.len();
                let owned = m.detach();
                if routes[route].send((owned, assignment)).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                let kind = format!("consumer {:?}", e.rdkafka_error_code());
                if let Some(held_back) = logs.admit(&kind) {
                    tracing::warn!(error = %e, held_back, "consumer error");
                }
            }
        }
    }

    tracing::info!("draining in-flight events");
    drop(routes);
    let mut result = Ok(());
    for set in [&mut tasks, &mut ackers] {
        while let Some(done) = set.join_next().await {
            let r = done
                .map_err(|e| RunError::Task(e.to_string()))
                .and_then(|r| r);
            if let Err(e) = r
                && result.is_ok()
            {
                result = Err(e);
            }
        }
    }
    reporter.abort();
    if let Err(e) = producer.flush(Duration::from_secs(30)) {
        tracing::error!(error = %e, "producer flush failed");
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!("offsets committed"),
        Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::error!(error = %e, "final commit failed"),
    }
    consumer.unsubscribe();
    tracing::info!("stream processor stopped");
    result
}
