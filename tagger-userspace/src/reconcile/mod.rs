//! The reconciler's diff: what the datapath maps hold versus what the model wants, as an ordered
//! list of map writes, and the application of that list.
//!
//! Guarantees (docs/ARCHITECTURE.md, "Control plane: incremental reconciliation"):
//! - **Minimal**: equal entries produce no op; a backend set with the same members in another
//!   order is not rewritten (each rewrite is a new generation of slots).
//! - **Safe order**: lane policies and backend sets are written before the pods and frontends
//!   that use them appear; a frontend is removed before its sets. A connect racing the writes
//!   sees either the old or the new state of each Service, never a frontend whose sets are not
//!   there yet.
//! - **No premature pruning**: with `prune == false` (before a complete initial list or relist
//!   has been seen) nothing that any connection can see is removed: absence from an incomplete
//!   picture means nothing. The one removal that does not wait is of a set no frontend points
//!   at, cleared just before a frontend with that `svc_id` appears (see [`plan`]).
//! - **Failure isolation**: when a write fails (a full map), [`apply_plan`] logs it, goes on with
//!   the ops that do not depend on it, and skips those that do, so no frontend appears without
//!   its sets and no set of a still-live frontend is removed.
//!
//! Incrementally: [`plan_scoped`] plans only the entries of a [`Scope`] (the keys a change
//! touched, as [`incremental::Incremental`] reports them) and gives, for those, exactly the ops
//! of a full [`plan`]; the agent keeps a [`Mirror`] of the maps, indexed for it, and plans every
//! entry only at start, after a failed write and periodically.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
};

use tagger_common::{
    BASE_LANE, Backend, FrontendKey, LanePolicy, MAP_AFFINITY_CFG, MAP_BACKEND_SETS, MAP_BACKEND_SLOTS,
    MAP_FRONTENDS, MAP_LANES, MAP_PODS, MAP_ROUTES, MAP_WARM, MAX_BACKEND_SETS, MAX_BACKENDS,
    MAX_CGROUP_LEVEL, MAX_CHAIN, MAX_FRONTENDS, MAX_LANES, MAX_PODS, MAX_ROUTES, MAX_WARM, PodEntry,
    RouteKey, Service, SetKey, SvcAffinity, SvcShaping, WarmEntry, WarmKey,
};

pub use crate::model::state::{DatapathState, DesiredRef, Scope};
use crate::{Error, Result, datapath::Tables, model::state::same_members, net::frontend_addr};

/// Reading the maps.
impl DatapathState {
    /// What the pinned maps hold now. A set whose slots cannot be read (only an interrupted
    /// or foreign write leaves one) reads as empty, so the plan rewrites or removes it.
    pub fn read(tables: &Tables) -> Result<Self> {
        let mut sets = BTreeMap::new();
        for key in tables.backend_sets()?.into_keys() {
            let backends = tables.backends(key.svc_id, key.lane).unwrap_or_else(|e| {
                log::warn!("backend set {key:?} is unreadable ({e}); it will be rewritten");
                Vec::new()
            });
            sets.insert(key, backends);
        }
        Ok(Self {
            pods: tables.pods()?,
            frontends: tables.frontends()?,
            sets,
            lanes: tables.lane_policies()?,
            shaping: tables.shapings()?,
            routes: tables.routes()?,
            warm: tables.warm_entries()?,
            affinity: tables.affinities()?,
            config_flags: tables.config()?.flags,
        })
    }
}

/// What the maps hold, as the reconciler wrote them, indexed for [`plan_scoped`]: which
/// `svc_id`s its frontends use. Apply ops to it as they are applied to the maps.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    state: DatapathState,
    /// svc_id → number of frontends using it.
    live: HashMap<u32, u32>,
}

impl Mirror {
    /// A mirror of `state`.
    #[must_use]
    pub fn new(state: DatapathState) -> Self {
        let mut live: HashMap<u32, u32> = HashMap::new();
        for s in state.frontends.values() {
            *live.entry(s.svc_id).or_default() += 1;
        }
        Self { state, live }
    }

    /// The mirrored contents.
    #[must_use]
    pub fn state(&self) -> &DatapathState {
        &self.state
    }

    /// Whether a frontend uses `svc_id`.
    #[must_use]
    pub fn is_live(&self, svc_id: u32) -> bool {
        self.live.contains_key(&svc_id)
    }

