//! LAMB (You et al. 2019): Adam with a layer-wise trust ratio. tch has no LAMB and cannot
//! save optimiser state, so the moments live here and are exported for checkpoints.

use crate::error::{DdpmError, Result};
use std::collections::HashMap;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// LAMB's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LambConfig {
    /// Learning rate of the next step (the trainer sets it from the lr schedule).
    pub lr: f64,
    /// β1, decay of the first moment.
    pub beta1: f64,
    /// β2, decay of the second moment.
    pub beta2: f64,
    /// ε added to sqrt(v̂).
    pub eps: f64,
    /// Decoupled weight decay on adapted parameters.
    pub weight_decay: f64,
    /// Rescale all gradients together so their global L2 norm is at most this.
    pub max_grad_norm: Option<f64>,
}

impl Default for LambConfig {
    /// lr 1e-3 (the article's), β = (0.9, 0.999), ε = 1e-6 and weight decay 0.01 (the LAMB
    /// paper's and bert4keras's), no clipping.
    fn default() -> Self {
        LambConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.01,
            max_grad_norm: None,
        }
    }
}

impl LambConfig {
    /// Errors unless every setting lies in its domain (checked by `Lamb::new`).
    pub fn validate(&self) -> Result<()> {
        let checks: [(&'static str, f64, bool, &str); 6] = [
            (
                "lr",
                self.lr,
                self.lr.is_finite() && self.lr >= 0.0,
                "finite and non-negative",
            ),
            (
                "beta1",
                self.beta1,
                (0.0..1.0).contains(&self.beta1),
                "in [0, 1)",
            ),
            (
                "beta2",
                self.beta2,
                (0.0..1.0).contains(&self.beta2),
                "in [0, 1)",
            ),
            (
                "eps",
                self.eps,
                self.eps.is_finite() && self.eps > 0.0,
                "finite and positive",
            ),
            (
                "weight_decay",
                self.weight_decay,
                self.weight_decay.is_finite() && self.weight_decay >= 0.0,
                "finite and non-negative",
            ),
            (
                "max_grad_norm",
                self.max_grad_norm.unwrap_or(1.0),
                self.max_grad_norm.is_none_or(|c| c > 0.0),
                "positive",
            ),
        ];
        match checks.into_iter().find(|c| !c.2) {
            None => Ok(()),
            Some((key, value, _, expected)) => Err(DdpmError::OutOfRange {
                key,
                value: value.to_string(),
                expected: expected.into(),
            }),
        }
    }
}

/// One LAMB update of `param` in place, `step` = k ≥ 1:
/// m ← β1 m + (1−β1) g, v ← β2 v + (1−β2) g², m̂ = m/(1−β1^k), v̂ = v/(1−β2^k),
/// u = m̂/(sqrt(v̂)+ε) + wd·w; adapted: r = ‖w‖/‖u‖ (1 if either is 0), w ← w − lr·r·u;
/// not adapted: no weight decay and r = 1. Runs on the device without host synchronisation.
pub fn lamb_update(
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    step: i64,
    cfg: &LambConfig,
    adapt: bool,
) -> Result<()> {
    if step < 1 {
        return Err(DdpmError::OutOfRange {
            key: "step",
            value: step.to_string(),
            expected: "at least 1 (LAMB steps count from 1)".into(),
        });
    }
    tch::no_grad(|| -> Result<()> {
        let _ = m
            .f_mul_scalar_(cfg.beta1)?
            .f_add_(&grad.f_mul_scalar(1.0 - cfg.beta1)?)?;
        let _ = v
            .f_mul_scalar_(cfg.beta2)?
            .f_add_(&grad.f_square()?.f_mul_scalar(1.0 - cfg.beta2)?)?;
        let m_hat = m.f_div_scalar(1.0 - cfg.beta1.powi(step as i32))?;
        let v_hat = v.f_div_scalar(1.0 - cfg.beta2.powi(step as i32))?;
        let mut update = m_hat.f_div(&v_hat.f_sqrt()?.f_add_scalar(cfg.eps)?)?;
        if adapt {
            if cfg.weight_decay != 0.0 {
                let _ = update.f_add_(&param.f_mul_scalar(cfg.weight_decay)?)?;
            }
            let w_norm = param.f_norm()?;
            let u_norm = update.f_norm()?;
            let both = w_norm.f_gt(0.0)?.f_logical_and(&u_norm.f_gt(0.0)?)?;
            let ratio = w_norm.f_div(&u_norm)?.f_where_scalarother(&both, 1.0)?;
            let _ = update.f_mul_(&ratio)?;
        }
        let _ = param.f_sub_(&update.f_mul_scalar(cfg.lr)?)?;
        Ok(())
    })
}

/// Whether LAMB adapts a variable (trust ratio and weight decay): every variable except
/// biases and normalisation parameters, recognised as tensors of dimension ≤ 1 or by name
/// (last component `bias`, or a component starting with `norm`).
pub fn is_adapted(name: &str, param: &Tensor) -> bool {
    let by_name =
        name.rsplit('.').next() == Some("bias") || name.split('.').any(|c| c.starts_with("norm"));
    param.dim() > 1 && !by_name
}

#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    m: Tensor,
    v: Tensor,
    adapt: bool,
}

