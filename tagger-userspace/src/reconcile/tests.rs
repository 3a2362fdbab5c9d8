use std::{net::SocketAddr, path::PathBuf};

use proptest::prelude::*;
use tagger_common::{
    LANE_F_STRICT, LanePolicy, MAP_LANES, MAX_LANES, PodEntry, RouteKey, SvcAffinity, SvcShaping, WarmEntry,
    WarmKey, lane_id,
};

use super::{
    table::{Affinity, Lanes, Pods, Routes, Shaping, Warm},
    *,
};
use crate::model::api::{ClientIPConfig, Endpoint, EndpointConditions, SessionAffinityConfig};
use crate::{
    cgroup::CgroupRef,
    config::{labels::default_lane_keys, lanes::LanesConfig},
    model::{
        Change, DesiredPod, FrontendIds, FrontendOrigin, Kind, Limits, LocalPod, Object, ObjectRef, QosClass,
        ServiceInput, SliceInput, WarningKind, desired_pods,
        incremental::{Incremental, Recheck},
        lanes::LaneSettings,
        pod_entries,
        testing::{
            endpoint,
            reference::{ClusterState, DesiredServices, desired_services_within, desired_state},
            service, slice,
        },
    },
    net::{Proto, backend, frontend_key},
};

// ---- small helpers ---------------------------------------------------------------------------

fn fk(i: u8) -> FrontendKey {
    frontend_key(SocketAddr::from(([10, 96, 0, i], 80)), Proto::Tcp)
}

fn be(i: u8) -> Backend {
    backend(SocketAddr::from(([10, 0, 0, i], 8080)))
}

fn svc(id: u32) -> Service {
    Service { svc_id: id, flags: 0 }
}

fn chain(lanes: &[u32], flags: u32) -> LanePolicy {
    LanePolicy::new(lanes, flags)
}

const GRAY: u32 = lane_id("gray");

/// One Service (svc 1 at fk(1)) with a base and a gray set, a gray policy and a gray pod.
fn one_service() -> DatapathState {
    DatapathState {
        pods: BTreeMap::from([(100, PodEntry { lane: GRAY, level: 4 })]),
        frontends: BTreeMap::from([(fk(1), svc(1))]),
        sets: BTreeMap::from([
            (SetKey { svc_id: 1, lane: 0 }, vec![be(1), be(2)]),
            (SetKey { svc_id: 1, lane: GRAY }, vec![be(3)]),
        ]),
        lanes: BTreeMap::from([(GRAY, chain(&[0], 0))]),
        ..DatapathState::default()
    }
}

/// The phase of an op in a plan from `current` (see [`plan`]).
fn rank(op: &Op, current: &DatapathState, ops: &[Op]) -> u8 {
    use TableOp as T;
    use Write::{Put, Remove};
    match op {
        Op::SetConfigFlags { .. } | Op::Table(T::Lanes(Put(..))) => 0,
        Op::ReplaceSet { .. }
        | Op::Table(T::Shaping(Put(..)) | T::Routes(Put(..)) | T::Warm(Put(..)) | T::Affinity(Put(..))) => 1,
        Op::RemoveSet { key } if is_clearing(*key, current, ops) => 1,
        Op::UpsertFrontend { .. } => 2,
        Op::Table(T::Pods(Put(..))) => 3,
        Op::Table(T::Pods(Remove(_))) => 4,
        Op::RemoveFrontend { .. } => 5,
        Op::RemoveSet { .. } => 6,
        Op::Table(T::Lanes(Remove(_))) => 7,
        Op::Table(
            T::Shaping(Remove(_)) | T::Routes(Remove(_)) | T::Warm(Remove(_)) | T::Affinity(Remove(_)),
        ) => 8,
    }
}

/// Whether removing `key` clears a leftover set for a frontend about to appear: no current
/// frontend uses its id, and the plan upserts one that does.
fn is_clearing(key: SetKey, current: &DatapathState, ops: &[Op]) -> bool {
    !current.frontends.values().any(|s| s.svc_id == key.svc_id)
        && ops
            .iter()
            .any(|op| matches!(op, Op::UpsertFrontend { service, .. } if service.svc_id == key.svc_id))
}

fn assert_phase_order(current: &DatapathState, ops: &[Op]) {
    let ranks: Vec<u8> = ops.iter().map(|op| rank(op, current, ops)).collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "plan order {ranks:?}: {ops:#?}");
}

/// A writer that fails the ops for which `fail` says so, and passes the rest on.
struct Failing<'a, W: DatapathWriter, F: FnMut(&Op) -> bool> {
    inner: &'a mut W,
    fail: F,
}

impl<W: DatapathWriter, F: FnMut(&Op) -> bool> DatapathWriter for Failing<'_, W, F> {
    fn apply(&mut self, op: &Op) -> Result<(), Error> {
        if (self.fail)(op) {
            return Err(Error::MapFull { map: "TEST", wanted: 1, capacity: 0 });
        }
        self.inner.apply(op)
    }
}

// ---- plan ------------------------------------------------------------------------------------

#[test]
fn from_empty_in_safe_order() {
    let desired = one_service();
    let ops = plan(&DatapathState::default(), &desired, true);
    assert_eq!(ops.len(), 5);
    assert_phase_order(&DatapathState::default(), &ops);
    let mut model = DatapathState::default();
    let report = apply_plan(&mut model, &ops);
    assert!(report.is_complete());
    assert_eq!(report.applied, 5);
    assert_eq!(model, desired);
    assert!(plan(&model, &desired, true).is_empty(), "a second pass writes nothing");
}

#[test]
fn equal_sets_in_another_order_are_not_rewritten() {
    let current = one_service();
    let mut desired = current.clone();
    desired.sets.get_mut(&SetKey { svc_id: 1, lane: 0 }).unwrap().reverse();
    assert!(plan(&current, &desired, true).is_empty());
    assert!(current.equivalent(&desired));
    assert_ne!(current, desired);
    desired.sets.get_mut(&SetKey { svc_id: 1, lane: 0 }).unwrap().push(be(9));
    assert_eq!(plan(&current, &desired, true).len(), 1);
    assert!(!current.equivalent(&desired));
}

