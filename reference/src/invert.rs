//! DDIM inversion (η = 0): the deterministic DDIM walk run upwards, τ′ → τ along the strided
//! list, mapping data x_0 to the latent x_T that DDIM generation maps back to (about) x_0.
//!
//! Generation (η = 0) takes x_τ′ = ᾱ_τ′ x̂_0 + β̄_τ′ ε̂ with ε̂ = ε̂(x_τ, τ): the point it starts
//! from is what inversion is looking for, so the exact inverse is implicit. Inversion evaluates
//! the network at the point it has, x_τ′, and at the noise level it goes to, τ (as diffusers'
//! `DDIMInverseScheduler`; it also avoids t = 0, where no ε̂ exists):
//! x̂_0 = (x_τ′ − β̄_τ′ ε̂)/ᾱ_τ′, x_τ = ᾱ_τ x̂_0 + β̄_τ ε̂, ε̂ = ε̂(x_τ′, τ). One step and the
//! generation step back differ by O(Δ²) (docs/derivations.md, section 14).

use ndarray::Array2;

use crate::error::{check_shape, RefError, Result};
use crate::schedule::Schedule;
use crate::timesteps::{step_pairs, strided};

/// The inversion step τ′ → τ (0 ≤ τ′ < τ ≤ T) with ε̂ = ε̂(x_τ′, τ):
/// x_τ = ᾱ_τ (x_τ′ − β̄_τ′ ε̂)/ᾱ_τ′ + β̄_τ ε̂. Its arguments are those of the generation step
/// τ → τ′ it undoes (`sampler::ddim_step` with η = 0); a pair with τ′ ≥ τ is
/// [`RefError::NotBackwards`] for that step.
pub fn invert_step(
    schedule: &Schedule,
    x_prev: &Array2<f64>,
    tau_prev: usize,
    tau: usize,
    eps_hat: &Array2<f64>,
) -> Result<Array2<f64>> {
    schedule.check_t(tau, 1)?;
    schedule.check_t(tau_prev, 0)?;
    if tau_prev >= tau {
        return Err(RefError::NotBackwards {
            from: tau,
            to: tau_prev,
        });
    }
    check_shape(
        "predicted noise against x_tau_prev",
        x_prev.shape(),
        eps_hat.shape(),
    )?;
    let (ab_p, bb_p) = (schedule.alpha_bar(tau_prev)?, schedule.beta_bar(tau_prev)?);
    let x0 = (x_prev - &(eps_hat * bb_p)) / ab_p;
    Ok(x0 * schedule.alpha_bar(tau)? + eps_hat * schedule.beta_bar(tau)?)
}

/// The (τ′, τ) pairs inversion walks, upwards: (0, τ_1), (τ_1, τ_2), …, (τ_{n−1}, T) — the
/// generation pairs of `timesteps::step_pairs(steps)` in reverse order, each turned round.
pub fn inversion_pairs(steps: &[usize]) -> Vec<(usize, usize)> {
    step_pairs(steps)
        .into_iter()
        .rev()
        .map(|(tau, tau_prev)| (tau_prev, tau))
        .collect()
}

/// Runs x_0 → x_T with [`invert_step`] over `timesteps::strided(T, n_steps)` upwards; the
/// predictor maps (x [n, d], τ) to ε̂ and is asked at each target τ.
pub fn ddim_invert<F>(
    schedule: &Schedule,
    n_steps: usize,
    x0: Array2<f64>,
    predictor: F,
) -> Result<Array2<f64>>
where
    F: Fn(&Array2<f64>, usize) -> Array2<f64>,
{
    let steps = strided(schedule.t_max(), n_steps)?;
    inversion_pairs(&steps)
        .into_iter()
        .try_fold(x0, |x, (tau_prev, tau)| {
            let eps_hat = predictor(&x, tau);
            invert_step(schedule, &x, tau_prev, tau, &eps_hat)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::DataLaw;
    use crate::sampler::{ddim_sample, ddim_step};
    use crate::schedule::ScheduleKind;
    use approx::assert_relative_eq;
    use ndarray::array;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn a_step_undoes_the_generation_step_when_the_noise_estimate_is_the_same() {
        // With the same ε̂ both ways the two affine maps are inverse to each other exactly.
        let s = Schedule::new(ScheduleKind::Cosine, 50).unwrap();
        let x = array![[0.3, -1.2, 2.0]];
        let eps = array![[0.5, 0.1, -0.7]];
        for (tau_prev, tau) in [(0, 3), (10, 11), (7, 50)] {
            let up = invert_step(&s, &x, tau_prev, tau, &eps).unwrap();
            let back = ddim_step(&s, &up, tau, tau_prev, &eps, 0.0, &x).unwrap();
            for (a, b) in back.iter().zip(x.iter()) {
                assert_relative_eq!(*a, *b, epsilon = 1e-11);
            }
        }
    }

    #[test]
    fn pairs_run_upwards_through_the_strided_list() {
        assert_eq!(inversion_pairs(&[10, 4, 1]), vec![(0, 1), (1, 4), (4, 10)]);
    }

    #[test]
    fn dirac_data_inverts_and_regenerates_exactly() {
        // The Dirac oracle gives x̂_0 = c for every x, so inversion of c returns a point on the
        // line c's forward marginals sit on and generation returns c (to rounding).
        let s = Schedule::new(ScheduleKind::Article, 100).unwrap();
        let c = array![0.4, -0.2];
        let law = DataLaw::dirac(c.clone()).unwrap();
        let oracle = |x: &Array2<f64>, t: usize| law.optimal_eps(&s, x, t).unwrap();
        let x0 = array![[0.4, -0.2]];
        let xt = ddim_invert(&s, 8, x0.clone(), oracle).unwrap();
        let back = ddim_sample(&s, 8, 0.0, xt, oracle, &mut StdRng::seed_from_u64(0)).unwrap();
        for (a, b) in back.iter().zip(x0.iter()) {
            assert_relative_eq!(*a, *b, epsilon = 1e-9);
        }
    }

    #[test]
    fn invalid_input_is_an_error() {
        let s = Schedule::new(ScheduleKind::Article, 10).unwrap();
        let x = Array2::zeros((1, 2));
        assert_eq!(
            invert_step(&s, &x, 3, 3, &x),
            Err(RefError::NotBackwards { from: 3, to: 3 })
        );
        assert!(matches!(
            invert_step(&s, &x, 0, 11, &x),
            Err(RefError::TimeOutOfRange { .. })
        ));
        assert!(matches!(
            invert_step(&s, &x, 0, 1, &Array2::zeros((2, 2))),
            Err(RefError::ShapeMismatch { .. })
        ));
        assert!(ddim_invert(&s, 0, x, |x: &Array2<f64>, _| x.clone()).is_err());
    }
}
