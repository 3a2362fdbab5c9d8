//! Which of one lane's serving endpoints new connections from this node go to: Kubernetes'
//! own Service semantics, applied inside each lane the way kube-proxy applies them to the
//! whole Service.
//!
//! In order, for the endpoints of one (Service port, lane):
//! 1. `internalTrafficPolicy: Local`: only endpoints on this node are usable at all. None →
//!    the lane has no usable endpoint, and the lane chain goes on (no lane at all: the
//!    connection is left to the cluster, whose Service implementation drops it as kube-proxy
//!    does).
//! 2. Ready endpoints, when there is one; otherwise the ones that are terminating but still
//!    serving (KEP-1669, "ProxyTerminatingEndpoints"): a lane whose pods are all being
//!    replaced keeps serving its callers until its last pod stops serving.
//! 3. Among ready endpoints, the closest ones when the Service asks for it and some exist:
//!    `trafficDistribution: PreferSameNode` → on this node (or hinted for it); then zone hints
//!    (`hints.forZones`, used as kube-proxy does only when every ready endpoint of the lane
//!    carries them) naming this node's zone; without hints, `PreferClose` / `PreferSameZone`
//!    → endpoints whose `zone` is this node's. No close endpoint → all ready ones.
//!
//! Endpoints left out here still serve: their open connections are never reset (see
//! [`crate::lifecycle`]); they are only not picked for new ones.

use super::objects::{Placement, Topology};

/// This node, as the topology rules read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// `spec.nodeName` of this node's pods (`--node-name`).
    pub name: Option<String>,
    /// The Node object's `topology.kubernetes.io/zone` label, once known.
    pub zone: Option<String>,
}

/// The label holding a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A serving endpoint as the rules see it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// Terminating but still serving.
    pub terminating: bool,
    /// Node, zone and hints, when the slice states them.
    pub place: Option<&'a Placement>,
}

impl Node {
    fn runs(&self, c: &Candidate<'_>) -> bool {
        self.name.is_some() && c.place.and_then(|p| p.node.as_deref()) == self.name.as_deref()
    }

    fn hinted_for_node(&self, c: &Candidate<'_>) -> bool {
        let Some(name) = self.name.as_deref() else { return false };
        c.place.is_some_and(|p| p.for_nodes.iter().any(|n| &**n == name))
    }
}

