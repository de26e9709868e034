//! Trace-context propagation: the configured formats as one composite propagator.
//!
//! The B3 and Jaeger formats are deprecated upstream in favour of W3C TraceContext, but apps in
//! the wild still speak them, so the proxy keeps them (hence `allow(deprecated)`).
#![allow(deprecated)]

use opentelemetry::propagation::text_map_propagator::FieldIter;
use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_zipkin::{B3Encoding, Propagator as B3Propagator};

use crate::config::Propagator;

/// Builds the composite propagator for `OTEL_PROPAGATORS`. Extraction tries every format;
/// injection writes every format, so each peer finds the proxy's span in the headers it reads.
pub fn composite(formats: &[Propagator]) -> TextMapCompositePropagator {
    let mut list: Vec<Box<dyn TextMapPropagator + Send + Sync>> = Vec::new();
    let b3 = formats.contains(&Propagator::B3);
    let b3multi = formats.contains(&Propagator::B3Multi);
    for f in formats {
        match f {
            Propagator::TraceContext => list.push(Box::new(W3cTraceContext::default())),
            Propagator::Baggage => list.push(Box::new(W3cBaggage::default())),
            Propagator::Jaeger => {
                list.push(Box::new(opentelemetry_jaeger_propagator::Propagator::new()))
            }
            // One B3 propagator serves both encodings, so a list naming both doesn't extract twice.
            Propagator::B3 | Propagator::B3Multi => {
                if list_has_b3(formats, *f) {
                    let encoding = match (b3, b3multi) {
                        (true, true) => B3Encoding::SingleAndMultiHeader,
                        (true, false) => B3Encoding::SingleHeader,
                        _ => B3Encoding::MultipleHeader,
                    };
                    list.push(Box::new(B3Propagator::with_encoding(encoding)));
                }
            }
        }
    }
    TextMapCompositePropagator::new(list)
}

/// W3C TraceContext: extraction is the SDK's, after a check of the `traceparent` grammar that
/// the SDK leaves out (it takes `00-1-1-01`, ids of any length, for trace id 1); injection
/// writes `traceparent` with a table instead of `format!` (it runs for every proxied request)
/// and leaves out an empty `tracestate`, which the SDK's propagator would send.
#[derive(Debug, Default)]
struct W3cTraceContext(TraceContextPropagator);

impl TextMapPropagator for W3cTraceContext {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        inject_trace_context(cx.span().span_context(), injector);
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        match extractor.get("traceparent") {
            Some(tp) if is_traceparent(tp) => self.0.extract_with_context(cx, extractor),
            _ => cx.clone(),
        }
    }

    fn fields(&self) -> FieldIter<'_> {
        self.0.fields()
    }
}

/// Whether `v` has the shape W3C Trace Context gives a `traceparent` (optional whitespace
/// around it): `version-traceid-parentid-flags`, 2, 32, 16 and 2 lowercase hex digits, version
/// `ff` invalid, and only versions after `00` followed by more (`-...`). All-zero ids are left
/// to the SDK, which refuses them.
fn is_traceparent(v: &str) -> bool {
    let b = v.trim_matches([' ', '\t']).as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b.get(r)
            .is_some_and(|s| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
    };
    let dash = |i: usize| b.get(i) == Some(&b'-');
    let fields = hex(0..2) && dash(2) && hex(3..35) && dash(35) && hex(36..52) && dash(52);
    let version_ok = !b.starts_with(b"ff");
    let end_ok = match b.len() {
        55 => true,
        _ => !b.starts_with(b"00") && dash(55),
    };
    fields && hex(53..55) && version_ok && end_ok
}

/// W3C Baggage: extraction is the SDK's; injection is ours, because the SDK's writes entry
/// properties as they were decoded (a `%0D%0A` that came in goes out as a line break) and
/// leaves `%` in values unescaped (so `100%25` arrives at the next hop as `100%`).
#[derive(Debug, Default)]
struct W3cBaggage(BaggagePropagator);

