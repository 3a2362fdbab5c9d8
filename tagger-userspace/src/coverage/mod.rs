//! Lane coverage: where each lane holds along the call graph, where it falls back, and where it
//! **stops** — the Service after which a lane's requests continue in another lane although
//! something further down has a version in the lane.
//!
//! A decision is per connection and per calling pod (see the README's Limits): a gray request
//! that reaches a Service with no gray backend lands on a base pod, and every call that pod
//! makes is a base call. So the lane stops at that Service whenever a Service it calls has gray
//! backends. The datapath counts what this needs, per node:
//! - the **call edges** of each local pod (`TAGGER_EDGE_V1`): calling pod → Service, caller
//!   lane, backend lane, outcome;
//! - the **arrivals** at each local pod (`TAGGER_INB_V2`): the caller's lane from the SYN's lane
//!   option, the pod's lane, and whether the caller fell back, was routed, or leaked.
//!
//! Pods are named as **peers**: by the Services they back (the Service's pods are the pods
//! whose address is one of its backends), else by their workload (see [`workload_of`]). Two
//! sources produce the same [`Observed`]: one node's pins ([`pins`]) and a Prometheus that
//! scrapes every node's agent ([`prometheus`]), whose metrics the agent renders from the pins
//! through the same conversion. [`report`] turns it into the [`CoverageReport`]; the CLI
//! prints it as tables, JSON or a graphviz graph.

pub mod dot;
pub mod pins;
pub mod prometheus;
pub mod series;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tagger_common::Outcome;

/// What a peer is named after.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerKind {
    /// The Service (or Services, comma-separated) whose backends include the pod.
    Service,
    /// The pod's workload, from its name (the pod backs no Service).
    Workload,
}

impl PeerKind {
    /// The label value (`service`, `workload`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Workload => "workload",
        }
    }

    /// Parses [`PeerKind::name`].
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "service" => Some(Self::Service),
            "workload" => Some(Self::Workload),
            _ => None,
        }
    }
}

/// A caller or a receiver: a Service or a workload, in a namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Peer {
    /// What the name is.
    pub kind: PeerKind,
    /// Namespace.
    pub namespace: String,
    /// Service name(s) or workload name.
    pub name: String,
}

impl Peer {
    /// A Service.
    #[must_use]
    pub fn service(namespace: &str, name: &str) -> Self {
        Self { kind: PeerKind::Service, namespace: namespace.to_owned(), name: name.to_owned() }
    }

    /// A workload.
    #[must_use]
    pub fn workload(namespace: &str, name: &str) -> Self {
        Self { kind: PeerKind::Workload, namespace: namespace.to_owned(), name: name.to_owned() }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// New connections from a caller to a Service, by lanes and outcome.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Edge {
    /// Who called.
    pub caller: Peer,
    /// The caller's lane.
    pub caller_lane: String,
    /// The Service called.
    pub service: Peer,
    /// The lane of the backend chosen (base for a Service left to the cluster).
    pub backend_lane: String,
    /// The datapath's outcome name (`steered`, `fell_back`, `passthrough`, ...).
    pub outcome: String,
    /// Connections.
    pub connections: u64,
}

/// Connections accepted by a receiver's pods, by the caller's lane.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Arrival {
    /// Whose pods accepted them.
    pub receiver: Peer,
    /// The accepting pod's lane.
    pub pod_lane: String,
    /// The caller's lane from the lane option (empty: no option, or an unknown lane).
    pub caller_lane: String,
    /// `in_lane`, `fell_back`, `routed`, `leak`, `untagged`, `unknown_lane`.
    pub kind: String,
    /// Connections.
    pub connections: u64,
}

/// What one node, or a whole cluster, observed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Observed {
    /// Call edges.
    pub edges: Vec<Edge>,
    /// Arrivals.
    pub arrivals: Vec<Arrival>,
    /// Each Service's backends now, by lane (lanes without any are left out). In JSON a list
    /// of `{service, lanes: {lane: backends}}`.
    #[serde(serialize_with = "lane_backends_json")]
    pub lane_backends: BTreeMap<Peer, BTreeMap<String, u64>>,
}

/// JSON objects need string keys: the map as a list.
fn lane_backends_json<S: serde::Serializer>(
    map: &BTreeMap<Peer, BTreeMap<String, u64>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Row<'a> {
        service: &'a Peer,
        lanes: &'a BTreeMap<String, u64>,
    }
    s.collect_seq(map.iter().map(|(service, lanes)| Row { service, lanes }))
}

