//! The TC lane marking loop: attaches the marking program to the interfaces matching
//! `--mark-interfaces` at start and to new ones every [`RESCAN`] (pod veths come and go).

use std::{
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

use crate::datapath::tc::{MarkDirection, Marker};

/// How often new interfaces are looked for.
pub const RESCAN: Duration = Duration::from_secs(2);

/// The running loop; [`MarkingLoop::stop`] ends it (the attachments stay: TCX links pinned,
/// netlink filters in place, like the rest of the datapath).
#[derive(Debug)]
pub struct MarkingLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MarkingLoop {
    /// Loads the program and starts the loop. Fails if the program cannot be loaded.
    pub fn start(bpffs: &Path, globs: &[String], direction: MarkDirection) -> Result<Self> {
        let mut marker =
            Marker::load(bpffs, globs.to_vec(), direction, None).context("loading lane marking")?;
        info!(mode = %marker.mode(), ?globs, direction = ?direction, "lane marking on");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("marking".into())
            .spawn(move || {
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
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Ends the loop.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
