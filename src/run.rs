//! The wiring of the stream processor: one consumer task routes events by partition to worker
//! tasks (each owns its partitions' state, so an account is touched by one worker, in order);
//! a worker restores a partition's state when it is not current, runs the synchronous
//! [`Engine`] and hands each outcome to the producer. At-least-once: per worker, a first acking
//! stage waits for each outcome and then queues its changelog records, a second waits for those
//! and stores the offset, in order. Exactly-once: the worker adds everything to the open
//! transaction and a committer commits it every interval ([`crate::exactly_once`]). Bounded
//! channels push back on the consumer; nothing is dropped.
//!
//! Shutdown (SIGTERM, Ctrl-C, or a fatal publish error) stops consuming, drains the queues,
//! waits for every outcome's acknowledgement (or commits the last transaction), flushes the
//! producer and commits before returning.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::changelog::StateChange;
use crate::config::{Config, Encoding, KafkaConfig, Policy};
use crate::decode::Decoder;
use crate::exactly_once::{EventRecords, Guarantee, Transactions};
use crate::ingest::{
    GroupContext, GroupStatus, KafkaProducer, LogThrottle, StateStore, ThrottledLogs,
    client_config_over, fold_input, group_consumer,
};
use crate::metrics::Metrics;
use crate::models::{ModelError, ModelSet, Scratch};
use crate::pipeline::{Agreement, Engine, EventTimeLimits, Outcome, Scored};
use crate::publish::{
    ALERT_AVSC, AlertEncoder, AlertFeed, DEAD_LETTER_MAX_ERROR, EncodeError, OutcomeKind, Pending,
    PublishError, Retry, SourceCoordinates, bounded_text, dead_letter_headers, dead_letter_payload,
    enqueue,
};
use crate::registry::{RegistryError, SchemaRegistry};
use crate::state::PartitionState;
use crate::train::{HistoryError, bundled_history, train};
use crate::triage::Triage;

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
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Triage(#[from] crate::triage::TriageError),
    #[error("a worker task failed: {0}")]
    Task(String),
}

/// Why `POST /models/reload` (or the watch on `models.dir`) kept the models it had.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this instance was not started from a models.dir, so there is nothing to reload")]
    NoDirectory,
    #[error(
        "no challenger is scoring in shadow (set models.challenger_dir to a directory holding another version)"
    )]
    NoChallenger,
    #[error("cannot write the promoted version to {dir}: {source}")]
    Unwritable {
        dir: std::path::PathBuf,
        source: ModelError,
    },
    #[error("the models are still loading")]
    Loading,
    #[error("{dir}: {source}")]
    Unloadable {
        dir: std::path::PathBuf,
        source: ModelError,
    },
    #[error(
        "version {version} was built with features {new} and the stream keeps account state for {running}; restart to change them"
    )]
    Incompatible {
        version: String,
        new: String,
        running: String,
    },
}

/// A reload's result: the version now installed and the one before, and the challenger now
/// scoring in shadow, if any.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Reloaded {
    pub version: String,
    pub previous: String,
    pub changed: bool,
    pub challenger: Option<String>,
}

/// A promotion's result: the challenger's version now decides; the one it replaced.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Promoted {
    pub version: String,
    pub previous: String,
}

/// How the champion's and the challenger's decisions compared since the challenger began to
/// shadow (the Prometheus counter `vigil_shadow_decisions_total` keeps counting across
/// challengers; this is the one `GET /models` reports).
#[derive(Debug, Default)]
pub struct ShadowTally([std::sync::atomic::AtomicU64; 4]);

impl ShadowTally {
    fn count(&self, agreement: Agreement) {
        self.0[agreement as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn reset(&self) {
        for n in &self.0 {
            n.store(0, Ordering::Relaxed);
        }
    }

    /// Each kind of agreement with its count.
    pub fn counts(&self) -> [(Agreement, u64); 4] {
        Agreement::ALL.map(|a| (a, self.0[a as usize].load(Ordering::Relaxed)))
    }
}

/// The model sets serving: the champion decides, a challenger (when there is one) scores every
/// event in shadow. Swapped together, so a worker never takes one without the other.
#[derive(Default)]
struct Serving {
    champion: Option<Arc<ModelSet>>,
    challenger: Option<Arc<ModelSet>>,
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

/// What vigil's producers default to: idempotent, every replica's acknowledgement, small
/// batches compressed. An event's outcome and then its changelog record each wait up to
/// `linger.ms` for company: 2 ms rather than 5 halves the median consume → acknowledged for
/// 1–10 % of the drain rate (docs/benchmarks.md, *Through a real broker*).
const PRODUCER_DEFAULTS: [(&str, &str); 4] = [
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "2"),
    ("compression.type", "lz4"),
];

/// The idempotent producer for alerts and dead letters.
pub fn producer(kafka: &KafkaConfig, brokers: &str) -> Result<KafkaProducer, KafkaError> {
    client_config_over(kafka, brokers, &PRODUCER_DEFAULTS)
        .create_with_context(ThrottledLogs::default())
}

/// The transactional producer of exactly-once mode. Its `transactional.id` comes from
/// `kafka.client` when set there — a name stable across restarts (a StatefulSet's pod name), so
/// that a restarted instance aborts at once what its crashed predecessor left open — or is made
/// unique to this process. The broker aborts a crashed producer's open transaction after
/// `transaction.timeout.ms` (10 s here, Kafka Streams' choice; `read_committed` consumers of
/// the outputs wait for it meanwhile).
pub fn transactional_producer(
    kafka: &KafkaConfig,
    brokers: &str,
) -> Result<KafkaProducer, KafkaError> {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "vigil".to_string());
    let id = format!("{}-{host}-{}", kafka.group_id, std::process::id());
    let transactional = [
        ("transactional.id", id.as_str()),
        ("transaction.timeout.ms", "10000"),
    ];
    let defaults: Vec<(&str, &str)> = PRODUCER_DEFAULTS.into_iter().chain(transactional).collect();
    client_config_over(kafka, brokers, &defaults).create_with_context(ThrottledLogs::default())
}

/// Shared handles the server and the stream both use.
#[derive(Clone)]
pub struct Shared {
    pub metrics: Metrics,
    pub status: Arc<GroupStatus>,
    pub store: Arc<StateStore>,
    /// No champion while the models load (or train): the server is up meanwhile, `/ready` says
    /// so.
    serving: Arc<std::sync::RwLock<Serving>>,
    pub alerts: Arc<AlertFeed>,
    /// The alert index and verdicts (filled once the stream reaches the broker).
    pub triage: Arc<Triage>,
    /// The decision settings predictions use (the stream's own, from the configuration).
    pub policy: Policy,
    pub top_features: usize,
    pub event_time: EventTimeLimits,
    /// Where the models come from, for reloads (`models.dir`, `models.lof.index`).
    source: Option<(std::path::PathBuf, crate::config::LofIndexKind)>,
    /// Where a challenger comes from (`models.challenger_dir`).
    challenger_dir: Option<std::path::PathBuf>,
    /// Bumped by every install: a worker compares it before each event and takes the new set
    /// between two events, so every event is scored by one set.
    generation: Arc<std::sync::atomic::AtomicU64>,
    /// One reload at a time.
    reloading: Arc<std::sync::Mutex<()>>,
    /// The current challenger's agreement with the champion.
    pub shadow_tally: Arc<ShadowTally>,
}

impl Shared {
    /// Everything but the models: what the HTTP server needs to answer while they load.
    pub fn loading() -> Result<Self, RunError> {
        Ok(Self {
            metrics: Metrics::new()?,
            status: Arc::new(GroupStatus::default()),
            store: Arc::new(StateStore::new()),
            serving: Arc::default(),
            alerts: Arc::new(AlertFeed::default()),
            triage: Arc::new(Triage::new(crate::triage::TriageSettings::default())?),
            policy: Policy::All,
            top_features: 3,
            event_time: EventTimeLimits::default(),
            source: None,
            challenger_dir: None,
            generation: Arc::default(),
            reloading: Arc::default(),
            shadow_tally: Arc::default(),
        })
    }

