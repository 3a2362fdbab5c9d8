//! The kernel matrix: the kernel integration tests inside qemu (TCG: nested KVM hangs on these
//! machines) on Debian's kernels, one guest per kernel. See docs/RELIABILITY.md.

mod cpio;
mod initramfs;
mod kernels;

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub use kernels::SERIES;

use crate::shell::{status, step, workspace_root};
use initramfs::MARK;

/// The integration test binary (`tests/tests/integration`, one module per area).
const TEST_BINARY: &str = "integration";
/// Test areas (modules, by name prefix) the guests run.
const AREA_PREFIXES: [&str; 2] = ["datapath_", "agent_"];
/// Areas the guests do not run, and why (they run on the host). (datapath_atomic was here until
/// replaced generations got a grace period before deletion.)
const NOT_IN_GUESTS: [(&str, &str); 2] = [
    (
        "agent_capacity",
        "it has the debug-build agent decode and install over 65,536 Services (about 30 s on the \
         host, many minutes under TCG); the guests fill every map kernel-side in datapath_scale",
    ),
    (
        "datapath_mark",
        "it observes marks with iptables and sets sysctls through `ip netns exec`, which the guests' \
         initramfs does not carry (nor the xt_mark, br_netfilter and cls_bpf modules): the host runs it, \
         in both TCX and netlink mode",
    ),
];
/// The area of the cgroup v1-only host: its test is ignored on a normal run; each kernel boots a
/// second guest that mounts only cgroup v1 hierarchies and runs it with `--ignored`.
const CGROUP_V1_AREA: &str = "agent_cgroup_v1";
/// Binaries the tests start from target/debug.
const BINS: [&str; 3] = ["testpod", "tagger", "tagger-agent"];

/// Options of one matrix run.
pub struct Options<'a> {
    /// Only test names containing this.
    pub filter: Option<&'a str>,
    /// The whole guest's time limit.
    pub timeout: Duration,
    /// Only these areas (empty: all); names as `datapath_mark`.
    pub areas: &'a [String],
    /// Tests of one area run at once in a guest.
    pub test_threads: usize,
}

/// An area the guest runs: its name and the full names of its tests (run with `--exact`).
pub type Area = (String, Vec<String>);

