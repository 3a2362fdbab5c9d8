//! Services and EndpointSlices → the Service frontends and per-lane backend sets the datapath
//! should hold.
//!
//! Rules, following Kubernetes' own semantics (and kube-proxy's reading of them):
//! - Every cluster IP (`spec.clusterIPs`, else `spec.clusterIP`) × every TCP/UDP port is one
//!   frontend. Headless (`None`) and `ExternalName` Services, Services without ports and SCTP
//!   ports are skipped and counted: the datapath has nothing to steer for them.
//! - A Service keeps its frontends even with no ready backend at all, so lanes and strictness
//!   still apply (a strict Service with nothing ready refuses instead of failing open).
//! - Backends come from the EndpointSlices labelled `kubernetes.io/service-name=<name>` in the
//!   Service's namespace whose `addressType` is the cluster IP's family. An endpoint serves
//!   when it is ready (`conditions.ready` true or unset: the API says unset means ready) and
//!   not terminating, or terminating with `serving` true. Like kube-proxy, only its first
//!   address is used (the others are the same pod), and the Service port finds its target
//!   port in the slice by port name and protocol.
//! - Of each lane's serving backends, [`super::topology`] picks those new connections go to
//!   (`internalTrafficPolicy`, ready before serving-terminating, `trafficDistribution` and
//!   zone hints): the lane's set. The others are *held*: they serve, keep their open
//!   connections, and get no new ones.
//! - A backend's lane is its pod's lane label (via `targetRef`); no pod → base.
//! - The same serving address twice for one Service (slices overlap while the controller moves
//!   endpoints between them) is counted once per extra occurrence and used once: the first
//!   occurrence in slice order wins, so a backend is in exactly one lane's set.
//!
//! Capacity: a set holds at most [`MAX_SET_SIZE`] backends; beyond that a deterministic subset
//! is kept. The totals stay within the datapath maps: Services are admitted whole, in
//! namespace/name order, while they fit; a Service that does not fit is dropped whole (its
//! frontends then fail open to kube-proxy), never admitted in part.
//!
//! The rules that depend on one object only are applied when it is decoded
//! ([`super::objects`]); `service_model` applies the rest to one Service and its slices; the
//! [`ServiceIndex`] keeps each Service's result and applies admission, recomputing only the
//! Services a change affects. [`desired_services`] is the same computation from scratch.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use tagger_common::{Backend, FrontendKey, MAX_BACKEND_SETS, MAX_BACKENDS, MAX_FRONTENDS};

use super::{
    ObjectRef, ServiceInput, ServiceShaping, SliceInput, WarningKind, Warnings,
    topology::{Candidate, Node, usable},
};
use crate::net::{backend, frontend_key};

/// Most backends in one (frontend, lane) set. Bounds the datapath's per-connection pick and
/// the cost of replacing one set; far more than any lane of one Service needs.
pub const MAX_SET_SIZE: usize = 1024;

/// Capacities the model keeps within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Service frontends in total.
    pub frontends: usize,
    /// (frontend, lane) sets in total.
    pub sets: usize,
    /// Backends summed over all sets.
    pub backends: usize,
    /// Backends in one set.
    pub set_size: usize,
}

impl Limits {
    /// The datapath's map capacities.
    pub const DATAPATH: Limits = Limits {
        frontends: MAX_FRONTENDS as usize,
        sets: MAX_BACKEND_SETS as usize,
        backends: MAX_BACKENDS as usize,
        set_size: MAX_SET_SIZE,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DATAPATH
    }
}

/// Where a frontend comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendOrigin {
    /// The Service.
    pub service: ObjectRef,
    /// The Service port's name (`""` when unnamed).
    pub port_name: String,
    /// The Service's shaping annotations and labels.
    pub shaping: ServiceShaping,
}

/// One frontend of one Service with its backend sets, before it has an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FrontendModel {
    pub key: FrontendKey,
    pub port_name: Box<str>,
    pub flags: u32,
    pub shaping: ServiceShaping,
    /// Lane → the backends new connections go to, sorted (no empty set).
    pub sets: BTreeMap<u32, Vec<Backend>>,
    /// Lane → backends that still serve but get no new connections (terminating while the
    /// lane has ready ones, on another node or zone than the topology rules pick), sorted (no
    /// empty entry). Their open connections are kept.
    pub held: BTreeMap<u32, Vec<Backend>>,
}

/// What one Service calls for, before capacities and other Services are considered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceModel<P> {
    /// Its frontends; empty when the Service is skipped.
    pub frontends: Vec<FrontendModel>,
    /// What was skipped or corrected in the Service and its slices.
    pub warnings: Warnings,
    /// The backend pods whose lane was read, sorted, each once.
    pub pods: Vec<P>,
}

