//! The agent end to end on the file source: the real `tagger-agent` binary, the real kernel
//! datapath, netns pods with kubelet-style cgroups, and the YAML file edited under it.

use std::{net::SocketAddr, path::Path, time::Duration};

use tagger_tests::{
    agent::{AgentSandbox, PORT, fresh_metrics, http_get, pod_in_lane, set_ips, set_size},
    client::{Attempt, Mode, attempts},
    restart::{self, RestartLoad},
};

/// Generous: under qemu TCG on a loaded host the first install (the verifier) alone can take seconds.
const WAIT: Duration = Duration::from_secs(30);

fn vip() -> SocketAddr {
    "10.96.10.1:80".parse().unwrap()
}

/// A node with service `a` (base and gray backends) and a caller `gw` in `lane`.
fn sandbox(gw_lane: Option<&str>) -> AgentSandbox {
    AgentSandbox::with_service_a(vip(), gw_lane)
}

fn wait_ready(sb: &AgentSandbox, gw_lane: &str) {
    let cg = sb.pod_cgroup("gw");
    sb.wait_for("gw registered and service a's sets", WAIT, |t| {
        pod_in_lane(t, &cg, gw_lane)
            && set_size(t, vip(), "base") == Some(1)
            && set_size(t, vip(), "gray") == Some(1)
    });
}

#[test]
fn relabel_fallback_and_return_through_the_file() {
    let mut sb = sandbox(None);
    sb.start_agent_on_file(&[]);
    wait_ready(&sb, "base");
    assert_eq!(sb.reached("gw", vip(), 30), ["a-base"], "unlabelled caller is base");

    // The pod is relabelled gray: its new connections go to gray.
    sb.cluster.set_lane("gw", Some("gray"));
    sb.write_source_file();
    let cg = sb.pod_cgroup("gw");
    sb.wait_for("gw in gray", WAIT, |t| pod_in_lane(t, &cg, "gray"));
    assert_eq!(sb.reached("gw", vip(), 30), ["a-gray"]);

    // The last gray endpoint goes (not ready): gray callers fall back to base at once.
    sb.cluster.pods.get_mut("a-gray").unwrap().ready = false;
    sb.write_source_file();
    sb.wait_for("gray set emptied", WAIT, |t| set_size(t, vip(), "gray") == Some(0));
    assert_eq!(sb.reached("gw", vip(), 30), ["a-base"]);

    // It comes back: gray again.
    sb.cluster.pods.get_mut("a-gray").unwrap().ready = true;
    sb.write_source_file();
    sb.wait_for("gray set back", WAIT, |t| set_size(t, vip(), "gray") == Some(1));
    assert_eq!(sb.reached("gw", vip(), 30), ["a-gray"]);
    // One log line per fallback transition of (Service, lane), not one per connection.
    let log = sb.agent_log();
    assert_eq!(log.matches("demo/a:main: lane gray has no ready backend").count(), 1, "{log}");
    assert_eq!(log.matches("demo/a:main: lane gray has ready backends again").count(), 1, "{log}");

    // A container of the pod (a child cgroup) is in the pod's lane.
    let ctr = sb.container_cgroup("gw");
    let got = attempts(&ctr, &sb.netns["gw"].ns, Mode::Tcp, vip(), 20);
    assert!(got.iter().all(|a| a.reply() == "a-gray"), "{got:?}");
}

