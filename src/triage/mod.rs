//! Triage: what analysts work on once an alert is out. It owns
//! - the **alert index**: the alerts published in the last `alerts.index_window_days`, searchable
//!   by account, event time, margin, severity, reason and review status, newest first, with
//!   paging. The alerts topic stays the source of truth: [`follow`] reads it from that far back
//!   at every start and then keeps up with it, so every instance indexes every alert, whichever
//!   instance published it;
//! - **verdicts**: an analyst marks an alert `fraud`, `legitimate` or `needs_review` with a note.
//!   A verdict is published to the compacted feedback topic keyed by the alert id (the latest
//!   verdict per alert survives compaction) and read back from it by every instance, at start
//!   and as it comes; backtests read the same topic for labels ([`VerdictRecord`]).
//!
//! The index is SQLite (rusqlite, bundled): searching alerts is filtering and ordering on a
//! handful of columns with paging, which is what a SQL engine with indexes does well. It is a
//! private temporary database, rebuilt from the topics at start, so it needs no server, no
//! migration and nothing left on disk. It takes about 2.2 KB per alert (the alert's JSON and its
//! indexed columns): a month of a bank's alerts is gigabytes, so at most
//! `alerts.index_memory_mb` of it stays in memory and the rest waits in the database's file.

pub mod calibration;
pub mod follow;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params, params_from_iter};
use serde::{Deserialize, Serialize};

pub use follow::{VerdictPublisher, follow, read_verdicts};

/// The triage settings (`alerts.index_window_days`, `kafka.topics.feedback`).
#[derive(Debug, Clone, PartialEq)]
pub struct TriageSettings {
    /// Alerts published longer ago than this leave the index (and are not read at start).
    pub window: Duration,
    /// The compacted topic of verdicts, keyed by alert id.
    pub feedback_topic: String,
    /// The index's page cache; what does not fit waits on disk (`alerts.index_memory_mb`).
    pub index_memory_bytes: u64,
}

/// What an analyst concluded about an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Fraud,
    Legitimate,
    NeedsReview,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Fraud, Verdict::Legitimate, Verdict::NeedsReview];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fraud => "fraud",
            Self::Legitimate => "legitimate",
            Self::NeedsReview => "needs_review",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// As a backtest label: fraud is a positive, legitimate a negative, and an alert still
    /// under review says nothing yet.
    pub fn label(self) -> Option<&'static str> {
        match self {
            Self::Fraud => Some("fraud"),
            Self::Legitimate => Some("normal"),
            Self::NeedsReview => None,
        }
    }
}

/// An indexed alert as calibration sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredAlert {
    pub score: f64,
    /// Unix seconds.
    pub event_time: i64,
    pub verdict: Option<Verdict>,
}

/// The longest note a verdict keeps, in characters.
pub const MAX_NOTE_CHARS: usize = 2_000;

/// One verdict as it is published to the feedback topic (JSON, keyed by `alert_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictRecord {
    pub alert_id: String,
    pub transaction_id: String,
    pub account_id: String,
    pub verdict: Verdict,
    pub note: String,
    /// Who gave it, when known (the authenticated user, or what the client said).
    #[serde(default)]
    pub analyst: Option<String>,
    /// RFC 3339, UTC.
    pub decided_at: String,
    /// The model version that raised the alert.
    #[serde(default)]
    pub model_version: String,
}

/// An operator's decision to serve one model of one version with another threshold (typically
/// from [`calibration`]), as the feedback topic holds it under [`ThresholdDecision::key`]; a
/// tombstone under the same key withdraws it and the trained threshold serves again. Every
/// instance follows the topic, so every instance and every restart serves the same threshold,
/// and a new model version starts from its own trained one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdDecision {
    pub model: String,
    pub model_version: String,
    pub threshold: f64,
    /// The threshold it replaced.
    pub previous: f64,
    /// Why (required: the record is the audit trail).
    pub note: String,
    #[serde(default)]
    pub analyst: Option<String>,
    /// RFC 3339, UTC.
    pub decided_at: String,
}

/// Keys of threshold decisions on the feedback topic (alert ids are hexadecimal).
pub const THRESHOLD_KEY_PREFIX: &str = "threshold/";

impl ThresholdDecision {
    pub fn key(model_version: &str, model: &str) -> String {
        format!("{THRESHOLD_KEY_PREFIX}{model_version}/{model}")
    }
}

/// Review status, as a search filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No verdict yet.
    Unreviewed,
    Is(Verdict),
}

