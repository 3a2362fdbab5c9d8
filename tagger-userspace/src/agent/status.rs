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

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{info, warn};

/// Shared agent status.
#[derive(Debug, Default)]
pub struct AgentStatus {
    ready: AtomicBool,
    source_synced: AtomicBool,
    reconciles: AtomicU64,
    reconcile_errors: AtomicU64,
    source_errors: AtomicU64,
    config_errors: AtomicU64,
    watch_restarts: AtomicU64,
    last_sync_unix: AtomicU64,
    pending_pods: AtomicU64,
    warnings: Mutex<BTreeMap<String, u64>>,
    ignored_kinds: Mutex<BTreeMap<String, u64>>,
}

impl AgentStatus {
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

    /// Counters for tests and metrics: (name, value).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("reconciles_total", self.reconciles.load(Ordering::Relaxed)),
            ("reconcile_errors_total", self.reconcile_errors.load(Ordering::Relaxed)),
            ("source_errors_total", self.source_errors.load(Ordering::Relaxed)),
            ("config_errors_total", self.config_errors.load(Ordering::Relaxed)),
            ("watch_restarts_total", self.watch_restarts.load(Ordering::Relaxed)),
            ("pending_pods", self.pending_pods.load(Ordering::Relaxed)),
            ("last_sync_timestamp_seconds", self.last_sync_unix.load(Ordering::Relaxed)),
            ("ready", u64::from(self.is_ready())),
        ]
    }

    /// Prometheus text exposition of the agent's own state.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for (name, value) in self.counters() {
            let _ = writeln!(out, "tagger_agent_{name} {value}");
        }
        for (kind, n) in self.warnings.lock().expect("warnings lock").iter() {
            let _ = writeln!(out, "tagger_agent_input_warnings{{kind=\"{kind}\"}} {n}");
        }
        for (kind, n) in self.ignored_kinds.lock().expect("ignored lock").iter() {
            let _ = writeln!(out, "tagger_agent_ignored_objects_total{{kind=\"{kind}\"}} {n}");
        }
        out
    }
}

/// Serves `/healthz` (the process answers), `/readyz` (200 once the first full sync has been
/// applied, 503 before) and `/metrics`.
pub async fn serve(addr: SocketAddr, status: std::sync::Arc<AgentStatus>) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!("cannot serve metrics on {addr}: {e}");
            return;
        }
    };
    info!(%addr, "serving /metrics, /healthz, /readyz");
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let status = std::sync::Arc::clone(&status);
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let Ok(Ok(n)) =
                tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf)).await
            else {
                return;
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (code, body) = match path {
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                "/readyz" if status.is_ready() => ("200 OK", "ready\n".to_owned()),
                "/readyz" => {
                    ("503 Service Unavailable", "not ready: first full sync not applied yet\n".to_owned())
                }
                "/metrics" => ("200 OK", status.render_metrics()),
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
