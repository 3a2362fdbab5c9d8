//! The lanes config file (`--lanes-config`; in Kubernetes a ConfigMap), reloaded on change:
//! each lane's fallback chain or strictness, validated as a whole before anything reaches the
//! datapath, and turned into the datapath's lane policies.
//!
//! ```yaml
//! lanes:
//!   gray: {}                      # default fallback chain: [base]
//!   feature-x:
//!     fallback: [gray, base]
//!   payments-canary:
//!     strict: true                # no fallback: connect fails with EPERM
//!   blue:
//!     rehome: true                # when blue has ready backends again, reset connections
//!                                 # that had fallen back from it (off by default)
//! ```
//!
//! Lanes not listed fall back to base; so does every lane when the file is empty. A chain is
//! used exactly as written: `fallback: [gray]` stops at gray and does not add base.
//!
//! Traffic shaping (see [`super::values`] for the value syntax):
//!
//! ```yaml
//! mode: shadow                    # every decision computed and counted, none applied
//! lanes:
//!   gray:
//!     mode: shadow                # only gray callers in shadow mode
//!     warmup: 60s                 # gray backends ramp up over 60 s after becoming ready
//!     aggression: 2               # curve (t/warmup)^(1/aggression); default 1 (linear)
//!     warmup_min: 10%             # weight right after becoming ready; default 10%
//!     dscp: 10                    # DSCP on gray pods' packets (with --mark-interfaces)
//! rules:                          # routing rules: first match per (caller lane, Service)
//!   - from: gray                  # caller lane (`base` allowed)
//!     namespace: shop             # Service selector: namespace, name and/or labels
//!     name: cart
//!     to: [canary, base]          # target chain, replacing the caller lane's own chain
//!   - from: base
//!     labels: {tier: edge}
//!     to: [gray]
//!     strict: true                # nothing ready in the chain: refuse (EPERM)
//! ```
//!
//! Adding a per-lane setting later (warm-up, shadow mode, rehome, DSCP, routing rules) means
//! one field on [`LaneConfig`], a check in [`LanesConfig::validate`] and, when the datapath
//! needs it, its encoding in [`LaneConfig::policy`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use serde::{Deserialize, Deserializer, Serialize};
use tagger_common::{
    BASE_LANE, CFG_F_SHADOW, CFG_F_SHADOW_LANES, LANE_F_REHOME, LANE_F_SHADOW, LANE_F_STRICT, LanePolicy,
    MAX_CHAIN, MAX_LANES, lane_id,
};

use super::{
    labels::validate_label_value,
    values::{
        DEFAULT_AGGRESSION, DEFAULT_MIN_PERCENT, MAX_AGGRESSION, Warmup, parse_duration, parse_percent,
    },
};

/// The name of the base lane in fallback chains.
pub const BASE: &str = "base";

