//! `wasi:messaging`: what a component's `send` and `message` calls do.
//!
//! The component never sees the broker. `client.connect` hands out a handle to the broker this
//! host was started with; `producer.send` checks the manifest's `publish` grant, then queues the
//! message with the broker's publisher and returns without waiting for the broker. Broker
//! failures come back as WIT `error` values, never traps, so a guest can decide what to do.
//!
//! Messages live in the host (in the store's resource table), outside the guest's linear
//! memory and its `max_memory_mb`, so the host keeps its own account of them: each message is
//! at most `limits.max_message_bytes`, an instance holds at most `limits.max_held_mb` in
//! messages and `limits.max_resources` table entries, and a handler call sends at most
//! `limits.max_sends_per_call` per message. `send` past its cap returns an `error`; the
//! published WIT gives the calls that build a message (`message.new`, `set-data`,
//! `set-content-type` and the metadata calls) no error to return, so growing a message past a
//! cap traps, which costs the instance and never the host. Metadata a broker cannot carry (a
//! Pub/Sub attribute starting with `goog`, say) is refused by `send`, with the rule.
//!
//! The broker's acknowledgements are collected per call: the runtime awaits them after
//! `handle` returns, and settles the incoming message only when every message sent while
//! handling it is safely stored (at-least-once end to end). For a command they are awaited in
//! the background and counted.
//!
//! The state is a [`MessagingCtx`] per instance; the host calls work on a [`MessagingView`] of
//! it and the instance's resource table, so this interface never names the store's state: the
//! instance projects into the view when it links ([`add_to_linker`]).

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::mpsc;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use switchyard_broker::{
    BrokerError, DeliveryReceipt, ErrorKind, IncomingMessage, OutgoingMessage, Publisher,
};

use crate::bindings::wasi::messaging::producer;
use crate::bindings::wasi::messaging::types::{self, Error};
use crate::metrics::ComponentMetrics;

/// A guest's handle to the broker.
#[derive(Debug)]
pub struct MessagingClient {
    name: String,
}

/// A message as the guest sees it: a payload with its content type and metadata.
#[derive(Debug, Clone, Default)]
pub struct HostMessage {
    topic: Option<String>,
    data: Vec<u8>,
    content_type: Option<String>,
    metadata: Vec<(String, String)>,
}

impl HostMessage {
    /// The bytes it holds in the host: payload, content type and metadata.
    fn size(&self) -> usize {
        self.data.len()
            + self.content_type.as_ref().map_or(0, String::len)
            + self
                .metadata
                .iter()
                .map(|(key, value)| key.len() + value.len())
                .sum::<usize>()
    }
}

impl From<&IncomingMessage> for HostMessage {
    fn from(message: &IncomingMessage) -> Self {
        Self {
            topic: Some(message.topic.clone()),
            data: message.payload.clone(),
            content_type: message.content_type.clone(),
            metadata: message.headers.clone(),
        }
    }
}

/// The metadata entry that tells a handler which delivery of a message this is: `1` the first
/// time, then one more at each retry. Where the broker counts deliveries (Pub/Sub with a
/// dead-letter policy) the count goes on across host restarts; on Kafka, which does not
/// count, a message redelivered to a restarted host starts again at `1`. An entry of the same
/// name that came with the message is replaced.
pub const DELIVERY_ATTEMPT_METADATA: &str = "switchyard-delivery-attempt";

/// Where the broker acknowledgements of a store's sends go.
#[derive(Debug)]
pub enum ReceiptSink {
    /// Kept until the runtime takes them after a `handle` call.
    Collect(Vec<DeliveryReceipt>),
    /// Passed to a task that awaits and counts them (commands).
    Forward(mpsc::UnboundedSender<DeliveryReceipt>),
    /// Not published: held until the runtime takes them after a `handle` call, to commit them
    /// with the message it handled (exactly-once handlers). A call that fails sends nothing.
    Hold(Vec<OutgoingMessage>),
}

