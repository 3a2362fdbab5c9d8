//! The guest's initramfs: busybox (static) runs `/init`, which loads the kernel modules the tests
//! need (from the kernel's own package), mounts proc, sys, devtmpfs, cgroup2 and bpffs, and runs
//! the prebuilt integration test binary once per area. Everything the tests execute is packed in,
//! with its shared libraries: the test binary (debug info stripped), `testpod`, `tagger`,
//! `tagger-agent`, and iproute2's `ip`. Nothing is shared with the host.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::BufWriter,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{cpio::Cpio, kernels::Kernel};

/// Modules the tests need beyond what the cloud kernels build in (their dependencies follow).
const MODULES: [&str; 4] = ["veth", "bridge", "tcp_diag", "udp_diag"];

/// The system CA bundle (Debian's ca-certificates).
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Marker lines the guest prints on the serial console; xtask parses them.
pub const MARK: &str = "TAGGER-MATRIX";

/// What goes into the archive.
pub struct Contents<'a> {
    /// The integration test binary.
    pub binary: &'a Path,
    /// Its areas (run in this order), by the name printed in results.
    pub areas: &'a [super::Area],
    /// Binaries the tests run from `target/debug` (`testpod`, `tagger`, `tagger-agent`).
    pub bins: &'a [PathBuf],
    /// Arguments for every area's run (`--ignored`).
    pub test_args: &'a [String],
    /// Per-area time limit inside the guest.
    pub test_timeout_s: u64,
    /// Tests of one area run at once (libtest's `--test-threads`).
    pub test_threads: usize,
    /// Mount cgroup v1 hierarchies (cpu,cpuacct, memory, pids on a tmpfs at /sys/fs/cgroup)
    /// and no cgroup2: a cgroup v1-only host.
    pub cgroup_v1: bool,
}

/// Writes the initramfs for `kernel` to `out`, with stripped copies of the binaries cached in
/// `stage`; returns its size in bytes. The stripped copies it used are added to `used`.
pub fn build(
    kernel: &Kernel,
    contents: &Contents<'_>,
    stage: &Path,
    out: &Path,
    used: &mut BTreeSet<PathBuf>,
) -> Result<u64> {
    fs::create_dir_all(stage)?;
    let mut files: BTreeMap<String, (u32, PathBuf)> = BTreeMap::new();
    let mut libs = BTreeSet::new();
    files.insert("/t/integration".into(), (0o755, strip(contents.binary, stage)?));
    libs.extend(shared_libs(contents.binary)?);
    for bin in contents.bins {
        let name = bin.file_name().context("binary without a name")?.to_string_lossy();
        files.insert(format!("/t/{name}"), (0o755, strip(bin, stage)?));
        libs.extend(shared_libs(bin)?);
    }
    used.extend(files.values().map(|(_, p)| p.clone()));
    let ip = which("ip")?;
    libs.extend(shared_libs(&ip)?);
    files.insert("/usr/sbin/ip".into(), (0o755, ip));
    let busybox = which("busybox")?;
    if !shared_libs(&busybox)?.is_empty() {
        bail!("{} is not static: install Debian's busybox-static", busybox.display());
    }
    files.insert("/bin/busybox".into(), (0o755, busybox));
    // The agent's kube client (rustls with the platform verifier) refuses to start without a
    // system CA bundle, even when the kubeconfig brings its own CA: give the guest the host's.
    let bundle = PathBuf::from(CA_BUNDLE);
    if bundle.is_file() {
        files.insert(CA_BUNDLE.into(), (0o644, bundle));
    }
    for lib in libs {
        // Keep the path the binaries were linked against (e.g. /lib64/ld-linux-x86-64.so.2).
        files.insert(lib.to_string_lossy().into_owned(), (0o755, fs::canonicalize(&lib)?));
    }

    let modules = module_order(&kernel.modules)?;
    let mut c = Cpio::new(BufWriter::new(fs::File::create(out).with_context(|| out.display().to_string())?));
    let mut dirs = BTreeSet::new();
    for d in ["/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/etc", "/var", "/modules", "/t/areas"] {
        add_dirs(&mut c, &mut dirs, d)?;
    }
    c.symlink("/var/run", "/run")?;
    c.file("/etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")?;
    for (path, (mode, src)) in &files {
        add_dirs(&mut c, &mut dirs, Path::new(path).parent().and_then(Path::to_str).unwrap_or("/"))?;
        let data = fs::read(src).with_context(|| format!("read {}", src.display()))?;
        c.file(path, *mode, &data)?;
    }
    let mut order = String::new();
    for (name, path) in &modules {
        c.file(&format!("/modules/{name}.ko"), 0o644, &module_bytes(path)?)?;
        order.push_str(name);
        order.push('\n');
    }
    c.file("/modules/order", 0o644, order.as_bytes())?;
    // Each area's test names, one per line, for `--exact`.
    for (area, names) in contents.areas {
        c.file(&format!("/t/areas/{area}"), 0o644, (names.join("\n") + "\n").as_bytes())?;
    }
    c.file("/init", 0o755, init_script(contents).as_bytes())?;
    let (_, size) = c.finish()?;
    Ok(size)
}

