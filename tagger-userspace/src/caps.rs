//! The Linux capabilities the agent needs, checked with `capget(2)` before anything is loaded.
//!
//! Without one of them the agent used to fail deep inside `bpf(2)` with a bare `EPERM` or
//! `EACCES` that names no capability. [`check_agent`] turns that into a start-up error naming
//! each missing capability, what needs it, and where the DaemonSet grants it.
//!
//! The set was found by experiment on Linux 6.18 (`tests/tests/integration/deploy_capabilities.rs` runs the
//! real agent with exactly the DaemonSet's set, then with each capability dropped in turn):
//!
//! | capability | needed by | without it |
//! |---|---|---|
//! | `CAP_BPF` | `BPF_MAP_CREATE`, `BPF_PROG_LOAD` | map creation fails with `EPERM` |
//! | `CAP_NET_ADMIN` | loading cgroup socket-address programs (a networking program type) | `BPF_PROG_LOAD` fails with `EPERM` |
//! | `CAP_PERFMON` | the verifier's pointer rules for privileged loaders | the verifier rejects the programs (`EACCES`, "pointer arithmetic ... prohibited for !root", Spectre v1 hardening) |
//!
//! `CAP_SYS_ADMIN` stands in for each of them (the kernel's `bpf_capable()`, `perfmon_capable()`
//! and the networking program types' check all accept it): a `privileged` container passes.
//!
//! The DaemonSet grants `CAP_SYS_ADMIN` and `CAP_NET_ADMIN` rather than these three, because
//! the optional features need more than steering: resetting stale connections and lane marking
//! enter other network namespaces (`setns`, `CAP_SYS_ADMIN` only), and destroying a pod's
//! sockets takes `CAP_NET_ADMIN` (which `CAP_SYS_ADMIN` does not stand in for). Those features
//! probe what they need at start and report themselves unavailable; only steering's needs stop
//! the agent.
//! `CAP_SYS_RESOURCE` is not needed: since Linux 5.11 BPF memory is charged to the memory cgroup,
//! not to `RLIMIT_MEMLOCK`.
//!
//! A restart that adopts the pinned datapath opens pins by path and loads nothing, so it would
//! get by without these; the check runs on every start anyway, so a DaemonSet that lost a
//! capability fails on its next rollout rather than after a node reboot, when the datapath must
//! be loaded again.

use std::{fmt, io};

/// A Linux capability, by its number in `include/uapi/linux/capability.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Capability(u8);

/// Names of capabilities 0..=40, indexed by number.
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Reading other processes' `/proc/PID/ns/*` regardless of their uid and capabilities.
#[cfg(test)]
pub const CAP_SYS_PTRACE: Capability = Capability(19);
/// Networking administration; also loading networking BPF program types.
pub const CAP_NET_ADMIN: Capability = Capability(12);
/// The catch-all: stands in for CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN in the BPF checks.
pub const CAP_SYS_ADMIN: Capability = Capability(21);
/// Resource limits, e.g. raising `RLIMIT_MEMLOCK` (not needed since Linux 5.11).
#[cfg(test)]
pub const CAP_SYS_RESOURCE: Capability = Capability(24);
/// Performance monitoring; for BPF, the verifier's rules for privileged loaders (Linux 5.8+).
pub const CAP_PERFMON: Capability = Capability(38);
/// Creating BPF maps and loading BPF programs (Linux 5.8+).
pub const CAP_BPF: Capability = Capability(39);

impl Capability {
    /// The capability with this number, if the kernel headers this was written against know it.
    #[must_use]
    #[cfg(test)]
    pub fn from_number(n: u8) -> Option<Self> {
        (usize::from(n) < NAMES.len()).then_some(Self(n))
    }

    /// Parses `CAP_BPF`, `BPF` (as Kubernetes writes it) or `cap_bpf`.
    #[must_use]
    #[cfg(test)]
    pub fn from_name(name: &str) -> Option<Self> {
        let upper = name.trim().to_ascii_uppercase();
        let full = if upper.starts_with("CAP_") { upper } else { format!("CAP_{upper}") };
        let n = NAMES.iter().position(|&known| known == full)?;
        u8::try_from(n).ok().map(Self)
    }

    /// The number.
    #[must_use]
    #[cfg(test)]
    pub fn number(self) -> u8 {
        self.0
    }

    /// The kernel's name, e.g. `CAP_BPF`.
    #[must_use]
    pub fn name(self) -> &'static str {
        NAMES[usize::from(self.0)]
    }

    /// The name in a Kubernetes `securityContext.capabilities` list, e.g. `BPF`.
    #[must_use]
    pub fn kubernetes_name(self) -> &'static str {
        let name = self.name();
        name.strip_prefix("CAP_").unwrap_or(name)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of capabilities: bit n is capability n, as `capget(2)` and `/proc/PID/status` give them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSet(u64);

