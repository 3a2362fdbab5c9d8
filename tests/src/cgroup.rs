//! Cgroup guard: a cgroup v2 directory the test created, removed (deepest first) on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use tagger::cgroup::{CgroupRef, cgroup2_mount};

/// A cgroup v2 directory tree created by a test.
#[derive(Debug)]
pub struct TestCgroup {
    root: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 mount>/<name>`.
    #[must_use]
    pub fn new(name: &str) -> Self {
        let mount = cgroup2_mount().expect("cgroup v2 must be mounted for the kernel tests");
        let root = mount.join(name);
        fs::create_dir(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        Self { root }
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Creates a descendant (e.g. `kubepods/burstable/pod<uid>/ctr`) and returns its path.
    #[must_use]
    pub fn child(&self, rel: &str) -> PathBuf {
        let p = self.root.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// Id and level of a descendant.
    #[must_use]
    pub fn resolve(path: &Path) -> CgroupRef {
        CgroupRef::open(path).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Removes a cgroup tree bottom-up. Processes still inside (ours, already exited but not yet
/// reaped by the kernel) make rmdir fail with EBUSY for a moment, so retry briefly.
pub fn remove_tree(root: &Path) {
    let mut dirs = Vec::new();
    collect(root, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        for _ in 0..50 {
            match fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect(&e.path(), out);
            }
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_tree(&self.root);
    }
}
