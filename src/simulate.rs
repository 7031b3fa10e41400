//! Simulator: labelled synthetic transactions, seeded and reproducible, with fraud patterns (and,
//! optionally, malformed events) mixed into accounts that already have a history.
//!
//! Normal traffic is built so that "new" or "unusual" alone is not fraud. Every account has
//! habits with the variety real accounts show: one to three devices and IPs, a handful of
//! favourite merchants (Zipf-weighted) and sometimes a new one, a log-normal amount around its
//! own usual level with occasional large purchases, a channel mix, waking hours in which it
//! transacts (night owls included; one event in 300 at any hour), now and then a trip (another city, another IP for a few days), a new phone or
//! a new home IP, a mistyped password, salary credits. Each account transacts at its own rate
//! (a few times a week to a few times a day), at its usual hours, sometimes several times within
//! an hour. The event clock is each account's own clock: N accounts make about 1.3·N events per
//! simulated day, so event times stay realistic however long a simulation runs.
//!
//! Fraud patterns, each with its own share of events ([`Scenarios`]):
//! - `account_takeover`: a device, IP and city never seen on the account log in with several
//!   attempts, then, minutes later, move most of the balance online;
//! - `card_testing`: a burst of 5–12 tiny online payments within minutes at an unfamiliar
//!   merchant, from an unfamiliar device;
//! - `balance_drain`: nearly the whole balance at once, from the account's usual device;
//! - `odd_hours`: an otherwise ordinary transaction between 1 and 4 in the morning on an account
//!   that sleeps then;
//! - `login_spike`: many login attempts and a very long session;
//! - `amount_spike`: a payment 4.5–7 of the account's own spreads above its usual amount (10 to
//!   several hundred times it), otherwise ordinary.
//!
//! Every event carries its label: in the `vigil.label` Kafka header, or in a `vigil_label` field
//! of a JSON-lines file. Scoring reads neither.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Normal};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::decode::{Channel, Occupation, Transaction, TransactionType, format_time};
use crate::ingest::KafkaProducer;
use crate::publish::enqueue;

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
    AmountSpike,
    /// Not a valid event at all.
    Malformed,
}

impl Label {
    /// The fraud patterns, in the order `Scenarios` lists them.
    pub const FRAUD: [Label; 6] = [
        Label::AccountTakeover,
        Label::CardTesting,
        Label::BalanceDrain,
        Label::OddHours,
        Label::LoginSpike,
        Label::AmountSpike,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::AccountTakeover => "account_takeover",
            Self::CardTesting => "card_testing",
            Self::BalanceDrain => "balance_drain",
            Self::OddHours => "odd_hours",
            Self::LoginSpike => "login_spike",
            Self::AmountSpike => "amount_spike",
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

    /// Mean events per episode, to turn a share of events into a chance of starting one.
    fn mean_events(self) -> f64 {
        match self {
            Self::AccountTakeover => 2.0,
            Self::CardTesting => 8.5,
            _ => 1.0,
        }
    }
}

/// Share of events of each fraud pattern, and of malformed events.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenarios {
    pub fraud: Vec<(Label, f64)>,
    pub malformed: f64,
}

impl Scenarios {
    /// `anomaly_share` of all events split evenly over the fraud patterns.
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

