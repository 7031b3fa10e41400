//! Backtest reports: what each model made of a replayed stream — per-event rows (CSV), a JSON
//! report and one self-contained HTML page (inline SVG charts, no scripts or network). When
//! events carry labels: precision, recall, F1, ROC-AUC and PR-AUC per model and for the
//! consensus, the confusion matrices, and the recall per fraud pattern.
//!
//! Per-event output is CSV: every tool reads it, it streams, and it is byte-for-byte
//! deterministic; the volumes of a backtest (millions of rows) do not need a columnar format.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use crate::config::Policy;
use crate::decode::Transaction;
use crate::models::{ISOLATION_FOREST, LOF, Verdict, roc_auc};
use crate::publish::Alert;
use crate::replay::{Candidate, Recorded, day_of};

/// What one model made of one event.
#[derive(Debug, Clone)]
pub struct ModelOutcome {
    /// The reason code when the event is invalid.
    pub error: Option<&'static str>,
    pub transaction_id: String,
    pub account_id: String,
    pub time: i64,
    pub forest: f64,
    pub forest_flag: bool,
    pub lof: f64,
    pub lof_flag: bool,
    pub alert: bool,
    /// The policy's margin over the thresholds ([`crate::consensus::margin`]).
    pub margin: f64,
    pub top_features: Vec<&'static str>,
    /// For an alert, its reasons in words.
    pub reason: String,
}

impl ModelOutcome {
    pub fn scored(
        v: &[Verdict; 2],
        policy: Policy,
        tx: &Transaction,
        alert: Option<&Alert>,
    ) -> Self {
        Self {
            error: None,
            transaction_id: tx.transaction_id.to_string(),
            account_id: tx.account_id.to_string(),
            time: tx.time,
            forest: v[0].score,
            forest_flag: v[0].flagged,
            lof: v[1].score,
            lof_flag: v[1].flagged,
            alert: alert.is_some(),
            margin: crate::consensus::margin(policy, v),
            top_features: alert
                .map(|a| a.top_features.iter().map(|c| c.feature).collect())
                .unwrap_or_default(),
            reason: alert.map(|a| a.reason.clone()).unwrap_or_default(),
        }
    }

    pub fn invalid(code: &'static str) -> Self {
        Self {
            error: Some(code),
            transaction_id: String::new(),
            account_id: String::new(),
            time: 0,
            forest: f64::NAN,
            forest_flag: false,
            lof: f64::NAN,
            lof_flag: false,
            alert: false,
            margin: f64::NAN,
            top_features: Vec::new(),
            reason: String::new(),
        }
    }
}

/// Where an event came from and its label.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub partition: i32,
    pub offset: i64,
    pub label: Option<String>,
}

impl EventRecord {
    pub const CSV_HEADER: [&'static str; 16] = [
        "model",
        "partition",
        "offset",
        "transaction_id",
        "account_id",
        "event_time",
        "label",
        "outcome",
        "forest_score",
        "forest_flag",
        "lof_score",
        "lof_flag",
        "alert",
        "margin",
        "top_features",
        "reason",
    ];

    pub fn new(e: &Recorded) -> Self {
        Self {
            partition: e.partition,
            offset: e.offset,
            label: e.label.clone(),
        }
    }

    /// One CSV row per model.
    pub fn write_csv<W: Write>(
        &self,
        w: &mut csv::Writer<W>,
        candidates: &[Candidate],
        outcomes: &[ModelOutcome],
    ) -> csv::Result<()> {
        let num = |x: f64| {
            if x.is_nan() {
                String::new()
            } else {
                x.to_string()
            }
        };
        for (c, o) in candidates.iter().zip(outcomes) {
            let outcome = match (o.error, o.alert) {
                (Some(code), _) => format!("invalid:{code}"),
                (None, true) => "alert".into(),
                (None, false) => "clean".into(),
            };
            w.write_record([
                c.name.as_str(),
                &self.partition.to_string(),
                &self.offset.to_string(),
                &o.transaction_id,
                &o.account_id,
                &if o.error.is_some() {
                    String::new()
                } else {
                    crate::decode::format_time(o.time)
                },
                self.label.as_deref().unwrap_or(""),
                &outcome,
                &num(o.forest),
                &u8::from(o.forest_flag).to_string(),
                &num(o.lof),
                &u8::from(o.lof_flag).to_string(),
                &u8::from(o.alert).to_string(),
                &num(o.margin),
                &o.top_features.join(" "),
                &o.reason,
            ])?;
        }
        Ok(())
    }
}

