//! The agent's health and counters, shared by the sources, the reconciler and the HTTP
//! endpoints (`/healthz`, `/readyz`, `/metrics`).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tracing::{error, info, warn};

/// Shared agent status.
#[derive(Debug)]
pub struct AgentStatus {
    ready: AtomicBool,
    source_synced: AtomicBool,
    reconciles: AtomicU64,
    reconcile_errors: AtomicU64,
    source_errors: AtomicU64,
    config_errors: AtomicU64,
    watch_restarts: AtomicU64,
    api_unreachable: AtomicBool,
    last_sync_unix: AtomicU64,
    pending_pods: AtomicU64,
    connections_reset: AtomicU64,
    reset_failures: AtomicU64,
    attached_at_root: AtomicBool,
    features: Mutex<BTreeMap<String, Feature>>,
    warnings: Mutex<BTreeMap<String, u64>>,
    ignored_kinds: Mutex<BTreeMap<String, u64>>,
    reconcile_seconds: Histogram,
    /// The reconciler's last heartbeat (each turn of its loop); `None` before it started.
    reconciler_beat: Mutex<Option<Instant>>,
    /// Parts that ended or panicked (a watcher task, the reconciler), and how.
    dead: Mutex<BTreeMap<String, String>>,
    /// The last health verdict was a failure (logged once per change).
    unhealthy: AtomicBool,
    /// See [`RECONCILER_STALL_AFTER`], in seconds.
    stall_after_secs: AtomicU64,
}

/// The reconciler is stuck when its loop has not turned for this long (the default of
/// `--reconciler-stall-after`): the loop wakes at least every 30 s (its resync), every 2 s while
/// it renews the datapath lease, and a pass at 100,000 endpoints takes about a second.
pub const RECONCILER_STALL_AFTER: Duration = Duration::from_secs(90);

