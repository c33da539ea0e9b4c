//! Logging a broker that went away, at a rate a person can read.
//!
//! While a broker is down, librdkafka reports every failed reconnect and a Pub/Sub stream
//! fails at every reopen: one line each would flood the log for as long as the outage lasts
//! and hide everything else. Both backends report such errors here instead (librdkafka's own
//! error reports, receive errors, failed streams): the first one is logged at once, later ones
//! as one summary line per [`SUMMARY_EVERY`], and the recovery with how long the outage
//! lasted.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::BrokerError;

/// How often an ongoing outage is reported again.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// The errors of one client (a subscriber, a producer) since its last success.
#[derive(Debug)]
pub struct OutageLog {
    what: String,
    /// Whether `state` holds an outage, so a received message costs no lock.
    failing: AtomicBool,
    state: Mutex<Option<Outage>>,
}

#[derive(Debug)]
struct Outage {
    since: Instant,
    last_report: Instant,
    errors_since_report: u64,
    errors: u64,
}

impl OutageLog {
    /// An outage log for the client named `what` (`group "g" receiving from ["requests"]`).
    pub fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            failing: AtomicBool::new(false),
            state: Mutex::new(None),
        }
    }

    /// Records an error the client retries by itself, and logs it if it starts an outage or a
    /// summary is due.
    pub fn error(&self, error: &BrokerError) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *state {
            None => {
                tracing::warn!(
                    "{}: {error:#}; retrying (further errors are summarised every {}s)",
                    self.what,
                    SUMMARY_EVERY.as_secs()
                );
                self.failing.store(true, Ordering::Release);
                *state = Some(Outage {
                    since: now,
                    last_report: now,
                    errors_since_report: 0,
                    errors: 1,
                });
            }
            Some(outage) => {
                outage.errors += 1;
                outage.errors_since_report += 1;
                if now.duration_since(outage.last_report) >= SUMMARY_EVERY {
                    tracing::warn!(
                        "{}: still failing after {:.0?} ({} errors since the last report, \
                         the latest: {error:#}); retrying",
                        self.what,
                        now.duration_since(outage.since),
                        outage.errors_since_report,
                    );
                    outage.last_report = now;
                    outage.errors_since_report = 0;
                }
            }
        }
    }

    /// Records a success (a message received, a delivery confirmed): ends an outage, logging
    /// how long it lasted.
    pub fn received(&self) {
        if !self.failing.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(outage) = state.take() {
            self.failing.store(false, Ordering::Release);
            tracing::info!(
                "{}: working again after {:.1?} ({} failed attempts)",
                self.what,
                outage.since.elapsed(),
                outage.errors
            );
        }
    }

    /// Whether an outage is going on.
    #[cfg(test)]
    fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn an_outage_is_logged_once_however_many_errors_then_its_end() {
        let lines = Arc::new(Mutex::new(String::new()));
        let writer = {
            let lines = lines.clone();
            move || Capture(lines.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(writer)
            .finish();
        let log = OutageLog::new("group \"g\"");
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..1_000 {
                log.error(&BrokerError::unavailable("broker down"));
            }
            assert!(log.is_failing());
            log.received();
            log.received();
        });
        assert!(!log.is_failing());
        let text = lines.lock().unwrap().clone();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("broker down; retrying"), "{text}");
        assert!(text.contains("working again after"), "{text}");
        assert!(text.contains("(1000 failed attempts)"), "{text}");
    }

    struct Capture(Arc<Mutex<String>>);

    impl std::io::Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(bytes));
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
