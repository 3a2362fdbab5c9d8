//! `cargo deny check` (advisories, licences, bans, sources; configuration in deny.toml), with the
//! tool installed at a pinned version by the bootstrap.

use std::process::Command;

use anyhow::{Result, bail};

use crate::shell::{output, run, status, step, workspace_root};

/// The cargo-deny release the bootstrap installs (0.20 needs Rust 1.88; ours is 1.95).
const VERSION: &str = "0.20.2";

/// Installs cargo-deny unless this version is present.
pub fn install() -> Result<()> {
    let have = output("cargo", &["deny", "--version"]).unwrap_or_default();
    if have.split_whitespace().nth(1) == Some(VERSION) {
        status("cargo-deny", &format!("present ({})", have.trim()));
        return Ok(());
    }
    status("cargo-deny", &format!("installing {VERSION} (about three minutes)"));
    run(Command::new("cargo").args(["install", "--locked", "cargo-deny", "--version", VERSION]))
}

/// Runs every check. The advisory database comes from github.com; when it cannot be fetched,
/// a copy from an earlier fetch at most 90 days old is used (cargo-deny's offline mode). With
/// none (a machine that cannot reach github.com and never could), the advisories check is
/// reported as NOT CHECKED, loudly, while licences, bans and sources are still enforced: an
/// unreachable database is not a finding about this code.
pub fn check() -> Result<()> {
    step("cargo deny check (advisories, licences, bans, sources)");
    let root = workspace_root();
    let deny = |args: &[&str]| -> Result<()> {
        run(Command::new("cargo").arg("deny").args(args).current_dir(&root))
    };
    let mut failed = deny(&["--locked", "check", "licenses", "bans", "sources"]).is_err();
    let online = deny(&["fetch", "db"]).is_ok();
    let advisories = if online {
        deny(&["--locked", "check", "advisories"])
    } else {
        status("advisory database", "cannot be fetched from github.com: trying the copy of an earlier fetch");
        deny(&["--locked", "--offline", "check", "advisories"])
    };
    match advisories {
        Ok(()) => {}
        Err(_) if !online && !have_local_db() => {
            status("advisories", "WARNING: NOT CHECKED (no advisory database could be fetched or found)");
        }
        Err(_) => failed = true,
    }
    if failed {
        bail!(
            "cargo deny found problems (above): fix them, or record a justified exception in deny.toml and \
             docs/RELIABILITY.md"
        );
    }
    Ok(())
}

/// Whether an earlier fetch left an advisory database (cargo-deny's default location).
fn have_local_db() -> bool {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")));
    home.and_then(|h| std::fs::read_dir(h.join("advisory-dbs")).ok()).is_some_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("advisory-db")))
    })
}
