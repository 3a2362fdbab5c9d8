//! Stable `svc_id` allocation for Service frontends.
//!
//! A frontend's `svc_id` keys its backend sets and statistics in the datapath, so it must not
//! change while the frontend exists — not across reconciles and not across agent restarts
//! (hence [`FrontendIds::from_existing`], seeded from the pinned frontend map). Ids are handed
//! out in increasing order and not reused while the agent runs: an id whose backend sets may
//! still be in the maps (pruning is deferred until a complete relist) must not be given to a
//! different frontend, which would otherwise briefly see the old frontend's backends.

use std::collections::{BTreeMap, BTreeSet};

use tagger_common::FrontendKey;

/// Frontend key → `svc_id`. Never hands out 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendIds {
    ids: BTreeMap<FrontendKey, u32>,
    /// Ids assigned to a key or reserved: never handed out again while held.
    taken: BTreeSet<u32>,
    /// The next id to try.
    next: u32,
}

impl Default for FrontendIds {
    fn default() -> Self {
        Self::new()
    }
}

impl FrontendIds {
    /// No ids assigned; the first is 1.
    #[must_use]
    pub fn new() -> Self {
        Self { ids: BTreeMap::new(), taken: BTreeSet::new(), next: 1 }
    }

    /// Seeds the allocator with the ids already in the datapath, so they do not change after a
    /// restart. Entries with id 0 are ignored (0 is never valid). When two keys share an id
    /// (only a corrupted map could do that) the first keeps it and the other gets a new one on
    /// its next [`get_or_allocate`](Self::get_or_allocate), since sharing an id would share
    /// backend sets.
    pub fn from_existing(existing: impl IntoIterator<Item = (FrontendKey, u32)>) -> Self {
        let mut ids = Self::new();
        for (key, id) in existing {
            if id == 0 || ids.taken.contains(&id) || ids.ids.contains_key(&key) {
                continue;
            }
            ids.ids.insert(key, id);
            ids.taken.insert(id);
            ids.next = ids.next.max(id.wrapping_add(1)).max(1);
        }
        ids
    }

    /// Marks ids as in use without a key — e.g. the ids of backend sets left in the maps
    /// without a frontend (an interrupted removal) — so no new frontend inherits their sets.
    /// Reserved ids are held until [`retain`](Self::retain) drops them.
    pub fn reserve(&mut self, ids: impl IntoIterator<Item = u32>) {
        for id in ids.into_iter().filter(|&id| id != 0) {
            self.taken.insert(id);
            self.next = self.next.max(id.wrapping_add(1)).max(1);
        }
    }

    /// The id of a frontend, if it has one.
    #[must_use]
    pub fn get(&self, key: &FrontendKey) -> Option<u32> {
        self.ids.get(key).copied()
    }

    /// The id of a frontend, allocating a fresh one for a new frontend.
    pub fn get_or_allocate(&mut self, key: &FrontendKey) -> u32 {
        if let Some(&id) = self.ids.get(key) {
            return id;
        }
        // Increasing order; after 2^32 - 1 allocations it wraps and skips taken ids. There are
        // at most MAX_FRONTENDS keys plus the reserved ids, far fewer than 2^32, so the loop
        // ends.
        while self.next == 0 || self.taken.contains(&self.next) {
            self.next = self.next.wrapping_add(1);
        }
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        self.ids.insert(*key, id);
        self.taken.insert(id);
        id
    }

    /// Keeps the frontends for which `keep` returns true and releases the others' ids (they
    /// are still not reused before the counter wraps). Also releases every reserved id: call
    /// it once the removals it licenses have been applied (after a complete relist).
    pub fn retain(&mut self, mut keep: impl FnMut(&FrontendKey, u32) -> bool) {
        self.ids.retain(|key, id| keep(key, *id));
        self.taken = self.ids.values().copied().collect();
    }

    /// Releases one frontend's id (it is still not reused before the counter wraps): the
    /// incremental form of [`retain`](Self::retain), for a frontend no longer desired.
    pub fn release(&mut self, key: &FrontendKey) {
        if let Some(id) = self.ids.remove(key) {
            self.taken.remove(&id);
        }
    }

    /// Number of frontends with an id.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no frontend has an id.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Every (frontend, id), in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&FrontendKey, u32)> {
        self.ids.iter().map(|(k, id)| (k, *id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{Proto, frontend_key};

    fn key(i: u16) -> FrontendKey {
        frontend_key(std::net::SocketAddr::from(([10, 96, 0, 1], i)), Proto::Tcp)
    }

    #[test]
    fn allocates_from_one_and_is_stable() {
        let mut ids = FrontendIds::new();
        assert_eq!(ids.get_or_allocate(&key(1)), 1);
        assert_eq!(ids.get_or_allocate(&key(2)), 2);
        assert_eq!(ids.get_or_allocate(&key(1)), 1);
        assert_eq!(ids.get(&key(2)), Some(2));
        assert_eq!(ids.get(&key(3)), None);
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn released_ids_are_not_reused() {
        let mut ids = FrontendIds::new();
        ids.get_or_allocate(&key(1));
        ids.get_or_allocate(&key(2));
        ids.retain(|k, _| *k == key(2));
        assert_eq!(ids.get(&key(1)), None);
        assert_eq!(ids.get_or_allocate(&key(3)), 3);
        assert_eq!(ids.get_or_allocate(&key(1)), 4, "a returning frontend gets a fresh id");
        ids.release(&key(3));
        assert_eq!(ids.get(&key(3)), None);
        assert_eq!(ids.get_or_allocate(&key(3)), 5);
        ids.release(&key(9));
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn seeded_ids_survive_a_restart() {
        let mut ids = FrontendIds::from_existing([(key(1), 7), (key(2), 3), (key(3), 0), (key(4), 7)]);
        assert_eq!(ids.get(&key(1)), Some(7));
        assert_eq!(ids.get(&key(2)), Some(3));
        assert_eq!(ids.get(&key(3)), None, "id 0 is never valid");
        assert_eq!(ids.get(&key(4)), None, "a shared id stays with the first key");
        assert_eq!(ids.get_or_allocate(&key(4)), 8);
        assert_eq!(ids.get_or_allocate(&key(3)), 9);
    }

    #[test]
    fn reserved_ids_are_skipped() {
        let mut ids = FrontendIds::from_existing([(key(1), 2)]);
        ids.reserve([5, 0]);
        assert_eq!(ids.get_or_allocate(&key(2)), 6);
        ids.retain(|_, _| true);
        assert_eq!(ids.iter().collect::<Vec<_>>(), vec![(&key(1), 2), (&key(2), 6)]);
    }

    #[test]
    fn wraps_around_without_zero_or_taken_ids() {
        let mut ids = FrontendIds::from_existing([(key(1), u32::MAX), (key(2), 1)]);
        assert_eq!(ids.get_or_allocate(&key(3)), 2, "wraps past 0 and the taken 1");
        assert!(!ids.is_empty());
    }
}
