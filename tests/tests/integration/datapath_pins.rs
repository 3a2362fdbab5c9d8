//! Pinned links and maps: the datapath outlives the process that installed it, a later process
//! adopts the pins without detaching anything, and uninstall really detaches.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use tagger::{
    datapath::Datapath,
    net::{Proto, backend, frontend_key},
};
use tagger_common::{Service, lane_id};
use tagger_tests::{
    backend::BackendServer,
    cgroup::TestCgroup,
    client::{Attempt, LoopClient, Mode, attempts, testpod_bin},
    datapath::{BPFFS, ensure_bpffs},
    require_root,
    topology::Node,
    unique_name,
};

/// Removes a pin directory on drop, whatever happened.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = Datapath::uninstall(&self.0);
    }
}

/// A node with a gray backend pod serving on 8080, a caller pod, a cgroup root with the
/// caller's pod cgroup, and a pin directory.
/// Fields drop in order: pins (detaching) first, the node last.
struct Fixture {
    pins: PinDir,
    pod_cgroup: PathBuf,
    root: TestCgroup,
    caller_pod: tagger_tests::topology::Pod,
    _server: BackendServer,
    backend_pod: tagger_tests::topology::Pod,
    _node: Node,
}

impl Fixture {
    fn new() -> Self {
        require_root();
        ensure_bpffs();
        let mut node = Node::new();
        let backend_pod = node.add_pod("gray-backend");
        let server = BackendServer::start(&backend_pod, "gray-backend", 8080);
        let caller_pod = node.add_pod("gray-caller");
        let root = TestCgroup::new(&unique_name("root"));
        let pod_cgroup = root.child("kubepods/burstable/podabc");
        let pins = PinDir(Path::new(BPFFS).join(unique_name("pins")));
        Self { pins, pod_cgroup, root, caller_pod, _server: server, backend_pod, _node: node }
    }

    /// Writes what the agent's first complete pass would: the caller's pod in lane gray, and
    /// `vip` (Service 1) steering gray callers to the gray backend pod; then arms the lease.
    fn steer_to_gray(&self, dp: &mut Datapath, vip: SocketAddr) {
        let t = dp.tables_mut();
        let cg = TestCgroup::resolve(&self.pod_cgroup);
        t.register_pod(cg.id, cg.pod_entry(lane_id("gray"))).unwrap();
        let gray_backend = SocketAddr::new(self.backend_pod.ip4.into(), 8080);
        t.replace_backends(1, lane_id("gray"), &[backend(gray_backend)]).unwrap();
        t.upsert_frontend(&frontend_key(vip, Proto::Tcp), Service { svc_id: 1, flags: 0 }).unwrap();
        tagger_tests::datapath::arm_lease(t);
    }
}

