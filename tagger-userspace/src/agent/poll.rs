//! File sources: the YAML source file and the lanes config, polled for changes. Polling (not
//! inotify) follows ConfigMap volume updates, which swap a symlink, and costs one `stat` per
//! period while nothing changes.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc::Sender},
    time::{Duration, SystemTime},
};

use tracing::{error, info};

use super::{Inputs, Wake, inputs::send, status::AgentStatus};
use crate::{
    lanes_config::LanesConfig,
    model::{Change, Kind, LocalPod, Object, ObjectRef, ServiceInput, SliceInput},
    source::file,
};

/// How often the files are checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Detects content changes of a file (metadata first, then the bytes).
#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    last_meta: Option<(SystemTime, u64, u64)>,
    last_text: Option<String>,
}

impl FileWatch {
    /// Watches `path`; the first `poll` reports its content.
    pub fn new(path: PathBuf) -> Self {
        Self { path, last_meta: None, last_text: None }
    }

    /// The new content if the file changed since the last call.
    pub fn poll(&mut self) -> std::io::Result<Option<String>> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(&self.path)?;
        let key = (meta.modified()?, meta.len(), meta.ino());
        if self.last_meta == Some(key) {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&self.path)?;
        self.last_meta = Some(key);
        if self.last_text.as_deref() == Some(text.as_str()) {
            return Ok(None);
        }
        self.last_text = Some(text.clone());
        Ok(Some(text))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
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
    status: Arc<AgentStatus>,
) {
    let mut watch = FileWatch::new(path);
    let mut last_error = String::new();
    loop {
        match watch.poll() {
            Ok(Some(text)) => match file::parse(&text) {
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
pub(crate) fn file_changes(snapshot: &file::Snapshot, node: &str) -> Vec<Change> {
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
    let services = snapshot.services.iter().filter_map(|svc| {
        let key = ObjectRef::of(&svc.metadata)?;
        let input = ServiceInput::new(&key, svc);
        Some(Object::Service(key, input))
    });
    let slices = snapshot.slices.iter().filter_map(|slice| {
        let key = ObjectRef::of(&slice.metadata)?;
        let input = SliceInput::new(&key, slice);
        Some(Object::Slice(key, input))
    });
    let nodes = snapshot.nodes.iter().filter(|n| n.metadata.name.as_deref() == Some(node)).map(|n| {
        Object::Node(
            n.metadata.labels.as_ref().and_then(|l| l.get(crate::model::topology::ZONE_LABEL)).cloned(),
        )
    });
    Change::list(Kind::LocalPod, local)
        .chain(Change::list(Kind::Pod, labels))
        .chain(Change::list(Kind::Service, services))
        .chain(Change::list(Kind::Slice, slices))
        .chain(Change::list(Kind::Node, nodes))
        .collect()
}

/// Reloads the lanes config whenever it changes; an invalid config is reported and counted and
/// the previous one stays in force.
pub async fn watch_lanes_config(
    path: PathBuf,
    lanes: Arc<Mutex<LanesConfig>>,
    wake: Sender<Wake>,
    status: Arc<AgentStatus>,
) {
    let mut watch = FileWatch::new(path);
    // The config was loaded at start; the first poll only records it.
    let _ = watch.poll();
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        match watch.poll() {
            Ok(Some(text)) => match LanesConfig::parse(&text) {
                Ok(cfg) => {
                    info!(path = %watch.path().display(), "lanes config reloaded");
                    *lanes.lock().expect("lanes lock") = cfg;
                    let _ = wake.send(Wake::Changed);
                }
                Err(e) => {
                    status.count_config_error();
                    error!(path = %watch.path().display(), "lanes config rejected, keeping the previous one: {e}");
                }
            },
            Ok(None) => {}
            Err(e) => {
                status.count_config_error();
                error!(path = %watch.path().display(), "cannot read the lanes config, keeping the previous one: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_watch_reports_changes_once() {
        let dir = std::env::temp_dir().join(format!("tagger-filewatch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.yaml");
        std::fs::write(&path, "a").unwrap();
        let mut w = FileWatch::new(path.clone());
        assert_eq!(w.poll().unwrap().as_deref(), Some("a"));
        assert_eq!(w.poll().unwrap(), None);
        std::fs::write(&path, "bb").unwrap();
        assert_eq!(w.poll().unwrap().as_deref(), Some("bb"));
        // Rewritten with the same content: not a change.
        std::fs::write(&path, "bb").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(w.poll().unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
