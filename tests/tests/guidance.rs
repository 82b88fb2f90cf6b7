//! Conditional oracles and classifier-free guidance: the tch labelled law's E[ε | x_t, y] is the
//! reference oracle of the class's own law (and E[ε | x_t] at ∅), the tch `combine` and
//! `Guided` prediction and one guided sampler step equal the reference's, `Guided` with w = 0
//! is plain conditional sampling (bitwise), and conditional sampling with the exact oracle
//! reproduces the class's components (docs/derivations.md, section 13).

use ddpm::guidance::{combine, ConditionalPredictor, Guided};
use ddpm::oracle::{LabelledLaw, LabelledOracle, Oracle};
use ddpm::sampler::{NoisePredictor, Sampler, SamplerConfig};
use ddpm::schedule::{Schedule, ScheduleKind};
use ddpm::sigma::SigmaChoice;
use ddpm_reference as reference;
use ddpm_tests::{
    array2, check, close_scaled, mixture, normal, schedule_and_t, seed, single_thread, tensor,
    test_device, values, Mixture,
};
use ndarray::{array, s, Array1, Array2, Axis};
use proptest::prelude::*;
use statrs::distribution::{ContinuousCDF, Normal};
use tch::{Device, Kind, Tensor};

/// A mixture with labels `k % classes` (so every class has a component, of weight ≥ 0.05).
#[derive(Clone, Debug)]
struct Labelled {
    mix: Mixture,
    classes: usize,
}

impl Labelled {
    fn labels(&self) -> Vec<usize> {
        (0..self.mix.weights.len())
            .map(|k| k % self.classes)
            .collect()
    }

    fn reference(&self) -> reference::LabelledLaw {
        reference::LabelledLaw::mixture(
            Array1::from(self.mix.weights.clone()),
            self.mix.means.clone(),
            Array1::from(self.mix.stds.clone()),
            self.labels(),
            self.classes,
        )
        .unwrap()
    }

    fn tch(&self, device: Device) -> LabelledLaw {
        let labels: Vec<i64> = self.labels().iter().map(|&y| y as i64).collect();
        LabelledLaw::mixture(
            &Tensor::from_slice(&self.mix.weights).to_device(device),
            &tensor(&self.mix.means, Kind::Double, device),
            &Tensor::from_slice(&self.mix.stds).to_device(device),
            &Tensor::from_slice(&labels).to_device(device),
            self.classes,
        )
        .unwrap()
    }

    /// The components of class y (all of them for ∅ = `classes`).
    fn class_mixture(&self, y: usize) -> Mixture {
        let idx: Vec<usize> = (0..self.mix.weights.len())
            .filter(|&k| y == self.classes || k % self.classes == y)
            .collect();
        Mixture {
            weights: idx.iter().map(|&k| self.mix.weights[k]).collect(),
            means: self.mix.means.select(Axis(0), &idx),
            stds: idx.iter().map(|&k| self.mix.stds[k]).collect(),
        }
    }
}

fn labelled() -> impl Strategy<Value = Labelled> {
    mixture().prop_flat_map(|mix| {
        let k = mix.weights.len();
        (Just(mix), 1..=k).prop_map(|(mix, classes)| Labelled { mix, classes })
    })
}

/// The rounding scale of an oracle value, as in tests/tests/oracle.rs (`oracle_scale`): each
/// term β̄(x − ᾱm_k)/v_k and each responsibility's exponent a_k (error ~u·|a_k|).
fn oracle_scale(mix: &Mixture, x: &[f64], ab: f64, bb: f64) -> Vec<f64> {
    let d = x.len();
    let mut a = Vec::new();
    for (k, (&w, &s)) in mix.weights.iter().zip(&mix.stds).enumerate() {
        let v = ab * ab * s * s + bb * bb;
        let dist: f64 = (0..d)
            .map(|i| (x[i] - ab * mix.means[[k, i]]).powi(2))
            .sum();
        a.push((w.ln() - 0.5 * d as f64 * v.ln() - dist / (2.0 * v), v));
    }
    let top = a.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = a.iter().map(|p| (p.0 - top).exp()).sum();
    (0..d)
        .map(|i| {
            a.iter()
                .enumerate()
                .map(|(k, &(ak, v))| {
                    let r = (ak - top).exp() / total;
                    let m = ab * mix.means[[k, i]];
                    r * bb / v * ((x[i].abs() + m.abs()) + (x[i] - m).abs() * (1.0 + ak.abs()))
                })
                .sum()
        })
        .collect()
}

