//! Calibration from analysts' verdicts: how precise one model's alerts have been (overall and
//! per day, each with a 95 % Wilson interval), and the threshold that would meet a target
//! precision or an alert budget per day.
//!
//! Verdicts are given on alerts, so they can only say where a threshold should rise: an event
//! below today's threshold was never shown to anyone. A threshold for a target precision is the
//! lowest one whose judged alerts above it reach the target with 95 % confidence (the Wilson
//! lower bound), so that a handful of lucky verdicts does not move it.

use serde::Serialize;

use super::{ScoredAlert, Verdict};

/// z of a two-sided 95 % interval.
const Z: f64 = 1.959_963_984_540_054;

/// A share with its 95 % Wilson score interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Share {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

impl Share {
    /// `hits` of `n`; `None` for no trials.
    pub fn wilson(hits: usize, n: usize) -> Option<Self> {
        if n == 0 {
            return None;
        }
        let (k, n) = (hits as f64, n as f64);
        let p = k / n;
        let z2 = Z * Z;
        let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
        let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
        Some(Self {
            value: p,
            low: (centre - half).max(0.0),
            high: (centre + half).min(1.0),
        })
    }
}

/// What to calibrate for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// The judged alerts above the threshold are fraud at least this often (95 % confidence).
    Precision(f64),
    /// At most this many alerts per day, over the days the index covers.
    AlertsPerDay(f64),
}

/// One day of verdicts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Day {
    /// YYYY-MM-DD of the alerts' event time (UTC).
    pub day: String,
    pub alerts: usize,
    pub judged: usize,
    pub fraud: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<Share>,
}

/// A threshold and what the verdicts say of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suggestion {
    pub threshold: f64,
    /// Indexed alerts above it, and per day of the index.
    pub alerts: usize,
    pub alerts_per_day: f64,
    /// Judged alerts above it, and the share of them that were fraud.
    pub judged: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<Share>,
    /// Judged frauds it keeps, of all judged frauds.
    pub frauds_kept: usize,
}

/// The calibration of one model's threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    pub model: &'static str,
    pub threshold: f64,
    pub alerts: usize,
    pub judged: usize,
    pub fraud: usize,
    pub legitimate: usize,
    pub needs_review: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<Share>,
    pub by_day: Vec<Day>,
    /// The threshold for the target asked for, if any can meet it; `None` with a reason
    /// otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<Suggestion>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn day_of(secs: i64) -> String {
    crate::decode::format_time(secs).chars().take(10).collect()
}

