//! `deploy/`: every manifest parses into the Kubernetes API types with no unknown field, and the
//! rendered kustomizations hold what a security review and the API server would check.
//!
//! `kubectl` and kustomize are not needed: a minimal kustomize renderer below handles what
//! `deploy/` uses (resources, JSON 6902 patches, images) and refuses anything else, so a new
//! kustomize feature in `deploy/` fails here loudly instead of being rendered wrongly. Where
//! `kubectl` exists, its `kubectl kustomize` output is compared with this renderer's.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser as _;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount},
        networking::v1::Ingress,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tagger::{
    agent::{Args, Source},
    config::{labels::default_lane_keys, lanes::LanesConfig},
    model::lane::{LaneOf, lane_of},
};
use tagger_tests::kustomize::{
    apply_op, apply_patch, id, load_docs, parse_docs, render, set_image, split_image,
};

/// The capabilities the base DaemonSet adds, each proven needed (and together sufficient) by
/// deploy_capabilities.rs.
const CAPABILITIES: [&str; 2] = ["SYS_ADMIN", "NET_ADMIN"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").canonicalize().expect("deploy/ exists")
}

// ---------------------------------------------------------------------------------------------
// Loading and a minimal kustomize
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Typed parsing with no unknown field
// ---------------------------------------------------------------------------------------------

/// Parses `v` as `T` and checks that serializing it back gives `v` again: a field k8s-openapi
/// does not know (a typo, a wrong indentation level) is dropped by the parse and shows up here.
fn typed<T: DeserializeOwned + Serialize>(v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{}: {e}", id(v)));
    let back = serde_json::to_value(&t).expect("serialize");
    let mut diffs = Vec::new();
    diff("", v, &back, &mut diffs);
    assert!(
        diffs.is_empty(),
        "{}: not a faithful {}:\n  {}",
        id(v),
        std::any::type_name::<T>(),
        diffs.join("\n  ")
    );
    t
}

fn diff(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                match g.get(k) {
                    Some(gv) => diff(&format!("{path}.{k}"), wv, gv, out),
                    None => out.push(format!("{path}.{k}: unknown field (dropped by the API type)")),
                }
            }
            for k in g.keys().filter(|k| !w.contains_key(*k)) {
                out.push(format!("{path}.{k}: added by the API type"));
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                diff(&format!("{path}[{i}]"), wv, gv, out);
            }
        }
        _ if want == got => {}
        _ => out.push(format!("{path}: {want} became {got}")),
    }
}

/// Every object parses as the API type of its kind (and only known kinds appear).
fn check_types(objects: &[Value]) {
    for v in objects {
        match (v["apiVersion"].as_str().unwrap_or(""), v["kind"].as_str().unwrap_or("")) {
            ("v1", "Namespace") => drop(typed::<Namespace>(v)),
            ("v1", "ServiceAccount") => drop(typed::<ServiceAccount>(v)),
            ("v1", "ConfigMap") => drop(typed::<ConfigMap>(v)),
            ("v1", "Service") => drop(typed::<Service>(v)),
            ("apps/v1", "DaemonSet") => drop(typed::<DaemonSet>(v)),
            ("apps/v1", "Deployment") => drop(typed::<Deployment>(v)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => drop(typed::<ClusterRole>(v)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => drop(typed::<ClusterRoleBinding>(v)),
            ("networking.k8s.io/v1", "Ingress") => drop(typed::<Ingress>(v)),
            // prometheus-operator's type (no k8s-openapi type): its groups are rules.yaml's,
            // which promtool checks.
            ("monitoring.coreos.com/v1", "PrometheusRule") => {
                assert!(v["spec"]["groups"].is_array(), "{}: spec.groups", id(v));
            }
            (api, kind) => panic!("{}: unexpected {api} {kind} in deploy/", id(v)),
        }
    }
}

/// Typed access to a rendered set.
struct Objects(Vec<Value>);

impl Objects {
    fn of_kind<T: DeserializeOwned + Serialize>(&self, kind: &str) -> Vec<T> {
        self.0.iter().filter(|v| v["kind"] == kind).map(typed::<T>).collect()
    }

    fn one<T: DeserializeOwned + Serialize>(&self, kind: &str, name: &str) -> T {
        let found: Vec<&Value> =
            self.0.iter().filter(|v| v["kind"] == kind && v["metadata"]["name"] == name).collect();
        assert_eq!(found.len(), 1, "exactly one {kind} {name}");
        typed(found[0])
    }

    fn ids(&self) -> BTreeSet<String> {
        self.0.iter().map(id).collect()
    }
}

fn rendered(rel: &str) -> Objects {
    let r = render(&deploy_dir().join(rel));
    check_types(&r.objects);
    Objects(r.objects)
}

// ---------------------------------------------------------------------------------------------
// What the API server would reject
// ---------------------------------------------------------------------------------------------

/// Rules of the API server's pod validation that these manifests could break.
fn check_pod_spec_validity(what: &str, spec: &PodSpec) {
    let volumes: BTreeSet<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    let mut mounted = BTreeSet::new();
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        assert!(is_dns_label(&c.name), "{what}: container name {:?}", c.name);
        let sc = c.security_context.clone().unwrap_or_default();
        let privileged = sc.privileged == Some(true);
        let adds: Vec<String> = sc.capabilities.and_then(|c| c.add).unwrap_or_default();
        if sc.allow_privilege_escalation == Some(false) {
            assert!(
                !privileged && !adds.iter().any(|a| a == "SYS_ADMIN" || a == "CAP_SYS_ADMIN"),
                "{what}/{}: allowPrivilegeEscalation: false cannot be combined with privileged or SYS_ADMIN",
                c.name
            );
        }
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains(m.name.as_str()),
                "{what}/{}: mount of unknown volume {}",
                c.name,
                m.name
            );
            mounted.insert(m.name.as_str());
            if m.mount_propagation.as_deref() == Some("Bidirectional") {
                assert!(
                    privileged,
                    "{what}/{}: Bidirectional mount propagation ({}) is allowed only in privileged containers",
                    c.name, m.name
                );
            }
        }
        for p in c.ports.iter().flatten() {
            if let Some(n) = &p.name {
                assert!(n.len() <= 15 && is_dns_label(n), "{what}/{}: port name {n:?}", c.name);
            }
        }
        for (probe, kind) in [(&c.liveness_probe, "liveness"), (&c.readiness_probe, "readiness")] {
            if let Some(IntOrString::String(port)) =
                probe.as_ref().and_then(|p| p.http_get.as_ref()).map(|h| h.port.clone())
            {
                assert!(
                    c.ports.iter().flatten().any(|p| p.name.as_deref() == Some(port.as_str())),
                    "{what}/{}: {kind} probe port {port:?} is not a container port name",
                    c.name
                );
            }
        }
    }
    assert_eq!(mounted, volumes, "{what}: every volume is mounted");
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Selector ⊆ template labels, as the API server requires of workloads.
fn check_selector(what: &str, selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) {
    assert!(!selector.is_empty(), "{what}: empty selector");
    for (k, v) in selector {
        assert_eq!(labels.get(k), Some(v), "{what}: selector {k}={v} does not match the template's labels");
    }
}

