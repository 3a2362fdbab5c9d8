//! The datapath's lifecycle: load the embedded eBPF object, attach its programs to a cgroup with
//! **pinned links**, pin its maps, adopt existing pins on the next start, and remove everything
//! on request.
//!
//! Pin layout under the bpffs directory (`--bpffs`, e.g. `/sys/fs/bpf/tagger`):
//!
//! ```text
//! <dir>/maps/<MAP NAME>     every map of tagger-common's ALL_MAPS
//! <dir>/links/<program>     one cgroup link per program of PROGRAMS
//! <dir>/links/moving-<program>  its link at a new attach cgroup, during a move (see below)
//! <dir>/object-<hash>       which build of the datapath the links run (a second pin of the
//!                           config map, named after a hash of the embedded object and, with
//!                           the debug log on, its level: `object-<hash>-log-debug`)
//! ```
//!
//! The kernel creates pins with mode 0600; the directories are created 0700.
//!
//! **Upgrades.** Map names carry a layout version (`TAGGER_SLOTS_V1`): a new layout gets new,
//! empty maps beside the old ones, never a misread old one. When the `object-<hash>` pin is not
//! this build's, [`Datapath::install`] loads this build's programs without touching the links:
//! the old programs keep serving from their maps while the agent fills the new ones. Then
//! [`Datapath::finish_upgrade`] replaces each link's program in one step (`BPF_LINK_UPDATE`:
//! the hook never runs neither), removes the map pins no program of this build uses, and
//! records the build.
//!
//! **Moving to another cgroup.** When a pinned link is attached at another cgroup than the one
//! asked for (a release that attached at the cgroup root, or a changed `--attach-cgroup`), the
//! program is attached at the new cgroup first, pinned as `moving-<program>`, and only then is the
//! old link detached and the new pin renamed over it: the hook runs once or twice, never not
//! at all. A move interrupted between those steps is finished (or undone) by the next install.
//!
//! Because links and maps are pinned, programs stay attached and maps stay filled when the
//! process that installed them exits; a later process opens the same pins ([`Datapath::open`]).

mod ancestors;
pub mod bpf_log;
mod compat;
mod inbound;
mod tables;
pub mod tc;

use std::{
    fs, io,
    os::{fd::AsFd as _, unix::fs::DirBuilderExt as _},
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{CgroupAttachMode, Program, ProgramError, links::FdLink},
};
pub use bpf_log::{BpfLog, LogRing};
pub use inbound::{EdgeRow, InboundRow};
pub use tables::{Access, CounterSnapshot, SLOT_GRACE, ServiceStat, Tables, lane_hex, lane_label};
use tagger_common::ALL_MAPS;

use crate::{
    Error, Result,
    cgroup::CgroupRef,
    fs::{BPF_FS_MAGIC, fs_type},
};

/// The datapath object, built by `build.rs` from tagger-ebpf.
static DATAPATH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tagger-ebpf"));

/// The programs attached to the cgroup, by the name of their function in tagger-ebpf: the
/// socket-address programs, then connection tracking (`conn_track`: sockops; `conn_release`: cgroup sock_release, for UDP).
pub const PROGRAMS: [&str; 10] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
    "conn_track",
    "conn_release",
];

/// The kernel attach type (`bpf_attach_type`) of each program of [`PROGRAMS`].
#[must_use]
pub fn attach_type(program: &str) -> Option<u32> {
    Some(match program {
        "connect4" => 10,
        "connect6" => 11,
        "sendmsg4" => 14,
        "sendmsg6" => 15,
        "recvmsg4" => 19,
        "recvmsg6" => 20,
        "getpeername4" => 29,
        "getpeername6" => 30,
        "conn_track" => 3,
        "conn_release" => 34,
        _ => return None,
    })
}

/// The kernel's name of a cgroup attach type tagger uses (`bpf_attach_type`).
#[must_use]
pub fn attach_type_name(t: u32) -> Option<&'static str> {
    Some(match t {
        3 => "cgroup_sock_ops",
        10 => "cgroup_inet4_connect",
        11 => "cgroup_inet6_connect",
        14 => "cgroup_udp4_sendmsg",
        15 => "cgroup_udp6_sendmsg",
        19 => "cgroup_udp4_recvmsg",
        20 => "cgroup_udp6_recvmsg",
        29 => "cgroup_inet4_getpeername",
        30 => "cgroup_inet6_getpeername",
        34 => "cgroup_inet_sock_release",
        _ => return None,
    })
}

