//! Finding the calling pod of `tagger explain` and its lane, as the datapath does: the deepest
//! registered pod cgroup among the caller's cgroup ancestors, searched over the levels the
//! datapath config says pods sit at.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail};
use serde::Serialize;
use tagger_common::{BASE_LANE, DatapathConfig, PodEntry};

use super::{
    links::cgroup_paths,
    render::{LaneRef, Names},
};
use crate::{
    cgroup::{CgroupRef, cgroup2_mount},
    datapath::Tables,
};

/// How `--pod` named the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodQuery {
    /// `namespace/name`, or a name alone.
    Name {
        /// Namespace, if given.
        namespace: Option<String>,
        /// Pod name.
        name: String,
    },
    /// A cgroup id (decimal).
    CgroupId(u64),
    /// A cgroup directory.
    Path(PathBuf),
}

/// Reads `--pod`: digits are a cgroup id; a path starting with `/` or `.`, or with more than one
/// `/`, is a cgroup directory; otherwise `namespace/name` or a name alone.
#[must_use]
pub fn parse_query(s: &str) -> PodQuery {
    if !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_digit())
        && let Ok(id) = s.parse()
    {
        return PodQuery::CgroupId(id);
    }
    if s.starts_with('/') || s.starts_with('.') || s.matches('/').count() > 1 {
        return PodQuery::Path(PathBuf::from(s));
    }
    match s.split_once('/') {
        Some((ns, name)) => PodQuery::Name { namespace: Some(ns.to_owned()), name: name.to_owned() },
        None => PodQuery::Name { namespace: None, name: s.to_owned() },
    }
}

/// The caller as `explain` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Caller {
    /// `--pod` as given.
    pub query: String,
    /// How it was found: `pod_name`, `cgroup_id` or `cgroup_path`.
    pub found_by: &'static str,
    /// The caller's own cgroup directory, when known (given, or found from a cgroup id).
    pub cgroup_path: Option<String>,
    /// Its level below the cgroup v2 root, when known.
    pub cgroup_level: Option<u32>,
    /// Whether the datapath finds a registered pod cgroup for it (false: base, `unknown_pod`).
    pub registered: bool,
    /// The registered pod cgroup that decides the lane.
    pub pod_cgroup_id: Option<u64>,
    /// Its level.
    pub pod_level: Option<u32>,
    /// The pod's namespace, when published.
    pub namespace: Option<String>,
    /// The pod's name, when published.
    pub name: Option<String>,
    /// The caller's lane (base when not registered).
    pub lane: LaneRef,
    /// Anything surprising about the lookup (e.g. a pod outside the searched levels).
    pub note: Option<String>,
}

/// What the caller lookup reads from the maps.
#[derive(Clone, Debug, Default)]
pub struct PodTables {
    /// Registered pod cgroups.
    pub pods: BTreeMap<u64, PodEntry>,
    /// Published pod names.
    pub meta: BTreeMap<u64, (String, String)>,
    /// The searched level range.
    pub config: DatapathConfig,
}

impl PodTables {
    /// Reads them.
    pub fn read(tables: &Tables) -> crate::Result<Self> {
        Ok(Self { pods: tables.pods()?, meta: tables.pod_meta()?, config: tables.config()? })
    }
}

/// The registered pod cgroup the datapath finds for a task whose cgroup and ancestors are
/// `ancestors` (level, id): from the deepest searched level to the shallowest, the first
/// ancestor that is registered — the same walk as the programs' `caller_lane`.
#[must_use]
pub fn registered_ancestor(ancestors: &[(u32, u64)], t: &PodTables) -> Option<(u32, u64)> {
    let mut level = t.config.pod_level_max.min(tagger_common::MAX_CGROUP_LEVEL);
    while level >= t.config.pod_level_min && level > 0 {
        if let Some(&(l, id)) = ancestors.iter().find(|(l, _)| *l == level)
            && t.pods.contains_key(&id)
        {
            return Some((l, id));
        }
        level -= 1;
    }
    None
}

/// The pod cgroup id published under a name (`namespace/name`, or a name alone if unique).
pub fn find_by_name(
    meta: &BTreeMap<u64, (String, String)>,
    namespace: Option<&str>,
    name: &str,
) -> anyhow::Result<u64> {
    let matches: Vec<(u64, &(String, String))> = meta
        .iter()
        .filter(|(_, (ns, n))| n == name && namespace.is_none_or(|want| want == ns))
        .map(|(id, m)| (*id, m))
        .collect();
    match matches.as_slice() {
        [(id, _)] => Ok(*id),
        [] => {
            let what = namespace.map_or_else(|| name.to_owned(), |ns| format!("{ns}/{name}"));
            bail!(
                "no pod named {what} is published in the datapath (the agent publishes the names of its \
                 local pods; `tagger pods` lists them): give a cgroup id or a cgroup path instead"
            )
        }
        many => {
            let all: Vec<String> = many.iter().map(|(_, (ns, n))| format!("{ns}/{n}")).collect();
            bail!("{name} is ambiguous: {}; give namespace/name", all.join(", "))
        }
    }
}

