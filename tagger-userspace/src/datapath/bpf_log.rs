//! The datapath's opt-in debug log (`tagger-agent --bpf-log`): the programs write aya-log
//! records (tagger-ebpf's `debug_log`: each steering decision, each inbound classification at
//! debug, each TC mark at trace) into their object's ring buffer (`AYA_LOGS`), and the agent
//! forwards them to its own log.
//!
//! **Off costs nothing.** The level is a load-time constant: aya-log's `AYA_LOG_LEVEL` lives in
//! the object's `.rodata`, which the loader freezes read-only, so the verifier reads it as a
//! known value, never walks a record below it and drops that code before the JIT. The default,
//! [`BpfLog::Off`], sets it to 0 (below every record); without that override aya-log's default
//! would enable every level. Off also shrinks the ring the object creates anyway to one page.
//!
//! **Changing the level reloads the programs.** The level is part of the build id recorded
//! with the pins (`object-<hash>` off, `object-<hash>-log-<level>` on; see
//! [`BpfLog::build_suffix`]), so an agent started with another level replaces the running
//! programs as an upgrade does (`BPF_LINK_UPDATE`: no moment without the hook). An agent with
//! the log on loads the programs afresh on every start even when the level matches: that is
//! how it holds their ring buffer, which a later process could otherwise only reach through
//! the program's id (`BPF_PROG_GET_FD_BY_ID`, `CAP_SYS_ADMIN` only).

use std::{
    fmt,
    panic::{AssertUnwindSafe, catch_unwind},
    str::FromStr,
};

use aya::EbpfLoader;
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};

use crate::{Error, Result};

/// aya-log's ring buffer map in the object.
const RING: &str = "AYA_LOGS";
/// The ring's size with the log off: one page, the smallest the kernel accepts (nothing is
/// written to it; the object defines it whatever the level).
const OFF_RING_BYTES: u32 = 4096;
/// The `tracing` target the records are forwarded under.
pub const TARGET: &str = "tagger::datapath";

/// The datapath's log level (`--bpf-log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BpfLog {
    /// No record is written (the default).
    #[default]
    Off,
    /// Per-connection records: each steering decision on a connection (or datagram) to a
    /// Service, each inbound connection's classification.
    Debug,
    /// Debug, and one record per packet TC lane marking marks.
    Trace,
}

impl BpfLog {
    /// Whether records are written.
    #[must_use]
    pub fn is_on(self) -> bool {
        self != Self::Off
    }

    /// The `AYA_LOG_LEVEL` value: records of this aya-log level and more severe ones are
    /// written (0: none).
    fn level(self) -> &'static u8 {
        match self {
            Self::Off => &0,
            Self::Debug => &(aya_log::Level::Debug as u8),
            Self::Trace => &(aya_log::Level::Trace as u8),
        }
    }

    /// Sets this level into an object about to be loaded.
    pub(super) fn configure(self, loader: &mut EbpfLoader<'_>) {
        loader.override_global(aya_log::LEVEL, self.level(), true);
        if !self.is_on() {
            loader.map_max_entries(RING, OFF_RING_BYTES);
        }
    }

    /// What the level adds to the object's hash in the build id recorded with the pins.
    #[must_use]
    pub fn build_suffix(self) -> &'static str {
        match self {
            Self::Off => "",
            Self::Debug => "-log-debug",
            Self::Trace => "-log-trace",
        }
    }
}

impl FromStr for BpfLog {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "debug" => Ok(Self::Debug),
            "trace" => Ok(Self::Trace),
            _ => Err(format!("{s:?}: the datapath log level is `debug`, `trace` or `off`")),
        }
    }
}

impl fmt::Display for BpfLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Debug => "debug",
            Self::Trace => "trace",
        })
    }
}

/// One loaded object's log ring, read with [`forward`].
pub struct LogRing(EbpfLogger<Forward>);

impl fmt::Debug for LogRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogRing").finish_non_exhaustive()
    }
}

impl LogRing {
    /// Takes the ring out of a loaded object. Its programs hold the map too, so the ring lives
    /// as long as either does.
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self> {
        EbpfLogger::init_with_logger(ebpf, Forward)
            .map(Self)
            .map_err(|e| Error::Invalid { what: "datapath log", reason: e.to_string() })
    }
}

/// Forwards the records to `tracing` at info (the flag is the operator's opt-in: records must
/// not vanish under the default `RUST_LOG=info`), with the record's own level and the
/// datapath module that wrote it as fields.
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::info!(
            target: TARGET,
            level = %record.level(),
            source = record.module_path().unwrap_or_default(),
            "{}",
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Reads the rings as records arrive, forwarding each to the agent's log; runs until a ring
/// cannot be read. A record aya-log cannot decode (it panics on one) ends the reading with an
/// error rather than the task.
pub async fn forward(rings: Vec<LogRing>) -> std::result::Result<(), String> {
    let readers = rings.into_iter().map(|ring| async move {
        // SAFETY: the logger owns the ring's map descriptor and returns that same open
        // descriptor for as long as it lives, which is as long as the `AsyncFd` that owns it.
        let mut fd = unsafe { AsyncFd::register_with_interest(ring.0, Interest::READABLE) }
            .map_err(|e| format!("watching the datapath log ring: {e}"))?;
        loop {
            let mut ready =
                fd.readable_mut().await.map_err(|e| format!("waiting on the datapath log ring: {e}"))?;
            catch_unwind(AssertUnwindSafe(|| ready.get_inner_mut().flush()))
                .map_err(|_| "a datapath log record could not be decoded".to_owned())?;
            ready.clear_ready();
        }
    });
    futures::future::try_join_all(readers).await.map(|_: Vec<()>| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_print_and_name_the_build() {
        for (text, log, suffix) in [
            ("off", BpfLog::Off, ""),
            ("debug", BpfLog::Debug, "-log-debug"),
            ("trace", BpfLog::Trace, "-log-trace"),
        ] {
            assert_eq!(text.parse::<BpfLog>(), Ok(log));
            assert_eq!(log.to_string(), text);
            assert_eq!(log.build_suffix(), suffix);
        }
        assert!("info".parse::<BpfLog>().unwrap_err().contains("debug"));
        assert_eq!(BpfLog::default(), BpfLog::Off);
        assert_eq!(*BpfLog::Off.level(), 0, "off is below every record");
        assert!(*BpfLog::Debug.level() < *BpfLog::Trace.level());
    }
}
