//! `tracecar-proxy wait-ready`: blocks until the local proxy answers `/ready`, for the
//! postStart hook that holds the app back when the proxy runs as a regular container.

use std::time::{Duration, Instant};

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Args)]
pub struct WaitReadyArgs {
    /// Admin address of the proxy.
    #[arg(long, env = "TRACECAR_ADMIN_LISTEN", default_value = "127.0.0.1:15190")]
    pub admin: String,
    /// How long to wait (e.g. 60s).
    #[arg(long, default_value = "60s")]
    pub timeout: String,
}

async fn ready_once(addr: &str) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    if s.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await, Ok(Ok(n)) if buf[..n].starts_with(b"HTTP/1.1 200"))
}

/// Polls until ready; errors after the timeout.
pub async fn run(args: &WaitReadyArgs) -> anyhow::Result<()> {
    let timeout = crate::config::parse_duration(&args.timeout).ok_or_else(|| {
        anyhow::anyhow!(
            "invalid --timeout value {:?}: expected a duration such as 60s",
            args.timeout
        )
    })?;
    // 0.0.0.0 is where the proxy listens, not an address to connect to.
    let addr = args.admin.replace("0.0.0.0", "127.0.0.1");
    let started = Instant::now();
    while started.elapsed() < timeout {
        if ready_once(&addr).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("proxy at {addr} not ready after {timeout:?}")
}
