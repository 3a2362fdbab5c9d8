//! The `tagger` CLI: reads the pinned maps read-only.

/// Entry point.
pub fn main() -> std::process::ExitCode {
    eprintln!("tagger: not implemented yet");
    std::process::ExitCode::FAILURE
}
