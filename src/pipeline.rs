//! The per-event path, synchronous and free of I/O: bytes → decode → a plausible event time →
//! account state → features → both models → consensus → outcome. The stream workers, offline
//! scoring and the tests all call [`Engine::process`], so "the same events through the same
//! code" is literally true. The one exception to "free of I/O": the first datum written with an
//! Avro schema id not seen before asks the schema registry for it (once per id per process; the
//! stream asks before it calls in, so its workers never block on it).

use std::sync::Arc;

use chrono::{SecondsFormat, Utc};

use crate::config::{FeatureConfig, Policy};
use crate::consensus::{decide, margin, severity};
use crate::decode::{DecodeError, Decoder, Transaction};
use crate::features::{Features, compute};
use crate::models::{Contribution, ModelSet, Scratch, Verdict};
use crate::publish::{Alert, SourceCoordinates, alert_id};
use crate::state::{AccountState, PartitionState, RecentScore};

/// What became of one event.
#[derive(Debug)]
pub enum Outcome {
    /// Scored; the models did not agree it is anomalous. The transaction is handed back for
    /// callers that report on every event (replay).
    Clean(Scored, Transaction),
    /// Scored and alerted.
    Alert(Box<Alert>, Scored),
    /// Rejected by decode or validation.
    Invalid(DecodeError),
}

/// What the models would decide about a transaction, computed without changing any state.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub verdicts: [Verdict; 2],
    /// What the consensus policy decides.
    pub alert: bool,
    /// The policy's margin over the thresholds, and the severity it gives.
    pub margin: f64,
    pub severity: &'static str,
    /// What drove the models' scores, strongest first, in words.
    pub top: Vec<Contribution>,
    /// False when scored as a new account (none known, expired, or asked for).
    pub known_account: bool,
}

/// The models' verdicts on a valid event.
#[derive(Debug, Clone)]
pub struct Scored {
    pub verdicts: [Verdict; 2],
    /// What the models were given (for the drift monitor).
    pub features: Features,
    /// The challenger's decision on the same features, when one runs in shadow.
    pub shadow: Option<Shadow>,
}

/// What a challenger, scoring in shadow, decided about an event the champion scored: its
/// verdicts and, when the policy alerts on them, the alert it would have published (named by
/// its own version, explained by its own models).
#[derive(Debug, Clone)]
pub struct Shadow {
    pub verdicts: [Verdict; 2],
    pub alert: Option<Box<Alert>>,
}

/// How a champion's and a challenger's decisions on one event compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agreement {
    BothAlert,
    BothClean,
    ChampionOnly,
    ChallengerOnly,
}

impl Agreement {
    pub const ALL: [Self; 4] = [
        Self::BothAlert,
        Self::BothClean,
        Self::ChampionOnly,
        Self::ChallengerOnly,
    ];

    pub fn of(champion_alerts: bool, challenger_alerts: bool) -> Self {
        match (champion_alerts, challenger_alerts) {
            (true, true) => Self::BothAlert,
            (false, false) => Self::BothClean,
            (true, false) => Self::ChampionOnly,
            (false, true) => Self::ChallengerOnly,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BothAlert => "both_alert",
            Self::BothClean => "both_clean",
            Self::ChampionOnly => "champion_only",
            Self::ChallengerOnly => "challenger_only",
        }
    }
}

/// Which event times are plausible. One event dated years ahead would otherwise drag its
/// partition's clock (every idle-account sweep would then forget every account), and one dated
/// years back would be folded into its account as if it were news.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTimeLimits {
    /// How far an event may be dated after the moment it was published: the Kafka record's
    /// timestamp, or the clock when the event has none (a file, `/predict`). Covers clock skew
    /// and a producer that writes local time for UTC.
    pub max_ahead_secs: i64,
}

impl Default for EventTimeLimits {
    fn default() -> Self {
        Self {
            max_ahead_secs: 86_400,
        }
    }
}