/// A lanes config that failed to parse or validate. Every message names the lane and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not YAML, or not the expected shape (unknown field, wrong type, duplicate lane). The
    /// message carries the path (e.g. `lanes.gray.dscp`), the line and the column.
    #[error("lanes config: {0}")]
    Yaml(#[from] serde_saphyr::Error),
    /// A lane name that cannot be a lane.
    #[error("lanes config: lane {lane:?}: {reason}")]
    InvalidLaneName {
        /// The name as written.
        lane: String,
        /// Why it is rejected.
        reason: String,
    },
    /// An entry of a fallback chain that cannot be a lane.
    #[error("lanes config: lane {lane:?}: field fallback: entry {entry:?}: {reason}")]
    InvalidChainEntry {
        /// The lane whose chain it is.
        lane: String,
        /// The entry as written.
        entry: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A fallback chain longer than the datapath holds.
    #[error("lanes config: lane {lane:?}: field fallback: {len} entries; at most {max}")]
    ChainTooLong {
        /// The lane whose chain it is.
        lane: String,
        /// Its length.
        len: usize,
        /// [`MAX_CHAIN`].
        max: usize,
    },
    /// A lane that falls back to itself.
    #[error("lanes config: lane {lane:?}: field fallback: a lane cannot fall back to itself")]
    SelfInChain {
        /// The lane.
        lane: String,
    },
    /// The same lane twice in one chain.
    #[error("lanes config: lane {lane:?}: field fallback: {entry:?} appears more than once")]
    DuplicateInChain {
        /// The lane whose chain it is.
        lane: String,
        /// The repeated entry.
        entry: String,
    },
    /// `strict: true` with a non-empty fallback chain: the two contradict each other.
    #[error(
        "lanes config: lane {lane:?}: field strict: a strict lane has no fallback; remove `fallback` or set `strict: false`"
    )]
    StrictWithFallback {
        /// The lane.
        lane: String,
    },
    /// `fallback: []` on a lane that is not strict.
    #[error(
        "lanes config: lane {lane:?}: field fallback: an empty chain would let connections fail open to any \
         lane; write `strict: true` for no fallback, or omit `fallback` for [base]"
    )]
    EmptyFallback {
        /// The lane.
        lane: String,
    },
    /// More lanes than the datapath's lane map holds.
    #[error("lanes config: {count} lanes; at most {max}")]
    TooManyLanes {
        /// Lanes in the file.
        count: usize,
        /// [`MAX_LANES`].
        max: u32,
    },
    /// A shaping setting of a lane that cannot be used.
    #[error("lanes config: lane {lane:?}: field {field}: {reason}")]
    Shaping {
        /// The lane.
        lane: String,
        /// The field.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// A routing rule that cannot be used.
    #[error("lanes config: rules[{index}]: {reason}")]
    Rule {
        /// Position of the rule, 0-based.
        index: usize,
        /// Why it is rejected.
        reason: String,
    },
    /// Two lane names with the same lane id: the datapath could not tell them apart.
    #[error(
        "lanes config: lanes {first:?} and {second:?} have the same lane id {id:#010x}; rename one of them"
    )]
    LaneIdCollision {
        /// The first name (in name order).
        first: String,
        /// The second.
        second: String,
        /// Their common id.
        id: u32,
    },
}

/// The whole lanes config: lane name → its settings. Lanes not listed use the defaults.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LanesConfig {
    /// `shadow`: every decision is computed and counted but none applied.
    #[serde(default, skip_serializing_if = "Mode::is_enforce")]
    pub mode: Mode,
    /// Settings per lane name. `lanes:` with nothing after it is the same as `lanes: {}`.
    #[serde(default, deserialize_with = "lanes_map")]
    pub lanes: BTreeMap<String, LaneConfig>,
    /// Routing rules, in order: the first that matches a (caller lane, Service) decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RoutingRule>,
}

/// Whether decisions are applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decisions are applied (the default).
    #[default]
    Enforce,
    /// Decisions are computed and counted apart, connections are left unchanged.
    Shadow,
}

impl Mode {
    #[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's skip_serializing_if signature")]
    fn is_enforce(&self) -> bool {
        *self == Mode::Enforce
    }
}

/// A routing rule: callers of lane `from` connecting to a Service the selector matches use
/// the chain `to` instead of their lane's default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingRule {
    /// The caller lane (`base` for base callers).
    pub from: String,
    /// The Service's namespace (any when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The Service's name (any when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels the Service must carry (all of them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The target chain, tried in order.
    pub to: Vec<String>,
    /// No lane of the chain has a ready backend: refuse (EPERM) instead of failing open.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict: bool,
}

impl RoutingRule {
    /// The datapath encoding of the target chain.
    #[must_use]
    pub fn chain(&self) -> LanePolicy {
        encode_chain(
            &self.to.iter().map(String::as_str).collect::<Vec<_>>(),
            if self.strict { LANE_F_STRICT } else { 0 },
        )
    }

    fn validate(&self) -> Result<(), String> {
        if self.from != BASE {
            validate_lane_name(&self.from).map_err(|e| format!("field from: {e}"))?;
        }
        if self.namespace.is_none() && self.name.is_none() && self.labels.is_empty() {
            return Err("no Service selector: give namespace, name and/or labels".into());
        }
        if self.to.is_empty() {
            return Err("field to: empty chain".into());
        }
        if self.to.len() > MAX_CHAIN {
            return Err(format!("field to: {} entries; at most {MAX_CHAIN}", self.to.len()));
        }
        let mut seen = BTreeSet::new();
        for entry in &self.to {
            if entry != BASE {
                validate_lane_name(entry).map_err(|e| format!("field to: entry {entry:?}: {e}"))?;
            }
            if !seen.insert(entry) {
                return Err(format!("field to: {entry:?} appears more than once"));
            }
        }
        Ok(())
    }
}

