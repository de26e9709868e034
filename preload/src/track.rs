//! The rules (vPath's, from thread and network activity), and publishing.
//!
//! - `accept` on an inet socket: the new fd is an inbound connection.
//! - a read (> 0 bytes) on an inbound connection: the thread now works for it.
//! - `connect` of a TCP socket: the fd is an outbound connection; the thread's cause at that
//!   moment is published at once and kept for its first request (an event loop writes that
//!   request later, from a callback).
//! - the first write on an outbound connection after `connect` or after a read on it (a new
//!   request on a kept-alive connection): its cause is published before the real write. After
//!   `connect` that is the cause kept then (or, if none was, the writing thread's); after a
//!   read, the writing thread's.
//! - a read (> 0 bytes) on an outbound connection (a response): the thread works again for
//!   what caused that connection's request.
//! - a thread back from `epoll_wait` (an event loop between callbacks) works for nothing until
//!   its next read: what runs next may be a continuation queued earlier (asyncio runs the
//!   coroutines a previous iteration woke first) or a timer, not the last read's work.
//! - a cause whose inbound connection has been closed since, or no cause: 0 ("none").
//!
//! Everything here runs around the real call, never instead of it; `errno` is kept, nothing
//! can unwind into the app, and an untracked fd or a missing table costs one or two loads.

use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use libc::{c_int, sockaddr, socklen_t, ssize_t};
use tracecar_causal::{Key, Table};

use crate::fds::{self, Kind};
use crate::sock;
use crate::thread::{self, Cause};

static TABLE: OnceLock<Table> = OnceLock::new();

/// The cause the calling thread may publish. A thread whose runtime hook registered a cell
/// publishes what the cell holds: the runtime knows whose work each callback is. On an event
/// loop with no runtime hook, a continuation that no socket read preceded (a timer) still
/// carries the last read's cause, which would be a wrong parent: such threads publish
/// "unknown" instead, so an app is never worse off for lacking the hook.
fn publishable() -> Cause {
    if let Some(port) = thread::runtime_port() {
        return Cause::runtime(port);
    }
    if thread::in_event_loop() {
        return Cause::NONE;
    }
    thread::current()
}

/// The table's path (NUL-terminated), kept at load for later attempts; unset if too long.
static PATH: OnceLock<[u8; PATH_MAX]> = OnceLock::new();
const PATH_MAX: usize = 512;
/// `accept`/`connect` calls seen while the table was missing; every `RETRY_EVERY`th looks again.
static MISSES: AtomicU32 = AtomicU32::new(0);
const RETRY_EVERY: u32 = 64;

/// At load: remembers the path and opens the table if it is there.
pub fn start(path: &CStr) {
    let bytes = path.to_bytes_with_nul();
    let mut buf = [0u8; PATH_MAX];
    if let Some(dst) = buf.get_mut(..bytes.len()) {
        dst.copy_from_slice(bytes);
        let _ = PATH.set(buf);
    }
    open();
}

fn open() {
    let Some(buf) = PATH.get() else { return };
    let Ok(path) = CStr::from_bytes_until_nul(buf) else {
        return;
    };
    if let Ok(t) = Table::open_cstr(path) {
        let _ = TABLE.set(t);
    }
}

fn table() -> Option<&'static Table> {
    TABLE.get()
}

/// The table; while it is missing, now and then another look (the proxy may create it after
/// the app started). Only on `accept`/`connect`, never on reads and writes.
fn table_or_retry() -> Option<&'static Table> {
    if let Some(t) = TABLE.get() {
        return Some(t);
    }
    if MISSES.fetch_add(1, Ordering::Relaxed) % RETRY_EVERY == RETRY_EVERY - 1 {
        guarded(open);
    }
    TABLE.get()
}

