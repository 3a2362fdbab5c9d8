//! The TC lane marking loop: attaches the marking program to the interfaces matching
//! `--mark-interfaces` at start and to new ones every [`RESCAN`] (pod veths come and go).

use std::{
    fs::File,
    os::fd::AsFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tracing::{info, warn};

use super::{AgentStatus, datapath_log};
use crate::datapath::{
    BpfLog, LogRing,
    tc::{MarkDirection, Marker},
};

/// How often new interfaces are looked for.
pub const RESCAN: Duration = Duration::from_secs(2);

/// The running loop; [`MarkingLoop::stop`] ends it (the attachments stay: TCX links pinned,
/// netlink filters in place, like the rest of the datapath).
#[derive(Debug)]
pub struct MarkingLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The program's log ring (`--bpf-log`), until the agent takes it.
    log_ring: Option<LogRing>,
}

impl MarkingLoop {
    /// Loads the program (with the datapath's debug log at `log`, or without it where it does
    /// not load with it) and starts the loop, in the node's network namespace `node_netns` (the
    /// agent's own when `None`). Fails if the program cannot be loaded or the namespace entered;
    /// records the feature in `status` either way.
    pub fn start(
        bpffs: &Path,
        globs: &[String],
        direction: MarkDirection,
        node_netns: Option<&Path>,
        log: BpfLog,
        status: &AgentStatus,
    ) -> Result<Self> {
        let mut marker = datapath_log::load_with_fallback(log, "lane marking", status, |log| {
            Marker::load_with(bpffs, globs.to_vec(), direction, None, log).context("loading lane marking")
        })?;
        let log_ring = marker.take_log_ring();
        let netns = node_netns
            .map(|p| File::open(p).with_context(|| format!("--node-netns {}", p.display())))
            .transpose()?;
        let place = node_netns
            .map_or_else(|| "the agent's network namespace".to_owned(), |p| p.display().to_string());
        let mode = marker.mode();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("marking".into())
            .spawn(move || {
                // This thread lives in the node's namespace from here on.
                if let Some(Err(e)) = netns.as_ref().map(|ns| crate::sys::enter_netns(ns.as_fd())) {
                    let _ = entered_tx.send(Err(anyhow::anyhow!(
                        "entering the node's network namespace (setns, needs CAP_SYS_ADMIN): {e}"
                    )));
                    return;
                }
                let _ = entered_tx.send(Ok(()));
                let mut known = std::collections::BTreeSet::new();
                while !flag.load(Ordering::Relaxed) {
                    for (iface, e) in marker.sync() {
                        warn!(interface = %iface, "lane marking: {e}");
                    }
                    for iface in marker.attached().difference(&known) {
                        info!(interface = %iface, mode = %marker.mode(), "lane marking attached");
                    }
                    known.clone_from(marker.attached());
                    let until = Instant::now() + RESCAN;
                    while Instant::now() < until && !flag.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .context("spawning the marking thread")?;
        let entered = entered_rx.recv().unwrap_or_else(|_| Err(anyhow::anyhow!("the marking thread ended")));
        if let Err(e) = entered {
            let _ = thread.join();
            return Err(e);
        }
        let detail = format!("{mode} on {} ({direction:?}) in {place}", globs.join(","));
        info!("lane marking on: {detail}");
        status.set_feature("lane_marking", true, &detail);
        Ok(Self { stop, thread: Some(thread), log_ring })
    }

    /// The marking program's log ring, when loaded with the debug log on (once).
    pub fn take_log_ring(&mut self) -> Option<LogRing> {
        self.log_ring.take()
    }

    /// Ends the loop.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