fn encode_chain(chain: &[&str], flags: u32) -> LanePolicy {
    let mut policy = LanePolicy { flags, ..LanePolicy::default() };
    for (slot, name) in policy.chain.iter_mut().zip(chain) {
        *slot = lane_id(name);
    }
    #[expect(clippy::cast_possible_truncation, reason = "at most MAX_CHAIN = 8")]
    {
        policy.chain_len = chain.len().min(MAX_CHAIN) as u32;
    }
    policy
}

/// One lane's settings.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    /// Lanes tried in order when this lane has no ready backend. `None`: `[base]`, or no
    /// fallback at all when `strict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Vec<String>>,
    /// No fallback: a connect finding no backend of this lane fails (EPERM).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict: bool,
    /// When the lane gets ready backends again, the agent resets the connections that had
    /// fallen back from it, so they reconnect into the lane (rate-limited).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rehome: bool,
    /// `shadow`: this lane's callers' decisions are computed and counted, not applied.
    #[serde(default, skip_serializing_if = "Mode::is_enforce")]
    pub mode: Mode,
    /// Warm-up of this lane's backends (e.g. `60s`), unless their Service sets its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<String>,
    /// Warm-up curve: weight grows along `(t / warmup) ^ (1 / aggression)`; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggression: Option<f64>,
    /// Warm-up weight right after becoming ready, percent (`10` or `10%`); default 10%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_min: Option<serde_json::Value>,
    /// DSCP (0..=63) the TC marking program stamps on this lane's pods' packets
    /// (`--mark-interfaces`); unset: their DSCP is left alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dscp: Option<u8>,
}

impl LanesConfig {
    /// Parses and validates a lanes config. An empty document is valid (no lane policies).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        // `Option`: an empty (or comment-only) document is null. One-line messages (no source
        // snippet: they go to the log) that start with the path of what is wrong
        // (`lanes.gray.dscp: invalid u8 at line 2, column 16`); a lane listed twice reaches
        // `lanes_map`, which names it.
        // Booleans are `true`/`false` only (YAML 1.2): `strict: yes` is refused, not read as true.
        let options = serde_saphyr::options! {
            with_snippet: false,
            strict_booleans: true,
            duplicate_keys: serde_saphyr::DuplicateKeyPolicy::LastWins,
        };
        let config: Option<LanesConfig> =
            serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
                serde_path_to_error::deserialize(de).map_err(|e| {
                    let path = e.path().to_string();
                    let inner = e.into_inner();
                    if path == "." {
                        inner
                    } else {
                        serde::de::Error::custom(format_args!("{path}: {inner}"))
                    }
                })
            })?;
        let config = config.unwrap_or_default();
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule of the format; [`LanesConfig::parse`] calls it. The first violation
    /// in lane-name order is returned, so the same file always gives the same message.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.lanes.len() > MAX_LANES as usize {
            return Err(ConfigError::TooManyLanes { count: self.lanes.len(), max: MAX_LANES });
        }
        for (name, lane) in &self.lanes {
            validate_lane_name(name)
                .map_err(|reason| ConfigError::InvalidLaneName { lane: name.clone(), reason })?;
            lane.validate(name)?;
            lane.warmup_settings().map_err(|(field, reason)| ConfigError::Shaping {
                lane: name.clone(),
                field,
                reason,
            })?;
            if let Some(d) = lane.dscp.filter(|&d| d > tagger_common::DSCP_MAX) {
                return Err(ConfigError::Shaping {
                    lane: name.clone(),
                    field: "dscp",
                    reason: format!("{d}: a DSCP is 0 to 63"),
                });
            }
        }
        for (index, rule) in self.rules.iter().enumerate() {
            rule.validate().map_err(|reason| ConfigError::Rule { index, reason })?;
        }
        // Chain entries count too: an entry colliding with a configured lane would silently
        // fall back to the wrong lane's backends.
        let mentioned: BTreeSet<&str> = self
            .lanes
            .iter()
            .flat_map(|(name, lane)| std::iter::once(name.as_str()).chain(lane.chain()))
            .chain(
                self.rules
                    .iter()
                    .flat_map(|r| std::iter::once(r.from.as_str()).chain(r.to.iter().map(String::as_str))),
            )
            .filter(|name| *name != BASE)
            .collect();
        let mut ids: BTreeMap<u32, &str> = BTreeMap::new();
        for name in mentioned {
            if let Some(first) = ids.insert(lane_id(name), name) {
                return Err(ConfigError::LaneIdCollision {
                    first: first.to_owned(),
                    second: name.to_owned(),
                    id: lane_id(name),
                });
            }
        }
        Ok(())
    }

    /// The datapath's global flags (`CFG_F_*`): shadow mode.
    #[must_use]
    pub fn config_flags(&self) -> u32 {
        let mut flags = 0;
        if self.mode == Mode::Shadow {
            flags |= CFG_F_SHADOW;
        }
        if self.lanes.values().any(|l| l.mode == Mode::Shadow) {
            flags |= CFG_F_SHADOW_LANES;
        }
        flags
    }

    /// The datapath's lane policies: lane id → policy. Meaningful for a validated config.
    #[must_use]
    pub fn policies(&self) -> BTreeMap<u32, LanePolicy> {
        self.lanes.iter().map(|(name, lane)| (lane_id(name), lane.policy())).collect()
    }

    /// Lane id → name, for every lane the config mentions (including chain entries and base),
    /// so logs, metrics and the CLI can show names instead of hashes.
    #[must_use]
    pub fn lane_names(&self) -> BTreeMap<u32, String> {
        let mut names = BTreeMap::from([(BASE_LANE, BASE.to_owned())]);
        for (name, lane) in &self.lanes {
            names.insert(lane_id(name), name.clone());
            for entry in lane.chain() {
                names.insert(lane_id(entry), entry.to_owned());
            }
        }
        for rule in &self.rules {
            for name in std::iter::once(&rule.from).chain(&rule.to) {
                names.insert(lane_id(name), name.clone());
            }
        }
        names
    }
}

