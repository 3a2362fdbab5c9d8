//! The command line (the user contract: keep these names).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// The agent's default pin directory (`tagger-agent --bpffs`).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/tagger";
/// Where `status` looks for the agent's `/readyz` by default.
pub const DEFAULT_AGENT_ADDR: &str = "127.0.0.1:9477";

/// `tagger`: inspect tagger's datapath on this node.
///
/// Reads the maps the agent pinned under --bpffs, read-only (the kernel refuses any write through
/// the handles this tool holds), so it works while the agent is down and can never change what
/// the datapath does. Reading pinned maps needs root (or CAP_BPF and access to the pins).
#[derive(Clone, Debug, Parser)]
#[command(name = "tagger", version, propagate_version = true)]
pub struct Cli {
    /// bpffs directory where the agent pinned the datapath (its --bpffs).
    #[arg(long, global = true, env = "TAGGER_BPFFS", default_value = DEFAULT_BPFFS, value_name = "DIR")]
    pub bpffs: PathBuf,

    /// The cgroup v2 root the agent attached to (its --cgroup-root), as seen by this process.
    /// Default: this process's cgroup2 mount. Inside a container, whose cgroup namespace hides
    /// the host's tree, give the host's root as mounted in the container (the DaemonSet's
    /// `/host/sys/fs/cgroup`) so cgroup ids and paths resolve.
    #[arg(long, global = true, env = "TAGGER_CGROUP_ROOT", value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,

    /// Output format: aligned tables for people, or JSON for scripts (a stable schema:
    /// snake_case fields, lanes as {id, name}, addresses as strings, outcomes by name).
    /// (`-o dot`: a graphviz graph, for `lanes coverage` only.)
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// What to show.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format, as `-o` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned tables.
    Table,
    /// One JSON document (one per line with `stats --watch`).
    Json,
    /// A graphviz graph (`lanes coverage` only): `tagger lanes coverage -o dot | dot -Tsvg`.
    Dot,
}

/// The format of every subcommand but `lanes coverage`: tables or JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Aligned tables.
    Table,
    /// One JSON document.
    Json,
}

impl Output {
    /// The tables-or-JSON format; `None` for a graph.
    #[must_use]
    pub const fn plain(self) -> Option<Format> {
        match self {
            Self::Table => Some(Format::Table),
            Self::Json => Some(Format::Json),
            Self::Dot => None,
        }
    }
}

/// The subcommands.
#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Programs attached, map fill levels, datapath config, and whether the agent is ready.
    ///
    /// For each program: its link pin, since when it is pinned (attached), the kernel's link and
    /// program ids, and the cgroup it is attached to. For each map: entries vs capacity.
    /// Then every other program on tagger's hooks at its attach cgroup and each ancestor, in the
    /// order the kernel runs them (a socket LB running before tagger is warned about); program
    /// names need CAP_SYS_ADMIN.
    ///
    /// Exits 0 when every program link and every map is pinned, 1 otherwise (after printing
    /// the report). An agent that does not answer is reported, not an error: the datapath keeps
    /// serving with its last state while the agent is down.
    Status(StatusArgs),
    /// Registered pod cgroups and their lanes.
    ///
    /// Cgroup id, lane, cgroup level, and the pod's namespace/name when the agent has published
    /// it. Processes in cgroups that are not registered (nor below a registered one) are base.
    Pods,
    /// Service frontends and their backends, grouped by lane.
    ///
    /// Each frontend (ClusterIP:port/proto, Service namespace/name:port, flags such as strict)
    /// with its backend sets per lane, what callers of each lane get when that set is empty,
    /// and the configured lane policies.
    Services,
    /// Lanes: names, ids and policies.
    ///
    /// Every lane known to the datapath, with its id (32-bit FNV-1a of the name; base = 0), its
    /// policy (fallback chain, or strict), and how many pods and backend sets it has.
    ///
    /// `lanes coverage`: where each lane holds, falls back and stops along the call graph.
    Lanes(LanesArgs),
    /// Decision counters by outcome, Service and lane; --watch for a live view.
    ///
    /// Global counts per outcome (steered, fell_back, refused_strict, ...), and per (Service,
    /// caller lane, backend lane, outcome). `--watch` redraws a live view with per-second rates
    /// computed from successive readings.
    Stats(StatsArgs),
    /// What the datapath would do with a new connection from a pod, step by step.
    ///
    /// Caller pod and lane, Service frontend, the lane's own backends, strictness, each fallback
    /// step, the outcome and the backend set chosen from. Computed by the same lane-resolution
    /// code the kernel runs, over the same maps.
    Explain(ExplainArgs),
}

