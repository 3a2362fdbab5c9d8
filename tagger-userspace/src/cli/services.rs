//! `tagger services`: each Service frontend with its backends grouped by lane, whether tagger
//! steers it on this node and why (or leaves it to the cluster's Service implementation), and
//! what callers of each lane get when their lane's set is empty.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use tagger_common::{
    SVC_F_ROUTED, SVC_F_SHAPED, SVC_F_STRICT, Service, SetKey, resolve::svc_is_strict, svc_is_passthrough,
};

use super::{
    args::Format,
    lanes::{PolicyView, lane_order, policy_label, policy_view},
    render::{LaneRef, Names, ServiceName, frontend_label, print_json, table},
};
use crate::{
    datapath::Tables,
    model::steering::{self, Reasons},
    net::backend_addr,
};

/// The JSON document of `tagger services`.
#[derive(Debug, Serialize)]
pub struct ServicesReport {
    /// One entry per Service id (`svc_id`), sorted by Service name then frontend.
    pub services: Vec<ServiceRow>,
    /// Lanes with a configured policy (for context: what their callers fall back to).
    pub lane_policies: Vec<LanePolicyRow>,
}

/// A Service frontend and its backend sets.
#[derive(Debug, Serialize)]
pub struct ServiceRow {
    /// The id keying its backend sets and statistics.
    pub svc_id: u32,
    /// Its frontends, `ip:port/proto` (empty: backend sets left without a frontend).
    pub frontends: Vec<String>,
    /// Names, when the agent published them.
    pub service: Option<ServiceName>,
    /// Flag names (`strict`; `shaped`: canary or warm-up in force, see `tagger explain`;
    /// `routed`: a routing rule applies to some caller lane; `client_ip_affinity`:
    /// `sessionAffinity: ClientIP`).
    pub flags: Vec<&'static str>,
    /// Whether the Service forbids fallback.
    pub strict: bool,
    /// Whether tagger steers its connections on this node; `false`: they are left to the
    /// cluster's Service implementation (kube-proxy, Cilium, ...), untouched.
    pub steered: bool,
    /// Why (`lane_backends`, `shaping`, `routing_rule`, `strict_service`, `strict_lane`), or
    /// `["base_only"]` when not steered.
    pub steering: Vec<&'static str>,
    /// Backend sets by lane: base first, then by lane name.
    pub lanes: Vec<LaneSet>,
}

/// One (Service, lane) backend set.
#[derive(Debug, Serialize)]
pub struct LaneSet {
    /// The set's lane.
    pub lane: LaneRef,
    /// Live generation.
    pub generation: u32,
    /// Ready backends (0: the set exists but is empty).
    pub count: u32,
    /// Their addresses, `ip:port`, in slot order.
    pub backends: Vec<String>,
    /// What this lane's callers get when the set is empty.
    pub if_empty: PolicyView,
}

/// A configured lane policy.
#[derive(Debug, Serialize)]
pub struct LanePolicyRow {
    /// The lane.
    pub lane: LaneRef,
    /// Its policy.
    pub policy: PolicyView,
}

fn flag_names(svc: Service) -> Vec<&'static str> {
    let mut v = Vec::new();
    let bits = [
        (SVC_F_STRICT, "strict"),
        (SVC_F_SHAPED, "shaped"),
        (SVC_F_ROUTED, "routed"),
        (tagger_common::SVC_F_AFFINITY, "client_ip_affinity"),
    ];
    for (bit, name) in bits {
        if svc.flags & bit != 0 {
            v.push(name);
        }
    }
    v
}

