//! Label and field selectors, parsed and evaluated the way the API server does.

use std::borrow::Cow;

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value`: also true when the label is absent.
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, Vec<String>),
    /// `key notin (a,b)`: also true when the label is absent.
    NotIn(String, Vec<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    DoesNotExist(String),
}

/// A parsed `labelSelector` (equality- and set-based requirements, all of which must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

impl LabelSelector {
    /// Parses a selector such as `app=web,tier!=db,env in (a, b),!canary`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(parse_label_requirement(part)?);
        }
        Ok(Self { requirements })
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.requirements.iter().all(|requirement| match requirement {
            LabelRequirement::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelRequirement::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            LabelRequirement::Exists(k) => get(k).is_some(),
            LabelRequirement::DoesNotExist(k) => get(k).is_none(),
        })
    }

    /// Whether the selector selects everything.
    pub(crate) fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// Splits at commas that are not inside parentheses (`a in (x,y),b` is two requirements).
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0_u32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_label_requirement(part: &str) -> Result<LabelRequirement, String> {
    let invalid = || format!("unable to parse requirement: {part:?}");
    if let Some(open) = part.find('(') {
        let close = part.rfind(')').filter(|&c| c > open && c == part.len() - 1).ok_or_else(invalid)?;
        let values: Vec<String> = part[open + 1..close].split(',').map(|v| v.trim().to_owned()).collect();
        let head = part[..open].trim_end();
        let (key, set_in) = if let Some(key) = head.strip_suffix("notin") {
            (key, false)
        } else if let Some(key) = head.strip_suffix("in") {
            (key, true)
        } else {
            return Err(invalid());
        };
        // The operator must be a separate word: `env in (..)`, not `envin(..)`.
        if !key.ends_with(char::is_whitespace) {
            return Err(invalid());
        }
        let key = validate_key(key.trim()).ok_or_else(invalid)?;
        return Ok(if set_in {
            LabelRequirement::In(key, values)
        } else {
            LabelRequirement::NotIn(key, values)
        });
    }
    if let Some(key) = part.strip_prefix('!') {
        return Ok(LabelRequirement::DoesNotExist(validate_key(key.trim()).ok_or_else(invalid)?));
    }
    for (op, not) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((key, value)) = part.split_once(op) {
            let key = validate_key(key.trim()).ok_or_else(invalid)?;
            let value = value.trim().to_owned();
            return Ok(if not {
                LabelRequirement::NotEquals(key, value)
            } else {
                LabelRequirement::Equals(key, value)
            });
        }
    }
    Ok(LabelRequirement::Exists(validate_key(part).ok_or_else(invalid)?))
}

/// A label key: non-empty, `[prefix/]name` with the characters Kubernetes allows.
fn validate_key(key: &str) -> Option<String> {
    let ok = !key.is_empty()
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    ok.then(|| key.to_owned())
}

/// One requirement of a field selector.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldRequirement {
    /// Dotted path such as `spec.nodeName`.
    path: String,
    value: String,
    /// `!=` rather than `=`/`==`.
    negated: bool,
}

/// A parsed `fieldSelector`, restricted to the field labels the resource supports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    /// Parses `spec.nodeName=node-a,metadata.namespace!=kube-system`; a field that is neither
    /// `metadata.name`, `metadata.namespace` nor in `supported` is refused as the API server
    /// does (`field label not supported: ...`).
    pub(crate) fn parse(text: &str, supported: &[&str]) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (path, value, negated) = [("!=", true), ("==", false), ("=", false)]
                .into_iter()
                .find_map(|(op, negated)| {
                    part.split_once(op).map(|(path, value)| (path.trim(), value.trim(), negated))
                })
                .ok_or_else(|| format!("invalid selector: '{text}'; can't understand '{part}'"))?;
            let known = matches!(path, "metadata.name" | "metadata.namespace") || supported.contains(&path);
            if !known {
                return Err(format!("field label not supported: {path}"));
            }
            requirements.push(FieldRequirement { path: path.to_owned(), value: value.to_owned(), negated });
        }
        Ok(Self { requirements })
    }

    /// Whether the object satisfies every requirement; a missing field compares as `""`.
    pub(crate) fn matches(&self, object: &Value) -> bool {
        self.requirements.iter().all(|r| (field_value(object, &r.path) == r.value) != r.negated)
    }

    /// Whether the selector selects everything.
    pub(crate) fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// The string form of a field, as the API server's field label conversion gives it. Walks the
/// dotted path in place: a list of 10,000 pods by `spec.nodeName` runs this once per pod.
fn field_value<'a>(object: &'a Value, path: &str) -> Cow<'a, str> {
    match path.split('.').try_fold(object, |v, segment| v.get(segment)) {
        Some(Value::String(s)) => Cow::Borrowed(s),
        Some(Value::Bool(b)) => Cow::Owned(b.to_string()),
        Some(Value::Number(n)) => Cow::Owned(n.to_string()),
        _ => Cow::Borrowed(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let pod = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let yes = [
            "",
            "app=web",
            "app==web,tier=front",
            "tier!=db",
            "missing!=x",
            "app in (web, api)",
            "app notin (db)",
            "missing notin (db)",
            "app",
            "!missing",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&pod), "{s}");
        }
        let no = ["app=api", "tier!=front", "app in (db)", "app notin (web)", "missing", "!app"];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&pod), "{s}");
        }
        assert!(LabelSelector::parse("app in (web").is_err());
        assert!(LabelSelector::parse("a b=c").is_err());
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1", "hostNetwork": true}});
        let supported = ["spec.nodeName", "spec.hostNetwork"];
        let sel = |s| FieldSelector::parse(s, &supported).unwrap();
        assert!(sel("spec.nodeName=n1,metadata.namespace==ns").matches(&pod));
        assert!(sel("spec.hostNetwork=true").matches(&pod));
        assert!(!sel("spec.nodeName=n2").matches(&pod));
        assert!(sel("spec.nodeName!=n2").matches(&pod));
        assert!(!sel("metadata.name!=p").matches(&pod));
        let unscheduled = json!({"metadata": {"name": "q"}, "spec": {}});
        assert!(sel("spec.nodeName=").matches(&unscheduled));
        assert_eq!(
            FieldSelector::parse("spec.foo=x", &supported),
            Err("field label not supported: spec.foo".to_owned())
        );
    }
}
