//! Which tracked connections are stale: pure decisions over a snapshot of the maps.

use std::collections::BTreeMap;

use tagger_common::{Backend, LANE_F_REHOME, SOCK_F_FELL_BACK, SockRecord};

/// Why a tracked connection is reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    /// Its backend no longer serves in the (Service, lane) it was chosen from: deleted, not
    /// ready and not serving, or moved to another lane. Reset at once: nothing answers there.
    BackendGone,
    /// It fell back from its caller's lane, which has `rehome: true` and ready backends again.
    /// Its backend is alive, so it is reset only when idle.
    Rehome,
}

impl Why {
    /// Whether a connection reset for this reason may only be reset while idle (its backend
    /// still serves: an in-flight request must not be aborted).
    #[must_use]
    pub fn only_when_idle(self) -> bool {
        self == Why::Rehome
    }
}

/// What the decision needs to know of the desired state.
pub trait View {
    /// The backends of (Service, lane) new connections go to (empty when there are none);
    /// `None` when they cannot be known (then nothing is decided for that set).
    fn members(&mut self, svc_id: u32, lane: u32) -> Option<Vec<Backend>>;
    /// Backends of (Service, lane) that still serve but get no new connections: terminating
    /// but serving, or left out by the Service's topology rules. Their connections are kept.
    fn held(&mut self, _svc_id: u32, _lane: u32) -> Vec<Backend> {
        Vec::new()
    }
    /// Flags of the lane's policy (0 without one).
    fn lane_flags(&mut self, lane: u32) -> u32;
}

/// The connections to reset and why, given the tracked ones. Sets and policies are looked up
/// once per (Service, lane) and per lane.
pub fn stale(conns: &[(u64, SockRecord)], view: &mut impl View) -> Vec<(u64, SockRecord, Why)> {
    let mut sets: BTreeMap<(u32, u32), Option<Vec<Backend>>> = BTreeMap::new();
    let mut held: BTreeMap<(u32, u32), Vec<Backend>> = BTreeMap::new();
    let mut flags: BTreeMap<u32, u32> = BTreeMap::new();
    let mut out = Vec::new();
    for &(cookie, rec) in conns {
        let members = sets
            .entry((rec.svc_id, rec.backend_lane))
            .or_insert_with(|| view.members(rec.svc_id, rec.backend_lane));
        let Some(members) = members else { continue };
        if !members.contains(&rec.backend)
            && !held
                .entry((rec.svc_id, rec.backend_lane))
                .or_insert_with(|| view.held(rec.svc_id, rec.backend_lane))
                .contains(&rec.backend)
        {
            out.push((cookie, rec, Why::BackendGone));
            continue;
        }
        if rec.flags & SOCK_F_FELL_BACK != 0 && rec.caller_lane != rec.backend_lane {
            let lane_flags =
                *flags.entry(rec.caller_lane).or_insert_with(|| view.lane_flags(rec.caller_lane));
            if lane_flags & LANE_F_REHOME != 0 {
                let own = sets
                    .entry((rec.svc_id, rec.caller_lane))
                    .or_insert_with(|| view.members(rec.svc_id, rec.caller_lane));
                if own.as_ref().is_some_and(|own| !own.is_empty()) {
                    out.push((cookie, rec, Why::Rehome));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        sets: BTreeMap<(u32, u32), Vec<Backend>>,
        held: BTreeMap<(u32, u32), Vec<Backend>>,
        flags: BTreeMap<u32, u32>,
    }

    impl View for Fake {
        fn members(&mut self, svc_id: u32, lane: u32) -> Option<Vec<Backend>> {
            Some(self.sets.get(&(svc_id, lane)).cloned().unwrap_or_default())
        }
        fn held(&mut self, svc_id: u32, lane: u32) -> Vec<Backend> {
            self.held.get(&(svc_id, lane)).cloned().unwrap_or_default()
        }
        fn lane_flags(&mut self, lane: u32) -> u32 {
            self.flags.get(&lane).copied().unwrap_or(0)
        }
    }

    fn b(n: u32) -> Backend {
        Backend { addr: [0, 0, 0, n], port: 80, family: 4, _pad: 0 }
    }

    fn rec(backend: Backend, caller: u32, lane: u32, fell_back: bool) -> SockRecord {
        SockRecord {
            backend,
            svc_id: 1,
            caller_lane: caller,
            backend_lane: lane,
            flags: if fell_back { SOCK_F_FELL_BACK } else { 0 },
            ..SockRecord::default()
        }
    }

    #[test]
    fn a_backend_missing_from_its_set_is_stale_others_are_not() {
        let mut v = Fake {
            sets: [((1, 0), vec![b(1)]), ((1, 7), vec![b(3)])].into(),
            held: BTreeMap::new(),
            flags: BTreeMap::new(),
        };
        let conns =
            [(10, rec(b(1), 0, 0, false)), (11, rec(b(2), 7, 7, false)), (12, rec(b(3), 7, 7, false))];
        let s = stale(&conns, &mut v);
        assert_eq!(s.iter().map(|(c, _, w)| (*c, *w)).collect::<Vec<_>>(), [(11, Why::BackendGone)]);
    }

    #[test]
    fn a_backend_that_still_serves_keeps_its_connections() {
        // b(2) is terminating but serving (or on another node of a Local Service): held.
        let mut v = Fake {
            sets: [((1, 7), vec![b(3)])].into(),
            held: [((1, 7), vec![b(2)])].into(),
            flags: BTreeMap::new(),
        };
        let conns = [(11, rec(b(2), 7, 7, false)), (12, rec(b(4), 7, 7, false))];
        let s = stale(&conns, &mut v);
        assert_eq!(s.iter().map(|(c, _, w)| (*c, *w)).collect::<Vec<_>>(), [(12, Why::BackendGone)]);
        // Held in another lane does not count: the connection's lane lost it.
        v.held = [((1, 0), vec![b(2)])].into();
        assert_eq!(stale(&conns, &mut v).len(), 2);
        assert!(Why::Rehome.only_when_idle() && !Why::BackendGone.only_when_idle());
    }

    #[test]
    fn rehome_only_for_fallen_back_connections_of_a_rehome_lane_with_backends() {
        let mut v = Fake {
            sets: [((1, 0), vec![b(1)]), ((1, 7), vec![b(3)])].into(),
            held: BTreeMap::new(),
            flags: [(7, LANE_F_REHOME)].into(),
        };
        let conns = [
            (20, rec(b(1), 7, 0, true)),  // fell back from 7, which is ready again: rehome
            (21, rec(b(1), 8, 0, true)),  // lane 8 has no rehome policy
            (22, rec(b(1), 0, 0, false)), // base caller
        ];
        let s = stale(&conns, &mut v);
        assert_eq!(s.iter().map(|(c, _, w)| (*c, *w)).collect::<Vec<_>>(), [(20, Why::Rehome)]);
        // Lane 7 empty: nothing to return to.
        v.sets.remove(&(1, 7));
        assert!(stale(&conns, &mut v).is_empty());
    }
}