#[test]
fn removals_only_with_prune_and_after_writes() {
    let current = one_service();
    let mut desired = DatapathState::default();
    desired.frontends.insert(fk(2), svc(2));
    desired.sets.insert(SetKey { svc_id: 2, lane: 0 }, vec![be(5)]);
    assert_eq!(
        plan(&current, &desired, false),
        vec![
            Op::ReplaceSet { key: SetKey { svc_id: 2, lane: 0 }, backends: vec![be(5)] },
            Op::UpsertFrontend { key: fk(2), service: svc(2), previous: None },
        ]
    );
    let ops = plan(&current, &desired, true);
    assert_eq!(
        ops[2..],
        [
            Op::remove::<Pods>(100),
            Op::RemoveFrontend { key: fk(1), previous: svc(1) },
            Op::RemoveSet { key: SetKey { svc_id: 1, lane: 0 } },
            Op::RemoveSet { key: SetKey { svc_id: 1, lane: GRAY } },
            Op::remove::<Lanes>(GRAY),
        ]
    );
    assert!(ops.iter().filter(|o| o.is_removal()).count() == 5);
}

#[test]
fn changes_are_upserts() {
    let current = one_service();
    let mut desired = current.clone();
    desired.frontends.insert(fk(1), Service { svc_id: 1, flags: tagger_common::SVC_F_STRICT });
    desired.pods.insert(100, PodEntry { lane: 0, level: 4 });
    desired.lanes.insert(GRAY, chain(&[], LANE_F_STRICT));
    desired.sets.remove(&SetKey { svc_id: 1, lane: GRAY });
    let ops = plan(&current, &desired, true);
    assert_eq!(
        ops,
        vec![
            Op::put::<Lanes>(GRAY, chain(&[], LANE_F_STRICT)),
            Op::UpsertFrontend {
                key: fk(1),
                service: Service { svc_id: 1, flags: tagger_common::SVC_F_STRICT },
                previous: Some(svc(1)),
            },
            Op::put::<Pods>(100, PodEntry { lane: 0, level: 4 }),
            Op::RemoveSet { key: SetKey { svc_id: 1, lane: GRAY } },
        ]
    );
    for op in &ops {
        assert!(!op.to_string().is_empty());
    }
    assert_eq!(
        ops[1].to_string(),
        "upsert frontend 10.96.0.1:80/tcp as svc 1 (flags 0x1)",
        "log lines name the frontend"
    );
}

/// Every op's log line, as operators and tests read it.
#[test]
fn log_lines() {
    let set = SetKey { svc_id: 3, lane: GRAY };
    let route = RouteKey { svc_id: 3, caller_lane: GRAY };
    let warm = WarmKey {
        svc_id: 3,
        port: 8080u16.to_be(),
        _pad: 0,
        addr: [0, 0, 0xffff_u32.to_be(), 0x0a00_0001_u32.to_be()],
    };
    let shaping = SvcShaping { flags: 1, canary_lane: GRAY, canary_bp: 250, _pad: 0 };
    let entry = WarmEntry { warmup_ns: 30_000_000_000, ..WarmEntry::default() };
    let lines = [
        (Op::SetConfigFlags { flags: 1 }, "set datapath flags 0x1"),
        (
            Op::put::<Lanes>(GRAY, chain(&[0, 7], LANE_F_STRICT)),
            "set lane 0xba9ab39a policy (flags 0x1, chain [0, 7])",
        ),
        (Op::remove::<Lanes>(GRAY), "remove lane 0xba9ab39a policy"),
        (
            Op::ReplaceSet { key: set, backends: vec![be(1), be(2)] },
            "replace set svc 3 lane 0xba9ab39a with 2 backends",
        ),
        (Op::RemoveSet { key: set }, "remove set svc 3 lane 0xba9ab39a"),
        (
            Op::UpsertFrontend { key: fk(1), service: svc(3), previous: None },
            "upsert frontend 10.96.0.1:80/tcp as svc 3 (flags 0x0)",
        ),
        (Op::RemoveFrontend { key: fk(1), previous: svc(3) }, "remove frontend 10.96.0.1:80/tcp (svc 3)"),
        (
            Op::put::<Pods>(100, PodEntry { lane: GRAY, level: 4 }),
            "register pod cgroup 100 (level 4) in lane 0xba9ab39a",
        ),
        (Op::remove::<Pods>(100), "unregister pod cgroup 100"),
        (Op::put::<Shaping>(3, shaping), "set svc 3 shaping (flags 0x1, canary lane 0xba9ab39a 250 bp)"),
        (Op::remove::<Shaping>(3), "remove svc 3 shaping"),
        (
            Op::put::<Routes>(route, chain(&[GRAY, 0], 0)),
            "set route svc 3 from lane 0xba9ab39a (flags 0x0, chain [ba9ab39a, 0])",
        ),
        (Op::remove::<Routes>(route), "remove route svc 3 from lane 0xba9ab39a"),
        (
            Op::put::<Warm>(warm, entry),
            "set warm-up of svc 3 backend [0, 0, 4294901760, 16777226]:8080 (30000 ms)",
        ),
        (Op::remove::<Warm>(warm), "remove warm-up of svc 3 backend [0, 0, 4294901760, 16777226]"),
        (
            Op::put::<Affinity>(3, SvcAffinity { timeout_s: 600, _pad: 0 }),
            "set svc 3 session affinity (600 s)",
        ),
        (Op::remove::<Affinity>(3), "remove svc 3 session affinity"),
    ];
    for (op, line) in &lines {
        assert_eq!(op.to_string(), *line);
    }
}

// ---- apply_plan --------------------------------------------------------------------------------

