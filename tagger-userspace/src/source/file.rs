//! The file source: a YAML file of ordinary Kubernetes objects (Pod, Service, EndpointSlice, and
//! optionally this node's Node for its zone), as
//! `kubectl get -o yaml` prints them (a `kind: List` with `items`) or as several `---`
//! documents, or both. Standalone mode for demos, tests and nodes outside Kubernetes. The
//! objects are parsed into [`crate::model::api`]'s types, as the kube watchers parse theirs.
//!
//! A file that does not parse, or holds a Pod/Service/EndpointSlice that does not decode, is
//! rejected whole with an error naming the document and object: the caller keeps its previous
//! snapshot, so nothing already applied is lost to a half-written file. Other kinds are ignored
//! and counted.

use std::{
    collections::BTreeMap,
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex, mpsc::Sender},
};

use tracing::{error, info};

use super::{
    Report, Wake,
    poll::{FileWatch, POLL_INTERVAL},
    queue::{Inputs, send},
};
use crate::model::{
    Change, Kind, LocalPod, Object, ObjectRef,
    api::{EndpointSlice, Node, Pod, Service},
};

/// The objects of one file.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every Pod (local ones are those with `spec.nodeName` equal to the node's name).
    pub pods: Vec<Pod>,
    /// Every Service.
    pub services: Vec<Service>,
    /// Every EndpointSlice.
    pub slices: Vec<EndpointSlice>,
    /// Every Node (the one named like this node gives its zone).
    pub nodes: Vec<Node>,
    /// Objects of other kinds, by kind (ignored).
    pub ignored_kinds: BTreeMap<String, u64>,
}

/// Why a file was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based number of the document among those that hold something (empty documents are not
    /// counted); 0 when the file is not valid YAML (the message gives the line and column).
    pub document: usize,
    /// What went wrong, naming the object when known.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document == 0 {
            f.write_str(&self.message)
        } else {
            write!(f, "document {}: {}", self.document, self.message)
        }
    }
}

impl std::error::Error for ParseError {}

/// Files larger than this (64 MiB) are refused: the agent checks the size before reading
/// ([`super::poll`]), and `parse` refuses longer text. A YAML file of 100,000 endpoints is about
/// 30 MB; parsing takes several times the text's size, which must stay below the container's
/// memory limit.
pub const MAX_FILE_BYTES: usize = 64 * 1024 * 1024;

/// Parses a whole file.
pub fn parse(text: &str) -> Result<Snapshot, ParseError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(ParseError {
            document: 0,
            message: format!("file of {} bytes exceeds the {MAX_FILE_BYTES}-byte limit", text.len()),
        });
    }
    // The parser's budgets (against YAML bombs) sized for a file of MAX_FILE_BYTES: its
    // defaults (250,000 nodes, 1,024 documents) are for configuration files. Aliases keep their
    // defaults. One-line messages, without a source snippet: they go to the log. Booleans are
    // `true`/`false` only (YAML 1.2, as before).
    let options = serde_saphyr::options! {
        with_snippet: false,
        strict_booleans: true,
        budget: serde_saphyr::budget! {
            max_events: 64_000_000,
            max_nodes: 32_000_000,
            max_documents: 1_000_000,
            max_total_scalar_bytes: MAX_FILE_BYTES,
        },
    };
    let docs: Vec<serde_json::Value> = serde_saphyr::from_str_multiple_with_options(text, options)
        .map_err(|e| ParseError { document: 0, message: format!("not valid YAML: {e}") })?;
    let mut snap = Snapshot::default();
    for (i, value) in docs.into_iter().enumerate() {
        add_value(&mut snap, value, i + 1)?;
    }
    Ok(snap)
}

fn add_value(snap: &mut Snapshot, value: serde_json::Value, document: usize) -> Result<(), ParseError> {
    let err = |message: String| ParseError { document, message };
    match value {
        serde_json::Value::Null => Ok(()),
        serde_json::Value::Object(ref map) => {
            let kind = map.get("kind").and_then(serde_json::Value::as_str).unwrap_or("").to_owned();
            let name = object_name(&value);
            match kind.as_str() {
                "List" | "PodList" | "ServiceList" | "EndpointSliceList" | "NodeList" => {
                    let serde_json::Value::Object(mut map) = value else { unreachable!() };
                    match map.remove("items") {
                        Some(serde_json::Value::Array(items)) => {
                            for item in items {
                                add_value(snap, item, document)?;
                            }
                            Ok(())
                        }
                        None | Some(serde_json::Value::Null) => Ok(()),
                        Some(_) => Err(err(format!("{kind}: items is not a list"))),
                    }
                }
                "Pod" => {
                    snap.pods.push(decode(value, &kind, &name).map_err(err)?);
                    Ok(())
                }
                "Service" => {
                    snap.services.push(decode(value, &kind, &name).map_err(err)?);
                    Ok(())
                }
                "EndpointSlice" => {
                    snap.slices.push(decode(value, &kind, &name).map_err(err)?);
                    Ok(())
                }
                "Node" => {
                    snap.nodes.push(decode(value, &kind, &name).map_err(err)?);
                    Ok(())
                }
                "" => Err(err(format!("object {name} has no kind"))),
                other => {
                    *snap.ignored_kinds.entry(other.to_owned()).or_default() += 1;
                    Ok(())
                }
            }
        }
        other => Err(err(format!("expected a Kubernetes object, found {}", json_type(&other)))),
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    kind: &str,
    name: &str,
) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| format!("{kind} {name}: {e}"))
}