/// Tolerances as in tests/tests/oracle.rs: f64 1e-10, f32 5e-6 relative to the scale above
/// (the masked softmax is the same ~30 operations as the plain oracle; masking is exact).
const TOL: [(Kind, f64); 2] = [(Kind::Double, 1e-10), (Kind::Float, 5e-6)];

/// One case: a labelled law, a schedule, n rows at times near t0 with their own labels
/// (∅ included), x_t from the law's marginal for even rows and arbitrary for odd ones.
type CaseValue = (
    Labelled,
    (ddpm_tests::ScheduleSpec, usize, usize),
    usize,
    u64,
);

fn case() -> impl Strategy<Value = CaseValue> {
    (labelled(), schedule_and_t(), 1usize..=5, seed())
}

struct Inputs {
    ts: Vec<usize>,
    labels: Vec<usize>,
    xt: Array2<f64>,
}

fn inputs(
    l: &Labelled,
    r: &reference::Schedule,
    big_t: usize,
    t0: usize,
    n: usize,
    sd: u64,
) -> Inputs {
    use rand::SeedableRng;
    let d = l.mix.means.ncols();
    let ts: Vec<usize> = (0..n).map(|i| 1 + (t0 - 1 + i * 7) % big_t).collect();
    let labels: Vec<usize> = (0..n)
        .map(|i| (i + sd as usize % 7) % (l.classes + 1))
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(sd);
    let x0 = l.reference().law().sample(n, &mut rng).unwrap();
    let eps = normal(n, d, sd ^ 3);
    let mut xt = Array2::zeros((n, d));
    for (i, &ti) in ts.iter().enumerate() {
        let row = if i % 2 == 0 {
            &x0.row(i) * r.alpha_bar(ti).unwrap() + &eps.row(i) * r.beta_bar(ti).unwrap()
        } else {
            eps.row(i).to_owned() * 2.0
        };
        xt.row_mut(i).assign(&row);
    }
    Inputs { ts, labels, xt }
}

/// f32 has no room for the exponents of β̄_t < 1e-3 (see tests/tests/oracle.rs), nor for tiny
/// ᾱ_t: the oracle squares ‖x_t/ᾱ_t − m_k‖, which overflows f32's 3.4e38 once ᾱ_t < |x_t|/1.8e19
/// (tests/tests/oracle.rs's bound ᾱ_t ≥ 1e-20 is not enough for |x_t| ≈ 4: a case here hit
/// it at ᾱ_t ≈ 1e-19); 1e-15 leaves room for |x_t| up to 1e4.
fn f32_unusable(r: &reference::Schedule, ts: &[usize]) -> bool {
    ts.iter()
        .any(|&t| r.alpha_bar(t).unwrap() < 1e-15 || r.beta_bar(t).unwrap() < 1e-3)
}

/// libtorch has one global generator: the tests here that draw from it (seeded sampling whose
/// bits are compared, and statistical ones) hold this lock so that none draws meanwhile.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn int64(v: &[usize], device: Device) -> Tensor {
    Tensor::from_slice(&v.iter().map(|&y| y as i64).collect::<Vec<_>>()).to_device(device)
}

