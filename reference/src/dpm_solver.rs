//! DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), multistep, in data-prediction
//! form and the article's notation: λ_t = ln(ᾱ_t/β̄_t), D = x̂_0 = (x_t − β̄_t ε̂)/ᾱ_t. One step
//! from s to t < s with h = λ_t − λ_s:
//!
//! * first order (the first step, and the last step to t = 0): x_t = (β̄_t/β̄_s) x_s + ᾱ_t (1 − e^{−h}) D_s,
//!   which is DDIM with η = 0;
//! * second order (every other step), with the previous step's u > s, h' = λ_s − λ_u, r = h'/h:
//!   x_t = (β̄_t/β̄_s) x_s + ᾱ_t (1 − e^{−h}) ((1 + 1/(2r)) D_s − D_u/(2r)).
//!
//! docs/derivations.md, section 15, derives it and maps it onto diffusers'
//! `DPMSolverMultistepScheduler`.

use ndarray::Array2;

use crate::error::{check_shape, RefError, Result};
use crate::schedule::Schedule;
use crate::timesteps::{spaced, step_pairs, Spacing};

/// How the solver walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Visited steps n (network evaluations), 1 ≤ n ≤ T.
    pub steps: usize,
    /// Which n steps (`Spacing::Strided` is the product's default).
    pub spacing: Spacing,
    /// Clip x̂_0 to [−1, 1] before it is used (diffusers' `thresholding` with ratio 1).
    pub clip_x0: bool,
}

/// The n steps DPM-Solver++ visits, as diffusers' `DPMSolverMultistepScheduler` chooses them:
/// for `Strided`, `Linspace` and `Leading` the list of n + 1 steps without its last one (which
/// is t = 1), so that the n-th network evaluation is not spent at t = 1 and the last step
/// jumps from about T/n straight to 0; for `Trailing` the trailing list itself (it ends at
/// round(T/n) already). Needs 1 ≤ n ≤ T − 1 (n ≤ T for `Trailing`).
pub fn visited(t_max: usize, n: usize, spacing: Spacing) -> Result<Vec<usize>> {
    if spacing == Spacing::Trailing {
        return spaced(t_max, n, spacing);
    }
    if n == 0 || n >= t_max {
        return Err(RefError::InvalidStepCount { n, t_max });
    }
    let mut list = spaced(t_max, n + 1, spacing)?;
    list.pop();
    Ok(list)
}

/// λ_t = ln ᾱ_t − ln β̄_t, +∞ at t = 0 (β̄_0 = 0).
pub fn lambda(schedule: &Schedule, t: usize) -> Result<f64> {
    Ok(schedule.log_alpha_bar(t)? - schedule.beta_bar(t)?.ln())
}

/// The coefficients of one step s → t: x_t = c_x x_s + c_d D, and, for a second-order step,
/// the weight 1/(2r) of the difference D_s − D_u.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Coefficients {
    c_x: f64,
    c_d: f64,
    half_over_r: Option<f64>,
}

/// DPM-Solver++(2M) over the visited steps of a schedule.
#[derive(Debug, Clone)]
pub struct DpmSolver {
    cfg: Config,
    pairs: Vec<(usize, usize)>,
    alpha_bar: Vec<f64>,
    beta_bar: Vec<f64>,
    coefficients: Vec<Coefficients>,
}

impl DpmSolver {
    /// The solver over [`visited`]`(T, cfg.steps, cfg.spacing)`, its coefficients computed once.
    pub fn new(schedule: &Schedule, cfg: Config) -> Result<DpmSolver> {
        let steps = visited(schedule.t_max(), cfg.steps, cfg.spacing)?;
        let mut solver = Self::from_visited(schedule, &steps, cfg.clip_x0)?;
        solver.cfg = cfg;
        Ok(solver)
    }

