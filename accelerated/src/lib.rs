//! ddpm: DDPM on libtorch, in the article's notation (encoder p, generator q).
//!
//! Mathematics and model (each held to `ddpm-reference` by the tests in `tests/`):
pub mod bound;
pub mod dpm_solver;
pub mod ema;
pub mod error;
mod flat;
pub mod guidance;
pub mod lamb;
pub mod loss;
pub mod lr;
pub mod marginal;
pub mod oracle;
pub mod posterior;
pub mod sampler;
pub mod schedule;
pub mod sigma;
pub mod timesteps;
pub mod unet;

// The product: devices, data, checkpoints, training, sampling (`generate`), evaluation (the
// CLI is the `ddpm` binary's, in src/bin/ddpm/).
pub mod autocast;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod distributed;
pub mod eval;
pub mod fsio;
pub mod generate;
pub mod graph;
pub mod grid;
pub mod interpolate;
pub mod invert;
pub mod memory;
pub mod metrics;
pub mod plot;
pub mod progress;
pub mod train;

// Sample quality: FD-MNIST, entropies and bits/dim per σ_t choice and step count.
pub mod quality;
