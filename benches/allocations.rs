//! Heap allocations per event on the per-event path — decode, event time, account state,
//! features, both models, consensus, explanation of alerts — counted by dhat's global
//! allocator, in steady state: the bundled dataset is processed four times to bring every
//! account's buffers to their bounds and warm the scratch space, then counted on a fifth pass.
//!
//!     cargo bench --bench allocations
//!
//! (`cargo test` runs it on a few hundred events, to keep it working.)

mod common;

use std::sync::Arc;

use vigil::config::{Encoding, Policy};
use vigil::decode::Decoder;
use vigil::models::Scratch;
use vigil::pipeline::{Engine, Outcome};
use vigil::publish::SourceCoordinates;
use vigil::state::PartitionState;

/// Passes over the dataset before the counted one.
const WARM_PASSES: usize = 4;

// dhat's allocator counts every block the program allocates (its testing mode: no profile file).
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

/// Blocks allocated, and their bytes, while `f` runs.
fn counted(f: impl FnOnce()) -> (u64, u64) {
    let before = dhat::HeapStats::get();
    f();
    let after = dhat::HeapStats::get();
    (
        after.total_blocks - before.total_blocks,
        after.total_bytes - before.total_bytes,
    )
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let quick = !std::env::args().any(|a| a == "--bench");
    let (models, mut payloads) = common::models_and_payloads();
    if quick {
        payloads.truncate(300);
    }
    let engine = Engine::new(
        Arc::new(models),
        Decoder::new(Encoding::Json),
        Policy::All,
        3,
    );
    let mut state = PartitionState::default();
    let mut scratch = Scratch::default();
    let mut offset = 0;
    // The worker names its input topic once; every event's coordinates share it.
    let topic: Arc<str> = "bench".into();
    let mut process = |payload: &[u8], state: &mut PartitionState| {
        let source = SourceCoordinates {
            topic: Arc::clone(&topic),
            partition: 0,
            offset,
            published_at: None,
        };
        offset += 1;
        engine.process(state, &source, payload, &mut scratch)
    };
    // The dataset's accounts have about five events each and the longest buffer (the velocity
    // ring) keeps 16, so four passes bring every account's buffers and sketches to where a
    // long-running stream holds an active account's: at their bounds.
    for _ in 0..WARM_PASSES {
        for p in &payloads {
            process(p, &mut state);
        }
    }
    // The counted pass: every account known, every buffer at its bound.
    let (mut clean, mut alerts) = ((0u64, 0u64, 0u64), (0u64, 0u64, 0u64));
    for p in &payloads {
        let mut outcome = None;
        let (n, bytes) = counted(|| outcome = Some(process(p, &mut state)));
        let tally = match outcome {
            Some(Outcome::Alert(..)) => &mut alerts,
            _ => &mut clean,
        };
        *tally = (tally.0 + 1, tally.1 + n, tally.2 + bytes);
    }
    let per = |(events, n, bytes): (u64, u64, u64)| {
        let e = events.max(1) as f64;
        format!(
            "{events} events, {:.1} allocations and {:.0} bytes per event",
            n as f64 / e,
            bytes as f64 / e
        )
    };
    println!("steady state, events not alerted: {}", per(clean));
    println!("steady state, alerts: {}", per(alerts));
}
