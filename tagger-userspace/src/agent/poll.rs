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
    max_bytes: u64,
    last_meta: Option<(SystemTime, u64, u64)>,
    last_text: Option<String>,
}

impl FileWatch {
    /// Watches `path`; the first `poll` reports its content. Files over
    /// [`file::MAX_FILE_BYTES`] are refused before they are read.
    pub fn new(path: PathBuf) -> Self {
        Self::with_limit(path, file::MAX_FILE_BYTES as u64)
    }

    /// Watches `path`, refusing files over `max_bytes`.
    pub fn with_limit(path: PathBuf, max_bytes: u64) -> Self {
        Self { path, max_bytes, last_meta: None, last_text: None }
    }

    /// The new content if the file changed since the last call. A file over the limit is an
    /// error, found from its size before anything is read (and a file growing while it is read
    /// is cut at the limit and refused too): its content is never held.
    pub fn poll(&mut self) -> std::io::Result<Option<String>> {
        use std::{io::Read as _, os::unix::fs::MetadataExt as _};
        let meta = std::fs::metadata(&self.path)?;
        let key = (meta.modified()?, meta.len(), meta.ino());
        if self.last_meta == Some(key) {
            return Ok(None);
        }
        let too_large = |size: u64| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("file of {size} bytes is over the {}-byte limit, refused unread", self.max_bytes),
            )
        };
        if meta.len() > self.max_bytes {
            return Err(too_large(meta.len()));
        }
        let mut text = String::new();
        std::fs::File::open(&self.path)?.take(self.max_bytes + 1).read_to_string(&mut text)?;
        if text.len() as u64 > self.max_bytes {
            return Err(too_large(text.len() as u64));
        }
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
    watch_source_file_with(FileWatch::new(path), node, inputs, wake, status).await;
}

async fn watch_source_file_with(
    mut watch: FileWatch,
    node: String,
    inputs: Arc<Mutex<Inputs>>,
    wake: Sender<Wake>,
    status: Arc<AgentStatus>,
) {
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

    #[test]
    fn a_file_over_the_limit_is_refused_and_the_previous_state_kept() {
        let dir = std::env::temp_dir().join(format!("tagger-filewatch-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("source.yaml");
        let ok = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: d}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        std::fs::write(&path, ok).unwrap();
        let limit = 200;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let (inputs, status) = (Arc::new(Mutex::new(Inputs::default())), Arc::new(AgentStatus::default()));
        let (wake_tx, wake_rx) = std::sync::mpsc::channel();
        let task = runtime.spawn(watch_source_file_with(
            FileWatch::with_limit(path.clone(), limit),
            "node".into(),
            Arc::clone(&inputs),
            wake_tx,
            Arc::clone(&status),
        ));
        runtime.block_on(async { tokio::time::sleep(POLL_INTERVAL * 3).await });
        assert!(matches!(wake_rx.try_recv(), Ok(Wake::Changed)), "the first file is applied");
        while wake_rx.try_recv().is_ok() {}
        let applied = format!("{:?}", inputs.lock().unwrap());

        // Over the limit: refused, counted once, nothing queued.
        std::fs::write(&path, format!("{ok}# {}\n", "x".repeat(300))).unwrap();
        runtime.block_on(async { tokio::time::sleep(POLL_INTERVAL * 4).await });
        assert_eq!(status.snapshot().source_errors, 1);
        assert!(wake_rx.try_recv().is_err(), "an oversized file must not wake the reconciler");
        assert_eq!(format!("{:?}", inputs.lock().unwrap()), applied);
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();

        let e = FileWatch::with_limit(dir.join("missing"), 1).poll().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn the_size_is_checked_before_reading() {
        let dir = std::env::temp_dir().join(format!("tagger-filewatch-size-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big");
        // Sparse: 1 TiB that would take forever (and all memory) to read.
        std::fs::File::create(&path).unwrap().set_len(1 << 40).unwrap();
        let e = FileWatch::new(path).poll().unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("over the 67108864-byte limit, refused unread"), "{e}");
    }
}
