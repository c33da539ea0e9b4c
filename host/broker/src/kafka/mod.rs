//! The Kafka backend, on `rdkafka` (librdkafka).
//!
//! Delivery semantics: **at-least-once**. A consumer runs with `enable.auto.offset.store=false`:
//! an offset is stored for the next (auto-)commit only after the handler of that message and of
//! every earlier message of its partition returned `Ok` (`offsets.rs`). A message that is
//! not acknowledged before the member leaves or dies is delivered again to the next member of
//! the group; the sink must tolerate duplicates.
//!
//! Publishing enqueues into librdkafka's local queue and returns at once; when the queue is
//! full it waits and retries, it never drops. The [`DeliveryReceipt`] resolves with the
//! broker's acknowledgement. The producer is idempotent by default, so librdkafka's retries
//! neither duplicate nor reorder messages of one partition.
//!
//! This follows rust-rdkafka's `examples/at_least_once.rs` recipe (store an offset only once
//! its message is processed; let auto-commit send what was stored), extended to messages that
//! finish out of order.
//!
//! A subscription asked for with [`Guarantee::ExactlyOnce`] is **exactly-once** instead: a
//! message is acknowledged together with what its handling produced, in one Kafka transaction
//! (`transactions.rs`). The embedded broker refuses it (its mock cluster never stores the
//! offsets committed in a transaction).

mod admin;
mod config;
pub mod embedded;
mod errors;
mod offsets;
mod publisher;
mod spread;
mod subscriber;
mod transactions;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::producer::{BaseProducer, Producer};

pub use config::KafkaConfig;
pub use embedded::EmbeddedKafka;
use errors::{ConnectionErrors, config_error, connection_fix, error_code};
use publisher::KafkaPublisher;
use subscriber::KafkaSubscriber;

use crate::{
    Broker, BrokerError, ErrorKind, Guarantee, Publisher, Subscriber, SubscriptionSpec, TopicInfo,
    TopicSpec,
};

/// Why the embedded broker cannot run an exactly-once subscription (measured, and read in
/// librdkafka 2.12's `rdkafka_mock_handlers.c`).
const EMBEDDED_HAS_NO_TRANSACTIONS: &str = "the embedded broker (librdkafka's mock cluster) \
    cannot run exactly-once: it accepts transactions but never stores the offsets committed \
    in them, so a restarted member would handle everything again. Use a Kafka cluster that \
    keeps transactions (Apache Kafka, Redpanda, Tansu; not `switchyard broker`, the same mock) \
    for exactly-once, or `delivery = \"at-least-once\"`";

/// A Kafka cluster (or the embedded broker).
pub struct Kafka {
    config: KafkaConfig,
    // Declared before `embedded` so the producer is gone before the embedded broker stops.
    producer: tokio::sync::OnceCell<Arc<KafkaPublisher>>,
    embedded: Option<Arc<EmbeddedKafka>>,
    /// Whether the cluster is librdkafka's mock (the embedded broker, here or in another
    /// process such as `switchyard broker`), decided once at connection: the producer is tuned
    /// for it, and topic administration knows it has no CreateTopics or DeleteTopics API and
    /// creates topics on first use.
    on_mock: bool,
    /// Whether the cluster keeps transactional offsets, once asked.
    keeps_transactions: tokio::sync::OnceCell<bool>,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("bootstrap_servers", &self.config.bootstrap_servers)
            .field("embedded", &self.embedded.is_some())
            .finish()
    }
}

impl Kafka {
    /// Connects to a cluster, failing with a clear error if it cannot be reached within
    /// `connect_timeout_ms`.
    pub async fn connect(config: KafkaConfig) -> Result<Self, BrokerError> {
        let mut kafka = Self {
            config,
            embedded: None,
            on_mock: false,
            producer: tokio::sync::OnceCell::new(),
            keeps_transactions: tokio::sync::OnceCell::new(),
        };
        kafka.on_mock = kafka.check_reachable().await?;
        Ok(kafka)
    }