/// Installs (or adopts) from a separate process that exits at once; returns what it printed.
fn install_in_other_process(pins: &Path, cgroup: &Path) -> String {
    let out = Command::new(testpod_bin()).arg("install").arg(pins).arg(cgroup).output().expect("run testpod");
    assert!(out.status.success(), "install failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn pins_outlive_the_installer_and_a_restart_adopts_them_with_no_failed_connection() {
    let f = Fixture::new();
    let (caller_pod, root, pod_cgroup, pins) = (&f.caller_pod, &f.root, &f.pod_cgroup, &f.pins);

    // 1. Another process installs and exits: nothing of ours holds a link or map fd.
    let first = install_in_other_process(&pins.0, root.path());
    assert!(first.starts_with("Attached"), "{first}");

    // 2. Fill the maps through their pins only.
    let vip: SocketAddr = "10.96.3.1:80".parse().unwrap();
    f.steer_to_gray(&mut Datapath::open(&pins.0).expect("open pins"), vip);
    for a in attempts(pod_cgroup, &caller_pod.ns, Mode::Tcp, vip, 10) {
        assert_eq!(a.reply(), "gray-backend");
    }

    // 3. Restarts adopt the pins while a client connects in a tight loop.
    let client = LoopClient::start(pod_cgroup, &caller_pod.ns, vip);
    for _ in 0..5 {
        let again = install_in_other_process(&pins.0, root.path());
        assert_eq!(again, "Adopted");
    }
    let summary = client.finish();
    assert!(summary.ok > 0, "{summary:?}");
    assert_eq!(summary.failed, 0, "{summary:?}");
    let dp = Datapath::open(&pins.0).unwrap();
    assert_eq!(dp.tables().pods().unwrap().len(), 1, "adoption must not flush the maps");

    // 4. A lost link pin (interrupted install) is re-attached; the maps are reused, not emptied.
    std::fs::remove_file(dp.layout().link("connect4")).unwrap();
    let healed = install_in_other_process(&pins.0, root.path());
    assert_eq!(healed, r#"Attached { programs: ["connect4"] }"#);
    for a in attempts(pod_cgroup, &caller_pod.ns, Mode::Tcp, vip, 10) {
        assert_eq!(a.reply(), "gray-backend");
    }

    // 5. Uninstall detaches: the VIP is no longer rewritten (and is unroutable here).
    drop(dp);
    Datapath::uninstall(&pins.0).unwrap();
    assert!(!pins.0.exists());
    for a in attempts(pod_cgroup, &caller_pod.ns, Mode::Tcp, vip, 3) {
        assert!(matches!(a, Attempt::Err { errno: libc::ENETUNREACH, .. }), "{a:?}");
    }
}

#[test]
fn install_refuses_a_directory_outside_bpffs_and_a_missing_cgroup() {
    require_root();
    ensure_bpffs();
    let root = TestCgroup::new(&unique_name("root"));
    let not_bpffs = std::env::temp_dir().join(unique_name("pins"));
    let err = Datapath::install(&not_bpffs, root.path()).unwrap_err();
    assert!(err.to_string().contains("not on a bpf filesystem"), "{err}");
    assert!(!not_bpffs.exists(), "nothing may be created on refusal");

    let pins = PinDir(Path::new(BPFFS).join(unique_name("pins")));
    let err = Datapath::install(&pins.0, Path::new("/sys/fs/cgroup/unified/tgt-does-not-exist")).unwrap_err();
    assert!(err.to_string().contains("tgt-does-not-exist"), "{err}");
    assert!(!pins.0.exists(), "nothing may be pinned when the cgroup is missing");
}

/// Program id behind each link pin.
fn linked_programs(pins: &Path) -> Vec<(u32, u32)> {
    tagger::datapath::PROGRAMS
        .iter()
        .map(|p| {
            let info = tagger::cli::links::link_info(&pins.join("links").join(p)).unwrap();
            (info.link_id, info.program_id)
        })
        .collect()
}

#[test]
fn an_upgrade_to_a_new_map_layout_switches_programs_with_no_failed_connection() {
    let f = Fixture::new();
    let (caller_pod, root, pod_cgroup, pins) = (&f.caller_pod, &f.root, &f.pod_cgroup, &f.pins);
    let vip: SocketAddr = "10.96.3.2:80".parse().unwrap();
    // As the agent's first complete pass does, before the switch.
    let fill = |dp: &mut Datapath| f.steer_to_gray(dp, vip);

    let first = install_in_other_process(&pins.0, root.path());
    assert!(first.starts_with("Attached"), "{first}");
    fill(&mut Datapath::open(&pins.0).unwrap());
    tagger_tests::datapath::age_pins(&pins.0);
    let before = linked_programs(&pins.0);
    let client = LoopClient::start(pod_cgroup, &caller_pod.ns, vip);

    // The new build loads beside the old one: new, empty maps; the old programs keep serving
    // from theirs.
    let (mut dp, installed) = Datapath::install(&pins.0, root.path()).unwrap();
    let tagger::datapath::Installed::Upgrading { from, attached, replacing } = installed else {
        panic!("expected an upgrade, got {installed:?}")
    };
    assert_eq!(
        (from.as_deref(), attached.len(), replacing.len()),
        (Some("00000000000000aa"), 0, tagger::datapath::PROGRAMS.len())
    );
    assert!(dp.tables().pods().unwrap().is_empty(), "the new layout's maps start empty");
    assert_eq!(linked_programs(&pins.0), before, "nothing switches before the maps are filled");
    std::thread::sleep(std::time::Duration::from_millis(200));

    // Filled, then switched: same links, new programs, old maps gone, the build recorded.
    fill(&mut dp);
    assert_eq!(dp.finish_upgrade().unwrap().len(), tagger::datapath::PROGRAMS.len());
    let after = linked_programs(&pins.0);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.0, a.0, "the link stays");
        assert_ne!(b.1, a.1, "the program is replaced");
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let summary = client.finish();
    assert!(summary.ok > 0, "{summary:?}");
    assert_eq!(summary.failed, 0, "{summary:?}");
    assert_eq!(summary.replies.keys().collect::<Vec<_>>(), ["gray-backend"], "{summary:?}");
    let names: Vec<String> = std::fs::read_dir(pins.0.join("maps"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    let mut names = names;
    names.sort();
    let mut want: Vec<String> = tagger_common::ALL_MAPS.iter().map(|m| (*m).to_owned()).collect();
    want.sort();
    assert_eq!(names, want, "exactly this build's maps; the old layout's pins removed");
    assert_eq!(dp.layout().recorded_versions(), [tagger::datapath::object_version()]);
    drop(dp);
    assert_eq!(install_in_other_process(&pins.0, root.path()), "Adopted");
}

/// Every pin is readable and writable by its owner (root) only, and every pin directory is 0700:
/// no other user on the node can open a map to read the cluster's layout or rewrite it.
#[test]
fn pins_are_created_0600_in_0700_directories_owned_by_root() {
    use std::os::unix::fs::MetadataExt as _;

    require_root();
    let root = TestCgroup::new(&unique_name("root"));
    let dp = tagger_tests::datapath::TestDatapath::install(root.path());
    let mut pins = 0;
    let mut stack = vec![dp.dir().to_owned()];
    while let Some(dir) = stack.pop() {
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700, "{}", dir.display());
        assert_eq!(meta.uid(), 0, "{}", dir.display());
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                assert_eq!(meta.mode() & 0o7777, 0o600, "{}", entry.path().display());
                assert_eq!(meta.uid(), 0, "{}", entry.path().display());
                pins += 1;
            }
        }
    }
    // Every link pin and every map.
    assert!(pins > tagger::datapath::PROGRAMS.len(), "only {pins} pins under {}", dp.dir().display());
}

