//! tagger beside a socket-LB CNI: a foreign socket load balancer (tests/foreign-lb, a stand-in
//! for Cilium's socket LB, Calico eBPF's connect-time LB or Kmesh) is attached at the test tree's
//! root cgroup **before** the agent starts, as a CNI is on a real node. The agent attaches at
//! kubelet's pods cgroup (`kubepods.slice`) below it, so the kernel runs tagger's programs
//! first: tagger steers its lane Services, the foreign LB still serves its own VIPs, and
//! `getpeername` shows each VIP. `tagger status` lists the foreign programs after tagger's.
//!
//! Also: a datapath attached at the cgroup root by an earlier release moves to the pods cgroup
//! on the next start with no failed connection.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use tagger_tests::{
    agent::{AgentSandbox, PORT, cli_json, pod_in_lane, set_size, workspace_bin},
    cgroup::TestCgroup,
    client::{Attempt, Mode, attempts},
    foreign_lb::ForeignLb,
    restart::{self, RestartLoad},
};

/// Generous: under qemu TCG on a loaded host an install (the verifier) took 18 s in one guest
/// run, and this file's three tests each start one at the same time (a move loads the programs
/// again). Only a failing test waits this long.
const WAIT: Duration = Duration::from_mins(2);

/// tagger's Service `a` (a base and a gray backend).
fn vip4() -> SocketAddr {
    "10.96.30.1:80".parse().unwrap()
}
fn vip6() -> SocketAddr {
    "[fd00:96::30:1]:80".parse().unwrap()
}

/// A node with tagger's Service `a` (IPv4 and IPv6 ClusterIPs, backends `a-base`, `a-gray`),
/// a gray caller `gw`, and `lb-backend`, a pod only the foreign LB knows.
fn sandbox() -> AgentSandbox {
    let mut sb = AgentSandbox::with_service_a(vip4(), Some("gray"));
    sb.cluster.service("a", &[vip4().ip(), vip6().ip()], 80, PORT, &["a-base", "a-gray"]);
    sb.backend("lb-backend", None);
    sb
}

/// The foreign LB at the sandbox's root cgroup, serving `vips` (each IPv4 VIP with `backend`'s
/// IPv4 address, each IPv6 one with its IPv6 address).
fn foreign_lb(sb: &AgentSandbox, vips: &[SocketAddr], backend: &str) -> ForeignLb {
    let mut lb = ForeignLb::attach(sb.root.path());
    serve(&mut lb, sb, vips, backend);
    lb
}

/// Points the foreign LB's `vips` at `backend` (on [`PORT`]).
fn serve(lb: &mut ForeignLb, sb: &AgentSandbox, vips: &[SocketAddr], backend: &str) {
    let pod = &sb.netns[backend];
    for vip in vips {
        let ip: std::net::IpAddr = if vip.is_ipv4() { pod.ip4.into() } else { pod.ip6.into() };
        lb.serve(*vip, SocketAddr::new(ip, PORT));
    }
}

/// The foreign LB's own VIPs (not tagger's Services).
fn lb_vips() -> [SocketAddr; 2] {
    ["10.97.0.20:80".parse().unwrap(), "[fd00:97::20]:80".parse().unwrap()]
}

/// `count` TCP connects from `caller` to `vip`: every one must reach exactly `want`, and the
/// application's `getpeername` must show `vip`.
fn assert_reaches(sb: &AgentSandbox, caller: &str, vip: SocketAddr, want: &str) {
    for a in attempts(&sb.pod_cgroup(caller), &sb.netns[caller].ns, Mode::Tcp, vip, 10) {
        match a {
            Attempt::Ok { reply, peer } => {
                assert_eq!(reply, want, "{caller} → {vip}\n{}", sb.agent_log());
                assert_eq!(peer, vip, "{caller} → {vip}: getpeername shows the backend");
            }
            Attempt::Err { errno, message } => panic!("{caller} → {vip}: errno {errno} {message}"),
        }
    }
}

