//! The lane on the wire: the TCP option on the SYN of steered connections, captured in the
//! backend pod's namespace, and its absence everywhere else.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tagger::net::Proto;
use tagger_common::{
    lane_id,
    wire::{LANE_OPT_F_FELL_BACK, LANE_OPT_KIND, decode_lane_option},
};
use tagger_tests::{
    capture::{Capture, Syn},
    client::Mode,
    scenario::{BACKEND_PORT, Sandbox, replies},
};

/// TCP option kinds whose presence must not change.
const MSS: u8 = 2;
const WSCALE: u8 = 3;

fn syns_of(sb: &Sandbox, backend: &str, f: impl FnOnce()) -> Vec<Syn> {
    let capture = Capture::start(&sb.backends[backend]);
    f();
    let syns = capture.syns(BACKEND_PORT, Duration::from_millis(300));
    assert!(!syns.is_empty(), "no SYN captured at {backend}");
    syns
}

fn assert_mss_and_wscale_like_untagged(syns: &[Syn], untagged: &Syn) {
    for s in syns {
        assert_eq!(s.option(MSS), untagged.option(MSS), "MSS must be unaffected");
        assert_eq!(s.option(WSCALE), untagged.option(WSCALE), "window scaling must be unaffected");
    }
}

#[test]
fn steered_and_fell_back_syns_carry_the_lane_option_others_do_not() {
    let mut sb = Sandbox::new();
    let (g1, _) = sb.backend("gray-1");
    let (b1, _) = sb.backend("base-1");
    let vip: SocketAddr = "10.96.6.1:80".parse().unwrap();
    sb.service(vip, Proto::Tcp, 1, 0, &[("gray", &[g1]), ("base", &[b1])]);
    let gray = sb.caller("gray", Some("gray"));
    let base = sb.caller("base", Some("base"));

    // Not a Service: the gray pod connects to the base backend's own address. No option.
    let direct = SocketAddr::new(IpAddr::V4(sb.backends["base-1"].ip4), BACKEND_PORT);
    let untagged = syns_of(&sb, "base-1", || {
        let _ = replies(&sb.call(&gray, Mode::Tcp, direct, 3));
    });
    for s in &untagged {
        assert_eq!(s.option(LANE_OPT_KIND), None, "a connection tagger did not steer has no option");
        assert!(s.option(MSS).is_some());
    }

    // Steered gray → gray: the caller's lane, no fallback flag.
    let syns = syns_of(&sb, "gray-1", || {
        assert_eq!(replies(&sb.call(&gray, Mode::Tcp, vip, 3)).keys().collect::<Vec<_>>(), ["gray-1"]);
    });
    for s in &syns {
        let opt = s.option(LANE_OPT_KIND).expect("steered SYN without the lane option");
        assert_eq!(decode_lane_option(opt), Some((lane_id("gray"), 0)));
    }
    assert_mss_and_wscale_like_untagged(&syns, &untagged[0]);

    // Steered base → base.
    let syns = syns_of(&sb, "base-1", || {
        let _ = replies(&sb.call(&base, Mode::Tcp, vip, 3));
    });
    for s in &syns {
        assert_eq!(decode_lane_option(s.option(LANE_OPT_KIND).unwrap()), Some((lane_id("base"), 0)));
    }

    // Gray without gray backends falls back to base: gray's lane with the fallback flag.
    sb.dp.dp.tables_mut().replace_backends(1, lane_id("gray"), &[]).unwrap();
    let syns = syns_of(&sb, "base-1", || {
        assert_eq!(replies(&sb.call(&gray, Mode::Tcp, vip, 3)).keys().collect::<Vec<_>>(), ["base-1"]);
    });
    for s in &syns {
        let opt = s.option(LANE_OPT_KIND).expect("fell-back SYN without the lane option");
        assert_eq!(decode_lane_option(opt), Some((lane_id("gray"), LANE_OPT_F_FELL_BACK)));
    }
    assert_mss_and_wscale_like_untagged(&syns, &untagged[0]);
}
