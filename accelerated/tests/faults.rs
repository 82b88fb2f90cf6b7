//! Faults during training, with the real `ddpm` binary as a child process: SIGKILL at seeded
//! moments (some inside a checkpoint write), exact resume, corrupt checkpoints, a full disk
//! and a diverging loss. What each test found is tabulated in docs/reliability.md.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Steps of the reference run, and its checkpoint interval.
const STEPS: u64 = 24;
const EVERY: u64 = 4;
/// A wider network than the tiny default for the runs compared with the reference: its
/// 4.8 MB checkpoints take long enough to write (serialise, hash, write) that a kill timed
/// by the appearance of the `.tmp` directory lands inside the write.
const WIDE: [&str; 2] = ["--base-channels", "32"];
/// `ddpm sample` flags that only prove a checkpoint loads: one image, two steps.
const ONE_QUICK_IMAGE: [&str; 4] = ["--n", "1", "--steps", "2"];

/// The final state of an uninterrupted run of [`STEPS`] steps (the checkpoint interval does
/// not change the arithmetic), computed once per test binary.
fn reference() -> &'static [String; 3] {
    static SUMS: OnceLock<[String; 3]> = OnceLock::new();
    SUMS.get_or_init(|| {
        let setup = Setup::new(STEPS, EVERY);
        let run = setup.path("run");
        succeeds(&mut setup.train(&run, &WIDE));
        assert_eq!(logged_steps(&run), (1..=STEPS).collect::<Vec<_>>());
        file_sums(&run, STEPS)
    })
}

fn spawn_quiet(mut cmd: std::process::Command) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start ddpm")
}

