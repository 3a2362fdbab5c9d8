//! The reconciler: keeps the desired map contents up to date from the sources' changes
//! ([`Incremental`]: only what a change affects is recomputed), plans the writes for the
//! entries that may differ ([`Mirror::plan`] over the update's scope) against a mirror of the
//! maps, and applies them. It owns the maps; nothing else writes them.
//!
//! The first pass after the sources' first complete view, a pass after a failed write, and a
//! periodic check plan every entry, so whatever the maps hold that nothing asks for (left from
//! before a restart, or by a failure) is found and corrected.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, mpsc::Receiver},
    time::{Duration, Instant},
};

use tagger_common::SetKey;
use tracing::{debug, error, info, warn};

use super::{
    AgentStatus,
    addrs::{LaneMarks, PodAddrs},
    args::AgentConfig,
    lease::LeaseKeeper,
    publish::Names,
    transitions::{LaneAvailability, Transition, describe},
};
use crate::{
    Result,
    cgroup::CgroupRef,
    datapath::Datapath,
    model::{
        Change, DesiredPod, Limits,
        incremental::{Incremental, Recheck, Update},
        lanes::LaneSettings,
        pod_cgroup_candidates,
        state::{DatapathState, Scope},
    },
    reconcile::{
        Mirror, Op, apply_plan,
        table::{TableOp, Write},
    },
    source::{InputsHandle, Wake},
};

/// Re-check pods whose cgroup has not appeared yet this often.
const PENDING_RETRY: Duration = Duration::from_millis(500);
/// Check every entry (and every pod's cgroup) at least this often even without events.
const RESYNC: Duration = Duration::from_secs(30);
/// Try again this often to reset connections that were busy (or whose pod could not be
/// entered) at the last reset pass.
const RESET_RETRY: Duration = Duration::from_secs(1);

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Writes applied.
    pub applied: usize,
    /// Writes that failed (retried next pass).
    pub failed: usize,
    /// Local pods whose cgroup was not found yet.
    pub pending_pods: usize,
    /// Whether removals were allowed (the inputs were complete).
    pub pruned: bool,
    /// Whether every entry was planned (not only those the changes touched).
    pub full: bool,
}

/// Owns the datapath, its mirror and the desired state.
pub struct Reconciler {
    datapath: Datapath,
    config: AgentConfig,
    status: Arc<AgentStatus>,
    current: Mirror,
    names: Names,
    addrs: PodAddrs,
    /// Lanes' mark bits, when lane marking is on.
    marks: Option<LaneMarks>,
    model: Incremental,
    availability: LaneAvailability,
    last_warnings: BTreeMap<String, u64>,
    /// The next pass plans every entry (a write failed).
    full_next: bool,
    /// How stale connections are reset, if they can be (the start-up probe's finding).
    resets: crate::lifecycle::Mechanism,
    /// Where pods' network namespaces are found.
    netns: crate::lifecycle::netns::Finder,
    /// Whether slots of no live generation were looked for since start.
    strays_checked: bool,
    /// The last reset pass left connections to try again (busy, or not reachable yet).
    retry_resets: bool,
    /// The datapath lease, armed by the first complete pass.
    lease: LeaseKeeper,
}

impl Reconciler {
    /// Starts from what the (possibly adopted) maps hold: nothing is flushed, and frontends keep
    /// their ids.
    pub fn new(datapath: Datapath, config: AgentConfig, status: Arc<AgentStatus>) -> Result<Self> {
        let current = DatapathState::read(datapath.tables())?;
        let ids = current.frontend_ids();
        let names = Names::read(datapath.tables())?;
        let addrs = PodAddrs::read(datapath.tables())?;
        let marks = config.mark_mask.map(|m| LaneMarks::read(datapath.tables(), m)).transpose()?;
        let lease = LeaseKeeper::new(config.datapath_lease);
        let netns = crate::lifecycle::netns::Finder::new(config.netns_dir.clone());
        let resets = probe_resets(&netns, &status);
        info!(
            pods = current.pods.len(),
            frontends = current.frontends.len(),
            backend_sets = current.sets.len(),
            lanes = current.lanes.len(),
            "adopted datapath state"
        );
        let mut model = Incremental::new(ids, config.lane_keys.clone(), Limits::DATAPATH);
        model.set_node_name(&config.node_name);
        model.adopt_warm(current.warm.clone());
        Ok(Self {
            datapath,
            config,
            status,
            current: Mirror::new(current),
            names,
            addrs,
            marks,
            model,
            availability: LaneAvailability::default(),
            last_warnings: BTreeMap::default(),
            full_next: false,
            resets,
            netns,
            strays_checked: false,
            retry_resets: false,
            lease,
        })
    }

