//! The datapath installed on a test cgroup with pins in a test-owned bpffs directory; uninstalled
//! (links unpinned, so detached; maps unpinned) on drop.

use std::path::{Path, PathBuf};

use tagger::datapath::{Datapath, Installed, check_bpffs};

use crate::unique_name;

/// Where the tests pin: bpffs must be mounted here.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at [`BPFFS`] if it is not mounted yet (a fresh machine has none).
pub fn ensure_bpffs() {
    if check_bpffs(Path::new(BPFFS)).is_err() {
        crate::run("mount", &["-t", "bpf", "bpf", BPFFS]);
    }
}

/// A datapath owned by one test.
#[derive(Debug)]
pub struct TestDatapath {
    /// The installed datapath.
    pub dp: Datapath,
    dir: PathBuf,
}

impl TestDatapath {
    /// Installs on `cgroup` with a fresh pin directory.
    #[must_use]
    pub fn install(cgroup: &Path) -> Self {
        ensure_bpffs();
        let dir = Path::new(BPFFS).join(unique_name("pins"));
        let (dp, installed) = Datapath::install(&dir, cgroup).unwrap_or_else(|e| {
            let _ = Datapath::uninstall(&dir);
            panic!("installing the datapath: {e}")
        });
        assert!(
            matches!(installed, Installed::Attached { ref programs } if programs.len() == tagger::datapath::PROGRAMS.len()),
            "{installed:?}"
        );
        Self { dp, dir }
    }

    /// The pin directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        if let Err(e) = Datapath::uninstall(&self.dir) {
            eprintln!("cleanup: {e}");
        }
    }
}
