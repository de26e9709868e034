//! The proxy's Prometheus metrics, served by the admin listener at `/metrics`.
//!
//! Hot-path counters are resolved once at start-up into plain handles, so recording a request
//! is a few atomic adds with no label lookup.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Which listener a request or connection came through.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
    status_class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    direction: &'static str,
    protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabels {
    direction: &'static str,
    kind: &'static str,
}

/// Which wait on a peer ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// The client took too long to send a request head.
    RequestHead = 0,
    /// A client connection sat idle between requests.
    Idle = 1,
    /// The app took too long to start its response.
    ResponseHead = 2,
    /// A body or tunnel went silent.
    StreamIdle = 3,
}

const TIMEOUT_KINDS: [&str; 4] = ["request_head", "idle", "response_head", "stream_idle"];

/// Status classes a response is counted under; `error` means no response (upstream failure).
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// Handles for one direction.
#[derive(Debug)]
pub struct DirectionMetrics {
    by_class: [Counter; 6],
    pub duration: Histogram,
    pub open_connections: Gauge,
    pub open_requests: Gauge,
    pub malformed: Counter,
    /// Connections closed at once because the listener was at `TRACECAR_MAX_CONNECTIONS`.
    pub shed: Counter,
    /// `accept` failures (out of file descriptors and the like).
    pub accept_errors: Counter,
    /// Requests answered 508 because they would come back to this proxy.
    pub loops: Counter,
    /// Connections ended by a panic while serving them (a bug; the others go on).
    pub panics: Counter,
    timeouts: [Counter; 4],
}

impl DirectionMetrics {
    pub fn timeout(&self, kind: Timeout) {
        self.timeouts[kind as usize].inc();
    }

