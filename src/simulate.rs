//! Simulator: realistic synthetic transactions, seeded and reproducible, with labelled fraud
//! patterns (and, optionally, malformed events) mixed in. Accounts and their habits are drawn
//! from the bundled dataset, so normal traffic looks like the data the models were trained on;
//! any number of accounts can be simulated, each one copying the habits (amounts, channel,
//! device, IP, city, merchant, occupation, time of day) of one dataset account.
//!
//! Fraud patterns, each with its own share ([`Scenarios`]):
//! - `account_takeover`: a new device, IP and city log in with several attempts, then, minutes
//!   later, move most of the balance;
//! - `card_testing`: a burst of 5–12 tiny online payments within minutes;
//! - `balance_drain`: nearly the whole (large) balance at once;
//! - `odd_hours`: an otherwise ordinary transaction between 1 and 4 in the morning;
//! - `login_spike`: many login attempts and a very long session.
//!
//! A share is the fraction of draws that start such an episode, so multi-event patterns make a
//! larger fraction of events. Every event carries its label: in the `vigil.label` Kafka header,
//! or in a `vigil_label` field of a JSON-lines file. Scoring reads neither.

use std::collections::VecDeque;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::decode::{Channel, Transaction, format_time};
use crate::publish::enqueue;
use crate::train::bundled_history;

/// The Kafka header, and the JSON field in files, that carries an event's label.
pub const LABEL_HEADER: &str = "vigil.label";
pub const LABEL_FIELD: &str = "vigil_label";

/// What a simulated event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Label {
    Normal,
    AccountTakeover,
    CardTesting,
    BalanceDrain,
    OddHours,
    LoginSpike,
    /// Not a valid event at all.
    Malformed,
}

impl Label {
    /// The fraud patterns, in the order `Scenarios` lists them.
    pub const FRAUD: [Label; 5] = [
        Label::AccountTakeover,
        Label::CardTesting,
        Label::BalanceDrain,
        Label::OddHours,
        Label::LoginSpike,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::AccountTakeover => "account_takeover",
            Self::CardTesting => "card_testing",
            Self::BalanceDrain => "balance_drain",
            Self::OddHours => "odd_hours",
            Self::LoginSpike => "login_spike",
            Self::Malformed => "malformed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Normal, Self::Malformed]
            .into_iter()
            .chain(Self::FRAUD)
            .find(|l| l.as_str() == s)
    }

    /// True for the fraud patterns (the positives of a backtest).
    pub fn is_fraud(self) -> bool {
        Self::FRAUD.contains(&self)
    }
}

/// Share of draws that start each fraud pattern, and of malformed events.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenarios {
    pub fraud: Vec<(Label, f64)>,
    pub malformed: f64,
}

impl Scenarios {
    /// `anomaly_share` split evenly over the five patterns.
    pub fn even(anomaly_share: f64, malformed_share: f64) -> Self {
        let each = anomaly_share / Label::FRAUD.len() as f64;
        Self {
            fraud: Label::FRAUD.iter().map(|&l| (l, each)).collect(),
            malformed: malformed_share,
        }
    }

