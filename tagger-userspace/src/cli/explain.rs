//! `tagger explain`: the decision the datapath would take for a new connection from a pod to an
//! address, step by step. The decision itself is [`resolve_lane`] — the function the kernel
//! programs run — over the pinned maps; this module only lays out what it looked at.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{anyhow, bail};
use serde::Serialize;
use tagger_common::{
    AffinityEntry, AffinityKey, BASE_LANE, Backend, CANARY_FULL, FAMILY_V6, LaneTables, Lease, LeaseState,
    Outcome, Resolution, SHAPE_F_CANARY, SHAPE_F_STICKY, SHAPE_F_WARMUP, SVC_F_AFFINITY, SVC_F_ROUTED,
    Service, SvcAffinity, WEIGHT_FULL, WarmEntry, WarmKey, affinity_expired, affinity_timeout_s,
    resolve::{lane_is_strict, svc_is_strict},
    resolve_shaped, shaping_of, sticky_draw, sticky_slot, svc_is_passthrough, warm_weight,
};

use super::{
    args::{ExplainArgs, Format},
    caller::{self, Caller},
    render::{LaneRef, Names, ServiceName, destination_label, policy_chain, print_json, table},
};
use crate::{
    datapath::Tables,
    net::{Proto, backend_addr, frontend_key},
};

/// What explaining needs beyond lane resolution: the members of a set, warm-up entries, the
/// shadow flags and the clock the datapath reads.
pub trait ExplainTables: LaneTables {
    /// The backends of the live set of (Service, lane), in slot order.
    fn backends(&self, svc_id: u32, lane: u32) -> crate::Result<Vec<Backend>>;
    /// A backend's warm-up entry, if it is warming.
    fn warm(&self, _key: &WarmKey) -> Option<WarmEntry> {
        None
    }
    /// `DatapathConfig::flags`.
    fn config_flags(&self) -> u32 {
        0
    }
    /// The kernel monotonic clock (`bpf_ktime_get_ns`), nanoseconds.
    fn now_ns(&self) -> u64 {
        crate::sys::monotonic_now_ns()
    }
    /// The datapath lease (`None`: unknown, explained as steering).
    fn lease(&self) -> Option<Lease> {
        None
    }
    /// A frontend's session affinity timeout entry.
    fn affinity(&self, _svc_id: u32) -> Option<SvcAffinity> {
        None
    }
    /// A caller's remembered backend.
    fn affinity_entry(&self, _key: &AffinityKey) -> Option<AffinityEntry> {
        None
    }
}

impl ExplainTables for Tables {
    fn backends(&self, svc_id: u32, lane: u32) -> crate::Result<Vec<Backend>> {
        Tables::backends(self, svc_id, lane)
    }
    fn warm(&self, key: &WarmKey) -> Option<WarmEntry> {
        Tables::warm(self, key).ok().flatten()
    }
    fn config_flags(&self) -> u32 {
        self.config().map_or(0, |c| c.flags)
    }
    fn lease(&self) -> Option<Lease> {
        Tables::lease(self).ok()
    }
    fn affinity(&self, svc_id: u32) -> Option<SvcAffinity> {
        self.affinities().ok().and_then(|a| a.get(&svc_id).copied())
    }
    fn affinity_entry(&self, key: &AffinityKey) -> Option<AffinityEntry> {
        Tables::affinity_entry(self, key).ok().flatten()
    }
}

/// A destination: address and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    /// Address and port.
    pub addr: SocketAddr,
    /// Protocol.
    pub proto: Proto,
}

/// Reads `IP:PORT[/tcp|/udp]` (IPv6 as `[ADDR]:PORT`).
pub fn parse_destination(s: &str) -> anyhow::Result<Destination> {
    let (addr, proto) = match s.rsplit_once('/') {
        Some((a, p)) => (a, p.parse::<Proto>().map_err(|e| anyhow!("destination {s}: {e}"))?),
        None => (s, Proto::Tcp),
    };
    let addr: SocketAddr = addr.parse().map_err(|_| {
        anyhow!("destination {s}: expected IP:PORT[/tcp|/udp], e.g. 10.96.0.10:80 or [fd00::10]:53/udp")
    })?;
    if addr.port() == 0 {
        bail!("destination {s}: port 0 is not a Service port");
    }
    Ok(Destination { addr, proto })
}

/// The JSON document of `tagger explain`.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// The calling pod and its lane.
    pub caller: Caller,
    /// `ip:port/proto`.
    pub destination: String,
    /// The Service frontend at the destination (null: not a frontend, the connection is
    /// untouched).
    pub frontend: Option<FrontendView>,
    /// The caller lane's backend set (null when there is no frontend).
    pub own_set: Option<SetView>,
    /// Whether the caller's lane policy is strict.
    pub lane_strict: bool,
    /// The fallback chain steps the datapath tries, in order, up to the one chosen.
    pub fallback: Vec<ChainStep>,
    /// The outcome name (`steered`, `fell_back`, `refused_strict`, `no_backend`, `not_service`),
    /// as counted by the datapath.
    pub outcome: &'static str,
    /// The lane whose backends serve the connection (null when none does).
    pub backend_lane: Option<LaneRef>,
    /// The backend set chosen from: one member is picked at random per connection.
    pub backends: Vec<BackendView>,
    /// The Service's canary share for base callers (null: none).
    pub canary: Option<CanaryView>,
    /// Whether a routing rule for (Service, caller lane) decided.
    pub routed: bool,
    /// Whether the caller is in shadow mode: the decision is counted, not applied.
    pub shadow: bool,
    /// The Service's `sessionAffinity: ClientIP` (null: none).
    pub affinity: Option<AffinityView>,
    /// The explanation for people, in order.
    pub steps: Vec<Step>,
}

