//! What users deploy is what is tested: the real image (`cargo xtask image`), run by a real
//! container runtime (Debian's podman, with runc) from the DaemonSet's own pod template in
//! `deploy/` — rendered by the same minimal kustomize as `deploy_manifests.rs` and translated by
//! code, field by field, into `podman run` (no setting copied by hand) — against a sandboxed
//! node. It steers, resets a stale connection, marks, answers `tagger` through `podman exec`,
//! and serves `/healthz` and `/readyz`; once from the base's pod template, once from the
//! privileged overlay's.
//!
//! What stands in for the node, and is the only thing this test supplies:
//! - each hostPath volume maps to the sandbox's equivalent: its bpffs directory, the host's
//!   cgroup v2 root (this machine's), the host's `/var/run/netns` (where the sandbox's pod
//!   namespaces are pinned, as containerd pins pods'), and the sandbox node's namespace for the
//!   host's `/proc/1/ns/net`;
//! - the sandbox's kubelet keeps its pods below a cgroup of its own (kubelet's `--cgroup-root`),
//!   so `--cgroup-root` points there, as the DaemonSet's comment tells such nodes to;
//! - the pod network: a namespace this test creates, as a CNI would, where the fake API server
//!   listens on 127.0.0.1; kubelet's in-cluster credentials are given as a kubeconfig (the one
//!   added mount and environment variable);
//! - `--mark-interfaces=p*` is added to the template's arguments: marking is opt-in.
//!
//! Skipped, saying so, only when podman is not installed (`cargo xtask test` installs it).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, PodSpec},
};
use serde_json::Value;
use tagger_tests::{
    agent::{NODE, http_get, pod_in_lane, set_size},
    client::HoldClient,
    fake_api::FakeApiServer,
    kustomize::render,
    netns::Netns,
    unique_name,
};

const WAIT: Duration = Duration::from_secs(20);
const HOLD_PORT: u16 = 9090;
/// Where the test's kubeconfig is mounted in the container.
const KUBECONFIG_DIR: &str = "/var/run/tagger-test";

fn vip() -> SocketAddr {
    "10.96.20.1:80".parse().unwrap()
}

fn hold_vip() -> SocketAddr {
    "10.96.20.2:80".parse().unwrap()
}

/// A rendered install (`deploy/` or an overlay below it), as JSON objects.
fn install(rel: &str) -> Vec<Value> {
    render(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(rel)).objects
}

fn one<T: serde::de::DeserializeOwned>(objects: &[Value], kind: &str) -> T {
    let v = objects.iter().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in deploy/"));
    serde_json::from_value(v.clone()).unwrap()
}

/// What the test supplies for the node (see the module docs).
struct Node<'a> {
    /// hostPath → its stand-in on this machine.
    host_paths: BTreeMap<&'static str, PathBuf>,
    /// The pod network's namespace file.
    pod_network: PathBuf,
    /// `spec.nodeName`.
    name: &'a str,
    /// Arguments replaced (`--flag` → value), as a node's operator would.
    args: BTreeMap<&'static str, String>,
    /// ConfigMaps by name, written out as directories of files.
    config_maps: BTreeMap<String, PathBuf>,
    /// Directory holding `kubeconfig`.
    kubeconfig_dir: PathBuf,
}

