//! The `vigil` command line. Everything real lives in the library; this file parses arguments,
//! loads the configuration, and calls it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use vigil::backtest::{self, Cut, Split};
use vigil::config::{Config, ModelConfig};
use vigil::decode::Decoder;
use vigil::demo::{DemoOptions, Embedded, run_demo, warm_up};
use vigil::models::ModelSet;
use vigil::replay::{Candidate, Input, Outputs, TopicRange, replay};
use vigil::run::{Shared, load_or_train, producer, run_stream, schema_registry};
use vigil::simulate::{Scenarios, Simulator, produce};
use vigil::train::{
    HistoryReader, PayloadFingerprint, Training, bundled_history, read_history, train_on,
};
use vigil::{server, telemetry};

/// Real-time anomaly detection for bank transactions on Kafka.
///
/// With no command, runs the demo: an embedded Kafka-protocol cluster, a simulator producing
/// realistic transactions with anomalies mixed in, the detector and its HTTP server.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Configuration file [default: ./config.yml if present, else built-in defaults].
    #[arg(long, short, global = true, env = "VIGIL_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Where analysts' verdicts come from when they label a replay or backtest.
#[derive(clap::Args)]
struct VerdictSource {
    /// Label the events by analysts' verdicts from a file of feedback records (JSON lines, as
    /// the feedback topic holds them) instead of their own labels.
    #[arg(long, value_name = "FILE", conflicts_with = "verdicts_topic")]
    verdicts: Option<PathBuf>,
    /// Label the events by the verdicts on the feedback topic [TOPIC default:
    /// kafka.topics.feedback]; needs kafka.brokers.
    #[arg(long, value_name = "TOPIC", num_args = 0..=1, default_missing_value = "")]
    verdicts_topic: Option<String>,
}

