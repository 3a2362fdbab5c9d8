//! Typed reads and writes of the pinned maps. Every write names the map and key on failure.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap};
use tagger_common::{
    AffinityEntry, AffinityKey, BASE_LANE, Backend, BackendSet, DatapathConfig, FrontendKey, InboundKey,
    LaneName, LanePolicy, LaneTables, Lease, MAP_AFFINITY, MAP_AFFINITY_CFG, MAP_BACKEND_SETS,
    MAP_BACKEND_SLOTS, MAP_CONFIG, MAP_CONNS, MAP_COUNTERS, MAP_FRONTENDS, MAP_INBOUND, MAP_LANE_NAMES,
    MAP_LANES, MAP_LEASE, MAP_POD_ADDRS, MAP_POD_META, MAP_PODS, MAP_REVNAT, MAP_ROUTES, MAP_SERVICE_META,
    MAP_SHAPING, MAP_SVC_STATS, MAP_WARM, MAX_BACKEND_SETS, MAX_BACKENDS, MAX_CGROUP_LEVEL, MAX_FRONTENDS,
    MAX_LANES, MAX_PODS, MAX_ROUTES, MAX_WARM, Outcome, PodAddr, PodEntry, PodMeta, RevNatKey, RevNatValue,
    RouteKey, SHADOW_OFFSET, Service, ServiceMeta, SetKey, SlotKey, SockRecord, StatKey, SvcAffinity,
    SvcShaping, WarmEntry, WarmKey, field_str, name_field,
};

use super::PinLayout;
use crate::{Error, Result};

/// The datapath's maps, opened from their pins.
pub struct Tables {
    pods: HashMap<MapData, u64, PodEntry>,
    frontends: HashMap<MapData, FrontendKey, Service>,
    sets: HashMap<MapData, SetKey, BackendSet>,
    slots: HashMap<MapData, SlotKey, Backend>,
    lanes: HashMap<MapData, u32, LanePolicy>,
    revnat: HashMap<MapData, RevNatKey, RevNatValue>,
    counters: PerCpuArray<MapData, u64>,
    svc_stats: PerCpuHashMap<MapData, StatKey, u64>,
    config: Array<MapData, DatapathConfig>,
    lease: Array<MapData, Lease>,
    pod_meta: HashMap<MapData, u64, PodMeta>,
    service_meta: HashMap<MapData, u32, ServiceMeta>,
    lane_names: HashMap<MapData, u32, LaneName>,
    shaping: HashMap<MapData, u32, SvcShaping>,
    routes: HashMap<MapData, RouteKey, LanePolicy>,
    warm: HashMap<MapData, WarmKey, WarmEntry>,
    affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    affinity_cfg: HashMap<MapData, u32, SvcAffinity>,
    conns: HashMap<MapData, u64, SockRecord>,
    /// Local pods by address (written by `inbound.rs`).
    pub(super) pod_addrs: HashMap<MapData, [u32; 4], PodAddr>,
    /// Inbound connection counts (read by `inbound.rs`).
    pub(super) inbound: PerCpuHashMap<MapData, InboundKey, u64>,
    /// Outbound call edges of the local pods (read by `inbound.rs`).
    pub(super) edges: PerCpuHashMap<MapData, tagger_common::EdgeKey, u64>,
    /// Each lane's mark bits (written by `inbound.rs`'s lane-mark methods).
    pub(super) lane_marks: HashMap<MapData, u32, tagger_common::LaneMark>,
    /// Generations replaced but not deleted yet (see [`SLOT_GRACE`]), oldest first.
    retired: VecDeque<Retired>,
}

/// How long a replaced generation's slots stay in the map after the switch. A program that
/// read the set entry just before the switch reads its slots a few hundred nanoseconds later,
/// unless its CPU is stalled in between (a hypervisor preempting a vCPU mid-program: seen for
/// milliseconds under qemu TCG); deleting the slots at once made such a reader miss and fail
/// open. A replaced generation is deleted once this much time has passed, at the next write of
/// any set or [`Tables::reap_retired`]; at once when the slots map is full.
pub const SLOT_GRACE: Duration = Duration::from_millis(250);

/// A replaced generation awaiting deletion.
#[derive(Clone, Copy, Debug)]
struct Retired {
    at: Instant,
    svc_id: u32,
    lane: u32,
    generation: u32,
    count: u32,
}

/// The slot order of a set's new members `new` given its current slots `old`: a member that
/// stays keeps its slot when that slot still exists; the other slots take the new members and
/// then the members whose slot is gone (past the new count), in `new`'s order. Only a set that
/// shrinks moves anyone, and at most as many as it lost.
#[must_use]
pub fn stable_slots(old: &[Backend], new: &[Backend]) -> Vec<Backend> {
    let wanted: std::collections::HashSet<&Backend> = new.iter().collect();
    let mut out: Vec<Option<Backend>> = vec![None; new.len()];
    let mut kept = std::collections::HashSet::new();
    for (slot, b) in out.iter_mut().zip(old) {
        if wanted.contains(b) && kept.insert(*b) {
            *slot = Some(*b);
        }
    }
    let mut rest = new.iter().filter(|b| !kept.contains(*b));
    out.into_iter()
        .map(|slot| slot.or_else(|| rest.next().copied()))
        .collect::<Option<Vec<_>>>()
        .unwrap_or_else(|| new.to_vec())
}

