//! `crdgen --out DIR` writes the CRD YAML files generated from the podid-api types into DIR;
//! `crdgen --check DIR` exits 1 naming every file that is missing, differs or should not be
//! there. Used by `make generate` / `make check-generated`.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: crdgen --out DIR | --check DIR";

enum Mode {
    Out(PathBuf),
    Check(PathBuf),
}

fn parse(args: &[String]) -> Result<Mode, String> {
    match args {
        [flag, dir] if flag == "--out" => Ok(Mode::Out(dir.into())),
        [flag, dir] if flag == "--check" => Ok(Mode::Check(dir.into())),
        _ => Err(USAGE.to_owned()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match parse(&args) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match mode {
        Mode::Out(dir) => podid_api::crd::write_dir(&dir).map(|written| {
            for p in written {
                println!("wrote {}", p.display());
            }
        }),
        Mode::Check(dir) => podid_api::crd::check_dir(&dir).and_then(|report| {
            if report.is_clean() {
                Ok(())
            } else {
                Err(podid_api::crd::Error::OutOfDate(report))
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("crdgen: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
