//! A sandboxed node: one network namespace with a bridge, and pods (network namespaces) plugged
//! into it by veth pairs, on 10.244.0.0/24 and fd00:244::/64. There is no default route anywhere,
//! so nothing leaves the sandbox; an address the datapath did not rewrite is unreachable.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{netns::Netns, unique_name};

/// The node: a namespace holding the bridge all pods hang on.
#[derive(Debug)]
pub struct Node {
    ns: Netns,
    next: u16,
}

/// A pod: its own network namespace with one interface on the node's bridge.
#[derive(Debug)]
pub struct Pod {
    /// Name given by the test (also the backend identity).
    pub name: String,
    /// The pod's network namespace.
    pub ns: Netns,
    /// IPv4 address.
    pub ip4: Ipv4Addr,
    /// IPv6 address.
    pub ip6: Ipv6Addr,
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Node {
    /// Creates the node namespace and its bridge.
    #[must_use]
    pub fn new() -> Self {
        let ns = Netns::new(&unique_name("node"));
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Self { ns, next: 2 }
    }

    /// The node's namespace (where the pods' host-side veths `p2`, `p3`, … and the bridge are).
    #[must_use]
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Adds a pod with the next free addresses.
    pub fn add_pod(&mut self, name: &str) -> Pod {
        let idx = self.next;
        self.next += 1;
        assert!(idx < 250, "too many pods on one test node");
        let ns = Netns::new(&unique_name(name));
        let host_if = format!("p{idx}");
        self.ns.ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", ns.name()]);
        self.ns.ip(&["link", "set", &host_if, "master", "br0", "up"]);
        #[expect(clippy::cast_possible_truncation, reason = "idx < 250")]
        let ip4 = Ipv4Addr::new(10, 244, 0, idx as u8);
        let ip6 = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, idx);
        ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
        ns.ip(&["-6", "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        Pod { name: name.to_owned(), ns, ip4, ip6 }
    }
}
