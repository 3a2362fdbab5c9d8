//! The node's own pods by address, and what the receiving side of a connection learns.
//!
//! [`MAP_POD_ADDRS`] maps each local pod's IP (IPv4 mapped, network-order words) to the pod's
//! lane, its cgroup and the DSCP its lane stamps. Two programs read it: the TC marking program
//! (by a packet's source address) and the passive side of `conn_track` (by the accepted
//! socket's local address), which counts inbound connections in [`MAP_INBOUND`].

/// Local pod address (`[u32; 4]`, network-order words, IPv4 mapped) → [`PodAddr`].
pub const MAP_POD_ADDRS: &str = "TAGGER_PADDR_V1";
/// Per-CPU hash [`InboundKey`] → `u64` count of accepted connections.
pub const MAP_INBOUND: &str = "TAGGER_INB_V1";

/// Capacity of [`MAP_POD_ADDRS`]: two addresses (IPv4 and IPv6) per pod.
pub const MAX_POD_ADDRS: u32 = 2 * crate::MAX_PODS;
/// Capacity of [`MAP_INBOUND`]; when full, new rows are counted as
/// [`Outcome::InboundFull`](crate::Outcome) instead.
pub const MAX_INBOUND: u32 = 65_536;

/// [`PodAddr::dscp`] when the pod's lane sets no DSCP: packets are left untouched.
pub const DSCP_UNSET: u8 = 0xff;
/// Largest DSCP value (6 bits).
pub const DSCP_MAX: u8 = 63;

/// A local pod, by one of its addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodAddr {
    /// The pod's cgroup id (keys [`MAP_PODS`](crate::MAP_PODS) and
    /// [`MAP_POD_META`](crate::MAP_POD_META)).
    pub cgroup: u64,
    /// The pod's lane id.
    pub lane: u32,
    /// DSCP (0..=63) for the pod's packets, or [`DSCP_UNSET`].
    pub dscp: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

/// [`InboundKey::kind`]: the caller's lane is this pod's lane.
pub const INBOUND_IN_LANE: u32 = 0;
/// The caller's connection fell back from its lane (the option's fallback flag).
pub const INBOUND_FELL_BACK: u32 = 1;
/// A **lane leak**: the caller's lane differs from this pod's, and the connection neither fell
/// back nor was routed there (the caller's node and this one disagree on the pod's lane, or a
/// misconfiguration).
pub const INBOUND_LEAK: u32 = 2;
/// A routing rule or the Service's canary share sent the caller to this pod's lane on purpose.
pub const INBOUND_ROUTED: u32 = 4;
/// No lane option on the SYN: the caller is not behind tagger (another node without tagger, a
/// client outside the cluster, or a connection tagger did not steer). `caller_lane` is 0.
pub const INBOUND_UNTAGGED: u32 = 3;

/// One row of inbound connection counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboundKey {
    /// The pod's address the connection was accepted on (network-order words, IPv4 mapped).
    pub addr: [u32; 4],
    /// Lane id from the SYN's lane option (0 when untagged).
    pub caller_lane: u32,
    /// The pod's lane when the connection was accepted.
    pub pod_lane: u32,
    /// `INBOUND_*`.
    pub kind: u32,
}

/// Classifies an accepted connection from its lane option (`None`: no option) and the lane
/// of the pod that accepted it.
#[must_use]
pub const fn inbound_kind(option: Option<(u32, u8)>, pod_lane: u32) -> u32 {
    match option {
        None => INBOUND_UNTAGGED,
        Some((_, flags)) if flags & crate::wire::LANE_OPT_F_FELL_BACK != 0 => INBOUND_FELL_BACK,
        Some((_, flags)) if flags & crate::wire::LANE_OPT_F_ROUTED != 0 => INBOUND_ROUTED,
        Some((lane, _)) if lane == pod_lane => INBOUND_IN_LANE,
        Some(_) => INBOUND_LEAK,
    }
}

/// Name of an `INBOUND_*` kind, for the CLI and metrics.
#[must_use]
pub const fn inbound_kind_name(kind: u32) -> &'static str {
    match kind {
        INBOUND_IN_LANE => "in_lane",
        INBOUND_FELL_BACK => "fell_back",
        INBOUND_LEAK => "leak",
        INBOUND_ROUTED => "routed",
        INBOUND_UNTAGGED => "untagged",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::LANE_OPT_F_FELL_BACK;

    #[test]
    fn kinds() {
        assert_eq!(inbound_kind(None, 7), INBOUND_UNTAGGED);
        assert_eq!(inbound_kind(Some((7, 0)), 7), INBOUND_IN_LANE);
        assert_eq!(inbound_kind(Some((7, LANE_OPT_F_FELL_BACK)), 9), INBOUND_FELL_BACK);
        assert_eq!(inbound_kind(Some((7, 0)), 9), INBOUND_LEAK);
        assert_eq!(inbound_kind(Some((7, crate::wire::LANE_OPT_F_ROUTED)), 9), INBOUND_ROUTED);
    }

    #[test]
    fn layouts() {
        assert_eq!(size_of::<PodAddr>(), 16);
        assert_eq!(size_of::<InboundKey>(), 28);
    }
}
