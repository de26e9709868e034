//! Setting up the preload library's causal table at start-up (`TRACECAR_CORRELATION=causal`).
//!
//! The injector mounts an in-memory volume at the table's directory in the proxy and in the
//! app's containers. The proxy, which starts first, creates the table there and copies the
//! preload library from its own image next to it, so the app's processes (started with
//! `LD_PRELOAD` pointing there) find both. Without the directory (a proxy run by hand, or an
//! injector that did not add the volume) there is no table, and correlation falls back to
//! `sole` / `ambiguous` (docs/causal.md).

use std::path::Path;

use crate::config::Config;

/// The library's file name.
pub const LIBRARY: &str = "libtracecar_preload.so";

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
    if !config.preload_source.as_os_str().is_empty() {
        copy_library(&config.preload_source, dir);
    }
    tracing::info!(table = %path.display(), "causal table open");
    Some(table)
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
