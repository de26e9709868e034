//! What the tests share: the built library, a causal table, a backend that looks every
//! request up in the table as the proxy would, and parallel clients that know their ports.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracecar_causal::{Key, Table};

/// `target/<profile>/libtracecar_preload.so`, freshly built: `cargo test` builds a cdylib's
/// integration tests but not the cdylib itself, so the first test to ask builds it.
/// `TRACECAR_PRELOAD_LIB` names another build to test instead (the shipped one,
/// scripts/build-preload.sh).
pub fn library() -> PathBuf {
    if let Some(lib) = std::env::var_os("TRACECAR_PRELOAD_LIB") {
        let lib = PathBuf::from(lib);
        assert!(
            lib.exists(),
            "TRACECAR_PRELOAD_LIB={} does not exist",
            lib.display()
        );
        return lib;
    }
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    BUILT.call_once(|| {
        let mut cargo = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        cargo
            .args(["build", "-p", "tracecar-preload"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|p| p == "release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p tracecar-preload failed");
    });
    let lib = dir.join("libtracecar_preload.so");
    assert!(lib.exists(), "{} not built", lib.display());
    lib
}

pub fn apps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps")
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub struct TableFile {
    pub dir: tempfile::TempDir,
    pub table: Arc<Table>,
}

impl TableFile {
    pub fn new() -> TableFile {
        let dir = tempfile::tempdir().unwrap();
        let table = Table::create(&dir.path().join("causal"), 4096).unwrap();
        TableFile {
            dir,
            table: Arc::new(table),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("causal")
    }
}

/// One outbound request as the backend saw it: the request's path and what the table said
/// about its connection when the request arrived.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub app_port: u16,
    pub cause: Option<u16>,
}

/// An HTTP/1.1 backend (keep-alive, a thread per connection) that looks each request's
/// connection up in the table when the request head has arrived, as the proxy will.
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Backend {
    pub fn start(table: Arc<Table>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (t, s) = (table.clone(), s.clone());
                std::thread::spawn(move || serve(conn, addr, &t, &s));
            }
        });
        Backend { addr, seen }
    }
}

fn serve(conn: TcpStream, addr: SocketAddr, table: &Table, seen: &Mutex<Vec<Seen>>) {
    let peer = conn.peer_addr().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let key = Key::new(peer.port(), addr);
        let cause = table.lookup(&key);
        seen.lock().unwrap().push(Seen {
            path,
            app_port: peer.port(),
            cause,
        });
        if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_err()
        {
            return;
        }
    }
}

/// Starts `cmd` with the library preloaded and the table named, and reads the port it
/// prints on its first line.
pub fn start_app(mut cmd: Command, table: Option<&Path>) -> (App, u16) {
    cmd.env("LD_PRELOAD", library());
    match table {
        Some(t) => cmd.env("TRACECAR_CAUSAL_TABLE", t),
        None => cmd.env("TRACECAR_CAUSAL_TABLE", "/nonexistent/causal"),
    };
    start_plain(cmd)
}

/// A running app, killed when dropped (also when a test fails).
pub struct App(Child);

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` as it is and reads the port it prints on its first line.
pub fn start_plain(mut cmd: Command) -> (App, u16) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the app");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("the app printed {line:?}, not its port")
    });
    (App(child), port)
}

/// `clients` clients in parallel, each sending `per_client` requests `GET /req/<id>` to the
/// app, `per_conn` per connection (HTTP/1.1 keep-alive). Returns id → the client's local
/// port for that request: the inbound connection's peer port as the app sees it.
pub fn drive(app: u16, clients: u32, per_client: u32, per_conn: u32) -> HashMap<u32, u16> {
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                let mut ports = HashMap::new();
                let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
                for i in 0..per_client {
                    if i % per_conn == 0 {
                        let s = TcpStream::connect(("127.0.0.1", app)).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                        let r = BufReader::new(s.try_clone().unwrap());
                        conn = Some((s, r));
                    }
                    let (s, r) = conn.as_mut().unwrap();
                    let id = c * 10_000 + i;
                    ports.insert(id, s.local_addr().unwrap().port());
                    write!(s, "GET /req/{id} HTTP/1.1\r\nHost: app\r\n\r\n").unwrap();
                    read_response(r);
                }
                ports
            })
        })
        .collect();
    let mut all = HashMap::new();
    for h in handles {
        all.extend(h.join().unwrap());
    }
    all
}

fn read_response(r: &mut BufReader<TcpStream>) {
    let mut len = 0usize;
    let mut first = true;
    loop {
        let mut h = String::new();
        assert!(
            r.read_line(&mut h).unwrap() > 0,
            "the app closed mid-response"
        );
        if first {
            assert!(h.starts_with("HTTP/1.1 200"), "{h:?}");
            first = false;
        }
        if h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub correct: usize,
    pub unknown: usize,
    pub wrong: usize,
}

/// Compares each outbound request's published cause with the port of the inbound
/// connection whose request id is in its path (`/call/<id>/<n>`).
pub fn tally(seen: &[Seen], ports: &HashMap<u32, u16>) -> Tally {
    let mut t = Tally::default();
    for s in seen {
        let id: u32 = s
            .path
            .split('/')
            .nth(2)
            .and_then(|x| x.parse().ok())
            .unwrap();
        match s.cause {
            Some(c) if c == ports[&id] => t.correct += 1,
            None | Some(0) => t.unknown += 1,
            Some(c) => {
                eprintln!(
                    "wrong: {} on app port {} got cause {c}, expected {}",
                    s.path, s.app_port, ports[&id]
                );
                t.wrong += 1
            }
        }
    }
    t
}
