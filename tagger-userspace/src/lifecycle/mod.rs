//! Connection lifecycle: resetting tracked connections that are stale, so that applications
//! reconnect and are steered where they should go now.
//!
//! The datapath tracks every connection it steered (`TAGGER_CONN_V1`: TCP from establishment to
//! close, connected UDP from connect to release). After the agent applies a change, connections
//! whose backend no longer serves in their (Service, lane) — deleted, or neither ready nor
//! serving — are destroyed with netlink `SOCK_DESTROY` inside the caller pod's network
//! namespace. A backend that is terminating but still serving keeps its connections (a rolling
//! update loses no request): it only gets no new ones. Connections to a live backend that
//! tagger wants elsewhere (with `rehome: true`, those that had fallen back from a lane that has
//! ready backends again) are destroyed only while idle, and retried until they are. Nothing
//! else is ever touched: untracked sockets (not steered by tagger, unconnected UDP) are never
//! looked at.

pub mod sockdiag;
pub mod stale;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::Path,
};

pub use stale::Why;
use tagger_common::{Backend, SockRecord};

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
    /// Connections to reset only when idle that were busy: still tracked, tried again on the
    /// next pass.
    pub busy: usize,
    /// Connections that could not be reset (no process of the pod found to enter its network
    /// namespace, a netlink error): still tracked, tried again on the next pass.
    pub failed: usize,
    /// Problems (a pod's namespace not found, a netlink error), one line each.
    pub errors: Vec<String>,
}

impl ResetReport {
    /// Whether some connection is left to try again.
    #[must_use]
    pub fn retry(&self) -> bool {
        self.busy > 0 || self.failed > 0
    }
}

/// The decision's view of the pinned maps, read once (the CLI's, and tests'): the sets are what
/// the datapath picks from, and nothing is known to be held.
pub struct MapSnapshot {
    sets: BTreeMap<(u32, u32), Vec<Backend>>,
    lane_flags: BTreeMap<u32, u32>,
}

impl MapSnapshot {
    /// Reads every backend set and lane policy.
    pub fn read(tables: &Tables) -> Result<Self> {
        let mut sets = BTreeMap::new();
        for key in tables.backend_sets()?.into_keys() {
            sets.insert((key.svc_id, key.lane), tables.backends(key.svc_id, key.lane)?);
        }
        let lane_flags = tables.lane_policies()?.into_iter().map(|(lane, p)| (lane, p.flags)).collect();
        Ok(Self { sets, lane_flags })
    }
}

impl stale::View for MapSnapshot {
    fn members(&mut self, svc_id: u32, lane: u32) -> Option<Vec<Backend>> {
        Some(self.sets.get(&(svc_id, lane)).cloned().unwrap_or_default())
    }

    fn lane_flags(&mut self, lane: u32) -> u32 {
        self.lane_flags.get(&lane).copied().unwrap_or(0)
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

/// Finds stale tracked connections (as `view` sees the desired state) and destroys them; forgets
/// what it reset or found closed, keeps what was busy or failed for the next pass.
pub fn reset_stale(
    tables: &mut Tables,
    cgroup_root: &Path,
    view: &mut impl stale::View,
) -> Result<ResetReport> {
    let conns = tables.connections()?;
    if conns.is_empty() {
        return Ok(ResetReport::default());
    }
    let mut candidates = stale::stale(&conns, view);
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
    let when_idle: BTreeSet<u64> =
        candidates.iter().filter(|(_, _, why)| why.only_when_idle()).map(|(c, _, _)| *c).collect();
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
        let mut busy = BTreeSet::new();
        let mut failed = namespaces.is_empty();
        for netns in &namespaces {
            if left.is_empty() {
                break;
            }
            match sockdiag::destroy_in(netns, &left, &when_idle) {
                Ok(out) => {
                    left.retain(|c| !out.done.contains(c) && !out.busy.contains(c));
                    destroyed.extend(out.done);
                    busy.extend(out.busy);
                }
                Err(e) => {
                    failed = true;
                    report.errors.push(format!("pod cgroup {pod}: SOCK_DESTROY: {e}"));
                }
            }
        }
        report.busy += busy.len();
        // Destroyed now, or found in none of the pod's namespaces (closed already): done with.
        // Busy ones, and all of a pod whose namespaces could not be searched, are kept.
        for cookie in cookies {
            if busy.contains(cookie) || (failed && !destroyed.contains(cookie)) {
                continue;
            }
            tables.forget_connection(*cookie)?;
        }
        if failed {
            report.failed += cookies.iter().filter(|c| !destroyed.contains(c) && !busy.contains(c)).count();
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
