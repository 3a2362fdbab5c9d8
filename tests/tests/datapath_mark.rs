//! TC lane marking on the real kernel: the `lane_mark` classifier on the host side of the pods'
//! veths (inside the test's node namespace), packets captured in the destination pod. A pod of
//! a lane with a DSCP gets it (ECN kept, IPv4 checksum valid, the exchange completes), every
//! local pod's packets carry its lane id as `skb->mark` (counted by a `fw` filter), and a
//! stranger's packets are untouched. Once with TCX links, once with netlink filters.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use tagger::datapath::tc::{MarkDirection, MarkMode, Marker};
use tagger_common::{DSCP_UNSET, PodAddr, lane_id};
use tagger_tests::{
    backend::BackendServer,
    capture::Capture,
    cgroup::TestCgroup,
    client::{Mode, attempts},
    datapath::TestDatapath,
    netns::Netns,
    scenario::replies,
    topology::{Node, Pod},
};

const PORT: u16 = 8080;
const GRAY_DSCP: u8 = 10;

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// DSCP, ECN, whether the IPv4 header checksum is valid (true for IPv6), by source address.
fn classes_by_source(frames: &[Vec<u8>]) -> Vec<(IpAddr, u8, u8, bool)> {
    let mut out = Vec::new();
    for f in frames {
        match f.get(12..14) {
            Some([0x08, 0x00]) if f.len() >= 34 => {
                let ip = &f[14..];
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let sum =
                    ip[..ihl].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
                let folded = (sum & 0xffff) + (sum >> 16);
                let ok = ((folded & 0xffff) + (folded >> 16)) == 0xffff;
                let src = IpAddr::from([ip[12], ip[13], ip[14], ip[15]]);
                out.push((src, ip[1] >> 2, ip[1] & 3, ok));
            }
            Some([0x86, 0xdd]) if f.len() >= 54 => {
                let ip = &f[14..];
                let class = ((ip[0] & 0x0f) << 4) | (ip[1] >> 4);
                let src: [u8; 16] = ip[8..24].try_into().unwrap();
                out.push((IpAddr::from(src), class >> 2, class & 3, true));
            }
            _ => {}
        }
    }
    out
}

/// Packets the node's bridge forwarded with `mark`, counted by an iptables rule in the node
/// namespace (bridged IPv4 passes iptables with `bridge-nf-call-iptables`).
fn marked_packets(ns: &Netns, mark: u32) -> u64 {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        ns.name(),
        "iptables",
        "-t",
        "mangle",
        "-L",
        "FORWARD",
        "-v",
        "-x",
        "-n",
    ]);
    let want = format!("mark match {mark:#x}");
    out.lines()
        .find(|l| l.contains(&want))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn marking(mode: MarkMode) {
    tagger_tests::require_root();
    let root = TestCgroup::new(&tagger_tests::unique_name("root"));
    let caller_cg = root.child("kubepods.slice/callers");
    let dp = TestDatapath::install(root.path());
    let mut node = Node::new();
    let pods: Vec<Pod> = ["gray", "blue", "stranger", "dst"].iter().map(|n| node.add_pod(n)).collect();
    let (gray, blue, stranger, dst) = (&pods[0], &pods[1], &pods[2], &pods[3]);
    for p in [gray, dst] {
        sh(&["ip", "netns", "exec", p.ns.name(), "sysctl", "-qw", "net.ipv4.tcp_ecn=1"]);
    }
    let mut dp = dp;
    let tables = dp.dp.tables_mut();
    for (pod, lane, dscp) in [(gray, "gray", GRAY_DSCP), (blue, "blue", DSCP_UNSET)] {
        let entry = PodAddr { cgroup: 1, lane: lane_id(lane), dscp, _pad: [0; 3] };
        for ip in [IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)] {
            tables.set_pod_addr(tagger::net::addr_words(ip), entry).unwrap();
        }
    }
    let _server = BackendServer::start(dst, "dst", PORT);
    // Gray also serves, so that its packets carry data, hence ECT(0) with ECN on.
    let _gray_server = BackendServer::start(gray, "gray", PORT);

    // The marker attaches to the node's pod veths (p*), from a thread inside the node namespace.
    let node_ns = node.netns();
    let dir = dp.dir().to_owned();
    let attached = std::thread::scope(|s| {
        s.spawn(|| {
            node_ns.enter_current_thread();
            let mut marker =
                Marker::load(&dir, vec!["p*".into()], MarkDirection::Ingress, Some(mode)).unwrap();
            let errors = marker.sync();
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(marker.mode(), mode);
            marker.attached().clone()
        })
        .join()
        .unwrap()
    });
    assert_eq!(attached.iter().map(String::as_str).collect::<Vec<_>>(), ["p2", "p3", "p4", "p5"]);
    // Count marks as the node's bridge forwards the packets.
    let ns = node_ns.name();
    sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]);
    for lane in ["gray", "blue"] {
        let mark = format!("{:#x}", lane_id(lane));
        sh(&[
            "ip", "netns", "exec", ns, "iptables", "-t", "mangle", "-A", "FORWARD", "-m", "mark", "--mark",
            &mark,
        ]);
    }

    let capture = Capture::start(dst);
    for pod in [gray, blue, stranger] {
        for addr in [IpAddr::V4(dst.ip4), IpAddr::V6(dst.ip6)] {
            let got = attempts(&caller_cg, &pod.ns, Mode::Tcp, SocketAddr::new(addr, PORT), 5);
            assert_eq!(
                replies(&got).into_keys().collect::<Vec<_>>(),
                ["dst"],
                "{} → {addr}: the exchange completes",
                pod.name
            );
        }
    }
    let got = attempts(&caller_cg, &dst.ns, Mode::Tcp, SocketAddr::new(IpAddr::V4(gray.ip4), PORT), 3);
    assert_eq!(replies(&got).into_keys().collect::<Vec<_>>(), ["gray"]);
    let seen = classes_by_source(&capture.frames(Duration::from_millis(300)));
    let from = |ip: IpAddr| seen.iter().filter(move |(src, ..)| *src == ip);
    for ip in [IpAddr::V4(gray.ip4), IpAddr::V6(gray.ip6)] {
        assert!(from(ip).count() >= 10, "packets from {ip}: {seen:?}");
        assert!(
            from(ip).all(|&(_, dscp, _, ok)| dscp == GRAY_DSCP && ok),
            "gray's DSCP, valid checksum: {seen:?}"
        );
    }
    assert!(
        from(IpAddr::V4(gray.ip4)).any(|&(_, _, ecn, _)| ecn == 0b10),
        "ECN (ECT(0) on gray's data packets) kept beside the DSCP"
    );
    for ip in [blue.ip4.into(), blue.ip6.into(), stranger.ip4.into(), IpAddr::V6(stranger.ip6)] {
        assert!(from(ip).count() >= 10, "packets from {ip}");
        assert!(from(ip).all(|&(_, dscp, ecn, ok)| dscp == 0 && ecn == 0 && ok), "{ip} untouched: {seen:?}");
    }
    // Marks: every IPv4 packet of gray and blue toward dst (SYN, ACKs, FIN: at least 3 per
    // exchange, 5 exchanges each; iptables sees IPv4 only).
    let (g, b) = (marked_packets(node_ns, lane_id("gray")), marked_packets(node_ns, lane_id("blue")));
    assert!(g >= 15 && b >= 15, "marked packets: gray {g}, blue {b}");
    drop(capture);
}

