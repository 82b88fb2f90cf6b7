//! The variational bound in bits/dim for several σ tables at once: the network's ε̂ does not
//! depend on σ_t, so one call per step serves every table (the same terms as
//! `bound::negative_elbo`, with ε drawn in the same order), and several t share one network
//! batch, which small image batches need to keep the CPU busy.

use crate::bound::{bits_per_dim, bound_term, prior_kl};
use crate::error::{DdpmError, Result};
use crate::marginal::marginal_sample;
use crate::sampler::NoisePredictor;
use crate::schedule::Schedule;
use tch::Tensor;

/// The negative ELBO L_T + Σ_{t≥2} L_{t−1} + L_0 of each σ table (length T+1) for a batch x_0
/// [B, …] on the 8-bit grid, in bits/dim per sample: one [B] tensor per table. The network
/// sees `t_per_call` consecutive t at once (a batch of `t_per_call`·B).
pub fn bits_per_dim_each<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &Schedule,
    sigmas: &[Tensor],
    x0: &Tensor,
    t_per_call: usize,
) -> Result<Vec<Tensor>> {
    model.check_input(&x0.size())?;
    if let Some(bad) = sigmas.iter().find(|s| s.size() != [schedule.t_max() + 1]) {
        return Err(DdpmError::ShapeMismatch {
            what: "sigmas",
            expected: format!("[T+1] = [{}] each", schedule.t_max() + 1),
            got: bad.size(),
        });
    }
    if t_per_call == 0 {
        return Err(DdpmError::OutOfRange {
            key: "t_per_call",
            value: "0".into(),
            expected: "at least 1".into(),
        });
    }
    let b = x0.size()[0];
    let device = x0.device();
    let dims: i64 = x0.size()[1..].iter().product();
    let steps: Vec<i64> = (1..=schedule.t_max()).collect();
    tch::no_grad(|| {
        let prior = prior_kl(schedule, x0)?;
        let mut totals: Vec<Tensor> = sigmas.iter().map(|_| prior.shallow_clone()).collect();
        for chunk in steps.chunks(t_per_call) {
            let c = chunk.len() as i64;
            let t = Tensor::from_slice(chunk)
                .to_device(device)
                .repeat_interleave_self_int(b, 0, None);
            let eps = Tensor::f_cat(
                &chunk.iter().map(|_| x0.randn_like()).collect::<Vec<_>>(),
                0,
            )?;
            let mut reps = vec![1i64; x0.dim()];
            reps[0] = c;
            let x0s = x0.repeat(reps.as_slice());
            let x_t = marginal_sample(schedule, &x0s, &t, &eps)?;
            let eps_hat = model.predict(&x_t, &t)?;
            for (total, sigma) in totals.iter_mut().zip(sigmas) {
                let terms = bound_term(schedule, sigma, &x0s, &t, &x_t, &eps_hat)?;
                *total = &*total + terms.view([c, b]).sum_dim_intlist(0, false, terms.kind());
            }
        }
        Ok(totals.iter().map(|nats| bits_per_dim(nats, dims)).collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bound::negative_elbo;
    use crate::sampler::rng_lock;
    use crate::schedule::ScheduleKind;
    use crate::sigma::SigmaChoice;
    use tch::{Device, Kind};

    #[test]
    fn each_table_matches_the_single_bound() {
        let _rng = rng_lock();
        let s = Schedule::new(ScheduleKind::Article, 50, Device::Cpu).unwrap();
        let model = |x: &Tensor, _t: &Tensor| x * 0.3;
        let levels = Tensor::randint(256, [3, 1, 4, 4], (Kind::Int64, Device::Cpu));
        let x0 = (levels.to_kind(Kind::Double) * (2.0 / 255.0) - 1.0).to_kind(Kind::Float);
        let tables: Vec<Tensor> = [
            SigmaChoice::Posterior,
            SigmaChoice::Beta,
            SigmaChoice::Isotropic { data_std: 0.5 },
        ]
        .iter()
        .map(|c| c.table(&s).unwrap())
        .collect();
        // 7 t per call leaves a shorter last chunk (50 = 7·7 + 1).
        tch::manual_seed(4);
        let both = bits_per_dim_each(&model, &s, &tables, &x0, 7).unwrap();
        for (table, got) in tables.iter().zip(&both) {
            tch::manual_seed(4);
            let one = negative_elbo(&model, &s, table, &x0, |_, _| {}).unwrap();
            let want = bits_per_dim(&one.total(), 16);
            // Same draws, same terms, summed in another order in f32: rounding only.
            let diff = f64::try_from((got - &want).abs().max()).unwrap();
            assert!(
                diff < 1e-5 * f64::try_from(want.abs().max()).unwrap(),
                "{diff}"
            );
        }
        let wrong = Tensor::zeros([50], (Kind::Double, Device::Cpu));
        assert!(matches!(
            bits_per_dim_each(&model, &s, &[wrong], &x0, 1),
            Err(DdpmError::ShapeMismatch { what: "sigmas", .. })
        ));
        assert!(matches!(
            bits_per_dim_each(&model, &s, &tables, &x0, 0),
            Err(DdpmError::OutOfRange {
                key: "t_per_call",
                ..
            })
        ));
    }
}
