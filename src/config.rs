//! Configuration: `config.yml` plus `VIGIL_*` environment overrides, parsed into a raw type and
//! validated once into [`Config`], which is what every other stage takes.
//!
//! Precedence, lowest first: built-in defaults, the YAML file, environment variables. A variable
//! names a key path with `__` between levels: `VIGIL_KAFKA__BROKERS=host:9092` sets
//! `kafka.brokers`. Unknown keys and impossible values stop start-up with a message naming the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Yaml};
use serde::{Deserialize, Serialize};

pub use crate::exactly_once::Guarantee;
use crate::features::{CATEGORICAL_FEATURES, NUMERIC_FEATURES};
pub use crate::pipeline::EventTimeLimits;
pub use crate::registry::RegistryConfig;
pub use crate::server::{AccessSettings, Auth, RateLimit, ServerSettings};
pub use crate::triage::TriageSettings;

/// Errors found while loading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration: {0}")]
    Parse(String),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The configuration exactly as written; see `config.yml` for every key and its meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub kafka: RawKafka,
    pub encoding: Encoding,
    pub schema_registry: RawSchemaRegistry,
    pub pipeline: RawPipeline,
    pub features: RawFeatures,
    pub models: RawModels,
    pub consensus: RawConsensus,
    pub alerts: RawAlerts,
    pub server: RawServer,
    pub log: RawLog,
    pub traces: RawTraces,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawKafka {
    pub brokers: String,
    pub group_id: String,
    pub topics: RawTopics,
    pub client: BTreeMap<String, String>,
    pub restore_state: bool,
    pub changelog: bool,
    pub guarantee: Guarantee,
    pub transaction_interval_ms: u64,
    pub broker_timeout_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTopics {
    pub transactions: String,
    pub alerts: String,
    pub dead_letter: String,
    pub changelog: String,
    pub feedback: String,
    pub shadow: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSchemaRegistry {
    pub url: String,
    pub username: String,
    pub password: String,
    pub ca_location: String,
    pub timeout_seconds: f64,
}

impl Default for RawSchemaRegistry {
    fn default() -> Self {
        Self {
            url: String::new(),
            username: String::new(),
            password: String::new(),
            ca_location: String::new(),
            timeout_seconds: 10.0,
        }
    }
}

impl RawSchemaRegistry {
    fn validate(&self) -> Result<Option<RegistryConfig>, ConfigError> {
        let url = self.url.trim();
        if url.is_empty() {
            return Ok(None);
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                "schema_registry.url",
                format!("`{url}` is not an http(s) URL (e.g. http://schema-registry:8081)"),
            ));
        }
        if !(self.timeout_seconds > 0.0 && self.timeout_seconds <= 300.0) {
            return Err(invalid(
                "schema_registry.timeout_seconds",
                format!("{} is outside (0, 300]", self.timeout_seconds),
            ));
        }
        let given = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        Ok(Some(RegistryConfig {
            url: url.to_string(),
            username: given(&self.username),
            password: given(&self.password),
            ca_location: given(&self.ca_location).map(PathBuf::from),
            timeout: std::time::Duration::from_secs_f64(self.timeout_seconds),
        }))
    }
}