impl TextMapPropagator for W3cBaggage {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        use opentelemetry::baggage::BaggageExt;
        let baggage = cx.baggage();
        if baggage.is_empty() {
            return;
        }
        let mut out = String::new();
        for (name, (value, metadata)) in baggage {
            if !out.is_empty() {
                out.push(',');
            }
            baggage_escape(name.as_str().trim(), b"", &mut out);
            out.push('=');
            baggage_escape(value.as_str().trim(), b"", &mut out);
            let metadata = metadata.as_str().trim();
            if !metadata.is_empty() {
                out.push(';');
                // Properties keep their own `;` and `=` structure.
                baggage_escape(metadata, b";=", &mut out);
            }
        }
        injector.set("baggage", out);
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        self.0.extract_with_context(cx, extractor)
    }

    fn fields(&self) -> FieldIter<'_> {
        self.0.fields()
    }
}

/// Appends `s` to `out` percent-encoded as W3C Baggage requires: everything but the
/// `baggage-octet`s (visible ASCII except `"`, `,`, `;`, `\`) escaped, and `%` and `=` too so the
/// text decodes back to `s`; the bytes in `keep` stay as they are.
fn baggage_escape(s: &str, keep: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        let plain = b.is_ascii_graphic() && !b"\",;\\%=".contains(&b);
        if plain || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// `traceparent`, and `tracestate` when there is one.
fn inject_trace_context(sc: &SpanContext, injector: &mut dyn Injector) {
    if !sc.is_valid() {
        return;
    }
    injector.set("traceparent", traceparent(sc));
    let state = sc.trace_state().header();
    if !state.is_empty() {
        injector.set("tracestate", state);
    }
}

/// `00-<trace id>-<span id>-<flags>`, only the sampled flag kept (as the SDK does).
pub fn traceparent(sc: &SpanContext) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    let mut at = 3;
    let mut hex = |bytes: &[u8], out: &mut [u8; 55]| {
        for b in bytes {
            out[at] = HEX[(b >> 4) as usize];
            out[at + 1] = HEX[(b & 0xf) as usize];
            at += 2;
        }
        at += 1; // the '-' after each part
    };
    hex(&sc.trace_id().to_bytes(), &mut out);
    hex(&sc.span_id().to_bytes(), &mut out);
    hex(
        &[sc.trace_flags().to_u8() & TraceFlags::SAMPLED.to_u8()],
        &mut out,
    );
    out[35] = b'-';
    out[52] = b'-';
    // Only ASCII was written, so this never falls back.
    std::str::from_utf8(&out).unwrap_or_default().to_owned()
}

/// The default formats (`tracecontext`, optionally `baggage`) injected without building a
/// `Context` for the proxy's span (an allocation per request): `traceparent` and `tracestate`
/// come straight from the span context, `baggage` from the request's own context, which is
/// where the baggage is. The result is what [`composite`] writes for the same formats.
#[derive(Debug)]
pub struct W3cInjector {
    baggage: Option<W3cBaggage>,
}

impl W3cInjector {
    /// `Some` when `formats` is `tracecontext` with or without `baggage` and nothing else.
    pub fn for_formats(formats: &[Propagator]) -> Option<Self> {
        let only_w3c = formats
            .iter()
            .all(|f| matches!(f, Propagator::TraceContext | Propagator::Baggage));
        (only_w3c && formats.contains(&Propagator::TraceContext)).then(|| W3cInjector {
            baggage: formats
                .contains(&Propagator::Baggage)
                .then(W3cBaggage::default),
        })
    }

    /// Writes the proxy span `sc`, child of `parent`, into `injector`.
    pub fn inject(&self, sc: &SpanContext, parent: &Context, injector: &mut dyn Injector) {
        if !sc.is_valid() {
            return;
        }
        inject_trace_context(sc, injector);
        if let Some(b) = &self.baggage {
            b.inject_context(parent, injector);
        }
    }
}

