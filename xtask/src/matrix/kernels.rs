//! Debian kernels for the matrix: resolved from apt's metapackages, downloaded with
//! `apt-get download` and unpacked with `dpkg -x` into `target/kernels/<series>/`, once.
//!
//! A series from another Debian release than the host's (5.10: Debian 11 bullseye) is resolved
//! and downloaded through its own apt source list, lists and cache directories under
//! `target/kernels/apt-<suite>/` (`Dir::Etc::sourcelist`, `Dir::Etc::sourceparts=-`,
//! `Dir::State::Lists`, `Dir::Cache`): the system's sources, lists and caches stay untouched.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::shell::{output, run, status};

/// A kernel series of the matrix and the Debian metapackage that names its newest build.
#[derive(Clone, Copy, Debug)]
pub struct Series {
    /// `6.1`, `6.12`.
    pub name: &'static str,
    meta: &'static str,
    /// `None`: the host's apt sources (Debian 12); else the suite read through its own source
    /// list (see the module docs).
    suite: Option<&'static str>,
}

/// The series `cargo xtask test --kernel` accepts: Debian 11's cloud kernel, Debian 12's, and
/// Debian 12's backport.
pub const SERIES: [Series; 3] = [
    Series { name: "5.10", meta: "linux-image-cloud-amd64", suite: Some("bullseye") },
    Series { name: "6.1", meta: "linux-image-cloud-amd64", suite: None },
    Series { name: "6.12", meta: "linux-image-6.12-cloud-amd64", suite: None },
];

/// Where Debian's releases are served from (bullseye is still on the main mirror; once it
/// moves to archive.debian.org, this is the line to change).
const MIRROR: &str = "http://deb.debian.org/debian";

/// apt options that read `suite` through its own source list, lists and cache under `cache`
/// (created and updated once); empty for the host's own sources.
fn apt_options(series: Series, cache: &Path) -> Result<Vec<String>> {
    let Some(suite) = series.suite else { return Ok(Vec::new()) };
    let dir = cache.join(format!("apt-{suite}"));
    let lists = dir.join("lists");
    let archives = dir.join("cache/archives");
    for d in [lists.join("partial"), archives.join("partial")] {
        fs::create_dir_all(&d).with_context(|| format!("mkdir {}", d.display()))?;
    }
    let sources = dir.join("sources.list");
    fs::write(&sources, format!("deb {MIRROR} {suite} main\n"))
        .with_context(|| format!("write {}", sources.display()))?;
    let opts = vec![
        format!("-oDir::Etc::sourcelist={}", sources.display()),
        "-oDir::Etc::sourceparts=-".to_owned(),
        format!("-oDir::State::Lists={}", lists.display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
    ];
    let have_lists = fs::read_dir(&lists)
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().contains("_Packages"))));
    if !have_lists {
        status(&format!("kernel {}", series.name), &format!("apt-get update of {suite} (its own lists)"));
        run(Command::new("apt-get").args(&opts).args(["update", "-q"]))?;
    }
    Ok(opts)
}

/// Looks a series up by name.
pub fn series(name: &str) -> Result<Series> {
    SERIES.into_iter().find(|s| s.name == name).with_context(|| {
        let known: Vec<_> = SERIES.iter().map(|s| s.name).collect();
        format!("unknown kernel series {name:?}: the matrix has {}", known.join(", "))
    })
}

/// An unpacked kernel package.
#[derive(Debug)]
pub struct Kernel {
    /// e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the package.
    pub modules: PathBuf,
}

/// Downloads and unpacks the newest kernel of `series` unless already unpacked.
pub fn fetch(series: Series, cache: &Path) -> Result<Kernel> {
    let apt = apt_options(series, cache)?;
    let package = resolve(series, &apt)?;
    let dir = cache.join(series.name).join(&package);
    let unpacked = dir.join("root");
    if find_kernel(&unpacked).is_ok() {
        status(&format!("kernel {}", series.name), &format!("{package} (cached in {})", dir.display()));
        return find_kernel(&unpacked);
    }
    fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    status(&format!("kernel {}", series.name), &format!("downloading {package}"));
    run(Command::new("apt-get").args(&apt).args(["download", "-q", &package]).current_dir(&dir))?;
    let deb = fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
    status(&format!("kernel {}", series.name), &format!("unpacking {}", deb.display()));
    let tmp = dir.join("root.partial");
    let _ = fs::remove_dir_all(&tmp);
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
    fs::rename(&tmp, &unpacked)?;
    fs::remove_file(&deb)?;
    find_kernel(&unpacked)
}

/// The kernel package the series' metapackage depends on (its newest build in apt's lists).
fn resolve(series: Series, apt: &[String]) -> Result<String> {
    let mut args: Vec<&str> = apt.iter().map(String::as_str).collect();
    args.extend(["depends", series.meta]);
    let deps = output("apt-cache", &args).unwrap_or_default();
    let prefix = format!("linux-image-{}", series.name);
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with(&prefix) && p.ends_with("-cloud-amd64"));
    match package {
        Some(p) => Ok(p.to_owned()),
        None => bail!(
            "apt knows no kernel package for series {} (`apt-cache depends {}` names none starting with \
             {prefix}): run `apt-get update`{}",
            series.name,
            series.meta,
            series
                .suite
                .map(|s| format!(" (for {s}: remove target/kernels/apt-{s}/lists)"))
                .unwrap_or_default()
        ),
    }
}

fn find_kernel(root: &Path) -> Result<Kernel> {
    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("read {}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let release = vmlinuz.file_name().unwrap_or_default().to_string_lossy()["vmlinuz-".len()..].to_owned();
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&release))
        .find(|p| p.is_dir())
        .with_context(|| format!("no lib/modules/{release} in {}", root.display()))?;
    Ok(Kernel { release, vmlinuz, modules })
}
