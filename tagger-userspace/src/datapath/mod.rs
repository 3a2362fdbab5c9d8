//! The datapath's lifecycle: load the embedded eBPF object, attach its programs to a cgroup with
//! **pinned links**, pin its maps, adopt existing pins on the next start, and remove everything
//! on request.
//!
//! Pin layout under the bpffs directory (`--bpffs`, e.g. `/sys/fs/bpf/tagger`):
//!
//! ```text
//! <dir>/maps/<MAP NAME>     every map of tagger-common's ALL_MAPS
//! <dir>/links/<program>     one cgroup link per program of PROGRAMS
//! ```
//!
//! The kernel creates pins with mode 0600; the directories are created 0700.
//!
//! Because links and maps are pinned, programs stay attached and maps stay filled when the
//! process that installed them exits; a later process opens the same pins ([`Datapath::open`]).

mod tables;

use std::{
    fs, io,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{CgroupAttachMode, Program, ProgramError, links::FdLink},
};
pub use tables::{Access, CounterSnapshot, ServiceStat, Tables};
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

    /// Map pins that do not exist.
    #[must_use]
    pub fn missing_maps(&self) -> Vec<&'static str> {
        ALL_MAPS.into_iter().filter(|m| !self.map(m).exists()).collect()
    }

    /// Link pins that do not exist.
    #[must_use]
    pub fn missing_links(&self) -> Vec<&'static str> {
        PROGRAMS.into_iter().filter(|p| !self.link(p).exists()).collect()
    }
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
}

/// The pinned datapath: its layout and typed access to its maps.
#[derive(Debug)]
pub struct Datapath {
    layout: PinLayout,
    tables: Tables,
}

impl Datapath {
    /// Installs the datapath on `cgroup` with pins under `bpffs_dir`, or adopts it if it is
    /// already there. Never detaches or flushes anything: on a restart the running datapath
    /// keeps serving throughout. Missing links (an interrupted earlier install) are attached,
    /// reusing the pinned maps, so a partial install heals instead of being duplicated.
    pub fn install(bpffs_dir: &Path, cgroup: &Path) -> Result<(Self, Installed)> {
        let layout = PinLayout::new(bpffs_dir);
        check_bpffs(bpffs_dir)?;
        let cgroup = CgroupRef::open(cgroup)?;
        for dir in [layout.root().to_owned(), layout.maps_dir(), layout.links_dir()] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let missing_links = layout.missing_links();
        let installed = if missing_links.is_empty() && layout.missing_maps().is_empty() {
            Installed::Adopted
        } else {
            attach(&layout, &cgroup, &missing_links)?;
            Installed::Attached { programs: missing_links }
        };
        let datapath = Self::open(bpffs_dir)?;
        Ok((datapath, installed))
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
        Ok(Self { layout, tables })
    }

    /// Removes every link pin (detaching the programs) and every map pin, then the directory.
    /// Pins that are already gone are fine; anything else that is not tagger's is left alone.
    pub fn uninstall(bpffs_dir: &Path) -> Result<()> {
        let layout = PinLayout::new(bpffs_dir);
        // Links first: once they are gone no program reads the maps. Each link is detached
        // explicitly before its pin goes, because the kernel releases an unpinned link
        // asynchronously.
        for program in PROGRAMS {
            let pin = layout.link(program);
            if let Ok(fd) = crate::sys::obj_get(&pin, 0) {
                use std::os::fd::AsFd as _;
                if let Err(e) = crate::sys::link_detach(fd.as_fd()) {
                    log::warn!("detaching {}: {e}; removing its pin detaches it shortly", pin.display());
                }
            }
            remove_pin(&pin)?;
        }
        for map in ALL_MAPS {
            remove_pin(&layout.map(map))?;
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

/// Loads the object (reusing pinned maps, pinning new ones) and attaches `programs`.
fn attach(layout: &PinLayout, cgroup: &CgroupRef, programs: &[&'static str]) -> Result<()> {
    let map_paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, layout.map(m))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(DATAPATH_OBJECT).map_err(Box::new)?;
    let cgroup_dir = fs::File::open(&cgroup.path).map_err(|e| Error::io(&cgroup.path, e))?;
    for &name in programs {
        let program = ebpf.program_mut(name).ok_or_else(|| Error::Invalid {
            what: "datapath object",
            reason: format!("program {name} missing"),
        })?;
        let fd_link = load_and_attach(program, &cgroup_dir)
            .map_err(|source| Error::Program { program: name, source: Box::new(source) })?;
        let path = layout.link(name);
        fd_link.pin(&path).map_err(|e| Error::Pin { path: path.clone(), reason: e.to_string() })?;
    }
    Ok(())
}

/// Loads one cgroup program and attaches it with a link (kernel >= 5.7 for every type used).
fn load_and_attach(program: &mut Program, cgroup_dir: &fs::File) -> Result<FdLink, ProgramError> {
    macro_rules! attach_as {
        ($p:expr) => {{
            $p.load()?;
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

fn remove_pin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}