/// Whether a label marks a positive (fraud), a negative, or neither (malformed, unknown).
pub fn positive(label: &str) -> Option<bool> {
    match label.trim().to_ascii_lowercase().as_str() {
        "" | "malformed" => None,
        "normal" | "0" | "false" | "legit" | "genuine" => Some(false),
        _ => Some(true),
    }
}

/// Average precision (the area under the precision-recall curve as scikit-learn's
/// `average_precision_score` computes it): Σ (Rₙ − Rₙ₋₁) Pₙ over distinct score thresholds.
pub fn average_precision(labelled: &[(f64, bool)]) -> f64 {
    let positives = labelled.iter().filter(|x| x.1).count();
    if positives == 0 {
        return f64::NAN;
    }
    let mut v = labelled.to_vec();
    v.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tp, mut fp, mut ap, mut last_recall) = (0usize, 0usize, 0.0, 0.0);
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j < v.len() && v[j].0 == v[i].0 {
            if v[j].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            j += 1;
        }
        let recall = tp as f64 / positives as f64;
        let precision = tp as f64 / (tp + fp) as f64;
        ap += (recall - last_recall) * precision;
        last_recall = recall;
        i = j;
    }
    ap
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Confusion matrix and scores of one detector against the labels.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Quality {
    pub tp: u64,
    pub fp: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
    pub tn: u64,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
    pub roc_auc: Option<f64>,
    pub pr_auc: Option<f64>,
}

