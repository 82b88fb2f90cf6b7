//! Exact f64 reference of DDPM in the notation of Su Jianlin's "DDPM = autoregressive VAE":
//! encoder p, generator q, α_t the per-step signal scale, β_t = sqrt(1 − α_t²).
//! Pure `ndarray`, CPU only; the accelerated crate and the proofs are checked against it.

/// The variational bound: KL terms, the 256-bin decoder, the negative ELBO in bits/dim.
pub mod bound;
/// DPM-Solver++(2M), multistep, data-prediction form.
pub mod dpm_solver;
/// The error type and `Result` alias.
pub mod error;
/// Classifier-free guidance: the combination and the guided oracle of a labelled law.
pub mod guidance;
/// DDIM inversion (η = 0): x_0 → x_T along the strided list, upwards.
pub mod invert;
/// One LAMB optimiser step on an f64 array.
pub mod lamb;
/// Losses (7) and (8), unweighted and weighted, and the constant between them.
pub mod loss;
/// The marginal p(x_t|x_0) = N(ᾱ_t x_0, β̄_t² I).
pub mod marginal;
/// The test oracle: the exact E[ε|x_t] for known data laws.
pub mod oracle;
/// The posterior p(x_{t−1}|x_t, x_0) = N(μ̃, σ̃_t² I).
pub mod posterior;
/// Sampler steps: ancestral, clipped-x̂_0, DDIM (plain and clipped).
pub mod sampler;
/// Noise schedules α, β, ᾱ, β̄ (article, Ho's linear, cosine, arbitrary).
pub mod schedule;
/// The generator's σ_t (posterior, β_t, isotropic-Gaussian optimum).
pub mod sigma;
/// Strided timesteps and the (τ, τ′) pairs a sampler walks.
pub mod timesteps;

pub use error::{RefError, Result};
pub use oracle::{DataLaw, LabelledLaw};
pub use schedule::{Schedule, ScheduleKind};
pub use sigma::SigmaChoice;
