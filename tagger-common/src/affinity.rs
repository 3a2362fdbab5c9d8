//! Kubernetes `sessionAffinity: ClientIP` inside the lane: a caller's later connections to a
//! Service go to the backend its last one went to, while that backend is still in the set of
//! the lane the decision resolves to and the caller came back within the timeout (measured from
//! its last connection, as kube-proxy's `recent` match refreshes on each one).
//!
//! The caller is the calling pod: its registered pod cgroup id (what the caller-lane walk
//! returns), or for an unregistered task its own cgroup id. A cgroup connect hook runs before
//! the socket has a source address, so the pod is the only client identity there is.
//!
//! The decision order: lane resolution (rules, canary, own lane, fallback) first, then — for a
//! Service with [`SVC_F_AFFINITY`] — the remembered backend of (Service, resolved lane, caller)
//! if it is still a member of that set, else a fresh pick (warm-up weighted if the Service has
//! a warm-up), which becomes the remembered one. Affinity never changes the lane.
//!
//! Membership is checked against the live generation of the set, with no extra control-plane
//! state: the entry keeps the slot its backend had, and the agent keeps surviving backends in
//! their slots when it replaces a set, so one slot lookup confirms it. The backend's address is
//! always compared, so a reused generation number or a slot that now holds another backend can
//! never send a connection to a backend that left the set.

use crate::{Backend, BackendSet, LaneTables};

/// [`AffinityKey`] → [`AffinityEntry`] (LRU): each caller's remembered backend per Service
/// and lane. Read and written only for frontends with [`SVC_F_AFFINITY`].
pub const MAP_AFFINITY: &str = "TAGGER_AFF_V1";
/// svc_id (`u32`) → [`SvcAffinity`]: the timeout of each frontend with [`SVC_F_AFFINITY`].
pub const MAP_AFFINITY_CFG: &str = "TAGGER_AFFC_V1";

/// Capacity of [`MAP_AFFINITY`]: (Service, lane, caller pod) entries on one node. Beyond it the
/// least recently used are forgotten (that caller's next connection is a fresh pick).
pub const MAX_AFFINITY: u32 = 65_536;

/// `Service::flags`: `sessionAffinity: ClientIP`; the caller's remembered backend is looked
/// up in [`MAP_AFFINITY`], its timeout in [`MAP_AFFINITY_CFG`].
pub const SVC_F_AFFINITY: u32 = 1 << 3;

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours); also what
/// the datapath uses for a frontend with [`SVC_F_AFFINITY`] and no [`MAP_AFFINITY_CFG`] entry.
pub const AFFINITY_DEFAULT_TIMEOUT_S: u32 = 10_800;
/// The largest timeout Kubernetes accepts (one day).
pub const AFFINITY_MAX_TIMEOUT_S: u32 = 86_400;

