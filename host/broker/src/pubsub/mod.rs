//! The Google Cloud Pub/Sub backend, on `google-cloud-pubsub` (Google's official SDK).
//!
//! Delivery semantics: **at-least-once** by default. A message is acked only when the runtime
//! (or the user of [`Subscriber`]) settles it; until then the SDK extends its lease
//! automatically. A message that is never acked, or is nacked, is delivered again, to this
//! subscriber or another one of the same subscription. The emulator, like Pub/Sub without
//! exactly-once enabled, may deliver a message more than once even after an ack; a member
//! acknowledges again, without passing it on, a message it acknowledged recently (`AckedIds`).
//!
//! [`Guarantee::ExactlyOnce`](crate::Guarantee::ExactlyOnce) subscribes with Pub/Sub's
//! **exactly-once delivery** (the subscription is created with it; one that exists without it
//! is refused, with the command that turns it on). [`crate::Delivery::ack_with`] then
//! publishes the outputs, waits until Pub/Sub stored every one, and only then acknowledges
//! with a *confirmed* ack: once confirmed, Pub/Sub never delivers the message again (the
//! emulator honours it: an ack whose lease expired, or a second ack, is refused with
//! `EXACTLY_ONCE_ACKID_FAILURE`, where an at-least-once subscription accepts both silently).
//! Pub/Sub has no transaction that takes a publish and an ack together, so this is weaker
//! than Kafka's: a host that dies, or an ack that is refused, between the outputs and the
//! confirmation leaves the message to be handled again and its outputs sent again. What it
//! removes is every other duplicate: a message handled and confirmed is never handled again.
//!
//! Kafka's consumer group maps to a subscription: members of one group are clients of one
//! subscription and share its messages. A subscription belongs to one topic, so a group
//! subscribed to several topics becomes one subscription per topic, named `GROUP--TOPIC`
//! (just `GROUP` for a single topic) unless the configuration names them.
//!
//! Publishing hands each message to the SDK's batching publisher and returns at once; at most
//! `max_outstanding_publishes` messages wait for the server at a time, further `publish` calls
//! wait for room (backpressure) and never drop. Keys become ordering keys; a subscription that
//! switchyard creates has message ordering enabled, so messages of one key arrive in order
//! (except an exactly-once one: see `Resources::ensure_subscription` for why).
//!
//! The SDK ignores `PUBSUB_EMULATOR_HOST`; this backend honours it (endpoint plus anonymous
//! credentials), as it honours an explicit `endpoint`. Everything else uses Application
//! Default Credentials.

mod config;
pub mod emulator;
mod errors;
mod publisher;
mod resources;
mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::{
    BasePublisher, Subscriber as SdkSubscriber, SubscriptionAdmin, TopicAdmin,
};

pub use config::PubSubConfig;
pub use emulator::PubSubEmulator;
use errors::{is_code, rpc_error};
use publisher::PubSubPublisher;
pub use resources::check_resource_id;
use resources::{Resources, check_project};
use subscriber::PubSubSubscriber;

use crate::{Broker, BrokerError, Publisher, Subscriber, SubscriptionSpec, TopicInfo, TopicSpec};

/// Attribute that stands in for an empty message: Pub/Sub refuses a message with neither data
/// nor attributes.
const EMPTY_MARKER: &str = "switchyard-empty";

/// Applies the endpoint and credentials a config calls for to any of the SDK's builders.
macro_rules! configure {
    ($builder:expr, $config:expr) => {{
        let (endpoint, anonymous) = $config.resolved_endpoint();
        let mut builder = $builder;
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if anonymous {
            builder = builder.with_credentials(
                google_cloud_auth::credentials::anonymous::Builder::new().build(),
            );
        }
        builder
    }};
}

/// A Pub/Sub project, reached through Google's SDK.
pub struct PubSub {
    resources: Arc<Resources>,
    base_publisher: BasePublisher,
    subscriber: SdkSubscriber,
    publisher: tokio::sync::OnceCell<Arc<PubSubPublisher>>,
}

impl std::fmt::Debug for PubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSub")
            .field("config", self.config())
            .finish_non_exhaustive()
    }
}

impl PubSub {
    /// Connects to a project, failing with a clear error if the service does not answer within
    /// `connect_timeout_ms`.
    pub async fn connect(config: PubSubConfig) -> Result<Self, BrokerError> {
        check_project(&config.project)?;
        let build_error = |e: google_cloud_gax::client_builder::Error| {
            BrokerError::config("cannot set up the Pub/Sub client").with_source(e)
        };
        let topics = configure!(TopicAdmin::builder(), config)
            .build()
            .await
            .map_err(build_error)?;
        let subscriptions = configure!(SubscriptionAdmin::builder(), config)
            .build()
            .await
            .map_err(build_error)?;
        let base_publisher = configure!(BasePublisher::builder(), config)
            .build()
            .await
            .map_err(build_error)?;
        let subscriber = configure!(SdkSubscriber::builder(), config)
            .build()
            .await
            .map_err(build_error)?;
        let pubsub = Self {
            resources: Arc::new(Resources {
                config,
                topics,
                subscriptions,
            }),
            base_publisher,
            subscriber,
            publisher: tokio::sync::OnceCell::new(),
        };
        pubsub.check_reachable().await?;
        Ok(pubsub)
    }

