//! Maps filled to capacity end to end through the agent: more Services than the frontends map
//! holds arrive through the Kubernetes watch. The agent keeps running, counts the overflow,
//! reports the full map in `tagger status`, leaves out the same Services whatever the order
//! they arrived in (the last by namespace/name), keeps steering the ones that fit, and takes
//! the left-out ones in once room is freed.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use tagger::net::{Proto, frontend_key};
use tagger_common::maps::{MAP_FRONTENDS, MAX_FRONTENDS};
use tagger_tests::{
    agent::{AgentSandbox, fresh_metrics, http_get, set_size},
    cluster::NAMESPACE,
    fake_api::FakeApiServer,
};

/// Generous: the agent decodes and installs tens of thousands of Services.
const WAIT: Duration = Duration::from_mins(2);
/// Services beyond the frontends map's capacity.
const OVER: u32 = 64;

fn vip() -> SocketAddr {
    "10.96.30.1:80".parse().unwrap()
}

/// The `i`-th filler Service's address: 10.100.0.0 + i.
fn filler_vip(i: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i)), 80)
}

fn filler_name(i: u32) -> String {
    format!("fill-{i:05}")
}

/// A ClusterIP Service with one port and no endpoints.
fn filler(i: u32) -> serde_json::Value {
    let ip = filler_vip(i).ip().to_string();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": filler_name(i), "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": "main", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    })
}

fn has_frontend(t: &tagger::datapath::Tables, vip: SocketAddr) -> bool {
    t.frontend(&frontend_key(vip, Proto::Tcp)).ok().flatten().is_some()
}

fn frontends(t: &tagger::datapath::Tables) -> usize {
    t.fill().into_iter().find(|(m, ..)| *m == MAP_FRONTENDS).map_or(0, |(_, n, _)| n)
}

/// `tagger_agent_input_warnings{kind="capacity"}` from the agent's /metrics.
fn capacity_warnings(port: u16) -> Option<u64> {
    let (_, body) = fresh_metrics(port);
    body.lines()
        .find(|l| l.starts_with("tagger_agent_input_warnings{") && l.contains("kind=\"capacity\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn more_services_than_the_frontends_map_holds() {
    let api = FakeApiServer::start();
    let mut sb = AgentSandbox::with_service_a(vip(), Some("gray"));
    sb.publish_to(&api);
    // The fillers arrive in reverse name order: which ones are left out must not depend on it.
    let total = MAX_FRONTENDS + OVER;
    for i in (0..total).rev() {
        api.apply(&filler(i));
    }
    let t0 = Instant::now();
    sb.start_agent_on_api_with(&api, &["--metrics-addr", "127.0.0.1:0"]);
    // Service `a` sorts first, so it fits; of the fillers, the last by name are left out:
    // `a` plus MAX_FRONTENDS - 1 fillers fill the map.
    let kept = MAX_FRONTENDS - 1;
    sb.wait_for("the frontends map full", WAIT, |t| {
        frontends(t) == MAX_FRONTENDS as usize && set_size(t, vip(), "gray") == Some(1)
    });
    eprintln!("frontends map full {:?} after the agent started", t0.elapsed());
    let dp = tagger::datapath::Datapath::open(&sb.pins.0).unwrap();
    let t = dp.tables();
    assert!(has_frontend(t, filler_vip(0)));
    assert!(has_frontend(t, filler_vip(kept - 1)));
    for i in kept..total {
        assert!(!has_frontend(t, filler_vip(i)), "{} should be left out", filler_name(i));
    }
    // Counted, the agent alive and ready, Service `a` still steered.
    let port = sb.metrics_port();
    // (The map fills during the pass; the counts are published at its end.)
    let deadline = Instant::now() + WAIT;
    let warned = loop {
        match capacity_warnings(port) {
            Some(n) => break n,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            None => panic!("no capacity warnings in /metrics:\n{}", fresh_metrics(port).1),
        }
    };
    assert!(warned >= 1, "capacity warnings: {warned}");
    assert_eq!(http_get(port, "/readyz").0, 200);
    assert!(sb.agent.as_mut().unwrap().running(), "{}", sb.agent_log());
    assert_eq!(sb.reached("gw", vip(), 10), ["a-gray"]);

    // `tagger status` reports the map full.
    let (_, r) = tagger_tests::agent::cli_json(&sb.pins.0, &["status"]);
    let m = r["maps"].as_array().unwrap().iter().find(|m| m["map"] == MAP_FRONTENDS).expect("frontends map");
    assert_eq!(m["entries"], u64::from(MAX_FRONTENDS), "{m}");
    assert_eq!(m["capacity"], MAX_FRONTENDS, "{m}");
    assert_eq!(m["fill_ratio"], 1.0, "{m}");

    // Room freed: the first OVER + 1 fillers are deleted, and every one left out comes in.
    for i in 0..=OVER {
        api.delete("services", NAMESPACE, &filler_name(i));
    }
    sb.wait_for("the left-out Services taken in", WAIT, |t| {
        (kept..total).all(|i| has_frontend(t, filler_vip(i))) && !has_frontend(t, filler_vip(0))
    });
    sb.wait_for("frontends", Duration::from_secs(5), |t| frontends(t) == MAX_FRONTENDS as usize);
    assert_eq!(sb.reached("gw", vip(), 10), ["a-gray"]);
}