/// `tagger lanes`.
#[derive(Clone, Debug, clap::Args)]
pub struct LanesArgs {
    /// Another view of the lanes (default: the lanes themselves).
    #[command(subcommand)]
    pub view: Option<LanesView>,
}

/// Views under `tagger lanes`.
#[derive(Clone, Debug, Subcommand)]
pub enum LanesView {
    /// Where each lane holds, falls back and stops: call edges caller → Service, break points.
    ///
    /// For each lane, the call edges its callers made (caller: the Service whose backend the
    /// calling pod is, else its workload) and whether the lane held, fell back, was routed or
    /// refused; the Services where it fell back, and among them the break points: a Service
    /// reached only in another lane whose pods call a Service that has backends in the lane
    /// (the lane stops there); lane leaks seen by receiving pods; Services with backends in the
    /// lane no caller reached.
    ///
    /// By default from this node's pins (counts since the datapath was loaded; works while the
    /// agent is down). With --prometheus, cluster-wide: PromQL over every node's agent metrics.
    /// `-o json` for scripts, `-o dot` for a graphviz graph.
    Coverage(CoverageArgs),
}

/// `tagger lanes coverage`.
#[derive(Clone, Debug, clap::Args)]
pub struct CoverageArgs {
    /// A Prometheus that scrapes every node's tagger-agent (`http://host:port[/prefix]`): the
    /// report then covers the whole cluster instead of this node.
    #[arg(long, value_name = "URL")]
    pub prometheus: Option<String>,

    /// With --prometheus: count only the last WINDOW (a PromQL duration such as 15m or 2h)
    /// instead of everything since each agent started.
    #[arg(long, value_name = "WINDOW", requires = "prometheus", value_parser = parse_window)]
    pub window: Option<String>,
}

fn parse_window(s: &str) -> Result<String, String> {
    if crate::coverage::prometheus::is_duration(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?}: expected a PromQL duration such as 15m, 2h or 1h30m"))
    }
}

/// `tagger status`.
#[derive(Clone, Debug, clap::Args)]
pub struct StatusArgs {
    /// Address of the agent's health endpoints (its --metrics-addr); `/readyz` is asked with a
    /// short timeout. Not answering is reported, not an error.
    #[arg(long, default_value = DEFAULT_AGENT_ADDR, value_name = "HOST:PORT")]
    pub agent_addr: String,
}

/// `tagger stats`.
#[derive(Clone, Debug, clap::Args)]
pub struct StatsArgs {
    /// Show the connections this node's pods accepted instead: by the caller's lane (read from
    /// the lane option on the SYN), the pod's lane, and whether the caller fell back. Lane leaks
    /// (another lane, no fallback) and untagged connections (no option) are counted apart.
    #[arg(long, conflicts_with = "watch")]
    pub inbound: bool,

    /// Redraw a live view every --interval seconds with per-second rates, until Ctrl-C.
    /// With `-o json`, prints one JSON document per line instead.
    #[arg(long)]
    pub watch: bool,

    /// Seconds between refreshes with --watch.
    #[arg(long, default_value_t = 2.0, value_name = "SECS", requires = "watch", value_parser = parse_interval)]
    pub interval: f64,

