//! Parsing of the values `init` accepts: ports, port lists with ranges, CIDR lists, and the
//! IPv6 address table of the namespace.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One port or an inclusive range of ports (`8080` or `8000-8100`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// A single port.
    pub fn one(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// How many of the 15 slots of an iptables `multiport` match this takes.
    pub fn multiport_slots(self) -> usize {
        if self.first == self.last {
            1
        } else {
            2
        }
    }
}

/// iptables syntax: `8080` or `8000:8100`.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// A port, 1-65535.
pub fn port(s: &str) -> Option<u16> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(p) => Some(p),
    }
}

/// A comma-separated list of ports and ranges `a-b` (`a <= b`); empty items are ignored, so an
/// empty string is an empty list.
pub fn port_list(s: &str) -> Option<Vec<PortRange>> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let range = match item.split_once('-') {
            Some((a, b)) => {
                let (first, last) = (port(a)?, port(b)?);
                if first > last {
                    return None;
                }
                PortRange { first, last }
            }
            None => PortRange::one(port(item)?),
        };
        if !out.contains(&range) {
            out.push(range);
        }
    }
    Some(out)
}

/// An IPv4 or IPv6 network; the host bits are cleared, as iptables does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Builds a network from any address in it.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let addr = match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) if prefix <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
            _ => return None,
        };
        Some(Self { addr, prefix })
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

/// `10.0.0.0/8`, `fd00::/8` (iptables-save's spelling).
impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `addr/prefix`, or a bare address meaning that one host.
impl FromStr for Cidr {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(());
                }
                (a, Some(p.parse::<u8>().map_err(|_| ())?))
            }
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| ())?;
        let host = if addr.is_ipv4() { 32 } else { 128 };
        Cidr::new(addr, prefix.unwrap_or(host)).ok_or(())
    }
}

/// A comma-separated list of CIDRs; empty items are ignored.
pub fn cidr_list(s: &str) -> Option<Vec<Cidr>> {
    let mut out: Vec<Cidr> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let cidr: Cidr = item.parse().ok()?;
        if !out.contains(&cidr) {
            out.push(cidr);
        }
    }
    Some(out)
}

