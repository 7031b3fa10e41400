//! Features: one transaction plus its account's earlier state becomes a feature vector. The same
//! function serves the live stream, training and replay, so there is no train/serve skew.
//!
//! Every feature uses only the current event and the account's *earlier* events (in the order
//! they reach the account's partition, which producers keep in event time): nothing from the
//! future leaks in. All features are declared in [`FEATURES`] — name, definition, the state it
//! reads, how to compute it and how to say it to a person — so adding one touches that table
//! alone; which ones the models use is `models.numeric` in `config.yml`.
//!
//! The account-relative features are what make a fraud unusual *for this account*: the amount
//! against the account's own habit, how many events it made in the last minutes, whether a
//! device, IP, city or merchant was never seen on it. An account without history is not
//! anomalous for being new: its account-relative features are neutral (0), the time since its
//! previous event reads "long ago" rather than "just now", and it is judged on the
//! population-level features alone.

use std::f64::consts::TAU;

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::config::FeatureConfig;
use crate::decode::{Transaction, TransactionType};
use crate::state::{AccountState, Running, Sketch, hour_angle, hour_of_day};

/// What a feature is about; an alert states each topic once, in the words of its strongest
/// feature, so "amount" is never given twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    Amount,
    Balance,
    Duration,
    Login,
    Hour,
    Velocity,
    Novelty,
    History,
    Calendar,
    Customer,
}

/// The training population's value of a feature: LOF's robust scaler (median, interquartile
/// range), for reasons that compare an event with all accounts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Baseline {
    pub median: f64,
    pub scale: f64,
}

impl Baseline {
    /// How many interquartile ranges `value` lies from the median.
    fn deviation(&self, value: f64) -> f64 {
        (value - self.median) / self.scale
    }
}

/// e^(-d/2) for d = 0..=12 hours apart: [`Context::hour_rarity`]'s circular kernel.
const HOUR_KERNEL: [f64; 13] = [
    1.0,
    0.6065306597126334,
    0.36787944117144233,
    0.22313016014842982,
    0.1353352832366127,
    0.0820849986238988,
    0.049787068367863944,
    0.0301973834223185,
    0.01831563888873418,
    0.011108996538242306,
    0.006737946999085467,
    0.004086771438464067,
    0.0024787521766663585,
];

/// The kernel's weights over the 24 hours of the day (0 and 12 hours apart once, the rest twice).
const HOUR_KERNEL_SUM: f64 = {
    let (mut between, mut d) = (0.0, 1);
    while d < 12 {
        between += HOUR_KERNEL[d];
        d += 1;
    }
    HOUR_KERNEL[0] + 2.0 * between + HOUR_KERNEL[12]
};

/// An event and its account's state before it: what a feature is computed from.
pub struct Context<'a> {
    pub tx: &'a Transaction,
    pub state: &'a AccountState,
    pub cfg: &'a FeatureConfig,
    time: DateTime<Utc>,
}

impl<'a> Context<'a> {
    pub fn new(state: &'a AccountState, tx: &'a Transaction, cfg: &'a FeatureConfig) -> Self {
        Self {
            tx,
            state,
            cfg,
            time: DateTime::<Utc>::from_timestamp(tx.time, 0).unwrap_or_default(),
        }
    }

    fn has_history(&self) -> bool {
        self.state.transactions > 0
    }

    fn log_amount(&self) -> f64 {
        self.tx.amount.ln_1p()
    }

    fn amount_habit(&self) -> &Running {
        self.state.amount_habit(self.tx.transaction_type)
    }

    fn log_duration(&self) -> f64 {
        f64::from(self.tx.duration).ln_1p()
    }

    fn hhmm(&self) -> String {
        format!("{:02}:{:02}", self.time.hour(), self.time.minute())
    }

    /// How much rarer this hour of day is for the account than an hour picked at random:
    /// ln((1/24) / p), floored at 0, with p the account's share of earlier events at this hour
    /// from a circular kernel density (weight e^(-d/2) for an event d hours away: a routine
    /// shifts by an hour or two, and 3 am is farther from a 7–23 day than 6 am) under a prior of
    /// a quarter event per hour. A probability rather than a distance to the nearest used hour,
    /// so one earlier night-time event does not make the night usual, and the evidence grows
    /// with the history (0 without any).
    fn hour_rarity(&self) -> f64 {
        const PRIOR: f64 = 0.25;
        let h = hour_of_day(self.tx.time);
        let (mut here, mut events) = (0.0, 0.0);
        for (k, count) in self.state.hours.counts().into_iter().enumerate() {
            let d = h.abs_diff(k).min(24 - h.abs_diff(k));
            here += HOUR_KERNEL[d] * f64::from(count);
            events += f64::from(count);
        }
        let total = HOUR_KERNEL_SUM * events;
        ((total + 24.0 * PRIOR) / (24.0 * (here + PRIOR)))
            .ln()
            .max(0.0)
    }