fn check_workloads(objs: &Objects) {
    for ds in objs.of_kind::<DaemonSet>("DaemonSet") {
        let spec = ds.spec.as_ref().expect("spec");
        let what = format!("DaemonSet {}", ds.metadata.name.as_deref().unwrap_or(""));
        check_selector(
            &what,
            spec.selector.match_labels.as_ref().expect("matchLabels"),
            spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref()).expect("template labels"),
        );
        check_pod_spec_validity(&what, spec.template.spec.as_ref().expect("pod spec"));
    }
    for d in objs.of_kind::<Deployment>("Deployment") {
        let spec = d.spec.as_ref().expect("spec");
        let what = format!("Deployment {}", d.metadata.name.as_deref().unwrap_or(""));
        check_selector(
            &what,
            spec.selector.match_labels.as_ref().expect("matchLabels"),
            spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref()).expect("template labels"),
        );
        check_pod_spec_validity(&what, spec.template.spec.as_ref().expect("pod spec"));
    }
}

// ---------------------------------------------------------------------------------------------
// The base
// ---------------------------------------------------------------------------------------------

fn agent_container(ds: &DaemonSet) -> Container {
    let containers = &ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers;
    assert_eq!(containers.len(), 1, "the agent pod has one container (the CLI runs in it with kubectl exec)");
    containers[0].clone()
}

/// The agent's command line as its own parser reads it, in the container's environment.
fn agent_args(c: &Container) -> Args {
    assert!(c.command.is_none(), "the image's entrypoint is tagger-agent; only args are set");
    let mut argv: Vec<String> =
        std::iter::once("tagger-agent".to_owned()).chain(c.args.iter().flatten().cloned()).collect();
    // `--node-name` defaults to $NODE_NAME (clap `env`), which the container gets from the
    // downward API: pass what the kubelet would, without touching this process's environment.
    if c.env.iter().flatten().any(|e| e.name == "NODE_NAME")
        && !argv.iter().any(|a| a.starts_with("--node-name"))
    {
        argv.push("--node-name=node-from-the-downward-api".to_owned());
    }
    Args::try_parse_from(argv).unwrap_or_else(|e| panic!("the DaemonSet's args do not parse: {e}"))
}

fn mount_for<'a>(c: &'a Container, path: &Path) -> &'a k8s_openapi::api::core::v1::VolumeMount {
    c.volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("{} is not on any volume mount", path.display()))
}