impl EventTimeLimits {
    /// Whether an event at `time`, published at `published` (seconds since the epoch), fits:
    /// not before 1970, at most `max_ahead_secs` after publication, and — when `latest`, the
    /// latest event time of its partition, is known — not further behind it than
    /// the state keeps an account (`ttl_secs`): state that old is gone, so it cannot be scored
    /// against it.
    pub fn check(
        &self,
        time: i64,
        published: i64,
        latest: Option<i64>,
        ttl_secs: i64,
    ) -> Result<(), DecodeError> {
        let implausible = |why: String| {
            Err(DecodeError::ImplausibleTime {
                field: "TransactionDate",
                value: crate::decode::format_time(time),
                why,
            })
        };
        if time < 0 {
            return implausible("before 1970".into());
        }
        let ahead = time.saturating_sub(published);
        if ahead > self.max_ahead_secs {
            return implausible(format!(
                "{} ahead of the time it was published ({}); at most {} is accepted",
                span(ahead),
                crate::decode::format_time(published),
                span(self.max_ahead_secs),
            ));
        }
        if let Some(latest) = latest {
            let behind = latest.saturating_sub(time);
            if behind > ttl_secs {
                return implausible(format!(
                    "{} behind the partition's latest event ({}); state is kept for {}",
                    span(behind),
                    crate::decode::format_time(latest),
                    span(ttl_secs),
                ));
            }
        }
        Ok(())
    }
}