    /// The account's earlier events within two hours of this event's time of day.
    fn events_near_this_hour(&self) -> u32 {
        let h = hour_of_day(self.tx.time);
        let counts = self.state.hours.counts();
        (h + 22..=h + 26).map(|k| u32::from(counts[k % 24])).sum()
    }

    fn events_within(&self, secs: i64) -> f64 {
        self.state.events_within(self.tx.time, secs).0 as f64
    }

    /// 1 when the account has a history and `value` is not in its `sketch`.
    fn is_new(&self, sketch: Sketch, value: &str) -> f64 {
        let count = self.state.sketches.get(sketch).count_of(value);
        f64::from(u8::from(self.has_history() && count == 0))
    }

    /// The account's most frequent value of `sketch`, if it has one.
    fn usual(&self, sketch: Sketch) -> Option<&str> {
        self.state.sketches.get(sketch).most_frequent()
    }

    fn new_device(&self) -> f64 {
        self.is_new(Sketch::Device, &self.tx.device_id)
    }

    fn new_ip(&self) -> f64 {
        self.is_new(Sketch::Ip, &self.tx.ip_address)
    }

    fn new_location(&self) -> f64 {
        self.is_new(Sketch::Location, &self.tx.location)
    }

    fn new_merchant(&self) -> f64 {
        self.is_new(Sketch::Merchant, &self.tx.merchant_id)
    }

    /// "new device D1 and new IP 1.2.3.4": every never-seen value of this event.
    fn novelties(&self) -> Option<String> {
        let tx = self.tx;
        let parts: Vec<String> = [
            (self.new_device(), "device", &tx.device_id),
            (self.new_ip(), "IP", &tx.ip_address),
            (self.new_location(), "location", &tx.location),
            (self.new_merchant(), "merchant", &tx.merchant_id),
        ]
        .into_iter()
        .filter(|(new, _, _)| *new > 0.0)
        .map(|(_, what, value)| format!("new {what} {value}"))
        .collect();
        match parts.len() {
            0 => None,
            1 => Some(format!("{}, first seen on this account", parts[0])),
            n => Some(format!(
                "{} and {} at once, all first seen on this account",
                parts[..n - 1].join(", "),
                parts[n - 1]
            )),
        }
    }

    /// "5 payments in the last 2 minutes", counting this one.
    fn burst(&self, secs: i64, at_least: usize) -> Option<String> {
        let (n, oldest) = self.state.events_within(self.tx.time, secs);
        let oldest = oldest?;
        (n >= at_least).then(|| {
            format!(
                "{} payments in the last {}",
                n + 1,
                span((self.tx.time - oldest).max(1))
            )
        })
    }
}

/// "40 s", "3 minutes", "2 hours", "5 days".
fn span(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7_200 => format!("{} minutes", (s + 30) / 60),
        s if s < 172_800 => format!("{} hours", (s + 1_800) / 3_600),
        s => format!("{} days", (s + 43_200) / 86_400),
    }
}

/// 9800.0 → "9,800.00".
pub fn money(x: f64) -> String {
    let cents = (x.abs() * 100.0).round() as u64;
    let mut int = (cents / 100).to_string();
    let mut i = int.len();
    while i > 3 {
        i -= 3;
        int.insert(i, ',');
    }
    format!("{}{int}.{:02}", if x < 0.0 { "-" } else { "" }, cents % 100)
}

fn times(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.0}×")
    } else {
        format!("{x:.1}×")
    }
}

/// A population-level reason: the value is far (over `limit` interquartile ranges) from the
/// training median.
fn unusual_for_all(value: f64, base: Option<&Baseline>, limit: f64) -> Option<f64> {
    let d = base?.deviation(value);
    (d.abs() > limit).then_some(d)
}

/// One feature: its name, what it means, the state it reads, and how to compute and word it.
pub struct FeatureDef {
    pub name: &'static str,
    pub definition: &'static str,
    /// The account state it needs ("" for none).
    pub reads: &'static str,
    pub topic: Topic,
    /// For calendar features: the period the training data must span to have seen every value.
    pub period_secs: Option<i64>,
    pub value: fn(&Context) -> f64,
    /// Says why this value is unusual, or `None` when it is not (a normal fact is never a
    /// reason). `base` is the training population's median and spread, when known.
    pub reason: fn(&Context, f64, Option<&Baseline>) -> Option<String>,
}

const DAY: i64 = 86_400;

