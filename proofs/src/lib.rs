//! Numeric tools for the proofs in `proofs/tests/`: quadrature, 1-D minimisation, Monte
//! Carlo statistics and a step-by-step simulator of the encoder chain. Each is an
//! *independent* route to a number the reference computes by formula.

/// Bayes' rule by numeric integration for 1-D Gaussian models.
pub mod bayes;
/// The encoder chain simulated one step at a time.
pub mod chain;
/// Isotropic Gaussian densities and cross-entropies written out from their definitions.
pub mod gauss;
/// Golden-section minimisation of a unimodal function of one variable.
pub mod optimize;
/// Trapezoid quadrature on uniform grids, plain and Gaussian-weighted.
pub mod quad;
/// Monte Carlo mean with standard error, the one-sample Kolmogorov–Smirnov test.
pub mod stats;
