//! The table through its public API: files, publishing, lookups, eviction, concurrency.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use tracecar_causal::layout::{self, FLAG_CLOSED, PROBE};
use tracecar_causal::{Error, Key, Table};

fn table(slots: u32) -> (tempfile::TempDir, Table) {
    let dir = tempfile::tempdir().unwrap();
    let t = Table::create(&dir.path().join("causal"), slots).unwrap();
    (dir, t)
}

fn key(i: u32) -> Key {
    Key::v4(
        10000 + (i % 50000) as u16,
        [10, 0, (i >> 8) as u8, i as u8],
        8080,
    )
}

#[test]
fn create_writes_the_documented_header_and_size() {
    let (dir, t) = table(4096);
    let path = dir.path().join("causal");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 64 + 4096 * 32);
    assert_eq!(&bytes[0..8], b"TRCCAUS1");
    assert_eq!(&bytes[8..12], &1u32.to_le_bytes());
    assert_eq!(&bytes[12..16], &4096u32.to_le_bytes());
    assert!(bytes[16..].iter().all(|b| *b == 0));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o666,
        "the app's users must be able to write it"
    );
    assert_eq!(t.slots(), 4096);
}

#[test]
fn a_published_entry_is_in_the_file_at_the_documented_place() {
    let (dir, t) = table(64);
    let k = Key::v4(40001, [127, 0, 0, 1], 15140);
    assert!(t.publish(&k, 51234));
    let bytes = std::fs::read(dir.path().join("causal")).unwrap();
    let idx = (layout::hash(&k.bytes()) & 63) as usize;
    let s = &bytes[64 + idx * 32..64 + idx * 32 + 32];
    assert_eq!(
        u32::from_le_bytes(s[0..4].try_into().unwrap()),
        2,
        "seq even, one write"
    );
    assert_eq!(u16::from_le_bytes([s[4], s[5]]), 40001);
    assert_eq!(u16::from_le_bytes([s[6], s[7]]), 15140);
    assert_eq!(
        &s[8..24],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
    );
    assert_eq!(u16::from_le_bytes([s[24], s[25]]), 51234);
    assert_eq!(u16::from_le_bytes([s[26], s[27]]), layout::FLAG_VALID);
    assert_eq!(u32::from_le_bytes(s[28..32].try_into().unwrap()), 1);
}

#[test]
fn create_keeps_a_valid_table_and_replaces_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("causal");
    let t = Table::create(&path, 64).unwrap();
    t.publish(&key(1), 7);
    let ino = std::fs::metadata(&path).unwrap().ino();
    let again = Table::create(&path, 64).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino);
    assert_eq!(
        again.lookup(&key(1)),
        Some(7),
        "a proxy restart keeps what apps published"
    );
    let bigger = Table::create(&path, 128).unwrap();
    assert_eq!(bigger.slots(), 128);
    assert_eq!(bigger.lookup(&key(1)), None);
    assert_eq!(t.lookup(&key(1)), Some(7), "the old mapping stays valid");
    std::fs::write(&path, b"not a table").unwrap();
    assert_eq!(Table::create(&path, 64).unwrap().slots(), 64);
}

#[test]
fn open_refuses_what_is_not_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("causal");
    assert!(matches!(Table::open(&path), Err(Error::Io(_))));
    std::fs::write(&path, [0u8; 100]).unwrap();
    assert!(matches!(Table::open(&path), Err(Error::Magic)));
    let mut bytes = layout::header(64).to_vec();
    bytes.resize(layout::file_len(64) - 1, 0);
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(Table::open(&path), Err(Error::Size { .. })));
    let mut bytes = layout::header(64).to_vec();
    bytes[8] = 9;
    bytes.resize(layout::file_len(64), 0);
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(Table::open(&path), Err(Error::Version(9))));
    assert!(matches!(
        Table::open(std::path::Path::new("/dev/null")),
        Err(Error::NotFile)
    ));
    assert!(matches!(Table::create(&path, 100), Err(Error::Slots(100))));
}

#[test]
fn publish_then_lookup_and_republish_bumps_gen() {
    let (_d, t) = table(4096);
    let k = key(5);
    assert_eq!(t.lookup(&k), None);
    assert!(t.publish(&k, 1234));
    assert_eq!(t.lookup(&k), Some(1234));
    assert!(t.publish(&k, 0));
    assert_eq!(t.lookup(&k), Some(0), "published as no known cause");
    assert!(t.publish(&k, 999));
    let e: Vec<_> = t.entries().collect();
    assert_eq!(e, vec![(k, 999, layout::FLAG_VALID, 3)]);
}