    /// Stop after this many refreshes with --watch (default: until Ctrl-C).
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
}

/// `tagger explain`.
#[derive(Clone, Debug, clap::Args)]
pub struct ExplainArgs {
    /// The calling pod: `namespace/name` (as the agent published it), a pod name alone if it is
    /// unique, a cgroup id (decimal), or a cgroup directory path (a pod's or a container's below
    /// it; absolute, or relative to the cgroup v2 mount).
    #[arg(long, value_name = "POD")]
    pub pod: String,

    /// The destination the pod connects or sends to: `IP:PORT[/tcp|/udp]` (default tcp); IPv6 as
    /// `[ADDR]:PORT`.
    #[arg(value_name = "IP:PORT[/PROTO]")]
    pub destination: String,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if v.is_finite() && (0.1..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s}: the interval must be between 0.1 and 3600 seconds"))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_global_flags() {
        let cli = Cli::try_parse_from(["tagger", "pods"]).unwrap();
        assert_eq!(cli.bpffs, PathBuf::from(DEFAULT_BPFFS));
        assert_eq!(cli.output, Output::Table);
        let cli = Cli::try_parse_from(["tagger", "lanes", "-o", "json", "--bpffs", "/x"]).unwrap();
        assert_eq!((cli.output, cli.bpffs), (Output::Json, PathBuf::from("/x")));
        let Command::Status(s) = Cli::try_parse_from(["tagger", "status"]).unwrap().command else {
            panic!("status")
        };
        assert_eq!(s.agent_addr, DEFAULT_AGENT_ADDR);
    }

    #[test]
    fn coverage_takes_a_prometheus_and_a_window() {
        let Command::Lanes(LanesArgs { view: Some(LanesView::Coverage(c)) }) = Cli::try_parse_from([
            "tagger",
            "lanes",
            "coverage",
            "--prometheus",
            "http://p:9090",
            "--window",
            "15m",
        ])
        .unwrap()
        .command
        else {
            panic!("coverage")
        };
        assert_eq!((c.prometheus.as_deref(), c.window.as_deref()), (Some("http://p:9090"), Some("15m")));
        assert!(
            Cli::try_parse_from(["tagger", "lanes", "coverage", "--window", "15m"]).is_err(),
            "needs prometheus"
        );
        assert!(
            Cli::try_parse_from(["tagger", "lanes", "coverage", "--prometheus", "http://p", "--window", "x"])
                .is_err()
        );
        let cli = Cli::try_parse_from(["tagger", "lanes", "coverage", "-o", "dot"]).unwrap();
        assert_eq!(cli.output, Output::Dot);
        assert!(matches!(
            Cli::try_parse_from(["tagger", "lanes"]).unwrap().command,
            Command::Lanes(LanesArgs { view: None })
        ));
    }

    #[test]
    fn watch_options_need_watch() {
        assert!(Cli::try_parse_from(["tagger", "stats", "--interval", "1"]).is_err());
        assert!(Cli::try_parse_from(["tagger", "stats", "--watch", "--interval", "0"]).is_err());
        let Command::Stats(s) =
            Cli::try_parse_from(["tagger", "stats", "--watch", "--interval", "0.5", "--count", "2"])
                .unwrap()
                .command
        else {
            panic!("stats")
        };
        assert!(s.watch && (s.interval - 0.5).abs() < f64::EPSILON && s.count == Some(2));
    }

    #[test]
    fn explain_takes_a_pod_and_a_destination() {
        let Command::Explain(e) =
            Cli::try_parse_from(["tagger", "explain", "--pod", "demo/gw", "10.96.0.10:80/udp"])
                .unwrap()
                .command
        else {
            panic!("explain")
        };
        assert_eq!((e.pod.as_str(), e.destination.as_str()), ("demo/gw", "10.96.0.10:80/udp"));
        assert!(Cli::try_parse_from(["tagger", "explain", "10.96.0.10:80"]).is_err());
    }
}
