//! The agent's command line (the user contract: keep these names).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use anyhow::{Result, bail};

use crate::{
    cgroup::{AttachChoice, AttachPoint, choose_attach_point},
    config::labels::{DEFAULT_LANE_LABELS, validate_label_key},
    datapath::{BpfLog, tc::MarkDirection},
};

/// Where the agent learns about pods, Services and EndpointSlices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The Kubernetes API: in-cluster config or `KUBECONFIG`.
    Kubernetes,
    /// A YAML file of Kubernetes objects, re-read when it changes.
    File(PathBuf),
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "kubernetes" {
            Ok(Source::Kubernetes)
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                Err("file: needs a path, e.g. file:/etc/tagger/cluster.yaml".into())
            } else {
                Ok(Source::File(PathBuf::from(path)))
            }
        } else {
            Err(format!("unknown source {s:?}: expected `kubernetes` or `file:PATH`"))
        }
    }
}

/// `tagger-agent`: steer each pod's new connections to Services toward backends of its lane.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "tagger-agent", version)]
pub struct Args {
    /// `kubernetes` (in-cluster config or KUBECONFIG) or `file:PATH` (a YAML file of Pods,
    /// Services and EndpointSlices, as `kubectl get -o yaml` prints them; re-read on change).
    #[arg(long, default_value = "kubernetes", value_parser = Source::from_str)]
    pub source: Source,

    /// This node's name: pods with `spec.nodeName` equal to it are the local pods.
    #[arg(long, env = "NODE_NAME", required_unless_present = "uninstall")]
    pub node_name: Option<String>,

    /// The cgroup v2 directory where kubelet's pod cgroups live (kubepods.slice or kubepods
    /// below it). The datapath attaches at kubepods.slice or kubepods found directly below it
    /// (see --attach-cgroup), or, when neither exists, here.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,

    /// The cgroup the datapath attaches to, absolute or relative to --cgroup-root; every pod's
    /// cgroup must be at or below it. Default: kubelet's pods cgroup (kubepods.slice, then
    /// kubepods) below --cgroup-root, so tagger's programs run before those a socket-LB CNI
    /// attaches at the root; the root itself when neither exists (logged as a warning).
    #[arg(long, value_name = "PATH")]
    pub attach_cgroup: Option<PathBuf>,

    /// Directory where the container runtime pins pod network namespaces (containerd and CRI-O:
    /// /var/run/netns; cri-dockerd: /var/run/docker/netns), for resetting stale connections
    /// from inside a pod's namespace when the pod's processes are not visible (an agent without
    /// the host's PID namespace). Entering a namespace needs CAP_SYS_ADMIN. Unset: only pods
    /// whose processes the agent sees (/proc/<pid>/ns/net).
    #[arg(long, value_name = "DIR")]
    pub netns_dir: Option<PathBuf>,

    /// bpffs directory for the pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/tagger")]
    pub bpffs: PathBuf,

    /// Lanes config (fallback chains, strict lanes), YAML; reloaded when it changes.
    #[arg(long)]
    pub lanes_config: Option<PathBuf>,

    /// Pod label keys holding the lane, first present wins (repeatable). Default:
    /// tagger.io/lane, alicloud.service.tag, traffic.opensergo.io/label.
    #[arg(long = "lane-label", value_name = "KEY")]
    pub lane_labels: Vec<String>,

    /// Address for /metrics, /healthz and /readyz (e.g. 0.0.0.0:9477).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,

    /// Seconds without a turn of the reconciler's loop after which /healthz answers 503
    /// ("reconciler stalled"): the loop turns every 2 s once the datapath lease is armed, at
    /// least every 30 s before, and a pass at 100,000 endpoints takes about a second.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=3600), value_name = "SECS")]
    pub reconciler_stall_after: u64,

    /// Seconds a Kubernetes watch may stay silent before it is restarted: the server ends each
    /// watch after this long (`timeoutSeconds`), and a connection that delivers nothing for
    /// this plus 5 s is given up, which is how an API server that vanished without a reset
    /// (a blackhole) is detected. Connects time out after this long too (at most 30 s).
    #[arg(long, default_value_t = 290, value_parser = clap::value_parser!(u32).range(1..=3600), value_name = "SECS")]
    pub api_timeout: u32,

