//! The value syntax and names the proxy and the injector share, so that a value one accepts (in a flag,
//! a variable or an annotation the injector passes on) is one the other accepts.

use std::time::Duration;

/// The longest duration a setting may name: 100 years. Timeouts are added to the current
/// instant, and a value near `Duration::MAX` would overflow that (a panic) where no limit was
/// meant; 100 years is "never" for any process.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parses `10s`, `500ms`, `2m` or a bare number of seconds; fractions too (`1.5s`), exactly to
/// the nanosecond (digits beyond that are dropped). `None` for anything else, and for a value
/// over [`MAX_DURATION`].
pub fn parse_duration(v: &str) -> Option<Duration> {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let v = v.trim();
    // (`find` gives a char boundary, so the split cannot panic.)
    let (num, unit) = v.split_at(
        v.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(v.len()),
    );
    let unit_nanos: u128 = match unit {
        "" | "s" => NANOS_PER_SEC,
        "ms" => NANOS_PER_SEC / 1000,
        "m" => 60 * NANOS_PER_SEC,
        _ => return None,
    };
    let (whole, fraction) = num.split_once('.').unwrap_or((num, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return None;
    }
    // Integer arithmetic, not `f64`: `9536927129ms` is exactly that many milliseconds, and no
    // value is large enough to make the conversion panic.
    let whole: u128 = match whole {
        "" => 0,
        w => w.parse().ok()?,
    };
    let mut nanos = whole.checked_mul(unit_nanos)?;
    let mut place = unit_nanos;
    for d in fraction.bytes() {
        place /= 10;
        nanos += u128::from(d - b'0') * place;
    }
    let secs = u64::try_from(nanos / NANOS_PER_SEC).ok()?;
    // The remainder is below 10^9, so it fits.
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).ok()?;
    Some(Duration::new(secs, subsec)).filter(|d| *d <= MAX_DURATION)
}

/// A trace-context format (`OTEL_PROPAGATORS`, `tracecar.dev/propagators`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagator {
    TraceContext,
    Baggage,
    B3,
    B3Multi,
    Jaeger,
}

impl Propagator {
    pub const ALL: [Propagator; 5] = [
        Propagator::TraceContext,
        Propagator::Baggage,
        Propagator::B3,
        Propagator::B3Multi,
        Propagator::Jaeger,
    ];

    /// The name the OTel spec gives it.
    pub fn name(self) -> &'static str {
        match self {
            Propagator::TraceContext => "tracecontext",
            Propagator::Baggage => "baggage",
            Propagator::B3 => "b3",
            Propagator::B3Multi => "b3multi",
            Propagator::Jaeger => "jaeger",
        }
    }

    pub fn from_name(name: &str) -> Option<Propagator> {
        Propagator::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// What a propagator list may hold, for error messages.
pub const PROPAGATORS: &str =
    "a comma-separated list of tracecontext, baggage, b3, b3multi, jaeger";

/// Parses a comma-separated propagator list as the OTel spec reads `OTEL_PROPAGATORS`: names
/// trimmed, repeats kept once in first-seen order, empty entries and `none` (no propagation)
/// skipped. `None` for an unknown name.
pub fn parse_propagators(s: &str) -> Option<Vec<Propagator>> {
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim) {
        if name.is_empty() || name == "none" {
            continue;
        }
        let p = Propagator::from_name(name)?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn units_fractions_and_bare_seconds() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration(" 2m "), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration(".5s"), Some(Duration::from_millis(500)));
        for bad in [
            "", "x", "-1s", "s", ".", "1.2.3s", "1h", "1 s", "1é", "０.5",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(parse_duration("18446744073709551616s"), None);
        assert_eq!(
            parse_duration("307445734561825860m"),
            None,
            "over 100 years"
        );
        let max = MAX_DURATION.as_secs();
        assert_eq!(parse_duration(&format!("{max}s")), Some(MAX_DURATION));
        assert_eq!(parse_duration(&format!("{max}.000000001s")), None);
        assert_eq!(
            parse_duration(&format!("{}m", max / 60)),
            Some(MAX_DURATION)
        );
    }

    #[test]
    fn propagator_lists_read_as_the_otel_spec_says() {
        use Propagator::*;
        assert_eq!(
            parse_propagators(" b3, tracecontext,b3 ,, none"),
            Some(vec![B3, TraceContext])
        );
        assert_eq!(parse_propagators("none"), Some(vec![]));
        assert_eq!(parse_propagators("xray"), None);
        assert_eq!(parse_propagators("B3"), None, "names are lower case");
        for p in Propagator::ALL {
            assert_eq!(Propagator::from_name(p.name()), Some(p));
            assert!(PROPAGATORS.contains(p.name()));
        }
    }

    proptest! {
        /// Arbitrary text never panics; whole milliseconds read back exactly in every unit.
        #[test]
        fn fuzz_parse_duration(s in "\\PC{0,24}", ms in 0u64..10_000_000_000) {
            let _ = parse_duration(&s);
            prop_assert_eq!(parse_duration(&format!("{ms}ms")), Some(Duration::from_millis(ms)));
            prop_assert_eq!(
                parse_duration(&format!("{}.{:03}s", ms / 1000, ms % 1000)),
                Some(Duration::from_millis(ms))
            );
        }
    }
}
