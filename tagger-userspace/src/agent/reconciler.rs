//! The reconciler: computes the desired map contents from the inputs (pure, in `model` and
//! `reconcile`), diffs them against a mirror of the maps, and applies the difference. It owns
//! the maps; nothing else writes them.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, mpsc::Receiver},
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

use super::{
    AgentStatus, Inputs, Wake,
    args::AgentConfig,
    inputs::InputsHandle,
    publish::Names,
    transitions::{LaneAvailability, describe},
};
use crate::{
    Result,
    cgroup::CgroupRef,
    datapath::Datapath,
    labels::lane_of,
    lanes_config::LanesConfig,
    model::{DesiredPod, FrontendIds, desired_pods, desired_services, pod_cgroup_candidates, pod_entries},
    reconcile::{DatapathState, DatapathWriter as _, apply_plan, plan},
};

/// Re-check pods whose cgroup has not appeared yet this often.
const PENDING_RETRY: Duration = Duration::from_millis(500);
/// Resynchronise from the inputs at least this often even without events.
const RESYNC: Duration = Duration::from_secs(30);

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
}

/// Owns the datapath and its mirror.
pub struct Reconciler {
    datapath: Datapath,
    config: AgentConfig,
    status: Arc<AgentStatus>,
    current: DatapathState,
    names: Names,
    availability: LaneAvailability,
    ids: FrontendIds,
    last_warnings: BTreeMap<String, u64>,
}

impl Reconciler {
    /// Starts from what the (possibly adopted) maps hold: nothing is flushed, and frontends keep
    /// their ids.
    pub fn new(datapath: Datapath, config: AgentConfig, status: Arc<AgentStatus>) -> Result<Self> {
        let current = DatapathState::read(datapath.tables())?;
        let ids = current.frontend_ids();
        let names = Names::read(datapath.tables())?;
        info!(
            pods = current.pods.len(),
            frontends = current.frontends.len(),
            backend_sets = current.sets.len(),
            lanes = current.lanes.len(),
            "adopted datapath state"
        );
        Ok(Self {
            datapath,
            config,
            status,
            current,
            names,
            availability: LaneAvailability::default(),
            ids,
            last_warnings: BTreeMap::default(),
        })
    }

    /// One pass: desired state from `inputs` and `lanes`, difference applied.
    pub fn reconcile(&mut self, inputs: &Inputs, lanes: &LanesConfig) -> ReconcileReport {
        let keys = self.config.lane_keys.clone();
        let keys = keys.as_slice();
        let pods = desired_pods(&inputs.local_pods, keys);
        let root = self.config.cgroup_root.clone();
        let mut desired_names = Names::default();
        let (entries, pending) = pod_entries(&pods, |pod| {
            let cgroup = find_pod_cgroup(&root, pod)?;
            desired_names.pods.insert(cgroup.id, (pod.pod.namespace.clone(), pod.pod.name.clone()));
            Some(cgroup)
        });
        for pod in &pending {
            debug!(pod = %pod.pod, uid = %pod.uid, "pod cgroup not found yet; retrying");
        }
        let services = desired_services(&inputs.cluster, keys, &mut self.ids);
        let desired = DatapathState::desired(entries, &services, lanes);
        let ops = plan(&self.current, &desired, inputs.synced);
        let report = apply_plan(self.datapath.tables_mut(), &ops);
        if report.is_complete() {
            // Mirror exactly what was written: the model applies the same ops infallibly here,
            // because the maps just accepted them.
            for op in &ops {
                if let Err(e) = self.current.apply(op) {
                    warn!("mirror diverged on {op}: {e}; re-reading the maps");
                    self.reread();
                    break;
                }
            }
        } else {
            self.reread();
        }
        if inputs.synced {
            self.ids.retain(|k, _| desired.frontends.contains_key(k));
        }
        desired_names.services = services
            .origins
            .iter()
            .map(|(id, o)| (*id, (o.service.namespace.clone(), o.service.name.clone(), o.port_name.clone())))
            .collect();
        desired_names.lanes = lane_names(inputs, lanes, keys);
        self.names.sync(self.datapath.tables_mut(), &desired_names, inputs.synced);
        // One line per (Service, lane) that lost its last ready backend or got one back, only
        // for complete views (a partial view is not a transition).
        if inputs.synced {
            let transitions =
                self.availability.observe(desired.frontends.values().map(|s| s.svc_id), desired.sets.keys());
            for t in &transitions {
                let service = desired_names.services.get(&t.svc_id).map(|(ns, name, port)| {
                    if port.is_empty() { format!("{ns}/{name}") } else { format!("{ns}/{name}:{port}") }
                });
                let lane =
                    desired_names.lanes.get(&t.lane).cloned().unwrap_or_else(|| format!("{:#010x}", t.lane));
                info!(svc_id = t.svc_id, lane = %lane, available = t.available, "{}", describe(t, service.as_deref(), &lane));
            }
        }
        let mut warnings = pods.warnings.clone();
        warnings.merge(services.warnings.clone());
        let counts: BTreeMap<String, u64> =
            warnings.counts().iter().map(|(k, v)| (k.to_string(), *v)).collect();
        if counts != self.last_warnings {
            for (kind, example) in warnings.examples() {
                warn!(kind = %kind, "input: {example}");
            }
            self.last_warnings.clone_from(&counts);
        }
        self.status.set_warnings(counts);
        self.status.set_pending_pods(pending.len() as u64);
        let failed = report.failed.len() + report.skipped.len();
        self.status.count_reconcile(failed as u64);
        if inputs.synced {
            self.status.applied_full_sync();
        }
        ReconcileReport {
            applied: report.applied,
            failed,
            pending_pods: pending.len(),
            pruned: inputs.synced,
        }
    }

