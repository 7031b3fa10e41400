//! The stream while the broker fails, against the project's real broker (`kafka/broker.sh`):
//! two vigil instances on a 6-partition topic, events arriving all along, the broker frozen
//! (SIGSTOP, its sockets open) for 30 s, then killed (SIGKILL) and restarted on its data. The
//! test supervises the instances as an orchestrator would: one that exits is started again.
//! Afterwards the alerts equal an offline scoring of the same events, nothing missing, nothing
//! extra; under exactly-once a `read_committed` reader sees each alert once.
//!
//! A test binary of its own: it stops the broker every suite shares, and cargo runs test
//! binaries one after another; its two tests take turns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::kafka::*;

static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn broker(action: &str) {
    let status = Command::new(common::repo().join("kafka/broker.sh"))
        .arg(action)
        .status()
        .unwrap();
    assert!(status.success(), "broker.sh {action}");
}

/// `/ready`'s status code from the vigil logging in `dir`, if it answers within 2 s.
async fn ready_status(dir: &Path, t: &Topics) -> Option<u16> {
    let addr = http_addr(dir, t)?;
    reqwest::Client::new()
        .get(format!("http://{addr}/ready"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

async fn frozen_then_crashed(name: &str, guarantee: &str) -> Option<(usize, usize)> {
    let _turn = BROKER.lock().await;
    let (brokers, t, work, models) = setup_with(name, 6).await?;
    let events = dataset_events();
    let third = events.len() / 3;
    produce_events(&brokers, &t.transactions, &events[..third]);

    let env = [
        ("VIGIL_KAFKA__CLIENT__SESSION_TIMEOUT_MS", "6000"),
        ("VIGIL_KAFKA__CLIENT__HEARTBEAT_INTERVAL_MS", "1000"),
        ("VIGIL_KAFKA__BROKER_TIMEOUT_SECONDS", "3"),
        ("VIGIL_KAFKA__GUARANTEE", guarantee),
    ];
    let model = work.path().join("model");
    let dirs = [work.path().join("a"), work.path().join("b")];
    let mut vigils = Vec::new();
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
        vigils.push(spawn_vigil(&brokers, &t, &model, dir, &env));
    }
    let mut restarts = 0;
    let mut supervise = |vigils: &mut Vec<Vigil>| {
        for (i, v) in vigils.iter_mut().enumerate() {
            if v.0.try_wait().unwrap().is_some() {
                restarts += 1;
                *v = spawn_vigil(&brokers, &t, &model, &dirs[i], &env);
            }
        }
    };
    let _first = after_first_commit(&brokers, &t);

    // The rest arrives slowly, over the faults: 20 events every 100 ms.
    let feeder = feed_in_chunks(
        &brokers,
        &t.transactions,
        events[third..].to_vec(),
        20,
        Duration::from_millis(100),
    );
    std::thread::sleep(Duration::from_secs(2));
    broker("freeze");
    let frozen = Instant::now();
    // Every second: `/ready`'s answer (`None`: none within 2 s, or the instance is gone).
    let mut readiness = Vec::new();
    while frozen.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(1));
        readiness.push(ready_status(&dirs[0], &t).await);
    }
    broker("thaw");
    std::thread::sleep(Duration::from_secs(3));
    supervise(&mut vigils);
    broker("crash");
    std::thread::sleep(Duration::from_secs(10));
    broker("restart");
    let lost = feeder.join().unwrap();
    // The oracle scores what the input topic holds: the crash can fail the feeder's queue, and
    // vigil is answerable for the events it was given.
    let fed = events_on_topic(&brokers, &t.transactions, &events);
    assert_eq!(
        fed.len() + lost,
        events.len(),
        "the input topic holds events the feeder lost"
    );
    let expected = offline_alerts(models, &fed);

    let c = after_first_commit(&brokers, &t);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        supervise(&mut vigils);
        let (committed, end) = committed_and_end(&c, &t);
        if committed == end && end as usize == fed.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{guarantee}: {committed} of {end} committed 4 minutes after the faults"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let alerts = read_all(&brokers, &t.alerts, expected.len(), Duration::from_secs(30));
    let live = alerts_by_transaction(&alerts);
    assert_alerts_match_offline(&live, &expected);
    assert_redeliveries_keep_their_alert_id(&live);
    assert!(
        readiness.contains(&Some(503)),
        "/ready never answered 503 while the broker was frozen: {readiness:?}"
    );
    eprintln!(
        "{guarantee}: {} alert records for {} alerted transactions; {restarts} instance restarts",
        alerts.len(),
        live.len()
    );
    for (v, dir) in vigils.iter_mut().zip(&dirs) {
        let stop = Command::new("kill")
            .args(["-TERM", &v.0.id().to_string()])
            .status()
            .unwrap();
        assert!(stop.success());
        // A stop takes under a second here; one still waiting on the broker after 60 s ends
        // itself (exit 1). Once in five runs, before that limit, one took over 60 s after the
        // broker's restart: the log's last lines say which step waited.
        let deadline = Instant::now() + Duration::from_secs(120);
        let asked = Instant::now();
        while v.0.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let lines = log_lines(dir, &t);
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
                panic!("{guarantee}: an instance did not exit within 120 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "{guarantee}: stopped {:.1} s after SIGTERM",
            asked.elapsed().as_secs_f64()
        );
    }
    Some((alerts.len(), live.len()))
}

#[tokio::test(flavor = "multi_thread")]
async fn at_least_once_the_broker_frozen_for_30_s_then_crashed_and_restarted_loses_no_alert_and_invents_none()
 {
    frozen_then_crashed("frozen-alo", "at_least_once").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_the_broker_frozen_for_30_s_then_crashed_and_restarted_shows_each_alert_once()
{
    if let Some((records, alerted)) = frozen_then_crashed("frozen-eos", "exactly_once").await {
        assert_eq!(records, alerted, "duplicates under exactly_once");
    }
}
