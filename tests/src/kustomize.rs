//! A minimal kustomize: renders what `deploy/` uses (resources, JSON 6902 patches, images) and
//! refuses anything else, so a new kustomize feature in `deploy/` fails the tests loudly instead
//! of being rendered wrongly. `tests/tests/integration/deploy_manifests.rs` compares it with `kubectl
//! kustomize` where that exists; `tests/tests/integration/deploy_image.rs` runs the DaemonSet it renders.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// The YAML documents of a file as JSON values (empty documents skipped).
pub fn load_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_docs(&text, &path.display().to_string())
}

pub fn parse_docs(text: &str, origin: &str) -> Vec<Value> {
    serde_saphyr::from_multiple_with_options::<Value>(text, crate::yaml_options())
        .unwrap_or_else(|e| panic!("{origin}: {e}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// Objects rendered from a kustomization directory, and the files they came from.
#[derive(Debug, Default)]
pub struct Rendered {
    /// The objects, in order.
    pub objects: Vec<Value>,
    /// The files read.
    pub files: BTreeSet<PathBuf>,
}

/// `kind/namespace/name`, the identity kustomize keeps unique.
pub fn id(v: &Value) -> String {
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or("").to_owned();
    format!("{}/{}/{}", s("/kind"), s("/metadata/namespace"), s("/metadata/name"))
}

pub fn render(dir: &Path) -> Rendered {
    let kpath = dir.join("kustomization.yaml");
    let mut k = load_docs(&kpath);
    assert_eq!(k.len(), 1, "{}: one document", kpath.display());
    let k = k.remove(0);
    let fields = k.as_object().unwrap_or_else(|| panic!("{}: not a mapping", kpath.display()));
    for key in fields.keys() {
        assert!(
            ["apiVersion", "kind", "resources", "patches", "images"].contains(&key.as_str()),
            "{}: field {key:?} is not supported by this test's kustomize renderer; extend it",
            kpath.display()
        );
    }
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1", "{}", kpath.display());
    assert_eq!(k["kind"], "Kustomization", "{}", kpath.display());

    let mut out = Rendered::default();
    out.files.insert(kpath.clone());
    for r in k["resources"].as_array().into_iter().flatten() {
        let rel = r.as_str().expect("resource is a string");
        let p = dir.join(rel).canonicalize().unwrap_or_else(|e| panic!("{}: {rel}: {e}", kpath.display()));
        if p.is_dir() {
            let sub = render(&p);
            out.objects.extend(sub.objects);
            out.files.extend(sub.files);
        } else {
            out.objects.extend(load_docs(&p));
            out.files.insert(p);
        }
    }
    for patch in k["patches"].as_array().into_iter().flatten() {
        apply_patch(&mut out.objects, patch, dir, &kpath);
    }
    for image in k["images"].as_array().into_iter().flatten() {
        set_image(&mut out.objects, image);
    }
    let mut seen = BTreeSet::new();
    for o in &out.objects {
        assert!(seen.insert(id(o)), "{}: {} appears twice", kpath.display(), id(o));
    }
    out
}

/// A JSON 6902 patch with a target, as kustomize's `patches:` entries.
pub fn apply_patch(objects: &mut [Value], patch: &Value, dir: &Path, kpath: &Path) {
    let target = &patch["target"];
    let text = match (patch["patch"].as_str(), patch["path"].as_str()) {
        (Some(t), None) => t.to_owned(),
        (None, Some(p)) => std::fs::read_to_string(dir.join(p)).expect("patch file"),
        _ => panic!("{}: a patch needs exactly one of patch/path", kpath.display()),
    };
    let ops: Value = serde_saphyr::from_str_with_options(&text, crate::yaml_options()).expect("patch YAML");
    let ops = ops.as_array().unwrap_or_else(|| {
        panic!("{}: only JSON 6902 patches (a list of operations) are supported", kpath.display())
    });
    let mut matched = 0;
    for o in objects.iter_mut().filter(|o| matches_target(o, target)) {
        matched += 1;
        for op in ops {
            apply_op(o, op).unwrap_or_else(|e| panic!("{}: patch on {}: {e}", kpath.display(), id(o)));
        }
    }
    assert!(matched > 0, "{}: patch target {target} matches no object", kpath.display());
}

pub fn matches_target(o: &Value, target: &Value) -> bool {
    let t = target.as_object().expect("patch target is a mapping");
    for key in t.keys() {
        assert!(
            ["group", "version", "kind", "name", "namespace"].contains(&key.as_str()),
            "target field {key}"
        );
    }
    let api = o["apiVersion"].as_str().unwrap_or("");
    let (group, version) = api.rsplit_once('/').unwrap_or(("", api));
    let want = |k: &str, have: &str| t.get(k).and_then(Value::as_str).is_none_or(|w| w == have);
    if let Some(name) = t.get("name").and_then(Value::as_str) {
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "regex targets unsupported: {name}"
        );
    }
    want("group", group)
        && want("version", version)
        && want("kind", o["kind"].as_str().unwrap_or(""))
        && want("name", o["metadata"]["name"].as_str().unwrap_or(""))
        && want("namespace", o["metadata"]["namespace"].as_str().unwrap_or(""))
}

pub fn apply_op(doc: &mut Value, op: &Value) -> Result<(), String> {
    let path = op["path"].as_str().ok_or("op without path")?;
    let (parent, last) = path.rsplit_once('/').ok_or_else(|| format!("bad path {path}"))?;
    let last = last.replace("~1", "/").replace("~0", "~");
    let value = || op.get("value").cloned().ok_or_else(|| format!("{path}: no value"));
    match op["op"].as_str() {
        Some("add") => match doc.pointer_mut(parent).ok_or_else(|| format!("{parent}: no such path"))? {
            Value::Object(m) => {
                m.insert(last, value()?);
            }
            Value::Array(a) if last == "-" => a.push(value()?),
            Value::Array(a) => {
                let i: usize = last.parse().map_err(|_| format!("{path}: bad index"))?;
                if i > a.len() {
                    return Err(format!("{path}: index out of range"));
                }
                a.insert(i, value()?);
            }
            _ => return Err(format!("{parent}: not a container")),
        },
        Some("replace") => *doc.pointer_mut(path).ok_or_else(|| format!("{path}: no such path"))? = value()?,
        Some("remove") => match doc.pointer_mut(parent).ok_or_else(|| format!("{parent}: no such path"))? {
            Value::Object(m) => {
                m.remove(&last).ok_or_else(|| format!("{path}: no such field"))?;
            }
            Value::Array(a) => {
                let i: usize = last.parse().map_err(|_| format!("{path}: bad index"))?;
                if i >= a.len() {
                    return Err(format!("{path}: index out of range"));
                }
                a.remove(i);
            }
            _ => return Err(format!("{parent}: not a container")),
        },
        other => return Err(format!("unsupported op {other:?}")),
    }
    Ok(())
}

/// kustomize's `images:`: name → newName / newTag / digest on every pod template's containers.
pub fn set_image(objects: &mut [Value], image: &Value) {
    let name = image["name"].as_str().expect("images[].name");
    for o in objects.iter_mut() {
        for list in ["containers", "initContainers"] {
            let Some(cs) =
                o.pointer_mut(&format!("/spec/template/spec/{list}")).and_then(Value::as_array_mut)
            else {
                continue;
            };
            for c in cs {
                let current = c["image"].as_str().unwrap_or("").to_owned();
                let (repo, tag) = split_image(&current);
                if repo != name {
                    continue;
                }
                let repo = image["newName"].as_str().unwrap_or(repo);
                let reference = if let Some(d) = image["digest"].as_str() {
                    format!("{repo}@{d}")
                } else if let Some(t) = image["newTag"].as_str() {
                    format!("{repo}:{t}")
                } else {
                    format!("{repo}{tag}")
                };
                c["image"] = Value::String(reference);
            }
        }
    }
}

/// (`repository`, `:tag` or `@digest` or empty).
pub fn split_image(image: &str) -> (&str, &str) {
    if let Some(at) = image.find('@') {
        return image.split_at(at);
    }
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => image.split_at(colon),
        _ => (image, ""),
    }
}
