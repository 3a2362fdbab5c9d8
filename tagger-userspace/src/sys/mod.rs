//! Raw system calls that aya 0.14 and std do not expose: `bpf(2)` commands (opening a pin with
//! file flags, as aya opens pins read-write only; pinning any descriptor; detaching a link and
//! replacing its program; describing a link; listing the programs on a cgroup hook and
//! describing them), sockets of the families std has no type for (netlink, packet), and the
//! kernel's monotonic clock as a number (std's `Instant` hides it).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

/// Moves the calling thread (only it: `setns` on a thread of a multi-threaded process) into the
/// network namespace of `netns`, an nsfs file. Needs `CAP_SYS_ADMIN`; `EPERM` without it.
pub fn enter_netns(netns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns with a descriptor and a namespace type changes only this thread's
    // namespace; no memory is passed.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The kernel's monotonic clock (`CLOCK_MONOTONIC`, what `bpf_ktime_get_ns` reads), in ns: the
/// clock of warm-up ready times and of the datapath lease's deadline.
#[must_use]
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

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

/// Opens a link pin, asking for a read-only descriptor (`BPF_F_RDONLY`) first. Kernels up to
/// at least 6.18 refuse that for links with `EINVAL` (`bpf_obj_get_user`: a link descriptor is
/// always read-write); then the pin is opened with flags 0, the only mode they allow. Only
/// `BPF_OBJ_GET` is needed, which needs no write access to the pin's file system (the CLI works
/// on a read-only mount of the pins); whoever holds the descriptor must send nothing but reads
/// on it, which the CLI does.
pub fn obj_get_link(pin: &Path) -> io::Result<OwnedFd> {
    match obj_get(pin, BPF_F_RDONLY) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => obj_get(pin, 0),
        other => other,
    }
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

/// `BPF_F_QUERY_EFFECTIVE`: the programs that run for the cgroup (its own and its ancestors'),
/// in the order they run, instead of those attached at it.
const BPF_F_QUERY_EFFECTIVE: u32 = 1;
/// `BPF_F_ALLOW_OVERRIDE`: a cgroup's attach flag; a descendant's program replaces this one.
pub const BPF_F_ALLOW_OVERRIDE: u32 = 1;
/// `BPF_F_ALLOW_MULTI`: a cgroup's attach flag; descendants' programs run before this one.
pub const BPF_F_ALLOW_MULTI: u32 = 2;
/// The most programs one hook of one cgroup is asked for (the kernel allows 64 per cgroup).
const MAX_QUERIED: usize = 256;

/// The programs on one cgroup hook, as `BPF_PROG_QUERY` answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupHook {
    /// The cgroup's attach flags for this hook ([`BPF_F_ALLOW_MULTI`], [`BPF_F_ALLOW_OVERRIDE`],
    /// or 0 for an exclusive program); 0 in an effective query.
    pub attach_flags: u32,
    /// Program ids: attached at the cgroup, or with `effective` every one that runs for it, in
    /// the order they run.
    pub prog_ids: Vec<u32>,
}

/// `BPF_PROG_QUERY` of a cgroup hook (`attach_type`), read-only. `effective`: what runs for
/// the cgroup, in order (its own programs first, then each ancestor's up to the root, skipping
/// ancestors whose programs a descendant overrides); otherwise what is attached at it, with the
/// cgroup's attach flags.
pub fn cgroup_query(cgroup: BorrowedFd<'_>, attach_type: u32, effective: bool) -> io::Result<CgroupHook> {
    let mut ids = vec![0u32; MAX_QUERIED];
    let mut attr = ProgQueryAttr {
        target_ifindex: u32::try_from(cgroup.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?,
        attach_type,
        query_flags: if effective { BPF_F_QUERY_EFFECTIVE } else { 0 },
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: u32::try_from(ids.len()).map_err(|_| io::Error::other("id buffer"))?,
        ..Default::default()
    };
    // SAFETY: the kernel reads and writes `attr`, valid for its size, and writes at most
    // `prog_cnt` ids into `ids`, which outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &raw mut attr, size_of_val(&attr)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    ids.truncate(usize::try_from(attr.prog_cnt).unwrap_or(0).min(MAX_QUERIED));
    Ok(CgroupHook { attach_flags: attr.attach_flags, prog_ids: ids })
}

/// `BPF_OBJ_GET_INFO_BY_FD`.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_PROG_GET_FD_BY_ID`.
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
/// `BPF_LINK_TYPE_CGROUP`.
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// The `info` member of `union bpf_attr`.
#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info`, a `#[repr(C)]` prefix of the kernel's info struct
/// (the kernel fills what fits; bytes past its own struct must be, and stay, zero).
fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let attr = InfoByFdAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?,
        info_len: u32::try_from(size_of::<T>()).map_err(|_| io::Error::other("info size"))?,
        info: std::ptr::from_mut(info) as u64,
    };
    // SAFETY: the kernel reads `attr` (valid for its size) and writes at most `info_len` bytes
    // into `info`, which we borrow mutably for the call.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &raw const attr, size_of_val(&attr)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The leading members of `bpf_map_info`: what a map is, as the kernel describes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapInfo {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Map id.
    pub id: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub map_flags: u32,
}

