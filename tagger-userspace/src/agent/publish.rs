//! Names for operators: the agent publishes pod, Service and lane names into the metadata maps,
//! so the CLI can show `demo/gw-gray` instead of a cgroup id while the agent is down. Only the
//! differences are written; removals wait for a complete view like every other removal.

use std::collections::BTreeMap;

use tracing::warn;

use crate::{Result, datapath::Tables};

/// What the metadata maps hold (or should).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// Pod cgroup id → (namespace, name).
    pub pods: BTreeMap<u64, (String, String)>,
    /// Frontend svc_id → (namespace, Service name, port name).
    pub services: BTreeMap<u32, (String, String, String)>,
    /// Lane id → name.
    pub lanes: BTreeMap<u32, String>,
}

impl Names {
    /// What the maps hold now.
    pub fn read(tables: &Tables) -> Result<Self> {
        Ok(Self { pods: tables.pod_meta()?, services: tables.service_meta()?, lanes: tables.lane_names()? })
    }

    /// Writes the differences from `self` to `desired` and returns what the maps then hold.
    /// Failures are logged and left for the next pass (names never affect steering).
    pub fn sync(&mut self, tables: &mut Tables, desired: &Names, prune: bool) {
        for (id, (ns, name)) in &desired.pods {
            if self.pods.get(id) != Some(&(ns.clone(), name.clone())) {
                match tables.set_pod_meta(*id, ns, name) {
                    Ok(()) => {
                        self.pods.insert(*id, (ns.clone(), name.clone()));
                    }
                    Err(e) => warn!("publishing pod names: {e}"),
                }
            }
        }
        for (id, (ns, name, port)) in &desired.services {
            let want = (ns.clone(), name.clone(), port.clone());
            if self.services.get(id) != Some(&want) {
                match tables.set_service_meta(*id, ns, name, port) {
                    Ok(()) => {
                        self.services.insert(*id, want);
                    }
                    Err(e) => warn!("publishing Service names: {e}"),
                }
            }
        }
        for (id, name) in &desired.lanes {
            if self.lanes.get(id) != Some(name) {
                match tables.set_lane_name(*id, name) {
                    Ok(()) => {
                        self.lanes.insert(*id, name.clone());
                    }
                    Err(e) => warn!("publishing lane names: {e}"),
                }
            }
        }
        if !prune {
            return;
        }
        let stale_pods: Vec<u64> =
            self.pods.keys().filter(|k| !desired.pods.contains_key(k)).copied().collect();
        for id in stale_pods {
            if tables.remove_pod_meta(id).is_ok() {
                self.pods.remove(&id);
            }
        }
        let stale_services: Vec<u32> =
            self.services.keys().filter(|k| !desired.services.contains_key(k)).copied().collect();
        for id in stale_services {
            if tables.remove_service_meta(id).is_ok() {
                self.services.remove(&id);
            }
        }
        // Lane names are kept: a lane id always means the same name, and stats rows of a lane
        // that is gone still need it.
    }
}
