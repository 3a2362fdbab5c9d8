//! The agent end to end on the Kubernetes source: the real `tagger-agent` binary and kube-rs
//! watchers against the fake API server (real HTTP and JSON, list/watch, 410, dropped watches,
//! outages), the real kernel datapath, netns pods with kubelet-style cgroups.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tagger_tests::{
    agent::{AgentSandbox, PORT, pod_in_lane, set_size},
    client::LoopClient,
    cluster::NAMESPACE,
    fake_api::FakeApiServer,
    restart::{self, RestartLoad},
};

/// Generous: under qemu TCG on a loaded host the first install (the verifier) alone can take seconds.
const WAIT: Duration = Duration::from_secs(30);

fn vip() -> SocketAddr {
    "10.96.20.1:80".parse().unwrap()
}

fn stale_vip() -> SocketAddr {
    "10.96.20.9:80".parse().unwrap()
}

/// Service `a` with a base and a gray backend, a `stale` Service, and a caller `gw`.
fn sandbox(gw_lane: Option<&str>) -> AgentSandbox {
    let mut sb = AgentSandbox::with_service_a(vip(), gw_lane);
    sb.cluster.service("stale", &[stale_vip().ip()], 80, PORT, &["a-base"]);
    sb
}

/// The sandbox published to a new fake API server, the agent started on it and synced.
fn running(gw_lane: Option<&str>) -> (FakeApiServer, AgentSandbox) {
    let api = FakeApiServer::start();
    let mut sb = sandbox(gw_lane);
    sb.publish_to(&api);
    sb.start_agent_on_api(&api);
    wait_synced(&sb, gw_lane.unwrap_or("base"));
    (api, sb)
}

fn wait_synced(sb: &AgentSandbox, gw_lane: &str) {
    let cg = sb.pod_cgroup("gw");
    sb.wait_for("initial sync", WAIT, |t| {
        pod_in_lane(t, &cg, gw_lane)
            && set_size(t, vip(), "gray") == Some(1)
            && set_size(t, vip(), "base") == Some(1)
            && set_size(t, stale_vip(), "base") == Some(1)
    });
}

#[test]
fn relabel_and_last_gray_endpoint_through_the_api() {
    let (api, mut sb) = running(None);
    assert_eq!(sb.reached("gw", vip(), 30), ["a-base"]);

    // Relabel the caller pod: its new connections go to gray.
    sb.cluster.set_lane("gw", Some("gray"));
    sb.publish_to(&api);
    let cg = sb.pod_cgroup("gw");
    sb.wait_for("gw relabelled gray", WAIT, |t| pod_in_lane(t, &cg, "gray"));
    assert_eq!(sb.reached("gw", vip(), 30), ["a-gray"]);
    // Its addresses (status.podIPs through the watch) are registered in its lane, for the
    // receiving side of the lane option and TC marking.
    let id = tagger::cgroup::CgroupRef::open(&cg).unwrap().id;
    let addrs = [IpAddr::V4(sb.netns["gw"].ip4), IpAddr::V6(sb.netns["gw"].ip6)];
    sb.wait_for("gw's addresses in gray", WAIT, |t| {
        let map = t.pod_addrs().unwrap();
        addrs.iter().all(|a| {
            map.get(&tagger::net::addr_words(*a))
                .is_some_and(|e| e.cgroup == id && e.lane == tagger_common::lane_id("gray"))
        })
    });

    // The last gray endpoint is removed from the EndpointSlice: fallback to base at once.
    sb.cluster.services.get_mut("a").unwrap().backends.retain(|b| b != "a-gray");
    sb.publish_to(&api);
    sb.wait_for("gray set gone", WAIT, |t| set_size(t, vip(), "gray") == Some(0));
    assert_eq!(sb.reached("gw", vip(), 30), ["a-base"]);
}

#[test]
fn api_outage_keeps_the_datapath_and_it_converges_after() {
    let (api, mut sb) = running(Some("gray"));

    // The API server goes away; while it is gone the stale Service is deleted and the gray
    // endpoint stops being ready.
    api.set_unreachable(true);
    api.drop_watches();
    sb.cluster.pods.get_mut("a-gray").unwrap().ready = false;
    sb.cluster.services.remove("stale");
    sb.publish_to(&api);
    api.delete("services", NAMESPACE, "stale");
    api.delete("endpointslices", NAMESPACE, "stale-ipv4");
    api.delete("endpointslices", NAMESPACE, "stale-ipv6");
    std::thread::sleep(Duration::from_secs(2));
    // Outage: the datapath keeps the last state it was given.
    assert_eq!(sb.reached("gw", vip(), 20), ["a-gray"], "the datapath must not change during an outage");
    sb.wait_for("unchanged", Duration::from_secs(1), |t| set_size(t, stale_vip(), "base") == Some(1));

    api.set_unreachable(false);
    sb.wait_for("converged after the outage", WAIT, |t| {
        set_size(t, vip(), "gray") == Some(0) && set_size(t, stale_vip(), "base").is_none()
    });
    assert_eq!(sb.reached("gw", vip(), 20), ["a-base"]);
    assert!(sb.agent_log().contains("watch failed"), "{}", sb.agent_log());
}

