//! DPM-Solver++(2M) (Lu et al. 2022), multistep, data-prediction form, in the article's
//! notation: λ_t = ln(ᾱ_t/β̄_t), D = x̂_0 = (x_t − β̄_t ε̂)/ᾱ_t, a step s → t with h = λ_t − λ_s:
//! x_t = (β̄_t/β̄_s) x_s + ᾱ_t (1 − e^{−h}) D, where D = D_s on the first step and on the last
//! (to t = 0), and D = (1 + 1/(2r)) D_s − D_u/(2r), r = (λ_s − λ_u)/h, on the others (u the
//! step before s). The twin of `ddpm_reference::dpm_solver`; docs/derivations.md, section 15.
//! [`crate::sampler::Sampler`] runs it when `SamplerConfig::dpm_solver` is set.

use crate::error::{DdpmError, Result};
use crate::marginal::same_shape;
use crate::schedule::Schedule;
use crate::timesteps::{spaced, step_pairs, Spacing};
use tch::{Device, Kind, Tensor};

/// How the solver walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Network evaluations n, 1 ≤ n ≤ T − 1 (n ≤ T for `Trailing`).
    pub steps: usize,
    /// Which steps ([`visited`]).
    pub spacing: Spacing,
    /// Clip x̂_0 to [−1, 1] before it is used (`sample.clip_each_step`).
    pub clip_x0: bool,
}

/// The n steps DPM-Solver++ visits, as diffusers' `DPMSolverMultistepScheduler` chooses them:
/// for `Strided`, `Linspace` and `Leading` the list of n + 1 steps without its last one (t = 1),
/// so the last step jumps from about T/n to 0; for `Trailing` the trailing list itself.
pub fn visited(t_max: i64, steps: usize, spacing: Spacing) -> Result<Vec<i64>> {
    if spacing == Spacing::Trailing {
        return spaced(t_max, steps, spacing);
    }
    if steps == 0 || steps as i64 >= t_max {
        return Err(DdpmError::OutOfRange {
            key: "steps",
            value: steps.to_string(),
            expected: format!(
                "between 1 and T − 1 = {} (DPM-Solver++ with spacing {} visits n of the n + 1 listed steps)",
                t_max - 1,
                spacing.name()
            ),
        });
    }
    let mut list = spaced(t_max, steps + 1, spacing)?;
    list.pop();
    Ok(list)
}

/// One step's coefficients: x_t = c_x x_s + c_d D, and 1/(2r) on second-order steps.
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    alpha_bar: f64,
    beta_bar: f64,
    c_x: f64,
    c_d: f64,
    half_over_r: Option<f64>,
}

/// DPM-Solver++(2M) over the visited steps of a schedule, its coefficients as host f64 scalars.
#[derive(Debug, Clone)]
pub struct DpmSolver {
    cfg: Config,
    pairs: Vec<(i64, i64)>,
    coefficients: Vec<Coefficients>,
}

impl DpmSolver {
    /// The solver over [`visited`]`(T, cfg.steps, cfg.spacing)`.
    pub fn new(schedule: &Schedule, cfg: Config) -> Result<DpmSolver> {
        let steps = visited(schedule.t_max(), cfg.steps, cfg.spacing)?;
        let mut solver = Self::from_visited(schedule, &steps, cfg.clip_x0)?;
        solver.cfg = cfg;
        Ok(solver)
    }

    /// The solver over any distinct descending list within 1..=T (then a last step to 0).
    pub fn from_visited(schedule: &Schedule, visited: &[i64], clip_x0: bool) -> Result<DpmSolver> {
        let t_max = schedule.t_max();
        let ok = !visited.is_empty()
            && visited.windows(2).all(|w| w[0] > w[1])
            && visited.iter().all(|&t| (1..=t_max).contains(&t));
        if !ok {
            return Err(DdpmError::OutOfRange {
                key: "visited",
                value: format!("{visited:?}"),
                expected: format!("distinct, descending steps within 1..={t_max}"),
            });
        }
        let host = |t: &Tensor| -> Result<Vec<f64>> {
            Ok(Vec::<f64>::try_from(
                t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?,
            )?)
        };
        let (ab, bb) = (host(schedule.alpha_bars())?, host(schedule.beta_bars())?);
        let lambda = |t: i64| ab[t as usize].ln() - bb[t as usize].ln();
        let pairs = step_pairs(visited);
        let coefficients = pairs
            .iter()
            .enumerate()
            .map(|(i, &(s, t))| {
                let h = lambda(t) - lambda(s);
                let half_over_r = match (i, t) {
                    (0, _) | (_, 0) => None,
                    _ => Some(0.5 * h / (lambda(s) - lambda(pairs[i - 1].0))),
                };
                Coefficients {
                    alpha_bar: ab[s as usize],
                    beta_bar: bb[s as usize],
                    c_x: bb[t as usize] / bb[s as usize],
                    c_d: -ab[t as usize] * (-h).exp_m1(),
                    half_over_r,
                }
            })
            .collect();
        Ok(DpmSolver {
            cfg: Config {
                steps: visited.len(),
                spacing: Spacing::Strided,
                clip_x0,
            },
            pairs,
            coefficients,
        })
    }

