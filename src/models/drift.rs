//! Drift: how far the features of the events being scored moved from those the models were
//! trained on, as the population stability index (PSI) over the training deciles. Training
//! records each model feature's decile edges and shares in the manifest ([`FeatureBaseline`]);
//! serving counts the scored events into the same bins ([`DriftMonitor`]) over a window of the
//! latest 10,000–20,000 events, and `/metrics` exposes each feature's PSI
//! (`vigil_feature_drift_psi`; NaN until 1,000 events were counted). Below 0.1 a distribution is stable, from 0.25 it has moved
//! enough that the thresholds (training quantiles) no longer mean what they meant.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::features::{Features, numeric_index};

/// A share below this counts as this, so that an empty bin does not make the index infinite.
const FLOOR: f64 = 1e-4;

/// One feature's training distribution: the decile edges (fewer when values repeat) and the
/// share of training events in each bin they cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureBaseline {
    pub feature: String,
    pub edges: Vec<f64>,
    pub shares: Vec<f64>,
}

impl FeatureBaseline {
    pub fn of(feature: &str, training: &[f64]) -> Self {
        let mut sorted = training.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mut edges: Vec<f64> = (1..10)
            .map(|d| super::encoding::percentile_sorted(&sorted, f64::from(d) * 10.0))
            .filter(|e| e.is_finite())
            .collect();
        edges.dedup();
        let mut counts = vec![0.0; edges.len() + 1];
        for &x in training {
            counts[bin(&edges, x)] += 1.0;
        }
        Self {
            feature: feature.to_string(),
            shares: shares(&counts),
            edges,
        }
    }

    /// The index against `counts` of events per bin (0 without events).
    pub fn psi(&self, counts: &[f64]) -> f64 {
        if counts.iter().sum::<f64>() <= 0.0 {
            return 0.0;
        }
        self.shares
            .iter()
            .zip(shares(counts))
            .map(|(p, q)| (q - p) * (q / p).ln())
            .sum()
    }
}

fn bin(edges: &[f64], x: f64) -> usize {
    edges.partition_point(|&e| e < x)
}

fn shares(counts: &[f64]) -> Vec<f64> {
    let total: f64 = counts.iter().sum();
    counts
        .iter()
        .map(|c| (c / total.max(f64::MIN_POSITIVE)).max(FLOOR))
        .collect()
}

/// The PSI of `scored` against `training`.
pub fn psi(training: &[f64], scored: &[f64]) -> f64 {
    if training.is_empty() || scored.is_empty() {
        return 0.0;
    }
    let baseline = FeatureBaseline::of("", training);
    let mut counts = vec![0.0; baseline.shares.len()];
    for &x in scored {
        counts[bin(&baseline.edges, x)] += 1.0;
    }
    baseline.psi(&counts)
}

/// Events one worker counted since it last handed them to the monitor.
#[derive(Debug, Default)]
pub struct DriftCounts {
    counts: Vec<Vec<f64>>,
    events: u32,
}

/// A worker hands its counts over after this many events: one lock per batch, not per event.
const HAND_OVER_EVERY: u32 = 256;
/// When the window holds this many events, every count is halved: the index describes about
/// the latest 10,000 to 20,000 events rather than everything since the start.
const WINDOW: f64 = 20_000.0;
/// No index is reported before the window holds this many events.
const MIN_EVENTS: f64 = 1_000.0;

/// The live counterpart of the training baselines.
#[derive(Debug)]
pub struct DriftMonitor {
    baselines: Vec<(usize, FeatureBaseline)>,
    window: Mutex<(Vec<Vec<f64>>, f64)>,
}

impl DriftMonitor {
    /// Watches the baselines of features the pipeline computes (others are skipped).
    pub fn new(baselines: &[FeatureBaseline]) -> Self {
        let baselines: Vec<_> = baselines
            .iter()
            .filter_map(|b| Some((numeric_index(&b.feature)?, b.clone())))
            .collect();
        let empty = baselines.iter().map(|(_, b)| vec![0.0; b.shares.len()]);
        Self {
            window: Mutex::new((empty.collect(), 0.0)),
            baselines,
        }
    }

