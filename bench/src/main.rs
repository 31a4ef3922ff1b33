//! `fwdbench`: the aoai-fwdproxy benchmark against nginx. Not a test; run it with
//! `bash bench/run.sh`, which builds everything and installs nginx and wrk when missing.
//!
//! - `fwdbench upstream --out-key K --cs-key C`: the zero-latency AOAI + Content Safety upstream;
//! - `fwdbench run --handler H --nginx N --wrk W --work DIR --out FILE [--commit C]`: the whole
//!   measurement (environment: `BENCH_SECS`, `BENCH_ROUNDS`, `BENCH_LAT_SECS`, `BENCH_STREAMS`,
//!   `BENCH_STARTS`).

mod client;
mod procfs;
mod run;
mod upstream;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("upstream") => upstream::main(&args[1..]),
        Some("run") => run::main(&args[1..]),
        _ => {
            eprintln!("usage: fwdbench upstream --out-key K --cs-key C | fwdbench run --handler H --nginx N --wrk W --work DIR --out FILE");
            std::process::exit(2);
        }
    }
}