impl CapSet {
    /// No capability.
    #[cfg(test)]
    pub const EMPTY: Self = Self(0);

    /// The set with exactly these capabilities.
    #[must_use]
    #[cfg(test)]
    pub fn of(caps: &[Capability]) -> Self {
        caps.iter().fold(Self::EMPTY, |s, &c| s.with(c))
    }

    /// From the hexadecimal mask of a `/proc/PID/status` line (`CapEff:\t000001fffeffffff`).
    #[must_use]
    #[cfg(test)]
    pub fn from_hex(hex: &str) -> Option<Self> {
        u64::from_str_radix(hex.trim(), 16).ok().map(Self)
    }

    /// The raw mask.
    #[must_use]
    #[cfg(test)]
    pub fn bits(self) -> u64 {
        self.0
    }

    /// Whether `cap` is in the set.
    #[must_use]
    pub fn contains(self, cap: Capability) -> bool {
        self.0 & (1 << cap.0) != 0
    }

    /// The set plus `cap`.
    #[must_use]
    #[cfg(test)]
    pub fn with(self, cap: Capability) -> Self {
        Self(self.0 | (1 << cap.0))
    }

    /// The set without `cap`.
    #[must_use]
    #[cfg(test)]
    pub fn without(self, cap: Capability) -> Self {
        Self(self.0 & !(1 << cap.0))
    }

    /// The known capabilities in the set, by number.
    pub fn iter(self) -> impl Iterator<Item = Capability> {
        (0..=40u8).map(Capability).filter(move |&c| self.contains(c))
    }
}

impl fmt::Display for CapSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.iter().map(Capability::name).collect();
        f.write_str(&names.join(", "))
    }
}

/// The calling thread's effective capabilities, from `capget(2)`.
pub fn effective() -> io::Result<CapSet> {
    crate::sys::effective_capabilities().map(CapSet)
}

/// A capability the agent needs, and what needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requirement {
    /// The capability.
    pub capability: Capability,
    /// What fails without it, for the error message.
    pub needed_by: &'static str,
}

/// What `tagger-agent` needs to install the datapath (see the module docs for how it was found).
pub const AGENT: [Requirement; 3] = [
    Requirement {
        capability: CAP_BPF,
        needed_by: "creating the BPF maps and loading the programs (bpf(2) BPF_MAP_CREATE, BPF_PROG_LOAD)",
    },
    Requirement {
        capability: CAP_NET_ADMIN,
        needed_by: "loading and attaching cgroup socket-address programs (a networking program type)",
    },
    Requirement {
        capability: CAP_PERFMON,
        needed_by: "the verifier: without it, its Spectre v1 hardening rejects the programs' pointer \
                    arithmetic (\"prohibited for !root\")",
    },
];

/// The requirements `have` does not meet, in order. `CAP_SYS_ADMIN` meets every one.
#[must_use]
pub fn missing(have: CapSet, required: &[Requirement]) -> Vec<Requirement> {
    if have.contains(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    required.iter().filter(|r| !have.contains(r.capability)).copied().collect()
}

/// Start-up refusal: the process lacks capabilities the agent needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingCapabilities {
    /// What is missing, in [`AGENT`] order.
    pub missing: Vec<Requirement>,
    /// The effective set the process has.
    pub effective: CapSet,
    /// Everything required (for the hint naming the whole set to grant).
    pub required: Vec<Requirement>,
}

impl fmt::Display for MissingCapabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.missing.iter().map(|r| r.capability.name()).collect();
        let plural = if names.len() == 1 { "y" } else { "ies" };
        write!(f, "missing Linux capabilit{plural} {}: ", names.join(", "))?;
        for (i, r) in self.missing.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{} is needed for {}", r.capability.name(), r.needed_by)?;
        }
        let grant: Vec<&str> = self.required.iter().map(|r| r.capability.kubernetes_name()).collect();
        write!(
            f,
            ". The process has: {}. In Kubernetes, add [{}] to the container's \
             securityContext.capabilities for steering alone, or CAP_SYS_ADMIN, which stands in \
             for all of them (deploy/base/daemonset.yaml adds [SYS_ADMIN, NET_ADMIN] for every \
             feature), or run it privileged (deploy/overlays/privileged)",
            self.effective,
            grant.join(", ")
        )
    }
}

impl std::error::Error for MissingCapabilities {}

