//! The cluster as the agent keeps it, and the Service part of the desired datapath kept up to
//! date incrementally: the Services' desired state (`testing::reference::desired_services` from scratch) recomputed only for the
//! Services that changed.
//!
//! [`ClusterIndex`] takes the sources' [`Change`]s. It stores the decoded objects (never the API
//! objects) and, for a (re)list, stages the listed objects and swaps them in at its end, so
//! nothing is removed before a complete list and no half-listed state is ever computed.
//!
//! [`ServiceIndex`] holds the Services, their EndpointSlices and the lanes of backend pods, and
//! a per-Service cache of what each Service calls for. A change marks Services dirty: a Service
//! change its own, an EndpointSlice change the Service of its `kubernetes.io/service-name`
//! label (before and after), and a backend pod's lane change every Service whose endpoints
//! name that pod (a reverse index, pod → Services, kept from the cache). [`ServiceIndex::compute`]
//! recomputes the dirty Services only and updates the desired frontends, sets and origins in
//! place, recording which keys changed ([`ServiceDelta`]), so the reconciler diffs only those.
//!
//! Admission (capacities, and a frontend claimed by two Services) relates all Services. While
//! no frontend is claimed twice and the sum of every Service's needs fits the datapath, every
//! Service is admitted whole and a changed Service is all that changes; otherwise admission is
//! run over every Service in namespace/name order, as the full computation does, from the
//! cached per-Service needs.
//!
//! Warnings are counted per source object and kept as running totals: a Service's own and its
//! slices' warnings with its cached result, backend pods' lane warnings once per referenced pod.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, btree_map, hash_map},
    mem,
};

use tagger_common::{Backend, FrontendKey, Service, SetKey};

use super::lane::{LaneOf, lane_of};
use super::{
    FrontendIds, FrontendOrigin, Limits, LocalPod, ObjectRef, ServiceInput, SliceInput, WarningKind,
    Warnings,
    objects::{Change, Kind, Labels, Object},
    services::{ServiceModel, Usage, service_model, show_key},
    topology::Node,
};

/// A backend pod's compact id in the index.
type PodId = u32;
/// A Service's compact id in the index.
type SvcId = u32;

/// The Service part of the desired datapath.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicesOut {
    /// Every admitted frontend and its Service entry.
    pub frontends: BTreeMap<FrontendKey, Service>,
    /// Every non-empty (frontend, lane) backend set, sorted.
    pub sets: BTreeMap<SetKey, Vec<Backend>>,
    /// (frontend, lane) → backends that serve but get no new connections, sorted (see
    /// [`super::topology`]). Not written to the datapath: the connection lifecycle reads it.
    pub held: BTreeMap<SetKey, Vec<Backend>>,
    /// svc_id → where the frontend comes from.
    pub origins: BTreeMap<u32, FrontendOrigin>,
}

/// The keys of [`ServicesOut`] that changed (added, changed or removed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceDelta {
    /// Frontends.
    pub frontends: BTreeSet<FrontendKey>,
    /// Backend sets.
    pub sets: BTreeSet<SetKey>,
    /// Origins, by svc_id.
    pub origins: BTreeSet<u32>,
}

impl ServiceDelta {
    /// Whether nothing changed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.sets.is_empty() && self.origins.is_empty()
    }
}

/// A backend pod's lane as its labels give it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PodLane {
    /// A valid lane (0: base).
    Lane(u32),
    /// An invalid lane label (the pod is base), with the warning's message.
    Invalid(Box<str>),
}

impl PodLane {
    fn id(lane: Option<&PodLane>) -> u32 {
        match lane {
            Some(PodLane::Lane(id)) => *id,
            Some(PodLane::Invalid(_)) | None => tagger_common::BASE_LANE,
        }
    }
}

/// What a referenced pod contributes to the warnings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LaneClass {
    Valid,
    Invalid,
    Unknown,
}

fn class(lane: Option<&PodLane>) -> LaneClass {
    match lane {
        Some(PodLane::Lane(_)) => LaneClass::Valid,
        Some(PodLane::Invalid(_)) => LaneClass::Invalid,
        None => LaneClass::Unknown,
    }
}

#[derive(Debug)]
struct PodSlot {
    key: ObjectRef,
    /// `None`: no labels known (no such pod, or the pod watch is behind).
    lane: Option<PodLane>,
    /// Slice endpoints (stored or staged) naming this pod.
    endpoints: u32,
    /// Services whose cached result read this pod's lane.
    services: Vec<SvcId>,
}

/// Backend pods: interned, so that 100,000 endpoints cost an id each rather than two strings.
#[derive(Debug, Default)]
struct PodTable {
    ids: HashMap<ObjectRef, PodId>,
    slots: Vec<PodSlot>,
    free: Vec<PodId>,
}

impl PodTable {
    fn intern(&mut self, key: ObjectRef) -> PodId {
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        let slot = PodSlot { key: key.clone(), lane: None, endpoints: 0, services: Vec::new() };
        let id = if let Some(id) = self.free.pop() {
            self.slots[id as usize] = slot;
            id
        } else {
            self.slots.push(slot);
            PodId::try_from(self.slots.len() - 1).expect("fewer than 2^32 pods")
        };
        self.ids.insert(key, id);
        id
    }

    fn slot(&self, id: PodId) -> &PodSlot {
        &self.slots[id as usize]
    }

    fn slot_mut(&mut self, id: PodId) -> &mut PodSlot {
        &mut self.slots[id as usize]
    }

    /// Frees the slot once nothing refers to it.
    fn maybe_free(&mut self, id: PodId) {
        let slot = &mut self.slots[id as usize];
        if slot.lane.is_none() && slot.endpoints == 0 && slot.services.is_empty() {
            let key = mem::take(&mut slot.key);
            self.ids.remove(&key);
            self.free.push(id);
        }
    }

    fn add_endpoint(&mut self, key: ObjectRef) -> PodId {
        let id = self.intern(key);
        self.slot_mut(id).endpoints += 1;
        id
    }

