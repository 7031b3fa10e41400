//! Models: the isolation forest and LOF detectors, their encoders and thresholds, and the
//! versioned artifact directory they are saved to and loaded from.
//!
//! An artifact is a directory with `manifest.json` (feature names, vocabularies, scaler,
//! thresholds, parameters, training fingerprint), `forest.json` (the flattened forest) and
//! `lof.json` (the LOF reference set with its k-distances and densities).

pub mod encoding;
pub mod forest;
pub mod lof;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{FeatureConfig, ForestParams, LofIndexKind, LofParams};
use crate::decode::Transaction;
use crate::features::{Features, NUMERIC_FEATURES};
use crate::state::AccountState;
use encoding::Encoder;
use forest::FlatForest;
use lof::{KnnIndex, LofModel};

/// Errors from training, saving or loading models.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown feature `{0}`")]
    UnknownFeature(String),
    #[error("model data is inconsistent: {0}")]
    Inconsistent(String),
    #[error("training failed: {0}")]
    Training(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Per-call scratch space, so that scoring allocates nothing per event.
#[derive(Debug, Default)]
pub struct Scratch {
    row: Vec<f64>,
    neighbours: Vec<(f64, u32)>,
}

/// One detector: an encoder, a score (higher = more anomalous) and a threshold.
pub trait Detector: Send + Sync {
    /// Stable name used in alerts, metrics and the API.
    fn name(&self) -> &'static str;
    /// The encoder that makes this detector's input row.
    fn encoder(&self) -> &Encoder;
    /// Scores above this are flagged: the (1 - contamination) quantile of training scores.
    fn threshold(&self) -> f64;
    /// Score of an encoded row.
    fn score_row(&self, row: &[f64], scratch: &mut Vec<(f64, u32)>) -> f64;

    /// Encodes and scores one event's features.
    fn assess(&self, f: &Features, scratch: &mut Scratch) -> Verdict {
        self.encoder().encode_into(f, &mut scratch.row);
        let score = self.score_row(&scratch.row, &mut scratch.neighbours);
        self.verdict(score)
    }

    /// This detector's verdict on a score.
    fn verdict(&self, score: f64) -> Verdict {
        Verdict {
            model: self.name(),
            score,
            threshold: self.threshold(),
            flagged: score > self.threshold(),
        }
    }
}

/// One model's opinion of one event.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Verdict {
    pub model: &'static str,
    pub score: f64,
    pub threshold: f64,
    pub flagged: bool,
}

/// Isolation forest over raw numerics and ordinal-encoded categoricals.
#[derive(Debug)]
pub struct IsolationForest {
    pub encoder: Encoder,
    pub forest: FlatForest,
    pub threshold: f64,
}

impl Detector for IsolationForest {
    fn name(&self) -> &'static str {
        ISOLATION_FOREST
    }
    fn encoder(&self) -> &Encoder {
        &self.encoder
    }
    fn threshold(&self) -> f64 {
        self.threshold
    }
    fn score_row(&self, row: &[f64], _: &mut Vec<(f64, u32)>) -> f64 {
        self.forest.score(row)
    }
}

/// LOF over robust-scaled numerics and one-hot categoricals.
#[derive(Debug)]
pub struct Lof {
    pub encoder: Encoder,
    pub model: LofModel,
    pub index: KnnIndex,
    pub threshold: f64,
}

impl Detector for Lof {
    fn name(&self) -> &'static str {
        LOF
    }
    fn encoder(&self) -> &Encoder {
        &self.encoder
    }
    fn threshold(&self) -> f64 {
        self.threshold
    }
    fn score_row(&self, row: &[f64], scratch: &mut Vec<(f64, u32)>) -> f64 {
        self.model.score(&self.index, row, scratch)
    }
}

pub const ISOLATION_FOREST: &str = "isolation_forest";
pub const LOF: &str = "lof";

/// Summary of a score distribution, kept in the manifest for people and dashboards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreSummary {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl ScoreSummary {
    pub fn of(scores: &[f64]) -> Self {
        let mut s = scores.to_vec();
        s.sort_by(f64::total_cmp);
        let p = |q| encoding::percentile_sorted(&s, q);
        Self {
            min: p(0.0),
            p50: p(50.0),
            p90: p(90.0),
            p95: p(95.0),
            p99: p(99.0),
            max: p(100.0),
        }
    }
}

