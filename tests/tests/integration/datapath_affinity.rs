//! `sessionAffinity: ClientIP` on the real kernel: real connections from caller pods (their own
//! network namespaces and kubelet-style cgroups) to a Service whose frontend has
//! `SVC_F_AFFINITY`; which backend answered is what the backend server replies.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use tagger::net::{Proto, backend};
use tagger_common::{AffinityKey, SVC_F_AFFINITY, SvcAffinity, lane_id};
use tagger_tests::{
    cgroup::TestCgroup,
    client::Mode,
    scenario::{Caller, Sandbox, replies},
};

const VIP: &str = "10.96.0.20:80";

fn vip() -> SocketAddr {
    VIP.parse().unwrap()
}

/// A Service (svc_id 1) with `backends` backends in `lane`, with ClientIP affinity of
/// `timeout_s`, and the same backends without affinity behind svc_id 2 at `vip2`.
fn sandbox(
    prefix: &str,
    lane: &str,
    backends: usize,
    timeout_s: u32,
) -> (Sandbox, Vec<SocketAddr>, SocketAddr) {
    let mut sb = Sandbox::new();
    let addrs: Vec<SocketAddr> = (0..backends).map(|i| sb.backend(&format!("{prefix}{i}")).0).collect();
    sb.service(vip(), Proto::Tcp, 1, SVC_F_AFFINITY, &[(lane, &addrs)]);
    let vip2: SocketAddr = "10.96.0.21:80".parse().unwrap();
    sb.service(vip2, Proto::Tcp, 2, 0, &[(lane, &addrs)]);
    sb.dp.dp.tables_mut().set_affinity(1, &SvcAffinity { timeout_s, _pad: 0 }).unwrap();
    (sb, addrs, vip2)
}

/// The one backend all of `n` connections reached (panics if they spread).
fn one_backend(sb: &Sandbox, caller: &Caller, mode: Mode, n: usize) -> String {
    let got = replies(&sb.call(caller, mode, vip(), n));
    assert_eq!(got.len(), 1, "the caller's connections spread over backends: {got:?}");
    got.into_keys().next().unwrap()
}

#[test]
fn affinity_keeps_each_caller_on_one_backend_and_callers_spread() {
    let (mut sb, _, vip2) = sandbox("a", "base", 4, 10_800);
    let mut chosen = BTreeSet::new();
    for i in 0..8 {
        let caller = sb.caller(&format!("c{i}"), Some("base"));
        let first = one_backend(&sb, &caller, Mode::Tcp, 30);
        // The same caller keeps its backend over separate batches (separate processes) too.
        assert_eq!(one_backend(&sb, &caller, Mode::Tcp, 10), first);
        chosen.insert(first);
    }
    assert!(chosen.len() >= 2, "8 callers all landed on {chosen:?}: affinity is not per caller");

    // Without affinity the same caller's connections spread over the backends.
    let caller = sb.caller("plain", Some("base"));
    let spread = replies(&sb.call(&caller, Mode::Tcp, vip2, 200));
    assert_eq!(spread.len(), 4, "no affinity: {spread:?}");

    // An unregistered caller (a base caller with no pod entry) is its own client.
    let stray = sb.caller("stray", None);
    let first = one_backend(&sb, &stray, Mode::Tcp, 20);
    assert_eq!(one_backend(&sb, &stray, Mode::Tcp, 20), first);
}

#[test]
fn affinity_is_refreshed_by_each_connection_and_expires_after_the_timeout() {
    let (mut sb, _, _) = sandbox("t", "base", 4, 1);
    let caller = sb.caller("c", Some("base"));
    let key =
        AffinityKey { svc_id: 1, lane: lane_id("base"), caller: TestCgroup::resolve(&caller.cgroup).id };
    let first = one_backend(&sb, &caller, Mode::Tcp, 5);
    let t1 = sb.dp.dp.tables().affinity_entry(&key).unwrap().expect("an entry").last_ns;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(one_backend(&sb, &caller, Mode::Tcp, 1), first, "within the timeout");
    let t2 = sb.dp.dp.tables().affinity_entry(&key).unwrap().expect("an entry").last_ns;
    assert!(t2 >= t1 + 200_000_000, "the last use is refreshed: {t1} then {t2}");

    // Past the timeout each connection is a fresh pick: over a few rounds one lands elsewhere
    // (all on the same of 4 backends: 4^-6).
    let mut previous = first;
    let mut moved = 0;
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(1_500));
        let now = one_backend(&sb, &caller, Mode::Tcp, 3);
        if now != previous {
            moved += 1;
        }
        previous = now;
    }
    assert!(moved > 0, "never a fresh pick after the timeout");
}

