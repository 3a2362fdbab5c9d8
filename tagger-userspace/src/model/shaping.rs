//! The shaping part of the desired datapath, derived from the Services' shaping annotations,
//! the lanes config and the backends' observed ready times:
//!
//! - per frontend, its [`SvcShaping`] (canary share; warm-up on while a backend warms) and
//!   the `SVC_F_SHAPED` / `SVC_F_ROUTED` flags that make the datapath look them up;
//! - per (frontend, caller lane) with a matching routing rule, the rule's chain;
//! - per warming backend, its [`WarmEntry`] (ready time on the kernel's monotonic clock).
//!
//! Ready times: a backend is "ready" when the agent first sees it in a set of a frontend with a
//! warm-up; backends present at the agent's first complete view are taken as warm (never
//! re-warmed on restart). An entry is dropped once its warm-up is over (the datapath already
//! gives it full weight from then on, so dropping it late changes nothing).

use std::collections::{BTreeMap, BTreeSet};

use tagger_common::{
    Backend, LanePolicy, RouteKey, SHAPE_F_CANARY, SHAPE_F_STICKY, SHAPE_F_WARMUP, SVC_F_AFFINITY,
    SVC_F_ROUTED, SVC_F_SHAPED, SetKey, SvcAffinity, SvcShaping, WarmEntry, WarmKey, lane_id,
};

use super::{FrontendOrigin, lanes::LaneSettings};
use crate::config::values::Warmup;

/// The shaping entry of a frontend (`None`: it needs none), `warming` telling whether some of
/// its backends are warming up.
#[must_use]
pub fn svc_shaping(origin: &FrontendOrigin, warming: bool) -> Option<SvcShaping> {
    let mut s = SvcShaping::default();
    if let Some(c) = &origin.shaping.canary {
        s.flags |= SHAPE_F_CANARY;
        if c.sticky {
            s.flags |= SHAPE_F_STICKY;
        }
        s.canary_lane = lane_id(&c.lane);
        s.canary_bp = c.basis_points;
    }
    if warming {
        s.flags |= SHAPE_F_WARMUP;
    }
    (s.flags != 0).then_some(s)
}

/// The routing rule chains of a frontend.
#[must_use]
pub fn svc_routes(
    svc_id: u32,
    origin: &FrontendOrigin,
    lanes: &LaneSettings,
) -> BTreeMap<RouteKey, LanePolicy> {
    lanes
        .routes_for(origin)
        .into_iter()
        .map(|(caller_lane, chain)| (RouteKey { svc_id, caller_lane }, chain))
        .collect()
}

/// A frontend's flags with the shaping bits set from what it has.
#[must_use]
pub fn shaped_flags(flags: u32, shaped: bool, routed: bool) -> u32 {
    let mut f = flags & !(SVC_F_SHAPED | SVC_F_ROUTED);
    if shaped {
        f |= SVC_F_SHAPED;
    }
    if routed {
        f |= SVC_F_ROUTED;
    }
    f
}

/// The affinity entry of a frontend (`None`: no `sessionAffinity: ClientIP`).
#[must_use]
pub fn svc_affinity(origin: &FrontendOrigin) -> Option<SvcAffinity> {
    origin.shaping.affinity.map(|a| SvcAffinity { timeout_s: a.timeout_s, _pad: 0 })
}

/// A frontend's flags with [`SVC_F_AFFINITY`] set exactly when it has affinity.
#[must_use]
pub fn affinity_flags(flags: u32, affinity: bool) -> u32 {
    if affinity { flags | SVC_F_AFFINITY } else { flags & !SVC_F_AFFINITY }
}

/// The warm-up of a backend in `lane` of a Service: the Service's annotation, else its lane's.
#[must_use]
pub fn backend_warmup(origin: &FrontendOrigin, lane: u32, lanes: &LaneSettings) -> Option<Warmup> {
    origin.shaping.warmup.or_else(|| lanes.lane_warmup(lane))
}

/// The warm key of a backend of a frontend.
#[must_use]
pub fn warm_key(svc_id: u32, b: &Backend) -> WarmKey {
    WarmKey { svc_id, port: b.port, _pad: 0, addr: b.addr }
}

fn svc_range(svc_id: u32) -> std::ops::RangeInclusive<WarmKey> {
    WarmKey { svc_id, port: 0, _pad: 0, addr: [0; 4] }..=WarmKey {
        svc_id,
        port: u16::MAX,
        _pad: u16::MAX,
        addr: [u32::MAX; 4],
    }
}

