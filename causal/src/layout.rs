//! The file format of the causal table.
//!
//! Little-endian. A 64-byte header, then `slots` slots of 32 bytes:
//!
//! | offset | size | header field |
//! | ---: | ---: | --- |
//! | 0 | 8 | magic `b"TRCCAUS1"` |
//! | 8 | 4 | version, u32 = 1 |
//! | 12 | 4 | slot count, u32, a power of two |
//! | 16 | 48 | zero |
//!
//! | offset | size | slot field |
//! | ---: | ---: | --- |
//! | 0 | 4 | `seq`: seqlock counter, odd while a writer is in the slot |
//! | 4 | 2 | `local_port` of the app's outbound connection |
//! | 6 | 2 | `peer_port` of that connection, as the app sees it |
//! | 8 | 16 | `peer_ip`, IPv6 (IPv4 as IPv4-mapped IPv6) |
//! | 24 | 2 | `cause_port`: the peer port, as the app sees it, of the inbound connection whose request caused the outbound one (0: no known cause) |
//! | 26 | 2 | `flags`: [`FLAG_VALID`], [`FLAG_CLOSED`] |
//! | 28 | 4 | `gen`: publishes for this key in this slot |
//!
//! A key lives at `hash(key) & (slots - 1)` or one of the next [`PROBE`] - 1 slots
//! (wrapping). The hash is 32-bit FNV-1a over the 20 key bytes as stored (offsets 4..24).
//! In memory a slot is 8 `u32` words; the field offsets above are those words' bytes.

/// The environment variable that names the table's path, for the proxy and the library alike.
pub const ENV_VAR: &str = "TRACECAR_CAUSAL_TABLE";
/// The path when [`ENV_VAR`] is unset.
pub const DEFAULT_PATH: &str = "/var/run/tracecar/causal";
/// The slot count the proxy creates by default.
pub const DEFAULT_SLOTS: u32 = 4096;
/// The fewest slots a table may have.
pub const MIN_SLOTS: u32 = 8;
/// The most slots a table may have (32 MiB of slots).
pub const MAX_SLOTS: u32 = 1 << 20;

pub const MAGIC: [u8; 8] = *b"TRCCAUS1";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const SLOT_LEN: usize = 32;
/// Slots a key may occupy, starting at its home slot.
pub const PROBE: u32 = 8;

/// The slot holds a published key.
pub const FLAG_VALID: u16 = 1;
/// The app has closed the connection; the slot is the first to be reused.
pub const FLAG_CLOSED: u16 = 2;

/// The file's length for `slots` slots.
pub const fn file_len(slots: u32) -> usize {
    HEADER_LEN + slots as usize * SLOT_LEN
}

/// Whether `slots` is a slot count a table may have.
pub const fn valid_slots(slots: u32) -> bool {
    slots.is_power_of_two() && slots >= MIN_SLOTS && slots <= MAX_SLOTS
}

/// The 64-byte header for `slots` slots.
pub fn header(slots: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&slots.to_le_bytes());
    h
}

/// Why a header is not one this code can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    Magic,
    Version(u32),
    Slots(u32),
}

/// Parses a header: the slot count.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<u32, HeaderError> {
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    if h[0..8] != MAGIC {
        return Err(HeaderError::Magic);
    }
    let version = word(8);
    if version != VERSION {
        return Err(HeaderError::Version(version));
    }
    let slots = word(12);
    if !valid_slots(slots) {
        return Err(HeaderError::Slots(slots));
    }
    Ok(slots)
}

/// 32-bit FNV-1a over the key's 20 bytes as stored.
pub fn hash(key_bytes: &[u8; 20]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key_bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The slot index of probe `i` (0..[`PROBE`]) for a key hashing to `h` in a table of `slots`.
pub const fn probe_index(h: u32, i: u32, slots: u32) -> u32 {
    h.wrapping_add(i) & (slots - 1)
}

/// Packs the value word: cause port and flags.
pub const fn value_word(cause_port: u16, flags: u16) -> u32 {
    cause_port as u32 | (flags as u32) << 16
}

/// Unpacks the value word: (cause port, flags).
pub const fn split_value(word: u32) -> (u16, u16) {
    (word as u16, (word >> 16) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trips_and_is_checked() {
        assert_eq!(parse_header(&header(4096)), Ok(4096));
        let mut h = header(4096);
        h[0] = b'X';
        assert_eq!(parse_header(&h), Err(HeaderError::Magic));
        let mut h = header(4096);
        h[8] = 2;
        assert_eq!(parse_header(&h), Err(HeaderError::Version(2)));
        assert_eq!(parse_header(&header(1000)), Err(HeaderError::Slots(1000)));
        assert_eq!(parse_header(&header(4)), Err(HeaderError::Slots(4)));
        assert_eq!(file_len(4096), 64 + 4096 * 32);
    }

    #[test]
    fn fnv1a_matches_the_reference_values() {
        // FNV-1a 32 of 20 zero bytes, computed independently.
        let mut h: u32 = 2166136261;
        for _ in 0..20 {
            h = h.wrapping_mul(16777619);
        }
        assert_eq!(hash(&[0; 20]), h);
        assert_ne!(hash(&[0; 20]), hash(&[1; 20]));
    }

    proptest! {
        #[test]
        fn any_header_bytes_parse_without_panic(bytes in proptest::collection::vec(any::<u8>(), HEADER_LEN)) {
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&bytes);
            if let Ok(slots) = parse_header(&h) {
                prop_assert!(valid_slots(slots));
                prop_assert_eq!(&h[0..8], &MAGIC);
            }
        }

        #[test]
        fn probes_stay_in_the_table_and_are_distinct(h in any::<u32>(), shift in 3u32..=20) {
            let slots = 1u32 << shift;
            let mut seen = Vec::new();
            for i in 0..PROBE {
                let idx = probe_index(h, i, slots);
                prop_assert!(idx < slots);
                prop_assert!(!seen.contains(&idx));
                seen.push(idx);
            }
        }

        #[test]
        fn value_word_round_trips(cause in any::<u16>(), flags in any::<u16>()) {
            prop_assert_eq!(split_value(value_word(cause, flags)), (cause, flags));
        }
    }
}
