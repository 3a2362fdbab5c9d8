//! What one node observed, from its pinned maps: works while the agent is down, and is what the
//! agent's `/metrics` renders (`tagger_lane_edges_total`, `tagger_lane_arrivals_total`,
//! `tagger_service_lane_backends`), so a Prometheus over every node sums the same rows.

use std::collections::{BTreeMap, BTreeSet};

use tagger_common::{BackendSet, INBOUND_UNKNOWN_LANE, INBOUND_UNTAGGED, Outcome, SetKey, inbound_kind_name};

use super::{Arrival, Edge, Observed, Peer, workload_of};
use crate::{
    Result,
    datapath::{EdgeRow, InboundRow, Tables, lane_label},
};

/// The maps coverage reads, each read once: the CLI's report and the agent's `/metrics` (its
/// per-pod inbound series as well as the coverage rows) share one read per scrape.
#[derive(Debug, Default)]
pub struct Pins {
    /// Lane names by id.
    pub lanes: BTreeMap<u32, String>,
    /// Services by id: (namespace, name, port).
    pub services: BTreeMap<u32, (String, String, String)>,
    /// The local pods by address.
    pub pod_addrs: BTreeMap<[u32; 4], tagger_common::PodAddr>,
    /// The local pods' (namespace, name) by cgroup id.
    pub pod_meta: BTreeMap<u64, (String, String)>,
    /// Connections accepted by local pods.
    pub inbound: Vec<InboundRow>,
    /// Call edges of local pods.
    edges: Vec<EdgeRow>,
    /// Every backend set's header, by (svc_id, lane).
    pub sets: BTreeMap<SetKey, BackendSet>,
    /// Service → lane → backends (the largest of its frontends' sets).
    lane_backends: BTreeMap<Peer, BTreeMap<String, u64>>,
    /// Which Services each local pod address backs.
    services_of: BTreeMap<[u32; 4], BTreeSet<(String, String)>>,
}

impl Pins {
    /// Reads them.
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn read(t: &Tables) -> Result<Self> {
        let mut pins = Self {
            lanes: t.lane_names()?,
            services: t.service_meta()?,
            pod_addrs: t.pod_addrs()?,
            pod_meta: t.pod_meta()?,
            inbound: t.inbound()?,
            edges: t.edges()?,
            sets: t.backend_sets()?,
            ..Self::default()
        };
        // Which Services each local pod address backs, from every live set (walking the slots
        // only while this node has pods with addresses).
        for (key, set) in &pins.sets {
            let Some((namespace, name, _)) = pins.services.get(&key.svc_id) else { continue };
            if set.count > 0 {
                let n = pins
                    .lane_backends
                    .entry(Peer::service(namespace, name))
                    .or_default()
                    .entry(lane_label(&pins.lanes, key.lane))
                    .or_default();
                *n = (*n).max(u64::from(set.count));
            }
            if pins.pod_addrs.is_empty() {
                continue;
            }
            for b in t.backends(key.svc_id, key.lane)? {
                if pins.pod_addrs.contains_key(&b.addr) {
                    pins.services_of.entry(b.addr).or_default().insert((namespace.clone(), name.clone()));
                }
            }
        }
        Ok(pins)
    }

    /// The lane label of an id.
    #[must_use]
    pub fn lane_label(&self, id: u32) -> String {
        lane_label(&self.lanes, id)
    }

    /// The node's edges, arrivals and the lanes each Service has backends in.
    #[must_use]
    pub fn observe(&self) -> Observed {
        let peers = self.peers();
        let service = |svc_id: u32| {
            self.services.get(&svc_id).map_or_else(
                || Peer::service("", &format!("svc {svc_id}")),
                |(namespace, name, _)| Peer::service(namespace, name),
            )
        };
        let edges = self
            .edges
            .iter()
            .map(|row| Edge {
                caller: peers.of(row.key.caller),
                caller_lane: self.lane_label(row.key.caller_lane),
                service: service(row.key.svc_id),
                backend_lane: self.lane_label(row.key.backend_lane),
                outcome: Outcome::ALL
                    .get(row.key.outcome as usize)
                    .map_or("unknown", |o| o.name())
                    .to_owned(),
                connections: row.count,
            })
            .collect();
        // Rows of an address that is no longer a local pod's are left out (the agent prunes them).
        let arrivals = self
            .inbound
            .iter()
            .filter_map(|row| {
                let pod = self.pod_addrs.get(&row.key.addr)?;
                let no_lane = matches!(row.key.kind, INBOUND_UNTAGGED | INBOUND_UNKNOWN_LANE);
                Some(Arrival {
                    receiver: peers.of(pod.cgroup),
                    pod_lane: self.lane_label(row.key.pod_lane),
                    caller_lane: if no_lane { String::new() } else { self.lane_label(row.key.caller_lane) },
                    kind: inbound_kind_name(row.key.kind).to_owned(),
                    connections: row.count,
                })
            })
            .collect();
        // Merged and sorted by `coverage::report`; the metrics add rows of equal labels up.
        Observed { edges, arrivals, lane_backends: self.lane_backends.clone() }
    }

    /// The local pods named as peers.
    fn peers(&self) -> Peers {
        let mut by_cgroup = BTreeMap::<u64, BTreeSet<(String, String)>>::new();
        for (addr, pod) in &self.pod_addrs {
            let entry = by_cgroup.entry(pod.cgroup).or_default();
            entry.extend(self.services_of.get(addr).into_iter().flatten().cloned());
        }
        let by_cgroup = by_cgroup
            .into_iter()
            .map(|(cgroup, services)| (cgroup, peer(cgroup, &services, self.pod_meta.get(&cgroup))))
            .collect();
        Peers { by_cgroup }
    }
}

/// Reads the node's edges, arrivals and the lanes each Service has backends in.
///
/// # Errors
/// When a map cannot be read.
pub fn observe(t: &Tables) -> Result<Observed> {
    Pins::read(t).map(|p| p.observe())
}

/// Local pods named as peers.
struct Peers {
    /// Local pod cgroup → the peer it is.
    by_cgroup: BTreeMap<u64, Peer>,
}

impl Peers {
    /// The peer of a local pod; a pod without an address or names is named by its cgroup id.
    fn of(&self, cgroup: u64) -> Peer {
        self.by_cgroup
            .get(&cgroup)
            .cloned()
            .unwrap_or_else(|| Peer::workload("", &format!("pod cgroup {cgroup}")))
    }
}

/// A pod backing Services is named after them (sorted, comma-separated, in the first one's
/// namespace); any other after its workload.
fn peer(cgroup: u64, services: &BTreeSet<(String, String)>, meta: Option<&(String, String)>) -> Peer {
    if let Some((namespace, _)) = services.first() {
        let names: Vec<&str> = services.iter().map(|(_, n)| n.as_str()).collect();
        return Peer::service(namespace, &names.join(","));
    }
    match meta {
        Some((namespace, name)) => Peer::workload(namespace, workload_of(name)),
        None => Peer::workload("", &format!("pod cgroup {cgroup}")),
    }
}
