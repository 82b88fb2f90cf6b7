//! Training batches, prepared ahead on a background thread so the device never waits for
//! them. Everything random in a step (its samples, t, ε, flips) is a pure function of the
//! seed and the step number, so a resumed run sees exactly what an uninterrupted one would.

use super::{seeded_rng, Dataset, Stream};
use crate::error::{DdpmError, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::StandardNormal;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;
use tch::{Device, Tensor};

/// How batches are drawn: epochs are seeded permutations of the training set (the last
/// partial batch of an epoch is dropped), t ~ U{1..T}, ε ~ N(0, I), optional flips.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchPlan {
    /// Samples per batch B.
    pub batch_size: usize,
    /// The run's seed.
    pub seed: u64,
    /// Number of diffusion steps T.
    pub t_max: i64,
    /// Flip each image horizontally with probability ½ (images only).
    pub flip: bool,
    /// Labelled data (conditional runs): the probability that a sample's label is replaced by
    /// ∅ (the value K, the number of classes); unused for unlabelled data.
    pub label_dropout: f64,
}

/// One training step's inputs, on the CPU.
#[derive(Debug)]
pub struct Batch {
    /// The 1-based step this batch belongs to.
    pub step: u64,
    /// Clean samples x_0 in model space, f32 `[B, ...]`.
    pub x0: Tensor,
    /// Time steps, Int64 `[B]`, each in 1..=T.
    pub t: Tensor,
    /// Noise ε ~ N(0, I), f32, same shape as `x0`.
    pub eps: Tensor,
    /// Seed for libtorch's own generator during this step (dropout), so that it too is a
    /// function of (seed, step).
    pub torch_seed: i64,
    /// Labelled data (conditional runs): each sample's class, Int64 `[B]`, the value K (the
    /// number of classes) where the label was dropped to ∅; `None` for unlabelled data.
    pub y: Option<Tensor>,
}

impl BatchPlan {
    fn validate(&self, n: usize) -> Result<()> {
        if self.batch_size == 0 || self.batch_size > n {
            return Err(DdpmError::OutOfRange {
                key: "train.batch_size",
                value: self.batch_size.to_string(),
                expected: format!("between 1 and the number of training samples ({n})"),
            });
        }
        if !(0.0..=1.0).contains(&self.label_dropout) {
            return Err(DdpmError::OutOfRange {
                key: "train.label_dropout",
                value: self.label_dropout.to_string(),
                expected: "a probability in [0, 1]".into(),
            });
        }
        if self.t_max < 1 {
            return Err(DdpmError::OutOfRange {
                key: "diffusion.t_max",
                value: self.t_max.to_string(),
                expected: "at least 1".into(),
            });
        }
        Ok(())
    }

    /// Full batches per epoch over `n` samples.
    pub fn steps_per_epoch(&self, n: usize) -> u64 {
        (n / self.batch_size.max(1)) as u64
    }

    /// (epoch, batch within the epoch) that 1-based step `step` reads, both 0-based.
    pub fn position(&self, n: usize, step: u64) -> (u64, u64) {
        let per = self.steps_per_epoch(n).max(1);
        let i = step.saturating_sub(1);
        (i / per, i % per)
    }

    /// The order of the `n` samples in `epoch`.
    pub fn order(&self, n: usize, epoch: u64) -> Vec<i64> {
        let mut order: Vec<i64> = (0..n as i64).collect();
        order.shuffle(&mut seeded_rng(self.seed, Stream::Epoch, epoch));
        order
    }