impl VerdictSource {
    fn read(self, cfg: &Config) -> Result<Option<vigil::triage::VerdictLabels>> {
        let labels = match (self.verdicts, self.verdicts_topic) {
            (Some(path), _) => vigil::triage::VerdictLabels::read_file(&path)?,
            (None, Some(topic)) => {
                let Some(brokers) = cfg.kafka.brokers.as_deref() else {
                    bail!(
                        "--verdicts-topic needs kafka.brokers (e.g. VIGIL_KAFKA__BROKERS=localhost:9092)"
                    );
                };
                let topic = if topic.is_empty() {
                    cfg.triage.feedback_topic.clone()
                } else {
                    topic
                };
                vigil::triage::read_verdicts(&cfg.kafka, brokers, &topic)?
            }
            (None, None) => return Ok(None),
        };
        println!(
            "labels: analysts' verdicts on {} transactions",
            labels.len()
        );
        Ok(Some(labels))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the stream processor (and the HTTP server) on `kafka.brokers` until SIGTERM or Ctrl-C.
    Run,
    /// Simulator + stream processor + server; an embedded cluster unless brokers are configured.
    Demo {
        /// Events per second the simulator produces.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Share of simulated events that are anomalies.
        #[arg(long, default_value_t = 0.01)]
        anomaly_share: f64,
        /// Share of simulated events that are malformed (sent to the dead-letter topic).
        #[arg(long, default_value_t = 0.002)]
        malformed_share: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Events of simulated history written first: the state folds them in unscored and,
        /// unless models.dir holds a model, the models are trained on them (0: no history, the
        /// model of models.dir or one trained on the bundled dataset).
        #[arg(long, default_value_t = vigil::demo::HISTORY_EVENTS)]
        history: usize,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Train models from history and write a model directory.
    Train {
        /// Events as CSV (the dataset's header) or JSON lines [default: the bundled dataset].
        #[arg(long, conflicts_with = "topic")]
        input: Option<PathBuf>,
        /// Train on a range of this topic instead (needs kafka.brokers; encoding as configured).
        #[arg(long)]
        topic: Option<String>,
        /// Partitions of --topic, comma-separated [default: all].
        #[arg(long, value_delimiter = ',', requires = "topic")]
        partitions: Vec<i32>,
        /// First event of --topic: earliest, an offset or an RFC 3339 time.
        #[arg(long, default_value = "earliest")]
        from: String,
        /// End of --topic, exclusive: latest, an offset or an RFC 3339 time.
        #[arg(long, default_value = "latest")]
        to: String,
        /// Output directory [default: models.dir from the configuration].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Replay recorded events (a topic range or a file) through the models: per-event scores,
    /// a JSON and an HTML report; with two models, champion (first) against challenger.
    Replay {
        /// A CSV, JSON-lines or Avro file to replay instead of a topic.
        #[arg(long, conflicts_with_all = ["topic", "partitions", "from", "to"])]
        input: Option<PathBuf>,
        /// Topic to replay [default: kafka.topics.transactions]; needs kafka.brokers.
        #[arg(long)]
        topic: Option<String>,
        /// Partitions, comma-separated [default: all].
        #[arg(long, value_delimiter = ',')]
        partitions: Vec<i32>,
        /// First event: earliest, latest, an offset, or an RFC 3339 time.
        #[arg(long, default_value = "earliest")]
        from: String,
        /// End, exclusive: earliest, latest (as the replay starts), an offset, or an RFC 3339 time.
        #[arg(long, default_value = "latest")]
        to: String,
        /// Model artifact directory [default: models.dir]; give it twice to compare two models.
        #[arg(long = "model")]
        models: Vec<PathBuf>,
        /// Where events.csv, report.json and report.html go.
        #[arg(long, default_value = "backtest")]
        out: PathBuf,
        #[command(flatten)]
        verdicts: VerdictSource,
    },
    /// Time-split backtest of a labelled file: train on the events before a time, score the
    /// events from it on with the account state warm, and report precision, recall, PR-AUC,
    /// recall per pattern, an alert-budget table and feature drift.
    Backtest {
        /// A CSV, JSON-lines or Avro file; labels in `vigil_label`, or `is_fraud` (+ `scenario`).
        #[arg(long)]
        input: PathBuf,
        /// Train on the events before this time (RFC 3339 or YYYY-MM-DD) [default: where the
        /// first --train-share of the events ends].
        #[arg(long)]
        train_until: Option<String>,
        /// Share of the events (in event time) to train on when --train-until is not given.
        #[arg(long, default_value_t = 1.0 / 3.0)]
        train_share: f64,
        /// Where the model (model/), events.csv, report.json and report.html go.
        #[arg(long, default_value = "backtest")]
        out: PathBuf,
        #[command(flatten)]
        verdicts: VerdictSource,
    },
    /// Produce simulated transactions to Kafka or to a JSON-lines file.
    Simulate {
        /// Events to produce (default: until Ctrl-C; required with --out).
        #[arg(long)]
        count: Option<u64>,
        /// Events per second (Kafka only).
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Share of events that are fraud, split evenly over the six patterns.
        #[arg(long, default_value_t = 0.02)]
        anomaly_share: f64,
        /// Share of events of one pattern, overriding the even split (repeatable):
        /// account_takeover, card_testing, balance_drain, odd_hours, login_spike, amount_spike.
        /// E.g. --fraud card_testing=0.01
        #[arg(long = "fraud", value_name = "KIND=SHARE")]
        fraud: Vec<String>,
        #[arg(long, default_value_t = 0.0)]
        malformed_share: f64,
        /// Accounts to simulate [default: 2,000; each makes 0.3–3 events a day].
        #[arg(long)]
        accounts: Option<usize>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Write JSON lines (with a `vigil_label` field) here instead of producing to Kafka.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Work with the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate the configuration file and the VIGIL_* overrides without starting anything:
    /// exit 0 and a summary when they are valid, 1 and the offending key when not.
    Check,
}

/// An RFC 3339 time or a YYYY-MM-DD date (midnight UTC), as seconds since the epoch.
fn parse_instant(s: &str) -> Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp());
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp())
        .with_context(|| format!("`{s}` is neither an RFC 3339 time nor YYYY-MM-DD"))
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.3}"))
}

