//! Publishing to Kafka: enqueue into librdkafka's local queue and return at once, waiting
//! only while the queue is full (never dropping); the receipt resolves with the broker's
//! acknowledgement.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::KafkaConfig;
use super::errors::{ClientErrors, config_error, kafka_error};
use crate::outage::OutageLog;
use crate::{
    BrokerError, DeliveryReceipt, OutgoingMessage, Publisher, check_topic_name, conversions,
};

/// How long to wait between attempts to enqueue while librdkafka's local queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);

/// `message`'s headers as Kafka record headers (with its content type; see `conversions`).
pub(super) fn record_headers(message: &OutgoingMessage) -> OwnedHeaders {
    let sent_headers = conversions::outgoing_headers(message);
    let mut headers = OwnedHeaders::new_with_capacity(sent_headers.len());
    for (key, value) in sent_headers {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}

pub(super) struct KafkaPublisher {
    producer: FutureProducer<ClientErrors>,
    outage: Arc<OutageLog>,
}

impl KafkaPublisher {
    /// A producer for the cluster `config` names; `embedded` tunes it for the embedded broker.
    pub(super) fn new(kafka: &KafkaConfig, embedded: bool) -> Result<Self, BrokerError> {
        let mut config = kafka.client_config();
        let mut defaults = vec![("enable.idempotence", "true")];
        if !embedded {
            defaults.push(("linger.ms", "2"));
        } else {
            // On loopback a batch fills in well under a millisecond: measured side by
            // side (with fetch.wait.max.ms 1 instead of 5), the paced demo's p50 fell
            // from 11 to 4.7 ms; full-speed throughput moved within the machine's
            // noise (one sitting even, another up to 15 % lower).
            defaults.push(("linger.ms", "0.5"));
            // The embedded (mock) broker keeps at most 5 MiB per partition and drops
            // the oldest data beyond that, read or not. The sticky partitioner sends a
            // run of keyless messages to one partition, which measured 5,800 of the
            // demo's 10,000 requests in one partition and lost the first 245 before the
            // classifier's group had joined. Spreading keyless messages message by
            // message keeps each partition's share, and so what a lagging reader can
            // lose, an eighth as large.
            defaults.push(("sticky.partitioning.linger.ms", "0"));
        }
        for (key, value) in defaults {
            if !kafka.properties.contains_key(key) {
                config.set(key, value);
            }
        }
        let outage = Arc::new(OutageLog::new(format!(
            "the Kafka producer for {}",
            kafka.bootstrap_servers
        )));
        let producer: FutureProducer<ClientErrors> = config
            .create_with_context(ClientErrors {
                outage: outage.clone(),
            })
            .map_err(config_error)?;
        Ok(Self { producer, outage })
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, message: OutgoingMessage) -> Result<DeliveryReceipt, BrokerError> {
        check_topic_name(&message.topic)?;
        let mut record = FutureRecord::to(&message.topic)
            .payload(&message.payload)
            .headers(record_headers(&message));
        if let Some(key) = conversions::outgoing_key(&message) {
            record = record.key(key);
        }
        let topic = message.topic.clone();
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    let outage = self.outage.clone();
                    let receipt = delivery.map(move |outcome| match outcome {
                        Ok(Ok(_)) => {
                            outage.received();
                            Ok(())
                        }
                        Ok(Err((e, _))) => {
                            Err(kafka_error(&format!("delivering to topic {topic:?}"), &e))
                        }
                        Err(_) => Err(BrokerError::unavailable(
                            "the producer shut down before the broker answered",
                        )),
                    });
                    return Ok(DeliveryReceipt::new(receipt.boxed()));
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((e, _)) => return Err(kafka_error(&format!("publishing to {topic:?}"), &e)),
            }
        }
    }

    async fn flush(&self, timeout: Duration) -> Result<(), BrokerError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| BrokerError::unavailable("flushing stopped").with_source(e))?
            .map_err(|e| kafka_error("flushing the producer", &e))
    }
}