#[test]
fn a_failed_set_keeps_its_frontend_out() {
    let desired = one_service();
    let mut model = DatapathState::default();
    let ops = plan(&model, &desired, true);
    let mut w = Failing {
        inner: &mut model,
        fail: |op| matches!(op, Op::ReplaceSet { key, .. } if key.lane == GRAY),
    };
    let report = apply_plan(&mut w, &ops);
    assert_eq!(report.failed.len(), 1);
    assert!(matches!(report.failed[0].1, Error::MapFull { .. }));
    assert_eq!(report.skipped, vec![Op::UpsertFrontend { key: fk(1), service: svc(1), previous: None }]);
    assert_eq!(report.applied, 3, "the lane policy, the other set and the pod are independent");
    assert!(model.frontends.is_empty());
    assert!(model.pods.contains_key(&100));
    // The next reconcile retries what was left out.
    let ops = plan(&model, &desired, true);
    assert!(apply_plan(&mut model, &ops).is_complete());
    assert_eq!(model, desired);
}

#[test]
fn a_failed_lane_policy_keeps_its_pods_out() {
    let desired = one_service();
    let mut model = DatapathState::default();
    let ops = plan(&model, &desired, true);
    let mut w =
        Failing { inner: &mut model, fail: |op| matches!(op, Op::Table(TableOp::Lanes(Write::Put(..)))) };
    let report = apply_plan(&mut w, &ops);
    assert_eq!(report.skipped, vec![Op::put::<Pods>(100, PodEntry { lane: GRAY, level: 4 })]);
    assert_eq!(model.frontends.len(), 1, "Services do not depend on lane policies");
}

#[test]
fn a_failed_entry_that_the_flags_point_at_keeps_its_frontend_out() {
    type Matches = fn(&Op) -> bool;
    let mut desired = one_service();
    let warm = WarmKey { svc_id: 1, port: 8080u16.to_be(), _pad: 0, addr: [0, 0, 0, 1] };
    desired.shaping.insert(1, SvcShaping { flags: 1, canary_lane: GRAY, canary_bp: 250, _pad: 0 });
    desired.routes.insert(RouteKey { svc_id: 1, caller_lane: GRAY }, chain(&[0], 0));
    desired.affinity.insert(1, SvcAffinity { timeout_s: 600, _pad: 0 });
    desired.warm.insert(warm, WarmEntry { warmup_ns: 1_000_000, ..WarmEntry::default() });
    let ops = plan(&DatapathState::default(), &desired, true);
    let upsert = Op::UpsertFrontend { key: fk(1), service: svc(1), previous: None };
    let failing: [(&str, Matches, bool); 4] = [
        ("shaping", |op| matches!(op, Op::Table(TableOp::Shaping(Write::Put(..)))), true),
        ("route", |op| matches!(op, Op::Table(TableOp::Routes(Write::Put(..)))), true),
        ("affinity", |op| matches!(op, Op::Table(TableOp::Affinity(Write::Put(..)))), true),
        ("warm-up", |op| matches!(op, Op::Table(TableOp::Warm(Write::Put(..)))), false),
    ];
    for (what, fail, blocks) in failing {
        let mut model = DatapathState::default();
        let report = apply_plan(&mut Failing { inner: &mut model, fail }, &ops);
        assert_eq!(report.failed.len(), 1, "{what}");
        assert_eq!(report.skipped.contains(&upsert), blocks, "{what}");
        assert_eq!(model.frontends.is_empty(), blocks, "{what}");
    }
}

#[test]
fn a_failed_frontend_removal_keeps_its_sets() {
    let mut model = one_service();
    let ops = plan(&model, &DatapathState::default(), true);
    let mut w = Failing { inner: &mut model, fail: |op| matches!(op, Op::RemoveFrontend { .. }) };
    let report = apply_plan(&mut w, &ops);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.skipped.len(), 2);
    assert!(report.skipped.iter().all(|op| matches!(op, Op::RemoveSet { .. })));
    assert_eq!(model.sets.len(), 2, "the frontend still serves from them");
    assert!(model.lanes.is_empty() && model.pods.is_empty());
}

#[test]
fn a_failed_id_change_keeps_the_old_sets() {
    // The frontend moves from svc 1 to svc 7 (only an unseeded id allocator would do that).
    let current = one_service();
    let mut desired = current.clone();
    desired.frontends.insert(fk(1), svc(7));
    desired.sets = desired.sets.into_iter().map(|(k, v)| (SetKey { svc_id: 7, ..k }, v)).collect();
    let ops = plan(&current, &desired, true);
    let mut model = current.clone();
    let mut w = Failing { inner: &mut model, fail: |op| matches!(op, Op::UpsertFrontend { .. }) };
    let report = apply_plan(&mut w, &ops);
    assert_eq!(report.skipped.len(), 2, "svc 1's sets stay: the frontend still points at them");
    assert_eq!(model.frontends[&fk(1)], svc(1));
    assert_eq!(model.sets.len(), 4);
    let ops = plan(&model, &desired, true);
    assert!(apply_plan(&mut model, &ops).is_complete());
    assert_eq!(model, desired);
}

#[test]
fn leftover_sets_are_cleared_before_the_frontend_appears() {
    // A pass wrote svc 1's base set, then failed to upsert its frontend; since then the backend
    // moved to gray. Without pruning, the frontend must still not appear with the stale base set.
    let mut desired = one_service();
    let mut model = DatapathState::default();
    let ops = plan(&model, &desired, false);
    let report = apply_plan(
        &mut Failing { inner: &mut model, fail: |op| matches!(op, Op::UpsertFrontend { .. }) },
        &ops,
    );
    assert_eq!(report.failed.len(), 1);
    desired.sets.remove(&SetKey { svc_id: 1, lane: 0 });
    let ops = plan(&model, &desired, false);
    assert_eq!(
        ops,
        vec![
            Op::RemoveSet { key: SetKey { svc_id: 1, lane: 0 } },
            Op::UpsertFrontend { key: fk(1), service: svc(1), previous: None },
        ]
    );
    // If the clearing fails, the frontend stays out.
    let mut failing = model.clone();
    let report =
        apply_plan(&mut Failing { inner: &mut failing, fail: |op| matches!(op, Op::RemoveSet { .. }) }, &ops);
    assert_eq!(report.skipped.len(), 1);
    assert!(failing.frontends.is_empty());
    assert!(apply_plan(&mut model, &ops).is_complete());
    assert_eq!(model, desired);
    // A frontend that is already live keeps its sets until a prune (they may be only
    // temporarily missing from an incomplete list).
    desired.sets.remove(&SetKey { svc_id: 1, lane: GRAY });
    assert!(plan(&model, &desired, false).is_empty());
}

