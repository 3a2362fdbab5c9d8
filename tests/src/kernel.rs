//! Probing the running kernel for optional features, so a test that needs a newer kernel than the
//! one it runs on (the qemu kernel matrix boots Debian's 6.1) skips with a visible message while
//! the rest of the suite runs.
//!
//! ```ignore
//! if !tagger_tests::kernel::require("stale-connection reset", "bpf_sock_destroy", "6.5") {
//!     return;
//! }
//! ```

use std::io::Write as _;

/// Whether the kernel's BTF (`/sys/kernel/btf/vmlinux`) names `symbol`: a kfunc
/// (`bpf_sock_destroy`), an attach type (`BPF_CGROUP_UNIX_CONNECT`), a helper's enum value
/// (`BPF_FUNC_sock_ops_cb_flags_set`) or a kernel type. A probe of the kernel actually running,
/// unlike a version number (distributions backport).
#[must_use]
pub fn btf_has(symbol: &str) -> bool {
    let Ok(btf) = std::fs::read("/sys/kernel/btf/vmlinux") else { return false };
    let needle: Vec<u8> = [&[0u8][..], symbol.as_bytes(), &[0u8][..]].concat();
    btf.windows(needle.len()).any(|w| w == needle)
}

/// The running kernel's release (`uname -r`).
#[must_use]
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned()
}

/// True if the kernel has `symbol` (see [`btf_has`]); otherwise prints
/// `tagger-tests: skipped <what>: ...` to the real stderr (not captured by the test harness, so
/// `cargo xtask test --kernel` collects it) and returns false: the caller returns early.
#[must_use]
pub fn require(what: &str, symbol: &str, min_linux: &str) -> bool {
    if btf_has(symbol) {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "tagger-tests: skipped {what}: the kernel ({}) lacks {symbol} (Linux >= {min_linux})",
        release()
    );
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn probes_the_running_kernel() {
        // Every kernel tagger supports has cgroup sock_addr programs in its BTF.
        assert!(super::btf_has("BPF_CGROUP_INET4_CONNECT"));
        assert!(!super::btf_has("tagger_no_such_symbol"));
        assert!(super::require("a test", "BPF_CGROUP_INET4_CONNECT", "4.17"));
        assert!(!super::require("a probe that must fail", "tagger_no_such_symbol", "99.0"));
    }
}
