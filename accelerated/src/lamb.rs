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
///
/// This is [`Lamb::step`]'s own whole-buffer update applied to one tensor (one segment), so
/// the property tests that hold it to the reference hold the optimiser's arithmetic. `param`,
/// `m` and `v` must be contiguous (they are updated through flat views).
pub fn lamb_update(
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    step: i64,
    cfg: &LambConfig,
    adapt: bool,
) -> Result<()> {
    check_step(step)?;
    let n = param.numel() as i64;
    for (what, t) in [("grad", grad), ("m", &*m), ("v", &*v)] {
        if t.size() != param.size() {
            return Err(DdpmError::ShapeMismatch {
                what,
                expected: format!("{:?} (the parameter's)", param.size()),
                got: t.size(),
            });
        }
    }
    let flat = |t: &Tensor, what: &'static str| -> Result<Tensor> {
        if !t.is_contiguous() {
            return Err(DdpmError::Incompatible {
                key: what,
                other: "LAMB's flat update".into(),
                reason: format!(
                    "it is not contiguous (strides {:?}); it is updated in place through a \
                     flat view",
                    t.stride()
                ),
            });
        }
        Ok(t.f_view([n])?)
    };
    let lengths = Tensor::f_from_slice(&[n])?.f_to_device(param.device())?;
    let len = if adapt { n } else { 0 };
    let index = segment_index(&lengths, n)?.f_narrow(0, 0, len)?;
    let adapted = Adapted {
        len,
        lengths: &lengths,
        index: &index,
    };
    let mut scratch = Scratch::new(n, len, (param.kind(), param.device()))?;
    tch::no_grad(|| {
        let (mut w, mut mf, mut vf) = (flat(param, "param")?, flat(m, "m")?, flat(v, "v")?);
        flat_update(
            &mut w,
            &grad.f_reshape([n])?,
            &mut mf,
            &mut vf,
            step,
            cfg,
            &adapted,
            &mut scratch,
        )
    })
}

fn check_step(step: i64) -> Result<()> {
    if step < 1 {
        return Err(DdpmError::OutOfRange {
            key: "step",
            value: step.to_string(),
            expected: "at least 1 (LAMB steps count from 1)".into(),
        });
    }
    Ok(())
}

/// A copy of `t`'s values (what `Tensor::copy` does, through the fallible calls).
fn deep_copy(t: &Tensor) -> Result<Tensor> {
    let t = t.f_detach()?;
    let mut out = t.f_zeros_like()?;
    out.f_copy_(&t)?;
    Ok(out)
}

/// The adapted prefix of a flat buffer: its first `len` elements, cut into the segments of
/// `lengths` (Int64 on the buffer's device, summing to `len`), one per adapted variable;
/// `index` (Int32, `len` elements) names each element's segment.
struct Adapted<'a> {
    len: i64,
    lengths: &'a Tensor,
    index: &'a Tensor,
}

/// Working memory of [`flat_update`], allocated once: two buffers of the update's length and
/// kind, and an f64 one as long as the adapted prefix (for the norms). Full-size temporaries
/// allocated at every step would cost more than the arithmetic on the CPU (each is fresh,
/// page-faulted memory), so the update writes into these instead.
#[derive(Debug)]
struct Scratch {
    a: Tensor,
    u: Tensor,
    d: Tensor,
}

impl Scratch {
    fn new(len: i64, adapted: i64, (kind, device): (Kind, tch::Device)) -> Result<Scratch> {
        Ok(Scratch {
            a: Tensor::f_empty([len], (kind, device))?,
            u: Tensor::f_empty([len], (kind, device))?,
            d: Tensor::f_empty([adapted], (Kind::Double, device))?,
        })
    }
}

/// ‖x_s‖ for each segment s of `lengths`, in the kind of `x`: squares summed in f64 (one
/// segmented reduction, deterministic), the root rounded once to x's kind. `d` is f64
/// working memory of x's length.
fn segment_norms(x: &Tensor, d: &mut Tensor, lengths: &Tensor) -> Result<Tensor> {
    d.f_copy_(x)?;
    let _ = d.f_square_()?;
    // `unsafe_ = true` skips libtorch's check that the lengths sum to the size, which reads
    // the lengths back to the host (a device synchronisation); they do by construction.
    let sums = Tensor::f_segment_reduce(d, "sum", Some(lengths), None, None, 0, true, 0.0)?;
    Ok(sums.f_sqrt()?.f_to_kind(x.kind())?)
}

