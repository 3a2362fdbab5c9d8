//! `datapath-bench`: the datapath side of `cargo xtask bench`. Builds a sandboxed node (network
//! namespaces as pods, cgroups, the tagger datapath), runs `loadgen` inside the pods and writes
//! every measurement to a JSON file for the report. Not a test: it asserts nothing about time.
//!
//! What it measures, all between network namespaces it creates:
//! - connection rate and latency (TCP_CRR) with 1 and N clients: direct to the backend pod IP,
//!   through the Service VIP with tagger, through kube-proxy-style iptables DNAT chains in the
//!   caller's namespace, and through haproxy (TCP mode) in the caller's namespace; at 1, 1,000,
//!   10,000 and 65,536 Services;
//! - established connections (TCP_RR, TCP_STREAM): tagger, direct, haproxy;
//! - hook cost: ns per run of each program from the kernel's BPF run-time statistics
//!   (`BPF_ENABLE_STATS` held only for each measurement window) at 10, 10,000 and 65,536
//!   Services, at 10 again at the end, then at 10 with the datapath's debug log on
//!   (`tagger-agent --bpf-log`: the programs reloaded with it, their records drained as the
//!   agent does), and (full runs) a `perf record -a -g` profile of what the programs spend it on;
//! - fallback: the real agent on the fake API server; time from the EndpointSlice event that
//!   removes the last gray endpoint to the first gray caller connection landing on base.
//!
//! Usage: `datapath-bench [--quick] [--out FILE] [--clients N] [--secs S] [--warmup S]
//!         [--rounds R] [--iptables nft|legacy] [--phases crr,rr,hooks,profile,fallback]`
//!
//! Ctrl-C (SIGINT/SIGTERM) stops it between measurements; every namespace, cgroup, pin and
//! child process it created is removed on the way out.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tagger::{
    datapath::{BpfLog, Datapath, Installed, LogRing, PROGRAMS, bpf_log},
    net::{Proto, backend, frontend_key},
};
use tagger_common::{BASE_LANE, MAX_FRONTENDS, Service};
use tagger_tests::{
    agent::{AgentProcess, AgentSandbox, PORT, TempDir, set_size, workspace_bin},
    cgroup::TestCgroup,
    client::HoldClient,
    datapath::ensure_bpffs,
    fake_api::FakeApiServer,
    hold::HoldServer,
    netns::Netns,
    scenario::{Caller, Sandbox},
    unique_name,
};

/// Port of the `loadgen` echo servers in the backend pods.
const ECHO_PORT: u16 = 9000;
/// The benchmarked Service.
const VIP4: &str = "10.96.0.10:80";
const VIP6: &str = "[fd00:96::10]:80";
/// haproxy's listener in the caller's namespace (the sidecar's outbound port).
const HAPROXY: &str = "127.0.0.1:15001";
/// Frontends of the benchmarked Service: TCP and UDP, IPv4 and IPv6.
const BENCH_FRONTENDS: u32 = 4;
/// Service counts, in the order they are built up (the maps only grow during a run).
const LEVELS: [u32; 5] = [1, 10, 1_000, 10_000, 65_536];
/// Service id of the passthrough frontends the hook-cost window publishes (no filler uses it).
const PASSTHROUGH_SVC: u32 = 99;

#[derive(Clone, Debug)]
struct Opts {
    quick: bool,
    out: PathBuf,
    clients: usize,
    secs: f64,
    warmup: f64,
    rounds: usize,
    iptables: String,
    phases: Vec<String>,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let nproc = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let mut o = Opts {
        quick,
        out: PathBuf::from("datapath-bench.json"),
        clients: 2 * nproc,
        secs: 1.0,
        warmup: if quick { 0.25 } else { 0.3 },
        rounds: if quick { 1 } else { 8 },
        iptables: "nft".into(),
        phases: ["crr", "rr", "hooks", "profile", "fallback"].map(String::from).to_vec(),
    };
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--quick" => {
                i += 1;
                continue;
            }
            "--out" => o.out = PathBuf::from(v),
            "--clients" => o.clients = v.parse().expect("--clients N"),
            "--secs" => o.secs = v.parse().expect("--secs S"),
            "--warmup" => o.warmup = v.parse().expect("--warmup S"),
            "--rounds" => o.rounds = v.parse().expect("--rounds R"),
            "--iptables" => {
                assert!(v == "nft" || v == "legacy", "--iptables nft|legacy");
                o.iptables = v;
            }
            "--phases" => o.phases = v.split(',').map(str::to_owned).collect(),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    o
}