#[test]
fn the_model_enforces_the_maps_rules() {
    let mut m = DatapathState::default();
    assert!(matches!(
        m.apply(&Op::put::<Lanes>(0, chain(&[], 0))),
        Err(Error::Invalid { what: "lane policy", .. })
    ));
    let mut too_long = chain(&[], 0);
    too_long.chain_len = 9;
    assert!(m.apply(&Op::put::<Lanes>(5, too_long)).is_err());
    assert!(m.apply(&Op::put::<Pods>(1, PodEntry { lane: 0, level: 0 })).is_err());
    assert!(m.apply(&Op::put::<Pods>(1, PodEntry { lane: 0, level: 33 })).is_err());
    for lane in 1..=MAX_LANES {
        m.apply(&Op::put::<Lanes>(lane, chain(&[0], 0))).unwrap();
    }
    assert!(matches!(
        m.apply(&Op::put::<Lanes>(MAX_LANES + 1, chain(&[0], 0))),
        Err(Error::MapFull { map: MAP_LANES, .. })
    ));
    m.apply(&Op::put::<Lanes>(1, chain(&[], LANE_F_STRICT))).unwrap();
    // Removing what is absent is fine, as with the maps.
    m.apply(&Op::RemoveSet { key: SetKey { svc_id: 9, lane: 9 } }).unwrap();
    m.apply(&Op::remove::<Pods>(9)).unwrap();
}

#[test]
fn frontend_ids_from_the_maps() {
    let mut state = one_service();
    state.sets.insert(SetKey { svc_id: 40, lane: 0 }, vec![be(1)]); // an orphan
    let mut ids = state.frontend_ids();
    assert_eq!(ids.get(&fk(1)), Some(1));
    assert_eq!(ids.get_or_allocate(&fk(2)), 41);
}

// ---- property tests: random cluster histories --------------------------------------------------

const NAMESPACES: [&str; 2] = ["a", "b"];
const SERVICES: [(&str, &str); 4] = [("a", "s0"), ("a", "s1"), ("b", "s0"), ("b", "s2")];
const SVC_PORTS: [(&str, i32, &str); 4] =
    [("http", 80, "TCP"), ("dns", 53, "UDP"), ("grpc", 9000, "TCP"), ("x", 7, "SCTP")];
const SLICE_PORTS: [(&str, i32, &str); 3] =
    [("http", 8080, "TCP"), ("dns", 5353, "UDP"), ("grpc", 9001, "TCP")];
const LANE_VALUES: [Option<&str>; 6] =
    [None, Some(""), Some("gray"), Some("blue"), Some("feature-x"), Some("bad!")];
const LANE_CONFIGS: [&str; 4] = [
    "",
    "lanes:\n  gray: {}\n",
    "lanes:\n  gray: {}\n  feature-x:\n    fallback: [gray, base]\n  blue:\n    strict: true\n",
    "lanes:\n  feature-x:\n    fallback: [blue]\n  blue:\n    fallback: [gray, base]\n",
];

#[derive(Clone, Debug)]
enum ClusterIps {
    V4(u8),
    V6(u8),
    Dual(u8),
    Headless,
    Missing,
}

#[derive(Clone, Debug)]
struct EndpointSpec {
    ip: u8,
    ready: Option<bool>,
    terminating: Option<bool>,
    pod: Option<u8>,
}

#[derive(Clone, Debug)]
enum Event {
    UpsertService {
        svc: usize,
        ips: ClusterIps,
        ports: u8,
        strict: Option<&'static str>,
        affinity: Option<i32>,
    },
    DeleteService {
        svc: usize,
    },
    UpsertSlice {
        svc: usize,
        slice: u8,
        address_type: &'static str,
        ports: u8,
        endpoints: Vec<EndpointSpec>,
    },
    DeleteSlice {
        svc: usize,
        slice: u8,
    },
    LabelPod {
        ns: usize,
        pod: u8,
        lane: Option<&'static str>,
    },
    DeletePod {
        ns: usize,
        pod: u8,
    },
    SetLanes {
        config: usize,
    },
}

fn cluster_ips() -> impl Strategy<Value = ClusterIps> {
    prop_oneof![
        4 => (0u8..3).prop_map(ClusterIps::V4),
        1 => (0u8..3).prop_map(ClusterIps::V6),
        2 => (0u8..3).prop_map(ClusterIps::Dual),
        1 => Just(ClusterIps::Headless),
        1 => Just(ClusterIps::Missing),
    ]
}

fn endpoint_spec() -> impl Strategy<Value = EndpointSpec> {
    (
        0u8..8,
        prop_oneof![2 => Just(None), 2 => Just(Some(true)), 1 => Just(Some(false))],
        prop_oneof![3 => Just(None), 1 => Just(Some(false)), 1 => Just(Some(true))],
        proptest::option::weighted(0.8, 0u8..6),
    )
        .prop_map(|(ip, ready, terminating, pod)| EndpointSpec { ip, ready, terminating, pod })
}

/// A subset of a port list, usually with the first port (`http`), so that Services and slices
/// mostly have a port in common.
fn port_mask(below: u8) -> impl Strategy<Value = u8> {
    (0..below, proptest::bool::weighted(0.8)).prop_map(|(mask, http)| mask | u8::from(http))
}

