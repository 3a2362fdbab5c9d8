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

pub mod netns;
pub mod sockdiag;
pub mod stale;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

pub use stale::Why;
use tagger_common::{Backend, SockRecord};

use crate::{Result, datapath::Tables};

/// Most rehome resets per pass (rehome is a convenience; a lane flapping must not reset every
/// connection of a node at once).
pub const REHOME_MAX_PER_PASS: usize = 256;

/// How stale connections are reset here, as the start-up probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// netlink `SOCK_DESTROY` inside the pod's network namespace, reached as described.
    SockDestroy {
        /// How pods' namespaces are found, and where the probe ran.
        via: String,
    },
    /// Stale connections are left alone (the reason).
    Unavailable(String),
}

impl Mechanism {
    /// Probes the path a reset takes: entering a pod's network namespace (the first in the
    /// namespace directory; the agent's own when there is none yet) and asking the kernel
    /// there for `SOCK_DESTROY` of a socket that cannot exist. Needs `CAP_SYS_ADMIN` (setns)
    /// and `CAP_NET_ADMIN` (destroy); destroys nothing.
    #[must_use]
    pub fn probe(finder: &netns::Finder) -> Self {
        if let Some(dir) = finder.dir().filter(|d| !d.is_dir()) {
            return Mechanism::Unavailable(format!("--netns-dir {}: no such directory", dir.display()));
        }
        let Some(target) = finder.probe_target() else {
            return Mechanism::Unavailable("no network namespace to probe in".into());
        };
        let found = match finder.dir() {
            Some(dir) => format!("pods' processes, else the namespaces in {}", dir.display()),
            None => "pods' processes (/proc/<pid>/ns/net; no --netns-dir)".to_owned(),
        };
        match sockdiag::probe_in(&target.file) {
            Ok(()) => Mechanism::SockDestroy { via: format!("{found}; probed in {}", target.path.display()) },
            Err(e) => Mechanism::Unavailable(format!(
                "netlink SOCK_DESTROY in {}: {e}{}",
                target.path.display(),
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    " (entering a pod's network namespace needs CAP_SYS_ADMIN, destroying its sockets CAP_NET_ADMIN)"
                } else {
                    ""
                }
            )),
        }
    }

    /// Whether resets happen.
    #[must_use]
    pub fn available(&self) -> bool {
        matches!(self, Mechanism::SockDestroy { .. })
    }

    /// Short description for status output.
    #[must_use]
    pub fn name(&self) -> String {
        match self {
            Mechanism::SockDestroy { via } => {
                format!("sock_destroy (netlink SOCK_DIAG in the pod's netns; {via})")
            }
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
    finder: &mut netns::Finder,
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
    let mut pass = Pass { when_idle, ..Pass::default() };
    // Pods whose processes this agent sees: their own namespaces are searched, and what is in
    // none of them is closed. The rest are looked for where they were found before, then in
    // every namespace of the directory.
    let mut unplaced: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (pod, cookies) in by_pod {
        let own = netns::Finder::of_processes(cgroup_root, pod);
        if own.is_empty() {
            unplaced.insert(pod, cookies);
            continue;
        }
        // Normally one namespace (the pod's); a process of the pod's cgroup in another one (a
        // helper started into the cgroup only) must not hide the pod's sockets.
        let left = pass.search(&own, cookies, &format!("pod cgroup {pod}"));
        pass.closed.extend(left);
    }
    // The directory is listed (and each namespace opened) once per pass, for all of them.
    let all = if unplaced.is_empty() { Vec::new() } else { finder.all() };
    for (pod, cookies) in &mut unplaced {
        if let Some(ns) = finder.learned(*pod).and_then(|id| all.iter().find(|ns| ns.id == id)) {
            *cookies =
                pass.search(std::slice::from_ref(ns), std::mem::take(cookies), &format!("pod cgroup {pod}"));
        }
    }
    let owner: BTreeMap<u64, u64> =
        unplaced.iter().flat_map(|(pod, cookies)| cookies.iter().map(move |c| (*c, *pod))).collect();
    if !owner.is_empty() {
        if all.is_empty() {
            let why = match finder.dir() {
                Some(dir) => format!("no network namespace in {}", dir.display()),
                None => "no --netns-dir and no process of theirs visible (no host PID namespace)".to_owned(),
            };
            pass.errors
                .push(format!("{} pod(s): cannot reach their network namespace: {why}", unplaced.len()));
            pass.failed.extend(owner.keys().copied());
        } else {
            let mut left: BTreeSet<u64> = owner.keys().copied().collect();
            for ns in &all {
                if left.is_empty() {
                    break;
                }
                let before = left.clone();
                left = pass.search(std::slice::from_ref(ns), left, "pods of the namespace directory");
                for cookie in before.difference(&left) {
                    if let Some(pod) = owner.get(cookie) {
                        finder.learn(*pod, ns.id);
                    }
                }
            }
            // Searched every namespace of the node: closed meanwhile.
            pass.closed.extend(left);
        }
    }
    // Destroyed, or closed already: done with. Busy and failed ones stay tracked.
    for cookie in pass.destroyed.iter().chain(&pass.closed) {
        if !pass.failed.contains(cookie) || pass.destroyed.contains(cookie) {
            tables.forget_connection(*cookie)?;
        }
    }
    let failed = pass.failed.iter().filter(|c| !pass.destroyed.contains(c) && !pass.busy.contains(c)).count();
    Ok(ResetReport {
        reset: candidates.into_iter().filter(|(c, _, _)| pass.destroyed.contains(c)).collect(),
        busy: pass.busy.len(),
        failed,
        errors: pass.errors,
    })
}

/// What a reset pass found so far.
#[derive(Default)]
struct Pass {
    when_idle: BTreeSet<u64>,
    destroyed: BTreeSet<u64>,
    busy: BTreeSet<u64>,
    /// Looked for where they must be, not found: closed.
    closed: BTreeSet<u64>,
    /// Not searched for, or a search failed: kept and tried again.
    failed: BTreeSet<u64>,
    errors: Vec<String>,
}

impl Pass {
    /// Destroys what it finds of `cookies` in these namespaces; returns the cookies found in
    /// none of them. After a failed search, the cookies are also marked failed (kept).
    fn search(&mut self, namespaces: &[netns::Ns], mut cookies: BTreeSet<u64>, whose: &str) -> BTreeSet<u64> {
        for ns in namespaces {
            if cookies.is_empty() {
                break;
            }
            match sockdiag::destroy_in(&ns.file, &cookies, &self.when_idle) {
                Ok(out) => {
                    cookies.retain(|c| !out.done.contains(c) && !out.busy.contains(c));
                    self.destroyed.extend(out.done);
                    self.busy.extend(out.busy);
                }
                Err(e) => {
                    self.failed.extend(cookies.iter().copied());
                    self.errors.push(format!("{whose}: SOCK_DESTROY in {}: {e}", ns.path.display()));
                }
            }
        }
        cookies.retain(|c| !self.failed.contains(c));
        cookies
    }
}
