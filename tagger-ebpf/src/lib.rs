#![no_std]
//! Empty library target: lets tagger-userspace list this crate as a build dependency so cargo
//! rebuilds the embedded object when the datapath changes. The programs are in `main.rs`.
