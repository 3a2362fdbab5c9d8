//! The datapath maps whose entries the reconciler writes whole, one key to one value, each
//! described once as a [`Table`]: how an entry is checked, written, removed and logged, and
//! where its writes go in a plan. Their ops are [`TableOp`]s, a [`Write`] to one table of the
//! list below; planning, applying, checking and logging those is generic.
//!
//! Three parts of the datapath are not tables and keep dedicated handling in [`super`]:
//! - the backend sets: a `Vec` value written as a new generation of slots, compared by its
//!   members (`same_members`), and a leftover set is cleared before a frontend that would
//!   inherit it appears;
//! - the frontends: their ops carry the entry they replace, whose sets stay in use until the
//!   op succeeds ([`super::apply_plan`] and the [`super::Mirror`] read it);
//! - the global flags: one field of the config array, not a map.
//!
//! Adding a map of the simple kind touches: its line in `model::state`'s list of maps, its
//! `impl Table` here and its line in the list of tables below (docs/ARCHITECTURE.md, "Adding
//! a datapath map").

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use tagger_common::{
    BASE_LANE, LanePolicy, MAP_AFFINITY_CFG, MAP_LANES, MAP_PODS, MAP_ROUTES, MAP_SHAPING, MAP_WARM,
    MAX_CGROUP_LEVEL, MAX_CHAIN, MAX_FRONTENDS, MAX_LANES, MAX_PODS, MAX_ROUTES, MAX_WARM, PodEntry,
    RouteKey, SvcAffinity, SvcShaping, WarmEntry, WarmKey,
};

use crate::{
    Error, Result,
    datapath::Tables,
    model::state::{DatapathState, DesiredRef, Scope},
};

/// Where a table's writes go in the safe order of a plan (see [`super::plan_scoped`]). Within a
/// stage, the tables come in the order of the list below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Written first, before the backend sets; removed after the sets: what pods use (lane
    /// policies).
    First,
    /// Written after the backend sets, before the frontends; removed after the sets: what a
    /// frontend's flags point at.
    BeforeFrontends,
    /// Written last, after the frontends; removed first, before the frontends: what uses the
    /// rest (pods, which use lane policies).
    Last,
}