/// Checks everything but the container's privilege settings and the bpffs propagation, which
/// the privileged overlay changes.
fn check_install(objs: &Objects) {
    check_workloads(objs);
    let want: BTreeSet<String> = [
        "Namespace//tagger",
        "ServiceAccount/tagger/tagger-agent",
        "ClusterRole//tagger-agent",
        "ClusterRoleBinding//tagger-agent",
        "ConfigMap/tagger/tagger-lanes",
        "DaemonSet/tagger/tagger-agent",
    ]
    .map(String::from)
    .into();
    assert_eq!(objs.ids(), want, "the install's objects");

    // Namespace: privileged-level Pod Security admission (hostPath volumes, BPF capabilities).
    let ns: Namespace = objs.one("Namespace", "tagger");
    let labels = ns.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("pod-security.kubernetes.io/enforce").map(String::as_str), Some("privileged"));

    // RBAC: get/list/watch on exactly pods, services, nodes and discovery.k8s.io endpointslices.
    let role: ClusterRole = objs.one("ClusterRole", "tagger-agent");
    assert!(role.aggregation_rule.is_none());
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{rule:?}");
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                granted.entry((g.clone(), r.clone())).or_default().extend(rule.verbs.iter().cloned());
            }
        }
    }
    let read: BTreeSet<String> = ["get", "list", "watch"].map(String::from).into();
    let expected: BTreeMap<(String, String), BTreeSet<String>> =
        [("", "pods"), ("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices")]
            .map(|(g, r)| ((g.to_owned(), r.to_owned()), read.clone()))
            .into();
    assert_eq!(granted, expected, "RBAC: read-only, on exactly what the agent watches");
    let binding: ClusterRoleBinding = objs.one("ClusterRoleBinding", "tagger-agent");
    assert_eq!(
        (binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()),
        ("ClusterRole", "tagger-agent")
    );
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (subjects[0].kind.as_str(), subjects[0].name.as_str(), subjects[0].namespace.as_deref()),
        ("ServiceAccount", "tagger-agent", Some("tagger"))
    );

    check_agent_pod(objs);
}

/// The DaemonSet's pod: scheduling, arguments, probes, resources, mounts.
fn check_agent_pod(objs: &Objects) {
    let ds: DaemonSet = objs.one("DaemonSet", "tagger-agent");
    let spec = ds.spec.clone().unwrap();
    let strategy = spec.update_strategy.clone().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.unwrap();
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
    assert!(matches!(rolling.max_surge, None | Some(IntOrString::Int(0))), "never two agents per node");
    let pod = spec.template.spec.clone().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("tagger-agent"));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "tolerates every taint: {:?}",
        pod.tolerations
    );
    assert_ne!(pod.host_network, Some(true), "hostNetwork is not needed");
    assert_ne!(pod.host_pid, Some(true), "hostPID is not needed");
    assert_ne!(pod.host_ipc, Some(true));
    assert_ne!(pod.host_users, Some(false), "CAP_BPF is worthless in a user namespace");
    let seccomp = pod.security_context.as_ref().and_then(|s| s.seccomp_profile.as_ref());
    assert_eq!(seccomp.map(|s| s.type_.as_str()), Some("RuntimeDefault"));

    let c = agent_container(&ds);
    let args = agent_args(&c);
    assert_eq!(args.source, Source::Kubernetes);
    assert!(!args.uninstall);
    let env = c.env.clone().unwrap_or_default();
    let node = env.iter().find(|e| e.name == "NODE_NAME").expect("NODE_NAME env");
    assert_eq!(
        node.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str()),
        Some("spec.nodeName"),
        "NODE_NAME from the downward API"
    );

    // Probes and metrics on the same port, which the CLI's default --agent-addr also reaches.
    let metrics = args.metrics_addr.expect("--metrics-addr");
    assert!(metrics.ip().is_unspecified(), "probes reach the pod IP: {metrics}");
    let port = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some("metrics")).expect("metrics port");
    assert_eq!(port.container_port, i32::from(metrics.port()));
    assert_eq!(metrics.port(), 9477, "the CLI's default --agent-addr is 127.0.0.1:9477");
    for (probe, path) in [(&c.liveness_probe, "/healthz"), (&c.readiness_probe, "/readyz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.clone()).unwrap_or_else(|| panic!("{path} probe"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("metrics".into()));
    }

    // Resources: requests and limits, memory limit above the request.
    let res = c.resources.clone().expect("resources");
    let requests = res.requests.unwrap_or_default();
    let limits = res.limits.unwrap_or_default();
    for key in ["cpu", "memory"] {
        assert!(requests.contains_key(key), "requests.{key}");
    }
    assert!(limits.contains_key("memory"), "limits.memory");
    let mib = |q: &str| q.strip_suffix("Mi").and_then(|n| n.parse::<u64>().ok()).expect("memory in Mi");
    let (req, lim) = (mib(&requests["memory"].0), mib(&limits["memory"].0));
    assert!(req <= lim, "memory request {req}Mi > limit {lim}Mi");
    // The measured figures (deploy/README.md): about 34 MiB of maps when empty plus the heap,
    // and about 190 MiB heap plus 61 MiB of full maps at 5,000 Services / 100,000 endpoints.
    assert!(req >= 48, "requests.memory {req}Mi is below an idle agent with empty maps");
    assert!(lim >= 256, "limits.memory {lim}Mi is below the measured large-cluster peak");
    // One API response line is held whole and then decoded, beside the heap and the maps charged
    // to the same memory cgroup: the agent refuses longer lines (--api-max-response-mib), and
    // that limit must leave room for the rest, a quarter of the container's memory limit at most.
    let line = u64::from(args.api_max_response_mib);
    assert!(
        line * 4 <= lim,
        "--api-max-response-mib={line} is more than a quarter of limits.memory {lim}Mi: one oversized \
         response could get the agent OOM-killed before it is refused"
    );

    // The datapath lease outlasts a rolling update's gap (the old pod's grace period, the new
    // image's pull, the first list) and still expires: a deleted agent's datapath must stop.
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    let lease = args.datapath_lease.as_secs();
    assert!(lease > 0, "--datapath-lease must expire");
    assert!(
        lease >= u64::try_from(grace).unwrap() + 60,
        "--datapath-lease {lease}s leaves less than a minute after the {grace}s grace period"
    );

    check_agent_mounts(objs, &c, &pod, &args);

    // The container: root of the host (pins and cgroups are root's), nothing writable but bpffs.
    let sc = c.security_context.clone().expect("securityContext");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_user, Some(0));
    assert!(c.image.as_deref().is_some_and(|i| !i.is_empty()), "image");
}