/// Backends seen per set, and the entries of those still warming.
#[derive(Clone, Debug, Default)]
pub struct WarmTracker {
    known: BTreeMap<SetKey, BTreeSet<Backend>>,
    entries: BTreeMap<WarmKey, WarmEntry>,
}

impl WarmTracker {
    /// The warming backends' entries.
    #[must_use]
    pub fn entries(&self) -> &BTreeMap<WarmKey, WarmEntry> {
        &self.entries
    }

    /// Keeps the warm-up of backends that were warming when the agent restarted (entries read
    /// from the maps): they go on ramping from their original ready time.
    pub fn adopt(&mut self, entries: BTreeMap<WarmKey, WarmEntry>) {
        self.entries.extend(entries);
    }

    /// Whether some backend of the frontend is warming.
    #[must_use]
    pub fn warming(&self, svc_id: u32) -> bool {
        self.entries.range(svc_range(svc_id)).next().is_some()
    }

    /// A set's current members: those not seen before become ready at `now_ns` when the set
    /// has a warm-up (`seed`: the first view, everything is already warm). Records the warm
    /// keys that changed in `changed`.
    pub fn observe(
        &mut self,
        key: SetKey,
        backends: Option<&Vec<Backend>>,
        warmup: Option<Warmup>,
        now_ns: u64,
        seed: bool,
        changed: &mut BTreeSet<WarmKey>,
    ) {
        let now: BTreeSet<Backend> = backends.map(|b| b.iter().copied().collect()).unwrap_or_default();
        let before = self.known.remove(&key).unwrap_or_default();
        for gone in before.difference(&now) {
            let k = warm_key(key.svc_id, gone);
            // The same backend may still be in another lane's set of this frontend (it moved).
            if self.entries.remove(&k).is_some() {
                changed.insert(k);
            }
        }
        if let Some(w) = warmup.filter(|_| !seed) {
            for new in now.difference(&before) {
                let k = warm_key(key.svc_id, new);
                self.entries.insert(k, w.entry(now_ns));
                changed.insert(k);
            }
        }
        if !now.is_empty() {
            self.known.insert(key, now);
        }
    }

    /// Drops the entries whose warm-up is over; returns the frontends that had one.
    pub fn expire(&mut self, now_ns: u64, changed: &mut BTreeSet<WarmKey>) -> BTreeSet<u32> {
        let over: Vec<WarmKey> = self
            .entries
            .iter()
            .filter(|(_, e)| e.ready_ns.saturating_add(e.warmup_ns) <= now_ns)
            .map(|(k, _)| *k)
            .collect();
        let mut svcs = BTreeSet::new();
        for k in over {
            self.entries.remove(&k);
            changed.insert(k);
            svcs.insert(k.svc_id);
        }
        svcs
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        config::values::{parse_canary, parse_warmup},
        model::{ObjectRef, ServiceShaping},
    };

    fn be(n: u8) -> Backend {
        crate::net::backend(format!("10.0.0.{n}:80").parse().unwrap())
    }

    fn origin(canary: Option<&str>, warmup: Option<&str>) -> FrontendOrigin {
        FrontendOrigin {
            service: ObjectRef::new("shop", "cart"),
            port_name: String::new(),
            shaping: ServiceShaping {
                canary: canary.map(|c| parse_canary(c).unwrap()),
                warmup: warmup.and_then(|w| parse_warmup(w).unwrap()),
                labels: BTreeMap::new(),
                affinity: None,
            },
        }
    }

    #[test]
    fn shaping_entries_and_flags() {
        assert_eq!(svc_shaping(&origin(None, None), false), None);
        let s = svc_shaping(&origin(Some("gray=10, sticky"), None), false).unwrap();
        assert_eq!(
            (s.flags, s.canary_lane, s.canary_bp),
            (SHAPE_F_CANARY | SHAPE_F_STICKY, lane_id("gray"), 1000)
        );
        let s = svc_shaping(&origin(None, Some("60s")), true).unwrap();
        assert_eq!(s.flags, SHAPE_F_WARMUP);
        assert_eq!(svc_shaping(&origin(None, Some("60s")), false), None, "warm-up on only while warming");
        assert_eq!(shaped_flags(1, true, false), 1 | SVC_F_SHAPED);
        assert_eq!(shaped_flags(1 | SVC_F_SHAPED | SVC_F_ROUTED, false, true), 1 | SVC_F_ROUTED);
    }

