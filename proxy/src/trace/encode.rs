//! OTLP protobuf encoding of finished spans.
//!
//! The proxy's own spans are written field by field as they happen ([`SpanWriter`]): ids, name,
//! kind, start and the request's attributes when the request starts; the response's attributes,
//! status and end when it ends. Protobuf takes fields in any order (and a repeated field in
//! several runs), so nothing is rewritten and a finished span is one buffer that the export
//! queue appends to its batch ([`Batch`]). opentelemetry-proto's path (the SDK's `SpanData`,
//! cloned and converted into owned proto structs, then walked again for every nested length)
//! was a large share of the proxy's per-request CPU at 100% sampling. The bytes are the same
//! message (`ExportTraceServiceRequest`); the tests decode them with opentelemetry-proto and
//! compare them with its own conversion.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue};
use opentelemetry_proto::tonic::trace::v1 as proto;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use opentelemetry_sdk::Resource;
use prost::encoding::{decode_varint, encode_varint, encoded_len_varint};
use prost::Message;

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// OTLP span flags: the context carries the "is remote" bit, and whether it is set.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// The instrumentation scope of every span the proxy makes.
pub const SCOPE_NAME: &str = "tracecar-proxy";

/// The spans of one export batch, each framed as a `ScopeSpans.spans` entry, so that the export
/// request is a few bytes of resource and scope in front of them.
#[derive(Debug, Default)]
pub struct Batch {
    bytes: Vec<u8>,
    count: usize,
}

impl Batch {
    /// Room for `spans` spans of a typical size.
    pub fn with_capacity(spans: usize) -> Batch {
        Batch {
            bytes: Vec::with_capacity(spans.min(4096) * 320),
            count: 0,
        }
    }

    /// Empties it, keeping its buffer.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.count = 0;
    }

    /// Bytes its buffer holds without growing.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// How many spans it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends a span finished by [`SpanWriter::finish`].
    pub fn push_encoded(&mut self, span: &[u8]) {
        tag(&mut self.bytes, 2, LEN);
        encode_varint(span.len() as u64, &mut self.bytes);
        self.bytes.extend_from_slice(span);
        self.count += 1;
    }

    /// Appends an SDK span (benchmarks and tests build them that way). Its instrumentation scope
    /// is not kept: a batch is the proxy's scope.
    pub fn push_span_data(&mut self, span: &SpanData) {
        nested(&mut self.bytes, 2, |out| encode_span(out, span));
        self.count += 1;
    }

    /// The spans decoded into the SDK's form, for the console exporter and in-process consumers
    /// (the demo, tests); not on the OTLP path.
    pub fn to_span_data(&self) -> Vec<SpanData> {
        let mut spans = Vec::with_capacity(self.count);
        let mut rest = self.bytes.as_slice();
        while !rest.is_empty() {
            // Each entry is tag(2, LEN), a length, then the span: written above, so well formed.
            let (Ok(_tag), Ok(len)) = (decode_varint(&mut rest), decode_varint(&mut rest)) else {
                break;
            };
            let Some((span, after)) = rest.split_at_checked(len as usize) else {
                break;
            };
            rest = after;
            if let Ok(p) = proto::Span::decode(span) {
                spans.push(span_data(p));
            }
        }
        spans
    }
}

/// The `ExportTraceServiceRequest` for `batch`, all from `resource`, in the proxy's scope. The
/// lengths are worked out first, so the batch is copied once and never moved.
pub fn export_request(resource: &Resource, batch: &Batch) -> Vec<u8> {
    if batch.is_empty() {
        return Vec::new();
    }
    let mut res = Vec::with_capacity(256);
    for (k, v) in resource.iter() {
        nested(&mut res, 1, |out| key_value(out, k.as_str(), v));
    }
    let mut scope = Vec::with_capacity(32);
    string(&mut scope, 1, SCOPE_NAME);
    string(&mut scope, 2, env!("CARGO_PKG_VERSION"));
    let schema = resource.schema_url().unwrap_or_default();
    let field = |len: usize| 1 + varint_len(len) + len;
    // ScopeSpans { scope = 1; spans = 2 (the batch) }
    let scope_spans = field(scope.len()) + batch.bytes.len();
    // ResourceSpans { resource = 1; scope_spans = 2; schema_url = 3 }
    let schema_len = if schema.is_empty() {
        0
    } else {
        field(schema.len())
    };
    let resource_spans = field(res.len()) + field(scope_spans) + schema_len;
    let mut out = Vec::with_capacity(field(resource_spans));
    // ExportTraceServiceRequest.resource_spans = 1
    out.push(field_key(1, LEN));
    put_varint(&mut out, resource_spans);
    out.push(field_key(1, LEN));
    put_varint(&mut out, res.len());
    out.extend_from_slice(&res);
    out.push(field_key(2, LEN));
    put_varint(&mut out, scope_spans);
    out.push(field_key(1, LEN));
    put_varint(&mut out, scope.len());
    out.extend_from_slice(&scope);
    out.extend_from_slice(&batch.bytes);
    string(&mut out, 3, schema);
    debug_assert_eq!(out.len(), field(resource_spans));
    out
}