fn event() -> impl Strategy<Value = Event> {
    let svc = 0..SERVICES.len();
    prop_oneof![
        3 => (
            svc.clone(),
            cluster_ips(),
            port_mask(16),
            proptest::sample::select(vec![None, Some("true"), Some("false"), Some("bogus")]),
            // sessionAffinity: ClientIP with this timeout (None: no affinity; -1: out of range).
            proptest::sample::select(vec![None, Some(60), Some(10_800), Some(-1)]),
        )
            .prop_map(|(svc, ips, ports, strict, affinity)| Event::UpsertService { svc, ips, ports, strict, affinity }),
        1 => svc.clone().prop_map(|svc| Event::DeleteService { svc }),
        6 => (
            svc.clone(),
            0u8..2,
            prop_oneof![8 => Just("IPv4"), 3 => Just("IPv6"), 1 => Just("FQDN")],
            port_mask(8),
            proptest::collection::vec(endpoint_spec(), 0..6),
        )
            .prop_map(|(svc, slice, address_type, ports, endpoints)| Event::UpsertSlice {
                svc,
                slice,
                address_type,
                ports,
                endpoints
            }),
        1 => (svc, 0u8..2).prop_map(|(svc, slice)| Event::DeleteSlice { svc, slice }),
        4 => (0..NAMESPACES.len(), 0u8..6, proptest::sample::select(LANE_VALUES.to_vec()))
            .prop_map(|(ns, pod, lane)| Event::LabelPod { ns, pod, lane }),
        1 => (0..NAMESPACES.len(), 0u8..6).prop_map(|(ns, pod)| Event::DeletePod { ns, pod }),
        1 => (0..LANE_CONFIGS.len()).prop_map(|config| Event::SetLanes { config }),
    ]
}

/// The world the agent watches, as the random events leave it.
#[derive(Default)]
struct World {
    cluster: ClusterState,
    lanes: LaneSettings,
}

impl World {
    /// Applies an event; returns the changes a source reports for it.
    fn apply(&mut self, event: &Event) -> Vec<Change> {
        match event {
            Event::UpsertService { svc, ips, ports, strict, affinity } => {
                let (ns, name) = SERVICES[*svc];
                let ips: Vec<String> = match ips {
                    ClusterIps::V4(i) => vec![format!("10.96.0.{i}")],
                    ClusterIps::V6(i) => vec![format!("fd00:96::{i}")],
                    ClusterIps::Dual(i) => vec![format!("10.96.0.{i}"), format!("fd00:96::{i}")],
                    ClusterIps::Headless => vec!["None".into()],
                    ClusterIps::Missing => vec![],
                };
                let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
                let ports: Vec<_> = pick(&SVC_PORTS, *ports);
                let (r, mut s) = service(ns, name, &ips, &ports);
                s.metadata.annotations =
                    strict.map(|v| BTreeMap::from([("tagger.io/strict".to_owned(), v.to_owned())]));
                if let (Some(timeout), Some(spec)) = (affinity, s.spec.as_mut()) {
                    spec.session_affinity = Some("ClientIP".to_owned());
                    spec.session_affinity_config = Some(SessionAffinityConfig {
                        client_ip: Some(ClientIPConfig { timeout_seconds: Some(*timeout) }),
                    });
                }
                let input = ServiceInput::new(&r, &s);
                self.cluster.services.insert(r.clone(), s);
                vec![Change::Applied(Object::Service(r, input))]
            }
            Event::DeleteService { svc } => {
                let (ns, name) = SERVICES[*svc];
                self.cluster.services.remove(&ObjectRef::new(ns, name));
                vec![Change::Deleted(Kind::Service, ObjectRef::new(ns, name))]
            }
            Event::UpsertSlice { svc, slice: j, address_type, ports, endpoints } => {
                let (ns, name) = SERVICES[*svc];
                let eps: Vec<Endpoint> = endpoints
                    .iter()
                    .map(|e| {
                        let ip = if *address_type == "IPv6" {
                            format!("fd00::{}", e.ip)
                        } else {
                            format!("10.0.0.{}", e.ip)
                        };
                        let mut ep = endpoint(&ip, e.pod.map(|p| format!("p{p}")).as_deref());
                        ep.conditions = Some(EndpointConditions {
                            ready: e.ready,
                            terminating: e.terminating,
                            serving: None,
                        });
                        ep
                    })
                    .collect();
                let (r, s) =
                    slice(ns, &format!("{name}-{j}"), name, address_type, &pick(&SLICE_PORTS, *ports), eps);
                let input = SliceInput::new(&r, &s);
                self.cluster.slices.insert(r.clone(), s);
                vec![Change::Applied(Object::Slice(r, input))]
            }
            Event::DeleteSlice { svc, slice: j } => {
                let (ns, name) = SERVICES[*svc];
                let r = ObjectRef::new(ns, format!("{name}-{j}"));
                self.cluster.slices.remove(&r);
                vec![Change::Deleted(Kind::Slice, r)]
            }
            Event::LabelPod { ns, pod, lane } => {
                let labels: BTreeMap<String, String> =
                    lane.iter().map(|l| ("tagger.io/lane".to_owned(), (*l).to_owned())).collect();
                let r = ObjectRef::new(NAMESPACES[*ns], format!("p{pod}"));
                self.cluster.pod_labels.insert(r.clone(), labels.clone());
                let mut changes = vec![Change::Applied(Object::Pod(r.clone(), labels.clone()))];
                if let Some(local) = local_pod(&r, &labels) {
                    changes.push(Change::Applied(Object::LocalPod(local)));
                }
                changes
            }
            Event::DeletePod { ns, pod } => {
                let r = ObjectRef::new(NAMESPACES[*ns], format!("p{pod}"));
                self.cluster.pod_labels.remove(&r);
                let mut changes = vec![Change::Deleted(Kind::Pod, r.clone())];
                if r.namespace == "a" {
                    changes.push(Change::Deleted(Kind::LocalPod, r));
                }
                changes
            }
            Event::SetLanes { config } => {
                self.lanes = LaneSettings::of(&LanesConfig::parse(LANE_CONFIGS[*config]).unwrap());
                Vec::new()
            }
        }
    }

