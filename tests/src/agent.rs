//! Agent tests' sandbox: the real `tagger-agent` binary as a child process, a node of netns
//! pods with kubelet-style cgroups (systemd driver layout), backends, and the described cluster
//! it is told about (through a YAML file or the fake API server).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tagger::datapath::{Datapath, Tables};

use crate::{
    backend::BackendServer,
    cgroup::TestCgroup,
    client::{Attempt, Mode, attempts},
    cluster::{ClusterDesc, uid_for},
    datapath::{BPFFS, ensure_bpffs},
    topology::{Node, Pod},
    unique_name,
};

/// The node name every local pod is scheduled on.
pub const NODE: &str = "node-1";
/// Port the backends listen on.
pub const PORT: u16 = 8080;
/// Kubelet's pods cgroup (systemd driver) below the sandbox's cgroup root.
pub const KUBEPODS: &str = "kubepods.slice";

/// Path of a workspace binary built with the same profile as the running executable: test
/// executables live in `target/<profile>/deps`, binaries in `target/<profile>`.
#[must_use]
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    let candidates = [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()];
    candidates.iter().find(|c| c.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{name} is not built next to {}: run `cargo xtask test` (it builds every binary first)",
            exe.display()
        )
    })
}

/// Runs the CLI as `tagger --bpffs DIR -o json ARGS`: its exit status and its JSON document.
///
/// # Panics
/// If the CLI cannot run or does not print JSON (the panic shows its stderr).
#[must_use]
pub fn cli_json(bpffs: &Path, args: &[&str]) -> (std::process::ExitStatus, serde_json::Value) {
    let out = std::process::Command::new(workspace_bin("tagger"))
        .arg("--bpffs")
        .arg(bpffs)
        .args(["-o", "json"])
        .args(args)
        .output()
        .expect("run tagger");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("tagger {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr))
    });
    (out.status, json)
}

/// `GET path` on the agent's endpoints at 127.0.0.1:`port`: (status code, body); (0, "") when
/// nothing answers.
#[must_use]
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new()) };
    if write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

/// `GET /metrics` rendered after this call: the agent serves one rendering for up to
/// [`tagger::agent::METRICS_CACHE_TTL`] (1 s), so this waits that long first.
#[must_use]
pub fn fresh_metrics(port: u16) -> (u16, String) {
    std::thread::sleep(tagger::agent::METRICS_CACHE_TTL + Duration::from_millis(100));
    http_get(port, "/metrics")
}

