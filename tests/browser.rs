//! The web page in real headless Chromium (Debian's `chromium` + `chromium-driver`, driven over
//! WebDriver): check a transaction and read both models' decisions and the reasons; produce an
//! anomalous event to the real broker and watch it arrive in the live alerts view.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Process, eventually, free_port, saved_models, start_vigil, tool};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{Value, json};

/// A WebDriver session in a chromedriver of its own.
struct Browser {
    _driver: Process,
    base: String,
    http: reqwest::blocking::Client,
}

impl Browser {
    fn start(
        chromedriver: &std::path::Path,
        chromium: &std::path::Path,
        profile: &std::path::Path,
    ) -> Self {
        let port = free_port();
        let driver = Process(
            std::process::Command::new(chromedriver)
                .arg(format!("--port={port}"))
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let root = format!("http://127.0.0.1:{port}");
        eventually("chromedriver", Duration::from_secs(30), || {
            http.get(format!("{root}/status"))
                .send()
                .ok()?
                .status()
                .is_success()
                .then_some(())
        });
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1300,1000",
                    format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let session: Value = http
            .post(format!("{root}/session"))
            .json(&caps)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let id = session["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("{session}"))
            .to_string();
        Self {
            _driver: driver,
            base: format!("{root}/session/{id}"),
            http,
        }
    }

    fn post(&self, path: &str, body: Value) -> Value {
        let v: Value = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert!(v["value"]["error"].is_null(), "{path}: {v}");
        v["value"].clone()
    }

    fn script(&self, js: &str) -> Value {
        self.post("/execute/sync", json!({"script": js, "args": []}))
    }

    fn click(&self, css: &str) {
        let e = self.post("/element", json!({"using": "css selector", "value": css}));
        let id = e
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap()
            .to_string();
        self.post(&format!("/element/{id}/click"), json!({}));
    }

    fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine as _;
        let v: Value = self
            .http
            .get(format!("{}/screenshot", self.base))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(v["value"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Console messages at warning level or above.
    fn console_problems(&self) -> Vec<String> {
        let v: Value = self
            .http
            .post(format!("{}/se/log", self.base))
            .json(&json!({"type": "browser"}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        v["value"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|m| matches!(m["level"].as_str(), Some("SEVERE" | "WARNING")))
                    .map(|m| m["message"].to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.http.delete(&self.base).send();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_checks_a_transaction_and_shows_an_anomalous_event_from_the_broker_live() {
    let (Some(chromedriver), Some(chromium)) = (tool("chromedriver"), tool("chromium")) else {
        return;
    };
    let Some(brokers) = common::test_brokers() else {
        return;
    };
    let p = format!("browser-{}", std::process::id());
    let (tx_topic, alerts, dlq) = (format!("{p}-tx"), format!("{p}-alerts"), format!("{p}-dlq"));
    let feedback = format!("{p}-feedback");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let topics: Vec<NewTopic> = [&tx_topic, &alerts, &dlq]
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    // VIGIL_SCREENSHOTS=docs keeps the screenshots (docs/page-*.png are made this way).
    let shots =
        std::env::var_os("VIGIL_SCREENSHOTS").map_or_else(|| dir.path().to_path_buf(), Into::into);
    let env = [
        ("VIGIL_KAFKA__BROKERS", brokers.as_str()),
        ("VIGIL_KAFKA__GROUP_ID", p.as_str()),
        ("VIGIL_KAFKA__TOPICS__TRANSACTIONS", tx_topic.as_str()),
        ("VIGIL_KAFKA__TOPICS__ALERTS", alerts.as_str()),
        ("VIGIL_KAFKA__TOPICS__DEAD_LETTER", dlq.as_str()),
        ("VIGIL_KAFKA__TOPICS__FEEDBACK", feedback.as_str()),
    ];
    // A challenger of another seed scores in shadow.
    let challenger = common::reseeded_models(7);
    let challenger_dir = dir.path().join("challenger");
    challenger.save(&challenger_dir).unwrap();
    let models_dir = dir.path().join("current");
    // Its own copy of the champion: the promotion below writes there.
    std::fs::create_dir_all(&models_dir).unwrap();
    for file in std::fs::read_dir(saved_models()).unwrap() {
        let file = file.unwrap();
        std::fs::copy(file.path(), models_dir.join(file.file_name())).unwrap();
    }
    let shadow = format!("{p}-shadow");
    let env = [
        env.as_slice(),
        &[
            (
                "VIGIL_MODELS__CHALLENGER_DIR",
                challenger_dir.to_str().unwrap(),
            ),
            ("VIGIL_KAFKA__TOPICS__SHADOW", shadow.as_str()),
        ],
    ]
    .concat();
    let (_vigil, addr) =
        tokio::task::block_in_place(|| start_vigil(&models_dir, dir.path(), &["run"], &env));

    tokio::task::block_in_place(|| {
        let browser = Browser::start(&chromedriver, &chromium, &dir.path().join("profile"));
        browser.post("/url", json!({"url": format!("http://{addr}/")}));
        eventually("the stream to connect", Duration::from_secs(20), || {
            (browser.script("return document.getElementById('status').textContent") == "live")
                .then_some(())
        });

        // The form's sample transaction: both models' decisions, the consensus and the reasons.
        browser.click("#check-button");
        let result = eventually("a decision", Duration::from_secs(20), || {
            let r = browser.script("const c = document.getElementById('consensus'); return c ? document.getElementById('result').innerText : null");
            r.as_str().map(str::to_string)
        });
        for needed in [
            "isolation_forest",
            "lof",
            "threshold",
            "Consensus (all)",
            "Why",
        ] {
            assert!(result.contains(needed), "no {needed} in {result}");
        }
        let reasons = browser.script("return document.querySelectorAll('#reasons li').length");
        assert_eq!(reasons, 3);
        // It was the form's fields (a choice for each enumeration); the JSON is one click away
        // and says the same.
        let choices = browser.script(
            "return [...document.querySelectorAll('#tx-fields select')].map(s => s.dataset.field + ':' + s.options.length)",
        );
        assert_eq!(
            choices,
            json!(["TransactionType:2", "Channel:3", "CustomerOccupation:4"])
        );
        browser.script(
            "document.getElementById('f-tx-TransactionAmount').value = '12.5'; return null",
        );
        browser.click("#tx-view");
        let shown = browser.script(
            "const t = document.getElementById('tx'); return [t.hidden, JSON.parse(t.value).TransactionAmount, document.getElementById('tx-fields').hidden]",
        );
        assert_eq!(shown, json!([false, 12.5, true]));
        browser.click("#tx-view");
        browser.script(
            "document.getElementById('f-tx-TransactionAmount').value = '9800'; return null",
        );
        browser.screenshot(&shots.join("page-check.png"));

        // An anomalous event through the real broker appears in the live view.
        let event = json!({"TransactionID": "TXBROWSER01", "AccountID": "AC00128", "TransactionAmount": 9800.0,
            "TransactionDate": "2024-01-10 03:12:44", "TransactionType": "Debit", "Location": "Houston",
            "DeviceID": "D999999", "IP Address": "203.0.113.7", "MerchantID": "M042", "Channel": "Online",
            "CustomerAge": 70, "CustomerOccupation": "Doctor", "TransactionDuration": 1900, "LoginAttempts": 5,
            "AccountBalance": 10200.0});
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        let payload = event.to_string();
        producer
            .send(BaseRecord::to(&tx_topic).key("AC00128").payload(&payload))
            .map_err(|(e, _)| e)
            .unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
        eventually(
            "the alert in the live view",
            Duration::from_secs(60),
            || {
                let found = browser.script(
                    "return !!document.querySelector('tr[data-transaction=\"TXBROWSER01\"]')",
                );
                (found == true).then_some(())
            },
        );
        browser.screenshot(&shots.join("page-live-alert.png"));

        // Triage: filter the index by the account, open the alert, see both models against
        // their thresholds and the account's timeline, and mark it fraud with a note.
        browser.script("document.getElementById('f-account').value = 'AC00128'; return null");
        eventually(
            "the alert in the triage list",
            Duration::from_secs(60),
            || {
                browser.click("#triage-search");
                std::thread::sleep(Duration::from_millis(300));
                let rows = browser
                    .script("return document.querySelectorAll('#triage-list tbody tr').length");
                (rows.as_u64() == Some(1)).then_some(())
            },
        );
        browser.click("#triage-list tbody tr");
        eventually(
            "the alert's detail and timeline",
            Duration::from_secs(20),
            || {
                let ready = browser.script(
                "return document.querySelectorAll('#detail-models tr[data-model]').length === 2 \
                 && !!document.getElementById('timeline-current') \
                 && document.querySelectorAll('#timeline polyline').length === 2",
            );
                (ready == true).then_some(())
            },
        );
        let detail = browser
            .script("return document.getElementById('alert-detail').innerText")
            .as_str()
            .unwrap()
            .to_string();
        for needed in [
            "isolation_forest",
            "lof",
            "threshold",
            "TXBROWSER01",
            "Not reviewed yet",
        ] {
            assert!(detail.contains(needed), "no {needed} in {detail}");
        }
        browser.click("#verdict-fraud");
        browser.script(
            "document.getElementById('verdict-note').value = 'called the customer: not them'; \
            document.getElementById('verdict-analyst').value = 'ana'; return null",
        );
        browser.click("#verdict-submit");
        eventually("the verdict recorded", Duration::from_secs(20), || {
            let said = browser.script("return document.getElementById('detail-verdict').innerText");
            said.as_str()
                .is_some_and(|t| t.contains("fraud") && t.contains("called the customer"))
                .then_some(())
        });
        // The verdict measures the model: one judged alert, all fraud.
        browser.click("#calibrate-button");
        let summary = eventually("the calibration", Duration::from_secs(20), || {
            let t = browser.script("const e = document.getElementById('calibration-summary'); return e ? e.innerText : null");
            t.as_str().map(str::to_string)
        });
        assert!(
            summary.contains("1 judged (1 fraud, 0 legitimate"),
            "{summary}"
        );
        // A budget of one alert a day keeps the one alert: the threshold serving now, so there
        // is nothing to apply (PUT/DELETE /models/{name}/threshold are tested in kafka_e2e).
        browser.script("document.getElementById('c-budget').value = '1'; return null");
        browser.click("#calibrate-button");
        let suggestion = eventually("a suggested threshold", Duration::from_secs(20), || {
            let t = browser.script("const e = document.getElementById('calibration-suggestion'); return e ? e.innerText : null");
            t.as_str().map(str::to_string)
        });
        assert!(suggestion.contains("would keep 1 alerts"), "{suggestion}");
        assert_eq!(
            browser.script("return !!document.getElementById('threshold-apply')"),
            false
        );
        browser.script("document.getElementById('triage').scrollIntoView(); return null");
        browser.screenshot(&shots.join("page-triage.png"));
        let http = reqwest::blocking::Client::new();
        let judged: Value = http
            .get(format!("http://{addr}/alerts?status=fraud"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(judged["total"], 1, "{judged}");
        assert_eq!(
            judged["alerts"][0]["alert"]["transaction_id"],
            "TXBROWSER01"
        );
        let on_topic = common::kafka::read_all(&brokers, &feedback, 1, Duration::from_secs(10));
        let record: Value =
            serde_json::from_slice(rdkafka::Message::payload(&on_topic[0]).unwrap()).unwrap();
        assert_eq!(record["verdict"], "fraud");
        assert_eq!(record["note"], "called the customer: not them");
        // An instance started afterwards — a second one, or this one after a restart — reads
        // the verdict from the topic.
        let later = tempfile::tempdir().unwrap();
        let (_second, second) = start_vigil(&models_dir, later.path(), &["run"], &env);
        let judged_id = judged["alerts"][0]["alert"]["alert_id"].as_str().unwrap();
        let seen = eventually(
            "the verdict on the second instance",
            Duration::from_secs(60),
            || {
                let v: Value = http
                    .get(format!("http://{second}/alerts?status=fraud"))
                    .send()
                    .ok()?
                    .json()
                    .ok()?;
                (v["total"] == 1).then_some(v)
            },
        );
        assert_eq!(seen["alerts"][0]["alert"]["alert_id"], judged_id);
        assert_eq!(
            seen["alerts"][0]["verdict"]["note"],
            "called the customer: not them"
        );

        // The challenger in shadow: how often it agrees, and one click (confirmed) promotes it.
        browser.script("loadModels(); return null");
        let agreement = eventually(
            "the challenger's agreement",
            Duration::from_secs(30),
            || {
                let t = browser.script("const e = document.getElementById('challenger-agreement'); return e ? e.innerText : null");
                t.as_str()
                    .filter(|t| t.starts_with("Agrees on"))
                    .map(str::to_string)
            },
        );
        assert!(agreement.contains("only the challenger"), "{agreement}");
        browser.script("document.getElementById('challenger').scrollIntoView(); return null");
        browser.screenshot(&shots.join("page-challenger.png"));
        browser.script("window.confirm = () => true; return null");
        browser.click("#challenger-promote");
        eventually(
            "the promoted version serving",
            Duration::from_secs(30),
            || {
                let t = browser.script("return document.getElementById('models').innerText");
                let shown = t.as_str().unwrap_or_default();
                (shown.contains(&format!("version {}", challenger.version()))
                    && browser.script("return !document.getElementById('challenger')") == true)
                    .then_some(())
            },
        );
        assert_eq!(
            vigil::models::ModelSet::version_in(&models_dir).as_deref(),
            Some(challenger.version())
        );

        // A phone-width screen: one column, nothing wider than the screen but the tables that
        // scroll inside their section.
        browser.post("/window/rect", json!({"width": 390, "height": 844}));
        let fits = browser.script(
            "return [document.documentElement.scrollWidth, window.innerWidth, \
             getComputedStyle(document.querySelector('main')).gridTemplateColumns.split(' ').length]",
        );
        let [page_width, screen_width, columns] =
            [0, 1, 2].map(|i| fits[i].as_u64().unwrap_or(u64::MAX));
        assert!(
            page_width <= screen_width,
            "the page is {page_width} px wide on {screen_width}"
        );
        assert_eq!(columns, 1, "{fits}");
        browser.screenshot(&shots.join("page-phone.png"));
        let problems = browser.console_problems();
        assert!(problems.is_empty(), "console: {problems:?}");
    });
}