    /// Largest API server response line the agent reads, in MiB: one list, or one watch event.
    /// A longer one is refused (the watch is retried, the datapath keeps its state), so a
    /// misbehaving server cannot make the agent buffer without bound.
    #[arg(long, default_value_t = crate::source::kube::line_limit::DEFAULT_MAX_LINE_MIB,
          value_parser = clap::value_parser!(u32).range(1..=4096), value_name = "MIB")]
    pub api_max_response_mib: u32,

    /// Stamp local pods' packets with their lane on the network interfaces matching these
    /// globs (comma-separated, `*` and `?`), e.g. `cali*,lxc*` or `veth*` for the host side of
    /// pod veths: the bits of `skb->mark` under `--mark-mask` = the lane's small index (see
    /// `tagger lanes`) and, for lanes with `dscp` in the lanes config, that DSCP. Empty (the
    /// default): no marking. New matching interfaces are picked up within 2 s.
    #[arg(long, value_name = "GLOB[,GLOB...]", default_value = "")]
    pub mark_interfaces: String,

    /// The bits of `skb->mark` lane marking may write (hexadecimal, one contiguous run, never
    /// kube-proxy's 0x4000/0x8000): each marked lane gets an index 1..=mask>>shift there, base
    /// is 0 and keeps its mark; every other bit of the mark is kept. Lanes beyond the mask's
    /// room are not marked, and counted. The default 0x00f0 (15 lanes) avoids kube-proxy's,
    /// Calico's and Cilium's magic bits (see the README).
    #[arg(long, value_name = "HEX", default_value = crate::model::lane_marks::DEFAULT_MARK_MASK,
          value_parser = crate::model::lane_marks::MarkMask::parse)]
    pub mark_mask: crate::model::lane_marks::MarkMask,

    /// Where on those interfaces: `ingress` (packets the interface receives: the host side of a
    /// pod's veth, before routing and queueing) or `egress` (packets it sends: a node uplink).
    #[arg(long, value_name = "ingress|egress", default_value = "ingress", value_parser = MarkDirection::from_str)]
    pub mark_direction: MarkDirection,

    /// The node's network namespace (an nsfs file, e.g. the host's /proc/1/ns/net mounted into
    /// the agent's pod), where the pods' host-side interfaces are: lane marking enters it
    /// (needs CAP_SYS_ADMIN) to find and attach to them. Unset: the agent's own namespace
    /// (an agent run on the host, or with hostNetwork).
    #[arg(long, value_name = "PATH")]
    pub node_netns: Option<PathBuf>,

    /// How long the datapath keeps steering without this agent (or its successor) renewing it:
    /// once no agent has completed a reconcile pass or a renewal for this long (the agent
    /// deleted, crash-looping, or an upgrade stuck before its first pass), connections to
    /// Services are left untouched for the cluster's own Service implementation, and counted
    /// as `lease_expired`. Renewed on every pass and every 2 s (a quarter of a shorter lease);
    /// the next agent re-arms it at its first complete pass. `0`: never expires. Durations:
    /// `90s`, `2m`, `1h` (at least 1 s, at most 24 h).
    #[arg(long, value_name = "DURATION", default_value = crate::agent::lease::DEFAULT_LEASE,
          value_parser = crate::agent::lease::parse_lease)]
    pub datapath_lease: std::time::Duration,

    /// The datapath's debug log: `--bpf-log` (or `=debug`) has the programs write one record
    /// per decision on a connection to a Service (Service id, caller lane, backend lane,
    /// outcome) and per inbound connection's classification; `=trace` adds one per packet
    /// lane marking marks. The agent logs them at info under the target `tagger::datapath`.
    /// Off (the default) the records cost the hooks nothing: the level is fixed when the
    /// programs load, so a start with another level (and every start with the log on) loads
    /// them again, replacing the running ones as an upgrade does.
    #[arg(long, value_name = "debug|trace", num_args = 0..=1, require_equals = true, default_value = "off",
          default_missing_value = "debug", value_parser = BpfLog::from_str)]
    pub bpf_log: BpfLog,

    /// Detach the programs and remove every pin under --bpffs, then exit.
    #[arg(long)]
    pub uninstall: bool,
}

/// Validated settings the reconciler works with.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node.
    pub node_name: String,
    /// Where pod cgroups live.
    pub cgroup_root: PathBuf,
    /// Where the datapath attaches.
    pub attach: AttachPoint,
    /// Lane label keys, in priority order.
    pub lane_keys: Vec<String>,
    /// Interface globs to mark on (empty: no marking).
    pub mark_interfaces: Vec<String>,
    /// `--mark-mask`, when marking is on.
    pub mark_mask: Option<crate::model::lane_marks::MarkMask>,
    /// `--datapath-lease` (zero: never expires).
    pub datapath_lease: std::time::Duration,
    /// `--netns-dir`.
    pub netns_dir: Option<PathBuf>,
}

