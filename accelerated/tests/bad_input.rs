//! Bad input to the real `ddpm` binary: each case must end with exit status 1 (2 for what
//! the command-line parser rejects) and an `error:` line saying what is wrong, never a
//! panic. Tabulated in docs/reliability.md.

mod common;

use common::*;
use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use std::path::{Path, PathBuf};

/// A tiny finished run of 4 steps (one checkpoint) in `setup`.
fn trained(setup: &Setup) -> PathBuf {
    let run = setup.path("run");
    succeeds(&mut setup.train(&run, &["--steps", "4"]));
    run
}

fn train_on(setup: &Setup, data: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = setup.train(&setup.path("run"), &["--data"]);
    cmd.arg(data).args(extra);
    cmd
}

#[test]
fn a_missing_data_folder() {
    let setup = Setup::new(2, 2);
    fails(
        &mut train_on(&setup, &setup.path("nowhere"), &[]),
        1,
        &["nowhere", "does not exist"],
    );
}

#[test]
fn an_empty_data_folder() {
    let setup = Setup::new(2, 2);
    let empty = setup.path("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(
        &mut train_on(&setup, &empty, &[]),
        1,
        &["holds no .png/.jpg/.jpeg files"],
    );
}

#[test]
fn a_folder_of_non_images() {
    let setup = Setup::new(2, 2);
    let dir = setup.path("texts");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "hello").unwrap();
    std::fs::write(dir.join("data.csv"), "1,2,3").unwrap();
    fails(
        &mut train_on(&setup, &dir, &[]),
        1,
        &["holds no .png/.jpg/.jpeg files"],
    );
    // A text file dressed as an image is named.
    std::fs::write(dir.join("fake.png"), "not a picture").unwrap();
    fails(
        &mut train_on(&setup, &dir, &[]),
        1,
        &["cannot read image", "fake.png"],
    );
}

#[test]
fn a_truncated_png() {
    let setup = Setup::new(2, 2);
    let dir = setup.path("images");
    let whole = std::fs::read(dir.join("003.png")).unwrap();
    std::fs::write(dir.join("003.png"), &whole[..whole.len() / 2]).unwrap();
    fails(
        &mut train_on(&setup, &dir, &[]),
        1,
        &["cannot read image", "003.png"],
    );
}

/// Not an error: 16-bit, RGBA, RGB and 8-bit grey files of different sizes are all
/// centre-cropped, resized and converted to the model's channels.
#[test]
fn mixed_16_bit_rgba_and_grey_images_are_converted() {
    let setup = Setup::new(2, 2);
    let dir = setup.path("mixed");
    std::fs::create_dir(&dir).unwrap();
    ImageBuffer::<Luma<u16>, Vec<u16>>::from_fn(12, 9, |x, y| Luma([(x * 5000 + y * 300) as u16]))
        .save(dir.join("a16.png"))
        .unwrap();
    RgbaImage::from_fn(10, 10, |x, _| Rgba([x as u8 * 20, 0, 90, 128]))
        .save(dir.join("b_rgba.png"))
        .unwrap();
    GrayImage::from_fn(8, 8, |x, y| Luma([(x * y) as u8]))
        .save(dir.join("c_grey.png"))
        .unwrap();
    RgbImage::from_fn(16, 8, |x, _| Rgb([0, x as u8 * 10, 255]))
        .save(dir.join("d_rgb.jpg"))
        .unwrap();
    succeeds(&mut train_on(&setup, &dir, &["--batch-size", "2"]));
    let rgb = setup.path("rgb");
    succeeds(setup.train(&rgb, &["--data"]).arg(&dir).args([
        "--channels",
        "rgb",
        "--batch-size",
        "2",
    ]));
}

#[test]
fn images_smaller_than_the_image_size() {
    let setup = Setup::new(2, 2);
    fails(
        &mut train_on(&setup, &setup.path("images"), &["--image-size", "16"]),
        1,
        &["000.png", "8×8", "smaller than the target size 16×16"],
    );
}

#[test]
fn an_image_size_the_unet_depth_cannot_divide() {
    let setup = Setup::new(2, 2);
    // Two levels halve the image once.
    fails(
        &mut setup.train(&setup.path("run"), &["--image-size", "7"]),
        1,
        &["image size 7 must be divisible by 2^1 = 2"],
    );
}

#[test]
fn zero_diffusion_steps() {
    let setup = Setup::new(2, 2);
    fails(
        &mut setup.train(&setup.path("run"), &["--t-max", "0"]),
        1,
        &["T must be at least 1, got 0"],
    );
}

