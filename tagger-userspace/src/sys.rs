//! Raw `bpf(2)` commands that aya 0.14 does not expose: opening a pin with file flags (aya opens
//! pins read-write only).

use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

/// `BPF_OBJ_GET`.
const BPF_OBJ_GET: libc::c_long = 7;
/// `BPF_F_RDONLY`: the descriptor refuses writes (map updates and deletes fail with EPERM).
pub const BPF_F_RDONLY: u32 = 1 << 3;

/// The `BPF_OBJ_*` member of `union bpf_attr`. The kernel rejects (EINVAL) any non-zero byte
/// after `path_fd`, so the trailing padding is an explicit, zeroed field.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `BPF_OBJ_GET` of a pin with `file_flags` (0, or [`BPF_F_RDONLY`] for maps; links accept 0
/// only).
pub fn obj_get(path: &Path, file_flags: u32) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let attr = ObjGetAttr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags, path_fd: 0, _pad: 0 };
    // SAFETY: the kernel reads `attr` (valid for its size) and the NUL-terminated path it points
    // to, both alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &raw const attr, size_of_val(&attr)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
