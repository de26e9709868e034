//! `tracecar-injector`: `serve` (the admission webhook) and `inject` (manual injection).

use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracecar_injector::config::{Cli, Command, ConfigError, InjectArgs, ServeArgs};
use tracecar_injector::{manual, server};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Inject(args) => inject(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<ConfigError>() {
                eprintln!("error: {c}");
                return ExitCode::from(2);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRACECAR_INJECTOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(false)
        .init();
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = args.validate()?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cfg.worker_threads {
        rt.worker_threads(n);
    }
    let rt = rt.build().context("starting the tokio runtime")?;
    rt.block_on(async move {
        let running = server::start(server::Options {
            listen: cfg.listen,
            admin_listen: cfg.admin_listen,
            tls_cert: cfg.tls_cert,
            tls_key: cfg.tls_key,
            tls_reload_interval: cfg.tls_reload_interval,
            shutdown_timeout: cfg.shutdown_timeout,
            defaults: cfg.defaults,
        })
        .await?;
        wait_for_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        running.shutdown().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
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

fn inject(args: InjectArgs) -> anyhow::Result<()> {
    let defaults = args.defaults.validate()?;
    let mut input = String::new();
    if args.file == "-" {
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading stdin")?;
    } else {
        input = std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file))?;
    }
    let out = manual::run(&input, &defaults, args.uninject)?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    std::io::stdout()
        .write_all(out.text.as_bytes())
        .context("writing stdout")?;
    Ok(())
}
