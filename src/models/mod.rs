//! Models: the isolation forest and LOF detectors, their encoders and thresholds, and the
//! versioned artifact directory they are saved to and loaded from.
//!
//! An artifact is a directory with `manifest.json` (feature names, vocabularies, scaler,
//! thresholds, parameters, training fingerprint), `forest.json` (the flattened forest) and
//! `lof.json` (the LOF reference set with its k-distances and densities).

pub mod drift;
pub mod encoding;
pub mod forest;
pub mod lof;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{FeatureConfig, ForestParams, LofIndexKind, LofParams};
use crate::decode::Transaction;
use crate::features::{Baseline, Context, FEATURES, Features, Topic, categorical_index};
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
    /// LOF's neighbours of the latest event assessed, for its explanation.
    pub neighbours: Vec<(f64, u32)>,
}

/// One detector: an encoder, a score (higher = more anomalous) and a threshold.
pub trait Detector: Send + Sync {
    /// Stable name used in alerts, metrics and the API.
    fn name(&self) -> &'static str;
    /// The encoder that makes this detector's input row.
    fn encoder(&self) -> &Encoder;
    /// Scores above this are flagged: the (1 - contamination) quantile of training scores.
    fn threshold(&self) -> f64;
    /// The median training score: what a typical event scores.
    fn median(&self) -> f64;
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
        let (threshold, median) = (self.threshold(), self.median());
        let unit = threshold - median;
        Verdict {
            model: self.name(),
            score,
            threshold,
            flagged: score > threshold,
            margin: if unit > 0.0 {
                (score - threshold) / unit
            } else {
                score - threshold
            },
        }
    }
}

/// A detector's threshold: the one it was trained with, or one set live by an operator
/// ([`Threshold::set`]) until [`Threshold::reset`]. Read once per event; an event sees the old
/// value or the new one, never anything in between.
#[derive(Debug)]
pub struct Threshold {
    trained: f64,
    serving: std::sync::atomic::AtomicU64,
}

impl Threshold {
    pub fn new(trained: f64) -> Self {
        Self {
            trained,
            serving: std::sync::atomic::AtomicU64::new(trained.to_bits()),
        }
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.serving.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn set(&self, threshold: f64) {
        self.serving
            .store(threshold.to_bits(), std::sync::atomic::Ordering::Relaxed);
    }

    pub fn reset(&self) {
        self.set(self.trained);
    }

    pub fn trained(&self) -> f64 {
        self.trained
    }
}

/// One model's opinion of one event.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Verdict {
    pub model: &'static str,
    pub score: f64,
    pub threshold: f64,
    pub flagged: bool,
    /// How far above the threshold the score is, in units of the threshold's own distance above
    /// the median training score (negative below the threshold): comparable across models.
    pub margin: f64,
}

/// Isolation forest over raw numerics and ordinal-encoded categoricals.
#[derive(Debug)]
pub struct IsolationForest {
    pub encoder: Encoder,
    pub forest: FlatForest,
    pub threshold: Threshold,
    pub median: f64,
}

impl Detector for IsolationForest {
    fn name(&self) -> &'static str {
        ISOLATION_FOREST
    }
    fn encoder(&self) -> &Encoder {
        &self.encoder
    }
    fn threshold(&self) -> f64 {
        self.threshold.get()
    }
    fn median(&self) -> f64 {
        self.median
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
    pub threshold: Threshold,
    pub median: f64,
}

impl Detector for Lof {
    fn name(&self) -> &'static str {
        LOF
    }
    fn encoder(&self) -> &Encoder {
        &self.encoder
    }
    fn threshold(&self) -> f64 {
        self.threshold.get()
    }
    fn median(&self) -> f64 {
        self.median
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
    /// 0 when each threshold comes from its model's contamination.
    pub target_alert_rate: f64,
    /// The consensus policy a target alert rate was reached under.
    pub policy: String,
    /// What training decided on its own, e.g. calendar features it left out.
    pub notes: Vec<String>,
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
    /// The newest training event's time: the model describes the data up to then. Derived from
    /// the data, not the clock, so that the same data give the same artifact.
    pub created_at: String,
    /// The state/feature parameters the models were trained with; serving uses the same.
    pub features: FeatureConfig,
    pub isolation_forest: ForestSection,
    pub lof: LofSection,
    pub training: TrainingInfo,
    /// Each model feature's training deciles, for the live drift index (absent in artifacts
    /// made before it: no drift is reported for them).
    #[serde(default)]
    pub drift: Vec<drift::FeatureBaseline>,
}