/// The configuration file to read: the one given, else ./config.yml if there is one.
fn config_path(path: Option<PathBuf>) -> Option<PathBuf> {
    path.or_else(|| {
        let default = PathBuf::from("config.yml");
        default.is_file().then_some(default)
    })
}

/// `vigil config check`: what was read and what it comes to, secrets left out.
fn config_summary(path: Option<&std::path::Path>, cfg: &Config) -> String {
    let source = path.map_or("the built-in defaults".to_string(), |p| {
        p.display().to_string()
    });
    let mut overrides: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("VIGIL_") && k != "VIGIL_CONFIG")
        .collect();
    overrides.sort();
    let m = &cfg.models;
    [
        format!("{source}: valid"),
        format!(
            "  overridden from the environment: {}",
            if overrides.is_empty() {
                "nothing".to_string()
            } else {
                overrides.join(", ")
            }
        ),
        format!(
            "  kafka: {} (group {}, {}), topics {} -> alerts {}, dead letters {}",
            cfg.kafka.brokers.as_deref().unwrap_or("embedded"),
            cfg.kafka.group_id,
            cfg.kafka.guarantee.as_str(),
            cfg.kafka.transactions_topic,
            cfg.kafka.alerts_topic,
            cfg.kafka.dead_letter_topic
        ),
        format!(
            "  models: {} (forest on {} features, LOF on {}), policy {}",
            m.dir.display(),
            m.forest_features.numeric.len() + m.forest_features.categorical.len(),
            m.lof_features.numeric.len() + m.lof_features.categorical.len(),
            cfg.policy.as_str()
        ),
        format!(
            "  http: {}, auth {}, rate limit {}",
            cfg.server.addr,
            match cfg.server.access.auth {
                vigil::server::Auth::None => "none",
                vigil::server::Auth::Basic { .. } => "basic",
                vigil::server::Auth::Bearer { .. } => "bearer",
            },
            match cfg.server.access.rate_limit.per_second {
                0.0 => "none".to_string(),
                r => format!("{r}/s per client"),
            }
        ),
    ]
    .join("\n")
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutdown requested");
        t.cancel();
        // A stop drains, flushes and commits in about a second; one that waits on a broker
        // call that never returns must not keep the process (and its partitions) forever.
        // Whatever was not committed is done again by the next owner.
        std::thread::spawn(|| {
            std::thread::sleep(STOP_GRACE);
            tracing::error!(
                seconds = STOP_GRACE.as_secs(),
                "the stop did not finish in time (the log's previous lines say at which step); exiting"
            );
            std::thread::sleep(Duration::from_millis(200));
            std::process::exit(1);
        });
    });
    token
}

/// How long a stop may take after SIGTERM before the process exits regardless.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// Starts the HTTP server (on a runtime of its own) and prints where it is.
async fn start_server(
    cfg: &Config,
    shared: Shared,
    shutdown: CancellationToken,
) -> Result<std::thread::JoinHandle<()>> {
    let addr = cfg.server.addr;
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("the HTTP server cannot listen on {addr} (server.addr)"))?;
    let bound = listener.local_addr()?;
    let thread = server::start(listener, shared, &cfg.server, shutdown)?;
    tracing::info!("open http://{bound}/ for the page, http://{bound}/docs for the API");
    Ok(thread)
}

