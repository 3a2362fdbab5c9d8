//! `cargo xtask bench [--quick] [--out DIR]`: tagger against direct connections, kube-proxy-style
//! iptables and a userspace proxy (haproxy), in one run on this machine, reported as ratios.
//!
//! Steps: bootstrap (haproxy and iptables come from Debian), build the benchmark binaries in
//! release mode, run `datapath-bench` (connection rate, established connections, hook cost,
//! fallback), `control-plane-bench` (initial sync, RSS, event → map write) and `rollout-bench` (a
//! rolling update under load: failed requests of all sent), then write the
//! report and its chart. A full run writes `docs/BENCHMARKS.md` (only its generated block) and
//! `docs/benchmarks-conn-rate.png`; `--quick` writes to `target/bench/` so the committed figures
//! stay those of a full run. Raw results stay in `target/bench/`.

mod chart;
mod report;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    bootstrap, cleanup,
    shell::{self, output, step, workspace_root},
};

/// Where the chart goes, next to the report.
pub const CHART: &str = "benchmarks-conn-rate.png";

/// Runs the benchmarks and writes the report.
pub fn run(quick: bool, out: Option<&Path>) -> Result<()> {
    crate::require_root("bench")?;
    bootstrap::run_all()?;
    bootstrap::check_kernel()?;
    shell::step("clean leftovers of earlier runs");
    cleanup::leftovers();
    shell::step("build the benchmark binaries (release)");
    shell::cargo(&[
        "build",
        "--release",
        "-p",
        "tagger-tests",
        "--bin",
        "datapath-bench",
        "--bin",
        "loadgen",
        "--bin",
        "control-plane-bench",
        "--bin",
        "rollout-bench",
        "--bin",
        "testpod",
        "-p",
        "tagger-userspace",
        "--bin",
        "tagger-agent",
    ])?;
    let root = workspace_root();
    let raw = root.join("target/bench");
    std::fs::create_dir_all(&raw).context("create target/bench")?;
    let out_dir = match out {
        Some(d) => d.to_owned(),
        None if quick => raw.clone(),
        None => root.join("docs"),
    };
    let machine = report::Machine::probe(&root);
    let started = Instant::now();

    // Ctrl-C reaches the benchmark binaries directly from the terminal; they tear their
    // sandboxes down. xtask only waits for them. datapath-bench works in a private mount
    // namespace (its own /run/netns and bpffs), so a `cargo xtask test` elsewhere on the machine
    // does not sweep its namespaces and pins away in the middle of a run.
    ignore_interrupts();
    let datapath_json = raw.join("datapath.json");
    let _ = std::fs::remove_file(&datapath_json);
    step(if quick {
        "datapath benchmarks, quick (about 1.5 minutes)"
    } else {
        "datapath benchmarks (about 8 minutes)"
    });
    let bin = root.join("target/release");
    let mut cmd = Command::new(bin.join("datapath-bench"));
    cmd.arg("--out").arg(&datapath_json);
    if quick {
        cmd.arg("--quick");
    }
    let datapath = shell::run(&mut cmd);

    step("control-plane benchmark (control-plane-bench: 10,000 pods, 5,000 Services, 100,000 endpoints)");
    let mut cp = Command::new(bin.join("control-plane-bench"));
    if quick {
        cp.args(["--changes", "50"]);
    }
    let control_plane = run_capture(&mut cp);
    if datapath.is_err() || control_plane.is_err() {
        // The binaries clean up after themselves (also on Ctrl-C); after a crash, sweep.
        cleanup::leftovers();
    }
    datapath?;
    let mut control_plane = control_plane?;
    step("rolling update under load (rollout-bench: 16 keep-alive clients, 4 backends replaced one by one)");
    control_plane.push_str(&run_capture(&mut Command::new(bin.join("rollout-bench")))?);
    std::fs::write(raw.join("control-plane.txt"), &control_plane).context("write control-plane.txt")?;

    let data: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&datapath_json)
            .with_context(|| format!("read {}", datapath_json.display()))?,
    )
    .context("parse datapath.json")?;
    let machine = machine.finish(started.elapsed(), quick);
    let report = report::Report::new(&data, &control_plane, machine);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let chart_path = out_dir.join(CHART);
    chart::draw(&report, &chart_path)?;
    let md_path = out_dir.join("BENCHMARKS.md");
    report.write(&md_path)?;
    step("report");
    println!("{}", report.summary());
    println!("    written: {} and {}", md_path.display(), chart_path.display());
    println!("    raw results: {}", raw.display());
    Ok(())
}

/// Runs a command, echoing and returning its stdout (stderr is inherited).
fn run_capture(cmd: &mut Command) -> Result<String> {
    use std::io::{BufRead as _, BufReader};
    let shown = format!("{cmd:?}");
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("cannot start {shown}"))?;
    let mut text = String::new();
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line.context("read output")?;
        println!("{line}");
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait().context("wait")?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(text)
}

/// xtask survives Ctrl-C while its children clean up (exec restores the default in them).
fn ignore_interrupts() {
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, ignore as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, ignore as *const () as libc::sighandler_t);
    }
}

/// `git rev-parse --short HEAD`, with `+dirty` when the work tree has changes.
fn git_revision(root: &Path) -> String {
    let rev = output("git", &["-C", &root.to_string_lossy(), "rev-parse", "--short", "HEAD"])
        .map_or_else(|| "unknown".to_owned(), |s| s.trim().to_owned());
    let dirty = output("git", &["-C", &root.to_string_lossy(), "status", "--porcelain"])
        .is_some_and(|s| !s.trim().is_empty());
    if dirty { format!("{rev}+dirty") } else { rev }
}
