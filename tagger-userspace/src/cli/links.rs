//! What the kernel says about a pinned program link: link and program ids, and the cgroup and
//! attach point of a cgroup link.
//!
//! aya's `FdLink::info()` reports the ids but not the cgroup (and `PinnedLink` does not expose
//! its descriptor), so this asks the kernel directly: `BPF_OBJ_GET` on the pin, then
//! `BPF_OBJ_GET_INFO_BY_FD`. Holding a link descriptor changes nothing: the pin keeps the link
//! attached, and closing our descriptor only drops our reference.

use std::{io, os::fd::AsRawFd as _, path::Path};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// A link as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Link id (as `bpftool link` shows it).
    pub link_id: u32,
    /// Id of the attached program (as `bpftool prog` shows it).
    pub program_id: u32,
    /// For a cgroup link: the cgroup id (inode) and the attach type.
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

#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Reads the kernel's description of the link pinned at `pin`.
pub fn link_info(pin: &Path) -> io::Result<LinkInfo> {
    // Links can only be opened read-write (flags 0); holding the fd changes nothing.
    let fd = crate::sys::obj_get(pin, 0)?;
    let mut info = RawLinkInfo::default();
    let attr = InfoByFdAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?,
        info_len: u32::try_from(size_of::<RawLinkInfo>()).map_err(|_| io::Error::other("info size"))?,
        info: (&raw mut info) as u64,
    };
    // SAFETY: the kernel reads `attr` (valid for its size) and writes at most `info_len` bytes
    // into `info`, which we own and which outlives the call.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &raw const attr, size_of_val(&attr)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let cgroup = (info.link_type == BPF_LINK_TYPE_CGROUP).then_some((info.cgroup_id, info.attach_type));
    Ok(LinkInfo { link_id: info.id, program_id: info.prog_id, cgroup })
}

/// The kernel's name of a cgroup socket-address attach type (`bpf_attach_type`).
#[must_use]
pub fn attach_type_name(t: u32) -> Option<&'static str> {
    Some(match t {
        10 => "cgroup_inet4_connect",
        11 => "cgroup_inet6_connect",
        14 => "cgroup_udp4_sendmsg",
        15 => "cgroup_udp6_sendmsg",
        19 => "cgroup_udp4_recvmsg",
        20 => "cgroup_udp6_recvmsg",
        29 => "cgroup_inet4_getpeername",
        30 => "cgroup_inet6_getpeername",
        _ => return None,
    })
}

pub use crate::cgroup::cgroup_paths;

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, os::unix::fs::MetadataExt as _};

    use super::*;

    #[test]
    fn the_cgroup_member_sits_where_the_kernel_puts_it() {
        // struct bpf_link_info { __u32 type, id, prog_id; union { struct { __u64 cgroup_id;
        // __u32 attach_type; } cgroup; ... } } — the union is 8-byte aligned.
        assert_eq!(std::mem::offset_of!(RawLinkInfo, cgroup_id), 16);
        assert_eq!(std::mem::offset_of!(RawLinkInfo, attach_type), 24);
    }

    #[test]
    fn a_missing_pin_is_an_io_error() {
        let e = link_info(Path::new("/nonexistent/tagger/links/connect4")).unwrap_err();
        assert!(matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM | libc::ENOSYS)), "{e}");
    }

    #[test]
    fn cgroup_paths_finds_directories_by_inode() {
        let root = std::env::temp_dir().join(format!("tagger-cli-links-{}", std::process::id()));
        let deep = root.join("a/b");
        std::fs::create_dir_all(&deep).unwrap();
        let ino = std::fs::metadata(&deep).unwrap().ino();
        let found = cgroup_paths(&root, &BTreeSet::from([ino, 1]));
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found.get(&ino), Some(&deep));
    }
}
