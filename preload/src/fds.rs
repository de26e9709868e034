//! What the library knows about each file descriptor: a fixed array of atomics indexed by
//! fd (fds from [`MAX_FDS`] up are untracked). Never allocates, never locks; a process and
//! its forked children each have their own copy, as they have their own fd tables.
//!
//! `state` packs: bits 0-1 the kind (0 untracked, 1 inbound, 2 outbound), bit 2 "publish
//! before the next write" (outbound), bit 3 "no request written since connect" (outbound), bits 16-31 the peer port (inbound), bits 32-63 a
//! generation (inbound; tells a thread's remembered cause from a later connection on the
//! same fd number).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tracecar_causal::Key;

use crate::thread::Cause;

pub const MAX_FDS: usize = 65536;

const INBOUND: u64 = 1;
const OUTBOUND: u64 = 2;
const KIND: u64 = 3;
const PENDING: u64 = 4;
const FRESH: u64 = 8;

pub struct Fd {
    state: AtomicU64,
    key: [AtomicU32; 5],
    /// Outbound: the cause of the request in flight on it (or, before the first write, the
    /// cause current at `connect`).
    cause: AtomicU64,
}

static FDS: [Fd; MAX_FDS] = [const { Fd::new() }; MAX_FDS];
static NEXT_GEN: AtomicU32 = AtomicU32::new(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Untracked,
    Inbound { port: u16, gen: u32 },
    Outbound,
}

pub fn get(fd: libc::c_int) -> Option<&'static Fd> {
    usize::try_from(fd).ok().and_then(|i| FDS.get(i))
}

impl Fd {
    const fn new() -> Fd {
        Fd {
            state: AtomicU64::new(0),
            key: [const { AtomicU32::new(0) }; 5],
            cause: AtomicU64::new(0),
        }
    }

    /// Whether the fd is untracked: the hooks' fast path.
    pub fn untracked(&self) -> bool {
        self.state.load(Ordering::Relaxed) & KIND == 0
    }

    pub fn kind(&self) -> Kind {
        let s = self.state.load(Ordering::Acquire);
        match s & KIND {
            INBOUND => Kind::Inbound {
                port: (s >> 16) as u16,
                gen: (s >> 32) as u32,
            },
            OUTBOUND => Kind::Outbound,
            _ => Kind::Untracked,
        }
    }

    /// An accepted TCP connection whose peer port is `port`; returns its generation.
    pub fn set_inbound(&self, port: u16) -> u32 {
        let gen = NEXT_GEN.fetch_add(1, Ordering::Relaxed).max(1);
        self.cause.store(0, Ordering::Relaxed);
        self.state.store(
            INBOUND | u64::from(port) << 16 | u64::from(gen) << 32,
            Ordering::Release,
        );
        gen
    }

    /// A connected TCP connection with `key`, connected while `cause` was current.
    pub fn set_outbound(&self, key: &Key, cause: Cause) {
        for (slot, w) in self.key.iter().zip(key.words()) {
            slot.store(w, Ordering::Relaxed);
        }
        self.cause.store(cause.raw(), Ordering::Relaxed);
        self.state
            .store(OUTBOUND | PENDING | FRESH, Ordering::Release);
    }

    pub fn clear(&self) {
        self.state.store(0, Ordering::Release);
    }

    /// Becomes a copy of `other` (dup).
    pub fn copy_from(&self, other: &Fd) {
        for (a, b) in self.key.iter().zip(&other.key) {
            a.store(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.cause
            .store(other.cause.load(Ordering::Relaxed), Ordering::Relaxed);
        self.state
            .store(other.state.load(Ordering::Acquire), Ordering::Release);
    }

    pub fn key(&self) -> Key {
        let mut w = [0u32; 5];
        for (w, k) in w.iter_mut().zip(&self.key) {
            *w = k.load(Ordering::Relaxed);
        }
        Key::from_words(w)
    }

    pub fn cause(&self) -> Cause {
        Cause::from_raw(self.cause.load(Ordering::Relaxed))
    }

    pub fn set_cause(&self, c: Cause) {
        self.cause.store(c.raw(), Ordering::Relaxed);
    }

    /// Outbound: whether a publish is due before this write, and whether this is the first
    /// request since `connect`; clears both.
    pub fn take_pending(&self) -> Option<bool> {
        if self.state.load(Ordering::Relaxed) & PENDING == 0 {
            return None;
        }
        let old = self.state.fetch_and(!(PENDING | FRESH), Ordering::AcqRel);
        (old & PENDING != 0).then_some(old & FRESH != 0)
    }

    /// Outbound: a response was read, so the next write is a new request.
    pub fn set_pending(&self) {
        if self.state.load(Ordering::Relaxed) & PENDING == 0 {
            self.state.fetch_or(PENDING, Ordering::AcqRel);
        }
    }
}
