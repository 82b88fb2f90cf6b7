//! The `ddpm` binary. Bad input ends with `error: <message>` and a non-zero exit status,
//! never a panic trace.

mod cli;
mod guidance;
mod progress;
mod quality;
mod score;
mod signals;

use clap::Parser;
use cli::{run, Cli};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A run stopped by a signal said so, and how to resume, where it stopped.
        Err(e) if e.downcast_ref::<signals::Stopped>().is_some() => {
            let stopped = e.downcast_ref::<signals::Stopped>().copied();
            ExitCode::from(stopped.map_or(1, |s| s.status()))
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
