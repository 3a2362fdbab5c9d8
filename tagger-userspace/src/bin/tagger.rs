//! `tagger`: the bundled CLI (see `tagger --help`).

fn main() -> std::process::ExitCode {
    tagger::cli::main()
}
