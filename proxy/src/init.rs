//! `tracecar-proxy init`: programs the pod's network namespace with iptables so that the app's
//! traffic passes through the proxy.

/// Flags of `tracecar-proxy init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Print the rules instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
}

/// Installs (or with `--dry-run` prints) the rules.
pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("init is not implemented yet")
}
