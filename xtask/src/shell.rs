//! Running commands with visible progress.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Prints a step header.
pub fn step(what: &str) {
    println!("==> {what}");
}

/// Prints what was found or done for one bootstrap item.
pub fn status(item: &str, state: &str) {
    println!("    {item}: {state}");
}

/// Runs a command with inherited stdio; fails with the command line on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout if it succeeded, `None` if it failed or is missing.
pub fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs cargo (the one running this xtask) in the workspace root.
pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_with(args, &[])
}

/// Runs cargo with extra environment variables.
pub fn cargo_with(args: &[&str], envs: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args).envs(envs.iter().copied()).current_dir(workspace_root()))
}

/// The workspace root (xtask's parent directory).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_owned()
}
