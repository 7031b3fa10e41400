//! Simulator: realistic synthetic transactions, seeded and reproducible, with a share of obvious
//! anomalies (and, optionally, malformed events) mixed in. Accounts and their habits are drawn
//! from the bundled dataset, so normal traffic looks like the data the models were trained on.
//!
//! Each event carries its label in the `vigil.label` Kafka header (`normal`, an anomaly kind, or
//! `malformed`); scoring never reads headers.

use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::decode::{Transaction, format_time};
use crate::publish::enqueue;
use crate::train::bundled_history;

/// What a simulated event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    Normal,
    /// New device, IP and city, many login attempts, a large amount.
    AccountTakeover,
    /// Nearly the whole balance at once.
    BalanceDrain,
    /// Many login attempts and a very long session at an odd hour.
    LoginSpike,
    /// Not a valid event at all.
    Malformed,
}

impl Label {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::AccountTakeover => "account_takeover",
            Self::BalanceDrain => "balance_drain",
            Self::LoginSpike => "login_spike",
            Self::Malformed => "malformed",
        }
    }
}

/// One simulated event: Kafka key, payload, and its label.
#[derive(Debug, Clone)]
pub struct SimEvent {
    pub key: String,
    pub payload: Vec<u8>,
    pub label: Label,
}

/// The generator. Same seed, same events.
pub struct Simulator {
    rng: ChaCha8Rng,
    rows: Vec<Transaction>,
    locations: Vec<String>,
    clock: i64,
    mean_gap_secs: f64,
    next_id: u64,
    anomaly_share: f64,
    malformed_share: f64,
}

impl Simulator {
    /// A simulator over the dataset's accounts. Shares are fractions of all events.
    ///
    /// A normal event is a dataset row drawn at random (its account, amount, channel, device,
    /// IP and the rest, with its time of day) placed on the simulator's clock, so the traffic
    /// has the dataset's per-account habits and mix. Each account transacts about every 39
    /// days, which gives the dataset's median gap (27 days) between an account's events.
    pub fn new(seed: u64, anomaly_share: f64, malformed_share: f64) -> Self {
        let rows = bundled_history().map(|h| h.events).unwrap_or_default();
        let accounts = rows
            .iter()
            .map(|e| e.account_id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len();
        let mut locations: Vec<String> = rows.iter().map(|e| e.location.clone()).collect();
        locations.sort();
        locations.dedup();
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            mean_gap_secs: 39.0 * 86_400.0 / accounts.max(1) as f64,
            rows,
            locations,
            clock: 1_704_067_200, // 2024-01-01, right after the dataset ends
            next_id: 1,
            anomaly_share,
            malformed_share,
        }
    }

    fn pick<T: Clone>(rng: &mut ChaCha8Rng, v: &[T], fallback: T) -> T {
        v.choose(rng).cloned().unwrap_or(fallback)
    }

    /// The next event.
    pub fn next_event(&mut self) -> SimEvent {
        let gap = -self.mean_gap_secs * (1.0 - self.rng.r#gen::<f64>()).ln();
        self.clock += gap.max(1.0) as i64;
        let roll: f64 = self.rng.r#gen();
        let label = if roll < self.malformed_share {
            Label::Malformed
        } else if roll < self.malformed_share + self.anomaly_share {
            *[
                Label::AccountTakeover,
                Label::BalanceDrain,
                Label::LoginSpike,
            ]
            .choose(&mut self.rng)
            .unwrap_or(&Label::AccountTakeover)
        } else {
            Label::Normal
        };
        let Some(mut tx) = self.rows.choose(&mut self.rng).cloned() else {
            return SimEvent {
                key: String::new(),
                payload: b"{}".to_vec(),
                label: Label::Malformed,
            };
        };
        let id = self.next_id;
        self.next_id += 1;
        let rng = &mut self.rng;
        let day = self.clock - self.clock.rem_euclid(86_400);
        tx.transaction_id = format!("SIM{id:09}");
        // Keep the row's weekday and time of day (the dataset has no weekend traffic).
        let weekday = |t: i64| (t.div_euclid(86_400) + 3).rem_euclid(7);
        let shift = (weekday(tx.time) - weekday(day)).rem_euclid(7);
        tx.time = day + shift * 86_400 + tx.time.rem_euclid(86_400);
        tx.previous_date = None;
        match label {
            Label::Normal | Label::Malformed => {}
            Label::AccountTakeover => {
                tx.device_id = format!("D9{:05}", rng.gen_range(0..100_000));
                tx.ip_address = format!(
                    "{}.{}.{}.{}",
                    rng.gen_range(1..224),
                    rng.gen_range(0..256),
                    rng.gen_range(0..256),
                    rng.gen_range(1..255)
                );
                tx.location = Self::pick(rng, &self.locations, tx.location.clone());
                tx.login_attempts = rng.gen_range(4..=6);
                tx.amount = (tx.balance * rng.gen_range(0.85..0.99) * 100.0).round() / 100.0;
                tx.time = day + rng.gen_range(1..5) * 3600;
            }
            Label::BalanceDrain => {
                tx.balance = rng.gen_range(8_000.0..15_000.0_f64).round();
                tx.amount = (tx.balance * rng.gen_range(0.9..0.99) * 100.0).round() / 100.0;
                tx.duration = rng.gen_range(200..300);
            }
            Label::LoginSpike => {
                tx.login_attempts = rng.gen_range(5..=9);
                tx.duration = rng.gen_range(900..3_000);
                tx.time = day + rng.gen_range(2..4) * 3600;
            }
        }
        let payload = if label == Label::Malformed {
            match rng.gen_range(0..3) {
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
            }
        } else {
            serde_json::to_vec(&tx).unwrap_or_default()
        };
        SimEvent {
            key: tx.account_id,
            payload,
            label,
        }
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
                key: "vigil.label",
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
        for _ in 0..200 {
            let (x, y) = (a.next_event(), b.next_event());
            assert_eq!((x.key, x.payload, x.label), (y.key, y.payload, y.label));
        }
    }

    #[test]
    fn labels_follow_the_shares_and_only_malformed_events_fail_validation() {
        let mut s = Simulator::new(1, 0.1, 0.05);
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..4000 {
            let e = s.next_event();
            let valid = Decoder::Json.decode(&e.payload).is_ok();
            assert_eq!(valid, e.label != Label::Malformed, "{:?}", e.label);
            *counts.entry(e.label.as_str()).or_insert(0) += 1;
        }
        let malformed = counts.get("malformed").copied().unwrap_or(0);
        let normal = counts.get("normal").copied().unwrap_or(0);
        assert!((120..=280).contains(&malformed), "{counts:?}");
        assert!((3200..=3600).contains(&normal), "{counts:?}");
    }
}
