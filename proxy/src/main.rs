//! The `tracecar-proxy` binary: `run` the sidecar, `init` the pod's iptables, `demo`, or
//! `wait-ready`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracecar_proxy::trace::Sink;
use tracecar_proxy::{demo, init, wait_ready, Proxy, RunArgs};

#[derive(Debug, Parser)]
#[command(
    name = "tracecar-proxy",
    version,
    about = "tracecar's tracing sidecar proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Program the pod's iptables so its traffic passes through the proxy.
    Init(init::InitArgs),
    /// Start two uninstrumented services behind proxies, send requests, print the traces.
    Demo(demo::DemoArgs),
    /// Wait until the local proxy reports ready.
    WaitReady(wait_ready::WaitReadyArgs),
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The runtime of the short-lived commands (demo, wait-ready).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let config = match args.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tracecar-proxy: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(&config.log);
            // Each data-plane worker is a single-threaded runtime of its own (see proxy.rs); this
            // one, on the main thread, is the first of them and also runs admin (export has a thread).
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tracecar-proxy: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            raise_file_limit();
            rt.block_on(async move {
                let proxy = match Proxy::start(config, Sink::FromConfig).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "start-up failed");
                        eprintln!("tracecar-proxy: {e:#}");
                        return ExitCode::from(2);
                    }
                };
                wait_for_signal().await;
                tracing::info!("shutting down: draining requests and flushing spans");
                proxy.shutdown().await;
                ExitCode::SUCCESS
            })
        }
        Command::Init(args) => {
            init_logging("info");
            match init::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tracecar-proxy init: {e:#}");
                    ExitCode::from(init::exit_code(&e) as u8)
                }
            }
        }
        Command::Demo(args) => {
            init_logging("warn");
            match runtime()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(demo::run(args)))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tracecar-proxy demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::WaitReady(args) => {
            match runtime()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(wait_ready::run(&args)))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tracecar-proxy wait-ready: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit, as nginx's `worker_rlimit_nofile` and
/// Go's runtime do: every proxied connection costs two descriptors, and the soft limit many
/// images start with (1024) is far below what the pod is allowed.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
            && limit.rlim_cur < limit.rlim_max
            && {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
            }
    };
    tracing::debug!(max_files = limit.rlim_cur, raised, "open file limit");
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
