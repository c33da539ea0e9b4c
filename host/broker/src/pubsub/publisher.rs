//! Publishing to Pub/Sub through the SDK's batching publisher: at most
//! `max_outstanding_publishes` messages wait for the server at a time, and `publish` waits
//! for room (backpressure) rather than drop. Headers Pub/Sub would refuse are refused before
//! anything is queued.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use google_cloud_pubsub::client::{BasePublisher, Publisher as TopicPublisher};
use google_cloud_pubsub::model::Message;
use tokio::sync::Semaphore;

use super::errors::rpc_error;
use super::resources::check_resource_id;
use super::{EMPTY_MARKER, PubSubConfig};
use crate::{BrokerError, DeliveryReceipt, OutgoingMessage, Publisher, conversions};

/// The most attributes a Pub/Sub message may carry, and the longest name and value (bytes).
const MAX_ATTRIBUTES: usize = 100;
const MAX_ATTRIBUTE_NAME: usize = 256;
const MAX_ATTRIBUTE_VALUE: usize = 1024;

/// The longest ordering key Pub/Sub takes, in bytes.
const MAX_ORDERING_KEY: usize = 1024;

/// Refuses headers Pub/Sub would refuse as attributes, naming the rule, before anything is
/// queued: a publish the service rejects later fails its whole batch.
fn check_attributes(message: &OutgoingMessage) -> Result<(), BrokerError> {
    let attributes = conversions::outgoing_headers(message);
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(BrokerError::rejected(format!(
            "a message to topic {:?} has {} headers; Pub/Sub takes at most {MAX_ATTRIBUTES}",
            message.topic,
            attributes.len()
        )));
    }
    for (name, value) in attributes {
        if name.is_empty()
            || name.len() > MAX_ATTRIBUTE_NAME
            || name.to_ascii_lowercase().starts_with("goog")
        {
            return Err(BrokerError::rejected(format!(
                "header {name:?} cannot be a Pub/Sub attribute: names are 1 to \
                 {MAX_ATTRIBUTE_NAME} bytes and do not start with \"goog\""
            )));
        }
        if value.len() > MAX_ATTRIBUTE_VALUE {
            return Err(BrokerError::rejected(format!(
                "header {name:?} is {} bytes long; Pub/Sub attribute values are at most \
                 {MAX_ATTRIBUTE_VALUE} bytes (put large data in the payload)",
                value.len()
            )));
        }
    }
    Ok(())
}

/// A message's key as a Pub/Sub ordering key, which is text of at most 1,024 bytes.
fn ordering_key(message: &OutgoingMessage) -> Result<Option<String>, BrokerError> {
    let Some(key) = conversions::outgoing_key(message) else {
        return Ok(None);
    };
    let key = std::str::from_utf8(key).map_err(|_| {
        BrokerError::rejected(format!(
            "the key of a message to topic {:?} is not UTF-8 text; Pub/Sub ordering keys are \
             text (encode binary keys, as hex or base64)",
            message.topic
        ))
    })?;
    if key.len() > MAX_ORDERING_KEY {
        return Err(BrokerError::rejected(format!(
            "the key of a message to topic {:?} is {} bytes long; Pub/Sub ordering keys are at \
             most {MAX_ORDERING_KEY} bytes",
            message.topic,
            key.len()
        )));
    }
    Ok(Some(key.to_string()))
}

pub(super) struct PubSubPublisher {
    base: BasePublisher,
    config: PubSubConfig,
    topics: Mutex<HashMap<String, TopicPublisher>>,
    room: Arc<Semaphore>,
}

impl PubSubPublisher {
    pub(super) fn new(base: BasePublisher, config: PubSubConfig) -> Self {
        let room = Arc::new(Semaphore::new(config.max_outstanding_publishes.max(1)));
        Self {
            base,
            config,
            topics: Mutex::new(HashMap::new()),
            room,
        }
    }

    fn topic(&self, topic: &str) -> TopicPublisher {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics
            .entry(topic.to_string())
            .or_insert_with(|| {
                self.base
                    .publisher(self.config.topic_path(topic))
                    .set_message_count_threshold(self.config.batch_max_messages)
                    .set_delay_threshold(Duration::from_millis(self.config.batch_max_delay_ms))
                    .build()
            })
            .clone()
    }
}

#[async_trait]
impl Publisher for PubSubPublisher {
    async fn publish(&self, message: OutgoingMessage) -> Result<DeliveryReceipt, BrokerError> {
        check_resource_id("topic", &message.topic)?;
        check_attributes(&message)?;
        let permit = self
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BrokerError::closed())?;
        let mut attributes: HashMap<String, String> = conversions::outgoing_headers(&message)
            .into_iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        if message.payload.is_empty() && attributes.is_empty() {
            attributes.insert(EMPTY_MARKER.to_string(), "1".to_string());
        }
        let ordering_key = ordering_key(&message)?;
        let mut sdk_message = Message::new()
            .set_data(message.payload)
            .set_attributes(attributes);
        if let Some(key) = &ordering_key {
            sdk_message = sdk_message.set_ordering_key(key.clone());
        }
        let publisher = self.topic(&message.topic);
        let topic = message.topic;
        let future = publisher.publish(sdk_message);
        let receipt = async move {
            let result = future.await;
            drop(permit);
            match result {
                Ok(_id) => Ok(()),
                Err(e) => {
                    // A failure pauses its ordering key so later messages cannot overtake
                    // it; the caller decides whether to publish again, so resume.
                    if let Some(key) = ordering_key {
                        publisher.resume_publish(key);
                    }
                    Err(match e {
                        google_cloud_pubsub::error::PublishError::Rpc(e) => {
                            rpc_error(&format!("publishing to topic {topic:?}"), e)
                        }
                        other => BrokerError::unavailable(format!("publishing to topic {topic:?}"))
                            .with_source(other),
                    })
                }
            }
        };
        Ok(DeliveryReceipt::new(receipt.boxed()))
    }

    async fn flush(&self, timeout: Duration) -> Result<(), BrokerError> {
        let publishers: Vec<TopicPublisher> = self
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let flushes = futures::future::join_all(publishers.iter().map(|p| p.flush()));
        tokio::time::timeout(timeout, flushes)
            .await
            .map(|_| ())
            .map_err(|_| {
                BrokerError::timeout(format!("flushing Pub/Sub publishes took over {timeout:?}"))
            })
    }
}
