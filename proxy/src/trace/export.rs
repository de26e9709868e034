//! Span export: a bounded queue in front of the exporter, batching, retries with back-off.
//!
//! We use our own span processor rather than the SDK's `BatchSpanProcessor` because the proxy
//! must count every dropped span by reason, report export health, and honour the collector's
//! retry hints, none of which the SDK's processor exposes. The exporters themselves are the
//! SDK's (`opentelemetry-otlp`), and the processor plugs into `SdkTracerProvider`.
//!
//! The app's requests only ever pay a `try_send` into the queue: a full queue drops the span
//! (counted), it never waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use tokio::sync::{mpsc, oneshot};

use crate::config::BatchConfig;
use crate::metrics::Metrics;

use super::console::ConsoleExporter;

/// A finished span with the name of the service that produced it.
pub type SpanRecord = (Arc<str>, SpanData);

/// Where spans go.
#[derive(Debug)]
pub enum Exporter {
    Otlp(opentelemetry_otlp::SpanExporter),
    /// JSON lines on stdout (`OTEL_TRACES_EXPORTER=console`).
    Console(ConsoleExporter),
    /// Handed to an in-process consumer (the demo, tests) with the service name.
    Channel {
        tx: mpsc::UnboundedSender<SpanRecord>,
        service: Arc<str>,
    },
}

impl Exporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        match self {
            Exporter::Otlp(e) => e.export(batch).await,
            Exporter::Console(e) => e.export(batch).await,
            Exporter::Channel { tx, service } => {
                for span in batch {
                    let _ = tx.send((service.clone(), span));
                }
                Ok(())
            }
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        match self {
            Exporter::Otlp(e) => e.set_resource(resource),
            Exporter::Console(e) => e.set_resource(resource),
            Exporter::Channel { service, .. } => {
                *service = resource
                    .get(&opentelemetry::Key::from_static_str("service.name"))
                    .map(|v| Arc::from(v.to_string()))
                    .unwrap_or_else(|| Arc::from(""));
            }
        }
    }
}

enum Control {
    Flush(oneshot::Sender<()>),
}

/// The span processor: a bounded queue drained by one export task.
#[derive(Debug)]
pub struct QueueProcessor {
    spans: mpsc::Sender<SpanData>,
    control: mpsc::Sender<ControlMsg>,
    metrics: Arc<Metrics>,
}

/// Opaque wrapper so `Control` stays private.
pub struct ControlMsg(Control);

impl std::fmt::Debug for ControlMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlMsg")
    }
}

/// Flushes and stops the export task.
#[derive(Debug, Clone)]
pub struct ExportHandle {
    control: mpsc::Sender<ControlMsg>,
}

