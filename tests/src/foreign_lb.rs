//! A foreign socket load balancer attached at a test cgroup: tests/foreign-lb's programs
//! (`connect4/6` translating its own VIPs, `getpeername4/6` showing them again), a stand-in for
//! a socket-LB CNI such as Cilium's socket LB at the cgroup root. Its links and maps live as long
//! as the value: dropping it detaches everything.

use std::{fs::File, net::SocketAddr, path::Path};

use aya::{
    Ebpf,
    maps::HashMap,
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use tagger::net::addr_words;

/// The stand-in's object, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/foreign-lb"));
/// Its programs (the function names in tests/foreign-lb).
pub const PROGRAMS: [&str; 4] = ["flb_connect4", "flb_connect6", "flb_peer4", "flb_peer6"];
/// Their attach types (`bpf_attach_type`), in the order of [`PROGRAMS`].
const ATTACH_TYPES: [u32; 4] = [10, 11, 29, 30];
/// `BPF_PROG_ATTACH` and `BPF_PROG_DETACH`.
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;

/// The `BPF_PROG_ATTACH`/`DETACH` member of `union bpf_attr`.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// Its VIP map.
const SERVICES: &str = "FLB_SVC_V2";
/// tests/foreign-lb's `MAX_BACKENDS`.
const MAX_BACKENDS: usize = 16;

/// tests/foreign-lb's `Addr`: four network-order words (IPv4 mapped) and the port in network
/// order in the low 16 bits, as the context's `user_port` holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Addr {
    addr: [u32; 4],
    port: u32,
}

// SAFETY: `#[repr(C)]`, integers only, no padding (20 bytes of u32s).
unsafe impl aya::Pod for Addr {}

/// tests/foreign-lb's `Pool`: a VIP's backends, the first `count` used.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Pool {
    count: u32,
    backends: [Addr; MAX_BACKENDS],
}

// SAFETY: `#[repr(C)]`, u32s only, no padding.
unsafe impl aya::Pod for Pool {}

impl From<SocketAddr> for Addr {
    fn from(a: SocketAddr) -> Self {
        Self { addr: addr_words(a.ip()), port: u32::from(a.port().to_be()) }
    }
}

/// The foreign LB, loaded and attached.
pub struct ForeignLb {
    ebpf: Ebpf,
    /// Legacy attachments (`BPF_PROG_ATTACH`) to undo on drop: cgroup, program fd, attach type.
    legacy: Vec<(File, std::os::fd::OwnedFd, u32)>,
}

impl Drop for ForeignLb {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd as _;
        for (dir, fd, attach_type) in &self.legacy {
            let attr = ProgAttachAttr {
                target_fd: u32::try_from(dir.as_raw_fd()).unwrap_or(u32::MAX),
                attach_bpf_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
                attach_type: *attach_type,
                attach_flags: 0,
            };
            // SAFETY: as in `attach_legacy`; a failure leaves the program until the test's
            // cgroup is removed, which releases it.
            unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_DETACH, &raw const attr, size_of_val(&attr)) };
        }
    }
}

impl std::fmt::Debug for ForeignLb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignLb").finish_non_exhaustive()
    }
}

impl ForeignLb {
    /// Loads the programs and attaches them at `cgroup` with links (multi-attach, as socket-LB
    /// CNIs attach today).
    #[must_use]
    pub fn attach(cgroup: &Path) -> Self {
        let mut ebpf = Ebpf::load(OBJECT).expect("load the foreign LB");
        let dir = File::open(cgroup).unwrap_or_else(|e| panic!("open {}: {e}", cgroup.display()));
        for name in PROGRAMS {
            let program: &mut CgroupSockAddr =
                ebpf.program_mut(name).expect("program").try_into().expect("a cgroup_sock_addr program");
            program.load().unwrap_or_else(|e| panic!("loading {name}: {e}"));
            // A link (BPF_LINK_CREATE, what aya uses from 5.7 on) takes no flags and always
            // attaches as BPF_F_ALLOW_MULTI does.
            program
                .attach(&dir, CgroupAttachMode::Single)
                .unwrap_or_else(|e| panic!("attaching {name}: {e}"));
        }
        Self { ebpf, legacy: Vec::new() }
    }

