//! What the per-event benchmarks share: the default models trained on the bundled dataset and
//! its events, in event-time order, as the JSON the stream would receive.

use vigil::config::{FeatureConfig, ModelConfig, Policy};
use vigil::models::ModelSet;
use vigil::train::{bundled_history, in_event_time_order, train};

pub fn models_and_payloads() -> (ModelSet, Vec<Vec<u8>>) {
    let history = bundled_history().unwrap_or_default();
    let models = train(
        &history,
        &ModelConfig::default(),
        &FeatureConfig::default(),
        Policy::All,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let payloads = in_event_time_order(history.events)
        .iter()
        .map(|t| serde_json::to_vec(t).unwrap_or_default())
        .collect();
    (models, payloads)
}