/// Mounts: bpffs from the host where --bpffs points; the cgroup root read-only where
/// --cgroup-root points; pod network namespaces read-only; the lanes ConfigMap.
fn check_agent_mounts(objs: &Objects, c: &Container, pod: &PodSpec, args: &Args) {
    let volumes: BTreeMap<String, k8s_openapi::api::core::v1::Volume> =
        pod.volumes.iter().flatten().map(|v| (v.name.clone(), v.clone())).collect();
    let host_path = |m: &k8s_openapi::api::core::v1::VolumeMount| volumes[&m.name].host_path.clone();
    let bpffs = mount_for(c, &args.bpffs);
    let bpffs_host = host_path(bpffs).expect("bpffs is a hostPath");
    // Only tagger's directory of the host's bpffs, and exactly it.
    assert_eq!(bpffs_host.path, "/sys/fs/bpf/tagger");
    assert_eq!(bpffs_host.type_.as_deref(), Some("DirectoryOrCreate"));
    assert_eq!(Path::new(&bpffs.mount_path), args.bpffs, "--bpffs is the mounted directory itself");
    assert_ne!(bpffs.read_only, Some(true));
    // The CLI (`kubectl exec … -- tagger`) finds the same pins through its environment.
    let env = c.env.clone().unwrap_or_default();
    let cli_bpffs = env.iter().find(|e| e.name == "TAGGER_BPFFS").and_then(|e| e.value.clone());
    assert_eq!(cli_bpffs.as_deref().map(Path::new), Some(args.bpffs.as_path()), "TAGGER_BPFFS for the CLI");
    // The default AppArmor profile of containerd and Docker denies writes below /sys (but
    // /sys/fs/cgroup) and /proc: nothing the agent writes may be mounted there.
    for m in c.volume_mounts.iter().flatten() {
        if m.mount_path.starts_with("/sys") || m.mount_path.starts_with("/proc") {
            assert_eq!(
                m.read_only,
                Some(true),
                "{} is under /sys or /proc: AppArmor denies writes there",
                m.mount_path
            );
        }
    }
    let cgroup = mount_for(c, &args.cgroup_root);
    assert_eq!(host_path(cgroup).expect("cgroup root is a hostPath").path, "/sys/fs/cgroup");
    assert_eq!(cgroup.read_only, Some(true), "the cgroup root is mounted read-only");
    // The agent finds kubelet's pods cgroup below the mounted root (kubepods.slice or kubepods,
    // whichever driver the node's kubelet uses) and attaches there, before a socket-LB CNI's
    // programs at the host root: a fixed --attach-cgroup would miss it on the other driver.
    assert_eq!(args.attach_cgroup, None, "--attach-cgroup is left to the agent's discovery");
    let netns_dir = args.netns_dir.clone().expect("--netns-dir: resets reach pods' namespaces there");
    let netns = mount_for(c, &netns_dir);
    assert_eq!(Path::new(&netns.mount_path), netns_dir);
    assert_eq!(host_path(netns).expect("netns is a hostPath").path, "/var/run/netns");
    assert_eq!(netns.read_only, Some(true));
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"), "pods created later appear");
    let node_netns = args.node_netns.clone().expect("--node-netns: marking attaches in the node's namespace");
    let node = mount_for(c, &node_netns);
    assert_eq!(Path::new(&node.mount_path), node_netns);
    let node_host = host_path(node).expect("the node's namespace is a hostPath");
    assert_eq!((node_host.path.as_str(), node_host.type_.as_deref()), ("/proc/1/ns/net", Some("File")));
    assert_eq!(node.read_only, Some(true));
    for m in c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| host_path(m).is_some() && m.mount_path != bpffs.mount_path)
    {
        assert_eq!(m.read_only, Some(true), "hostPath mount {} is read-only", m.name);
    }

    // The lanes config: the ConfigMap key the agent reads, valid for the agent's own parser.
    let lanes_path = args.lanes_config.clone().expect("--lanes-config");
    let lanes_mount = mount_for(c, &lanes_path);
    assert!(lanes_mount.sub_path.is_none(), "a subPath mount would never see ConfigMap updates");
    let cm_name = volumes[&lanes_mount.name].config_map.as_ref().expect("a ConfigMap volume").name.clone();
    let cm: ConfigMap = objs.one("ConfigMap", &cm_name);
    let key = lanes_path.strip_prefix(&lanes_mount.mount_path).unwrap().to_string_lossy().into_owned();
    let text =
        cm.data.unwrap_or_default().get(&key).cloned().unwrap_or_else(|| panic!("ConfigMap key {key}"));
    LanesConfig::parse(&text).unwrap_or_else(|e| panic!("the ConfigMap's lanes config: {e}"));
}