    /// The batch of 1-based `step`, given that epoch's `order` (see [`BatchPlan::order`]).
    pub fn batch_with_order(&self, data: &Dataset, order: &[i64], step: u64) -> Result<Batch> {
        self.validate(data.len())?;
        let (_, k) = self.position(data.len(), step);
        let start = k as usize * self.batch_size;
        let indices = &order[start..start + self.batch_size];
        let mut x0 = data.batch(indices)?;
        let mut rng = seeded_rng(self.seed, Stream::Step, step);
        let b = self.batch_size as i64;
        let t: Vec<i64> = (0..b).map(|_| rng.random_range(1..=self.t_max)).collect();
        let eps: Vec<f32> = (&mut rng)
            .sample_iter(StandardNormal)
            .take(x0.numel())
            .collect();
        if self.flip && x0.dim() == 4 {
            let flips: Vec<bool> = (0..b).map(|_| rng.random_bool(0.5)).collect();
            let mask = Tensor::from_slice(&flips).view([b, 1, 1, 1]);
            x0 = x0.f_flip([3])?.f_where_self(&mask, &x0)?;
        }
        let torch_seed = rng.random_range(0..i64::MAX);
        // Drawn after everything else, so an unlabelled run's draws are what they always were.
        let y = match (data.labels_at(indices)?, data.class_names()) {
            (Some(y), Some(names)) => {
                let dropped: Vec<bool> = (0..b)
                    .map(|_| rng.random_bool(self.label_dropout))
                    .collect();
                let none = Tensor::f_full(
                    [b],
                    names.len() as i64,
                    (tch::Kind::Int64, tch::Device::Cpu),
                )?;
                Some(none.f_where_self(&Tensor::from_slice(&dropped), &y)?)
            }
            _ => None,
        };
        Ok(Batch {
            step,
            torch_seed,
            y,
            eps: Tensor::from_slice(&eps).f_view(x0.size().as_slice())?,
            t: Tensor::from_slice(&t),
            x0,
        })
    }

    /// The batch of 1-based `step`, computing its epoch's order.
    pub fn batch(&self, data: &Dataset, step: u64) -> Result<Batch> {
        self.validate(data.len())?;
        let (epoch, _) = self.position(data.len(), step);
        self.batch_with_order(data, &self.order(data.len(), epoch), step)
    }
}

/// Background producer of the batches for steps `first, first + 1, …`, at most `prefetch`
/// ahead. Dropping it stops the thread.
#[derive(Debug)]
pub struct Loader {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
}

impl Batch {
    /// This batch in page-locked ("pinned") host memory, from which a copy to `device` can run
    /// asynchronously (`non_blocking`) while the host goes on; on the CPU, itself.
    pub fn pinned_for(self, device: Device) -> Result<Batch> {
        if !device.is_cuda() {
            return Ok(self);
        }
        // Through ddpm-cuda: tch's own pin_memory(device) warns at every call in libtorch 2.11.
        let pin = |t: &Tensor| ddpm_cuda::pin_memory(t).map_err(DdpmError::from);
        Ok(Batch {
            x0: pin(&self.x0)?,
            t: pin(&self.t)?,
            eps: pin(&self.eps)?,
            y: self.y.as_ref().map(pin).transpose()?,
            ..self
        })
    }
}

impl Loader {
    /// Starts the producer thread for `data` from 1-based step `first`; the batches are for
    /// `device` (pinned host memory on CUDA, [`Batch::pinned_for`]).
    pub fn spawn(
        data: Dataset,
        plan: BatchPlan,
        first: u64,
        prefetch: usize,
        device: Device,
    ) -> Result<Loader> {
        plan.validate(data.len())?;
        let (tx, rx) = sync_channel(prefetch.max(1));
        let handle = std::thread::Builder::new()
            .name("ddpm-loader".into())
            .spawn(move || {
                let n = data.len();
                let (mut epoch, mut order) = (u64::MAX, Vec::new());
                for step in first.max(1).. {
                    let (now, _) = plan.position(n, step);
                    if now != epoch {
                        (epoch, order) = (now, plan.order(n, now));
                    }
                    let batch = plan
                        .batch_with_order(&data, &order, step)
                        .and_then(|b| b.pinned_for(device));
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| DdpmError::io("cannot start the data loader thread", e))?;
        Ok(Loader {
            rx: Some(rx),
            handle: Some(handle),
        })
    }

    /// The next batch, waiting for it if the thread is behind.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let rx = self.rx.as_ref().ok_or_else(|| DdpmError::BadData {
            set: "the data loader".into(),
            reason: "was stopped".into(),
        })?;
        rx.recv().map_err(|_| DdpmError::BadData {
            set: "the data loader".into(),
            reason: "its thread stopped unexpectedly".into(),
        })?
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel first makes a producer blocked on a full queue return.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn images(n: i64) -> Dataset {
        let px = Tensor::arange(n * 4, (Kind::Int64, Device::Cpu))
            .remainder(256)
            .to_kind(Kind::Uint8)
            .view([n, 1, 2, 2]);
        Dataset::from_pixels(px, "toy").unwrap()
    }

