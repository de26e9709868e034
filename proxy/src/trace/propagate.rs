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
            Propagator::Baggage => list.push(Box::new(BaggagePropagator::new())),
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

/// W3C TraceContext: extraction is the SDK's; injection writes `traceparent` with a table
/// instead of `format!` (it runs for every proxied request) and leaves out an empty
/// `tracestate`, which the SDK's propagator would send.
#[derive(Debug, Default)]
struct W3cTraceContext(TraceContextPropagator);

impl TextMapPropagator for W3cTraceContext {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        inject_trace_context(cx.span().span_context(), injector);
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        self.0.extract_with_context(cx, extractor)
    }

    fn fields(&self) -> FieldIter<'_> {
        self.0.fields()
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
    baggage: Option<BaggagePropagator>,
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
                .then(BaggagePropagator::new),
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
}