/// A running `tagger-agent` (our child); SIGKILLed on drop if still running.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent with `args`, logging to `log`.
    #[must_use]
    pub fn start(args: &[String], envs: &[(&str, String)], log: &Path) -> Self {
        Self::start_with(&workspace_bin("tagger-agent"), args, envs, log, "info,tagger=debug")
    }

    /// Starts a given agent binary with a log filter.
    #[must_use]
    pub fn start_with(
        bin: &Path,
        args: &[String],
        envs: &[(&str, String)],
        log: &Path,
        filter: &str,
    ) -> Self {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("agent log");
        let child = Command::new(bin)
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn tagger-agent");
        Self { child, log: log.to_owned() }
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the agent (started with `--metrics-addr 127.0.0.1:0` and `info` logs of
    /// `tagger::agent::status`) to log the port it bound, and returns it.
    #[must_use]
    pub fn metrics_port(&self) -> u16 {
        // The server starts once the datapath is installed: seconds under a loaded qemu TCG
        // guest, as the other agent start waits allow.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if let Some(port) = log.lines().filter(|l| l.contains("serving /metrics")).find_map(|l| {
                l.split("addr=").nth(1)?.split_whitespace().next()?.rsplit(':').next()?.parse().ok()
            }) {
                return port;
            }
            assert!(Instant::now() < deadline, "the agent never served its endpoints:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as an OOM kill or node pressure would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a graceful exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// Waits for the agent to exit by itself (e.g. on a startup error); its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Uninstalls a pin directory on drop.
#[derive(Debug)]
pub struct PinDir(pub PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = Datapath::uninstall(&self.0);
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates a fresh one.
    #[must_use]
    pub fn new() -> Self {
        let p = std::env::temp_dir().join(unique_name("tmp"));
        std::fs::create_dir_all(&p).expect("tempdir");
        Self(p)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The sandbox. Fields drop in order: agent, backends, pins, cgroups, namespaces, files.
#[derive(Debug)]
pub struct AgentSandbox {
    /// The agent, once started.
    pub agent: Option<AgentProcess>,
    servers: Vec<BackendServer>,
    /// The agent's pin directory.
    pub pins: PinDir,
    /// The cgroup root (`--cgroup-root`), with kubelet's pods cgroup `kubepods.slice` below it,
    /// where the agent attaches.
    pub root: TestCgroup,
    /// Network namespaces of the pods, by name.
    pub netns: BTreeMap<String, Pod>,
    callers: Vec<String>,
    node: Node,
    /// The described cluster.
    pub cluster: ClusterDesc,
    /// Scratch files (source file, lanes config, logs).
    pub dir: TempDir,
    /// The node's own Service implementation (what kube-proxy or a socket-LB CNI is on a real
    /// node), attached at the cgroup root: it balances every Service of [`Self::cluster`] over
    /// its serving endpoints, and so serves whatever tagger leaves to the cluster.
    /// `None` after [`Self::without_cluster_lb`].
    pub cluster_lb: std::sync::Mutex<Option<crate::foreign_lb::ForeignLb>>,
}

impl Default for AgentSandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentSandbox {
    /// An empty node: a cgroup root with kubelet's (systemd driver) pods cgroup below it, as on
    /// a real node, so the agent attaches there and not at the root.
    #[must_use]
    pub fn new() -> Self {
        crate::require_root();
        ensure_bpffs();
        let root = TestCgroup::new(&unique_name("root"));
        let _ = root.child(KUBEPODS);
        let cluster_lb = std::sync::Mutex::new(Some(crate::foreign_lb::ForeignLb::attach(root.path())));
        Self {
            cluster_lb,
            agent: None,
            servers: Vec::new(),
            pins: PinDir(Path::new(BPFFS).join(unique_name("pins"))),
            root,
            netns: BTreeMap::new(),
            callers: Vec::new(),
            node: Node::new(),
            cluster: ClusterDesc::default(),
            dir: TempDir::new(),
        }
    }

    /// The agent tests' usual cast: Service `a` at `vip` with a base backend `a-base` and a gray
    /// one `a-gray`, and a caller `gw` in `gw_lane`.
    #[must_use]
    pub fn with_service_a(vip: SocketAddr, gw_lane: Option<&str>) -> Self {
        let mut sb = Self::new();
        sb.backend("a-base", None);
        sb.backend("a-gray", Some("gray"));
        sb.caller("gw", gw_lane);
        sb.cluster.service("a", &[vip.ip()], vip.port(), PORT, &["a-base", "a-gray"]);
        sb
    }

    /// A backend pod (on this node) answering its name, in `lane`.
    pub fn backend(&mut self, name: &str, lane: Option<&str>) {
        let pod = self.node.add_pod(name);
        self.servers.push(BackendServer::start(&pod, name, PORT));
        self.cluster.pod(name, NODE, lane, &[IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)]);
        self.netns.insert(name.to_owned(), pod);
    }

    /// A backend pod (on this node) in `lane` running the rolling-update server
    /// ([`crate::rollout::serve`]) on `PORT` in its own pod cgroup; `tell("drain")` drains it.
    pub fn rollout_backend(&mut self, name: &str, lane: Option<&str>) -> crate::client::HoldClient {
        let pod = self.node.add_pod(name);
        self.cluster.pod(name, NODE, lane, &[IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)]);
        let cgroup = self.root.child(&Self::pod_cgroup_rel(&uid_for(name)));
        let listen = SocketAddr::from(([0, 0, 0, 0], PORT));
        let server =
            crate::client::HoldClient::start_with(&cgroup, &pod.ns, "rollout-serve", listen, &[name]);
        assert!(server.wait_line("serving", Duration::from_secs(10)).is_some(), "{name} did not start");
        self.netns.insert(name.to_owned(), pod);
        server
    }

    /// A caller pod on this node in `lane`, with its pod cgroup where kubelet's systemd driver
    /// puts a Burstable pod.
    pub fn caller(&mut self, name: &str, lane: Option<&str>) {
        let pod = self.node.add_pod(name);
        self.cluster.pod(name, NODE, lane, &[IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)]);
        self.callers.push(name.to_owned());
        let _ = self.root.child(&Self::pod_cgroup_rel(&uid_for(name)));
        self.netns.insert(name.to_owned(), pod);
    }

    fn pod_cgroup_rel(uid: &str) -> String {
        let uid = uid.replace('-', "_");
        format!("{KUBEPODS}/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice")
    }

    /// Kubelet's pods cgroup, where the agent attaches.
    #[must_use]
    pub fn kubepods(&self) -> PathBuf {
        self.root.path().join(KUBEPODS)
    }

    /// The pod-level cgroup of a caller (named after its current UID).
    #[must_use]
    pub fn pod_cgroup(&self, name: &str) -> PathBuf {
        self.root.path().join(Self::pod_cgroup_rel(&self.cluster.pods[name].uid))
    }

    /// Records the UID an API server gave a pod (the API server assigns UIDs on creation) and,
    /// for a caller, creates its pod cgroup under that UID, as kubelet would.
    pub fn set_uid(&mut self, name: &str, uid: &str) {
        uid.clone_into(&mut self.cluster.pods.get_mut(name).expect("pod").uid);
        if self.callers.iter().any(|c| c == name) {
            let _ = self.root.child(&Self::pod_cgroup_rel(uid));
        }
    }

    /// A container cgroup below the caller's pod cgroup (created on first use).
    #[must_use]
    pub fn container_cgroup(&self, name: &str) -> PathBuf {
        let p = self.pod_cgroup(name).join("cri-containerd-0123456789ab.scope");
        std::fs::create_dir_all(&p).expect("container cgroup");
        p
    }

    /// Writes the cluster to the source file (atomically, as `kubectl get -o yaml > f` would
    /// not, so the agent never reads half a file in tests that do not test that).
    pub fn write_source_file(&self) -> PathBuf {
        self.sync_cluster_lb();
        let path = self.dir.0.join("cluster.yaml");
        let tmp = self.dir.0.join("cluster.yaml.tmp");
        std::fs::write(&tmp, self.cluster.to_yaml()).expect("write source");
        std::fs::rename(&tmp, &path).expect("rename source");
        path
    }

    /// Programs the node's own Service implementation ([`Self::cluster_lb`]) with the described
    /// cluster's Services, as kube-proxy would: each cluster IP and port to the ready endpoints,
    /// else the serving-terminating ones; with `internalTrafficPolicy: Local`, those on this node
    /// only.
    pub fn sync_cluster_lb(&self) {
        let mut guard = self.cluster_lb.lock().expect("cluster LB");
        let Some(lb) = guard.as_mut() else { return };
        let mut wanted: BTreeMap<SocketAddr, Vec<SocketAddr>> = BTreeMap::new();
        for svc in self.cluster.services.values() {
            let local_only = svc.internal_traffic_policy == Some("Local");
            let pods: Vec<&crate::cluster::PodDesc> = svc
                .backends
                .iter()
                .filter_map(|b| self.cluster.pods.get(b))
                .filter(|p| p.ready && (!local_only || p.node == NODE))
                .collect();
            let ready: Vec<&&crate::cluster::PodDesc> = pods.iter().filter(|p| !p.terminating).collect();
            let serving: Vec<&&crate::cluster::PodDesc> =
                if ready.is_empty() { pods.iter().collect() } else { ready };
            for vip in &svc.cluster_ips {
                let backends = serving
                    .iter()
                    .filter_map(|p| p.ips.iter().find(|ip| ip.is_ipv4() == vip.is_ipv4()))
                    .map(|ip| SocketAddr::new(*ip, svc.target_port))
                    .collect();
                wanted.insert(SocketAddr::new(*vip, svc.port), backends);
            }
        }
        for vip in lb.vips() {
            wanted.entry(vip).or_default();
        }
        for (vip, backends) in wanted {
            lb.serve_pool(vip, &backends);
        }
    }

    /// The same sandbox without the node's own Service implementation at the cgroup root: for
    /// tests that put other programs there themselves (an earlier release of tagger, another
    /// socket LB attached exclusively), whose order at the root is what they test.
    #[must_use]
    pub fn without_cluster_lb(self) -> Self {
        *self.cluster_lb.lock().expect("cluster LB") = None;
        self
    }

    /// Writes the lanes config file; returns its path.
    pub fn write_lanes_config(&self, yaml: &str) -> PathBuf {
        let path = self.dir.0.join("lanes.yaml");
        let tmp = self.dir.0.join("lanes.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write lanes");
        std::fs::rename(&tmp, &path).expect("rename lanes");
        path
    }

    /// The agent's standard arguments for this sandbox plus `extra`.
    #[must_use]
    pub fn agent_args(&self, source: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--source".into(),
            source.into(),
            "--node-name".into(),
            NODE.into(),
            "--cgroup-root".into(),
            self.root.path().to_string_lossy().into_owned(),
            "--bpffs".into(),
            self.pins.0.to_string_lossy().into_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    /// The node's network namespace (the pods' host-side veths `p2`, `p3`, …).
    #[must_use]
    pub fn node_netns(&self) -> &crate::netns::Netns {
        self.node.netns()
    }

    /// Starts the agent on the file source (written first).
    pub fn start_agent_on_file(&mut self, extra: &[&str]) {
        let path = self.write_source_file();
        let args = self.agent_args(&format!("file:{}", path.display()), extra);
        self.start_agent(&args, &[]);
    }

    /// Puts every object of the described cluster into the API server, and takes the UIDs it
    /// assigns to pods (creating callers' cgroups under them, as kubelet would).
    pub fn publish_to(&mut self, api: &crate::fake_api::FakeApiServer) {
        self.sync_cluster_lb();
        for object in self.cluster.objects() {
            let stored = api.apply(&object);
            if stored["kind"] == "Pod" {
                let name = stored["metadata"]["name"].as_str().expect("pod name").to_owned();
                let uid = stored["metadata"]["uid"].as_str().expect("pod uid").to_owned();
                self.set_uid(&name, &uid);
            }
        }
        // EndpointSlices refer to pods by UID too: publish them again with the assigned ones.
        self.publish_slices_to(api);
    }

    /// Puts the EndpointSlices of the described cluster into the API server, IPv4 first (timed
    /// measurements probe IPv4 addresses).
    pub fn publish_slices_to(&self, api: &crate::fake_api::FakeApiServer) {
        self.sync_cluster_lb();
        let mut slices: Vec<serde_json::Value> =
            self.cluster.objects().into_iter().filter(|o| o["kind"] == "EndpointSlice").collect();
        slices.sort_by_key(|s| s["addressType"] != "IPv4");
        for s in slices {
            api.apply(&s);
        }
    }

    /// Starts the agent on the Kubernetes source, talking to `api`.
    pub fn start_agent_on_api(&mut self, api: &crate::fake_api::FakeApiServer) {
        self.start_agent_on_api_with(api, &[]);
    }

    /// Starts the agent on the Kubernetes source, talking to `api`, with `extra` arguments.
    pub fn start_agent_on_api_with(&mut self, api: &crate::fake_api::FakeApiServer, extra: &[&str]) {
        let kubeconfig = self.dir.0.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("write kubeconfig");
        let args = self.agent_args("kubernetes", extra);
        self.start_agent(&args, &[("KUBECONFIG", kubeconfig.to_string_lossy().into_owned())]);
    }

    /// Starts the agent with explicit arguments and environment.
    pub fn start_agent(&mut self, args: &[String], envs: &[(&str, String)]) {
        self.agent = Some(AgentProcess::start(args, envs, &self.dir.0.join("agent.log")));
    }

    /// The agent's log.
    #[must_use]
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("agent.log")).unwrap_or_default()
    }

    /// Waits until `cond` holds on the pinned maps; panics with the agent's log otherwise.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut cond: impl FnMut(&Tables) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(dp) = Datapath::open(&self.pins.0)
                && cond(dp.tables())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- agent log ---\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the agent (started with `--metrics-addr 127.0.0.1:0`) to log the port it
    /// serves its endpoints on, and returns it. A port picked by the kernel cannot collide
    /// with anything else running on the machine.
    #[must_use]
    pub fn metrics_port(&self) -> u16 {
        self.agent.as_ref().expect("agent started").metrics_port()
    }

    /// Makes `count` TCP attempts from a caller's pod cgroup.
    #[must_use]
    pub fn call(&self, caller: &str, addr: SocketAddr, count: usize) -> Vec<Attempt> {
        attempts(&self.pod_cgroup(caller), &self.netns[caller].ns, Mode::Tcp, addr, count)
    }

    /// Makes `count` TCP attempts and returns the distinct replies (panics on a failure).
    #[must_use]
    pub fn reached(&self, caller: &str, addr: SocketAddr, count: usize) -> Vec<String> {
        crate::scenario::replies(&self.call(caller, addr, count)).into_keys().collect()
    }

    /// The pod's IPv4 address.
    #[must_use]
    pub fn ip4(&self, name: &str) -> IpAddr {
        IpAddr::V4(self.netns[name].ip4)
    }
}

