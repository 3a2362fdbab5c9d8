//! The datapath installed on a test cgroup with pins in a test-owned bpffs directory; uninstalled
//! (links unpinned, so detached; maps unpinned) on drop.

use std::path::{Path, PathBuf};

use tagger::datapath::{Datapath, Installed, Tables, check_bpffs};

use crate::unique_name;

/// Where the tests pin: bpffs must be mounted here.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at [`BPFFS`] if it is not mounted yet (a fresh machine has none).
pub fn ensure_bpffs() {
    if check_bpffs(Path::new(BPFFS)).is_err() {
        crate::run("mount", &["-t", "bpf", "bpf", BPFFS]);
    }
}

/// Every map pin's layout version renamed to `_V0` and the build marker to another hash: the
/// pins of an older build with a different map layout, whose programs still run on those maps.
pub fn age_pins(pins: &Path) {
    let maps = pins.join("maps");
    for e in std::fs::read_dir(&maps).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        let (stem, _version) = name.rsplit_once("_V").expect("versioned map name");
        let old = format!("{stem}_V0");
        std::fs::rename(e.path(), maps.join(old)).unwrap();
    }
    for e in std::fs::read_dir(pins).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("object-") {
            std::fs::rename(e.path(), pins.join("object-00000000000000aa")).unwrap();
        }
    }
}

/// How long [`arm_lease`] arms the datapath lease: far longer than any test.
pub const TEST_LEASE: std::time::Duration = std::time::Duration::from_hours(24);

/// Arms the datapath lease as an agent's first complete pass does, for [`TEST_LEASE`]: a test
/// that writes the maps itself plays the agent, and without a lease the programs steer nothing.
/// Finite, so the programs take the path with the clock read, as under an agent.
///
/// # Panics
/// If the lease cannot be written.
pub fn arm_lease(tables: &mut Tables) {
    let duration = u64::try_from(TEST_LEASE.as_nanos()).expect("ns");
    tables
        .set_lease(tagger_common::Lease::renewed(tagger::sys::monotonic_now_ns(), duration))
        .expect("arming the datapath lease");
}

/// A datapath owned by one test.
#[derive(Debug)]
pub struct TestDatapath {
    /// The installed datapath.
    pub dp: Datapath,
    dir: PathBuf,
}

impl TestDatapath {
    /// Installs on `cgroup` with a fresh pin directory, and arms the lease ([`arm_lease`]).
    #[must_use]
    pub fn install(cgroup: &Path) -> Self {
        ensure_bpffs();
        let dir = Path::new(BPFFS).join(unique_name("pins"));
        let (mut dp, installed) = Datapath::install(&dir, cgroup).unwrap_or_else(|e| {
            let _ = Datapath::uninstall(&dir);
            panic!("installing the datapath: {e}")
        });
        assert!(
            matches!(installed, Installed::Attached { ref programs } if programs.len() == tagger::datapath::PROGRAMS.len()),
            "{installed:?}"
        );
        arm_lease(dp.tables_mut());
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
