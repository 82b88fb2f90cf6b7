//! Conditional generation with the real `ddpm` binary (issue 17, the product side): a folder
//! of class subfolders trained with `--conditional` (the classes are the subfolders' names),
//! the trainer's grid one row a class, `ddpm sample --class` (an index, a name, a list, `all`)
//! with `--guidance` on every sampler, the errors of a bad class, and unconditional runs as
//! they were (no class keys, no class weights, `--class` refused with a typed error).

mod common;

use common::*;
use ddpm::error::DdpmError;
use ddpm::generate::{self, SampleOptions};
use image::{GrayImage, Luma};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use tch::Device;

/// Pixels between grid cells at scale 1 (`ddpm::grid`'s gap).
const GAP: u32 = 2;

/// (width, height) of a grid of 8×8 cells in `cols` columns and `rows` rows at scale `s`.
fn grid(cols: u32, rows: u32, s: u32) -> (u32, u32) {
    (s * (cols * (8 + GAP) + GAP), s * (rows * (8 + GAP) + GAP))
}

fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (img.width(), img.height())
}

/// `classes` subfolders of `dir`, each with `per` seeded 8×8 grey images whose brightness
/// says their class (class k's pixels lie in 80k..80k + 60).
fn class_folders(dir: &Path, classes: &[&str], per: usize) {
    let mut rng = StdRng::seed_from_u64(3);
    for (k, class) in classes.iter().enumerate() {
        let sub = dir.join(class);
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..per {
            let img = GrayImage::from_fn(8, 8, |_, _| {
                Luma([(80 * k as u32 + rng.random_range(0..60)) as u8])
            });
            img.save(sub.join(format!("{i:02}.png"))).unwrap();
        }
    }
}

/// A scratch directory with the class folders `a`, `b`, `c` (4 images each) in `images/` and
/// the tiny config, conditional, in `tiny.toml`.
fn conditional_setup(steps: u64, every: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = scratch();
    let images = dir.path().join("images");
    class_folders(&images, &["a", "b", "c"], 4);
    let config = tiny_config_with(
        &dir.path().join("tiny.toml"),
        &images,
        steps,
        every,
        "conditional = true",
    );
    (dir, config)
}

fn train(config: &Path, run: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = ddpm();
    cmd.arg("train")
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(run)
        .args(extra);
    cmd
}