    fn release_endpoints(&mut self, slice: &SliceInput<PodId>) {
        for pod in slice.endpoints.iter().filter_map(|e| e.pod) {
            self.slot_mut(pod).endpoints -= 1;
            self.maybe_free(pod);
        }
    }
}

/// What the index keeps of a Service's last computation.
#[derive(Clone, Debug, Default)]
struct Summary {
    /// Each frontend and what it needs, in the Service's order.
    frontends: Vec<(FrontendKey, Usage)>,
    /// The Service's and its slices' warnings.
    warnings: Warnings,
    /// The backend pods whose lane it read.
    pods: Vec<PodId>,
    /// What all its frontends need.
    need: Usage,
}

impl Summary {
    fn of(model: &ServiceModel<PodId>) -> Self {
        let frontends: Vec<(FrontendKey, Usage)> =
            model.frontends.iter().map(|f| (f.key, Usage::of(f))).collect();
        let mut need = Usage::default();
        for (_, u) in &frontends {
            need.add(u);
        }
        Self { frontends, warnings: model.warnings.clone(), pods: model.pods.clone(), need }
    }
}

#[derive(Debug)]
struct SvcSlot {
    key: ObjectRef,
    /// The Service object; `None` while only slices name it.
    input: Option<ServiceInput>,
    /// Its EndpointSlices, sorted (by name: they share the Service's namespace).
    slices: Vec<ObjectRef>,
    /// The last computation (`None` without a Service object).
    summary: Option<Summary>,
    /// Its frontends that are in [`ServicesOut`].
    admitted: Vec<FrontendKey>,
}

/// Services, EndpointSlices and backend pod lanes, with the desired Service frontends and sets
/// kept up to date. See the module documentation.
#[derive(Debug)]
pub struct ServiceIndex {
    lane_keys: Vec<String>,
    limits: Limits,
    node: Node,
    services: Vec<Option<SvcSlot>>,
    free_services: Vec<SvcId>,
    by_ref: BTreeMap<ObjectRef, SvcId>,
    slices: HashMap<ObjectRef, SliceInput<PodId>>,
    pods: PodTable,
    dirty: HashSet<SvcId>,
    /// How many Services' results claim each frontend, and how many frontends are claimed more
    /// than once.
    claims: HashMap<FrontendKey, u32>,
    conflicts: usize,
    /// Sum of every Service's needs.
    need: Usage,
    /// Sum of the cached results' warning counts.
    model_warnings: BTreeMap<WarningKind, u64>,
    /// Referenced backend pods with no known labels, and with an invalid lane label.
    unknown_pods: u64,
    invalid_pods: u64,
    /// Warnings of the last admission over all Services (empty when all were admitted whole).
    admission: Warnings,
    /// The last admission left some Service out (in whole or in part).
    degraded: bool,
    out: ServicesOut,
    delta: ServiceDelta,
    /// Warnings produced by the last computations, as examples for logs.
    recent: Warnings,
    /// Lane ids already reported by [`Self::take_lane_names`].
    known_lanes: HashSet<u32>,
    new_lanes: Vec<(u32, String)>,
}

impl ServiceIndex {
    /// An empty index; `lane_keys` are the lane label keys.
    #[must_use]
    pub fn new(lane_keys: Vec<String>, limits: Limits) -> Self {
        Self {
            lane_keys,
            limits,
            node: Node::default(),
            services: Vec::new(),
            free_services: Vec::new(),
            by_ref: BTreeMap::new(),
            slices: HashMap::new(),
            pods: PodTable::default(),
            dirty: HashSet::new(),
            claims: HashMap::new(),
            conflicts: 0,
            need: Usage::default(),
            model_warnings: BTreeMap::new(),
            unknown_pods: 0,
            invalid_pods: 0,
            admission: Warnings::default(),
            degraded: false,
            out: ServicesOut::default(),
            delta: ServiceDelta::default(),
            recent: Warnings::default(),
            known_lanes: HashSet::new(),
            new_lanes: Vec::new(),
        }
    }

    // ---- inputs ------------------------------------------------------------------------------

    /// A Service added or changed.
    pub fn apply_service(&mut self, key: ObjectRef, input: ServiceInput) {
        let id = self.service_slot(key);
        let slot = self.svc_mut(id);
        if slot.input.as_ref() != Some(&input) {
            slot.input = Some(input);
            self.dirty.insert(id);
        }
    }

    /// A Service deleted.
    pub fn delete_service(&mut self, key: &ObjectRef) {
        if let Some(&id) = self.by_ref.get(key)
            && self.svc_mut(id).input.take().is_some()
        {
            self.dirty.insert(id);
        }
    }

    /// An EndpointSlice added or changed.
    pub fn apply_slice(&mut self, key: ObjectRef, input: SliceInput) {
        let slice = self.intern_slice(input);
        self.apply_interned_slice(key, slice);
    }

    /// An EndpointSlice deleted.
    pub fn delete_slice(&mut self, key: &ObjectRef) {
        if let Some(old) = self.slices.remove(key) {
            self.detach_slice(key, &old);
        }
    }

    /// A pod's labels (any pod: backend lanes come from them).
    pub fn apply_pod(&mut self, key: ObjectRef, labels: &Labels) {
        let lane = self.pod_lane(&key, labels);
        self.set_pod_lane(key, Some(lane));
    }

    /// A pod deleted.
    pub fn delete_pod(&mut self, key: &ObjectRef) {
        if self.pods.ids.contains_key(key) {
            self.set_pod_lane(key.clone(), None);
        }
    }

    fn intern_slice(&mut self, input: SliceInput) -> SliceInput<PodId> {
        input.map_pods(|pod| self.pods.add_endpoint(pod))
    }