    /// The writes that turn the entries of `scope` into `desired` (see [`plan_scoped`]).
    #[must_use]
    pub fn plan(&self, desired: DesiredRef<'_>, scope: &Scope, prune: bool) -> Vec<Op> {
        plan_scoped(&self.state, |id| self.is_live(id), desired, scope, prune)
    }

    fn unuse(&mut self, svc_id: u32) {
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.live.entry(svc_id) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// The mirror applies ops like the in-memory model (same validation) and keeps its index.
impl DatapathWriter for Mirror {
    fn apply(&mut self, op: &Op) -> Result<(), Error> {
        self.apply_owned(op.clone())
    }
}

impl Mirror {
    /// Applies an op, taking its contents (a set's backends are moved, not copied).
    pub fn apply_owned(&mut self, op: Op) -> Result<(), Error> {
        let (before, after) = match &op {
            Op::UpsertFrontend { key, service, .. } => {
                (self.state.frontends.get(key).copied(), Some(service.svc_id))
            }
            Op::RemoveFrontend { key, .. } => (self.state.frontends.get(key).copied(), None),
            _ => (None, None),
        };
        self.state.apply_owned(op)?;
        if let Some(before) = before {
            self.unuse(before.svc_id);
        }
        if let Some(after) = after {
            *self.live.entry(after).or_default() += 1;
        }
        Ok(())
    }
}

/// One write to the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Sets a lane's policy.
    SetLanePolicy {
        /// Lane id.
        lane: u32,
        /// The policy.
        policy: LanePolicy,
    },
    /// Replaces a (frontend, lane) backend set atomically.
    ReplaceSet {
        /// The set.
        key: SetKey,
        /// Its new members.
        backends: Vec<Backend>,
    },
    /// Adds a frontend or changes its entry.
    UpsertFrontend {
        /// The frontend.
        key: FrontendKey,
        /// Its new entry.
        service: Service,
        /// The entry it replaces, if any: while this op has not succeeded, that entry's sets
        /// are still in use.
        previous: Option<Service>,
    },
    /// Registers a pod cgroup in a lane (or moves it).
    RegisterPod {
        /// Cgroup id.
        cgroup_id: u64,
        /// Lane and cgroup level.
        entry: PodEntry,
    },
    /// Forgets a pod cgroup.
    UnregisterPod {
        /// Cgroup id.
        cgroup_id: u64,
    },
    /// Removes a frontend.
    RemoveFrontend {
        /// The frontend.
        key: FrontendKey,
        /// Its entry: while this op has not succeeded, that entry's sets are still in use.
        previous: Service,
    },
    /// Removes a backend set.
    RemoveSet {
        /// The set.
        key: SetKey,
    },
    /// Removes a lane's policy (the lane falls back to base again).
    RemoveLanePolicy {
        /// Lane id.
        lane: u32,
    },
    /// Sets the global flags.
    SetConfigFlags {
        /// `CFG_F_*` bits.
        flags: u32,
    },
    /// Sets a frontend's shaping settings.
    SetShaping {
        /// The frontend's id.
        svc_id: u32,
        /// The settings.
        shaping: SvcShaping,
    },
    /// Sets a routing rule chain.
    SetRoute {
        /// (svc_id, caller lane).
        key: RouteKey,
        /// The chain.
        chain: LanePolicy,
    },
    /// Marks a backend as warming.
    SetWarm {
        /// The backend of a frontend.
        key: WarmKey,
        /// Its ready time and curve.
        entry: WarmEntry,
    },
    /// Removes a frontend's shaping settings.
    RemoveShaping {
        /// The frontend's id.
        svc_id: u32,
    },
    /// Removes a routing rule chain.
    RemoveRoute {
        /// (svc_id, caller lane).
        key: RouteKey,
    },
    /// Forgets a warming backend.
    RemoveWarm {
        /// The backend of a frontend.
        key: WarmKey,
    },
    /// Sets a frontend's session affinity timeout.
    SetAffinity {
        /// The frontend's id.
        svc_id: u32,
        /// The timeout.
        affinity: SvcAffinity,
    },
    /// Removes a frontend's session affinity timeout.
    RemoveAffinity {
        /// The frontend's id.
        svc_id: u32,
    },
}

impl Op {
    /// Whether the op removes something ([`plan`] emits none without `prune`, except the
    /// clearing of sets no frontend points at).
    #[must_use]
    pub fn is_removal(&self) -> bool {
        matches!(
            self,
            Op::UnregisterPod { .. }
                | Op::RemoveFrontend { .. }
                | Op::RemoveSet { .. }
                | Op::RemoveLanePolicy { .. }
                | Op::RemoveShaping { .. }
                | Op::RemoveRoute { .. }
                | Op::RemoveWarm { .. }
                | Op::RemoveAffinity { .. }
        )
    }
}

/// A one-line description for logs (a set's members are summarised by their number).
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let frontend = |key: &FrontendKey| {
            let (addr, proto) = frontend_addr(key);
            proto.map_or_else(|| format!("{addr}/{}", key.proto), |p| format!("{addr}/{p}"))
        };
        match self {
            Op::SetLanePolicy { lane, policy } => write!(
                f,
                "set lane {lane:#010x} policy (flags {:#x}, chain {:x?})",
                policy.flags,
                &policy.chain[..(policy.chain_len as usize).min(MAX_CHAIN)]
            ),
            Op::ReplaceSet { key, backends } => write!(
                f,
                "replace set svc {} lane {:#010x} with {} backends",
                key.svc_id,
                key.lane,
                backends.len()
            ),
            Op::UpsertFrontend { key, service, .. } => write!(
                f,
                "upsert frontend {} as svc {} (flags {:#x})",
                frontend(key),
                service.svc_id,
                service.flags
            ),
            Op::RegisterPod { cgroup_id, entry } => {
                write!(
                    f,
                    "register pod cgroup {cgroup_id} (level {}) in lane {:#010x}",
                    entry.level, entry.lane
                )
            }
            Op::UnregisterPod { cgroup_id } => write!(f, "unregister pod cgroup {cgroup_id}"),
            Op::RemoveFrontend { key, previous } => {
                write!(f, "remove frontend {} (svc {})", frontend(key), previous.svc_id)
            }
            Op::RemoveSet { key } => write!(f, "remove set svc {} lane {:#010x}", key.svc_id, key.lane),
            Op::RemoveLanePolicy { lane } => write!(f, "remove lane {lane:#010x} policy"),
            Op::SetConfigFlags { flags } => write!(f, "set datapath flags {flags:#x}"),
            Op::SetShaping { svc_id, shaping } => write!(
                f,
                "set svc {svc_id} shaping (flags {:#x}, canary lane {:#010x} {} bp)",
                shaping.flags, shaping.canary_lane, shaping.canary_bp
            ),
            Op::SetRoute { key, chain } => write!(
                f,
                "set route svc {} from lane {:#010x} (flags {:#x}, chain {:x?})",
                key.svc_id,
                key.caller_lane,
                chain.flags,
                &chain.chain[..(chain.chain_len as usize).min(MAX_CHAIN)]
            ),
            Op::SetWarm { key, entry } => write!(
                f,
                "set warm-up of svc {} backend {:?}:{} ({} ms)",
                key.svc_id,
                key.addr,
                u16::from_be(key.port),
                entry.warmup_ns / 1_000_000
            ),
            Op::RemoveShaping { svc_id } => write!(f, "remove svc {svc_id} shaping"),
            Op::RemoveRoute { key } => {
                write!(f, "remove route svc {} from lane {:#010x}", key.svc_id, key.caller_lane)
            }
            Op::RemoveWarm { key } => {
                write!(f, "remove warm-up of svc {} backend {:?}", key.svc_id, key.addr)
            }
            Op::SetAffinity { svc_id, affinity } => {
                write!(f, "set svc {svc_id} session affinity ({} s)", affinity.timeout_s)
            }
            Op::RemoveAffinity { svc_id } => write!(f, "remove svc {svc_id} session affinity"),
        }
    }
}

