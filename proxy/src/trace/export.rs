//! Span export: a bounded queue in front of the exporter, batching, retries with back-off.
//!
//! We use our own queue rather than the SDK's `BatchSpanProcessor` because the proxy must count
//! every dropped span by reason, report export health, and honour the collector's retry hints,
//! none of which the SDK's processor exposes. Spans arrive already encoded as OTLP
//! ([`super::encode::SpanWriter`]) and queue as the bytes of their batch; the OTLP exporter
//! ([`super::otlp`]) sends a batch over tonic or hyper with the resource in front, because
//! opentelemetry-otlp's conversion cost more CPU per span than the rest of the proxy's request
//! path. The console and in-process exporters decode a batch back into the SDK's `SpanData`.
//!
//! The app's requests only ever pay an append inside a short critical section: a full queue
//! drops the span (counted), it never waits.
//!
//! Retries: a batch whose export failed transiently (collector unreachable, TLS handshake
//! refused, timeout, UNAVAILABLE / 429 / 502 / 503 / 504) is tried again after an exponential
//! back-off with jitter (100 ms doubling to 5 s) or after the delay the collector asked for
//! (gRPC `RetryInfo`, HTTP `Retry-After`, capped at 30 s), for as long as it takes. Up to
//! `OTEL_BSP_MAX_CONCURRENT_EXPORTS` batches (default 2) are in flight, each on its own exporter;
//! while all of them are retrying the worker takes nothing from the queue, so the queue fills to `OTEL_BSP_MAX_QUEUE_SIZE` and
//! further spans are dropped as `queue_full`: memory stays bounded, every lost span is counted,
//! and export resumes by itself when the collector is back. Each attempt is bounded by
//! `OTEL_EXPORTER_OTLP_TIMEOUT` (and `OTEL_BSP_EXPORT_TIMEOUT`). A batch the collector refuses
//! for good (bad data, 4xx other than 429) is dropped as `rejected`.
//!
//! Drop reasons in `tracecar_spans_dropped_total{reason}`: `queue_full`, `rejected`,
//! `export_failed` (the exporter could not send at all), `tls_material` (TLS files unusable with
//! `TRACECAR_EXPORT_REQUIRED=false`), `shutdown`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};

use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::BatchConfig;
use crate::metrics::Metrics;

use super::console::ConsoleExporter;
use super::encode::Batch;
use super::otlp::{ExportFailure, OtlpError, OtlpExporter, Retry};

/// First retry delay; doubles per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest collector-requested delay we honour as given.
const MAX_HINT: Duration = Duration::from_secs(30);

/// A finished span with the name of the service that produced it.
pub type SpanRecord = (Arc<str>, SpanData);

/// Where spans go.
#[derive(Debug)]
pub enum Exporter {
    Otlp(Box<OtlpExporter>),
    /// JSON lines on stdout (`OTEL_TRACES_EXPORTER=console`).
    Console(ConsoleExporter),
    /// Handed to an in-process consumer (the demo, tests) with the service name.
    Channel {
        tx: mpsc::UnboundedSender<SpanRecord>,
        service: Arc<str>,
    },
}

impl Exporter {
    async fn export(&mut self, batch: &Batch) -> Result<(), ExportFailure> {
        match self {
            Exporter::Otlp(e) => e.export(batch).await,
            Exporter::Console(e) => {
                e.export(batch.to_span_data())
                    .await
                    .map_err(|e| ExportFailure {
                        retry: Retry::Never,
                        reason: "export_failed",
                        message: e.to_string(),
                    })
            }
            Exporter::Channel { tx, service } => {
                for span in batch.to_span_data() {
                    let _ = tx.send((service.clone(), span));
                }
                Ok(())
            }
        }
    }