/// Polls until `ready` holds, then SIGKILLs `child`; `None` if it ended first or took longer
/// than a minute.
fn kill_when(child: &mut Child, mut ready: impl FnMut() -> bool) -> Option<()> {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() || start.elapsed() > Duration::from_secs(60) {
            return None;
        }
        if ready() {
            child.kill().unwrap();
            return Some(());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[derive(Debug, Default)]
struct Tally {
    trials: u32,
    inside_write: u32,
    resumed: u32,
    started_afresh: u32,
    max_lost: u64,
}

/// 20 seeded trials: even ones kill at a random step plus a random delay, odd ones the moment
/// a random checkpoint's `.tmp` directory appears (inside its write). After each kill the run
/// resumes from its newest finished checkpoint, loses at most one checkpoint interval of
/// logged steps, and ends bit for bit where the uninterrupted run ends.
#[test]
fn sigkill_at_random_moments_then_resume_loses_at_most_one_interval() {
    let want = reference();
    let mut rng = StdRng::seed_from_u64(20240607);
    let mut tally = Tally::default();
    for trial in 0..20u32 {
        let setup = Setup::new(STEPS, EVERY);
        let run = setup.path("run");
        let mut child = spawn_quiet(setup.train(&run, &WIDE));
        let (when, killed) = if trial % 2 == 0 {
            let step = rng.random_range(EVERY..STEPS - 1);
            let extra = Duration::from_micros(rng.random_range(0..30_000));
            let mut seen: Option<Instant> = None;
            let killed = kill_when(&mut child, || {
                if seen.is_none() && last_logged(&run) >= step {
                    seen = Some(Instant::now());
                }
                seen.is_some_and(|t| t.elapsed() >= extra)
            });
            (format!("after step {step} + {extra:?}"), killed)
        } else {
            let write = EVERY * rng.random_range(1..STEPS / EVERY);
            let tmp = checkpoint_dir(&run, write).with_extension("tmp");
            (
                format!("inside write {write}"),
                kill_when(&mut child, || tmp.exists()),
            )
        };
        assert!(
            killed.is_some(),
            "trial {trial} ({when}): the run ended before the kill"
        );
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "trial {trial}: {status:?}");
        tally.trials += 1;
        if !tmp_dirs(&run).is_empty() {
            tally.inside_write += 1;
        }
        let finished = checkpoint_steps(&run);
        let last = finished.last().copied().unwrap_or(0);
        let lost = last_logged(&run) - last;
        assert!(
            lost <= EVERY,
            "trial {trial} ({when}): logged up to {} but the newest checkpoint is {last}",
            last_logged(&run)
        );
        tally.max_lost = tally.max_lost.max(lost);
        if finished.is_empty() {
            fails(
                &mut resume(&run, &[]),
                1,
                &["holds no checkpoint to resume from"],
            );
            succeeds(&mut setup.train(&run, &WIDE));
            tally.started_afresh += 1;
        } else {
            let log = succeeds(&mut resume(&run, &[]));
            assert!(
                log.contains(&format!("at step {last}")),
                "trial {trial} ({when}): did not resume from step {last}:\n{log}"
            );
            tally.resumed += 1;
        }
        assert_eq!(
            &file_sums(&run, STEPS),
            want,
            "trial {trial} ({when}): final state differs"
        );
        assert!(
            tmp_dirs(&run).is_empty(),
            "trial {trial}: {:?} left",
            tmp_dirs(&run)
        );
        assert_eq!(
            logged_steps(&run),
            (1..=STEPS).collect::<Vec<_>>(),
            "trial {trial}: metrics.jsonl should log each step once"
        );
    }
    eprintln!("kill trials: {tally:?}");
    // Each odd trial polls for the `.tmp` directory every 0.2 ms, and writing the wide
    // network's 4.8 MB checkpoint (serialise, hash, write) takes tens of milliseconds: most of
    // the ten must land inside it.
    assert!(
        tally.inside_write >= 5,
        "too few kills landed inside a checkpoint write: {tally:?}"
    );
}

/// N steps in one run, and N/2 steps + SIGKILL + resume, end with the same weights, EMA and
/// LAMB state, bit for bit (CPU, one libtorch thread in both).
#[test]
fn resume_after_a_kill_is_bitwise_exact() {
    let want = reference();
    let setup = Setup::new(STEPS, STEPS / 2);
    let run = setup.path("run");
    let mut child = spawn_quiet(setup.train(&run, &WIDE));
    let half = checkpoint_dir(&run, STEPS / 2);
    kill_when(&mut child, || half.exists()).expect("the run ended before the kill");
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    assert_eq!(checkpoint_steps(&run), vec![STEPS / 2]);
    let log = succeeds(&mut resume(&run, &[]));
    assert!(log.contains(&format!("at step {}", STEPS / 2)), "{log}");
    assert_eq!(&file_sums(&run, STEPS), want);
}

/// Damages the file at its path.
type Damage = fn(&Path);

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

/// A truncated or bit-flipped file in the newest checkpoint is reported by name when that
/// checkpoint is opened, and `--resume` falls back to the previous one with a warning and
/// still ends exactly where an undamaged run ends.
#[test]
fn a_corrupt_checkpoint_is_detected_and_resume_falls_back() {
    let want = reference();
    let damages: [(&str, Damage); 4] = [
        ("model.safetensors", |p| {
            let len = std::fs::metadata(p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        }),
        ("optim.safetensors", |p| {
            flip_byte(p, std::fs::metadata(p).unwrap().len() as usize / 2)
        }),
        ("ema.safetensors", |p| flip_byte(p, 3)),
        ("manifest.json", |p| {
            flip_byte(p, std::fs::metadata(p).unwrap().len() as usize / 3)
        }),
    ];
    for (file, damage) in damages {
        let setup = Setup::new(STEPS, STEPS / 2);
        let run = setup.path("run");
        succeeds(&mut setup.train(&run, &WIDE));
        let newest = checkpoint_dir(&run, STEPS);
        damage(&newest.join(file));
        let mut cmd = sample(&newest, &setup.path("s.png"), &ONE_QUICK_IMAGE);
        fails(&mut cmd, 1, &[file, "corrupt"]);
        let log = succeeds(&mut resume(&run, &[]));
        assert!(
            log.contains("WARN")
                && log.contains("skipping a damaged checkpoint")
                && log.contains(file),
            "{file}: no warning:\n{log}"
        );
        assert!(log.contains("using the older checkpoint"), "{file}:\n{log}");
        assert!(
            log.contains(&format!("at step {}", STEPS / 2)),
            "{file}:\n{log}"
        );
        assert_eq!(
            &file_sums(&run, STEPS),
            want,
            "{file}: the re-trained state differs"
        );
    }
}

/// Training into a tmpfs with room for one checkpoint and a half: the second checkpoint's
/// write fails with a clear error, leaves no partial directory, and the first checkpoint still
/// loads. Needs root (mount); skipped with the reason printed otherwise.
#[test]
fn a_full_disk_stops_with_a_clear_error_and_keeps_the_previous_checkpoint() {
    let setup = Setup::new(3 * EVERY, EVERY);
    // One checkpoint's size on a tmpfs, counted in 4 KiB pages, from a run on the normal disk.
    let probe = setup.path("probe");
    succeeds(&mut setup.train(&probe, &["--steps", &EVERY.to_string()]));
    let pages: u64 = std::fs::read_dir(checkpoint_dir(&probe, EVERY))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len().div_ceil(4096))
        .sum();
    let disk = setup.path("disk");
    let Some(_unmount) = tmpfs(&disk, pages + pages / 2 + 16, false) else {
        return;
    };
    let run = disk.join("run");
    fails(
        &mut setup.train(&run, &[]),
        1,
        &[
            &format!("step-{:07}", 2 * EVERY),
            "earlier checkpoints are intact",
            "No space left on device",
        ],
    );
    assert_eq!(checkpoint_steps(&run), vec![EVERY]);
    assert!(tmp_dirs(&run).is_empty(), "{:?}", tmp_dirs(&run));
    succeeds(&mut sample(
        &checkpoint_dir(&run, EVERY),
        &setup.path("s.png"),
        &ONE_QUICK_IMAGE,
    ));
    assert_eq!(file_sums(&run, EVERY), file_sums(&probe, EVERY));
}

/// A learning rate of 1e30 makes the loss non-finite within a few steps. The run stops naming
/// that step, whether the loss is checked at once (log every step) or only at the next
/// log/checkpoint; no checkpoint at or after it exists, and the newest one loads. With
/// --skip-nonfinite the batches are skipped with a warning until 50 in a row give up.
#[test]
fn a_non_finite_loss_stops_with_its_step_and_keeps_the_last_good_checkpoint() {
    let setup = Setup::new(10, 1);
    let run = setup.path("run");
    let line = fails(
        &mut setup.train(&run, &["--lr", "1e30"]),
        1,
        &["the loss is not finite", "at step"],
    );
    let step: u64 = line
        .split("at step ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no step number in {line:?}"));
    let kept = checkpoint_steps(&run);
    assert!(
        !kept.is_empty() && kept.iter().all(|&s| s < step),
        "{kept:?} vs step {step}"
    );
    succeeds(&mut sample(&run, &setup.path("s.png"), &ONE_QUICK_IMAGE));

    // Checked only when logging (every 7) or checkpointing (every 5): the same step is named
    // and the checkpoint due after it is not written.
    let late = setup.path("late");
    let cfg = setup.path("late.toml");
    let text = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("log_every = 1", "log_every = 7");
    std::fs::write(&cfg, text).unwrap();
    let mut cmd = ddpm();
    cmd.arg("train")
        .arg("--config")
        .arg(&cfg)
        .arg("--out")
        .arg(&late)
        .args(["--lr", "1e30", "--checkpoint-every", "5"]);
    fails(&mut cmd, 1, &[&format!("at step {step};")]);
    assert!(checkpoint_steps(&late).iter().all(|&s| s < step));

    let skip = setup.path("skip");
    let mut cmd = setup.train(
        &skip,
        &["--lr", "1e30", "--skip-nonfinite", "--steps", "80"],
    );
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("batch skipped"), "{stderr}");
    let error = stderr.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(
        error.contains("the last 50 batches") && error.contains("diverged"),
        "{error}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