/// The writes that turn `current` into `desired`, in a safe order:
///
/// 1. lane policies set,
/// 2. backend sets replaced, and leftover sets cleared for the frontends about to appear,
/// 3. frontends upserted,
/// 4. pods registered,
///
/// then, only with `prune`:
///
/// 5. pods unregistered,
/// 6. frontends removed,
/// 7. sets removed,
/// 8. lane policies removed.
///
/// Leftover sets: a frontend whose `svc_id` no current frontend uses (a new frontend, or one
/// whose id changed) must appear with exactly its desired sets. A set of that id left in the
/// maps — written for it by a pass whose frontend upsert then failed — would otherwise make it
/// serve stale backends in a lane that now has none (e.g. a pod since relabelled). Such a set is
/// invisible to every connection until the frontend appears, so it is removed in step 2 even
/// without `prune`.
#[must_use]
#[cfg(test)]
pub fn plan(current: &DatapathState, desired: &DatapathState, prune: bool) -> Vec<Op> {
    let live: BTreeSet<u32> = current.frontends.values().map(|s| s.svc_id).collect();
    let desired = desired.as_desired();
    plan_scoped(current, |id| live.contains(&id), desired, &Scope::all(current, desired), prune)
}

/// [`plan`] restricted to the entries of `scope`: the same ops, in the same order, as a full
/// plan would give for those entries, given that every other entry of `current` already
/// equals `desired`. `live` tells whether a frontend of `current` uses an `svc_id`. Leftover
/// sets are looked up by `svc_id` (they need not be in the scope).
#[must_use]
pub fn plan_scoped(
    current: &DatapathState,
    live: impl Fn(u32) -> bool,
    desired: DesiredRef<'_>,
    scope: &Scope,
    prune: bool,
) -> Vec<Op> {
    let mut ops = Vec::new();
    if scope.config && current.config_flags != desired.config_flags {
        ops.push(Op::SetConfigFlags { flags: desired.config_flags });
    }
    for &lane in &scope.lanes {
        if let Some(policy) = desired.lanes.get(&lane)
            && current.lanes.get(&lane) != Some(policy)
        {
            ops.push(Op::SetLanePolicy { lane, policy: *policy });
        }
    }
    for key in &scope.sets {
        if let Some(backends) = desired.sets.get(key)
            && !current.sets.get(key).is_some_and(|c| same_members(c, backends))
        {
            ops.push(Op::ReplaceSet { key: *key, backends: backends.clone() });
        }
    }
    upserts(&mut ops, &scope.shaping, desired.shaping, &current.shaping, |svc_id, shaping| Op::SetShaping {
        svc_id,
        shaping,
    });
    upserts(&mut ops, &scope.routes, desired.routes, &current.routes, |key, chain| Op::SetRoute {
        key,
        chain,
    });
    upserts(&mut ops, &scope.warm, desired.warm, &current.warm, |key, entry| Op::SetWarm { key, entry });
    upserts(&mut ops, &scope.affinity, desired.affinity, &current.affinity, |svc_id, affinity| {
        Op::SetAffinity { svc_id, affinity }
    });
    let appearing: BTreeSet<u32> = scope
        .frontends
        .iter()
        .filter_map(|key| desired.frontends.get(key).map(|s| (key, s)))
        .filter(|(key, service)| current.frontends.get(key) != Some(service))
        .map(|(_, service)| service.svc_id)
        .filter(|&id| !live(id))
        .collect();
    let leftover = |key: &SetKey| appearing.contains(&key.svc_id) && !desired.sets.contains_key(key);
    for &id in &appearing {
        let range = SetKey { svc_id: id, lane: 0 }..=SetKey { svc_id: id, lane: u32::MAX };
        for key in current.sets.range(range).map(|(k, _)| k).filter(|k| leftover(k)) {
            ops.push(Op::RemoveSet { key: *key });
        }
    }
    for key in &scope.frontends {
        if let Some(service) = desired.frontends.get(key) {
            let previous = current.frontends.get(key).copied();
            if previous != Some(*service) {
                ops.push(Op::UpsertFrontend { key: *key, service: *service, previous });
            }
        }
    }
    for &cgroup_id in &scope.pods {
        if let Some(entry) = desired.pods.get(&cgroup_id)
            && current.pods.get(&cgroup_id) != Some(entry)
        {
            ops.push(Op::RegisterPod { cgroup_id, entry: *entry });
        }
    }
    if !prune {
        return ops;
    }
    for &cgroup_id in &scope.pods {
        if current.pods.contains_key(&cgroup_id) && !desired.pods.contains_key(&cgroup_id) {
            ops.push(Op::UnregisterPod { cgroup_id });
        }
    }
    for key in &scope.frontends {
        if let Some(previous) = current.frontends.get(key)
            && !desired.frontends.contains_key(key)
        {
            ops.push(Op::RemoveFrontend { key: *key, previous: *previous });
        }
    }
    for key in &scope.sets {
        if current.sets.contains_key(key) && !desired.sets.contains_key(key) && !leftover(key) {
            ops.push(Op::RemoveSet { key: *key });
        }
    }
    for &lane in &scope.lanes {
        if current.lanes.contains_key(&lane) && !desired.lanes.contains_key(&lane) {
            ops.push(Op::RemoveLanePolicy { lane });
        }
    }
    removals(&mut ops, &scope.shaping, desired.shaping, &current.shaping, |svc_id| Op::RemoveShaping {
        svc_id,
    });
    removals(&mut ops, &scope.routes, desired.routes, &current.routes, |key| Op::RemoveRoute { key });
    removals(&mut ops, &scope.warm, desired.warm, &current.warm, |key| Op::RemoveWarm { key });
    removals(&mut ops, &scope.affinity, desired.affinity, &current.affinity, |svc_id| Op::RemoveAffinity {
        svc_id,
    });
    ops
}

