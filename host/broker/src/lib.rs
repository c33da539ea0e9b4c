//! switchyard's broker layer: one API over Apache Kafka and Google Cloud Pub/Sub, the
//! floor every other switchyard crate stands on.
//!
//! The traits are deliberately small: publish (enqueue now, learn about delivery later),
//! subscribe as a member of a group, settle each delivery explicitly. Each backend implements
//! them once ([`kafka`] on librdkafka, with [`kafka::EmbeddedKafka`] running a
//! Kafka-protocol broker inside the process; [`pubsub`] on Google's SDK, with
//! [`pubsub::PubSubEmulator`] starting Google's emulator). Backend-specific settings pass
//! through as properties instead of growing the trait, and a test can inject a backend of its
//! own to see how its user reacts to a failing broker.
//!
//! What both backends do the same way is written once, here: the header, content-type and key
//! conversions (`conversions.rs`), topic names ([`check_topic_name`]), dead-letter headers
//! ([`dead_letter`]), the bounded outage log, and the broker URLs ([`BrokerConfig`]).
//!
//! Cargo features: `kafka` and `pubsub` (both on by default) each bring one backend and its
//! dependencies; a program that needs one turns the other off.
#![deny(missing_docs)]

#[cfg(any(feature = "kafka", feature = "pubsub"))]
mod config;
mod conversions;
pub mod dead_letter;
mod error;
#[cfg(feature = "kafka")]
pub mod kafka;
mod outage;
#[cfg(feature = "pubsub")]
pub mod pubsub;
pub mod window;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::watch;

#[cfg(feature = "kafka")]
pub use config::EmbeddedConfig;
#[cfg(any(feature = "kafka", feature = "pubsub"))]
pub use config::{BrokerConfig, BrokerUrlError, ConnectedBroker};
pub use error::{BrokerError, ErrorKind};

/// Header carrying a message's content type on backends without a native field for it.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// Header naming the Kafka transaction that wrote a message sent with
/// [`Delivery::ack_with`] on an exactly-once subscription: `TRANSACTIONAL_ID/SESSION/N`, the
/// producer's transactional id, when its producer started (Unix ms) and the transaction's
/// number in that producer. An audit can tell which commit wrote what, and a reader of a
/// broker that shows aborted records to `read_committed` readers (Tansu 0.6.0, librdkafka's
/// mock) can tell a killed producer's last, aborted transaction from a committed one.
pub const TRANSACTION_HEADER: &str = "switchyard-transaction";

/// A message to publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Destination topic.
    pub topic: String,
    /// Partitioning / ordering key; messages with the same key keep their order.
    pub key: Option<Vec<u8>>,
    /// The payload.
    pub payload: Vec<u8>,
    /// Headers (Kafka) or attributes (Pub/Sub). Every backend sends them as a map: a repeated
    /// name keeps its last value, and a `content-type` header is the content type.
    pub headers: Vec<(String, String)>,
    /// Content type of the payload, carried in the `content-type` header; it wins over a
    /// `content-type` header among `headers`.
    pub content_type: Option<String>,
}

/// A received message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IncomingMessage {
    /// Topic it was received on.
    pub topic: String,
    /// Where the message sits in the broker, for logs: `partition@offset` on Kafka, the
    /// message id on Pub/Sub.
    pub position: String,
    /// Its partition and offset, on Kafka.
    pub partition_offset: Option<(i32, i64)>,
    /// Partitioning / ordering key.
    pub key: Option<Vec<u8>>,
    /// The payload.
    pub payload: Vec<u8>,
    /// Headers, one per name and sorted by name on every backend (Pub/Sub attributes have no
    /// order), without the content-type header, which is in `content_type`.
    pub headers: Vec<(String, String)>,
    /// Content type of the payload, if the sender gave one.
    pub content_type: Option<String>,
    /// How many times the broker has delivered this message, when it counts (Pub/Sub with a
    /// dead-letter policy); Kafka does not.
    pub delivery_attempt: Option<u32>,
}

