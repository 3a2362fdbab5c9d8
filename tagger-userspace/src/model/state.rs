//! The datapath's contents as data: what the maps hold and what they should hold
//! ([`DatapathState`], or [`DesiredRef`] borrowing the incremental model's maps), and which
//! entries a change may have touched ([`Scope`]). The reconciler ([`crate::reconcile`]) diffs
//! two of them into writes; it reads the maps into one (`DatapathState::read`) and applies
//! writes to one in memory.

use std::collections::{BTreeMap, BTreeSet};

use tagger_common::{
    Backend, FrontendKey, LanePolicy, PodEntry, RouteKey, Service, SetKey, SvcAffinity, SvcShaping,
    WarmEntry, WarmKey,
};

use super::FrontendIds;

/// The contents of the datapath maps that the reconciler manages: both "what is in the maps"
/// and "what should be".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathState {
    /// Pod cgroup id → lane and cgroup level.
    pub pods: BTreeMap<u64, PodEntry>,
    /// Service frontends.
    pub frontends: BTreeMap<FrontendKey, Service>,
    /// (frontend, lane) → backends. Order does not matter to the datapath.
    pub sets: BTreeMap<SetKey, Vec<Backend>>,
    /// Lane id → policy.
    pub lanes: BTreeMap<u32, LanePolicy>,
    /// svc_id → shaping settings.
    pub shaping: BTreeMap<u32, SvcShaping>,
    /// (svc_id, caller lane) → routing rule chain.
    pub routes: BTreeMap<RouteKey, LanePolicy>,
    /// Warming backends.
    pub warm: BTreeMap<WarmKey, WarmEntry>,
    /// svc_id → session affinity timeout.
    pub affinity: BTreeMap<u32, SvcAffinity>,
    /// `DatapathConfig::flags` (shadow mode).
    pub config_flags: u32,
}

impl DatapathState {
    /// An id allocator that keeps the ids of these frontends and never hands out the id of a
    /// set that is still here (left by an interrupted removal), so a new frontend cannot
    /// inherit another one's backends. Call it on the state read at startup.
    #[must_use]
    pub fn frontend_ids(&self) -> FrontendIds {
        let mut ids = FrontendIds::from_existing(self.frontends.iter().map(|(k, s)| (*k, s.svc_id)));
        ids.reserve(self.sets.keys().map(|k| k.svc_id));
        ids
    }

    /// Whether both states hold the same entries, comparing backend sets as sets.
    #[must_use]
    pub fn equivalent(&self, other: &Self) -> bool {
        self.pods == other.pods
            && self.frontends == other.frontends
            && self.lanes == other.lanes
            && self.shaping == other.shaping
            && self.routes == other.routes
            && self.warm == other.warm
            && self.affinity == other.affinity
            && self.config_flags == other.config_flags
            && self.sets.len() == other.sets.len()
            && self.sets.iter().all(|(k, v)| other.sets.get(k).is_some_and(|o| same_members(v, o)))
    }
}

/// The desired contents, borrowed from wherever they are kept (a [`DatapathState`], or the
/// incremental model's maps).
#[derive(Clone, Copy, Debug)]
pub struct DesiredRef<'a> {
    /// Pod cgroup id → lane and cgroup level.
    pub pods: &'a BTreeMap<u64, PodEntry>,
    /// Service frontends.
    pub frontends: &'a BTreeMap<FrontendKey, Service>,
    /// (frontend, lane) → backends.
    pub sets: &'a BTreeMap<SetKey, Vec<Backend>>,
    /// Lane id → policy.
    pub lanes: &'a BTreeMap<u32, LanePolicy>,
    /// svc_id → shaping settings.
    pub shaping: &'a BTreeMap<u32, SvcShaping>,
    /// (svc_id, caller lane) → routing rule chain.
    pub routes: &'a BTreeMap<RouteKey, LanePolicy>,
    /// Warming backends.
    pub warm: &'a BTreeMap<WarmKey, WarmEntry>,
    /// svc_id → session affinity timeout.
    pub affinity: &'a BTreeMap<u32, SvcAffinity>,
    /// `DatapathConfig::flags`.
    pub config_flags: u32,
}

impl DatapathState {
    /// This state as the desired contents of a plan.
    #[must_use]
    pub fn as_desired(&self) -> DesiredRef<'_> {
        DesiredRef {
            pods: &self.pods,
            frontends: &self.frontends,
            sets: &self.sets,
            lanes: &self.lanes,
            shaping: &self.shaping,
            routes: &self.routes,
            warm: &self.warm,
            affinity: &self.affinity,
            config_flags: self.config_flags,
        }
    }
}

/// The entries a plan looks at: those that may differ between the maps and the desired state.
/// [`Scope::all`] is every entry of either; an incremental reconciler passes only the keys its
/// inputs' changes touched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// Pod cgroup ids.
    pub pods: BTreeSet<u64>,
    /// Frontends.
    pub frontends: BTreeSet<FrontendKey>,
    /// Backend sets.
    pub sets: BTreeSet<SetKey>,
    /// Lane policies.
    pub lanes: BTreeSet<u32>,
    /// Shaping entries, by svc_id.
    pub shaping: BTreeSet<u32>,
    /// Routing rule chains.
    pub routes: BTreeSet<RouteKey>,
    /// Warming backends.
    pub warm: BTreeSet<WarmKey>,
    /// Affinity timeouts, by svc_id.
    pub affinity: BTreeSet<u32>,
    /// The global flags.
    pub config: bool,
}

impl Scope {
    /// Every entry of `current` and of `desired`.
    #[must_use]
    pub fn all(current: &DatapathState, desired: DesiredRef<'_>) -> Self {
        Self {
            pods: current.pods.keys().chain(desired.pods.keys()).copied().collect(),
            frontends: current.frontends.keys().chain(desired.frontends.keys()).copied().collect(),
            sets: current.sets.keys().chain(desired.sets.keys()).copied().collect(),
            lanes: current.lanes.keys().chain(desired.lanes.keys()).copied().collect(),
            shaping: current.shaping.keys().chain(desired.shaping.keys()).copied().collect(),
            routes: current.routes.keys().chain(desired.routes.keys()).copied().collect(),
            warm: current.warm.keys().chain(desired.warm.keys()).copied().collect(),
            affinity: current.affinity.keys().chain(desired.affinity.keys()).copied().collect(),
            config: true,
        }
    }

    /// Whether the scope holds no entry.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
            && self.frontends.is_empty()
            && self.sets.is_empty()
            && self.lanes.is_empty()
            && self.shaping.is_empty()
            && self.routes.is_empty()
            && self.warm.is_empty()
            && self.affinity.is_empty()
            && !self.config
    }

    /// Adds another scope's entries.
    pub fn merge(&mut self, other: Scope) {
        self.pods.extend(other.pods);
        self.frontends.extend(other.frontends);
        self.sets.extend(other.sets);
        self.lanes.extend(other.lanes);
        self.shaping.extend(other.shaping);
        self.routes.extend(other.routes);
        self.warm.extend(other.warm);
        self.affinity.extend(other.affinity);
        self.config |= other.config;
    }
}

/// Whether two backend lists hold the same backends, in any order.
pub fn same_members(a: &[Backend], b: &[Backend]) -> bool {
    if a == b {
        return true;
    }
    let set = |v: &[Backend]| v.iter().copied().collect::<BTreeSet<_>>();
    set(a) == set(b)
}