#[test]
fn lanes_config_chain_strict_and_reload() {
    let mut sb = sandbox(Some("feature-x"));
    let lanes = sb.write_lanes_config("lanes:\n  feature-x:\n    fallback: [gray, base]\n");
    sb.start_agent_on_file(&["--lanes-config", &lanes.to_string_lossy()]);
    wait_ready(&sb, "feature-x");
    assert_eq!(sb.reached("gw", vip(), 30), ["a-gray"], "feature-x falls back to gray first");

    // Reload: feature-x becomes strict, so with no feature-x backend the connect is refused.
    sb.write_lanes_config("lanes:\n  feature-x:\n    strict: true\n");
    sb.wait_for("strict policy", WAIT, |t| {
        t.lane_policies()
            .is_ok_and(|p| p.get(&tagger_common::lane_id("feature-x")).is_some_and(|p| p.flags == 1))
    });
    for a in sb.call("gw", vip(), 5) {
        assert!(matches!(a, Attempt::Err { errno: libc::EPERM, .. }), "{a:?}");
    }

    // An invalid config is rejected and the previous one stays in force.
    sb.write_lanes_config("lanes:\n  feature-x:\n    strict: true\n    fallback: [base]\n");
    std::thread::sleep(Duration::from_millis(500));
    assert!(sb.agent_log().contains("lanes config rejected"), "{}", sb.agent_log());
    for a in sb.call("gw", vip(), 3) {
        assert!(matches!(a, Attempt::Err { errno: libc::EPERM, .. }), "{a:?}");
    }
}

#[test]
fn bad_input_is_counted_or_rejected_and_nothing_applied_is_lost() {
    let mut sb = sandbox(Some("gray"));
    sb.start_agent_on_file(&["--metrics-addr", "127.0.0.1:0"]);
    let port = sb.metrics_port();
    wait_ready(&sb, "gray");
    assert_eq!(sb.reached("gw", vip(), 20), ["a-gray"]);

    // A malformed file: rejected whole, the datapath keeps serving the previous state.
    let path = sb.write_source_file();
    std::fs::write(&path, "apiVersion: v1\nkind: Service\nmetadata: {name: broken\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(sb.agent_log().contains("source file rejected"), "{}", sb.agent_log());
    assert_eq!(sb.reached("gw", vip(), 20), ["a-gray"]);

    // Valid YAML with things to skip: an unknown kind, an invalid lane label, a Service without
    // ports, a duplicate endpoint, an IPv6 endpoint (a family the IPv4 VIP cannot use).
    sb.backend("b-bad-label", None);
    sb.cluster
        .pods
        .get_mut("b-bad-label")
        .unwrap()
        .labels
        .insert("tagger.io/lane".into(), "not a valid value!".into());
    sb.cluster.service("b", &["10.96.10.2".parse().unwrap()], 80, PORT, &["b-bad-label", "b-bad-label"]);
    sb.cluster.service("c", &["10.96.10.3".parse().unwrap()], 80, PORT, &[]);
    let mut yaml = sb.cluster.to_yaml();
    yaml.push_str(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: demo}\ndata: {a: b}\n",
    );
    yaml.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: noports, namespace: demo}\nspec: {clusterIP: 10.96.10.4}\n");
    std::fs::write(&path, yaml).unwrap();
    sb.sync_cluster_lb();
    let b_vip: SocketAddr = "10.96.10.2:80".parse().unwrap();
    sb.wait_for("service b", WAIT, |t| set_size(t, b_vip, "base") == Some(1));
    assert_eq!(sb.reached("gw", vip(), 20), ["a-gray"], "service a unaffected");
    // The pod with the invalid label is a base backend: Service b has base backends only, and
    // the cluster (tagger leaves b to it) sends the gray caller there.
    assert_eq!(sb.reached("gw", b_vip, 10), ["b-bad-label"]);
    let (code, body) = fresh_metrics(port);
    assert_eq!(code, 200, "{body}");
    for line in [
        "tagger_agent_input_warnings{kind=\"invalid_lane_label\"}",
        "tagger_agent_input_warnings{kind=\"service_without_ports\"}",
        "tagger_agent_input_warnings{kind=\"duplicate_endpoint\"}",
        "tagger_agent_ignored_objects_total{kind=\"ConfigMap\"} 1",
        "tagger_agent_source_errors_total 1",
        "tagger_agent_ready 1",
    ] {
        assert!(body.contains(line), "missing {line} in\n{body}");
    }
    assert_eq!(http_get(port, "/readyz").0, 200);
    assert_eq!(http_get(port, "/healthz").0, 200);
}

