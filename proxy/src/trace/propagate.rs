//! Trace-context propagation: the configured formats as one composite propagator.
//!
//! The B3 and Jaeger formats are deprecated upstream in favour of W3C TraceContext, but apps in
//! the wild still speak them, so the proxy keeps them (hence `allow(deprecated)`).
#![allow(deprecated)]

use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
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
            Propagator::TraceContext => list.push(Box::new(TraceContextPropagator::new())),
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
