//! Lane labels: which label keys name a pod's lane, Kubernetes' validation rules for label keys
//! and values, and the one function that turns a pod's labels into its lane.
//!
//! The lane model (README, "The agent"): the first configured key that is present wins; no label or an empty value is the
//! base lane; a value that is not a valid label value is the base lane with a warning and a
//! counter — never a crash, never a wrong lane. The validation here mirrors apimachinery's
//! `IsValidLabelValue` and `IsQualifiedName`, so an agent never accepts what the API server
//! would reject (which only the file source can produce) nor rejects what it accepts.

use std::collections::BTreeMap;

/// The lane label keys, in precedence order: tagger's own, then Alibaba Cloud MSE's tag, then
/// OpenSergo's traffic label, so clusters already labelled for MSE or OpenSergo need no
/// relabelling.
pub const DEFAULT_LANE_LABELS: [&str; 3] =
    ["tagger.io/lane", "alicloud.service.tag", "traffic.opensergo.io/label"];

/// Longest label value and longest name part of a label key.
const MAX_NAME_LEN: usize = 63;
/// Longest DNS subdomain (the optional prefix of a label key).
const MAX_PREFIX_LEN: usize = 253;
/// The label values that mean the base lane (besides a missing label).
const BASE_VALUES: [&str; 2] = ["", "base"];

/// The default lane label keys as owned strings (what `--lane-label` defaults to).
#[must_use]
pub fn default_lane_keys() -> Vec<String> {
    DEFAULT_LANE_LABELS.iter().map(|k| (*k).to_owned()).collect()
}

/// Checks a label value: at most 63 characters, empty allowed, otherwise
/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
pub fn validate_label_value(v: &str) -> Result<(), String> {
    if v.len() > MAX_NAME_LEN {
        return Err(format!(
            "{v:?} is {} characters long; a label value has at most {MAX_NAME_LEN}",
            v.len()
        ));
    }
    if v.is_empty() {
        return Ok(());
    }
    check_name(v).map_err(|why| format!("{v:?} is not a valid label value: {why}"))
}

/// Checks a label key (a qualified name): `[prefix/]name`, where the optional prefix is a DNS
/// subdomain of at most 253 characters and the name is 1 to 63 characters of
/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
pub fn validate_label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        None => (None, k),
        Some((prefix, name)) => (Some(prefix), name),
    };
    if name.contains('/') {
        return Err(format!("{k:?} is not a valid label key: at most one '/' separates prefix and name"));
    }
    if let Some(prefix) = prefix {
        check_dns_subdomain(prefix)
            .map_err(|why| format!("{k:?} is not a valid label key: prefix {prefix:?} {why}"))?;
    }
    if name.is_empty() {
        return Err(format!("{k:?} is not a valid label key: the name part is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{k:?} is not a valid label key: the name part is {} characters long; at most {MAX_NAME_LEN}",
            name.len()
        ));
    }
    check_name(name).map_err(|why| format!("{k:?} is not a valid label key: {why}"))
}

/// The lane a set of labels puts a pod in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaneOf {
    /// No lane label, an empty value or `base`.
    Base,
    /// A named lane (a valid, non-empty label value other than `base`).
    Lane(String),
    /// The first present lane key has a value that is not a valid label value. Callers treat
    /// the pod as base, log a warning and count it.
    Invalid {
        /// The label key that was used.
        key: String,
        /// The offending value.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
}

impl LaneOf {
    /// The lane name, `None` for base (including invalid labels, which count as base).
    #[must_use]
    pub fn name(&self) -> Option<&str> {
        match self {
            LaneOf::Lane(name) => Some(name),
            LaneOf::Base | LaneOf::Invalid { .. } => None,
        }
    }

    /// The lane id (see [`tagger_common::lane_id`]); base for [`LaneOf::Base`] and
    /// [`LaneOf::Invalid`].
    #[must_use]
    pub fn lane_id(&self) -> u32 {
        self.name().map_or(tagger_common::BASE_LANE, tagger_common::lane_id)
    }
}

