//! The desired datapath kept up to date from the sources' changes, for an incremental
//! reconciler: [`Incremental`] applies [`Change`]s to a [`ClusterIndex`], recomputes only what
//! they affect, and says which entries may now differ from the maps ([`Update::scope`]), so the
//! plan ([`crate::reconcile::plan_scoped`]) looks at those only. It computes exactly what
//! the reference model (`testing::reference`) computes from the whole cluster (the property
//! tests check it),
//! except that `svc_id`s are allocated in the order frontends appear.
//!
//! Pure except for `cgroup_of`, the caller's lookup of a local pod's cgroup, whose results are
//! kept: a pod's cgroup is looked up when the pod is new or changed, pods whose cgroup was not
//! found on [`Recheck::Pending`], and every pod on [`Recheck::All`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    mem,
};

use tagger_common::{FrontendKey, LanePolicy, PodEntry, RouteKey, Service, SetKey, SvcAffinity, SvcShaping};

use super::{
    Change, ClusterIndex, DesiredPod, DesiredPods, FrontendIds, FrontendOrigin, Limits, ObjectRef, QosClass,
    ServiceDelta, WarningKind, Warnings, desired_pods,
    index::set_range,
    lanes::LaneSettings,
    pod_entries,
    shaping::{
        WarmTracker, affinity_flags, backend_warmup, shaped_flags, svc_affinity, svc_routes, svc_shaping,
    },
    state::{DatapathState, DesiredRef, Scope},
    steering::{self, Reasons},
};
use crate::cgroup::CgroupRef;

/// Which local pods' cgroups to look up again, besides new and changed pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recheck {
    /// None.
    #[default]
    None,
    /// Those not found yet (kubelet creates a pod's cgroup shortly after the pod object).
    Pending,
    /// All (a periodic check: a cgroup can go away before its pod object does).
    All,
}

/// What an [`Incremental::update`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// The entries that may differ from what was desired before.
    pub scope: Scope,
    /// The first update: every entry may differ from the maps (which may hold anything from
    /// before a restart), so the plan must look at all of them.
    pub full: bool,
    /// svc_ids whose origin (Service and port names) changed.
    pub origins: BTreeSet<u32>,
    /// The local pods' names or addresses changed.
    pub pods_changed: bool,
    /// The lanes config changed.
    pub lanes_changed: bool,
    /// Lane names seen on pods (the lanes config's are in it).
    pub lane_names: Vec<(u32, String)>,
}

/// A registered local pod, by one of its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalAddr {
    /// The pod's cgroup id.
    pub cgroup: u64,
    /// Its lane id.
    pub lane: u32,
    /// Its lane's name (`None`: base).
    pub lane_name: Option<String>,
}

/// A local pod's cgroup as last looked up.
#[derive(Clone, Debug)]
struct Found {
    uid: String,
    qos: QosClass,
    cgroup: Option<CgroupRef>,
}

/// The desired datapath, kept up to date from changes. See the module documentation.
#[derive(Debug)]
pub struct Incremental {
    index: ClusterIndex,
    ids: FrontendIds,
    lane_keys: Vec<String>,
    lanes: Option<LaneSettings>,
    policies: BTreeMap<u32, LanePolicy>,
    pods: DesiredPods,
    entries: BTreeMap<u64, PodEntry>,
    pod_names: BTreeMap<u64, (String, String)>,
    pod_addrs: BTreeMap<[u32; 4], LocalAddr>,
    found: HashMap<ObjectRef, Found>,
    pending: usize,
    started: bool,
    /// The frontends with their shaping flags; the shaping entries, routes and global flags.
    frontends: BTreeMap<FrontendKey, Service>,
    svc_keys: HashMap<u32, FrontendKey>,
    shaping: BTreeMap<u32, SvcShaping>,
    routes: BTreeMap<RouteKey, LanePolicy>,
    affinity: BTreeMap<u32, SvcAffinity>,
    config_flags: u32,
    warm: WarmTracker,
    /// A registered local pod is in a strict lane (every frontend is then steered).
    strict_caller: bool,
    clock: fn() -> u64,
}

impl Incremental {
    /// Nothing known yet; `ids` are the frontend ids to keep (seeded from the maps).
    #[must_use]
    pub fn new(ids: FrontendIds, lane_keys: Vec<String>, limits: Limits) -> Self {
        Self {
            index: ClusterIndex::new(lane_keys.clone(), limits),
            ids,
            lane_keys,
            lanes: None,
            policies: BTreeMap::new(),
            pods: DesiredPods::default(),
            entries: BTreeMap::new(),
            pod_names: BTreeMap::new(),
            pod_addrs: BTreeMap::new(),
            found: HashMap::new(),
            pending: 0,
            started: false,
            frontends: BTreeMap::new(),
            svc_keys: HashMap::new(),
            shaping: BTreeMap::new(),
            routes: BTreeMap::new(),
            affinity: BTreeMap::new(),
            config_flags: 0,
            warm: WarmTracker::default(),
            strict_caller: false,
            clock: crate::sys::monotonic_now_ns,
        }
    }