    fn reread(&mut self) {
        match DatapathState::read(self.datapath.tables()) {
            Ok(state) => self.current = state,
            Err(e) => warn!("cannot re-read the maps: {e}"),
        }
    }

    /// Runs passes whenever woken, until [`Wake::Stop`].
    pub fn run(&mut self, wake: &Receiver<Wake>, inputs: &InputsHandle, lanes: &Mutex<LanesConfig>) {
        let mut pending = false;
        loop {
            let timeout = if pending { PENDING_RETRY } else { RESYNC };
            match wake.recv_timeout(timeout) {
                Ok(Wake::Stop) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(Wake::Changed) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            // Coalesce a burst of events into one pass.
            while let Ok(w) = wake.try_recv() {
                if matches!(w, Wake::Stop) {
                    return;
                }
            }
            // Nothing is computed before the source's first complete view: with only part of
            // it (say, Services before the backend pods' labels), gray backends would look
            // base and base callers could reach them. Later relists are buffered by the
            // sources, so the view stays complete.
            if !self.status.is_source_synced() {
                continue;
            }
            let started = Instant::now();
            let snapshot = inputs.snapshot();
            let lanes = lanes.lock().expect("lanes lock").clone();
            let report = self.reconcile(&snapshot, &lanes);
            self.status.observe_reconcile(started.elapsed());
            pending = report.pending_pods > 0;
            if report.applied > 0 || report.failed > 0 {
                info!(
                    applied = report.applied,
                    failed = report.failed,
                    pending_pods = report.pending_pods,
                    pruned = report.pruned,
                    elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    "datapath updated"
                );
            }
        }
    }
}

/// Every lane name the inputs mention: the lanes config's, and every pod's lane label.
fn lane_names(inputs: &Inputs, lanes: &LanesConfig, keys: &[String]) -> BTreeMap<u32, String> {
    let mut names = lanes.lane_names();
    let labels = inputs.cluster.pod_labels.values().chain(inputs.local_pods.iter().map(|p| &p.labels));
    for l in labels {
        if let Some(name) = lane_of(l, keys).name() {
            names.entry(tagger_common::lane_id(name)).or_insert_with(|| name.to_owned());
        }
    }
    names
}

/// The pod's cgroup under the root, trying kubelet's layouts in turn.
fn find_pod_cgroup(root: &std::path::Path, pod: &DesiredPod) -> Option<CgroupRef> {
    pod_cgroup_candidates(root, &pod.uid, pod.qos)
        .into_iter()
        .find(|p| p.is_dir())
        .and_then(|p| CgroupRef::open(&p).ok())
}