    /// The settings it was built with.
    pub fn config(&self) -> Config {
        self.cfg
    }

    /// The (s, t) steps walked, from (τ_n, τ_{n−1}) down to (τ_1, 0).
    pub fn steps(&self) -> &[(i64, i64)] {
        &self.pairs
    }

    /// Whether step `i` needs the previous step's x̂_0 (all but the first and the last).
    pub fn is_second_order(&self, i: usize) -> bool {
        self.coefficients
            .get(i)
            .is_some_and(|c| c.half_over_r.is_some())
    }

    /// Step `i`: x_t from x_s [B, …] and ε̂(x_s, s), and the x̂_0 it used (for step i + 1);
    /// `prev_x0` is step i − 1's, given exactly when [`DpmSolver::is_second_order`]. Runs in the
    /// kind of `x`.
    pub fn step(
        &self,
        i: usize,
        x: &Tensor,
        eps_hat: &Tensor,
        prev_x0: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let c = *self
            .coefficients
            .get(i)
            .ok_or_else(|| DdpmError::OutOfRange {
                key: "i",
                value: i.to_string(),
                expected: format!("below {}, the number of steps walked", self.pairs.len()),
            })?;
        same_shape("x_t", x, "eps_hat", eps_hat)?;
        let mut x0 = x
            .f_sub(&eps_hat.f_mul_scalar(c.beta_bar)?)?
            .f_div_scalar(c.alpha_bar)?;
        if self.cfg.clip_x0 {
            x0 = x0.f_clamp(-1.0, 1.0)?;
        }
        let d = match (c.half_over_r, prev_x0) {
            (None, None) => x0.shallow_clone(),
            (Some(w), Some(prev)) => {
                same_shape("x_t", x, "prev_x0", prev)?;
                x0.f_mul_scalar(1.0 + w)?.f_sub(&prev.f_mul_scalar(w)?)?
            }
            _ => {
                return Err(DdpmError::OutOfRange {
                    key: "prev_x0",
                    value: if prev_x0.is_some() { "given" } else { "absent" }.into(),
                    expected: format!(
                        "given exactly at the second-order steps (1 to {}), not at step {i}",
                        self.pairs.len().saturating_sub(2)
                    ),
                })
            }
        };
        let next = x.f_mul_scalar(c.c_x)?.f_add(&d.f_mul_scalar(c.c_d)?)?;
        Ok((next, x0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleKind;

    #[test]
    fn lists_and_orders() {
        assert_eq!(visited(1000, 10, Spacing::Strided).unwrap()[9], 101);
        assert_eq!(visited(1000, 10, Spacing::Trailing).unwrap()[9], 100);
        assert!(matches!(
            visited(10, 10, Spacing::Strided),
            Err(DdpmError::OutOfRange { key: "steps", .. })
        ));
        let s = Schedule::new(ScheduleKind::Article, 100, Device::Cpu).unwrap();
        let cfg = Config {
            steps: 4,
            spacing: Spacing::Strided,
            clip_x0: false,
        };
        let solver = DpmSolver::new(&s, cfg).unwrap();
        let orders: Vec<bool> = (0..4).map(|i| solver.is_second_order(i)).collect();
        assert_eq!(orders, [false, true, true, false]);
        let x = Tensor::ones([2, 3], (Kind::Double, Device::Cpu));
        assert!(solver.step(1, &x, &x, None).is_err());
        assert!(solver.step(0, &x, &x, Some(&x)).is_err());
        assert!(solver.step(4, &x, &x, None).is_err());
        let (out, x0) = solver.step(3, &x, &x, None).unwrap();
        assert_eq!(f64::try_from((out - x0).abs().max()).unwrap(), 0.0);
        assert!(DpmSolver::from_visited(&s, &[5, 5], false).is_err());
        assert!(DpmSolver::from_visited(&s, &[101], false).is_err());
    }
}
