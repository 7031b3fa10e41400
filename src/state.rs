//! Per-account state: what vigil remembers about each account between its events — its habits
//! (running log-amount mean and spread of its debits and of its credits, log-duration mean and
//! spread, usual login attempts, events per hour of day), its latest events' times (for
//! velocity), the IPs, locations, devices and merchants it has used with their counts, and the last few amounts and durations of
//! the original design's rolling means — kept per Kafka partition so that a partition's accounts
//! can move as a unit.
//!
//! Memory is bounded: the rolling buffers hold `window - 1` values, the velocity ring
//! [`RECENT_EVENTS`] events, each value sketch `frequency_slots` entries (Space-Saving: exact
//! while an account has used no more distinct values than slots), the habits a fixed handful of
//! numbers; an account idle for `state_ttl` in event time is forgotten.

use std::collections::HashMap;

use compact_str::CompactString;
use ecow::EcoString;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::config::FeatureConfig;
use crate::decode::{Transaction, TransactionType};

/// One slot of a [`FrequentValues`] sketch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    /// Inline up to 15 bytes (an IPv4 address, a device or merchant id, most cities) in 16, so
    /// that a slot is 24 bytes: a boxed string would cost a 32-byte heap chunk besides its 16,
    /// and a 24-byte inline one a third more per slot.
    pub value: EcoString,
    pub count: u32,
    /// Order of first arrival into the sketch; breaks count ties toward the older value.
    arrival: u32,
}

/// Which of an account's four value sketches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sketch {
    Ip = 0,
    Location = 1,
    Device = 2,
    Merchant = 3,
}

/// One Space-Saving heavy-hitter sketch of an account, read from its [`Sketches`]: exact while
/// the account has used no more distinct values than the sketch's slots.
#[derive(Debug, Clone, Copy)]
pub struct FrequentValues<'a> {
    slots: &'a [Slot],
}

impl<'a> FrequentValues<'a> {
    /// How often `value` was seen (0: never, as far as the sketch remembers).
    pub fn count_of(&self, value: &str) -> u32 {
        self.slots
            .iter()
            .find(|s| &*s.value == value)
            .map_or(0, |s| s.count)
    }

    /// The value seen most often (earliest first seen on a tie), if any was seen.
    pub fn most_frequent(&self) -> Option<&'a str> {
        self.slots
            .iter()
            .max_by(|a, b| a.count.cmp(&b.count).then(b.arrival.cmp(&a.arrival)))
            .map(|s| &*s.value)
    }

    pub fn slots(&self) -> &'a [Slot] {
        self.slots
    }

    /// How many values ever arrived: the latest newcomer always takes a slot, so it is the
    /// largest arrival among the slots, and need not be stored.
    fn arrivals(&self) -> u32 {
        self.slots.iter().map(|s| s.arrival).max().unwrap_or(0)
    }
}

/// The four sketches of an account (IPs, locations, devices, merchants) in one exactly sized
/// buffer, each sketch's slots after the previous one's: 20 bytes in the state and one heap
/// chunk, where four vectors cost 96 bytes and four chunks, each with its allocator header
/// and rounding.
///
/// Written as four sketch records one after the other (slots, then the count of arrivals), as
/// the four separate sketches it replaced were: the changelog's format is unchanged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sketches {
    slots: Box<[Slot]>,
    /// How many slots each sketch holds, in [`Sketch`] order (at most `frequency_slots`, 64).
    lens: [u8; 4],
}

impl Sketches {
    pub fn get(&self, sketch: Sketch) -> FrequentValues<'_> {
        let range = self.range(sketch);
        FrequentValues {
            slots: &self.slots[range],
        }
    }

    fn range(&self, sketch: Sketch) -> std::ops::Range<usize> {
        let k = sketch as usize;
        let start = self.lens[..k].iter().map(|&n| usize::from(n)).sum();
        start..start + usize::from(self.lens[k])
    }

    /// Counts one occurrence of `value`, replacing the least counted slot when all
    /// `capacity` (at most 255) are taken.
    pub fn observe(&mut self, sketch: Sketch, value: &str, capacity: usize) {
        let range = self.range(sketch);
        let held = &mut self.slots[range.clone()];
        if let Some(slot) = held.iter_mut().find(|s| &*s.value == value) {
            slot.count += 1;
            return;
        }
        let fresh = Slot {
            value: value.into(),
            count: 1,
            arrival: FrequentValues { slots: held }.arrivals() + 1,
        };
        if held.len() < capacity.min(usize::from(u8::MAX)) {
            // Room for exactly one more: the buffer holds exactly its slots.
            insert_exact(&mut self.slots, range.end, fresh);
            self.lens[sketch as usize] += 1;
        } else if let Some(min) = held
            .iter_mut()
            .min_by(|a, b| a.count.cmp(&b.count).then(b.arrival.cmp(&a.arrival)))
        {
            // Space-Saving: the newcomer inherits the evicted count, an upper bound on its own.
            *min = Slot {
                count: min.count + 1,
                ..fresh
            };
        }
    }

    fn heap_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>()
            + self
                .slots
                .iter()
                .filter(|s| s.value.len() > EcoString::INLINE_LIMIT)
                // Longer values live in a shared buffer behind a 16-byte header.
                .map(|s| s.value.len() + 16)
                .sum::<usize>()
    }
}

const SKETCHES: [Sketch; 4] = [
    Sketch::Ip,
    Sketch::Location,
    Sketch::Device,
    Sketch::Merchant,
];

/// One sketch as the changelog holds it.
#[derive(Serialize)]
#[serde(rename = "FrequentValues")]
struct SketchOut<'a> {
    slots: &'a [Slot],
    arrivals: u32,
}

/// One sketch as the changelog holds it, read.
#[derive(Deserialize)]
struct SketchIn {
    slots: Vec<Slot>,
    /// Read and dropped: the slots tell it.
    _arrivals: u32,
}

impl Serialize for Sketches {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut all = serializer.serialize_tuple(SKETCHES.len())?;
        for sketch in SKETCHES {
            let values = self.get(sketch);
            all.serialize_element(&SketchOut {
                slots: values.slots,
                arrivals: values.arrivals(),
            })?;
        }
        all.end()
    }
}