/// The LAMB update over whole flat buffers `w`, `g`, `m`, `v` (same length): the elementwise
/// part once over everything, the trust ratios over the adapted prefix by one segmented
/// reduction per norm, expanded back per element. Per element it does exactly what the
/// per-tensor formula does, in the same order (every product, quotient and sum rounded as
/// there); only the norms are summed differently. `g` may be `scratch.u` itself: it is read
/// only before `u` is first written.
#[allow(clippy::too_many_arguments)]
fn flat_update(
    w: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    step: i64,
    cfg: &LambConfig,
    adapted: &Adapted<'_>,
    scratch: &mut Scratch,
) -> Result<()> {
    check_step(step)?;
    let Scratch { a, u, d } = scratch;
    // m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g².
    let _ = g.f_mul_scalar_out(a, 1.0 - cfg.beta1)?;
    let _ = m.f_mul_scalar_(cfg.beta1)?.f_add_(a)?;
    let _ = g.f_square_out(a)?;
    let _ = a.f_mul_scalar_(1.0 - cfg.beta2)?;
    let _ = v.f_mul_scalar_(cfg.beta2)?.f_add_(a)?;
    // u = m̂/(sqrt(v̂) + ε).
    let _ = m.f_div_scalar_out(u, 1.0 - cfg.beta1.powi(step as i32))?;
    let _ = v.f_div_scalar_out(a, 1.0 - cfg.beta2.powi(step as i32))?;
    let _ = a.f_sqrt_()?.f_add_scalar_(cfg.eps)?;
    let _ = u.f_div_(a)?;
    if adapted.len > 0 {
        let mut ua = u.f_narrow(0, 0, adapted.len)?;
        let aa = a.f_narrow(0, 0, adapted.len)?;
        let wa = w.f_narrow(0, 0, adapted.len)?;
        if cfg.weight_decay != 0.0 {
            let _ = wa.f_mul_scalar_out(&aa, cfg.weight_decay)?;
            let _ = ua.f_add_(&aa)?;
        }
        let w_norm = segment_norms(&wa, d, adapted.lengths)?;
        let u_norm = segment_norms(&ua, d, adapted.lengths)?;
        let both = w_norm.f_gt(0.0)?.f_logical_and(&u_norm.f_gt(0.0)?)?;
        let ratio = w_norm.f_div(&u_norm)?.f_where_scalarother(&both, 1.0)?;
        let _ = ratio.f_index_select_out(&aa, 0, adapted.index)?;
        let _ = ua.f_mul_(&aa)?;
    }
    let _ = w.f_sub_(&u.f_mul_scalar_(cfg.lr)?)?;
    Ok(())
}

/// Each element's segment for `lengths` (Int32, on `lengths`' device).
fn segment_index(lengths: &Tensor, len: i64) -> Result<Tensor> {
    let segments = lengths.size()[0];
    Ok(Tensor::f_arange(segments, (Kind::Int, lengths.device()))?
        .f_repeat_interleave_self_tensor(lengths, 0, len)?)
}

/// Whether LAMB adapts a variable (trust ratio and weight decay): every variable except
/// biases and normalisation parameters, recognised as tensors of dimension ≤ 1 or by name
/// (last component `bias`, or a component starting with `norm`).
pub fn is_adapted(name: &str, param: &Tensor) -> bool {
    let by_name =
        name.rsplit('.').next() == Some("bias") || name.split('.').any(|c| c.starts_with("norm"));
    param.dim() > 1 && !by_name
}

/// One trainable variable: its place in its group's buffers and views of its moments.
#[derive(Debug)]
struct Slot {
    name: String,
    /// Index of the entry in its group.
    entry: usize,
    /// Views of the group's m, v and gradient buffers.
    m: Tensor,
    v: Tensor,
    grad: Tensor,
    adapt: bool,
}

