//! Least privilege, proven on the real kernel: the capabilities the DaemonSet grants (read from
//! `deploy/base/daemonset.yaml`) suffice for every feature, and each one is needed for a named
//! feature ([`needed_for`]).
//!
//! Processes run as the DaemonSet's container would: uid 0 (of the host) with exactly the
//! listed capabilities in the bounding, permitted and effective sets, empty inheritable and
//! ambient sets, `no_new_privs` only if the manifest sets `allowPrivilegeEscalation: false`,
//! and in a private mount namespace where the root filesystem, /sys and the cgroup v2 tree are
//! read-only (`readOnlyRootFilesystem` and the read-only cgroup mount) while bpffs stays
//! writable. `unshare` and `setpriv` (util-linux) set that up. (The container's own PID and
//! network namespaces are what `tests/tests/integration/deploy_image.rs` adds, with the real image.)
//!
//! Two observations per capability:
//! - the kernel's: this test binary re-runs itself confined (the `confined_helper` test, which
//!   does nothing unless asked to) and calls the library directly, with no check of ours in
//!   between: with the full set the install and the reset path (entering a pod's network
//!   namespace, `SOCK_DESTROY` there) succeed; without a capability, its feature fails;
//! - the agent's: the real `tagger-agent`, confined, steers, resets a stale connection and marks
//!   with the full set; without a capability steering needs it refuses to start with a message
//!   naming it, and without one an optional feature needs it reports that feature unavailable.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, SecurityContext},
};
use tagger::{
    cli::status::{AgentFeature, parse_features},
    datapath::Datapath,
};
use tagger_tests::{
    agent::{AgentProcess, AgentSandbox, PinDir, http_get, pod_in_lane, set_size, workspace_bin},
    client::HoldClient,
    datapath::BPFFS,
    hold::HoldServer,
    netns::NetnsDir,
    unique_name,
};

const WAIT: Duration = Duration::from_secs(10);
const HELPER_ENV: &str = "TAGGER_CAPS_HELPER";

fn deploy_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(rel)
}

/// A manifest of `deploy/`, parsed.
fn manifest<T: serde::de::DeserializeOwned>(rel: &str) -> T {
    let text = std::fs::read_to_string(deploy_file(rel)).unwrap();
    serde_saphyr::from_str_with_options(&text, tagger_tests::yaml_options()).unwrap()
}

/// The security context of the DaemonSet's agent container (`deploy/base/daemonset.yaml`),
/// read once.
fn agent_security() -> &'static SecurityContext {
    static SC: std::sync::OnceLock<SecurityContext> = std::sync::OnceLock::new();
    SC.get_or_init(|| {
        let ds: DaemonSet = manifest("base/daemonset.yaml");
        let containers = ds.spec.unwrap().template.spec.unwrap().containers;
        containers[0].security_context.clone().expect("securityContext")
    })
}

/// The capabilities the DaemonSet adds, after checking that it drops everything else.
fn daemonset_capabilities() -> Vec<String> {
    let sc = agent_security();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.clone().expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]), "base/daemonset.yaml: drop ALL");
    let add = caps.add.unwrap_or_default();
    assert!(!add.is_empty());
    add
}

/// What is lost without a capability the DaemonSet adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loss {
    /// The datapath cannot be installed: the agent refuses to start, naming the capability.
    Steering,
    /// An optional feature (its `tagger_agent_feature_available` name) reports itself
    /// unavailable; steering goes on.
    Feature(&'static str),
}

/// The feature each capability is there for. A capability the manifest adds that is not here
/// fails the tests: say what needs it first.
fn needed_for(cap: &str) -> Loss {
    match cap {
        "SYS_ADMIN" => Loss::Steering,
        "NET_ADMIN" => Loss::Feature("connection_reset"),
        other => panic!(
            "the DaemonSet adds {other}, and this test does not know what for: name its feature in needed_for"
        ),
    }
}

/// Whether the DaemonSet's container runs with `no_new_privs` (`allowPrivilegeEscalation:
/// false`).
fn daemonset_no_new_privs() -> bool {
    agent_security().allow_privilege_escalation == Some(false)
}

/// The base ConfigMap's lanes config, as the DaemonSet mounts it.
fn configmap_lanes() -> String {
    let cm: ConfigMap = manifest("base/configmap.yaml");
    cm.data.unwrap()["lanes.yaml"].clone()
}

