//! Replay (backtests): runs recorded events — a range of a topic, or a CSV / JSON-lines / Avro
//! file — through exactly the live per-event path ([`Engine::process`]: decode, per-account
//! state, features, both models, consensus) with one or more model artifacts, and writes what
//! each model made of each event.
//!
//! A topic is read partition by partition with its own assignment (no consumer group joins,
//! nothing is committed), so the live group is never disturbed. Before the first replayed
//! offset, the partition's earlier events are folded into the state unscored, as a live instance
//! does after a restart; the replay's scores are therefore those the live run gave. Output is a
//! pure function of the input bytes and the artifacts: the same input gives byte-identical files.

use std::collections::BTreeMap;
use std::io::BufRead;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{Encoding, KafkaConfig, Policy};
use crate::decode::{Decoder, format_time};
use crate::ingest::reader_config;
use crate::models::{ModelSet, Scratch};
use crate::pipeline::{Engine, EventTimeLimits, Outcome};
use crate::publish::SourceCoordinates;
use crate::report::{EventRecord, ModelOutcome, Report, ReportBuilder};
use crate::simulate::{LABEL_FIELD, LABEL_HEADER};
use crate::state::PartitionState;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Input {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("`{0}` is not earliest, latest, an offset or an RFC 3339 time")]
    Bound(String),
    #[error("topic {0} has no partition {1}")]
    NoPartition(String, i32),
    #[error("topic {0} does not exist")]
    NoTopic(String),
}

/// One end of a topic range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Earliest,
    Latest,
    Offset(i64),
    /// Milliseconds since the epoch (the broker's record timestamps).
    Time(i64),
}

impl std::str::FromStr for Bound {
    type Err = ReplayError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "earliest" => Ok(Self::Earliest),
            "latest" => Ok(Self::Latest),
            _ => s.parse::<i64>().map(Self::Offset).or_else(|_| {
                chrono::DateTime::parse_from_rfc3339(s)
                    .map(|t| Self::Time(t.timestamp_millis()))
                    .map_err(|_| ReplayError::Bound(s.to_string()))
            }),
        }
    }
}

/// What to replay.
#[derive(Debug, Clone)]
pub enum Input {
    /// `.csv` (the dataset's header), `.jsonl`/`.json` (one event per line) or `.avro` (an
    /// object container file of `schemas/transaction.avsc` records).
    File(PathBuf),
    /// Events already read and marked (a time split: [`crate::backtest`]).
    Recorded {
        name: String,
        events: Vec<Recorded>,
        encoding: Encoding,
    },
    /// Offsets `from` (inclusive) to `to` (exclusive) of each chosen partition (all if empty).
    Topic {
        kafka: Box<KafkaConfig>,
        brokers: String,
        partitions: Vec<i32>,
        from: Bound,
        to: Bound,
    },
}

/// A recorded event: where it came from, its bytes and, if the source carries one, its label.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub label: Option<String>,
    /// The record's timestamp (seconds), for a topic; none for a file.
    pub published_at: Option<i64>,
    /// Folded into the state only (before the range starts); not scored or written.
    pub warm_only: bool,
}

impl Recorded {
    /// The next `count` events of a simulator as a file of them would read: partition 0,
    /// offsets from 0, labelled.
    pub fn simulated(sim: &mut crate::simulate::Simulator, count: usize) -> Vec<Self> {
        (0..count)
            .map(|i| {
                let e = sim.next_event();
                Self {
                    partition: 0,
                    offset: i as i64,
                    payload: e.payload,
                    label: Some(e.label.as_str().to_string()),
                    published_at: None,
                    warm_only: false,
                }
            })
            .collect()
    }
}

/// A model under test: a name for the reports, its engine, and its own per-partition state.
pub struct Candidate {
    pub name: String,
    pub dir: PathBuf,
    engine: Engine,
    states: BTreeMap<i32, PartitionState>,
    scratch: Scratch,
}

impl Candidate {
    pub fn new(
        name: String,
        dir: PathBuf,
        models: ModelSet,
        decoder: Decoder,
        policy: Policy,
        top: usize,
        event_time: EventTimeLimits,
    ) -> Self {
        Self {
            name,
            dir,
            engine: Engine::new(Arc::new(models), decoder, policy, top).with_event_time(event_time),
            states: BTreeMap::new(),
            scratch: Scratch::default(),
        }
    }

    pub fn models(&self) -> &ModelSet {
        &self.engine.models
    }

    pub fn policy(&self) -> Policy {
        self.engine.policy
    }

