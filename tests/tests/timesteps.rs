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

/// Both sides' spacing of each kind.
const SPACINGS: [(ddpm::timesteps::Spacing, reference::Spacing); 4] = [
    (
        ddpm::timesteps::Spacing::Strided,
        reference::Spacing::Strided,
    ),
    (
        ddpm::timesteps::Spacing::Linspace,
        reference::Spacing::Linspace,
    ),
    (
        ddpm::timesteps::Spacing::Leading,
        reference::Spacing::Leading,
    ),
    (
        ddpm::timesteps::Spacing::Trailing,
        reference::Spacing::Trailing,
    ),
];

/// |v − p/q| ≤ 1/2 (exact in integers: |2(vq − p)| ≤ q): v is p/q rounded, ties either way.
fn rounds(v: i64, p: i64, q: i64) -> bool {
    (2 * (v * q - p)).abs() <= q
}

/// Every spacing, both sides equal, n distinct descending steps within 1..=T, each its
/// definition's exact value rounded: linspace τ_i − 1 ≈ i(T−1)/(n−1) (the last exactly T),
/// leading τ_i = 1 + i⌊T/n⌋, trailing τ_i ≈ T(n−i)/n (first T), i counted from the bottom for
/// linspace and leading and from the top for trailing; linspace and trailing evenly spaced
/// (gaps differ by at most one).
#[test]
fn spacings_agree_and_follow_their_definitions() {
    let strategy = t_max().prop_flat_map(|big_t| (Just(big_t), stride_len(big_t)));
    check(512, strategy, |(big_t, n)| {
        let (t, ni) = (big_t as i64, n as i64);
        for (sp, rsp) in SPACINGS {
            let got = ddpm::timesteps::spaced(t, n, sp).unwrap();
            let want = reference::spaced(big_t, n, rsp).unwrap();
            let got_usize: Vec<usize> = got.iter().map(|&v| v as usize).collect();
            prop_assert_eq!(&got_usize, &want, "{:?}", sp);
            prop_assert_eq!(got.len(), n);
            prop_assert!(got.windows(2).all(|w| w[0] > w[1]), "{:?}: {:?}", sp, got);
            prop_assert!(
                got.iter().all(|&v| (1..=t).contains(&v)),
                "{:?}: {:?}",
                sp,
                got
            );
            let from_bottom = |i: i64| got[(ni - 1 - i) as usize];
            match sp {
                ddpm::timesteps::Spacing::Strided => {
                    prop_assert_eq!(&got, &ddpm::timesteps::strided(t, n).unwrap())
                }
                ddpm::timesteps::Spacing::Linspace if n == 1 => prop_assert_eq!(&got, &vec![1]),
                ddpm::timesteps::Spacing::Linspace => {
                    prop_assert_eq!((got[0], from_bottom(0)), (t, 1));
                    for i in 0..ni {
                        prop_assert!(
                            rounds(from_bottom(i) - 1, i * (t - 1), ni - 1),
                            "linspace {:?} at i = {}",
                            got,
                            i
                        );
                    }
                }
                ddpm::timesteps::Spacing::Leading => {
                    for i in 0..ni {
                        prop_assert_eq!(from_bottom(i), 1 + i * (t / ni));
                    }
                }
                ddpm::timesteps::Spacing::Trailing => {
                    prop_assert_eq!(got[0], t);
                    for (i, &v) in got.iter().enumerate() {
                        prop_assert!(
                            rounds(v, t * (ni - i as i64), ni),
                            "trailing {:?} at i = {}",
                            got,
                            i
                        );
                    }
                }
            }
            if matches!(
                sp,
                ddpm::timesteps::Spacing::Linspace | ddpm::timesteps::Spacing::Trailing
            ) {
                let gaps: Vec<i64> = got.windows(2).map(|w| w[0] - w[1]).collect();
                if let (Some(lo), Some(hi)) = (gaps.iter().min(), gaps.iter().max()) {
                    prop_assert!(hi - lo <= 1, "{:?}: uneven gaps {:?}", sp, gaps);
                }
            }
        }
        Ok(())
    });
}