fn manifest(run: &Path, step: u64) -> serde_json::Value {
    let text = std::fs::read_to_string(checkpoint_dir(run, step).join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_tiny_conditional_run_records_its_classes_and_samples_each_class() {
    let (dir, config) = conditional_setup(6, 3);
    let run = dir.path().join("run");
    succeeds(&mut train(&config, &run, &[]));
    let m = manifest(&run, 6);
    assert_eq!(m["config"]["model"]["classes"], 3);
    assert_eq!(
        m["config"]["data"]["class_names"],
        serde_json::json!(["a", "b", "c"])
    );
    assert_eq!(
        m["data"]["fingerprint"]["classes"],
        serde_json::json!(["a", "b", "c"])
    );
    // K + 1 = 4 rows (the last one "no class") of the time embedding's width 4 · 8.
    assert_eq!(
        m["tensors"]["class.embedding.weight"],
        serde_json::json!([4, 32])
    );
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        saved.contains("conditional = true") && saved.contains("classes = 3"),
        "{saved}"
    );
    // The trainer's grid: one row a class, ceil(sample.n = 2 / 3) = 1 image each, scale 4.
    assert_eq!(
        png_size(&run.join("samples").join("step-0000006.png")),
        grid(1, 3, 4)
    );

    let out = |name: &str| dir.path().join(name);
    // One class by index and by name: the usual grid of --n images.
    succeeds(&mut sample(
        &run,
        &out("one.png"),
        &["--class", "1", "--n", "3", "--grid-scale", "1"],
    ));
    assert_eq!(png_size(&out("one.png")), grid(2, 2, 1));
    succeeds(&mut sample(
        &run,
        &out("b.png"),
        &["--class", "b", "--n", "3", "--grid-scale", "1"],
    ));
    assert_eq!(
        std::fs::read(out("b.png")).unwrap(),
        std::fs::read(out("one.png")).unwrap(),
        "class b is class 1"
    );
    // All classes: one row each, --n columns; a list likewise.
    succeeds(&mut sample(
        &run,
        &out("all.png"),
        &["--class", "all", "--n", "2", "--grid-scale", "1"],
    ));
    assert_eq!(png_size(&out("all.png")), grid(2, 3, 1));
    let each = out("each");
    succeeds(
        sample(
            &run,
            &out("list.png"),
            &["--class", "c,a", "--n", "2", "--grid-scale", "1", "--each"],
        )
        .arg(&each),
    );
    assert_eq!(png_size(&out("list.png")), grid(2, 2, 1));
    assert_eq!(std::fs::read_dir(&each).unwrap().count(), 4);
    // Guidance on each sampler: ancestral on all T, strided, DDIM; w changes the images.
    for (name, extra) in [
        ("g-full.png", vec![]),
        ("g-strided.png", vec!["--steps", "5"]),
        ("g-ddim.png", vec!["--steps", "5", "--eta", "0"]),
    ] {
        let mut args = vec!["--class", "all", "--n", "2", "--guidance", "2"];
        args.extend(extra);
        succeeds(&mut sample(&run, &out(name), &args));
        assert_eq!(png_size(&out(name)), grid(2, 3, 4), "{name}");
    }
    succeeds(&mut sample(
        &run,
        &out("g0.png"),
        &["--class", "all", "--n", "2"],
    ));
    assert_ne!(
        std::fs::read(out("g0.png")).unwrap(),
        std::fs::read(out("g-full.png")).unwrap(),
        "w = 2 draws other images than w = 0"
    );
    // Without --class a conditional model draws every class in turn, one column a class:
    // image i is class i mod 3, bitwise the images --class asks for one at a time (the same
    // seeded noise, batch for batch).
    succeeds(
        sample(
            &run,
            &out("turn.png"),
            &["--n", "6", "--grid-scale", "1", "--each"],
        )
        .arg(out("turn")),
    );
    assert_eq!(png_size(&out("turn.png")), grid(3, 2, 1));
    succeeds(
        sample(
            &run,
            &out("rows.png"),
            &["--class", "a,b,c,a,b,c", "--n", "1", "--each"],
        )
        .arg(out("rows")),
    );
    for i in 0..6 {
        let file = format!("{i:05}.png");
        assert_eq!(
            std::fs::read(out("turn").join(&file)).unwrap(),
            std::fs::read(out("rows").join(&file)).unwrap(),
            "image {i}"
        );
    }
    // `none` is the unconditional prediction, also under guidance.
    succeeds(&mut sample(
        &run,
        &out("none.png"),
        &["--class", "none", "--n", "2", "--guidance", "2"],
    ));

    // `ddpm guidance` measures mnist runs only (its classifier knows the digits).
    fails(
        ddpm()
            .args([
                "guidance",
                "--steps",
                "2",
                "--per-class",
                "2",
                "--checkpoint",
            ])
            .arg(&run),
        1,
        &["needs an mnist run"],
    );

    // Bad classes and guidance: clear errors naming the flag.
    fails(
        &mut sample(&run, &out("x.png"), &["--class", "3"]),
        1,
        &[
            "--class",
            "class \"3\" is not one of the model's 3 classes",
            "a, b, c",
        ],
    );
    fails(
        &mut sample(&run, &out("x.png"), &["--class", "a,dog"]),
        1,
        &["class \"dog\""],
    );
    fails(
        &mut sample(&run, &out("x.png"), &["--class", "0", "--guidance", "-1"]),
        1,
        &["sample.guidance (--guidance)"],
    );
    assert!(!out("x.png").exists());

    // The library's errors are typed.
    let opts = |classes: &str| SampleOptions {
        n: 1,
        classes: Some(classes.into()),
        ..SampleOptions::default()
    };
    let err = generate::run(
        &run,
        toml::Table::new(),
        "the test",
        &opts("7"),
        Device::Cpu,
        &mut ddpm::progress::Silent,
    )
    .unwrap_err();
    assert!(
        matches!(&err, DdpmError::UnknownClass { asked, names } if asked == "7" && names == &["a", "b", "c"]),
        "{err}"
    );
}

#[test]
fn a_resumed_conditional_run_ends_where_an_uninterrupted_one_does_and_holds_its_classes() {
    let (dir, config) = conditional_setup(6, 3);
    let whole = dir.path().join("whole");
    let part = dir.path().join("part");
    succeeds(&mut train(&config, &whole, &["--label-dropout", "0.3"]));
    succeeds(&mut train(
        &config,
        &part,
        &["--label-dropout", "0.3", "--steps", "3"],
    ));
    succeeds(&mut resume(&part, &["--steps", "6"]));
    assert_eq!(state_sums(&whole, 6), state_sums(&part, 6));
    assert_eq!(manifest(&part, 6)["config"]["train"]["label_dropout"], 0.3);
    // Another label dropout draws other labels: the same 6 steps end elsewhere.
    let other = dir.path().join("other");
    succeeds(&mut train(&config, &other, &[]));
    assert_ne!(state_sums(&whole, 6), state_sums(&other, 6));

    // A new class folder changes the data the run was trained on.
    class_folders(&dir.path().join("images"), &["a", "b", "c", "d"], 4);
    fails(
        &mut resume(&part, &["--steps", "9"]),
        1,
        &["does not hold the data the run was trained on", "classes"],
    );
}

#[test]
fn an_unconditional_run_is_as_before_and_refuses_a_class() {
    let setup = Setup::new(3, 3);
    let run = setup.path("run");
    succeeds(&mut setup.train(&run, &[]));
    let m = manifest(&run, 3);
    let text = serde_json::to_string(&m).unwrap();
    for key in [
        "classes",
        "class_names",
        "conditional",
        "label_dropout",
        "guidance",
    ] {
        assert!(
            !text.contains(key),
            "{key} in an unconditional manifest: {text}"
        );
    }
    assert!(m["tensors"]
        .as_object()
        .unwrap()
        .keys()
        .all(|k| !k.starts_with("class")));
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        !saved.contains("class") && !saved.contains("guidance"),
        "{saved}"
    );
    succeeds(&mut sample(&run, &setup.path("plain.png"), &["--n", "2"]));
    fails(
        &mut sample(&run, &setup.path("x.png"), &["--guidance", "1"]),
        1,
        &["--guidance", "has no classes", "sample.guidance"],
    );

    fails(
        &mut sample(&run, &setup.path("x.png"), &["--class", "0"]),
        1,
        &["--class", "has no classes", "model.classes = 0"],
    );
    let err = generate::run(
        &run,
        toml::Table::new(),
        "the test",
        &SampleOptions {
            n: 1,
            classes: Some("0".into()),
            ..SampleOptions::default()
        },
        Device::Cpu,
        &mut ddpm::progress::Silent,
    )
    .unwrap_err();
    assert!(matches!(err, DdpmError::NotConditional { .. }), "{err}");

    // --conditional needs class subfolders.
    fails(
        &mut setup.train(&setup.path("cond"), &["--conditional"]),
        1,
        &["has no classes", "subfolder"],
    );
    // A label dropout outside [0, 1] names its flag.
    let (dir, config) = conditional_setup(3, 3);
    fails(
        &mut train(&config, &dir.path().join("r"), &["--label-dropout", "1.5"]),
        1,
        &["train.label_dropout (--label-dropout)"],
    );
}