    fn run(&mut self, topic: &str, e: &Recorded) -> Option<ModelOutcome> {
        let state = self.states.entry(e.partition).or_default();
        if e.warm_only {
            self.engine
                .warm(state, e.offset, e.published_at, &e.payload);
            return None;
        }
        let source = SourceCoordinates {
            topic: topic.into(),
            partition: e.partition,
            offset: e.offset,
            published_at: e.published_at,
        };
        Some(
            match self
                .engine
                .process(state, &source, &e.payload, &mut self.scratch)
            {
                Outcome::Clean(s, tx) => {
                    ModelOutcome::scored(&s.verdicts, self.engine.policy, &tx, None)
                }
                Outcome::Alert(alert, s) => ModelOutcome::scored(
                    &s.verdicts,
                    self.engine.policy,
                    &alert.transaction,
                    Some(&alert),
                ),
                Outcome::Invalid(err) => ModelOutcome::invalid(err.code()),
            },
        )
    }
}

/// Progress on stderr: a bar (with the count known, its share and time left) or a counter, drawn
/// by indicatif on a terminal and drawn not at all elsewhere, where one line at the end says
/// how it went.
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new() -> Self {
        let bar = indicatif::ProgressBar::with_draw_target(
            None,
            indicatif::ProgressDrawTarget::stderr_with_hz(5),
        );
        Self { bar }
    }

    fn tick(&mut self, n: u64, total: Option<u64>) {
        if n == 1 {
            let template = match total {
                Some(t) => {
                    self.bar.set_length(t);
                    "replay [{bar:30}] {percent:>3}% ETA {eta} {human_pos} of {human_len} events"
                }
                None => "replay {spinner} {human_pos} events in {elapsed}",
            };
            // The templates are fixed and parse; were one not to, the default style stays.
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                self.bar.set_style(style.progress_chars("#-"));
            }
        }
        self.bar.set_position(n);
    }

    fn finish(&self, n: u64) {
        let elapsed = self.bar.elapsed().as_secs_f64();
        self.bar.finish_and_clear();
        eprintln!(
            "replay: {n} events in {elapsed:.1} s ({:.0}/s)",
            n as f64 / elapsed.max(1e-9)
        );
    }
}