impl ExportHandle {
    /// Exports everything queued so far; returns when done or after `timeout`.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self
            .control
            .send(ControlMsg(Control::Flush(tx)))
            .await
            .is_err()
        {
            return false;
        }
        tokio::time::timeout(timeout, rx)
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl QueueProcessor {
    /// Starts the export task on the current tokio runtime.
    pub fn start(
        mut exporter: Exporter,
        resource: &Resource,
        batch: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> (QueueProcessor, ExportHandle) {
        exporter.set_resource(resource);
        let (spans_tx, spans_rx) = mpsc::channel(batch.max_queue_size);
        let (control_tx, control_rx) = mpsc::channel(4);
        let worker = Worker {
            exporter,
            batch,
            metrics: metrics.clone(),
            healthy: true,
        };
        tokio::spawn(worker.run(spans_rx, control_rx));
        (
            QueueProcessor {
                spans: spans_tx,
                control: control_tx.clone(),
                metrics,
            },
            ExportHandle {
                control: control_tx,
            },
        )
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {
        self.metrics.spans_started.inc();
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.spans.try_send(span) {
            Ok(()) => {
                self.metrics.export_queue.inc();
            }
            Err(mpsc::error::TrySendError::Full(_)) => self.metrics.spans_dropped("queue_full", 1),
            Err(mpsc::error::TrySendError::Closed(_)) => self.metrics.spans_dropped("shutdown", 1),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // The SDK calls this synchronously; our flush is async (ExportHandle::flush), so this only
        // asks for one without waiting.
        let (tx, _rx) = oneshot::channel();
        self.control
            .try_send(ControlMsg(Control::Flush(tx)))
            .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.force_flush()
    }
}

struct Worker {
    exporter: Exporter,
    batch: BatchConfig,
    metrics: Arc<Metrics>,
    healthy: bool,
}

impl Worker {
    async fn run(
        mut self,
        mut spans: mpsc::Receiver<SpanData>,
        mut control: mpsc::Receiver<ControlMsg>,
    ) {
        let mut pending: Vec<SpanData> = Vec::with_capacity(self.batch.max_export_batch_size);
        let mut deadline = tokio::time::Instant::now() + self.batch.schedule_delay;
        loop {
            tokio::select! {
                span = spans.recv() => match span {
                    Some(span) => {
                        self.metrics.export_queue.dec();
                        pending.push(span);
                        if pending.len() >= self.batch.max_export_batch_size {
                            self.export(std::mem::take(&mut pending)).await;
                            deadline = tokio::time::Instant::now() + self.batch.schedule_delay;
                        }
                    }
                    None => {
                        // Every processor is gone: export what is left and stop.
                        self.export(std::mem::take(&mut pending)).await;
                        return;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {
                    if !pending.is_empty() {
                        self.export(std::mem::take(&mut pending)).await;
                    }
                    deadline = tokio::time::Instant::now() + self.batch.schedule_delay;
                }
                msg = control.recv() => match msg {
                    Some(ControlMsg(Control::Flush(done))) => {
                        while let Ok(span) = spans.try_recv() {
                            self.metrics.export_queue.dec();
                            pending.push(span);
                            if pending.len() >= self.batch.max_export_batch_size {
                                self.export(std::mem::take(&mut pending)).await;
                            }
                        }
                        self.export(std::mem::take(&mut pending)).await;
                        let _ = done.send(());
                    }
                    None => return,
                },
            }
        }
    }

    /// Exports one batch, retrying with exponential back-off and jitter until it succeeds or the
    /// batch's export timeout has passed; then the batch is dropped and counted.
    async fn export(&mut self, batch: Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = tokio::time::timeout(
                self.batch.export_timeout,
                self.exporter.export(batch.clone()),
            );
            let err = match attempt.await {
                Ok(Ok(())) => {
                    self.metrics.spans_exported.inc_by(n);
                    self.set_healthy(true, None);
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "export timed out".to_string(),
            };
            self.metrics.export_errors.inc();
            self.set_healthy(false, Some(&err));
            let retry_hint = retry_hint(&err);
            let wait = retry_hint.unwrap_or_else(|| jitter(backoff));
            if started.elapsed() + wait > self.batch.export_timeout || !retryable(&err) {
                self.metrics.spans_dropped("export_failed", n);
                return;
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Logs once per change of export health, not once per failure.
    fn set_healthy(&mut self, healthy: bool, error: Option<&str>) {
        if healthy == self.healthy {
            return;
        }
        self.healthy = healthy;
        self.metrics.export_healthy.set(healthy as i64);
        if healthy {
            tracing::info!("span export recovered");
        } else {
            tracing::warn!(
                error = error.unwrap_or(""),
                "span export failing; spans queue and are dropped when the queue is full"
            );
        }
    }
}

/// Errors worth another try: everything but a rejection of the data itself.
fn retryable(err: &str) -> bool {
    let e = err.to_ascii_lowercase();
    !(e.contains("invalidargument")
        || e.contains("invalid argument")
        || e.contains("status code: 400"))
}

/// A server-provided delay (`retry-after` / `RetryInfo`) in the error text, if any.
fn retry_hint(err: &str) -> Option<Duration> {
    let lower = err.to_ascii_lowercase();
    let i = lower.find("retry")?;
    let digits: String = lower[i..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let secs: u64 = digits.parse().ok()?;
    Some(Duration::from_secs(secs.min(30)))
}

/// Full jitter: a uniform delay in [d/2, d].
fn jitter(d: Duration) -> Duration {
    let nanos = Instant::now().elapsed().subsec_nanos() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.subsec_nanos() as u64)
            .unwrap_or(0);
    let half = d / 2;
    half + Duration::from_nanos(nanos % (half.as_nanos() as u64 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_and_jitter() {
        assert_eq!(
            retry_hint("status 429, retry after 3 seconds"),
            Some(Duration::from_secs(3))
        );
        assert_eq!(retry_hint("connection refused"), None);
        let d = jitter(Duration::from_millis(100));
        assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100));
        assert!(!retryable("status: InvalidArgument"));
        assert!(retryable("transport error"));
    }
}