/// `podman run` arguments for the pod template's first container, named `name`, with
/// `extra_args` after the template's.
fn podman_run(
    pod: &PodSpec,
    c: &Container,
    node: &Node<'_>,
    name: &str,
    image: &str,
    extra_args: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = ["run", "--detach", "--pull=never", "--name", name].map(String::from).to_vec();
    // This machine's runtime settings (the runtime, not the pod): crun refuses the hybrid cgroup
    // layout here, and podman's default limits exceed this VM's hard limits.
    a.extend(["--ulimit=nofile=20000:20000", "--ulimit=nproc=4096:4096"].map(String::from));
    // Pod-level settings.
    match pod.host_network {
        Some(true) => {
            panic!("hostNetwork: this test runs only pod networks (its traffic stays in test namespaces)")
        }
        _ => a.push(format!("--network=ns:{}", node.pod_network.display())),
    }
    a.push(if pod.host_pid == Some(true) { "--pid=host" } else { "--pid=private" }.to_owned());
    a.push(if pod.host_ipc == Some(true) { "--ipc=host" } else { "--ipc=private" }.to_owned());
    let seccomp =
        pod.security_context.as_ref().and_then(|s| s.seccomp_profile.as_ref()).map(|p| p.type_.as_str());
    match seccomp {
        // The runtime's default profile.
        Some("RuntimeDefault") | None => {}
        Some("Unconfined") => a.push("--security-opt=seccomp=unconfined".into()),
        Some(other) => panic!("seccompProfile {other} is not translated"),
    }
    // The container's security context.
    let sc = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        a.push("--privileged".into());
    }
    if let Some(caps) = &sc.capabilities {
        for d in caps.drop.iter().flatten() {
            a.push(format!("--cap-drop={d}"));
        }
        for add in caps.add.iter().flatten() {
            a.push(format!("--cap-add={add}"));
        }
    }
    if sc.read_only_root_filesystem == Some(true) {
        a.push("--read-only".into());
    }
    if sc.allow_privilege_escalation == Some(false) {
        a.push("--security-opt=no-new-privileges".into());
    }
    let uid = sc.run_as_user.map_or_else(String::new, |u| u.to_string());
    if !uid.is_empty() {
        a.push(format!("--user={uid}:{}", sc.run_as_group.unwrap_or(0)));
    }
    container_env_and_volumes(pod, c, node, &mut a);
    // Resources: the limits (requests only schedule).
    if let Some(limits) = c.resources.as_ref().and_then(|r| r.limits.as_ref()) {
        if let Some(mem) = limits.get("memory") {
            let mib = mem.0.strip_suffix("Mi").unwrap_or_else(|| panic!("memory limit {} in Mi", mem.0));
            a.push(format!("--memory={mib}m"));
        }
        if let Some(cpu) = limits.get("cpu") {
            a.push(format!("--cpus={}", cpu.0));
        }
    }
    if let Some(command) = &c.command {
        a.push(format!("--entrypoint={}", serde_json::to_string(command).unwrap()));
    }
    a.push(image.to_owned());
    for arg in c.args.iter().flatten() {
        let flag = arg.split('=').next().unwrap_or("");
        a.push(node.args.get(flag).map_or_else(|| arg.clone(), |v| format!("{flag}={v}")));
    }
    a.extend(extra_args.iter().map(|s| (*s).to_owned()));
    a
}

/// The container's environment (literal values and the downward API's node name) and its
/// volume mounts (hostPath and configMap volumes), as `podman run` arguments.
fn container_env_and_volumes(pod: &PodSpec, c: &Container, node: &Node<'_>, a: &mut Vec<String>) {
    // Environment: literal values and the downward API's node name.
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("spec.nodeName") => node.name.to_owned(),
                other => panic!("env {}: valueFrom {other:?} is not translated", e.name),
            },
            _ => String::new(),
        };
        a.push(format!("--env={}={value}", e.name));
    }
    a.push(format!("--env=KUBECONFIG={KUBECONFIG_DIR}/kubeconfig"));
    a.push(format!("--mount=type=bind,src={},dst={KUBECONFIG_DIR},ro=true", node.kubeconfig_dir.display()));
    // Volumes.
    let volumes: BTreeMap<&str, &k8s_openapi::api::core::v1::Volume> =
        pod.volumes.iter().flatten().map(|v| (v.name.as_str(), v)).collect();
    for m in c.volume_mounts.iter().flatten() {
        assert!(m.sub_path.is_none(), "subPath mounts are not translated");
        let v = volumes[m.name.as_str()];
        let src = if let Some(hp) = &v.host_path {
            let src = node.host_paths.get(hp.path.as_str()).unwrap_or_else(|| {
                panic!(
                    "hostPath {} has no stand-in on the sandboxed node: add it to the test's node",
                    hp.path
                )
            });
            if hp.type_.as_deref() == Some("DirectoryOrCreate") {
                std::fs::create_dir_all(src).unwrap();
            }
            src.clone()
        } else if let Some(cm) = &v.config_map {
            node.config_maps[&cm.name].clone()
        } else {
            panic!("volume {}: only hostPath and configMap volumes are translated", v.name);
        };
        let mut spec = format!("type=bind,src={},dst={}", src.display(), m.mount_path);
        spec.push_str(if m.read_only == Some(true) { ",ro=true" } else { ",ro=false" });
        match m.mount_propagation.as_deref() {
            Some("HostToContainer") => spec.push_str(",bind-propagation=rslave"),
            Some("Bidirectional") => spec.push_str(",bind-propagation=rshared"),
            _ => {}
        }
        a.push(format!("--mount={spec}"));
    }
}

