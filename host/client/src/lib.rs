//! The unified producer/consumer API for Rust programs: one configuration names the backend
//! (Kafka, Pub/Sub or the embedded broker), and the same code produces and consumes on any of
//! them. This is what the original Python `KafkaService` / `GCPService` classes did, with
//! explicit acknowledgement instead of hidden auto-commit. Values are written and read by a
//! [`Serializer`] / [`Deserializer`]: the configured built-in one ([`ValueSerializer`]: JSON,
//! text or bytes), or any encoding of the user's own through [`Client::producer_with`],
//! [`Client::consumer_with`] and [`Received::value_with`].
//!
//! ```
//! use switchyard_client::{Client, ClientConfig};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // `broker` takes the same URLs as the CLI: embedded, kafka://HOST:PORT, pubsub://PROJECT.
//! let config: ClientConfig = toml::from_str(
//!     r#"
//!     broker = "embedded"
//!     topic = "greetings"
//!     group = "readers"
//!     serializer = "json"
//!     start = "earliest"
//!     "#,
//! )?;
//! let client = Client::connect(&config).await?;
//!
//! let consumer = client.consumer().await?; // subscribe before producing (Pub/Sub needs it)
//! let producer = client.producer().await?;
//! producer.produce(&serde_json::json!({"hello": "world"}), "greetings").await?;
//!
//! let received = consumer.next().await?;
//! let value: serde_json::Value = received.value()?;
//! assert_eq!(value["hello"], "world");
//! assert_eq!(received.content_type(), Some("application/json"));
//! received.ack()?; // settle only once the message is handled
//! consumer.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! It stands on `switchyard-broker` alone: no Wasm runtime, no inference engine, no results
//! store. Its Cargo features `kafka` and `pubsub` (both on by default) choose the backends
//! compiled in, so a program that talks to one pays for that one:
//!
//! ```toml
//! [dependencies]
//! switchyard-client = { version = "0.1", default-features = false, features = ["pubsub"] }
//! ```
//!
//! A broker URL of a backend left out is refused with [`BrokerUrlError::NotBuilt`], naming the
//! feature.
#![deny(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use switchyard_broker::{
    Broker, ConnectedBroker, Publisher, Settle, Subscriber, SubscriptionSpec, TopicSpec,
};
pub use switchyard_broker::{
    BrokerConfig, BrokerError, BrokerUrlError, DeliveryReceipt, ErrorKind, IncomingMessage,
    Isolation, OutgoingMessage, StartPosition,
};

mod serializer;

pub use serializer::{
    BoxError, Bytes, Deserializer, Encoded, Json, Serializer, SerializerError, Text,
    content_type_parameter, essence,
};

/// What went wrong producing or consuming.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A value could not be written, or a payload read, by the serializer in use.
    #[error(transparent)]
    Serializer(#[from] SerializerError),
    /// The broker URL does not parse.
    #[error(transparent)]
    BrokerUrl(#[from] BrokerUrlError),
    /// The configuration lacks what an operation needs.
    #[error("{0}")]
    Config(String),
}

/// The built-in serializers by the names the configuration (`serializer = "json"`) and the
/// manifest give them. As a [`Deserializer`] it reads a payload by its content type when that
/// names a built-in one (so producers with different built-in serializers can share a topic),
/// and as configured otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueSerializer {
    /// [`Json`] (`application/json`).
    #[default]
    Json,
    /// [`Text`] (`text/plain; charset=utf-8`): values must be strings.
    Text,
    /// [`Bytes`] (`application/octet-stream`): values must be byte sequences.
    Bytes,
}

impl ValueSerializer {
    /// The content type messages written with it carry.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => Json::CONTENT_TYPE,
            Self::Text => Text::CONTENT_TYPE,
            Self::Bytes => Bytes::CONTENT_TYPE,
        }
    }

    /// The built-in serializer that reads `content_type`, if one does.
    fn for_content_type(content_type: &str) -> Option<Self> {
        if Json::reads(content_type) {
            Some(Self::Json)
        } else if Text::reads(content_type) {
            Some(Self::Text)
        } else if essence(content_type) == Bytes::CONTENT_TYPE {
            Some(Self::Bytes)
        } else {
            None
        }
    }
}