/// Capability number of a Kubernetes capability name (`BPF`), from `setpriv --list-caps`'
/// numbering, which follows `linux/capability.h`.
fn cap_number(name: &str) -> u32 {
    let out = Command::new("setpriv").arg("--list-caps").output().expect("setpriv (util-linux)");
    let list = String::from_utf8_lossy(&out.stdout);
    let n = list
        .lines()
        .position(|l| l.trim() == name.to_ascii_lowercase())
        .unwrap_or_else(|| panic!("setpriv does not know capability {name}"));
    u32::try_from(n).unwrap()
}

fn mask(caps: &[String]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1u64 << cap_number(c)))
}

/// `unshare … sh -c … setpriv … -- program args…`: `program` confined as described in the
/// module docs, with exactly `caps`.
fn confined(caps: &[String], program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
    let cgroup2 = tagger::cgroup::cgroup2_mount().expect("cgroup2 mount");
    let bounding: Vec<String> = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.to_ascii_lowercase())))
        .collect();
    // $0 is the cgroup2 mount point; the remaining arguments are setpriv's.
    let script = r#"set -e
for m in / /sys "$0"; do mount -o remount,bind,ro "$m"; done
exec setpriv "$@""#;
    let mut command_line: Vec<String> =
        ["--mount", "--propagation", "private", "--", "sh", "-c", script].map(String::from).to_vec();
    command_line.push(cgroup2.to_string_lossy().into_owned());
    command_line.extend([
        "--inh-caps=-all".to_owned(),
        "--ambient-caps=-all".to_owned(),
        format!("--bounding-set={}", bounding.join(",")),
    ]);
    if daemonset_no_new_privs() {
        command_line.push("--no-new-privs".to_owned());
    }
    command_line.extend(["--".to_owned(), program.to_string_lossy().into_owned()]);
    command_line.extend(args.iter().cloned());
    (PathBuf::from("unshare"), command_line)
}

fn without(caps: &[String], drop: &str) -> Vec<String> {
    caps.iter().filter(|c| *c != drop).cloned().collect()
}

// ---------------------------------------------------------------------------------------------
// The kernel's answer: the datapath library, confined, with no check of ours
// ---------------------------------------------------------------------------------------------

/// Not a test by itself: returns at once unless `TAGGER_CAPS_HELPER` is set, which only this
/// file's tests do when they re-run this binary confined. Prints one `HELPER-OK`/`HELPER-ERR`
/// line.
#[test]
fn confined_helper() {
    let Ok(mode) = std::env::var(HELPER_ENV) else { return };
    let bpffs = PathBuf::from(std::env::var("TAGGER_CAPS_HELPER_BPFFS").unwrap());
    let result = match mode.as_str() {
        "install" => {
            let cgroup = PathBuf::from(std::env::var("TAGGER_CAPS_HELPER_CGROUP").unwrap());
            Datapath::install(&bpffs, &cgroup).map(|(_, installed)| format!("{installed:?}"))
        }
        // The reset path: a pod's namespace entered, SOCK_DESTROY asked there.
        "reset" => {
            let dir = PathBuf::from(std::env::var("TAGGER_CAPS_HELPER_NETNS").unwrap());
            let m = tagger::lifecycle::Mechanism::probe(&tagger::lifecycle::netns::Finder::new(Some(
                dir.clone(),
            )));
            if m.available() {
                Ok(m.name())
            } else {
                Err(tagger::Error::Io { path: dir, source: std::io::Error::other(m.name()) })
            }
        }
        // What `kubectl exec ds/tagger-agent -- tagger …` does: open the pins read-only, read.
        "read" => Datapath::open_read_only(&bpffs).and_then(|dp| {
            let t = dp.tables();
            Ok(format!(
                "{} pods, {} frontends, counters {:?}",
                t.pods()?.len(),
                t.frontends()?.len(),
                t.counters()?
            ))
        }),
        other => panic!("unknown helper mode {other}"),
    };
    match result {
        Ok(s) => println!("HELPER-OK {s}"),
        Err(e) => {
            // The whole chain: the errno is in the innermost source.
            let mut chain = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                chain = format!("{chain}: {s}");
                source = s.source();
            }
            println!("HELPER-ERR {}", chain.replace('\n', " "));
        }
    }
}

