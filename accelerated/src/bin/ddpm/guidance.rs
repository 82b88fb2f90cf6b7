//! `ddpm guidance`: its flags onto `ddpm::quality::conditional::GuidanceOptions`, and the run
//! with the binary's progress bar.

use crate::cli::{finite, whole, DeviceArg};
use crate::progress::Bar;
use anyhow::Context;
use clap::Args;
use ddpm::error::DdpmError;
use ddpm::quality::conditional::{self, GuidanceOptions};
use std::path::PathBuf;

/// `ddpm guidance`: class accuracy and FD-MNIST of a conditional mnist run for each guidance
/// weight, with a grid per weight.
#[derive(Debug, Clone, Args)]
pub struct GuidanceArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long, default_value = "runs/mnist", value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Output directory for guidance.json, guidance.md and the grids [default: guidance/ in
    /// the run directory].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Where the seed-0 classifier is cached [default: quality/ in the run directory, as
    /// `ddpm quality` and `ddpm score`].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// The guidance weights, comma-separated.
    #[arg(long, value_name = "W,…", value_delimiter = ',', default_values_t = conditional::WEIGHTS, allow_hyphen_values = true, value_parser = finite)]
    pub weights: Vec<f64>,
    /// Sampling steps (strided below T); the other sample.* settings are the run's.
    #[arg(long, default_value_t = 100, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub steps: usize,
    /// Images drawn of each class for each weight.
    #[arg(long, default_value_t = 100, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub per_class: usize,
    /// Seed of the sampler (the same noise for every weight).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub seed: u64,
    /// Images a class in each grid.
    #[arg(long, default_value_t = 10, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub grid: usize,
}

impl GuidanceArgs {
    /// The library's options for these flags.
    pub fn options(&self) -> GuidanceOptions {
        GuidanceOptions {
            checkpoint: self.checkpoint.clone(),
            out: self.out.clone(),
            cache: self.cache.clone(),
            weights: self.weights.clone(),
            steps: self.steps,
            per_class: self.per_class,
            seed: self.seed,
            grid: self.grid,
        }
    }
}

/// `ddpm guidance`: measures, writes the report, prints its table.
pub fn run_guidance(args: &GuidanceArgs, device: DeviceArg, progress: bool) -> anyhow::Result<()> {
    let device = device.resolve()?;
    let mut bar = Bar::new(progress);
    let report = conditional::run(&args.options(), device, &mut bar)
        .map_err(|e| match &e {
            DdpmError::OutOfRange { key, .. } => {
                let flag = match *key {
                    "weights" => "--weights",
                    "per_class" => "--per-class",
                    "steps" => "--steps",
                    _ => return anyhow::Error::new(e),
                };
                anyhow::Error::new(e).context(flag)
            }
            _ => anyhow::Error::new(e),
        })
        .with_context(|| format!("measuring guidance on {}", args.checkpoint.display()))?;
    println!("{}", report.markdown());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn guidance_flags_map_onto_the_library_options() {
        let cli = Cli::try_parse_from(["ddpm", "guidance"]).unwrap();
        let Command::Guidance(args) = cli.command else {
            panic!("not guidance")
        };
        assert_eq!(args.options(), GuidanceOptions::default());
        let cli = Cli::try_parse_from(["ddpm", "guidance", "--weights", "0,3", "--per-class", "5"])
            .unwrap();
        let Command::Guidance(args) = cli.command else {
            panic!("not guidance")
        };
        assert_eq!(
            (args.options().weights, args.options().per_class),
            (vec![0.0, 3.0], 5)
        );
    }
}
