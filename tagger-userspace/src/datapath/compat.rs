//! Checks that pins found under `--bpffs` are this build's before anything is loaded: aya
//! reuses a pinned map by name without comparing it with the object's definition, so a pin of
//! another layout (an unversioned change, or another program's map under our name) would give
//! the programs a map they misread, or a verifier error that names nothing useful.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use super::{DATAPATH_OBJECT, PinLayout};
use crate::{Error, Result};

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

/// The shape of the map pinned at `pin`.
fn pinned_shape(pin: &Path) -> std::io::Result<MapShape> {
    let info = crate::sys::pinned_map_info(pin)?;
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
    let euid = crate::sys::effective_uid();
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
