//! `cargo xtask image`: the container image from `Containerfile` (FROM scratch) holding the
//! statically linked (musl) `tagger-agent` and `tagger`, built offline with buildah, checked by
//! running both binaries from the image's own root filesystem, and saved as an archive that
//! nodes without a registry can import. Prints the image's size and digest.
//!
//! Needs only what `bootstrap` installs (Debian `buildah` and `musl-tools`), the rustup
//! `x86_64-unknown-linux-musl` target (added here if missing) and crates.io: `FROM scratch`
//! pulls nothing. The eBPF object is built by tagger-userspace's build.rs for `bpfel-unknown-none`
//! whatever the userspace target, so cross-compiling userspace to musl changes nothing there.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::shell::{output, run, status, step, workspace_root};

/// The userspace target of the image's binaries.
const TARGET: &str = "x86_64-unknown-linux-musl";
/// The image's name, as deploy/base/daemonset.yaml refers to it.
const REPOSITORY: &str = "localhost/tagger";
/// Name of the throw-away images `cargo xtask test` builds and removes.
const CHECK_REPOSITORY: &str = "localhost/tgt-image-check";
/// Prefix of the working containers used to inspect an image's root filesystem.
const CONTAINER_PREFIX: &str = "tgt-image-";
/// The binaries, installed in /usr/local/bin.
const BINARIES: [&str; 2] = ["tagger-agent", "tagger"];
/// The workspace version (xtask shares it), the image tag.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `cargo xtask image` options.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Image name (default: localhost/tagger:<workspace version>, the one deploy/ runs).
    #[arg(long)]
    pub tag: Option<String>,
}

/// `cargo xtask image`: builds, checks and keeps the image, and writes its archive.
pub fn run_task(args: &ImageArgs) -> Result<()> {
    crate::require_root("image")?;
    crate::bootstrap::run_all()?;
    let tag = args.tag.clone().unwrap_or_else(|| format!("{REPOSITORY}:{VERSION}"));
    let built = build(&tag)?;
    let archive = target_dir().join(format!("image/tagger-{VERSION}.tar"));
    step(&format!("save {tag} as {}", archive.display()));
    let _ = fs::remove_file(&archive);
    run(Command::new("buildah")
        .args(["push", "--quiet", &tag])
        .arg(format!("docker-archive:{}:{tag}", archive.display())))?;
    let archive_size = fs::metadata(&archive).map_or(0, |m| m.len());
    step("image");
    status("name", &tag);
    status("id", &built.id);
    status("digest", &built.digest);
    status("size", &built.size);
    for (name, bytes) in &built.binaries {
        status(name, &format!("{bytes} bytes, statically linked"));
    }
    status("archive", &format!("{} ({archive_size} bytes)", archive.display()));
    println!(
        "    import on a node: ctr -n k8s.io images import {0} (containerd), podman load -i {0} (CRI-O), \
         kind load image-archive {0}",
        archive.display()
    );
    Ok(())
}

/// The `cargo xtask test` step: builds the image under a throw-away name, checks it, removes it.
pub fn test_step() -> Result<TempImage> {
    step("container image (`cargo xtask image`), built and checked under a throw-away name");
    let image = TempImage(format!("{CHECK_REPOSITORY}:{}", std::process::id()));
    let built = build(&image.0)?;
    status(
        "image",
        &format!("{} bytes of binaries, size {}, digest {}", built.binary_bytes(), built.size, built.digest),
    );
    Ok(image)
}