fn main() -> std::process::ExitCode {
    isolate_mounts();
    tagger_tests::signals::install("interrupted: tearing the sandbox down…");
    let o = opts();
    match std::panic::catch_unwind(|| run(&o)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) if tagger_tests::signals::interrupted() => {
            eprintln!("\ninterrupted: everything the benchmark created has been removed");
            std::process::ExitCode::from(130)
        }
        Err(_) => {
            eprintln!("\ndatapath-bench FAILED (see above); everything it created has been removed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Moves this process (and so its children) into a private mount namespace with its own
/// `/run/netns` (a tmpfs) and its own bpffs at `/sys/fs/bpf`. Other runs on the machine
/// (`cargo xtask test` removes every `tgt-*` namespace and pin it sees) cannot see, and so
/// cannot remove, this run's namespaces and pins; and when this process ends, its bpffs goes
/// with it (the programs detach), whatever way it ends. Must run while single-threaded.
fn isolate_mounts() {
    let fail = |what: &str| -> ! {
        eprintln!("datapath-bench: {what}: {}", std::io::Error::last_os_error());
        std::process::exit(1)
    };
    // SAFETY: unshare with no shared state yet (no thread has been started).
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        fail("unshare(CLONE_NEWNS) (run as root)");
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (root, none) = (c("/"), c("none"));
    // SAFETY: mount(2) with valid NUL-terminated strings; only this namespace is affected.
    if unsafe {
        libc::mount(
            none.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        fail("make / private");
    }
    let _ = std::fs::create_dir_all("/run/netns");
    for (fstype, dir) in [("tmpfs", "/run/netns"), ("bpf", "/sys/fs/bpf")] {
        let (fs, target) = (c(fstype), c(dir));
        // SAFETY: as above.
        if unsafe { libc::mount(fs.as_ptr(), target.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) } != 0 {
            fail(&format!("mount {fstype} on {dir}"));
        }
    }
}

/// Keeps a process in a cgroup so that nobody else's cleanup can rmdir it while it is empty
/// between measurements (`loadgen hold`, stopped by its guard).
fn hold_cgroup(cgroup: &Path) -> ChildGuard {
    let child = Command::new(workspace_bin("loadgen"))
        .args(["--cgroup", &cgroup.to_string_lossy(), "hold", "0.0.0.0:0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn loadgen hold");
    ChildGuard::new(child, "loadgen hold")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address literal")
}

// ---------------------------------------------------------------------------------------------
// Results

/// What `loadgen` prints for one measurement.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
struct Stats {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    rate: f64,
    mean_us: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
}

/// One load measurement.
#[derive(Debug, Serialize)]
struct Sample {
    /// `crr`, `rr` or `stream`.
    test: &'static str,
    /// `direct`, `tagger`, `iptables`, `haproxy` or `direct-under-tagger`.
    method: &'static str,
    /// Services in the datapath (tagger) or in KUBE-SERVICES (iptables).
    services: u32,
    /// Frontends in tagger's map at the time.
    frontends: u32,
    clients: usize,
    round: usize,
    #[serde(flatten)]
    stats: Stats,
}

/// [`HookSample::pass`] of the control measurement at 10 Services after the largest level.
const PASS_CONTROL: usize = 1;
/// [`HookSample::pass`] of the measurement right after it with the debug log on.
const PASS_BPF_LOG: usize = 2;

/// One program's run-time statistics over one window.
#[derive(Debug, Serialize)]
struct HookSample {
    services: u32,
    /// 0; [`PASS_CONTROL`] or [`PASS_BPF_LOG`] for the measurements at 10 Services at the end.
    pass: usize,
    frontends: u32,
    /// `service` (steered connections to the VIP) or `not-a-service` (direct to a pod IP).
    destination: &'static str,
    window: usize,
    program: &'static str,
    runs: u64,
    run_time_ns: u64,
    ns_per_run: f64,
    /// Entries in the reverse-translation LRU map when the window started.
    revnat_entries: usize,
}

#[derive(Debug, Default, Serialize)]
struct Results {
    config: Value,
    crr: Vec<Sample>,
    rr: Vec<Sample>,
    stream: Vec<Sample>,
    hooks: Vec<HookSample>,
    /// Seconds to load KUBE-SERVICES with iptables-restore, per Service count.
    iptables_load_secs: Vec<(u32, f64)>,
    /// Seconds to write the filler Services into tagger's maps, per Service count.
    tagger_fill_secs: Vec<(u32, f64)>,
    /// One entry per cluster size.
    fallback: Vec<Value>,
    datapath_counters: Option<Value>,
    /// `perf report` of the programs' symbols (phase `profile`: full runs, where perf exists).
    profile: Option<String>,
}

impl Results {
    fn save(&self, path: &Path) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, serde_json::to_string_pretty(self).expect("json")).expect("write results");
    }
}

/// Reads a debug log ring on a thread of its own as the agent does: each record decoded and
/// handed to `tracing` (which has no subscriber here, so nothing is printed). Stops on drop.
struct LogDrain {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogDrain {
    fn start(ring: LogRing) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("runtime");
            rt.block_on(async {
                tokio::select! {
                    read = bpf_log::forward(vec![ring]) => read.expect("reading the debug log"),
                    _ = stopped => {}
                }
            });
        });
        Self { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for LogDrain {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(std::thread::JoinHandle::join);
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child process we started; stopped (stdin closed, then SIGTERM, then SIGKILL, by its pid)
/// and reaped on drop.
struct ChildGuard {
    child: Child,
    stdin: Option<ChildStdin>,
    what: String,
}

impl ChildGuard {
    fn new(mut child: Child, what: &str) -> Self {
        let stdin = child.stdin.take();
        Self { child, stdin, what: what.to_owned() }
    }

    fn stop(&mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(2);
        let pid = i32::try_from(self.child.id()).expect("pid");
        let mut termed = false;
        loop {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            if !termed && Instant::now() + Duration::from_secs(1) > deadline {
                // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                termed = true;
            }
            if Instant::now() > deadline {
                eprintln!("    {} did not stop: SIGKILL", self.what);
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

fn loadgen_cmd(cgroup: &Path, ns: &Netns) -> Command {
    let mut cmd = Command::new(workspace_bin("loadgen"));
    cmd.args(["--cgroup", &cgroup.to_string_lossy(), "--netns", ns.name()]);
    cmd
}

/// Starts `loadgen serve` and waits until it listens.
fn start_server(cgroup: &Path, ns: &Netns, threads: usize) -> ChildGuard {
    let mut child = loadgen_cmd(cgroup, ns)
        .args(["serve", &format!("[::]:{ECHO_PORT}"), &threads.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn loadgen serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "ready", "loadgen serve did not start");
    ChildGuard::new(child, "loadgen serve")
}

/// Runs one `loadgen` client measurement.
fn measure(
    cgroup: &Path,
    ns: &Netns,
    test: &str,
    to: &str,
    clients: usize,
    o: &Opts,
    peername: bool,
) -> Stats {
    tagger_tests::signals::check();
    let mut cmd = loadgen_cmd(cgroup, ns);
    cmd.args([test, to, &clients.to_string(), &o.secs.to_string(), &o.warmup.to_string()]);
    if peername {
        cmd.arg("--peername");
    }
    let out = cmd.stdin(Stdio::null()).output().expect("run loadgen");
    tagger_tests::signals::check();
    assert!(out.status.success(), "loadgen {test} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("loadgen output {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
}

/// Runs a command inside a namespace (`ip netns exec`), panicking with its output on failure.
fn in_ns(ns: &Netns, cmd: &[&str]) -> String {
    let mut args = vec!["netns", "exec", ns.name()];
    args.extend_from_slice(cmd);
    tagger_tests::run("ip", &args)
}

/// Client-side sysctls of the namespace: the whole port range and TIME_WAIT reuse, so that
/// tens of thousands of connections per second do not run out of ports (namespace-local).
fn tune_client_ns(ns: &Netns) {
    in_ns(
        ns,
        &[
            "sh",
            "-c",
            "echo '1024 65535' > /proc/sys/net/ipv4/ip_local_port_range && echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// The sandboxed node

/// Methods of reaching the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    /// Client outside tagger's cgroup, to a backend pod IP.
    Direct,
    /// Client in a tagger pod cgroup, to a backend pod IP (a destination that is not a
    /// Service: the programs run and leave it alone).
    DirectUnderTagger,
    /// Client in a tagger pod cgroup, to the VIP.
    Tagger,
    /// Client outside tagger, to the VIP, DNATed by KUBE-SERVICES chains in its namespace.
    Iptables,
    /// Client outside tagger, to haproxy in its namespace.
    Haproxy,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Direct => "direct",
            Method::DirectUnderTagger => "direct-under-tagger",
            Method::Tagger => "tagger",
            Method::Iptables => "iptables",
            Method::Haproxy => "haproxy",
        }
    }
}

/// The node. Fields drop in order: processes, the iptables pod, the datapath and its cgroups,
/// then the remaining namespaces and files.
struct Bench {
    _servers: Vec<ChildGuard>,
    haproxy: Option<ChildGuard>,
    ipt: Option<(u32, Caller)>,
    sb: Sandbox,
    plain: TestCgroup,
    cli: Caller,
    backends: Vec<Caller>,
    tmp: TempDir,
    fillers: u32,
    o: Opts,
    results: Results,
}

impl Bench {
    fn new(o: &Opts) -> Self {
        eprintln!("==> sandbox: node, 2 backend pods, 1 caller pod, tagger datapath");
        let mut sb = Sandbox::new();
        let plain = TestCgroup::new(&unique_name("plain"));
        // Backend pods; their servers run outside tagger's cgroup.
        let backends = vec![sb.caller("srv-a", None), sb.caller("srv-b", None)];
        let cli = sb.caller("cli", Some("gray"));
        tune_client_ns(&cli.pod.ns);
        let mut servers: Vec<ChildGuard> =
            backends.iter().map(|b| start_server(plain.path(), &b.pod.ns, 4 * o.clients + 4)).collect();
        servers.push(hold_cgroup(&cli.cgroup));
        let echo = |b: &Caller, v6: bool| {
            SocketAddr::new(if v6 { IpAddr::V6(b.pod.ip6) } else { IpAddr::V4(b.pod.ip4) }, ECHO_PORT)
        };
        let v4: Vec<SocketAddr> = backends.iter().map(|b| echo(b, false)).collect();
        let v6: Vec<SocketAddr> = backends.iter().map(|b| echo(b, true)).collect();
        let flags = shape_bench_services(&mut sb, &v4, &v6);
        for proto in [Proto::Tcp, Proto::Udp] {
            sb.service(addr(VIP4), proto, 1, flags, &[("gray", &v4), ("base", &v4)]);
            sb.service(addr(VIP6), proto, 2, flags, &[("gray", &v6), ("base", &v6)]);
        }
        let config = json!({
            "quick": o.quick, "clients": o.clients, "secs": o.secs, "warmup": o.warmup,
            "rounds": o.rounds, "iptables": o.iptables, "backends": 2, "message_bytes": 64,
            "haproxy_threads": 2,
        });
        Self {
            _servers: servers,
            haproxy: None,
            ipt: None,
            sb,
            plain,
            cli,
            backends,
            tmp: TempDir::new(),
            fillers: 0,
            o: o.clone(),
            results: Results { config, ..Results::default() },
        }
    }

    fn frontends(&self) -> u32 {
        BENCH_FRONTENDS + self.fillers
    }

    fn echo(&self, i: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.backends[i].pod.ip4), ECHO_PORT)
    }

    /// Grows tagger's maps to `services` Services: the benchmarked one plus fillers with one
    /// frontend and two (unreachable) backends each, up to the frontend map's capacity.
    fn set_services(&mut self, services: u32) {
        let want = services.saturating_sub(1).min(MAX_FRONTENDS - BENCH_FRONTENDS);
        if want < self.fillers {
            // Shrink (the control measurement at the end): remove the extra fillers.
            let tables = self.sb.dp.dp.tables_mut();
            for i in want..self.fillers {
                let vip = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a64_0000 + i)), 80);
                tables.remove_frontend(&frontend_key(vip, Proto::Tcp)).expect("remove filler frontend");
                tables.remove_backend_set(100 + i, BASE_LANE).expect("remove filler backends");
            }
            self.fillers = want;
            eprintln!("    tagger: back to {} frontends", self.frontends());
            return;
        }
        if want == self.fillers {
            return;
        }
        let started = Instant::now();
        let dead = [backend(addr("10.245.0.1:8080")), backend(addr("10.245.0.2:8080"))];
        let tables = self.sb.dp.dp.tables_mut();
        for i in self.fillers..want {
            let vip = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a64_0000 + i)), 80);
            tables.replace_backends(100 + i, BASE_LANE, &dead).expect("filler backends");
            tables
                .upsert_frontend(&frontend_key(vip, Proto::Tcp), Service { svc_id: 100 + i, flags: 0 })
                .expect("filler frontend");
        }
        self.fillers = want;
        let secs = started.elapsed().as_secs_f64();
        eprintln!("    tagger: {} frontends written in {secs:.2} s", self.frontends());
        self.results.tagger_fill_secs.push((services, secs));
    }

    /// A fresh caller namespace with KUBE-SERVICES for `services` Services in its nat table.
    fn set_iptables(&mut self, services: u32) {
        self.ipt = None;
        let pod = self.sb.caller(&format!("ipt{services}"), None);
        tune_client_ns(&pod.pod.ns);
        // The Service CIDR must be routable for connect() to reach the nat OUTPUT hook (a node
        // has a default route; the sandbox has none). Nothing is behind it on the bridge.
        pod.pod.ns.ip(&["route", "add", "10.96.0.0/16", "dev", "eth0"]);
        let rules = kube_proxy_rules(services, &[self.echo(0), self.echo(1)]);
        let file = self.tmp.0.join(format!("iptables-{services}.rules"));
        std::fs::write(&file, rules).expect("write rules");
        let restore = format!("iptables-{}-restore", self.o.iptables);
        let started = Instant::now();
        in_ns(&pod.pod.ns, &[&restore, &file.to_string_lossy()]);
        let secs = started.elapsed().as_secs_f64();
        let save = format!("iptables-{}-save", self.o.iptables);
        let lines = in_ns(&pod.pod.ns, &[&save, "-t", "nat"]).lines().filter(|l| l.starts_with("-A")).count();
        eprintln!(
            "    iptables ({}): {services} Services, {lines} nat rules loaded in {secs:.2} s",
            self.o.iptables
        );
        self.results.iptables_load_secs.push((services, secs));
        self.ipt = Some((services, pod));
    }

    fn start_haproxy(&mut self) {
        let cfg = self.tmp.0.join("haproxy.cfg");
        let servers: String = (0..self.backends.len()).fold(String::new(), |mut acc, i| {
            let _ = writeln!(acc, "    server s{i} {}", self.echo(i));
            acc
        });
        std::fs::write(
            &cfg,
            format!(
                "global\n    nbthread 2\n    maxconn 8000\n\
                 defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
                 frontend outbound\n    bind {HAPROXY}\n    default_backend svc\n\
                 backend svc\n    balance roundrobin\n{servers}"
            ),
        )
        .expect("haproxy.cfg");
        let log = std::fs::File::create(self.tmp.0.join("haproxy.log")).expect("haproxy log");
        let child = Command::new("ip")
            .args(["netns", "exec", self.cli.pod.ns.name(), "haproxy", "-db", "-f", &cfg.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn haproxy (is it installed? `cargo xtask setup`)");
        // `ip netns exec` execs haproxy in place: the pid is haproxy's. Put it in the plain
        // cgroup, as the client (a sidecar shares the pod; tagger is not in the picture here).
        let _ = std::fs::write(self.plain.path().join("cgroup.procs"), child.id().to_string());
        self.haproxy = Some(ChildGuard::new(child, "haproxy"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !in_ns(&self.cli.pod.ns, &["ss", "-Hltn", "sport = :15001"]).contains("15001") {
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen: {}",
                std::fs::read_to_string(self.tmp.0.join("haproxy.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("    haproxy listening on {HAPROXY} in the caller's namespace");
    }

    /// Where a method's client runs and what it connects to (direct connections alternate
    /// between the two backends, as the other methods' balancing does).
    fn route(&self, m: Method) -> (&Path, &Netns, String) {
        let both = format!("{},{}", self.echo(0), self.echo(1));
        match m {
            Method::Direct => (self.plain.path(), &self.cli.pod.ns, both),
            Method::DirectUnderTagger => (&self.cli.cgroup, &self.cli.pod.ns, both),
            Method::Tagger => (&self.cli.cgroup, &self.cli.pod.ns, VIP4.to_owned()),
            Method::Iptables => {
                let (_, pod) = self.ipt.as_ref().expect("iptables namespace");
                (self.plain.path(), &pod.pod.ns, VIP4.to_owned())
            }
            Method::Haproxy => (self.plain.path(), &self.cli.pod.ns, HAPROXY.to_owned()),
        }
    }

    fn run_load(&mut self, test: &'static str, m: Method, services: u32, clients: usize, round: usize) {
        let (cg, ns, to) = self.route(m);
        let stats = measure(cg, ns, test, &to, clients, &self.o, false);
        eprintln!(
            "    {test:6} {:20} services {services:6} clients {clients:2}: {:>10.0}/s p50 {:7.1} µs p99 {:7.1} µs{}",
            m.name(),
            stats.rate,
            stats.p50_us,
            stats.p99_us,
            if stats.errors > 0 {
                format!("  ({} errors: {})", stats.errors, stats.first_error.as_deref().unwrap_or(""))
            } else {
                String::new()
            }
        );
        let sample =
            Sample { test, method: m.name(), services, frontends: self.frontends(), clients, round, stats };
        match test {
            "crr" => self.results.crr.push(sample),
            "rr" => self.results.rr.push(sample),
            _ => self.results.stream.push(sample),
        }
    }

    /// TCP_CRR for each method, 1 and N clients, interleaved over rounds.
    fn crr(&mut self, services: u32, methods: &[Method]) {
        eprintln!("==> TCP_CRR at {services} Services");
        for round in 0..self.o.rounds {
            for clients in [1, self.o.clients] {
                for &m in methods {
                    self.run_load("crr", m, services, clients, round);
                }
            }
        }
    }

    /// TCP_RR (1 and N clients) and TCP_STREAM (1 client): direct, tagger, haproxy.
    fn rr(&mut self, services: u32) {
        eprintln!("==> TCP_RR and TCP_STREAM on established connections");
        let methods = [Method::Direct, Method::Tagger, Method::Haproxy];
        for round in 0..self.o.rounds {
            for clients in [1, self.o.clients] {
                for m in methods {
                    self.run_load("rr", m, services, clients, round);
                }
            }
            for m in methods {
                self.run_load("stream", m, services, 1, round);
            }
        }
    }

    /// Reloads the programs with the datapath's debug log at `log`, as an agent started with
    /// `--bpf-log` does (an upgrade: each link switched to the new program in place), and, with
    /// the log on, drains their records as the agent does until the returned guard is dropped.
    fn set_bpf_log(&mut self, log: BpfLog) -> Option<LogDrain> {
        eprintln!("==> datapath programs reloaded with the debug log {log}");
        let (mut dp, installed) = Datapath::install_with(self.sb.dp.dir(), self.sb.cgroup.path(), log)
            .expect("reloading the programs");
        assert!(matches!(installed, Installed::Upgrading { .. }), "{installed:?}");
        dp.finish_upgrade().expect("switching the links");
        dp.take_log_ring().map(LogDrain::start)
    }

    /// Steered connections until the reverse-translation LRU map is full (at most 60 s).
    fn fill_revnat(&mut self) {
        let full = usize::try_from(tagger_common::MAX_REVNAT).expect("capacity") * 99 / 100;
        let deadline = Instant::now() + Duration::from_mins(1);
        let o = Opts { secs: 2.0, warmup: 0.0, ..self.o.clone() };
        let mut last = usize::MAX;
        // Connected sockets keep their record in socket storage, so only unconnected UDP fills
        // the LRU now: stop when a round adds nothing.
        while self.sb.dp.dp.tables().revnat_entries() < full && Instant::now() < deadline {
            let entries = self.sb.dp.dp.tables().revnat_entries();
            if entries == last {
                break;
            }
            last = entries;
            eprintln!("    filling TAGGER_RNAT_V1 ({entries} entries)");
            let (cg, ns, to) = self.route(Method::Tagger);
            let _ = measure(cg, ns, "crr", &to, self.o.clients, &o, false);
        }
    }

    /// Per-program run time over windows of steered (and of non-Service) connections.
    fn hooks(&mut self, services: u32, pass: usize) {
        eprintln!("==> hook cost at {services} Services ({} frontends)", self.frontends());
        let ids = program_ids(self.sb.dp.dir());
        let windows = if self.o.quick { 1 } else { 5 };
        let o = Opts { secs: 0.5, warmup: 0.1, ..self.o.clone() };
        // The reverse-translation LRU map fills with every steered connection of the run; once
        // full, each insert in connect4 evicts. Measure every level in that steady state of a
        // busy node, so that the levels differ only by their Services.
        self.fill_revnat();
        let revnat_entries = self.sb.dp.dp.tables().revnat_entries();
        eprintln!("    TAGGER_RNAT_V1 holds {revnat_entries} entries");
        let (cg, ns) = (self.cli.cgroup.clone(), &self.cli.pod.ns);
        let mut destinations: Vec<(&'static str, Vec<Load>)> = vec![(
            "service",
            vec![
                ("crr", addr(VIP4), true),
                ("crr", addr(VIP6), true),
                ("udp", addr(VIP4), false),
                ("udp", addr(VIP6), false),
            ],
        )];
        // Passthrough: the second echo pod's own addresses published as frontends of a Service
        // tagger leaves to the cluster, so the connections reach it untouched; the client is a
        // gray pod, so the hook also finds the caller and counts its edge (the worst case).
        let mut passthrough = Vec::new();
        if services == LEVELS[1] {
            let direct6 = SocketAddr::new(IpAddr::V6(self.backends[0].pod.ip6), ECHO_PORT);
            destinations.push(("not-a-service", vec![("crr", self.echo(0), true), ("crr", direct6, true)]));
            let pass6 = SocketAddr::new(IpAddr::V6(self.backends[1].pod.ip6), ECHO_PORT);
            passthrough = vec![self.echo(1), pass6];
            let tables = self.sb.dp.dp.tables_mut();
            for a in &passthrough {
                let svc = Service { svc_id: PASSTHROUGH_SVC, flags: tagger_common::SVC_F_PASSTHROUGH };
                tables.upsert_frontend(&frontend_key(*a, Proto::Tcp), svc).expect("passthrough frontend");
            }
            destinations.push(("passthrough", passthrough.iter().map(|a| ("crr", *a, true)).collect()));
        }
        for (destination, loads) in destinations {
            for window in 0..windows {
                let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
                let before = run_stats(&ids);
                for (test, to, peername) in &loads {
                    let s = measure(&cg, ns, test, &to.to_string(), 1, &o, *peername);
                    assert_eq!(s.errors, 0, "hook workload {test} {to}: {:?}", s.first_error);
                }
                let after = run_stats(&ids);
                drop(stats_fd);
                for (i, &program) in PROGRAMS.iter().enumerate() {
                    let runs = after[i].1 - before[i].1;
                    let run_time_ns = after[i].0 - before[i].0;
                    if runs == 0 {
                        continue;
                    }
                    #[expect(clippy::cast_precision_loss, reason = "ns and counts far below 2^52")]
                    let ns_per_run = run_time_ns as f64 / runs as f64;
                    eprintln!(
                        "    {destination:13} window {window} {program:13} {runs:8} runs {ns_per_run:7.1} ns/run"
                    );
                    self.results.hooks.push(HookSample {
                        services,
                        pass,
                        frontends: self.frontends(),
                        destination,
                        window,
                        program,
                        runs,
                        run_time_ns,
                        ns_per_run,
                        revnat_entries,
                    });
                }
            }
        }
        for a in passthrough {
            self.sb
                .dp
                .dp
                .tables_mut()
                .remove_frontend(&frontend_key(a, Proto::Tcp))
                .expect("remove passthrough");
        }
    }
    /// `perf record -a -g` (cpu-clock) while one client makes connections with getpeername(),
    /// steered (to the VIP) and then not to a Service (a pod IP): the self time of each symbol
    /// sampled under one of tagger's programs (`bpf_prog_<tag>_<name>` in the call chain).
    fn profile(&mut self) {
        let secs = if self.o.quick { 2.0 } else { 5.0 };
        let mut text = String::new();
        for (what, m) in [
            ("steered connections to the VIP", Method::Tagger),
            ("connections to a pod IP (not a Service) from a tagger pod", Method::DirectUnderTagger),
        ] {
            eprintln!("==> profile: perf record -a -g during TCP_CRR, {what}");
            let data = self.tmp.0.join("perf.data");
            let mut perf = Command::new("perf")
                .args([
                    "record",
                    "-q",
                    "-e",
                    "cpu-clock",
                    "-a",
                    "-g",
                    "-o",
                    &data.to_string_lossy(),
                    "--",
                    "sleep",
                ])
                .arg(format!("{}", secs + 1.0))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("perf (Debian: linux-perf)");
            std::thread::sleep(Duration::from_millis(300));
            let o = Opts { secs, warmup: 0.0, ..self.o.clone() };
            let (cg, ns, to) = self.route(m);
            let stats = measure(cg, ns, "crr", &to, 1, &o, true);
            let _ = perf.wait();
            let out = Command::new("perf")
                .args([
                    "report",
                    "-i",
                    &data.to_string_lossy(),
                    "--stdio",
                    "-q",
                    "--no-children",
                    "-g",
                    "none",
                ])
                .args(["--parent", "bpf_prog_", "--sort", "parent,sym", "--percent-limit", "0.005"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let lines: Vec<&str> = out.lines().filter(|l| l.contains("bpf_prog_")).take(40).collect();
            let _ = write!(
                text,
                "{what}: {:.0} connections/s; self time of the symbols sampled inside tagger's programs, \
                 in percent of all samples (2 CPUs):\n{}\n\n",
                stats.rate,
                lines.join("\n")
            );
        }
        eprintln!("{text}");
        self.results.profile = Some(text);
    }
}

/// The program ids behind the datapath's pinned links, in [`PROGRAMS`] order.
fn program_ids(pins: &Path) -> Vec<u32> {
    PROGRAMS
        .iter()
        .map(|p| {
            let path = pins.join("links").join(p);
            let link = aya::programs::links::PinnedLink::from_pin(&path)
                .unwrap_or_else(|e| panic!("open link pin {}: {e}", path.display()));
            let link: aya::programs::links::FdLink = link.into();
            link.info().expect("link info").program_id()
        })
        .collect()
}

/// (run_time_ns, run_cnt) of each program id.
fn run_stats(ids: &[u32]) -> Vec<(u64, u64)> {
    let mut found = vec![None; ids.len()];
    for info in aya::programs::loaded_programs().flatten() {
        if let Some(i) = ids.iter().position(|&id| id == info.id()) {
            #[expect(clippy::cast_possible_truncation, reason = "ns of run time fit in u64")]
            let run_time = info.run_time().as_nanos() as u64;
            found[i] = Some((run_time, info.run_count()));
        }
    }
    found.into_iter().map(|f| f.expect("our program is loaded")).collect()
}

/// A kube-proxy (iptables mode) nat table for `services` ClusterIP Services with two endpoints
/// each, as `iptables-save` shows one: KUBE-SERVICES → KUBE-SVC-* (random probability) →
/// KUBE-SEP-* (DNAT). The benchmarked Service (VIP4, DNAT to `echo`) sits in the middle of
/// KUBE-SERVICES, where a random position is on average; the others point at unreachable pods.
fn kube_proxy_rules(services: u32, echo: &[SocketAddr]) -> String {
    use std::fmt::Write as _;
    let mut chains = String::new();
    let mut rules = String::new();
    let bench_at = services / 2;
    let vip4 = addr(VIP4);
    for i in 0..services {
        let (vip, port, eps): (Ipv4Addr, u16, Vec<SocketAddr>) = if i == bench_at {
            let IpAddr::V4(v) = vip4.ip() else { unreachable!() };
            (v, vip4.port(), echo.to_vec())
        } else {
            (Ipv4Addr::from(0x0a64_0000 + i), 80, vec![addr("10.245.0.1:8080"), addr("10.245.0.2:8080")])
        };
        let svc = format!("KUBE-SVC-{i:016X}");
        let name = format!("bench/svc-{i}:http");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j {svc}"
        );
        let _ = writeln!(
            rules,
            "-A {svc} ! -s 10.244.0.0/16 -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ"
        );
        let n = eps.len();
        for (k, ep) in eps.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i:011X}{k:05X}");
            let _ = writeln!(chains, ":{sep} - [0:0]");
            #[expect(clippy::cast_precision_loss, reason = "small counts")]
            let probability = 1.0 / (n - k) as f64;
            let statistic = if k + 1 < n {
                format!(" -m statistic --mode random --probability {probability:.11}")
            } else {
                String::new()
            };
            let _ = writeln!(rules, "-A {svc} -m comment --comment \"{name} -> {ep}\"{statistic} -j {sep}");
            let _ = writeln!(
                rules,
                "-A {sep} -s {}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ",
                ep.ip()
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {ep}"
            );
        }
    }
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         {chains}\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         {rules}\
         -A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         COMMIT\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Phases

fn run(o: &Opts) {
    tagger_tests::require_root();
    ensure_bpffs();
    let started = Instant::now();
    let has = |p: &str| o.phases.iter().any(|x| x == p);
    let mut results = if has("crr") || has("rr") || has("hooks") || has("profile") {
        let mut b = Bench::new(o);
        for services in LEVELS {
            b.set_services(services);
            let mut methods = vec![Method::Direct, Method::Tagger];
            if services == 1 {
                methods.push(Method::DirectUnderTagger);
            }
            if [1, 1_000, 10_000].contains(&services) && has("crr") {
                b.set_iptables(services);
                methods.push(Method::Iptables);
            }
            if services == 1 && (has("crr") || has("rr")) {
                b.start_haproxy();
                methods.push(Method::Haproxy);
            }
            if has("crr") && services != 10 {
                b.crr(services, &methods);
            }
            if has("rr") && services == 1 {
                b.rr(services);
            }
            b.haproxy = None;
            b.ipt = None;
            if has("hooks") && [10, 10_000, 65_536].contains(&services) {
                b.hooks(services, 0);
            }
            if has("profile") && services == 10 && !o.quick && perf_available() {
                b.profile();
            }
        }
        if has("hooks") {
            // Control: back to 10 Services at the end. If the cost stays where the largest level
            // put it, the difference came with time (the LRU map's state), not the Services.
            b.set_services(10);
            b.hooks(10, PASS_CONTROL);
            // The same workload with the debug log on, against the control just before it.
            let drain = b.set_bpf_log(BpfLog::Debug);
            b.hooks(10, PASS_BPF_LOG);
            drop(drain);
            b.set_bpf_log(BpfLog::Off);
        }
        let c = b.sb.dp.dp.tables().counters().expect("counters");
        b.results.datapath_counters = Some(json!(
            tagger_common::Outcome::ALL
                .iter()
                .map(|&oc| (oc.name(), c.get(oc)))
                .collect::<std::collections::BTreeMap<_, _>>()
        ));
        eprintln!("==> tearing the sandbox down");
        std::mem::take(&mut b.results)
    } else {
        Results::default()
    };
    if has("fallback") {
        results.fallback.push(fallback(o, None));
        let large = if o.quick { (2_000, 1_000, 20) } else { (10_000, 5_000, 20) };
        results.fallback.push(fallback(o, Some(large)));
    }
    results.config["elapsed_secs"] = json!(started.elapsed().as_secs_f64());
    results.save(&o.out);
    eprintln!("==> results written to {} ({:.0} s)", o.out.display(), started.elapsed().as_secs_f64());
}

/// Whether `perf` runs here (Debian's linux-perf); the profile phase is skipped otherwise.
fn perf_available() -> bool {
    let ok = Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("==> profile skipped: perf is not installed");
    }
    ok
}

/// A hook-cost workload: (loadgen test, address, getpeername after connect).
type Load = (&'static str, SocketAddr, bool);

/// The agent on the fake API server; a gray caller probes the Service; the EndpointSlice loses
/// its last gray endpoint: how long until the caller's connections land on base (and until
/// the map changed), then the endpoint comes back. `large`: (pods, Services, endpoints per
/// Service) of other workloads the agent also holds, as in control-plane-bench.
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
fn fallback(o: &Opts, large: Option<(usize, usize, usize)>) -> Value {
    let cluster = large.map_or_else(
        || "3 pods, 1 Service".to_owned(),
        |(pods, services, eps)| {
            format!("plus {pods} other pods, {services} other Services with {} endpoints", services * eps)
        },
    );
    eprintln!("==> fallback: the real agent on the fake API server ({cluster})");
    let vip = addr("10.96.30.1:80");
    let api = FakeApiServer::builder().history_limit(1_000_000).start();
    if let Some((pods, services, eps)) = large {
        populate_other_workloads(&api, pods, services, eps);
    }
    let mut sb = AgentSandbox::new();
    sb.backend("a-base", None);
    sb.backend("a-gray", Some("gray"));
    sb.caller("gw", Some("gray"));
    sb.cluster.service("a", &[vip.ip()], vip.port(), PORT, &["a-base", "a-gray"]);
    // A second Service whose backends hold connections open: the stale-connection reset.
    let hold_vip = addr("10.96.30.2:80");
    sb.cluster.service("h", &[hold_vip.ip()], hold_vip.port(), HOLD_PORT, &["a-base", "a-gray"]);
    let _holders: Vec<HoldServer> =
        ["a-base", "a-gray"].iter().map(|n| HoldServer::start(&sb.netns[*n], n, HOLD_PORT)).collect();
    sb.publish_to(&api);
    let _hold = hold_cgroup(&sb.pod_cgroup("gw"));
    let kubeconfig = sb.dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let args = sb.agent_args("kubernetes", &[]);
    sb.agent = Some(AgentProcess::start_with(
        &workspace_bin("tagger-agent"),
        &args,
        &[("KUBECONFIG", kubeconfig.to_string_lossy().into_owned())],
        &sb.dir.0.join("agent.log"),
        "warn",
    ));
    let frontends_wanted = 2 + large.map_or(0, |(_, services, _)| services);
    sb.wait_for("initial sync", Duration::from_mins(2), |t| {
        set_size(t, vip, "gray") == Some(1)
            && set_size(t, vip, "base") == Some(1)
            && t.frontends().map_or(0, |f| f.len()) == frontends_wanted
    });
    // The probe: a gray caller connecting every 200 µs, printing each change of backend.
    let mut child = Command::new(workspace_bin("loadgen"))
        .args(["--cgroup", &sb.pod_cgroup("gw").to_string_lossy(), "--netns", sb.netns["gw"].ns.name()])
        .args(["probe", &vip.to_string(), "200", "600"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn loadgen probe");
    let stdout = child.stdout.take().expect("stdout");
    let _probe = ChildGuard::new(child, "loadgen probe");
    let (tx, rx) = mpsc::channel::<(u64, String)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some((ts, reply)) = line.split_once('\t')
                && let Ok(ts) = ts.parse()
                && tx.send((ts, reply.to_owned())).is_err()
            {
                return;
            }
        }
    });
    let log = sb.dir.0.join("agent.log");
    let wait_reply = |want: &str, after: u64| -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            tagger_tests::signals::check();
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the gray caller never reached {want}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            if let Ok((ts, reply)) = rx.recv_timeout(left.min(Duration::from_millis(200)))
                && reply == want
                && ts >= after
            {
                return ts;
            }
        }
    };
    wait_reply("a-gray", 0);
    let dp = Datapath::open_read_only(&sb.pins.0).expect("open pins");
    let iterations = match (o.quick, large.is_some()) {
        (true, true) => 2,
        (true, false) => 3,
        (false, _) => 10,
    };
    let (mut to_base, mut to_map, mut to_reset) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iterations {
        // A long-lived connection of the gray caller to its gray backend.
        let held = hold_gray(&sb, hold_vip);
        // Remove the last gray endpoint (IPv4 slice: what the probe uses; IPv6 follows).
        for svc in ["a", "h"] {
            sb.cluster.services.get_mut(svc).expect("service").backends.retain(|b| b != "a-gray");
        }
        let t0 = tagger_tests::monotonic_ns();
        sb.publish_slices_to(&api);
        let map_at = loop {
            if set_size(dp.tables(), vip, "gray") == Some(0) {
                break tagger_tests::monotonic_ns();
            }
            assert!(
                tagger_tests::monotonic_ns() - t0 < 30_000_000_000,
                "gray set never emptied:\n{}",
                sb.agent_log()
            );
            std::thread::sleep(Duration::from_micros(100));
        };
        let landed = wait_reply("a-base", t0);
        #[expect(clippy::cast_precision_loss, reason = "ns differences far below 2^52")]
        let (base_ms, map_ms) = ((landed - t0) as f64 / 1e6, (map_at - t0) as f64 / 1e6);
        eprintln!(
            "    iteration {i}: map written after {map_ms:.2} ms, first gray-caller connection on base {base_ms:.2} ms after the event"
        );
        to_base.push(base_ms);
        to_map.push(map_ms);
        // The held connection is reset by the agent (the client reports it; the time includes
        // that report's way through a pipe).
        let line = held.next_line(Duration::from_secs(10)).unwrap_or_default();
        let reset_at = tagger_tests::monotonic_ns();
        assert!(
            line.starts_with("closed"),
            "the held gray connection was not reset: {line:?}\n{}",
            sb.agent_log()
        );
        #[expect(clippy::cast_precision_loss, reason = "ns differences far below 2^52")]
        let reset_ms = (reset_at - t0) as f64 / 1e6;
        eprintln!("    iteration {i}: held gray connection reset {reset_ms:.1} ms after the event");
        to_reset.push(reset_ms);
        drop(held);
        // The gray endpoint comes back; wait until the caller is on gray again.
        for svc in ["a", "h"] {
            sb.cluster.services.get_mut(svc).expect("service").backends.push("a-gray".into());
        }
        let t1 = tagger_tests::monotonic_ns();
        sb.publish_slices_to(&api);
        wait_reply("a-gray", t1);
        std::thread::sleep(Duration::from_millis(100));
    }
    json!({
        "cluster": cluster,
        "iterations": iterations,
        "probe_interval_us": 200,
        "event_to_first_base_connection_ms": to_base,
        "event_to_map_write_ms": to_map,
        "event_to_stale_reset_ms": to_reset,
        "stale_connection_reset": "measured: a gray caller's held connection to the removed gray backend, from the event to the client seeing the reset",
    })
}

/// Port of the backends that hold connections open.
const HOLD_PORT: u16 = 9090;

/// A held connection from the gray caller that reached the gray backend (retried while the
/// gray endpoint is not back in the map yet).
fn hold_gray(sb: &AgentSandbox, vip: SocketAddr) -> HoldClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = HoldClient::start(&sb.pod_cgroup("gw"), &sb.netns["gw"].ns, "hold-tcp", vip);
        let line = c.next_line(Duration::from_secs(3)).unwrap_or_default();
        if line.starts_with("ok\ta-gray") {
            return c;
        }
        assert!(Instant::now() < deadline, "no held connection reached a-gray: {line:?}");
        drop(c);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Remote pods and Services with EndpointSlices that have nothing to do with the benchmarked
/// Service, so that the agent holds a large cluster while it reacts.
fn populate_other_workloads(api: &FakeApiServer, pods: usize, services: usize, eps: usize) {
    let started = Instant::now();
    let pod_ip = |i: usize| Ipv4Addr::from(0x0afa_0000 + u32::try_from(i).expect("pod index"));
    for i in 0..pods {
        api.apply(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("other-{i}"), "namespace": "other",
                         "labels": {"app": format!("app-{}", i % 500)}},
            "spec": {"nodeName": "node-2", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "qosClass": "Burstable", "podIP": pod_ip(i).to_string()},
        }));
    }
    for s in 0..services {
        let vip = Ipv4Addr::from(0x0a64_0000 + u32::try_from(s).expect("service index"));
        api.apply(&json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("other-{s}"), "namespace": "other"},
            "spec": {"clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        }));
        let endpoints: Vec<Value> = (0..eps)
            .map(|k| {
                let p = (s * eps + k) % pods;
                json!({"addresses": [pod_ip(p).to_string()], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "namespace": "other", "name": format!("other-{p}")}})
            })
            .collect();
        api.apply(&json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("other-{s}-abc"), "namespace": "other",
                         "labels": {"kubernetes.io/service-name": format!("other-{s}")}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }));
    }
    eprintln!(
        "    fake API server loaded with the other workloads in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
/// `TAGGER_BENCH_SHAPING=warmup|routed|canary`: the benchmarked Services (ids 1 and 2) use that
/// traffic shaping feature, to measure its hook cost (`warmup`: one of the two backends just
/// became ready, weight 10%, the costliest pick; `routed`: a rule sends gray callers to base;
/// `canary`: a sticky canary, which the gray caller does not take but still reads). Returns the
/// frontends' flags.
fn shape_bench_services(sb: &mut Sandbox, v4: &[SocketAddr], v6: &[SocketAddr]) -> u32 {
    use tagger_common::{
        LanePolicy, RouteKey, SHAPE_F_CANARY, SHAPE_F_STICKY, SHAPE_F_WARMUP, SVC_F_ROUTED, SVC_F_SHAPED,
        SvcShaping, WarmKey, lane_id,
    };
    let Ok(feature) = std::env::var("TAGGER_BENCH_SHAPING") else { return 0 };
    eprintln!("    shaping: {feature}");
    let t = sb.dp.dp.tables_mut();
    match feature.as_str() {
        "warmup" => {
            let w = tagger::config::values::Warmup::new(Duration::from_hours(1), 1.0, 10.0);
            for (svc_id, addrs) in [(1, v4), (2, v6)] {
                t.set_shaping(svc_id, &SvcShaping { flags: SHAPE_F_WARMUP, ..SvcShaping::default() })
                    .expect("shaping");
                let b = backend(addrs[0]);
                let key = WarmKey { svc_id, port: b.port, _pad: 0, addr: b.addr };
                t.set_warm(key, &w.entry(tagger::sys::monotonic_now_ns())).expect("warm");
            }
            SVC_F_SHAPED
        }
        "canary" => {
            let s = SvcShaping {
                flags: SHAPE_F_CANARY | SHAPE_F_STICKY,
                canary_lane: lane_id("gray"),
                canary_bp: 1000,
                _pad: 0,
            };
            for svc_id in [1, 2] {
                t.set_shaping(svc_id, &s).expect("shaping");
            }
            SVC_F_SHAPED
        }
        "routed" => {
            let chain = LanePolicy { chain_len: 1, ..LanePolicy::default() };
            for svc_id in [1, 2] {
                t.set_route(RouteKey { svc_id, caller_lane: lane_id("gray") }, &chain).expect("route");
            }
            SVC_F_ROUTED
        }
        other => panic!("TAGGER_BENCH_SHAPING={other}: expected warmup, routed or canary"),
    }
}
