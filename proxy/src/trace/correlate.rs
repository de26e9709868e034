//! Correlation of outbound requests that carry no trace context with the inbound request that
//! caused them (`TRACECAR_CORRELATION`).
//!
//! Apps that don't forward trace headers still make their calls while serving a request. The
//! proxy sees both sides, but not which inbound request a call belongs to, and a wrong parent
//! misleads more than a missing one. So the proxy says how it decided, in
//! `tracecar.correlation`:
//!
//! - `causal` (the default policy): first the preload library's table, which names the exact
//!   cause ([`Correlator::causal_parent`], counted in `tracecar_causal_lookups_total`). Without an entry,
//!   a parent only when it is certain: exactly one inbound request in flight → its child,
//!   `sole`. Several in flight → no parent: the CLIENT span starts a trace of its own, with span
//!   links to the newest [`MAX_LINKS`] of them, `ambiguous`. None in flight → a root span
//!   without the attribute.
//! - `inflight`: the old guess, the newest inbound request in flight, `inflight` (`sole` when it
//!   is the only one). Under concurrency many of these guesses are wrong (a third to four fifths
//!   with 8 concurrent clients in `tests/e2e/correlation.rs`), and nothing says which.
//! - `off`: no correlation; the table is not kept at all.
//!
//! The in-flight table is shared by the workers: a ring under a short lock, read once per
//! outbound request without context: the count and the newest few contexts are copied onto the
//! stack (an allocation only for a context that carries `tracestate`). Requests that carry
//! context, and `off`, never read it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use opentelemetry::trace::SpanContext;

use crate::config::Correlation;
use crate::metrics::CausalLookups;

/// Span links an ambiguous CLIENT span carries at most: the newest candidates. Enough for the
/// concurrency of most apps, and a bound on what one span costs to write and to store.
pub const MAX_LINKS: usize = 8;

/// How an outbound request without trace context was tied to the inbound requests.
// Large on purpose: it lives on the stack for one span start, where a `Box` would be an
// allocation per ambiguous request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Correlated {
    /// Not tied: nothing in flight (or correlation off). A root span without the attribute.
    None,
    /// A child of `parent`; `how` is the `tracecar.correlation` value (`causal`, `sole`,
    /// `inflight`).
    Parent {
        parent: SpanContext,
        how: &'static str,
    },
    /// Several candidates and no certainty: a root span linked to the newest of them
    /// (`tracecar.correlation=ambiguous`).
    Ambiguous(Candidates),
}

/// The inbound requests in flight when an outbound one started: how many, and the newest few.
#[derive(Debug)]
pub struct Candidates {
    count: usize,
    /// Newest first; the first `len` are `Some`. On the stack, so reading it allocates nothing.
    newest: [Option<SpanContext>; MAX_LINKS],
    len: usize,
}

impl Candidates {
    /// Inbound requests in flight.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The newest of them, newest first ([`MAX_LINKS`] at most).
    pub fn newest(&self) -> impl Iterator<Item = &SpanContext> {
        self.newest[..self.len].iter().flatten()
    }

    fn into_newest(mut self) -> Option<SpanContext> {
        self.newest[0].take()
    }
}

/// Applies a [`Correlation`] policy to the in-flight table.
#[derive(Debug)]
pub struct Correlator {
    policy: Correlation,
    inflight: Arc<Inflight>,
    /// The preload library's table (`causal` with the table open).
    table: Option<tracecar_causal::Table>,
    lookups: CausalLookups,
}

impl Correlator {
    /// `None` for `off`: no table is kept and nothing is looked up.
    pub fn new(policy: Correlation) -> Option<Correlator> {
        Self::with_table(policy, None, CausalLookups::default())
    }

    /// A correlator that asks the preload library's `table` first (`causal` only), counting
    /// the answers in `lookups`.
    pub fn with_table(
        policy: Correlation,
        table: Option<tracecar_causal::Table>,
        lookups: CausalLookups,
    ) -> Option<Correlator> {
        (policy != Correlation::Off).then(|| Correlator {
            policy,
            inflight: Arc::default(),
            table: table.filter(|_| policy == Correlation::Causal),
            lookups,
        })
    }

    /// Whether the causal table is open: only then are inbound requests' app connections
    /// recorded and outbound connections looked up.
    pub fn has_table(&self) -> bool {
        self.table.is_some()
    }

