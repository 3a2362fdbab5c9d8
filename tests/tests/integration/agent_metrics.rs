//! The agent's HTTP endpoints: health, readiness transitions, and a `/metrics` exposition that
//! parses and carries the datapath's real counters.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tagger_tests::{
    agent::{AgentSandbox, PORT, fresh_metrics, http_get, set_size},
    client::HoldClient,
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

    let (code, body) = fresh_metrics(port);
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
    every_alerted_series_is_exported(&body);
}

/// The shipped alert rules (`deploy/monitoring/rules.yaml`) use only series this agent exports:
/// each family is declared (`# TYPE`), whether or not it has samples yet.
fn every_alerted_series_is_exported(body: &str) {
    // Compiled in: the kernel matrix runs this binary in guests without the repository.
    let rules = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/monitoring/rules.yaml"));
    let declared: std::collections::BTreeSet<&str> =
        body.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    let mut names = std::collections::BTreeSet::new();
    for (i, _) in rules.match_indices("tagger_") {
        let name: String = rules[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        names.insert(name);
    }
    assert!(names.len() >= 7, "{names:?}");
    for name in &names {
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            declared.contains(family),
            "rules.yaml uses {name}, which the agent does not export:\n{body}"
        );
    }
}

/// Inbound counts of pod `b`, from the agent's metrics.
fn inbound_series(port: u16, caller_lane: &str, pod_lane: &str, kind: &str) -> Option<f64> {
    let (_, body) = fresh_metrics(port);
    let series = format!(
        "tagger_inbound_connections_total{{namespace=\"demo\",pod=\"b\",pod_lane=\"{pod_lane}\",caller_lane=\"{caller_lane}\",kind=\"{kind}\"}}"
    );
    parse(&body).get(&series).copied()
}

#[test]
fn the_agent_registers_pod_addresses_and_inbound_counts_reach_metrics_and_the_cli() {
    let mut sb = AgentSandbox::new();
    sb.caller("gw", Some("gray"));
    // `b` is a pod with a cgroup that serves: its listener is the pod's.
    sb.caller("b", Some("gray"));
    let b_vip: SocketAddr = "10.96.30.2:80".parse().unwrap();
    sb.cluster.service("b", &[b_vip.ip()], 80, PORT, &["b"]);
    sb.start_agent_on_file(&["--metrics-addr", "127.0.0.1:0"]);
    let port = sb.metrics_port();
    let b_addr4 = tagger::net::addr_words(std::net::IpAddr::V4(sb.netns["b"].ip4));
    let b_addr6 = tagger::net::addr_words(std::net::IpAddr::V6(sb.netns["b"].ip6));
    let lane_in_map = |t: &tagger::datapath::Tables, lane: &str| {
        let addrs = t.pod_addrs().unwrap();
        [b_addr4, b_addr6]
            .iter()
            .all(|a| addrs.get(a).is_some_and(|e| e.lane == tagger_common::lane_id(lane)))
    };
    sb.wait_for("b's addresses registered in gray", Duration::from_secs(10), |t| {
        lane_in_map(t, "gray") && set_size(t, b_vip, "gray") == Some(1)
    });
    // The server starts after the agent attached (its listener keeps SYNs from then on).
    let listen: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, PORT).into();
    let server = HoldClient::start_with(&sb.pod_cgroup("b"), &sb.netns["b"].ns, "answer", listen, &["b"]);
    assert_eq!(server.next_line(Duration::from_secs(10)).as_deref(), Some("serving"));

    assert_eq!(sb.reached("gw", b_vip, 5), ["b"]);
    assert_eq!(inbound_series(port, "gray", "gray", "in_lane"), Some(5.0));

    // `b` is relabelled base: Service b has base backends only and tagger leaves it to the
    // cluster (passthrough): the node's own Service implementation sends the gray caller to b,
    // with no lane option, so b counts those connections as untagged.
    sb.cluster.set_lane("b", None);
    sb.write_source_file();
    sb.wait_for("b's addresses in base", Duration::from_secs(10), |t| lane_in_map(t, "base"));
    sb.wait_for("service b's base set", Duration::from_secs(10), |t| set_size(t, b_vip, "base") == Some(1));
    assert_eq!(sb.reached("gw", b_vip, 3), ["b"]);
    let (_, body) = fresh_metrics(port);
    let steered = parse(&body);
    assert_eq!(
        steered.get(
            "tagger_service_steered{namespace=\"demo\",service=\"b\",port=\"main\",steering=\"base_only\"}"
        ),
        Some(&0.0),
        "{body}"
    );
    assert_eq!(steered.get("tagger_datapath_decisions_total{outcome=\"passthrough\"}"), Some(&3.0), "{body}");
    assert_eq!(inbound_series(port, "gray", "base", "fell_back"), None);

    let (status, r) = tagger_tests::agent::cli_json(&sb.pins.0, &["stats", "--inbound"]);
    assert!(status.success(), "{r}");
    assert_eq!(r["totals"]["in_lane"], 5, "{r}");
    assert_eq!(r["totals"]["fell_back"], 0, "{r}");
    assert_eq!(r["totals"]["untagged"], 3, "{r}");
    assert_eq!(r["totals"]["leak"], 0, "{r}");
    assert!(r["rows"].as_array().unwrap().iter().all(|row| row["pod"] == "demo/b"), "{r}");
    drop(server);
}