/// Which of `candidates` (one lane's serving endpoints) new connections go to, as a mask in
/// the same order. See the module documentation for the rules.
#[must_use]
pub fn usable(node: &Node, topology: Topology, candidates: &[Candidate<'_>]) -> Vec<bool> {
    let allowed: Vec<bool> = candidates.iter().map(|c| !topology.node_local || node.runs(c)).collect();
    let ready: Vec<bool> = candidates.iter().zip(&allowed).map(|(c, &a)| a && !c.terminating).collect();
    if !ready.contains(&true) {
        return candidates.iter().zip(&allowed).map(|(c, &a)| a && c.terminating).collect();
    }
    let narrowed = |keep: &dyn Fn(&Candidate<'_>) -> bool| -> Option<Vec<bool>> {
        let mask: Vec<bool> = candidates.iter().zip(&ready).map(|(c, &r)| r && keep(c)).collect();
        mask.contains(&true).then_some(mask)
    };
    if topology.prefer_node
        && let Some(mask) = narrowed(&|c| node.runs(c) || node.hinted_for_node(c))
    {
        return mask;
    }
    if let Some(zone) = node.zone.as_deref() {
        let hinted = candidates
            .iter()
            .zip(&ready)
            .filter(|&(_, &r)| r)
            .all(|(c, _)| c.place.is_some_and(|p| !p.for_zones.is_empty()));
        let close = if hinted {
            narrowed(&|c| c.place.is_some_and(|p| p.for_zones.iter().any(|z| &**z == zone)))
        } else if topology.prefer_zone || topology.prefer_node {
            narrowed(&|c| c.place.and_then(|p| p.zone.as_deref()) == Some(zone))
        } else {
            None
        };
        if let Some(mask) = close {
            return mask;
        }
    }
    ready
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(node: &str, zone: &str, for_zones: &[&str]) -> Placement {
        Placement {
            node: Some(node.into()),
            zone: Some(zone.into()),
            for_zones: for_zones.iter().map(|z| Box::from(*z)).collect(),
            for_nodes: Box::default(),
        }
    }

    fn here() -> Node {
        Node { name: Some("n1".into()), zone: Some("z1".into()) }
    }

    fn cands<'a>(places: &[(bool, &'a Placement)]) -> Vec<Candidate<'a>> {
        places.iter().map(|&(terminating, p)| Candidate { terminating, place: Some(p) }).collect()
    }

    const CLUSTER: Topology = Topology { node_local: false, prefer_zone: false, prefer_node: false };
    const LOCAL: Topology = Topology { node_local: true, prefer_zone: false, prefer_node: false };
    const CLOSE: Topology = Topology { node_local: false, prefer_zone: true, prefer_node: false };
    const SAME_NODE: Topology = Topology { node_local: false, prefer_zone: false, prefer_node: true };

    #[test]
    fn ready_endpoints_go_first_then_terminating_ones_that_still_serve() {
        let (a, b) = (place("n1", "z1", &[]), place("n2", "z1", &[]));
        assert_eq!(usable(&here(), CLUSTER, &cands(&[(false, &a), (true, &b)])), [true, false]);
        // No ready endpoint in the lane: the serving-terminating ones.
        assert_eq!(usable(&here(), CLUSTER, &cands(&[(true, &a), (true, &b)])), [true, true]);
        assert!(usable(&here(), CLUSTER, &[]).is_empty());
    }

    #[test]
    fn internal_traffic_policy_local_uses_this_nodes_endpoints_only() {
        let (a, b) = (place("n1", "z1", &[]), place("n2", "z1", &[]));
        assert_eq!(usable(&here(), LOCAL, &cands(&[(false, &a), (false, &b)])), [true, false]);
        // Nothing on this node: nothing usable (not the remote ones).
        assert_eq!(usable(&here(), LOCAL, &cands(&[(false, &b)])), [false]);
        // A local terminating endpoint beats a remote ready one.
        assert_eq!(usable(&here(), LOCAL, &cands(&[(true, &a), (false, &b)])), [true, false]);
        // Without a node name nothing is local.
        assert_eq!(usable(&Node::default(), LOCAL, &cands(&[(false, &a)])), [false]);
        // An endpoint without a node is never local.
        assert_eq!(usable(&here(), LOCAL, &[Candidate { terminating: false, place: None }]), [false]);
    }

    #[test]
    fn zone_hints_narrow_when_every_ready_endpoint_has_them() {
        let (a, b, c) = (place("n2", "z1", &["z1"]), place("n3", "z2", &["z2"]), place("n4", "z2", &[]));
        assert_eq!(usable(&here(), CLUSTER, &cands(&[(false, &a), (false, &b)])), [true, false]);
        // One ready endpoint without hints: kube-proxy ignores hints for the whole set.
        assert_eq!(usable(&here(), CLUSTER, &cands(&[(false, &a), (false, &c)])), [true, true]);
        // No endpoint hinted for this zone: all of them.
        assert_eq!(usable(&here(), CLUSTER, &cands(&[(false, &b)])), [true]);
        // Zone unknown: all of them.
        let nowhere = Node { name: Some("n1".into()), zone: None };
        assert_eq!(usable(&nowhere, CLUSTER, &cands(&[(false, &a), (false, &b)])), [true, true]);
    }

    #[test]
    fn prefer_close_without_hints_uses_the_endpoints_zone() {
        let (a, b) = (place("n2", "z1", &[]), place("n3", "z2", &[]));
        assert_eq!(usable(&here(), CLOSE, &cands(&[(false, &a), (false, &b)])), [true, false]);
        assert_eq!(usable(&here(), CLUSTER, &cands(&[(false, &a), (false, &b)])), [true, true]);
        assert_eq!(usable(&here(), CLOSE, &cands(&[(false, &b)])), [true]);
    }

    #[test]
    fn prefer_same_node_then_zone() {
        let (a, b, c) = (place("n1", "z1", &[]), place("n2", "z1", &[]), place("n3", "z2", &[]));
        assert_eq!(
            usable(&here(), SAME_NODE, &cands(&[(false, &a), (false, &b), (false, &c)])),
            [true, false, false]
        );
        assert_eq!(usable(&here(), SAME_NODE, &cands(&[(false, &b), (false, &c)])), [true, false]);
        let mut hinted = place("n5", "z2", &[]);
        hinted.for_nodes = vec![Box::from("n1")].into_boxed_slice();
        assert_eq!(usable(&here(), SAME_NODE, &cands(&[(false, &hinted), (false, &b)])), [true, false]);
    }
}
