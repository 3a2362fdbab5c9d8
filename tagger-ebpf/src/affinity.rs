//! The datapath half of `sessionAffinity: ClientIP` (tagger-common's `affinity` holds the
//! layouts and the membership check): after the lane decision, a caller's remembered backend
//! in the resolved lane's set is reused while it is live and still a member; otherwise the
//! fresh pick becomes the remembered one. Runs only behind `SVC_F_AFFINITY`, so a Service
//! without affinity pays nothing.

use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use tagger_common::{
    AffinityEntry, AffinityKey, Backend, BackendSet, SVC_F_AFFINITY, Service, affinity_timeout_s, sticky_slot,
};

use crate::{
    maps::{AFFINITY, AFFINITY_CFG, Tables},
    shaping::Caller,
};

/// One connection of a caller to a Service with affinity.
pub struct Sticky {
    key: AffinityKey,
    now: u64,
}

impl Sticky {
    /// The connection's affinity entry key, for a Service with [`SVC_F_AFFINITY`] (`None`
    /// otherwise: nothing is looked up or written).
    #[inline(always)]
    pub fn of(svc: Service, caller: &Caller, lane: u32) -> Option<Self> {
        if svc.flags & SVC_F_AFFINITY == 0 {
            return None;
        }
        // SAFETY: the helper has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        Some(Self { key: AffinityKey { svc_id: svc.svc_id, lane, caller: caller.identity() }, now })
    }

    /// The remembered backend and its slot in `set`, when the entry is within its timeout and
    /// the backend is still a member of the set.
    #[inline(always)]
    pub fn remembered(&self, tables: &Tables, set: BackendSet) -> Option<(Backend, u32)> {
        // SAFETY: AFFINITY is an LRU hash, whose element may be recycled by a concurrent
        // update: the value is copied out at once, and whatever backend a torn copy names is
        // used only if the live set holds it (checked below), so it is always a member.
        let entry = unsafe { AFFINITY.get(&self.key) }.copied()?;
        // SAFETY: AFFINITY_CFG is BPF_F_NO_PREALLOC; the value is read at once.
        let timeout_s = affinity_timeout_s(unsafe { AFFINITY_CFG.get(&self.key.svc_id) });
        let slot = sticky_slot(tables, &self.key, &set, &entry, timeout_s, self.now)?;
        Some((entry.backend, slot))
    }

    /// Remembers the backend this connection goes to, and when (refreshing the timeout).
    #[inline(always)]
    pub fn remember(&self, backend: &Backend, slot: u32) {
        let entry = AffinityEntry { backend: *backend, slot, last_ns: self.now };
        // A failed insert (the LRU found no free element) only means the next connection is a
        // fresh pick: affinity is lost, never a connection.
        let _ = AFFINITY.insert(&self.key, &entry, 0);
    }
}