/// What a handler call sent, as its [`ReceiptSink`] kept it.
pub enum CallOutputs {
    /// Published; the broker's receipts.
    Sent(Vec<DeliveryReceipt>),
    /// Held, unpublished.
    Held(Vec<OutgoingMessage>),
}

/// What one instance may hold and send (from the manifest's `limits`).
#[derive(Debug, Clone, Copy)]
pub struct MessageLimits {
    /// The largest message, in bytes ([`HostMessage::size`]).
    pub max_message_bytes: usize,
    /// The bytes all its messages together may hold.
    pub max_held_bytes: usize,
    /// Sends per handled message in one handler call.
    pub max_sends_per_call: u32,
}

impl From<&crate::manifest::Limits> for MessageLimits {
    fn from(limits: &crate::manifest::Limits) -> Self {
        Self {
            max_message_bytes: usize::try_from(limits.max_message_bytes).unwrap_or(usize::MAX),
            max_held_bytes: usize::try_from(limits.max_held_mb << 20).unwrap_or(usize::MAX),
            max_sends_per_call: limits.max_sends_per_call,
        }
    }
}

/// The metadata every message a component sends carries: which component, in which build,
/// sent it (`NAME@sha256:…`, [`crate::LoadedComponent::version`]). Set by the host, after the
/// component's own metadata, so a component cannot claim to be another; a consumer can tell
/// the versions apart across a deploy.
pub const SENT_BY_HEADER: &str = "switchyard-sent-by";

/// The messaging half of a component's state.
pub struct MessagingCtx {
    component: Arc<str>,
    /// [`SENT_BY_HEADER`]'s value.
    sent_by: Arc<str>,
    publisher: Arc<dyn Publisher>,
    publish_grants: Arc<HashSet<String>>,
    /// Whether every topic is granted (test mode, where sends are only recorded).
    every_topic: bool,
    receipts: ReceiptSink,
    limits: MessageLimits,
    /// Bytes held in this instance's messages now.
    held_bytes: usize,
    /// Sends left in the handler call in progress; `None` outside handler calls (a command's
    /// `run` is one call that may send all it produces).
    sends_left: Option<u64>,
    /// Whether the instance is in `switchyard:host/warm-up`, where it may not send: a send
    /// there would belong to no delivered message, so nothing would settle or retry it.
    warming_up: bool,
    /// Where its sends are counted.
    metrics: ComponentMetrics,
}

impl MessagingCtx {
    /// Messaging for component `component` in build `version`, allowed to send to
    /// `publish_grants`.
    pub fn new(
        component: Arc<str>,
        version: &str,
        publisher: Arc<dyn Publisher>,
        publish_grants: Arc<HashSet<String>>,
        receipts: ReceiptSink,
        limits: MessageLimits,
        metrics: ComponentMetrics,
    ) -> Self {
        Self {
            metrics,
            sent_by: format!("{component}@{version}").into(),
            component,
            publisher,
            publish_grants,
            every_topic: false,
            receipts,
            limits,
            held_bytes: 0,
            sends_left: None,
            warming_up: false,
        }
    }

    /// The component's name.
    pub fn component(&self) -> &Arc<str> {
        &self.component
    }

    /// Lets it send to any topic: test mode, where sends reach no broker and the manifest's
    /// grants are not the unit tests' business (`switchyard validate` and `run` check those).
    pub fn grant_every_topic(&mut self) {
        self.every_topic = true;
    }

    /// Starts a handler call with `messages` messages: it may send
    /// `max_sends_per_call` per message.
    pub fn begin_call(&mut self, messages: usize) {
        self.sends_left = Some(
            u64::from(self.limits.max_sends_per_call)
                .saturating_mul(u64::try_from(messages).unwrap_or(u64::MAX)),
        );
    }

    /// Ends the handler call in progress.
    pub fn end_call(&mut self) {
        self.sends_left = None;
    }

