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
//!
//! The ops of the maps written whole, key → value (lane policies, pods, shaping, routes,
//! warm-up, affinity), are generic: each map is a [`table::Table`], described once, and its
//! ops are [`Op::Table`]. The backend sets, the frontends and the global flags keep
//! dedicated ops (see [`table`] for why).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
};

use tagger_common::{
    Backend, FrontendKey, MAP_BACKEND_SETS, MAP_BACKEND_SLOTS, MAP_FRONTENDS, MAX_BACKEND_SETS, MAX_BACKENDS,
    MAX_FRONTENDS, Service, SetKey,
};

use self::table::{EachTable, Listed, Stage, TableOp, Write};
pub use crate::model::state::{DatapathState, DesiredRef, Scope};
use crate::{Error, Result, datapath::Tables, model::state::same_members, net::frontend_addr};

pub mod table;

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
        let mut state = Self { frontends: tables.frontends()?, sets, ..Self::default() };
        let mut read = Read { tables, state: &mut state, result: Ok(()) };
        table::each_table(&mut read);
        read.result?;
        state.config_flags = tables.config()?.flags;
        Ok(state)
    }
}

/// Reads every table's entries into a state (stops at the first error).
struct Read<'a> {
    tables: &'a Tables,
    state: &'a mut DatapathState,
    result: Result<()>,
}

impl EachTable for Read<'_> {
    fn table<T: Listed>(&mut self) {
        if self.result.is_ok() {
            match T::read(self.tables) {
                Ok(entries) => *T::entries_mut(self.state) = entries,
                Err(e) => self.result = Err(e),
            }
        }
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
    /// Sets the global flags.
    SetConfigFlags {
        /// `CFG_F_*` bits.
        flags: u32,
    },
    /// Writes or removes an entry of one of the simple tables (lane policies, pods, shaping,
    /// routes, warm-up, affinity: see [`table`]).
    Table(TableOp),
}

impl Op {
    /// Writes the entry of `key` in the table `T`.
    #[must_use]
    pub fn put<T: Listed>(key: T::Key, value: T::Value) -> Self {
        Op::Table(T::op(Write::Put(key, value)))
    }

    /// Removes the entry of `key` from the table `T`.
    #[must_use]
    pub fn remove<T: Listed>(key: T::Key) -> Self {
        Op::Table(T::op(Write::Remove(key)))
    }

    /// Whether the op removes something ([`plan`] emits none without `prune`, except the
    /// clearing of sets no frontend points at).
    #[must_use]
    pub fn is_removal(&self) -> bool {
        match self {
            Op::RemoveFrontend { .. } | Op::RemoveSet { .. } => true,
            Op::ReplaceSet { .. } | Op::UpsertFrontend { .. } | Op::SetConfigFlags { .. } => false,
            Op::Table(op) => op.any().is_removal(),
        }
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
            Op::RemoveFrontend { key, previous } => {
                write!(f, "remove frontend {} (svc {})", frontend(key), previous.svc_id)
            }
            Op::RemoveSet { key } => write!(f, "remove set svc {} lane {:#010x}", key.svc_id, key.lane),
            Op::SetConfigFlags { flags } => write!(f, "set datapath flags {flags:#x}"),
            Op::Table(op) => op.fmt(f),
        }
    }
}

/// The writes that turn `current` into `desired`, in a safe order:
///
/// 1. the global flags set,
/// 2. the tables of [`Stage::First`] written (lane policies),
/// 3. backend sets replaced,
/// 4. the tables of [`Stage::BeforeFrontends`] written (shaping, routes, warm-up, affinity),
/// 5. leftover sets cleared for the frontends about to appear,
/// 6. frontends upserted,
/// 7. the tables of [`Stage::Last`] written (pods registered),
///
/// then, only with `prune`:
///
/// 8. the tables of [`Stage::Last`] removed (pods unregistered),
/// 9. frontends removed,
/// 10. sets removed,
/// 11. the tables of [`Stage::First`] and [`Stage::BeforeFrontends`] removed (lane policies,
///     shaping, routes, warm-up, affinity).
///
/// Within a step, the tables come in the order of their list in [`table`].
///
/// Leftover sets: a frontend whose `svc_id` no current frontend uses (a new frontend, or one
/// whose id changed) must appear with exactly its desired sets. A set of that id left in the
/// maps — written for it by a pass whose frontend upsert then failed — would otherwise make it
/// serve stale backends in a lane that now has none (e.g. a pod since relabelled). Such a set is
/// invisible to every connection until the frontend appears, so it is removed in step 5 even
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
    let tables = |ops: &mut Vec<Op>, stages: &[Stage], removals: bool| {
        table::each_table(&mut PlanTables { current, desired, scope, stages, removals, ops });
    };
    if scope.config && current.config_flags != desired.config_flags {
        ops.push(Op::SetConfigFlags { flags: desired.config_flags });
    }
    tables(&mut ops, &[Stage::First], false);
    for key in &scope.sets {
        if let Some(backends) = desired.sets.get(key)
            && !current.sets.get(key).is_some_and(|c| same_members(c, backends))
        {
            ops.push(Op::ReplaceSet { key: *key, backends: backends.clone() });
        }
    }
    tables(&mut ops, &[Stage::BeforeFrontends], false);
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
    tables(&mut ops, &[Stage::Last], false);
    if !prune {
        return ops;
    }
    tables(&mut ops, &[Stage::Last], true);
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
    tables(&mut ops, &[Stage::First, Stage::BeforeFrontends], true);
    ops
}