fn object_name(value: &serde_json::Value) -> String {
    let meta = value.get("metadata");
    let get = |k: &str| meta.and_then(|m| m.get(k)).and_then(serde_json::Value::as_str);
    match (get("namespace"), get("name")) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => n.to_owned(),
        _ => "(unnamed)".to_owned(),
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Re-reads the source file whenever it changes, and reports its content as a complete list of
/// every kind (the reconciler applies only what changed). A file that does not parse is
/// reported and counted, and the previous state stays in force.
pub async fn watch_source_file(
    path: PathBuf,
    node: String,
    inputs: Arc<Mutex<Inputs>>,
    wake: Sender<Wake>,
    status: Arc<dyn Report>,
) {
    watch_source_file_with(FileWatch::new(path), node, inputs, wake, status).await;
}

async fn watch_source_file_with(
    mut watch: FileWatch,
    node: String,
    inputs: Arc<Mutex<Inputs>>,
    wake: Sender<Wake>,
    status: Arc<dyn Report>,
) {
    let mut last_error = String::new();
    loop {
        match watch.poll() {
            Ok(Some(text)) => match parse(&text) {
                Ok(snapshot) => {
                    for (kind, n) in &snapshot.ignored_kinds {
                        status.count_ignored_kind(kind, *n);
                    }
                    info!(
                        path = %watch.path().display(),
                        pods = snapshot.pods.len(),
                        services = snapshot.services.len(),
                        endpoint_slices = snapshot.slices.len(),
                        "source file loaded"
                    );
                    send(&inputs, &wake, file_changes(&snapshot, &node));
                    status.source_synced();
                    last_error.clear();
                }
                Err(e) => {
                    status.count_source_error();
                    error!(path = %watch.path().display(), "source file rejected, keeping the previous state: {e}");
                }
            },
            Ok(None) => {}
            Err(e) => {
                let msg = e.to_string();
                if msg != last_error {
                    status.count_source_error();
                    error!(path = %watch.path().display(), "cannot read the source file, keeping the previous state: {e}");
                    last_error = msg;
                }
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A file's objects as complete lists of every kind. Every pod's labels are listed (backend
/// lanes); pods with `spec.nodeName` equal to `node` are this node's pods too.
pub fn file_changes(snapshot: &Snapshot, node: &str) -> Vec<Change> {
    let mut local = Vec::new();
    let mut labels = Vec::new();
    for pod in &snapshot.pods {
        let Some(key) = ObjectRef::of(&pod.metadata) else { continue };
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            && let Some(p) = LocalPod::from_pod(pod)
        {
            local.push(Object::LocalPod(p));
        }
        labels.push(Object::Pod(key, pod.metadata.labels.clone().unwrap_or_default()));
    }
    let services = snapshot.services.iter().filter_map(Object::service);
    let slices = snapshot.slices.iter().filter_map(Object::slice);
    let nodes = snapshot.nodes.iter().filter(|n| n.metadata.name.as_deref() == Some(node)).map(Object::node);
    Change::list(Kind::LocalPod, local)
        .chain(Change::list(Kind::Pod, labels))
        .chain(Change::list(Kind::Service, services))
        .chain(Change::list(Kind::Slice, slices))
        .chain(Change::list(Kind::Node, nodes))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECTL_LIST: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: gw-gray
    namespace: demo
    uid: 0b6f6a8e-1d2c-4c1e-9d5a-3f0e2b1c4d5e
    labels:
      tagger.io/lane: gray
  spec:
    nodeName: node-1
    containers:
    - name: gw
      image: example
  status:
    qosClass: BestEffort
- apiVersion: v1
  kind: ConfigMap
  metadata:
    name: unrelated
metadata:
  resourceVersion: ""
"#;

    const DOCS: &str = r"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: a-1
  namespace: demo
  labels: {kubernetes.io/service-name: a}
addressType: IPv4
endpoints:
- addresses: [10.244.0.5]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: a-gray, namespace: demo}
ports: [{name: http, port: 8080, protocol: TCP}]
---
";

    #[test]
    fn reads_kubectl_lists_and_multi_document_files() {
        let s = parse(KUBECTL_LIST).unwrap();
        assert_eq!(s.pods.len(), 1);
        assert_eq!(s.pods[0].metadata.labels.as_ref().unwrap()["tagger.io/lane"], "gray");
        assert_eq!(s.ignored_kinds["ConfigMap"], 1);
        let s = parse(DOCS).unwrap();
        assert_eq!((s.services.len(), s.slices.len()), (1, 1));
        assert_eq!(s.slices[0].endpoints[0].addresses, ["10.244.0.5"]);
        let both = format!("{KUBECTL_LIST}\n---\n{DOCS}");
        let s = parse(&both).unwrap();
        assert_eq!((s.pods.len(), s.services.len(), s.slices.len()), (1, 1, 1));
    }

    /// More documents and nodes than the YAML parser's default budgets (1,024 documents,
    /// 250,000 nodes) allow: a large cluster's file is read whole.
    #[test]
    fn a_large_file_is_within_the_budgets() {
        use std::fmt::Write as _;
        let mut text = String::new();
        for s in 0..1_100 {
            let _ = write!(
                text,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{s}, namespace: n, \
                 labels: {{kubernetes.io/service-name: a}}}}\naddressType: IPv4\nendpoints:\n"
            );
            for e in 0..60 {
                let _ = writeln!(
                    text,
                    "- {{addresses: [10.{}.{}.{e}], conditions: {{ready: true}}}}",
                    s / 256,
                    s % 256
                );
            }
        }
        let snap = parse(&text).unwrap();
        assert_eq!(snap.slices.len(), 1_100);
        assert_eq!(snap.slices.iter().map(|s| s.endpoints.len()).sum::<usize>(), 66_000);
    }

    #[test]
    fn empty_files_are_empty_snapshots() {
        for text in ["", "---\n", "# nothing\n", "---\n---\n"] {
            let s = parse(text).unwrap();
            assert!(s.pods.is_empty() && s.services.is_empty() && s.slices.is_empty());
        }
    }

    #[test]
    fn malformed_input_is_rejected_naming_the_document() {
        let e = parse("kind: Service\nmetadata: {name: a\n").unwrap_err();
        assert_eq!(e.document, 0);
        assert!(e.to_string().starts_with("not valid YAML: ") && e.message.contains("line 2"), "{e}");

        let e = parse(&format!(
            "{DOCS}\n---\nkind: Service\nmetadata: {{name: b, namespace: x}}\nspec: {{ports: 3}}\n"
        ))
        .unwrap_err();
        // DOCS ends with `---`: an empty third document, not counted.
        assert_eq!(e.document, 3, "{e}");
        assert!(e.message.contains("Service x/b"), "{e}");

        let e = parse("- 1\n- 2\n").unwrap_err();
        assert!(e.message.contains("found a list"), "{e}");
        let e = parse("metadata: {name: nokind}\n").unwrap_err();
        assert!(e.message.contains("nokind has no kind"), "{e}");
    }

    #[test]
    fn a_file_over_the_limit_is_refused_and_the_previous_state_kept() {
        let dir = std::env::temp_dir().join(format!("tagger-filewatch-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("source.yaml");
        let ok = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: d}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        std::fs::write(&path, ok).unwrap();
        let limit = 200;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let (inputs, status) =
            (Arc::new(Mutex::new(Inputs::default())), Arc::new(super::super::testing::Counted::default()));
        let (wake_tx, wake_rx) = std::sync::mpsc::channel();
        let task = runtime.spawn(watch_source_file_with(
            FileWatch::with_limit(path.clone(), limit),
            "node".into(),
            Arc::clone(&inputs),
            wake_tx,
            Arc::clone(&status) as Arc<dyn Report>,
        ));
        runtime.block_on(async { tokio::time::sleep(POLL_INTERVAL * 3).await });
        assert!(matches!(wake_rx.try_recv(), Ok(Wake::Changed)), "the first file is applied");
        while wake_rx.try_recv().is_ok() {}
        let applied = format!("{:?}", inputs.lock().unwrap());

        // Over the limit: refused, counted once, nothing queued.
        std::fs::write(&path, format!("{ok}# {}\n", "x".repeat(300))).unwrap();
        runtime.block_on(async { tokio::time::sleep(POLL_INTERVAL * 4).await });
        assert_eq!(status.source_errors(), 1);
        assert!(wake_rx.try_recv().is_err(), "an oversized file must not wake the reconciler");
        assert_eq!(format!("{:?}", inputs.lock().unwrap()), applied);
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();

        let e = FileWatch::with_limit(dir.join("missing"), 1).poll().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
