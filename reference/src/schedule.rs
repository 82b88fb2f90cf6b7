//! Noise schedules in the article's notation: α_t (signal scale), β_t = sqrt(1 − α_t²),
//! ᾱ_t = ∏ α_i, β̄_t = sqrt(1 − ᾱ_t²), arrays of length T+1 with index 0 the identity.

use ndarray::Array1;
use std::f64::consts::FRAC_PI_2;

use crate::error::{RefError, Result};

/// Offset s of the cosine schedule (Nichol & Dhariwal 2021).
const COSINE_OFFSET: f64 = 0.008;
/// Cap on β^Ho of the cosine schedule, which otherwise reaches 1 at t = T.
const COSINE_MAX_BETA_HO: f64 = 0.999;
/// Endpoints of Ho et al.'s linear β^Ho schedule.
const LINEAR_BETA_HO: (f64, f64) = (1e-4, 0.02);
/// The article's schedule: α_t² = 1 − ARTICLE_SLOPE·t/T.
const ARTICLE_SLOPE: f64 = 0.02;

/// The named schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// The article's α_t = sqrt(1 − 0.02·t/T).
    Article,
    /// Ho et al.'s β^Ho_t = linspace(1e-4, 0.02, T), α_t = sqrt(1 − β^Ho_t).
    Linear,
    /// Nichol & Dhariwal's ᾱ^Ho(t) = f(t/T)/f(0), f(u) = cos²((u + s)/(1 + s)·π/2), β^Ho ≤ 0.999.
    Cosine,
}

/// A schedule of T ≥ 1 steps; every array has length T+1 and index 0 holds the identity
/// (α_0 = 1, β_0 = 0, ᾱ_0 = 1, β̄_0 = 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    alpha: Array1<f64>,
    beta: Array1<f64>,
    log_alpha_bar: Array1<f64>,
    alpha_bar: Array1<f64>,
    beta_bar: Array1<f64>,
}

