//! Removes what an interrupted test run left behind: network namespaces, cgroups and bpffs pin
//! directories whose names start with the tests' prefix (`tgt-<pid>-`) and whose process is
//! gone. Nothing else is touched: another test run on the same machine keeps its resources.

use std::{fs, path::Path};

use crate::shell::{output, status};

/// The tests' prefix (tagger_tests::PREFIX).
const PREFIX: &str = "tgt-";

/// Whether `name` is a leftover: the tests' prefix, then the pid of a process that is gone.
/// Names without a pid are not ours to judge and are kept.
fn is_leftover(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else { return false };
    let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { return false };
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes every leftover of a test process that is gone.
pub fn leftovers() {
    let mut removed = 0;
    for line in output("ip", &["netns", "list"]).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if is_leftover(name) {
            let _ = std::process::Command::new("ip").args(["netns", "del", name]).status();
            removed += 1;
        }
    }
    for mount in cgroup2_mounts() {
        for entry in fs::read_dir(&mount).into_iter().flatten().flatten() {
            if is_leftover(&entry.file_name().to_string_lossy()) {
                remove_cgroup_tree(&entry.path());
                removed += 1;
            }
        }
    }
    for entry in fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        if is_leftover(&entry.file_name().to_string_lossy()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_dead_processes_are_leftovers() {
        assert!(!is_leftover(&format!("tgt-{}-0-node", std::process::id())), "this process is alive");
        assert!(is_leftover("tgt-4294967295-3-pins"), "no such pid");
        assert!(!is_leftover("tgt-demo"), "no pid: not ours to judge");
        assert!(!is_leftover("kube-4294967295-0"));
    }
}
