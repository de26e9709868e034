//! The mapped table: created by the proxy, opened by the library, read and written in place.

use std::ffi::{CStr, CString};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::ptr::NonNull;

use crate::key::Key;
use crate::layout::{
    self, file_len, probe_index, value_word, HeaderError, FLAG_CLOSED, FLAG_VALID, HEADER_LEN,
    PROBE, SLOT_LEN,
};
use crate::slot::Slot;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("causal table: {0}")]
    Io(#[from] io::Error),
    #[error("causal table: not a causal table (magic is not TRCCAUS1)")]
    Magic,
    #[error("causal table: version {0}; this build reads version 1")]
    Version(u32),
    #[error("causal table: {0} slots; a power of two from 8 to 1048576 is accepted")]
    Slots(u32),
    #[error("causal table: the file is {found} bytes; {expected} expected for its slot count")]
    Size { expected: u64, found: u64 },
    #[error("causal table: not a regular file")]
    NotFile,
}

impl From<HeaderError> for Error {
    fn from(e: HeaderError) -> Error {
        match e {
            HeaderError::Magic => Error::Magic,
            HeaderError::Version(v) => Error::Version(v),
            HeaderError::Slots(s) => Error::Slots(s),
        }
    }
}

/// A mapped causal table. Every access goes through atomics, so it is shared freely between
/// threads (and, through the file, between processes).
pub struct Table {
    base: NonNull<u8>,
    len: usize,
    slots: u32,
}

// SAFETY: the mapping is only ever accessed through atomics (`Slot` is a `[AtomicU32; 8]`),
// and `Table` owns it until `Drop`.
unsafe impl Send for Table {}
// SAFETY: as above; shared references only perform atomic operations.
unsafe impl Sync for Table {}

impl Table {
    /// Creates the table at `path` with `slots` slots, for the proxy at start. A valid table
    /// already there with the same slot count is kept as it is (the app's processes may have
    /// it mapped, e.g. after a proxy restart); anything else is replaced by a fresh file
    /// (renamed into place, so a process still mapping the old one is never cut short).
    pub fn create(path: &Path, slots: u32) -> Result<Table, Error> {
        if !layout::valid_slots(slots) {
            return Err(Error::Slots(slots));
        }
        if let Ok(t) = Table::open(path) {
            if t.slots == slots {
                return Ok(t);
            }
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o666)
            .open(&tmp)?;
        // The app's containers run as other users; the umask must not keep them out.
        file.set_permissions(fs::Permissions::from_mode(0o666))?;
        file.set_len(file_len(slots) as u64)?;
        file.write_all_at(&layout::header(slots), 0)?;
        drop(file);
        fs::rename(&tmp, path)?;
        Table::open(path)
    }