    /// One pass: takes `changes`, updates the desired state, applies the difference. `None`
    /// (nothing computed, nothing written) until the sources have delivered a complete view:
    /// with only part of it (say, Services before the backend pods' labels), gray backends
    /// would look base and base callers could reach them. Later relists are swapped in whole,
    /// so the view stays complete.
    pub fn reconcile(
        &mut self,
        changes: Vec<Change>,
        lanes: &LaneSettings,
        recheck: Recheck,
    ) -> Option<ReconcileReport> {
        self.model.apply(changes);
        if !self.model.is_complete() {
            return None;
        }
        let root = &self.config.cgroup_root;
        let update = self.model.update(lanes, recheck, |pod| {
            let found = find_pod_cgroup(root, pod);
            if found.is_none() {
                debug!(pod = %pod.pod, uid = %pod.uid, "pod cgroup not found yet; retrying");
            }
            found
        });
        let full = update.full || self.full_next || recheck == Recheck::All;
        let desired = self.model.desired();
        let ops = if full {
            self.current.plan(desired, &Scope::all(self.current.state(), desired), true)
        } else {
            self.current.plan(desired, &update.scope, true)
        };
        let report = apply_plan(self.datapath.tables_mut(), &ops);
        self.datapath.tables_mut().reap_retired(false);
        if recheck == Recheck::All && !self.strays_checked {
            // Once, on the first periodic check (not at start: it walks the whole slots map):
            // slots a previous agent left in their grace period when it stopped.
            self.strays_checked = true;
            match self.datapath.tables_mut().remove_stray_slots() {
                Ok(0) => {}
                Ok(n) => info!(slots = n, "removed backend slots of no live generation"),
                Err(e) => warn!("removing stray backend slots: {e}"),
            }
        }
        if self.resets.available() && (self.retry_resets || ops.iter().any(changes_steering)) {
            self.reset_stale();
        }
        self.full_next = false;
        // Every complete pass vouches for the maps; the first one arms the lease. Before an
        // upgrade's switch, so this build's programs start with a live lease.
        let lease_failed = usize::from(self.renew_lease().is_err());
        if full && report.is_complete() && self.datapath.upgrade_pending() {
            // This build's maps now hold the desired state: its programs take over the links.
            match self.datapath.finish_upgrade() {
                Ok(programs) => info!(?programs, "upgrade finished: links switched to this build's programs"),
                Err(e) => {
                    warn!("finishing the upgrade: {e}; the previous build's programs keep serving");
                    // They may read maps of a layout this agent does not write: vouching for
                    // them would keep a stale datapath steering.
                    self.lease.stop("the upgrade could not switch the links to this build's programs");
                }
            }
        }
        if report.is_complete() {
            // Mirror exactly what was written: the model applies the same ops infallibly here,
            // because the maps just accepted them.
            for op in ops {
                if let Err(e) = self.current.apply_owned(op) {
                    warn!("mirror diverged: {e}; re-reading the maps");
                    self.reread();
                    break;
                }
            }
        } else {
            self.reread();
        }
        if update.full {
            // The first complete pass licenses releasing the ids reserved at start.
            self.model.retain_ids();
        }
        self.publish_names(&update, lanes, full);
        if full || update.pods_changed || update.lanes_changed {
            self.addrs.sync(self.datapath.tables_mut(), self.model.pod_addrs(), lanes);
            if let Some(marks) = &mut self.marks {
                marks.sync(self.datapath.tables_mut(), self.model.pod_addrs(), lanes);
            }
        }
        if full {
            self.addrs.prune_inbound(self.datapath.tables_mut());
        }
        self.log_transitions(&update, full);
        self.report_warnings();
        let pending = self.model.pending_pods();
        self.status.set_pending_pods(pending as u64);
        let failed = report.failed.len() + report.skipped.len() + lease_failed;
        self.status.count_reconcile(failed as u64);
        self.status.applied_full_sync();
        Some(ReconcileReport { applied: report.applied, failed, pending_pods: pending, pruned: true, full })
    }

    /// Arms or renews the datapath lease; a failed write is logged (and counted by the pass).
    fn renew_lease(&mut self) -> Result<()> {
        let renewed = self.lease.renew(self.datapath.tables_mut());
        if let Err(e) = &renewed {
            warn!("renewing the datapath lease: {e}; retried in a moment");
        }
        renewed
    }

