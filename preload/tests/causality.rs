//! Real header-blind apps with the library preloaded: every outbound request's published cause
//! must be the inbound connection whose request caused it (ground truth in the paths).

mod common;

use std::process::Command;

use common::{apps_dir, drive, have, start_app, tally, Backend, TableFile, Tally};

/// Clients in parallel: 8, or `TRACECAR_TEST_CLIENTS` for other figures.
fn clients() -> u32 {
    std::env::var("TRACECAR_TEST_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}
const PER_CLIENT: u32 = 40;

/// Runs the app shape with the clients in parallel and checks every outbound call.
fn check(shape: &str, cmd: impl FnOnce(u16) -> Command, per_conn: u32) {
    let table = TableFile::new();
    let backend = Backend::start(table.table.clone());
    let (app, port) = start_app(cmd(backend.addr.port()), Some(&table.path()));
    let ports = drive(port, clients(), PER_CLIENT, per_conn);
    drop(app);
    let seen = backend.seen.lock().unwrap().clone();
    let t = tally(&seen, &ports);
    eprintln!(
        "{shape}: {} clients in parallel: {t:?} of {}",
        clients(),
        seen.len()
    );
    let expected = (clients() * PER_CLIENT * 2) as usize;
    assert_eq!(
        seen.len(),
        expected,
        "{shape}: every call reached the backend"
    );
    assert_eq!(
        t,
        Tally {
            correct: expected,
            unknown: 0,
            wrong: 0
        },
        "{shape}"
    );
}

/// The Node.js frontend in `mode`, with the runtime hook (`--require preload/node/tracecar.js`)
/// or without.
fn node(mode: &'static str, hook: bool) -> impl FnOnce(u16) -> Command {
    move |backend| {
        let mut c = Command::new("node");
        if hook {
            let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("node/tracecar.js");
            c.arg("--require").arg(js);
        }
        c.arg(apps_dir().join("frontend.js"))
            .arg(backend.to_string())
            .arg(mode);
        c
    }
}

fn python(mode: &'static str) -> impl FnOnce(u16) -> Command {
    move |backend| {
        let mut c = Command::new("python3");
        c.arg(apps_dir().join("frontend.py"))
            .arg(mode)
            .arg(backend.to_string());
        c
    }
}

#[test]
fn python_thread_per_request() {
    check("python threaded", python("threaded"), 1);
}

#[test]
fn python_thread_per_request_keep_alive_both_ways() {
    check("python threaded keep-alive", python("keepalive"), 5);
}

#[test]
fn python_process_per_connection() {
    check("python forking", python("forking"), 1);
}

/// Without the runtime hook, an event loop's thread publishes "unknown": a timer
/// continuation would otherwise carry the last socket read's cause (a wrong parent). Both Node
/// shapes: never a wrong cause, every call reaches the backend.
#[test]
fn node_without_the_runtime_hook_is_never_wrong() {
    if !have("node") {
        eprintln!("SKIPPED: no node");
        return;
    }
    for mode in ["sockets", "timer"] {
        let table = TableFile::new();
        let backend = Backend::start(table.table.clone());
        let (app, port) = start_app(node(mode, false)(backend.addr.port()), Some(&table.path()));
        let ports = drive(port, clients(), PER_CLIENT, 5);
        drop(app);
        let seen = backend.seen.lock().unwrap().clone();
        let t = tally(&seen, &ports);
        eprintln!("node {mode}, no hook: {t:?} of {}", seen.len());
        assert_eq!(
            seen.len(),
            (clients() * PER_CLIENT * 2) as usize,
            "node {mode}"
        );
        assert_eq!(t.wrong, 0, "node {mode}: {t:?}");
    }
}

#[test]
fn node_timer_shape_with_the_runtime_hook() {
    if !have("node") {
        eprintln!("SKIPPED: no node");
        return;
    }
    check("node timer + hook", node("timer", true), 5);
}

#[test]
fn node_event_loop_with_the_runtime_hook() {
    if !have("node") {
        eprintln!("SKIPPED: no node");
        return;
    }
    check("node + hook", node("sockets", true), 5);
}

/// The control: the same app without the library publishes nothing, so the figures above
/// come from the library.
#[test]
fn without_the_library_nothing_is_published() {
    let table = TableFile::new();
    let backend = Backend::start(table.table.clone());
    let mut cmd = python("threaded")(backend.addr.port());
    cmd.env("TRACECAR_CAUSAL_TABLE", table.path());
    let (app, port) = common::start_plain(cmd);
    let ports = drive(port, 2, 5, 1);
    drop(app);
    let seen = backend.seen.lock().unwrap().clone();
    let t = tally(&seen, &ports);
    assert_eq!((t.unknown, t.correct, t.wrong), (20, 0, 0));
    assert_eq!(table.table.entries().count(), 0);
}

#[test]
fn jvm_thread_pool() {
    if !have("java") {
        eprintln!("SKIPPED: no java");
        return;
    }
    check(
        "jvm",
        |backend| {
            let mut c = Command::new("java");
            c.arg(apps_dir().join("Frontend.java"))
                .arg(backend.to_string());
            c
        },
        5,
    );
}

/// An asyncio event loop: a coroutine resumes in a later loop iteration than the socket read
/// that woke it, so the thread's last read is often another connection's. The library must
/// not guess there: whatever it cannot follow it publishes as unknown, never wrong.
#[test]
fn python_asyncio_is_never_wrong() {
    let table = TableFile::new();
    let backend = Backend::start(table.table.clone());
    let (app, port) = start_app(python("asyncio")(backend.addr.port()), Some(&table.path()));
    let ports = drive(port, clients(), PER_CLIENT, 5);
    drop(app);
    let seen = backend.seen.lock().unwrap().clone();
    let t = tally(&seen, &ports);
    eprintln!(
        "python asyncio: {} clients in parallel: {t:?} of {}",
        clients(),
        seen.len()
    );
    assert_eq!(seen.len(), (clients() * PER_CLIENT * 2) as usize);
    assert_eq!(t.wrong, 0, "{t:?}");
}

/// The proxy may create the table after the app started: the library keeps looking for it
/// (now and then, at `accept`/`connect`) and follows causality from then on.
#[test]
fn a_table_created_after_the_app_started_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("causal");
    let staged = dir.path().join("staged");
    let table = std::sync::Arc::new(tracecar_causal::Table::create(&staged, 4096).unwrap());
    let backend = Backend::start(table.clone());
    let (app, port) = start_app(python("threaded")(backend.addr.port()), Some(&path));
    drive(port, 2, 5, 1);
    assert_eq!(table.entries().count(), 0, "nothing to publish into yet");
    backend.seen.lock().unwrap().clear();
    std::fs::rename(&staged, &path).unwrap();
    let ports = drive(port, 4, 40, 1);
    drop(app);
    let seen = backend.seen.lock().unwrap().clone();
    let t = tally(&seen, &ports);
    eprintln!(
        "table created after the app started: {t:?} of {}",
        seen.len()
    );
    assert_eq!(t.wrong, 0);
    // The next look is at the 64th accept/connect (3 per request) since load, 30 of them
    // before the table appeared: about 12 requests (24 calls) go by unknown first.
    assert!(t.correct >= 320 - 2 * 16, "{t:?}");
}

/// The hook without the library (or without a table): its first write fails, it turns itself
/// off, and the app serves as before.
#[test]
fn node_runtime_hook_without_the_library_is_harmless() {
    if !have("node") {
        eprintln!("SKIPPED: no node");
        return;
    }
    let table = TableFile::new();
    let backend = Backend::start(table.table.clone());
    for preload in [false, true] {
        let mut cmd = node("timer", true)(backend.addr.port());
        if preload {
            cmd.env("LD_PRELOAD", common::library());
        }
        cmd.env("TRACECAR_CAUSAL_TABLE", "/nonexistent/causal");
        let (app, port) = common::start_plain(cmd);
        let ports = drive(port, 2, 10, 5);
        drop(app);
        assert_eq!(ports.len(), 20);
    }
    assert_eq!(backend.seen.lock().unwrap().len(), 80);
    assert_eq!(table.table.entries().count(), 0);
}
