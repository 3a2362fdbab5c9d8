//! The agent's health and counters, shared by the sources, the reconciler and the HTTP
//! endpoints (`/healthz`, `/readyz`, `/metrics`).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{info, warn};

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

/// Serves `/healthz` (the process answers), `/readyz` (200 once the first full sync has been
/// applied and while the API server answers; 503 before, and during an outage, when the datapath
/// serves its last state) and `/metrics`.
pub async fn serve(addr: SocketAddr, status: std::sync::Arc<AgentStatus>, bpffs: std::path::PathBuf) {
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
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let status = std::sync::Arc::clone(&status);
        let bpffs = bpffs.clone();
        tokio::spawn(async move {
            // Read up to the end of the request head: a client may send it in several writes.
            let mut buf = [0u8; 2048];
            let mut n = 0;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout_at(deadline, sock.read(&mut buf[n..])).await {
                    Ok(Ok(0) | Err(_)) | Err(_) => return,
                    Ok(Ok(read)) => n += read,
                }
            }
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (code, body) = match path {
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                "/readyz" if status.is_ready() && status.api_reachable() => ("200 OK", "ready\n".to_owned()),
                "/readyz" if status.is_ready() => (
                    "503 Service Unavailable",
                    "not ready: the Kubernetes API server does not answer; the datapath serves its last state\n"
                        .to_owned(),
                ),
                "/readyz" => {
                    ("503 Service Unavailable", "not ready: first full sync not applied yet\n".to_owned())
                }
                "/metrics" => {
                    // Reading the maps is blocking work (syscalls per entry).
                    let body = tokio::task::spawn_blocking(move || super::metrics::render(&status, &bpffs))
                        .await
                        .unwrap_or_default();
                    ("200 OK", body)
                }
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.1 {code}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(response.as_bytes()).await;
        });
    }
}
