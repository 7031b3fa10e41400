//! Training: history (CSV or JSON lines) is decoded and validated like the live stream, put in
//! event-time order, replayed through the same per-account state and feature code, and used to fit
//! both detectors. The result is a versioned [`ModelSet`].

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::config::{FeatureConfig, LofParams, ModelConfig, Policy};
use crate::decode::{DecodeError, Decoder, RawTransaction, Transaction, format_time, validate};
use crate::features::{FEATURES, Features, numeric_index, observe};
use crate::models::encoding::{CategoricalEncoding, Encoder, percentile};
use crate::models::lof::{KnnIndex, LofModel};
use crate::models::{
    ForestSection, LofSection, MANIFEST_FORMAT, Manifest, ModelError, ModelSet, ScoreSummary,
    TrainingInfo, forest,
};
use crate::state::AccountState;

/// The bundled dataset (see `data/README.md`), used when no model artifact exists yet.
pub const BUNDLED_DATASET: &str = include_str!("../data/bank_transactions.csv");

/// Errors while reading training history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: unsupported extension (use .csv, .jsonl or .json)")]
    Format(String),
    #[error("CSV header: {0}")]
    Header(String),
    #[error("no valid events in {0}")]
    Empty(String),
}

/// Decoded history: valid events in input order, and what was rejected.
#[derive(Debug, Default)]
pub struct History {
    pub source: String,
    pub events: Vec<Transaction>,
    /// The first [`REJECTS_KEPT`] rejected events with their position (line or record).
    pub rejected: Vec<(usize, DecodeError)>,
    /// How many were rejected in all.
    pub rows_invalid: usize,
    pub fingerprint: String,
}

impl History {
    pub fn rows_read(&self) -> usize {
        self.events.len() + self.rows_invalid
    }
}

/// Rejected events kept with their reason for the report; the rest are only counted.
pub const REJECTS_KEPT: usize = 1_000;

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(Sha256::digest(bytes))
}

/// What training reads: the whole history when it fits in `models.max_training_events`, else a
/// sample of its feature rows.
#[derive(Debug)]
pub enum Training {
    Whole(History),
    Sampled(SampledHistory),
}

impl Training {
    /// The kept rejected events (line or record, reason) and how many there were in all.
    pub fn rejected(&self) -> (&[(usize, DecodeError)], usize) {
        match self {
            Self::Whole(h) => (&h.rejected, h.rows_invalid),
            Self::Sampled(s) => (&s.rejected, s.rows_invalid),
        }
    }
}

/// A history too long to keep: every event went through the per-account state in the order it
/// was read; a uniform sample of the resulting feature rows is kept.
#[derive(Debug)]
pub struct SampledHistory {
    pub source: String,
    pub fingerprint: String,
    pub rows: Vec<Features>,
    pub rows_valid: usize,
    pub rows_invalid: usize,
    pub rejected: Vec<(usize, DecodeError)>,
    pub accounts: usize,
    pub first: i64,
    pub last: i64,
    /// Events dated before their account's previous one (the order read is not event time).
    pub out_of_order: usize,
}

/// Collects history one event at a time, in memory bounded by the accounts and
/// `models.max_training_events`: up to that many valid events are kept whole (training then
/// sorts them by event time, as a shuffled export needs); past it, the events kept so far and
/// every later one go through the per-account state in the order read, and a uniform reservoir
/// sample (seeded: the same input gives the same sample) of their feature rows is kept.
pub struct HistoryReader {
    source: String,
    limit: usize,
    features: FeatureConfig,
    seed: u64,
    held: Vec<Transaction>,
    rejected: Vec<(usize, DecodeError)>,
    invalid: usize,
    sampled: Option<Sampler>,
}

struct Sampler {
    accounts: HashMap<String, AccountState>,
    rows: Vec<Features>,
    seen: usize,
    first: i64,
    last: i64,
    out_of_order: usize,
    rng: rand_chacha::ChaCha8Rng,
}

impl Sampler {
    fn observe(&mut self, tx: &Transaction, cfg: &FeatureConfig, limit: usize) {
        use rand::Rng;
        if !self.accounts.contains_key(tx.account_id.as_str()) {
            self.accounts
                .insert(tx.account_id.to_string(), AccountState::default());
        }
        let Some(state) = self.accounts.get_mut(tx.account_id.as_str()) else {
            return;
        };
        if state.last_time().is_some_and(|t| t > tx.time) {
            self.out_of_order += 1;
        }
        if state.expired_at(tx.time, cfg) {
            *state = AccountState::default();
        }
        let row = observe(state, tx, cfg);
        (self.first, self.last) = (self.first.min(tx.time), self.last.max(tx.time));
        if self.rows.len() < limit {
            self.rows.push(row);
        } else {
            let at = self.rng.gen_range(0..=self.seen);
            if let Some(slot) = self.rows.get_mut(at) {
                *slot = row;
            }
        }
        self.seen += 1;
    }
}

