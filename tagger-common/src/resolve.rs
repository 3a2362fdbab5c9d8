//! Lane resolution: which lane's backend set serves a caller, following the datapath semantics
//! the README states ("How the datapath decides"). The same code runs in the kernel (over BPF
//! maps) and in userspace (`tagger explain`, tests), through the [`LaneTables`] trait.

use crate::{
    BASE_LANE, BackendSet, LANE_F_STRICT, LanePolicy, MAX_CHAIN, SVC_F_PASSTHROUGH, SVC_F_STRICT, Service,
    shaping::{SVC_F_ROUTED, SVC_F_SHAPED, SvcShaping, canary_set},
};

/// The lookups lane resolution needs.
pub trait LaneTables {
    /// The live backend set of (Service frontend, lane), if any.
    fn backend_set(&self, svc_id: u32, lane: u32) -> Option<BackendSet>;
    /// The policy of a lane, if it has one.
    fn lane_policy(&self, lane: u32) -> Option<LanePolicy>;
    /// The routing rule's target chain for (Service, caller lane), if any; only asked for a
    /// Service with [`SVC_F_ROUTED`].
    fn route(&self, _svc_id: u32, _caller_lane: u32) -> Option<LanePolicy> {
        None
    }
    /// The Service's shaping settings; only asked for a Service with [`SVC_F_SHAPED`].
    fn shaping(&self, _svc_id: u32) -> Option<SvcShaping> {
        None
    }
    /// Slot `slot` of generation `generation` of (Service, lane); only asked for a Service with
    /// [`SVC_F_AFFINITY`](crate::SVC_F_AFFINITY), to check a remembered backend.
    fn slot(&self, _svc_id: u32, _lane: u32, _generation: u32, _slot: u32) -> Option<crate::Backend> {
        None
    }
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
    /// A routing rule for (Service, caller lane) chose `lane`, step `chain_step` of its chain.
    Routed {
        /// The lane whose backends serve the connection.
        lane: u32,
        /// Position of `lane` in the rule's chain.
        chain_step: u32,
        /// The set to pick from.
        set: BackendSet,
    },
    /// A base caller's connection fell in the Service's canary share.
    Canary {
        /// The canary lane.
        lane: u32,
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

/// Whether the Service is left to the cluster's Service implementation on this node.
#[inline(always)]
#[must_use]
pub fn svc_is_passthrough(svc: &Service) -> bool {
    svc.flags & SVC_F_PASSTHROUGH != 0
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
///
/// A routing rule for (Service, caller lane) replaces all of this: its chain is walked from
/// the start (the caller's own lane is not implied), and when no lane of it has ready
/// backends the connection fails open, or is refused if the rule or the Service is strict.
#[inline(always)]
pub fn resolve_lane<T: LaneTables>(tables: &T, svc: &Service, caller_lane: u32) -> Resolution {
    if svc.flags & SVC_F_ROUTED != 0
        && let Some(route) = tables.route(svc.svc_id, caller_lane)
    {
        return match walk_chain(tables, svc.svc_id, &route) {
            Some((lane, chain_step, set)) => Resolution::Routed { lane, chain_step, set },
            None if svc_is_strict(svc) || lane_is_strict(Some(&route)) => Resolution::RefusedStrict,
            None => Resolution::NoBackend,
        };
    }
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
        Some(policy) => match walk_chain(tables, svc.svc_id, &policy) {
            Some((lane, chain_step, set)) => Resolution::FellBack { lane, chain_step, set },
            None => Resolution::NoBackend,
        },
    }
}

/// The first lane of a chain with ready backends: (lane, step, set).
#[inline(always)]
fn walk_chain<T: LaneTables>(tables: &T, svc_id: u32, policy: &LanePolicy) -> Option<(u32, u32, BackendSet)> {
    // Verifier: the loop bound is the constant MAX_CHAIN, and `chain[i]` is indexed with
    // i < MAX_CHAIN, so the access is provably in bounds.
    let mut i: u32 = 0;
    while (i as usize) < MAX_CHAIN && i < policy.chain_len {
        let lane = policy.chain[i as usize];
        if let Some(set) = ready_set(tables, svc_id, lane) {
            return Some((lane, i, set));
        }
        i += 1;
    }
    None
}

/// [`resolve_lane`] with the Service's shaping: a base caller whose `draw` (in `0..10000`,
/// asked only for a canary Service) falls in the canary share goes to the canary lane when it
/// has ready backends. A routing rule for base callers takes precedence over the canary.
/// `shaping` is the Service's [`SvcShaping`], looked up by the caller when the Service has
/// [`SVC_F_SHAPED`].
#[inline(always)]
pub fn resolve_shaped<T: LaneTables>(
    tables: &T,
    svc: &Service,
    caller_lane: u32,
    shaping: Option<&SvcShaping>,
    draw: impl FnOnce(&SvcShaping) -> u32,
) -> Resolution {
    if let Some(shaping) = shaping
        && caller_lane == BASE_LANE
        && shaping.flags & crate::shaping::SHAPE_F_CANARY != 0
        && !(svc.flags & SVC_F_ROUTED != 0 && tables.route(svc.svc_id, caller_lane).is_some())
        && let Some((lane, set)) = canary_set(tables, svc.svc_id, shaping, caller_lane, draw(shaping))
    {
        return Resolution::Canary { lane, set };
    }
    resolve_lane(tables, svc, caller_lane)
}

/// The Service's shaping entry, looked up only when its flags say it has one.
#[inline(always)]
pub fn shaping_of<T: LaneTables>(tables: &T, svc: &Service) -> Option<SvcShaping> {
    if svc.flags & SVC_F_SHAPED != 0 { tables.shaping(svc.svc_id) } else { None }
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
        routes: BTreeMap<(u32, u32), LanePolicy>,
        shaping: Option<SvcShaping>,
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
        fn route(&self, svc_id: u32, caller_lane: u32) -> Option<LanePolicy> {
            self.routes.get(&(svc_id, caller_lane)).copied()
        }
        fn shaping(&self, _svc_id: u32) -> Option<SvcShaping> {
            self.shaping
        }
    }

    fn policy(chain: &[&str], flags: u32) -> LanePolicy {
        let mut p =
            LanePolicy { flags, chain_len: u32::try_from(chain.len()).unwrap(), ..LanePolicy::default() };
        for (i, l) in chain.iter().enumerate() {
            p.chain[i] = lane_id(l);
        }
        p
    }

    const ROUTED: Service = Service { svc_id: 7, flags: SVC_F_ROUTED };

    #[test]
    fn routing_rules_replace_the_chain_and_own_lane() {
        let mut t =
            Tables::default().with_backends("gray", 1).with_backends("canary", 1).with_backends("base", 1);
        t.routes.insert((7, lane_id("gray")), policy(&["canary", "base"], 0));
        assert_eq!(
            resolve_lane(&t, &ROUTED, lane_id("gray")),
            Resolution::Routed {
                lane: lane_id("canary"),
                chain_step: 0,
                set: BackendSet { count: 1, generation: 1 }
            }
        );
        // Without the flag the rule is not even looked up.
        assert!(matches!(resolve_lane(&t, &SVC, lane_id("gray")), Resolution::Own { .. }));
        // Other caller lanes keep their defaults.
        assert!(matches!(resolve_lane(&t, &ROUTED, BASE_LANE), Resolution::Own { .. }));
        t.sets.remove(&(7, lane_id("canary")));
        assert!(matches!(
            resolve_lane(&t, &ROUTED, lane_id("gray")),
            Resolution::Routed { chain_step: 1, .. }
        ));
        t.sets.clear();
        assert_eq!(resolve_lane(&t, &ROUTED, lane_id("gray")), Resolution::NoBackend);
        t.routes.insert((7, lane_id("gray")), policy(&["canary"], LANE_F_STRICT));
        assert_eq!(resolve_lane(&t, &ROUTED, lane_id("gray")), Resolution::RefusedStrict);
        // Base callers can be routed too.
        let mut t = Tables::default().with_backends("gray", 2).with_backends("base", 1);
        t.routes.insert((7, BASE_LANE), policy(&["gray"], 0));
        assert!(matches!(resolve_lane(&t, &ROUTED, BASE_LANE), Resolution::Routed { chain_step: 0, .. }));
    }

    #[test]
    fn canary_share_for_base_callers_only() {
        use crate::shaping::{SHAPE_F_CANARY, SVC_F_SHAPED};
        let mut t = Tables::default().with_backends("gray", 1).with_backends("base", 1);
        let shaping =
            SvcShaping { flags: SHAPE_F_CANARY, canary_lane: lane_id("gray"), canary_bp: 1000, _pad: 0 };
        t.shaping = Some(shaping);
        let svc = Service { svc_id: 7, flags: SVC_F_SHAPED };
        let s = shaping_of(&t, &svc);
        assert_eq!(s, Some(shaping));
        assert!(matches!(
            resolve_shaped(&t, &svc, BASE_LANE, s.as_ref(), |_| 999),
            Resolution::Canary { .. }
        ));
        assert!(matches!(resolve_shaped(&t, &svc, BASE_LANE, s.as_ref(), |_| 1000), Resolution::Own { .. }));
        // Gray callers are not affected, and the draw is not even asked for.
        assert!(matches!(
            resolve_shaped(&t, &svc, lane_id("gray"), s.as_ref(), |_| panic!("no draw")),
            Resolution::Own { .. }
        ));
        // No canary backends: the default way.
        t.sets.remove(&(7, lane_id("gray")));
        assert!(matches!(resolve_shaped(&t, &svc, BASE_LANE, s.as_ref(), |_| 0), Resolution::Own { .. }));
        // A rule for base callers wins over the canary.
        let mut t =
            Tables::default().with_backends("gray", 1).with_backends("base", 1).with_backends("blue", 1);
        t.routes.insert((7, BASE_LANE), policy(&["blue"], 0));
        let svc = Service { svc_id: 7, flags: SVC_F_SHAPED | SVC_F_ROUTED };
        assert!(matches!(
            resolve_shaped(&t, &svc, BASE_LANE, Some(&shaping), |_| 0),
            Resolution::Routed { lane, .. } if lane == lane_id("blue")
        ));
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
