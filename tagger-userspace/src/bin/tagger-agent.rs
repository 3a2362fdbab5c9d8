//! `tagger-agent`: the node daemon. See `tagger-agent --help` and the README.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let args = tagger::agent::Args::parse();
    tagger::agent::init_logging();
    match tagger::agent::run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("tagger-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
