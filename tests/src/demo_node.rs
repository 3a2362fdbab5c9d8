//! The demo's node (`tagger-demo`), for the demo and for tests that want the same picture: an
//! edge, gateways in base and gray, and a chain of Services A → B → C where A and C have a gray
//! version and B has none. Every pod but the edge runs `testpod serve`, which answers with its
//! name and lane after calling the next Service, so a response body is the path the request
//! took: `gw-gray[gray] -> a-gray[gray] -> b-base[base] -> c-base[base]`.
//!
//! ```text
//!          ┌─ gw-base ─┐             ┌─ a-base ─┐                            ┌─ c-base
//!   edge ──┤           ├─► Service A ┤          ├─► Service B (b-base) ─► Service C ┤
//!          └─ gw-gray ─┘             └─ a-gray ─┘                            └─ c-gray
//! ```
//!
//! The edge is a base pod without a lane label, where [`start_edge`] runs nginx as the
//! gateway of the gray release ([`crate::nginx`]): it proxies to the gateway pods' addresses,
//! as ingress-nginx proxies to a Service's endpoints.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use crate::{
    agent::{AgentSandbox, PORT, pod_in_lane, set_size},
    client::{Attempt, HoldClient, http_attempts},
    nginx::{EdgeConfig, Nginx},
};

/// Service A's cluster IP and port.
pub const A: SocketAddr = vip(10);
/// Service B's cluster IP and port.
pub const B: SocketAddr = vip(11);
/// Service C's cluster IP and port.
pub const C: SocketAddr = vip(12);

const fn vip(last: u8) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, last), 80))
}

/// The Services: (name, cluster IP and port, backend pods).
pub const SERVICES: [(&str, SocketAddr, &[&str]); 3] =
    [("a", A, &["a-base", "a-gray"]), ("b", B, &["b-base"]), ("c", C, &["c-base", "c-gray"])];

/// A serving pod of the node.
#[derive(Clone, Copy, Debug)]
pub struct DemoPod {
    /// Pod name, also what it answers.
    pub name: &'static str,
    /// Its lane label (`None`: no label, base).
    pub lane: Option<&'static str>,
    /// The Service it calls for every request it serves.
    pub calls: Option<SocketAddr>,
}

/// The serving pods: the gateways, then the chain's backends.
pub const PODS: [DemoPod; 7] = [
    DemoPod { name: "gw-base", lane: None, calls: Some(A) },
    DemoPod { name: "gw-gray", lane: Some("gray"), calls: Some(A) },
    DemoPod { name: "a-base", lane: None, calls: Some(B) },
    DemoPod { name: "a-gray", lane: Some("gray"), calls: Some(B) },
    DemoPod { name: "b-base", lane: None, calls: Some(C) },
    DemoPod { name: "c-base", lane: None, calls: None },
    DemoPod { name: "c-gray", lane: Some("gray"), calls: None },
];

/// The edge pod (no lane label: base), where nginx runs.
pub const EDGE: &str = "edge";
/// The port nginx listens on at the edge.
pub const EDGE_PORT: u16 = 80;
/// The header that sends a request into the gray lane at the edge, as `(name, value)`: the one
/// deploy/examples/nginx-ingress's canary Ingress matches.
pub const EDGE_HEADER: (&str, &str) = ("x-lane", "gray");
/// Percentage of the requests without [`EDGE_HEADER`] that the edge sends to the gray gateway.
pub const EDGE_GRAY_PERCENT: u8 = 10;

/// The lanes config: gray falls back to base where a Service has no gray backend (B).
pub const LANES_CONFIG: &str =
    "# gray falls back to base when a Service has no gray backend\nlanes:\n  gray:\n    fallback: [base]\n";

/// Paths taken (response bodies, or `failed: <error>`), with how many requests took each.
pub type Paths = BTreeMap<String, usize>;

/// The node's serving processes (`testpod serve`, our children); stopped on drop. Drop it
/// before the sandbox, whose namespaces they live in (declare it after the sandbox).
#[derive(Debug)]
pub struct DemoNode {
    /// Held for their drop, which stops them.
    _servers: Vec<HoldClient>,
}

impl DemoNode {
    /// Builds the node in `sb` (pods, Services, lanes config), starts the agent on the file
    /// source with `--lanes-config` and `extra_agent_args`, waits until the agent has written
    /// every pod and backend set, then starts every pod's server.
    ///
    /// # Panics
    /// If the agent does not sync within 20 s (the panic shows its log) or a server does not
    /// start.
    #[must_use]
    pub fn start(sb: &mut AgentSandbox, extra_agent_args: &[&str]) -> Self {
        for pod in PODS {
            sb.caller(pod.name, pod.lane);
        }
        sb.caller(EDGE, None);
        for (name, vip, backends) in SERVICES {
            sb.cluster.service(name, &[vip.ip()], vip.port(), PORT, backends);
        }
        let lanes = sb.write_lanes_config(LANES_CONFIG).to_string_lossy().into_owned();
        let mut args = vec!["--lanes-config", lanes.as_str()];
        args.extend_from_slice(extra_agent_args);
        sb.start_agent_on_file(&args);
        wait_synced(sb);
        // The servers start once the datapath is attached: their listeners then keep the SYNs
        // the receiving side reads the lane option from.
        Self { _servers: PODS.iter().map(|pod| serve(sb, pod)).collect() }
    }
}

/// The lane a pod of [`PODS`] (or the edge) is labelled with, `base` without a label.
#[must_use]
pub fn lane_of(pod: &str) -> &'static str {
    PODS.iter().find(|p| p.name == pod).and_then(|p| p.lane).unwrap_or("base")
}

