//! A [`Report`] that counts, for the sources' tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::Report;

/// Counts the source errors a source reports (what its tests read); the rest is dropped.
#[derive(Debug, Default)]
pub(crate) struct Counted {
    source_errors: AtomicU64,
    api_unreachable: AtomicBool,
}

impl Counted {
    /// Source files rejected or unreadable so far.
    pub(crate) fn source_errors(&self) -> u64 {
        self.source_errors.load(Ordering::Relaxed)
    }
}

impl Report for Counted {
    fn source_synced(&self) {}
    fn count_source_error(&self) {
        self.source_errors.fetch_add(1, Ordering::Relaxed);
    }
    fn count_config_error(&self) {}
    fn count_watch_restart(&self) {}
    fn count_ignored_kind(&self, _kind: &str, _n: u64) {}
    fn set_api_reachable(&self, reachable: bool) -> bool {
        !self.api_unreachable.swap(!reachable, Ordering::Relaxed)
    }
}