/// The flat state of one kind and device: the weights' buffer (the variables are views of
/// it), the gradients', the moments' (their trainable prefix), and the adapted segments.
#[derive(Debug)]
struct Part {
    group: crate::flat::Group,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    /// The padded lengths of the adapted variables, Int64 on the device.
    lengths: Tensor,
    /// Each adapted element's segment (Int32 on the device).
    index: Tensor,
    scratch: Scratch,
    slots: Vec<Slot>,
}

impl Part {
    fn new(group: crate::flat::Group) -> Result<Part> {
        let opts = (group.kind(), group.device());
        let n = group.trainable_len;
        let (grad, m, v) = (
            Tensor::f_zeros([n], opts)?,
            Tensor::f_zeros([n], opts)?,
            Tensor::f_zeros([n], opts)?,
        );
        let lengths: Vec<i64> = group
            .entries
            .iter()
            .filter(|e| e.adapt)
            .map(|e| e.padded)
            .collect();
        let lengths = Tensor::f_from_slice(&lengths)?.f_to_device(group.device())?;
        let index = segment_index(&lengths, group.adapted_len)?;
        let scratch = Scratch::new(n, group.adapted_len, opts)?;
        let slots = group
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.trainable)
            .map(|(i, e)| {
                Ok(Slot {
                    name: e.name.clone(),
                    entry: i,
                    m: e.view_of(&m)?,
                    v: e.view_of(&v)?,
                    grad: e.view_of(&grad)?,
                    adapt: e.adapt,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Part {
            group,
            grad,
            m,
            v,
            lengths,
            index,
            scratch,
            slots,
        })
    }

    /// Brings the variables' gradients into the gradient buffer and returns the slots whose
    /// variable has none. A gradient that autograd created afresh (the first backward pass)
    /// is copied in once and then pointed at its place (`set_data`), so later backward passes
    /// accumulate into the buffer in place and this costs nothing; a slot without a gradient
    /// gets zeros there (it adds nothing to the global norm) and is skipped by the step.
    fn gather_grads(&self) -> Result<Vec<usize>> {
        let base = self.grad.data_ptr() as usize;
        let mut missing = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for (i, s) in self.slots.iter().enumerate() {
                let entry = &self.group.entries[s.entry];
                self.group.check_view("LAMB", entry, &entry.var)?;
                let mut g = entry.var.grad();
                let mut place = s.grad.shallow_clone();
                if !g.defined() {
                    let _ = place.f_zero_()?;
                    missing.push(i);
                } else if g.data_ptr() as usize != self.group.address(base, entry) {
                    place.f_copy_(&g)?;
                    g.f_set_data(&place)?;
                }
            }
            Ok(())
        })?;
        Ok(missing)
    }
}

/// LAMB over the trainable variables of a `VarStore`, on flat buffers: [`Lamb::new`] makes
/// every variable a view of one buffer per kind and device (`flat.rs`), keeps the gradients,
/// m and v as buffers laid out alike, and [`Lamb::step`] is ~20 whole-buffer kernels however
/// many variables there are. After `Lamb::new` the variables must keep their storage: copy
/// into them (`copy_`, `VarStore::copy`, checkpoint loads), never replace it
/// (`VarStore::set_kind`); a step on replaced variables is an error.
#[derive(Debug)]
pub struct Lamb {
    cfg: LambConfig,
    step: i64,
    parts: Vec<Part>,
}

const STEP_KEY: &str = "step";