    /// The settings in use.
    pub fn config(&self) -> &PubSubConfig {
        &self.resources.config
    }

    fn describe_endpoint(&self) -> String {
        self.resources
            .config
            .resolved_endpoint()
            .0
            .unwrap_or_else(|| "pubsub.googleapis.com".into())
    }

    async fn check_reachable(&self) -> Result<(), BrokerError> {
        let timeout = Duration::from_millis(self.resources.config.connect_timeout_ms);
        let probe = self
            .resources
            .topics
            .list_topics()
            .set_project(format!("projects/{}", self.resources.config.project))
            .set_page_size(1)
            .send();
        let failure = |detail: String| {
            BrokerError::unavailable(format!(
                "cannot reach Pub/Sub at {} within {} ms ({detail}). Is the emulator running? \
                 Start one with `just pubsub-emulator`, or set PUBSUB_EMULATOR_HOST / the \
                 endpoint",
                self.describe_endpoint(),
                self.resources.config.connect_timeout_ms
            ))
        };
        match tokio::time::timeout(timeout, probe).await {
            Err(_) => Err(failure("no answer".into())),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.status().is_some() && !is_code(&e, Code::Unavailable) => {
                // The service answered, if only to refuse: it is reachable; the refusal
                // surfaces with the operation that needs the permission.
                tracing::debug!("Pub/Sub answered the reachability probe with {e}");
                Ok(())
            }
            Ok(Err(e)) => Err(failure(e.to_string())),
        }
    }
}

#[async_trait]
impl Broker for PubSub {
    fn messaging_system(&self) -> &'static str {
        crate::system::GCP_PUBSUB
    }

    fn describe(&self) -> String {
        format!(
            "pubsub://{} ({})",
            self.resources.config.project,
            self.describe_endpoint()
        )
    }

    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), BrokerError> {
        if !self.resources.config.create_resources {
            return Ok(());
        }
        for topic in topics {
            self.resources.ensure_topic(&topic.name).await?;
        }
        Ok(())
    }

    async fn ensure_kept_topics(&self, topics: &[TopicSpec]) -> Result<(), BrokerError> {
        if !self.resources.config.create_resources {
            return Ok(());
        }
        for topic in topics {
            self.resources.ensure_topic(&topic.name).await?;
            self.resources
                .ensure_subscription(&topic.name, &topic.name, false)
                .await?;
        }
        Ok(())
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>, BrokerError> {
        use google_cloud_gax::paginator::ItemPaginator;
        let config = &self.resources.config;
        let prefix = config.topic_path("");
        let mut pages = self
            .resources
            .topics
            .list_topics()
            .set_project(format!("projects/{}", config.project))
            .by_item();
        let mut topics = Vec::new();
        while let Some(topic) = pages.next().await {
            let topic = topic.map_err(|e| rpc_error("listing topics", e))?;
            let name = topic.name.strip_prefix(&prefix).unwrap_or(&topic.name);
            topics.push(TopicInfo {
                name: name.to_string(),
                partitions: None,
            });
        }
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(topics)
    }

    async fn create_topic(&self, topic: &TopicSpec) -> Result<bool, BrokerError> {
        self.resources.ensure_topic(&topic.name).await
    }

    async fn delete_topic(&self, name: &str) -> Result<bool, BrokerError> {
        check_resource_id("topic", name)?;
        let result = self
            .resources
            .topics
            .delete_topic()
            .set_topic(self.resources.config.topic_path(name))
            .send()
            .await;
        match result {
            Ok(()) => Ok(true),
            Err(e) if is_code(&e, Code::NotFound) => Ok(false),
            Err(e) => Err(rpc_error(&format!("deleting topic {name:?}"), e)),
        }
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>, BrokerError> {
        let publisher = self
            .publisher
            .get_or_init(|| async {
                Arc::new(PubSubPublisher::new(
                    self.base_publisher.clone(),
                    self.resources.config.clone(),
                ))
            })
            .await;
        Ok(publisher.clone())
    }

    async fn subscribe(&self, spec: &SubscriptionSpec) -> Result<Arc<dyn Subscriber>, BrokerError> {
        Ok(Arc::new(PubSubSubscriber::subscribe(self, spec).await?))
    }

    /// Every Pub/Sub subscription can have exactly-once delivery (see the module's docs for
    /// what it promises: a confirmed acknowledgement, not a transaction).
    async fn offers_exactly_once(&self, _topics: &[String]) -> Result<(), BrokerError> {
        Ok(())
    }
}
