//! Idempotent installation of what building and testing need, one printed step per item.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::shell::{output, run, status, step};

/// The LLVM major version of the nightly toolchain; bpf-linker must link the same.
const LLVM: &str = "22";
/// The bpf-linker release this tree is tested with (`cargo install --version ... --locked`).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The nightly toolchain this tree is tested with (`rustc +nightly -V`). Only the toolchain
/// named `nightly` is used (`aya-build`'s `Toolchain::Nightly`); another one is reported, not
/// replaced: these machines cannot download toolchains at will, and a nightly with the same LLVM
/// major usually builds the datapath the same.
const TESTED_NIGHTLY: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)";
/// rustup's name of [`TESTED_NIGHTLY`] (a nightly is published the day after its commit).
const TESTED_NIGHTLY_CHANNEL: &str = "nightly-2026-05-20";
/// Debian packages: LLVM for bpf-linker, iproute2 for the test namespaces, bpftool for operators;
/// buildah and musl-tools (musl-gcc, for ring's C code) for the container image (`cargo xtask
/// image`), podman and runc to run it from the DaemonSet's pod template in the tests, prometheus
/// for promtool (the alert rules' unit tests); util-linux's setpriv and unshare confine the agent in the capability tests; haproxy
/// and iptables are the baselines of `cargo xtask bench`, linux-perf its profiler; the kernel
/// matrix (`cargo xtask test --kernel`) boots Debian's kernels in qemu with a busybox-static
/// initramfs (binutils strips the test binaries packed into it, xz unpacks 6.12's modules); nginx
/// is the demo's edge gateway (`tagger_tests::nginx`), graphviz's `dot` renders the lane coverage
/// graph.
const APT_PACKAGES: [&str; 19] = [
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
    "nginx",
    "graphviz",
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
    // `nightly` itself (listed as `nightly-<host>`), not a dated `nightly-YYYY-MM-DD`.
    let is_nightly = |l: &str| {
        l.split_whitespace()
            .next()
            .and_then(|n| n.strip_prefix("nightly-"))
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    };
    if toolchains.lines().any(is_nightly) {
        status("nightly toolchain", "present");
    } else {
        status("nightly toolchain", "installing");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let version = output("rustc", &["+nightly", "-V"]).unwrap_or_default();
    let verbose = output("rustc", &["+nightly", "-vV"]).unwrap_or_default();
    match check_nightly(version.trim(), &verbose)? {
        None => status("nightly version", &format!("{} (the tested one)", version.trim())),
        Some(advice) => {
            status("nightly version", &format!("WARNING: {advice}"));
        }
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
    let _held = ServicesHeld::at(Path::new(POLICY_RC_D));
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Debian's `policy-rc.d` hook, written for the time of an install so that the packages' own
/// services (nginx, haproxy, prometheus) are not started: the tests and the demo run their own
/// instances, on their own ports, and a developer's machine should not be left serving port 80.
/// An existing hook is left as it is; ours is removed when this is dropped.
struct ServicesHeld(Option<std::path::PathBuf>);

/// The hook's path, and what ours says.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const POLICY_RC_D_TEXT: &str =
    "#!/bin/sh\n# written by tagger's `cargo xtask` bootstrap for one apt-get install\nexit 101\n";

impl ServicesHeld {
    fn at(path: &Path) -> Self {
        use std::os::unix::fs::OpenOptionsExt as _;
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, POLICY_RC_D_TEXT.as_bytes()));
        match written {
            Ok(()) => {
                status("package services", "not started during the install (policy-rc.d)");
                Self(Some(path.to_owned()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                status("package services", "as this machine's own policy-rc.d says");
                Self(None)
            }
            Err(e) => {
                status("package services", &format!("may start (cannot write {}: {e})", path.display()));
                Self(None)
            }
        }
    }
}

impl Drop for ServicesHeld {
    fn drop(&mut self) {
        if let Some(path) = &self.0
            && std::fs::read_to_string(path).is_ok_and(|t| t == POLICY_RC_D_TEXT)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Compares the installed nightly (`rustc +nightly -V`, and `-vV` for its LLVM) with
/// [`TESTED_NIGHTLY`]: `None` when it is the tested one, else what differs and what to do. An
/// LLVM major other than [`LLVM`] is an error: bpf-linker links LLVM [`LLVM`], and the eBPF
/// object would not link.
fn check_nightly(version: &str, verbose: &str) -> Result<Option<String>> {
    // rustup cannot install a dated nightly under the name `nightly`, which the build uses:
    // replacing it is the operator's decision (`rustup toolchain install nightly` updates it).
    let tested = format!(
        "the tested one is `{TESTED_NIGHTLY}` (rustup's `{TESTED_NIGHTLY_CHANNEL}`); the build uses the \
         toolchain named `nightly` (`cargo +nightly`, tagger-userspace/build.rs)"
    );
    let llvm_major =
        verbose.lines().find_map(|l| l.strip_prefix("LLVM version: ")).and_then(|v| v.split('.').next());
    if llvm_major.is_some_and(|m| m != LLVM) {
        bail!(
            "the installed nightly (`{version}`) uses LLVM {}, but bpf-linker links LLVM {LLVM}: the eBPF object \
             would not link; {tested}",
            llvm_major.unwrap_or("?")
        );
    }
    if version == TESTED_NIGHTLY {
        return Ok(None);
    }
    Ok(Some(format!(
        "the installed nightly is `{version}`, not the tested one; it is used as it is (same LLVM {LLVM}). If the \
         eBPF build or the verifier fails, suspect this difference first: {tested}"
    )))
}

/// What to do about bpf-linker, given `bpf-linker --version`'s output (if it runs).
fn bpf_linker_action(installed: Option<&str>) -> Option<&'static str> {
    match installed.map(|v| v.trim().trim_start_matches("bpf-linker").trim()) {
        Some(BPF_LINKER_VERSION) => None,
        Some(_) => Some("replacing"),
        None => Some("building"),
    }
}

fn bpf_linker() -> Result<()> {
    let installed = output("bpf-linker", &["--version"]);
    let Some(action) = bpf_linker_action(installed.as_deref()) else {
        status("bpf-linker", &format!("present ({BPF_LINKER_VERSION}, the tested version)"));
        return Ok(());
    };
    if let Some(v) = &installed {
        status("bpf-linker", &format!("{} is not the tested {BPF_LINKER_VERSION}", v.trim()));
    }
    status("bpf-linker", &format!("{action} {BPF_LINKER_VERSION} against LLVM {LLVM} (about a minute)"));
    let prefix = format!("/usr/lib/llvm-{LLVM}");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM}"),
        ])
        // bpf-linker's build script reads LLVM_PREFIX; llvm-sys reads LLVM_SYS_<ver>_PREFIX.
        .env("LLVM_PREFIX", &prefix)
        .env(format!("LLVM_SYS_{LLVM}1_PREFIX"), &prefix))?;
    match output("bpf-linker", &["--version"]) {
        None => bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH"),
        Some(v) if bpf_linker_action(Some(&v)).is_some() => {
            bail!("bpf-linker {BPF_LINKER_VERSION} was installed, but `bpf-linker` on PATH is {}", v.trim())
        }
        Some(_) => {}
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
    fn the_service_hook_is_ours_only_while_installing() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("xtask-policy-rc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hook = dir.join("policy-rc.d");
        {
            let _held = super::ServicesHeld::at(&hook);
            assert_eq!(std::fs::read_to_string(&hook).unwrap(), super::POLICY_RC_D_TEXT);
            assert_eq!(std::fs::metadata(&hook).unwrap().permissions().mode() & 0o777, 0o755);
        }
        assert!(!hook.exists(), "ours is removed after the install");
        std::fs::write(&hook, "#!/bin/sh\nexit 0\n").unwrap();
        drop(super::ServicesHeld::at(&hook));
        assert_eq!(
            std::fs::read_to_string(&hook).unwrap(),
            "#!/bin/sh\nexit 0\n",
            "the machine's own is kept"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(super::parse_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(super::parse_release("5.10.0-23-cloud-amd64"), Some((5, 10)));
        assert_eq!(super::parse_release("garbage"), None);
    }

    #[test]
    fn bpf_linker_is_kept_only_at_the_tested_version() {
        assert_eq!(super::bpf_linker_action(Some("bpf-linker 0.13.0\n")), None);
        assert_eq!(super::bpf_linker_action(Some("bpf-linker 0.9.15\n")), Some("replacing"));
        assert_eq!(super::bpf_linker_action(None), Some("building"));
    }

    #[test]
    fn another_nightly_is_reported_and_another_llvm_refused() {
        let llvm = |v: &str| format!("rustc 1.97.0-nightly\nLLVM version: {v}\n");
        assert_eq!(super::check_nightly(super::TESTED_NIGHTLY, &llvm("22.1.4")).unwrap(), None);
        let other =
            super::check_nightly("rustc 1.98.0-nightly (0123456 2026-06-30)", &llvm("22.1.8")).unwrap();
        let advice = other.expect("a different nightly is reported");
        assert!(
            advice.contains(super::TESTED_NIGHTLY) && advice.contains(super::TESTED_NIGHTLY_CHANNEL),
            "{advice}"
        );
        let e =
            super::check_nightly("rustc 1.99.0-nightly (0123456 2026-08-01)", &llvm("23.0.0")).unwrap_err();
        assert!(e.to_string().contains("LLVM 23"), "{e}");
    }
}
