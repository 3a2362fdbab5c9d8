//! Cgroup v2 discovery: a cgroup's id (what the datapath sees) and depth, and the cgroup v2
//! mount that contains a path.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::{
    Error, Result,
    fs::{CGROUP2_SUPER_MAGIC, fs_type},
};

/// A cgroup v2 directory as the datapath identifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupRef {
    /// The directory.
    pub path: PathBuf,
    /// The cgroup id: the directory's inode number on cgroup2 (what
    /// `bpf_get_current_cgroup_id` returns).
    pub id: u64,
    /// Depth below the cgroup v2 root (the root itself is 0).
    pub level: u32,
}

impl CgroupRef {
    /// The datapath's entry for this cgroup as a pod of `lane`.
    #[must_use]
    pub fn pod_entry(&self, lane: u32) -> tagger_common::PodEntry {
        tagger_common::PodEntry { lane, level: self.level }
    }

    /// Resolves a cgroup v2 directory.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |reason: String| Error::Cgroup { path: path.to_owned(), reason };
        let canonical = fs::canonicalize(path).map_err(|e| err(format!("cannot resolve: {e}")))?;
        if !is_cgroup2(&canonical)? {
            return Err(err(not_cgroup2_reason()));
        }
        let meta = fs::metadata(&canonical).map_err(|e| err(e.to_string()))?;
        if !meta.is_dir() {
            return Err(err("not a directory".into()));
        }
        let root = cgroup2_root_of(&canonical)?;
        let rel = canonical
            .strip_prefix(&root)
            .map_err(|_| err(format!("not below the cgroup2 mount {}", root.display())))?;
        let level = u32::try_from(rel.components().count()).map_err(|_| err("too deep".into()))?;
        Ok(Self { path: canonical, id: meta.ino(), level })
    }
}

/// Kubelet's pods cgroup below the cgroup root: the systemd driver's name, then cgroupfs'.
pub const KUBEPODS_CGROUPS: [&str; 2] = ["kubepods.slice", "kubepods"];

/// Where the datapath attaches, and why there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachPoint {
    /// The cgroup directory.
    pub path: PathBuf,
    /// How it was chosen.
    pub choice: AttachChoice,
}

/// How the attach cgroup was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachChoice {
    /// Kubelet's pods cgroup, found below the cgroup root: tagger's programs run before any
    /// program attached at the root or another ancestor (socket-LB CNIs).
    PodsCgroup,
    /// Named by `--attach-cgroup`.
    Configured,
    /// Neither pods cgroup exists: the cgroup root itself, where programs attached earlier by
    /// others (a socket-LB CNI) run first.
    CgroupRoot,
}

impl AttachChoice {
    /// A short name (logs, metrics, status).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::PodsCgroup => "pods_cgroup",
            Self::Configured => "configured",
            Self::CgroupRoot => "cgroup_root",
        }
    }
}

/// Chooses the attach cgroup: `configured` (absolute, or relative to `cgroup_root`) if given,
/// else the first of [`KUBEPODS_CGROUPS`] that `is_dir` finds below `cgroup_root`, else the
/// root itself.
#[must_use]
pub fn choose_attach_point(
    cgroup_root: &Path,
    configured: Option<&Path>,
    is_dir: impl Fn(&Path) -> bool,
) -> AttachPoint {
    if let Some(c) = configured {
        return AttachPoint { path: cgroup_root.join(c), choice: AttachChoice::Configured };
    }
    KUBEPODS_CGROUPS.iter().map(|name| cgroup_root.join(name)).find(|p| is_dir(p)).map_or_else(
        || AttachPoint { path: cgroup_root.to_owned(), choice: AttachChoice::CgroupRoot },
        |path| AttachPoint { path, choice: AttachChoice::PodsCgroup },
    )
}

/// Why a path that is not on cgroup2 cannot be used, naming a v1-only host when no cgroup2 is
/// mounted at all.
fn not_cgroup2_reason() -> String {
    match cgroup2_mount() {
        Ok(m) => {
            format!("not in a cgroup v2 hierarchy (cgroup2 filesystem; it is mounted at {})", m.display())
        }
        Err(_) => "not in a cgroup v2 hierarchy, and no cgroup2 filesystem is mounted: this is a cgroup \
                   v1-only host. tagger attaches to cgroup v2 only (its hooks are cgroup v2 programs): \
                   boot with systemd.unified_cgroup_hierarchy=1, or mount cgroup2 (a hybrid host's \
                   /sys/fs/cgroup/unified serves) and point --cgroup-root at kubelet's pods there"
            .into(),
    }
}

/// Whether `path` is on a cgroup2 filesystem.
pub fn is_cgroup2(path: &Path) -> Result<bool> {
    Ok(fs_type(path)? == CGROUP2_SUPER_MAGIC)
}

/// The mount point of the cgroup2 filesystem that contains `path` (longest matching mount).
pub fn cgroup2_root_of(path: &Path) -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(|e| Error::io("/proc/self/mountinfo", e))?;
    mountinfo
        .lines()
        .filter_map(parse_cgroup2_mount)
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.components().count())
        .ok_or_else(|| Error::Cgroup { path: path.to_owned(), reason: "no cgroup2 mount contains it".into() })
}

/// The first cgroup2 mount point of this mount namespace (`/sys/fs/cgroup` on a pure v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(|e| Error::io("/proc/self/mountinfo", e))?;
    mountinfo.lines().find_map(parse_cgroup2_mount).ok_or_else(|| Error::Cgroup {
        path: PathBuf::from("/sys/fs/cgroup"),
        reason: "no cgroup2 filesystem is mounted (cgroup v1-only host?)".into(),
    })
}

