//! The local pods' addresses in the datapath (`TAGGER_PADDR_V1`): what the passive side of the
//! lane option and the TC marking program look a local pod up by. Only differences are written;
//! addresses of pods that are gone are removed (the agent only reconciles with a complete view),
//! and so are their inbound counts, on full passes.

use std::collections::BTreeMap;

use tagger_common::{DSCP_UNSET, PodAddr};
use tracing::warn;

use crate::{
    Result,
    datapath::Tables,
    model::{incremental::LocalAddr, lanes::LaneSettings},
};

/// What `TAGGER_PADDR_V1` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodAddrs {
    current: BTreeMap<[u32; 4], PodAddr>,
}

/// The map entry for a local pod's address.
#[must_use]
pub fn entry(addr: &LocalAddr, lanes: &LaneSettings) -> PodAddr {
    let dscp = lanes.dscp(addr.lane).unwrap_or(DSCP_UNSET);
    PodAddr { cgroup: addr.cgroup, lane: addr.lane, dscp, _pad: [0; 3] }
}

impl PodAddrs {
    /// What the map holds now.
    pub fn read(tables: &Tables) -> Result<Self> {
        Ok(Self { current: tables.pod_addrs()? })
    }

    /// Writes the differences from `desired`; removes the other addresses. Failures are logged
    /// and retried on the next pass that syncs.
    pub fn sync(
        &mut self,
        tables: &mut Tables,
        desired: &BTreeMap<[u32; 4], LocalAddr>,
        lanes: &LaneSettings,
    ) {
        for (addr, local) in desired {
            let want = entry(local, lanes);
            if self.current.get(addr) == Some(&want) {
                continue;
            }
            match tables.set_pod_addr(*addr, want) {
                Ok(()) => {
                    self.current.insert(*addr, want);
                }
                Err(e) => warn!("registering a pod address: {e}"),
            }
        }
        let stale: Vec<[u32; 4]> =
            self.current.keys().filter(|a| !desired.contains_key(*a)).copied().collect();
        for addr in stale {
            match tables.remove_pod_addr(addr) {
                Ok(()) => {
                    self.current.remove(&addr);
                }
                Err(e) => warn!("removing a pod address: {e}"),
            }
        }
    }

    /// Removes the inbound counts of addresses that no longer belong to a local pod.
    pub fn prune_inbound(&self, tables: &mut Tables) {
        let Ok(rows) = tables.inbound() else { return };
        for row in rows.iter().filter(|r| !self.current.contains_key(&r.key.addr)) {
            if let Err(e) = tables.remove_inbound(&row.key) {
                warn!("removing inbound counts of a pod that left: {e}");
            }
        }
    }
}

/// What `TAGGER_LMARK_V1` holds: each marked lane's index under `--mark-mask`
/// ([`crate::model::lane_marks`]). Lanes are those of local pods and of the lanes config.
#[derive(Clone, Debug)]
pub struct LaneMarks {
    mask: crate::model::lane_marks::MarkMask,
    current: BTreeMap<u32, tagger_common::LaneMark>,
    unfit: std::collections::BTreeSet<u32>,
}

impl LaneMarks {
    /// Reads what the map holds (an earlier agent's indices are kept where they fit `mask`).
    pub fn read(tables: &Tables, mask: crate::model::lane_marks::MarkMask) -> Result<Self> {
        Ok(Self { mask, current: tables.lane_marks()?, unfit: std::collections::BTreeSet::new() })
    }

    /// Assigns indices to the lanes of `desired` and `lanes`, writes the differences and
    /// removes lanes no longer marked. Lanes that do not fit are logged once and recorded
    /// without an index.
    pub fn sync(
        &mut self,
        tables: &mut Tables,
        desired: &BTreeMap<[u32; 4], LocalAddr>,
        lanes: &LaneSettings,
    ) {
        let mut wanted: std::collections::BTreeSet<u32> = desired.values().map(|a| a.lane).collect();
        wanted.extend(lanes.policies.keys().copied());
        let assignment = crate::model::lane_marks::assign(&self.current, &wanted, self.mask);
        for lane in assignment.unfit.difference(&self.unfit) {
            warn!(
                lane = %lane,
                mask = format!("{:#x}", self.mask.bits()),
                fits = self.mask.max_index(),
                "lane marking: this lane does not fit --mark-mask (all indices taken); its packets are not marked"
            );
        }
        self.unfit.clone_from(&assignment.unfit);
        let entries = assignment.entries(self.mask);
        for (&lane, &want) in &entries {
            if self.current.get(&lane) == Some(&want) {
                continue;
            }
            match tables.set_lane_mark(lane, want) {
                Ok(()) => {
                    self.current.insert(lane, want);
                }
                Err(e) => warn!("writing a lane's mark bits: {e}"),
            }
        }
        let stale: Vec<u32> = self.current.keys().filter(|l| !entries.contains_key(l)).copied().collect();
        for lane in stale {
            match tables.remove_lane_mark(lane) {
                Ok(()) => {
                    self.current.remove(&lane);
                }
                Err(e) => warn!("removing a lane's mark bits: {e}"),
            }
        }
    }
}