/// One datapath map that the reconciler writes whole entries to: key → value.
pub trait Table: Sized + 'static {
    /// The map's key.
    type Key: Copy + Ord + fmt::Debug;
    /// The map's value.
    type Value: Copy + Eq + fmt::Debug;
    /// The pinned map's name (`tagger_common::MAP_*`).
    const NAME: &'static str;
    /// The map's capacity (`tagger_common::MAX_*`).
    const CAPACITY: u32;
    /// Where its writes go in a plan.
    const STAGE: Stage;

    /// The error the map gives for this entry whatever it holds (an invalid value), if any.
    fn validate(_key: Self::Key, _value: &Self::Value) -> Result<()> {
        Ok(())
    }

    /// The `svc_id` of the frontend whose flags point at this entry: while a write of the
    /// entry has failed (or was skipped), that frontend is not upserted (see
    /// [`super::apply_plan`]). `None`: no frontend waits for it.
    fn needed_by_frontend(key: Self::Key) -> Option<u32>;

    /// Every entry of the pinned map.
    fn read(tables: &Tables) -> Result<BTreeMap<Self::Key, Self::Value>>;

    /// Writes an entry to the pinned map.
    fn put(tables: &mut Tables, key: Self::Key, value: &Self::Value) -> Result<()>;

    /// Removes an entry from the pinned map (an absent one is fine).
    fn remove(tables: &mut Tables, key: Self::Key) -> Result<()>;

    /// The log line of a write.
    fn fmt_put(f: &mut fmt::Formatter<'_>, key: Self::Key, value: &Self::Value) -> fmt::Result;

    /// The log line of a removal.
    fn fmt_remove(f: &mut fmt::Formatter<'_>, key: Self::Key) -> fmt::Result;
}

/// A table of the list below, with its entries in the model's states (the list names the
/// field of [`DatapathState`], [`DesiredRef`] and [`Scope`]) and its variant of [`TableOp`].
pub trait Listed: Table {
    /// Its entries in a state.
    fn entries(state: &DatapathState) -> &BTreeMap<Self::Key, Self::Value>;
    /// Its entries in a state, to change.
    fn entries_mut(state: &mut DatapathState) -> &mut BTreeMap<Self::Key, Self::Value>;
    /// Its desired entries.
    fn desired(desired: DesiredRef<'_>) -> &BTreeMap<Self::Key, Self::Value>;
    /// Its keys in a scope.
    fn scope(scope: &Scope) -> &BTreeSet<Self::Key>;
    /// The op of a write.
    fn op(write: Write<Self>) -> TableOp;
}

/// A write of one entry of the table `T`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write<T: Table> {
    /// Sets the entry of a key: adds it or changes it.
    Put(T::Key, T::Value),
    /// Removes the entry of a key.
    Remove(T::Key),
}

/// Something done once per table of the list, in its order (see [`each_table`]).
pub(super) trait EachTable {
    /// Does it for `T`.
    fn table<T: Listed>(&mut self);
}

/// Declares the tables, from one list of `Table => field`: [`TableOp`] (a variant per table),
/// each table's [`Listed`] and [`each_table`].
macro_rules! tables {
    ($($(#[doc = $doc:literal])* $table:ident => $field:ident,)*) => {
        /// A write to one of the tables.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum TableOp {
            $($(#[doc = $doc])* $table(Write<$table>),)*
        }

        impl TableOp {
            /// The write, whichever its table.
            pub(super) fn any(&self) -> &dyn AnyWrite {
                match self {
                    $(TableOp::$table(write) => write,)*
                }
            }
        }

        $(
            impl Listed for $table {
                fn entries(state: &DatapathState) -> &BTreeMap<Self::Key, Self::Value> {
                    &state.$field
                }

                fn entries_mut(state: &mut DatapathState) -> &mut BTreeMap<Self::Key, Self::Value> {
                    &mut state.$field
                }

                fn desired(desired: DesiredRef<'_>) -> &BTreeMap<Self::Key, Self::Value> {
                    desired.$field
                }

                fn scope(scope: &Scope) -> &BTreeSet<Self::Key> {
                    &scope.$field
                }

                fn op(write: Write<Self>) -> TableOp {
                    TableOp::$table(write)
                }
            }
        )*

        /// Calls `each` once per table, in the order of the list.
        pub(super) fn each_table(each: &mut impl EachTable) {
            $(each.table::<$table>();)*
        }
    };
}

tables! {
    /// A lane's policy.
    Lanes => lanes,
    /// A frontend's shaping settings.
    Shaping => shaping,
    /// A routing rule chain.
    Routes => routes,
    /// A warming backend.
    Warm => warm,
    /// A frontend's session affinity timeout.
    Affinity => affinity,
    /// A pod cgroup's lane.
    Pods => pods,
}

/// A [`Write`] to any table, its types out of sight: what the reconciler does with a
/// [`TableOp`].
pub(super) trait AnyWrite {
    /// Whether it removes the entry.
    fn is_removal(&self) -> bool;
    /// The error the map would give for it, given what `state` holds, if any.
    fn check(&self, state: &DatapathState) -> Result<()>;
    /// Applies it to `state` (after [`AnyWrite::check`]).
    fn apply(&self, state: &mut DatapathState);
    /// Applies it to the pinned maps.
    fn write_to(&self, tables: &mut Tables) -> Result<()>;
    /// The `svc_id` of the frontend that must not be upserted while this write has failed.
    fn needed_by_frontend(&self) -> Option<u32>;
    /// Its log line.
    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result;
    /// The entry it writes: the map's name and the key.
    #[cfg(test)]
    fn target(&self) -> String;
    /// Whether applying it to `state` changes anything.
    #[cfg(test)]
    fn changes(&self, state: &DatapathState) -> bool;
}

impl<T: Listed> AnyWrite for Write<T> {
    fn is_removal(&self) -> bool {
        matches!(self, Write::Remove(_))
    }

    fn check(&self, state: &DatapathState) -> Result<()> {
        if let Write::Put(key, value) = self {
            T::validate(*key, value)?;
            let entries = T::entries(state);
            if !entries.contains_key(key) && entries.len() >= T::CAPACITY as usize {
                return Err(super::full(T::NAME, T::CAPACITY));
            }
        }
        Ok(())
    }

    fn apply(&self, state: &mut DatapathState) {
        let entries = T::entries_mut(state);
        match self {
            Write::Put(key, value) => {
                entries.insert(*key, *value);
            }
            Write::Remove(key) => {
                entries.remove(key);
            }
        }
    }

    fn write_to(&self, tables: &mut Tables) -> Result<()> {
        match self {
            Write::Put(key, value) => T::put(tables, *key, value),
            Write::Remove(key) => T::remove(tables, *key),
        }
    }

    fn needed_by_frontend(&self) -> Option<u32> {
        match self {
            Write::Put(key, _) => T::needed_by_frontend(*key),
            Write::Remove(_) => None,
        }
    }

    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Write::Put(key, value) => T::fmt_put(f, *key, value),
            Write::Remove(key) => T::fmt_remove(f, *key),
        }
    }

    #[cfg(test)]
    fn target(&self) -> String {
        match self {
            Write::Put(key, _) | Write::Remove(key) => format!("{} {key:?}", T::NAME),
        }
    }

    #[cfg(test)]
    fn changes(&self, state: &DatapathState) -> bool {
        let entries = T::entries(state);
        match self {
            Write::Put(key, value) => entries.get(key) != Some(value),
            Write::Remove(key) => entries.contains_key(key),
        }
    }
}

/// A one-line description for logs.
impl fmt::Display for TableOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.any().describe(f)
    }
}

