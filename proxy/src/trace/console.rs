//! `OTEL_TRACES_EXPORTER=console`: one JSON object per span on stdout.

use std::io::Write;
use std::time::UNIX_EPOCH;

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::Value;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use serde_json::{json, Map};

#[derive(Debug, Default)]
pub struct ConsoleExporter {
    resource: Map<String, serde_json::Value>,
    service_name: String,
}

/// The JSON form of one span, shared by the console exporter and the demo.
pub fn span_json(
    span: &SpanData,
    service_name: &str,
    resource: &Map<String, serde_json::Value>,
) -> serde_json::Value {
    let nanos = |t: std::time::SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    };
    let attributes: Map<String, serde_json::Value> = span
        .attributes
        .iter()
        .map(|kv| (kv.key.to_string(), value_json(&kv.value)))
        .collect();
    let (status, message) = match &span.status {
        Status::Unset => ("UNSET", String::new()),
        Status::Ok => ("OK", String::new()),
        Status::Error { description } => ("ERROR", description.to_string()),
    };
    // Links name other spans (an ambiguous CLIENT span's candidate parents).
    let links: Vec<serde_json::Value> = span
        .links
        .iter()
        .map(|l| {
            json!({
                "trace_id": l.span_context.trace_id().to_string(),
                "span_id": l.span_context.span_id().to_string(),
            })
        })
        .collect();
    let start = nanos(span.start_time);
    let end = nanos(span.end_time);
    json!({
        "trace_id": span.span_context.trace_id().to_string(),
        "span_id": span.span_context.span_id().to_string(),
        "parent_span_id": if span.parent_span_id == opentelemetry::trace::SpanId::INVALID { String::new() } else { span.parent_span_id.to_string() },
        "name": span.name,
        "kind": kind_str(&span.span_kind),
        "service_name": service_name,
        "start_time_unix_nano": start,
        "end_time_unix_nano": end,
        "duration_ms": end.saturating_sub(start) as f64 / 1e6,
        "attributes": attributes,
        "links": links,
        "status": { "code": status, "message": message },
        "resource": resource,
    })
}

pub fn kind_str(kind: &SpanKind) -> &'static str {
    match kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
        SpanKind::Producer => "PRODUCER",
        SpanKind::Consumer => "CONSUMER",
        SpanKind::Internal => "INTERNAL",
    }
}

pub fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Bool(b) => json!(b),
        Value::I64(i) => json!(i),
        Value::F64(f) => json!(f),
        Value::String(s) => json!(s.as_str()),
        other => json!(other.to_string()),
    }
}

impl SpanExporter for ConsoleExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut out = std::io::stdout().lock();
        for span in &batch {
            let line = span_json(span, &self.service_name, &self.resource);
            // stdout going away must not take the proxy down.
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource
            .iter()
            .map(|(k, v)| (k.to_string(), value_json(v)))
            .collect();
        self.service_name = resource
            .get(&opentelemetry::Key::from_static_str("service.name"))
            .map(|v| v.to_string())
            .unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::encode::{Batch, SpanWriter};
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    #[test]
    fn links_are_printed() {
        let sc = |n: u64| {
            SpanContext::new(
                TraceId::from(n as u128),
                SpanId::from(n),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            )
        };
        let now = std::time::SystemTime::now();
        let mut w = SpanWriter::start(&sc(1), &SpanContext::NONE, SpanKind::Client, "GET", now);
        w.str("tracecar.correlation", "ambiguous");
        w.link(&sc(2));
        w.link(&sc(3));
        let mut batch = Batch::default();
        batch.push_encoded(&w.finish(now, None));
        let spans = batch.to_span_data();
        let json = span_json(&spans[0], "svc", &Map::new());
        assert_eq!(json["parent_span_id"], "");
        assert_eq!(
            json["links"],
            json!([
                {"trace_id": "00000000000000000000000000000002", "span_id": "0000000000000002"},
                {"trace_id": "00000000000000000000000000000003", "span_id": "0000000000000003"},
            ])
        );
    }
}
