//! The reference model: the desired state computed from scratch from the whole cluster, as the
//! property tests compare the incremental model against it. Both apply the same rules (this
//! runs a fresh [`ServiceIndex`] and the same shaping functions).

use std::collections::BTreeMap;

use tagger_common::{Backend, FrontendKey, PodEntry, Service, SetKey};

use crate::model::{
    FrontendIds, FrontendOrigin, Limits, ObjectRef, ServiceInput, SliceInput, Warnings,
    api::{EndpointSlice, Service as ApiService},
    index::{ServiceIndex, set_range},
    lanes::LaneSettings,
    shaping,
    state::DatapathState,
    steering::{self, Reasons},
    topology::Node,
};

/// What the agent knows of the cluster, as the watchers' stores hold it.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// Every Service.
    pub services: BTreeMap<ObjectRef, ApiService>,
    /// Every EndpointSlice.
    pub slices: BTreeMap<ObjectRef, EndpointSlice>,
    /// Labels of backend pods cluster-wide (from a metadata-only watch): the lanes of
    /// endpoints.
    pub pod_labels: BTreeMap<ObjectRef, BTreeMap<String, String>>,
}

/// The Service part of the datapath's desired contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredServices {
    /// Every frontend and its Service entry.
    pub frontends: BTreeMap<FrontendKey, Service>,
    /// Every non-empty (frontend, lane) backend set, sorted. A lane without ready backends
    /// has no set: the datapath reads a missing set as empty.
    pub sets: BTreeMap<SetKey, Vec<Backend>>,
    /// (frontend, lane) → backends that serve but get no new connections (not in the set).
    pub held: BTreeMap<SetKey, Vec<Backend>>,
    /// svc_id → the Kubernetes Service and port each frontend comes from (for logs, metrics
    /// and the CLI's names; the datapath does not need it).
    pub origins: BTreeMap<u32, FrontendOrigin>,
    /// What was skipped or corrected.
    pub warnings: Warnings,
}

/// The desired frontends and backend sets of `state` within the datapath's capacities.
/// `lane_keys` are the lane label keys; `ids` gives frontends stable `svc_id`s (new frontends
/// get new ids; ids of frontends no longer desired are not released here — see
/// [`FrontendIds::retain`]).
///
/// This is the full computation, from scratch; the agent keeps a [`ServiceIndex`] up to date
/// instead and recomputes only the Services that changed. Both apply the same rules (this
/// function runs a fresh index), and the property tests check that they agree.
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
    desired_services_on(state, lane_keys, ids, limits, &Node::default())
}

/// [`desired_services_within`] for callers on `node` (its name and zone, for the Services'
/// topology rules).
#[must_use]
pub fn desired_services_on(
    state: &ClusterState,
    lane_keys: &[String],
    ids: &mut FrontendIds,
    limits: &Limits,
    node: &Node,
) -> DesiredServices {
    let mut index = ServiceIndex::new(lane_keys.to_vec(), *limits);
    index.set_node_name(node.name.clone());
    index.set_node_zone(node.zone.clone());
    for (pod, labels) in &state.pod_labels {
        index.apply_pod(pod.clone(), labels);
    }
    for (svc_ref, svc) in &state.services {
        index.apply_service(svc_ref.clone(), ServiceInput::new(svc_ref, svc));
    }
    for (slice_ref, slice) in &state.slices {
        index.apply_slice(slice_ref.clone(), SliceInput::new(slice_ref, slice));
    }
    index.compute(ids);
    let warnings = index.warnings();
    let out = index.into_desired();
    DesiredServices {
        frontends: out.frontends,
        sets: out.sets,
        held: out.held,
        origins: out.origins,
        warnings,
    }
}

/// The desired state from the model's outputs (from scratch: no backend is warming).
#[must_use]
pub fn desired_state(
    pods: BTreeMap<u64, PodEntry>,
    services: &DesiredServices,
    lanes: &LaneSettings,
) -> DatapathState {
    let mut shaping = BTreeMap::new();
    let mut routes = BTreeMap::new();
    let mut affinity = BTreeMap::new();
    let mut frontends = services.frontends.clone();
    let policies = lanes.policies.clone();
    let strict_caller = steering::strict_caller(pods.values(), &policies);
    for service in frontends.values_mut() {
        let Some(origin) = services.origins.get(&service.svc_id) else { continue };
        let s = shaping::svc_shaping(origin, false);
        let r = shaping::svc_routes(service.svc_id, origin, lanes);
        let a = shaping::svc_affinity(origin);
        let flags = shaping::shaped_flags(service.flags, s.is_some(), !r.is_empty());
        let flags = shaping::affinity_flags(flags, a.is_some());
        let lane_backends =
            steering::has_lane_backends(services.sets.range(set_range(service.svc_id)).map(|(k, _)| k));
        service.flags = Reasons::of(flags, lane_backends, strict_caller).apply(flags);
        if let Some(s) = s {
            shaping.insert(service.svc_id, s);
        }
        if let Some(a) = a {
            affinity.insert(service.svc_id, a);
        }
        routes.extend(r);
    }
    DatapathState {
        pods,
        frontends,
        sets: services.sets.clone(),
        lanes: policies,
        shaping,
        routes,
        warm: BTreeMap::new(),
        affinity,
        config_flags: lanes.config_flags,
    }
}