/// Waits until the agent registered `gw` in gray and published Service `a`'s gray set at
/// each of `vips`.
fn wait_ready(sb: &AgentSandbox, vips: &[SocketAddr]) {
    let cg = sb.pod_cgroup("gw");
    sb.wait_for("gw in gray and service a's sets", WAIT, |t| {
        pod_in_lane(t, &cg, "gray") && vips.iter().all(|v| set_size(t, *v, "gray") == Some(1))
    });
}

/// The programs `tagger status -o json` lists on one hook, in run order.
fn hook<'a>(status: &'a Value, attach_type: &str) -> &'a Vec<Value> {
    status["attach"]["hooks"]
        .as_array()
        .expect("attach.hooks")
        .iter()
        .find(|h| h["attach_type"] == attach_type)
        .unwrap_or_else(|| panic!("no hook {attach_type}: {status}"))["programs"]
        .as_array()
        .expect("programs")
}

#[test]
fn tagger_runs_before_a_socket_lb_attached_at_the_root_first() {
    let mut sb = sandbox();
    let lb = foreign_lb(&sb, &lb_vips(), "lb-backend");
    // The foreign LB serves before tagger is there, as a CNI does on a node tagger joins.
    assert_reaches(&sb, "gw", lb_vips()[0], "lb-backend");

    sb.start_agent_on_file(&[]);
    wait_ready(&sb, &[vip4(), vip6()]);

    // tagger steers its lane Service: the gray caller reaches the gray backend only, and sees
    // the ClusterIP as its peer (tagger's getpeername runs first and restores it).
    for vip in [vip4(), vip6()] {
        assert_reaches(&sb, "gw", vip, "a-gray");
    }
    // The foreign LB still serves its own VIPs, getpeername included: tagger left them alone.
    for vip in lb_vips() {
        assert_reaches(&sb, "gw", vip, "lb-backend");
    }

    // `tagger status` shows where each runs: tagger at kubepods.slice first, the foreign LB at
    // the root after it.
    let (_, st) = cli_json(&sb.pins.0, &["status"]);
    let kubepods = std::fs::canonicalize(sb.kubepods()).unwrap();
    let root = std::fs::canonicalize(sb.root.path()).unwrap();
    assert_eq!(st["attach"]["cgroup_path"], kubepods.display().to_string(), "{st}");
    assert_eq!(st["attach"]["at_cgroup_root"], false, "{st}");
    assert_eq!(st["attach"]["others_before_tagger"], 0, "{st}");
    let foreign = lb.program_ids();
    for (attach_type, tagger_name, lb_name, lb_id) in [
        ("cgroup_inet4_connect", "connect4", "flb_connect4", foreign[0]),
        ("cgroup_inet6_connect", "connect6", "flb_connect6", foreign[1]),
        ("cgroup_inet4_getpeername", "getpeername4", "flb_peer4", foreign[2]),
        ("cgroup_inet6_getpeername", "getpeername6", "flb_peer6", foreign[3]),
    ] {
        let programs = hook(&st, attach_type);
        let tagger = programs.iter().find(|p| p["tagger"] == true).expect("tagger's program");
        let other = programs.iter().find(|p| p["program_id"] == lb_id).unwrap_or_else(|| panic!("{st}"));
        assert_eq!(
            (&tagger["name"], &tagger["attached_at"], &tagger["attach_flags"]),
            (&Value::from(tagger_name), &Value::from(kubepods.display().to_string()), &Value::from("multi")),
            "{attach_type}: {programs:?}"
        );
        assert_eq!(
            (&other["name"], &other["attached_at"], &other["prog_type"], other["tagger"].as_bool()),
            (
                &Value::from(lb_name),
                &Value::from(root.display().to_string()),
                &Value::from("cgroup_sock_addr"),
                Some(false)
            ),
            "{attach_type}: {programs:?}"
        );
        assert!(tagger["order"].as_u64() < other["order"].as_u64(), "{attach_type}: {programs:?}");
    }
    // Hooks the foreign LB does not use show tagger's program alone.
    assert_eq!(hook(&st, "cgroup_udp4_sendmsg").len(), 1, "{st}");
    let out = std::process::Command::new(workspace_bin("tagger"))
        .arg("--bpffs")
        .arg(&sb.pins.0)
        .arg("status")
        .output()
        .expect("run tagger status");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("$ tagger status\n{text}");
    for want in ["flb_connect4", "flb_peer6", "← tagger", "in the order they run"] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    assert!(!text.contains("WARNING"), "{text}");
    drop(lb);
}

