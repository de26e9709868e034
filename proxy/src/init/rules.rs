//! The nat ruleset, rendered as `iptables-restore` input: a pure function of the settings.
//!
//! Rules are written exactly as `iptables-save` prints them (same option order, same chain
//! order), so the rendered text can be compared line by line with what the kernel holds.
//!
//! ```text
//! PREROUTING -p tcp ──> TRACECAR_INBOUND
//!     proxy's own ports ─────────────────────────> RETURN
//!     --skip-inbound-ports ──────────────────────> RETURN
//!     everything else ──> TRACECAR_INBOUND_REDIRECT ──> REDIRECT :15143
//! OUTPUT -p tcp ──> TRACECAR_OUTPUT
//!     uid 2140 (the proxy itself) ───────────────> RETURN
//!     -o lo to 127.0.0.1 / ::1 ──────────────────> RETURN
//!     -o lo to the proxy's own ports ────────────> RETURN
//!     --skip-outbound-cidrs, --skip-outbound-ports > RETURN
//!     everything else ──> TRACECAR_OUTBOUND_REDIRECT ─> REDIRECT :15140
//! ```

use super::parse::{Cidr, PortRange};

/// Chain for TCP arriving at the pod (jumped to from `PREROUTING`).
pub const INBOUND: &str = "TRACECAR_INBOUND";
/// Chain whose single rule redirects to the inbound listener.
pub const INBOUND_REDIRECT: &str = "TRACECAR_INBOUND_REDIRECT";
/// Chain for TCP that processes of the pod open (jumped to from `OUTPUT`).
pub const OUTPUT: &str = "TRACECAR_OUTPUT";
/// Chain whose single rule redirects to the outbound listener.
pub const OUTBOUND_REDIRECT: &str = "TRACECAR_OUTBOUND_REDIRECT";

/// Our chains in the order `iptables-save` lists them (alphabetical).
pub const CHAINS: [&str; 4] = [INBOUND, INBOUND_REDIRECT, OUTBOUND_REDIRECT, OUTPUT];

/// The jumps from the built-in chains into ours, as `iptables-save` prints them.
pub const JUMPS: [&str; 2] = [
    "-A PREROUTING -p tcp -j TRACECAR_INBOUND",
    "-A OUTPUT -p tcp -j TRACECAR_OUTPUT",
];

/// `iptables-restore` takes at most 15 ports per `multiport` match (a range counts twice).
const MULTIPORT_SLOTS: usize = 15;

/// The address family a ruleset is for (`iptables` or `ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::Ipv4 => "127.0.0.1/32",
            Family::Ipv6 => "::1/128",
        }
    }

    /// The program that loads this family's rules (before the back-end suffix).
    pub fn program(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables",
            Family::Ipv6 => "ip6tables",
        }
    }
}

/// What the rules capture and skip: the validated settings of `init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    pub proxy_uid: u32,
    pub skip_inbound_ports: Vec<PortRange>,
    pub skip_outbound_ports: Vec<PortRange>,
    pub skip_outbound_cidrs: Vec<Cidr>,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            inbound_port: 15143,
            outbound_port: 15140,
            admin_port: 15190,
            proxy_uid: 2140,
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
        }
    }
}

impl Rules {
    /// The proxy's own listener ports, sorted and without duplicates.
    fn own_ports(&self) -> Vec<PortRange> {
        let mut ports = vec![self.outbound_port, self.inbound_port, self.admin_port];
        ports.sort_unstable();
        ports.dedup();
        ports.into_iter().map(PortRange::one).collect()
    }
}