impl HistoryReader {
    pub fn new(source: &str, models: &ModelConfig, features: &FeatureConfig) -> Self {
        Self {
            source: source.to_string(),
            limit: models.max_training_events,
            features: *features,
            seed: models.forest.seed,
            held: Vec::new(),
            rejected: Vec::new(),
            invalid: 0,
            sampled: None,
        }
    }

    /// One decoded event at `position` (its line or record number).
    pub fn push(&mut self, position: usize, decoded: Result<Transaction, DecodeError>) {
        let tx = match decoded {
            Ok(tx) => tx,
            Err(e) => {
                self.invalid += 1;
                if self.rejected.len() < REJECTS_KEPT {
                    self.rejected.push((position, e));
                }
                return;
            }
        };
        if self.sampled.is_none() && self.held.len() < self.limit {
            self.held.push(tx);
            return;
        }
        let (cfg, limit) = (self.features, self.limit);
        let sampler = self.sampled.get_or_insert_with(|| {
            use rand::SeedableRng;
            Sampler {
                accounts: HashMap::new(),
                rows: Vec::with_capacity(limit),
                seen: 0,
                first: i64::MAX,
                last: i64::MIN,
                out_of_order: 0,
                rng: rand_chacha::ChaCha8Rng::seed_from_u64(self.seed),
            }
        });
        for held in self.held.drain(..) {
            sampler.observe(&held, &cfg, limit);
        }
        sampler.observe(&tx, &cfg, limit);
    }

    pub fn finish(self, fingerprint: String) -> Training {
        match self.sampled {
            None => Training::Whole(History {
                source: self.source,
                events: self.held,
                rejected: self.rejected,
                rows_invalid: self.invalid,
                fingerprint,
            }),
            Some(s) => Training::Sampled(SampledHistory {
                source: self.source,
                fingerprint,
                rows_valid: s.seen,
                rows: s.rows,
                rows_invalid: self.invalid,
                rejected: self.rejected,
                accounts: s.accounts.len(),
                first: s.first,
                last: s.last,
                out_of_order: s.out_of_order,
            }),
        }
    }
}

/// A reader that hashes what passes through it, so that a file's fingerprint is the SHA-256 of
/// its bytes while it is read once, as a stream.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: std::io::Read> std::io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Reads CSV with the dataset's header into `into`; returns the SHA-256 of the bytes.
fn csv_into(input: impl std::io::Read, into: &mut HistoryReader) -> Result<String, HistoryError> {
    let mut hashing = Hashing {
        inner: input,
        hasher: Sha256::new(),
    };
    {
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(&mut hashing);
        let headers = reader
            .headers()
            .map_err(|e| HistoryError::Header(e.to_string()))?
            .clone();
        for (line, record) in reader.records().enumerate() {
            let parsed = record
                .and_then(|r| r.deserialize::<RawTransaction>(Some(&headers)))
                .map_err(|e| DecodeError::Malformed {
                    format: "CSV",
                    detail: e.to_string(),
                })
                .and_then(validate);
            into.push(line + 2, parsed);
        }
    }
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|source| HistoryError::Io {
        path: into.source.clone(),
        source,
    })?;
    Ok(hex(hashing.hasher.finalize()))
}

/// Reads JSON lines, one event per line, decoded as the stream decodes JSON, into `into`;
/// returns the SHA-256 of the bytes.
fn jsonl_into(input: impl std::io::Read, into: &mut HistoryReader) -> Result<String, HistoryError> {
    use std::io::BufRead;
    let mut hashing = Hashing {
        inner: input,
        hasher: Sha256::new(),
    };
    let path = into.source.clone();
    let io = |source| HistoryError::Io {
        path: path.clone(),
        source,
    };
    let mut lines = std::io::BufReader::new(&mut hashing);
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        if lines.read_until(b'\n', &mut line).map_err(io)? == 0 {
            break;
        }
        number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        into.push(number, Decoder::Json.decode(&line));
    }
    drop(lines);
    Ok(hex(hashing.hasher.finalize()))
}