    fn apply_interned_slice(&mut self, key: ObjectRef, slice: SliceInput<PodId>) {
        if self.slices.get(&key) == Some(&slice) {
            self.pods.release_endpoints(&slice);
            return;
        }
        if let Some(old) = self.slices.remove(&key) {
            self.detach_slice(&key, &old);
        }
        if let Some(service) = &slice.service {
            let id = self.service_slot(service.clone());
            let slices = &mut self.svc_mut(id).slices;
            if let Err(i) = slices.binary_search(&key) {
                slices.insert(i, key.clone());
            }
            self.dirty.insert(id);
        }
        self.slices.insert(key, slice);
    }

    fn detach_slice(&mut self, key: &ObjectRef, old: &SliceInput<PodId>) {
        self.pods.release_endpoints(old);
        if let Some(&id) = old.service.as_ref().and_then(|s| self.by_ref.get(s)) {
            let slices = &mut self.svc_mut(id).slices;
            if let Ok(i) = slices.binary_search(key) {
                slices.remove(i);
            }
            self.dirty.insert(id);
        }
    }

    fn pod_lane(&mut self, pod: &ObjectRef, labels: &Labels) -> PodLane {
        match lane_of(labels, &self.lane_keys) {
            LaneOf::Base => PodLane::Lane(tagger_common::BASE_LANE),
            LaneOf::Lane(name) => {
                let id = tagger_common::lane_id(&name);
                if self.known_lanes.insert(id) {
                    self.new_lanes.push((id, name));
                }
                PodLane::Lane(id)
            }
            invalid @ LaneOf::Invalid { .. } => {
                PodLane::Invalid(invalid.warning(pod).unwrap_or_default().into())
            }
        }
    }

    fn set_pod_lane(&mut self, key: ObjectRef, lane: Option<PodLane>) {
        let id = self.pods.intern(key);
        let slot = self.pods.slot_mut(id);
        if slot.lane == lane {
            self.pods.maybe_free(id);
            return;
        }
        let old = mem::replace(&mut slot.lane, lane);
        let referenced = !slot.services.is_empty();
        let (before, after) = (class(old.as_ref()), class(slot.lane.as_ref()));
        if referenced && before != after {
            let message = lane_warning(slot);
            self.count_lane_class(before, -1, None);
            self.count_lane_class(after, 1, message);
        }
        let slot = self.pods.slot(id);
        if PodLane::id(old.as_ref()) != PodLane::id(slot.lane.as_ref()) {
            self.dirty.extend(slot.services.iter().copied());
        }
        self.pods.maybe_free(id);
    }

    fn count_lane_class(&mut self, class: LaneClass, delta: i64, message: Option<(WarningKind, String)>) {
        let counter = match class {
            LaneClass::Valid => return,
            LaneClass::Invalid => &mut self.invalid_pods,
            LaneClass::Unknown => &mut self.unknown_pods,
        };
        *counter = counter.checked_add_signed(delta).expect("lane warning counts stay positive");
        if let Some((kind, message)) = message {
            self.recent.add(kind, message);
        }
    }

    fn service_slot(&mut self, key: ObjectRef) -> SvcId {
        if let Some(&id) = self.by_ref.get(&key) {
            return id;
        }
        let slot = SvcSlot {
            key: key.clone(),
            input: None,
            slices: Vec::new(),
            summary: None,
            admitted: Vec::new(),
        };
        let id = if let Some(id) = self.free_services.pop() {
            self.services[id as usize] = Some(slot);
            id
        } else {
            self.services.push(Some(slot));
            SvcId::try_from(self.services.len() - 1).expect("fewer than 2^32 Services")
        };
        self.by_ref.insert(key, id);
        id
    }

    fn svc(&self, id: SvcId) -> &SvcSlot {
        self.services[id as usize].as_ref().expect("live Service slot")
    }

    fn svc_mut(&mut self, id: SvcId) -> &mut SvcSlot {
        self.services[id as usize].as_mut().expect("live Service slot")
    }

    /// This node's name (for `internalTrafficPolicy: Local` and node preferences); every
    /// Service is recomputed when it changes.
    pub fn set_node_name(&mut self, name: Option<String>) {
        if self.node.name != name {
            self.node.name = name;
            self.mark_all_dirty();
        }
    }

    /// This node's zone, from its Node object (`None` while unknown); every Service is
    /// recomputed when it changes.
    pub fn set_node_zone(&mut self, zone: Option<String>) {
        if self.node.zone != zone {
            self.node.zone = zone;
            self.mark_all_dirty();
        }
    }

    /// This node as the topology rules see it.
    #[must_use]
    pub fn node(&self) -> &Node {
        &self.node
    }

    fn mark_all_dirty(&mut self) {
        let ids: Vec<SvcId> = self.by_ref.values().copied().collect();
        self.dirty.extend(ids);
    }

    // ---- computation -------------------------------------------------------------------------