/// Writes of the entries of `scope` that `desired` has and `current` lacks or holds otherwise.
fn upserts<K: Ord + Copy, V: PartialEq + Copy>(
    ops: &mut Vec<Op>,
    scope: &BTreeSet<K>,
    desired: &BTreeMap<K, V>,
    current: &BTreeMap<K, V>,
    op: impl Fn(K, V) -> Op,
) {
    for key in scope {
        if let Some(v) = desired.get(key)
            && current.get(key) != Some(v)
        {
            ops.push(op(*key, *v));
        }
    }
}

/// Removals of the entries of `scope` that `current` has and `desired` does not.
fn removals<K: Ord + Copy, V>(
    ops: &mut Vec<Op>,
    scope: &BTreeSet<K>,
    desired: &BTreeMap<K, V>,
    current: &BTreeMap<K, V>,
    op: impl Fn(K) -> Op,
) {
    for key in scope {
        if current.contains_key(key) && !desired.contains_key(key) {
            ops.push(op(*key));
        }
    }
}

/// Something that can apply datapath writes: the pinned maps, or the in-memory model.
pub trait DatapathWriter {
    /// Applies one op. On error the op had no visible effect (the maps' API guarantees it).
    fn apply(&mut self, op: &Op) -> Result<(), Error>;
}

