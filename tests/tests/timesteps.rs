//! The strided timestep lists of both sides are equal and obey the contract: n distinct
//! steps T = τ_n > … > τ_1 = 1, then a final step to 0, never below.

use ddpm_reference::timesteps as reference;
use ddpm_tests::{check, stride_len, t_max};
use proptest::prelude::*;

#[test]
fn strided_lists_agree_and_keep_the_contract() {
    let strategy = t_max().prop_flat_map(|big_t| (Just(big_t), stride_len(big_t)));
    check(512, strategy, |(big_t, n)| {
        let got = ddpm::timesteps::strided(big_t as i64, n).unwrap();
        let want = reference::strided(big_t, n).unwrap();
        let got_usize: Vec<usize> = got.iter().map(|&t| t as usize).collect();
        prop_assert_eq!(&got_usize, &want);
        prop_assert_eq!(got.len(), n);
        prop_assert_eq!(got[0], big_t as i64, "the first visited step is T");
        if n >= 2 {
            prop_assert_eq!(*got.last().unwrap(), 1, "the last visited step is 1");
        }
        prop_assert!(
            got.windows(2).all(|w| w[0] > w[1]),
            "strictly descending: {:?}",
            got
        );
        // Evenly spaced: gaps differ by at most one.
        let gaps: Vec<i64> = got.windows(2).map(|w| w[0] - w[1]).collect();
        if let (Some(lo), Some(hi)) = (gaps.iter().min(), gaps.iter().max()) {
            prop_assert!(hi - lo <= 1, "uneven gaps {:?}", gaps);
        }
        let pairs = ddpm::timesteps::step_pairs(&got);
        let want_pairs = reference::step_pairs(&want);
        let pairs_usize: Vec<(usize, usize)> = pairs
            .iter()
            .map(|&(a, b)| (a as usize, b as usize))
            .collect();
        prop_assert_eq!(&pairs_usize, &want_pairs);
        prop_assert_eq!(pairs.last().unwrap().1, 0, "the walk ends at 0");
        prop_assert!(
            pairs.iter().all(|&(a, b)| b >= 0 && b < a),
            "backwards, never negative: {:?}",
            pairs
        );
        Ok(())
    });
}

#[test]
fn invalid_step_counts_are_errors_on_both_sides() {
    for (big_t, n) in [(10usize, 0usize), (10, 11), (1, 2)] {
        assert!(
            ddpm::timesteps::strided(big_t as i64, n).is_err(),
            "tch accepted T = {big_t}, n = {n}"
        );
        assert!(reference::strided(big_t, n).is_err());
    }
    assert!(ddpm::timesteps::strided(0, 1).is_err());
}

/// T = 1000 in 50 steps, the common DDIM setting, by hand: τ = 1 + round(k·999/49) with
/// 999/49 = 20.3878, so k = 49, 48, 47 give 1000, 1 + round(978.61) = 980, 1 + round(958.22)
/// = 959, and k = 2, 1, 0 give 1 + round(40.78) = 42, 1 + round(20.39) = 21, 1.
#[test]
fn fifty_of_a_thousand() {
    let steps = ddpm::timesteps::strided(1000, 50).unwrap();
    assert_eq!(&steps[..3], &[1000, 980, 959]);
    assert_eq!(&steps[47..], &[42, 21, 1]);
}
