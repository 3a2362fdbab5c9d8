//! Finding a pod's network namespace, where its sockets can be destroyed.
//!
//! Two ways, tried in this order:
//! - **the pod's processes**: the pids in its cgroup's `cgroup.procs` and their
//!   `/proc/<pid>/ns/net`. Only where the agent shares the host's PID namespace (an agent run on
//!   the host, or a pod with `hostPID`); in the DaemonSet's own PID namespace `cgroup.procs`
//!   lists none of the host's processes.
//! - **the runtime's namespace directory** (`--netns-dir`): containerd and CRI-O pin each pod
//!   sandbox's namespace as a file there (`/var/run/netns/cni-…`), which a read-only hostPath
//!   mount shows the DaemonSet. Nothing in it says which pod a file belongs to, so the sockets
//!   are looked for by cookie (cookies are unique across namespaces) in every namespace of the
//!   directory; where a pod's connection was found is remembered, so later resets of that pod
//!   search one namespace first.
//!
//! Entering a namespace (`setns`) takes `CAP_SYS_ADMIN`; opening the files takes nothing (the
//! directory's bind mounts need no ptrace access check, unlike `/proc/<pid>/ns/net`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// A namespace's identity: the device and inode of its nsfs file.
pub type NsId = (u64, u64);

/// An open network namespace.
#[derive(Debug)]
pub struct Ns {
    /// Where it was found (for messages).
    pub path: PathBuf,
    /// Its identity.
    pub id: NsId,
    /// The open file (`setns` takes it).
    pub file: File,
}

impl Ns {
    /// Opens a namespace file.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let m = file.metadata()?;
        Ok(Self { path: path.to_owned(), id: (m.dev(), m.ino()), file })
    }
}

/// Processes looked at to find a pod's network namespaces.
const MAX_NETNS_PIDS: usize = 64;

/// Pods whose namespace is remembered; beyond this the memory is cleared (it is a hint).
const MAX_LEARNED: usize = 4096;

/// Finds pods' network namespaces (see the module docs).
#[derive(Debug, Default)]
pub struct Finder {
    dir: Option<PathBuf>,
    learned: BTreeMap<u64, NsId>,
}

impl Finder {
    /// A finder that also searches `dir` (`--netns-dir`), if given.
    #[must_use]
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir, learned: BTreeMap::new() }
    }

    /// The namespace directory, if any.
    #[must_use]
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The namespaces of the processes in a pod's cgroup subtree (found below `cgroup_root` by
    /// the cgroup id, the directory's inode number), each once; empty when this agent sees none
    /// of the pod's processes.
    #[must_use]
    pub fn of_processes(cgroup_root: &Path, cgroup_id: u64) -> Vec<Ns> {
        let Some(dir) = crate::cgroup::cgroup_paths(cgroup_root, &[cgroup_id].into()).remove(&cgroup_id)
        else {
            return Vec::new();
        };
        let mut pids = Vec::new();
        collect_pids(&dir, 0, &mut pids);
        let mut seen = BTreeSet::new();
        pids.into_iter()
            .filter_map(|pid| Ns::open(Path::new(&format!("/proc/{pid}/ns/net"))).ok())
            .filter(|ns| seen.insert(ns.id))
            .collect()
    }

    /// The namespace where a connection of this pod was found before.
    #[must_use]
    pub fn learned(&self, pod: u64) -> Option<NsId> {
        self.learned.get(&pod).copied()
    }

    /// Every namespace in the directory, each once (none without a directory).
    #[must_use]
    pub fn all(&self) -> Vec<Ns> {
        let Some(dir) = &self.dir else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        let mut seen = BTreeSet::new();
        paths
            .iter()
            .filter_map(|p| Ns::open(p).ok())
            .filter(|ns| is_netns(ns) && seen.insert(ns.id))
            .collect()
    }

    /// Remembers where a pod's connection was found.
    pub fn learn(&mut self, pod: u64, id: NsId) {
        if self.learned.len() >= MAX_LEARNED && !self.learned.contains_key(&pod) {
            self.learned.clear();
        }
        self.learned.insert(pod, id);
    }

    /// A namespace to probe the reset path in at start: a pod's (the first in the directory),
    /// else the agent's own (the same syscalls, though a pod's may differ in ownership).
    #[must_use]
    pub fn probe_target(&self) -> Option<Ns> {
        self.all().into_iter().next().or_else(|| Ns::open(Path::new("/proc/self/ns/net")).ok())
    }
}

/// Whether an opened file is a network namespace (nsfs). Other files in the directory (a stray
/// regular file) are skipped.
fn is_netns(ns: &Ns) -> bool {
    use std::os::fd::AsFd as _;
    crate::sys::is_netns(ns.file.as_fd())
}

fn collect_pids(dir: &Path, depth: u32, out: &mut Vec<u32>) {
    if out.len() >= MAX_NETNS_PIDS || depth > tagger_common::MAX_CGROUP_LEVEL {
        return;
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(
            procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()).take(MAX_NETNS_PIDS - out.len()),
        );
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(std::result::Result::ok) {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&e.path(), depth + 1, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_yields_namespaces_only_each_once() {
        let dir = std::env::temp_dir().join(format!("tagger-netns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("not-a-namespace"), b"x").unwrap();
        let finder = Finder::new(Some(dir.clone()));
        assert!(finder.all().is_empty(), "a regular file is not a namespace");
        assert!(Finder::new(None).all().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
        let own = Ns::open(Path::new("/proc/self/ns/net")).unwrap();
        assert!(is_netns(&own));
    }

    #[test]
    fn learning_is_bounded() {
        let mut f = Finder::new(None);
        for pod in 0..(MAX_LEARNED as u64 + 10) {
            f.learn(pod, (1, pod));
        }
        assert!(f.learned.len() <= MAX_LEARNED);
        assert_eq!(f.learned.get(&(MAX_LEARNED as u64 + 9)), Some(&(1, MAX_LEARNED as u64 + 9)));
    }
}