    pub fn new(models: ModelSet) -> Result<Self, RunError> {
        let shared = Self::loading()?;
        shared.install(models);
        Ok(shared)
    }

    /// Makes `models` the loaded ones: their metrics, the model routes and readiness. A
    /// challenger of the same version stops shadowing: it is the champion now.
    pub fn install(&self, models: ModelSet) {
        self.swap(|serving| {
            if serving
                .challenger
                .as_ref()
                .is_some_and(|c| c.version() == models.version())
            {
                serving.challenger = None;
            }
            serving.champion = Some(Arc::new(models));
        });
    }

    /// Changes what serves in one step, then updates the model metrics, the thresholds and
    /// readiness, and tells the workers.
    fn swap(&self, change: impl FnOnce(&mut Serving)) {
        let (champion, challenger) = {
            let mut serving = self.serving.write().unwrap_or_else(|e| e.into_inner());
            let shadowing = serving.challenger.as_ref().map(|c| c.version().to_string());
            change(&mut serving);
            if serving.challenger.as_ref().map(|c| c.version()) != shadowing.as_deref() {
                self.shadow_tally.reset();
            }
            (serving.champion.clone(), serving.challenger.clone())
        };
        if let Some(models) = &champion {
            let created = chrono::DateTime::parse_from_rfc3339(&models.manifest.created_at)
                .map(|t| t.timestamp())
                .unwrap_or(0);
            self.metrics.model_created_seconds.set(created);
            self.metrics.model_info.reset();
            self.metrics
                .model_info
                .with_label_values(&[models.version()])
                .set(1);
            self.status.models_loaded.store(true, Ordering::Relaxed);
        }
        self.metrics.challenger_info.reset();
        if let Some(c) = &challenger {
            self.metrics
                .challenger_info
                .with_label_values(&[c.version()])
                .set(1);
        }
        self.apply_thresholds();
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Serves each model of the serving versions with the threshold an operator decided for it
    /// (the feedback topic's threshold decisions), or with its trained one.
    pub fn apply_thresholds(&self) {
        for models in [self.models(), self.challenger()].into_iter().flatten() {
            for name in [crate::models::ISOLATION_FOREST, crate::models::LOF] {
                let decided = self.triage.threshold_decision(models.version(), name);
                if let Some(threshold) = models.threshold_of(name) {
                    match decided {
                        Some(d) => threshold.set(d.threshold),
                        None => threshold.reset(),
                    }
                }
            }
        }
    }

    /// How many times models were installed: a worker that saw another number takes
    /// [`Self::models`] before its next event.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reloads `models.dir`: loads and checks the artifact off to the side, then installs it in
    /// one step, so a request or an event is scored by the old set or the new one and never by
    /// a part of each. A version already installed is left as it is.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let outcome = self.try_reload().and_then(|mut reloaded| {
            reloaded.challenger = self.reload_challenger()?;
            Ok(reloaded)
        });
        let counted = match &outcome {
            Ok(r) if r.changed => Some("loaded"),
            Err(ReloadError::Unloadable { .. } | ReloadError::Incompatible { .. }) => {
                Some("refused")
            }
            _ => None,
        };
        if let Some(c) = counted {
            self.metrics.model_reloads.with_label_values(&[c]).inc();
        }
        outcome
    }

    fn try_reload(&self) -> Result<Reloaded, ReloadError> {
        let (dir, index) = self.source.clone().ok_or(ReloadError::NoDirectory)?;
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.models().ok_or(ReloadError::Loading)?;
        let previous = current.version().to_string();
        let unchanged = Reloaded {
            version: previous.clone(),
            previous: previous.clone(),
            changed: false,
            challenger: None,
        };
        // Loading builds LOF's index: not worth it for the version already serving.
        if ModelSet::version_in(&dir).as_deref() == Some(previous.as_str()) {
            return Ok(unchanged);
        }
        let new = ModelSet::load(&dir, index).map_err(|source| ReloadError::Unloadable {
            dir: dir.clone(),
            source,
        })?;
        if new.version() == previous {
            return Ok(unchanged);
        }
        compatible(&new, &current)?;
        let version = new.version().to_string();
        self.install(new);
        tracing::info!(%version, %previous, dir = %dir.display(), "reloaded models");
        Ok(Reloaded {
            version,
            previous,
            changed: true,
            challenger: None,
        })
    }

    /// Loads the challenger in `models.challenger_dir` when it holds a version other than the
    /// ones serving; stops the shadow when it holds none or the champion's. Returns the
    /// challenger's version, if one shadows now.
    pub fn reload_challenger(&self) -> Result<Option<String>, ReloadError> {
        let (Some(dir), Some((_, index))) = (self.challenger_dir.clone(), self.source.clone())
        else {
            return Ok(None);
        };
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let champion = self.models().ok_or(ReloadError::Loading)?;
        let current = self.challenger();
        let on_disk = ModelSet::version_in(&dir);
        if on_disk.is_none() || on_disk.as_deref() == Some(champion.version()) {
            if let Some(stopped) = current {
                self.swap(|serving| serving.challenger = None);
                tracing::info!(version = stopped.version(), dir = %dir.display(),
                    "the challenger stopped scoring in shadow: its directory holds no other version");
            }
            return Ok(None);
        }
        if let Some(c) = current.filter(|c| Some(c.version()) == on_disk.as_deref()) {
            return Ok(Some(c.version().to_string()));
        }
        let new = ModelSet::load(&dir, index).map_err(|source| ReloadError::Unloadable {
            dir: dir.clone(),
            source,
        })?;
        compatible(&new, &champion)?;
        let version = new.version().to_string();
        self.swap(|serving| serving.challenger = Some(Arc::new(new)));
        self.metrics
            .model_reloads
            .with_label_values(&["loaded"])
            .inc();
        tracing::info!(%version, champion = champion.version(), dir = %dir.display(),
            "a challenger scores every event in shadow; its alerts go to the shadow topic");
        Ok(Some(version))
    }

    /// Makes the challenger the champion in one step: its artifact is written to `models.dir`
    /// first (so a restart, and every instance watching that directory, serves it too), then
    /// it decides every event from the next one on, and nothing shadows until another version
    /// appears in `models.challenger_dir`.
    pub fn promote(&self) -> Result<Promoted, ReloadError> {
        let (dir, _) = self.source.clone().ok_or(ReloadError::NoDirectory)?;
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let champion = self.models().ok_or(ReloadError::Loading)?;
        let challenger = self.challenger().ok_or(ReloadError::NoChallenger)?;
        challenger
            .save(&dir)
            .map_err(|source| ReloadError::Unwritable {
                dir: dir.clone(),
                source,
            })?;
        self.swap(|serving| {
            serving.champion = serving.challenger.take();
        });
        self.metrics
            .model_reloads
            .with_label_values(&["loaded"])
            .inc();
        let promoted = Promoted {
            version: challenger.version().to_string(),
            previous: champion.version().to_string(),
        };
        tracing::info!(version = %promoted.version, previous = %promoted.previous, dir = %dir.display(),
            "the challenger was promoted: it decides from now on");
        Ok(promoted)
    }

    /// The loaded models (the champion); `None` while they load.
    pub fn models(&self) -> Option<Arc<ModelSet>> {
        self.serving.read().ok()?.champion.clone()
    }

    /// The challenger scoring in shadow, if any.
    pub fn challenger(&self) -> Option<Arc<ModelSet>> {
        self.serving.read().ok()?.challenger.clone()
    }

    /// Both, read together.
    fn serving(&self) -> (Option<Arc<ModelSet>>, Option<Arc<ModelSet>>) {
        match self.serving.read() {
            Ok(s) => (s.champion.clone(), s.challenger.clone()),
            Err(_) => (None, None),
        }
    }

    /// Uses the configured consensus policy, number of explaining features, event-time limits
    /// and the models' directory (for reloads).
    pub fn with_decisions(mut self, cfg: &Config) -> Result<Self, RunError> {
        self.triage = Arc::new(Triage::new(cfg.triage.clone())?);
        self.source = Some((cfg.models.dir.clone(), cfg.models.lof.index));
        self.challenger_dir = cfg.models.challenger_dir.clone();
        self.policy = cfg.policy;
        self.top_features = cfg.top_features;
        self.event_time = cfg.event_time;
        Ok(self)
    }

    /// An engine over the loaded models, for on-demand predictions; `None` while they load.
    pub fn engine(&self) -> Option<Engine> {
        let engine = Engine::new(
            self.models()?,
            Decoder::Json,
            self.policy,
            self.top_features,
        );
        Some(engine.with_event_time(self.event_time))
    }

    /// A copy of an account's live state, if any partition of this instance holds it.
    pub fn account(&self, id: &str) -> Option<(i32, crate::state::AccountState)> {
        self.store
            .iter()
            .find_map(|p| p.accounts.get(id).map(|a| (*p.key(), (**a).clone())))
    }
}

