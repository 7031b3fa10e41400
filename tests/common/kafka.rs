//! The real-broker suites' helpers: topics, the `vigil` process, producing the dataset,
//! scoring it offline, reading topics and the group's offsets.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};
use vigil::config::{Encoding, LofIndexKind, Policy};
use vigil::decode::{Decoder, Transaction};
use vigil::models::{ModelSet, Scratch};
use vigil::pipeline::{Engine, Outcome};
use vigil::publish::SourceCoordinates;
use vigil::state::PartitionState;
use vigil::train::{bundled_history, in_event_time_order};

use super::{test_brokers, trained_models};

pub const PARTITIONS: i32 = 3;

pub struct Topics {
    pub transactions: String,
    pub alerts: String,
    pub dead_letter: String,
    pub group: String,
}

impl Topics {
    pub fn new(test: &str) -> Self {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = format!("e2e-{test}-{nonce}");
        Self {
            transactions: format!("{p}-tx"),
            alerts: format!("{p}-alerts"),
            dead_letter: format!("{p}-dlq"),
            group: format!("{p}-group"),
        }
    }

    pub async fn create(&self, brokers: &str) {
        self.create_with(brokers, PARTITIONS).await;
    }

    /// The topics, the input one with `partitions` partitions.
    pub async fn create_with(&self, brokers: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .unwrap();
        let topics = [
            NewTopic::new(&self.transactions, partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&self.alerts, 1, TopicReplication::Fixed(1)),
            NewTopic::new(&self.dead_letter, 1, TopicReplication::Fixed(1)),
        ];
        for r in admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .unwrap()
        {
            r.unwrap();
        }
    }
}

/// The model both the live process and the offline scoring use, saved once to disk.
pub fn model_dir(dir: &Path) -> ModelSet {
    trained_models().save(dir).unwrap();
    ModelSet::load(dir, LofIndexKind::Kdtree).unwrap()
}

/// The vigil process; killed if a test fails before stopping it.
pub struct Vigil(pub Child);

impl Drop for Vigil {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn_vigil(
    brokers: &str,
    t: &Topics,
    models: &Path,
    workdir: &Path,
    extra: &[(&str, &str)],
) -> Vigil {
    // Appended to: an instance started again in the same directory keeps its predecessor's lines.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(workdir.join(format!("vigil-{}.log", t.group)))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("run")
        .current_dir(workdir)
        .env("VIGIL_KAFKA__BROKERS", brokers)
        .env("VIGIL_KAFKA__GROUP_ID", &t.group)
        .env("VIGIL_KAFKA__TOPICS__TRANSACTIONS", &t.transactions)
        .env("VIGIL_KAFKA__TOPICS__ALERTS", &t.alerts)
        .env("VIGIL_KAFKA__TOPICS__DEAD_LETTER", &t.dead_letter)
        .env("VIGIL_MODELS__DIR", models)
        .env("VIGIL_SERVER__ADDR", "127.0.0.1:0")
        .env("VIGIL_LOG__FORMAT", "json")
        .envs(extra.iter().copied())
        .stdout(log)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Vigil(child)
}

pub fn sigterm(vigil: &mut Vigil) -> std::process::ExitStatus {
    let child = &mut vigil.0;
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "vigil did not exit within 60 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn producer(brokers: &str) -> BaseProducer {
    producer_config(brokers).create().unwrap()
}

fn producer_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5");
    config
}

pub fn produce<C: ProducerContext<DeliveryOpaque = ()>>(
    p: &BaseProducer<C>,
    topic: &str,
    key: &str,
    payload: &[u8],
) {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match p.send(record) {
            Ok(()) => return,
            Err((_, back)) => {
                record = back;
                p.poll(Duration::from_millis(10));
            }
        }
    }
}

/// The dataset in event-time order as JSON events, keyed by account.
pub fn dataset_events() -> Vec<Transaction> {
    in_event_time_order(bundled_history().unwrap().events)
}

