//! What the kernel says about a pinned program link: link and program ids, and the cgroup and
//! attach point of a cgroup link.
//!
//! aya's `FdLink::info()` reports the ids but not the cgroup (and `PinnedLink` does not expose
//! its descriptor), so this asks the kernel directly: `BPF_OBJ_GET` on the pin, then
//! `BPF_OBJ_GET_INFO_BY_FD`. Holding a link descriptor changes nothing: the pin keeps the link
//! attached, and closing our descriptor only drops our reference.

pub use crate::sys::{LinkInfo, link_info};

pub use crate::datapath::attach_type_name;

pub use crate::cgroup::cgroup_paths;

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, os::unix::fs::MetadataExt as _, path::Path};

    use super::*;

    #[test]
    fn a_missing_pin_is_an_io_error() {
        let e = link_info(Path::new("/nonexistent/tagger/links/connect4")).unwrap_err();
        assert!(matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM | libc::ENOSYS)), "{e}");
    }

    #[test]
    fn cgroup_paths_finds_directories_by_inode() {
        let root = std::env::temp_dir().join(format!("tagger-cli-links-{}", std::process::id()));
        let deep = root.join("a/b");
        std::fs::create_dir_all(&deep).unwrap();
        let ino = std::fs::metadata(&deep).unwrap().ino();
        let found = cgroup_paths(&root, &BTreeSet::from([ino, 1]));
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found.get(&ino), Some(&deep));
    }
}