    fn same(a: &Batch, b: &Batch) -> bool {
        a.step == b.step
            && a.torch_seed == b.torch_seed
            && a.x0.equal(&b.x0)
            && a.t.equal(&b.t)
            && a.eps.equal(&b.eps)
            && match (&a.y, &b.y) {
                (None, None) => true,
                (Some(x), Some(y)) => x.equal(y),
                _ => false,
            }
    }

    /// n images whose first pixel is their class (i mod 3), labelled so.
    fn labelled(n: i64) -> Dataset {
        let labels: Vec<i64> = (0..n).map(|i| i % 3).collect();
        let px = Tensor::from_slice(&labels)
            .to_kind(Kind::Uint8)
            .view([n, 1, 1, 1])
            .repeat([1, 1, 2, 2]);
        Dataset::from_pixels(px, "labelled")
            .unwrap()
            .with_labels(&labels, vec!["a".into(), "b".into(), "c".into()])
            .unwrap()
    }

    /// The class each image carries in its pixels: its first pixel value k (x = 2k/255 − 1).
    fn classes_of(x0: &Tensor) -> Vec<i64> {
        pixels_of(&x0.select(3, 0).select(2, 0).select(1, 0))
    }

    /// The 8-bit pixel values k of model-space images x = 2k/255 − 1, unclipped, so that a
    /// value out of range shows as one.
    fn pixels_of(x: &Tensor) -> Vec<i64> {
        let x = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
        x.iter()
            .map(|v| ((v + 1.0) * 255.0 / 2.0).round() as i64)
            .collect()
    }

    /// T = 1 is a diffusion (every t is 1); T = 0 is refused under its key.
    #[test]
    fn a_plan_takes_t_max_1_and_refuses_0() {
        let mut plan = BatchPlan {
            batch_size: 4,
            seed: 1,
            t_max: 1,
            flip: false,
            label_dropout: 0.0,
        };
        let b = plan.batch(&images(4), 1).unwrap();
        assert_eq!(Vec::<i64>::try_from(&b.t).unwrap(), [1, 1, 1, 1]);
        plan.t_max = 0;
        assert!(matches!(
            plan.batch(&images(4), 1),
            Err(DdpmError::OutOfRange {
                key: "diffusion.t_max",
                ..
            })
        ));
    }