impl<T: Serialize + ?Sized> Serializer<T> for ValueSerializer {
    fn encode(&self, value: &T) -> Result<Encoded, SerializerError> {
        match self {
            Self::Json => Json.encode(value),
            Self::Text => Text.encode(value),
            Self::Bytes => Bytes.encode(value),
        }
    }
}

impl<T: DeserializeOwned> Deserializer<T> for ValueSerializer {
    fn decode(&self, payload: &[u8], content_type: Option<&str>) -> Result<T, SerializerError> {
        let reader = content_type
            .and_then(Self::for_content_type)
            .unwrap_or(*self);
        match reader {
            Self::Json => Json.decode(payload, content_type),
            Self::Text => Text.decode(payload, content_type),
            Self::Bytes => Bytes.decode(payload, content_type),
        }
    }
}

/// One configuration for producers and consumers on any backend. Every key of the original
/// Kafka and GCP configurations has an equivalent (see the README's table).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The broker: a URL (`embedded`, `kafka://HOST:PORT`, `pubsub://PROJECT`) or a typed
    /// section like the manifest's `[broker.kafka]` / `[broker.pubsub]`.
    #[serde(deserialize_with = "broker_from_url_or_table")]
    pub broker: BrokerConfig,
    /// The topic consumers read and producers write by default.
    pub topic: Option<String>,
    /// The consumer group (Kafka `group_id`) or subscription (GCP `subscription_id`).
    pub group: Option<String>,
    /// How values become payloads (`value_serializer` / `value_deserializer`).
    #[serde(default)]
    pub serializer: ValueSerializer,
    /// Where a new group starts (`auto_offset_reset`): `earliest` or `latest`.
    #[serde(default)]
    pub start: StartPosition,
    /// Acknowledge every message as soon as it is received (`enable_auto_commit`): at-most-once
    /// for the application. Off by default: call [`Received::ack`] when done.
    #[serde(default)]
    pub auto_ack: bool,
    /// Which records of Kafka transactions consumers read (`isolation_level`):
    /// `read_committed` (the default: what aborted transactions wrote is never seen) or
    /// `read_uncommitted`. Pub/Sub has no transactions and ignores it.
    #[serde(default)]
    pub isolation_level: Isolation,
}

fn broker_from_url_or_table<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BrokerConfig, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum UrlOrTable {
        Url(String),
        Table(BrokerConfig),
    }
    match UrlOrTable::deserialize(deserializer)? {
        UrlOrTable::Url(url) => BrokerConfig::from_url(&url).map_err(serde::de::Error::custom),
        UrlOrTable::Table(config) => Ok(config),
    }
}

impl ClientConfig {
    /// A configuration for `broker` (a URL), JSON values, explicit acknowledgement.
    pub fn new(broker: &str) -> Result<Self, ClientError> {
        Ok(Self {
            broker: BrokerConfig::from_url(broker)?,
            topic: None,
            group: None,
            serializer: ValueSerializer::Json,
            start: StartPosition::Earliest,
            auto_ack: false,
            isolation_level: Isolation::default(),
        })
    }
}

/// A connection to a broker from which producers and consumers are made.
pub struct Client {
    config: ClientConfig,
    broker: ConnectedBroker,
}