/// The mount point of a mountinfo line if its filesystem is cgroup2.
fn parse_cgroup2_mount(line: &str) -> Option<PathBuf> {
    // Fields: id parent major:minor root mountpoint options [optional...] - fstype source opts
    let (pre, post) = line.split_once(" - ")?;
    if post.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    let mount_point = pre.split_whitespace().nth(4)?;
    Some(unescape_mountinfo(mount_point))
}

/// Undoes mountinfo's escaping: the kernel (`seq_path`/`mangle_path`) writes space, tab,
/// newline and backslash as a backslash and three octal digits (`\040`, `\011`, `\012`,
/// `\134`). Any `\ooo` of value at most `\377` is decoded; anything else, including a trailing
/// or incomplete escape (`\`, `\04`, `\8`, `\400`), is kept literally. The bytes are kept as they
/// are (a path need not be UTF-8).
fn unescape_mountinfo(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt as _;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if let Some(v) = octal_escape(&b[i..]) {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The byte of a `\ooo` escape at the start of `b` (three octal digits, at most `\377`).
fn octal_escape(b: &[u8]) -> Option<u8> {
    let &[b'\\', d0, d1, d2] = b.get(..4)? else { return None };
    let oct = |c: u8| matches!(c, b'0'..=b'7').then(|| u16::from(c - b'0'));
    u8::try_from(oct(d0)? * 64 + oct(d1)? * 8 + oct(d2)?).ok()
}

/// Finds the directories of cgroup ids (inode numbers) below the cgroup v2 mount `root`,
/// breadth first, at most [`tagger_common::MAX_CGROUP_LEVEL`] deep, stopping once all are found.
#[must_use]
pub fn cgroup_paths(
    root: &Path,
    ids: &std::collections::BTreeSet<u64>,
) -> std::collections::BTreeMap<u64, PathBuf> {
    let mut found = std::collections::BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([(root.to_owned(), 0u32)]);
    while let Some((dir, depth)) = queue.pop_front() {
        if found.len() == ids.len() {
            break;
        }
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        if ids.contains(&meta.ino()) {
            found.insert(meta.ino(), dir.clone());
        }
        if depth >= tagger_common::MAX_CGROUP_LEVEL {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back((e.path(), depth + 1));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_every_octal_escape_and_keeps_broken_ones() {
        let u = |s: &str| unescape_mountinfo(s).into_os_string().into_encoded_bytes();
        assert_eq!(u(r"/a\040b\011c\012d\134e"), b"/a b\tc\nd\\e");
        assert_eq!(u(r"/x\101\000\377"), b"/xA\0\xff");
        // Trailing or incomplete escapes, non-octal digits, values over a byte: kept as written.
        for kept in [r"/a\", r"/a\0", r"/a\04", r"/a\8", r"/a\089", r"/a\400", r"/a\777", r"\\"] {
            assert_eq!(u(kept), kept.as_bytes(), "{kept}");
        }
        assert_eq!(u(r"\\040"), b"\\ ");
    }

    proptest::proptest! {
        /// Escaping any byte path as the kernel does and unescaping gives it back; any input at
        /// all unescapes without a panic.
        #[test]
        fn unescape_inverts_the_kernels_escaping(path in proptest::collection::vec(proptest::num::u8::ANY, 0..64), junk in ".{0,40}") {
            use std::fmt::Write as _;
            let mut escaped = String::new();
            for &c in &path {
                if matches!(c, b' ' | b'\t' | b'\n' | b'\\') || !c.is_ascii() || c.is_ascii_control() {
                    let _ = write!(escaped, "\\{c:03o}");
                } else {
                    escaped.push(char::from(c));
                }
            }
            proptest::prop_assert_eq!(unescape_mountinfo(&escaped).into_os_string().into_encoded_bytes(), path);
            let _ = unescape_mountinfo(&junk);
        }
    }

    #[test]
    fn parses_cgroup2_mountinfo_lines() {
        let line = "35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw";
        assert_eq!(parse_cgroup2_mount(line), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let v1 = "36 25 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(parse_cgroup2_mount(v1), None);
        let esc = "35 25 0:30 / /mnt/a\\040b rw - cgroup2 cgroup2 rw";
        assert_eq!(parse_cgroup2_mount(esc), Some(PathBuf::from("/mnt/a b")));
    }

    #[test]
    fn the_attach_point_is_the_pods_cgroup_then_the_root() {
        let root = Path::new("/sys/fs/cgroup");
        let only = |dirs: &'static [&'static str]| move |p: &Path| dirs.iter().any(|d| p == root.join(d));
        let both = choose_attach_point(root, None, only(&["kubepods.slice", "kubepods"]));
        assert_eq!(both, AttachPoint { path: root.join("kubepods.slice"), choice: AttachChoice::PodsCgroup });
        let cgroupfs = choose_attach_point(root, None, only(&["kubepods"]));
        assert_eq!(cgroupfs.path, root.join("kubepods"));
        let none = choose_attach_point(root, None, only(&[]));
        assert_eq!(none, AttachPoint { path: root.to_owned(), choice: AttachChoice::CgroupRoot });
        // The flag wins, relative to the root or absolute.
        let rel = choose_attach_point(root, Some(Path::new("k3s/kubepods")), only(&["kubepods.slice"]));
        assert_eq!(rel, AttachPoint { path: root.join("k3s/kubepods"), choice: AttachChoice::Configured });
        let abs = choose_attach_point(root, Some(Path::new("/other/pods")), only(&[]));
        assert_eq!(abs.path, Path::new("/other/pods"));
    }
}
