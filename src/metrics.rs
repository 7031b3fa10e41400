//! Every Prometheus metric vigil exports, by name, in one place. Dashboards and alert rules
//! refer to these names; `GET /metrics` renders [`Metrics::registry`].

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Handles to all metrics. Cloning is cheap (the handles are reference-counted).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Events read from the input topic (valid or not).
    pub events_consumed: IntCounter,
    /// Events that passed decoding and validation and were scored.
    pub events_scored: IntCounter,
    /// Invalid events, by reason code (see `DecodeError::code`).
    pub events_invalid: IntCounterVec,
    /// Dead-letter records acknowledged by the broker.
    pub dead_letters: IntCounter,
    /// Alerts acknowledged by the broker.
    pub alerts: IntCounter,
    /// Per-model flags, whether or not consensus made an alert.
    pub model_flags: IntCounterVec,
    /// Per-model score distribution.
    pub model_scores: HistogramVec,
    /// CPU time per event from decode to decision.
    pub processing_seconds: Histogram,
    /// Time from consumption to the broker acknowledging the outcome (offset stored).
    pub end_to_end_seconds: Histogram,
    /// Accounts held in memory.
    pub accounts_tracked: IntGauge,
    /// Bytes of per-account state, estimated ([`crate::state::PartitionState::bytes_estimate`]).
    pub state_bytes: IntGauge,
    /// Accounts forgotten to stay within `pipeline.max_accounts`.
    pub state_evicted_accounts: IntCounter,
    /// Partitions currently assigned to this instance.
    pub partitions_assigned: IntGauge,
    /// Events replayed from the input topic to rebuild state after an assignment.
    pub state_restored_events: IntCounter,
    /// Changelog records read to restore state after an assignment.
    pub state_restored_records: IntCounter,
    /// Time to restore one partition's state, by source (`changelog`, `input`).
    pub state_restore_seconds: HistogramVec,
    /// Partitions whose state is being restored now (`/ready` is false meanwhile).
    pub state_restoring: IntGauge,
    /// Changelog records acknowledged by the broker.
    pub changelog_records: IntCounter,
    /// Events delivered again below what the changelog covers: their outcomes were already
    /// published, so they are skipped.
    pub events_already_processed: IntCounter,
    /// Events fetched before their partition was revoked, left to its new owner.
    pub revoked_events_dropped: IntCounter,
    pub transaction_rewinds: IntCounter,
    /// Schema Registry requests that got no answer (each is asked again; the event waits).
    pub schema_registry_failures: IntCounter,
    /// Latest offset whose outcome is stored, per partition.
    pub stored_offset: IntGaugeVec,
    /// Refused deliveries of an outcome (each is sent again until the broker takes it).
    pub publish_failures: IntCounter,
    /// 1 when models are loaded; the gauge's label carries the version.
    pub model_info: IntGaugeVec,
    /// Always 1; the labels say which build this is.
    pub build_info: IntGaugeVec,
    /// 1 while a challenger scores in shadow; the label carries its version.
    pub challenger_info: IntGaugeVec,
    /// Events the champion and the shadow challenger both scored, by how their decisions
    /// compare (`both_alert`, `both_clean`, `champion_only`, `challenger_only`).
    pub shadow_decisions: IntCounterVec,
    /// Shadow alerts acknowledged by the broker.
    pub shadow_alerts: IntCounter,
    /// Model reloads by outcome: `loaded` (a new version serves) or `refused` (the old one
    /// stays).
    pub model_reloads: IntCounterVec,
    /// Per model feature, the population stability index of the latest scored events against
    /// the training data (set at each scrape).
    pub feature_drift: prometheus::GaugeVec,
    /// Unix time the loaded model was trained.
    pub model_created_seconds: IntGauge,
    /// 1 when `/ready` would answer 200.
    pub ready: IntGauge,
    /// High watermark minus committed offset per assigned partition, from librdkafka's
    /// statistics (every `statistics.interval.ms`).
    pub consumer_lag: IntGaugeVec,
    /// HTTP requests by matched route, method and status code.
    pub http_requests: IntCounterVec,
    /// Alerts in this instance's triage index (the window of the alerts topic).
    pub alert_index_size: IntGauge,
    /// Bytes of the triage index (its cache and its temporary file together).
    pub alert_index_bytes: IntGauge,
    /// Verdicts this instance published, by verdict.
    pub verdicts: IntCounterVec,
    /// HTTP request latency by matched route.
    pub http_seconds: HistogramVec,
}