/// A Service frontend.
#[derive(Debug, Serialize)]
pub struct FrontendView {
    /// Its id.
    pub svc_id: u32,
    /// Its names, when published.
    pub service: Option<ServiceName>,
    /// Whether the Service forbids fallback.
    pub strict: bool,
}

/// A (Service, lane) set as a step saw it.
#[derive(Debug, Serialize)]
pub struct SetView {
    /// The lane.
    pub lane: LaneRef,
    /// Ready backends; null when the set does not exist (0: it exists, empty).
    pub count: Option<u32>,
}

/// One fallback step.
#[derive(Debug, Serialize)]
pub struct ChainStep {
    /// Position in the chain, 0-based.
    pub step: u32,
    /// The lane tried and its set.
    pub set: SetView,
    /// Whether this step's set serves the connection.
    pub chosen: bool,
}

/// A Service's canary share.
#[derive(Debug, Serialize)]
pub struct CanaryView {
    /// The canary lane.
    pub lane: LaneRef,
    /// Share of base callers' new connections, percent.
    pub percent: f64,
    /// Whether the choice is per caller pod.
    pub sticky: bool,
    /// Sticky: whether this pod is in the share (null: not sticky, or not a base caller).
    pub this_pod: Option<bool>,
}

/// A Service's session affinity, for this caller in the decided lane.
#[derive(Debug, Serialize)]
pub struct AffinityView {
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub timeout_seconds: u32,
    /// The backend the datapath remembers for this caller in the decided lane (null: none, or
    /// the caller's cgroup is not known).
    pub remembered: Option<String>,
    /// Seconds since the caller's last connection through that entry.
    pub idle_seconds: Option<f64>,
    /// Whether the next connection goes to the remembered backend (live and still a member);
    /// false: a fresh pick, which becomes the remembered one.
    pub held: bool,
}

/// A backend of the chosen set.
#[derive(Debug, Serialize)]
pub struct BackendView {
    /// `ip:port`.
    pub address: String,
    /// Warm-up weight, percent of a warm backend's (absent: warm, full weight).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_weight_percent: Option<f64>,
    /// Whether a socket to the destination's family can reach it (if picked while false, the
    /// connection fails open as `family_mismatch`).
    pub reachable: bool,
}

/// One line of the explanation.
#[derive(Debug, Serialize)]
pub struct Step {
    /// What was checked: `caller`, `frontend`, `service_flags`, `lease` (only when it stops
    /// steering), `own_lane`, `base_caller`,
    /// `strict`, `fallback_chain`, `fallback`, `decision`, `backends`.
    pub check: &'static str,
    /// What was found.
    pub result: String,
}

fn set_view<T: LaneTables>(t: &T, names: &Names, svc_id: u32, lane: u32) -> SetView {
    SetView { lane: names.lane(lane), count: t.backend_set(svc_id, lane).map(|s| s.count) }
}

fn set_words(names: &Names, s: &SetView) -> String {
    let lane = names.lane_label(s.lane.id);
    match s.count {
        None => format!("lane {lane}: no backend set"),
        Some(0) => format!("lane {lane}: backend set is empty"),
        Some(1) => format!("lane {lane}: 1 ready backend"),
        Some(n) => format!("lane {lane}: {n} ready backends"),
    }
}

fn caller_words(names: &Names, c: &Caller) -> String {
    let pod = match (&c.namespace, &c.name) {
        (Some(ns), Some(n)) => format!("pod {ns}/{n}"),
        _ => "an unnamed pod".to_owned(),
    };
    let lane = format!("lane {}", names.lane_label(c.lane.id));
    let inside = match (&c.cgroup_path, c.cgroup_level, c.pod_level) {
        (Some(path), Some(level), Some(pod_level)) if c.registered && level > pod_level => {
            format!("cgroup {path} (level {level}) is inside ")
        }
        (Some(path), Some(level), _) if !c.registered => format!("cgroup {path} (level {level}): "),
        _ => String::new(),
    };
    if c.registered {
        let id = c.pod_cgroup_id.unwrap_or_default();
        let level = c.pod_level.unwrap_or_default();
        format!("{inside}{pod}, pod cgroup {id} (level {level}): {lane}")
    } else {
        let why = c.note.clone().unwrap_or_else(|| "no registered pod cgroup among its ancestors".to_owned());
        format!("{inside}{why}: base lane (the datapath counts unknown_pod)")
    }
}