impl<'de> Deserialize<'de> for Sketches {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let records = <[SketchIn; 4]>::deserialize(deserializer)?;
        let mut lens = [0u8; 4];
        for (len, record) in lens.iter_mut().zip(&records) {
            *len = u8::try_from(record.slots.len()).map_err(|_| {
                serde::de::Error::custom(format!(
                    "a sketch of {} slots, more than {}",
                    record.slots.len(),
                    u8::MAX
                ))
            })?;
        }
        let slots: Vec<Slot> = records.into_iter().flat_map(|r| r.slots).collect();
        Ok(Self {
            slots: slots.into_boxed_slice(),
            lens,
        })
    }
}

/// How many of an account's latest scores are kept (for `GET /accounts/{id}`).
pub const RECENT_SCORES: usize = 5;

/// One scored event of an account. `f32` scores: this is for people, not for the models.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RecentScore {
    pub time: i64,
    pub forest: f32,
    pub lof: f32,
    pub alert: bool,
}

/// A [`RecentScore`] as the state keeps it: its time as its age before the account's latest
/// event time, like the velocity ring's. Packed, 13 bytes where an 8-byte time and alignment
/// made 24: five fit an 80-byte heap chunk, four a 64-byte one. Read its fields by value.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, packed)]
struct KeptScore {
    age: u32,
    forest: f32,
    lof: f32,
    alert: bool,
}

impl KeptScore {
    /// `score` kept in an account whose latest event time is `newest`.
    fn of(score: &RecentScore, newest: i64) -> Self {
        Self {
            age: age(score.time, newest),
            forest: score.forest,
            lof: score.lof,
            alert: score.alert,
        }
    }
}

/// How many of an account's latest events are kept for the velocity features.
pub const RECENT_EVENTS: usize = 16;

/// Running mean and spread (Welford) of a value over an account's events. Packed, 20 bytes
/// where alignment would make it 24 (an account has four).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[repr(C, packed)]
pub struct Running {
    pub n: u32,
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

impl Running {
    pub fn add(&mut self, x: f64) {
        self.n += 1;
        let delta = x - self.mean;
        self.mean += delta / f64::from(self.n);
        self.m2 += delta * (x - self.mean);
    }

    /// Adds `x` winsorised at [`Self::ROBUST_LIMIT`] spreads from the mean once the habit rests
    /// on a few events (Huber's idea, online): a one-off extreme — a past fraud, a holiday — counts
    /// as "large" without widening the habit so far that the next extreme looks ordinary.
    pub fn add_robust(&mut self, x: f64) {
        const SETTLED: u32 = 5;
        if self.n < SETTLED {
            return self.add(x);
        }
        let reach = Self::ROBUST_LIMIT * self.spread();
        self.add(x.clamp(self.mean - reach, self.mean + reach));
    }

    /// Spreads from the mean beyond which [`Self::add_robust`] counts a value as at that distance.
    pub const ROBUST_LIMIT: f64 = 3.0;

    /// The spread a habit is shrunk toward (on the log scale: about ×1.65), as if two earlier
    /// events had shown it, so two similar events do not make a third one look absurd.
    pub const PRIOR_SD: f64 = 0.5;

    /// The standard deviation, shrunk toward [`Self::PRIOR_SD`].
    fn spread(&self) -> f64 {
        const PRIOR_EVENTS: f64 = 2.0;
        ((self.m2 + PRIOR_EVENTS * Self::PRIOR_SD * Self::PRIOR_SD)
            / (f64::from(self.n) + PRIOR_EVENTS))
            .sqrt()
    }

    /// How many (shrunk) spreads `x` lies from the mean, clamped to ±10; 0 without history.
    pub fn z(&self, x: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        ((x - self.mean) / self.spread()).clamp(-10.0, 10.0)
    }
}

/// Everything vigil keeps about one account. Serialised whole (every field: a restored state
/// must score exactly as the one it was written from) by [`AccountState::to_bytes`], in the
/// layout of [`StateRecord`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(from = "StateRecord")]
pub struct AccountState {
    /// The previous `window - 1` amounts and durations, oldest first: always as many of one as
    /// of the other, so one buffer (24 bytes in the state, where two took 48).
    pub recent_values: RecentValues,
    pub transactions: u64,
    /// The IPs, locations, devices and merchants the account used, with their counts.
    pub sketches: Sketches,
    /// ln(1 + amount) over the account's debits, and over its credits: a salary is not a
    /// payment, and a payment is measured against payments.
    pub log_debit: Running,
    pub log_credit: Running,
    /// ln(1 + duration) over the account's events.
    pub log_duration: Running,
    pub login_attempts: Running,
    /// Events per hour of day (UTC), saturating.
    pub hours: HourCounts,
    /// Event times of the latest [`RECENT_EVENTS`] events, oldest first, and the latest event
    /// time seen ([`Self::last_time`]).
    pub recent: EventTimes,
    /// The latest [`RECENT_SCORES`] scores, oldest first ([`Self::recent_scores`]). Not used by
    /// the features. Exactly sized: 16 bytes in the state where a deque's header is 32.
    scores: Box<[KeptScore]>,
}

impl AccountState {
    /// Event time of the latest transaction seen (seconds since the epoch): the newest of
    /// [`Self::recent`]'s times, which it keeps even after that time leaves the ring.
    pub fn last_time(&self) -> Option<i64> {
        self.recent.newest()
    }

    /// The previous `window - 1` amounts, oldest first.
    pub fn recent_amounts(&self) -> impl ExactSizeIterator<Item = f64> + Clone + '_ {
        self.recent_values.iter().map(|v| v.amount)
    }

