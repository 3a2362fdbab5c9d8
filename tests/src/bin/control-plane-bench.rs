//! `control-plane-bench`: measures the agent's control plane against the fake API server:
//! initial sync time and peak RSS for a large cluster, and API event → map write latency.
//! Not a test (no assertions on time): `cargo xtask bench` and developers run it as root.
//!
//! Usage: `control-plane-bench [--pods N] [--services N] [--endpoints-per-service N]
//!         [--local-pods N] [--changes N] [--agent PATH]`

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::json;
use tagger::datapath::Datapath;
use tagger_common::lane_id;
use tagger_tests::{
    agent::{AgentProcess, PinDir, TempDir, workspace_bin},
    cgroup::TestCgroup,
    datapath::{BPFFS, ensure_bpffs},
    fake_api::FakeApiServer,
    unique_name,
};

struct Opts {
    pods: usize,
    services: usize,
    endpoints_per_service: usize,
    local_pods: usize,
    changes: usize,
    agent: PathBuf,
}

fn opts() -> Opts {
    let mut o = Opts {
        pods: 10_000,
        services: 5_000,
        endpoints_per_service: 20,
        local_pods: 100,
        changes: 200,
        agent: PathBuf::new(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--pods" => o.pods = v.parse().expect("--pods"),
            "--services" => o.services = v.parse().expect("--services"),
            "--endpoints-per-service" => {
                o.endpoints_per_service = v.parse().expect("--endpoints-per-service");
            }
            "--local-pods" => o.local_pods = v.parse().expect("--local-pods"),
            "--changes" => o.changes = v.parse().expect("--changes"),
            "--agent" => o.agent = PathBuf::from(v),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    if o.agent.as_os_str().is_empty() {
        o.agent = workspace_bin("tagger-agent");
    }
    o
}

fn pod_ip(i: usize) -> Ipv4Addr {
    let [_, _, hi, lo] = u32::try_from(i + 256).expect("pod index").to_be_bytes();
    Ipv4Addr::new(10, 244, hi, lo)
}

fn pod_json(i: usize, local: bool, gray: bool) -> serde_json::Value {
    let mut labels = BTreeMap::from([("app".to_owned(), format!("app-{}", i % 500))]);
    if gray {
        labels.insert("tagger.io/lane".into(), "gray".into());
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pod-{i}"), "namespace": "bench", "labels": labels},
        "spec": {"nodeName": if local { "node-1" } else { "node-2" }, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "qosClass": "Burstable", "podIP": pod_ip(i).to_string()},
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "index math"
    )]
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Peak resident set size (`VmHWM`) in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Fills the API server: pods (the first `local_pods` on this node, their cgroups created as
/// kubelet would), Services and one EndpointSlice each.
fn populate(api: &FakeApiServer, o: &Opts, root: &TestCgroup) {
    for i in 0..o.pods {
        let stored = api.apply(&pod_json(i, i < o.local_pods, i % 10 == 0));
        if i < o.local_pods {
            let uid = stored["metadata"]["uid"].as_str().expect("uid").to_owned();
            let _ = root.child(&format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            ));
        }
    }
    for s in 0..o.services {
        let [_, _, hi, lo] = u32::try_from(s).expect("service index").to_be_bytes();
        let vip = Ipv4Addr::new(10, 96, hi, lo);
        api.apply(&json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{s}"), "namespace": "bench"},
            "spec": {"clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        }));
        let endpoints: Vec<_> = (0..o.endpoints_per_service)
            .map(|k| {
                let p = (s * o.endpoints_per_service + k) % o.pods;
                json!({"addresses": [pod_ip(p).to_string()], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("pod-{p}")}})
            })
            .collect();
        api.apply(&json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("svc-{s}-abc"), "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": format!("svc-{s}")}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }));
    }
}

