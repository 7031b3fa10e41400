//! Detection quality, measured as a bank would: a time split of labelled simulated traffic (train
//! on the first third, score the rest with the account state warm), at the shipped defaults;
//! the bundled real dataset's alert rate under the same split; reasons that name the injected
//! signal; and reproducible training.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use vigil::backtest::{Cut, Split};
use vigil::config::{Config, Encoding, RawConfig};
use vigil::features::{FEATURES, Topic, numeric_index};
use vigil::replay::Recorded;
use vigil::report::Report;
use vigil::simulate::{Label, Scenarios, Simulator};
use vigil::train::{History, bundled_history, train};

fn defaults() -> Config {
    RawConfig::default().validate().unwrap()
}

/// 60,000 events of 1,000 accounts (about a month), 2 % of them fraud over the six patterns.
fn simulated(seed: u64) -> Vec<Recorded> {
    let mut sim = Simulator::with_options(seed, Some(1_000), Scenarios::even(0.02, 0.001));
    Recorded::simulated(&mut sim, 60_000)
}

/// A time-split backtest at the defaults: the report and each scored event's CSV row.
fn backtest(events: Vec<Recorded>) -> (Report, Vec<BTreeMap<String, String>>) {
    let split = Split::of_events("simulated", events, Encoding::Json, Cut::Share(1.0 / 3.0));
    let dir = tempfile::tempdir().unwrap();
    let report = vigil::backtest::run("simulated", split, &defaults(), dir.path())
        .unwrap()
        .report;
    let rows = csv::Reader::from_path(dir.path().join("events.csv"))
        .unwrap()
        .deserialize()
        .collect::<Result<Vec<BTreeMap<String, String>>, _>>()
        .unwrap();
    (report, rows)
}

fn shared_backtest() -> &'static (Report, Vec<BTreeMap<String, String>>) {
    static RUN: OnceLock<(Report, Vec<BTreeMap<String, String>>)> = OnceLock::new();
    RUN.get_or_init(|| backtest(simulated(2026)))
}

/// The floor this suite holds the defaults to, a little under what docs/backtesting.md measured
/// on such streams (consensus precision 0.80–0.83, recall 0.92–0.94, PR-AUC 0.93–0.95; every
/// pattern 0.78–1.0): a change that makes detection clearly worse fails here. The goal
/// (precision 0.8 at recall 0.9, every pattern 0.8) is met on four of the five streams measured;
/// this one (seed 2026) has precision 0.799 and odd hours 0.78.
#[test]
fn a_time_split_of_simulated_traffic_keeps_precision_recall_and_every_pattern_above_the_floor() {
    let (report, _) = shared_backtest();
    let m = &report.models[0];
    let labels = m.labels.as_ref().unwrap();
    let consensus = &labels.consensus;
    let (precision, recall) = (consensus.precision.unwrap(), consensus.recall.unwrap());
    assert!(
        precision >= 0.77 && recall >= 0.9,
        "precision {precision:.3} recall {recall:.3}"
    );
    assert!(consensus.pr_auc.unwrap() >= 0.9, "{:?}", consensus.pr_auc);
    for kind in Label::FRAUD {
        let k = &labels.by_label[kind.as_str()];
        assert!(
            k.recall.unwrap() >= 0.75,
            "{}: recall {:?} of {}",
            kind.as_str(),
            k.recall,
            k.events
        );
    }
    // The shipped point is a row of the operating-point table.
    assert!(labels.operating_points.iter().any(|p| p.shipped));
}

/// What each pattern injects, as feature topics: a reason naming one of them names the signal.
fn injected(label: &str) -> &'static [Topic] {
    match label {
        "account_takeover" => &[Topic::Novelty, Topic::Login, Topic::Balance, Topic::Amount],
        "card_testing" => &[
            Topic::Velocity,
            Topic::Novelty,
            Topic::Amount,
            Topic::Duration,
        ],
        "balance_drain" => &[Topic::Balance, Topic::Amount],
        "odd_hours" => &[Topic::Hour],
        "login_spike" => &[Topic::Login, Topic::Duration],
        "amount_spike" => &[Topic::Amount, Topic::Balance],
        _ => &[],
    }
}

