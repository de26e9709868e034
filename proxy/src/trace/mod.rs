//! Spans for proxied requests: start them from the request, propagate context, end them with
//! the response, and export them.
//!
//! - [`span`]: the SERVER/CLIENT span of one request and the body wrapper that ends it.
//! - [`propagate`]: the configured context formats.
//! - [`correlate`]: ties outbound calls without context to the inbound request that caused them.
//! - [`export`]: the bounded export queue; [`otlp`], [`console`]: the exporters; [`tls`]: export TLS.

pub mod causal;
pub mod console;
pub mod correlate;
pub mod encode;
pub mod export;
pub mod otlp;
pub mod propagate;
pub mod span;
pub mod tls;

use std::sync::Arc;

use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::{RandomIdGenerator, Sampler as SdkSampler};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

use crate::config::{Config, Sampler, TracesExporter};
use crate::metrics::Metrics;

pub use span::{RequestSpan, TracedBody};

/// Where this proxy's spans go; `Config` decides unless a caller (demo, tests) overrides it.
#[derive(Debug)]
pub enum Sink {
    FromConfig,
    Channel(mpsc::UnboundedSender<export::SpanRecord>),
}

/// A failure to set up tracing.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(transparent)]
    Otlp(#[from] otlp::OtlpError),
    #[error("cannot start the span export thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the span export thread stopped while starting")]
    ThreadGone,
}

/// The sampler, propagators and export pipeline of one proxy. Spans are made here rather than
/// by the SDK's tracer: the SDK's samplers, id generator and propagators decide and carry the
/// context, and each span is written straight into its OTLP encoding ([`encode::SpanWriter`]),
/// which saved a third of the per-request cost of tracing (docs/benchmarks.md).
#[derive(Debug)]
pub struct Telemetry {
    sampler: SdkSampler,
    /// Kubelet probes get no SERVER span (`TRACECAR_TRACE_PROBES=false`).
    skip_probes: bool,
    ids: RandomIdGenerator,
    propagator: Option<TextMapCompositePropagator>,
    /// The headers the propagators read, so a request with none of them skips extraction.
    context_headers: Vec<String>,
    /// Jaeger baggage rides in `uberctx-*` headers, which no fixed list names.
    jaeger_baggage: bool,
    /// Injection without the composite propagator, for the default formats.
    w3c: Option<propagate::W3cInjector>,
    /// `None` when correlation is off.
    correlator: Option<correlate::Correlator>,
    /// Where finished spans go; `None` when nothing exports (`OTEL_TRACES_EXPORTER=none`).
    queue: Option<export::QueueProcessor>,
    export: Option<export::ExportHandle>,
    pub metrics: Arc<Metrics>,
}

impl Telemetry {
    /// Builds the pipeline and starts its export thread.
    pub fn new(
        config: &Config,
        sink: Sink,
        metrics: Arc<Metrics>,
    ) -> Result<Telemetry, TelemetryError> {
        let resource = resource(config);
        // Console and channel output stay in order with one exporter; OTLP gets one per
        // concurrent export, each with its own connections. They are made on the export thread,
        // whose runtime drives their connections. `None`: nothing exports.
        let make: Option<export::MakeExporters> = match sink {
            Sink::Channel(tx) => Some(Box::new(move || {
                Ok(vec![export::Exporter::Channel {
                    tx,
                    service: std::sync::Arc::from(""),
                }])
            })),
            Sink::FromConfig => match config.exporter {
                TracesExporter::None => None,
                TracesExporter::Console => Some(Box::new(|| {
                    Ok(vec![export::Exporter::Console(
                        console::ConsoleExporter::default(),
                    )])
                })),
                TracesExporter::Otlp => {
                    let (cfg, n) = (config.otlp.clone(), config.batch.max_concurrent_exports);
                    Some(Box::new(move || {
                        let first = otlp::OtlpExporter::new(&cfg)?;
                        let mut all: Vec<export::Exporter> = (1..n)
                            .map(|_| export::Exporter::Otlp(Box::new(first.sibling())))
                            .collect();
                        all.insert(0, export::Exporter::Otlp(Box::new(first)));
                        Ok(all)
                    }))
                }
            },
        };
        let (queue, export) = match make {
            Some(make) => {
                let (processor, handle) =
                    export::QueueProcessor::start(make, &resource, config.batch, metrics.clone())?;
                (Some(processor), Some(handle))
            }
            None => (None, None),
        };
        let propagator =
            (!config.propagators.is_empty()).then(|| propagate::composite(&config.propagators));
        let context_headers = propagator
            .as_ref()
            .map(|p| {
                opentelemetry::propagation::TextMapPropagator::fields(p)
                    .map(str::to_ascii_lowercase)
                    .collect()
            })
            .unwrap_or_default();
        let jaeger_baggage = config
            .propagators
            .contains(&crate::config::Propagator::Jaeger);
        Ok(Telemetry {
            sampler: sampler(config.sampler),
            skip_probes: !config.trace_probes,
            ids: RandomIdGenerator::default(),
            propagator,
            context_headers,
            jaeger_baggage,
            w3c: propagate::W3cInjector::for_formats(&config.propagators),
            correlator: correlate::Correlator::with_table(
                config.correlation,
                (config.correlation == crate::config::Correlation::Causal)
                    .then(|| causal::open(config))
                    .flatten(),
                metrics.causal_lookups.clone(),
            ),
            queue,
            export,
            metrics,
        })
    }

    /// Whether the preload library's causal table is open: outbound connections are then
    /// looked up in it, and inbound requests record their app connection.
    pub fn causal(&self) -> bool {
        self.correlator
            .as_ref()
            .is_some_and(correlate::Correlator::has_table)
    }

    /// Exports every finished span, waiting at most `timeout`.
    pub async fn flush(&self, timeout: std::time::Duration) -> bool {
        match &self.export {
            Some(h) => h.flush(timeout).await,
            None => true,
        }
    }
}

fn sampler(s: Sampler) -> SdkSampler {
    let parent = |root: SdkSampler| SdkSampler::ParentBased(Box::new(root));
    match s {
        Sampler::AlwaysOn => SdkSampler::AlwaysOn,
        Sampler::AlwaysOff => SdkSampler::AlwaysOff,
        Sampler::TraceIdRatio(r) => SdkSampler::TraceIdRatioBased(r),
        Sampler::ParentBasedAlwaysOn => parent(SdkSampler::AlwaysOn),
        Sampler::ParentBasedAlwaysOff => parent(SdkSampler::AlwaysOff),
        Sampler::ParentBasedTraceIdRatio(r) => parent(SdkSampler::TraceIdRatioBased(r)),
    }
}

/// The resource: service name, `OTEL_RESOURCE_ATTRIBUTES`, pod metadata and the SDK's own keys.
fn resource(config: &Config) -> Resource {
    Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .with_attributes(
            config
                .resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .with_attributes([
            KeyValue::new("telemetry.sdk.name", "opentelemetry"),
            KeyValue::new("telemetry.sdk.language", "rust"),
            KeyValue::new("telemetry.distro.name", "tracecar"),
            KeyValue::new("telemetry.distro.version", env!("CARGO_PKG_VERSION")),
        ])
        .build()
}
