//! Section 13 of docs/derivations.md: the conditional oracle, the implicit classifier of
//! guidance, and what guidance does to the sampled law for Gaussians — the tilted density
//! p(x|y)^{1+w} p(x)^{−w} exactly when the two Gaussians share their variance, and neither it
//! nor one sampler-independent law otherwise; for a labelled mixture, not the tilted density.

use ddpm_proofs::stats::estimate;
use ddpm_reference::guidance::{combine, guided_eps};
use ddpm_reference::marginal::standard_normal;
use ddpm_reference::oracle::{DataLaw, LabelledLaw};
use ddpm_reference::sampler::{ancestral_sample, ddim_sample};
use ddpm_reference::{Schedule, ScheduleKind, SigmaChoice};
use ndarray::{array, Array1, Array2};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn article() -> Schedule {
    Schedule::new(ScheduleKind::Article, 1000).unwrap()
}

/// A 2-D labelled mixture: class 0 one Gaussian, class 1 a Gaussian and a point.
fn labelled() -> LabelledLaw {
    LabelledLaw::mixture(
        array![0.4, 0.35, 0.25],
        array![[-0.6, 0.2], [0.5, 0.4], [0.1, -0.7]],
        array![0.3, 0.2, 0.0],
        vec![0, 1, 1],
        2,
    )
    .unwrap()
}

