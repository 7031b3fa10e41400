//! Training: history (CSV or JSON lines) is decoded and validated like the live stream, put in
//! event-time order, replayed through the same per-account state and feature code, and used to fit
//! both detectors. The result is a versioned [`ModelSet`].

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::config::{FeatureConfig, ModelConfig, Policy};
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
    pub rejected: Vec<(usize, DecodeError)>,
    pub fingerprint: String,
}

impl History {
    pub fn rows_read(&self) -> usize {
        self.events.len() + self.rejected.len()
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads CSV text with the dataset's header.
pub fn history_from_csv(source: &str, text: &str) -> Result<History, HistoryError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| HistoryError::Header(e.to_string()))?
        .clone();
    let mut h = History {
        source: source.to_string(),
        fingerprint: sha256_hex(text.as_bytes()),
        ..History::default()
    };
    for (line, record) in reader.records().enumerate() {
        let parsed = record
            .and_then(|r| r.deserialize::<RawTransaction>(Some(&headers)))
            .map_err(|e| DecodeError::Malformed {
                format: "CSV",
                detail: e.to_string(),
            })
            .and_then(validate);
        match parsed {
            Ok(tx) => h.events.push(tx),
            Err(e) => h.rejected.push((line + 2, e)),
        }
    }
    Ok(h)
}

/// Reads JSON lines, one event per line, decoded as the stream decodes JSON.
pub fn history_from_jsonl(source: &str, text: &str) -> History {
    let mut h = History {
        source: source.to_string(),
        fingerprint: sha256_hex(text.as_bytes()),
        ..History::default()
    };
    for (line, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match Decoder::Json.decode(l.as_bytes()) {
            Ok(tx) => h.events.push(tx),
            Err(e) => h.rejected.push((line + 1, e)),
        }
    }
    h
}

/// Events as recorded bytes (e.g. read from a topic), decoded as the stream decodes them.
/// `rejected` numbers are positions in `payloads` from 1.
pub fn history_from_payloads<'a>(
    source: &str,
    payloads: impl IntoIterator<Item = &'a [u8]>,
    decoder: &Decoder,
) -> History {
    let mut hasher = Sha256::new();
    let mut h = History {
        source: source.to_string(),
        ..History::default()
    };
    for (i, p) in payloads.into_iter().enumerate() {
        hasher.update((p.len() as u64).to_le_bytes());
        hasher.update(p);
        match decoder.decode(p) {
            Ok(tx) => h.events.push(tx),
            Err(e) => h.rejected.push((i + 1, e)),
        }
    }
    h.fingerprint = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    h
}

/// Reads a `.csv` or `.jsonl` file.
pub fn read_history(path: &Path) -> Result<History, HistoryError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| HistoryError::Io {
        path: name.clone(),
        source,
    })?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => history_from_csv(&name, &text),
        Some("jsonl" | "json" | "ndjson") => Ok(history_from_jsonl(&name, &text)),
        _ => Err(HistoryError::Format(name)),
    }
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

fn fit(
    forest_rows: &[Vec<f64>],
    lof_rows: &[Vec<f64>],
    dims: usize,
    keep: &[bool],
    models: &ModelConfig,
) -> Result<Fitted, ModelError> {
    let kept = |rows: &[Vec<f64>]| -> Vec<Vec<f64>> {
        rows.iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .map(|(r, _)| r.clone())
            .collect()
    };
    let p = models.forest;
    let forest_kept = kept(forest_rows);
    let opts = forest::options(
        p.trees,
        p.samples,
        p.extension_level,
        forest_kept.len(),
        p.seed,
    );
    let forest = forest::train(&forest_kept, &opts)?;
    let points: Vec<f64> = kept(lof_rows).concat();
    let index = KnnIndex::build(models.lof.index, &points, dims, models.lof.neighbors);
    let lof = LofModel::fit(points, dims, models.lof.neighbors, &index)?;
    let mut next = 0;
    let reference = keep
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
    if events.len() < 3 {
        return Err(ModelError::Training(format!(
            "{} valid events in {}; at least 3 are needed",
            events.len(),
            history.source
        )));
    }
    let (first, last) = (events[0].time, events[events.len() - 1].time);
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
    let rows = replay_features(&events, features);

    let forest_encoder = Encoder::fit(
        &forest_numeric,
        &models.forest_features.categorical,
        CategoricalEncoding::Ordinal,
        false,
        &rows,
    )?;
    let forest_rows: Vec<Vec<f64>> = rows.iter().map(|r| forest_encoder.encode(r)).collect();
    let p = models.forest;
    let lof_encoder = Encoder::fit(
        &lof_numeric,
        &models.lof_features.categorical,
        CategoricalEncoding::OneHot,
        true,
        &rows,
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

    let accounts = events
        .iter()
        .map(|e| e.account_id.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len();
    // Training data and every setting: two models of the same data with different settings (a
    // champion and its challenger) get different versions; the same ones, the same version.
    let settings = sha256_hex(
        format!(
            "{p:?}|{:?}|{features:?}|{forest_numeric:?}|{lof_numeric:?}|{:?}|{:?}|{}|{}",
            models.lof,
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
        &history.fingerprint[..8.min(history.fingerprint.len())],
        &settings[..4]
    );
    let manifest = Manifest {
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
            source: history.source.clone(),
            fingerprint: history.fingerprint.clone(),
            rows_read: history.rows_read(),
            rows_valid: history.events.len(),
            rows_invalid: history.rejected.len(),
            accounts,
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
        assert_eq!(set.lof.threshold, set.manifest.lof.training_scores.p95);
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