fn no_reason(_: &Context, _: f64, _: Option<&Baseline>) -> Option<String> {
    None
}

fn calendar_angle(v: u32, period: f64) -> f64 {
    TAU * f64::from(v) / period
}

fn mean_with(previous: impl ExactSizeIterator<Item = f64>, current: f64) -> f64 {
    let earlier = previous.len();
    (previous.sum::<f64>() + current) / (earlier + 1) as f64
}

fn differs(usual: Option<&str>, value: &str) -> f64 {
    match usual {
        Some(u) if u != value => 1.0,
        _ => 0.0,
    }
}

fn not_usual(what: &str, usual: Option<&str>, now: &str) -> Option<String> {
    usual
        .filter(|u| *u != now)
        .map(|u| format!("{what} {now} is not the account's usual {u}"))
}

/// Every feature, in [`Features::numeric`] order. The first block is the original design's.
pub const FEATURES: &[FeatureDef] = &[
    FeatureDef {
        name: "TransactionAmount",
        definition: "the amount",
        reads: "",
        topic: Topic::Amount,
        period_secs: None,
        value: |c| c.tx.amount,
        reason: |c, v, b| {
            unusual_for_all(v, b, 3.0)
                .map(|_| format!("amount {} is unusual for all accounts", money(c.tx.amount)))
        },
    },
    FeatureDef {
        name: "CustomerAge",
        definition: "the customer's age",
        reads: "",
        topic: Topic::Customer,
        period_secs: None,
        value: |c| f64::from(c.tx.customer_age),
        reason: no_reason,
    },
    FeatureDef {
        name: "TransactionDuration",
        definition: "the session's length in seconds",
        reads: "",
        topic: Topic::Duration,
        period_secs: None,
        value: |c| f64::from(c.tx.duration),
        reason: |c, v, b| {
            unusual_for_all(v, b, 3.0).map(|_| format!("a {} s session", c.tx.duration))
        },
    },
    FeatureDef {
        name: "LoginAttempts",
        definition: "login attempts before the transaction",
        reads: "",
        topic: Topic::Login,
        period_secs: None,
        value: |c| f64::from(c.tx.login_attempts),
        reason: |c, _, _| {
            (c.tx.login_attempts >= 3).then(|| format!("{} login attempts", c.tx.login_attempts))
        },
    },
    FeatureDef {
        name: "AccountBalance",
        definition: "the balance",
        reads: "",
        topic: Topic::Balance,
        period_secs: None,
        value: |c| c.tx.balance,
        reason: no_reason,
    },
    FeatureDef {
        name: "rolling_mean_amount",
        definition: "mean amount of this and the previous window - 1 events",
        reads: "the last window - 1 amounts",
        topic: Topic::Amount,
        period_secs: None,
        value: |c| mean_with(c.state.recent_amounts(), c.tx.amount),
        reason: no_reason,
    },
    FeatureDef {
        name: "rolling_mean_duration",
        definition: "mean duration of this and the previous window - 1 events",
        reads: "the last window - 1 durations",
        topic: Topic::Duration,
        period_secs: None,
        value: |c| mean_with(c.state.recent_durations(), f64::from(c.tx.duration)),
        reason: no_reason,
    },
    FeatureDef {
        name: "seconds_since_last_transaction",
        definition: "seconds since the account's previous event, 0 for its first (the original design's encoding)",
        reads: "last event time",
        topic: Topic::Velocity,
        period_secs: None,
        value: |c| {
            c.state
                .last_time()
                .map_or(0.0, |last| (c.tx.time - last).max(0) as f64)
        },
        reason: no_reason,
    },
    FeatureDef {
        name: "is_not_most_frequent_ip",
        definition: "1 when the IP differs from the account's most frequent one so far",
        reads: "IP sketch",
        topic: Topic::Novelty,
        period_secs: None,
        value: |c| differs(c.usual(Sketch::Ip), &c.tx.ip_address),
        reason: |c, _, _| not_usual("IP", c.usual(Sketch::Ip), &c.tx.ip_address),
    },
    FeatureDef {
        name: "is_not_most_frequent_location",
        definition: "1 when the location differs from the account's most frequent one so far",
        reads: "location sketch",
        topic: Topic::Novelty,
        period_secs: None,
        value: |c| differs(c.usual(Sketch::Location), &c.tx.location),
        reason: |c, _, _| not_usual("location", c.usual(Sketch::Location), &c.tx.location),
    },
    FeatureDef {
        name: "is_not_most_frequent_device",
        definition: "1 when the device differs from the account's most frequent one so far",
        reads: "device sketch",
        topic: Topic::Novelty,
        period_secs: None,
        value: |c| differs(c.usual(Sketch::Device), &c.tx.device_id),
        reason: |c, _, _| not_usual("device", c.usual(Sketch::Device), &c.tx.device_id),
    },
    FeatureDef {
        name: "is_not_most_frequent_merchant",
        definition: "1 when the merchant differs from the account's most frequent one so far",
        reads: "merchant sketch",
        topic: Topic::Novelty,
        period_secs: None,
        value: |c| differs(c.usual(Sketch::Merchant), &c.tx.merchant_id),
        reason: |c, _, _| not_usual("merchant", c.usual(Sketch::Merchant), &c.tx.merchant_id),
    },
    FeatureDef {
        name: "year",
        definition: "the calendar year (never repeats: no training data covers it)",
        reads: "",
        topic: Topic::Calendar,
        period_secs: Some(i64::MAX),
        value: |c| f64::from(c.time.year()),
        reason: no_reason,
    },
    FeatureDef {
        name: "hour",
        definition: "hour of day, 0–23 (UTC)",
        reads: "",
        topic: Topic::Hour,
        period_secs: Some(DAY),
        value: |c| f64::from(c.time.hour()),
        reason: no_reason,
    },
    FeatureDef {
        name: "month_sin",
        definition: "sin of the month (1–12) over 12",
        reads: "",
        topic: Topic::Calendar,
        period_secs: Some(365 * DAY),
        value: |c| calendar_angle(c.time.month(), 12.0).sin(),
        reason: no_reason,
    },
    FeatureDef {
        name: "month_cos",
        definition: "cos of the month (1–12) over 12",
        reads: "",
        topic: Topic::Calendar,
        period_secs: Some(365 * DAY),
        value: |c| calendar_angle(c.time.month(), 12.0).cos(),
        reason: no_reason,
    },
    FeatureDef {
        name: "weekday_sin",
        definition: "sin of the weekday (Monday = 0) over 7",
        reads: "",
        topic: Topic::Calendar,
        period_secs: Some(7 * DAY),
        value: |c| calendar_angle(c.time.weekday().num_days_from_monday(), 7.0).sin(),
        reason: no_reason,
    },
    FeatureDef {
        name: "weekday_cos",
        definition: "cos of the weekday (Monday = 0) over 7",
        reads: "",
        topic: Topic::Calendar,
        period_secs: Some(7 * DAY),
        value: |c| calendar_angle(c.time.weekday().num_days_from_monday(), 7.0).cos(),
        reason: no_reason,
    },
    FeatureDef {
        name: "day_sin",
        definition: "sin of the day of month (1–31) over 31",
        reads: "",
        topic: Topic::Calendar,
        period_secs: Some(31 * DAY),
        value: |c| calendar_angle(c.time.day(), 31.0).sin(),
        reason: no_reason,
    },
    FeatureDef {
        name: "day_cos",
        definition: "cos of the day of month (1–31) over 31",
        reads: "",
        topic: Topic::Calendar,
        period_secs: Some(31 * DAY),
        value: |c| calendar_angle(c.time.day(), 31.0).cos(),
        reason: no_reason,
    },
    FeatureDef {
        name: "exceeds_75_percent_balance",
        definition: "1 when the amount is above 75 % of the balance",
        reads: "",
        topic: Topic::Balance,
        period_secs: None,
        value: |c| f64::from(u8::from(c.tx.amount > 0.75 * c.tx.balance)),
        reason: |c, v, _| {
            (v > 0.0).then(|| {
                format!(
                    "amount {} is over 75% of the balance {}",
                    money(c.tx.amount),
                    money(c.tx.balance)
                )
            })
        },
    },
    // vigil's own features.
    FeatureDef {
        name: "amount_log",
        definition: "ln(1 + amount)",
        reads: "",
        topic: Topic::Amount,
        period_secs: None,
        value: |c| c.log_amount(),
        reason: |c, v, b| {
            let median = b?.median.exp_m1();
            unusual_for_all(v, b, 2.5).map(|_| {
                let ratio = c.tx.amount / median.max(0.01);
                if ratio >= 1.0 {
                    format!(
                        "amount {} is {} the typical {} of all accounts",
                        money(c.tx.amount),
                        times(ratio),
                        money(median)
                    )
                } else {
                    format!(
                        "amount {} is far below the typical {} of all accounts",
                        money(c.tx.amount),
                        money(median)
                    )
                }
            })
        },
    },
    FeatureDef {
        name: "balance_share",
        definition: "amount / (amount + balance) for a debit: the share of the funds before it that the payment takes (0 for a credit)",
        reads: "",
        topic: Topic::Balance,
        period_secs: None,
        value: |c| {
            let (a, b) = (c.tx.amount.max(0.0), c.tx.balance.max(0.0));
            if c.tx.transaction_type == TransactionType::Debit && a + b > 0.0 {
                a / (a + b)
            } else {
                0.0
            }
        },
        reason: |c, v, _| {
            (v >= 0.5).then(|| {
                format!(
                    "takes {:.0} % of the funds ({} of {})",
                    v * 100.0,
                    money(c.tx.amount),
                    money(c.tx.amount + c.tx.balance)
                )
            })
        },
    },
    FeatureDef {
        name: "amount_to_balance",
        definition: "ln((1 + amount) / (1 + balance)): how much of the funds the transaction moves, on the multiplicative scale amounts live on",
        reads: "",
        topic: Topic::Balance,
        period_secs: None,
        value: |c| c.tx.amount.ln_1p() - c.tx.balance.ln_1p(),
        reason: |c, _, _| {
            let (a, b) = (c.tx.amount, c.tx.balance);
            let ratio = a / b.max(1.0);
            if ratio >= 1.0 {
                Some(format!(
                    "amount {} is {} the balance left ({})",
                    money(a),
                    times(ratio),
                    money(b)
                ))
            } else {
                (ratio >= 0.5).then(|| {
                    format!(
                        "amount {} is {:.0}% of the balance {}",
                        money(a),
                        100.0 * ratio,
                        money(b)
                    )
                })
            }
        },
    },
    FeatureDef {
        name: "amount_vs_habit",
        definition: "spreads by which ln(1 + amount) lies above its mean over the account's earlier transactions of the same type, debit or credit (0 at or below it, or without any)",
        reads: "running log-amount mean and spread of debits and of credits, each earlier value counted at most 3 spreads from the mean",
        topic: Topic::Amount,
        period_secs: None,
        // One-sided: a payment far *below* the habit is what card testing looks like, and the
        // burst says that (velocity); as a second reading of the amount it only adds spread
        // among legitimate small payments.
        value: |c| c.amount_habit().z(c.log_amount()).max(0.0),
        reason: |c, v, _| {
            let usual = c.amount_habit().mean.exp_m1();
            (v >= 2.5).then(|| {
                format!(
                    "amount {} is {} this account's usual {}",
                    money(c.tx.amount),
                    times(c.tx.amount / usual.max(0.01)),
                    money(usual)
                )
            })
        },
    },
    FeatureDef {
        name: "duration_log",
        definition: "ln(1 + session seconds)",
        reads: "",
        topic: Topic::Duration,
        period_secs: None,
        value: |c| c.log_duration(),
        reason: |c, v, b| {
            unusual_for_all(v, b, 2.5).map(|d| {
                let how = if d > 0.0 { "longer" } else { "shorter" };
                format!("a {} s session, far {how} than most", c.tx.duration)
            })
        },
    },
    FeatureDef {
        name: "duration_vs_habit",
        definition: "spreads between ln(1 + session seconds) and the account's own mean of it (negative below; 0 without history)",
        reads: "running log-duration mean and spread, each earlier value counted at most 3 spreads from the mean",
        topic: Topic::Duration,
        period_secs: None,
        value: |c| c.state.log_duration.z(c.log_duration()),
        reason: |c, v, _| {
            let usual = c.state.log_duration.mean.exp_m1();
            let d = f64::from(c.tx.duration);
            if v >= 2.5 {
                Some(format!(
                    "a {} s session, {} this account's usual {:.0} s",
                    c.tx.duration,
                    times(d / usual.max(1.0)),
                    usual
                ))
            } else {
                (v <= -2.5).then(|| {
                    format!(
                        "a {} s session, far shorter than this account's usual {:.0} s",
                        c.tx.duration, usual
                    )
                })
            }
        },
    },
    FeatureDef {
        name: "login_vs_habit",
        definition: "login attempts minus the account's mean attempts (minus 1 without history)",
        reads: "running login-attempt mean",
        topic: Topic::Login,
        period_secs: None,
        value: |c| {
            let usual = if c.has_history() {
                c.state.login_attempts.mean
            } else {
                1.0
            };
            f64::from(c.tx.login_attempts) - usual
        },
        reason: |c, v, _| {
            (v >= 1.5 && c.tx.login_attempts >= 3).then(|| {
                format!(
                    "{} login attempts, where this account needs {:.0}",
                    c.tx.login_attempts,
                    c.state.login_attempts.mean.max(1.0)
                )
            })
        },
    },
    FeatureDef {
        name: "hour_sin",
        definition: "sin of the time of day over 24 h (UTC)",
        reads: "",
        topic: Topic::Hour,
        period_secs: Some(DAY),
        value: |c| hour_angle(c.tx.time).sin(),
        reason: no_reason,
    },
    FeatureDef {
        name: "hour_cos",
        definition: "cos of the time of day over 24 h (UTC)",
        reads: "",
        topic: Topic::Hour,
        period_secs: Some(DAY),
        value: |c| hour_angle(c.tx.time).cos(),
        // A time of day is a reason only against the account's own day (`hour_rarity`):
        // against all accounts, it says more about who trained the model than about the event.
        reason: no_reason,
    },
    FeatureDef {
        name: "hour_rarity",
        definition: "ln((1/24) / p), floored at 0: how much rarer this hour of day (UTC) is for the account than a random hour, p being the account's share of earlier events at this hour from a circular kernel (weight e^(-d/2) for an event d hours away) with a prior of a quarter event per hour (0 without history)",
        reads: "events per hour of day",
        topic: Topic::Hour,
        period_secs: None,
        value: |c| c.hour_rarity(),
        reason: |c, v, _| {
            // At least 3× rarer than a random hour, i.e. the account's day visibly excludes it.
            (v >= 3f64.ln()).then(|| {
                format!(
                    "at {}, a time of day this account seldom uses: {} of its {} earlier transactions within 2 hours of it",
                    c.hhmm(),
                    c.events_near_this_hour(),
                    c.state.transactions
                )
            })
        },
    },
    FeatureDef {
        name: "log_seconds_since_last",
        definition: "ln(1 + seconds since the account's previous event); without one, as if it were state_ttl ago",
        reads: "last event time",
        topic: Topic::Velocity,
        period_secs: None,
        value: |c| {
            let gap = c
                .state
                .last_time()
                .map_or(c.cfg.state_ttl_secs, |last| (c.tx.time - last).max(0));
            (gap as f64).ln_1p()
        },
        reason: |c, _, _| {
            let gap = c.tx.time - c.state.last_time()?;
            (gap < 300).then(|| {
                format!(
                    "{} after the account's previous transaction",
                    span(gap.max(0))
                )
            })
        },
    },
    FeatureDef {
        name: "events_last_10m",
        definition: "the account's earlier events in the 10 minutes before this one",
        reads: "latest 16 event times",
        topic: Topic::Velocity,
        period_secs: None,
        value: |c| c.events_within(600),
        reason: |c, _, _| c.burst(600, 2),
    },
    FeatureDef {
        name: "events_last_1h",
        definition: "the account's earlier events in the hour before this one",
        reads: "latest 16 event times",
        topic: Topic::Velocity,
        period_secs: None,
        value: |c| c.events_within(3_600),
        reason: |c, _, _| c.burst(3_600, 3),
    },
    FeatureDef {
        name: "events_last_24h",
        definition: "the account's earlier events in the day before this one (at most 16)",
        reads: "latest 16 event times",
        topic: Topic::Velocity,
        period_secs: None,
        value: |c| c.events_within(DAY),
        reason: |c, _, _| c.burst(DAY, 8),
    },
    FeatureDef {
        name: "new_device",
        definition: "1 when the device was never seen on this account (0 without history)",
        reads: "device sketch",
        topic: Topic::Novelty,
        period_secs: None,
        value: |c| c.new_device(),
        reason: |c, v, _| if v > 0.0 { c.novelties() } else { None },
    },
    FeatureDef {
        name: "new_ip",
        definition: "1 when the IP was never seen on this account (0 without history)",
        reads: "IP sketch",
        topic: Topic::Novelty,
        period_secs: None,
        value: |c| c.new_ip(),
        reason: |c, v, _| if v > 0.0 { c.novelties() } else { None },
    },
    FeatureDef {
        name: "new_location",
        definition: "1 when the location was never seen on this account (0 without history)",
        reads: "location sketch",
        topic: Topic::Novelty,
        period_secs: None,
        value: |c| c.new_location(),
        reason: |c, v, _| if v > 0.0 { c.novelties() } else { None },
    },
    FeatureDef {
        name: "new_merchant",
        definition: "1 when the merchant was never seen on this account (0 without history)",
        reads: "merchant sketch",
        topic: Topic::Novelty,
        period_secs: None,
        value: |c| c.new_merchant(),
        reason: |c, v, _| if v > 0.0 { c.novelties() } else { None },
    },
    FeatureDef {
        name: "new_at_once",
        definition: "how many of device, IP and location are new on this account at once (0–3)",
        reads: "device, IP and location sketches",
        topic: Topic::Novelty,
        period_secs: None,
        value: |c| c.new_device() + c.new_ip() + c.new_location(),
        reason: |c, v, _| if v > 0.0 { c.novelties() } else { None },
    },
    FeatureDef {
        name: "history",
        definition: "1 - exp(-earlier events / 5): how far the account-relative features can be trusted, 0 for a new account, near 1 after a few weeks (it saturates, so a model trained on young accounts does not see old ones as out of range)",
        reads: "event count",
        topic: Topic::History,
        period_secs: None,
        value: |c| 1.0 - (-(c.state.transactions as f64) / 5.0).exp(),
        reason: no_reason,
    },
];

