//! The datapath's maps and the accounting helpers around them. Names and capacities come from
//! `tagger-common`, so userspace opens exactly these pins.

use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray},
};
use tagger_common::{
    AffinityEntry, AffinityKey, BPF_F_NO_PREALLOC, Backend, BackendSet, DatapathConfig, EdgeKey, FrontendKey,
    InboundKey, LaneMark, LaneName, LanePolicy, LaneTables, Lease, MAX_AFFINITY, MAX_BACKEND_SETS,
    MAX_BACKEND_SLOTS, MAX_CONNS, MAX_EDGES, MAX_FRONTENDS, MAX_INBOUND, MAX_LANE_MARKS, MAX_LANES,
    MAX_POD_ADDRS, MAX_PODS, MAX_REVNAT, MAX_ROUTES, MAX_SVC_STATS, MAX_WARM, OUTCOME_SLOTS, Outcome,
    PodAddr, PodEntry, PodMeta, RevNatKey, RevNatValue, RouteKey, SHADOW_OFFSET, STAT_F_SHADOW, Service,
    ServiceMeta, SetKey, SlotKey, SockRecord, StatKey, SvcAffinity, SvcShaping, WarmEntry, WarmKey,
};

#[map(name = "TAGGER_PODS_V1")]
pub static PODS: HashMap<u64, PodEntry> = HashMap::with_max_entries(MAX_PODS, BPF_F_NO_PREALLOC);

#[map(name = "TAGGER_SVC_V1")]
pub static FRONTENDS: HashMap<FrontendKey, Service> =
    HashMap::with_max_entries(MAX_FRONTENDS, BPF_F_NO_PREALLOC);

#[map(name = "TAGGER_SETS_V1")]
pub static BACKEND_SETS: HashMap<SetKey, BackendSet> =
    HashMap::with_max_entries(MAX_BACKEND_SETS, BPF_F_NO_PREALLOC);

#[map(name = "TAGGER_SLOTS_V1")]
pub static BACKEND_SLOTS: HashMap<SlotKey, Backend> =
    HashMap::with_max_entries(MAX_BACKEND_SLOTS, BPF_F_NO_PREALLOC);

#[map(name = "TAGGER_LANES_V1")]
pub static LANES: HashMap<u32, LanePolicy> = HashMap::with_max_entries(MAX_LANES, BPF_F_NO_PREALLOC);

#[map(name = "TAGGER_RNAT_V1")]
pub static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::with_max_entries(MAX_REVNAT, 0);

/// Per-socket steering record (BTF-defined: socket storage maps need BTF key and value types).
#[btf_map(name = "TAGGER_SOCK_V1")]
pub static SOCKS: SkStorage<SockRecord> = SkStorage::new();

#[map(name = "TAGGER_CONN_V1")]
pub static CONNS: LruHashMap<u64, SockRecord> = LruHashMap::with_max_entries(MAX_CONNS, 0);

#[map(name = "TAGGER_CNT_V2")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(OUTCOME_SLOTS, 0);

#[map(name = "TAGGER_SSTAT_V1")]
pub static SVC_STATS: LruPerCpuHashMap<StatKey, u64> = LruPerCpuHashMap::with_max_entries(MAX_SVC_STATS, 0);

#[map(name = "TAGGER_CFG_V1")]
pub static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

/// The datapath lease (see `tagger_common::lease`): renewed by the agent, read by the steering
/// hooks. A plain array: its one value is a few `u64`s the agent replaces whole.
#[map(name = "TAGGER_LEASE_V1")]
pub static LEASE: Array<Lease> = Array::with_max_entries(1, 0);

#[map(name = "TAGGER_SHAPE_V1")]
pub static SHAPING: HashMap<u32, SvcShaping> = HashMap::with_max_entries(MAX_FRONTENDS, BPF_F_NO_PREALLOC);

#[map(name = "TAGGER_ROUTE_V1")]
pub static ROUTES: HashMap<RouteKey, LanePolicy> = HashMap::with_max_entries(MAX_ROUTES, BPF_F_NO_PREALLOC);

#[map(name = "TAGGER_WARM_V1")]
pub static WARM: HashMap<WarmKey, WarmEntry> = HashMap::with_max_entries(MAX_WARM, BPF_F_NO_PREALLOC);