/// A chain's valid lanes, for logs.
fn chain(policy: &LanePolicy) -> &[u32] {
    &policy.chain[..(policy.chain_len as usize).min(MAX_CHAIN)]
}

/// The error for a chain longer than the maps hold, if it is.
fn check_chain(what: &'static str, policy: &LanePolicy) -> Result<()> {
    if policy.chain_len as usize > MAX_CHAIN {
        return Err(Error::Invalid {
            what,
            reason: format!("chain of {} lanes; at most {MAX_CHAIN}", policy.chain_len),
        });
    }
    Ok(())
}

// ---- the tables --------------------------------------------------------------------------------

/// Lane id → the lane's policy (`TAGGER_LANES_V1`). Pods use it: written first; its removal
/// makes the lane fall back to base again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lanes;

impl Table for Lanes {
    type Key = u32;
    type Value = LanePolicy;
    const NAME: &'static str = MAP_LANES;
    const CAPACITY: u32 = MAX_LANES;
    const STAGE: Stage = Stage::First;

    fn validate(lane: u32, policy: &LanePolicy) -> Result<()> {
        if lane == BASE_LANE {
            return Err(Error::Invalid {
                what: "lane policy",
                reason: "the base lane has no fallback policy".into(),
            });
        }
        check_chain("lane policy", policy)
    }

    fn needed_by_frontend(_: u32) -> Option<u32> {
        None
    }

    fn read(tables: &Tables) -> Result<BTreeMap<u32, LanePolicy>> {
        tables.lane_policies()
    }

    fn put(tables: &mut Tables, lane: u32, policy: &LanePolicy) -> Result<()> {
        tables.set_lane_policy(lane, policy)
    }

    fn remove(tables: &mut Tables, lane: u32) -> Result<()> {
        tables.remove_lane_policy(lane)
    }

    fn fmt_put(f: &mut fmt::Formatter<'_>, lane: u32, policy: &LanePolicy) -> fmt::Result {
        write!(f, "set lane {lane:#010x} policy (flags {:#x}, chain {:x?})", policy.flags, chain(policy))
    }

