//! OTLP protobuf encoding of finished spans, written straight from the SDK's `SpanData`.
//!
//! opentelemetry-proto's path clones each span, converts it into owned proto structs (a
//! `String` per attribute key and value) and then walks the tree again for every nested length.
//! At 100% sampling that was a large share of the proxy's per-request CPU, so batches are encoded
//! here in one pass with no per-span allocation. The bytes are the same message
//! (`ExportTraceServiceRequest`); the tests decode them with opentelemetry-proto and compare
//! them with its own conversion.

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::SpanData;
use opentelemetry_sdk::Resource;
use prost::encoding::encode_varint;

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// OTLP span flags: the context carries the "is remote" bit, and whether it is set.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// The `ExportTraceServiceRequest` for `spans`, all from `resource`.
pub fn export_request(resource: &Resource, spans: &[SpanData]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + spans.len() * 384);
    if spans.is_empty() {
        return out;
    }
    // ExportTraceServiceRequest.resource_spans = 1
    nested(&mut out, 1, |out| {
        // ResourceSpans.resource = 1
        nested(out, 1, |out| {
            for (k, v) in resource.iter() {
                nested(out, 1, |out| key_value(out, k.as_str(), v));
            }
        });
        // ResourceSpans.scope_spans = 2, one per instrumentation scope, in order of appearance.
        let mut scopes: Vec<&InstrumentationScope> = Vec::new();
        for span in spans {
            let scope = &span.instrumentation_scope;
            // Usually the same scope as the last span: no search.
            if scopes.last().is_some_and(|s| *s == scope) {
                continue;
            }
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
        // The proxy has one tracer, so one scope: no comparison per span.
        let one_scope = scopes.len() == 1;
        for scope in scopes {
            nested(out, 2, |out| {
                nested(out, 1, |out| {
                    string(out, 1, scope.name());
                    string(out, 2, scope.version().unwrap_or_default());
                    for kv in scope.attributes() {
                        nested(out, 3, |out| key_value(out, kv.key.as_str(), &kv.value));
                    }
                });
                for span in spans
                    .iter()
                    .filter(|s| one_scope || s.instrumentation_scope == *scope)
                {
                    nested(out, 2, |out| encode_span(out, span));
                }
                string(out, 3, scope.schema_url().unwrap_or_default());
            });
        }
        string(out, 3, resource.schema_url().unwrap_or_default());
    });
    out
}

fn encode_span(out: &mut Vec<u8>, span: &SpanData) {
    let sc = &span.span_context;
    bytes(out, 1, &sc.trace_id().to_bytes());
    bytes(out, 2, &sc.span_id().to_bytes());
    string(out, 3, &sc.trace_state().header());
    if span.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        bytes(out, 4, &span.parent_span_id.to_bytes());
    }
    string(out, 5, &span.name);
    let kind = match span.span_kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    };
    uint(out, 6, kind);
    fixed64(out, 7, nanos(span.start_time));
    fixed64(out, 8, nanos(span.end_time));
    for kv in &span.attributes {
        nested(out, 9, |out| key_value(out, kv.key.as_str(), &kv.value));
    }
    uint(out, 10, span.dropped_attributes_count as u64);
    for event in span.events.iter() {
        nested(out, 11, |out| {
            fixed64(out, 1, nanos(event.timestamp));
            string(out, 2, &event.name);
            attributes(out, 3, &event.attributes);
            uint(out, 4, event.dropped_attributes_count as u64);
        });
    }
    uint(out, 12, span.events.dropped_count as u64);
    for link in span.links.iter() {
        nested(out, 13, |out| {
            let lc = &link.span_context;
            bytes(out, 1, &lc.trace_id().to_bytes());
            bytes(out, 2, &lc.span_id().to_bytes());
            string(out, 3, &lc.trace_state().header());
            attributes(out, 4, &link.attributes);
            uint(out, 5, link.dropped_attributes_count as u64);
            fixed32(out, 6, flags(lc.is_remote(), lc.trace_flags().to_u8()));
        });
    }
    uint(out, 14, span.links.dropped_count as u64);
    nested(out, 15, |out| {
        let (code, message) = match &span.status {
            Status::Unset => (0, ""),
            Status::Ok => (1, ""),
            Status::Error { description } => (2, description.as_ref()),
        };
        string(out, 2, message);
        uint(out, 3, code);
    });
    fixed32(
        out,
        16,
        flags(span.parent_span_is_remote, sc.trace_flags().to_u8()),
    );
}

