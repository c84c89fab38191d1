//! `kubectl-podid`: podidctl as a kubectl plugin, so `kubectl podid status|doctor|explain` works
//! with the user's kubeconfig (`KUBECONFIG`, `--kubeconfig`, `--context`) and namespace flags.
//! kubectl finds it on the PATH and hands it every argument after `podid`.

use std::process::ExitCode;

fn main() -> ExitCode {
    podidctl::run::main_as("kubectl podid")
}