    /// The solver over any descending list of visited steps within 1..=T (then a last step to 0).
    pub fn from_visited(
        schedule: &Schedule,
        visited: &[usize],
        clip_x0: bool,
    ) -> Result<DpmSolver> {
        for &t in visited {
            schedule.check_t(t, 1)?;
        }
        if let Some(w) = visited.windows(2).find(|w| w[0] <= w[1]) {
            return Err(RefError::NotBackwards {
                from: w[0],
                to: w[1],
            });
        }
        if visited.is_empty() {
            return Err(RefError::InvalidStepCount {
                n: 0,
                t_max: schedule.t_max(),
            });
        }
        let cfg = Config {
            steps: visited.len(),
            spacing: Spacing::Strided,
            clip_x0,
        };
        let pairs = step_pairs(visited);
        let mut coefficients = Vec::with_capacity(pairs.len());
        for (i, &(s, t)) in pairs.iter().enumerate() {
            let (l_s, l_t) = (lambda(schedule, s)?, lambda(schedule, t)?);
            let h = l_t - l_s;
            // ᾱ_t (1 − e^{−h}) = −ᾱ_t expm1(−h); at t = 0, h = +∞ and it is ᾱ_0 = 1.
            let c_d = -schedule.alpha_bar(t)? * (-h).exp_m1();
            let c_x = schedule.beta_bar(t)? / schedule.beta_bar(s)?;
            let half_over_r = match (i, t) {
                (0, _) | (_, 0) => None,
                _ => {
                    let u = pairs[i - 1].0;
                    let h_last = l_s - lambda(schedule, u)?;
                    Some(0.5 * h / h_last)
                }
            };
            coefficients.push(Coefficients {
                c_x,
                c_d,
                half_over_r,
            });
        }
        let alpha_bar = pairs
            .iter()
            .map(|&(s, _)| schedule.alpha_bar(s))
            .collect::<Result<_>>()?;
        let beta_bar = pairs
            .iter()
            .map(|&(s, _)| schedule.beta_bar(s))
            .collect::<Result<_>>()?;
        Ok(DpmSolver {
            cfg,
            pairs,
            alpha_bar,
            beta_bar,
            coefficients,
        })
    }

    /// The (s, t) steps walked, from (τ_n, τ_{n−1}) down to (τ_1, 0).
    pub fn steps(&self) -> &[(usize, usize)] {
        &self.pairs
    }

    /// Whether step `i` is second order (needs the previous step's x̂_0): every step but the
    /// first and the last (to t = 0, where λ = +∞ and only x̂_0 survives).
    pub fn is_second_order(&self, i: usize) -> bool {
        self.coefficients
            .get(i)
            .is_some_and(|c| c.half_over_r.is_some())
    }

    /// Step `i` (`steps()[i]` = (s, t)): x_t from x_s [n, d] and ε̂(x_s, s), and the x̂_0 it
    /// used (returned for the next step). `prev_x0` is the x̂_0 step i − 1 returned; it must be
    /// given exactly when [`DpmSolver::is_second_order`] says so.
    pub fn step(
        &self,
        i: usize,
        x: &Array2<f64>,
        eps_hat: &Array2<f64>,
        prev_x0: Option<&Array2<f64>>,
    ) -> Result<(Array2<f64>, Array2<f64>)> {
        let c = *self.coefficients.get(i).ok_or(RefError::InvalidParameter {
            name: "i",
            value: i as f64,
            reason: "must be below the number of steps walked",
        })?;
        check_shape("predicted noise against x_s", x.shape(), eps_hat.shape())?;
        let (ab, bb) = (self.alpha_bar[i], self.beta_bar[i]);
        let mut x0 = (x - &(eps_hat * bb)) / ab;
        if self.cfg.clip_x0 {
            x0.mapv_inplace(|v| v.clamp(-1.0, 1.0));
        }
        let d = match (c.half_over_r, prev_x0) {
            (None, None) => x0.clone(),
            (Some(w), Some(prev)) => {
                check_shape("previous x0 against x_s", x.shape(), prev.shape())?;
                &x0 * (1.0 + w) - prev * w
            }
            (None, Some(_)) | (Some(_), None) => {
                return Err(RefError::InvalidParameter {
                    name: "prev_x0",
                    value: i as f64,
                    reason: "must be given exactly at the second-order steps (all but the first and the last)",
                })
            }
        };
        Ok((x * c.c_x + d * c.c_d, x0))
    }
}