/// Runs the library's own work with `errno` as the app left it afterwards, and no unwinding.
fn guarded(f: impl FnOnce()) {
    // SAFETY: __errno_location returns the calling thread's errno, always valid.
    let errno = unsafe { *libc::__errno_location() };
    let _ = catch_unwind(AssertUnwindSafe(f));
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// After `accept`/`accept4` returned `fd` (with the peer address in `addr`, if given, in a
/// buffer of `cap` bytes).
pub fn accepted(fd: c_int, addr: *const sockaddr, len: *const socklen_t, cap: socklen_t) {
    if fd < 0 || table_or_retry().is_none() {
        return;
    }
    let Some(slot) = fds::get(fd) else { return };
    guarded(|| {
        // SAFETY: `addr`/`len` are what the app passed to accept, which the kernel just
        // filled; `len` is read only when not null; the read of `addr` is bounded by both the
        // length written and the buffer's size before the call.
        let from_addr = unsafe {
            if addr.is_null() || len.is_null() {
                None
            } else {
                sock::inet(addr, (*len).min(cap))
            }
        };
        match from_addr
            .map(|(port, _)| port)
            .or_else(|| sock::peer_port(fd))
        {
            Some(port) if port != 0 => {
                slot.set_inbound(port);
            }
            _ => slot.clear(),
        }
    });
}

/// After `connect(fd, addr)` returned `ret` (with `errno` as it set it).
pub fn connected(fd: c_int, addr: *const sockaddr, len: socklen_t, ret: c_int) {
    let Some(t) = table_or_retry() else { return };
    guarded(|| {
        // SAFETY: __errno_location is always valid for the calling thread.
        let err = unsafe { *libc::__errno_location() };
        if ret != 0 && err != libc::EINPROGRESS && err != libc::EINTR {
            return;
        }
        // SAFETY: `addr` is the app's argument to connect, valid for `len` bytes.
        let Some((peer_port, peer_ip)) = (unsafe { sock::inet(addr, len) }) else {
            if let Some(f) = fds::get(fd) {
                f.clear();
            }
            return;
        };
        // Not a TCP connection we can name: whatever this fd number carried before (state left
        // by a close the library did not see, such as `close_range`) must not be published.
        let forget = || {
            if let Some(f) = fds::get(fd) {
                f.clear();
            }
        };
        if !sock::is_tcp(fd) {
            forget();
            return;
        }
        let Some(local_port) = sock::local_port(fd) else {
            forget();
            return;
        };
        let key = Key {
            local_port,
            peer_port,
            peer_ip,
        };
        let cause = publishable();
        match fds::get(fd) {
            Some(f) => {
                t.publish(&key, cause.port());
                f.set_outbound(&key, if cause.is_live() { cause } else { Cause::NONE });
            }
            // Beyond the fd array later requests on it cannot be followed, so even the
            // first one's cause would be left standing for them: publish "unknown".
            None => {
                t.publish(&key, 0);
            }
        }
    });
}

/// Before a write-like call on `fd`.
pub fn writing(fd: c_int) {
    let Some(t) = table() else { return };
    let Some(f) = fds::get(fd) else { return };
    if f.untracked() || f.kind() != Kind::Outbound {
        return;
    }
    let Some(first) = f.take_pending() else {
        return;
    };
    guarded(|| {
        let kept = f.cause();
        let cause = if first && kept.is_live() {
            kept
        } else {
            publishable()
        };
        let cause = if cause.is_live() { cause } else { Cause::NONE };
        t.publish(&f.key(), cause.port());
        f.set_cause(cause);
    });
}

/// After a read-like call on `fd` returned `n`.
pub fn read(fd: c_int, n: ssize_t) {
    if n <= 0 || table().is_none() {
        return;
    }
    let Some(f) = fds::get(fd) else { return };
    if f.untracked() {
        return;
    }
    match f.kind() {
        Kind::Inbound { port, gen } => thread::set(Cause::inbound(fd, port, gen)),
        Kind::Outbound => {
            thread::set(f.cause());
            f.set_pending();
        }
        Kind::Untracked => {}
    }
}

/// The fd a runtime hook writes to (the largest an `int` fd can be; no process has it open:
/// the kernel's limit on open files is far lower), so a write to it never reaches the kernel
/// when the library is active, and fails with `EBADF` as always when it is not.
pub const RUNTIME_FD: c_int = 0x7fff_fffe;
const RUNTIME_MAGIC: [u8; 4] = *b"TRCR";

/// A runtime hook registers its cell, written once to [`RUNTIME_FD`]: 8 bytes, `TRCR` then a
/// little-endian u32, written from the cell itself, which the hook keeps for the life of the
/// thread. From then on the hook tells whose work each callback is by storing the inbound
/// connection's peer port (0: none) in the cell's last 4 bytes, a plain memory write (a system
/// call per callback cost Node.js half its throughput), and the library reads the cell when
/// the thread publishes. Returns what the write returns (its length), or `None` to let the
/// write go to the kernel (and fail with `EBADF`).
///
/// # Safety
/// `buf` is valid for reads of `n` bytes (the write's own contract); a registered cell must
/// stay valid for as long as its thread lives (the hook's contract: preload/node/tracecar.js).
pub unsafe fn runtime_says(buf: *const libc::c_void, n: libc::size_t) -> Option<ssize_t> {
    table()?;
    if n != 8 || buf.is_null() {
        return None;
    }
    // SAFETY: `buf` holds `n` = 8 readable bytes.
    let msg = unsafe { buf.cast::<[u8; 8]>().read_unaligned() };
    if msg[..4] != RUNTIME_MAGIC {
        return None;
    }
    // SAFETY: `buf` + 4 lies within the 8 bytes; the cell is only read atomically.
    let port = unsafe { buf.cast::<u8>().add(4) };
    if (port as usize) % std::mem::align_of::<AtomicU32>() != 0 {
        return None;
    }
    thread::set_runtime_cell(port.cast::<AtomicU32>());
    Some(8)
}

/// After `epoll_wait` and its variants returned.
pub fn event_loop_turned() {
    if table().is_some() {
        thread::mark_event_loop();
        thread::set(Cause::NONE);
    }
}

/// Before `close(fd)`.
pub fn closing(fd: c_int) {
    let Some(f) = fds::get(fd) else { return };
    if f.untracked() {
        return;
    }
    if let (Kind::Outbound, Some(t)) = (f.kind(), table()) {
        guarded(|| t.mark_closed(&f.key()));
    }
    f.clear();
}

/// After `dup*` made `new` a copy of `old`.
pub fn duplicated(old: c_int, new: c_int) {
    if new < 0 || old == new {
        return;
    }
    let Some(n) = fds::get(new) else { return };
    // dup2/dup3 onto an outbound connection closed it: mark its entry as `close` does.
    if let (Kind::Outbound, Some(t)) = (n.kind(), table()) {
        guarded(|| t.mark_closed(&n.key()));
    }
    match fds::get(old) {
        Some(o) if !o.untracked() => n.copy_from(o),
        _ => {
            if !n.untracked() {
                n.clear();
            }
        }
    }
}