/// The least-privilege settings of the base's agent container.
fn check_least_privilege(objs: &Objects) {
    let ds: DaemonSet = objs.one("DaemonSet", "tagger-agent");
    let c = agent_container(&ds);
    let sc = c.security_context.clone().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "the base is not privileged");
    // The API server refuses `allowPrivilegeEscalation: false` beside CAP_SYS_ADMIN.
    assert_ne!(sc.allow_privilege_escalation, Some(true));
    let caps = sc.capabilities.expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]), "drop ALL");
    let add: Vec<String> = caps.add.unwrap_or_default();
    assert_eq!(add, CAPABILITIES, "the proven capability set (see deploy_capabilities.rs)");
    // No `privileged: true` anywhere in the base, in any spelling.
    for o in &objs.0 {
        assert!(!serde_json::to_string(o).unwrap().contains("\"privileged\":true"), "{}", id(o));
    }
}

#[test]
fn the_base_is_least_privilege_and_complete() {
    let top = rendered("");
    let base = rendered("base");
    let without_images = |objs: &Objects| {
        let mut objs = objs.0.clone();
        for o in &mut objs {
            for c in o
                .pointer_mut("/spec/template/spec/containers")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                c["image"] = Value::Null;
            }
        }
        objs
    };
    assert_eq!(
        without_images(&top),
        without_images(&base),
        "deploy/ is the base, plus at most an image override"
    );
    check_install(&top);
    check_least_privilege(&top);
}

#[test]
fn every_added_capability_says_what_needs_it() {
    let path = deploy_dir().join("base/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    for cap in CAPABILITIES {
        let line = text
            .lines()
            .find(|l| {
                l.trim_start()
                    .strip_prefix("- ")
                    .is_some_and(|rest| rest.split_whitespace().next() == Some(cap))
            })
            .unwrap_or_else(|| panic!("{}: no `- {cap}` line", path.display()));
        let comment = line.split_once('#').map_or("", |(_, c)| c.trim());
        assert!(
            comment.len() > 20,
            "{}: `- {cap}` needs a comment saying what needs it: {line:?}",
            path.display()
        );
    }
}

#[test]
fn the_privileged_overlay_changes_only_privilege() {
    let base = rendered("");
    let overlay = rendered("overlays/privileged");
    check_install(&overlay);
    assert_eq!(base.ids(), overlay.ids());
    let ds: DaemonSet = overlay.one("DaemonSet", "tagger-agent");
    let c = agent_container(&ds);
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(true));
    assert!(sc.capabilities.is_none(), "privileged has every capability; a list would only mislead");

    // Undo that change: what remains is the base, object for object.
    let base_ds = base.0.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    for (o, b) in overlay.0.iter().zip(&base.0) {
        if o["kind"] != "DaemonSet" {
            assert_eq!(o, b);
            continue;
        }
        let mut undone = o.clone();
        let c0 = "/spec/template/spec/containers/0";
        *undone.pointer_mut(&format!("{c0}/securityContext")).unwrap() =
            base_ds.pointer(&format!("{c0}/securityContext")).unwrap().clone();
        assert_eq!(&undone, base_ds, "the overlay changes nothing else");
    }
}

// ---------------------------------------------------------------------------------------------
// The examples
// ---------------------------------------------------------------------------------------------

