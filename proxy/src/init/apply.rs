//! The thin, impure part of `init`: choosing the iptables back-end and loading the rules.
//!
//! Kernels and images differ: some pods' tables live in nf_tables (`iptables-nft`), others in
//! the legacy x_tables (`iptables-legacy`), and rules in one are invisible to the other. `auto`
//! follows whichever already holds rules in this namespace, and prefers nft on a clean one.

use std::io::Write;
use std::process::{Command, Stdio};

use super::rules::{self, Family, Rules};
use super::{BackendChoice, InitError};

/// An iptables back-end, named by its programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft-restore` and friends (nf_tables).
    Nft,
    /// `iptables-legacy-restore` and friends (x_tables).
    Legacy,
    /// Plain `iptables-restore`: images whose iptables has no `-nft`/`-legacy` programs.
    Default,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
            Backend::Default => "default",
        }
    }

    /// `iptables-nft-restore`, `ip6tables-legacy-save`, ...
    fn program(self, family: Family, tool: &str) -> String {
        match self {
            Backend::Default => format!("{}-{tool}", family.program()),
            _ => format!("{}-{}-{tool}", family.program(), self.name()),
        }
    }
}

/// Picks the back-end for `choice`: `auto` takes the one whose tables hold more rules now, and
/// on a clean namespace nft, then legacy, then plain `iptables-restore`, whichever runs.
pub fn resolve(choice: BackendChoice) -> Result<Backend, InitError> {
    match choice {
        BackendChoice::Nft => Ok(Backend::Nft),
        BackendChoice::Legacy => Ok(Backend::Legacy),
        BackendChoice::Auto => {
            let nft = count_rules(Backend::Nft);
            let legacy = count_rules(Backend::Legacy);
            tracing::debug!(?nft, ?legacy, "rules per iptables back-end");
            if let Some(backend) = choose(nft, legacy) {
                return Ok(backend);
            }
            match count_rules(Backend::Default) {
                Some(_) => Ok(Backend::Default),
                None => Err(InitError::NoBackend(
                    "none of iptables-nft-save, iptables-legacy-save, iptables-save runs \
                     (is iptables installed, and does the container have NET_ADMIN?)"
                        .into(),
                )),
            }
        }
    }
}

/// The `auto` decision from the rule counts of nft and legacy (`None`: the program failed).
fn choose(nft: Option<usize>, legacy: Option<usize>) -> Option<Backend> {
    match (nft, legacy) {
        (Some(n), Some(l)) if l > n => Some(Backend::Legacy),
        (Some(_), _) => Some(Backend::Nft),
        (None, Some(_)) => Some(Backend::Legacy),
        (None, None) => None,
    }
}

/// How many rules (`-A` lines) all IPv4 tables of `backend` hold, or `None` if its save
/// program does not run here.
fn count_rules(backend: Backend) -> Option<usize> {
    let program = backend.program(Family::Ipv4, "save");
    let output = Command::new(&program)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Some(text.lines().filter(|l| l.starts_with("-A ")).count())
}

/// Loads the rules for `family` with `<family>-<backend>-restore --noflush`, in one
/// transaction, adapted to what the nat table holds now (see [`rules::reconcile`]).
pub fn apply(backend: Backend, family: Family, rules: &Rules) -> Result<(), InitError> {
    let rendered = rules::render(rules, family);
    let save = backend.program(family, "save");
    // If the table cannot be read (e.g. nat not loaded yet) it holds none of our jumps;
    // iptables-restore reports any real problem below.
    let current = run(&save, &["-t", "nat"], None).unwrap_or_else(|err| {
        tracing::debug!(%err, "cannot read the nat table; assuming it is empty");
        String::new()
    });
    let input = rules::reconcile(&rendered, &current);
    let restore = backend.program(family, "restore");
    run(&restore, &["--wait", "--noflush"], Some(&input))?;
    Ok(())
}

/// Runs `program args`, feeding `stdin`, and returns its stdout; a failure carries stderr.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, InitError> {
    let spawn_err = |source| InitError::Spawn {
        program: program.to_owned(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A program that exits without reading all of its input is judged by its status.
        match pipe.write_all(input.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(spawn_err(e)),
            _ => {}
        }
    }
    let output = child.wait_with_output().map_err(spawn_err)?;
    if !output.status.success() {
        return Err(InitError::Failed {
            program: format!("{program} {}", args.join(" ")),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr)
                .trim()
                .replace('\n', "; "),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_names() {
        assert_eq!(
            Backend::Nft.program(Family::Ipv4, "restore"),
            "iptables-nft-restore"
        );
        assert_eq!(
            Backend::Legacy.program(Family::Ipv6, "save"),
            "ip6tables-legacy-save"
        );
        assert_eq!(
            Backend::Default.program(Family::Ipv4, "restore"),
            "iptables-restore"
        );
    }

    #[test]
    fn auto_follows_existing_rules_and_prefers_nft() {
        assert_eq!(choose(Some(0), Some(0)), Some(Backend::Nft));
        assert_eq!(choose(Some(0), Some(3)), Some(Backend::Legacy));
        assert_eq!(choose(Some(5), Some(3)), Some(Backend::Nft));
        assert_eq!(choose(Some(2), Some(2)), Some(Backend::Nft));
        assert_eq!(choose(None, Some(0)), Some(Backend::Legacy));
        assert_eq!(choose(Some(0), None), Some(Backend::Nft));
        assert_eq!(choose(None, None), None);
    }

    #[test]
    fn failures_carry_the_program_and_its_stderr() {
        let err = run("sh", &["-c", "echo bad rule >&2; exit 3"], Some("x")).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("sh -c"), "{text}");
        assert!(text.contains("bad rule"), "{text}");
        let err = run("/nonexistent/iptables-restore", &[], None).unwrap_err();
        assert!(matches!(err, InitError::Spawn { .. }));
    }
}