/// What the map pinned at `pin` is, opened read-only so that a pin the caller may only read works
/// (aya's `MapInfo::from_pin` opens it read-write, which such a caller is refused).
pub fn pinned_map_info(pin: &Path) -> io::Result<MapInfo> {
    let fd = obj_get(pin, BPF_F_RDONLY)?;
    let mut info = MapInfo::default();
    obj_info(std::os::fd::AsFd::as_fd(&fd), &mut info)?;
    Ok(info)
}

/// A link as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Link id (as `bpftool link` shows it).
    pub link_id: u32,
    /// Id of the attached program (as `bpftool prog` shows it).
    pub program_id: u32,
    /// For a cgroup link: the cgroup id (inode; 0 once the link is detached) and the attach
    /// type.
    pub cgroup: Option<(u64, u32)>,
}

/// `bpf_link_info` up to the cgroup member of its union, followed by room for the larger union
/// members of newer kernels (which must be zero on input and are ignored on output).
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    /// Alignment of the 8-byte union that follows.
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u32; 25],
}

/// Reads the kernel's description of the link pinned at `pin`, through [`obj_get_link`]: only
/// `BPF_OBJ_GET_INFO_BY_FD` is sent on the descriptor. Holding it changes nothing: the pin keeps
/// the link attached, and closing ours only drops our reference.
pub fn link_info(pin: &Path) -> io::Result<LinkInfo> {
    let fd = obj_get_link(pin)?;
    let mut info = RawLinkInfo::default();
    obj_info(std::os::fd::AsFd::as_fd(&fd), &mut info)?;
    let cgroup = (info.link_type == BPF_LINK_TYPE_CGROUP).then_some((info.cgroup_id, info.attach_type));
    Ok(LinkInfo { link_id: info.id, program_id: info.prog_id, cgroup })
}

/// A loaded program as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    /// `bpf_prog_type`.
    pub prog_type: u32,
    /// Program id.
    pub id: u32,
    /// The name it was loaded with (at most 15 bytes).
    pub name: String,
}

/// `bpf_prog_info` up to `name`, then zeroed room for the rest.
#[repr(C)]
struct RawProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
    _rest: [u64; 24],
}

