//! Time-split backtests: the question a bank asks of a model — trained on what we had, how does
//! it do on what came next? A labelled file is put in event-time order and cut at a time `T`
//! (given, or where the first `train_share` of its events ends). The events before `T` train the
//! models and warm the per-account state unscored, as a live instance that had been running
//! would have it; the events from `T` on are scored through the live per-event path
//! ([`crate::replay`]), and only they count in the report. The report adds how each model
//! feature's distribution drifted between the two parts.

use std::path::Path;

use crate::config::{Config, Encoding};
use crate::decode::{Decoder, format_time};
use crate::features::{Features, numeric_index};
use crate::models::{ModelError, ModelSet};
use crate::replay::{Candidate, Input, Outputs, Recorded, ReplayError, read_file, replay};
use crate::report::{FeatureDrift, Report, SplitInfo};
use crate::train::{History, history_from_payloads, in_event_time_order, replay_features, train};
use crate::triage::VerdictLabels;

#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A finished backtest: the trained models' manifest and the report of the scored part.
pub struct Backtest {
    pub models: crate::models::Manifest,
    pub report: Report,
}

/// Trains models with `cfg` on the split's past, saves them to `out/model`, scores the rest
/// through the live path and writes `events.csv`, `report.json` and `report.html` into `out`.
pub fn run(name: &str, split: Split, cfg: &Config, out: &Path) -> Result<Backtest, BacktestError> {
    let models: ModelSet = train(&split.training, &cfg.models, &cfg.features, cfg.policy)?;
    let model_dir = out.join("model");
    models.save(&model_dir)?;
    // Every numeric feature either model reads, each once, in the forest's order then LOF's.
    let m = &models.manifest;
    let mut read: Vec<String> = m.isolation_forest.encoder.numeric.clone();
    for f in &m.lof.encoder.numeric {
        if !read.contains(f) {
            read.push(f.clone());
        }
    }
    let info = split.info(&read, &cfg.features);
    let manifest = models.manifest.clone();
    let mut candidates = vec![Candidate::new(
        "backtest".into(),
        model_dir,
        models,
        Decoder::new(split.encoding),
        cfg.policy,
        cfg.top_features,
        cfg.event_time,
    )];
    let input = Input::Recorded {
        name: name.to_string(),
        events: split.events,
        encoding: split.encoding,
    };
    let outputs = Outputs {
        dir: out.to_path_buf(),
        split: Some(info),
        verdicts: split.verdicts,
    };
    let report = replay(&input, &mut candidates, &outputs)?;
    Ok(Backtest {
        models: manifest,
        report,
    })
}

/// Where to cut.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cut {
    /// Events before this time (seconds since the epoch) train.
    At(i64),
    /// This share of the valid events, in event time, trains.
    Share(f64),
}

/// A file cut in two by event time.
#[derive(Debug)]
pub struct Split {
    pub until: i64,
    /// Every event in event-time order (invalid ones where they were), offsets renumbered; those
    /// before `until` are warm-only.
    pub events: Vec<Recorded>,
    pub encoding: Encoding,
    /// The valid events before `until`, decoded, for training.
    pub training: History,
    /// Label the scored events by analysts' verdicts instead of their own labels.
    pub verdicts: Option<VerdictLabels>,
}

impl Split {
    /// Reads `path` and cuts it.
    pub fn of_file(path: &Path, cut: Cut) -> Result<Self, ReplayError> {
        let (events, encoding) = read_file(path)?;
        Ok(Self::of_events(
            &path.display().to_string(),
            events,
            encoding,
            cut,
        ))
    }

    /// Orders `events` by event time and cuts them. An event that cannot be decoded keeps the
    /// time of the event before it, so it stays where it was in the stream.
    pub fn of_events(source: &str, events: Vec<Recorded>, encoding: Encoding, cut: Cut) -> Self {
        let decoder = Decoder::new(encoding);
        let mut last = i64::MIN;
        let mut timed: Vec<(i64, Recorded)> = events
            .into_iter()
            .map(|e| {
                if let Ok(tx) = decoder.decode(&e.payload) {
                    last = tx.time;
                }
                (last, e)
            })
            .collect();
        timed.sort_by_key(|(t, _)| *t);
        let until = match cut {
            Cut::At(t) => t,
            Cut::Share(share) => {
                let valid: Vec<i64> = timed
                    .iter()
                    .filter(|(_, e)| decoder.decode(&e.payload).is_ok())
                    .map(|(t, _)| *t)
                    .collect();
                let at = ((valid.len() as f64 * share.clamp(0.0, 1.0)) as usize)
                    .min(valid.len().saturating_sub(1));
                valid.get(at).copied().unwrap_or(i64::MAX)
            }
        };
        let events: Vec<Recorded> = timed
            .into_iter()
            .enumerate()
            .map(|(i, (t, e))| Recorded {
                offset: i as i64,
                partition: 0,
                warm_only: t < until,
                ..e
            })
            .collect();
        let training = history_from_payloads(
            &format!("{source} before {}", format_time(until)),
            events
                .iter()
                .filter(|e| e.warm_only)
                .map(|e| e.payload.as_slice()),
            &decoder,
        );
        Self {
            until,
            events,
            encoding,
            training,
            verdicts: None,
        }
    }

