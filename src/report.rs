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
    pub top_features: Vec<&'static str>,
}

impl ModelOutcome {
    pub fn scored(v: &[Verdict; 2], tx: &Transaction, alert: Option<&Alert>) -> Self {
        Self {
            error: None,
            transaction_id: tx.transaction_id.clone(),
            account_id: tx.account_id.clone(),
            time: tx.time,
            forest: v[0].score,
            forest_flag: v[0].flagged,
            lof: v[1].score,
            lof_flag: v[1].flagged,
            alert: alert.is_some(),
            top_features: alert
                .map(|a| a.top_features.iter().map(|c| c.feature).collect())
                .unwrap_or_default(),
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
            top_features: Vec::new(),
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
    pub const CSV_HEADER: [&'static str; 14] = [
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
        "top_features",
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
                &o.top_features.join(" "),
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

#[derive(Debug, Clone, Serialize)]
pub struct Labels {
    pub positives: u64,
    pub negatives: u64,
    pub isolation_forest: Quality,
    pub lof: Quality,
    pub consensus: Quality,
    /// Per label value (fraud pattern): how many of its events each model caught.
    pub by_label: BTreeMap<String, KindRecall>,
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
    pub labels: Option<Labels>,
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
}

struct Acc {
    report: ModelReport,
    policy: Policy,
    forest_threshold: f64,
    lof_threshold: f64,
    by_day: BTreeMap<String, u64>,
    accounts: BTreeMap<String, u64>,
    features: BTreeMap<String, u64>,
    labelled: Vec<Labelled>,
}

/// One labelled valid event as one model saw it. `consensus` is the score the policy's decision
/// thresholds at 1: the smaller (policy `all`) or larger (`any`) of the two scores divided by
/// their thresholds.
struct Labelled {
    forest: f64,
    lof: f64,
    consensus: f64,
    forest_flag: bool,
    lof_flag: bool,
    alert: bool,
    positive: bool,
    label: String,
}

/// Accumulates a replay into a [`Report`].
pub struct ReportBuilder {
    input: String,
    events: u64,
    accs: Vec<Acc>,
    alerts: Vec<Vec<bool>>,
    keys: Vec<(i32, i64, String, Option<String>)>,
}

impl ReportBuilder {
    pub fn new(input: String, candidates: &[Candidate]) -> Self {
        let accs = candidates
            .iter()
            .map(|c| {
                let m = c.models();
                let (tf, tl) = (m.forest.threshold, m.lof.threshold);
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
                        labels: None,
                    },
                    policy: c.policy(),
                    forest_threshold: tf,
                    lof_threshold: tl,
                    by_day: BTreeMap::new(),
                    accounts: BTreeMap::new(),
                    features: BTreeMap::new(),
                    labelled: Vec::new(),
                }
            })
            .collect();
        Self {
            input,
            events: 0,
            accs,
            alerts: Vec::new(),
            keys: Vec::new(),
        }
    }

    pub fn add(&mut self, record: &EventRecord, outcomes: &[ModelOutcome]) {
        self.events += 1;
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
            }
            if let Some((label, pos)) = record
                .label
                .as_ref()
                .and_then(|l| positive(l).map(|p| (l, p)))
            {
                let (f, l) = (o.forest / acc.forest_threshold, o.lof / acc.lof_threshold);
                let consensus = match acc.policy {
                    Policy::All => f.min(l),
                    Policy::Any => f.max(l),
                    Policy::IsolationForest => f,
                    Policy::Lof => l,
                };
                acc.labelled.push(Labelled {
                    forest: o.forest,
                    lof: o.lof,
                    consensus,
                    forest_flag: o.forest_flag,
                    lof_flag: o.lof_flag,
                    alert: o.alert,
                    positive: pos,
                    label: label.clone(),
                });
            }
        }
        self.alerts.push(alerts);
        self.keys
            .push((record.partition, record.offset, tx_id, record.label.clone()));
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
                        let k = by_label.entry(x.label.clone()).or_insert(KindRecall {
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
                    });
                }
                r
            })
            .collect();
        let mut comparisons = Vec::new();
        for j in 1..models.len() {
            let (mut both, mut a_only, mut b_only, mut examples) = (0, 0, 0, Vec::new());
            for (alerts, key) in self.alerts.iter().zip(&self.keys) {
                let (a, b) = (alerts[0], alerts[j]);
                match (a, b) {
                    (true, true) => both += 1,
                    (true, false) => a_only += 1,
                    (false, true) => b_only += 1,
                    _ => {}
                }
                if a != b && examples.len() < 25 {
                    examples.push(Disagreement {
                        partition: key.0,
                        offset: key.1,
                        transaction_id: key.2.clone(),
                        label: key.3.clone(),
                        champion_alert: a,
                        challenger_alert: b,
                    });
                }
            }
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
        }
    }
}