/// Explains the decision for `caller` connecting to `dest`, whose frontend lookup gave
/// `frontend`. The outcome is [`resolve_lane`]'s.
pub fn explain<T: ExplainTables>(
    t: &T,
    names: &Names,
    caller: Caller,
    dest: Destination,
    frontend: Option<Service>,
) -> crate::Result<Explanation> {
    let destination = destination_label(dest.addr, dest.proto);
    let mut steps = vec![Step { check: "caller", result: caller_words(names, &caller) }];
    let mut ex = Explanation {
        caller,
        destination: destination.clone(),
        frontend: None,
        own_set: None,
        lane_strict: false,
        fallback: Vec::new(),
        outcome: Outcome::NotService.name(),
        backend_lane: None,
        backends: Vec::new(),
        canary: None,
        routed: false,
        shadow: false,
        affinity: None,
        steps: Vec::new(),
    };
    let Some(svc) = frontend else {
        let why = Step { check: "frontend", result: format!("{destination} is not a Service frontend") };
        return Ok(untouched(
            ex,
            steps,
            why,
            Outcome::NotService,
            "the connection goes where it was addressed",
        ));
    };
    let lane = ex.caller.lane.id;
    let strict_svc = svc_is_strict(&svc);
    let policy = t.lane_policy(lane);
    ex.lane_strict = lane != BASE_LANE && lane_is_strict(policy.as_ref());
    ex.frontend =
        Some(FrontendView { svc_id: svc.svc_id, service: names.service(svc.svc_id), strict: strict_svc });
    steps.push(Step {
        check: "frontend",
        result: format!(
            "{destination} is the frontend of {} (svc_id {})",
            names.service_label(svc.svc_id),
            svc.svc_id
        ),
    });
    steps.push(Step {
        check: "service_flags",
        result: if strict_svc { "strict: no fallback for this Service".into() } else { "none".into() },
    });
    if svc_is_passthrough(&svc) {
        return Ok(passthrough(ex, steps));
    }
    // Then the lease, as the programs check it: before anything that steers.
    if let Some(why) = t.lease().and_then(|l| lease_stops_steering(l.state(t.now_ns()))) {
        return Ok(untouched(ex, steps, why, Outcome::LeaseExpired, LEASE_EXPIRED_THEN));
    }

    // The decision: the same function the programs run. A non-sticky canary draw is random
    // per connection: the default way is explained and the share shown beside it.
    let shaping = shaping_of(t, &svc);
    let pod = ex.caller.pod_cgroup_id.unwrap_or(0);
    let resolution = resolve_shaped(t, &svc, lane, shaping.as_ref(), |s| {
        if s.flags & SHAPE_F_STICKY != 0 { sticky_draw(pod, svc.svc_id) } else { CANARY_FULL }
    });
    steps.extend(shaping_steps(t, names, svc, lane, pod, shaping.as_ref(), &mut ex));

    let own = set_view(t, names, svc.svc_id, lane);
    steps.push(Step { check: "own_lane", result: set_words(names, &own) });
    ex.own_set = Some(own);
    if !matches!(resolution, Resolution::Own { .. } | Resolution::Routed { .. } | Resolution::Canary { .. })
        && !ex.routed
    {
        steps.extend(not_own_lane_steps(t, names, svc, lane, policy.as_ref(), resolution, &mut ex));
    }

    let (outcome, chosen, sentence) = decision(names, lane, resolution);
    ex.outcome = outcome.name();
    steps.push(Step { check: "decision", result: sentence });
    if let Some(to) = chosen {
        ex.backend_lane = Some(names.lane(to));
        let warmup = shaping.is_some_and(|s| s.flags & SHAPE_F_WARMUP != 0);
        let (backends, words) = chosen_backends(t, svc.svc_id, to, dest, warmup)?;
        ex.backends = backends;
        steps.push(Step { check: "backends", result: words });
        if svc.flags & SVC_F_AFFINITY != 0 && !ex.shadow {
            let id = caller_identity(&ex.caller);
            let (view, words) = affinity_step(t, svc.svc_id, to, id);
            ex.affinity = Some(view);
            steps.push(Step { check: "affinity", result: words });
        }
    }
    ex.steps = steps;
    Ok(ex)
}

/// Why the caller's own lane does not serve it, and what its fallback chain gives.
fn not_own_lane_steps<T: ExplainTables>(
    t: &T,
    names: &Names,
    svc: Service,
    lane: u32,
    policy: Option<&tagger_common::LanePolicy>,
    resolution: Resolution,
    ex: &mut Explanation,
) -> Vec<Step> {
    let strict_svc = svc_is_strict(&svc);
    let mut steps = Vec::new();
    if lane == BASE_LANE {
        steps.push(Step {
            check: "base_caller",
            result: "base callers never reach another lane's backends".into(),
        });
        if strict_svc {
            steps.push(Step { check: "strict", result: "the Service is strict: refuse".into() });
        }
    } else if strict_svc || ex.lane_strict {
        let who = if strict_svc { "the Service is strict" } else { "the caller's lane is strict" };
        steps.push(Step { check: "strict", result: format!("{who}: no fallback") });
    } else {
        let chain: Vec<u32> = policy.map_or_else(|| vec![BASE_LANE], |p| policy_chain(p).to_vec());
        let origin = if policy.is_some() { "lane policy" } else { "default: no policy for the lane" };
        steps.push(Step {
            check: "fallback_chain",
            result: format!("{} ({origin})", names.chain_label(&chain)),
        });
        let (chain_steps, chain_words) = walk_chain(t, names, svc.svc_id, &chain, resolution);
        steps.extend(chain_words);
        ex.fallback = chain_steps;
    }
    steps
}

/// A frontend tagger leaves to the cluster: the explanation ends there.
fn passthrough(ex: Explanation, steps: Vec<Step>) -> Explanation {
    let why = Step {
        check: "steering",
        result: "not steered on this node: its backends are all base and nothing shapes it or could refuse \
                 a local caller"
            .into(),
    };
    untouched(
        ex,
        steps,
        why,
        Outcome::Passthrough,
        "the cluster's Service implementation (kube-proxy, Cilium, ...) balances it",
    )
}

/// Ends an explanation where the programs leave the connection untouched: `why`, then the
/// decision (`<outcome>: untouched, <then>`).
fn untouched(
    mut ex: Explanation,
    mut steps: Vec<Step>,
    why: Step,
    outcome: Outcome,
    then: &str,
) -> Explanation {
    steps.push(why);
    steps.push(Step { check: "decision", result: format!("{}: untouched, {then}", outcome.name()) });
    ex.outcome = outcome.name();
    ex.steps = steps;
    ex
}

/// Where a connection goes while the lease stops steering.
const LEASE_EXPIRED_THEN: &str =
    "the connection goes where it was addressed (the cluster's own Service implementation)";

/// The `lease` step when the lease stops steering, if it does.
fn lease_stops_steering(state: LeaseState) -> Option<Step> {
    let result = match state {
        LeaseState::Expired { since_ns } => format!(
            "the datapath lease expired {} ago (no agent renewed it): nothing is steered",
            super::render::ago(std::time::Duration::from_nanos(since_ns))
        ),
        LeaseState::NeverArmed => {
            "the datapath lease was never armed (no agent completed a pass): nothing is steered".into()
        }
        LeaseState::Armed { .. } | LeaseState::Disabled => return None,
    };
    Some(Step { check: "lease", result })
}