/// How the maps are opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read and write (the agent).
    ReadWrite,
    /// Read only: the file descriptors are opened with `BPF_F_RDONLY`, so the kernel refuses
    /// every write through them (the CLI).
    ReadOnly,
}

impl fmt::Debug for Tables {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tables").finish_non_exhaustive()
    }
}

/// Totals of the global outcome counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Count per outcome.
    pub by_outcome: BTreeMap<Outcome, u64>,
    /// Count per outcome of shadow decisions (computed, not applied).
    pub shadow: BTreeMap<Outcome, u64>,
}

impl CounterSnapshot {
    /// The count of one outcome.
    #[must_use]
    pub fn get(&self, outcome: Outcome) -> u64 {
        self.by_outcome.get(&outcome).copied().unwrap_or(0)
    }

    /// The count of one outcome's shadow decisions.
    #[must_use]
    pub fn shadow(&self, outcome: Outcome) -> u64 {
        self.shadow.get(&outcome).copied().unwrap_or(0)
    }
}

/// One row of per-Service statistics, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceStat {
    /// The row's key.
    pub key: StatKey,
    /// Decisions counted.
    pub count: u64,
}

fn open_map(layout: &PinLayout, name: &'static str, access: Access) -> Result<Map> {
    let path = layout.map(name);
    let open_err = |e| Error::OpenMap { path: path.clone(), source: Box::new(e) };
    let data = match access {
        Access::ReadWrite => MapData::from_pin(&path).map_err(open_err)?,
        Access::ReadOnly => {
            let fd = crate::sys::obj_get(&path, crate::sys::BPF_F_RDONLY).map_err(|e| Error::io(&path, e))?;
            MapData::from_fd(fd).map_err(open_err)?
        }
    };
    Map::from_map_data(data).map_err(|e| Error::OpenMap { path, source: Box::new(e) })
}

macro_rules! open_typed {
    ($layout:expr, $name:expr, $access:expr) => {{
        let map = open_map($layout, $name, $access)?;
        map.try_into().map_err(|e| Error::OpenMap { path: $layout.map($name), source: Box::new(e) })?
    }};
}

pub(super) fn map_err(
    map: &'static str,
    op: &'static str,
    key: impl fmt::Debug,
) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { map, op, key: format!("{key:?}"), source: Box::new(source) }
}

/// Whether a map error is "not found" (a delete or lookup of an absent key).
pub(super) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Whether a map error is "the map is full".
fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
}

pub(super) fn ignore_not_found(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(e) if is_not_found(&e) => Ok(()),
        other => other,
    }
}