    fn fmt_remove(f: &mut fmt::Formatter<'_>, lane: u32) -> fmt::Result {
        write!(f, "remove lane {lane:#010x} policy")
    }
}

/// svc_id → the frontend's shaping settings (`TAGGER_SHAPE_V1`; the frontend needs
/// `SVC_F_SHAPED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shaping;

impl Table for Shaping {
    type Key = u32;
    type Value = SvcShaping;
    const NAME: &'static str = MAP_SHAPING;
    const CAPACITY: u32 = MAX_FRONTENDS;
    const STAGE: Stage = Stage::BeforeFrontends;

    fn needed_by_frontend(svc_id: u32) -> Option<u32> {
        Some(svc_id)
    }

    fn read(tables: &Tables) -> Result<BTreeMap<u32, SvcShaping>> {
        tables.shapings()
    }

    fn put(tables: &mut Tables, svc_id: u32, shaping: &SvcShaping) -> Result<()> {
        tables.set_shaping(svc_id, shaping)
    }

    fn remove(tables: &mut Tables, svc_id: u32) -> Result<()> {
        tables.remove_shaping(svc_id)
    }

    fn fmt_put(f: &mut fmt::Formatter<'_>, svc_id: u32, shaping: &SvcShaping) -> fmt::Result {
        write!(
            f,
            "set svc {svc_id} shaping (flags {:#x}, canary lane {:#010x} {} bp)",
            shaping.flags, shaping.canary_lane, shaping.canary_bp
        )
    }

    fn fmt_remove(f: &mut fmt::Formatter<'_>, svc_id: u32) -> fmt::Result {
        write!(f, "remove svc {svc_id} shaping")
    }
}

/// (svc_id, caller lane) → the routing rule chain (`TAGGER_ROUTE_V1`; the frontend needs
/// `SVC_F_ROUTED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routes;

impl Table for Routes {
    type Key = RouteKey;
    type Value = LanePolicy;
    const NAME: &'static str = MAP_ROUTES;
    const CAPACITY: u32 = MAX_ROUTES;
    const STAGE: Stage = Stage::BeforeFrontends;

    fn validate(_: RouteKey, chain: &LanePolicy) -> Result<()> {
        check_chain("routing rule", chain)
    }

    fn needed_by_frontend(key: RouteKey) -> Option<u32> {
        Some(key.svc_id)
    }

    fn read(tables: &Tables) -> Result<BTreeMap<RouteKey, LanePolicy>> {
        tables.routes()
    }

    fn put(tables: &mut Tables, key: RouteKey, chain: &LanePolicy) -> Result<()> {
        tables.set_route(key, chain)
    }

    fn remove(tables: &mut Tables, key: RouteKey) -> Result<()> {
        tables.remove_route(key)
    }

    fn fmt_put(f: &mut fmt::Formatter<'_>, key: RouteKey, rule: &LanePolicy) -> fmt::Result {
        write!(
            f,
            "set route svc {} from lane {:#010x} (flags {:#x}, chain {:x?})",
            key.svc_id,
            key.caller_lane,
            rule.flags,
            chain(rule)
        )
    }

    fn fmt_remove(f: &mut fmt::Formatter<'_>, key: RouteKey) -> fmt::Result {
        write!(f, "remove route svc {} from lane {:#010x}", key.svc_id, key.caller_lane)
    }
}

/// A backend of a frontend → its ready time and warm-up curve (`TAGGER_WARM_V1`). A backend
/// without its entry takes full weight: no frontend waits for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Warm;

impl Table for Warm {
    type Key = WarmKey;
    type Value = WarmEntry;
    const NAME: &'static str = MAP_WARM;
    const CAPACITY: u32 = MAX_WARM;
    const STAGE: Stage = Stage::BeforeFrontends;

    fn needed_by_frontend(_: WarmKey) -> Option<u32> {
        None
    }

    fn read(tables: &Tables) -> Result<BTreeMap<WarmKey, WarmEntry>> {
        tables.warm_entries()
    }

    fn put(tables: &mut Tables, key: WarmKey, entry: &WarmEntry) -> Result<()> {
        tables.set_warm(key, entry)
    }

