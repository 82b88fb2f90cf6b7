//! `ddpm score`, the real binary: a tiny mnist run end to end (a CSV of 40 random "digits",
//! a 28×28 8·[1, 2] U-Net, T = 20, 2 steps), and runs it must refuse.

mod common;

use common::{ddpm, fails, scratch, succeeds, Setup};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A CSV in MNIST's layout (784 pixels, then the label) of `n` seeded random images labelled
/// 0..9 in turn.
fn random_digits(path: &Path, n: usize) {
    let mut rng = StdRng::seed_from_u64(3);
    let mut text = String::new();
    for i in 0..n {
        for _ in 0..784 {
            write!(text, "{},", rng.random::<u8>()).unwrap();
        }
        writeln!(text, "{}", i % 10).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

/// A tiny mnist run of 2 steps, trained in `dir` with `ddpm train` flags `extra`; returns the
/// run directory.
fn tiny_mnist_run(dir: &Path, extra: &[&str]) -> PathBuf {
    let csv = dir.join("digits.csv");
    random_digits(&csv, 40);
    let config = dir.join("tiny-mnist.toml");
    std::fs::write(
        &config,
        format!(
            r#"preset = "mnist"
[data]
path = {csv:?}
holdout = 12
[model]
base_channels = 8
channel_mults = [1, 2]
groups = 4
t_max = 20
[diffusion]
t_max = 20
[sample]
n = 2
[train]
steps = 2
batch_size = 4
warmup_steps = 1
lr_decay = []
checkpoint_every = 2
sample_every = 0
grid_steps = 4
"#
        ),
    )
    .unwrap();
    let run = dir.join("run");
    let mut cmd = ddpm();
    cmd.arg("train")
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&run)
        .args(extra);
    succeeds(&mut cmd);
    run
}

fn score(run: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = ddpm();
    cmd.arg("score")
        .arg("--checkpoint")
        .arg(run)
        .args([
            "--samples",
            "6",
            "--steps",
            "5",
            "--batch",
            "4",
            "--bootstrap",
            "10",
            "--grid",
            "4",
        ])
        .args(extra);
    cmd
}

/// Samples, scores, writes score.json and the grid in run/score and caches the classifier in
/// run/quality (where `ddpm quality` looks); a second run loads it and gives the same numbers.
#[test]
fn a_tiny_mnist_run_is_scored_end_to_end() {
    let dir = scratch();
    let run = tiny_mnist_run(dir.path(), &[]);
    let out = score(&run, &[]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FD-MNIST")
            && stdout.contains("confident")
            && stdout.contains("6 samples at 5 steps from step 2"),
        "{stdout}"
    );
    assert!(run.join("score/grid.png").is_file());
    assert!(run.join("quality/classifier.safetensors").is_file());
    let read = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(run.join("score/score.json")).unwrap())
            .unwrap()
    };
    let first = read();
    assert_eq!(first["step"], 2);
    assert_eq!(first["sampler"]["steps"], 5);
    assert_eq!(first["threshold"], 0.9);
    assert_eq!(first["generated"]["images"], 6);
    assert_eq!(first["floor"]["split"], "train");
    assert_eq!(first["floor"]["images"], 6);
    assert_eq!(first["ceiling"]["split"], "heldout");
    assert_eq!(first["ceiling"]["images"], 12);
    assert!(first["ceiling"]["fd"].is_null());
    for set in ["generated", "floor", "ceiling"] {
        let share = first[set]["confident_share"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&share), "{set}: {share}");
        // A share of N images is a multiple of 1/N.
        let n = first[set]["images"].as_f64().unwrap();
        assert!(
            ((share * n) - (share * n).round()).abs() < 1e-9,
            "{set}: {share}"
        );
    }
    let fd = first["generated"]["fd"].as_f64().unwrap();
    let ci = &first["generated"]["fd_ci"];
    assert!(fd > 0.0 && ci["lo"].as_f64().unwrap() <= ci["hi"].as_f64().unwrap());
    succeeds(&mut score(&run, &[]));
    let second = read();
    for set in ["generated", "floor", "ceiling"] {
        assert_eq!(first[set], second[set], "{set}");
    }
    assert_eq!(first["classifier"], second["classifier"]);
    assert!(first["guidance"].is_null(), "an unconditional run has no w");
    // A guidance weight asks an unconditional run for classes it does not have.
    fails(
        &mut score(&run, &["--guidance", "1"]),
        1,
        &["--guidance", "has no classes", "model.classes = 0"],
    );
}

/// A conditional run (the main job's kind) is scored with every class in turn under its own
/// guidance weight or --guidance's, and the quality table, which measures unconditional
/// sampling, refuses it.
#[test]
fn a_conditional_mnist_run_is_scored_with_its_guidance() {
    let dir = scratch();
    let run = tiny_mnist_run(dir.path(), &["--conditional"]);
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(name).join("score.json")).unwrap(),
        )
        .unwrap()
    };
    let mut outputs = Vec::new();
    for (name, w) in [("w0", "0"), ("w2", "2")] {
        let out = score(&run, &["--guidance", w, "--out"])
            .arg(dir.path().join(name))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            stdout.contains(&format!(
                "6 samples (every class in turn, w = {w}) at 5 steps"
            )),
            "{stdout}"
        );
        let report = read(name);
        assert_eq!(report["guidance"].as_f64(), Some(w.parse().unwrap()));
        outputs.push(report["generated"].clone());
    }
    assert_ne!(
        outputs[0], outputs[1],
        "w changes the samples and their scores"
    );
    fails(
        &mut score(&run, &["--guidance", "-1"]),
        1,
        &["--guidance", "sample.guidance"],
    );
    let mut quality = ddpm();
    quality.args(["quality", "--checkpoint"]).arg(&run);
    fails(
        &mut quality,
        1,
        &["model.classes", "is a conditional run", "ddpm score"],
    );
}

/// A run trained on a folder of images has no labels for the classifier: refused, naming
/// data.source; bad settings name their flag.
#[test]
fn runs_and_settings_that_cannot_be_scored() {
    let setup = Setup::new(2, 2);
    let run = setup.path("run");
    succeeds(&mut setup.train(&run, &[]));
    fails(
        &mut score(&run, &[]),
        1,
        &[
            "data.source",
            "was trained on a folder of images",
            "ddpm score needs an mnist run",
        ],
    );
    let mut one_sample = ddpm();
    one_sample
        .args(["score", "--samples", "1", "--checkpoint"])
        .arg(&run);
    fails(
        &mut one_sample,
        1,
        &["--samples", "samples = 1 is out of range"],
    );
    fails(
        &mut score(&run, &["--threshold", "1.5"]),
        1,
        &["--threshold", "threshold = 1.5"],
    );
    fails(
        &mut score(&setup.path("images"), &[]),
        1,
        &["holds no checkpoint"],
    );
}