/// The caller as the datapath keys its affinity: the registered pod cgroup, or an unregistered
/// caller's own cgroup (known when it was given by id).
fn caller_identity(c: &Caller) -> Option<u64> {
    if c.registered {
        return c.pod_cgroup_id;
    }
    (c.found_by == "cgroup_id").then(|| c.query.parse().ok()).flatten()
}

/// The affinity of `caller` for (svc_id, lane), checked with the datapath's own test
/// (`sticky_slot`: within the timeout, and the backend still in the live set).
fn affinity_step<T: ExplainTables>(
    t: &T,
    svc_id: u32,
    lane: u32,
    caller: Option<u64>,
) -> (AffinityView, String) {
    let timeout_s = affinity_timeout_s(t.affinity(svc_id).as_ref());
    let head = format!("sessionAffinity ClientIP, timeout {timeout_s} s, per caller pod");
    let mut view =
        AffinityView { timeout_seconds: timeout_s, remembered: None, idle_seconds: None, held: false };
    let Some(caller) = caller else {
        return (view, format!("{head} (this caller's cgroup id is not known: its entry is not shown)"));
    };
    let key = AffinityKey { svc_id, lane, caller };
    let Some(entry) = t.affinity_entry(&key) else {
        return (view, format!("{head}: nothing remembered yet, the next connection's pick is kept"));
    };
    let now = t.now_ns();
    let address = backend_addr(&entry.backend).to_string();
    #[expect(clippy::cast_precision_loss, reason = "seconds for people")]
    let idle = now.saturating_sub(entry.last_ns) as f64 / 1e9;
    view.remembered = Some(address.clone());
    view.idle_seconds = Some(idle);
    let slot = t.backend_set(svc_id, lane).and_then(|set| sticky_slot(t, &key, &set, &entry, timeout_s, now));
    view.held = slot.is_some();
    let words = if view.held {
        format!("{head}: held to {address} (last connection {idle:.0} s ago), not a random pick")
    } else if affinity_expired(entry.last_ns, timeout_s, now) {
        format!("{head}: {address} expired ({idle:.0} s idle): the next connection is a fresh pick")
    } else {
        format!("{head}: {address} left the set: the next connection is a fresh pick")
    };
    (view, words)
}

/// The fallback steps the datapath tries for `resolution` (up to the chosen one, or all).
fn walk_chain<T: LaneTables>(
    t: &T,
    names: &Names,
    svc_id: u32,
    chain: &[u32],
    resolution: Resolution,
) -> (Vec<ChainStep>, Vec<Step>) {
    let tried = match resolution {
        Resolution::FellBack { chain_step, .. } => chain_step as usize + 1,
        _ => chain.len(),
    };
    let mut out = (Vec::new(), Vec::new());
    for (i, &l) in chain.iter().enumerate().take(tried) {
        let step = u32::try_from(i).unwrap_or(u32::MAX);
        let chosen = matches!(resolution, Resolution::FellBack { chain_step, .. } if chain_step == step);
        let set = set_view(t, names, svc_id, l);
        let then = if chosen { " → chosen" } else { " → next" };
        out.1.push(Step {
            check: "fallback",
            result: format!("step {}/{}: {}{then}", i + 1, chain.len(), set_words(names, &set)),
        });
        out.0.push(ChainStep { step, set, chosen });
    }
    out
}

/// The outcome of a resolution, the lane serving it (if any) and the sentence for people.
fn decision(names: &Names, caller_lane: u32, resolution: Resolution) -> (Outcome, Option<u32>, String) {
    let pick = |to: u32, count: u32| match count {
        1 => format!("to lane {}'s only backend", names.lane_label(to)),
        n => {
            format!("to one of lane {}'s {n} backends, picked at random per connection", names.lane_label(to))
        }
    };
    match resolution {
        Resolution::Own { set } => {
            (Outcome::Steered, Some(caller_lane), format!("steered: {}", pick(caller_lane, set.count)))
        }
        Resolution::FellBack { lane, set, .. } => {
            (Outcome::FellBack, Some(lane), format!("fell_back: {}", pick(lane, set.count)))
        }
        Resolution::Routed { lane, set, chain_step } => (
            Outcome::Routed,
            Some(lane),
            format!("routed: rule step {}: {}", chain_step + 1, pick(lane, set.count)),
        ),
        Resolution::Canary { lane, set } => {
            (Outcome::Canary, Some(lane), format!("canary: {}", pick(lane, set.count)))
        }
        Resolution::RefusedStrict => (
            Outcome::RefusedStrict,
            None,
            "refused_strict: connect() (or sendmsg()) fails with EPERM".to_owned(),
        ),
        Resolution::NoBackend => (
            Outcome::NoBackend,
            None,
            "no_backend: fails open, the connection goes to the Service address unchanged".to_owned(),
        ),
    }
}