/// Where the training data came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingInfo {
    pub source: String,
    /// SHA-256 of the input bytes.
    pub fingerprint: String,
    pub rows_read: usize,
    pub rows_valid: usize,
    pub rows_invalid: usize,
    pub accounts: usize,
    pub first_event: String,
    pub last_event: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForestSection {
    pub params: ForestParams,
    /// Rows per tree actually used (`samples`, capped at the training rows).
    pub sample_size: usize,
    pub threshold: f64,
    pub training_scores: ScoreSummary,
    pub encoder: Encoder,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LofSection {
    pub params: LofParams,
    /// Neighbours actually used (`neighbors`, capped at training rows - 1).
    pub k: usize,
    pub threshold: f64,
    pub training_scores: ScoreSummary,
    pub encoder: Encoder,
}

/// Everything about a trained model set except the bulky parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub version: String,
    pub created_at: String,
    /// The state/feature parameters the models were trained with; serving uses the same.
    pub features: FeatureConfig,
    pub isolation_forest: ForestSection,
    pub lof: LofSection,
    pub training: TrainingInfo,
}

pub const MANIFEST_FORMAT: u32 = 1;

/// A loaded model set: what the pipeline scores with.
#[derive(Debug)]
pub struct ModelSet {
    pub manifest: Manifest,
    pub forest: IsolationForest,
    pub lof: Lof,
}

fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), ModelError> {
    let path = dir.join(name);
    let bytes = serde_json::to_vec(value).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&path, bytes).map_err(|source| ModelError::Io { path, source })
}

fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> Result<T, ModelError> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ModelError::Json { path, source })
}

impl ModelSet {
    /// Both detectors, forest first.
    pub fn detectors(&self) -> [&dyn Detector; 2] {
        [&self.forest, &self.lof]
    }

    /// Both verdicts for one event's features, forest first.
    pub fn assess(&self, f: &Features, scratch: &mut Scratch) -> [Verdict; 2] {
        [self.forest.assess(f, scratch), self.lof.assess(f, scratch)]
    }

