//! Names for operators: the agent publishes pod, Service and lane names into the metadata maps,
//! so the CLI can show `demo/gw-gray` instead of a cgroup id while the agent is down. Only the
//! differences are written (for Services, only those of the frontends a pass changed);
//! removals wait for a complete view like every other removal.

use std::collections::BTreeMap;

use tracing::warn;

use crate::{Result, datapath::Tables, model::FrontendOrigin};

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

    /// Publishes the names of one frontend (`None`: it is gone; removed only with `prune`).
    /// Failures are logged and left for a later pass (names never affect steering).
    pub fn sync_service(
        &mut self,
        tables: &mut Tables,
        svc_id: u32,
        desired: Option<&FrontendOrigin>,
        prune: bool,
    ) {
        match desired {
            Some(o) => {
                let same = self.services.get(&svc_id).is_some_and(|(ns, name, port)| {
                    *ns == o.service.namespace && *name == o.service.name && *port == o.port_name
                });
                if same {
                    return;
                }
                match tables.set_service_meta(svc_id, &o.service.namespace, &o.service.name, &o.port_name) {
                    Ok(()) => {
                        self.services.insert(
                            svc_id,
                            (o.service.namespace.clone(), o.service.name.clone(), o.port_name.clone()),
                        );
                    }
                    Err(e) => warn!("publishing Service names: {e}"),
                }
            }
            None if prune
                && self.services.contains_key(&svc_id)
                && tables.remove_service_meta(svc_id).is_ok() =>
            {
                self.services.remove(&svc_id);
            }
            None => {}
        }
    }

    /// Publishes the names of every frontend: writes the differences from `desired`, and
    /// removes the others with `prune`.
    pub fn sync_services(
        &mut self,
        tables: &mut Tables,
        desired: &BTreeMap<u32, FrontendOrigin>,
        prune: bool,
    ) {
        for (id, origin) in desired {
            self.sync_service(tables, *id, Some(origin), prune);
        }
        let stale: Vec<u32> = self.services.keys().filter(|k| !desired.contains_key(k)).copied().collect();
        for id in stale {
            self.sync_service(tables, id, None, prune);
        }
    }

    /// Publishes the names of the registered pods: writes the differences from `desired`, and
    /// removes the others with `prune`.
    pub fn sync_pods(&mut self, tables: &mut Tables, desired: &BTreeMap<u64, (String, String)>, prune: bool) {
        for (id, (ns, name)) in desired {
            if self.pods.get(id).is_some_and(|(n, m)| n == ns && m == name) {
                continue;
            }
            match tables.set_pod_meta(*id, ns, name) {
                Ok(()) => {
                    self.pods.insert(*id, (ns.clone(), name.clone()));
                }
                Err(e) => warn!("publishing pod names: {e}"),
            }
        }
        if !prune {
            return;
        }
        let stale: Vec<u64> = self.pods.keys().filter(|k| !desired.contains_key(k)).copied().collect();
        for id in stale {
            if tables.remove_pod_meta(id).is_ok() {
                self.pods.remove(&id);
            }
        }
    }

    /// Publishes a lane's name: always for the lanes config's names (`overwrite`), only when the
    /// id has no name yet for names seen on pods. Lane names are never removed: a lane id always
    /// means the same name, and stats rows of a lane that is gone still need it.
    pub fn sync_lane(&mut self, tables: &mut Tables, lane: u32, name: &str, overwrite: bool) {
        let published = self.lanes.get(&lane);
        if published.is_some_and(|p| p == name) || (published.is_some() && !overwrite) {
            return;
        }
        match tables.set_lane_name(lane, name) {
            Ok(()) => {
                self.lanes.insert(lane, name.to_owned());
            }
            Err(e) => warn!("publishing lane names: {e}"),
        }
    }
}