#[test]
fn affinity_ends_when_the_backend_leaves_the_set_and_the_new_one_is_kept() {
    let (mut sb, addrs, _) = sandbox("r", "base", 4, 10_800);
    let caller = sb.caller("c", Some("base"));
    let first = one_backend(&sb, &caller, Mode::Tcp, 10);
    let index: usize = first.trim_start_matches('r').parse().unwrap();

    // Another backend is added (slots shift: sets are sorted): the caller keeps its backend.
    let (extra, _) = sb.backend("r-extra");
    let mut with_extra = addrs.clone();
    with_extra.push(extra);
    let lane = lane_id("base");
    let members = |v: &[SocketAddr]| v.iter().map(|a| backend(*a)).collect::<Vec<_>>();
    sb.dp.dp.tables_mut().replace_backends(1, lane, &members(&with_extra)).unwrap();
    assert_eq!(one_backend(&sb, &caller, Mode::Tcp, 20), first, "the set changed, the backend stayed");

    // The remembered backend leaves: the next connection is a fresh pick, which then sticks.
    let without: Vec<SocketAddr> =
        with_extra.iter().enumerate().filter(|(i, _)| *i != index).map(|(_, a)| *a).collect();
    sb.dp.dp.tables_mut().replace_backends(1, lane, &members(&without)).unwrap();
    let second = one_backend(&sb, &caller, Mode::Tcp, 20);
    assert_ne!(second, first);
    // It comes back: the caller stays on its new backend.
    sb.dp.dp.tables_mut().replace_backends(1, lane, &members(&with_extra)).unwrap();
    assert_eq!(one_backend(&sb, &caller, Mode::Tcp, 20), second);
}

#[test]
fn affinity_applies_within_the_lane_the_decision_resolves_to() {
    let mut sb = Sandbox::new();
    let grays: Vec<SocketAddr> = (0..3).map(|i| sb.backend(&format!("g{i}")).0).collect();
    let bases: Vec<SocketAddr> = (0..3).map(|i| sb.backend(&format!("b{i}")).0).collect();
    sb.service(vip(), Proto::Tcp, 1, SVC_F_AFFINITY, &[("gray", &grays), ("base", &bases)]);
    let caller = sb.caller("c", Some("gray"));
    let in_gray = one_backend(&sb, &caller, Mode::Tcp, 20);
    assert!(in_gray.starts_with('g'), "{in_gray}");
    // Gray empties: the lane rules win (fall back to base), with affinity inside base.
    sb.dp.dp.tables_mut().replace_backends(1, lane_id("gray"), &[]).unwrap();
    let in_base = one_backend(&sb, &caller, Mode::Tcp, 20);
    assert!(in_base.starts_with('b'), "{in_base}");
    // Gray is back: the caller returns to its own lane, to the backend it had there.
    let members: Vec<_> = grays.iter().map(|a| backend(*a)).collect();
    sb.dp.dp.tables_mut().replace_backends(1, lane_id("gray"), &members).unwrap();
    assert_eq!(one_backend(&sb, &caller, Mode::Tcp, 20), in_gray);
    // Connected UDP is steered with the same affinity (its own frontend, so its own entry).
    let udp_vip: SocketAddr = "10.96.0.22:80".parse().unwrap();
    sb.service(udp_vip, Proto::Udp, 3, SVC_F_AFFINITY, &[("gray", &grays)]);
    let got = replies(&sb.call(&caller, Mode::UdpConnected, udp_vip, 20));
    assert_eq!(got.len(), 1, "{got:?}");
    let got = replies(&sb.call(&caller, Mode::Udp, udp_vip, 20));
    assert_eq!(got.len(), 1, "unconnected UDP: {got:?}");
}