#[test]
fn the_first_reason_of_nearly_every_true_alert_names_the_injected_signal() {
    let (_, rows) = shared_backtest();
    let mut per_pattern: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for r in rows.iter().filter(|r| r["alert"] == "1") {
        let label = r["label"].as_str();
        if injected(label).is_empty() {
            continue;
        }
        let first = r["top_features"].split(' ').next().unwrap_or("");
        let topic = numeric_index(first).map(|i| FEATURES[i].topic);
        assert!(!r["reason"].is_empty(), "an alert without a reason: {r:?}");
        let e = per_pattern.entry(label).or_default();
        e.0 += 1;
        e.1 += usize::from(topic.is_some_and(|t| injected(label).contains(&t)));
    }
    assert_eq!(per_pattern.len(), Label::FRAUD.len(), "{per_pattern:?}");
    for (label, (alerts, named)) in per_pattern {
        let share = named as f64 / alerts as f64;
        assert!(
            share >= 0.9,
            "{label}: {named} of {alerts} first reasons name the signal"
        );
    }
}

#[test]
fn no_alert_lists_a_normal_fact_as_a_reason() {
    let (_, rows) = shared_backtest();
    for r in rows.iter().filter(|r| r["alert"] == "1") {
        let reason = &r["reason"];
        for normal in ["is the account's usual", "training median", "= 0.00"] {
            assert!(!reason.contains(normal), "{reason}");
        }
    }
}

#[test]
fn a_time_split_of_the_bundled_real_dataset_alerts_on_at_most_one_and_a_half_times_the_contamination()
 {
    let history = bundled_history().unwrap();
    let events: Vec<Recorded> = history
        .events
        .iter()
        .enumerate()
        .map(|(i, t)| Recorded {
            partition: 0,
            offset: i as i64,
            payload: serde_json::to_vec(t).unwrap(),
            label: None,
            published_at: None,
            warm_only: false,
        })
        .collect();
    let (report, _) = backtest(events);
    let m = &report.models[0];
    let contamination = defaults().models.forest.contamination;
    let rate = m.alert_rate.unwrap();
    assert!(m.valid > 1_500, "{} scored", m.valid);
    assert!(rate <= 1.5 * contamination, "alert rate {rate:.4}");
}

fn history_of(events: &[Recorded]) -> History {
    vigil::train::history_from_payloads(
        "simulated",
        events.iter().map(|e| e.payload.as_slice()),
        &vigil::decode::Decoder::Json,
    )
}

#[test]
fn training_twice_with_the_same_seed_writes_byte_identical_model_directories() {
    let cfg = defaults();
    let events: Vec<Recorded> = simulated(5).into_iter().take(6_000).collect();
    let history = history_of(&events);
    let save = |seed: u64| {
        let mut models = cfg.models.clone();
        models.forest.seed = seed;
        let set = train(&history, &models, &cfg.features, cfg.policy).unwrap();
        let dir = tempfile::tempdir().unwrap();
        set.save(dir.path()).unwrap();
        let files: BTreeMap<String, Vec<u8>> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        (set.manifest.isolation_forest.params.seed, files)
    };
    let (seed_a, a) = save(7);
    let (_, b) = save(7);
    assert_eq!(seed_a, 7, "the seed is recorded in the manifest");
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        ["forest.json", "lof.json", "manifest.json"]
    );
    for (name, bytes) in &a {
        assert!(b[name] == *bytes, "{name} differs between two trainings");
    }
    let (_, c) = save(8);
    assert!(
        c["forest.json"] != a["forest.json"],
        "another seed, another forest"
    );
}