    /// Why export cannot work at all, known before any span.
    fn problem(&self) -> Option<String> {
        match self {
            Exporter::Otlp(e) => e.problem(),
            _ => None,
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

/// The span queue's front: a bounded queue drained by one export task, which keeps up to
/// `OTEL_BSP_MAX_CONCURRENT_EXPORTS` batches in flight.
#[derive(Debug)]
pub struct QueueProcessor {
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
}

/// Finished spans waiting for export, already in batches. A request only takes the lock for a
/// short append of its span (the workers share it); the export task is woken once per full batch (or by its timer), not
/// once per span, which at 100% sampling was a task wake-up and a timer registration per request.
#[derive(Debug)]
struct Queue {
    spans: Mutex<Pending>,
    /// A batch is full, or the processor is closing.
    wake: Notify,
    closed: AtomicBool,
    batch_size: usize,
    max_size: usize,
}

#[derive(Debug, Default)]
struct Pending {
    /// Full batches, oldest first.
    full: std::collections::VecDeque<Batch>,
    /// The batch being filled.
    current: Batch,
    /// Spans in `full` and `current`.
    total: usize,
    /// Exported batches, emptied, to be filled again: a batch's buffer is allocated (and its
    /// pages faulted in) once, not once per export, and never while a request holds the lock.
    spare: Vec<Batch>,
}

/// Spare batches kept: one per export in flight is enough for a steady state.
const MAX_SPARE: usize = 4;

impl Queue {
    /// The oldest batch: a full one, or with `partial` whatever is there.
    fn take(&self, partial: bool) -> Option<Batch> {
        // A replacement for a partial batch is made before the lock, not under it.
        let mut replacement = partial.then(|| self.spare_or_new());
        let mut p = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        let batch = match p.full.pop_front() {
            Some(b) => Some(b),
            None if partial && !p.current.is_empty() => Some(std::mem::replace(
                &mut p.current,
                replacement.take().unwrap_or_default(),
            )),
            None => None,
        };
        // Not needed after all: kept for the next batch.
        if let Some(r) = replacement {
            if p.spare.len() < MAX_SPARE {
                p.spare.push(r);
            }
        }
        if let Some(b) = &batch {
            p.total -= b.len();
        }
        batch
    }

    fn spare_or_new(&self) -> Batch {
        let spare = self
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .spare
            .pop();
        spare.unwrap_or_else(|| Batch::with_capacity(self.batch_size))
    }

    /// Takes back an exported batch's buffer for a later batch.
    fn recycle(&self, mut batch: Batch) {
        batch.clear();
        let mut p = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        if p.spare.len() < MAX_SPARE {
            p.spare.push(batch);
        }
    }
}

/// Opaque wrapper so `Control` stays private.
pub struct ControlMsg(Control);

impl std::fmt::Debug for ControlMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlMsg")
    }
}

/// Asks the export task to flush.
#[derive(Debug, Clone)]
pub struct ExportHandle {
    control: mpsc::Sender<ControlMsg>,
}

impl ExportHandle {
    /// Exports everything queued so far; returns when done or after `timeout`.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        // The whole exchange is bounded: during an outage the task may be busy retrying and
        // earlier flush requests may fill the control channel.
        let flushed = async {
            self.control
                .send(ControlMsg(Control::Flush(tx)))
                .await
                .is_ok()
                && rx.await.is_ok()
        };
        tokio::time::timeout(timeout, flushed)
            .await
            .unwrap_or(false)
    }
}

/// Builds the exporters; runs on the export thread, whose runtime drives their connection pools
/// and TLS file watchers.
pub type MakeExporters = Box<dyn FnOnce() -> Result<Vec<Exporter>, OtlpError> + Send>;

