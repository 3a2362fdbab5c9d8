//! The lane of a pod, decided in one place: from its labels and the lane label keys, for the
//! node's own pods (their cgroups' lane) and for backend pods (their endpoints' lane) alike.
//!
//! The lane model (README, "The agent"): the first configured key that is present wins; no
//! label, an empty value or `base` is the base lane; a value that is not a valid label value is
//! the base lane with a warning and a counter — never a crash, never a wrong lane.

use std::collections::BTreeMap;

use crate::config::labels::{BASE_VALUES, validate_label_value};

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

impl LaneOf {
    /// The warning for an invalid label of `pod` (`None` when the labels are valid).
    #[must_use]
    pub fn warning(&self, pod: &impl std::fmt::Display) -> Option<String> {
        match self {
            LaneOf::Invalid { key, value, reason } => {
                Some(format!("pod {pod}: label {key}={value:?}: {reason}; the pod is base"))
            }
            LaneOf::Base | LaneOf::Lane(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::config::labels::default_lane_keys;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
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

    #[test]
    fn an_invalid_label_warns_naming_the_pod() {
        let got = lane_of(&labels(&[("tagger.io/lane", "gray!")]), &default_lane_keys());
        let w = got.warning(&"shop/web").unwrap();
        assert!(w.starts_with("pod shop/web: label tagger.io/lane=\"gray!\": "), "{w}");
        assert!(w.ends_with("; the pod is base"), "{w}");
        assert_eq!(LaneOf::Base.warning(&"x"), None);
    }

    proptest! {
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