    /// The previous `window - 1` durations, oldest first.
    pub fn recent_durations(&self) -> impl ExactSizeIterator<Item = f64> + Clone + '_ {
        self.recent_values.iter().map(|v| v.duration)
    }

    /// Whether this state is too old to describe an event at `time`.
    pub fn expired_at(&self, time: i64, cfg: &FeatureConfig) -> bool {
        self.last_time()
            .is_some_and(|last| time.saturating_sub(last) > cfg.state_ttl_secs)
    }

    /// Folds one transaction into the state (after its features were computed).
    pub fn update(&mut self, tx: &Transaction, cfg: &FeatureConfig) {
        let keep = cfg.window.saturating_sub(1);
        let value = RecentValue {
            amount: tx.amount,
            duration: f64::from(tx.duration),
        };
        push_recent(&mut self.recent_values, value, keep);
        self.transactions += 1;
        let slots = cfg.frequency_slots;
        let sketches = &mut self.sketches;
        sketches.observe(Sketch::Ip, &tx.ip_address, slots);
        sketches.observe(Sketch::Location, &tx.location, slots);
        sketches.observe(Sketch::Device, &tx.device_id, slots);
        sketches.observe(Sketch::Merchant, &tx.merchant_id, slots);
        self.amount_habit_mut(tx.transaction_type)
            .add_robust(tx.amount.ln_1p());
        self.log_duration.add_robust(f64::from(tx.duration).ln_1p());
        self.login_attempts.add(f64::from(tx.login_attempts));
        let hour = hour_of_day(tx.time);
        self.hours.add(hour);
        // Late events do not move the clock back: the ring keeps the newest time as its own.
        let later = self.recent.push(tx.time, RECENT_EVENTS);
        if later > 0 {
            for score in &mut self.scores {
                score.age = { score.age }.saturating_add(later);
            }
        }
    }

    /// The account's running log-amount of transactions of this type.
    pub fn amount_habit(&self, kind: TransactionType) -> &Running {
        match kind {
            TransactionType::Debit => &self.log_debit,
            TransactionType::Credit => &self.log_credit,
        }
    }

    fn amount_habit_mut(&mut self, kind: TransactionType) -> &mut Running {
        match kind {
            TransactionType::Debit => &mut self.log_debit,
            TransactionType::Credit => &mut self.log_credit,
        }
    }

    /// Earlier events within `window_secs` before `time`, and the oldest one's time.
    pub fn events_within(&self, time: i64, window_secs: i64) -> (usize, Option<i64>) {
        let within = self.recent.iter().filter(|&t| t > time - window_secs);
        within.fold((0, None), |(n, oldest), e| {
            (n + 1, Some(oldest.map_or(e, |o: i64| o.min(e))))
        })
    }

    /// Keeps the score of the event [`Self::update`] folded in last, whose time is at most
    /// the latest event time.
    pub fn record_score(&mut self, score: RecentScore) {
        debug_assert!(self.last_time().is_some_and(|t| t >= score.time));
        let kept = KeptScore::of(&score, self.recent.newest);
        push_latest(&mut self.scores, kept, RECENT_SCORES);
    }

    /// The latest [`RECENT_SCORES`] scores, oldest first.
    pub fn recent_scores(
        &self,
    ) -> impl DoubleEndedIterator<Item = RecentScore> + ExactSizeIterator + Clone + '_ {
        let newest = self.recent.newest;
        self.scores.iter().map(move |&s| RecentScore {
            time: newest.saturating_sub(i64::from(s.age)),
            forest: s.forest,
            lof: s.lof,
            alert: s.alert,
        })
    }

    /// The state as bytes for the changelog topic: a format byte, then postcard (a compact,
    /// stable serde format). A change of fields is a new [`STATE_FORMAT`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![STATE_FORMAT];
        // Serialising plain numbers, strings and sequences into a Vec cannot fail.
        if let Ok(body) = postcard::to_allocvec(self) {
            out.extend(body);
        }
        out
    }

    /// The state [`Self::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateFormatError> {
        match bytes.split_first() {
            Some((&STATE_FORMAT, body)) => {
                let (state, rest) = postcard::take_from_bytes::<Self>(body)
                    .map_err(|e| StateFormatError::Body(e.to_string()))?;
                if rest.is_empty() {
                    Ok(state)
                } else {
                    Err(StateFormatError::Trailing(rest.len()))
                }
            }
            Some((&other, _)) => Err(StateFormatError::Version(other)),
            None => Err(StateFormatError::Empty),
        }
    }

    /// Heap and inline bytes held by this state, not counting the map entry's key.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + if self.recent_values.spilled() {
                std::mem::size_of_val(self.recent_values.as_slice())
            } else {
                0
            }
            + std::mem::size_of_val(&*self.scores)
            + self.recent.heap_bytes()
            + self.hours.heap_bytes()
            + self.sketches.heap_bytes()
    }
}

/// Appends `v` to `buf`, which keeps the latest `max` (the oldest goes first), in memory for
/// exactly what it holds: the default growth of a deque doubles to 4 and 8 slots, so five
/// scores would hold eight. Growing one at a time reallocates at most `max` times in an
/// account's life; once full, the values move down by one (a handful of them).
fn push_latest<T>(buf: &mut Box<[T]>, v: T, max: usize) {
    if max == 0 {
        return;
    }
    if buf.len() >= max {
        buf.rotate_left(1);
        if let Some(last) = buf.last_mut() {
            *last = v;
        }
        return;
    }
    let end = buf.len();
    insert_exact(buf, end, v);
}

/// Inserts `v` at `at` into a buffer that holds exactly its values, growing it by one.
fn insert_exact<T>(buf: &mut Box<[T]>, at: usize, v: T) {
    let mut grown = std::mem::take(buf).into_vec();
    grown.reserve_exact(1);
    grown.insert(at, v);
    *buf = grown.into_boxed_slice();
}

/// The times of an account's latest events, in the order they came (oldest first), each held
/// as its age before the newest of them in 4 bytes, the first four inside the state: where 8-byte
/// times in a deque cost a 32-byte header and a heap chunk of up to 144 bytes, four events cost
/// nothing more and sixteen a 64-byte buffer. Written as the times themselves, as the deque it
/// replaced was. An age saturates at about 136 years, far beyond any velocity window.
#[derive(Debug, Clone)]
pub struct EventTimes {
    /// The newest time ever pushed ([`NO_TIME`] before the first): the ages' reference point.
    newest: i64,
    ages: SmallVec<[u32; 4]>,
}

/// [`EventTimes::newest`] before any time: no event time is that early (decode refuses it).
const NO_TIME: i64 = i64::MIN;

impl Default for EventTimes {
    fn default() -> Self {
        Self {
            newest: NO_TIME,
            ages: SmallVec::new(),
        }
    }
}