/// Wire encoding of transaction events on the input topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Json,
    Avro,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPipeline {
    pub workers: usize,
    pub queue_capacity: usize,
    pub max_event_time_ahead_hours: f64,
    pub max_accounts: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFeatures {
    pub window: usize,
    pub state_ttl_days: f64,
    pub frequency_slots: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawModels {
    pub dir: PathBuf,
    pub challenger_dir: PathBuf,
    pub target_alert_rate: f64,
    pub cleaning_passes: usize,
    pub max_training_events: usize,
    pub isolation_forest: RawForest,
    pub lof: RawLof,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawForest {
    pub numeric: Vec<String>,
    pub categorical: Vec<String>,
    pub trees: usize,
    pub samples: usize,
    pub extension_level: usize,
    pub contamination: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLof {
    pub numeric: Vec<String>,
    pub categorical: Vec<String>,
    pub neighbors: usize,
    pub contamination: f64,
    pub index: LofIndexKind,
    pub reference_rows: usize,
}

/// How LOF finds nearest neighbours; all give identical scores. `auto` chooses as
/// scikit-learn's `NearestNeighbors(algorithm="auto")`: brute force above 15 dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LofIndexKind {
    Auto,
    Kdtree,
    Brute,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConsensus {
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAlerts {
    pub top_features: usize,
    pub encoding: Encoding,
    pub index_window_days: f64,
    pub index_memory_mb: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub addr: String,
    pub request_timeout_seconds: f64,
    pub rate_limit: RawRateLimit,
    pub auth: RawAuth,
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    pub kind: String,
    pub username: String,
    pub password: String,
    pub token: String,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        Self {
            per_second: 50.0,
            burst: 100,
        }
    }
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            kind: "none".into(),
            username: String::new(),
            password: String::new(),
            token: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: LogFormat,
    pub filter: String,
    pub file: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTraces {
    pub otlp_endpoint: String,
    pub sample_ratio: f64,
    pub service_name: String,
}

/// Log line format on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// LOF's numeric features by default: the account-relative ones (amount, session length, login
/// attempts and hour against the account's habit, velocity, never-seen values, history length)
/// with the population-level amount, share of the balance, session length, login attempts and
/// gap since the previous event. No calendar feature with a period longer than a day: a model
/// trained on a few weeks has not seen most days of the month, nor any other month. Nor the
/// population's time of day (`hour_sin`, `hour_cos`): a day account's 3 am payment lies among
/// the night owls' events there, and `hour_rarity` says what is unusual about it.
pub const LOF_NUMERIC: [&str; 18] = [
    "amount_log",
    "amount_to_balance",
    "amount_vs_habit",
    "duration_log",
    "duration_vs_habit",
    "LoginAttempts",
    "login_vs_habit",
    "hour_rarity",
    "log_seconds_since_last",
    "events_last_10m",
    "events_last_1h",
    "events_last_24h",
    "new_device",
    "new_ip",
    "new_location",
    "new_merchant",
    "new_at_once",
    "history",
];

/// LOF's categorical features by default. `CustomerOccupation` is left out: it describes the
/// customer, not the transaction, and cannot make one event unusual.
pub const LOF_CATEGORICAL: [&str; 2] = ["TransactionType", "Channel"];

/// The forest's features by default: one account-relative signal per kind of fraud evidence,
/// each near 0 for nearly every legitimate event and large only in the direction a fraud moves
/// it. A hyperplane split mixes a few features at once, so a feature that merely varies among
/// normal events takes weight from those that isolate a fraud, and two features of one signal
/// count it twice (a new IP and a new city, which every trip shows together; a burst in the last
/// 10 minutes and in the last hour); LOF, which sees all features at once in a distance, is
/// given the rest.
pub const FOREST_NUMERIC: [&str; 7] = [
    "balance_share",
    "amount_vs_habit",
    "duration_vs_habit",
    "login_vs_habit",
    "hour_rarity",
    "events_last_10m",
    "new_device",
];

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            kafka: RawKafka::default(),
            encoding: Encoding::Json,
            schema_registry: RawSchemaRegistry::default(),
            pipeline: RawPipeline::default(),
            features: RawFeatures::default(),
            models: RawModels::default(),
            consensus: RawConsensus::default(),
            alerts: RawAlerts::default(),
            server: RawServer::default(),
            log: RawLog::default(),
            traces: RawTraces::default(),
        }
    }
}

impl Default for RawKafka {
    fn default() -> Self {
        Self {
            brokers: EMBEDDED.to_string(),
            group_id: "vigil".to_string(),
            topics: RawTopics::default(),
            client: BTreeMap::new(),
            restore_state: true,
            changelog: true,
            guarantee: Guarantee::AtLeastOnce,
            transaction_interval_ms: 100,
            broker_timeout_seconds: 15.0,
        }
    }
}

impl Default for RawTopics {
    fn default() -> Self {
        Self {
            transactions: "transactions".to_string(),
            alerts: "alerts".to_string(),
            dead_letter: "transactions.dead-letter".to_string(),
            changelog: String::new(),
            feedback: "alerts.feedback".to_string(),
            shadow: "alerts.shadow".to_string(),
        }
    }
}

impl Default for RawPipeline {
    fn default() -> Self {
        Self {
            workers: 2,
            queue_capacity: 1024,
            max_event_time_ahead_hours: 24.0,
            max_accounts: 0,
        }
    }
}

impl Default for RawFeatures {
    fn default() -> Self {
        Self {
            window: 2,
            state_ttl_days: 400.0,
            frequency_slots: 8,
        }
    }
}

impl Default for RawModels {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("models/current"),
            challenger_dir: PathBuf::new(),
            target_alert_rate: 0.0,
            cleaning_passes: 2,
            max_training_events: 50_000,
            isolation_forest: RawForest::default(),
            lof: RawLof::default(),
        }
    }
}

impl Default for RawForest {
    fn default() -> Self {
        Self {
            numeric: strings(&FOREST_NUMERIC),
            categorical: Vec::new(),
            trees: 100,
            samples: 256,
            extension_level: 3,
            contamination: 0.05,
            seed: 42,
        }
    }
}

impl Default for RawLof {
    fn default() -> Self {
        Self {
            numeric: strings(&LOF_NUMERIC),
            categorical: strings(&LOF_CATEGORICAL),
            neighbors: 35,
            contamination: 0.05,
            index: LofIndexKind::Auto,
            // Every kept row, as scikit-learn: a sample costs recall (docs/benchmarks.md).
            reference_rows: 0,
        }
    }
}

impl Default for RawConsensus {
    fn default() -> Self {
        Self {
            policy: "all".to_string(),
        }
    }
}

