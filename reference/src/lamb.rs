//! One LAMB step (You et al. 2019): Adam moments plus a layer-wise trust ratio ‖w‖/‖u‖.

use ndarray::ArrayD;

use crate::error::{check_shape, RefError, Result};

/// LAMB hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LambConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment, in [0, 1).
    pub beta1: f64,
    /// Decay of the second moment, in [0, 1).
    pub beta2: f64,
    /// Added to sqrt(v̂) before dividing, > 0.
    pub eps: f64,
    /// Decoupled weight decay added to the update of adapted parameters.
    pub weight_decay: f64,
}

impl Default for LambConfig {
    /// lr 1e-3 (the article's), β = (0.9, 0.999), ε = 1e-6, weight decay 0.01 (the LAMB paper's).
    fn default() -> Self {
        LambConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.01,
        }
    }
}

impl LambConfig {
    /// Checks lr ≥ 0, β1, β2 ∈ [0, 1), eps > 0, weight_decay ≥ 0, all finite.
    pub fn validate(&self) -> Result<()> {
        let checks = [
            ("lr", self.lr, self.lr >= 0.0, "must be finite and >= 0"),
            (
                "beta1",
                self.beta1,
                (0.0..1.0).contains(&self.beta1),
                "must lie in [0, 1)",
            ),
            (
                "beta2",
                self.beta2,
                (0.0..1.0).contains(&self.beta2),
                "must lie in [0, 1)",
            ),
            ("eps", self.eps, self.eps > 0.0, "must be finite and > 0"),
            (
                "weight_decay",
                self.weight_decay,
                self.weight_decay >= 0.0,
                "must be finite and >= 0",
            ),
        ];
        match checks
            .iter()
            .find(|(_, value, ok, _)| !(*ok && value.is_finite()))
        {
            Some(&(name, value, _, reason)) => Err(RefError::InvalidParameter {
                name,
                value,
                reason,
            }),
            None => Ok(()),
        }
    }
}

/// Per-parameter optimiser state: the moments m, v and the number of steps taken.
#[derive(Debug, Clone, PartialEq)]
pub struct LambState {
    /// First moment m.
    pub m: ArrayD<f64>,
    /// Second moment v.
    pub v: ArrayD<f64>,
    /// Steps taken so far (k of the bias correction after the next step is step + 1).
    pub step: u64,
}

impl LambState {
    /// Zero moments for a parameter of this shape.
    pub fn new(shape: &[usize]) -> Self {
        LambState {
            m: ArrayD::zeros(shape),
            v: ArrayD::zeros(shape),
            step: 0,
        }
    }
}

/// One step k: m ← β1 m + (1−β1) g, v ← β2 v + (1−β2) g², m̂ = m/(1−β1^k), v̂ = v/(1−β2^k),
/// u = m̂/(sqrt(v̂)+eps) + wd·w, w ← w − lr·r·u with r = ‖w‖/‖u‖ (1 if either norm is 0).
/// With `adapt = false` (norm weights, biases) there is no weight decay and r = 1.
/// Returns the trust ratio r used; nothing changes when it returns an error.
pub fn lamb_update(
    config: &LambConfig,
    param: &mut ArrayD<f64>,
    grad: &ArrayD<f64>,
    state: &mut LambState,
    adapt: bool,
) -> Result<f64> {
    config.validate()?;
    check_shape("gradient against parameter", param.shape(), grad.shape())?;
    check_shape(
        "first moment against parameter",
        param.shape(),
        state.m.shape(),
    )?;
    check_shape(
        "second moment against parameter",
        param.shape(),
        state.v.shape(),
    )?;
    let k = state.step + 1;
    let (b1, b2) = (config.beta1, config.beta2);
    state.m = &state.m * b1 + grad * (1.0 - b1);
    state.v = &state.v * b2 + grad.mapv(|g| g * g) * (1.0 - b2);
    state.step = k;
    let exponent = i32::try_from(k).unwrap_or(i32::MAX);
    let m_hat = &state.m / (1.0 - b1.powi(exponent));
    let v_hat = &state.v / (1.0 - b2.powi(exponent));
    let adam = m_hat / (v_hat.mapv(f64::sqrt) + config.eps);
    let (update, ratio) = if adapt {
        let update = adam + &*param * config.weight_decay;
        let (w_norm, u_norm) = (l2(param), l2(&update));
        let ratio = if w_norm > 0.0 && u_norm > 0.0 {
            w_norm / u_norm
        } else {
            1.0
        };
        (update, ratio)
    } else {
        (adam, 1.0)
    };
    *param -= &(update * (config.lr * ratio));
    Ok(ratio)
}