#[test]
fn gone_410_relists_without_transient_fallback_and_prunes_stale_entries() {
    let (api, sb) = running(Some("gray"));
    let client = LoopClient::start(&sb.pod_cgroup("gw"), &sb.netns["gw"].ns, vip());

    // Disconnected, history compacted, a Service deleted meanwhile: the watchers' resume gets
    // 410 Gone and they relist.
    api.set_unreachable(true);
    api.drop_watches();
    api.delete("services", NAMESPACE, "stale");
    api.compact();
    std::thread::sleep(Duration::from_millis(500));
    api.set_unreachable(false);
    sb.wait_for("stale Service pruned after the relist", WAIT, |t| {
        set_size(t, stale_vip(), "base").is_none()
    });
    std::thread::sleep(Duration::from_millis(300));
    let summary = client.finish();
    assert_eq!(summary.failed, 0, "{summary:?}");
    assert!(summary.ok > 20, "{summary:?}");
    // No transient fallback: every connection of the gray caller stayed on gray.
    assert_eq!(summary.replies.keys().collect::<Vec<_>>(), ["a-gray"], "{summary:?}");
    assert_eq!(set_size_now(&sb, vip(), "gray"), Some(1));
    let relists =
        api.requests().iter().filter(|r| r.path.contains("services") && r.param("watch").is_none()).count();
    assert!(relists >= 2, "expected an initial list and a relist of services, saw {relists}");
}

#[test]
fn sigkill_restart_on_the_api_source_fails_no_connection() {
    let api = FakeApiServer::start();
    let mut sb = sandbox(Some("gray"));
    let hold_vip: SocketAddr = "10.96.20.2:80".parse().unwrap();
    restart::prepare(&mut sb, hold_vip);
    sb.publish_to(&api);
    sb.start_agent_on_api(&api);
    wait_synced(&sb, "gray");
    sb.wait_for("service h", WAIT, |t| set_size(t, hold_vip, "gray") == Some(1));
    let load = RestartLoad::start(&sb, vip(), hold_vip);
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        sb.agent.as_mut().unwrap().kill();
        std::thread::sleep(Duration::from_millis(200));
        sb.start_agent_on_api(&api);
        sb.wait_for(&format!("restart {round}"), WAIT, |_| {
            sb.agent_log().matches("adopted datapath state").count() > round + 1
        });
    }
    load.check(&sb);
    assert_eq!(sb.reached("gw", vip(), 10), ["a-gray"]);
    assert_eq!(sb.reached("gb", vip(), 10), ["a-base"]);
}

fn set_size_now(sb: &AgentSandbox, vip: SocketAddr, lane: &str) -> Option<u32> {
    let dp = tagger::datapath::Datapath::open(&sb.pins.0).unwrap();
    set_size(dp.tables(), vip, lane)
}

#[test]
fn an_oversized_api_response_is_refused_and_the_datapath_kept() {
    let api = FakeApiServer::start();
    let mut sb = sandbox(Some("gray"));
    sb.publish_to(&api);
    sb.start_agent_on_api_with(&api, &["--api-max-response-mib", "1"]);
    wait_synced(&sb, "gray");

    // A Service of 2 MiB: the real API server refuses objects over 1.5 MiB, a misbehaving one
    // (or something in between) might not. Its watch event, and every relist, is refused.
    let mut stale = api.get("services", NAMESPACE, "stale").expect("service stale");
    stale["metadata"]["annotations"] = serde_json::json!({ "example.com/blob": "x".repeat(2 << 20) });
    api.apply(&stale);
    sb.wait_for("the oversized response refused", WAIT, |_| sb.agent_log().contains("passed 1048576 bytes"));
    // Meanwhile the datapath keeps what it had.
    assert_eq!(sb.reached("gw", vip(), 20), ["a-gray"]);
    sb.wait_for("stale kept", Duration::from_secs(1), |t| set_size(t, stale_vip(), "base") == Some(1));

    // The object is deleted: the next relist fits, and the agent converges.
    api.delete("services", NAMESPACE, "stale");
    sb.wait_for("converged after the oversized object is gone", WAIT, |t| {
        set_size(t, stale_vip(), "base").is_none() && set_size(t, vip(), "gray") == Some(1)
    });
    assert_eq!(sb.reached("gw", vip(), 20), ["a-gray"]);
}

/// A watch that fails again right after each relist (an API server whose history is always
/// compacted past what was listed: `410 Gone` every time) must not make the agent relist in a
/// tight loop: the pauses between relists grow (1 s doubling, with jitter), counted from the
/// LIST requests the API server saw. kube-runtime's default back-off started over at every
/// relist's events, relisting about once a second forever.
#[test]
fn relists_after_repeated_410_back_off_exponentially() {
    let (api, sb) = running(Some("gray"));
    let is_services_list = |r: &tagger_tests::fake_api::RequestRecord| {
        r.resource == Some("services") && r.param("watch").is_none()
    };
    let start = std::time::Instant::now();
    api.expire_watches(true);
    // Resumed watches now get 410 at once; ending the open ones (as their timeout would) makes
    // every watcher resume. Relists follow after 1, 2 and 4 s (each plus up to half again).
    api.end_watches();
    std::thread::sleep(Duration::from_secs(12));
    let lists: Vec<_> =
        api.requests().into_iter().filter(|r| r.at >= start && is_services_list(r)).map(|r| r.at).collect();
    api.expire_watches(false);
    let gaps: Vec<f64> = lists.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    println!("services relists {gaps:?} s apart");
    assert!((3..=5).contains(&lists.len()), "relists of services in 12 s: {}, gaps {gaps:?}", lists.len());
    for pair in gaps.windows(2) {
        assert!(pair[1] > pair[0], "the pauses between relists must grow: {gaps:?}");
    }
    assert!(gaps.last().is_some_and(|g| *g >= 3.5), "the last pause is at least 4 s: {gaps:?}");

    // The datapath kept its state throughout, and the agent relists normally again.
    assert_eq!(set_size_now(&sb, vip(), "gray"), Some(1));
    api.drop_watches();
    sb.wait_for("the watches resume", Duration::from_secs(40), |_| api.open_watches() >= 5);
}
