//! The unified producer/consumer API for Rust programs: one configuration names the backend
//! (Kafka, Pub/Sub or the embedded broker), and the same code produces and consumes on any of
//! them. This is what the original Python `KafkaService` / `GCPService` classes did, with
//! explicit acknowledgement instead of hidden auto-commit.
//!
//! ```
//! use switchyard::client::{Client, ClientConfig};
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

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::app::{self, ConnectedBroker};
use crate::broker::{
    BrokerError, ErrorKind, IncomingMessage, OutgoingMessage, Publisher, Settle, StartPosition,
    Subscriber, SubscriptionSpec, TopicSpec,
};
use crate::config::BrokerConfig;

/// What went wrong producing or consuming.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A value could not be serialized with the configured serializer.
    #[error("cannot serialize the value as {serializer:?}: {reason}")]
    Serialize {
        /// The serializer in use.
        serializer: ValueSerializer,
        /// Why.
        reason: String,
    },
    /// A payload could not be deserialized into the requested type.
    #[error("cannot read the payload ({content_type}) as the requested type: {reason}")]
    Deserialize {
        /// The payload's content type.
        content_type: String,
        /// Why.
        reason: String,
    },
    /// The configuration is incomplete.
    #[error("{0}")]
    Config(String),
}

/// How values become payloads, recorded as the message's content type; a consumer reads a
/// payload by its content type, falling back to its own serializer when there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueSerializer {
    /// JSON (`application/json`).
    #[default]
    Json,
    /// UTF-8 text (`text/plain; charset=utf-8`): values must be strings.
    Text,
    /// Raw bytes (`application/octet-stream`): values must be byte sequences.
    Bytes,
}

impl ValueSerializer {
    /// The content type messages written with it carry.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Text => "text/plain; charset=utf-8",
            Self::Bytes => "application/octet-stream",
        }
    }

    fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next()?.trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Some(Self::Json),
            "text/plain" => Some(Self::Text),
            "application/octet-stream" => Some(Self::Bytes),
            _ => None,
        }
    }

    /// Serializes a value.
    pub fn serialize<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, ClientError> {
        let error = |reason: String| ClientError::Serialize {
            serializer: self,
            reason,
        };
        match self {
            Self::Json => serde_json::to_vec(value).map_err(|e| error(e.to_string())),
            Self::Text => match serde_json::to_value(value).map_err(|e| error(e.to_string()))? {
                serde_json::Value::String(text) => Ok(text.into_bytes()),
                other => Err(error(format!(
                    "the text serializer takes strings, not {other}; use \"json\" for structured values"
                ))),
            },
            Self::Bytes => {
                let value = serde_json::to_value(value).map_err(|e| error(e.to_string()))?;
                value
                    .as_array()
                    .and_then(|items| {
                        items
                            .iter()
                            .map(|v| v.as_u64().and_then(|b| u8::try_from(b).ok()))
                            .collect::<Option<Vec<u8>>>()
                    })
                    .ok_or_else(|| {
                        error("the bytes serializer takes byte sequences (&[u8], Vec<u8>)".into())
                    })
            }
        }
    }

    /// Deserializes a payload.
    pub fn deserialize<T: DeserializeOwned>(self, payload: &[u8]) -> Result<T, ClientError> {
        let error = |reason: String| ClientError::Deserialize {
            content_type: self.content_type().to_string(),
            reason,
        };
        match self {
            Self::Json => serde_json::from_slice(payload).map_err(|e| error(e.to_string())),
            Self::Text => {
                let text = std::str::from_utf8(payload).map_err(|e| error(e.to_string()))?;
                serde_json::from_value(serde_json::Value::String(text.to_string()))
                    .map_err(|e| error(format!("{e} (text payloads read as String)")))
            }
            Self::Bytes => serde_json::from_value(serde_json::Value::from(payload.to_vec()))
                .map_err(|e| error(format!("{e} (byte payloads read as Vec<u8>)"))),
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
            broker: BrokerConfig::from_url(broker).map_err(ClientError::Config)?,
            topic: None,
            group: None,
            serializer: ValueSerializer::Json,
            start: StartPosition::Earliest,
            auto_ack: false,
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
            broker: app::connect(&config.broker).await?,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// A producer.
    pub async fn producer(&self) -> Result<Producer, ClientError> {
        Ok(Producer {
            publisher: self.broker.broker.publisher().await?,
            serializer: self.config.serializer,
            default_topic: self.config.topic.clone(),
            broker: self.broker.broker.clone(),
        })
    }

    /// A consumer of the configured topic in the configured group. Its subscription exists
    /// when this returns, so what is produced afterwards reaches it on every backend.
    pub async fn consumer(&self) -> Result<Consumer, ClientError> {
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
            })
            .await?;
        Ok(Consumer {
            subscriber,
            serializer: self.config.serializer,
            auto_ack: self.config.auto_ack,
        })
    }
}

