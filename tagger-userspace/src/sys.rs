//! Raw `bpf(2)` commands that aya 0.14 does not expose: opening a pin with file flags (aya opens
//! pins read-write only), pinning any descriptor, detaching a link and replacing its program.

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

/// `BPF_LINK_DETACH`.
const BPF_LINK_DETACH: libc::c_long = 34;

/// Detaches a link now (kernel ≥ 5.9). Removing a link's last pin also detaches it, but the
/// kernel releases the link from a workqueue, a moment later; this makes "uninstalled" mean
/// "no longer runs" by the time it returns.
pub fn link_detach(link: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let link_fd = u32::try_from(link.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?;
    // SAFETY: the kernel reads the 4-byte `link_detach` member of `union bpf_attr`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, &raw const link_fd, size_of::<u32>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `BPF_OBJ_PIN`.
const BPF_OBJ_PIN: libc::c_long = 6;

/// Pins the object behind `fd` (a map, program or link) at `path` on bpffs. The kernel creates
/// the pin with mode 0600.
pub fn obj_pin(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let bpf_fd = u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?;
    let attr = ObjGetAttr { pathname: c.as_ptr() as u64, bpf_fd, file_flags: 0, path_fd: 0, _pad: 0 };
    // SAFETY: the kernel reads `attr` (valid for its size) and the NUL-terminated path it points
    // to, both alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &raw const attr, size_of_val(&attr)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `BPF_LINK_UPDATE`.
const BPF_LINK_UPDATE: libc::c_long = 29;

/// The `link_update` member of `union bpf_attr`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Replaces the program of a link in one step (kernel ≥ 5.7 for cgroup links): the hook runs
/// the old program up to this call and the new one from it on, never neither.
pub fn link_update(
    link: std::os::fd::BorrowedFd<'_>,
    program: std::os::fd::BorrowedFd<'_>,
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let attr = LinkUpdateAttr {
        link_fd: u32::try_from(link.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?,
        new_prog_fd: u32::try_from(program.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: the kernel reads `attr`, valid for its size, for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, &raw const attr, size_of_val(&attr)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `BPF_PROG_QUERY`.
const BPF_PROG_QUERY: libc::c_long = 16;
/// `BPF_TCX_INGRESS` (Linux ≥ 6.6).
const BPF_TCX_INGRESS: u32 = 46;

/// The `query` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Queries the TCX ingress programs of an interface: fails (EINVAL) on kernels without TCX.
pub fn tcx_query(ifindex: u32) -> io::Result<u32> {
    let mut attr =
        ProgQueryAttr { target_ifindex: ifindex, attach_type: BPF_TCX_INGRESS, ..Default::default() };
    // SAFETY: the kernel reads and writes `attr`, valid for its size, during the call; no
    // program id buffer is passed (`prog_ids` 0), so it only writes the counts.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &raw mut attr, size_of_val(&attr)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(attr.prog_cnt) }
}
