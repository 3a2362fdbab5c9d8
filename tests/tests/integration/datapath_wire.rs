//! The lane on the wire: the TCP option on the SYN of steered connections, captured in the
//! backend pod's namespace, and its absence everywhere else; and the receiving side, which
//! counts the connections a local pod accepts by the caller's lane.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tagger::net::Proto;
use tagger_common::{
    DSCP_UNSET, INBOUND_FELL_BACK, INBOUND_IN_LANE, INBOUND_LEAK, INBOUND_ROUTED, INBOUND_UNKNOWN_LANE,
    INBOUND_UNTAGGED, InboundKey, LanePolicy, MAP_INBOUND, MAX_INBOUND, Outcome, PodAddr, RouteKey,
    SVC_F_ROUTED, lane_id,
    wire::{LANE_OPT_F_FELL_BACK, LANE_OPT_KIND, decode_lane_option},
};
use tagger_tests::{
    capture::{Capture, Syn},
    cgroup::TestCgroup,
    client::{HoldClient, Mode, attempts},
    datapath::TestDatapath,
    scenario::{BACKEND_PORT, Sandbox, replies},
    topology::Node,
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

/// Inbound counts of one pod address, by (caller lane, kind).
fn inbound_of(sb: &Sandbox, addr: SocketAddr) -> BTreeMap<(u32, u32), u64> {
    let words = tagger::net::addr_words(addr.ip());
    let mut rows = BTreeMap::new();
    for r in sb.dp.dp.tables().inbound().unwrap().into_iter().filter(|r| r.key.addr == words) {
        *rows.entry((r.key.caller_lane, r.key.kind)).or_default() += r.count;
    }
    rows
}

#[test]
fn the_receiving_pod_counts_connections_by_the_callers_lane() {
    let mut sb = Sandbox::new();
    let gray = lane_id("gray");
    let base = lane_id("base");
    let (g1, g1_v6) = sb.pod_backend("gray-1", "gray", "gray");
    let (b1, _) = sb.pod_backend("base-1", "base", "base");
    // The callers' node believes this pod is gray; the pod's own node says base: a leak.
    let (stale, _) = sb.pod_backend("stale-1", "base", "base");
    let vip: SocketAddr = "10.96.6.1:80".parse().unwrap();
    let vip2: SocketAddr = "10.96.6.2:80".parse().unwrap();
    let vip6: SocketAddr = "[fd00:96::6]:80".parse().unwrap();
    sb.service(vip, Proto::Tcp, 1, 0, &[("gray", &[g1]), ("base", &[b1])]);
    sb.service(vip2, Proto::Tcp, 2, 0, &[("gray", &[stale]), ("base", &[b1])]);
    sb.service(vip6, Proto::Tcp, 3, 0, &[("gray", &[g1_v6])]);
    let gray_pod = sb.caller("gray", Some("gray"));
    let base_pod = sb.caller("base", Some("base"));

    let ok = |attempts: &[tagger_tests::client::Attempt]| replies(attempts).values().sum::<usize>();
    assert_eq!(ok(&sb.call(&gray_pod, Mode::Tcp, vip, 3)), 3);
    assert_eq!(ok(&sb.call(&gray_pod, Mode::Tcp, vip6, 2)), 2);
    assert_eq!(ok(&sb.call(&base_pod, Mode::Tcp, vip, 2)), 2);
    assert_eq!(ok(&sb.call(&gray_pod, Mode::Tcp, b1, 4)), 4, "not through a Service: untagged");
    assert_eq!(ok(&sb.call(&gray_pod, Mode::Tcp, vip2, 2)), 2);

    assert_eq!(inbound_of(&sb, g1), BTreeMap::from([((gray, INBOUND_IN_LANE), 3)]));
    assert_eq!(inbound_of(&sb, g1_v6), BTreeMap::from([((gray, INBOUND_IN_LANE), 2)]), "IPv6");
    assert_eq!(
        inbound_of(&sb, b1),
        BTreeMap::from([((base, INBOUND_IN_LANE), 2), ((0, INBOUND_UNTAGGED), 4)])
    );
    assert_eq!(inbound_of(&sb, stale), BTreeMap::from([((gray, INBOUND_LEAK), 2)]));

    // The gray lane loses its backends: gray callers fall back to base, flagged on the SYN.
    sb.dp.dp.tables_mut().replace_backends(1, gray, &[]).unwrap();
    assert_eq!(replies(&sb.call(&gray_pod, Mode::Tcp, vip, 3)).keys().collect::<Vec<_>>(), ["base-1"]);
    assert_eq!(inbound_of(&sb, b1)[&(gray, INBOUND_FELL_BACK)], 3);

    // A routing rule sends gray callers of Service 4 to blue: routed, not a leak.
    let (blue1, _) = sb.pod_backend("blue-1", "blue", "blue");
    let vip4: SocketAddr = "10.96.6.4:80".parse().unwrap();
    sb.service(vip4, Proto::Tcp, 4, SVC_F_ROUTED, &[("gray", &[g1]), ("blue", &[blue1])]);
    let rule = LanePolicy::new(&[lane_id("blue")], 0);
    sb.dp.dp.tables_mut().set_route(RouteKey { svc_id: 4, caller_lane: gray }, &rule).unwrap();
    assert_eq!(replies(&sb.call(&gray_pod, Mode::Tcp, vip4, 2)).keys().collect::<Vec<_>>(), ["blue-1"]);
    assert_eq!(inbound_of(&sb, blue1), BTreeMap::from([((gray, INBOUND_ROUTED), 2)]));

    // A server that is not a registered local pod is not counted.
    let (plain, _) = sb.backend("plain-1");
    assert_eq!(ok(&sb.call(&gray_pod, Mode::Tcp, plain, 2)), 2);
    assert!(inbound_of(&sb, plain).is_empty());

    // What `tagger stats --inbound` shows.
    let report = tagger::cli::inbound::read(sb.dp.dp.tables()).unwrap();
    assert_eq!(report.totals["in_lane"], 3 + 2 + 2);
    assert_eq!(report.totals["leak"], 2);
    assert_eq!(report.totals["untagged"], 4);
    assert_eq!(report.totals["fell_back"], 3);
    assert_eq!(report.totals["routed"], 2);
    assert_eq!(report.not_classified, 0, "every listener was opened after tagger attached");
}

/// The lane option is unauthenticated: ids that are not known lanes (no name published) share
/// one `unknown_lane` row per pod and never get a row per id; and the inbound map is an LRU,
/// so one filled with other rows (a flood of distinct keys) still counts new connections.
#[test]
fn unknown_lane_ids_share_one_row_and_a_full_inbound_map_keeps_counting() {
    let mut sb = Sandbox::new();
    let gray = lane_id("gray");
    let (g1, _) = sb.pod_backend("gray-1", "gray", "gray");
    let forged = ["forged-a", "forged-b", "forged-c"];
    let vip: SocketAddr = "10.96.6.9:80".parse().unwrap();
    let mut sets: Vec<(&str, &[SocketAddr])> = vec![("gray", std::slice::from_ref(&g1))];
    sets.extend(forged.iter().map(|l| (*l, std::slice::from_ref(&g1))));
    sb.service(vip, Proto::Tcp, 9, 0, &sets);
    let gray_pod = sb.caller("gray", Some("gray"));
    let ok = |attempts: &[tagger_tests::client::Attempt]| replies(attempts).values().sum::<usize>();
    assert_eq!(ok(&sb.call(&gray_pod, Mode::Tcp, vip, 2)), 2);
    for lane in forged {
        // Registered with an id whose name nobody published: what a forged option looks like.
        let caller = sb.caller(lane, None);
        let cg = TestCgroup::resolve(&caller.cgroup);
        sb.dp.dp.tables_mut().register_pod(cg.id, cg.pod_entry(lane_id(lane))).unwrap();
        assert_eq!(ok(&sb.call(&caller, Mode::Tcp, vip, 2)), 2, "{lane}");
    }
    assert_eq!(
        inbound_of(&sb, g1),
        BTreeMap::from([((gray, INBOUND_IN_LANE), 2), ((0, INBOUND_UNKNOWN_LANE), 6)]),
        "three unknown ids, one row"
    );
    let report = tagger::cli::inbound::read(sb.dp.dp.tables()).unwrap();
    assert_eq!(report.totals["unknown_lane"], 6);

    // Fill the map with rows of other addresses, as a flood of distinct keys would.
    let pin = sb.dp.dir().join("maps").join(MAP_INBOUND);
    let map = aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&pin).unwrap()).unwrap();
    let mut inbound: aya::maps::PerCpuHashMap<_, InboundKey, u64> = map.try_into().unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    for i in 0..MAX_INBOUND {
        let key = InboundKey {
            addr: [0, 0, 0xffff_u32.to_be(), 0x0a63_0000 + i],
            caller_lane: 0,
            pod_lane: 0,
            kind: 0,
        };
        let ones = aya::maps::PerCpuValues::try_from(vec![1u64; cpus]).unwrap();
        let _ = inbound.insert(key, ones, 0);
    }
    let before = sb.dp.dp.tables().counters().unwrap().by_outcome.get(&Outcome::InboundFull).copied();
    // g1's row may have been evicted by the flood (then it starts again from 0).
    let held = inbound_of(&sb, g1).get(&(gray, INBOUND_IN_LANE)).copied().unwrap_or(0);
    assert_eq!(ok(&sb.call(&gray_pod, Mode::Tcp, vip, 3)), 3);
    assert_eq!(
        inbound_of(&sb, g1).get(&(gray, INBOUND_IN_LANE)).copied(),
        Some(held + 3),
        "counted despite the flood"
    );
    let after = sb.dp.dp.tables().counters().unwrap().by_outcome.get(&Outcome::InboundFull).copied();
    assert_eq!(before, after, "nothing lost as inbound_full");
}

