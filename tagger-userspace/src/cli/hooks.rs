//! `tagger status`'s view of the hooks tagger shares with others: every program that runs on each
//! of tagger's cgroup hooks for tagger's attach cgroup, in the order the kernel runs them, and
//! the cgroup each is attached at (tagger's attach cgroup and its ancestors up to the cgroup v2
//! mount root).
//!
//! The kernel runs a cgroup's own programs first, then each ancestor's up to the root
//! (`compute_effective_progs`); programs on one cgroup run in attach order. An ancestor whose
//! programs were attached without `BPF_F_ALLOW_MULTI` is skipped once a descendant has programs
//! (`override`), and one attached exclusively (no flag) refuses attaching below it. So a socket
//! LB attached at the root runs after tagger attached at kubelet's pods cgroup, and one attached
//! at the same cgroup before tagger runs first.
//!
//! Only reads: `BPF_PROG_QUERY` (the effective list of the attach cgroup, then the programs
//! attached at each ancestor, with its attach flags) and program info by id. Opening a program
//! by id needs CAP_SYS_ADMIN: without it the names are missing and a note says why.

use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::links::attach_type_name;
use crate::{
    datapath::attach_type,
    sys::{BPF_F_ALLOW_MULTI, BPF_F_ALLOW_OVERRIDE, cgroup_query, prog_info},
};

/// Where tagger attaches and what shares its hooks.
#[derive(Debug, Serialize)]
pub struct AttachReport {
    /// tagger's attach cgroup (the directory, as this process sees it).
    pub cgroup_path: String,
    /// Its depth below the cgroup v2 mount root (0: the root itself).
    pub level: usize,
    /// Attached at the cgroup root: programs attached there earlier (a socket-LB CNI's) run
    /// before tagger's.
    pub at_cgroup_root: bool,
    /// One entry per tagger program.
    pub hooks: Vec<HookReport>,
    /// Programs of others that run before tagger's, over all hooks.
    pub others_before_tagger: usize,
    /// Programs of others on tagger's hooks at its cgroup or above, over all hooks.
    pub others: usize,
    /// Why some programs have no name (opening a program by id needs CAP_SYS_ADMIN), if so.
    pub note: Option<String>,
}

/// One of tagger's hooks.
#[derive(Debug, Serialize)]
pub struct HookReport {
    /// tagger's program on it.
    pub program: &'static str,
    /// The kernel's attach type.
    pub attach_type: String,
    /// Every program that runs on this hook for tagger's cgroup, in run order, then those
    /// attached at an ancestor that do not run (overridden).
    pub programs: Vec<HookProgram>,
    /// Why the hook could not be queried, if it could not.
    pub error: Option<String>,
}

/// A program on a hook.
#[derive(Clone, Debug, Serialize)]
pub struct HookProgram {
    /// Position in the run order (1 runs first); null: attached at an ancestor but overridden
    /// below it, so it does not run for tagger's cgroup.
    pub order: Option<usize>,
    /// Kernel program id.
    pub program_id: u32,
    /// Its name (null when it cannot be read).
    pub name: Option<String>,
    /// Its program type (`cgroup_sock_addr`, ...).
    pub prog_type: Option<String>,
    /// The cgroup it is attached at; null when above the cgroup tree this process sees.
    pub attached_at: Option<String>,
    /// That cgroup's attach flags for this hook: `multi`, `override` or `exclusive`.
    pub attach_flags: Option<String>,
    /// One of tagger's own programs.
    pub tagger: bool,
}

