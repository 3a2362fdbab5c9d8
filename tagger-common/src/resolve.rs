//! Lane resolution: which lane's backend set serves a caller, following PRODUCT.md's datapath
//! semantics. The same code runs in the kernel (over BPF maps) and in userspace (`tagger
//! explain`, tests), through the [`LaneTables`] trait.

use crate::{BASE_LANE, BackendSet, LANE_F_STRICT, LanePolicy, MAX_CHAIN, SVC_F_STRICT, Service};

/// The two lookups lane resolution needs.
pub trait LaneTables {
    /// The live backend set of (Service frontend, lane), if any.
    fn backend_set(&self, svc_id: u32, lane: u32) -> Option<BackendSet>;
    /// The policy of a lane, if it has one.
    fn lane_policy(&self, lane: u32) -> Option<LanePolicy>;
}

/// The lane decision for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The caller's own lane has ready backends.
    Own {
        /// The set to pick from.
        set: BackendSet,
    },
    /// The caller's lane had none; `chain_step` (0-based) of its fallback chain has some.
    FellBack {
        /// The lane whose backends serve the connection.
        lane: u32,
        /// Position of `lane` in the caller lane's chain.
        chain_step: u32,
        /// The set to pick from.
        set: BackendSet,
    },
    /// A strict lane or Service with no ready backend in the caller's lane: refuse.
    RefusedStrict,
    /// No lane the caller may use has a ready backend: fail open.
    NoBackend,
}

/// Whether the lane policy forbids fallback.
#[inline(always)]
#[must_use]
pub fn lane_is_strict(policy: Option<&LanePolicy>) -> bool {
    matches!(policy, Some(p) if p.flags & LANE_F_STRICT != 0)
}

/// Whether the Service forbids fallback.
#[inline(always)]
#[must_use]
pub fn svc_is_strict(svc: &Service) -> bool {
    svc.flags & SVC_F_STRICT != 0
}

#[inline(always)]
fn ready_set<T: LaneTables>(tables: &T, svc_id: u32, lane: u32) -> Option<BackendSet> {
    match tables.backend_set(svc_id, lane) {
        Some(set) if set.count > 0 => Some(set),
        _ => None,
    }
}