impl Default for RawAlerts {
    fn default() -> Self {
        Self {
            top_features: 3,
            encoding: Encoding::Json,
            index_window_days: 30.0,
            index_memory_mb: 64,
        }
    }
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".to_string(),
            request_timeout_seconds: crate::server::DEFAULT_REQUEST_TIMEOUT.as_secs_f64(),
            rate_limit: RawRateLimit::default(),
            auth: RawAuth::default(),
            trusted_proxies: Vec::new(),
        }
    }
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            filter: "info".to_string(),
            file: String::new(),
        }
    }
}

impl Default for RawTraces {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sample_ratio: 0.1,
            service_name: "vigil".to_string(),
        }
    }
}

/// `kafka.brokers` value that starts an in-process Kafka-protocol cluster (demo only).
pub const EMBEDDED: &str = "embedded";

/// Which models must flag an event for it to become an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Every model flags it (the default: fewer, surer alerts).
    All,
    /// At least one model flags it.
    Any,
    /// Only the isolation forest decides.
    IsolationForest,
    /// Only LOF decides.
    Lof,
}

impl Policy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "all" => Some(Self::All),
            "any" => Some(Self::Any),
            "isolation_forest" => Some(Self::IsolationForest),
            "lof" => Some(Self::Lof),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Any => "any",
            Self::IsolationForest => "isolation_forest",
            Self::Lof => "lof",
        }
    }
}

/// Checked configuration. Every field here has passed validation.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub encoding: Encoding,
    /// Where Avro writer schemas are looked up by id and the alert schema is registered.
    pub schema_registry: Option<RegistryConfig>,
    pub workers: usize,
    pub queue_capacity: usize,
    /// At most this many accounts in memory, over every partition this instance owns (each
    /// gets an equal share, [`crate::state::PartitionState::limit_accounts`]); `None`: no limit.
    pub max_accounts: Option<usize>,
    pub event_time: EventTimeLimits,
    pub features: FeatureConfig,
    pub models: ModelConfig,
    pub policy: Policy,
    pub top_features: usize,
    pub alert_encoding: Encoding,
    pub triage: TriageSettings,
    pub server: ServerSettings,
    pub log_format: LogFormat,
    pub log_filter: String,
    /// Also write JSON log lines to this file (appended; rotate it with copytruncate).
    pub log_file: Option<PathBuf>,
    pub traces: TraceConfig,
}

/// OpenTelemetry export of per-event spans; `endpoint: None` turns it off.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// OTLP/HTTP traces URL (`…/v1/traces`).
    pub endpoint: Option<String>,
    pub sample_ratio: f64,
    pub service_name: String,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `None` means the embedded in-process cluster.
    pub brokers: Option<String>,
    pub group_id: String,
    pub transactions_topic: String,
    pub alerts_topic: String,
    /// Where a challenger's alerts go while it scores in shadow.
    pub shadow_topic: String,
    pub dead_letter_topic: String,
    pub client: BTreeMap<String, String>,
    pub restore_state: bool,
    /// The compacted topic of per-account state (`None`: state is rebuilt from the input topic
    /// alone, or not at all without `restore_state`).
    pub changelog_topic: Option<String>,
    pub guarantee: Guarantee,
    /// Exactly-once mode: how often the open transaction is committed.
    pub transaction_interval: std::time::Duration,
    /// `/ready` turns false when no broker has answered for this long.
    pub broker_timeout: std::time::Duration,
}

/// Parameters of the per-account state and feature stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FeatureConfig {
    /// Events in the rolling means, the current one included.
    pub window: usize,
    /// An account idle for longer than this (event time) starts afresh.
    pub state_ttl_secs: i64,
    /// Slots of each frequent-value sketch (IP, location, device, merchant).
    pub frequency_slots: usize,
}

impl Default for TriageSettings {
    fn default() -> Self {
        Self {
            window: std::time::Duration::from_secs_f64(
                RawAlerts::default().index_window_days * 86_400.0,
            ),
            feedback_topic: RawTopics::default().feedback,
            index_memory_bytes: u64::from(RawAlerts::default().index_memory_mb) << 20,
        }
    }
}