/// The pinned maps.
impl DatapathWriter for Tables {
    fn apply(&mut self, op: &Op) -> Result<(), Error> {
        match op {
            Op::SetLanePolicy { lane, policy } => self.set_lane_policy(*lane, policy),
            Op::ReplaceSet { key, backends } => self.replace_backends(key.svc_id, key.lane, backends),
            Op::UpsertFrontend { key, service, .. } => self.upsert_frontend(key, *service),
            Op::RegisterPod { cgroup_id, entry } => self.register_pod(*cgroup_id, *entry),
            Op::UnregisterPod { cgroup_id } => self.unregister_pod(*cgroup_id),
            Op::RemoveFrontend { key, .. } => self.remove_frontend(key),
            Op::RemoveSet { key } => self.remove_backend_set(key.svc_id, key.lane),
            Op::RemoveLanePolicy { lane } => self.remove_lane_policy(*lane),
            Op::SetConfigFlags { flags } => self.set_config_flags(*flags),
            Op::SetShaping { svc_id, shaping } => self.set_shaping(*svc_id, shaping),
            Op::SetRoute { key, chain } => self.set_route(*key, chain),
            Op::SetWarm { key, entry } => self.set_warm(*key, entry),
            Op::RemoveShaping { svc_id } => self.remove_shaping(*svc_id),
            Op::RemoveRoute { key } => self.remove_route(*key),
            Op::RemoveWarm { key } => self.remove_warm(*key),
            Op::SetAffinity { svc_id, affinity } => self.set_affinity(*svc_id, affinity),
            Op::RemoveAffinity { svc_id } => self.remove_affinity(*svc_id),
        }
    }
}

