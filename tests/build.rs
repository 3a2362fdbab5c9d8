//! Builds the stand-in socket load balancer (tests/foreign-lb) with the nightly toolchain and
//! bpf-linker, as tagger-userspace's build.rs builds the datapath, and leaves the object in
//! OUT_DIR for `include_bytes_aligned!` (tests/src/foreign_lb.rs).
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/foreign-lb");
    aya_build::build_ebpf(
        [Package { name: "tagger-test-foreign-lb", root_dir, ..Default::default() }],
        Toolchain::Nightly,
    )
}