impl QueueProcessor {
    /// Starts the export thread: its own single-threaded runtime, so that sending a batch never
    /// runs on a data-plane worker (no request waits behind an export, and worker 0 carries no
    /// more than the others). Each exporter carries one batch at a time; with several, that many
    /// batches are in flight at once. Returns once the exporters are built.
    pub fn start(
        make: MakeExporters,
        resource: &Resource,
        batch: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(QueueProcessor, ExportHandle), super::TelemetryError> {
        let queue = Arc::new(Queue {
            spans: Mutex::new(Pending {
                current: Batch::with_capacity(batch.max_export_batch_size),
                ..Pending::default()
            }),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            // As the SDK does: a batch never waits for more spans than the queue can hold.
            batch_size: batch
                .max_export_batch_size
                .clamp(1, batch.max_queue_size.max(1)),
            max_size: batch.max_queue_size.max(1),
        });
        let (control_tx, control_rx) = mpsc::channel(4);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (resource, q, m) = (resource.clone(), queue.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("tracecar-export".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(super::TelemetryError::Thread(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut exporters = match make() {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    for e in &mut exporters {
                        e.set_resource(&resource);
                    }
                    let problem = exporters.first().and_then(Exporter::problem);
                    if problem.is_some() {
                        // Already logged where it was found; the gauge says so from the start.
                        m.export_healthy.set(0);
                    }
                    let worker = Worker {
                        queue: q,
                        idle: exporters,
                        in_flight: FuturesUnordered::new(),
                        batch,
                        metrics: m.clone(),
                        health: Arc::new(Health {
                            healthy: AtomicBool::new(problem.is_none()),
                            metrics: m,
                        }),
                    };
                    let _ = ready_tx.send(Ok(()));
                    worker.run(control_rx).await;
                });
            })?;
        // Building exporters does no network I/O (connections are made on first export; only TLS
        // files are read): a short wait. `make` must not use the caller's runtime.
        ready_rx
            .recv()
            .map_err(|_| super::TelemetryError::ThreadGone)??;
        Ok((
            QueueProcessor { queue, metrics },
            ExportHandle {
                control: control_tx,
            },
        ))
    }
}

impl Drop for QueueProcessor {
    fn drop(&mut self) {
        // The export task sends what is left and stops (also when only the handle is left).
        self.queue.closed.store(true, Ordering::Release);
        self.queue.wake.notify_one();
    }
}

impl QueueProcessor {
    /// Queues a finished, sampled span (its [`super::encode::SpanWriter`] bytes).
    pub fn push(&self, span: &[u8]) {
        let q = &self.queue;
        if q.closed.load(Ordering::Acquire) {
            self.metrics.spans_dropped("shutdown", 1);
            return;
        }
        let mut p = q.spans.lock().unwrap_or_else(|e| e.into_inner());
        if p.total >= q.max_size {
            drop(p);
            self.metrics.queue_full.inc();
            return;
        }
        p.current.push_encoded(span);
        p.total += 1;
        let full = p.current.len() >= q.batch_size;
        if full {
            // An exported batch's buffer when there is one (the steady state); otherwise an
            // empty batch that grows with its spans.
            let next = p.spare.pop().unwrap_or_default();
            let batch = std::mem::replace(&mut p.current, next);
            p.full.push_back(batch);
        }
        drop(p);
        self.metrics.export_queue.inc();
        if full {
            q.wake.notify_one();
        }
    }
}

/// Export health, shared by the batches in flight: logs once per change, not per failure.
struct Health {
    healthy: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Health {
    fn set(&self, healthy: bool, error: Option<&str>) {
        if self.healthy.swap(healthy, Ordering::AcqRel) == healthy {
            return;
        }
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

type InFlight = Pin<Box<dyn Future<Output = (Exporter, Batch)> + Send>>;

struct Worker {
    queue: Arc<Queue>,
    /// Exporters not carrying a batch right now.
    idle: Vec<Exporter>,
    /// Batches being exported (with retries); each gives its exporter and batch back when done.
    in_flight: FuturesUnordered<InFlight>,
    batch: BatchConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl Worker {
    async fn run(mut self, mut control: mpsc::Receiver<ControlMsg>) {
        let queue = self.queue.clone();
        let delay = self.batch.schedule_delay;
        let timer = tokio::time::sleep(delay);
        tokio::pin!(timer);
        loop {
            let mut due = false;
            tokio::select! {
                _ = queue.wake.notified() => {}
                _ = &mut timer => due = true,
                Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    // An exporter is free again: full batches may have waited for it.
                    self.finished(done);
                }
                msg = control.recv() => match msg {
                    Some(ControlMsg(Control::Flush(done))) => {
                        self.export_all(&queue).await;
                        self.drain().await;
                        let _ = done.send(());
                        continue;
                    }
                    // Every handle is gone (the proxy is stopping): what is queued still goes.
                    None => {
                        self.export_all(&queue).await;
                        self.drain().await;
                        return;
                    }
                },
            }
            if queue.closed.load(Ordering::Acquire) {
                // Every processor is gone: export what is left and stop.
                self.export_all(&queue).await;
                self.drain().await;
                return;
            }
            let mut exported = false;
            while let Some(batch) = queue.take(false) {
                self.export(batch).await;
                exported = true;
            }
            if due {
                if let Some(batch) = queue.take(true) {
                    self.export(batch).await;
                }
            }
            if due || exported {
                timer.as_mut().reset(tokio::time::Instant::now() + delay);
            }
        }
    }

    /// Exports everything queued, in batches.
    async fn export_all(&mut self, queue: &Queue) {
        while let Some(batch) = queue.take(true) {
            self.export(batch).await;
        }
    }

    /// Hands one batch to an idle exporter, first waiting for one if all are busy (meanwhile
    /// the queue fills and overflows, counted, so memory stays bounded).
    async fn export(&mut self, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        self.metrics.export_queue.dec_by(batch.len() as i64);
        while self.idle.is_empty() {
            match self.in_flight.next().await {
                Some(done) => self.finished(done),
                None => return, // no exporter at all
            }
        }
        let Some(exporter) = self.idle.pop() else {
            return;
        };
        self.in_flight.push(Box::pin(export_batch(
            exporter,
            batch,
            self.batch.export_timeout,
            self.metrics.clone(),
            self.health.clone(),
        )));
    }

    /// Waits for every batch in flight.
    async fn drain(&mut self) {
        while let Some(done) = self.in_flight.next().await {
            self.finished(done);
        }
    }

    /// An export is over: its exporter is free, its batch's buffer can be filled again.
    fn finished(&mut self, (exporter, batch): (Exporter, Batch)) {
        self.idle.push(exporter);
        self.queue.recycle(batch);
    }
}

/// Exports one batch, retrying transient failures with exponential back-off and jitter (or the
/// collector's hint) until it is delivered; a batch refused for good is dropped and counted.
async fn export_batch(
    mut exporter: Exporter,
    batch: Batch,
    attempt_timeout: Duration,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> (Exporter, Batch) {
    let n = batch.len() as u64;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let attempt = tokio::time::timeout(attempt_timeout, exporter.export(&batch));
        let failure = match attempt.await {
            Ok(Ok(())) => {
                metrics.spans_exported.inc_by(n);
                health.set(true, None);
                return (exporter, batch);
            }
            Ok(Err(f)) => f,
            Err(_) => ExportFailure {
                retry: Retry::Backoff,
                reason: "export_failed",
                message: "export timed out (OTEL_BSP_EXPORT_TIMEOUT)".to_string(),
            },
        };
        metrics.export_errors.inc();
        health.set(false, Some(&failure.message));
        let wait = match failure.retry {
            Retry::Never => {
                tracing::debug!(error = %failure.message, spans = n, reason = failure.reason, "batch dropped");
                metrics.spans_dropped(failure.reason, n);
                return (exporter, batch);
            }
            Retry::After(hint) => hint.min(MAX_HINT),
            Retry::Backoff => jitter(backoff),
        };
        tracing::debug!(error = %failure.message, retry_in = ?wait, "export failed; retrying");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Jitter: a uniform delay in [d/2, d], so that many proxies do not retry in step.
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per instance: enough randomness for spreading retries.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    let half = d / 2;
    half + Duration::from_nanos(h.finish() % (half.as_nanos() as u64 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(
        make: MakeExporters,
    ) -> Result<(QueueProcessor, ExportHandle), super::super::TelemetryError> {
        let batch = BatchConfig {
            max_export_batch_size: 2,
            ..BatchConfig::default()
        };
        QueueProcessor::start(
            make,
            &Resource::builder_empty().build(),
            batch,
            Arc::new(Metrics::new()),
        )
    }

    /// A pipeline into a channel; the name of the thread that built its exporter comes first.
    fn channel_pipeline() -> (
        QueueProcessor,
        ExportHandle,
        mpsc::UnboundedReceiver<SpanRecord>,
        Option<String>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (built_tx, built_rx) = std::sync::mpsc::channel();
        let (queue, handle) = start(Box::new(move || {
            let _ = built_tx.send(std::thread::current().name().map(str::to_owned));
            Ok(vec![Exporter::Channel {
                tx,
                service: Arc::from(""),
            }])
        }))
        .expect("starts");
        let built_on = built_rx.recv().ok().flatten();
        (queue, handle, rx, built_on)
    }

    #[tokio::test]
    async fn exporters_are_built_and_run_on_the_export_thread() {
        let (queue, _handle, mut rx, built_on) = channel_pipeline();
        assert_eq!(built_on.as_deref(), Some("tracecar-export"));
        // A full batch (two spans) is exported without waiting for the schedule delay.
        for _ in 0..2 {
            queue.push(&encoded_span());
        }
        for _ in 0..2 {
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
            assert_eq!(got.expect("exported").expect("a span").1.name, "GET");
        }
    }

    fn encoded_span() -> Vec<u8> {
        let sc = opentelemetry::trace::SpanContext::new(
            opentelemetry::trace::TraceId::from(1u128),
            opentelemetry::trace::SpanId::from(2u64),
            opentelemetry::trace::TraceFlags::SAMPLED,
            false,
            Default::default(),
        );
        super::super::encode::SpanWriter::start(
            &sc,
            &opentelemetry::trace::SpanContext::empty_context(),
            opentelemetry::trace::SpanKind::Server,
            "GET",
            std::time::SystemTime::now(),
        )
        .finish(std::time::SystemTime::now(), None)
    }

    #[tokio::test]
    async fn what_is_queued_is_sent_when_the_pipeline_is_dropped_without_a_flush() {
        for handle_first in [true, false] {
            let (queue, handle, mut rx, _) = channel_pipeline();
            // One span: the batch (two) is not full and the schedule delay is 5 s.
            queue.push(&encoded_span());
            if handle_first {
                drop(handle);
                drop(queue);
            } else {
                drop(queue);
                drop(handle);
            }
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
            assert!(
                matches!(got, Ok(Some(_))),
                "handle dropped first: {handle_first}"
            );
        }
    }

    #[tokio::test]
    async fn exported_batches_are_reused() {
        let (queue, _handle, mut rx, _) = channel_pipeline();
        for _ in 0..2 {
            queue.push(&encoded_span());
        }
        for _ in 0..2 {
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
            assert!(matches!(got, Ok(Some(_))));
        }
        let spare = || {
            let p = queue.queue.spans.lock().unwrap();
            p.spare.iter().map(|b| b.capacity()).max().unwrap_or(0)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while spare() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(spare() > 0, "the exported batch's buffer came back");
        // The next full batch takes it instead of a new one: the batch being filled then has
        // its buffer (an empty default would have none). Only the timer, 5 s away, takes the
        // batch being filled, so this is not racing the export thread.
        queue.push(&encoded_span());
        queue.push(&encoded_span());
        assert!(queue.queue.spans.lock().unwrap().current.capacity() > 0);
    }

    #[test]
    fn a_failing_exporter_fails_the_start() {
        let got = start(Box::new(|| Err(OtlpError::Endpoint("nowhere".into()))));
        assert!(
            matches!(
                got,
                Err(super::super::TelemetryError::Otlp(OtlpError::Endpoint(_)))
            ),
            "{got:?}"
        );
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(100));
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100));
        }
    }
}