    /// With `flip`, each image is itself or its mirror image, a fair seeded coin each: of 40
    /// images, 5 to 35 mirrored (Binomial(40, ½): mean 20, σ ≈ 3.2, so 4.7σ either side,
    /// α ≈ 3e-6). Values that are not images (`[N, d]`) are never flipped.
    #[test]
    fn flip_mirrors_a_seeded_half_of_the_images_and_leaves_values_alone() {
        let n = 40i64;
        // One row of two pixels, (2i, 2i + 1): its mirror is (2i + 1, 2i).
        let px = Tensor::arange(2 * n, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Uint8)
            .view([n, 1, 1, 2]);
        let data = Dataset::from_pixels(px, "pairs").unwrap();
        let plan = BatchPlan {
            batch_size: 40,
            seed: 9,
            t_max: 10,
            flip: true,
            label_dropout: 0.0,
        };
        let b = plan.batch(&data, 1).unwrap();
        let order = plan.order(data.len(), 0);
        let mut mirrored = 0;
        for (i, pair) in pixels_of(&b.x0).chunks(2).enumerate() {
            let (l, r) = (pair[0], pair[1]);
            let k = order[i];
            if (l, r) == (2 * k + 1, 2 * k) {
                mirrored += 1;
            } else {
                assert_eq!((l, r), (2 * k, 2 * k + 1), "image {k}");
            }
        }
        assert!((5..=35).contains(&mirrored), "{mirrored} of 40 mirrored");
        let values = Tensor::arange(3 * n, (Kind::Float, Device::Cpu)).view([n, 3]);
        let data = Dataset::from_values(values.shallow_clone(), "values").unwrap();
        let b = plan.batch(&data, 1).unwrap();
        let rows = Tensor::from_slice(&plan.order(data.len(), 0));
        assert!(b.x0.equal(&values.index_select(0, &rows)));
    }

    /// Label dropout is a seeded Bernoulli(p) per sample: over n = 250 steps × 40 samples =
    /// 10,000 labels at p = 0.1 the dropped count is Binomial(10⁴, 0.1), mean 1000, standard
    /// deviation 30; |share − 0.1| < 0.015 is 5 standard deviations (α < 1e-6, two-sided).
    /// Every label kept is the image's own class; p = 0 drops none and p = 1 all.
    #[test]
    fn labels_follow_their_images_and_drop_to_none_at_the_seeded_rate() {
        let data = labelled(40);
        let plan = BatchPlan {
            batch_size: 40,
            seed: 3,
            t_max: 10,
            flip: false,
            label_dropout: 0.1,
        };
        let (mut dropped, mut total) = (0usize, 0usize);
        for step in 1..=250 {
            let b = plan.batch(&data, step).unwrap();
            let y = Vec::<i64>::try_from(b.y.as_ref().unwrap()).unwrap();
            for (label, class) in y.iter().zip(classes_of(&b.x0)) {
                total += 1;
                if *label == 3 {
                    dropped += 1;
                } else {
                    assert_eq!(*label, class, "step {step}");
                }
            }
        }
        let share = dropped as f64 / total as f64;
        assert_eq!(total, 10_000);
        assert!((share - 0.1).abs() < 0.015, "dropped {dropped} of {total}");
        for (p, expected) in [(0.0, 0usize), (1.0, 40)] {
            let b = BatchPlan {
                label_dropout: p,
                ..plan
            }
            .batch(&data, 1)
            .unwrap();
            let y = Vec::<i64>::try_from(b.y.unwrap()).unwrap();
            assert_eq!(y.iter().filter(|&&l| l == 3).count(), expected, "p = {p}");
        }
        assert!(BatchPlan {
            label_dropout: 1.5,
            ..plan
        }
        .batch(&data, 1)
        .is_err());
        // Unlabelled data have no labels, and their draws do not depend on the dropout.
        let plain = plan.batch(&images(40), 7).unwrap();
        assert!(plain.y.is_none());
        let other = BatchPlan {
            label_dropout: 0.5,
            ..plan
        }
        .batch(&images(40), 7)
        .unwrap();
        assert!(same(&plain, &other));
    }