/// Whether the agent is alive: `Err` names each part that died, and the reconciler if its last
/// heartbeat is older than `stall_after`. A reconciler that has not started yet (the datapath is
/// being installed) is not judged. A watcher that is quiet is not stuck: only an ended or
/// panicked one counts.
pub fn judge_health(
    now: Instant,
    reconciler_beat: Option<Instant>,
    dead: &BTreeMap<String, String>,
    stall_after: Duration,
) -> Result<(), String> {
    let mut problems: Vec<String> = dead.iter().map(|(part, how)| format!("{part} {how}")).collect();
    if let Some(beat) = reconciler_beat
        && !dead.contains_key("reconciler")
    {
        let quiet = now.saturating_duration_since(beat);
        if quiet > stall_after {
            problems.push(format!("reconciler stalled (no heartbeat for {} s)", quiet.as_secs()));
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}

impl Default for AgentStatus {
    fn default() -> Self {
        Self {
            ready: AtomicBool::default(),
            source_synced: AtomicBool::default(),
            reconciles: AtomicU64::default(),
            reconcile_errors: AtomicU64::default(),
            source_errors: AtomicU64::default(),
            config_errors: AtomicU64::default(),
            watch_restarts: AtomicU64::default(),
            api_unreachable: AtomicBool::default(),
            last_sync_unix: AtomicU64::default(),
            pending_pods: AtomicU64::default(),
            connections_reset: AtomicU64::default(),
            reset_failures: AtomicU64::default(),
            attached_at_root: AtomicBool::default(),
            features: Mutex::default(),
            warnings: Mutex::default(),
            ignored_kinds: Mutex::default(),
            // 50 µs to ~3.3 s.
            reconcile_seconds: Histogram::new(exponential_buckets(50e-6, 2.0, 17)),
            reconciler_beat: Mutex::default(),
            dead: Mutex::default(),
            unhealthy: AtomicBool::default(),
            stall_after_secs: AtomicU64::new(RECONCILER_STALL_AFTER.as_secs()),
        }
    }
}

/// Whether an optional feature works here, and what it uses or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    /// Whether it works.
    pub available: bool,
    /// How it works, or why it does not.
    pub detail: String,
}

impl AgentStatus {
    /// Records whether an optional feature (`connection_reset`, `lane_marking`) works here.
    pub fn set_feature(&self, name: &str, available: bool, detail: &str) {
        let f = Feature { available, detail: detail.to_owned() };
        self.features.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.to_owned(), f);
    }

    /// The optional features recorded so far.
    pub fn features(&self) -> BTreeMap<String, Feature> {
        self.features.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Counts stale connections a reset pass could not reset (kept, tried again).
    pub fn count_reset_failures(&self, n: u64) {
        self.reset_failures.fetch_add(n, Ordering::Relaxed);
    }

    /// Connection resets that failed so far.
    pub fn reset_failures(&self) -> u64 {
        self.reset_failures.load(Ordering::Relaxed)
    }

    /// The reconciler's loop turned (it is alive and not stuck in a pass).
    pub fn reconciler_beat(&self) {
        *self.reconciler_beat.lock().expect("beat lock") = Some(Instant::now());
    }

    /// A part of the agent (`watcher pods`, `reconciler`, ...) ended or panicked (`how`): logged
    /// at once, and `/healthz` fails from now on.
    pub fn part_died(&self, part: &str, how: &str) {
        error!(
            part,
            how, "an agent part is no longer running; /healthz fails so that the agent is restarted"
        );
        self.dead.lock().expect("dead lock").insert(part.to_owned(), how.to_owned());
    }

    /// Sets how long the reconciler may go without a heartbeat (`--reconciler-stall-after`).
    pub fn set_stall_after(&self, after: Duration) {
        self.stall_after_secs.store(after.as_secs(), Ordering::Relaxed);
    }

    /// [`judge_health`] now; a change of verdict is logged once.
    pub fn health(&self, now: Instant) -> Result<(), String> {
        let beat = *self.reconciler_beat.lock().expect("beat lock");
        let stall_after = Duration::from_secs(self.stall_after_secs.load(Ordering::Relaxed));
        let verdict = judge_health(now, beat, &self.dead.lock().expect("dead lock"), stall_after);
        let was = self.unhealthy.swap(verdict.is_err(), Ordering::Relaxed);
        match &verdict {
            Err(why) if !was => error!("unhealthy: {why}"),
            Ok(()) if was => info!("healthy again"),
            _ => {}
        }
        verdict
    }

    /// Records that the datapath attaches at the cgroup root (no pods cgroup was found).
    pub fn set_attached_at_root(&self, at_root: bool) {
        self.attached_at_root.store(at_root, Ordering::Relaxed);
    }

    /// Whether the datapath attaches at the cgroup root.
    pub fn attached_at_root(&self) -> bool {
        self.attached_at_root.load(Ordering::Relaxed)
    }

    /// Ready: the first full sync has been applied.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The source has delivered a complete view.
    pub fn source_synced(&self) {
        self.source_synced.store(true, Ordering::Relaxed);
    }

    /// Whether the source delivered a complete view.
    pub fn is_source_synced(&self) -> bool {
        self.source_synced.load(Ordering::Relaxed)
    }

    /// A reconcile applied a complete (synced) view.
    pub fn applied_full_sync(&self) {
        self.ready.store(true, Ordering::Relaxed);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.last_sync_unix.store(now, Ordering::Relaxed);
    }

    /// Counts a reconcile pass and its failed operations.
    pub fn count_reconcile(&self, failed_ops: u64) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        self.reconcile_errors.fetch_add(failed_ops, Ordering::Relaxed);
    }

    /// Counts a rejected or unreadable source file.
    pub fn count_source_error(&self) {
        self.source_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a rejected or unreadable lanes config.
    pub fn count_config_error(&self) {
        self.config_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a watch that failed and is being restarted.
    pub fn count_watch_restart(&self) {
        self.watch_restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Records whether the Kubernetes API server answers; returns what was recorded before.
    pub fn set_api_reachable(&self, reachable: bool) -> bool {
        !self.api_unreachable.swap(!reachable, Ordering::Relaxed)
    }

    /// Whether the Kubernetes API server answered last (true for the file source).
    pub fn api_reachable(&self) -> bool {
        !self.api_unreachable.load(Ordering::Relaxed)
    }

    /// Counts stale connections reset.
    pub fn count_resets(&self, n: u64) {
        self.connections_reset.fetch_add(n, Ordering::Relaxed);
    }

    /// Stale connections reset since start.
    pub fn connections_reset(&self) -> u64 {
        self.connections_reset.load(Ordering::Relaxed)
    }

    /// Pods whose cgroup has not appeared yet.
    pub fn set_pending_pods(&self, n: u64) {
        self.pending_pods.store(n, Ordering::Relaxed);
    }

    /// Replaces the warning counts of the last reconcile.
    pub fn set_warnings(&self, counts: BTreeMap<String, u64>) {
        *self.warnings.lock().expect("warnings lock") = counts;
    }

    /// Counts objects of kinds the file source ignores.
    pub fn count_ignored_kind(&self, kind: &str, n: u64) {
        *self.ignored_kinds.lock().expect("ignored lock").entry(kind.to_owned()).or_default() += n;
    }

    /// Records how long a reconcile pass took.
    pub fn observe_reconcile(&self, elapsed: std::time::Duration) {
        self.reconcile_seconds.observe(elapsed.as_secs_f64());
    }

    /// The reconcile latency histogram.
    pub fn reconcile_histogram(&self) -> Histogram {
        self.reconcile_seconds.clone()
    }

    /// Warning counts of the last pass.
    pub fn warnings(&self) -> BTreeMap<String, u64> {
        self.warnings.lock().expect("warnings lock").clone()
    }

    /// Objects of ignored kinds, by kind.
    pub fn ignored_kinds(&self) -> BTreeMap<String, u64> {
        self.ignored_kinds.lock().expect("ignored lock").clone()
    }

    /// The counters at one instant.
    pub fn snapshot(&self) -> StatusSnapshot {
        StatusSnapshot {
            ready: self.is_ready(),
            reconciles: self.reconciles.load(Ordering::Relaxed),
            reconcile_errors: self.reconcile_errors.load(Ordering::Relaxed),
            source_errors: self.source_errors.load(Ordering::Relaxed),
            config_errors: self.config_errors.load(Ordering::Relaxed),
            watch_restarts: self.watch_restarts.load(Ordering::Relaxed),
            api_reachable: self.api_reachable(),
            pending_pods: self.pending_pods.load(Ordering::Relaxed),
            last_sync_unix: self.last_sync_unix.load(Ordering::Relaxed),
        }
    }
}

/// [`AgentStatus`]'s counters at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusSnapshot {
    /// The first complete view has been applied.
    pub ready: bool,
    /// Reconcile passes.
    pub reconciles: u64,
    /// Writes that failed or were skipped.
    pub reconcile_errors: u64,
    /// Rejected or unreadable source files.
    pub source_errors: u64,
    /// Rejected or unreadable lanes configs.
    pub config_errors: u64,
    /// Failed and restarted watches.
    pub watch_restarts: u64,
    /// No watch is failing.
    pub api_reachable: bool,
    /// Local pods without a cgroup yet.
    pub pending_pods: u64,
    /// Unix time of the last complete pass.
    pub last_sync_unix: u64,
}

/// Most connections served at once; a connection beyond it is answered `503` (written without
/// waiting) and closed at once, so a flood of clients cannot exhaust the agent's descriptors or
/// memory, and the listener stays responsive.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its whole request head within this time, or it is dropped (a silent
/// client, a slow-loris).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Once the request is read, the response must be written within this time, or the connection
/// is dropped (a client that does not read).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a rendered `/metrics` body is served again instead of rendered anew.
pub const METRICS_CACHE_TTL: Duration = Duration::from_secs(1);
/// First pause after a failed `accept` (e.g. `EMFILE`); it doubles on each consecutive failure.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause after failed `accept`s.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The HTTP server's limits (the constants above; tests shorten them).
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// See [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`READ_TIMEOUT`].
    pub read_timeout: Duration,
    /// See [`WRITE_TIMEOUT`].
    pub write_timeout: Duration,
    /// See [`METRICS_CACHE_TTL`].
    pub metrics_ttl: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            read_timeout: READ_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            metrics_ttl: METRICS_CACHE_TTL,
        }
    }
}

