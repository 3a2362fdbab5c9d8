//! Lane steering on the real kernel: which backend lane a caller's new connections reach.

use std::net::SocketAddr;

use tagger::net::Proto;
use tagger_common::{LANE_F_STRICT, SVC_F_STRICT};
use tagger_tests::{
    client::{Attempt, Mode},
    scenario::{Sandbox, replies},
};

const VIP: &str = "10.96.0.10:80";
const N: usize = 40;

fn vip() -> SocketAddr {
    VIP.parse().unwrap()
}

/// Names of the replies, sorted (for assertions on sets of backends).
fn names(attempts: &[Attempt]) -> Vec<String> {
    replies(attempts).into_keys().collect()
}

#[test]
fn gray_caller_reaches_gray_backends_and_base_caller_only_base() {
    let mut sb = Sandbox::new();
    let (base1, _) = sb.backend("a-base-1");
    let (base2, _) = sb.backend("a-base-2");
    let (gray1, _) = sb.backend("a-gray-1");
    let (gray2, _) = sb.backend("a-gray-2");
    sb.service(vip(), Proto::Tcp, 1, 0, &[("base", &[base1, base2]), ("gray", &[gray1, gray2])]);
    let gray = sb.caller("gw-gray", Some("gray"));
    let base = sb.caller("gw-base", Some("base"));

    let g = sb.call(&gray, Mode::Tcp, vip(), N);
    assert_eq!(names(&g), ["a-gray-1", "a-gray-2"], "gray caller: {:?}", replies(&g));
    let b = sb.call(&base, Mode::Tcp, vip(), N);
    assert_eq!(names(&b), ["a-base-1", "a-base-2"], "base caller: {:?}", replies(&b));
    let c = sb.dp.dp.tables().counters().unwrap();
    assert!(c.get(tagger_common::Outcome::Steered) >= (2 * N) as u64, "{c:?}");
}

#[test]
fn gray_caller_falls_back_to_base_when_the_service_has_no_gray_backends() {
    let mut sb = Sandbox::new();
    let (base1, _) = sb.backend("b-base-1");
    sb.service(vip(), Proto::Tcp, 1, 0, &[("base", &[base1]), ("gray", &[])]);
    let gray = sb.caller("gw-gray", Some("gray"));
    let g = sb.call(&gray, Mode::Tcp, vip(), N);
    assert_eq!(names(&g), ["b-base-1"]);
    let c = sb.dp.dp.tables().counters().unwrap();
    assert_eq!(c.get(tagger_common::Outcome::FellBack), N as u64, "{c:?}");
}

#[test]
fn two_step_chain_feature_x_then_gray_then_base() {
    let mut sb = Sandbox::new();
    let (base1, _) = sb.backend("c-base");
    let (gray1, _) = sb.backend("c-gray");
    sb.lane_policy("feature-x", &["gray", "base"], 0);
    sb.service(vip(), Proto::Tcp, 1, 0, &[("base", &[base1]), ("gray", &[gray1])]);
    let fx = sb.caller("fx", Some("feature-x"));
    assert_eq!(names(&sb.call(&fx, Mode::Tcp, vip(), N)), ["c-gray"], "first step: gray");
    // The gray lane loses its backends: the chain's next step, base.
    sb.dp.dp.tables_mut().replace_backends(1, tagger_common::lane_id("gray"), &[]).unwrap();
    assert_eq!(names(&sb.call(&fx, Mode::Tcp, vip(), N)), ["c-base"], "second step: base");
}

#[test]
fn strict_lane_without_backend_fails_connect_with_eperm() {
    let mut sb = Sandbox::new();
    let (base1, _) = sb.backend("d-base");
    sb.lane_policy("gray", &["base"], LANE_F_STRICT);
    sb.service(vip(), Proto::Tcp, 1, 0, &[("base", &[base1])]);
    let gray = sb.caller("gray", Some("gray"));
    for a in sb.call(&gray, Mode::Tcp, vip(), 5) {
        assert!(matches!(a, Attempt::Err { errno: libc::EPERM, .. }), "{a:?}");
    }
    // A strict Service refuses the same way for a non-strict lane.
    let vip2: SocketAddr = "10.96.0.11:80".parse().unwrap();
    sb.service(vip2, Proto::Tcp, 2, SVC_F_STRICT, &[("base", &[base1])]);
    let canary = sb.caller("canary", Some("canary"));
    for a in sb.call(&canary, Mode::Tcp, vip2, 5) {
        assert!(matches!(a, Attempt::Err { errno: libc::EPERM, .. }), "{a:?}");
    }
    let c = sb.dp.dp.tables().counters().unwrap();
    assert_eq!(c.get(tagger_common::Outcome::RefusedStrict), 10, "{c:?}");
}