fn base_caller(query: &str, found_by: &'static str, names: &Names) -> Caller {
    Caller {
        query: query.to_owned(),
        found_by,
        cgroup_path: None,
        cgroup_level: None,
        registered: false,
        pod_cgroup_id: None,
        pod_level: None,
        namespace: None,
        name: None,
        lane: names.lane(BASE_LANE),
        note: None,
    }
}

/// The caller when its task runs in the registered pod cgroup `id` itself (found by name or id).
#[must_use]
pub fn caller_in_pod(query: &str, found_by: &'static str, id: u64, t: &PodTables, names: &Names) -> Caller {
    let mut c = base_caller(query, found_by, names);
    let (namespace, name) = t.meta.get(&id).cloned().unzip();
    c.namespace = namespace;
    c.name = name;
    c.pod_cgroup_id = Some(id);
    let Some(entry) = t.pods.get(&id) else {
        c.note =
            Some(format!("cgroup {id} is not registered in the datapath: its processes are base callers"));
        return c;
    };
    c.pod_level = Some(entry.level);
    // The task sits at the pod's own level; deeper searched levels have no ancestor there.
    if registered_ancestor(&[(entry.level, id)], t).is_none() {
        c.note = Some(format!(
            "pod cgroup {id} is registered at level {} but the datapath searches levels {}..={}: \
             the programs do not find it and treat its processes as base",
            entry.level, t.config.pod_level_min, t.config.pod_level_max
        ));
        return c;
    }
    c.registered = true;
    c.lane = names.lane(entry.lane);
    c
}

/// The caller whose task runs in cgroup `path` at `level`, with the given ancestors.
#[must_use]
pub fn caller_in_cgroup(
    query: &str,
    found_by: &'static str,
    path: &Path,
    ancestors: &[(u32, u64)],
    t: &PodTables,
    names: &Names,
) -> Caller {
    let level = ancestors.iter().map(|(l, _)| *l).max();
    let mut c = match registered_ancestor(ancestors, t) {
        Some((_, id)) => caller_in_pod(query, found_by, id, t, names),
        None => base_caller(query, found_by, names),
    };
    c.cgroup_path = Some(path.display().to_string());
    c.cgroup_level = level;
    if !c.registered && c.note.is_none() {
        let registered: Vec<u64> =
            ancestors.iter().map(|(_, id)| *id).filter(|id| t.pods.contains_key(id)).collect();
        if let Some(id) = registered.first() {
            c.note = Some(format!(
                "ancestor cgroup {id} is registered, but outside the searched levels {}..={}",
                t.config.pod_level_min, t.config.pod_level_max
            ));
        }
    }
    c
}

/// The (level, id) of a cgroup directory and each of its ancestors up to the cgroup v2 root.
pub fn ancestors_of(path: &Path) -> anyhow::Result<(PathBuf, Vec<(u32, u64)>)> {
    let cg = CgroupRef::open(path)?;
    let mut out = Vec::new();
    for (i, dir) in cg.path.ancestors().enumerate() {
        let Some(level) = cg.level.checked_sub(u32::try_from(i)?) else { break };
        let meta = std::fs::metadata(dir).map_err(|e| anyhow!("{}: {e}", dir.display()))?;
        out.push((level, meta.ino()));
    }
    Ok((cg.path, out))
}

/// Finds the caller named by `--pod` (reads the maps and, for paths and unregistered ids, the
/// cgroup tree).
pub fn find(
    tables: &Tables,
    names: &Names,
    query: &str,
    cgroup_root: Option<&Path>,
) -> anyhow::Result<Caller> {
    let root = || -> anyhow::Result<PathBuf> {
        Ok(match cgroup_root {
            Some(r) => r.to_owned(),
            None => cgroup2_mount()?,
        })
    };
    let t = PodTables::read(tables)?;
    match parse_query(query) {
        PodQuery::Name { namespace, name } => {
            let id = find_by_name(&t.meta, namespace.as_deref(), &name).map_err(|e| {
                // `kubepods.slice/pod…`-like relative paths with one slash read as names first.
                match resolve_path(Path::new(query), root().ok().as_deref()) {
                    Some(_) => anyhow!("{query}: looks like a cgroup path; give it as ./{query} or absolute"),
                    None => e,
                }
            })?;
            Ok(caller_in_pod(query, "pod_name", id, &t, names))
        }
        PodQuery::CgroupId(id) => {
            if t.pods.contains_key(&id) {
                return Ok(caller_in_pod(query, "cgroup_id", id, &t, names));
            }
            // Not a pod cgroup: maybe a container's below one. Find its directory to walk up.
            let root = root()?;
            let Some(path) = cgroup_paths(&root, &BTreeSet::from([id])).remove(&id) else {
                let mut c = base_caller(query, "cgroup_id", names);
                c.note = Some(format!(
                    "cgroup {id} is not a registered pod cgroup and no cgroup directory has this id: \
                     a task there would be a base caller"
                ));
                return Ok(c);
            };
            let (path, ancestors) = ancestors_of(&path)?;
            Ok(caller_in_cgroup(query, "cgroup_id", &path, &ancestors, &t, names))
        }
        PodQuery::Path(p) => {
            let path = resolve_path(&p, root().ok().as_deref()).ok_or_else(|| {
                anyhow!(
                    "{}: no such cgroup directory (absolute, or relative to the cgroup v2 mount)",
                    p.display()
                )
            })?;
            let (path, ancestors) = ancestors_of(&path)?;
            Ok(caller_in_cgroup(query, "cgroup_path", &path, &ancestors, &t, names))
        }
    }
}