/// The pause after `failures` consecutive failed `accept`s: [`ACCEPT_BACKOFF_MIN`] doubled
/// each time, at most [`ACCEPT_BACKOFF_MAX`].
pub fn accept_backoff(failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX);
    ACCEPT_BACKOFF_MIN.saturating_mul(factor).min(ACCEPT_BACKOFF_MAX)
}

/// The last rendered `/metrics` body, served again for [`ServerLimits::metrics_ttl`]: scrapes
/// within that time share one render (reading every map is a syscall per entry), and scrapes
/// arriving while it renders wait for it instead of rendering too.
pub struct MetricsCache {
    ttl: Duration,
    render: Box<dyn Fn() -> String + Send + Sync>,
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Arc<str>)>>,
    renders: AtomicU64,
}

impl MetricsCache {
    /// A cache of what `render` returns (called on a blocking thread).
    pub fn new(ttl: Duration, render: impl Fn() -> String + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            ttl,
            render: Box::new(render),
            last: tokio::sync::Mutex::new(None),
            renders: AtomicU64::new(0),
        })
    }

    /// The body: the cached one if younger than the TTL, else a new render.
    pub async fn get(self: &Arc<Self>) -> Arc<str> {
        let mut last = self.last.lock().await;
        if let Some((at, body)) = last.as_ref()
            && at.elapsed() < self.ttl
        {
            return Arc::clone(body);
        }
        let this = Arc::clone(self);
        let body: Arc<str> = tokio::task::spawn_blocking(move || {
            this.renders.fetch_add(1, Ordering::Relaxed);
            (this.render)()
        })
        .await
        .unwrap_or_default()
        .into();
        *last = Some((tokio::time::Instant::now(), Arc::clone(&body)));
        body
    }

    /// Renders so far.
    #[cfg(test)]
    pub fn renders(&self) -> u64 {
        self.renders.load(Ordering::Relaxed)
    }
}