#[test]
fn a_listener_older_than_tagger_is_counted_as_not_classified() {
    tagger_tests::require_root();
    let root = TestCgroup::new(&tagger_tests::unique_name("root"));
    let mut node = Node::new();
    let server = node.add_pod("old-server");
    let caller = node.add_pod("caller");
    let server_cg = root.child("kubepods.slice/old-server");
    let caller_cg = root.child("kubepods.slice/caller");
    // The server listens before any program is attached: its SYNs are not kept.
    let listen: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, BACKEND_PORT).into();
    let answer = HoldClient::start_with(&server_cg, &server.ns, "answer", listen, &["old"]);
    assert_eq!(answer.next_line(Duration::from_secs(10)).as_deref(), Some("serving"));
    let mut dp = TestDatapath::install(root.path());
    let cg = TestCgroup::resolve(&server_cg);
    let entry = PodAddr { cgroup: cg.id, lane: lane_id("gray"), dscp: DSCP_UNSET, _pad: [0; 3] };
    let addr = SocketAddr::new(IpAddr::V4(server.ip4), BACKEND_PORT);
    dp.dp.tables_mut().set_pod_addr(tagger::net::addr_words(addr.ip()), entry).unwrap();

    let got = attempts(&caller_cg, &caller.ns, Mode::Tcp, addr, 3);
    assert_eq!(replies(&got).values().sum::<usize>(), 3);
    let counters = dp.dp.tables().counters().unwrap();
    assert_eq!(counters.by_outcome[&Outcome::InboundNoSyn], 3, "counted globally as not classified");
    assert!(dp.dp.tables().inbound().unwrap().is_empty(), "and not per pod");
    drop(answer);
}