impl Observed {
    /// Rows with the same key merged (counts summed), empty rows dropped, everything sorted:
    /// the form two sources are compared in.
    #[must_use]
    pub fn normalized(self) -> Self {
        let mut edges = BTreeMap::<Edge, u64>::new();
        for e in self.edges {
            let n = e.connections;
            *edges.entry(Edge { connections: 0, ..e }).or_default() += n;
        }
        let mut arrivals = BTreeMap::<Arrival, u64>::new();
        for a in self.arrivals {
            let n = a.connections;
            *arrivals.entry(Arrival { connections: 0, ..a }).or_default() += n;
        }
        Self {
            edges: edges
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(e, connections)| Edge { connections, ..e })
                .collect(),
            arrivals: arrivals
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(a, connections)| Arrival { connections, ..a })
                .collect(),
            lane_backends: self
                .lane_backends
                .into_iter()
                .map(|(svc, lanes)| {
                    (svc, lanes.into_iter().filter(|(_, n)| *n > 0).collect::<BTreeMap<_, _>>())
                })
                .filter(|(_, lanes)| !lanes.is_empty())
                .collect(),
        }
    }
}

/// How a lane fared on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A backend of the caller's own lane.
    Held,
    /// Another lane along the caller's fallback chain, or a Service tagger leaves to the
    /// cluster because it has base backends only.
    FellBack,
    /// A routing rule or canary share chose the lane on purpose.
    Routed,
    /// A strict lane or Service refused the connection.
    Refused,
    /// No backend in any lane the caller may use: left to the cluster, whose Service
    /// implementation may pick a backend of any lane.
    LeftToCluster,
}

impl Verdict {
    /// The verdict of an outcome (by its datapath name).
    #[must_use]
    pub fn of(outcome: &str) -> Option<Self> {
        let o = |x: Outcome| x.name() == outcome;
        if o(Outcome::Steered) {
            Some(Self::Held)
        } else if o(Outcome::FellBack) || o(Outcome::Passthrough) {
            Some(Self::FellBack)
        } else if o(Outcome::Routed) || o(Outcome::Canary) {
            Some(Self::Routed)
        } else if o(Outcome::RefusedStrict) {
            Some(Self::Refused)
        } else if o(Outcome::NoBackend) {
            Some(Self::LeftToCluster)
        } else {
            None
        }
    }

    /// For people.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::FellBack => "fell back",
            Self::Routed => "routed",
            Self::Refused => "refused",
            Self::LeftToCluster => "left to the cluster",
        }
    }
}

/// One caller → Service edge of a lane, its connections by verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LaneEdge {
    /// Who called.
    pub caller: Peer,
    /// The Service.
    pub service: Peer,
    /// Connections by verdict.
    pub verdicts: BTreeMap<Verdict, u64>,
    /// Connections by the lane of the backend chosen.
    pub backend_lanes: BTreeMap<String, u64>,
    /// The whole edge in words: `held`, `fell back`, `partly held (…)`, ...
    pub summary: String,
}

/// A Service where a lane fell back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stop {
    /// The Service.
    pub service: Peer,
    /// No connection of the lane held there (false: some did).
    pub only_fallback: bool,
    /// The lanes its callers were sent to instead.
    pub continued_in: BTreeSet<String>,
    /// Whether the Service has backends in the lane now (false: none; true: they were not
    /// ready when the callers came).
    pub has_lane_backends: bool,
    /// Services the Service's pods of those lanes call that have backends in the lane: where
    /// the lane could have continued. Empty: the fallback loses nothing downstream.
    pub lane_capable_callees: Vec<Peer>,
    /// Whether the lane stops here (a callee has backends in the lane).
    pub breaks: bool,
    /// The finding in words.
    pub message: String,
}

/// Connections that reached a pod of another lane without falling back or being routed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Leak {
    /// Whose pods accepted them.
    pub receiver: Peer,
    /// Those pods' lane.
    pub pod_lane: String,
    /// Connections.
    pub connections: u64,
}

