//! `tracecar-proxy init`: programs the pod's network namespace with iptables so that the app's
//! traffic passes through the proxy.
//!
//! It runs once per pod, as an init container with `NET_ADMIN`, before the app starts:
//! - [`InitArgs`] are the flags (each also an environment variable), validated into [`Rules`];
//! - [`rules::render`] turns them into one `iptables-restore` input per address family, a pure
//!   function (so `--dry-run` prints exactly what would be loaded);
//! - [`apply`] picks the iptables back-end (nft or legacy) and loads the input atomically with
//!   `iptables-restore --noflush`, leaving every other rule of the namespace alone.
//!
//! `docs/interception.md` explains the rules.

pub mod apply;
pub mod parse;
pub mod rules;

use std::path::Path;

pub use rules::{Family, Rules};

/// Flags of `tracecar-proxy init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Print the rules (the iptables-restore input) instead of installing them.
    #[arg(long)]
    pub dry_run: bool,

    /// Port of the proxy's inbound listener; inbound TCP is redirected to it.
    #[arg(
        long,
        env = "TRACECAR_INBOUND_PORT",
        default_value = "15143",
        value_name = "PORT"
    )]
    pub inbound_port: String,

    /// Port of the proxy's outbound listener; the app's outgoing TCP is redirected to it.
    #[arg(
        long,
        env = "TRACECAR_OUTBOUND_PORT",
        default_value = "15140",
        value_name = "PORT"
    )]
    pub outbound_port: String,

    /// Port of the proxy's admin listener; never redirected.
    #[arg(
        long,
        env = "TRACECAR_ADMIN_PORT",
        default_value = "15190",
        value_name = "PORT"
    )]
    pub admin_port: String,

    /// User id the proxy runs as; its own connections are never redirected.
    #[arg(
        long,
        env = "TRACECAR_PROXY_UID",
        default_value = "2140",
        value_name = "UID"
    )]
    pub proxy_uid: String,

    /// Inbound ports that bypass the proxy: comma-separated ports and ranges `a-b`.
    #[arg(
        long,
        env = "TRACECAR_SKIP_INBOUND_PORTS",
        default_value = "",
        value_name = "PORTS"
    )]
    pub skip_inbound_ports: String,

    /// Outbound destination ports that bypass the proxy: comma-separated ports and ranges `a-b`.
    #[arg(
        long,
        env = "TRACECAR_SKIP_OUTBOUND_PORTS",
        default_value = "",
        value_name = "PORTS"
    )]
    pub skip_outbound_ports: String,

    /// Outbound destinations that bypass the proxy: comma-separated IPv4/IPv6 CIDRs.
    #[arg(
        long,
        env = "TRACECAR_SKIP_OUTBOUND_CIDRS",
        default_value = "",
        value_name = "CIDRS"
    )]
    pub skip_outbound_cidrs: String,

    /// iptables back-end: `auto` (the one that already has rules, else nft), `nft`, `legacy`.
    #[arg(
        long,
        env = "TRACECAR_IPTABLES_BACKEND",
        default_value = "auto",
        value_name = "BACKEND"
    )]
    pub iptables_backend: String,

    /// IPv6 rules (ip6tables): `auto` (when the namespace has a global IPv6 address), `on`, `off`.
    #[arg(
        long,
        env = "TRACECAR_IPV6",
        default_value = "auto",
        value_name = "MODE"
    )]
    pub ipv6: String,
}

/// Which iptables back-end to program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Nft,
    Legacy,
}

/// Whether to program IPv6 too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Mode {
    Auto,
    On,
    Off,
}

/// The validated settings of `init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    pub dry_run: bool,
    pub rules: Rules,
    pub backend: BackendChoice,
    pub ipv6: Ipv6Mode,
}

/// Why `init` failed. [`InitError::exit_code`] is the process exit status to use.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A flag or variable has a value we do not accept (exit status 2).
    #[error("invalid value {value:?} for {flag} (env {env}): expected {expected}")]
    InvalidValue {
        flag: &'static str,
        env: &'static str,
        value: String,
        expected: &'static str,
    },
    /// No iptables back-end could be run.
    #[error("no usable iptables back-end: {0}")]
    NoBackend(String),
    /// A program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// `iptables-restore` (or another program) failed.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
}