    /// Starts or ends the instance's warm-up, during which a send is refused.
    pub fn set_warming_up(&mut self, warming_up: bool) {
        self.warming_up = warming_up;
    }

    /// Accounts for a message that went from `before` to `after` bytes at the guest's
    /// request; an error (a trap) if it is now too large or the instance holds too much.
    fn resized(&mut self, before: usize, after: usize) -> wasmtime::Result<()> {
        self.held_bytes = self.held_bytes.saturating_sub(before).saturating_add(after);
        let limits = self.limits;
        if after > limits.max_message_bytes {
            return Err(wasmtime::Error::msg(format!(
                "component {} made a message of {after} bytes, over its limit of {} \
                 (limits.max_message_bytes)",
                self.component, limits.max_message_bytes
            )));
        }
        if self.held_bytes > limits.max_held_bytes {
            return Err(wasmtime::Error::msg(format!(
                "component {} holds {} bytes in messages, over its limit of {} MiB \
                 (limits.max_held_mb): send or drop messages it no longer needs",
                self.component,
                self.held_bytes,
                limits.max_held_bytes >> 20
            )));
        }
        Ok(())
    }

    /// Accounts for a message that left the instance (sent or dropped).
    fn released(&mut self, size: usize) {
        self.held_bytes = self.held_bytes.saturating_sub(size);
    }

    /// Takes what was sent since the last call.
    pub fn take_outputs(&mut self) -> CallOutputs {
        match &mut self.receipts {
            ReceiptSink::Collect(receipts) => CallOutputs::Sent(std::mem::take(receipts)),
            ReceiptSink::Forward(_) => CallOutputs::Sent(Vec::new()),
            ReceiptSink::Hold(held) => CallOutputs::Held(std::mem::take(held)),
        }
    }
}

/// What the `wasi:messaging` host calls work on: the instance's messaging context and its
/// resource table, borrowed from the store's state for one call.
pub struct MessagingView<'a> {
    /// The instance's messaging context.
    pub ctx: &'a mut MessagingCtx,
    /// The instance's resource table, where its messages and clients live.
    pub table: &'a mut ResourceTable,
}

/// `wasi:messaging` as wasmtime's linker names it: its data is a [`MessagingView`].
struct Messaging;

impl HasData for Messaging {
    type Data<'a> = MessagingView<'a>;
}

/// Adds `wasi:messaging/types` and `wasi:messaging/producer` to a linker, reaching each
/// instance's messaging through `view`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> MessagingView<'_>,
) -> wasmtime::Result<()> {
    types::add_to_linker::<T, Messaging>(linker, view)?;
    producer::add_to_linker::<T, Messaging>(linker, view)
}

impl MessagingView<'_> {
    /// Hands a received message to the guest. It counts toward what the instance holds but
    /// is never refused for it: the broker's and the batch's limits bound it already.
    pub fn push_incoming(
        &mut self,
        message: &IncomingMessage,
        attempt: u32,
    ) -> wasmtime::Result<Resource<HostMessage>> {
        let mut message = HostMessage::from(message);
        message
            .metadata
            .retain(|(name, _)| name != DELIVERY_ATTEMPT_METADATA);
        message
            .metadata
            .push((DELIVERY_ATTEMPT_METADATA.to_string(), attempt.to_string()));
        self.ctx.held_bytes = self.ctx.held_bytes.saturating_add(message.size());
        self.push_message(message)
    }

    /// A message the guest asked for as if received from `topic` (test mode), accounted as
    /// one it made itself.
    pub fn push_received(
        &mut self,
        topic: String,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<HostMessage>> {
        self.ctx.resized(0, data.len())?;
        self.push_message(HostMessage {
            topic: Some(topic),
            data,
            ..HostMessage::default()
        })
    }

    fn push_message(&mut self, message: HostMessage) -> wasmtime::Result<Resource<HostMessage>> {
        self.table.push(message).map_err(|e| {
            wasmtime::Error::msg(format!(
                "component {}: {e}: it holds {} resources, its limit (limits.max_resources)",
                self.ctx.component,
                self.table.max_capacity()
            ))
        })
    }

    /// Changes a message at the guest's request, keeping the account of its size.
    fn change_message(
        &mut self,
        message: &Resource<HostMessage>,
        change: impl FnOnce(&mut HostMessage),
    ) -> wasmtime::Result<()> {
        let entry = self.table.get_mut(message)?;
        let before = entry.size();
        change(entry);
        let after = entry.size();
        self.ctx.resized(before, after)
    }
}

