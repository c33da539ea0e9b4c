//! What a handler has done: counters read as a [`HandlerCounts`] snapshot, each count also
//! going to the runtime's Prometheus metrics, and a watch of settled deliveries that whoever
//! waits for a handler's progress wakes on.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use crate::metrics::ComponentMetrics;

/// Counters of one handler component, updated as it works. Each count also goes to the
/// runtime's [`Metrics`](crate::metrics::Metrics), by topic where it has one, so what
/// `switchyard run` prints when it stops and what `/metrics` shows are counted in one place.
/// Read them with [`HandlerStats::snapshot`].
#[derive(Debug)]
pub struct HandlerStats {
    received: AtomicU64,
    handled: AtomicU64,
    gave_up: AtomicU64,
    dead_lettered: AtomicU64,
    retries: AtomicU64,
    traps: AtomicU64,
    /// Deliveries settled so far (handled, or given up on): a watch, so whoever waits for a
    /// handler's progress wakes when it moves instead of polling.
    settled: watch::Sender<u64>,
    pub(super) metrics: ComponentMetrics,
}

/// A handler's counters at one moment; `Display` writes them as `switchyard run` prints them
/// when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HandlerCounts {
    /// Deliveries taken from the subscription.
    pub received: u64,
    /// Deliveries handled successfully and acknowledged.
    pub handled: u64,
    /// Attempts that failed and were retried.
    pub retried: u64,
    /// Deliveries given up on after the last attempt, and settled: dead-lettered, or dropped
    /// when dead letters are off.
    pub gave_up: u64,
    /// Of those, the ones written to a dead-letter topic.
    pub dead_lettered: u64,
    /// Instances lost to a trap and replaced.
    pub traps: u64,
}

impl std::fmt::Display for HandlerCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received {}, handled {}, retried {}, gave up {} ({} dead-lettered), traps {}",
            self.received, self.handled, self.retried, self.gave_up, self.dead_lettered, self.traps
        )
    }
}

impl HandlerStats {
    pub(super) fn new(metrics: ComponentMetrics) -> Self {
        Self {
            received: AtomicU64::default(),
            handled: AtomicU64::default(),
            gave_up: AtomicU64::default(),
            dead_lettered: AtomicU64::default(),
            retries: AtomicU64::default(),
            traps: AtomicU64::default(),
            settled: watch::Sender::new(0),
            metrics,
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_received(&self, topic: &str) {
        Self::bump(&self.received);
        self.metrics.received(topic);
    }

    /// Counts the deliveries one call handled, one topic each, and wakes the watchers of
    /// settled deliveries once for all of them: a wake unparks the watcher's thread (a futex
    /// call), and one per message was 2 % of the demo's CPU time (perf, 2026-12-05).
    pub(super) fn count_handled<'a>(&self, topics: impl IntoIterator<Item = &'a str>) {
        let mut count = 0;
        for topic in topics {
            self.metrics.handled(topic);
            count += 1;
        }
        if count > 0 {
            self.handled.fetch_add(count, Ordering::Relaxed);
            self.settled.send_modify(|settled| *settled += count);
        }
    }

    pub(super) fn count_gave_up(&self, topic: &str, dead_lettered: bool) {
        if dead_lettered {
            Self::bump(&self.dead_lettered);
        }
        Self::bump(&self.gave_up);
        self.metrics.gave_up(topic, dead_lettered);
        self.settled.send_modify(|settled| *settled += 1);
    }

    pub(super) fn count_retry(&self) {
        Self::bump(&self.retries);
        self.metrics.retried();
    }

    pub(super) fn count_trap(&self) {
        Self::bump(&self.traps);
        self.metrics.trapped();
    }

    /// Watches how many deliveries have been settled (handled or given up on).
    pub fn settled(&self) -> watch::Receiver<u64> {
        self.settled.subscribe()
    }

    /// The counters now.
    pub fn snapshot(&self) -> HandlerCounts {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        HandlerCounts {
            received: read(&self.received),
            handled: read(&self.handled),
            retried: read(&self.retries),
            gave_up: read(&self.gave_up),
            dead_lettered: read(&self.dead_lettered),
            traps: read(&self.traps),
        }
    }
}