fn main() {
    let o = opts();
    tagger_tests::require_root();
    ensure_bpffs();
    let api = FakeApiServer::builder().history_limit(1_000_000).start();
    let root = TestCgroup::new(&unique_name("root"));
    let pins = PinDir(Path::new(BPFFS).join(unique_name("pins")));
    let dir = TempDir::new();

    let load = Instant::now();
    populate(&api, &o, &root);
    eprintln!("loaded the fake API server in {:?}", load.elapsed());

    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let args: Vec<String> = [
        "--source",
        "kubernetes",
        "--node-name",
        "node-1",
        "--cgroup-root",
        &root.path().to_string_lossy(),
        "--bpffs",
        &pins.0.to_string_lossy(),
        "--metrics-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let started = Instant::now();
    let mut agent = AgentProcess::start_with(
        &o.agent,
        &args,
        &[("KUBECONFIG", kubeconfig.to_string_lossy().into_owned())],
        &dir.0.join("agent.log"),
        &std::env::var("TAGGER_BENCH_AGENT_LOG")
            .unwrap_or_else(|_| "warn,tagger::agent::status=info".to_owned()),
    );
    let (frontends_wanted, pods_wanted) = (o.services, o.local_pods);
    // /readyz turns 200 right after the first complete view has been written to the maps. Polling
    // it is cheap; iterating the maps every few ms would take CPU from the agent being measured.
    let port = agent.metrics_port();
    while tagger_tests::agent::http_get(port, "/readyz").0 != 200 {
        assert!(started.elapsed() < Duration::from_mins(5), "initial sync did not finish:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(2));
    }
    let sync = started.elapsed();
    let cpu_ms = cpu_time_ms(agent.pid());
    let dp = Datapath::open(&pins.0).expect("open the pins");
    let t = dp.tables();
    assert_eq!(
        (t.frontends().map_or(0, |f| f.len()), t.pods().map_or(0, |p| p.len())),
        (frontends_wanted, pods_wanted),
        "ready before the maps were complete"
    );
    if std::env::var_os("TAGGER_BENCH_AGENT_LOG").is_some() {
        eprintln!("agent log up to the end of the initial sync:\n{}", agent.log());
    }
    let rss_after_sync = peak_rss_mib(agent.pid());
    println!(
        "initial sync: {} pods ({} local), {} Services, {} endpoints: {:.0} ms from agent start to the last map write; peak RSS {:.1} MiB",
        o.pods,
        o.local_pods,
        o.services,
        o.services * o.endpoints_per_service,
        sync.as_secs_f64() * 1e3,
        rss_after_sync
    );
    println!(
        "agent CPU time (user + system) during the initial sync: {cpu_ms} ms (the rest of the wall time is \
         the fake API server serving the lists, and the machine's other load)"
    );

    // Event → map write: relabel one local pod at a time and wait for its lane in the map.
    let mut latencies = Vec::with_capacity(o.changes);
    let pods_by_lane = |t: &tagger::datapath::Tables, lane: u32| {
        t.pods().map_or(0, |p| p.values().filter(|e| e.lane == lane).count())
    };
    let mut gray: Vec<bool> = (0..o.local_pods).map(|i| i % 10 == 0).collect();
    for c in 0..o.changes {
        let i = c % o.local_pods;
        gray[i] = !gray[i];
        let to_gray = gray[i];
        let before = pods_by_lane(dp.tables(), lane_id("gray"));
        let t0 = Instant::now();
        api.apply(&pod_json(i, true, to_gray));
        let want = if to_gray { before + 1 } else { before - 1 };
        while pods_by_lane(dp.tables(), lane_id("gray")) != want {
            assert!(t0.elapsed() < Duration::from_secs(30), "change {c} not applied:\n{}", agent.log());
            std::hint::spin_loop();
        }
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    println!(
        "event -> map write over {} label changes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    println!("agent peak RSS at the end: {:.1} MiB", peak_rss_mib(agent.pid()));
    agent.kill();
    drop(dp);
}

/// CPU time (user + system) a process has used so far, in ms.
fn cpu_time_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command: state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    ticks * 1000 / hz
}
