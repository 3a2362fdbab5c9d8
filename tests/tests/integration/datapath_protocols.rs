//! Address families and protocols: TCP over IPv4 and IPv6 (and IPv4-mapped IPv6 sockets), UDP
//! connected and unconnected, with the application seeing the Service address throughout.

use std::net::SocketAddr;

use tagger::net::Proto;
use tagger_common::Outcome;
use tagger_tests::{
    client::{Attempt, Mode},
    scenario::{Sandbox, replies},
};

const N: usize = 20;

/// Every attempt succeeded, reached one of `expected`, and the application saw `vip` as peer.
fn assert_steered_showing_vip(attempts: &[Attempt], vip: SocketAddr, expected: &[&str]) {
    for a in attempts {
        match a {
            Attempt::Ok { reply, peer } => {
                assert!(expected.contains(&reply.as_str()), "reached {reply}, expected one of {expected:?}");
                assert_eq!(*peer, vip, "the application must see the Service address");
            }
            Attempt::Err { errno, message } => panic!("attempt failed: errno {errno} {message}"),
        }
    }
    assert_eq!(replies(attempts).keys().count(), expected.len(), "{:?}", replies(attempts));
}

#[test]
fn tcp_over_ipv4_shows_the_vip_in_getpeername() {
    let mut sb = Sandbox::new();
    let (g1, _) = sb.backend("gray-1");
    let (b1, _) = sb.backend("base-1");
    let vip: SocketAddr = "10.96.1.1:80".parse().unwrap();
    sb.service(vip, Proto::Tcp, 1, 0, &[("gray", &[g1]), ("base", &[b1])]);
    let gray = sb.caller("gray", Some("gray"));
    assert_steered_showing_vip(&sb.call(&gray, Mode::Tcp, vip, N), vip, &["gray-1"]);
    assert!(sb.dp.dp.tables().counters().unwrap().get(Outcome::RevNatApplied) >= N as u64);
}

#[test]
fn tcp_over_ipv6() {
    let mut sb = Sandbox::new();
    let (_, g1) = sb.backend("gray-1");
    let (_, b1) = sb.backend("base-1");
    let vip: SocketAddr = "[fd00:96::1]:80".parse().unwrap();
    sb.service(vip, Proto::Tcp, 1, 0, &[("gray", &[g1]), ("base", &[b1])]);
    let gray = sb.caller("gray", Some("gray"));
    assert_steered_showing_vip(&sb.call(&gray, Mode::Tcp, vip, N), vip, &["gray-1"]);
    let base = sb.caller("base", None);
    assert_steered_showing_vip(&sb.call(&base, Mode::Tcp, vip, N), vip, &["base-1"]);
}

#[test]
fn ipv4_mapped_ipv6_socket_reaches_an_ipv4_service() {
    let mut sb = Sandbox::new();
    let (g1, _) = sb.backend("gray-1");
    let vip: SocketAddr = "10.96.1.2:80".parse().unwrap();
    sb.service(vip, Proto::Tcp, 1, 0, &[("gray", &[g1])]);
    let gray = sb.caller("gray", Some("gray"));
    // An AF_INET6 socket connecting to ::ffff:10.96.1.2 (what dual-stack clients do).
    let mapped: SocketAddr = "[::ffff:10.96.1.2]:80".parse().unwrap();
    assert_steered_showing_vip(&sb.call(&gray, Mode::Tcp, mapped, N), mapped, &["gray-1"]);
}

#[test]
fn udp_unconnected_replies_come_from_the_vip() {
    let mut sb = Sandbox::new();
    let (g1, g1v6) = sb.backend("gray-1");
    let (b1, b1v6) = sb.backend("base-1");
    let vip: SocketAddr = "10.96.1.3:53".parse().unwrap();
    sb.service(vip, Proto::Udp, 1, 0, &[("gray", &[g1]), ("base", &[b1])]);
    let vip6: SocketAddr = "[fd00:96::3]:53".parse().unwrap();
    sb.service(vip6, Proto::Udp, 2, 0, &[("gray", &[g1v6]), ("base", &[b1v6])]);
    let gray = sb.caller("gray", Some("gray"));
    assert_steered_showing_vip(&sb.call(&gray, Mode::Udp, vip, N), vip, &["gray-1"]);
    assert_steered_showing_vip(&sb.call(&gray, Mode::Udp, vip6, N), vip6, &["gray-1"]);
    let base = sb.caller("base", Some("base"));
    assert_steered_showing_vip(&sb.call(&base, Mode::Udp, vip, N), vip, &["base-1"]);
}

#[test]
fn udp_connected_replies_and_getpeername_show_the_vip() {
    let mut sb = Sandbox::new();
    let (g1, g1v6) = sb.backend("gray-1");
    let (g2, g2v6) = sb.backend("gray-2");
    let vip: SocketAddr = "10.96.1.4:53".parse().unwrap();
    sb.service(vip, Proto::Udp, 1, 0, &[("gray", &[g1, g2])]);
    let vip6: SocketAddr = "[fd00:96::4]:53".parse().unwrap();
    sb.service(vip6, Proto::Udp, 2, 0, &[("gray", &[g1v6, g2v6])]);
    let gray = sb.caller("gray", Some("gray"));
    // testpod checks that recvfrom's source equals getpeername for connected sockets.
    assert_steered_showing_vip(&sb.call(&gray, Mode::UdpConnected, vip, 2 * N), vip, &["gray-1", "gray-2"]);
    assert_steered_showing_vip(&sb.call(&gray, Mode::UdpConnected, vip6, 2 * N), vip6, &["gray-1", "gray-2"]);
}

#[test]
fn tcp_frontend_does_not_capture_udp_to_the_same_address() {
    let mut sb = Sandbox::new();
    let (g1, _) = sb.backend("gray-1");
    let vip: SocketAddr = "10.96.1.5:80".parse().unwrap();
    sb.service(vip, Proto::Tcp, 1, 0, &[("gray", &[g1])]);
    let gray = sb.caller("gray", Some("gray"));
    for a in sb.call(&gray, Mode::Udp, vip, 3) {
        // Not a UDP frontend: untouched, so the VIP is unroutable in the sandbox.
        assert!(matches!(a, Attempt::Err { errno: libc::ENETUNREACH, .. }), "{a:?}");
    }
}