#[test]
fn tcx_links_stamp_dscp_and_mark_per_lane() {
    if tagger::datapath::tc::probe() != MarkMode::Tcx {
        eprintln!("skipped: this kernel has no TCX links (Linux < 6.6); netlink is tested below");
        return;
    }
    marking(MarkMode::Tcx);
}

#[test]
fn netlink_filters_stamp_dscp_and_mark_per_lane() {
    marking(MarkMode::Netlink);
}

#[test]
fn the_agent_marks_its_pods_with_the_lanes_config_dscp() {
    let mut sb = tagger_tests::agent::AgentSandbox::new();
    sb.caller("g", Some("gray")); // host-side veth p2
    sb.backend("dst", None);
    let lanes = sb.write_lanes_config("lanes:\n  gray:\n    dscp: 10\n");
    let lanes = lanes.to_string_lossy().into_owned();
    // The agent stays in the host's namespace (the DaemonSet's is its pod's) and marks in the
    // node's, where the pods' host-side veths are, through --node-netns.
    let node_ns = sb.node_netns().path().to_string_lossy().into_owned();
    sb.start_agent_on_file(&["--lanes-config", &lanes, "--mark-interfaces", "p*", "--node-netns", &node_ns]);
    let g_addr = tagger::net::addr_words(IpAddr::V4(sb.netns["g"].ip4));
    sb.wait_for("g's address registered with gray's DSCP", Duration::from_secs(10), |t| {
        t.pod_addrs().unwrap().get(&g_addr).is_some_and(|e| e.dscp == GRAY_DSCP)
    });
    let dst = SocketAddr::new(IpAddr::V4(sb.netns["dst"].ip4), tagger_tests::agent::PORT);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let capture = Capture::start(&sb.netns["dst"]);
        let got = attempts(&sb.pod_cgroup("g"), &sb.netns["g"].ns, Mode::Tcp, dst, 2);
        assert_eq!(replies(&got).into_keys().collect::<Vec<_>>(), ["dst"]);
        let seen = classes_by_source(&capture.frames(Duration::from_millis(200)));
        let from_g: Vec<_> = seen.iter().filter(|(src, ..)| *src == IpAddr::V4(sb.netns["g"].ip4)).collect();
        if !from_g.is_empty() && from_g.iter().all(|&&(_, dscp, _, ok)| dscp == GRAY_DSCP && ok) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "g's packets never got gray's DSCP: {from_g:?}\n{}",
            sb.agent_log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (_, status) = tagger_tests::agent::cli_json(&sb.pins.0, &["status"]);
    if status["marking_mode"] == "tcx" {
        let ifaces: Vec<&str> =
            status["marking"].as_array().unwrap().iter().filter_map(|m| m["interface"].as_str()).collect();
        assert!(ifaces.contains(&"p2"), "{status}");
    }
    assert!(sb.agent_log().contains("lane marking attached"), "{}", sb.agent_log());
    assert!(sb.agent_log().contains(&format!("in {node_ns}")), "{}", sb.agent_log());
}
