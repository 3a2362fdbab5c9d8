//! A ready-made sandbox for datapath tests: a node, a cgroup tree laid out like kubelet's,
//! the datapath attached to it, backend pods and caller pods.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use tagger::net::{Proto, backend, frontend_key};
use tagger_common::{DSCP_UNSET, LanePolicy, PodAddr, Service, lane_id};

use crate::{
    backend::BackendServer,
    cgroup::TestCgroup,
    client::{Attempt, HoldClient, Mode, attempts},
    datapath::TestDatapath,
    topology::{Node, Pod},
    unique_name,
};

/// Port every backend listens on.
pub const BACKEND_PORT: u16 = 8080;

/// A caller pod: its network namespace and the cgroup its processes run in.
#[derive(Debug)]
pub struct Caller {
    /// The pod.
    pub pod: Pod,
    /// The pod-level cgroup (registered in the datapath unless unlabelled).
    pub cgroup: PathBuf,
}

/// The sandbox. Fields drop in order: backends stop, the datapath is removed, then cgroups
/// and namespaces.
#[derive(Debug)]
pub struct Sandbox {
    servers: Vec<BackendServer>,
    pod_servers: Vec<HoldClient>,
    /// The datapath under test.
    pub dp: TestDatapath,
    /// The cgroup the datapath is attached to (the agent's `--cgroup-root`).
    pub cgroup: TestCgroup,
    /// Backend pods by name.
    pub backends: BTreeMap<String, Pod>,
    node: Node,
    next_pod: u32,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// A node with the datapath attached to a fresh cgroup root.
    #[must_use]
    pub fn new() -> Self {
        crate::require_root();
        let cgroup = TestCgroup::new(&unique_name("root"));
        let dp = TestDatapath::install(cgroup.path());
        Self {
            servers: Vec::new(),
            pod_servers: Vec::new(),
            dp,
            cgroup,
            backends: BTreeMap::new(),
            node: Node::new(),
            next_pod: 0,
        }
    }

    /// Starts a backend pod answering `"<name>"`; returns its IPv4 and IPv6 addresses.
    pub fn backend(&mut self, name: &str) -> (SocketAddr, SocketAddr) {
        let pod = self.node.add_pod(name);
        self.servers.push(BackendServer::start(&pod, name, BACKEND_PORT));
        let v4 = SocketAddr::new(IpAddr::V4(pod.ip4), BACKEND_PORT);
        let v6 = SocketAddr::new(IpAddr::V6(pod.ip6), BACKEND_PORT);
        self.backends.insert(name.to_owned(), pod);
        (v4, v6)
    }

    /// Starts a backend pod whose server runs in its own pod cgroup (so its listener is the pod's,
    /// as the passive side of the lane option needs), registered in `lane` with its addresses
    /// in the local pods' address map (`pod_lane`: the lane that map says, normally `lane`).
    /// Returns its IPv4 and IPv6 addresses.
    pub fn pod_backend(&mut self, name: &str, lane: &str, pod_lane: &str) -> (SocketAddr, SocketAddr) {
        let caller = self.caller(name, Some(lane));
        let cg = TestCgroup::resolve(&caller.cgroup);
        let entry = PodAddr { cgroup: cg.id, lane: lane_id(pod_lane), dscp: DSCP_UNSET, _pad: [0; 3] };
        let tables = self.dp.dp.tables_mut();
        for ip in [IpAddr::V4(caller.pod.ip4), IpAddr::V6(caller.pod.ip6)] {
            tables.set_pod_addr(tagger::net::addr_words(ip), entry).expect("pod address");
        }
        let listen: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, BACKEND_PORT).into();
        let server = HoldClient::start_with(&caller.cgroup, &caller.pod.ns, "answer", listen, &[name]);
        let started = server.next_line(std::time::Duration::from_secs(10));
        assert_eq!(started.as_deref(), Some("serving"), "backend {name} did not start");
        self.pod_servers.push(server);
        let v4 = SocketAddr::new(IpAddr::V4(caller.pod.ip4), BACKEND_PORT);
        let v6 = SocketAddr::new(IpAddr::V6(caller.pod.ip6), BACKEND_PORT);
        self.backends.insert(name.to_owned(), caller.pod);
        (v4, v6)
    }

    /// A caller pod with a kubelet-style pod cgroup, registered in `lane` (None: unlabelled,
    /// not registered at all). The lane's name is published, as the agent does for every lane
    /// it sees on a pod: that makes it a known lane for the inbound counts.
    pub fn caller(&mut self, name: &str, lane: Option<&str>) -> Caller {
        let pod = self.node.add_pod(name);
        self.next_pod += 1;
        let cgroup = self
            .cgroup
            .child(&format!("kubepods.slice/kubepods-burstable.slice/pod{}-{name}", self.next_pod));
        if let Some(lane) = lane {
            let cg = TestCgroup::resolve(&cgroup);
            let tables = self.dp.dp.tables_mut();
            tables.register_pod(cg.id, cg.pod_entry(lane_id(lane))).expect("register pod");
            tables.set_lane_name(lane_id(lane), lane).expect("lane name");
        }
        Caller { pod, cgroup }
    }

    /// Publishes a Service frontend with backend sets per lane.
    pub fn service(
        &mut self,
        vip: SocketAddr,
        proto: Proto,
        svc_id: u32,
        flags: u32,
        sets: &[(&str, &[SocketAddr])],
    ) {
        let tables = self.dp.dp.tables_mut();
        for (lane, addrs) in sets {
            let backends: Vec<_> = addrs.iter().map(|a| backend(*a)).collect();
            tables.replace_backends(svc_id, lane_id(lane), &backends).expect("replace backends");
        }
        tables.upsert_frontend(&frontend_key(vip, proto), Service { svc_id, flags }).expect("frontend");
    }

    /// Sets a lane's fallback chain and flags.
    pub fn lane_policy(&mut self, lane: &str, chain: &[&str], flags: u32) {
        let chain: Vec<u32> = chain.iter().map(|l| lane_id(l)).collect();
        self.dp
            .dp
            .tables_mut()
            .set_lane_policy(lane_id(lane), &LanePolicy::new(&chain, flags))
            .expect("lane policy");
    }

    /// Makes `count` attempts from the caller (or from `cgroup`, e.g. a container below it).
    #[must_use]
    pub fn call(&self, caller: &Caller, mode: Mode, addr: SocketAddr, count: usize) -> Vec<Attempt> {
        attempts(&caller.cgroup, &caller.pod.ns, mode, addr, count)
    }
}

/// Distinct replies (backend identities) of successful attempts, with their counts; panics on
/// any failed attempt.
#[must_use]
pub fn replies(attempts: &[Attempt]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in attempts {
        *m.entry(a.reply().to_owned()).or_default() += 1;
    }
    m
}