/// Queries the hooks of `cgroup` (tagger's attach cgroup) and its ancestors up to `mount_root`.
/// `own` are the program ids behind tagger's link pins.
#[must_use]
pub fn collect(cgroup: &Path, mount_root: &Path, programs: &[&'static str], own: &[u32]) -> AttachReport {
    let chain: Vec<PathBuf> =
        cgroup.ancestors().take_while(|p| p.starts_with(mount_root)).map(Path::to_owned).collect();
    let dirs: Vec<(PathBuf, Option<File>)> =
        chain.into_iter().map(|p| (p.clone(), File::open(&p).ok())).collect();
    let mut names: BTreeMap<u32, Option<crate::sys::ProgInfo>> = BTreeMap::new();
    let mut no_names = None;
    let mut hooks = Vec::new();
    for &program in programs {
        let Some(kind) = attach_type(program) else { continue };
        let hook = hook_report(program, kind, &dirs, own);
        for p in hook.programs.iter().filter(|p| !p.tagger) {
            names.entry(p.program_id).or_insert_with(|| match prog_info(p.program_id) {
                Ok(info) => Some(info),
                Err(e) => {
                    no_names.get_or_insert_with(|| format!("program names unreadable ({e}): opening a program by id needs CAP_SYS_ADMIN; `bpftool prog show id ID` as root names them"));
                    None
                }
            });
        }
        hooks.push(hook);
    }
    for p in hooks.iter_mut().flat_map(|h| h.programs.iter_mut()) {
        let info = if p.tagger { Some(None) } else { names.get(&p.program_id).cloned() };
        if let Some(Some(info)) = info {
            p.name = Some(info.name);
            p.prog_type = Some(prog_type_name(info.prog_type));
        }
    }
    let others = hooks.iter().flat_map(|h| &h.programs).filter(|p| !p.tagger).count();
    let others_before_tagger = hooks.iter().map(|h| before_tagger(&h.programs)).sum();
    AttachReport {
        cgroup_path: cgroup.display().to_string(),
        level: dirs.len().saturating_sub(1),
        at_cgroup_root: cgroup == mount_root,
        hooks,
        others_before_tagger,
        others,
        note: no_names,
    }
}

/// Others' programs that run before the first of tagger's on one hook.
#[must_use]
pub fn before_tagger(programs: &[HookProgram]) -> usize {
    programs.iter().filter(|p| p.order.is_some()).take_while(|p| !p.tagger).count()
}

/// The run order on one hook: the effective list of the attach cgroup (`dirs[0]`), each program
/// placed at the nearest cgroup of `dirs` it is attached at; then programs attached at an
/// ancestor that do not run for it.
fn hook_report(
    program: &'static str,
    kind: u32,
    dirs: &[(PathBuf, Option<File>)],
    own: &[u32],
) -> HookReport {
    let attach_type = attach_type_name(kind).map_or_else(|| kind.to_string(), str::to_owned);
    let mut report = HookReport { program, attach_type, programs: Vec::new(), error: None };
    let Some((path, Some(dir))) = dirs.first() else {
        report.error = Some(format!(
            "cannot open {}",
            dirs.first().map_or_else(String::new, |d| d.0.display().to_string())
        ));
        return report;
    };
    let effective = match cgroup_query(dir.as_fd(), kind, true) {
        Ok(q) => q.prog_ids,
        Err(e) => {
            report.error = Some(format!("querying {}: {e}", path.display()));
            return report;
        }
    };
    // Where each program is attached, nearest cgroup first.
    let mut attached: Vec<(u32, &Path, u32)> = Vec::new();
    for (path, dir) in dirs {
        let Some(dir) = dir else { continue };
        if let Ok(q) = cgroup_query(dir.as_fd(), kind, false) {
            attached.extend(q.prog_ids.iter().map(|&id| (id, path.as_path(), q.attach_flags)));
        }
    }
    let entry = |id: u32, order: Option<usize>| {
        let at = attached.iter().find(|a| a.0 == id);
        HookProgram {
            order,
            program_id: id,
            name: own.contains(&id).then(|| program.to_owned()),
            prog_type: own.contains(&id).then(|| own_prog_type(kind).to_owned()),
            attached_at: at.map(|a| a.1.display().to_string()),
            attach_flags: at.map(|a| flags_name(a.2).to_owned()),
            tagger: own.contains(&id),
        }
    };
    report.programs = effective.iter().enumerate().map(|(i, &id)| entry(id, Some(i + 1))).collect();
    for &(id, ..) in &attached {
        if !effective.contains(&id) && !report.programs.iter().any(|p| p.program_id == id) {
            report.programs.push(entry(id, None));
        }
    }
    report
}

/// A cgroup's attach flags for a hook, by name.
#[must_use]
pub fn flags_name(flags: u32) -> &'static str {
    if flags & BPF_F_ALLOW_MULTI != 0 {
        "multi"
    } else if flags & BPF_F_ALLOW_OVERRIDE != 0 {
        "override"
    } else {
        "exclusive"
    }
}

