//! Fallback transitions: one log line when a (Service frontend, lane) loses its last ready
//! backend — from then on that lane's callers fall back — and one when it has backends again.
//! Never per connection.

use std::collections::{BTreeMap, BTreeSet};

use tagger_common::{BASE_LANE, SetKey};

/// A change in which lanes of a frontend have ready backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The frontend's svc_id.
    pub svc_id: u32,
    /// The lane.
    pub lane: u32,
    /// `true`: the lane has ready backends again; `false`: it lost its last one.
    pub available: bool,
}

/// Remembers, per frontend, the lanes that had ready backends at the last pass.
#[derive(Debug, Default)]
pub struct LaneAvailability {
    last: Option<BTreeMap<u32, BTreeSet<u32>>>,
}

impl LaneAvailability {
    /// Compares with the previous pass. The first pass only records (it is not a transition).
    /// Frontends that appear or disappear whole are not transitions either: only lanes of a
    /// frontend present in both passes.
    pub fn observe<'a>(
        &mut self,
        frontends: impl IntoIterator<Item = u32>,
        sets: impl IntoIterator<Item = &'a SetKey>,
    ) -> Vec<Transition> {
        let mut now: BTreeMap<u32, BTreeSet<u32>> =
            frontends.into_iter().map(|id| (id, BTreeSet::new())).collect();
        for key in sets {
            now.entry(key.svc_id).or_default().insert(key.lane);
        }
        let mut out = Vec::new();
        if let Some(last) = &self.last {
            for (svc_id, lanes) in &now {
                let Some(before) = last.get(svc_id) else { continue };
                for lane in before.difference(lanes) {
                    out.push(Transition { svc_id: *svc_id, lane: *lane, available: false });
                }
                for lane in lanes.difference(before) {
                    out.push(Transition { svc_id: *svc_id, lane: *lane, available: true });
                }
            }
        }
        self.last = Some(now);
        out
    }
}

impl LaneAvailability {
    /// Compares only the frontends a pass touched with the previous pass: for each svc_id,
    /// `Some(lanes)` that have ready backends now, or `None` when the frontend is gone. Cheap
    /// for small changes; nothing is reported before a first [`LaneAvailability::observe`].
    pub fn observe_some(
        &mut self,
        touched: impl IntoIterator<Item = (u32, Option<BTreeSet<u32>>)>,
    ) -> Vec<Transition> {
        let Some(last) = &mut self.last else { return Vec::new() };
        let mut out = Vec::new();
        for (svc_id, now) in touched {
            let Some(lanes) = now else {
                last.remove(&svc_id);
                continue;
            };
            if let Some(before) = last.get(&svc_id) {
                for lane in before.difference(&lanes) {
                    out.push(Transition { svc_id, lane: *lane, available: false });
                }
                for lane in lanes.difference(before) {
                    out.push(Transition { svc_id, lane: *lane, available: true });
                }
            }
            last.insert(svc_id, lanes);
        }
        out
    }
}

/// The log line of a transition, with names where known.
#[must_use]
pub fn describe(t: &Transition, service: Option<&str>, lane: &str) -> String {
    let service = service.map_or_else(|| format!("frontend {}", t.svc_id), str::to_owned);
    match (t.available, t.lane == BASE_LANE) {
        (false, false) => format!(
            "{service}: lane {lane} has no ready backend; its callers now fall back along their chain"
        ),
        (true, false) => format!("{service}: lane {lane} has ready backends again; its callers return to it"),
        (false, true) => format!(
            "{service}: no ready base backend; base callers fail open and other lanes cannot fall back to base"
        ),
        (true, true) => format!("{service}: base has ready backends again"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &[(u32, u32)]) -> Vec<SetKey> {
        v.iter().map(|&(svc_id, lane)| SetKey { svc_id, lane }).collect()
    }

    /// Observes with every svc_id that has a set, plus `extra` frontends without sets.
    fn observe(a: &mut LaneAvailability, v: &[(u32, u32)], extra: &[u32]) -> Vec<Transition> {
        let k = keys(v);
        let frontends: Vec<u32> = k.iter().map(|s| s.svc_id).chain(extra.iter().copied()).collect();
        a.observe(frontends, &k)
    }

    #[test]
    fn first_pass_records_then_only_changes_are_reported() {
        let mut a = LaneAvailability::default();
        assert!(observe(&mut a, &[(1, 0), (1, 7)], &[]).is_empty());
        assert!(observe(&mut a, &[(1, 0), (1, 7)], &[]).is_empty(), "no change, no line");
        assert_eq!(observe(&mut a, &[(1, 0)], &[]), [Transition { svc_id: 1, lane: 7, available: false }]);
        assert_eq!(
            observe(&mut a, &[(1, 0), (1, 7)], &[]),
            [Transition { svc_id: 1, lane: 7, available: true }]
        );
        // A new frontend is not a transition.
        assert!(observe(&mut a, &[(1, 0), (1, 7), (2, 0)], &[]).is_empty());
        // Frontend 2 (still there) loses its only lane.
        assert_eq!(
            observe(&mut a, &[(1, 0), (1, 7)], &[2]),
            [Transition { svc_id: 2, lane: 0, available: false }]
        );
        // Frontend 2 deleted: not a transition.
        assert!(observe(&mut a, &[(1, 0), (1, 7)], &[]).is_empty());
    }

    #[test]
    fn partial_observation_reports_the_same_transitions() {
        let mut a = LaneAvailability::default();
        let some = |v: &[u32]| Some(v.iter().copied().collect::<BTreeSet<u32>>());
        assert!(a.observe_some([(1, some(&[0]))]).is_empty(), "nothing before a full observation");
        assert!(observe(&mut a, &[(1, 0), (1, 7), (2, 0)], &[]).is_empty());
        assert_eq!(a.observe_some([(1, some(&[0]))]), [Transition { svc_id: 1, lane: 7, available: false }]);
        assert!(a.observe_some([(1, some(&[0]))]).is_empty(), "no change, no line");
        assert_eq!(
            a.observe_some([(1, some(&[0, 7]))]),
            [Transition { svc_id: 1, lane: 7, available: true }]
        );
        // A new frontend is not a transition; a deleted one is forgotten.
        assert!(a.observe_some([(3, some(&[0]))]).is_empty());
        assert!(a.observe_some([(2, None)]).is_empty());
        assert!(a.observe_some([(2, some(&[0]))]).is_empty(), "a reused id is a new frontend");
        // A full observation afterwards agrees with the partial ones.
        assert!(observe(&mut a, &[(1, 0), (1, 7), (2, 0), (3, 0)], &[]).is_empty());
    }

    #[test]
    fn lines_name_the_service_and_lane() {
        let t = Transition { svc_id: 3, lane: 9, available: false };
        assert!(
            describe(&t, Some("demo/a:http"), "gray").contains("demo/a:http: lane gray has no ready backend")
        );
        assert!(describe(&t, None, "gray").starts_with("frontend 3"));
    }
}
