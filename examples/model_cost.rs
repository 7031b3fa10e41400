//! What a trained model costs per event: both detectors on the bundled dataset's feature rows,
//! one event at a time (as the stream scores) and in batches of 8 and 64 (as `POST /predict`
//! and a micro-batch would), three rounds.
//!
//!     cargo run --release --example model_cost MODEL_DIR
//!
//! LOF compares every event with every row of its reference set, so the cost grows with it
//! (`vigil train` prints its size; `models.lof.reference_rows` bounds it).

use std::time::Instant;

use vigil::config::{FeatureConfig, LofIndexKind};
use vigil::models::{ModelSet, Scratch};
use vigil::train::{bundled_history, in_event_time_order, replay_features};

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "models".into());
    let set = ModelSet::load(std::path::Path::new(&dir), LofIndexKind::Auto)
        .unwrap_or_else(|e| panic!("{dir}: {e}"));
    let history = bundled_history().unwrap_or_else(|e| panic!("{e}"));
    let rows = replay_features(
        &in_event_time_order(history.events),
        &FeatureConfig::default(),
    );
    let reference = set.lof.model.reference_rows();
    println!(
        "{dir}: LOF reference set of {reference} rows, {} events",
        rows.len()
    );
    let mut scratch = Scratch::default();
    let per_event = |started: Instant| started.elapsed().as_secs_f64() / rows.len() as f64 * 1e6;
    for round in 1..=3 {
        let started = Instant::now();
        for r in &rows {
            std::hint::black_box(set.assess(r, &mut scratch));
        }
        let single = per_event(started);
        let batched = [8usize, 64].map(|size| {
            let started = Instant::now();
            for batch in rows.chunks(size) {
                std::hint::black_box(set.assess_many(batch));
            }
            per_event(started)
        });
        println!(
            "round {round}: one at a time {single:.1} µs an event; in batches of 8 {:.1}, of 64 {:.1}",
            batched[0], batched[1]
        );
    }
}