/// E[ε | x_t, y] of the tch labelled law (masked responsibilities) equals the reference oracle
/// of the class's own law p(x_0 | y) (its components, renormalised), and E[ε | x_t] for ∅;
/// `LabelledOracle::class_oracle(y)` is that same class law on the tch side.
fn conditional_oracle_is_the_class_oracle(device: Device) {
    check(128, case(), |(l, (spec, big_t, t0), n, sd)| {
        let (r, s) = (spec.reference(big_t), spec.tch(big_t, device));
        let d = l.mix.means.ncols();
        let Inputs { ts, labels, xt } = inputs(&l, &r, big_t, t0, n, sd);
        let law = l.tch(device);
        let law_ref = l.reference();
        let t = int64(&ts, device);
        let y = int64(&labels, device);
        for (kind, tol) in TOL {
            if kind == Kind::Float && f32_unusable(&r, &ts) {
                continue;
            }
            let xt = if kind == Kind::Float {
                ddpm_tests::round_f32(&xt)
            } else {
                xt.clone()
            };
            let got = law
                .conditional_eps(&s, &tensor(&xt, kind, device), &t, &y)
                .unwrap();
            prop_assert_eq!(got.kind(), kind);
            let got = values(&got);
            for i in 0..n {
                let xi = xt.slice(s![i..=i, ..]).to_owned();
                let own = law_ref.class_law(labels[i]).unwrap();
                let want = own.optimal_eps(&r, &xi, ts[i]).unwrap();
                let (ab, bb) = (r.alpha_bar(ts[i]).unwrap(), r.beta_bar(ts[i]).unwrap());
                let scale =
                    oracle_scale(&l.class_mixture(labels[i]), xi.as_slice().unwrap(), ab, bb);
                close_scaled(
                    &format!(
                        "E[ε|x_t, y = {}] at t = {}, {kind:?}, row {i}",
                        labels[i], ts[i]
                    ),
                    &got[i * d..(i + 1) * d],
                    want.as_slice().unwrap(),
                    &scale,
                    tol,
                )?;
            }
        }
        // The class oracles on the tch side agree with the masked computation, row by row.
        let oracle = LabelledOracle::new(law, &s);
        let x = tensor(&xt, Kind::Double, device);
        let masked = values(&oracle.predict_class(&x, &t, &y).unwrap());
        for (i, &yi) in labels.iter().enumerate() {
            let own = values(&oracle.class_oracle(yi).unwrap().predict(&x, &t).unwrap());
            let (ab, bb) = (r.alpha_bar(ts[i]).unwrap(), r.beta_bar(ts[i]).unwrap());
            let scale = oracle_scale(&l.class_mixture(yi), &own[i * d..(i + 1) * d], ab, bb)
                .iter()
                .zip(oracle_scale(
                    &l.class_mixture(yi),
                    xt.row(i).as_slice().unwrap(),
                    ab,
                    bb,
                ))
                .map(|(a, b)| a.max(b))
                .collect::<Vec<_>>();
            close_scaled(
                &format!("class_oracle({yi}) against the masked oracle, row {i}"),
                &masked[i * d..(i + 1) * d],
                &own[i * d..(i + 1) * d],
                &scale,
                1e-10,
            )?;
        }
        Ok(())
    });
}
test_device!(
    conditional_oracle_is_the_class_oracle,
    conditional_oracle_is_the_class_oracle_cpu,
    conditional_oracle_is_the_class_oracle_cuda
);

/// w of the guided tests: 0, the grid, and values between.
fn weight() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(0.5),
        Just(1.0),
        Just(2.0),
        Just(4.0),
        0.0f64..8.0
    ]
}