impl DatapathState {
    /// Applies an op, taking its contents (a set's backends are moved, not copied).
    pub fn apply_owned(&mut self, op: Op) -> Result<(), Error> {
        self.check(&op)?;
        match op {
            Op::SetLanePolicy { lane, policy } => {
                self.lanes.insert(lane, policy);
            }
            Op::ReplaceSet { key, backends } => {
                self.sets.insert(key, backends);
            }
            Op::UpsertFrontend { key, service, .. } => {
                self.frontends.insert(key, service);
            }
            Op::RegisterPod { cgroup_id, entry } => {
                self.pods.insert(cgroup_id, entry);
            }
            Op::UnregisterPod { cgroup_id } => {
                self.pods.remove(&cgroup_id);
            }
            Op::RemoveFrontend { key, .. } => {
                self.frontends.remove(&key);
            }
            Op::RemoveSet { key } => {
                self.sets.remove(&key);
            }
            Op::RemoveLanePolicy { lane } => {
                self.lanes.remove(&lane);
            }
            Op::SetConfigFlags { flags } => self.config_flags = flags,
            Op::SetShaping { svc_id, shaping } => {
                self.shaping.insert(svc_id, shaping);
            }
            Op::SetRoute { key, chain } => {
                self.routes.insert(key, chain);
            }
            Op::SetWarm { key, entry } => {
                self.warm.insert(key, entry);
            }
            Op::RemoveShaping { svc_id } => {
                self.shaping.remove(&svc_id);
            }
            Op::RemoveRoute { key } => {
                self.routes.remove(&key);
            }
            Op::RemoveWarm { key } => {
                self.warm.remove(&key);
            }
            Op::SetAffinity { svc_id, affinity } => {
                self.affinity.insert(svc_id, affinity);
            }
            Op::RemoveAffinity { svc_id } => {
                self.affinity.remove(&svc_id);
            }
        }
        Ok(())
    }

    /// The error the maps would give for `op`, if any.
    fn check(&self, op: &Op) -> Result<(), Error> {
        fn full(map: &'static str, capacity: u32) -> Error {
            Error::MapFull { map, wanted: u64::from(capacity) + 1, capacity: u64::from(capacity) }
        }
        match op {
            Op::SetLanePolicy { lane, policy } => {
                if *lane == BASE_LANE {
                    return Err(Error::Invalid {
                        what: "lane policy",
                        reason: "the base lane has no fallback policy".into(),
                    });
                }
                if policy.chain_len as usize > MAX_CHAIN {
                    return Err(Error::Invalid {
                        what: "lane policy",
                        reason: format!("chain of {} lanes; at most {MAX_CHAIN}", policy.chain_len),
                    });
                }
                if !self.lanes.contains_key(lane) && self.lanes.len() >= MAX_LANES as usize {
                    return Err(full(MAP_LANES, MAX_LANES));
                }
            }
            Op::ReplaceSet { key, backends } => {
                if backends.len() > MAX_BACKENDS as usize {
                    return Err(Error::MapFull {
                        map: MAP_BACKEND_SLOTS,
                        wanted: backends.len() as u64,
                        capacity: u64::from(MAX_BACKENDS),
                    });
                }
                if !self.sets.contains_key(key) && self.sets.len() >= MAX_BACKEND_SETS as usize {
                    return Err(full(MAP_BACKEND_SETS, MAX_BACKEND_SETS));
                }
            }
            Op::UpsertFrontend { key, .. } => {
                if !self.frontends.contains_key(key) && self.frontends.len() >= MAX_FRONTENDS as usize {
                    return Err(full(MAP_FRONTENDS, MAX_FRONTENDS));
                }
            }
            Op::RegisterPod { cgroup_id, entry } => {
                if entry.level == 0 || entry.level > MAX_CGROUP_LEVEL {
                    return Err(Error::Invalid {
                        what: "pod cgroup",
                        reason: format!("cgroup {cgroup_id} is at level {}", entry.level),
                    });
                }
                if !self.pods.contains_key(cgroup_id) && self.pods.len() >= MAX_PODS as usize {
                    return Err(full(MAP_PODS, MAX_PODS));
                }
            }
            Op::SetRoute { key, chain } => {
                if chain.chain_len as usize > MAX_CHAIN {
                    return Err(Error::Invalid {
                        what: "routing rule",
                        reason: format!("chain of {} lanes; at most {MAX_CHAIN}", chain.chain_len),
                    });
                }
                if !self.routes.contains_key(key) && self.routes.len() >= MAX_ROUTES as usize {
                    return Err(full(MAP_ROUTES, MAX_ROUTES));
                }
            }
            Op::SetWarm { key, .. } => {
                if !self.warm.contains_key(key) && self.warm.len() >= MAX_WARM as usize {
                    return Err(full(MAP_WARM, MAX_WARM));
                }
            }
            Op::UnregisterPod { .. }
            | Op::RemoveFrontend { .. }
            | Op::RemoveSet { .. }
            | Op::RemoveLanePolicy { .. }
            | Op::SetConfigFlags { .. }
            | Op::SetShaping { .. }
            | Op::RemoveShaping { .. }
            | Op::RemoveRoute { .. }
            | Op::RemoveWarm { .. }
            | Op::RemoveAffinity { .. } => {}
            Op::SetAffinity { svc_id, .. } => {
                if !self.affinity.contains_key(svc_id) && self.affinity.len() >= MAX_FRONTENDS as usize {
                    return Err(full(MAP_AFFINITY_CFG, MAX_FRONTENDS));
                }
            }
        }
        Ok(())
    }
}

