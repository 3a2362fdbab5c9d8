//! Test harness for tagger's kernel tests: guards that create and always remove network
//! namespaces ("pods"), cgroups and bpffs pins, backends that answer with their identity, and a
//! client process (`testpod`) that runs inside a pod's cgroup and network namespace.
//!
//! Everything a test creates carries the prefix [`PREFIX`], so `cargo xtask test` can remove
//! leftovers of a crashed run before it starts.

pub mod agent;
pub mod backend;
pub mod binomial;
pub mod capture;
pub mod cgroup;
pub mod client;
pub mod cluster;
pub mod datapath;
pub mod demo_node;
pub mod fake_api;
pub mod foreign_lb;
pub mod hold;
pub mod kernel;
pub mod kustomize;
pub mod netns;
pub mod nginx;
pub mod prometheus;
pub mod restart;
pub mod rollout;
pub mod scenario;
pub mod signals;
pub mod stats;
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

/// CLOCK_MONOTONIC in ns (the kernel's `ktime_get_ns`), the clock `loadgen probe` stamps its
/// lines with: comparable across the processes of a test.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
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

/// Options for reading YAML in tests as the agent reads it: booleans are `true`/`false` only
/// (YAML 1.2), so `namespace: n` is the string `n`, not `false`.
#[must_use]
pub fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! { strict_booleans: true }
}