#[test]
fn unlabelled_pod_is_base_and_a_container_cgroup_inherits_its_pod_lane() {
    let mut sb = Sandbox::new();
    let (base1, _) = sb.backend("e-base");
    let (gray1, _) = sb.backend("e-gray");
    sb.service(vip(), Proto::Tcp, 1, 0, &[("base", &[base1]), ("gray", &[gray1])]);
    let unlabelled = sb.caller("plain", None);
    assert_eq!(names(&sb.call(&unlabelled, Mode::Tcp, vip(), N)), ["e-base"]);

    let gray = sb.caller("gray", Some("gray"));
    // A container cgroup two levels below the pod cgroup, as containerd lays them out.
    let container = gray.cgroup.join("cri-containerd-0123.scope/sub");
    std::fs::create_dir_all(&container).unwrap();
    let in_container = tagger_tests::client::attempts(&container, &gray.pod.ns, Mode::Tcp, vip(), N);
    assert_eq!(names(&in_container), ["e-gray"]);
}

#[test]
fn destination_that_is_not_a_service_is_untouched() {
    let mut sb = Sandbox::new();
    let (base1, _) = sb.backend("f-base");
    let (gray1, _) = sb.backend("f-gray");
    sb.service(vip(), Proto::Tcp, 1, 0, &[("base", &[base1])]);
    let gray = sb.caller("gray", Some("gray"));
    // Straight to a pod address: reaches exactly that pod, whatever the lanes say.
    let direct = sb.call(&gray, Mode::Tcp, gray1, N);
    assert_eq!(names(&direct), ["f-gray"]);
    for a in &direct {
        assert!(matches!(a, Attempt::Ok { peer, .. } if *peer == gray1));
    }
    // Same port on another VIP that is not a frontend: untouched, hence unroutable here.
    let not_a_frontend: SocketAddr = "10.96.0.99:80".parse().unwrap();
    for a in sb.call(&gray, Mode::Tcp, not_a_frontend, 3) {
        assert!(matches!(a, Attempt::Err { errno: libc::ENETUNREACH, .. }), "{a:?}");
    }
    assert!(sb.dp.dp.tables().counters().unwrap().get(tagger_common::Outcome::NotService) >= N as u64);
}

/// The call edges the coverage report follows: per calling pod, Service, lanes and outcome, for
/// every applied decision, and at a Service left to the cluster (passthrough) for lane callers
/// only.
#[test]
fn each_pods_call_edges_are_counted_by_service_lanes_and_outcome() {
    use std::collections::BTreeMap;

    const CALLS: usize = 6;

    use tagger_common::{EdgeKey, Outcome, SVC_F_PASSTHROUGH, lane_id};
    let mut sb = Sandbox::new();
    let (a_base, _) = sb.backend("a-base");
    let (a_gray, _) = sb.backend("a-gray");
    let (b_base, _) = sb.backend("b-base");
    let (svc_a, svc_b, svc_c): (SocketAddr, SocketAddr, SocketAddr) =
        (vip(), "10.96.0.11:80".parse().unwrap(), "10.96.0.12:80".parse().unwrap());
    sb.service(svc_a, Proto::Tcp, 1, 0, &[("base", &[a_base]), ("gray", &[a_gray])]);
    sb.service(svc_b, Proto::Tcp, 2, 0, &[("base", &[b_base]), ("gray", &[])]);
    // c: base backends only, left to the cluster; the sandbox has no Service implementation, so
    // these connects fail after the hook ran (what is asserted is the count, not the reply).
    sb.service(svc_c, Proto::Tcp, 3, SVC_F_PASSTHROUGH, &[("base", &[b_base])]);
    let gray = sb.caller("gw-gray", Some("gray"));
    let base = sb.caller("gw-base", Some("base"));
    assert_eq!(names(&sb.call(&gray, Mode::Tcp, svc_a, CALLS)), ["a-gray"]);
    assert_eq!(names(&sb.call(&base, Mode::Tcp, svc_a, CALLS)), ["a-base"]);
    assert_eq!(names(&sb.call(&gray, Mode::Tcp, svc_b, CALLS)), ["b-base"]);
    let _ = sb.call(&gray, Mode::Tcp, svc_c, CALLS);
    let _ = sb.call(&base, Mode::Tcp, svc_c, CALLS);

    let id = |c: &tagger_tests::scenario::Caller| tagger_tests::cgroup::TestCgroup::resolve(&c.cgroup).id;
    let (gray_pod, base_pod, gl) = (id(&gray), id(&base), lane_id("gray"));
    let edges: BTreeMap<EdgeKey, u64> =
        sb.dp.dp.tables().edges().unwrap().into_iter().map(|r| (r.key, r.count)).collect();
    let key = |caller, svc_id, caller_lane, backend_lane, o: Outcome| EdgeKey {
        caller,
        svc_id,
        caller_lane,
        backend_lane,
        outcome: o as u32,
    };
    let n = CALLS as u64;
    let want = BTreeMap::from([
        (key(gray_pod, 1, gl, gl, Outcome::Steered), n),
        (key(base_pod, 1, 0, 0, Outcome::Steered), n),
        (key(gray_pod, 2, gl, 0, Outcome::FellBack), n),
        (key(gray_pod, 3, gl, 0, Outcome::Passthrough), n),
    ]);
    assert_eq!(edges, want, "base callers of a passthrough Service are not counted");
}