/// Whether the pinned maps register `cgroup` in `lane`.
#[must_use]
pub fn pod_in_lane(t: &Tables, cgroup: &Path, lane: &str) -> bool {
    let id = TestCgroup::resolve(cgroup).id;
    t.pods().is_ok_and(|p| p.get(&id).is_some_and(|e| e.lane == tagger_common::lane_id(lane)))
}

/// The addresses of (TCP frontend `vip`, `lane`)'s backends, sorted (empty without a set).
#[must_use]
pub fn set_ips(t: &Tables, vip: SocketAddr, lane: &str) -> Vec<IpAddr> {
    let key = tagger::net::frontend_key(vip, tagger::net::Proto::Tcp);
    let Some(svc) = t.frontend(&key).ok().flatten() else { return Vec::new() };
    let mut ips: Vec<IpAddr> = t
        .backends(svc.svc_id, tagger_common::lane_id(lane))
        .unwrap_or_default()
        .iter()
        .map(|b| tagger::net::backend_addr(b).ip())
        .collect();
    ips.sort();
    ips
}

/// Whether (frontend `vip`, `lane`) has `n` backends.
#[must_use]
pub fn set_size(t: &Tables, vip: SocketAddr, lane: &str) -> Option<u32> {
    let key = tagger::net::frontend_key(vip, tagger::net::Proto::Tcp);
    let svc = t.frontend(&key).ok().flatten()?;
    Some(t.backend_set(svc.svc_id, tagger_common::lane_id(lane)).ok().flatten().map_or(0, |s| s.count))
}
