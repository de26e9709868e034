//! The end-to-end test harness: run the real `tracecar-proxy` binary against real upstream
//! servers and a real OTLP receiver, all on loopback.
//!
//! - [`sink`]: the OTLP receiver (gRPC and http/protobuf, optional TLS).
//! - [`app`]: an uninstrumented upstream app with echo, status, streaming, upgrade and
//!   call-out routes.
//! - [`raw`]: raw TCP on both sides: a byte-exact client and scripted, recording raw apps.
//! - [`ProxyProcess`]: the proxy binary with its environment, stopped with SIGTERM.

pub mod app;
pub mod certs;
pub mod raw;
pub mod sink;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The workspace's `target/debug` (or `$CARGO_TARGET_DIR/debug`).
pub fn target_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("debug")
}

/// A binary of this workspace built with `profile` (`debug`, `release`); panics with the build
/// command when it is missing.
pub fn built_bin(profile: &str, name: &str) -> PathBuf {
    let bin = target_dir().with_file_name(profile).join(name);
    let flag = if profile == "release" {
        " --release"
    } else {
        ""
    };
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build{flag} --workspace` first",
        bin.display()
    );
    bin
}

/// The proxy binary `cargo build --workspace` produced.
pub fn proxy_bin() -> PathBuf {
    built_bin("debug", "tracecar-proxy")
}

/// Polls `f` every 50 ms until it holds or `timeout` passes; whether it held.
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// The injector binary `cargo build --workspace` produced.
pub fn injector_bin() -> PathBuf {
    built_bin("debug", "tracecar-injector")
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running `tracecar-proxy run`.
pub struct ProxyProcess {
    child: Child,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub stderr_path: PathBuf,
    pub stdout_path: PathBuf,
}

/// Settings most tests want: loopback listeners, fast export.
pub fn base_env(sink_endpoint: &str) -> Vec<(String, String)> {
    [
        ("OTEL_TRACES_EXPORTER", "otlp"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", sink_endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_SERVICE_NAME", "test-svc"),
        ("TRACECAR_LOG", "info"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl ProxyProcess {
    /// Starts the proxy with `env` (on top of loopback listener addresses) and waits for /ready.
    /// A free port can be taken by another test between `free_port` and the proxy's bind: then
    /// it starts again on other ports.
    pub fn spawn(env: &[(String, String)]) -> ProxyProcess {
        Self::spawn_limited(env, None)
    }

    /// [`ProxyProcess::spawn`] with at most `max_files` open file descriptors (RLIMIT_NOFILE).
    pub fn spawn_limited(env: &[(String, String)], max_files: Option<u64>) -> ProxyProcess {
        for _ in 0..4 {
            let mut p = Self::spawn_once(env, max_files);
            match p.try_wait_ready(Duration::from_secs(10)) {
                Ok(()) => return p,
                Err(e) if e.contains("Address already in use") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free ports for the proxy after 4 tries");
    }

    fn spawn_once(env: &[(String, String)], max_files: Option<u64>) -> ProxyProcess {
        let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let outbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let dir = std::env::temp_dir().join(format!(
            "tracecar-test-{}-{}",
            std::process::id(),
            inbound.port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let stderr_path = dir.join("stderr.log");
        let stdout_path = dir.join("stdout.log");
        let mut cmd = Command::new(proxy_bin());
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TRACECAR_INBOUND_LISTEN", inbound.to_string())
            .env("TRACECAR_OUTBOUND_LISTEN", outbound.to_string())
            .env("TRACECAR_ADMIN_LISTEN", admin.to_string())
            // scripts/test.sh runs the suites again on one runtime thread (the current-thread
            // scheduler a one-CPU pod gets); a test's own setting still wins.
            .envs(
                std::env::var("TRACECAR_TEST_WORKER_THREADS")
                    .ok()
                    .map(|v| ("TRACECAR_WORKER_THREADS".to_string(), v)),
            )
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
        if let Some(n) = max_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn tracecar-proxy");
        ProxyProcess {
            child,
            inbound,
            outbound,
            admin,
            stderr_path,
            stdout_path,
        }
    }

    fn try_wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("proxy exited early ({status}): {}", self.stderr()));
            }
            if http_get_blocking(self.admin, "/ready")
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        Err(format!(
            "proxy not ready after {timeout:?}: {}",
            self.stderr()
        ))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> String {
        http_get_blocking(self.admin, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The value of one metric line (exact name with labels), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("proxy did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM:")
    }

    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A minimal blocking HTTP/1.0 GET, for readiness and metrics polling.
pub fn http_get_blocking(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Sends raw bytes and returns everything the server answers until it closes or goes quiet.
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// True when running in CI, where nothing may be skipped silently.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// Finds `python3` with the OpenTelemetry SDK; `None` (with a printed reason) if unusable.
/// In CI its absence fails the test.
pub fn python_with_otel() -> Option<String> {
    let ok = Command::new("python3")
        .args(["-c", "import opentelemetry.sdk, opentelemetry.propagators.b3, opentelemetry.propagators.jaeger"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return Some("python3".into());
    }
    if in_ci() {
        panic!("python3 with opentelemetry-sdk is required in CI (install tests/requirements.txt)");
    }
    // Straight to stderr: `eprintln!` is captured by the test harness, so the skip would not show.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIP: python3 with opentelemetry-sdk not installed (pip install -r tests/requirements.txt)"
    );
    None
}