    /// Opens an existing table.
    pub fn open(path: &Path) -> Result<Table, Error> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        Table::open_cstr(&c)
    }

    /// Opens an existing table without allocating (for the preload library).
    pub fn open_cstr(path: &CStr) -> Result<Table, Error> {
        // SAFETY: `path` is a valid NUL-terminated string; the flags and mode are plain ints.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let r = Table::map_fd(fd);
        // SAFETY: `fd` was opened above and is closed once; the mapping outlives it.
        unsafe { libc::close(fd) };
        r
    }

    fn map_fd(fd: libc::c_int) -> Result<Table, Error> {
        // SAFETY: an all-zero `stat` is a valid value; `fstat` fills it for an open fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid, writable `stat`.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Error::NotFile);
        }
        let mut header = [0u8; HEADER_LEN];
        // SAFETY: `header` is writable for HEADER_LEN bytes.
        let n = unsafe { libc::pread(fd, header.as_mut_ptr().cast(), HEADER_LEN, 0) };
        if n != HEADER_LEN as isize {
            return Err(Error::Magic);
        }
        let slots = layout::parse_header(&header)?;
        let len = file_len(slots);
        let found = st.st_size as u64;
        if found != len as u64 {
            return Err(Error::Size {
                expected: len as u64,
                found,
            });
        }
        // SAFETY: a fresh shared mapping of `len` bytes of an open regular file of that size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        match NonNull::new(p.cast::<u8>()) {
            Some(base) => Ok(Table { base, len, slots }),
            None => Err(io::Error::from(io::ErrorKind::Other).into()),
        }
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    fn slot(&self, idx: u32) -> &Slot {
        let idx = (idx & (self.slots - 1)) as usize;
        // SAFETY: idx < slots, so the 32 bytes at HEADER_LEN + idx * SLOT_LEN lie inside the
        // mapping of file_len(slots) bytes; the mapping is page-aligned, so they are aligned
        // for `Slot` ([AtomicU32; 8]); they are only accessed atomically and live as long as
        // `self`.
        unsafe {
            &*self
                .base
                .as_ptr()
                .add(HEADER_LEN + idx * SLOT_LEN)
                .cast::<Slot>()
        }
    }

    /// The cause published for `key`: `Some(port)` with the inbound connection's peer port
    /// as the app sees it (the proxy's local port of its connection to the app), `Some(0)`
    /// when the library published that it knows no cause (or two entries disagree), `None`
    /// when nothing usable is published or the entry's connection is closed. Lock-free;
    /// gives up rather than wait on a writer.
    pub fn lookup(&self, key: &Key) -> Option<u16> {
        let words = key.words();
        let h = key.hash();
        let mut found: Option<u16> = None;
        for i in 0..PROBE {
            let Some(s) = self.slot(probe_index(h, i, self.slots)).read() else {
                continue;
            };
            if s.flags & FLAG_VALID == 0 {
                break;
            }
            // A closed entry is history: its connection is gone, and a lookup that lands on
            // it was made for another connection (e.g. one whose source port conntrack
            // remapped into this key), so it must not name a cause.
            if s.key == words && s.flags & FLAG_CLOSED == 0 {
                found = match found {
                    Some(c) if c != s.cause_port => Some(0),
                    _ => Some(s.cause_port),
                };
            }
        }
        found
    }

    /// Publishes `cause_port` (0: no known cause) for `key`: into the key's slot if it has
    /// one, else an empty one, else one whose connection is closed, else its home slot (last
    /// writer wins). Never blocks; `false` when writers kept every choice busy.
    pub fn publish(&self, key: &Key, cause_port: u16) -> bool {
        let words = key.words();
        let h = key.hash();
        for _ in 0..3 {
            let mut empty = None;
            let mut closed = None;
            let mut own = None;
            for i in 0..PROBE {
                let idx = probe_index(h, i, self.slots);
                let Some(s) = self.slot(idx).read() else {
                    continue;
                };
                if s.flags & FLAG_VALID == 0 {
                    empty = Some(idx);
                    break;
                }
                if s.key == words {
                    own = Some(idx);
                    break;
                }
                if s.flags & FLAG_CLOSED != 0 && closed.is_none() {
                    closed = Some(idx);
                }
            }
            let (idx, evict) = match (own, empty, closed) {
                (Some(i), _, _) | (None, Some(i), _) | (None, None, Some(i)) => (i, false),
                (None, None, None) => (probe_index(h, 0, self.slots), true),
            };
            let Some(g) = self.slot(idx).lock() else {
                continue;
            };
            let cur = g.current();
            let same = cur.flags & FLAG_VALID != 0 && cur.key == words;
            let free = cur.flags & FLAG_VALID == 0 || cur.flags & FLAG_CLOSED != 0;
            if !(same || free || evict) {
                // Another writer took it since we looked: look again.
                continue;
            }
            let gen = if same { cur.gen.wrapping_add(1) } else { 1 };
            g.write(words, value_word(cause_port, FLAG_VALID), gen);
            return true;
        }
        false
    }

    /// Marks `key`'s entry closed: still readable (the proxy may read the request after the
    /// app closed), the first to be reused.
    pub fn mark_closed(&self, key: &Key) {
        let words = key.words();
        let h = key.hash();
        for i in 0..PROBE {
            let slot = self.slot(probe_index(h, i, self.slots));
            let Some(s) = slot.read() else { continue };
            if s.flags & FLAG_VALID == 0 {
                return;
            }
            if s.key == words {
                if let Some(g) = slot.lock() {
                    let cur = g.current();
                    if cur.key == words && cur.flags & FLAG_VALID != 0 {
                        g.write(
                            words,
                            value_word(cur.cause_port, cur.flags | FLAG_CLOSED),
                            cur.gen,
                        );
                    }
                }
                return;
            }
        }
    }

    /// Every published entry: (key, cause port, flags, gen). For diagnostics and tests.
    pub fn entries(&self) -> impl Iterator<Item = (Key, u16, u16, u32)> + '_ {
        (0..self.slots).filter_map(move |i| {
            let s = self.slot(i).read()?;
            (s.flags & FLAG_VALID != 0)
                .then(|| (Key::from_words(s.key), s.cause_port, s.flags, s.gen))
        })
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are the mapping made in `map_fd`, unmapped once, here; no
        // reference into it outlives `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("slots", &self.slots).finish()
    }
}