/// Whether `/proc/net/if_inet6` (its text) lists a global-scope address on an interface other
/// than `lo`. Lines are `addr ifindex prefixlen scope flags name`; scope `00` is global (this
/// includes unique-local `fd00::/8` addresses, which pods use too).
pub fn has_global_ipv6(if_inet6: &str) -> bool {
    if_inet6.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_, _, _, "00", _, name] if *name != "lo")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(s: &str) -> Vec<String> {
        port_list(s)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn ports_and_ranges() {
        assert_eq!(ranges(""), Vec::<String>::new());
        assert_eq!(
            ranges(" 22 , 8000-8100,,443,22"),
            ["22", "8000:8100", "443"]
        );
        assert_eq!(ranges("1-65535"), ["1:65535"]);
        assert_eq!(ranges("80-80"), ["80"]);
        for bad in [
            "0",
            "65536",
            "-1",
            "80-",
            "-80",
            "90-80",
            "http",
            "8o",
            "1.5",
            "80 81",
            "+80",
            "80-90-100",
        ] {
            assert_eq!(port_list(bad), None, "{bad:?}");
        }
        assert_eq!(port("15143"), Some(15143));
        assert_eq!(port("0"), None);
        assert_eq!(port(""), None);
    }

    #[test]
    fn cidrs() {
        let list =
            cidr_list("10.0.0.0/8, 192.168.1.7/24,fd00::1/8,2001:db8::1,169.254.169.254").unwrap();
        let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "10.0.0.0/8",
                "192.168.1.0/24",
                "fd00::/8",
                "2001:db8::1/128",
                "169.254.169.254/32"
            ]
        );
        assert_eq!(cidr_list("0.0.0.0/0").unwrap()[0].to_string(), "0.0.0.0/0");
        assert_eq!(cidr_list("::/0").unwrap()[0].to_string(), "::/0");
        assert_eq!(cidr_list(""), Some(vec![]));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "example.com",
            "10.0.0.0/8/9",
        ] {
            assert_eq!(cidr_list(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn global_ipv6_detection() {
        let lo_only = "00000000000000000000000000000001 01 80 10 80       lo\n";
        let link_local = "fe80000000000000a8c1abfffe000001 02 40 20 80     eth0\n";
        let ula = "fd000233000000000000000000000002 02 40 00 80     eth0\n";
        assert!(!has_global_ipv6(""));
        assert!(!has_global_ipv6(lo_only));
        assert!(!has_global_ipv6(&format!("{lo_only}{link_local}")));
        assert!(has_global_ipv6(&format!("{lo_only}{link_local}{ula}")));
    }

    /// Property tests over arbitrary and mutated values.
    mod fuzz {
        use super::*;
        use crate::fuzzing::{self, mutate_str, mutations, text};
        use proptest::prelude::*;

        const PIECES: &[&str] = &[
            ",",
            "-",
            "/",
            ":",
            "::",
            ".",
            "0",
            "65535",
            "65536",
            "4294967296",
            "/0",
            "/32",
            "/128",
            "10.0.0.0",
            "fd00::",
            " ",
            "%eth0",
            "+",
        ];

        /// Arbitrary text, or a valid value mutated.
        fn value(valid: &'static [&'static str]) -> impl Strategy<Value = String> {
            let mutated = (prop::sample::select(valid), mutations())
                .prop_map(|(v, m)| mutate_str(v, &m, PIECES));
            prop_oneof![text(), mutated]
        }

        fn range() -> impl Strategy<Value = PortRange> {
            (1u16.., 1u16..).prop_map(|(a, b)| PortRange {
                first: a.min(b),
                last: a.max(b),
            })
        }

        fn cidr() -> impl Strategy<Value = Cidr> {
            prop_oneof![
                (any::<std::net::Ipv4Addr>(), 0u8..=32).prop_map(|(a, p)| (IpAddr::V4(a), p)),
                (any::<std::net::Ipv6Addr>(), 0u8..=128).prop_map(|(a, p)| (IpAddr::V6(a), p)),
            ]
            .prop_filter_map("valid prefix", |(a, p)| Cidr::new(a, p))
        }

        /// Blanks that may surround a list item.
        fn blank() -> impl Strategy<Value = &'static str> {
            prop::sample::select(&["", " ", "\t", "  "][..])
        }

        proptest! {
            #![proptest_config(fuzzing::config())]

            #[test]
            fn fuzz_port(v in value(&["8080", "1", "65535"])) {
                if let Some(p) = port(&v) {
                    prop_assert!(p > 0);
                    let digits = v.trim().trim_start_matches('0');
                    prop_assert_eq!(digits, p.to_string(), "{:?}", v);
                }
            }

            #[test]
            fn fuzz_port_round_trip(p in 1u16.., pad in blank()) {
                prop_assert_eq!(port(&format!("{pad}{p}{pad}")), Some(p));
            }

            /// Accepted lists hold ranges `1 <= first <= last`, without duplicates.
            #[test]
            fn fuzz_port_list(v in value(&["22,8000-8100", "1-65535,443", ""])) {
                if let Some(list) = port_list(&v) {
                    for (i, r) in list.iter().enumerate() {
                        prop_assert!(1 <= r.first && r.first <= r.last, "{v:?}: {r:?}");
                        prop_assert!(!list[..i].contains(r), "{v:?}: {r:?} twice");
                    }
                }
            }

            #[test]
            fn fuzz_port_list_round_trip(
                ranges in prop::collection::vec((range(), blank(), any::<bool>()), 0..24),
            ) {
                let text: Vec<String> = ranges
                    .iter()
                    .map(|(r, pad, dash)| match (r.first == r.last, dash) {
                        (true, false) => format!("{pad}{}{pad}", r.first),
                        _ => format!("{pad}{}-{}{pad}", r.first, r.last),
                    })
                    .collect();
                let mut want: Vec<PortRange> = Vec::new();
                for (r, _, _) in &ranges {
                    if !want.contains(r) {
                        want.push(*r);
                    }
                }
                prop_assert_eq!(port_list(&text.join(",")), Some(want));
            }

            /// An accepted CIDR prints as iptables-save does and reads back the same; its host
            /// bits are clear.
            #[test]
            fn fuzz_cidr(v in value(&["10.0.0.0/8", "fd00::1/8", "192.168.1.7", "::/0"])) {
                if let Ok(c) = v.parse::<Cidr>() {
                    prop_assert_eq!(c.to_string().parse::<Cidr>(), Ok(c));
                    prop_assert_eq!(Cidr::new(c.addr, c.prefix), Some(c));
                }
                if let Some(list) = cidr_list(&v) {
                    let max = |c: &Cidr| if c.is_ipv4() { 32 } else { 128 };
                    prop_assert!(list.iter().all(|c| c.prefix <= max(c)), "{:?}", list);
                }
            }

            #[test]
            fn fuzz_cidr_list_round_trip(
                cidrs in prop::collection::vec((cidr(), blank()), 0..12),
            ) {
                let text: Vec<String> =
                    cidrs.iter().map(|(c, pad)| format!("{pad}{c}{pad}")).collect();
                let mut want: Vec<Cidr> = Vec::new();
                for (c, _) in &cidrs {
                    prop_assert_eq!(Cidr::new(c.addr, c.prefix), Some(*c));
                    if !want.contains(c) {
                        want.push(*c);
                    }
                }
                prop_assert_eq!(cidr_list(&text.join(",")), Some(want));
            }

            /// Any address in a network gives that network (host bits cleared).
            #[test]
            fn fuzz_cidr_clears_host_bits(c in cidr(), noise in any::<u128>()) {
                // The low `bits - prefix` bits of `noise`.
                let host = |prefix: u8, bits: u32| {
                    noise & (u128::MAX >> (128 - bits)).checked_shr(prefix.into()).unwrap_or(0)
                };
                let addr = match c.addr {
                    IpAddr::V4(a) => {
                        let h = host(c.prefix, 32) as u32;
                        IpAddr::V4((u32::from(a) | h).into())
                    }
                    IpAddr::V6(a) => IpAddr::V6((u128::from(a) | host(c.prefix, 128)).into()),
                };
                prop_assert_eq!(Cidr::new(addr, c.prefix), Some(c));
            }

            /// `/proc/net/if_inet6`: arbitrary text never panics; a global address on another
            /// interface than `lo` is found among any other lines.
            #[test]
            fn fuzz_has_global_ipv6(
                v in value(&["fe80000000000000a8c1abfffe000001 02 40 20 80     eth0\n"]),
                name in "[a-z][a-z0-9]{0,7}",
            ) {
                let seen = has_global_ipv6(&v);
                let ula = format!("fd000233000000000000000000000002 02 40 00 80 {name}\n");
                let with = format!("{v}\n{ula}");
                prop_assert_eq!(has_global_ipv6(&with), name != "lo" || seen);
            }
        }
    }
}
