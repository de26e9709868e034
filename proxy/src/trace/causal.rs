//! Setting up the preload library's causal table at start-up (`TRACECAR_CORRELATION=causal`).
//!
//! The injector mounts an in-memory volume at the table's directory in the proxy and in the
//! app's containers. The proxy, which starts first, creates the table there, copies the
//! preload library from its own image next to it and writes the Node.js runtime hook
//! (`node/tracecar.js`, built into the binary), so the app's processes (started with
//! `LD_PRELOAD` and `NODE_OPTIONS=--require=...` pointing there) find all three. Without the directory (a proxy run by hand, or an
//! injector that did not add the volume) there is no table, and correlation falls back to
//! `sole` / `ambiguous` (docs/causal.md).

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::Config;

/// The library's file name.
pub const LIBRARY: &str = "libtracecar_preload.so";

/// The Node.js runtime hook, written to `<table dir>/node/tracecar.js`. Built in rather than
/// copied from the image: the injector's `NODE_OPTIONS` makes every Node.js process in the
/// pod `--require` it, and Node.js does not start when that file is missing.
pub const NODE_HOOK: &str = include_str!("../../../preload/node/tracecar.js");

/// The library is copied to `<table dir>/lib/<platform>/` for each of these, and the app
/// names it `.../lib/$PLATFORM/libtracecar_preload.so`: glibc expands `$PLATFORM` (to one of
/// these), musl does not and skips the entry, so an Alpine app is not stopped by a glibc
/// library it cannot load (docs/causal.md).
pub const PLATFORMS: [&str; 4] = ["x86_64", "haswell", "xeon_phi", "aarch64"];

/// Creates (or reuses) the table and copies the library; `None` when there is no table.
pub fn open(config: &Config) -> Option<tracecar_causal::Table> {
    let path = config.causal_table.as_path();
    let dir = path.parent().filter(|d| d.is_dir())?;
    let table = match tracecar_causal::Table::create(path, tracecar_causal::DEFAULT_SLOTS) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(
                table = %path.display(),
                error = %e,
                "no causal table: outbound requests without trace context are parented only when certain"
            );
            return None;
        }
    };
    // The hook first: once the table exists an app may start (a restarted proxy keeps it).
    write_node_hook(dir);
    if !config.preload_source.as_os_str().is_empty() {
        copy_library(&config.preload_source, dir);
    }
    tracing::info!(table = %path.display(), "causal table open");
    Some(table)
}

/// Writes the Node.js hook to `<dir>/node/tracecar.js`, atomically; an unchanged file is left
/// alone (a Node.js process may be reading it).
fn write_node_hook(dir: &Path) {
    let into = dir.join("node");
    let target = into.join("tracecar.js");
    if std::fs::read(&target).is_ok_and(|b| b == NODE_HOOK.as_bytes()) {
        return;
    }
    let partial = into.join(format!(".tracecar.js.{}", std::process::id()));
    // Readable by the app's users whatever the proxy's umask.
    let readable = |p: &Path, mode| std::fs::set_permissions(p, Permissions::from_mode(mode));
    let written = std::fs::create_dir_all(&into)
        .and_then(|()| readable(&into, 0o755))
        .and_then(|()| std::fs::write(&partial, NODE_HOOK))
        .and_then(|()| readable(&partial, 0o644))
        .and_then(|()| std::fs::rename(&partial, &target));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        tracing::error!(hook = %target.display(), error = %e,
            "cannot write the Node.js runtime hook: Node.js apps injected with it will not start");
    }
}

/// Copies the library under the table's directory for every platform name, each atomically
/// (a process starting meanwhile sees the old file or the new one, never half of one).
fn copy_library(source: &Path, dir: &Path) {
    if !source.is_file() {
        tracing::debug!(source = %source.display(), "no preload library to copy");
        return;
    }
    for platform in PLATFORMS {
        let into = dir.join("lib").join(platform);
        let target = into.join(LIBRARY);
        let partial = into.join(format!(".{LIBRARY}.{}", std::process::id()));
        let copied = std::fs::create_dir_all(&into)
            .and_then(|()| std::fs::copy(source, &partial))
            .and_then(|_| std::fs::rename(&partial, &target));
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&partial);
            tracing::warn!(library = %target.display(), error = %e, "cannot copy the preload library");
            return;
        }
    }
    tracing::info!(dir = %dir.join("lib").display(), "preload library in place");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At start: the table, the Node.js hook (exactly the module in preload/node, readable by
    /// all) and the library under every platform name; a second start keeps all three.
    #[test]
    fn start_up_puts_the_table_the_hook_and_the_library_in_place() {
        let dir = std::env::temp_dir().join(format!("tracecar-causal-open-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("source.so");
        std::fs::write(&source, b"not really a library").unwrap();
        let table = dir.join("causal");
        let cfg = Config::for_test(&[
            "--causal-table",
            table.to_str().unwrap(),
            "--preload-source",
            source.to_str().unwrap(),
        ]);
        for _ in 0..2 {
            assert!(open(&cfg).is_some());
            assert!(tracecar_causal::Table::open(&table).is_ok());
            let hook = dir.join("node/tracecar.js");
            assert_eq!(std::fs::read_to_string(&hook).unwrap(), NODE_HOOK);
            let mode = std::fs::metadata(&hook).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
            assert!(NODE_HOOK.contains("AsyncLocalStorage"));
            for platform in PLATFORMS {
                let lib = dir.join("lib").join(platform).join(LIBRARY);
                assert_eq!(std::fs::read(lib).unwrap(), b"not really a library");
            }
        }
        // No directory: no table and nothing written.
        let cfg = Config::for_test(&["--causal-table", "/nonexistent-tracecar/causal"]);
        assert!(open(&cfg).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