/// Each caller's remembered backend per (Service, lane), for `sessionAffinity: ClientIP`.
#[map(name = "TAGGER_AFF_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> = LruHashMap::with_max_entries(MAX_AFFINITY, 0);

/// The affinity timeout of each frontend with `SVC_F_AFFINITY`.
#[map(name = "TAGGER_AFFC_V1")]
pub static AFFINITY_CFG: HashMap<u32, SvcAffinity> =
    HashMap::with_max_entries(MAX_FRONTENDS, BPF_F_NO_PREALLOC);

/// Local pods by address: read by the TC marking program and the passive side of `conn_track`.
#[map(name = "TAGGER_PADDR_V1")]
pub static POD_ADDRS: HashMap<[u32; 4], PodAddr> =
    HashMap::with_max_entries(MAX_POD_ADDRS, BPF_F_NO_PREALLOC);

/// Inbound connections per (local pod address, caller lane, pod lane, kind). An LRU (which
/// is always preallocated): the least recently counted rows make room for new ones, so a flood
/// of distinct keys can never stop the counting.
#[map(name = "TAGGER_INB_V2")]
pub static INBOUND: LruPerCpuHashMap<InboundKey, u64> = LruPerCpuHashMap::with_max_entries(MAX_INBOUND, 0);

/// New connections per (calling pod, Service, caller lane, backend lane, outcome): the call
/// edges the coverage report follows a lane along. An LRU, like `INBOUND`.
#[map(name = "TAGGER_EDGE_V1")]
pub static EDGES: LruPerCpuHashMap<EdgeKey, u64> = LruPerCpuHashMap::with_max_entries(MAX_EDGES, 0);

/// Each lane's mark bits under `--mark-mask`, for the TC marking program.
#[map(name = "TAGGER_LMARK_V1")]
pub static LANE_MARKS: HashMap<u32, LaneMark> = HashMap::with_max_entries(MAX_LANE_MARKS, BPF_F_NO_PREALLOC);

// Metadata for operators: written by the agent, read by the CLI. They live in the object so
// that they are created, pinned and versioned with the rest. The programs read only whether a
// lane id has a name (`LANE_NAMES`): the set of known lanes, for the inbound counts.
#[map(name = "TAGGER_PMETA_V1")]
pub static POD_META: HashMap<u64, PodMeta> = HashMap::with_max_entries(MAX_PODS, BPF_F_NO_PREALLOC);

#[map(name = "TAGGER_SMETA_V1")]
pub static SERVICE_META: HashMap<u32, ServiceMeta> =
    HashMap::with_max_entries(MAX_FRONTENDS, BPF_F_NO_PREALLOC);

#[map(name = "TAGGER_LNAME_V1")]
pub static LANE_NAMES: HashMap<u32, LaneName> = HashMap::with_max_entries(MAX_LANES, BPF_F_NO_PREALLOC);

/// [`LaneTables`] over the live maps.
pub struct Tables;

impl LaneTables for Tables {
    #[inline(always)]
    fn backend_set(&self, svc_id: u32, lane: u32) -> Option<BackendSet> {
        // SAFETY: BACKEND_SETS is BPF_F_NO_PREALLOC, so the element is not reused under us; the
        // value is copied out at once.
        unsafe { BACKEND_SETS.get(&SetKey { svc_id, lane }) }.copied()
    }

    #[inline(always)]
    fn lane_policy(&self, lane: u32) -> Option<LanePolicy> {
        // SAFETY: as above, LANES is BPF_F_NO_PREALLOC.
        unsafe { LANES.get(&lane) }.copied()
    }

    #[inline(always)]
    fn route(&self, svc_id: u32, caller_lane: u32) -> Option<LanePolicy> {
        // SAFETY: as above, ROUTES is BPF_F_NO_PREALLOC.
        unsafe { ROUTES.get(&RouteKey { svc_id, caller_lane }) }.copied()
    }

    #[inline(always)]
    fn shaping(&self, svc_id: u32) -> Option<SvcShaping> {
        // SAFETY: as above, SHAPING is BPF_F_NO_PREALLOC.
        unsafe { SHAPING.get(&svc_id) }.copied()
    }

