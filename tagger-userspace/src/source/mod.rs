//! Input sources other than the Kubernetes API.
pub mod file;