impl LaneConfig {
    /// The fallback chain as names: the written one, `[]` for a strict lane, else `[base]`.
    #[must_use]
    pub fn chain(&self) -> Vec<&str> {
        match (&self.fallback, self.strict) {
            (Some(chain), _) => chain.iter().map(String::as_str).collect(),
            (None, true) => Vec::new(),
            (None, false) => vec![BASE],
        }
    }

    /// The datapath encoding of this lane's settings. The chain is cut at [`MAX_CHAIN`]; a
    /// validated config never needs that.
    #[must_use]
    pub fn policy(&self) -> LanePolicy {
        let mut flags =
            if self.strict { LANE_F_STRICT } else { 0 } | if self.rehome { LANE_F_REHOME } else { 0 };
        if self.mode == Mode::Shadow {
            flags |= LANE_F_SHADOW;
        }
        encode_chain(&self.chain(), flags)
    }

    /// The warm-up of this lane's backends: `Err((field, reason))` for a bad value.
    pub fn warmup_settings(&self) -> Result<Option<Warmup>, (&'static str, String)> {
        let Some(text) = &self.warmup else {
            if self.aggression.is_some() || self.warmup_min.is_some() {
                return Err(("warmup", "aggression and warmup_min need a warmup duration".into()));
            }
            return Ok(None);
        };
        let duration = parse_duration(text).map_err(|e| ("warmup", e.to_string()))?;
        let aggression = self.aggression.unwrap_or(DEFAULT_AGGRESSION);
        if !aggression.is_finite() || aggression <= 0.0 || aggression > MAX_AGGRESSION {
            return Err((
                "aggression",
                format!("{aggression}: must be greater than 0 and at most {MAX_AGGRESSION}"),
            ));
        }
        let min = match &self.warmup_min {
            None => DEFAULT_MIN_PERCENT,
            Some(serde_json::Value::Number(n)) => {
                parse_percent("warmup_min", &n.to_string()).map_err(|e| ("warmup_min", e.to_string()))?
            }
            Some(serde_json::Value::String(s)) => {
                parse_percent("warmup_min", s).map_err(|e| ("warmup_min", e.to_string()))?
            }
            Some(other) => return Err(("warmup_min", format!("{other:?} is not a percentage"))),
        };
        Ok((!duration.is_zero()).then(|| Warmup::new(duration, aggression, min)))
    }

