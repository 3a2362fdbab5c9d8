//! The coverage rows as Prometheus series: the label sets the agent's `/metrics` writes and the
//! `--prometheus` source reads back (one definition for both directions).

use prometheus_client::encoding::EncodeLabelSet;
use serde::Deserialize;

use super::{Arrival, Edge, Peer, PeerKind};

/// `tagger_lane_edges_total` (a counter, registered under the agent's `tagger` prefix).
pub const EDGES: &str = "lane_edges";
/// `tagger_lane_arrivals_total` (a counter).
pub const ARRIVALS: &str = "lane_arrivals";
/// `tagger_service_lane_backends` (a gauge).
pub const LANE_BACKENDS: &str = "service_lane_backends";

/// The full name of a series as Prometheus stores it.
#[must_use]
pub fn full_name(series: &str) -> String {
    if series == LANE_BACKENDS { format!("tagger_{series}") } else { format!("tagger_{series}_total") }
}

/// Labels of one call edge. Prometheus drops labels whose value is empty, hence the defaults.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
#[serde(default)]
pub struct EdgeLabels {
    /// `service` or `workload`.
    pub caller_kind: String,
    /// The caller's namespace.
    pub caller_namespace: String,
    /// The caller's Service name(s) or workload.
    pub caller: String,
    /// The caller's lane.
    pub caller_lane: String,
    /// The Service's namespace.
    pub namespace: String,
    /// The Service.
    pub service: String,
    /// The lane of the backend chosen.
    pub backend_lane: String,
    /// The datapath's outcome.
    pub outcome: String,
}

impl EdgeLabels {
    /// The labels of an edge.
    #[must_use]
    pub fn of(e: &Edge) -> Self {
        Self {
            caller_kind: e.caller.kind.name().to_owned(),
            caller_namespace: e.caller.namespace.clone(),
            caller: e.caller.name.clone(),
            caller_lane: e.caller_lane.clone(),
            namespace: e.service.namespace.clone(),
            service: e.service.name.clone(),
            backend_lane: e.backend_lane.clone(),
            outcome: e.outcome.clone(),
        }
    }

    /// The edge back (`None`: an unknown caller kind).
    #[must_use]
    pub fn edge(self, connections: u64) -> Option<Edge> {
        Some(Edge {
            caller: Peer {
                kind: PeerKind::parse(&self.caller_kind)?,
                namespace: self.caller_namespace,
                name: self.caller,
            },
            caller_lane: self.caller_lane,
            service: Peer::service(&self.namespace, &self.service),
            backend_lane: self.backend_lane,
            outcome: self.outcome,
            connections,
        })
    }
}

/// Labels of one arrival row.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
#[serde(default)]
pub struct ArrivalLabels {
    /// `service` or `workload`.
    pub receiver_kind: String,
    /// The receiver's namespace.
    pub receiver_namespace: String,
    /// The receiver's Service name(s) or workload.
    pub receiver: String,
    /// The accepting pod's lane.
    pub pod_lane: String,
    /// The caller's lane (empty: untagged or unknown).
    pub caller_lane: String,
    /// `in_lane`, `fell_back`, `routed`, `leak`, `untagged`, `unknown_lane`.
    pub kind: String,
}

impl ArrivalLabels {
    /// The labels of an arrival row.
    #[must_use]
    pub fn of(a: &Arrival) -> Self {
        Self {
            receiver_kind: a.receiver.kind.name().to_owned(),
            receiver_namespace: a.receiver.namespace.clone(),
            receiver: a.receiver.name.clone(),
            pod_lane: a.pod_lane.clone(),
            caller_lane: a.caller_lane.clone(),
            kind: a.kind.clone(),
        }
    }

    /// The row back (`None`: an unknown receiver kind).
    #[must_use]
    pub fn arrival(self, connections: u64) -> Option<Arrival> {
        Some(Arrival {
            receiver: Peer {
                kind: PeerKind::parse(&self.receiver_kind)?,
                namespace: self.receiver_namespace,
                name: self.receiver,
            },
            pod_lane: self.pod_lane,
            caller_lane: self.caller_lane,
            kind: self.kind,
            connections,
        })
    }
}

/// Labels of a Service's backends in one lane.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
#[serde(default)]
pub struct LaneBackendLabels {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service.
    pub service: String,
    /// The lane.
    pub lane: String,
}