/// The tch guided prediction (`Guided` over the exact `LabelledOracle`, one call on the doubled
/// batch) equals the reference's `guided_eps`, and one ancestral step of the tch `Sampler`
/// with it equals the reference's `ancestral_step` with the reference's guided ε̂. Error scale:
/// (1 + w) times the conditional oracle's plus w times the unconditional's; the step's is
/// (|x| + (β_t²/β̄_t) that)/α_t + σ_t|z|.
fn guided_step_agrees(device: Device) {
    check(
        96,
        (case(), weight()),
        |((l, (spec, big_t, t0), n, sd), w)| {
            let (r, s) = (spec.reference(big_t), spec.tch(big_t, device));
            let d = l.mix.means.ncols();
            // One t for the batch (a sampler step), labels per row.
            let Inputs { labels, xt, .. } = inputs(&l, &r, big_t, t0, n, sd);
            let ts = vec![t0; n];
            let oracle = LabelledOracle::new(l.tch(device), &s);
            let guided = Guided {
                model: &oracle,
                labels: int64(&labels, device),
                w,
            };
            prop_assert!(guided.check_input(&[n as i64, d as i64]).is_ok());
            let t = int64(&ts, device);
            let (ab, bb) = (r.alpha_bar(t0).unwrap(), r.beta_bar(t0).unwrap());
            let law_ref = l.reference();
            let want = reference::guidance::guided_eps(&law_ref, &r, &xt, t0, &labels, w).unwrap();
            let scale: Vec<f64> = (0..n)
                .flat_map(|i| {
                    let xi = xt.row(i).to_vec();
                    let c = oracle_scale(&l.class_mixture(labels[i]), &xi, ab, bb);
                    let u = oracle_scale(&l.class_mixture(l.classes), &xi, ab, bb);
                    c.iter()
                        .zip(u)
                        .map(|(c, u)| (1.0 + w) * c + w * u)
                        .collect::<Vec<_>>()
                })
                .collect();
            for (kind, tol) in TOL {
                if kind == Kind::Float && f32_unusable(&r, &ts) {
                    continue;
                }
                let xk = if kind == Kind::Float {
                    ddpm_tests::round_f32(&xt)
                } else {
                    xt.clone()
                };
                let want = if kind == Kind::Float {
                    reference::guidance::guided_eps(&law_ref, &r, &xk, t0, &labels, w).unwrap()
                } else {
                    want.clone()
                };
                let got = guided.predict(&tensor(&xk, kind, device), &t).unwrap();
                prop_assert_eq!(got.kind(), kind);
                close_scaled(
                    &format!("guided ε̂, w = {w}, t = {t0}, {kind:?}"),
                    &values(&got),
                    want.as_slice().unwrap(),
                    &scale,
                    tol,
                )?;
            }
            // One ancestral step (posterior σ) at t0 through the product's `Sampler::step`.
            let sampler = Sampler::new(
                &s,
                SamplerConfig {
                    sigma: SigmaChoice::Posterior,
                    ..SamplerConfig::default()
                },
            )
            .unwrap();
            let i = big_t - t0;
            prop_assert_eq!(sampler.steps()[i].0, t0 as i64);
            let z = normal(n, d, sd ^ 5);
            let x = tensor(&xt, Kind::Double, device);
            let eps_hat = guided.predict(&x, &t).unwrap();
            let got = sampler
                .step(i, &x, &eps_hat, Some(&tensor(&z, Kind::Double, device)))
                .unwrap();
            let sigma_t =
                reference::sigma::sigma(&r, reference::SigmaChoice::Posterior, t0).unwrap();
            let step_ref =
                reference::sampler::ancestral_step(&r, &xt, t0, &want, sigma_t, &z).unwrap();
            let (a, b) = (r.alpha(t0).unwrap(), r.beta(t0).unwrap());
            let step_scale: Vec<f64> = (0..n * d)
                .map(|j| {
                    let (i, c) = (j / d, j % d);
                    (xt[[i, c]].abs() + b * b / bb * scale[j]) / a + sigma_t * z[[i, c]].abs()
                })
                .collect();
            close_scaled(
                &format!("guided ancestral step, w = {w}, t = {t0}"),
                &values(&got),
                step_ref.as_slice().unwrap(),
                &step_scale,
                1e-10,
            )?;
            Ok(())
        },
    );
}
test_device!(
    guided_step_agrees,
    guided_step_agrees_cpu,
    guided_step_agrees_cuda
);

/// The tch `combine` equals the reference's: f64 to 4 ulps of |c| + w|c − u| (two roundings
/// on each side, in another order), f32 (inputs rounded to f32) to 4 f32 ulps of it.
#[test]
fn combine_agrees() {
    single_thread();
    check(
        256,
        ((1usize..=5, 1usize..=6), weight(), seed()),
        |((n, d), w, sd)| {
            let (c, u) = (normal(n, d, sd) * 3.0, normal(n, d, sd ^ 1));
            for (kind, ulp) in [
                (Kind::Double, f64::EPSILON),
                (Kind::Float, f32::EPSILON as f64),
            ] {
                let (c, u) = if kind == Kind::Float {
                    (ddpm_tests::round_f32(&c), ddpm_tests::round_f32(&u))
                } else {
                    (c.clone(), u.clone())
                };
                let want = reference::guidance::combine(&c, &u, w).unwrap();
                let got = combine(
                    &tensor(&c, kind, Device::Cpu),
                    &tensor(&u, kind, Device::Cpu),
                    w,
                )
                .unwrap();
                prop_assert_eq!(got.kind(), kind);
                let scale: Vec<f64> = c
                    .iter()
                    .zip(u.iter())
                    .map(|(c, u)| c.abs() + w * (c - u).abs())
                    .collect();
                close_scaled(
                    &format!("combine, w = {w}, {kind:?}"),
                    &values(&got),
                    want.as_slice().unwrap(),
                    &scale,
                    4.0 * ulp,
                )?;
            }
            Ok(())
        },
    );
}