#[test]
fn a_zero_or_negative_learning_rate() {
    let setup = Setup::new(2, 2);
    for lr in ["0", "-0.001"] {
        fails(
            &mut setup.train(&setup.path("run"), &["--lr", lr]),
            1,
            &["train.lr must be positive", lr],
        );
    }
    fails(
        &mut setup.train(&setup.path("run"), &["--lr", "fast"]),
        2,
        &["invalid value 'fast' for '--lr <LR>'"],
    );
}

#[test]
fn a_batch_larger_than_the_data_set() {
    let setup = Setup::new(2, 2);
    fails(
        &mut setup.train(&setup.path("run"), &["--batch-size", "64"]),
        1,
        &["batch size must be between 1 and the number of training samples (16), got 64"],
    );
}

#[test]
fn a_config_file_with_an_unknown_key_or_a_wrong_type() {
    let setup = Setup::new(2, 2);
    let config = std::fs::read_to_string(&setup.config).unwrap();
    let cases = [
        (
            "typo.toml",
            config.replace("warmup_steps", "warmup_stpes"),
            vec![
                "`warmup_stpes = 2` in [train]",
                "unknown field `warmup_stpes`",
            ],
        ),
        (
            "type.toml",
            config.replace("batch_size = 4", "batch_size = \"four\""),
            vec!["batch_size", "four"],
        ),
        (
            "syntax.toml",
            config.replace("[model]", "[model"),
            vec!["syntax.toml"],
        ),
        ("top.json", "{\"colour\": true}".to_string(), vec!["colour"]),
        (
            "settings.yaml",
            config.clone(),
            vec!["must end in .toml or .json"],
        ),
    ];
    for (name, text, needles) in cases {
        let path = setup.path(name);
        std::fs::write(&path, text).unwrap();
        let mut cmd = ddpm();
        cmd.args(["train", "--config"])
            .arg(&path)
            .arg("--out")
            .arg(setup.path("run"));
        fails(&mut cmd, 1, &needles);
    }
    let mut cmd = ddpm();
    cmd.args(["train", "--config"])
        .arg(setup.path("absent.toml"));
    fails(&mut cmd, 1, &["cannot read the config file", "absent.toml"]);
}

#[test]
fn a_checkpoint_of_another_preset_or_schedule() {
    let setup = Setup::new(2, 2);
    let run = trained(&setup);
    fails(
        &mut resume(&run, &["--preset", "cifar32"]),
        1,
        &[
            "other settings",
            "model.base_channels = 128 here, 8 in the run",
        ],
    );
    let other = setup.path("cosine.toml");
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        "t_max = 20\n[sample]",
        "t_max = 20\nschedule = \"cosine\"\n[sample]",
    );
    std::fs::write(&other, text).unwrap();
    fails(
        resume(&run, &[]).arg("--config").arg(&other),
        1,
        &[
            "other settings",
            "diffusion.schedule = \"cosine\" here, \"article\" in the run",
        ],
    );
    fails(
        &mut resume(&run, &["--schedule", "linear"]),
        1,
        &["--schedule cannot change them"],
    );
    // The same config file, only longer, continues.
    succeeds(
        resume(&run, &["--steps", "6"])
            .arg("--config")
            .arg(&setup.config),
    );
}

#[test]
fn a_sampler_asked_for_more_steps_than_t() {
    let setup = Setup::new(2, 2);
    let run = trained(&setup);
    fails(
        &mut sample(&run, &setup.path("s.png"), &["--steps", "50"]),
        1,
        &["steps = 50 is out of range: it must be between 1 and T = 20"],
    );
    fails(
        &mut sample(&run, &setup.path("s.png"), &["--eta", "2"]),
        1,
        &["η"],
    );
    fails(
        &mut sample(&run, &setup.path("s.png"), &["--n", "0"]),
        1,
        &["--n must be at least 1"],
    );
}

