//! Fault suite: the datapath and the agent under faults, with live traffic, on the real kernel.
//! Longer soak variants run with `TAGGER_SOAK=1` (see docs/RELIABILITY.md).

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tagger::{datapath::Datapath, net::Proto};
use tagger_tests::{
    agent::{AgentSandbox, fresh_metrics, http_get, set_size, workspace_bin},
    cgroup::TestCgroup,
    client::{LoopClient, Mode, testpod_bin},
    datapath::{BPFFS, TestDatapath, ensure_bpffs},
    fake_api::FakeApiServer,
    monotonic_ns, require_root, run,
    scenario::{Sandbox, replies},
    unique_name,
};

const WAIT: Duration = Duration::from_secs(15);

/// How long after the API dropped a backend a new connection may still reach it: the watch
/// delivery plus one reconcile pass, with room for a loaded 2-CPU machine. The measured worst
/// case is printed.
const GRACE_NS: u64 = 250_000_000;

fn vip() -> SocketAddr {
    "10.96.30.1:80".parse().unwrap()
}

fn soak() -> bool {
    std::env::var_os("TAGGER_SOAK").is_some()
}

/// `loadgen probe … every` in the caller's pod: one `(monotonic ns, reply)` per connection.
struct Probe {
    child: std::process::Child,
}