/// Bad labels and weights are errors before sampling (and in `predict`), never panics.
#[test]
fn bad_labels_and_weights_are_errors() {
    use ddpm::error::DdpmError;
    single_thread();
    let s = Schedule::new(ScheduleKind::Article, 10, Device::Cpu).unwrap();
    let l = Labelled {
        mix: Mixture {
            weights: vec![1.0, 1.0],
            means: array![[-1.0], [1.0]],
            stds: vec![0.1, 0.2],
        },
        classes: 2,
    };
    let oracle = LabelledOracle::new(l.tch(Device::Cpu), &s);
    let x = Tensor::zeros([3, 1], (Kind::Double, Device::Cpu));
    let t = Tensor::full([3], 4i64, (Kind::Int64, Device::Cpu));
    let guided = |labels: Tensor, w: f64| Guided {
        model: &oracle,
        labels,
        w,
    };
    let ok = guided(Tensor::from_slice(&[0i64, 1, 2]), 1.0);
    assert!(ok.check_input(&[3, 1]).is_ok());
    assert!(ok.predict(&x, &t).is_ok());
    for (labels, w) in [
        (Tensor::from_slice(&[0i64, 1, 3]), 1.0),
        (Tensor::from_slice(&[0i64, -1, 1]), 1.0),
    ] {
        let g = guided(labels, w);
        assert!(matches!(
            g.check_input(&[3, 1]),
            Err(DdpmError::OutOfRange {
                key: "sample.class",
                ..
            })
        ));
        assert!(matches!(
            g.predict(&x, &t),
            Err(DdpmError::OutOfRange {
                key: "sample.class",
                ..
            })
        ));
    }
    for labels in [
        Tensor::from_slice(&[0i64, 1]),
        Tensor::from_slice(&[0.0f64, 1.0, 0.0]),
    ] {
        let g = guided(labels, 1.0);
        assert!(matches!(
            g.check_input(&[3, 1]),
            Err(DdpmError::ShapeMismatch {
                what: "class labels",
                ..
            })
        ));
        assert!(matches!(
            g.predict(&x, &t),
            Err(DdpmError::ShapeMismatch { .. })
        ));
    }
    for w in [-0.1, f64::NAN, f64::INFINITY] {
        let g = guided(Tensor::from_slice(&[0i64, 1, 2]), w);
        assert!(matches!(
            g.check_input(&[3, 1]),
            Err(DdpmError::OutOfRange {
                key: "sample.guidance",
                ..
            })
        ));
        assert!(matches!(
            g.predict(&x, &t),
            Err(DdpmError::OutOfRange {
                key: "sample.guidance",
                ..
            })
        ));
        assert!(combine(&x, &x, w).is_err());
    }
    assert!(combine(&x, &x.narrow(0, 0, 2), 1.0).is_err());
    // The sampler asks `check_input` first: a misfit batch never reaches the model.
    let sampler = Sampler::new(&s, SamplerConfig::default()).unwrap();
    assert!(sampler
        .sample(
            &guided(Tensor::from_slice(&[0i64, 1, 2]), 1.0),
            &[3, 2],
            Device::Cpu
        )
        .is_err());
    assert!(sampler
        .sample(
            &guided(Tensor::from_slice(&[0i64, 5, 2]), 0.0),
            &[3, 1],
            Device::Cpu
        )
        .is_err());
    // Laws: one label per component, labels in 0..classes, every class with weight.
    let mk = |labels: &[i64], classes: usize| {
        LabelledLaw::finite(
            &Tensor::from_slice(&[1.0, 0.0]),
            &Tensor::from_slice(&[0.0, 1.0]).view([2, 1]),
            &Tensor::from_slice(labels),
            classes,
        )
    };
    assert!(
        mk(&[0, 1], 2).is_err(),
        "class 1 has only a zero-weight point"
    );
    assert!(mk(&[0], 1).is_err());
    assert!(mk(&[0, 2], 2).is_err());
    assert!(mk(&[0, 0], 0).is_err());
    assert!(mk(&[0, 0], 1).is_ok());
}