/// A pin directory that exists already with a looser mode (kubelet creates a hostPath
/// `DirectoryOrCreate` 0755) is made private at install, and at every later start.
#[test]
fn an_existing_pin_directory_is_made_private() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    require_root();
    ensure_bpffs();
    let root = TestCgroup::new(&unique_name("root"));
    let pins = PinDir(Path::new(BPFFS).join(unique_name("pins")));
    std::fs::create_dir(&pins.0).unwrap();
    std::fs::set_permissions(&pins.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = || std::fs::metadata(&pins.0).unwrap().mode() & 0o7777;
    let (dp, _) = Datapath::install(&pins.0, root.path()).expect("install");
    assert_eq!(mode(), 0o700, "made private at install");
    drop(dp);
    std::fs::set_permissions(&pins.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (_dp, installed) = Datapath::install(&pins.0, root.path()).expect("adopt");
    assert_eq!(format!("{installed:?}"), "Adopted");
    assert_eq!(mode(), 0o700, "and again when adopted");
}

/// The cgroups (ids) the pinned links are attached at, one per program.
fn link_cgroups(pins: &Path) -> Vec<u64> {
    tagger::datapath::PROGRAMS
        .iter()
        .map(|p| {
            tagger::sys::link_info(&pins.join("links").join(p)).unwrap().cgroup.expect("a cgroup link").0
        })
        .collect()
}

/// An upgrade that also moves the attach point (a release that attached at the cgroup root,
/// replaced by one attaching at kubelet's pods cgroup): the old programs keep serving at the root
/// until the new maps are filled, then each is attached below and only then detached above.
#[test]
fn an_upgrade_that_moves_the_attach_cgroup_waits_for_the_maps_and_fails_no_connection() {
    let f = Fixture::new();
    let (caller_pod, root, pod_cgroup, pins) = (&f.caller_pod, &f.root, &f.pod_cgroup, &f.pins);
    let vip: SocketAddr = "10.96.3.3:80".parse().unwrap();
    // As the agent's first complete pass does, before the switch.
    let fill = |dp: &mut Datapath| f.steer_to_gray(dp, vip);
    let kubepods = root.path().join("kubepods");
    let (root_id, kubepods_id) = (TestCgroup::resolve(root.path()).id, TestCgroup::resolve(&kubepods).id);

    assert!(install_in_other_process(&pins.0, root.path()).starts_with("Attached"));
    fill(&mut Datapath::open(&pins.0).unwrap());
    tagger_tests::datapath::age_pins(&pins.0);
    let client = LoopClient::start(pod_cgroup, &caller_pod.ns, vip);

    let (mut dp, installed) = Datapath::install(&pins.0, &kubepods).unwrap();
    assert!(matches!(installed, tagger::datapath::Installed::Upgrading { .. }), "{installed:?}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(link_cgroups(&pins.0).iter().all(|&c| c == root_id), "nothing moves before the maps are filled");
    fill(&mut dp);
    assert_eq!(dp.finish_upgrade().unwrap().len(), tagger::datapath::PROGRAMS.len());
    assert!(link_cgroups(&pins.0).iter().all(|&c| c == kubepods_id), "every link moved");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let summary = client.finish();
    assert!(summary.ok > 0 && summary.failed == 0, "{summary:?}");
    assert_eq!(summary.replies.keys().collect::<Vec<_>>(), ["gray-backend"], "{summary:?}");
    drop(dp);
    assert_eq!(install_in_other_process(&pins.0, &kubepods), "Adopted");
}

/// A move interrupted after the new link was attached elsewhere (a `moving-` pin at a cgroup
/// that is no longer asked for) is undone: that link is detached and removed, the others move
/// to the cgroup asked for. One interrupted with its `moving-` link at the cgroup asked for is
/// finished.
#[test]
fn a_leftover_move_is_undone_or_finished() {
    let f = Fixture::new();
    let (root, pins) = (&f.root, &f.pins);
    let kubepods = root.path().join("kubepods");
    assert!(install_in_other_process(&pins.0, &kubepods).starts_with("Attached"));
    // Leave a link at kubepods under the name of a move in progress, and attach at the root.
    let links = pins.0.join("links");
    std::fs::rename(links.join("connect4"), links.join("moving-connect4")).unwrap();
    let (_dp, installed) = Datapath::install(&pins.0, root.path()).unwrap();
    assert!(
        matches!(&installed, tagger::datapath::Installed::Moved { moved, attached, .. }
            if attached == &["connect4"] && moved.len() == tagger::datapath::PROGRAMS.len() - 1),
        "{installed:?}"
    );
    assert!(!links.join("moving-connect4").exists());
    assert!(link_cgroups(&pins.0).iter().all(|&c| c == TestCgroup::resolve(root.path()).id));

    // A move interrupted after the new link was attached where it is still asked for is
    // finished: the `moving-` link takes the program's pin, nothing is attached anew.
    let before = tagger::sys::link_info(&links.join("connect4")).unwrap().link_id;
    std::fs::rename(links.join("connect4"), links.join("moving-connect4")).unwrap();
    assert_eq!(install_in_other_process(&pins.0, root.path()), "Adopted");
    assert!(!links.join("moving-connect4").exists());
    assert_eq!(tagger::sys::link_info(&links.join("connect4")).unwrap().link_id, before);
}

/// `TAGGER_INB_V1` (a plain per-CPU hash) became the LRU `TAGGER_INB_V2`: the pins of a build
/// with the old inbound map upgrade to the new one, and the old pin is removed at the switch,
/// never reused under the new name.
#[test]
fn an_upgrade_replaces_the_plain_inbound_map_with_the_lru_one() {
    let f = Fixture::new();
    let first = install_in_other_process(&f.pins.0, f.root.path());
    assert!(first.starts_with("Attached"), "{first}");
    let maps = f.pins.0.join("maps");
    let new = maps.join(tagger_common::MAP_INBOUND);
    let old = maps.join("TAGGER_INB_V1");
    std::fs::rename(&new, &old).unwrap();
    for e in std::fs::read_dir(&f.pins.0).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("object-") {
            std::fs::rename(e.path(), f.pins.0.join("object-00000000000000aa")).unwrap();
        }
    }
    let (mut dp, installed) = Datapath::install(&f.pins.0, f.root.path()).unwrap();
    assert!(matches!(installed, tagger::datapath::Installed::Upgrading { .. }), "{installed:?}");
    assert!(new.exists() && old.exists(), "the old programs keep their map until the switch");
    dp.finish_upgrade().unwrap();
    assert!(!old.exists(), "the old inbound map's pin is removed at the switch");
    let map = aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&new).unwrap()).unwrap();
    assert!(matches!(map, aya::maps::Map::PerCpuLruHashMap(_)), "{map:?}");
}
