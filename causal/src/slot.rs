//! One slot and its seqlock.
//!
//! A slot is 8 `u32` words: `seq`, five key words, the value word (cause port, flags) and
//! `gen`. A writer takes the slot by moving `seq` from even to odd with a compare-and-swap,
//! writes, and makes `seq` even again; a reader copies the words and keeps the copy only if
//! `seq` was even and unchanged around it. Every word is an atomic, so a torn or hostile
//! slot is only ever wrong data, never undefined behaviour. Nobody waits more than a few
//! spins: a writer that cannot take a slot gives up, a reader that cannot get a consistent
//! copy gives up. (A writer killed inside a slot leaves it odd for good; that slot is lost,
//! not the table.)

use std::hint::spin_loop;
use std::sync::atomic::{fence, AtomicU32, Ordering};

use crate::layout::split_value;

/// Reads tried before a reader gives up on a slot a writer is in.
pub const READ_TRIES: u32 = 16;
/// Spins a writer waits for another writer to leave a slot before giving up.
pub const LOCK_TRIES: u32 = 64;

#[repr(transparent)]
pub struct Slot([AtomicU32; 8]);

/// A consistent copy of a slot's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub key: [u32; 5],
    pub cause_port: u16,
    pub flags: u16,
    pub gen: u32,
}

impl Slot {
    pub const fn new() -> Slot {
        Slot([const { AtomicU32::new(0) }; 8])
    }

    /// A consistent copy, or `None` when writers kept the slot busy.
    pub fn read(&self) -> Option<Snapshot> {
        let w = &self.0;
        for _ in 0..READ_TRIES {
            let s1 = w[0].load(Ordering::Acquire);
            if s1 & 1 == 1 {
                spin_loop();
                continue;
            }
            let snap = self.copy();
            fence(Ordering::Acquire);
            if w[0].load(Ordering::Relaxed) == s1 {
                return Some(snap);
            }
        }
        None
    }

    /// Takes the slot for writing, or `None` when another writer holds it.
    pub fn lock(&self) -> Option<Guard<'_>> {
        let seq = &self.0[0];
        for _ in 0..LOCK_TRIES {
            let s = seq.load(Ordering::Relaxed);
            if s & 1 == 0
                && seq
                    .compare_exchange_weak(
                        s,
                        s.wrapping_add(1),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            {
                fence(Ordering::Release);
                return Some(Guard { slot: self, seq: s });
            }
            spin_loop();
        }
        None
    }

    /// The seqlock counter (even: no writer inside).
    pub fn seq(&self) -> u32 {
        self.0[0].load(Ordering::Relaxed)
    }

    fn copy(&self) -> Snapshot {
        let w = &self.0;
        let (cause_port, flags) = split_value(w[6].load(Ordering::Relaxed));
        Snapshot {
            key: [
                w[1].load(Ordering::Relaxed),
                w[2].load(Ordering::Relaxed),
                w[3].load(Ordering::Relaxed),
                w[4].load(Ordering::Relaxed),
                w[5].load(Ordering::Relaxed),
            ],
            cause_port,
            flags,
            gen: w[7].load(Ordering::Relaxed),
        }
    }
}

impl Default for Slot {
    fn default() -> Slot {
        Slot::new()
    }
}

/// A writer inside a slot; dropping it lets readers in again.
pub struct Guard<'a> {
    slot: &'a Slot,
    seq: u32,
}

impl Guard<'_> {
    /// The slot's contents; consistent, since no one else writes while the guard lives.
    pub fn current(&self) -> Snapshot {
        self.slot.copy()
    }

    pub fn write(&self, key: [u32; 5], value_word: u32, gen: u32) {
        let w = &self.slot.0;
        for (word, k) in w[1..6].iter().zip(key) {
            word.store(k, Ordering::Relaxed);
        }
        w[6].store(value_word, Ordering::Relaxed);
        w[7].store(gen, Ordering::Relaxed);
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.slot.0[0].store(self.seq.wrapping_add(2), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::value_word;

    #[test]
    fn a_slot_held_by_a_writer_is_not_read_and_not_taken() {
        let s = Slot::new();
        let g = s.lock().expect("free slot");
        g.write([1, 2, 3, 4, 5], value_word(9, 1), 1);
        assert_eq!(s.read(), None);
        assert!(s.lock().is_none());
        drop(g);
        let snap = s.read().expect("consistent");
        assert_eq!(snap.key, [1, 2, 3, 4, 5]);
        assert_eq!((snap.cause_port, snap.flags, snap.gen), (9, 1, 1));
        assert_eq!(s.seq(), 2);
    }
}
