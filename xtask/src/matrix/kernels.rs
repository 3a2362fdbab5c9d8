//! Debian kernels for the matrix: resolved from apt's metapackages, downloaded with
//! `apt-get download` and unpacked with `dpkg -x` into `target/kernels/<series>/`, once.

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
}

/// The series `cargo xtask test --kernel` accepts: Debian 12's cloud kernel and its backport.
pub const SERIES: [Series; 2] = [
    Series { name: "6.1", meta: "linux-image-cloud-amd64" },
    Series { name: "6.12", meta: "linux-image-6.12-cloud-amd64" },
];

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
    let package = resolve(series)?;
    let dir = cache.join(series.name).join(&package);
    let unpacked = dir.join("root");
    if find_kernel(&unpacked).is_ok() {
        status(&format!("kernel {}", series.name), &format!("{package} (cached in {})", dir.display()));
        return find_kernel(&unpacked);
    }
    fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    status(&format!("kernel {}", series.name), &format!("downloading {package}"));
    run(Command::new("apt-get").args(["download", "-q", &package]).current_dir(&dir))?;
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
fn resolve(series: Series) -> Result<String> {
    let deps = output("apt-cache", &["depends", series.meta]).unwrap_or_default();
    let prefix = format!("linux-image-{}", series.name);
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with(&prefix) && p.ends_with("-cloud-amd64"));
    match package {
        Some(p) => Ok(p.to_owned()),
        None => bail!(
            "apt knows no kernel package for series {} (`apt-cache depends {}` names none starting with \
             {prefix}): run `apt-get update`",
            series.name,
            series.meta
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
