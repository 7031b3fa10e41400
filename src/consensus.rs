//! Consensus: whether the models' verdicts on one event make an alert, under the configured
//! [`Policy`] (`all` by default: every model must flag it).

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

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(forest: bool, lof: bool) -> [Verdict; 2] {
        let v = |model, flagged| Verdict {
            model,
            score: 0.0,
            threshold: 0.0,
            flagged,
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
    fn no_verdicts_never_alert() {
        assert!(!decide(Policy::All, &[]));
        assert!(!decide(Policy::Any, &[]));
    }
}