impl EventTimes {
    /// The times `times` (oldest first) of a ring whose newest time ever was `newest`.
    fn restored(newest: Option<i64>, times: &[i64]) -> Self {
        let newest = times.iter().copied().chain(newest).max().unwrap_or(NO_TIME);
        Self {
            newest,
            ages: times.iter().map(|&t| age(t, newest)).collect(),
        }
    }

    /// The newest time ever pushed, also after it left the ring.
    pub fn newest(&self) -> Option<i64> {
        (self.newest != NO_TIME).then_some(self.newest)
    }

    /// Appends `time`, keeping the latest `max` (the oldest goes first); returns how many
    /// seconds the newest time moved on (0 for the first time).
    pub fn push(&mut self, time: i64, max: usize) -> u32 {
        let mut later = 0;
        if self.newest == NO_TIME {
            self.newest = time;
        } else if time > self.newest {
            later = age(self.newest, time);
            for a in &mut self.ages {
                *a = a.saturating_add(later);
            }
            self.newest = time;
        }
        push_recent(&mut self.ages, age(time, self.newest), max);
        later
    }

    /// The times, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        self.ages.iter().map(|&a| self.newest - i64::from(a))
    }

    pub fn len(&self) -> usize {
        self.ages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ages.is_empty()
    }

    fn heap_bytes(&self) -> usize {
        if self.ages.spilled() {
            self.ages.capacity() * std::mem::size_of::<u32>()
        } else {
            0
        }
    }
}

impl PartialEq for EventTimes {
    fn eq(&self, other: &Self) -> bool {
        self.newest == other.newest && self.iter().eq(other.iter())
    }
}

/// Seconds from `earlier` to `later`, saturating.
fn age(earlier: i64, later: i64) -> u32 {
    u32::try_from(later.saturating_sub(earlier).max(0)).unwrap_or(u32::MAX)
}

impl Serialize for EventTimes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

/// An account's events per hour of day (UTC), saturating at `u16::MAX`: a byte an hour inside
/// the state until an hour's count passes 255 (an account's first years), two on the heap after
/// — 32 bytes in the state where the 24 two-byte counts took 48. Written as the 24 counts.
#[derive(Debug, Clone)]
pub enum HourCounts {
    Few([u8; 24]),
    Many(Box<[u16; 24]>),
}

impl Default for HourCounts {
    fn default() -> Self {
        Self::Few([0; 24])
    }
}

impl HourCounts {
    pub fn counts(&self) -> [u16; 24] {
        match self {
            Self::Few(few) => few.map(u16::from),
            Self::Many(many) => **many,
        }
    }

    /// Counts one more event at `hour` (0–23).
    pub fn add(&mut self, hour: usize) {
        match self {
            Self::Few(few) => match few[hour].checked_add(1) {
                Some(count) => few[hour] = count,
                None => {
                    let mut many = Box::new(few.map(u16::from));
                    many[hour] += 1;
                    *self = Self::Many(many);
                }
            },
            Self::Many(many) => many[hour] = many[hour].saturating_add(1),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Self::Few(_) => 0,
            Self::Many(many) => std::mem::size_of_val(&**many),
        }
    }
}

impl From<[u16; 24]> for HourCounts {
    fn from(counts: [u16; 24]) -> Self {
        if counts.iter().all(|&c| c <= u16::from(u8::MAX)) {
            Self::Few(counts.map(|c| c as u8))
        } else {
            Self::Many(Box::new(counts))
        }
    }
}

impl PartialEq for HourCounts {
    fn eq(&self, other: &Self) -> bool {
        self.counts() == other.counts()
    }
}

/// One earlier event's amount and duration, for the original design's rolling means.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecentValue {
    pub amount: f64,
    pub duration: f64,
}

/// An account's last few amounts and durations (`window - 1` of them): inside the state up to
/// one — what the default window keeps — where a separate buffer would cost a 32-byte header
/// and a heap chunk for 16 bytes.
pub type RecentValues = SmallVec<[RecentValue; 1]>;

/// [`AccountState`] as the changelog holds it (format 1): the amounts and the durations as two
/// sequences, the latest event time on its own, the ring as the times themselves. The state in
/// memory differs from it only in layout.
#[derive(Deserialize)]
struct StateRecord {
    recent_amounts: Vec<f64>,
    recent_durations: Vec<f64>,
    last_time: Option<i64>,
    transactions: u64,
    sketches: Sketches,
    log_debit: Running,
    log_credit: Running,
    log_duration: Running,
    login_attempts: Running,
    hours: [u16; 24],
    recent: Vec<i64>,
    recent_scores: Vec<RecentScore>,
}

impl From<StateRecord> for AccountState {
    /// Pairs the amounts and durations from the newest back (they are pushed together, so a
    /// record holds as many of one as of the other).
    fn from(r: StateRecord) -> Self {
        let pairs = r.recent_amounts.len().min(r.recent_durations.len());
        let amounts = &r.recent_amounts[r.recent_amounts.len() - pairs..];
        let durations = &r.recent_durations[r.recent_durations.len() - pairs..];
        let recent = EventTimes::restored(r.last_time, &r.recent);
        let scores = r
            .recent_scores
            .iter()
            .map(|score| KeptScore::of(score, recent.newest))
            .collect();
        Self {
            recent_values: amounts
                .iter()
                .zip(durations)
                .map(|(&amount, &duration)| RecentValue { amount, duration })
                .collect(),
            transactions: r.transactions,
            sketches: r.sketches,
            log_debit: r.log_debit,
            log_credit: r.log_credit,
            log_duration: r.log_duration,
            login_attempts: r.login_attempts,
            hours: r.hours.into(),
            recent,
            scores,
        }
    }
}