impl InitError {
    /// 2 for invalid settings (like a usage error), 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            InitError::InvalidValue { .. } => 2,
            _ => 1,
        }
    }
}

/// The exit status for an error returned by [`run`]: 2 for invalid settings, else 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    err.downcast_ref::<InitError>()
        .map_or(1, InitError::exit_code)
}

const PORT: &str = "a port number 1-65535";
const PORTS: &str = "a comma-separated list of ports 1-65535 and ranges a-b, e.g. 22,8000-8100";
const CIDRS: &str = "a comma-separated list of IPv4/IPv6 CIDRs, e.g. 10.0.0.0/8,fd00::/8";

impl InitArgs {
    /// Validates the flags into a typed config.
    pub fn config(&self) -> Result<InitConfig, InitError> {
        fn invalid(
            flag: &'static str,
            env: &'static str,
            value: &str,
            expected: &'static str,
        ) -> InitError {
            InitError::InvalidValue {
                flag,
                env,
                value: value.to_owned(),
                expected,
            }
        }
        macro_rules! check {
            ($parse:expr, $field:ident, $flag:literal, $env:literal, $expected:expr) => {
                $parse(&self.$field).ok_or_else(|| invalid($flag, $env, &self.$field, $expected))?
            };
        }
        let uid = |s: &str| s.trim().parse::<u32>().ok();
        let rules = Rules {
            inbound_port: check!(
                parse::port,
                inbound_port,
                "--inbound-port",
                "TRACECAR_INBOUND_PORT",
                PORT
            ),
            outbound_port: check!(
                parse::port,
                outbound_port,
                "--outbound-port",
                "TRACECAR_OUTBOUND_PORT",
                PORT
            ),
            admin_port: check!(
                parse::port,
                admin_port,
                "--admin-port",
                "TRACECAR_ADMIN_PORT",
                PORT
            ),
            proxy_uid: check!(
                uid,
                proxy_uid,
                "--proxy-uid",
                "TRACECAR_PROXY_UID",
                "a numeric user id"
            ),
            skip_inbound_ports: check!(
                parse::port_list,
                skip_inbound_ports,
                "--skip-inbound-ports",
                "TRACECAR_SKIP_INBOUND_PORTS",
                PORTS
            ),
            skip_outbound_ports: check!(
                parse::port_list,
                skip_outbound_ports,
                "--skip-outbound-ports",
                "TRACECAR_SKIP_OUTBOUND_PORTS",
                PORTS
            ),
            skip_outbound_cidrs: check!(
                parse::cidr_list,
                skip_outbound_cidrs,
                "--skip-outbound-cidrs",
                "TRACECAR_SKIP_OUTBOUND_CIDRS",
                CIDRS
            ),
        };
        let backend = |s: &str| match s.trim() {
            "auto" => Some(BackendChoice::Auto),
            "nft" => Some(BackendChoice::Nft),
            "legacy" => Some(BackendChoice::Legacy),
            _ => None,
        };
        let ipv6 = |s: &str| match s.trim() {
            "auto" => Some(Ipv6Mode::Auto),
            "on" => Some(Ipv6Mode::On),
            "off" => Some(Ipv6Mode::Off),
            _ => None,
        };
        Ok(InitConfig {
            dry_run: self.dry_run,
            rules,
            backend: check!(
                backend,
                iptables_backend,
                "--iptables-backend",
                "TRACECAR_IPTABLES_BACKEND",
                "one of auto, nft, legacy"
            ),
            ipv6: check!(
                ipv6,
                ipv6,
                "--ipv6",
                "TRACECAR_IPV6",
                "one of auto, on, off"
            ),
        })
    }
}