    /// A complete list of one kind, as a source reports it.
    fn list(&self, kind: Kind) -> Vec<Change> {
        let objects: Vec<Object> = match kind {
            Kind::LocalPod => self
                .cluster
                .pod_labels
                .iter()
                .filter_map(|(r, labels)| local_pod(r, labels).map(Object::LocalPod))
                .collect(),
            Kind::Pod => self
                .cluster
                .pod_labels
                .iter()
                .map(|(r, labels)| Object::Pod(r.clone(), labels.clone()))
                .collect(),
            Kind::Service => self
                .cluster
                .services
                .iter()
                .map(|(r, s)| Object::Service(r.clone(), ServiceInput::new(r, s)))
                .collect(),
            Kind::Slice => self
                .cluster
                .slices
                .iter()
                .map(|(r, s)| Object::Slice(r.clone(), SliceInput::new(r, s)))
                .collect(),
            // The reference cluster has no Node object: this node's zone stays unknown.
            Kind::Node => Vec::new(),
        };
        Change::list(kind, objects).collect()
    }

    /// The local pods: namespace a's pods (this node runs them).
    fn local_pods(&self) -> Vec<LocalPod> {
        self.cluster.pod_labels.iter().filter_map(|(r, labels)| local_pod(r, labels)).collect()
    }

    /// The full computation, from scratch: the desired datapath and its warning counts.
    fn full(
        &self,
        ids: &mut FrontendIds,
        limits: &Limits,
    ) -> (DatapathState, DesiredServices, BTreeMap<WarningKind, u64>) {
        let keys = default_lane_keys();
        let services = desired_services_within(&self.cluster, &keys, ids, limits);
        let local = self.local_pods();
        let pods = desired_pods(&local, &keys);
        let (entries, pending) = pod_entries(&pods, test_cgroup);
        assert!(pending.iter().all(|p| p.pod.name == "p5"));
        let mut warnings = services.warnings.clone();
        warnings.merge(pods.warnings.clone());
        let counts = warnings.counts().clone();
        (desired_state(entries, &services, &self.lanes), services, counts)
    }

    /// The desired datapath. The local pods are namespace a's pods (this node runs them),
    /// each with a kubelet-style cgroup.
    fn desired(&self, ids: &mut FrontendIds) -> DatapathState {
        self.full(ids, &Limits::DATAPATH).0
    }
}

/// The local pod of a namespace a pod.
fn local_pod(r: &ObjectRef, labels: &BTreeMap<String, String>) -> Option<LocalPod> {
    (r.namespace == "a").then(|| LocalPod {
        uid: format!("uid-{}", r.name),
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        labels: labels.clone(),
        qos: QosClass::Burstable,
        ips: Vec::new(),
    })
}

/// A local pod's kubelet-style cgroup; pod 5's never appears (it stays pending).
fn test_cgroup(p: &DesiredPod) -> Option<CgroupRef> {
    let n: u64 = p.pod.name[1..].parse().unwrap();
    (n != 5).then(|| CgroupRef {
        path: PathBuf::from("/c"),
        id: 1000 + n,
        level: 3 + u32::from(n.is_multiple_of(2)),
    })
}

fn pick<T: Copy>(all: &[T], mask: u8) -> Vec<T> {
    all.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, t)| *t).collect()
}

/// Wraps the model and checks, before each op, that the op is needed and safe at that moment.
struct Checker<'a> {
    state: &'a mut DatapathState,
    desired: &'a DatapathState,
    seen: BTreeSet<String>,
}

impl DatapathWriter for Checker<'_> {
    fn apply(&mut self, op: &Op) -> Result<(), Error> {
        let (state, desired) = (&*self.state, self.desired);
        // Each map entry is written at most once per plan.
        let target = match op {
            Op::ReplaceSet { key, .. } | Op::RemoveSet { key } => format!("set {key:?}"),
            Op::UpsertFrontend { key, .. } | Op::RemoveFrontend { key, .. } => format!("frontend {key:?}"),
            Op::SetConfigFlags { .. } => "config".to_owned(),
            Op::Table(op) => op.any().target(),
        };
        assert!(self.seen.insert(target), "{op} written twice");
        match op {
            Op::ReplaceSet { key, backends } => {
                assert!(!state.sets.get(key).is_some_and(|c| same_members(c, backends)), "no-op {op}");
            }
            Op::UpsertFrontend { key, service, previous } => {
                assert_eq!(state.frontends.get(key), previous.as_ref(), "{op}: stale previous");
                assert_ne!(previous.as_ref(), Some(service), "no-op {op}");
                // Every set the frontend should have is in place before it appears.
                for (k, v) in desired.sets.range(
                    SetKey { svc_id: service.svc_id, lane: 0 }..=SetKey {
                        svc_id: service.svc_id,
                        lane: u32::MAX,
                    },
                ) {
                    assert!(
                        state.sets.get(k).is_some_and(|c| same_members(c, v)),
                        "{op} before its set {k:?}"
                    );
                }
                // A new id carries no leftover set of another frontend.
                if previous.is_none_or(|p| p.svc_id != service.svc_id) {
                    for k in state.sets.keys().filter(|k| k.svc_id == service.svc_id) {
                        assert!(desired.sets.contains_key(k), "{op} would inherit the leftover set {k:?}");
                    }
                }
            }
            Op::RemoveSet { key } => {
                assert!(state.sets.contains_key(key), "no-op {op}");
                let used = state.frontends.values().any(|s| s.svc_id == key.svc_id);
                let still_wanted = desired.frontends.values().any(|s| s.svc_id == key.svc_id);
                assert!(!used || still_wanted, "{op} while its frontend is still there");
            }
            Op::RemoveFrontend { key, previous } => assert_eq!(state.frontends.get(key), Some(previous)),
            Op::SetConfigFlags { flags } => assert_ne!(state.config_flags, *flags, "no-op {op}"),
            Op::Table(table_op) => {
                assert!(table_op.any().changes(state), "no-op {op}");
                if let TableOp::Pods(Write::Put(_, entry)) = table_op
                    && let Some(policy) = desired.lanes.get(&entry.lane)
                {
                    assert_eq!(state.lanes.get(&entry.lane), Some(policy), "{op} before its lane policy");
                }
            }
        }
        self.state.apply(op)
    }
}

