//! `ddpm score`: its flags, their mapping onto `ddpm::quality::score::ScoreOptions`, and the
//! run with the binary's progress bar.

use crate::cli::{finite, whole, DeviceArg};
use crate::progress::Bar;
use anyhow::Context;
use clap::Args;
use ddpm::error::DdpmError;
use ddpm::quality::score::{self, ScoreOptions};
use std::path::PathBuf;

/// `ddpm score`: FD-MNIST, confident share and entropies of one mnist checkpoint's samples.
#[derive(Debug, Clone, Args)]
pub struct ScoreArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long, default_value = "runs/mnist", value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Output directory for score.json and grid.png [default: score/ in the run directory].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Where the seed-0 classifier is cached [default: quality/ in the run directory, as
    /// `ddpm quality`].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Sampling steps (strided below T), in place of the run's sample.steps; the other
    /// sample.* settings are the run's.
    #[arg(long, default_value_t = 100, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub steps: usize,
    /// Images sampled; the FD floor draws as many training images.
    #[arg(long, default_value_t = 400, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub samples: usize,
    /// Seed of the sampler (batch k uses seed + k), the floor's draw and the bootstrap.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub seed: u64,
    /// Images per network batch.
    #[arg(long, default_value_t = 200, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub batch: usize,
    /// Bootstrap resamples of the FD interval.
    #[arg(long, default_value_t = 200, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub bootstrap: usize,
    /// A sample counts as confident when its most likely class has probability at least this.
    #[arg(long, default_value_t = score::CONFIDENT, allow_hyphen_values = true, value_parser = finite)]
    pub threshold: f64,
    /// Images in the grid (the first ones sampled; 0: none).
    #[arg(long, default_value_t = 36, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub grid: usize,
    /// The step rule in place of the run's sample.sampler: ancestral, ddim (η = the run's
    /// sample.eta, else 0) or dpm++2m [default: the run's].
    #[arg(long, value_name = "RULE", value_parser = ["ancestral", "ddim", "dpm++2m"])]
    pub sampler: Option<String>,
    /// A conditional run's guidance weight w ≥ 0 (0: plain conditional), in place of its
    /// sample.guidance; the samples take every class in turn, so each is drawn equally often.
    #[arg(long, value_name = "W", allow_hyphen_values = true, value_parser = finite)]
    pub guidance: Option<f64>,
}

impl ScoreArgs {
    /// The library's options for these flags.
    pub fn options(&self) -> ScoreOptions {
        ScoreOptions {
            checkpoint: self.checkpoint.clone(),
            out: self.out.clone(),
            cache: self.cache.clone(),
            steps: self.steps,
            samples: self.samples,
            seed: self.seed,
            batch: self.batch,
            bootstrap: self.bootstrap,
            threshold: self.threshold,
            grid: self.grid,
            sampler: self.sampler.as_deref().map(|name| match name {
                "ddim" => ddpm::config::SamplerKind::Ddim,
                "dpm++2m" => ddpm::config::SamplerKind::DpmSolver2M,
                _ => ddpm::config::SamplerKind::Ancestral,
            }),
            guidance: self.guidance,
        }
    }
}

/// The flag behind an option key a score error names.
fn score_flag(key: &str) -> Option<&'static str> {
    Some(match key {
        "steps" => "--steps",
        "samples" => "--samples",
        "batch" => "--batch",
        "bootstrap" => "--bootstrap",
        "threshold" => "--threshold",
        "sample.guidance" => "--guidance",
        _ => return None,
    })
}

/// A library error of `ddpm score`, prefixed with the flag to change where it names one.
fn score_error(e: DdpmError) -> anyhow::Error {
    let flag = match &e {
        DdpmError::OutOfRange { key, .. } | DdpmError::Incompatible { key, .. } => score_flag(key),
        // Only a guidance weight asks an unconditional run for classes.
        DdpmError::NotConditional { .. } => Some("--guidance"),
        _ => None,
    };
    match flag {
        Some(flag) => anyhow::Error::new(e).context(flag),
        None => anyhow::Error::new(e),
    }
}

/// `ddpm score`: measures, writes score.json and grid.png, prints the one-line summary.
pub fn run_score(args: &ScoreArgs, device: DeviceArg, progress: bool) -> anyhow::Result<()> {
    let device = device.resolve()?;
    let mut bar = Bar::new(progress);
    let report = score::run(&args.options(), device, &mut bar)
        .map_err(score_error)
        .with_context(|| format!("scoring {}", args.checkpoint.display()))?;
    let out = score::out_dir(
        args.out.as_deref(),
        std::path::Path::new(&report.checkpoint),
    );
    println!(
        "{}; wrote {} and {}",
        report.summary(),
        out.join(score::REPORT_FILE).display(),
        out.join(score::GRID_FILE).display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn score_flags_map_onto_the_library_options() {
        let cli = Cli::try_parse_from(["ddpm", "score"]).unwrap();
        let Command::Score(args) = cli.command else {
            panic!("not score")
        };
        assert_eq!(
            args.options(),
            ScoreOptions::default(),
            "the flags' defaults are the library's"
        );
        let e = score_error(DdpmError::OutOfRange {
            key: "samples",
            value: "1".into(),
            expected: "at least 2".into(),
        });
        assert_eq!(
            format!("{e:#}"),
            "--samples: samples = 1 is out of range: it must be at least 2"
        );
    }
}
