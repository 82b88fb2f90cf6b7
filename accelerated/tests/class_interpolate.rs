//! `ddpm interpolate --classes A B` with the real binary (issue 18, item 4's last clause): a
//! tiny conditional run, one latent decoded from class A to class B; the row's dimensions, its
//! ends pixel for pixel `ddpm sample --class A` / `--class B` with the same seed and DDIM
//! (η = 0, same steps, no clipping), and the errors (an unconditional checkpoint, an unknown
//! class, --classes with two ends).

mod common;

use common::*;
use ddpm::error::DdpmError;
use ddpm::interpolate::{self, ClassInterpolateOptions, Endpoint};
use image::{GrayImage, Luma};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Device;

/// Pixels between grid cells at scale 1 (`ddpm::grid`'s gap) and the side of a cell.
const GAP: u32 = 2;
const SIDE: u32 = 8;

/// Class folders `a`, `b`, `c` of 4 seeded 8×8 grey images each, class k's pixels in
/// 80k..80k + 60 (as tests/conditional.rs).
fn class_folders(dir: &Path) {
    let mut rng = StdRng::seed_from_u64(3);
    for (k, class) in ["a", "b", "c"].iter().enumerate() {
        let sub = dir.join(class);
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..4 {
            let img = GrayImage::from_fn(SIDE, SIDE, |_, _| {
                Luma([(80 * k as u32 + rng.random_range(0..60)) as u8])
            });
            img.save(sub.join(format!("{i:02}.png"))).unwrap();
        }
    }
}

/// The cell `i` of a one-row grid at scale 1.
fn cell(grid: &GrayImage, i: u32) -> Vec<u8> {
    let x0 = GAP + i * (SIDE + GAP);
    let mut out = Vec::new();
    for y in GAP..GAP + SIDE {
        for x in x0..x0 + SIDE {
            out.push(grid.get_pixel(x, y)[0]);
        }
    }
    out
}

fn grey(path: &Path) -> GrayImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_luma8()
}

fn interpolate(run: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = ddpm();
    cmd.arg("interpolate")
        .arg("--checkpoint")
        .arg(run)
        .arg("--out")
        .arg(out)
        .args(["--steps", "5", "--grid-scale", "1"])
        .args(extra);
    cmd
}

/// The single image `ddpm sample --class <class> --n 1 --seed <seed>` draws with DDIM η = 0,
/// 5 steps, no clipping of x̂_0, and the guidance `w`.
fn sampled(run: &Path, dir: &Path, class: &str, seed: &str, w: &str) -> Vec<u8> {
    let each = dir.join(format!("each-{class}-{seed}-{w}"));
    succeeds(
        sample(
            run,
            &dir.join("s.png"),
            &[
                "--class",
                class,
                "--n",
                "1",
                "--seed",
                seed,
                "--steps",
                "5",
                "--eta",
                "0",
                "--clip-each-step",
                "false",
                "--guidance",
                w,
                "--each",
            ],
        )
        .arg(&each),
    );
    grey(&each.join("00000.png")).into_raw()
}

