//! vigil: real-time anomaly detection for bank transactions on Kafka.
//!
//! The data path, one module per stage:
//!
//! ```text
//! Kafka ─ingest─▶ decode ─▶ state ─▶ features ─▶ models (IF, LOF) ─▶ consensus ─▶ publish ─▶ alerts
//!                   └─ invalid ──────────────────────────────────────────────────▶ publish ─▶ dead letters
//! ```
//!
//! - [`ingest`]: Kafka client settings, the group consumer (cooperative-sticky), what readiness
//!   needs (partitions owned, a broker answering), throttled librdkafka logs, state restore.
//! - [`decode`]: JSON / Avro bytes to a validated [`decode::Transaction`], or a reason why not;
//!   [`registry`]: the Schema Registry client that gives decode each Avro writer schema by id.
//! - [`state`]: bounded per-account memory, kept per partition.
//! - [`features`]: transaction + earlier state → feature vector (shared by stream and training).
//! - [`models`]: isolation forest and LOF detectors, encoders, thresholds, artifacts.
//! - [`consensus`]: the alert policy over the models' verdicts.
//! - [`publish`]: alert and dead-letter records, delivery, at-least-once offset storing;
//!   [`exactly_once`]: the transactional alternative (outcomes and offsets committed together).
//! - [`changelog`]: the compacted topic of account state that restores a partition in time
//!   bounded by its accounts.
//! - [`pipeline`]: the synchronous per-event path tying decode → consensus together, with the
//!   event-time limits that keep one mis-dated event from moving a partition's clock.
//! - [`run`]: the async wiring (workers, ackers, restores, transactions, shutdown); [`server`]:
//!   the side HTTP server (router and small routes; access control, prediction, alerts and
//!   problem documents in a file each).
//! - [`triage`]: the analysts' side: an index of the window's alerts rebuilt from the alerts
//!   topic, and their verdicts on the compacted feedback topic.
//! - [`train`]: history → models; [`simulate`]: labelled synthetic traffic; [`demo`]: the embedded default.
//! - [`replay`]: backtests over a topic range or a file through the same per-event path;
//!   [`backtest`]: the time split (train on the past, score the future, state warm);
//!   [`report`]: their per-event CSV, JSON and HTML reports and label metrics.
//! - [`config`], [`metrics`] (every metric name), [`telemetry`] (logs).

pub mod backtest;
pub mod changelog;
pub mod config;
pub mod consensus;
pub mod decode;
pub mod demo;
pub mod exactly_once;
pub mod features;
pub mod ingest;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod publish;
pub mod registry;
pub mod replay;
pub mod report;
pub mod run;
pub mod server;
pub mod simulate;
pub mod state;
pub mod telemetry;
pub mod train;
pub mod triage;