/// One lane's coverage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LaneCoverage {
    /// The lane.
    pub lane: String,
    /// Its callers' edges.
    pub edges: Vec<LaneEdge>,
    /// Services where it fell back, break points first.
    pub stops: Vec<Stop>,
    /// Lane leaks seen by the receivers.
    pub leaks: Vec<Leak>,
    /// Services with backends in the lane that no caller of the lane reached.
    pub not_reached: Vec<Peer>,
    /// The lane in one line.
    pub summary: String,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CoverageReport {
    /// Where the numbers come from (`node pins <dir>`, `prometheus <url>`).
    pub source: String,
    /// Every lane other than base that has callers or backends, by name.
    pub lanes: Vec<LaneCoverage>,
    /// The edges of base callers (the rest of the call graph: where a lane that stopped
    /// continues).
    pub base_edges: Vec<LaneEdge>,
    /// What was observed.
    pub observed: Observed,
}

/// Builds the report.
#[must_use]
pub fn report(source: &str, observed: Observed) -> CoverageReport {
    let observed = observed.normalized();
    let mut lanes: BTreeSet<&str> = observed.edges.iter().map(|e| e.caller_lane.as_str()).collect();
    lanes.extend(observed.lane_backends.values().flat_map(BTreeMap::keys).map(String::as_str));
    lanes.remove("base");
    let lanes = lanes.into_iter().map(|lane| lane_coverage(&observed, lane)).collect();
    let base_edges = lane_edges(&observed, "base");
    CoverageReport { source: source.to_owned(), lanes, base_edges, observed }
}

/// The edges of one caller lane, merged per (caller, Service).
fn lane_edges(observed: &Observed, lane: &str) -> Vec<LaneEdge> {
    let mut by_pair = BTreeMap::<(&Peer, &Peer), LaneEdge>::new();
    for e in observed.edges.iter().filter(|e| e.caller_lane == lane) {
        let Some(verdict) = Verdict::of(&e.outcome) else { continue };
        let edge = by_pair.entry((&e.caller, &e.service)).or_insert_with(|| LaneEdge {
            caller: e.caller.clone(),
            service: e.service.clone(),
            verdicts: BTreeMap::new(),
            backend_lanes: BTreeMap::new(),
            summary: String::new(),
        });
        *edge.verdicts.entry(verdict).or_default() += e.connections;
        *edge.backend_lanes.entry(e.backend_lane.clone()).or_default() += e.connections;
    }
    by_pair
        .into_values()
        .map(|mut e| {
            e.summary = edge_summary(&e);
            e
        })
        .collect()
}

