//! `tagger-demo`: the MSE full-link gray release story on a sandboxed node, with live traffic.
//! Run by `cargo xtask demo` (as root). Exits 0 only if every step behaved as stated, so it
//! doubles as a smoke test; cleans up everything it created, also on Ctrl-C and on failure.
//!
//! The node: network namespaces as pods, kubelet-style cgroups, HTTP services that answer with
//! their pod name and lane after calling the next service, a Kubernetes YAML file describing it
//! all, and `tagger-agent` in file mode.
//!
//! ```text
//!   gw-base ─┐            ┌─ a-base ─┐            ┌─ c-base
//!            ├─► Service A┤          ├─► B (b-base) ─► Service C┤
//!   gw-gray ─┘            └─ a-gray ─┘            └─ c-gray
//! ```
//!
//! Usage: `tagger-demo [--keep]`

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tagger_tests::{
    agent::{AgentSandbox, PORT, pod_in_lane, set_size, workspace_bin},
    client::testpod_bin,
};

const A: &str = "10.96.0.10:80";
const B: &str = "10.96.0.11:80";
const C: &str = "10.96.0.12:80";
const REQUESTS: usize = 20;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// A service process (our child) inside its pod; killed on drop.
struct ServiceProcess(Child);

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `testpod pool`: one pooled keep-alive connection, a request every 20 ms; its lines (time,
/// outcome, body) arrive on a channel.
struct Pool {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    started: std::time::Instant,
}

impl Pool {
    fn start(sb: &AgentSandbox, gateway: &str, service: &str) -> Self {
        let mut child = Command::new(testpod_bin())
            .args([
                "--cgroup",
                &sb.pod_cgroup(gateway).to_string_lossy(),
                "--netns",
                sb.netns[gateway].ns.name(),
            ])
            .args(["pool", service])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start testpod pool");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(stdout).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let started = std::time::Instant::now();
        let first = lines.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        assert_eq!(first, "started", "testpod pool did not start");
        Self { child, lines, started }
    }

    /// Milliseconds since the pool started (its lines carry the same clock, give or take the
    /// moment it printed `started`).
    fn elapsed_ms(&self) -> u128 {
        self.started.elapsed().as_millis()
    }

    /// The first line matching `done` within `timeout`.
    fn wait_for(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if done(&line) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Only our own child, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Follows the pooled connection after the cluster change written at `changed_ms` (the agent
/// notices the file within 100 ms): it must be reset and its reconnect land on `after`.
fn pooled_move(pool: &Pool, before: Option<&str>, changed_ms: u128, was: &str, after: &str) -> Check {
    let field = |line: &str, i: usize| line.split('\t').nth(i).unwrap_or("").to_owned();
    let before_body = before.map(|l| field(l, 2)).unwrap_or_default();
    let reset = pool.wait_for(Duration::from_secs(3), |l| l.contains("\treset\t"));
    let moved = reset.as_ref().and_then(|_| pool.wait_for(Duration::from_secs(3), |l| l.contains("\tok\t")));
    let reset_after =
        reset.as_ref().and_then(|l| field(l, 0).parse::<u128>().ok()).map(|t| t.saturating_sub(changed_ms));
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["gw-gray's pooled connection to A", "when"]);
    t.add_row([format!("served by {before_body}"), "before".to_owned()]);
    match (&reset, reset_after) {
        (Some(l), Some(ms)) => t.add_row([
            format!("reset by tagger ({})", field(l, 2)),
            format!("{ms} ms after the cluster change"),
        ]),
        _ => t.add_row(["not reset".to_owned(), "within 3 s".to_owned()]),
    };
    if let Some(l) = &moved {
        t.add_row([format!("reconnected: served by {}", field(l, 2)), "next request".to_owned()]);
    }
    println!("{t}");
    let after_body = moved.as_deref().map(|l| field(l, 2)).unwrap_or_default();
    let ok = before_body == was && after_body == after && reset_after.is_some();
    Check {
        step: "2. pooled connection gw-gray → A".into(),
        expected: format!("reset, then {after}"),
        observed: match reset_after {
            Some(ms) => format!("reset after {ms} ms, then {after_body}"),
            None => format!("not reset; still {before_body}"),
        },
        ok,
    }
}

/// One line of the final report.
struct Check {
    step: String,
    expected: String,
    observed: String,
    ok: bool,
}

fn main() -> std::process::ExitCode {
    let keep = std::env::args().any(|a| a == "--keep");
    tagger_tests::signals::install("Ctrl-C: tearing the sandbox down…");
    let result = std::panic::catch_unwind(|| run(keep));
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("\ndemo FAILED: a step did not behave as stated (see the report above)");
            std::process::ExitCode::FAILURE
        }
        Err(_) if tagger_tests::signals::interrupted() => {
            eprintln!("\ninterrupted: everything the demo created has been removed");
            std::process::ExitCode::from(130)
        }
        Err(_) => {
            eprintln!("\ndemo FAILED (see the message above); everything it created has been removed");
            std::process::ExitCode::FAILURE
        }
    }
}

fn say(text: &str) {
    println!("\n\x1b[1m{text}\x1b[0m");
}

fn run(keep: bool) -> bool {
    tagger_tests::require_root();
    let mut sb = AgentSandbox::new();
    say("Setting up a sandboxed node: pods as network namespaces, kubelet-style cgroups");
    // Pods: (name, lane, calls).
    let pods: [(&str, Option<&str>, Option<&str>); 7] = [
        ("a-base", None, Some(B)),
        ("a-gray", Some("gray"), Some(B)),
        ("b-base", None, Some(C)),
        ("c-base", None, None),
        ("c-gray", Some("gray"), None),
        ("gw-base", None, None),
        ("gw-gray", Some("gray"), None),
    ];
    for (name, lane, _) in pods {
        sb.caller(name, lane);
    }
    sb.cluster.service("a", &[addr(A).ip()], 80, PORT, &["a-base", "a-gray"]);
    sb.cluster.service("b", &[addr(B).ip()], 80, PORT, &["b-base"]);
    sb.cluster.service("c", &[addr(C).ip()], 80, PORT, &["c-base", "c-gray"]);
    let lanes = sb.write_lanes_config("# gray falls back to base when a Service has no gray backend\nlanes:\n  gray:\n    fallback: [base]\n");
    sb.start_agent_on_file(&["--lanes-config", &lanes.to_string_lossy(), "--metrics-addr", "127.0.0.1:0"]);
    let metrics = format!("127.0.0.1:{}", sb.metrics_port());
    let yaml = sb.dir.0.join("cluster.yaml");
    print_setup(&sb, &yaml);
    wait_synced(&sb, &pods.map(|p| (p.0, p.1)));
    // The services start once the datapath is attached: their listeners then keep the SYNs
    // the receiving side reads the lane option from.
    let mut services = Vec::new();
    for (name, lane, next) in pods {
        if name.starts_with("gw") {
            continue;
        }
        services.push(start_service(&sb, name, lane.unwrap_or("base"), next));
    }
    tagger_tests::signals::check();

    let mut checks = Vec::new();
    say("Step 1 — gray traffic stays gray where a gray version exists; base traffic never touches gray");
    let base_path = "a-base[base] -> b-base[base] -> c-base[base]";
    let gray_path = "a-gray[gray] -> b-base[base] -> c-base[base]";
    checks.push(traffic(&sb, "1. gw-base → A", "gw-base", A, base_path));
    checks.push(traffic(&sb, "1. gw-gray → A", "gw-gray", A, gray_path));
    checks.push(traffic(&sb, "1. gw-gray → C directly", "gw-gray", C, "c-gray[gray]"));
    checks.push(traffic(&sb, "1. gw-base → C directly", "gw-base", C, "c-base[base]"));
    println!(
        "B has no gray version, so the gray request continues as base from B on: the lane is the\n\
         calling pod's, decided per connection (see README, Limits)."
    );
    checks.push(show_cli(&sb, &["stats"], "steered"));
    println!(
        "B has base backends only: tagger leaves it to the node's own Service implementation\n\
         (kube-proxy, Cilium, ...), which sends every caller to b-base anyway."
    );
    checks.push(show_cli(&sb, &["services"], "no: base only, left to the cluster"));
    println!(
        "The receiving pods read the caller's lane from the SYN: c-gray counts gw-gray's calls as\n\
         in_lane; b-base, reached through the cluster's Service implementation, counts untagged."
    );
    checks.push(show_cli(&sb, &["stats", "--inbound"], "in_lane"));
    tagger_tests::signals::check();

    say("Step 2 — the gray version of A is deleted: gray callers go to base A at the next connection");
    // A pooled (keep-alive) connection, as HTTP clients and connection pools keep them: it sits
    // on a-gray, whose process keeps running (a terminating pod) after its endpoint goes.
    let pool = Pool::start(&sb, "gw-gray", A);
    let pooled_before = pool.wait_for(Duration::from_secs(5), |l| l.contains("\tok\t"));
    sb.cluster.pods.remove("a-gray");
    sb.cluster.services.get_mut("a").expect("a").backends.retain(|b| b != "a-gray");
    sb.write_source_file();
    let changed_ms = pool.elapsed_ms();
    sb.wait_for("A's gray set to empty", Duration::from_secs(10), |t| {
        set_size(t, addr(A), "gray") == Some(0)
    });
    checks.push(pooled_move(&pool, pooled_before.as_deref(), changed_ms, gray_path, base_path));
    checks.push(traffic(&sb, "2. gw-gray → A (a-gray gone)", "gw-gray", A, base_path));
    checks.push(traffic(&sb, "2. gw-base → A", "gw-base", A, base_path));
    println!(
        "A now has base backends only: tagger leaves it to the cluster, whose Service implementation\n\
         sends gray and base callers alike to a-base."
    );
    checks.push(show_cli(&sb, &["explain", "--pod", "demo/gw-gray", A], "passthrough"));
    tagger_tests::signals::check();

    say("Step 3 — a-gray is back: gray callers return to it");
    sb.cluster.pod("a-gray", tagger_tests::agent::NODE, Some("gray"), &[IpAddr::V4(sb.netns["a-gray"].ip4)]);
    sb.set_uid("a-gray", &tagger_tests::cluster::uid_for("a-gray"));
    sb.cluster.services.get_mut("a").expect("a").backends.push("a-gray".into());
    sb.write_source_file();
    sb.wait_for("A's gray set back", Duration::from_secs(10), |t| set_size(t, addr(A), "gray") == Some(1));
    checks.push(traffic(&sb, "3. gw-gray → A (a-gray back)", "gw-gray", A, gray_path));
    checks.push(show_cli(&sb, &["stats"], "passthrough"));
    tagger_tests::signals::check();

    say("Step 4 — a rolling update under load loses no request (a second sandboxed node)");
    checks.push(rolling_update());

    let ok = report(&checks);
    if keep && ok {
        explore(&sb, &yaml, &metrics);
    }
    drop(services);
    ok
}

/// Kubernetes' rolling update of a Service tagger steers, under keep-alive load: see
/// `tagger_tests::rollout`.
fn rolling_update() -> Check {
    const CONNS: usize = 8;
    const BACKENDS: usize = 2;
    println!(
        "{CONNS} keep-alive HTTP clients send requests back to back (every fourth takes 500 ms) to Service r\n\
         (base backends r-1, r-2 and a gray one, so tagger steers it) while r-1 and r-2 are replaced one\n\
         by one: the new pod ready first, the old one terminating (still serving) and draining\n\
         gracefully, then deleted. tagger sends a terminating backend no new connection and resets\n\
         none of its open ones."
    );
    let mut sb = AgentSandbox::new();
    let r = tagger_tests::rollout::rolling_update(
        &mut sb,
        "10.96.0.20:80".parse().expect("vip"),
        BACKENDS,
        CONNS,
    );
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["rolling update of Service r", "requests"]);
    for (backend, n) in &r.served {
        t.add_row([format!("answered by {backend}"), n.to_string()]);
    }
    t.add_row(["failed".to_owned(), r.failed.to_string()]);
    t.add_row(["connections reset by tagger".to_owned(), r.resets.to_string()]);
    println!("{t}");
    for e in &r.errors {
        println!("  {e}");
    }
    // The new pods take over; which old pod the pooled connections first landed on is random.
    let all_served =
        (BACKENDS + 1..=2 * BACKENDS).all(|i| r.served.get(&format!("r-{i}")).is_some_and(|n| *n > 0));
    Check {
        step: "4. rolling update under load".into(),
        expected: "0 failed requests, every new pod served".into(),
        observed: format!("{} of {} failed, {} resets", r.failed, r.requests, r.resets),
        ok: r.failed == 0 && r.requests > 0 && all_served && r.resets == 0,
    }
}

