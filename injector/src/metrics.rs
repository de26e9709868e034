//! The injector's Prometheus metrics: decisions by reason, annotation warnings, bad
//! requests, admission latency and certificate reloads. Exposed on `/metrics` by [`crate::admin`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::decide::Reason;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnnotationLabel {
    pub annotation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// All metrics; cheap to share behind an `Arc`.
pub struct Metrics {
    pub registry: Registry,
    pub admissions: Family<ReasonLabel, Counter>,
    pub warnings: Family<AnnotationLabel, Counter>,
    pub bad_requests: Family<ReasonLabel, Counter>,
    pub duration: Histogram,
    pub tls_reloads: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tracecar_injector");
        let admissions = Family::<ReasonLabel, Counter>::default();
        let warnings = Family::<AnnotationLabel, Counter>::default();
        let bad_requests = Family::<ReasonLabel, Counter>::default();
        let duration = Histogram::new([
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
        ]);
        let tls_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "admissions",
            "Admission decisions by reason",
            admissions.clone(),
        );
        registry.register(
            "annotation_warnings",
            "Invalid tracecar annotation values that fell back to the default",
            warnings.clone(),
        );
        registry.register(
            "bad_requests",
            "Requests refused before a decision",
            bad_requests.clone(),
        );
        registry.register(
            "admission_duration_seconds",
            "Time to decode, decide and encode one admission",
            duration.clone(),
        );
        registry.register(
            "tls_reloads",
            "Serving certificate reloads",
            tls_reloads.clone(),
        );
        // Every reason shows up from the start, at zero.
        for r in Reason::ALL {
            let _ = admissions.get_or_create(&ReasonLabel { reason: r.as_str() });
        }
        Metrics {
            registry,
            admissions,
            warnings,
            bad_requests,
            duration,
            tls_reloads,
        }
    }

    pub fn admission(&self, reason: Reason) {
        self.admissions
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a warning; unknown annotation keys share the label `unknown` (bounded cardinality).
    pub fn warning(&self, annotation: &str) {
        let label = crate::annotations::known_key(annotation).unwrap_or("unknown");
        self.warnings
            .get_or_create(&AnnotationLabel { annotation: label })
            .inc();
    }

    pub fn bad_request(&self, reason: &'static str) {
        self.bad_requests
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn tls_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.tls_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
