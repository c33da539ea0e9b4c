//! Publishing to Kafka: enqueue into librdkafka's local queue and return at once, waiting
//! only while the queue is full (never dropping); the receipt resolves with the broker's
//! acknowledgement. On the embedded broker (librdkafka's mock cluster) it also chooses the
//! partition of keyless messages (`spread.rs`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::KafkaConfig;
use super::errors::{ClientErrors, config_error, kafka_error};
use super::spread::{KeylessSpread, LookUp};
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
    /// Chooses keyless messages' partitions; on the embedded broker only, unless the
    /// properties set `sticky.partitioning.linger.ms` (librdkafka's sticky partitioner).
    keyless: Option<Arc<KeylessSpread>>,
}

impl KafkaPublisher {
    /// A producer for the cluster `config` names; `on_mock` tunes it for the embedded broker
    /// (librdkafka's mock cluster, in this process or another).
    pub(super) fn new(kafka: &KafkaConfig, on_mock: bool) -> Result<Self, BrokerError> {
        let mut config = kafka.client_config();
        let mut defaults = vec![("enable.idempotence", "true")];
        if !on_mock {
            defaults.push(("linger.ms", "2"));
        } else {
            // On loopback a batch fills in well under a millisecond. Measured side by
            // side, 0.5 ms (with fetch.wait.max.ms 1 instead of 5) took the paced demo's
            // p50 from 11 to 4.7 ms; with runs (below), 1 ms gained nothing measurable
            // at full rate (60,000 requests: 11,000 and 10,832 images/s, against 10,459
            // and 10,959).
            defaults.push(("linger.ms", "0.5"));
            // Keyless messages go in runs of bounded size to one partition (`spread.rs`);
            // before a topic's partition count is known, one by one to any partition,
            // never many to one: the embedded broker keeps at most 5 MiB per partition.
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
        let keyless = (on_mock
            && !kafka
                .properties
                .contains_key("sticky.partitioning.linger.ms"))
        .then(|| Arc::new(KeylessSpread::new()));
        Ok(Self {
            producer,
            outage,
            keyless,
        })
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, message: OutgoingMessage) -> Result<DeliveryReceipt, BrokerError> {
        check_topic_name(&message.topic)?;
        let mut record = FutureRecord::to(&message.topic)
            .payload(&message.payload)
            .headers(record_headers(&message));
        let key = conversions::outgoing_key(&message);
        if let Some(key) = key {
            record = record.key(key);
        } else if let Some(spread) = &self.keyless {
            let size = message.payload.len()
                + message
                    .headers
                    .iter()
                    .map(|(name, value)| name.len() + value.len())
                    .sum::<usize>();
            let mut placement = spread.place(&message.topic, size);
            match placement.look_up {
                LookUp::No => {}
                LookUp::Refresh => drop(spread.look_up(&self.producer, &message.topic)),
                LookUp::First => {
                    if let Err(e) = spread.look_up(&self.producer, &message.topic).await {
                        tracing::debug!("looking up the partitions of {:?}: {e}", message.topic);
                    }
                    placement = spread.place(&message.topic, size);
                }
            }
            if let Some(partition) = placement.partition {
                record = record.partition(partition);
            }
        }
        let topic = message.topic.clone();
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    let outage = self.outage.clone();
                    let keyless = self.keyless.clone();
                    let receipt = delivery.map(move |outcome| match outcome {
                        Ok(Ok(_)) => {
                            outage.received();
                            Ok(())
                        }
                        Ok(Err((e, _))) => {
                            if let (Some(spread), Some(RDKafkaErrorCode::UnknownPartition)) =
                                (&keyless, e.rdkafka_error_code())
                            {
                                spread.forget(&topic);
                            }
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
                Err((
                    KafkaError::MessageProduction(RDKafkaErrorCode::UnknownPartition),
                    mut returned,
                )) if key.is_none() && returned.partition.is_some() => {
                    // The topic has fewer partitions than looked up (made again): let
                    // librdkafka choose until the count is looked up anew.
                    if let Some(spread) = &self.keyless {
                        spread.forget(&message.topic);
                    }
                    returned.partition = None;
                    record = returned;
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