fn start_service(sb: &AgentSandbox, name: &str, lane: &str, next: Option<&str>) -> ServiceProcess {
    let listen = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), PORT).to_string();
    let mut cmd = Command::new(testpod_bin());
    cmd.args([
        "--cgroup",
        &sb.pod_cgroup(name).to_string_lossy(),
        "--netns",
        sb.netns[name].ns.name(),
        "serve",
    ])
    .args([listen.as_str(), name, lane]);
    if let Some(n) = next {
        cmd.arg(n);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("start service");
    // Wait for "serving" so requests never race the bind.
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut first,
    )
    .expect("service output");
    assert_eq!(first.trim(), "serving", "service {name} did not start");
    ServiceProcess(child)
}

fn print_setup(sb: &AgentSandbox, yaml: &Path) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["pod", "lane label", "IPv4", "serves", "calls"]);
    for (name, pod) in &sb.cluster.pods {
        let lane = pod.labels.get("tagger.io/lane").cloned().unwrap_or_else(|| "(none: base)".into());
        let serves = sb
            .cluster
            .services
            .values()
            .find(|s| s.backends.contains(name))
            .map_or("-".into(), |s| format!("Service {} {}:80", s.name, s.cluster_ips[0]));
        let calls = match name.as_str() {
            n if n.starts_with("a-") => "B",
            "b-base" => "C",
            n if n.starts_with("gw") => "A (the demo's requests)",
            _ => "-",
        };
        t.add_row([name.as_str(), &lane, &sb.ip4(name).to_string(), &serves, calls]);
    }
    println!("{t}");
    println!("Kubernetes objects: {} (tagger-agent --source file:{})", yaml.display(), yaml.display());
}

