//! The datapath lease with the real agent: a SIGKILLed agent's datapath keeps steering for the
//! lease, then leaves Service connections to the cluster (a stand-in for kube-proxy answers the
//! VIP in the caller's namespace) and counts them; a restarted agent re-arms it at its first
//! complete pass and not before, also when it is an upgrade; a running agent renews it through an
//! API server outage; `--datapath-lease 0` never expires.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde_json::Value;
use tagger::{datapath::Datapath, sys::monotonic_now_ns};
use tagger_common::{LEASE_NEVER, Outcome};
use tagger_tests::{
    agent::{AgentSandbox, cli_json, fresh_metrics, pod_in_lane, set_size, workspace_bin},
    backend::{BackendServer, service_stand_in},
    client::HoldClient,
    fake_api::FakeApiServer,
};

/// Generous: under qemu TCG the first install (the verifier) alone can take seconds.
const WAIT: Duration = Duration::from_secs(30);

fn vip() -> SocketAddr {
    "10.96.14.1:80".parse().unwrap()
}

/// Service `a` (base and gray backends), a gray caller `gw`, and the cluster's own Service
/// implementation as `gw` sees it.
fn sandbox() -> (AgentSandbox, BackendServer) {
    // The cluster's implementation here answers as `kube-proxy` (a local address of gw's
    // namespace), so that a connection tagger left alone is told apart from a steered one.
    let sb = AgentSandbox::with_service_a(vip(), Some("gray")).without_cluster_lb();
    let kube_proxy = service_stand_in(&sb.netns["gw"], vip(), "kube-proxy");
    (sb, kube_proxy)
}

fn wait_ready(sb: &AgentSandbox) {
    let cg = sb.pod_cgroup("gw");
    sb.wait_for("gw registered and service a's sets", WAIT, |t| {
        pod_in_lane(t, &cg, "gray") && set_size(t, vip(), "gray") == Some(1)
    });
}

/// `tagger status -o json`'s `lease`.
fn lease_status(sb: &AgentSandbox) -> Value {
    let (_, json) = cli_json(&sb.pins.0, &["status", "--agent-addr", "127.0.0.1:1"]);
    json["lease"].clone()
}

