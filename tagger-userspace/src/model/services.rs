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
//!   Service's namespace whose `addressType` is the cluster IP's family. An endpoint is used
//!   when `conditions.ready` is true or unset (the API says unset means ready) and it is not
//!   terminating. Like kube-proxy, only its first address is used (the others are the same
//!   pod), and the Service port finds its target port in the slice by port name and protocol.
//! - A backend's lane is its pod's lane label (via `targetRef`); no pod → base.
//! - The same ready address twice for one Service (slices overlap while the controller moves
//!   endpoints between them) is counted once per extra occurrence and used once: the first
//!   occurrence in slice order wins, so a backend is in exactly one lane's set.
//!
//! Capacity: a set holds at most [`MAX_SET_SIZE`] backends; beyond that a deterministic subset
//! is kept. The totals stay within the datapath maps: Services are admitted whole, in
//! namespace/name order, while they fit; a Service that does not fit is dropped whole (its
//! frontends then fail open to kube-proxy), never admitted in part.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{
    core::v1::{Service as K8sService, ServicePort},
    discovery::v1::{Endpoint, EndpointSlice},
};
use tagger_common::{
    BASE_LANE, Backend, FrontendKey, MAX_BACKEND_SETS, MAX_BACKENDS, MAX_FRONTENDS, SVC_F_STRICT, Service,
    SetKey,
};

use super::{ClusterState, FrontendIds, ObjectRef, WarningKind, Warnings};
use crate::{
    labels::{LaneOf, lane_of},
    net::{Proto, backend, frontend_key},
};

/// Most backends in one (frontend, lane) set. Bounds the datapath's per-connection pick and
/// the cost of replacing one set; far more than any lane of one Service needs.
pub const MAX_SET_SIZE: usize = 1024;

/// The Service annotation that makes a Service strict (`"true"` / `"false"`).
pub const STRICT_ANNOTATION: &str = "tagger.io/strict";

/// The label linking an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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

/// The Service part of the datapath's desired contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredServices {
    /// Every frontend and its Service entry.
    pub frontends: BTreeMap<FrontendKey, Service>,
    /// Every non-empty (frontend, lane) backend set, sorted. A lane without ready backends
    /// has no set: the datapath reads a missing set as empty.
    pub sets: BTreeMap<SetKey, Vec<Backend>>,
    /// svc_id → the Kubernetes Service and port each frontend comes from (for logs, metrics
    /// and the CLI's names; the datapath does not need it).
    pub origins: BTreeMap<u32, FrontendOrigin>,
    /// What was skipped or corrected.
    pub warnings: Warnings,
}

/// Where a frontend comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendOrigin {
    /// The Service.
    pub service: ObjectRef,
    /// The Service port's name (`""` when unnamed).
    pub port_name: String,
}

/// The desired frontends and backend sets of `state` within the datapath's capacities.
/// `lane_keys` are the lane label keys; `ids` gives frontends stable `svc_id`s (new frontends
/// get new ids; ids of frontends no longer desired are not released here — see
/// [`FrontendIds::retain`]).
#[must_use]
pub fn desired_services(
    state: &ClusterState,
    lane_keys: &[String],
    ids: &mut FrontendIds,
) -> DesiredServices {
    desired_services_within(state, lane_keys, ids, &Limits::DATAPATH)
}

/// [`desired_services`] with explicit capacities.
#[must_use]
pub fn desired_services_within(
    state: &ClusterState,
    lane_keys: &[String],
    ids: &mut FrontendIds,
    limits: &Limits,
) -> DesiredServices {
    let mut out = DesiredServices::default();
    let mut lanes = BackendLanes { state, lane_keys, cache: HashMap::new() };
    let slices = slices_by_service(state);
    let mut used = Usage::default();
    for (svc_ref, svc) in &state.services {
        let svc_slices = slices.get(svc_ref).map_or(&[][..], Vec::as_slice);
        let mut frontends =
            service_frontends(svc_ref, svc, svc_slices, &mut lanes, limits, &mut out.warnings);
        // Another Service already owns a frontend: the earlier one (namespace/name order)
        // keeps it; a real cluster never allocates one ClusterIP twice, a file source might.
        frontends.retain(|f| {
            let taken = out.frontends.contains_key(&f.key);
            if taken {
                out.warnings.add(
                    WarningKind::DuplicateFrontend,
                    format_args!(
                        "Service {svc_ref}: frontend {} is already another Service's",
                        show_key(&f.key)
                    ),
                );
            }
            !taken
        });
        let need = Usage::of(&frontends);
        if !used.admits(&need, limits) {
            out.warnings.add(
                WarningKind::Capacity,
                format_args!(
                    "Service {svc_ref} dropped: its {} frontends, {} sets and {} backends exceed the datapath's \
                     remaining capacity",
                    need.frontends, need.sets, need.backends
                ),
            );
            continue;
        }
        used.add(&need);
        for f in frontends {
            let svc_id = ids.get_or_allocate(&f.key);
            out.frontends.insert(f.key, Service { svc_id, flags: f.flags });
            out.origins.insert(
                svc_id,
                FrontendOrigin { service: svc_ref.clone(), port_name: f.port_name.to_owned() },
            );
            for (lane, backends) in f.sets {
                out.sets.insert(SetKey { svc_id, lane }, backends);
            }
        }
    }
    out
}

