//! What one node observed, from its pinned maps: works while the agent is down, and is what the
//! agent's `/metrics` renders (`tagger_lane_edges_total`, `tagger_lane_arrivals_total`,
//! `tagger_service_lane_backends`), so a Prometheus over every node sums the same rows.

use std::collections::{BTreeMap, BTreeSet};

use tagger_common::{INBOUND_UNKNOWN_LANE, INBOUND_UNTAGGED, Outcome, inbound_kind_name};

use super::{Arrival, Edge, Observed, Peer, workload_of};
use crate::{
    Result,
    datapath::{Tables, lane_label},
};

/// Reads the node's edges, arrivals and the lanes each Service has backends in.
pub fn observe(t: &Tables) -> Result<Observed> {
    let names = Names { lanes: t.lane_names()?, services: t.service_meta()? };
    let peers = Peers::read(t, &names)?;
    let service = |svc_id: u32| {
        names.services.get(&svc_id).map_or_else(
            || Peer::service("", &format!("svc {svc_id}")),
            |(namespace, name, _)| Peer::service(namespace, name),
        )
    };
    let edges = t
        .edges()?
        .into_iter()
        .map(|row| Edge {
            caller: peers.of(row.key.caller),
            caller_lane: names.lane_label(row.key.caller_lane),
            service: service(row.key.svc_id),
            backend_lane: names.lane_label(row.key.backend_lane),
            outcome: Outcome::ALL.get(row.key.outcome as usize).map_or("unknown", |o| o.name()).to_owned(),
            connections: row.count,
        })
        .collect();
    // Rows of an address that is no longer a local pod's are left out (the agent prunes them).
    let arrivals = t
        .inbound()?
        .into_iter()
        .filter_map(|row| {
            let pod = peers.pod_addrs.get(&row.key.addr)?;
            let no_lane = matches!(row.key.kind, INBOUND_UNTAGGED | INBOUND_UNKNOWN_LANE);
            Some(Arrival {
                receiver: peers.of(pod.cgroup),
                pod_lane: names.lane_label(row.key.pod_lane),
                caller_lane: if no_lane { String::new() } else { names.lane_label(row.key.caller_lane) },
                kind: inbound_kind_name(row.key.kind).to_owned(),
                connections: row.count,
            })
        })
        .collect();
    // Merged and sorted by `coverage::report`; the metrics add rows of equal labels up.
    Ok(Observed { edges, arrivals, lane_backends: peers.lane_backends })
}

/// The names the agent published: lanes, and Services by id (namespace, name, port).
struct Names {
    lanes: BTreeMap<u32, String>,
    services: BTreeMap<u32, (String, String, String)>,
}

impl Names {
    fn lane_label(&self, id: u32) -> String {
        lane_label(&self.lanes, id)
    }
}

/// Local pods named as peers, and every Service's backends per lane.
struct Peers {
    /// Local pod cgroup → the peer it is.
    by_cgroup: BTreeMap<u64, Peer>,
    /// Service → lane → backends (the largest of its frontends' sets).
    lane_backends: BTreeMap<Peer, BTreeMap<String, u64>>,
    /// The local pods by address (read once, for the peers and the arrivals).
    pod_addrs: BTreeMap<[u32; 4], tagger_common::PodAddr>,
}

impl Peers {
    fn read(t: &Tables, names: &Names) -> Result<Self> {
        let pod_addrs = t.pod_addrs()?;
        let local: BTreeSet<[u32; 4]> = pod_addrs.keys().copied().collect();
        // Which Services each local pod address backs, from every live set.
        let mut services_of = BTreeMap::<[u32; 4], BTreeSet<(String, String)>>::new();
        let mut lane_backends = BTreeMap::<Peer, BTreeMap<String, u64>>::new();
        for (key, set) in t.backend_sets()? {
            let Some((namespace, name, _)) = names.services.get(&key.svc_id) else { continue };
            if set.count > 0 {
                let n = lane_backends
                    .entry(Peer::service(namespace, name))
                    .or_default()
                    .entry(names.lane_label(key.lane))
                    .or_default();
                *n = (*n).max(u64::from(set.count));
            }
            for b in t.backends(key.svc_id, key.lane)? {
                if local.contains(&b.addr) {
                    services_of.entry(b.addr).or_default().insert((namespace.clone(), name.clone()));
                }
            }
        }
        let meta = t.pod_meta()?;
        let mut by_cgroup = BTreeMap::<u64, BTreeSet<(String, String)>>::new();
        for (addr, pod) in &pod_addrs {
            let entry = by_cgroup.entry(pod.cgroup).or_default();
            entry.extend(services_of.get(addr).into_iter().flatten().cloned());
        }
        let by_cgroup = by_cgroup
            .into_iter()
            .map(|(cgroup, services)| (cgroup, peer(cgroup, &services, meta.get(&cgroup))))
            .collect();
        Ok(Self { by_cgroup, lane_backends, pod_addrs })
    }

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