    fn remove(tables: &mut Tables, key: WarmKey) -> Result<()> {
        tables.remove_warm(key)
    }

    fn fmt_put(f: &mut fmt::Formatter<'_>, key: WarmKey, entry: &WarmEntry) -> fmt::Result {
        write!(
            f,
            "set warm-up of svc {} backend {:?}:{} ({} ms)",
            key.svc_id,
            key.addr,
            u16::from_be(key.port),
            entry.warmup_ns / 1_000_000
        )
    }

    fn fmt_remove(f: &mut fmt::Formatter<'_>, key: WarmKey) -> fmt::Result {
        write!(f, "remove warm-up of svc {} backend {:?}", key.svc_id, key.addr)
    }
}

/// svc_id → the frontend's session affinity timeout (`TAGGER_AFFC_V1`; the frontend needs
/// `SVC_F_AFFINITY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Affinity;

impl Table for Affinity {
    type Key = u32;
    type Value = SvcAffinity;
    const NAME: &'static str = MAP_AFFINITY_CFG;
    const CAPACITY: u32 = MAX_FRONTENDS;
    const STAGE: Stage = Stage::BeforeFrontends;

    fn needed_by_frontend(svc_id: u32) -> Option<u32> {
        Some(svc_id)
    }

    fn read(tables: &Tables) -> Result<BTreeMap<u32, SvcAffinity>> {
        tables.affinities()
    }

    fn put(tables: &mut Tables, svc_id: u32, affinity: &SvcAffinity) -> Result<()> {
        tables.set_affinity(svc_id, affinity)
    }

    fn remove(tables: &mut Tables, svc_id: u32) -> Result<()> {
        tables.remove_affinity(svc_id)
    }

    fn fmt_put(f: &mut fmt::Formatter<'_>, svc_id: u32, affinity: &SvcAffinity) -> fmt::Result {
        write!(f, "set svc {svc_id} session affinity ({} s)", affinity.timeout_s)
    }

    fn fmt_remove(f: &mut fmt::Formatter<'_>, svc_id: u32) -> fmt::Result {
        write!(f, "remove svc {svc_id} session affinity")
    }
}

/// Pod cgroup id → the pod's lane and cgroup level (`TAGGER_PODS_V1`). A pod uses its lane's
/// policy: written last, removed first. Put registers the pod in a lane (or moves it), Remove
/// forgets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pods;

impl Table for Pods {
    type Key = u64;
    type Value = PodEntry;
    const NAME: &'static str = MAP_PODS;
    const CAPACITY: u32 = MAX_PODS;
    const STAGE: Stage = Stage::Last;

    fn validate(cgroup_id: u64, entry: &PodEntry) -> Result<()> {
        if entry.level == 0 || entry.level > MAX_CGROUP_LEVEL {
            return Err(Error::Invalid {
                what: "pod cgroup",
                reason: format!("cgroup {cgroup_id} is at level {}", entry.level),
            });
        }
        Ok(())
    }

    fn needed_by_frontend(_: u64) -> Option<u32> {
        None
    }

    fn read(tables: &Tables) -> Result<BTreeMap<u64, PodEntry>> {
        tables.pods()
    }

    fn put(tables: &mut Tables, cgroup_id: u64, entry: &PodEntry) -> Result<()> {
        tables.register_pod(cgroup_id, *entry)
    }

    fn remove(tables: &mut Tables, cgroup_id: u64) -> Result<()> {
        tables.unregister_pod(cgroup_id)
    }

    fn fmt_put(f: &mut fmt::Formatter<'_>, cgroup_id: u64, entry: &PodEntry) -> fmt::Result {
        write!(f, "register pod cgroup {cgroup_id} (level {}) in lane {:#010x}", entry.level, entry.lane)
    }

    fn fmt_remove(f: &mut fmt::Formatter<'_>, cgroup_id: u64) -> fmt::Result {
        write!(f, "unregister pod cgroup {cgroup_id}")
    }
}