impl Status {
    pub fn parse(s: &str) -> Option<Self> {
        if s == "unreviewed" {
            return Some(Self::Unreviewed);
        }
        Verdict::parse(s).map(Self::Is)
    }
}

/// The most alerts one page holds.
pub const MAX_PAGE: usize = 500;

/// A search of the index; every filter is optional and they combine with "and".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertQuery {
    pub account: Option<String>,
    /// Event time, Unix seconds, inclusive.
    pub from: Option<i64>,
    /// Event time, Unix seconds, exclusive.
    pub to: Option<i64>,
    /// The consensus margin over the thresholds at least this.
    pub min_margin: Option<f64>,
    pub severity: Option<String>,
    /// A word or phrase of the reason, or a feature name among the alert's top features
    /// (case-insensitive).
    pub reason: Option<String>,
    pub status: Option<Status>,
    pub limit: usize,
    pub offset: usize,
}

/// One page of a search: the alerts (as published) with their verdicts, newest event first.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// How many alerts match, over all pages.
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    pub alerts: Vec<Indexed>,
}

/// An indexed alert and the latest verdict on it.
#[derive(Debug, Clone, Serialize)]
pub struct Indexed {
    pub alert: serde_json::Value,
    /// Absent before any verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<VerdictRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum TriageError {
    #[error("alert index: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("an alert without {0}")]
    Incomplete(&'static str),
    #[error("a record that is not a verdict: {0}")]
    NotAVerdict(String),
    #[error("a record that is not an alert: {0}")]
    NotAnAlert(String),
    #[error("reading the alerts or feedback topic: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the feedback topic is not reachable yet")]
    NotConnected,
    #[error("publishing the verdict: {0}")]
    Publish(String),
    #[error("{}, line {line}: {message}", path.display())]
    File {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("the feedback topic `{0}` does not exist")]
    NoTopic(String),
}

const SCHEMA: &str = "
CREATE TABLE alerts (
    alert_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    transaction_id TEXT NOT NULL,
    event_time INTEGER NOT NULL,
    published_ms INTEGER NOT NULL,
    severity TEXT NOT NULL,
    margin REAL NOT NULL,
    reason TEXT NOT NULL,
    features TEXT NOT NULL,
    forest_score REAL,
    lof_score REAL,
    body TEXT NOT NULL
);
CREATE INDEX alerts_by_time ON alerts (event_time DESC, alert_id);
CREATE INDEX alerts_by_account ON alerts (account_id, event_time DESC);
CREATE INDEX alerts_by_publication ON alerts (published_ms);
CREATE TABLE verdicts (
    alert_id TEXT PRIMARY KEY,
    verdict TEXT NOT NULL,
    body TEXT NOT NULL
);
";

/// Commits `tx` after writing its pages to the index's file (the kernel's page cache; clean
/// copies stay in the index's cache).
///
/// A temporary database keeps written pages dirty in its cache until a quarter of the cache is
/// dirty, and every commit walks that whole dirty list twice (`pager_end_transaction`,
/// `sqlite3PcacheTruncate`): an alert indexed alone cost 124 µs with the default 64 MB cache
/// and 9 ms with a 492 MB index all in its cache (`cargo bench --bench alert_index`). Written
/// out first, the list holds only what this transaction wrote. (SQLite flushes only inside a
/// write transaction, so before the commit, not after.)
fn committed(tx: rusqlite::Transaction<'_>) -> Result<(), TriageError> {
    tx.cache_flush()?;
    Ok(tx.commit()?)
}

/// Inserts (or replaces) one alert as published.
fn insert(
    db: &Connection,
    alert: &serde_json::Value,
    published_ms: i64,
) -> Result<(), TriageError> {
    let text = |k: &'static str| {
        alert
            .get(k)
            .and_then(|v| v.as_str())
            .ok_or(TriageError::Incomplete(k))
    };
    let event_time = crate::decode::parse_time(text("event_time")?)
        .ok_or(TriageError::Incomplete("event_time"))?;
    let features: Vec<&str> = alert
        .get("top_features")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|c| c.get("feature")?.as_str())
                .collect()
        })
        .unwrap_or_default();
    let score = |model: &str| {
        alert
            .get("models")
            .and_then(|m| m.as_array())
            .and_then(|m| {
                m.iter()
                    .find(|v| v.get("model").and_then(|n| n.as_str()) == Some(model))
            })
            .and_then(|v| v.get("score")?.as_f64())
    };
    // Cached: parsing the statement cost as much as the insert (`perf` on the stream).
    db.prepare_cached(
        "INSERT OR REPLACE INTO alerts VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        text("alert_id")?,
        text("account_id")?,
        text("transaction_id")?,
        event_time,
        published_ms,
        text("severity")?,
        alert.get("margin").and_then(|v| v.as_f64()).unwrap_or(0.0),
        alert.get("reason").and_then(|v| v.as_str()).unwrap_or(""),
        features.join(" "),
        score(crate::models::ISOLATION_FOREST),
        score(crate::models::LOF),
        alert.to_string(),
    ])?;
    Ok(())
}