/// The program type of tagger's own program on a hook.
fn own_prog_type(attach_type: u32) -> &'static str {
    match attach_type {
        3 => "sock_ops",
        34 => "cgroup_sock",
        _ => "cgroup_sock_addr",
    }
}

/// The kernel's name of a program type (`bpf_prog_type`) that can sit on a cgroup hook.
fn prog_type_name(t: u32) -> String {
    match t {
        8 => "cgroup_skb".into(),
        9 => "cgroup_sock".into(),
        13 => "sock_ops".into(),
        18 => "cgroup_sock_addr".into(),
        other => format!("type {other}"),
    }
}

/// Prints the hooks table (under `tagger status`'s other tables).
pub fn print(r: &AttachReport) {
    let place = if r.at_cgroup_root {
        "the cgroup ROOT: programs attached there earlier (a socket-LB CNI) run before tagger's".to_owned()
    } else {
        format!(
            "level {}: programs attached at its ancestors (the root's socket LBs) run after tagger's",
            r.level
        )
    };
    println!("attached at {} ({place})", r.cgroup_path);
    if r.others == 0 {
        println!("no other program on tagger's hooks at {} or above", r.cgroup_path);
    } else {
        let mut t = super::render::table(
            &["hook", "order", "prog", "name", "type", "attached at", "flags", ""],
            &[1, 2],
        );
        for h in &r.hooks {
            if h.programs.iter().all(|p| p.tagger) && h.error.is_none() {
                continue;
            }
            if let Some(e) = &h.error {
                t.add_row(vec![h.attach_type.clone(), String::new(), String::new(), e.clone()]);
            }
            for p in &h.programs {
                t.add_row(vec![
                    h.attach_type.clone(),
                    p.order.map_or_else(|| "(overridden)".to_owned(), |o| o.to_string()),
                    p.program_id.to_string(),
                    p.name.clone().unwrap_or_else(|| "?".into()),
                    p.prog_type.clone().unwrap_or_default(),
                    p.attached_at.clone().unwrap_or_else(|| "(above the visible cgroup tree)".into()),
                    p.attach_flags.clone().unwrap_or_default(),
                    if p.tagger { "← tagger".into() } else { String::new() },
                ]);
            }
        }
        println!(
            "other programs on tagger's hooks, in the order they run (hooks with only tagger's omitted):"
        );
        println!("{t}");
    }
    if r.others_before_tagger > 0 {
        println!(
            "WARNING: {} program(s) of others run before tagger's: a socket LB among them translates ClusterIPs before tagger sees them",
            r.others_before_tagger
        );
    }
    if let Some(note) = &r.note {
        println!("note: {note}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prog(order: Option<usize>, id: u32, tagger: bool) -> HookProgram {
        HookProgram {
            order,
            program_id: id,
            name: None,
            prog_type: None,
            attached_at: None,
            attach_flags: None,
            tagger,
        }
    }

    #[test]
    fn others_before_tagger_count_only_programs_that_run_first() {
        assert_eq!(before_tagger(&[prog(Some(1), 7, true), prog(Some(2), 9, false)]), 0);
        assert_eq!(before_tagger(&[prog(Some(1), 9, false), prog(Some(2), 7, true)]), 1);
        // An overridden program does not run at all.
        assert_eq!(before_tagger(&[prog(Some(1), 7, true), prog(None, 9, false)]), 0);
        assert_eq!(before_tagger(&[]), 0);
    }

    #[test]
    fn attach_flags_are_named_as_bpftool_does() {
        assert_eq!(flags_name(BPF_F_ALLOW_MULTI), "multi");
        assert_eq!(flags_name(BPF_F_ALLOW_OVERRIDE), "override");
        assert_eq!(flags_name(0), "exclusive");
    }
}