    /// Whether some Service changed since the last [`Self::compute`].
    #[must_use]
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Recomputes the Services that changed and updates [`Self::desired`], allocating ids for
    /// new frontends from `ids` (in namespace/name order of their Services) and releasing the
    /// ids of frontends that are no longer desired.
    pub fn compute(&mut self, ids: &mut FrontendIds) {
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty: Vec<SvcId> = self.dirty.drain().collect();
        dirty.sort_by(|a, b| self.svc(*a).key.cmp(&self.svc(*b).key));
        let mut fresh: HashMap<SvcId, ServiceModel<PodId>> = HashMap::with_capacity(dirty.len());
        for &id in &dirty {
            let model = self.model_of(id);
            let summary = model.as_ref().map(Summary::of);
            if let Some(model) = &model
                && !model.warnings.is_empty()
            {
                self.recent.merge(model.warnings.clone());
            }
            let old = mem::take(&mut self.svc_mut(id).summary);
            self.unaccount(id, old.as_ref());
            self.account(id, summary.as_ref());
            self.svc_mut(id).summary = summary;
            if let Some(model) = model {
                fresh.insert(id, model);
            }
        }

        // Admission: which frontends of which Services go into the datapath.
        let fits = self.conflicts == 0 && Usage::default().admits(&self.need, &self.limits);
        let mut admitted: Vec<(SvcId, Vec<FrontendKey>)> = Vec::new();
        if fits && !self.degraded {
            self.admission = Warnings::default();
            for &id in &dirty {
                let keys = self.svc(id).summary.as_ref().map(|s| s.frontends.iter().map(|f| f.0).collect());
                admitted.push((id, keys.unwrap_or_default()));
            }
        } else {
            let dirty_set: HashSet<SvcId> = dirty.iter().copied().collect();
            let (all, warnings, degraded) = self.admit_all();
            if warnings != self.admission {
                self.recent.merge(warnings.clone());
            }
            self.admission = warnings;
            self.degraded = degraded;
            for (id, keys) in all {
                if dirty_set.contains(&id) || self.svc(id).admitted != keys {
                    admitted.push((id, keys));
                }
            }
        }

        // Frontends that go first (so that a frontend moving between Services in one pass is
        // never removed after its new owner wrote it), then what is admitted now.
        let mut removed = Vec::new();
        for (id, keys) in &admitted {
            let old = mem::take(&mut self.svc_mut(*id).admitted);
            for key in old.iter().filter(|k| !keys.contains(k)) {
                self.remove_frontend(key);
                removed.push(*key);
            }
        }
        for (id, keys) in admitted {
            if !keys.is_empty() {
                let model = match fresh.remove(&id) {
                    Some(model) => model,
                    None => self.model_of(id).expect("an admitted Service has a result"),
                };
                self.write_frontends(id, model, &keys, ids);
            }
            self.svc_mut(id).admitted = keys;
            self.maybe_free_service(id);
        }
        for key in removed {
            if !self.out.frontends.contains_key(&key) {
                ids.release(&key);
            }
        }
    }

    /// The Service's result from its inputs; `None` without a Service object.
    fn model_of(&self, id: SvcId) -> Option<ServiceModel<PodId>> {
        let slot = self.svc(id);
        let input = slot.input.as_ref()?;
        let slices = slot.slices.iter().filter_map(|r| self.slices.get(r).map(|s| (r, s)));
        let pods = &self.pods;
        Some(service_model(
            &slot.key,
            input,
            slices,
            |pod| PodLane::id(pods.slot(pod).lane.as_ref()),
            &self.node,
            self.limits.set_size,
        ))
    }

    /// Adds a Service's result to the totals and the reverse index.
    fn account(&mut self, id: SvcId, summary: Option<&Summary>) {
        let Some(summary) = summary else { return };
        for (key, _) in &summary.frontends {
            let n = self.claims.entry(*key).or_default();
            *n += 1;
            if *n == 2 {
                self.conflicts += 1;
            }
        }
        self.need.add(&summary.need);
        for (kind, n) in summary.warnings.counts() {
            *self.model_warnings.entry(*kind).or_default() += n;
        }
        for &pod in &summary.pods {
            let slot = self.pods.slot_mut(pod);
            slot.services.push(id);
            if slot.services.len() == 1 {
                let (class, message) = (class(slot.lane.as_ref()), lane_warning(slot));
                self.count_lane_class(class, 1, message);
            }
        }
    }

