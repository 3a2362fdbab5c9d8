//! The layering of the crate's modules (docs/ARCHITECTURE.md, "The userspace layout"), checked:
//! every `crate::…` path in a module's non-test code names a module it may use. A new import
//! that points up (the model reaching for the agent, a source for the CLI) fails here, naming
//! the file.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Modules every module may use.
const LEAVES: [&str; 6] = ["sys", "net", "fs", "cgroup", "caps", "error"];

/// Each module and the modules (besides the leaves) it may use.
fn allowed() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        ("config", &[][..]),
        ("model", &["config"][..]),
        ("datapath", &[][..]),
        ("reconcile", &["model", "datapath"][..]),
        ("lifecycle", &["datapath"][..]),
        ("coverage", &["datapath"][..]),
        ("source", &["model", "config"][..]),
        ("cli", &["datapath", "coverage", "lifecycle", "model", "config"][..]),
        ("agent", &["config", "model", "datapath", "reconcile", "lifecycle", "coverage", "source"][..]),
    ])
}

/// The top-level modules a source text's non-test code names through `crate::`.
fn used_modules(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    let code: String =
        code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the names at depth 0.
            let (mut depth, mut name, mut names) = (0, String::new(), Vec::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => names.push(std::mem::take(&mut name)),
                    _ if depth == 0 => name.push(c),
                    _ => {}
                }
            }
            names.push(name);
            out.extend(names.iter().filter_map(|n| top(n.trim())));
        } else {
            out.extend(top(rest));
        }
    }
    out
}

/// The module a path starts with (`datapath::Tables` → `datapath`), if it is one.
fn top(path: &str) -> Option<String> {
    let name: String = path.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
    (!name.is_empty() && path[name.len()..].starts_with("::")).then_some(name)
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read the source directory").flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_module_imports_only_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed = allowed();
    let mut files = Vec::new();
    walk(&src, &mut files);
    assert!(files.len() > 50, "found only {} source files under {}", files.len(), src.display());
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let parts: Vec<String> =
            rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned()).collect();
        let module = parts[0].as_str();
        // Tests and test support may reach anywhere; the crate root and binaries wire it all.
        if parts.iter().any(|p| p == "tests" || p == "testing")
            || ["lib", "bin", "layering"].contains(&module)
        {
            continue;
        }
        let may: BTreeSet<&str> =
            allowed.get(module).map_or(&[][..], |m| *m).iter().copied().chain(LEAVES).collect();
        let text = std::fs::read_to_string(file).unwrap();
        for used in used_modules(&text) {
            if used != module && !may.contains(used.as_str()) {
                wrong.push(format!("{}: uses crate::{used}", rel.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "imports that point up or sideways:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_reads_groups_and_paths() {
    let text = "use crate::{\n    Result,\n    datapath::{Tables, lane_label},\n    model::lane,\n};\n\
                fn f() { crate::sys::x(); }\n// crate::agent::y\n#[cfg(test)]\nmod tests { use crate::cli; }\n";
    assert_eq!(used_modules(text), BTreeSet::from(["datapath".into(), "model".into(), "sys".into()]));
}
