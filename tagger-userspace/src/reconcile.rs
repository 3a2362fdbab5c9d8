//! The reconciler's diff: what the datapath maps hold versus what the model wants, as an ordered
//! list of map writes, and the application of that list.
//!
//! Guarantees (PRODUCT.md, issue 3):
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

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::PathBuf,
};

use tagger_common::{
    BASE_LANE, Backend, FrontendKey, LanePolicy, MAP_BACKEND_SETS, MAP_BACKEND_SLOTS, MAP_FRONTENDS,
    MAP_LANES, MAP_PODS, MAX_BACKEND_SETS, MAX_BACKENDS, MAX_CGROUP_LEVEL, MAX_CHAIN, MAX_FRONTENDS,
    MAX_LANES, MAX_PODS, PodEntry, Service, SetKey,
};

use crate::{
    Error, Result,
    cgroup::CgroupRef,
    datapath::Tables,
    lanes_config::LanesConfig,
    model::{DesiredServices, FrontendIds},
    net::frontend_addr,
};

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
}

impl DatapathState {
    /// The desired state from the model's outputs.
    #[must_use]
    pub fn desired(pods: BTreeMap<u64, PodEntry>, services: &DesiredServices, lanes: &LanesConfig) -> Self {
        Self {
            pods,
            frontends: services.frontends.clone(),
            sets: services.sets.clone(),
            lanes: lanes.policies(),
        }
    }

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
        })
    }

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
            && self.sets.len() == other.sets.len()
            && self.sets.iter().all(|(k, v)| other.sets.get(k).is_some_and(|o| same_members(v, o)))
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
pub fn plan(current: &DatapathState, desired: &DatapathState, prune: bool) -> Vec<Op> {
    let mut ops = Vec::new();
    for (&lane, policy) in &desired.lanes {
        if current.lanes.get(&lane) != Some(policy) {
            ops.push(Op::SetLanePolicy { lane, policy: *policy });
        }
    }
    for (key, backends) in &desired.sets {
        if !current.sets.get(key).is_some_and(|c| same_members(c, backends)) {
            ops.push(Op::ReplaceSet { key: *key, backends: backends.clone() });
        }
    }
    let live: BTreeSet<u32> = current.frontends.values().map(|s| s.svc_id).collect();
    let appearing: BTreeSet<u32> = desired
        .frontends
        .iter()
        .filter(|(key, service)| current.frontends.get(key) != Some(service))
        .map(|(_, service)| service.svc_id)
        .filter(|id| !live.contains(id))
        .collect();
    let leftover = |key: &&SetKey| appearing.contains(&key.svc_id) && !desired.sets.contains_key(key);
    for key in current.sets.keys().filter(leftover) {
        ops.push(Op::RemoveSet { key: *key });
    }
    for (key, service) in &desired.frontends {
        let previous = current.frontends.get(key).copied();
        if previous != Some(*service) {
            ops.push(Op::UpsertFrontend { key: *key, service: *service, previous });
        }
    }
    for (&cgroup_id, entry) in &desired.pods {
        if current.pods.get(&cgroup_id) != Some(entry) {
            ops.push(Op::RegisterPod { cgroup_id, entry: *entry });
        }
    }
    if !prune {
        return ops;
    }
    for &cgroup_id in current.pods.keys().filter(|id| !desired.pods.contains_key(id)) {
        ops.push(Op::UnregisterPod { cgroup_id });
    }
    for (key, previous) in current.frontends.iter().filter(|(k, _)| !desired.frontends.contains_key(k)) {
        ops.push(Op::RemoveFrontend { key: *key, previous: *previous });
    }
    for key in current.sets.keys().filter(|k| !desired.sets.contains_key(k) && !leftover(k)) {
        ops.push(Op::RemoveSet { key: *key });
    }
    for &lane in current.lanes.keys().filter(|l| !desired.lanes.contains_key(l)) {
        ops.push(Op::RemoveLanePolicy { lane });
    }
    ops
}

/// Whether two backend lists hold the same backends, in any order.
fn same_members(a: &[Backend], b: &[Backend]) -> bool {
    if a == b {
        return true;
    }
    let set = |v: &[Backend]| v.iter().copied().collect::<BTreeSet<_>>();
    set(a) == set(b)
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
            Op::RegisterPod { cgroup_id, entry } => {
                // `register_pod` takes the cgroup as discovered; only its id and level reach the
                // map (the path is for error messages), and both are in the op.
                let cgroup = CgroupRef {
                    path: PathBuf::from(format!("<cgroup id {cgroup_id}>")),
                    id: *cgroup_id,
                    level: entry.level,
                };
                self.register_pod(&cgroup, entry.lane)
            }
            Op::UnregisterPod { cgroup_id } => self.unregister_pod(*cgroup_id),
            Op::RemoveFrontend { key, .. } => self.remove_frontend(key),
            Op::RemoveSet { key } => self.remove_backend_set(key.svc_id, key.lane),
            Op::RemoveLanePolicy { lane } => self.remove_lane_policy(*lane),
        }
    }
}

/// The in-memory model of the maps, with the same validation and capacities as [`Tables`], so
/// tests see the errors the kernel maps would give.
impl DatapathWriter for DatapathState {
    fn apply(&mut self, op: &Op) -> Result<(), Error> {
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
                self.lanes.insert(*lane, *policy);
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
                self.sets.insert(*key, backends.clone());
            }
            Op::UpsertFrontend { key, service, .. } => {
                if !self.frontends.contains_key(key) && self.frontends.len() >= MAX_FRONTENDS as usize {
                    return Err(full(MAP_FRONTENDS, MAX_FRONTENDS));
                }
                self.frontends.insert(*key, *service);
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
                self.pods.insert(*cgroup_id, *entry);
            }
            Op::UnregisterPod { cgroup_id } => {
                self.pods.remove(cgroup_id);
            }
            Op::RemoveFrontend { key, .. } => {
                self.frontends.remove(key);
            }
            Op::RemoveSet { key } => {
                self.sets.remove(key);
            }
            Op::RemoveLanePolicy { lane } => {
                self.lanes.remove(lane);
            }
        }
        Ok(())
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