fn wait_synced(sb: &AgentSandbox, pods: &[(&str, Option<&str>)]) {
    let cgroups: Vec<(PathBuf, &str)> =
        pods.iter().map(|(n, l)| (sb.pod_cgroup(n), l.unwrap_or("base"))).collect();
    sb.wait_for("the agent's first sync", Duration::from_secs(20), |t| {
        cgroups.iter().all(|(cg, lane)| pod_in_lane(t, cg, lane))
            && set_size(t, addr(A), "gray") == Some(1)
            && set_size(t, addr(C), "gray") == Some(1)
            && set_size(t, addr(B), "base") == Some(1)
    });
    println!(
        "tagger-agent synced: every pod cgroup registered in its lane, every Service's backend sets written"
    );
}

/// Sends requests from a gateway to a Service and checks every one took `expected`.
fn traffic(sb: &AgentSandbox, step: &str, gateway: &str, service: &str, expected: &str) -> Check {
    let out = Command::new(testpod_bin())
        .args([
            "--cgroup",
            &sb.pod_cgroup(gateway).to_string_lossy(),
            "--netns",
            sb.netns[gateway].ns.name(),
            "http",
            service,
            &REQUESTS.to_string(),
        ])
        .output()
        .expect("run testpod");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut paths = std::collections::BTreeMap::<String, usize>::new();
    for line in text.lines() {
        let key = match line.split('\t').collect::<Vec<_>>().as_slice() {
            ["ok", body, _] => (*body).to_owned(),
            ["err", _, msg] => format!("failed: {msg}"),
            _ => format!("unexpected: {line}"),
        };
        *paths.entry(key).or_default() += 1;
    }
    let mut t = Table::new();
    let name = if service == A {
        "A"
    } else if service == B {
        "B"
    } else {
        "C"
    };
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header([format!("{gateway} → Service {name}: path taken"), "requests".into()]);
    for (p, n) in &paths {
        t.add_row([p.clone(), n.to_string()]);
    }
    println!("{t}");
    let ok = paths.len() == 1 && paths.get(expected) == Some(&REQUESTS);
    let observed = paths.iter().map(|(p, n)| format!("{n}× {p}")).collect::<Vec<_>>().join("; ");
    Check { step: step.into(), expected: format!("{REQUESTS}× {expected}"), observed, ok }
}