/// Serves `/healthz` (200 while the reconciler and every watcher run; 503 naming the part that
/// died or stalled, see [`AgentStatus::health`]), `/readyz` (200 once the first full sync has
/// been applied and while the API server answers; 503 before, and during an outage, when the
/// datapath serves its last state) and `/metrics`, on hyper with [`ServerLimits::default`].
pub async fn serve(addr: SocketAddr, status: Arc<AgentStatus>, bpffs: std::path::PathBuf) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!("cannot serve metrics on {addr}: {e}");
            return;
        }
    };
    // With port 0 the kernel picks one; the log says which (tests rely on it).
    let bound = listener.local_addr().unwrap_or(addr);
    info!(addr = %bound, "serving /metrics, /healthz, /readyz");
    let limits = ServerLimits::default();
    let registry = super::metrics::Metrics::new(Arc::clone(&status), bpffs);
    let metrics = MetricsCache::new(limits.metrics_ttl, move || registry.render());
    serve_on(listener, status, metrics, limits).await;
}

/// The accept loop of [`serve`] on a bound listener.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    status: Arc<AgentStatus>,
    metrics: Arc<MetricsCache>,
    limits: ServerLimits,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut failures = 0u32;
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => {
                failures = 0;
                sock
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let pause = accept_backoff(failures);
                if failures == 1 || pause == ACCEPT_BACKOFF_MAX && failures.is_multiple_of(64) {
                    warn!(
                        failures,
                        pause_ms = pause.as_millis(),
                        "accepting a metrics connection failed: {e}"
                    );
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Over the cap: answer without waiting for the client, and close.
            let _ = sock.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
            continue;
        };
        let (status, metrics) = (Arc::clone(&status), Arc::clone(&metrics));
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(sock, status, metrics, limits).await;
        });
    }
}