    /// The table inbound requests enter while in flight.
    pub fn inflight(&self) -> &Arc<Inflight> {
        &self.inflight
    }

    /// Ties an outbound request (or TLS connection) without trace context to its cause.
    /// `app_socket` is the app's end of the outbound connection, as the proxy sees its peer.
    pub fn correlate(&self, app_socket: Option<tracecar_causal::Key>) -> Correlated {
        match self.policy {
            Correlation::Off => Correlated::None,
            Correlation::Causal => {
                if let Some(parent) = self.causal_parent(app_socket) {
                    return Correlated::Parent {
                        parent,
                        how: "causal",
                    };
                }
                let c = self.inflight.candidates(MAX_LINKS);
                if c.count > 1 {
                    return Correlated::Ambiguous(c);
                }
                match c.into_newest() {
                    Some(parent) => Correlated::Parent {
                        parent,
                        how: "sole",
                    },
                    None => Correlated::None,
                }
            }
            Correlation::Inflight => {
                // Only the newest is needed: one context copied.
                let c = self.inflight.candidates(1);
                let how = if c.count == 1 { "sole" } else { "inflight" };
                match c.into_newest() {
                    Some(parent) => Correlated::Parent { parent, how },
                    None => Correlated::None,
                }
            }
        }
    }

    /// The inbound request that caused the outbound connection `app_socket`, when the preload
    /// library recorded it.
    ///
    /// The library, loaded into the app's processes, follows which inbound connection each
    /// thread works for and writes, before a request goes out, the port (as the app sees it)
    /// of the inbound connection that caused it: the proxy's local port of its connection to
    /// the app. The inbound request in flight on that connection is the parent, certain enough
    /// to be asked first and marked `causal`. No entry, "no known cause" (0), or no single
    /// request in flight on that connection: `None`, and the fallback decides.
    pub fn causal_parent(&self, app_socket: Option<tracecar_causal::Key>) -> Option<SpanContext> {
        let table = self.table.as_ref()?;
        let Some(port) = table.lookup(&app_socket?) else {
            self.lookups.no_entry.inc();
            return None;
        };
        if port == 0 {
            self.lookups.unknown.inc();
            return None;
        }
        let parent = self.inflight.on_app_port(port);
        match parent {
            Some(_) => self.lookups.found.inc(),
            None => self.lookups.no_request.inc(),
        };
        parent
    }
}

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
    /// (id, the span context while in flight, the proxy's local port of the app connection the
    /// request went out on: 0 until known).
    ring: VecDeque<(u64, Option<SpanContext>, u16)>,
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
            slots.ring.push_back((id, Some(cx), 0));
            slots.live += 1;
        }
        InflightGuard {
            owner: self.clone(),
            id,
        }
    }

    /// How many inbound requests are in flight, and the newest `limit` of them (at most
    /// [`MAX_LINKS`]), newest first. Only those are copied out, under the lock.
    pub fn candidates(&self, limit: usize) -> Candidates {
        let mut c = Candidates {
            count: 0,
            newest: [const { None }; MAX_LINKS],
            len: 0,
        };
        if let Ok(slots) = self.slots.lock() {
            c.count = slots.live;
            let live = slots.ring.iter().rev().filter_map(|(_, cx, _)| cx.as_ref());
            for (slot, cx) in c.newest.iter_mut().zip(live.take(limit)) {
                *slot = Some(cx.clone());
                c.len += 1;
            }
        }
        c
    }

    /// The request in flight on the app connection whose proxy-side port is `port`, when
    /// exactly one is (a connection carries one request at a time on the lean path).
    pub fn on_app_port(&self, port: u16) -> Option<SpanContext> {
        let slots = self.slots.lock().ok()?;
        let mut on = slots
            .ring
            .iter()
            .filter(|(_, cx, p)| *p == port && cx.is_some());
        match (on.next(), on.next()) {
            (Some((_, cx, _)), None) => cx.clone(),
            _ => None,
        }
    }
}