/// Settles one delivery with the broker. Dropping it unsettled leaves the message for
/// redelivery to the next member of the group (at-least-once).
pub trait Settle: Send + Sync {
    /// Tells the broker the message is done with.
    fn ack(self: Box<Self>) -> Result<(), BrokerError>;

    /// Tells the broker the message was not handled: it is delivered again soon.
    fn nack(self: Box<Self>) -> Result<(), BrokerError>;

    /// Acknowledges the message, and those `together` settle (handled in the same call, from
    /// the same subscription), with the messages their handling produced, in one transaction:
    /// all of it takes effect, or none does (Pub/Sub, which has no transactions, publishes
    /// the outputs and then confirms the acknowledgements, see [`Guarantee::ExactlyOnce`]).
    /// Only an exactly-once subscription offers it; the receipt resolves once the transaction
    /// committed, or with why it will not (typically of kind [`ErrorKind::Closed`]: the
    /// messages are delivered again, here or to another member, and handled again).
    ///
    /// When it refuses at once (an at-least-once subscription, an output the broker cannot
    /// take), it gives every settle back, itself first, with why, so the messages can still be
    /// retried or dead-lettered.
    #[allow(clippy::type_complexity)]
    fn ack_with(
        self: Box<Self>,
        together: Vec<Box<dyn Settle>>,
        outputs: Vec<OutgoingMessage>,
    ) -> Result<DeliveryReceipt, (BrokerError, Vec<Box<dyn Settle>>)>;

    /// Itself, for a backend to recognise its own settles among those acknowledged together.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Why [`Settle::ack_with`] refuses on an at-least-once subscription.
pub(crate) fn at_least_once_refusal() -> BrokerError {
    BrokerError::rejected(
        "this subscription is at-least-once: publish what the message produced, then \
         acknowledge it (exactly-once subscriptions acknowledge with their outputs)",
    )
}

/// [`Delivery::ack_with`] or [`Delivery::ack_together`] refused at once: why, and the
/// deliveries, still unsettled.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct AckRefused {
    /// Why.
    #[source]
    pub error: BrokerError,
    /// The messages, in the order given, to retry or dead-letter.
    pub deliveries: Vec<Delivery>,
}

impl From<AckRefused> for BrokerError {
    fn from(refused: AckRefused) -> Self {
        refused.error
    }
}

/// A message delivered to a subscriber, to be settled once handled.
pub struct Delivery {
    /// The message.
    pub message: IncomingMessage,
    settle: Box<dyn Settle>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Pairs a message with how to settle it.
    pub fn new(message: IncomingMessage, settle: Box<dyn Settle>) -> Self {
        Self { message, settle }
    }

    /// Acknowledges the message: on Kafka its offset becomes committable once every earlier
    /// message of its partition is acknowledged too.
    pub fn ack(self) -> Result<(), BrokerError> {
        self.settle.ack()
    }

    /// Acknowledges the message with the messages its handling produced, in one transaction
    /// (exactly-once subscriptions only, see [`Settle::ack_with`]).
    pub fn ack_with(self, outputs: Vec<OutgoingMessage>) -> Result<DeliveryReceipt, AckRefused> {
        Self::ack_together(vec![self], outputs)
    }

    /// Acknowledges `deliveries`, handled together (one handler call) and received from one
    /// exactly-once subscription, with the messages their handling produced, in one
    /// transaction (see [`Settle::ack_with`]).
    pub fn ack_together(
        deliveries: Vec<Delivery>,
        outputs: Vec<OutgoingMessage>,
    ) -> Result<DeliveryReceipt, AckRefused> {
        let (messages, mut settles): (Vec<IncomingMessage>, Vec<Box<dyn Settle>>) = deliveries
            .into_iter()
            .map(|delivery| (delivery.message, delivery.settle))
            .unzip();
        if settles.is_empty() {
            return Err(AckRefused {
                error: BrokerError::rejected("nothing to acknowledge"),
                deliveries: Vec::new(),
            });
        }
        let first = settles.remove(0);
        first
            .ack_with(settles, outputs)
            .map_err(|(error, settles)| AckRefused {
                error,
                deliveries: messages
                    .into_iter()
                    .zip(settles)
                    .map(|(message, settle)| Delivery { message, settle })
                    .collect(),
            })
    }

