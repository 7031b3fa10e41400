//! Features: one transaction plus its account's earlier state becomes a feature vector. The same
//! function serves the live stream, training and replay, so there is no train/serve skew.
//!
//! Every feature uses only the current event and the account's *earlier* events (in the order
//! they reach the account's partition, which producers keep in event time): nothing from the
//! future leaks in.

use std::f64::consts::TAU;

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::config::FeatureConfig;
use crate::decode::Transaction;
use crate::state::AccountState;

/// Names of the numeric features, in [`Features::numeric`] order.
pub const NUMERIC_FEATURES: [&str; 21] = [
    "TransactionAmount",
    "CustomerAge",
    "TransactionDuration",
    "LoginAttempts",
    "AccountBalance",
    "rolling_mean_amount",
    "rolling_mean_duration",
    "seconds_since_last_transaction",
    "is_not_most_frequent_ip",
    "is_not_most_frequent_location",
    "is_not_most_frequent_device",
    "is_not_most_frequent_merchant",
    "year",
    "hour",
    "month_sin",
    "month_cos",
    "weekday_sin",
    "weekday_cos",
    "day_sin",
    "day_cos",
    "exceeds_75_percent_balance",
];

/// Names of the categorical features, in [`Features::categorical`] order.
pub const CATEGORICAL_FEATURES: [&str; 3] = ["TransactionType", "Channel", "CustomerOccupation"];

/// Index of a numeric feature by name.
pub fn numeric_index(name: &str) -> Option<usize> {
    NUMERIC_FEATURES.iter().position(|n| *n == name)
}

/// Index of a categorical feature by name.
pub fn categorical_index(name: &str) -> Option<usize> {
    CATEGORICAL_FEATURES.iter().position(|n| *n == name)
}

/// All features of one event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Features {
    pub numeric: [f64; NUMERIC_FEATURES.len()],
    pub categorical: [&'static str; CATEGORICAL_FEATURES.len()],
}

fn mean_with(previous: &std::collections::VecDeque<f64>, current: f64) -> f64 {
    (previous.iter().sum::<f64>() + current) / (previous.len() + 1) as f64
}

fn differs(usual: Option<&str>, value: &str) -> f64 {
    match usual {
        Some(u) if u != value => 1.0,
        _ => 0.0,
    }
}

/// Features of `tx` given the account's state *before* it. Does not change the state.
///
/// - rolling means: over the current event and up to `window - 1` earlier ones (pandas'
///   `rolling(window, min_periods=1)`);
/// - seconds since the account's previous event, 0 for its first;
/// - `is_not_most_frequent_*`: 1 when the value differs from the account's most frequent one so
///   far, 0 when it matches or when the account has no history yet;
/// - calendar: year, hour, and sin/cos of month (1–12 over 12), weekday (Mon=0 over 7) and day of
///   month (1–31 over 31);
/// - `exceeds_75_percent_balance`: 1 when the amount is above 75 % of the balance.
pub fn compute(state: &AccountState, tx: &Transaction) -> Features {
    let t = DateTime::<Utc>::from_timestamp(tx.time, 0).unwrap_or_default();
    let angle = |v: u32, period: f64| TAU * f64::from(v) / period;
    let (month, weekday, day) = (
        angle(t.month(), 12.0),
        angle(t.weekday().num_days_from_monday(), 7.0),
        angle(t.day(), 31.0),
    );
    let since_last = state
        .last_time
        .map_or(0.0, |last| (tx.time - last).max(0) as f64);
    Features {
        numeric: [
            tx.amount,
            f64::from(tx.customer_age),
            f64::from(tx.duration),
            f64::from(tx.login_attempts),
            tx.balance,
            mean_with(&state.recent_amounts, tx.amount),
            mean_with(&state.recent_durations, f64::from(tx.duration)),
            since_last,
            differs(state.ips.most_frequent(), &tx.ip_address),
            differs(state.locations.most_frequent(), &tx.location),
            differs(state.devices.most_frequent(), &tx.device_id),
            differs(state.merchants.most_frequent(), &tx.merchant_id),
            f64::from(t.year()),
            f64::from(t.hour()),
            month.sin(),
            month.cos(),
            weekday.sin(),
            weekday.cos(),
            day.sin(),
            day.cos(),
            f64::from(u8::from(tx.amount > 0.75 * tx.balance)),
        ],
        categorical: [
            tx.transaction_type.as_str(),
            tx.channel.as_str(),
            tx.occupation.as_str(),
        ],
    }
}