#[test]
fn sigkill_and_restart_under_load_fail_no_connection() {
    let mut sb = sandbox(Some("gray"));
    let hold_vip: SocketAddr = "10.96.10.2:80".parse().unwrap();
    restart::prepare(&mut sb, hold_vip);
    sb.start_agent_on_file(&[]);
    wait_ready(&sb, "gray");
    sb.wait_for("service h", WAIT, |t| set_size(t, hold_vip, "gray") == Some(1));
    let load = RestartLoad::start(&sb, vip(), hold_vip);
    let args = {
        let path = sb.write_source_file();
        sb.agent_args(&format!("file:{}", path.display()), &[])
    };
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        sb.agent.as_mut().unwrap().kill();
        std::thread::sleep(Duration::from_millis(200));
        sb.start_agent(&args, &[]);
        sb.wait_for(&format!("restart {round} adopted"), WAIT, |_| {
            sb.agent_log().matches("adopted datapath state").count() > round + 1
        });
    }
    load.check(&sb);
    assert!(sb.agent_log().contains("Adopted"), "restarts must adopt the pins:\n{}", sb.agent_log());
    assert_eq!(sb.reached("gw", vip(), 10), ["a-gray"]);
    assert_eq!(sb.reached("gb", vip(), 10), ["a-base"]);
}

#[test]
fn sigterm_leaves_the_datapath_and_uninstall_removes_it() {
    let mut sb = sandbox(Some("gray"));
    sb.start_agent_on_file(&[]);
    wait_ready(&sb, "gray");
    assert_eq!(sb.agent.as_mut().unwrap().terminate(), Some(0), "{}", sb.agent_log());
    assert_eq!(sb.reached("gw", vip(), 20), ["a-gray"], "steering continues with the agent stopped");

    let mut un = tagger_tests::agent::AgentProcess::start(
        &["--uninstall".into(), "--bpffs".into(), sb.pins.0.to_string_lossy().into_owned()],
        &[],
        &sb.dir.0.join("uninstall.log"),
    );
    assert_eq!(un.wait_exit(WAIT), Some(0));
    assert!(!sb.pins.0.exists());
    // Nothing of tagger is left on the hooks: the node's own Service implementation balances
    // the gray caller over every backend, as it does every pod without tagger.
    assert_eq!(sb.reached("gw", vip(), 30), ["a-base", "a-gray"], "uninstalled: the cluster balances");
}

#[test]
fn a_pod_whose_cgroup_appears_late_is_registered_when_it_does() {
    let mut sb = sandbox(Some("gray"));
    // The cgroup kubelet would create does not exist yet.
    let cg = sb.pod_cgroup("gw");
    std::fs::remove_dir(&cg).unwrap();
    sb.start_agent_on_file(&[]);
    sb.wait_for("service a", WAIT, |t| set_size(t, vip(), "gray") == Some(1));
    std::thread::sleep(Duration::from_millis(300));
    std::fs::create_dir_all(&cg).unwrap();
    sb.wait_for("gw registered once its cgroup exists", WAIT, |t| pod_in_lane(t, &cg, "gray"));
    assert_eq!(sb.reached("gw", vip(), 10), ["a-gray"]);
}

