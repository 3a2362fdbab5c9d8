//! The model's inputs in compact form: what the model reads of a Service, an EndpointSlice or a
//! Pod, decoded once when the object arrives (on the source's threads) rather than at every
//! computation, so the agent keeps neither the API objects nor a second copy of the cluster.
//!
//! Decoding is where the per-object rules of [`super::services`] that depend only on the object
//! itself are applied (cluster IPs, ports, the strict annotation, serving endpoints, address
//! families), together with their warnings; the rules that relate objects (endpoints to their
//! Service's ports, backend lanes, capacities) are applied when the model is computed.
//!
//! [`Change`] is how sources report what changed: an object applied or deleted, or a complete
//! (re)list of one kind that replaces everything known of it at once.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use tagger_common::{AFFINITY_DEFAULT_TIMEOUT_S, AFFINITY_MAX_TIMEOUT_S, SVC_F_STRICT};

use super::{
    LocalPod, ObjectRef, WarningKind, Warnings,
    api::{Endpoint, EndpointSlice, Service as ApiService, ServicePort},
};
use crate::{
    config::values::{Canary, ShapingError, Warmup, parse_canary, parse_warmup},
    net::Proto,
};

/// The Service annotation that makes a Service strict (`"true"` / `"false"`).
pub const STRICT_ANNOTATION: &str = "tagger.io/strict";

/// The Service annotation giving base callers' canary share: `LANE=PERCENT[, sticky]`.
pub const CANARY_ANNOTATION: &str = "tagger.io/canary";

/// The Service annotation giving its backends' warm-up:
/// `DURATION[, aggression=A][, min=P%]`.
pub const WARMUP_ANNOTATION: &str = "tagger.io/warmup";

/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Pod labels (the model only reads the lane label keys).
pub type Labels = BTreeMap<String, String>;

/// What the model reads of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInput {
    /// Cluster IPs, ports and flags; `None` when the Service has nothing to steer (headless,
    /// `ExternalName`, no cluster IP, no usable port), which [`Self::warnings`] says.
    pub spec: Option<ServiceSpec>,
    /// What was skipped or corrected in the Service itself.
    pub warnings: Warnings,
}

/// A steerable Service's frontends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Cluster IPs, each once, in the Service's order.
    pub ips: Vec<IpAddr>,
    /// TCP and UDP ports with a valid number, in the Service's order (never empty).
    pub ports: Vec<PortSpec>,
    /// `SVC_F_*` flags from the annotations.
    pub flags: u32,
    /// Shaping annotations and the labels routing rules select on.
    pub shaping: ServiceShaping,
    /// Which of its endpoints this node may use first (`internalTrafficPolicy`,
    /// `trafficDistribution`).
    pub topology: Topology,
}

/// What a Service says about which endpoints a node should use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// `internalTrafficPolicy: Local`: only endpoints on the caller's node.
    pub node_local: bool,
    /// `trafficDistribution: PreferClose` (or `PreferSameZone`): endpoints in the caller's zone
    /// first.
    pub prefer_zone: bool,
    /// `trafficDistribution: PreferSameNode`: endpoints on the caller's node first, then its
    /// zone.
    pub prefer_node: bool,
}

/// What traffic shaping reads of a Service: its canary and warm-up annotations (an invalid
/// one is counted and read as absent) and its labels (routing rules select on them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceShaping {
    /// `tagger.io/canary`.
    pub canary: Option<Canary>,
    /// `tagger.io/warmup` (absent, or a zero duration: none).
    pub warmup: Option<Warmup>,
    /// The Service's labels.
    pub labels: Labels,
    /// `spec.sessionAffinity: ClientIP` (`None`: no affinity).
    pub affinity: Option<SessionAffinity>,
}