/// Gives the HTTP server up to 10 s to finish its open requests once the rest has stopped.
async fn stop_server(http: std::thread::JoinHandle<()>, shutdown: &CancellationToken) {
    shutdown.cancel();
    let joined = tokio::task::spawn_blocking(move || http.join());
    match tokio::time::timeout(Duration::from_secs(10), joined).await {
        Ok(Ok(Ok(()))) => {}
        Ok(_) => tracing::error!("the HTTP server's thread panicked"),
        Err(_) => tracing::warn!("HTTP requests still open 10 s after the stop; leaving them"),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let path = config_path(cli.config);
    let cfg = Config::load(path.as_deref())?;
    if let Some(Command::Config {
        action: ConfigAction::Check,
    }) = &cli.command
    {
        println!("{}", config_summary(path.as_deref(), &cfg));
        return Ok(());
    }
    let _telemetry = telemetry::init(&cfg)?;
    // No command means `vigil demo` with its defaults.
    let command = match cli.command {
        Some(c) => c,
        None => Cli::parse_from(["vigil", "demo"])
            .command
            .unwrap_or(Command::Run),
    };
    match command {
        Command::Run => {
            // An image started without its broker address would otherwise run, and report
            // ready, on an in-process cluster nothing publishes to.
            let Some(brokers) = cfg.kafka.brokers.clone() else {
                bail!(
                    "`vigil run` needs a Kafka cluster: set kafka.brokers (or \
                     VIGIL_KAFKA__BROKERS=host:9092); `vigil demo` runs on an embedded one"
                );
            };
            let shutdown = shutdown_on_signal();
            // The server is up while the models load (or train): /ready says 503 meanwhile.
            let shared = Shared::loading()?.with_decisions(&cfg)?;
            let http = start_server(&cfg, shared.clone(), shutdown.clone()).await?;
            let loading = tokio::task::spawn_blocking({
                let cfg = cfg.clone();
                move || load_or_train(&cfg)
            });
            let models = tokio::select! {
                loaded = loading => loaded,
                () = shutdown.cancelled() => {
                    stop_server(http, &shutdown).await;
                    return Ok(());
                }
            };
            let result = match models {
                Ok(Ok(models)) => {
                    shared.install(models);
                    run_stream(&cfg, &brokers, shared, shutdown.clone()).await
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(vigil::run::RunError::Task(e.to_string())),
            };
            stop_server(http, &shutdown).await;
            result?;
        }
        Command::Demo {
            rate,
            anomaly_share,
            malformed_share,
            seed,
            history,
            seconds,
        } => {
            let embedded = match &cfg.kafka.brokers {
                Some(_) => None,
                None => Some(Embedded::start(&cfg)?),
            };
            let brokers = match (&cfg.kafka.brokers, &embedded) {
                (Some(b), _) => b.clone(),
                (None, Some(e)) => {
                    let b = e.bootstrap_servers();
                    tracing::info!(brokers = %b, "started an embedded Kafka-protocol cluster (set VIGIL_KAFKA__BROKERS to use a real one)");
                    b
                }
                (None, None) => bail!("no brokers"),
            };
            let shutdown = shutdown_on_signal();
            let mut sim = Simulator::new(seed, anomaly_share, malformed_share);
            let shared = Shared::loading()?.with_decisions(&cfg)?;
            let http = start_server(&cfg, shared.clone(), shutdown.clone()).await?;
            match warm_up(&cfg, &brokers, &mut sim, history).await {
                Ok(models) => shared.install(models),
                Err(e) => {
                    stop_server(http, &shutdown).await;
                    return Err(e.into());
                }
            }
            let opts = DemoOptions {
                rate,
                duration: seconds.map(Duration::from_secs),
            };
            let result = run_demo(&cfg, &brokers, shared, sim, opts, shutdown.clone()).await;
            stop_server(http, &shutdown).await;
            result?;
        }
        Command::Train {
            input,
            topic,
            partitions,
            from,
            to,
            out,
        } => {
            let models = ModelConfig {
                dir: out.unwrap_or(cfg.models.dir.clone()),
                ..cfg.models.clone()
            };
            // Streamed: memory holds the accounts' state and at most
            // models.max_training_events events, never the whole input.
            let history = match (&input, topic) {
                (Some(p), _) => read_history(p, &models, &cfg.features)?,
                (None, Some(topic)) => {
                    let Some(brokers) = cfg.kafka.brokers.clone() else {
                        bail!(
                            "training from a topic needs kafka.brokers (e.g. VIGIL_KAFKA__BROKERS=localhost:9092)"
                        );
                    };
                    let mut kafka = cfg.kafka.clone();
                    kafka.transactions_topic = topic.clone();
                    let range = TopicRange::open(
                        &kafka,
                        &brokers,
                        &partitions,
                        from.parse()?,
                        to.parse()?,
                    )?;
                    let source = format!("topic {topic} [{from}, {to})");
                    let decoder = Decoder::with_registry(cfg.encoding, schema_registry(&cfg)?);
                    let mut reader = HistoryReader::new(&source, &models, &cfg.features);
                    let mut fingerprint = PayloadFingerprint::default();
                    let mut position = 0;
                    range.for_each(|e| {
                        if !e.warm_only {
                            position += 1;
                            fingerprint.add(&e.payload);
                            reader.push(position, decoder.decode(&e.payload));
                        }
                        Ok(())
                    })?;
                    reader.finish(fingerprint.finish())
                }
                (None, None) => Training::Whole(bundled_history()?),
            };
            let (rejected, invalid) = history.rejected();
            for (line, e) in rejected.iter().take(20) {
                tracing::warn!(line, error.message = %e, "skipped an invalid row");
            }
            if invalid > 20 {
                tracing::warn!(more = invalid - 20, "skipped more invalid rows");
            }
            let set = train_on(&history, &models, &cfg.features, cfg.policy)?;
            for note in &set.manifest.training.notes {
                println!("note: {note}");
            }
            set.save(&models.dir)?;
            let m = &set.manifest;
            println!(
                "trained {} on {} events ({} rejected) from {}\n  isolation_forest threshold {:.4}\n  lof threshold {:.4}, every event compared with {} reference rows (models.lof.reference_rows)\n  written to {}",
                m.version,
                m.training.rows_valid,
                m.training.rows_invalid,
                m.training.source,
                m.isolation_forest.threshold,
                m.lof.threshold,
                set.lof.model.reference_rows(),
                models.dir.display()
            );
        }
        Command::Replay {
            input,
            topic,
            partitions,
            from,
            to,
            models,
            out,
            verdicts,
        } => {
            let verdicts = verdicts.read(&cfg)?;
            let registry = schema_registry(&cfg)?;
            let dirs = if models.is_empty() {
                vec![cfg.models.dir.clone()]
            } else {
                models
            };
            let mut candidates = Vec::new();
            for (i, dir) in dirs.iter().enumerate() {
                let set = ModelSet::load(dir, cfg.models.lof.index)
                    .with_context(|| format!("model {}", dir.display()))?;
                let mut name = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("model{}", i + 1));
                if candidates.iter().any(|c: &Candidate| c.name == name) {
                    name = format!("{name}#{}", i + 1);
                }
                candidates.push(Candidate::new(
                    name,
                    dir.clone(),
                    set,
                    Decoder::with_registry(cfg.encoding, registry.clone()),
                    cfg.policy,
                    cfg.top_features,
                    cfg.event_time,
                ));
            }
            let source = match input {
                Some(path) => Input::File(path),
                None => {
                    let Some(brokers) = cfg.kafka.brokers.clone() else {
                        bail!(
                            "replaying a topic needs kafka.brokers (e.g. VIGIL_KAFKA__BROKERS=localhost:9092), or use --input FILE"
                        );
                    };
                    let mut kafka = cfg.kafka.clone();
                    if let Some(t) = topic {
                        kafka.transactions_topic = t;
                    }
                    Input::Topic {
                        kafka: Box::new(kafka),
                        brokers,
                        partitions,
                        from: from.parse()?,
                        to: to.parse()?,
                    }
                }
            };
            let report = replay(
                &source,
                &mut candidates,
                &Outputs {
                    dir: out.clone(),
                    split: None,
                    verdicts,
                },
            )?;
            for m in &report.models {
                println!(
                    "{}: {} events ({} invalid), {} alerts{}",
                    m.name,
                    m.events,
                    m.events - m.valid,
                    m.alerts,
                    m.labels
                        .as_ref()
                        .map(|l| format!(
                            "; consensus precision {} recall {} F1 {}",
                            fmt_opt(l.consensus.precision),
                            fmt_opt(l.consensus.recall),
                            fmt_opt(l.consensus.f1)
                        ))
                        .unwrap_or_default()
                );
            }
            println!(
                "wrote {0}/events.csv, {0}/report.json, {0}/report.html",
                out.display()
            );
        }
        Command::Backtest {
            input,
            train_until,
            train_share,
            out,
            verdicts,
        } => {
            let cut = match train_until {
                Some(t) => Cut::At(parse_instant(&t)?),
                None => Cut::Share(train_share),
            };
            let mut split = Split::of_file(&input, cut)?;
            split.verdicts = verdicts.read(&cfg)?;
            let (trained_on, until) = (split.training.events.len(), split.until);
            let done = backtest::run(&input.display().to_string(), split, &cfg, &out)?;
            for note in &done.models.training.notes {
                println!("note: {note}");
            }
            println!(
                "trained {} on {trained_on} events before {}",
                done.models.version,
                vigil::decode::format_time(until)
            );
            let report = done.report;
            for m in &report.models {
                println!(
                    "scored {} events ({} invalid): {} alerts ({})",
                    m.events,
                    m.events - m.valid,
                    m.alerts,
                    m.alert_rate
                        .map_or("-".into(), |r| format!("{:.2} %", 100.0 * r))
                );
                if let Some(l) = &m.labels {
                    for (name, q) in [
                        ("isolation_forest", &l.isolation_forest),
                        ("lof", &l.lof),
                        ("consensus", &l.consensus),
                    ] {
                        println!(
                            "  {name:<17} precision {} recall {} F1 {} PR-AUC {}",
                            fmt_opt(q.precision),
                            fmt_opt(q.recall),
                            fmt_opt(q.f1),
                            fmt_opt(q.pr_auc)
                        );
                    }
                    for (label, k) in &l.by_label {
                        println!(
                            "  {label:<17} {:>5} events, recall {}",
                            k.events,
                            fmt_opt(k.recall)
                        );
                    }
                }
            }
            println!(
                "wrote {0}/model, {0}/events.csv, {0}/report.json, {0}/report.html",
                out.display()
            );
        }
        Command::Simulate {
            count,
            rate,
            anomaly_share,
            fraud,
            malformed_share,
            accounts,
            seed,
            out,
        } => {
            let scenarios = Scenarios::even(anomaly_share, malformed_share)
                .with(&fraud)
                .map_err(anyhow::Error::msg)?;
            let mut sim = Simulator::with_options(seed, accounts, scenarios);
            if let Some(path) = out {
                let Some(count) = count else {
                    bail!("--out needs --count");
                };
                let mut text = Vec::new();
                for _ in 0..count {
                    text.extend_from_slice(&sim.next_event().labelled_json());
                    text.push(b'\n');
                }
                std::fs::write(&path, text).with_context(|| path.display().to_string())?;
                println!("wrote {count} events to {}", path.display());
                return Ok(());
            }
            let Some(brokers) = cfg.kafka.brokers.clone() else {
                bail!(
                    "simulate needs kafka.brokers (e.g. VIGIL_KAFKA__BROKERS=localhost:9092) or --out"
                );
            };
            let p = producer(&cfg.kafka, &brokers)?;
            let stop = shutdown_on_signal();
            let n = produce(
                &p,
                &cfg.kafka.transactions_topic,
                &mut sim,
                rate,
                count,
                &stop,
            )
            .await?;
            println!("produced {n} events to {}", cfg.kafka.transactions_topic);
        }
        // Answered before anything started, above.
        Command::Config { .. } => {}
    }
    Ok(())
}