/// One connection: one request (no keep-alive), its head read within the read timeout and the
/// whole exchange ended within read + write timeouts.
async fn serve_connection(
    sock: tokio::net::TcpStream,
    status: Arc<AgentStatus>,
    metrics: Arc<MetricsCache>,
    limits: ServerLimits,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (status, metrics) = (Arc::clone(&status), Arc::clone(&metrics));
        async move { Ok::<_, std::convert::Infallible>(respond(req.uri().path(), &status, &metrics).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(sock), service);
    // Whatever the client does, the connection (and its slot) is gone by then.
    let _ = tokio::time::timeout(limits.read_timeout + limits.write_timeout, conn).await;
}

/// The response to `GET path`.
async fn respond(
    path: &str,
    status: &AgentStatus,
    metrics: &Arc<MetricsCache>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let (code, body): (u16, bytes::Bytes) = match path {
        "/healthz" => match status.health(Instant::now()) {
            Ok(()) => (200, "ok\n".into()),
            Err(why) => (503, format!("unhealthy: {why}\n").into()),
        },
        "/readyz" if status.is_ready() && status.api_reachable() => (200, "ready\n".into()),
        "/readyz" if status.is_ready() => (
            503,
            "not ready: the Kubernetes API server does not answer; the datapath serves its last state\n"
                .into(),
        ),
        "/readyz" => (503, "not ready: first full sync not applied yet\n".into()),
        "/metrics" => (200, bytes::Bytes::from(metrics.get().await.as_bytes().to_vec())),
        _ => (404, "not found\n".into()),
    };
    hyper::Response::builder()
        .status(code)
        .header("content-type", "text/plain; version=0.0.4")
        .body(http_body_util::Full::new(body))
        .expect("a valid response")
}

/// The sources report to the agent's status.
impl crate::source::Report for AgentStatus {
    fn source_synced(&self) {
        AgentStatus::source_synced(self);
    }
    fn count_source_error(&self) {
        AgentStatus::count_source_error(self);
    }
    fn count_config_error(&self) {
        AgentStatus::count_config_error(self);
    }
    fn count_watch_restart(&self) {
        AgentStatus::count_watch_restart(self);
    }
    fn count_ignored_kind(&self, kind: &str, n: u64) {
        AgentStatus::count_ignored_kind(self, kind, n);
    }
    fn set_api_reachable(&self, reachable: bool) -> bool {
        AgentStatus::set_api_reachable(self, reachable)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };

    use super::*;

    #[test]
    fn health_names_what_died_or_stalled() {
        let now = Instant::now();
        let stall = Duration::from_secs(90);
        let mut dead = BTreeMap::new();
        let ago = |secs| now.checked_sub(Duration::from_secs(secs)).unwrap();
        // Not started yet, or beating: healthy; a quiet watcher is not judged at all.
        assert_eq!(judge_health(now, None, &dead, stall), Ok(()));
        assert_eq!(judge_health(now, Some(ago(89)), &dead, stall), Ok(()));
        let e = judge_health(now, Some(ago(91)), &dead, stall).unwrap_err();
        assert_eq!(e, "reconciler stalled (no heartbeat for 91 s)");
        dead.insert("services watcher".to_owned(), "panicked".to_owned());
        let e = judge_health(now, Some(now), &dead, stall).unwrap_err();
        assert_eq!(e, "services watcher panicked");
        dead.insert("reconciler".to_owned(), "panicked".to_owned());
        let e = judge_health(now, Some(ago(500)), &dead, stall).unwrap_err();
        assert_eq!(e, "reconciler panicked; services watcher panicked");
    }

    #[test]
    fn accept_backoff_doubles_to_a_cap() {
        let pauses: Vec<_> = (1..=10).map(|n| accept_backoff(n).as_millis()).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(accept_backoff(0), ACCEPT_BACKOFF_MIN);
        assert_eq!(accept_backoff(u32::MAX), ACCEPT_BACKOFF_MAX);
    }

    /// A server on 127.0.0.1 with short timeouts; `/metrics` renders a counter of renders (and
    /// `body_bytes` of padding).
    async fn server(
        limits: ServerLimits,
        body_bytes: usize,
    ) -> (SocketAddr, Arc<MetricsCache>, Arc<AgentStatus>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AgentStatus::default());
        let n = Arc::new(AtomicU64::new(0));
        let metrics = MetricsCache::new(limits.metrics_ttl, move || {
            let render = n.fetch_add(1, Ordering::Relaxed) + 1;
            format!("render {render}\n{}", "x".repeat(body_bytes))
        });
        tokio::spawn(serve_on(listener, Arc::clone(&status), Arc::clone(&metrics), limits));
        (addr, metrics, status)
    }

    fn limits() -> ServerLimits {
        ServerLimits {
            max_connections: 4,
            read_timeout: Duration::from_millis(600),
            write_timeout: Duration::from_millis(600),
            metrics_ttl: Duration::from_secs(1),
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out)).await.unwrap().unwrap();
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
    }

    /// Waits until the server closes `s`; how long that took.
    async fn closed_after(s: &mut TcpStream) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("the server closes the connection");
            if matches!(read, Ok(0) | Err(_)) {
                return start.elapsed();
            }
        }
    }

    #[tokio::test]
    async fn endpoints_answer_as_before() {
        let (addr, _, status) = server(limits(), 0).await;
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "not ready: first full sync not applied yet\n".to_owned())
        );
        status.applied_full_sync();
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));
        assert_eq!(get(addr, "/nope").await, (404, "not found\n".to_owned()));
        status.part_died("pods watcher", "ended");
        assert_eq!(get(addr, "/healthz").await, (503, "unhealthy: pods watcher ended\n".to_owned()));
    }

    #[tokio::test]
    async fn silent_and_slow_clients_neither_block_a_scrape_nor_stay() {
        let (addr, _, _) = server(limits(), 0).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let trickle = tokio::spawn(async move {
            // A slow-loris: a byte of the request head every 100 ms, never the end of it.
            for b in
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            {
                if slow.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            slow
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!((code, body.as_str()), (200, "render 1\n"));
        assert!(started.elapsed() < Duration::from_millis(300), "the scrape waited {:?}", started.elapsed());
        // Both are dropped once the read timeout (600 ms) has passed.
        let waited = closed_after(&mut silent).await;
        assert!(waited < Duration::from_millis(1200), "the silent client stayed {waited:?}");
        let mut slow = trickle.await.unwrap();
        let waited = closed_after(&mut slow).await;
        assert!(waited < Duration::from_millis(1200), "the slow-loris stayed {waited:?}");
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_dropped_after_the_write_timeout() {
        // 16 MiB: far more than the socket buffers hold, so the write blocks on the client.
        let (addr, _, _) = server(limits(), 16 << 20).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await.unwrap();
        assert!(got.len() < 16 << 20, "the whole body arrived after the write timeout");
        assert_eq!(get(addr, "/healthz").await.0, 200);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_at_once_and_the_server_recovers() {
        let (addr, _, _) = server(limits(), 0).await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The fifth: a 503 and the end of the connection, without waiting for its request.
        let started = Instant::now();
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_millis(300), extra.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 503 "), "{out:?}");
        assert!(started.elapsed() < Duration::from_millis(300));
        // Once the held connections time out, requests are served again.
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(get(addr, "/healthz").await.0, 200);
        drop(held);
    }

    #[tokio::test]
    async fn metrics_are_rendered_once_a_second_at_most() {
        let (addr, metrics, _) = server(limits(), 0).await;
        let scrapes = futures::future::join_all((0..3).map(|_| get(addr, "/metrics"))).await;
        assert!(scrapes.iter().all(|s| s == &(200, "render 1\n".to_owned())), "{scrapes:?}");
        assert_eq!(get(addr, "/metrics").await.1, "render 1\n");
        assert_eq!(metrics.renders(), 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(get(addr, "/metrics").await.1, "render 2\n");
        assert_eq!(metrics.renders(), 2);
    }
}