/// 2: vigil's own seeded forest with node counts, LOF neighbourhood spreads, the account-relative
/// features. Artifacts of format 1 must be retrained.
pub const MANIFEST_FORMAT: u32 = 2;

/// A loaded model set: what the pipeline scores with.
#[derive(Debug)]
pub struct ModelSet {
    pub manifest: Manifest,
    /// Live traffic's features against the training baselines.
    pub drift: drift::DriftMonitor,
    pub forest: IsolationForest,
    pub lof: Lof,
}

/// Writes `name` in `dir` whole or not at all (a temporary file renamed over it), so that a
/// reader of a directory being written — another instance's watch, a reload — sees each file
/// complete.
fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), ModelError> {
    let path = dir.join(name);
    let bytes = serde_json::to_vec(value).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, bytes)
        .and_then(|()| std::fs::rename(&partial, &path))
        .map_err(|source| ModelError::Io { path, source })
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
    /// events at once. Also returns LOF's neighbours of each event, for its explanation.
    #[allow(clippy::type_complexity)]
    pub fn assess_many(&self, features: &[Features]) -> (Vec<[Verdict; 2]>, Vec<Vec<(f64, u32)>>) {
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
        let mut neighbours = Vec::new();
        let lof =
            self.lof
                .model
                .score_many(&self.lof.index, &encode(&self.lof.encoder), &mut neighbours);
        let verdicts = forest
            .into_iter()
            .zip(lof)
            .map(|(f, l)| [self.forest.verdict(f), self.lof.verdict(l)])
            .collect();
        (verdicts, neighbours)
    }

    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    /// The threshold of the model named `name`, if it is one of the two.
    pub fn threshold_of(&self, name: &str) -> Option<&Threshold> {
        match name {
            ISOLATION_FOREST => Some(&self.forest.threshold),
            LOF => Some(&self.lof.threshold),
            _ => None,
        }
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

    /// The version of the artifact in `dir`, read from its manifest alone; `None` when there
    /// is none or it cannot be read.
    pub fn version_in(dir: &Path) -> Option<String> {
        #[derive(Deserialize)]
        struct Named {
            version: String,
        }
        let bytes = std::fs::read(dir.join("manifest.json")).ok()?;
        serde_json::from_slice::<Named>(&bytes)
            .ok()
            .map(|n| n.version)
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
                "manifest format {} is not {MANIFEST_FORMAT}: retrain it with `vigil train`",
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
        if model.dims != lw
            || model.points.len() != model.lrd.len() * lw
            || model.spread.len() != model.points.len()
            || model.k == 0
        {
            return Err(ModelError::Inconsistent(format!(
                "LOF reference set of width {} does not fit the encoder ({lw})",
                model.dims
            )));
        }
        let knn = KnnIndex::build(index, &model.points, model.dims, model.k);
        Ok(Self {
            drift: drift::DriftMonitor::new(&manifest.drift),
            forest: IsolationForest {
                encoder: manifest.isolation_forest.encoder.clone(),
                forest,
                threshold: Threshold::new(manifest.isolation_forest.threshold),
                median: manifest.isolation_forest.training_scores.p50,
            },
            lof: Lof {
                encoder: manifest.lof.encoder.clone(),
                model,
                index: knn,
                threshold: Threshold::new(manifest.lof.threshold),
                median: manifest.lof.training_scores.p50,
            },
            manifest,
        })
    }

    /// Why the models scored this event as they did, for a person: each model's score is
    /// attributed to its input columns ([`FlatForest::attribution`], [`LofModel::attribution`]),
    /// columns are summed into features, each model's attribution is normalised to shares and
    /// the two averaged. Features are grouped by [`Topic`]; the strongest topics come first, each
    /// in the words of its strongest feature whose value is really unusual — a topic whose
    /// features are all ordinary is left out, so a normal fact is never given as a reason.
    /// `neighbours` are LOF's neighbours of the event (from its scoring).
    pub fn explain(
        &self,
        f: &Features,
        account: &AccountState,
        tx: &Transaction,
        cfg: &FeatureConfig,
        top: usize,
        neighbours: &[(f64, u32)],
    ) -> Vec<Contribution> {
        if top == 0 {
            return Vec::new();
        }
        let forest = by_feature(
            &self.forest.encoder,
            &self
                .forest
                .forest
                .attribution(&self.forest.encoder.encode(f)),
        );
        let lof = by_feature(
            &self.lof.encoder,
            &self
                .lof
                .model
                .attribution(&self.lof.encoder.encode(f), neighbours),
        );
        let shares = |v: &[(Feature, f64)]| {
            let total: f64 = v.iter().map(|x| x.1).sum();
            v.iter()
                .map(|&(k, x)| (k, if total > 0.0 { x / total } else { 0.0 }))
                .collect::<Vec<_>>()
        };
        let (forest, lof) = (shares(&forest), shares(&lof));
        let share_of = |v: &[(Feature, f64)], k: Feature| {
            v.iter().filter(|x| x.0 == k).map(|x| x.1).sum::<f64>()
        };
        let mut features: Vec<Feature> = forest.iter().chain(&lof).map(|x| x.0).collect();
        features.sort();
        features.dedup();
        // (feature, combined, forest, lof), strongest first.
        let mut ranked: Vec<(Feature, f64, f64, f64)> = features
            .into_iter()
            .map(|k| {
                let (a, b) = (share_of(&forest, k), share_of(&lof, k));
                (k, (a + b) / 2.0, a, b)
            })
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));

        let context = Context::new(account, tx, cfg);
        let scaler = self.lof.encoder.scaler.as_ref();
        let baseline = |i: usize| {
            let col = self
                .lof
                .encoder
                .numeric_indexes()
                .iter()
                .position(|&n| n == i)?;
            let s = scaler?;
            Some(Baseline {
                median: s.center[col],
                scale: s.scale[col],
            })
        };
        let mut topics: Vec<(Topic, f64, f64, f64)> = Vec::new();
        for &(k, combined, a, b) in &ranked {
            let Feature::Numeric(i) = k else { continue };
            let topic = FEATURES[i].topic;
            match topics.iter_mut().find(|t| t.0 == topic) {
                Some(t) => {
                    t.1 += combined;
                    t.2 += a;
                    t.3 += b;
                }
                None => topics.push((topic, combined, a, b)),
            }
        }
        topics.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut out = Vec::new();
        for (topic, share, forest_share, lof_share) in topics {
            if share <= 0.0 {
                break;
            }
            let worded = ranked.iter().find_map(|&(k, _, _, _)| {
                let Feature::Numeric(i) = k else { return None };
                let def = &FEATURES[i];
                if def.topic != topic {
                    return None;
                }
                let value = f.numeric[i];
                (def.reason)(&context, value, baseline(i).as_ref())
                    .map(|detail| (def.name, value, detail))
            });
            if let Some((feature, value, detail)) = worded {
                out.push(Contribution {
                    feature,
                    value,
                    share,
                    forest_share,
                    lof_share,
                    detail,
                });
                if out.len() == top {
                    break;
                }
            }
        }
        out
    }
}

