//! `ddpm invert`, `ddpm sample --latents` and `ddpm interpolate`, run as the real binary on
//! a tiny run trained in the test (8×8 grey, T = 20, 4 steps: seconds).

mod common;

use common::*;
use image::{GrayImage, Luma, RgbImage};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::Command;

fn trained(setup: &Setup) -> PathBuf {
    let run = setup.path("run");
    succeeds(&mut setup.train(&run, &["--steps", "4"]));
    run
}

fn invert(run: &Path, out: &Path, images: &[&Path], extra: &[&str]) -> Command {
    let mut cmd = ddpm();
    cmd.arg("invert")
        .arg("--checkpoint")
        .arg(run)
        .arg("--out")
        .arg(out)
        .arg("--images")
        .args(images)
        .args(extra);
    cmd
}

/// The grey pixels of the PNGs in `dir`, sorted by name, as f64 in 0..=255.
fn pixels(dir: &Path) -> Vec<Vec<f64>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            image::open(f)
                .unwrap()
                .to_luma8()
                .into_raw()
                .into_iter()
                .map(f64::from)
                .collect()
        })
        .collect()
}

/// Mean absolute pixel error of each reconstruction against its original.
fn errors(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<f64> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()).sum::<f64>() / x.len() as f64)
        .collect()
}

/// Images the run drew itself are inverted and decoded back; the latents file records its
/// settings; the reconstruction is deterministic and improves with the number of steps.
#[test]
fn invert_then_sample_latents_returns_the_images() {
    let setup = Setup::new(4, 4);
    let run = trained(&setup);
    let originals = setup.path("orig");
    succeeds(&mut sample(
        &run,
        &setup.path("s.png"),
        &[
            "--n",
            "3",
            "--each",
            originals.to_str().unwrap(),
            "--eta",
            "0",
            "--steps",
            "20",
        ],
    ));
    let mut errs = Vec::new();
    for steps in ["4", "20"] {
        let latents = setup.path(&format!("z{steps}.safetensors"));
        succeeds(&mut invert(
            &run,
            &latents,
            &[&originals],
            &["--steps", steps],
        ));
        let bytes = std::fs::read(&latents).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        assert_eq!(meta["format"], "ddpm-latents-v1");
        assert_eq!(meta["steps"], steps);
        assert_eq!(meta["t_max"], "20");
        assert!(meta["images"].contains("00002.png"), "{meta:?}");
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("latents").unwrap().shape(), [3, 1, 8, 8]);
        let mut decoded = Vec::new();
        for k in 0..2 {
            let dir = setup.path(&format!("back{steps}-{k}"));
            succeeds(&mut sample(
                &run,
                &setup.path("b.png"),
                &[
                    "--latents",
                    latents.to_str().unwrap(),
                    "--each",
                    dir.to_str().unwrap(),
                ],
            ));
            decoded.push(pixels(&dir));
        }
        assert_eq!(decoded[0], decoded[1], "decoding is not deterministic");
        let e = errors(&pixels(&originals), &decoded[0]);
        errs.push(e.iter().sum::<f64>() / e.len() as f64);
    }
    // T = 20 steps: every step of the chain, the finest walk there is; 4 steps: strides of ~6.
    assert!(
        errs[1] < errs[0] && errs[1] < 8.0,
        "mean abs pixel error at 4 and 20 steps: {errs:?}"
    );
}