/// A broker failure as the guest sees it: by its kind, with the message and its causes.
fn wit_error(error: BrokerError) -> Error {
    let text = format!("{error:#}");
    match error.kind() {
        ErrorKind::Timeout => {
            tracing::debug!("{text}");
            Error::Timeout
        }
        ErrorKind::Unavailable | ErrorKind::Closed => Error::Connection(text),
        ErrorKind::PermissionDenied => Error::PermissionDenied(text),
        _ => Error::Other(text),
    }
}

impl types::Host for MessagingView<'_> {}

impl types::HostClient for MessagingView<'_> {
    async fn connect(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<MessagingClient>, Error>> {
        // One broker per host: every name reaches it. The name is kept for logs.
        Ok(Ok(self.table.push(MessagingClient { name })?))
    }

    async fn disconnect(
        &mut self,
        client: Resource<MessagingClient>,
    ) -> wasmtime::Result<Result<(), Error>> {
        let client = self.table.get(&client)?;
        tracing::debug!(
            "{} disconnects client {:?}",
            self.ctx.component,
            client.name
        );
        Ok(Ok(()))
    }

    async fn drop(&mut self, client: Resource<MessagingClient>) -> wasmtime::Result<()> {
        self.table.delete(client)?;
        Ok(())
    }
}

impl types::HostMessage for MessagingView<'_> {
    async fn new(&mut self, data: Vec<u8>) -> wasmtime::Result<Resource<HostMessage>> {
        self.ctx.resized(0, data.len())?;
        self.push_message(HostMessage {
            data,
            ..HostMessage::default()
        })
    }

    async fn topic(&mut self, message: Resource<HostMessage>) -> wasmtime::Result<Option<String>> {
        Ok(self.table.get(&message)?.topic.clone())
    }

    async fn content_type(
        &mut self,
        message: Resource<HostMessage>,
    ) -> wasmtime::Result<Option<String>> {
        Ok(self.table.get(&message)?.content_type.clone())
    }

    async fn set_content_type(
        &mut self,
        message: Resource<HostMessage>,
        content_type: String,
    ) -> wasmtime::Result<()> {
        self.change_message(&message, |m| m.content_type = Some(content_type))
    }

    async fn data(&mut self, message: Resource<HostMessage>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&message)?.data.clone())
    }

    async fn set_data(
        &mut self,
        message: Resource<HostMessage>,
        data: Vec<u8>,
    ) -> wasmtime::Result<()> {
        self.change_message(&message, |m| m.data = data)
    }

    async fn metadata(
        &mut self,
        message: Resource<HostMessage>,
    ) -> wasmtime::Result<Option<Vec<(String, String)>>> {
        Ok(Some(self.table.get(&message)?.metadata.clone()))
    }

    async fn add_metadata(
        &mut self,
        message: Resource<HostMessage>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        self.change_message(&message, |m| {
            match m.metadata.iter_mut().find(|(k, _)| *k == key) {
                Some(entry) => entry.1 = value,
                None => m.metadata.push((key, value)),
            }
        })
    }

    async fn set_metadata(
        &mut self,
        message: Resource<HostMessage>,
        meta: Vec<(String, String)>,
    ) -> wasmtime::Result<()> {
        self.change_message(&message, |m| m.metadata = meta)
    }

    async fn remove_metadata(
        &mut self,
        message: Resource<HostMessage>,
        key: String,
    ) -> wasmtime::Result<()> {
        self.change_message(&message, |m| m.metadata.retain(|(k, _)| *k != key))
    }

    async fn drop(&mut self, message: Resource<HostMessage>) -> wasmtime::Result<()> {
        let message = self.table.delete(message)?;
        self.ctx.released(message.size());
        Ok(())
    }
}