    /// Removes a Service's previous result from the totals and the reverse index.
    fn unaccount(&mut self, id: SvcId, summary: Option<&Summary>) {
        let Some(summary) = summary else { return };
        for (key, _) in &summary.frontends {
            if let hash_map::Entry::Occupied(mut e) = self.claims.entry(*key) {
                *e.get_mut() -= 1;
                match *e.get() {
                    0 => {
                        e.remove();
                    }
                    1 => self.conflicts -= 1,
                    _ => {}
                }
            }
        }
        self.need.sub(&summary.need);
        for (kind, n) in summary.warnings.counts() {
            if let btree_map::Entry::Occupied(mut e) = self.model_warnings.entry(*kind) {
                *e.get_mut() -= n;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        for &pod in &summary.pods {
            let slot = self.pods.slot_mut(pod);
            if let Some(i) = slot.services.iter().position(|s| *s == id) {
                slot.services.swap_remove(i);
            }
            if slot.services.is_empty() {
                let class = class(slot.lane.as_ref());
                self.count_lane_class(class, -1, None);
                self.pods.maybe_free(pod);
            }
        }
    }

    /// Admission over every Service in namespace/name order, as the full computation does: a
    /// frontend already admitted for an earlier Service is left out of a later one, and a
    /// Service is admitted whole while it fits. Returns each Service's admitted frontends, the
    /// warnings, and whether anything was left out.
    fn admit_all(&self) -> (Vec<(SvcId, Vec<FrontendKey>)>, Warnings, bool) {
        let mut warnings = Warnings::default();
        let mut used = Usage::default();
        let mut taken: HashSet<FrontendKey> = HashSet::new();
        let mut degraded = false;
        let mut out = Vec::with_capacity(self.by_ref.len());
        for (svc_ref, &id) in &self.by_ref {
            let Some(summary) = &self.svc(id).summary else {
                out.push((id, Vec::new()));
                continue;
            };
            let mut keys = Vec::with_capacity(summary.frontends.len());
            let mut need = Usage::default();
            for (key, u) in &summary.frontends {
                if taken.contains(key) {
                    warnings.add(
                        WarningKind::DuplicateFrontend,
                        format_args!(
                            "Service {svc_ref}: frontend {} is already another Service's",
                            show_key(key)
                        ),
                    );
                    degraded = true;
                    continue;
                }
                keys.push(*key);
                need.add(u);
            }
            if !used.admits(&need, &self.limits) {
                warnings.add(
                    WarningKind::Capacity,
                    format_args!(
                        "Service {svc_ref} dropped: its {} frontends, {} sets and {} backends exceed the datapath's \
                         remaining capacity",
                        need.frontends, need.sets, need.backends
                    ),
                );
                degraded = true;
                out.push((id, Vec::new()));
                continue;
            }
            used.add(&need);
            taken.extend(keys.iter().copied());
            out.push((id, keys));
        }
        (out, warnings, degraded)
    }

    fn remove_frontend(&mut self, key: &FrontendKey) {
        let Some(service) = self.out.frontends.remove(key) else { return };
        self.delta.frontends.insert(*key);
        let sets: Vec<SetKey> = self.out.sets.range(set_range(service.svc_id)).map(|(k, _)| *k).collect();
        for k in sets {
            self.out.sets.remove(&k);
            self.delta.sets.insert(k);
        }
        let held: Vec<SetKey> = self.out.held.range(set_range(service.svc_id)).map(|(k, _)| *k).collect();
        for k in held {
            self.out.held.remove(&k);
        }
        if self.out.origins.remove(&service.svc_id).is_some() {
            self.delta.origins.insert(service.svc_id);
        }
    }

    fn write_frontends(
        &mut self,
        id: SvcId,
        model: ServiceModel<PodId>,
        keys: &[FrontendKey],
        ids: &mut FrontendIds,
    ) {
        let service_ref = self.svc(id).key.clone();
        for f in model.frontends.into_iter().filter(|f| keys.contains(&f.key)) {
            let svc_id = ids.get_or_allocate(&f.key);
            let entry = Service { svc_id, flags: f.flags };
            if self.out.frontends.insert(f.key, entry) != Some(entry) {
                self.delta.frontends.insert(f.key);
            }
            let stale: Vec<SetKey> = self
                .out
                .sets
                .range(set_range(svc_id))
                .map(|(k, _)| *k)
                .filter(|k| !f.sets.contains_key(&k.lane))
                .collect();
            for k in stale {
                self.out.sets.remove(&k);
                self.delta.sets.insert(k);
            }
            let held: Vec<SetKey> = self.out.held.range(set_range(svc_id)).map(|(k, _)| *k).collect();
            for k in held {
                self.out.held.remove(&k);
            }
            self.out.held.extend(f.held.into_iter().map(|(lane, b)| (SetKey { svc_id, lane }, b)));
            for (lane, backends) in f.sets {
                let k = SetKey { svc_id, lane };
                match self.out.sets.entry(k) {
                    btree_map::Entry::Occupied(e) if *e.get() == backends => {}
                    btree_map::Entry::Occupied(mut e) => {
                        e.insert(backends);
                        self.delta.sets.insert(k);
                    }
                    btree_map::Entry::Vacant(e) => {
                        e.insert(backends);
                        self.delta.sets.insert(k);
                    }
                }
            }
            let same = self.out.origins.get(&svc_id).is_some_and(|o| {
                o.service == service_ref && o.port_name.as_str() == &*f.port_name && o.shaping == f.shaping
            });
            if !same {
                let origin = FrontendOrigin {
                    service: service_ref.clone(),
                    port_name: f.port_name.into(),
                    shaping: f.shaping,
                };
                self.out.origins.insert(svc_id, origin);
                self.delta.origins.insert(svc_id);
            }
        }
    }

    /// Forgets a Service slot nothing refers to any more.
    fn maybe_free_service(&mut self, id: SvcId) {
        let slot = self.svc(id);
        if slot.input.is_none()
            && slot.slices.is_empty()
            && slot.summary.is_none()
            && slot.admitted.is_empty()
        {
            let key = slot.key.clone();
            self.by_ref.remove(&key);
            self.services[id as usize] = None;
            self.free_services.push(id);
        }
    }

    // ---- outputs -----------------------------------------------------------------------------

    /// The desired Service frontends, sets and origins as of the last [`Self::compute`].
    #[must_use]
    pub fn desired(&self) -> &ServicesOut {
        &self.out
    }

    /// The desired state, consuming the index.
    #[must_use]
    pub fn into_desired(self) -> ServicesOut {
        self.out
    }

    /// The keys changed by the computations since the last call.
    pub fn take_delta(&mut self) -> ServiceDelta {
        mem::take(&mut self.delta)
    }

    /// Lane names seen on pod labels for the first time since the last call.
    pub fn take_lane_names(&mut self) -> Vec<(u32, String)> {
        mem::take(&mut self.new_lanes)
    }

    /// Warnings produced by the computations since the last call (bounded examples, for logs).
    pub fn take_recent_warnings(&mut self) -> Warnings {
        mem::take(&mut self.recent)
    }

    /// The warning counts of the current state.
    #[must_use]
    pub fn warning_counts(&self) -> BTreeMap<WarningKind, u64> {
        let mut counts = self.model_warnings.clone();
        for (kind, n) in self.admission.counts() {
            *counts.entry(*kind).or_default() += n;
        }
        for (kind, n) in [
            (WarningKind::UnknownBackendPod, self.unknown_pods),
            (WarningKind::InvalidLaneLabel, self.invalid_pods),
        ] {
            if n > 0 {
                *counts.entry(kind).or_default() += n;
            }
        }
        counts
    }

    /// Every warning of the current state, with examples in a deterministic order: the
    /// Services' in namespace/name order, backend pods' by pod, then admission's.
    #[must_use]
    pub fn warnings(&self) -> Warnings {
        let mut out = Warnings::default();
        for &id in self.by_ref.values() {
            if let Some(summary) = &self.svc(id).summary {
                out.merge(summary.warnings.clone());
            }
        }
        let mut pods: Vec<&PodSlot> = self
            .pods
            .ids
            .values()
            .map(|&id| self.pods.slot(id))
            .filter(|s| !s.services.is_empty() && class(s.lane.as_ref()) != LaneClass::Valid)
            .collect();
        pods.sort_by(|a, b| a.key.cmp(&b.key));
        for slot in pods {
            if let Some((kind, message)) = lane_warning(slot) {
                out.add(kind, message);
            }
        }
        out.merge(self.admission.clone());
        out
    }

    /// Number of Services (with a Service object or named by a slice), EndpointSlices and
    /// backend pods held.
    #[must_use]
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.by_ref.len(), self.slices.len(), self.pods.ids.len())
    }
}