    #[inline(always)]
    fn slot(&self, svc_id: u32, lane: u32, generation: u32, slot: u32) -> Option<Backend> {
        // SAFETY: as above, BACKEND_SLOTS is BPF_F_NO_PREALLOC.
        unsafe { BACKEND_SLOTS.get(&SlotKey { svc_id, lane, generation, slot }) }.copied()
    }
}

/// Counts one outcome in the global per-CPU counters.
#[inline(always)]
pub fn count(outcome: Outcome) {
    if let Some(c) = COUNTERS.get_ptr_mut(outcome as u32) {
        // SAFETY: per-CPU slot of this CPU; programs do not migrate while running, so no other
        // writer touches it concurrently.
        unsafe { *c += 1 };
    }
}

/// Counts one shadow decision (computed, not applied) globally and per Service.
#[inline(always)]
pub fn count_shadow(svc_id: u32, caller_lane: u32, backend_lane: u32, outcome: Outcome) {
    if let Some(c) = COUNTERS.get_ptr_mut(SHADOW_OFFSET + outcome as u32) {
        // SAFETY: per-CPU slot of this CPU, as in `count`.
        unsafe { *c += 1 };
    }
    count_row(StatKey { svc_id, caller_lane, backend_lane, outcome: outcome as u32 | STAT_F_SHADOW });
}

/// Counts one decision for (Service, caller lane, backend lane, outcome).
#[inline(always)]
pub fn count_service(svc_id: u32, caller_lane: u32, backend_lane: u32, outcome: Outcome) {
    count_row(StatKey { svc_id, caller_lane, backend_lane, outcome: outcome as u32 });
}

/// Counts one call edge of a registered pod (`caller` 0, an unregistered caller, is not
/// counted: an edge names its caller).
#[inline(always)]
pub fn count_edge(caller: u64, svc_id: u32, caller_lane: u32, backend_lane: u32, outcome: Outcome) {
    if caller == 0 {
        return;
    }
    let key = EdgeKey { caller, svc_id, caller_lane, backend_lane, outcome: outcome as u32 };
    if let Some(c) = EDGES.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU, as in `count`.
        unsafe { *c += 1 };
    } else {
        // BPF_NOEXIST, as in `count_row`.
        let _ = EDGES.insert(&key, &1, 1);
    }
}

#[inline(always)]
fn count_row(key: StatKey) {
    if let Some(c) = SVC_STATS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU, as in `count`.
        unsafe { *c += 1 };
    } else {
        // BPF_NOEXIST: if another CPU inserted the row first, this CPU's first hit is lost;
        // an acceptable undercount of one for a statistics row.
        let _ = SVC_STATS.insert(&key, &1, 1);
    }
}

/// Inserts a reverse translation entry, unless the table holds that very entry already: an
/// unconnected UDP socket sends to the same Service again and again and lands on the same few
/// backends, and an LRU update (a node taken off the LRU lists, a bucket lock, a node put back)
/// costs several times the lookup (about 350 ns against 80 ns per `sendmsg` in
/// docs/BENCHMARKS.md's hook-cost window). The lookup marks the entry referenced, which keeps it
/// from eviction as the update used to.
#[inline(always)]
pub fn insert_revnat(key: &RevNatKey, value: &RevNatValue) -> Result<(), i32> {
    // SAFETY: REVNAT is an LRU hash, whose elements can be recycled by a concurrent update:
    // the value is copied out at once, and a torn copy only compares unequal (one update more).
    if let Some(held) = unsafe { REVNAT.get(key) }.copied()
        && same_revnat(&held, value)
    {
        return Ok(());
    }
    REVNAT.insert(key, value, 0)
}

/// Field-wise equality (a derived `==` on arrays may become a `memcmp` call, which BPF lacks).
#[inline(always)]
fn same_revnat(a: &RevNatValue, b: &RevNatValue) -> bool {
    a.addr[0] == b.addr[0]
        && a.addr[1] == b.addr[1]
        && a.addr[2] == b.addr[2]
        && a.addr[3] == b.addr[3]
        && a.port == b.port
        && a.svc_id == b.svc_id
}

/// The socket storage map as the helpers' `map` argument.
#[inline(always)]
pub fn socks_ptr() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&SOCKS).cast_mut().cast()
}