/// LAMB over the trainable variables of a `VarStore`.
#[derive(Debug)]
pub struct Lamb {
    cfg: LambConfig,
    step: i64,
    slots: Vec<Slot>,
}

const STEP_KEY: &str = "step";

impl Lamb {
    /// Optimiser for the trainable variables of `vs`, moments at zero.
    pub fn new(vs: &VarStore, cfg: LambConfig) -> Result<Lamb> {
        cfg.validate()?;
        let mut slots: Vec<Slot> = vs
            .variables()
            .into_iter()
            .filter(|(_, p)| p.requires_grad())
            .map(|(name, param)| {
                let adapt = is_adapted(&name, &param);
                let m = param.f_zeros_like()?.f_detach()?;
                let v = param.f_zeros_like()?.f_detach()?;
                Ok(Slot {
                    name,
                    param,
                    m,
                    v,
                    adapt,
                })
            })
            .collect::<Result<_>>()?;
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Lamb {
            cfg,
            step: 0,
            slots,
        })
    }

    /// The settings.
    pub fn config(&self) -> &LambConfig {
        &self.cfg
    }

    /// Sets the learning rate of the following steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Number of steps taken.
    pub fn step_count(&self) -> i64 {
        self.step
    }

    /// The names of the adapted and of the excluded variables.
    pub fn partition(&self) -> (Vec<&str>, Vec<&str>) {
        let (a, e): (Vec<&Slot>, Vec<&Slot>) = self.slots.iter().partition(|s| s.adapt);
        (
            a.iter().map(|s| s.name.as_str()).collect(),
            e.iter().map(|s| s.name.as_str()).collect(),
        )
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        for s in self.slots.iter_mut() {
            s.param.zero_grad();
        }
    }

    /// The global L2 norm of the gradients, as a device scalar (no host synchronisation).
    pub fn grad_norm(&self) -> Result<Tensor> {
        let squares: Vec<Tensor> = self
            .slots
            .iter()
            .map(|s| s.param.grad())
            .filter(|g| g.defined())
            .map(|g| Ok(g.f_norm()?.f_to_kind(Kind::Double)?.f_square()?))
            .collect::<Result<_>>()?;
        if squares.is_empty() {
            return Ok(Tensor::f_zeros([], (Kind::Double, tch::Device::Cpu))?);
        }
        Ok(Tensor::f_stack(&squares, 0)?
            .f_sum(Kind::Double)?
            .f_sqrt()?)
    }

    /// One LAMB step on the current gradients (variables without a gradient are skipped),
    /// clipping them first when `max_grad_norm` is set. Returns the gradient norm before
    /// clipping, as a device scalar.
    pub fn step(&mut self) -> Result<Tensor> {
        let norm = self.grad_norm()?;
        // c/(‖g‖ + 1e-6), clamped at 1, computed as tch's `c / tensor` is: ((‖g‖ + 1e-6)/c)^−1.
        let scale = match self.cfg.max_grad_norm {
            Some(c) => Some(
                norm.f_add_scalar(1e-6)?
                    .f_div_scalar(c)?
                    .f_pow_tensor_scalar(-1)?
                    .f_clamp_max(1.0)?,
            ),
            None => None,
        };
        self.step += 1;
        for s in self.slots.iter_mut() {
            let grad = s.param.grad();
            if !grad.defined() {
                continue;
            }
            let grad = match &scale {
                Some(k) => {
                    let k = k.f_to_device(grad.device())?.f_to_kind(grad.kind())?;
                    grad.f_mul(&k)?
                }
                None => grad,
            };
            lamb_update(
                &mut s.param,
                &grad,
                &mut s.m,
                &mut s.v,
                self.step,
                &self.cfg,
                s.adapt,
            )?;
        }
        Ok(norm)
    }

    /// The state as named tensors: `m.<variable>`, `v.<variable>` and `step` (Int64 scalar).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.slots.len() + 1);
        for s in &self.slots {
            out.push((format!("m.{}", s.name), s.m.shallow_clone()));
            out.push((format!("v.{}", s.name), s.v.shallow_clone()));
        }
        out.push((STEP_KEY.to_string(), Tensor::from(self.step)));
        out
    }

    /// Restores a state saved by [`Lamb::state`] for the same model.
    pub fn load_state(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        let saved: HashMap<&str, &Tensor> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        if saved.len() != 2 * self.slots.len() + 1 {
            return Err(DdpmError::StateMismatch {
                part: "LAMB",
                reason: format!(
                    "the saved state has {} tensors, the model needs {}",
                    saved.len(),
                    2 * self.slots.len() + 1
                ),
            });
        }
        let step = saved
            .get(STEP_KEY)
            .ok_or_else(|| DdpmError::StateMismatch {
                part: "LAMB",
                reason: "the saved state has no step count".into(),
            })?;
        if step.numel() != 1 {
            return Err(DdpmError::StateMismatch {
                part: "LAMB",
                reason: format!(
                    "the saved step count has shape {:?}, not a scalar",
                    step.size()
                ),
            });
        }
        let step = i64::try_from(step.f_to_kind(Kind::Int64)?.f_reshape([-1])?.f_get(0)?)?;
        tch::no_grad(|| -> Result<()> {
            for s in self.slots.iter_mut() {
                for (prefix, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                    let key = format!("{prefix}.{}", s.name);
                    let src = saved
                        .get(key.as_str())
                        .ok_or_else(|| DdpmError::StateMismatch {
                            part: "LAMB",
                            reason: format!("the saved state lacks {key}"),
                        })?;
                    if src.size() != dst.size() {
                        return Err(DdpmError::StateMismatch {
                            part: "LAMB",
                            reason: format!(
                                "{key} has shape {:?}, the model's variable {:?}",
                                src.size(),
                                dst.size()
                            ),
                        });
                    }
                    dst.f_copy_(src)?;
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    fn dev() -> (Kind, Device) {
        (Kind::Double, Device::Cpu)
    }

    #[test]
    fn first_step_of_an_adapted_parameter_moves_it_by_lr_times_its_norm() {
        // At k = 1, m̂ = g and v̂ = g², so u ≈ sign(g) + wd·w and w moves by lr·‖w‖ exactly.
        let mut w = Tensor::from_slice(&[3.0, -4.0]);
        let g = Tensor::from_slice(&[0.5, 2.0]);
        let (mut m, mut v) = (w.zeros_like(), w.zeros_like());
        let cfg = LambConfig {
            lr: 0.1,
            weight_decay: 0.0,
            ..LambConfig::default()
        };
        let before = w.copy();
        lamb_update(&mut w, &g, &mut m, &mut v, 1, &cfg, true).unwrap();
        let moved = f64::try_from((&w - &before).norm()).unwrap();
        assert!((moved - 0.1 * 5.0).abs() < 1e-12, "{moved}");
        // Not adapted: w moves by lr·u, u ≈ sign(g).
        let mut b = Tensor::from_slice(&[3.0, -4.0]);
        let (mut m, mut v) = (b.zeros_like(), b.zeros_like());
        lamb_update(&mut b, &g, &mut m, &mut v, 1, &cfg, false).unwrap();
        let expected = Tensor::from_slice(&[
            3.0 - 0.1 * 0.5 / (0.5 + 1e-6),
            -4.0 - 0.1 * 2.0 / (2.0 + 1e-6),
        ]);
        assert!(f64::try_from((b - expected).abs().max()).unwrap() < 1e-12);
    }

    #[test]
    fn zero_weights_use_unit_trust_ratio() {
        let mut w = Tensor::zeros([3], dev());
        let g = Tensor::ones([3], dev());
        let (mut m, mut v) = (w.zeros_like(), w.zeros_like());
        lamb_update(&mut w, &g, &mut m, &mut v, 1, &LambConfig::default(), true).unwrap();
        assert!(f64::try_from(w.abs().min()).unwrap() > 0.0);
    }

    #[test]
    fn exclusion_rule_picks_biases_and_norms() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = nn::conv2d(&root / "block" / "conv1", 4, 8, 3, Default::default());
        let _ = nn::group_norm(&root / "block" / "norm1", 2, 8, Default::default());
        let _ = root.var("scale_table", &[8, 2], nn::Init::Const(1.0));
        let _ = root.var("norm_matrix", &[8, 2], nn::Init::Const(1.0));
        let lamb = Lamb::new(&vs, LambConfig::default()).unwrap();
        let (adapted, excluded) = lamb.partition();
        assert_eq!(adapted, vec!["block.conv1.weight", "scale_table"]);
        assert_eq!(
            excluded,
            vec![
                "block.conv1.bias",
                "block.norm1.bias",
                "block.norm1.weight",
                "norm_matrix"
            ]
        );
    }

    #[test]
    fn state_round_trips_and_training_continues_identically() {
        let make = || {
            let vs = VarStore::new(Device::Cpu);
            let _ = vs.root().var("w", &[2, 2], nn::Init::Const(0.5));
            let _ = vs.root().var("bias", &[2], nn::Init::Const(0.1));
            vs
        };
        let loss_of = |vs: &VarStore| {
            let vars = vs.variables();
            (vars["w"].sum(Kind::Float) * 3.0 + vars["bias"].square().sum(Kind::Float)).backward();
        };
        let cfg = LambConfig {
            max_grad_norm: Some(1.0),
            ..LambConfig::default()
        };
        let (vs_a, vs_b) = (make(), make());
        let mut a = Lamb::new(&vs_a, cfg).unwrap();
        let mut b = Lamb::new(&vs_b, cfg).unwrap();
        for _ in 0..3 {
            a.zero_grad();
            loss_of(&vs_a);
            let _ = a.step().unwrap();
        }
        // Copy weights and optimiser state into b, then take one more step on each.
        tch::no_grad(|| {
            for (n, mut t) in vs_b.variables() {
                t.copy_(&vs_a.variables()[&n]);
            }
        });
        b.load_state(&a.state()).unwrap();
        assert_eq!(b.step_count(), 3);
        for (lamb, vs) in [(&mut a, &vs_a), (&mut b, &vs_b)] {
            lamb.zero_grad();
            loss_of(vs);
            let _ = lamb.step().unwrap();
        }
        let diff = (&vs_a.variables()["w"] - &vs_b.variables()["w"])
            .abs()
            .max();
        assert_eq!(f64::try_from(diff).unwrap(), 0.0);
        assert!(matches!(
            b.load_state(&a.state()[1..]),
            Err(DdpmError::StateMismatch { part: "LAMB", .. })
        ));
    }

    #[test]
    fn clipping_bounds_the_gradient_norm_used() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[4, 4], nn::Init::Const(1.0));
        let mut lamb = Lamb::new(
            &vs,
            LambConfig {
                max_grad_norm: Some(0.5),
                ..LambConfig::default()
            },
        )
        .unwrap();
        (w.sum(Kind::Float) * 10.0).backward();
        let norm = f64::try_from(lamb.step().unwrap()).unwrap();
        assert!((norm - 40.0).abs() < 1e-4);
        // The first moment after one step is (1 − β1)·clipped g, ‖clipped g‖ = 0.5.
        let m_norm = f64::try_from(lamb.state()[0].1.norm()).unwrap();
        assert!((m_norm - 0.1 * 0.5).abs() < 1e-6, "{m_norm}");
    }
}