#[test]
fn bad_input_to_invert_and_sample_latents() {
    let setup = Setup::new(4, 4);
    let run = trained(&setup);
    let out = setup.path("z.safetensors");
    let big = setup.path("big.png");
    GrayImage::from_pixel(16, 16, Luma([9])).save(&big).unwrap();
    fails(
        &mut invert(&run, &out, &[&big], &[]),
        1,
        &["big.png", "is 16×16; the model takes 8×8"],
    );
    let rgb = setup.path("rgb.png");
    RgbImage::new(8, 8).save(&rgb).unwrap();
    fails(
        &mut invert(&run, &out, &[&rgb], &[]),
        1,
        &[
            "rgb.png",
            "has 3 colour channels (RGB); the model takes 1 (grey)",
        ],
    );
    fails(
        &mut invert(&run, &out, &[&setup.path("nowhere.png")], &[]),
        1,
        &["nowhere.png", "does not exist"],
    );
    let images = setup.path("images");
    fails(
        &mut invert(&run, &out, &[&images], &["--steps", "50"]),
        1,
        &["steps (--steps) = 50 is out of range", "T = 20"],
    );
    assert!(!out.exists(), "a failed inversion left a latents file");
    // Latents of the wrong shape, junk, and a missing file.
    succeeds(&mut invert(&run, &out, &[&images], &["--steps", "2"]));
    let wrong = setup.path("wrong.safetensors");
    let data = vec![0u8; 4 * 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 1, 4, 4], &data)
            .unwrap();
    std::fs::write(
        &wrong,
        safetensors::serialize([("latents", view)], None).unwrap(),
    )
    .unwrap();
    let decode = |file: &Path| {
        let mut cmd = sample(&run, &setup.path("b.png"), &["--latents"]);
        cmd.arg(file);
        cmd
    };
    fails(
        &mut decode(&wrong),
        1,
        &["shape mismatch for latents", "[N, 1, 8, 8]", "[1, 1, 4, 4]"],
    );
    let junk = setup.path("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    fails(
        &mut decode(&junk),
        1,
        &["latents file", "junk.safetensors", "not a safetensors file"],
    );
    fails(
        &mut decode(&setup.path("none.safetensors")),
        1,
        &["none.safetensors"],
    );
    // --latents decodes one image a latent: --n does not go with it.
    let mut both = decode(&out);
    both.args(["--n", "3"]);
    fails(&mut both, 2, &["--n"]);
    succeeds(&mut decode(&out));
}

/// The PNG's (width, height).
fn size(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap()
}

#[test]
fn interpolate_writes_a_row_of_frames_from_seeds_latents_or_images() {
    let setup = Setup::new(4, 4);
    let run = trained(&setup);
    let interpolate = |out: &Path, ends: &[&str], extra: &[&str]| {
        let mut cmd = ddpm();
        cmd.arg("interpolate")
            .arg("--checkpoint")
            .arg(&run)
            .arg("--out")
            .arg(out)
            .args(ends)
            .args(["--steps", "5"])
            .args(extra);
        cmd
    };
    // 5 cells of 8 pixels and 2-pixel gaps: (5·10 + 2) × (10 + 2), times the grid scale 4.
    let seeds = setup.path("seeds.png");
    succeeds(&mut interpolate(
        &seeds,
        &["--seeds", "1", "2"],
        &["--frames", "5"],
    ));
    assert_eq!(size(&seeds), (52 * 4, 12 * 4));
    let images = setup.path("images");
    let (a, b) = (images.join("000.png"), images.join("001.png"));
    let from_images = setup.path("images.png");
    succeeds(&mut interpolate(
        &from_images,
        &["--images", a.to_str().unwrap(), b.to_str().unwrap()],
        &["--grid-scale", "1"],
    ));
    assert_eq!(size(&from_images), (8 * 10 + 2, 12));
    let z = setup.path("z.safetensors");
    succeeds(&mut invert(&run, &z, &[&images], &["--steps", "5"]));
    let from_latents = setup.path("latents.png");
    let zs = z.to_str().unwrap();
    succeeds(&mut interpolate(
        &from_latents,
        &["--latents", zs, zs],
        &["--frames", "3"],
    ));
    assert_eq!(size(&from_latents), (32 * 4, 12 * 4));
    fails(
        &mut interpolate(
            &setup.path("x.png"),
            &["--seeds", "1", "2"],
            &["--frames", "1"],
        ),
        1,
        &["frames (--frames) = 1 is out of range: it must be at least 2"],
    );
    fails(
        &mut interpolate(&setup.path("x.png"), &[], &[]),
        1,
        &["--seeds A B"],
    );
    fails(
        &mut interpolate(&setup.path("x.png"), &["--seeds", "1", "x"], &[]),
        1,
        &["'x' for '--seeds'", "not a whole number"],
    );
    let mut none = ddpm();
    none.args(["invert", "--checkpoint"]).arg(&run);
    fails(&mut none, 1, &["--images"]);
}
