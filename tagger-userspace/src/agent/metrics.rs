//! `/metrics`: Prometheus text exposition through `prometheus-client`, of the agent's own state
//! (reconciles and their latency, watch restarts, last successful sync, input warnings) and of
//! the datapath, read from the pinned maps at scrape time (outcome counters globally and per
//! Service and lane, map fill ratios).

use std::{borrow::Cow, path::PathBuf, sync::Arc, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tagger_common::{Lease, LeaseState, Outcome, STAT_F_SHADOW};

use super::AgentStatus;
use crate::{
    coverage::{Observed, pins::Pins},
    datapath::Datapath,
};

/// The agent's registry, built once: its collectors read the agent's status and the pinned
/// maps at each render.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// The registry of the agent's own state and of the datapath pinned under `bpffs`.
    #[must_use]
    pub fn new(status: Arc<AgentStatus>, bpffs: PathBuf) -> Self {
        let mut registry = Registry::with_prefix("tagger");
        registry.register_collector(Box::new(AgentCollector(status)));
        registry.register_collector(Box::new(DatapathCollector { bpffs }));
        Self { registry }
    }

    /// Renders the whole exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.push_str("# encoding failed\n");
        }
        out
    }
}

/// Resets, reset failures and `agent_feature_available{feature, detail}`.
fn encode_lifecycle(encoder: &mut DescriptorEncoder, s: &AgentStatus) -> Result<(), std::fmt::Error> {
    counter(
        encoder,
        "agent_connections_reset",
        "Tracked connections reset because their backend left its set or their lane came back (rehome)",
        s.connections_reset(),
    )?;
    counter(
        encoder,
        "agent_connections_reset_failed",
        "Stale connections a reset pass could not reset (their pod's network namespace not reachable, a netlink error); each is kept and tried again every second, and counted each time",
        s.reset_failures(),
    )?;
    let features = Family::<FeatureLabels, Gauge>::default();
    for (feature, f) in s.features() {
        features
            .get_or_create(&FeatureLabels { feature, detail: label_value(&f.detail) })
            .set(i64::from(f.available));
    }
    features.encode(encoder.encode_descriptor(
        "agent_feature_available",
        "Optional features: 1 when the feature works on this node, 0 when it cannot (the detail label says why: a missing capability, mount or kernel feature)",
        None,
        features.metric_type(),
    )?)?;
    Ok(())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeatureLabels {
    feature: String,
    detail: String,
}

/// A free-text label value the text format carries unescaped: without quotes, backslashes and
/// line breaks.
fn label_value(text: &str) -> String {
    text.chars().map(|c| if matches!(c, '"' | '\\' | '\n' | '\r') { '\'' } else { c }).collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    namespace: String,
    service: String,
    port: String,
    caller_lane: String,
    backend_lane: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    namespace: String,
    service: String,
    port: String,
    caller_lane: String,
    backend_lane: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InboundLabels {
    namespace: String,
    pod: String,
    pod_lane: String,
    caller_lane: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeakLabels {
    namespace: String,
    pod: String,
    pod_lane: String,
    caller_lane: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> Result<(), std::fmt::Error> {
    let g = Gauge::<i64>::default();
    g.set(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

/// The agent's own state.
#[derive(Debug)]
struct AgentCollector(Arc<AgentStatus>);

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let snap = s.snapshot();
        gauge(
            &mut encoder,
            "agent_ready",
            "1 once the first complete view has been applied",
            i64::from(snap.ready),
        )?;
        counter(&mut encoder, "agent_reconciles", "Reconcile passes", snap.reconciles)?;
        counter(
            &mut encoder,
            "agent_reconcile_errors",
            "Datapath writes that failed or were skipped",
            snap.reconcile_errors,
        )?;
        encode_lifecycle(&mut encoder, s)?;
        counter(
            &mut encoder,
            "agent_source_errors",
            "Source files rejected or unreadable",
            snap.source_errors,
        )?;
        counter(
            &mut encoder,
            "agent_config_errors",
            "Lanes configs rejected or unreadable",
            snap.config_errors,
        )?;
        counter(
            &mut encoder,
            "agent_watch_restarts",
            "Kubernetes watches that failed and were restarted",
            snap.watch_restarts,
        )?;
        gauge(
            &mut encoder,
            "agent_api_reachable",
            "0 while a Kubernetes watch is failing (the datapath serves its last state), 1 otherwise",
            i64::from(snap.api_reachable),
        )?;
        gauge(
            &mut encoder,
            "agent_healthy",
            "1 while the reconciler and every watcher run; 0 when one ended, panicked or (the reconciler) stalled: /healthz answers 503 naming it",
            i64::from(s.health(std::time::Instant::now()).is_ok()),
        )?;
        gauge(
            &mut encoder,
            "agent_attached_at_cgroup_root",
            "1 when the datapath attaches at the cgroup root (no kubelet pods cgroup found): programs attached there earlier, such as a socket-LB CNI's, run before tagger's",
            i64::from(s.attached_at_root()),
        )?;
        gauge(
            &mut encoder,
            "agent_pending_pods",
            "Local pods whose cgroup has not appeared yet",
            clamp(snap.pending_pods),
        )?;
        gauge(
            &mut encoder,
            "agent_last_sync_timestamp_seconds",
            "Unix time of the last pass that applied a complete view",
            clamp(snap.last_sync_unix),
        )?;
        let hist = s.reconcile_histogram();
        hist.encode(encoder.encode_descriptor(
            "agent_reconcile_duration_seconds",
            "Time to compute and apply one reconcile pass",
            None,
            hist.metric_type(),
        )?)?;
        let warnings = Family::<KindLabel, Gauge>::default();
        for (kind, n) in s.warnings() {
            warnings.get_or_create(&KindLabel { kind }).set(clamp(n));
        }
        warnings.encode(encoder.encode_descriptor(
            "agent_input_warnings",
            "Input problems in the last pass (skipped or corrected objects), by kind",
            None,
            warnings.metric_type(),
        )?)?;
        let ignored = Family::<KindLabel, Counter>::default();
        for (kind, n) in s.ignored_kinds() {
            ignored.get_or_create(&KindLabel { kind }).inc_by(n);
        }
        ignored.encode(encoder.encode_descriptor(
            "agent_ignored_objects",
            "Objects of kinds the file source does not use",
            None,
            ignored.metric_type(),
        )?)
    }
}

/// The active-connection gauges, from the tracked connections.
fn encode_connections(
    encoder: &mut DescriptorEncoder,
    conns: &[(u64, tagger_common::SockRecord)],
    names: &std::collections::BTreeMap<u32, (String, String, String)>,
    lane: &impl Fn(u32) -> String,
) -> Result<(), std::fmt::Error> {
    let g = crate::lifecycle::Gauges::of(conns);
    let family = Family::<ConnLabels, Gauge>::default();
    for ((svc_id, caller, backend_lane), n) in g.per_service_lane {
        let (namespace, service, port) = names
            .get(&svc_id)
            .cloned()
            .unwrap_or_else(|| (String::new(), format!("svc-{svc_id}"), String::new()));
        family
            .get_or_create(&ConnLabels {
                namespace,
                service,
                port,
                caller_lane: lane(caller),
                backend_lane: lane(backend_lane),
            })
            .set(clamp(n));
    }
    family.encode(encoder.encode_descriptor(
        "active_connections",
        "Steered connections open now (TCP established, connected UDP), per Service and lanes",
        None,
        family.metric_type(),
    )?)?;
    let family = Family::<BackendLabel, Gauge>::default();
    for (b, n) in g.per_backend {
        family
            .get_or_create(&BackendLabel { backend: crate::net::backend_addr(&b).to_string() })
            .set(clamp(n));
    }
    family.encode(encoder.encode_descriptor(
        "backend_active_connections",
        "Steered connections open now, per backend",
        None,
        family.metric_type(),
    )?)?;
    Ok(())
}

/// The inbound connection counters, per local pod (rows of addresses no longer a local pod's
/// are left out).
fn encode_inbound(
    encoder: &mut DescriptorEncoder,
    pins: &Pins,
    lane: &impl Fn(u32) -> String,
) -> Result<(), std::fmt::Error> {
    let (rows, addrs, pods) = (&pins.inbound, &pins.pod_addrs, &pins.pod_meta);
    let all = Family::<InboundLabels, Counter>::default();
    let leaks = Family::<LeakLabels, Counter>::default();
    let untagged = Family::<PodLabels, Counter>::default();
    let unknown = Family::<PodLabels, Counter>::default();
    for row in rows {
        let Some((namespace, pod)) = addrs.get(&row.key.addr).and_then(|a| pods.get(&a.cgroup)).cloned()
        else {
            continue;
        };
        let kind = tagger_common::inbound_kind_name(row.key.kind);
        let labels = InboundLabels {
            namespace: namespace.clone(),
            pod: pod.clone(),
            pod_lane: lane(row.key.pod_lane),
            caller_lane: if row.key.kind == tagger_common::INBOUND_UNTAGGED
                || row.key.kind == tagger_common::INBOUND_UNKNOWN_LANE
            {
                String::new()
            } else {
                lane(row.key.caller_lane)
            },
            kind: kind.to_owned(),
        };
        all.get_or_create(&labels).inc_by(row.count);
        match row.key.kind {
            tagger_common::INBOUND_LEAK => {
                let InboundLabels { namespace, pod, pod_lane, caller_lane, .. } = labels;
                leaks.get_or_create(&LeakLabels { namespace, pod, pod_lane, caller_lane }).inc_by(row.count);
            }
            tagger_common::INBOUND_UNTAGGED => {
                untagged.get_or_create(&PodLabels { namespace, pod }).inc_by(row.count);
            }
            tagger_common::INBOUND_UNKNOWN_LANE => {
                unknown.get_or_create(&PodLabels { namespace, pod }).inc_by(row.count);
            }
            _ => {}
        }
    }
    all.encode(encoder.encode_descriptor(
        "inbound_connections",
        "Connections accepted by local pods, by caller lane (from the SYN's lane option), pod lane and kind \
         (in_lane, fell_back, routed, leak, untagged, unknown_lane)",
        None,
        all.metric_type(),
    )?)?;
    leaks.encode(encoder.encode_descriptor(
        "inbound_lane_leaks",
        "Connections accepted by a local pod from a caller of another lane that did not fall back",
        None,
        leaks.metric_type(),
    )?)?;
    untagged.encode(encoder.encode_descriptor(
        "inbound_untagged",
        "Connections accepted by a local pod without a lane option (caller not behind tagger)",
        None,
        untagged.metric_type(),
    )?)?;
    unknown.encode(encoder.encode_descriptor(
        "inbound_unknown_lane",
        "Connections accepted by a local pod whose SYN's lane option named no known lane (the option is \
         unauthenticated; such ids are counted here, never per id)",
        None,
        unknown.metric_type(),
    )?)
}

/// Lane marking's lanes: with an index under `--mark-mask`, and without (the mask is full).
/// Nothing while marking is off (the map is empty).
fn encode_lane_marks(
    encoder: &mut DescriptorEncoder,
    t: &crate::datapath::Tables,
) -> Result<(), std::fmt::Error> {
    let Ok(marks) = t.lane_marks() else { return Ok(()) };
    if marks.is_empty() {
        return Ok(());
    }
    let family = Family::<StateLabel, Gauge>::default();
    let unfit = marks.values().filter(|m| m.mask == 0).count();
    for (state, n) in [("indexed", marks.len() - unfit), ("unfit", unfit)] {
        family
            .get_or_create(&StateLabel { state: state.to_owned() })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    family.encode(encoder.encode_descriptor(
        "mark_lanes",
        "Lanes lane marking handles: `indexed` got an index under --mark-mask, `unfit` did not (their \
         packets are not marked)",
        None,
        family.metric_type(),
    )?)
}

/// The lane coverage rows (see `crate::coverage`): call edges of the local pods, arrivals at
/// them, and every Service's backends per lane, named as `tagger lanes coverage` names them,
/// so a Prometheus over every node answers `tagger lanes coverage --prometheus`.
fn encode_coverage(encoder: &mut DescriptorEncoder, observed: &Observed) -> Result<(), std::fmt::Error> {
    use crate::coverage::series::{self, ArrivalLabels, EdgeLabels, LaneBackendLabels};
    let edges = Family::<EdgeLabels, Counter>::default();
    for e in &observed.edges {
        edges.get_or_create(&EdgeLabels::of(e)).inc_by(e.connections);
    }
    edges.encode(encoder.encode_descriptor(
        series::EDGES,
        "New connections from this node's pods, per caller (the Service the calling pod backs, else its \
         workload), caller lane, Service, backend lane and outcome; Services left to the cluster are counted \
         for callers of lanes other than base only",
        None,
        edges.metric_type(),
    )?)?;
    let arrivals = Family::<ArrivalLabels, Counter>::default();
    for a in &observed.arrivals {
        arrivals.get_or_create(&ArrivalLabels::of(a)).inc_by(a.connections);
    }
    arrivals.encode(encoder.encode_descriptor(
        series::ARRIVALS,
        "Connections accepted by this node's pods, per receiver (as for lane_edges), pod lane, caller lane and kind",
        None,
        arrivals.metric_type(),
    )?)?;
    let backends = Family::<LaneBackendLabels, Gauge>::default();
    for (svc, lanes) in &observed.lane_backends {
        for (lane, n) in lanes {
            backends
                .get_or_create(&LaneBackendLabels {
                    namespace: svc.namespace.clone(),
                    service: svc.name.clone(),
                    lane: lane.clone(),
                })
                .set(clamp(*n));
        }
    }
    backends.encode(encoder.encode_descriptor(
        series::LANE_BACKENDS,
        "Backends of each Service per lane (the largest set of its ports), as this node's datapath holds them",
        None,
        backends.metric_type(),
    )?)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// Labels of a Service frontend's steering gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SteeringLabels {
    namespace: String,
    service: String,
    port: String,
    /// Why it is steered (`lane_backends`, `shaping`, ...), or `base_only`.
    steering: String,
}

/// `tagger_service_steered`: 1 for each Service frontend tagger steers on this node, 0 for those
/// it leaves to the cluster, with why.
fn encode_steering(
    encoder: &mut DescriptorEncoder,
    t: &crate::datapath::Tables,
    names: &std::collections::BTreeMap<u32, (String, String, String)>,
    sets: &std::collections::BTreeMap<tagger_common::SetKey, tagger_common::BackendSet>,
) -> Result<(), std::fmt::Error> {
    use crate::model::steering::{self, Reasons};
    let (Ok(frontends), Ok(policies), Ok(pods)) = (t.frontends(), t.lane_policies(), t.pods()) else {
        return Ok(());
    };
    let strict_caller = steering::strict_caller(pods.values(), &policies);
    let family = Family::<SteeringLabels, Gauge>::default();
    for svc in frontends.values() {
        let lane_backends = steering::has_lane_backends(
            sets.range(crate::model::index::set_range(svc.svc_id)).map(|(k, _)| k),
        );
        let reasons = Reasons::of(svc.flags, lane_backends, strict_caller);
        let (namespace, service, port) = names
            .get(&svc.svc_id)
            .cloned()
            .unwrap_or_else(|| (String::new(), format!("svc-{}", svc.svc_id), String::new()));
        let steered = !tagger_common::svc_is_passthrough(svc);
        family
            .get_or_create(&SteeringLabels { namespace, service, port, steering: reasons.names().join(",") })
            .set(i64::from(steered));
    }
    family.encode(encoder.encode_descriptor(
        "service_steered",
        "1 for each Service frontend tagger steers on this node (label steering: why), 0 for those left to the \
         cluster's Service implementation (steering=base_only)",
        None,
        family.metric_type(),
    )?)
}

/// The datapath lease: whether the programs steer, and for how long without a renewal.
fn encode_lease(encoder: &mut DescriptorEncoder, lease: &Lease, now_ns: u64) -> Result<(), std::fmt::Error> {
    let state = lease.state(now_ns);
    gauge(
        encoder,
        "datapath_lease_expired",
        "1 while the datapath lease has run out (or was never armed): Service connections are left \
         untouched, not steered",
        i64::from(!state.steers()),
    )?;
    // Armed: time left; expired or never armed: 0; a lease that never expires: no sample.
    let remaining = match state {
        LeaseState::Armed { remaining_ns } => Some(Duration::from_nanos(remaining_ns).as_secs_f64()),
        LeaseState::Expired { .. } | LeaseState::NeverArmed => Some(0.0),
        LeaseState::Disabled => None,
    };
    if let Some(seconds) = remaining {
        let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        g.set(seconds);
        g.encode(encoder.encode_descriptor(
            "datapath_lease_remaining_seconds",
            "Seconds before the datapath lease runs out unless an agent renews it (absent when it never expires)",
            None,
            g.metric_type(),
        )?)?;
    }
    Ok(())
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The datapath's counters and map fill, read from the pins (read-only) at each scrape. The
/// pins are opened anew each time: an upgrade or reinstall may have replaced them since.
#[derive(Debug)]
struct DatapathCollector {
    bpffs: PathBuf,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(dp) = Datapath::open_read_only(&self.bpffs) else {
            return gauge(&mut encoder, "datapath_up", "1 when the pinned maps could be read", 0);
        };
        let t = dp.tables();
        gauge(&mut encoder, "datapath_up", "1 when the pinned maps could be read", 1)?;
        if let Ok(lease) = t.lease() {
            encode_lease(&mut encoder, &lease, crate::sys::monotonic_now_ns())?;
        }
        if let Ok(counters) = t.counters() {
            let family = Family::<OutcomeLabel, Counter>::default();
            for (outcome, n) in &counters.by_outcome {
                family.get_or_create(&OutcomeLabel { outcome: outcome.name().to_owned() }).inc_by(*n);
            }
            // Shadow decisions (computed, not applied) as `shadow_<outcome>`, only once seen.
            for (outcome, n) in counters.shadow.iter().filter(|(_, n)| **n > 0) {
                family
                    .get_or_create(&OutcomeLabel { outcome: format!("shadow_{}", outcome.name()) })
                    .inc_by(*n);
            }
            family.encode(encoder.encode_descriptor(
                "datapath_decisions",
                "Hook invocations by outcome (steered, fell_back, refused_strict, no_backend, not_service, ...)",
                None,
                family.metric_type(),
            )?)?;
        }
        // Names, lanes, local pods and their inbound rows, read once for every family below.
        let pins = Pins::read(t);
        let (names, lanes) = match &pins {
            Ok(p) => (Cow::Borrowed(&p.services), Cow::Borrowed(&p.lanes)),
            Err(_) => (
                Cow::Owned(t.service_meta().unwrap_or_default()),
                Cow::Owned(t.lane_names().unwrap_or_default()),
            ),
        };
        let lane = |id: u32| crate::datapath::lane_label(&lanes, id);
        if let Ok(stats) = t.service_stats() {
            let family = Family::<ServiceLabels, Counter>::default();
            for row in stats {
                let (namespace, service, port) = names
                    .get(&row.key.svc_id)
                    .cloned()
                    .unwrap_or_else(|| (String::new(), format!("svc-{}", row.key.svc_id), String::new()));
                let shadow = row.key.outcome & STAT_F_SHADOW != 0;
                let outcome = Outcome::ALL
                    .get((row.key.outcome & !STAT_F_SHADOW) as usize)
                    .map_or("unknown", |o| o.name());
                let outcome = if shadow { format!("shadow_{outcome}") } else { outcome.to_owned() };
                family
                    .get_or_create(&ServiceLabels {
                        namespace,
                        service,
                        port,
                        caller_lane: lane(row.key.caller_lane),
                        backend_lane: lane(row.key.backend_lane),
                        outcome,
                    })
                    .inc_by(row.count);
            }
            family.encode(encoder.encode_descriptor(
                "service_decisions",
                "New connections per Service, caller lane, backend lane and outcome",
                None,
                family.metric_type(),
            )?)?;
        }
        // The sets' headers come with the pins' read; without it, they are read for this alone.
        let sets = match &pins {
            Ok(p) => Some(Cow::Borrowed(&p.sets)),
            Err(_) => t.backend_sets().ok().map(Cow::Owned),
        };
        if let Some(sets) = &sets {
            encode_steering(&mut encoder, t, &names, sets)?;
        }
        if let Ok(conns) = t.connections() {
            encode_connections(&mut encoder, &conns, &names, &lane)?;
        }
        if let Ok(pins) = &pins {
            encode_inbound(&mut encoder, pins, &lane)?;
            encode_coverage(&mut encoder, &pins.observe())?;
        }
        encode_lane_marks(&mut encoder, t)?;
        encode_fill(&mut encoder, t)
    }
}

/// Entries, capacity and fill ratio of every pinned map.
fn encode_fill(encoder: &mut DescriptorEncoder, t: &crate::datapath::Tables) -> Result<(), std::fmt::Error> {
    let entries = Family::<MapLabel, Gauge>::default();
    let capacity = Family::<MapLabel, Gauge>::default();
    let ratio = Family::<MapLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for (map, n, cap) in t.fill() {
        let l = MapLabel { map: map.to_owned() };
        entries.get_or_create(&l).set(i64::try_from(n).unwrap_or(i64::MAX));
        capacity.get_or_create(&l).set(i64::from(cap));
        #[expect(clippy::cast_precision_loss, reason = "a ratio for humans")]
        ratio.get_or_create(&l).set(n as f64 / f64::from(cap));
    }
    entries.encode(encoder.encode_descriptor(
        "map_entries",
        "Entries in each pinned map",
        None,
        entries.metric_type(),
    )?)?;
    capacity.encode(encoder.encode_descriptor(
        "map_capacity",
        "Capacity of each pinned map",
        None,
        capacity.metric_type(),
    )?)?;
    ratio.encode(encoder.encode_descriptor(
        "map_fill_ratio",
        "entries / capacity",
        None,
        ratio.metric_type(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct LeaseOnly(Lease, u64);

    impl Collector for LeaseOnly {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode_lease(&mut encoder, &self.0, self.1)
        }
    }

    fn exposition(lease: Lease, now_ns: u64) -> String {
        let mut registry = Registry::with_prefix("tagger");
        registry.register_collector(Box::new(LeaseOnly(lease, now_ns)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        out
    }

    #[test]
    fn the_lease_gauges_follow_its_state() {
        const S: u64 = 1_000_000_000;
        let armed = exposition(Lease::renewed(10 * S, 120 * S), 40 * S);
        assert!(armed.contains("tagger_datapath_lease_expired 0\n"), "{armed}");
        assert!(armed.contains("tagger_datapath_lease_remaining_seconds 90.0\n"), "{armed}");
        let expired = exposition(Lease::renewed(10 * S, 120 * S), 200 * S);
        assert!(expired.contains("tagger_datapath_lease_expired 1\n"), "{expired}");
        assert!(expired.contains("tagger_datapath_lease_remaining_seconds 0.0\n"), "{expired}");
        let fresh = exposition(Lease::default(), 5 * S);
        assert!(fresh.contains("tagger_datapath_lease_expired 1\n"), "{fresh}");
        let never = exposition(Lease::renewed(10 * S, 0), 200 * S);
        assert!(never.contains("tagger_datapath_lease_expired 0\n"), "{never}");
        assert!(!never.contains("remaining_seconds"), "{never}");
    }
}
