//! Files polled for changes: the YAML source file ([`super::file`]) and the lanes config.
//! Polling (not inotify) follows ConfigMap volume updates, which swap a symlink, and costs one
//! `stat` per period while nothing changes.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc::Sender},
    time::{Duration, SystemTime},
};

use tracing::{error, info};

use super::{Report, Wake, file};
use crate::{config::lanes::LanesConfig, model::lanes::LaneSettings};

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

/// Reloads the lanes config whenever it changes and turns it into desired state
/// ([`LaneSettings`]); an invalid config is reported and counted and the previous one stays in
/// force.
pub async fn watch_lanes_config(
    path: PathBuf,
    lanes: Arc<Mutex<LaneSettings>>,
    wake: Sender<Wake>,
    status: Arc<dyn Report>,
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
                    *lanes.lock().expect("lanes lock") = LaneSettings::of(&cfg);
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