/// Shows a CLI command and its output; it must succeed and mention `must_show`.
fn show_cli(sb: &AgentSandbox, args: &[&str], must_show: &str) -> Check {
    let bpffs = sb.pins.0.to_string_lossy().into_owned();
    println!("$ tagger {}", args.join(" "));
    let out = Command::new(workspace_bin("tagger"))
        .args(["--bpffs", &bpffs])
        .args(args)
        .output()
        .expect("run tagger");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if !out.status.success() {
        print!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let ok = out.status.success() && stdout.contains(must_show);
    Check {
        step: format!("tagger {}", args.join(" ")),
        expected: format!("exit 0, shows {must_show:?}"),
        observed: format!("exit {}", out.status.code().unwrap_or(-1)),
        ok,
    }
}

fn report(checks: &[Check]) -> bool {
    say("Report");
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["step", "expected", "observed", "ok"]);
    for c in checks {
        t.add_row([c.step.as_str(), &c.expected, &c.observed, if c.ok { "✔" } else { "✘" }]);
    }
    println!("{t}");
    checks.iter().all(|c| c.ok)
}

fn explore(sb: &AgentSandbox, yaml: &Path, metrics: &str) {
    let bpffs = sb.pins.0.display();
    let tagger = workspace_bin("tagger");
    let testpod = testpod_bin();
    say("The sandbox stays up (--keep). Explore it from another terminal:");
    println!("  {} --bpffs {bpffs} services", tagger.display());
    println!("  {} --bpffs {bpffs} stats --watch", tagger.display());
    println!("  {} --bpffs {bpffs} explain --pod demo/gw-gray {A}", tagger.display());
    println!(
        "  {} --cgroup {} --netns {} http {A} 5",
        testpod.display(),
        sb.pod_cgroup("gw-gray").display(),
        sb.netns["gw-gray"].ns.name()
    );
    println!("  curl -s http://{metrics}/metrics");
    println!("  edit {} (the agent re-reads it)", yaml.display());
    println!("Press Ctrl-C to tear the sandbox down.");
    while !tagger_tests::signals::interrupted() {
        std::thread::sleep(Duration::from_millis(200));
    }
}
