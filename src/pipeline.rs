//! The per-event path, synchronous and free of I/O: bytes → decode → account state → features →
//! both models → consensus → outcome. The stream workers, offline scoring and the tests all call
//! [`Engine::process`], so "the same events through the same code" is literally true.

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
    Clean(Scored, Box<Transaction>),
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
}

/// Decoder, models and decision policy: everything needed to process an event.
#[derive(Debug, Clone)]
pub struct Engine {
    pub models: Arc<ModelSet>,
    pub decoder: Decoder,
    pub policy: Policy,
    pub top_features: usize,
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
            decoder,
            policy,
            top_features,
        }
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
        let decoded = tracing::trace_span!("decode").in_scope(|| self.decoder.decode(payload));
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
        let scored = Scored { verdicts };
        let _consensus = tracing::trace_span!("consensus").entered();
        let alert = decide(self.policy, &verdicts);
        account.record_score(RecentScore {
            time: tx.time,
            forest: verdicts[0].score as f32,
            lof: verdicts[1].score as f32,
            alert,
        });
        if !alert {
            account.update(&tx, &cfg);
            return Outcome::Clean(scored, Box::new(tx));
        }
        // Explained against the state before this event, then the event joins the state.
        let top = self.models.explain(
            &features,
            account,
            &tx,
            &cfg,
            self.top_features,
            &scratch.neighbours,
        );
        account.update(&tx, &cfg);
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
        let alert = Alert {
            alert_id: alert_id(source, self.models.version()),
            transaction_id: tx.transaction_id.clone(),
            account_id: tx.account_id.clone(),
            event_time,
            detected_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            source: source.clone(),
            policy: self.policy.as_str(),
            model_version: self.models.version().to_string(),
            models: verdicts.to_vec(),
            severity: severity(margin),
            margin,
            reason,
            top_features: top,
            transaction: tx,
        };
        Outcome::Alert(Box::new(alert), scored)
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

    /// Folds an already-processed event into the state without scoring it (state restore).
    pub fn warm(&self, state: &mut PartitionState, offset: i64, payload: &[u8]) {
        state.next_offset = Some(offset + 1);
        if let Ok(tx) = self.decoder.decode(payload) {
            let cfg = *self.features();
            state
                .account_mut(&tx.account_id, tx.time, &cfg)
                .update(&tx, &cfg);
        }
    }
}