/// Where replay writes: `events.csv` (one row per event and model), `report.json`,
/// `report.html`; for a time split, what the report says about it.
pub struct Outputs {
    pub dir: PathBuf,
    pub split: Option<crate::report::SplitInfo>,
    /// Label events by analysts' verdicts (the feedback topic, or a file of its records)
    /// instead of their own labels; events without a verdict are then unlabelled.
    pub verdicts: Option<crate::triage::VerdictLabels>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ReplayError + '_ {
    move |source| ReplayError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The label of a record from its `vigil_label` field, or from an `is_fraud` flag (0/1, true/false)
/// with an optional `scenario` naming the pattern, as other labelled streams carry it.
fn label_of(
    vigil_label: Option<&str>,
    is_fraud: Option<&str>,
    scenario: Option<&str>,
) -> Option<String> {
    if let Some(l) = vigil_label {
        return Some(l.to_string());
    }
    let fraud = match is_fraud?.trim().to_ascii_lowercase().as_str() {
        "1" | "1.0" | "true" | "yes" => true,
        "0" | "0.0" | "false" | "no" => false,
        _ => return None,
    };
    Some(
        match (fraud, scenario.map(str::trim).filter(|s| !s.is_empty())) {
            (false, _) => "normal".to_string(),
            (true, Some(s)) => s.to_string(),
            (true, None) => "fraud".to_string(),
        },
    )
}

/// The label a JSON record carries (see [`label_of`]), if any.
fn json_label(payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let text = |k: &str| match v.get(k)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    label_of(
        text(LABEL_FIELD).as_deref(),
        text("is_fraud").as_deref(),
        text("scenario").as_deref(),
    )
}

/// A CSV row of the dataset's layout as the JSON event a producer would have sent: numbers
/// where a column holds a number, strings otherwise.
pub fn csv_row_to_json(headers: &csv::StringRecord, row: &csv::StringRecord) -> Vec<u8> {
    const TEXT: [&str; 9] = [
        "TransactionID",
        "AccountID",
        "TransactionDate",
        "TransactionType",
        "Location",
        "DeviceID",
        "IP Address",
        "MerchantID",
        "PreviousTransactionDate",
    ];
    let mut m = serde_json::Map::new();
    for (h, v) in headers.iter().zip(row.iter()) {
        let value = match v.parse::<f64>() {
            Ok(x) if !TEXT.contains(&h) && h != LABEL_FIELD && x.is_finite() => {
                if v.contains(['.', 'e', 'E']) {
                    serde_json::json!(x)
                } else {
                    v.parse::<i64>()
                        .map(serde_json::Value::from)
                        .unwrap_or(serde_json::json!(x))
                }
            }
            _ => serde_json::Value::String(v.to_string()),
        };
        m.insert(h.to_string(), value);
    }
    serde_json::to_vec(&m).unwrap_or_default()
}

/// Reads a file into recorded events (partition 0, offset = record number from 0): for training
/// and time splits, which need every event; replay streams ([`each_in_file`]).
pub fn read_file(path: &Path) -> Result<(Vec<Recorded>, Encoding), ReplayError> {
    let mut events = Vec::new();
    let encoding = each_in_file(path, |e| {
        events.push(e);
        Ok(())
    })?;
    Ok((events, encoding))
}

/// How the events of a file of this name are encoded.
pub fn file_encoding(path: &Path) -> Encoding {
    match extension(path).as_str() {
        "avro" => Encoding::Avro,
        _ => Encoding::Json,
    }
}

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Calls `f` with each event of a file (partition 0, offset = record number from 0), one at a
/// time: `.csv` with the dataset's header, `.avro` (an object container file), else JSON lines.
/// Memory holds the event in hand, never the file. Returns the events' encoding.
pub fn each_in_file(
    path: &Path,
    mut f: impl FnMut(Recorded) -> Result<(), ReplayError>,
) -> Result<Encoding, ReplayError> {
    let rec = |i: usize, payload: Vec<u8>, label: Option<String>| Recorded {
        partition: 0,
        offset: i as i64,
        payload,
        label,
        published_at: None,
        warm_only: false,
    };
    let bad = |line: usize, reason: String| ReplayError::Input {
        path: path.to_path_buf(),
        line,
        reason,
    };
    match extension(path).as_str() {
        "csv" => {
            let mut reader = csv::Reader::from_path(path).map_err(|e| bad(0, e.to_string()))?;
            let headers = reader
                .headers()
                .cloned()
                .map_err(|e| bad(1, e.to_string()))?;
            let col = |name: &str| headers.iter().position(|h| h == name);
            let (label_col, fraud_col, scenario_col) =
                (col(LABEL_FIELD), col("is_fraud"), col("scenario"));
            for (i, row) in reader.records().enumerate() {
                let row = row.map_err(|e| bad(i + 2, e.to_string()))?;
                let get = |c: Option<usize>| c.and_then(|c| row.get(c));
                let label = label_of(get(label_col), get(fraud_col), get(scenario_col));
                f(rec(i, csv_row_to_json(&headers, &row), label))?;
            }
        }
        "avro" => {
            let file = std::fs::File::open(path).map_err(io_err(path))?;
            let schema = crate::decode::transaction_schema();
            let reader = apache_avro::Reader::with_schema(&schema, std::io::BufReader::new(file))
                .map_err(|e| bad(0, e.to_string()))?;
            for (i, value) in reader.enumerate() {
                let bytes = value
                    .and_then(|v| apache_avro::to_avro_datum(&schema, v))
                    .map_err(|e| bad(i + 1, e.to_string()))?;
                f(rec(i, bytes, None))?;
            }
        }
        _ => {
            let file = std::fs::File::open(path).map_err(io_err(path))?;
            for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
                let mut line = line.map_err(io_err(path))?;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let label = json_label(&line);
                f(rec(i, line, label))?;
            }
        }
    }
    Ok(file_encoding(path))
}

/// The offsets `[start, end)` of a partition that `from`/`to` select.
fn range(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: Bound,
    to: Bound,
) -> Result<(i64, i64, i64), ReplayError> {
    let timeout = Duration::from_secs(10);
    let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
    let resolve = |b: Bound| -> Result<i64, ReplayError> {
        Ok(match b {
            Bound::Earliest => low,
            Bound::Latest => high,
            Bound::Offset(o) => o.clamp(low, high),
            Bound::Time(ms) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(topic, partition, Offset::Offset(ms))?;
                let found = consumer.offsets_for_times(tpl, timeout)?;
                match found.find_partition(topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o.clamp(low, high),
                    _ => high,
                }
            }
        })
    };
    Ok((low, resolve(from)?, resolve(to)?))
}