#[test]
fn missing_cgroup_root_or_bpffs_is_a_clear_startup_error() {
    let mut sb = sandbox(None);
    let path = sb.write_source_file();
    let source = format!("file:{}", path.display());
    let mut args = sb.agent_args(&source, &[]);
    let root_at = args.iter().position(|a| a == "--cgroup-root").unwrap() + 1;
    args[root_at] = "/sys/fs/cgroup/unified/tgt-no-such-root".into();
    sb.start_agent(&args, &[]);
    assert_eq!(sb.agent.as_mut().unwrap().wait_exit(WAIT), Some(1));
    assert!(sb.agent_log().contains("--cgroup-root"), "{}", sb.agent_log());

    let mut args = sb.agent_args(&source, &[]);
    let bpffs_at = args.iter().position(|a| a == "--bpffs").unwrap() + 1;
    let not_bpffs = sb.dir.0.join("pins");
    args[bpffs_at] = not_bpffs.to_string_lossy().into_owned();
    sb.start_agent(&args, &[]);
    assert_eq!(sb.agent.as_mut().unwrap().wait_exit(WAIT), Some(1));
    assert!(sb.agent_log().contains("not on a bpf filesystem"), "{}", sb.agent_log());
    assert!(!Path::new(&not_bpffs).exists());
}

/// Kubernetes' rolling update under load: keep-alive HTTP clients (8 pooled connections, every
/// fourth request taking 500 ms) send requests back to back to a Service tagger steers, while
/// its two base backends are replaced one by one. Each old pod turns terminating (still
/// serving) and drains gracefully (its open connections get `Connection: close` on their next
/// answer), then goes. Not one request may fail: tagger sends no new connection to a
/// terminating backend and resets none of its open ones.
#[test]
fn a_rolling_update_loses_no_request() {
    let mut sb = AgentSandbox::new();
    let report = tagger_tests::rollout::rolling_update(&mut sb, "10.96.10.7:80".parse().unwrap(), 2, 8);
    assert_eq!(report.failed, 0, "requests failed during the rolling update: {report:?}\n{}", sb.agent_log());
    assert!(report.requests > 100, "too few requests to tell: {report:?}");
    // The new pods took over; the old ones served until they went (which of them the 8 pooled
    // connections first landed on is random).
    for name in ["r-3", "r-4"] {
        assert!(report.served.get(name).is_some_and(|n| *n > 0), "{name} served nothing: {report:?}");
    }
    assert!(report.served.get("r-1").or(report.served.get("r-2")).is_some(), "{report:?}");
    assert!(!report.served.contains_key("r-gray"), "a base caller reached gray: {report:?}");
    assert_eq!(report.resets, 0, "{}", sb.agent_log());
}

