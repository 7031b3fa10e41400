//! What logging and tracing cost per event: the per-event path (decode → state → features →
//! both models → consensus) inside the worker's `event` span, under
//! - no subscriber at all,
//! - the production subscriber with traces off (JSON logs at `info`, written to a sink),
//! - the same with OTLP traces on, every event sampled (spans built and queued for export; the
//!   collector address does not answer, so export attempts fail off the hot path).
//!
//!     cargo bench --bench telemetry

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use tracing_subscriber::prelude::*;
use vigil::config::{Config, Encoding, FeatureConfig, LogFormat, ModelConfig, Policy};
use vigil::decode::Decoder;
use vigil::models::Scratch;
use vigil::pipeline::{Engine, Outcome};
use vigil::publish::SourceCoordinates;
use vigil::state::PartitionState;
use vigil::telemetry::layers;
use vigil::train::{bundled_history, in_event_time_order, train};

fn bench_path(c: &mut Criterion, name: &str, engine: &Engine, payloads: &[Vec<u8>]) {
    c.bench_function(name, |b| {
        let mut state = PartitionState::default();
        let mut scratch = Scratch::default();
        let mut i = 0usize;
        b.iter(|| {
            let payload = &payloads[i % payloads.len()];
            let source = SourceCoordinates {
                topic: "bench".into(),
                partition: 0,
                offset: i as i64,
                published_at: None,
            };
            i += 1;
            let span = tracing::trace_span!(
                "event",
                partition = 0,
                offset = source.offset,
                transaction_id = tracing::field::Empty,
                account_id = tracing::field::Empty,
                outcome = tracing::field::Empty,
            );
            let outcome =
                span.in_scope(|| engine.process(&mut state, &source, payload, &mut scratch));
            let kind = match &outcome {
                Outcome::Clean(..) => "clean",
                Outcome::Alert(..) => "alert",
                Outcome::Invalid(_) => "dead_letter",
            };
            span.record("outcome", kind);
            black_box(outcome);
        });
    });
}

fn telemetry(c: &mut Criterion) {
    let history = bundled_history().unwrap_or_default();
    let models = train(
        &history,
        &ModelConfig::default(),
        &FeatureConfig::default(),
        vigil::config::Policy::All,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let payloads: Vec<Vec<u8>> = in_event_time_order(history.events)
        .iter()
        .map(|t| serde_json::to_vec(t).unwrap_or_default())
        .collect();
    let engine = Engine::new(
        Arc::new(models),
        Decoder::new(Encoding::Json),
        Policy::All,
        3,
    );

    bench_path(c, "event/no_subscriber", &engine, &payloads);

    let mut cfg = Config::from_yaml("").unwrap_or_else(|e| panic!("{e}"));
    cfg.log_format = LogFormat::Json;
    {
        let (l, _guard) = layers(&cfg, std::io::sink).unwrap_or_else(|e| panic!("{e}"));
        let _default = tracing_subscriber::registry().with(l).set_default();
        bench_path(c, "event/json_logs_traces_off", &engine, &payloads);
    }
    cfg.traces.endpoint = Some("http://127.0.0.1:9/v1/traces".into());
    cfg.traces.sample_ratio = 1.0;
    {
        let (l, _guard) = layers(&cfg, std::io::sink).unwrap_or_else(|e| panic!("{e}"));
        let _default = tracing_subscriber::registry().with(l).set_default();
        bench_path(
            c,
            "event/json_logs_traces_on_all_sampled",
            &engine,
            &payloads,
        );
    }
}

criterion_group!(benches, telemetry);
criterion_main!(benches);
