//! The sampler choice with the real `ddpm` binary (issue 18): `--sampler ancestral|ddim|dpm++2m`
//! and `--spacing strided|linspace|leading|trailing` (`sample.sampler`, `sample.spacing`) for
//! `ddpm sample` and the training grids; today's behaviour stays the default; the settings
//! DPM-Solver++ cannot take are errors naming the flag.

mod common;

use common::*;
use std::path::PathBuf;

fn trained(setup: &Setup) -> PathBuf {
    let run = setup.path("run");
    succeeds(&mut setup.train(&run, &["--steps", "2"]));
    run
}

fn bytes(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn sampler_and_spacing_choices_draw_and_keep_the_defaults() {
    let setup = Setup::new(2, 2);
    let run = trained(&setup);
    let draw = |name: &str, extra: &[&str]| {
        let out = setup.path(name);
        let mut args = vec!["--n", "4", "--seed", "3"];
        args.extend_from_slice(extra);
        succeeds(&mut sample(&run, &out, &args));
        bytes(&out)
    };
    // `--sampler ddim` without --eta is DDIM η = 0, i.e. today's `--eta 0`.
    let eta0 = draw("eta0.png", &["--steps", "5", "--eta", "0"]);
    assert_eq!(
        draw("ddim.png", &["--steps", "5", "--sampler", "ddim"]),
        eta0
    );
    // `--spacing strided` is the default list.
    let plain = draw("plain.png", &["--steps", "5"]);
    assert_eq!(
        draw("strided.png", &["--steps", "5", "--spacing", "strided"]),
        plain
    );
    assert_eq!(
        draw("ancestral.png", &["--steps", "5", "--sampler", "ancestral"]),
        plain
    );
    // DPM-Solver++(2M) draws, deterministically for a seed, and differently from DDIM.
    let dpm = draw("dpm.png", &["--steps", "5", "--sampler", "dpm++2m"]);
    assert_eq!(
        draw("dpm2.png", &["--steps", "5", "--sampler", "dpm++2m"]),
        dpm
    );
    assert_ne!(dpm, eta0);
    for spacing in ["linspace", "leading", "trailing"] {
        let name = format!("dpm-{spacing}.png");
        let args = ["--steps", "5", "--sampler", "dpm++2m", "--spacing", spacing];
        assert!(!draw(&name, &args).is_empty());
    }
    // The trailing list differs from the strided one (T = 20, 5 steps: 20, 16, 12, 8, 4 against
    // 20, 15, 11, 6, 1), so the images do.
    assert_ne!(
        draw("trailing.png", &["--steps", "5", "--spacing", "trailing"]),
        plain
    );
}

#[test]
fn settings_dpm_solver_cannot_take_are_errors_naming_the_flag() {
    let setup = Setup::new(2, 2);
    let run = trained(&setup);
    let out = setup.path("s.png");
    fails(
        &mut sample(&run, &out, &["--sampler", "dpm++2m"]),
        1,
        &["sample.steps = absent (all T = 20)", "DPM-Solver++(2M)"],
    );
    fails(
        &mut sample(&run, &out, &["--sampler", "dpm++2m", "--steps", "20"]),
        1,
        &["sample.steps (--steps) = 20", "T − 1 = 19"],
    );
    fails(
        &mut sample(
            &run,
            &out,
            &["--sampler", "dpm++2m", "--steps", "5", "--eta", "0.5"],
        ),
        1,
        &["sample.sampler (--sampler)", "sample.eta = 0.5"],
    );
    fails(
        &mut sample(&run, &out, &["--sampler", "ancestral", "--eta", "0"]),
        1,
        &["sample.sampler (--sampler)"],
    );
    fails(
        &mut sample(&run, &out, &["--sampler", "heun"]),
        2,
        &["heun"],
    );
    fails(
        &mut sample(&run, &out, &["--spacing", "karras"]),
        2,
        &["karras"],
    );
    // Trailing visits all T: DPM-Solver++ may take T steps there.
    succeeds(&mut sample(
        &run,
        &out,
        &["--n", "2", "--sampler", "dpm++2m", "--spacing", "trailing"],
    ));
    assert!(out.is_file());
}

#[test]
fn training_grids_use_the_chosen_sampler() {
    let setup = Setup::new(2, 2);
    let run = setup.path("run");
    succeeds(&mut setup.train(
        &run,
        &["--steps", "2", "--sampler", "dpm++2m", "--grid-steps", "5"],
    ));
    assert!(run.join("samples").join("step-0000002.png").is_file());
    let saved = std::fs::read_to_string(checkpoint_dir(&run, 2).join("config.toml")).unwrap();
    assert!(saved.contains("sampler = \"dpm++2m\""), "{saved}");
    // A grid count DPM-Solver++ cannot take is refused before training.
    fails(
        &mut setup.train(
            &setup.path("run2"),
            &["--steps", "2", "--sampler", "dpm++2m", "--grid-steps", "20"],
        ),
        1,
        &["train.grid_steps (--grid-steps) = 20"],
    );
}
