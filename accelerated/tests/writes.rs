//! Writes and reads under hostile conditions, with the real `ddpm` binary (issue 14, items 2
//! and 7). Every output (sample grid, `--each` files, the trainer's grid, metrics.jsonl, the
//! run's config.toml, the quality table) on a full file system or on a target that fails
//! every write (`/dev/full`) must end with exit status 1, an error naming the file, no
//! "wrote"/"trained" line and no 0-byte or partial file under the final name. Untrusted
//! files (a config, a checkpoint's files) that are a link to `/dev/zero`, a FIFO or longer
//! than their format allows must be refused at once. Each run is bounded in time. The full
//! file systems are small tmpfs mounts (root only; skipped with the reason printed
//! otherwise). Tabulated in docs/reliability.md.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every run here ends within this (a hang is a failure, not a stuck test).
const LIMIT: Duration = Duration::from_secs(60);

/// Sampling one image in two steps.
const ONE_QUICK_IMAGE: [&str; 4] = ["--n", "1", "--steps", "2"];

/// How a bounded run ended.
struct Ended {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `cmd` with its output in files under `dir`, killing it after [`LIMIT`].
fn run_bounded(cmd: &mut Command, dir: &Path) -> Ended {
    let (out, err) = (dir.join("stdout.txt"), dir.join("stderr.txt"));
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("cannot start ddpm");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ddpm did not end within {LIMIT:?}; stderr so far:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ended {
        code: status.code(),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
        took: start.elapsed(),
    }
}

/// Runs `cmd` (bounded) and asserts exit status 1, an `error:` line holding every one of
/// `needles`, no panic and nothing on stdout saying that something was written or trained.
fn fails_bounded(cmd: &mut Command, dir: &Path, needles: &[&str]) -> Ended {
    let ended = run_bounded(cmd, dir);
    let all = format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        ended.code, ended.stdout, ended.stderr
    );
    assert_eq!(ended.code, Some(1), "wrong exit status: {all}");
    assert!(
        !ended.stderr.contains("panicked") && !ended.stderr.contains("internal failure"),
        "a panic instead of an error: {all}"
    );
    assert!(
        !ended.stdout.contains("wrote") && !ended.stdout.contains("trained"),
        "claims success: {all}"
    );
    let error = ended
        .stderr
        .lines()
        .skip_while(|l| !l.starts_with("error:"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!error.is_empty(), "no `error:` line: {all}");
    for needle in needles {
        assert!(
            error.contains(needle),
            "the error does not say {needle:?}: {all}"
        );
    }
    ended
}

/// The regular files under `dir` (recursively), except the filler, as (path, length).
fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            found.extend(files_under(&path));
        } else if path
            .file_name()
            .is_some_and(|n| n != ".filler" && n != ddpm::train::LOCK_FILE)
        {
            found.push((path, meta.len()));
        }
    }
    found
}

/// A tiny finished run of 4 steps (one checkpoint) in `setup`.
fn trained(setup: &Setup) -> PathBuf {
    let run = setup.path("run");
    succeeds(&mut setup.train(&run, &["--steps", "4"]));
    run
}

#[test]
fn sample_grid_and_each_files_on_a_full_disk_fail_and_leave_no_file() {
    let setup = Setup::new(4, 4);
    let run = trained(&setup);
    let disk = setup.path("disk");
    let Some(_mount) = tmpfs(&disk, 4, true) else {
        return;
    };
    let out = disk.join("s.png");
    fails_bounded(
        &mut sample(&run, &out, &ONE_QUICK_IMAGE),
        setup.dir.path(),
        &["s.png", "No space left on device"],
    );
    assert!(!out.exists(), "a file was left under the final name");
    let each = disk.join("each");
    fails_bounded(
        sample(&run, &setup.path("grid.png"), &["--n", "3", "--steps", "2"])
            .arg("--each")
            .arg(&each),
        setup.dir.path(),
        &["00000.png", "No space left on device"],
    );
    assert_eq!(files_under(&disk), vec![], "files left on the full disk");
}

#[test]
fn sample_into_a_target_that_fails_every_write_is_an_error() {
    let setup = Setup::new(4, 4);
    let run = trained(&setup);
    let link = setup.path("full.png");
    std::os::unix::fs::symlink("/dev/full", &link).unwrap();
    fails_bounded(
        &mut sample(&run, &link, &ONE_QUICK_IMAGE),
        setup.dir.path(),
        &["full.png", "No space left on device"],
    );
    // --each into a directory whose files are all links to /dev/full.
    let each = setup.path("each");
    std::fs::create_dir_all(&each).unwrap();
    std::os::unix::fs::symlink("/dev/full", each.join("00000.png")).unwrap();
    fails_bounded(
        sample(&run, &setup.path("ok.png"), &ONE_QUICK_IMAGE)
            .arg("--each")
            .arg(&each),
        setup.dir.path(),
        &["00000.png", "No space left on device"],
    );
}

#[test]
fn the_runs_config_on_a_full_disk_fails_and_leaves_no_file() {
    let setup = Setup::new(4, 4);
    let disk = setup.path("disk");
    let Some(_mount) = tmpfs(&disk, 4, true) else {
        return;
    };
    let run = disk.join("run");
    fails_bounded(
        &mut setup.train(&run, &[]),
        setup.dir.path(),
        &["config.toml", "No space left on device"],
    );
    assert_eq!(files_under(&disk), vec![], "files left on the full disk");
}

