//! `podidctl` entry point: parse the arguments, run the subcommand, print one clear line and
//! exit 1 on failure.

use std::process::ExitCode;

fn main() -> ExitCode {
    podidctl::run::main_as("podidctl")
}
