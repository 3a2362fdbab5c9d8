//! `tagger status`: is the datapath installed and attached, how full are its maps, and does the
//! agent answer.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tagger_common::{ALL_MAPS, Lease, LeaseState};

use super::{
    args::{Format, StatusArgs},
    hooks,
    links::{attach_type_name, cgroup_paths, link_info},
    open::{check_pin_dir, open_read_only},
    render::{ago, print_json, rfc3339, table, unix_seconds},
};
use crate::{
    cgroup::cgroup2_mount,
    datapath::{PROGRAMS, PinLayout},
    sys::monotonic_now_ns,
};

/// How long `status` waits for the agent, per step (connect, then the answer).
const AGENT_TIMEOUT: Duration = Duration::from_millis(700);

/// The JSON document of `tagger status`.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// The pin directory read.
    pub bpffs: String,
    /// Every program link and every map is pinned, and the maps could be read.
    pub healthy: bool,
    /// One entry per datapath program.
    pub programs: Vec<ProgramStatus>,
    /// One entry per map.
    pub maps: Vec<MapStatus>,
    /// Why the maps could not be read, if they could not.
    pub maps_error: Option<String>,
    /// The datapath configuration, if the maps could be read.
    pub config: Option<ConfigStatus>,
    /// The datapath lease, if the maps could be read.
    pub lease: Option<LeaseStatus>,
    /// Whether the agent answers.
    pub agent: AgentProbe,
    /// How stale connections are reset here, as the running agent found at its start (see
    /// `tagger::lifecycle`); `tagger status` itself probes nothing.
    pub reset_mechanism: String,
    /// TC lane marking: the interfaces with a pinned TCX marking link, as
    /// `{interface, direction}` (netlink filters, on kernels before 6.6, hold no pin: see
    /// `tc filter show dev IFACE ingress` for `lane_mark`).
    pub marking: Vec<MarkedInterface>,
    /// How marking attaches on this kernel: `tcx` or `netlink`.
    pub marking_mode: String,
    /// tagger's attach cgroup and every program on its hooks there and above, in run order
    /// (null when no link could be traced to a cgroup directory).
    pub attach: Option<hooks::AttachReport>,
}

/// An interface with a marking link.
#[derive(Debug, Serialize)]
pub struct MarkedInterface {
    /// Interface name.
    pub interface: String,
    /// `ingress` or `egress`.
    pub direction: String,
}

/// A program's link.
#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    /// Program name (the function in tagger-ebpf).
    pub program: &'static str,
    /// Its link pin.
    pub link_pin: String,
    /// Whether the link pin exists (if it does, the program is attached).
    pub pinned: bool,
    /// When the link was pinned (the pin's mtime), Unix seconds.
    pub pinned_since_unix: Option<u64>,
    /// The same as RFC 3339 UTC.
    pub pinned_since: Option<String>,
    /// Kernel link id.
    pub link_id: Option<u32>,
    /// Kernel id of the attached program.
    pub program_id: Option<u32>,
    /// The cgroup the link attaches to: id (inode) ...
    pub cgroup_id: Option<u64>,
    /// ... and directory, when found below the cgroup v2 mount.
    pub cgroup_path: Option<String>,
    /// The kernel's attach type (e.g. `cgroup_inet4_connect`).
    pub attach_type: Option<String>,
    /// Why the link could not be inspected, if it could not.
    pub error: Option<String>,
}

/// A map's pin and fill level.
#[derive(Debug, Serialize)]
pub struct MapStatus {
    /// Map name.
    pub map: &'static str,
    /// Its pin.
    pub pin: String,
    /// Whether the pin exists.
    pub pinned: bool,
    /// Entries (null for array maps, whose size is fixed, and when unreadable).
    pub entries: Option<u64>,
    /// Capacity in entries (null as for `entries`).
    pub capacity: Option<u32>,
    /// `entries / capacity`.
    pub fill_ratio: Option<f64>,
}

/// The datapath configuration (`TAGGER_CFG_V1`).
#[derive(Debug, Serialize)]
pub struct ConfigStatus {
    /// Shallowest registered pod cgroup level (root = 0).
    pub pod_level_min: u32,
    /// Deepest; 0 when no pod is registered.
    pub pod_level_max: u32,
}