/// The members of the chosen set, and their listing for people (flagging the ones a socket to
/// `dest` cannot reach).
fn chosen_backends<T: ExplainTables>(
    t: &T,
    svc_id: u32,
    lane: u32,
    dest: Destination,
    warmup: bool,
) -> crate::Result<(Vec<BackendView>, String)> {
    let now = t.now_ns();
    let dest_v6 = match dest.addr.ip() {
        IpAddr::V4(_) => false,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_none(),
    };
    let backends: Vec<BackendView> = t
        .backends(svc_id, lane)?
        .iter()
        .map(|b| BackendView {
            address: backend_addr(b).to_string(),
            warmup_weight_percent: warmup
                .then(|| t.warm(&WarmKey { svc_id, port: b.port, _pad: 0, addr: b.addr }))
                .flatten()
                .map(|e| f64::from(warm_weight(&e, now)) * 100.0 / f64::from(WEIGHT_FULL))
                .filter(|w| *w < 100.0),
            reachable: (b.family == FAMILY_V6) == dest_v6,
        })
        .collect();
    let mut words: Vec<String> = backends
        .iter()
        .map(|b| match b.warmup_weight_percent {
            Some(w) => format!("{} (warming up: weight {w:.0}%)", b.address),
            None => b.address.clone(),
        })
        .collect();
    let unreachable = backends.iter().filter(|b| !b.reachable).count();
    if unreachable > 0 {
        words.push(format!(
            "({unreachable} of {} cannot be reached from an {} destination: if picked, the connection \
             fails open as family_mismatch)",
            backends.len(),
            if dest_v6 { "IPv6" } else { "IPv4" }
        ));
    }
    Ok((backends, words.join("\n")))
}

/// The canary, routing rule and shadow mode steps, filling their fields of `ex`.
fn shaping_steps<T: ExplainTables>(
    t: &T,
    names: &Names,
    svc: Service,
    lane: u32,
    pod: u64,
    shaping: Option<&tagger_common::SvcShaping>,
    ex: &mut Explanation,
) -> Vec<Step> {
    let mut steps = Vec::new();
    if let Some(s) = shaping.filter(|s| s.flags & SHAPE_F_CANARY != 0) {
        let sticky = s.flags & SHAPE_F_STICKY != 0;
        let this_pod = (sticky && lane == BASE_LANE).then(|| sticky_draw(pod, svc.svc_id) < s.canary_bp);
        let percent = f64::from(s.canary_bp) / 100.0;
        let canary_lane = names.lane_label(s.canary_lane);
        let who = match this_pod {
            Some(true) => "sticky per pod: this pod is in the share",
            Some(false) => "sticky per pod: this pod is not in the share",
            None if sticky => "sticky per pod",
            None => "drawn per connection",
        };
        let applies = if lane == BASE_LANE { "" } else { " (applies to base callers only)" };
        steps.push(Step {
            check: "canary",
            result: format!(
                "{percent}% of base callers' new connections go to lane {canary_lane}, {who}{applies}"
            ),
        });
        ex.canary = Some(CanaryView { lane: names.lane(s.canary_lane), percent, sticky, this_pod });
    }
    if svc.flags & SVC_F_ROUTED != 0
        && let Some(route) = t.route(svc.svc_id, lane)
    {
        ex.routed = true;
        let strict = if lane_is_strict(Some(&route)) { ", strict" } else { "" };
        steps.push(Step {
            check: "routing_rule",
            result: format!(
                "a routing rule sends this lane's callers along {}{strict}",
                names.chain_label(policy_chain(&route))
            ),
        });
    }
    ex.shadow = tagger_common::is_shadow(ex_flags(t), || t.lane_policy(lane));
    if ex.shadow {
        steps.push(Step {
            check: "shadow",
            result: "shadow mode: the decision below is counted as shadow and not applied; the connection goes to the Service address".into(),
        });
    }

    steps
}

fn ex_flags<T: ExplainTables>(t: &T) -> u32 {
    t.config_flags()
}

/// The explanation as a table.
#[must_use]
pub fn render_table(ex: &Explanation) -> String {
    let mut t = table(&["#", "check", "result"], &[0]);
    for (i, s) in ex.steps.iter().enumerate() {
        t.add_row(vec![(i + 1).to_string(), s.check.replace('_', " "), s.result.clone()]);
    }
    format!("{t}\noutcome: {}\n", ex.outcome)
}