fn flags(remote: bool, trace_flags: u8) -> u32 {
    trace_flags as u32 | HAS_IS_REMOTE | if remote { IS_REMOTE } else { 0 }
}

fn nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn attributes(out: &mut Vec<u8>, field: u32, kvs: &[KeyValue]) {
    for kv in kvs {
        nested(out, field, |out| key_value(out, kv.key.as_str(), &kv.value));
    }
}

/// `KeyValue { key = 1; AnyValue value = 2 }`.
fn key_value(out: &mut Vec<u8>, k: &str, v: &Value) {
    string(out, 1, k);
    nested(out, 2, |out| any_value(out, v));
}

/// `AnyValue`: a oneof, so the value is written even when it is the type's default.
fn any_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::String(s) => always_string(out, 1, s.as_str()),
        Value::Bool(b) => {
            tag(out, 2, VARINT);
            encode_varint(*b as u64, out);
        }
        Value::I64(i) => {
            tag(out, 3, VARINT);
            encode_varint(*i as u64, out);
        }
        Value::F64(f) => {
            tag(out, 4, FIXED64);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::Array(a) => nested(out, 5, |out| match a {
            Array::Bool(vs) => array(out, vs.iter().map(|b| Value::Bool(*b))),
            Array::I64(vs) => array(out, vs.iter().map(|i| Value::I64(*i))),
            Array::F64(vs) => array(out, vs.iter().map(|f| Value::F64(*f))),
            Array::String(vs) => {
                for s in vs {
                    nested(out, 1, |out| always_string(out, 1, s.as_str()));
                }
            }
            // A kind of array added after this was written: keep its text.
            other => {
                let text = StringValue::from(other.to_string());
                nested(out, 1, |out| always_string(out, 1, text.as_str()));
            }
        }),
        // A kind of value added after this was written: keep its text.
        other => always_string(out, 1, &other.to_string()),
    }
}

/// `ArrayValue { repeated AnyValue values = 1 }`.
fn array(out: &mut Vec<u8>, values: impl Iterator<Item = Value>) {
    for v in values {
        nested(out, 1, |out| any_value(out, &v));
    }
}

fn tag(out: &mut Vec<u8>, field: u32, wire_type: u32) {
    encode_varint(((field << 3) | wire_type) as u64, out);
}

/// A length-delimited field whose body `body` writes. The length is patched in afterwards: one
/// byte is reserved (most bodies are shorter than 128 bytes) and widened when needed.
fn nested(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    tag(out, field, LEN);
    let at = out.len();
    out.push(0);
    body(out);
    let len = out.len() - at - 1;
    if len < 0x80 {
        out[at] = len as u8;
    } else {
        // The varint on the stack: no allocation for the many spans longer than 127 bytes.
        let mut prefix = [0u8; 10];
        let mut rest = &mut prefix[..];
        encode_varint(len as u64, &mut rest);
        let n = 10 - rest.len();
        out.splice(at..at + 1, prefix[..n].iter().copied());
    }
}

/// Proto3 strings: the default (empty) is not written.
fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        always_string(out, field, s);
    }
}

fn always_string(out: &mut Vec<u8>, field: u32, s: &str) {
    tag(out, field, LEN);
    encode_varint(s.len() as u64, out);
    out.extend_from_slice(s.as_bytes());
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    if !b.is_empty() {
        tag(out, field, LEN);
        encode_varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }
}

fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        tag(out, field, VARINT);
        encode_varint(v, out);
    }
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        tag(out, field, FIXED64);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
    if v != 0 {
        tag(out, field, FIXED32);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Event, Link, SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message;
    use std::time::{Duration, UNIX_EPOCH};

    fn context(trace: u128, span: u64, state: &str) -> SpanContext {
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", state)]).unwrap_or_default(),
        )
    }

    fn span(n: u64, scope: &InstrumentationScope) -> SpanData {
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_000 + n);
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736u128 + n as u128),
                SpanId::from(0x00f067aa0ba902b7 + n),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: if n % 2 == 0 {
                SpanId::from(7 + n)
            } else {
                SpanId::INVALID
            },
            parent_span_is_remote: n % 3 == 0,
            span_kind: if n % 2 == 0 {
                SpanKind::Server
            } else {
                SpanKind::Client
            },
            name: "GET".into(),
            start_time: start,
            end_time: start + Duration::from_micros(250 + n),
            attributes: vec![
                KeyValue::new("http.request.method", "GET"),
                KeyValue::new(
                    "url.path",
                    format!("/items/{n}/{}", "x".repeat(n as usize * 40)),
                ),
                KeyValue::new("server.port", 8080),
                KeyValue::new("http.response.status_code", -(n as i64)),
                KeyValue::new("tls.established", n % 2 == 0),
                KeyValue::new("ratio", 0.25 * n as f64),
                KeyValue::new("empty", ""),
                KeyValue::new("codes", Value::Array(Array::I64(vec![1, -2, 3]))),
                KeyValue::new(
                    "names",
                    Value::Array(Array::String(vec!["a".into(), "".into()])),
                ),
                KeyValue::new("flags", Value::Array(Array::Bool(vec![true, false]))),
                KeyValue::new("floats", Value::Array(Array::F64(vec![0.0, 1.5]))),
            ],
            dropped_attributes_count: n as u32 % 2,
            events: {
                let mut e = SpanEvents::default();
                e.events.push(Event::new(
                    "exception",
                    start + Duration::from_micros(3),
                    vec![KeyValue::new("exception.message", "boom")],
                    1,
                ));
                e.dropped_count = 2;
                e
            },
            links: {
                let mut l = SpanLinks::default();
                l.links.push(Link::new(
                    context(9, 10, "v"),
                    vec![KeyValue::new("l", 1)],
                    0,
                ));
                l
            },
            status: match n % 3 {
                0 => Status::Unset,
                1 => Status::Ok,
                _ => Status::error("upstream refused"),
            },
            instrumentation_scope: scope.clone(),
        }
    }

    fn resource() -> Resource {
        Resource::builder_empty()
            .with_service_name("checkout")
            .with_attributes([
                KeyValue::new("k8s.pod.name", "checkout-7d9f"),
                KeyValue::new("replicas", 3),
            ])
            .with_schema_url([], "https://opentelemetry.io/schemas/1.26.0")
            .build()
    }

    /// Scopes in name order: the reference groups them through a HashMap.
    fn sorted(mut req: ExportTraceServiceRequest) -> ExportTraceServiceRequest {
        for rs in &mut req.resource_spans {
            rs.scope_spans
                .sort_by_key(|ss| ss.scope.as_ref().map(|s| s.name.clone()));
        }
        req
    }

    /// What opentelemetry-proto makes of the same spans.
    fn reference(resource: &Resource, spans: &[SpanData]) -> ExportTraceServiceRequest {
        sorted(ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans.to_vec(), &resource.into()),
        })
    }

    fn ours(resource: &Resource, spans: &[SpanData]) -> ExportTraceServiceRequest {
        let bytes = export_request(resource, spans);
        sorted(ExportTraceServiceRequest::decode(bytes.as_slice()).expect("decodes"))
    }

    #[test]
    fn decodes_to_what_opentelemetry_proto_makes() {
        let scope = InstrumentationScope::builder("tracecar-proxy")
            .with_version("0.1.0")
            .build();
        let resource = resource();
        // Enough spans and long enough paths that lengths need multi-byte varints.
        let spans: Vec<SpanData> = (0..40).map(|n| span(n, &scope)).collect();
        assert_eq!(ours(&resource, &spans), reference(&resource, &spans));
    }

    #[test]
    fn groups_spans_by_scope() {
        let a = InstrumentationScope::builder("a").build();
        let b = InstrumentationScope::builder("b")
            .with_schema_url("https://example.com/s")
            .with_attributes([KeyValue::new("scope.attr", true)])
            .build();
        let resource = resource();
        let spans = vec![span(1, &a), span(2, &b), span(3, &a)];
        let got = ours(&resource, &spans);
        assert_eq!(got, reference(&resource, &spans));
        assert_eq!(got.resource_spans[0].scope_spans.len(), 2);
    }

    #[test]
    fn empty_batch_and_empty_resource() {
        assert!(export_request(&resource(), &[]).is_empty());
        let scope = InstrumentationScope::builder("s").build();
        let empty = Resource::builder_empty().build();
        let spans = vec![span(5, &scope)];
        assert_eq!(ours(&empty, &spans), reference(&empty, &spans));
    }
}
