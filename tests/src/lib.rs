//! Test harness for tagger's kernel tests: guards that create and always remove network
//! namespaces ("pods"), cgroups and bpffs pins, backends that answer with their identity, and a
//! client process (`testpod`) that runs inside a pod's cgroup and network namespace.
//!
//! Everything a test creates carries the prefix [`PREFIX`], so `cargo xtask test` can remove
//! leftovers of a crashed run before it starts.

pub mod agent;
pub mod backend;
pub mod cgroup;
pub mod client;
pub mod cluster;
pub mod datapath;
pub mod fake_api;
pub mod kernel;
pub mod netns;
pub mod scenario;
pub mod topology;

use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every network namespace, cgroup and bpffs directory the tests create.
pub const PREFIX: &str = "tgt-";

/// A name unique to this process and call: `tgt-<pid>-<n>-<what>`.
#[must_use]
pub fn unique_name(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}-{n}-{what}", std::process::id())
}

/// Fails the test with a clear message unless running as root (the kernel tests need it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "kernel tests must run as root (they create network namespaces, cgroups and BPF programs); run `cargo xtask test`"
    );
}

/// Runs a command, panicking with its output on failure.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
