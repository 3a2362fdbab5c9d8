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

/// Test binaries (by name prefix) the guests run.
const TEST_PREFIXES: [&str; 2] = ["datapath_", "agent_"];
/// Test binaries the guests do not run, and why (they run on the host). (datapath_atomic was
/// here until replaced generations got a grace period before deletion.)
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
/// The test binary of the cgroup v1-only host: its test is ignored on a normal run; each kernel
/// boots a second guest that mounts only cgroup v1 hierarchies and runs it with `--ignored`.
const CGROUP_V1_TEST: &str = "agent_cgroup_v1";
/// Its test.
const CGROUP_V1_TEST_NAME: &str = "a_cgroup_v1_only_host_is_refused_clearly_and_nothing_is_attached";
/// Binaries the tests start from target/debug.
const BINS: [&str; 3] = ["testpod", "tagger", "tagger-agent"];

/// Options of one matrix run.
pub struct Options<'a> {
    /// Only test names containing this.
    pub filter: Option<&'a str>,
    /// The whole guest's time limit.
    pub timeout: Duration,
    /// Only these test binaries (empty: all); names as `datapath_mark`.
    pub binaries: &'a [String],
}

/// Runs the tests on each named kernel series; fails naming every failed run.
pub fn run(series: &[String], opts: &Options<'_>) -> Result<()> {
    let series: Vec<_> = series.iter().map(|s| kernels::series(s)).collect::<Result<_>>()?;
    let root = workspace_root();
    let cache = root.join("target/kernels");
    let (mut tests, mut v1_test) = build_tests(&root)?;
    if !opts.binaries.is_empty() {
        tests.retain(|(name, _)| opts.binaries.contains(name));
        v1_test = v1_test.filter(|_| opts.binaries.iter().any(|b| b == CGROUP_V1_TEST));
        if tests.is_empty() && v1_test.is_none() {
            bail!("--kernel-binary {}: no such guest test binary", opts.binaries.join(", "));
        }
    }
    // The v1-only guest runs when no filter is given or its test's name contains the filter.
    let v1_tests: Vec<TestBinary> = v1_test
        .filter(|_| opts.filter.is_none_or(|f| CGROUP_V1_TEST_NAME.contains(f)))
        .map(|p| vec![(CGROUP_V1_TEST.to_owned(), p)])
        .unwrap_or_default();
    let bins: Vec<PathBuf> = BINS.iter().map(|b| root.join("target/debug").join(b)).collect();
    let args: Vec<String> = opts.filter.map(str::to_owned).into_iter().collect();
    let v1_args = vec!["--ignored".to_owned()];
    let stage = root.join("target/kernel-matrix/stage");
    let mut stripped = BTreeSet::new();
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for s in series {
        step(&format!("kernel {}: fetch Debian's kernel", s.name));
        let kernel = kernels::fetch(s, &cache)?;
        let guests = [
            (s.name.to_owned(), tests.as_slice(), &args, false),
            (format!("{}-cgroup-v1", s.name), v1_tests.as_slice(), &v1_args, true),
        ];
        for (label, tests, args, cgroup_v1) in &guests {
            if tests.is_empty() {
                continue;
            }
            let contents = initramfs::Contents {
                tests,
                bins: &bins,
                test_args: args,
                test_timeout_s: opts.timeout.as_secs(),
                cgroup_v1: *cgroup_v1,
            };
            let image = root.join(format!("target/kernel-matrix/initramfs-{label}.cpio"));
            let outcome =
                run_guest(label, &kernel, &contents, (&stage, &mut stripped), &image, opts.timeout)?;
            summary.push(format!("{label} ({}): {}", kernel.release, outcome.describe()));
            if let Err(e) = outcome.verdict(tests.len()) {
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

/// A test binary: the name printed in results, and its path.
type TestBinary = (String, PathBuf);

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

/// Builds the test binaries and the binaries they run; returns (name, path) of each test binary
/// the normal guests run, and the cgroup v1-only guest's test binary.
fn build_tests(root: &Path) -> Result<(Vec<TestBinary>, Option<PathBuf>)> {
    // The same selection and flags as the host run (`cargo build --all-targets`, `cargo test`),
    // so both reuse one build: selecting a package alone would unify features differently.
    step("build the kernel test binaries (cargo test --no-run)");
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
    let mut tests = Vec::new();
    let mut v1 = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let kind = &msg["target"]["kind"];
        let is_test = msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && kind.as_array().is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(exe)) =
            (is_test, msg["target"]["name"].as_str(), msg["executable"].as_str())
            && TEST_PREFIXES.iter().any(|p| name.starts_with(p))
        {
            if name == CGROUP_V1_TEST {
                v1 = Some(PathBuf::from(exe));
                continue;
            }
            if let Some((_, why)) = NOT_IN_GUESTS.iter().find(|(n, _)| *n == name) {
                status(&format!("{name}: skipped in the guests"), why);
                continue;
            }
            tests.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    tests.sort();
    if tests.is_empty() {
        bail!("cargo test --no-run produced no datapath_*/agent_* test binaries");
    }
    status("test binaries", &tests.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(" "));
    Ok((tests, v1))
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
            "{passed}/{} test binaries passed, {} tests skipped for missing kernel features, {:.0} s{}",
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
            bail!("{} of {expected} test binaries reported", self.results.len());
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