/// Bounds of the consume → acknowledged latency buckets, in seconds: a quarter of a
/// millisecond apart up to 1.5 ms, at most a third apart from there to 20 ms (where a latency
/// objective sits: a percentile read from these buckets is that close), coarser beyond.
const LATENCY_BUCKETS: [f64; 33] = [
    0.000_25, 0.000_5, 0.000_75, 0.001, 0.001_25, 0.001_5, 0.002, 0.002_5, 0.003, 0.004, 0.005,
    0.006, 0.008, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// Buckets for per-event CPU time: 1 µs to about 30 ms.
fn cpu_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1e-6, 2.0, 16).unwrap_or_default()
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("vigil".into()), None)?;
        macro_rules! register {
            ($metric:expr) => {{
                let m = $metric;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        Ok(Self {
            events_consumed: register!(IntCounter::new(
                "events_consumed_total",
                "Events read from the input topic"
            )?),
            events_scored: register!(IntCounter::new(
                "events_scored_total",
                "Valid events scored by the models"
            )?),
            events_invalid: register!(IntCounterVec::new(
                Opts::new(
                    "events_invalid_total",
                    "Invalid events sent to the dead-letter topic"
                ),
                &["reason"]
            )?),
            dead_letters: register!(IntCounter::new(
                "dead_letters_published_total",
                "Dead-letter records acknowledged by the broker"
            )?),
            alerts: register!(IntCounter::new(
                "alerts_published_total",
                "Alerts acknowledged by the broker"
            )?),
            model_flags: register!(IntCounterVec::new(
                Opts::new("model_flags_total", "Events each model flagged"),
                &["model"]
            )?),
            model_scores: register!(HistogramVec::new(
                HistogramOpts::new(
                    "model_score",
                    "Anomaly score per model (higher = more anomalous)"
                )
                .buckets(vec![
                    0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3,
                    1.5, 1.75, 2.0, 2.5, 3.0, 5.0
                ]),
                &["model"]
            )?),
            processing_seconds: register!(Histogram::with_opts(
                HistogramOpts::new(
                    "processing_seconds",
                    "CPU time per event, decode to decision"
                )
                .buckets(cpu_buckets())
            )?),
            end_to_end_seconds: register!(Histogram::with_opts(
                HistogramOpts::new(
                    "end_to_end_seconds",
                    "Time from consuming an event to its outcome being acknowledged"
                )
                .buckets(LATENCY_BUCKETS.to_vec())
            )?),
            accounts_tracked: register!(IntGauge::new(
                "accounts_tracked",
                "Accounts held in memory"
            )?),
            state_bytes: register!(IntGauge::new(
                "state_bytes",
                "Bytes of per-account state (exact up to 4,096 accounts a partition, scaled from a sample of that many above)"
            )?),
            state_evicted_accounts: register!(IntCounter::new(
                "state_evicted_accounts_total",
                "Least recently active accounts forgotten to stay within pipeline.max_accounts"
            )?),
            partitions_assigned: register!(IntGauge::new(
                "partitions_assigned",
                "Input partitions assigned to this instance"
            )?),
            state_restored_events: register!(IntCounter::new(
                "state_restored_events_total",
                "Events replayed from the input topic to rebuild account state"
            )?),
            state_restored_records: register!(IntCounter::new(
                "state_restored_records_total",
                "Changelog records read to restore account state"
            )?),
            state_restore_seconds: register!(HistogramVec::new(
                HistogramOpts::new(
                    "state_restore_seconds",
                    "Time to restore one partition's account state"
                )
                .buckets(prometheus::exponential_buckets(0.01, 2.0, 16).unwrap_or_default()),
                &["source"]
            )?),
            state_restoring: register!(IntGauge::new(
                "state_restoring_partitions",
                "Partitions whose account state is being restored now"
            )?),
            changelog_records: register!(IntCounter::new(
                "changelog_records_total",
                "State changelog records acknowledged by the broker"
            )?),
            events_already_processed: register!(IntCounter::new(
                "events_already_processed_total",
                "Events delivered again that the changelog shows were processed; skipped"
            )?),
            revoked_events_dropped: register!(IntCounter::new(
                "revoked_events_dropped_total",
                "Events fetched before their partition was revoked, left to its new owner"
            )?),
            transaction_rewinds: register!(IntCounter::new(
                "transaction_rewinds_total",
                "Exactly-once: transactions aborted and their partitions rewound to the last commit"
            )?),
            schema_registry_failures: register!(IntCounter::new(
                "schema_registry_failures_total",
                "Schema Registry requests that got no answer (asked again; the event waits)"
            )?),
            stored_offset: register!(IntGaugeVec::new(
                Opts::new(
                    "stored_offset",
                    "Next offset to commit per partition (outcome acknowledged below it)"
                ),
                &["partition"]
            )?),
            publish_failures: register!(IntCounter::new(
                "publish_failures_total",
                "Deliveries of an outcome the broker refused (each is sent again)"
            )?),
            model_info: register!(IntGaugeVec::new(
                Opts::new("model_info", "Loaded model version (value 1)"),
                &["version"]
            )?),
            build_info: register!(IntGaugeVec::new(
                Opts::new(
                    "build_info",
                    "The running build (value 1): version, and the optional Kafka features built in"
                ),
                &["version", "features"]
            )?),
            challenger_info: register!(IntGaugeVec::new(
                Opts::new(
                    "challenger_info",
                    "Version of the challenger scoring in shadow (value 1; absent without one)"
                ),
                &["version"]
            )?),
            shadow_decisions: register!(IntCounterVec::new(
                Opts::new(
                    "shadow_decisions_total",
                    "Events scored by the champion and the shadow challenger, by how their decisions compare"
                ),
                &["agreement"]
            )?),
            shadow_alerts: register!(IntCounter::new(
                "shadow_alerts_published_total",
                "Challenger alerts acknowledged by the broker on the shadow topic"
            )?),
            model_reloads: register!(IntCounterVec::new(
                Opts::new(
                    "model_reloads_total",
                    "Reloads of models.dir that installed a new version (loaded) or kept the serving one (refused)"
                ),
                &["outcome"]
            )?),
            feature_drift: register!(prometheus::GaugeVec::new(
                Opts::new(
                    "feature_drift_psi",
                    "Population stability index of each model feature over the latest 10,000-20,000 scored events against the training data (0.1: moving, 0.25: moved)"
                ),
                &["feature"]
            )?),
            model_created_seconds: register!(IntGauge::new(
                "model_created_timestamp_seconds",
                "Unix time of the newest event the loaded model was trained on"
            )?),
            ready: register!(IntGauge::new(
                "ready",
                "1 when models are loaded and partitions are assigned"
            )?),
            consumer_lag: register!(IntGaugeVec::new(
                Opts::new(
                    "consumer_lag",
                    "Events behind the high watermark per partition (committed offsets)"
                ),
                &["partition"]
            )?),
            alert_index_size: register!(IntGauge::new(
                "alert_index_alerts",
                "Alerts in the triage index: those published within alerts.index_window_days"
            )?),
            alert_index_bytes: register!(IntGauge::new(
                "alert_index_bytes",
                "Bytes of the triage index's tables: at most alerts.index_memory_mb of them in memory, the rest in its temporary file"
            )?),
            verdicts: register!(IntCounterVec::new(
                Opts::new(
                    "verdicts_total",
                    "Analysts' verdicts this instance published to the feedback topic"
                ),
                &["verdict"]
            )?),
            http_requests: register!(IntCounterVec::new(
                Opts::new("http_requests_total", "HTTP requests by route and status"),
                &["route", "method", "status"]
            )?),
            http_seconds: register!(HistogramVec::new(
                HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                    .buckets(prometheus::exponential_buckets(1e-4, 4.0, 10).unwrap_or_default()),
                &["route"]
            )?),
            registry,
        })
        .and_then(Self::with_known_series)
    }

    /// Registers the process collector (memory, CPU, file descriptors) and creates the series
    /// whose label values are known up front at zero, so that `rate()` and alert rules see
    /// them before the first event of their kind.
    fn with_known_series(self) -> Result<Self, prometheus::Error> {
        self.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        for code in crate::decode::DecodeError::CODES {
            self.events_invalid.with_label_values(&[code]);
        }
        for source in ["changelog", "input"] {
            self.state_restore_seconds.with_label_values(&[source]);
        }
        let features = if cfg!(feature = "gssapi") {
            "gssapi"
        } else {
            ""
        };
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), features])
            .set(1);
        for verdict in crate::triage::Verdict::ALL {
            self.verdicts.with_label_values(&[verdict.as_str()]);
        }
        for outcome in ["loaded", "refused"] {
            self.model_reloads.with_label_values(&[outcome]);
        }
        for agreement in crate::pipeline::Agreement::ALL {
            self.shadow_decisions
                .with_label_values(&[agreement.as_str()]);
        }
        for model in [crate::models::ISOLATION_FOREST, crate::models::LOF] {
            self.model_flags.with_label_values(&[model]);
            self.model_scores.with_label_values(&[model]);
        }
        Ok(self)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