    fn validate(&self, lane: &str) -> Result<(), ConfigError> {
        let Some(chain) = &self.fallback else { return Ok(()) };
        if self.strict && !chain.is_empty() {
            return Err(ConfigError::StrictWithFallback { lane: lane.to_owned() });
        }
        if !self.strict && chain.is_empty() {
            return Err(ConfigError::EmptyFallback { lane: lane.to_owned() });
        }
        if chain.len() > MAX_CHAIN {
            return Err(ConfigError::ChainTooLong {
                lane: lane.to_owned(),
                len: chain.len(),
                max: MAX_CHAIN,
            });
        }
        let mut seen = BTreeSet::new();
        for entry in chain {
            if entry != BASE {
                validate_lane_name(entry).map_err(|reason| ConfigError::InvalidChainEntry {
                    lane: lane.to_owned(),
                    entry: entry.clone(),
                    reason,
                })?;
            }
            if entry == lane {
                return Err(ConfigError::SelfInChain { lane: lane.to_owned() });
            }
            if !seen.insert(entry) {
                return Err(ConfigError::DuplicateInChain { lane: lane.to_owned(), entry: entry.clone() });
            }
        }
        Ok(())
    }
}

/// A name that may be configured as a lane: a valid, non-empty label value other than `base`
/// (base's behaviour is fixed: base callers reach only base).
fn validate_lane_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty lane name (the base lane is written `base`)".into());
    }
    if name == BASE {
        return Err("the base lane has no policy: base callers reach only base backends".into());
    }
    validate_label_value(name)
}

/// Reads the `lanes` mapping, rejecting a lane listed twice (the parser would silently keep
/// the last one, so a copy-paste error in the ConfigMap would go unnoticed) and reading a
/// lane written with no settings (`gray:`) as `gray: {}`.
fn lanes_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, LaneConfig>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = BTreeMap<String, LaneConfig>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a mapping of lane name to lane settings")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut lanes = BTreeMap::new();
            while let Some((name, lane)) = map.next_entry::<String, Option<LaneConfig>>()? {
                if lanes.contains_key(&name) {
                    return Err(serde::de::Error::custom(format_args!(
                        "lane {name:?} is listed more than once"
                    )));
                }
                lanes.insert(name, lane.unwrap_or_default());
            }
            Ok(lanes)
        }
    }
    d.deserialize_any(Visitor)
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    const EXAMPLE: &str = "\
lanes:
  gray: {}                      # default fallback chain: [base]
  feature-x:
    fallback: [gray, base]
  payments-canary:
    strict: true                # no fallback: connect fails with EPERM
