//! Section 13 of docs/derivations.md: the probability-flow ODE of Gaussian data N(m, s² I) under
//! the exact oracle has the closed-form solution x_t = ᾱ_t m + sqrt(ᾱ_t² s² + β̄_t²) u with u
//! constant; DDIM (η = 0) converges to it at order 1, DPM-Solver++(2M) at order 2.

use ddpm_reference::dpm_solver::{visited, DpmSolver};
use ddpm_reference::marginal::standard_normal;
use ddpm_reference::oracle::DataLaw;
use ddpm_reference::sampler::ddim_step;
use ddpm_reference::timesteps::{step_pairs, strided, Spacing};
use ddpm_reference::{Schedule, ScheduleKind};
use ndarray::{array, Array1, Array2};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// The step counts the issue names.
const STEPS: [usize; 5] = [5, 10, 20, 40, 80];

/// N(m, s² I) in 4 dimensions, its oracle and a fixed batch of starting points x_T.
struct Problem {
    law: DataLaw,
    m: Array1<f64>,
    s: f64,
    x_start: Array2<f64>,
}

fn problem() -> Problem {
    let m = array![0.3, -0.5, 0.8, 0.0];
    let s = 0.5;
    let law = DataLaw::mixture(
        array![1.0],
        m.clone().insert_axis(ndarray::Axis(0)),
        array![s],
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(13);
    let x_start = standard_normal(16, 4, &mut rng) * 1.5;
    Problem { law, m, s, x_start }
}

impl Problem {
    /// The exact flow from x at step `from` to step `to` (both ≥ 1): u = (x − ᾱ m)/sqrt(ᾱ² s² + β̄²) is kept.
    fn exact(&self, schedule: &Schedule, x: &Array2<f64>, from: usize, to: usize) -> Array2<f64> {
        let w = |t: usize| {
            let (ab, bb) = (
                schedule.alpha_bar(t).unwrap(),
                schedule.beta_bar(t).unwrap(),
            );
            (ab, (ab * ab * self.s * self.s + bb * bb).sqrt())
        };
        let ((a_f, w_f), (a_t, w_t)) = (w(from), w(to));
        let u = (x - &(&self.m * a_f)) / w_f;
        u * w_t + &self.m * a_t
    }

    fn eps(&self, schedule: &Schedule, x: &Array2<f64>, t: usize) -> Array2<f64> {
        self.law.optimal_eps(schedule, x, t).unwrap()
    }

    /// The ODE's end point from x at step `from`: m + s u.
    fn exact_end(&self, schedule: &Schedule, x: &Array2<f64>, from: usize) -> Array2<f64> {
        let (ab, bb) = (
            schedule.alpha_bar(from).unwrap(),
            schedule.beta_bar(from).unwrap(),
        );
        let u = (x - &(&self.m * ab)) / (ab * ab * self.s * self.s + bb * bb).sqrt();
        u * self.s + &self.m
    }

    /// DDIM η = 0 over `visited` and the last step to 0.
    fn ddim_to_zero(&self, schedule: &Schedule, visited: &[usize]) -> Array2<f64> {
        let zero = Array2::zeros(self.x_start.dim());
        let mut x = self.x_start.clone();
        for (tau, next) in step_pairs(visited) {
            let eps = self.eps(schedule, &x, tau);
            x = ddim_step(schedule, &x, tau, next, &eps, 0.0, &zero).unwrap();
        }
        x
    }

    /// DDIM η = 0 over `visited`, stopped at the last visited step (before the jump to 0).
    fn ddim(&self, schedule: &Schedule, visited: &[usize]) -> Array2<f64> {
        let zero = Array2::zeros(self.x_start.dim());
        let pairs = step_pairs(visited);
        let mut x = self.x_start.clone();
        for &(tau, next) in &pairs[..pairs.len() - 1] {
            let eps = self.eps(schedule, &x, tau);
            x = ddim_step(schedule, &x, tau, next, &eps, 0.0, &zero).unwrap();
        }
        x
    }

    /// DPM-Solver++(2M) over `visited`, stopped at the last visited step (`upto` = n − 1 steps)
    /// or run to 0 (`upto` = n).
    fn dpm(&self, schedule: &Schedule, visited: &[usize], upto: usize) -> Array2<f64> {
        let solver = DpmSolver::from_visited(schedule, visited, false).unwrap();
        let mut x = self.x_start.clone();
        let mut prev: Option<Array2<f64>> = None;
        for (i, &(s, _)) in solver.steps()[..upto].iter().enumerate() {
            let eps = self.eps(schedule, &x, s);
            let wanted = solver.is_second_order(i).then_some(prev.as_ref()).flatten();
            let (next, x0) = solver.step(i, &x, &eps, wanted).unwrap();
            x = next;
            prev = Some(x0);
        }
        x
    }
}

/// Root mean square of a − b over the batch and the dimensions.
fn rms(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    let sq: f64 = a.iter().zip(b.iter()).map(|(p, q)| (p - q).powi(2)).sum();
    (sq / a.len() as f64).sqrt()
}

fn sci(errors: &[f64]) -> String {
    let cells: Vec<String> = errors.iter().map(|e| format!("{e:.3e}")).collect();
    cells.join(", ")
}

/// Least-squares slope of −ln(error) against ln(n), over the step counts `steps`.
fn order(steps: &[usize], errors: &[f64]) -> f64 {
    let xs: Vec<f64> = steps.iter().map(|&n| (n as f64).ln()).collect();
    let ys: Vec<f64> = errors.iter().map(|e| -e.ln()).collect();
    let (mx, my) = (
        xs.iter().sum::<f64>() / xs.len() as f64,
        ys.iter().sum::<f64>() / ys.len() as f64,
    );
    let cov: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    cov / var
}

/// A schedule of n steps whose λ_t = ln(ᾱ_t/β̄_t) is evenly spaced from λ_1 = 5 down to λ_n = −5
/// (ᾱ² = 1/(1 + e^{−2λ})), so that walking all n steps is n − 1 equal steps in λ.
fn lambda_uniform(n: usize) -> Schedule {
    let (hi, lo) = (5.0f64, -5.0f64);
    let lambda = |k: usize| hi - (hi - lo) * (k - 1) as f64 / (n - 1) as f64;
    let alpha_bar = |k: usize| 1.0 / (1.0 + (-2.0 * lambda(k)).exp()).sqrt();
    let alphas: Vec<f64> = (1..=n)
        .map(|k| {
            let prev = if k == 1 { 1.0 } else { alpha_bar(k - 1) };
            alpha_bar(k) / prev
        })
        .collect();
    Schedule::from_alphas(&alphas).unwrap()
}

/// The solver alone: n equal steps in λ from λ = −5 to λ = 5 (a schedule of n + 1 steps,
/// walked from t = n + 1 to t = 1), global error at t = 1 against the closed form, RMS over 16
/// starting points × 4 dimensions.
///
/// Bounds, on the slope fitted over the three finest counts (20, 40, 80 steps, h ≤ 0.5 in λ):
/// [0.93, 1.07] for DDIM and [1.85, 2.15] for DPM-Solver++(2M); measured 0.967 and 1.931 (both
/// approach their order from below as err·n^p settles). The coarse counts 5 and 10 (h = 2 and 1)
/// are printed but only held to a weaker bound: there the 2M error passes through a sign change
/// (its first, first-order step and its second-order steps contribute with opposite signs), so
/// its value at n = 5 is small by cancellation and a fit over all five counts (1.44 here) says
/// nothing about the order; scanning other λ ranges and s moves that fit between 1.3 and 3.0
/// while the fine fit stays within 1.85–2.05 (docs/derivations.md, section 15). DDIM's fit over
/// all five must still lie in [0.85, 1.15]. A first-order method cannot reach 1.85, a
/// second-order one cannot fall to 1.07.
#[test]
fn ddim_is_first_order_and_dpm_solver_second_order_in_lambda() {
    let p = problem();
    let (mut e_ddim, mut e_dpm) = (Vec::new(), Vec::new());
    for &n in &STEPS {
        let s = lambda_uniform(n + 1);
        let exact = p.exact(&s, &p.x_start, n + 1, 1);
        let visited: Vec<usize> = (1..=n + 1).rev().collect();
        e_ddim.push(rms(&p.ddim(&s, &visited), &exact));
        e_dpm.push(rms(&p.dpm(&s, &visited, n), &exact));
    }
    let fits = |e: &[f64]| (order(&STEPS, e), order(&STEPS[2..], &e[2..]));
    let ((ddim_all, ddim_fine), (dpm_all, dpm_fine)) = (fits(&e_ddim), fits(&e_dpm));
    println!(
        "λ-uniform: DDIM errors {}, order {ddim_all:.3} (20–80: {ddim_fine:.3})",
        sci(&e_ddim)
    );
    println!(
        "λ-uniform: DPM-Solver++(2M) errors {}, order {dpm_all:.3} (20–80: {dpm_fine:.3})",
        sci(&e_dpm)
    );
    assert!((0.85..=1.15).contains(&ddim_all), "DDIM order {ddim_all}");
    assert!(
        (0.93..=1.07).contains(&ddim_fine),
        "DDIM order {ddim_fine} over 20–80"
    );
    assert!(
        (1.85..=2.15).contains(&dpm_fine),
        "DPM-Solver++(2M) order {dpm_fine} over 20–80"
    );
    assert!(dpm_all > 1.2, "DPM-Solver++(2M) order {dpm_all} over 5–80");
    // And at every n the second-order solver is the more accurate.
    assert!(e_dpm.iter().zip(&e_ddim).all(|(a, b)| a < b));
}

/// The product's walk: the article's schedule, T = 1000; DDIM over the strided list
/// (`strided(T, n)`, ending at τ_1 = 1) and DPM-Solver++(2M) over its own list
/// (`dpm_solver::visited`, the strided list of n + 1 steps without t = 1), both run to t = 0
/// and compared with the ODE's end point m + s u. The grid is even in t, not in λ, and both end
/// with the jump x̂_0(x_{τ_1}), whose bias ∝ β̄_{τ_1}² (τ_1 ≈ T/n for DPM-Solver++) has the opposite
/// sign to the solver's error, so the 2M errors are not monotone in n (measured: 0.34, 0.14,
/// 0.028, 0.0022, 0.0036). Held: DDIM's fitted order in [0.9, 1.1] (measured 0.995);
/// DPM-Solver++(2M) more accurate than DDIM at every n, and at 40 steps more than ten times as
/// accurate as DDIM at 80.
#[test]
fn dpm_solver_beats_ddim_on_the_article_schedule() {
    let p = problem();
    let s = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let end = p.exact_end(&s, &p.x_start, 1000);
    let (mut e_ddim, mut e_dpm) = (Vec::new(), Vec::new());
    for &n in &STEPS {
        e_ddim.push(rms(&p.ddim_to_zero(&s, &strided(1000, n).unwrap()), &end));
        let list = visited(1000, n, Spacing::Strided).unwrap();
        e_dpm.push(rms(&p.dpm(&s, &list, n), &end));
    }
    let (o_ddim, o_dpm) = (order(&STEPS, &e_ddim), order(&STEPS, &e_dpm));
    println!("article: DDIM errors {}, order {o_ddim:.3}", sci(&e_ddim));
    println!(
        "article: DPM-Solver++(2M) errors {}, order {o_dpm:.3}",
        sci(&e_dpm)
    );
    assert!((0.9..=1.1).contains(&o_ddim), "DDIM order {o_ddim}");
    assert!(e_dpm.iter().zip(&e_ddim).all(|(a, b)| a < b));
    assert!(e_dpm[3] * 10.0 < e_ddim[4], "{} vs {}", e_dpm[3], e_ddim[4]);
}