/// A frontend's affinity settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcAffinity {
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`, seconds (1..=[`AFFINITY_MAX_TIMEOUT_S`]).
    pub timeout_s: u32,
    /// Zero.
    pub _pad: u32,
}

/// Whose affinity: (frontend, resolved lane, caller pod).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    /// `Service::svc_id`.
    pub svc_id: u32,
    /// Lane id of the set the backend was picked from.
    pub lane: u32,
    /// The caller's pod cgroup id (an unregistered caller: its own cgroup id).
    pub caller: u64,
}

/// A caller's remembered backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityEntry {
    /// The backend.
    pub backend: Backend,
    /// Its slot when last used (a hint: checked against the live generation).
    pub slot: u32,
    /// Last connection through this entry, kernel monotonic clock (`bpf_ktime_get_ns`),
    /// nanoseconds.
    pub last_ns: u64,
}

/// Nanoseconds per second.
const NS_PER_S: u64 = 1_000_000_000;

/// Whether an entry last used at `last_ns` is past `timeout_s` at `now_ns`. A last use ahead
/// of the clock counts as just used.
#[inline(always)]
#[must_use]
pub const fn affinity_expired(last_ns: u64, timeout_s: u32, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_ns) > timeout_s as u64 * NS_PER_S
}

/// The timeout of a frontend with [`SVC_F_AFFINITY`], given its [`MAP_AFFINITY_CFG`] entry.
#[inline(always)]
#[must_use]
pub fn affinity_timeout_s(cfg: Option<&SvcAffinity>) -> u32 {
    match cfg {
        Some(c) if c.timeout_s > 0 => c.timeout_s,
        _ => AFFINITY_DEFAULT_TIMEOUT_S,
    }
}

/// Whether two backends are the same address and port, without branches (a derived `==` on
/// arrays may become a `memcmp` call, which BPF lacks).
#[inline(always)]
#[must_use]
pub const fn same_backend(a: &Backend, b: &Backend) -> bool {
    ((a.addr[0] ^ b.addr[0])
        | (a.addr[1] ^ b.addr[1])
        | (a.addr[2] ^ b.addr[2])
        | (a.addr[3] ^ b.addr[3])
        | (a.port ^ b.port) as u32)
        == 0
}

/// The slot of `backend` in the live generation `set` of (svc_id, lane) when the remembered
/// `hint` slot still holds it: one lookup and a branch-free comparison. The agent keeps a
/// surviving backend in its slot across replacements (`stable_slots` in userspace), so this
/// finds every member except one moved into a freed slot when its set shrank. `None`: not
/// there (or the slot vanished under a concurrent replacement): a fresh pick follows.
#[inline(always)]
pub fn find_member<T: LaneTables>(
    tables: &T,
    svc_id: u32,
    lane: u32,
    set: &BackendSet,
    backend: &Backend,
    hint: u32,
) -> Option<u32> {
    if hint >= set.count {
        return None;
    }
    let b = tables.slot(svc_id, lane, set.generation, hint)?;
    if same_backend(&b, backend) { Some(hint) } else { None }
}

/// The remembered backend's slot when `entry` is live at `now_ns` and its backend is still in
/// `set` (see [`find_member`]); `None`: a fresh pick.
#[inline(always)]
pub fn sticky_slot<T: LaneTables>(
    tables: &T,
    key: &AffinityKey,
    set: &BackendSet,
    entry: &AffinityEntry,
    timeout_s: u32,
    now_ns: u64,
) -> Option<u32> {
    if affinity_expired(entry.last_ns, timeout_s, now_ns) {
        return None;
    }
    find_member(tables, key.svc_id, key.lane, set, &entry.backend, entry.slot)
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY (all impls below): `#[repr(C)]`, `Copy`, integers and integer arrays only, with
    // explicit padding fields, so every bit pattern is valid and no implicit padding exists.
    unsafe impl aya::Pod for super::SvcAffinity {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityEntry {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::mem::size_of;
    use std::{collections::BTreeMap, vec::Vec};

    use super::*;
    use crate::{LanePolicy, v4_mapped};

    #[derive(Default)]
    struct Slots {
        /// (generation, slot) → backend, for svc 7 lane 0.
        slots: BTreeMap<(u32, u32), Backend>,
        lookups: core::cell::Cell<u32>,
    }

    impl LaneTables for Slots {
        fn backend_set(&self, _svc_id: u32, _lane: u32) -> Option<BackendSet> {
            None
        }
        fn lane_policy(&self, _lane: u32) -> Option<LanePolicy> {
            None
        }
        fn slot(&self, svc_id: u32, lane: u32, generation: u32, slot: u32) -> Option<Backend> {
            assert_eq!((svc_id, lane), (7, 0));
            self.lookups.set(self.lookups.get() + 1);
            self.slots.get(&(generation, slot)).copied()
        }
    }

    fn be(i: u32) -> Backend {
        let [_, _, hi, lo] = i.to_be_bytes();
        Backend {
            addr: v4_mapped(u32::from_be_bytes([10, hi, lo, 1]).to_be()),
            port: 8080u16.to_be(),
            family: crate::FAMILY_V4,
            _pad: 0,
        }
    }

    fn write(t: &mut Slots, generation: u32, members: &[Backend]) -> BackendSet {
        for (i, b) in members.iter().enumerate() {
            t.slots.insert((generation, u32::try_from(i).unwrap()), *b);
        }
        BackendSet { count: u32::try_from(members.len()).unwrap(), generation }
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<SvcAffinity>(), 8);
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(size_of::<AffinityEntry>(), 32);
    }

    #[test]
    fn same_backend_compares_address_and_port() {
        let mut other = be(5);
        assert!(same_backend(&be(5), &other));
        other.port = 9090u16.to_be();
        assert!(!same_backend(&be(5), &other));
        assert!(!same_backend(&be(5), &be(6)));
    }

    #[test]
    fn a_member_is_found_in_its_slot_and_nothing_else_is() {
        let mut t = Slots::default();
        let set = write(&mut t, 1, &(10..20).map(be).collect::<Vec<_>>());
        t.lookups.set(0);
        assert_eq!(find_member(&t, 7, 0, &set, &be(13), 3), Some(3));
        assert_eq!(t.lookups.get(), 1, "one lookup");
        // Another backend in that slot (it left, or moved), or a slot past the set: not found.
        assert_eq!(find_member(&t, 7, 0, &set, &be(13), 4), None);
        assert_eq!(find_member(&t, 7, 0, &set, &be(13), 10), None);
        assert_eq!(find_member(&t, 7, 0, &set, &be(13), u32::MAX), None);
        // A generation number reused by a re-created set: the address decides.
        t.slots.clear();
        let reused = write(&mut t, 1, &(30..40).map(be).collect::<Vec<_>>());
        assert_eq!(find_member(&t, 7, 0, &reused, &be(13), 3), None);
        // A slot deleted under a concurrent replacement reads as not a member.
        let gone = BackendSet { count: 10, generation: 9 };
        assert_eq!(find_member(&t, 7, 0, &gone, &be(33), 3), None);
    }

    #[test]
    fn entries_expire_after_the_timeout_since_their_last_use() {
        let s = 1_000_000_000;
        assert!(!affinity_expired(5 * s, 10, 15 * s), "exactly the timeout: still live");
        assert!(affinity_expired(5 * s, 10, 15 * s + 1));
        assert!(!affinity_expired(20 * s, 10, 15 * s), "ahead of the clock: just used");
        assert!(!affinity_expired(0, AFFINITY_MAX_TIMEOUT_S, u64::from(AFFINITY_MAX_TIMEOUT_S) * s));
        let mut t = Slots::default();
        let set = write(&mut t, 1, &(0..4).map(be).collect::<Vec<_>>());
        let key = AffinityKey { svc_id: 7, lane: 0, caller: 42 };
        let entry = AffinityEntry { backend: be(2), slot: 2, last_ns: 5 * s };
        assert_eq!(sticky_slot(&t, &key, &set, &entry, 10, 14 * s), Some(2));
        assert_eq!(sticky_slot(&t, &key, &set, &entry, 10, 16 * s), None);
        assert_eq!(affinity_timeout_s(None), AFFINITY_DEFAULT_TIMEOUT_S);
        assert_eq!(
            affinity_timeout_s(Some(&SvcAffinity { timeout_s: 0, _pad: 0 })),
            AFFINITY_DEFAULT_TIMEOUT_S
        );
        assert_eq!(affinity_timeout_s(Some(&SvcAffinity { timeout_s: 2, _pad: 0 })), 2);
    }
}
