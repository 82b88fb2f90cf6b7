//! Issue 14, item 6 — no input may panic: sizes the real `ddpm` binary is asked for. Sampling
//! goes in batches and streams to `--each` (memory bounded by a batch, whatever `--n`); a grid
//! of more images than it holds, a batch, a network or a training run that cannot fit in memory
//! are refused up front with an estimate and the setting to lower (exit status 1, no libtorch
//! trace, nothing written); empty requests get a clear error. Tabulated in docs/reliability.md.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A tiny finished run of 4 steps (one checkpoint) in `setup`.
fn trained(setup: &Setup) -> PathBuf {
    let run = setup.path("run");
    succeeds(&mut setup.train(&run, &["--steps", "4"]));
    run
}

/// `ddpm sample --checkpoint <run>` plus `args` (no `--out`).
fn sample_with(run: &Path, args: &[&str]) -> std::process::Command {
    let mut cmd = ddpm();
    cmd.arg("sample").arg("--checkpoint").arg(run).args(args);
    cmd
}

/// The names in `dir`, sorted (none when it does not exist).
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// [`fails`], and libtorch's C++ trace is nowhere in the message.
fn refused(cmd: &mut std::process::Command, needles: &[&str]) -> String {
    let message = fails(cmd, 1, needles);
    assert!(
        !message.contains("frame #") && !message.contains("C++") && !message.contains("libtorch"),
        "a libtorch failure instead of a refusal: {message}"
    );
    message
}

/// n = 3 × the batch streams to --each: 6 files, bitwise the files of the same request with a
/// grid (which keeps every image); the first batch is the run of n = 2 (a full batch is fixed
/// by the seed and the batch size, not by n); another batch size gives other images.
#[test]
fn sample_streams_batches_to_each() {
    let setup = Setup::new(4, 4);
    let run = trained(&setup);
    let streamed = setup.path("streamed");
    let with_grid = setup.path("with_grid");
    let out = succeeds_stdout(
        sample_with(
            &run,
            &["--n", "6", "--batch-size", "2", "--no-grid", "--each"],
        )
        .arg(&streamed),
    );
    assert!(out.contains("wrote 6 images"), "{out}");
    let want: Vec<String> = (0..6).map(|i| format!("{i:05}.png")).collect();
    assert_eq!(names(&streamed), want);
    let grid = setup.path("grid.png");
    succeeds(sample(&run, &grid, &["--n", "6", "--batch-size", "2", "--each"]).arg(&with_grid));
    assert!(grid.is_file());
    for name in &want {
        assert_eq!(
            std::fs::read(streamed.join(name)).unwrap(),
            std::fs::read(with_grid.join(name)).unwrap(),
            "{name}: streamed and kept differ"
        );
    }
    let first = setup.path("first");
    succeeds(
        sample_with(
            &run,
            &["--n", "2", "--batch-size", "2", "--no-grid", "--each"],
        )
        .arg(&first),
    );
    for name in &want[..2] {
        assert_eq!(
            std::fs::read(first.join(name)).unwrap(),
            std::fs::read(streamed.join(name)).unwrap(),
            "{name}: the first batch depends on n"
        );
    }
    let other = setup.path("other");
    succeeds(
        sample_with(
            &run,
            &["--n", "6", "--batch-size", "3", "--no-grid", "--each"],
        )
        .arg(&other),
    );
    assert_ne!(
        std::fs::read(other.join("00003.png")).unwrap(),
        std::fs::read(streamed.join("00003.png")).unwrap(),
        "the batch size should seed the batches"
    );
}

