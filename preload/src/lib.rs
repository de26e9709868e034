//! `libtracecar_preload.so`: follows causality through an app's socket calls, as vPath does,
//! and publishes the cause of each outbound request in the causal table for the proxy.
//!
//! Loaded with `LD_PRELOAD` into the app's processes. It does nothing unless the table named by
//! `TRACECAR_CAUSAL_TABLE` (default `/var/run/tracecar/causal`) exists and is valid (looked for
//! at load, then again now and then at `accept`/`connect` until found, in case the proxy
//! creates it after the app started), and it never changes what a call returns (value or
//! `errno`), but for a runtime hook's registration write to an fd no process has open. See
//! docs/causal.md.
//!
//! - [`real`]: the wrapped libc functions, found lazily with `dlsym(RTLD_NEXT, ..)`.
//! - [`fds`]: what is known about each file descriptor (inbound, outbound, untracked).
//! - [`thread`]: the inbound connection the calling thread is working for.
//! - [`sock`]: socket addresses and the few `getsock*` calls the rules need.
//! - [`track`]: the rules: what each call means for the thread and the fd, and publishing.
//! - [`hooks`]: the exported symbols that replace libc's.
//!
//! `node/tracecar.js` is the Node.js runtime hook: it tells the library the cause of each
//! callback (timers, promise continuations) in a cell it registers through
//! `track::runtime_says`.

mod fds;
mod hooks;
mod real;
mod sock;
mod thread;
mod track;

use std::ffi::CStr;

/// Runs once when the library is loaded, before the program's `main`.
extern "C" fn init() {
    // A panic inside the library is caught at the hook (see `track::guarded`); it must not
    // print into the app's stderr either.
    std::panic::set_hook(Box::new(|_| {}));
    real::resolve_all();
    // SAFETY: getenv with a NUL-terminated name; the result, when not null, is a
    // NUL-terminated string owned by the environment, read at once before anything changes it.
    let path = unsafe {
        let p = libc::getenv(c"TRACECAR_CAUSAL_TABLE".as_ptr());
        if p.is_null() || *p == 0 {
            c"/var/run/tracecar/causal"
        } else {
            CStr::from_ptr(p)
        }
    };
    track::start(path);
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;