fn get_opt<V>(r: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Tables {
    /// Opens every map from its pin.
    pub fn open(layout: &PinLayout, access: Access) -> Result<Self> {
        Ok(Self {
            pods: open_typed!(layout, MAP_PODS, access),
            frontends: open_typed!(layout, MAP_FRONTENDS, access),
            sets: open_typed!(layout, MAP_BACKEND_SETS, access),
            slots: open_typed!(layout, MAP_BACKEND_SLOTS, access),
            lanes: open_typed!(layout, MAP_LANES, access),
            revnat: open_typed!(layout, MAP_REVNAT, access),
            counters: open_typed!(layout, MAP_COUNTERS, access),
            svc_stats: open_typed!(layout, MAP_SVC_STATS, access),
            config: open_typed!(layout, MAP_CONFIG, access),
            lease: open_typed!(layout, MAP_LEASE, access),
            pod_meta: open_typed!(layout, MAP_POD_META, access),
            service_meta: open_typed!(layout, MAP_SERVICE_META, access),
            lane_names: open_typed!(layout, MAP_LANE_NAMES, access),
            shaping: open_typed!(layout, MAP_SHAPING, access),
            routes: open_typed!(layout, MAP_ROUTES, access),
            warm: open_typed!(layout, MAP_WARM, access),
            affinity: open_typed!(layout, MAP_AFFINITY, access),
            affinity_cfg: open_typed!(layout, MAP_AFFINITY_CFG, access),
            conns: open_typed!(layout, MAP_CONNS, access),
            pod_addrs: open_typed!(layout, MAP_POD_ADDRS, access),
            inbound: open_typed!(layout, MAP_INBOUND, access),
            edges: open_typed!(layout, tagger_common::MAP_EDGES, access),
            lane_marks: open_typed!(layout, tagger_common::MAP_LANE_MARKS, access),
            retired: VecDeque::new(),
        })
    }

    // ---- metadata for operators ---------------------------------------------------------------

    /// Publishes a pod's namespace and name.
    pub fn set_pod_meta(&mut self, cgroup_id: u64, namespace: &str, name: &str) -> Result<()> {
        let meta = PodMeta { namespace: name_field(namespace), name: name_field(name) };
        self.pod_meta.insert(cgroup_id, meta, 0).map_err(map_err(MAP_POD_META, "insert", cgroup_id))
    }

    /// Removes a pod's names.
    pub fn remove_pod_meta(&mut self, cgroup_id: u64) -> Result<()> {
        ignore_not_found(self.pod_meta.remove(&cgroup_id)).map_err(map_err(MAP_POD_META, "remove", cgroup_id))
    }

    /// Published pod names: cgroup id → (namespace, name).
    pub fn pod_meta(&self) -> Result<BTreeMap<u64, (String, String)>> {
        self.pod_meta
            .iter()
            .map(|r| {
                r.map(|(k, m)| (k, (field_str(&m.namespace).to_owned(), field_str(&m.name).to_owned())))
                    .map_err(map_err(MAP_POD_META, "iterate", ()))
            })
            .collect()
    }

    /// Publishes a frontend's Service names.
    pub fn set_service_meta(
        &mut self,
        svc_id: u32,
        namespace: &str,
        name: &str,
        port_name: &str,
    ) -> Result<()> {
        let meta = ServiceMeta {
            namespace: name_field(namespace),
            name: name_field(name),
            port_name: name_field(port_name),
        };
        self.service_meta.insert(svc_id, meta, 0).map_err(map_err(MAP_SERVICE_META, "insert", svc_id))
    }

    /// Removes a frontend's names.
    pub fn remove_service_meta(&mut self, svc_id: u32) -> Result<()> {
        ignore_not_found(self.service_meta.remove(&svc_id)).map_err(map_err(
            MAP_SERVICE_META,
            "remove",
            svc_id,
        ))
    }

    /// Published Service names: svc_id → (namespace, name, port name).
    pub fn service_meta(&self) -> Result<BTreeMap<u32, (String, String, String)>> {
        self.service_meta
            .iter()
            .map(|r| {
                r.map(|(k, m)| {
                    (
                        k,
                        (
                            field_str(&m.namespace).to_owned(),
                            field_str(&m.name).to_owned(),
                            field_str(&m.port_name).to_owned(),
                        ),
                    )
                })
                .map_err(map_err(MAP_SERVICE_META, "iterate", ()))
            })
            .collect()
    }

    /// Publishes a lane's name.
    pub fn set_lane_name(&mut self, lane: u32, name: &str) -> Result<()> {
        self.lane_names.insert(lane, LaneName { name: name_field(name) }, 0).map_err(map_err(
            MAP_LANE_NAMES,
            "insert",
            lane,
        ))
    }

    /// Published lane names.
    pub fn lane_names(&self) -> Result<BTreeMap<u32, String>> {
        self.lane_names
            .iter()
            .map(|r| {
                r.map(|(k, n)| (k, field_str(&n.name).to_owned())).map_err(map_err(
                    MAP_LANE_NAMES,
                    "iterate",
                    (),
                ))
            })
            .collect()
    }

    /// Entries and capacity of every map, for `tagger status` (per-CPU and array maps report
    /// their fixed size).
    pub fn fill(&self) -> Vec<(&'static str, usize, u32)> {
        vec![
            (MAP_PODS, self.pods.keys().count(), tagger_common::MAX_PODS),
            (MAP_FRONTENDS, self.frontends.keys().count(), MAX_FRONTENDS),
            (MAP_BACKEND_SETS, self.sets.keys().count(), MAX_BACKEND_SETS),
            (MAP_BACKEND_SLOTS, self.slots.keys().count(), tagger_common::MAX_BACKEND_SLOTS),
            (MAP_LANES, self.lanes.keys().count(), MAX_LANES),
            (MAP_REVNAT, self.revnat.keys().count(), tagger_common::MAX_REVNAT),
            (MAP_SVC_STATS, self.svc_stats.keys().count(), tagger_common::MAX_SVC_STATS),
            (MAP_POD_META, self.pod_meta.keys().count(), tagger_common::MAX_PODS),
            (MAP_SERVICE_META, self.service_meta.keys().count(), MAX_FRONTENDS),
            (MAP_LANE_NAMES, self.lane_names.keys().count(), MAX_LANES),
            (MAP_SHAPING, self.shaping.keys().count(), MAX_FRONTENDS),
            (MAP_ROUTES, self.routes.keys().count(), MAX_ROUTES),
            (MAP_WARM, self.warm.keys().count(), MAX_WARM),
            (MAP_AFFINITY, self.affinity.keys().count(), tagger_common::MAX_AFFINITY),
            (MAP_AFFINITY_CFG, self.affinity_cfg.keys().count(), MAX_FRONTENDS),
            (MAP_CONNS, self.conns.keys().count(), tagger_common::MAX_CONNS),
            (MAP_POD_ADDRS, self.pod_addrs.keys().count(), tagger_common::MAX_POD_ADDRS),
            (MAP_INBOUND, self.inbound.keys().count(), tagger_common::MAX_INBOUND),
            (tagger_common::MAP_LANE_MARKS, self.lane_marks.keys().count(), tagger_common::MAX_LANE_MARKS),
            (tagger_common::MAP_EDGES, self.edges.keys().count(), tagger_common::MAX_EDGES),
        ]
    }

    // ---- pods -------------------------------------------------------------------------------

    /// Registers a pod cgroup (by id) in a lane at its level (or moves it to another lane):
    /// exactly the map's key and value, as the reconciler's op carries them.
    pub fn register_pod(&mut self, cgroup_id: u64, entry: PodEntry) -> Result<()> {
        if entry.level == 0 || entry.level > MAX_CGROUP_LEVEL {
            return Err(Error::Invalid {
                what: "pod cgroup",
                reason: format!(
                    "cgroup {cgroup_id} is at level {}; pod cgroups must be below the root and at most \
                     {MAX_CGROUP_LEVEL} deep",
                    entry.level
                ),
            });
        }
        // Widen the search range first, so the datapath never misses a registered pod.
        let mut cfg = self.config()?;
        if cfg.pod_level_max == 0 {
            cfg.pod_level_min = entry.level;
            cfg.pod_level_max = entry.level;
        } else {
            cfg.pod_level_min = cfg.pod_level_min.min(entry.level);
            cfg.pod_level_max = cfg.pod_level_max.max(entry.level);
        }
        self.set_config(cfg)?;
        self.pods.insert(cgroup_id, entry, 0).map_err(|e| {
            if is_full(&e) {
                Error::MapFull {
                    map: MAP_PODS,
                    wanted: u64::from(MAX_PODS) + 1,
                    capacity: u64::from(MAX_PODS),
                }
            } else {
                map_err(MAP_PODS, "insert", cgroup_id)(e)
            }
        })
    }

    /// Forgets a pod cgroup; its processes become base callers.
    pub fn unregister_pod(&mut self, cgroup_id: u64) -> Result<()> {
        ignore_not_found(self.pods.remove(&cgroup_id)).map_err(map_err(MAP_PODS, "remove", cgroup_id))?;
        let pods = self.pods()?;
        let mut cfg = self.config()?;
        cfg.pod_level_min = pods.values().map(|p| p.level).min().unwrap_or(0);
        cfg.pod_level_max = pods.values().map(|p| p.level).max().unwrap_or(0);
        self.set_config(cfg)
    }

    /// Every registered pod cgroup.
    pub fn pods(&self) -> Result<BTreeMap<u64, PodEntry>> {
        self.pods.iter().map(|r| r.map_err(map_err(MAP_PODS, "iterate", ()))).collect()
    }

    /// The datapath configuration.
    pub fn config(&self) -> Result<DatapathConfig> {
        self.config.get(&0, 0).map_err(map_err(MAP_CONFIG, "get", 0))
    }

    fn set_config(&mut self, cfg: DatapathConfig) -> Result<()> {
        self.config.set(0, cfg, 0).map_err(map_err(MAP_CONFIG, "set", 0))
    }

    /// The datapath lease (see `tagger_common::lease`).
    pub fn lease(&self) -> Result<Lease> {
        self.lease.get(&0, 0).map_err(map_err(MAP_LEASE, "get", 0))
    }

    /// Replaces the datapath lease (one array update: the programs see the old value or the new
    /// one).
    pub fn set_lease(&mut self, lease: Lease) -> Result<()> {
        self.lease.set(0, lease, 0).map_err(map_err(MAP_LEASE, "set", 0))
    }

    // ---- frontends --------------------------------------------------------------------------

    /// Adds or updates a Service frontend.
    pub fn upsert_frontend(&mut self, key: &FrontendKey, svc: Service) -> Result<()> {
        self.frontends.insert(key, svc, 0).map_err(|e| {
            if is_full(&e) {
                Error::MapFull {
                    map: MAP_FRONTENDS,
                    wanted: u64::from(MAX_FRONTENDS) + 1,
                    capacity: u64::from(MAX_FRONTENDS),
                }
            } else {
                map_err(MAP_FRONTENDS, "insert", key)(e)
            }
        })
    }

    /// Removes a Service frontend (its backend sets stay until removed).
    pub fn remove_frontend(&mut self, key: &FrontendKey) -> Result<()> {
        ignore_not_found(self.frontends.remove(key)).map_err(map_err(MAP_FRONTENDS, "remove", key))
    }

    /// One frontend.
    pub fn frontend(&self, key: &FrontendKey) -> Result<Option<Service>> {
        get_opt(self.frontends.get(key, 0)).map_err(map_err(MAP_FRONTENDS, "get", key))
    }

    /// Every frontend.
    pub fn frontends(&self) -> Result<BTreeMap<FrontendKey, Service>> {
        self.frontends.iter().map(|r| r.map_err(map_err(MAP_FRONTENDS, "iterate", ()))).collect()
    }

    // ---- backend sets -----------------------------------------------------------------------

    /// Replaces the backend set of (Service, lane) atomically: the new generation's slots are
    /// written first, then the set entry is switched to it in one update, and the old
    /// generation's slots are removed after [`SLOT_GRACE`]. A concurrent connect sees the old
    /// set or the new one.
    /// On error nothing visible changed: slots already written for the new generation are
    /// removed again and the old set stays live.
    ///
    /// A backend that stays keeps its slot ([`stable_slots`]): the datapath finds a caller's
    /// remembered backend by the slot it had (session affinity, `find_member`).
    pub fn replace_backends(&mut self, svc_id: u32, lane: u32, backends: &[Backend]) -> Result<()> {
        let before = match self.backend_set(svc_id, lane)? {
            Some(set) => self.slot_members(svc_id, lane, set).unwrap_or_default(),
            None => Vec::new(),
        };
        let placed = stable_slots(&before, backends);
        let backends = placed.as_slice();
        let set_key = SetKey { svc_id, lane };
        let count =
            u32::try_from(backends.len()).ok().filter(|&n| n <= MAX_BACKENDS).ok_or(Error::MapFull {
                map: MAP_BACKEND_SLOTS,
                wanted: backends.len() as u64,
                capacity: u64::from(MAX_BACKENDS),
            })?;
        self.reap_retired(false);
        let old = self.backend_set(svc_id, lane)?;
        // A set re-created while an earlier one is in its grace period must not reuse (and
        // later lose to the reaper) one of its generations.
        let generation = old.map_or_else(
            || {
                let held = self.retired.iter().filter(|r| r.svc_id == svc_id && r.lane == lane);
                held.map(|r| r.generation.wrapping_add(1)).max().unwrap_or(1)
            },
            |s| s.generation.wrapping_add(1),
        );
        for (slot, backend) in (0..count).zip(backends) {
            let key = SlotKey { svc_id, lane, generation, slot };
            let mut inserted = self.slots.insert(key, backend, 0);
            // Full: the generations in their grace period give their room back first.
            if matches!(&inserted, Err(e) if is_full(e)) && self.reap_retired(true) > 0 {
                inserted = self.slots.insert(key, backend, 0);
            }
            if let Err(e) = inserted {
                self.remove_slots(svc_id, lane, generation, slot);
                return Err(if is_full(&e) {
                    Error::MapFull {
                        map: MAP_BACKEND_SLOTS,
                        wanted: u64::from(count),
                        capacity: u64::from(tagger_common::MAX_BACKEND_SLOTS),
                    }
                } else {
                    map_err(MAP_BACKEND_SLOTS, "insert", key)(e)
                });
            }
        }
        let new = BackendSet { count, generation };
        if let Err(e) = self.sets.insert(set_key, new, 0) {
            self.remove_slots(svc_id, lane, generation, count);
            return Err(if is_full(&e) {
                Error::MapFull {
                    map: MAP_BACKEND_SETS,
                    wanted: u64::from(MAX_BACKEND_SETS) + 1,
                    capacity: u64::from(MAX_BACKEND_SETS),
                }
            } else {
                map_err(MAP_BACKEND_SETS, "insert", set_key)(e)
            });
        }
        if let Some(old) = old {
            self.retire(svc_id, lane, old);
        }
        Ok(())
    }

    /// Removes the backend set of (Service, lane); its slots follow after [`SLOT_GRACE`].
    pub fn remove_backend_set(&mut self, svc_id: u32, lane: u32) -> Result<()> {
        let key = SetKey { svc_id, lane };
        let Some(old) = self.backend_set(svc_id, lane)? else {
            return Ok(());
        };
        ignore_not_found(self.sets.remove(&key)).map_err(map_err(MAP_BACKEND_SETS, "remove", key))?;
        self.retire(svc_id, lane, old);
        Ok(())
    }

    fn retire(&mut self, svc_id: u32, lane: u32, old: BackendSet) {
        let (generation, count) = (old.generation, old.count);
        self.retired.push_back(Retired { at: Instant::now(), svc_id, lane, generation, count });
    }

    /// Deletes the slots of replaced generations whose grace period is over (every one with
    /// `all`); returns how many generations it deleted. The agent calls it on every pass.
    pub fn reap_retired(&mut self, all: bool) -> usize {
        let mut reaped = 0;
        while let Some(r) = self.retired.front().copied() {
            if !all && r.at.elapsed() < SLOT_GRACE {
                break;
            }
            self.retired.pop_front();
            self.remove_slots(r.svc_id, r.lane, r.generation, r.count);
            reaped += 1;
        }
        reaped
    }

    /// Deletes slots that belong to no live generation: left by a process that stopped during
    /// their grace period (or an interrupted write). Skips the generations this process is
    /// still holding in their grace period. Returns how many slots it deleted.
    pub fn remove_stray_slots(&mut self) -> Result<usize> {
        let live = self.backend_sets()?;
        let held: std::collections::HashSet<(u32, u32, u32)> =
            self.retired.iter().map(|r| (r.svc_id, r.lane, r.generation)).collect();
        let stray: Vec<SlotKey> = self
            .slots
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| {
                let set = live.get(&SetKey { svc_id: k.svc_id, lane: k.lane });
                let live_slot = set.is_some_and(|s| s.generation == k.generation && k.slot < s.count);
                !live_slot && !held.contains(&(k.svc_id, k.lane, k.generation))
            })
            .collect();
        for key in &stray {
            ignore_not_found(self.slots.remove(key)).map_err(map_err(MAP_BACKEND_SLOTS, "remove", key))?;
        }
        Ok(stray.len())
    }

    /// Best-effort removal of slots `0..count` of a generation (absent slots are fine).
    fn remove_slots(&mut self, svc_id: u32, lane: u32, generation: u32, count: u32) {
        for slot in 0..count {
            let key = SlotKey { svc_id, lane, generation, slot };
            if let Err(e) = ignore_not_found(self.slots.remove(&key)) {
                log::warn!("map {MAP_BACKEND_SLOTS}: removing {key:?}: {e}");
            }
        }
    }

    /// The live set of (Service, lane).
    pub fn backend_set(&self, svc_id: u32, lane: u32) -> Result<Option<BackendSet>> {
        let key = SetKey { svc_id, lane };
        get_opt(self.sets.get(&key, 0)).map_err(map_err(MAP_BACKEND_SETS, "get", key))
    }

    /// Every live set.
    pub fn backend_sets(&self) -> Result<BTreeMap<SetKey, BackendSet>> {
        self.sets.iter().map(|r| r.map_err(map_err(MAP_BACKEND_SETS, "iterate", ()))).collect()
    }

    /// The members of the live set of (Service, lane), sorted (`Backend`'s order, not the
    /// slots' order: the same set always lists the same way).
    pub fn backends(&self, svc_id: u32, lane: u32) -> Result<Vec<Backend>> {
        let Some(set) = self.backend_set(svc_id, lane)? else {
            return Ok(Vec::new());
        };
        let mut members = self.slot_members(svc_id, lane, set)?;
        members.sort_unstable();
        Ok(members)
    }

    /// The members of one generation, in slot order.
    fn slot_members(&self, svc_id: u32, lane: u32, set: BackendSet) -> Result<Vec<Backend>> {
        (0..set.count)
            .map(|slot| {
                let key = SlotKey { svc_id, lane, generation: set.generation, slot };
                self.slots.get(&key, 0).map_err(map_err(MAP_BACKEND_SLOTS, "get", key))
            })
            .collect()
    }

    /// Number of slot entries in the map (all generations).
    #[must_use]
    pub fn slot_entries(&self) -> usize {
        self.slots.keys().count()
    }

    // ---- lanes ------------------------------------------------------------------------------

    /// Sets a lane's policy.
    pub fn set_lane_policy(&mut self, lane: u32, policy: &LanePolicy) -> Result<()> {
        if lane == BASE_LANE {
            return Err(Error::Invalid {
                what: "lane policy",
                reason: "the base lane has no fallback policy".into(),
            });
        }
        if policy.chain_len as usize > tagger_common::MAX_CHAIN {
            return Err(Error::Invalid {
                what: "lane policy",
                reason: format!("chain of {} lanes; at most {}", policy.chain_len, tagger_common::MAX_CHAIN),
            });
        }
        self.lanes.insert(lane, policy, 0).map_err(|e| {
            if is_full(&e) {
                Error::MapFull {
                    map: MAP_LANES,
                    wanted: u64::from(MAX_LANES) + 1,
                    capacity: u64::from(MAX_LANES),
                }
            } else {
                map_err(MAP_LANES, "insert", lane)(e)
            }
        })
    }

    /// Removes a lane's policy (it falls back to base again).
    pub fn remove_lane_policy(&mut self, lane: u32) -> Result<()> {
        ignore_not_found(self.lanes.remove(&lane)).map_err(map_err(MAP_LANES, "remove", lane))
    }

    /// Every lane policy.
    pub fn lane_policies(&self) -> Result<BTreeMap<u32, LanePolicy>> {
        self.lanes.iter().map(|r| r.map_err(map_err(MAP_LANES, "iterate", ()))).collect()
    }

    // ---- shaping ----------------------------------------------------------------------------

    /// Sets the datapath's global flags (`CFG_F_*`), keeping the pod level range.
    pub fn set_config_flags(&mut self, flags: u32) -> Result<()> {
        let mut cfg = self.config()?;
        if cfg.flags == flags {
            return Ok(());
        }
        cfg.flags = flags;
        self.set_config(cfg)
    }

    /// Sets a Service frontend's shaping settings (the frontend needs `SVC_F_SHAPED`).
    pub fn set_shaping(&mut self, svc_id: u32, shaping: &SvcShaping) -> Result<()> {
        self.shaping.insert(svc_id, shaping, 0).map_err(map_err(MAP_SHAPING, "insert", svc_id))
    }

    /// Removes a Service frontend's shaping settings.
    pub fn remove_shaping(&mut self, svc_id: u32) -> Result<()> {
        ignore_not_found(self.shaping.remove(&svc_id)).map_err(map_err(MAP_SHAPING, "remove", svc_id))
    }

    /// Every shaping entry.
    pub fn shapings(&self) -> Result<BTreeMap<u32, SvcShaping>> {
        self.shaping.iter().map(|r| r.map_err(map_err(MAP_SHAPING, "iterate", ()))).collect()
    }

    /// Sets the routing rule chain of (Service, caller lane) (the frontend needs `SVC_F_ROUTED`).
    pub fn set_route(&mut self, key: RouteKey, chain: &LanePolicy) -> Result<()> {
        self.routes.insert(key, chain, 0).map_err(|e| {
            if is_full(&e) {
                Error::MapFull {
                    map: MAP_ROUTES,
                    wanted: u64::from(MAX_ROUTES) + 1,
                    capacity: u64::from(MAX_ROUTES),
                }
            } else {
                map_err(MAP_ROUTES, "insert", key)(e)
            }
        })
    }

    /// Removes a routing rule chain.
    pub fn remove_route(&mut self, key: RouteKey) -> Result<()> {
        ignore_not_found(self.routes.remove(&key)).map_err(map_err(MAP_ROUTES, "remove", key))
    }

    /// Every routing rule chain.
    pub fn routes(&self) -> Result<BTreeMap<RouteKey, LanePolicy>> {
        self.routes.iter().map(|r| r.map_err(map_err(MAP_ROUTES, "iterate", ()))).collect()
    }

    /// Marks a backend of a frontend as warming up.
    pub fn set_warm(&mut self, key: WarmKey, entry: &WarmEntry) -> Result<()> {
        self.warm.insert(key, entry, 0).map_err(|e| {
            if is_full(&e) {
                Error::MapFull {
                    map: MAP_WARM,
                    wanted: u64::from(MAX_WARM) + 1,
                    capacity: u64::from(MAX_WARM),
                }
            } else {
                map_err(MAP_WARM, "insert", key)(e)
            }
        })
    }

    /// Forgets a warming backend (it has full weight).
    pub fn remove_warm(&mut self, key: WarmKey) -> Result<()> {
        ignore_not_found(self.warm.remove(&key)).map_err(map_err(MAP_WARM, "remove", key))
    }

    /// One warming backend's entry.
    pub fn warm(&self, key: &WarmKey) -> Result<Option<WarmEntry>> {
        get_opt(self.warm.get(key, 0)).map_err(map_err(MAP_WARM, "get", key))
    }

    /// Every warming backend.
    pub fn warm_entries(&self) -> Result<BTreeMap<WarmKey, WarmEntry>> {
        self.warm.iter().map(|r| r.map_err(map_err(MAP_WARM, "iterate", ()))).collect()
    }

    // ---- session affinity ---------------------------------------------------------------------

    /// Sets a Service frontend's affinity timeout (the frontend needs `SVC_F_AFFINITY`).
    pub fn set_affinity(&mut self, svc_id: u32, affinity: &SvcAffinity) -> Result<()> {
        self.affinity_cfg.insert(svc_id, affinity, 0).map_err(map_err(MAP_AFFINITY_CFG, "insert", svc_id))
    }

    /// Removes a Service frontend's affinity timeout.
    pub fn remove_affinity(&mut self, svc_id: u32) -> Result<()> {
        ignore_not_found(self.affinity_cfg.remove(&svc_id)).map_err(map_err(
            MAP_AFFINITY_CFG,
            "remove",
            svc_id,
        ))
    }

    /// Every frontend's affinity timeout.
    pub fn affinities(&self) -> Result<BTreeMap<u32, SvcAffinity>> {
        self.affinity_cfg.iter().map(|r| r.map_err(map_err(MAP_AFFINITY_CFG, "iterate", ()))).collect()
    }

    /// A caller's remembered backend for (Service, lane), if the datapath holds one (expired or
    /// not).
    pub fn affinity_entry(&self, key: &AffinityKey) -> Result<Option<AffinityEntry>> {
        get_opt(self.affinity.get(key, 0)).map_err(map_err(MAP_AFFINITY, "get", key))
    }

    // ---- reverse translation and counters ---------------------------------------------------

    /// Number of reverse-translation entries.
    #[must_use]
    pub fn revnat_entries(&self) -> usize {
        self.revnat.keys().count()
    }

    /// The global outcome counters.
    pub fn counters(&self) -> Result<CounterSnapshot> {
        let mut snap = CounterSnapshot::default();
        for outcome in Outcome::ALL {
            let values =
                self.counters.get(&(outcome as u32), 0).map_err(map_err(MAP_COUNTERS, "get", outcome))?;
            snap.by_outcome.insert(outcome, values.iter().sum());
            let shadow = self.counters.get(&(SHADOW_OFFSET + outcome as u32), 0).map_err(map_err(
                MAP_COUNTERS,
                "get",
                outcome,
            ))?;
            snap.shadow.insert(outcome, shadow.iter().sum());
        }
        Ok(snap)
    }

    /// The steered connections currently tracked, by socket cookie.
    pub fn connections(&self) -> Result<Vec<(u64, SockRecord)>> {
        // An entry removed while iterating (a connection closing) ends the walk early at worst;
        // the gauges are a snapshot either way.
        Ok(self.conns.iter().filter_map(std::result::Result::ok).collect())
    }

    /// Forgets one tracked connection (after resetting it).
    pub fn forget_connection(&mut self, cookie: u64) -> Result<()> {
        ignore_not_found(self.conns.remove(&cookie)).map_err(map_err(MAP_CONNS, "remove", cookie))
    }

    /// Per-(Service, caller lane, backend lane, outcome) statistics.
    pub fn service_stats(&self) -> Result<Vec<ServiceStat>> {
        self.svc_stats
            .iter()
            .map(|r| {
                r.map(|(key, values)| ServiceStat { key, count: values.iter().sum() }).map_err(map_err(
                    MAP_SVC_STATS,
                    "iterate",
                    (),
                ))
            })
            .collect()
    }
}

