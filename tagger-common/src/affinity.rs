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
//! Membership is checked against the live generation of the set, with no control-plane help:
//! the entry keeps the slot its backend had, so one slot lookup confirms it while the set is
//! unchanged; after a replacement (slots shift: sets are written sorted by [`slot_order`]) a
//! binary search over the slots finds it in at most [`AFFINITY_SEARCH_STEPS`] lookups, and the entry is
//! rewritten with the new slot. The backend's address is always compared, so a reused
//! generation number or a slot that now holds another backend can never send a connection to a
//! backend that left the set.

use core::cmp::Ordering;

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

/// Most backends in one (frontend, lane) set; the model caps every set at this.
pub const MAX_SET_BACKENDS: u32 = 1_024;
/// Slot lookups of the binary search for a remembered backend: `log2(MAX_SET_BACKENDS) + 1`
/// probes find any member of a sorted set of up to [`MAX_SET_BACKENDS`].
pub const AFFINITY_SEARCH_STEPS: u32 = 11;

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

/// A backend's position in the slot order: a 64-bit mix (splitmix64's finaliser) of its
/// address words and port. Sets are written sorted by (`backend_key`, `Backend`), so the
/// datapath's search compares one `u64` per probe: a branch-free mix and one comparison, which
/// keeps the verifier's path count low on older kernels (a field-by-field comparison of the
/// address made the connect program exceed 6.1's one-million-instruction budget).
#[inline(always)]
#[must_use]
pub const fn backend_key(b: &Backend) -> u64 {
    let hi = (b.addr[0] as u64) << 32 | b.addr[1] as u64;
    let lo = (b.addr[2] as u64) << 32 | b.addr[3] as u64;
    let z = mix64(hi ^ 0x9e37_79b9_7f4a_7c15);
    let z = mix64(z ^ lo);
    mix64(z ^ b.port as u64)
}

const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The order slots are written in (userspace sorts with it).
#[must_use]
pub fn slot_order(a: &Backend, b: &Backend) -> Ordering {
    backend_key(a).cmp(&backend_key(b)).then_with(|| a.cmp(b))
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

/// The slot of `backend` in the live generation `set` of (svc_id, lane), if it is a member:
/// the `hint` slot first, then a binary search over the slots in [`slot_order`] (at most
/// [`AFFINITY_SEARCH_STEPS`] lookups). `None`: not a member (or a slot vanished under a
/// concurrent replacement, or two members share a key: read as not a member, a fresh pick
/// follows).
#[inline(always)]
pub fn find_member<T: LaneTables>(
    tables: &T,
    svc_id: u32,
    lane: u32,
    set: &BackendSet,
    backend: &Backend,
    hint: u32,
) -> Option<u32> {
    let generation = set.generation;
    if hint < set.count
        && let Some(b) = tables.slot(svc_id, lane, generation, hint)
        && same_backend(&b, backend)
    {
        return Some(hint);
    }
    let key = backend_key(backend);
    let (mut lo, mut hi) = (0u32, set.count);
    // Verifier: at most AFFINITY_SEARCH_STEPS iterations, whatever the set's count.
    let mut steps = 0;
    while steps < AFFINITY_SEARCH_STEPS && lo < hi {
        steps += 1;
        let mid = lo + (hi - lo) / 2;
        let b = tables.slot(svc_id, lane, generation, mid)?;
        let k = backend_key(&b);
        match k.cmp(&key) {
            Ordering::Less => lo = mid + 1,
            Ordering::Greater => hi = mid,
            Ordering::Equal => return if same_backend(&b, backend) { Some(mid) } else { None },
        }
    }
    None
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

    fn write(t: &mut Slots, generation: u32, mut members: Vec<Backend>) -> BackendSet {
        members.sort_unstable_by(slot_order);
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
        assert_eq!(slot_order(&be(5), &be(5)), Ordering::Equal);
        assert_ne!(slot_order(&be(5), &other), Ordering::Equal);
    }

    #[test]
    fn the_search_finds_every_member_of_a_full_set_within_its_steps() {
        const { assert!(1u32 << (AFFINITY_SEARCH_STEPS - 1) >= MAX_SET_BACKENDS) };
        let mut t = Slots::default();
        let members: Vec<Backend> = (0..MAX_SET_BACKENDS).map(|i| be(i * 3)).collect();
        let set = write(&mut t, 4, members.clone());
        for b in &members {
            // A wrong hint: the search alone must find it.
            let slot = find_member(&t, 7, 0, &set, b, u32::MAX).expect("a member");
            assert_eq!(t.slots[&(4, slot)], *b);
        }
        // Non-members, between and beyond the members, are never found.
        for i in 0..MAX_SET_BACKENDS {
            assert_eq!(find_member(&t, 7, 0, &set, &be(i * 3 + 1), 0), None);
        }
        t.lookups.set(0);
        let at = t.slots[&(4, 100)];
        assert_eq!(find_member(&t, 7, 0, &set, &at, 100), Some(100));
        assert_eq!(t.lookups.get(), 1, "a right hint costs one lookup");
        let empty = BackendSet { count: 0, generation: 5 };
        assert_eq!(find_member(&t, 7, 0, &empty, &members[0], 0), None);
    }

    #[test]
    fn a_member_is_found_after_the_set_changes_and_a_gone_one_is_not() {
        let mut t = Slots::default();
        let set1 = write(&mut t, 1, (10..20).map(be).collect());
        let remembered = be(15);
        let hint = find_member(&t, 7, 0, &set1, &remembered, 0).unwrap();
        // Scaled up with lower addresses: every slot shifts; the hint misses, the search finds it.
        let set2 = write(&mut t, 2, (0..20).map(be).collect());
        let slot = find_member(&t, 7, 0, &set2, &remembered, hint).unwrap();
        assert_ne!(slot, hint);
        assert_eq!(t.slots[&(2, slot)], remembered);
        // The remembered backend left: not found, although its old slot holds another one.
        let set3 = write(&mut t, 3, (0..20).filter(|&i| i != 15).map(be).collect());
        assert_eq!(find_member(&t, 7, 0, &set3, &remembered, slot), None);
        // A generation number reused by a re-created set: the address decides.
        t.slots.clear();
        let reused = write(&mut t, 1, (30..40).map(be).collect());
        assert_eq!(find_member(&t, 7, 0, &reused, &remembered, hint), None);
        // A slot deleted under a concurrent replacement reads as not a member.
        let set = BackendSet { count: 10, generation: 9 };
        assert_eq!(find_member(&t, 7, 0, &set, &remembered, 0), None);
    }

    #[test]
    fn entries_expire_after_the_timeout_since_their_last_use() {
        let s = 1_000_000_000;
        assert!(!affinity_expired(5 * s, 10, 15 * s), "exactly the timeout: still live");
        assert!(affinity_expired(5 * s, 10, 15 * s + 1));
        assert!(!affinity_expired(20 * s, 10, 15 * s), "ahead of the clock: just used");
        assert!(!affinity_expired(0, AFFINITY_MAX_TIMEOUT_S, u64::from(AFFINITY_MAX_TIMEOUT_S) * s));
        let mut t = Slots::default();
        let set = write(&mut t, 1, (0..4).map(be).collect());
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
