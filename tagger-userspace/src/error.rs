//! The library's error type: every variant names what failed (path, map, key).

use std::{io, path::PathBuf};

/// Errors of the datapath API and cgroup discovery.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bpffs pin directory is missing, not bpffs, or not writable.
    #[error("bpffs pin directory {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    /// A cgroup path is missing or not in a cgroup v2 hierarchy.
    #[error("cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    /// An I/O error on a path.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The eBPF object could not be loaded (maps created or programs parsed).
    #[error("loading the datapath object: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    /// A program failed to load (verifier) or attach.
    #[error("program {program}: {source}")]
    Program { program: &'static str, source: Box<aya::programs::ProgramError> },
    /// A link or map could not be pinned.
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    /// A pinned map could not be opened or has an unexpected type.
    #[error("pinned map {path}: {source}")]
    OpenMap { path: PathBuf, source: Box<aya::maps::MapError> },
    /// A map operation failed.
    #[error("map {map}: {op} {key}: {source}")]
    Map { map: &'static str, op: &'static str, key: String, source: Box<aya::maps::MapError> },
    /// A write would exceed a map's capacity; nothing was changed.
    #[error("map {map} is full: {wanted} entries wanted, capacity {capacity}")]
    MapFull { map: &'static str, wanted: u64, capacity: u64 },
    /// A value outside what the datapath can represent.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

/// `Result` with [`Error`]. (aya's errors are boxed: they are large, and results are everywhere.)
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
