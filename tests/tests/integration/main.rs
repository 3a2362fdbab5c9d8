//! tagger's integration tests: one test binary, one module per area, all on the real kernel
//! (network namespaces as pods, kubelet-style cgroups, the real programs and real connections)
//! or, for `deploy_*` and `fake_api`, against the real manifests, image and kube-rs clients.
//!
//! One binary instead of one per area: each binary linked the whole dependency tree again
//! (about 40 MB each, 25 of them), and `cargo test` ran them one after another. Run an area
//! with `cargo test -p tagger-tests --test integration datapath_lanes::` (a name filter), one
//! test with its full name. The kernel matrix (`cargo xtask test --kernel …`) runs the areas
//! named `datapath_*` and `agent_*` inside its guests, one area after another
//! (`--kernel-area NAME` for some only).
//!
//! Tests run in parallel threads of this one process, as they did within each area's binary:
//! each builds its own sandbox (uniquely named namespaces, cgroups and pins) and stops only
//! the processes it started.

mod agent_capacity;
mod agent_cgroup_v1;
mod agent_file;
mod agent_foreign_lb;
mod agent_kube;
mod agent_lease;
mod agent_metrics;
mod agent_shaping;
mod cli;
mod datapath_affinity;
mod datapath_atomic;
mod datapath_lanes;
mod datapath_lease;
mod datapath_lifecycle;
mod datapath_mark;
mod datapath_pins;
mod datapath_protocols;
mod datapath_scale;
mod datapath_shaping;
mod datapath_wire;
mod deploy_capabilities;
mod deploy_image;
mod deploy_manifests;
mod fake_api;
mod faults;