/// Whether `new` can replace or shadow `serving`: the stream keeps one account state, built with
/// `serving`'s state parameters.
fn compatible(new: &ModelSet, serving: &ModelSet) -> Result<(), ReloadError> {
    if new.manifest.features == serving.manifest.features {
        return Ok(());
    }
    Err(ReloadError::Incompatible {
        version: new.version().to_string(),
        new: format!("{:?}", new.manifest.features),
        running: format!("{:?}", serving.manifest.features),
    })
}

/// The state of `partition` just before `offset`. Blocking.
fn restore(
    kafka: &KafkaConfig,
    brokers: &str,
    engine: &Engine,
    changelog: Option<&str>,
    partition: i32,
    offset: i64,
    max_accounts: Option<usize>,
) -> Result<(PartitionState, Restore), KafkaError> {
    if let Some(topic) = changelog {
        match crate::changelog::restore(kafka, brokers, topic, partition) {
            Ok(Some(r)) => {
                let mut state = r.state;
                state.limit_accounts(max_accounts);
                let folded = if r.covered < offset {
                    // Committed events without records of their own (dead letters).
                    fold_input(
                        kafka,
                        brokers,
                        engine,
                        partition,
                        Some(r.covered),
                        offset,
                        &mut state,
                    )?
                } else {
                    0
                };
                return Ok((
                    state,
                    Restore::Changelog {
                        records: r.records,
                        covered: r.covered,
                        folded,
                    },
                ));
            }
            Ok(None) => {}
            // The broker away: try the changelog again rather than replay the whole input.
            Err(crate::changelog::ChangelogError::Kafka(e)) if broker_unavailable(&e) => {
                return Err(e);
            }
            Err(crate::changelog::ChangelogError::Timeout(_)) => {
                return Err(KafkaError::Global(RDKafkaErrorCode::OperationTimedOut));
            }
            Err(e) => tracing::warn!(partition, error.message = %e,
                "changelog unreadable; rebuilding the state from the input topic"),
        }
    }
    let mut state = PartitionState::default();
    state.limit_accounts(max_accounts);
    let events = fold_input(kafka, brokers, engine, partition, None, offset, &mut state)?;
    Ok((state, Restore::Input { events }))
}

/// Whether `e` says no broker could be asked (one down, slow or moving leadership), rather
/// than that the request itself is wrong.
fn broker_unavailable(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::OperationTimedOut
                | C::RequestTimedOut
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::BrokerNotAvailable
                | C::NetworkException
        )
    )
}

/// An event as the consumer hands it to its worker: when it was taken from the consumer, so
/// that `vigil_end_to_end_seconds` includes the time it waited in the worker's queue.
struct Consumed {
    msg: OwnedMessage,
    /// The assignment under which it was consumed.
    assignment: u64,
    at: Instant,
}

