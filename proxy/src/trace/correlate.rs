//! Correlation of outbound requests that carry no trace context with the inbound request that
//! most likely caused them (`TRACECAR_CORRELATION=inflight`).
//!
//! Apps that don't forward trace headers still make their calls while serving a request. The
//! proxy sees both sides, so it parents such an outbound call on the newest inbound request still
//! in flight. That is exact for apps that serve one request at a time and a best guess under
//! concurrency; spans linked this way carry `tracecar.correlation=inflight`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry::trace::SpanContext;

/// The in-flight inbound spans of one proxy.
#[derive(Debug, Default)]
pub struct Inflight {
    next: AtomicU64,
    // One entry per request in flight, keyed by arrival order (newest last); a short critical
    // section, taken once per request. A map, not a Vec: under many concurrent requests,
    // removing from the middle of a Vec moved the entries behind it on every request.
    slots: Mutex<BTreeMap<u64, SpanContext>>,
}

/// Removes its entry from [`Inflight`] when the inbound request ends.
#[derive(Debug)]
pub struct InflightGuard {
    owner: Arc<Inflight>,
    id: u64,
}

impl Inflight {
    /// Records `cx` as in flight until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>, cx: SpanContext) -> InflightGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut slots) = self.slots.lock() {
            slots.insert(id, cx);
        }
        InflightGuard {
            owner: self.clone(),
            id,
        }
    }

    /// The newest inbound span still in flight.
    pub fn newest(&self) -> Option<SpanContext> {
        self.slots
            .lock()
            .ok()?
            .last_key_value()
            .map(|(_, cx)| cx.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.owner.slots.lock() {
            slots.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    fn sc(n: u64) -> SpanContext {
        SpanContext::new(
            TraceId::from(n as u128),
            SpanId::from(n),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )
    }

    #[test]
    fn newest_in_flight_wins_and_finished_ones_leave() {
        let inflight = Arc::new(Inflight::default());
        assert!(inflight.newest().is_none());
        let a = inflight.enter(sc(1));
        let b = inflight.enter(sc(2));
        assert_eq!(inflight.newest().unwrap().span_id(), SpanId::from(2));
        drop(b);
        assert_eq!(inflight.newest().unwrap().span_id(), SpanId::from(1));
        drop(a);
        assert!(inflight.newest().is_none());
    }
}