    /// Overrides shares from `kind=share` items, e.g. `card_testing=0.01`.
    pub fn with(mut self, items: &[String]) -> Result<Self, String> {
        for item in items {
            let (kind, share) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}` is not kind=share"))?;
            let label = Label::parse(kind.trim())
                .filter(|l| l.is_fraud())
                .ok_or_else(|| {
                    let kinds: Vec<_> = Label::FRAUD.iter().map(|l| l.as_str()).collect();
                    format!("`{kind}` is not one of {}", kinds.join(", "))
                })?;
            let share: f64 = share
                .trim()
                .parse()
                .map_err(|_| format!("`{share}` is not a number"))?;
            if !(0.0..=1.0).contains(&share) {
                return Err(format!("share {share} of {kind} is outside 0..=1"));
            }
            match self.fraud.iter_mut().find(|(l, _)| *l == label) {
                Some(entry) => entry.1 = share,
                None => self.fraud.push((label, share)),
            }
        }
        let total: f64 = self.fraud.iter().map(|(_, s)| s).sum::<f64>() + self.malformed;
        if total > 1.0 {
            return Err(format!("the shares add up to {total:.3}, more than 1"));
        }
        Ok(self)
    }
}

/// One simulated event: Kafka key, payload, and its label.
#[derive(Debug, Clone)]
pub struct SimEvent {
    pub key: String,
    pub payload: Vec<u8>,
    pub label: Label,
}

impl SimEvent {
    /// The payload with the label added as a `vigil_label` field (a JSON-lines file's record).
    /// A malformed payload is not JSON and stays as it is.
    pub fn labelled_json(&self) -> Vec<u8> {
        match serde_json::from_slice::<serde_json::Value>(&self.payload) {
            Ok(serde_json::Value::Object(mut m)) => {
                m.insert(LABEL_FIELD.into(), self.label.as_str().into());
                serde_json::to_vec(&m).unwrap_or_else(|_| self.payload.clone())
            }
            _ => self.payload.clone(),
        }
    }
}

/// The generator. Same seed and options, same events.
pub struct Simulator {
    rng: ChaCha8Rng,
    /// Dataset rows grouped by account: each simulated account copies one group's habits.
    habits: Vec<Vec<Transaction>>,
    accounts: usize,
    /// The dataset's own account ids when not scaling, generated ones otherwise.
    scaled: bool,
    locations: Vec<String>,
    clock: i64,
    mean_gap_secs: f64,
    next_id: u64,
    scenarios: Scenarios,
    queued: VecDeque<SimEvent>,
}

impl Simulator {
    /// A simulator over the dataset's own accounts; `anomaly_share` is split evenly over the
    /// five fraud patterns.
    pub fn new(seed: u64, anomaly_share: f64, malformed_share: f64) -> Self {
        Self::with_options(seed, None, Scenarios::even(anomaly_share, malformed_share))
    }

    /// `accounts`: how many accounts to simulate (default: the dataset's 495, with their ids).
    ///
    /// Each account transacts about every 39 days of simulated time, which gives the dataset's
    /// median gap (27 days) between an account's events.
    pub fn with_options(seed: u64, accounts: Option<usize>, scenarios: Scenarios) -> Self {
        let rows = bundled_history().map(|h| h.events).unwrap_or_default();
        let mut by_account: std::collections::BTreeMap<String, Vec<Transaction>> =
            Default::default();
        for r in rows {
            by_account.entry(r.account_id.clone()).or_default().push(r);
        }
        let habits: Vec<Vec<Transaction>> = by_account.into_values().collect();
        let mut locations: Vec<String> = habits
            .iter()
            .flatten()
            .map(|e| e.location.clone())
            .collect();
        locations.sort();
        locations.dedup();
        let n = accounts.unwrap_or(habits.len()).max(1);
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            mean_gap_secs: 39.0 * 86_400.0 / n as f64,
            accounts: n,
            scaled: accounts.is_some(),
            habits,
            locations,
            clock: 1_704_067_200, // 2024-01-01, right after the dataset ends
            next_id: 1,
            scenarios,
            queued: VecDeque::new(),
        }
    }

    fn pick<T: Clone>(rng: &mut ChaCha8Rng, v: &[T], fallback: T) -> T {
        v.choose(rng).cloned().unwrap_or(fallback)
    }

    /// One of an account's usual transactions, on the simulator's clock (keeping the row's
    /// weekday and time of day: the dataset has no weekend traffic).
    fn usual(&mut self, account: usize) -> Option<Transaction> {
        let habits = self.habits.get(account % self.habits.len().max(1))?;
        let mut tx = habits.choose(&mut self.rng)?.clone();
        if self.scaled {
            tx.account_id = format!("SA{account:07}");
        }
        tx.transaction_id = format!("SIM{:09}", self.next_id);
        self.next_id += 1;
        let day = self.clock - self.clock.rem_euclid(86_400);
        let weekday = |t: i64| (t.div_euclid(86_400) + 3).rem_euclid(7);
        let shift = (weekday(tx.time) - weekday(day)).rem_euclid(7);
        tx.time = day + shift * 86_400 + tx.time.rem_euclid(86_400);
        tx.previous_date = None;
        Some(tx)
    }

    fn roll_label(&mut self) -> Label {
        let mut roll: f64 = self.rng.r#gen();
        if roll < self.scenarios.malformed {
            return Label::Malformed;
        }
        roll -= self.scenarios.malformed;
        for &(label, share) in &self.scenarios.fraud {
            if roll < share {
                return label;
            }
            roll -= share;
        }
        Label::Normal
    }

    fn new_ip(rng: &mut ChaCha8Rng) -> String {
        format!(
            "{}.{}.{}.{}",
            rng.gen_range(1..224),
            rng.gen_range(0..256),
            rng.gen_range(0..256),
            rng.gen_range(1..255)
        )
    }

    fn event(tx: &Transaction, label: Label) -> SimEvent {
        SimEvent {
            key: tx.account_id.clone(),
            payload: serde_json::to_vec(tx).unwrap_or_default(),
            label,
        }
    }

    /// Builds the events of one episode of `label` for `account` into the queue.
    fn episode(&mut self, label: Label, account: usize) {
        let Some(mut tx) = self.usual(account) else {
            self.queued.push_back(SimEvent {
                key: String::new(),
                payload: b"{}".to_vec(),
                label: Label::Malformed,
            });
            return;
        };
        let day = tx.time - tx.time.rem_euclid(86_400);
        match label {
            Label::Normal => self.queued.push_back(Self::event(&tx, label)),
            Label::AccountTakeover => {
                let rng = &mut self.rng;
                tx.device_id = format!("D9{:05}", rng.gen_range(0..100_000));
                tx.ip_address = Self::new_ip(rng);
                tx.location = Self::pick(rng, &self.locations, tx.location.clone());
                tx.login_attempts = rng.gen_range(3..=5);
                tx.time = day + rng.gen_range(1..5) * 3600 + rng.gen_range(0..3600);
                self.queued.push_back(Self::event(&tx, label));
                let mut take = tx.clone();
                take.transaction_id = format!("SIM{:09}", self.next_id);
                self.next_id += 1;
                take.time += self.rng.gen_range(60..900);
                take.login_attempts = 1;
                take.amount = (tx.balance * self.rng.gen_range(0.85..0.99) * 100.0).round() / 100.0;
                self.queued.push_back(Self::event(&take, label));
            }
            Label::CardTesting => {
                let n = self.rng.gen_range(5..=12);
                let merchant = format!("M{:03}", self.rng.gen_range(1..=100));
                let device = format!("D9{:05}", self.rng.gen_range(0..100_000));
                let ip = Self::new_ip(&mut self.rng);
                let mut t = tx.time;
                for i in 0..n {
                    let mut probe = tx.clone();
                    if i > 0 {
                        probe.transaction_id = format!("SIM{:09}", self.next_id);
                        self.next_id += 1;
                    }
                    t += self.rng.gen_range(5..90);
                    probe.time = t;
                    probe.amount = (self.rng.gen_range(0.5..5.0_f64) * 100.0).round() / 100.0;
                    probe.channel = Channel::Online;
                    probe.merchant_id = merchant.clone();
                    probe.device_id = device.clone();
                    probe.ip_address = ip.clone();
                    probe.duration = self.rng.gen_range(8..30);
                    self.queued.push_back(Self::event(&probe, label));
                }
            }
            Label::BalanceDrain => {
                tx.balance = self.rng.gen_range(8_000.0..15_000.0_f64).round();
                tx.amount = (tx.balance * self.rng.gen_range(0.9..0.99) * 100.0).round() / 100.0;
                tx.duration = self.rng.gen_range(200..300);
                self.queued.push_back(Self::event(&tx, label));
            }
            Label::OddHours => {
                tx.time = day + self.rng.gen_range(1..4) * 3600 + self.rng.gen_range(0..3600);
                self.queued.push_back(Self::event(&tx, label));
            }
            Label::LoginSpike => {
                tx.login_attempts = self.rng.gen_range(5..=9);
                tx.duration = self.rng.gen_range(900..3_000);
                tx.time = day + self.rng.gen_range(2..4) * 3600;
                self.queued.push_back(Self::event(&tx, label));
            }
            Label::Malformed => {
                let payload = match self.rng.gen_range(0..3) {
                    0 => b"{\"TransactionID\": \"broken".to_vec(),
                    1 => {
                        let mut v = serde_json::to_value(&tx).unwrap_or_default();
                        if let Some(m) = v.as_object_mut() {
                            m.remove("AccountBalance");
                        }
                        serde_json::to_vec(&v).unwrap_or_default()
                    }
                    _ => {
                        let mut v = serde_json::to_value(&tx).unwrap_or_default();
                        if let Some(m) = v.as_object_mut() {
                            m.insert("CustomerAge".into(), 7.into());
                        }
                        serde_json::to_vec(&v).unwrap_or_default()
                    }
                };
                self.queued.push_back(SimEvent {
                    key: tx.account_id,
                    payload,
                    label,
                });
            }
        }
    }

    /// The next event.
    pub fn next_event(&mut self) -> SimEvent {
        if let Some(e) = self.queued.pop_front() {
            return e;
        }
        let gap = -self.mean_gap_secs * (1.0 - self.rng.r#gen::<f64>()).ln();
        self.clock += gap.max(1.0) as i64;
        let label = self.roll_label();
        let account = self.rng.gen_range(0..self.accounts);
        self.episode(label, account);
        self.queued.pop_front().unwrap_or_else(|| SimEvent {
            key: String::new(),
            payload: b"{}".to_vec(),
            label: Label::Malformed,
        })
    }

    /// Event time of the simulated clock, for progress lines.
    pub fn clock(&self) -> String {
        format_time(self.clock)
    }
}

/// Produces `count` events (forever if `None`) at about `rate` per second.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    sim: &mut Simulator,
    rate: f64,
    count: Option<u64>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<u64, rdkafka::error::KafkaError> {
    let batch = (rate / 20.0).ceil().max(1.0) as u64;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(batch as f64 / rate.max(0.001)));
    let mut sent = 0u64;
    let mut pending = Vec::new();
    while count.is_none_or(|c| sent < c) && !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        for _ in 0..batch {
            if count.is_some_and(|c| sent >= c) {
                break;
            }
            let e = sim.next_event();
            let headers = OwnedHeaders::new().insert(Header {
                key: LABEL_HEADER,
                value: Some(e.label.as_str()),
            });
            let record = FutureRecord::to(topic)
                .key(e.key.as_bytes())
                .payload(e.payload.as_slice())
                .headers(headers);
            pending.push(enqueue(producer, record).await?);
            sent += 1;
        }
        for d in pending.drain(..) {
            if let Ok(Err((e, _))) = d.await {
                return Err(e);
            }
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Decoder;

    #[test]
    fn the_same_seed_gives_the_same_events() {
        let (mut a, mut b) = (Simulator::new(7, 0.05, 0.01), Simulator::new(7, 0.05, 0.01));
        for _ in 0..500 {
            let (x, y) = (a.next_event(), b.next_event());
            assert_eq!((x.key, x.payload, x.label), (y.key, y.payload, y.label));
        }
    }

    #[test]
    fn labels_follow_the_shares_and_only_malformed_events_fail_validation() {
        let mut s = Simulator::new(1, 0.1, 0.05);
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..6000 {
            let e = s.next_event();
            let valid = Decoder::Json.decode(&e.payload).is_ok();
            assert_eq!(valid, e.label != Label::Malformed, "{:?}", e.label);
            *counts.entry(e.label).or_insert(0) += 1;
        }
        for kind in Label::FRAUD {
            assert!(counts.get(&kind).copied().unwrap_or(0) > 40, "{counts:?}");
        }
        let malformed = counts.get(&Label::Malformed).copied().unwrap_or(0);
        assert!((200..=420).contains(&malformed), "{counts:?}");
    }

    #[test]
    fn card_testing_is_a_burst_of_tiny_online_payments_on_one_account() {
        let scenarios = Scenarios::even(0.0, 0.0)
            .with(&["card_testing=1".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        let mut s = Simulator::with_options(3, None, scenarios);
        let first = Decoder::Json
            .decode(&s.next_event().payload)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut burst = vec![first];
        while burst.len() < 5 {
            let e = s.next_event();
            assert_eq!(e.label, Label::CardTesting);
            burst.push(
                Decoder::Json
                    .decode(&e.payload)
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
        for tx in &burst {
            assert_eq!(tx.account_id, burst[0].account_id);
            assert!(tx.amount < 5.0 && tx.channel == Channel::Online, "{tx:?}");
        }
        assert!(
            burst
                .windows(2)
                .all(|w| w[1].time > w[0].time && w[1].time - w[0].time < 90)
        );
    }

    #[test]
    fn account_takeover_logs_in_from_somewhere_new_then_moves_most_of_the_balance() {
        let scenarios = Scenarios::even(0.0, 0.0)
            .with(&["account_takeover=1".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        let mut s = Simulator::with_options(5, None, scenarios);
        let a = Decoder::Json
            .decode(&s.next_event().payload)
            .unwrap_or_else(|e| panic!("{e}"));
        let b = Decoder::Json
            .decode(&s.next_event().payload)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (a.account_id.as_str(), a.device_id.as_str()),
            (b.account_id.as_str(), b.device_id.as_str())
        );
        assert!(a.device_id.starts_with("D9") && a.login_attempts >= 3);
        assert!(b.amount > 0.8 * b.balance && b.time > a.time);
    }

    #[test]
    fn scaled_accounts_get_their_own_ids_and_bad_shares_are_refused() {
        let mut s = Simulator::with_options(9, Some(10_000), Scenarios::even(0.0, 0.0));
        let ids: std::collections::BTreeSet<String> =
            (0..2000).map(|_| s.next_event().key).collect();
        assert!(
            ids.len() > 1500 && ids.iter().all(|k| k.starts_with("SA")),
            "{}",
            ids.len()
        );
        assert!(
            Scenarios::even(0.0, 0.0)
                .with(&["phishing=0.1".into()])
                .is_err()
        );
        assert!(
            Scenarios::even(0.0, 0.0)
                .with(&["odd_hours=2".into()])
                .is_err()
        );
        assert!(
            Scenarios::even(0.5, 0.0)
                .with(&["odd_hours=0.9".into()])
                .is_err()
        );
    }

    #[test]
    fn a_labelled_record_keeps_every_field_and_adds_the_label() {
        let mut s = Simulator::new(2, 0.0, 0.0);
        let e = s.next_event();
        let v: serde_json::Value = serde_json::from_slice(&e.labelled_json()).unwrap_or_default();
        assert_eq!(v[LABEL_FIELD], "normal");
        let tx = Decoder::Json
            .decode(&e.labelled_json())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tx.account_id, e.key);
    }
}