";

    fn err(text: &str) -> String {
        LanesConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_example() {
        let cfg = LanesConfig::parse(EXAMPLE).unwrap();
        let p = cfg.policies();
        assert_eq!(p.len(), 3);
        let gray = p[&lane_id("gray")];
        assert_eq!((gray.flags, gray.chain_len, gray.chain[0]), (0, 1, BASE_LANE));
        let fx = p[&lane_id("feature-x")];
        assert_eq!((fx.flags, fx.chain_len), (0, 2));
        assert_eq!(&fx.chain[..2], &[lane_id("gray"), BASE_LANE]);
        assert!(fx.chain[2..].iter().all(|&l| l == 0), "unused chain slots stay zero");
        let canary = p[&lane_id("payments-canary")];
        assert_eq!((canary.flags, canary.chain_len), (LANE_F_STRICT, 0));

        let names = cfg.lane_names();
        assert_eq!(names[&BASE_LANE], "base");
        assert_eq!(names[&lane_id("gray")], "gray");
        assert_eq!(names[&lane_id("payments-canary")], "payments-canary");
    }

    #[test]
    fn rehome_sets_its_flag_and_is_off_by_default() {
        let cfg = LanesConfig::parse("lanes:\n  blue:\n    rehome: true\n  gray: {}\n").unwrap();
        let p = cfg.policies();
        assert_eq!(p[&lane_id("blue")].flags, LANE_F_REHOME);
        assert_eq!(p[&lane_id("gray")].flags, 0);
    }

    #[test]
    fn empty_configs_are_valid() {
        for text in ["", "\n", "# nothing yet\n", "lanes: {}\n", "lanes:\n", "{}"] {
            let cfg = LanesConfig::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(cfg.policies().is_empty(), "{text:?}");
        }
    }

    #[test]
    fn lane_without_settings_is_default() {
        let cfg = LanesConfig::parse("lanes:\n  gray:\n").unwrap();
        assert_eq!(cfg.lanes["gray"], LaneConfig::default());
        assert_eq!(cfg.lanes["gray"].chain(), vec!["base"]);
    }

    #[test]
    fn chains_are_used_as_written() {
        let cfg = LanesConfig::parse("lanes:\n  x:\n    fallback: [gray]\n").unwrap();
        let p = cfg.policies()[&lane_id("x")];
        assert_eq!((p.chain_len, p.chain[0]), (1, lane_id("gray")));
        assert_eq!(cfg.lane_names()[&lane_id("gray")], "gray", "chain entries are named too");
        // Strict with an explicitly empty chain is fine.
        LanesConfig::parse("lanes:\n  x:\n    strict: true\n    fallback: []\n").unwrap();
    }

    #[test]
    fn shape_errors_name_the_lane_and_field() {
        let e = err("lanes:\n  gray:\n    fallbak: [base]\n");
        assert!(e.contains("lanes.gray") && e.contains("fallbak"), "{e}");
        let e = err("lanes:\n  gray:\n    strict: yes\n");
        assert!(e.contains("lanes.gray.strict"), "{e}");
        let e = err("lane:\n  gray: {}\n");
        assert!(e.contains("unknown field `lane`"), "{e}");
        let e = err("lanes:\n  gray: {}\n  gray: {strict: true}\n");
        assert!(e.contains("\"gray\" is listed more than once"), "{e}");
        let e = err("lanes: [gray]\n");
        assert!(e.contains("lanes"), "{e}");
        assert!(err("lanes: {\n").starts_with("lanes config: "));
    }

    #[test]
    fn validation_errors() {
        let long_chain: Vec<String> = (0..=MAX_CHAIN).map(|i| format!("l{i}")).collect();
        let cases: Vec<(String, &str)> = vec![
            ("lanes:\n  base: {}\n".into(), "lane \"base\": the base lane has no policy"),
            ("lanes:\n  '': {}\n".into(), "lane \"\": empty lane name"),
            ("lanes:\n  -gray: {}\n".into(), "lane \"-gray\": \"-gray\" is not a valid label value"),
            ("lanes:\n  x:\n    fallback: ['gr ay']\n".into(), "lane \"x\": field fallback: entry \"gr ay\""),
            ("lanes:\n  x:\n    fallback: ['']\n".into(), "entry \"\": empty lane name"),
            (format!("lanes:\n  x:\n    fallback: [{}]\n", long_chain.join(", ")), "9 entries; at most 8"),
            (
                "lanes:\n  x:\n    fallback: [gray, x]\n".into(),
                "lane \"x\": field fallback: a lane cannot fall back",
            ),
            ("lanes:\n  x:\n    fallback: [gray, base, gray]\n".into(), "\"gray\" appears more than once"),
            ("lanes:\n  x:\n    fallback: [base, base]\n".into(), "\"base\" appears more than once"),
            ("lanes:\n  x:\n    strict: true\n    fallback: [base]\n".into(), "lane \"x\": field strict"),
            ("lanes:\n  x:\n    fallback: []\n".into(), "lane \"x\": field fallback: an empty chain"),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "{text:?}: got {e}, want {want}");
        }
    }

    #[test]
    fn exactly_max_chain_is_fine() {
        let chain: Vec<String> = (1..MAX_CHAIN).map(|i| format!("l{i}")).chain(["base".into()]).collect();
        let cfg =
            LanesConfig::parse(&format!("lanes:\n  x:\n    fallback: [{}]\n", chain.join(", "))).unwrap();
        let p = cfg.policies()[&lane_id("x")];
        assert_eq!(p.chain_len as usize, MAX_CHAIN);
        assert_eq!(p.chain[MAX_CHAIN - 1], BASE_LANE);
    }

    #[test]
    fn too_many_lanes() {
        let config = |n: u32| {
            let lanes: Vec<String> = (0..n).map(|i| format!("  lane-{i}: {{}}\n")).collect();
            format!("lanes:\n{}", lanes.concat())
        };
        assert!(err(&config(MAX_LANES + 1)).contains("1025 lanes; at most 1024"));
        assert_eq!(LanesConfig::parse(&config(MAX_LANES)).unwrap().policies().len(), MAX_LANES as usize);
    }

    #[test]
    fn lane_id_collisions_are_rejected() {
        // Two valid names with the same 32-bit FNV-1a hash (found by a birthday search).
        let (a, b) = ("l49", "l320752");
        assert_eq!(lane_id(a), lane_id(b));
        let e = err(&format!("lanes:\n  {a}: {{}}\n  {b}: {{}}\n"));
        assert!(e.contains("have the same lane id 0x08f6117c") && e.contains(a) && e.contains(b), "{e}");
        let e = err(&format!("lanes:\n  {a}: {{}}\n  x:\n    fallback: [{b}, base]\n"));
        assert!(e.contains("have the same lane id"), "chain entries are checked too: {e}");
        let e = err(&format!("lanes:\n  {a}: {{}}\nrules:\n  - {{from: x, name: s, to: [{b}]}}\n"));
        assert!(e.contains("have the same lane id"), "rule lanes are checked too: {e}");
    }

    pub(crate) const SHAPING: &str = "\
mode: shadow
lanes:
  gray:
    mode: shadow
    warmup: 60s
    aggression: 2
    warmup_min: 5%
  blue:
    warmup: 1m30s
