//! The desired datapath kept up to date from the sources' changes, for an incremental
//! reconciler: [`Incremental`] applies [`Change`]s to a [`ClusterIndex`], recomputes only what
//! they affect, and says which entries may now differ from the maps ([`Update::scope`]), so the
//! plan ([`super::plan_scoped`]) looks at those only. It computes exactly what
//! [`DatapathState::desired`] computes from the whole cluster (the property tests check it),
//! except that `svc_id`s are allocated in the order frontends appear.
//!
//! Pure except for `cgroup_of`, the caller's lookup of a local pod's cgroup, whose results are
//! kept: a pod's cgroup is looked up when the pod is new or changed, pods whose cgroup was not
//! found on [`Recheck::Pending`], and every pod on [`Recheck::All`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    mem,
};

use tagger_common::{LanePolicy, PodEntry};

use super::{DatapathState, DesiredRef, Scope};
use crate::{
    cgroup::CgroupRef,
    lanes_config::LanesConfig,
    model::{
        Change, ClusterIndex, DesiredPod, DesiredPods, FrontendIds, FrontendOrigin, Limits, ObjectRef,
        QosClass, WarningKind, Warnings, desired_pods, pod_entries,
    },
};

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
    /// The local pods (their names) changed.
    pub pods_changed: bool,
    /// The lanes config changed.
    pub lanes_changed: bool,
    /// Lane names seen on pods (the lanes config's are in it).
    pub lane_names: Vec<(u32, String)>,
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
    lanes: Option<LanesConfig>,
    policies: BTreeMap<u32, LanePolicy>,
    pods: DesiredPods,
    entries: BTreeMap<u64, PodEntry>,
    pod_names: BTreeMap<u64, (String, String)>,
    found: HashMap<ObjectRef, Found>,
    pending: usize,
    started: bool,
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
            found: HashMap::new(),
            pending: 0,
            started: false,
        }
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
        lanes: &LanesConfig,
        recheck: Recheck,
        mut cgroup_of: impl FnMut(&DesiredPod) -> Option<CgroupRef>,
    ) -> Update {
        let full = !self.started;
        self.started = true;
        let mut update = Update { full, ..Update::default() };

        let services = self.index.services_mut();
        services.compute(&mut self.ids);
        let delta = services.take_delta();
        update.scope.frontends = delta.frontends;
        update.scope.sets = delta.sets;
        update.origins = delta.origins;
        update.lane_names = services.take_lane_names();

        let changed = self.index.take_local_changes();
        if full || recheck != Recheck::None || !changed.is_empty() {
            update.pods_changed = self.update_pods(&changed, recheck, &mut cgroup_of, &mut update.scope);
            update.lane_names.extend(
                self.pods.pods.values().filter_map(|p| p.lane_name.as_ref().map(|n| (p.lane, n.clone()))),
            );
        }

        if self.lanes.as_ref() != Some(lanes) {
            let policies = lanes.policies();
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

    /// Recomputes the local pods' entries; returns whether their names changed.
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
        let names_changed = names != self.pod_names;
        self.pod_names = names;
        names_changed
    }

    /// The desired contents of the datapath maps.
    #[must_use]
    pub fn desired(&self) -> DesiredRef<'_> {
        let services = self.index.services().desired();
        DesiredRef {
            pods: &self.entries,
            frontends: &services.frontends,
            sets: &services.sets,
            lanes: &self.policies,
        }
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

    /// Local pods whose cgroup was not found at the last look.
    #[must_use]
    pub fn pending_pods(&self) -> usize {
        self.pending
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