/// Writes what [`StateRecord`] reads, field by field from the state in place (a conversion
/// would copy the state for every changelog record).
impl Serialize for AccountState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut r = serializer.serialize_struct("StateRecord", 12)?;
        r.serialize_field("recent_amounts", &Sequence(self.recent_amounts()))?;
        r.serialize_field("recent_durations", &Sequence(self.recent_durations()))?;
        r.serialize_field("last_time", &self.last_time())?;
        r.serialize_field("transactions", &self.transactions)?;
        r.serialize_field("sketches", &self.sketches)?;
        r.serialize_field("log_debit", &self.log_debit)?;
        r.serialize_field("log_credit", &self.log_credit)?;
        r.serialize_field("log_duration", &self.log_duration)?;
        r.serialize_field("login_attempts", &self.login_attempts)?;
        r.serialize_field("hours", &self.hours.counts())?;
        r.serialize_field("recent", &self.recent)?;
        r.serialize_field("recent_scores", &Sequence(self.recent_scores()))?;
        r.end()
    }
}

/// Serialises an iterator's items as a sequence.
struct Sequence<I>(I);

impl<I: Iterator<Item: Serialize> + Clone> Serialize for Sequence<I> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.clone())
    }
}

/// [`push_latest`] for the short buffers kept inline ([`RecentValues`], [`EventTimes`]): they
/// hold at most 64 values, so moving them down by one costs less than a ring's bookkeeping.
fn push_recent<A: smallvec::Array>(buf: &mut SmallVec<A>, v: A::Item, max: usize) {
    if max == 0 {
        return;
    }
    if buf.len() >= max {
        buf.remove(0);
    }
    if buf.len() == buf.capacity() {
        buf.reserve_exact(1);
    }
    buf.push(v);
}

/// An instance's accounts of one partition, by account id. The id lives in the key inline up
/// to 24 bytes, and the state is boxed: the map's table is sized for growth (up to twice the
/// accounts it holds), so a slot holds a pointer rather than the whole state.
pub type Accounts = HashMap<CompactString, Box<AccountState>>;

/// The format byte of [`AccountState::to_bytes`].
pub const STATE_FORMAT: u8 = 1;

/// Bytes that are not an account state this version wrote.
#[derive(Debug, thiserror::Error)]
pub enum StateFormatError {
    #[error("empty state record")]
    Empty,
    #[error("state format {0} is not {STATE_FORMAT}, the one this version reads")]
    Version(u8),
    #[error("state record does not decode: {0}")]
    Body(String),
    #[error("{0} bytes after the state record")]
    Trailing(usize),
}

/// The hour of day of `time` as an angle on the 24-hour circle.
pub fn hour_angle(time: i64) -> f64 {
    std::f64::consts::TAU * time.rem_euclid(86_400) as f64 / 86_400.0
}

/// The hour of day (0–23, UTC) of `time`.
pub fn hour_of_day(time: i64) -> usize {
    (time.rem_euclid(86_400) / 3_600) as usize
}

/// The accounts of one input partition and the position the state has reached in it.
#[derive(Debug, Default)]
pub struct PartitionState {
    pub accounts: Accounts,
    /// The offset the next event must have for this state to be current; anything else (a
    /// rebalance, a seek, a restart) means the state must be rebuilt first.
    pub next_offset: Option<i64>,
    /// Latest event time seen in this partition (none yet: `None`), used to sweep idle
    /// accounts; see [`crate::pipeline::EventTimeLimits`] for why one event cannot drag it far.
    pub watermark: Option<i64>,
    events_since_sweep: u64,
    /// Accounts the sweeps and evictions forgot since the last [`Self::take_forgotten`], when
    /// tracked (the changelog writes a tombstone for each).
    forgotten: Option<Vec<CompactString>>,
    /// At most this many accounts; see [`Self::limit_accounts`].
    max_accounts: Option<usize>,
    /// Accounts evicted to stay within `max_accounts` since the last [`Self::take_evicted`].
    evicted: u64,
}

/// How many events pass between sweeps for idle accounts.
const SWEEP_EVERY: u64 = 10_000;

impl PartitionState {
    /// The account's state for an event at `time`, fresh if the account is new or expired.
    pub fn account_mut(
        &mut self,
        account: &str,
        time: i64,
        cfg: &FeatureConfig,
    ) -> &mut AccountState {
        self.watermark = Some(self.watermark.map_or(time, |w| w.max(time)));
        self.events_since_sweep += 1;
        if self.events_since_sweep >= SWEEP_EVERY {
            self.sweep(cfg);
        }
        if !self.accounts.contains_key(account) {
            if let Some(max) = self.max_accounts
                && self.accounts.len() >= max
            {
                self.evict_least_recent(max);
            }
            self.accounts.insert(account.into(), Box::default());
        }
        let state = self
            .accounts
            .get_mut(account)
            .unwrap_or_else(|| unreachable!("inserted above"));
        if state.expired_at(time, cfg) {
            **state = AccountState::default();
        }
        state
    }

    /// Forgets accounts idle for longer than the TTL relative to the partition's latest event.
    pub fn sweep(&mut self, cfg: &FeatureConfig) {
        self.events_since_sweep = 0;
        if let Some(watermark) = self.watermark {
            let forgotten = &mut self.forgotten;
            self.accounts.retain(|id, s| {
                let keep = !s.expired_at(watermark, cfg);
                if !keep && let Some(list) = forgotten.as_mut() {
                    list.push(id.clone());
                }
                keep
            });
        }
    }

    /// Keeps at most `max` accounts (`None`: no limit): a new account arriving when the partition
    /// holds `max` first evicts the least recently active ones — the oldest latest event time,
    /// then the smallest id, so the choice does not depend on the map's order. They start
    /// afresh with their next event, as after the TTL.
    pub fn limit_accounts(&mut self, max: Option<usize>) {
        self.max_accounts = max;
    }

    /// Evicts down to a 64th below `max` (at least one below), so that choosing whom — a pass
    /// over every account — happens once per that many new accounts, not for each.
    fn evict_least_recent(&mut self, max: usize) {
        let keep = max.saturating_sub((max / 64).max(1));
        let surplus = self.accounts.len().saturating_sub(keep);
        if surplus == 0 {
            return;
        }
        let mut by_age: Vec<(i64, &CompactString)> = self
            .accounts
            .iter()
            .map(|(id, a)| (a.last_time().unwrap_or(i64::MIN), id))
            .collect();
        by_age.select_nth_unstable(surplus - 1);
        let victims: Vec<CompactString> = by_age[..surplus]
            .iter()
            .map(|&(_, id)| id.clone())
            .collect();
        for id in &victims {
            self.accounts.remove(id);
        }
        self.evicted += victims.len() as u64;
        if let Some(list) = self.forgotten.as_mut() {
            list.extend(victims);
        }
    }