/// Reads `[low, end)` of one partition; events before `start` are marked warm-only.
/// Calls `f` with each event of one partition from `low` to `end`, those before `start` marked
/// warm-only, one at a time: nothing is held but the event in hand.
fn each_in_partition(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    (low, start, end): (i64, i64, i64),
    f: &mut dyn FnMut(Recorded) -> Result<(), ReplayError>,
) -> Result<(), ReplayError> {
    if end <= start {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let mut next = low;
    while next < end {
        match consumer.poll(Duration::from_secs(30)) {
            Some(Ok(m)) => {
                next = m.offset() + 1;
                if m.offset() >= end {
                    break;
                }
                let label = m.headers().and_then(|h| {
                    h.iter()
                        .find(|x| x.key == LABEL_HEADER)
                        .and_then(|x| x.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                f(Recorded {
                    partition,
                    offset: m.offset(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    label,
                    published_at: crate::ingest::published_at(&m),
                    warm_only: m.offset() < start,
                })?;
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(e.into()),
            None => {
                return Err(KafkaError::Global(
                    rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                )
                .into());
            }
        }
    }
    Ok(())
}

/// `[from, to)` of the chosen partitions (all if empty) of `kafka.transactions_topic`, read
/// partition by partition with the earlier events of each partition marked warm-only.
/// Assign-only: no group is joined, nothing is committed.
pub struct TopicRange {
    consumer: BaseConsumer,
    topic: String,
    /// Per partition: (low watermark, first offset in range, end).
    ranges: Vec<(i32, (i64, i64, i64))>,
}

impl TopicRange {
    pub fn open(
        kafka: &KafkaConfig,
        brokers: &str,
        partitions: &[i32],
        from: Bound,
        to: Bound,
    ) -> Result<Self, ReplayError> {
        let purpose = format!("replay-{}", std::process::id());
        let consumer: BaseConsumer = reader_config(kafka, brokers, &purpose)
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let t = &kafka.transactions_topic;
        let metadata = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
        let all: Vec<i32> = metadata
            .topics()
            .iter()
            .find(|x| x.name() == t)
            .map(|x| x.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        if all.is_empty() {
            return Err(ReplayError::NoTopic(t.clone()));
        }
        let mut chosen = if partitions.is_empty() {
            all.clone()
        } else {
            partitions.to_vec()
        };
        chosen.sort_unstable();
        chosen.dedup();
        let mut ranges = Vec::new();
        for p in chosen {
            if !all.contains(&p) {
                return Err(ReplayError::NoPartition(t.clone(), p));
            }
            ranges.push((p, range(&consumer, t, p, from, to)?));
        }
        Ok(Self {
            consumer,
            topic: t.clone(),
            ranges,
        })
    }

    /// Events in range (the warm-only ones before it not counted).
    pub fn in_range(&self) -> u64 {
        self.ranges
            .iter()
            .map(|(_, (_, s, e))| (e - s).max(0) as u64)
            .sum()
    }

    /// Calls `f` with each event, partition by partition, in offset order.
    pub fn for_each(
        &self,
        mut f: impl FnMut(Recorded) -> Result<(), ReplayError>,
    ) -> Result<(), ReplayError> {
        for &(p, r) in &self.ranges {
            each_in_partition(&self.consumer, &self.topic, p, r, &mut f)?;
        }
        Ok(())
    }
}

/// Replays `input` through every candidate, writes the outputs and returns the report.
pub fn replay(
    input: &Input,
    candidates: &mut [Candidate],
    out: &Outputs,
) -> Result<Report, ReplayError> {
    std::fs::create_dir_all(&out.dir).map_err(io_err(&out.dir))?;
    let csv_path = out.dir.join("events.csv");
    let file = std::fs::File::create(&csv_path).map_err(io_err(&csv_path))?;
    let mut csv = csv::Writer::from_writer(std::io::BufWriter::new(file));
    let csv_err = |e: csv::Error| ReplayError::Io {
        path: csv_path.clone(),
        source: e.into(),
    };
    csv.write_record(EventRecord::CSV_HEADER).map_err(csv_err)?;

    let (source, topic) = match input {
        Input::File(p) => (p.display().to_string(), "file".to_string()),
        Input::Recorded { name, .. } => (name.clone(), "file".to_string()),
        Input::Topic { kafka, .. } => (
            format!("topic {}", kafka.transactions_topic),
            kafka.transactions_topic.clone(),
        ),
    };
    let mut report = ReportBuilder::new(source, candidates);
    let mut progress = Progress::new();
    let mut n = 0u64;
    let mut handle = |e: &Recorded,
                      total: Option<u64>,
                      candidates: &mut [Candidate],
                      report: &mut ReportBuilder|
     -> Result<(), ReplayError> {
        let outcomes: Vec<Option<ModelOutcome>> =
            candidates.iter_mut().map(|c| c.run(&topic, e)).collect();
        if e.warm_only {
            return Ok(());
        }
        let outcomes: Vec<ModelOutcome> = outcomes.into_iter().flatten().collect();
        let mut record = EventRecord::new(e);
        if let Some(verdicts) = &out.verdicts {
            record.label = outcomes
                .first()
                .and_then(|o| verdicts.label_of(&o.transaction_id))
                .map(str::to_string);
        }
        record
            .write_csv(&mut csv, candidates, &outcomes)
            .map_err(csv_err)?;
        report.add(&record, &outcomes);
        n += 1;
        progress.tick(n, total);
        Ok(())
    };
    match input {
        Input::File(path) => {
            // Streamed: memory holds the state and the report, never the file.
            for c in candidates.iter_mut() {
                c.engine.decoder = Decoder::new(file_encoding(path));
            }
            each_in_file(path, |e| handle(&e, None, candidates, &mut report))?;
        }
        Input::Recorded {
            events, encoding, ..
        } => {
            for c in candidates.iter_mut() {
                c.engine.decoder = Decoder::new(*encoding);
            }
            let total = Some(events.iter().filter(|e| !e.warm_only).count() as u64);
            for e in events {
                handle(e, total, candidates, &mut report)?;
            }
        }
        Input::Topic {
            kafka,
            brokers,
            partitions,
            from,
            to,
        } => {
            // Streamed: memory holds the state and the report, never the range.
            let range = TopicRange::open(kafka, brokers, partitions, *from, *to)?;
            let total = Some(range.in_range());
            range.for_each(|e| handle(&e, total, candidates, &mut report))?;
        }
    }
    progress.finish(n);
    csv.flush().map_err(io_err(&csv_path))?;
    let json_path = out.dir.join("report.json");
    let mut built = report.build();
    built.split = out.split.clone();
    std::fs::write(&json_path, crate::report::to_json(&built)).map_err(io_err(&json_path))?;
    let html_path = out.dir.join("report.html");
    std::fs::write(&html_path, crate::report::to_html(&built)).map_err(io_err(&html_path))?;
    Ok(built)
}

/// Event time for reports.
pub fn day_of(time: i64) -> String {
    format_time(time).chars().take(10).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_parse_as_keywords_offsets_or_times() {
        assert_eq!("earliest".parse::<Bound>().ok(), Some(Bound::Earliest));
        assert_eq!("latest".parse::<Bound>().ok(), Some(Bound::Latest));
        assert_eq!("42".parse::<Bound>().ok(), Some(Bound::Offset(42)));
        assert_eq!(
            "2024-01-01T00:00:00Z".parse::<Bound>().ok(),
            Some(Bound::Time(1_704_067_200_000))
        );
        assert!("yesterday".parse::<Bound>().is_err());
    }

    #[test]
    fn a_csv_row_becomes_the_json_event_a_producer_sends() {
        let headers = csv::StringRecord::from(vec![
            "TransactionID",
            "TransactionAmount",
            "CustomerAge",
            "IP Address",
        ]);
        let row = csv::StringRecord::from(vec!["TX1", "14.09", "70", "162.198.218.92"]);
        let v: serde_json::Value =
            serde_json::from_slice(&csv_row_to_json(&headers, &row)).unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({"TransactionID": "TX1", "TransactionAmount": 14.09, "CustomerAge": 70, "IP Address": "162.198.218.92"})
        );
    }

    #[test]
    fn an_avro_container_file_is_read_as_datums_of_the_transaction_schema() {
        let schema = crate::decode::transaction_schema();
        let txs = crate::train::bundled_history()
            .map(|h| h.events)
            .unwrap_or_default();
        let mut writer = apache_avro::Writer::new(&schema, Vec::new());
        for tx in txs.iter().take(3) {
            writer
                .append(crate::decode::transaction_avro_value(tx))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let bytes = writer.into_inner().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("events.avro");
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{e}"));
        let (events, encoding) = read_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(encoding, Encoding::Avro);
        assert_eq!(events.len(), 3);
        let decoder = Decoder::new(Encoding::Avro);
        for (e, tx) in events.iter().zip(&txs) {
            let back = decoder.decode(&e.payload).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&back, tx);
        }
    }
}