/// Kubernetes' own Service semantics hold inside each lane, decided by the real datapath from
/// the agent's sets: `internalTrafficPolicy: Local` keeps every lane step on this node (a gray
/// caller whose gray backends are all elsewhere goes to base on this node, not to a remote
/// gray pod), `trafficDistribution: PreferClose` prefers this node's zone within the lane and
/// follows the Node's zone label when it changes, zone hints do the same, and a lane whose
/// endpoints are all terminating but still serving keeps serving its callers.
#[test]
fn kubernetes_service_semantics_hold_inside_each_lane() {
    const NODE2: &str = "node-2";
    let mut sb = AgentSandbox::new();
    sb.caller("gw-gray", Some("gray"));
    sb.caller("gw-base", None);
    sb.cluster.nodes.insert(tagger_tests::agent::NODE.to_owned(), Some("z1".into()));
    let on = |sb: &mut AgentSandbox, name: &str, lane: Option<&str>, node: &str, zone: &str| {
        sb.backend(name, lane);
        let p = sb.cluster.pods.get_mut(name).unwrap();
        p.node = node.to_owned();
        p.zone = Some(zone.to_owned());
    };
    // internalTrafficPolicy: Local.
    let local: SocketAddr = "10.96.11.1:80".parse().unwrap();
    on(&mut sb, "l-here", None, tagger_tests::agent::NODE, "z1");
    on(&mut sb, "l-there", None, NODE2, "z1");
    on(&mut sb, "l-gray-here", Some("gray"), tagger_tests::agent::NODE, "z1");
    on(&mut sb, "l-gray-there", Some("gray"), NODE2, "z1");
    sb.cluster.service("l", &[local.ip()], 80, PORT, &["l-here", "l-there", "l-gray-here", "l-gray-there"]);
    sb.cluster.services.get_mut("l").unwrap().internal_traffic_policy = Some("Local");
    // trafficDistribution: PreferClose, gray in both zones.
    let close: SocketAddr = "10.96.11.2:80".parse().unwrap();
    on(&mut sb, "c-gray-z1", Some("gray"), NODE2, "z1");
    on(&mut sb, "c-gray-z2", Some("gray"), NODE2, "z2");
    on(&mut sb, "c-base", None, NODE2, "z2");
    sb.cluster.service("c", &[close.ip()], 80, PORT, &["c-gray-z1", "c-gray-z2", "c-base"]);
    sb.cluster.services.get_mut("c").unwrap().traffic_distribution = Some("PreferClose");
    // Zone hints (as the EndpointSlice controller writes them for topology-aware routing).
    let hinted: SocketAddr = "10.96.11.3:80".parse().unwrap();
    on(&mut sb, "h-gray-z1", Some("gray"), NODE2, "z1");
    on(&mut sb, "h-gray-z2", Some("gray"), NODE2, "z2");
    sb.cluster.service("h", &[hinted.ip()], 80, PORT, &["h-gray-z1", "h-gray-z2"]);
    sb.cluster.services.get_mut("h").unwrap().zone_hints = true;
    // A gray lane whose only endpoint is terminating but still serving.
    let term: SocketAddr = "10.96.11.4:80".parse().unwrap();
    on(&mut sb, "t-gray", Some("gray"), NODE2, "z2");
    on(&mut sb, "t-base", None, NODE2, "z2");
    sb.cluster.pods.get_mut("t-gray").unwrap().terminating = true;
    sb.cluster.service("t", &[term.ip()], 80, PORT, &["t-gray", "t-base"]);
    sb.start_agent_on_file(&[]);
    sb.wait_for("every Service's sets", WAIT, |t| {
        set_size(t, local, "base") == Some(1)
            && set_size(t, close, "gray") == Some(1)
            && set_size(t, hinted, "gray") == Some(1)
            && set_size(t, term, "gray") == Some(1)
    });

    assert_eq!(sb.reached("gw-base", local, 20), ["l-here"], "Local: this node's base endpoint only");
    assert_eq!(sb.reached("gw-gray", local, 20), ["l-gray-here"], "Local: this node's gray endpoint only");
    assert_eq!(sb.reached("gw-gray", close, 20), ["c-gray-z1"], "PreferClose: gray in this node's zone");
    assert_eq!(sb.reached("gw-base", close, 10), ["c-base"], "base stays base");
    assert_eq!(sb.reached("gw-gray", hinted, 20), ["h-gray-z1"], "hints: gray hinted for this zone");
    assert_eq!(sb.reached("gw-gray", term, 20), ["t-gray"], "a lane of terminating endpoints still serves");

    // The node's zone label changes: the preference follows.
    sb.cluster.nodes.insert(tagger_tests::agent::NODE.to_owned(), Some("z2".into()));
    sb.write_source_file();
    let c_gray_z2 = sb.ip4("c-gray-z2");
    sb.wait_for("PreferClose follows the zone", WAIT, |t| set_ips(t, close, "gray") == [c_gray_z2]);
    assert_eq!(sb.reached("gw-gray", close, 20), ["c-gray-z2"]);
    assert_eq!(sb.reached("gw-gray", hinted, 20), ["h-gray-z2"]);

    // No gray endpoint on this node any more: the only gray one is remote, so a gray caller
    // gets base on this node (tagger leaves l to the cluster now: it has no lane set here, and
    // the cluster's Local policy gives the same answer), never the remote gray pod.
    sb.cluster.services.get_mut("l").unwrap().backends.retain(|b| b != "l-gray-here");
    sb.write_source_file();
    sb.wait_for("l without a local gray endpoint", WAIT, |t| set_size(t, local, "gray").unwrap_or(0) == 0);
    assert_eq!(sb.reached("gw-gray", local, 20), ["l-here"], "Local: no gray endpoint here, so base here");
    // A ready gray endpoint appears: the terminating one gets no new connection.
    on(&mut sb, "t-gray-new", Some("gray"), NODE2, "z2");
    sb.cluster.services.get_mut("t").unwrap().backends.push("t-gray-new".into());
    sb.write_source_file();
    let t_new = sb.ip4("t-gray-new");
    sb.wait_for("the ready gray endpoint replaces the terminating one", WAIT, |t| {
        set_ips(t, term, "gray") == [t_new]
    });
    assert_eq!(sb.reached("gw-gray", term, 20), ["t-gray-new"]);
}

