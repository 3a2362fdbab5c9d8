//! The agent's HTTP endpoints: health, readiness transitions, and a `/metrics` exposition that
//! parses and carries the datapath's real counters.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tagger_tests::{
    agent::{AgentSandbox, PORT, http_get, set_size},
    fake_api::FakeApiServer,
};

fn vip() -> SocketAddr {
    "10.96.30.1:80".parse().unwrap()
}

fn wait_code(port: u16, path: &str, code: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while http_get(port, path).0 != code {
        assert!(Instant::now() < deadline, "{path} never answered {code}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Parses Prometheus text: `name{labels} value` → value, panicking on malformed lines.
fn parse(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("malformed line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        if let Some(open) = series.find('{') {
            assert!(series.ends_with('}'), "unterminated labels in {line:?}");
            assert!(
                series[open + 1..series.len() - 1].split(',').all(|kv| kv.contains("=\"")),
                "bad labels in {line:?}"
            );
        }
        out.insert(series.to_owned(), value);
    }
    out
}

#[test]
fn readiness_follows_the_first_sync_and_metrics_carry_datapath_counters() {
    let api = FakeApiServer::start();
    let mut sb = AgentSandbox::new();
    sb.backend("m-gray", Some("gray"));
    sb.backend("m-base", None);
    sb.caller("gw", Some("gray"));
    sb.cluster.service("m", &[vip().ip()], 80, PORT, &["m-gray", "m-base"]);
    // The API server is down when the agent starts.
    api.set_unreachable(true);
    let kubeconfig = sb.dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let args = sb.agent_args("kubernetes", &["--metrics-addr", "127.0.0.1:0"]);
    sb.start_agent(&args, &[("KUBECONFIG", kubeconfig.to_string_lossy().into_owned())]);
    let port = sb.metrics_port();
    wait_code(port, "/healthz", 200);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(http_get(port, "/readyz").0, 503, "not ready before the first complete view");

    // The API comes up with the cluster: ready once the first sync is applied.
    api.set_unreachable(false);
    for object in sb.cluster.objects() {
        let stored = api.apply(&object);
        if stored["kind"] == "Pod" {
            let name = stored["metadata"]["name"].as_str().unwrap().to_owned();
            sb.set_uid(&name, stored["metadata"]["uid"].as_str().unwrap());
        }
    }
    for object in sb.cluster.objects() {
        if object["kind"] == "EndpointSlice" {
            api.apply(&object);
        }
    }
    wait_code(port, "/readyz", 200);
    let cg = sb.pod_cgroup("gw");
    sb.wait_for("gw registered", Duration::from_secs(15), |t| {
        tagger_tests::agent::pod_in_lane(t, &cg, "gray") && set_size(t, vip(), "gray") == Some(1)
    });
    assert_eq!(sb.reached("gw", vip(), 25), ["m-gray"]);

    let (code, body) = http_get(port, "/metrics");
    assert_eq!(code, 200);
    let m = parse(&body);
    let has = |series: &str| m.get(series).copied().unwrap_or_else(|| panic!("no {series} in\n{body}"));
    assert!((has("tagger_agent_ready") - 1.0).abs() < f64::EPSILON);
    assert!(has("tagger_agent_watch_restarts_total") >= 1.0, "the outage at start restarted watches");
    assert!(has("tagger_agent_last_sync_timestamp_seconds") > 1.7e9);
    assert!(has("tagger_agent_reconcile_duration_seconds_count") >= 1.0);
    assert!(has("tagger_datapath_decisions_total{outcome=\"steered\"}") >= 25.0);
    assert!(
        has(
            "tagger_service_decisions_total{namespace=\"demo\",service=\"m\",port=\"main\",caller_lane=\"gray\",backend_lane=\"gray\",outcome=\"steered\"}"
        ) >= 25.0
    );
    assert!(has("tagger_map_fill_ratio{map=\"TAGGER_SVC_V1\"}") > 0.0);
    assert!((has("tagger_map_capacity{map=\"TAGGER_SVC_V1\"}") - 65536.0).abs() < 0.5);
    assert_eq!(http_get(port, "/nope").0, 404);
}
