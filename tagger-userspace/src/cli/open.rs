//! Opening the pinned datapath read-only, with errors that say which pin is missing or
//! unreadable and what to do about it.

use std::{io, path::Path};

use anyhow::anyhow;

use crate::datapath::{Datapath, PinLayout};

/// Opens every pinned map under `dir` with `BPF_F_RDONLY` ([`Datapath::open_read_only`]): the
/// only way the CLI touches the datapath.
pub fn open_read_only(dir: &Path) -> anyhow::Result<Datapath> {
    check_pin_dir(dir)?;
    Datapath::open_read_only(dir).map_err(|e| {
        let layout = PinLayout::new(dir);
        let missing = layout.missing_maps();
        if missing.is_empty() {
            let hint = if is_permission_error(&e) {
                " (reading pinned maps needs root, or CAP_BPF and access to the pins)"
            } else {
                ""
            };
            anyhow!("cannot read the tagger datapath pinned at {}: {e}{hint}", dir.display())
        } else {
            let paths: Vec<String> = missing.iter().map(|m| layout.map(m).display().to_string()).collect();
            anyhow!(
                "no complete tagger datapath pinned at {}: missing map pin {}; is the agent installed \
                 and running with this --bpffs?",
                dir.display(),
                paths.join(", ")
            )
        }
    })
}

/// The pin directory exists and is readable; otherwise an error naming it.
pub fn check_pin_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(anyhow!("{} is not a directory: use --bpffs DIR (the agent's --bpffs)", dir.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(anyhow!(
            "no tagger datapath pinned at {} (no such directory): is the agent installed? use --bpffs DIR \
             to read another pin directory",
            dir.display()
        )),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            Err(anyhow!("cannot read the tagger pin directory {}: {e} (run as root)", dir.display()))
        }
        Err(e) => Err(anyhow!("cannot read the tagger pin directory {}: {e}", dir.display())),
    }
}

/// Whether an error is, at its root, EPERM or EACCES.
fn is_permission_error(e: &crate::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_is_named_with_a_hint() {
        let err = open_read_only(Path::new("/nonexistent/tagger-cli-test")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/tagger-cli-test"), "{err}");
        assert!(err.contains("is the agent installed"), "{err}");
        assert!(err.contains("--bpffs"), "{err}");
    }

    #[test]
    fn an_empty_directory_names_the_missing_map_pins() {
        let dir = std::env::temp_dir().join(format!("tagger-cli-open-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = open_read_only(&dir).unwrap_err().to_string();
        std::fs::remove_dir(&dir).unwrap();
        assert!(err.contains(&format!("{}/maps/TAGGER_PODS_V1", dir.display())), "{err}");
    }
}
