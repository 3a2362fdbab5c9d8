//! Connection lifecycle on the real kernel: steered connections are tracked (sockops for TCP,
//! the connect hook and `sock_release` for connected UDP), and the ones that went stale are
//! reset through netlink SOCK_DESTROY inside the caller pod's namespace, while everything else
//! is left alone.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tagger::{lifecycle, net::Proto};
use tagger_common::{LANE_F_REHOME, lane_id};
use tagger_tests::{
    agent::{AgentSandbox, TempDir, pod_in_lane, set_size},
    client::HoldClient,
    hold::HoldServer,
    netns::NetnsDir,
    scenario::{Caller, Sandbox},
};

/// Port of the holding backends (the sandbox's ordinary backends use 8080).
const HOLD_PORT: u16 = 9090;
/// How long a client may take to see a reset the pass already made (the destroy is done when
/// the pass returns; this only bounds the client's wake-up, generously for emulated kernels).
const SEEN: Duration = Duration::from_secs(2);
/// How long "untouched" is watched.
const QUIET: Duration = Duration::from_millis(300);

struct Lifecycle {
    sb: Sandbox,
    _servers: Vec<HoldServer>,
}

impl Lifecycle {
    fn new(names: &[&str]) -> (Self, Vec<SocketAddr>) {
        let mut sb = Sandbox::new();
        let mut servers = Vec::new();
        let mut addrs = Vec::new();
        for name in names {
            sb.backend(name);
            let pod = &sb.backends[*name];
            servers.push(HoldServer::start(pod, name, HOLD_PORT));
            addrs.push(SocketAddr::new(IpAddr::V4(pod.ip4), HOLD_PORT));
        }
        (Self { sb, _servers: servers }, addrs)
    }

    fn reset(&mut self) -> lifecycle::ResetReport {
        let root = self.sb.cgroup.path().to_owned();
        self.reset_with(&root, &mut lifecycle::netns::Finder::new(None))
    }

    /// Service `vip` (gray and base backends at `addrs`), a gray and a base caller each holding a
    /// connection (tracked); the callers and their clients.
    fn held_gray_and_base(
        &mut self,
        vip: SocketAddr,
        addrs: &[SocketAddr],
    ) -> (Caller, Caller, HoldClient, HoldClient) {
        self.sb.service(vip, Proto::Tcp, 1, 0, &[("gray", &[addrs[0]]), ("base", &[addrs[1]])]);
        let gray = self.sb.caller("gray", Some("gray"));
        let base = self.sb.caller("base", Some("base"));
        let gray_client = HoldClient::start(&gray.cgroup, &gray.pod.ns, "hold-tcp", vip);
        let base_client = HoldClient::start(&base.cgroup, &base.pod.ns, "hold-tcp", vip);
        expect_ok(&gray_client, "gray-1", vip);
        expect_ok(&base_client, "base-1", vip);
        wait_tracked(&self.sb, 2);
        (gray, base, gray_client, base_client)
    }

    /// A reset pass that finds pods' processes below `root` (none: a root without them) and
    /// namespaces with `finder`.
    fn reset_with(
        &mut self,
        root: &std::path::Path,
        finder: &mut lifecycle::netns::Finder,
    ) -> lifecycle::ResetReport {
        let mut view = lifecycle::MapSnapshot::read(self.sb.dp.dp.tables()).expect("read the maps");
        let report =
            lifecycle::reset_stale(self.sb.dp.dp.tables_mut(), root, finder, &mut view).expect("reset");
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        report
    }
}

fn expect_ok(c: &HoldClient, backend: &str, vip: SocketAddr) {
    let line = c.next_line(Duration::from_secs(3)).expect("no connect reported");
    assert_eq!(line, format!("ok\t{backend}\t{vip}"), "the connection must reach {backend} showing the VIP");
}

