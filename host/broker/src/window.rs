//! A publisher that runs at most a window of messages ahead of whoever consumes them.
//!
//! Why: a broker keeps a bounded backlog (the embedded broker 5 MiB per partition, a real
//! topic its retention), so a producer far ahead of its consumers loses messages to retention
//! or makes every hop hold them in memory. The demo sends its requests through a window and
//! opens it further as predictions arrive, so a run of a million requests keeps the same
//! backlog, and the same memory, as a run of ten thousand. Only the sender waits; nothing is
//! dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use crate::{BrokerError, DeliveryReceipt, OutgoingMessage, Publisher};

/// Room for messages sent but not yet consumed.
#[derive(Debug)]
pub struct PublishWindow {
    room: Semaphore,
    completed: AtomicU64,
}

impl PublishWindow {
    /// A window of `size` messages (at least 1).
    pub fn new(size: usize) -> Arc<Self> {
        Arc::new(Self {
            room: Semaphore::new(size.max(1)),
            completed: AtomicU64::new(0),
        })
    }

    /// Says that `total` messages have been consumed since the window opened, which makes room
    /// for as many more as were not counted before. A total below an earlier one changes
    /// nothing, so callers can pass whatever count they last read.
    pub fn completed(&self, total: u64) {
        let before = self.completed.fetch_max(total, Ordering::AcqRel);
        if let Some(newly) = total.checked_sub(before).filter(|&n| n > 0) {
            let permits = usize::try_from(newly)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS - self.room.available_permits());
            self.room.add_permits(permits);
        }
    }

    /// How many more messages may be sent before the sender waits.
    pub fn room(&self) -> usize {
        self.room.available_permits()
    }

    /// `inner`, waiting for room in this window before each message.
    pub fn publisher(self: &Arc<Self>, inner: Arc<dyn Publisher>) -> Arc<dyn Publisher> {
        Arc::new(WindowedPublisher {
            inner,
            window: self.clone(),
        })
    }
}

struct WindowedPublisher {
    inner: Arc<dyn Publisher>,
    window: Arc<PublishWindow>,
}

#[async_trait]
impl Publisher for WindowedPublisher {
    async fn publish(&self, message: OutgoingMessage) -> Result<DeliveryReceipt, BrokerError> {
        // The semaphore is never closed, so acquiring fails only if that changes; then the
        // message goes without a window rather than not at all.
        if let Ok(permit) = self.window.room.acquire().await {
            permit.forget();
        }
        self.inner.publish(message).await
    }

    async fn flush(&self, timeout: Duration) -> Result<(), BrokerError> {
        self.inner.flush(timeout).await
    }
}
