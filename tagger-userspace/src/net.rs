//! Conversions between std's addresses and the datapath's encoding (network-order words, IPv4
//! as IPv4-mapped IPv6, ports in network order).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use tagger_common::{
    Backend, FAMILY_V4, FAMILY_V6, FrontendKey, IPPROTO_TCP, IPPROTO_UDP, is_v4_mapped, v4_mapped,
};

/// Transport protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The IP protocol number.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    /// From an IP protocol number.
    #[must_use]
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("unknown protocol {other:?} (expected tcp or udp)")),
        }
    }
}

/// An address as four network-order words; IPv4 as IPv4-mapped IPv6.
#[must_use]
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// The inverse of [`addr_words`]: IPv4-mapped words become an IPv4 address.
#[must_use]
pub fn words_addr(words: &[u32; 4]) -> IpAddr {
    if is_v4_mapped(words) {
        return IpAddr::V4(Ipv4Addr::from(words[3].to_ne_bytes()));
    }
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(o))
}

/// A host-order port as the datapath stores it (network order).
#[must_use]
pub const fn port_be(port: u16) -> u16 {
    port.to_be()
}

/// The frontend key of a Service address.
#[must_use]
pub fn frontend_key(addr: SocketAddr, proto: Proto) -> FrontendKey {
    FrontendKey { addr: addr_words(addr.ip()), port: port_be(addr.port()), proto: proto.number(), _pad: 0 }
}

/// The Service address and protocol of a frontend key.
#[must_use]
pub fn frontend_addr(key: &FrontendKey) -> (SocketAddr, Option<Proto>) {
    (SocketAddr::new(words_addr(&key.addr), u16::from_be(key.port)), Proto::from_number(key.proto))
}

/// The datapath record of a backend address.
#[must_use]
pub fn backend(addr: SocketAddr) -> Backend {
    let family = if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
    Backend { addr: addr_words(addr.ip()), port: port_be(addr.port()), family, _pad: 0 }
}

/// The address of a backend record.
#[must_use]
pub fn backend_addr(b: &Backend) -> SocketAddr {
    SocketAddr::new(words_addr(&b.addr), u16::from_be(b.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in ["10.96.0.10:80", "[fd00:96::10]:8080", "[::1]:1", "0.0.0.0:0"] {
            let a: SocketAddr = s.parse().unwrap();
            assert_eq!(backend_addr(&backend(a)), a);
            let (back, proto) = frontend_addr(&frontend_key(a, Proto::Udp));
            assert_eq!((back, proto), (a, Some(Proto::Udp)));
        }
    }

    #[test]
    fn v4_and_mapped_v6_share_a_key() {
        let v4: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.96.0.10]:80".parse().unwrap();
        assert_eq!(frontend_key(v4, Proto::Tcp), frontend_key(mapped, Proto::Tcp));
    }

    #[test]
    fn port_is_network_order() {
        let k = frontend_key("10.0.0.1:80".parse().unwrap(), Proto::Tcp);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!(k.proto, 6);
    }
}