    /// Separates the message from how to settle it.
    pub fn into_parts(self) -> (IncomingMessage, Box<dyn Settle>) {
        (self.message, self.settle)
    }

    /// Gives the message back for redelivery: on Pub/Sub a nack; on Kafka the member rewinds
    /// the partition to it, so it (and what followed it) is delivered again.
    pub fn nack(self) -> Result<(), BrokerError> {
        self.settle.nack()
    }
}

/// Resolves once the broker has acknowledged (or definitely failed) a published message.
pub struct DeliveryReceipt(BoxFuture<'static, Result<(), BrokerError>>);

impl DeliveryReceipt {
    /// Wraps a future that resolves with the broker's verdict.
    pub fn new(future: BoxFuture<'static, Result<(), BrokerError>>) -> Self {
        Self(future)
    }

    /// Waits for the broker's verdict.
    pub async fn wait(self) -> Result<(), BrokerError> {
        self.0.await
    }
}

impl fmt::Debug for DeliveryReceipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeliveryReceipt")
    }
}

/// Publishes messages.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Hands a message to the backend. Returns as soon as it is queued: it waits only while
    /// the local queue is full (backpressure), and never drops the message. The receipt tells
    /// whether the broker stored it.
    async fn publish(&self, message: OutgoingMessage) -> Result<DeliveryReceipt, BrokerError>;

    /// Waits until everything queued has been delivered or `timeout` has passed.
    async fn flush(&self, timeout: Duration) -> Result<(), BrokerError>;
}

/// A membership in a consumer group (Kafka) or subscription (Pub/Sub).
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// The next delivery; waits until one arrives. Failures that pass by themselves (the
    /// broker away, a rebalance) are retried inside, and logged at a bounded rate while they
    /// last; the error returned is one that needs someone ([`ErrorKind::PermissionDenied`],
    /// [`ErrorKind::NotFound`]) or [`ErrorKind::Closed`].
    async fn next(&self) -> Result<Delivery, BrokerError>;

    /// Waits until the subscription is receiving: a Kafka member has joined its group and
    /// been given its partitions (while someone calls [`Subscriber::next`], which drives the
    /// join). Nothing sent before is lost either way (a new group starts at its start
    /// position), but it waits for the join, so whoever measures latency or wants the first
    /// messages handled at once starts sending after this. Backends that receive as soon as
    /// they subscribe return at once.
    async fn joined(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    /// The group's lag in each partition this member holds, as the backend last reported it
    /// (a watch, which changes as reports come); `None` where the backend reports no lag.
    fn lag(&self) -> Option<watch::Receiver<Vec<PartitionLag>>> {
        None
    }

    /// Commits what was acknowledged and leaves the group. Unsettled messages go to the next
    /// member.
    async fn close(&self) -> Result<(), BrokerError>;
}

/// How far a group is behind in one partition: messages after its committed position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Messages in the partition after the group's committed position.
    pub messages: i64,
}

/// What to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSpec {
    /// Consumer group (Kafka) or subscription name (Pub/Sub); members share the load.
    pub group: String,
    /// Topics to receive from.
    pub topics: Vec<String>,
    /// Where a group with no committed position starts.
    pub start: StartPosition,
    /// What acknowledging a message promises.
    pub guarantee: Guarantee,
    /// Whether the member reads what transactions aborted or have not committed yet.
    pub isolation: Isolation,
}