/// True for the first B3 variant in the list.
fn list_has_b3(formats: &[Propagator], this: Propagator) -> bool {
    formats
        .iter()
        .find(|p| matches!(p, Propagator::B3 | Propagator::B3Multi))
        == Some(&this)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::Context;
    use opentelemetry_http::{HeaderExtractor, HeaderInjector};

    fn ctx() -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    #[test]
    fn traceparent_matches_the_sdk_and_skips_empty_tracestate() {
        let ours = W3cTraceContext::default();
        let sdk = TraceContextPropagator::new();
        let with_state = Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::new(0x03),
            true,
            TraceState::from_key_value([("congo", "t61rcWkgMzE")]).unwrap(),
        ));
        for cx in [ctx(), with_state] {
            let (mut a, mut b) = (http::HeaderMap::new(), http::HeaderMap::new());
            ours.inject_context(&cx, &mut HeaderInjector(&mut a));
            sdk.inject_context(&cx, &mut HeaderInjector(&mut b));
            assert_eq!(a["traceparent"], b["traceparent"]);
            let sdk_state = b.get("tracestate").filter(|v| !v.is_empty());
            assert_eq!(a.get("tracestate"), sdk_state);
            // And it reads back as the same context.
            let back = ours.extract(&HeaderExtractor(&a));
            assert_eq!(
                back.span().span_context().span_id(),
                cx.span().span_context().span_id()
            );
        }
        assert_eq!(
            traceparent(ctx().span().span_context()),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn the_w3c_fast_path_writes_what_the_composite_writes() {
        use opentelemetry::baggage::BaggageExt;
        use opentelemetry::KeyValue;
        assert!(W3cInjector::for_formats(&[Propagator::TraceContext, Propagator::B3]).is_none());
        assert!(W3cInjector::for_formats(&[Propagator::Baggage]).is_none());
        let child = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("1111111111111111").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("v", "1")]).unwrap(),
        );
        for formats in [
            vec![Propagator::TraceContext],
            vec![Propagator::TraceContext, Propagator::Baggage],
            vec![Propagator::Baggage, Propagator::TraceContext],
        ] {
            for parent in [
                ctx(),
                ctx().with_baggage([KeyValue::new("user", "alice")]),
                Context::new(),
            ] {
                let (mut fast, mut slow) = (http::HeaderMap::new(), http::HeaderMap::new());
                W3cInjector::for_formats(&formats).unwrap().inject(
                    &child,
                    &parent,
                    &mut HeaderInjector(&mut fast),
                );
                let cx = parent.with_remote_span_context(child.clone());
                composite(&formats).inject_context(&cx, &mut HeaderInjector(&mut slow));
                assert_eq!(fast, slow, "{formats:?}");
            }
        }
    }

    #[test]
    fn injects_every_configured_format() {
        let p = composite(&[
            Propagator::TraceContext,
            Propagator::B3,
            Propagator::B3Multi,
            Propagator::Jaeger,
        ]);
        let mut h = http::HeaderMap::new();
        p.inject_context(&ctx(), &mut HeaderInjector(&mut h));
        assert_eq!(
            h["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert!(h["b3"]
            .to_str()
            .unwrap()
            .starts_with("4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"));
        assert_eq!(h["x-b3-spanid"], "00f067aa0ba902b7");
        assert!(h["uber-trace-id"]
            .to_str()
            .unwrap()
            .starts_with("4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7"));
    }

    #[test]
    fn extracts_any_configured_format() {
        let p = composite(&[Propagator::TraceContext, Propagator::Jaeger]);
        let mut h = http::HeaderMap::new();
        h.insert(
            "uber-trace-id",
            "4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7:0:1"
                .parse()
                .unwrap(),
        );
        let cx = p.extract(&HeaderExtractor(&h));
        assert_eq!(
            cx.span().span_context().span_id().to_string(),
            "00f067aa0ba902b7"
        );
    }

    #[test]
    fn traceparents_outside_the_w3c_grammar_are_ignored() {
        // Found by fuzz_traceparent_grammar: the SDK parses ids with `from_str_radix`, so short,
        // long (leading zeros) or signed ids passed.
        let p = composite(&[Propagator::TraceContext]);
        for bad in [
            "00-1-1-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            let mut h = http::HeaderMap::new();
            h.insert("traceparent", bad.parse().unwrap());
            let cx = p.extract(&HeaderExtractor(&h));
            assert!(!cx.span().span_context().is_valid(), "{bad}");
        }
        for good in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next",
        ] {
            let mut h = http::HeaderMap::new();
            h.insert("traceparent", good.parse().unwrap());
            let cx = p.extract(&HeaderExtractor(&h));
            assert_eq!(
                cx.span().span_context().span_id().to_string(),
                "00f067aa0ba902b7"
            );
        }
    }

    #[test]
    fn baggage_goes_on_as_it_came() {
        // Found by fuzz_arbitrary_context_headers: the SDK wrote decoded entry properties back
        // as they were, so an escaped line break or NUL in the request became a raw one in the
        // headers sent on; and `%` in values went out unescaped.
        let p = composite(&[Propagator::TraceContext, Propagator::Baggage]);
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", ctx_header().parse().unwrap());
        h.insert(
            "baggage",
            "k=v;p%0D%0Ax-evil: 1,n=100%2525,z=%00".parse().unwrap(),
        );
        let cx = p.extract(&HeaderExtractor(&h));
        let mut out = http::HeaderMap::new();
        p.inject_context(&cx, &mut HeaderInjector(&mut out));
        let sent = out["baggage"].to_str().unwrap();
        assert!(!sent.bytes().any(|b| b.is_ascii_control()), "{sent:?}");
        for entry in ["k=v;p%0D%0Ax-evil:%201", "n=100%2525", "z=%00"] {
            assert!(
                sent.split(',').any(|e| e == entry),
                "{entry} not in {sent:?}"
            );
        }
        // The fast path writes the same.
        let mut fast = http::HeaderMap::new();
        W3cInjector::for_formats(&[Propagator::TraceContext, Propagator::Baggage])
            .unwrap()
            .inject(
                cx.span().span_context(),
                &cx,
                &mut HeaderInjector(&mut fast),
            );
        assert_eq!(fast["baggage"], out["baggage"]);
    }

    fn ctx_header() -> &'static str {
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    }

    /// Property tests: arbitrary, mutated and valid context headers.
    mod fuzz {
        use super::*;
        use crate::fuzzing::{self, mutate_str, mutations};
        use opentelemetry::baggage::BaggageExt;
        use opentelemetry::propagation::Extractor;
        use opentelemetry::trace::{SpanId, TraceId, TraceState};
        use proptest::prelude::*;

        use crate::fuzzing::RawHeaders as Raw;

        /// Everything a propagator writes.
        #[derive(Debug, Default)]
        struct Written(Vec<(String, String)>);

        impl Injector for Written {
            fn set(&mut self, key: &str, value: String) {
                self.0.push((key.to_owned(), value));
            }
        }

        /// A value an HTTP/1 header can carry: tab, visible ASCII, space, and (as obs-text)
        /// any non-ASCII character; never CR, LF or another control character.
        fn is_header_value(v: &str) -> bool {
            v.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
                && http::HeaderValue::from_str(v).is_ok()
        }

        /// The traceparent grammar of W3C Trace Context (level 1), written out independently
        /// of the code under test: `vv-<32 hex>-<16 hex>-<2 hex>`, lowercase, version not `ff`,
        /// neither id all zeros, and for versions above 00 more fields after a `-`.
        fn w3c_traceparent(v: &str) -> bool {
            let v = v.trim_matches([' ', '\t']);
            let shape = "xx-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-xxxxxxxxxxxxxxxx-xx";
            let Some(head) = v.get(..shape.len()) else {
                return false;
            };
            let fits = head.bytes().zip(shape.bytes()).all(|(c, s)| match s {
                b'x' => matches!(c, b'0'..=b'9' | b'a'..=b'f'),
                _ => c == s,
            });
            if !fits {
                return false;
            }
            // All ASCII now, so these slices are on character boundaries.
            let (version, trace, span) = (&head[..2], &head[3..35], &head[36..52]);
            let rest = &v[shape.len()..];
            version != "ff"
                && trace.bytes().any(|c| c != b'0')
                && span.bytes().any(|c| c != b'0')
                && (rest.is_empty() || (version != "00" && rest.starts_with('-')))
        }

        const ALL: [Propagator; 5] = [
            Propagator::TraceContext,
            Propagator::Baggage,
            Propagator::B3,
            Propagator::B3Multi,
            Propagator::Jaeger,
        ];

        /// A non-empty selection of formats, in any order.
        fn formats() -> impl Strategy<Value = Vec<Propagator>> {
            prop::sample::subsequence(ALL.to_vec(), 1..=ALL.len()).prop_shuffle()
        }

        /// Names the propagators read (and some they do not).
        const NAMES: &[&str] = &[
            "traceparent",
            "tracestate",
            "baggage",
            "b3",
            "X-B3-TraceId",
            "x-b3-spanid",
            "x-b3-sampled",
            "x-b3-flags",
            "x-b3-parentspanid",
            "uber-trace-id",
            "uberctx-user",
            "uberctx-",
            "UBERCTX-Team",
            "x-other",
        ];

        /// Valid values of those headers, to mutate.
        const VALID: &[&str] = &[
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
            "user=alice,team=a%2Cb;prop=1",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-0020000000000001",
            "00f067aa0ba902b7",
            "4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7:0:1",
            "4bf92f3577b34da6a3ce929d0e0e4736%3A00f067aa0ba902b7%3A0%3A1",
            "d",
        ];

        /// Valid traceparents of this version and a later one.
        const TRACEPARENTS: &[&str] = &[
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ];

        /// Pieces spliced in: separators, and escapes of bytes no header may carry.
        const PIECES: &[&str] = &[
            "-",
            ",",
            "=",
            ";",
            ":",
            "%3A",
            "%0D%0A",
            "%0A",
            "%00",
            "%7F",
            "%E9",
            "%",
            "00",
            "ff",
            "0000000000000000",
            " ",
            "\t",
            "é",
            "\u{80}",
        ];

        /// A header value as httparse would hand it over.
        fn value() -> impl Strategy<Value = String> {
            let ch = prop_oneof![
                prop::sample::select(&['\t', '-', ',', '=', ';', ':', '%', ' ', '0', 'f'][..]),
                proptest::char::range(' ', '~'),
                proptest::char::range('\u{80}', '\u{10ffff}'),
            ];
            let arbitrary = prop::collection::vec(ch, 0..80).prop_map(String::from_iter);
            let mutated = (prop::sample::select(VALID), mutations()).prop_map(|(v, m)| {
                // Controls the mutations made are ones httparse would have refused.
                mutate_str(v, &m, PIECES).replace(|c: char| c.is_control() && c != '\t', "")
            });
            prop_oneof![arbitrary, mutated]
        }

        fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
            prop::collection::vec(
                (prop::sample::select(NAMES).prop_map(String::from), value()),
                0..8,
            )
        }

        /// What the proxy does with a request's context: extract it, start a child span, and
        /// inject the child with the request's baggage.
        fn round(formats: &[Propagator], headers: &Raw) -> (Context, Written) {
            let p = composite(formats);
            let parent = p.extract(headers);
            let psc = parent.span().span_context().clone();
            let trace_id = if psc.is_valid() {
                psc.trace_id()
            } else {
                TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c)
            };
            let child = SpanContext::new(
                trace_id,
                SpanId::from(0x1111_2222_3333_4444),
                psc.trace_flags().with_sampled(true),
                false,
                psc.trace_state().clone(),
            );
            let mut out = Written::default();
            match W3cInjector::for_formats(formats) {
                Some(fast) => fast.inject(&child, &parent, &mut out),
                None => p.inject_context(&parent.with_remote_span_context(child), &mut out),
            }
            (parent, out)
        }

        proptest! {
            #![proptest_config(fuzzing::config())]

            /// Whatever the request carried, what is sent on is valid header names and values
            /// (nothing a peer sent can end a header line early), and a traceparent is only
            /// accepted when it follows the W3C grammar.
            #[test]
            fn fuzz_arbitrary_context_headers(formats in formats(), headers in headers()) {
                let headers = Raw(headers);
                let (parent, out) = round(&formats, &headers);
                for (k, v) in &out.0 {
                    prop_assert!(http::HeaderName::from_bytes(k.as_bytes()).is_ok(), "name {k:?}");
                    prop_assert!(is_header_value(v), "{k}: {v:?} from {headers:?}");
                }
                // Only the W3C format is checked for conformance; B3 and Jaeger allow short ids.
                if formats == [Propagator::TraceContext] && parent.span().span_context().is_valid() {
                    let tp = headers.get("traceparent").unwrap_or_default();
                    prop_assert!(w3c_traceparent(tp), "accepted {tp:?}");
                }
                // The W3C fast path writes what the composite writes (in any order).
                let child = parent.span().span_context().clone();
                if let (Some(fast), true) = (W3cInjector::for_formats(&formats), child.is_valid()) {
                    let (mut slow, mut quick) = (Written::default(), Written::default());
                    composite(&formats).inject_context(&parent, &mut slow);
                    fast.inject(&child, &parent, &mut quick);
                    slow.0.sort();
                    quick.0.sort();
                    prop_assert_eq!(slow.0, quick.0);
                }
            }

            /// A valid traceparent (and tracestate) is extracted exactly, in every format mix
            /// that includes tracecontext, and sent on with the proxy's span id.
            #[test]
            fn fuzz_valid_traceparent_is_extracted_exactly(
                trace in 1u128..,
                span in 1u64..,
                flags in any::<u8>(),
                version in prop_oneof![Just(0u8), 1u8..=0xfe],
                future in "(-[a-z0-9]{0,8})?",
                state in prop::collection::vec(
                    ("[a-z][a-z0-9_*/-]{0,15}", "[\\x21-\\x2b\\x2d-\\x3c\\x3e-\\x7e]{1,16}"),
                    0..4,
                ),
                others in formats(),
                pad in prop::sample::select(&["", " ", "\t"][..]),
            ) {
                let future = if version == 0 { String::new() } else { future };
                let tp = format!("{pad}{version:02x}-{trace:032x}-{span:016x}-{flags:02x}{future}{pad}");
                prop_assert!(w3c_traceparent(&tp), "the oracle refuses {tp:?}");
                let state: Vec<String> = state.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let state = state.join(",");
                let mut headers = vec![("traceparent".to_string(), tp.clone())];
                if !state.is_empty() {
                    headers.push(("tracestate".to_string(), state.clone()));
                }
                let mut formats = vec![Propagator::TraceContext];
                formats.extend(others.iter().filter(|f| **f != Propagator::TraceContext));
                let (parent, out) = round(&formats, &Raw(headers));
                let want_state: TraceState = state.parse().unwrap_or_default();
                let want = SpanContext::new(
                    TraceId::from(trace),
                    SpanId::from(span),
                    TraceFlags::new(flags) & TraceFlags::SAMPLED,
                    true,
                    want_state.clone(),
                );
                let got = parent.span().span_context().clone();
                prop_assert_eq!(got, want, "{}", tp);
                let sent = out.0.iter().find(|(k, _)| k == "traceparent").map(|(_, v)| v.clone());
                prop_assert_eq!(
                    sent,
                    Some(format!("00-{trace:032x}-{:016x}-01", 0x1111_2222_3333_4444u64))
                );
                let sent_state = out.0.iter().find(|(k, _)| k == "tracestate").map(|(_, v)| v.clone());
                prop_assert_eq!(sent_state.unwrap_or_default(), want_state.header());
            }

            /// A traceparent is accepted exactly when it follows the W3C grammar, and then read
            /// as written.
            #[test]
            fn fuzz_traceparent_grammar(
                tp in prop_oneof![
                    value(),
                    (
                        prop::sample::select(TRACEPARENTS),
                        mutations(),
                    )
                        .prop_map(|(v, m)| mutate_str(v, &m, &["-", "0", "f", "F", "+", " ", "00"])),
                ],
            ) {
                let headers = Raw(vec![("traceparent".into(), tp.clone())]);
                let sc = composite(&[Propagator::TraceContext])
                    .extract(&headers)
                    .span()
                    .span_context()
                    .clone();
                prop_assert_eq!(sc.is_valid(), w3c_traceparent(&tp), "{:?}", tp);
                if sc.is_valid() {
                    let t = tp.trim_matches([' ', '\t']);
                    prop_assert_eq!(sc.trace_id().to_string(), &t[3..35]);
                    prop_assert_eq!(sc.span_id().to_string(), &t[36..52]);
                }
            }

            /// Any baggage entries survive the trip: extracted from what the baggage propagator
            /// wrote, they are the same entries.
            #[test]
            fn fuzz_baggage_round_trip(
                entries in prop::collection::btree_map("[a-zA-Z0-9_.-]{1,12}", "\\PC{0,24}", 0..6),
            ) {
                use opentelemetry::KeyValue;
                let entries: Vec<(String, String)> = entries
                    .into_iter()
                    .map(|(k, v)| (k, v.trim().to_string()))
                    .collect();
                let cx = Context::new().with_baggage(
                    entries.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
                );
                let mut out = Written::default();
                W3cBaggage::default().inject_context(&cx, &mut out);
                for (_, v) in &out.0 {
                    prop_assert!(is_header_value(v), "{v:?}");
                }
                let back = W3cBaggage::default().extract(&Raw(out.0));
                let mut got: Vec<(String, String)> = back
                    .baggage()
                    .iter()
                    .map(|(k, (v, _))| (k.to_string(), v.to_string()))
                    .collect();
                got.sort();
                prop_assert_eq!(got, entries);
            }
        }
    }
}