    /// Chance that one account event starts an episode of each kind.
    fn start_chances(&self) -> Vec<(Label, f64)> {
        self.fraud
            .iter()
            .map(|&(l, share)| (l, share / l.mean_events()))
            .collect()
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

/// US cities, as in the bundled dataset's `Location` column.
const CITIES: [&str; 24] = [
    "Albuquerque",
    "Atlanta",
    "Austin",
    "Baltimore",
    "Boston",
    "Charlotte",
    "Chicago",
    "Columbus",
    "Dallas",
    "Denver",
    "Detroit",
    "El Paso",
    "Fresno",
    "Houston",
    "Indianapolis",
    "Jacksonville",
    "Las Vegas",
    "Los Angeles",
    "Miami",
    "Nashville",
    "New York",
    "Philadelphia",
    "Phoenix",
    "San Diego",
];

/// Merchants of the simulated population (`M001`…).
const MERCHANTS: u32 = 400;

/// A weighted choice among a few values.
#[derive(Debug, Clone)]
struct Weighted {
    values: Vec<String>,
    weights: Vec<f64>,
}

impl Weighted {
    fn zipf(values: Vec<String>) -> Self {
        let weights = (1..=values.len()).map(|r| 1.0 / r as f64).collect();
        Self { values, weights }
    }

    fn pick(&self, rng: &mut ChaCha8Rng) -> String {
        let total: f64 = self.weights.iter().sum();
        let mut roll = rng.r#gen::<f64>() * total;
        for (v, w) in self.values.iter().zip(&self.weights) {
            if roll < *w {
                return v.clone();
            }
            roll -= w;
        }
        self.values.last().cloned().unwrap_or_default()
    }

    /// Adds a value as the most used one (a new phone, a new home connection).
    fn replace_favourite(&mut self, value: String) {
        self.values.insert(0, value);
        self.weights
            .insert(0, self.weights.first().copied().unwrap_or(1.0) * 1.5);
    }

    fn add(&mut self, value: String, weight: f64) {
        self.values.push(value);
        self.weights.push(weight);
    }
}

/// One account's habits and where it stands.
#[derive(Debug, Clone)]
struct Profile {
    id: String,
    age: u32,
    occupation: Occupation,
    home: String,
    devices: Weighted,
    ips: Weighted,
    merchants: Weighted,
    channels: [f64; 3],
    /// ln of the usual debit amount, and the spread of ln amount.
    amount_mu: f64,
    amount_sigma: f64,
    duration_mu: f64,
    /// The waking window, hours of day (past 24 for night owls, wrapped): transactions fall in
    /// it, densest in its middle, and almost never outside.
    wake: f64,
    sleep: f64,
    events_per_day: f64,
    balance: f64,
    salary: f64,
    /// Events made so far.
    history: u32,
    last_time: i64,
    /// A trip: until when, where, and on which IP.
    trip: Option<(i64, String, String)>,
}

/// What the clock holds next: an account's next ordinary event, or a scripted event.
#[derive(Debug)]
enum Due {
    Account(usize),
    Scripted(SimEvent),
}

/// The generator. Same seed and options, same events.
pub struct Simulator {
    rng: ChaCha8Rng,
    profiles: Vec<Profile>,
    /// (event time, sequence, index into `dues`): a min-heap by time, ties in creation order.
    heap: BinaryHeap<Reverse<(i64, u64, usize)>>,
    dues: Vec<Option<Due>>,
    free: Vec<usize>,
    seq: u64,
    clock: i64,
    next_id: u64,
    chances: Vec<(Label, f64)>,
    malformed: f64,
}

/// Accounts simulated when none are asked for.
pub const DEFAULT_ACCOUNTS: usize = 2_000;

/// 2024-01-01T00:00:00Z, where simulations start unless told otherwise.
pub const DEFAULT_START: i64 = 1_704_067_200;

impl Simulator {
    /// A simulator of [`DEFAULT_ACCOUNTS`] accounts; `anomaly_share` of the events are fraud,
    /// split evenly over the patterns.
    pub fn new(seed: u64, anomaly_share: f64, malformed_share: f64) -> Self {
        Self::with_options(seed, None, Scenarios::even(anomaly_share, malformed_share))
    }

    /// `accounts`: how many accounts to simulate (default [`DEFAULT_ACCOUNTS`]).
    pub fn with_options(seed: u64, accounts: Option<usize>, scenarios: Scenarios) -> Self {
        Self::starting_at(seed, accounts, scenarios, DEFAULT_START)
    }

    /// As [`Self::with_options`], with the clock starting at `start` (seconds since the epoch).
    pub fn starting_at(
        seed: u64,
        accounts: Option<usize>,
        scenarios: Scenarios,
        start: i64,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = accounts.unwrap_or(DEFAULT_ACCOUNTS).max(1);
        let profiles: Vec<Profile> = (0..n).map(|i| Self::profile(&mut rng, i, start)).collect();
        let mut sim = Self {
            rng,
            profiles,
            heap: BinaryHeap::new(),
            dues: Vec::new(),
            free: Vec::new(),
            seq: 0,
            clock: start,
            next_id: 1,
            chances: scenarios.start_chances(),
            malformed: scenarios.malformed,
        };
        for i in 0..n {
            // Accounts start at a random point of their own rhythm.
            let first =
                start + (sim.rng.r#gen::<f64>() * 86_400.0 / sim.profiles[i].events_per_day) as i64;
            let t = sim.at_usual_hour(i, first, start);
            sim.schedule(t, Due::Account(i));
        }
        sim
    }

    fn profile(rng: &mut ChaCha8Rng, i: usize, start: i64) -> Profile {
        let ids = |rng: &mut ChaCha8Rng, n: usize, make: &dyn Fn(&mut ChaCha8Rng) -> String| {
            (0..n).map(|_| make(rng)).collect::<Vec<_>>()
        };
        let n_devices = [1, 1, 2, 2, 3][rng.gen_range(0..5)];
        let n_ips = [1, 2, 2, 3][rng.gen_range(0..4)];
        let n_merchants = rng.gen_range(3..=15);
        let night_owl = rng.gen_bool(0.12);
        let channels = match rng.gen_range(0..3) {
            0 => [0.6, 0.3, 0.1],
            1 => [0.2, 0.7, 0.1],
            _ => [0.3, 0.4, 0.3],
        };
        let age = rng.gen_range(18..=80);
        let occupation = match age {
            18..=24 => Occupation::Student,
            65.. => Occupation::Retired,
            _ if rng.gen_bool(0.5) => Occupation::Engineer,
            _ => Occupation::Doctor,
        };
        let amount_mu = rng.gen_range(20.0_f64..400.0).ln();
        Profile {
            id: format!("AC{i:06}"),
            age,
            occupation,
            home: CITIES[rng.gen_range(0..CITIES.len())].to_string(),
            devices: Weighted::zipf(ids(rng, n_devices, &|r| Self::new_device(r))),
            ips: Weighted::zipf(ids(rng, n_ips, &|r| Self::new_ip(r))),
            merchants: Weighted::zipf(ids(rng, n_merchants, &|r| Self::merchant(r))),
            channels,
            amount_mu,
            amount_sigma: rng.gen_range(0.4..0.9),
            duration_mu: rng.gen_range(40.0_f64..200.0).ln(),
            wake: if night_owl {
                rng.gen_range(10.0..13.0)
            } else {
                rng.gen_range(6.0..9.0)
            },
            sleep: if night_owl {
                rng.gen_range(25.0..28.0)
            } else {
                rng.gen_range(21.0..24.5)
            },
            events_per_day: rng.gen_range(0.3_f64..3.0),
            balance: (amount_mu.exp() * rng.gen_range(10.0..60.0)).round(),
            salary: (amount_mu.exp() * rng.gen_range(15.0..40.0)).round(),
            history: 0,
            last_time: start,
            trip: None,
        }
    }

    fn new_device(rng: &mut ChaCha8Rng) -> String {
        format!("D{:07}", rng.gen_range(0..10_000_000))
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

    fn merchant(rng: &mut ChaCha8Rng) -> String {
        format!("M{:03}", rng.gen_range(1..=MERCHANTS))
    }

    fn schedule(&mut self, time: i64, due: Due) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.dues[s] = Some(due);
                s
            }
            None => {
                self.dues.push(Some(due));
                self.dues.len() - 1
            }
        };
        self.seq += 1;
        self.heap.push(Reverse((time, self.seq, slot)));
    }

    /// The day of `around`, at a time of day drawn from the account's waking hours (a
    /// triangular density over the window; one in 300 at any hour at all); a time before
    /// `not_before` becomes a follow-up a few minutes after it.
    fn at_usual_hour(&mut self, account: usize, around: i64, not_before: i64) -> i64 {
        let p = &self.profiles[account];
        let hour = if self.rng.gen_bool(1.0 / 300.0) {
            self.rng.gen_range(0.0..24.0)
        } else {
            let (a, b) = (self.rng.r#gen::<f64>(), self.rng.r#gen::<f64>());
            (p.wake + (p.sleep - p.wake) * (a + b) / 2.0).rem_euclid(24.0)
        };
        let t = around - around.rem_euclid(86_400) + (hour * 3600.0) as i64;
        if t > not_before {
            t
        } else {
            not_before + self.rng.gen_range(60..3600)
        }
    }

    fn next_transaction_id(&mut self) -> String {
        let id = format!("SIM{:09}", self.next_id);
        self.next_id += 1;
        id
    }

    /// One of the account's ordinary transactions at `time`; moves its habits along.
    fn ordinary(&mut self, account: usize, time: i64) -> Transaction {
        let transaction_id = self.next_transaction_id();
        let rng = &mut self.rng;
        let p = &mut self.profiles[account];
        if p.trip.as_ref().is_some_and(|(until, _, _)| *until < time) {
            p.trip = None;
        }
        if p.trip.is_none() && rng.gen_bool(0.01) {
            let city = CITIES[rng.gen_range(0..CITIES.len())].to_string();
            p.trip = Some((
                time + rng.gen_range(2..10) * 86_400,
                city,
                Self::new_ip(rng),
            ));
        }
        if rng.gen_bool(0.003) {
            p.devices.replace_favourite(Self::new_device(rng));
        }
        if rng.gen_bool(0.004) {
            p.ips.replace_favourite(Self::new_ip(rng));
        }
        let (location, ip) = match &p.trip {
            Some((_, city, ip)) if rng.gen_bool(0.8) => (city.clone(), ip.clone()),
            _ => (p.home.clone(), p.ips.pick(rng)),
        };
        let merchant = if rng.gen_bool(0.06) {
            let m = Self::merchant(rng);
            if rng.gen_bool(0.3) {
                p.merchants.add(m.clone(), 0.5);
            }
            m
        } else {
            p.merchants.pick(rng)
        };
        let credit = rng.gen_bool(0.08);
        let channel_roll = rng.r#gen::<f64>();
        let channel = if channel_roll < p.channels[0] {
            Channel::Atm
        } else if channel_roll < p.channels[0] + p.channels[1] {
            Channel::Online
        } else {
            Channel::Branch
        };
        let z: f64 = Normal::new(0.0, 1.0).map_or(0.0, |d| d.sample(rng));
        let mut amount = (p.amount_mu + p.amount_sigma * z).exp();
        if rng.gen_bool(0.01) {
            amount *= rng.gen_range(3.0..6.0); // rent, a holiday, a repair
        }
        if credit {
            amount = p.salary * rng.gen_range(0.3..1.0);
            p.balance += amount;
        } else {
            amount = amount.min(p.balance * 0.9);
            p.balance -= amount;
        }
        // Salary and savings keep the balance around its own level.
        let level = p.salary * 2.0;
        if p.balance < level * 0.2 {
            p.balance += p.salary;
        }
        let duration = (p.duration_mu
            + 0.35 * Normal::new(0.0, 1.0).map_or(0.0, |d| d.sample(rng)))
        .exp()
        .clamp(5.0, 1_500.0);
        let login_attempts = match rng.r#gen::<f64>() {
            x if x < 0.93 => 1,
            x if x < 0.99 => 2,
            _ => 3,
        };
        p.history += 1;
        p.last_time = p.last_time.max(time);
        Transaction {
            transaction_id: transaction_id.into(),
            account_id: p.id.clone().into(),
            amount: (amount.max(0.5) * 100.0).round() / 100.0,
            time,
            transaction_type: if credit {
                TransactionType::Credit
            } else {
                TransactionType::Debit
            },
            location: location.into(),
            device_id: p.devices.pick(rng).into(),
            ip_address: ip.into(),
            merchant_id: merchant.into(),
            channel,
            customer_age: p.age,
            occupation: p.occupation,
            duration: duration as u32,
            login_attempts,
            balance: (p.balance.max(0.0) * 100.0).round() / 100.0,
            previous_date: None,
        }
    }

    fn roll_label(&mut self, account: usize) -> Label {
        let mut roll: f64 = self.rng.r#gen();
        if roll < self.malformed {
            return Label::Malformed;
        }
        roll -= self.malformed;
        // Fraud strikes accounts that have a history to stand out from.
        if self.profiles[account].history < 5 {
            return Label::Normal;
        }
        let by_day = self.profiles[account].sleep <= 24.5;
        for &(label, chance) in &self.chances {
            if roll < chance {
                // Odd hours are odd for an account that is active by day.
                return if label == Label::OddHours && !by_day {
                    Label::Normal
                } else {
                    label
                };
            }
            roll -= chance;
        }
        Label::Normal
    }

    fn event(tx: &Transaction, label: Label) -> SimEvent {
        SimEvent {
            key: tx.account_id.to_string(),
            payload: serde_json::to_vec(tx).unwrap_or_default(),
            label,
        }
    }

    /// Schedules the events of one episode of `label` on `account`, starting at `time`.
    fn episode(&mut self, label: Label, account: usize, time: i64) {
        let mut tx = self.ordinary(account, time);
        let rng = &mut self.rng;
        let mut events = Vec::new();
        match label {
            Label::Normal => events.push(Self::event(&tx, label)),
            Label::AccountTakeover => {
                let home = &self.profiles[account].home;
                let elsewhere: Vec<&str> = CITIES.iter().copied().filter(|c| c != home).collect();
                tx.device_id = Self::new_device(rng).into();
                tx.ip_address = Self::new_ip(rng).into();
                tx.location = elsewhere.choose(rng).map_or("Unknown", |c| c).into();
                tx.login_attempts = rng.gen_range(3..=6);
                tx.channel = Channel::Online;
                events.push(Self::event(&tx, label));
                let mut take = tx.clone();
                take.transaction_id = format!("SIM{:09}", self.next_id).into();
                self.next_id += 1;
                take.time += rng.gen_range(60..900);
                take.login_attempts = 1;
                take.transaction_type = TransactionType::Debit;
                take.merchant_id = Self::merchant(rng).into();
                let before = tx.balance;
                take.amount = (before * rng.gen_range(0.7..0.99) * 100.0).round() / 100.0;
                take.balance = ((before - take.amount) * 100.0).round() / 100.0;
                events.push(Self::event(&take, label));
            }
            Label::CardTesting => {
                let n = rng.gen_range(5..=12);
                let merchant = Self::merchant(rng);
                let device = Self::new_device(rng);
                let ip = Self::new_ip(rng);
                let mut t = tx.time;
                for i in 0..n {
                    let mut probe = tx.clone();
                    if i > 0 {
                        probe.transaction_id = format!("SIM{:09}", self.next_id).into();
                        self.next_id += 1;
                        t += rng.gen_range(5..90);
                    }
                    probe.time = t;
                    probe.amount = (rng.gen_range(0.5..5.0_f64) * 100.0).round() / 100.0;
                    probe.transaction_type = TransactionType::Debit;
                    probe.channel = Channel::Online;
                    probe.merchant_id = merchant.clone().into();
                    probe.device_id = device.clone().into();
                    probe.ip_address = ip.clone().into();
                    probe.duration = rng.gen_range(8..30);
                    events.push(Self::event(&probe, label));
                }
            }
            Label::BalanceDrain => {
                let before = tx.balance
                    + if tx.transaction_type == TransactionType::Debit {
                        tx.amount
                    } else {
                        -tx.amount
                    };
                tx.transaction_type = TransactionType::Debit;
                tx.amount = (before.max(100.0) * rng.gen_range(0.9..0.99) * 100.0).round() / 100.0;
                tx.balance = ((before.max(100.0) - tx.amount) * 100.0).round() / 100.0;
                events.push(Self::event(&tx, label));
            }
            Label::OddHours => {
                // The coming night, between 1 and 4, at least two hours into the account's sleep.
                let p = &self.profiles[account];
                let (from, to) = ((p.sleep - 24.0 + 2.0).max(1.0), (p.wake - 2.0).min(4.0));
                let midnight = tx.time - tx.time.rem_euclid(86_400) + 86_400;
                tx.time = midnight + (rng.gen_range(from..to.max(from + 0.1)) * 3600.0) as i64;
                events.push(Self::event(&tx, label));
            }
            Label::LoginSpike => {
                tx.login_attempts = rng.gen_range(5..=9);
                tx.duration = rng.gen_range(900..3_000);
                events.push(Self::event(&tx, label));
            }
            Label::AmountSpike => {
                // Far above the habit in the account's own terms: 4.5–7 spreads of its amounts.
                let p = &self.profiles[account];
                let far = p.amount_mu + p.amount_sigma * rng.gen_range(4.5..7.0);
                tx.transaction_type = TransactionType::Debit;
                tx.amount = (far.exp().min(500_000.0) * 100.0).round() / 100.0;
                tx.balance = (tx.balance + tx.amount * rng.gen_range(0.2..3.0)).round();
                events.push(Self::event(&tx, label));
            }
            Label::Malformed => {
                let payload = match rng.gen_range(0..3) {
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
                events.push(SimEvent {
                    key: tx.account_id.to_string(),
                    payload,
                    label,
                });
            }
        }
        for e in events {
            let t = serde_json::from_slice::<serde_json::Value>(&e.payload)
                .ok()
                .and_then(|v| v.get("TransactionDate")?.as_str().map(str::to_string))
                .and_then(|d| crate::decode::parse_time(&d))
                .unwrap_or(time);
            self.schedule(t.max(time), Due::Scripted(e));
        }
    }

    /// The next event, in event-time order.
    pub fn next_event(&mut self) -> SimEvent {
        loop {
            let Some(Reverse((time, _, slot))) = self.heap.pop() else {
                return SimEvent {
                    key: String::new(),
                    payload: b"{}".to_vec(),
                    label: Label::Malformed,
                };
            };
            self.clock = self.clock.max(time);
            let due = self.dues.get_mut(slot).and_then(Option::take);
            self.free.push(slot);
            match due {
                Some(Due::Scripted(e)) => return e,
                Some(Due::Account(a)) => {
                    let label = self.roll_label(a);
                    self.episode(label, a, time);
                    let gap = Exp::new(self.profiles[a].events_per_day)
                        .map_or(1.0, |d| d.sample(&mut self.rng));
                    let next = if self.rng.gen_bool(0.15) {
                        // Several errands in one outing.
                        time + self.rng.gen_range(120..5400)
                    } else {
                        let around = time + (gap * 86_400.0) as i64;
                        self.at_usual_hour(a, around, time)
                    };
                    self.schedule(next, Due::Account(a));
                }
                None => {}
            }
        }
    }

    /// Event time of the simulated clock, for progress lines.
    pub fn clock(&self) -> String {
        format_time(self.clock)
    }
}

/// Enqueues one event, its label in the [`LABEL_HEADER`] header.
async fn send(
    producer: &KafkaProducer,
    topic: &str,
    e: &SimEvent,
) -> Result<rdkafka::producer::DeliveryFuture, rdkafka::error::KafkaError> {
    let headers = OwnedHeaders::new().insert(Header {
        key: LABEL_HEADER,
        value: Some(e.label.as_str()),
    });
    let record = FutureRecord::to(topic)
        .key(e.key.as_bytes())
        .payload(e.payload.as_slice())
        .headers(headers);
    enqueue(producer, record).await
}

/// Produces `events` as fast as the broker takes them, and waits until every one is
/// acknowledged.
pub async fn produce_all(
    producer: &KafkaProducer,
    topic: &str,
    events: &[SimEvent],
) -> Result<(), rdkafka::error::KafkaError> {
    let mut pending = Vec::with_capacity(events.len());
    for e in events {
        pending.push(send(producer, topic, e).await?);
    }
    for d in pending {
        if let Ok(Err((e, _))) = d.await {
            return Err(e);
        }
    }
    Ok(())
}

/// Produces `count` events (forever if `None`) at `rate` per second, open loop: on a schedule
/// of one small group per millisecond (so events are spread evenly, not sent in bursts) that
/// does not wait for the broker's acknowledgements — up to [`UNACKNOWLEDGED`] may be in flight —
/// so a slow consumer downstream sees the offered rate, not a rate it slowed down itself.
pub async fn produce(
    producer: &KafkaProducer,
    topic: &str,
    sim: &mut Simulator,
    rate: f64,
    count: Option<u64>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<u64, rdkafka::error::KafkaError> {
    use futures::FutureExt;
    let per_tick = (rate / 1_000.0).ceil().max(1.0) as u64;
    let mut tick =
        tokio::time::interval(Duration::from_secs_f64(per_tick as f64 / rate.max(0.001)));
    let mut in_flight = std::collections::VecDeque::new();
    let mut sent = 0u64;
    while count.is_none_or(|c| sent < c) && !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let n = count.map_or(per_tick, |c| per_tick.min(c - sent));
        for _ in 0..n {
            in_flight.push_back(send(producer, topic, &sim.next_event()).await?);
        }
        sent += n;
        loop {
            let full = in_flight.len() > UNACKNOWLEDGED;
            let Some(front) = in_flight.front_mut() else {
                break;
            };
            let done = if full {
                Some(front.await)
            } else {
                front.now_or_never()
            };
            match done {
                Some(Ok(Err((e, _)))) => return Err(e),
                Some(_) => {
                    in_flight.pop_front();
                }
                None => break,
            }
        }
    }
    for delivery in in_flight {
        if let Ok(Err((e, _))) = delivery.await {
            return Err(e);
        }
    }
    Ok(sent)
}

/// Most events [`produce`] keeps unacknowledged before it waits for the oldest.
const UNACKNOWLEDGED: usize = 100_000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Decoder;

    fn decode(e: &SimEvent) -> Transaction {
        Decoder::Json
            .decode(&e.payload)
            .unwrap_or_else(|err| panic!("{err}: {:?}", e.label))
    }

    fn only(kind: &str) -> Scenarios {
        Scenarios::even(0.0, 0.0)
            .with(&[format!("{kind}=0.2")])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_same_seed_gives_the_same_events() {
        let (mut a, mut b) = (Simulator::new(7, 0.05, 0.01), Simulator::new(7, 0.05, 0.01));
        for _ in 0..2000 {
            let (x, y) = (a.next_event(), b.next_event());
            assert_eq!((x.key, x.payload, x.label), (y.key, y.payload, y.label));
        }
    }

    #[test]
    fn labels_follow_the_shares_of_events_and_only_malformed_events_fail_validation() {
        let mut s = Simulator::new(1, 0.06, 0.01);
        let mut counts = std::collections::BTreeMap::new();
        let n = 60_000;
        for _ in 0..n {
            let e = s.next_event();
            let valid = Decoder::Json.decode(&e.payload).is_ok();
            assert_eq!(valid, e.label != Label::Malformed, "{:?}", e.label);
            *counts.entry(e.label).or_insert(0) += 1;
        }
        let fraud: u32 = Label::FRAUD
            .iter()
            .map(|k| counts.get(k).copied().unwrap_or(0))
            .sum();
        // Accounts need a few events of history first, so the share is reached a little below.
        let share = f64::from(fraud) / n as f64;
        assert!((0.04..=0.07).contains(&share), "{share} {counts:?}");
        for kind in Label::FRAUD {
            assert!(counts.get(&kind).copied().unwrap_or(0) > 300, "{counts:?}");
        }
        let malformed = counts.get(&Label::Malformed).copied().unwrap_or(0);
        assert!((450..=750).contains(&malformed), "{counts:?}");
    }

    #[test]
    fn events_come_in_event_time_order_at_a_realistic_pace() {
        let mut s = Simulator::new(3, 0.02, 0.0);
        let mut last = 0;
        let n = 26_000;
        for _ in 0..n {
            let tx = decode(&s.next_event());
            assert!(tx.time >= last, "{} after {last}", tx.time);
            last = tx.time;
        }
        // 2,000 accounts at 0.3–3 events a day (plus follow-ups): about 3,000 events a day.
        let days = (last - DEFAULT_START) as f64 / 86_400.0;
        assert!(
            (5.0..15.0).contains(&days),
            "{n} events took {days:.1} days"
        );
    }

    #[test]
    fn normal_accounts_have_varied_but_stable_habits() {
        let mut s = Simulator::with_options(4, Some(50), Scenarios::even(0.0, 0.0));
        let mut by_account: std::collections::HashMap<String, Vec<Transaction>> =
            Default::default();
        for _ in 0..20_000 {
            let tx = decode(&s.next_event());
            by_account
                .entry(tx.account_id.to_string())
                .or_default()
                .push(tx);
        }
        let distinct = |v: &[Transaction], f: fn(&Transaction) -> &str| {
            v.iter()
                .map(f)
                .collect::<std::collections::HashSet<_>>()
                .len()
        };
        let mut several_devices = 0;
        for txs in by_account.values() {
            let devices = distinct(txs, |t| &t.device_id);
            let merchants = distinct(txs, |t| &t.merchant_id);
            assert!(
                devices <= 8 && merchants >= 3,
                "{devices} devices, {merchants} merchants"
            );
            several_devices += usize::from(devices > 1);
            // The usual merchant carries a good part of the traffic, but not all of it.
            let mut counts: std::collections::HashMap<&str, usize> = Default::default();
            for t in txs {
                *counts.entry(&t.merchant_id).or_default() += 1;
            }
            let top = counts.values().max().copied().unwrap_or(0) as f64 / txs.len() as f64;
            assert!((0.1..0.9).contains(&top), "{top}");
        }
        assert!(several_devices > 10, "{several_devices}");
    }

    #[test]
    fn card_testing_is_a_burst_of_tiny_online_payments_on_one_account() {
        let mut s = Simulator::new(3, 0.0, 0.0);
        s.chances = only("card_testing").start_chances();
        let burst: Vec<Transaction> = std::iter::from_fn(|| Some(s.next_event()))
            .take(50_000)
            .filter(|e| e.label == Label::CardTesting)
            .take(5)
            .map(|e| decode(&e))
            .collect();
        assert_eq!(burst.len(), 5);
        for tx in &burst {
            assert_eq!(tx.account_id, burst[0].account_id);
            assert!(tx.amount < 5.0 && tx.channel == Channel::Online, "{tx:?}");
        }
        assert!(
            burst
                .windows(2)
                .all(|w| w[1].time >= w[0].time && w[1].time - w[0].time < 90)
        );
    }

    #[test]
    fn account_takeover_logs_in_from_somewhere_new_then_moves_most_of_the_balance() {
        let mut s = Simulator::new(5, 0.0, 0.0);
        s.chances = only("account_takeover").start_chances();
        let mut seen_devices: std::collections::HashMap<String, Vec<compact_str::CompactString>> =
            Default::default();
        let mut takeovers: std::collections::HashMap<String, Vec<Transaction>> = Default::default();
        for _ in 0..50_000 {
            let e = s.next_event();
            let tx = decode(&e);
            if e.label != Label::AccountTakeover {
                seen_devices
                    .entry(tx.account_id.to_string())
                    .or_default()
                    .push(tx.device_id.clone());
                continue;
            }
            let pair = takeovers.entry(tx.account_id.to_string()).or_default();
            if pair.is_empty() {
                let known = seen_devices
                    .get(tx.account_id.as_str())
                    .cloned()
                    .unwrap_or_default();
                assert!(known.len() >= 5 && !known.contains(&tx.device_id));
            }
            pair.push(tx);
            if pair.len() == 2 {
                break;
            }
        }
        let pair = takeovers
            .into_values()
            .find(|p| p.len() == 2)
            .unwrap_or_default();
        let [a, b] = <[Transaction; 2]>::try_from(pair).unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(a.device_id, b.device_id);
        assert!(a.login_attempts >= 3);
        assert!(b.amount > 2.0 * b.balance && b.time > a.time, "{b:?}");
    }

    #[test]
    fn bad_shares_are_refused() {
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
        let tx = decode(&SimEvent {
            payload: e.labelled_json(),
            ..e.clone()
        });
        assert_eq!(tx.account_id, e.key);
    }
}