/// The name of the Service at `vip` (`a`, `b`, `c`), if it is one of [`SERVICES`].
#[must_use]
pub fn service_name(vip: SocketAddr) -> Option<&'static str> {
    SERVICES.iter().find(|(_, v, _)| *v == vip).map(|(name, ..)| *name)
}

fn wait_synced(sb: &AgentSandbox) {
    let cgroups: Vec<(PathBuf, &str)> =
        PODS.iter().map(|p| p.name).chain([EDGE]).map(|name| (sb.pod_cgroup(name), lane_of(name))).collect();
    // Each Service's backend set per lane, as many as it has backends in that lane.
    let mut sets = BTreeMap::<(SocketAddr, &str), u32>::new();
    for (_, vip, backends) in SERVICES {
        for backend in backends {
            *sets.entry((vip, lane_of(backend))).or_default() += 1;
        }
    }
    sb.wait_for("the agent's first sync", Duration::from_secs(20), |t| {
        cgroups.iter().all(|(cg, lane)| pod_in_lane(t, cg, lane))
            && sets.iter().all(|(&(vip, lane), &n)| set_size(t, vip, lane) == Some(n))
    });
}

/// `testpod serve` in the pod: it answers `NAME[LANE]`, after calling its next Service.
fn serve(sb: &AgentSandbox, pod: &DemoPod) -> HoldClient {
    let listen = SocketAddr::from(([0, 0, 0, 0], PORT));
    let mut args = vec![pod.name.to_owned(), lane_of(pod.name).to_owned()];
    args.extend(pod.calls.map(|next| next.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server =
        HoldClient::start_with(&sb.pod_cgroup(pod.name), &sb.netns[pod.name].ns, "serve", listen, &args);
    assert!(server.wait_line("serving", Duration::from_secs(10)).is_some(), "{} did not start", pod.name);
    server
}

/// The address a gateway pod serves on (what the edge proxies to).
#[must_use]
pub fn pod_addr(sb: &AgentSandbox, pod: &str) -> SocketAddr {
    SocketAddr::new(sb.ip4(pod), PORT)
}

/// The address nginx listens on at the edge.
#[must_use]
pub fn edge_addr(sb: &AgentSandbox) -> SocketAddr {
    SocketAddr::new(sb.ip4(EDGE), EDGE_PORT)
}

/// Starts nginx in the edge pod: requests with [`EDGE_HEADER`], and [`EDGE_GRAY_PERCENT`] of the
/// others, to gw-gray; the rest to gw-base. Its files go to `<sandbox dir>/edge`.
///
/// # Errors
/// Why nginx could not start (see [`Nginx::start`]).
pub fn start_edge(sb: &AgentSandbox) -> Result<Nginx, String> {
    let dir = sb.dir.0.join("edge");
    let (gray, stable) = ([pod_addr(sb, "gw-gray")], [pod_addr(sb, "gw-base")]);
    let config = EdgeConfig {
        dir: &dir,
        listen: edge_addr(sb),
        header: EDGE_HEADER,
        gray_percent: EDGE_GRAY_PERCENT,
        gray: &gray,
        stable: &stable,
    };
    Nginx::start(&sb.pod_cgroup(EDGE), &sb.netns[EDGE].ns, &config)
}

/// Sends `n` HTTP requests from pod `from` (a gateway, the edge, any pod of the node) to `to`
/// (a Service, a pod, the edge's nginx), each on a new connection; the paths they took.
#[must_use]
pub fn send(sb: &AgentSandbox, from: &str, to: SocketAddr, n: usize) -> Paths {
    send_with(sb, from, to, n, None)
}

/// [`send`] with the request header `header` (`(name, value)`) on every request.
#[must_use]
pub fn send_with(
    sb: &AgentSandbox,
    from: &str,
    to: SocketAddr,
    n: usize,
    header: Option<(&str, &str)>,
) -> Paths {
    let mut paths = Paths::new();
    for attempt in http_attempts(&sb.pod_cgroup(from), &sb.netns[from].ns, to, n, header) {
        let key = match attempt {
            Attempt::Ok { reply, .. } => reply,
            Attempt::Err { message, .. } => format!("failed: {message}"),
        };
        *paths.entry(key).or_default() += 1;
    }
    paths
}

/// `tagger lanes coverage -o dot` over the node's pins, as written and rendered.
#[derive(Debug)]
pub struct CoverageGraph {
    /// The command succeeded.
    pub listed: bool,
    /// Where the graph was written (`lanes.dot`).
    pub dot_file: PathBuf,
    /// The picture graphviz rendered (`lanes.svg`), or why it refused the graph; `None` when
    /// graphviz is not installed.
    pub svg: Option<Result<PathBuf, String>>,
}

/// Writes the node's coverage graph to `lanes.dot` in the sandbox's directory and renders it
/// with graphviz (`dot -Tsvg`) when graphviz is installed.
#[must_use]
pub fn coverage_graph(sb: &AgentSandbox) -> CoverageGraph {
    let dot = std::process::Command::new(crate::agent::workspace_bin("tagger"))
        .args(["--bpffs", &sb.pins.0.to_string_lossy(), "lanes", "coverage", "-o", "dot"])
        .output()
        .expect("run tagger");
    let dot_file = sb.dir.0.join("lanes.dot");
    std::fs::write(&dot_file, &dot.stdout).expect("write lanes.dot");
    let svg_file = dot_file.with_extension("svg");
    let svg =
        match std::process::Command::new("dot").arg("-Tsvg").arg(&dot_file).arg("-o").arg(&svg_file).output()
        {
            Err(_) => None,
            Ok(out) if out.status.success() => Some(Ok(svg_file)),
            Ok(out) => Some(Err(String::from_utf8_lossy(&out.stderr).into_owned())),
        };
    CoverageGraph { listed: dot.status.success(), dot_file, svg }
}
