//! Receiving from Pub/Sub: one or more streaming pulls per subscription feed one channel, a
//! stream that fails is reopened with backoff, and a message acknowledged recently is not
//! handed out again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_pubsub::client::Subscriber as SdkSubscriber;
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownBehavior};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::errors::rpc_error;
use super::resources::Resources;
use super::{EMPTY_MARKER, PubSub};
use crate::outage::OutageLog;
use crate::{
    Broker, BrokerError, Delivery, DeliveryReceipt, ErrorKind, Guarantee, OutgoingMessage,
    Publisher, Settle, StartPosition, Subscriber, SubscriptionSpec, conversions,
};

/// What a pump needs to (re)open one streaming pull.
struct StreamSettings {
    subscriber: SdkSubscriber,
    path: String,
    topic: String,
    max_outstanding_messages: i64,
    ack_deadline_s: i32,
    acked: Arc<AckedIds>,
    /// Shared by every stream of the subscriber: one outage, one report.
    outage: Arc<OutageLog>,
    /// With `create_resources`: how to create the subscription (named here) again when it
    /// is gone.
    recreate: Option<(Arc<Resources>, String)>,
    /// An exactly-once subscription's publisher, for the outputs acknowledged with a message
    /// ([`Settle::ack_with`]); `None` on an at-least-once one.
    outputs: Option<Arc<dyn Publisher>>,
}

/// How many acknowledged messages a member remembers (about 120 bytes each, 12 MB in all).
const ACKED_IDS_KEPT: usize = 100_000;

/// The ids of the messages this member acknowledged most recently. Pub/Sub delivers at least
/// once, and may offer an acknowledged message again; the emulator does so at every ack
/// deadline once any member has left the subscription (measured: 3,000 requests became 8,656
/// predictions after one restart of the classifier). A message whose id is here is
/// acknowledged again at once and never reaches the handler, so a redelivery costs no work
/// and sends nothing twice. Duplicates across members (what a member that died had in hand)
/// remain, as at-least-once allows.
///
/// An id is remembered with its publish time ([`acked_key`]): the emulator numbers messages
/// 1, 2, 3… from its start, so after it restarts new messages carry the ids of old ones (found
/// by `pubsub_restart.rs`: every new message was taken for a redelivery and dropped).
struct AckedIds {
    kept: Mutex<(
        std::collections::HashSet<String>,
        std::collections::VecDeque<String>,
    )>,
}

impl AckedIds {
    fn new() -> Self {
        Self {
            kept: Mutex::new(Default::default()),
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .contains(id)
    }

    fn insert(&self, id: String) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let (ids, order) = &mut *kept;
        if ids.insert(id.clone()) {
            order.push_back(id);
            if order.len() > ACKED_IDS_KEPT
                && let Some(oldest) = order.pop_front()
            {
                ids.remove(&oldest);
            }
        }
    }
}

impl StreamSettings {
    fn open(&self) -> MessageStream {
        self.subscriber
            .subscribe(&self.path)
            .set_max_outstanding_messages(self.max_outstanding_messages)
            // The stream's own ack deadline (the SDK defaults to 60 s): how long a message
            // leased by a client that vanished waits for another one.
            .set_max_lease_extension(Duration::from_secs(
                u64::try_from(self.ack_deadline_s).unwrap_or(10),
            ))
            // Closing hands unsettled messages to other clients at once instead of after
            // their lease runs out.
            .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
            .build()
    }
}

/// How long a pump first waits before reopening a stream that failed; it doubles at every
/// failure in a row up to [`REOPEN_BACKOFF_MAX`], so an emulator that restarts is back within
/// a second while a long outage costs one attempt every few seconds.
const REOPEN_BACKOFF_MIN: Duration = Duration::from_millis(250);

