//! Map names, capacities and value layouts shared by the datapath and userspace.
//!
//! Byte order: every address and port is stored in **network byte order**, exactly as the kernel
//! presents them in `struct bpf_sock_addr`, so the datapath never swaps bytes. IPv4 addresses are
//! stored as IPv4-mapped IPv6 (`::ffff:a.b.c.d`), so one key layout serves both families and an
//! IPv6 socket connecting to a mapped IPv4 Service address finds the IPv4 frontend.

/// Pod cgroup id (`u64`, the cgroup's inode number) → [`PodEntry`].
pub const MAP_PODS: &str = "TAGGER_PODS_V1";
/// [`FrontendKey`] → [`Service`].
pub const MAP_FRONTENDS: &str = "TAGGER_SVC_V1";
/// [`SetKey`] → [`BackendSet`]: the live generation and size of one (Service, lane) set.
pub const MAP_BACKEND_SETS: &str = "TAGGER_SETS_V1";
/// [`SlotKey`] → [`Backend`]: the members of each generation of each backend set.
pub const MAP_BACKEND_SLOTS: &str = "TAGGER_SLOTS_V1";
/// Lane id (`u32`) → [`LanePolicy`].
pub const MAP_LANES: &str = "TAGGER_LANES_V1";
/// [`RevNatKey`] → [`RevNatValue`]: what each steered socket believes it talks to.
pub const MAP_REVNAT: &str = "TAGGER_RNAT_V1";
/// Per-CPU array indexed by [`Outcome`] (shadow decisions at
/// [`SHADOW_OFFSET`](crate::SHADOW_OFFSET) + outcome) → `u64` count.
pub const MAP_COUNTERS: &str = "TAGGER_CNT_V2";
/// Per-CPU LRU hash [`StatKey`] → `u64` count, per Service frontend and lane.
pub const MAP_SVC_STATS: &str = "TAGGER_SSTAT_V1";
/// Array of one [`DatapathConfig`].
pub const MAP_CONFIG: &str = "TAGGER_CFG_V1";
/// Pod cgroup id (`u64`) → [`PodMeta`]: names the agent publishes for operators (not read by
/// the programs).
pub const MAP_POD_META: &str = "TAGGER_PMETA_V1";
/// [`Service::svc_id`] (`u32`) → [`ServiceMeta`] (not read by the programs).
pub const MAP_SERVICE_META: &str = "TAGGER_SMETA_V1";
/// Lane id (`u32`) → [`LaneName`] (not read by the programs).
pub const MAP_LANE_NAMES: &str = "TAGGER_LNAME_V1";
/// Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`) → [`SockRecord`]: how the connect hook
/// steered the socket. Read back by `getpeername`/`recvmsg` on connected sockets and by the
/// sockops program; freed by the kernel with the socket.
pub const MAP_SOCK: &str = "TAGGER_SOCK_V1";
/// Socket cookie (`u64`) → [`SockRecord`]: the steered connections currently tracked (TCP from
/// establishment to close, connected UDP from connect to release). Userspace reads it for the
/// active-connection gauges and to reset connections to backends that left their set.
pub const MAP_CONNS: &str = "TAGGER_CONN_V1";

/// Every map the datapath pins, in a fixed order (used for pin management and `status`).
pub const ALL_MAPS: [&str; 24] = [
    MAP_PODS,
    MAP_FRONTENDS,
    MAP_BACKEND_SETS,
    MAP_BACKEND_SLOTS,
    MAP_LANES,
    MAP_REVNAT,
    MAP_COUNTERS,
    MAP_SVC_STATS,
    MAP_CONFIG,
    MAP_POD_META,
    MAP_SERVICE_META,
    MAP_LANE_NAMES,
    crate::shaping::MAP_SHAPING,
    crate::shaping::MAP_ROUTES,
    crate::shaping::MAP_WARM,
    MAP_SOCK,
    MAP_CONNS,
    crate::pods::MAP_POD_ADDRS,
    crate::pods::MAP_INBOUND,
    crate::pods::MAP_LANE_MARKS,
    crate::lease::MAP_LEASE,
    crate::affinity::MAP_AFFINITY,
    crate::affinity::MAP_AFFINITY_CFG,
    crate::edges::MAP_EDGES,
];

