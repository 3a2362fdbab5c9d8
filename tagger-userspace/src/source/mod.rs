//! Where the agent's view of the cluster comes from. Each source decodes objects into the
//! model's compact form ([`crate::model::Change`]) on its own task and queues them
//! ([`queue`]); the reconciler takes the whole queue at each pass.
//!
//! - [`file`]: a YAML file of Kubernetes objects, re-read when it changes;
//! - [`kube`]: kube-rs watchers on the API server, decoding lean wire forms of the objects;
//! - [`poll`]: change detection of a file (the source file, the lanes config);
//! - [`tasks`]: the named tasks whose end the agent's health reports.
//!
//! Sources report what happened to them (synced, errors, restarts) through [`Report`], which
//! the agent's status implements: nothing here imports the agent.

pub mod file;
pub mod kube;
pub mod poll;
pub mod queue;
pub mod tasks;
#[cfg(test)]
mod testing;

pub use queue::{Inputs, InputsHandle, Wake};

/// What sources report besides their changes (the agent's status counts and exports it).
pub trait Report: Send + Sync {
    /// A source delivered a complete view.
    fn source_synced(&self);
    /// The source file was rejected or unreadable.
    fn count_source_error(&self);
    /// The lanes config was rejected or unreadable.
    fn count_config_error(&self);
    /// A Kubernetes watch failed and was restarted.
    fn count_watch_restart(&self);
    /// Objects of a kind the file source does not use.
    fn count_ignored_kind(&self, kind: &str, n: u64);
    /// Whether the API server answers; returns the previous value.
    fn set_api_reachable(&self, reachable: bool) -> bool;
}
