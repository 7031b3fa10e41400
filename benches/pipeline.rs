//! CPU cost per event and of each model, on the bundled dataset's real feature vectors.
//!
//!     cargo bench --bench pipeline
//!
//! Also writes `target/lof_matrix.csv` (the LOF input matrix of all 2,512 events) so that
//! `sklearn_oracle.py` can be timed on exactly the same numbers (see docs/benchmarks.md).

mod common;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vigil::config::{Encoding, FeatureConfig, LofIndexKind, Policy};
use vigil::decode::Decoder;
use vigil::models::lof::KnnIndex;
use vigil::models::{Detector, Scratch, forest};
use vigil::pipeline::Engine;
use vigil::publish::SourceCoordinates;
use vigil::state::PartitionState;
use vigil::train::{bundled_history, in_event_time_order, replay_features};

fn per_event(c: &mut Criterion) {
    let (models, payloads) = common::models_and_payloads();
    let engine = Engine::new(
        Arc::new(models),
        Decoder::new(Encoding::Json),
        Policy::All,
        3,
    );
    let mut g = c.benchmark_group("per_event");
    g.bench_function("decode_features_models_decision", |b| {
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
            black_box(engine.process(&mut state, &source, payload, &mut scratch));
        });
    });
    g.bench_function("decode_only", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            black_box(engine.decoder.decode(&payloads[i % payloads.len()]))
        });
    });
    g.finish();
}

fn models(c: &mut Criterion) {
    let (set, _) = common::models_and_payloads();
    let history = bundled_history().unwrap_or_default();
    let rows = replay_features(
        &in_event_time_order(history.events),
        &FeatureConfig::default(),
    );

    // LOF: the real encoded feature vector (robust-scaled numerics + one-hot).
    let lof_rows: Vec<Vec<f64>> = rows.iter().map(|r| set.lof.encoder.encode(r)).collect();
    let dims = set.lof.model.dims;
    let csv: String = std::iter::once(
        (0..dims)
            .map(|i| format!("x{i}"))
            .collect::<Vec<_>>()
            .join(","),
    )
    .chain(lof_rows.iter().map(|r| {
        r.iter()
            .map(|v| format!("{v:?}"))
            .collect::<Vec<_>>()
            .join(",")
    }))
    .collect::<Vec<_>>()
    .join("\n");
    let _ = std::fs::write("target/lof_matrix.csv", csv + "\n");

    let mut g = c.benchmark_group(format!("lof_k20_{dims}dims_{}rows", lof_rows.len()));
    for kind in [LofIndexKind::Kdtree, LofIndexKind::Brute] {
        let index = KnnIndex::build(kind, &set.lof.model.points, dims, set.lof.model.k);
        g.bench_function(format!("{kind:?}").to_lowercase(), |b| {
            let mut buf = Vec::new();
            let mut i = 0usize;
            b.iter(|| {
                i += 1;
                black_box(
                    set.lof
                        .model
                        .score(&index, &lof_rows[i % lof_rows.len()], &mut buf),
                )
            });
        });
    }
    // All 2,512 rows in one call (as `POST /predict` scores a batch); criterion reports the
    // time per call, so divide by 2,512 for a row.
    let all_lof: Vec<f64> = lof_rows.concat();
    let brute = KnnIndex::build(LofIndexKind::Brute, &set.lof.model.points, dims, 20);
    g.throughput(Throughput::Elements(lof_rows.len() as u64));
    g.bench_function("brute_batch_of_all_rows", |b| {
        let mut bufs = Vec::new();
        b.iter(|| black_box(set.lof.model.score_many(&brute, &all_lof, &mut bufs)));
    });
    g.finish();

    // Isolation forest: the flattened copy against the trees as they were grown (boxed nodes).
    let forest_rows: Vec<Vec<f64>> = rows.iter().map(|r| set.forest.encoder.encode(r)).collect();
    let opts = forest::options(100, 256, 0, forest_rows.len(), 42);
    let trees = forest::grow_trees(&forest_rows, &opts).unwrap_or_else(|e| panic!("{e}"));
    let flat = forest::train(&forest_rows, &opts).unwrap_or_else(|e| panic!("{e}"));
    let n = set.forest.encoder.width();
    let mut g = c.benchmark_group(format!("isolation_forest_100x256_{n}dims"));
    g.bench_function("flattened", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            black_box(flat.score(&forest_rows[i % forest_rows.len()]))
        });
    });
    let all_forest: Vec<f64> = forest_rows.concat();
    g.bench_function("flattened_batch_of_all_rows", |b| {
        b.iter(|| black_box(flat.score_many(&all_forest, n)));
    });
    g.bench_function("grown_trees", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            let x = &forest_rows[i % forest_rows.len()];
            black_box(trees.iter().map(|t| t.path_length(x)).sum::<f64>())
        });
    });
    g.bench_function("attribution", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            black_box(flat.attribution(&forest_rows[i % forest_rows.len()]))
        });
    });
    g.finish();

    let mut scratch = Scratch::default();
    c.bench_function("both_detectors_on_features", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            let f = &rows[i % rows.len()];
            black_box((
                set.forest.assess(f, &mut scratch),
                set.lof.assess(f, &mut scratch),
            ))
        });
    });
    c.bench_function("both_detectors_batch_of_all_rows", |b| {
        b.iter(|| black_box(set.assess_many(&rows)));
    });
    // What a stream worker's micro-batch of n ready events costs, per event.
    let mut g = c.benchmark_group("both_detectors_micro_batch");
    for n in [1usize, 4, 16, 64, 256] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("{n}"), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + n) % (rows.len() - n);
                black_box(set.assess_many(&rows[i..i + n]))
            });
        });
    }
    g.finish();
}

criterion_group!(benches, per_event, models);
criterion_main!(benches);
