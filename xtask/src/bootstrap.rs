//! Idempotent installation of what building and testing need, one printed step per item.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::shell::{output, run, status, step};

/// The LLVM major version of the nightly toolchain; bpf-linker must link the same.
const LLVM: &str = "22";
/// Debian packages: LLVM for bpf-linker, iproute2 for the test namespaces, bpftool for operators;
/// buildah and musl-tools (musl-gcc, for ring's C code) for the container image (`cargo xtask
/// image`), podman and runc to run it from the DaemonSet's pod template in the tests, prometheus
/// for promtool (the alert rules' unit tests); util-linux's setpriv and unshare confine the agent in the capability tests; haproxy
/// and iptables are the baselines of `cargo xtask bench`, linux-perf its profiler; the kernel
/// matrix (`cargo xtask test --kernel`) boots Debian's kernels in qemu with a busybox-static
/// initramfs (binutils strips the test binaries packed into it, xz unpacks 6.12's modules).
const APT_PACKAGES: [&str; 17] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "bpftool",
    "buildah",
    "podman",
    "runc",
    "prometheus",
    "musl-tools",
    "util-linux",
    "haproxy",
    "iptables",
    "linux-perf",
    "qemu-system-x86",
    "busybox-static",
    "binutils",
    "xz-utils",
];

/// Installs everything missing.
pub fn run_all() -> Result<()> {
    step("bootstrap: toolchains and tools (each step skips what is present)");
    toolchain_components()?;
    apt_packages()?;
    bpf_linker()?;
    crate::deny::install()?;
    Ok(())
}

fn toolchain_components() -> Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"]).context("rustup is required")?;
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        status("nightly toolchain", "present");
    } else {
        status("nightly toolchain", "installing");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    for (toolchain, component) in [("nightly", "rust-src"), ("stable", "clippy"), ("stable", "rustfmt")] {
        let installed = output("rustup", &["component", "list", "--installed", "--toolchain", toolchain])
            .unwrap_or_default();
        let item = format!("{component} ({toolchain})");
        if installed.lines().any(|l| l.starts_with(component)) {
            status(&item, "present");
        } else {
            status(&item, "installing");
            run(Command::new("rustup").args(["component", "add", component, "--toolchain", toolchain]))?;
        }
    }
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .into_iter()
        .filter(|p| {
            let installed = output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_some_and(|s| s.contains("install ok installed"));
            status(&format!("debian package {p}"), if installed { "present" } else { "missing" });
            !installed
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    status("apt-get", &format!("installing {}", missing.join(" ")));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn bpf_linker() -> Result<()> {
    if let Some(v) = output("bpf-linker", &["--version"]) {
        status("bpf-linker", &format!("present ({})", v.trim()));
        return Ok(());
    }
    status("bpf-linker", &format!("building against LLVM {LLVM} (about a minute)"));
    let prefix = format!("/usr/lib/llvm-{LLVM}");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM}"),
        ])
        // bpf-linker's build script reads LLVM_PREFIX; llvm-sys reads LLVM_SYS_<ver>_PREFIX.
        .env("LLVM_PREFIX", &prefix)
        .env(format!("LLVM_SYS_{LLVM}1_PREFIX"), &prefix))?;
    if output("bpf-linker", &["--version"]).is_none() {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

/// Fails, naming what is missing, unless the kernel has what the datapath needs.
pub fn check_kernel() -> Result<()> {
    step("kernel features");
    let release = output("uname", &["-r"]).unwrap_or_default();
    let (major, minor) = parse_release(release.trim()).context("cannot parse `uname -r`")?;
    // getpeername/recvmsg hooks (5.8) and bpf_get_current_ancestor_cgroup_id in sock_addr
    // programs are the newest features the cgroup programs use; 5.8 also brings cgroup links.
    if (major, minor) < (5, 8) {
        bail!("kernel {} is too old: tagger's cgroup programs need Linux 5.8 or newer", release.trim());
    }
    status("kernel", &format!("{} (>= 5.8)", release.trim()));
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    if !mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("cgroup2")) {
        bail!("no cgroup v2 filesystem is mounted: tagger needs cgroup v2 (unified or hybrid hierarchy)");
    }
    status("cgroup v2", "mounted");
    if mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("bpf")) {
        status("bpffs", "mounted");
    } else {
        status("bpffs", "mounting at /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

fn parse_release(r: &str) -> Option<(u32, u32)> {
    let mut it = r.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_kernel_releases() {
        assert_eq!(super::parse_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(super::parse_release("5.10.0-23-cloud-amd64"), Some((5, 10)));
        assert_eq!(super::parse_release("garbage"), None);
    }
}