/// Why [`check`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// Capabilities are missing.
    #[error(transparent)]
    Missing(#[from] MissingCapabilities),
    /// `capget(2)` itself failed.
    #[error("reading this process's capabilities (capget): {0}")]
    Probe(#[from] io::Error),
}

/// Checks a given effective set against `required`.
pub fn check_set(effective: CapSet, required: &[Requirement]) -> Result<(), MissingCapabilities> {
    let missing = missing(effective, required);
    if missing.is_empty() {
        return Ok(());
    }
    Err(MissingCapabilities { missing, effective, required: required.to_vec() })
}

/// Checks this process against `required`.
pub fn check(required: &[Requirement]) -> Result<(), CapsError> {
    Ok(check_set(effective()?, required)?)
}

/// Checks this process against what the agent needs ([`AGENT`]); call before installing the
/// datapath.
pub fn check_agent() -> Result<(), CapsError> {
    check(&AGENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_in_every_spelling() {
        assert_eq!(Capability::from_name("BPF"), Some(CAP_BPF));
        assert_eq!(Capability::from_name("CAP_BPF"), Some(CAP_BPF));
        assert_eq!(Capability::from_name("cap_net_admin"), Some(CAP_NET_ADMIN));
        assert_eq!(Capability::from_name(" PERFMON "), Some(CAP_PERFMON));
        assert_eq!(Capability::from_name("SYS_ADMIN"), Some(CAP_SYS_ADMIN));
        assert_eq!(Capability::from_name("CHECKPOINT_RESTORE").map(Capability::number), Some(40));
        assert_eq!(Capability::from_name("NO_SUCH_CAP"), None);
        assert_eq!(CAP_SYS_PTRACE.kubernetes_name(), "SYS_PTRACE");
        assert_eq!(CAP_SYS_RESOURCE.name(), "CAP_SYS_RESOURCE");
        for n in 0..=40 {
            let c = Capability::from_number(n).unwrap();
            assert_eq!(Capability::from_name(c.name()), Some(c));
        }
        assert_eq!(Capability::from_number(41), None);
    }

    #[test]
    fn sets_from_proc_status_masks() {
        // A root shell in a sandbox without CAP_SYS_RESOURCE (bit 24).
        let s = CapSet::from_hex("000001fffeffffff").unwrap();
        assert!(s.contains(CAP_BPF) && s.contains(CAP_PERFMON) && s.contains(CAP_NET_ADMIN));
        assert!(!s.contains(CAP_SYS_RESOURCE));
        let three = CapSet::of(&[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON]);
        assert_eq!(three.bits(), (1 << 12) | (1 << 38) | (1 << 39));
        assert_eq!(three.to_string(), "CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF");
        assert_eq!(three.without(CAP_BPF), CapSet::of(&[CAP_NET_ADMIN, CAP_PERFMON]));
        assert_eq!(CapSet::EMPTY.to_string(), "none");
        assert_eq!(CapSet::from_hex("zz"), None);
    }

    #[test]
    fn missing_requirements_and_the_sys_admin_stand_in() {
        let all = CapSet::of(&[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON]);
        assert!(missing(all, &AGENT).is_empty());
        assert!(missing(CapSet::of(&[CAP_SYS_ADMIN]), &AGENT).is_empty());
        for r in AGENT {
            let got = missing(all.without(r.capability), &AGENT);
            assert_eq!(got, [r], "dropping {}", r.capability);
        }
        let none: Vec<Capability> = missing(CapSet::EMPTY, &AGENT).iter().map(|r| r.capability).collect();
        assert_eq!(none, [CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON]);
    }

    #[test]
    fn the_message_names_what_is_missing_and_how_to_grant_it() {
        let have = CapSet::of(&[CAP_BPF, CAP_NET_ADMIN]);
        let e = check_set(have, &AGENT).unwrap_err().to_string();
        assert!(
            e.starts_with("missing Linux capability CAP_PERFMON: CAP_PERFMON is needed for the verifier"),
            "{e}"
        );
        assert!(e.contains("The process has: CAP_NET_ADMIN, CAP_BPF."), "{e}");
        assert!(e.contains("[BPF, NET_ADMIN, PERFMON]"), "{e}");
        let e = check_set(CapSet::EMPTY, &AGENT).unwrap_err().to_string();
        assert!(e.starts_with("missing Linux capabilities CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON: "), "{e}");
        assert!(e.contains("The process has: none."), "{e}");
        assert!(check_set(have.with(CAP_PERFMON), &AGENT).is_ok());
    }

    #[test]
    fn capget_agrees_with_proc_status() {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap();
        assert_eq!(effective().unwrap(), CapSet::from_hex(line).unwrap());
    }
}