    /// Counts one scored event's features into a worker's `local` counts.
    pub fn observe(&self, local: &mut DriftCounts, features: &Features) {
        if self.baselines.is_empty() {
            return;
        }
        if local.counts.len() != self.baselines.len() {
            local.counts = self
                .baselines
                .iter()
                .map(|(_, b)| vec![0.0; b.shares.len()])
                .collect();
            local.events = 0;
        }
        for ((i, b), counts) in self.baselines.iter().zip(&mut local.counts) {
            counts[bin(&b.edges, features.numeric[*i])] += 1.0;
        }
        local.events += 1;
        if local.events >= HAND_OVER_EVERY {
            self.hand_over(local);
        }
    }

    /// Adds a worker's counts to the window and empties them.
    pub fn hand_over(&self, local: &mut DriftCounts) {
        let Ok(mut window) = self.window.lock() else {
            return;
        };
        let (counts, total) = &mut *window;
        if local.counts.len() == counts.len() {
            for (into, from) in counts.iter_mut().zip(&mut local.counts) {
                for (a, b) in into.iter_mut().zip(from.iter_mut()) {
                    *a += *b;
                    *b = 0.0;
                }
            }
            *total += f64::from(local.events);
        }
        local.events = 0;
        if *total >= WINDOW {
            counts.iter_mut().flatten().for_each(|c| *c /= 2.0);
            *total /= 2.0;
        }
    }

    /// Each watched feature's index over the window; NaN (unknown, which no alert threshold
    /// crosses) until the window holds enough events.
    pub fn psi(&self) -> Vec<(&str, f64)> {
        let Ok(window) = self.window.lock() else {
            return Vec::new();
        };
        let known = window.1 >= MIN_EVENTS;
        self.baselines
            .iter()
            .zip(&window.0)
            .map(|((_, b), counts)| {
                (
                    b.feature.as_str(),
                    if known { b.psi(counts) } else { f64::NAN },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{CATEGORICAL_FEATURES, FEATURES};

    fn features_with(name: &str, value: f64) -> Features {
        let mut f = Features {
            numeric: [0.0; FEATURES.len()],
            categorical: [""; CATEGORICAL_FEATURES.len()],
        };
        if let Some(i) = numeric_index(name) {
            f.numeric[i] = value;
        }
        f
    }

    #[test]
    fn the_same_distribution_is_stable_and_a_shifted_one_is_not() {
        let training: Vec<f64> = (0..10_000).map(|i| f64::from(i % 100)).collect();
        assert!(psi(&training, &training).abs() < 1e-12);
        let shifted: Vec<f64> = training.iter().map(|x| x + 50.0).collect();
        assert!(psi(&training, &shifted) > 1.0);
    }

    #[test]
    fn the_monitor_reports_once_it_has_enough_events_and_follows_the_latest_ones() {
        let training: Vec<f64> = (0..5_000).map(|i| f64::from(i % 100)).collect();
        let monitor = DriftMonitor::new(&[
            FeatureBaseline::of("amount_log", &training),
            FeatureBaseline::of("not_a_feature", &training),
        ]);
        let mut local = DriftCounts::default();
        let feed = |local: &mut DriftCounts, n: u32, shift: f64| {
            for i in 0..n {
                monitor.observe(
                    local,
                    &features_with("amount_log", f64::from(i % 100) + shift),
                );
            }
            monitor.hand_over(local);
        };
        feed(&mut local, 500, 0.0);
        assert!(monitor.psi()[0].1.is_nan(), "too few events yet");
        feed(&mut local, 5_000, 0.0);
        let stable = monitor.psi();
        assert_eq!(stable.len(), 1, "unknown features are not watched");
        assert!(stable[0].1 < 0.01, "{stable:?}");
        // Traffic moves: within a window or two the index says so.
        feed(&mut local, 40_000, 60.0);
        let moved = monitor.psi();
        assert!(moved[0].1 > 0.25, "{moved:?}");
    }
}
