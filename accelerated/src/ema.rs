//! Exponential moving average of the weights, kept as a shadow copy of every variable: one
//! flat shadow buffer per kind and device, laid out as the flat weight buffer the variables
//! are views of (`flat.rs`), so an update is one `lerp_` however many variables there are.

use crate::error::{DdpmError, Result};
use crate::flat::{FlatVars, Group};
use std::collections::HashMap;
use tch::nn::VarStore;
use tch::Tensor;

/// Shadow weights w̄ ← d w̄ + (1 − d) w after each update, with d = decay, or with warm-up
/// d_k = min(decay, (1 + k)/(10 + k)) at the k-th update (k = 0, 1, …; TensorFlow's
/// `num_updates` rule), so early averages are not dominated by the random initial weights.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    warmup: bool,
    updates: u64,
    /// Each group of the weights with its flat shadow.
    parts: Vec<(Group, Tensor)>,
    /// (name, part, entry) sorted by name: the order of [`Ema::export`].
    names: Vec<(String, usize, usize)>,
}

impl Ema {
    /// Starts the average at the current weights of `vs`; `decay` in [0, 1). Flattens the
    /// variables of `vs` (or reuses their buffer if [`crate::lamb::Lamb::new`] already did);
    /// afterwards they must keep their storage (see [`crate::lamb::Lamb`]).
    pub fn new(vs: &VarStore, decay: f64, warmup: bool) -> Result<Ema> {
        if !(0.0..1.0).contains(&decay) {
            return Err(DdpmError::OutOfRange {
                key: "decay",
                value: decay.to_string(),
                expected: "in [0, 1) (the EMA decay)".into(),
            });
        }
        let mut parts = Vec::new();
        for group in FlatVars::of(vs)?.groups {
            let mut shadow = group.buffer.f_zeros_like()?;
            tch::no_grad(|| shadow.f_copy_(&group.buffer))?;
            parts.push((group, shadow));
        }
        let mut names: Vec<(String, usize, usize)> = parts
            .iter()
            .enumerate()
            .flat_map(|(p, (g, _))| {
                g.entries
                    .iter()
                    .enumerate()
                    .map(move |(e, entry)| (entry.name.clone(), p, e))
            })
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Ema {
            decay,
            warmup,
            updates: 0,
            parts,
            names,
        })
    }

    /// The decay the next update will use.
    pub fn current_decay(&self) -> f64 {
        if self.warmup {
            let k = self.updates as f64;
            self.decay.min((1.0 + k) / (10.0 + k))
        } else {
            self.decay
        }
    }

    /// Number of updates so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The averaged tensor of a named entry: a view of its part's shadow.
    fn shadow_of(&self, part: usize, entry: usize) -> Result<Tensor> {
        let (group, shadow) = &self.parts[part];
        group.entries[entry].view_of(shadow)
    }

    /// w̄ ← d w̄ + (1 − d) w for every variable of `vs` (the one given to [`Ema::new`], whose
    /// variables must still be views of the flat weight buffer): one `lerp_` per buffer.
    pub fn update(&mut self, vs: &VarStore) -> Result<()> {
        let d = self.current_decay();
        let vars = vs.variables();
        for (group, _) in &self.parts {
            for entry in &group.entries {
                let w = vars.get(&entry.name).ok_or_else(|| missing(&entry.name))?;
                group.check_view("EMA", entry, w)?;
            }
        }
        tch::no_grad(|| -> Result<()> {
            for (group, shadow) in self.parts.iter_mut() {
                let _ = shadow.f_lerp_(&group.buffer, 1.0 - d)?;
            }
            Ok(())
        })?;
        self.updates += 1;
        Ok(())
    }

    /// Copies the averaged weights into `vs` (e.g. a second model used for sampling).
    pub fn copy_to(&self, vs: &VarStore) -> Result<()> {
        let vars = vs.variables();
        tch::no_grad(|| {
            for (name, p, e) in &self.names {
                let mut w = vars.get(name).ok_or_else(|| missing(name))?.shallow_clone();
                w.f_copy_(&self.shadow_of(*p, *e)?)?;
            }
            Ok(())
        })
    }

    /// The averaged weights under the model's variable names (a loadable weight set).
    pub fn export(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .filter_map(|(n, p, e)| Some((n.clone(), self.shadow_of(*p, *e).ok()?)))
            .collect()
    }

    /// Restores averaged weights saved by [`Ema::export`] and the update count.
    pub fn import(&mut self, named: &[(String, Tensor)], updates: u64) -> Result<()> {
        let saved: HashMap<&str, &Tensor> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        if saved.len() != self.names.len() {
            return Err(DdpmError::StateMismatch {
                part: "EMA",
                reason: format!(
                    "the saved average has {} tensors, the model {}",
                    saved.len(),
                    self.names.len()
                ),
            });
        }
        tch::no_grad(|| {
            for (name, p, e) in &self.names {
                let mut avg = self.shadow_of(*p, *e)?;
                let src = saved.get(name.as_str()).ok_or_else(|| missing(name))?;
                if src.size() != avg.size() {
                    return Err(DdpmError::StateMismatch {
                        part: "EMA",
                        reason: format!(
                            "tensor {name} has shape {:?}, the model's {:?}",
                            src.size(),
                            avg.size()
                        ),
                    });
                }
                avg.f_copy_(src)?;
            }
            Ok(())
        })?;
        self.updates = updates;
        Ok(())
    }
}

fn missing(name: &str) -> DdpmError {
    DdpmError::StateMismatch {
        part: "EMA",
        reason: format!("variable {name} is missing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind};

    #[test]
    fn averages_towards_the_weights() {
        let vs = VarStore::new(Device::Cpu);
        let mut w = vs.root().zeros("w", &[3]);
        let mut ema = Ema::new(&vs, 0.9, false).unwrap();
        tch::no_grad(|| {
            let _ = w.fill_(1.0);
        });
        ema.update(&vs).unwrap();
        ema.update(&vs).unwrap();
        // 1 − 0.9² after two updates towards 1 from 0.
        let got = ema.export()[0].1.double_value(&[0]);
        assert!((got - 0.19).abs() < 1e-6);

        let other = VarStore::new(Device::Cpu);
        let _ = other.root().var("w", &[3], nn::Init::Const(5.0));
        ema.copy_to(&other).unwrap();
        assert!((other.variables()["w"].double_value(&[2]) - 0.19).abs() < 1e-6);

        let mut restored = Ema::new(&vs, 0.9, false).unwrap();
        restored.import(&ema.export(), ema.updates()).unwrap();
        assert_eq!(restored.updates(), 2);
        assert!((restored.export()[0].1.double_value(&[1]) - 0.19).abs() < 1e-6);
        let wrong = vec![(
            "w".to_string(),
            Tensor::zeros([4], (Kind::Float, Device::Cpu)),
        )];
        assert!(matches!(
            restored.import(&wrong, 0),
            Err(DdpmError::StateMismatch { part: "EMA", .. })
        ));
    }

    #[test]
    fn warmup_limits_the_early_decay() {
        let vs = VarStore::new(Device::Cpu);
        let _ = vs.root().zeros("w", &[1]);
        let mut ema = Ema::new(&vs, 0.9999, true).unwrap();
        assert!((ema.current_decay() - 0.1).abs() < 1e-15);
        for _ in 0..90 {
            ema.update(&vs).unwrap();
        }
        assert!((ema.current_decay() - 91.0 / 100.0).abs() < 1e-15);
        assert!(matches!(
            Ema::new(&vs, 1.0, true),
            Err(DdpmError::OutOfRange { key: "decay", .. })
        ));
    }
}
