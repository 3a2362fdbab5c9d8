//! The load an agent-restart test holds: new connections in a loop from a gray and a base
//! caller, and a long-lived connection from each to its lane's backend, which must stay
//! untouched and alive across every restart (the source of the agent does not matter).

use std::{net::SocketAddr, time::Duration};

use crate::{
    agent::AgentSandbox,
    client::{HoldClient, LoopClient},
    hold::HoldServer,
};

/// Port of the backends that hold connections open.
pub const HOLD_PORT: u16 = 9090;

/// Adds a base caller `gb` and a Service `h` at `hold_vip`, served by `a-base` and `a-gray` on
/// [`HOLD_PORT`], to a sandbox made by [`AgentSandbox::with_service_a`]. Call before the
/// cluster is published or the agent started.
pub fn prepare(sb: &mut AgentSandbox, hold_vip: SocketAddr) {
    sb.caller("gb", None);
    sb.cluster.service("h", &[hold_vip.ip()], hold_vip.port(), HOLD_PORT, &["a-base", "a-gray"]);
}

/// The running load.
pub struct RestartLoad {
    gray: LoopClient,
    base: LoopClient,
    held: Vec<(HoldClient, &'static str)>,
    servers: Vec<HoldServer>,
}

impl RestartLoad {
    /// Starts the hold servers, the loops to `vip` from `gw` (gray) and `gb` (base), and a held
    /// connection to `hold_vip` from each, checking each reached its lane's backend.
    pub fn start(sb: &AgentSandbox, vip: SocketAddr, hold_vip: SocketAddr) -> Self {
        let servers =
            ["a-base", "a-gray"].iter().map(|n| HoldServer::start(&sb.netns[*n], n, HOLD_PORT)).collect();
        let gray = LoopClient::start(&sb.pod_cgroup("gw"), &sb.netns["gw"].ns, vip);
        let base = LoopClient::start(&sb.pod_cgroup("gb"), &sb.netns["gb"].ns, vip);
        let held = [("gw", "a-gray"), ("gb", "a-base")]
            .into_iter()
            .map(|(caller, backend)| {
                let c = HoldClient::start(&sb.pod_cgroup(caller), &sb.netns[caller].ns, "hold-tcp", hold_vip);
                let line = c.next_line(Duration::from_secs(3)).expect("no connect reported");
                assert_eq!(line, format!("ok\t{backend}\t{hold_vip}"));
                (c, backend)
            })
            .collect();
        Self { gray, base, held, servers }
    }

    /// Stops the load and asserts: no failed connection in either loop (and more than 50 each),
    /// every gray-caller connection on the gray backend (no transient fallback), and both held
    /// connections untouched and alive (they end with their server's FIN when it stops).
    pub fn check(self, sb: &AgentSandbox) {
        let Self { gray, base, held, servers } = self;
        std::thread::sleep(Duration::from_millis(300));
        let (gray, base) = (gray.finish(), base.finish());
        for (lane, summary, backend) in [("gray", &gray, "a-gray"), ("base", &base, "a-base")] {
            assert!(summary.ok > 50, "{lane}: {summary:?}");
            assert_eq!(
                summary.failed,
                0,
                "{lane} connections failed across agent restarts: {summary:?}\n{}",
                sb.agent_log()
            );
            assert_eq!(summary.replies.keys().collect::<Vec<_>>(), [backend], "{lane}: {summary:?}");
        }
        for (c, backend) in &held {
            assert_eq!(
                c.next_line(Duration::from_millis(300)),
                None,
                "the connection to {backend} was touched"
            );
        }
        drop(servers);
        for (c, backend) in &held {
            let line = c.next_line(Duration::from_secs(3)).unwrap_or_default();
            assert!(line.starts_with("closed"), "{backend}: {line:?}");
        }
    }
}