    /// Loads the programs and attaches them at `cgroup` the legacy way, `BPF_PROG_ATTACH` with
    /// `flags` (0: exclusive, 1: `BPF_F_ALLOW_OVERRIDE`), as older socket LBs (bpftool
    /// without `multi`) did. Detached on drop.
    #[must_use]
    pub fn attach_legacy(cgroup: &Path, flags: u32) -> Self {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let mut ebpf = Ebpf::load(OBJECT).expect("load the foreign LB");
        let mut legacy = Vec::new();
        for (name, attach_type) in PROGRAMS.into_iter().zip(ATTACH_TYPES) {
            let program: &mut CgroupSockAddr =
                ebpf.program_mut(name).expect("program").try_into().expect("a cgroup_sock_addr program");
            program.load().unwrap_or_else(|e| panic!("loading {name}: {e}"));
            let fd = program.fd().expect("program fd").as_fd().try_clone_to_owned().expect("dup");
            let dir = File::open(cgroup).unwrap_or_else(|e| panic!("open {}: {e}", cgroup.display()));
            let attr = ProgAttachAttr {
                target_fd: u32::try_from(dir.as_raw_fd()).expect("fd"),
                attach_bpf_fd: u32::try_from(fd.as_raw_fd()).expect("fd"),
                attach_type,
                attach_flags: flags,
            };
            // SAFETY: the kernel reads `attr`, valid for its size, during the call.
            let rc =
                unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_ATTACH, &raw const attr, size_of_val(&attr)) };
            assert_eq!(rc, 0, "BPF_PROG_ATTACH {name}: {}", std::io::Error::last_os_error());
            legacy.push((dir, fd, attach_type));
        }
        Self { ebpf, legacy }
    }

    /// Serves `vip` (IPv4 or IPv6) with `backend`: connects to it go there.
    pub fn serve(&mut self, vip: SocketAddr, backend: SocketAddr) {
        self.serve_pool(vip, &[backend]);
    }

    /// Serves `vip` with `backends`, one picked at random per connection (at most 16 are
    /// used); none: `vip` is no longer served.
    pub fn serve_pool(&mut self, vip: SocketAddr, backends: &[SocketAddr]) {
        let mut services: HashMap<_, Addr, Pool> =
            HashMap::try_from(self.ebpf.map_mut(SERVICES).expect("VIP map")).expect("a hash map");
        if backends.is_empty() {
            let _ = services.remove(&Addr::from(vip));
            return;
        }
        let mut pool = Pool { count: 0, backends: [Addr { addr: [0; 4], port: 0 }; MAX_BACKENDS] };
        for (slot, b) in pool.backends.iter_mut().zip(backends) {
            *slot = Addr::from(*b);
            pool.count += 1;
        }
        services.insert(Addr::from(vip), pool, 0).expect("insert a VIP");
    }

    /// Every VIP it serves.
    #[must_use]
    pub fn vips(&self) -> Vec<SocketAddr> {
        let services: HashMap<_, Addr, Pool> =
            HashMap::try_from(self.ebpf.map(SERVICES).expect("VIP map")).expect("a hash map");
        services
            .keys()
            .filter_map(Result::ok)
            .map(|a| {
                let ip = tagger::net::words_addr(&a.addr);
                SocketAddr::new(ip, u16::from_be(u16::try_from(a.port).unwrap_or(0)))
            })
            .collect()
    }

    /// Kernel ids of its programs (what `tagger status` lists).
    #[must_use]
    pub fn program_ids(&self) -> Vec<u32> {
        PROGRAMS
            .iter()
            .map(|name| {
                let p: &CgroupSockAddr =
                    self.ebpf.program(name).expect("program").try_into().expect("cgroup_sock_addr");
                p.info().expect("program info").id()
            })
            .collect()
    }
}