    #[test]
    fn affinity_entries_and_flags() {
        let mut o = origin(None, None);
        assert_eq!(svc_affinity(&o), None);
        o.shaping.affinity = Some(crate::model::SessionAffinity { timeout_s: 60 });
        assert_eq!(svc_affinity(&o), Some(SvcAffinity { timeout_s: 60, _pad: 0 }));
        assert_eq!(affinity_flags(1, true), 1 | SVC_F_AFFINITY);
        assert_eq!(affinity_flags(1 | SVC_F_AFFINITY | SVC_F_SHAPED, false), 1 | SVC_F_SHAPED);
    }

    #[test]
    fn annotation_warmup_overrides_the_lanes() {
        let lanes = LaneSettings::of(
            &crate::config::lanes::LanesConfig::parse("lanes:\n  gray: {warmup: 30s}\n").unwrap(),
        );
        let w = backend_warmup(&origin(None, None), lane_id("gray"), &lanes).unwrap();
        assert_eq!(w.duration, Duration::from_secs(30));
        assert_eq!(backend_warmup(&origin(None, None), 0, &lanes), None);
        let w = backend_warmup(&origin(None, Some("2m")), lane_id("gray"), &lanes).unwrap();
        assert_eq!(w.duration, Duration::from_mins(2));
    }

    #[test]
    fn only_backends_new_after_the_first_view_warm_up() {
        let w = parse_warmup("10s").unwrap();
        let key = SetKey { svc_id: 7, lane: 0 };
        let mut t = WarmTracker::default();
        let mut changed = BTreeSet::new();
        t.observe(key, Some(&vec![be(1), be(2)]), w, 1_000, true, &mut changed);
        assert!(changed.is_empty() && !t.warming(7), "present at start: not re-warmed");
        t.observe(key, Some(&vec![be(1), be(2), be(3)]), w, 5_000, false, &mut changed);
        assert_eq!(changed, BTreeSet::from([warm_key(7, &be(3))]));
        assert!(t.warming(7) && !t.warming(8));
        assert_eq!(t.entries()[&warm_key(7, &be(3))].ready_ns, 5_000);
        // Still warming at the next look: nothing changes.
        changed.clear();
        t.observe(key, Some(&vec![be(1), be(2), be(3)]), w, 6_000, false, &mut changed);
        assert!(changed.is_empty());
        // Over after 10 s.
        assert!(t.expire(5_000 + 9_999_999_999, &mut changed).is_empty());
        assert_eq!(t.expire(5_000 + 10_000_000_000, &mut changed), BTreeSet::from([7]));
        assert!(!t.warming(7));
        // Gone and back: warms again.
        changed.clear();
        t.observe(key, Some(&vec![be(1)]), w, 20_000_000_000, false, &mut changed);
        t.observe(key, Some(&vec![be(1), be(2)]), w, 21_000_000_000, false, &mut changed);
        assert!(t.warming(7));
        // Entries adopted from the maps at a restart go on ramping.
        let mut t = WarmTracker::default();
        let adopted = warm_key(7, &be(2));
        t.adopt(BTreeMap::from([(adopted, w.unwrap().entry(500))]));
        t.observe(key, Some(&vec![be(1), be(2)]), w, 1_000, true, &mut changed);
        assert_eq!(t.entries()[&adopted].ready_ns, 500);
        // A Service without warm-up never gets entries.
        let mut t = WarmTracker::default();
        t.observe(key, Some(&vec![be(1)]), None, 0, true, &mut changed);
        t.observe(key, Some(&vec![be(1), be(2)]), None, 1, false, &mut changed);
        assert!(!t.warming(7));
    }
}

