//! Training data: the embedded MNIST-5k, image folders, synthetic laws with exact oracles.
pub mod folder;
pub mod loader;
pub mod mixture;
pub mod mnist;