impl Args {
    /// Checks what can be checked before touching anything.
    pub fn validate(&self) -> Result<AgentConfig> {
        let Some(node_name) = self.node_name.clone().filter(|n| !n.is_empty()) else {
            bail!("--node-name (or NODE_NAME) is required");
        };
        let lane_keys: Vec<String> = if self.lane_labels.is_empty() {
            DEFAULT_LANE_LABELS.iter().map(|k| (*k).to_owned()).collect()
        } else {
            self.lane_labels.clone()
        };
        for key in &lane_keys {
            if let Err(e) = validate_label_key(key) {
                bail!("--lane-label {key:?}: {e}");
            }
        }
        if !Path::new(&self.cgroup_root).is_dir() {
            bail!(
                "--cgroup-root {}: no such directory (is cgroup v2 mounted there?)",
                self.cgroup_root.display()
            );
        }
        let attach = choose_attach_point(&self.cgroup_root, self.attach_cgroup.as_deref(), Path::is_dir);
        if attach.choice == AttachChoice::Configured && !attach.path.is_dir() {
            bail!("--attach-cgroup {}: no such directory", attach.path.display());
        }
        if let Source::File(path) = &self.source
            && !path.exists()
        {
            bail!("--source file:{}: no such file", path.display());
        }
        let mark_interfaces = crate::datapath::tc::parse_globs(&self.mark_interfaces)
            .map_err(|e| anyhow::anyhow!("--mark-interfaces {e}"))?;
        let mark_mask = (!mark_interfaces.is_empty()).then_some(self.mark_mask);
        Ok(AgentConfig {
            node_name,
            cgroup_root: self.cgroup_root.clone(),
            attach,
            lane_keys,
            mark_interfaces,
            mark_mask,
            datapath_lease: self.datapath_lease,
            netns_dir: self.netns_dir.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!("kubernetes".parse::<Source>(), Ok(Source::Kubernetes));
        assert_eq!("file:/x.yaml".parse::<Source>(), Ok(Source::File("/x.yaml".into())));
        assert!("file:".parse::<Source>().is_err());
        assert!("k8s".parse::<Source>().unwrap_err().contains("kubernetes"));
    }

    #[test]
    fn flags_and_validation() {
        let a = Args::try_parse_from([
            "tagger-agent",
            "--node-name",
            "n1",
            "--lane-label",
            "a/b",
            "--lane-label",
            "c",
        ])
        .unwrap();
        assert_eq!(a.lane_labels, ["a/b", "c"]);
        assert_eq!(a.source, Source::Kubernetes);
        assert_eq!(a.datapath_lease, std::time::Duration::from_mins(2), "default lease");
        let never =
            Args::try_parse_from(["tagger-agent", "--node-name", "n1", "--datapath-lease", "0"]).unwrap();
        assert!(never.datapath_lease.is_zero());
        let short = Args::try_parse_from(["tagger-agent", "--node-name", "n1", "--datapath-lease", "10ms"]);
        assert!(short.unwrap_err().to_string().contains("--datapath-lease"));
        let bad =
            Args::try_parse_from(["tagger-agent", "--node-name", "n1", "--lane-label", "no spaces allowed"])
                .unwrap();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("--lane-label"), "{e}");
        let missing =
            Args::try_parse_from(["tagger-agent", "--node-name", "n1", "--cgroup-root", "/nonexistent/x"])
                .unwrap();
        assert!(missing.validate().unwrap_err().to_string().contains("--cgroup-root"));
        let attach = Args::try_parse_from([
            "tagger-agent",
            "--node-name",
            "n1",
            "--cgroup-root",
            "/",
            "--attach-cgroup",
            "nonexistent-tagger-pods",
        ])
        .unwrap();
        let e = attach.validate().unwrap_err().to_string();
        assert!(e.contains("--attach-cgroup /nonexistent-tagger-pods"), "{e}");
        assert!(Args::try_parse_from(["tagger-agent", "--uninstall"]).is_ok());
    }

    #[test]
    fn the_datapath_log_is_off_unless_asked() {
        let parse = |extra: &[&str]| {
            Args::try_parse_from(["tagger-agent", "--node-name", "n1"].iter().chain(extra)).map(|a| a.bpf_log)
        };
        assert_eq!(parse(&[]).unwrap(), BpfLog::Off);
        assert_eq!(parse(&["--bpf-log"]).unwrap(), BpfLog::Debug);
        assert_eq!(parse(&["--bpf-log=trace"]).unwrap(), BpfLog::Trace);
        assert_eq!(
            parse(&["--bpf-log", "--uninstall"]).unwrap(),
            BpfLog::Debug,
            "a bare flag takes no value"
        );
        assert!(parse(&["--bpf-log=info"]).unwrap_err().to_string().contains("debug"));
    }
}