struct Worker {
    engine: Engine,
    /// The [`Shared::generation`] of `engine.models`.
    models_generation: u64,
    /// Scored events' features not yet handed to the models' drift monitor.
    drift: crate::models::drift::DriftCounts,
    alerts: AlertEncoder,
    kafka: KafkaConfig,
    brokers: String,
    producer: KafkaProducer,
    shared: Shared,
    /// The changelog topic, when state is written there.
    changelog: Option<String>,
    /// Per partition, the offset below which re-delivered events are already done (the
    /// changelog covers them), right after a restore from the changelog.
    done_below: HashMap<i32, i64>,
    /// Partitions restored from the input topic whose whole state must be written to the
    /// changelog with their next event, so that the next restore can come from it.
    snapshot_due: HashSet<i32>,
    /// Exactly-once mode: outcomes go into the open transaction instead of to the ackers.
    transactions: Option<Arc<Transactions>>,
    /// `pipeline.max_accounts`: the instance's bound, shared by the partitions it owns.
    max_accounts: Option<usize>,
    /// The input topic as configured, named by every alert's source: shared, not copied per
    /// event.
    input_topic: Arc<str>,
    shutdown: CancellationToken,
}

/// Where a partition's state came from when it was not current.
enum Restore {
    Changelog {
        records: u64,
        covered: i64,
        folded: u64,
    },
    Input {
        events: u64,
    },
}

/// What to do with an event after its partition's state was made current.
enum Ready {
    Process,
    AlreadyDone,
    /// Its partition was revoked, or the instance is stopping, while the state could not be
    /// restored: the event is left to whoever processes the partition next.
    Dropped,
}

impl Worker {
    /// A partition's share of `pipeline.max_accounts` under the current assignment.
    fn account_share(&self) -> Option<usize> {
        let partitions = usize::try_from(self.shared.status.assigned()).unwrap_or(0);
        self.max_accounts
            .map(|max| (max / partitions.max(1)).max(1))
    }

    /// Makes sure the partition's state is the state just before `offset`: from the changelog
    /// (and the input events after what it covers), else by replaying the input topic.
    async fn ensure_state(&mut self, partition: i32, offset: i64, assignment: u64) -> Ready {
        if let Some(&below) = self.done_below.get(&partition) {
            if offset < below {
                return Ready::AlreadyDone;
            }
            self.done_below.remove(&partition);
        }
        let current = self
            .shared
            .store
            .get(&partition)
            .is_some_and(|s| s.next_offset == Some(offset));
        if current || !self.kafka.restore_state {
            return Ready::Process;
        }
        let status = self.shared.status.clone();
        let metrics = self.shared.metrics.clone();
        let started = Instant::now();
        let restored = {
            let _restoring = status.restore_started();
            metrics.state_restoring.set(status.restoring());
            let restored = self.restore_until_done(partition, offset, assignment).await;
            metrics.state_restoring.set(status.restoring() - 1);
            restored
        };
        let Some(restored) = restored else {
            return Ready::Dropped;
        };
        let seconds = started.elapsed().as_secs_f64();
        let m = &self.shared.metrics;
        let (state, ready) = match restored {
            (
                state,
                Restore::Changelog {
                    records,
                    covered,
                    folded,
                },
            ) => {
                m.state_restored_records.inc_by(records);
                m.state_restored_events.inc_by(folded);
                m.state_restore_seconds
                    .with_label_values(&["changelog"])
                    .observe(seconds);
                tracing::info!(
                    partition,
                    up_to_offset = offset,
                    covered,
                    records,
                    events = folded,
                    accounts = state.accounts.len(),
                    ms = (seconds * 1e3) as u64,
                    "account state restored from the changelog"
                );
                let ready = if offset < covered {
                    tracing::info!(
                        partition,
                        from = offset,
                        to = covered,
                        "events below the changelog's position were processed before; skipping them"
                    );
                    self.done_below.insert(partition, covered);
                    Ready::AlreadyDone
                } else {
                    Ready::Process
                };
                (state, ready)
            }
            (state, Restore::Input { events }) => {
                m.state_restored_events.inc_by(events);
                m.state_restore_seconds
                    .with_label_values(&["input"])
                    .observe(seconds);
                tracing::info!(
                    partition,
                    up_to_offset = offset,
                    events,
                    accounts = state.accounts.len(),
                    ms = (seconds * 1e3) as u64,
                    "account state rebuilt from the input topic"
                );
                if self.changelog.is_some() {
                    self.snapshot_due.insert(partition);
                }
                (state, Ready::Process)
            }
        };
        self.shared.store.insert(partition, state);
        ready
    }