/// One of the proxy's spans, written as its fields become known (see the module comment).
#[derive(Debug)]
pub struct SpanWriter(Vec<u8>);

impl SpanWriter {
    /// The fields known when a request starts.
    pub fn start(
        sc: &SpanContext,
        parent: &SpanContext,
        kind: SpanKind,
        name: &str,
        start: SystemTime,
    ) -> SpanWriter {
        let mut out = Vec::with_capacity(320);
        bytes(&mut out, 1, &sc.trace_id().to_bytes());
        bytes(&mut out, 2, &sc.span_id().to_bytes());
        string(&mut out, 3, &sc.trace_state().header());
        if parent.is_valid() {
            bytes(&mut out, 4, &parent.span_id().to_bytes());
        }
        string(&mut out, 5, name);
        uint(&mut out, 6, kind_number(&kind));
        fixed64(&mut out, 7, nanos(start));
        fixed32(
            &mut out,
            16,
            flags(
                parent.is_valid() && parent.is_remote(),
                sc.trace_flags().to_u8(),
            ),
        );
        SpanWriter(out)
    }

    /// A string attribute (`Span.attributes = 9`). Lengths are known up front, so the nested
    /// messages are written without patching (this runs several times per request).
    pub fn str(&mut self, key: &str, value: &str) {
        let any = 1 + varint_len(value.len()) + value.len();
        self.attribute(key, any, |out| {
            out.push(field_key(1, LEN));
            put_varint(out, value.len());
            out.extend_from_slice(value.as_bytes());
        });
    }

    pub fn int(&mut self, key: &str, value: i64) {
        let v = value as u64;
        self.attribute(key, 1 + encoded_len_varint(v), |out| {
            out.push(field_key(3, VARINT));
            encode_varint(v, out);
        });
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        self.attribute(key, 2, |out| {
            out.push(field_key(2, VARINT));
            out.push(value as u8);
        });
    }

    /// A link to another span (`Span.links = 13`): `Span.Link { trace_id = 1; span_id = 2;
    /// trace_state = 3; flags = 6 }`, as opentelemetry-proto writes a link without attributes.
    pub fn link(&mut self, sc: &SpanContext) {
        nested(&mut self.0, 13, |out| {
            bytes(out, 1, &sc.trace_id().to_bytes());
            bytes(out, 2, &sc.span_id().to_bytes());
            string(out, 3, &sc.trace_state().header());
            fixed32(out, 6, flags(sc.is_remote(), sc.trace_flags().to_u8()));
        });
    }

    /// `KeyValue { key = 1; AnyValue value = 2 }` whose `AnyValue` is `any` bytes long.
    fn attribute(&mut self, key: &str, any: usize, value: impl FnOnce(&mut Vec<u8>)) {
        let kv = 1 + varint_len(key.len()) + key.len() + 1 + varint_len(any) + any;
        let out = &mut self.0;
        out.reserve(1 + varint_len(kv) + kv);
        out.push(field_key(9, LEN));
        put_varint(out, kv);
        out.push(field_key(1, LEN));
        put_varint(out, key.len());
        out.extend_from_slice(key.as_bytes());
        out.push(field_key(2, LEN));
        put_varint(out, any);
        value(out);
    }

    /// The end time and status (`error`: the span failed, with this description); the span's
    /// bytes for [`Batch::push_encoded`].
    pub fn finish(mut self, end: SystemTime, error: Option<&str>) -> Vec<u8> {
        let out = &mut self.0;
        fixed64(out, 8, nanos(end));
        // Status is always written, as opentelemetry-proto does (an empty one is UNSET).
        nested(out, 15, |out| {
            if let Some(message) = error {
                string(out, 2, message);
                uint(out, 3, 2);
            }
        });
        self.0
    }
}