/// `--bpf-log`: the datapath writes a record of each steering decision (caller lane and pod
/// cgroup, backend lane, outcome) and the agent logs it under `tagger::datapath`, reporting the
/// feature; an agent restarted with the flag again (its programs loaded afresh, for their ring)
/// still gets them; one restarted without it replaces the programs and no record is written.
#[test]
fn bpf_log_puts_each_steering_decision_in_the_agent_log() {
    use std::os::unix::fs::MetadataExt as _;

    let mut sb = sandbox(Some("gray"));
    let gray = format!("{:#010x}", tagger_common::lane_id("gray"));
    let cgroup_id = std::fs::metadata(sb.pod_cgroup("gw")).unwrap().ino();
    let steered = format!("caller lane {gray} (pod cgroup {cgroup_id}) -> backend lane {gray}: steered");
    // The datapath's records in the part of the (appended) log written since `from`.
    let records = |sb: &AgentSandbox, from: usize| -> Vec<String> {
        sb.agent_log()[from..].lines().filter(|l| l.contains("tagger::datapath")).map(str::to_owned).collect()
    };
    let wait_steered = |sb: &AgentSandbox, from: usize| {
        let deadline = std::time::Instant::now() + WAIT;
        while !records(sb, from).iter().any(|l| l.contains(&steered)) {
            assert!(std::time::Instant::now() < deadline, "no {steered:?} record:\n{}", sb.agent_log());
            assert_eq!(sb.reached("gw", vip(), 2), ["a-gray"]);
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let restart = |sb: &mut AgentSandbox, extra: &[&str]| -> usize {
        assert_eq!(sb.agent.as_mut().unwrap().terminate(), Some(0), "{}", sb.agent_log());
        let from = sb.agent_log().len();
        sb.start_agent_on_file(extra);
        let deadline = std::time::Instant::now() + WAIT;
        // Another level, or the log on: the programs are loaded again and swapped in.
        while !sb.agent_log()[from..].contains("upgrade finished") {
            assert!(std::time::Instant::now() < deadline, "no upgrade:\n{}", sb.agent_log());
            std::thread::sleep(Duration::from_millis(50));
        }
        from
    };

    sb.start_agent_on_file(&["--bpf-log", "--metrics-addr", "127.0.0.1:0"]);
    wait_ready(&sb, "gray");
    wait_steered(&sb, 0);
    let (_, metrics) = fresh_metrics(sb.metrics_port());
    let features = tagger::cli::status::parse_features(&metrics);
    assert!(features["bpf_log"].available, "{metrics}");
    assert!(features["bpf_log"].detail.contains("tagger::datapath"), "{metrics}");

    let from = restart(&mut sb, &["--bpf-log"]);
    wait_steered(&sb, from);

    let from = restart(&mut sb, &[]);
    assert_eq!(sb.reached("gw", vip(), 20), ["a-gray"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(records(&sb, from), Vec::<String>::new(), "the log is off again");
    assert!(!sb.agent_log()[from..].contains("bpf_log"), "{}", sb.agent_log());
}
