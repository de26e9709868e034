//! What the webhook's handlers and the admin endpoints share: the defaults per path, the
//! metrics and the readiness flag. Below both `server` and `admin`, so neither imports the
//! other for it.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::config::Defaults;
use crate::metrics::Metrics;

/// The correlation policies a path may name (`/inject/correlation/<policy>`).
const POLICIES: [&str; 3] = ["causal", "inflight", "off"];

/// What the request handlers share.
pub struct State {
    /// Defaults for `/inject` (inject unless opted out).
    pub defaults: Defaults,
    /// Defaults for `/inject/opt-in` (inject only when opted in).
    pub opt_in: Defaults,
    /// The same two with the correlation policy of the pod's namespace, for
    /// `/inject/correlation/<policy>` and `/inject/opt-in/correlation/<policy>`: the chart
    /// routes pods of a namespace labelled `tracecar.dev/correlation=<policy>` there (an
    /// AdmissionReview does not carry the namespace's labels). A pod's own annotation still
    /// wins.
    by_policy: Vec<(String, Defaults)>,
    pub metrics: Arc<Metrics>,
    /// True while the webhook serves; false before start and while draining.
    pub ready: AtomicBool,
}

impl State {
    pub fn new(defaults: Defaults, metrics: Arc<Metrics>) -> Self {
        let mut opt_in = defaults.clone();
        opt_in.inject_by_default = false;
        let mut by_policy = Vec::new();
        for (base, d) in [("/inject", &defaults), ("/inject/opt-in", &opt_in)] {
            for policy in POLICIES {
                let mut d = d.clone();
                d.correlation = policy;
                by_policy.push((format!("{base}/correlation/{policy}"), d));
            }
        }
        State {
            defaults,
            opt_in,
            by_policy,
            metrics,
            ready: AtomicBool::new(false),
        }
    }

    /// The defaults for a request path: `/inject`, `/inject/opt-in`, either followed by
    /// `/correlation/<policy>`; `None` for any other path.
    pub fn defaults_for(&self, path: &str) -> Option<&Defaults> {
        match path {
            "/inject" => Some(&self.defaults),
            "/inject/opt-in" => Some(&self.opt_in),
            _ => self
                .by_policy
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, d)| d),
        }
    }
}