    /// How many accounts were evicted to stay within the limit since the last call.
    pub fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    /// From now on, remember which accounts the sweeps forget, for [`Self::take_forgotten`].
    pub fn track_forgotten(&mut self) {
        self.forgotten.get_or_insert_with(Vec::new);
    }

    /// The accounts forgotten since the last call (none unless tracked).
    pub fn take_forgotten(&mut self) -> Vec<CompactString> {
        self.forgotten
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// A partition's state from its accounts' states: the watermark is the latest event time
    /// among them (the state's clock only ever moved with an account's event).
    pub fn from_accounts(accounts: Accounts, next_offset: i64) -> Self {
        let watermark = accounts.values().filter_map(|a| a.last_time()).max();
        Self {
            accounts,
            next_offset: Some(next_offset),
            watermark,
            ..Self::default()
        }
    }

    /// Bytes held by all accounts of this partition, keys included.
    pub fn bytes(&self) -> usize {
        self.accounts.iter().map(|(k, v)| entry_bytes(k, v)).sum()
    }

    /// [`Self::bytes`] at a bounded cost: exact up to [`BYTES_SAMPLE`] accounts, above that
    /// scaled up from the first [`BYTES_SAMPLE`] in the map's order (its hash order: a sample
    /// unrelated to the accounts' histories). The gauge reads it every few seconds while the
    /// partition's worker waits for it; walking every account costs 90–120 ns each, 90–120 ms
    /// for a million, which would stall the partition's events that long.
    pub fn bytes_estimate(&self) -> usize {
        let total = self.accounts.len();
        if total <= BYTES_SAMPLE {
            return self.bytes();
        }
        let sampled: usize = self
            .accounts
            .iter()
            .take(BYTES_SAMPLE)
            .map(|(k, v)| entry_bytes(k, v))
            .sum();
        sampled * total / BYTES_SAMPLE
    }
}

/// Accounts a partition's [`PartitionState::bytes_estimate`] walks at most.
pub const BYTES_SAMPLE: usize = 4096;

/// One map entry's bytes: its slot, the key's heap part (an id longer than 24 bytes) and the
/// state.
fn entry_bytes(key: &CompactString, state: &AccountState) -> usize {
    let key_heap = if key.is_heap_allocated() {
        key.capacity()
    } else {
        0
    };
    std::mem::size_of::<(CompactString, Box<AccountState>)>() + key_heap + state.bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    #[test]
    fn a_past_extreme_does_not_widen_the_habit_so_far_that_the_next_one_looks_ordinary() {
        let (mut robust, mut plain) = (Running::default(), Running::default());
        for i in 0..30 {
            let x = 5.0 + 0.3 * f64::from(i % 3) - 0.3;
            robust.add_robust(x);
            plain.add(x);
        }
        // One payment far above the habit (a past fraud, say), then another like it.
        robust.add_robust(9.0);
        plain.add(9.0);
        // Counted at 3 spreads, the first leaves the spread nearly as it was: the second is as far
        // out as it gets (10). Counted in full, it would have more than doubled the spread.
        assert_eq!(robust.z(9.0), 10.0, "{robust:?}");
        assert!(plain.z(9.0) < 6.0, "{plain:?}");
        // An ordinary value is still ordinary.
        assert!(robust.z(5.2).abs() < 1.0);
    }

    #[test]
    fn frequent_values_are_exact_within_capacity_and_ties_go_to_the_first_seen() {
        let mut s = Sketches::default();
        for v in ["a", "b", "b", "a"] {
            s.observe(Sketch::Device, v, 4);
        }
        assert_eq!(s.get(Sketch::Device).most_frequent(), Some("a"));
        s.observe(Sketch::Device, "b", 4);
        assert_eq!(s.get(Sketch::Device).most_frequent(), Some("b"));
    }

    #[test]
    fn frequent_values_stay_bounded_and_keep_the_heavy_hitter() {
        let mut s = Sketches::default();
        for i in 0..1000 {
            s.observe(Sketch::Location, "home", 4);
            s.observe(Sketch::Location, &format!("other-{i}"), 4);
        }
        assert_eq!(s.get(Sketch::Location).slots().len(), 4);
        assert_eq!(s.get(Sketch::Location).most_frequent(), Some("home"));
    }

    #[test]
    fn four_sketches_in_one_buffer_keep_what_each_would_alone() {
        // Values arriving in every sketch in turn, each sketch growing past its capacity.
        let mut shared = Sketches::default();
        let mut alone: Vec<Sketches> = vec![Sketches::default(); 4];
        for i in 0..200u32 {
            for (k, sketch) in SKETCHES.into_iter().enumerate() {
                let value = format!("{k}-{}", (i * (k as u32 + 3)) % 11);
                shared.observe(sketch, &value, 5);
                alone[k].observe(Sketch::Ip, &value, 5);
            }
            for (k, sketch) in SKETCHES.into_iter().enumerate() {
                assert_eq!(shared.get(sketch).slots(), alone[k].get(Sketch::Ip).slots());
            }
        }
        let bytes = postcard::to_allocvec(&shared).unwrap();
        assert_eq!(postcard::from_bytes::<Sketches>(&bytes).unwrap(), shared);
    }

    /// What the state's bounded buffers replaced: a deque of the latest `max`.
    fn push_bounded<T>(buf: &mut VecDeque<T>, v: T, max: usize) {
        if buf.len() >= max {
            buf.pop_front();
        }
        buf.push_back(v);
    }

    #[test]
    fn latest_scores_keep_what_a_deque_kept() {
        let (mut exact, mut plain) = (Box::<[u32]>::default(), VecDeque::new());
        for v in 0..12 {
            push_latest(&mut exact, v, RECENT_SCORES);
            push_bounded(&mut plain, v, RECENT_SCORES);
            assert!(exact.iter().eq(plain.iter()));
            assert_eq!(
                postcard::to_allocvec(&exact).unwrap(),
                postcard::to_allocvec(&plain).unwrap()
            );
        }
    }

    #[test]
    fn event_times_keep_what_a_deque_of_times_kept_late_events_and_all() {
        let (mut packed, mut plain) = (EventTimes::default(), VecDeque::new());
        let mut t = 1_700_000_000i64;
        let mut newest = i64::MIN;
        let mut seed = 7u64;
        for _ in 0..500 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            // Mostly forward by up to a day; one in four arrives up to an hour late.
            let step = (seed >> 33) as i64 % 86_400;
            let time = if seed % 4 == 0 {
                t - step % 3_600
            } else {
                t + step
            };
            t = t.max(time);
            newest = newest.max(time);
            packed.push(time, RECENT_EVENTS);
            push_bounded(&mut plain, time, RECENT_EVENTS);
            assert!(packed.iter().eq(plain.iter().copied()));
            let bytes = postcard::to_allocvec(&packed).unwrap();
            assert_eq!(bytes, postcard::to_allocvec(&plain).unwrap());
            let times: Vec<i64> = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(EventTimes::restored(packed.newest(), &times), packed);
            assert_eq!(packed.newest(), Some(newest));
        }
        assert_eq!(packed.len(), RECENT_EVENTS);
        // The newest time leaves the ring behind a run of late events, and stays its reference.
        for late in 1..=20 {
            packed.push(t - late, RECENT_EVENTS);
            push_bounded(&mut plain, t - late, RECENT_EVENTS);
        }
        assert!(packed.iter().eq(plain.iter().copied()));
        assert_eq!(packed.newest(), Some(newest));
        let bytes = postcard::to_allocvec(&packed).unwrap();
        let times: Vec<i64> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(EventTimes::restored(packed.newest(), &times), packed);
    }

