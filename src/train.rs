//! Training: history (CSV or JSON lines) is decoded and validated like the live stream, put in
//! event-time order, replayed through the same per-account state and feature code, and used to fit
//! both detectors. The result is a versioned [`ModelSet`].

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::config::{FeatureConfig, ModelConfig};
use crate::decode::{DecodeError, Decoder, RawTransaction, Transaction, format_time, validate};
use crate::features::{Features, observe};
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

/// Trains both detectors on `history` and returns the model set (not yet saved).
pub fn train(
    history: &History,
    models: &ModelConfig,
    features: &FeatureConfig,
) -> Result<ModelSet, ModelError> {
    let events = in_event_time_order(history.events.clone());
    if events.len() < 3 {
        return Err(ModelError::Training(format!(
            "{} valid events in {}; at least 3 are needed",
            events.len(),
            history.source
        )));
    }
    let rows = replay_features(&events, features);

    let forest_encoder = Encoder::fit(
        &models.numeric,
        &models.categorical,
        CategoricalEncoding::Ordinal,
        false,
        &rows,
    )?;
    let forest_rows: Vec<Vec<f64>> = rows.iter().map(|r| forest_encoder.encode(r)).collect();
    let p = models.forest;
    let opts = forest::options(p.trees, p.samples, p.extension_level, forest_rows.len());
    let sample_size = opts.sample_size;
    let flat = forest::train(&forest_rows, &opts)?;
    let forest_scores: Vec<f64> = forest_rows.iter().map(|r| flat.score(r)).collect();
    let forest_threshold = percentile(&forest_scores, 100.0 * (1.0 - p.contamination));

    let lof_encoder = Encoder::fit(
        &models.numeric,
        &models.categorical,
        CategoricalEncoding::OneHot,
        true,
        &rows,
    )?;
    let dims = lof_encoder.width();
    let points: Vec<f64> = rows.iter().flat_map(|r| lof_encoder.encode(r)).collect();
    let index = KnnIndex::build(models.lof.index, &points, dims, models.lof.neighbors);
    let lof = LofModel::fit(points, dims, models.lof.neighbors, &index)?;
    let lof_threshold = percentile(&lof.training_lof, 100.0 * (1.0 - models.lof.contamination));

    let created = chrono::Utc::now();
    let accounts = events
        .iter()
        .map(|e| e.account_id.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len();
    // Time, training data and parameters: two models trained in the same second on the same
    // data with different settings (a champion and its challenger) get different versions.
    let settings = sha256_hex(format!("{p:?}|{:?}|{features:?}", models.lof).as_bytes());
    let version = format!(
        "{}-{}-{}",
        created.format("%Y%m%dT%H%M%SZ"),
        &history.fingerprint[..8.min(history.fingerprint.len())],
        &settings[..4]
    );
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        version,
        created_at: created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
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
            training_scores: ScoreSummary::of(&lof.training_lof),
            encoder: lof_encoder,
        },
        training: TrainingInfo {
            source: history.source.clone(),
            fingerprint: history.fingerprint.clone(),
            rows_read: history.rows_read(),
            rows_valid: history.events.len(),
            rows_invalid: history.rejected.len(),
            accounts,
            first_event: events
                .first()
                .map(|e| format_time(e.time))
                .unwrap_or_default(),
            last_event: events
                .last()
                .map(|e| format_time(e.time))
                .unwrap_or_default(),
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
        let set = train(&h, &models, &FeatureConfig::default()).unwrap_or_else(|e| panic!("{e}"));
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
        let lof_train_flags = set
            .lof
            .model
            .training_lof
            .iter()
            .filter(|s| **s > set.lof.threshold)
            .count();
        assert!(
            (110..=140).contains(&lof_train_flags),
            "lof flagged {lof_train_flags} of training"
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
