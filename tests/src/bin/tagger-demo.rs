//! `tagger-demo`: the MSE full-link gray release story on a sandboxed node, with live traffic.
//! Run by `cargo xtask demo` (as root). Exits 0 only if every step behaved as stated, so it
//! doubles as a smoke test; cleans up everything it created, also on Ctrl-C and on failure.
//!
//! The node (`tagger_tests::demo_node`): network namespaces as pods, kubelet-style cgroups, HTTP
//! services that answer with their pod name and lane after calling the next service, a real
//! nginx at the edge, a Kubernetes YAML file describing it all, and `tagger-agent` in file mode.
//!
//! ```text
//!          ┌─ gw-base ─┐             ┌─ a-base ─┐                            ┌─ c-base
//!   edge ──┤           ├─► Service A ┤          ├─► Service B (b-base) ─► Service C ┤
//!          └─ gw-gray ─┘             └─ a-gray ─┘                            └─ c-gray
//! ```
//!
//! This binary tells the story; the node, the edge and the counting live in the tests library.
//!
//! Usage: `tagger-demo [--keep]`

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tagger_tests::{
    agent::{AgentSandbox, workspace_bin},
    binomial::Band,
    client::testpod_bin,
    demo_node::{self, A, C, DemoNode, EDGE, EDGE_GRAY_PERCENT, EDGE_HEADER, Paths},
    nginx::Nginx,
};

/// Requests per check between pods.
const REQUESTS: usize = 20;
/// Requests with the lane header through the edge.
const EDGE_HEADER_REQUESTS: usize = 50;
/// Requests without it through the edge, to count the split.
const EDGE_SPLIT_REQUESTS: u64 = 2000;
/// Half-width of the accepted split, in standard deviations of the binomial count.
const SPLIT_SIGMAS: f64 = 4.0;
/// The path of a request a base caller sends to A.
const BASE_PATH: &str = "a-base[base] -> b-base[base] -> c-base[base]";
/// The path of a request a gray caller sends to A while a-gray serves.
const GRAY_PATH: &str = "a-gray[gray] -> b-base[base] -> c-base[base]";

/// `testpod pool`: one pooled keep-alive connection, a request every 20 ms; its lines (time,
/// outcome, body) arrive on a channel.
struct Pool {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    started: std::time::Instant,
}