/// Prefix of a link pin attached at a new cgroup while the old link still serves (bpffs
/// refuses names with a dot).
const MOVING_PREFIX: &str = "moving-";

/// Where the datapath's pins live.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// A layout rooted at a directory on bpffs.
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of the map pins.
    #[must_use]
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Directory of the link pins.
    #[must_use]
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Pin path of one map.
    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Pin path of one program's link.
    #[must_use]
    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    /// Pin path of a program's link at the cgroup it is moving to (see the module docs).
    #[must_use]
    pub fn moving_link(&self, program: &str) -> PathBuf {
        self.links_dir().join(format!("{MOVING_PREFIX}{program}"))
    }

    /// Map pins that do not exist.
    #[must_use]
    pub fn missing_maps(&self) -> Vec<&'static str> {
        ALL_MAPS.into_iter().filter(|m| !self.map(m).exists()).collect()
    }

    /// Pin path of the marker naming the build `version` (see [`object_version`]).
    #[must_use]
    pub fn version_pin(&self, version: &str) -> PathBuf {
        self.root.join(format!("{OBJECT_PIN_PREFIX}{version}"))
    }

    /// The builds recorded by `object-<hash>` pins (normally one).
    #[must_use]
    pub fn recorded_versions(&self) -> Vec<String> {
        let Ok(dir) = fs::read_dir(&self.root) else { return Vec::new() };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix(OBJECT_PIN_PREFIX).map(str::to_owned))
            .collect()
    }

    /// Pinned tagger maps (`TAGGER_*`) that this build does not have: an older layout's.
    #[must_use]
    pub fn stale_maps(&self) -> Vec<String> {
        let Ok(dir) = fs::read_dir(self.maps_dir()) else { return Vec::new() };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| n.starts_with("TAGGER_") && !ALL_MAPS.contains(&n.as_str()))
            .collect()
    }

    /// Link pins that do not exist.
    #[must_use]
    pub fn missing_links(&self) -> Vec<&'static str> {
        PROGRAMS.into_iter().filter(|p| !self.link(p).exists()).collect()
    }
}

/// Prefix of the pin naming the build the links run.
const OBJECT_PIN_PREFIX: &str = "object-";

/// This build's datapath object, as a name: FNV-1a 64 of its bytes.
#[must_use]
pub fn object_version() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in DATAPATH_OBJECT {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What the links run, as recorded with the pins: this build's object loaded with `log`'s
/// level (a load-time constant, so another level is other programs).
fn build_id(log: BpfLog) -> String {
    format!("{}{}", object_version(), log.build_suffix())
}

/// What [`Datapath::install`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Installed {
    /// Every pin existed: nothing was loaded or attached, the running datapath was adopted.
    Adopted,
    /// Programs were loaded and these links attached and pinned (maps reused where pinned).
    Attached {
        /// Programs attached by this call.
        programs: Vec<&'static str>,
    },
    /// This build's links were attached at another cgroup: each is now attached at the one
    /// asked for (attached there first, then the old link detached).
    Moved {
        /// The cgroups (ids) the links were attached at.
        from: Vec<u64>,
        /// Programs moved.
        moved: Vec<&'static str>,
        /// Programs whose link was missing, attached by this call.
        attached: Vec<&'static str>,
    },
    /// The links run another build's programs (or an interrupted install's): this build's are
    /// loaded, and [`Datapath::finish_upgrade`] swaps them in once the maps are filled.
    Upgrading {
        /// The build the links ran (`None`: unknown, an install interrupted before recording it).
        from: Option<String>,
        /// Programs whose link was missing, attached by this call.
        attached: Vec<&'static str>,
        /// Programs whose link `finish_upgrade` will switch to this build (and move to the
        /// cgroup asked for, if attached elsewhere).
        replacing: Vec<&'static str>,
    },
}

/// This build's programs, loaded, waiting to replace the running ones.
struct PendingUpgrade {
    ebpf: aya::Ebpf,
    programs: Vec<&'static str>,
    cgroup: CgroupRef,
    /// What to record once they run ([`build_id`]).
    build: String,
}