impl Client {
    /// Connects (or starts the embedded broker), failing with a clear error when the broker
    /// cannot be reached.
    pub async fn connect(config: &ClientConfig) -> Result<Self, ClientError> {
        Ok(Self {
            config: config.clone(),
            broker: config.broker.connect().await?,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// A producer with the configured built-in serializer.
    pub async fn producer(&self) -> Result<Producer, ClientError> {
        self.producer_with(self.config.serializer).await
    }

    /// A producer that writes values with `serializer` (Protobuf, Avro, a format of your own).
    pub async fn producer_with<S>(&self, serializer: S) -> Result<Producer<S>, ClientError> {
        Ok(Producer {
            publisher: self.broker.broker.publisher().await?,
            serializer,
            default_topic: self.config.topic.clone(),
            broker: self.broker.broker.clone(),
        })
    }

    /// A consumer of the configured topic in the configured group, reading values with the
    /// configured built-in serializer. Its subscription exists when this returns, so what is
    /// produced afterwards reaches it on every backend.
    pub async fn consumer(&self) -> Result<Consumer, ClientError> {
        self.consumer_with(self.config.serializer).await
    }

    /// Like [`Client::consumer`], reading values with `deserializer`.
    pub async fn consumer_with<D>(&self, deserializer: D) -> Result<Consumer<D>, ClientError> {
        let topic = self.config.topic.clone().ok_or_else(|| {
            ClientError::Config("a consumer needs `topic` in the client configuration".into())
        })?;
        let group = self.config.group.clone().ok_or_else(|| {
            ClientError::Config(
                "a consumer needs `group` (Kafka group_id, Pub/Sub subscription) in the client \
                 configuration"
                    .into(),
            )
        })?;
        self.broker
            .broker
            .ensure_topics(&[TopicSpec {
                name: topic.clone(),
                partitions: 8,
            }])
            .await?;
        let subscriber = self
            .broker
            .broker
            .subscribe(&SubscriptionSpec {
                group,
                topics: vec![topic],
                start: self.config.start,
                guarantee: Default::default(),
                isolation: self.config.isolation_level,
            })
            .await?;
        Ok(Consumer {
            subscriber,
            deserializer: Arc::new(deserializer),
            auto_ack: self.config.auto_ack,
        })
    }
}

/// Produces values with its serializer: the configured built-in one ([`ValueSerializer`]), or
/// any [`Serializer`] given to [`Client::producer_with`].
pub struct Producer<S = ValueSerializer> {
    publisher: Arc<dyn Publisher>,
    serializer: S,
    default_topic: Option<String>,
    broker: Arc<dyn Broker>,
}

impl<S> Producer<S> {
    /// Serializes `value` and publishes it to `topic` with the serializer's content type,
    /// returning once the broker stored it.
    pub async fn produce<T: ?Sized>(&self, value: &T, topic: &str) -> Result<(), ClientError>
    where
        S: Serializer<T>,
    {
        let Encoded {
            payload,
            content_type,
        } = self.serializer.encode(value)?;
        let message = OutgoingMessage {
            topic: topic.to_string(),
            payload,
            content_type: Some(content_type),
            ..OutgoingMessage::default()
        };
        self.send(message).await
    }

    /// Like [`Producer::produce`], to the configured `topic`.
    pub async fn produce_default<T: ?Sized>(&self, value: &T) -> Result<(), ClientError>
    where
        S: Serializer<T>,
    {
        let topic = self.default_topic.clone().ok_or_else(|| {
            ClientError::Config("produce_default needs `topic` in the client configuration".into())
        })?;
        self.produce(value, &topic).await
    }

    /// Publishes a message as it is (key, headers, content type) and waits until the broker
    /// stored it.
    pub async fn send(&self, message: OutgoingMessage) -> Result<(), ClientError> {
        Ok(self.publisher.publish(message).await?.wait().await?)
    }

    /// Publishes without waiting for the broker; the receipt tells how it went. Use this to
    /// keep many messages in flight.
    pub async fn send_nowait(
        &self,
        message: OutgoingMessage,
    ) -> Result<DeliveryReceipt, ClientError> {
        Ok(self.publisher.publish(message).await?)
    }

    /// Waits until everything sent has reached the broker, at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), ClientError> {
        Ok(self.publisher.flush(timeout).await?)
    }

    /// Creates topics (where the broker allows it).
    pub async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<(), ClientError> {
        Ok(self
            .broker
            .ensure_topics(&[TopicSpec {
                name: topic.to_string(),
                partitions,
            }])
            .await?)
    }
}

/// Receives messages of one topic as a member of one group; their values are read with its
/// deserializer (the configured built-in one, or any [`Deserializer`] given to
/// [`Client::consumer_with`]).
pub struct Consumer<D = ValueSerializer> {
    subscriber: Arc<dyn Subscriber>,
    deserializer: Arc<D>,
    auto_ack: bool,
}

impl<D> Consumer<D> {
    /// The next message; waits until one arrives.
    pub async fn next(&self) -> Result<Received<D>, ClientError> {
        let (message, settle) = self.subscriber.next().await?.into_parts();
        let mut received = Received {
            message,
            settle: Some(settle),
            deserializer: self.deserializer.clone(),
        };
        if self.auto_ack {
            received.settle(true)?;
        }
        Ok(received)
    }

    /// The messages as a stream; ends when the consumer is closed.
    pub fn consume(&self) -> impl Stream<Item = Result<Received<D>, ClientError>> + '_ {
        futures::stream::unfold(self, |consumer| async move {
            match consumer.next().await {
                Err(ClientError::Broker(error)) if error.kind() == ErrorKind::Closed => None,
                item => Some((item, consumer)),
            }
        })
    }

    /// Commits what was acknowledged and leaves the group; unacknowledged messages go to
    /// other members.
    pub async fn close(&self) -> Result<(), ClientError> {
        Ok(self.subscriber.close().await?)
    }
}

/// A received message, to acknowledge (or nack) once handled. Dropping it unsettled leaves it
/// for redelivery.
pub struct Received<D = ValueSerializer> {
    message: IncomingMessage,
    settle: Option<Box<dyn Settle>>,
    deserializer: Arc<D>,
}

impl<D> std::fmt::Debug for Received<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("message", &self.message)
            .field("settled", &self.settle.is_none())
            .finish()
    }
}