impl InflightGuard {
    /// Records the proxy's local port of the app connection this request went out on.
    pub fn set_app_port(&self, port: u16) {
        if let Ok(mut slots) = self.owner.slots.lock() {
            if let Ok(i) = slots.ring.binary_search_by_key(&self.id, |(id, ..)| *id) {
                slots.ring[i].2 = port;
            }
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.owner.slots.lock() {
            let Slots { ring, live, .. } = &mut *slots;
            if let Ok(i) = ring.binary_search_by_key(&self.id, |(id, ..)| *id) {
                if ring[i].1.take().is_some() {
                    *live -= 1;
                }
            }
            while ring.back().is_some_and(|(_, cx, _)| cx.is_none()) {
                ring.pop_back();
            }
            while ring.front().is_some_and(|(_, cx, _)| cx.is_none()) {
                ring.pop_front();
            }
            // Amortised O(1): a compaction removes more holes than it costs.
            if ring.len() > 2 * *live + SLACK {
                ring.retain(|(_, cx, _)| cx.is_some());
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

    fn newest(inflight: &Inflight) -> Option<SpanContext> {
        inflight.candidates(1).newest().next().cloned()
    }

    #[test]
    fn newest_in_flight_wins_and_finished_ones_leave() {
        let inflight = Arc::new(Inflight::default());
        assert!(newest(&inflight).is_none());
        let a = inflight.enter(sc(1));
        let b = inflight.enter(sc(2));
        assert_eq!(newest(&inflight).unwrap().span_id(), SpanId::from(2));
        drop(b);
        assert_eq!(newest(&inflight).unwrap().span_id(), SpanId::from(1));
        drop(a);
        assert!(newest(&inflight).is_none());
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
        assert!(newest(&inflight).is_none());
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
        assert_eq!(newest(&inflight).unwrap().span_id(), SpanId::from(4));
        guards[1].take(); // 2 leaves a hole in the middle
        guards[3].take(); // 4 finishes: the hole at 2 is skipped, 3 is the newest
        assert_eq!(newest(&inflight).unwrap().span_id(), SpanId::from(3));
        let late = inflight.enter(sc(6));
        assert_eq!(newest(&inflight).unwrap().span_id(), SpanId::from(6));
        drop(late);
        guards[0].take();
        guards[2].take();
        assert!(newest(&inflight).is_none());
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
        assert_eq!(newest(&inflight).unwrap().span_id(), SpanId::from(99_999));
        drop(window);
        assert_eq!(newest(&inflight).unwrap().span_id(), SpanId::from(1));
        drop(stream);
        assert!(inflight.slots.lock().unwrap().ring.is_empty());
    }

    fn ids(c: &Candidates) -> Vec<u64> {
        c.newest()
            .map(|sc| u64::from_be_bytes(sc.span_id().to_bytes()))
            .collect()
    }

    fn parent_of(c: Correlated) -> Option<(u64, &'static str)> {
        match c {
            Correlated::Parent { parent, how } => {
                Some((u64::from_be_bytes(parent.span_id().to_bytes()), how))
            }
            _ => None,
        }
    }

    #[test]
    fn candidates_count_all_and_copy_only_the_newest_few() {
        let inflight = Arc::new(Inflight::default());
        let c = inflight.candidates(MAX_LINKS);
        assert_eq!((c.count(), ids(&c)), (0, vec![]));
        let mut guards: Vec<_> = (1..=12).map(|n| inflight.enter(sc(n))).collect();
        let c = inflight.candidates(MAX_LINKS);
        assert_eq!(c.count(), 12);
        assert_eq!(
            ids(&c),
            vec![12, 11, 10, 9, 8, 7, 6, 5],
            "newest first, bounded"
        );
        assert_eq!(ids(&inflight.candidates(1)), vec![12]);
        assert_eq!(ids(&inflight.candidates(100)).len(), MAX_LINKS);
        // Finished ones are neither counted nor linked.
        guards.remove(11);
        guards.remove(5);
        let c = inflight.candidates(MAX_LINKS);
        assert_eq!(c.count(), 10);
        assert_eq!(ids(&c), vec![11, 10, 9, 8, 7, 5, 4, 3]);
    }

    #[test]
    fn causal_parents_only_the_sole_request_and_links_several() {
        let Some(c) = Correlator::new(Correlation::Causal) else {
            panic!("causal keeps a table");
        };
        assert!(
            matches!(c.correlate(None), Correlated::None),
            "none in flight"
        );
        let a = c.inflight().enter(sc(1));
        assert_eq!(parent_of(c.correlate(None)), Some((1, "sole")));
        let b = c.inflight().enter(sc(2));
        match c.correlate(None) {
            Correlated::Ambiguous(cands) => {
                assert_eq!((cands.count(), ids(&cands)), (2, vec![2, 1]));
            }
            other => panic!("two in flight must be ambiguous, got {other:?}"),
        }
        let more: Vec<_> = (3..=20).map(|n| c.inflight().enter(sc(n))).collect();
        match c.correlate(None) {
            Correlated::Ambiguous(cands) => {
                assert_eq!(cands.count(), 20);
                assert_eq!(ids(&cands), (13..=20).rev().collect::<Vec<_>>());
            }
            other => panic!("got {other:?}"),
        }
        drop(more);
        drop(a);
        // The one left is certain again, whichever it is.
        assert_eq!(parent_of(c.correlate(None)), Some((2, "sole")));
        drop(b);
        assert!(matches!(c.correlate(None), Correlated::None));
    }

    #[test]
    fn without_a_table_causal_falls_back() {
        let Some(c) = Correlator::new(Correlation::Causal) else {
            panic!("causal keeps a table");
        };
        let _a = c.inflight().enter(sc(1));
        let app = Some(tracecar_causal::Key::new(
            40000,
            "127.0.0.1:15140".parse().unwrap(),
        ));
        assert!(c.causal_parent(app).is_none());
        assert_eq!(parent_of(c.correlate(app)), Some((1, "sole")));
    }

    /// The table names the inbound connection (by the proxy's port towards the app) whose
    /// request caused an outbound connection: that request is the parent, among several in
    /// flight; "no known cause", an unknown connection or a port with two requests fall back.
    #[test]
    fn the_causal_table_names_the_exact_parent() {
        let path =
            std::env::temp_dir().join(format!("tracecar-causal-test-{}", std::process::id()));
        let table = tracecar_causal::Table::create(&path, 64).unwrap();
        // The preload library's side: the same file, opened by another mapping.
        let library = tracecar_causal::Table::open(&path).unwrap();
        let lookups = CausalLookups::default();
        let Some(c) = Correlator::with_table(Correlation::Causal, Some(table), lookups.clone())
        else {
            panic!("causal keeps a table");
        };
        assert!(c.has_table());
        let a = c.inflight().enter(sc(1));
        let b = c.inflight().enter(sc(2));
        let _c = c.inflight().enter(sc(3));
        a.set_app_port(5001);
        b.set_app_port(5002);
        let proxy = "127.0.0.1:15140".parse().unwrap();
        let out = tracecar_causal::Key::new(40001, proxy);
        assert!(library.publish(&out, 5002));
        assert_eq!(parent_of(c.correlate(Some(out))), Some((2, "causal")));
        // Published as "no known cause": the fallback (three in flight: ambiguous).
        assert!(library.publish(&out, 0));
        assert!(matches!(c.correlate(Some(out)), Correlated::Ambiguous(_)));
        // A connection the library never saw.
        let unseen = tracecar_causal::Key::new(40002, proxy);
        assert!(matches!(
            c.correlate(Some(unseen)),
            Correlated::Ambiguous(_)
        ));
        // Two requests on one app port (a stale entry): not certain.
        let twin = c.inflight().enter(sc(4));
        twin.set_app_port(5001);
        assert!(library.publish(&out, 5001));
        assert!(c.causal_parent(Some(out)).is_none());
        drop(twin);
        assert_eq!(parent_of(c.correlate(Some(out))), Some((1, "causal")));
        // Each answer counted by what it was.
        let counts = [
            &lookups.found,
            &lookups.no_entry,
            &lookups.unknown,
            &lookups.no_request,
        ]
        .map(|c| c.get());
        assert_eq!(counts, [2, 1, 1, 1]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn inflight_guesses_the_newest_and_says_sole_when_it_is_certain() {
        let Some(c) = Correlator::new(Correlation::Inflight) else {
            panic!("inflight keeps a table");
        };
        assert!(matches!(c.correlate(None), Correlated::None));
        let a = c.inflight().enter(sc(1));
        assert_eq!(parent_of(c.correlate(None)), Some((1, "sole")));
        let b = c.inflight().enter(sc(2));
        let _c = c.inflight().enter(sc(3));
        assert_eq!(parent_of(c.correlate(None)), Some((3, "inflight")));
        drop((a, b));
        assert_eq!(parent_of(c.correlate(None)), Some((3, "sole")));
    }

    #[test]
    fn off_keeps_no_table() {
        assert!(Correlator::new(Correlation::Off).is_none());
    }
}