/// Which records of Kafka transactions a member reads (Kafka's `isolation.level`). Pub/Sub
/// has no transactions: there every message is committed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Only what committed transactions wrote, and what was written outside transactions
    /// (Kafka's and librdkafka's default). Needed to see an exactly-once handler's outputs
    /// once. (The embedded broker and Tansu 0.6.0 ignore it and show aborted records too.)
    #[default]
    ReadCommitted,
    /// Everything, including what transactions aborted or have not committed yet, as soon as
    /// it is written.
    ReadUncommitted,
}

impl Isolation {
    /// Kafka's name for it (`read_committed`, `read_uncommitted`).
    pub fn kafka_name(self) -> &'static str {
        match self {
            Self::ReadCommitted => "read_committed",
            Self::ReadUncommitted => "read_uncommitted",
        }
    }
}

/// What a subscription's acknowledgements promise.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Guarantee {
    /// A message is settled after its handler's outputs were published: a crash in between
    /// handles it again, and its outputs are published again.
    #[default]
    AtLeastOnce,
    /// A message is settled together with its outputs ([`Delivery::ack_with`]). On Kafka, in
    /// one transaction, so readers that read committed data see each message's outputs once.
    /// The transactional id names this member's producer: a member started with the id of one
    /// that died fences it (its open transaction is aborted at once), so it should stay the
    /// same across restarts of one host and differ between hosts. On Pub/Sub, with its
    /// exactly-once delivery: the outputs are stored first, then the message's
    /// acknowledgement is confirmed, after which it is never delivered again; a failure
    /// between the two sends the outputs again (see [`pubsub`](crate::pubsub)).
    ExactlyOnce {
        /// The Kafka producer's `transactional.id` (Pub/Sub has none and ignores it).
        transactional_id: String,
    },
}

impl SubscriptionSpec {
    /// Refuses a subscription without topics, which every backend would wait on forever.
    pub fn check(&self) -> Result<(), BrokerError> {
        if self.topics.is_empty() {
            return Err(BrokerError::config(format!(
                "subscription {:?} names no topics",
                self.group
            )));
        }
        if matches!(self.guarantee, Guarantee::ExactlyOnce { .. })
            && self.isolation == Isolation::ReadUncommitted
        {
            return Err(BrokerError::config(format!(
                "subscription {:?} is exactly-once but reads uncommitted data: it would handle \
                 what aborted transactions wrote; read committed data",
                self.group
            )));
        }
        Ok(())
    }
}

/// Where a new group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartPosition {
    /// From the oldest retained message.
    #[default]
    Earliest,
    /// Only messages published after subscribing: on Kafka, from the end of each partition
    /// when `subscribe` was called (committed for the new group before it joins, so nothing
    /// published during the join is skipped); on Pub/Sub, from the subscription's creation.
    Latest,
}

/// A topic the application needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Partitions to create it with, when it has to be created.
    pub partitions: i32,
}

/// A topic as a broker lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// Topic name (without Pub/Sub's `projects/P/topics/` prefix).
    pub name: String,
    /// Its partitions, where the backend has them (Kafka); Pub/Sub has none.
    pub partitions: Option<i32>,
}

/// Checks a topic name against Kafka's rules, which every backend's topics follow (Pub/Sub's
/// own are checked by its backend): 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn check_topic_name(name: &str) -> Result<(), BrokerError> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty()
        || name.len() > 249
        || !name.chars().all(legal)
        || name == "."
        || name == ".."
    {
        return Err(BrokerError::rejected(format!(
            "{name:?} is not a valid Kafka topic name: use 1 to 249 letters, digits, '.', '_' or '-'"
        )));
    }
    Ok(())
}

/// The error of a topic operation a broker does not offer.
fn no_topic_admin(broker: String, what: &str) -> BrokerError {
    BrokerError::rejected(format!(
        "{broker} cannot {what}: use a kafka:// or pubsub:// broker"
    ))
}

