//! The node's own pods by address, and what the receiving side of a connection learns.
//!
//! [`MAP_POD_ADDRS`] maps each local pod's IP (IPv4 mapped, network-order words) to the pod's
//! lane, its cgroup and the DSCP its lane stamps. Two programs read it: the TC marking program
//! (by a packet's source address) and the passive side of `conn_track` (by the accepted
//! socket's local address), which counts inbound connections in [`MAP_INBOUND`].

/// Local pod address (`[u32; 4]`, network-order words, IPv4 mapped) → [`PodAddr`].
pub const MAP_POD_ADDRS: &str = "TAGGER_PADDR_V1";
/// Per-CPU **LRU** hash [`InboundKey`] → `u64` count of accepted connections. (`_V1` was a
/// plain per-CPU hash: a flood of distinct keys filled it and stopped the counting; an upgrade
/// removes its pin.)
pub const MAP_INBOUND: &str = "TAGGER_INB_V2";

/// Capacity of [`MAP_POD_ADDRS`]: two addresses (IPv4 and IPv6) per pod.
pub const MAX_POD_ADDRS: u32 = 2 * crate::MAX_PODS;
/// Capacity of [`MAP_INBOUND`]. The map is an LRU: when full, the least recently counted rows
/// make room (an insert that still fails is counted as [`Outcome::InboundFull`](crate::Outcome)).
/// An LRU map is preallocated, per CPU for its values, hence a smaller capacity than the
/// other tables': rows are bounded by (local pod addresses × known lanes × kinds), since
/// unknown lanes share one kind and no per-id row.
pub const MAX_INBOUND: u32 = 16_384;

/// Lane id → [`LaneMark`]: the bits the TC marking program writes into `skb->mark` for a local
/// pod of that lane. Lanes without an entry (base, or marking off) keep their packets' marks.
pub const MAP_LANE_MARKS: &str = "TAGGER_LMARK_V1";
/// Capacity of [`MAP_LANE_MARKS`]: one entry per lane.
pub const MAX_LANE_MARKS: u32 = crate::MAX_LANES;

/// A lane's mark bits: `skb->mark = (skb->mark & !mask) | value`, so only the bits under the
/// operator's `--mark-mask` change. `value` is the lane's small index shifted to the mask's
/// lowest set bit. `mask == 0`: the lane did not fit the mask (no index); packets are left
/// alone, and the entry says so to `tagger lanes` and the metrics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaneMark {
    /// `index << mask.trailing_zeros()`.
    pub value: u32,
    /// The `--mark-mask` it was computed for (0: not indexed).
    pub mask: u32,
}

impl LaneMark {
    /// The mark a packet carrying `mark` leaves with.
    #[must_use]
    #[inline(always)]
    pub const fn apply(self, mark: u32) -> u32 {
        (mark & !self.mask) | (self.value & self.mask)
    }

    /// The lane index this entry encodes (0: none).
    #[must_use]
    pub const fn index(self) -> u32 {
        if self.mask == 0 { 0 } else { (self.value & self.mask) >> self.mask.trailing_zeros() }
    }
}

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
/// The SYN's lane option names a lane id that is not a known lane (not base, not the pod's
/// lane, not in [`MAP_LANE_NAMES`](crate::MAP_LANE_NAMES)). The option is unauthenticated:
/// anyone who can reach the pod can send any 32-bit id, so such ids never get a row of their
/// own; `caller_lane` is 0 and every such connection of a pod lands in this one row.
pub const INBOUND_UNKNOWN_LANE: u32 = 5;

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

/// The row an accepted connection is counted in: (caller lane, kind). `known(lane)` says
/// whether a lane id other than base and the pod's own lane is a known lane; an option naming
/// an unknown one is [`INBOUND_UNKNOWN_LANE`] with caller lane 0, whatever its flags.
#[inline(always)]
pub fn inbound_row(option: Option<(u32, u8)>, pod_lane: u32, known: impl FnOnce(u32) -> bool) -> (u32, u32) {
    match option {
        None => (0, INBOUND_UNTAGGED),
        Some((lane, _)) if lane != crate::BASE_LANE && lane != pod_lane && !known(lane) => {
            (0, INBOUND_UNKNOWN_LANE)
        }
        Some((lane, flags)) => (lane, inbound_kind(Some((lane, flags)), pod_lane)),
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
        INBOUND_UNKNOWN_LANE => "unknown_lane",
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
    fn unknown_lanes_share_one_row() {
        let known = |lane: u32| lane == 11;
        assert_eq!(inbound_row(None, 7, known), (0, INBOUND_UNTAGGED));
        assert_eq!(inbound_row(Some((7, 0)), 7, |_| false), (7, INBOUND_IN_LANE), "own lane: no lookup");
        assert_eq!(inbound_row(Some((0, 0)), 7, |_| false), (0, INBOUND_LEAK), "base is always known");
        assert_eq!(inbound_row(Some((11, 0)), 7, known), (11, INBOUND_LEAK));
        assert_eq!(inbound_row(Some((11, LANE_OPT_F_FELL_BACK)), 7, known), (11, INBOUND_FELL_BACK));
        for (id, flags) in
            [(12, 0), (0xdead_beef, LANE_OPT_F_FELL_BACK), (u32::MAX, crate::wire::LANE_OPT_F_ROUTED)]
        {
            assert_eq!(inbound_row(Some((id, flags)), 7, known), (0, INBOUND_UNKNOWN_LANE), "{id:#x}");
        }
        assert_eq!(inbound_kind_name(INBOUND_UNKNOWN_LANE), "unknown_lane");
    }

    #[test]
    fn lane_marks_change_only_the_masked_bits() {
        let m = LaneMark { value: 3 << 4, mask: 0xf0 };
        assert_eq!(m.apply(0), 0x30);
        assert_eq!(m.apply(0xffff_ffff), 0xffff_ff3f);
        assert_eq!(m.apply(0x4000 | 0x0f), 0x403f, "kube-proxy's bit and others kept");
        assert_eq!(m.index(), 3);
        let unfit = LaneMark { value: 0, mask: 0 };
        assert_eq!(unfit.apply(0x1234_5678), 0x1234_5678);
        assert_eq!(unfit.index(), 0);
    }

    #[test]
    fn layouts() {
        assert_eq!(size_of::<LaneMark>(), 8);
        assert_eq!(size_of::<PodAddr>(), 16);
        assert_eq!(size_of::<InboundKey>(), 28);
    }
}