    /// The split's facts for the report, with the drift of each of `features` (the models'
    /// numeric features) between training and scored events, largest first.
    pub fn info(&self, features: &[String], cfg: &crate::config::FeatureConfig) -> SplitInfo {
        let decoder = Decoder::new(self.encoding);
        let all: Vec<_> = self
            .events
            .iter()
            .filter_map(|e| decoder.decode(&e.payload).ok())
            .collect();
        let scored = all.iter().filter(|t| t.time >= self.until).count();
        let rows: Vec<Features> = replay_features(&in_event_time_order(all.clone()), cfg);
        let times: Vec<i64> = in_event_time_order(all).iter().map(|t| t.time).collect();
        let column = |i: usize, later: bool| -> Vec<f64> {
            rows.iter()
                .zip(&times)
                .filter(|(_, t)| (**t >= self.until) == later)
                .map(|(r, _)| r.numeric[i])
                .collect()
        };
        let mut drift: Vec<FeatureDrift> = features
            .iter()
            .filter_map(|name| {
                let i = numeric_index(name)?;
                Some(FeatureDrift::new(name, &column(i, false), &column(i, true)))
            })
            .collect();
        drift.sort_by(|a, b| b.psi.total_cmp(&a.psi).then(a.feature.cmp(&b.feature)));
        SplitInfo {
            train_until: format_time(self.until),
            training_events: self.training.events.len(),
            scored_events: scored,
            drift,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(payload: &str) -> Recorded {
        Recorded {
            partition: 3,
            offset: 99,
            published_at: None,
            payload: payload.as_bytes().to_vec(),
            label: None,
            warm_only: false,
        }
    }

    #[test]
    fn a_split_orders_by_event_time_and_trains_only_on_the_past() {
        let history = crate::train::bundled_history().unwrap_or_else(|e| panic!("{e}"));
        // The dataset's rows are not in time order; one malformed event rides along.
        let mut events: Vec<Recorded> = history
            .events
            .iter()
            .take(300)
            .map(|t| recorded(&serde_json::to_string(t).unwrap_or_default()))
            .collect();
        events.insert(10, recorded("{\"broken"));
        let split = Split::of_events("test", events, Encoding::Json, Cut::Share(1.0 / 3.0));
        let decoder = Decoder::Json;
        let times: Vec<i64> = split
            .events
            .iter()
            .filter_map(|e| decoder.decode(&e.payload).ok())
            .map(|t| t.time)
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(split.events.len(), 301);
        assert!(
            split
                .events
                .iter()
                .enumerate()
                .all(|(i, e)| e.offset == i as i64)
        );
        assert_eq!(split.training.events.len(), 100);
        assert!(split.training.events.iter().all(|t| t.time < split.until));
        for e in &split.events {
            if let Ok(t) = decoder.decode(&e.payload) {
                assert_eq!(e.warm_only, t.time < split.until);
            }
        }
        let info = split.info(
            &["amount_log".into(), "hour_cos".into()],
            &Default::default(),
        );
        assert_eq!((info.training_events, info.scored_events), (100, 200));
        assert_eq!(info.drift.len(), 2);
    }

    #[test]
    fn the_population_stability_index_is_zero_for_the_same_data_and_large_for_a_shift() {
        let a: Vec<f64> = (0..1000).map(|i| f64::from(i % 100)).collect();
        let b: Vec<f64> = a.iter().map(|x| x + 60.0).collect();
        assert!(crate::report::psi(&a, &a).abs() < 1e-12);
        let shifted = FeatureDrift::new("x", &a, &b);
        assert!(shifted.psi > 1.0 && shifted.level == "major", "{shifted:?}");
    }
}
