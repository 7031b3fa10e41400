//! Backtests from files: determinism of the outputs, and the HTML report in a real headless
//! Chromium (Debian's `chromium`) with no console messages and no network requests.
//! The topic replay against a live instance is in `tests/kafka_e2e.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{repo, saved_models, tool};

fn vigil(args: &[&str], dir: &Path) -> String {
    common::vigil_command(args, dir, &[])
}

/// A labelled simulated file and a backtest of it with the shared test model.
fn backtest(dir: &Path, out: &str) {
    if !dir.join("sim.jsonl").exists() {
        vigil(
            &[
                "simulate",
                "--count",
                "3000",
                "--accounts",
                "100",
                "--anomaly-share",
                "0.05",
                "--malformed-share",
                "0.01",
                "--seed",
                "6",
                "--out",
                "sim.jsonl",
            ],
            dir,
        );
    }
    let models = saved_models();
    vigil(
        &[
            "replay",
            "--input",
            "sim.jsonl",
            "--model",
            models.to_str().unwrap(),
            "--out",
            out,
        ],
        dir,
    );
}

#[test]
fn replaying_the_same_file_twice_gives_identical_output_files() {
    let dir = tempfile::tempdir().unwrap();
    backtest(dir.path(), "first");
    backtest(dir.path(), "second");
    for file in ["events.csv", "report.json", "report.html"] {
        let a = std::fs::read(dir.path().join("first").join(file)).unwrap();
        let b = std::fs::read(dir.path().join("second").join(file)).unwrap();
        assert!(!a.is_empty(), "{file} is empty");
        assert!(a == b, "{file} differs between two replays");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("first/report.json")).unwrap())
            .unwrap();
    let m = &report["models"][0];
    assert_eq!(m["events"], 3000);
    assert!(
        m["invalid"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>()
            > 0
    );
    let labels = &m["labels"];
    for kind in [
        "account_takeover",
        "card_testing",
        "balance_drain",
        "odd_hours",
        "login_spike",
        "amount_spike",
    ] {
        assert!(
            labels["by_label"][kind]["events"].as_u64().unwrap() > 0,
            "no {kind} events"
        );
    }
    // The report's confusion matrix is the events file's, counted by hand.
    let mut rows = csv::Reader::from_path(dir.path().join("first/events.csv")).unwrap();
    let (mut tp, mut fp, mut fn_, mut tn) = (0, 0, 0, 0);
    for row in rows.deserialize::<std::collections::HashMap<String, String>>() {
        let row = row.unwrap();
        if row["outcome"].starts_with("invalid") || row["label"] == "malformed" {
            continue;
        }
        match (row["alert"] == "1", row["label"] != "normal") {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => tn += 1,
        }
    }
    let c = &labels["consensus"];
    assert_eq!(
        (
            c["tp"].as_u64(),
            c["fp"].as_u64(),
            c["fn"].as_u64(),
            c["tn"].as_u64()
        ),
        (Some(tp), Some(fp), Some(fn_), Some(tn))
    );
    let precision = tp as f64 / (tp + fp) as f64;
    assert_eq!(c["precision"].as_f64(), Some(precision));
}

#[test]
fn champion_and_challenger_are_scored_on_the_same_events_and_compared() {
    let dir = tempfile::tempdir().unwrap();
    vigil(
        &[
            "simulate",
            "--count",
            "1500",
            "--anomaly-share",
            "0.05",
            "--seed",
            "8",
            "--out",
            "sim.jsonl",
        ],
        dir.path(),
    );
    // A challenger with a different LOF neighbourhood.
    let challenger = dir.path().join("challenger");
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["train", "--out"])
        .arg(&challenger)
        .env("VIGIL_MODELS__LOF__NEIGHBORS", "35")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let champion = saved_models();
    vigil(
        &[
            "replay",
            "--input",
            "sim.jsonl",
            "--model",
            champion.to_str().unwrap(),
            "--model",
            challenger.to_str().unwrap(),
            "--out",
            "cc",
        ],
        dir.path(),
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cc/report.json")).unwrap()).unwrap();
    assert_eq!(report["models"].as_array().unwrap().len(), 2);
    let c = &report["comparisons"][0];
    assert_eq!(c["champion"], "current");
    assert_eq!(c["challenger"], "challenger");
    let a_alerts = report["models"][0]["alerts"].as_u64().unwrap();
    let b_alerts = report["models"][1]["alerts"].as_u64().unwrap();
    assert_eq!(
        c["both_alert"].as_u64().unwrap() + c["champion_only"].as_u64().unwrap(),
        a_alerts
    );
    assert_eq!(
        c["both_alert"].as_u64().unwrap() + c["challenger_only"].as_u64().unwrap(),
        b_alerts
    );
    assert!(c["better_on_labels"].is_string());
    let events = std::fs::read_to_string(dir.path().join("cc/events.csv")).unwrap();
    assert_eq!(
        events.lines().count(),
        1 + 2 * 1500,
        "one row per event and model"
    );
}

#[test]
fn a_csv_file_in_the_datasets_layout_replays_like_its_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let csv = repo().join("data/bank_transactions.csv");
    let models = saved_models();
    vigil(
        &[
            "replay",
            "--input",
            csv.to_str().unwrap(),
            "--model",
            models.to_str().unwrap(),
            "--out",
            "csv",
        ],
        dir.path(),
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("csv/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["models"][0]["events"], 2512);
    assert_eq!(report["models"][0]["valid"], 2512);
    assert!(
        report["models"][0]["labels"].is_null(),
        "the dataset has no labels"
    );
}

#[test]
fn the_html_report_opens_in_headless_chromium_without_console_messages_or_network() {
    let Some(chromium) = tool("chromium") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    backtest(dir.path(), "out");
    let page = dir.path().join("out/report.html");
    let netlog = dir.path().join("net.json");
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg(format!("--log-net-log={}", netlog.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(out.status.success());
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("Against the labels") && dom.contains("<svg"),
        "report did not render"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let console: Vec<&str> = stderr.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    // Every URL the browser fetched: only the page itself (and the browser's own services).
    let log = std::fs::read_to_string(&netlog).unwrap();
    let mut fetched = Vec::new();
    for part in log.split("\"url\":\"").skip(1) {
        let url = part.split('"').next().unwrap();
        let host = url
            .split("://")
            .nth(1)
            .and_then(|r| r.split(['/', ':', '?']).next())
            .unwrap_or("");
        let browser_own = host.ends_with("google.com")
            || host.ends_with("googleapis.com")
            || host.ends_with("gvt1.com");
        if !url.starts_with("file://") && !browser_own {
            fetched.push(url.to_string());
        }
    }
    assert!(fetched.is_empty(), "the report fetched {fetched:?}");
}
