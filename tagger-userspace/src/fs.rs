//! Filesystem identity checks (`statfs` magic numbers) for cgroup2 and bpffs paths.

use std::path::Path;

use crate::{Error, Result};

/// `CGROUP2_SUPER_MAGIC` from `linux/magic.h`.
pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;
/// `BPF_FS_MAGIC` from `linux/magic.h`.
pub const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// The filesystem magic number of the filesystem holding `path`.
pub fn fs_type(path: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid { what: "path", reason: format!("{} contains NUL", path.display()) })?;
    // SAFETY: `statfs` writes into the zeroed struct we own; `c` is a valid NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(Error::io(path, std::io::Error::last_os_error()));
    }
    // f_type is signed on glibc and unsigned on musl; magic numbers are small positive values.
    #[allow(clippy::unnecessary_cast, clippy::cast_sign_loss, reason = "f_type's type differs between libcs")]
    Ok(st.f_type as u64)
}