/// The shipped Grafana dashboard's panel queries (`deploy/monitoring/dashboard.json`).
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/monitoring/dashboard.json"
    )))
    .unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("a panel title").to_owned();
        let targets = panel["targets"].as_array().expect("panel targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            out.push((title.clone(), t["expr"].as_str().expect("a PromQL expr").to_owned()));
        }
    }
    out
}

/// A real Prometheus (Debian's) scrapes a real agent on a sandboxed node with lane traffic (a
/// gray caller steered to a gray backend, and falling back at a Service without one, received by
/// a base pod): every panel of the shipped dashboard returns data.
#[test]
fn a_real_prometheus_scrapes_the_agent_and_every_dashboard_panel_has_data() {
    if !tagger_tests::prometheus::Prometheus::installed() {
        eprintln!("skipped: prometheus is not installed (`cargo xtask test` installs Debian's)");
        return;
    }
    let mut sb = AgentSandbox::new();
    sb.backend("a-gray", Some("gray"));
    sb.backend("a-base", None);
    sb.caller("gw", Some("gray"));
    // `b` is a base pod with a cgroup that serves: its inbound counts are the receiving side.
    sb.caller("b", None);
    let (a, b): (SocketAddr, SocketAddr) =
        ("10.96.30.5:80".parse().unwrap(), "10.96.30.6:80".parse().unwrap());
    sb.cluster.service("a", &[a.ip()], 80, PORT, &["a-gray", "a-base"]);
    // b has a blue version and none in gray: tagger steers b, and gray falls back to base there.
    sb.backend("b-blue", Some("blue"));
    sb.cluster.service("b", &[b.ip()], 80, PORT, &["b", "b-blue"]);
    sb.start_agent_on_file(&["--metrics-addr", "127.0.0.1:0"]);
    let port = sb.metrics_port();
    sb.wait_for("the sets", Duration::from_secs(10), |t| {
        set_size(t, a, "gray") == Some(1)
            && set_size(t, b, "base") == Some(1)
            && set_size(t, b, "blue") == Some(1)
    });
    // b serves from its pod cgroup, started after the agent attached (so its SYNs are saved).
    let listen: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, PORT).into();
    let server = HoldClient::start_with(&sb.pod_cgroup("b"), &sb.netns["b"].ns, "answer", listen, &["b"]);
    assert_eq!(server.next_line(Duration::from_secs(10)).as_deref(), Some("serving"));
    let prometheus = tagger_tests::prometheus::Prometheus::start(&[format!("127.0.0.1:{port}")]);
    assert_eq!(sb.reached("gw", a, 10), ["a-gray"]);
    assert_eq!(sb.reached("gw", b, 10), ["b"], "gray falls back to base at b");

    // Rates need two scrapes after the traffic; scrapes come every second.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut empty: Vec<(String, String)> = dashboard_queries();
    while !empty.is_empty() {
        empty.retain(|(_, expr)| prometheus.query(expr).is_empty());
        assert!(
            Instant::now() < deadline,
            "dashboard panels without data: {empty:#?}\nwhat there is: {:?}\nprometheus log:\n{}",
            prometheus.query(
                "sum by (service, caller_lane, backend_lane, outcome) (tagger_service_decisions_total)"
            ),
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // And the data is the traffic's.
    let fell_back = prometheus.query(
        "sum by (service, caller_lane) (increase(tagger_service_decisions_total{outcome=\"fell_back\"}[5m]))",
    );
    assert!(
        fell_back.iter().any(|r| r["metric"]["service"] == "b" && r["metric"]["caller_lane"] == "gray"),
        "{fell_back:?}"
    );
    drop(server);
}

/// One thread of a child process held in a ptrace stop (only that thread stops; the rest of the
/// process runs on) until dropped. This is how the test makes the reconciler stall for real,
/// with no hook in the agent.
struct FrozenThread(libc::pid_t);

impl FrozenThread {
    fn freeze(tid: libc::pid_t) -> Self {
        // SAFETY: ptrace and waitpid on a thread of our own child; no memory is passed.
        unsafe {
            assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0), 0, "PTRACE_SEIZE {tid}");
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0, "PTRACE_INTERRUPT {tid}");
            let mut status = 0;
            assert_eq!(libc::waitpid(tid, &raw mut status, libc::__WALL), tid, "the thread stops");
        }
        Self(tid)
    }
}

