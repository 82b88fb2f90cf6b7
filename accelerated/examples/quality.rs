//! Regenerates the σ_t × steps quality table (docs/quality.md) from a trained checkpoint:
//! `cargo run --release -p ddpm --example quality -- --checkpoint runs/mnist --doc docs/quality.md`.

use clap::Parser;

/// `ddpm quality` until the CLI carries it.
#[derive(Debug, Parser)]
#[command(about = "FD-MNIST, entropies and bits/dim for each σ_t choice and step count")]
struct Cli {
    #[command(flatten)]
    args: ddpm::quality::Args,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_target(false).init();
    let cli = Cli::parse();
    let table = ddpm::quality::run(&cli.args)?;
    println!(
        "{} cells in {:.0} s; table in {}",
        table.cells.len(),
        table.seconds,
        cli.args.out.join("table.md").display()
    );
    Ok(())
}