/// Calibrates `model`, now at `threshold`, on its indexed `alerts` for `target`.
pub fn calibrate(
    model: &'static str,
    threshold: f64,
    alerts: &[ScoredAlert],
    target: Option<Target>,
) -> Calibration {
    let count = |v: Verdict| alerts.iter().filter(|a| a.verdict == Some(v)).count();
    let (fraud, legitimate, needs_review) = (
        count(Verdict::Fraud),
        count(Verdict::Legitimate),
        count(Verdict::NeedsReview),
    );
    let mut days: std::collections::BTreeMap<String, Day> = std::collections::BTreeMap::new();
    for a in alerts {
        let day = day_of(a.event_time);
        let d = days.entry(day.clone()).or_insert(Day {
            day,
            alerts: 0,
            judged: 0,
            fraud: 0,
            precision: None,
        });
        d.alerts += 1;
        match a.verdict {
            Some(Verdict::Fraud) => {
                d.judged += 1;
                d.fraud += 1;
            }
            Some(Verdict::Legitimate) => d.judged += 1,
            _ => {}
        }
    }
    let by_day: Vec<Day> = days
        .into_values()
        .map(|d| Day {
            precision: Share::wilson(d.fraud, d.judged),
            ..d
        })
        .collect();
    let span_days = by_day.len().max(1) as f64;
    // Highest score first: a threshold between two neighbours keeps the ones above it.
    let mut ranked: Vec<&ScoredAlert> = alerts.iter().collect();
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
    let at = |mut kept: usize| -> Suggestion {
        // A threshold cannot split alerts of equal score: keep those strictly above the tie.
        while kept > 0
            && ranked
                .get(kept)
                .is_some_and(|n| n.score >= ranked[kept - 1].score)
        {
            kept -= 1;
        }
        let above = &ranked[..kept];
        let judged = above
            .iter()
            .filter(|a| matches!(a.verdict, Some(Verdict::Fraud | Verdict::Legitimate)))
            .count();
        let frauds = above
            .iter()
            .filter(|a| a.verdict == Some(Verdict::Fraud))
            .count();
        // All of them: the threshold as it is (each was above it); none: the highest score.
        let threshold = match (
            kept.checked_sub(1).map(|i| ranked[i].score),
            ranked.get(kept),
        ) {
            (Some(last), Some(next)) => (last + next.score) / 2.0,
            (None, Some(first)) => first.score,
            (_, None) => threshold,
        };
        Suggestion {
            threshold,
            alerts: kept,
            alerts_per_day: kept as f64 / span_days,
            judged,
            precision: Share::wilson(frauds, judged),
            frauds_kept: frauds,
        }
    };
    let (suggestion, note) = match target {
        None => (None, None),
        Some(Target::Precision(p)) => {
            // The most alerts kept whose judged part reaches p with 95 % confidence.
            match (1..=ranked.len())
                .rev()
                .map(at)
                .find(|s| s.alerts > 0 && s.precision.is_some_and(|q| q.low >= p))
            {
                Some(s) => (Some(s), None),
                None => (
                    None,
                    Some(format!(
                        "no threshold gives a precision of {p} with 95 % confidence on {} judged alerts; judge more",
                        fraud + legitimate
                    )),
                ),
            }
        }
        Some(Target::AlertsPerDay(budget)) => {
            let kept = ((budget * span_days).floor() as usize).min(ranked.len());
            match at(kept) {
                s if s.alerts == 0 => (
                    None,
                    Some(format!("a budget of {budget} alerts a day keeps none")),
                ),
                s => (Some(s), None),
            }
        }
    };
    Calibration {
        model,
        threshold,
        alerts: alerts.len(),
        judged: fraud + legitimate,
        fraud,
        legitimate,
        needs_review,
        precision: Share::wilson(fraud, fraud + legitimate),
        by_day,
        suggestion,
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(score: f64, day: i64, verdict: Option<Verdict>) -> ScoredAlert {
        ScoredAlert {
            score,
            event_time: 1_704_067_200 + day * 86_400,
            verdict,
        }
    }

    #[test]
    fn wilson_intervals_match_the_textbook_values() {
        // 8 of 10: [0.490, 0.943]; 0 of 5: [0, 0.434].
        let s = Share::wilson(8, 10).unwrap();
        assert!(
            (s.low - 0.4902).abs() < 1e-3 && (s.high - 0.9433).abs() < 1e-3,
            "{s:?}"
        );
        let s = Share::wilson(0, 5).unwrap();
        assert!(s.low == 0.0 && (s.high - 0.4345).abs() < 1e-3, "{s:?}");
        assert!(Share::wilson(0, 0).is_none());
    }

    /// Forty judged alerts: the twenty highest scored all fraud, the twenty lowest all
    /// legitimate, plus ten nobody judged in between.
    fn history() -> Vec<ScoredAlert> {
        let mut v = Vec::new();
        for i in 0..20 {
            v.push(alert(
                2.0 + f64::from(i) * 0.1,
                i64::from(i % 2),
                Some(Verdict::Fraud),
            ));
            v.push(alert(
                1.0 + f64::from(i) * 0.01,
                i64::from(i % 2),
                Some(Verdict::Legitimate),
            ));
        }
        for i in 0..10 {
            v.push(alert(1.5 + f64::from(i) * 0.01, 1, None));
        }
        v
    }

    #[test]
    fn precision_is_measured_per_day_and_overall() {
        let c = calibrate("lof", 0.9, &history(), None);
        assert_eq!(
            (c.alerts, c.judged, c.fraud, c.legitimate),
            (50, 40, 20, 20)
        );
        assert_eq!(c.precision.unwrap().value, 0.5);
        assert_eq!(c.by_day.len(), 2);
        assert_eq!(c.by_day[1].alerts, 30);
        assert_eq!(c.by_day[0].precision.unwrap().value, 0.5);
        assert!(c.suggestion.is_none());
    }

    #[test]
    fn a_target_precision_raises_the_threshold_to_where_the_frauds_start() {
        let c = calibrate("lof", 0.9, &history(), Some(Target::Precision(0.8)));
        let s = c.suggestion.unwrap();
        // Every fraud and the unjudged alerts above the highest legitimate one (1.19): the
        // threshold goes up to where the judged false alarms end.
        assert_eq!((s.alerts, s.judged, s.frauds_kept), (30, 20, 20));
        assert!(s.threshold > 1.19 && s.threshold < 1.5, "{}", s.threshold);
        assert!(s.precision.unwrap().low >= 0.8);
        // Unreachable with so few verdicts: said, not guessed.
        let c = calibrate("lof", 0.9, &history()[..4], Some(Target::Precision(0.95)));
        assert!(c.suggestion.is_none() && c.note.unwrap().contains("judge more"));
    }

    #[test]
    fn a_threshold_never_splits_alerts_of_equal_score() {
        let tied: Vec<ScoredAlert> = (0..6)
            .map(|_| alert(1.0, 0, Some(Verdict::Fraud)))
            .collect();
        let c = calibrate("lof", 0.9, &tied, Some(Target::AlertsPerDay(3.0)));
        assert!(c.suggestion.is_none() && c.note.unwrap().contains("keeps none"));
    }

    #[test]
    fn an_alert_budget_keeps_the_highest_scored_alerts() {
        let c = calibrate("lof", 0.9, &history(), Some(Target::AlertsPerDay(5.0)));
        let s = c.suggestion.unwrap();
        assert_eq!((s.alerts, s.alerts_per_day), (10, 5.0));
        assert_eq!(s.precision.unwrap().value, 1.0);
        assert!((s.threshold - 2.95).abs() < 1e-9, "{}", s.threshold);
    }
}