/// Reads CSV text with the dataset's header.
pub fn history_from_csv(source: &str, text: &str) -> Result<History, HistoryError> {
    let mut reader = HistoryReader::new(source, &unbounded(), &FeatureConfig::default());
    let fingerprint = csv_into(text.as_bytes(), &mut reader)?;
    Ok(whole(reader.finish(fingerprint)))
}

/// Reads JSON lines, one event per line, decoded as the stream decodes JSON.
pub fn history_from_jsonl(source: &str, text: &str) -> History {
    let mut reader = HistoryReader::new(source, &unbounded(), &FeatureConfig::default());
    // Reading from memory cannot fail.
    let fingerprint = jsonl_into(text.as_bytes(), &mut reader).unwrap_or_default();
    whole(reader.finish(fingerprint))
}

/// Settings that keep every event: for histories already in memory.
fn unbounded() -> ModelConfig {
    ModelConfig {
        max_training_events: usize::MAX,
        ..ModelConfig::default()
    }
}

fn whole(t: Training) -> History {
    match t {
        Training::Whole(h) => h,
        // `unbounded()` never samples.
        Training::Sampled(_) => unreachable!("an unbounded reader sampled"),
    }
}

/// Fingerprint of recorded payloads: each one's length and bytes.
#[derive(Default)]
pub struct PayloadFingerprint(Sha256);

impl PayloadFingerprint {
    pub fn add(&mut self, payload: &[u8]) {
        self.0.update((payload.len() as u64).to_le_bytes());
        self.0.update(payload);
    }

    pub fn finish(self) -> String {
        hex(self.0.finalize())
    }
}

/// Events as recorded bytes (e.g. read from a topic), decoded as the stream decodes them.
/// `rejected` numbers are positions in `payloads` from 1.
pub fn history_from_payloads<'a>(
    source: &str,
    payloads: impl IntoIterator<Item = &'a [u8]>,
    decoder: &Decoder,
) -> History {
    let mut reader = HistoryReader::new(source, &unbounded(), &FeatureConfig::default());
    let mut fingerprint = PayloadFingerprint::default();
    for (i, p) in payloads.into_iter().enumerate() {
        fingerprint.add(p);
        reader.push(i + 1, decoder.decode(p));
    }
    whole(reader.finish(fingerprint.finish()))
}

/// Reads a `.csv` or `.jsonl` file as a stream, in memory bounded by `models.max_training_events`
/// (see [`HistoryReader`]).
pub fn read_history(
    path: &Path,
    models: &ModelConfig,
    features: &FeatureConfig,
) -> Result<Training, HistoryError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| HistoryError::Io {
        path: name.clone(),
        source,
    })?;
    let mut reader = HistoryReader::new(&name, models, features);
    let fingerprint = match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => csv_into(file, &mut reader)?,
        Some("jsonl" | "json" | "ndjson") => jsonl_into(file, &mut reader)?,
        _ => return Err(HistoryError::Format(name)),
    };
    Ok(reader.finish(fingerprint))
}

/// The bundled dataset as history.
pub fn bundled_history() -> Result<History, HistoryError> {
    history_from_csv("bundled:data/bank_transactions.csv", BUNDLED_DATASET)
}

/// Events in event-time order; ties keep their input order.
pub fn in_event_time_order(mut events: Vec<Transaction>) -> Vec<Transaction> {
    events.sort_by_key(|t| t.time);
    events
}

/// Replays events (already in the order each account saw them) through fresh per-account state
/// and returns each event's features: the training half of "one feature code path".
pub fn replay_features(events: &[Transaction], cfg: &FeatureConfig) -> Vec<Features> {
    let mut accounts: HashMap<&str, AccountState> = HashMap::new();
    events
        .iter()
        .map(|tx| {
            let state = accounts.entry(tx.account_id.as_str()).or_default();
            if state.expired_at(tx.time, cfg) {
                *state = AccountState::default();
            }
            observe(state, tx, cfg)
        })
        .collect()
}