    /// Keeps the warm-up entries found in the maps at start (backends that were warming when
    /// the agent restarted keep their ready times).
    pub fn adopt_warm(&mut self, entries: BTreeMap<tagger_common::WarmKey, tagger_common::WarmEntry>) {
        self.warm.adopt(entries);
    }

    /// This node's name, for the Services' topology rules (`internalTrafficPolicy: Local`,
    /// node preferences).
    pub fn set_node_name(&mut self, name: &str) {
        self.index.services_mut().set_node_name(Some(name.to_owned()));
    }

    /// Replaces the monotonic clock that dates backends becoming ready (for tests).
    pub fn set_clock(&mut self, clock: fn() -> u64) {
        self.clock = clock;
    }

    /// Takes the sources' changes (cheap: nothing is computed until [`Self::update`]).
    pub fn apply(&mut self, changes: impl IntoIterator<Item = Change>) {
        for change in changes {
            self.index.apply(change);
        }
    }

    /// Whether the sources have delivered a complete view; [`Self::update`] must not be called
    /// before (a partial view — Services before the backend pods' labels, say — would make
    /// gray backends look base).
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.index.is_complete()
    }

    /// Recomputes what the changes since the last update affect.
    pub fn update(
        &mut self,
        lanes: &LaneSettings,
        recheck: Recheck,
        mut cgroup_of: impl FnMut(&DesiredPod) -> Option<CgroupRef>,
    ) -> Update {
        let full = !self.started;
        self.started = true;
        let mut update = Update { full, ..Update::default() };

        let services = self.index.services_mut();
        services.compute(&mut self.ids);
        let delta = services.take_delta();
        update.lane_names = services.take_lane_names();

        // Local pods first: whether one is in a strict lane decides whether frontends with
        // base backends only are steered.
        let changed = self.index.take_local_changes();
        if full || recheck != Recheck::None || !changed.is_empty() {
            update.pods_changed = self.update_pods(&changed, recheck, &mut cgroup_of, &mut update.scope);
            update.lane_names.extend(
                self.pods.pods.values().filter_map(|p| p.lane_name.as_ref().map(|n| (p.lane, n.clone()))),
            );
        }
        let strict_caller = steering::strict_caller(self.entries.values(), &lanes.policies);
        let lanes_changed = self.lanes.as_ref() != Some(lanes);
        let all = full || lanes_changed || strict_caller != self.strict_caller;
        self.strict_caller = strict_caller;
        self.update_shaping(&delta, lanes, all, full, &mut update.scope);
        update.scope.frontends.extend(delta.frontends);
        update.scope.sets = delta.sets;
        update.origins = delta.origins;

        if self.lanes.as_ref() != Some(lanes) {
            let policies = lanes.policies.clone();
            for (lane, policy) in &policies {
                if self.policies.get(lane) != Some(policy) {
                    update.scope.lanes.insert(*lane);
                }
            }
            update.scope.lanes.extend(self.policies.keys().filter(|l| !policies.contains_key(l)));
            self.policies = policies;
            self.lanes = Some(lanes.clone());
            update.lanes_changed = true;
        }
        update
    }

    /// Recomputes the shaping of the frontends a change touched (of all with `all`): warm-up
    /// ready times, shaping entries, routing rule chains and the frontends' flags.
    fn update_shaping(
        &mut self,
        delta: &ServiceDelta,
        lanes: &LaneSettings,
        all: bool,
        seed: bool,
        scope: &mut Scope,
    ) {
        let out = self.index.services().desired();
        let now = (self.clock)();
        let mut touched: BTreeSet<u32> = BTreeSet::new();
        for key in &delta.frontends {
            if let Some(old) = self.frontends.get(key) {
                touched.insert(old.svc_id);
                if self.svc_keys.get(&old.svc_id) == Some(key) {
                    self.svc_keys.remove(&old.svc_id);
                }
            }
            if let Some(new) = out.frontends.get(key) {
                touched.insert(new.svc_id);
                self.svc_keys.insert(new.svc_id, *key);
            }
        }
        touched.extend(delta.sets.iter().map(|k| k.svc_id));
        touched.extend(delta.origins.iter().copied());
        let mut sets: BTreeSet<SetKey> = delta.sets.clone();
        if all {
            touched.extend(out.frontends.values().map(|s| s.svc_id));
            touched.extend(self.shaping.keys().copied());
            touched.extend(self.routes.keys().map(|k| k.svc_id));
            touched.extend(self.affinity.keys().copied());
            sets.extend(out.sets.keys().copied());
        }
        for key in sets {
            let warmup = out.origins.get(&key.svc_id).and_then(|o| backend_warmup(o, key.lane, lanes));
            self.warm.observe(key, out.sets.get(&key), warmup, now, seed, &mut scope.warm);
        }
        touched.extend(self.warm.expire(now, &mut scope.warm));
        touched.extend(scope.warm.iter().map(|k| k.svc_id));
        for svc_id in touched {
            let origin = out.origins.get(&svc_id);
            let shaping = origin.and_then(|o| svc_shaping(o, self.warm.warming(svc_id)));
            let routes = origin.map(|o| svc_routes(svc_id, o, lanes)).unwrap_or_default();
            let affinity = origin.and_then(svc_affinity);
            if self.affinity.get(&svc_id) != affinity.as_ref() {
                scope.affinity.insert(svc_id);
                match affinity {
                    Some(a) => self.affinity.insert(svc_id, a),
                    None => self.affinity.remove(&svc_id),
                };
            }
            if self.shaping.get(&svc_id) != shaping.as_ref() {
                scope.shaping.insert(svc_id);
                match shaping {
                    Some(s) => self.shaping.insert(svc_id, s),
                    None => self.shaping.remove(&svc_id),
                };
            }
            let range = RouteKey { svc_id, caller_lane: 0 }..=RouteKey { svc_id, caller_lane: u32::MAX };
            let stale: Vec<RouteKey> =
                self.routes.range(range).map(|(k, _)| *k).filter(|k| !routes.contains_key(k)).collect();
            for k in stale {
                self.routes.remove(&k);
                scope.routes.insert(k);
            }
            for (k, v) in &routes {
                if self.routes.get(k) != Some(v) {
                    self.routes.insert(*k, *v);
                    scope.routes.insert(*k);
                }
            }
            if let Some(key) = self.svc_keys.get(&svc_id)
                && let Some(base) = out.frontends.get(key)
            {
                let flags = shaped_flags(base.flags, shaping.is_some(), !routes.is_empty());
                let flags = affinity_flags(flags, affinity.is_some());
                let lane_backends =
                    steering::has_lane_backends(out.sets.range(set_range(svc_id)).map(|(k, _)| k));
                let patched = Service {
                    flags: Reasons::of(flags, lane_backends, self.strict_caller).apply(flags),
                    ..*base
                };
                if self.frontends.get(key) != Some(&patched) {
                    self.frontends.insert(*key, patched);
                    scope.frontends.insert(*key);
                }
            }
        }
        for key in &delta.frontends {
            if !out.frontends.contains_key(key) && self.frontends.remove(key).is_some() {
                scope.frontends.insert(*key);
            }
        }
        let flags = lanes.config_flags;
        if flags != self.config_flags || seed {
            self.config_flags = flags;
            scope.config = true;
        }
    }

    /// Recomputes the local pods' entries; returns whether their names or addresses changed.
    fn update_pods(
        &mut self,
        changed: &BTreeSet<ObjectRef>,
        recheck: Recheck,
        cgroup_of: &mut impl FnMut(&DesiredPod) -> Option<CgroupRef>,
        scope: &mut Scope,
    ) -> bool {
        let pods = desired_pods(self.index.local_pods().values(), &self.lane_keys);
        let mut found = mem::take(&mut self.found);
        let mut names = BTreeMap::new();
        let mut addrs = BTreeMap::new();
        let (entries, pending) = pod_entries(&pods, |pod| {
            let cached = found.get(&pod.pod).filter(|f| {
                f.uid == pod.uid
                    && f.qos == pod.qos
                    && !changed.contains(&pod.pod)
                    && match recheck {
                        Recheck::None => true,
                        Recheck::Pending => f.cgroup.is_some(),
                        Recheck::All => false,
                    }
            });
            let cgroup = if let Some(f) = cached {
                f.cgroup.clone()
            } else {
                let cgroup = cgroup_of(pod);
                found.insert(
                    pod.pod.clone(),
                    Found { uid: pod.uid.clone(), qos: pod.qos, cgroup: cgroup.clone() },
                );
                cgroup
            };
            if let Some(c) = &cgroup {
                names.insert(c.id, (pod.pod.namespace.clone(), pod.pod.name.clone()));
                for ip in &pod.ips {
                    // Two pods claiming one address (a stale object): the first UID keeps it.
                    addrs.entry(crate::net::addr_words(*ip)).or_insert_with(|| LocalAddr {
                        cgroup: c.id,
                        lane: pod.lane,
                        lane_name: pod.lane_name.clone(),
                    });
                }
            }
            cgroup
        });
        self.pending = pending.len();
        let present: std::collections::HashSet<&ObjectRef> = pods.pods.values().map(|p| &p.pod).collect();
        found.retain(|key, _| present.contains(key));
        self.found = found;
        for (id, entry) in &entries {
            if self.entries.get(id) != Some(entry) {
                scope.pods.insert(*id);
            }
        }
        scope.pods.extend(self.entries.keys().filter(|id| !entries.contains_key(id)));
        self.entries = entries;
        self.pods = pods;
        let changed = names != self.pod_names || addrs != self.pod_addrs;
        self.pod_names = names;
        self.pod_addrs = addrs;
        changed
    }

    /// The desired contents of the datapath maps.
    #[must_use]
    pub fn desired(&self) -> DesiredRef<'_> {
        let services = self.index.services().desired();
        DesiredRef {
            pods: &self.entries,
            frontends: &self.frontends,
            sets: &services.sets,
            lanes: &self.policies,
            shaping: &self.shaping,
            routes: &self.routes,
            warm: self.warm.entries(),
            affinity: &self.affinity,
            config_flags: self.config_flags,
        }
    }

    /// (frontend, lane) → backends that still serve but get no new connections (see
    /// [`crate::model::topology`]); the connection lifecycle keeps their connections.
    #[must_use]
    pub fn held(&self) -> &BTreeMap<SetKey, Vec<tagger_common::Backend>> {
        &self.index.services().desired().held
    }

    /// The desired contents as an owned state (for tests and checks).
    #[must_use]
    pub fn desired_state(&self) -> DatapathState {
        let d = self.desired();
        DatapathState {
            pods: d.pods.clone(),
            frontends: d.frontends.clone(),
            sets: d.sets.clone(),
            lanes: d.lanes.clone(),
            shaping: d.shaping.clone(),
            routes: d.routes.clone(),
            warm: d.warm.clone(),
            affinity: d.affinity.clone(),
            config_flags: d.config_flags,
        }
    }

    /// Releases the ids of every frontend not desired, and the ids reserved at start: call it
    /// once the first complete update has been applied.
    pub fn retain_ids(&mut self) {
        let frontends = &self.index.services().desired().frontends;
        self.ids.retain(|key, _| frontends.contains_key(key));
    }

    /// The frontend ids.
    #[must_use]
    pub fn ids(&self) -> &FrontendIds {
        &self.ids
    }

    /// svc_id → where each desired frontend comes from.
    #[must_use]
    pub fn origins(&self) -> &BTreeMap<u32, FrontendOrigin> {
        &self.index.services().desired().origins
    }

    /// Pod cgroup id → (namespace, name) of the registered local pods.
    #[must_use]
    pub fn pod_names(&self) -> &BTreeMap<u64, (String, String)> {
        &self.pod_names
    }

    /// Address (network-order words, IPv4 mapped) → pod, for the registered local pods.
    #[must_use]
    pub fn pod_addrs(&self) -> &BTreeMap<[u32; 4], LocalAddr> {
        &self.pod_addrs
    }

    /// Local pods whose cgroup was not found at the last look.
    #[must_use]
    pub fn pending_pods(&self) -> usize {
        self.pending
    }

    /// Time until the first warming backend's warm-up is over (its entry and, with the last
    /// one, the frontend's warm-up flag can go): the agent wakes for it.
    #[must_use]
    pub fn next_warm_expiry(&self) -> Option<std::time::Duration> {
        let now = (self.clock)();
        self.warm
            .entries()
            .values()
            .map(|e| e.ready_ns.saturating_add(e.warmup_ns).saturating_sub(now))
            .min()
            .map(std::time::Duration::from_nanos)
    }

    /// The warning counts of the current state.
    #[must_use]
    pub fn warning_counts(&self) -> BTreeMap<WarningKind, u64> {
        let mut counts = self.index.services().warning_counts();
        for (kind, n) in self.pods.warnings.counts() {
            *counts.entry(*kind).or_default() += n;
        }
        counts
    }

    /// Examples of the warnings the updates since the last call produced.
    pub fn take_recent_warnings(&mut self) -> Warnings {
        let mut w = self.pods.warnings.clone();
        w.merge(self.index.services_mut().take_recent_warnings());
        w
    }

    /// The cluster as the index holds it.
    #[must_use]
    pub fn index(&self) -> &ClusterIndex {
        &self.index
    }
}