/// Pod cgroups registered on one node.
pub const MAX_PODS: u32 = 16_384;
/// Service frontends (ClusterIP, port, protocol), cluster-wide.
pub const MAX_FRONTENDS: u32 = 65_536;
/// (Service frontend, lane) backend sets.
pub const MAX_BACKEND_SETS: u32 = 131_072;
/// Live backends summed over all sets.
pub const MAX_BACKENDS: u32 = 262_144;
/// Slot entries: twice [`MAX_BACKENDS`], so that a set can be replaced by writing the complete
/// new generation before the old one is removed, even when the table is full.
pub const MAX_BACKEND_SLOTS: u32 = 2 * MAX_BACKENDS;
/// Lanes with a policy.
pub const MAX_LANES: u32 = 1_024;
/// Steered sockets remembered for reverse translation (LRU: the oldest are evicted first).
pub const MAX_REVNAT: u32 = 131_072;
/// (Service, lane, outcome) statistics rows (LRU).
pub const MAX_SVC_STATS: u32 = 65_536;
/// Steered connections tracked at once (LRU: beyond it the oldest are forgotten, and can then
/// no longer be reset).
pub const MAX_CONNS: u32 = 131_072;
/// Longest fallback chain of a lane.
pub const MAX_CHAIN: usize = 8;
/// Deepest cgroup level the datapath searches for a pod cgroup.
pub const MAX_CGROUP_LEVEL: u32 = 32;

/// `BPF_F_NO_PREALLOC`: elements are allocated on update and freed after an RCU grace period.
/// Used for every map whose values are replaced while programs read them, because a
/// preallocated hash map may hand a freed element to a concurrent update while a reader still
/// holds it.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Transport protocol numbers as the kernel reports them.
pub const IPPROTO_TCP: u8 = 6;
/// See [`IPPROTO_TCP`].
pub const IPPROTO_UDP: u8 = 17;

/// Address family of a backend.
pub const FAMILY_V4: u8 = 4;
/// See [`FAMILY_V4`].
pub const FAMILY_V6: u8 = 6;

