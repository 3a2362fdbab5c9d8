//! The datapath lease on the real kernel, with the test playing the agent: while the lease is
//! armed the programs steer; once it has run out (or was never armed) connections to Service
//! frontends keep their destination — here a stand-in for kube-proxy answers the VIP inside the
//! caller's namespace — and are counted as `lease_expired`; sockets steered before keep showing
//! the Service address; re-arming steers again; a lease that never expires steers.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tagger::{net::Proto, sys::monotonic_now_ns};
use tagger_common::{Lease, LeaseState, Outcome};
use tagger_tests::{
    backend::service_stand_in,
    client::{HoldClient, Mode},
    scenario::{Caller, Sandbox, replies},
};

const SECOND: u64 = 1_000_000_000;

fn vip() -> SocketAddr {
    "10.96.7.1:80".parse().unwrap()
}

/// What `count` connections from the caller to the VIP reached, by reply.
fn reached(sb: &Sandbox, caller: &Caller, count: usize) -> Vec<String> {
    replies(&sb.call(caller, Mode::Tcp, vip(), count)).into_keys().collect()
}

fn counted(sb: &Sandbox, outcome: Outcome) -> u64 {
    sb.dp.dp.tables().counters().expect("counters").get(outcome)
}

#[test]
fn an_expired_lease_leaves_service_connections_to_the_cluster_and_keeps_reverse_translation() {
    let mut sb = Sandbox::new();
    let (gray, _) = sb.backend("gray-1");
    let (base, _) = sb.backend("base-1");
    sb.service(vip(), Proto::Tcp, 1, 0, &[("gray", &[gray]), ("base", &[base])]);
    let gw = sb.caller("gw", Some("gray"));
    let _kube_proxy = service_stand_in(&gw.pod, vip(), "kube-proxy");

    // Armed (TestDatapath arms it as an agent's first pass would): steered.
    assert_eq!(reached(&sb, &gw, 10), ["gray-1"]);
    let mut held = HoldClient::start(&gw.cgroup, &gw.pod.ns, "peer-tcp", vip());
    let line = held.next_line(Duration::from_secs(5)).expect("the held connection connects");
    assert_eq!(line, format!("ok\tgray-1\t{}", vip()), "steered, showing the VIP");

    // Run out (its deadline a second ago): untouched, counted, nothing else counted.
    let now = monotonic_now_ns();
    sb.dp.dp.tables_mut().set_lease(Lease::renewed(now - 3 * SECOND, 2 * SECOND)).unwrap();
    let (steered, expired) = (counted(&sb, Outcome::Steered), counted(&sb, Outcome::LeaseExpired));
    assert_eq!(reached(&sb, &gw, 12), ["kube-proxy"], "the destination is left to the cluster");
    assert_eq!(counted(&sb, Outcome::LeaseExpired) - expired, 12, "each connection counted once");
    assert_eq!(counted(&sb, Outcome::Steered), steered, "nothing steered");
    // A destination that is no Service frontend is not the lease's business.
    let direct = sb.call(&gw, Mode::Tcp, gray, 3);
    assert_eq!(replies(&direct).into_keys().collect::<Vec<_>>(), ["gray-1"]);
    assert_eq!(counted(&sb, Outcome::LeaseExpired) - expired, 12);

    // The socket steered before the expiry still shows the Service address.
    let applied = counted(&sb, Outcome::RevNatApplied);
    held.tell("peer?");
    assert_eq!(held.next_line(Duration::from_secs(5)).as_deref(), Some(format!("peer\t{}", vip()).as_str()));
    assert!(counted(&sb, Outcome::RevNatApplied) > applied, "reverse-translated by getpeername");

    // A fresh map (never armed) steers nothing either.
    sb.dp.dp.tables_mut().set_lease(Lease::default()).unwrap();
    assert_eq!(reached(&sb, &gw, 3), ["kube-proxy"]);

    // Re-armed: steered again at the next connection.
    sb.dp.dp.tables_mut().set_lease(Lease::renewed(monotonic_now_ns(), 600 * SECOND)).unwrap();
    assert_eq!(reached(&sb, &gw, 10), ["gray-1"]);

    // Never expires (`--datapath-lease 0`): steered.
    sb.dp.dp.tables_mut().set_lease(Lease::renewed(monotonic_now_ns(), 0)).unwrap();
    assert_eq!(reached(&sb, &gw, 10), ["gray-1"]);
    assert_eq!(counted(&sb, Outcome::LeaseExpired) - expired, 15);
}

/// The deadline is on the clock the kernel reads: a lease armed for two seconds runs out by
/// itself, seen from userspace and from the programs alike.
#[test]
fn a_short_lease_runs_out_on_the_kernels_clock() {
    let mut sb = Sandbox::new();
    let (gray, _) = sb.backend("gray-1");
    sb.service(vip(), Proto::Tcp, 1, 0, &[("gray", &[gray])]);
    let gw = sb.caller("gw", Some("gray"));
    let _kube_proxy = service_stand_in(&gw.pod, vip(), "kube-proxy");

    let lease = Lease::renewed(monotonic_now_ns(), 2 * SECOND);
    sb.dp.dp.tables_mut().set_lease(lease).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(lease.state(monotonic_now_ns()), LeaseState::Expired { .. }) {
        assert!(Instant::now() < deadline, "the lease never ran out: {:?}", lease.state(monotonic_now_ns()));
        std::thread::sleep(Duration::from_millis(50));
    }
    let expired = counted(&sb, Outcome::LeaseExpired);
    assert_eq!(reached(&sb, &gw, 5), ["kube-proxy"]);
    assert_eq!(counted(&sb, Outcome::LeaseExpired) - expired, 5);
}
