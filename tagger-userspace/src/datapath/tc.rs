//! TC lane marking: attaches the `lane_mark` classifier (tagger-ebpf `mark.rs`) to the network
//! interfaces whose names match the operator's globs, in this process's network namespace.
//!
//! - **TCX** (Linux ≥ 6.6, probed by trying it): one BPF link per interface and direction,
//!   pinned as `<bpffs>/links/tc-<ingress|egress>-<interface>`, so marking survives an agent
//!   restart; a later agent switches each pinned link to its own build's program
//!   (`BPF_LINK_UPDATE`), and removes pins of interfaces that went away.
//! - **netlink** (older kernels): a `clsact` qdisc and a direct-action cls_bpf filter named
//!   `lane_mark`; it stays while the agent is down; a later agent replaces filters of that name
//!   (a moment without marking on each interface) and uninstall removes them.
//!
//! New interfaces (pod veths appear all the time) are picked up by [`Marker::sync`], which the
//! agent calls every few seconds.

use std::{
    collections::BTreeSet,
    fmt, fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, LinkOrder},
    tc::{NlOptions, TcAttachOptions, qdisc_add_clsact, qdisc_detach_program},
};
use tagger_common::{MAP_LANE_MARKS, MAP_POD_ADDRS};

use super::{BpfLog, DATAPATH_OBJECT, LogRing, PinLayout};
use crate::{Error, Result};

/// The classifier's name in the object (and of its netlink filters).
pub const MARK_PROGRAM: &str = "lane_mark";
/// Prefix of the TCX link pins in the links directory.
const PIN_PREFIX: &str = "tc-";

/// Which way the marked packets flow through the interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkDirection {
    /// Packets the interface receives: on the host side of a pod's veth, the pod's packets,
    /// marked before routing and queueing.
    Ingress,
    /// Packets the interface sends (a node uplink).
    Egress,
}

impl MarkDirection {
    fn attach_type(self) -> TcAttachType {
        match self {
            Self::Ingress => TcAttachType::Ingress,
            Self::Egress => TcAttachType::Egress,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

impl std::str::FromStr for MarkDirection {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ingress" => Ok(Self::Ingress),
            "egress" => Ok(Self::Egress),
            _ => Err(format!("{s:?}: the marking direction is `ingress` or `egress`")),
        }
    }
}

/// How the program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkMode {
    /// TCX links (Linux ≥ 6.6), pinned.
    Tcx,
    /// netlink clsact filters.
    Netlink,
}

impl fmt::Display for MarkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        })
    }
}

/// Validates interface-name globs (`*` and `?` wildcards; at most 15 characters of name).
pub fn parse_globs(spec: &str) -> std::result::Result<Vec<String>, String> {
    let globs: Vec<String> =
        spec.split(',').map(str::trim).filter(|g| !g.is_empty()).map(str::to_owned).collect();
    for g in &globs {
        if g.len() > 64 || !g.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@:*?".contains(&b)) {
            return Err(format!(
                "{g:?}: an interface glob has letters, digits, `-_.@:` and the wildcards `*` and `?`"
            ));
        }
    }
    Ok(globs)
}

/// Whether `name` matches `glob` (`*`: any run of characters, `?`: one character).
#[must_use]
pub fn glob_match(glob: &str, name: &str) -> bool {
    fn go(g: &[u8], n: &[u8]) -> bool {
        match (g.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&g[1..], n) || (!n.is_empty() && go(g, &n[1..])),
            (Some(b'?'), Some(_)) => go(&g[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&g[1..], &n[1..]),
            _ => false,
        }
    }
    go(glob.as_bytes(), name.as_bytes())
}

/// The interfaces of the calling thread's network namespace, sorted.
fn interfaces() -> Vec<String> {
    let mut out = crate::sys::interface_names();
    out.sort();
    out
}

/// The loaded marking program and where it is attached.
pub struct Marker {
    ebpf: aya::Ebpf,
    /// Its log ring, when loaded with the debug log on.
    log_ring: Option<LogRing>,
    layout: PinLayout,
    direction: MarkDirection,
    mode: MarkMode,
    globs: Vec<String>,
    attached: BTreeSet<String>,
}

