//! Strided subsequences of 1..T for sampling with fewer steps, and the (τ, τ′) pairs walked.

use crate::error::{RefError, Result};

/// The n visited steps T = τ_n > … > τ_1 = 1, descending, τ_i = 1 + round_half_up((i−1)(T−1)/(n−1));
/// n = 1 visits only T. The sampler then steps τ_1 → 0. Needs 1 ≤ n ≤ T.
pub fn strided(t_max: usize, n: usize) -> Result<Vec<usize>> {
    if t_max == 0 {
        return Err(RefError::ZeroSteps);
    }
    if n == 0 || n > t_max {
        return Err(RefError::InvalidStepCount { n, t_max });
    }
    if n == 1 {
        return Ok(vec![t_max]);
    }
    // Exact integer rounding: floor((2k(T−1) + (n−1))/(2(n−1))) = round_half_up(k(T−1)/(n−1));
    // consecutive values differ by at least (T−1)/(n−1) ≥ 1, so they are distinct.
    let den = 2 * (n - 1);
    Ok((0..n)
        .rev()
        .map(|k| 1 + (2 * k * (t_max - 1) + (n - 1)) / den)
        .collect())
}

/// The (τ, τ') pairs a strided sampler walks: (τ_n, τ_{n−1}), …, (τ_1, 0).
pub fn step_pairs(steps: &[usize]) -> Vec<(usize, usize)> {
    steps
        .iter()
        .copied()
        .zip(steps.iter().copied().skip(1).chain(std::iter::once(0)))
        .collect()
}

/// How the n visited steps are chosen from 1..=T. `Strided` is this project's list
/// ([`strided`]); the other three are diffusers' `timestep_spacing` values of its DDIM and DDPM
/// schedulers, moved from diffusers' 0-based timesteps k to our t = k + 1 (diffusers' k has
/// ᾱ^Ho = ∏_{i≤k}(1 − β^Ho_i), one step of noise at k = 0, which is our t = 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Spacing {
    /// τ_i = 1 + round_half_up((i−1)(T−1)/(n−1)): T = τ_n > … > τ_1 = 1 (today's list).
    #[default]
    Strided,
    /// diffusers' `linspace`: 1 + np.round(np.linspace(0, T−1, n)) (ties to even; n = 1 visits t = 1).
    Linspace,
    /// diffusers' `leading` (steps_offset 0): 1 + i·⌊T/n⌋, i = n−1, …, 0; never visits T.
    Leading,
    /// diffusers' `trailing`: np.round(T − i·T/n), i = 0, …, n−1; starts at T, ends at round(T/n).
    Trailing,
}

/// The n visited steps of `spacing`, descending, within 1..=T, distinct; needs 1 ≤ n ≤ T.
pub fn spaced(t_max: usize, n: usize, spacing: Spacing) -> Result<Vec<usize>> {
    let checked = strided(t_max, n)?;
    Ok(match spacing {
        Spacing::Strided => checked,
        Spacing::Linspace => linspace(t_max, n),
        Spacing::Leading => (0..n).rev().map(|i| 1 + i * (t_max / n)).collect(),
        Spacing::Trailing => {
            // np.arange(T, 0, −T/n) fills start + i·δ with δ = (start + step) − start in f64;
            // then np.round (ties to even). Only the first n values: numpy's length
            // ceil(T/(T/n)) is n + 1 for some n (T = 1000: n = 61, 103, …), whose extra value
            // rounds to 0, diffusers' timestep −1.
            let start = t_max as f64;
            let delta = (start - start / n as f64) - start;
            (0..n)
                .map(|i| (start + i as f64 * delta).round_ties_even() as usize)
                .collect()
        }
    })
}

/// np.linspace(0, T − 1, n) as numpy computes it (i·step + 0 in f64, the last point set to
/// T − 1 exactly), rounded half to even as np.round does, plus 1, descending.
fn linspace(t_max: usize, n: usize) -> Vec<usize> {
    let stop = (t_max - 1) as f64;
    if n == 1 {
        return vec![1];
    }
    let step = stop / (n - 1) as f64;
    (0..n)
        .rev()
        .map(|i| {
            let y = if i == n - 1 { stop } else { i as f64 * step };
            1 + y.round_ties_even() as usize
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_edge_cases() {
        assert_eq!(strided(5, 5).unwrap(), vec![5, 4, 3, 2, 1]);
        assert_eq!(strided(1000, 2).unwrap(), vec![1000, 1]);
        assert_eq!(strided(1000, 1).unwrap(), vec![1000]);
        assert_eq!(strided(1, 1).unwrap(), vec![1]);
        // (T−1)/(n−1) = 2.5: 1, 3.5, 6, 8.5, 11 round half up to 1, 4, 6, 9, 11.
        assert_eq!(strided(11, 5).unwrap(), vec![11, 9, 6, 4, 1]);
        assert_eq!(strided(1000, 10).unwrap()[..3], [1000, 889, 778]);
        for t_max in [2, 7, 999, 1000] {
            for n in 2..=t_max.min(50) {
                let s = strided(t_max, n).unwrap();
                assert_eq!((s.len(), s[0], s[n - 1]), (n, t_max, 1));
                assert!(s.windows(2).all(|w| w[0] > w[1]));
            }
        }
        assert_eq!(
            strided(10, 0),
            Err(RefError::InvalidStepCount { n: 0, t_max: 10 })
        );
        assert_eq!(
            strided(10, 11),
            Err(RefError::InvalidStepCount { n: 11, t_max: 10 })
        );
        assert_eq!(strided(0, 1), Err(RefError::ZeroSteps));
        assert_eq!(step_pairs(&[10, 4, 1]), vec![(10, 4), (4, 1), (1, 0)]);
    }
}