/// The longest wait between two attempts to reopen a stream.
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Moves messages from one streaming pull into the subscriber's channel, reopening the stream
/// when it fails, until stopped. Failures that pass by themselves (the service unreachable,
/// a deadline) go to the outage log; the others (a deleted subscription, revoked rights)
/// are also passed on, so the consumer hears of them.
async fn pump(
    settings: StreamSettings,
    sender: mpsc::Sender<Result<Delivery, BrokerError>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = REOPEN_BACKOFF_MIN;
    loop {
        let mut stream = settings.open();
        let shutdown = stream.shutdown_token();
        loop {
            let next = tokio::select! {
                _ = stop.wait_for(|s| *s) => None,
                next = stream.next() => Some(next),
            };
            let Some(next) = next else {
                shutdown.shutdown().await;
                return;
            };
            match next {
                Some(Ok((message, handler))) => {
                    settings.outage.received();
                    backoff = REOPEN_BACKOFF_MIN;
                    if settings.acked.contains(&acked_key(&message)) {
                        tracing::debug!(
                            "topic {:?}: message {} came again after it was acknowledged; \
                             acknowledging it again without handling it",
                            settings.topic,
                            message.message_id
                        );
                        handler.ack();
                        continue;
                    }
                    if sender
                        .send(Ok(delivery(&settings, message, handler)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Some(Err(e)) => {
                    let error = rpc_error(&format!("receiving from topic {:?}", settings.topic), e);
                    if error.is_transient() {
                        settings.outage.error(&error);
                    } else if error.kind() == ErrorKind::NotFound
                        && let Some((resources, subscription)) = &settings.recreate
                    {
                        let exactly_once = settings.outputs.is_some();
                        recreate(resources, subscription, &settings.topic, exactly_once).await;
                    } else if sender.send(Err(error)).await.is_err() {
                        return;
                    }
                    break;
                }
                None => break,
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(REOPEN_BACKOFF_MAX);
    }
}

/// Creates a subscription that is gone (and its topic) again. What was published while it
/// did not exist is not in it: Pub/Sub keeps a topic's messages only for its subscriptions.
async fn recreate(resources: &Resources, subscription: &str, topic: &str, exactly_once: bool) {
    let created = match resources.ensure_topic(topic).await {
        Ok(_) => {
            resources
                .ensure_subscription(subscription, topic, exactly_once)
                .await
        }
        Err(e) => Err(e),
    };
    match created {
        Ok(true) => tracing::warn!(
            "subscription {subscription:?} of topic {topic:?} no longer existed; created it \
             again (messages published while it was missing are not in it)"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(
            "subscription {subscription:?} of topic {topic:?} no longer exists and cannot be \
             created again: {e:#}"
        ),
    }
}

/// What identifies a delivered message across redeliveries: its id and its publish time.
fn acked_key(message: &Message) -> String {
    match &message.publish_time {
        Some(time) => format!(
            "{}@{}.{:09}",
            message.message_id,
            time.seconds(),
            time.nanos()
        ),
        None => message.message_id.clone(),
    }
}

fn delivery(settings: &StreamSettings, message: Message, handler: Handler) -> Delivery {
    let id = acked_key(&message);
    let attributes = message
        .attributes
        .into_iter()
        .filter(|(name, _)| name != EMPTY_MARKER);
    let key = (!message.ordering_key.is_empty()).then_some(message.ordering_key.as_bytes());
    let incoming = conversions::incoming_message(
        &settings.topic,
        message.message_id.clone(),
        key,
        message.data.to_vec(),
        attributes,
        handler
            .delivery_attempt()
            .and_then(|a| u32::try_from(a).ok()),
    );
    Delivery::new(
        incoming,
        Box::new(PubSubSettle {
            handler: Mutex::new(Some(handler)),
            id,
            acked: settings.acked.clone(),
            outputs: settings.outputs.clone(),
        }),
    )
}

struct PubSubSettle {
    /// Taken by whichever settles it: [`Settle::ack_with`] takes those of the messages
    /// acknowledged with it through the `&dyn Settle` it can see. Dropped unsettled, the SDK
    /// nacks it.
    handler: Mutex<Option<Handler>>,
    id: String,
    acked: Arc<AckedIds>,
    outputs: Option<Arc<dyn Publisher>>,
}

impl PubSubSettle {
    fn take_handler(&self) -> Option<Handler> {
        self.handler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// A message's handler taken out of its settle, with what remembers that it was acknowledged.
struct Taken {
    handler: Handler,
    id: String,
    acked: Arc<AckedIds>,
}

impl Taken {
    /// Acknowledges with a confirmation where the subscription has exactly-once delivery: an
    /// `Ok` means Pub/Sub will never deliver the message again.
    async fn confirmed_ack(self) -> Result<(), BrokerError> {
        match self.handler {
            Handler::ExactlyOnce(handler) => handler.confirmed_ack().await.map_err(|e| {
                BrokerError::new(
                    ErrorKind::Closed,
                    format!(
                        "Pub/Sub did not confirm the acknowledgement of message {} (so it is \
                         delivered again, and handled again)",
                        self.id
                    ),
                )
                .with_source(e)
            })?,
            // The subscription lost exactly-once delivery after this member joined (someone
            // changed it): the SDK keeps each message's delivery type as it was received.
            handler => handler.ack(),
        }
        self.acked.insert(self.id);
        Ok(())
    }
}

/// Publishes `outputs` and waits until Pub/Sub stored every one.
async fn publish_all(
    publisher: &dyn Publisher,
    outputs: Vec<OutgoingMessage>,
) -> Result<(), BrokerError> {
    let mut receipts = Vec::with_capacity(outputs.len());
    for output in outputs {
        receipts.push(publisher.publish(output).await?);
    }
    for receipt in receipts {
        receipt.wait().await?;
    }
    Ok(())
}

impl Settle for PubSubSettle {
    fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        if let Some(handler) = self.take_handler() {
            handler.ack();
            self.acked.insert(self.id);
        }
        Ok(())
    }

    fn nack(self: Box<Self>) -> Result<(), BrokerError> {
        if let Some(handler) = self.take_handler() {
            handler.nack();
        }
        Ok(())
    }

    /// Pub/Sub has no transaction that takes a publish and an acknowledgement together: on
    /// an exactly-once subscription the outputs are published first, and the messages are
    /// acknowledged with a confirmation once every output is stored (see the module's docs).
    fn ack_with(
        self: Box<Self>,
        together: Vec<Box<dyn Settle>>,
        outputs: Vec<OutgoingMessage>,
    ) -> Result<DeliveryReceipt, (BrokerError, Vec<Box<dyn Settle>>)> {
        let publisher = self.outputs.clone();
        let mut all: Vec<Box<dyn Settle>> = vec![self];
        all.extend(together);
        let Some(publisher) = publisher else {
            return Err((crate::at_least_once_refusal(), all));
        };
        let ours: Option<Vec<&PubSubSettle>> = all
            .iter()
            .map(|settle| settle.as_any().downcast_ref::<PubSubSettle>())
            .collect();
        let Some(ours) = ours else {
            return Err((
                BrokerError::rejected(
                    "messages acknowledged together must come from one Pub/Sub subscription",
                ),
                all,
            ));
        };
        let taken: Vec<Taken> = ours
            .into_iter()
            .filter_map(|settle| {
                Some(Taken {
                    handler: settle.take_handler()?,
                    id: settle.id.clone(),
                    acked: settle.acked.clone(),
                })
            })
            .collect();
        Ok(DeliveryReceipt::new(Box::pin(async move {
            if let Err(e) = publish_all(publisher.as_ref(), outputs).await {
                // Given back at once: whoever gets them again handles them again, and sends
                // again what was stored of their outputs.
                for message in taken {
                    message.handler.nack();
                }
                return Err(BrokerError::new(
                    e.kind(),
                    "an output of the messages was not stored, so they were not acknowledged \
                     (they are delivered again, and handled again)",
                )
                .with_source(e));
            }
            let confirmed = futures::future::join_all(taken.into_iter().map(Taken::confirmed_ack));
            confirmed.await.into_iter().collect()
        })))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

type Received = Result<Delivery, BrokerError>;

/// A subscription's member. Its streaming pulls open on the first `next` (or `joined`), not
/// at `subscribe`: a member that only creates its subscription and closes (`switchyard consume
/// -c 0`) costs the service no streams. (The emulator as shipped never notices a closed
/// stream and leases messages to it, a whole ack deadline each; see `pubsub_emulator`.)
pub(super) struct PubSubSubscriber {
    receiver: tokio::sync::Mutex<Option<mpsc::Receiver<Received>>>,
    /// The streams to open, and where they deliver, until they are opened.
    unopened: Mutex<Option<(Vec<StreamSettings>, mpsc::Sender<Received>)>>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
}

impl PubSubSubscriber {
    fn open_streams(&self) {
        let unopened = self
            .unopened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some((streams, sender)) = unopened else {
            return;
        };
        let mut pumps = self.pumps.lock().unwrap_or_else(|p| p.into_inner());
        for stream in streams {
            pumps.push(tokio::spawn(pump(
                stream,
                sender.clone(),
                self.stop.subscribe(),
            )));
        }
    }
}

#[async_trait]
impl Subscriber for PubSubSubscriber {
    async fn next(&self) -> Result<Delivery, BrokerError> {
        self.open_streams();
        let mut receiver = self.receiver.lock().await;
        let receiver = receiver.as_mut().ok_or_else(BrokerError::closed)?;
        receiver
            .recv()
            .await
            .unwrap_or_else(|| Err(BrokerError::closed()))
    }

    async fn joined(&self) -> Result<(), BrokerError> {
        self.open_streams();
        Ok(())
    }

    async fn close(&self) -> Result<(), BrokerError> {
        self.unopened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let pumps: Vec<_> =
            std::mem::take(&mut *self.pumps.lock().unwrap_or_else(|p| p.into_inner()));
        // Stop the streams first: pending acks are sent, and every message still under lease
        // (those waiting in the channel too) is nacked, so other clients get it now.
        let _ = self.stop.send(true);
        for mut pump in pumps {
            if tokio::time::timeout(Duration::from_secs(10), &mut pump)
                .await
                .is_err()
            {
                tracing::debug!("a Pub/Sub stream did not end within 10 s of its shutdown");
                pump.abort();
            }
        }
        // What the channel still holds was never handed out; dropping a handle is a nack.
        self.receiver.lock().await.take();
        Ok(())
    }
}

impl PubSubSubscriber {
    /// Joins `spec.group`: one subscription per topic, created where the configuration
    /// allows it; the streams open on the first [`Subscriber::next`].
    pub(super) async fn subscribe(
        pubsub: &PubSub,
        spec: &SubscriptionSpec,
    ) -> Result<Self, BrokerError> {
        spec.check()?;
        let (sender, receiver) =
            mpsc::channel(pubsub.resources.config.max_outstanding_messages.max(1) as usize);
        let mut streams = Vec::new();
        let acked = Arc::new(AckedIds::new());
        let outage = Arc::new(OutageLog::new(format!(
            "subscription {:?} receiving from {:?}",
            spec.group, spec.topics
        )));
        let exactly_once = matches!(spec.guarantee, Guarantee::ExactlyOnce { .. });
        let outputs = if exactly_once {
            Some(pubsub.publisher().await?)
        } else {
            None
        };
        for topic in &spec.topics {
            let subscription =
                pubsub
                    .config()
                    .subscription_for(&spec.group, topic, spec.topics.len());
            if pubsub.resources.config.create_resources {
                pubsub.resources.ensure_topic(topic).await?;
                pubsub
                    .resources
                    .ensure_subscription(&subscription, topic, exactly_once)
                    .await?;
                if spec.start == StartPosition::Latest {
                    tracing::debug!(
                        "{subscription}: Pub/Sub subscriptions start at creation; `start` only \
                         matters for Kafka"
                    );
                }
            } else {
                pubsub
                    .resources
                    .check_subscription(&subscription, exactly_once)
                    .await?;
            }
            for _ in 0..pubsub.resources.config.streams.max(1) {
                streams.push(StreamSettings {
                    subscriber: pubsub.subscriber.clone(),
                    path: pubsub.resources.config.subscription_path(&subscription),
                    topic: topic.clone(),
                    max_outstanding_messages: pubsub.resources.config.max_outstanding_messages,
                    ack_deadline_s: pubsub.resources.config.ack_deadline_s,
                    acked: acked.clone(),
                    outage: outage.clone(),
                    recreate: pubsub
                        .config()
                        .create_resources
                        .then(|| (pubsub.resources.clone(), subscription.clone())),
                    outputs: outputs.clone(),
                });
            }
        }
        Ok(Self {
            receiver: tokio::sync::Mutex::new(Some(receiver)),
            unopened: Mutex::new(Some((streams, sender))),
            pumps: Mutex::new(Vec::new()),
            stop: watch::channel(false).0,
        })
    }
}
