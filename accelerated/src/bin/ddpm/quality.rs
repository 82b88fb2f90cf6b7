//! `ddpm quality`: its flags, their mapping onto `ddpm::quality::Options`, and the run with
//! the binary's progress bar.

use crate::cli::{whole, DeviceArg};
use crate::progress::Bar;
use anyhow::{bail, Context};
use clap::Args;
use ddpm::error::DdpmError;
use ddpm::{grid, quality};
use std::path::PathBuf;

/// `ddpm quality`: the σ_t × steps table of FD-MNIST, entropies and bits/dim.
#[derive(Debug, Clone, Args)]
pub struct QualityArgs {
    /// A checkpoint directory, or a run directory (its newest good checkpoint is used).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output directory: table.md, table.json and grids/.
    #[arg(long, default_value = "docs/quality")]
    pub out: PathBuf,
    /// A Markdown file whose region between `<!-- quality-table:begin -->` and
    /// `<!-- quality-table:end -->` is replaced by the table.
    #[arg(long)]
    pub doc: Option<PathBuf>,
    /// Where the classifiers are cached (default: quality/ in the run directory).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Feature classifiers, seeds 0..N: seed 0 scores the main table, every one gets its own FD
    /// and paired differences, to show how far a verdict depends on the feature extractor.
    #[arg(long, default_value_t = 5, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub classifiers: usize,
    /// The columns: numbers of sampling steps (strided below T).
    #[arg(long, value_delimiter = ',', default_values_t = vec![50, 100, 250, 1000], allow_hyphen_values = true, value_parser = whole::<usize>)]
    pub steps: Vec<usize>,
    /// Images sampled per cell, one count per column. The defaults put 0.88 M images through
    /// the network in all: 20 minutes on 2 idle CPU cores (docs/quality.md).
    #[arg(long, value_delimiter = ',', default_values_t = vec![500, 400, 160, 80], allow_hyphen_values = true, value_parser = whole::<usize>)]
    pub samples: Vec<usize>,
    /// Step counts of the DDIM η = 0 row (each also a column; none: no DDIM row).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = vec![50, 100], allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub ddim_steps: Vec<usize>,
    /// Held-out images the bound is averaged over (0 skips it).
    #[arg(long, default_value_t = 40, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub bpd_images: usize,
    /// Training images per t for m_t = E‖ε − ε̂‖²/d.
    #[arg(long, default_value_t = 16, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub eps_mse_per_t: usize,
    /// Bootstrap resamples per cell.
    #[arg(long, default_value_t = 200, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub bootstrap: usize,
    /// Images per network batch.
    #[arg(long, default_value_t = 250, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub batch: usize,
    /// Images in each grid.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub grid: usize,
    /// Seed of sampling, m_t and the bootstrap.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub seed: u64,
}

impl QualityArgs {
    /// The library's options for these flags: column i has `--steps`[i] steps and samples
    /// `--samples`[i] images per cell.
    pub fn options(&self) -> anyhow::Result<quality::Options> {
        if self.steps.len() != self.samples.len() {
            bail!(
                "--samples needs one count per column of --steps ({} columns, {} counts)",
                self.steps.len(),
                self.samples.len()
            );
        }
        Ok(quality::Options {
            checkpoint: self.checkpoint.clone(),
            out: self.out.clone(),
            doc: self.doc.clone(),
            cache: self.cache.clone(),
            classifiers: self.classifiers,
            columns: self
                .steps
                .iter()
                .zip(&self.samples)
                .map(|(&steps, &samples)| quality::table::Column { steps, samples })
                .collect(),
            ddim_steps: self.ddim_steps.clone(),
            bpd_images: self.bpd_images,
            eps_mse_per_t: self.eps_mse_per_t,
            bootstrap: self.bootstrap,
            batch: self.batch,
            grid: self.grid,
            seed: self.seed,
        })
    }
}

/// The flag behind an option or plan key that a quality error names.
fn quality_flag(key: &str) -> Option<&'static str> {
    Some(match key {
        "classifiers" => "--classifiers",
        "steps" => "--steps",
        "samples" => "--samples",
        "ddim_steps" => "--ddim-steps",
        "eps_mse_per_t" => "--eps-mse-per-t",
        "bootstrap_reps" => "--bootstrap",
        "batch" => "--batch",
        "grid_images" => "--grid",
        _ => return None,
    })
}