impl Schedule {
    /// The named schedule with `t_max` = T steps.
    pub fn new(kind: ScheduleKind, t_max: usize) -> Result<Self> {
        if t_max == 0 {
            return Err(RefError::ZeroSteps);
        }
        let steps = Array1::from_iter(1..=t_max).mapv(|t| t as f64);
        let big_t = t_max as f64;
        let betas_ho = match kind {
            ScheduleKind::Article => steps.mapv(|t| ARTICLE_SLOPE * t / big_t),
            ScheduleKind::Linear => {
                let (lo, hi) = LINEAR_BETA_HO;
                // numpy.linspace(lo, hi, 1) is [lo]; the general formula would divide by 0.
                let span = if t_max == 1 {
                    0.0
                } else {
                    (hi - lo) / (big_t - 1.0)
                };
                steps.mapv(|t| lo + span * (t - 1.0))
            }
            ScheduleKind::Cosine => {
                // t/T in floating point: integer division would make every t < T collapse to 0.
                let f = |t: f64| {
                    (((t / big_t) + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                steps.mapv(|t| (1.0 - f(t) / f(t - 1.0)).min(COSINE_MAX_BETA_HO))
            }
        };
        Self::from_ho_betas(
            betas_ho
                .as_slice()
                .expect("freshly built arrays are contiguous"),
        )
    }

    /// The schedule with the given α_1..α_T, each in (0, 1).
    pub fn from_alphas(alphas: &[f64]) -> Result<Self> {
        check_unit_interval("alpha", alphas)?;
        let alpha = Array1::from(alphas.to_vec());
        let log_alpha = alpha.mapv(f64::ln);
        // sqrt(−expm1(2 ln α)) keeps full relative precision of β when α is close to 1.
        let beta = log_alpha.mapv(|l| (-(2.0 * l).exp_m1()).sqrt());
        Ok(Self::from_parts(alpha, log_alpha, beta))
    }

    /// The schedule with Ho et al.'s β^Ho_1..β^Ho_T (= β_t²), each in (0, 1).
    pub fn from_ho_betas(betas_ho: &[f64]) -> Result<Self> {
        check_unit_interval("beta_ho", betas_ho)?;
        let beta_ho = Array1::from(betas_ho.to_vec());
        let alpha = beta_ho.mapv(|b| (1.0 - b).sqrt());
        let log_alpha = beta_ho.mapv(|b| 0.5 * (-b).ln_1p());
        Ok(Self::from_parts(alpha, log_alpha, beta_ho.mapv(f64::sqrt)))
    }

    /// The sub-chain over visited steps τ_n > … > τ_1 (descending, as
    /// `timesteps::strided` gives them): its step k has α_k = ᾱ_{τ_k}/ᾱ_{τ_{k−1}}
    /// (τ_0 = 0), so ᾱ_k = ᾱ_{τ_k} and every σ choice and ancestral step applies to it as is.
    pub fn respaced(&self, visited: &[usize]) -> Result<Self> {
        for &t in visited {
            self.check_t(t, 1)?;
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
                t_max: self.t_max(),
            });
        }
        let tau: Vec<usize> = std::iter::once(0)
            .chain(visited.iter().rev().copied())
            .collect();
        let log_alpha = Array1::from_iter(
            tau.windows(2)
                .map(|w| self.log_alpha_bar[w[1]] - self.log_alpha_bar[w[0]]),
        );
        let alpha = log_alpha.mapv(f64::exp);
        let beta = log_alpha.mapv(|l| (-(2.0 * l).exp_m1()).sqrt());
        Ok(Self::from_parts(alpha, log_alpha, beta))
    }

    /// Builds all arrays from per-step α_t, ln α_t and β_t (t = 1..T).
    fn from_parts(alpha: Array1<f64>, log_alpha: Array1<f64>, beta: Array1<f64>) -> Self {
        let with_identity = |first: f64, rest: &Array1<f64>| {
            Array1::from_iter(std::iter::once(first).chain(rest.iter().copied()))
        };
        let log_alpha_bar = with_identity(
            0.0,
            &Array1::from_iter(log_alpha.iter().scan(0.0, |acc, &l| {
                *acc += l;
                Some(*acc)
            })),
        );
        let alpha_bar = log_alpha_bar.mapv(f64::exp);
        let beta_bar = log_alpha_bar.mapv(|l| (-(2.0 * l).exp_m1()).sqrt());
        Self {
            alpha: with_identity(1.0, &alpha),
            beta: with_identity(0.0, &beta),
            log_alpha_bar,
            alpha_bar,
            beta_bar,
        }
    }

    /// Number of diffusion steps T.
    pub fn t_max(&self) -> usize {
        self.alpha.len() - 1
    }

    /// α_t for t = 0..T.
    pub fn alphas(&self) -> &Array1<f64> {
        &self.alpha
    }

    /// β_t = sqrt(1 − α_t²) for t = 0..T.
    pub fn betas(&self) -> &Array1<f64> {
        &self.beta
    }

    /// ᾱ_t = ∏_{i≤t} α_i for t = 0..T.
    pub fn alpha_bars(&self) -> &Array1<f64> {
        &self.alpha_bar
    }

    /// β̄_t = sqrt(1 − ᾱ_t²) for t = 0..T.
    pub fn beta_bars(&self) -> &Array1<f64> {
        &self.beta_bar
    }

    /// ln ᾱ_t = Σ_{i≤t} ln α_i for t = 0..T.
    pub fn log_alpha_bars(&self) -> &Array1<f64> {
        &self.log_alpha_bar
    }

    /// α_t, 0 ≤ t ≤ T.
    pub fn alpha(&self, t: usize) -> Result<f64> {
        Ok(self.alpha[self.check_t(t, 0)?])
    }

    /// β_t, 0 ≤ t ≤ T.
    pub fn beta(&self, t: usize) -> Result<f64> {
        Ok(self.beta[self.check_t(t, 0)?])
    }

    /// ᾱ_t, 0 ≤ t ≤ T.
    pub fn alpha_bar(&self, t: usize) -> Result<f64> {
        Ok(self.alpha_bar[self.check_t(t, 0)?])
    }

    /// β̄_t, 0 ≤ t ≤ T.
    pub fn beta_bar(&self, t: usize) -> Result<f64> {
        Ok(self.beta_bar[self.check_t(t, 0)?])
    }

    /// ln ᾱ_t, 0 ≤ t ≤ T.
    pub fn log_alpha_bar(&self, t: usize) -> Result<f64> {
        Ok(self.log_alpha_bar[self.check_t(t, 0)?])
    }

    /// Ho et al.'s α^Ho_t = α_t² for t = 0..T.
    pub fn ho_alphas(&self) -> Array1<f64> {
        self.alpha.mapv(|a| a * a)
    }

    /// Ho et al.'s β^Ho_t = β_t² for t = 0..T.
    pub fn ho_betas(&self) -> Array1<f64> {
        self.beta.mapv(|b| b * b)
    }

    /// Ho et al.'s ᾱ^Ho_t = ᾱ_t² for t = 0..T.
    pub fn ho_alpha_bars(&self) -> Array1<f64> {
        self.alpha_bar.mapv(|a| a * a)
    }

    /// Returns `t` if `min ≤ t ≤ T`, else a `TimeOutOfRange` error.
    pub fn check_t(&self, t: usize, min: usize) -> Result<usize> {
        let max = self.t_max();
        if (min..=max).contains(&t) {
            Ok(t)
        } else {
            Err(RefError::TimeOutOfRange { t, min, max })
        }
    }
}

/// Checks a non-empty sequence of values in the open interval (0, 1).
fn check_unit_interval(name: &'static str, values: &[f64]) -> Result<()> {
    if values.is_empty() {
        return Err(RefError::ZeroSteps);
    }
    match values.iter().position(|&v| !(v > 0.0 && v < 1.0)) {
        Some(i) => Err(RefError::InvalidScheduleValue {
            name,
            t: i + 1,
            value: values[i],
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn article_schedule_matches_its_definition_at_both_ends() {
        let s = Schedule::new(ScheduleKind::Article, 1000).unwrap();
        assert_eq!(s.t_max(), 1000);
        assert_relative_eq!(
            s.alpha(1).unwrap(),
            (1.0 - 0.02 / 1000.0f64).sqrt(),
            max_relative = 1e-15
        );
        assert_relative_eq!(s.alpha(1000).unwrap(), 0.98f64.sqrt(), max_relative = 1e-15);
        assert_relative_eq!(s.beta(1).unwrap(), 2e-5f64.sqrt(), max_relative = 1e-15);
        assert_relative_eq!(s.beta(1000).unwrap(), 0.02f64.sqrt(), max_relative = 1e-15);
        // ᾱ_T by a plain running product, an independent route to the log-space sum.
        let product: f64 = (1..=1000)
            .map(|t| (1.0 - 0.02 * t as f64 / 1000.0).sqrt())
            .product();
        assert_relative_eq!(s.alpha_bar(1000).unwrap(), product, max_relative = 1e-12);
        assert_relative_eq!(
            s.beta_bar(1000).unwrap(),
            (1.0 - product * product).sqrt(),
            max_relative = 1e-12
        );
        // The article's choice makes ᾱ_T ≈ e^{−5}: Σ ln α_t ≈ −0.01·Σ t/T·… ≈ −5.
        assert!((s.alpha_bar(1000).unwrap().ln() + 5.0).abs() < 0.05);
    }

    #[test]
    fn index_zero_is_the_identity() {
        for kind in [
            ScheduleKind::Article,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = Schedule::new(kind, 7).unwrap();
            assert_eq!(
                (
                    s.alpha(0).unwrap(),
                    s.beta(0).unwrap(),
                    s.alpha_bar(0).unwrap(),
                    s.beta_bar(0).unwrap()
                ),
                (1.0, 0.0, 1.0, 0.0)
            );
            assert_eq!(s.alphas().len(), 8);
            assert_eq!(s.beta_bars().len(), 8);
        }
    }

    #[test]
    fn one_step_schedule_has_bar_values_equal_to_the_step() {
        let s = Schedule::new(ScheduleKind::Article, 1).unwrap();
        assert_relative_eq!(
            s.alpha_bar(1).unwrap(),
            0.98f64.sqrt(),
            max_relative = 1e-15
        );
        assert_relative_eq!(s.beta_bar(1).unwrap(), 0.02f64.sqrt(), max_relative = 1e-14);
        let linear = Schedule::new(ScheduleKind::Linear, 1).unwrap();
        assert_relative_eq!(linear.ho_betas()[1], 1e-4, max_relative = 1e-14);
        let cosine = Schedule::new(ScheduleKind::Cosine, 1).unwrap();
        assert_relative_eq!(cosine.ho_betas()[1], 0.999, max_relative = 1e-15);
    }

    #[test]
    fn alpha_beta_identities_hold_everywhere() {
        for kind in [
            ScheduleKind::Article,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = Schedule::new(kind, 50).unwrap();
            let one = s.alphas().mapv(|a| a * a) + s.betas().mapv(|b| b * b);
            let one_bar = s.alpha_bars().mapv(|a| a * a) + s.beta_bars().mapv(|b| b * b);
            for (x, y) in one.iter().zip(one_bar.iter()) {
                assert_relative_eq!(*x, 1.0, max_relative = 1e-14);
                assert_relative_eq!(*y, 1.0, max_relative = 1e-14);
            }
        }
    }

    #[test]
    fn linear_schedule_spans_ho_endpoints() {
        let s = Schedule::new(ScheduleKind::Linear, 1000).unwrap();
        let b = s.ho_betas();
        assert_relative_eq!(b[1], 1e-4, max_relative = 1e-12);
        assert_relative_eq!(b[1000], 0.02, max_relative = 1e-12);
        assert_relative_eq!(b[500] - b[499], (0.02 - 1e-4) / 999.0, max_relative = 1e-9);
    }

    #[test]
    fn cosine_schedule_uses_fractional_t_over_t() {
        // T = 3: ᾱ^Ho_t = f(t/3)/f(0) for t < T; integer division would give t/T = 0, β^Ho = 0.
        let f = |u: f64| {
            (((u + 0.008) / 1.008) * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        let s = Schedule::new(ScheduleKind::Cosine, 3).unwrap();
        let ab = s.ho_alpha_bars();
        assert_relative_eq!(ab[1], f(1.0 / 3.0) / f(0.0), max_relative = 1e-13);
        assert_relative_eq!(ab[2], f(2.0 / 3.0) / f(0.0), max_relative = 1e-13);
        // By hand: f(1/3)/f(0) = cos²(0.33862·π/2)/cos²(0.0079365·π/2) = 0.74286/0.99984 ≈ 0.7429.
        assert!((ab[1] - 0.7429).abs() < 1e-4, "{}", ab[1]);
        // The last step would have β^Ho = 1 (cos(π/2) = 0) and is clipped.
        assert_relative_eq!(s.ho_betas()[3], 0.999, max_relative = 1e-15);
    }

    #[test]
    fn ho_conversion_round_trips() {
        for kind in [
            ScheduleKind::Article,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = Schedule::new(kind, 100).unwrap();
            assert_relative_eq!(
                s.ho_alphas()[10] + s.ho_betas()[10],
                1.0,
                max_relative = 1e-15
            );
            let back = Schedule::from_ho_betas(&s.ho_betas().as_slice().unwrap()[1..]).unwrap();
            let via_alphas = Schedule::from_alphas(&s.alphas().as_slice().unwrap()[1..]).unwrap();
            for other in [&back, &via_alphas] {
                for (a, b) in s.beta_bars().iter().zip(other.beta_bars().iter()) {
                    assert_relative_eq!(*a, *b, max_relative = 1e-12);
                }
                for (a, b) in s.alpha_bars().iter().zip(other.alpha_bars().iter()) {
                    assert_relative_eq!(*a, *b, max_relative = 1e-12);
                }
            }
        }
    }

    #[test]
    fn beta_bar_keeps_relative_precision_near_alpha_one() {
        // α = sqrt(1 − 1e-14): 1 − α² in plain arithmetic keeps ~2 digits; expm1 keeps all.
        let s = Schedule::from_ho_betas(&[1e-14]).unwrap();
        assert_relative_eq!(s.beta_bar(1).unwrap(), 1e-7, max_relative = 1e-12);
    }

    #[test]
    fn invalid_input_is_an_error() {
        assert_eq!(
            Schedule::new(ScheduleKind::Article, 0),
            Err(RefError::ZeroSteps)
        );
        assert_eq!(Schedule::from_alphas(&[]), Err(RefError::ZeroSteps));
        for bad in [0.0, 1.0, -0.5, f64::NAN] {
            let err = Schedule::from_alphas(&[0.5, bad]).unwrap_err();
            assert!(
                matches!(
                    err,
                    RefError::InvalidScheduleValue {
                        name: "alpha",
                        t: 2,
                        ..
                    }
                ),
                "{err}"
            );
        }
        assert!(Schedule::from_ho_betas(&[1.5]).is_err());
        let s = Schedule::new(ScheduleKind::Article, 10).unwrap();
        assert_eq!(
            s.alpha(11),
            Err(RefError::TimeOutOfRange {
                t: 11,
                min: 0,
                max: 10
            })
        );
        assert_eq!(
            s.check_t(0, 1),
            Err(RefError::TimeOutOfRange {
                t: 0,
                min: 1,
                max: 10
            })
        );
        assert!(s.alpha(11).unwrap_err().to_string().contains("t = 11"));
    }

    #[test]
    fn respaced_chain_keeps_alpha_bar_at_visited_steps() {
        let s = Schedule::new(ScheduleKind::Cosine, 40).unwrap();
        let visited = [40, 27, 14, 1];
        let r = s.respaced(&visited).unwrap();
        assert_eq!(r.t_max(), 4);
        for (k, &tau) in visited.iter().rev().enumerate() {
            let (a, b) = (r.alpha_bar(k + 1).unwrap(), s.alpha_bar(tau).unwrap());
            assert!(
                (a - b).abs() < 1e-14 * b.max(1e-300),
                "k = {}: {a} vs {b}",
                k + 1
            );
            let ratio = s.alpha_bar(tau).unwrap()
                / s.alpha_bar(if k == 0 {
                    0
                } else {
                    visited[visited.len() - k]
                })
                .unwrap();
            assert!((r.alpha(k + 1).unwrap() - ratio).abs() < 1e-14);
        }
        let all: Vec<usize> = (1..=40).rev().collect();
        let full = s.respaced(&all).unwrap();
        assert!((full.alphas() - s.alphas()).iter().all(|d| d.abs() < 1e-14));
        assert!(s.respaced(&[3, 5]).is_err());
        assert!(s.respaced(&[41]).is_err());
        assert!(s.respaced(&[]).is_err());
    }
}
