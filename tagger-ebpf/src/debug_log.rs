//! Conventions of the datapath's debug log (aya-log records, read by the agent with
//! `--bpf-log`). Per-connection decisions are logged at debug, per-packet ones (TC marks) at
//! trace.
//!
//! **Off costs nothing.** The level is a load-time constant of the object (aya-log's
//! `AYA_LOG_LEVEL`, in `.rodata`, which the loader freezes): the verifier reads it as a known
//! value and drops a disabled record's branch before the JIT. Each record is a function of its
//! own (`#[inline(never)]`, scalar arguments only) called behind [`enabled`]: the formatting
//! code (aya-log's closures, which take the address of what they format) stays out of the
//! hooks, so it changes neither their code nor their stack; with the log off, a hook is left
//! with one load of the constant and a branch never taken.

pub use aya_log_ebpf::macro_support::Level;

/// What the record functions hand aya-log's macros as the program context: aya-log-ebpf 0.2
/// does not read it (records go to its ring buffer map), and leaving the real context out
/// keeps each record function to five scalar arguments, the most a BPF function takes.
pub const NO_CTX: () = ();

/// Whether records of `level` are written. aya-log's own gate (its macros call it first),
/// asked before the call so that a disabled record leaves no call in the hook; the crate is
/// pinned with `=` in the workspace, as this relies on its macro support module.
#[inline(always)]
pub fn enabled(level: Level) -> bool {
    aya_log_ebpf::macro_support::level_enabled(level)
}

/// A lane id as its big-endian bytes, for a `0x{:x}` argument: aya-log prints byte slices
/// zero-padded, so the record shows the id as `tagger lanes` does (`0x0a2b3c4d`).
#[inline(always)]
pub fn lane_hex(lane: u32) -> [u8; 4] {
    lane.to_be_bytes()
}