/// Plans and applies one step through the checker; returns the ops.
fn step(
    model: &mut DatapathState,
    desired: &DatapathState,
    prune: bool,
    fail: &[bool],
) -> (Vec<Op>, ApplyReport) {
    let ops = plan(model, desired, prune);
    assert_phase_order(model, &ops);
    if !prune {
        assert!(
            ops.iter().all(|op| match op {
                Op::RemoveSet { key } => is_clearing(*key, model, &ops),
                op => !op.is_removal(),
            }),
            "prune=false removed something visible: {ops:#?}"
        );
    }
    let mut checker = Checker { state: model, desired, seen: BTreeSet::new() };
    let mut i = 0;
    let mut failing = Failing {
        inner: &mut checker,
        fail: |_: &Op| {
            i += 1;
            fail.get(i - 1).copied().unwrap_or(false)
        },
    };
    let report = apply_plan(&mut failing, &ops);
    (ops, report)
}

fn assert_converged(model: &DatapathState, desired: &DatapathState, prune: bool, before: &DatapathState) {
    if prune {
        assert!(model.equivalent(desired), "model {model:#?}\n!= desired {desired:#?}");
        return;
    }
    // Without pruning: everything desired is there, and nothing else changed.
    for (k, v) in &desired.pods {
        assert_eq!(model.pods.get(k), Some(v));
    }
    for (k, v) in &desired.frontends {
        assert_eq!(model.frontends.get(k), Some(v));
    }
    for (k, v) in &desired.lanes {
        assert_eq!(model.lanes.get(k), Some(v));
    }
    for (k, v) in &desired.sets {
        assert!(model.sets.get(k).is_some_and(|m| same_members(m, v)));
    }
    for (k, v) in &before.pods {
        assert!(
            desired.pods.contains_key(k) || model.pods.get(k) == Some(v),
            "pod {k} removed without prune"
        );
    }
    for (k, v) in &before.frontends {
        assert!(desired.frontends.contains_key(k) || model.frontends.get(k) == Some(v));
    }
    for (k, v) in &before.sets {
        assert!(desired.sets.contains_key(k) || model.sets.get(k) == Some(v));
    }
    for (k, v) in &before.lanes {
        assert!(desired.lanes.contains_key(k) || model.lanes.get(k) == Some(v));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::model::testing::fuzz::cases(256), ..ProptestConfig::default() })]

    /// desired → plan → apply, from the previous state, always lands exactly on desired (or,
    /// without pruning, on desired plus what was already there), in a safe order.
    #[test]
    fn the_model_follows_the_cluster(steps in proptest::collection::vec((event(), proptest::bool::weighted(0.75)), 1..60)) {
        let mut world = World::default();
        let mut ids = FrontendIds::new();
        let mut model = DatapathState::default();
        for (event, prune) in &steps {
            world.apply(event);
            let desired = world.desired(&mut ids);
            let before = model.clone();
            let (_, report) = step(&mut model, &desired, *prune, &[]);
            prop_assert!(report.is_complete(), "{report:?}");
            assert_converged(&model, &desired, *prune, &before);
            prop_assert!(plan(&model, &desired, *prune).is_empty(), "not minimal: a second pass writes");
            if *prune {
                ids.retain(|k, _| desired.frontends.contains_key(k));
            }
        }
        // A complete relist at the end prunes whatever was left.
        let desired = world.desired(&mut ids);
        let before = model.clone();
        step(&mut model, &desired, true, &[]);
        assert_converged(&model, &desired, true, &before);
    }

    /// With writes failing at random, every applied op is still safe (the checker), and a
    /// clean pass afterwards converges.
    #[test]
    fn failures_never_expose_a_partial_service(
        steps in proptest::collection::vec(
            (event(), proptest::bool::weighted(0.75), proptest::collection::vec(proptest::bool::weighted(0.2), 0..40)),
            1..25,
        )
    ) {
        let mut world = World::default();
        let mut ids = FrontendIds::new();
        let mut model = DatapathState::default();
        for (event, prune, fail) in &steps {
            world.apply(event);
            let desired = world.desired(&mut ids);
            let (ops, report) = step(&mut model, &desired, *prune, fail);
            prop_assert_eq!(report.applied + report.failed.len() + report.skipped.len(), ops.len());
            // A restarted agent would seed its ids from the maps; this one keeps its own, and
            // only releases them once the removals went through.
            if *prune && report.is_complete() {
                ids.retain(|k, _| desired.frontends.contains_key(k));
            }
        }
        let desired = world.desired(&mut ids);
        let before = model.clone();
        let (_, report) = step(&mut model, &desired, true, &[]);
        prop_assert!(report.is_complete());
        assert_converged(&model, &desired, true, &before);
    }

    /// An agent restarted mid-history adopts the maps: ids seeded from them stay the same, and
    /// its first plan (before the initial list completes) removes nothing.
    #[test]
    fn a_restart_adopts_the_maps(
        before in proptest::collection::vec(event(), 1..25),
        after in proptest::collection::vec(event(), 0..10),
    ) {
        let mut world = World::default();
        let mut ids = FrontendIds::new();
        let mut model = DatapathState::default();
        for event in &before {
            world.apply(event);
            let desired = world.desired(&mut ids);
            step(&mut model, &desired, true, &[]);
            ids.retain(|k, _| desired.frontends.contains_key(k));
        }
        // Restart: nothing survives but the maps.
        let mut ids = model.frontend_ids();
        let desired = world.desired(&mut ids);
        prop_assert!(plan(&model, &desired, false).is_empty(), "an unchanged cluster needs no write after a restart");
        for event in &after {
            world.apply(event);
        }
        let desired = world.desired(&mut ids);
        let snapshot = model.clone();
        step(&mut model, &desired, false, &[]);
        assert_converged(&model, &desired, false, &snapshot);
        step(&mut model, &desired, true, &[]);
        assert_converged(&model, &desired, true, &snapshot);
    }
}