/// `spec.sessionAffinity: ClientIP` with its `sessionAffinityConfig`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionAffinity {
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`, within
    /// 1..=[`AFFINITY_MAX_TIMEOUT_S`] (default [`AFFINITY_DEFAULT_TIMEOUT_S`]).
    pub timeout_s: u32,
}

/// A Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// Port name; `""` when unnamed.
    pub name: Box<str>,
    /// Protocol.
    pub proto: Proto,
    /// Port number.
    pub port: u16,
}

impl ServiceInput {
    /// Decodes a Service.
    #[must_use]
    pub fn new(svc_ref: &ObjectRef, svc: &ApiService) -> Self {
        let mut warnings = Warnings::default();
        let spec = decode_service(svc_ref, svc, &mut warnings);
        Self { spec, warnings }
    }
}

fn decode_service(svc_ref: &ObjectRef, svc: &ApiService, warnings: &mut Warnings) -> Option<ServiceSpec> {
    let ips = cluster_ips(svc_ref, svc, warnings)?;
    let ports = service_ports(svc_ref, svc, warnings);
    if ports.is_empty() {
        return None;
    }
    let flags = service_flags(svc_ref, svc, warnings);
    let shaping = service_shaping(svc_ref, svc, warnings);
    let topology = service_topology(svc);
    Some(ServiceSpec { ips, ports, flags, shaping, topology })
}

/// `internalTrafficPolicy` and `trafficDistribution`. Values the API server would not accept
/// (it validates both) are read as the defaults (`Cluster`, no preference).
fn service_topology(svc: &ApiService) -> Topology {
    let spec = svc.spec.as_ref();
    let distribution = spec.and_then(|s| s.traffic_distribution.as_deref());
    Topology {
        node_local: spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local"),
        prefer_zone: matches!(distribution, Some("PreferClose" | "PreferSameZone")),
        prefer_node: distribution == Some("PreferSameNode"),
    }
}

/// What the model reads of an EndpointSlice, with endpoint pods named by `P` (an
/// [`ObjectRef`] as decoded; the model's index replaces it with a compact id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInput<P = ObjectRef> {
    /// The Service it belongs to (`kubernetes.io/service-name`, in the slice's namespace);
    /// `None`: no Service uses it.
    pub service: Option<ObjectRef>,
    /// Ports with a number, in the slice's order.
    pub ports: Vec<SlicePort>,
    /// The serving endpoints (ready, or terminating and still serving) whose first address is
    /// a valid address of the slice's family, in the slice's order. Empty for slices of another
    /// address type (FQDN).
    pub endpoints: Vec<EndpointInput<P>>,
    /// What was skipped in the slice; counted when its Service is computed.
    pub warnings: Warnings,
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// `""` for an unnamed port (None and "" are the same to Kubernetes).
    pub name: Box<str>,
    /// `None` for a protocol the datapath does not steer.
    pub proto: Option<Proto>,
    /// Port number.
    pub port: u16,
}

/// A serving endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInput<P> {
    /// Its (first) address.
    pub ip: IpAddr,
    /// The pod it is (`targetRef` of kind Pod), whose labels give the endpoint's lane.
    pub pod: Option<P>,
    /// Ready, or terminating but still serving (`serving: true, terminating: true`): such an
    /// endpoint gets new connections only when its lane has no ready one, and keeps its open
    /// ones.
    pub terminating: bool,
    /// Where it runs: `nodeName`, `zone` and its topology hints.
    pub place: Option<Box<Placement>>,
}

/// Where an endpoint runs, as its EndpointSlice says (all optional in the API).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// `nodeName`.
    pub node: Option<Box<str>>,
    /// `zone`.
    pub zone: Option<Box<str>>,
    /// `hints.forZones`: the zones whose callers should use it (empty: no zone hints).
    pub for_zones: Box<[Box<str>]>,
    /// `hints.forNodes`: the nodes whose callers should use it (empty: no node hints).
    pub for_nodes: Box<[Box<str>]>,
}

impl SliceInput {
    /// Decodes an EndpointSlice.
    #[must_use]
    pub fn new(slice_ref: &ObjectRef, slice: &EndpointSlice) -> Self {
        let mut warnings = Warnings::default();
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|name| ObjectRef::new(slice_ref.namespace.clone(), name.clone()));
        let ports = decode_slice_ports(slice_ref, slice, &mut warnings);
        let endpoints = serving_endpoints(slice_ref, slice, service.as_ref(), &mut warnings);
        Self { service, ports, endpoints, warnings }
    }
}

impl<P> SliceInput<P> {
    /// The same slice with its endpoints' pods renamed by `f`.
    pub fn map_pods<Q>(self, mut f: impl FnMut(P) -> Q) -> SliceInput<Q> {
        SliceInput {
            service: self.service,
            ports: self.ports,
            endpoints: self
                .endpoints
                .into_iter()
                .map(|e| EndpointInput {
                    ip: e.ip,
                    pod: e.pod.map(&mut f),
                    terminating: e.terminating,
                    place: e.place,
                })
                .collect(),
            warnings: self.warnings,
        }
    }
}

/// The kinds of objects sources report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Pods scheduled on this node.
    LocalPod,
    /// Pods cluster-wide, for their labels (backend lanes).
    Pod,
    /// Services.
    Service,
    /// EndpointSlices.
    Slice,
    /// This node's Node object, for its zone.
    Node,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 5] = [Kind::LocalPod, Kind::Pod, Kind::Service, Kind::Slice, Kind::Node];

    /// The kinds the model needs a complete list of before it computes anything. The Node is
    /// not one: its zone only narrows which endpoints are preferred, and an agent whose
    /// ClusterRole predates reading Nodes must still work.
    pub const REQUIRED: [Kind; 4] = [Kind::LocalPod, Kind::Pod, Kind::Service, Kind::Slice];

    /// Index in [`Kind::ALL`].
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::LocalPod => "pods (this node)",
            Kind::Pod => "pods (labels, cluster-wide)",
            Kind::Service => "services",
            Kind::Slice => "endpointslices",
            Kind::Node => "node (this one)",
        })
    }
}

/// A decoded object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    /// A pod of this node.
    LocalPod(LocalPod),
    /// A pod's labels.
    Pod(ObjectRef, Labels),
    /// A Service.
    Service(ObjectRef, ServiceInput),
    /// An EndpointSlice.
    Slice(ObjectRef, SliceInput),
    /// This node's Node object: its zone label ([`super::topology::ZONE_LABEL`]), if any.
    Node(Option<String>),
}

impl Object {
    /// A Service, decoded; `None` without a name.
    #[must_use]
    pub fn service(svc: &ApiService) -> Option<Self> {
        let key = ObjectRef::of(&svc.metadata)?;
        let input = ServiceInput::new(&key, svc);
        Some(Object::Service(key, input))
    }

    /// An EndpointSlice, decoded; `None` without a name.
    #[must_use]
    pub fn slice(slice: &EndpointSlice) -> Option<Self> {
        let key = ObjectRef::of(&slice.metadata)?;
        let input = SliceInput::new(&key, slice);
        Some(Object::Slice(key, input))
    }

    /// This node's Node: its zone label.
    #[must_use]
    pub fn node(node: &super::api::Node) -> Self {
        Object::Node(node.metadata.labels.as_ref().and_then(|l| l.get(super::topology::ZONE_LABEL)).cloned())
    }

    /// Its kind.
    #[must_use]
    pub fn kind(&self) -> Kind {
        match self {
            Object::LocalPod(_) => Kind::LocalPod,
            Object::Pod(..) => Kind::Pod,
            Object::Service(..) => Kind::Service,
            Object::Slice(..) => Kind::Slice,
            Object::Node(_) => Kind::Node,
        }
    }
}

/// A change reported by a source.
///
/// A (re)list of one kind is reported as [`Change::ListBegin`], its objects as
/// [`Change::Listed`], then [`Change::ListEnd`]: the listed objects replace everything known of
/// that kind at once, at the end (what is not listed was deleted), so a consumer never sees a
/// half-listed kind. A list that is abandoned (the watch failed) is simply begun again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// An object was added or changed.
    Applied(Object),
    /// An object was deleted.
    Deleted(Kind, ObjectRef),
    /// A list of one kind begins (discarding any list of that kind in progress).
    ListBegin(Kind),
    /// An object of the list in progress.
    Listed(Object),
    /// The list of one kind is complete.
    ListEnd(Kind),
}

impl Change {
    /// A complete list of `kind` as one sequence of changes.
    pub fn list(kind: Kind, objects: impl IntoIterator<Item = Object>) -> impl Iterator<Item = Change> {
        std::iter::once(Change::ListBegin(kind))
            .chain(objects.into_iter().map(Change::Listed))
            .chain(std::iter::once(Change::ListEnd(kind)))
    }
}

/// The Service's cluster IPs, or `None` (counted) when the Service has nothing to steer.
fn cluster_ips(svc_ref: &ObjectRef, svc: &ApiService, warnings: &mut Warnings) -> Option<Vec<IpAddr>> {
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

/// The Service's steerable ports.
fn service_ports(svc_ref: &ObjectRef, svc: &ApiService, warnings: &mut Warnings) -> Vec<PortSpec> {
    let ports: &[ServicePort] = svc.spec.as_ref().and_then(|s| s.ports.as_deref()).unwrap_or_default();
    if ports.is_empty() {
        warnings.add(WarningKind::ServiceWithoutPorts, format_args!("Service {svc_ref} has no ports"));
        return Vec::new();
    }
    let mut out = Vec::new();
    for p in ports {
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
            Some(port) => out.push(PortSpec { name: p.name.as_deref().unwrap_or("").into(), proto, port }),
            None => warnings.add(
                WarningKind::InvalidPort,
                format_args!("Service {svc_ref}: port {} is out of range", p.port),
            ),
        }
    }
    out
}

/// The `SVC_F_*` flags from the Service's annotations.
fn service_flags(svc_ref: &ObjectRef, svc: &ApiService, warnings: &mut Warnings) -> u32 {
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

/// The shaping annotations and labels of a Service; an invalid annotation is counted and the
/// Service is handled as without it.
fn service_shaping(svc_ref: &ObjectRef, svc: &ApiService, warnings: &mut Warnings) -> ServiceShaping {
    let annotations = svc.metadata.annotations.as_ref();
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    let mut invalid = |key: &str, value: &str, e: &ShapingError| {
        warnings.add(
            WarningKind::InvalidAnnotation,
            format_args!("Service {svc_ref}: {key}={value:?}: {e}; ignored"),
        );
    };
    let canary = get(CANARY_ANNOTATION)
        .and_then(|v| parse_canary(v).map_err(|e| invalid(CANARY_ANNOTATION, v, &e)).ok());
    let warmup = get(WARMUP_ANNOTATION)
        .and_then(|v| parse_warmup(v).map_err(|e| invalid(WARMUP_ANNOTATION, v, &e)).ok().flatten());
    let labels = svc.metadata.labels.clone().unwrap_or_default();
    let affinity = session_affinity(svc_ref, svc, warnings);
    ServiceShaping { canary, warmup, labels, affinity }
}

/// `spec.sessionAffinity` and its timeout, as Kubernetes validates them: `None` (or unset) or
/// `ClientIP`, a timeout of 1..=86,400 s, default 10,800 s. A value the API server would
/// refuse (a file source can hold anything) is counted, and read as Kubernetes' default: no
/// affinity for an unknown mode, the default timeout for a timeout out of range.
fn session_affinity(
    svc_ref: &ObjectRef,
    svc: &ApiService,
    warnings: &mut Warnings,
) -> Option<SessionAffinity> {
    let spec = svc.spec.as_ref()?;
    let client_ip = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref());
    let mut invalid = |what: fmt::Arguments<'_>| {
        warnings.add(WarningKind::InvalidSessionAffinity, format_args!("Service {svc_ref}: {what}"));
    };
    match spec.session_affinity.as_deref() {
        None | Some("None") => {
            if client_ip.is_some() {
                invalid(format_args!(
                    "sessionAffinityConfig.clientIP without sessionAffinity: ClientIP; ignored"
                ));
            }
            None
        }
        Some("ClientIP") => {
            let timeout_s = match client_ip.and_then(|c| c.timeout_seconds) {
                None => AFFINITY_DEFAULT_TIMEOUT_S,
                Some(t) => match u32::try_from(t) {
                    Ok(t) if (1..=AFFINITY_MAX_TIMEOUT_S).contains(&t) => t,
                    _ => {
                        invalid(format_args!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {t} is not within \
                             1..={AFFINITY_MAX_TIMEOUT_S}; the default {AFFINITY_DEFAULT_TIMEOUT_S} s is used"
                        ));
                        AFFINITY_DEFAULT_TIMEOUT_S
                    }
                },
            };
            Some(SessionAffinity { timeout_s })
        }
        Some(other) => {
            invalid(format_args!("sessionAffinity {other:?} is not \"None\" or \"ClientIP\"; read as None"));
            None
        }
    }
}

fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

fn decode_slice_ports(
    slice_ref: &ObjectRef,
    slice: &EndpointSlice,
    warnings: &mut Warnings,
) -> Vec<SlicePort> {
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
        out.push(SlicePort { name: p.name.as_deref().unwrap_or("").into(), proto, port });
    }
    out
}

/// Endpoints kept of one EndpointSlice: the API server accepts at most 1,000, a file source
/// (or a misbehaving server) could bring any number, and the model holds what it decodes.
pub const MAX_SLICE_ENDPOINTS: usize = 1_000;

/// The slice's serving endpoints (ready, or terminating and still serving) with a valid first
/// address of the slice's family; beyond [`MAX_SLICE_ENDPOINTS`], a subset chosen by a hash of each endpoint (not by position, so the
/// same endpoints are kept whatever their order in the object; not by address, which would
/// leave out whole nodes), counted as `Capacity`.
fn serving_endpoints(
    slice_ref: &ObjectRef,
    slice: &EndpointSlice,
    service: Option<&ObjectRef>,
    warnings: &mut Warnings,
) -> Vec<EndpointInput<ObjectRef>> {
    let v4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        other => {
            if let Some(svc_ref) = service {
                warnings.add(
                    WarningKind::FqdnSliceSkipped,
                    format_args!("EndpointSlice {slice_ref} of Service {svc_ref}: address type {other}"),
                );
            }
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (ep, terminating) in slice.endpoints.iter().filter_map(|ep| serving(ep).map(|t| (ep, t))) {
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
        out.push(EndpointInput { ip, pod: endpoint_pod(slice_ref, ep), terminating, place: placement(ep) });
    }
    if out.len() > MAX_SLICE_ENDPOINTS {
        let dropped = out.len() - MAX_SLICE_ENDPOINTS;
        let mut ranked: Vec<(u32, IpAddr, Option<&ObjectRef>, usize)> =
            out.iter().enumerate().map(|(i, e)| (ip_hash(e.ip), e.ip, e.pod.as_ref(), i)).collect();
        ranked.sort_unstable();
        let mut keep = vec![false; out.len()];
        for &(.., i) in &ranked[..MAX_SLICE_ENDPOINTS] {
            keep[i] = true;
        }
        let mut keep = keep.into_iter();
        out.retain(|_| keep.next().unwrap_or(false));
        warnings.add(
            WarningKind::Capacity,
            format_args!(
                "EndpointSlice {slice_ref}: {dropped} serving endpoints over the per-slice limit of \
                 {MAX_SLICE_ENDPOINTS} left out"
            ),
        );
    }
    out
}

/// 32-bit FNV-1a over an address's bytes.
fn ip_hash(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(a) => tagger_common::fnv1a(&a.octets()),
        IpAddr::V6(a) => tagger_common::fnv1a(&a.octets()),
    }
}

/// The pod an endpoint is, from its `targetRef` (a missing namespace is the slice's).
fn endpoint_pod(slice_ref: &ObjectRef, ep: &Endpoint) -> Option<ObjectRef> {
    let target = ep.target_ref.as_ref()?;
    if target.kind.as_deref() != Some("Pod") {
        return None;
    }
    let name = target.name.as_ref()?;
    let namespace = target.namespace.as_ref().unwrap_or(&slice_ref.namespace);
    Some(ObjectRef::new(namespace.clone(), name.clone()))
}

/// Whether the endpoint serves: `Some(false)` when ready and not terminating, `Some(true)` when
/// terminating but still serving, `None` otherwise. Unset conditions read as the API documents
/// them: `ready` unset means ready, `serving` unset means the same as `ready`, `terminating`
/// unset means not terminating.
fn serving(ep: &Endpoint) -> Option<bool> {
    let c = ep.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    if c.and_then(|c| c.terminating).unwrap_or(false) {
        c.and_then(|c| c.serving).unwrap_or(ready).then_some(true)
    } else {
        ready.then_some(false)
    }
}

/// The endpoint's node, zone and hints; `None` when it states none of them (the common case
/// outside clusters with topology, and the cheap one: no allocation).
fn placement(ep: &Endpoint) -> Option<Box<Placement>> {
    let names = |v: Option<Vec<&String>>| -> Box<[Box<str>]> {
        v.unwrap_or_default().into_iter().map(|s| Box::from(s.as_str())).collect()
    };
    let hints = ep.hints.as_ref();
    let place = Placement {
        node: ep.node_name.as_deref().map(Box::from),
        zone: ep.zone.as_deref().map(Box::from),
        for_zones: names(
            hints.and_then(|h| h.for_zones.as_ref()).map(|z| z.iter().map(|z| &z.name).collect()),
        ),
        for_nodes: names(
            hints.and_then(|h| h.for_nodes.as_ref()).map(|n| n.iter().map(|n| &n.name).collect()),
        ),
    };
    (place != Placement::default()).then(|| Box::new(place))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::api::{ClientIPConfig, SessionAffinityConfig};
    use crate::model::testing::{endpoint, service, slice};

    /// The decoded affinity and the warnings of a Service with these fields.
    fn affinity(mode: Option<&str>, client_ip: Option<ClientIPConfig>) -> (Option<SessionAffinity>, u64) {
        let (r, mut s) = service("shop", "cart", &["10.96.0.10"], &[("http", 80, "TCP")]);
        let spec = s.spec.as_mut().unwrap();
        spec.session_affinity = mode.map(str::to_owned);
        spec.session_affinity_config = client_ip.map(|c| SessionAffinityConfig { client_ip: Some(c) });
        let input = ServiceInput::new(&r, &s);
        let warned = input.warnings.count(WarningKind::InvalidSessionAffinity);
        assert_eq!(input.warnings.total(), warned, "{:?}", input.warnings);
        (input.spec.unwrap().shaping.affinity, warned)
    }

    #[test]
    fn session_affinity_decodes_with_kubernetes_defaults_and_bounds() {
        let ip = |timeout_s| Some(SessionAffinity { timeout_s });
        let t = |timeout_seconds| Some(ClientIPConfig { timeout_seconds });
        assert_eq!(affinity(None, None), (None, 0));
        assert_eq!(affinity(Some("None"), None), (None, 0));
        assert_eq!(affinity(Some("ClientIP"), None), (ip(10_800), 0), "the default timeout");
        assert_eq!(affinity(Some("ClientIP"), t(None)), (ip(10_800), 0));
        assert_eq!(affinity(Some("ClientIP"), t(Some(1))), (ip(1), 0));
        assert_eq!(affinity(Some("ClientIP"), t(Some(86_400))), (ip(86_400), 0));
        // Out of Kubernetes' range: counted, and the default timeout (affinity stays on).
        assert_eq!(affinity(Some("ClientIP"), t(Some(0))), (ip(10_800), 1));
        assert_eq!(affinity(Some("ClientIP"), t(Some(-5))), (ip(10_800), 1));
        assert_eq!(affinity(Some("ClientIP"), t(Some(86_401))), (ip(10_800), 1));
        // An unknown mode is counted and read as None, as is a config without ClientIP.
        assert_eq!(affinity(Some("clientip"), None), (None, 1));
        assert_eq!(affinity(Some("None"), t(Some(60))), (None, 1));
        assert_eq!(WarningKind::InvalidSessionAffinity.name(), "invalid_session_affinity");
    }

    fn endpoints(n: usize, reversed: bool) -> Vec<Endpoint> {
        let mut eps: Vec<_> = (0..n)
            .map(|i| {
                endpoint(
                    &format!("10.{}.{}.{}", i / 65_536, (i / 256) % 256, i % 256),
                    Some(&format!("p{i}")),
                )
            })
            .collect();
        if reversed {
            eps.reverse();
        }
        eps
    }

    #[test]
    fn an_oversized_slice_keeps_the_same_endpoints_whatever_their_order() {
        let (r, s) =
            slice("ns", "a-1", "a", "IPv4", &[("", 80, "TCP")], endpoints(MAX_SLICE_ENDPOINTS, false));
        let at_limit = SliceInput::new(&r, &s);
        assert_eq!(at_limit.endpoints.len(), MAX_SLICE_ENDPOINTS);
        assert_eq!(at_limit.warnings.total(), 0);

        let n = MAX_SLICE_ENDPOINTS + 1_500;
        let (r, s) = slice("ns", "a-1", "a", "IPv4", &[("", 80, "TCP")], endpoints(n, false));
        let forward = SliceInput::new(&r, &s);
        let (r, s) = slice("ns", "a-1", "a", "IPv4", &[("", 80, "TCP")], endpoints(n, true));
        let backward = SliceInput::new(&r, &s);
        assert_eq!(forward.endpoints.len(), MAX_SLICE_ENDPOINTS);
        let sorted = |i: &SliceInput| {
            let mut v: Vec<_> = i.endpoints.iter().map(|e| (e.ip, e.pod.clone())).collect();
            v.sort();
            v
        };
        assert_eq!(sorted(&forward), sorted(&backward), "the kept endpoints depend on their order");
        // Spread over the address range, not the lowest addresses.
        assert!(forward.endpoints.iter().any(|e| e.ip > "10.0.3.231".parse::<IpAddr>().unwrap()));
        assert_eq!(forward.warnings.total(), 1);
        assert_eq!(forward.warnings.count(WarningKind::Capacity), 1);
    }
}