/// Reads the report.
pub fn collect(tables: &Tables) -> anyhow::Result<ServicesReport> {
    let names = Names::read(tables)?;
    let policies = tables.lane_policies()?;
    let strict_caller = steering::strict_caller(tables.pods()?.values(), &policies);
    let mut by_svc: BTreeMap<u32, (Vec<String>, Option<Service>)> = BTreeMap::new();
    for (key, svc) in tables.frontends()? {
        let e = by_svc.entry(svc.svc_id).or_default();
        e.0.push(frontend_label(&key));
        e.1 = Some(svc);
    }
    let sets = tables.backend_sets()?;
    let mut set_lanes: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for key in sets.keys() {
        set_lanes.entry(key.svc_id).or_default().insert(key.lane);
        by_svc.entry(key.svc_id).or_default();
    }
    let mut services = Vec::new();
    for (svc_id, (frontends, svc)) in by_svc {
        let svc = svc.unwrap_or(Service { svc_id, flags: 0 });
        let strict = svc_is_strict(&svc);
        let mut lanes = Vec::new();
        for &lane in set_lanes.get(&svc_id).into_iter().flatten() {
            let set = sets[&tagger_common::SetKey { svc_id, lane }];
            let backends =
                tables.backends(svc_id, lane)?.iter().map(|b| backend_addr(b).to_string()).collect();
            let mut if_empty = policy_view(&names, lane, policies.get(&lane));
            if strict {
                if_empty.strict = true;
                if_empty.fallback.clear();
            }
            lanes.push(LaneSet {
                lane: names.lane(lane),
                generation: set.generation,
                count: set.count,
                backends,
                if_empty,
            });
        }
        lanes.sort_by_key(|l| lane_order(&l.lane));
        let reasons = Reasons::of(
            svc.flags,
            steering::has_lane_backends(
                &lanes.iter().map(|l| SetKey { svc_id, lane: l.lane.id }).collect::<Vec<_>>(),
            ),
            strict_caller,
        );
        services.push(ServiceRow {
            svc_id,
            frontends,
            service: names.service(svc_id),
            flags: flag_names(svc),
            strict,
            steered: !svc_is_passthrough(&svc),
            steering: reasons.names(),
            lanes,
        });
    }
    services.sort_by(|a, b| {
        let key = |s: &ServiceRow| {
            (s.service.is_none(), s.service.as_ref().map(ToString::to_string), s.frontends.clone())
        };
        key(a).cmp(&key(b))
    });
    let mut lane_policies: Vec<LanePolicyRow> = policies
        .iter()
        .map(|(&lane, p)| LanePolicyRow {
            lane: names.lane(lane),
            policy: policy_view(&names, lane, Some(p)),
        })
        .collect();
    lane_policies.sort_by_key(|p| lane_order(&p.lane));
    Ok(ServicesReport { services, lane_policies })
}

/// Runs `tagger services`.
pub fn run(tables: &Tables, format: Format) -> anyhow::Result<()> {
    let report = collect(tables)?;
    if format == Format::Json {
        return print_json(&report);
    }
    let names = Names::read(tables)?;
    let mut t = table(
        &["frontend", "service", "steered", "flags", "lane", "ready", "backends", "when the lane has none"],
        &[5],
    );
    for s in &report.services {
        let frontend =
            if s.frontends.is_empty() { "(no frontend)".to_owned() } else { s.frontends.join("\n") };
        let service = s.service.as_ref().map_or_else(|| format!("svc {}", s.svc_id), ToString::to_string);
        let flags = s.flags.join(",");
        let steered = if s.steered {
            format!("yes: {}", s.steering.join(", "))
        } else {
            "no: base only, left to the cluster".to_owned()
        };
        if s.lanes.is_empty() {
            t.add_row(vec![
                frontend.clone(),
                service.clone(),
                steered.clone(),
                flags.clone(),
                "-".into(),
                "0".into(),
                "(no backend set)".into(),
                String::new(),
            ]);
        }
        for (i, l) in s.lanes.iter().enumerate() {
            let (frontend, service, steered, flags) = if i == 0 {
                (frontend.clone(), service.clone(), steered.clone(), flags.clone())
            } else {
                Default::default()
            };
            let backends = if l.backends.is_empty() { "(empty)".to_owned() } else { l.backends.join("\n") };
            let if_empty = if s.strict {
                "refuse: strict Service (EPERM)".to_owned()
            } else {
                policy_label(&names, l.lane.id, &l.if_empty)
            };
            t.add_row(vec![
                frontend,
                service,
                steered,
                flags,
                names.lane_label(l.lane.id),
                l.count.to_string(),
                backends,
                if_empty,
            ]);
        }
    }
    println!("{t}");
    if report.services.is_empty() {
        println!("no Service frontend is published");
    }
    if !report.lane_policies.is_empty() {
        println!();
        let mut t = table(&["lane policy", "when a Service has no backend in the lane"], &[]);
        for p in &report.lane_policies {
            t.add_row(vec![names.lane_label(p.lane.id), policy_label(&names, p.lane.id, &p.policy)]);
        }
        println!("{t}");
    }
    println!("callers of lanes without a set here use their fallback chain (default: base)");
    Ok(())
}