/// One frontend of one Service, before it has an id.
struct FrontendModel<'a> {
    key: FrontendKey,
    port_name: &'a str,
    flags: u32,
    sets: BTreeMap<u32, Vec<Backend>>,
}

/// Datapath entries used (or needed) by some Services.
#[derive(Default)]
struct Usage {
    frontends: usize,
    sets: usize,
    backends: usize,
}

impl Usage {
    fn of(frontends: &[FrontendModel<'_>]) -> Self {
        let mut u = Self { frontends: frontends.len(), ..Self::default() };
        for f in frontends {
            u.sets += f.sets.len();
            u.backends += f.sets.values().map(Vec::len).sum::<usize>();
        }
        u
    }

    fn admits(&self, more: &Usage, limits: &Limits) -> bool {
        self.frontends + more.frontends <= limits.frontends
            && self.sets + more.sets <= limits.sets
            && self.backends + more.backends <= limits.backends
    }

    fn add(&mut self, more: &Usage) {
        self.frontends += more.frontends;
        self.sets += more.sets;
        self.backends += more.backends;
    }
}

/// EndpointSlices grouped by the Service they belong to, each group in slice name order.
fn slices_by_service(state: &ClusterState) -> BTreeMap<ObjectRef, Vec<(&ObjectRef, &EndpointSlice)>> {
    let mut by_service: BTreeMap<ObjectRef, Vec<_>> = BTreeMap::new();
    for (slice_ref, slice) in &state.slices {
        let service = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let Some(service) = service {
            by_service
                .entry(ObjectRef::new(slice_ref.namespace.clone(), service.clone()))
                .or_default()
                .push((slice_ref, slice));
        }
    }
    by_service
}

/// The lanes of backend pods, each pod's labels read (and warned about) once.
struct BackendLanes<'a> {
    state: &'a ClusterState,
    lane_keys: &'a [String],
    cache: HashMap<ObjectRef, u32>,
}

impl BackendLanes<'_> {
    fn lane_of_endpoint(&mut self, slice_ref: &ObjectRef, ep: &Endpoint, warnings: &mut Warnings) -> u32 {
        let Some(target) = &ep.target_ref else { return BASE_LANE };
        if target.kind.as_deref() != Some("Pod") {
            return BASE_LANE;
        }
        let Some(name) = &target.name else { return BASE_LANE };
        let namespace = target.namespace.as_ref().unwrap_or(&slice_ref.namespace);
        let pod = ObjectRef::new(namespace.clone(), name.clone());
        if let Some(&lane) = self.cache.get(&pod) {
            return lane;
        }
        let lane = match self.state.pod_labels.get(&pod) {
            None => {
                // Usually the metadata watch is a moment behind the EndpointSlice watch; the
                // next reconcile corrects the lane.
                warnings.add(
                    WarningKind::UnknownBackendPod,
                    format_args!("EndpointSlice {slice_ref}: pod {pod} is not known; its endpoint is base"),
                );
                BASE_LANE
            }
            Some(labels) => match lane_of(labels, self.lane_keys) {
                LaneOf::Invalid { key, value, reason } => {
                    warnings.add(
                        WarningKind::InvalidLaneLabel,
                        format_args!("pod {pod}: label {key}={value:?}: {reason}; the pod is base"),
                    );
                    BASE_LANE
                }
                lane => lane.lane_id(),
            },
        };
        self.cache.insert(pod, lane);
        lane
    }
}

/// A port of an EndpointSlice, decoded.
struct SlicePort<'a> {
    /// `""` for an unnamed port (None and "" are the same to Kubernetes).
    name: &'a str,
    /// `None` for a protocol the datapath does not steer.
    proto: Option<Proto>,
    port: u16,
}

/// A ready endpoint of a Service.
struct ReadyEndpoint<'a> {
    ip: IpAddr,
    lane: u32,
    ports: &'a [SlicePort<'a>],
}