/// Euclidean norm of all entries.
fn l2(a: &ArrayD<f64>) -> f64 {
    a.mapv(|x| x * x).sum().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;
    use ndarray::{array, IxDyn};

    fn config() -> LambConfig {
        LambConfig {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 0.5,
            weight_decay: 0.1,
        }
    }

    #[test]
    fn first_step_matches_a_hand_computation() {
        // w = (1, 2), g = (0.5, −1), step 1: m̂ = g, sqrt(v̂) = |g| = (0.5, 1),
        // m̂/(sqrt v̂ + 0.5) = (0.5, −2/3), u = (0.6, −7/15), ‖u‖² = 26/45, ‖w‖² = 5,
        // r = sqrt(225/26) = 15/sqrt 26, w − lr·r·u = (1 − 0.09/sqrt 26, 2 + 0.07/sqrt 26).
        let mut w = array![1.0, 2.0].into_dyn();
        let g = array![0.5, -1.0].into_dyn();
        let mut state = LambState::new(&[2]);
        let r = lamb_update(&config(), &mut w, &g, &mut state, true).unwrap();
        let root = 26f64.sqrt();
        assert_relative_eq!(r, 15.0 / root, max_relative = 1e-14);
        assert_relative_eq!(w[0], 1.0 - 0.09 / root, max_relative = 1e-14);
        assert_relative_eq!(w[1], 2.0 + 0.07 / root, max_relative = 1e-14);
        assert_relative_eq!(state.m[1], -0.1, max_relative = 1e-14);
        assert_relative_eq!(state.v[0], 0.001 * 0.25, max_relative = 1e-14);
        assert_eq!(state.step, 1);
    }

    #[test]
    fn excluded_parameters_take_a_plain_adam_step() {
        // No weight decay, r = 1: w − lr·(0.5, −2/3).
        let mut w = array![1.0, 2.0].into_dyn();
        let g = array![0.5, -1.0].into_dyn();
        let mut state = LambState::new(&[2]);
        assert_eq!(
            lamb_update(&config(), &mut w, &g, &mut state, false).unwrap(),
            1.0
        );
        assert_relative_eq!(w[0], 1.0 - 0.005, max_relative = 1e-14);
        assert_relative_eq!(w[1], 2.0 + 0.01 * 2.0 / 3.0, max_relative = 1e-14);
    }

    #[test]
    fn bias_correction_makes_a_constant_gradient_step_the_same_size() {
        // After k equal gradients m = (1 − β1^k) g and v = (1 − β2^k) g², so m̂ = g, v̂ = g².
        let mut w = ArrayD::from_elem(IxDyn(&[2, 2]), 0.5);
        let g = ArrayD::from_elem(IxDyn(&[2, 2]), -0.2);
        let mut state = LambState::new(&[2, 2]);
        let cfg = LambConfig {
            weight_decay: 0.0,
            ..config()
        };
        let before = w.clone();
        lamb_update(&cfg, &mut w, &g, &mut state, false).unwrap();
        let first = &w - &before;
        let mid = w.clone();
        lamb_update(&cfg, &mut w, &g, &mut state, false).unwrap();
        assert_relative_eq!(state.m[[0, 0]], -0.2 * (1.0 - 0.81), max_relative = 1e-14);
        assert_relative_eq!(
            state.v[[1, 1]],
            0.04 * (1.0 - 0.999f64.powi(2)),
            max_relative = 1e-12
        );
        for (a, b) in first.iter().zip((&w - &mid).iter()) {
            assert_relative_eq!(*a, *b, max_relative = 1e-12);
        }
    }

    #[test]
    fn zero_weights_use_a_unit_trust_ratio() {
        let mut w = ArrayD::zeros(IxDyn(&[3]));
        let g = ArrayD::from_elem(IxDyn(&[3]), 1.0);
        let mut state = LambState::new(&[3]);
        assert_eq!(
            lamb_update(&config(), &mut w, &g, &mut state, true).unwrap(),
            1.0
        );
        // m̂/(sqrt v̂ + eps) = 1/1.5 per entry.
        assert_relative_eq!(w[0], -0.01 / 1.5, max_relative = 1e-14);
    }

    #[test]
    fn invalid_input_is_an_error_and_changes_nothing() {
        let mut w = array![1.0, 2.0].into_dyn();
        let mut state = LambState::new(&[2]);
        let bad_shape = array![1.0].into_dyn();
        assert!(matches!(
            lamb_update(&config(), &mut w, &bad_shape, &mut state, true),
            Err(RefError::ShapeMismatch { .. })
        ));
        let bad = LambConfig {
            beta2: 1.0,
            ..config()
        };
        let err =
            lamb_update(&bad, &mut w, &array![0.1, 0.1].into_dyn(), &mut state, true).unwrap_err();
        assert!(
            matches!(err, RefError::InvalidParameter { name: "beta2", .. }),
            "{err}"
        );
        assert!(LambConfig {
            lr: f64::NAN,
            ..config()
        }
        .validate()
        .is_err());
        assert!(LambConfig {
            eps: 0.0,
            ..config()
        }
        .validate()
        .is_err());
        assert_eq!((w, state.step), (array![1.0, 2.0].into_dyn(), 0));
    }
}