/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:0:0`), in network order.
pub const V4_MAPPED_WORD: u32 = 0x0000_ffff_u32.to_be();

/// Encodes an IPv4 address given in network order as the mapped IPv6 words of [`FrontendKey`].
#[must_use]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4_be]
}

/// Whether four network-order words are an IPv4-mapped IPv6 address.
#[must_use]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// What the datapath knows of a pod cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodEntry {
    /// Lane id of the pod (see [`crate::lane_id`]).
    pub lane: u32,
    /// Depth of the pod cgroup below the cgroup v2 root (root = 0); lets userspace recompute
    /// [`DatapathConfig`]'s search range from the map alone.
    pub level: u32,
}

/// A Service frontend: ClusterIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// IPv6 address or IPv4-mapped IPv6 address, network order per 32-bit word.
    pub addr: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    /// Zero.
    pub _pad: u8,
}

/// `Service::flags`: no fallback; a connect finding no backend in the caller's lane fails.
pub const SVC_F_STRICT: u32 = 1;

/// `Service::flags`: the Service needs no lane steering on this node (its serving backends
/// are all base, nothing shapes it, no local caller's lane could be refused): the datapath
/// leaves its connections to the cluster's Service implementation, untouched. The entry stays
/// (ids, names and backend sets for operators), so becoming steered again is one flag flip.
pub const SVC_F_PASSTHROUGH: u32 = 1 << 8;

/// A Service frontend's identity and per-Service overrides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Id of this frontend, unique on the node; keys its backend sets and statistics.
    pub svc_id: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
}

/// One (Service frontend, lane) backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SetKey {
    /// [`Service::svc_id`].
    pub svc_id: u32,
    /// Lane id of the backends in the set.
    pub lane: u32,
}

/// The live generation of a backend set. Replaced in one map update, after every slot of the
/// new generation has been written, so a reader sees the old set or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendSet {
    /// Number of slots `0..count` present in generation `generation`. Zero: no ready backend.
    pub count: u32,
    /// Generation number; increases on every replacement.
    pub generation: u32,
}

/// One slot of one generation of a backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// [`Service::svc_id`].
    pub svc_id: u32,
    /// Lane id of the set.
    pub lane: u32,
    /// [`BackendSet::generation`].
    pub generation: u32,
    /// Index within the generation, `0..count`.
    pub slot: u32,
}

/// A backend address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Address, network order words; IPv4 as IPv4-mapped IPv6.
    pub addr: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Zero.
    pub _pad: u8,
}

/// `LanePolicy::flags`: no fallback for this lane.
pub const LANE_F_STRICT: u32 = 1;

/// `LanePolicy::flags`: when the lane gets ready backends again, reset the connections that had
/// fallen back from it, so they reconnect into the lane (`rehome: true`).
pub const LANE_F_REHOME: u32 = 1 << 2;

/// A lane's policy. Lanes without an entry fall back to base.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LanePolicy {
    /// `LANE_F_*` bits.
    pub flags: u32,
    /// Number of valid entries in `chain`.
    pub chain_len: u32,
    /// Lanes tried in order when the lane itself has no ready backend (usually ends with base).
    pub chain: [u32; MAX_CHAIN],
}

impl LanePolicy {
    /// A policy with `flags` and the fallback chain `chain` (lane ids, in order; at most
    /// [`MAX_CHAIN`] are kept).
    #[must_use]
    pub fn new(chain: &[u32], flags: u32) -> Self {
        let mut p = Self { flags, ..Self::default() };
        let n = if chain.len() < MAX_CHAIN { chain.len() } else { MAX_CHAIN };
        p.chain[..n].copy_from_slice(&chain[..n]);
        #[expect(clippy::cast_possible_truncation, reason = "at most MAX_CHAIN = 8")]
        {
            p.chain_len = n as u32;
        }
        p
    }
}

/// Reverse translation key: a socket and the backend it was steered to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatKey {
    /// Socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Backend address, network order words (IPv4 mapped).
    pub addr: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    /// Zero.
    pub _pad: [u8; 6],
}

/// The Service address a steered socket must keep seeing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatValue {
    /// Service address, network order words (IPv4 mapped).
    pub addr: [u32; 4],
    /// Service port, network byte order.
    pub port: u16,
    /// Zero.
    pub _pad: u16,
    /// [`Service::svc_id`].
    pub svc_id: u32,
}

/// `SockRecord::flags`: the connection fell back from the caller's lane.
pub const SOCK_F_FELL_BACK: u8 = 1;
/// `SockRecord::flags`: a routing rule or the Service's canary share chose the backend's lane.
pub const SOCK_F_ROUTED: u8 = 2;

/// How the datapath steered one socket ([`MAP_SOCK`], [`MAP_CONNS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRecord {
    /// Service address the application addressed, network order words (IPv4 mapped).
    pub vip: [u32; 4],
    /// The backend the socket was steered to.
    pub backend: Backend,
    /// Service port, network byte order.
    pub vport: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    /// `SOCK_F_*` bits.
    pub flags: u8,
    /// [`Service::svc_id`].
    pub svc_id: u32,
    /// Lane of the caller pod.
    pub caller_lane: u32,
    /// Lane of the backend's set.
    pub backend_lane: u32,
    /// Zero.
    pub _pad: u32,
    /// Cgroup id of the caller's pod (0: not a registered pod); lets userspace find the pod's
    /// network namespace to reset the socket.
    pub pod_cgroup: u64,
}

/// Key of the per-Service statistics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatKey {
    /// [`Service::svc_id`].
    pub svc_id: u32,
    /// Lane of the caller pod.
    pub caller_lane: u32,
    /// Lane of the chosen backend ([`BASE_LANE`](crate::BASE_LANE) when none was chosen).
    pub backend_lane: u32,
    /// [`Outcome`] as `u32`.
    pub outcome: u32,
}

/// Global datapath settings written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Shallowest cgroup level (root = 0) at which a registered pod cgroup sits.
    pub pod_level_min: u32,
    /// Deepest such level; 0 when no pod is registered. The datapath searches only this range.
    pub pod_level_max: u32,
    /// `CFG_F_*` bits (shadow mode, see [`crate::shaping`]).
    pub flags: u32,
    /// Zero.
    pub _pad: u32,
}

