//! The local pods by address (`TAGGER_PADDR_V1`), the inbound connection counts
//! (`TAGGER_INB_V2`) the passive side of `conn_track` keeps by them, the outbound call edges of
//! those pods (`TAGGER_EDGE_V1`), and the lanes' mark bits (`TAGGER_LMARK_V1`) the TC marking
//! program writes on their packets.

use std::collections::BTreeMap;

use tagger_common::{EdgeKey, InboundKey, LaneMark, MAP_INBOUND, MAP_LANE_MARKS, MAP_POD_ADDRS, PodAddr};

use super::tables::{Tables, ignore_not_found, map_err};
use crate::Result;

/// One row of inbound counts, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundRow {
    /// Pod address, caller lane, pod lane, kind.
    pub key: InboundKey,
    /// Connections accepted.
    pub count: u64,
}

/// One call edge, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeRow {
    /// Calling pod, Service, caller lane, backend lane, outcome.
    pub key: EdgeKey,
    /// New connections.
    pub count: u64,
}

impl Tables {
    /// Registers (or updates) a local pod's address.
    pub fn set_pod_addr(&mut self, addr: [u32; 4], entry: PodAddr) -> Result<()> {
        self.pod_addrs.insert(addr, entry, 0).map_err(map_err(MAP_POD_ADDRS, "insert", addr))
    }

    /// Forgets a local pod's address.
    pub fn remove_pod_addr(&mut self, addr: [u32; 4]) -> Result<()> {
        ignore_not_found(self.pod_addrs.remove(&addr)).map_err(map_err(MAP_POD_ADDRS, "remove", addr))
    }

    /// The registered local pod addresses.
    pub fn pod_addrs(&self) -> Result<BTreeMap<[u32; 4], PodAddr>> {
        self.pod_addrs.iter().map(|r| r.map_err(map_err(MAP_POD_ADDRS, "iterate", ()))).collect()
    }

    /// The inbound counts. A row removed while iterating ends the walk early at worst.
    pub fn inbound(&self) -> Result<Vec<InboundRow>> {
        Ok(self
            .inbound
            .iter()
            .filter_map(std::result::Result::ok)
            .map(|(key, values)| InboundRow { key, count: values.iter().sum() })
            .collect())
    }

    /// The call edges of the local pods. A row evicted while iterating ends the walk early at
    /// worst.
    pub fn edges(&self) -> Result<Vec<EdgeRow>> {
        Ok(self
            .edges
            .iter()
            .filter_map(std::result::Result::ok)
            .map(|(key, values)| EdgeRow { key, count: values.iter().sum() })
            .collect())
    }

    /// Removes the inbound rows of an address that no longer belongs to a local pod.
    pub fn remove_inbound(&mut self, key: &InboundKey) -> Result<()> {
        ignore_not_found(self.inbound.remove(key)).map_err(map_err(MAP_INBOUND, "remove", key))
    }

    /// Sets a lane's mark bits (see [`LaneMark`]).
    pub fn set_lane_mark(&mut self, lane: u32, entry: LaneMark) -> Result<()> {
        self.lane_marks.insert(lane, entry, 0).map_err(map_err(MAP_LANE_MARKS, "insert", lane))
    }

    /// Forgets a lane's mark bits: its packets keep their marks.
    pub fn remove_lane_mark(&mut self, lane: u32) -> Result<()> {
        ignore_not_found(self.lane_marks.remove(&lane)).map_err(map_err(MAP_LANE_MARKS, "remove", lane))
    }

    /// Every lane's mark bits.
    pub fn lane_marks(&self) -> Result<BTreeMap<u32, LaneMark>> {
        self.lane_marks.iter().map(|r| r.map_err(map_err(MAP_LANE_MARKS, "iterate", ()))).collect()
    }
}