    /// Counts a finished request; `status` is `None` when no response came from upstream.
    pub fn record(&self, status: Option<u16>, elapsed: Duration) {
        let i = match status {
            Some(s @ 100..=599) => (s / 100 - 1) as usize,
            _ => 5,
        };
        self.by_class[i].inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// Every metric of one proxy.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub inbound: DirectionMetrics,
    pub outbound: DirectionMetrics,
    pub spans_started: Counter,
    pub spans_exported: Counter,
    spans_dropped: Family<ReasonLabels, Counter>,
    /// `spans_dropped{reason="queue_full"}`, resolved once: it is counted span by span exactly
    /// when the proxy is overloaded.
    pub queue_full: Counter,
    pub export_errors: Counter,
    /// 1 while the last export succeeded (or none was tried), 0 while exports fail.
    pub export_healthy: Gauge,
    pub export_queue: Gauge,
    connections: Family<ProtocolLabels, Counter>,
    /// `causal_lookups{result}`: how the preload library's table answered outbound requests.
    pub causal_lookups: CausalLookups,
}

/// Outcomes of looking an outbound request up in the preload library's causal table: the share
/// of calls parented exactly, and why the others fell back.
#[derive(Debug, Clone, Default)]
pub struct CausalLookups {
    /// An entry named a connection with exactly one inbound request in flight: parented.
    pub found: Counter,
    /// No entry for the app's connection (the app does not load the library, or a runtime
    /// the library does not follow).
    pub no_entry: Counter,
    /// The library published "no known cause" (an event loop without a runtime hook, a
    /// thread that served no request).
    pub unknown: Counter,
    /// The entry named an app connection with no single inbound request in flight on it.
    pub no_request: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tracecar");
        let requests = Family::<RequestLabels, Counter>::default();
        let durations = Family::<DirectionLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let open = Family::<DirectionLabels, Gauge>::default();
        let in_flight = Family::<DirectionLabels, Gauge>::default();
        let malformed = Family::<DirectionLabels, Counter>::default();
        let shed = Family::<DirectionLabels, Counter>::default();
        let accept_errors = Family::<DirectionLabels, Counter>::default();
        let loops = Family::<DirectionLabels, Counter>::default();
        let panics = Family::<DirectionLabels, Counter>::default();
        let timeouts = Family::<TimeoutLabels, Counter>::default();
        let direction = |d: Direction| DirectionMetrics {
            shed: shed
                .get_or_create(&DirectionLabels {
                    direction: d.as_str(),
                })
                .clone(),
            accept_errors: accept_errors
                .get_or_create(&DirectionLabels {
                    direction: d.as_str(),
                })
                .clone(),
            loops: loops
                .get_or_create(&DirectionLabels {
                    direction: d.as_str(),
                })
                .clone(),
            panics: panics
                .get_or_create(&DirectionLabels {
                    direction: d.as_str(),
                })
                .clone(),
            timeouts: TIMEOUT_KINDS.map(|kind| {
                timeouts
                    .get_or_create(&TimeoutLabels {
                        direction: d.as_str(),
                        kind,
                    })
                    .clone()
            }),
            by_class: CLASSES.map(|c| {
                requests
                    .get_or_create(&RequestLabels {
                        direction: d.as_str(),
                        status_class: c,
                    })
                    .clone()
            }),
            duration: durations
                .get_or_create(&DirectionLabels {
                    direction: d.as_str(),
                })
                .clone(),
            open_connections: open
                .get_or_create(&DirectionLabels {
                    direction: d.as_str(),
                })
                .clone(),
            open_requests: in_flight
                .get_or_create(&DirectionLabels {
                    direction: d.as_str(),
                })
                .clone(),
            malformed: malformed
                .get_or_create(&DirectionLabels {
                    direction: d.as_str(),
                })
                .clone(),
        };
        let inbound = direction(Direction::Inbound);
        let outbound = direction(Direction::Outbound);
        registry.register(
            "requests",
            "HTTP requests by direction and status class",
            requests,
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response body",
            durations,
        );
        registry.register(
            "open_connections",
            "Client connections currently open",
            open,
        );
        registry.register(
            "requests_in_flight",
            "Requests whose response has not ended",
            in_flight,
        );
        registry.register(
            "malformed_requests",
            "Requests refused (400, 431) because they are malformed or ambiguous",
            malformed,
        );
        registry.register(
            "connections_shed",
            "Connections closed at once because the listener was at its connection limit",
            shed,
        );
        registry.register(
            "accept_errors",
            "Failed accepts (such as running out of file descriptors)",
            accept_errors,
        );
        registry.register(
            "loops_detected",
            "Requests answered 508 because they would come back to this proxy",
            loops,
        );
        registry.register(
            "connection_panics",
            "Connections ended by a panic while serving them",
            panics,
        );
        registry.register(
            "timeouts",
            "Waits on a peer that ran out, by kind",
            timeouts,
        );
        let spans_started = Counter::default();
        let spans_exported = Counter::default();
        let spans_dropped = Family::<ReasonLabels, Counter>::default();
        let export_errors = Counter::default();
        let export_healthy = Gauge::default();
        export_healthy.set(1);
        let export_queue = Gauge::default();
        let connections = Family::<ProtocolLabels, Counter>::default();
        registry.register("spans_started", "Spans started", spans_started.clone());
        registry.register(
            "spans_exported",
            "Spans the collector accepted",
            spans_exported.clone(),
        );
        registry.register(
            "spans_dropped",
            "Spans dropped, by reason",
            spans_dropped.clone(),
        );
        registry.register(
            "export_errors",
            "Failed export attempts",
            export_errors.clone(),
        );
        registry.register(
            "export_healthy",
            "1 while exports succeed, 0 while they fail",
            export_healthy.clone(),
        );
        registry.register(
            "export_queue_spans",
            "Spans waiting to be exported",
            export_queue.clone(),
        );
        registry.register(
            "connections",
            "Accepted connections by detected protocol",
            connections.clone(),
        );
        let causal = Family::<ResultLabels, Counter>::default();
        let result = |result| causal.get_or_create(&ResultLabels { result }).clone();
        let causal_lookups = CausalLookups {
            found: result("found"),
            no_entry: result("no_entry"),
            unknown: result("unknown"),
            no_request: result("no_request"),
        };
        registry.register(
            "causal_lookups",
            "Outbound requests looked up in the causal table, by result",
            causal,
        );
        let queue_full = spans_dropped
            .get_or_create(&ReasonLabels {
                reason: "queue_full",
            })
            .clone();
        Metrics {
            registry,
            inbound,
            outbound,
            spans_started,
            spans_exported,
            queue_full,
            spans_dropped,
            export_errors,
            export_healthy,
            export_queue,
            connections,
            causal_lookups,
        }
    }

    pub fn direction(&self, d: Direction) -> &DirectionMetrics {
        match d {
            Direction::Inbound => &self.inbound,
            Direction::Outbound => &self.outbound,
        }
    }

    /// Counts `n` spans lost for `reason` (`queue_full`, `export_failed`, `rejected`,
    /// `tls_material`, `shutdown`).
    pub fn spans_dropped(&self, reason: &'static str, n: u64) {
        self.spans_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n);
    }

    pub fn connection(&self, direction: Direction, protocol: &'static str) {
        self.connections
            .get_or_create(&ProtocolLabels {
                direction: direction.as_str(),
                protocol,
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_direction_and_class() {
        let m = Metrics::new();
        m.inbound.record(Some(204), Duration::from_millis(3));
        m.inbound.record(Some(503), Duration::from_millis(3));
        m.outbound.record(None, Duration::from_millis(3));
        m.spans_dropped("queue_full", 2);
        let text = m.encode();
        assert!(
            text.contains(r#"tracecar_requests_total{direction="inbound",status_class="2xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tracecar_requests_total{direction="inbound",status_class="5xx"} 1"#)
        );
        assert!(text
            .contains(r#"tracecar_requests_total{direction="outbound",status_class="error"} 1"#));
        assert!(text.contains(r#"tracecar_spans_dropped_total{reason="queue_full"} 2"#));
    }
}
