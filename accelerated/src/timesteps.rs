//! Strided subsequences of 1..T for sampling with fewer steps.

use crate::error::{DdpmError, Result};

/// The `n` visited steps T = τ_n > … > τ_1 = 1 in descending order, evenly spaced and
/// rounded half up: τ_i = 1 + round((i − 1)(T − 1)/(n − 1)). The sampler then takes a final
/// step from τ_1 = 1 to 0. `n = 1` visits only T (one jump T → 0). Errors when n = 0 or n > T.
pub fn strided(t_max: i64, n: usize) -> Result<Vec<i64>> {
    if t_max < 1 {
        return Err(DdpmError::InvalidArgument(format!(
            "T must be at least 1, got {t_max}"
        )));
    }
    let n_i = n as i64;
    if n == 0 || n_i > t_max {
        return Err(DdpmError::InvalidArgument(format!(
            "the number of sampling steps must be between 1 and T = {t_max}, got {n}"
        )));
    }
    if n == 1 {
        return Ok(vec![t_max]);
    }
    // Exact integer rounding: floor((2k(T−1) + (n−1)) / (2(n−1))) = round(k(T−1)/(n−1)).
    // Successive values differ by at least (T−1)/(n−1) ≥ 1, so they are distinct.
    let span = t_max - 1;
    let den = 2 * (n_i - 1);
    Ok((0..n_i)
        .rev()
        .map(|k| 1 + (2 * k * span + (n_i - 1)) / den)
        .collect())
}

/// The (τ, τ′) pairs the sampler walks: (τ_n, τ_{n−1}), …, (τ_1, 0).
pub fn step_pairs(steps: &[i64]) -> Vec<(i64, i64)> {
    steps
        .iter()
        .zip(steps.iter().skip(1).chain(std::iter::once(&0)))
        .map(|(&t, &t_prev)| (t, t_prev))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_steps_when_n_equals_t() {
        assert_eq!(strided(5, 5).unwrap(), vec![5, 4, 3, 2, 1]);
    }

    #[test]
    fn ends_at_t_and_one_with_distinct_steps() {
        for t_max in [1i64, 2, 7, 10, 999, 1000] {
            for n in 2..=(t_max as usize).min(60) {
                let s = strided(t_max, n).unwrap();
                assert_eq!(s.len(), n);
                assert_eq!((s[0], s[n - 1]), (t_max, 1));
                assert!(s.windows(2).all(|w| w[0] > w[1]), "{t_max} {n}: {s:?}");
            }
        }
    }

    #[test]
    fn rounds_half_up() {
        // (T−1)/(n−1) = 2.5: 1, 3.5, 6, 8.5, 11 → 1, 4, 6, 9, 11.
        assert_eq!(strided(11, 5).unwrap(), vec![11, 9, 6, 4, 1]);
        assert_eq!(strided(1000, 1).unwrap(), vec![1000]);
    }

    #[test]
    fn rejects_impossible_counts() {
        assert!(strided(10, 0).is_err());
        assert!(strided(10, 11).is_err());
    }

    #[test]
    fn pairs_end_with_a_step_to_zero() {
        assert_eq!(step_pairs(&[10, 4, 1]), vec![(10, 4), (4, 1), (1, 0)]);
    }
}
