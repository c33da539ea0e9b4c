//! The Google Cloud Pub/Sub backend, on `google-cloud-pubsub` (Google's official SDK).
//!
//! Delivery semantics: **at-least-once**. A message is acked only when the runtime (or the
//! user of [`Subscriber`]) settles it; until then the SDK extends its lease automatically. A
//! message that is never acked, or is nacked, is delivered again, to this subscriber or
//! another one of the same subscription. The emulator, like Pub/Sub without exactly-once
//! enabled, may deliver a message more than once even after an ack; a member acknowledges
//! again, without passing it on, a message it acknowledged recently ([`AckedIds`]).
//!
//! Kafka's consumer group maps to a subscription: members of one group are clients of one
//! subscription and share its messages. A subscription belongs to one topic, so a group
//! subscribed to several topics becomes one subscription per topic, named `GROUP--TOPIC`
//! (just `GROUP` for a single topic) unless the configuration names them.
//!
//! Publishing hands each message to the SDK's batching publisher and returns at once; at most
//! `max_outstanding_publishes` messages wait for the server at a time, further `publish` calls
//! wait for room (backpressure) and never drop. Keys become ordering keys; a subscription that
//! switchyard creates has message ordering enabled, so messages of one key arrive in order.
//!
//! The SDK ignores `PUBSUB_EMULATOR_HOST`; this backend honours it (endpoint plus anonymous
//! credentials), as it honours an explicit `endpoint`. Everything else uses Application
//! Default Credentials.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::{
    BasePublisher, Publisher as TopicPublisher, Subscriber as SdkSubscriber,
};
use google_cloud_pubsub::client::{SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::model::{DeadLetterPolicy, Message};
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownBehavior};
use serde::Deserialize;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use super::outage::OutageLog;
use super::{
    Broker, BrokerError, Delivery, DeliveryReceipt, ErrorKind, OutgoingMessage, Publisher, Settle,
    StartPosition, Subscriber, SubscriptionSpec, TopicInfo, TopicSpec, wire,
};

/// Attribute that stands in for an empty message: Pub/Sub refuses a message with neither data
/// nor attributes.
const EMPTY_MARKER: &str = "switchyard-empty";

/// Settings of the Pub/Sub backend (the `[broker.pubsub]` manifest section).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PubSubConfig {
    /// The Google Cloud project.
    pub project: String,
    /// The endpoint, such as `http://127.0.0.1:8085` for an emulator. Without it:
    /// `$PUBSUB_EMULATOR_HOST` if set, else Google's endpoint.
    pub endpoint: Option<String>,
    /// Use anonymous credentials (the emulator's); implied by an emulator endpoint from
    /// `$PUBSUB_EMULATOR_HOST`. Otherwise Application Default Credentials.
    #[serde(default)]
    pub anonymous: bool,
    /// Create missing topics and subscriptions at start-up. Turn it off in production
    /// projects where the application may not administer them.
    #[serde(default = "default_true")]
    pub create_resources: bool,
    /// Explicit subscription names per topic, overriding the `GROUP--TOPIC` convention.
    #[serde(default)]
    pub subscriptions: BTreeMap<String, String>,
    /// Ack deadline of subscriptions switchyard creates, in seconds (10 to 600). The SDK
    /// extends leases automatically while a message is being handled, so a short deadline
    /// costs nothing and bounds how long a message leased by a client that vanished (or was
    /// closing) waits before going to another one.
    #[serde(default = "default_ack_deadline")]
    pub ack_deadline_s: i32,
    /// Streaming pulls per subscription (one stream carries about 2,000 messages/s on the
    /// emulator).
    #[serde(default = "default_streams")]
    pub streams: usize,
    /// Flow control: messages received but not yet settled, per stream.
    #[serde(default = "default_outstanding")]
    pub max_outstanding_messages: i64,
    /// Messages published but not yet confirmed by the server before `publish` waits.
    #[serde(default = "default_outstanding_publishes")]
    pub max_outstanding_publishes: usize,
    /// Publish batching: send a batch once it holds this many messages...
    #[serde(default = "default_batch_messages")]
    pub batch_max_messages: u32,
    /// ...or after this many milliseconds.
    #[serde(default = "default_batch_delay_ms")]
    pub batch_max_delay_ms: u64,
    /// How long to wait for the service at start-up, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Dead-letter policy for subscriptions switchyard creates: after
    /// `max_delivery_attempts` deliveries (5 to 100) Pub/Sub moves a message to this topic.
    pub dead_letter_topic: Option<String>,
    /// Deliveries before a message is dead-lettered (with `dead_letter_topic`).
    #[serde(default = "default_max_delivery_attempts")]
    pub max_delivery_attempts: i32,
}