/// Features of `tx`, then the state updated with it: the per-event step of stream and training.
pub fn observe(state: &mut AccountState, tx: &Transaction, cfg: &FeatureConfig) -> Features {
    let f = compute(state, tx);
    state.update(tx, cfg);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Channel, Occupation, TransactionType, parse_time};

    fn tx(time: &str, amount: f64, duration: u32, ip: &str, device: &str) -> Transaction {
        Transaction {
            transaction_id: format!("TX-{time}"),
            account_id: "AC1".into(),
            amount,
            time: parse_time(time).unwrap_or_else(|| panic!("{time}")),
            transaction_type: TransactionType::Debit,
            location: "Austin".into(),
            device_id: device.into(),
            ip_address: ip.into(),
            merchant_id: "M1".into(),
            channel: Channel::Online,
            customer_age: 40,
            occupation: Occupation::Engineer,
            duration,
            login_attempts: 1,
            balance: 1000.0,
            previous_date: None,
        }
    }

    fn value(f: &Features, name: &str) -> f64 {
        f.numeric[numeric_index(name).unwrap_or_else(|| panic!("{name}"))]
    }

    /// One account, four events, worked by hand with window 2.
    #[test]
    fn features_of_a_hand_worked_account_history() {
        let cfg = FeatureConfig::default();
        let mut s = AccountState::default();
        let events = [
            tx("2023-01-02 08:00:00", 100.0, 60, "1.1.1.1", "D1"),
            tx("2023-01-02 09:00:00", 300.0, 20, "1.1.1.1", "D1"),
            tx("2023-01-05 09:00:10", 800.0, 100, "2.2.2.2", "D1"),
            tx("2023-01-06 00:00:00", 50.0, 40, "1.1.1.1", "D2"),
        ];
        let f: Vec<Features> = events.iter().map(|e| observe(&mut s, e, &cfg)).collect();

        let col = |name| f.iter().map(|x| value(x, name)).collect::<Vec<_>>();
        assert_eq!(col("rolling_mean_amount"), [100.0, 200.0, 550.0, 425.0]);
        assert_eq!(col("rolling_mean_duration"), [60.0, 40.0, 60.0, 70.0]);
        assert_eq!(
            col("seconds_since_last_transaction"),
            [
                0.0,
                3600.0,
                3.0 * 86400.0 + 10.0,
                14.0 * 3600.0 + 59.0 * 60.0 + 50.0
            ]
        );
        assert_eq!(col("is_not_most_frequent_ip"), [0.0, 0.0, 1.0, 0.0]);
        assert_eq!(col("is_not_most_frequent_device"), [0.0, 0.0, 0.0, 1.0]);
        assert_eq!(col("is_not_most_frequent_location"), [0.0; 4]);
        assert_eq!(col("exceeds_75_percent_balance"), [0.0, 0.0, 1.0, 0.0]);
        assert_eq!(col("hour"), [8.0, 9.0, 9.0, 0.0]);
        assert_eq!(col("year"), [2023.0; 4]);
        assert_eq!(s.transactions, 4);
    }

    #[test]
    fn calendar_features_use_sin_and_cos_properly() {
        let s = AccountState::default();
        // 2023-01-02 is a Monday; the 2nd of January.
        let f = compute(&s, &tx("2023-01-02 08:00:00", 1.0, 1, "ip", "d"));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(value(&f, "weekday_sin"), 0.0));
        assert!(close(value(&f, "weekday_cos"), 1.0));
        assert!(close(value(&f, "month_sin"), (TAU / 12.0).sin()));
        assert!(close(value(&f, "month_cos"), (TAU / 12.0).cos()));
        assert!(close(value(&f, "day_sin"), (TAU * 2.0 / 31.0).sin()));
        assert!(close(value(&f, "day_cos"), (TAU * 2.0 / 31.0).cos()));
    }

    #[test]
    fn a_wider_window_averages_more_events() {
        let cfg = FeatureConfig {
            window: 3,
            ..FeatureConfig::default()
        };
        let mut s = AccountState::default();
        let amounts: Vec<f64> = [30.0, 60.0, 90.0, 120.0]
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let e = tx(&format!("2023-01-0{} 08:00:00", i + 2), *a, 1, "ip", "d");
                value(&observe(&mut s, &e, &cfg), "rolling_mean_amount")
            })
            .collect();
        assert_eq!(amounts, [30.0, 45.0, 60.0, 90.0]);
    }

    #[test]
    fn computing_features_leaves_the_state_untouched() {
        let cfg = FeatureConfig::default();
        let mut s = AccountState::default();
        observe(&mut s, &tx("2023-01-02 08:00:00", 1.0, 1, "ip", "d"), &cfg);
        let before = s.clone();
        compute(&s, &tx("2023-01-03 08:00:00", 9.0, 9, "other", "x"));
        assert_eq!(s, before);
    }
}