/// The frontends of one Service with their backend sets; empty when the Service is skipped.
fn service_frontends<'s>(
    svc_ref: &ObjectRef,
    svc: &'s K8sService,
    slices: &[(&ObjectRef, &EndpointSlice)],
    lanes: &mut BackendLanes<'_>,
    limits: &Limits,
    warnings: &mut Warnings,
) -> Vec<FrontendModel<'s>> {
    let Some(cluster_ips) = cluster_ips(svc_ref, svc, warnings) else { return Vec::new() };
    let ports = service_ports(svc_ref, svc, warnings);
    if ports.is_empty() {
        return Vec::new();
    }
    let flags = service_flags(svc_ref, svc, warnings);
    let slice_ports: Vec<Vec<SlicePort<'_>>> =
        slices.iter().map(|(slice_ref, slice)| decode_slice_ports(slice_ref, slice, warnings)).collect();
    let endpoints = ready_endpoints(svc_ref, slices, &slice_ports, lanes, warnings);

    let mut frontends: Vec<FrontendModel<'_>> = Vec::new();
    for &ip in &cluster_ips {
        for &(name, proto, port) in &ports {
            let key = frontend_key(SocketAddr::new(ip, port), proto);
            if frontends.iter().any(|f| f.key == key) {
                warnings.add(
                    WarningKind::DuplicateFrontend,
                    format_args!("Service {svc_ref}: port {port}/{proto} is listed twice"),
                );
                continue;
            }
            let mut sets: BTreeMap<u32, Vec<Backend>> = BTreeMap::new();
            for ep in endpoints.iter().filter(|ep| ep.ip.is_ipv4() == ip.is_ipv4()) {
                if let Some(target) = ep.ports.iter().find(|p| p.name == name && p.proto == Some(proto)) {
                    sets.entry(ep.lane).or_default().push(backend(SocketAddr::new(ep.ip, target.port)));
                }
            }
            for (lane, set) in &mut sets {
                set.sort_unstable();
                cap_set(
                    set,
                    limits.set_size,
                    || format!("Service {svc_ref} {ip} {port}/{proto} lane {lane:#x}"),
                    warnings,
                );
            }
            frontends.push(FrontendModel { key, port_name: name, flags, sets });
        }
    }
    frontends
}

/// The Service's cluster IPs, or `None` (counted) when the Service has nothing to steer.
fn cluster_ips(svc_ref: &ObjectRef, svc: &K8sService, warnings: &mut Warnings) -> Option<Vec<IpAddr>> {
    let Some(spec) = &svc.spec else {
        warnings.add(WarningKind::NoClusterIp, format_args!("Service {svc_ref} has no spec"));
        return None;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        warnings.add(WarningKind::ExternalNameSkipped, format_args!("Service {svc_ref} is ExternalName"));
        return None;
    }
    let listed: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.iter().map(String::as_str).filter(|ip| !ip.is_empty()).collect(),
    };
    if listed.contains(&"None") {
        warnings.add(WarningKind::HeadlessServiceSkipped, format_args!("Service {svc_ref} is headless"));
        return None;
    }
    if listed.is_empty() {
        warnings.add(WarningKind::NoClusterIp, format_args!("Service {svc_ref} has no cluster IP"));
        return None;
    }
    let mut ips = Vec::new();
    for text in listed {
        match text.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => warnings.add(
                WarningKind::InvalidAddress,
                format_args!("Service {svc_ref}: cluster IP {text:?} is not an IP address"),
            ),
        }
    }
    (!ips.is_empty()).then_some(ips)
}

/// The Service's steerable ports: (name, protocol, port).
fn service_ports<'a>(
    svc_ref: &ObjectRef,
    svc: &'a K8sService,
    warnings: &mut Warnings,
) -> Vec<(&'a str, Proto, u16)> {
    let ports: &[ServicePort] = svc.spec.as_ref().and_then(|s| s.ports.as_deref()).unwrap_or_default();
    if ports.is_empty() {
        warnings.add(WarningKind::ServiceWithoutPorts, format_args!("Service {svc_ref} has no ports"));
        return Vec::new();
    }
    let mut out = Vec::new();
    for p in ports {
        let name = p.name.as_deref().unwrap_or("");
        let proto = match p.protocol.as_deref() {
            None | Some("TCP") => Proto::Tcp,
            Some("UDP") => Proto::Udp,
            Some("SCTP") => {
                warnings.add(
                    WarningKind::SctpPortSkipped,
                    format_args!("Service {svc_ref}: port {} is SCTP", p.port),
                );
                continue;
            }
            Some(other) => {
                warnings.add(
                    WarningKind::UnknownProtocol,
                    format_args!("Service {svc_ref}: port {} has protocol {other:?}", p.port),
                );
                continue;
            }
        };
        match valid_port(p.port) {
            Some(port) => out.push((name, proto, port)),
            None => warnings.add(
                WarningKind::InvalidPort,
                format_args!("Service {svc_ref}: port {} is out of range", p.port),
            ),
        }
    }
    out
}

