//! Test mode: what `switchyard test` (cargo's runner for `wasm32-wasip2`) gives a component's
//! unit tests.
//!
//! Why a mode of the host and not a mock in the guest: the test binary runs in the same
//! runtime, with the same `wasi:messaging` implementation (grants aside), limits and resource
//! accounting as the component does under `switchyard run`; only the broker is replaced, by a
//! [`SentLog`] that acknowledges every send at once and keeps it. The tests read it back
//! through `switchyard:host/test-support`, which only this mode links: `run` refuses a
//! component that imports it (see `world.rs`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use wasmtime::component::{HasData, Linker, Resource};

use super::messaging::{HostMessage, MessagingView};
use crate::bindings::switchyard::host::test_support::{self, SentMessage};
use switchyard_broker::{
    Broker, BrokerError, DeliveryReceipt, OutgoingMessage, Publisher, Subscriber, SubscriptionSpec,
    TopicSpec,
};

/// What the components of a test-mode runtime sent, in order, until a test takes it.
#[derive(Debug, Default)]
pub struct SentLog {
    messages: Mutex<Vec<OutgoingMessage>>,
}

impl SentLog {
    /// Everything sent since the last call, oldest first.
    pub fn take(&self) -> Vec<OutgoingMessage> {
        std::mem::take(&mut *self.messages.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[async_trait]
impl Publisher for SentLog {
    async fn publish(&self, message: OutgoingMessage) -> Result<DeliveryReceipt, BrokerError> {
        self.messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(message);
        Ok(DeliveryReceipt::new(Box::pin(async { Ok(()) })))
    }

    async fn flush(&self, _timeout: Duration) -> Result<(), BrokerError> {
        Ok(())
    }
}

/// The broker of a test-mode runtime: sends go to its [`SentLog`]; nothing can be received.
#[derive(Debug, Default)]
pub struct UnitTestBroker {
    sent: Arc<SentLog>,
}

impl UnitTestBroker {
    /// What the components sent.
    pub fn sent(&self) -> &Arc<SentLog> {
        &self.sent
    }
}

#[async_trait]
impl Broker for UnitTestBroker {
    fn describe(&self) -> String {
        "no broker (switchyard test records what components send)".into()
    }

    fn messaging_system(&self) -> &'static str {
        // Nothing reaches a broker; OpenTelemetry's name for a system it does not list.
        "_OTHER"
    }

    async fn ensure_topics(&self, _topics: &[TopicSpec]) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>, BrokerError> {
        Ok(self.sent.clone())
    }

    async fn subscribe(&self, spec: &SubscriptionSpec) -> Result<Arc<dyn Subscriber>, BrokerError> {
        Err(BrokerError::config(format!(
            "switchyard test runs unit tests without a broker, so nothing can subscribe to {:?}: \
             a test delivers a message itself, with test-support's `received` and the \
             component's handler",
            spec.topics
        )))
    }
}

/// What the `switchyard:host/test-support` host calls work on: the instance's messaging (a
/// test's `received` message is one the instance holds) and the runtime's record of sends.
pub struct TestSupportView<'a> {
    /// The instance's messaging.
    pub messaging: MessagingView<'a>,
    /// Where sends are recorded (test mode only).
    pub sent: Option<&'a SentLog>,
}

/// `switchyard:host/test-support` as wasmtime's linker names it.
struct TestSupport;

impl HasData for TestSupport {
    type Data<'a> = TestSupportView<'a>;
}

/// Adds `switchyard:host/test-support` to a linker (test mode only), reaching each instance's
/// through `view`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> TestSupportView<'_>,
) -> wasmtime::Result<()> {
    test_support::add_to_linker::<T, TestSupport>(linker, view)
}

impl test_support::Host for TestSupportView<'_> {
    async fn received(
        &mut self,
        topic: String,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<HostMessage>> {
        self.messaging.push_received(topic, data)
    }

    async fn take_sent(&mut self) -> wasmtime::Result<Vec<SentMessage>> {
        let Some(sent) = self.sent else {
            return Err(wasmtime::Error::msg(
                "switchyard:host/test-support is provided only by `switchyard test`",
            ));
        };
        Ok(sent
            .take()
            .into_iter()
            .map(|message| SentMessage {
                topic: message.topic,
                data: message.payload,
                content_type: message.content_type,
                metadata: message.headers,
            })
            .collect())
    }
}
