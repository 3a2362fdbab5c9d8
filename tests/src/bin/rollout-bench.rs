//! `rollout-bench`: a rolling update under load on a sandboxed node, for `cargo xtask bench`.
//! HTTP/1.1 keep-alive clients (a pool, every fourth request taking 500 ms) send requests back
//! to back to a Service tagger steers while each of its base backends is replaced in turn (the
//! new pod ready first, the old one terminating, draining gracefully, then deleted). Prints one
//! line: `rollout <TAB> <requests> <TAB> <failed> <TAB> <backends replaced> <TAB> <resets>`,
//! then the failures, if any.
//!
//! Usage: `rollout-bench [--backends N] [--conns N]` (defaults 4 and 16), as root.

fn main() {
    tagger_tests::require_root();
    let mut backends = 4;
    let mut conns = 16;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        match pair {
            [flag, v] if flag == "--backends" => backends = v.parse().expect("--backends N"),
            [flag, v] if flag == "--conns" => conns = v.parse().expect("--conns N"),
            _ => panic!("usage: rollout-bench [--backends N] [--conns N]"),
        }
    }
    let mut sb = tagger_tests::agent::AgentSandbox::new();
    let vip = "10.96.10.7:80".parse().expect("vip");
    let r = tagger_tests::rollout::rolling_update(&mut sb, vip, backends, conns);
    println!("rollout\t{}\t{}\t{}\t{}", r.requests, r.failed, r.replaced, r.resets);
    for e in &r.errors {
        println!("{e}");
    }
}