fn sampler_configs(big_t: usize) -> Vec<(&'static str, SamplerConfig)> {
    let base = SamplerConfig {
        clip_final: false,
        seed: Some(77),
        ..SamplerConfig::default()
    };
    vec![
        (
            "ancestral, posterior σ",
            SamplerConfig {
                sigma: SigmaChoice::Posterior,
                ..base.clone()
            },
        ),
        (
            "ancestral, σ = β, final noise",
            SamplerConfig {
                sigma: SigmaChoice::Beta,
                final_noise: true,
                ..base.clone()
            },
        ),
        (
            "strided ancestral, 20 steps",
            SamplerConfig {
                steps: Some(20.min(big_t)),
                ..base.clone()
            },
        ),
        (
            "DDIM η = 0, 20 steps",
            SamplerConfig {
                steps: Some(20.min(big_t)),
                eta: Some(0.0),
                ..base.clone()
            },
        ),
        (
            "DDIM η = 0.5, all steps",
            SamplerConfig {
                eta: Some(0.5),
                ..base
            },
        ),
    ]
}

/// `Guided` with w = 0 is plain conditional sampling: the same samples, bit for bit, as the
/// sampler driven by `predict_class` with the labels, for every sampler kind. And with w > 0
/// the guided samples of labels ∅ (and of a one-class law, where y and ∅ are the same law) are
/// those of the unconditional oracle: combine(u, u, w) = u + w·0 = u exactly, given the same u
/// from both halves of the doubled batch; 1e-6 allows for the doubled batch's rounding.
fn guidance_zero_is_plain_conditional_sampling(device: Device) {
    single_thread();
    let _rng = rng_lock();
    let s = Schedule::new(ScheduleKind::Cosine, 100, device).unwrap();
    let l = Labelled {
        mix: Mixture {
            weights: vec![0.5, 0.3, 0.2],
            means: array![[-0.5, 0.0], [0.5, 0.25], [0.0, -0.75]],
            stds: vec![0.1, 0.05, 0.0],
        },
        classes: 3,
    };
    let oracle = LabelledOracle::new(l.tch(device), &s);
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 2, 1, 0, 3]).to_device(device);
    let shape = [8i64, 2];
    for (what, cfg) in sampler_configs(100) {
        let sampler = Sampler::new(&s, cfg).unwrap();
        let guided = Guided {
            model: &oracle,
            labels: labels.shallow_clone(),
            w: 0.0,
        };
        let a = sampler.sample(&guided, &shape, device).unwrap();
        let plain = |x: &Tensor, t: &Tensor| oracle.predict_class(x, t, &labels).unwrap();
        let b = sampler.sample(&plain, &shape, device).unwrap();
        assert_eq!(
            values(&a),
            values(&b),
            "{what}: w = 0 is not plain conditional sampling"
        );
        let none = Guided {
            model: &oracle,
            labels: Tensor::full([8], 3, (Kind::Int64, device)),
            w: 2.5,
        };
        let u = sampler.sample(&none, &shape, device).unwrap();
        let v = sampler
            .sample(
                &Oracle::new(l.tch(device).law().clone(), &s),
                &shape,
                device,
            )
            .unwrap();
        let diff = values(&(&u - &v).abs().max())[0];
        assert!(
            diff <= 1e-6,
            "{what}: guided ∅ differs from the unconditional oracle by {diff}"
        );
    }
    let one = Labelled {
        mix: l.mix.clone(),
        classes: 1,
    };
    let oracle1 = LabelledOracle::new(one.tch(device), &s);
    let sampler = Sampler::new(
        &s,
        SamplerConfig {
            seed: Some(5),
            ..SamplerConfig::default()
        },
    )
    .unwrap();
    let g = sampler
        .sample(
            &Guided {
                model: &oracle1,
                labels: Tensor::zeros([8], (Kind::Int64, device)),
                w: 4.0,
            },
            &shape,
            device,
        )
        .unwrap();
    let p = sampler
        .sample(
            &Oracle::new(one.tch(device).law().clone(), &s),
            &shape,
            device,
        )
        .unwrap();
    let diff = values(&(&g - &p).abs().max())[0];
    assert!(
        diff <= 1e-6,
        "one class: guided differs from unguided by {diff}"
    );
}
test_device!(
    guidance_zero_is_plain_conditional_sampling,
    guidance_zero_is_plain_conditional_sampling_cpu,
    guidance_zero_is_plain_conditional_sampling_cuda
);