/// Plans the tables of some stages, among the keys of a scope: their writes, or their
/// removals.
struct PlanTables<'p, 'd> {
    current: &'p DatapathState,
    desired: DesiredRef<'d>,
    scope: &'p Scope,
    stages: &'p [Stage],
    removals: bool,
    ops: &'p mut Vec<Op>,
}

impl EachTable for PlanTables<'_, '_> {
    fn table<T: Listed>(&mut self) {
        if !self.stages.contains(&T::STAGE) {
            return;
        }
        let (current, desired) = (T::entries(self.current), T::desired(self.desired));
        for &key in T::scope(self.scope) {
            if self.removals {
                if current.contains_key(&key) && !desired.contains_key(&key) {
                    self.ops.push(Op::remove::<T>(key));
                }
            } else if let Some(value) = desired.get(&key)
                && current.get(&key) != Some(value)
            {
                self.ops.push(Op::put::<T>(key, *value));
            }
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
            Op::ReplaceSet { key, backends } => self.replace_backends(key.svc_id, key.lane, backends),
            Op::UpsertFrontend { key, service, .. } => self.upsert_frontend(key, *service),
            Op::RemoveFrontend { key, .. } => self.remove_frontend(key),
            Op::RemoveSet { key } => self.remove_backend_set(key.svc_id, key.lane),
            Op::SetConfigFlags { flags } => self.set_config_flags(*flags),
            Op::Table(op) => op.any().write_to(self),
        }
    }
}

impl DatapathState {
    /// Applies an op, taking its contents (a set's backends are moved, not copied).
    pub fn apply_owned(&mut self, op: Op) -> Result<(), Error> {
        self.check(&op)?;
        match op {
            Op::ReplaceSet { key, backends } => {
                self.sets.insert(key, backends);
            }
            Op::UpsertFrontend { key, service, .. } => {
                self.frontends.insert(key, service);
            }
            Op::RemoveFrontend { key, .. } => {
                self.frontends.remove(&key);
            }
            Op::RemoveSet { key } => {
                self.sets.remove(&key);
            }
            Op::SetConfigFlags { flags } => self.config_flags = flags,
            Op::Table(op) => op.any().apply(self),
        }
        Ok(())
    }

    /// The error the maps would give for `op`, if any.
    fn check(&self, op: &Op) -> Result<(), Error> {
        match op {
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
            Op::Table(op) => op.any().check(self)?,
            Op::RemoveFrontend { .. } | Op::RemoveSet { .. } | Op::SetConfigFlags { .. } => {}
        }
        Ok(())
    }
}

/// The error of a map that has no room for one more entry.
fn full(map: &'static str, capacity: u32) -> Error {
    Error::MapFull { map, wanted: u64::from(capacity) + 1, capacity: u64::from(capacity) }
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
/// - a frontend whose shaping, routing rule or affinity entry failed to be written is not
///   upserted (its flags would point at entries that are not there: see
///   [`Table::needed_by_frontend`](table::Table::needed_by_frontend));
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
            Op::Table(TableOp::Pods(Write::Put(_, entry))) => unwritten_lanes.contains(&entry.lane),
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
            Op::Table(TableOp::Lanes(Write::Put(lane, _))) => {
                unwritten_lanes.insert(*lane);
            }
            // A frontend must not appear with its flags pointing at entries that are not there.
            Op::Table(op) => {
                if let Some(svc_id) = op.any().needed_by_frontend() {
                    unwritten_sets.insert(svc_id);
                }
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