/// A duration in the largest whole unit that fits: "3 days", "5 h", "40 s".
fn span(secs: i64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3_600 => format!("{} h", s / 3_600),
        s if s >= 2 * 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// Decoder, models and decision policy: everything needed to process an event.
#[derive(Debug, Clone)]
pub struct Engine {
    pub models: Arc<ModelSet>,
    /// A second model set scoring every valid event in shadow: its decisions are reported
    /// ([`Scored::shadow`]) and change nothing else. It must use the same state parameters.
    pub challenger: Option<Arc<ModelSet>>,
    pub decoder: Decoder,
    pub policy: Policy,
    pub top_features: usize,
    pub event_time: EventTimeLimits,
}

impl Engine {
    pub fn new(
        models: Arc<ModelSet>,
        decoder: Decoder,
        policy: Policy,
        top_features: usize,
    ) -> Self {
        Self {
            models,
            challenger: None,
            decoder,
            policy,
            top_features,
            event_time: EventTimeLimits::default(),
        }
    }

    /// The same engine with these event-time limits.
    pub fn with_event_time(mut self, limits: EventTimeLimits) -> Self {
        self.event_time = limits;
        self
    }

    /// Whether `tx` is dated plausibly for the state it would join (`latest`: that state's
    /// latest event time, if any), as published at `published` (the clock when `None`).
    pub fn check_time(
        &self,
        tx: &Transaction,
        published: Option<i64>,
        latest: Option<i64>,
    ) -> Result<(), DecodeError> {
        let published = published.unwrap_or_else(|| Utc::now().timestamp());
        self.event_time
            .check(tx.time, published, latest, self.features().state_ttl_secs)
    }

    /// The state parameters the models were trained with (serving must use the same).
    pub fn features(&self) -> &FeatureConfig {
        &self.models.manifest.features
    }

    /// Processes one event of `source`'s partition, updating that partition's state.
    pub fn process(
        &self,
        state: &mut PartitionState,
        source: &SourceCoordinates,
        payload: &[u8],
        scratch: &mut Scratch,
    ) -> Outcome {
        state.next_offset = Some(source.offset + 1);
        let decoded = tracing::trace_span!("decode").in_scope(|| {
            self.decoder.decode(payload).and_then(|tx| {
                self.check_time(&tx, source.published_at, state.watermark)
                    .map(|()| tx)
            })
        });
        match decoded {
            Ok(tx) => self.score(state, source, tx, scratch),
            Err(e) => Outcome::Invalid(e),
        }
    }

    /// Scores a valid transaction against its account's state, then folds it into the state.
    pub fn score(
        &self,
        state: &mut PartitionState,
        source: &SourceCoordinates,
        tx: Transaction,
        scratch: &mut Scratch,
    ) -> Outcome {
        let event = tracing::Span::current();
        if !event.is_disabled() {
            event.record("transaction_id", tx.transaction_id.as_str());
            event.record("account_id", tx.account_id.as_str());
        }
        let cfg = *self.features();
        let span = tracing::trace_span!("features").entered();
        let account = state.account_mut(&tx.account_id, tx.time, &cfg);
        let features = compute(account, &tx, &cfg);
        drop(span);
        let verdicts =
            tracing::trace_span!("models").in_scope(|| self.models.assess(&features, scratch));
        let consensus = tracing::trace_span!("consensus").entered();
        let alert = decide(self.policy, &verdicts);
        // Explained against the state before this event, then the event joins the state.
        let alert = alert.then(|| {
            let neighbours = &scratch.neighbours;
            self.alert(
                &self.models,
                verdicts,
                &features,
                account,
                &tx,
                source,
                neighbours,
            )
        });
        drop(consensus);
        let shadow = self.challenger.as_ref().map(|challenger| {
            let _shadow = tracing::trace_span!("shadow").entered();
            let verdicts = challenger.assess(&features, scratch);
            let alert = decide(self.policy, &verdicts).then(|| {
                let neighbours = &scratch.neighbours;
                let a = self.alert(
                    challenger, verdicts, &features, account, &tx, source, neighbours,
                );
                Box::new(a)
            });
            Shadow { verdicts, alert }
        });
        account.update(&tx, &cfg);
        account.record_score(RecentScore {
            time: tx.time,
            forest: verdicts[0].score as f32,
            lof: verdicts[1].score as f32,
            alert: alert.is_some(),
        });
        let scored = Scored {
            verdicts,
            features,
            shadow,
        };
        match alert {
            Some(alert) => Outcome::Alert(Box::new(alert), scored),
            None => Outcome::Clean(scored, tx),
        }
    }

    /// The alert `models` raise on `tx` with `verdicts`, explained against `account` (its state
    /// before the event) and LOF's `neighbours` of the event.
    #[allow(clippy::too_many_arguments)]
    fn alert(
        &self,
        models: &ModelSet,
        verdicts: [Verdict; 2],
        features: &Features,
        account: &AccountState,
        tx: &Transaction,
        source: &SourceCoordinates,
        neighbours: &[(f64, u32)],
    ) -> Alert {
        let cfg = self.features();
        let top = models.explain(features, account, tx, cfg, self.top_features, neighbours);
        let margin = margin(self.policy, &verdicts);
        let reason = if top.is_empty() {
            "the models score it above their thresholds".to_string()
        } else {
            top.iter()
                .map(|c| c.detail.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        let event_time = chrono::DateTime::<Utc>::from_timestamp(tx.time, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(SecondsFormat::Secs, true);
        Alert {
            alert_id: alert_id(source, models.version()),
            transaction_id: tx.transaction_id.to_string(),
            account_id: tx.account_id.to_string(),
            event_time,
            detected_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            source: source.clone(),
            policy: self.policy.as_str(),
            model_version: models.version().to_string(),
            models: verdicts.to_vec(),
            severity: severity(margin),
            margin,
            reason,
            top_features: top,
            transaction: tx.clone(),
        }
    }

    /// Scores `tx` against `account` (its live state, read-only) as the stream would if the
    /// event arrived now; `None`, or a state older than the TTL, scores it as a new account.
    pub fn predict(
        &self,
        account: Option<&AccountState>,
        tx: &Transaction,
        scratch: &mut Scratch,
    ) -> Prediction {
        let fresh = AccountState::default();
        let known = self.live(account, tx);
        let features = compute(known.unwrap_or(&fresh), tx, self.features());
        let verdicts = self.models.assess(&features, scratch);
        self.prediction(
            verdicts,
            &features,
            known.unwrap_or(&fresh),
            known.is_some(),
            tx,
            &scratch.neighbours,
        )
    }

    /// [`Self::predict`] for many transactions at once, with the same results; the models score
    /// them together ([`ModelSet::assess_many`]), which costs less per transaction.
    pub fn predict_many(&self, items: &[(Option<&AccountState>, &Transaction)]) -> Vec<Prediction> {
        let fresh = AccountState::default();
        let known: Vec<Option<&AccountState>> =
            items.iter().map(|&(a, tx)| self.live(a, tx)).collect();
        let features: Vec<Features> = items
            .iter()
            .zip(&known)
            .map(|(&(_, tx), state)| compute(state.unwrap_or(&fresh), tx, self.features()))
            .collect();
        let (verdicts, neighbours) = self.models.assess_many(&features);
        items
            .iter()
            .zip(known)
            .zip(features.iter().zip(verdicts.into_iter().zip(&neighbours)))
            .map(|((&(_, tx), known), (f, (v, nb)))| {
                self.prediction(v, f, known.unwrap_or(&fresh), known.is_some(), tx, nb)
            })
            .collect()
    }

    /// The account's state if it is still live at the transaction's time.
    fn live<'a>(
        &self,
        account: Option<&'a AccountState>,
        tx: &Transaction,
    ) -> Option<&'a AccountState> {
        account.filter(|a| !a.expired_at(tx.time, self.features()))
    }

    /// The decision and its explanation; `state` is the one the features came from, `known`
    /// whether it was the account's live state rather than a new account's, `neighbours` LOF's
    /// neighbours of the event.
    fn prediction(
        &self,
        verdicts: [Verdict; 2],
        features: &Features,
        state: &AccountState,
        known: bool,
        tx: &Transaction,
        neighbours: &[(f64, u32)],
    ) -> Prediction {
        let margin = margin(self.policy, &verdicts);
        Prediction {
            verdicts,
            alert: decide(self.policy, &verdicts),
            margin,
            severity: severity(margin),
            top: self.models.explain(
                features,
                state,
                tx,
                self.features(),
                self.top_features,
                neighbours,
            ),
            known_account: known,
        }
    }

    /// Folds an already-processed event into the state without scoring it (state restore);
    /// `published_at` is its record's timestamp. What [`Self::process`] rejects is skipped.
    pub fn warm(
        &self,
        state: &mut PartitionState,
        offset: i64,
        published_at: Option<i64>,
        payload: &[u8],
    ) {
        state.next_offset = Some(offset + 1);
        let decoded = self.decoder.decode(payload).and_then(|tx| {
            self.check_time(&tx, published_at, state.watermark)
                .map(|()| tx)
        });
        if let Ok(tx) = decoded {
            let cfg = *self.features();
            state
                .account_mut(&tx.account_id, tx.time, &cfg)
                .update(&tx, &cfg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Encoding, FeatureConfig, ModelConfig};
    use crate::simulate::{Label, Simulator};
    use crate::train::{bundled_history, train};

    fn engine() -> Engine {
        let models = train(
            &bundled_history().unwrap(),
            &ModelConfig::default(),
            &FeatureConfig::default(),
            Policy::All,
        )
        .unwrap();
        Engine::new(
            Arc::new(models),
            Decoder::new(Encoding::Json),
            Policy::All,
            3,
        )
    }

    fn redated(payload: &[u8], date: &str) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        v["TransactionDate"] = date.into();
        serde_json::to_vec(&v).unwrap()
    }

    /// Scores of every event in order, `None` for a rejected one, each published at `published`.
    fn scores(engine: &Engine, events: &[Vec<u8>], published: i64) -> Vec<Option<[f64; 2]>> {
        let mut state = PartitionState::default();
        let mut scratch = Scratch::default();
        events
            .iter()
            .enumerate()
            .map(|(i, payload)| {
                let source = SourceCoordinates {
                    topic: "t".into(),
                    partition: 0,
                    offset: i as i64,
                    published_at: Some(published),
                };
                match engine.process(&mut state, &source, payload, &mut scratch) {
                    Outcome::Clean(s, _) | Outcome::Alert(_, s) => {
                        Some([s.verdicts[0].score, s.verdicts[1].score])
                    }
                    Outcome::Invalid(e) => {
                        assert_eq!(e.code(), "implausible_time", "{e}");
                        None
                    }
                }
            })
            .collect()
    }

    #[test]
    fn implausibly_dated_events_are_rejected_and_change_no_other_events_score() {
        let engine = engine();
        let mut sim = Simulator::new(11, 0.02, 0.0);
        // More than one idle-account sweep's worth, so a dragged clock would show.
        let events: Vec<Vec<u8>> = std::iter::repeat_with(|| sim.next_event())
            .filter(|e| e.label != Label::Malformed)
            .take(12_000)
            .map(|e| e.payload)
            .collect();
        let published = crate::decode::parse_time("2024-03-01 00:00:00").unwrap();
        let mut poisoned = events.clone();
        for (at, date) in [
            (0, "9999-12-31 23:59:59"),
            (3_000, "9999-12-31 23:59:59"),
            (5_000, "0000-01-01 00:00:00"),
            (7_000, "2024-03-02 00:00:01"),
            (9_000, "2022-06-01 00:00:00"),
        ] {
            poisoned.insert(at, redated(&events[at], date));
        }
        let clean = scores(&engine, &events, published);
        let mixed = scores(&engine, &poisoned, published);
        assert_eq!(mixed.iter().filter(|s| s.is_none()).count(), 5);
        assert!(clean.iter().all(Option::is_some));
        let kept: Vec<_> = mixed.into_iter().flatten().collect();
        let clean: Vec<_> = clean.into_iter().flatten().collect();
        assert!(
            kept == clean,
            "a rejected event changed other events' scores"
        );
    }

    /// An alert as JSON without the moment it was made.
    fn timeless(alert: &Alert) -> serde_json::Value {
        let mut v = serde_json::to_value(alert).unwrap();
        v.as_object_mut().unwrap().remove("detected_at");
        v
    }

    #[test]
    fn a_challenger_in_shadow_decides_as_it_would_serving_and_changes_nothing_the_champion_does() {
        let champion = engine();
        let mut reseeded = ModelConfig::default();
        reseeded.forest.seed = 7;
        let features = FeatureConfig::default();
        let history = bundled_history().unwrap();
        let challenger = Arc::new(train(&history, &reseeded, &features, Policy::All).unwrap());
        assert_ne!(challenger.version(), champion.models.version());
        let shadowed = Engine {
            challenger: Some(challenger.clone()),
            ..champion.clone()
        };
        let serving = Engine {
            models: challenger,
            ..champion.clone()
        };
        let mut sim = Simulator::new(5, 0.03, 0.01);
        let mut states: [PartitionState; 3] = Default::default();
        let mut scratch = Scratch::default();
        let mut agreement = std::collections::BTreeMap::new();
        for offset in 0..4_000 {
            let payload = sim.next_event().payload;
            let source = SourceCoordinates {
                topic: "t".into(),
                partition: 0,
                offset,
                published_at: None,
            };
            let [a, b, c] = &mut states;
            let (alone, with_shadow, as_champion) = (
                champion.process(a, &source, &payload, &mut scratch),
                shadowed.process(b, &source, &payload, &mut scratch),
                serving.process(c, &source, &payload, &mut scratch),
            );
            let (scored, alert, shadow) = match (alone, with_shadow) {
                (Outcome::Invalid(a), Outcome::Invalid(b)) => {
                    assert_eq!(a.to_string(), b.to_string());
                    assert!(matches!(as_champion, Outcome::Invalid(_)));
                    continue;
                }
                (Outcome::Clean(a, _), Outcome::Clean(mut b, _)) => {
                    (a.verdicts == b.verdicts, None, b.shadow.take())
                }
                (Outcome::Alert(a, sa), Outcome::Alert(b, mut sb)) => {
                    assert_eq!(timeless(&a), timeless(&b), "offset {offset}");
                    (sa.verdicts == sb.verdicts, Some(a), sb.shadow.take())
                }
                _ => panic!("the challenger changed the champion's decision at offset {offset}"),
            };
            assert!(scored, "offset {offset}");
            let shadow = shadow.expect("every valid event is scored in shadow");
            let (verdicts, challenger_alert) = match as_champion {
                Outcome::Clean(s, _) => (s.verdicts, None),
                Outcome::Alert(a, s) => (s.verdicts, Some(a)),
                Outcome::Invalid(e) => panic!("{e}"),
            };
            assert_eq!(shadow.verdicts, verdicts, "offset {offset}");
            assert_eq!(
                shadow.alert.as_deref().map(timeless),
                challenger_alert.as_deref().map(timeless),
                "offset {offset}"
            );
            let agreed = Agreement::of(alert.is_some(), shadow.alert.is_some());
            *agreement.entry(agreed.as_str()).or_insert(0) += 1;
        }
        for kind in [
            "both_alert",
            "both_clean",
            "champion_only",
            "challenger_only",
        ] {
            assert!(agreement.get(kind) > Some(&0), "{agreement:?}");
        }
    }

    #[test]
    fn an_event_a_day_ahead_of_its_publication_is_accepted_and_the_reason_says_the_limit() {
        let limits = EventTimeLimits::default();
        let day = 86_400;
        assert!(
            limits
                .check(10 * day + day, 10 * day, None, 400 * day)
                .is_ok()
        );
        let e = limits
            .check(10 * day + day + 1, 10 * day, None, 400 * day)
            .unwrap_err();
        assert_eq!(e.field(), Some("TransactionDate"));
        assert!(
            e.to_string().contains(
                "24 h ahead of the time it was published (1970-01-11 00:00:00); at most 24 h"
            ),
            "{e}"
        );
        let late = limits.check(0, 500 * day, Some(500 * day), 400 * day);
        assert!(
            late.unwrap_err()
                .to_string()
                .contains("500 days behind the partition's latest event"),
        );
        assert!(limits.check(-1, 0, None, day).is_err());
    }
}