// --- Oracle-driven conditional sampling --------------------------------------------------
//
// The law of tests/tests/oracle_sampling.rs (three 2-D components ≥ 9 stds apart) with labels
// [0, 1, 1]: class 0 is N(m_0, s_0² I), class 1 the mixture of components 1 and 2 with weights
// 0.6 and 0.4. One batch of N = 2000 (the first half labelled 0, the second 1) through `Guided`
// (w = 0) over the exact conditional oracle, T = 1000, article schedule, for two samplers
// (ancestral with the posterior σ, DDIM η = 0), all 1000 steps (where the sampler's own error
// is below the slacks, as measured there). Each sample is assigned to its nearest component by
// responsibility. Per run: class 0 — 2 means and 2 variances; class 1 — the 2 weights, 4 means,
// 4 variances: 14 tests, 28 in all, at family-wise α = 1e-3 (Bonferroni, each two-sided at
// 1e-3/28, z = 3.9). Means: |x̄ − m| ≤ z s/√n_k + 0.01 s; variances: |S²/s² − 1| ≤
// z √(2/(n_k − 1)) + 0.02; weights: binomial normal approximation. Samples of one class that
// land on another class's component: P < 1e-5 each at 9 stds, so ≥ 3 of 1000 has
// P < 2e-7 — the check allows 2.

const N: usize = 2000;
const FAMILY_ALPHA: f64 = 1e-3;
const TESTS: f64 = 28.0;

fn sampling_law() -> (Array1<f64>, Array2<f64>, Array1<f64>) {
    (
        array![0.5, 0.3, 0.2],
        array![[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]],
        array![0.3, 0.2, 0.25],
    )
}

fn nearest(x: &Array2<f64>) -> Vec<usize> {
    let (w, m, s) = sampling_law();
    x.rows()
        .into_iter()
        .map(|row| {
            (0..3)
                .map(|k| {
                    let d2: f64 = row.iter().zip(m.row(k)).map(|(a, b)| (a - b).powi(2)).sum();
                    (k, w[k].ln() - 2.0 * s[k].ln() - d2 / (2.0 * s[k] * s[k]))
                })
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap()
                .0
        })
        .collect()
}

/// Checks samples `x` of a class whose components are `comps` (weights renormalised).
fn check_class(what: &str, x: &Array2<f64>, comps: &[usize]) {
    let z = Normal::new(0.0, 1.0)
        .unwrap()
        .inverse_cdf(1.0 - FAMILY_ALPHA / TESTS / 2.0);
    let (w, m, s) = sampling_law();
    let assigned = nearest(x);
    let stray = assigned.iter().filter(|k| !comps.contains(k)).count();
    assert!(
        stray <= 2,
        "{what}: {stray} samples landed on another class's component"
    );
    let n = (x.nrows() - stray) as f64;
    let total: f64 = comps.iter().map(|&k| w[k]).sum();
    for &k in comps {
        let idx: Vec<usize> = (0..x.nrows()).filter(|&i| assigned[i] == k).collect();
        let nk = idx.len() as f64;
        let p = w[k] / total;
        if comps.len() > 1 {
            let bound = z * (n * p * (1.0 - p)).sqrt();
            assert!(
                (nk - n * p).abs() <= bound,
                "{what}: component {k} has {nk} of {n}, expected {:.0} ± {bound:.0} (z = {z:.2}, family α = {FAMILY_ALPHA})",
                n * p
            );
        }
        let xs = x.select(Axis(0), &idx);
        let (mean, var) = (xs.mean_axis(Axis(0)).unwrap(), xs.var_axis(Axis(0), 1.0));
        for c in 0..2 {
            let m_bound = z * s[k] / nk.sqrt() + 0.01 * s[k];
            let err = mean[c] - m[[k, c]];
            assert!(err.abs() <= m_bound, "{what}: component {k}, coordinate {c}: mean off by {err:.4}, bound {m_bound:.4} (n_k = {nk})");
            let ratio = var[c] / (s[k] * s[k]);
            let v_bound = z * (2.0 / (nk - 1.0)).sqrt() + 0.02;
            assert!((ratio - 1.0).abs() <= v_bound, "{what}: component {k}, coordinate {c}: variance ratio {ratio:.4}, bound 1 ± {v_bound:.4} (n_k = {nk})");
        }
    }
}