/// Runs `confined_helper` confined with `caps`; its result line. `netns`: the namespace
/// directory the reset mode probes in.
fn helper(mode: &str, caps: &[String], bpffs: &Path, cgroup: &Path, netns: &Path) -> Result<String, String> {
    let exe = std::env::current_exe().unwrap();
    // The helper's full name in this test binary: `<this module>::confined_helper`.
    let module = module_path!().split_once("::").map_or(module_path!(), |(_, m)| m);
    let name = format!("{module}::confined_helper");
    let test_args = ["--exact", name.as_str(), "--nocapture", "--test-threads=1"].map(String::from);
    let (bin, argv) = confined(caps, &exe, &test_args);
    let out = Command::new(bin)
        .args(argv)
        .env(HELPER_ENV, mode)
        .env("TAGGER_CAPS_HELPER_BPFFS", bpffs)
        .env("TAGGER_CAPS_HELPER_CGROUP", cgroup)
        .env("TAGGER_CAPS_HELPER_NETNS", netns)
        .output()
        .expect("run the helper");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest prints `test …::confined_helper ... ` on the same line, before the helper's output.
    if let Some(ok) = stdout.lines().find_map(|l| l.split_once("HELPER-OK ").map(|(_, r)| r)) {
        return Ok(ok.to_owned());
    }
    if let Some(err) = stdout.lines().find_map(|l| l.split_once("HELPER-ERR ").map(|(_, r)| r)) {
        return Err(err.to_owned());
    }
    panic!(
        "the confined helper did not report:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_kernel_needs_each_capability_and_nothing_more() {
    let caps = daemonset_capabilities();
    let mut sb = AgentSandbox::new();
    sb.caller("pod", Some("gray"));
    let netns = NetnsDir::of(&[&sb.netns["pod"].ns]);
    let root = sb.root.path().to_owned();

    // The full set: installs, and reaches into a pod's namespace to reset.
    let pins = PinDir(Path::new(BPFFS).join(unique_name("pins")));
    let got = helper("install", &caps, &pins.0, &root, netns.path());
    assert!(got.as_deref().is_ok_and(|s| s.starts_with("Attached")), "with {caps:?}: {got:?}");
    let reset = helper("reset", &caps, &pins.0, &root, netns.path());
    assert!(reset.is_ok(), "the reset path with {caps:?}: {reset:?}");
    // The CLI's access, with what `kubectl exec` gets (the container's set), works.
    let read = helper("read", &caps, &pins.0, &root, netns.path());
    assert!(read.is_ok(), "reading the pins with {caps:?}: {read:?}");
    drop(pins);

    // Each one missing: the feature it is there for fails (EPERM from bpf(2), setns or the
    // netlink destroy, or EACCES from the verifier); optional ones leave the install working.
    for cap in &caps {
        let pins = PinDir(Path::new(BPFFS).join(unique_name("pins")));
        let fewer = without(&caps, cap);
        let install = helper("install", &fewer, &pins.0, &root, netns.path());
        let reset = helper("reset", &fewer, &pins.0, &root, netns.path());
        let (feature, err) = match needed_for(cap) {
            Loss::Steering => (
                "steering",
                install.expect_err(&format!("the install succeeded without {cap}: is {cap} needed?")),
            ),
            Loss::Feature(f) => {
                assert!(install.is_ok(), "without {cap} steering still installs: {install:?}");
                (f, reset.expect_err(&format!("{f} works without {cap}: is {cap} needed?")))
            }
        };
        assert!(
            err.contains("Operation not permitted") || err.contains("Permission denied"),
            "without {cap}: {err}"
        );
        let start = err.find("prohibited").map_or(0, |i| i.saturating_sub(100));
        eprintln!("without CAP_{cap}, {feature}: {}", &err[start..err.len().min(start + 300)]);
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's answer
// ---------------------------------------------------------------------------------------------

fn vip() -> SocketAddr {
    "10.96.10.1:80".parse().unwrap()
}

/// Service `h`: the same pods, serving held connections.
fn hold_vip() -> SocketAddr {
    "10.96.10.2:80".parse().unwrap()
}

const HOLD_PORT: u16 = 9090;

/// A node with services `a` and `h` (base and gray backends) and a gray caller `gw`; the
/// holding servers of `h`.
fn sandbox() -> (AgentSandbox, Vec<HoldServer>) {
    tagger_tests::hold::gray_node_with_held_service(vip(), hold_vip(), HOLD_PORT)
}

/// Waits for `/readyz`; then the features.
fn ready_features(sb: &AgentSandbox, port: u16) -> BTreeMap<String, AgentFeature> {
    let deadline = Instant::now() + WAIT;
    while http_get(port, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "/readyz\n{}", sb.agent_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    parse_features(&http_get(port, "/metrics").1)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts the agent confined with `caps` (arguments: the sandbox's plus `extra`).
fn start_confined(sb: &mut AgentSandbox, caps: &[String], extra: &[&str]) {
    let path = sb.write_source_file();
    let args = sb.agent_args(&format!("file:{}", path.display()), extra);
    let (bin, command_line) = confined(caps, &workspace_bin("tagger-agent"), &args);
    let log = sb.dir.0.join("agent.log");
    sb.agent = Some(AgentProcess::start_with(&bin, &command_line, &[], &log, "info,tagger=debug"));
}

/// `/proc/PID/status` of the confined agent once it has exec'd `tagger-agent`.
fn agent_status(pid: u32) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "tagger-agent" {
            return std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        }
        assert!(Instant::now() < deadline, "the agent did not start (comm {comm:?})");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status.lines().find_map(|l| l.strip_prefix(field)).map_or("", str::trim)
}

/// Checks the process is confined as the container would be.
fn assert_confined(pid: u32, caps: &[String]) {
    let status = agent_status(pid);
    let hex = |f: &str| u64::from_str_radix(status_field(&status, f), 16).unwrap();
    let want = mask(caps);
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(hex(set), want, "{set} of the agent: {status}");
    }
    assert_eq!((hex("CapInh:"), hex("CapAmb:")), (0, 0));
    let nnp = if daemonset_no_new_privs() { "1" } else { "0" };
    assert_eq!(status_field(&status, "NoNewPrivs:"), nnp);
    assert_eq!(status_field(&status, "Uid:").split_whitespace().next(), Some("0"));
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mountinfo.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).unwrap();
    assert!(root.split_whitespace().nth(5).unwrap().split(',').any(|o| o == "ro"), "root read-only: {root}");
}

#[test]
fn the_agent_steers_resets_and_marks_with_exactly_the_daemonset_capabilities() {
    let caps = daemonset_capabilities();
    let (mut sb, _servers) = sandbox();
    let netns = NetnsDir::of(&[&sb.netns["gw"].ns, &sb.netns["a-base"].ns, &sb.netns["a-gray"].ns]);
    let lanes = sb.write_lanes_config(&configmap_lanes());
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let node_ns = sb.node_netns().path();
    let extra = [
        "--lanes-config",
        &lanes.to_string_lossy(),
        "--metrics-addr",
        &metrics,
        "--netns-dir",
        &netns.path().to_string_lossy(),
        "--node-netns",
        &node_ns.to_string_lossy(),
        "--mark-interfaces",
        "p*",
    ];
    start_confined(&mut sb, &caps, &extra);
    assert_confined(sb.agent.as_ref().unwrap().pid(), &caps);
    let cg = sb.pod_cgroup("gw");
    sb.wait_for("gw registered and service a's sets", WAIT, |t| {
        pod_in_lane(t, &cg, "gray") && set_size(t, vip(), "gray") == Some(1)
    });
    assert_eq!(sb.reached("gw", vip(), 20), ["a-gray"], "steered by the confined agent");
    // The probes' endpoints, and every optional feature available.
    let features = ready_features(&sb, port);
    assert_eq!(http_get(port, "/healthz").0, 200);
    for feature in ["connection_reset", "lane_marking"] {
        assert!(
            features.get(feature).is_some_and(|f| f.available),
            "{feature}: {features:?}\n{}",
            sb.agent_log()
        );
    }
    sb.wait_for("a pod's veth marked", WAIT, |_| sb.agent_log().contains("lane marking attached"));

    // A held gray connection, then gray's pod goes not ready: the confined agent resets it.
    let held = HoldClient::start(&cg, &sb.netns["gw"].ns, "hold-tcp", hold_vip());
    let line = held.next_line(WAIT).expect("no connect reported");
    assert_eq!(line, format!("ok\ta-gray\t{}", hold_vip()));

    // A restart adopts the pins and keeps writing the maps, still confined.
    sb.agent.as_mut().unwrap().kill();
    start_confined(&mut sb, &caps, &extra);
    assert_confined(sb.agent.as_ref().unwrap().pid(), &caps);
    sb.wait_for("the restarted agent adopted the pins", WAIT, |_| sb.agent_log().contains("Adopted"));
    let _ = ready_features(&sb, port);
    sb.cluster.pods.get_mut("a-gray").unwrap().ready = false;
    sb.write_source_file();
    sb.wait_for("gray set emptied", WAIT, |t| set_size(t, vip(), "gray") == Some(0));
    assert_eq!(sb.reached("gw", vip(), 20), ["a-base"], "fell back");
    let line = held.next_line(WAIT).expect("the confined agent did not reset the held gray connection");
    assert!(line.starts_with(&format!("closed\t{}", libc::ECONNABORTED)), "{line}\n{}", sb.agent_log());
    assert_eq!(sb.agent.as_mut().unwrap().terminate(), Some(0), "{}", sb.agent_log());
}

#[test]
fn without_any_one_capability_the_agent_says_what_it_lost() {
    let caps = daemonset_capabilities();
    let (mut sb, _servers) = sandbox();
    let netns = NetnsDir::of(&[&sb.netns["gw"].ns, &sb.netns["a-base"].ns, &sb.netns["a-gray"].ns]);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let extra = ["--metrics-addr", &metrics, "--netns-dir", &netns.path().to_string_lossy()];
    for cap in &caps {
        // A fresh node: nothing is installed, nothing is left half-installed.
        start_confined(&mut sb, &without(&caps, cap), &extra);
        match needed_for(cap) {
            Loss::Steering => {
                let code = sb.agent.as_mut().unwrap().wait_exit(WAIT);
                let log = sb.agent_log();
                assert_eq!(code, Some(1), "without {cap}:\n{log}");
                assert!(
                    log.contains(&format!("CAP_{cap}")) && log.contains("missing"),
                    "the error names CAP_{cap}:\n{log}"
                );
                assert!(!sb.pins.0.exists(), "without {cap} nothing is pinned");
            }
            Loss::Feature(feature) => {
                let features = ready_features(&sb, port);
                let AgentFeature { available, detail } =
                    features.get(feature).cloned().unwrap_or_else(|| {
                        panic!("without {cap}, {feature} is not reported: {features:?}\n{}", sb.agent_log())
                    });
                assert!(!available, "without {cap}, {feature} says it is available: {detail}");
                assert!(
                    detail.contains("not permitted") && detail.contains(&format!("CAP_{cap}")),
                    "{detail}"
                );
                assert!(sb.agent_log().contains("ERROR"), "an error in the log:\n{}", sb.agent_log());
                let cg = sb.pod_cgroup("gw");
                sb.wait_for("gw registered and service a's sets", WAIT, |t| {
                    pod_in_lane(t, &cg, "gray") && set_size(t, vip(), "gray") == Some(1)
                });
                assert_eq!(sb.reached("gw", vip(), 10), ["a-gray"], "steering goes on without {cap}");
                assert_eq!(sb.agent.as_mut().unwrap().terminate(), Some(0));
                let _ = Datapath::uninstall(&sb.pins.0);
            }
        }
        std::fs::remove_file(sb.dir.0.join("agent.log")).unwrap();
    }

    // Installed with the full set, then restarted without what steering needs: refused as
    // well, so a DaemonSet that lost it fails on its rollout rather than after a node reboot.
    start_confined(&mut sb, &caps, &[]);
    sb.wait_for("installed", WAIT, |t| set_size(t, vip(), "gray") == Some(1));
    assert_eq!(sb.agent.as_mut().unwrap().terminate(), Some(0));
    let cap = caps.iter().find(|c| needed_for(c) == Loss::Steering).expect("a capability steering needs");
    std::fs::remove_file(sb.dir.0.join("agent.log")).unwrap();
    start_confined(&mut sb, &without(&caps, cap), &[]);
    assert_eq!(sb.agent.as_mut().unwrap().wait_exit(WAIT), Some(1), "{}", sb.agent_log());
    assert!(sb.agent_log().contains(&format!("CAP_{cap}")), "{}", sb.agent_log());
    assert_eq!(sb.reached("gw", vip(), 10), ["a-gray"], "the pinned datapath keeps steering");
}