/// The in-memory model of the maps, with the same validation and capacities as [`Tables`], so
/// tests see the errors the kernel maps would give.
impl DatapathWriter for DatapathState {
    fn apply(&mut self, op: &Op) -> Result<(), Error> {
        self.apply_owned(op.clone())
    }
}

/// What [`apply_plan`] did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Ops applied.
    pub applied: usize,
    /// Ops that failed, with the error.
    pub failed: Vec<(Op, Error)>,
    /// Ops not attempted because an op they depend on failed (or was skipped).
    pub skipped: Vec<Op>,
}

impl ApplyReport {
    /// Whether every op was applied.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty() && self.skipped.is_empty()
    }
}

/// Applies `ops` in order. A failed op is logged and recorded, and the remaining ops go on,
/// except those that depend on it:
/// - a frontend whose new entry's backend set failed to be written or cleared is not upserted
///   (it would serve without that lane's backends, or with stale ones);
/// - a pod whose lane policy failed is not registered in that lane (it would fall back where
///   its lane should refuse, or the reverse);
/// - the sets of a frontend whose removal or id change failed are not removed (it still serves
///   from them).
///
/// The next reconcile plans again from what the maps hold, so everything skipped is retried.
pub fn apply_plan<W: DatapathWriter + ?Sized>(writer: &mut W, ops: &[Op]) -> ApplyReport {
    let mut report = ApplyReport::default();
    // svc_ids with a set that was not written (or not cleared).
    let mut unwritten_sets = BTreeSet::new();
    // Lanes whose policy was not written.
    let mut unwritten_lanes = BTreeSet::new();
    // svc_ids still used by a frontend that was meant to stop using them.
    let mut still_used = BTreeSet::new();
    for op in ops {
        let blocked = match op {
            Op::UpsertFrontend { service, .. } => unwritten_sets.contains(&service.svc_id),
            Op::RegisterPod { entry, .. } => unwritten_lanes.contains(&entry.lane),
            Op::RemoveSet { key } => still_used.contains(&key.svc_id),
            _ => false,
        };
        let done = if blocked {
            log::warn!("datapath: skipped {op}: an earlier write it depends on failed");
            report.skipped.push(op.clone());
            false
        } else {
            match writer.apply(op) {
                Ok(()) => {
                    report.applied += 1;
                    true
                }
                Err(e) => {
                    log::error!("datapath: {op} failed: {e}");
                    report.failed.push((op.clone(), e));
                    false
                }
            }
        };
        if done {
            continue;
        }
        match op {
            Op::ReplaceSet { key, .. } | Op::RemoveSet { key } => {
                unwritten_sets.insert(key.svc_id);
            }
            // A frontend must not appear with its flags pointing at entries that are not there.
            Op::SetShaping { svc_id, .. } | Op::SetAffinity { svc_id, .. } => {
                unwritten_sets.insert(*svc_id);
            }
            Op::SetRoute { key, .. } => {
                unwritten_sets.insert(key.svc_id);
            }
            Op::SetLanePolicy { lane, .. } => {
                unwritten_lanes.insert(*lane);
            }
            Op::UpsertFrontend { service, previous: Some(previous), .. }
                if previous.svc_id != service.svc_id =>
            {
                still_used.insert(previous.svc_id);
            }
            Op::RemoveFrontend { previous, .. } => {
                still_used.insert(previous.svc_id);
            }
            _ => {}
        }
    }
    report
}

#[cfg(test)]
mod tests;