impl std::fmt::Debug for PendingUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingUpgrade").field("programs", &self.programs).finish_non_exhaustive()
    }
}

/// The pinned datapath: its layout and typed access to its maps.
#[derive(Debug)]
pub struct Datapath {
    layout: PinLayout,
    tables: Tables,
    pending: Option<PendingUpgrade>,
    /// The log ring of the programs this process loaded with the debug log on.
    log_ring: Option<LogRing>,
}

impl Datapath {
    /// Installs the datapath on `cgroup` with pins under `bpffs_dir`, or adopts it if it is
    /// already there. Never detaches or flushes anything: on a restart the running datapath
    /// keeps serving throughout. Missing links (an interrupted earlier install) are attached,
    /// reusing the pinned maps, so a partial install heals instead of being duplicated. Links
    /// running another build are left running until [`Datapath::finish_upgrade`] (see the
    /// module documentation).
    pub fn install(bpffs_dir: &Path, cgroup: &Path) -> Result<(Self, Installed)> {
        Self::install_with(bpffs_dir, cgroup, BpfLog::Off)
    }

    /// [`Datapath::install`] with the datapath's debug log at `log`. Programs loaded with
    /// another level are replaced as in an upgrade; with the log on they are always loaded
    /// afresh (see [`bpf_log`]), and [`Datapath::take_log_ring`] gives their ring.
    pub fn install_with(bpffs_dir: &Path, cgroup: &Path, log: BpfLog) -> Result<(Self, Installed)> {
        let layout = PinLayout::new(bpffs_dir);
        check_bpffs(bpffs_dir)?;
        let cgroup = CgroupRef::open(cgroup)?;
        for dir in [layout.root().to_owned(), layout.maps_dir(), layout.links_dir()] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| Error::io(&dir, e))?;
            enforce_private(&dir)?;
        }
        compat::check_pins(&layout)?;
        let build = build_id(log);
        let recorded = layout.recorded_versions();
        // The linked programs use exactly the pinned maps of their build: a map pin missing
        // now gets a new map, which they do not see, so they are replaced as in an upgrade.
        // With the log on they are replaced too, for their ring (module docs of `bpf_log`).
        let current = !log.is_on() && recorded.contains(&build) && layout.missing_maps().is_empty();
        recover_moves(&layout, &cgroup)?;
        let missing_links = layout.missing_links();
        let elsewhere = links_elsewhere(&layout, &cgroup);
        if current && missing_links.is_empty() && elsewhere.is_empty() {
            return Ok((Self::open(bpffs_dir)?, Installed::Adopted));
        }
        let attaching: Vec<&'static str> =
            missing_links.iter().copied().chain(elsewhere.iter().map(|&(p, _)| p)).collect();
        ancestors::check(&cgroup, &attaching)?;
        let mut ebpf = load(&layout, log)?;
        let log_ring = log.is_on().then(|| LogRing::take(&mut ebpf)).transpose()?;
        attach(&mut ebpf, &layout, &cgroup, &missing_links)?;
        let replacing: Vec<&'static str> = if current {
            // This build's programs, on this build's maps: moving them needs no filled maps first.
            for &(name, _) in &elsewhere {
                move_link(&mut ebpf, &layout, &cgroup, name)?;
            }
            Vec::new()
        } else {
            PROGRAMS.into_iter().filter(|p| !missing_links.contains(p)).collect()
        };
        let mut datapath = Self::open(bpffs_dir)?;
        datapath.log_ring = log_ring;
        if replacing.is_empty() {
            datapath.record_version(&build)?;
            if elsewhere.is_empty() {
                return Ok((datapath, Installed::Attached { programs: missing_links }));
            }
            let mut from: Vec<u64> = elsewhere.iter().map(|&(_, id)| id).collect();
            from.sort_unstable();
            from.dedup();
            let moved = elsewhere.into_iter().map(|(name, _)| name).collect();
            return Ok((datapath, Installed::Moved { from, moved, attached: missing_links }));
        }
        datapath.pending = Some(PendingUpgrade { ebpf, programs: replacing.clone(), cgroup, build });
        let from = recorded.into_iter().next();
        Ok((datapath, Installed::Upgrading { from, attached: missing_links, replacing }))
    }

    /// Completes an upgrade [`Datapath::install`] began (nothing to do otherwise): call it once
    /// this build's maps hold the desired state. Each link switches to this build's program in
    /// one step (a link attached at another cgroup than the install's is replaced by one at
    /// that cgroup, attached before the old one is detached); then the map pins no program of
    /// this build uses are removed and the build is recorded. Returns the programs switched.
    pub fn finish_upgrade(&mut self) -> Result<Vec<&'static str>> {
        let Some(mut pending) = self.pending.take() else { return Ok(Vec::new()) };
        let elsewhere = links_elsewhere(&self.layout, &pending.cgroup);
        for &name in &pending.programs {
            if elsewhere.iter().any(|&(p, _)| p == name) {
                move_link(&mut pending.ebpf, &self.layout, &pending.cgroup, name)?;
                continue;
            }
            let pin = self.layout.link(name);
            let link = crate::sys::obj_get(&pin, 0).map_err(|e| Error::io(&pin, e))?;
            let program = pending.ebpf.program(name).ok_or_else(|| Error::Invalid {
                what: "datapath object",
                reason: format!("program {name} missing"),
            })?;
            let fd =
                program.fd().map_err(|source| Error::Program { program: name, source: Box::new(source) })?;
            crate::sys::link_update(link.as_fd(), fd.as_fd()).map_err(|e| Error::Pin {
                path: pin.clone(),
                reason: format!("replacing the program: {e}"),
            })?;
        }
        self.remove_stale_maps()?;
        self.record_version(&pending.build)?;
        Ok(pending.programs)
    }

    /// The log ring of the programs [`Datapath::install_with`] loaded with the debug log on
    /// (once; `None` with the log off), for [`bpf_log::forward`].
    pub fn take_log_ring(&mut self) -> Option<LogRing> {
        self.log_ring.take()
    }

    /// Whether [`Datapath::finish_upgrade`] has work to do.
    #[must_use]
    pub fn upgrade_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Pins the `object-<build>` marker of what the links now run ([`build_id`]) and removes
    /// any other's.
    fn record_version(&self, build: &str) -> Result<()> {
        for old in self.layout.recorded_versions() {
            if old != build {
                remove_pin(&self.layout.version_pin(&old))?;
            }
        }
        let marker = self.layout.version_pin(build);
        if !marker.exists() {
            let cfg = self.layout.map(tagger_common::MAP_CONFIG);
            let fd = crate::sys::obj_get(&cfg, 0).map_err(|e| Error::io(&cfg, e))?;
            crate::sys::obj_pin(fd.as_fd(), &marker).map_err(|e| Error::io(&marker, e))?;
        }
        Ok(())
    }

    /// Removes the pins of tagger maps this build does not have (an older layout's).
    fn remove_stale_maps(&self) -> Result<()> {
        for name in self.layout.stale_maps() {
            remove_pin(&self.layout.map(&name))?;
        }
        Ok(())
    }

    /// Opens an installed datapath's pinned maps for reading and writing.
    pub fn open(bpffs_dir: &Path) -> Result<Self> {
        Self::open_with(bpffs_dir, Access::ReadWrite)
    }

    /// Opens the pinned maps read-only (`BPF_F_RDONLY`): the kernel refuses any write through
    /// them, so an inspecting tool can never change the datapath.
    pub fn open_read_only(bpffs_dir: &Path) -> Result<Self> {
        Self::open_with(bpffs_dir, Access::ReadOnly)
    }

    fn open_with(bpffs_dir: &Path, access: Access) -> Result<Self> {
        let layout = PinLayout::new(bpffs_dir);
        let tables = Tables::open(&layout, access)?;
        Ok(Self { layout, tables, pending: None, log_ring: None })
    }

    /// Removes every link pin (detaching the programs) and every map pin, then the directory.
    /// Pins that are already gone are fine; anything else that is not tagger's is left alone.
    pub fn uninstall(bpffs_dir: &Path) -> Result<()> {
        let layout = PinLayout::new(bpffs_dir);
        // Links first: once they are gone no program reads the maps. Each link is detached
        // explicitly before its pin goes, because the kernel releases an unpinned link
        // asynchronously.
        for pin in PROGRAMS.into_iter().flat_map(|p| [layout.moving_link(p), layout.link(p)]) {
            detach_and_remove(&pin)?;
        }
        tc::remove_all(&layout).map_err(|e| Error::io(layout.links_dir(), e))?;
        for map in ALL_MAPS.iter().map(|m| (*m).to_owned()).chain(layout.stale_maps()) {
            remove_pin(&layout.map(&map))?;
        }
        for version in layout.recorded_versions() {
            remove_pin(&layout.version_pin(&version))?;
        }
        for dir in [layout.links_dir(), layout.maps_dir(), layout.root().to_owned()] {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&dir, e)),
            }
        }
        Ok(())
    }

    /// The pin layout.
    #[must_use]
    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// Typed access to the maps.
    #[must_use]
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// Typed mutable access to the maps.
    pub fn tables_mut(&mut self) -> &mut Tables {
        &mut self.tables
    }
}

