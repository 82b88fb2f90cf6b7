//! Shared by the tests that start the real `ddpm` binary: a tiny configuration (8×8 grey
//! images, 8·[1, 2] U-Net, T = 20, batch 4) so that a run of a few dozen steps takes well
//! under a second, image folders built in temporary directories, and assertions on how a
//! command ended.
// Each test binary uses only some of these helpers.
#![allow(dead_code)]

use image::{GrayImage, Luma};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
pub const DDPM: &str = env!("CARGO_BIN_EXE_ddpm");

/// A temporary directory (removed when dropped) in /dev/shm when there is one, else under the
/// target dir. On a memory file system fsync costs nothing, so the tests time the program and
/// not a disk shared with other work; a SIGKILL leaves files exactly as it would on a disk.
pub fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR"))
    };
    tempfile::Builder::new()
        .prefix("ddpm-it-")
        .tempdir_in(base)
        .or_else(|_| {
            tempfile::Builder::new()
                .prefix("ddpm-it-")
                .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        })
        .expect("cannot create a scratch directory")
}

/// `ddpm` on the CPU with one libtorch thread (tests run side by side on few cores, and one
/// thread keeps every run's arithmetic in the same order), no progress bars, plain logs.
pub fn ddpm() -> Command {
    let mut cmd = Command::new(DDPM);
    cmd.env("OMP_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .env_remove("RUST_LOG")
        .args(["--device", "cpu", "--no-progress"]);
    cmd
}

/// Writes `n` seeded random grey `side`×`side` PNGs named 000.png, 001.png, … into `dir`.
pub fn grey_pngs(dir: &Path, n: usize, side: u32, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..n {
        let img = GrayImage::from_fn(side, side, |_, _| Luma([rng.random::<u8>()]));
        img.save(dir.join(format!("{i:03}.png"))).unwrap();
    }
}

/// The tiny run's settings as a TOML file at `path`, reading images from `data`.
pub fn tiny_config(path: &Path, data: &Path, steps: u64, checkpoint_every: u64) -> PathBuf {
    tiny_config_with(path, data, steps, checkpoint_every, "")
}

/// [`tiny_config`] with `extra` TOML lines appended to the `[train]` section.
pub fn tiny_config_with(
    path: &Path,
    data: &Path,
    steps: u64,
    checkpoint_every: u64,
    extra: &str,
) -> PathBuf {
    let text = format!(
        r#"[data]
source = "folder"
path = {data:?}
holdout = 0
[model]
image_size = 8
base_channels = 8
channel_mults = [1, 2]
groups = 4
t_max = 20
[diffusion]
t_max = 20
[sample]
n = 2
[train]
steps = {steps}
batch_size = 4
warmup_steps = 2
lr_decay = []
checkpoint_every = {checkpoint_every}
keep_last = 100
sample_every = 0
log_every = 1
grid_steps = 4
{extra}
"#
    );
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// A scratch directory holding 16 images in `images/` and the tiny config `tiny.toml`.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Setup {
    /// 16 grey 8×8 images and a config of `steps` steps, a checkpoint every `every`.
    pub fn new(steps: u64, every: u64) -> Setup {
        let dir = scratch();
        let images = dir.path().join("images");
        grey_pngs(&images, 16, 8, 7);
        let config = tiny_config(&dir.path().join("tiny.toml"), &images, steps, every);
        Setup { dir, config }
    }

    /// A path inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ddpm train --config tiny.toml --out <run>` plus `extra`.
    pub fn train(&self, run: &Path, extra: &[&str]) -> Command {
        let mut cmd = ddpm();
        cmd.arg("train")
            .arg("--config")
            .arg(&self.config)
            .arg("--out")
            .arg(run)
            .args(extra);
        cmd
    }
}

/// `ddpm sample --checkpoint <checkpoint> --out <out>` plus `extra`.
pub fn sample(checkpoint: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = ddpm();
    cmd.arg("sample")
        .arg("--checkpoint")
        .arg(checkpoint)
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd
}

/// `ddpm train --resume --out <run>` plus `extra`.
pub fn resume(run: &Path, extra: &[&str]) -> Command {
    let mut cmd = ddpm();
    cmd.arg("train")
        .arg("--resume")
        .arg("--out")
        .arg(run)
        .args(extra);
    cmd
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` and asserts that it succeeded; returns its stderr.
pub fn succeeds(cmd: &mut Command) -> String {
    let out = cmd.output().expect("cannot start ddpm");
    assert!(
        out.status.success(),
        "expected success, got {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `cmd` and asserts that it ended with exit status `code`, without a panic, and with
/// an `error:` message (that line and any after it) containing every one of `needles`;
/// returns the message.
pub fn fails(cmd: &mut Command, code: i32, needles: &[&str]) -> String {
    let out = cmd.output().expect("cannot start ddpm");
    let all = describe(&out);
    assert_eq!(out.status.code(), Some(code), "wrong exit status: {all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("internal failure"),
        "a panic instead of an error: {all}"
    );
    let line = stderr
        .lines()
        .position(|l| l.starts_with("error:"))
        .map(|i| stderr.lines().skip(i).collect::<Vec<_>>().join("\n"))
        .unwrap_or_else(|| panic!("no `error:` line: {all}"));
    for needle in needles {
        assert!(
            line.contains(needle),
            "the error does not say {needle:?}: {all}"
        );
    }
    line
}

/// Steps of the finished checkpoints (`step-NNNNNNN/`) in `run`, oldest first.
pub fn checkpoint_steps(run: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .map(|entries| {
            entries
                .filter_map(|e| {
                    e.ok()?
                        .file_name()
                        .to_str()?
                        .strip_prefix("step-")?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

/// Names in `run/checkpoints` ending in `.tmp` (interrupted writes).
pub fn tmp_dirs(run: &Path) -> Vec<String> {
    std::fs::read_dir(run.join("checkpoints"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// The directory of checkpoint `step` in `run`.
pub fn checkpoint_dir(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:07}"))
}

/// The sha256 of the weights, EMA and optimiser files of checkpoint `step`, as its manifest
/// records them (the manifest's own checksum is verified by every reader).
pub fn state_sums(run: &Path, step: u64) -> [String; 3] {
    let text = std::fs::read_to_string(checkpoint_dir(run, step).join("manifest.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    ["model.safetensors", "ema.safetensors", "optim.safetensors"]
        .map(|f| manifest["files"][f].as_str().unwrap().to_string())
}

/// The `step` of every line of `run/metrics.jsonl` (every line must be JSON).
pub fn logged_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("metrics line {l:?} is not JSON: {e}"))["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// The last step in metrics.jsonl, ignoring a partial last line (0 when none).
pub fn last_logged(run: &Path) -> u64 {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// The sha256 of the weights, EMA and optimiser files of checkpoint `step`, read from the
/// files themselves.
pub fn file_sums(run: &Path, step: u64) -> [String; 3] {
    let dir = checkpoint_dir(run, step);
    ["model.safetensors", "ema.safetensors", "optim.safetensors"].map(|f| {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })
}

/// Unmounts a tmpfs when dropped, even when the test fails.
pub struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A tmpfs of `pages` 4 KiB pages at `dir` (created), filled up to the last byte when `fill`;
/// `None` (with the reason printed) when it cannot be mounted (not root).
pub fn tmpfs(dir: &Path, pages: u64, fill: bool) -> Option<Mount> {
    std::fs::create_dir_all(dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={}", pages * 4096)])
        .arg("tmpfs")
        .arg(dir)
        .output();
    match mounted {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            eprintln!(
                "SKIPPED the full-disk test: mount -t tmpfs failed (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Err(e) => {
            eprintln!("SKIPPED the full-disk test: cannot run mount: {e}");
            return None;
        }
    }
    let mount = Mount(dir.to_path_buf());
    if fill {
        let mut filler = std::fs::File::create(dir.join(".filler")).unwrap();
        let chunk = [0u8; 512];
        while filler.write_all(&chunk).is_ok() {}
        while filler.write_all(&chunk[..1]).is_ok() {}
        assert!(
            std::fs::write(dir.join(".probe"), b"x").is_err(),
            "the tmpfs is not full"
        );
        let _ = std::fs::remove_file(dir.join(".probe"));
    }
    Some(mount)
}