/// Malformed events with the reason code each must be rejected for.
pub fn malformed_events() -> Vec<(String, Vec<u8>, &'static str)> {
    let good = serde_json::to_value(&dataset_events()[0]).unwrap();
    let account = good["AccountID"].as_str().unwrap().to_string();
    let with = |k: &str, v: serde_json::Value| {
        let mut x = good.clone();
        x.as_object_mut().unwrap().insert(k.into(), v);
        serde_json::to_vec(&x).unwrap()
    };
    let without = |k: &str| {
        let mut x = good.clone();
        x.as_object_mut().unwrap().remove(k);
        serde_json::to_vec(&x).unwrap()
    };
    vec![
        ("BAD1".into(), b"{not json".to_vec(), "malformed"),
        ("BAD2".into(), vec![0xff, 0xfe, 0x00, 0x01], "malformed"),
        ("BAD3".into(), without("AccountBalance"), "missing_field"),
        (
            "BAD4".into(),
            with("TransactionAmount", (-5.0).into()),
            "out_of_range",
        ),
        (
            "BAD5".into(),
            with("CustomerAge", 150.into()),
            "out_of_range",
        ),
        (
            "BAD6".into(),
            with("LoginAttempts", 11.into()),
            "out_of_range",
        ),
        (
            "BAD7".into(),
            with("Channel", "Carrier pigeon".into()),
            "not_allowed",
        ),
        (
            "BAD8".into(),
            with("TransactionDate", "31/12/2023".into()),
            "bad_timestamp",
        ),
        ("BAD9".into(), with("AccountID", "".into()), "empty_field"),
        ("BAD10".into(), Vec::new(), "malformed"),
        // Keyed by a real account, so a dragged clock or a state fed a date from another era
        // would show in the scores the test compares with offline scoring.
        (
            account.clone(),
            with("TransactionDate", "9999-12-31 23:59:59".into()),
            "implausible_time",
        ),
        (
            account,
            with("TransactionDate", "0000-01-01 00:00:00".into()),
            "implausible_time",
        ),
    ]
}

/// Offline: the same events in the same per-account order through the same engine.
/// Returns transaction id -> (forest score, LOF score) of every alert.
pub fn offline_alerts(models: ModelSet, events: &[Transaction]) -> BTreeMap<String, (f64, f64)> {
    let engine = Engine::new(
        Arc::new(models),
        Decoder::new(Encoding::Json),
        Policy::All,
        3,
    );
    let mut state = PartitionState::default();
    let mut scratch = Scratch::default();
    let mut out = BTreeMap::new();
    for (i, tx) in events.iter().enumerate() {
        let source = SourceCoordinates {
            topic: "offline".into(),
            partition: 0,
            offset: i as i64,
            published_at: None,
        };
        let payload = serde_json::to_vec(tx).unwrap();
        if let Outcome::Alert(a, s) = engine.process(&mut state, &source, &payload, &mut scratch) {
            out.insert(
                a.transaction_id.clone(),
                (s.verdicts[0].score, s.verdicts[1].score),
            );
        }
    }
    out
}

pub fn read_all(
    brokers: &str,
    topic: &str,
    want: usize,
    timeout: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}"))
        .set("enable.auto.commit", "false")
        // What an alert consumer sees: never records of an aborted or open transaction.
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push(m.detach());
        } else if out.len() >= want {
            break;
        }
    }
    out
}