impl Pool {
    fn start(sb: &AgentSandbox, gateway: &str, service: SocketAddr) -> Self {
        let mut child = Command::new(testpod_bin())
            .args([
                "--cgroup",
                &sb.pod_cgroup(gateway).to_string_lossy(),
                "--netns",
                sb.netns[gateway].ns.name(),
            ])
            .args(["pool", &service.to_string()])
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
        step: "3. pooled connection gw-gray → A".into(),
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
    let node = DemoNode::start(&mut sb, &["--metrics-addr", "127.0.0.1:0"]);
    let metrics = format!("127.0.0.1:{}", sb.metrics_port());
    let yaml = sb.dir.0.join("cluster.yaml");
    print_setup(&sb, &yaml);
    println!(
        "tagger-agent synced: every pod cgroup registered in its lane, every Service's backend sets written"
    );
    tagger_tests::signals::check();

    let mut checks = Vec::new();
    let (name, value) = EDGE_HEADER;
    say(&format!(
        "Step 1 — the edge: nginx sends `{name}: {value}` and {EDGE_GRAY_PERCENT}% of the rest to the gray gateway; \
         from there the lanes hold"
    ));
    let edge = edge(&sb, &mut checks);
    tagger_tests::signals::check();

    say("Step 2 — gray traffic stays gray where a gray version exists; base traffic never touches gray");
    checks.push(traffic(&sb, "2. gw-base → A", "gw-base", A, BASE_PATH));
    checks.push(traffic(&sb, "2. gw-gray → A", "gw-gray", A, GRAY_PATH));
    checks.push(traffic(&sb, "2. gw-gray → C directly", "gw-gray", C, "c-gray[gray]"));
    checks.push(traffic(&sb, "2. gw-base → C directly", "gw-base", C, "c-base[base]"));
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

    say("Step 3 — the gray version of A is deleted: gray callers go to base A at the next connection");
    // A pooled (keep-alive) connection, as HTTP clients and connection pools keep them: it sits
    // on a-gray, whose process keeps running (a terminating pod) after its endpoint goes.
    let pool = Pool::start(&sb, "gw-gray", A);
    let pooled_before = pool.wait_for(Duration::from_secs(5), |l| l.contains("\tok\t"));
    sb.cluster.pods.remove("a-gray");
    sb.cluster.services.get_mut("a").expect("a").backends.retain(|b| b != "a-gray");
    sb.write_source_file();
    let changed_ms = pool.elapsed_ms();
    sb.wait_for("A's gray set to empty", Duration::from_secs(10), |t| {
        tagger_tests::agent::set_size(t, A, "gray") == Some(0)
    });
    checks.push(pooled_move(&pool, pooled_before.as_deref(), changed_ms, GRAY_PATH, BASE_PATH));
    checks.push(traffic(&sb, "3. gw-gray → A (a-gray gone)", "gw-gray", A, BASE_PATH));
    checks.push(traffic(&sb, "3. gw-base → A", "gw-base", A, BASE_PATH));
    println!(
        "A now has base backends only: tagger leaves it to the cluster, whose Service implementation\n\
         sends gray and base callers alike to a-base."
    );
    checks.push(show_cli(&sb, &["explain", "--pod", "demo/gw-gray", &A.to_string()], "passthrough"));
    tagger_tests::signals::check();

    say("Step 4 — a-gray is back: gray callers return to it");
    sb.cluster.pod("a-gray", tagger_tests::agent::NODE, Some("gray"), &[IpAddr::V4(sb.netns["a-gray"].ip4)]);
    sb.set_uid("a-gray", &tagger_tests::cluster::uid_for("a-gray"));
    sb.cluster.services.get_mut("a").expect("a").backends.push("a-gray".into());
    sb.write_source_file();
    sb.wait_for("A's gray set back", Duration::from_secs(10), |t| {
        tagger_tests::agent::set_size(t, A, "gray") == Some(1)
    });
    checks.push(traffic(&sb, "4. gw-gray → A (a-gray back)", "gw-gray", A, GRAY_PATH));
    checks.push(show_cli(&sb, &["stats"], "passthrough"));
    tagger_tests::signals::check();

    say("Step 5 — a rolling update under load loses no request (a second sandboxed node)");
    checks.push(rolling_update());

    say("Step 6 — where does the gray lane stop? The coverage report of what this node saw");
    println!(
        "Every hop above was one connection, decided by the calling pod's lane. tagger counts each\n\
         pod's calls (caller → Service, both lanes) and what each pod received; the report follows\n\
         the gray lane along them."
    );
    checks.push(show_cli(&sb, &["lanes", "coverage"], "gray stops at demo/b"));
    checks.push(coverage_break(&sb));

    let ok = report(&checks);
    if keep && ok {
        explore(&sb, &yaml, &metrics);
    }
    drop((edge, node));
    ok
}

/// Step 1: nginx at the edge, as the article's gateway: the requests with the lane header, then
/// the split of the others, counted against the binomial distribution. The requests come from
/// inside the edge pod (standing in for the Internet). Returns nginx, kept until the end.
fn edge(sb: &AgentSandbox, checks: &mut Vec<Check>) -> Option<Nginx> {
    let nginx = match demo_node::start_edge(sb) {
        Ok(nginx) => nginx,
        Err(e) => {
            println!("{e}");
            let observed = e.lines().next().unwrap_or_default().to_owned();
            checks.push(Check {
                step: "1. nginx at the edge".into(),
                expected: "serving".into(),
                observed,
                ok: false,
            });
            return None;
        }
    };
    let to = demo_node::edge_addr(sb);
    println!(
        "Debian's nginx in pod {EDGE}, listening on {to}, proxying to the gateway pods' addresses as\n\
         ingress-nginx proxies to a Service's endpoints ({}):",
        nginx.config_file().display()
    );
    for line in nginx.routing().lines() {
        println!("  {line}");
    }
    println!(
        "The requests come from inside the {EDGE} pod, standing in for the users. Only the edge reads the\n\
         header: the gateways and services do not pass it on, tagger keeps each call in its caller's lane."
    );
    let gray_entry = format!("gw-gray[gray] -> {GRAY_PATH}");
    let base_entry = format!("gw-base[base] -> {BASE_PATH}");

    let (name, value) = EDGE_HEADER;
    let with_header = demo_node::send_with(sb, EDGE, to, EDGE_HEADER_REQUESTS, Some(EDGE_HEADER));
    print_paths(&format!("edge, `{name}: {value}`: path taken"), &with_header);
    let n = usize::try_from(EDGE_SPLIT_REQUESTS).expect("request count");
    let plain = demo_node::send(sb, EDGE, to, n);
    print_paths("edge, no header: path taken", &plain);

    checks.push(Check {
        step: format!("1. edge, `{name}: {value}`"),
        expected: format!("{EDGE_HEADER_REQUESTS}× {gray_entry}"),
        observed: observed(&with_header),
        ok: with_header.len() == 1 && with_header.get(&gray_entry) == Some(&EDGE_HEADER_REQUESTS),
    });
    checks.push(split(&plain));
    // Wherever a request entered, it kept that lane up to where the lane has no version.
    let strays: usize = with_header
        .iter()
        .chain(&plain)
        .filter(|(path, _)| **path != gray_entry && **path != base_entry)
        .map(|(_, n)| n)
        .sum();
    checks.push(Check {
        step: "1. edge: the lane holds after the gateway".into(),
        expected: "gw-gray → a-gray → b-base …, gw-base → a-base → …".into(),
        observed: format!("{strays} of {} requests took another path", EDGE_HEADER_REQUESTS + n),
        ok: strays == 0,
    });
    Some(nginx)
}

/// Counts the edge's split of the requests without the header: how many entered at gw-gray,
/// against the band chance allows a correct split, with the reasoning printed.
fn split(plain: &Paths) -> Check {
    let count = |gateway: &str| -> u64 {
        let n: usize =
            plain.iter().filter(|(p, _)| p.starts_with(&format!("{gateway}["))).map(|(_, n)| n).sum();
        u64::try_from(n).expect("count")
    };
    let (gray, base) = (count("gw-gray"), count("gw-base"));
    let failed = EDGE_SPLIT_REQUESTS - gray - base;
    let p = f64::from(EDGE_GRAY_PERCENT) / 100.0;
    let band = Band::new(EDGE_SPLIT_REQUESTS, p, SPLIT_SIGMAS);
    let share = |k: u64| format!("{:.1}%", percent(k, EDGE_SPLIT_REQUESTS));
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        format!("edge, {EDGE_SPLIT_REQUESTS} requests without the header"),
        "requests".into(),
        "share".into(),
        "accepted".into(),
    ]);
    t.add_row(["to gw-gray".into(), gray.to_string(), share(gray), format!("{}–{}", band.lo, band.hi)]);
    t.add_row(["to gw-base".into(), base.to_string(), share(base), String::new()]);
    t.add_row(["failed".into(), failed.to_string(), share(failed), "0".into()]);
    println!("{t}");
    println!(
        "Why that band: nginx's split_clients hashes $request_id, random for every request, so each request\n\
         goes gray with probability p = {p} independently of the others, and the number that goes gray\n\
         among N = {N} follows the binomial distribution B({N}, {p}): mean N·p = {mean:.0},\n\
         σ = √(N·p·(1−p)) = {sd:.2}. The check accepts the mean ± {SPLIT_SIGMAS}σ, {lo}–{hi} ({lo_pct:.1}%–{hi_pct:.1}%).\n\
         Summed from that distribution, a correct {EDGE_GRAY_PERCENT}% split falls outside with probability {miss};\n\
         a {half}% split would still pass with probability {low}, a {more}% split {high}.",
        N = band.n,
        mean = band.mean(),
        sd = band.sd(),
        lo = band.lo,
        hi = band.hi,
        lo_pct = percent(band.lo, band.n),
        hi_pct = percent(band.hi, band.n),
        miss = probability(1.0 - band.probability_inside(p)),
        half = f64::from(EDGE_GRAY_PERCENT) * 0.5,
        low = probability(band.probability_inside(p * 0.5)),
        more = f64::from(EDGE_GRAY_PERCENT) * 1.5,
        high = probability(band.probability_inside(p * 1.5)),
    );
    Check {
        step: format!("1. edge, no header: {EDGE_GRAY_PERCENT}% to gray"),
        expected: format!(
            "{}–{} of {EDGE_SPLIT_REQUESTS} to gw-gray (±{SPLIT_SIGMAS}σ), 0 failed",
            band.lo, band.hi
        ),
        observed: format!("{gray} ({}) to gw-gray, {failed} failed", share(gray)),
        ok: band.contains(gray) && failed == 0,
    }
}

