//! `tagger-agent`, the node daemon: installs (or adopts) the pinned datapath on kubelet's pods
//! cgroup (below the cgroup root, so its programs run before those attached at the root),
//! watches its source (the Kubernetes API or a YAML file) and the lanes config, and keeps the
//! maps equal to what they describe.
//!
//! Threads: a tokio runtime drives the sources (kube-rs watchers or file pollers); one reconciler
//! thread owns the maps and applies the difference whenever a source signals a change. At start
//! the datapath is installed on a thread of its own while the sources already list; the
//! reconciler starts once it is there. Stopping
//! (SIGTERM, SIGINT) leaves the datapath attached and filled.

mod addrs;
mod args;
mod datapath_log;
mod lease;
mod marking;
mod metrics;
mod publish;
mod reconcile_loop;
mod status;
mod transitions;

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
pub use args::{Args, Source};
pub use reconcile_loop::{ReconcileReport, Reconciler};
pub use status::{AgentStatus, METRICS_CACHE_TTL};
use tracing::{error, info, warn};

use crate::{
    cgroup::{AttachChoice, AttachPoint},
    config::lanes::LanesConfig,
    datapath::Datapath,
    model::lanes::LaneSettings,
    source::{
        Inputs, InputsHandle, Report, Wake, file,
        kube::{self as kube_source, line_limit},
        poll,
        tasks::Tasks,
    },
};

/// Waits for the datapath install started by [`run`] (once; later calls find nothing to join).
fn join_install(
    install: &mut Option<std::thread::JoinHandle<Result<(Datapath, crate::datapath::Installed)>>>,
) -> Result<(Datapath, crate::datapath::Installed)> {
    let handle = install.take().context("the datapath install was already joined")?;
    handle.join().map_err(|_| anyhow::anyhow!("the datapath install panicked"))?
}

/// Reports the reconciler thread dead if it unwinds (a panic); a normal return is a stop.
struct PanicNotice(Arc<AgentStatus>);

impl Drop for PanicNotice {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.part_died("reconciler", "panicked");
        }
    }
}

