//! TC lane marking on the real kernel: the `lane_mark` classifier on the host side of the pods'
//! veths (inside the test's node namespace), packets captured in the destination pod. A pod of
//! a lane with a DSCP gets it (ECN kept, IPv4 checksum valid, the exchange completes), every
//! local pod's packets carry its lane's small index in the bits of `skb->mark` under the mask
//! and nothing else (counted by an iptables rule matching the whole mark), a stranger's packets
//! are untouched, and the program run on a frame with other mark bits set keeps them all.
//! Once with TCX links, once with netlink filters.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use tagger::{
    datapath::tc::{MarkDirection, MarkMode, Marker},
    model::lane_marks::MarkMask,
};
use tagger_common::{DSCP_UNSET, LaneMark, PodAddr, lane_id};
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
/// The mask the tests mark under, and the lanes' indices.
const MASK: u32 = 0x0f00;
const GRAY_INDEX: u32 = 1;
const BLUE_INDEX: u32 = 2;

/// An Ethernet frame with an IPv4 TCP SYN from `src`.
fn ipv4_frame(src: std::net::Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&[10, 0, 0, 99]);
    let sum: u32 = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !u16::try_from((folded & 0xffff) + (folded >> 16)).expect("folded twice: 16 bits");
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f[34 + 12] = 0x50;
    f[34 + 13] = 0x02;
    f
}

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
    // The rule matches the whole mark (`--mark V`: mask 0xffffffff), so a packet counts only
    // if the lane's bits are its only bits.
    let want = format!("{mark:#x}");
    out.lines()
        .find(|l| l.contains("mark match") && l.split_whitespace().any(|w| w == want))
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
    let lane_mask = MarkMask::new(MASK).unwrap();
    for (pod, lane, dscp, index) in
        [(gray, "gray", GRAY_DSCP, GRAY_INDEX), (blue, "blue", DSCP_UNSET, BLUE_INDEX)]
    {
        let entry = PodAddr { cgroup: 1, lane: lane_id(lane), dscp, _pad: [0; 3] };
        for ip in [IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)] {
            tables.set_pod_addr(tagger::net::addr_words(ip), entry).unwrap();
        }
        tables.set_lane_mark(lane_id(lane), lane_mask.entry(index)).unwrap();
    }
    // A lane that did not fit the mask (recorded without an index), at an address no pod uses.
    let unfit_ip = std::net::Ipv4Addr::new(10, 99, 0, 1);
    let unfit = PodAddr { cgroup: 2, lane: lane_id("red"), dscp: DSCP_UNSET, _pad: [0; 3] };
    tables.set_pod_addr(tagger::net::addr_words(IpAddr::V4(unfit_ip)), unfit).unwrap();
    tables.set_lane_mark(lane_id("red"), LaneMark::default()).unwrap();
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
            // The program on frames whose mark has other bits set: only the masked bits change.
            for before in [0, 0xffff_ffff, 0x0000_c000, 0x1234_5678, 0xdead_beef] {
                let after = marker.test_run(&ipv4_frame(gray.ip4), before).unwrap();
                assert_eq!(after, (before & !MASK) | (GRAY_INDEX << 8), "gray, {before:#x} → {after:#x}");
                let after = marker.test_run(&ipv4_frame(blue.ip4), before).unwrap();
                assert_eq!(after, (before & !MASK) | (BLUE_INDEX << 8), "blue, {before:#x} → {after:#x}");
                let after = marker.test_run(&ipv4_frame(stranger.ip4), before).unwrap();
                assert_eq!(after, before, "a stranger's mark is untouched");
                let after = marker.test_run(&ipv4_frame(unfit_ip), before).unwrap();
                assert_eq!(after, before, "a lane without an index is untouched");
            }
            marker.attached().clone()
        })
        .join()
        .unwrap()
    });
    assert_eq!(attached.iter().map(String::as_str).collect::<Vec<_>>(), ["p2", "p3", "p4", "p5"]);
    // Count marks as the node's bridge forwards the packets.
    let ns = node_ns.name();
    sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]);
    for index in [GRAY_INDEX, BLUE_INDEX] {
        let mark = format!("{:#x}", index << 8);
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
    let (g, b) = (marked_packets(node_ns, GRAY_INDEX << 8), marked_packets(node_ns, BLUE_INDEX << 8));
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

/// A node with a gray caller `g` (host-side veth p2) and a base backend `dst`, and the agent
/// marking the node's pod veths under 0x0f00, gray with DSCP 10, started with `extra` flags;
/// returns once g's address is registered with gray's DSCP.
fn marking_agent(extra: &[&str]) -> tagger_tests::agent::AgentSandbox {
    let mut sb = tagger_tests::agent::AgentSandbox::new();
    sb.caller("g", Some("gray")); // host-side veth p2
    sb.backend("dst", None);
    let lanes = sb.write_lanes_config("lanes:\n  gray:\n    dscp: 10\n");
    let lanes = lanes.to_string_lossy().into_owned();
    // The agent stays in the host's namespace (the DaemonSet's is its pod's) and marks in the
    // node's, where the pods' host-side veths are, through --node-netns.
    let node_ns = sb.node_netns().path().to_string_lossy().into_owned();
    let mut args = vec![
        "--lanes-config",
        &lanes,
        "--mark-interfaces",
        "p*",
        "--mark-mask",
        "0x0f00",
        "--node-netns",
        &node_ns,
    ];
    args.extend(extra);
    sb.start_agent_on_file(&args);
    let g_addr = tagger::net::addr_words(IpAddr::V4(sb.netns["g"].ip4));
    sb.wait_for("g's address registered with gray's DSCP", Duration::from_secs(10), |t| {
        t.pod_addrs().unwrap().get(&g_addr).is_some_and(|e| e.dscp == GRAY_DSCP)
    });
    sb
}

#[test]
fn the_agent_marks_its_pods_with_the_lanes_config_dscp() {
    let sb = marking_agent(&[]);
    let node_ns = sb.node_netns().path().to_string_lossy().into_owned();
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
    // The lane's index under the mask, shown by `tagger lanes`.
    let (_, lanes) = tagger_tests::agent::cli_json(&sb.pins.0, &["lanes"]);
    let gray = lanes["lanes"].as_array().unwrap().iter().find(|l| l["lane"]["name"] == "gray").unwrap();
    assert_eq!(gray["mark"]["index"], 1, "{lanes}");
    assert_eq!(gray["mark"]["value"], "0x100", "{lanes}");
}

/// `--bpf-log=trace`: the marking program the agent loads writes a record of each packet it
/// marks (lane, mark before and after, DSCP), which the agent logs under `tagger::datapath`.
#[test]
fn the_agent_logs_each_marked_packet_at_trace() {
    let sb = marking_agent(&["--bpf-log=trace"]);
    let record = format!("lane mark: lane {:#010x}: mark 0 -> 100, dscp {GRAY_DSCP}", lane_id("gray"));
    let dst = SocketAddr::new(IpAddr::V4(sb.netns["dst"].ip4), tagger_tests::agent::PORT);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sb.agent_log().lines().any(|l| l.contains("tagger::datapath") && l.contains(&record)) {
        assert!(std::time::Instant::now() < deadline, "no {record:?} record:\n{}", sb.agent_log());
        let got = attempts(&sb.pod_cgroup("g"), &sb.netns["g"].ns, Mode::Tcp, dst, 1);
        assert_eq!(replies(&got).into_keys().collect::<Vec<_>>(), ["dst"]);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `--mark-mask` that would write kube-proxy's bits, is empty or not contiguous is refused
/// at start, naming the flag and the reason; nothing is installed.
#[test]
fn a_bad_mark_mask_is_refused_at_start() {
    let out = Command::new(tagger_tests::agent::workspace_bin("tagger-agent"))
        .args(["--node-name", "n", "--mark-interfaces", "p*", "--mark-mask", "0x4000"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--mark-mask") && err.contains("kube-proxy"), "{err}");
    for (mask, why) in [("0", "empty"), ("0x0f0f", "contiguous")] {
        let out = Command::new(tagger_tests::agent::workspace_bin("tagger-agent"))
            .args(["--node-name", "n", "--mark-mask", mask])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{mask}: {err}");
    }
}