impl fmt::Debug for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Marker")
            .field("direction", &self.direction)
            .field("mode", &self.mode)
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl Marker {
    /// Loads the program against the installed datapath's pinned address and lane-mark maps.
    /// `mode`: `None` probes (TCX if the kernel has it, else netlink).
    pub fn load(
        bpffs_dir: &Path,
        globs: Vec<String>,
        direction: MarkDirection,
        mode: Option<MarkMode>,
    ) -> Result<Self> {
        Self::load_with(bpffs_dir, globs, direction, mode, BpfLog::Off)
    }

    /// [`Marker::load`] with the datapath's debug log at `log` (marks are logged at trace);
    /// [`Marker::take_log_ring`] gives the program's ring.
    pub fn load_with(
        bpffs_dir: &Path,
        globs: Vec<String>,
        direction: MarkDirection,
        mode: Option<MarkMode>,
        log: BpfLog,
    ) -> Result<Self> {
        let layout = PinLayout::new(bpffs_dir);
        let (addrs, marks) = (layout.map(MAP_POD_ADDRS), layout.map(MAP_LANE_MARKS));
        let mut loader = aya::EbpfLoader::new();
        // Only these two maps are shared; the program uses no other map but its log ring.
        loader.map_pin_path(MAP_POD_ADDRS, addrs.as_path());
        loader.map_pin_path(MAP_LANE_MARKS, marks.as_path());
        log.configure(&mut loader);
        let mut ebpf = loader.load(DATAPATH_OBJECT).map_err(Box::new)?;
        let log_ring = log.is_on().then(|| LogRing::take(&mut ebpf)).transpose()?;
        let program = classifier(&mut ebpf)?;
        program
            .load()
            .map_err(|source| Error::Program { program: MARK_PROGRAM, source: Box::new(source) })?;
        let mode = mode.unwrap_or_else(probe);
        Ok(Self { ebpf, log_ring, layout, direction, mode, globs, attached: BTreeSet::new() })
    }

    /// The program's log ring when loaded with the debug log on (once), for
    /// [`super::bpf_log::forward`].
    pub fn take_log_ring(&mut self) -> Option<LogRing> {
        self.log_ring.take()
    }

    /// The attach mode in use.
    #[must_use]
    pub fn mode(&self) -> MarkMode {
        self.mode
    }

    /// Interfaces the program is attached to.
    #[must_use]
    pub fn attached(&self) -> &BTreeSet<String> {
        &self.attached
    }

    /// Attaches to every matching interface not attached yet (replacing what an earlier agent
    /// left); forgets interfaces that went away. Returns the errors, per interface.
    pub fn sync(&mut self) -> Vec<(String, Error)> {
        let present = interfaces();
        self.attached.retain(|i| present.contains(i));
        let wanted: Vec<String> = present
            .iter()
            .filter(|i| self.globs.iter().any(|g| glob_match(g, i)) && !self.attached.contains(*i))
            .cloned()
            .collect();
        if self.mode == MarkMode::Tcx {
            self.remove_pins_of_gone(&present);
        }
        let mut errors = Vec::new();
        for iface in wanted {
            match self.attach(&iface) {
                Ok(()) => {
                    self.attached.insert(iface);
                }
                Err(e) => errors.push((iface, e)),
            }
        }
        errors
    }

    fn pin(&self, iface: &str) -> PathBuf {
        link_pin(&self.layout, self.direction, iface)
    }

    fn attach(&mut self, iface: &str) -> Result<()> {
        let (direction, mode, pin) = (self.direction, self.mode, self.pin(iface));
        let program = classifier(&mut self.ebpf)?;
        let err = |e: String| Error::Invalid { what: "lane marking", reason: format!("{iface}: {e}") };
        match mode {
            MarkMode::Tcx => {
                if let Ok(link) = crate::sys::obj_get(&pin, 0) {
                    // An earlier agent's link: switch it to this build's program.
                    let fd = program.fd().map_err(|e| err(e.to_string()))?;
                    if crate::sys::link_update(link.as_fd(), fd.as_fd()).is_ok() {
                        return Ok(());
                    }
                    let _ = fs::remove_file(&pin);
                }
                let options = TcAttachOptions::TcxOrder(LinkOrder::default());
                let id = program
                    .attach_with_options(iface, direction.attach_type(), options)
                    .map_err(|e| err(e.to_string()))?;
                let link = program.take_link(id).map_err(|e| err(e.to_string()))?;
                let fd_link = FdLink::try_from(link).map_err(|e| err(e.to_string()))?;
                fd_link.pin(&pin).map_err(|e| Error::Pin { path: pin.clone(), reason: e.to_string() })?;
            }
            MarkMode::Netlink => {
                match qdisc_add_clsact(iface) {
                    Ok(()) => {}
                    // Already there (ours or another tool's): fine.
                    Err(e) if e.to_string().contains("exists") => {}
                    Err(e) => return Err(err(format!("adding the clsact qdisc: {e}"))),
                }
                let _ = qdisc_detach_program(iface, direction.attach_type(), MARK_PROGRAM);
                let options = TcAttachOptions::Netlink(NlOptions::default());
                let id = program
                    .attach_with_options(iface, direction.attach_type(), options)
                    .map_err(|e| err(e.to_string()))?;
                // The filter stays when this process exits: keep aya from detaching it.
                let link = program.take_link(id).map_err(|e| err(e.to_string()))?;
                std::mem::forget(link);
            }
        }
        Ok(())
    }

    /// Runs the loaded program once on `frame` (an Ethernet frame) whose `skb->mark` is `mark`,
    /// without attaching it (`BPF_PROG_TEST_RUN`), and returns the mark it leaves: what the
    /// kernel tests use to check that only the bits under `--mark-mask` change.
    pub fn test_run(&mut self, frame: &[u8], mark: u32) -> Result<u32> {
        let program = classifier(&mut self.ebpf)?;
        let fd = program.fd().map_err(|e| Error::Invalid { what: "lane marking", reason: e.to_string() })?;
        crate::sys::skb_test_run(fd.as_fd(), frame, mark)
            .map_err(|e| Error::Invalid { what: "lane marking test run", reason: e.to_string() })
    }

    /// Removes TCX link pins of interfaces that no longer exist (the kernel already detached
    /// their links).
    fn remove_pins_of_gone(&self, present: &[String]) {
        let prefix = format!("{PIN_PREFIX}{}-", self.direction.name());
        let Ok(dir) = fs::read_dir(self.layout.links_dir()) else { return };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix(&prefix)
                && !present.iter().any(|p| p == iface)
            {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

fn classifier(ebpf: &mut aya::Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(MARK_PROGRAM).and_then(|p| <&mut SchedClassifier>::try_from(p).ok()).ok_or_else(|| {
        Error::Invalid { what: "datapath object", reason: format!("program {MARK_PROGRAM} missing") }
    })
}

/// Pin path of one interface's TCX link.
fn link_pin(layout: &PinLayout, direction: MarkDirection, iface: &str) -> PathBuf {
    layout.links_dir().join(format!("{PIN_PREFIX}{}-{iface}", direction.name()))
}

/// Whether TCX links exist on this kernel: `BPF_PROG_QUERY` with a TCX attach type on the
/// loopback interface answers EINVAL before 6.6.
#[must_use]
pub fn probe() -> MarkMode {
    if crate::sys::tcx_query(1).is_ok() { MarkMode::Tcx } else { MarkMode::Netlink }
}

/// The interfaces marked now, by mode, for `tagger status`: TCX link pins, and netlink
/// filters named `lane_mark` are not listed (they hold no pin).
#[must_use]
pub fn pinned_interfaces(layout: &PinLayout) -> Vec<(String, String)> {
    let Ok(dir) = fs::read_dir(layout.links_dir()) else { return Vec::new() };
    let mut out: Vec<(String, String)> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix(PIN_PREFIX)?;
            let (direction, iface) = rest.split_once('-')?;
            Some((iface.to_owned(), direction.to_owned()))
        })
        .collect();
    out.sort();
    out
}

/// Detaches and unpins every TCX marking link, and removes `lane_mark` netlink filters from
/// this namespace's interfaces (uninstall).
pub fn remove_all(layout: &PinLayout) -> io::Result<()> {
    if let Ok(dir) = fs::read_dir(layout.links_dir()) {
        for entry in dir.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(PIN_PREFIX) {
                continue;
            }
            if let Ok(fd) = crate::sys::obj_get(&entry.path(), 0) {
                let _ = crate::sys::link_detach(fd.as_fd());
            }
            fs::remove_file(entry.path())?;
        }
    }
    for iface in interfaces() {
        for t in [TcAttachType::Ingress, TcAttachType::Egress] {
            let _ = qdisc_detach_program(&iface, t, MARK_PROGRAM);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth12ab"));
        assert!(glob_match("p?", "p2") && !glob_match("p?", "p12"));
        assert!(glob_match("*", "eth0") && !glob_match("cali*", "eth0"));
        assert_eq!(parse_globs("cali*, lxc*,").unwrap(), ["cali*", "lxc*"]);
        assert!(parse_globs("eth0;rm").is_err());
        assert_eq!("egress".parse::<MarkDirection>(), Ok(MarkDirection::Egress));
        assert!("both".parse::<MarkDirection>().is_err());
    }
}