/// A model input feature: numeric (index into [`FEATURES`]) or categorical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Feature {
    Numeric(usize),
    Categorical(usize),
}

/// Sums per-column attributions into per-feature ones (one-hot columns into their feature).
fn by_feature(enc: &Encoder, columns: &[f64]) -> Vec<(Feature, f64)> {
    let mut out: Vec<(Feature, f64)> = enc
        .numeric_indexes()
        .iter()
        .map(|&i| (Feature::Numeric(i), 0.0))
        .collect();
    for v in &enc.categorical {
        out.push((
            Feature::Categorical(categorical_index(&v.feature).unwrap_or(0)),
            0.0,
        ));
    }
    let numeric = enc.numeric_indexes().len();
    for (col, (name, &x)) in enc.columns.iter().zip(columns).enumerate() {
        let slot = if col < numeric {
            col
        } else {
            let feature = name.split('=').next().unwrap_or(name);
            numeric
                + enc
                    .categorical
                    .iter()
                    .position(|v| v.feature == feature)
                    .unwrap_or(0)
        };
        if let Some(o) = out.get_mut(slot) {
            o.1 += x;
        }
    }
    out
}

/// One reason in an alert: a topic the models' scores rest on, worded by its strongest feature.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contribution {
    /// The feature whose value is worded.
    pub feature: &'static str,
    pub value: f64,
    /// The topic's share of the two models' attributions (0–1), and each model's.
    pub share: f64,
    pub forest_share: f64,
    pub lof_share: f64,
    /// The reason, for a person.
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
