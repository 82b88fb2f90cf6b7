//! Classifier-free guidance: ε̂_w = (1 + w) ε̂(x_t, y) − w ε̂(x_t, ∅), and the guided oracle of
//! a labelled law (docs/derivations.md, section 13).

use ndarray::Array2;

use crate::error::{check_shape, RefError, Result};
use crate::oracle::LabelledLaw;
use crate::schedule::Schedule;

/// Checks that the guidance weight w is finite and ≥ 0.
pub fn check_weight(w: f64) -> Result<f64> {
    if w.is_finite() && w >= 0.0 {
        Ok(w)
    } else {
        Err(RefError::InvalidParameter {
            name: "guidance weight w",
            value: w,
            reason: "must be finite and >= 0",
        })
    }
}

/// ε̂_w = (1 + w) ε̂_cond − w ε̂_uncond, computed as ε̂_cond + w (ε̂_cond − ε̂_uncond) (the same
/// number; w = 0 returns ε̂_cond exactly). Both arrays [n, d]; w finite and ≥ 0.
pub fn combine(cond: &Array2<f64>, uncond: &Array2<f64>, w: f64) -> Result<Array2<f64>> {
    check_weight(w)?;
    check_shape(
        "unconditional ε̂ against the conditional",
        cond.shape(),
        uncond.shape(),
    )?;
    Ok(cond + &((cond - uncond) * w))
}

/// The guided oracle of a labelled law: `combine` of E[ε | x_t, y_i] and E[ε | x_t] for each
/// row i of x_t [n, d] with its label `labels[i]` ∈ 0..=classes (`classes()` = ∅, for which
/// the guided value is E[ε | x_t] whatever w).
pub fn guided_eps(
    law: &LabelledLaw,
    schedule: &Schedule,
    xt: &Array2<f64>,
    t: usize,
    labels: &[usize],
    w: f64,
) -> Result<Array2<f64>> {
    check_weight(w)?;
    let cond = law.conditional_eps(schedule, xt, t, labels)?;
    if w == 0.0 {
        return Ok(cond);
    }
    let uncond = law.law().optimal_eps(schedule, xt, t)?;
    combine(&cond, &uncond, w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::DataLaw;
    use crate::schedule::ScheduleKind;
    use approx::assert_relative_eq;
    use ndarray::array;

    fn law() -> LabelledLaw {
        LabelledLaw::mixture(
            array![0.5, 0.3, 0.2],
            array![[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]],
            array![0.3, 0.2, 0.25],
            vec![0, 1, 1],
            2,
        )
        .unwrap()
    }

    #[test]
    fn combine_is_the_extrapolation_and_w_zero_is_the_conditional() {
        let (c, u) = (array![[1.0, -2.0]], array![[0.5, 1.0]]);
        assert_eq!(combine(&c, &u, 0.0).unwrap(), c);
        let g = combine(&c, &u, 2.0).unwrap();
        assert_relative_eq!(g[[0, 0]], 3.0 * 1.0 - 2.0 * 0.5, max_relative = 1e-15);
        assert_relative_eq!(g[[0, 1]], 3.0 * -2.0 - 2.0 * 1.0, max_relative = 1e-15);
        for w in [-0.5, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                combine(&c, &u, w),
                Err(RefError::InvalidParameter { .. })
            ));
        }
        assert!(matches!(
            combine(&c, &array![[1.0]], 1.0),
            Err(RefError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn the_guided_oracle_of_no_class_is_the_unconditional_oracle() {
        let s = Schedule::new(ScheduleKind::Article, 100).unwrap();
        let l = law();
        let xt = array![[0.3, -1.2], [2.0, 0.1], [-0.4, 0.4]];
        let g = guided_eps(&l, &s, &xt, 40, &[2, 2, 2], 3.0).unwrap();
        assert_eq!(g, l.law().optimal_eps(&s, &xt, 40).unwrap());
        let c = guided_eps(&l, &s, &xt, 40, &[0, 1, 2], 0.0).unwrap();
        assert_eq!(c, l.conditional_eps(&s, &xt, 40, &[0, 1, 2]).unwrap());
    }

    #[test]
    fn labelled_laws_have_their_class_laws_and_weights() {
        let l = law();
        assert_eq!(l.classes(), 2);
        assert_relative_eq!(l.class_weights()[0], 0.5, max_relative = 1e-15);
        assert_relative_eq!(l.class_weights()[1], 0.5, max_relative = 1e-15);
        let one = DataLaw::mixture(
            array![0.3, 0.2],
            array![[2.0, 1.0], [0.0, -3.0]],
            array![0.2, 0.25],
        )
        .unwrap();
        assert_eq!(l.class_law(1).unwrap(), &one);
        assert_eq!(l.class_law(2).unwrap(), l.law());
        assert!(l.class_law(3).is_err());
        let s = Schedule::new(ScheduleKind::Article, 100).unwrap();
        assert!(l.conditional_eps(&s, &array![[0.0, 0.0]], 5, &[3]).is_err());
        assert!(l
            .conditional_eps(&s, &array![[0.0, 0.0]], 5, &[0, 1])
            .is_err());
        // Each row of the class posterior sums to 1.
        let p = l
            .class_posterior(&s, &array![[0.0, 0.0], [5.0, 5.0]], 50)
            .unwrap();
        for row in p.rows() {
            assert_relative_eq!(row.sum(), 1.0, max_relative = 1e-12);
        }
        let bad = |labels: Vec<usize>, classes: usize| {
            LabelledLaw::finite(array![1.0, 0.0], array![[0.0], [1.0]], labels, classes)
        };
        assert!(matches!(
            bad(vec![0], 1),
            Err(RefError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            bad(vec![0, 2], 2),
            Err(RefError::InvalidParameter { .. })
        ));
        assert!(matches!(bad(vec![0, 1], 0), Err(RefError::EmptyLaw(_))));
        // Class 1 has only a zero-weight point: p(x_0 | y = 1) does not exist.
        assert!(matches!(
            bad(vec![0, 1], 2),
            Err(RefError::InvalidParameter { .. })
        ));
        assert!(bad(vec![0, 0], 1).is_ok());
    }

    #[test]
    fn joint_samples_keep_each_component_s_label() {
        use rand::rngs::StdRng;
        use rand::SeedableRng;
        // Components 8 stds apart: each draw's label is the class of its nearest mean.
        let l = law();
        let (x, y) = l.sample(500, &mut StdRng::seed_from_u64(5)).unwrap();
        assert_eq!((x.nrows(), y.len()), (500, 500));
        let means = array![[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]];
        for (row, &label) in x.rows().into_iter().zip(&y) {
            let nearest = (0..3)
                .min_by(|&a, &b| {
                    let da = (&row - &means.row(a)).mapv(|v| v * v).sum();
                    let db = (&row - &means.row(b)).mapv(|v| v * v).sum();
                    da.total_cmp(&db)
                })
                .unwrap();
            assert_eq!(l.labels()[nearest], label);
        }
    }
}