fn default_max_delivery_attempts() -> i32 {
    5
}

fn default_true() -> bool {
    true
}
fn default_ack_deadline() -> i32 {
    10
}
fn default_streams() -> usize {
    4
}
fn default_outstanding() -> i64 {
    1000
}
fn default_outstanding_publishes() -> usize {
    10_000
}
fn default_batch_messages() -> u32 {
    100
}
fn default_batch_delay_ms() -> u64 {
    5
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}

impl PubSubConfig {
    /// Settings for `project`, defaults otherwise.
    pub fn new(project: impl Into<String>) -> Self {
        Self {
            project: project.into(),
            endpoint: None,
            anonymous: false,
            create_resources: true,
            subscriptions: BTreeMap::new(),
            ack_deadline_s: default_ack_deadline(),
            streams: default_streams(),
            max_outstanding_messages: default_outstanding(),
            max_outstanding_publishes: default_outstanding_publishes(),
            batch_max_messages: default_batch_messages(),
            batch_max_delay_ms: default_batch_delay_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            dead_letter_topic: None,
            max_delivery_attempts: default_max_delivery_attempts(),
        }
    }

    /// The endpoint and whether to use anonymous credentials, after `$PUBSUB_EMULATOR_HOST`.
    fn resolved_endpoint(&self) -> (Option<String>, bool) {
        if let Some(endpoint) = &self.endpoint {
            return (Some(endpoint.clone()), self.anonymous);
        }
        match std::env::var("PUBSUB_EMULATOR_HOST") {
            Ok(host) if !host.is_empty() => {
                let endpoint = if host.contains("://") {
                    host
                } else {
                    format!("http://{host}")
                };
                (Some(endpoint), true)
            }
            _ => (None, self.anonymous),
        }
    }

    /// The full resource name of a topic in this project (`projects/P/topics/T`).
    pub fn topic_path(&self, topic: &str) -> String {
        format!("projects/{}/topics/{topic}", self.project)
    }

    /// The full resource name of a subscription in this project.
    pub fn subscription_path(&self, subscription: &str) -> String {
        format!("projects/{}/subscriptions/{subscription}", self.project)
    }

    /// The subscription a group uses for a topic.
    pub fn subscription_for(&self, group: &str, topic: &str, topics_in_group: usize) -> String {
        if let Some(name) = self.subscriptions.get(topic) {
            return name.clone();
        }
        if topics_in_group == 1 {
            group.to_string()
        } else {
            format!("{group}--{topic}")
        }
    }
}

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

/// A Pub/Sub error (or a publish's shared one) as a [`BrokerError`]: its kind by the gRPC
/// code, the code, and the error.
fn rpc_error<E>(what: &str, e: E) -> BrokerError
where
    E: std::borrow::Borrow<google_cloud_pubsub::Error> + std::error::Error + Send + Sync + 'static,
{
    let code = e.borrow().status().map(|s| s.code);
    let (kind, message) = match code {
        Some(Code::NotFound) => (
            ErrorKind::NotFound,
            format!("{what}: not found. Create it, or set create_resources = true"),
        ),
        Some(Code::PermissionDenied | Code::Unauthenticated) => (
            ErrorKind::PermissionDenied,
            format!(
                "{what}: permission denied. Check the credentials (Application Default \
                 Credentials, or GOOGLE_APPLICATION_CREDENTIALS) and their IAM roles"
            ),
        ),
        Some(Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange) => {
            (ErrorKind::Rejected, what.to_string())
        }
        Some(Code::DeadlineExceeded) => (ErrorKind::Timeout, what.to_string()),
        Some(Code::Cancelled) => (ErrorKind::Closed, what.to_string()),
        _ if e.borrow().is_timeout() => (ErrorKind::Timeout, what.to_string()),
        _ => (ErrorKind::Unavailable, what.to_string()),
    };
    BrokerError::new(kind, message)
        .with_code_if(code)
        .with_source(e)
}

fn is_code(e: &google_cloud_pubsub::Error, wanted: Code) -> bool {
    e.status().is_some_and(|s| s.code == wanted)
}