/// The datapath lease (`TAGGER_LEASE_V1`): whether the programs still steer without an agent
/// renewing it.
#[derive(Debug, Serialize)]
pub struct LeaseStatus {
    /// The state itself (JSON: `state` and the fields below).
    #[serde(skip)]
    pub kind: LeaseState,
    /// `armed`, `expired`, `never_armed` (no agent completed a pass yet) or `disabled`
    /// (`--datapath-lease 0`).
    pub state: &'static str,
    /// Whether the programs steer (armed or disabled); otherwise Service connections are left
    /// to the cluster's own Service implementation.
    pub steering: bool,
    /// Seconds left before it expires (armed only).
    pub remaining_seconds: Option<f64>,
    /// Seconds since it expired (expired only).
    pub expired_seconds_ago: Option<f64>,
    /// Seconds since an agent last renewed it (null: never).
    pub renewed_seconds_ago: Option<f64>,
    /// The duration the agent renews it for, seconds (null when it never expires).
    pub duration_seconds: Option<f64>,
}

impl LeaseStatus {
    /// The lease at `now_ns` (`CLOCK_MONOTONIC`).
    #[must_use]
    pub fn of(lease: &Lease, now_ns: u64) -> Self {
        let secs = |ns: u64| Duration::from_nanos(ns).as_secs_f64();
        let state = lease.state(now_ns);
        Self {
            kind: state,
            state: state.name(),
            steering: state.steers(),
            remaining_seconds: match state {
                LeaseState::Armed { remaining_ns } => Some(secs(remaining_ns)),
                _ => None,
            },
            expired_seconds_ago: match state {
                LeaseState::Expired { since_ns } => Some(secs(since_ns)),
                _ => None,
            },
            renewed_seconds_ago: (lease.renewed_ns != 0)
                .then(|| secs(now_ns.saturating_sub(lease.renewed_ns))),
            duration_seconds: (lease.duration_ns != 0).then(|| secs(lease.duration_ns)),
        }
    }

    /// One line for people.
    #[must_use]
    pub fn describe(&self) -> String {
        let d = |s: Option<f64>| ago(Duration::from_secs_f64(s.unwrap_or(0.0).max(0.0)));
        let renewed = match (self.renewed_seconds_ago, self.duration_seconds) {
            (Some(_), Some(_)) => {
                format!(" (renewed {} ago, for {})", d(self.renewed_seconds_ago), d(self.duration_seconds))
            }
            (Some(_), None) => format!(" (renewed {} ago)", d(self.renewed_seconds_ago)),
            (None, _) => String::new(),
        };
        match self.kind {
            LeaseState::Armed { .. } => {
                format!("armed, {} left{renewed}: steering", d(self.remaining_seconds))
            }
            LeaseState::Expired { .. } => format!(
                "EXPIRED {} ago{renewed}: steering is OFF, Service connections go untouched to the cluster's \
                 Service implementation until an agent completes a pass",
                d(self.expired_seconds_ago)
            ),
            LeaseState::NeverArmed => {
                "not armed yet: steering is OFF until an agent completes its first pass".to_owned()
            }
            LeaseState::Disabled => format!("disabled (--datapath-lease 0){renewed}: steering never expires"),
        }
    }
}

/// The agent's `/readyz`.
#[derive(Debug, Serialize)]
pub struct AgentProbe {
    /// Address asked.
    pub address: String,
    /// Whether it answered HTTP at all.
    pub reachable: bool,
    /// Whether it answered 200 (null when unreachable).
    pub ready: Option<bool>,
    /// The answer's status line and body, or why it was not reachable.
    pub detail: String,
    /// The optional features the agent reports (`tagger_agent_feature_available`): whether
    /// each works on this node, and how or why not.
    pub features: BTreeMap<String, AgentFeature>,
}

/// One optional feature, as the agent reports it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AgentFeature {
    /// Whether it works here.
    pub available: bool,
    /// How it works, or why it does not.
    pub detail: String,
}