fn podman() -> Command {
    let mut c = Command::new("podman");
    // The runtime of this machine (see the module docs).
    c.arg("--runtime=runc");
    c
}

/// The container, removed on drop.
struct Running(String);

impl Running {
    fn logs(&self) -> String {
        let out = podman().args(["logs", &self.0]).output().expect("podman logs");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// `podman exec` of the CLI; (exit code, stdout).
    fn tagger(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = podman().args(["exec", &self.0, "tagger"]).args(args).output().expect("podman exec");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "--force", "--time=2", &self.0]).output();
    }
}

/// `GET path` on 127.0.0.1:port of the namespace `netns`.
fn get_in(netns: &Netns, port: u16, path: &str) -> (u16, String) {
    std::thread::scope(|s| {
        s.spawn(|| {
            netns.enter_current_thread();
            http_get(port, path)
        })
        .join()
        .unwrap()
    })
}

/// The image to run: `TAGGER_TEST_IMAGE` (what `cargo xtask test` built for this run), else
/// the template's if the runtime has it.
fn image(template: &str) -> String {
    if let Ok(image) = std::env::var("TAGGER_TEST_IMAGE") {
        return image;
    }
    let exists = podman().args(["image", "exists", template]).status().is_ok_and(|s| s.success());
    assert!(
        exists,
        "the image {template} is not in podman's storage: run this through `cargo xtask test` (which builds \
         it), or build it with `cargo xtask image`"
    );
    template.to_owned()
}