// ---- the incremental model against the full computation ---------------------------------------

/// A state with svc_ids replaced by the frontends they stand for (ids are allocated in another
/// order incrementally): frontend → flags, (frontend, lane) → backends, pods, lanes.
type Canonical = (
    BTreeMap<FrontendKey, u32>,
    BTreeMap<(FrontendKey, u32), BTreeSet<Backend>>,
    BTreeMap<u64, PodEntry>,
    BTreeMap<u32, LanePolicy>,
);

fn canonical(s: &DatapathState) -> Canonical {
    let key_of: BTreeMap<u32, FrontendKey> = s.frontends.iter().map(|(k, v)| (v.svc_id, *k)).collect();
    assert_eq!(key_of.len(), s.frontends.len(), "svc_ids are unique: {s:#?}");
    let sets = s
        .sets
        .iter()
        .map(|(k, v)| {
            let frontend = *key_of.get(&k.svc_id).unwrap_or_else(|| panic!("set {k:?} without its frontend"));
            ((frontend, k.lane), v.iter().copied().collect())
        })
        .collect();
    (s.frontends.iter().map(|(k, v)| (*k, v.flags)).collect(), sets, s.pods.clone(), s.lanes.clone())
}

fn canonical_origins(
    s: &DatapathState,
    origins: &BTreeMap<u32, FrontendOrigin>,
) -> BTreeMap<FrontendKey, FrontendOrigin> {
    assert_eq!(origins.len(), s.frontends.len(), "an origin per frontend, no stale one");
    s.frontends.iter().map(|(k, v)| (*k, origins[&v.svc_id].clone())).collect()
}

fn recheck() -> impl Strategy<Value = Recheck> {
    prop_oneof![6 => Just(Recheck::None), 1 => Just(Recheck::Pending), 1 => Just(Recheck::All)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::model::testing::fuzz::cases(256), ..ProptestConfig::default() })]

    /// The incremental model, fed the changes a source reports (events, bursts of them, and
    /// relists), always desires what the full computation from the whole cluster desires (up to
    /// svc_ids), with the same warning counts; the plan over its scope alone converges the maps
    /// (a full plan finds nothing left), in a safe order; and svc_ids stay stable.
    #[test]
    fn incremental_matches_full(
        initial in proptest::collection::vec(event(), 0..20),
        steps in proptest::collection::vec(
            (
                proptest::collection::vec(event(), 1..4),
                proptest::option::weighted(0.15, proptest::sample::select(Kind::ALL.to_vec())),
                recheck(),
            ),
            1..40,
        ),
        small in proptest::bool::weighted(0.3),
    ) {
        let limits = if small {
            Limits { frontends: 5, sets: 6, backends: 9, set_size: 3 }
        } else {
            Limits::DATAPATH
        };
        let mut world = World::default();
        for e in &initial {
            world.apply(e);
        }
        let mut inc = Incremental::new(FrontendIds::new(), default_lane_keys(), limits);
        for kind in Kind::REQUIRED {
            prop_assert!(!inc.is_complete(), "complete before every kind was listed");
            inc.apply(world.list(kind));
        }
        prop_assert!(inc.is_complete());
        let mut mirror = Mirror::new(DatapathState::default());
        let mut ids_before: BTreeMap<FrontendKey, u32> = BTreeMap::new();
        let first = (Vec::new(), None, Recheck::None);
        for (i, (events, relist, recheck)) in std::iter::once(&first).chain(&steps).enumerate() {
            let mut changes = Vec::new();
            for e in events {
                changes.extend(world.apply(e));
            }
            if let Some(kind) = relist {
                changes.extend(world.list(*kind));
            }
            inc.apply(changes);
            let update = inc.update(&world.lanes, *recheck, test_cgroup);
            prop_assert_eq!(update.full, i == 0);
            let desired = inc.desired_state();
            let scope =
                if update.full { Scope::all(mirror.state(), inc.desired()) } else { update.scope.clone() };
            let ops = mirror.plan(inc.desired(), &scope, true);
            assert_phase_order(mirror.state(), &ops);
            let mut checked = mirror.state().clone();
            let report =
                apply_plan(&mut Checker { state: &mut checked, desired: &desired, seen: BTreeSet::new() }, &ops);
            prop_assert!(report.is_complete(), "{report:?}");
            prop_assert!(apply_plan(&mut mirror, &ops).is_complete());
            prop_assert_eq!(&checked, mirror.state());
            prop_assert!(mirror.state().equivalent(&desired), "not converged");
            let rest = plan(mirror.state(), &desired, true);
            prop_assert!(rest.is_empty(), "the scoped plan left {rest:#?}");
            if update.full {
                inc.retain_ids();
            }

            let (full, full_services, full_counts) = world.full(&mut FrontendIds::new(), &limits);
            prop_assert_eq!(canonical(&desired), canonical(&full));
            prop_assert_eq!(
                canonical_origins(&desired, inc.origins()),
                canonical_origins(&full, &full_services.origins)
            );
            prop_assert_eq!(inc.warning_counts(), full_counts);
            let p5 = world.cluster.pod_labels.contains_key(&ObjectRef::new("a", "p5"));
            prop_assert_eq!(inc.pending_pods(), usize::from(p5));

            // A frontend keeps its svc_id while it is desired; ids are only held for desired
            // frontends.
            let ids_now: BTreeMap<FrontendKey, u32> =
                desired.frontends.iter().map(|(k, s)| (*k, s.svc_id)).collect();
            for (k, id) in &ids_now {
                if let Some(before) = ids_before.get(k) {
                    prop_assert_eq!(before, id, "svc_id of {:?} changed", k);
                }
                prop_assert_eq!(inc.ids().get(k), Some(*id));
            }
            prop_assert_eq!(inc.ids().len(), ids_now.len());
            ids_before = ids_now;
        }
    }
}