/// What the agent reports of a feature, for one status line.
fn feature_line(agent: &AgentProbe, feature: &str) -> String {
    match agent.features.get(feature) {
        Some(f) if f.available => f.detail.clone(),
        Some(f) => format!("UNAVAILABLE: {}", f.detail),
        None if agent.reachable => "not reported by the agent".to_owned(),
        None => "unknown: the agent is not reachable (it probes this at start)".to_owned(),
    }
}

/// The features in a metrics text: `tagger_agent_feature_available{feature="…",detail="…"} 1`.
#[must_use]
pub fn parse_features(metrics: &str) -> BTreeMap<String, AgentFeature> {
    let label = |labels: &str, key: &str| -> Option<String> {
        let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
        let len = labels[start..].find('"')?;
        Some(labels[start..start + len].to_owned())
    };
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("tagger_agent_feature_available{"))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once("} ")?;
            let feature = label(labels, "feature")?;
            let detail = label(labels, "detail").unwrap_or_default();
            Some((feature, AgentFeature { available: value.trim() == "1", detail }))
        })
        .collect()
}

/// Runs `tagger status`; the exit code is 0 when healthy.
pub fn run(
    dir: &Path,
    format: Format,
    args: &StatusArgs,
    cgroup_root: Option<&Path>,
) -> anyhow::Result<bool> {
    let report = collect(dir, &args.agent_addr, cgroup_root)?;
    match format {
        Format::Json => print_json(&report)?,
        Format::Table => print_tables(&report),
    }
    Ok(report.healthy)
}

/// Builds the report. Only a missing or unreadable pin directory is an error: everything else is
/// part of the answer.
pub fn collect(dir: &Path, agent_addr: &str, cgroup_root: Option<&Path>) -> anyhow::Result<StatusReport> {
    check_pin_dir(dir)?;
    let layout = PinLayout::new(dir);
    let mut programs: Vec<ProgramStatus> = PROGRAMS.iter().map(|&p| program_status(&layout, p)).collect();
    let mount_root = resolve_cgroup_paths(&mut programs, cgroup_root);
    let attach = mount_root.zip(programs.iter().find_map(|p| p.cgroup_path.clone())).map(|(root, cgroup)| {
        let own: Vec<u32> = programs.iter().filter_map(|p| p.program_id).collect();
        hooks::collect(Path::new(&cgroup), &root, &PROGRAMS, &own)
    });

    let mut maps: Vec<MapStatus> = ALL_MAPS
        .iter()
        .map(|&m| {
            let pin = layout.map(m);
            MapStatus {
                map: m,
                pinned: pin.exists(),
                pin: pin.display().to_string(),
                entries: None,
                capacity: None,
                fill_ratio: None,
            }
        })
        .collect();
    let mut lease = None;
    let (maps_error, config) = match open_read_only(dir) {
        Ok(dp) => {
            let fill: BTreeMap<&str, (usize, u32)> =
                dp.tables().fill().into_iter().map(|(m, n, cap)| (m, (n, cap))).collect();
            for m in &mut maps {
                if let Some(&(n, cap)) = fill.get(m.map) {
                    m.entries = Some(n as u64);
                    m.capacity = Some(cap);
                    #[expect(clippy::cast_precision_loss, reason = "a ratio for display")]
                    let ratio = n as f64 / f64::from(cap.max(1));
                    m.fill_ratio = Some(ratio);
                }
            }
            lease = dp.tables().lease().ok().map(|l| LeaseStatus::of(&l, monotonic_now_ns()));
            match dp.tables().config() {
                Ok(c) => (
                    None,
                    Some(ConfigStatus { pod_level_min: c.pod_level_min, pod_level_max: c.pod_level_max }),
                ),
                Err(e) => (Some(e.to_string()), None),
            }
        }
        Err(e) => (Some(format!("{e:#}")), None),
    };
    let agent = probe_agent(agent_addr);
    let healthy = maps_error.is_none() && programs.iter().all(|p| p.pinned) && maps.iter().all(|m| m.pinned);
    Ok(StatusReport {
        bpffs: dir.display().to_string(),
        healthy,
        programs,
        maps,
        maps_error,
        config,
        lease,
        reset_mechanism: feature_line(&agent, "connection_reset"),
        agent,
        marking: crate::datapath::tc::pinned_interfaces(&layout)
            .into_iter()
            .map(|(interface, direction)| MarkedInterface { interface, direction })
            .collect(),
        marking_mode: crate::datapath::tc::probe().to_string(),
        attach,
    })
}