    /// [`Self::assess`] of many events, equal to assessing them one by one but cheaper per
    /// event: the forest is walked tree by tree and LOF scans its reference set for groups of
    /// events at once.
    pub fn assess_many(&self, features: &[Features]) -> Vec<[Verdict; 2]> {
        let encode = |enc: &Encoder| {
            let mut rows = Vec::with_capacity(features.len() * enc.width());
            let mut row = Vec::new();
            for f in features {
                enc.encode_into(f, &mut row);
                rows.extend_from_slice(&row);
            }
            rows
        };
        let forest = self
            .forest
            .forest
            .score_many(&encode(&self.forest.encoder), self.forest.encoder.width());
        let lof =
            self.lof
                .model
                .score_many(&self.lof.index, &encode(&self.lof.encoder), &mut Vec::new());
        forest
            .into_iter()
            .zip(lof)
            .map(|(f, l)| [self.forest.verdict(f), self.lof.verdict(l)])
            .collect()
    }

    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    /// Writes the artifact into `dir` (created if needed), manifest last so that a directory
    /// with a manifest is always complete.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_json(dir, "forest.json", &self.forest.forest)?;
        write_json(dir, "lof.json", &self.lof.model)?;
        write_json(dir, "manifest.json", &self.manifest)
    }

    /// Whether `dir` holds a complete artifact.
    pub fn exists(dir: &Path) -> bool {
        dir.join("manifest.json").is_file()
    }

    /// Loads an artifact and builds the LOF neighbour index of the requested kind.
    pub fn load(dir: &Path, index: LofIndexKind) -> Result<Self, ModelError> {
        let mut manifest: Manifest = read_json(dir, "manifest.json")?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(ModelError::Inconsistent(format!(
                "manifest format {} is not {MANIFEST_FORMAT}",
                manifest.format
            )));
        }
        manifest.isolation_forest.encoder.resolve()?;
        manifest.lof.encoder.resolve()?;
        let forest: FlatForest = read_json(dir, "forest.json")?;
        let model: LofModel = read_json(dir, "lof.json")?;
        Self::assemble(manifest, forest, model, index)
    }

    /// Puts the parts together, checking that they fit each other.
    pub fn assemble(
        manifest: Manifest,
        forest: FlatForest,
        model: LofModel,
        index: LofIndexKind,
    ) -> Result<Self, ModelError> {
        let fw = manifest.isolation_forest.encoder.width();
        if forest.dims > fw || forest.roots.is_empty() {
            return Err(ModelError::Inconsistent(format!(
                "forest expects {} columns, encoder makes {fw}",
                forest.dims
            )));
        }
        let lw = manifest.lof.encoder.width();
        if model.dims != lw || model.points.len() != model.lrd.len() * lw || model.k == 0 {
            return Err(ModelError::Inconsistent(format!(
                "LOF reference set of width {} does not fit the encoder ({lw})",
                model.dims
            )));
        }
        let knn = KnnIndex::build(index, &model.points, model.dims, model.k);
        Ok(Self {
            forest: IsolationForest {
                encoder: manifest.isolation_forest.encoder.clone(),
                forest,
                threshold: manifest.isolation_forest.threshold,
            },
            lof: Lof {
                encoder: manifest.lof.encoder.clone(),
                model,
                index: knn,
                threshold: manifest.lof.threshold,
            },
            manifest,
        })
    }

    /// The features that most set this event apart, largest deviation first: distance from the
    /// training median in interquartile ranges (LOF's scaler), with the account's own baseline
    /// where it has one.
    pub fn explain(
        &self,
        f: &Features,
        account: &AccountState,
        tx: &Transaction,
        top: usize,
    ) -> Vec<Contribution> {
        let enc = &self.lof.encoder;
        let Some(scaler) = &enc.scaler else {
            return Vec::new();
        };
        // Deviations of every numeric feature, largest first (ties in feature order); only the
        // few kept are worded.
        let mut ranked: Vec<(usize, f64, f64)> = enc
            .numeric_indexes()
            .iter()
            .zip(scaler.center.iter().zip(&scaler.scale))
            .map(|(&i, (&center, &scale))| (i, center, (f.numeric[i] - center).abs() / scale))
            .filter(|&(_, _, deviation)| deviation > 0.0)
            .collect();
        ranked.sort_by(|a, b| b.2.total_cmp(&a.2));
        ranked.truncate(top);
        ranked
            .into_iter()
            .map(|(i, center, deviation)| {
                let name = NUMERIC_FEATURES[i];
                let value = f.numeric[i];
                let usual = |what: &str, seen: Option<&str>, now: &str| match seen {
                    Some(u) if u != now => format!("{what} {now} is not the account's usual {u}"),
                    _ => format!("{what} {now} is the account's usual"),
                };
                let detail = match name {
                    "is_not_most_frequent_ip" => usual("IP", account.ips.most_frequent(), &tx.ip_address),
                    "is_not_most_frequent_device" => {
                        usual("device", account.devices.most_frequent(), &tx.device_id)
                    }
                    "is_not_most_frequent_location" => {
                        usual("location", account.locations.most_frequent(), &tx.location)
                    }
                    "is_not_most_frequent_merchant" => {
                        usual("merchant", account.merchants.most_frequent(), &tx.merchant_id)
                    }
                    "TransactionAmount" if !account.recent_amounts.is_empty() => {
                        let mean = account.recent_amounts.iter().sum::<f64>()
                            / account.recent_amounts.len() as f64;
                        format!(
                            "amount {value:.2} vs the account's recent {mean:.2} (training median {center:.2})"
                        )
                    }
                    "exceeds_75_percent_balance" if value > 0.0 => format!(
                        "amount {:.2} is over 75% of the balance {:.2}",
                        tx.amount, tx.balance
                    ),
                    _ => format!("{name} = {value:.2}, training median {center:.2}"),
                };
                Contribution {
                    feature: name,
                    value,
                    baseline: center,
                    deviation,
                    detail,
                }
            })
            .collect()
    }
}

/// One feature's part in an alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contribution {
    pub feature: &'static str,
    pub value: f64,
    pub baseline: f64,
    pub deviation: f64,
    pub detail: String,
}

/// Area under the ROC curve of (score, is_positive) pairs; ties count half.
pub fn roc_auc(labelled: &[(f64, bool)]) -> f64 {
    let mut v = labelled.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut positives) = (0.0, 0usize);
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j < v.len() && v[j].0 == v[i].0 {
            j += 1;
        }
        let avg_rank = (i + j + 1) as f64 / 2.0;
        for x in &v[i..j] {
            if x.1 {
                rank_sum += avg_rank;
                positives += 1;
            }
        }
        i = j;
    }
    let negatives = v.len() - positives;
    if positives == 0 || negatives == 0 {
        return f64::NAN;
    }
    (rank_sum - (positives * (positives + 1)) as f64 / 2.0) / (positives * negatives) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_auc_of_perfect_random_and_tied_rankings() {
        assert_eq!(roc_auc(&[(0.1, false), (0.2, false), (0.9, true)]), 1.0);
        assert_eq!(roc_auc(&[(0.9, false), (0.1, true)]), 0.0);
        assert_eq!(roc_auc(&[(0.5, false), (0.5, true)]), 0.5);
    }
}
