//! A cgroup v1-only host: the agent refuses to start with a message that says so, and nothing is
//! pinned or attached. Only a host that mounts no cgroup2 at all can show this, so the test is
//! ignored on a normal run; `cargo xtask test` boots the kernel matrix's guests a second time
//! with cgroup v1 hierarchies only (cpu,cpuacct, memory, pids) and runs it there with
//! `--ignored`.

use std::{path::Path, time::Duration};

use tagger_tests::agent::{AgentProcess, workspace_bin};

/// Whether this mount namespace has a cgroup2 mount, and whether it has a cgroup v1 one.
fn cgroup_mounts() -> (bool, bool) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let types: Vec<&str> =
        info.lines().filter_map(|l| l.split_once(" - ")?.1.split_whitespace().next()).collect();
    (types.contains(&"cgroup2"), types.contains(&"cgroup"))
}

#[test]
#[ignore = "needs a cgroup v1-only host: cargo xtask test boots one in qemu (see docs/RELIABILITY.md)"]
fn a_cgroup_v1_only_host_is_refused_clearly_and_nothing_is_attached() {
    let (v2, v1) = cgroup_mounts();
    assert!(!v2 && v1, "not a cgroup v1-only host (cgroup2 mounted: {v2}, cgroup v1 mounted: {v1})");
    let dir = std::env::temp_dir().join(format!("tagger-v1-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("cluster.yaml");
    std::fs::write(&source, "").unwrap();
    let bpffs = Path::new("/sys/fs/bpf/tagger-v1-test");
    let pins_before: Vec<_> = std::fs::read_dir("/sys/fs/bpf").unwrap().flatten().map(|e| e.path()).collect();

    // The default --cgroup-root (/sys/fs/cgroup, here a tmpfs holding the v1 hierarchies), and a
    // v1 hierarchy itself.
    for root in [None, Some("/sys/fs/cgroup/cpu,cpuacct")] {
        let mut args: Vec<String> = ["--source", &format!("file:{}", source.display()), "--node-name", "n"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.extend(["--bpffs".into(), bpffs.display().to_string()]);
        if let Some(root) = root {
            args.extend(["--cgroup-root".into(), root.into()]);
        }
        let log = dir.join("agent.log");
        let mut agent = AgentProcess::start(&args, &[], &log);
        assert_eq!(agent.wait_exit(Duration::from_mins(1)), Some(1), "{}", agent.log());
        let text = agent.log();
        assert!(text.contains("cgroup v1-only host"), "{root:?}: {text}");
        assert!(text.contains("--cgroup-root") || text.contains("cgroup"), "{text}");
        // Nothing pinned, nothing half-attached: bpffs is as it was.
        assert!(!bpffs.exists(), "{} was created", bpffs.display());
        let pins_after: Vec<_> =
            std::fs::read_dir("/sys/fs/bpf").unwrap().flatten().map(|e| e.path()).collect();
        assert_eq!(pins_before, pins_after);
    }

    // The CLI names the missing datapath instead of failing obscurely.
    let out = std::process::Command::new(workspace_bin("tagger"))
        .arg("--bpffs")
        .arg(bpffs)
        .arg("status")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(!text.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
