//! Moved: `Respaced` lives beside the timesteps now (issue 12); this re-export keeps quality/
//! compiling until the merge removes it.
pub use crate::timesteps::{Respaced, RespacedModel};