impl<D> Received<D> {
    /// The message as the broker delivered it.
    pub fn message(&self) -> &IncomingMessage {
        &self.message
    }

    /// The raw payload.
    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// The payload's content type, if the sender gave one.
    pub fn content_type(&self) -> Option<&str> {
        self.message.content_type.as_deref()
    }

    /// The payload read by the consumer's deserializer, which goes by the content type.
    pub fn value<T>(&self) -> Result<T, ClientError>
    where
        D: Deserializer<T>,
    {
        self.value_with(self.deserializer.as_ref())
    }

    /// The payload read by `deserializer`: for a topic that carries several formats, or a
    /// message whose content type the consumer's deserializer does not read.
    pub fn value_with<T>(&self, deserializer: &impl Deserializer<T>) -> Result<T, ClientError> {
        Ok(deserializer.decode(self.payload(), self.content_type())?)
    }

    /// Acknowledges the message.
    pub fn ack(mut self) -> Result<(), ClientError> {
        self.settle(true)
    }

    /// Gives the message back for redelivery.
    pub fn nack(mut self) -> Result<(), ClientError> {
        self.settle(false)
    }

    fn settle(&mut self, ack: bool) -> Result<(), ClientError> {
        let Some(settle) = self.settle.take() else {
            return Ok(());
        };
        Ok(if ack { settle.ack() } else { settle.nack() }?)
    }
}

#[cfg(all(test, feature = "kafka", feature = "pubsub"))]
mod tests {
    use super::*;

    /// Writes `value` with `serializer` and reads it back with the same.
    fn round_trip<W: ?Sized, R>(
        serializer: &(impl Serializer<W> + Deserializer<R>),
        value: &W,
    ) -> (Encoded, R) {
        let encoded = serializer.encode(value).unwrap();
        let back = serializer
            .decode(&encoded.payload, Some(&encoded.content_type))
            .unwrap();
        (encoded, back)
    }

    #[test]
    fn serializers_record_their_content_type_and_round_trip() {
        let (json, back): (_, serde_json::Value) =
            round_trip(&ValueSerializer::Json, &serde_json::json!({"a": [1, 2]}));
        assert_eq!(json.content_type, "application/json");
        assert_eq!(back["a"][1], 2);

        let (text, back): (_, String) = round_trip(&ValueSerializer::Text, "héllo");
        assert_eq!(text.payload, "héllo".as_bytes());
        assert_eq!(text.content_type, "text/plain; charset=utf-8");
        assert_eq!(back, "héllo");

        let (bytes, back): (_, Vec<u8>) = round_trip(&ValueSerializer::Bytes, &[0u8, 255, 7][..]);
        assert_eq!(bytes.payload, vec![0, 255, 7]);
        assert_eq!(back, vec![0, 255, 7]);

        // The built-in formats as types of their own write the same.
        assert_eq!(
            Json.encode(&serde_json::json!({"a": [1, 2]})).unwrap(),
            json
        );
        assert_eq!(Text.encode("héllo").unwrap(), text);
        assert_eq!(Bytes.encode(&[0u8, 255, 7][..]).unwrap(), bytes);
    }