fn program_status(layout: &PinLayout, program: &'static str) -> ProgramStatus {
    let pin = layout.link(program);
    let mut s = ProgramStatus {
        program,
        link_pin: pin.display().to_string(),
        pinned: false,
        pinned_since_unix: None,
        pinned_since: None,
        link_id: None,
        program_id: None,
        cgroup_id: None,
        cgroup_path: None,
        attach_type: None,
        error: None,
    };
    let Ok(meta) = std::fs::symlink_metadata(&pin) else {
        return s;
    };
    s.pinned = true;
    if let Ok(t) = meta.modified() {
        s.pinned_since_unix = Some(unix_seconds(t));
        s.pinned_since = Some(rfc3339(unix_seconds(t)));
    }
    match link_info(&pin) {
        Ok(info) => {
            s.link_id = Some(info.link_id);
            s.program_id = Some(info.program_id);
            if let Some((cgroup, attach)) = info.cgroup {
                s.cgroup_id = Some(cgroup);
                s.attach_type =
                    Some(attach_type_name(attach).map_or_else(|| attach.to_string(), str::to_owned));
            }
        }
        Err(e) => s.error = Some(format!("reading link info: {e}")),
    }
    s
}

/// Fills in the cgroup directories of the links (one walk of the cgroup tree for all of them);
/// returns the root of the tree walked.
fn resolve_cgroup_paths(programs: &mut [ProgramStatus], cgroup_root: Option<&Path>) -> Option<PathBuf> {
    let ids: BTreeSet<u64> = programs.iter().filter_map(|p| p.cgroup_id).collect();
    if ids.is_empty() {
        return None;
    }
    let root = cgroup_root.map_or_else(cgroup2_mount, |r| Ok(r.to_owned())).ok()?;
    let paths: BTreeMap<u64, PathBuf> = cgroup_paths(&root, &ids);
    for p in programs {
        if let Some(path) = p.cgroup_id.and_then(|id| paths.get(&id)) {
            p.cgroup_path = Some(path.display().to_string());
        }
    }
    Some(root)
}

/// A plain HTTP GET of `/readyz` (and of `/metrics`, for the features) with short timeouts.
#[must_use]
pub fn probe_agent(addr: &str) -> AgentProbe {
    let unreachable = |detail: String| AgentProbe {
        address: addr.to_owned(),
        reachable: false,
        ready: None,
        detail,
        features: BTreeMap::new(),
    };
    let target = match addr.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        Ok(None) => return unreachable("the address resolves to nothing".into()),
        Err(e) => return unreachable(format!("bad address: {e}")),
    };
    match http_get(target, addr, "/readyz", 64 * 1024) {
        Err(e) => unreachable(e.to_string()),
        Ok(text) => match parse_http_status(&text) {
            Some((code, detail)) => {
                let features = http_get(target, addr, "/metrics", 8 << 20)
                    .map(|t| parse_features(&t))
                    .unwrap_or_default();
                AgentProbe {
                    address: addr.to_owned(),
                    reachable: true,
                    ready: Some(code == 200),
                    detail,
                    features,
                }
            }
            None => unreachable("the answer is not HTTP".into()),
        },
    }
}

/// The whole answer (head and body) to `GET path`, at most `limit` bytes.
fn http_get(target: std::net::SocketAddr, host: &str, path: &str, limit: u64) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&target, AGENT_TIMEOUT)?;
    s.set_read_timeout(Some(AGENT_TIMEOUT))?;
    s.set_write_timeout(Some(AGENT_TIMEOUT))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    s.take(limit).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The status code of an HTTP response and a one-line summary (`200 OK: ready`).