/// Describes the program with kernel id `id`. Opening a program by id needs CAP_SYS_ADMIN:
/// without it this fails with EPERM. Only reads: the descriptor is closed on return.
pub fn prog_info(id: u32) -> io::Result<ProgInfo> {
    // The `prog_id` member of `union bpf_attr`: id, next_id, open_flags.
    let attr: [u32; 3] = [id, 0, 0];
    // SAFETY: the kernel reads 12 bytes of `attr`, valid for the call.
    let fd =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_GET_FD_BY_ID, attr.as_ptr(), size_of_val(&attr)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: every field is an integer or an integer array, for which all zeroes is valid.
    let mut info: RawProgInfo = unsafe { std::mem::zeroed() };
    obj_info(std::os::fd::AsFd::as_fd(&fd), &mut info)?;
    let len = info.name.iter().position(|&b| b == 0).unwrap_or(info.name.len());
    Ok(ProgInfo {
        prog_type: info.prog_type,
        id: info.id,
        name: String::from_utf8_lossy(&info.name[..len]).into_owned(),
    })
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

/// A close-on-exec `socket(2)` whose receives give up after `timeout` (`SO_RCVTIMEO`), so a
/// reader is never stuck on a kernel that stays silent and can check for a stop between reads.
pub fn socket_with_recv_timeout(
    domain: libc::c_int,
    kind: libc::c_int,
    protocol: libc::c_int,
    timeout: Duration,
) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: the kernel reads a timeval, valid for the size given, for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap_or(libc::socklen_t::MAX),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// `recv(2)` of one message (a datagram, a netlink batch, a frame) into `buf`; the bytes received.
/// A timeout set by [`socket_with_recv_timeout`] is an error of kind `WouldBlock`.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which is ours for the call.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `send(2)` of one message (a netlink request) on `fd` to its default destination; the bytes
/// sent.
pub fn send(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `bytes.len()` bytes from `bytes`, initialised and ours
    // for the call.
    let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `SO_COOKIE` of a socket: the kernel's id of it, unique across network namespaces.
pub fn socket_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap_or(8);
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Whether an open file is a network namespace (nsfs): the `NS_GET_NSTYPE` ioctl answers
/// `CLONE_NEWNET`. Any other file answers otherwise (ENOTTY for what is not nsfs).
pub fn is_netns(file: BorrowedFd<'_>) -> bool {
    /// `_IO(0xb7, 0x3)` from `linux/nsfs.h`.
    const NS_GET_NSTYPE: libc::Ioctl = 0xb703;
    // SAFETY: an ioctl without arguments on an open descriptor.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    kind == libc::CLONE_NEWNET
}

/// The calling process's effective user id.
#[must_use]
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The names of the interfaces of the calling thread's network namespace (`if_nameindex`,
/// which asks the kernel over netlink; `/sys/class/net` would show the sysfs mount's namespace
/// instead). Empty when the list cannot be had.
#[must_use]
pub fn interface_names() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, or null; it is freed
    // with if_freenameindex once read.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(std::ffi::CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// The filesystem magic number (`statfs`'s `f_type`) of the filesystem holding `path`.
pub fn fs_magic(path: &Path) -> io::Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: `statfs` writes into the zeroed struct we own; `c` is a valid NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type is signed on glibc and unsigned on musl; magic numbers are small positive values.
    #[allow(clippy::unnecessary_cast, clippy::cast_sign_loss, reason = "f_type's type differs between libcs")]
    Ok(st.f_type as u64)
}

/// The calling thread's effective capabilities, as a bit set by capability number (`capget`).
pub fn effective_capabilities() -> io::Result<u64> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget(2) with a version-3 header reads `header` and writes two `Data` structs,
    // which `data` holds; both live for the duration of the call. pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

/// Caps glibc's malloc arenas at `max` (one per thread by default, each holding freed memory):
/// a no-op on other allocators.
pub fn limit_malloc_arenas(max: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt(3) only sets an allocator parameter; M_ARENA_MAX takes effect for arenas
    // created afterwards.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, max);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = max;
}

/// Runs the TC program `prog` once on `frame` (an Ethernet frame) whose `skb->mark` is `mark`,
/// without attaching it (`BPF_PROG_TEST_RUN`); returns the mark the program leaves.
pub fn skb_test_run(prog: BorrowedFd<'_>, frame: &[u8], mark: u32) -> io::Result<u32> {
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    /// The `test` member of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
    }
    // `struct __sk_buff` (at most 192 bytes; zero beyond an older kernel's size is accepted):
    // `mark` is its third u32.
    let mut ctx_in = [0u32; 48];
    ctx_in[2] = mark;
    let mut ctx_out = [0u32; 48];
    let mut out = vec![0u8; frame.len() + 256];
    let size = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let mut attr = TestAttr {
        prog_fd: u32::try_from(prog.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?,
        data_size_in: size(frame.len()),
        data_size_out: size(out.len()),
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ctx_size_in: size(size_of_val(&ctx_in)),
        ctx_size_out: size(size_of_val(&ctx_out)),
        ctx_in: ctx_in.as_ptr() as u64,
        ctx_out: ctx_out.as_mut_ptr() as u64,
        ..TestAttr::default()
    };
    // SAFETY: every pointer in `attr` is valid for the size given beside it for the whole call,
    // and the kernel writes at most those sizes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &raw mut attr, size_of::<TestAttr>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(ctx_out[2]) }
}

#[cfg(test)]
mod tests {
    use std::{os::fd::AsFd as _, time::Instant};

    use super::*;

    #[test]
    fn info_members_sit_where_the_kernel_puts_them() {
        // struct bpf_link_info { __u32 type, id, prog_id; union { struct { __u64 cgroup_id;
        // __u32 attach_type; } cgroup; ... } } — the union is 8-byte aligned.
        assert_eq!(std::mem::offset_of!(RawLinkInfo, cgroup_id), 16);
        assert_eq!(std::mem::offset_of!(RawLinkInfo, attach_type), 24);
        // struct bpf_prog_info: char name[BPF_OBJ_NAME_LEN] follows map_ids at offset 64.
        assert_eq!(std::mem::offset_of!(RawProgInfo, name), 64);
        // union bpf_attr's query: prog_cnt at 24, prog_attach_flags at 32.
        assert_eq!(std::mem::offset_of!(ProgQueryAttr, prog_cnt), 24);
        assert_eq!(std::mem::offset_of!(ProgQueryAttr, prog_attach_flags), 32);
    }

    #[test]
    fn a_receive_with_nothing_to_read_times_out() {
        let fd = socket_with_recv_timeout(libc::AF_UNIX, libc::SOCK_DGRAM, 0, Duration::from_millis(20))
            .expect("socket");
        let t0 = Instant::now();
        let e = recv(fd.as_fd(), &mut [0u8; 16]).expect_err("nothing to receive");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(t0.elapsed() >= Duration::from_millis(15), "returned after {:?}", t0.elapsed());
    }
}
