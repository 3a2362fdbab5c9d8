//! Removes what an interrupted test run left behind: network namespaces, cgroups and bpffs pin
//! directories whose names start with the tests' prefix (`tgt-`). Nothing else is touched.

use std::{fs, path::Path};

use crate::shell::{output, status};

/// The tests' prefix (tagger_tests::PREFIX).
const PREFIX: &str = "tgt-";

/// Removes every leftover with the tests' prefix.
pub fn leftovers() {
    let mut removed = 0;
    for line in output("ip", &["netns", "list"]).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(PREFIX) {
            let _ = std::process::Command::new("ip").args(["netns", "del", name]).status();
            removed += 1;
        }
    }
    for mount in cgroup2_mounts() {
        for entry in fs::read_dir(&mount).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(PREFIX) {
                remove_cgroup_tree(&entry.path());
                removed += 1;
            }
        }
    }
    for entry in fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(PREFIX) {
            // Removing the link pins detaches the programs; then the maps and directories go.
            let _ = fs::remove_dir_all(entry.path());
            removed += 1;
        }
    }
    status("leftovers removed", &removed.to_string());
}

fn cgroup2_mounts() -> Vec<String> {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

/// rmdir bottom-up (cgroup directories cannot be removed recursively in one call).
fn remove_cgroup_tree(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    let _ = fs::remove_dir(dir);
}
