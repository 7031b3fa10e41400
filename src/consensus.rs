//! Consensus: whether the models' verdicts on one event make an alert, under the configured
//! [`Policy`] (`all` by default: every model must flag it), and how severe it is.

use crate::config::Policy;
use crate::models::{ISOLATION_FOREST, LOF, Verdict};

/// True when `verdicts` make an alert under `policy`.
pub fn decide(policy: Policy, verdicts: &[Verdict]) -> bool {
    let flagged = |name: &str| verdicts.iter().any(|v| v.model == name && v.flagged);
    match policy {
        Policy::All => !verdicts.is_empty() && verdicts.iter().all(|v| v.flagged),
        Policy::Any => verdicts.iter().any(|v| v.flagged),
        Policy::IsolationForest => flagged(ISOLATION_FOREST),
        Policy::Lof => flagged(LOF),
    }
}

/// The policy's margin over its thresholds: for `all` the smallest model margin (how far the
/// least convinced model is above its threshold), for `any` the largest, else that model's. An
/// event alerts exactly when this is positive; it ranks events for alert budgets.
pub fn margin(policy: Policy, verdicts: &[Verdict]) -> f64 {
    let of = |name: &str| {
        verdicts
            .iter()
            .find(|v| v.model == name)
            .map_or(f64::NEG_INFINITY, |v| v.margin)
    };
    let margins = verdicts.iter().map(|v| v.margin);
    match policy {
        Policy::All => margins.fold(f64::INFINITY, f64::min),
        Policy::Any => margins.fold(f64::NEG_INFINITY, f64::max),
        Policy::IsolationForest => of(ISOLATION_FOREST),
        Policy::Lof => of(LOF),
    }
}

/// How severe an alert is, from its consensus [`margin`]: `high` when the models are above
/// their thresholds by at least as much again as the thresholds are above a typical event's
/// score, `medium` from a third of that, `low` below.
pub fn severity(margin: f64) -> &'static str {
    if margin >= 1.0 {
        "high"
    } else if margin >= 1.0 / 3.0 {
        "medium"
    } else {
        "low"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(forest: bool, lof: bool) -> [Verdict; 2] {
        let v = |model, flagged| Verdict {
            model,
            score: 0.0,
            threshold: 0.0,
            flagged,
            margin: if flagged { 0.5 } else { -0.5 },
        };
        [v(ISOLATION_FOREST, forest), v(LOF, lof)]
    }

    #[test]
    fn each_policy_over_every_combination_of_flags() {
        let table = [
            // (forest, lof) -> all, any, isolation_forest, lof
            ((false, false), [false, false, false, false]),
            ((true, false), [false, true, true, false]),
            ((false, true), [false, true, false, true]),
            ((true, true), [true, true, true, true]),
        ];
        for ((f, l), expected) in table {
            let got = [
                Policy::All,
                Policy::Any,
                Policy::IsolationForest,
                Policy::Lof,
            ]
            .map(|p| decide(p, &verdicts(f, l)));
            assert_eq!(got, expected, "forest={f} lof={l}");
        }
    }

    #[test]
    fn the_margin_is_positive_exactly_when_the_policy_alerts() {
        for policy in [
            Policy::All,
            Policy::Any,
            Policy::IsolationForest,
            Policy::Lof,
        ] {
            for (f, l) in [(false, false), (true, false), (false, true), (true, true)] {
                let v = verdicts(f, l);
                assert_eq!(
                    margin(policy, &v) > 0.0,
                    decide(policy, &v),
                    "{policy:?} {f} {l}"
                );
            }
        }
        assert_eq!(
            (severity(0.1), severity(0.5), severity(2.0)),
            ("low", "medium", "high")
        );
    }

    #[test]
    fn no_verdicts_never_alert() {
        assert!(!decide(Policy::All, &[]));
        assert!(!decide(Policy::Any, &[]));
    }
}
