//! Helpers shared by the integration suites.
#![allow(dead_code, clippy::unwrap_used)]

use vigil::config::{FeatureConfig, ModelConfig};
use vigil::models::ModelSet;
use vigil::run::Shared;
use vigil::train::{bundled_history, train};

/// Models trained with the default configuration on the bundled dataset.
pub fn trained_models() -> ModelSet {
    train(
        &bundled_history().unwrap(),
        &ModelConfig::default(),
        &FeatureConfig::default(),
    )
    .unwrap()
}

/// Shared server/stream handles over freshly trained models.
pub fn shared() -> Shared {
    Shared::new(trained_models()).unwrap()
}