/// Length of the name fields of the metadata maps; longer names are truncated.
pub const META_NAME_LEN: usize = 64;

/// Names of a pod, for operators.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodMeta {
    /// Namespace, UTF-8, NUL-padded.
    pub namespace: [u8; META_NAME_LEN],
    /// Pod name, UTF-8, NUL-padded (truncated past 64 bytes).
    pub name: [u8; META_NAME_LEN],
}

/// Names of a Service frontend, for operators.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceMeta {
    /// Namespace, UTF-8, NUL-padded.
    pub namespace: [u8; META_NAME_LEN],
    /// Service name, UTF-8, NUL-padded.
    pub name: [u8; META_NAME_LEN],
    /// Service port name (may be empty), UTF-8, NUL-padded.
    pub port_name: [u8; META_NAME_LEN],
}

/// A lane's name (label values are at most 63 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneName {
    /// UTF-8, NUL-padded.
    pub name: [u8; META_NAME_LEN],
}

/// Encodes a string into a NUL-padded field, truncating at a character boundary.
#[must_use]
pub fn name_field(s: &str) -> [u8; META_NAME_LEN] {
    let mut out = [0u8; META_NAME_LEN];
    let mut end = s.len().min(META_NAME_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

/// Decodes a NUL-padded field (invalid UTF-8 is cut at the first bad byte).
#[must_use]
pub fn field_str(field: &[u8; META_NAME_LEN]) -> &str {
    let len = field.iter().position(|&b| b == 0).unwrap_or(META_NAME_LEN);
    match core::str::from_utf8(&field[..len]) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&field[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// Why a hook invocation ended as it did. Indexes [`MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// The destination is not a Service frontend: untouched.
    NotService = 0,
    /// Steered to a backend of the caller's own lane.
    Steered = 1,
    /// The caller's lane had no ready backend; steered along its fallback chain.
    FellBack = 2,
    /// Strict lane or Service with no backend in the caller's lane: the connect failed (EPERM).
    RefusedStrict = 3,
    /// No ready backend in any lane the caller may use: failed open, untouched.
    NoBackend = 4,
    /// A slot was missing from a set (internal miss): failed open, untouched.
    SlotMiss = 5,
    /// The chosen backend's family cannot be reached from this socket: failed open.
    FamilyMismatch = 6,
    /// The reverse translation entry could not be written (connection still steered).
    RevNatFull = 7,
    /// `getpeername` or `recvmsg` showed the Service address instead of the backend's.
    RevNatApplied = 8,
    /// The calling task is in no registered pod cgroup: treated as base.
    UnknownPod = 9,
    /// A routing rule for (Service, caller lane) chose the backend lane.
    Routed = 10,
    /// A base caller's connection went to the Service's canary lane.
    Canary = 11,
    /// An accepted connection's row could not be added to the full inbound map (not counted
    /// per pod).
    InboundFull = 12,
    /// An accepted connection to a local pod whose SYN was not saved (the listener was opened
    /// before tagger attached, or the SYN queue overflowed into syncookies): not classified.
    InboundNoSyn = 13,
    /// A connection to a Service frontend tagger does not steer ([`SVC_F_PASSTHROUGH`]): left
    /// to the cluster's Service implementation.
    Passthrough = 14,
    /// A connection to a Service frontend while the datapath lease had run out (no agent renewed
    /// it in time, or none has completed a pass yet): failed open, untouched.
    LeaseExpired = 15,
}

/// Number of slots in [`MAP_COUNTERS`]: the outcomes, then their shadow counterparts at
/// [`SHADOW_OFFSET`](crate::SHADOW_OFFSET).
pub const OUTCOME_SLOTS: u32 = 32;

impl Outcome {
    /// Every outcome, in index order.
    pub const ALL: [Outcome; 16] = [
        Outcome::NotService,
        Outcome::Steered,
        Outcome::FellBack,
        Outcome::RefusedStrict,
        Outcome::NoBackend,
        Outcome::SlotMiss,
        Outcome::FamilyMismatch,
        Outcome::RevNatFull,
        Outcome::RevNatApplied,
        Outcome::UnknownPod,
        Outcome::Routed,
        Outcome::Canary,
        Outcome::InboundFull,
        Outcome::InboundNoSyn,
        Outcome::Passthrough,
        Outcome::LeaseExpired,
    ];

    /// Stable snake-case name, used in CLI JSON and metric labels.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::NotService => "not_service",
            Outcome::Steered => "steered",
            Outcome::FellBack => "fell_back",
            Outcome::RefusedStrict => "refused_strict",
            Outcome::NoBackend => "no_backend",
            Outcome::SlotMiss => "slot_miss",
            Outcome::FamilyMismatch => "family_mismatch",
            Outcome::RevNatFull => "revnat_full",
            Outcome::RevNatApplied => "revnat_applied",
            Outcome::UnknownPod => "unknown_pod",
            Outcome::Routed => "routed",
            Outcome::Canary => "canary",
            Outcome::InboundFull => "inbound_full",
            Outcome::InboundNoSyn => "inbound_no_syn",
            Outcome::Passthrough => "passthrough",
            Outcome::LeaseExpired => "lease_expired",
        }
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY (all impls below): each type is `#[repr(C)]`, `Copy`, made only of integers and
    // integer arrays with explicit padding fields, so every bit pattern is valid and there are
    // no implicit padding bytes to leak.
    unsafe impl aya::Pod for super::PodEntry {}
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::SetKey {}
    unsafe impl aya::Pod for super::BackendSet {}
    unsafe impl aya::Pod for super::SlotKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::LanePolicy {}
    unsafe impl aya::Pod for super::RevNatKey {}
    unsafe impl aya::Pod for super::RevNatValue {}
    unsafe impl aya::Pod for super::StatKey {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::PodMeta {}
    unsafe impl aya::Pod for super::ServiceMeta {}
    unsafe impl aya::Pod for super::LaneName {}
    unsafe impl aya::Pod for super::SockRecord {}
    unsafe impl aya::Pod for crate::pods::PodAddr {}
    unsafe impl aya::Pod for crate::pods::InboundKey {}
    unsafe impl aya::Pod for crate::pods::LaneMark {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<PodEntry>(), 8);
        assert_eq!(size_of::<FrontendKey>(), 20);
        assert_eq!(size_of::<Service>(), 8);
        assert_eq!(size_of::<SetKey>(), 8);
        assert_eq!(size_of::<BackendSet>(), 8);
        assert_eq!(size_of::<SlotKey>(), 16);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<LanePolicy>(), 8 + 4 * MAX_CHAIN);
        assert_eq!(size_of::<RevNatKey>(), 32);
        assert_eq!(size_of::<RevNatValue>(), 24);
        assert_eq!(size_of::<StatKey>(), 16);
        assert_eq!(size_of::<DatapathConfig>(), 16);
        assert_eq!(size_of::<SockRecord>(), 64);
    }

    #[test]
    fn name_fields_round_trip_and_truncate_on_char_boundaries() {
        assert_eq!(field_str(&name_field("gray")), "gray");
        assert_eq!(field_str(&name_field("")), "");
        let long = "é".repeat(40); // 80 bytes
        let f = name_field(&long);
        assert_eq!(field_str(&f), "é".repeat(32));
    }

    #[test]
    fn v4_mapped_encoding_matches_the_wire_bytes() {
        let ip_be = u32::from_ne_bytes([10, 96, 0, 10]);
        let words = v4_mapped(ip_be);
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10]);
        assert!(is_v4_mapped(&words));
        assert!(!is_v4_mapped(&[0, 0, 0, 1]));
    }

    #[test]
    fn map_names_fit_the_kernel_object_name() {
        // BPF_OBJ_NAME_LEN is 16 including the terminating NUL.
        for name in ALL_MAPS {
            assert!(name.len() <= 15, "{name} is too long for a kernel map name");
        }
    }

    #[test]
    fn outcome_indexes_are_dense_and_fit() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
        assert!(Outcome::ALL.len() <= crate::SHADOW_OFFSET as usize);
        assert_eq!(2 * crate::SHADOW_OFFSET, OUTCOME_SLOTS);
    }
}