/// The warning a referenced pod with this lane gives, if any.
fn lane_warning(slot: &PodSlot) -> Option<(WarningKind, String)> {
    match &slot.lane {
        Some(PodLane::Lane(_)) => None,
        Some(PodLane::Invalid(message)) => Some((WarningKind::InvalidLaneLabel, message.to_string())),
        None => Some((
            WarningKind::UnknownBackendPod,
            format!("pod {} is an endpoint but is not known; its endpoints are base", slot.key),
        )),
    }
}

/// The keys of every set of one frontend, for `BTreeMap::range`.
#[must_use]
pub fn set_range(svc_id: u32) -> std::ops::RangeInclusive<SetKey> {
    SetKey { svc_id, lane: 0 }..=SetKey { svc_id, lane: u32::MAX }
}

/// The objects of one kind being (re)listed, decoded and interned as they arrive.
#[derive(Debug)]
enum Staged {
    LocalPods(Vec<LocalPod>),
    Pods(Vec<(ObjectRef, PodLane)>),
    Services(Vec<(ObjectRef, ServiceInput)>),
    Slices(Vec<(ObjectRef, SliceInput<PodId>)>),
    /// This node's zone, once its Node object is listed (none listed: unknown).
    Node(Option<String>),
}

impl Staged {
    fn empty(kind: Kind) -> Self {
        match kind {
            Kind::LocalPod => Staged::LocalPods(Vec::new()),
            Kind::Pod => Staged::Pods(Vec::new()),
            Kind::Service => Staged::Services(Vec::new()),
            Kind::Slice => Staged::Slices(Vec::new()),
            Kind::Node => Staged::Node(None),
        }
    }
}

/// Everything the sources report, kept compact: the pods of this node, and a [`ServiceIndex`]
/// of Services, EndpointSlices and backend pod lanes. See the module documentation.
#[derive(Debug)]
pub struct ClusterIndex {
    services: ServiceIndex,
    local_pods: BTreeMap<ObjectRef, LocalPod>,
    /// Local pods changed since the last [`Self::take_local_changes`].
    local_changed: BTreeSet<ObjectRef>,
    /// Whether each kind has been listed completely at least once.
    listed: [bool; 5],
    staged: [Option<Staged>; 5],
}

impl ClusterIndex {
    /// An empty index; `lane_keys` are the lane label keys.
    #[must_use]
    pub fn new(lane_keys: Vec<String>, limits: Limits) -> Self {
        Self {
            services: ServiceIndex::new(lane_keys, limits),
            local_pods: BTreeMap::new(),
            local_changed: BTreeSet::new(),
            listed: [false; 5],
            staged: [None, None, None, None, None],
        }
    }

