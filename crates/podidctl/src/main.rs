//! `podidctl` entry point: parse the arguments, run the subcommand, print one clear line and
//! exit 1 on failure.

use std::process::ExitCode;

use clap::Parser;
use podidctl::args::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(podidctl::run::run(args)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", podidctl::error::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