impl Drop for FrozenThread {
    fn drop(&mut self) {
        // SAFETY: as above; the thread is in a ptrace stop, so it can be detached, and it resumes.
        unsafe {
            libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0);
        }
    }
}

/// The thread of process `pid` named `name`.
fn thread_named(pid: u32, name: &str) -> libc::pid_t {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|t| t.file_name().to_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no thread {name} in process {pid}"))
}

#[test]
fn healthz_fails_while_the_reconciler_is_stalled_and_recovers() {
    let mut sb = AgentSandbox::new();
    sb.backend("h-base", None);
    sb.caller("gw", None);
    sb.cluster.service("h", &[vip().ip()], 80, PORT, &["h-base"]);
    sb.start_agent_on_file(&["--metrics-addr", "127.0.0.1:0", "--reconciler-stall-after", "3"]);
    let port = sb.metrics_port();
    wait_code(port, "/readyz", 200);
    // Ready and idle: the loop turns every 2 s (lease renewals), so 3 s without a turn is a stall.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(http_get(port, "/healthz"), (200, "ok\n".to_owned()));

    let pid = sb.agent.as_ref().expect("agent").pid();
    let frozen = FrozenThread::freeze(thread_named(pid, "reconciler"));
    wait_code(port, "/healthz", 503);
    let (_, body) = http_get(port, "/healthz");
    assert!(body.starts_with("unhealthy: reconciler stalled (no heartbeat for "), "{body}");
    let (_, metrics) = fresh_metrics(port);
    assert_eq!(parse(&metrics).get("tagger_agent_healthy"), Some(&0.0), "{metrics}");
    assert!(sb.agent_log().contains("unhealthy: reconciler stalled"), "{}", sb.agent_log());

    drop(frozen);
    wait_code(port, "/healthz", 200);
    assert_eq!(parse(&fresh_metrics(port).1).get("tagger_agent_healthy"), Some(&1.0));
    assert!(sb.agent_log().contains("healthy again"), "{}", sb.agent_log());
}