fn wait_lease_state(sb: &AgentSandbox, state: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let lease = lease_status(sb);
        if lease["state"] == state {
            return lease;
        }
        assert!(Instant::now() < deadline, "the lease never became {state}: {lease}\n{}", sb.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lease_expired_count(sb: &AgentSandbox) -> u64 {
    Datapath::open_read_only(&sb.pins.0).unwrap().tables().counters().unwrap().get(Outcome::LeaseExpired)
}

fn agent_args(sb: &AgentSandbox, extra: &[&str]) -> Vec<String> {
    let path = sb.dir.0.join("cluster.yaml");
    sb.agent_args(&format!("file:{}", path.display()), extra)
}

/// Replaces the source file with one that does not parse: the agent that reads it has no view,
/// so it never completes a pass.
fn break_source_file(sb: &AgentSandbox) {
    std::fs::write(sb.dir.0.join("cluster.yaml"), "kind: Service\nmetadata: {name: broken\n").unwrap();
}

fn wait_log(sb: &AgentSandbox, what: &str, times: usize) {
    let deadline = Instant::now() + WAIT;
    while sb.agent_log().matches(what).count() < times {
        assert!(Instant::now() < deadline, "never logged {what:?} {times} time(s):\n{}", sb.agent_log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_agents_datapath_steers_for_the_lease_then_leaves_connections_to_the_cluster() {
    let (mut sb, _kube_proxy) = sandbox();
    sb.start_agent_on_file(&["--datapath-lease", "5s", "--metrics-addr", "127.0.0.1:0"]);
    // Ready first: the endpoints are served once the datapath is installed, which under qemu
    // TCG on a busy host can take longer than the port helper waits.
    wait_ready(&sb);
    let port = sb.metrics_port();
    assert_eq!(sb.reached("gw", vip(), 10), ["a-gray"]);
    let armed = wait_lease_state(&sb, "armed");
    assert_eq!((armed["steering"].as_bool(), armed["duration_seconds"].as_f64()), (Some(true), Some(5.0)));
    let (_, metrics) = fresh_metrics(port);
    assert!(metrics.contains("tagger_datapath_lease_expired 0\n"), "{metrics}");
    assert!(metrics.contains("tagger_datapath_lease_remaining_seconds "), "{metrics}");
    let mut held = HoldClient::start(&sb.pod_cgroup("gw"), &sb.netns["gw"].ns, "peer-tcp", vip());
    let line = held.next_line(WAIT).expect("the held connection connects");
    assert_eq!(line, format!("ok\ta-gray\t{}", vip()));

    // Killed: the datapath keeps steering with its last state while the lease lasts.
    sb.agent.as_mut().unwrap().kill();
    let deadline = Datapath::open_read_only(&sb.pins.0).unwrap().tables().lease().unwrap().deadline_ns;
    assert_eq!(sb.reached("gw", vip(), 5), ["a-gray"], "steering continues within the lease");
    assert!(
        monotonic_now_ns() < deadline,
        "the connections outlasted the 5 s lease (a slow machine): they prove nothing about it"
    );

    // Past the lease: Service connections go to the cluster's implementation, counted.
    let expired = wait_lease_state(&sb, "expired");
    assert_eq!(expired["steering"].as_bool(), Some(false), "{expired}");
    let before = lease_expired_count(&sb);
    assert_eq!(sb.reached("gw", vip(), 10), ["kube-proxy"], "not steered after the lease");
    assert_eq!(lease_expired_count(&sb) - before, 10);
    let (_, stats) = cli_json(&sb.pins.0, &["stats"]);
    assert!(stats["counters"]["lease_expired"].as_u64() >= Some(10), "{stats}");
    let table = std::process::Command::new(workspace_bin("tagger"))
        .arg("--bpffs")
        .arg(&sb.pins.0)
        .args(["status", "--agent-addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("datapath lease: EXPIRED") && table.contains("steering is OFF"), "{table}");
    // The connection steered before keeps showing the Service address.
    held.tell("peer?");
    assert_eq!(held.next_line(WAIT), Some(format!("peer\t{}", vip())));

    // A new agent without a view (its source does not parse) completes no pass: no renewal.
    break_source_file(&sb);
    let args = agent_args(&sb, &["--datapath-lease", "5s"]);
    sb.start_agent(&args, &[]);
    wait_log(&sb, "source file rejected", 1);
    wait_log(&sb, "adopted datapath state", 2);
    assert_eq!(sb.reached("gw", vip(), 5), ["kube-proxy"], "no pass, no lease");
    assert_eq!(lease_status(&sb)["state"], "expired");

    // Its first complete pass re-arms the lease (and says so): steered again.
    sb.write_source_file();
    wait_log(&sb, "datapath lease re-armed", 1);
    assert_eq!(sb.reached("gw", vip(), 10), ["a-gray"]);
    assert_eq!(wait_lease_state(&sb, "armed")["steering"].as_bool(), Some(true));
    // And keeps it armed past its duration by renewing it.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(sb.reached("gw", vip(), 5), ["a-gray"]);
    assert_eq!(lease_status(&sb)["state"], "armed");
}

#[test]
fn an_upgrade_that_never_completes_its_first_pass_does_not_renew_the_lease() {
    let (mut sb, _kube_proxy) = sandbox();
    sb.start_agent_on_file(&["--datapath-lease", "3s"]);
    wait_ready(&sb);
    assert_eq!(sb.reached("gw", vip(), 5), ["a-gray"]);
    sb.agent.as_mut().unwrap().kill();

    // Another build ran the links (same map layouts, so the lease map is shared): the next
    // agent loads its programs beside them and would switch after its first complete pass.
    for e in std::fs::read_dir(&sb.pins.0).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("object-") {
            std::fs::rename(e.path(), sb.pins.0.join("object-00000000000000aa")).unwrap();
        }
    }
    break_source_file(&sb);
    let args = agent_args(&sb, &["--datapath-lease", "3s"]);
    sb.start_agent(&args, &[]);
    wait_log(&sb, "Upgrading", 1);
    wait_log(&sb, "source file rejected", 1);
    // The old programs serve until the lease the killed agent left runs out: nobody renews it.
    wait_lease_state(&sb, "expired");
    assert_eq!(sb.reached("gw", vip(), 5), ["kube-proxy"]);
    assert!(!sb.agent_log().contains("upgrade finished"), "{}", sb.agent_log());

    // The source is readable again: first pass, lease armed, then the switch.
    sb.write_source_file();
    wait_log(&sb, "upgrade finished", 1);
    wait_log(&sb, "datapath lease re-armed", 1);
    let log = sb.agent_log();
    assert!(
        log.find("datapath lease re-armed") < log.find("upgrade finished"),
        "armed before the switch, so the new programs start with a live lease:\n{log}"
    );
    assert_eq!(sb.reached("gw", vip(), 10), ["a-gray"]);
}

#[test]
fn a_lease_of_zero_never_expires() {
    let (mut sb, _kube_proxy) = sandbox();
    sb.start_agent_on_file(&["--datapath-lease", "0"]);
    wait_ready(&sb);
    let disabled = wait_lease_state(&sb, "disabled");
    assert_eq!(disabled["steering"].as_bool(), Some(true), "{disabled}");
    sb.agent.as_mut().unwrap().kill();
    let lease = Datapath::open_read_only(&sb.pins.0).unwrap().tables().lease().unwrap();
    assert_eq!((lease.deadline_ns, lease.duration_ns), (LEASE_NEVER, 0));
    // Longer than the shortest lease the agent accepts (1 s), with nobody renewing.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(sb.reached("gw", vip(), 10), ["a-gray"]);
    assert_eq!(lease_status(&sb)["state"], "disabled");
    assert_eq!(lease_expired_count(&sb), 0);
}

/// The agent is alive through an API server outage: it keeps the datapath as the API last
/// described it, as kube-proxy on the node does, and keeps renewing the lease.
#[test]
fn a_running_agent_keeps_renewing_the_lease_through_an_api_server_outage() {
    let api = FakeApiServer::start();
    let (mut sb, _kube_proxy) = sandbox();
    sb.publish_to(&api);
    // 4 s: short enough for the outage below to outlast it twice, long enough that a renewal
    // is never late under a loaded qemu TCG guest (2 s lapsed there once).
    sb.start_agent_on_api_with(&api, &["--datapath-lease", "4s"]);
    wait_ready(&sb);
    assert_eq!(wait_lease_state(&sb, "armed")["duration_seconds"].as_f64(), Some(4.0));

    api.set_unreachable(true);
    api.drop_watches();
    wait_log(&sb, "watch failed", 1);
    // Twice the lease into the outage.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(lease_status(&sb)["state"], "armed", "{}", sb.agent_log());
    assert_eq!(sb.reached("gw", vip(), 10), ["a-gray"], "still steered during the outage");
    assert_eq!(lease_expired_count(&sb), 0);
    assert!(!sb.agent_log().contains("re-armed"), "it never lapsed:\n{}", sb.agent_log());
    api.set_unreachable(false);
}