    /// Resets tracked connections made stale by what was just applied, judged against the
    /// desired state (which also knows the backends that still serve without being in a set).
    fn reset_stale(&mut self) {
        let mut view = DesiredView(&self.model);
        match crate::lifecycle::reset_stale(
            self.datapath.tables_mut(),
            &self.config.cgroup_root,
            &mut self.netns,
            &mut view,
        ) {
            Ok(report) => {
                self.retry_resets = report.retry();
                for (cookie, rec, why) in &report.reset {
                    info!(
                        cookie,
                        svc_id = rec.svc_id,
                        caller_lane = rec.caller_lane,
                        backend_lane = rec.backend_lane,
                        ?why,
                        "reset stale connection"
                    );
                }
                self.status.count_resets(report.reset.len() as u64);
                self.status.count_reset_failures(report.failed as u64);
                for e in report.errors {
                    error!(failed = report.failed, "resetting stale connections (tried again in 1 s): {e}");
                }
            }
            Err(e) => {
                self.retry_resets = true;
                error!("resetting stale connections (tried again in 1 s): {e}");
            }
        }
    }

    /// Publishes the names of what changed (of everything on a full pass).
    fn publish_names(&mut self, update: &Update, lanes: &LaneSettings, full: bool) {
        let tables = self.datapath.tables_mut();
        if full {
            self.names.sync_services(tables, self.model.origins(), true);
        } else {
            for &id in &update.origins {
                self.names.sync_service(tables, id, self.model.origins().get(&id), true);
            }
        }
        if full || update.pods_changed {
            self.names.sync_pods(tables, self.model.pod_names(), true);
        }
        if full || update.lanes_changed {
            for (id, name) in &lanes.names {
                self.names.sync_lane(tables, *id, name, true);
            }
        }
        for (id, name) in &update.lane_names {
            self.names.sync_lane(tables, *id, name, false);
        }
    }

    /// One line per (Service, lane) that lost its last ready backend or got one back. A full
    /// pass compares every frontend; others only those the update touched.
    fn log_transitions(&mut self, update: &Update, full: bool) {
        let desired = self.model.desired();
        let origins = self.model.origins();
        let transitions: Vec<Transition> = if full {
            self.availability.observe(origins.keys().copied(), desired.sets.keys())
        } else {
            let mut touched: BTreeSet<u32> = update.scope.sets.iter().map(|k| k.svc_id).collect();
            touched.extend(update.origins.iter().copied());
            touched.extend(
                update.scope.frontends.iter().filter_map(|k| desired.frontends.get(k)).map(|s| s.svc_id),
            );
            self.availability.observe_some(touched.into_iter().map(|svc_id| {
                let lanes = origins.contains_key(&svc_id).then(|| {
                    desired
                        .sets
                        .range(SetKey { svc_id, lane: 0 }..=SetKey { svc_id, lane: u32::MAX })
                        .map(|(k, _)| k.lane)
                        .collect()
                });
                (svc_id, lanes)
            }))
        };
        for t in &transitions {
            let service = self.names.services.get(&t.svc_id).map(|(ns, name, port)| {
                if port.is_empty() { format!("{ns}/{name}") } else { format!("{ns}/{name}:{port}") }
            });
            let lane = self.names.lanes.get(&t.lane).cloned().unwrap_or_else(|| format!("{:#010x}", t.lane));
            info!(svc_id = t.svc_id, lane = %lane, available = t.available, "{}", describe(t, service.as_deref(), &lane));
        }
    }

    /// Publishes the warning counts; logs examples when they change.
    fn report_warnings(&mut self) {
        let recent = self.model.take_recent_warnings();
        let counts: BTreeMap<String, u64> =
            self.model.warning_counts().iter().map(|(k, v)| (k.to_string(), *v)).collect();
        if counts != self.last_warnings {
            for (kind, example) in recent.examples() {
                warn!(kind = %kind, "input: {example}");
            }
            self.status.set_warnings(counts.clone());
            self.last_warnings = counts;
        }
    }

    /// Re-reads the maps into the mirror; the next pass plans every entry against them.
    fn reread(&mut self) {
        self.full_next = true;
        match DatapathState::read(self.datapath.tables()) {
            Ok(state) => self.current = Mirror::new(state),
            Err(e) => warn!("cannot re-read the maps: {e}"),
        }
    }

