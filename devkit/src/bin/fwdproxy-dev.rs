//! `fwdproxy-dev`: the whole aoai-fwdproxy set on loopback. See [`fwdproxy_devkit::launcher`].

use std::process::ExitCode;
use std::time::Instant;

use fwdproxy_devkit::launcher::{self, Options, USAGE};

#[tokio::main]
async fn main() -> ExitCode {
    let started = Instant::now();
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(msg) if msg == USAGE => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("fwdproxy-dev: {msg}");
            return ExitCode::from(2);
        }
    };
    match launcher::run(opts, started).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fwdproxy-dev: {e}");
            ExitCode::FAILURE
        }
    }
}