impl Probe {
    fn start(sb: &AgentSandbox, caller: &str, addr: SocketAddr, secs: u64) -> Self {
        let cgroup = sb.pod_cgroup(caller);
        let mut child = Command::new(workspace_bin("loadgen"))
            .args(["--cgroup", &cgroup.to_string_lossy(), "--netns", sb.netns[caller].ns.name()])
            .args(["probe", &addr.to_string(), "1000", &(secs + 30).to_string(), "every"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn loadgen probe");
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
        assert_eq!(first.trim(), "started");
        Self { child }
    }

    fn finish(mut self) -> Vec<(u64, String)> {
        drop(self.child.stdin.take());
        let mut out = String::new();
        std::io::Read::read_to_string(&mut self.child.stdout.take().expect("stdout"), &mut out)
            .expect("probe output");
        assert!(self.child.wait().expect("wait probe").success(), "probe failed");
        out.lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(t, r)| (t.parse().expect("probe time"), r.to_owned()))
            .collect()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // Only our own child, by its pid, if finish() did not reap it.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Gray endpoints flap between 0 and 2 at 10 Hz while a gray caller connects every
/// millisecond: no connection fails, none reaches a gray backend later than [`GRACE_NS`] after
/// the API removed it, and the final maps equal the API's state.
#[test]
fn gray_endpoints_flapping_at_10_hz_never_reach_a_removed_backend() {
    let secs = if soak() { 60 } else { 10 };
    let api = FakeApiServer::start();
    let mut sb = AgentSandbox::with_service_a(vip(), Some("gray"));
    sb.backend("a-gray2", Some("gray"));
    let all = ["a-base", "a-gray", "a-gray2"].map(str::to_owned).to_vec();
    sb.cluster.services.get_mut("a").unwrap().backends.clone_from(&all);
    sb.publish_to(&api);
    sb.start_agent_on_api(&api);
    sb.wait_for("initial sync", WAIT, |t| set_size(t, vip(), "gray") == Some(2));
    let probe = Probe::start(&sb, "gw", vip(), secs);

    // (time the API dropped the gray endpoints, time it restored them)
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut flips = 0u32;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        let removed_at = monotonic_ns();
        sb.cluster.services.get_mut("a").unwrap().backends = vec!["a-base".to_owned()];
        sb.publish_slices_to(&api);
        std::thread::sleep(Duration::from_millis(50));
        sb.cluster.services.get_mut("a").unwrap().backends.clone_from(&all);
        sb.publish_slices_to(&api);
        gaps.push((removed_at, monotonic_ns()));
        flips += 2;
    }
    // Final state: the gray endpoints present. The maps must converge to it.
    sb.wait_for("final state equals the API's", WAIT, |t| {
        set_size(t, vip(), "gray") == Some(2) && set_size(t, vip(), "base") == Some(1)
    });
    std::thread::sleep(Duration::from_millis(100));
    let replies = probe.finish();

    let failed: Vec<&(u64, String)> = replies.iter().filter(|(_, r)| r.starts_with("error")).collect();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {:?}",
        failed.len(),
        replies.len(),
        &failed[..1]
    );
    let mut worst_late = 0u64;
    let mut gray_in_gaps = 0u64;
    for (t, reply) in &replies {
        if !reply.starts_with("a-gray") {
            continue;
        }
        // The gap this connection began in, if any: the gray endpoints were gone since `from`.
        if let Some((from, _)) = gaps.iter().find(|(from, to)| from <= t && t < to) {
            gray_in_gaps += 1;
            worst_late = worst_late.max(t - from);
        }
    }
    let base = replies.iter().filter(|(_, r)| r == "a-base").count();
    println!(
        "{flips} flips in {secs} s, {} connections ({base} on base), {gray_in_gaps} reached gray after its \
         removal was sent, the latest {:.1} ms after",
        replies.len(),
        Duration::from_nanos(worst_late).as_secs_f64() * 1e3
    );
    assert!(base > 0, "the gray caller never fell back: the flapping did not take effect");
    assert!(
        worst_late <= GRACE_NS,
        "a connection reached a removed gray backend {:.1} ms after its removal",
        Duration::from_nanos(worst_late).as_secs_f64() * 1e3
    );
    assert!(sb.agent.as_mut().unwrap().running(), "agent died:\n{}", sb.agent_log());
}

/// Removes a pin directory on drop (uninstalling what may be there).
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = Datapath::uninstall(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pin_dir() -> PinDir {
    ensure_bpffs();
    PinDir(Path::new(BPFFS).join(unique_name("pins")))
}

/// No link pinned under `pins`: nothing was attached.
fn assert_nothing_attached(pins: &Path) {
    let links: Vec<_> = std::fs::read_dir(pins.join("links")).into_iter().flatten().flatten().collect();
    assert!(links.is_empty(), "links pinned after a refusal: {links:?}");
}

/// Pins that are not this build's are refused with a message that names them, before anything
/// is loaded or attached: a map of another layout under our name, pins owned by another user.
#[test]
fn foreign_pins_are_refused_and_nothing_is_attached() {
    require_root();
    let root = TestCgroup::new(&unique_name("root"));

    let pins = pin_dir();
    std::fs::create_dir_all(pins.0.join("maps")).unwrap();
    let pods = pins.0.join("maps").join(tagger_common::MAP_PODS);
    let p = pods.to_str().unwrap();
    run(
        "bpftool",
        &["map", "create", p, "type", "hash", "key", "8", "value", "4", "entries", "16", "name", "x"],
    );
    let err = Datapath::install(&pins.0, root.path()).unwrap_err().to_string();
    assert!(err.contains(tagger_common::MAP_PODS) && err.contains("another layout"), "{err}");
    assert_nothing_attached(&pins.0);
    assert!(!pins.0.join("maps").join(tagger_common::MAP_CONFIG).exists(), "no map may be created");

    let pins = pin_dir();
    std::fs::create_dir_all(&pins.0).unwrap();
    std::os::unix::fs::chown(&pins.0, Some(65534), Some(65534)).unwrap();
    let err = Datapath::install(&pins.0, root.path()).unwrap_err().to_string();
    assert!(err.contains("owned by uid 65534"), "{err}");
    assert_nothing_attached(&pins.0);
}

/// A read-only bpffs, a directory that is not bpffs, and a cgroup root that is not cgroup v2
/// (as on a v1-only host) are refused with a clear message; nothing is attached.
#[test]
fn unusable_bpffs_or_cgroup_root_is_refused_clearly() {
    require_root();
    let root = TestCgroup::new(&unique_name("root"));

    // Read-only bpffs, mounted in a private mount namespace that dies with the child.
    let mount_point = std::env::temp_dir().join(unique_name("robpf"));
    std::fs::create_dir_all(&mount_point).unwrap();
    let script = format!(
        "mount -t bpf -o ro bpf {mp} && exec {testpod} install {mp}/pins {cg}",
        mp = mount_point.display(),
        testpod = testpod_bin().display(),
        cg = root.path().display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&mount_point);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "install on a read-only bpffs succeeded");
    assert!(stderr.contains("Read-only file system"), "{stderr}");

    // Not bpffs at all.
    let not_bpffs = std::env::temp_dir().join(unique_name("pins"));
    let err = Datapath::install(&not_bpffs, root.path()).unwrap_err().to_string();
    assert!(err.contains("not on a bpf filesystem"), "{err}");

    // A cgroup root that is not on cgroup2 (what a v1-only host offers).
    let pins = pin_dir();
    let v1 = std::env::temp_dir().join(unique_name("cgv1"));
    std::fs::create_dir_all(&v1).unwrap();
    let err = Datapath::install(&pins.0, &v1).unwrap_err().to_string();
    let _ = std::fs::remove_dir(&v1);
    assert!(err.contains("not in a cgroup v2 hierarchy"), "{err}");
    assert!(!pins.0.exists(), "nothing may be pinned");
}

/// Another program attached to the same cgroup hooks (here: a second, independent copy of the
/// datapath, which tagger did not attach): both run, and uninstalling tagger detaches only its
/// own links.
#[test]
fn another_program_on_the_same_hooks_runs_beside_tagger_and_survives_its_uninstall() {
    let mut sb = Sandbox::new();
    let (backend_addr, _) = sb.backend("a");
    let vip: SocketAddr = "10.96.30.2:80".parse().unwrap();
    sb.service(vip, Proto::Tcp, 1, 0, &[("base", &[backend_addr])]);
    let caller = sb.caller("gw", Some("base"));
    let foreign = TestDatapath::install(sb.cgroup.path());
    let foreign_runs = || foreign.dp.tables().counters().unwrap().by_outcome.values().sum::<u64>();

    let before = foreign_runs();
    assert_eq!(replies(&sb.call(&caller, Mode::Tcp, vip, 5)).into_keys().collect::<Vec<_>>(), ["a"]);
    assert!(foreign_runs() > before, "the other program did not run");

    // tagger goes; the other program's links stay attached and keep running.
    Datapath::uninstall(sb.dp.dir()).unwrap();
    for p in tagger::datapath::PROGRAMS {
        assert!(foreign.dir().join("links").join(p).exists());
        tagger::cli::links::link_info(&foreign.dir().join("links").join(p)).expect("foreign link alive");
    }
    let before = foreign_runs();
    let after_uninstall = sb.call(&caller, Mode::Tcp, vip, 3);
    assert!(
        after_uninstall.iter().all(|a| !matches!(a, tagger_tests::client::Attempt::Ok { .. })),
        "{after_uninstall:?}"
    );
    assert!(foreign_runs() > before, "the other program stopped running with tagger's uninstall");
}

/// The API server vanishes without a reset (blackholed) for longer than the agent's watch
/// timeout; meanwhile a Service is deleted. The datapath keeps its last state (no transient
/// fallback, no failed connection), `/readyz` reports the outage, and afterwards the maps equal
/// the API's state.
#[test]
fn a_blackholed_api_server_keeps_the_datapath_and_shows_in_readiness() {
    let api = FakeApiServer::start();
    let mut sb = AgentSandbox::with_service_a(vip(), Some("gray"));
    let stale: SocketAddr = "10.96.30.9:80".parse().unwrap();
    sb.cluster.service("stale", &[stale.ip()], stale.port(), tagger_tests::agent::PORT, &["a-base"]);
    sb.publish_to(&api);
    sb.start_agent_on_api_with(&api, &["--api-timeout", "2", "--metrics-addr", "127.0.0.1:0"]);
    sb.wait_for("initial sync", WAIT, |t| {
        set_size(t, vip(), "gray") == Some(1) && set_size(t, stale, "base") == Some(1)
    });
    let port = sb.metrics_port();
    wait_http(port, "/readyz", 200);
    let client = LoopClient::start(&sb.pod_cgroup("gw"), &sb.netns["gw"].ns, vip());

    api.set_blackholed(true);
    let outage = Instant::now();
    // Let every open watch stream see the blackhole before anything changes (a stream that was
    // already sending could otherwise deliver one more event).
    std::thread::sleep(Duration::from_millis(300));
    for kind in ["services", "endpointslices"] {
        for name in ["stale", "stale-ipv4", "stale-ipv6"] {
            api.delete(kind, tagger_tests::cluster::NAMESPACE, name);
        }
    }
    let (code, body) = wait_http(port, "/readyz", 503);
    assert!(body.contains("does not answer"), "{code} {body}");
    // Longer than the watch timeout (2 s) plus the read timeout's margin.
    std::thread::sleep(Duration::from_secs(9).saturating_sub(outage.elapsed()));
    let kept = Datapath::open(&sb.pins.0)
        .map(|dp| (set_size(dp.tables(), stale, "base"), set_size(dp.tables(), vip(), "gray")));
    assert!(
        matches!(kept, Ok((Some(1), Some(1)))),
        "the datapath must keep its last state during the outage: {kept:?}\n{}",
        sb.agent_log()
    );

    api.set_blackholed(false);
    wait_http(port, "/readyz", 200);
    sb.wait_for("the API's state after the outage", WAIT, |t| set_size(t, stale, "base").is_none());
    let summary = client.finish();
    assert_eq!(summary.failed, 0, "{summary:?}");
    assert!(summary.ok > 50, "{summary:?}");
    assert_eq!(summary.replies.keys().collect::<Vec<_>>(), ["a-gray"], "no transient fallback: {summary:?}");
    let (_, metrics) = fresh_metrics(port);
    assert!(metrics.contains("tagger_agent_api_reachable 1"), "{metrics}");
    assert!(sb.agent_log().contains("does not answer"), "{}", sb.agent_log());
}

/// Waits up to 30 s for `path` to answer `code`; returns the last answer.
fn wait_http(port: u16, path: &str, code: u16) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = http_get(port, path);
        if got.0 == code {
            return got;
        }
        assert!(Instant::now() < deadline, "{path} never answered {code}; last: {got:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent starts on the pins of an older build with another map layout, under a connect
/// loop: the old programs serve until the agent's first complete pass has filled the new maps,
/// then the links switch; no connection fails or leaves its lane.
#[test]
fn the_agent_upgrades_an_older_layout_without_a_failed_connection() {
    // The older build attaches where it is told (the root here): no socket LB before it there.
    let mut sb = AgentSandbox::with_service_a(vip(), Some("gray")).without_cluster_lb();
    sb.start_agent_on_file(&[]);
    sb.wait_for("first agent synced", WAIT, |t| set_size(t, vip(), "gray") == Some(1));
    sb.agent.as_mut().unwrap().kill();
    tagger_tests::datapath::age_pins(&sb.pins.0);
    let client = LoopClient::start(&sb.pod_cgroup("gw"), &sb.netns["gw"].ns, vip());
    std::thread::sleep(Duration::from_millis(200));

    sb.start_agent_on_file(&[]);
    let deadline = Instant::now() + WAIT;
    while !sb.agent_log().contains("upgrade finished") {
        assert!(Instant::now() < deadline, "no upgrade:\n{}", sb.agent_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let summary = client.finish();
    assert_eq!(summary.failed, 0, "{summary:?}");
    assert_eq!(summary.replies.keys().collect::<Vec<_>>(), ["a-gray"], "{summary:?}");
    let stale: Vec<String> = std::fs::read_dir(sb.pins.0.join("maps"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.ends_with("_V0"))
        .collect();
    assert!(stale.is_empty(), "old layout's pins left: {stale:?}");
}