impl Default for FeatureConfig {
    fn default() -> Self {
        let raw = RawFeatures::default();
        Self {
            window: raw.window,
            state_ttl_secs: (raw.state_ttl_days * 86_400.0) as i64,
            frequency_slots: raw.frequency_slots,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub dir: PathBuf,
    /// A second artifact that scores every event in shadow (its alerts go to
    /// `kafka.topics.shadow`) until it is promoted; `None`: no challenger.
    pub challenger_dir: Option<PathBuf>,
    pub forest_features: FeatureLists,
    pub lof_features: FeatureLists,
    /// When above 0, both thresholds sit at the same training quantile, chosen so that the
    /// consensus policy alerts on this share of the training events (contamination is unused).
    pub target_alert_rate: f64,
    /// Refits after removing the training events either model flagged (0: fit once).
    pub cleaning_passes: usize,
    /// Histories up to this many valid events are trained on whole, in event-time order; a
    /// longer one streams through the per-account state in the order it is read (as the live
    /// stream would see it) and a uniform sample of this many events is fitted.
    pub max_training_events: usize,
    pub forest: ForestParams,
    pub lof: LofParams,
}

/// The features one model is given, by name (see [`crate::features::FEATURES`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureLists {
    pub numeric: Vec<String>,
    pub categorical: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ForestParams {
    pub trees: usize,
    pub samples: usize,
    pub extension_level: usize,
    pub contamination: f64,
    /// Seed of the trees' sampling and splits: the same rows, parameters and seed give the same
    /// forest.
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LofParams {
    pub neighbors: usize,
    pub contamination: f64,
    pub index: LofIndexKind,
    /// At most this many training rows (a seeded uniform sample of those kept) make up LOF's
    /// reference set, which every event is compared with: its cost per event grows with it.
    /// 0: all of them (and in models trained before this setting existed).
    #[serde(default)]
    pub reference_rows: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        // The defaults are valid by construction; `validate_models` is the single source of the checks.
        validate_models(&RawModels::default()).unwrap_or_else(|e| unreachable!("{e}"))
    }
}

/// Upper bound on model input width; the isolation forest is compiled for each width up to it.
pub const MAX_MODEL_DIMS: usize = 48;

impl Config {
    /// Loads defaults, then `path` if given (it must exist), then `VIGIL_*` variables.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
        if let Some(path) = path {
            if let Err(source) = std::fs::metadata(path) {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
            figment = figment.merge(Yaml::file(path));
        }
        figment = figment.merge(env_overrides());
        let mut raw: RawConfig = figment
            .extract()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        raw.kafka
            .client
            .extend(client_env_overrides(std::env::vars()));
        raw.validate()
    }

    /// Parses a YAML document (no environment), for tests and tools.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Yaml::string(text))
            .extract()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        raw.validate()
    }
}

/// Top-level sections of the configuration, the only `VIGIL_*` variables read as keys (others,
/// such as `VIGIL_CONFIG`, belong to the command line or to tools).
const SECTIONS: [&str; 11] = [
    "kafka",
    "encoding",
    "schema_registry",
    "pipeline",
    "features",
    "models",
    "consensus",
    "alerts",
    "server",
    "log",
    "traces",
];

fn env_overrides() -> Env {
    Env::prefixed("VIGIL_")
        .filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            let first = key.split("__").next().unwrap_or("");
            SECTIONS.contains(&first) && !key.starts_with(CLIENT_ENV_PREFIX)
        })
        .split("__")
}

/// `VIGIL_KAFKA__CLIENT__<NAME>` sets the librdkafka property `<name>` with `_` read as `.`
/// (`VIGIL_KAFKA__CLIENT__SASL_PASSWORD` is `sasl.password`; no librdkafka property has an
/// underscore), so that credentials can come from a secret in the environment. A generic
/// `__` split would nest at each dot of the name.
const CLIENT_ENV_PREFIX: &str = "kafka__client__";

fn client_env_overrides(
    vars: impl Iterator<Item = (String, String)>,
) -> impl Iterator<Item = (String, String)> {
    vars.filter_map(|(key, value)| {
        let key = key.to_ascii_lowercase();
        let name = key
            .strip_prefix("vigil_")?
            .strip_prefix(CLIENT_ENV_PREFIX)?;
        (!name.is_empty()).then(|| (name.replace('_', "."), value))
    })
}

fn check_topic(key: &'static str, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(invalid(
            key,
            format!("`{name}` is not a valid Kafka topic name (1-249 of [a-zA-Z0-9._-])"),
        ))
    }
}

fn check_contamination(key: &'static str, c: f64) -> Result<f64, ConfigError> {
    if c > 0.0 && c <= 0.5 {
        Ok(c)
    } else {
        Err(invalid(key, format!("{c} is outside (0, 0.5]")))
    }
}