/// The `SVC_F_*` flags from the Service's annotations.
fn service_flags(svc_ref: &ObjectRef, svc: &K8sService, warnings: &mut Warnings) -> u32 {
    match svc.metadata.annotations.as_ref().and_then(|a| a.get(STRICT_ANNOTATION)).map(String::as_str) {
        None | Some("false") => 0,
        Some("true") => SVC_F_STRICT,
        Some(other) => {
            warnings.add(
                WarningKind::InvalidAnnotation,
                format_args!(
                    "Service {svc_ref}: {STRICT_ANNOTATION}={other:?} is not \"true\" or \"false\"; ignored"
                ),
            );
            0
        }
    }
}

fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

fn decode_slice_ports<'a>(
    slice_ref: &ObjectRef,
    slice: &'a EndpointSlice,
    warnings: &mut Warnings,
) -> Vec<SlicePort<'a>> {
    let mut out = Vec::new();
    for p in slice.ports.iter().flatten() {
        // No port number: "unrestricted", meaningless for a Service port; nothing to steer to.
        let Some(number) = p.port else { continue };
        let Some(port) = valid_port(number) else {
            warnings.add(
                WarningKind::InvalidPort,
                format_args!("EndpointSlice {slice_ref}: port {number} is out of range"),
            );
            continue;
        };
        let proto = match p.protocol.as_deref() {
            None | Some("TCP") => Some(Proto::Tcp),
            Some("UDP") => Some(Proto::Udp),
            Some(_) => None,
        };
        out.push(SlicePort { name: p.name.as_deref().unwrap_or(""), proto, port });
    }
    out
}

/// The Service's ready endpoints, each address once.
fn ready_endpoints<'a>(
    svc_ref: &ObjectRef,
    slices: &[(&ObjectRef, &EndpointSlice)],
    slice_ports: &'a [Vec<SlicePort<'a>>],
    lanes: &mut BackendLanes<'_>,
    warnings: &mut Warnings,
) -> Vec<ReadyEndpoint<'a>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for ((slice_ref, slice), ports) in slices.iter().zip(slice_ports) {
        let v4 = match slice.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            other => {
                warnings.add(
                    WarningKind::FqdnSliceSkipped,
                    format_args!("EndpointSlice {slice_ref} of Service {svc_ref}: address type {other}"),
                );
                continue;
            }
        };
        for ep in slice.endpoints.iter().filter(|ep| is_ready(ep)) {
            let Some(text) = ep.addresses.first() else { continue };
            let ip = match text.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv4() == v4 => ip,
                _ => {
                    warnings.add(
                        WarningKind::InvalidAddress,
                        format_args!(
                            "EndpointSlice {slice_ref}: {text:?} is not an {} address",
                            slice.address_type
                        ),
                    );
                    continue;
                }
            };
            if !seen.insert(ip) {
                warnings.add(
                    WarningKind::DuplicateEndpoint,
                    format_args!(
                        "Service {svc_ref}: endpoint {ip} is listed more than once (again in {slice_ref})"
                    ),
                );
                continue;
            }
            let lane = lanes.lane_of_endpoint(slice_ref, ep, warnings);
            out.push(ReadyEndpoint { ip, lane, ports });
        }
    }
    out
}

/// Ready, and not terminating. `ready` unset means ready (EndpointConditions' documentation:
/// "nil should be interpreted as ready").
fn is_ready(ep: &Endpoint) -> bool {
    let c = ep.conditions.as_ref();
    c.and_then(|c| c.ready).unwrap_or(true) && !c.and_then(|c| c.terminating).unwrap_or(false)
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
    let mut hash: u32 = 0x811c_9dc5;
    let bytes = b.addr.iter().flat_map(|w| w.to_ne_bytes()).chain(b.port.to_ne_bytes());
    for byte in bytes {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

fn show_key(key: &FrontendKey) -> String {
    let (addr, proto) = crate::net::frontend_addr(key);
    proto.map_or_else(|| format!("{addr}/{}", key.proto), |p| format!("{addr}/{p}"))
}

#[cfg(test)]
mod tests;
