//! tagger's userspace: the typed API over the pinned datapath (used by the agent and the CLI),
//! cgroup discovery, and the pure parts of lane handling.

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