/// The alerts of the window and the verdicts on them.
pub struct AlertIndex {
    db: Mutex<Connection>,
}

impl AlertIndex {
    /// An empty index that keeps at most `memory_bytes` of its pages in memory.
    ///
    /// It is a private temporary database: SQLite creates its file in `$SQLITE_TMPDIR` (else
    /// `$TMPDIR`, `/var/tmp`, `/tmp`), unlinked at once, so nothing is left behind however the
    /// process ends. Every commit writes its pages to the file (see [`committed`]), and up to
    /// `memory_bytes` of them stay in the index's cache for reading: a month of a bank's alerts
    /// (gigabytes) costs the file and the kernel's page cache, not the heap.
    pub fn new(memory_bytes: u64) -> Result<Self, TriageError> {
        let db = Connection::open("")?;
        // A negative cache size is in KiB. Nothing here needs to survive a crash (the index is
        // rebuilt from the topics at start), so the journal stays in memory and nothing is synced.
        // Auto-vacuum gives the pages of alerts that left the window back to the file system, so
        // the file follows the window instead of staying at its largest.
        let cache_kib = i64::try_from(memory_bytes >> 10)
            .unwrap_or(i64::MAX)
            .max(64);
        db.execute_batch(&format!(
            "PRAGMA auto_vacuum = FULL; PRAGMA cache_size = -{cache_kib}; PRAGMA journal_mode = MEMORY; PRAGMA synchronous = OFF;"
        ))?;
        db.execute_batch(SCHEMA)?;
        Ok(Self { db: Mutex::new(db) })
    }

    /// Bytes the index's tables and indexes take (in its cache and file together).
    pub fn bytes(&self) -> Result<u64, TriageError> {
        let db = self.db();
        let pages: i64 = db.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let page_size: i64 = db.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(u64::try_from(pages.saturating_mul(page_size)).unwrap_or(0))
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (each statement is atomic).
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds (or replaces: a redelivered alert has the same id) an alert as published, JSON,
    /// `published_ms` being its record's timestamp.
    pub fn add(&self, alert: &serde_json::Value, published_ms: i64) -> Result<(), TriageError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        insert(&tx, alert, published_ms)?;
        committed(tx)
    }