/// Loads the object (reusing pinned maps, pinning new ones) with the debug log at `log`, and
/// every program into the kernel.
fn load(layout: &PinLayout, log: BpfLog) -> Result<aya::Ebpf> {
    let map_paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, layout.map(m))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    log.configure(&mut loader);
    let mut ebpf = loader.load(DATAPATH_OBJECT).map_err(Box::new)?;
    for name in PROGRAMS {
        let program = program_mut(&mut ebpf, name)?;
        load_program(program).map_err(|source| Error::Program { program: name, source: Box::new(source) })?;
    }
    Ok(ebpf)
}

/// One of the object's programs.
fn program_mut<'a>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| Error::Invalid { what: "datapath object", reason: format!("program {name} missing") })
}

/// Loads of one program the kernel may interrupt with `EAGAIN` before giving up: the verifier
/// stops when the loading thread has a signal pending and asks the caller to try again (libbpf
/// retries likewise). Seen under load, with the test suite's child processes exiting around it.
const LOAD_ATTEMPTS: u32 = 5;

/// Loads one of the datapath's cgroup programs into the kernel (the verifier runs here).
fn load_program(program: &mut Program) -> Result<(), ProgramError> {
    let mut attempt = 1;
    loop {
        let result = match program {
            Program::CgroupSockAddr(p) => p.load(),
            Program::SockOps(p) => p.load(),
            Program::CgroupSock(p) => p.load(),
            _ => Err(ProgramError::IOError(io::Error::other("unexpected program type"))),
        };
        match result {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Attaches the loaded `programs` to the cgroup and pins their links.
fn attach(
    ebpf: &mut aya::Ebpf,
    layout: &PinLayout,
    cgroup: &CgroupRef,
    programs: &[&'static str],
) -> Result<()> {
    let cgroup_dir = fs::File::open(&cgroup.path).map_err(|e| Error::io(&cgroup.path, e))?;
    for &name in programs {
        let program = program_mut(ebpf, name)?;
        let fd_link = attach_loaded(program, &cgroup_dir)
            .map_err(|source| Error::Program { program: name, source: Box::new(source) })?;
        let path = layout.link(name);
        fd_link.pin(&path).map_err(|e| Error::Pin { path: path.clone(), reason: e.to_string() })?;
    }
    Ok(())
}

/// Programs whose pinned link is attached at another cgroup than `cgroup`, with that cgroup's
/// id (0: a link detached by an interrupted move). A link that cannot be read is left alone
/// (logged): it is adopted as it is.
fn links_elsewhere(layout: &PinLayout, cgroup: &CgroupRef) -> Vec<(&'static str, u64)> {
    PROGRAMS
        .into_iter()
        .filter_map(|name| {
            let pin = layout.link(name);
            if !pin.exists() {
                return None;
            }
            match crate::sys::link_info(&pin) {
                Ok(info) => info.cgroup.map(|(id, _)| id).filter(|&id| id != cgroup.id).map(|id| (name, id)),
                Err(e) => {
                    log::warn!("reading {}: {e}; adopting the link as it is", pin.display());
                    None
                }
            }
        })
        .collect()
}

/// Moves one program's link to `cgroup` with no moment without the hook: attaches this build's
/// program there, pinned as `moving-<program>`, then detaches the old link and renames the new
/// pin over the old one.
fn move_link(ebpf: &mut aya::Ebpf, layout: &PinLayout, cgroup: &CgroupRef, name: &'static str) -> Result<()> {
    let moving = layout.moving_link(name);
    detach_and_remove(&moving)?;
    let cgroup_dir = fs::File::open(&cgroup.path).map_err(|e| Error::io(&cgroup.path, e))?;
    let fd_link = attach_loaded(program_mut(ebpf, name)?, &cgroup_dir)
        .map_err(|source| Error::Program { program: name, source: Box::new(source) })?;
    fd_link.pin(&moving).map_err(|e| Error::Pin { path: moving.clone(), reason: e.to_string() })?;
    finish_move(layout, name)
}

/// The second half of a move: the new link (`moving-<program>`) is attached; detach the old one
/// and rename the new pin over it.
fn finish_move(layout: &PinLayout, name: &str) -> Result<()> {
    let (pin, moving) = (layout.link(name), layout.moving_link(name));
    detach(&pin);
    fs::rename(&moving, &pin).map_err(|e| Error::io(&moving, e))
}

/// Finishes or undoes moves an earlier install left half-done: a `moving-<program>` link attached
/// at `cgroup` takes its program's pin (the old link is detached); one attached elsewhere (a
/// move towards another cgroup) is detached and removed, the old link still serving.
fn recover_moves(layout: &PinLayout, cgroup: &CgroupRef) -> Result<()> {
    for name in PROGRAMS {
        let moving = layout.moving_link(name);
        if !moving.exists() {
            continue;
        }
        let at_target =
            crate::sys::link_info(&moving).is_ok_and(|i| i.cgroup.is_some_and(|(id, _)| id == cgroup.id));
        if at_target {
            finish_move(layout, name)?;
        } else {
            detach_and_remove(&moving)?;
        }
    }
    Ok(())
}

/// Detaches the link pinned at `pin` now (the kernel releases an unpinned or replaced link from a
/// workqueue, a moment later); a missing pin is fine.
fn detach(pin: &Path) {
    if let Ok(fd) = crate::sys::obj_get(pin, 0)
        && let Err(e) = crate::sys::link_detach(fd.as_fd())
    {
        log::warn!("detaching {}: {e}; removing its pin detaches it shortly", pin.display());
    }
}

/// [`detach`]es the link pinned at `pin` and removes the pin; a missing pin is fine.
fn detach_and_remove(pin: &Path) -> Result<()> {
    detach(pin);
    remove_pin(pin)
}

/// Attaches one loaded cgroup program with a link (kernel >= 5.7 for every type used).
fn attach_loaded(program: &mut Program, cgroup_dir: &fs::File) -> Result<FdLink, ProgramError> {
    macro_rules! attach_as {
        ($p:expr) => {{
            let id = $p.attach(cgroup_dir, CgroupAttachMode::Single)?;
            let link = $p.take_link(id)?;
            FdLink::try_from(link).map_err(|e| ProgramError::IOError(io::Error::other(e.to_string())))
        }};
    }
    match program {
        Program::CgroupSockAddr(p) => attach_as!(p),
        Program::SockOps(p) => attach_as!(p),
        Program::CgroupSock(p) => attach_as!(p),
        _ => Err(ProgramError::IOError(io::Error::other("unexpected program type"))),
    }
}

/// Refuses a pin directory that is not on bpffs (pins elsewhere fail, or worse, vanish).
pub fn check_bpffs(dir: &Path) -> Result<()> {
    // The directory may not exist yet: check the nearest existing ancestor.
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if fs_type(existing)? != BPF_FS_MAGIC {
        return Err(Error::Bpffs {
            path: dir.to_owned(),
            reason: format!(
                "{} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`",
                existing.display()
            ),
        });
    }
    Ok(())
}

/// Makes a pin directory that existed already (created by kubelet for a hostPath, 0755, or by
/// hand) the agent's alone again: mode 0700. Whoever can open a pinned map can read it and,
/// with write access, change every pod's steering.
fn enforce_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = fs::metadata(dir).map_err(|e| Error::io(dir, e))?.permissions().mode() & 0o7777;
    if mode != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(dir, e))?;
        tracing::warn!(dir = %dir.display(), was = format!("{mode:04o}"), "pin directory was not private; set to 0700");
    }
    Ok(())
}

fn remove_pin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}