fn wait_tracked(sb: &Sandbox, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while sb.dp.dp.tables().connections().unwrap().len() < n {
        assert!(Instant::now() < deadline, "{n} connections never tracked");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn mechanism_probe_finds_sock_destroy() {
    let own = lifecycle::Mechanism::probe(&lifecycle::netns::Finder::new(None));
    assert!(own.available(), "{own:?}");
    let missing =
        lifecycle::Mechanism::probe(&lifecycle::netns::Finder::new(Some("/nonexistent-netns".into())));
    assert!(!missing.available() && missing.name().contains("no such directory"), "{missing:?}");
}

/// The DaemonSet's way: the agent sees no process of the pod (its own PID namespace), so the
/// pod's namespace is found among the runtime's pinned namespaces, by the socket's cookie.
#[test]
fn resets_reach_pods_through_the_namespace_directory_when_their_processes_are_hidden() {
    let (mut lc, addrs) = Lifecycle::new(&["gray-1", "base-1"]);
    let vip: SocketAddr = "10.96.5.3:80".parse().unwrap();
    let (gray, base, gray_client, base_client) = lc.held_gray_and_base(vip, &addrs);

    // The runtime's directory: both callers' namespaces (links to their `ip netns` pins).
    let dir = NetnsDir::of(&[&base.pod.ns, &gray.pod.ns]);
    // A cgroup root without the pods' processes.
    let empty = TempDir::new();
    let hidden = empty.0.as_path();
    let mut finder = lifecycle::netns::Finder::new(Some(dir.path().to_owned()));

    lc.sb.dp.dp.tables_mut().replace_backends(1, lane_id("gray"), &[]).unwrap();
    let report = lc.reset_with(hidden, &mut finder);
    assert_eq!(report.reset.len(), 1, "{report:?}");
    let line = gray_client.next_line(Duration::from_secs(1)).expect("gray connection not reset");
    assert!(line.starts_with(&format!("closed\t{}", libc::ECONNABORTED)), "{line}");
    expect_ok(&gray_client, "base-1", vip);
    assert_eq!(base_client.next_line(QUIET), None, "the base connection must stay up");

    // The gray pod's namespace is known now: the next reset finds it there first.
    let gray_cgroup_id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&gray.cgroup).unwrap());
    assert!(finder.learned(gray_cgroup_id).is_some(), "where the gray pod's socket was is remembered");

    // Without the directory, the pod cannot be reached: counted as failed and kept.
    wait_tracked(&lc.sb, 2);
    lc.sb.dp.dp.tables_mut().replace_backends(1, lane_id("gray"), &[]).unwrap();
    lc.sb.dp.dp.tables_mut().replace_backends(1, lane_id("base"), &[]).unwrap();
    let mut view = lifecycle::MapSnapshot::read(lc.sb.dp.dp.tables()).expect("read the maps");
    let mut blind = lifecycle::netns::Finder::new(None);
    let report =
        lifecycle::reset_stale(lc.sb.dp.dp.tables_mut(), hidden, &mut blind, &mut view).expect("reset");
    assert!(report.reset.is_empty() && report.failed == 2 && report.retry(), "{report:?}");
    assert!(report.errors.iter().any(|e| e.contains("cannot reach their network namespace")), "{report:?}");
    assert_eq!(lc.sb.dp.dp.tables().connections().unwrap().len(), 2, "failed ones stay tracked");
    // With it again, both go.
    assert_eq!(lc.reset_with(hidden, &mut finder).reset.len(), 2);
}

#[test]
fn removed_gray_backend_resets_gray_tcp_in_the_same_pass_and_leaves_base_alone() {
    let (mut lc, addrs) = Lifecycle::new(&["gray-1", "base-1"]);
    let vip: SocketAddr = "10.96.5.1:80".parse().unwrap();
    let (_, _, gray_client, base_client) = lc.held_gray_and_base(vip, &addrs);
    let conns = lc.sb.dp.dp.tables().connections().unwrap();
    assert!(conns.iter().any(|(_, r)| r.caller_lane == lane_id("gray") && r.backend_lane == lane_id("gray")));
    assert!(conns.iter().any(|(_, r)| r.caller_lane == lane_id("base") && r.backend_lane == lane_id("base")));

    // The gray endpoint goes: the set empties, then the agent resets what was steered to it.
    let start = Instant::now();
    lc.sb.dp.dp.tables_mut().replace_backends(1, lane_id("gray"), &[]).unwrap();
    let report = lc.reset();
    assert_eq!(report.reset.len(), 1, "{report:?}");
    let line = gray_client.next_line(SEEN).expect("the gray connection was not reset");
    assert!(line.starts_with(&format!("closed\t{}", libc::ECONNABORTED)), "{line}");
    eprintln!("reset seen by the client {:?} after the set changed", start.elapsed());
    // The reconnect falls back to base.
    expect_ok(&gray_client, "base-1", vip);
    // The base caller's connection is untouched.
    assert_eq!(base_client.next_line(QUIET), None, "the base connection must stay up");
    // Nothing more to reset.
    wait_tracked(&lc.sb, 2);
    assert!(lc.reset().reset.is_empty());
}