/// The lists numpy gives for diffusers' definitions (computed with numpy 2.4 and pasted here),
/// each plus 1 for our t: `np.linspace(0, 999, n).round()[::-1]`,
/// `(np.arange(0, n) * (1000 // n)).round()[::-1]`, `np.round(np.arange(1000, 0, -1000 / n))`
/// (no −1 there, so no +1), and DPMSolverMultistepScheduler's own linspace and leading (n + 1
/// points without the last). Ties: at n = 7, 999/6 = 166.5 rounds to the even 166 in numpy
/// (t = 167), half up to 167 in `strided` (t = 168); at n = 27, 13·999/26 = 499.5 exactly, but
/// numpy's i·step in f64 is 499.49999999999994, which rounds to 499 (t = 500, strided 501), and
/// `Linspace` reproduces it: it computes i·step in f64 as numpy does (checked offline against np.linspace for every n ≤ T at T = 1, 2, 37, 100, 999, 1000,
/// 4000: no difference).
#[test]
fn spacings_match_numpy() {
    use ddpm::timesteps::{spaced, Spacing};
    let cases: [(Spacing, usize, &[i64]); 8] = [
        (Spacing::Linspace, 7, &[1000, 833, 667, 501, 334, 167, 1]),
        (
            Spacing::Linspace,
            10,
            &[1000, 889, 778, 667, 556, 445, 334, 223, 112, 1],
        ),
        (Spacing::Leading, 7, &[853, 711, 569, 427, 285, 143, 1]),
        (
            Spacing::Leading,
            10,
            &[901, 801, 701, 601, 501, 401, 301, 201, 101, 1],
        ),
        (Spacing::Trailing, 3, &[1000, 667, 333]),
        (Spacing::Trailing, 7, &[1000, 857, 714, 571, 429, 286, 143]),
        (
            Spacing::Trailing,
            10,
            &[1000, 900, 800, 700, 600, 500, 400, 300, 200, 100],
        ),
        (Spacing::Strided, 7, &[1000, 834, 667, 501, 334, 168, 1]),
    ];
    for (sp, n, want) in cases {
        assert_eq!(spaced(1000, n, sp).unwrap(), want, "{sp:?}, n = {n}");
    }
    let lin27 = spaced(1000, 27, Spacing::Linspace).unwrap();
    assert_eq!(lin27[13], 500, "numpy's 499.49999999999994 → 499 (+1)");
    assert_eq!(ddpm::timesteps::strided(1000, 27).unwrap()[13], 501);
    // DPM-Solver++'s lists (diffusers' DPMSolverMultistepScheduler).
    let dpm = |sp| ddpm::dpm_solver::visited(1000, 10, sp).unwrap();
    assert_eq!(
        dpm(Spacing::Linspace),
        [1000, 900, 800, 700, 600, 501, 401, 301, 201, 101]
    );
    assert_eq!(
        dpm(Spacing::Leading),
        [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]
    );
    assert_eq!(
        dpm(Spacing::Trailing),
        spaced(1000, 10, Spacing::Trailing).unwrap()
    );
    assert_eq!(dpm(Spacing::Strided), dpm(Spacing::Linspace));
}

/// The claim "today's strided list is diffusers' linspace list", checked for every n at
/// T = 1000: it holds except at n = 1 (linspace visits t = 1, strided T) and where some
/// i(T−1)/(n−1) is a tie x.5 that numpy's round-half-to-even sends down while `strided` rounds
/// half up (or f64 puts just below .5). 221 of the 1000 counts differ, the first 1, 7, 13, 19,
/// 25, 27; the usual ones (10, 20, 50, 100, 200, 250, 500, 1000) agree.
#[test]
fn strided_is_linspace_except_at_ties() {
    use ddpm::timesteps::{spaced, strided, Spacing};
    let t = 1000i64;
    let mut differ = Vec::new();
    for n in 1..=t as usize {
        let (a, b) = (
            strided(t, n).unwrap(),
            spaced(t, n, Spacing::Linspace).unwrap(),
        );
        if a == b {
            continue;
        }
        differ.push(n);
        if n == 1 {
            continue;
        }
        let den = n as i64 - 1;
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            if x != y {
                let i = den - k as i64;
                // A tie: 2·(i(T−1) mod (n−1)) = n − 1, and the two differ by one.
                assert_eq!(
                    2 * ((i * (t - 1)) % den),
                    den,
                    "n = {n}, i = {i}: {x} vs {y}"
                );
                assert_eq!(x - y, 1, "n = {n}, i = {i}");
            }
        }
    }
    assert_eq!(differ.len(), 221);
    assert_eq!(&differ[..6], &[1, 7, 13, 19, 25, 27]);
    for n in [10, 20, 50, 100, 200, 250, 500, 1000] {
        assert!(!differ.contains(&n), "n = {n}");
    }
}