/// Tower property and Bayes' rule: E[ε|x_t] = Σ_y p_t(y|x_t) E[ε|x_t, y], and
/// ε̂(x_t, y) − ε̂(x_t, ∅) = −β̄_t ∇ log p_t(y|x_t) (the implicit classifier's gradient, by
/// central differences of the reference's class posterior with h = 1e-5: truncation
/// ~h²·|∂³ log p| ≲ 1e-8 at these x_t, cancellation ~1e-16/h = 1e-11; tolerance 1e-6 relative
/// to 1 + |ε̂|).
#[test]
fn guidance_adds_the_implicit_classifier_gradient() {
    let (s, law) = (article(), labelled());
    let mut rng = StdRng::seed_from_u64(131);
    for t in [5, 50, 300, 900] {
        let (ab, bb) = (s.alpha_bars()[t], s.beta_bars()[t]);
        let x0 = law.law().sample(6, &mut rng).unwrap();
        let xt = &x0 * ab + standard_normal(6, 2, &mut rng) * bb;
        let post = law.class_posterior(&s, &xt, t).unwrap();
        let uncond = law.law().optimal_eps(&s, &xt, t).unwrap();
        let mut tower = Array2::<f64>::zeros(xt.raw_dim());
        for y in 0..2 {
            let cond = law.conditional_eps(&s, &xt, t, &[y; 6]).unwrap();
            tower += &(&cond * &post.column(y).insert_axis(ndarray::Axis(1)));
            let h = 1e-5;
            for i in 0..6 {
                for c in 0..2 {
                    let mut up = xt.row(i).to_owned().insert_axis(ndarray::Axis(0));
                    let mut down = up.clone();
                    up[[0, c]] += h;
                    down[[0, c]] -= h;
                    let lp = |x: &Array2<f64>| law.class_posterior(&s, x, t).unwrap()[[0, y]].ln();
                    let grad = (lp(&up) - lp(&down)) / (2.0 * h);
                    let diff = cond[[i, c]] - uncond[[i, c]];
                    assert!(
                        (diff + bb * grad).abs() <= 1e-6 * (1.0 + cond[[i, c]].abs()),
                        "t = {t}, y = {y}, row {i}, coordinate {c}: ε̂(x, y) − ε̂(x, ∅) = {diff} vs −β̄ ∇ log p(y|x) = {}",
                        -bb * grad
                    );
                }
            }
        }
        for (a, b) in tower.iter().zip(uncond.iter()) {
            assert!(
                (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                "t = {t}: tower {a} vs {b}"
            );
        }
    }
}

/// A 1-D Gaussian N(m, s²) as a law with its oracle.
fn gaussian(m: f64, s: f64) -> DataLaw {
    DataLaw::mixture(array![1.0], array![[m]], array![s]).unwrap()
}

/// The tilted density N(m_1, s_1²)^{1+w} N(m_0, s_0²)^{−w} (normalised): precision
/// λ = (1+w)/s_1² − w/s_0², mean ((1+w) m_1/s_1² − w m_0/s_0²)/λ; (mean, variance).
fn tilted(m1: f64, s1: f64, m0: f64, s0: f64, w: f64) -> (f64, f64) {
    let lam = (1.0 + w) / (s1 * s1) - w / (s0 * s0);
    (
        ((1.0 + w) * m1 / (s1 * s1) - w * m0 / (s0 * s0)) / lam,
        1.0 / lam,
    )
}

/// The guided oracle of class N(m_1, s_1²) against unconditional N(m_0, s_0²), 1-D, as
/// ε̂_w(x) = a_t x + b_t: a_t = β̄_t λ_t, b_t = −β̄_t ᾱ_t ((1+w) m_1/v_1 − w m_0/v_0),
/// λ_t = (1+w)/v_1 − w/v_0, v_i = ᾱ_t² s_i² + β̄_t² (section 13).
fn linear_guided(s: &Schedule, t: usize, g: (f64, f64, f64, f64, f64)) -> (f64, f64) {
    let (m1, s1, m0, s0, w) = g;
    let (ab, bb) = (s.alpha_bars()[t], s.beta_bars()[t]);
    let (v1, v0) = (ab * ab * s1 * s1 + bb * bb, ab * ab * s0 * s0 + bb * bb);
    let lam = (1.0 + w) / v1 - w / v0;
    (bb * lam, -bb * ab * ((1.0 + w) * m1 / v1 - w * m0 / v0))
}

/// The exact law N(M, V) of a sampler's output from x_T ~ N(0, 1) when ε̂ is linear in x: each
/// step is x' = c x + o + σ z, so M' = c M + o, V' = c² V + σ². Ancestral (posterior σ, all T
/// steps): c = (1 − β_t² a_t/β̄_t)/α_t, o = −β_t² b_t/(β̄_t α_t), σ = β̄_{t−1}β_t/β̄_t; DDIM
/// η = 0 (all T steps): x̂_0 = ((1 − β̄_t a_t) x − β̄_t b_t)/ᾱ_t, x' = ᾱ_{t−1} x̂_0 + β̄_{t−1} ε̂.
/// Written from the step formulas of sections 3 and 9, not from the reference's sampler.
fn sampled_law(s: &Schedule, g: (f64, f64, f64, f64, f64), ddim: bool) -> (f64, f64) {
    let (al, be, ab, bb) = (s.alphas(), s.betas(), s.alpha_bars(), s.beta_bars());
    let (mut m, mut v) = (0.0, 1.0);
    for t in (1..=s.t_max()).rev() {
        let (a, b) = linear_guided(s, t, g);
        let (c, o, sigma) = if ddim {
            let (cx, ox) = ((1.0 - bb[t] * a) / ab[t], -bb[t] * b / ab[t]);
            (
                ab[t - 1] * cx + bb[t - 1] * a,
                ab[t - 1] * ox + bb[t - 1] * b,
                0.0,
            )
        } else {
            let k = be[t] * be[t] / bb[t];
            (
                (1.0 - k * a) / al[t],
                -k * b / al[t],
                bb[t - 1] * be[t] / bb[t],
            )
        };
        m = c * m + o;
        v = c * c * v + sigma * sigma;
    }
    (m, v)
}

/// n = 5000 draws of the reference's ancestral (posterior σ) or DDIM (η = 0, all steps)
/// sampler with the guided oracle `combine(ε̂_1, ε̂_0, w)` of the two Gaussians' oracles.
fn sample_guided(s: &Schedule, g: (f64, f64, f64, f64, f64), ddim: bool, seed: u64) -> Array1<f64> {
    let (m1, s1, m0, s0, w) = g;
    let (cond, uncond) = (gaussian(m1, s1), gaussian(m0, s0));
    let predictor = |x: &Array2<f64>, t: usize| {
        combine(
            &cond.optimal_eps(s, x, t).unwrap(),
            &uncond.optimal_eps(s, x, t).unwrap(),
            w,
        )
        .unwrap()
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let n = 5_000;
    let x_t = standard_normal(n, 1, &mut rng);
    let x = if ddim {
        ddim_sample(s, s.t_max(), 0.0, x_t, predictor, &mut rng).unwrap()
    } else {
        ancestral_sample(s, SigmaChoice::Posterior, x_t, predictor, false, &mut rng).unwrap()
    };
    x.column(0).to_owned()
}

/// Sample mean and variance of `x` against (M, V) within 4 standard errors (mean: sqrt(V/n);
/// variance: V sqrt(2/(n − 1)), the Gaussian case).
fn check_moments(what: &str, x: &Array1<f64>, (m, v): (f64, f64)) {
    let e = estimate(x.view());
    let n = x.len() as f64;
    let var = x.var(1.0);
    assert!(
        (e.mean - m).abs() <= 4.0 * (v / n).sqrt(),
        "{what}: mean {} vs {m} (se {})",
        e.mean,
        (v / n).sqrt()
    );
    let se = v * (2.0 / (n - 1.0)).sqrt();
    assert!(
        (var - v).abs() <= 4.0 * se,
        "{what}: variance {var} vs {v} (se {se})"
    );
}

/// Shared variance: the guided oracle of N(m_1, s²) against N(m_0, s²) *is* the oracle of the
/// tilted N(m_1 + w(m_1 − m_0), s²) at every t (1e-12), so every sampler samples the tilted
/// law up to its own discretisation error (the same as for that law's own oracle: the exact
/// sampled laws agree to 1e-12, and are within 3% in variance and 1% of |mean| + s in mean of
/// the tilted law on the article's schedule, T = 1000 — DDIM's mean is 0.2% short); the
/// reference samplers' draws (n = 5000, w = 2) have the exact sampled law's moments within 4
/// standard errors.
#[test]
fn shared_variance_guidance_samples_the_tilted_gaussian() {
    let s = article();
    let (m1, m0, sd) = (0.5, -0.5, 0.3);
    for w in [0.5, 2.0, 4.0] {
        let g = (m1, sd, m0, sd, w);
        let (tm, tv) = tilted(m1, sd, m0, sd, w);
        assert!((tm - (m1 + w * (m1 - m0))).abs() < 1e-12 && (tv - sd * sd).abs() < 1e-12);
        let own = gaussian(tm, sd);
        let xs = array![[-3.0], [-0.4], [0.0], [0.7], [2.5], [6.0]];
        for t in 1..=s.t_max() {
            let guided = combine(
                &gaussian(m1, sd).optimal_eps(&s, &xs, t).unwrap(),
                &gaussian(m0, sd).optimal_eps(&s, &xs, t).unwrap(),
                w,
            )
            .unwrap();
            let want = own.optimal_eps(&s, &xs, t).unwrap();
            for (a, b) in guided.iter().zip(want.iter()) {
                let scale = (1.0 + 2.0 * w) * (1.0 + b.abs()) / s.beta_bars()[t];
                assert!(
                    (a - b).abs() <= 1e-13 * scale,
                    "w = {w}, t = {t}: guided {a} vs tilted oracle {b}"
                );
            }
        }
        for ddim in [false, true] {
            let name = if ddim { "DDIM η = 0" } else { "ancestral" };
            let exact = sampled_law(&s, g, ddim);
            let plain = sampled_law(&s, (tm, sd, 0.0, 1.0, 0.0), ddim);
            assert!(
                (exact.0 - plain.0).abs() < 1e-12 && (exact.1 - plain.1).abs() < 1e-12,
                "{name}, w = {w}: {exact:?} vs {plain:?}"
            );
            assert!(
                (exact.0 - tm).abs() <= 0.01 * (tm.abs() + sd),
                "{name}, w = {w}: mean {} vs tilted {tm}",
                exact.0
            );
            assert!(
                (exact.1 / tv - 1.0).abs() <= 0.03,
                "{name}, w = {w}: variance {} vs tilted {tv}",
                exact.1
            );
            if w == 2.0 {
                let x = sample_guided(&s, g, ddim, 137 + ddim as u64);
                check_moments(&format!("{name}, shared variance, w = {w}"), &x, exact);
            }
        }
    }
}

/// Different variances: class N(0.5, 0.3²) against unconditional N(0, 1) (and N(0, 0.6²)).
/// (a) The guided oracle is the score of π_t ∝ p_t(x|y)^{1+w} p_t(x)^{−w}, whose variance
/// 1/λ_t = 1 + u c + w(1+w)(a_0 − a_1)² u²/D(u) (u = ᾱ_t², a_i = s_i² − 1,
/// c = (1+w) a_1 − w a_0, D = 1 + u((1+w) a_0 − w a_1)) is not affine in u = ᾱ_t², so no law's
/// diffusion has the marginals π_t (a diffused variance is 1 + u(Var x_0 − 1)). (b) The
/// sampled law, exact by the recursion, is then not the tilted law: its variance is off by
/// far more than the samplers' own error (3%, the w = 0 runs), and the ancestral and DDIM
/// samplers give different laws. (c) The reference samplers' draws confirm the recursion
/// (n = 5000, 4 standard errors: 8% in variance, against differences of 30% and more).
#[test]
fn unshared_variance_guidance_is_not_the_tilted_gaussian() {
    let s = article();
    for (m1, s1, m0, s0, w) in [
        (0.5, 0.3, 0.0, 1.0, 1.0),
        (0.5, 0.3, 0.0, 1.0, 3.0),
        (0.5, 0.3, 0.0, 0.6, 2.0),
    ] {
        let g = (m1, s1, m0, s0, w);
        let what = format!("class N({m1}, {s1}²), unconditional N({m0}, {s0}²), w = {w}");
        let (a0, a1) = (s0 * s0 - 1.0, s1 * s1 - 1.0);
        let c = (1.0 + w) * a1 - w * a0;
        let (_, tv) = tilted(m1, s1, m0, s0, w);
        let mut worst: f64 = 0.0;
        for t in 1..=s.t_max() {
            let (ab, bb) = (s.alpha_bars()[t], s.beta_bars()[t]);
            let u = ab * ab;
            let (v1, v0) = (u * s1 * s1 + bb * bb, u * s0 * s0 + bb * bb);
            let var_t = 1.0 / ((1.0 + w) / v1 - w / v0);
            let dd = 1.0 + u * ((1.0 + w) * a0 - w * a1);
            let formula = 1.0 + u * c + w * (1.0 + w) * (a0 - a1).powi(2) * u * u / dd;
            assert!(
                (var_t - formula).abs() <= 1e-12,
                "{what}, t = {t}: 1/λ_t = {var_t} vs {formula}"
            );
            worst = worst.max((var_t - (u * tv + bb * bb)).abs());
        }
        assert!(
            worst > 0.01,
            "{what}: π_t is the diffused tilted law to {worst}"
        );
        let mut laws = Vec::new();
        for ddim in [false, true] {
            let name = if ddim { "DDIM η = 0" } else { "ancestral" };
            let own = sampled_law(&s, (m1, s1, m0, s0, 0.0), ddim);
            assert!(
                (own.1 / (s1 * s1) - 1.0).abs() <= 0.03,
                "{name}: w = 0 variance {}",
                own.1
            );
            let exact = sampled_law(&s, g, ddim);
            assert!(
                (exact.1 / tv - 1.0).abs() > 0.2,
                "{what}, {name}: sampled variance {} is within 20% of the tilted {tv}",
                exact.1
            );
            let x = sample_guided(&s, g, ddim, 151 + 10 * w as u64 + ddim as u64);
            check_moments(&format!("{what}, {name}"), &x, exact);
            laws.push(exact);
        }
        assert!(
            (laws[0].1 / laws[1].1 - 1.0).abs() > 0.2,
            "{what}: ancestral {:?} and DDIM {:?} agree",
            laws[0],
            laws[1]
        );
    }
}

/// The labelled law's guided oracle is `combine` of its conditional and unconditional oracles
/// (a check of the reference's plumbing for the proofs above).
#[test]
fn guided_oracle_of_a_labelled_law_is_the_combination() {
    let (s, law) = (article(), labelled());
    let xt = array![[0.1, 0.2], [-1.0, 0.5], [0.3, -0.3]];
    for (t, w) in [(1, 0.5), (100, 2.0), (700, 4.0)] {
        let labels = [0, 1, 0];
        let got = guided_eps(&law, &s, &xt, t, &labels, w).unwrap();
        let cond = law.conditional_eps(&s, &xt, t, &labels).unwrap();
        let uncond = law.law().optimal_eps(&s, &xt, t).unwrap();
        let want = &cond * (1.0 + w) - &uncond * w;
        for (a, b) in got.iter().zip(want.iter()) {
            assert!(
                (a - b).abs() <= 1e-12 * (1.0 + w) * (1.0 + b.abs()) / s.beta_bars()[t],
                "t = {t}, w = {w}: {a} vs {b}"
            );
        }
    }
}

/// The product's case, a labelled mixture: classes N(−1, 0.3²) and N(1, 0.3²) of equal weight,
/// 1-D, article schedule, T = 1000, the reference's ancestral sampler (posterior σ) with the
/// guided oracle of class 1, n = 5000. The tilted density p(x|1)^{1+w} p(x)^{−w} (moments by
/// the trapezoid rule on [−4, 5], spacing 4.5e-5: exact to far below the tolerances) is almost
/// the class law itself (p(1|x) ≈ 1 where p(x|1) lives: mean 1.001, variance 0.089 at w = 2),
/// but the guided samples are pushed away from the other class (mean ≈ 1.09): guidance acts
/// at large t, where the noisy classes overlap and p_t(1|x_t)^w has a gradient. Checked: at
/// w = 0 the draws have the class law's mean within 4 standard errors (+ 0.01 step error);
/// at w = 2 their mean is more than 10 standard errors and 0.05 above the tilted mean.
#[test]
fn labelled_mixture_guidance_is_not_the_tilted_density() {
    use ddpm_proofs::gauss::density_1d;
    use ddpm_proofs::quad::trapezoid;
    let s = article();
    let sd = 0.3;
    let law = LabelledLaw::mixture(
        array![0.5, 0.5],
        array![[-1.0], [1.0]],
        array![sd, sd],
        vec![0, 1],
        2,
    )
    .unwrap();
    let n = 5000;
    let rule = trapezoid(-4.0, 5.0, 200_001);
    for (w, seed) in [(0.0, 161), (2.0, 162)] {
        let lt = rule.nodes.mapv(|x| {
            let (py, p) = (
                density_1d(x, 1.0, sd * sd),
                0.5 * density_1d(x, -1.0, sd * sd) + 0.5 * density_1d(x, 1.0, sd * sd),
            );
            (1.0 + w) * py.ln() - w * p.ln()
        });
        let top = lt.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        let dens = lt.mapv(|v| (v - top).exp());
        let z = rule.integrate(&dens);
        let tilted_mean = rule.integrate(&(&dens * &rule.nodes)) / z;
        let predictor =
            |x: &Array2<f64>, t: usize| guided_eps(&law, &s, x, t, &vec![1; x.nrows()], w).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let x_t = standard_normal(n, 1, &mut rng);
        let x =
            ancestral_sample(&s, SigmaChoice::Posterior, x_t, predictor, false, &mut rng).unwrap();
        let e = estimate(x.column(0));
        if w == 0.0 {
            assert!(
                (tilted_mean - 1.0).abs() < 1e-9,
                "the w = 0 tilted density is the class law: {tilted_mean}"
            );
            assert!(
                (e.mean - 1.0).abs() <= 4.0 * e.se + 0.01,
                "w = 0: mean {} vs 1 (se {})",
                e.mean,
                e.se
            );
        } else {
            assert!(
                (tilted_mean - 1.0).abs() < 0.005,
                "w = {w}: tilted mean {tilted_mean}"
            );
            assert!(
                e.mean - tilted_mean > (10.0 * e.se).max(0.05),
                "w = {w}: guided mean {} vs tilted {tilted_mean} (se {})",
                e.mean,
                e.se
            );
        }
    }
}