/// The lane of a pod with `labels`, looking at `keys` in order: the first key present wins,
/// even when its value is empty or invalid — falling through to a lower-precedence key would
/// let a typo in `tagger.io/lane` silently put the pod in another system's lane.
#[must_use]
pub fn lane_of(labels: &BTreeMap<String, String>, keys: &[String]) -> LaneOf {
    let Some((key, value)) = keys.iter().find_map(|k| labels.get(k).map(|v| (k, v))) else {
        return LaneOf::Base;
    };
    if BASE_VALUES.contains(&value.as_str()) {
        return LaneOf::Base;
    }
    match validate_label_value(value) {
        Ok(()) => LaneOf::Lane(value.clone()),
        Err(reason) => LaneOf::Invalid { key: key.clone(), value: value.clone(), reason },
    }
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]` on a non-empty string.
fn check_name(s: &str) -> Result<(), String> {
    let bytes = s.as_bytes();
    if let Some(bad) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("character {bad:?} is not allowed (only A-Z, a-z, 0-9, '-', '_' and '.')"));
    }
    if !bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        || !bytes.last().is_some_and(u8::is_ascii_alphanumeric)
    {
        return Err("it must begin and end with a letter or digit".into());
    }
    Ok(())
}

/// RFC 1123 subdomain as apimachinery checks it: at most 253 characters, dot-separated labels
/// of `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > MAX_PREFIX_LEN {
        return Err(format!("is {} characters long; at most {MAX_PREFIX_LEN}", s.len()));
    }
    for label in s.split('.') {
        let b = label.as_bytes();
        let inner_ok = b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
        let ends_ok = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !inner_ok || !ends_ok(b.first()) || !ends_ok(b.last()) {
            return Err(
                "is not a DNS subdomain (lowercase letters, digits and '-', in dot-separated parts that begin \
                 and end with a letter or digit)"
                    .into(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn label_values() {
        for ok in ["", "a", "gray", "feature-x", "A.b_c-9", "0", &"x".repeat(63)] {
            assert_eq!(validate_label_value(ok), Ok(()), "{ok:?}");
        }
        for bad in ["-a", "a-", "_a", "a.", "a b", "a/b", "grä", &"x".repeat(64), "."] {
            let err = validate_label_value(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "message names the value: {err}");
        }
        assert!(validate_label_value(&"x".repeat(64)).unwrap_err().contains("at most 63"));
        assert!(validate_label_value("a b").unwrap_err().contains("' '"));
        assert!(validate_label_value("a-").unwrap_err().contains("begin and end"));
    }

    #[test]
    fn label_keys() {
        for ok in DEFAULT_LANE_LABELS.iter().copied().chain(["lane", "a.b-c/D_e.f", "x/y", "k8s.io/a"]) {
            assert_eq!(validate_label_key(ok), Ok(()), "{ok:?}");
        }
        for (bad, why) in [
            ("", "name part is empty"),
            ("a/", "name part is empty"),
            ("/a", "prefix \"\" is empty"),
            ("A.io/lane", "DNS subdomain"),
            ("a..b/lane", "DNS subdomain"),
            ("-a/lane", "DNS subdomain"),
            ("a/b/c", "at most one '/'"),
            ("lane-", "begin and end"),
        ] {
            let err = validate_label_key(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert!(validate_label_key(&"x".repeat(64)).unwrap_err().contains("at most 63"));
        let long_prefix = format!("{}/a", "a".repeat(254));
        assert!(validate_label_key(&long_prefix).unwrap_err().contains("at most 253"));
    }

    #[test]
    fn first_present_key_wins() {
        let keys = default_lane_keys();
        assert_eq!(lane_of(&labels(&[]), &keys), LaneOf::Base);
        assert_eq!(lane_of(&labels(&[("app", "x")]), &keys), LaneOf::Base);
        assert_eq!(lane_of(&labels(&[("alicloud.service.tag", "gray")]), &keys), LaneOf::Lane("gray".into()));
        assert_eq!(
            lane_of(
                &labels(&[("traffic.opensergo.io/label", "blue"), ("alicloud.service.tag", "gray")]),
                &keys
            ),
            LaneOf::Lane("gray".into())
        );
        // Present but empty: base, even though a lower-precedence key names a lane.
        assert_eq!(
            lane_of(&labels(&[("tagger.io/lane", ""), ("alicloud.service.tag", "gray")]), &keys),
            LaneOf::Base
        );
        assert_eq!(lane_of(&labels(&[("tagger.io/lane", "base")]), &keys), LaneOf::Base);
    }

    #[test]
    fn invalid_value_is_reported_not_used() {
        let keys = default_lane_keys();
        let got = lane_of(&labels(&[("tagger.io/lane", "gray!"), ("alicloud.service.tag", "gray")]), &keys);
        let LaneOf::Invalid { key, value, reason } = &got else { panic!("{got:?}") };
        assert_eq!((key.as_str(), value.as_str()), ("tagger.io/lane", "gray!"));
        assert!(reason.contains("'!'"));
        assert_eq!(got.lane_id(), tagger_common::BASE_LANE);
        assert_eq!(got.name(), None);
    }

    #[test]
    fn lane_ids() {
        assert_eq!(LaneOf::Base.lane_id(), 0);
        assert_eq!(LaneOf::Lane("gray".into()).lane_id(), tagger_common::lane_id("gray"));
    }

    proptest! {
        #[test]
        fn validators_never_panic(s in ".{0,80}") {
            let _ = validate_label_value(&s);
            let _ = validate_label_key(&s);
        }

        #[test]
        fn lane_is_always_a_valid_value(v in "[-A-Za-z0-9_./ !]{0,70}") {
            let keys = default_lane_keys();
            let l = labels(&[("tagger.io/lane", &v)]);
            match lane_of(&l, &keys) {
                LaneOf::Lane(name) => {
                    prop_assert!(validate_label_value(&name).is_ok());
                    prop_assert!(!BASE_VALUES.contains(&name.as_str()));
                }
                LaneOf::Base => prop_assert!(BASE_VALUES.contains(&v.as_str())),
                LaneOf::Invalid { .. } => prop_assert!(validate_label_value(&v).is_err()),
            }
        }
    }
}