/// Waits until the group has committed every partition's end offset.
pub fn wait_all_committed(brokers: &str, t: &Topics, vigil: &mut Vigil, timeout: Duration) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", &t.group)
        .create()
        .unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        let (committed, end) = committed_and_end(&c, t);
        if committed == end {
            return committed;
        }
        assert!(
            Instant::now() < deadline,
            "group committed {committed} of {end} offsets in {timeout:?}"
        );
        if let Some(status) = vigil.0.try_wait().unwrap() {
            panic!("vigil exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn committed_and_end(c: &BaseConsumer, t: &Topics) -> (i64, i64) {
    let partitions = c
        .fetch_metadata(Some(&t.transactions), Duration::from_secs(10))
        .map(|m| m.topics()[0].partitions().len() as i32)
        .unwrap_or(PARTITIONS);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(&t.transactions, p);
    }
    // A just-started broker answers NotCoordinator while it loads the offsets topic: retry.
    let mut attempts = 0;
    let committed = loop {
        match c.committed_offsets(tpl.clone(), Duration::from_secs(5)) {
            Ok(committed) => break committed,
            Err(e) if attempts < 40 => {
                attempts += 1;
                eprintln!("committed offsets not available yet ({e}); retrying");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => panic!("committed offsets: {e}"),
        }
    };
    let mut sum_committed = 0;
    let mut sum_end = 0;
    for p in 0..partitions {
        if let Some(Offset::Offset(o)) = committed
            .find_partition(&t.transactions, p)
            .map(|e| e.offset())
        {
            sum_committed += o;
        }
        let (_, high) = c
            .fetch_watermarks(&t.transactions, p, Duration::from_secs(5))
            .unwrap();
        sum_end += high;
    }
    (sum_committed, sum_end)
}

pub fn alerts_by_transaction(
    msgs: &[rdkafka::message::OwnedMessage],
) -> BTreeMap<String, Vec<serde_json::Value>> {
    let mut out: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for m in msgs {
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let id = v["transaction_id"].as_str().unwrap().to_string();
        assert_eq!(
            m.key(),
            v["account_id"].as_str().map(str::as_bytes),
            "alerts are keyed by account"
        );
        out.entry(id).or_default().push(v);
    }
    out
}

pub fn assert_alerts_match_offline(
    live: &BTreeMap<String, Vec<serde_json::Value>>,
    expected: &BTreeMap<String, (f64, f64)>,
) {
    let live_ids: BTreeSet<&String> = live.keys().collect();
    let want_ids: BTreeSet<&String> = expected.keys().collect();
    assert_eq!(
        live_ids, want_ids,
        "alerted transactions differ from offline scoring"
    );
    for (id, alerts) in live {
        let (forest, lof) = expected[id];
        for a in alerts {
            assert_eq!(a["models"][0]["model"], "isolation_forest");
            assert_eq!(a["models"][0]["score"].as_f64(), Some(forest), "{id}");
            assert_eq!(a["models"][1]["score"].as_f64(), Some(lof), "{id}");
            assert_eq!(a["policy"], "all");
            assert!(
                a["models"][0]["flagged"].as_bool().unwrap()
                    && a["models"][1]["flagged"].as_bool().unwrap()
            );
            assert!(!a["reason"].as_str().unwrap().is_empty());
            assert_eq!(
                a["transaction"]["TransactionID"].as_str(),
                Some(id.as_str())
            );
        }
    }
}

/// Produces `events` keyed by account and waits for the broker's acknowledgements.
pub fn produce_events(brokers: &str, topic: &str, events: &[Transaction]) {
    let p = producer(brokers);
    for tx in events {
        produce(&p, topic, &tx.account_id, &serde_json::to_vec(tx).unwrap());
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// Produces `events` in small batches from another thread, as traffic arriving mid-run.
pub fn feed_while_running(
    brokers: &str,
    topic: &str,
    events: Vec<Transaction>,
) -> std::thread::JoinHandle<()> {
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    std::thread::spawn(move || {
        let p = producer(&brokers);
        for (i, tx) in events.iter().enumerate() {
            produce(&p, &topic, &tx.account_id, &serde_json::to_vec(tx).unwrap());
            if i % 50 == 0 {
                p.flush(Duration::from_secs(10)).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        p.flush(Duration::from_secs(30)).unwrap();
    })
}

/// Produces `events` from another thread, `chunk` of them every `every`: traffic that keeps
/// arriving over a fault. The thread ends once every delivery is settled and returns how many
/// the broker refused for good: a broker crashed under an idempotent producer can fail its queue
/// (which events the topic then holds, [`events_on_topic`] tells).
pub fn feed_in_chunks(
    brokers: &str,
    topic: &str,
    events: Vec<Transaction>,
    chunk: usize,
    every: Duration,
) -> std::thread::JoinHandle<usize> {
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    std::thread::spawn(move || {
        let p: BaseProducer<CountedDeliveries> = producer_config(&brokers)
            .create_with_context(CountedDeliveries::default())
            .unwrap();
        for part in events.chunks(chunk) {
            for tx in part {
                produce(&p, &topic, &tx.account_id, &serde_json::to_vec(tx).unwrap());
            }
            std::thread::sleep(every);
        }
        p.flush(Duration::from_secs(300)).unwrap();
        let failed = p.context().failed.load(Ordering::Relaxed);
        if failed > 0 {
            let first = p.context().first_error.lock().unwrap().clone();
            eprintln!(
                "the feeder's producer lost {failed} of {} events; the first: {first:?}",
                events.len()
            );
        }
        failed
    })
}

/// A producer's context that counts the deliveries the broker refused for good.
#[derive(Default)]
struct CountedDeliveries {
    failed: AtomicUsize,
    first_error: std::sync::Mutex<Option<String>>,
}

impl ClientContext for CountedDeliveries {}

impl ProducerContext for CountedDeliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.first_error
                .lock()
                .unwrap()
                .get_or_insert_with(|| e.to_string());
        }
    }
}

/// Those of `events` that `topic` holds, in their order in `events`; panics on one held twice.
pub fn events_on_topic(brokers: &str, topic: &str, events: &[Transaction]) -> Vec<Transaction> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut left = 0;
    for p in metadata.topics()[0].partitions() {
        let (low, high) = c
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        left += high - low;
        tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut held = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while left > 0 {
        assert!(
            Instant::now() < deadline,
            "{left} records of {topic} not read in 60 s"
        );
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            let tx: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            let id = tx["TransactionID"].as_str().unwrap().to_string();
            assert!(held.insert(id.clone()), "{topic} holds {id} twice");
            left -= 1;
        }
    }
    events
        .iter()
        .filter(|tx| held.contains(tx.transaction_id.as_str()))
        .cloned()
        .collect()
}

/// A reader of the group's committed offsets, once the group has committed something.
pub fn after_first_commit(brokers: &str, t: &Topics) -> BaseConsumer {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", &t.group)
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed_and_end(&reader, t).0 == 0 {
        assert!(Instant::now() < deadline, "nothing committed in 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    reader
}

/// Every copy of a transaction's alert has the same `alert_id`, so consumers can deduplicate.
pub fn assert_redeliveries_keep_their_alert_id(live: &BTreeMap<String, Vec<serde_json::Value>>) {
    for (id, copies) in live {
        let ids: BTreeSet<&str> = copies
            .iter()
            .map(|a| a["alert_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "a re-delivered alert for {id} keeps its alert_id"
        );
    }
}

/// Broker, fresh topics, a work directory and the saved model every test starts from.
pub async fn setup(name: &str) -> Option<(String, Topics, tempfile::TempDir, ModelSet)> {
    setup_with(name, PARTITIONS).await
}

/// [`setup`] with an input topic of `partitions` partitions.
pub async fn setup_with(
    name: &str,
    partitions: i32,
) -> Option<(String, Topics, tempfile::TempDir, ModelSet)> {
    let brokers = test_brokers()?;
    let t = Topics::new(name);
    t.create_with(&brokers, partitions).await;
    let work = tempfile::tempdir().unwrap();
    let models = model_dir(&work.path().join("model"));
    Some((brokers, t, work, models))
}

/// The HTTP address of the vigil spawned by [`spawn_vigil`] in `dir`, once it has logged it.
pub fn http_addr(dir: &Path, t: &Topics) -> Option<String> {
    log_lines(dir, t)
        .iter()
        .rfind(|l| l["message"] == "HTTP server listening")
        .and_then(|l| l["addr"].as_str().map(String::from))
}

/// Records on every partition of `topic` as a consumer with this `isolation.level` reads them.
pub fn records_read(brokers: &str, topic: &str, isolation: &str) -> usize {
    read_to_end(brokers, topic, isolation).len()
}

/// Every partition of `topic` to its end, as a consumer with this `isolation.level` reads it.
pub fn read_to_end(
    brokers: &str,
    topic: &str,
    isolation: &str,
) -> Vec<rdkafka::message::OwnedMessage> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("count-{topic}-{isolation}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    let metadata = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let (mut out, mut ended) = (Vec::new(), 0);
    while ended < partitions {
        match c.poll(Duration::from_secs(10)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => ended += 1,
            other => panic!("reading {topic}: {other:?}"),
        }
    }
    out
}

/// The Prometheus text of the vigil serving on `addr`.
pub async fn metrics_text(addr: &str) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `vigil_events_scored_total` of the vigil serving on `addr`.
pub async fn scored(addr: &str) -> u64 {
    metrics_text(addr)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("vigil_events_scored_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// The JSON log lines of a vigil spawned by [`spawn_vigil`] in `dir`.
pub fn log_lines(dir: &Path, t: &Topics) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(format!("vigil-{}.log", t.group)))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// vigil's configuration for the topics of `t`.
pub fn config_for(brokers: &str, t: &Topics) -> vigil::config::Config {
    vigil::config::Config::from_yaml(&format!(
        "kafka:\n  brokers: {brokers}\n  group_id: {}\n  topics:\n    transactions: {}\n    alerts: {}\n    dead_letter: {}\n",
        t.group, t.transactions, t.alerts, t.dead_letter
    ))
    .unwrap()
}

/// One setting of `topic` as the broker describes it.
pub async fn topic_setting(brokers: &str, topic: &str, key: &str) -> Option<String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let described = admin
        .describe_configs(
            &[rdkafka::admin::ResourceSpecifier::Topic(topic)],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    let config = described[0].as_ref().unwrap();
    config.get(key).and_then(|e| e.value.clone())
}
