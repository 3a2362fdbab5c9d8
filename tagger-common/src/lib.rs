//! The contract between tagger's eBPF datapath and its userspace: map names and capacities,
//! the `#[repr(C)]` layouts stored in those maps, the outcome counters, the lane id hash and the
//! lane resolution that both the kernel programs and the CLI's `explain` run.
//!
//! Every map name carries a layout version suffix (`_V1`). When a layout in this file changes,
//! bump the suffix of the maps that store it, so a pin left by an older agent is never misread.
#![no_std]

pub mod affinity;
pub mod edges;
pub mod lane;
pub mod lease;
pub mod maps;
pub mod pods;
pub mod resolve;
pub mod shaping;
pub mod wire;

pub use affinity::*;
pub use edges::*;
pub use lane::{BASE_LANE, fnv1a, lane_id};
pub use lease::*;
pub use maps::*;
pub use pods::*;
pub use resolve::{LaneTables, Resolution, resolve_lane, resolve_shaped, shaping_of, svc_is_passthrough};
pub use shaping::*;