/// The frontends and backend sets of one Service from its decoded object and its slices (in
/// slice name order), for callers on `node`; `lane_of` gives a backend pod's lane (base when
/// the pod is not known or its label is invalid — those are warned about once per pod, by the
/// caller).
pub(crate) fn service_model<'a, P: Copy + Ord + 'a>(
    svc_ref: &ObjectRef,
    input: &ServiceInput,
    slices: impl IntoIterator<Item = (&'a ObjectRef, &'a SliceInput<P>)>,
    mut lane_of: impl FnMut(P) -> u32,
    node: &Node,
    set_size: usize,
) -> ServiceModel<P> {
    let mut warnings = input.warnings.clone();
    let Some(spec) = &input.spec else {
        return ServiceModel { frontends: Vec::new(), warnings, pods: Vec::new() };
    };
    // The Service's serving endpoints, each address once: the first occurrence in slice order
    // wins, so a backend is in exactly one lane's set.
    let mut seen = BTreeSet::new();
    let mut pods = Vec::new();
    let mut endpoints = Vec::new();
    for (slice_ref, slice) in slices {
        warnings.merge(slice.warnings.clone());
        for ep in &slice.endpoints {
            if !seen.insert(ep.ip) {
                warnings.add(
                    WarningKind::DuplicateEndpoint,
                    format_args!(
                        "Service {svc_ref}: endpoint {} is listed more than once (again in {slice_ref})",
                        ep.ip
                    ),
                );
                continue;
            }
            let lane = ep.pod.map_or(tagger_common::BASE_LANE, |pod| {
                pods.push(pod);
                lane_of(pod)
            });
            let candidate = Candidate { terminating: ep.terminating, place: ep.place.as_deref() };
            endpoints.push((ep.ip, lane, slice.ports.as_slice(), candidate));
        }
    }
    pods.sort_unstable();
    pods.dedup();
    pods.shrink_to_fit();

    let mut frontends: Vec<FrontendModel> = Vec::new();
    for &ip in &spec.ips {
        for p in &spec.ports {
            let (port, proto) = (p.port, p.proto);
            let key = frontend_key(SocketAddr::new(ip, port), proto);
            if frontends.iter().any(|f| f.key == key) {
                warnings.add(
                    WarningKind::DuplicateFrontend,
                    format_args!("Service {svc_ref}: port {port}/{proto} is listed twice"),
                );
                continue;
            }
            let mut serving: BTreeMap<u32, Vec<(Backend, Candidate<'_>)>> = BTreeMap::new();
            for &(ep_ip, lane, ports, candidate) in
                endpoints.iter().filter(|(ep_ip, ..)| ep_ip.is_ipv4() == ip.is_ipv4())
            {
                if let Some(target) = ports.iter().find(|t| t.name == p.name && t.proto == Some(proto)) {
                    serving
                        .entry(lane)
                        .or_default()
                        .push((backend(SocketAddr::new(ep_ip, target.port)), candidate));
                }
            }
            let mut sets: BTreeMap<u32, Vec<Backend>> = BTreeMap::new();
            let mut held: BTreeMap<u32, Vec<Backend>> = BTreeMap::new();
            for (lane, lane_serving) in serving {
                let candidates: Vec<Candidate<'_>> = lane_serving.iter().map(|(_, c)| *c).collect();
                let mask = usable(node, spec.topology, &candidates);
                for ((b, _), pick) in lane_serving.into_iter().zip(mask) {
                    if pick { &mut sets } else { &mut held }.entry(lane).or_default().push(b);
                }
            }
            for set in held.values_mut() {
                set.sort_unstable();
                set.shrink_to_fit();
            }
            for (lane, set) in &mut sets {
                set.sort_unstable();
                set.shrink_to_fit();
                cap_set(
                    set,
                    set_size,
                    || format!("Service {svc_ref} {ip} {port}/{proto} lane {lane:#x}"),
                    &mut warnings,
                );
            }
            frontends.push(FrontendModel {
                key,
                port_name: p.name.clone(),
                flags: spec.flags,
                shaping: spec.shaping.clone(),
                sets,
                held,
            });
        }
    }
    ServiceModel { frontends, warnings, pods }
}

/// Datapath entries used (or needed) by some Services.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub frontends: usize,
    pub sets: usize,
    pub backends: usize,
}

impl Usage {
    /// What one frontend needs.
    pub fn of(f: &FrontendModel) -> Self {
        Self { frontends: 1, sets: f.sets.len(), backends: f.sets.values().map(Vec::len).sum() }
    }

    pub fn admits(&self, more: &Usage, limits: &Limits) -> bool {
        self.frontends + more.frontends <= limits.frontends
            && self.sets + more.sets <= limits.sets
            && self.backends + more.backends <= limits.backends
    }

    pub fn add(&mut self, more: &Usage) {
        self.frontends += more.frontends;
        self.sets += more.sets;
        self.backends += more.backends;
    }

    pub fn sub(&mut self, less: &Usage) {
        self.frontends -= less.frontends;
        self.sets -= less.sets;
        self.backends -= less.backends;
    }
}

/// Cuts a sorted set to `max` backends. Which ones stay is a pure function of the set, chosen
/// by a hash rather than by address: pod addresses come from per-node ranges, so keeping the
/// lowest addresses would leave out whole nodes.
fn cap_set(set: &mut Vec<Backend>, max: usize, what: impl FnOnce() -> String, warnings: &mut Warnings) {
    if set.len() <= max {
        return;
    }
    let dropped = set.len() - max;
    set.sort_by_key(|b| (backend_hash(b), *b));
    set.truncate(max);
    set.sort_unstable();
    warnings.add(
        WarningKind::Capacity,
        format_args!("{}: {dropped} backends over the per-set limit of {max} left out", what()),
    );
}

/// 32-bit FNV-1a over the backend's address and port.
fn backend_hash(b: &Backend) -> u32 {
    let mut bytes = [0u8; 18];
    for (chunk, w) in bytes.chunks_exact_mut(4).zip(b.addr) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    bytes[16..].copy_from_slice(&b.port.to_ne_bytes());
    tagger_common::fnv1a(&bytes)
}

pub(crate) fn show_key(key: &FrontendKey) -> String {
    let (addr, proto) = crate::net::frontend_addr(key);
    proto.map_or_else(|| format!("{addr}/{}", key.proto), |p| format!("{addr}/{p}"))
}

#[cfg(test)]
mod tests;