/// The report as pretty JSON (stable key order, shortest round-trip floats).
pub fn to_json(r: &Report) -> String {
    serde_json::to_string_pretty(r).unwrap_or_default() + "\n"
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn pct(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:.1}%", v * 100.0))
}

fn num3(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{v:.3}"))
}

/// A bar chart of labelled values as inline SVG; `mark` draws a vertical line at that x value
/// (histogram thresholds).
fn bars(values: &[(String, u64)], mark: Option<(f64, &[f64])>, color: &str) -> String {
    let (w, h, pad) = (640.0, 180.0, 28.0);
    let max = values.iter().map(|v| v.1).max().unwrap_or(0).max(1) as f64;
    let n = values.len().max(1) as f64;
    let bw = (w - 2.0 * pad) / n;
    let mut svg = format!(r#"<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">"#);
    svg += &format!(
        r##"<line x1="{pad}" y1="{y}" x2="{x2}" y2="{y}" stroke="#999"/>"##,
        y = h - pad,
        x2 = w - pad
    );
    for (i, (label, v)) in values.iter().enumerate() {
        let bh = (*v as f64 / max) * (h - 2.0 * pad);
        let x = pad + i as f64 * bw;
        svg += &format!(
            r#"<rect x="{x:.1}" y="{y:.1}" width="{bwm:.1}" height="{bh:.1}" fill="{color}"><title>{t}: {v}</title></rect>"#,
            y = h - pad - bh,
            bwm = (bw - 1.0).max(0.5),
            t = esc(label)
        );
    }
    if let (Some(first), Some(last)) = (values.first(), values.last()) {
        svg += &format!(
            r##"<text x="{pad}" y="{y}" font-size="11" fill="#555">{}</text>"##,
            esc(&first.0),
            y = h - 8.0
        );
        svg += &format!(
            r##"<text x="{x}" y="{y}" font-size="11" fill="#555" text-anchor="end">{}</text>"##,
            esc(&last.0),
            x = w - pad,
            y = h - 8.0
        );
    }
    svg += &format!(r##"<text x="{pad}" y="14" font-size="11" fill="#555">max {max}</text>"##);
    if let Some((at, edges)) = mark {
        if let (Some(lo), Some(hi)) = (edges.first(), edges.last()) {
            let step = if edges.len() > 1 {
                edges[1] - edges[0]
            } else {
                1.0
            };
            let frac = ((at - lo) / (hi + step - lo)).clamp(0.0, 1.0);
            let x = pad + frac * (w - 2.0 * pad);
            svg += &format!(
                r##"<line x1="{x:.1}" y1="{pad}" x2="{x:.1}" y2="{y}" stroke="#c0392b" stroke-width="2" stroke-dasharray="4 3"/><text x="{tx:.1}" y="{pad}" font-size="11" fill="#c0392b">threshold {at:.3}</text>"##,
                y = h - pad,
                tx = x + 4.0
            );
        }
    }
    svg + "</svg>"
}

fn quality_row(name: &str, q: &Quality) -> String {
    format!(
        "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        num3(q.precision),
        num3(q.recall),
        num3(q.f1),
        num3(q.roc_auc),
        num3(q.pr_auc),
        q.tp,
        q.fp,
        q.fn_,
        q.tn
    )
}

/// The report as one self-contained HTML page: inline CSS and SVG, no scripts, no requests.
pub fn to_html(r: &Report) -> String {
    let mut h = String::new();
    h += r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>vigil backtest</title><style>
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:980px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}h3{margin-top:1.4rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.kpi{display:inline-block;margin:0 1.5rem .5rem 0}.kpi b{display:block;font-size:1.4rem}.muted{color:#666}svg{max-width:100%;height:auto;display:block}
</style></head><body>"#;
    h += &format!(
        "<h1>vigil backtest</h1><p class=\"muted\">Input: {} · {} events</p>",
        esc(&r.input),
        r.events
    );
    for c in &r.comparisons {
        h += &format!(
            "<h2>Champion {} vs challenger {}</h2><table><tr><th></th><th>events</th></tr><tr><td>both alert</td><td>{}</td></tr><tr><td>only {}</td><td>{}</td></tr><tr><td>only {}</td><td>{}</td></tr></table>",
            esc(&c.champion),
            esc(&c.challenger),
            c.both_alert,
            esc(&c.champion),
            c.champion_only,
            esc(&c.challenger),
            c.challenger_only
        );
        if let Some(b) = &c.better_on_labels {
            h += &format!(
                "<p>Better on the labels (consensus F1, then PR-AUC): <b>{}</b></p>",
                esc(b)
            );
        }
        if !c.examples.is_empty() {
            h += "<h3>Disagreements (first 25)</h3><table><tr><th>transaction</th><th>partition/offset</th><th>label</th><th>champion</th><th>challenger</th></tr>";
            for e in &c.examples {
                h += &format!(
                    "<tr><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&e.transaction_id),
                    e.partition,
                    e.offset,
                    esc(e.label.as_deref().unwrap_or("")),
                    if e.champion_alert { "alert" } else { "–" },
                    if e.challenger_alert { "alert" } else { "–" }
                );
            }
            h += "</table>";
        }
    }
    for m in &r.models {
        h += &format!(
            "<h2>Model {} <span class=\"muted\">({}, policy {})</span></h2>",
            esc(&m.name),
            esc(&m.version),
            m.policy
        );
        let invalid: u64 = m.invalid.values().sum();
        h += &format!(
            "<div class=\"kpi\"><b>{}</b>valid events</div><div class=\"kpi\"><b>{}</b>invalid</div><div class=\"kpi\"><b>{}</b>alerts</div><div class=\"kpi\"><b>{}</b>alert rate</div>",
            m.valid,
            invalid,
            m.alerts,
            pct(m.alert_rate)
        );
        if let Some(l) = &m.labels {
            h += &format!(
                "<h3>Against the labels <span class=\"muted\">({} positives, {} negatives)</span></h3>",
                l.positives, l.negatives
            );
            h += "<table><tr><th>detector</th><th>precision</th><th>recall</th><th>F1</th><th>ROC-AUC</th><th>PR-AUC</th><th>TP</th><th>FP</th><th>FN</th><th>TN</th></tr>";
            h += &quality_row("isolation forest", &l.isolation_forest);
            h += &quality_row("LOF", &l.lof);
            h += &quality_row("consensus (alerts)", &l.consensus);
            h += "</table><h3>Recall per label</h3><table><tr><th>label</th><th>events</th><th>forest flagged</th><th>LOF flagged</th><th>alerted</th><th>recall</th></tr>";
            for (k, v) in &l.by_label {
                h += &format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(k),
                    v.events,
                    v.forest_flagged,
                    v.lof_flagged,
                    v.alerted,
                    pct(v.recall)
                );
            }
            h += "</table>";
        }
        h += "<h3>Alerts over time (per day of event time)</h3>";
        h += &bars(&m.alerts_by_day, None, "#c0392b");
        h += &format!(
            "<h3>Agreement between the models</h3><table><tr><th></th><th>LOF flags</th><th>LOF does not</th></tr><tr><td>forest flags</td><td>{}</td><td>{}</td></tr><tr><td>forest does not</td><td>{}</td><td>{}</td></tr></table>",
            m.agreement.both, m.agreement.forest_only, m.agreement.lof_only, m.agreement.neither
        );
        for (name, hist) in &m.scores {
            h += &format!(
                "<h3>{} score distribution</h3>",
                if *name == ISOLATION_FOREST {
                    "Isolation forest"
                } else {
                    "LOF"
                }
            );
            let vals: Vec<(String, u64)> = hist
                .edges
                .iter()
                .zip(&hist.counts)
                .map(|(e, c)| (format!("{e}"), *c))
                .collect();
            h += &bars(&vals, Some((hist.threshold, &hist.edges)), "#2c7fb8");
        }
        h += "<h3>Features that drive alerts</h3>";
        h += &bars(&m.feature_drivers, None, "#8e44ad");
        h += "<table><tr><th>feature</th><th>alerts listing it</th></tr>";
        for (f, n) in &m.feature_drivers {
            h += &format!("<tr><td>{}</td><td>{n}</td></tr>", esc(f));
        }
        h += "</table><h3>Top accounts by alerts</h3><table><tr><th>account</th><th>alerts</th></tr>";
        for (a, n) in &m.top_accounts {
            h += &format!("<tr><td>{}</td><td>{n}</td></tr>", esc(a));
        }
        h += "</table>";
    }
    h += "</body></html>\n";
    h
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

    #[test]
    fn the_html_page_has_no_scripts_or_remote_resources() {
        let r = Report {
            input: "<x>".into(),
            events: 0,
            models: Vec::new(),
            comparisons: Vec::new(),
        };
        let html = to_html(&r);
        assert!(html.contains("&lt;x&gt;"));
        for banned in ["<script", "http://", "https://", "src="] {
            assert!(!html.contains(banned), "{banned}");
        }
    }
}
