//! Correlation of outbound requests that carry no trace context with the inbound request that
//! most likely caused them (`TRACECAR_CORRELATION=inflight`).
//!
//! Apps that don't forward trace headers still make their calls while serving a request. The
//! proxy sees both sides, so it parents such an outbound call on the newest inbound request still
//! in flight. That is exact for apps that serve one request at a time and a best guess under
//! concurrency; spans linked this way carry `tracecar.correlation=inflight`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry::trace::SpanContext;

/// The in-flight inbound spans of one proxy.
#[derive(Debug, Default)]
pub struct Inflight {
    next: AtomicU64,
    // Requests in arrival order (ids ascending, newest last); a finished one leaves a hole
    // (`None`) that is trimmed once it reaches either end. A short critical section, taken once
    // per request; no allocation once the ring has grown to the app's concurrency, and nothing
    // moves when a request in the middle finishes.
    slots: Mutex<VecDeque<(u64, Option<SpanContext>)>>,
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
        // The id is taken under the lock, so ids stay in push order (the guard finds its entry
        // by binary search) even when several workers enter at once.
        let mut id = 0;
        if let Ok(mut slots) = self.slots.lock() {
            id = self.next.fetch_add(1, Ordering::Relaxed);
            slots.push_back((id, Some(cx)));
        }
        InflightGuard {
            owner: self.clone(),
            id,
        }
    }

    /// The newest inbound span still in flight.
    pub fn newest(&self) -> Option<SpanContext> {
        let slots = self.slots.lock().ok()?;
        slots.iter().rev().find_map(|(_, cx)| cx.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.owner.slots.lock() {
            if let Ok(i) = slots.binary_search_by_key(&self.id, |(id, _)| *id) {
                slots[i].1 = None;
            }
            while slots.back().is_some_and(|(_, cx)| cx.is_none()) {
                slots.pop_back();
            }
            while slots.front().is_some_and(|(_, cx)| cx.is_none()) {
                slots.pop_front();
            }
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

    #[test]
    fn concurrent_workers_leave_nothing_behind() {
        let inflight = Arc::new(Inflight::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let inflight = inflight.clone();
                std::thread::spawn(move || {
                    for n in 0..20_000u64 {
                        let guard = inflight.enter(sc(t * 1_000_000 + n + 1));
                        if n % 3 == 0 {
                            std::thread::yield_now();
                        }
                        drop(guard);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(inflight.newest().is_none());
        assert!(
            inflight.slots.lock().unwrap().is_empty(),
            "every finished request left the table"
        );
    }

    #[test]
    fn finishing_out_of_order_keeps_the_newest_live_one() {
        let inflight = Arc::new(Inflight::default());
        let guards: Vec<_> = (1..=5).map(|n| inflight.enter(sc(n))).collect();
        let mut guards: Vec<Option<InflightGuard>> = guards.into_iter().map(Some).collect();
        guards[4].take(); // 5 finishes: 4 is the newest
        assert_eq!(inflight.newest().unwrap().span_id(), SpanId::from(4));
        guards[1].take(); // 2 leaves a hole in the middle
        guards[3].take(); // 4 finishes: the hole at 2 is skipped, 3 is the newest
        assert_eq!(inflight.newest().unwrap().span_id(), SpanId::from(3));
        let late = inflight.enter(sc(6));
        assert_eq!(inflight.newest().unwrap().span_id(), SpanId::from(6));
        drop(late);
        guards[0].take();
        guards[2].take();
        assert!(inflight.newest().is_none());
        assert!(
            inflight.slots.lock().unwrap().is_empty(),
            "holes are trimmed"
        );
    }
}