/// The install's ConfigMaps written out as directories of files (what kubelet mounts), by name.
fn write_config_maps(objects: &[Value], under: &Path) -> BTreeMap<String, PathBuf> {
    let mut config_maps = BTreeMap::new();
    for cm in objects.iter().filter(|o| o["kind"] == "ConfigMap") {
        let cm: ConfigMap = serde_json::from_value(cm.clone()).unwrap();
        let name = cm.metadata.name.clone().unwrap();
        let dir = under.join(format!("configmap-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (key, value) in cm.data.unwrap_or_default() {
            std::fs::write(dir.join(key), value).unwrap();
        }
        config_maps.insert(name, dir);
    }
    config_maps
}

/// Waits for the readiness probe, then checks the liveness probe, as the kubelet would call
/// them: the template's paths on its (named) ports, in the pod network.
fn wait_for_probes(c: &Container, pod_network: &Netns, agent: &Running) {
    // The probes, as the kubelet would call them: the template's paths on its named port.
    let port_of = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = probe.as_ref().and_then(|p| p.http_get.clone()).expect("an httpGet probe");
        let port = match get.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => p,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => {
                c.ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .unwrap()
                    .container_port
            }
        };
        (u16::try_from(port).unwrap(), get.path.unwrap_or_default())
    };
    let (ready_port, ready_path) = port_of(&c.readiness_probe);
    let (live_port, live_path) = port_of(&c.liveness_probe);
    let deadline = Instant::now() + WAIT;
    while get_in(pod_network, ready_port, &ready_path).0 != 200 {
        assert!(Instant::now() < deadline, "{ready_path} never answered 200:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get_in(pod_network, live_port, &live_path).0, 200, "{}", agent.logs());
}

#[test]
fn the_image_runs_from_the_daemonsets_pod_template_and_does_everything_the_readme_promises() {
    run_the_image_from("");
}

/// The same with the privileged overlay's pod template.
#[test]
fn the_privileged_overlay_does_the_same() {
    run_the_image_from("overlays/privileged");
}

/// Runs the image from the DaemonSet of `deploy/<rel>` on a sandboxed node and checks every
/// feature (see the module docs).
fn run_the_image_from(rel: &str) {
    if Command::new("podman").arg("--version").output().is_err() {
        eprintln!("skipped: podman is not installed (`cargo xtask test` installs it with its packages)");
        return;
    }
    let objects = install(rel);
    let ds: DaemonSet = one(&objects, "DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let c = pod.containers[0].clone();
    let image = image(c.image.as_deref().expect("the template's image"));

    // The sandboxed node: service a (base and gray), service h (held connections), gray caller.
    let (mut sb, _holders) = tagger_tests::hold::gray_node_with_held_service(vip(), hold_vip(), HOLD_PORT);

    // The pod network, with the API server in it.
    let pod_network = Netns::new(&unique_name("podnet"));
    let api = FakeApiServer::builder().start_in_netns(&pod_network.path());
    sb.publish_to(&api);
    let kubeconfig_dir = sb.dir.0.join("kubeconfig");
    std::fs::create_dir_all(&kubeconfig_dir).unwrap();
    api.write_kubeconfig(&kubeconfig_dir.join("kubeconfig")).unwrap();
    let config_maps = write_config_maps(&objects, &sb.dir.0);
    let cgroup2 = tagger::cgroup::cgroup2_root_of(sb.root.path()).expect("the cgroup2 mount");
    let kubelet_root =
        sb.root.path().strip_prefix(&cgroup2).expect("the sandbox's cgroup is on it").to_owned();
    let node = Node {
        host_paths: [
            ("/sys/fs/bpf/tagger", sb.pins.0.clone()),
            ("/sys/fs/cgroup", cgroup2.clone()),
            ("/var/run/netns", PathBuf::from("/var/run/netns")),
            ("/proc/1/ns/net", sb.node_netns().path()),
        ]
        .into(),
        args: [("--cgroup-root", format!("/host/sys/fs/cgroup/{}", kubelet_root.display()))].into(),
        pod_network: pod_network.path(),
        name: NODE,
        config_maps,
        kubeconfig_dir,
    };
    let name = unique_name("agent");
    let args = podman_run(&pod, &c, &node, &name, &image, &["--mark-interfaces=p*"]);
    let out = podman().args(&args).output().expect("podman run");
    let agent = Running(name);
    assert!(out.status.success(), "podman {}\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));

    wait_for_probes(&c, &pod_network, &agent);
    // Steering.
    let cg = sb.pod_cgroup("gw");
    sb.wait_for("gw registered and service a's sets", WAIT, |t| {
        pod_in_lane(t, &cg, "gray") && set_size(t, vip(), "gray") == Some(1)
    });
    assert_eq!(sb.reached("gw", vip(), 20), ["a-gray"], "steered by the containerized agent");

    // Every optional feature available, per the agent's metrics.
    let metrics_port =
        c.ports.iter().flatten().find(|p| p.name.as_deref() == Some("metrics")).expect("metrics port");
    let (_, metrics) = get_in(&pod_network, u16::try_from(metrics_port.container_port).unwrap(), "/metrics");
    let features = tagger::cli::status::parse_features(&metrics);
    for feature in ["connection_reset", "lane_marking"] {
        let f = features.get(feature).unwrap_or_else(|| panic!("{feature} not reported:\n{metrics}"));
        assert!(f.available, "{feature}: {}\n{}", f.detail, agent.logs());
    }

    // The CLI through the runtime's exec.
    let (code, services) = agent.tagger(&["services"]);
    assert_eq!(code, Some(0), "{services}");
    assert!(services.contains("10.96.20.1"), "{services}");
    let (code, status) = agent.tagger(&["status"]);
    assert_eq!(code, Some(0), "{status}");
    assert!(status.contains("stale connection reset: sock_destroy"), "{status}");
    let (_, json) = agent.tagger(&["status", "-o", "json"]);
    let status: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    if status["marking_mode"] == "tcx" {
        let marked: Vec<&str> =
            status["marking"].as_array().unwrap().iter().filter_map(|m| m["interface"].as_str()).collect();
        assert!(marked.contains(&"p2"), "gw's host-side veth marked: {status}");
    }
    let deadline = Instant::now() + WAIT;
    while !agent.logs().contains("lane marking attached") {
        assert!(Instant::now() < deadline, "{}", agent.logs());
        std::thread::sleep(Duration::from_millis(100));
    }

    // A stale connection reset: a held gray connection, then gray's pod goes not ready.
    let held = HoldClient::start(&cg, &sb.netns["gw"].ns, "hold-tcp", hold_vip());
    let line = held.next_line(WAIT).expect("no connect reported");
    assert_eq!(line, format!("ok\ta-gray\t{}", hold_vip()));
    sb.cluster.pods.get_mut("a-gray").unwrap().ready = false;
    sb.publish_to(&api);
    let line = held
        .next_line(WAIT)
        .unwrap_or_else(|| panic!("the held connection was not reset:\n{}", agent.logs()));
    assert!(line.starts_with(&format!("closed\t{}", libc::ECONNABORTED)), "{line}");
    assert_eq!(sb.reached("gw", vip(), 10), ["a-base"], "fell back");
    assert!(agent.logs().contains("reset stale connection"), "{}", agent.logs());
    drop(agent);
}