impl producer::Host for MessagingView<'_> {
    async fn send(
        &mut self,
        client: Resource<MessagingClient>,
        topic: String,
        message: Resource<HostMessage>,
    ) -> wasmtime::Result<Result<(), Error>> {
        self.table.get(&client)?;
        let message = self.table.delete(message)?;
        self.ctx.released(message.size());
        if self.ctx.warming_up {
            return Ok(Err(Error::Other(format!(
                "component {:?} sent a message to {topic:?} during warm-up, which belongs to no \
                 delivered message, so nothing would settle or retry it: send from handle",
                self.ctx.component
            ))));
        }
        if let Some(left) = &mut self.ctx.sends_left {
            if *left == 0 {
                return Ok(Err(Error::Other(format!(
                    "component {:?} sent {} messages in this call, its limit per handled \
                     message (limits.max_sends_per_call); the message to {topic:?} is not sent",
                    self.ctx.component, self.ctx.limits.max_sends_per_call
                ))));
            }
            *left -= 1;
        }
        if !self.ctx.every_topic && !self.ctx.publish_grants.contains(&topic) {
            return Ok(Err(Error::PermissionDenied(format!(
                "component {:?} may not send to topic {topic:?}: add it to `publish` in the \
                 component's manifest entry",
                self.ctx.component
            ))));
        }
        let mut headers = message.metadata;
        headers.retain(|(key, _)| key != SENT_BY_HEADER);
        headers.push((SENT_BY_HEADER.into(), self.ctx.sent_by.to_string()));
        let sent = self.ctx.metrics.sent_counter(&topic);
        let outgoing = OutgoingMessage {
            topic,
            key: None,
            payload: message.data,
            headers,
            content_type: message.content_type,
        };
        if let ReceiptSink::Hold(held) = &mut self.ctx.receipts {
            held.push(outgoing);
            sent.inc();
            return Ok(Ok(()));
        }
        let receipt = match self.ctx.publisher.publish(outgoing).await {
            Ok(receipt) => receipt,
            Err(e) => return Ok(Err(wit_error(e))),
        };
        sent.inc();
        match &mut self.ctx.receipts {
            ReceiptSink::Collect(receipts) => receipts.push(receipt),
            // Held messages returned before publishing; were one published, its receipt
            // would be awaited here.
            ReceiptSink::Hold(_) => {
                if let Err(e) = receipt.wait().await {
                    return Ok(Err(wit_error(e)));
                }
            }
            ReceiptSink::Forward(sender) => {
                if let Err(unsent) = sender.send(receipt) {
                    // The counting task is gone (shutdown): wait here instead.
                    if let Err(e) = unsent.0.wait().await {
                        return Ok(Err(wit_error(e)));
                    }
                }
            }
        }
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_hears_a_broker_failure_by_its_kind() {
        let refused = BrokerError::new(ErrorKind::PermissionDenied, "producing to \"t\"")
            .with_source(std::io::Error::other("TopicAuthorizationFailed"));
        assert!(matches!(
            wit_error(refused),
            Error::PermissionDenied(text) if text.contains("TopicAuthorizationFailed")
        ));
        assert!(matches!(
            wit_error(BrokerError::unavailable("down")),
            Error::Connection(_)
        ));
        assert!(matches!(
            wit_error(BrokerError::timeout("slow")),
            Error::Timeout
        ));
        assert!(matches!(
            wit_error(BrokerError::rejected("too large")),
            Error::Other(_)
        ));
    }
}
