//! Lane labels as users write them: which label keys name a pod's lane, and Kubernetes'
//! validation rules for label keys and values. The lane a pod's labels give is decided in
//! [`crate::model::lane`].
//!
//! The validation mirrors apimachinery's `IsValidLabelValue` and `IsQualifiedName`, so an
//! agent never accepts what the API server would reject (which only the file source can
//! produce) nor rejects what it accepts.

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
pub const BASE_VALUES: [&str; 2] = ["", "base"];

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

    proptest! {
        #[test]
        fn validators_never_panic(s in ".{0,80}") {
            let _ = validate_label_value(&s);
            let _ = validate_label_key(&s);
        }

    }
}
