//! The lanes config as desired state, computed once per config change ([`LaneSettings::of`])
//! and read by everything downstream (the incremental model, shaping, the agent's pod
//! addresses and names): lane policies, global flags, each lane's DSCP and backend warm-up,
//! the routing rules with their Service selectors, and the names of every lane mentioned.
//! Nothing below reads the config itself.

use std::collections::BTreeMap;

use tagger_common::{LanePolicy, lane_id};

use super::FrontendOrigin;
use crate::config::{lanes::LanesConfig, values::Warmup};

/// What the lanes config asks of the datapath.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LaneSettings {
    /// Lane id → policy (fallback chain, strict, rehome, shadow).
    pub policies: BTreeMap<u32, LanePolicy>,
    /// The datapath's global flags (`CFG_F_*`: shadow mode).
    pub config_flags: u32,
    /// Lane id → DSCP of its pods' packets.
    pub dscp: BTreeMap<u32, u8>,
    /// Lane id → warm-up of its backends.
    pub warmups: BTreeMap<u32, Warmup>,
    /// Routing rules, in order: the first that matches a (caller lane, Service) decides.
    pub routes: Vec<Route>,
    /// Lane id → name, for every lane the config mentions (base included).
    pub names: BTreeMap<u32, String>,
}

/// A routing rule: callers of lane `from` connecting to a Service the selector matches use
/// `chain` instead of their lane's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The caller lane's id.
    pub from: u32,
    /// The Service's namespace (any when absent).
    pub namespace: Option<String>,
    /// The Service's name (any when absent).
    pub name: Option<String>,
    /// Labels the Service must carry (all of them).
    pub labels: BTreeMap<String, String>,
    /// The target chain.
    pub chain: LanePolicy,
}

impl Route {
    /// Whether the rule's selector matches a Service.
    #[must_use]
    pub fn matches(&self, origin: &FrontendOrigin) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == origin.service.namespace)
            && self.name.as_ref().is_none_or(|n| *n == origin.service.name)
            && self.labels.iter().all(|(k, v)| origin.shaping.labels.get(k) == Some(v))
    }
}

impl LaneSettings {
    /// The settings of a validated config.
    #[must_use]
    pub fn of(config: &LanesConfig) -> Self {
        Self {
            policies: config.policies(),
            config_flags: config.config_flags(),
            dscp: config.lanes.iter().filter_map(|(name, l)| Some((lane_id(name), l.dscp?))).collect(),
            warmups: config
                .lanes
                .iter()
                .filter_map(|(name, l)| Some((lane_id(name), l.warmup_settings().ok().flatten()?)))
                .collect(),
            routes: config
                .rules
                .iter()
                .map(|r| Route {
                    from: lane_id(&r.from),
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    labels: r.labels.clone(),
                    chain: r.chain(),
                })
                .collect(),
            names: config.lane_names(),
        }
    }

    /// The routing rules that apply to a Service: caller lane id → target chain (the first
    /// matching rule per caller lane wins).
    #[must_use]
    pub fn routes_for(&self, origin: &FrontendOrigin) -> BTreeMap<u32, LanePolicy> {
        let mut out = BTreeMap::new();
        for route in self.routes.iter().filter(|r| r.matches(origin)) {
            out.entry(route.from).or_insert(route.chain);
        }
        out
    }

    /// The DSCP of a lane's packets (`None`: left alone).
    #[must_use]
    pub fn dscp(&self, lane: u32) -> Option<u8> {
        self.dscp.get(&lane).copied()
    }

    /// The warm-up of a lane's backends.
    #[must_use]
    pub fn lane_warmup(&self, lane: u32) -> Option<Warmup> {
        self.warmups.get(&lane).copied()
    }
}

#[cfg(test)]
mod tests {
    use tagger_common::{BASE_LANE, LANE_F_STRICT};

    use super::*;
    use crate::{
        config::lanes::tests::SHAPING,
        model::{ObjectRef, ServiceShaping},
    };

    fn origin(ns: &str, name: &str, labels: &[(&str, &str)]) -> FrontendOrigin {
        FrontendOrigin {
            service: ObjectRef::new(ns, name),
            port_name: String::new(),
            shaping: ServiceShaping {
                labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                ..Default::default()
            },
        }
    }

    fn settings(text: &str) -> LaneSettings {
        LaneSettings::of(&LanesConfig::parse(text).unwrap())
    }

    #[test]
    fn warmups_per_lane() {
        let s = settings(SHAPING);
        let w = s.lane_warmup(lane_id("gray")).unwrap();
        assert_eq!((w.duration.as_secs(), w.aggression(), w.min_percent()), (60, 2.0, 5.0));
        let w = s.lane_warmup(lane_id("blue")).unwrap();
        assert_eq!((w.duration.as_secs(), w.aggression(), w.min_percent()), (90, 1.0, 10.0));
        assert_eq!(s.lane_warmup(lane_id("other")), None);
    }

    #[test]
    fn routing_rules_first_match_per_caller_lane() {
        let s = settings(SHAPING);
        let cart = s.routes_for(&origin("shop", "cart", &[]));
        assert_eq!(cart.len(), 1);
        let p = cart[&lane_id("gray")];
        assert_eq!(&p.chain[..p.chain_len as usize], &[lane_id("canary"), BASE_LANE]);
        let other = s.routes_for(&origin("shop", "pay", &[]));
        assert_eq!(other[&lane_id("gray")].chain[0], lane_id("blue"));
        let edge = s.routes_for(&origin("web", "front", &[("tier", "edge")]));
        assert_eq!(edge[&BASE_LANE].flags, LANE_F_STRICT);
        assert!(s.routes_for(&origin("web", "front", &[("tier", "core")])).is_empty());
        assert_eq!(s.names[&lane_id("canary")], "canary");
    }

    #[test]
    fn dscp_per_lane() {
        let s = settings("lanes:\n  gray: {dscp: 10}\n  blue: {}\n");
        assert_eq!(s.dscp(lane_id("gray")), Some(10));
        assert_eq!(s.dscp(lane_id("blue")), None);
        assert_eq!(s.dscp(lane_id("other")), None);
    }

    #[test]
    fn the_default_is_the_empty_configs() {
        assert_eq!(LaneSettings::of(&LanesConfig::default()).policies, BTreeMap::new());
        assert_eq!(LaneSettings::of(&LanesConfig::default()).config_flags, 0);
    }
}
