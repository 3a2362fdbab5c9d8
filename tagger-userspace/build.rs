//! Builds the eBPF datapath (tagger-ebpf) with the nightly toolchain and bpf-linker, and leaves
//! the object in OUT_DIR for `include_bytes_aligned!`.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tagger-ebpf");
    aya_build::build_ebpf(
        [Package { name: "tagger-ebpf", root_dir, ..Default::default() }],
        Toolchain::Nightly,
    )
}