    /// An account of three events (a debit, a credit, a debit a day later) and one score.
    fn sample_state() -> AccountState {
        let cfg = FeatureConfig::default();
        let mut a = AccountState::default();
        for (i, t) in [1_000i64, 1_060, 90_000].into_iter().enumerate() {
            a.update(&sample_tx(i, t), &cfg);
        }
        a.record_score(RecentScore {
            time: 90_000,
            forest: 0.61,
            lof: 1.7,
            alert: true,
        });
        a
    }

    /// The sample account's `i`-th event (a credit when `i` is 1), at `time`.
    fn sample_tx(i: usize, time: i64) -> Transaction {
        Transaction {
            transaction_id: format!("TX{i}").into(),
            account_id: "AC1".into(),
            amount: 12.5 * (i + 1) as f64,
            time,
            transaction_type: if i == 1 {
                TransactionType::Credit
            } else {
                TransactionType::Debit
            },
            location: "Austin".into(),
            device_id: "D1".into(),
            ip_address: format!("10.0.0.{i}").into(),
            merchant_id: "M1".into(),
            channel: crate::decode::Channel::Online,
            customer_age: 40,
            occupation: crate::decode::Occupation::Engineer,
            duration: 30 + i as u32,
            login_attempts: 1,
            balance: 1000.0,
            previous_date: None,
        }
    }

    #[test]
    fn hour_counts_keep_what_two_byte_counts_kept_past_a_byte_and_through_the_bytes() {
        let (mut counts, mut plain) = (HourCounts::default(), [0u16; 24]);
        for i in 0..140_000usize {
            // Hour 3 fills first: it passes 255 (the move to the heap) and then saturates.
            let hour = if i % 2 == 0 { 3 } else { i % 24 };
            counts.add(hour);
            plain[hour] = plain[hour].saturating_add(1);
            if i % 4_999 == 0 || i == 510 {
                assert_eq!(counts.counts(), plain);
                let bytes = postcard::to_allocvec(&counts.counts()).unwrap();
                assert_eq!(bytes, postcard::to_allocvec(&plain).unwrap());
                let restored = HourCounts::from(postcard::from_bytes::<[u16; 24]>(&bytes).unwrap());
                assert_eq!(restored, counts);
                assert_eq!(
                    matches!(restored, HourCounts::Many(_)),
                    matches!(counts, HourCounts::Many(_))
                );
            }
        }
        assert_eq!((counts.counts()[3], counts.counts()), (u16::MAX, plain));
    }

    #[test]
    fn scores_keep_their_event_times_as_later_and_late_events_arrive_and_through_the_bytes() {
        let cfg = FeatureConfig::default();
        let (mut a, mut plain) = (AccountState::default(), VecDeque::new());
        let mut t = 1_700_000_000i64;
        for i in 0..40 {
            // Forward by up to a day, every fourth event an hour late.
            t += (i as i64 * 7_919) % 86_400;
            let time = if i % 4 == 3 { t - 3_600 } else { t };
            a.update(&sample_tx(i, time), &cfg);
            let score = RecentScore {
                time,
                forest: i as f32,
                lof: 1.0,
                alert: i % 5 == 0,
            };
            a.record_score(score);
            push_bounded(&mut plain, score, RECENT_SCORES);
            assert!(a.recent_scores().eq(plain.iter().copied()));
            let restored = AccountState::from_bytes(&a.to_bytes()).unwrap();
            assert_eq!(restored, a);
        }
    }

    #[test]
    fn format_1_bytes_are_what_earlier_versions_wrote_so_their_changelogs_restore() {
        let hex: String = sample_state()
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        // As fa438f8 wrote it, when sketch values were 24-byte strings: the format is the data,
        // not the types that hold it in memory.
        assert_eq!(
            hex,
            concat!(
                "01010000000000c0424001000000000000404001a0fe0a03030831302e302e302e3001010831302e",
                "302e302e3101020831302e302e302e32010303010641757374696e0301010102443103010101024d",
                "310301010208668fa36d0309408a96921b6292e13f01cd1af0ea94100a4000000000000000000387",
                "39b5fe28b90b40153f4d980003603f03000000000000f03f00000000000000000201000000000000",
                "0000000000000000000000000000000003d00fc810a0fe0a01a0fe0af6281c3f9a99d93f01"
            )
        );
    }