fn kind_number(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
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
    uint(out, 6, kind_number(&span.span_kind));
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

/// A decoded span in the SDK's form ([`Batch::to_span_data`]).
fn span_data(p: proto::Span) -> SpanData {
    let trace_id = trace_id_of(&p.trace_id);
    let id = |b: &[u8]| {
        <[u8; 8]>::try_from(b)
            .map(SpanId::from_bytes)
            .unwrap_or(SpanId::INVALID)
    };
    let time = |n: u64| UNIX_EPOCH + Duration::from_nanos(n);
    SpanData {
        span_context: SpanContext::new(
            trace_id,
            id(&p.span_id),
            TraceFlags::new(p.flags as u8),
            false,
            p.trace_state.parse().unwrap_or_default(),
        ),
        parent_span_id: id(&p.parent_span_id),
        parent_span_is_remote: p.flags & IS_REMOTE != 0,
        span_kind: match p.kind {
            2 => SpanKind::Server,
            3 => SpanKind::Client,
            4 => SpanKind::Producer,
            5 => SpanKind::Consumer,
            _ => SpanKind::Internal,
        },
        name: p.name.into(),
        start_time: time(p.start_time_unix_nano),
        end_time: time(p.end_time_unix_nano),
        attributes: p
            .attributes
            .into_iter()
            .map(|kv| KeyValue::new(kv.key, value(kv.value)))
            .collect(),
        dropped_attributes_count: p.dropped_attributes_count,
        events: SpanEvents::default(),
        links: {
            let mut links = SpanLinks::default();
            links.links = p
                .links
                .into_iter()
                .map(|l| {
                    let sc = SpanContext::new(
                        trace_id_of(&l.trace_id),
                        id(&l.span_id),
                        TraceFlags::new(l.flags as u8),
                        l.flags & IS_REMOTE != 0,
                        l.trace_state.parse().unwrap_or_default(),
                    );
                    let attributes = l
                        .attributes
                        .into_iter()
                        .map(|kv| KeyValue::new(kv.key, value(kv.value)))
                        .collect();
                    Link::new(sc, attributes, l.dropped_attributes_count)
                })
                .collect();
            links.dropped_count = p.dropped_links_count;
            links
        },
        status: match p.status {
            Some(s) if s.code == 2 => Status::error(s.message),
            Some(s) if s.code == 1 => Status::Ok,
            _ => Status::Unset,
        },
        instrumentation_scope: InstrumentationScope::builder(SCOPE_NAME)
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    }
}

fn trace_id_of(b: &[u8]) -> TraceId {
    <[u8; 16]>::try_from(b)
        .map(TraceId::from_bytes)
        .unwrap_or(TraceId::INVALID)
}

/// An OTLP value in the API's form; kinds the proxy never writes become their debug text.
fn value(v: Option<AnyValue>) -> Value {
    match v.and_then(|v| v.value) {
        Some(any_value::Value::StringValue(s)) => Value::String(s.into()),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(b),
        Some(any_value::Value::IntValue(i)) => Value::I64(i),
        Some(any_value::Value::DoubleValue(f)) => Value::F64(f),
        Some(other) => Value::String(format!("{other:?}").into()),
        None => Value::String(StringValue::from("")),
    }
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

/// The one-byte key of fields 1 to 15.
const fn field_key(field: u32, wire_type: u32) -> u8 {
    ((field << 3) | wire_type) as u8
}

fn varint_len(n: usize) -> usize {
    encoded_len_varint(n as u64)
}

fn put_varint(out: &mut Vec<u8>, n: usize) {
    if n < 0x80 {
        out.push(n as u8);
    } else {
        encode_varint(n as u64, out);
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

    fn proxy_scope() -> InstrumentationScope {
        InstrumentationScope::builder(SCOPE_NAME)
            .with_version(env!("CARGO_PKG_VERSION"))
            .build()
    }

    /// What opentelemetry-proto makes of the same spans.
    fn reference(resource: &Resource, spans: &[SpanData]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans.to_vec(), &resource.into()),
        }
    }

    fn batch(spans: &[SpanData]) -> Batch {
        let mut b = Batch::default();
        for s in spans {
            b.push_span_data(s);
        }
        b
    }

    fn ours(resource: &Resource, spans: &[SpanData]) -> ExportTraceServiceRequest {
        let bytes = export_request(resource, &batch(spans));
        ExportTraceServiceRequest::decode(bytes.as_slice()).expect("decodes")
    }

    #[test]
    fn decodes_to_what_opentelemetry_proto_makes() {
        let resource = resource();
        // Enough spans and long enough paths that lengths need multi-byte varints.
        let spans: Vec<SpanData> = (0..40).map(|n| span(n, &proxy_scope())).collect();
        assert_eq!(ours(&resource, &spans), reference(&resource, &spans));
    }

    #[test]
    fn empty_batch_and_empty_resource() {
        assert!(export_request(&resource(), &Batch::default()).is_empty());
        let empty = Resource::builder_empty().build();
        let spans = vec![span(5, &proxy_scope())];
        assert_eq!(ours(&empty, &spans), reference(&empty, &spans));
    }

    /// A span as the proxy writes it, and the same span built as the SDK's `SpanData`.
    fn written(n: u64, error: Option<&str>) -> (Vec<u8>, SpanData) {
        let parent = context(0xabc + n as u128, 0x77 + n, "x");
        let parent = if n % 2 == 0 {
            parent
        } else {
            SpanContext::empty_context()
        };
        let sc = SpanContext::new(
            TraceId::from(0xabc + n as u128),
            SpanId::from(0x100 + n),
            TraceFlags::SAMPLED,
            false,
            parent.trace_state().clone(),
        );
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789 + n);
        let end = start + Duration::from_micros(420);
        let path = format!("/p/{}", "y".repeat(n as usize * 30));
        let mut w = SpanWriter::start(&sc, &parent, SpanKind::Server, "POST", start);
        w.str("url.path", &path);
        w.int("server.port", -(n as i64));
        w.bool("tls.established", n % 2 == 0);
        w.str("empty", "");
        // Links as an ambiguous CLIENT span has them: none, one, or several with trace state.
        let links: Vec<SpanContext> = (0..n % 4)
            .map(|i| {
                let local = SpanContext::new(
                    TraceId::from(0xdef + i as u128),
                    SpanId::from(0x200 + i),
                    TraceFlags::default(),
                    false,
                    TraceState::default(),
                );
                if i % 2 == 0 {
                    local
                } else {
                    context(0x900 + i as u128, 0x300 + i, "l")
                }
            })
            .collect();
        for l in &links {
            w.link(l);
        }
        let bytes = w.finish(end, error);
        let data = SpanData {
            span_context: sc,
            parent_span_id: parent.span_id(),
            parent_span_is_remote: parent.is_valid(),
            span_kind: SpanKind::Server,
            name: "POST".into(),
            start_time: start,
            end_time: end,
            attributes: vec![
                KeyValue::new("url.path", path),
                KeyValue::new("server.port", -(n as i64)),
                KeyValue::new("tls.established", n % 2 == 0),
                KeyValue::new("empty", ""),
            ],
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: {
                let mut l = SpanLinks::default();
                l.links = links
                    .into_iter()
                    .map(|sc| Link::new(sc, Vec::new(), 0))
                    .collect();
                l
            },
            status: match error {
                Some(m) => Status::error(m.to_owned()),
                None => Status::Unset,
            },
            instrumentation_scope: proxy_scope(),
        };
        (bytes, data)
    }

    #[test]
    fn written_spans_decode_like_sdk_spans() {
        let resource = resource();
        let mut b = Batch::with_capacity(2);
        let mut expected = Vec::new();
        for n in 0..12 {
            let error = match n % 3 {
                0 => None,
                1 => Some(""),
                _ => Some("connection refused"),
            };
            let (bytes, data) = written(n, error);
            b.push_encoded(&bytes);
            expected.push(data);
        }
        assert_eq!(b.len(), 12);
        let got = ExportTraceServiceRequest::decode(export_request(&resource, &b).as_slice())
            .expect("decodes");
        assert_eq!(got, reference(&resource, &expected));
        // And back into the SDK's form for the console and in-process consumers.
        let back = b.to_span_data();
        assert_eq!(back.len(), expected.len());
        for (g, e) in back.iter().zip(&expected) {
            assert_eq!(g.span_context, e.span_context);
            assert_eq!(g.parent_span_id, e.parent_span_id);
            assert_eq!(g.parent_span_is_remote, e.parent_span_is_remote);
            assert_eq!(g.span_kind, e.span_kind);
            assert_eq!(g.name, e.name);
            assert_eq!((g.start_time, g.end_time), (e.start_time, e.end_time));
            assert_eq!(g.attributes, e.attributes);
            assert_eq!(g.status, e.status);
            assert_eq!(g.links.links, e.links.links);
            assert_eq!(g.instrumentation_scope, e.instrumentation_scope);
        }
    }
}