#[cfg(test)]
mod incremental_tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tagger_common::{CFG_F_SHADOW, SVC_F_AFFINITY, SVC_F_ROUTED, SVC_F_SHAPED};

    use super::*;
    use crate::{
        model::{
            Change, FrontendIds, Kind, Limits, Object, ServiceInput, SliceInput,
            testing::{endpoint, service, slice},
        },
        model::{
            incremental::Incremental,
            state::{DatapathState, Scope},
        },
        reconcile::Mirror,
    };

    static NOW: AtomicU64 = AtomicU64::new(1_000_000_000);

    fn now() -> u64 {
        NOW.load(Ordering::Relaxed)
    }

    fn svc(annotations: &[(&str, &str)]) -> Object {
        let (r, mut s) = service("shop", "cart", &["10.96.0.10"], &[("http", 80, "TCP")]);
        s.metadata.annotations =
            Some(annotations.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
        Object::Service(r.clone(), ServiceInput::new(&r, &s))
    }

    fn slice_of(ips: &[&str]) -> Object {
        let eps = ips.iter().map(|ip| endpoint(ip, None)).collect();
        let (r, s) = slice("shop", "cart-1", "cart", "IPv4", &[("http", 8080, "TCP")], eps);
        Object::Slice(r.clone(), SliceInput::new(&r, &s))
    }

    fn start(objects: &[Object]) -> Incremental {
        let mut inc = Incremental::new(
            FrontendIds::default(),
            crate::config::labels::default_lane_keys(),
            Limits::DATAPATH,
        );
        inc.set_clock(now);
        let mut changes = Vec::new();
        for kind in Kind::ALL {
            let of_kind: Vec<Object> = objects.iter().filter(|o| o.kind() == kind).cloned().collect();
            changes.extend(Change::list(kind, of_kind));
        }
        inc.apply(changes);
        inc
    }

    #[test]
    fn annotations_rules_and_shadow_reach_the_desired_state() {
        let lanes = LaneSettings::of(
            &crate::config::lanes::LanesConfig::parse(
                "mode: shadow\nrules:\n  - {from: gray, namespace: shop, name: cart, to: [blue, base]}\n",
            )
            .unwrap(),
        );
        let mut inc = start(&[svc(&[("tagger.io/canary", "gray=10")]), slice_of(&["10.0.0.1"])]);
        let update = inc.update(&lanes, crate::model::incremental::Recheck::None, |_| None);
        let d = inc.desired_state();
        let (_, frontend) = d.frontends.iter().next().unwrap();
        assert_eq!(frontend.flags & (SVC_F_SHAPED | SVC_F_ROUTED), SVC_F_SHAPED | SVC_F_ROUTED);
        let s = d.shaping[&frontend.svc_id];
        assert_eq!((s.flags, s.canary_bp), (SHAPE_F_CANARY, 1000));
        assert_eq!(d.routes.len(), 1);
        assert_eq!(d.config_flags, CFG_F_SHADOW);
        assert!(update.scope.config && !update.scope.shaping.is_empty());
        // The same as the full computation (nothing warming).
        let plan = Mirror::new(DatapathState::default()).plan(inc.desired(), &update.scope, true);
        let mut applied = DatapathState::default();
        for op in plan {
            applied.apply_owned(op).unwrap();
        }
        assert!(applied.equivalent(&d), "the scope covers every entry");

        // An invalid annotation is counted and read as absent; the rule goes with a new config.
        inc.apply([Change::Applied(svc(&[("tagger.io/canary", "gray=150")]))]);
        let update = inc.update(&LaneSettings::default(), crate::model::incremental::Recheck::None, |_| None);
        let d = inc.desired_state();
        let (_, frontend) = d.frontends.iter().next().unwrap();
        assert_eq!(frontend.flags & (SVC_F_SHAPED | SVC_F_ROUTED), 0);
        assert!(d.shaping.is_empty() && d.routes.is_empty() && d.config_flags == 0);
        assert_eq!(update.scope.routes.len(), 1);
        assert!(inc.warning_counts().values().sum::<u64>() >= 1);
    }

    #[test]
    fn base_only_services_are_left_to_the_cluster_until_a_lane_or_shaping_needs_them() {
        use tagger_common::SVC_F_PASSTHROUGH;
        let none = crate::model::incremental::Recheck::None;
        let lanes = LaneSettings::default();
        let labelled = |lane: &str| {
            let (r, s) = slice(
                "shop",
                "cart-1",
                "cart",
                "IPv4",
                &[("http", 8080, "TCP")],
                vec![endpoint("10.0.0.1", Some("p1")), endpoint("10.0.0.2", Some("p2"))],
            );
            let pod = |name: &str, lane: &str| {
                let labels = [("tagger.io/lane".to_owned(), lane.to_owned())].into();
                Object::Pod(crate::model::ObjectRef::new("shop", name), labels)
            };
            [Object::Slice(r.clone(), SliceInput::new(&r, &s)), pod("p1", ""), pod("p2", lane)]
        };
        let flags = |inc: &Incremental| inc.desired_state().frontends.values().next().unwrap().flags;
        let mut objects = vec![svc(&[])];
        objects.extend(labelled(""));
        let mut inc = start(&objects);
        inc.update(&lanes, none, |_| None);
        assert_eq!(flags(&inc) & SVC_F_PASSTHROUGH, SVC_F_PASSTHROUGH, "base only: not steered");
        // Its backend set is still written (for operators, and so that steering again is one
        // flag flip).
        assert_eq!(inc.desired_state().sets.len(), 1);

        // A backend pod turns gray: steered.
        inc.apply(labelled("gray").map(Change::Applied));
        let update = inc.update(&lanes, none, |_| None);
        assert_eq!(flags(&inc) & SVC_F_PASSTHROUGH, 0);
        assert_eq!(update.scope.frontends.len(), 1);
        // Back to base: left to the cluster again.
        inc.apply(labelled("").map(Change::Applied));
        inc.update(&lanes, none, |_| None);
        assert_eq!(flags(&inc) & SVC_F_PASSTHROUGH, SVC_F_PASSTHROUGH);
        // A canary annotation (shaping) makes it steered, with base backends only.
        inc.apply([Change::Applied(svc(&[("tagger.io/canary", "gray=10")]))]);
        inc.update(&lanes, none, |_| None);
        assert_eq!(flags(&inc) & (SVC_F_PASSTHROUGH | SVC_F_SHAPED), SVC_F_SHAPED);
        // So does the strict annotation.
        inc.apply([Change::Applied(svc(&[("tagger.io/strict", "true")]))]);
        inc.update(&lanes, none, |_| None);
        assert_eq!(flags(&inc) & SVC_F_PASSTHROUGH, 0);
    }

    #[test]
    fn session_affinity_reaches_the_desired_state_and_goes_with_it() {
        let lanes = LaneSettings::default();
        let none = crate::model::incremental::Recheck::None;
        let (r, mut s) = service("shop", "cart", &["10.96.0.10"], &[("http", 80, "TCP")]);
        s.spec.as_mut().unwrap().session_affinity = Some("ClientIP".to_owned());
        let with = Object::Service(r.clone(), ServiceInput::new(&r, &s));
        let mut inc = start(&[with, slice_of(&["10.0.0.1"])]);
        inc.update(&lanes, none, |_| None);
        let d = inc.desired_state();
        let (_, frontend) = d.frontends.iter().next().unwrap();
        assert_eq!(frontend.flags & SVC_F_AFFINITY, SVC_F_AFFINITY);
        assert_eq!(d.affinity[&frontend.svc_id].timeout_s, tagger_common::AFFINITY_DEFAULT_TIMEOUT_S);
        assert!(d.shaping.is_empty(), "affinity is not shaping");
        // The same as the full computation.
        let plan = Mirror::new(DatapathState::default()).plan(
            inc.desired(),
            &Scope::all(&DatapathState::default(), inc.desired()),
            true,
        );
        let mut applied = DatapathState::default();
        for op in plan {
            applied.apply_owned(op).unwrap();
        }
        assert!(applied.equivalent(&d));

        // Affinity removed: the entry and the flag go, and the scope says so.
        inc.apply([Change::Applied(svc(&[]))]);
        let update = inc.update(&lanes, none, |_| None);
        let d = inc.desired_state();
        assert!(d.affinity.is_empty());
        assert!(d.frontends.values().all(|f| f.flags & SVC_F_AFFINITY == 0));
        assert_eq!(update.scope.affinity.len(), 1);
        assert_eq!(update.scope.frontends.len(), 1);
    }

    #[test]
    fn backends_ready_after_start_warm_up_and_stop_warming() {
        let lanes = LaneSettings::default();
        let mut inc = start(&[svc(&[("tagger.io/warmup", "10s")]), slice_of(&["10.0.0.1"])]);
        let none = crate::model::incremental::Recheck::None;
        inc.update(&lanes, none, |_| None);
        assert!(inc.desired_state().warm.is_empty(), "present at start: not warmed");
        assert!(inc.desired_state().shaping.is_empty());

        NOW.store(2_000_000_000, Ordering::Relaxed);
        inc.apply([Change::Applied(slice_of(&["10.0.0.1", "10.0.0.2"]))]);
        let update = inc.update(&lanes, none, |_| None);
        let d = inc.desired_state();
        assert_eq!(d.warm.len(), 1);
        let (key, entry) = d.warm.iter().next().unwrap();
        assert_eq!(entry.ready_ns, 2_000_000_000);
        assert_eq!(d.shaping[&key.svc_id].flags, SHAPE_F_WARMUP);
        assert!(d.frontends.values().all(|f| f.flags & SVC_F_SHAPED != 0));
        assert!(update.scope.warm.contains(key));

        NOW.store(12_000_000_000, Ordering::Relaxed);
        let update = inc.update(&lanes, none, |_| None);
        let d = inc.desired_state();
        assert!(d.warm.is_empty() && d.shaping.is_empty());
        assert!(d.frontends.values().all(|f| f.flags & SVC_F_SHAPED == 0));
        assert_eq!(update.scope.warm.len(), 1);
    }
}