/// Checks a Pub/Sub resource id: 3 to 255 characters, starting with a letter, of letters,
/// digits and `-_.~+%`, not starting with `goog`.
pub fn check_resource_id(kind: &str, id: &str) -> Result<(), BrokerError> {
    let legal = |c: char| c.is_ascii_alphanumeric() || "-_.~+%".contains(c);
    let ok = (3..=255).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id.chars().all(legal)
        && !id.to_ascii_lowercase().starts_with("goog");
    if ok {
        Ok(())
    } else {
        Err(BrokerError::rejected(format!(
            "{id:?} is not a valid Pub/Sub {kind} name: use 3 to 255 letters, digits or -_.~+%, \
             starting with a letter and not with \"goog\""
        )))
    }
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

/// The admin clients, shared with the subscribers' pumps so that, with `create_resources`, a
/// subscription that disappears (an emulator restarted, someone deleted it) is created again.
struct Resources {
    config: PubSubConfig,
    topics: TopicAdmin,
    subscriptions: SubscriptionAdmin,
}

impl Resources {
    /// Creates a topic unless it exists; says whether it created it.
    async fn ensure_topic(&self, topic: &str) -> Result<bool, BrokerError> {
        check_resource_id("topic", topic)?;
        let path = self.config.topic_path(topic);
        match self.topics.create_topic().set_name(&path).send().await {
            Ok(_) => Ok(true),
            Err(e) if is_code(&e, Code::AlreadyExists) => Ok(false),
            Err(e) => Err(rpc_error(&format!("creating topic {topic:?}"), e)),
        }
    }

    /// Creates a subscription unless it exists; says whether it created it.
    async fn ensure_subscription(
        &self,
        subscription: &str,
        topic: &str,
    ) -> Result<bool, BrokerError> {
        check_resource_id("subscription", subscription)?;
        let mut request = self
            .subscriptions
            .create_subscription()
            .set_name(self.config.subscription_path(subscription))
            .set_topic(self.config.topic_path(topic))
            .set_ack_deadline_seconds(self.config.ack_deadline_s)
            .set_enable_message_ordering(true);
        if let Some(dead_letters) = &self.config.dead_letter_topic {
            self.ensure_topic(dead_letters).await?;
            request = request.set_dead_letter_policy(
                DeadLetterPolicy::new()
                    .set_dead_letter_topic(self.config.topic_path(dead_letters))
                    .set_max_delivery_attempts(self.config.max_delivery_attempts.clamp(5, 100)),
            );
        }
        let result = request.send().await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_code(&e, Code::AlreadyExists) => Ok(false),
            Err(e) => Err(rpc_error(
                &format!("creating subscription {subscription:?} on topic {topic:?}"),
                e,
            )),
        }
    }

    async fn check_subscription(&self, subscription: &str) -> Result<(), BrokerError> {
        check_resource_id("subscription", subscription)?;
        self.subscriptions
            .get_subscription()
            .set_subscription(self.config.subscription_path(subscription))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| rpc_error(&format!("subscription {subscription:?}"), e))
    }
}

fn check_project(project: &str) -> Result<(), BrokerError> {
    let legal = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if project.is_empty() || !project.chars().all(legal) {
        return Err(BrokerError::config(format!(
            "{project:?} is not a Google Cloud project id: use lowercase letters, digits and \
             hyphens (pubsub://my-project)"
        )));
    }
    Ok(())
}