/// One first-order step s → t (0 ≤ t < s ≤ T) from x̂_0 = `x0`:
/// x_t = (β̄_t/β̄_s) x_s + ᾱ_t (1 − e^{−h}) x̂_0, h = λ_t − λ_s.
pub fn first_order_step(
    schedule: &Schedule,
    x: &Array2<f64>,
    s: usize,
    t: usize,
    x0: &Array2<f64>,
) -> Result<Array2<f64>> {
    schedule.check_t(s, 1)?;
    schedule.check_t(t, 0)?;
    if t >= s {
        return Err(RefError::NotBackwards { from: s, to: t });
    }
    check_shape("x0 against x_s", x.shape(), x0.shape())?;
    let h = lambda(schedule, t)? - lambda(schedule, s)?;
    let c_d = -schedule.alpha_bar(t)? * (-h).exp_m1();
    Ok(x * (schedule.beta_bar(t)? / schedule.beta_bar(s)?) + x0 * c_d)
}

/// Runs x_T → x_0 with DPM-Solver++(2M); the predictor maps (x_t [n, d], t) to ε̂. Returns the
/// result and the state at τ_1, the last visited step, before the jump to 0.
pub fn sample<F>(
    schedule: &Schedule,
    cfg: Config,
    x_t_max: Array2<f64>,
    predictor: F,
) -> Result<(Array2<f64>, Array2<f64>)>
where
    F: Fn(&Array2<f64>, usize) -> Array2<f64>,
{
    let solver = DpmSolver::new(schedule, cfg)?;
    let mut x = x_t_max;
    let mut last_visited = x.clone();
    let mut prev: Option<Array2<f64>> = None;
    for (i, &(s, t)) in solver.steps().iter().enumerate() {
        let eps_hat = predictor(&x, s);
        let wanted = if solver.is_second_order(i) {
            prev.as_ref()
        } else {
            None
        };
        let (next, x0) = solver.step(i, &x, &eps_hat, wanted)?;
        if t == 0 {
            last_visited = x.clone();
        }
        x = next;
        prev = Some(x0);
    }
    Ok((x, last_visited))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::marginal::predicted_x0;
    use crate::sampler::ddim_step;
    use crate::schedule::ScheduleKind;
    use ndarray::array;

    #[test]
    fn first_order_is_ddim_eta_zero() {
        let s = Schedule::new(ScheduleKind::Cosine, 200).unwrap();
        let x = array![[0.4, -1.3, 2.0]];
        let eps = array![[0.7, 0.1, -0.5]];
        for (from, to) in [(200, 150), (57, 3), (3, 1), (1, 0), (90, 0)] {
            let x0 = predicted_x0(&s, &x, from, &eps).unwrap();
            let a = first_order_step(&s, &x, from, to, &x0).unwrap();
            let b = ddim_step(&s, &x, from, to, &eps, 0.0, &(&x * 0.0)).unwrap();
            for (p, q) in a.iter().zip(b.iter()) {
                assert!((p - q).abs() < 1e-12, "{from} -> {to}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn orders_and_arguments() {
        let s = Schedule::new(ScheduleKind::Article, 100).unwrap();
        let cfg = Config {
            steps: 4,
            spacing: Spacing::Strided,
            clip_x0: false,
        };
        let solver = DpmSolver::new(&s, cfg).unwrap();
        assert_eq!(solver.steps().len(), 4);
        let orders: Vec<bool> = (0..4).map(|i| solver.is_second_order(i)).collect();
        assert_eq!(orders, [false, true, true, false]);
        let x = array![[0.5, -0.5]];
        assert!(solver.step(1, &x, &x, None).is_err());
        assert!(solver.step(0, &x, &x, Some(&x)).is_err());
        assert!(solver.step(4, &x, &x, None).is_err());
        assert!(solver.step(1, &x, &x, Some(&array![[1.0]])).is_err());
        // The last step returns x̂_0 itself.
        let (out, x0) = solver.step(3, &x, &x, None).unwrap();
        assert_eq!(out, x0);
    }
}