/// Produces values, serialized the configured way.
pub struct Producer {
    publisher: Arc<dyn Publisher>,
    serializer: ValueSerializer,
    default_topic: Option<String>,
    broker: Arc<dyn crate::broker::Broker>,
}

impl Producer {
    /// Serializes `value` and publishes it to `topic`, returning once the broker stored it.
    pub async fn produce<T: Serialize + ?Sized>(
        &self,
        value: &T,
        topic: &str,
    ) -> Result<(), ClientError> {
        let message = OutgoingMessage {
            topic: topic.to_string(),
            payload: self.serializer.serialize(value)?,
            content_type: Some(self.serializer.content_type().to_string()),
            ..OutgoingMessage::default()
        };
        self.send(message).await
    }

    /// Like [`Producer::produce`], to the configured `topic`.
    pub async fn produce_default<T: Serialize + ?Sized>(
        &self,
        value: &T,
    ) -> Result<(), ClientError> {
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
    ) -> Result<crate::broker::DeliveryReceipt, ClientError> {
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

/// Receives messages of one topic as a member of one group.
pub struct Consumer {
    subscriber: Arc<dyn Subscriber>,
    serializer: ValueSerializer,
    auto_ack: bool,
}

impl Consumer {
    /// The next message; waits until one arrives.
    pub async fn next(&self) -> Result<Received, ClientError> {
        let (message, settle) = self.subscriber.next().await?.into_parts();
        let mut received = Received {
            message,
            settle: Some(settle),
            serializer: self.serializer,
        };
        if self.auto_ack {
            received.settle(true)?;
        }
        Ok(received)
    }

    /// The messages as a stream; ends when the consumer is closed.
    pub fn consume(&self) -> impl Stream<Item = Result<Received, ClientError>> + '_ {
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
pub struct Received {
    message: IncomingMessage,
    settle: Option<Box<dyn Settle>>,
    serializer: ValueSerializer,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("message", &self.message)
            .field("settled", &self.settle.is_none())
            .finish()
    }
}

impl Received {
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

    /// The payload deserialized by its content type (the consumer's serializer when it has
    /// none or an unknown one).
    pub fn value<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        let serializer = self
            .content_type()
            .and_then(ValueSerializer::from_content_type)
            .unwrap_or(self.serializer);
        serializer.deserialize(self.payload())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializers_record_their_content_type_and_round_trip() {
        let json = ValueSerializer::Json
            .serialize(&serde_json::json!({"a": [1, 2]}))
            .unwrap();
        let back: serde_json::Value = ValueSerializer::Json.deserialize(&json).unwrap();
        assert_eq!(back["a"][1], 2);

        let text = ValueSerializer::Text.serialize("héllo").unwrap();
        assert_eq!(text, "héllo".as_bytes());
        let back: String = ValueSerializer::Text.deserialize(&text).unwrap();
        assert_eq!(back, "héllo");

        let bytes = ValueSerializer::Bytes
            .serialize(&[0u8, 255, 7][..])
            .unwrap();
        assert_eq!(bytes, vec![0, 255, 7]);
        let back: Vec<u8> = ValueSerializer::Bytes.deserialize(&bytes).unwrap();
        assert_eq!(back, vec![0, 255, 7]);

        assert_eq!(
            ValueSerializer::from_content_type("text/plain; charset=utf-8"),
            Some(ValueSerializer::Text)
        );
        assert_eq!(ValueSerializer::from_content_type("image/png"), None);
    }

    #[test]
    fn serializers_refuse_what_they_cannot_write() {
        let err = ValueSerializer::Text.serialize(&42).unwrap_err();
        assert!(err.to_string().contains("takes strings"), "{err}");
        let err = ValueSerializer::Bytes.serialize("text").unwrap_err();
        assert!(err.to_string().contains("byte sequences"), "{err}");
        let err = ValueSerializer::Json
            .deserialize::<serde_json::Value>(b"{oops")
            .unwrap_err();
        assert!(err.to_string().contains("application/json"), "{err}");
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
        let table: ClientConfig =
            toml::from_str("[broker.pubsub]\nproject = \"my-project\"\n").unwrap();
        assert!(matches!(table.broker, BrokerConfig::Pubsub(_)));
        let err = toml::from_str::<ClientConfig>("broker = \"embedded\"\ngroup_id = \"g\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("group_id"), "{err}");
    }
}