#[test]
fn a_socket_lb_attached_the_legacy_way_above_tagger_is_never_silently_disabled() {
    // BPF_F_ALLOW_OVERRIDE: a program below would replace it for every pod. Exclusive: the kernel
    // refuses programs below. Either way tagger refuses to attach, naming the program, and the
    // socket LB keeps serving. The sandbox's own Service implementation holds the root with a
    // link (multi, as on a node), so the legacy LB sits at kubepods.slice and tagger is asked
    // to attach below it.
    for (flags, says) in [(1, "BPF_F_ALLOW_OVERRIDE"), (0, "exclusively")] {
        let sb = sandbox();
        let mut lb = ForeignLb::attach_legacy(&sb.kubepods(), flags);
        serve(&mut lb, &sb, &lb_vips(), "lb-backend");
        tagger_tests::datapath::ensure_bpffs();
        let below = sb.kubepods().join("kubepods-burstable.slice");
        let err = tagger::datapath::Datapath::install(&sb.pins.0, &below).unwrap_err().to_string();
        let id = lb.program_ids()[0];
        assert!(err.contains(says) && err.contains(&format!("program id {id} ")), "{err}");
        assert!(!sb.pins.0.join("links/connect4").exists(), "nothing attached");
        assert_reaches(&sb, "gw", lb_vips()[0], "lb-backend");
    }
}

#[test]
fn a_datapath_attached_at_the_root_by_an_earlier_release_moves_to_the_pods_cgroup() {
    // The earlier release at the root must see the VIPs first: no socket LB attached before it.
    let mut sb = AgentSandbox::with_service_a(vip4(), Some("gray")).without_cluster_lb();
    let hold_vip: SocketAddr = "10.96.30.2:80".parse().unwrap();
    restart::prepare(&mut sb, hold_vip);
    let root = sb.root.path().to_string_lossy().into_owned();
    // The earlier release: attached at --cgroup-root itself.
    sb.start_agent_on_file(&["--attach-cgroup", &root]);
    wait_ready(&sb, &[vip4()]);
    sb.wait_for("service h", WAIT, |t| set_size(t, hold_vip, "gray") == Some(1));
    assert_eq!(link_cgroups(&sb), [TestCgroup::resolve(sb.root.path()).id]);
    let load = RestartLoad::start(&sb, vip4(), hold_vip);

    // The new release starts on the pinned datapath with the default attach point.
    assert_eq!(sb.agent.as_mut().unwrap().terminate(), Some(0));
    sb.start_agent_on_file(&[]);
    let kubepods = TestCgroup::resolve(&sb.kubepods()).id;
    let deadline = std::time::Instant::now() + WAIT;
    while link_cgroups(&sb) != [kubepods] {
        assert!(std::time::Instant::now() < deadline, "links not moved: {}", sb.agent_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every new connection during the move reached the gray backend, and the held ones were
    // never touched (the hook ran throughout: attached below first, then detached above).
    load.check(&sb);
    assert!(sb.agent_log().contains("Moved"), "{}", sb.agent_log());
    let leftovers: Vec<_> = std::fs::read_dir(sb.pins.0.join("links"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("moving-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The distinct cgroups tagger's links are attached at.
fn link_cgroups(sb: &AgentSandbox) -> Vec<u64> {
    let mut ids: Vec<u64> = tagger::datapath::PROGRAMS
        .iter()
        .filter_map(|p| tagger::sys::link_info(&sb.pins.0.join("links").join(p)).ok()?.cgroup.map(|c| c.0))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}