fn percent(k: u64, n: u64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "request counts are far below 2^52")]
    let (k, n) = (k as f64, n as f64);
    100.0 * k / n
}

/// A small probability in words, to two significant figures: `about 1 in 14000`.
fn probability(p: f64) -> String {
    if p <= 0.0 {
        return "0".into();
    }
    let one_in = 1.0 / p;
    // Two significant figures: round to a power of ten two digits below the leading one.
    let step = 10f64.powf((one_in.log10().floor() - 1.0).max(0.0));
    format!("about 1 in {}", (one_in / step).round() * step)
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
        step: "5. rolling update under load".into(),
        expected: "0 failed requests, every new pod served".into(),
        observed: format!("{} of {} failed, {} resets", r.failed, r.requests, r.resets),
        ok: r.failed == 0 && r.requests > 0 && all_served && r.resets == 0,
    }
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
        let calls = match demo_node::PODS.iter().find(|p| p.name == name).and_then(|p| p.calls) {
            Some(next) => format!("Service {}", service(next)),
            None if name == EDGE => "gw-gray, gw-base (nginx: the gateway pods' addresses)".into(),
            None => "-".into(),
        };
        t.add_row([name.as_str(), &lane, &sb.ip4(name).to_string(), &serves, &calls]);
    }
    println!("{t}");
    println!("Kubernetes objects: {} (tagger-agent --source file:{})", yaml.display(), yaml.display());
}

