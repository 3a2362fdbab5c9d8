//! Network namespace guard.

use std::{fs::File, os::fd::AsRawFd as _, path::PathBuf};

use crate::run;

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with loopback up. Nothing routes out of it.
    #[must_use]
    pub fn new(name: &str) -> Self {
        run("ip", &["netns", "add", name]);
        let ns = Self { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file under /var/run/netns.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Moves the calling thread into this namespace (threads only: the process stays put).
    /// Sockets created afterwards belong to the namespace for their whole life.
    pub fn enter_current_thread(&self) {
        let f = File::open(self.path()).unwrap_or_else(|e| panic!("open {}: {e}", self.path().display()));
        // SAFETY: setns on a valid netns fd affects only the calling thread's network namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({}): {}", self.name, std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A container runtime's directory of pinned pod network namespaces (what the agent's
/// `--netns-dir` names), holding links to some test namespaces' pins (`cni-<name>`); removed on
/// drop.
#[derive(Debug)]
pub struct NetnsDir(crate::agent::TempDir);

impl NetnsDir {
    /// A directory with these namespaces.
    #[must_use]
    pub fn of(namespaces: &[&Netns]) -> Self {
        let dir = crate::agent::TempDir::new();
        for ns in namespaces {
            std::os::unix::fs::symlink(ns.path(), dir.0.join(format!("cni-{}", ns.name())))
                .expect("link a namespace into the directory");
        }
        Self(dir)
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &std::path::Path {
        &self.0.0
    }
}