#[test]
fn connected_udp_is_reset_unconnected_udp_is_untouched() {
    let (mut lc, addrs) = Lifecycle::new(&["gray-1", "base-1"]);
    let vip: SocketAddr = "10.96.5.2:53".parse().unwrap();
    lc.sb.service(vip, Proto::Udp, 1, 0, &[("gray", &[addrs[0]]), ("base", &[addrs[1]])]);
    let gray = lc.sb.caller("gray", Some("gray"));
    let connected = HoldClient::start(&gray.cgroup, &gray.pod.ns, "hold-udp", vip);
    let unconnected = HoldClient::start(&gray.cgroup, &gray.pod.ns, "hold-udp-unconnected", vip);
    expect_ok(&connected, "gray-1", vip);
    expect_ok(&unconnected, "gray-1", vip);
    // Only the connected socket is tracked.
    wait_tracked(&lc.sb, 1);
    assert_eq!(lc.sb.dp.dp.tables().connections().unwrap().len(), 1);

    lc.sb.dp.dp.tables_mut().replace_backends(1, lane_id("gray"), &[]).unwrap();
    let report = lc.reset();
    assert_eq!(report.reset.len(), 1, "{report:?}");
    let line = connected.next_line(SEEN).expect("connected UDP not reset");
    assert!(line.starts_with(&format!("closed\t{}", libc::ECONNABORTED)), "{line}");
    expect_ok(&connected, "base-1", vip);
    assert_eq!(unconnected.next_line(QUIET), None, "an unconnected UDP socket is never touched");
}

#[test]
fn rehome_resets_fallen_back_connections_when_their_lane_returns() {
    let (mut lc, addrs) = Lifecycle::new(&["gray-1", "base-1"]);
    let vip: SocketAddr = "10.96.5.3:80".parse().unwrap();
    lc.sb.service(vip, Proto::Tcp, 1, 0, &[("gray", &[]), ("base", &[addrs[1]])]);
    lc.sb.lane_policy("gray", &["base"], LANE_F_REHOME);
    lc.sb.lane_policy("blue", &["base"], 0);
    let gray = lc.sb.caller("gray", Some("gray"));
    let blue = lc.sb.caller("blue", Some("blue"));
    let gray_client = HoldClient::start(&gray.cgroup, &gray.pod.ns, "hold-tcp", vip);
    let blue_client = HoldClient::start(&blue.cgroup, &blue.pod.ns, "hold-tcp", vip);
    expect_ok(&gray_client, "base-1", vip);
    expect_ok(&blue_client, "base-1", vip);
    wait_tracked(&lc.sb, 2);
    // Nothing is stale while gray has no backend.
    assert!(lc.reset().reset.is_empty());

    // Gray comes back: its fallen-back connection is reset and reconnects into gray.
    lc.sb.dp.dp.tables_mut().replace_backends(1, lane_id("gray"), &[tagger::net::backend(addrs[0])]).unwrap();
    let report = lc.reset();
    assert_eq!(report.reset.len(), 1, "{report:?}");
    assert_eq!(report.reset[0].2, lifecycle::Why::Rehome);
    let line = gray_client.next_line(SEEN).expect("not rehomed");
    assert!(line.starts_with("closed\t"), "{line}");
    expect_ok(&gray_client, "gray-1", vip);
    // Blue has no rehome policy (and no blue backends): untouched.
    assert_eq!(blue_client.next_line(QUIET), None);
}

#[test]
fn the_agent_resets_a_gray_connection_when_its_endpoint_goes_not_ready() {
    let wait = Duration::from_secs(30);
    let mut sb = AgentSandbox::new();
    sb.backend("h-base", None);
    sb.backend("h-gray", Some("gray"));
    sb.caller("gw", Some("gray"));
    let vip: SocketAddr = "10.96.10.9:80".parse().unwrap();
    sb.cluster.service("h", &[vip.ip()], vip.port(), HOLD_PORT, &["h-base", "h-gray"]);
    let _servers: Vec<HoldServer> =
        ["h-base", "h-gray"].iter().map(|n| HoldServer::start(&sb.netns[*n], n, HOLD_PORT)).collect();
    sb.start_agent_on_file(&[]);
    let cg = sb.pod_cgroup("gw");
    sb.wait_for("gw registered and both sets", wait, |t| {
        pod_in_lane(t, &cg, "gray")
            && set_size(t, vip, "base") == Some(1)
            && set_size(t, vip, "gray") == Some(1)
    });
    let client = HoldClient::start(&cg, &sb.netns["gw"].ns, "hold-tcp", vip);
    expect_ok(&client, "h-gray", vip);

    // The gray endpoint goes not ready: the agent empties the set and resets the connection.
    sb.cluster.pods.get_mut("h-gray").unwrap().ready = false;
    sb.write_source_file();
    let line = client.next_line(wait).expect("the agent did not reset the gray connection");
    assert!(line.starts_with(&format!("closed\t{}", libc::ECONNABORTED)), "{line}");
    expect_ok(&client, "h-base", vip);
    // The agent logs the reset after issuing it: on a slow machine (qemu) the client may have
    // reconnected before the line is written.
    let deadline = std::time::Instant::now() + wait;
    while !sb.agent_log().contains("reset stale connection") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = sb.agent_log();
    assert!(log.contains("stale connections will be reset"), "{log}");
    assert!(log.contains("reset stale connection"), "{log}");
}