fn validate_lists(
    section: &'static str,
    numeric: &[String],
    categorical: &[String],
) -> Result<FeatureLists, ConfigError> {
    let (numeric_key, categorical_key) = match section {
        "isolation_forest" => (
            "models.isolation_forest.numeric",
            "models.isolation_forest.categorical",
        ),
        _ => ("models.lof.numeric", "models.lof.categorical"),
    };
    for name in categorical {
        if !CATEGORICAL_FEATURES.contains(&name.as_str()) {
            return Err(invalid(
                categorical_key,
                format!(
                    "unknown feature `{name}`; known: {}",
                    CATEGORICAL_FEATURES.join(", ")
                ),
            ));
        }
    }
    for name in numeric {
        if !NUMERIC_FEATURES.contains(&name.as_str()) {
            return Err(invalid(
                numeric_key,
                format!(
                    "unknown feature `{name}`; known: {}",
                    NUMERIC_FEATURES.join(", ")
                ),
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = numeric
        .iter()
        .chain(categorical)
        .find(|n| !seen.insert(n.as_str()))
    {
        return Err(invalid(
            numeric_key,
            format!("feature `{dup}` is listed twice"),
        ));
    }
    let dims = numeric.len() + categorical.len();
    if dims == 0 {
        return Err(invalid(numeric_key, "no model features are configured"));
    }
    if dims > MAX_MODEL_DIMS {
        return Err(invalid(
            numeric_key,
            format!("{dims} model features; at most {MAX_MODEL_DIMS} are supported"),
        ));
    }
    Ok(FeatureLists {
        numeric: numeric.to_vec(),
        categorical: categorical.to_vec(),
    })
}

fn validate_models(m: &RawModels) -> Result<ModelConfig, ConfigError> {
    let forest_features = validate_lists(
        "isolation_forest",
        &m.isolation_forest.numeric,
        &m.isolation_forest.categorical,
    )?;
    let lof_features = validate_lists("lof", &m.lof.numeric, &m.lof.categorical)?;
    let forest_dims = forest_features.numeric.len() + forest_features.categorical.len();
    let f = &m.isolation_forest;
    if f.trees == 0 || f.trees > 10_000 {
        return Err(invalid(
            "models.isolation_forest.trees",
            format!("{} is outside 1..=10000", f.trees),
        ));
    }
    if f.samples < 2 || f.samples > 1_000_000 {
        return Err(invalid(
            "models.isolation_forest.samples",
            format!("{} is outside 2..=1000000", f.samples),
        ));
    }
    if f.extension_level >= forest_dims {
        return Err(invalid(
            "models.isolation_forest.extension_level",
            format!(
                "{} must be below the number of forest features ({forest_dims})",
                f.extension_level
            ),
        ));
    }
    let l = &m.lof;
    if l.reference_rows != 0 && l.reference_rows <= l.neighbors {
        return Err(invalid(
            "models.lof.reference_rows",
            format!(
                "{} must be above models.lof.neighbors ({}), or 0 for every training row",
                l.reference_rows, l.neighbors
            ),
        ));
    }
    if l.neighbors == 0 || l.neighbors > 1000 {
        return Err(invalid(
            "models.lof.neighbors",
            format!("{} is outside 1..=1000", l.neighbors),
        ));
    }
    let challenger_dir =
        (!m.challenger_dir.as_os_str().is_empty()).then(|| m.challenger_dir.clone());
    if challenger_dir.as_ref() == Some(&m.dir) {
        return Err(invalid(
            "models.challenger_dir",
            "is models.dir: a challenger is another version, in a directory of its own",
        ));
    }
    Ok(ModelConfig {
        dir: m.dir.clone(),
        challenger_dir,
        forest_features,
        lof_features,
        cleaning_passes: if m.cleaning_passes > 5 {
            return Err(invalid(
                "models.cleaning_passes",
                format!("{} is outside 0..=5", m.cleaning_passes),
            ));
        } else {
            m.cleaning_passes
        },
        max_training_events: if m.max_training_events < 1_000 {
            return Err(invalid(
                "models.max_training_events",
                format!("{} is below 1,000", m.max_training_events),
            ));
        } else {
            m.max_training_events
        },
        target_alert_rate: if m.target_alert_rate == 0.0 {
            0.0
        } else {
            check_contamination("models.target_alert_rate", m.target_alert_rate)?
        },
        forest: ForestParams {
            trees: f.trees,
            samples: f.samples,
            extension_level: f.extension_level,
            contamination: check_contamination(
                "models.isolation_forest.contamination",
                f.contamination,
            )?,
            seed: f.seed,
        },
        lof: LofParams {
            neighbors: l.neighbors,
            contamination: check_contamination("models.lof.contamination", l.contamination)?,
            index: l.index,
            reference_rows: l.reference_rows,
        },
    })
}

impl RawConfig {
    /// Checks every value once; the result is what the rest of vigil uses.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let k = &self.kafka;
        let brokers = match k.brokers.trim() {
            "" => {
                return Err(invalid(
                    "kafka.brokers",
                    "is empty; use `embedded` or host:port",
                ));
            }
            EMBEDDED => None,
            list => Some(list.to_string()),
        };
        if k.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id", "is empty"));
        }
        let transactions = check_topic("kafka.topics.transactions", &k.topics.transactions)?;
        let alerts = check_topic("kafka.topics.alerts", &k.topics.alerts)?;
        let dead_letter = check_topic("kafka.topics.dead_letter", &k.topics.dead_letter)?;
        let changelog = match k.topics.changelog.trim() {
            "" => format!("{}-state-changelog", k.group_id.trim()),
            name => name.to_string(),
        };
        let changelog = check_topic("kafka.topics.changelog", &changelog)?;
        let feedback = check_topic("kafka.topics.feedback", &k.topics.feedback)?;
        let shadow = check_topic("kafka.topics.shadow", &k.topics.shadow)?;
        let names = [
            &transactions,
            &alerts,
            &dead_letter,
            &changelog,
            &feedback,
            &shadow,
        ];
        if names
            .iter()
            .enumerate()
            .any(|(i, a)| names[..i].contains(a))
        {
            return Err(invalid(
                "kafka.topics",
                "transactions, alerts, dead_letter, changelog, feedback and shadow must be different topics",
            ));
        }
        for reserved in ["enable.auto.offset.store", "group.id", "bootstrap.servers"] {
            if k.client.contains_key(reserved) {
                return Err(invalid(
                    "kafka.client",
                    format!("`{reserved}` is set by vigil itself and cannot be overridden"),
                ));
            }
        }
        if !(10..=60_000).contains(&k.transaction_interval_ms) {
            return Err(invalid(
                "kafka.transaction_interval_ms",
                format!("{} is outside 10..=60000", k.transaction_interval_ms),
            ));
        }
        let timeout = k.broker_timeout_seconds;
        if !(timeout.is_finite() && (3.0..=3_600.0).contains(&timeout)) {
            return Err(invalid(
                "kafka.broker_timeout_seconds",
                format!("{timeout} is outside 3..=3600 (statistics arrive every second)"),
            ));
        }
        if self.pipeline.workers == 0 || self.pipeline.workers > 256 {
            return Err(invalid(
                "pipeline.workers",
                format!("{} is outside 1..=256", self.pipeline.workers),
            ));
        }
        if self.pipeline.queue_capacity == 0 {
            return Err(invalid("pipeline.queue_capacity", "must be at least 1"));
        }
        let ahead = self.pipeline.max_event_time_ahead_hours;
        if !(ahead.is_finite() && (0.0..=8_760.0).contains(&ahead)) {
            return Err(invalid(
                "pipeline.max_event_time_ahead_hours",
                format!("{ahead} is outside 0..=8760"),
            ));
        }
        let f = &self.features;
        if f.window == 0 || f.window > 64 {
            return Err(invalid(
                "features.window",
                format!("{} is outside 1..=64", f.window),
            ));
        }
        if !(f.state_ttl_days.is_finite() && f.state_ttl_days > 0.0 && f.state_ttl_days <= 36_500.0)
        {
            return Err(invalid(
                "features.state_ttl_days",
                format!("{} is outside (0, 36500]", f.state_ttl_days),
            ));
        }
        if f.frequency_slots == 0 || f.frequency_slots > 64 {
            return Err(invalid(
                "features.frequency_slots",
                format!("{} is outside 1..=64", f.frequency_slots),
            ));
        }
        let models = validate_models(&self.models)?;
        let policy = Policy::parse(&self.consensus.policy).ok_or_else(|| {
            invalid(
                "consensus.policy",
                format!(
                    "`{}` is not one of all, any, isolation_forest, lof",
                    self.consensus.policy
                ),
            )
        })?;
        let window_days = self.alerts.index_window_days;
        if !(window_days > 0.0 && window_days <= 3_650.0) {
            return Err(invalid(
                "alerts.index_window_days",
                format!("{window_days} is outside (0, 3650]"),
            ));
        }
        if !(1..=65_536).contains(&self.alerts.index_memory_mb) {
            return Err(invalid(
                "alerts.index_memory_mb",
                format!("{} is outside 1..=65536", self.alerts.index_memory_mb),
            ));
        }
        if self.alerts.top_features > 32 {
            return Err(invalid(
                "alerts.top_features",
                format!("{} is outside 0..=32", self.alerts.top_features),
            ));
        }
        let server_addr = self.server.addr.parse().map_err(|e| {
            invalid(
                "server.addr",
                format!("`{}` is not ip:port ({e})", self.server.addr),
            )
        })?;
        let traces = self.traces.validate()?;
        let schema_registry = self.schema_registry.validate()?;
        let rl = &self.server.rate_limit;
        if !(rl.per_second >= 0.0 && rl.per_second.is_finite()) {
            return Err(invalid(
                "server.rate_limit.per_second",
                format!(
                    "{} is not a number of requests per second (0 = no limit)",
                    rl.per_second
                ),
            ));
        }
        if rl.per_second > 0.0 && rl.burst == 0 {
            return Err(invalid("server.rate_limit.burst", "must be at least 1"));
        }
        let trusted_proxies = self
            .server
            .trusted_proxies
            .iter()
            .map(|p| {
                let p = p.trim();
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        invalid(
                            "server.trusted_proxies",
                            format!("`{p}` is not an address or a network (10.0.0.0/8)"),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let timeout = self.server.request_timeout_seconds;
        if !(timeout > 0.0 && timeout.is_finite()) {
            return Err(invalid(
                "server.request_timeout_seconds",
                format!("{timeout} is not a number of seconds above 0"),
            ));
        }
        let a = &self.server.auth;
        let auth = match a.kind.as_str() {
            "none" => Auth::None,
            "basic" if !a.username.is_empty() && !a.password.is_empty() => Auth::Basic {
                username: a.username.clone(),
                password: a.password.clone(),
            },
            "basic" => {
                return Err(invalid(
                    "server.auth",
                    "basic needs username and password (e.g. VIGIL_SERVER__AUTH__PASSWORD)",
                ));
            }
            "bearer" if a.token.len() >= 16 => Auth::Bearer {
                token: a.token.clone(),
            },
            "bearer" => {
                return Err(invalid(
                    "server.auth.token",
                    "bearer needs a token of at least 16 characters (e.g. VIGIL_SERVER__AUTH__TOKEN)",
                ));
            }
            other => {
                return Err(invalid(
                    "server.auth.kind",
                    format!("`{other}` is not one of none, basic, bearer"),
                ));
            }
        };
        Ok(Config {
            kafka: KafkaConfig {
                brokers,
                group_id: k.group_id.clone(),
                transactions_topic: transactions,
                alerts_topic: alerts,
                shadow_topic: shadow,
                dead_letter_topic: dead_letter,
                client: k.client.clone(),
                restore_state: k.restore_state,
                changelog_topic: (k.restore_state && k.changelog).then_some(changelog),
                guarantee: k.guarantee,
                transaction_interval: std::time::Duration::from_millis(k.transaction_interval_ms),
                broker_timeout: std::time::Duration::from_secs_f64(k.broker_timeout_seconds),
            },
            encoding: self.encoding,
            schema_registry,
            workers: self.pipeline.workers,
            queue_capacity: self.pipeline.queue_capacity,
            max_accounts: (self.pipeline.max_accounts > 0).then_some(self.pipeline.max_accounts),
            event_time: EventTimeLimits {
                max_ahead_secs: (ahead * 3_600.0) as i64,
            },
            features: FeatureConfig {
                window: f.window,
                state_ttl_secs: (f.state_ttl_days * 86_400.0) as i64,
                frequency_slots: f.frequency_slots,
            },
            models,
            policy,
            top_features: self.alerts.top_features,
            alert_encoding: self.alerts.encoding,
            triage: TriageSettings {
                window: std::time::Duration::from_secs_f64(window_days * 86_400.0),
                feedback_topic: feedback,
                index_memory_bytes: u64::from(self.alerts.index_memory_mb) << 20,
            },
            server: ServerSettings {
                addr: server_addr,
                access: AccessSettings {
                    auth,
                    rate_limit: RateLimit {
                        per_second: rl.per_second,
                        burst: rl.burst,
                    },
                    trusted_proxies,
                },
                request_timeout: std::time::Duration::from_secs_f64(timeout),
            },
            log_format: self.log.format,
            log_filter: self.log.filter.clone(),
            log_file: (!self.log.file.trim().is_empty())
                .then(|| PathBuf::from(self.log.file.trim())),
            traces,
        })
    }
}

impl RawTraces {
    fn validate(&self) -> Result<TraceConfig, ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid(
                "traces.sample_ratio",
                format!("{} is outside 0..=1", self.sample_ratio),
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err(invalid("traces.service_name", "must not be empty"));
        }
        let base = self.otlp_endpoint.trim().trim_end_matches('/');
        let endpoint = if base.is_empty() {
            None
        } else if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(invalid(
                "traces.otlp_endpoint",
                format!(
                    "`{base}` is not an http(s) URL (OTLP over HTTP, e.g. http://collector:4318)"
                ),
            ));
        } else if base.ends_with("/v1/traces") {
            Some(base.to_string())
        } else {
            Some(format!("{base}/v1/traces"))
        };
        Ok(TraceConfig {
            endpoint,
            sample_ratio: self.sample_ratio,
            service_name: self.service_name.trim().to_string(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment's own error type
mod tests {
    use super::*;

    #[test]
    fn librdkafka_properties_come_from_the_environment_with_underscores_read_as_dots() {
        let vars = [
            ("VIGIL_KAFKA__CLIENT__SASL_PASSWORD", "s3cret"),
            ("VIGIL_KAFKA__CLIENT__SECURITY_PROTOCOL", "SASL_SSL"),
            ("VIGIL_KAFKA__CLIENT__", "ignored"),
            ("VIGIL_KAFKA__BROKERS", "not a client property"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let got: BTreeMap<String, String> = client_env_overrides(vars.into_iter()).collect();
        assert_eq!(
            got,
            BTreeMap::from([
                ("sasl.password".to_string(), "s3cret".to_string()),
                ("security.protocol".to_string(), "SASL_SSL".to_string()),
            ])
        );
    }

    /// README's feature table is `features::FEATURES` with the default models' lists: the
    /// table cannot drift from the code that computes the features.
    #[test]
    fn readme_lists_every_feature_with_its_definition_state_and_default_models() {
        let readme = include_str!("../README.md");
        let mut expected = String::new();
        for f in crate::features::FEATURES {
            let models: Vec<&str> = [("IF", &FOREST_NUMERIC[..]), ("LOF", &LOF_NUMERIC[..])]
                .into_iter()
                .filter(|(_, list)| list.contains(&f.name))
                .map(|(model, _)| model)
                .collect();
            let or_dash = |s: &str| {
                if s.is_empty() {
                    "–".to_string()
                } else {
                    s.to_string()
                }
            };
            expected.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                f.name,
                f.definition,
                or_dash(f.reads),
                or_dash(&models.join(" "))
            ));
        }
        assert!(
            readme.contains(&expected),
            "README's feature table should read:\n{expected}"
        );
    }

    fn yaml_error(text: &str) -> String {
        match Config::from_yaml(text) {
            Ok(_) => panic!("`{text}` was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn shipped_config_yml_equals_the_built_in_defaults() {
        let text = include_str!("../config.yml");
        let from_file: RawConfig = Figment::new()
            .merge(Yaml::string(text))
            .extract()
            .unwrap_or_else(|e| panic!("config.yml: {e}"));
        assert_eq!(from_file, RawConfig::default());
    }

    #[test]
    fn trusted_proxies_are_networks_or_single_addresses() {
        let c = Config::from_yaml("server:\n  trusted_proxies: [10.0.0.0/8, 192.0.2.7, \"::1\"]\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let nets: Vec<String> = c
            .server
            .access
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "::1/128"]);
    }

    #[test]
    fn the_changelog_is_named_after_the_group_and_off_without_restore() {
        let c = Config::from_yaml("kafka:\n  group_id: fraud\n  guarantee: exactly_once\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.kafka.changelog_topic.as_deref(),
            Some("fraud-state-changelog")
        );
        assert_eq!(c.kafka.guarantee, Guarantee::ExactlyOnce);
        let off =
            Config::from_yaml("kafka:\n  restore_state: false\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(off.kafka.changelog_topic, None);
        assert_eq!(off.kafka.guarantee, Guarantee::AtLeastOnce);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let e = yaml_error("kafka:\n  brokerz: x\n");
        assert!(e.contains("brokerz"), "{e}");
    }

    #[test]
    fn impossible_values_name_their_key() {
        for (yaml, key) in [
            ("features:\n  window: 0\n", "features.window"),
            (
                "models:\n  isolation_forest:\n    contamination: 0.9\n",
                "models.isolation_forest.contamination",
            ),
            (
                "models:\n  lof:\n    neighbors: 0\n",
                "models.lof.neighbors",
            ),
            ("consensus:\n  policy: most\n", "consensus.policy"),
            ("server:\n  addr: nowhere\n", "server.addr"),
            (
                "kafka:\n  topics:\n    alerts: transactions\n",
                "kafka.topics",
            ),
            (
                "models:\n  lof:\n    numeric: [Amount]\n",
                "models.lof.numeric",
            ),
            ("kafka:\n  client:\n    group.id: other\n", "kafka.client"),
            ("traces:\n  sample_ratio: 2\n", "traces.sample_ratio"),
            ("server:\n  auth:\n    kind: magic\n", "server.auth.kind"),
            (
                "server:\n  auth:\n    kind: bearer\n    token: short\n",
                "server.auth.token",
            ),
            ("server:\n  auth:\n    kind: basic\n", "server.auth"),
            (
                "server:\n  trusted_proxies: [10.0.0.0/33]\n",
                "server.trusted_proxies",
            ),
            (
                "server:\n  request_timeout_seconds: 0\n",
                "server.request_timeout_seconds",
            ),
            (
                "server:\n  rate_limit:\n    per_second: -1\n",
                "server.rate_limit.per_second",
            ),
            (
                "traces:\n  otlp_endpoint: collector:4318\n",
                "traces.otlp_endpoint",
            ),
            ("kafka:\n  topics:\n    changelog: alerts\n", "kafka.topics"),
            ("kafka:\n  group_id: 'a b'\n", "kafka.topics.changelog"),
            ("kafka:\n  guarantee: twice\n", "guarantee"),
            (
                "kafka:\n  transaction_interval_ms: 5\n",
                "kafka.transaction_interval_ms",
            ),
        ] {
            let e = yaml_error(yaml);
            assert!(e.contains(key), "{yaml} -> {e}");
        }
    }

    #[test]
    fn an_unknown_key_under_a_section_in_the_environment_is_rejected() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("VIGIL_KAFKA__BROKERZ", "x");
            let e = Config::load(None)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("brokerz"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn traces_are_off_by_default_and_the_endpoint_gets_the_traces_path() {
        let c = Config::from_yaml("").map_err(|e| e.to_string());
        assert_eq!(c.map(|c| c.traces.endpoint), Ok(None));
        let c = Config::from_yaml("traces:\n  otlp_endpoint: http://jaeger:4318/\n")
            .map_err(|e| e.to_string());
        assert_eq!(
            c.map(|c| c.traces.endpoint),
            Ok(Some("http://jaeger:4318/v1/traces".to_string()))
        );
    }

    #[test]
    fn environment_overrides_nested_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("VIGIL_KAFKA__BROKERS", "kafka-1:9092");
            jail.set_env("VIGIL_MODELS__LOF__NEIGHBORS", "7");
            jail.set_env("VIGIL_CONFIG", "elsewhere.yml");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.kafka.brokers.as_deref(), Some("kafka-1:9092"));
            assert_eq!(c.models.lof.neighbors, 7);
            Ok(())
        });
    }
}