/// `tagger lanes coverage` cluster-wide (`--prometheus`: a real Prometheus, Debian's, scraping
/// the real agent) equals the node's own report from its pins, on the demo's node with lane
/// traffic through the chain: the gray lane stops at B, whose pods call C, which has a gray
/// version. Then the graph renders with graphviz, when installed.
#[test]
fn the_cluster_wide_coverage_report_is_the_nodes_and_names_where_gray_stops() {
    use tagger_tests::demo_node::{A, C, DemoNode, send};
    if !tagger_tests::prometheus::Prometheus::installed() {
        eprintln!("skipped: prometheus is not installed (`cargo xtask test` installs Debian's)");
        return;
    }
    let mut sb = AgentSandbox::new();
    let node = DemoNode::start(&mut sb, &["--metrics-addr", "127.0.0.1:0"]);
    let prometheus =
        tagger_tests::prometheus::Prometheus::start(&[format!("127.0.0.1:{}", sb.metrics_port())]);
    let gray = "a-gray[gray] -> b-base[base] -> c-base[base]";
    assert_eq!(send(&sb, "gw-gray", A, 8), [(gray.to_owned(), 8)].into());
    assert_eq!(send(&sb, "gw-base", A, 5).values().sum::<usize>(), 5);
    assert_eq!(send(&sb, "gw-gray", C, 3), [("c-gray[gray]".to_owned(), 3)].into());

    let (status, local) = tagger_tests::agent::cli_json(&sb.pins.0, &["lanes", "coverage"]);
    assert!(status.success(), "{local}");
    let lanes = local["lanes"].as_array().expect("lanes");
    let gray_lane = lanes.iter().find(|l| l["lane"] == "gray").expect("lane gray");
    assert_eq!(gray_lane["summary"], "lane gray: gray stops at demo/b", "{local:#}");
    let stop = &gray_lane["stops"][0];
    assert_eq!((&stop["service"]["name"], &stop["breaks"]), (&"b".into(), &true.into()), "{local:#}");
    assert_eq!(stop["lane_capable_callees"][0]["name"], "c", "{local:#}");
    let edge = |caller: &str, service: &str| {
        gray_lane["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["caller"]["name"] == caller && e["service"]["name"] == service)
            .cloned()
    };
    assert_eq!(edge("gw-gray", "a").expect("gw-gray → a")["verdicts"]["held"], 8, "{local:#}");
    assert_eq!(edge("a", "b").expect("a → b")["verdicts"]["fell_back"], 8, "{local:#}");

    // Cluster-wide, once Prometheus has scraped the agent after the traffic: the same report.
    let url = format!("http://127.0.0.1:{}", prometheus.port());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, cluster) =
            tagger_tests::agent::cli_json(&sb.pins.0, &["lanes", "coverage", "--prometheus", &url]);
        assert!(status.success(), "{cluster}");
        let same = ["lanes", "base_edges", "observed"].iter().all(|k| cluster[k] == local[k]);
        if same {
            assert!(
                cluster["source"].as_str().unwrap().starts_with("prometheus http://127.0.0.1:"),
                "{cluster}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster-wide report never matched the node's:\nnode: {local:#}\ncluster: {cluster:#}\nprometheus log:\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // A window: increase() over the last 10 minutes holds the same edges (rounded).
    let (status, windowed) = tagger_tests::agent::cli_json(
        &sb.pins.0,
        &["lanes", "coverage", "--prometheus", &url, "--window", "10m"],
    );
    assert!(status.success(), "{windowed}");
    assert!(windowed["source"].as_str().unwrap().ends_with(", last 10m"), "{windowed}");

    let graph = tagger_tests::demo_node::coverage_graph(&sb);
    assert!(graph.listed);
    if let Some(svg) = graph.svg {
        let svg = svg.unwrap_or_else(|e| panic!("graphviz refused the graph: {e}"));
        assert!(std::fs::read_to_string(svg).unwrap().contains("gray stops here"));
    }
    drop(node);
}
