//! Which Service frontends tagger steers on this node, and why.
//!
//! tagger is an add-on to the cluster's Service implementation (kube-proxy, Cilium, ...): a
//! frontend whose connections would end where the cluster sends them anyway is left to the
//! cluster, untouched ([`SVC_F_PASSTHROUGH`]), so that everything the cluster does for it
//! (session affinity, traffic policies, topology, its own load balancing) holds unchanged.
//! A frontend is steered when any of these is true:
//!
//! - some lane other than base has backends new connections may go to (a lane set): callers
//!   of that lane must reach them, and base callers must not;
//! - it is shaped (canary share, or a backend warming up) or a routing rule selects it;
//! - it is strict (`tagger.io/strict`): with no backend it refuses instead of failing open;
//! - a pod on this node is in a strict lane: its connections to a Service without backends in
//!   its lane must be refused, which only tagger does.
//!
//! Fallback chains need nothing: with only base backends, every caller ends on base, as the
//! cluster would send it. The same rule runs in the agent (to set the flag) and in the CLI (to
//! say why, from the pinned maps).

use std::collections::BTreeMap;

use tagger_common::{
    BASE_LANE, LANE_F_STRICT, LanePolicy, PodEntry, SVC_F_PASSTHROUGH, SVC_F_ROUTED, SVC_F_SHAPED,
    SVC_F_STRICT, SetKey,
};

/// Whether a registered local pod is in a strict lane.
pub fn strict_caller<'a>(
    pods: impl IntoIterator<Item = &'a PodEntry>,
    policies: &BTreeMap<u32, LanePolicy>,
) -> bool {
    pods.into_iter().any(|p| policies.get(&p.lane).is_some_and(|pol| pol.flags & LANE_F_STRICT != 0))
}

/// Whether a frontend has a set in a lane other than base, given its sets' keys.
pub fn has_lane_backends<'a>(sets: impl IntoIterator<Item = &'a SetKey>) -> bool {
    sets.into_iter().any(|k| k.lane != BASE_LANE)
}

/// Why a frontend is steered; empty: it is left to the cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[expect(clippy::struct_excessive_bools, reason = "independent reasons, each shown on its own")]
pub struct Reasons {
    /// A non-base lane has backends.
    pub lane_backends: bool,
    /// Canary share or warm-up.
    pub shaped: bool,
    /// A routing rule selects it.
    pub routed: bool,
    /// The Service is strict.
    pub strict_service: bool,
    /// A local pod's lane is strict.
    pub strict_lane: bool,
}

impl Reasons {
    /// The reasons for a frontend with `flags` (its `SVC_F_*` bits besides passthrough),
    /// `lane_backends` whether a non-base lane has a set, and `strict_caller` whether a local
    /// pod is in a strict lane.
    #[must_use]
    pub fn of(flags: u32, lane_backends: bool, strict_caller: bool) -> Self {
        Self {
            lane_backends,
            shaped: flags & SVC_F_SHAPED != 0,
            routed: flags & SVC_F_ROUTED != 0,
            strict_service: flags & SVC_F_STRICT != 0,
            strict_lane: strict_caller,
        }
    }

    /// Whether the frontend is steered.
    #[must_use]
    pub fn steered(self) -> bool {
        self != Self::default()
    }

    /// `flags` with [`SVC_F_PASSTHROUGH`] set when nothing calls for steering, cleared
    /// otherwise.
    #[must_use]
    pub fn apply(self, flags: u32) -> u32 {
        if self.steered() { flags & !SVC_F_PASSTHROUGH } else { flags | SVC_F_PASSTHROUGH }
    }

    /// Short names, for tables, JSON and metric labels (`["base_only"]` when not steered).
    #[must_use]
    pub fn names(self) -> Vec<&'static str> {
        let all = [
            (self.lane_backends, "lane_backends"),
            (self.shaped, "shaping"),
            (self.routed, "routing_rule"),
            (self.strict_service, "strict_service"),
            (self.strict_lane, "strict_lane"),
        ];
        let names: Vec<&'static str> = all.into_iter().filter(|(on, _)| *on).map(|(_, n)| n).collect();
        if names.is_empty() { vec!["base_only"] } else { names }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_only_frontends_are_left_to_the_cluster() {
        let r = Reasons::of(0, false, false);
        assert!(!r.steered());
        assert_eq!(r.names(), ["base_only"]);
        assert_eq!(r.apply(0), SVC_F_PASSTHROUGH);
    }

    #[test]
    fn each_reason_alone_makes_a_frontend_steered() {
        for r in [
            Reasons::of(0, true, false),
            Reasons::of(SVC_F_SHAPED, false, false),
            Reasons::of(SVC_F_ROUTED, false, false),
            Reasons::of(SVC_F_STRICT, false, false),
            Reasons::of(0, false, true),
        ] {
            assert!(r.steered(), "{r:?}");
            assert_eq!(r.names().len(), 1);
            assert_eq!(r.apply(SVC_F_PASSTHROUGH | SVC_F_STRICT), SVC_F_STRICT);
        }
        assert_eq!(
            Reasons::of(SVC_F_SHAPED | SVC_F_STRICT, true, false).names(),
            ["lane_backends", "shaping", "strict_service"]
        );
    }
}