    /// The labels (and their dropout) are part of the seeded plan: the loader thread, started
    /// at step 1 or resumed at step 6, yields the pure function's labels, and the held-out split
    /// keeps each sample's label.
    #[test]
    fn the_plan_s_labels_are_the_same_after_a_resume_and_a_split() {
        let (train, held) = labelled(30).split(6, 2).unwrap();
        let held = held.unwrap();
        let all: Vec<i64> = (0..6).collect();
        let held_classes = classes_of(&held.batch(&all).unwrap());
        assert_eq!(
            Vec::<i64>::try_from(held.labels_at(&all).unwrap().unwrap()).unwrap(),
            held_classes
        );
        let plan = BatchPlan {
            batch_size: 4,
            seed: 8,
            t_max: 50,
            flip: true,
            label_dropout: 0.3,
        };
        let mut from_one = Loader::spawn(train.clone(), plan, 1, 2, Device::Cpu).unwrap();
        let all: Vec<Batch> = (0..12).map(|_| from_one.next_batch().unwrap()).collect();
        assert!(all.iter().all(|b| b.y.is_some()));
        for (i, b) in all.iter().enumerate() {
            assert!(
                same(b, &plan.batch(&train, i as u64 + 1).unwrap()),
                "step {}",
                i + 1
            );
        }
        let mut resumed = Loader::spawn(train.clone(), plan, 6, 2, Device::Cpu).unwrap();
        for b in &all[5..] {
            assert!(same(&resumed.next_batch().unwrap(), b), "step {}", b.step);
        }
        let dropped: usize = all
            .iter()
            .map(|b| {
                Vec::<i64>::try_from(b.y.as_ref().unwrap())
                    .unwrap()
                    .iter()
                    .filter(|&&l| l == 3)
                    .count()
            })
            .sum();
        assert!(
            dropped > 0 && dropped < 48,
            "{dropped} of 48 dropped at p = 0.3"
        );
    }

    #[test]
    fn the_thread_yields_the_same_batches_as_the_pure_function_from_any_start() {
        let data = images(10);
        let plan = BatchPlan {
            batch_size: 3,
            seed: 5,
            t_max: 1000,
            flip: true,
            label_dropout: 0.1,
        };
        let mut from_one = Loader::spawn(data.clone(), plan, 1, 2, Device::Cpu).unwrap();
        let all: Vec<Batch> = (0..8).map(|_| from_one.next_batch().unwrap()).collect();
        for (i, b) in all.iter().enumerate() {
            assert!(
                same(b, &plan.batch(&data, i as u64 + 1).unwrap()),
                "step {}",
                i + 1
            );
        }
        let mut resumed = Loader::spawn(data.clone(), plan, 5, 2, Device::Cpu).unwrap();
        for b in &all[4..] {
            assert!(same(&resumed.next_batch().unwrap(), b), "step {}", b.step);
        }
    }

    #[test]
    fn epochs_cover_each_sample_once_and_t_stays_in_range() {
        let data = images(9);
        let plan = BatchPlan {
            batch_size: 3,
            seed: 1,
            t_max: 4,
            flip: false,
            label_dropout: 0.1,
        };
        let mut seen: Vec<f32> = (1..=3)
            .flat_map(|s| {
                Vec::<f32>::try_from(
                    plan.batch(&data, s)
                        .unwrap()
                        .x0
                        .select(3, 0)
                        .select(2, 0)
                        .select(1, 0),
                )
                .unwrap()
            })
            .collect();
        seen.sort_by(f32::total_cmp);
        let all: Vec<i64> = (0..9).collect();
        let mut expected = Vec::<f32>::try_from(
            data.batch(&all)
                .unwrap()
                .select(3, 0)
                .select(2, 0)
                .select(1, 0),
        )
        .unwrap();
        expected.sort_by(f32::total_cmp);
        assert_eq!(seen, expected);
        let mut t: Vec<i64> = (1..=30)
            .flat_map(|s| Vec::<i64>::try_from(plan.batch(&data, s).unwrap().t).unwrap())
            .collect();
        t.sort_unstable();
        t.dedup();
        // 90 draws from U{1..4} miss a value with probability 4·(3/4)^90 < 1e-10.
        assert_eq!(t, vec![1, 2, 3, 4]);
        assert_ne!(plan.order(9, 0), plan.order(9, 1));
        assert!(BatchPlan {
            batch_size: 10,
            ..plan
        }
        .batch(&data, 1)
        .is_err());
    }
}