/// OpenTelemetry's `messaging.system` names of the backends.
pub mod system {
    /// Apache Kafka (and the embedded Kafka-protocol broker).
    pub const KAFKA: &str = "kafka";
    /// Google Cloud Pub/Sub.
    pub const GCP_PUBSUB: &str = "gcp_pubsub";
}

/// A message broker: the one thing a backend implements.
#[async_trait]
pub trait Broker: Send + Sync {
    /// How to name this broker to a person (`kafka://host:9092`, `embedded`).
    fn describe(&self) -> String;

    /// Which messaging system it is, as OpenTelemetry names it (see [`system`]).
    fn messaging_system(&self) -> &'static str;

    /// Creates the topics that do not exist yet, where the broker allows it.
    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), BrokerError>;

    /// Creates topics whose messages must wait for a reader that may subscribe only later
    /// (dead-letter topics). Kafka keeps a topic's messages whoever reads them, so this is
    /// [`Broker::ensure_topics`]; Pub/Sub drops what a topic receives while no subscription
    /// is attached, so there each topic also gets a subscription of the same name, the one
    /// `switchyard consume -t TOPIC` reads by default.
    async fn ensure_kept_topics(&self, topics: &[TopicSpec]) -> Result<(), BrokerError> {
        self.ensure_topics(topics).await
    }

    /// The topics that exist, sorted by name, without the broker's internal ones (Kafka's
    /// `__consumer_offsets`).
    async fn list_topics(&self) -> Result<Vec<TopicInfo>, BrokerError> {
        Err(no_topic_admin(self.describe(), "list topics"))
    }

    /// Creates one topic, whatever `create_topics`/`create_resources` say (a person asked for
    /// it); says whether it created it (`false`: it existed, and was left as it is).
    async fn create_topic(&self, _topic: &TopicSpec) -> Result<bool, BrokerError> {
        Err(no_topic_admin(self.describe(), "create topics"))
    }

    /// Deletes one topic with its messages; says whether it deleted it (`false`: there was no
    /// such topic).
    async fn delete_topic(&self, _name: &str) -> Result<bool, BrokerError> {
        Err(no_topic_admin(self.describe(), "delete topics"))
    }

    /// A publisher; cheap to share between components.
    async fn publisher(&self) -> Result<Arc<dyn Publisher>, BrokerError>;

    /// Joins a group and starts receiving.
    async fn subscribe(&self, spec: &SubscriptionSpec) -> Result<Arc<dyn Subscriber>, BrokerError>;

    /// Whether a [`Guarantee::ExactlyOnce`] subscription to `topics` would be accepted: `Ok`,
    /// or the error (of kind [`ErrorKind::Config`] when this broker cannot run exactly-once at
    /// all) that `subscribe` would give. Lets a caller choose the strongest delivery a broker
    /// offers before it subscribes; `subscribe` asks the same.
    async fn offers_exactly_once(&self, topics: &[String]) -> Result<(), BrokerError> {
        let _ = topics;
        Err(BrokerError::config(format!(
            "{} has no transactions, so exactly-once cannot hold there: use at-least-once",
            self.describe()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exactly_once_subscription_reads_committed_data_only() {
        let mut spec = SubscriptionSpec {
            group: "g".into(),
            topics: vec!["t".into()],
            start: StartPosition::Earliest,
            guarantee: Guarantee::ExactlyOnce {
                transactional_id: "id".into(),
            },
            isolation: Isolation::ReadCommitted,
        };
        assert!(spec.check().is_ok());
        spec.isolation = Isolation::ReadUncommitted;
        let refused = spec.check().unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Config);
        assert!(refused.to_string().contains("uncommitted"), "{refused}");
        spec.guarantee = Guarantee::AtLeastOnce;
        assert!(spec.check().is_ok());
        assert_eq!(Isolation::default().kafka_name(), "read_committed");
    }
}