#[test]
fn a_quality_table_that_cannot_be_measured() {
    let setup = Setup::new(2, 2);
    let quality = |args: &[&str], checkpoint: &Path| {
        let mut cmd = ddpm();
        cmd.args(["quality", "--checkpoint"])
            .arg(checkpoint)
            .arg("--out")
            .arg(setup.path("q"))
            .args(args);
        cmd
    };
    fails(
        &mut quality(
            &["--steps", "50,100", "--samples", "10"],
            &setup.path("run"),
        ),
        1,
        &["--samples needs one count per column of --steps (2 columns, 1 counts)"],
    );
    fails(
        &mut quality(&[], &setup.path("images")),
        1,
        &["holds no checkpoint"],
    );
    let doc = setup.path("notes.md");
    std::fs::write(&doc, "no markers here\n").unwrap();
    let mut cmd = quality(&["--doc"], &setup.path("images"));
    cmd.arg(&doc);
    fails(&mut cmd, 1, &["has no <!-- quality-table:begin -->"]);
    let run = trained(&setup);
    fails(
        &mut quality(&[], &run),
        1,
        &["was trained on a folder of images", "needs an mnist run"],
    );
}

#[test]
fn an_output_path_that_is_not_writable() {
    let setup = Setup::new(2, 2);
    let file = setup.path("a_file");
    std::fs::write(&file, "in the way").unwrap();
    fails(
        &mut setup.train(&file.join("run"), &[]),
        1,
        &["cannot create the run directory", "a_file"],
    );
    let run = trained(&setup);
    fails(
        &mut sample(&run, &file.join("s.png"), &["--steps", "2"]),
        1,
        &[
            "cannot create the directory",
            "a file stands where a directory is needed",
        ],
    );
    fails(
        &mut sample(&run, setup.dir.path(), &["--steps", "2"]),
        1,
        &["is a directory"],
    );
}

#[test]
fn the_embedded_data_missing_because_the_bootstrap_never_ran() {
    let setup = Setup::new(2, 2);
    let mut cmd = ddpm();
    cmd.env("DDPM_MNIST", setup.path("mnist_5k.csv.gz"))
        .args(["train", "--steps", "1", "--out"])
        .arg(setup.path("run"));
    fails(
        &mut cmd,
        1,
        &["MNIST-5k data set is missing", "scripts/bootstrap.sh"],
    );
}

#[test]
fn resuming_a_run_without_checkpoints_or_restarting_one_that_has_them() {
    let setup = Setup::new(2, 2);
    fails(
        &mut resume(&setup.path("fresh"), &[]),
        1,
        &["holds no checkpoint to resume from"],
    );
    let run = trained(&setup);
    fails(
        &mut setup.train(&run, &[]),
        1,
        &["already holds checkpoints", "--resume"],
    );
}

#[test]
fn a_checkpoint_path_that_holds_no_checkpoint() {
    let setup = Setup::new(2, 2);
    fails(
        &mut sample(&setup.path("images"), &setup.path("s.png"), &[]),
        1,
        &["holds no checkpoint"],
    );
}

#[test]
fn out_of_range_settings() {
    let setup = Setup::new(2, 2);
    let cases: [(&[&str], &str); 6] = [
        (
            &["--ema-decay", "1.5"],
            "train.ema_decay must be in [0, 1), got 1.5",
        ),
        (
            &["--checkpoint-every", "0"],
            "train.checkpoint_every must be at least 1",
        ),
        (&["--keep-last", "0"], "train.keep_last"),
        (&["--grad-clip", "-1"], "train.grad_clip must be positive"),
        (
            &["--base-channels", "6"],
            "cannot be split into 4 GroupNorm groups",
        ),
        (
            &["--loss-sigma", "isotropic"],
            "--loss-sigma isotropic needs --data-std",
        ),
    ];
    for (flags, needle) in cases {
        fails(&mut setup.train(&setup.path("run"), flags), 1, &[needle]);
    }
}

#[test]
fn unknown_flags_and_subcommands() {
    let mut cmd = ddpm();
    cmd.args(["train", "--stepz", "3"]);
    fails(&mut cmd, 2, &["unexpected argument '--stepz'"]);
    let mut cmd = ddpm();
    cmd.arg("fit");
    fails(&mut cmd, 2, &["unrecognized subcommand 'fit'"]);
    let mut cmd = ddpm();
    cmd.args(["train", "--preset", "imagenet"]);
    fails(&mut cmd, 2, &["invalid value 'imagenet'"]);
}

#[test]
fn cuda_requested_on_a_machine_without_it() {
    if tch::Cuda::is_available() {
        eprintln!("SKIPPED: this machine has CUDA, so --device cuda is not an error here");
        return;
    }
    let setup = Setup::new(2, 2);
    let mut cmd = std::process::Command::new(DDPM);
    cmd.args(["--device", "cuda", "train", "--config"])
        .arg(&setup.config)
        .arg("--out")
        .arg(setup.path("run"));
    fails(&mut cmd, 1, &["CUDA was requested", "--device cpu"]);
}