/// A cgroup directory as given, or relative to the cgroup v2 mount.
fn resolve_path(p: &Path, root: Option<&Path>) -> Option<PathBuf> {
    if p.is_dir() {
        return Some(p.to_owned());
    }
    if p.is_relative() {
        let under = root?.join(p);
        if under.is_dir() {
            return Some(under);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use tagger_common::lane_id;

    use super::*;

    fn tables() -> (PodTables, Names) {
        let mut t = PodTables::default();
        t.pods.insert(100, PodEntry { lane: lane_id("gray"), level: 4 });
        t.pods.insert(200, PodEntry { lane: lane_id("feature-x"), level: 5 });
        t.meta.insert(100, ("demo".into(), "gw-gray".into()));
        t.meta.insert(200, ("demo".into(), "fx".into()));
        t.meta.insert(300, ("other".into(), "fx".into()));
        t.config = DatapathConfig { pod_level_min: 4, pod_level_max: 5, ..DatapathConfig::default() };
        let mut names = Names::default();
        names.lanes.insert(lane_id("gray"), "gray".into());
        (t, names)
    }

    #[test]
    fn queries_are_ids_paths_or_names() {
        assert_eq!(parse_query("1234"), PodQuery::CgroupId(1234));
        assert_eq!(parse_query("/sys/fs/cgroup/x"), PodQuery::Path("/sys/fs/cgroup/x".into()));
        assert_eq!(parse_query("kubepods.slice/a/b"), PodQuery::Path("kubepods.slice/a/b".into()));
        assert_eq!(
            parse_query("demo/gw"),
            PodQuery::Name { namespace: Some("demo".into()), name: "gw".into() }
        );
        assert_eq!(parse_query("gw"), PodQuery::Name { namespace: None, name: "gw".into() });
    }

    #[test]
    fn names_resolve_uniquely_or_fail_clearly() {
        let (t, _) = tables();
        assert_eq!(find_by_name(&t.meta, Some("demo"), "gw-gray").unwrap(), 100);
        assert_eq!(find_by_name(&t.meta, None, "gw-gray").unwrap(), 100);
        let e = find_by_name(&t.meta, None, "fx").unwrap_err().to_string();
        assert!(e.contains("ambiguous") && e.contains("demo/fx") && e.contains("other/fx"), "{e}");
        let e = find_by_name(&t.meta, Some("demo"), "nope").unwrap_err().to_string();
        assert!(e.contains("demo/nope") && e.contains("tagger pods"), "{e}");
    }

    #[test]
    fn a_container_cgroup_inherits_the_deepest_registered_ancestor() {
        let (t, names) = tables();
        // root(0) .. kubepods(3) → pod 100 (4) → container (5) → sub (6)
        let ancestors = [(6, 7), (5, 6), (4, 100), (3, 3), (0, 1)];
        assert_eq!(registered_ancestor(&ancestors, &t), Some((4, 100)));
        let c = caller_in_cgroup("/x", "cgroup_path", Path::new("/x"), &ancestors, &t, &names);
        assert!(c.registered);
        assert_eq!(
            (c.pod_cgroup_id, c.cgroup_level, c.lane.name.as_deref()),
            (Some(100), Some(6), Some("gray"))
        );
        assert_eq!(c.name.as_deref(), Some("gw-gray"));
        // A registered cgroup nested below another: the deeper one wins.
        let nested = [(5, 200), (4, 100), (0, 1)];
        assert_eq!(registered_ancestor(&nested, &t), Some((5, 200)));
    }

    #[test]
    fn unregistered_callers_are_base() {
        let (t, names) = tables();
        let c = caller_in_cgroup("/y", "cgroup_path", Path::new("/y"), &[(4, 55), (0, 1)], &t, &names);
        assert!(!c.registered);
        assert_eq!(c.lane.id, BASE_LANE);
    }

    #[test]
    fn a_pod_outside_the_searched_levels_is_not_found() {
        let (mut t, names) = tables();
        t.config.pod_level_min = 5;
        let c = caller_in_pod("demo/gw-gray", "pod_name", 100, &t, &names);
        assert!(!c.registered && c.lane.id == BASE_LANE);
        assert!(c.note.unwrap().contains("searches levels 5..=5"));
    }
}