/// What [`build`] produced.
struct Built {
    id: String,
    digest: String,
    size: String,
    binaries: Vec<(&'static str, u64)>,
}

impl Built {
    fn binary_bytes(&self) -> u64 {
        self.binaries.iter().map(|(_, b)| b).sum()
    }
}

/// Builds the binaries and the image `tag`, and checks the image's binaries run.
fn build(tag: &str) -> Result<Built> {
    prerequisites()?;
    remove_leftovers();
    let root = workspace_root();

    step(&format!("build tagger-agent and tagger for {TARGET} (release, static)"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args(["build", "--release", "--target", TARGET, "-p", "tagger-userspace"])
        .args(BINARIES.iter().flat_map(|b| ["--bin", b]))
        // Symbols are a fifth of the agent (panic messages keep their file and line). A
        // command-line setting: the nested eBPF build, whose object must keep its BTF, and the
        // embedded object itself are untouched.
        .args(["--config", "profile.release.strip=\"symbols\""])
        // ring's C and assembly for musl; Debian's musl-tools provides the wrapper.
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .current_dir(&root))?;

    let context = target_dir().join("image/context");
    let _ = fs::remove_dir_all(&context);
    fs::create_dir_all(&context).with_context(|| format!("create {}", context.display()))?;
    let mut binaries = Vec::new();
    for name in BINARIES {
        let bin = target_dir().join(TARGET).join("release").join(name);
        ensure!(is_static(&bin)?, "{} is dynamically linked (it has an ELF interpreter)", bin.display());
        fs::copy(&bin, context.join(name)).with_context(|| format!("copy {}", bin.display()))?;
        binaries.push((name, fs::metadata(&bin)?.len()));
    }

    step(&format!("buildah build {tag}"));
    let old_id = image_id(tag);
    run(Command::new("buildah")
        .args(["build", "--quiet", "--isolation", "chroot", "--timestamp", "0", "--build-arg"])
        .arg(format!("VERSION={VERSION}"))
        .arg("-f")
        .arg(root.join("Containerfile"))
        .args(["-t", tag])
        .arg(&context))?;
    let id = image_id(tag).context("the image is not in buildah's storage after the build")?;
    if let Some(old) = old_id.filter(|old| *old != id) {
        // The previous build of this tag, now untagged: remove it rather than let it pile up.
        let _ = Command::new("buildah").args(["rmi", &old]).output();
    }
    check_image(tag)?;

    let field = |format: &str| {
        output("buildah", &["images", "--digests", "--noheading", "--format", format, tag])
            .map(|s| s.lines().next().unwrap_or("").trim().to_owned())
            .unwrap_or_default()
    };
    Ok(Built { id, digest: field("{{.Digest}}"), size: field("{{.Size}}"), binaries })
}

/// Cargo's target directory (`CARGO_TARGET_DIR` if set, relative to the workspace root).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), |d| workspace_root().join(d))
}

/// Debian packages (installed by bootstrap) and the rustup target.
fn prerequisites() -> Result<()> {
    step("image prerequisites");
    for (tool, package) in [("buildah", "buildah"), ("musl-gcc", "musl-tools")] {
        if output("sh", &["-c", &format!("command -v {tool}")]).is_none() {
            bail!("{tool} is missing: install the Debian package {package} (`cargo xtask setup` does)");
        }
        status(tool, "present");
    }
    let installed = output("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    if installed.lines().any(|l| l.trim() == TARGET) {
        status(&format!("rustup target {TARGET}"), "present");
    } else {
        status(&format!("rustup target {TARGET}"), "installing");
        run(Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    Ok(())
}

/// The image's id, if `tag` exists.
fn image_id(tag: &str) -> Option<String> {
    let out = output("buildah", &["images", "--noheading", "--no-trunc", "--format", "{{.ID}}", tag])?;
    out.lines().next().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty())
}

/// Runs each binary's `--version` from the image's root filesystem (chrooted: nothing of the
/// build host's can help it run), and checks the entrypoint.
fn check_image(tag: &str) -> Result<()> {
    step(&format!("check {tag}: run its binaries from its root filesystem"));
    let name = format!("{CONTAINER_PREFIX}{}", std::process::id());
    let out =
        Command::new("buildah").args(["from", "--pull-never", "--quiet", "--name", &name, tag]).output()?;
    ensure!(out.status.success(), "buildah from {tag}: {}", String::from_utf8_lossy(&out.stderr));
    let container = WorkingContainer(name);
    let mount = output("buildah", &["mount", &container.0]).context("buildah mount")?;
    let rootfs = PathBuf::from(mount.trim());
    // Resolved here: the binaries run with an empty environment, which has no PATH to search.
    let chroot = output("sh", &["-c", "command -v chroot"]).context("chroot (coreutils) is missing")?;
    for bin in BINARIES {
        let out = Command::new(chroot.trim())
            .arg(&rootfs)
            .arg(format!("/usr/local/bin/{bin}"))
            .arg("--version")
            .env_clear()
            .output()
            .with_context(|| format!("chroot {} /usr/local/bin/{bin}", rootfs.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && stdout.trim() == format!("{bin} {VERSION}"),
            "/usr/local/bin/{bin} --version in the image printed {stdout:?} ({}; stderr {:?})",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        status(&format!("/usr/local/bin/{bin} --version"), stdout.trim());
    }
    let format = "{{.OCIv1.Config.Entrypoint}} {{.OCIv1.Config.Env}}";
    let config = output("buildah", &["inspect", "--type", "image", "--format", format, tag])
        .context("buildah inspect")?;
    ensure!(
        config.trim() == "[/usr/local/bin/tagger-agent] [PATH=/usr/local/bin]",
        "entrypoint and env: {config}"
    );
    status("entrypoint", "/usr/local/bin/tagger-agent");
    Ok(())
}

/// Whether an ELF64 little-endian executable has no program interpreter (`PT_INTERP`): a static
/// (or static-pie) binary that needs no libc from the image.
fn is_static(path: &Path) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let b = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    ensure!(
        b.len() >= 64 && b[..4] == *b"\x7fELF" && b[4] == 2 && b[5] == 1,
        "{}: not ELF64 LE",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&b[0x20..0x28]);
    let phoff = usize::try_from(u64::from_le_bytes(phoff))?;
    let (entsize, count) = (usize::from(u16_at(0x36)), usize::from(u16_at(0x38)));
    for i in 0..count {
        let at = phoff + i * entsize;
        let p_type = b.get(at..at + 4).context("truncated program headers")?;
        if u32::from_le_bytes([p_type[0], p_type[1], p_type[2], p_type[3]]) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Removes working containers and check images an interrupted run left.
fn remove_leftovers() {
    let containers = output("buildah", &["containers", "--noheading", "--format", "{{.ContainerName}}"]);
    for name in containers.unwrap_or_default().lines().map(str::trim) {
        if name.starts_with(CONTAINER_PREFIX) {
            let _ = Command::new("buildah").args(["rm", name]).output();
        }
    }
    let images = output("buildah", &["images", "--noheading", "--format", "{{.Name}}:{{.Tag}}"]);
    for image in images.unwrap_or_default().lines().map(str::trim) {
        if image.starts_with(CHECK_REPOSITORY) {
            let _ = Command::new("buildah").args(["rmi", "--force", image]).output();
        }
    }
}

/// A buildah working container, removed (and unmounted) on drop.
struct WorkingContainer(String);

impl Drop for WorkingContainer {
    fn drop(&mut self) {
        let _ = Command::new("buildah").args(["rm", &self.0]).output();
    }
}

/// An image removed on drop.
/// An image removed on drop; the tests run it (`TAGGER_TEST_IMAGE`) meanwhile.
pub struct TempImage(String);

impl TempImage {
    /// The image's name and tag.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = Command::new("buildah").args(["rmi", "--force", &self.0]).output();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tells_static_from_dynamic_binaries() {
        // The test binary itself is dynamically linked (gnu target); /bin/sh too.
        let me = std::env::current_exe().unwrap();
        assert!(!super::is_static(&me).unwrap());
        assert!(super::is_static(std::path::Path::new("/dev/null")).is_err());
    }
}