impl Quality {
    /// From (score, predicted, actual) triples.
    pub fn of(rows: &[(f64, bool, bool)]) -> Self {
        let count = |p: bool, a: bool| rows.iter().filter(|r| r.1 == p && r.2 == a).count() as u64;
        let (tp, fp, fn_, tn) = (
            count(true, true),
            count(true, false),
            count(false, true),
            count(false, false),
        );
        let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fn_);
        let f1 = match (precision, recall) {
            (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
            (Some(_), Some(_)) => Some(0.0),
            _ => None,
        };
        let scored: Vec<(f64, bool)> = rows.iter().map(|r| (r.0, r.2)).collect();
        Self {
            tp,
            fp,
            fn_,
            tn,
            precision,
            recall,
            f1,
            roc_auc: finite(roc_auc(&scored)),
            pr_auc: finite(average_precision(&scored)),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Histogram {
    /// Bin lower edges; the last bin also holds everything above.
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
    pub threshold: f64,
}

impl Histogram {
    fn new(lo: f64, step: f64, bins: usize, threshold: f64) -> Self {
        Self {
            edges: (0..bins)
                .map(|i| ((lo + step * i as f64) * 1e6).round() / 1e6)
                .collect(),
            counts: vec![0; bins],
            threshold,
        }
    }
    fn add(&mut self, x: f64) {
        let i = self.edges.iter().rposition(|&e| x >= e).unwrap_or(0);
        self.counts[i] += 1;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub both: u64,
    pub forest_only: u64,
    pub lof_only: u64,
    pub neither: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct KindRecall {
    pub events: u64,
    pub forest_flagged: u64,
    pub lof_flagged: u64,
    pub alerted: u64,
    pub recall: Option<f64>,
}

/// What alerting on a given share of the events would give: the events ranked by the policy's
/// margin, the top `alert_share` of them alerted.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OperatingPoint {
    pub alert_share: f64,
    pub alerts: u64,
    pub alerts_per_day: Option<f64>,
    /// The margin an event needs to be among them (0 is the shipped thresholds).
    pub margin: f64,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    /// Whether this row is the shipped thresholds rather than a budget.
    pub shipped: bool,
}

/// The shares of events an analyst team might afford to review, for the operating-point table.
pub const ALERT_BUDGETS: [f64; 9] = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1];

impl OperatingPoint {
    /// The table: one row per budget of [`ALERT_BUDGETS`] and one for the shipped thresholds,
    /// by alert share. `rows` are (margin, positive, event time) of the labelled events.
    pub fn table(rows: &[(f64, bool, i64)]) -> Vec<Self> {
        let mut v: Vec<(f64, bool, i64)> = rows.to_vec();
        v.sort_by(|a, b| b.0.total_cmp(&a.0));
        let positives = v.iter().filter(|r| r.1).count() as u64;
        let (first, last) = v.iter().fold((i64::MAX, i64::MIN), |(lo, hi), r| {
            (lo.min(r.2), hi.max(r.2))
        });
        let days = (last > first).then(|| (last - first) as f64 / 86_400.0);
        let point = |alerts: usize, shipped: bool| {
            let tp = v[..alerts].iter().filter(|r| r.1).count() as u64;
            let alerts_u = alerts as u64;
            OperatingPoint {
                alert_share: alerts as f64 / v.len().max(1) as f64,
                alerts: alerts_u,
                alerts_per_day: days.map(|d| alerts as f64 / d.max(1.0 / 24.0)),
                margin: if alerts == 0 {
                    f64::INFINITY
                } else {
                    v[alerts - 1].0
                },
                precision: (alerts > 0).then(|| tp as f64 / alerts as f64),
                recall: (positives > 0).then(|| tp as f64 / positives as f64),
                shipped,
            }
        };
        let mut out: Vec<Self> = ALERT_BUDGETS
            .iter()
            .map(|b| ((b * v.len() as f64).round() as usize).min(v.len()))
            .filter(|&n| n > 0)
            .map(|n| point(n, false))
            .collect();
        out.push(point(v.iter().filter(|r| r.0 > 0.0).count(), true));
        out.sort_by(|a, b| a.alerts.cmp(&b.alerts).then(a.shipped.cmp(&b.shipped)));
        out.dedup_by(|b, a| a.alerts == b.alerts && !b.shipped && !a.shipped);
        out
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Labels {
    pub positives: u64,
    pub negatives: u64,
    pub isolation_forest: Quality,
    pub lof: Quality,
    pub consensus: Quality,
    /// Per label value (fraud pattern): how many of its events each model caught.
    pub by_label: BTreeMap<String, KindRecall>,
    /// Alert budgets and the shipped thresholds: alerts per day, precision, recall.
    pub operating_points: Vec<OperatingPoint>,
}

/// How a feature's distribution moved between the training data and the scored events.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FeatureDrift {
    pub feature: String,
    /// Population stability index over the training deciles.
    pub psi: f64,
    /// `stable` (< 0.1), `moderate` (< 0.25) or `major`.
    pub level: &'static str,
}

/// The population stability index of `scored` against `training`: Σ (q − p) ln(q / p) over bins
/// cut at the training deciles (fewer when values repeat), each share floored at 1e-4 (the same
/// index the live drift metric reports).
pub use crate::models::drift::psi;

impl FeatureDrift {
    pub fn new(feature: &str, training: &[f64], scored: &[f64]) -> Self {
        let psi = psi(training, scored);
        Self {
            feature: feature.to_string(),
            psi,
            level: if psi < 0.1 {
                "stable"
            } else if psi < 0.25 {
                "moderate"
            } else {
                "major"
            },
        }
    }
}

/// A time split's facts for the report: where it was cut and how the features drifted.
#[derive(Debug, Clone, Serialize)]
pub struct SplitInfo {
    /// Events before this time trained the model and warmed the state; the rest were scored.
    pub train_until: String,
    pub training_events: usize,
    pub scored_events: usize,
    /// Per model feature, largest drift first.
    pub drift: Vec<FeatureDrift>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub name: String,
    pub dir: String,
    pub version: String,
    pub policy: &'static str,
    pub thresholds: BTreeMap<&'static str, f64>,
    pub events: u64,
    pub valid: u64,
    pub invalid: BTreeMap<&'static str, u64>,
    pub alerts: u64,
    pub alert_rate: Option<f64>,
    pub flags: BTreeMap<&'static str, u64>,
    pub agreement: Agreement,
    pub scores: BTreeMap<&'static str, Histogram>,
    pub alerts_by_day: Vec<(String, u64)>,
    pub top_accounts: Vec<(String, u64)>,
    pub feature_drivers: Vec<(String, u64)>,
    /// The alerts with the largest margins, with their reasons.
    pub strongest_alerts: Vec<AlertSample>,
    pub labels: Option<Labels>,
}

/// One alert as an analyst would read it.
#[derive(Debug, Clone, Serialize)]
pub struct AlertSample {
    pub transaction_id: String,
    pub account_id: String,
    pub event_time: String,
    pub label: Option<String>,
    pub margin: f64,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Disagreement {
    pub partition: i32,
    pub offset: i64,
    pub transaction_id: String,
    pub label: Option<String>,
    pub champion_alert: bool,
    pub challenger_alert: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub champion: String,
    pub challenger: String,
    pub both_alert: u64,
    pub champion_only: u64,
    pub challenger_only: u64,
    pub examples: Vec<Disagreement>,
    /// On labelled input, the model whose consensus has the higher F1 (PR-AUC breaks ties).
    pub better_on_labels: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub input: String,
    pub events: u64,
    pub models: Vec<ModelReport>,
    pub comparisons: Vec<Comparison>,
    /// For a time-split backtest.
    pub split: Option<SplitInfo>,
}

struct Acc {
    report: ModelReport,
    by_day: BTreeMap<String, u64>,
    accounts: BTreeMap<String, u64>,
    features: BTreeMap<String, u64>,
    labelled: Vec<Labelled>,
    /// The strongest alerts so far, strongest first, at most [`STRONGEST_ALERTS`].
    alerts: Vec<AlertSample>,
}

const STRONGEST_ALERTS: usize = 20;

/// One labelled valid event as one model saw it. `consensus` is the policy's margin, which its
/// decision thresholds at 0.
struct Labelled {
    forest: f64,
    lof: f64,
    consensus: f64,
    time: i64,
    forest_flag: bool,
    lof_flag: bool,
    alert: bool,
    positive: bool,
    /// Index into [`ReportBuilder::label_names`]: a replay keeps one of these per labelled
    /// event (exact PR curves need every score), so it holds no string.
    label: u16,
}

/// Accumulates a replay into a [`Report`].
pub struct ReportBuilder {
    input: String,
    events: u64,
    accs: Vec<Acc>,
    /// Champion against each challenger, counted as events arrive (a replay of any length
    /// keeps no per-event record): both, champion only, challenger only, first disagreements.
    vs: Vec<(u64, u64, u64, Vec<Disagreement>)>,
    label_names: Vec<String>,
}

impl ReportBuilder {
    pub fn new(input: String, candidates: &[Candidate]) -> Self {
        let accs = candidates
            .iter()
            .map(|c| {
                let m = c.models();
                let (tf, tl) = (m.forest.threshold.get(), m.lof.threshold.get());
                Acc {
                    report: ModelReport {
                        name: c.name.clone(),
                        dir: c.dir.display().to_string(),
                        version: m.version().to_string(),
                        policy: c.policy().as_str(),
                        thresholds: BTreeMap::from([(ISOLATION_FOREST, tf), (LOF, tl)]),
                        events: 0,
                        valid: 0,
                        invalid: BTreeMap::new(),
                        alerts: 0,
                        alert_rate: None,
                        flags: BTreeMap::from([(ISOLATION_FOREST, 0), (LOF, 0)]),
                        agreement: Agreement {
                            both: 0,
                            forest_only: 0,
                            lof_only: 0,
                            neither: 0,
                        },
                        scores: BTreeMap::from([
                            (ISOLATION_FOREST, Histogram::new(0.3, 0.01, 50, tf)),
                            (LOF, Histogram::new(0.8, 0.05, 60, tl)),
                        ]),
                        alerts_by_day: Vec::new(),
                        top_accounts: Vec::new(),
                        feature_drivers: Vec::new(),
                        strongest_alerts: Vec::new(),
                        labels: None,
                    },
                    by_day: BTreeMap::new(),
                    accounts: BTreeMap::new(),
                    features: BTreeMap::new(),
                    labelled: Vec::new(),
                    alerts: Vec::new(),
                }
            })
            .collect();
        Self {
            input,
            events: 0,
            accs,
            vs: vec![(0, 0, 0, Vec::new()); candidates.len().saturating_sub(1)],
            label_names: Vec::new(),
        }
    }

    pub fn add(&mut self, record: &EventRecord, outcomes: &[ModelOutcome]) {
        self.events += 1;
        let label = record.label.as_deref().and_then(|l| {
            let positive = positive(l)?;
            let index = match self.label_names.iter().position(|n| n == l) {
                Some(i) => i,
                None => {
                    self.label_names.push(l.to_string());
                    self.label_names.len() - 1
                }
            };
            Some((u16::try_from(index).unwrap_or(u16::MAX), positive))
        });
        let mut alerts = Vec::with_capacity(outcomes.len());
        let mut tx_id = String::new();
        for (acc, o) in self.accs.iter_mut().zip(outcomes) {
            let r = &mut acc.report;
            r.events += 1;
            alerts.push(o.alert);
            if let Some(code) = o.error {
                *r.invalid.entry(code).or_default() += 1;
                continue;
            }
            tx_id.clone_from(&o.transaction_id);
            r.valid += 1;
            for (name, score, flag) in [
                (ISOLATION_FOREST, o.forest, o.forest_flag),
                (LOF, o.lof, o.lof_flag),
            ] {
                if let Some(h) = r.scores.get_mut(name) {
                    h.add(score);
                }
                if flag {
                    *r.flags.entry(name).or_default() += 1;
                }
            }
            match (o.forest_flag, o.lof_flag) {
                (true, true) => r.agreement.both += 1,
                (true, false) => r.agreement.forest_only += 1,
                (false, true) => r.agreement.lof_only += 1,
                (false, false) => r.agreement.neither += 1,
            }
            if o.alert {
                r.alerts += 1;
                *acc.by_day.entry(day_of(o.time)).or_default() += 1;
                *acc.accounts.entry(o.account_id.clone()).or_default() += 1;
                for f in &o.top_features {
                    *acc.features.entry((*f).to_string()).or_default() += 1;
                }
                // After the earlier ones of equal margin, as a stable sort would put it.
                let at = acc.alerts.partition_point(|a| a.margin >= o.margin);
                if at < STRONGEST_ALERTS {
                    acc.alerts.insert(
                        at,
                        AlertSample {
                            transaction_id: o.transaction_id.clone(),
                            account_id: o.account_id.clone(),
                            event_time: crate::decode::format_time(o.time),
                            label: record.label.clone(),
                            margin: o.margin,
                            reason: o.reason.clone(),
                        },
                    );
                    acc.alerts.truncate(STRONGEST_ALERTS);
                }
            }
            if let Some((label, pos)) = label {
                acc.labelled.push(Labelled {
                    forest: o.forest,
                    lof: o.lof,
                    consensus: o.margin,
                    time: o.time,
                    forest_flag: o.forest_flag,
                    lof_flag: o.lof_flag,
                    alert: o.alert,
                    positive: pos,
                    label,
                });
            }
        }
        for (j, (both, a_only, b_only, examples)) in self.vs.iter_mut().enumerate() {
            let (a, b) = (alerts[0], alerts[j + 1]);
            match (a, b) {
                (true, true) => *both += 1,
                (true, false) => *a_only += 1,
                (false, true) => *b_only += 1,
                _ => {}
            }
            if a != b && examples.len() < 25 {
                examples.push(Disagreement {
                    partition: record.partition,
                    offset: record.offset,
                    transaction_id: tx_id.clone(),
                    label: record.label.clone(),
                    champion_alert: a,
                    challenger_alert: b,
                });
            }
        }
    }

    pub fn build(&self) -> Report {
        let top = |m: &BTreeMap<String, u64>, n: usize| {
            let mut v: Vec<(String, u64)> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v.truncate(n);
            v
        };
        let models: Vec<ModelReport> = self
            .accs
            .iter()
            .map(|acc| {
                let mut r = acc.report.clone();
                r.alert_rate = (r.valid > 0).then(|| r.alerts as f64 / r.valid as f64);
                r.alerts_by_day = acc.by_day.iter().map(|(k, v)| (k.clone(), *v)).collect();
                r.top_accounts = top(&acc.accounts, 10);
                r.feature_drivers = top(&acc.features, 20);
                r.strongest_alerts = acc.alerts.clone();
                if !acc.labelled.is_empty() {
                    let rows = |score: fn(&Labelled) -> (f64, bool)| {
                        acc.labelled
                            .iter()
                            .map(|x| {
                                let (s, p) = score(x);
                                (s, p, x.positive)
                            })
                            .collect::<Vec<_>>()
                    };
                    let mut by_label: BTreeMap<String, KindRecall> = BTreeMap::new();
                    for x in acc.labelled.iter().filter(|x| x.positive) {
                        let name = self
                            .label_names
                            .get(usize::from(x.label))
                            .cloned()
                            .unwrap_or_default();
                        let k = by_label.entry(name).or_insert(KindRecall {
                            events: 0,
                            forest_flagged: 0,
                            lof_flagged: 0,
                            alerted: 0,
                            recall: None,
                        });
                        k.events += 1;
                        k.forest_flagged += u64::from(x.forest_flag);
                        k.lof_flagged += u64::from(x.lof_flag);
                        k.alerted += u64::from(x.alert);
                    }
                    for k in by_label.values_mut() {
                        k.recall = Some(k.alerted as f64 / k.events as f64);
                    }
                    let positives = acc.labelled.iter().filter(|x| x.positive).count() as u64;
                    r.labels = Some(Labels {
                        positives,
                        negatives: acc.labelled.len() as u64 - positives,
                        isolation_forest: Quality::of(&rows(|x| (x.forest, x.forest_flag))),
                        lof: Quality::of(&rows(|x| (x.lof, x.lof_flag))),
                        consensus: Quality::of(&rows(|x| (x.consensus, x.alert))),
                        by_label,
                        operating_points: OperatingPoint::table(
                            &acc.labelled
                                .iter()
                                .map(|x| (x.consensus, x.positive, x.time))
                                .collect::<Vec<_>>(),
                        ),
                    });
                }
                r
            })
            .collect();
        let mut comparisons = Vec::new();
        for j in 1..models.len() {
            let (both, a_only, b_only, examples) = self.vs[j - 1].clone();
            let score = |m: &ModelReport| {
                m.labels.as_ref().map(|l| {
                    (
                        l.consensus.f1.unwrap_or(0.0),
                        l.consensus.pr_auc.unwrap_or(0.0),
                    )
                })
            };
            let better = match (score(&models[0]), score(&models[j])) {
                (Some(a), Some(b)) if b > a => Some(models[j].name.clone()),
                (Some(a), Some(b)) if a > b => Some(models[0].name.clone()),
                (Some(_), Some(_)) => Some("tie".to_string()),
                _ => None,
            };
            comparisons.push(Comparison {
                champion: models[0].name.clone(),
                challenger: models[j].name.clone(),
                both_alert: both,
                champion_only: a_only,
                challenger_only: b_only,
                examples,
                better_on_labels: better,
            });
        }
        Report {
            input: self.input.clone(),
            events: self.events,
            models,
            comparisons,
            split: None,
        }
    }
}

pub use html::to_html;

mod html;

/// The report as pretty JSON (stable key order, shortest round-trip floats).
pub fn to_json(r: &Report) -> String {
    serde_json::to_string_pretty(r).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_matches_a_hand_count() {
        // score, predicted, actual
        let rows = [
            (0.9, true, true),
            (0.8, true, false),
            (0.7, false, true),
            (0.2, false, false),
            (0.1, false, false),
        ];
        let q = Quality::of(&rows);
        assert_eq!((q.tp, q.fp, q.fn_, q.tn), (1, 1, 1, 2));
        assert_eq!(q.precision, Some(0.5));
        assert_eq!(q.recall, Some(0.5));
        assert_eq!(q.f1, Some(0.5));
        // Positives at 0.9 and 0.7; negatives at 0.8, 0.2, 0.1: 5 of 6 pairs ordered right.
        assert_eq!(q.roc_auc, Some(5.0 / 6.0));
        // Thresholds 0.9 (R .5, P 1), 0.8 (R .5, P .5), 0.7 (R 1, P 2/3): AP = .5·1 + .5·2/3.
        let ap = q.pr_auc.unwrap_or_default();
        assert!((ap - (0.5 + 0.5 * 2.0 / 3.0)).abs() < 1e-12, "{ap}");
    }

    #[test]
    fn average_precision_handles_ties_like_scikit_learn() {
        // sklearn.metrics.average_precision_score([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.1]) == 2/3:
        // one threshold holds all three tied events (P = 2/3 at R = 1).
        let ap = average_precision(&[(0.5, true), (0.5, false), (0.5, true), (0.1, false)]);
        assert!((ap - 2.0 / 3.0).abs() < 1e-12, "{ap}");
        assert!(average_precision(&[(0.3, false)]).is_nan());
    }

    #[test]
    fn labels_are_positive_for_fraud_patterns_and_ignored_when_malformed() {
        assert_eq!(positive("card_testing"), Some(true));
        assert_eq!(positive("normal"), Some(false));
        assert_eq!(positive("0"), Some(false));
        assert_eq!(positive("1"), Some(true));
        assert_eq!(positive("malformed"), None);
    }

    /// A real time-split backtest of simulated traffic, rendered: every table and chart of the
    /// page has rows, and the page is self-contained.
    #[test]
    fn a_backtest_report_renders_every_section_with_real_rows_and_nothing_remote() {
        use crate::backtest::{Cut, Split};
        use crate::replay::Recorded;
        use crate::simulate::Simulator;

        let mut sim =
            Simulator::with_options(8, Some(300), crate::simulate::Scenarios::even(0.03, 0.002));
        let events = Recorded::simulated(&mut sim, 9_000);
        let split = Split::of_events(
            "<simulated>",
            events,
            crate::config::Encoding::Json,
            Cut::Share(1.0 / 3.0),
        );
        let cfg = crate::config::RawConfig::default()
            .validate()
            .unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let r = crate::backtest::run("<simulated>", split, &cfg, dir.path())
            .unwrap_or_else(|e| panic!("{e}"))
            .report;
        let m = &r.models[0];
        let labels = m.labels.as_ref().unwrap_or_else(|| panic!("no labels"));
        assert!(
            m.alerts > 20 && labels.positives > 50,
            "{} alerts",
            m.alerts
        );
        assert!(labels.by_label.len() >= 5, "{:?}", labels.by_label.keys());
        assert!(labels.operating_points.iter().any(|p| p.shipped));
        assert!(labels.operating_points.len() >= 6);
        assert!(
            !m.strongest_alerts.is_empty()
                && m.strongest_alerts.iter().all(|a| !a.reason.is_empty())
        );

        let html = to_html(&r);
        assert!(html.contains("&lt;simulated&gt;"));
        let count = |needle: &str| html.matches(needle).count();
        for section in [
            "Time split",
            "Feature drift",
            "Recall per label",
            "Operating points",
            "(the thresholds)",
            "Strongest alerts and their reasons",
            "Agreement between the models",
        ] {
            assert!(html.contains(section), "{section}");
        }
        // Tables with rows: per pattern, per budget, per drifting feature, per alert.
        assert!(count("<tr>") > 60, "{} rows", count("<tr>"));
        assert!(count("<rect") > 50, "{} bars", count("<rect"));
        for banned in ["<script", "http://", "https://", "src="] {
            assert!(!html.contains(banned), "{banned}");
        }
        let written = std::fs::read_to_string(dir.path().join("report.html")).unwrap_or_default();
        assert_eq!(written, html);
    }
}