/// Runs the tests on each named kernel series; fails naming every failed run.
pub fn run(series: &[String], opts: &Options<'_>) -> Result<()> {
    let series: Vec<_> = series.iter().map(|s| kernels::series(s)).collect::<Result<_>>()?;
    let root = workspace_root();
    let cache = root.join("target/kernels");
    let (binary, names) = build_tests(&root)?;
    let (mut areas, mut v1_areas) = areas_of(&names, opts.filter);
    if !opts.areas.is_empty() {
        let known: Vec<&str> = areas.iter().chain(&v1_areas).map(|(name, _)| name.as_str()).collect();
        let unknown: Vec<&str> =
            opts.areas.iter().map(String::as_str).filter(|name| !known.contains(name)).collect();
        if !unknown.is_empty() {
            bail!(
                "--kernel-area {}: not an area the guests run{} (they run: {})",
                unknown.join(", "),
                if opts.filter.is_some() { ", or none of its tests matches the filter" } else { "" },
                known.join(", ")
            );
        }
        areas.retain(|(name, _)| opts.areas.contains(name));
        v1_areas.retain(|(name, _)| opts.areas.contains(name));
    }
    if areas.is_empty() && v1_areas.is_empty() {
        bail!("no guest test matches {:?}", opts.filter.unwrap_or(""));
    }
    let bins: Vec<PathBuf> = BINS.iter().map(|b| root.join("target/debug").join(b)).collect();
    let no_args: Vec<String> = Vec::new();
    let v1_args = vec!["--ignored".to_owned()];
    let stage = root.join("target/kernel-matrix/stage");
    let mut stripped = BTreeSet::new();
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for s in series {
        step(&format!("kernel {}: fetch Debian's kernel", s.name));
        let kernel = kernels::fetch(s, &cache)?;
        let guests = [
            (s.name.to_owned(), areas.as_slice(), &no_args, false),
            (format!("{}-cgroup-v1", s.name), v1_areas.as_slice(), &v1_args, true),
        ];
        for (label, areas, args, cgroup_v1) in &guests {
            if areas.is_empty() {
                continue;
            }
            let contents = initramfs::Contents {
                binary: &binary,
                areas,
                bins: &bins,
                test_args: args,
                test_timeout_s: opts.timeout.as_secs(),
                test_threads: opts.test_threads,
                cgroup_v1: *cgroup_v1,
            };
            let image = root.join(format!("target/kernel-matrix/initramfs-{label}.cpio"));
            let outcome =
                run_guest(label, &kernel, &contents, (&stage, &mut stripped), &image, opts.timeout)?;
            summary.push(format!("{label} ({}): {}", kernel.release, outcome.describe()));
            if let Err(e) = outcome.verdict(areas.len()) {
                failures.push(format!("kernel {label}: {e}"));
            }
        }
    }
    initramfs::prune_stage(&stage, &stripped);
    step("kernel matrix summary");
    for line in &summary {
        status("kernel", line);
    }
    if !failures.is_empty() {
        bail!("kernel matrix failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Builds the initramfs `image` with `contents` for `kernel` (stripped binaries cached in the
/// stage directory, recorded as used), boots it, and removes the image.
fn run_guest(
    label: &str,
    kernel: &kernels::Kernel,
    contents: &initramfs::Contents<'_>,
    (stage, stripped): (&Path, &mut BTreeSet<PathBuf>),
    image: &Path,
    limit: Duration,
) -> Result<Outcome> {
    step(&format!("kernel {label}: initramfs with the test binaries"));
    let size = initramfs::build(kernel, contents, stage, image, stripped)?;
    status("initramfs", &format!("{} ({} MiB)", image.display(), size >> 20));
    step(&format!("kernel {label} ({}): boot under qemu -accel tcg and run the tests", kernel.release));
    let outcome = boot(label, &kernel.vmlinuz, image, limit);
    // Rebuilt on every run; 125 MiB per kernel is not worth keeping.
    let _ = std::fs::remove_file(image);
    outcome
}

/// Builds the test binaries and the binaries they run; returns the integration binary's path
/// and the full names of its tests (from `--list`).
fn build_tests(root: &Path) -> Result<(PathBuf, Vec<String>)> {
    // The same selection and flags as the host run (`cargo build --all-targets`, `cargo test`),
    // so both reuse one build: selecting a package alone would unify features differently.
    step("build the kernel test binary (cargo test --no-run)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::shell::run(Command::new(&cargo).args(["build", "--all-targets"]).current_dir(root))?;
    let out = Command::new(&cargo)
        .args(["test", "--no-run", "--message-format=json"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("run cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed");
    }
    let binary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|msg| {
            msg["reason"] == "compiler-artifact"
                && msg["profile"]["test"] == true
                && msg["target"]["name"] == TEST_BINARY
                && msg["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .and_then(|msg| msg["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo test --no-run produced no `{TEST_BINARY}` test binary"))?;
    // `--list` runs nothing: it needs neither root nor a kernel feature.
    let list =
        Command::new(&binary).args(["--list", "--format", "terse"]).output().context("list the tests")?;
    if !list.status.success() {
        bail!("{} --list failed", binary.display());
    }
    let names = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect();
    Ok((binary, names))
}

/// The guests' areas from the binary's test names (`area::test`): the normal guests', and the
/// cgroup v1-only guest's. Only names containing `filter`, when given.
fn areas_of(names: &[String], filter: Option<&str>) -> (Vec<Area>, Vec<Area>) {
    let mut areas = std::collections::BTreeMap::<String, Vec<String>>::new();
    for name in names.iter().filter(|n| filter.is_none_or(|f| n.contains(f))) {
        let Some((area, _)) = name.split_once("::") else { continue };
        if AREA_PREFIXES.iter().any(|p| area.starts_with(p)) {
            areas.entry(area.to_owned()).or_default().push(name.clone());
        }
    }
    let v1: Vec<Area> = areas.remove_entry(CGROUP_V1_AREA).into_iter().collect();
    for (name, why) in NOT_IN_GUESTS {
        if areas.remove(name).is_some() {
            status(&format!("{name}: skipped in the guests"), why);
        }
    }
    let areas: Vec<Area> = areas.into_iter().collect();
    status(
        "test areas",
        &areas.iter().map(|(n, t)| format!("{n} ({})", t.len())).collect::<Vec<_>>().join(" "),
    );
    (areas, v1)
}

/// What a guest reported.
#[derive(Debug, Default)]
struct Outcome {
    release: Option<String>,
    results: Vec<(String, i32, String)>,
    skipped: Vec<String>,
    fail: Option<String>,
    done: bool,
    timed_out: bool,
    elapsed: Duration,
}

impl Outcome {
    fn describe(&self) -> String {
        let passed = self.results.iter().filter(|r| r.1 == 0).count();
        format!(
            "{passed}/{} test areas passed, {} tests skipped for missing kernel features, {:.0} s{}",
            self.results.len(),
            self.skipped.len(),
            self.elapsed.as_secs_f64(),
            if self.timed_out { " (time limit hit)" } else { "" }
        )
    }

    fn verdict(&self, expected: usize) -> Result<()> {
        if let Some(f) = &self.fail {
            bail!("the guest's init failed: {f}");
        }
        if self.timed_out {
            bail!("the guest hit the time limit after {:.0} s", self.elapsed.as_secs_f64());
        }
        if !self.done {
            bail!("the guest stopped before reporting (kernel panic or crash: see the console above)");
        }
        let failed: Vec<String> =
            self.results.iter().filter(|r| r.1 != 0).map(|r| format!("{} (exit {})", r.0, r.1)).collect();
        if !failed.is_empty() {
            bail!("failed: {}", failed.join(", "));
        }
        if self.results.len() != expected {
            bail!("{} of {expected} test areas reported", self.results.len());
        }
        Ok(())
    }
}

/// Boots the kernel with the initramfs, echoes the console, and parses the markers. The guest is
/// killed (by pid: it is our child) when the time limit passes.
fn boot(series: &str, vmlinuz: &Path, initramfs: &Path, limit: Duration) -> Result<Outcome> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "3072"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nodefaults"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("start qemu-system-x86_64 (install qemu-system-x86: `cargo xtask setup`)")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if tx.send(String::from_utf8_lossy(&line).trim_end().to_owned()).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut o = Outcome::default();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                println!("[{series}] {line}");
                parse_line(&line, &mut o);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                o.timed_out = true;
                eprintln!("[{series}] time limit of {} s reached: killing qemu", limit.as_secs());
                let _ = child.kill();
                break;
            }
        }
    }
    let _ = child.wait();
    o.elapsed = start.elapsed();
    Ok(o)
}

fn parse_line(line: &str, o: &mut Outcome) {
    if let Some(rest) = line.split_once("tagger-tests: skipped").map(|(_, r)| r) {
        o.skipped.push(rest.trim().to_owned());
    }
    let Some(rest) = line.split_once(MARK).map(|(_, r)| r.trim()) else { return };
    let mut words = rest.split_whitespace();
    match words.next() {
        Some("kernel") => o.release = words.next().map(str::to_owned),
        Some("result") => {
            let name = words.next().unwrap_or("?").to_owned();
            let rc = words.next().and_then(|w| w.parse().ok()).unwrap_or(-1);
            let took = words.next().unwrap_or("").to_owned();
            status(&name, &format!("exit {rc} after {took}"));
            o.results.push((name, rc, took));
        }
        Some("fail") => o.fail = Some(words.collect::<Vec<_>>().join(" ")),
        Some("done") => o.done = true,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::{Outcome, parse_line};

    #[test]
    fn areas_come_from_the_test_names() {
        let names: Vec<String> = [
            "agent_capacity::fills",
            "agent_cgroup_v1::a_cgroup_v1_only_host",
            "agent_file::one",
            "agent_file::two",
            "cli::tables",
            "datapath_lanes::gray",
            "datapath_mark::marks",
            "deploy_image::runs",
        ]
        .map(str::to_owned)
        .to_vec();
        let (areas, v1) = super::areas_of(&names, None);
        assert_eq!(
            areas,
            [
                ("agent_file".to_owned(), vec!["agent_file::one".to_owned(), "agent_file::two".to_owned()]),
                ("datapath_lanes".to_owned(), vec!["datapath_lanes::gray".to_owned()]),
            ]
        );
        assert_eq!(
            v1,
            [("agent_cgroup_v1".to_owned(), vec!["agent_cgroup_v1::a_cgroup_v1_only_host".to_owned()])]
        );
        let (areas, v1) = super::areas_of(&names, Some("two"));
        assert_eq!(areas, [("agent_file".to_owned(), vec!["agent_file::two".to_owned()])]);
        assert!(v1.is_empty());
    }

    #[test]
    fn markers_are_parsed_and_judged() {
        let mut o = Outcome::default();
        for l in [
            "[    1.0] random kernel line",
            "TAGGER-MATRIX kernel 6.1.0-56-cloud-amd64",
            "TAGGER-MATRIX result datapath_lanes 0 12s",
            "tagger-tests: skipped socket destroy: needs bpf_sock_destroy (Linux 6.5)",
            "\rTAGGER-MATRIX result datapath_pins 101 3s",
            "TAGGER-MATRIX done",
        ] {
            parse_line(l, &mut o);
        }
        assert_eq!(o.release.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(o.results.len(), 2);
        assert_eq!(o.skipped.len(), 1);
        assert!(o.done);
        let err = o.verdict(2).unwrap_err().to_string();
        assert!(err.contains("datapath_pins (exit 101)"), "{err}");
        o.results.pop();
        assert!(o.verdict(2).is_err(), "a missing result fails the run");
        assert!(o.verdict(1).is_ok());
    }
}
