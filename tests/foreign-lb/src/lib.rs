#![no_std]
//! Empty library target: lets the tests crate list this crate as a build dependency so cargo
//! rebuilds the embedded object when the stand-in changes. The programs are in `main.rs`.
