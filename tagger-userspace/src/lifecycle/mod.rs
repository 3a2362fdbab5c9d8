//! Connection lifecycle: resetting tracked connections that are stale, so that applications
//! reconnect and are steered where they should go now.
//!
//! The datapath tracks every connection it steered (`TAGGER_CONN_V1`: TCP from establishment to
//! close, connected UDP from connect to release). After the agent applies a change, connections
//! whose backend left its (Service, lane) set, and (with `rehome: true`) connections that had
//! fallen back from a lane that has ready backends again, are destroyed with netlink
//! `SOCK_DESTROY` inside the caller pod's network namespace. Nothing else is ever touched:
//! untracked sockets (not steered by tagger, unconnected UDP) are never looked at.

pub mod sockdiag;
pub mod stale;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::Path,
};

pub use stale::Why;
use tagger_common::{Backend, LaneTables as _, SockRecord};

use crate::{Result, datapath::Tables};

/// Most rehome resets per pass (rehome is a convenience; a lane flapping must not reset every
/// connection of a node at once).
pub const REHOME_MAX_PER_PASS: usize = 256;

/// How stale connections are reset on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// netlink `SOCK_DESTROY` inside the pod's network namespace.
    SockDestroy,
    /// No mechanism works; stale connections are left alone (the reason).
    Unavailable(String),
}

impl Mechanism {
    /// Probes the kernel (needs `CAP_NET_ADMIN`).
    #[must_use]
    pub fn probe() -> Self {
        match sockdiag::probe() {
            Ok(()) => Mechanism::SockDestroy,
            Err(e) => Mechanism::Unavailable(format!("netlink SOCK_DESTROY: {e}")),
        }
    }

    /// Short name for status output.
    #[must_use]
    pub fn name(&self) -> String {
        match self {
            Mechanism::SockDestroy => "sock_destroy (netlink SOCK_DIAG in the pod's netns)".to_owned(),
            Mechanism::Unavailable(why) => format!("unavailable: {why}"),
        }
    }
}

/// What one reset pass did.
#[derive(Clone, Debug, Default)]
pub struct ResetReport {
    /// Connections destroyed, with why.
    pub reset: Vec<(u64, SockRecord, Why)>,
    /// Problems (a pod's namespace not found, a netlink error), one line each.
    pub errors: Vec<String>,
}

struct MapView<'a>(&'a Tables);

impl stale::View for MapView<'_> {
    fn members(&mut self, svc_id: u32, lane: u32) -> Option<Vec<Backend>> {
        self.0.backends(svc_id, lane).ok()
    }

    fn lane_flags(&mut self, lane: u32) -> u32 {
        self.0.lane_policy(lane).map_or(0, |p| p.flags)
    }
}

/// Active-connection gauges from the tracked connections: per (Service, caller lane, backend
/// lane) and per backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Connections per (`svc_id`, caller lane, backend lane).
    pub per_service_lane: BTreeMap<(u32, u32, u32), u64>,
    /// Connections per backend.
    pub per_backend: BTreeMap<Backend, u64>,
}

impl Gauges {
    /// Counts the tracked connections.
    #[must_use]
    pub fn of(conns: &[(u64, SockRecord)]) -> Self {
        let mut g = Self::default();
        for (_, r) in conns {
            *g.per_service_lane.entry((r.svc_id, r.caller_lane, r.backend_lane)).or_default() += 1;
            *g.per_backend.entry(r.backend).or_default() += 1;
        }
        g
    }
}

/// Finds stale tracked connections and destroys them; forgets what it reset.
pub fn reset_stale(tables: &mut Tables, cgroup_root: &Path) -> Result<ResetReport> {
    let conns = tables.connections()?;
    if conns.is_empty() {
        return Ok(ResetReport::default());
    }
    let mut candidates = stale::stale(&conns, &mut MapView(tables));
    let mut rehomes = 0;
    candidates.retain(|(_, _, why)| {
        if *why == Why::Rehome {
            rehomes += 1;
            rehomes <= REHOME_MAX_PER_PASS
        } else {
            true
        }
    });
    let mut by_pod: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (cookie, rec, _) in &candidates {
        by_pod.entry(rec.pod_cgroup).or_default().insert(*cookie);
    }
    let mut report = ResetReport::default();
    let mut destroyed = BTreeSet::new();
    for (pod, cookies) in &by_pod {
        let namespaces = pod_netns(cgroup_root, *pod);
        if namespaces.is_empty() {
            report.errors.push(format!("pod cgroup {pod}: no process found to enter its network namespace"));
        }
        // Normally one namespace (the pod's); a process of the pod's cgroup in another one (a
        // helper started into the cgroup only) must not hide the pod's sockets.
        let mut left = cookies.clone();
        for netns in &namespaces {
            if left.is_empty() {
                break;
            }
            match sockdiag::destroy_in(netns, &left) {
                Ok(done) => {
                    left.retain(|c| !done.contains(c));
                    destroyed.extend(done);
                }
                Err(e) => report.errors.push(format!("pod cgroup {pod}: SOCK_DESTROY: {e}")),
            }
        }
        // Whether destroyed now or gone already, these entries are done with.
        for cookie in cookies {
            tables.forget_connection(*cookie)?;
        }
    }
    report.reset = candidates.into_iter().filter(|(c, _, _)| destroyed.contains(c)).collect();
    Ok(report)
}

/// The network namespaces of the processes in a pod's cgroup subtree (found below the
/// datapath's cgroup root by the cgroup id, the directory's inode number), each once, in the
/// order their first process was found; at most [`MAX_NETNS_PIDS`] processes are looked at.
fn pod_netns(cgroup_root: &Path, cgroup_id: u64) -> Vec<File> {
    use std::os::unix::fs::MetadataExt as _;
    let Some(dir) = crate::cgroup::cgroup_paths(cgroup_root, &[cgroup_id].into()).remove(&cgroup_id) else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    collect_pids(&dir, 0, &mut pids);
    let mut seen = BTreeSet::new();
    pids.into_iter()
        .filter_map(|pid| File::open(format!("/proc/{pid}/ns/net")).ok())
        .filter(|f| f.metadata().is_ok_and(|m| seen.insert((m.dev(), m.ino()))))
        .collect()
}

/// Processes looked at to find a pod's network namespaces.
const MAX_NETNS_PIDS: usize = 64;

fn collect_pids(dir: &Path, depth: u32, out: &mut Vec<u32>) {
    if out.len() >= MAX_NETNS_PIDS || depth > tagger_common::MAX_CGROUP_LEVEL {
        return;
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(
            procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()).take(MAX_NETNS_PIDS - out.len()),
        );
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(std::result::Result::ok) {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&e.path(), depth + 1, out);
        }
    }
}