fn labels_of(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

/// The Deployments whose pods a Service selects.
fn selected<'a>(svc: &Service, deployments: &'a [Deployment]) -> Vec<&'a Deployment> {
    let selector = svc.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default();
    assert!(!selector.is_empty(), "Service {:?} has a selector", svc.metadata.name);
    deployments
        .iter()
        .filter(|d| d.metadata.namespace == svc.metadata.namespace)
        .filter(|d| selector.iter().all(|(k, v)| labels_of(d).get(k) == Some(v)))
        .collect()
}

/// Each Service selects pods, and its target ports name ports those pods have.
fn check_services(objs: &Objects) {
    let deployments: Vec<Deployment> = objs.of_kind("Deployment");
    for svc in objs.of_kind::<Service>("Service") {
        let name = svc.metadata.name.clone().unwrap_or_default();
        let pods = selected(&svc, &deployments);
        assert!(!pods.is_empty(), "Service {name} selects no Deployment's pods");
        for p in svc.spec.as_ref().unwrap().ports.iter().flatten() {
            if let Some(IntOrString::String(target)) = &p.target_port {
                for d in &pods {
                    let cs = &d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers;
                    assert!(
                        cs.iter()
                            .flat_map(|c| c.ports.iter().flatten())
                            .any(|cp| cp.name.as_ref() == Some(target)),
                        "Service {name}: {:?} has no port {target}",
                        d.metadata.name
                    );
                }
            }
        }
    }
}

/// Per app label, the lanes its Deployments' pods are in (with the agent's label keys).
fn lanes_by_app(objs: &Objects, keys: &[String]) -> BTreeMap<String, BTreeSet<Option<String>>> {
    let mut out: BTreeMap<String, BTreeSet<Option<String>>> = BTreeMap::new();
    for d in objs.of_kind::<Deployment>("Deployment") {
        let labels = labels_of(&d);
        let lane = lane_of(&labels, keys);
        assert!(
            !matches!(lane, LaneOf::Invalid { .. }),
            "{:?}: invalid lane label: {lane:?}",
            d.metadata.name
        );
        out.entry(labels["app"].clone()).or_default().insert(lane.name().map(str::to_owned));
    }
    out
}

fn base_and_gray() -> BTreeSet<Option<String>> {
    [None, Some("gray".to_owned())].into()
}

#[test]
fn the_gray_release_example_is_complete() {
    let objs = rendered("examples/gray-release");
    check_workloads(&objs);
    check_services(&objs);
    let by_app = lanes_by_app(&objs, &default_lane_keys());
    assert_eq!(by_app.keys().collect::<Vec<_>>(), ["gateway", "orders"], "a two-service app");
    for (app, lanes) in &by_app {
        assert_eq!(lanes, &base_and_gray(), "{app}: a base and a gray Deployment");
    }
    // One Service per app, spanning both lanes: tagger chooses the lane, not the selector.
    let deployments: Vec<Deployment> = objs.of_kind("Deployment");
    let services: Vec<Service> = objs.of_kind("Service");
    assert_eq!(services.len(), 2);
    for svc in &services {
        assert_eq!(selected(svc, &deployments).len(), 2, "{:?} selects base and gray", svc.metadata.name);
    }
}

#[test]
fn the_nginx_ingress_recipe_splits_by_header_and_weight() {
    let objs = rendered("examples/nginx-ingress");
    check_workloads(&objs);
    check_services(&objs);
    let deployments: Vec<Deployment> = objs.of_kind("Deployment");
    let services: BTreeMap<String, Service> = objs
        .of_kind::<Service>("Service")
        .into_iter()
        .map(|s| (s.metadata.name.clone().unwrap(), s))
        .collect();
    let ingresses: Vec<Ingress> = objs.of_kind("Ingress");
    assert_eq!(ingresses.len(), 2, "a main and a canary Ingress");
    let is_canary = |i: &Ingress| {
        i.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("nginx.ingress.kubernetes.io/canary"))
            .map(String::as_str)
            == Some("true")
    };
    let (canary, main): (Vec<&Ingress>, Vec<&Ingress>) = ingresses.iter().partition(|i| is_canary(i));
    assert_eq!((canary.len(), main.len()), (1, 1));
    let annotations = canary[0].metadata.annotations.clone().unwrap();
    let a = |k: &str| annotations.get(&format!("nginx.ingress.kubernetes.io/{k}")).map(String::as_str);
    assert_eq!(a("canary-by-header"), Some("x-lane"));
    assert_eq!(a("canary-by-header-value"), Some("gray"));
    assert_eq!(a("canary-weight"), Some("10"));

    // Same host and path; the canary's backend is gray gateways only, the main's base only.
    let route = |i: &Ingress| {
        let rule = &i.spec.as_ref().unwrap().rules.as_ref().unwrap()[0];
        let path = &rule.http.as_ref().unwrap().paths[0];
        let backend = path.backend.service.clone().expect("a Service backend");
        ((rule.host.clone(), path.path.clone()), backend)
    };
    let (canary_route, canary_backend) = route(canary[0]);
    let (main_route, main_backend) = route(main[0]);
    assert_eq!(canary_route, main_route);
    for (backend, lane) in [(&canary_backend, Some("gray")), (&main_backend, None)] {
        let svc = services.get(&backend.name).unwrap_or_else(|| panic!("no Service {}", backend.name));
        let port_name = backend.port.as_ref().and_then(|p| p.name.clone()).expect("port by name");
        assert!(
            svc.spec.as_ref().unwrap().ports.iter().flatten().any(|p| p.name.as_ref() == Some(&port_name))
        );
        let pods = selected(svc, &deployments);
        assert!(!pods.is_empty());
        for d in pods {
            assert_eq!(labels_of(d)["app"], "gateway");
            assert_eq!(lane_of(&labels_of(d), &default_lane_keys()).name(), lane, "{}", backend.name);
        }
    }
}