/// A lane for people: base, its published name (`names`: [`Tables::lane_names`]), or its id in
/// hex when no name is published.
#[must_use]
pub fn lane_label(names: &BTreeMap<u32, String>, id: u32) -> String {
    if id == BASE_LANE {
        return "base".to_owned();
    }
    names.get(&id).cloned().unwrap_or_else(|| lane_hex(id))
}

/// A lane id as people see it when it has no name: `0x1c2d3e4f`.
#[must_use]
pub fn lane_hex(id: u32) -> String {
    format!("{id:#010x}")
}

/// Lane resolution over the pinned maps (the same code the kernel runs). Lookup errors read as
/// "absent", as in the datapath.
impl LaneTables for Tables {
    fn backend_set(&self, svc_id: u32, lane: u32) -> Option<BackendSet> {
        Tables::backend_set(self, svc_id, lane).ok().flatten()
    }

    fn lane_policy(&self, lane: u32) -> Option<LanePolicy> {
        get_opt(self.lanes.get(&lane, 0)).ok().flatten()
    }

    fn route(&self, svc_id: u32, caller_lane: u32) -> Option<LanePolicy> {
        get_opt(self.routes.get(&RouteKey { svc_id, caller_lane }, 0)).ok().flatten()
    }

    fn shaping(&self, svc_id: u32) -> Option<SvcShaping> {
        get_opt(self.shaping.get(&svc_id, 0)).ok().flatten()
    }