fn parse_http_status(text: &str) -> Option<(u16, String)> {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let status_line = head.lines().next()?;
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let code: u16 = parts.next()?.parse().ok()?;
    let reason = parts.next().unwrap_or("").trim();
    let body = body.lines().next().unwrap_or("").trim();
    let detail =
        if body.is_empty() { format!("{code} {reason}") } else { format!("{code} {reason}: {body}") };
    Some((code, detail))
}

fn print_tables(r: &StatusReport) {
    let now = SystemTime::now();
    println!("datapath pinned at {}: {}", r.bpffs, if r.healthy { "healthy" } else { "INCOMPLETE" });
    println!();
    let mut t =
        table(&["program", "link pin", "attached since", "link", "prog", "cgroup", "attach type"], &[3, 4]);
    let root = Path::new(&r.bpffs);
    for p in &r.programs {
        let since = match p.pinned_since_unix {
            _ if !p.pinned => "NOT ATTACHED (no link pin)".to_owned(),
            Some(unix) => {
                let age = now
                    .duration_since(SystemTime::UNIX_EPOCH + Duration::from_secs(unix))
                    .unwrap_or_default();
                format!("{} ({} ago)", rfc3339(unix), ago(age))
            }
            None => "attached".to_owned(),
        };
        let cgroup = match (&p.cgroup_path, p.cgroup_id) {
            (Some(path), _) => path.clone(),
            (None, Some(id)) => format!("id {id}"),
            (None, None) => p.error.clone().unwrap_or_default(),
        };
        t.add_row(vec![
            p.program.to_owned(),
            // Relative to the pin directory named above; JSON has the full path.
            Path::new(&p.link_pin)
                .strip_prefix(root)
                .map_or_else(|_| p.link_pin.clone(), |rel| rel.display().to_string()),
            since,
            opt(p.link_id),
            opt(p.program_id),
            cgroup,
            p.attach_type.clone().unwrap_or_default(),
        ]);
    }
    println!("{t}");
    println!();
    let mut t = table(&["map", "entries", "capacity", "fill"], &[1, 2, 3]);
    for m in &r.maps {
        let (entries, capacity, fill) = match (m.pinned, m.entries, m.capacity, m.fill_ratio) {
            (false, ..) => ("NOT PINNED".to_owned(), String::new(), String::new()),
            (true, Some(n), Some(cap), Some(ratio)) => (n.to_string(), cap.to_string(), percent(n, ratio)),
            // Socket storage has no entries to count: each lives in its socket.
            (true, ..) if m.map == tagger_common::MAP_SOCK => {
                ("(per socket)".to_owned(), String::new(), String::new())
            }
            (true, ..) if r.maps_error.is_none() => ("(array)".to_owned(), String::new(), String::new()),
            (true, ..) => ("?".to_owned(), String::new(), String::new()),
        };
        t.add_row(vec![m.map.to_owned(), entries, capacity, fill]);
    }
    println!("{t}");
    if let Some(e) = &r.maps_error {
        println!("maps unreadable: {e}");
    }
    if let Some(c) = &r.config {
        if c.pod_level_max == 0 {
            println!("datapath config: no pod cgroup registered (every caller is base)");
        } else {
            println!(
                "datapath config: pod cgroups at levels {}..={} (the programs search this range)",
                c.pod_level_min, c.pod_level_max
            );
        }
    }
    if let Some(l) = &r.lease {
        println!("datapath lease: {}", l.describe());
    }
    let agent = match (r.agent.reachable, r.agent.ready) {
        (true, Some(true)) => format!("ready ({})", r.agent.detail),
        (true, _) => format!("reachable, NOT READY ({})", r.agent.detail),
        (false, _) => {
            format!("not reachable ({}); the datapath keeps serving with its last state", r.agent.detail)
        }
    };
    println!("agent at {}: {agent}", r.agent.address);
    println!("stale connection reset: {}", r.reset_mechanism);
    if r.marking.is_empty() {
        println!("lane marking ({}): no pinned marking link", r.marking_mode);
    } else {
        let list: Vec<String> =
            r.marking.iter().map(|m| format!("{} ({})", m.interface, m.direction)).collect();
        println!("lane marking ({}): {}", r.marking_mode, list.join(", "));
    }
    if let Some(attach) = &r.attach {
        println!();
        hooks::print(attach);
    }
}

