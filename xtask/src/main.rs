//! Developer tasks: `cargo xtask setup | test | demo`.
//!
//! Every task first runs the same idempotent bootstrap (toolchain components, Debian packages,
//! bpf-linker), printing each step and skipping what is already present.

mod bench;
mod bootstrap;
mod cleanup;
mod deny;
mod image;
mod matrix;
mod shell;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "tagger developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Bootstrap, then run formatting, lint and `cargo deny` checks, unit tests and, as root, the
    /// kernel integration tests on this kernel and then in qemu on Debian's 5.10, 6.1 and 6.12.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Only run tests whose name contains this string.
        filter: Option<String>,
        /// Run only the kernel integration tests, inside qemu (TCG) on this Debian kernel series
        /// (5.10, 6.1, 6.12; repeatable, or `all`) instead of on the host.
        #[arg(long, value_name = "SERIES")]
        kernel: Vec<String>,
        /// Skip the kernel matrix (the kernel tests in qemu on Debian's 5.10, 6.1 and 6.12) that a
        /// full run does after the host's tests.
        #[arg(long)]
        no_kernel_matrix: bool,
        /// Time limit of each qemu guest, in minutes.
        #[arg(long, default_value_t = 40, value_name = "MINUTES")]
        kernel_timeout: u64,
        /// With --kernel: run only this area of the integration tests in the guests (its module,
        /// e.g. `datapath_wire`; repeatable). The cgroup v1-only guest runs only if
        /// `agent_cgroup_v1` is named.
        #[arg(long, value_name = "AREA", requires = "kernel", alias = "kernel-binary")]
        kernel_area: Vec<String>,
        /// Tests of one area run at once in a guest (each guest has 2 vCPUs; one at a time took
        /// twice as long).
        #[arg(long, default_value_t = 2, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=8))]
        kernel_test_threads: u16,
    },
    /// Remove namespaces, cgroups and pins left by an interrupted test run.
    Clean,
    /// The end-to-end demo on a sandboxed node: the MSE gray-release story with live traffic.
    Demo {
        /// Leave the sandbox running (with the commands to explore it) until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Build the container image (static musl binaries, FROM scratch, buildah), check that its
    /// binaries run, save it under target/image/, and print its size and digest.
    Image(image::ImageArgs),
    /// Benchmarks against direct, iptables and haproxy; writes docs/BENCHMARKS.md and its chart.
    Bench {
        /// A run under 3 minutes, written to target/bench/ (not docs/).
        #[arg(long)]
        quick: bool,
        /// Write the report and chart to this directory instead.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => bootstrap::run_all(),
        Task::Clean => {
            require_root("clean")?;
            cleanup::leftovers();
            Ok(())
        }
        Task::Test {
            no_lint,
            filter,
            kernel,
            no_kernel_matrix,
            kernel_timeout,
            kernel_area,
            kernel_test_threads,
        } => {
            let guests = |series: &[String], areas: &[String]| {
                let opts = matrix::Options {
                    filter: filter.as_deref(),
                    timeout: std::time::Duration::from_secs(kernel_timeout * 60),
                    areas,
                    test_threads: usize::from(kernel_test_threads),
                };
                kernel_matrix(series, &opts)
            };
            if kernel.is_empty() {
                test(no_lint, filter.as_deref())?;
                if no_kernel_matrix {
                    return Ok(());
                }
                guests(&["all".to_owned()], &[])
            } else {
                guests(&kernel, &kernel_area)
            }
        }
        Task::Demo { keep } => demo(keep),
        Task::Bench { quick, out } => bench::run(quick, out.as_deref()),
        Task::Image(args) => image::run_task(&args),
    }
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "`cargo xtask {what}` must run as root: the kernel tests create network namespaces, cgroups and \
             BPF programs (try `sudo -E cargo xtask {what}`)"
        );
    }
    Ok(())
}

fn test(no_lint: bool, filter: Option<&str>) -> Result<()> {
    require_root("test")?;
    bootstrap::run_all()?;
    bootstrap::check_kernel()?;
    shell::step("clean leftovers of earlier runs");
    cleanup::leftovers();
    shell::step("build the workspace (stable; the eBPF object is built by tagger-userspace's build.rs)");
    shell::cargo(&["build", "--all-targets"])?;
    if !no_lint {
        shell::step("cargo fmt --check");
        shell::cargo(&["fmt", "--all", "--", "--check"])?;
        shell::step("cargo clippy -D warnings");
        shell::cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
        deny::check()?;
    }
    // Built first: the integration tests' deploy_image area runs it from the DaemonSet's pod
    // template.
    let image = image::test_step()?;
    shell::step("unit and kernel integration tests (the image's test runs it with podman)");
    let mut args = vec!["test", "--no-fail-fast"];
    if let Some(f) = filter {
        args.extend(["--", f]);
    }
    let result = shell::cargo_with(&args, &[("TAGGER_TEST_IMAGE", image.name())]);
    shell::step("clean up after the tests");
    cleanup::leftovers();
    drop(image);
    result?;
    shell::step("the demo, as a smoke test (`cargo xtask demo`)");
    run_demo(false)
}

/// The kernel tests in qemu guests. Nothing is created on the host (no namespaces, cgroups or
/// pins), so this does not clean leftovers either.
fn kernel_matrix(series: &[String], opts: &matrix::Options<'_>) -> Result<()> {
    require_root("test --kernel")?;
    bootstrap::run_all()?;
    let series: Vec<String> = if series.iter().any(|s| s == "all") {
        matrix::SERIES.iter().map(|s| s.name.to_owned()).collect()
    } else {
        series.to_vec()
    };
    matrix::run(&series, opts)
}

fn demo(keep: bool) -> Result<()> {
    require_root("demo")?;
    bootstrap::run_all()?;
    bootstrap::check_kernel()?;
    shell::step("clean leftovers of earlier runs");
    cleanup::leftovers();
    shell::step("build tagger-agent, tagger and the demo (stable; the eBPF object is built by build.rs)");
    shell::cargo(&["build", "--bins"])?;
    run_demo(keep)
}

/// Runs the demo binary. Ctrl-C reaches it (and its children) directly from the terminal; xtask
/// only waits, so the demo's own cleanup finishes before the prompt returns.
fn run_demo(keep: bool) -> Result<()> {
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing (async-signal-safe); exec resets it to the
    // default in the child, so only xtask itself outlives a Ctrl-C while the demo cleans up.
    unsafe {
        libc::signal(libc::SIGINT, ignore as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, ignore as *const () as libc::sighandler_t);
    }
    let bin = shell::workspace_root().join("target/debug/tagger-demo");
    let mut cmd = std::process::Command::new(&bin);
    if keep {
        cmd.arg("--keep");
    }
    let result = shell::run(&mut cmd);
    cleanup::leftovers();
    result
}
