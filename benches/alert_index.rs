//! What analysts wait for when the triage index is larger than its memory.
//!
//!     cargo bench --bench alert_index
//!
//! Indexes the same alerts twice, with the whole index in its cache and with the default
//! `alerts.index_memory_mb` (64) over about four times as much data, and times the searches the
//! page makes: the newest page of everything (with the total), one account's alerts, and a
//! reason-word search (which reads every row's reason).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use vigil::triage::{AlertIndex, AlertQuery};

const ACCOUNTS: usize = 20_000;

/// 120,000 alerts when benchmarking; a few hundred when `cargo test` runs the routines once to
/// see that they work (filling the index is what takes the time).
fn alert_count() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        120_000
    } else {
        300
    }
}

/// An alert about the size the stream publishes (2 KB as JSON with its explanation).
fn alert(i: usize, of: usize) -> serde_json::Value {
    let day = 1 + i * 30 / of;
    let second = i % 86_400;
    let severity = ["low", "medium", "high"][i % 3];
    let reason = if i % 5 == 0 {
        "new device D0381, first seen on this account"
    } else {
        "amount 9,800.00 is 14× this account's usual 710.14"
    };
    json!({
        "alert_id": format!("{i:08x}-5d1c-4f0e-9a3b-{i:012x}"),
        "transaction_id": format!("TX{i:09}"),
        "account_id": format!("AC{:06}", i * 7919 % ACCOUNTS),
        "event_time": format!("2024-01-{day:02} {:02}:{:02}:{:02}", second / 3600, second / 60 % 60, second % 60),
        "severity": severity,
        "margin": (i % 100) as f64 / 50.0,
        "reason": reason,
        "top_features": [{"feature": "amount_vs_habit", "contribution": 0.41}, {"feature": "new_device", "contribution": 0.22}, {"feature": "hour_rarity", "contribution": 0.12}],
        "models": [{"model": "isolation_forest", "score": 0.61, "threshold": 0.55}, {"model": "lof", "score": 1.9, "threshold": 1.5}],
        "transaction": {"TransactionID": format!("TX{i:09}"), "AccountID": format!("AC{:06}", i * 7919 % ACCOUNTS), "TransactionAmount": 9800.0, "TransactionDate": "2024-01-01 10:00:00", "TransactionType": "Debit", "Location": "San Diego", "DeviceID": "D000381", "IP Address": "162.198.218.92", "MerchantID": "M015", "Channel": "Online", "CustomerAge": 44, "CustomerOccupation": "Engineer", "TransactionDuration": 31, "LoginAttempts": 1, "AccountBalance": 1203.5},
        "explanation": "x".repeat(1_000),
    })
}

fn searches(c: &mut Criterion) {
    let count = alert_count();
    let alerts: Vec<serde_json::Value> = (0..count).map(|i| alert(i, count)).collect();
    for (name, memory) in [
        ("all_in_memory", 4u64 << 30),
        ("64_mb_of_it_in_memory", 64 << 20),
    ] {
        let index = AlertIndex::new(memory).unwrap_or_else(|e| panic!("{e}"));
        // As the index is rebuilt at start: a thousand alerts a transaction.
        let (rebuilt, live) = alerts.split_at(count - count / 60);
        let filling = std::time::Instant::now();
        for (n, chunk) in rebuilt.chunks(1_000).enumerate() {
            let at = (n * 1_000) as i64;
            let batch = chunk.iter().enumerate().map(|(i, a)| (a, at + i as i64));
            let skipped = index.add_all(batch).unwrap_or_else(|e| panic!("{e}"));
            assert!(skipped.is_empty(), "{skipped:?}");
        }
        let filled = filling.elapsed();
        // Then as the stream publishes them, one at a time.
        let adding = std::time::Instant::now();
        for (i, a) in live.iter().enumerate() {
            let at = (rebuilt.len() + i) as i64;
            index.add(a, at).unwrap_or_else(|e| panic!("{e}"));
        }
        let added = adding.elapsed();
        let bytes = index.bytes().unwrap_or_default();
        eprintln!(
            "{name}: {count} alerts, {} MB; {} rebuilt in {:.1} s ({:.0}/s), then {} one at a time in {:.1} s ({:.0} µs each)",
            bytes >> 20,
            rebuilt.len(),
            filled.as_secs_f64(),
            rebuilt.len() as f64 / filled.as_secs_f64(),
            live.len(),
            added.as_secs_f64(),
            added.as_secs_f64() * 1e6 / live.len().max(1) as f64
        );
        let mut g = c.benchmark_group(format!("alert_index_{name}"));
        let newest = AlertQuery {
            limit: 50,
            ..AlertQuery::default()
        };
        g.bench_function("newest_page_and_total", |b| {
            b.iter(|| black_box(index.search(&newest)))
        });
        let mut n = 0usize;
        g.bench_function("one_account", |b| {
            b.iter(|| {
                n += 1;
                let q = AlertQuery {
                    account: Some(format!("AC{:06}", n * 31 % ACCOUNTS)),
                    limit: 50,
                    ..AlertQuery::default()
                };
                black_box(index.search(&q))
            })
        });
        let word = AlertQuery {
            reason: Some("device".into()),
            limit: 50,
            ..AlertQuery::default()
        };
        g.bench_function("reason_word", |b| b.iter(|| black_box(index.search(&word))));
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = searches
}
criterion_main!(benches);
