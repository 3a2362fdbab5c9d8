//! Counted warnings about input the model skipped or corrected: a counter per kind (for
//! metrics) and a few example messages (for logs), bounded so that one bad object repeated
//! 100,000 times cannot flood either.

use std::{collections::BTreeMap, fmt};

/// Kinds of input problems. The names are stable: they are metric label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WarningKind {
    /// A pod's lane label value is not a valid label value; the pod is base.
    InvalidLaneLabel,
    /// A Service port with protocol SCTP (the datapath steers TCP and UDP).
    SctpPortSkipped,
    /// A Service port with a protocol other than TCP, UDP or SCTP.
    UnknownProtocol,
    /// A headless Service (`clusterIP: None`): clients reach pods directly, nothing to steer.
    HeadlessServiceSkipped,
    /// An `ExternalName` Service: a DNS alias, nothing to steer.
    ExternalNameSkipped,
    /// A Service with no ports.
    ServiceWithoutPorts,
    /// A Service with no cluster IP (not allocated yet, or a malformed object).
    NoClusterIp,
    /// A cluster IP or endpoint address that does not parse, or is of the wrong family.
    InvalidAddress,
    /// A port number outside 1..=65535.
    InvalidPort,
    /// Two Services claim the same frontend (address, port, protocol); the first by
    /// namespace/name keeps it.
    DuplicateFrontend,
    /// The same ready endpoint address listed twice for one Service (across or within slices).
    DuplicateEndpoint,
    /// An EndpointSlice of address type FQDN (or another unknown type).
    FqdnSliceSkipped,
    /// An endpoint whose `targetRef` names a Pod whose labels are not known (yet); it is base.
    UnknownBackendPod,
    /// Dropped to stay within a datapath capacity (per-set cap or map sizes).
    Capacity,
    /// A `tagger.io/*` annotation with a value that is not understood; it is ignored.
    InvalidAnnotation,
    /// A local pod whose UID cannot name a cgroup (not letters, digits and dashes).
    InvalidPodUid,
    /// A Service's `sessionAffinity` or its timeout is not what Kubernetes accepts; Kubernetes'
    /// default is used (no affinity, or 10,800 s).
    InvalidSessionAffinity,
}

impl WarningKind {
    /// Every kind, in a fixed order.
    pub const ALL: [WarningKind; 17] = [
        WarningKind::InvalidLaneLabel,
        WarningKind::SctpPortSkipped,
        WarningKind::UnknownProtocol,
        WarningKind::HeadlessServiceSkipped,
        WarningKind::ExternalNameSkipped,
        WarningKind::ServiceWithoutPorts,
        WarningKind::NoClusterIp,
        WarningKind::InvalidAddress,
        WarningKind::InvalidPort,
        WarningKind::DuplicateFrontend,
        WarningKind::DuplicateEndpoint,
        WarningKind::FqdnSliceSkipped,
        WarningKind::UnknownBackendPod,
        WarningKind::Capacity,
        WarningKind::InvalidAnnotation,
        WarningKind::InvalidPodUid,
        WarningKind::InvalidSessionAffinity,
    ];

    /// Stable snake_case name (metric label value).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            WarningKind::InvalidLaneLabel => "invalid_lane_label",
            WarningKind::SctpPortSkipped => "sctp_port_skipped",
            WarningKind::UnknownProtocol => "unknown_protocol",
            WarningKind::HeadlessServiceSkipped => "headless_service_skipped",
            WarningKind::ExternalNameSkipped => "external_name_skipped",
            WarningKind::ServiceWithoutPorts => "service_without_ports",
            WarningKind::NoClusterIp => "no_cluster_ip",
            WarningKind::InvalidAddress => "invalid_address",
            WarningKind::InvalidPort => "invalid_port",
            WarningKind::DuplicateFrontend => "duplicate_frontend",
            WarningKind::DuplicateEndpoint => "duplicate_endpoint",
            WarningKind::FqdnSliceSkipped => "fqdn_slice_skipped",
            WarningKind::UnknownBackendPod => "unknown_backend_pod",
            WarningKind::Capacity => "capacity",
            WarningKind::InvalidAnnotation => "invalid_annotation",
            WarningKind::InvalidPodUid => "invalid_pod_uid",
            WarningKind::InvalidSessionAffinity => "invalid_session_affinity",
        }
    }
}

impl fmt::Display for WarningKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Warning counters by kind, plus the first few messages as examples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Warnings {
    counts: BTreeMap<WarningKind, u64>,
    examples: Vec<(WarningKind, String)>,
}

impl Warnings {
    /// Example messages kept per computation (the counters are exact).
    pub const MAX_EXAMPLES: usize = 16;

    /// Counts one warning; keeps its message if there is room. The message is formatted only
    /// then, so callers can pass `format_args!` cheaply.
    pub fn add(&mut self, kind: WarningKind, message: impl fmt::Display) {
        *self.counts.entry(kind).or_default() += 1;
        if self.examples.len() < Self::MAX_EXAMPLES {
            self.examples.push((kind, message.to_string()));
        }
    }

    /// Adds another set of warnings to this one.
    pub fn merge(&mut self, other: Warnings) {
        for (kind, n) in other.counts {
            *self.counts.entry(kind).or_default() += n;
        }
        let room = Self::MAX_EXAMPLES.saturating_sub(self.examples.len());
        self.examples.extend(other.examples.into_iter().take(room));
    }

    /// The count of one kind.
    #[must_use]
    pub fn count(&self, kind: WarningKind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    /// The non-zero counters.
    #[must_use]
    pub fn counts(&self) -> &BTreeMap<WarningKind, u64> {
        &self.counts
    }

    /// Sum of all counters.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Whether nothing was counted.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// The kept example messages, in the order they were counted.
    #[must_use]
    pub fn examples(&self) -> &[(WarningKind, String)] {
        &self.examples
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn names_are_unique_snake_case() {
        let names: BTreeSet<_> = WarningKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), WarningKind::ALL.len());
        for n in names {
            assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{n}");
        }
        assert_eq!(WarningKind::Capacity.to_string(), "capacity");
    }

    #[test]
    fn counts_exactly_and_keeps_few_examples() {
        let mut w = Warnings::default();
        assert!(w.is_empty());
        for i in 0..100 {
            w.add(WarningKind::DuplicateEndpoint, format_args!("endpoint {i}"));
        }
        w.add(WarningKind::Capacity, "full");
        assert_eq!(w.count(WarningKind::DuplicateEndpoint), 100);
        assert_eq!(w.count(WarningKind::Capacity), 1);
        assert_eq!(w.count(WarningKind::SctpPortSkipped), 0);
        assert_eq!(w.total(), 101);
        assert_eq!(w.examples().len(), Warnings::MAX_EXAMPLES);
        assert_eq!(w.examples()[0], (WarningKind::DuplicateEndpoint, "endpoint 0".to_owned()));

        let mut other = Warnings::default();
        other.add(WarningKind::Capacity, "again");
        let mut small = Warnings::default();
        small.add(WarningKind::InvalidPort, "p");
        small.merge(other.clone());
        assert_eq!(small.examples().len(), 2);
        w.merge(other);
        assert_eq!(w.count(WarningKind::Capacity), 2);
        assert_eq!(w.examples().len(), Warnings::MAX_EXAMPLES);
    }
}