    /// Uses an embedded broker of this process; topics are created through its mock API.
    pub fn embedded(broker: Arc<EmbeddedKafka>) -> Self {
        let config = KafkaConfig::for_embedded(broker.bootstrap_servers());
        Self {
            config,
            embedded: Some(broker),
            on_mock: true,
            producer: tokio::sync::OnceCell::new(),
            keeps_transactions: tokio::sync::OnceCell::new(),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Refuses exactly-once on a cluster that does not keep the offsets its transactions
    /// commit (see [`transactions::keeps_transactional_offsets`]); asked once per client.
    async fn check_keeps_transactions(&self, topics: &[String]) -> Result<(), BrokerError> {
        let kept = self
            .keeps_transactions
            .get_or_try_init(|| async {
                let config = self.config.clone();
                let owned = topics.to_vec();
                tokio::task::spawn_blocking(move || {
                    for topic in &owned {
                        if let Some(kept) =
                            transactions::keeps_transactional_offsets(&config, topic)?
                        {
                            return Ok(Some(kept));
                        }
                    }
                    Ok(None)
                })
                .await
                .map_err(|e| {
                    BrokerError::unavailable("asking the cluster about transactions stopped")
                        .with_source(e)
                })?
                // None (no subscribed topic exists yet): ask again next time.
                .and_then(|kept: Option<bool>| {
                    kept.ok_or_else(|| {
                        BrokerError::new(
                            ErrorKind::NotFound,
                            format!(
                                "exactly-once needs its topics to exist first ({:?} do not): \
                                 create them, or let the host create them (create_topics)",
                                topics
                            ),
                        )
                    })
                })
            })
            .await?;
        if *kept {
            Ok(())
        } else {
            Err(BrokerError::config(format!(
                "the Kafka cluster at {} does not keep the offsets committed in transactions \
                 (asked: a committed transaction's offset was not stored), so exactly-once \
                 cannot hold there; librdkafka's mock cluster, which `switchyard broker` is, \
                 behaves so. Use a cluster that keeps transactions (Apache Kafka, Redpanda, \
                 Tansu), or `delivery = \"at-least-once\"`",
                self.config.bootstrap_servers
            )))
        }
    }

    /// Fails with a clear error when the cluster cannot be reached; says whether it is
    /// librdkafka's mock cluster.
    async fn check_reachable(&self) -> Result<bool, BrokerError> {
        let config = self.config.clone();
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        // A producer, because polling it serves the error callback (an admin client's does not).
        let probe: BaseProducer<ConnectionErrors> = config
            .client_config()
            .create_with_context(ConnectionErrors::default())
            .map_err(config_error)?;
        let (result, probe) = tokio::task::spawn_blocking(move || {
            let result = probe
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| admin::is_mock_cluster(probe.client(), timeout));
            if result.is_err() {
                // Serves the queued error events (one per poll of a zero timeout).
                probe.poll(Duration::from_millis(100));
            }
            (result, probe)
        })
        .await
        .map_err(|e| BrokerError::unavailable("the connection check stopped").with_source(e))?;
        result.map_err(|e| {
            let reason = probe.context().last();
            let (kind, fix) = reason.as_deref().and_then(connection_fix).unwrap_or((
                ErrorKind::Unavailable,
                "Is the broker running? Start the embedded one with `switchyard broker`, or \
                     pass the right address (--broker kafka://HOST:PORT)",
            ));
            let reason = reason.map(|r| format!(" ({r})")).unwrap_or_default();
            BrokerError::new(
                kind,
                format!(
                    "cannot reach Kafka at {} within {} ms{reason}. {fix}",
                    self.config.bootstrap_servers, self.config.connect_timeout_ms,
                ),
            )
            .with_code_if(error_code(&e))
            .with_source(e)
        })
    }
}

#[async_trait]
impl Broker for Kafka {
    fn messaging_system(&self) -> &'static str {
        crate::system::KAFKA
    }

    fn describe(&self) -> String {
        match self.embedded {
            Some(_) => format!("embedded ({})", self.config.bootstrap_servers),
            None => format!("kafka://{}", self.config.bootstrap_servers),
        }
    }

    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), BrokerError> {
        self.create_missing(topics).await
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>, BrokerError> {
        self.topic_list().await
    }

    async fn create_topic(&self, topic: &TopicSpec) -> Result<bool, BrokerError> {
        self.create_one(topic).await
    }

    async fn delete_topic(&self, name: &str) -> Result<bool, BrokerError> {
        self.delete_one(name).await
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>, BrokerError> {
        let publisher = self
            .producer
            .get_or_try_init(|| async {
                KafkaPublisher::new(&self.config, self.on_mock).map(Arc::new)
            })
            .await?;
        Ok(publisher.clone())
    }

    async fn subscribe(&self, spec: &SubscriptionSpec) -> Result<Arc<dyn Subscriber>, BrokerError> {
        if matches!(spec.guarantee, Guarantee::ExactlyOnce { .. }) {
            self.offers_exactly_once(&spec.topics).await?;
        }
        Ok(Arc::new(
            KafkaSubscriber::subscribe_at_start(&self.config, spec).await?,
        ))
    }

    async fn offers_exactly_once(&self, topics: &[String]) -> Result<(), BrokerError> {
        if self.embedded.is_some() {
            return Err(BrokerError::config(EMBEDDED_HAS_NO_TRANSACTIONS));
        }
        self.check_keeps_transactions(topics).await
    }
}
