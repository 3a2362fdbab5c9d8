//! Call edges: which local pod called which Service, in which lane, and where the connection
//! went. The per-Service statistics ([`StatKey`](crate::StatKey)) say how a lane's callers
//! fared at a Service, but not who called; the inbound counts
//! ([`InboundKey`](crate::InboundKey)) say what a pod received. This map links the two: the
//! outbound calls **of one pod**, whose inbound side is counted by its address, so a report can
//! follow a lane from Service to Service and say where it stops.

/// Per-CPU **LRU** hash [`EdgeKey`] → `u64` count of new connections (and unconnected UDP
/// sends). An LRU: a node with many pods and Services drops its least recently used edges
/// instead of no longer counting.
pub const MAP_EDGES: &str = "TAGGER_EDGE_V1";

/// Capacity of [`MAP_EDGES`]. Preallocated (LRU), per CPU for its values: rows are bounded by
/// (local pods × Services each calls × lanes × outcomes), a few per calling pod in practice.
pub const MAX_EDGES: u32 = 16_384;

/// One call edge.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeKey {
    /// Cgroup id of the calling pod (keys [`MAP_PODS`](crate::MAP_PODS) and
    /// [`MAP_POD_META`](crate::MAP_POD_META)).
    pub caller: u64,
    /// [`Service::svc_id`](crate::Service) of the frontend called.
    pub svc_id: u32,
    /// The caller's lane.
    pub caller_lane: u32,
    /// The lane whose backend was chosen; [`BASE_LANE`](crate::BASE_LANE) for a Service tagger
    /// leaves to the cluster (it has base backends only) and when none was chosen.
    pub backend_lane: u32,
    /// [`Outcome`](crate::Outcome) as `u32`: `steered`, `fell_back`, `routed`, `canary`,
    /// `refused_strict`, `no_backend`, or `passthrough`.
    pub outcome: u32,
}

/// Whether a connection to a Service tagger leaves to the cluster (passthrough) is counted as
/// an edge: only for callers in a lane other than base. A lane caller reaching a Service with
/// base backends only is where its lane falls back, which the coverage report must see; a base
/// caller there is the everyday case, and counting it would cost every such connection a map
/// update for nothing the report uses.
#[must_use]
#[inline(always)]
pub const fn passthrough_edge_counted(caller_lane: u32) -> bool {
    caller_lane != crate::BASE_LANE
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, integers only, no implicit padding (8 + 4 × 4 bytes).
unsafe impl aya::Pod for EdgeKey {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(size_of::<EdgeKey>(), 24);
        assert!(!passthrough_edge_counted(crate::BASE_LANE));
        assert!(passthrough_edge_counted(crate::lane_id("gray")));
    }
}