/// `held`, `fell back to base`, or `partly: 8 held, 2 fell back` in words.
fn edge_summary(e: &LaneEdge) -> String {
    let other_lanes = || e.backend_lanes.keys().cloned().collect::<Vec<_>>().join(", ");
    match e.verdicts.iter().collect::<Vec<_>>().as_slice() {
        [(Verdict::FellBack, _)] => format!("fell back to {}", other_lanes()),
        [(Verdict::Routed, _)] => format!("routed to {}", other_lanes()),
        [(v, _)] => v.label().to_owned(),
        many => format!(
            "partly: {}",
            many.iter().map(|(v, n)| format!("{n} {}", v.label())).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn lane_coverage(observed: &Observed, lane: &str) -> LaneCoverage {
    let edges = lane_edges(observed, lane);
    let has_lane = |svc: &Peer| observed.lane_backends.get(svc).is_some_and(|l| l.contains_key(lane));
    // Per Service reached: held connections and the lanes fallen back to.
    let mut reached = BTreeMap::<&Peer, (u64, BTreeSet<String>)>::new();
    for e in &edges {
        let r = reached.entry(&e.service).or_default();
        r.0 += e.verdicts.get(&Verdict::Held).copied().unwrap_or(0);
        if e.verdicts.contains_key(&Verdict::FellBack) {
            r.1.extend(e.backend_lanes.keys().filter(|l| *l != lane).cloned());
        }
    }
    let mut stops: Vec<Stop> = reached
        .iter()
        .filter(|(_, (_, fell))| !fell.is_empty())
        .map(|(svc, (held, fell))| stop(observed, lane, svc, *held == 0, fell, has_lane(svc)))
        .collect();
    stops.sort_by(|a, b| b.breaks.cmp(&a.breaks).then_with(|| a.service.cmp(&b.service)));
    let leaks = observed
        .arrivals
        .iter()
        .filter(|a| {
            a.kind == tagger_common::inbound_kind_name(tagger_common::INBOUND_LEAK) && a.caller_lane == lane
        })
        .map(|a| Leak {
            receiver: a.receiver.clone(),
            pod_lane: a.pod_lane.clone(),
            connections: a.connections,
        })
        .collect::<Vec<_>>();
    let not_reached = observed
        .lane_backends
        .iter()
        .filter(|(svc, lanes)| lanes.contains_key(lane) && !reached.contains_key(svc))
        .map(|(svc, _)| svc.clone())
        .collect::<Vec<_>>();
    let summary = lane_summary(lane, &edges, &stops, &leaks);
    LaneCoverage { lane: lane.to_owned(), edges, stops, leaks, not_reached, summary }
}

fn stop(
    observed: &Observed,
    lane: &str,
    svc: &Peer,
    only_fallback: bool,
    continued_in: &BTreeSet<String>,
    has_lane_backends: bool,
) -> Stop {
    // What the Service's pods of the lanes its callers fell back to call, where the lane
    // exists: the calls the lane's requests make from here on, in another lane.
    let callees: BTreeSet<&Peer> = observed
        .edges
        .iter()
        .filter(|e| &e.caller == svc && continued_in.contains(&e.caller_lane))
        .filter(|e| observed.lane_backends.get(&e.service).is_some_and(|l| l.contains_key(lane)))
        .map(|e| &e.service)
        .collect();
    let lane_capable_callees: Vec<Peer> = callees.into_iter().cloned().collect();
    let breaks = !lane_capable_callees.is_empty();
    let fallback = continued_in.iter().cloned().collect::<Vec<_>>().join(", ");
    let why = if has_lane_backends {
        format!("its {lane} backends were not ready")
    } else {
        format!("no {lane} backend")
    };
    let reach = if only_fallback {
        format!("callers reach {svc} only in {fallback} ({why})")
    } else {
        format!("some callers reach {svc} in {fallback} ({why})")
    };
    let message = if breaks {
        let names = lane_capable_callees.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        let which = if lane_capable_callees.len() == 1 { "which has" } else { "which have" };
        format!("lane {lane}: {reach}; {svc} calls {names}, {which} {lane} backends: {lane} stops at {svc}")
    } else {
        format!(
            "lane {lane}: {reach}; nothing {svc} calls has a {lane} version, so nothing is lost downstream"
        )
    };
    Stop {
        service: svc.clone(),
        only_fallback,
        continued_in: continued_in.clone(),
        has_lane_backends,
        lane_capable_callees,
        breaks,
        message,
    }
}

fn lane_summary(lane: &str, edges: &[LaneEdge], stops: &[Stop], leaks: &[Leak]) -> String {
    let breaks: Vec<String> = stops.iter().filter(|s| s.breaks).map(|s| s.service.to_string()).collect();
    let leaked: u64 = leaks.iter().map(|l| l.connections).sum();
    let mut parts = Vec::new();
    if edges.is_empty() {
        parts.push(format!("no {lane} caller seen"));
    } else if breaks.is_empty() {
        parts.push(format!("{lane} holds wherever a {lane} version exists"));
    } else {
        parts.push(format!("{lane} stops at {}", breaks.join(", ")));
    }
    if leaked > 0 {
        parts.push(format!("{leaked} connections leaked into other lanes"));
    }
    format!("lane {lane}: {}", parts.join("; "))
}

/// A pod's workload, from the suffixes Kubernetes' controllers generate: a Deployment's pod
/// `web-7d4b9c8f5d-x2x4q` → `web`, a DaemonSet's, ReplicaSet's or Job's `agent-x2x4q` →
/// `agent`, a StatefulSet's `db-0` → `db`. Generated suffixes use a fixed alphabet
/// (consonants and digits without vowels, 0, 1 and 3), so a name that does not end in one is
/// kept whole.
#[must_use]
pub fn workload_of(pod: &str) -> &str {
    const ALPHABET: &str = "bcdfghjklmnpqrstvwxz2456789";
    let generated = |s: &str, lens: std::ops::RangeInclusive<usize>| {
        lens.contains(&s.len()) && s.chars().all(|c| ALPHABET.contains(c))
    };
    let Some((head, last)) = pod.rsplit_once('-') else { return pod };
    if head.is_empty() {
        return pod;
    }
    if !last.is_empty() && last.len() <= 5 && last.chars().all(|c| c.is_ascii_digit()) {
        return head;
    }
    if !generated(last, 5..=5) {
        return pod;
    }
    match head.rsplit_once('-') {
        Some((deployment, hash)) if !deployment.is_empty() && generated(hash, 6..=10) => deployment,
        _ => head,
    }
}

#[cfg(test)]
mod tests;
