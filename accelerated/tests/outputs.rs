//! What a user sees of a run, with the real `ddpm` binary (issue 15, "what the user sees"):
//! grids scaled up by nearest neighbour (`--grid-scale`, `sample.grid_scale`), the loss
//! curve `loss.png` beside `metrics.jsonl`, and the last line of `ddpm train` naming both.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// Pixels between grid cells at scale 1 (`ddpm::grid`'s gap).
const GAP: u32 = 2;

/// (width, height) of the PNG at `path`, which must decode.
fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (img.width(), img.height())
}

/// The grid of `n` tiny 8×8 images in ceil(sqrt n) columns, scaled `s` times.
fn grid_size(n: u32, s: u32) -> (u32, u32) {
    let cols = (n as f64).sqrt().ceil() as u32;
    let rows = n.div_ceil(cols);
    (s * (cols * (8 + GAP) + GAP), s * (rows * (8 + GAP) + GAP))
}

/// The path after `label ` in `line`, up to the next comma or the end.
fn path_after(line: &str, label: &str) -> PathBuf {
    let at = line
        .find(label)
        .unwrap_or_else(|| panic!("{line:?} does not say {label:?}"));
    let rest = &line[at + label.len()..];
    PathBuf::from(rest.split(", ").next().unwrap().trim())
}

#[test]
fn the_last_line_of_a_run_names_the_scaled_grid_and_the_loss_curve() {
    let setup = Setup::new(4, 4);
    let run = setup.path("run");
    let out = setup
        .train(&run, &["--grid-scale", "3"])
        .output()
        .expect("cannot start ddpm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("no output");
    let grid = path_after(last, "samples ");
    let curve = path_after(last, "loss curve ");
    assert_eq!(grid, run.join("samples").join("step-0000004.png"), "{last}");
    assert_eq!(curve, run.join("loss.png"), "{last}");
    // The tiny config draws 2 images: one row of two 8×8 cells, three times as large.
    assert_eq!(png_size(&grid), grid_size(2, 3));
    assert_eq!(png_size(&curve), (800, 480));
    // Nothing half-written beside them.
    let names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn the_loss_curve_can_be_switched_off_and_grids_kept_raw() {
    let dir = scratch();
    let images = dir.path().join("images");
    grey_pngs(&images, 16, 8, 7);
    let config = tiny_config_with(
        &dir.path().join("tiny.toml"),
        &images,
        3,
        3,
        "plot_loss = false",
    );
    let run = dir.path().join("run");
    let mut cmd = ddpm();
    cmd.arg("train")
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&run)
        .args(["--grid-scale", "1"]);
    let out = cmd.output().expect("cannot start ddpm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap();
    assert!(!last.contains("loss curve"), "{last}");
    assert!(!run.join("loss.png").exists());
    assert_eq!(
        png_size(&run.join("samples").join("step-0000003.png")),
        grid_size(2, 1)
    );
}

#[test]
fn sample_scales_its_grid_and_keeps_each_image_raw() {
    let setup = Setup::new(2, 2);
    let run = setup.path("run");
    succeeds(&mut setup.train(&run, &[]));
    let grid = setup.path("grid.png");
    let each = setup.path("each");
    succeeds(
        sample(
            &run,
            &grid,
            &["--n", "3", "--steps", "2", "--grid-scale", "2"],
        )
        .arg("--each")
        .arg(&each),
    );
    assert_eq!(png_size(&grid), grid_size(3, 2));
    assert_eq!(png_size(&each.join("00002.png")), (8, 8));
    // The run's own sample.grid_scale (the tiny config leaves the preset's 4) otherwise.
    succeeds(&mut sample(&run, &grid, &["--n", "1", "--steps", "2"]));
    assert_eq!(png_size(&grid), grid_size(1, 4));
}

#[test]
fn a_grid_scale_out_of_range_names_the_flag_and_the_key() {
    let setup = Setup::new(2, 2);
    for bad in ["0", "17"] {
        fails(
            &mut setup.train(&setup.path("run"), &["--grid-scale", bad]),
            1,
            &["sample.grid_scale (--grid-scale)", bad, "between 1 and 16"],
        );
    }
    assert!(!setup.path("run").join("metrics.jsonl").exists());
}

#[test]
fn the_loss_curve_on_a_full_disk_fails_and_leaves_no_file() {
    // Three pages: the lock file's pid, config.toml and metrics.jsonl; the first loss curve
    // (step 2, tens of KB) does not fit.
    let setup = Setup::new(40, 40);
    let disk = setup.path("disk");
    let Some(_mount) = tmpfs(&disk, 3, false) else {
        return;
    };
    let run = disk.join("run");
    fails(
        &mut setup.train(&run, &[]),
        1,
        &["loss.png", "No space left on device"],
    );
    let names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("loss.png")),
        "a loss curve or its temporary file is left: {names:?}"
    );
    assert_eq!(logged_steps(&run), [1, 2]);
}
