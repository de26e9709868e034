//! The real libc functions behind the hooks.
//!
//! Each is looked up once with `dlsym(RTLD_NEXT, name)` (at load, or at its first call if
//! something calls it earlier, e.g. another library's constructor). While a thread is inside
//! `dlsym` (which may allocate, and an allocator may read files) a nested call gets no
//! address, and the hook makes the system call itself instead, so a lookup never recurses.

use std::cell::Cell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Real {
    name: &'static CStr,
    addr: AtomicUsize,
}

thread_local! {
    static RESOLVING: Cell<bool> = const { Cell::new(false) };
}

impl Real {
    pub const fn new(name: &'static CStr) -> Real {
        Real {
            name,
            addr: AtomicUsize::new(0),
        }
    }

    /// The function's address, or 0 while it cannot be found (the caller makes the syscall).
    pub fn get(&self) -> usize {
        let a = self.addr.load(Ordering::Acquire);
        if a != 0 {
            return a;
        }
        if RESOLVING.try_with(|r| r.replace(true)).unwrap_or(true) {
            return 0;
        }
        // SAFETY: dlsym with the RTLD_NEXT pseudo-handle and a NUL-terminated name.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) } as usize;
        let _ = RESOLVING.try_with(|r| r.set(false));
        if p != 0 {
            self.addr.store(p, Ordering::Release);
        }
        p
    }
}

/// Calls the real function `$real` with C signature `fn($t..) -> $r`, or evaluates
/// `$fallback` (the system call) when it cannot be found.
macro_rules! call_real {
    ($real:expr, fn($($t:ty),*) -> $r:ty, ($($a:expr),*), $fallback:expr) => {{
        let p = $real.get();
        if p == 0 {
            // SAFETY: the raw system call with the caller's own arguments, as libc would make it.
            unsafe { $fallback }
        } else {
            // SAFETY: `p` is what dlsym returned for this symbol, a function whose C
            // prototype is exactly `fn($t..) -> $r`.
            let f: unsafe extern "C" fn($($t),*) -> $r = unsafe { std::mem::transmute(p) };
            // SAFETY: forwarding the caller's arguments unchanged to the function it meant.
            unsafe { f($($a),*) }
        }
    }};
}
pub(crate) use call_real;

pub static ACCEPT: Real = Real::new(c"accept");
pub static ACCEPT4: Real = Real::new(c"accept4");
pub static CONNECT: Real = Real::new(c"connect");
pub static READ: Real = Real::new(c"read");
pub static READ_CHK: Real = Real::new(c"__read_chk");
pub static RECV: Real = Real::new(c"recv");
pub static RECV_CHK: Real = Real::new(c"__recv_chk");
pub static RECVFROM: Real = Real::new(c"recvfrom");
pub static RECVFROM_CHK: Real = Real::new(c"__recvfrom_chk");
pub static RECVMSG: Real = Real::new(c"recvmsg");
pub static READV: Real = Real::new(c"readv");
pub static WRITE: Real = Real::new(c"write");
pub static SEND: Real = Real::new(c"send");
pub static SENDTO: Real = Real::new(c"sendto");
pub static SENDMSG: Real = Real::new(c"sendmsg");
pub static WRITEV: Real = Real::new(c"writev");
pub static CLOSE: Real = Real::new(c"close");
pub static DUP: Real = Real::new(c"dup");
pub static DUP2: Real = Real::new(c"dup2");
pub static DUP3: Real = Real::new(c"dup3");
pub static EPOLL_WAIT: Real = Real::new(c"epoll_wait");
pub static EPOLL_PWAIT: Real = Real::new(c"epoll_pwait");
pub static EPOLL_PWAIT2: Real = Real::new(c"epoll_pwait2");

/// Looks every function up now, at load, so calls later find them at once.
pub fn resolve_all() {
    for r in [
        &ACCEPT,
        &ACCEPT4,
        &CONNECT,
        &READ,
        &READ_CHK,
        &RECV,
        &RECV_CHK,
        &RECVFROM,
        &RECVFROM_CHK,
        &RECVMSG,
        &READV,
        &WRITE,
        &SEND,
        &SENDTO,
        &SENDMSG,
        &WRITEV,
        &CLOSE,
        &DUP,
        &DUP2,
        &DUP3,
        &EPOLL_WAIT,
        &EPOLL_PWAIT,
        &EPOLL_PWAIT2,
    ] {
        r.get();
    }
}