#[test]
fn interpolate_across_classes_ends_on_each_class_and_refuses_what_does_not_fit() {
    let dir = scratch();
    let images = dir.path().join("images");
    class_folders(&images);
    let config = tiny_config_with(
        &dir.path().join("tiny.toml"),
        &images,
        4,
        4,
        "conditional = true",
    );
    let run = dir.path().join("run");
    succeeds(
        ddpm()
            .arg("train")
            .arg("--config")
            .arg(&config)
            .arg("--out")
            .arg(&run),
    );
    let out = |name: &str| dir.path().join(name);

    for w in ["0", "1.5"] {
        let row = out(&format!("row-{w}.png"));
        succeeds(&mut interpolate(
            &run,
            &row,
            &[
                "--classes",
                "a",
                "2",
                "--seed",
                "7",
                "--frames",
                "4",
                "--guidance",
                w,
            ],
        ));
        let grid = grey(&row);
        // 4 cells of 8 pixels and 2-pixel gaps in one row, scale 1.
        assert_eq!(
            grid.dimensions(),
            (4 * (SIDE + GAP) + GAP, SIDE + 2 * GAP),
            "w = {w}"
        );
        let a = sampled(&run, dir.path(), "a", "7", w);
        let c = sampled(&run, dir.path(), "c", "7", w);
        assert_eq!(cell(&grid, 0), a, "w = {w}: frame 0 is class a");
        assert_eq!(cell(&grid, 3), c, "w = {w}: the last frame is class c");
        // The test can fail: the classes differ, and the middle is neither.
        assert_ne!(a, c, "w = {w}");
        assert!(
            (1..3).all(|i| cell(&grid, i) != a && cell(&grid, i) != c),
            "w = {w}"
        );
    }
    // Another seed is another latent: another first frame.
    let other = out("other.png");
    succeeds(&mut interpolate(
        &run,
        &other,
        &["--classes", "0", "1", "--seed", "8", "--frames", "2"],
    ));
    assert_eq!(
        cell(&grey(&other), 0),
        sampled(&run, dir.path(), "a", "8", "0")
    );
    // The latent of a file: its first latent, as `ddpm sample --latents` decodes it with the
    // classes' predictions; same dimensions.
    let z = out("z.safetensors");
    succeeds(
        ddpm()
            .args(["invert", "--steps", "5", "--checkpoint"])
            .arg(&run)
            .arg("--out")
            .arg(&z)
            .arg("--images")
            .arg(images.join("a").join("00.png")),
    );
    let from_file = out("file.png");
    succeeds(&mut interpolate(
        &run,
        &from_file,
        &[
            "--classes",
            "b",
            "c",
            "--latents",
            z.to_str().unwrap(),
            "--frames",
            "3",
        ],
    ));
    assert_eq!(
        grey(&from_file).dimensions(),
        (3 * (SIDE + GAP) + GAP, SIDE + 2 * GAP)
    );

    // Errors, each before anything is written.
    let x = out("x.png");
    let zs = z.to_str().unwrap();
    for (extra, needles) in [
        (
            vec!["--classes", "a", "dog", "--seed", "1"],
            vec![
                "--classes",
                "class \"dog\" is not one of the model's 3 classes",
                "a, b, c",
            ],
        ),
        (
            vec!["--classes", "a", "b", "--seeds", "1", "2"],
            vec![
                "--classes",
                "--seed S or --latents FILE",
                "not --seeds or --images",
            ],
        ),
        (
            vec!["--classes", "a", "b", "--images", zs, zs],
            vec!["--classes", "not --seeds or --images"],
        ),
        (
            vec!["--classes", "a", "b"],
            vec!["--classes needs its one latent"],
        ),
        (
            vec!["--classes", "a", "b", "--latents", zs, zs],
            vec!["--classes takes one latents file"],
        ),
        (
            vec!["--classes", "a", "b", "--seed", "1", "--frames", "1"],
            vec!["frames (--frames) = 1 is out of range"],
        ),
        (
            vec!["--classes", "a", "b", "--seed", "1", "--guidance", "-1"],
            vec!["sample.guidance (--guidance)"],
        ),
        (
            vec!["--classes", "a,b", "c", "--seed", "1"],
            vec!["classes (--classes)", "one class each"],
        ),
        (vec!["--seed", "1"], vec!["--seed", "--seeds A B"]),
        (
            vec!["--seeds", "1", "2", "--guidance", "1"],
            vec!["--guidance", "--classes"],
        ),
        (vec!["--latents", zs], vec!["two latents files"]),
    ] {
        fails(&mut interpolate(&run, &x, &extra), 1, &needles);
    }
    assert!(!x.exists());

    // An unconditional checkpoint has no classes: a typed error, the flag named.
    let setup = Setup::new(2, 2);
    let plain = setup.path("plain");
    succeeds(&mut setup.train(&plain, &[]));
    fails(
        &mut interpolate(&plain, &x, &["--classes", "0", "1", "--seed", "1"]),
        1,
        &["--classes", "has no classes", "model.classes = 0"],
    );
    let opts = |checkpoint: &PathBuf, b: &str| {
        interpolate::run_classes(
            checkpoint,
            toml::Table::new(),
            "the test",
            &ClassInterpolateOptions {
                latent: Endpoint::Seed(1),
                classes: ["0".into(), b.into()],
                frames: 2,
                steps: 2,
                weights: ddpm::checkpoint::Weights::Ema,
                out: x.clone(),
            },
            Device::Cpu,
            &mut ddpm::progress::Silent,
        )
        .unwrap_err()
    };
    let err = opts(&plain, "1");
    assert!(matches!(err, DdpmError::NotConditional { .. }), "{err}");
    let err = opts(&run, "7");
    assert!(
        matches!(&err, DdpmError::UnknownClass { asked, names } if asked == "7" && names == &["a", "b", "c"]),
        "{err}"
    );
    assert!(!x.exists());
}
