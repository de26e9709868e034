//! Shared pieces of the property tests that fuzz every parser of outside input (tests only).
//!
//! Each parser's own test module has `fuzz_*` properties: arbitrary bytes, and valid inputs put
//! through [`Mutation`]s (bytes inserted, deleted, flipped, duplicated, truncated, and valid
//! pieces spliced in). `cargo test -p tracecar-proxy fuzz_` runs them all with [`config`]'s
//! bounded case count; `PROPTEST_CASES=100000` runs them longer (docs/proxy.md, "Fuzzing").

use proptest::prelude::*;
use proptest::test_runner::Config;

/// Cases per property: `PROPTEST_CASES`, else 256 (the whole set then runs in seconds).
pub fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    Config {
        cases,
        // Shrinking a failure to its smallest form is worth many steps; a bound keeps a
        // failing long run from shrinking for hours.
        max_shrink_iters: 4096,
        // A failure is printed, shrunk; it becomes a regression case in the module's own
        // tests rather than a seed file next to the sources.
        failure_persistence: None,
        ..Config::default()
    }
}

/// One edit of an input.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Insert a byte.
    Insert(usize, u8),
    /// Delete a byte.
    Delete(usize),
    /// XOR a byte with a non-zero mask.
    Flip(usize, u8),
    /// Copy a run of up to 16 bytes right after itself.
    Duplicate(usize, usize),
    /// Cut the input at a point.
    Truncate(usize),
    /// Insert one of the caller's valid pieces.
    Splice(usize, usize),
    /// Overwrite with one of the caller's valid pieces.
    Overwrite(usize, usize),
}

/// A few mutations (1..=8).
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), 1u8..).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<usize>(), 1usize..=16).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>()).prop_map(|(i, p)| Mutation::Splice(i, p)),
        (any::<usize>(), any::<usize>()).prop_map(|(i, p)| Mutation::Overwrite(i, p)),
    ];
    prop::collection::vec(one, 1..=8)
}

/// `input` with `muts` applied in order; `pieces` are what `Splice`/`Overwrite` put in.
pub fn mutate(input: &[u8], muts: &[Mutation], pieces: &[&[u8]]) -> Vec<u8> {
    let mut buf = input.to_vec();
    // Positions are taken modulo the length: a byte in 0..len, or a point in 0..=len.
    let point = |i: &usize, len: usize| i % (len + 1);
    let byte = |i: &usize, len: usize| i % len;
    for m in muts {
        let len = buf.len();
        match m {
            Mutation::Insert(i, b) => buf.insert(point(i, len), *b),
            Mutation::Delete(i) if len > 0 => {
                buf.remove(byte(i, len));
            }
            Mutation::Flip(i, mask) if len > 0 => buf[byte(i, len)] ^= mask,
            Mutation::Duplicate(i, n) if len > 0 => {
                let at = byte(i, len);
                let end = (at + n).min(len);
                let run = buf[at..end].to_vec();
                buf.splice(end..end, run);
            }
            Mutation::Truncate(i) => buf.truncate(point(i, len)),
            Mutation::Splice(i, p) if !pieces.is_empty() => {
                let at = point(i, len);
                let piece = pieces[p % pieces.len()];
                buf.splice(at..at, piece.iter().copied());
            }
            Mutation::Overwrite(i, p) if !pieces.is_empty() => {
                let at = point(i, len);
                let piece = pieces[p % pieces.len()];
                let end = (at + piece.len()).min(len);
                buf.splice(at..end, piece.iter().copied());
            }
            _ => {}
        }
    }
    buf
}

/// [`mutate`] for text: the mutated bytes as a string (invalid UTF-8 replaced).
pub fn mutate_str(input: &str, muts: &[Mutation], pieces: &[&str]) -> String {
    let pieces: Vec<&[u8]> = pieces.iter().map(|p| p.as_bytes()).collect();
    String::from_utf8_lossy(&mutate(input.as_bytes(), muts, &pieces)).into_owned()
}

/// Arbitrary text with the characters parsers split on over-represented, so arbitrary strings
/// reach past the first separator more often than uniformly random ones would.
pub fn text() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        4 => any::<char>(),
        4 => prop::sample::select(
            &[
                ',', '=', '-', ':', '/', '.', '%', ' ', '\t', ';', '[', ']', '0', '1', '9', 'a',
                'f', 'x', 's', 'm', '@', '*', '+', '?', '#', '\r', '\n', '\0', 'é',
            ][..]
        ),
        2 => proptest::char::range('0', '9'),
    ];
    prop::collection::vec(ch, 0..64).prop_map(|v| v.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest! {
        #![proptest_config(config())]

        /// The mutator itself: no edit panics, and the edits do change inputs (else the
        /// properties built on it would test only their valid inputs).
        #[test]
        fn fuzz_mutations_stay_in_bounds(
            input in prop::collection::vec(any::<u8>(), 0..64),
            muts in mutations(),
        ) {
            let pieces: &[&[u8]] = &[b"ab", b""];
            let out = mutate(&input, &muts, pieces);
            // At most 8 edits, each adding at most 16 bytes.
            prop_assert!(out.len() <= input.len() + 8 * 16);
        }
    }

    #[test]
    fn each_mutation_edits() {
        let i = |n: usize| n;
        let pieces: &[&[u8]] = &[b"XY"];
        let m = |muts: &[Mutation]| mutate(b"abcd", muts, pieces);
        assert_eq!(m(&[Mutation::Insert(i(0), b'z')]), b"zabcd");
        assert_eq!(m(&[Mutation::Delete(i(0))]), b"bcd");
        assert_eq!(m(&[Mutation::Flip(i(0), 1)]), b"`bcd");
        assert_eq!(m(&[Mutation::Duplicate(i(0), 2)]), b"ababcd");
        assert_eq!(m(&[Mutation::Truncate(i(0))]), b"");
        assert_eq!(m(&[Mutation::Splice(i(0), i(0))]), b"XYabcd");
        assert_eq!(m(&[Mutation::Overwrite(i(0), i(0))]), b"XYcd");
        assert_eq!(mutate(b"", &[Mutation::Delete(i(3))], pieces), b"");
    }
}

/// Headers as the lean HTTP/1 path hands them to the propagators: the first of a name (any
/// case), any value httparse lets through.
#[derive(Debug)]
pub struct RawHeaders(pub Vec<(String, String)>);

impl opentelemetry::propagation::Extractor for RawHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}
