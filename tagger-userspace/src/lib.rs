//! tagger's userspace: the typed API over the pinned datapath (used by the agent and the CLI),
//! cgroup discovery, and the pure parts of lane handling.

pub mod agent;
pub mod caps;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod coverage;
pub mod datapath;
pub mod error;
pub mod fs;
pub mod lifecycle;
pub mod model;
pub mod net;
pub mod reconcile;
pub mod source;
pub mod sys;

pub use error::{Error, Result};