rules:
  - from: gray
    namespace: shop
    name: cart
    to: [canary, base]
  - from: gray
    namespace: shop
    to: [blue]
  - from: base
    labels: {tier: edge}
    to: [gray]
    strict: true
";

    #[test]
    fn shaping_settings_parse() {
        let cfg = LanesConfig::parse(SHAPING).unwrap();
        assert_eq!(cfg.config_flags(), CFG_F_SHADOW | CFG_F_SHADOW_LANES);
        let gray = cfg.policies()[&lane_id("gray")];
        assert_eq!(gray.flags, LANE_F_SHADOW);
        assert_eq!(
            LanesConfig::parse("lanes:\n  gray: {mode: shadow}\n").unwrap().config_flags(),
            CFG_F_SHADOW_LANES
        );
        assert_eq!(LanesConfig::parse("").unwrap().config_flags(), 0);
    }

    #[test]
    fn bad_shaping_values_are_rejected_with_the_field() {
        for (text, want) in [
            ("lanes:\n  gray: {warmup: -5s}\n", "lane \"gray\": field warmup: duration \"-5s\": negative"),
            ("lanes:\n  gray: {warmup: soon}\n", "field warmup: duration \"soon\""),
            ("lanes:\n  gray: {warmup: 60s, aggression: 0}\n", "field aggression: 0: must be greater than 0"),
            (
                "lanes:\n  gray: {warmup: 60s, warmup_min: 150}\n",
                "field warmup_min: warmup_min \"150\": more than 100%",
            ),
            ("lanes:\n  gray: {aggression: 2}\n", "need a warmup duration"),
            ("lanes:\n  gray: {dscp: 64}\n", "field dscp: 64: a DSCP is 0 to 63"),
            ("lanes:\n  gray: {dscp: ef}\n", "dscp"),
            ("lanes:\n  gray: {dscp: -1}\n", "dscp"),
            ("lanes:\n  gray: {mode: dry}\n", "unknown variant `dry`"),
            ("mode: off\n", "unknown variant `off`"),
            ("rules:\n  - {from: gray, to: [base]}\n", "rules[0]: no Service selector"),
            ("rules:\n  - {from: gray, name: a, to: []}\n", "rules[0]: field to: empty chain"),
            ("rules:\n  - {from: 'gr ay', name: a, to: [base]}\n", "rules[0]: field from"),
            ("rules:\n  - {from: gray, name: a, to: [x, x]}\n", "appears more than once"),
            ("rules:\n  - {from: gray, nme: a, to: [x]}\n", "unknown field `nme`"),
        ] {
            let e = err(text);
            assert!(e.contains(want), "{text:?}: got {e}, want {want}");
        }
    }

    #[test]
    fn round_trips_through_yaml() {
        let cfg = LanesConfig::parse(SHAPING).unwrap();
        let text = serde_saphyr::to_string(&cfg).unwrap();
        assert_eq!(LanesConfig::parse(&text).unwrap(), cfg);
        let cfg = LanesConfig::parse(EXAMPLE).unwrap();
        let text = serde_saphyr::to_string(&cfg).unwrap();
        assert_eq!(LanesConfig::parse(&text).unwrap(), cfg);
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in "(lanes:\n)?(  [a-z -]{0,6}:( \\{\\}| \\{strict: (true|false)\\}| \\{fallback: \\[[a-z, ]{0,12}\\]\\})?\n){0,4}") {
            if let Ok(cfg) = LanesConfig::parse(&text) {
                for p in cfg.policies().values() {
                    prop_assert!(p.chain_len as usize <= MAX_CHAIN);
                    prop_assert!(p.flags & LANE_F_STRICT == 0 || p.chain_len == 0);
                }
            }
        }
    }
}