    /// [`restore`], tried again (1 s, doubling to 30 s) while it fails — the broker away — and
    /// never replaced by an empty state: events scored against part of their account's history
    /// get other scores. `None` once the partition is no longer this instance's under
    /// `assignment` or the instance is stopping.
    async fn restore_until_done(
        &self,
        partition: i32,
        offset: i64,
        assignment: u64,
    ) -> Option<(PartitionState, Restore)> {
        let mut pause = Duration::from_secs(1);
        loop {
            if self.shutdown.is_cancelled() {
                return None;
            }
            let (kafka, brokers, engine, changelog) = (
                self.kafka.clone(),
                self.brokers.clone(),
                self.engine.clone(),
                self.changelog.clone(),
            );
            let share = self.account_share();
            let attempt = tokio::task::spawn_blocking(move || {
                restore(
                    &kafka,
                    &brokers,
                    &engine,
                    changelog.as_deref(),
                    partition,
                    offset,
                    share,
                )
            })
            .await;
            let error = match attempt {
                Ok(Ok(restored)) => return Some(restored),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            if self.shared.status.assignment_of(partition) != Some(assignment) {
                return None;
            }
            tracing::warn!(
                partition,
                error,
                retry_in_s = pause.as_secs(),
                "cannot restore the partition's state yet; its events wait"
            );
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(30));
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

    /// Processes one message, consumed at `consumed_at`, and enqueues its outcome.
    async fn handle(
        &mut self,
        msg: &OwnedMessage,
        assignment: u64,
        consumed_at: Instant,
        scratch: &mut Scratch,
    ) -> Result<Option<Pending>, RunError> {
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
        let pending = self
            .handle_in(msg, assignment, scratch, consumed_at)
            .instrument(span.clone())
            .await?;
        Ok(pending.map(|p| Pending { span, ..p }))
    }

    async fn handle_in(
        &mut self,
        msg: &OwnedMessage,
        assignment: u64,
        scratch: &mut Scratch,
        consumed_at: Instant,
    ) -> Result<Option<Pending>, RunError> {
        let (partition, offset) = (msg.partition(), msg.offset());
        let mut pending = Pending {
            partition,
            offset,
            assignment,
            kind: OutcomeKind::Clean,
            deliveries: Vec::new(),
            changes: Vec::new(),
            consumed_at,
            span: tracing::Span::none(),
            alert: None,
            shadow_alert: false,
        };
        match self.ensure_state(partition, offset, assignment).await {
            Ready::Process => {}
            Ready::AlreadyDone => {
                self.shared.metrics.events_already_processed.inc();
                return Ok(Some(pending));
            }
            Ready::Dropped => {
                self.shared.metrics.revoked_events_dropped.inc();
                return Ok(None);
            }
        }
        // The configured name, shared, unless the subscription is a pattern (`^…`).
        let topic = if msg.topic() == &*self.input_topic {
            self.input_topic.clone()
        } else {
            msg.topic().into()
        };
        let source = SourceCoordinates {
            topic,
            partition,
            offset,
            published_at: crate::ingest::published_at(msg),
        };
        let payload = msg.payload().unwrap_or_default();
        let mut outcome = {
            let mut state = self.shared.store.entry(partition).or_default();
            state.limit_accounts(self.account_share());
            if self.changelog.is_some() {
                if self.snapshot_due.remove(&partition) {
                    pending.changes = StateChange::snapshot(&state, offset - 1);
                }
                state.track_forgotten();
            }
            let generation = self.shared.generation();
            if generation != self.models_generation
                && let (Some(models), challenger) = self.shared.serving()
            {
                self.engine.models.drift.hand_over(&mut self.drift);
                self.engine.models = models;
                self.engine.challenger = challenger;
                self.models_generation = generation;
            }
            let started = Instant::now();
            let outcome = self.engine.process(&mut state, &source, payload, scratch);
            if let Outcome::Clean(scored, _) | Outcome::Alert(_, scored) = &outcome {
                self.engine
                    .models
                    .drift
                    .observe(&mut self.drift, &scored.features);
            }
            self.shared
                .metrics
                .processing_seconds
                .observe(started.elapsed().as_secs_f64());
            let evicted = state.take_evicted();
            if evicted > 0 {
                self.shared.metrics.state_evicted_accounts.inc_by(evicted);
            }
            if self.changelog.is_some() {
                let account = match &outcome {
                    Outcome::Clean(_, tx) => Some(tx.account_id.as_str()),
                    Outcome::Alert(alert, _) => Some(alert.account_id.as_str()),
                    Outcome::Invalid(_) => None,
                };
                for id in state.take_forgotten() {
                    pending.changes.push(StateChange::forgotten(&id, offset));
                }
                if let Some(a) = account.and_then(|id| Some((id, state.accounts.get(id)?))) {
                    pending.changes.push(StateChange::account(a.0, a.1, offset));
                }
            }
            outcome
        };
        let shadow = match &mut outcome {
            Outcome::Clean(scored, _) | Outcome::Alert(_, scored) => scored.shadow.take(),
            Outcome::Invalid(_) => None,
        };
        let champion_alerts = matches!(outcome, Outcome::Alert(..));
        let shadow_alert = shadow.and_then(|shadow| {
            let agreement = Agreement::of(champion_alerts, shadow.alert.is_some());
            self.shared
                .metrics
                .shadow_decisions
                .with_label_values(&[agreement.as_str()])
                .inc();
            self.shared.shadow_tally.count(agreement);
            shadow.alert
        });
        let shadow_body = match &shadow_alert {
            Some(alert) => Some(self.alerts.encode(alert)?),
            None => None,
        };
        let shadow_record = shadow_alert
            .as_ref()
            .zip(shadow_body.as_ref())
            .map(|(a, body)| {
                FutureRecord::to(&self.kafka.shadow_topic)
                    .key(a.account_id.as_bytes())
                    .payload(body.as_slice())
            });
        pending.shadow_alert = shadow_record.is_some();
        // Set by the alert arm only, and borrowed by its record.
        let (alert_body, alert_key): (Vec<u8>, String);
        let (kind, record) = match outcome {
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
                alert_body = self.alerts.encode(&alert)?;
                pending.alert = serde_json::to_value(&*alert).ok().map(Arc::new);
                alert_key = alert.account_id;
                let record = FutureRecord::to(&self.kafka.alerts_topic)
                    .key(alert_key.as_bytes())
                    .payload(alert_body.as_slice());
                (OutcomeKind::Alert, Some(record))
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
                    error.message = %bounded_text(&error.to_string(), DEAD_LETTER_MAX_ERROR),
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
                (OutcomeKind::DeadLetter, Some(record))
            }
        };
        pending.kind = kind;
        tracing::Span::current().record("outcome", kind.as_str());
        if let Some(transactions) = &self.transactions {
            let event = EventRecords {
                partition,
                offset,
                assignment,
                kind,
                outcome: record,
                shadow: shadow_record,
                changes: &pending.changes,
                changelog: self.changelog.as_deref(),
                alert: pending.alert.take(),
                consumed_at,
            };
            if !transactions.add(&self.shared.status, event)? {
                self.shared.metrics.revoked_events_dropped.inc();
            }
            return Ok(None);
        }
        for record in record.into_iter().chain(shadow_record) {
            pending.deliveries.push(
                enqueue(&self.producer, record)
                    .instrument(tracing::trace_span!("publish"))
                    .await?,
            );
        }
        Ok(Some(pending))
    }

    async fn run(
        mut self,
        mut events: mpsc::Receiver<Consumed>,
        acks: mpsc::Sender<Pending>,
        shutdown: CancellationToken,
    ) -> Result<(), RunError> {
        let mut scratch = Scratch::default();
        while let Some(Consumed {
            msg,
            assignment,
            at,
        }) = events.recv().await
        {
            let payload = msg.payload().unwrap_or_default();
            if let Some((registry, id)) = self.engine.decoder.schema_to_fetch(payload) {
                let (registry, what) = (registry.clone(), format!("schema id {id}"));
                let fetch = move || registry.writer_schema(id);
                let metrics = &self.shared.metrics;
                if until_answered(&what, metrics, &shutdown, fetch)
                    .await
                    .is_none()
                {
                    // Stopping before the registry answered: the event stays unprocessed and
                    // its offset unstored.
                    return Ok(());
                }
            }
            if self.shared.status.assignment_of(msg.partition()) != Some(assignment) {
                // Queued before its partition was revoked: the new owner processes it.
                self.shared.metrics.revoked_events_dropped.inc();
                continue;
            }
            let pending = match self.handle(&msg, assignment, at, &mut scratch).await {
                Ok(Some(p)) => p,
                // In the open transaction.
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error.message = %e, partition = msg.partition(), offset = msg.offset(),
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

/// What both acknowledging stages share.
#[derive(Clone)]
struct Acks {
    producer: KafkaProducer,
    metrics: Metrics,
    logs: Arc<LogThrottle>,
    shutdown: CancellationToken,
}

impl Acks {
    /// Waits until the broker has every delivery of `p`, sending refused ones again.
    async fn acknowledged(&self, p: Pending) -> Result<Pending, RunError> {
        let on_failure = |e: &KafkaError, pause: Duration| {
            self.metrics.publish_failures.inc();
            if let Some(held_back) = self.logs.admit("outcome refused") {
                tracing::error!(error.message = %e, retry_in_s = pause.as_secs(), held_back,
                    "outcome not acknowledged; sending it again, storing no offset past it");
            }
        };
        let retry = Retry {
            producer: &self.producer,
            on_failure: &on_failure,
            shutdown: &self.shutdown,
        };
        p.acknowledged(retry).await.map_err(|e| {
            tracing::error!(error.message = %e, "stopped before the outcome was acknowledged; its offset is not stored");
            self.shutdown.cancel();
            e.into()
        })
    }
}

/// The first stage of acknowledging: waits for each event's outcome, then queues its state
/// changes on the changelog — only now, so that a changelog record always means its event's
/// outcome, and every earlier one, is durable (see [`crate::changelog`]) — while the partition
/// is still this instance's.
async fn send_changes(
    mut pending: mpsc::Receiver<Pending>,
    next: mpsc::Sender<Pending>,
    acks: Acks,
    changelog: Option<String>,
    status: Arc<GroupStatus>,
) -> Result<(), RunError> {
    while let Some(p) = pending.recv().await {
        let mut p = acks.acknowledged(p).await?;
        if let Some(topic) = changelog.as_deref().filter(|_| !p.changes.is_empty()) {
            let changes = std::mem::take(&mut p.changes);
            let mut sent = 0;
            let owned = loop {
                let queued = status.while_owned(p.partition, p.assignment, || {
                    while let Some(change) = changes.get(sent) {
                        match change.send(&acks.producer, topic, p.partition) {
                            Ok(delivery) => p.deliveries.push(delivery),
                            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                                return Ok(false);
                            }
                            Err(e) => return Err(e),
                        }
                        sent += 1;
                    }
                    Ok(true)
                });
                match queued {
                    None => break false,
                    Some(Ok(true)) => break true,
                    // Out of the lock: a revocation may go ahead while the queue drains.
                    Some(Ok(false)) => tokio::time::sleep(Duration::from_millis(2)).await,
                    Some(Err(e)) => {
                        tracing::error!(error.message = %e, partition = p.partition, offset = p.offset,
                            "cannot queue a changelog record; stopping without storing its offset");
                        acks.shutdown.cancel();
                        return Err(e.into());
                    }
                }
            };
            if !owned {
                // Revoked meanwhile: its new owner re-does this event from the committed offset.
                acks.metrics.revoked_events_dropped.inc();
                continue;
            }
        }
        if next.send(p).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// The second stage: waits for the changelog records, then stores the offset (in order).
async fn acknowledge(
    mut pending: mpsc::Receiver<Pending>,
    acks: Acks,
    consumer: Arc<StreamConsumer<GroupContext>>,
    topic: String,
    feed: Arc<AlertFeed>,
) -> Result<(), RunError> {
    let metrics = acks.metrics.clone();
    while let Some(p) = pending.recv().await {
        let records = p.deliveries.len() as u64;
        let p = acks.acknowledged(p).await?;
        metrics.changelog_records.inc_by(records);
        if let Some(alert) = &p.alert {
            feed.publish(alert.clone());
        }
        if p.shadow_alert {
            metrics.shadow_alerts.inc();
        }
        match p.kind {
            OutcomeKind::Alert => metrics.alerts.inc(),
            OutcomeKind::DeadLetter => metrics.dead_letters.inc(),
            OutcomeKind::Clean => {}
        }
        if let Err(e) = consumer.store_offset(&topic, p.partition, p.offset) {
            // The partition was revoked meanwhile; its new owner re-processes from the last commit.
            tracing::debug!(error.message = %e, partition = p.partition, "offset not stored");
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

/// Exactly-once mode, after an aborted transaction: seeks the suspended partitions back to their
/// committed offsets and takes their events again (their states are restored from the
/// changelog, as of that commit, with their next event). Tried again in a second if the group's
/// offsets cannot be read or the seek fails.
async fn rewind(consumer: &Arc<StreamConsumer<GroupContext>>, topic: &str, status: &GroupStatus) {
    let parts = status.suspended();
    if parts.is_empty() {
        return;
    }
    let (c, topic) = (consumer.clone(), topic.to_string());
    let sought = tokio::task::spawn_blocking(move || -> Result<Vec<i32>, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for &p in &parts {
            tpl.add_partition(&topic, p);
        }
        let committed = c.committed_offsets(tpl, Duration::from_secs(10))?;
        let mut to = TopicPartitionList::new();
        for e in committed.elements() {
            // No commit yet: where the group starts (`auto.offset.reset: earliest`).
            let offset = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            to.add_partition_offset(&topic, e.partition(), offset)?;
        }
        let sought = c.seek_partitions(to, Duration::from_secs(10))?;
        if let Some(e) = sought.elements().iter().find_map(|e| e.error().err()) {
            return Err(e);
        }
        Ok(parts)
    })
    .await;
    let error = match sought {
        Ok(Ok(parts)) => {
            status.resume(&parts);
            tracing::info!(partitions = ?parts, "rewound to the last commit");
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::warn!(error, "cannot rewind yet; trying again in a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
    status.request_rewind();
}

/// Exactly-once mode: commits the open transaction every `interval` until shutdown (or a
/// commit that stops the instance).
async fn commit_every_interval(
    transactions: Arc<Transactions>,
    consumer: Arc<StreamConsumer<GroupContext>>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (t, c) = (transactions.clone(), consumer.clone());
        let committed = tokio::task::spawn_blocking(move || {
            t.commit(c.group_metadata().as_ref(), &c.context().status, || {})
        })
        .await;
        if !matches!(committed, Ok(Ok(()))) {
            return;
        }
    }
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
                    bytes += p.bytes_estimate();
                }
                shared.metrics.accounts_tracked.set(accounts as i64);
                shared.metrics.state_bytes.set(bytes as i64);
            }
        }
    }
}

/// The changelog topic once it is there (created if missing), waiting for a broker that is away
/// (1 s, doubling to 30 s) rather than running the instance's whole life without it; `None`
/// when it cannot be used (the log says why) or the instance is stopping.
async fn changelog_topic(
    cfg: &Config,
    brokers: &str,
    topic: &str,
    shutdown: &CancellationToken,
) -> Option<String> {
    let mut pause = Duration::from_secs(1);
    loop {
        match crate::changelog::ensure_topic(&cfg.kafka, brokers, topic).await {
            Ok(()) => return Some(topic.to_string()),
            Err(crate::changelog::ChangelogError::Kafka(e)) if broker_unavailable(&e) => {
                tracing::warn!(topic, error.message = %e, retry_in_s = pause.as_secs(),
                    "cannot reach the broker to check the state changelog yet");
            }
            Err(e) => {
                tracing::error!(topic, error.message = %e,
                    "state changelog unusable; restoring state from the input topic instead");
                return None;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Makes sure the shadow topic exists before a challenger can publish to it (as many
/// partitions as the alerts topic when vigil creates it), waiting for a broker that is away
/// (1 s, doubling to 30 s); `false` if the instance is stopping first. A challenger must not
/// hold the stream back: a topic that cannot be made is an error at start, not a stalled
/// partition later.
async fn shadow_topic(
    cfg: &Config,
    brokers: &str,
    shutdown: &CancellationToken,
) -> Result<bool, RunError> {
    let topic = cfg.kafka.shadow_topic.as_str();
    let like = crate::ingest::Partitions::Like(&cfg.kafka.alerts_topic);
    let mut pause = Duration::from_secs(1);
    loop {
        match crate::ingest::ensure_topic(&cfg.kafka, brokers, topic, like, &[]).await {
            Ok(created) => {
                if created {
                    tracing::info!(
                        topic,
                        "created the shadow topic for the challenger's alerts"
                    );
                }
                return Ok(true);
            }
            Err(e) if broker_unavailable(&e) => tracing::warn!(topic, error.message = %e,
                retry_in_s = pause.as_secs(), "cannot reach the broker to check the shadow topic yet"),
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Calls the schema registry off the runtime's threads until it answers (a request that fails
/// waits 1 s, doubling to 30 s, and is logged once per wait); `None` if `shutdown` came first.
/// A registry outage so holds back the events that need it rather than turning them into dead
/// letters.
async fn until_answered<T: Send + 'static>(
    what: &str,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    call: impl Fn() -> Result<T, RegistryError> + Clone + Send + 'static,
) -> Option<Result<T, RegistryError>> {
    let mut pause = Duration::from_secs(1);
    loop {
        let attempt = tokio::task::spawn_blocking(call.clone());
        let failure = match attempt.await {
            Ok(Err(e @ RegistryError::Unavailable { .. })) => e.to_string(),
            Ok(answer) => return Some(answer),
            Err(e) => e.to_string(),
        };
        metrics.schema_registry_failures.inc();
        tracing::warn!(error.message = %failure, retry_in_s = pause.as_secs(), "schema registry: {what}");
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// The schema registry, when Avro is read or written and one is configured.
pub fn schema_registry(cfg: &Config) -> Result<Option<Arc<SchemaRegistry>>, RegistryError> {
    let avro = cfg.encoding == Encoding::Avro || cfg.alert_encoding == Encoding::Avro;
    match &cfg.schema_registry {
        Some(r) if avro => Ok(Some(Arc::new(SchemaRegistry::new(r)?))),
        _ => Ok(None),
    }
}

/// Avro alerts in the Confluent wire format under the id the registry gives `schemas/alert.avsc`
/// in the subject `<alerts topic>-value` (the default TopicNameStrategy), bare datums without a
/// registry; `None` if `shutdown` came before the registry answered.
async fn alert_encoder(
    cfg: &Config,
    registry: Option<&Arc<SchemaRegistry>>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Option<AlertEncoder>, RunError> {
    let encoder = AlertEncoder::new(cfg.alert_encoding);
    let Some(registry) = registry.filter(|_| cfg.alert_encoding == Encoding::Avro) else {
        return Ok(Some(encoder));
    };
    let subject = format!("{}-value", cfg.kafka.alerts_topic);
    let call = {
        let (registry, subject) = (registry.clone(), subject.clone());
        move || registry.register(&subject, ALERT_AVSC)
    };
    let Some(id) = until_answered(&format!("registering {subject}"), metrics, shutdown, call).await
    else {
        return Ok(None);
    };
    let id = id?;
    tracing::info!(
        subject,
        id,
        registry = registry.url(),
        "alert schema registered"
    );
    Ok(Some(encoder.in_wire_format(id)))
}

/// How often [`watch_models_dir`] looks at `models.dir`.
const MODEL_WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// Reloads when the manifest in `models.dir` names another version than the one serving, or
/// the one in `models.challenger_dir` another than the challenger's (appeared, changed or
/// gone). Polled rather than watched with inotify: a Kubernetes ConfigMap or a volume swaps
/// the directory by symlink, which file-change events miss, and the manifest is written last,
/// so a new version is seen only once it is complete. Versions that fail to load are reported
/// once and tried again only when a manifest changes again.
pub async fn watch_models_dir(shared: Shared, shutdown: CancellationToken) {
    let Some((dir, _)) = shared.source.clone() else {
        return;
    };
    let challenger_dir = shared.challenger_dir.clone();
    let mut refused: Option<(Option<String>, Option<String>)> = None;
    let mut every = tokio::time::interval(MODEL_WATCH_INTERVAL);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let Some(champion) = ModelSet::version_in(&dir) else {
            continue;
        };
        let challenger = challenger_dir.as_deref().and_then(ModelSet::version_in);
        let (serving, shadowing) = shared.serving();
        let serving = serving.map(|m| m.version().to_string());
        let shadowing = shadowing.map(|m| m.version().to_string());
        // A challenger directory holding the champion's version shadows nothing.
        let wanted = challenger.clone().filter(|c| *c != champion);
        let on_disk = (Some(champion), challenger);
        if (serving == on_disk.0 && shadowing == wanted) || refused.as_ref() == Some(&on_disk) {
            continue;
        }
        let reloading = shared.clone();
        match tokio::task::spawn_blocking(move || reloading.reload()).await {
            Ok(Ok(_)) => refused = None,
            Ok(Err(e)) => {
                tracing::error!(error.message = %e, version = on_disk.0.as_deref(), challenger = on_disk.1.as_deref(),
                    "the new models were not loaded; the current ones keep serving");
                refused = Some(on_disk);
            }
            Err(e) => tracing::error!(error.message = %e, "the model reload task failed"),
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
    let registry = schema_registry(cfg)?;
    let models = shared
        .models()
        .ok_or_else(|| RunError::Task("the stream started before its models were loaded".into()))?;
    let engine = Engine::new(
        models.clone(),
        Decoder::with_registry(cfg.encoding, registry.clone()),
        cfg.policy,
        cfg.top_features,
    )
    .with_event_time(cfg.event_time);
    let Some(alerts) = alert_encoder(cfg, registry.as_ref(), &shared.metrics, &shutdown).await?
    else {
        return Ok(());
    };
    if engine.features() != &cfg.features {
        tracing::warn!(
            model = ?engine.features(),
            config = ?cfg.features,
            "features config differs from the model's; serving uses the model's"
        );
    }
    shared.status.set_broker_timeout(cfg.kafka.broker_timeout);
    if cfg.models.challenger_dir.is_some() && !shadow_topic(cfg, brokers, &shutdown).await? {
        return Ok(());
    }
    tokio::spawn(watch_models_dir(shared.clone(), shutdown.clone()));
    tokio::spawn(crate::triage::follow(
        cfg.kafka.clone(),
        brokers.to_string(),
        cfg.alert_encoding,
        shared.triage.clone(),
        shared.metrics.clone(),
        shutdown.clone(),
    ));
    // Threshold decisions from the feedback topic (another instance's, or this one's before a
    // restart) take effect as they arrive.
    let (apply, stop) = (shared.clone(), shutdown.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = apply.triage.thresholds_changed.notified() => apply.apply_thresholds(),
            }
        }
    });
    let logs = Arc::new(LogThrottle::default());
    let changelog = match &cfg.kafka.changelog_topic {
        Some(topic) => changelog_topic(cfg, brokers, topic, &shutdown).await,
        None => None,
    };
    let (producer, transactions) = match cfg.kafka.guarantee {
        Guarantee::AtLeastOnce => (producer(&cfg.kafka, brokers)?, None),
        Guarantee::ExactlyOnce => {
            let producer = transactional_producer(&cfg.kafka, brokers)?;
            let (p, topic, metrics, feed, stop) = (
                producer.clone(),
                cfg.kafka.transactions_topic.clone(),
                shared.metrics.clone(),
                shared.alerts.clone(),
                shutdown.clone(),
            );
            let transactions = tokio::task::spawn_blocking(move || {
                Transactions::begin(p, &topic, metrics, feed, stop)
            })
            .await
            .map_err(|e| RunError::Task(e.to_string()))??;
            (producer, Some(Arc::new(transactions)))
        }
    };
    let context = GroupContext {
        status: shared.status.clone(),
        store: shared.store.clone(),
        metrics: shared.metrics.clone(),
        logs: logs.clone(),
        producer: producer.clone(),
        transactions: transactions.clone(),
    };
    let consumer = Arc::new(group_consumer(&cfg.kafka, brokers, context)?);
    tracing::info!(
        brokers,
        topic = %cfg.kafka.transactions_topic,
        group = %cfg.kafka.group_id,
        changelog = changelog.as_deref().unwrap_or("none"),
        guarantee = cfg.kafka.guarantee.as_str(),
        workers = cfg.workers,
        model = models.version(),
        policy = cfg.policy.as_str(),
        "stream processor started"
    );

    let mut tasks: JoinSet<Result<(), RunError>> = JoinSet::new();
    let mut ackers: JoinSet<Result<(), RunError>> = JoinSet::new();
    let mut routes = Vec::with_capacity(cfg.workers);
    let acks = Acks {
        producer: producer.clone(),
        metrics: shared.metrics.clone(),
        logs: logs.clone(),
        shutdown: shutdown.clone(),
    };
    for _ in 0..cfg.workers {
        let (events_tx, events_rx) = mpsc::channel(cfg.queue_capacity);
        let (acks_tx, acks_rx) = mpsc::channel(cfg.queue_capacity);
        let (sent_tx, sent_rx) = mpsc::channel(cfg.queue_capacity);
        routes.push(events_tx);
        let worker = Worker {
            engine: engine.clone(),
            // Not yet compared: the first event takes whatever set is installed by then.
            models_generation: 0,
            drift: Default::default(),
            alerts: alerts.clone(),
            kafka: cfg.kafka.clone(),
            brokers: brokers.to_string(),
            producer: producer.clone(),
            shared: shared.clone(),
            changelog: changelog.clone(),
            done_below: HashMap::new(),
            snapshot_due: HashSet::new(),
            transactions: transactions.clone(),
            max_accounts: cfg.max_accounts,
            input_topic: cfg.kafka.transactions_topic.as_str().into(),
            shutdown: shutdown.clone(),
        };
        tasks.spawn(worker.run(events_rx, acks_tx, shutdown.clone()));
        ackers.spawn(send_changes(
            acks_rx,
            sent_tx,
            acks.clone(),
            changelog.clone(),
            shared.status.clone(),
        ));
        ackers.spawn(acknowledge(
            sent_rx,
            acks.clone(),
            consumer.clone(),
            cfg.kafka.transactions_topic.clone(),
            shared.alerts.clone(),
        ));
    }
    let reporter = tokio::spawn(report_state(shared.clone(), shutdown.clone()));
    let committer = transactions.clone().map(|t| {
        tokio::spawn(commit_every_interval(
            t,
            consumer.clone(),
            cfg.kafka.transaction_interval,
            shutdown.clone(),
        ))
    });

    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.status.rewind_requested() => {
                let delay = transactions.as_ref().map_or(Duration::ZERO, |t| t.rewind_delay());
                tokio::time::sleep(delay).await;
                rewind(&consumer, &cfg.kafka.transactions_topic, &shared.status).await;
                continue;
            }
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
                let consumed = Consumed {
                    msg: m.detach(),
                    assignment,
                    at: Instant::now(),
                };
                if routes[route].send(consumed).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                let kind = format!("consumer {:?}", e.rdkafka_error_code());
                if let Some(held_back) = logs.admit(&kind) {
                    tracing::warn!(error.message = %e, held_back, "consumer error");
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
    tracing::info!("workers and ackers stopped");
    reporter.abort();
    if let Some(committer) = committer {
        let _ = committer.await;
    }
    if let Some(t) = transactions {
        let c = consumer.clone();
        let last = tokio::task::spawn_blocking(move || {
            t.commit(c.group_metadata().as_ref(), &c.context().status, || {})
        })
        .await
        .map_err(|e| RunError::Task(e.to_string()));
        match last {
            Ok(Ok(())) => tracing::info!("last transaction committed"),
            Ok(Err(e)) if result.is_ok() => result = Err(e.into()),
            Err(e) if result.is_ok() => result = Err(e),
            _ => {}
        }
    } else {
        match producer.flush(Duration::from_secs(30)) {
            Ok(()) => tracing::info!("producer flushed"),
            Err(e) => tracing::error!(error.message = %e, "producer flush failed"),
        }
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("offsets committed"),
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::error!(error.message = %e, "final commit failed"),
        }
    }
    consumer.unsubscribe();
    // Closing leaves the group (librdkafka waits for the revocation to be served).
    drop(consumer);
    tracing::info!("stream processor stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_away_is_told_from_a_request_that_is_wrong() {
        for code in [
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::OperationTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
        ] {
            assert!(
                broker_unavailable(&KafkaError::MetadataFetch(code)),
                "{code:?}"
            );
        }
        for code in [
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            assert!(
                !broker_unavailable(&KafkaError::MetadataFetch(code)),
                "{code:?}"
            );
        }
    }
}