fn guided_oracle_sampling_reproduces_the_class(device: Device) {
    single_thread();
    let _rng = rng_lock();
    let (w, m, s) = sampling_law();
    let schedule = Schedule::new(ScheduleKind::Article, 1000, device).unwrap();
    let law = LabelledLaw::mixture(
        &Tensor::from_slice(w.as_slice().unwrap()).to_device(device),
        &tensor(&m, Kind::Double, device),
        &Tensor::from_slice(s.as_slice().unwrap()).to_device(device),
        &Tensor::from_slice(&[0i64, 1, 1]).to_device(device),
        2,
    )
    .unwrap();
    let oracle = LabelledOracle::new(law, &schedule);
    let half = (N / 2) as i64;
    let labels = Tensor::cat(
        &[
            Tensor::zeros([half], (Kind::Int64, device)),
            Tensor::ones([half], (Kind::Int64, device)),
        ],
        0,
    );
    let base = SamplerConfig {
        clip_final: false,
        seed: Some(2025),
        ..SamplerConfig::default()
    };
    let runs = [
        (
            "ancestral, posterior σ",
            SamplerConfig {
                sigma: SigmaChoice::Posterior,
                ..base.clone()
            },
        ),
        (
            "DDIM η = 0, all 1000 steps",
            SamplerConfig {
                eta: Some(0.0),
                ..base
            },
        ),
    ];
    for (what, cfg) in runs {
        let guided = Guided {
            model: &oracle,
            labels: labels.shallow_clone(),
            w: 0.0,
        };
        let x = array2(
            &Sampler::new(&schedule, cfg)
                .unwrap()
                .sample(&guided, &[N as i64, 2], device)
                .unwrap(),
        );
        assert!(
            x.iter().all(|v| v.is_finite()),
            "{what}: non-finite samples"
        );
        check_class(
            &format!("{what}, class 0"),
            &x.slice(s![..N / 2, ..]).to_owned(),
            &[0],
        );
        check_class(
            &format!("{what}, class 1"),
            &x.slice(s![N / 2.., ..]).to_owned(),
            &[1, 2],
        );
    }
}
test_device!(
    guided_oracle_sampling_reproduces_the_class,
    guided_oracle_sampling_reproduces_the_class_cpu,
    guided_oracle_sampling_reproduces_the_class_cuda
);

/// The class check can fail: exact draws of class 1 pass as class 1 and fail as class 0, and
/// draws of the whole law fail as class 1 (a third of them from component 0).
#[test]
fn the_class_check_rejects_the_wrong_class() {
    single_thread();
    let _rng = rng_lock();
    tch::manual_seed(13);
    let (w, m, s) = sampling_law();
    let law = LabelledLaw::mixture(
        &Tensor::from_slice(w.as_slice().unwrap()),
        &tensor(&m, Kind::Double, Device::Cpu),
        &Tensor::from_slice(s.as_slice().unwrap()),
        &Tensor::from_slice(&[0i64, 1, 1]),
        2,
    )
    .unwrap();
    let (x, y) = law.sample(4000, Kind::Double, Device::Cpu).unwrap();
    let x = array2(&x);
    let y: Vec<i64> = Vec::try_from(&y).unwrap();
    let ones: Vec<usize> = (0..y.len()).filter(|&i| y[i] == 1).take(N / 2).collect();
    let class1 = x.select(Axis(0), &ones);
    check_class("exact class-1 draws", &class1, &[1, 2]);
    assert!(std::panic::catch_unwind(|| check_class("class 1 as class 0", &class1, &[0])).is_err());
    let mixed = x.slice(s![..N / 2, ..]).to_owned();
    assert!(
        std::panic::catch_unwind(|| check_class("the whole law as class 1", &mixed, &[1, 2]))
            .is_err()
    );
    // The joint draws keep each component's label: every draw sits on a component of its class.
    let comp_class = [0i64, 1, 1];
    let stray = nearest(&x)
        .iter()
        .zip(&y)
        .filter(|(k, y)| comp_class[**k] != **y)
        .count();
    assert_eq!(stray, 0);
}
