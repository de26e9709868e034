//! Correlation of outbound requests that carry no trace context with the inbound request that
//! most likely caused them (`TRACECAR_CORRELATION=inflight`).
//!
//! Apps that don't forward trace headers still make their calls while serving a request. The
//! proxy sees both sides, so it parents such an outbound call on the newest inbound request still
//! in flight. That is exact for apps that serve one request at a time and a best guess under
//! concurrency; spans linked this way carry `tracecar.correlation=inflight`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use opentelemetry::trace::SpanContext;

/// The in-flight inbound spans of one proxy.
#[derive(Debug, Default)]
pub struct Inflight {
    slots: Mutex<Slots>,
}

/// Requests in arrival order (ids ascending, newest last); a finished one leaves a hole (`None`)
/// that is trimmed once it reaches either end. A short critical section, taken once per request;
/// no allocation once the ring has grown to the app's concurrency, and nothing moves when a
/// request in the middle finishes. A long-lived request at the front (a stream, a long poll)
/// would keep every hole behind it, so when holes outnumber live entries the ring is compacted:
/// its length stays within about twice the requests in flight.
#[derive(Debug, Default)]
struct Slots {
    ring: VecDeque<(u64, Option<SpanContext>)>,
    live: usize,
    /// The next request's id.
    next: u64,
}

/// Holes tolerated beyond the live entries before compacting.
const SLACK: usize = 64;

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
            id = slots.next;
            slots.next += 1;
            slots.ring.push_back((id, Some(cx)));
            slots.live += 1;
        }
        InflightGuard {
            owner: self.clone(),
            id,
        }
    }

    /// The newest inbound span still in flight.
    pub fn newest(&self) -> Option<SpanContext> {
        let slots = self.slots.lock().ok()?;
        slots.ring.iter().rev().find_map(|(_, cx)| cx.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.owner.slots.lock() {
            let Slots { ring, live, .. } = &mut *slots;
            if let Ok(i) = ring.binary_search_by_key(&self.id, |(id, _)| *id) {
                if ring[i].1.take().is_some() {
                    *live -= 1;
                }
            }
            while ring.back().is_some_and(|(_, cx)| cx.is_none()) {
                ring.pop_back();
            }
            while ring.front().is_some_and(|(_, cx)| cx.is_none()) {
                ring.pop_front();
            }
            // Amortised O(1): a compaction removes more holes than it costs.
            if ring.len() > 2 * *live + SLACK {
                ring.retain(|(_, cx)| cx.is_some());
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
            inflight.slots.lock().unwrap().ring.is_empty(),
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
            inflight.slots.lock().unwrap().ring.is_empty(),
            "holes are trimmed"
        );
    }

    #[test]
    fn a_long_request_does_not_keep_every_later_one() {
        let inflight = Arc::new(Inflight::default());
        let stream = inflight.enter(sc(1));
        // Steady traffic behind it: eight in flight at a time, oldest finishing first, so the
        // newest entry is always live and no hole ever reaches the back.
        let mut window = std::collections::VecDeque::new();
        let mut longest = 0;
        for n in 2..100_000u64 {
            window.push_back(inflight.enter(sc(n)));
            if window.len() > 8 {
                window.pop_front();
            }
            longest = longest.max(inflight.slots.lock().unwrap().ring.len());
        }
        assert!(longest <= 2 * 10 + SLACK + 1, "ring grew to {longest}");
        assert_eq!(inflight.newest().unwrap().span_id(), SpanId::from(99_999));
        drop(window);
        assert_eq!(inflight.newest().unwrap().span_id(), SpanId::from(1));
        drop(stream);
        assert!(inflight.slots.lock().unwrap().ring.is_empty());
    }
}