/// A library error of `ddpm quality`, prefixed with the flag to change where it names one.
fn quality_error(e: DdpmError) -> anyhow::Error {
    let flag = match &e {
        DdpmError::OutOfRange { key, .. }
        | DdpmError::Incompatible { key, .. }
        | DdpmError::OutOfMemory { key, .. } => quality_flag(key),
        _ => None,
    };
    match flag {
        Some(flag) => anyhow::Error::new(e).context(flag),
        None => anyhow::Error::new(e),
    }
}

/// Every output of `ddpm quality` can be written, checked before any model work (the
/// default run takes 20 minutes): the --out directory, its table files and grids/, the
/// --doc file and the --cache directory; nothing existing is changed.
fn check_outputs(opts: &quality::Options) -> anyhow::Result<()> {
    let out = |e: DdpmError| anyhow::Error::new(e).context("--out");
    grid::ensure_dir(&opts.out).map_err(out)?;
    grid::ensure_dir(&opts.out.join("grids")).map_err(out)?;
    for name in ["table.md", "table.json"] {
        grid::ensure_writable(&opts.out.join(name)).map_err(out)?;
    }
    if let Some(doc) = opts.doc.as_deref().filter(|d| d.exists()) {
        grid::ensure_writable(doc).map_err(|e| anyhow::Error::new(e).context("--doc"))?;
    }
    if let Some(cache) = &opts.cache {
        grid::ensure_dir(cache).map_err(|e| anyhow::Error::new(e).context("--cache"))?;
    }
    Ok(())
}

/// `ddpm quality`: measures and writes the table, drawing a bar when `progress`.
pub fn run_quality(args: &QualityArgs, device: DeviceArg, progress: bool) -> anyhow::Result<()> {
    let device = device.resolve()?;
    let mut bar = Bar::new(progress);
    let table = args
        .options()
        .and_then(|opts| {
            // The settings first: a bad one fails before any output is made or model loaded.
            opts.check().map_err(quality_error)?;
            check_outputs(&opts)?;
            quality::run(&opts, device, &mut bar).map_err(quality_error)
        })
        .with_context(|| format!("measuring quality of {}", args.checkpoint.display()))?;
    println!(
        "{} cells in {:.0} s; table in {}",
        table.cells.len(),
        table.seconds,
        args.out.join("table.md").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn quality(flags: &[&str]) -> QualityArgs {
        let cli = Cli::try_parse_from(["ddpm", "quality"].iter().chain(flags)).unwrap();
        let Command::Quality(args) = cli.command else {
            panic!("not quality")
        };
        args
    }

    #[test]
    fn quality_flags_map_onto_the_library_options() {
        assert_eq!(
            quality(&["--checkpoint", "runs/x"]).options().unwrap(),
            quality::Options {
                checkpoint: "runs/x".into(),
                ..quality::Options::default()
            },
            "the flags' defaults are the library's"
        );
        let args = quality(&[
            "--checkpoint",
            "c",
            "--ddim-steps",
            "--steps",
            "10,20",
            "--samples",
            "5,6",
        ]);
        let opts = args.options().unwrap();
        assert!(opts.ddim_steps.is_empty());
        assert_eq!(
            opts.columns,
            vec![
                quality::table::Column {
                    steps: 10,
                    samples: 5
                },
                quality::table::Column {
                    steps: 20,
                    samples: 6
                }
            ]
        );
        let short = quality(&["--checkpoint", "c", "--samples", "5"]);
        assert!(short
            .options()
            .unwrap_err()
            .to_string()
            .contains("--samples needs one count per column of --steps (4 columns, 1 counts)"));
        let e = quality_error(DdpmError::OutOfRange {
            key: "bootstrap_reps",
            value: "1".into(),
            expected: "at least 2".into(),
        });
        assert_eq!(
            format!("{e:#}"),
            "--bootstrap: bootstrap_reps = 1 is out of range: it must be at least 2"
        );
    }
}