    /// Adds alerts as [`Self::add`] does, in one transaction; those that cannot be indexed are
    /// skipped and their errors returned.
    ///
    /// One transaction for many: a rebuild at start writes a window of alerts.
    pub fn add_all<'a>(
        &self,
        alerts: impl IntoIterator<Item = (&'a serde_json::Value, i64)>,
    ) -> Result<Vec<TriageError>, TriageError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let skipped = alerts
            .into_iter()
            .filter_map(|(alert, published_ms)| insert(&tx, alert, published_ms).err())
            .collect();
        committed(tx)?;
        Ok(skipped)
    }

    /// Records the latest verdict on an alert (the alert need not be indexed: the feedback
    /// topic is read alongside the alerts topic, in no particular order between the two).
    pub fn set_verdict(&self, v: &VerdictRecord) -> Result<(), TriageError> {
        let body = serde_json::to_string(v).map_err(|e| TriageError::NotAVerdict(e.to_string()))?;
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO verdicts VALUES (?1, ?2, ?3)",
            params![v.alert_id, v.verdict.as_str(), body],
        )?;
        committed(tx)
    }

    /// Forgets the verdict on an alert (a tombstone on the feedback topic).
    pub fn clear_verdict(&self, alert_id: &str) -> Result<(), TriageError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "DELETE FROM verdicts WHERE alert_id = ?1",
            params![alert_id],
        )?;
        committed(tx)
    }

    /// Drops the alerts published before `published_ms` (their verdicts stay: they are few, and
    /// still labels for backtests).
    pub fn forget_before(&self, published_ms: i64) -> Result<usize, TriageError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let forgotten = tx.execute(
            "DELETE FROM alerts WHERE published_ms < ?1",
            params![published_ms],
        )?;
        committed(tx)?;
        Ok(forgotten)
    }

    /// Alerts in the index.
    pub fn len(&self) -> Result<usize, TriageError> {
        let n: i64 = self
            .db()
            .query_row("SELECT COUNT(*) FROM alerts", [], |r| r.get(0))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    pub fn is_empty(&self) -> Result<bool, TriageError> {
        Ok(self.len()? == 0)
    }

    /// One alert with its verdict.
    pub fn get(&self, alert_id: &str) -> Result<Option<Indexed>, TriageError> {
        let row = self
            .db()
            .query_row(
                "SELECT a.body, v.body FROM alerts a LEFT JOIN verdicts v USING (alert_id)
                 WHERE a.alert_id = ?1",
                params![alert_id],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)),
            )
            .optional()?;
        Ok(row.map(|(alert, verdict)| indexed(&alert, verdict.as_deref())))
    }

    /// The verdict on an alert, whether or not the alert is still indexed.
    pub fn verdict(&self, alert_id: &str) -> Result<Option<VerdictRecord>, TriageError> {
        let body: Option<String> = self
            .db()
            .query_row(
                "SELECT body FROM verdicts WHERE alert_id = ?1",
                params![alert_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(body.and_then(|b| serde_json::from_str(&b).ok()))
    }

    /// The alerts matching `q`, newest event first (ties by alert id), one page of them.
    pub fn search(&self, q: &AlertQuery) -> Result<Page, TriageError> {
        let mut clauses: Vec<&str> = Vec::new();
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        use rusqlite::types::Value as V;
        if let Some(a) = &q.account {
            clauses.push("a.account_id = ?");
            values.push(V::Text(a.clone()));
        }
        if let Some(t) = q.from {
            clauses.push("a.event_time >= ?");
            values.push(V::Integer(t));
        }
        if let Some(t) = q.to {
            clauses.push("a.event_time < ?");
            values.push(V::Integer(t));
        }
        if let Some(m) = q.min_margin {
            clauses.push("a.margin >= ?");
            values.push(V::Real(m));
        }
        if let Some(s) = &q.severity {
            clauses.push("a.severity = ?");
            values.push(V::Text(s.clone()));
        }
        if let Some(r) = &q.reason {
            // LIKE is case-insensitive for ASCII; the pattern's own wildcards are escaped.
            let escaped = r
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            clauses.push(
                "(a.reason LIKE ? ESCAPE '\\' OR (' ' || a.features || ' ') LIKE ? ESCAPE '\\')",
            );
            values.push(V::Text(format!("%{escaped}%")));
            values.push(V::Text(format!("% {escaped} %")));
        }
        match q.status {
            Some(Status::Unreviewed) => clauses.push("v.verdict IS NULL"),
            Some(Status::Is(v)) => {
                clauses.push("v.verdict = ?");
                values.push(V::Text(v.as_str().into()));
            }
            None => {}
        }
        let filter = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let from = "FROM alerts a LEFT JOIN verdicts v USING (alert_id)";
        let db = self.db();
        let total: i64 = db.query_row(
            &format!("SELECT COUNT(*) {from} {filter}"),
            params_from_iter(values.iter()),
            |r| r.get(0),
        )?;
        let limit = q.limit.clamp(1, MAX_PAGE);
        let mut page_values = values.clone();
        page_values.push(V::Integer(limit as i64));
        page_values.push(V::Integer(i64::try_from(q.offset).unwrap_or(i64::MAX)));
        let mut statement = db.prepare(&format!(
            "SELECT a.body, v.body {from} {filter}
             ORDER BY a.event_time DESC, a.alert_id LIMIT ? OFFSET ?"
        ))?;
        let rows = statement
            .query_map(params_from_iter(page_values.iter()), |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page {
            total: usize::try_from(total).unwrap_or(0),
            offset: q.offset,
            limit,
            alerts: rows.iter().map(|(a, v)| indexed(a, v.as_deref())).collect(),
        })
    }

    /// Each indexed alert's score by `model` (`isolation_forest` or `lof`), event time and
    /// verdict, for calibration.
    pub fn scores(&self, model: &str) -> Result<Vec<ScoredAlert>, TriageError> {
        let column = if model == crate::models::LOF {
            "lof_score"
        } else {
            "forest_score"
        };
        let db = self.db();
        let mut statement = db.prepare(&format!(
            "SELECT a.{column}, a.event_time, v.verdict FROM alerts a LEFT JOIN verdicts v USING (alert_id)
             WHERE a.{column} IS NOT NULL"
        ))?;
        let rows = statement
            .query_map([], |r| {
                Ok(ScoredAlert {
                    score: r.get(0)?,
                    event_time: r.get(1)?,
                    verdict: r
                        .get::<_, Option<String>>(2)?
                        .as_deref()
                        .and_then(Verdict::parse),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Every verdict recorded, by alert id order.
    pub fn verdicts(&self) -> Result<Vec<VerdictRecord>, TriageError> {
        let db = self.db();
        let mut statement = db.prepare("SELECT body FROM verdicts ORDER BY alert_id")?;
        let bodies = statement
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(bodies
            .iter()
            .filter_map(|b| serde_json::from_str(b).ok())
            .collect())
    }
}

fn indexed(alert: &str, verdict: Option<&str>) -> Indexed {
    Indexed {
        alert: serde_json::from_str(alert).unwrap_or(serde_json::Value::Null),
        verdict: verdict.and_then(|v| serde_json::from_str(v).ok()),
    }
}

/// The index, the settings and, once [`follow`] has reached the broker, the verdict publisher:
/// what the server's triage routes use.
pub struct Triage {
    pub index: AlertIndex,
    pub settings: TriageSettings,
    /// Set while [`follow`] runs (dropped when it stops: a client that outlives the cluster it
    /// talks to only logs that the cluster is gone).
    publisher: Mutex<Option<VerdictPublisher>>,
    /// Threshold decisions in force, by key.
    thresholds: Mutex<HashMap<String, ThresholdDecision>>,
    /// Wakes whoever applies thresholds when a decision arrives from the topic.
    pub thresholds_changed: tokio::sync::Notify,
}

impl Triage {
    pub fn new(settings: TriageSettings) -> Result<Self, TriageError> {
        Ok(Self {
            index: AlertIndex::new(settings.index_memory_bytes)?,
            settings,
            publisher: Mutex::new(None),
            thresholds: Mutex::new(HashMap::new()),
            thresholds_changed: tokio::sync::Notify::new(),
        })
    }

    pub(crate) fn connect(&self, publisher: Option<VerdictPublisher>) {
        *self
            .publisher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = publisher;
    }

    fn publisher(&self) -> Result<VerdictPublisher, TriageError> {
        self.publisher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(TriageError::NotConnected)
    }

    /// Publishes `verdict` and, once the broker has it, records it here (the other instances
    /// read it from the topic).
    pub async fn decide(
        self: Arc<Self>,
        verdict: VerdictRecord,
    ) -> Result<VerdictRecord, TriageError> {
        let publisher = self.publisher()?;
        publisher.publish(&verdict).await?;
        // On a blocking thread: the index's lock may be held by a search for a while.
        tokio::task::spawn_blocking(move || {
            self.index.set_verdict(&verdict)?;
            Ok(verdict)
        })
        .await
        .map_err(|e| TriageError::Publish(e.to_string()))?
    }

    /// Publishes a threshold decision (or, with `None`, withdraws the one under `key`) and, once
    /// the broker has it, records it here.
    pub async fn decide_threshold(
        &self,
        key: &str,
        decision: Option<ThresholdDecision>,
    ) -> Result<(), TriageError> {
        let publisher = self.publisher()?;
        let payload = decision
            .as_ref()
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| TriageError::NotAVerdict(e.to_string()))?;
        publisher.publish_record(key, payload.as_deref()).await?;
        self.record_threshold(key, decision);
        Ok(())
    }

    /// Records a threshold decision read from the topic (`None`: withdrawn).
    pub(crate) fn record_threshold(&self, key: &str, decision: Option<ThresholdDecision>) {
        let mut thresholds = self
            .thresholds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match decision {
            Some(d) => thresholds.insert(key.to_string(), d),
            None => thresholds.remove(key),
        };
    }

    /// The decision in force for `model` of `model_version`, if any.
    pub fn threshold_decision(
        &self,
        model_version: &str,
        model: &str,
    ) -> Option<ThresholdDecision> {
        self.thresholds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&ThresholdDecision::key(model_version, model))
            .cloned()
    }
}

/// Analysts' verdicts as labels for backtests and replays, by transaction id: the latest verdict
/// on an alert of the transaction (`fraud` a positive, `legitimate` a negative); `needs_review`
/// and events without a verdict are left unlabelled. Built from the feedback topic
/// ([`follow::read_verdicts`]) or from a file of the same records, one JSON object a line
/// ([`VerdictLabels::read_file`]): the same verdicts give the same labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VerdictLabels {
    by_transaction: HashMap<String, Verdict>,
}

impl VerdictLabels {
    /// From the latest record per alert id (`None`: a tombstone, the verdict withdrawn).
    pub fn from_latest(by_alert: HashMap<String, Option<VerdictRecord>>) -> Self {
        let mut latest: HashMap<String, VerdictRecord> = HashMap::new();
        for record in by_alert.into_values().flatten() {
            match latest.get(&record.transaction_id) {
                Some(seen) if seen.decided_at > record.decided_at => {}
                _ => {
                    latest.insert(record.transaction_id.clone(), record);
                }
            }
        }
        Self {
            by_transaction: latest.into_iter().map(|(tx, r)| (tx, r.verdict)).collect(),
        }
    }

    /// Records in the order they were published (a later one on an alert replaces an earlier).
    pub fn from_records(records: impl IntoIterator<Item = VerdictRecord>) -> Self {
        Self::from_latest(
            records
                .into_iter()
                .map(|r| (r.alert_id.clone(), Some(r)))
                .collect(),
        )
    }

    /// A file of verdict records, one JSON object a line, in the order they were given (blank
    /// lines skipped).
    pub fn read_file(path: &Path) -> Result<Self, TriageError> {
        let text = std::fs::read_to_string(path).map_err(|e| TriageError::File {
            path: path.to_path_buf(),
            line: 0,
            message: e.to_string(),
        })?;
        let mut records = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            records.push(serde_json::from_str(line).map_err(|e| TriageError::File {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })?);
        }
        Ok(Self::from_records(records))
    }

    /// The label of a transaction: `fraud`, `normal`, or none.
    pub fn label_of(&self, transaction_id: &str) -> Option<&'static str> {
        self.by_transaction.get(transaction_id)?.label()
    }

    /// Transactions with a verdict (needs_review included).
    pub fn len(&self) -> usize {
        self.by_transaction.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_transaction.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn alert(
        id: &str,
        account: &str,
        time: &str,
        severity: &str,
        margin: f64,
        reason: &str,
    ) -> serde_json::Value {
        json!({
            "alert_id": id,
            "transaction_id": format!("T-{id}"),
            "account_id": account,
            "event_time": time,
            "severity": severity,
            "margin": margin,
            "reason": reason,
            "top_features": [{"feature": "amount_vs_habit"}, {"feature": "new_device"}],
            "transaction": {"TransactionAmount": 10.0},
        })
    }

    fn verdict(id: &str, v: Verdict) -> VerdictRecord {
        VerdictRecord {
            alert_id: id.into(),
            transaction_id: format!("T-{id}"),
            account_id: "AC1".into(),
            verdict: v,
            note: "checked".into(),
            analyst: Some("ana".into()),
            decided_at: "2026-12-07T00:00:00Z".into(),
            model_version: "v1".into(),
        }
    }

    fn index() -> AlertIndex {
        let index = AlertIndex::new(1 << 20).unwrap();
        index
            .add(
                &alert(
                    "a1",
                    "AC1",
                    "2024-01-01 10:00:00",
                    "high",
                    1.5,
                    "amount 9,800.00 is 14× this account's usual 710.14",
                ),
                1_000,
            )
            .unwrap();
        index
            .add(
                &alert(
                    "a2",
                    "AC2",
                    "2024-01-02 10:00:00",
                    "low",
                    0.1,
                    "new device D1, first seen on this account",
                ),
                2_000,
            )
            .unwrap();
        index
            .add(
                &alert(
                    "a3",
                    "AC1",
                    "2024-01-03 10:00:00",
                    "medium",
                    0.5,
                    "5 payments in the last 2 minutes",
                ),
                3_000,
            )
            .unwrap();
        index
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.alerts
            .iter()
            .map(|a| a.alert["alert_id"].as_str().unwrap())
            .collect()
    }

    fn query() -> AlertQuery {
        AlertQuery {
            limit: 50,
            ..AlertQuery::default()
        }
    }

    #[test]
    fn every_filter_narrows_the_search_and_results_come_newest_first() {
        let index = index();
        assert_eq!(ids(&index.search(&query()).unwrap()), ["a3", "a2", "a1"]);
        let by = |q: AlertQuery| {
            ids(&index.search(&q).unwrap())
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            by(AlertQuery {
                account: Some("AC1".into()),
                ..query()
            }),
            ["a3", "a1"]
        );
        let t = |s: &str| crate::decode::parse_time(s).unwrap();
        assert_eq!(
            by(AlertQuery {
                from: Some(t("2024-01-02 00:00:00")),
                to: Some(t("2024-01-03 10:00:00")),
                ..query()
            }),
            ["a2"]
        );
        assert_eq!(
            by(AlertQuery {
                min_margin: Some(0.5),
                ..query()
            }),
            ["a3", "a1"]
        );
        assert_eq!(
            by(AlertQuery {
                severity: Some("high".into()),
                ..query()
            }),
            ["a1"]
        );
        assert_eq!(
            by(AlertQuery {
                reason: Some("NEW DEVICE".into()),
                ..query()
            }),
            ["a2"]
        );
        // A feature name matches the alert's top features, whole.
        assert_eq!(
            by(AlertQuery {
                reason: Some("amount_vs_habit".into()),
                ..query()
            })
            .len(),
            3
        );
        assert!(
            by(AlertQuery {
                reason: Some("amount_vs".into()),
                ..query()
            })
            .is_empty()
        );
        // LIKE's wildcards in the query are taken literally.
        assert!(
            by(AlertQuery {
                reason: Some("%".into()),
                ..query()
            })
            .is_empty()
        );
    }

    #[test]
    fn verdicts_join_their_alerts_and_filter_by_review_status() {
        let index = index();
        index.set_verdict(&verdict("a1", Verdict::Fraud)).unwrap();
        index
            .set_verdict(&verdict("a2", Verdict::NeedsReview))
            .unwrap();
        // A later verdict replaces the earlier one.
        index
            .set_verdict(&verdict("a2", Verdict::Legitimate))
            .unwrap();
        let status = |s: &str| {
            ids(&index
                .search(&AlertQuery {
                    status: Status::parse(s),
                    ..query()
                })
                .unwrap())
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
        };
        assert_eq!(status("fraud"), ["a1"]);
        assert_eq!(status("legitimate"), ["a2"]);
        assert!(status("needs_review").is_empty());
        assert_eq!(status("unreviewed"), ["a3"]);
        let one = index.get("a1").unwrap().unwrap();
        assert_eq!(one.verdict.unwrap().verdict, Verdict::Fraud);
        index.clear_verdict("a1").unwrap();
        assert!(index.get("a1").unwrap().unwrap().verdict.is_none());
        assert!(index.get("nope").unwrap().is_none());
    }

    #[test]
    fn pages_split_the_matches_and_the_total_counts_them_all() {
        let index = index();
        let page = index
            .search(&AlertQuery {
                limit: 2,
                offset: 0,
                ..query()
            })
            .unwrap();
        assert_eq!((page.total, ids(&page)), (3, vec!["a3", "a2"]));
        let page = index
            .search(&AlertQuery {
                limit: 2,
                offset: 2,
                ..query()
            })
            .unwrap();
        assert_eq!((page.total, ids(&page)), (3, vec!["a1"]));
    }

    #[test]
    fn alerts_leave_the_window_by_publication_time_and_their_verdicts_stay() {
        let index = index();
        index.set_verdict(&verdict("a1", Verdict::Fraud)).unwrap();
        assert_eq!(index.forget_before(2_500).unwrap(), 2);
        assert_eq!(index.len().unwrap(), 1);
        assert_eq!(
            index.verdict("a1").unwrap().unwrap().verdict,
            Verdict::Fraud
        );
        assert_eq!(index.verdicts().unwrap().len(), 1);
    }

    #[test]
    fn a_redelivered_alert_replaces_itself_and_an_incomplete_one_is_refused() {
        let index = index();
        index
            .add(
                &alert("a1", "AC1", "2024-01-01 10:00:00", "high", 2.0, "again"),
                1_500,
            )
            .unwrap();
        assert_eq!(index.len().unwrap(), 3);
        let mut broken = alert("a9", "AC1", "2024-01-01 10:00:00", "high", 2.0, "x");
        broken.as_object_mut().unwrap().remove("account_id");
        assert!(matches!(
            index.add(&broken, 1),
            Err(TriageError::Incomplete("account_id"))
        ));
    }

    #[test]
    fn alerts_added_in_one_transaction_are_all_indexed_but_the_incomplete_one() {
        let index = AlertIndex::new(1 << 20).unwrap();
        let mut broken = alert("b2", "AC2", "2024-01-01 10:00:00", "high", 2.0, "x");
        broken.as_object_mut().unwrap().remove("event_time");
        let batch = [
            alert("b1", "AC1", "2024-01-01 10:00:00", "high", 2.0, "first"),
            broken,
            alert("b3", "AC3", "2024-01-02 10:00:00", "low", 0.5, "third"),
        ];
        let skipped = index.add_all(batch.iter().zip([1, 2, 3])).unwrap();
        assert!(
            matches!(skipped[..], [TriageError::Incomplete("event_time")]),
            "{skipped:?}"
        );
        assert_eq!(index.len().unwrap(), 2);
        assert!(index.get("b1").unwrap().is_some() && index.get("b3").unwrap().is_some());
        assert!(index.get("b2").unwrap().is_none());
    }

    #[test]
    fn an_index_larger_than_its_memory_spills_to_its_file_and_finds_every_alert() {
        let index = AlertIndex::new(64 << 10).unwrap();
        let filler = "x".repeat(400);
        for i in 0..2_000 {
            let time = format!(
                "2024-01-{:02} {:02}:{:02}:00",
                1 + i / 1440,
                i / 60 % 24,
                i % 60
            );
            let account = format!("AC{}", i % 10);
            let a = alert(&format!("a{i:04}"), &account, &time, "high", 1.0, &filler);
            index.add(&a, i64::from(i)).unwrap();
        }
        // Sixteen times the cache: most pages live only in the file.
        assert!(index.bytes().unwrap() > 16 * (64 << 10));
        assert_eq!(index.len().unwrap(), 2_000);
        let page = index
            .search(&AlertQuery {
                account: Some("AC3".into()),
                limit: 5,
                ..query()
            })
            .unwrap();
        assert_eq!(page.total, 200);
        assert_eq!(ids(&page), ["a1993", "a1983", "a1973", "a1963", "a1953"]);
        assert_eq!(
            index.get("a0007").unwrap().unwrap().alert["account_id"],
            "AC7"
        );
        // Alerts that leave the window give their pages back.
        let full = index.bytes().unwrap();
        assert_eq!(index.forget_before(1_500).unwrap(), 1_500);
        assert!(index.bytes().unwrap() < full / 2);
    }

    #[test]
    fn verdict_names_round_trip_and_map_to_backtest_labels() {
        for v in Verdict::ALL {
            assert_eq!(Verdict::parse(v.as_str()), Some(v));
            assert_eq!(serde_json::to_value(v).unwrap(), v.as_str());
        }
        assert_eq!(Verdict::Fraud.label(), Some("fraud"));
        assert_eq!(Verdict::Legitimate.label(), Some("normal"));
        assert_eq!(Verdict::NeedsReview.label(), None);
        assert_eq!(Status::parse("unreviewed"), Some(Status::Unreviewed));
        assert_eq!(Status::parse("maybe"), None);
    }

    #[test]
    fn labels_follow_the_latest_verdict_per_alert_and_leave_reviews_and_tombstones_unlabelled() {
        let mut later = verdict("a1", Verdict::Legitimate);
        later.decided_at = "2026-12-08T00:00:00Z".into();
        let labels = VerdictLabels::from_records([
            verdict("a1", Verdict::Fraud),
            later,
            verdict("a2", Verdict::Fraud),
            verdict("a3", Verdict::NeedsReview),
        ]);
        assert_eq!(labels.label_of("T-a1"), Some("normal"));
        assert_eq!(labels.label_of("T-a2"), Some("fraud"));
        assert_eq!(labels.label_of("T-a3"), None);
        assert_eq!(labels.label_of("T-none"), None);
        let withdrawn = VerdictLabels::from_latest(HashMap::from([
            ("a2".to_string(), None),
            ("a1".to_string(), Some(verdict("a1", Verdict::Fraud))),
        ]));
        assert_eq!(withdrawn.label_of("T-a2"), None);
        assert_eq!(withdrawn.len(), 1);
    }

    #[test]
    fn a_file_of_verdicts_reads_like_the_topic_and_a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("verdicts.jsonl");
        let lines: Vec<String> = [
            verdict("a1", Verdict::Fraud),
            verdict("a2", Verdict::Legitimate),
        ]
        .iter()
        .map(|v| serde_json::to_string(v).unwrap())
        .collect();
        std::fs::write(&path, format!("{}\n\n{}\n", lines[0], lines[1])).unwrap();
        let labels = VerdictLabels::read_file(&path).unwrap();
        assert_eq!(
            (labels.label_of("T-a1"), labels.label_of("T-a2")),
            (Some("fraud"), Some("normal"))
        );
        std::fs::write(&path, format!("{}\nnot json\n", lines[0])).unwrap();
        let e = VerdictLabels::read_file(&path).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
