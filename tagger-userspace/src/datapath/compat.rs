//! Checks that pins found under `--bpffs` are this build's before anything is loaded: aya
//! reuses a pinned map by name without comparing it with the object's definition, so a pin of
//! another layout (an unversioned change, or another program's map under our name) would give
//! the programs a map they misread, or a verifier error that names nothing useful.

use std::{
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

use super::{DATAPATH_OBJECT, PinLayout};
use crate::{Error, Result};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// A map's shape: what must match for a program to use a pinned map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    /// `bpf_map_type`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
}

impl std::fmt::Display for MapShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// The leading members of `bpf_map_info`.
#[repr(C)]
#[derive(Default)]
struct RawMapInfo {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The shape of the map pinned at `pin`.
fn pinned_shape(pin: &Path) -> std::io::Result<MapShape> {
    let fd = crate::sys::obj_get(pin, crate::sys::BPF_F_RDONLY)?;
    let mut info = RawMapInfo::default();
    let attr = InfoByFdAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| std::io::Error::other("negative fd"))?,
        info_len: u32::try_from(size_of::<RawMapInfo>()).map_err(|_| std::io::Error::other("size"))?,
        info: (&raw mut info) as u64,
    };
    // SAFETY: the kernel reads `attr` (valid for its size) and writes at most `info_len` bytes
    // into `info`, which we own and which outlives the call.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &raw const attr, size_of_val(&attr)) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(MapShape {
        map_type: info.map_type,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
    })
}

/// The shape of each map of the embedded object, by name.
fn object_shapes() -> Result<Vec<(String, MapShape)>> {
    let obj = aya_obj::Object::parse(DATAPATH_OBJECT)
        .map_err(|e| Error::Invalid { what: "datapath object", reason: e.to_string() })?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            let shape = MapShape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
            };
            (name.clone(), shape)
        })
        .collect())
}

/// Refuses pins this build cannot use: a pinned map whose shape differs from the object's, or
/// a pin (or the pin directory) owned by another user. Nothing is loaded or attached before
/// this passes.
pub fn check_pins(layout: &PinLayout) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let owned = |path: &Path| -> Result<()> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.uid() != euid => Err(Error::Pin {
                path: path.to_owned(),
                reason: format!(
                    "owned by uid {}, not by this process (uid {euid}): not tagger's pins; remove them or use another --bpffs",
                    meta.uid()
                ),
            }),
            _ => Ok(()),
        }
    };
    owned(layout.root())?;
    for (name, want) in object_shapes()? {
        let pin = layout.map(&name);
        if !pin.exists() {
            continue;
        }
        owned(&pin)?;
        let have = pinned_shape(&pin).map_err(|e| Error::Pin {
            path: pin.clone(),
            reason: format!(
                "not a readable BPF map ({e}): not tagger's pin; remove it or use another --bpffs"
            ),
        })?;
        // Capacity may legitimately differ only if the build changed it, which renames the map.
        if have != want {
            return Err(Error::Pin {
                path: pin,
                reason: format!(
                    "pinned map has another layout ({have}) than this build's {name} ({want}): another \
                     program's map, or an unversioned layout change; remove it or use another --bpffs"
                ),
            });
        }
    }
    Ok(())
}
