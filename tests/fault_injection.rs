//! Fault injection with rdkafka's in-process `MockCluster`: what happens to offsets when the
//! broker refuses an outcome. (The real-broker suites are in `kafka_e2e.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::shared;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use vigil::config::Config;
use vigil::run::run_stream;
use vigil::train::{bundled_history, in_event_time_order};

fn committed(brokers: &str, group: &str, topic: &str) -> Offset {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    got.find_partition(topic, 0).unwrap().offset()
}

/// The group's committed offset of partition 0 of `tx`, polled until it is `want` or `limit`
/// passes; returns the last one seen.
async fn committed_becomes(brokers: &str, want: Offset, limit: Duration) -> Offset {
    let start = std::time::Instant::now();
    loop {
        let got = committed(brokers, "g", "tx");
        if got == want || start.elapsed() > limit {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A one-broker mock cluster with the three topics, and vigil's configuration for it (`extra`:
/// more `kafka` keys, YAML flow style, e.g. `broker_timeout_seconds: 3, `).
fn mock_cluster(extra: &str) -> (MockCluster<'static, DefaultProducerContext>, String, Config) {
    let mock = MockCluster::new(1).unwrap();
    for t in ["tx", "alerts", "dlq"] {
        mock.create_topic(t, 1, 1).unwrap();
    }
    let brokers = mock.bootstrap_servers();
    let cfg = Config::from_yaml(&format!(
        "kafka: {{brokers: '{brokers}', group_id: g, {extra}topics: {{transactions: tx, alerts: alerts, dead_letter: dlq}}}}\n"
    ))
    .unwrap();
    (mock, brokers, cfg)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_outcome_is_sent_again_until_the_broker_takes_it_and_nothing_past_it_is_committed()
 {
    let (mock, brokers, cfg) = mock_cluster("");

    // Offset 0 is malformed (its outcome must be published), then 30 valid events.
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    p.send(BaseRecord::to("tx").key("X").payload("{broken"))
        .unwrap();
    let events = in_event_time_order(bundled_history().unwrap().events);
    for tx in events.iter().take(30) {
        let body = serde_json::to_vec(tx).unwrap();
        p.send(
            BaseRecord::to("tx")
                .key(tx.account_id.as_str())
                .payload(&body),
        )
        .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();

    // Every produce request is refused until further notice: vigil neither exits (a restart
    // would meet the same refusal) nor commits past the refused outcome.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 1000],
    );
    let s = shared();
    let stop = CancellationToken::new();
    let run = {
        let (s, stop, brokers) = (s.clone(), stop.clone(), brokers.clone());
        tokio::spawn(async move { run_stream(&cfg, &brokers, s, stop).await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while s.metrics.publish_failures.get() < 2 {
        assert!(std::time::Instant::now() < deadline, "no refusal seen");
        assert!(!run.is_finished(), "vigil stopped on a refused outcome");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !run.is_finished(),
        "vigil keeps going while the broker refuses"
    );
    assert!(
        matches!(committed(&brokers, "g", "tx"), Offset::Invalid),
        "no offset may be committed past the refused outcome"
    );

    // The broker accepts again: the same process delivers it and commits everything.
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    let got = committed_becomes(&brokers, Offset::Offset(31), Duration::from_secs(60)).await;
    assert_eq!(got, Offset::Offset(31));
    assert_eq!(s.metrics.dead_letters.get(), 1);
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// Waits up to `limit` for `ready()` to be `want`; returns how long it took.
async fn until_ready_is(s: &vigil::run::Shared, want: bool, limit: Duration) -> Duration {
    let start = std::time::Instant::now();
    while s.status.ready() != want {
        assert!(
            start.elapsed() < limit,
            "ready() did not become {want} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_turns_false_while_the_broker_is_down_and_true_as_soon_as_it_is_back() {
    let (mock, brokers, cfg) = mock_cluster("broker_timeout_seconds: 3, ");
    let s = shared();
    let stop = CancellationToken::new();
    let run = {
        let (s, stop, brokers) = (s.clone(), stop.clone(), brokers.clone());
        tokio::spawn(async move { run_stream(&cfg, &brokers, s, stop).await })
    };
    until_ready_is(&s, true, Duration::from_secs(30)).await;

    mock.broker_down(1).unwrap();
    let down = until_ready_is(&s, false, Duration::from_secs(10)).await;
    assert!(!s.status.broker_reachable());
    mock.broker_up(1).unwrap();
    let back = until_ready_is(&s, true, Duration::from_secs(5)).await;
    assert!(
        down >= Duration::from_secs(2),
        "not ready only after the timeout, not at the first hiccup ({down:?})"
    );
    eprintln!("not ready {down:?} after the broker went down, ready {back:?} after it was back");

    stop.cancel();
    run.await.unwrap().unwrap();
}
