//! Before attaching: programs on tagger's hooks at the attach cgroup or an ancestor that were
//! attached without `BPF_F_ALLOW_MULTI`. The kernel skips an ancestor's `override` programs for
//! a subtree once a program is attached below (`compute_effective_progs`): attaching tagger at
//! kubelet's pods cgroup would silently stop such a program (a socket LB at the root) for every
//! pod. An `exclusive` one (no flag) makes the kernel refuse the attach with a bare EPERM. Both
//! are refused here, naming the program, before anything is attached.

use std::{fs::File, os::fd::AsFd as _, path::PathBuf};

use super::{attach_type, attach_type_name};
use crate::{
    Error, Result,
    cgroup::{CgroupRef, cgroup2_root_of},
    sys::{BPF_F_ALLOW_MULTI, BPF_F_ALLOW_OVERRIDE, cgroup_query},
};

/// The programs attached at one cgroup on one hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Attached {
    /// The cgroup.
    pub cgroup: PathBuf,
    /// The hook (`bpf_attach_type`).
    pub attach_type: u32,
    /// The cgroup's attach flags for it.
    pub flags: u32,
    /// Program ids.
    pub prog_ids: Vec<u32>,
}

/// Why attaching below these would break another program, if it would (the first found).
pub(super) fn refusal(attached: &[Attached]) -> Option<String> {
    let a = attached.iter().find(|a| !a.prog_ids.is_empty() && a.flags & BPF_F_ALLOW_MULTI == 0)?;
    let ids: Vec<String> = a.prog_ids.iter().map(ToString::to_string).collect();
    let what = if a.flags & BPF_F_ALLOW_OVERRIDE != 0 {
        "attached with BPF_F_ALLOW_OVERRIDE: a program attached below it replaces it, so attaching tagger \
         would stop it for every pod"
    } else {
        "attached exclusively (no BPF_F_ALLOW_MULTI): the kernel refuses any other program on this hook \
         below it"
    };
    Some(format!(
        "program id {} on hook {} of {} is {what}. Attach it with BPF_F_ALLOW_MULTI or a BPF link (as \
         current socket-LB CNIs do), or see `bpftool cgroup tree`",
        ids.join(", "),
        attach_type_name(a.attach_type).map_or_else(|| a.attach_type.to_string(), str::to_owned),
        a.cgroup.display()
    ))
}

/// Refuses (before anything is attached) an attach of `programs` at `cgroup` that another
/// program's attach flags at `cgroup` or an ancestor would make fail or make harmful. A hook
/// that cannot be queried is skipped (the attach itself then reports what the kernel says).
pub(super) fn check(cgroup: &CgroupRef, programs: &[&'static str]) -> Result<()> {
    let root = cgroup2_root_of(&cgroup.path)?;
    let mut attached = Vec::new();
    for dir in cgroup.path.ancestors().take_while(|p| p.starts_with(&root)) {
        let Ok(file) = File::open(dir) else { continue };
        for kind in programs.iter().filter_map(|p| attach_type(p)) {
            match cgroup_query(file.as_fd(), kind, false) {
                Ok(q) => attached.push(Attached {
                    cgroup: dir.to_owned(),
                    attach_type: kind,
                    flags: q.attach_flags,
                    prog_ids: q.prog_ids,
                }),
                Err(e) => log::warn!("querying hook {kind} of {}: {e}", dir.display()),
            }
        }
    }
    match refusal(&attached) {
        Some(reason) => Err(Error::Cgroup { path: cgroup.path.clone(), reason }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(cgroup: &str, flags: u32, ids: &[u32]) -> Attached {
        Attached { cgroup: cgroup.into(), attach_type: 10, flags, prog_ids: ids.to_vec() }
    }

    #[test]
    fn only_programs_without_multi_refuse_an_attach_below_them() {
        assert_eq!(refusal(&[at("/k", 0, &[]), at("/", BPF_F_ALLOW_MULTI, &[5, 6])]), None);
        let r = refusal(&[at("/k", 0, &[]), at("/", BPF_F_ALLOW_OVERRIDE, &[5])]).expect("override");
        assert!(
            r.contains("program id 5 on hook cgroup_inet4_connect of /")
                && r.contains("stop it for every pod"),
            "{r}"
        );
        let r = refusal(&[at("/", 0, &[7])]).expect("exclusive");
        assert!(r.contains("program id 7") && r.contains("exclusively"), "{r}");
        // Flags left from programs since detached mean nothing.
        assert_eq!(refusal(&[at("/", BPF_F_ALLOW_OVERRIDE, &[])]), None);
    }
}