/// The configured numeric features a model trained on `span_secs` of history can use: calendar
/// features whose period the history does not cover are dropped (every later event would lie
/// outside what training saw on that axis), each with a note saying so.
pub fn covered_features(numeric: &[String], span_secs: i64) -> (Vec<String>, Vec<String>) {
    let mut notes = Vec::new();
    let kept = numeric
        .iter()
        .filter(|name| {
            let period = numeric_index(name).and_then(|i| FEATURES[i].period_secs);
            match period {
                Some(p) if span_secs < p => {
                    let days = |s: i64| {
                        if s == i64::MAX {
                            "never repeats".to_string()
                        } else {
                            format!("repeats every {:.0} days", s as f64 / 86_400.0)
                        }
                    };
                    notes.push(format!(
                        "feature `{name}` not used: it {}, and the training data spans {:.1} days",
                        days(p),
                        span_secs as f64 / 86_400.0
                    ));
                    false
                }
                _ => true,
            }
        })
        .cloned()
        .collect();
    (kept, notes)
}

/// Both thresholds at the same training quantile `q` (the share of training events each model
/// flags), with `q` chosen by bisection so that `policy` alerts on `target` of the training
/// events.
fn thresholds_for_alert_rate(
    forest: &[f64],
    lof: &[f64],
    policy: Policy,
    target: f64,
) -> (f64, f64) {
    let at = |q: f64| {
        (
            percentile(forest, 100.0 * (1.0 - q)),
            percentile(lof, 100.0 * (1.0 - q)),
        )
    };
    let rate = |q: f64| {
        let (tf, tl) = at(q);
        let alerts = forest
            .iter()
            .zip(lof)
            .filter(|&(&f, &l)| match policy {
                Policy::All => f > tf && l > tl,
                Policy::Any => f > tf || l > tl,
                Policy::IsolationForest => f > tf,
                Policy::Lof => l > tl,
            })
            .count();
        alerts as f64 / forest.len().max(1) as f64
    };
    let (mut lo, mut hi) = (0.0, 1.0);
    for _ in 0..40 {
        let mid = (lo + hi) / 2.0;
        if rate(mid) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    at(hi)
}

/// Both models fitted on the kept rows.
struct Fitted {
    forest: forest::FlatForest,
    lof: LofModel,
    index: KnnIndex,
    sample_size: usize,
    /// For each training row, its row in the LOF reference set, if it is one.
    reference: Vec<Option<usize>>,
}

impl Fitted {
    /// Every training row's score under each model: the forest's, and LOF's of the row among
    /// the others (leave-one-out for a reference row, as a new event for a removed one).
    fn scores(&self, forest_rows: &[Vec<f64>], lof_rows: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
        let forest = forest_rows.iter().map(|r| self.forest.score(r)).collect();
        let mut buf = Vec::new();
        let lof = lof_rows
            .iter()
            .zip(&self.reference)
            .map(|(r, at)| match at {
                Some(i) => self.lof.training_lof[*i],
                None => self.lof.score(&self.index, r, &mut buf),
            })
            .collect();
        (forest, lof)
    }
}

/// LOF's settings as the model version's hash reads them. Without a reference-set bound they
/// read as they did before the bound existed, so a model retrained on the same data keeps its
/// version (and its alerts their ids).
fn lof_settings(lof: &LofParams) -> String {
    format!("{lof:?}").replace(", reference_rows: 0 }", " }")
}

/// Which of the `keep` rows make up LOF's reference set: all of them up to `limit` (0: no
/// limit), else a uniform sample of `limit` of them, seeded, in their order. Every event is
/// compared with every reference row, so this bounds LOF's cost per event whatever the
/// history's length; a uniform subsample keeps the density LOF compares with (Zimek et al.,
/// "Subsampling for efficient and effective unsupervised outlier detection ensembles", KDD
/// 2013).
fn reference_sample(keep: &[bool], limit: usize, seed: u64) -> Vec<bool> {
    use rand::SeedableRng;
    let kept: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
    if limit == 0 || kept.len() <= limit {
        return keep.to_vec();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut in_sample = vec![false; keep.len()];
    for i in rand::seq::index::sample(&mut rng, kept.len(), limit) {
        in_sample[kept[i]] = true;
    }
    in_sample
}

fn fit(
    forest_rows: &[Vec<f64>],
    lof_rows: &[Vec<f64>],
    dims: usize,
    keep: &[bool],
    models: &ModelConfig,
) -> Result<Fitted, ModelError> {
    let chosen = |rows: &[Vec<f64>], mask: &[bool]| -> Vec<Vec<f64>> {
        rows.iter()
            .zip(mask)
            .filter(|(_, k)| **k)
            .map(|(r, _)| r.clone())
            .collect()
    };
    let p = models.forest;
    let forest_kept = chosen(forest_rows, keep);
    let opts = forest::options(
        p.trees,
        p.samples,
        p.extension_level,
        forest_kept.len(),
        p.seed,
    );
    let forest = forest::train(&forest_kept, &opts)?;
    let in_reference = reference_sample(keep, models.lof.reference_rows, p.seed);
    let points: Vec<f64> = chosen(lof_rows, &in_reference).concat();
    let index = KnnIndex::build(models.lof.index, &points, dims, models.lof.neighbors);
    let lof = LofModel::fit(points, dims, models.lof.neighbors, &index)?;
    let mut next = 0;
    let reference = in_reference
        .iter()
        .map(|&k| {
            k.then(|| {
                next += 1;
                next - 1
            })
        })
        .collect();
    Ok(Fitted {
        forest,
        lof,
        index,
        sample_size: opts.sample_size,
        reference,
    })
}

/// What the manifest records about the training data.
struct Facts<'a> {
    source: &'a str,
    fingerprint: &'a str,
    rows_valid: usize,
    rows_invalid: usize,
    accounts: usize,
    first: i64,
    last: i64,
    notes: Vec<String>,
}

/// Trains both detectors on `history` and returns the model set (not yet saved). The result
/// depends only on the history, the parameters and the forest's seed: the same inputs give a
/// byte-identical artifact (its time is the newest training event's, not the clock's).
pub fn train(
    history: &History,
    models: &ModelConfig,
    features: &FeatureConfig,
    policy: Policy,
) -> Result<ModelSet, ModelError> {
    let events = in_event_time_order(history.events.clone());
    let rows = replay_features(&events, features);
    let facts = Facts {
        source: &history.source,
        fingerprint: &history.fingerprint,
        rows_valid: history.events.len(),
        rows_invalid: history.rows_invalid,
        accounts: events
            .iter()
            .map(|e| e.account_id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len(),
        first: events.first().map_or(0, |e| e.time),
        last: events.last().map_or(0, |e| e.time),
        notes: Vec::new(),
    };
    fit_history(&rows, facts, models, features, policy)
}

/// [`train`] on what a [`HistoryReader`] read: the whole history, or its sample.
pub fn train_on(
    training: &Training,
    models: &ModelConfig,
    features: &FeatureConfig,
    policy: Policy,
) -> Result<ModelSet, ModelError> {
    let s = match training {
        Training::Whole(history) => return train(history, models, features, policy),
        Training::Sampled(s) => s,
    };
    let mut notes = vec![format!(
        "{} valid events, more than models.max_training_events: features computed in the order \
         read (as the live stream computes them), a uniform sample of {} fitted",
        s.rows_valid,
        s.rows.len()
    )];
    if s.out_of_order > 0 {
        notes.push(format!(
            "{} events were read after a later event of their account: in a file, sort it by \
             TransactionDate (a topic is read in its partitions' order, which is the stream's)",
            s.out_of_order
        ));
    }
    let facts = Facts {
        source: &s.source,
        fingerprint: &s.fingerprint,
        rows_valid: s.rows_valid,
        rows_invalid: s.rows_invalid,
        accounts: s.accounts,
        first: s.first,
        last: s.last,
        notes,
    };
    fit_history(&s.rows, facts, models, features, policy)
}

fn fit_history(
    rows: &[Features],
    facts: Facts,
    models: &ModelConfig,
    features: &FeatureConfig,
    policy: Policy,
) -> Result<ModelSet, ModelError> {
    if rows.len() < 3 {
        return Err(ModelError::Training(format!(
            "{} valid events in {}; at least 3 are needed",
            rows.len(),
            facts.source
        )));
    }
    let (first, last) = (facts.first, facts.last);
    let span = last - first;
    let (forest_numeric, mut notes) = covered_features(&models.forest_features.numeric, span);
    let (lof_numeric, lof_notes) = covered_features(&models.lof_features.numeric, span);
    notes.extend(
        lof_notes
            .into_iter()
            .filter(|n| !notes.contains(n))
            .collect::<Vec<_>>(),
    );
    for (numeric, lists) in [
        (&forest_numeric, &models.forest_features),
        (&lof_numeric, &models.lof_features),
    ] {
        if numeric.is_empty() && lists.categorical.is_empty() {
            return Err(ModelError::Training(notes.join("; ")));
        }
    }
    notes.extend(facts.notes);

    let forest_encoder = Encoder::fit(
        &forest_numeric,
        &models.forest_features.categorical,
        CategoricalEncoding::Ordinal,
        false,
        rows,
    )?;
    let forest_rows: Vec<Vec<f64>> = rows.iter().map(|r| forest_encoder.encode(r)).collect();
    let p = models.forest;
    let lof_encoder = Encoder::fit(
        &lof_numeric,
        &models.lof_features.categorical,
        CategoricalEncoding::OneHot,
        true,
        rows,
    )?;
    let dims = lof_encoder.width();
    let lof_rows: Vec<Vec<f64>> = rows.iter().map(|r| lof_encoder.encode(r)).collect();

    // Unlabelled history holds frauds too, and a fraud pattern seen dozens of times looks like
    // a habit: LOF finds each such event among its own kind, and the forest's trees learn to
    // expect it. Each cleaning pass refits both models without the events either one flagged.
    let mut keep = vec![true; rows.len()];
    let mut fitted = fit(&forest_rows, &lof_rows, dims, &keep, models)?;
    for _ in 0..models.cleaning_passes {
        let (forest_scores, lof_scores) = fitted.scores(&forest_rows, &lof_rows);
        let tf = percentile(&forest_scores, 100.0 * (1.0 - p.contamination));
        let tl = percentile(&lof_scores, 100.0 * (1.0 - models.lof.contamination));
        keep = forest_scores
            .iter()
            .zip(&lof_scores)
            .map(|(&f, &l)| f <= tf && l <= tl)
            .collect();
        fitted = fit(&forest_rows, &lof_rows, dims, &keep, models)?;
    }
    let (forest_scores, lof_scores) = fitted.scores(&forest_rows, &lof_rows);
    let Fitted {
        forest: flat,
        lof,
        sample_size,
        ..
    } = fitted;

    let (forest_threshold, lof_threshold) = if models.target_alert_rate > 0.0 {
        thresholds_for_alert_rate(
            &forest_scores,
            &lof_scores,
            policy,
            models.target_alert_rate,
        )
    } else {
        (
            percentile(&forest_scores, 100.0 * (1.0 - p.contamination)),
            percentile(&lof_scores, 100.0 * (1.0 - models.lof.contamination)),
        )
    };

    // Training data and every setting: two models of the same data with different settings (a
    // champion and its challenger) get different versions; the same ones, the same version.
    let lof_settings = lof_settings(&models.lof);
    let settings = sha256_hex(
        format!(
            "{p:?}|{lof_settings}|{features:?}|{forest_numeric:?}|{lof_numeric:?}|{:?}|{:?}|{}|{}",
            models.forest_features.categorical,
            models.lof_features.categorical,
            models.target_alert_rate,
            policy.as_str()
        )
        .as_bytes(),
    );
    let as_of = chrono::DateTime::<chrono::Utc>::from_timestamp(last, 0).unwrap_or_default();
    let version = format!(
        "{}-{}-{}",
        as_of.format("%Y%m%dT%H%M%SZ"),
        &facts.fingerprint[..8.min(facts.fingerprint.len())],
        &settings[..4]
    );
    // Every feature either model reads, in the order the lists name them.
    let mut watched: Vec<&String> = forest_numeric.iter().collect();
    watched.extend(lof_numeric.iter().filter(|n| !forest_numeric.contains(n)));
    let drift = watched
        .into_iter()
        .filter_map(|name| {
            let i = crate::features::numeric_index(name)?;
            let values: Vec<f64> = rows.iter().map(|r| r.numeric[i]).collect();
            Some(crate::models::drift::FeatureBaseline::of(name, &values))
        })
        .collect();
    let manifest = Manifest {
        drift,
        format: MANIFEST_FORMAT,
        version,
        created_at: as_of.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        features: *features,
        isolation_forest: ForestSection {
            params: p,
            sample_size,
            threshold: forest_threshold,
            training_scores: ScoreSummary::of(&forest_scores),
            encoder: forest_encoder,
        },
        lof: LofSection {
            params: models.lof,
            k: lof.k,
            threshold: lof_threshold,
            training_scores: ScoreSummary::of(&lof_scores),
            encoder: lof_encoder,
        },
        training: TrainingInfo {
            source: facts.source.to_string(),
            fingerprint: facts.fingerprint.to_string(),
            rows_read: facts.rows_valid + facts.rows_invalid,
            rows_valid: facts.rows_valid,
            rows_invalid: facts.rows_invalid,
            accounts: facts.accounts,
            first_event: format_time(first),
            last_event: format_time(last),
            target_alert_rate: models.target_alert_rate,
            policy: policy.as_str().to_string(),
            notes,
        },
    };
    ModelSet::assemble(manifest, flat, lof, models.lof.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_dataset_reads_completely() {
        let h = bundled_history().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.events.len(), 2512);
        assert!(h.rejected.is_empty(), "{:?}", h.rejected.first());
        let accounts: std::collections::HashSet<_> =
            h.events.iter().map(|e| e.account_id.clone()).collect();
        assert_eq!(accounts.len(), 495);
    }

    #[test]
    fn training_flags_about_the_contamination_share_and_round_trips_through_disk() {
        let h = bundled_history().unwrap_or_else(|e| panic!("{e}"));
        let models = ModelConfig::default();
        let set = train(&h, &models, &FeatureConfig::default(), Policy::All)
            .unwrap_or_else(|e| panic!("{e}"));
        let events = in_event_time_order(h.events.clone());
        let rows = replay_features(&events, &FeatureConfig::default());
        let mut scratch = crate::models::Scratch::default();
        let mut flagged = |i: usize| {
            rows.iter()
                .filter(|r| set.assess(r, &mut scratch)[i].flagged)
                .count()
        };
        let (f, l) = (flagged(0), flagged(1));
        // (1 - 0.05) quantile of the training scores: 5 % of 2,512 rows, give or take ties.
        assert!((110..=140).contains(&f), "forest flagged {f}");
        // LOF's threshold is the same quantile of every training row's score: leave-one-out
        // for the rows kept in its reference set, as new events for the ones cleaning removed.
        assert_eq!(
            set.lof.threshold.get(),
            set.manifest.lof.training_scores.p95
        );
        let removed = rows.len() - set.lof.model.training_lof.len();
        assert!(
            (150..=300).contains(&removed),
            "cleaning removed {removed} of {}",
            rows.len()
        );
        assert!(l > 0);

        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        set.save(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let loaded = ModelSet::load(dir.path(), crate::config::LofIndexKind::Brute)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(loaded.manifest, set.manifest);
        for r in rows.iter().take(200) {
            assert_eq!(loaded.assess(r, &mut scratch), set.assess(r, &mut scratch));
        }
    }

    /// The reference set is a seeded uniform sample of the kept rows when there are more than
    /// the limit, else those rows; every training row still gets a score (as a new event when
    /// it is not in the sample), so the threshold is a quantile over all of them.
    #[test]
    fn lof_compares_events_with_at_most_reference_rows_kept_training_rows() {
        let keep: Vec<bool> = (0..1_000).map(|i| i % 3 != 0).collect();
        let kept = keep.iter().filter(|k| **k).count();
        assert_eq!(reference_sample(&keep, 0, 1), keep);
        assert_eq!(reference_sample(&keep, kept, 1), keep);
        let sample = reference_sample(&keep, 100, 1);
        assert_eq!(sample.iter().filter(|s| **s).count(), 100);
        assert!(sample.iter().zip(&keep).all(|(s, k)| !s || *k));
        assert_eq!(reference_sample(&keep, 100, 1), sample);
        assert_ne!(reference_sample(&keep, 100, 2), sample);
        // Spread over the history, not its first rows.
        assert!(sample[500..].iter().filter(|s| **s).count() > 30);

        let h = bundled_history().unwrap_or_else(|e| panic!("{e}"));
        let mut models = ModelConfig::default();
        let all = train(&h, &models, &FeatureConfig::default(), Policy::All)
            .unwrap_or_else(|e| panic!("{e}"));
        models.lof.reference_rows = 1_000;
        let sampled = train(&h, &models, &FeatureConfig::default(), Policy::All)
            .unwrap_or_else(|e| panic!("{e}"));
        let rows = |set: &ModelSet| set.lof.model.reference_rows();
        assert!(rows(&all) > 2_000, "{} reference rows", rows(&all));
        assert_eq!(rows(&sampled), 1_000);
        assert_eq!(sampled.lof.model.training_lof.len(), 1_000);
        assert_eq!(
            sampled.lof.threshold.get(),
            sampled.manifest.lof.training_scores.p95
        );
        assert_ne!(sampled.version(), all.version());
        // The default hashes as the settings did before the bound existed (the field is the
        // last one, which the version's stability rests on).
        assert!(lof_settings(&all.manifest.lof.params).ends_with("index: Auto }"));
        assert!(lof_settings(&sampled.manifest.lof.params).ends_with("reference_rows: 1000 }"));
    }

    fn simulated(count: usize) -> Vec<Vec<u8>> {
        let mut sim = crate::simulate::Simulator::new(7, 0.02, 0.0);
        (0..count).map(|_| sim.next_event().payload).collect()
    }

    fn read(payloads: &[Vec<u8>], limit: usize) -> Training {
        let models = ModelConfig {
            max_training_events: limit,
            ..ModelConfig::default()
        };
        let mut reader = HistoryReader::new("sim", &models, &FeatureConfig::default());
        let mut fingerprint = PayloadFingerprint::default();
        for (i, p) in payloads.iter().enumerate() {
            fingerprint.add(p);
            reader.push(i + 1, Decoder::Json.decode(p));
        }
        reader.finish(fingerprint.finish())
    }

    /// Past the limit memory holds a sample, not the history: every event still goes through
    /// the per-account state in the order read, so each kept row is the one the whole history
    /// gives that event; the same input gives the same sample.
    #[test]
    fn a_history_longer_than_the_limit_is_sampled_to_it_with_features_in_the_order_read() {
        let payloads = simulated(6_000);
        let Training::Sampled(s) = read(&payloads, 1_500) else {
            panic!("6,000 events over a limit of 1,500 were kept whole")
        };
        assert_eq!(
            (s.rows.len(), s.rows_valid, s.rows_invalid),
            (1_500, 6_000, 0)
        );
        let events: Vec<Transaction> = payloads
            .iter()
            .map(|p| Decoder::Json.decode(p).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let all = replay_features(&events, &FeatureConfig::default());
        assert!(s.rows.iter().all(|r| all.contains(r)));
        let late = all[4_000..].iter().filter(|r| s.rows.contains(r)).count();
        assert!(
            (300..=700).contains(&late),
            "{late} of the sample from the last third"
        );
        let Training::Sampled(again) = read(&payloads, 1_500) else {
            unreachable!()
        };
        assert_eq!(again.rows, s.rows);

        let training = Training::Sampled(s);
        let set = train_on(
            &training,
            &ModelConfig::default(),
            &FeatureConfig::default(),
            Policy::All,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.manifest.training.rows_valid, 6_000);
        assert!(
            set.manifest
                .training
                .notes
                .iter()
                .any(|n| n.contains("a uniform sample of 1500")),
            "{:?}",
            set.manifest.training.notes
        );
    }

    /// Up to the limit the history is kept whole and trained on exactly as before: a file read
    /// as a stream gives the model its text in memory gives, fingerprint included.
    #[test]
    fn a_file_read_as_a_stream_trains_the_model_its_text_in_memory_trains() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("history.csv");
        std::fs::write(&path, BUNDLED_DATASET).unwrap_or_else(|e| panic!("{e}"));
        let (models, features) = (ModelConfig::default(), FeatureConfig::default());
        let streamed = read_history(&path, &models, &features).unwrap_or_else(|e| panic!("{e}"));
        let Training::Whole(h) = &streamed else {
            panic!("2,512 events were sampled")
        };
        let bundled = bundled_history().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.fingerprint, bundled.fingerprint);
        assert_eq!(h.fingerprint, sha256_hex(BUNDLED_DATASET.as_bytes()));
        assert_eq!(h.events, bundled.events);
        let a =
            train_on(&streamed, &models, &features, Policy::All).unwrap_or_else(|e| panic!("{e}"));
        let b = train(&bundled, &models, &features, Policy::All).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.manifest.version, b.manifest.version);
        assert_eq!(
            a.manifest.isolation_forest.threshold,
            b.manifest.isolation_forest.threshold
        );
        assert_eq!(a.manifest.lof.threshold, b.manifest.lof.threshold);
    }

    #[test]
    fn bad_rows_in_history_are_reported_with_their_line() {
        let text = "TransactionID,AccountID,TransactionAmount,TransactionDate,TransactionType,Location,DeviceID,IP Address,MerchantID,Channel,CustomerAge,CustomerOccupation,TransactionDuration,LoginAttempts,AccountBalance,PreviousTransactionDate\n\
            TX1,AC1,10.5,2023-01-01 10:00:00,Debit,Austin,D1,1.1.1.1,M1,ATM,30,Doctor,60,1,1000,\n\
            TX2,AC1,10.5,2023-01-01 10:00:00,Debit,Austin,D1,1.1.1.1,M1,ATM,300,Doctor,60,1,1000,\n";
        let h = history_from_csv("inline", text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.events.len(), 1);
        assert_eq!(h.rejected.len(), 1);
        assert_eq!(h.rejected[0].0, 3);
        assert_eq!(h.rejected[0].1.field(), Some("CustomerAge"));
    }
}
