//! Correlation with a real header-blind app under concurrency: a Python `ThreadingHTTPServer`
//! that serves `/in/<n>` by calling `/out/<n>/a` and `/out/<n>/b` on a backend through the
//! proxy's outbound listener (as a forward proxy), with small random pauses, and forwards no
//! trace headers. The paths are the ground truth: the cause of `/out/<n>/*` is `/in/<n>`.
//!
//! Run with `--nocapture` to see the measured shares per policy and concurrency.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tracecar_tests::app::{get, App};
use tracecar_tests::sink::{RecvSpan, Sink};
use tracecar_tests::{base_env, ProxyProcess};

/// The bound on links of an ambiguous span (proxy `correlate::MAX_LINKS`, docs/proxy.md).
const MAX_LINKS: usize = 8;

const FRONT_APP: &str = r#"
import random, socketserver, sys, time, urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer

proxy, backend, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
shape = sys.argv[4] if len(sys.argv) > 4 else "threads"
# Explicit proxy: the app's calls go through the outbound listener without iptables.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": "http://" + proxy}))

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        n = self.path.split("/")[2]
        for leg in ("a", "b"):
            time.sleep(random.uniform(0.001, 0.015))
            # No trace headers are forwarded: the app knows nothing of tracing.
            with opener.open("http://%s/out/%s/%s" % (backend, n, leg), timeout=10) as r:
                r.read()
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Forking(socketserver.ForkingMixIn, HTTPServer):
    pass

# A thread per connection, or a process per connection.
server = (Forking if shape == "fork" else ThreadingHTTPServer)(("127.0.0.1", port), Handler)
server.request_queue_size = 128
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// The Python app; killed when dropped.
struct FrontApp {
    child: Child,
    port: u16,
}

impl FrontApp {
    /// The app on `port`, calling `backend` through the forward proxy at `proxy`, with `env`
    /// (the preload library's variables, when used).
    fn start(
        proxy: &str,
        backend: &str,
        port: u16,
        shape: &str,
        env: &[(String, String)],
    ) -> FrontApp {
        let apps = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../preload/tests/apps");
        let backend_port = backend.rsplit(':').next().unwrap_or_default();
        let proxy_port = proxy.rsplit(':').next().unwrap_or_default();
        let mut cmd = match shape {
            // The Node.js and JVM apps of the preload library's own tests, given the forward
            // proxy and the port to listen on.
            "node-sockets" | "node-timer" => {
                let mut c = Command::new("node");
                c.arg(apps.join("frontend.js")).args([
                    backend_port,
                    shape.trim_start_matches("node-"),
                    proxy_port,
                    &port.to_string(),
                ]);
                c
            }
            "jvm" => {
                let mut c = Command::new("java");
                c.arg(apps.join("Frontend.java")).args([
                    backend_port,
                    proxy_port,
                    &port.to_string(),
                ]);
                c
            }
            _ => {
                let mut c = Command::new("python3");
                c.args([
                    "-u",
                    "-c",
                    FRONT_APP,
                    proxy,
                    backend,
                    &port.to_string(),
                    shape,
                ]);
                c
            }
        };
        let mut child = cmd
            .envs(env.iter().map(|(k, v)| (k, v)))
            // The explicit proxy must be used for loopback too.
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout).read_line(&mut line).expect("port");
        let port = line.trim().parse().expect("the app prints its port");
        FrontApp { child, port }
    }
}

impl Drop for FrontApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the CLIENT spans of one run came out against the ground truth.
#[derive(Debug, Default)]
struct Outcome {
    clients: usize,
    think: u64,
    /// Parented on the SERVER span of their own `/in/<n>`.
    right: Vec<RecvSpan>,
    /// Parented on another request's SERVER span (or anything else).
    wrong: Vec<RecvSpan>,
    unparented: Vec<RecvSpan>,
    /// `/in/<n>` → its SERVER span id.
    servers: HashMap<String, String>,
}

impl Outcome {
    fn total(&self) -> usize {
        self.right.len() + self.wrong.len() + self.unparented.len()
    }

    fn report(&self, policy: &str) {
        let pct = |n: usize| 100.0 * n as f64 / self.total().max(1) as f64;
        println!(
            "correlation={policy} clients={} think={}ms: {} CLIENT spans: parented {} ({:.0}%), unparented {} ({:.0}%), wrong parent {} ({:.0}% of all, {:.0}% of parented)",
            self.clients,
            self.think,
            self.total(),
            self.right.len() + self.wrong.len(),
            pct(self.right.len() + self.wrong.len()),
            self.unparented.len(),
            pct(self.unparented.len()),
            self.wrong.len(),
            pct(self.wrong.len()),
            100.0 * self.wrong.len() as f64 / (self.right.len() + self.wrong.len()).max(1) as f64,
        );
    }
}

