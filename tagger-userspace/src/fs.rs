//! Filesystem identity checks (`statfs` magic numbers) for cgroup2 and bpffs paths.

use std::path::Path;

use crate::{Error, Result};

/// `CGROUP2_SUPER_MAGIC` from `linux/magic.h`.
pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;
/// `BPF_FS_MAGIC` from `linux/magic.h`.
pub const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// The filesystem magic number of the filesystem holding `path`.
pub fn fs_type(path: &Path) -> Result<u64> {
    crate::sys::fs_magic(path).map_err(|e| Error::io(path, e))
}
