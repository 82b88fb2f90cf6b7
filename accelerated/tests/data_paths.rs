//! A run follows its data (issue 14, item 4), tried on the real `ddpm` binary: the data path
//! is saved absolute, so a run resumes, evaluates and samples from any working directory; a
//! folder that moved is named with `--resume --data NEW` and, holding the same images, the run
//! ends bitwise where an uninterrupted one ends; images added, removed or changed are refused
//! on resume, naming the change, with nothing in the run directory touched, unless
//! `--allow-data-change`; a checkpoint from before the fingerprint still resumes. Tabulated in
//! docs/reliability.md.

mod common;

use common::*;
use image::Luma;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The sha256 of every file under `run` by its relative path, but the lock file: its content
/// is the pid of the last process that took the lock (train takes it before reading anything).
fn tree_sums(run: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.file_name().is_some_and(|n| n != ".lock") {
                let sum = Sha256::digest(std::fs::read(&path).unwrap());
                let hex = sum.iter().map(|b| format!("{b:02x}")).collect();
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), hex);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(run, run, &mut out);
    out
}

/// The manifest of checkpoint `step` of `run`, as JSON.
fn manifest(run: &Path, step: u64) -> serde_json::Value {
    let text = std::fs::read_to_string(checkpoint_dir(run, step).join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Copies the files of folder `from` into a new folder `to`.
fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Sets one pixel of the grey PNG at `path` to a value it did not have.
fn change_one_pixel(path: &Path) {
    let mut img = image::open(path).unwrap().to_luma8();
    let Luma([v]) = *img.get_pixel(3, 5);
    img.put_pixel(3, 5, Luma([v.wrapping_add(128)]));
    img.save(path).unwrap();
}

/// Trained from the scratch directory with relative `--data images` and `--out run`; then,
/// from another working directory, resumed, evaluated and sampled (before: the saved
/// `data.path = "images"` was looked up in the new working directory, "does not exist").
/// Eval of a run whose images changed warns that its held-out split is another.
#[test]
fn a_run_given_relative_paths_resumes_evaluates_and_samples_from_another_directory() {
    let setup = Setup::new(4, 2);
    let mut cmd = ddpm();
    cmd.current_dir(setup.dir.path()).args([
        "train",
        "--config",
        "tiny.toml",
        "--out",
        "run",
        "--data",
        "images",
        "--holdout",
        "4",
    ]);
    succeeds(&mut cmd);
    let run = setup.path("run");
    let images = std::fs::canonicalize(setup.path("images")).unwrap();
    let m = manifest(&run, 4);
    assert_eq!(m["config"]["data"]["path"], images.to_str().unwrap());
    assert_eq!(m["data"]["path_given"], "images");
    assert_eq!(m["data"]["fingerprint"]["count"], 16);
    assert_eq!(
        m["data"]["fingerprint"]["shape"],
        serde_json::json!([1, 8, 8])
    );
    let saved: toml::Table =
        toml::from_str(&std::fs::read_to_string(run.join("config.toml")).unwrap()).unwrap();
    assert_eq!(
        saved["data"]["path"].as_str(),
        images.to_str(),
        "the run's config.toml"
    );

    let elsewhere = setup.path("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let out = ddpm()
        .current_dir(&elsewhere)
        .args(["eval", "--quick", "1", "--checkpoint"])
        .arg(&run)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains("over 4 held-out images"),
        "eval from elsewhere: {report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    succeeds(
        sample(
            &run,
            &elsewhere.join("s.png"),
            &["--n", "1", "--steps", "2"],
        )
        .current_dir(&elsewhere),
    );
    succeeds(resume(&run, &["--steps", "6"]).current_dir(&elsewhere));
    assert_eq!(checkpoint_steps(&run).last(), Some(&6));
    assert_eq!(
        manifest(&run, 6)["data"]["path_given"],
        "images",
        "a resume without --data keeps the place as first given"
    );
    // An image added since: eval still runs, and warns that the held-out split moved.
    std::fs::copy(setup.path("images/000.png"), setup.path("images/016.png")).unwrap();
    let said = succeeds(
        ddpm()
            .current_dir(&elsewhere)
            .args(["eval", "--quick", "1", "--checkpoint"])
            .arg(&run),
    );
    assert!(
        said.contains("16 images in the run, 17 now, 1 added")
            && said.contains("not the ones the run held out"),
        "{said}"
    );
}

/// The image folder moves after 3 of 6 steps: `--resume` alone says where it looked;
/// `--resume --data NEW` continues and ends with the weights, EMA and LAMB state of an
/// uninterrupted run (before: "--data: data.path = … here, … in the run" refused it).
#[test]
fn a_moved_folder_resumes_with_data_new_and_ends_bitwise_where_an_uninterrupted_run_ends() {
    let setup = Setup::new(6, 3);
    let whole = setup.path("whole");
    succeeds(&mut setup.train(&whole, &[]));
    let part = setup.path("part");
    succeeds(&mut setup.train(&part, &["--steps", "3"]));
    let moved = setup.path("moved");
    std::fs::rename(setup.path("images"), &moved).unwrap();
    let before = tree_sums(&part);
    fails(
        &mut resume(&part, &["--steps", "6"]),
        1,
        &["images", "does not exist"],
    );
    assert_eq!(tree_sums(&part), before, "a failed resume wrote nothing");
    succeeds(resume(&part, &["--steps", "6", "--data"]).arg(&moved));
    assert_eq!(
        state_sums(&part, 6),
        state_sums(&whole, 6),
        "the resumed run ends where the uninterrupted one does"
    );
    assert_eq!(file_sums(&part, 6), state_sums(&part, 6));
    let m = manifest(&part, 6);
    assert_eq!(
        m["config"]["data"]["path"],
        std::fs::canonicalize(&moved).unwrap().to_str().unwrap()
    );
    assert_eq!(m["data"]["path_given"], moved.to_str().unwrap());
    assert_eq!(
        m["data"]["fingerprint"],
        manifest(&whole, 6)["data"]["fingerprint"]
    );
}

/// Between two runs of one folder an image is added, one removed, one pixel of one changed:
/// each `--resume` is refused naming the change, exit status 1, every file of the run
/// directory unchanged (before: all three resumed with exit 0, the epoch and split changed).
/// With `--allow-data-change` it continues and records the new data, which a later resume
/// then holds it to.
#[test]
fn added_removed_or_changed_images_are_refused_naming_the_change_unless_allowed() {
    let setup = Setup::new(3, 3);
    let run = setup.path("run");
    succeeds(&mut setup.train(&run, &[]));
    let images = setup.path("images");
    let before = tree_sums(&run);
    let refused = |cmd: &mut std::process::Command, change: &str| {
        fails(
            cmd,
            1,
            &[
                "does not hold the data the run was trained on",
                change,
                "--allow-data-change",
            ],
        );
        assert_eq!(
            tree_sums(&run),
            before,
            "{change}: the run directory changed"
        );
    };

    let extra = setup.path("extra");
    grey_pngs(&extra, 1, 8, 99);
    std::fs::copy(extra.join("000.png"), images.join("100.png")).unwrap();
    refused(
        &mut resume(&run, &["--steps", "6"]),
        "16 images in the run, 17 now, 1 added",
    );
    std::fs::remove_file(images.join("100.png")).unwrap();

    std::fs::rename(images.join("004.png"), extra.join("004.png")).unwrap();
    std::fs::rename(images.join("011.png"), extra.join("011.png")).unwrap();
    refused(
        &mut resume(&run, &["--steps", "6"]),
        "16 images in the run, 14 now, 2 removed",
    );
    std::fs::rename(extra.join("004.png"), images.join("004.png")).unwrap();
    std::fs::rename(extra.join("011.png"), images.join("011.png")).unwrap();

    let changed = setup.path("changed");
    copy_folder(&images, &changed);
    change_one_pixel(&changed.join("007.png"));
    refused(
        resume(&run, &["--steps", "6", "--data"]).arg(&changed),
        "same count (16) and shape, different content",
    );

    // The override only goes with --resume.
    fails(
        &mut setup.train(&setup.path("fresh"), &["--allow-data-change"]),
        2,
        &["--resume"],
    );
    let said =
        succeeds(resume(&run, &["--steps", "6", "--allow-data-change", "--data"]).arg(&changed));
    assert!(
        said.contains("does not hold the data the run was trained on")
            && said.contains("continuing on them as asked"),
        "{said}"
    );
    let (old, new) = (manifest(&run, 3), manifest(&run, 6));
    assert_eq!(new["data"]["fingerprint"]["count"], 16);
    assert_ne!(
        new["data"]["fingerprint"]["sha256"], old["data"]["fingerprint"]["sha256"],
        "the new data are recorded"
    );
    // Held to the new data from now on: the changed folder resumes, the old one is refused.
    let said = succeeds(&mut resume(&run, &["--steps", "7"]));
    assert!(!said.contains("does not hold"), "{said}");
    let before = tree_sums(&run);
    fails(
        resume(&run, &["--steps", "8", "--data"]).arg(&images),
        1,
        &["same count (16) and shape, different content"],
    );
    assert_eq!(tree_sums(&run), before);
}

/// A checkpoint written before the fingerprint (no `data` in its manifest, `data.path` saved
/// relative as it was given) still resumes from the directory it was given in, with a
/// warning; the checkpoints written then record the data and the absolute path.
#[test]
fn a_checkpoint_without_a_fingerprint_still_resumes_with_a_warning() {
    let setup = Setup::new(3, 3);
    let run = setup.path("run");
    succeeds(&mut setup.train(&run, &[]));
    let dir = checkpoint_dir(&run, 3);
    let mut m = manifest(&run, 3);
    m.as_object_mut().unwrap().remove("data");
    m["config"]["data"]["path"] = "images".into();
    let json = serde_json::to_vec_pretty(&m).unwrap();
    std::fs::write(dir.join("manifest.json"), &json).unwrap();
    let sum: String = Sha256::digest(&json)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(dir.join("manifest.sha256"), sum).unwrap();

    let said = succeeds(resume(&run, &["--steps", "5"]).current_dir(setup.dir.path()));
    assert!(
        said.contains("records no fingerprint of its data"),
        "{said}"
    );
    let new = manifest(&run, 5);
    assert_eq!(new["data"]["fingerprint"]["count"], 16);
    assert_eq!(new["data"]["path_given"], "images");
    assert_eq!(
        new["config"]["data"]["path"],
        std::fs::canonicalize(setup.path("images"))
            .unwrap()
            .to_str()
            .unwrap()
    );
}
