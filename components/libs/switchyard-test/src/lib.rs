//! Unit tests for switchyard components, run inside Wasm.
//!
//! With `runner = "switchyard test"` in a component crate's `.cargo/config.toml`, `cargo test
//! --target wasm32-wasip2` runs the crate's tests in the switchyard host in test mode: the
//! component's `wasi:messaging` calls behave as under `switchyard run`, but no broker is
//! reached: every send is acknowledged at once and recorded. This crate lets a test make a
//! message as the broker would deliver it, hand it to the component's own handler, and check
//! the outcome and every message the handler sent:
//!
//! ```ignore
//! use crate::exports::wasi::messaging::incoming_handler::Guest;
//! use crate::wasi::messaging::types::Message;
//!
//! switchyard_test::message_type!(Message);
//!
//! #[test]
//! fn greets() {
//!     let request = switchyard_test::Received::on("names", "Ada").header("lang", "en");
//!     let delivery = switchyard_test::deliver(Component::handle, request);
//!     assert!(delivery.outcome.is_ok());
//!     assert_eq!(delivery.sent[0].topic, "greetings");
//!     assert_eq!(delivery.sent[0].data, b"Hello, Ada");
//! }
//! ```
//!
//! Why the macro: `wit-bindgen` gives every crate its own `Message` type, so this crate's
//! messages reach the component's type by handle. [`message_type!`] writes that one
//! conversion, `From<Received>`, for the component's type.
//!
//! Tests of one binary share one instance and run one after another (Wasm has no threads
//! here), so [`deliver`] sees only the sends of its own call. A failing test aborts the
//! binary (Wasm cannot unwind); `switchyard test` says so.
//!
//! Natively this crate is empty: it needs the host's `switchyard:host/test-support`.
//! `switchyard new` writes a copy of it, with its WIT, into every crate it creates, so those
//! build without this repository.
#![deny(missing_docs)]
#![cfg(target_arch = "wasm32")]

mod bindings {
    wit_bindgen::generate!({
        path: "../../../wit",
        inline: "
            package switchyard:test-helper;

            world helper {
                import switchyard:host/test-support@0.1.0;
            }
        ",
        world: "switchyard:test-helper/helper",
        generate_all,
    });
}

use bindings::switchyard::host::test_support;
use bindings::wasi::messaging::types::Message;

/// A message as the broker would deliver it: built here, then handed to the component's
/// handler (through the `From` impl [`message_type!`] writes).
#[derive(Debug)]
pub struct Received {
    message: Message,
}

impl Received {
    /// A message delivered from `topic` holding `data`, with no content type and no metadata.
    pub fn on(topic: &str, data: impl AsRef<[u8]>) -> Self {
        Self {
            message: test_support::received(topic, data.as_ref()),
        }
    }

    /// Sets its content type.
    pub fn content_type(self, content_type: &str) -> Self {
        self.message.set_content_type(content_type);
        self
    }

    /// Sets metadata `key` (a Kafka header, a Pub/Sub attribute) to `value`.
    pub fn header(self, key: &str, value: &str) -> Self {
        self.message.add_metadata(key, value);
        self
    }

    /// Gives up the message's handle, for [`message_type!`]'s conversion, which owns it next.
    #[doc(hidden)]
    pub fn into_handle(self) -> u32 {
        self.message.take_handle()
    }
}

/// Writes `impl From<Received> for $message`, for the component's `Message` type (the one its
/// `wit_bindgen::generate!` made for `wasi:messaging/types.message`). Invoke it once, in the
/// component crate.
#[macro_export]
macro_rules! message_type {
    ($message:ty) => {
        impl ::core::convert::From<$crate::Received> for $message {
            fn from(received: $crate::Received) -> Self {
                // SAFETY: the handle is an owned `message` handle of this component instance,
                // which `Received` gave up, so exactly one value owns it.
                unsafe { <$message>::from_handle(received.into_handle()) }
            }
        }
    };
}

/// A message the component sent, as it was when sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// Where it went.
    pub topic: String,
    /// The payload.
    pub data: Vec<u8>,
    /// Its content type, if it set one.
    pub content_type: Option<String>,
    /// Its metadata, in the order it was set.
    pub metadata: Vec<(String, String)>,
}

impl Sent {
    /// The value of metadata `key`, if set.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, value)| value.as_str())
    }

    /// The payload as text (lossy), for messages and assertions that are text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// The messages sent since the last call (by any code of this test binary), oldest first.
pub fn take_sent() -> Vec<Sent> {
    test_support::take_sent()
        .into_iter()
        .map(|sent| Sent {
            topic: sent.topic,
            data: sent.data,
            content_type: sent.content_type,
            metadata: sent.metadata,
        })
        .collect()
}

/// What one handler call did.
#[derive(Debug)]
pub struct Delivery<E> {
    /// What the handler returned.
    pub outcome: Result<(), E>,
    /// Every message it sent, in order.
    pub sent: Vec<Sent>,
}

/// Calls `handle` (the component's `incoming-handler` implementation, such as
/// `Component::handle`) with `message`, and returns its outcome with what it sent.
pub fn deliver<M, E>(handle: impl FnOnce(M) -> Result<(), E>, message: Received) -> Delivery<E>
where
    M: From<Received>,
{
    drop(take_sent());
    let outcome = handle(M::from(message));
    Delivery {
        outcome,
        sent: take_sent(),
    }
}

/// What one batch call did.
#[derive(Debug)]
pub struct BatchDelivery<E> {
    /// What the handler returned: one outcome per message, in order.
    pub outcomes: Vec<Result<(), E>>,
    /// Every message it sent, in order.
    pub sent: Vec<Sent>,
}

/// Calls `handle_batch` (the component's `switchyard:host/batch` implementation) with
/// `messages`, and returns its outcomes with what it sent.
pub fn deliver_batch<M, E>(
    handle_batch: impl FnOnce(Vec<M>) -> Vec<Result<(), E>>,
    messages: impl IntoIterator<Item = Received>,
) -> BatchDelivery<E>
where
    M: From<Received>,
{
    drop(take_sent());
    let outcomes = handle_batch(messages.into_iter().map(M::from).collect());
    BatchDelivery {
        outcomes,
        sent: take_sent(),
    }
}