/// Decides which lane serves a connection from a caller in `caller_lane` to `svc`.
///
/// 1. the caller's lane has ready backends: [`Resolution::Own`];
/// 2. base callers stop here: they never reach another lane;
/// 3. strict lane or Service: [`Resolution::RefusedStrict`];
/// 4. else the lane's fallback chain (default `[base]`), first lane with ready backends wins.
#[inline(always)]
pub fn resolve_lane<T: LaneTables>(tables: &T, svc: &Service, caller_lane: u32) -> Resolution {
    if let Some(set) = ready_set(tables, svc.svc_id, caller_lane) {
        return Resolution::Own { set };
    }
    let strict_svc = svc_is_strict(svc);
    if caller_lane == BASE_LANE {
        return if strict_svc { Resolution::RefusedStrict } else { Resolution::NoBackend };
    }
    let policy = tables.lane_policy(caller_lane);
    if strict_svc || lane_is_strict(policy.as_ref()) {
        return Resolution::RefusedStrict;
    }
    match policy {
        None => match ready_set(tables, svc.svc_id, BASE_LANE) {
            Some(set) => Resolution::FellBack { lane: BASE_LANE, chain_step: 0, set },
            None => Resolution::NoBackend,
        },
        Some(policy) => {
            // Verifier: the loop bound is the constant MAX_CHAIN, and `chain[i]` is indexed with
            // i < MAX_CHAIN, so the access is provably in bounds.
            let mut i: u32 = 0;
            while (i as usize) < MAX_CHAIN && i < policy.chain_len {
                let lane = policy.chain[i as usize];
                if let Some(set) = ready_set(tables, svc.svc_id, lane) {
                    return Resolution::FellBack { lane, chain_step: i, set };
                }
                i += 1;
            }
            Resolution::NoBackend
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeMap;

    use super::*;
    use crate::lane_id;

    #[derive(Default)]
    struct Tables {
        sets: BTreeMap<(u32, u32), u32>,
        lanes: BTreeMap<u32, LanePolicy>,
    }

    impl Tables {
        fn with_backends(mut self, lane: &str, count: u32) -> Self {
            self.sets.insert((7, lane_id(lane)), count);
            self
        }
        fn with_chain(mut self, lane: &str, chain: &[&str], flags: u32) -> Self {
            let ids: std::vec::Vec<u32> = chain.iter().map(|l| lane_id(l)).collect();
            self.lanes.insert(lane_id(lane), LanePolicy::new(&ids, flags));
            self
        }
    }

    impl LaneTables for Tables {
        fn backend_set(&self, svc_id: u32, lane: u32) -> Option<BackendSet> {
            self.sets.get(&(svc_id, lane)).map(|&count| BackendSet { count, generation: 1 })
        }
        fn lane_policy(&self, lane: u32) -> Option<LanePolicy> {
            self.lanes.get(&lane).copied()
        }
    }

    const SVC: Service = Service { svc_id: 7, flags: 0 };
    const STRICT_SVC: Service = Service { svc_id: 7, flags: SVC_F_STRICT };

    #[test]
    fn own_lane_first() {
        let t = Tables::default().with_backends("gray", 2).with_backends("base", 3);
        assert!(matches!(resolve_lane(&t, &SVC, lane_id("gray")), Resolution::Own { set } if set.count == 2));
        assert!(matches!(resolve_lane(&t, &SVC, BASE_LANE), Resolution::Own { set } if set.count == 3));
    }

    #[test]
    fn default_chain_is_base() {
        let t = Tables::default().with_backends("base", 3);
        assert_eq!(
            resolve_lane(&t, &SVC, lane_id("gray")),
            Resolution::FellBack {
                lane: BASE_LANE,
                chain_step: 0,
                set: BackendSet { count: 3, generation: 1 }
            }
        );
    }

    #[test]
    fn empty_set_counts_as_no_backend() {
        let t = Tables::default().with_backends("gray", 0).with_backends("base", 1);
        assert!(matches!(
            resolve_lane(&t, &SVC, lane_id("gray")),
            Resolution::FellBack { lane: BASE_LANE, .. }
        ));
    }

    #[test]
    fn two_step_chain() {
        let t = Tables::default()
            .with_chain("feature-x", &["gray", "base"], 0)
            .with_backends("gray", 1)
            .with_backends("base", 1);
        assert_eq!(
            resolve_lane(&t, &SVC, lane_id("feature-x")),
            Resolution::FellBack {
                lane: lane_id("gray"),
                chain_step: 0,
                set: BackendSet { count: 1, generation: 1 }
            }
        );
        let t = Tables::default().with_chain("feature-x", &["gray", "base"], 0).with_backends("base", 1);
        assert!(matches!(
            resolve_lane(&t, &SVC, lane_id("feature-x")),
            Resolution::FellBack { lane: BASE_LANE, chain_step: 1, .. }
        ));
    }

    #[test]
    fn base_callers_never_leave_base() {
        let t = Tables::default().with_backends("gray", 5);
        assert_eq!(resolve_lane(&t, &SVC, BASE_LANE), Resolution::NoBackend);
    }

    #[test]
    fn strict_lane_and_strict_service_refuse() {
        let t = Tables::default().with_chain("gray", &["base"], LANE_F_STRICT).with_backends("base", 1);
        assert_eq!(resolve_lane(&t, &SVC, lane_id("gray")), Resolution::RefusedStrict);
        let t = Tables::default().with_backends("base", 1);
        assert_eq!(resolve_lane(&t, &STRICT_SVC, lane_id("gray")), Resolution::RefusedStrict);
        assert!(matches!(resolve_lane(&t, &STRICT_SVC, BASE_LANE), Resolution::Own { .. }));
        let t = Tables::default();
        assert_eq!(resolve_lane(&t, &STRICT_SVC, BASE_LANE), Resolution::RefusedStrict);
    }

    #[test]
    fn nothing_anywhere_fails_open() {
        let t = Tables::default().with_chain("feature-x", &["gray", "base"], 0);
        assert_eq!(resolve_lane(&t, &SVC, lane_id("feature-x")), Resolution::NoBackend);
    }

    #[test]
    fn chain_len_is_respected() {
        let mut t = Tables::default().with_chain("x", &["gray"], 0).with_backends("base", 1);
        // A stale entry beyond chain_len must not be used.
        t.lanes.get_mut(&lane_id("x")).unwrap().chain[1] = BASE_LANE;
        assert_eq!(resolve_lane(&t, &SVC, lane_id("x")), Resolution::NoBackend);
    }
}
