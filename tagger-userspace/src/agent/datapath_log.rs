//! `--bpf-log`: the agent loads the programs with the datapath's debug log at the asked level
//! ([`crate::datapath::bpf_log`]), forwards their records into its own log, and reports the
//! feature (`tagger_agent_feature_available{feature="bpf_log"}`, `tagger status`). Programs
//! that do not load with the log on (a verifier that refuses the records) are loaded without it
//! and the log is reported unavailable with the reason: steering and marking never depend on it.

use std::sync::Arc;

use anyhow::Result;
use tracing::error;

use super::{AgentStatus, Tasks};
use crate::datapath::{
    BpfLog, LogRing,
    bpf_log::{self, TARGET},
};

/// The feature's name in the status and the metrics.
const FEATURE: &str = "bpf_log";

/// Runs `load` (which loads `what`) with the log at `log`; if that fails while the log is on,
/// reports the log unavailable and runs `load` again with it off.
pub(super) fn load_with_fallback<T>(
    log: BpfLog,
    what: &str,
    status: &AgentStatus,
    load: impl Fn(BpfLog) -> Result<T>,
) -> Result<T> {
    match load(log) {
        Err(e) if log.is_on() => {
            let reason = format!("{what} did not load with the log on: {e:#}");
            error!("--bpf-log is unavailable: {reason}; loading without it");
            status.set_feature(FEATURE, false, &reason);
            load(BpfLog::Off)
        }
        other => other,
    }
}

/// Forwards the records of `rings` (one per object loaded with the log on) into the agent's
/// log, and reports the feature available unless a fallback already reported it not. A ring
/// that can no longer be read stops the forwarding, reported; the agent stays healthy.
pub(super) fn start(tasks: &mut Tasks, log: BpfLog, rings: Vec<LogRing>, status: &Arc<AgentStatus>) {
    if !log.is_on() {
        return;
    }
    if !status.features().contains_key(FEATURE) {
        let detail = format!("{log}: the datapath's records are in the agent's log (target {TARGET})");
        tracing::info!("--bpf-log on, {detail}");
        status.set_feature(FEATURE, true, &detail);
    }
    if rings.is_empty() {
        return;
    }
    let status = Arc::clone(status);
    tasks.spawn("datapath log reader", async move {
        if let Err(e) = bpf_log::forward(rings).await {
            error!("--bpf-log: {e}; the datapath's records are no longer forwarded");
            status.set_feature(FEATURE, false, &e);
        }
        // Only the debug log stopped: not a reason to fail the agent's health.
        std::future::pending::<()>().await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A load that fails with the log on is retried without it, and the log is reported
    /// unavailable naming what did not load and why; with the log off a failure is the caller's.
    #[test]
    fn a_load_refused_with_the_log_falls_back_and_is_reported() {
        let status = AgentStatus::default();
        let tried = std::sync::Mutex::new(Vec::new());
        let loaded = load_with_fallback(BpfLog::Debug, "the steering programs", &status, |level| {
            tried.lock().unwrap().push(level);
            if level.is_on() { Err(anyhow::anyhow!("verifier: too complex")) } else { Ok(level) }
        })
        .unwrap();
        assert_eq!(loaded, BpfLog::Off);
        assert_eq!(*tried.lock().unwrap(), [BpfLog::Debug, BpfLog::Off]);
        let feature = &status.features()[FEATURE];
        assert!(!feature.available);
        assert!(feature.detail.contains("the steering programs") && feature.detail.contains("too complex"));

        let off = load_with_fallback(BpfLog::Off, "x", &status, |_| -> Result<()> { anyhow::bail!("no") });
        assert!(off.is_err(), "with the log off there is nothing to fall back to");
        let on = load_with_fallback(BpfLog::Trace, "x", &AgentStatus::default(), Ok).unwrap();
        assert_eq!(on, BpfLog::Trace, "loaded as asked");
    }
}