impl Lamb {
    /// Optimiser for the trainable variables of `vs`, moments at zero; flattens the variables
    /// of `vs` (or reuses their buffer if [`crate::ema::Ema::new`] already did).
    pub fn new(vs: &VarStore, cfg: LambConfig) -> Result<Lamb> {
        cfg.validate()?;
        let parts = crate::flat::FlatVars::of(vs)?
            .groups
            .into_iter()
            .filter(|g| g.trainable_len > 0)
            .map(Part::new)
            .collect::<Result<_>>()?;
        Ok(Lamb {
            cfg,
            step: 0,
            parts,
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

    /// The slots of every part, sorted by variable name.
    fn sorted_slots(&self) -> Vec<&Slot> {
        let mut all: Vec<&Slot> = self.parts.iter().flat_map(|p| p.slots.iter()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The names of the adapted and of the excluded variables.
    pub fn partition(&self) -> (Vec<&str>, Vec<&str>) {
        let (a, e): (Vec<&Slot>, Vec<&Slot>) =
            self.sorted_slots().into_iter().partition(|s| s.adapt);
        (
            a.iter().map(|s| s.name.as_str()).collect(),
            e.iter().map(|s| s.name.as_str()).collect(),
        )
    }

    /// The flat weight buffers (one per kind and device) that the trainable variables are
    /// views of, from the first variable's first element over the trainable ones.
    pub fn weight_buffers(&self) -> Result<Vec<Tensor>> {
        self.parts
            .iter()
            .map(|p| Ok(p.group.buffer.f_narrow(0, 0, p.group.trainable_len)?))
            .collect()
    }

    /// The flat gradient buffers, laid out as [`Lamb::weight_buffers`]; each variable's
    /// gradient is a view of its place there from the first step on.
    pub fn grad_buffers(&self) -> Vec<Tensor> {
        self.parts.iter().map(|p| p.grad.shallow_clone()).collect()
    }

    /// Sets every gradient to zero (one kernel per buffer once the gradients are views of it).
    pub fn zero_grad(&mut self) {
        for p in self.parts.iter_mut() {
            let base = p.grad.data_ptr() as usize;
            for s in &p.slots {
                let entry = &p.group.entries[s.entry];
                let g = entry.var.grad();
                if g.defined() && g.data_ptr() as usize != p.group.address(base, entry) {
                    entry.var.shallow_clone().zero_grad();
                }
            }
            let _ = p.grad.zero_();
        }
    }

    /// The global L2 norm of the gradients, as a device scalar (no host synchronisation).
    pub fn grad_norm(&self) -> Result<Tensor> {
        for p in &self.parts {
            let _ = p.gather_grads()?;
        }
        self.buffer_grad_norm()
    }

    /// The global L2 norm of the gradient buffers (gathered), accumulated in f64.
    fn buffer_grad_norm(&self) -> Result<Tensor> {
        let Some(first) = self.parts.first() else {
            return Ok(Tensor::f_zeros([], (Kind::Double, tch::Device::Cpu))?);
        };
        let squares: Vec<Tensor> = self
            .parts
            .iter()
            .map(|p| {
                Ok(p.grad
                    .f_norm_scalaropt_dtype(2, Kind::Double)?
                    .f_square()?
                    .f_to_device(first.group.device())?)
            })
            .collect::<Result<_>>()?;
        Ok(Tensor::f_stack(&squares, 0)?
            .f_sum(Kind::Double)?
            .f_sqrt()?)
    }

    /// One LAMB step on the current gradients (variables without a gradient are skipped:
    /// their weights and moments stay as they were), clipping them first when
    /// `max_grad_norm` is set. Returns the gradient norm before clipping, as a device scalar.
    pub fn step(&mut self) -> Result<Tensor> {
        let missing: Vec<Vec<usize>> = self
            .parts
            .iter()
            .map(Part::gather_grads)
            .collect::<Result<_>>()?;
        let norm = self.buffer_grad_norm()?;
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
        let (step, cfg) = (self.step, self.cfg);
        tch::no_grad(|| -> Result<()> {
            for (p, missing) in self.parts.iter_mut().zip(&missing) {
                // The clipped gradient goes to the working buffer `u`, which the update
                // overwrites only after its last read of the gradient.
                let grad = match &scale {
                    Some(k) => {
                        let k = k.f_to_device(p.grad.device())?.f_to_kind(p.grad.kind())?;
                        p.grad.f_mul_out(&p.scratch.u, &k)?
                    }
                    None => p.grad.shallow_clone(),
                };
                // Skipped variables: keep their weights and moments as they are.
                let kept: Vec<[Tensor; 3]> = missing
                    .iter()
                    .map(|&i| {
                        let s = &p.slots[i];
                        let w = &p.group.entries[s.entry].var;
                        Ok([deep_copy(w)?, deep_copy(&s.m)?, deep_copy(&s.v)?])
                    })
                    .collect::<Result<_>>()?;
                let mut w = p.group.buffer.f_narrow(0, 0, p.group.trainable_len)?;
                let adapted = Adapted {
                    len: p.group.adapted_len,
                    lengths: &p.lengths,
                    index: &p.index,
                };
                flat_update(
                    &mut w,
                    &grad,
                    &mut p.m,
                    &mut p.v,
                    step,
                    &cfg,
                    &adapted,
                    &mut p.scratch,
                )?;
                for (&i, [w0, m0, v0]) in missing.iter().zip(kept) {
                    let s = &p.slots[i];
                    p.group.entries[s.entry].var.shallow_clone().f_copy_(&w0)?;
                    s.m.shallow_clone().f_copy_(&m0)?;
                    s.v.shallow_clone().f_copy_(&v0)?;
                }
            }
            Ok(())
        })?;
        Ok(norm)
    }

    /// The state as named tensors: `m.<variable>`, `v.<variable>` and `step` (Int64 scalar).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let slots = self.sorted_slots();
        let mut out = Vec::with_capacity(2 * slots.len() + 1);
        for s in slots {
            out.push((format!("m.{}", s.name), s.m.shallow_clone()));
            out.push((format!("v.{}", s.name), s.v.shallow_clone()));
        }
        out.push((STEP_KEY.to_string(), Tensor::from(self.step)));
        out
    }

    /// Restores a state saved by [`Lamb::state`] for the same model.
    pub fn load_state(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        let saved: HashMap<&str, &Tensor> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let slots = self.sorted_slots();
        if saved.len() != 2 * slots.len() + 1 {
            return Err(DdpmError::StateMismatch {
                part: "LAMB",
                reason: format!(
                    "the saved state has {} tensors, the model needs {}",
                    saved.len(),
                    2 * slots.len() + 1
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
            for s in &slots {
                for (prefix, dst) in [("m", &s.m), ("v", &s.v)] {
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
                    dst.shallow_clone().f_copy_(src)?;
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

    /// The variables, their gradients and the moments really are views of the flat buffers:
    /// writing the buffer changes the variable, backward passes accumulate into the gradient
    /// buffer in place (two passes give the sum), zero_grad zeroes it, and a variable whose
    /// data is replaced afterwards makes the step an error.
    #[test]
    fn variables_and_gradients_are_views_of_the_flat_buffers() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let lin = nn::linear(&root / "lin", 3, 4, Default::default());
        let _ = nn::group_norm(&root / "norm", 2, 4, Default::default());
        let mut lamb = Lamb::new(&vs, LambConfig::default()).unwrap();
        let ema = crate::ema::Ema::new(&vs, 0.9, false).unwrap();
        let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let loss = |vs: &VarStore| {
            let v = vs.variables();
            (x.matmul(&v["lin.weight"].tr()) + &v["lin.bias"])
                .square()
                .sum(Kind::Float)
                + v["norm.weight"].sum(Kind::Float)
                + v["norm.bias"].sum(Kind::Float)
        };
        let inside = |t: &Tensor, buffer: &Tensor| {
            let (p, b) = (t.data_ptr() as usize, buffer.data_ptr() as usize);
            let end = b + buffer.numel() * buffer.kind().elt_size_in_bytes();
            p >= b && p + t.numel() * t.kind().elt_size_in_bytes() <= end
        };
        for step in 0..3 {
            lamb.zero_grad();
            loss(&vs).backward();
            let _ = lamb.step().unwrap();
            let (w, g) = (&lamb.weight_buffers().unwrap()[0], &lamb.grad_buffers()[0]);
            for (name, v) in vs.variables() {
                assert!(
                    inside(&v, w),
                    "step {step}: {name} is not in the weight buffer"
                );
                assert!(
                    inside(&v.grad(), g),
                    "step {step}: the gradient of {name} is not in the gradient buffer"
                );
            }
        }
        // In-place accumulation: two backward passes give twice one pass's gradient.
        lamb.zero_grad();
        let g = lamb.grad_buffers()[0].shallow_clone();
        assert_eq!(f64::try_from(g.abs().sum(Kind::Double)).unwrap(), 0.0);
        loss(&vs).backward();
        let once = g.copy();
        loss(&vs).backward();
        let diff = (&g - &once * 2.0).abs().max();
        assert_eq!(f64::try_from(diff).unwrap(), 0.0);
        assert!(f64::try_from(once.abs().sum(Kind::Double)).unwrap() > 0.0);
        // Writing the buffer writes the variable (and the layer's own handle sees it).
        let _ = lamb.weight_buffers().unwrap()[0].narrow(0, 0, 1).fill_(7.0);
        assert_eq!(lin.ws.double_value(&[0, 0]), 7.0);
        let exported = ema.export();
        assert_eq!(exported.len(), 4);
        // Replaced data is caught instead of silently left out of the update.
        vs.variables()["lin.weight"]
            .shallow_clone()
            .set_data(&Tensor::zeros([4, 3], (Kind::Float, Device::Cpu)));
        assert!(matches!(
            lamb.step(),
            Err(DdpmError::StateMismatch { part: "LAMB", .. })
        ));
    }

    /// A variable without a gradient (unused by the loss) keeps its weights and moments;
    /// the others take their step.
    #[test]
    fn variables_without_a_gradient_are_skipped() {
        let vs = VarStore::new(Device::Cpu);
        let used = vs.root().var("used", &[3, 2], nn::Init::Const(1.0));
        let unused = vs.root().var("unused", &[2, 2], nn::Init::Const(0.5));
        let mut lamb = Lamb::new(&vs, LambConfig::default()).unwrap();
        for _ in 0..2 {
            lamb.zero_grad();
            (used.sum(Kind::Float) * 2.0).backward();
            let _ = lamb.step().unwrap();
        }
        assert!(!unused.grad().defined());
        assert_eq!(
            Vec::<f32>::try_from(unused.flatten(0, -1)).unwrap(),
            vec![0.5; 4]
        );
        assert!(used.double_value(&[0, 0]) < 1.0);
        let state: std::collections::HashMap<String, Tensor> = lamb.state().into_iter().collect();
        assert_eq!(
            f64::try_from(state["m.unused"].abs().sum(Kind::Double)).unwrap(),
            0.0
        );
        assert!(f64::try_from(state["m.used"].abs().sum(Kind::Double)).unwrap() > 0.0);
    }

    /// Every setting outside its domain is refused under its own name, and the edges of each
    /// domain are accepted: lr = 0, β = 0, weight decay 0 and any positive clip norm are
    /// settings (a frozen run, no momentum, no decay); lr < 0, β ≥ 1, ε ≤ 0, a negative decay,
    /// a clip norm ≤ 0, and anything not finite are not.
    #[test]
    fn every_setting_outside_its_domain_is_refused_by_name() {
        let ok = LambConfig::default();
        let with = |f: &dyn Fn(&mut LambConfig)| {
            let mut c = ok;
            f(&mut c);
            c
        };
        let bad: [(&str, LambConfig); 14] = [
            ("lr", with(&|c| c.lr = -1e-3)),
            ("lr", with(&|c| c.lr = f64::NAN)),
            ("lr", with(&|c| c.lr = f64::INFINITY)),
            ("beta1", with(&|c| c.beta1 = 1.0)),
            ("beta1", with(&|c| c.beta1 = -0.1)),
            ("beta2", with(&|c| c.beta2 = 1.0)),
            ("beta2", with(&|c| c.beta2 = -0.1)),
            ("eps", with(&|c| c.eps = 0.0)),
            ("eps", with(&|c| c.eps = f64::INFINITY)),
            ("eps", with(&|c| c.eps = f64::NAN)),
            ("weight_decay", with(&|c| c.weight_decay = -0.01)),
            ("weight_decay", with(&|c| c.weight_decay = f64::INFINITY)),
            ("max_grad_norm", with(&|c| c.max_grad_norm = Some(0.0))),
            ("max_grad_norm", with(&|c| c.max_grad_norm = Some(-1.0))),
        ];
        for (name, cfg) in bad {
            match cfg.validate() {
                Err(DdpmError::OutOfRange { key, .. }) => assert_eq!(key, name, "{cfg:?}"),
                other => panic!("{cfg:?} ({name}): {other:?}"),
            }
        }
        let edges = [
            with(&|c| c.lr = 0.0),
            with(&|c| c.beta1 = 0.0),
            with(&|c| c.beta2 = 0.0),
            with(&|c| c.eps = f64::MIN_POSITIVE),
            with(&|c| c.weight_decay = 0.0),
            with(&|c| c.max_grad_norm = Some(f64::MIN_POSITIVE)),
            with(&|c| c.max_grad_norm = None),
        ];
        for cfg in edges {
            assert!(cfg.validate().is_ok(), "{cfg:?}");
        }
    }

    /// `zero_grad` clears every gradient, whether autograd made it (before the first step) or
    /// it is already a view of the flat gradient buffer (after); `grad_norm` is the global
    /// L2 norm of the gradients, ‖(g_1, …, g_n)‖, here with g = 3 for each of 6 weights and
    /// g = 2 for each of 2: √(6·9 + 2·4) = √62.
    #[test]
    fn zero_grad_clears_every_gradient_and_grad_norm_is_the_global_norm() {
        let vs = VarStore::new(Device::Cpu);
        let a = vs.root().var("a", &[3, 2], nn::Init::Const(1.0));
        let b = vs.root().var("b", &[2], nn::Init::Const(1.0));
        let mut lamb = Lamb::new(&vs, LambConfig::default()).unwrap();
        let loss = || (a.sum(Kind::Float) * 3.0 + b.sum(Kind::Float) * 2.0).backward();
        let grad_sum = |t: &Tensor| f64::try_from(t.grad().abs().sum(Kind::Double)).unwrap();
        for step in 0..2 {
            // Straight after backward: before the first step autograd's own tensors.
            loss();
            lamb.zero_grad();
            assert_eq!((grad_sum(&a), grad_sum(&b)), (0.0, 0.0), "step {step}");
            loss();
            let norm = f64::try_from(lamb.grad_norm().unwrap()).unwrap();
            assert!((norm - 62f64.sqrt()).abs() < 1e-6, "step {step}: {norm}");
            let _ = lamb.step().unwrap();
            lamb.zero_grad();
            assert_eq!(
                (grad_sum(&a), grad_sum(&b)),
                (0.0, 0.0),
                "after step {step}"
            );
        }
    }

    /// `config` reports the settings LAMB was built with, and the learning rate `set_lr` set.
    #[test]
    fn config_reports_the_settings_and_the_lr_set() {
        let vs = VarStore::new(Device::Cpu);
        let _w = vs.root().var("w", &[2, 2], nn::Init::Const(1.0));
        let cfg = LambConfig {
            lr: 0.25,
            beta1: 0.5,
            weight_decay: 0.0,
            max_grad_norm: Some(3.0),
            ..LambConfig::default()
        };
        let mut lamb = Lamb::new(&vs, cfg).unwrap();
        assert_eq!(lamb.config(), &cfg);
        lamb.set_lr(0.125);
        assert_eq!(lamb.config(), &LambConfig { lr: 0.125, ..cfg });
    }

    /// Step 0 is refused before anything moves: its bias corrections 1 − β^0 are 0, so m̂ and
    /// v̂ would be 0/0.
    #[test]
    fn step_zero_is_refused_and_changes_nothing() {
        let mut w = Tensor::from_slice(&[3.0, -4.0]);
        let g = Tensor::from_slice(&[0.5, 2.0]);
        let (mut m, mut v) = (w.zeros_like(), w.zeros_like());
        let err = lamb_update(&mut w, &g, &mut m, &mut v, 0, &LambConfig::default(), true);
        assert!(
            matches!(err, Err(DdpmError::OutOfRange { key: "step", .. })),
            "{err:?}"
        );
        assert_eq!(Vec::<f64>::try_from(&w).unwrap(), vec![3.0, -4.0]);
        assert!(lamb_update(&mut w, &g, &mut m, &mut v, 1, &LambConfig::default(), true).is_ok());
    }
}