/// Installs (or with `--dry-run` prints) the rules.
///
/// Errors are [`InitError`]s inside the `anyhow::Error`; [`exit_code`] maps them to the exit
/// status (2 for an invalid flag or variable).
pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let ipv6 = match config.ipv6 {
        Ipv6Mode::On => true,
        Ipv6Mode::Off => false,
        Ipv6Mode::Auto => namespace_has_global_ipv6(),
    };
    if config.dry_run {
        print!("{}", dry_run_text(&config.rules, ipv6));
        return Ok(());
    }
    let backend = apply::resolve(config.backend)?;
    let mut families = vec![Family::Ipv4];
    if ipv6 {
        families.push(Family::Ipv6);
    }
    for family in families {
        apply::apply(backend, family, &config.rules)?;
        tracing::info!(
            backend = backend.name(),
            family = family.program(),
            inbound_port = config.rules.inbound_port,
            outbound_port = config.rules.outbound_port,
            proxy_uid = config.rules.proxy_uid,
            "installed the nat rules"
        );
    }
    Ok(())
}

/// What `--dry-run` prints: the IPv4 input and, with IPv6, the IPv6 input, each behind a comment
/// line (valid `iptables-restore` syntax).
pub fn dry_run_text(rules: &Rules, ipv6: bool) -> String {
    let mut out = String::from("# tracecar-proxy init: iptables-restore --noflush input (IPv4)\n");
    out.push_str(&rules::render(rules, Family::Ipv4));
    if ipv6 {
        out.push_str("# tracecar-proxy init: ip6tables-restore --noflush input (IPv6)\n");
        out.push_str(&rules::render(rules, Family::Ipv6));
    }
    out
}

