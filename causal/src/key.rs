//! The key: an app's outbound TCP connection, as the app sees it.
//!
//! The library takes it from the app's socket (`getsockname` and the address given to
//! `connect`); the proxy computes the same from its side of the connection: the peer port
//! of the accepted connection, and the original destination (iptables capture) or its own
//! listening address (`HTTP_PROXY` capture).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::layout;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// The app's local port.
    pub local_port: u16,
    /// The port the app connected to.
    pub peer_port: u16,
    /// The address the app connected to, IPv6; IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
    pub peer_ip: [u8; 16],
}

impl Key {
    pub fn new(local_port: u16, peer: SocketAddr) -> Key {
        Key {
            local_port,
            peer_port: peer.port(),
            peer_ip: mapped(peer.ip()).octets(),
        }
    }

    /// The key for an IPv4 peer given as network-order octets.
    pub const fn v4(local_port: u16, peer_ip: [u8; 4], peer_port: u16) -> Key {
        let [a, b, c, d] = peer_ip;
        Key {
            local_port,
            peer_port,
            peer_ip: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
        }
    }

    /// The key's 20 bytes as stored in a slot (offsets 4..24).
    pub fn bytes(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..2].copy_from_slice(&self.local_port.to_le_bytes());
        b[2..4].copy_from_slice(&self.peer_port.to_le_bytes());
        b[4..20].copy_from_slice(&self.peer_ip);
        b
    }

    /// The key as the five slot words 1..6.
    pub fn words(&self) -> [u32; 5] {
        let ip = &self.peer_ip;
        let w = |i: usize| u32::from_le_bytes([ip[i], ip[i + 1], ip[i + 2], ip[i + 3]]);
        [
            u32::from(self.local_port) | u32::from(self.peer_port) << 16,
            w(0),
            w(4),
            w(8),
            w(12),
        ]
    }

    /// The key from slot words 1..6.
    pub fn from_words(words: [u32; 5]) -> Key {
        let mut peer_ip = [0u8; 16];
        for (chunk, word) in peer_ip.chunks_exact_mut(4).zip(&words[1..]) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        Key {
            local_port: words[0] as u16,
            peer_port: (words[0] >> 16) as u16,
            peer_ip,
        }
    }

    pub fn hash(&self) -> u32 {
        layout::hash(&self.bytes())
    }
}

/// An address as IPv6, IPv4 mapped.
fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ipv4_is_mapped() {
        let k = Key::new(40000, "10.1.2.3:80".parse().unwrap());
        assert_eq!(k, Key::v4(40000, [10, 1, 2, 3], 80));
        let k6 = Key::new(40000, "[::ffff:10.1.2.3]:80".parse().unwrap());
        assert_eq!(k, k6);
    }

    proptest! {
        #[test]
        fn words_and_bytes_agree(local in any::<u16>(), port in any::<u16>(), ip in any::<[u8; 16]>()) {
            let k = Key { local_port: local, peer_port: port, peer_ip: ip };
            prop_assert_eq!(Key::from_words(k.words()), k);
            let mut from_words = Vec::new();
            for w in k.words() {
                from_words.extend_from_slice(&w.to_le_bytes());
            }
            prop_assert_eq!(&from_words[..], &k.bytes()[..]);
        }
    }
}