    fn slot(&self, svc_id: u32, lane: u32, generation: u32, slot: u32) -> Option<Backend> {
        get_opt(self.slots.get(&SlotKey { svc_id, lane, generation, slot }, 0)).ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::stable_slots;
    use crate::net::backend;

    fn be(i: u8) -> tagger_common::Backend {
        backend(std::net::SocketAddr::from(([10, 0, 0, i], 8080)))
    }

    fn set(ids: &[u8]) -> Vec<tagger_common::Backend> {
        ids.iter().map(|&i| be(i)).collect()
    }

    #[test]
    fn members_that_stay_keep_their_slots() {
        // New set: written as given.
        assert_eq!(stable_slots(&[], &set(&[3, 1, 2])), set(&[3, 1, 2]));
        // Grown: everyone stays put, the new ones take the new slots.
        assert_eq!(stable_slots(&set(&[1, 3, 5]), &set(&[1, 2, 3, 4, 5])), set(&[1, 3, 5, 2, 4]));
        // A member in the middle leaves: a new one takes its slot, nobody moves.
        assert_eq!(stable_slots(&set(&[1, 3, 5]), &set(&[1, 4, 5])), set(&[1, 4, 5]));
        // Shrunk: only the member whose slot is gone moves, into the freed slot.
        assert_eq!(stable_slots(&set(&[1, 3, 5, 7]), &set(&[1, 5, 7])), set(&[1, 7, 5]));
        // Same members in another order: unchanged.
        assert_eq!(stable_slots(&set(&[5, 1]), &set(&[1, 5])), set(&[5, 1]));
        // Every member of the new set exactly once.
        let mut got = stable_slots(&set(&[9, 8, 7, 6]), &set(&[1, 6, 9]));
        got.sort_unstable();
        assert_eq!(got, {
            let mut v = set(&[1, 6, 9]);
            v.sort_unstable();
            v
        });
    }
}