/// Removes the stripped copies in `stage` that no guest of this run used: those of earlier builds
/// (other hashes) would pile up. Done once per run, after every guest, so that one guest's
/// smaller set (the cgroup v1-only guest's) does not make the next kernel strip everything again.
pub fn prune_stage(stage: &Path, used: &BTreeSet<PathBuf>) {
    for e in fs::read_dir(stage).into_iter().flatten().flatten() {
        if !used.contains(&e.path()) {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn add_dirs<W: std::io::Write>(c: &mut Cpio<W>, done: &mut BTreeSet<String>, dir: &str) -> Result<()> {
    let mut path = String::new();
    for part in dir.split('/').filter(|p| !p.is_empty()) {
        path.push('/');
        path.push_str(part);
        if done.insert(path.clone()) {
            c.dir(&path)?;
        }
    }
    Ok(())
}

/// /init's cgroup mounts on a normal guest.
const CGROUP_V2: &str = "mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail mount cgroup2";
/// /init's cgroup mounts on a cgroup v1-only guest: each v1 hierarchy the kernel still offers
/// (6.12's Debian build has no memory controller in v1: `CONFIG_MEMCG_V1` is off), at least one.
const CGROUP_V1: &str = r#"mount -t tmpfs cgroup /sys/fs/cgroup || fail mount cgroup tmpfs
v1=""
for c in cpu,cpuacct memory pids; do
  mkdir -p /sys/fs/cgroup/$c
  if mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c; then v1="$v1 $c"; else rmdir /sys/fs/cgroup/$c; fi
done
[ -n "$v1" ] || fail mount any cgroup v1 hierarchy
echo "cgroup v1 hierarchies:$v1""#;

/// The guest's /init (busybox sh). Every failure prints a marker and powers off, so a run never
/// hangs on a broken guest; xtask's time limit covers the rest.
fn init_script(contents: &Contents<'_>) -> String {
    let names: Vec<&str> = contents.areas.iter().map(|(n, _)| n.as_str()).collect();
    let args: Vec<String> = contents.test_args.iter().map(|a| format!("'{}'", a.replace('\'', ""))).collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1
fail() {{ echo "{MARK} fail $*"; poweroff -f; }}
mount -t proc proc /proc || fail mount proc
mount -t sysfs sys /sys || fail mount sysfs
mount -t devtmpfs dev /dev || fail mount devtmpfs
mount -t tmpfs run /run && mount -t tmpfs tmp /tmp || fail mount tmpfs
{cgroups}
mount -t bpf bpf /sys/fs/bpf || fail mount bpffs
for m in $(cat /modules/order); do insmod /modules/$m.ko || fail insmod $m; done
ip link set lo up
echo "{MARK} kernel $(uname -r)"
for t in {names}; do
  echo "{MARK} start $t"
  start=$(date +%s)
  timeout -s KILL {timeout} /t/integration --test-threads={threads} --exact {args} $(cat /t/areas/$t)
  rc=$?
  echo "{MARK} result $t $rc $(( $(date +%s) - start ))s"
done
echo "{MARK} done"
poweroff -f
"#,
        names = names.join(" "),
        timeout = contents.test_timeout_s,
        threads = contents.test_threads,
        args = args.join(" "),
        cgroups = if contents.cgroup_v1 { CGROUP_V1 } else { CGROUP_V2 },
    )
}

/// A copy of `bin` without debug info (a tenth of the size), cached by modification time.
fn strip(bin: &Path, stage: &Path) -> Result<PathBuf> {
    let out = stage.join(bin.file_name().context("binary without a name")?);
    let newer = |a: &Path, b: &Path| -> bool {
        let m = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        matches!((m(a), m(b)), (Some(x), Some(y)) if x >= y)
    };
    if !newer(&out, bin) {
        crate::shell::run(Command::new("strip").arg("--strip-debug").arg("-o").arg(&out).arg(bin))?;
    }
    Ok(out)
}

/// The shared libraries `ldd` lists for a binary (none for a static one).
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        if line.contains("not found") {
            bail!("{}: {}", bin.display(), line.trim());
        }
        let path = line.split("=>").last().unwrap_or("").split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn which(cmd: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&format!("{path}:/usr/sbin:/sbin:/usr/bin:/bin"))
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .with_context(|| format!("{cmd} is not installed (run `cargo xtask setup`)"))
}

/// [`MODULES`] and their dependencies, dependencies first, found in the kernel's package.
fn module_order(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut index = BTreeMap::new();
    index_modules(dir, &mut index)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for m in MODULES {
        visit(m, &index, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, PathBuf)>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) {
        return Ok(());
    }
    let Some(path) = index.get(&name) else {
        // Built into this kernel (no module file): nothing to load.
        return Ok(());
    };
    for dep in depends(&module_bytes(path)?) {
        visit(&dep, index, seen, order)?;
    }
    order.push((name, path.clone()));
    Ok(())
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))?.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            index_modules(&p, index)?;
        } else if let Some(stem) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.split(".ko").next())
            && p.to_string_lossy().contains(".ko")
        {
            index.insert(stem.replace('-', "_"), p);
        }
    }
    Ok(())
}

/// A module file's bytes, decompressed (Debian 6.12 ships .ko.xz).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return fs::read(path).with_context(|| format!("read {name}"));
    };
    let out = Command::new(tool).arg("-dc").arg(path).output().with_context(|| format!("run {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// The `depends=` entry of a module's .modinfo section.
fn depends(module: &[u8]) -> Vec<String> {
    let key = b"depends=";
    module
        .windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &module[at + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn depends_reads_the_modinfo_entry() {
        assert_eq!(super::depends(b"\0license=GPL\0depends=stp,llc\0intree=Y\0"), ["stp", "llc"]);
        assert!(super::depends(b"\0depends=\0").is_empty());
        assert!(super::depends(b"nothing").is_empty());
    }
}