/// Whether this network namespace has a global-scope IPv6 address (`/proc/net/if_inet6`; the
/// file is missing when IPv6 is disabled).
fn namespace_has_global_ipv6() -> bool {
    std::fs::read_to_string(Path::new("/proc/net/if_inet6"))
        .map(|text| parse::has_global_ipv6(&text))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn args(argv: &[&str]) -> InitArgs {
        let mut full = vec!["init"];
        full.extend(argv);
        Cli::try_parse_from(full).unwrap().init
    }

    #[test]
    fn defaults() {
        let config = args(&[]).config().unwrap();
        assert_eq!(config.rules, Rules::default());
        assert_eq!(config.backend, BackendChoice::Auto);
        assert_eq!(config.ipv6, Ipv6Mode::Auto);
        assert!(!config.dry_run);
    }

    #[test]
    fn flags_are_parsed() {
        let config = args(&[
            "--dry-run",
            "--skip-inbound-ports",
            "22,8000-8100",
            "--skip-outbound-cidrs",
            "10.0.0.0/8,fd00::/8",
            "--iptables-backend",
            "legacy",
            "--ipv6",
            "off",
            "--proxy-uid",
            "1337",
        ])
        .config()
        .unwrap();
        assert!(config.dry_run);
        assert_eq!(config.backend, BackendChoice::Legacy);
        assert_eq!(config.ipv6, Ipv6Mode::Off);
        assert_eq!(config.rules.proxy_uid, 1337);
        assert_eq!(config.rules.skip_inbound_ports.len(), 2);
        assert_eq!(config.rules.skip_outbound_cidrs.len(), 2);
    }

    #[test]
    fn invalid_values_name_the_flag_the_variable_and_what_is_accepted() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--skip-inbound-ports", "80,http"],
                "invalid value \"80,http\" for --skip-inbound-ports (env TRACECAR_SKIP_INBOUND_PORTS): \
                 expected a comma-separated list of ports 1-65535 and ranges a-b, e.g. 22,8000-8100",
            ),
            (
                &["--skip-outbound-cidrs", "10.0.0.0/40"],
                "invalid value \"10.0.0.0/40\" for --skip-outbound-cidrs (env TRACECAR_SKIP_OUTBOUND_CIDRS): \
                 expected a comma-separated list of IPv4/IPv6 CIDRs, e.g. 10.0.0.0/8,fd00::/8",
            ),
            (
                &["--inbound-port", "0"],
                "invalid value \"0\" for --inbound-port (env TRACECAR_INBOUND_PORT): \
                 expected a port number 1-65535",
            ),
            (
                &["--iptables-backend", "ebpf"],
                "invalid value \"ebpf\" for --iptables-backend (env TRACECAR_IPTABLES_BACKEND): \
                 expected one of auto, nft, legacy",
            ),
            (
                &["--ipv6", "yes"],
                "invalid value \"yes\" for --ipv6 (env TRACECAR_IPV6): expected one of auto, on, off",
            ),
            (
                &["--proxy-uid=-1"],
                "invalid value \"-1\" for --proxy-uid (env TRACECAR_PROXY_UID): expected a numeric user id",
            ),
        ];
        for (argv, want) in cases {
            let err = args(argv).config().unwrap_err();
            assert_eq!(err.to_string(), *want);
            assert_eq!(err.exit_code(), 2);
            let err = anyhow::Error::from(err);
            assert_eq!(exit_code(&err), 2);
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn run_rejects_invalid_values_before_touching_anything() {
        let err = run(&args(&["--skip-outbound-ports", "99999"])).unwrap_err();
        assert_eq!(exit_code(&err), 2);
        assert!(err.to_string().contains("--skip-outbound-ports"));
    }

    #[test]
    fn dry_run_text_has_one_input_per_family() {
        let v4 = dry_run_text(&Rules::default(), false);
        assert!(v4
            .starts_with("# tracecar-proxy init: iptables-restore --noflush input (IPv4)\n*nat\n"));
        assert_eq!(v4.matches("COMMIT").count(), 1);
        let both = dry_run_text(&Rules::default(), true);
        assert_eq!(both.matches("COMMIT").count(), 2);
        assert!(both.contains("# tracecar-proxy init: ip6tables-restore --noflush input (IPv6)\n"));
        assert!(both.contains("-d ::1/128 -o lo -j RETURN"));
    }

    /// Property tests: every `init` setting fed arbitrary and mutated values.
    mod fuzz {
        use super::*;
        use crate::fuzzing::{self, mutate_str, mutations, text};
        use proptest::prelude::*;

        type Set = fn(&mut InitArgs, String);

        /// Every setting of `init` with a variable: the variable, how to set it, valid values.
        fn fields() -> Vec<(&'static str, Set, &'static [&'static str])> {
            vec![
                (
                    "TRACECAR_INBOUND_PORT",
                    |a, v| a.inbound_port = v,
                    &["15143"],
                ),
                (
                    "TRACECAR_OUTBOUND_PORT",
                    |a, v| a.outbound_port = v,
                    &["15140"],
                ),
                ("TRACECAR_ADMIN_PORT", |a, v| a.admin_port = v, &["15190"]),
                ("TRACECAR_PROXY_UID", |a, v| a.proxy_uid = v, &["2140", "0"]),
                (
                    "TRACECAR_SKIP_INBOUND_PORTS",
                    |a, v| a.skip_inbound_ports = v,
                    &["22,8000-8100"],
                ),
                (
                    "TRACECAR_SKIP_OUTBOUND_PORTS",
                    |a, v| a.skip_outbound_ports = v,
                    &["5432"],
                ),
                (
                    "TRACECAR_SKIP_OUTBOUND_CIDRS",
                    |a, v| a.skip_outbound_cidrs = v,
                    &["10.0.0.0/8,fd00::/8"],
                ),
                (
                    "TRACECAR_IPTABLES_BACKEND",
                    |a, v| a.iptables_backend = v,
                    &["nft", "legacy"],
                ),
                ("TRACECAR_IPV6", |a, v| a.ipv6 = v, &["on", "off", "auto"]),
            ]
        }

        #[test]
        fn every_setting_is_fuzzed() {
            use clap::CommandFactory;
            let fuzzed: Vec<&str> = fields().iter().map(|f| f.0).collect();
            for arg in Cli::command().get_arguments() {
                if let Some(env) = arg.get_env() {
                    let env = env.to_str().unwrap_or_default();
                    assert!(fuzzed.contains(&env), "{env} is not in fields()");
                }
            }
        }

        const PIECES: &[&str] = &[
            ",",
            "-",
            "/",
            ":",
            "0",
            "65536",
            "10.0.0.0/8",
            "fd00::/8",
            " ",
        ];

        /// `--dports` groups of the rendered rules: each within the 15 slots of `multiport`.
        fn check_rendered(rules: &Rules) -> Result<(), TestCaseError> {
            for family in [Family::Ipv4, Family::Ipv6] {
                let text = rules::render(rules, family);
                for line in text.lines() {
                    prop_assert!(!line.contains('\r'));
                    if let Some((_, rest)) = line.split_once("--dports ") {
                        let ports = rest.split(' ').next().unwrap_or_default();
                        let slots: usize = ports
                            .split(',')
                            .map(|p| if p.contains(':') { 2 } else { 1 })
                            .sum();
                        prop_assert!(slots <= 15, "{line}");
                    }
                    if let Some(cidr) = line.strip_prefix("-A TRACECAR_OUTPUT -d ") {
                        let cidr = cidr.split(' ').next().unwrap_or_default();
                        let v4 = cidr.parse::<parse::Cidr>().map(|c| c.is_ipv4());
                        if !cidr.starts_with("127.0.0.1") && cidr != "::1/128" {
                            prop_assert_eq!(v4, Ok(family == Family::Ipv4), "{}", line);
                        }
                    }
                }
                // Running again over what it installed adds no jump twice.
                let again = rules::reconcile(&text, &text);
                for jump in rules::JUMPS {
                    prop_assert!(!again.lines().any(|l| l == jump), "{again}");
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(fuzzing::config())]

            /// One setting at a time: never a panic, valid values are accepted, an error names
            /// the setting's variable and the value; accepted rules render within iptables'
            /// limits.
            #[test]
            fn fuzz_init_setting_alone(
                (i, v, valid) in (0..fields().len()).prop_flat_map(|i| {
                    let valid = fields()[i].2;
                    let mutated = (prop::sample::select(valid), mutations())
                        .prop_map(|(v, m)| mutate_str(v, &m, PIECES));
                    (Just(i), prop_oneof![text(), mutated], prop::sample::select(valid))
                }),
            ) {
                let (var, set, _) = fields()[i];
                let mut a = args(&[]);
                set(&mut a, valid.to_string());
                prop_assert!(a.config().is_ok(), "{var}={valid:?} refused");
                let mut a = args(&[]);
                set(&mut a, v.clone());
                match a.config() {
                    Ok(c) => check_rendered(&c.rules)?,
                    Err(InitError::InvalidValue { env, value, .. }) => {
                        prop_assert_eq!(env, var);
                        prop_assert_eq!(value, v);
                    }
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }

            /// Many ports and networks: rendered in groups that iptables takes.
            #[test]
            fn fuzz_init_long_lists_render(
                inbound in prop::collection::vec((1u16.., 0u16..3), 0..40),
                outbound in prop::collection::vec(1u16.., 0..40),
                cidrs in prop::collection::vec(
                    prop_oneof!["10\\.[1-9][0-9]?\\.0\\.0/16", "fd[0-9]{2}::/16"], 0..10),
            ) {
                let inbound: Vec<String> = inbound
                    .iter()
                    .map(|(p, w)| match p.checked_add(*w) {
                        Some(q) if *w > 0 => format!("{p}-{q}"),
                        _ => p.to_string(),
                    })
                    .collect();
                let outbound: Vec<String> = outbound.iter().map(u16::to_string).collect();
                let a = args(&[
                    "--skip-inbound-ports",
                    &inbound.join(","),
                    "--skip-outbound-ports",
                    &outbound.join(","),
                    "--skip-outbound-cidrs",
                    &cidrs.join(","),
                ]);
                let c = a.config().map_err(|e| TestCaseError::fail(e.to_string()))?;
                check_rendered(&c.rules)?;
            }

            #[test]
            fn fuzz_reconcile_arbitrary_iptables_save(
                current in prop::collection::vec(
                    prop_oneof![
                        text(),
                        prop::sample::select(&rules::JUMPS[..]).prop_map(String::from),
                        "-A (PREROUTING|OUTPUT|INPUT) -p tcp -j TRACECAR_[A-Z]{0,8}",
                    ],
                    0..12,
                ),
            ) {
                let rendered = rules::render(&Rules::default(), Family::Ipv4);
                let current = current.join("\n");
                let out = rules::reconcile(&rendered, &current);
                // Each jump ends up once: added, or already there.
                for jump in rules::JUMPS {
                    let added = out.lines().filter(|l| *l == jump).count();
                    let there = current.lines().any(|l| l.trim_end() == jump);
                    prop_assert_eq!(added, usize::from(!there), "{}", jump);
                }
            }
        }
    }
}
