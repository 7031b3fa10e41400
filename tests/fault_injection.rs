//! Fault injection with rdkafka's in-process `MockCluster`: what happens to offsets when the
//! broker refuses an outcome. (The real-broker suites are in `kafka_e2e.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::shared;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use vigil::config::Config;
use vigil::run::{RunError, run_stream};
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

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_outcome_stops_vigil_without_committing_its_offset_and_a_restart_delivers_it() {
    let mock = MockCluster::new(1).unwrap();
    for t in ["tx", "alerts", "dlq"] {
        mock.create_topic(t, 1, 1).unwrap();
    }
    let brokers = mock.bootstrap_servers();
    // A short session: the mock broker lets the restarted member in only after the first
    // member's session times out.
    let cfg = Config::from_yaml(&format!(
        "kafka: {{brokers: '{brokers}', group_id: g, topics: {{transactions: tx, alerts: alerts, dead_letter: dlq}}, client: {{session.timeout.ms: '6000', heartbeat.interval.ms: '1000'}}}}\n"
    ))
    .unwrap();

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
        p.send(BaseRecord::to("tx").key(&tx.account_id).payload(&body))
            .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();

    // Every produce request is refused from now on.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 64],
    );
    let first = shared();
    let run = run_stream(&cfg, &brokers, first.clone(), CancellationToken::new());
    let result = tokio::time::timeout(Duration::from_secs(60), run).await;
    assert!(
        matches!(result, Ok(Err(RunError::Publish(_)))),
        "vigil must stop on a refused outcome, got {result:?}"
    );
    assert_eq!(first.metrics.publish_failures.get(), 1);
    // The 30 clean events after it were processed, but nothing past the refused one is committed.
    assert!(
        matches!(committed(&brokers, "g", "tx"), Offset::Invalid),
        "no offset may be committed"
    );

    // The broker accepts again: a restart delivers the dead letter and commits everything.
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    let second = shared();
    let stop = CancellationToken::new();
    let watcher = {
        let (stop, brokers) = (stop.clone(), brokers.clone());
        tokio::spawn(async move {
            for _ in 0..600 {
                if committed(&brokers, "g", "tx") == Offset::Offset(31) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            stop.cancel();
        })
    };
    run_stream(&cfg, &brokers, second.clone(), stop)
        .await
        .unwrap();
    watcher.await.unwrap();
    assert_eq!(committed(&brokers, "g", "tx"), Offset::Offset(31));
    assert_eq!(second.metrics.dead_letters.get(), 1);
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
    let mock = MockCluster::new(1).unwrap();
    for t in ["tx", "alerts", "dlq"] {
        mock.create_topic(t, 1, 1).unwrap();
    }
    let brokers = mock.bootstrap_servers();
    let cfg = Config::from_yaml(&format!(
        "kafka: {{brokers: '{brokers}', group_id: g, broker_timeout_seconds: 3, topics: {{transactions: tx, alerts: alerts, dead_letter: dlq}}}}\n"
    ))
    .unwrap();
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