/// Runs `tagger explain`.
pub fn run(
    tables: &Tables,
    format: Format,
    args: &ExplainArgs,
    cgroup_root: Option<&Path>,
) -> anyhow::Result<()> {
    let dest = parse_destination(&args.destination)?;
    let names = Names::read(tables)?;
    let caller = caller::find(tables, &names, &args.pod, cgroup_root)?;
    let frontend = tables.frontend(&frontend_key(dest.addr, dest.proto))?;
    let ex = explain(tables, &names, caller, dest, frontend)?;
    match format {
        Format::Json => print_json(&ex)?,
        Format::Table => print!("{}", render_table(&ex)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tagger_common::{BackendSet, LANE_F_STRICT, LanePolicy, SVC_F_STRICT, lane_id};

    use super::*;
    use crate::net::backend;

    /// A datapath in memory: backend sets and lane policies.
    #[derive(Default)]
    struct Fake {
        sets: BTreeMap<(u32, u32), Vec<Backend>>,
        lanes: BTreeMap<u32, LanePolicy>,
        routes: BTreeMap<(u32, u32), LanePolicy>,
        shaping: Option<tagger_common::SvcShaping>,
        warm: BTreeMap<WarmKey, WarmEntry>,
        flags: u32,
        lease: Option<Lease>,
        affinity: BTreeMap<AffinityKey, AffinityEntry>,
    }

    impl Fake {
        fn set(mut self, lane: &str, addrs: &[&str]) -> Self {
            let mut b: Vec<Backend> = addrs.iter().map(|a| backend(a.parse().unwrap())).collect();
            b.sort_unstable();
            self.sets.insert((1, lane_id(lane)), b);
            self
        }
        fn chain(mut self, lane: &str, chain: &[&str], flags: u32) -> Self {
            let ids: Vec<u32> = chain.iter().map(|l| lane_id(l)).collect();
            self.lanes.insert(lane_id(lane), LanePolicy::new(&ids, flags));
            self
        }
    }

    impl LaneTables for Fake {
        fn backend_set(&self, svc_id: u32, lane: u32) -> Option<BackendSet> {
            self.sets
                .get(&(svc_id, lane))
                .map(|b| BackendSet { count: u32::try_from(b.len()).unwrap(), generation: 1 })
        }
        fn lane_policy(&self, lane: u32) -> Option<LanePolicy> {
            self.lanes.get(&lane).copied()
        }
        fn route(&self, svc_id: u32, caller_lane: u32) -> Option<LanePolicy> {
            self.routes.get(&(svc_id, caller_lane)).copied()
        }
        fn shaping(&self, _svc_id: u32) -> Option<tagger_common::SvcShaping> {
            self.shaping
        }
        fn slot(&self, svc_id: u32, lane: u32, _generation: u32, slot: u32) -> Option<Backend> {
            self.sets.get(&(svc_id, lane))?.get(usize::try_from(slot).ok()?).copied()
        }
    }

    impl ExplainTables for Fake {
        fn backends(&self, svc_id: u32, lane: u32) -> crate::Result<Vec<Backend>> {
            Ok(self.sets.get(&(svc_id, lane)).cloned().unwrap_or_default())
        }
        fn warm(&self, key: &WarmKey) -> Option<WarmEntry> {
            self.warm.get(key).copied()
        }
        fn config_flags(&self) -> u32 {
            self.flags
        }
        fn now_ns(&self) -> u64 {
            5_000_000_000
        }
        fn lease(&self) -> Option<Lease> {
            self.lease
        }
        fn affinity(&self, _svc_id: u32) -> Option<SvcAffinity> {
            Some(SvcAffinity { timeout_s: 2, _pad: 0 })
        }
        fn affinity_entry(&self, key: &AffinityKey) -> Option<AffinityEntry> {
            self.affinity.get(key).copied()
        }
    }

    fn canary(flags: u32) -> tagger_common::SvcShaping {
        tagger_common::SvcShaping { flags, canary_lane: lane_id("gray"), canary_bp: 1000, _pad: 0 }
    }

    #[test]
    fn a_sticky_canary_says_whether_this_pod_is_in() {
        use tagger_common::SVC_F_SHAPED;
        let mut t = Fake::default().set("gray", &["10.244.0.3:8080"]).set("base", &["10.244.0.2:8080"]);
        t.shaping = Some(canary(SHAPE_F_CANARY | SHAPE_F_STICKY));
        let shaped = Some(Service { svc_id: 1, flags: SVC_F_SHAPED });
        // Find one pod in and one out of the 10% share.
        let inside = (1..10_000).find(|id| sticky_draw(*id, 1) < 1000).unwrap();
        let outside = (1..10_000).find(|id| sticky_draw(*id, 1) >= 1000).unwrap();
        let mut c = caller("base");
        c.pod_cgroup_id = Some(inside);
        let ex = explain(&t, &names(), c, dest(), shaped).unwrap();
        assert_eq!(ex.outcome, "canary");
        assert_eq!(ex.canary.as_ref().unwrap().this_pod, Some(true));
        assert_eq!(ex.backends[0].address, "10.244.0.3:8080");
        assert!(render_table(&ex).contains("10% of base callers' new connections go to lane gray"));
        let mut c = caller("base");
        c.pod_cgroup_id = Some(outside);
        let ex = explain(&t, &names(), c, dest(), shaped).unwrap();
        assert_eq!((ex.outcome, ex.canary.unwrap().this_pod), ("steered", Some(false)));
        // Not sticky: the default way is explained, the share shown beside it.
        t.shaping = Some(canary(SHAPE_F_CANARY));
        let ex = explain(&t, &names(), caller("base"), dest(), shaped).unwrap();
        assert_eq!(ex.outcome, "steered");
        assert!(render_table(&ex).contains("drawn per connection"));
    }

    #[test]
    fn routing_rules_shadow_mode_and_warmup_weights_are_shown() {
        use tagger_common::{CFG_F_SHADOW, SVC_F_ROUTED, SVC_F_SHAPED};
        let mut t = Fake::default()
            .set("gray", &["10.244.0.3:8080"])
            .set("blue", &["10.244.0.5:8080", "10.244.0.6:8080"]);
        let mut rule = LanePolicy { chain_len: 1, ..LanePolicy::default() };
        rule.chain[0] = lane_id("blue");
        t.routes.insert((1, lane_id("gray")), rule);
        let warming = backend("10.244.0.6:8080".parse().unwrap());
        let w = crate::config::values::Warmup::new(std::time::Duration::from_secs(10), 1.0, 10.0);
        t.warm.insert(WarmKey { svc_id: 1, port: warming.port, _pad: 0, addr: warming.addr }, w.entry(0));
        t.shaping = Some(tagger_common::SvcShaping { flags: SHAPE_F_WARMUP, ..Default::default() });
        t.flags = CFG_F_SHADOW;
        let svc = Some(Service { svc_id: 1, flags: SVC_F_ROUTED | SVC_F_SHAPED });
        let ex = explain(&t, &names(), caller("gray"), dest(), svc).unwrap();
        assert_eq!(ex.outcome, "routed");
        assert!(ex.routed && ex.shadow);
        assert_eq!(ex.backends[0].warmup_weight_percent, None);
        // 5 s into a 10 s linear warm-up from 10%: 55%.
        let weight = ex.backends[1].warmup_weight_percent.unwrap();
        assert!((weight - 55.0).abs() < 0.5, "{weight}");
        let text = render_table(&ex);
        assert!(text.contains("routing rule") && text.contains("shadow mode"), "{text}");
        assert!(text.contains("warming up: weight 55%"), "{text}");
    }

    #[test]
    fn session_affinity_shows_the_timeout_and_the_backend_this_pod_is_held_to() {
        let mut t = Fake::default().set("gray", &["10.244.0.3:8080", "10.244.0.4:8080"]);
        let svc = Some(Service { svc_id: 1, flags: SVC_F_AFFINITY });
        let key = AffinityKey { svc_id: 1, lane: lane_id("gray"), caller: 100 };
        // Nothing remembered yet.
        let ex = explain(&t, &names(), caller("gray"), dest(), svc).unwrap();
        let a = ex.affinity.as_ref().unwrap();
        assert_eq!((a.timeout_seconds, a.remembered.as_deref(), a.held), (2, None, false));
        assert!(render_table(&ex).contains("nothing remembered yet"), "{}", render_table(&ex));
        // Held: used 1 s ago (timeout 2 s), still in the set.
        let held = backend("10.244.0.4:8080".parse().unwrap());
        t.affinity.insert(key, AffinityEntry { backend: held, slot: 1, last_ns: 4_000_000_000 });
        let ex = explain(&t, &names(), caller("gray"), dest(), svc).unwrap();
        let a = ex.affinity.as_ref().unwrap();
        assert_eq!((a.remembered.as_deref(), a.held), (Some("10.244.0.4:8080"), true));
        assert!(render_table(&ex).contains("held to 10.244.0.4:8080"), "{}", render_table(&ex));
        // Expired, and gone from the set: a fresh pick either way, and the table says why.
        t.affinity.insert(key, AffinityEntry { backend: held, slot: 1, last_ns: 1_000_000_000 });
        let ex = explain(&t, &names(), caller("gray"), dest(), svc).unwrap();
        assert!(!ex.affinity.as_ref().unwrap().held);
        assert!(render_table(&ex).contains("expired"), "{}", render_table(&ex));
        let gone = backend("10.244.0.9:8080".parse().unwrap());
        t.affinity.insert(key, AffinityEntry { backend: gone, slot: 1, last_ns: 4_500_000_000 });
        let ex = explain(&t, &names(), caller("gray"), dest(), svc).unwrap();
        assert!(render_table(&ex).contains("left the set"), "{}", render_table(&ex));
        // Without the flag nothing is shown.
        assert!(explain(&t, &names(), caller("gray"), dest(), SVC).unwrap().affinity.is_none());
    }

    fn names() -> Names {
        let mut n = Names::default();
        for l in ["gray", "feature-x"] {
            n.lanes.insert(lane_id(l), l.to_owned());
        }
        n.services.insert(1, ("demo".into(), "a".into(), "http".into()));
        n
    }

    fn caller(lane: &str) -> Caller {
        Caller {
            query: "demo/gw".into(),
            found_by: "pod_name",
            cgroup_path: None,
            cgroup_level: None,
            registered: true,
            pod_cgroup_id: Some(100),
            pod_level: Some(4),
            namespace: Some("demo".into()),
            name: Some("gw".into()),
            lane: names().lane(lane_id(lane)),
            note: None,
        }
    }

    fn dest() -> Destination {
        parse_destination("10.96.0.10:80").unwrap()
    }

    const SVC: Option<Service> = Some(Service { svc_id: 1, flags: 0 });

    fn checks(ex: &Explanation) -> Vec<&str> {
        ex.steps.iter().map(|s| s.check).collect()
    }

    #[test]
    fn destinations_parse_with_tcp_by_default() {
        assert_eq!(parse_destination("10.96.0.10:80").unwrap().proto, Proto::Tcp);
        let d = parse_destination("[fd00::10]:53/UDP").unwrap();
        assert_eq!((d.addr, d.proto), ("[fd00::10]:53".parse().unwrap(), Proto::Udp));
        assert!(parse_destination("10.96.0.10").unwrap_err().to_string().contains("IP:PORT"));
        assert!(parse_destination("10.96.0.10:80/sctp").unwrap_err().to_string().contains("sctp"));
    }

    #[test]
    fn own_lane_first() {
        let t = Fake::default().set("gray", &["10.244.0.3:8080"]).set("base", &["10.244.0.2:8080"]);
        let ex = explain(&t, &names(), caller("gray"), dest(), SVC).unwrap();
        assert_eq!(ex.outcome, "steered");
        assert_eq!(ex.backend_lane.as_ref().unwrap().name.as_deref(), Some("gray"));
        assert_eq!(ex.backends.len(), 1);
        assert_eq!(ex.backends[0].address, "10.244.0.3:8080");
        assert!(ex.fallback.is_empty());
        assert_eq!(checks(&ex), ["caller", "frontend", "service_flags", "own_lane", "decision", "backends"]);
    }

    #[test]
    fn an_expired_or_unarmed_lease_leaves_the_connection_untouched() {
        let mut t = Fake::default().set("gray", &["10.244.0.3:8080"]);
        // Renewed at 1 s for 2 s: expired at 3 s, explained at 5 s.
        t.lease = Some(Lease::renewed(1_000_000_000, 2_000_000_000));
        let ex = explain(&t, &names(), caller("gray"), dest(), SVC).unwrap();
        assert_eq!(ex.outcome, "lease_expired");
        assert!(ex.backends.is_empty() && ex.backend_lane.is_none());
        assert_eq!(checks(&ex), ["caller", "frontend", "service_flags", "lease", "decision"]);
        assert!(render_table(&ex).contains("the datapath lease expired 2s ago"), "{}", render_table(&ex));
        t.lease = Some(Lease::default());
        assert_eq!(explain(&t, &names(), caller("gray"), dest(), SVC).unwrap().outcome, "lease_expired");
        // Armed, or never expiring: explained as before.
        for lease in [Lease::renewed(4_000_000_000, 2_000_000_000), Lease::renewed(1, 0)] {
            t.lease = Some(lease);
            assert_eq!(explain(&t, &names(), caller("gray"), dest(), SVC).unwrap().outcome, "steered");
        }
    }

    #[test]
    fn gray_caller_without_gray_backends_falls_back_to_base() {
        let t = Fake::default().set("gray", &[]).set("base", &["10.244.0.2:8080", "10.244.0.4:8080"]);
        let ex = explain(&t, &names(), caller("gray"), dest(), SVC).unwrap();
        assert_eq!(ex.outcome, "fell_back");
        assert_eq!(ex.own_set.as_ref().unwrap().count, Some(0));
        assert_eq!(ex.backend_lane.as_ref().unwrap().id, BASE_LANE);
        assert_eq!(ex.fallback.len(), 1);
        assert!(ex.fallback[0].chosen && ex.fallback[0].set.count == Some(2));
        let text = render_table(&ex);
        assert!(text.contains("lane gray: backend set is empty"), "{text}");
        assert!(text.contains("base (default: no policy for the lane)"), "{text}");
        assert!(text.contains("step 1/1: lane base: 2 ready backends → chosen"), "{text}");
        assert!(text.contains("10.244.0.4:8080") && text.contains("outcome: fell_back"), "{text}");
        assert!(text.contains("demo/a:http"), "{text}");
    }

    #[test]
    fn a_chain_is_walked_until_a_lane_has_backends() {
        let t = Fake::default().chain("feature-x", &["gray", "base"], 0).set("base", &["10.244.0.2:8080"]);
        let ex = explain(&t, &names(), caller("feature-x"), dest(), SVC).unwrap();
        assert_eq!(ex.outcome, "fell_back");
        let steps: Vec<(u32, Option<u32>, bool)> =
            ex.fallback.iter().map(|s| (s.step, s.set.count, s.chosen)).collect();
        assert_eq!(steps, [(0, None, false), (1, Some(1), true)]);
        let text = render_table(&ex);
        assert!(text.contains("gray → base (lane policy)"), "{text}");
        assert!(text.contains("step 1/2: lane gray: no backend set → next"), "{text}");
    }

    #[test]
    fn strict_lanes_and_services_refuse() {
        let t = Fake::default().chain("gray", &["base"], LANE_F_STRICT).set("base", &["10.244.0.2:8080"]);
        let ex = explain(&t, &names(), caller("gray"), dest(), SVC).unwrap();
        assert_eq!(ex.outcome, "refused_strict");
        assert!(ex.lane_strict && ex.backends.is_empty() && ex.backend_lane.is_none());
        assert!(render_table(&ex).contains("EPERM"));
        let t = Fake::default().set("base", &["10.244.0.2:8080"]);
        let strict = Some(Service { svc_id: 1, flags: SVC_F_STRICT });
        let ex = explain(&t, &names(), caller("feature-x"), dest(), strict).unwrap();
        assert_eq!(ex.outcome, "refused_strict");
        assert!(ex.frontend.unwrap().strict);
    }

    #[test]
    fn base_callers_stay_in_base_and_fail_open() {
        let t = Fake::default().set("gray", &["10.244.0.3:8080"]);
        let ex = explain(&t, &names(), caller("base"), dest(), SVC).unwrap();
        assert_eq!(ex.outcome, "no_backend");
        assert!(checks(&ex).contains(&"base_caller"));
    }

    #[test]
    fn an_empty_chain_fails_open_after_trying_everything() {
        let t = Fake::default().chain("feature-x", &["gray", "base"], 0);
        let ex = explain(&t, &names(), caller("feature-x"), dest(), SVC).unwrap();
        assert_eq!(ex.outcome, "no_backend");
        assert_eq!(ex.fallback.len(), 2);
        assert!(ex.fallback.iter().all(|s| !s.chosen));
    }

    #[test]
    fn a_destination_that_is_no_frontend_is_untouched() {
        let ex = explain(&Fake::default(), &names(), caller("gray"), dest(), None).unwrap();
        assert_eq!(ex.outcome, "not_service");
        assert!(ex.frontend.is_none() && ex.own_set.is_none());
        assert!(render_table(&ex).contains("is not a Service frontend"));
    }

    #[test]
    fn backends_of_the_other_family_are_flagged() {
        let t = Fake::default().set("base", &["10.244.0.2:8080", "[fd00:244::2]:8080"]);
        let ex = explain(&t, &names(), caller("base"), dest(), SVC).unwrap();
        let reach: Vec<bool> = ex.backends.iter().map(|b| b.reachable).collect();
        assert_eq!(reach, [true, false]);
        assert!(render_table(&ex).contains("family_mismatch"));
    }

    #[test]
    fn an_unregistered_caller_is_explained_as_base() {
        let mut c = caller("base");
        c.registered = false;
        c.cgroup_path = Some("/sys/fs/cgroup/x".into());
        c.cgroup_level = Some(1);
        let t = Fake::default().set("base", &["10.244.0.2:8080"]);
        let ex = explain(&t, &names(), c, dest(), SVC).unwrap();
        assert_eq!(ex.outcome, "steered");
        assert!(ex.steps[0].result.contains("unknown_pod"), "{}", ex.steps[0].result);
    }

    #[test]
    fn the_json_schema_has_its_documented_fields() {
        let t = Fake::default().set("base", &["10.244.0.2:8080"]);
        let ex = explain(&t, &names(), caller("gray"), dest(), SVC).unwrap();
        let v = serde_json::to_value(&ex).unwrap();
        for field in [
            "caller",
            "destination",
            "frontend",
            "own_set",
            "lane_strict",
            "fallback",
            "outcome",
            "backend_lane",
            "backends",
            "steps",
        ] {
            assert!(v.get(field).is_some(), "missing {field}: {v}");
        }
        assert_eq!(v["caller"]["lane"]["name"], "gray");
        assert_eq!(v["destination"], "10.96.0.10:80/tcp");
        assert_eq!(v["backends"][0]["address"], "10.244.0.2:8080");
    }
}
