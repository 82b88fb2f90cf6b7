//! Numeric tools for the proofs in `proofs/tests/`: quadrature, 1-D minimisation, Monte
//! Carlo statistics and a step-by-step simulator of the encoder chain. Each is an
//! *independent* route to a number the reference computes by formula.

/// Trapezoid quadrature on uniform grids, plain and Gaussian-weighted.
pub mod quad;
/// Golden-section minimisation of a unimodal function of one variable.
pub mod optimize;
/// Monte Carlo mean with standard error, the one-sample Kolmogorov–Smirnov test.
pub mod stats;
/// Isotropic Gaussian densities and cross-entropies written out from their definitions.
pub mod gauss;
/// The encoder chain simulated one step at a time.
pub mod chain;
/// Bayes' rule by numeric integration for 1-D Gaussian models.
pub mod bayes;