/// Runs the reconciler on a thread of its own; a panic there is reported ([`PanicNotice`]).
fn spawn_reconciler(
    mut reconciler: Reconciler,
    wake: std::sync::mpsc::Receiver<Wake>,
    inputs: InputsHandle,
    lanes: Arc<std::sync::Mutex<LaneSettings>>,
    status: &Arc<AgentStatus>,
) -> Result<std::thread::JoinHandle<()>> {
    let notice = PanicNotice(Arc::clone(status));
    std::thread::Builder::new()
        .name("reconciler".into())
        .spawn(move || {
            let _notice = notice;
            reconciler.run(&wake, &inputs, &lanes);
        })
        .context("spawning the reconciler")
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: &Args) -> Result<()> {
    if args.uninstall {
        Datapath::uninstall(&args.bpffs).with_context(|| format!("uninstalling {}", args.bpffs.display()))?;
        info!(bpffs = %args.bpffs.display(), "uninstalled: links detached, pins removed");
        return Ok(());
    }
    // glibc gives each thread its own arena by default, each keeping freed memory: two arenas
    // keep the agent's memory flat under churn.
    crate::sys::limit_malloc_arenas(2);
    let config = args.validate()?;
    // The lanes config becomes desired state here and on each reload, once.
    let lanes = match &args.lanes_config {
        Some(path) => LaneSettings::of(&load_lanes(path)?),
        None => LaneSettings::default(),
    };
    // Name a missing capability before the kernel answers a bare EPERM.
    crate::caps::check_agent()?;
    // Loading the programs (the verifier) takes a fifth of a second: the sources start their
    // lists meanwhile, and the changes they queue wait for the reconciler, which starts once the
    // datapath is there.
    let status = Arc::new(AgentStatus::default());
    status.set_stall_after(Duration::from_secs(args.reconciler_stall_after));
    report_attach_point(&config.attach, &status);
    let mut install = Some(spawn_install(args, &config, &status)?);

    let lanes = Arc::new(std::sync::Mutex::new(lanes));
    let (wake_tx, wake_rx) = std::sync::mpsc::channel::<Wake>();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tagger-io")
        .build()
        .context("starting the tokio runtime")?;
    let mut reconciler_thread = None;
    let mut marking = None;
    let result: Result<()> = runtime.block_on(async {
        let mut tasks = Tasks::new();
        let report: Arc<dyn Report> = status.clone();
        let handle = match &args.source {
            Source::File(path) => {
                let shared = Arc::new(std::sync::Mutex::new(Inputs::default()));
                tasks.spawn("source file poller", file::watch_source_file(
                    path.clone(),
                    config.node_name.clone(),
                    Arc::clone(&shared),
                    wake_tx.clone(),
                    Arc::clone(&report),
                ));
                InputsHandle::Shared(shared)
            }
            Source::Kubernetes => {
                let client = kube_client(args.api_timeout, args.api_max_response_mib).await?;
                InputsHandle::Kube(kube_source::spawn(
                    &mut tasks,
                    client,
                    args.api_timeout,
                    &config.node_name,
                    &config.lane_keys,
                    &wake_tx,
                    &report,
                ))
            }
        };
        let (mut datapath, installed) = join_install(&mut install)?;
        info!(?installed, bpffs = %args.bpffs.display(), cgroup = %config.attach.path.display(), "datapath ready");
        marking = start_marking(args, &config, &status);
        let log_rings =
            datapath.take_log_ring().into_iter().chain(marking.as_mut().and_then(marking::MarkingLoop::take_log_ring));
        datapath_log::start(&mut tasks, args.bpf_log, log_rings.collect(), &status);
        let reconciler = Reconciler::new(datapath, config.clone(), Arc::clone(&status))?;
        reconciler_thread = Some(spawn_reconciler(reconciler, wake_rx, handle, Arc::clone(&lanes), &status)?);
        if let Some(path) = &args.lanes_config {
            tasks.spawn("lanes config poller", poll::watch_lanes_config(
                path.clone(),
                Arc::clone(&lanes),
                wake_tx.clone(),
                Arc::clone(&report),
            ));
        }
        if let Some(addr) = args.metrics_addr {
            tasks.spawn("HTTP server", status::serve(addr, Arc::clone(&status), args.bpffs.clone()));
        }
        supervise(&mut tasks, &status).await;
        info!("stopping; the datapath stays attached with its last state");
        tasks.abort_all();
        Ok(())
    });
    // An error before the install was joined (the Kubernetes client could not be configured):
    // let the install finish rather than stop it half-way.
    let _ = join_install(&mut install);
    let _ = wake_tx.send(Wake::Stop);
    if let Some(m) = marking {
        m.stop();
    }
    if let Some(t) = reconciler_thread
        && t.join().is_err()
    {
        error!("the reconciler thread panicked");
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Installs (or adopts) the datapath on a thread of its own, with the `--bpf-log` level (or
/// without the log where the programs do not load with it: [`datapath_log`]).
fn spawn_install(
    args: &Args,
    config: &args::AgentConfig,
    status: &Arc<AgentStatus>,
) -> Result<std::thread::JoinHandle<Result<(Datapath, crate::datapath::Installed)>>> {
    let (bpffs, attach, log) = (args.bpffs.clone(), config.attach.path.clone(), args.bpf_log);
    let status = Arc::clone(status);
    std::thread::Builder::new()
        .name("install".into())
        .spawn(move || {
            datapath_log::load_with_fallback(log, "the steering programs", &status, |log| {
                Datapath::install_with(&bpffs, &attach, log)
                    .with_context(|| format!("installing the datapath on {}", attach.display()))
            })
        })
        .context("spawning the datapath install")
}

/// Logs where the datapath attaches, and records it for the metrics; at the cgroup root, a
/// warning: programs others attached there first (a socket-LB CNI translating ClusterIPs) run
/// before tagger's.
fn report_attach_point(attach: &AttachPoint, status: &AgentStatus) {
    status.set_attached_at_root(attach.choice == AttachChoice::CgroupRoot);
    let cgroup = attach.path.display();
    match attach.choice {
        AttachChoice::CgroupRoot => warn!(
            %cgroup,
            "neither kubepods.slice nor kubepods is below --cgroup-root: attaching at the cgroup root, \
             where tagger runs after socket LBs attached at the root earlier (a socket-LB CNI translates \
             ClusterIPs before tagger sees them); set --attach-cgroup to kubelet's pods cgroup"
        ),
        choice => info!(%cgroup, choice = choice.name(), "attaching the datapath"),
    }
}

/// The Kubernetes client (in-cluster config or KUBECONFIG), with the watch timeouts.
/// Every response body is limited to `max_line_mib` per line ([`line_limit`]).
async fn kube_client(api_timeout: u32, max_line_mib: u32) -> Result<kube::Client> {
    let mut kube_config = kube::Config::infer()
        .await
        .context("configuring the Kubernetes client (in-cluster config or KUBECONFIG)")?;
    // A plain-HTTP API endpoint (`kubectl proxy`, a local test server) needs no certificate
    // authority, but the client would still load the system's for its TLS connector, and the
    // image (FROM scratch) has none: give it an empty set instead. In-cluster and HTTPS
    // kubeconfigs name their CA and are unaffected.
    if kube_config.cluster_url.scheme_str() == Some("http") && kube_config.root_cert.is_none() {
        kube_config.root_cert = Some(Vec::new());
    }
    // A watch silent for longer than the server's own timeout is dead (a blackholed API
    // server): give it up and reconnect.
    let timeout = Duration::from_secs(u64::from(api_timeout));
    kube_config.read_timeout = Some(timeout + Duration::from_secs(5));
    kube_config.connect_timeout = Some(timeout.min(Duration::from_secs(30)));
    let max = usize::try_from(max_line_mib).unwrap_or(usize::MAX).saturating_mul(1 << 20);
    let limit = tower::util::MapResponseLayer::new(move |r: http::Response<_>| {
        r.map(|body| line_limit::LineLimited::new(body, max))
    });
    Ok(kube::client::ClientBuilder::try_from(kube_config)
        .context("building the Kubernetes client")?
        .with_layer(&limit)
        .build())
}

/// Starts TC lane marking when `--mark-interfaces` asks for it. Marking that cannot work here
/// (the program does not load on this kernel, the node's namespace cannot be entered) is
/// reported unavailable (an error in the log, `tagger_agent_feature_available`, `tagger
/// status`); steering goes on.
fn start_marking(
    args: &Args,
    config: &args::AgentConfig,
    status: &Arc<AgentStatus>,
) -> Option<marking::MarkingLoop> {
    if config.mark_interfaces.is_empty() {
        return None;
    }
    match marking::MarkingLoop::start(
        &args.bpffs,
        &config.mark_interfaces,
        args.mark_direction,
        args.node_netns.as_deref(),
        args.bpf_log,
        status,
    ) {
        Ok(m) => Some(m),
        Err(e) => {
            error!("lane marking is unavailable: {e:#}");
            status.set_feature("lane_marking", false, &format!("{e:#}"));
            None
        }
    }
}

fn load_lanes(path: &std::path::Path) -> Result<LanesConfig> {
    // The first poll reports the content; the size is checked before reading.
    let text = poll::FileWatch::new(path.to_owned())
        .poll()
        .with_context(|| format!("reading lanes config {}", path.display()))?
        .unwrap_or_default();
    LanesConfig::parse(&text).with_context(|| format!("lanes config {}", path.display()))
}

/// Waits for SIGTERM or SIGINT; meanwhile each task that ends is reported dead.
async fn supervise(tasks: &mut Tasks, status: &AgentStatus) {
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            Some((part, how)) = tasks.next_ended() => status.part_died(&part, how),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot listen for SIGTERM: {e}");
            std::future::pending::<()>().await;
            unreachable!()
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Structured logs on stderr; `RUST_LOG` filters (default `info`), `TAGGER_LOG_FORMAT=json`
/// switches to JSON lines.
pub fn init_logging() {
    use std::io::IsTerminal as _;

    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and `kubectl logs` must not carry escape codes.
    let builder =
        fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    if std::env::var("TAGGER_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task that ends or panics is named, with how; `supervise`'s loop reports exactly that.
    #[tokio::test]
    async fn tasks_report_which_one_ended_and_how() {
        let mut tasks = Tasks::new();
        tasks.spawn("services watcher", async { panic!("boom") });
        tasks.spawn("pods watcher", async {});
        tasks.spawn("quiet watcher", std::future::pending());
        let mut ended = vec![tasks.next_ended().await.unwrap(), tasks.next_ended().await.unwrap()];
        ended.sort();
        assert_eq!(
            ended,
            [("pods watcher".to_owned(), "ended"), ("services watcher".to_owned(), "panicked")]
        );
        // A quiet task is not reported.
        let quiet = tokio::time::timeout(Duration::from_millis(100), tasks.next_ended()).await;
        assert!(quiet.is_err(), "{quiet:?}");
        let status = AgentStatus::default();
        for (part, how) in ended {
            status.part_died(&part, how);
        }
        assert_eq!(
            status.health(std::time::Instant::now()),
            Err("pods watcher ended; services watcher panicked".to_owned())
        );
    }
}