/// Names of the numeric features, in [`Features::numeric`] order.
pub const NUMERIC_FEATURES: [&str; FEATURES.len()] = {
    let mut names = [""; FEATURES.len()];
    let mut i = 0;
    while i < FEATURES.len() {
        names[i] = FEATURES[i].name;
        i += 1;
    }
    names
};

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
    pub numeric: [f64; FEATURES.len()],
    pub categorical: [&'static str; CATEGORICAL_FEATURES.len()],
}

/// Features of `tx` given the account's state *before* it. Does not change the state.
pub fn compute(state: &AccountState, tx: &Transaction, cfg: &FeatureConfig) -> Features {
    let c = Context::new(state, tx, cfg);
    Features {
        numeric: std::array::from_fn(|i| (FEATURES[i].value)(&c)),
        categorical: [
            tx.transaction_type.as_str(),
            tx.channel.as_str(),
            tx.occupation.as_str(),
        ],
    }
}

/// Features of `tx`, then the state updated with it: the per-event step of stream and training.
pub fn observe(state: &mut AccountState, tx: &Transaction, cfg: &FeatureConfig) -> Features {
    let f = compute(state, tx, cfg);
    state.update(tx, cfg);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Channel, Occupation, TransactionType, parse_time};

    fn tx(time: &str, amount: f64, duration: u32, ip: &str, device: &str) -> Transaction {
        Transaction {
            transaction_id: format!("TX-{time}").into(),
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

    fn reason(state: &AccountState, t: &Transaction, name: &str) -> Option<String> {
        let cfg = FeatureConfig::default();
        let c = Context::new(state, t, &cfg);
        let i = numeric_index(name).unwrap_or_else(|| panic!("{name}"));
        (FEATURES[i].reason)(&c, (FEATURES[i].value)(&c), None)
    }

    /// One account, four events, worked by hand with window 2.
    #[test]
    fn original_features_of_a_hand_worked_account_history() {
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
        let f = compute(
            &s,
            &tx("2023-01-02 08:00:00", 1.0, 1, "ip", "d"),
            &FeatureConfig::default(),
        );
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(value(&f, "weekday_sin"), 0.0));
        assert!(close(value(&f, "weekday_cos"), 1.0));
        assert!(close(value(&f, "month_sin"), (TAU / 12.0).sin()));
        assert!(close(value(&f, "month_cos"), (TAU / 12.0).cos()));
        assert!(close(value(&f, "day_sin"), (TAU * 2.0 / 31.0).sin()));
        assert!(close(value(&f, "day_cos"), (TAU * 2.0 / 31.0).cos()));
        assert!(close(value(&f, "hour_sin"), (TAU / 3.0).sin()));
    }

    #[test]
    fn the_hour_kernel_is_e_to_the_minus_half_the_hours_apart() {
        for (d, w) in HOUR_KERNEL.iter().enumerate() {
            assert!((w - (-(d as f64) / 2.0).exp()).abs() < 1e-15, "{d}");
        }
    }

    #[test]
    fn balance_share_is_the_part_of_the_funds_a_debit_takes_and_nothing_for_a_credit() {
        let cfg = FeatureConfig::default();
        let s = AccountState::default();
        let mut drain = tx("2023-01-02 08:00:00", 9_000.0, 60, "ip", "d");
        drain.balance = 1_000.0; // the balance left after it
        let f = compute(&s, &drain, &cfg);
        assert!((value(&f, "balance_share") - 0.9).abs() < 1e-12);
        assert_eq!(
            reason(&s, &drain, "balance_share").as_deref(),
            Some("takes 90 % of the funds (9,000.00 of 10,000.00)")
        );
        drain.transaction_type = TransactionType::Credit;
        assert_eq!(value(&compute(&s, &drain, &cfg), "balance_share"), 0.0);
    }

    #[test]
    fn a_first_event_is_neutral_on_every_account_relative_feature_and_is_not_a_burst() {
        let cfg = FeatureConfig::default();
        let f = compute(
            &AccountState::default(),
            &tx("2023-01-02 08:00:00", 5000.0, 900, "ip", "d"),
            &cfg,
        );
        for name in [
            "amount_vs_habit",
            "duration_vs_habit",
            "login_vs_habit",
            "hour_rarity",
            "events_last_10m",
            "events_last_24h",
            "new_device",
            "new_ip",
            "new_at_once",
            "history",
        ] {
            assert_eq!(value(&f, name), 0.0, "{name}");
        }
        // "No previous event" reads as long ago, the farthest a live state can reach back.
        assert_eq!(
            value(&f, "log_seconds_since_last"),
            (cfg.state_ttl_secs as f64).ln_1p()
        );
    }

    #[test]
    fn habits_velocity_and_novelty_are_measured_against_the_accounts_own_past() {
        let cfg = FeatureConfig::default();
        let mut s = AccountState::default();
        for (i, amount) in [100.0, 120.0, 90.0, 110.0, 100.0, 105.0].iter().enumerate() {
            observe(
                &mut s,
                &tx(
                    &format!("2023-01-0{} 14:00:00", i + 2),
                    *amount,
                    60,
                    "1.1.1.1",
                    "D1",
                ),
                &cfg,
            );
        }
        let by_day = s.clone();
        // Three quick events one minute apart, then a big one from a new device and IP at 3 am.
        for m in 1..=3 {
            observe(
                &mut s,
                &tx(&format!("2023-01-09 02:5{m}:00"), 2.0, 60, "1.1.1.1", "D1"),
                &cfg,
            );
        }
        let odd = tx("2023-01-09 03:00:00", 2000.0, 60, "9.9.9.9", "D9");
        let f = compute(&s, &odd, &cfg);
        assert_eq!(value(&f, "events_last_10m"), 3.0);
        assert_eq!(value(&f, "events_last_24h"), 3.0);
        assert_eq!(
            (
                value(&f, "new_device"),
                value(&f, "new_ip"),
                value(&f, "new_location")
            ),
            (1.0, 1.0, 0.0)
        );
        assert_eq!(value(&f, "new_at_once"), 2.0);
        assert!(
            value(&f, "amount_vs_habit") > 2.5,
            "{}",
            value(&f, "amount_vs_habit")
        );
        let night = compute(&by_day, &odd, &cfg);
        // 03:00 is 11 hours from six events at 14:00: nearly all of the account's density is
        // elsewhere, so the hour is as rare as the prior lets six events make it.
        let kernel: f64 = (0..24_i32)
            .map(|k| (-f64::from(k.min(24 - k)) / 2.0).exp())
            .sum();
        let at_3 = 6.0 * (-11.0_f64 / 2.0).exp();
        let expected = ((6.0 * kernel + 6.0) / (24.0 * (at_3 + 0.25))).ln();
        assert!((value(&night, "hour_rarity") - expected).abs() < 1e-12);
        assert!(value(&night, "hour_rarity") > 1.5);
        // A usual hour is not rare at all.
        let afternoon = tx("2023-01-09 15:00:00", 100.0, 60, "1.1.1.1", "D1");
        assert_eq!(
            value(&compute(&by_day, &afternoon, &cfg), "hour_rarity"),
            0.0
        );
        assert_eq!(
            reason(&s, &odd, "new_at_once").as_deref(),
            Some("new device D9 and new IP 9.9.9.9 at once, all first seen on this account")
        );
        assert_eq!(
            reason(&s, &odd, "events_last_10m").as_deref(),
            Some("4 payments in the last 9 minutes")
        );
        assert_eq!(
            reason(&by_day, &odd, "hour_rarity").as_deref(),
            Some(
                "at 03:00, a time of day this account seldom uses: 0 of its 6 earlier transactions within 2 hours of it"
            )
        );
        // The usual device on a usual day says nothing.
        let plain = tx("2023-01-10 14:00:00", 100.0, 60, "1.1.1.1", "D1");
        for def in FEATURES {
            let c = Context::new(&s, &plain, &cfg);
            let v = (def.value)(&c);
            if def.topic != Topic::Velocity && def.name != "amount_vs_habit" {
                assert_eq!((def.reason)(&c, v, None), None, "{}", def.name);
            }
        }
    }

    #[test]
    fn money_is_written_with_thousands_separators() {
        assert_eq!(money(9800.0), "9,800.00");
        assert_eq!(money(1234567.891), "1,234,567.89");
        assert_eq!(money(0.5), "0.50");
    }

    #[test]
    fn computing_features_leaves_the_state_untouched() {
        let cfg = FeatureConfig::default();
        let mut s = AccountState::default();
        observe(&mut s, &tx("2023-01-02 08:00:00", 1.0, 1, "ip", "d"), &cfg);
        let before = s.clone();
        compute(&s, &tx("2023-01-03 08:00:00", 9.0, 9, "other", "x"), &cfg);
        assert_eq!(s, before);
    }
}