fn succeeds_stdout(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("cannot start ddpm");
    assert!(
        out.status.success(),
        "expected success: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `--n 10^12` with small batches starts at once and writes its first files (it would have to
/// hold 10^12 images before writing any if it did not stream); stopped after 8 whole files.
#[test]
fn a_huge_n_streams_without_holding_the_images() {
    let setup = Setup::new(4, 4);
    let run = trained(&setup);
    let each = setup.path("each");
    let mut child = sample_with(
        &run,
        &[
            "--n",
            "1000000000000",
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--no-grid",
            "--each",
        ],
    )
    .arg(&each)
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let start = Instant::now();
    let pngs = || {
        names(&each)
            .into_iter()
            .filter(|n| n.ends_with(".png"))
            .count()
    };
    while pngs() < 8 {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("ended ({status}) before writing 8 images: {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no files after 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for name in names(&each).iter().filter(|n| n.ends_with(".png")).take(8) {
        let img = image::open(each.join(name)).unwrap();
        assert_eq!((img.width(), img.height()), (8, 8), "{name}");
    }
}

/// A grid of more images than a grid holds is refused before the model is loaded; no grid.
#[test]
fn a_grid_of_a_huge_n_is_refused_up_front() {
    let setup = Setup::new(4, 4);
    let run = trained(&setup);
    let grid = setup.path("grid.png");
    for n in ["10001", "1000000000000"] {
        refused(
            &mut sample(&run, &grid, &["--n", n]),
            &["more than a grid holds", "10000", "--each DIR --no-grid"],
        );
        assert!(!grid.exists());
    }
    // With --no-grid there must be somewhere to write.
    refused(
        &mut sample_with(&run, &["--n", "2", "--no-grid"]),
        &["--each"],
    );
}

/// A batch that cannot fit is refused with its estimate, naming --batch-size; nothing written.
#[test]
fn a_batch_too_large_is_refused_with_an_estimate() {
    let setup = Setup::new(4, 4);
    let run = trained(&setup);
    let each = setup.path("each");
    let grid = setup.path("grid.png");
    for batch in ["100000000000", "18446744073709551615"] {
        let msg = refused(
            sample_with(
                &run,
                &[
                    "--n",
                    "100000000000",
                    "--no-grid",
                    "--batch-size",
                    batch,
                    "--each",
                ],
            )
            .arg(&each),
            &[
                "sampling a batch of",
                "needs about",
                "is available",
                "lower sample.batch_size (--batch-size)",
            ],
        );
        assert!(
            ["TiB", "PiB", "EiB"].iter().any(|u| msg.contains(u)),
            "{msg}"
        );
        assert!(names(&each).is_empty(), "files written: {:?}", names(&each));
    }
    refused(
        &mut sample(&run, &grid, &["--n", "2", "--batch-size", "0"]),
        &["sample.batch_size (--batch-size) = 0", "at least 1"],
    );
    assert!(!grid.exists());
}

/// The tiny config with `from` replaced by `to` (a model from a config file).
fn config_with(setup: &Setup, name: &str, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(&setup.config).unwrap();
    assert!(text.contains(from), "{from} not in the tiny config");
    let path = setup.path(name);
    std::fs::write(&path, text.replace(from, to)).unwrap();
    path
}

/// Networks too wide, too deep or too long, and training batches too large, from flags or a
/// config file: refused with the estimate and the setting to lower before anything is written
/// (no config.toml, no checkpoint).
#[test]
fn models_and_training_runs_too_large_are_refused() {
    let setup = Setup::new(4, 4);
    let cases: Vec<(Vec<&str>, Option<PathBuf>, &str)> = vec![
        (
            vec!["--base-channels", "1000000"],
            None,
            "model.base_channels (--base-channels)",
        ),
        (vec!["--t-max", "100000000000"], None, "(--t-max)"),
        (
            vec!["--batch-size", "1000000000"],
            None,
            "train.batch_size (--batch-size)",
        ),
        (
            vec![],
            Some(config_with(
                &setup,
                "wide.toml",
                "base_channels = 8",
                "base_channels = 4000000",
            )),
            "lower model.base_channels",
        ),
        (
            vec![],
            Some(config_with(
                &setup,
                "deep.toml",
                "groups = 4",
                "groups = 4\nblocks_per_level = 1000000000",
            )),
            "lower model.blocks_per_level",
        ),
        (
            vec![],
            Some(config_with(
                &setup,
                "grid.toml",
                "n = 2",
                "n = 1000000000000",
            )),
            "lower sample.n",
        ),
    ];
    for (i, (flags, config, needle)) in cases.into_iter().enumerate() {
        let run = setup.path(&format!("run{i}"));
        let mut cmd = ddpm();
        cmd.arg("train")
            .arg("--config")
            .arg(config.as_ref().unwrap_or(&setup.config))
            .arg("--out")
            .arg(&run)
            .args(&flags);
        refused(&mut cmd, &["needs about", "is available", needle]);
        let left: Vec<String> = names(&run).into_iter().filter(|n| n != ".lock").collect();
        assert!(left.is_empty(), "{flags:?}: wrote {left:?}");
    }
}

/// Empty requests: no images, an empty file or directory name.
#[test]
fn empty_requests_are_errors() {
    let setup = Setup::new(4, 4);
    let run = trained(&setup);
    let grid = setup.path("grid.png");
    refused(
        &mut sample(&run, &grid, &["--n", "0"]),
        &["--n must be at least 1"],
    );
    // An empty name is no name: the parser says so (status 2).
    fails(
        &mut sample_with(&run, &["--n", "2", "--each="]),
        2,
        &["a value is required"],
    );
    fails(
        &mut sample_with(&run, &["--n", "2", "--out="]),
        2,
        &["a value is required"],
    );
    assert!(!grid.exists());
}

/// Settings of `ddpm quality` and `ddpm eval` that can only fail are refused before the
/// checkpoint is read or any output made (`quality --grid 0` used to fail only after the whole
/// table was measured; `eval --limit 0` ended in a libtorch panic on an empty concatenation): the checkpoint does not exist, so its error would come first
/// otherwise, and each call is bounded in time (measuring takes minutes).
#[test]
fn quality_and_eval_settings_fail_before_any_model_work() {
    let setup = Setup::new(2, 2);
    let nowhere = setup.path("nowhere");
    let out = setup.path("q");
    let started = Instant::now();
    let mut quality = ddpm();
    quality
        .args(["quality", "--checkpoint"])
        .arg(&nowhere)
        .arg("--out")
        .arg(&out)
        .args(["--grid", "0"]);
    let message = refused(&mut quality, &["--grid", "grid_images = 0", "at least 1"]);
    assert!(!message.contains("m_t estimated"), "{message}");
    assert!(!out.exists(), "the output directory was made");
    for (flags, needle) in [
        (["--batch-size", "0"], "--batch-size"),
        (["--quick", "0"], "--quick"),
        (["--limit", "0"], "--limit"),
    ] {
        let mut eval = ddpm();
        eval.args(["eval", "--checkpoint"])
            .arg(&nowhere)
            .args(flags);
        refused(&mut eval, &[needle, "= 0 is out of range"]);
    }
    let per_call = started.elapsed().as_secs_f64() / 4.0;
    assert!(per_call < 5.0, "{per_call:.2} s per refused call");
}