    /// Applies one change.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Applied(object) => self.apply_object(object),
            Change::Deleted(kind, key) => match kind {
                Kind::LocalPod => {
                    if self.local_pods.remove(&key).is_some() {
                        self.local_changed.insert(key);
                    }
                }
                Kind::Pod => self.services.delete_pod(&key),
                Kind::Service => self.services.delete_service(&key),
                Kind::Slice => self.services.delete_slice(&key),
                Kind::Node => self.services.set_node_zone(None),
            },
            Change::ListBegin(kind) => {
                let fresh = Staged::empty(kind);
                if let Some(old) = self.staged[kind.index()].replace(fresh) {
                    self.discard(old);
                }
            }
            Change::Listed(object) => self.stage(object),
            Change::ListEnd(kind) => {
                if let Some(staged) = self.staged[kind.index()].take() {
                    self.swap(staged);
                }
                self.listed[kind.index()] = true;
            }
        }
    }

    fn apply_object(&mut self, object: Object) {
        match object {
            Object::LocalPod(pod) => {
                let key = ObjectRef::new(pod.namespace.clone(), pod.name.clone());
                if self.local_pods.get(&key) != Some(&pod) {
                    self.local_pods.insert(key.clone(), pod);
                    self.local_changed.insert(key);
                }
            }
            Object::Pod(key, labels) => self.services.apply_pod(key, &labels),
            Object::Service(key, input) => self.services.apply_service(key, input),
            Object::Slice(key, input) => self.services.apply_slice(key, input),
            Object::Node(zone) => self.services.set_node_zone(zone),
        }
    }

    fn stage(&mut self, object: Object) {
        let kind = object.kind();
        let staged = self.staged[kind.index()].get_or_insert_with(|| Staged::empty(kind));
        match (staged, object) {
            (Staged::LocalPods(v), Object::LocalPod(pod)) => v.push(pod),
            (Staged::Pods(v), Object::Pod(key, labels)) => {
                let lane = self.services.pod_lane(&key, &labels);
                v.push((key, lane));
            }
            (Staged::Services(v), Object::Service(key, input)) => v.push((key, input)),
            (Staged::Slices(v), Object::Slice(key, input)) => {
                let slice = input.map_pods(|pod| self.services.pods.add_endpoint(pod));
                v.push((key, slice));
            }
            (Staged::Node(v), Object::Node(zone)) => *v = zone,
            _ => unreachable!("staged by kind"),
        }
    }

    fn discard(&mut self, staged: Staged) {
        if let Staged::Slices(slices) = staged {
            for (_, slice) in &slices {
                self.services.pods.release_endpoints(slice);
            }
        }
    }

    /// Replaces everything of one kind with a complete list: what is not listed is deleted,
    /// what changed is applied, what did not change is left alone.
    fn swap(&mut self, staged: Staged) {
        match staged {
            // Not listed: the Node object is gone (or not visible to us), its zone unknown.
            Staged::Node(zone) => self.services.set_node_zone(zone),
            Staged::LocalPods(pods) => {
                let listed: BTreeMap<ObjectRef, LocalPod> = pods
                    .into_iter()
                    .map(|p| (ObjectRef::new(p.namespace.clone(), p.name.clone()), p))
                    .collect();
                let gone: Vec<ObjectRef> =
                    self.local_pods.keys().filter(|k| !listed.contains_key(k)).cloned().collect();
                for key in gone {
                    self.local_pods.remove(&key);
                    self.local_changed.insert(key);
                }
                for pod in listed.into_values() {
                    self.apply_object(Object::LocalPod(pod));
                }
            }
            Staged::Pods(pods) => {
                let listed: HashSet<&ObjectRef> = pods.iter().map(|(k, _)| k).collect();
                let gone: Vec<ObjectRef> = self
                    .services
                    .pods
                    .ids
                    .iter()
                    .filter(|(k, id)| self.services.pods.slot(**id).lane.is_some() && !listed.contains(k))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in gone {
                    self.services.set_pod_lane(key, None);
                }
                for (key, lane) in pods {
                    self.services.set_pod_lane(key, Some(lane));
                }
            }
            Staged::Services(services) => {
                let listed: HashSet<&ObjectRef> = services.iter().map(|(k, _)| k).collect();
                let gone: Vec<ObjectRef> = self
                    .services
                    .by_ref
                    .iter()
                    .filter(|(k, id)| self.services.svc(**id).input.is_some() && !listed.contains(k))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in gone {
                    self.services.delete_service(&key);
                }
                for (key, input) in services {
                    self.services.apply_service(key, input);
                }
            }
            Staged::Slices(slices) => {
                let listed: HashSet<&ObjectRef> = slices.iter().map(|(k, _)| k).collect();
                let gone: Vec<ObjectRef> =
                    self.services.slices.keys().filter(|k| !listed.contains(k)).cloned().collect();
                for key in gone {
                    self.services.delete_slice(&key);
                }
                // A list holding one name twice: the last wins, as with a store.
                let mut seen = HashSet::new();
                let mut latest = Vec::with_capacity(slices.len());
                for (key, slice) in slices.into_iter().rev() {
                    if seen.insert(key.clone()) {
                        latest.push((key, slice));
                    } else {
                        self.services.pods.release_endpoints(&slice);
                    }
                }
                for (key, slice) in latest.into_iter().rev() {
                    self.services.apply_interned_slice(key, slice);
                }
            }
        }
    }

    /// Whether every required kind ([`Kind::REQUIRED`]) has been listed completely at least
    /// once: before that, the index holds part of the cluster only, and nothing may be computed
    /// from it.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        Kind::REQUIRED.iter().all(|k| self.listed[k.index()])
    }

    /// Whether `kind` has been listed completely at least once.
    #[must_use]
    pub fn is_listed(&self, kind: Kind) -> bool {
        self.listed[kind.index()]
    }

    /// The pods of this node, by namespace/name.
    #[must_use]
    pub fn local_pods(&self) -> &BTreeMap<ObjectRef, LocalPod> {
        &self.local_pods
    }

    /// The local pods added, changed or deleted since the last call.
    pub fn take_local_changes(&mut self) -> BTreeSet<ObjectRef> {
        mem::take(&mut self.local_changed)
    }

    /// The Service index.
    #[must_use]
    pub fn services(&self) -> &ServiceIndex {
        &self.services
    }

    /// The Service index, to compute it and take its outputs.
    pub fn services_mut(&mut self) -> &mut ServiceIndex {
        &mut self.services
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::api::Service as ApiService;
    use crate::{
        config::labels::default_lane_keys,
        model::{
            QosClass,
            testing::{endpoint, service, slice},
        },
    };

    fn svc(ns: &str, name: &str, ip: &str) -> Object {
        let (r, s): (ObjectRef, ApiService) = service(ns, name, &[ip], &[("http", 80, "TCP")]);
        Object::Service(r.clone(), ServiceInput::new(&r, &s))
    }

    fn eps(ns: &str, name: &str, service: &str, pods: &[(&str, &str)]) -> Object {
        let endpoints = pods.iter().map(|(ip, pod)| endpoint(ip, Some(pod))).collect();
        let (r, s) = slice(ns, name, service, "IPv4", &[("http", 8080, "TCP")], endpoints);
        Object::Slice(r.clone(), SliceInput::new(&r, &s))
    }

    fn pod(ns: &str, name: &str, lane: Option<&str>) -> Object {
        let labels = lane.iter().map(|l| ("tagger.io/lane".to_owned(), (*l).to_owned())).collect();
        Object::Pod(ObjectRef::new(ns, name), labels)
    }

    fn local(name: &str) -> Object {
        Object::LocalPod(LocalPod {
            uid: format!("uid-{name}"),
            namespace: "ns".into(),
            name: name.into(),
            labels: Labels::new(),
            qos: QosClass::Burstable,
            ips: Vec::new(),
        })
    }

    fn index() -> ClusterIndex {
        ClusterIndex::new(default_lane_keys(), Limits::DATAPATH)
    }

    fn list(index: &mut ClusterIndex, kind: Kind, objects: Vec<Object>) {
        for change in Change::list(kind, objects) {
            index.apply(change);
        }
    }

    /// Lists every kind: two Services sharing backend pod `p1`, a third without it.
    fn populated() -> ClusterIndex {
        let mut x = index();
        list(&mut x, Kind::LocalPod, vec![local("l1")]);
        list(
            &mut x,
            Kind::Pod,
            vec![pod("ns", "p1", Some("gray")), pod("ns", "p2", None), pod("ns", "p3", None)],
        );
        list(
            &mut x,
            Kind::Service,
            vec![svc("ns", "a", "10.96.0.1"), svc("ns", "b", "10.96.0.2"), svc("ns", "c", "10.96.0.3")],
        );
        list(
            &mut x,
            Kind::Slice,
            vec![
                eps("ns", "a-1", "a", &[("10.0.0.1", "p1"), ("10.0.0.2", "p2")]),
                eps("ns", "b-1", "b", &[("10.0.0.1", "p1")]),
                eps("ns", "c-1", "c", &[("10.0.0.3", "p3")]),
            ],
        );
        x
    }

    fn compute(x: &mut ClusterIndex, ids: &mut FrontendIds) -> ServiceDelta {
        x.services_mut().compute(ids);
        x.services_mut().take_delta()
    }

    #[test]
    fn complete_only_once_every_kind_is_listed() {
        let mut x = index();
        for kind in Kind::REQUIRED {
            assert!(!x.is_complete());
            x.apply(Change::ListBegin(kind));
            x.apply(Change::ListEnd(kind));
        }
        // The Node is optional: its zone only narrows preferences.
        assert!(x.is_complete());
        assert!(!x.is_listed(Kind::Node));
    }

    #[test]
    fn a_backend_pod_change_recomputes_only_its_services() {
        let mut x = populated();
        let mut ids = FrontendIds::new();
        let first = compute(&mut x, &mut ids);
        assert_eq!(first.frontends.len(), 3);
        assert_eq!(first.sets.len(), 4, "a: base and gray, b: gray, c: base");
        assert!(compute(&mut x, &mut ids).is_empty(), "nothing changed");
        // A label change that does not change the lane recomputes nothing.
        x.apply(Change::Applied(pod("ns", "p1", Some("gray"))));
        assert!(!x.services().is_dirty());
        // p1 turns base: Services a and b change, c does not.
        x.apply(Change::Applied(pod("ns", "p1", None)));
        let delta = compute(&mut x, &mut ids);
        assert!(delta.frontends.is_empty(), "frontends stay");
        let gray = tagger_common::lane_id("gray");
        // Ids are allocated in Service order.
        let (a, b) = (1, 2);
        assert_eq!(
            delta.sets,
            BTreeSet::from([
                SetKey { svc_id: a, lane: 0 },
                SetKey { svc_id: a, lane: gray },
                SetKey { svc_id: b, lane: 0 },
                SetKey { svc_id: b, lane: gray },
            ])
        );
    }

    #[test]
    fn a_relist_changes_nothing_until_it_ends_and_then_only_what_differs() {
        let mut x = populated();
        let mut ids = FrontendIds::new();
        compute(&mut x, &mut ids);
        let before = x.services().desired().clone();
        // Relist: Service c is gone, b's slice lost p1, the rest is the same.
        x.apply(Change::ListBegin(Kind::Service));
        x.apply(Change::Listed(svc("ns", "a", "10.96.0.1")));
        x.apply(Change::Listed(svc("ns", "b", "10.96.0.2")));
        x.apply(Change::ListBegin(Kind::Slice));
        x.apply(Change::Listed(eps("ns", "a-1", "a", &[("10.0.0.1", "p1"), ("10.0.0.2", "p2")])));
        x.apply(Change::Listed(eps("ns", "b-1", "b", &[])));
        x.apply(Change::Listed(eps("ns", "c-1", "c", &[("10.0.0.3", "p3")])));
        assert!(!x.services().is_dirty(), "staged only");
        compute(&mut x, &mut ids);
        assert_eq!(*x.services().desired(), before);
        x.apply(Change::ListEnd(Kind::Service));
        x.apply(Change::ListEnd(Kind::Slice));
        let delta = compute(&mut x, &mut ids);
        let c = ids.get(before.frontends.keys().nth(2).unwrap());
        assert_eq!(c, None, "c's id is released");
        assert_eq!(delta.frontends.len(), 1, "c removed; a and b untouched");
        assert_eq!(delta.sets.len(), 2, "c's base set and b's gray set");
        assert_eq!(x.services().desired().frontends.len(), 2);
    }

    #[test]
    fn an_abandoned_list_is_discarded_and_slots_are_freed() {
        let mut x = populated();
        let mut ids = FrontendIds::new();
        compute(&mut x, &mut ids);
        assert_eq!(x.services().sizes(), (3, 3, 3));
        // A relist that fails half-way names a new pod; it starts again without it.
        x.apply(Change::ListBegin(Kind::Slice));
        x.apply(Change::Listed(eps("ns", "a-1", "a", &[("10.0.0.9", "ghost")])));
        assert_eq!(x.services().sizes().2, 4, "the staged endpoint names a pod");
        x.apply(Change::ListBegin(Kind::Slice));
        assert_eq!(x.services().sizes().2, 3, "discarded with the abandoned list");
        x.apply(Change::ListEnd(Kind::Slice));
        compute(&mut x, &mut ids);
        assert!(x.services().desired().sets.is_empty(), "no slice was listed");
        // Pods nothing names any more are forgotten with their labels.
        list(&mut x, Kind::Pod, Vec::new());
        assert_eq!(x.services().sizes(), (3, 0, 0));
        list(&mut x, Kind::Service, Vec::new());
        compute(&mut x, &mut ids);
        assert_eq!(x.services().sizes(), (0, 0, 0));
        assert!(ids.is_empty());
    }

    #[test]
    fn unknown_and_invalid_backend_pods_are_counted_once_while_referenced() {
        let mut x = populated();
        let mut ids = FrontendIds::new();
        x.apply(Change::Applied(pod("ns", "p1", Some("bad!"))));
        x.apply(Change::Deleted(Kind::Pod, ObjectRef::new("ns", "p3")));
        compute(&mut x, &mut ids);
        let counts = x.services().warning_counts();
        assert_eq!(counts.get(&WarningKind::InvalidLaneLabel), Some(&1), "p1, named by a and b");
        assert_eq!(counts.get(&WarningKind::UnknownBackendPod), Some(&1), "p3");
        x.apply(Change::Deleted(Kind::Slice, ObjectRef::new("ns", "c-1")));
        x.apply(Change::Applied(pod("ns", "p1", Some("blue"))));
        compute(&mut x, &mut ids);
        assert!(x.services().warning_counts().is_empty());
        assert_eq!(x.local_pods().len(), 1);
        assert_eq!(x.take_local_changes().len(), 1);
        assert!(x.take_local_changes().is_empty());
    }
}