    #[test]
    fn an_account_state_survives_its_bytes_exactly_and_foreign_bytes_are_refused() {
        let a = sample_state();
        let bytes = a.to_bytes();
        assert_eq!(AccountState::from_bytes(&bytes).unwrap(), a);
        assert!(matches!(
            AccountState::from_bytes(&bytes[..bytes.len() - 1]),
            Err(StateFormatError::Body(_))
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            AccountState::from_bytes(&longer),
            Err(StateFormatError::Trailing(1))
        ));
        let mut other = bytes;
        other[0] = STATE_FORMAT + 1;
        assert!(matches!(
            AccountState::from_bytes(&other),
            Err(StateFormatError::Version(_))
        ));
        assert!(matches!(
            AccountState::from_bytes(&[]),
            Err(StateFormatError::Empty)
        ));
    }

    #[test]
    fn a_restored_state_keeps_its_latest_time_after_that_event_left_the_ring() {
        let mut a = sample_state();
        for late in 1..=RECENT_EVENTS as i64 + 1 {
            a.recent.push(90_000 - late, RECENT_EVENTS);
        }
        assert!(a.recent.iter().all(|t| t < 90_000));
        assert_eq!(a.last_time(), Some(90_000));
        let restored = AccountState::from_bytes(&a.to_bytes()).unwrap();
        assert_eq!(restored.last_time(), Some(90_000));
        assert_eq!(restored, a);
    }

    #[test]
    fn a_tracked_partition_reports_the_accounts_its_sweeps_forget() {
        let cfg = FeatureConfig {
            state_ttl_secs: 100,
            ..FeatureConfig::default()
        };
        let mut p = PartitionState::default();
        p.account_mut("A", 1_000, &cfg)
            .recent
            .push(1_000, RECENT_EVENTS);
        p.sweep(&cfg);
        assert!(p.take_forgotten().is_empty(), "untracked");
        p.track_forgotten();
        p.account_mut("B", 5_000, &cfg)
            .recent
            .push(5_000, RECENT_EVENTS);
        p.sweep(&cfg);
        assert_eq!(p.take_forgotten(), vec![CompactString::from("A")]);
        assert!(p.take_forgotten().is_empty());
    }

    #[test]
    fn idle_accounts_expire_after_the_ttl_in_event_time() {
        let cfg = FeatureConfig {
            state_ttl_secs: 100,
            ..FeatureConfig::default()
        };
        let mut p = PartitionState::default();
        p.account_mut("A", 1_000, &cfg)
            .recent
            .push(1_000, RECENT_EVENTS);
        assert_eq!(p.account_mut("A", 1_100, &cfg).last_time(), Some(1_000));
        assert_eq!(p.account_mut("A", 1_101, &cfg).last_time(), None);
        p.account_mut("A", 1_101, &cfg)
            .recent
            .push(1_101, RECENT_EVENTS);
        p.account_mut("B", 5_000, &cfg);
        p.sweep(&cfg);
        assert!(!p.accounts.contains_key("A"));
    }

    #[test]
    fn the_state_size_estimate_is_exact_for_small_partitions_and_within_a_percent_above_its_sample()
    {
        let cfg = FeatureConfig::default();
        let mut p = PartitionState::default();
        let score = |time| RecentScore {
            time,
            forest: 0.0,
            lof: 0.0,
            alert: false,
        };
        // Accounts of six sizes: none to five scores kept.
        let grow = |p: &mut PartitionState, n: usize| {
            for i in p.accounts.len()..n {
                let account = p.account_mut(&format!("ACC-{i:06}"), 0, &cfg);
                for t in 0..(i % 6) as i64 {
                    account.recent.push(t, RECENT_EVENTS);
                    account.record_score(score(t));
                }
            }
        };
        grow(&mut p, BYTES_SAMPLE);
        assert_eq!(p.bytes_estimate(), p.bytes());
        grow(&mut p, 10 * BYTES_SAMPLE);
        let (estimate, exact) = (p.bytes_estimate() as f64, p.bytes() as f64);
        assert!(
            (estimate / exact - 1.0).abs() < 0.01,
            "{estimate} against {exact}"
        );
    }

    #[test]
    fn a_full_partition_evicts_its_least_recently_active_accounts_and_counts_them() {
        let cfg = FeatureConfig::default();
        let mut p = PartitionState::default();
        p.limit_accounts(Some(128));
        p.track_forgotten();
        // 128 accounts, the one made at time t active last at t; A-050 was active again lately.
        for t in 0..128 {
            p.account_mut(&format!("A-{t:03}"), t, &cfg)
                .recent
                .push(t, RECENT_EVENTS);
        }
        p.account_mut("A-050", 1_000, &cfg)
            .recent
            .push(1_000, RECENT_EVENTS);
        assert_eq!((p.accounts.len(), p.take_evicted()), (128, 0));
        // The 129th makes room: two (a 64th of the limit) go, the two least recently active.
        p.account_mut("NEW", 2_000, &cfg)
            .recent
            .push(2_000, RECENT_EVENTS);
        assert_eq!(p.accounts.len(), 127);
        assert_eq!(p.take_evicted(), 2);
        assert_eq!(p.take_evicted(), 0);
        let mut gone = p.take_forgotten();
        gone.sort();
        assert_eq!(gone, ["A-000", "A-001"]);
        assert!(p.accounts.contains_key("A-050") && p.accounts.contains_key("NEW"));
        // An account already held never evicts anyone; A-000 returns as a new account.
        p.account_mut("A-002", 2_001, &cfg);
        assert_eq!(p.take_evicted(), 0);
        assert_eq!(p.account_mut("A-000", 2_002, &cfg).transactions, 0);
        // Ties on the time go by id, whatever the map's order.
        let mut q = PartitionState::default();
        q.limit_accounts(Some(3));
        for id in ["c", "a", "b"] {
            q.account_mut(id, 7, &cfg).recent.push(7, RECENT_EVENTS);
        }
        q.account_mut("d", 8, &cfg);
        let mut kept: Vec<&str> = q.accounts.keys().map(|k| k.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["b", "c", "d"]);
        // A limit lowered below what is held (a partition more to share it) evicts the surplus.
        q.limit_accounts(Some(1));
        q.account_mut("e", 9, &cfg);
        assert_eq!(q.accounts.len(), 1);
        assert!(q.accounts.contains_key("e"));
    }
}