    #[test]
    fn the_configured_serializer_reads_by_content_type() {
        // A JSON consumer reads text and +json payloads by their label, and unlabelled ones
        // as JSON.
        let text: String = ValueSerializer::Json
            .decode(b"plain", Some("text/plain; charset=utf-8"))
            .unwrap();
        assert_eq!(text, "plain");
        let event: serde_json::Value = ValueSerializer::Json
            .decode(br#"{"id":1}"#, Some("application/cloudevents+json"))
            .unwrap();
        assert_eq!(event["id"], 1);
        let unlabelled: i64 = ValueSerializer::Json.decode(b"42", None).unwrap();
        assert_eq!(unlabelled, 42);

        // A format it does not know is named, not misread; the bytes consumer reads anything.
        let protobuf = "application/x-protobuf; messageType=shop.Order";
        let error = Deserializer::<serde_json::Value>::decode(
            &ValueSerializer::Json,
            &[8, 1],
            Some(protobuf),
        )
        .unwrap_err();
        assert!(
            matches!(&error, SerializerError::UnknownContentType { found, .. } if found == protobuf),
            "{error}"
        );
        assert!(error.to_string().contains("value_with"), "{error}");
        let raw: Vec<u8> = ValueSerializer::Bytes
            .decode(&[8, 1], Some(protobuf))
            .unwrap();
        assert_eq!(raw, vec![8, 1]);
        assert_eq!(
            content_type_parameter(protobuf, "MESSAGETYPE"),
            Some("shop.Order")
        );
        assert_eq!(
            content_type_parameter("text/plain; charset=\"utf-8\"", "charset"),
            Some("utf-8")
        );
        assert_eq!(content_type_parameter("text/plain", "charset"), None);
    }

    #[test]
    fn serializers_refuse_what_they_cannot_write() {
        let err = ValueSerializer::Text.encode(&42).unwrap_err();
        assert!(err.to_string().contains("takes strings"), "{err}");
        let err = ValueSerializer::Bytes.encode("text").unwrap_err();
        assert!(err.to_string().contains("byte sequences"), "{err}");
        let err = Deserializer::<serde_json::Value>::decode(
            &ValueSerializer::Json,
            b"{oops",
            Some("application/json"),
        )
        .unwrap_err();
        assert!(
            matches!(err, SerializerError::Deserialize { .. })
                && err.to_string().contains("application/json"),
            "{err}"
        );
    }

    #[test]
    fn configuration_takes_urls_or_tables_and_refuses_unknown_keys() {
        let config: ClientConfig = toml::from_str(
            "broker = \"kafka://k:9092\"\ntopic = \"t\"\ngroup = \"g\"\nserializer = \"text\"\nstart = \"latest\"\nauto_ack = true\n",
        )
        .unwrap();
        assert!(matches!(config.broker, BrokerConfig::Kafka(_)));
        assert_eq!(config.serializer, ValueSerializer::Text);
        assert_eq!(config.start, StartPosition::Latest);
        assert!(config.auto_ack);
        assert_eq!(config.isolation_level, Isolation::ReadCommitted);
        let uncommitted: ClientConfig =
            toml::from_str("broker = \"embedded\"\nisolation_level = \"read_uncommitted\"\n")
                .unwrap();
        assert_eq!(uncommitted.isolation_level, Isolation::ReadUncommitted);
        let table: ClientConfig =
            toml::from_str("[broker.pubsub]\nproject = \"my-project\"\n").unwrap();
        assert!(matches!(table.broker, BrokerConfig::Pubsub(_)));
        let err = toml::from_str::<ClientConfig>("broker = \"embedded\"\ngroup_id = \"g\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("group_id"), "{err}");
    }
}