#[test]
fn closed_entries_answer_nothing_and_are_reused_first() {
    let (_d, t) = table(8);
    // Fill all 8 slots (every key probes all of them in an 8-slot table).
    for i in 0..8 {
        assert!(t.publish(&key(i), 100 + i as u16));
    }
    t.mark_closed(&key(3));
    assert_eq!(
        t.lookup(&key(3)),
        None,
        "a closed connection names no cause"
    );
    assert!(t
        .entries()
        .any(|(k, _, f, _)| k == key(3) && f & FLAG_CLOSED != 0));
    assert!(t.publish(&key(100), 5));
    assert_eq!(t.lookup(&key(100)), Some(5));
    assert_eq!(t.lookup(&key(3)), None, "the closed one made room");
    for i in (0..8).filter(|i| *i != 3) {
        assert_eq!(t.lookup(&key(i)), Some(100 + i as u16));
    }
    // Full and nothing closed: the home slot is taken (last writer wins); nothing wrong is read.
    assert!(t.publish(&key(200), 6));
    assert_eq!(t.lookup(&key(200)), Some(6));
    assert_eq!(t.entries().count(), 8);
}

#[test]
fn concurrent_writers_and_readers_never_see_a_wrong_cause() {
    let (_d, t) = table(256);
    let t = Arc::new(t);
    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    // 4 writers; writer w owns keys w*16..w*16+16 and publishes causes whose top 4 bits say
    // which key they belong to. Keys 1000 and 1001 are shared by all writers.
    let writers: Vec<_> = (0..4u32)
        .map(|w| {
            let t = t.clone();
            std::thread::spawn(move || {
                for n in 0..20_000u32 {
                    let k = w * 16 + n % 16;
                    let cause = ((k % 16) << 12) as u16 | (n % 4096) as u16;
                    assert!(t.publish(&key(k), cause) || n > 0);
                    let shared = 1000 + n % 2;
                    t.publish(&key(shared), ((shared % 16) << 12) as u16 | (1 + w) as u16);
                    if n % 97 == 0 {
                        t.mark_closed(&key(k));
                    }
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (t, stop, lookups) = (t.clone(), stop.clone(), lookups.clone());
            std::thread::spawn(move || {
                let mut wrong = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for k in (0..64).chain(1000..1002) {
                        if let Some(c) = t.lookup(&key(k)) {
                            if c != 0 && u32::from(c >> 12) != k % 16 {
                                wrong += 1;
                            }
                        }
                        lookups.fetch_add(1, Ordering::Relaxed);
                    }
                }
                wrong
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let wrong: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert_eq!(wrong, 0);
    assert!(lookups.load(Ordering::Relaxed) > 1000);
    for k in 0..64 {
        // Each key's last publish (n = 19_984..19_999 hit each k once) is what is read.
        let c = t.lookup(&key(k)).expect("published");
        assert_eq!(u32::from(c >> 12), k % 16);
    }
}

proptest! {
    /// Whatever is published, a lookup returns the key's last cause, 0, or nothing: never
    /// another key's cause. With room to spare, it is exactly the last cause.
    #[test]
    fn lookups_return_the_keys_own_last_cause(
        ops in proptest::collection::vec((0u32..40, 1u16..u16::MAX, any::<bool>()), 1..200),
        small in any::<bool>(),
    ) {
        let (_d, t) = table(if small { 8 } else { 4096 });
        let mut last = HashMap::new();
        for (k, cause, close) in &ops {
            prop_assert!(t.publish(&key(*k), *cause));
            last.insert(*k, (*cause, *close));
            if *close {
                t.mark_closed(&key(*k));
            }
        }
        for (k, (cause, closed)) in &last {
            match t.lookup(&key(*k)) {
                Some(c) => prop_assert!(!closed && (c == *cause || c == 0), "key {k}: {c} != {cause}"),
                None => prop_assert!(small || *closed, "key {k} lost in a big table"),
            }
        }
        prop_assert!(t.entries().count() <= t.slots() as usize);
        let _ = PROBE;
    }

    #[test]
    fn arbitrary_files_never_open_as_tables_unless_valid(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("causal");
        std::fs::write(&path, &bytes).unwrap();
        prop_assert!(Table::open(&path).is_err());
    }
}