/// `A` for Service a's address; the address itself for anything else.
fn service(addr: SocketAddr) -> String {
    demo_node::service_name(addr).map_or_else(|| addr.to_string(), str::to_uppercase)
}

/// Sends requests from a pod to a Service and checks every one took `expected`.
fn traffic(sb: &AgentSandbox, step: &str, from: &str, service_addr: SocketAddr, expected: &str) -> Check {
    let paths = demo_node::send(sb, from, service_addr, REQUESTS);
    print_paths(&format!("{from} → Service {}: path taken", service(service_addr)), &paths);
    let ok = paths.len() == 1 && paths.get(expected) == Some(&REQUESTS);
    Check { step: step.into(), expected: format!("{REQUESTS}× {expected}"), observed: observed(&paths), ok }
}

fn print_paths(title: &str, paths: &Paths) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([title, "requests"]);
    for (p, n) in paths {
        t.add_row([p.clone(), n.to_string()]);
    }
    println!("{t}");
}

fn observed(paths: &Paths) -> String {
    paths.iter().map(|(p, n)| format!("{n}× {p}")).collect::<Vec<_>>().join("; ")
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

/// The coverage report as JSON: gray's one break point is B, because C (which B calls) has a
/// gray version; and the graph for graphviz, rendered when graphviz is installed.
fn coverage_break(sb: &AgentSandbox) -> Check {
    let (status, r) = tagger_tests::agent::cli_json(&sb.pins.0, &["lanes", "coverage"]);
    let gray = r["lanes"].as_array().and_then(|l| l.iter().find(|l| l["lane"] == "gray"));
    let breaks: Vec<String> = gray
        .and_then(|g| g["stops"].as_array())
        .into_iter()
        .flatten()
        .filter(|s| s["breaks"] == true)
        .map(|s| {
            let callees: Vec<String> = s["lane_capable_callees"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    format!("{}/{}", c["namespace"].as_str().unwrap_or(""), c["name"].as_str().unwrap_or(""))
                })
                .collect();
            format!(
                "{}/{} (calls {})",
                s["service"]["namespace"].as_str().unwrap_or(""),
                s["service"]["name"].as_str().unwrap_or(""),
                callees.join(", ")
            )
        })
        .collect();
    let graph = demo_node::coverage_graph(sb);
    match &graph.svg {
        Some(Ok(svg)) => {
            // The sandbox's directory goes with it: the picture is kept in target/demo/.
            let kept = std::env::current_exe()
                .ok()
                .and_then(|exe| Some(exe.parent()?.parent()?.join("demo")))
                .filter(|dir| std::fs::create_dir_all(dir).is_ok())
                .map(|dir| dir.join("lanes.svg"))
                .filter(|kept| std::fs::copy(svg, kept).is_ok());
            let shown = kept.as_deref().unwrap_or(svg);
            println!("$ tagger lanes coverage -o dot | dot -Tsvg    (the picture: {})", shown.display());
        }
        Some(Err(e)) => println!("(graphviz refused the graph in {}: {e})", graph.dot_file.display()),
        None => println!("(graphviz is not installed: the graph is in {})", graph.dot_file.display()),
    }
    let observed = if breaks.is_empty() { "no break point".to_owned() } else { breaks.join("; ") };
    Check {
        step: "6. gray's break point (-o json)".into(),
        expected: "demo/b (calls demo/c), and only there".into(),
        ok: status.success()
            && graph.listed
            && !matches!(graph.svg, Some(Err(_)))
            && observed == "demo/b (calls demo/c)",
        observed,
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
    println!("  {} --bpffs {bpffs} lanes coverage", tagger.display());
    println!("  {} --bpffs {bpffs} explain --pod demo/gw-gray {A}", tagger.display());
    println!(
        "  {} --cgroup {} --netns {} http {A} 5",
        testpod.display(),
        sb.pod_cgroup("gw-gray").display(),
        sb.netns["gw-gray"].ns.name()
    );
    let (name, value) = EDGE_HEADER;
    println!(
        "  {} --cgroup {} --netns {} http {} 5 --header {name}:{value}",
        testpod.display(),
        sb.pod_cgroup(EDGE).display(),
        sb.netns[EDGE].ns.name(),
        demo_node::edge_addr(sb)
    );
    println!("  curl -s http://{metrics}/metrics");
    println!("  edit {} (the agent re-reads it)", yaml.display());
    println!("Press Ctrl-C to tear the sandbox down.");
    while !tagger_tests::signals::interrupted() {
        std::thread::sleep(Duration::from_millis(200));
    }
}
