use which::which;

/// Rebuild when bpf-linker changes (it is the linker of this crate, so cargo does not track it).
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` (or `cargo xtask test`), which installs it",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().expect("bpf-linker path is UTF-8"));
}