#[test]
fn metrics_on_a_full_disk_fail_and_leave_only_whole_lines() {
    // Three pages: the lock file's pid, config.toml, and metrics.jsonl, which fills after a
    // few dozen lines; no checkpoint is due before.
    let setup = Setup::new(400, 400);
    // The loss curve (a PNG of several pages) would fill the disk first: off here, its own
    // full-disk test is in outputs.rs.
    let mut text = std::fs::read_to_string(&setup.config).unwrap();
    text.push_str("plot_loss = false\n");
    std::fs::write(&setup.config, text).unwrap();
    let disk = setup.path("disk");
    let Some(_mount) = tmpfs(&disk, 3, false) else {
        return;
    };
    let run = disk.join("run");
    fails_bounded(
        &mut setup.train(&run, &[]),
        setup.dir.path(),
        &["metrics.jsonl", "No space left on device"],
    );
    let steps = logged_steps(&run); // panics on a line that is not whole JSON
    assert!(!steps.is_empty());
    assert_eq!(steps, (1..=steps.len() as u64).collect::<Vec<_>>());
    assert!(std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .ends_with('\n'));
    assert!(
        std::fs::read_to_string(run.join("config.toml"))
            .unwrap()
            .contains("[train]"),
        "config.toml is not whole"
    );
}

#[test]
fn a_metrics_log_that_is_a_device_is_refused() {
    let setup = Setup::new(4, 4);
    let run = setup.path("run");
    std::fs::create_dir_all(&run).unwrap();
    // /dev/full reads as endless zeros and fails every write.
    std::os::unix::fs::symlink("/dev/full", run.join("metrics.jsonl")).unwrap();
    fails_bounded(
        &mut setup.train(&run, &[]),
        setup.dir.path(),
        &["metrics.jsonl", "not a regular file"],
    );
}

#[test]
fn the_training_grid_on_a_full_disk_fails_and_leaves_no_file() {
    let setup = Setup::new(4, 4);
    let run = setup.path("run");
    let samples = run.join("samples");
    let Some(_mount) = tmpfs(&samples, 4, true) else {
        return;
    };
    fails_bounded(
        &mut setup.train(&run, &["--sample-every", "2"]),
        setup.dir.path(),
        &["samples", "No space left on device"],
    );
    assert_eq!(files_under(&samples), vec![], "files left on the full disk");
}

#[test]
fn a_config_that_is_a_link_to_dev_zero_or_a_fifo_is_refused_at_once() {
    let setup = Setup::new(4, 4);
    let zero = setup.path("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let fifo = setup.path("fifo.toml");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let huge = setup.path("huge.toml");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    for (config, needle) in [
        (&zero, "not a regular file"),
        (&fifo, "not a regular file"),
        (&huge, "more than the"),
    ] {
        let mut cmd = ddpm();
        cmd.arg("train")
            .arg("--config")
            .arg(config)
            .arg("--out")
            .arg(setup.path("run"));
        let ended = fails_bounded(
            &mut cmd,
            setup.dir.path(),
            &["the config file", &config.display().to_string(), needle],
        );
        assert!(
            ended.took < Duration::from_secs(20),
            "took {:?}",
            ended.took
        );
    }
}

#[test]
fn checkpoint_files_that_are_endless_fifos_or_too_long_are_refused_at_once() {
    let setup = Setup::new(4, 4);
    let run = trained(&setup);
    let ckpt = checkpoint_dir(&run, 4);
    let model = ckpt.join("model.safetensors");
    let saved = std::fs::read(&model).unwrap();
    type Make<'a> = &'a dyn Fn(&Path);
    let cases: [(&str, Make, &str); 3] = [
        (
            "a link to /dev/zero",
            &|p| std::os::unix::fs::symlink("/dev/zero", p).unwrap(),
            "not a regular file",
        ),
        (
            "a FIFO",
            &|p| assert!(Command::new("mkfifo").arg(p).status().unwrap().success()),
            "not a regular file",
        ),
        (
            "16 GiB (sparse)",
            &|p| {
                let f = std::fs::File::create(p).unwrap();
                f.set_len(16 << 30).unwrap();
            },
            "more than the",
        ),
    ];
    for (what, make, needle) in cases {
        std::fs::remove_file(&model).unwrap();
        make(&model);
        let ended = fails_bounded(
            &mut sample(&ckpt, &setup.path("s.png"), &ONE_QUICK_IMAGE),
            setup.dir.path(),
            &["model.safetensors", needle],
        );
        assert!(
            ended.took < Duration::from_secs(20),
            "{what}: took {:?}",
            ended.took
        );
        assert!(!setup.path("s.png").exists(), "{what}: wrote a grid");
    }
    // The manifest itself as a link to /dev/zero.
    std::fs::remove_file(&model).unwrap();
    std::fs::write(&model, saved).unwrap();
    succeeds(&mut sample(&ckpt, &setup.path("s.png"), &ONE_QUICK_IMAGE));
    let manifest = ckpt.join("manifest.json");
    std::fs::remove_file(&manifest).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &manifest).unwrap();
    fails_bounded(
        &mut sample(&ckpt, &setup.path("t.png"), &ONE_QUICK_IMAGE),
        setup.dir.path(),
        &["manifest.json", "not a regular file"],
    );
}