/// A fill ratio for people; a non-empty map never reads as 0.0%.
fn percent(entries: u64, ratio: f64) -> String {
    if entries > 0 && ratio < 0.001 { "<0.1%".to_owned() } else { format!("{:.1}%", ratio * 100.0) }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_lines_are_parsed() {
        assert_eq!(
            parse_http_status("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n"),
            Some((200, "200 OK: ready".into()))
        );
        assert_eq!(
            parse_http_status("HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready: first full sync\n"),
            Some((503, "503 Service Unavailable: not ready: first full sync".into()))
        );
        assert_eq!(parse_http_status("HTTP/1.0 404 Not Found\r\n\r\n"), Some((404, "404 Not Found".into())));
        assert_eq!(parse_http_status("SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_http_status(""), None);
    }

    #[test]
    fn fill_levels_never_hide_entries() {
        assert_eq!(percent(0, 0.0), "0.0%");
        assert_eq!(percent(2, 2.0 / 16_384.0), "<0.1%");
        assert_eq!(percent(512, 0.5), "50.0%");
    }

    #[test]
    fn the_lease_reads_as_its_state() {
        const S: u64 = 1_000_000_000;
        let armed = LeaseStatus::of(&Lease::renewed(100 * S, 120 * S), 130 * S);
        assert_eq!((armed.state, armed.steering), ("armed", true));
        assert_eq!(armed.remaining_seconds, Some(90.0));
        assert_eq!(armed.renewed_seconds_ago, Some(30.0));
        assert_eq!(armed.describe(), "armed, 1m30s left (renewed 30s ago, for 2m0s): steering");

        let expired = LeaseStatus::of(&Lease::renewed(100 * S, 120 * S), 250 * S);
        assert_eq!((expired.state, expired.steering), ("expired", false));
        assert_eq!((expired.remaining_seconds, expired.expired_seconds_ago), (None, Some(30.0)));
        assert!(
            expired.describe().starts_with("EXPIRED 30s ago (renewed 2m30s ago, for 2m0s): steering is OFF")
        );

        let fresh = LeaseStatus::of(&Lease::default(), 5 * S);
        assert_eq!((fresh.state, fresh.steering, fresh.renewed_seconds_ago), ("never_armed", false, None));
        assert!(fresh.describe().contains("steering is OFF"));

        let off = LeaseStatus::of(&Lease::renewed(100 * S, 0), 200 * S);
        assert_eq!((off.state, off.steering, off.duration_seconds), ("disabled", true, None));
        assert_eq!(
            off.describe(),
            "disabled (--datapath-lease 0) (renewed 1m40s ago): steering never expires"
        );
    }

    #[test]
    fn a_bad_agent_address_is_an_answer_not_an_error() {
        let p = probe_agent("not an address");
        assert!(!p.reachable && p.ready.is_none(), "{p:?}");
    }

    #[test]
    fn features_are_read_from_the_agents_metrics() {
        let text = "# HELP tagger_agent_feature_available Optional features\n\
            tagger_agent_feature_available{feature=\"connection_reset\",detail=\"unavailable: setns: EPERM\"} 0\n\
            tagger_agent_feature_available{feature=\"lane_marking\",detail=\"tcx in /host/netns\"} 1\n\
            tagger_agent_ready 1\n";
        let f = parse_features(text);
        assert_eq!(f.len(), 2);
        assert!(!f["connection_reset"].available);
        assert_eq!(f["connection_reset"].detail, "unavailable: setns: EPERM");
        assert!(f["lane_marking"].available);
        let agent = AgentProbe {
            address: "x".into(),
            reachable: true,
            ready: Some(true),
            detail: String::new(),
            features: f,
        };
        assert_eq!(feature_line(&agent, "connection_reset"), "UNAVAILABLE: unavailable: setns: EPERM");
        assert_eq!(feature_line(&agent, "other"), "not reported by the agent");
    }
}
