//! tagger's userspace: the typed API over the pinned datapath (used by the agent and the CLI),
//! cgroup discovery, and the pure parts of lane handling.

pub mod cgroup;
pub mod datapath;
pub mod error;
pub mod fs;
pub mod net;

pub use error::{Error, Result};