#[test]
fn the_mse_example_reads_lanes_from_the_mse_label() {
    let objs = rendered("examples/mse");
    check_workloads(&objs);
    check_services(&objs);
    let ds: DaemonSet = objs.one("DaemonSet", "tagger-agent");
    let args = agent_args(&agent_container(&ds));
    assert_eq!(args.lane_labels, ["alicloud.service.tag"]);
    // With the agent's keys, the MSE-labelled Deployments land in their lanes...
    let by_app = lanes_by_app(&objs, &args.lane_labels);
    for (app, lanes) in &by_app {
        assert_eq!(lanes, &base_and_gray(), "{app}");
    }
    // ...and no pod carries tagger's own label.
    for d in objs.of_kind::<Deployment>("Deployment") {
        assert!(!labels_of(&d).contains_key("tagger.io/lane"), "{:?}", d.metadata.name);
    }
    // The rest of the install is the base's.
    let mut agent_objs: Vec<Value> = objs
        .0
        .iter()
        .filter(|o| o["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("tagger")))
        .cloned()
        .collect();
    let ds_json = agent_objs.iter_mut().find(|o| o["kind"] == "DaemonSet").unwrap();
    let args_json =
        ds_json.pointer_mut("/spec/template/spec/containers/0/args").unwrap().as_array_mut().unwrap();
    assert_eq!(args_json.pop(), Some(Value::String("--lane-label=alicloud.service.tag".into())));
    assert_eq!(agent_objs, rendered("").0);
}

// ---------------------------------------------------------------------------------------------
// Every file, and kustomize itself where it exists
// ---------------------------------------------------------------------------------------------

fn kustomization_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![deploy_dir()];
    while let Some(dir) = stack.pop() {
        if dir.join("kustomization.yaml").is_file() {
            out.push(dir.clone());
        }
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Prometheus' own files (a rules file and its unit tests), not Kubernetes objects; checked by
/// `the_alert_rules_are_valid_and_pass_their_unit_tests`.
fn is_prometheus_file(p: &Path) -> bool {
    p.parent() == Some(deploy_dir().join("monitoring").as_path())
        && p.file_name().is_some_and(|n| n == "rules.yaml" || n == "rules_test.yaml")
}

fn yaml_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![deploy_dir()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") && !is_prometheus_file(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_manifest_parses_and_belongs_to_a_kustomization() {
    let mut referenced = BTreeSet::new();
    for dir in kustomization_dirs() {
        let r = render(&dir);
        check_types(&r.objects);
        referenced.extend(r.files);
    }
    for f in yaml_files() {
        assert!(
            f.extension().is_some_and(|x| x == "yaml"),
            "{}: use .yaml, as the rest of deploy/",
            f.display()
        );
        assert!(
            referenced.contains(&f),
            "{} is not part of any kustomization (apply -k would skip it)",
            f.display()
        );
        if f.file_name().is_some_and(|n| n != "kustomization.yaml") {
            let docs = load_docs(&f);
            assert!(!docs.is_empty(), "{}: empty", f.display());
            check_types(&docs);
        }
    }
}

/// Parses `kubectl kustomize` output into objects keyed by identity.
fn by_id(objects: Vec<Value>) -> BTreeMap<String, Value> {
    objects.into_iter().map(|o| (id(&o), o)).collect()
}

#[test]
fn the_renderer_agrees_with_kubectl_kustomize_where_it_exists() {
    let probe = Command::new("kubectl").args(["version", "--client"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("kubectl is not installed: skipping the comparison with `kubectl kustomize`");
        return;
    }
    for dir in kustomization_dirs() {
        let out = Command::new("kubectl").arg("kustomize").arg(&dir).output().expect("run kubectl kustomize");
        assert!(
            out.status.success(),
            "kubectl kustomize {} failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs = by_id(parse_docs(&String::from_utf8_lossy(&out.stdout), "kubectl kustomize"));
        let ours = by_id(render(&dir).objects);
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{}: the same objects",
            dir.display()
        );
        for (k, v) in &ours {
            let mut diffs = Vec::new();
            diff(k, &theirs[k], v, &mut diffs);
            assert!(
                diffs.is_empty(),
                "{}: {k} renders differently:\n  {}",
                dir.display(),
                diffs.join("\n  ")
            );
        }
    }
}

#[test]
fn the_minimal_renderer_handles_patches_and_images() {
    let mut objs = parse_docs(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: a, namespace: n}\n\
         spec: {template: {metadata: {labels: {x/y: z}}, spec: {containers: [{name: c, image: 'localhost/tagger:0.1.0', args: [a]}]}}}\n",
        "inline",
    );
    let dir = Path::new("/nonexistent");
    let patch: Value = serde_saphyr::from_str_with_options(
        "target: {group: apps, version: v1, kind: DaemonSet, name: a}\npatch: |-\n  - {op: add, path: /spec/template/spec/containers/0/args/-, value: b}\n  - {op: add, path: /spec/template/spec/containers/0/args/0, value: first}\n  - {op: remove, path: /spec/template/metadata/labels/x~1y}\n  - {op: replace, path: /metadata/name, value: a}\n",
        tagger_tests::yaml_options(),
    )
    .unwrap();
    apply_patch(&mut objs, &patch, dir, dir);
    assert_eq!(
        objs[0].pointer("/spec/template/spec/containers/0/args").unwrap(),
        &serde_json::json!(["first", "a", "b"])
    );
    assert_eq!(objs[0].pointer("/spec/template/metadata/labels").unwrap(), &serde_json::json!({}));
    assert!(
        apply_op(&mut objs[0], &serde_json::json!({"op": "replace", "path": "/nope/x", "value": 1})).is_err()
    );
    assert!(apply_op(&mut objs[0], &serde_json::json!({"op": "move", "path": "/metadata"})).is_err());
    set_image(&mut objs, &serde_json::json!({"name": "localhost/tagger", "newName": "reg.example/t"}));
    assert_eq!(objs[0].pointer("/spec/template/spec/containers/0/image").unwrap(), "reg.example/t:0.1.0");
    set_image(&mut objs, &serde_json::json!({"name": "reg.example/t", "digest": "sha256:00"}));
    assert_eq!(objs[0].pointer("/spec/template/spec/containers/0/image").unwrap(), "reg.example/t@sha256:00");
    assert_eq!(split_image("host:5000/a/b"), ("host:5000/a/b", ""));
    assert_eq!(split_image("host:5000/a/b:1"), ("host:5000/a/b", ":1"));

    // The typed check catches a field at the wrong level.
    let bad = parse_docs(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, namespace: n}\nautomount: true\n",
        "inline",
    );
    let caught = std::panic::catch_unwind(|| check_types(&bad)).unwrap_err();
    let msg = caught.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains(".automount: unknown field"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Monitoring: the alert rules
// ---------------------------------------------------------------------------------------------

fn promtool(args: &[&str]) -> Option<std::process::Output> {
    let dir = deploy_dir().join("monitoring");
    match Command::new("promtool").args(args).current_dir(&dir).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("promtool: {e}"),
    }
}

#[test]
fn the_alert_rules_are_valid_and_pass_their_unit_tests() {
    let Some(check) = promtool(&["check", "rules", "rules.yaml"]) else {
        eprintln!("skipped: promtool is not installed (`cargo xtask test` installs Debian's prometheus)");
        return;
    };
    let text = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    assert!(check.status.success(), "promtool check rules:\n{}", text(&check));
    let unit = promtool(&["test", "rules", "rules_test.yaml"]).unwrap();
    assert!(unit.status.success(), "promtool test rules:\n{}", text(&unit));

    // Every alert has a unit test that expects it to fire.
    let rules = &load_docs(&deploy_dir().join("monitoring/rules.yaml"))[0];
    let tests = &load_docs(&deploy_dir().join("monitoring/rules_test.yaml"))[0];
    let alerts: BTreeSet<&str> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    let fired: BTreeSet<&str> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|a| a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()))
        .filter_map(|a| a["alertname"].as_str())
        .collect();
    assert_eq!(alerts, fired, "every alert, and only those, has a test where it fires");
    for wanted in [
        "TaggerLaneLeak",
        "TaggerLaneFallbackHigh",
        "TaggerStrictRefusals",
        "TaggerMapNearlyFull",
        "TaggerResetFailures",
        "TaggerDatapathLeaseExpired",
        "TaggerAgentNotReady",
    ] {
        assert!(alerts.contains(wanted), "alert {wanted}");
    }
}

#[test]
fn the_prometheusrule_carries_exactly_the_rules_file() {
    let rules = &load_docs(&deploy_dir().join("monitoring/rules.yaml"))[0];
    let cr = &load_docs(&deploy_dir().join("monitoring/prometheusrule.yaml"))[0];
    assert_eq!(cr["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(cr["kind"], "PrometheusRule");
    assert_eq!(cr["spec"]["groups"], rules["groups"], "prometheusrule.yaml's groups are rules.yaml's");
}