/// `n` of `/in/<n>` or `/out/<n>/<leg>`.
fn request_of(span: &RecvSpan) -> String {
    let path = span.attr_str("url.path").unwrap_or_default();
    path.split('/').nth(2).unwrap_or_default().to_string()
}

/// Drives `requests` requests from `clients` concurrent clients through a proxy with
/// `TRACECAR_CORRELATION=policy` and sorts the CLIENT spans against the ground truth. With
/// `think`, each client pauses up to `think` ms before each request, so the app's concurrency
/// varies (sometimes one request in flight, sometimes several).
async fn run(policy: &str, clients: usize, requests: usize, think: u64) -> Outcome {
    run_with(policy, clients, requests, think, false, "threads").await
}

/// [`run`], with the preload library in the app when `preload`: the proxy creates the causal
/// table in a fresh directory (as on the injected volume) and copies the library there; the app
/// loads it from there with `LD_PRELOAD`, as an injected container does.
async fn run_with(
    policy: &str,
    clients: usize,
    requests: usize,
    think: u64,
    preload: bool,
    shape: &str,
) -> Outcome {
    let sink = Sink::start().await;
    let volume = std::env::temp_dir().join(format!(
        "tracecar-causal-{}-{}",
        std::process::id(),
        tracecar_tests::free_port()
    ));
    let table = volume.join("causal").display().to_string();
    let mut app_env = Vec::new();
    let mut proxy_env = vec![(
        "TRACECAR_CAUSAL_TABLE".to_string(),
        // No volume: no table, the proxy falls back.
        if preload {
            table.clone()
        } else {
            "/nonexistent/causal".into()
        },
    )];
    if preload {
        std::fs::create_dir_all(&volume).expect("volume");
        let library = tracecar_tests::built_bin("debug", "libtracecar_preload.so");
        proxy_env.push((
            "TRACECAR_PRELOAD_SOURCE".into(),
            library.display().to_string(),
        ));
        app_env.push((
            "LD_PRELOAD".to_string(),
            // As the injector names it: glibc expands $PLATFORM (musl skips the entry).
            volume
                .join("lib/$PLATFORM/libtracecar_preload.so")
                .display()
                .to_string(),
        ));
        app_env.push(("TRACECAR_CAUSAL_TABLE".to_string(), table));
        // As the injector adds it: the Node.js hook the proxy wrote to the volume (other
        // runtimes ignore the variable).
        app_env.push((
            "NODE_OPTIONS".to_string(),
            format!("--require={}", volume.join("node/tracecar.js").display()),
        ));
    }
    let backend = App::start().await;
    // The proxy needs the app's address and the app the proxy's: the app's port is chosen first.
    let front_port = tracecar_tests::free_port();
    let mut env = base_env(&sink.endpoint());
    env.extend(
        [
            ("TRACECAR_INBOUND_TARGET", format!("127.0.0.1:{front_port}")),
            ("TRACECAR_CORRELATION", policy.to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    env.extend(proxy_env);
    let proxy = ProxyProcess::spawn(&env);
    let front = FrontApp::start(
        &proxy.outbound.to_string(),
        &backend.addr.to_string(),
        front_port,
        shape,
        &app_env,
    );
    assert_eq!(front.port, front_port);

    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let next = next.clone();
            let inbound = proxy.inbound;
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if n >= requests {
                        return;
                    }
                    if think > 0 {
                        // Spread without a random number generator: n walks the range.
                        let ms = (n as u64 * 7919) % think;
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    let (status, _, _) = get(&format!("http://{inbound}/in/{n}"), &[]).await;
                    assert_eq!(status, 200, "/in/{n}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client");
    }
    let spans = sink.wait_for(3 * requests, Duration::from_secs(30)).await;

    let mut out = Outcome {
        clients,
        think,
        ..Outcome::default()
    };
    for s in spans.iter().filter(|s| s.kind == "SERVER") {
        out.servers.insert(request_of(s), s.span_id.clone());
    }
    assert_eq!(out.servers.len(), requests, "one SERVER span per /in/<n>");
    for s in spans.into_iter().filter(|s| s.kind == "CLIENT") {
        if s.parent_span_id.is_empty() {
            out.unparented.push(s);
        } else if out.servers.get(&request_of(&s)) == Some(&s.parent_span_id) {
            out.right.push(s);
        } else {
            out.wrong.push(s);
        }
    }
    assert_eq!(out.total(), 2 * requests, "two CLIENT spans per request");
    out.report(&format!(
        "{}{}",
        if preload { "causal+preload" } else { policy },
        if shape == "threads" {
            String::new()
        } else {
            format!(" ({shape})")
        }
    ));
    let _ = std::fs::remove_dir_all(&volume);
    out
}

/// The default policy's promise: not one wrong parent, and an honest root otherwise.
fn assert_causal(out: &Outcome) {
    assert!(
        out.wrong.is_empty(),
        "wrong parents under causal: {:#?}",
        out.wrong
    );
    for s in &out.right {
        assert_eq!(s.attr_str("tracecar.correlation"), Some("sole"), "{s:#?}");
        assert!(s.links.is_empty());
    }
    let mut cause_beyond_the_bound = 0;
    for s in &out.unparented {
        assert_eq!(
            s.attr_str("tracecar.correlation"),
            Some("ambiguous"),
            "{s:#?}"
        );
        // Ambiguous means at least two candidates; the links are bounded.
        assert!((2..=MAX_LINKS).contains(&s.links.len()), "{s:#?}");
        let cause = &out.servers[&request_of(s)];
        let linked = s.links.iter().any(|l| &l.span_id == cause);
        // The cause is always in flight; it can only be missing when the bound cut it off.
        if !linked {
            assert_eq!(s.links.len(), MAX_LINKS, "cause not linked: {s:#?}");
            cause_beyond_the_bound += 1;
        }
    }
    println!(
        "  ambiguous spans whose cause was beyond the {MAX_LINKS} links: {cause_beyond_the_bound}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causal_never_gives_a_wrong_parent_under_concurrency() {
    // Saturated: every client has a request outstanding nearly all the time.
    let out = run("causal", 8, 80, 0).await;
    assert_causal(&out);
    assert!(
        !out.unparented.is_empty(),
        "8 concurrent clients must leave some calls ambiguous (else this test proves nothing)"
    );
    // Varying concurrency: sole and ambiguous calls mixed.
    assert_causal(&run("causal", 8, 80, 300).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causal_parents_every_call_when_one_request_is_served_at_a_time() {
    let out = run("causal", 1, 20, 0).await;
    assert!(out.wrong.is_empty(), "{:#?}", out.wrong);
    assert!(out.unparented.is_empty(), "{:#?}", out.unparented);
    for s in &out.right {
        assert_eq!(s.attr_str("tracecar.correlation"), Some("sole"), "{s:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_guesses_every_parent_and_says_so() {
    // One at a time the guess is certain, and says so.
    let out = run("inflight", 1, 20, 0).await;
    assert!(
        out.wrong.is_empty() && out.unparented.is_empty(),
        "{out:#?}"
    );
    for s in &out.right {
        assert_eq!(s.attr_str("tracecar.correlation"), Some("sole"), "{s:#?}");
    }
    run("inflight", 8, 80, 300).await;
    let out = run("inflight", 8, 80, 0).await;
    assert!(out.unparented.is_empty(), "{:#?}", out.unparented);
    for s in out.right.iter().chain(&out.wrong) {
        let how = s.attr_str("tracecar.correlation");
        assert!(matches!(how, Some("inflight" | "sole")), "{s:#?}");
        assert!(s.links.is_empty());
    }
    // A sole parent is certain, so every wrong one was a guess that said so.
    for s in &out.wrong {
        assert_eq!(s.attr_str("tracecar.correlation"), Some("inflight"));
    }
}

/// With the preload library in the app, the table names each call's cause: every call is
/// parented exactly (`causal`) at 8 and 32 clients in parallel, a thread per connection or a
/// process per connection, and none wrongly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preload_library_gives_every_call_its_exact_parent() {
    exact_parents(&[(8, "threads"), (32, "threads"), (8, "fork")]).await;
}

/// The same through the real proxy for the other runtimes, wired as the injector wires them:
/// Node.js with keep-alive calls whose continuations follow socket reads, Node.js awaiting a
/// timer before each call (the runtime hook, loaded with `NODE_OPTIONS` from the file the
/// proxy wrote to the volume), and a JVM (`com.sun.net.httpserver` with a 16-thread pool,
/// `HttpURLConnection` through the proxy, whose keep-alive cache hands connections between
/// threads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_jvm_apps_get_their_exact_parents_through_the_proxy() {
    for runtime in ["node", "java"] {
        // In CI the runtimes are installed (scripts/install-deps.sh): never skip there.
        if Command::new(runtime).arg("--version").output().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{runtime} is missing in CI"
            );
            eprintln!("SKIPPED: no {runtime}");
            return;
        }
    }
    exact_parents(&[
        (8, "node-sockets"),
        (32, "node-timer"),
        (8, "node-timer"),
        (8, "jvm"),
        (32, "jvm"),
    ])
    .await;
}

async fn exact_parents(runs: &[(usize, &str)]) {
    for &(clients, shape) in runs {
        let out = run_with("causal", clients, 96, 0, true, shape).await;
        assert!(out.wrong.is_empty(), "wrong parents: {:#?}", out.wrong);
        for s in &out.right {
            assert_eq!(s.attr_str("tracecar.correlation"), Some("causal"), "{s:#?}");
        }
        // (A call the library could not attribute falls back honestly; none is expected here.)
        assert!(
            out.right.len() * 100 >= out.total() * 99,
            "{} of {} parented exactly",
            out.right.len(),
            out.total()
        );
    }
}