    /// Runs passes whenever woken, until [`Wake::Stop`].
    pub fn run(&mut self, wake: &Receiver<Wake>, inputs: &InputsHandle, lanes: &Mutex<LaneSettings>) {
        let mut last_check = Instant::now();
        loop {
            // The heartbeat `/healthz` judges (agent/status.rs, `judge_health`).
            self.status.reconciler_beat();
            let until_check = RESYNC.saturating_sub(last_check.elapsed());
            let mut timeout =
                if self.model.pending_pods() > 0 { PENDING_RETRY.min(until_check) } else { until_check };
            if self.retry_resets {
                timeout = timeout.min(RESET_RETRY);
            }
            // Wake when a warm-up ends, to drop its entry (a few ms late is fine: the kernel
            // already gives full weight).
            if let Some(warm) = self.model.next_warm_expiry() {
                timeout = timeout.min(warm + Duration::from_millis(10));
            }
            // The lease is renewed between passes too, without a pass of its own.
            let lease_only = self.lease.until_due().filter(|due| *due < timeout);
            let timed_out = match wake.recv_timeout(lease_only.unwrap_or(timeout)) {
                Ok(Wake::Stop) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(Wake::Changed) => false,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => true,
            };
            if timed_out && lease_only.is_some() {
                // Nothing else was due; a change signalled meanwhile stays queued for the next
                // receive.
                let _ = self.renew_lease();
                continue;
            }
            // Coalesce a burst of events into one pass.
            while let Ok(w) = wake.try_recv() {
                if matches!(w, Wake::Stop) {
                    return;
                }
            }
            let recheck = if last_check.elapsed() >= RESYNC {
                last_check = Instant::now();
                Recheck::All
            } else if timed_out {
                Recheck::Pending
            } else {
                Recheck::None
            };
            let started = Instant::now();
            let (changes, queued) = inputs.take();
            let lanes = lanes.lock().expect("lanes lock").clone();
            let Some(report) = self.reconcile(changes, &lanes, recheck) else { continue };
            let elapsed = started.elapsed();
            self.status.observe_reconcile(elapsed);
            if report.applied > 0 || report.failed > 0 {
                info!(
                    applied = report.applied,
                    failed = report.failed,
                    pending_pods = report.pending_pods,
                    pruned = report.pruned,
                    full = report.full,
                    queued_us = u64::try_from(queued.as_micros()).unwrap_or(u64::MAX),
                    elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                    "datapath updated"
                );
            }
        }
    }
}

/// Caps glibc's malloc arenas at two. glibc gives threads arenas of their own (up to eight per
/// core), each keeping what its threads freed: the list pages parsed on the I/O threads and the
/// datapath load's transient memory would stay resident beside the reconciler's model, about
/// 20 MiB at 100,000 endpoints. Call it before the agent's threads start. (musl, the container
/// image's libc, has no per-thread arenas.)
/// The connection lifecycle's view of the desired state.
struct DesiredView<'a>(&'a Incremental);

impl crate::lifecycle::stale::View for DesiredView<'_> {
    fn members(&mut self, svc_id: u32, lane: u32) -> Option<Vec<tagger_common::Backend>> {
        Some(self.0.desired().sets.get(&SetKey { svc_id, lane }).cloned().unwrap_or_default())
    }

    fn held(&mut self, svc_id: u32, lane: u32) -> Vec<tagger_common::Backend> {
        self.0.held().get(&SetKey { svc_id, lane }).cloned().unwrap_or_default()
    }

    fn lane_flags(&mut self, lane: u32) -> u32 {
        self.0.desired().lanes.get(&lane).map_or(0, |p| p.flags)
    }
}

/// Whether an applied op can make tracked connections stale (a set changed or went, a lane
/// policy changed: rehome).
fn changes_steering(op: &Op) -> bool {
    matches!(
        op,
        Op::ReplaceSet { .. }
            | Op::RemoveSet { .. }
            | Op::Table(TableOp::Lanes(Write::Put(..)))
            | Op::RemoveFrontend { .. }
    )
}

/// Probes the reset path once at start, logs and records the finding: an unavailable
/// mechanism is an error in the log, `tagger_agent_feature_available{feature="connection_reset"}`
/// 0 and its reason in `tagger status`.
fn probe_resets(
    netns: &crate::lifecycle::netns::Finder,
    status: &AgentStatus,
) -> crate::lifecycle::Mechanism {
    let mechanism = crate::lifecycle::Mechanism::probe(netns);
    if mechanism.available() {
        info!(mechanism = %mechanism.name(), "stale connections will be reset");
    } else {
        error!(
            mechanism = %mechanism.name(),
            "stale connections cannot be reset: connections to removed backends stay open until the application closes them"
        );
    }
    status.set_feature("connection_reset", mechanism.available(), &mechanism.name());
    mechanism
}

/// The pod's cgroup under the root, trying kubelet's layouts in turn.
fn find_pod_cgroup(root: &std::path::Path, pod: &DesiredPod) -> Option<CgroupRef> {
    pod_cgroup_candidates(root, &pod.uid, pod.qos)
        .into_iter()
        .find(|p| p.is_dir())
        .and_then(|p| CgroupRef::open(&p).ok())
}
