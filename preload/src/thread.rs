//! The inbound connection the calling thread is working for (vPath's thread state).
//!
//! A [`Cause`] names an inbound connection by its fd, the generation it got at `accept`, and
//! its peer port (what is published). It is only used while that fd still holds that
//! connection ([`Cause::port`]); otherwise the cause is unknown and 0 is published. A runtime
//! hook (see `track::runtime_says`) names a cause by its port alone.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::fds::{self, Kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cause(u64);

/// fd 0xffff with generation 0, which no accepted connection has (generations start at 1):
/// marks a cause from a runtime hook.
const RUNTIME: u64 = 0xffff << 16;

impl Cause {
    pub const NONE: Cause = Cause(0);

    pub fn inbound(fd: libc::c_int, port: u16, gen: u32) -> Cause {
        match u16::try_from(fd) {
            Ok(fd) if port != 0 => {
                Cause(u64::from(port) | u64::from(fd) << 16 | u64::from(gen) << 32)
            }
            _ => Cause::NONE,
        }
    }

    /// A cause a runtime hook named (it knows the inbound connection only by its port).
    pub fn runtime(port: u16) -> Cause {
        if port == 0 {
            Cause::NONE
        } else {
            Cause(u64::from(port) | RUNTIME)
        }
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    pub fn from_raw(raw: u64) -> Cause {
        Cause(raw)
    }

    /// The port to publish: the connection's peer port while it is still open, else 0.
    pub fn port(self) -> u16 {
        if self.0 == 0 {
            return 0;
        }
        let port = self.0 as u16;
        if self.0 & !0xffff == RUNTIME {
            return port;
        }
        let fd = libc::c_int::from((self.0 >> 16) as u16);
        let gen = (self.0 >> 32) as u32;
        match fds::get(fd).map(|f| f.kind()) {
            Some(Kind::Inbound { port: p, gen: g }) if p == port && g == gen => port,
            _ => 0,
        }
    }

    /// Still names an open inbound connection.
    pub fn is_live(self) -> bool {
        self.port() != 0
    }
}

thread_local! {
    static CURRENT: Cell<u64> = const { Cell::new(0) };
    /// The thread's runtime cell (see `track::runtime_says`): its runtime's word on whose work
    /// the running callback is, kept up to date by the runtime hook.
    static RUNTIME_CELL: Cell<*const AtomicU32> = const { Cell::new(std::ptr::null()) };
    /// The thread runs an event loop (it has returned from `epoll_wait`).
    static EVENT_LOOP: Cell<bool> = const { Cell::new(false) };
}

/// Registers the calling thread's runtime cell.
pub fn set_runtime_cell(cell: *const AtomicU32) {
    let _ = RUNTIME_CELL.try_with(|c| c.set(cell));
}

/// What the calling thread's runtime cell holds, if it has one: the port of the inbound
/// connection the running callback works for (0: none).
pub fn runtime_port() -> Option<u16> {
    let cell = RUNTIME_CELL.try_with(Cell::get).ok()?;
    if cell.is_null() {
        return None;
    }
    // SAFETY: a registered cell is 4 aligned bytes the runtime hook keeps alive for the life
    // of this thread (its contract); read atomically, any value is only data.
    let v = unsafe { (*cell).load(Ordering::Relaxed) };
    Some(u16::try_from(v).unwrap_or(0))
}

/// Marks the calling thread as an event loop's.
pub fn mark_event_loop() {
    let _ = EVENT_LOOP.try_with(|l| l.set(true));
}

/// Whether the calling thread runs an event loop.
pub fn in_event_loop() -> bool {
    EVENT_LOOP.try_with(Cell::get).unwrap_or(false)
}

pub fn current() -> Cause {
    Cause(CURRENT.try_with(Cell::get).unwrap_or(0))
}

pub fn set(c: Cause) {
    let _ = CURRENT.try_with(|cur| cur.set(c.0));
}