#[async_trait]
impl Broker for PubSub {
    fn messaging_system(&self) -> &'static str {
        super::system::GCP_PUBSUB
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
                .ensure_subscription(&topic.name, &topic.name)
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
                Arc::new(PubSubPublisher {
                    base: self.base_publisher.clone(),
                    config: self.resources.config.clone(),
                    topics: Mutex::new(HashMap::new()),
                    room: Arc::new(Semaphore::new(
                        self.resources.config.max_outstanding_publishes.max(1),
                    )),
                })
            })
            .await;
        Ok(publisher.clone())
    }

    async fn subscribe(&self, spec: &SubscriptionSpec) -> Result<Arc<dyn Subscriber>, BrokerError> {
        spec.check()?;
        let (sender, receiver) =
            mpsc::channel(self.resources.config.max_outstanding_messages.max(1) as usize);
        let mut streams = Vec::new();
        let acked = Arc::new(AckedIds::new());
        let outage = Arc::new(OutageLog::new(format!(
            "subscription {:?} receiving from {:?}",
            spec.group, spec.topics
        )));
        for topic in &spec.topics {
            let subscription =
                self.config()
                    .subscription_for(&spec.group, topic, spec.topics.len());
            if self.resources.config.create_resources {
                self.resources.ensure_topic(topic).await?;
                self.resources
                    .ensure_subscription(&subscription, topic)
                    .await?;
                if spec.start == StartPosition::Latest {
                    tracing::debug!(
                        "{subscription}: Pub/Sub subscriptions start at creation; `start` only \
                         matters for Kafka"
                    );
                }
            } else {
                self.resources.check_subscription(&subscription).await?;
            }
            for _ in 0..self.resources.config.streams.max(1) {
                streams.push(StreamSettings {
                    subscriber: self.subscriber.clone(),
                    path: self.resources.config.subscription_path(&subscription),
                    topic: topic.clone(),
                    max_outstanding_messages: self.resources.config.max_outstanding_messages,
                    ack_deadline_s: self.resources.config.ack_deadline_s,
                    acked: acked.clone(),
                    outage: outage.clone(),
                    recreate: self
                        .config()
                        .create_resources
                        .then(|| (self.resources.clone(), subscription.clone())),
                });
            }
        }
        Ok(Arc::new(PubSubSubscriber {
            receiver: tokio::sync::Mutex::new(Some(receiver)),
            unopened: Mutex::new(Some((streams, sender))),
            pumps: Mutex::new(Vec::new()),
            stop: watch::channel(false).0,
        }))
    }
}

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
                        recreate(resources, subscription, &settings.topic).await;
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
async fn recreate(resources: &Resources, subscription: &str, topic: &str) {
    let created = match resources.ensure_topic(topic).await {
        Ok(_) => resources.ensure_subscription(subscription, topic).await,
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
    let incoming = wire::incoming_message(
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
            handler,
            id,
            acked: settings.acked.clone(),
        }),
    )
}

struct PubSubSettle {
    handler: Handler,
    id: String,
    acked: Arc<AckedIds>,
}

impl Settle for PubSubSettle {
    fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        self.handler.ack();
        self.acked.insert(self.id);
        Ok(())
    }

    fn nack(self: Box<Self>) -> Result<(), BrokerError> {
        self.handler.nack();
        Ok(())
    }
}

/// The most attributes a Pub/Sub message may carry, and the longest name and value (bytes).
const MAX_ATTRIBUTES: usize = 100;
const MAX_ATTRIBUTE_NAME: usize = 256;
const MAX_ATTRIBUTE_VALUE: usize = 1024;

/// The longest ordering key Pub/Sub takes, in bytes.
const MAX_ORDERING_KEY: usize = 1024;

/// Refuses headers Pub/Sub would refuse as attributes, naming the rule, before anything is
/// queued: a publish the service rejects later fails its whole batch.
fn check_attributes(message: &OutgoingMessage) -> Result<(), BrokerError> {
    let attributes = wire::outgoing_headers(message);
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
    let Some(key) = wire::outgoing_key(message) else {
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

struct PubSubPublisher {
    base: BasePublisher,
    config: PubSubConfig,
    topics: Mutex<HashMap<String, TopicPublisher>>,
    room: Arc<Semaphore>,
}

impl PubSubPublisher {
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
        let mut attributes: HashMap<String, String> = wire::outgoing_headers(&message)
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

type Received = Result<Delivery, BrokerError>;

/// A subscription's member. Its streaming pulls open on the first `next` (or `joined`), not
/// at `subscribe`: a member that only creates its subscription and closes (`switchyard consume
/// -c 0`) costs the service no streams. (The emulator as shipped never notices a closed
/// stream and leases messages to it, a whole ack deadline each; see `pubsub_emulator`.)
struct PubSubSubscriber {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_names_follow_the_group() {
        let mut config = PubSubConfig::new("p");
        assert_eq!(
            config.subscription_for("classifier", "requests", 1),
            "classifier"
        );
        assert_eq!(config.subscription_for("g", "a", 2), "g--a");
        config.subscriptions.insert("a".into(), "custom".into());
        assert_eq!(config.subscription_for("g", "a", 2), "custom");
    }

    #[test]
    fn resource_ids_are_checked() {
        assert!(check_resource_id("topic", "requests").is_ok());
        for bad in ["ab", "1abc", "goog-topic", "has space", ""] {
            let err = check_resource_id("topic", bad).unwrap_err();
            assert!(
                err.to_string().contains("not a valid Pub/Sub topic name"),
                "{bad}: {err}"
            );
        }
        assert!(check_project("my-project-1").is_ok());
        assert!(check_project("My_Project").is_err());
    }

    #[test]
    fn an_explicit_endpoint_wins_over_the_environment() {
        let mut config = PubSubConfig::new("p");
        config.endpoint = Some("http://localhost:1".into());
        assert_eq!(
            config.resolved_endpoint(),
            (Some("http://localhost:1".into()), false)
        );
    }
}