/// The complete `iptables-restore --noflush` input for one family: declares (and so creates or
/// flushes) our four chains, fills them, and jumps to them from `PREROUTING` and `OUTPUT`.
pub fn render(rules: &Rules, family: Family) -> String {
    let mut out = String::from("*nat\n");
    for chain in CHAINS {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for jump in JUMPS {
        out.push_str(jump);
        out.push('\n');
    }
    let mut add = |chain: &str, spec: &str| out.push_str(&format!("-A {chain} {spec}\n"));

    // Inbound: never the proxy's own ports (admin, and no loops through the listeners).
    for ports in multiport(&rules.own_ports()) {
        add(
            INBOUND,
            &format!("-p tcp -m multiport --dports {ports} -j RETURN"),
        );
    }
    for ports in multiport(&rules.skip_inbound_ports) {
        add(
            INBOUND,
            &format!("-p tcp -m multiport --dports {ports} -j RETURN"),
        );
    }
    add(INBOUND, &format!("-p tcp -j {INBOUND_REDIRECT}"));
    add(
        INBOUND_REDIRECT,
        &format!("-p tcp -j REDIRECT --to-ports {}", rules.inbound_port),
    );
    add(
        OUTBOUND_REDIRECT,
        &format!("-p tcp -j REDIRECT --to-ports {}", rules.outbound_port),
    );

    // Outbound: the proxy's own connections leave as they are.
    add(
        OUTPUT,
        &format!("-m owner --uid-owner {} -j RETURN", rules.proxy_uid),
    );
    // Loopback to localhost: containers of the pod talking to each other, and apps that use
    // the outbound listener as HTTP_PROXY.
    add(OUTPUT, &format!("-d {} -o lo -j RETURN", family.loopback()));
    // Loopback to the proxy's ports on the pod's own address: no loops.
    for ports in multiport(&rules.own_ports()) {
        add(
            OUTPUT,
            &format!("-o lo -p tcp -m multiport --dports {ports} -j RETURN"),
        );
    }
    let want_v4 = family == Family::Ipv4;
    for cidr in rules
        .skip_outbound_cidrs
        .iter()
        .filter(|c| c.is_ipv4() == want_v4)
    {
        add(OUTPUT, &format!("-d {cidr} -j RETURN"));
    }
    for ports in multiport(&rules.skip_outbound_ports) {
        add(
            OUTPUT,
            &format!("-p tcp -m multiport --dports {ports} -j RETURN"),
        );
    }
    add(OUTPUT, &format!("-p tcp -j {OUTBOUND_REDIRECT}"));
    out.push_str("COMMIT\n");
    out
}

/// `multiport --dports` arguments (`a,b:c,...`) for `ranges`, split so each fits 15 slots.
fn multiport(ranges: &[PortRange]) -> Vec<String> {
    let mut groups = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut slots = 0;
    for range in ranges {
        if slots + range.multiport_slots() > MULTIPORT_SLOTS {
            groups.push(current.join(","));
            current.clear();
            slots = 0;
        }
        slots += range.multiport_slots();
        current.push(range.to_string());
    }
    if !current.is_empty() {
        groups.push(current.join(","));
    }
    groups
}

/// Adapts `rendered` to what the nat table holds now (`iptables-save -t nat` output), so that
/// running `init` again changes nothing: a jump that is already there is not added a second
/// time, and any other jump from a built-in chain into a `TRACECAR_` chain (left by an older
/// version) is deleted. Everything happens in the one `iptables-restore` transaction.
pub fn reconcile(rendered: &str, current: &str) -> String {
    let mut present = [false; JUMPS.len()];
    let mut deletes = Vec::new();
    for line in current.lines().map(str::trim_end) {
        let Some(spec) = line.strip_prefix("-A ") else {
            continue;
        };
        let chain = spec.split_whitespace().next().unwrap_or_default();
        if !matches!(chain, "PREROUTING" | "INPUT" | "OUTPUT" | "POSTROUTING") {
            continue;
        }
        let mut words = spec.split_whitespace();
        let targets_ours = words.any(|w| w == "-j" || w == "-g")
            && words.next().is_some_and(|t| t.starts_with("TRACECAR_"));
        if !targets_ours {
            continue;
        }
        match JUMPS.iter().position(|j| *j == line) {
            Some(i) if !present[i] => present[i] = true,
            _ => deletes.push(format!("-D {spec}")),
        }
    }
    let mut out = String::new();
    for line in rendered.lines() {
        if let Some(i) = JUMPS.iter().position(|j| *j == line) {
            if i == 0 {
                for delete in &deletes {
                    out.push_str(delete);
                    out.push('\n');
                }
            }
            if present[i] {
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::parse::{cidr_list, port_list};
    use super::*;

    const DEFAULT_V4: &str = "\
*nat
:TRACECAR_INBOUND - [0:0]
:TRACECAR_INBOUND_REDIRECT - [0:0]
:TRACECAR_OUTBOUND_REDIRECT - [0:0]
:TRACECAR_OUTPUT - [0:0]
-A PREROUTING -p tcp -j TRACECAR_INBOUND
-A OUTPUT -p tcp -j TRACECAR_OUTPUT
-A TRACECAR_INBOUND -p tcp -m multiport --dports 15140,15143,15190 -j RETURN
-A TRACECAR_INBOUND -p tcp -j TRACECAR_INBOUND_REDIRECT
-A TRACECAR_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15143
-A TRACECAR_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15140
-A TRACECAR_OUTPUT -m owner --uid-owner 2140 -j RETURN
-A TRACECAR_OUTPUT -d 127.0.0.1/32 -o lo -j RETURN
-A TRACECAR_OUTPUT -o lo -p tcp -m multiport --dports 15140,15143,15190 -j RETURN
-A TRACECAR_OUTPUT -p tcp -j TRACECAR_OUTBOUND_REDIRECT
COMMIT
";

    #[test]
    fn default_ipv4() {
        assert_eq!(render(&Rules::default(), Family::Ipv4), DEFAULT_V4);
    }

    #[test]
    fn default_ipv6_differs_only_in_loopback() {
        let v6 = render(&Rules::default(), Family::Ipv6);
        assert_eq!(v6, DEFAULT_V4.replace("127.0.0.1/32", "::1/128"));
    }

    #[test]
    fn skips_and_custom_ports() {
        let rules = Rules {
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            proxy_uid: 1337,
            skip_inbound_ports: port_list("22,8000-8100").unwrap(),
            skip_outbound_ports: port_list("5432").unwrap(),
            skip_outbound_cidrs: cidr_list("10.96.0.0/12,fd00:10::/108,169.254.169.254").unwrap(),
        };
        let want_v4 = "\
*nat
:TRACECAR_INBOUND - [0:0]
:TRACECAR_INBOUND_REDIRECT - [0:0]
:TRACECAR_OUTBOUND_REDIRECT - [0:0]
:TRACECAR_OUTPUT - [0:0]
-A PREROUTING -p tcp -j TRACECAR_INBOUND
-A OUTPUT -p tcp -j TRACECAR_OUTPUT
-A TRACECAR_INBOUND -p tcp -m multiport --dports 4140,4143,4191 -j RETURN
-A TRACECAR_INBOUND -p tcp -m multiport --dports 22,8000:8100 -j RETURN
-A TRACECAR_INBOUND -p tcp -j TRACECAR_INBOUND_REDIRECT
-A TRACECAR_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4143
-A TRACECAR_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4140
-A TRACECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A TRACECAR_OUTPUT -d 127.0.0.1/32 -o lo -j RETURN
-A TRACECAR_OUTPUT -o lo -p tcp -m multiport --dports 4140,4143,4191 -j RETURN
-A TRACECAR_OUTPUT -d 10.96.0.0/12 -j RETURN
-A TRACECAR_OUTPUT -d 169.254.169.254/32 -j RETURN
-A TRACECAR_OUTPUT -p tcp -m multiport --dports 5432 -j RETURN
-A TRACECAR_OUTPUT -p tcp -j TRACECAR_OUTBOUND_REDIRECT
COMMIT
";
        assert_eq!(render(&rules, Family::Ipv4), want_v4);
        let v6 = render(&rules, Family::Ipv6);
        assert!(v6.contains("-A TRACECAR_OUTPUT -d fd00:10::/108 -j RETURN\n"));
        assert!(!v6.contains("10.96.0.0"));
        assert!(v6.contains("-A TRACECAR_OUTPUT -d ::1/128 -o lo -j RETURN\n"));
    }

    #[test]
    fn long_port_lists_are_split_into_multiport_groups() {
        // 10 ranges take 20 slots: 7 ranges (14 slots) + 3 ranges.
        let list: Vec<String> = (0..10)
            .map(|i| format!("{}-{}", 1000 + i * 10, 1005 + i * 10))
            .collect();
        let rules = Rules {
            skip_outbound_ports: port_list(&list.join(",")).unwrap(),
            ..Rules::default()
        };
        let text = render(&rules, Family::Ipv4);
        assert!(text.contains(
            "--dports 1000:1005,1010:1015,1020:1025,1030:1035,1040:1045,1050:1055,1060:1065 -j RETURN\n"
        ));
        assert!(text.contains("--dports 1070:1075,1080:1085,1090:1095 -j RETURN\n"));
        assert_eq!(multiport(&port_list(&"1,".repeat(15)).unwrap()).len(), 1);
        let fifteen: Vec<String> = (1..=16).map(|p| p.to_string()).collect();
        assert_eq!(
            multiport(&port_list(&fifteen.join(",")).unwrap()),
            ["1,2,3,4,5,6,7,8,9,10,11,12,13,14,15", "16"]
        );
    }

    #[test]
    fn reconcile_on_a_fresh_table_is_the_rendering() {
        let fresh = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(reconcile(DEFAULT_V4, fresh), DEFAULT_V4);
        assert_eq!(reconcile(DEFAULT_V4, ""), DEFAULT_V4);
    }

    #[test]
    fn reconcile_keeps_existing_jumps_and_drops_stale_ones() {
        let current = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:TRACECAR_INBOUND - [0:0]
-A PREROUTING -p tcp -j TRACECAR_INBOUND
-A PREROUTING -p tcp -j TRACECAR_INBOUND
-A OUTPUT -j TRACECAR_OUTPUT
-A OUTPUT -p udp -j OTHER
-A TRACECAR_INBOUND -p tcp -j TRACECAR_INBOUND_REDIRECT
COMMIT
";
        let got = reconcile(DEFAULT_V4, current);
        let want = DEFAULT_V4.replace(
            "-A PREROUTING -p tcp -j TRACECAR_INBOUND\n",
            "-D PREROUTING -p tcp -j TRACECAR_INBOUND\n-D OUTPUT -j TRACECAR_OUTPUT\n",
        );
        assert_eq!(got, want);
        // Both jumps in place: neither is added again.
        let installed = DEFAULT_V4;
        let again = reconcile(DEFAULT_V4, installed);
        assert!(!again.contains("-A PREROUTING"));
        assert!(!again.contains("-A OUTPUT"));
        assert!(!again.contains("-D "));
    }
}
