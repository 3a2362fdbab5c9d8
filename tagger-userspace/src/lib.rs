//! tagger's userspace: the typed API over the pinned datapath (used by the agent and the CLI),
//! cgroup discovery, and the pure parts of lane handling.
//!
//! The layout and the rule that imports point down only are in `docs/ARCHITECTURE.md`. A
//! module is public only when something outside the crate uses it: the two binaries (`agent`,
//! `cli`), the integration tests and the benchmark (`datapath`, `net`, `sys`, `cgroup`,
//! `lifecycle`, `coverage`, `model`, `config`). `caps`, `error`, `fs`, `reconcile` and
//! `source` are the agent's inner parts and stay private.

pub mod agent;
mod caps;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod coverage;
pub mod datapath;
mod error;
mod fs;
#[cfg(test)]
mod layering;
pub mod lifecycle;
pub mod model;
pub mod net;
mod reconcile;
mod source;
pub mod sys;

pub use error::{Error, Result};
