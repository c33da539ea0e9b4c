//! The Kafka backend, on `rdkafka` (librdkafka).
//!
//! Delivery semantics: **at-least-once**. A consumer runs with `enable.auto.offset.store=false`:
//! an offset is stored for the next (auto-)commit only after the handler of that message and of
//! every earlier message of its partition returned `Ok` ([`OffsetTracker`]). A message that is
//! not acknowledged before the member leaves or dies is delivered again to the next member of
//! the group; the sink must tolerate duplicates.
//!
//! Publishing enqueues into librdkafka's local queue and returns at once; when the queue is
//! full it waits and retries, it never drops. The [`DeliveryReceipt`] resolves with the
//! broker's acknowledgement. The producer is idempotent by default, so librdkafka's retries
//! neither duplicate nor reorder messages of one partition.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication, TopicResult};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Deserialize;
use tokio::sync::watch;

use super::embedded::EmbeddedKafka;
use super::offsets::InFlight;
use super::outage::OutageLog;
use super::{
    Broker, BrokerError, Delivery, DeliveryReceipt, ErrorKind, OffsetTracker, OutgoingMessage,
    PartitionLag, Publisher, Settle, StartPosition, Subscriber, SubscriptionSpec, TopicInfo,
    TopicSpec, wire,
};

/// How long to wait between attempts to enqueue while librdkafka's local queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);

/// librdkafka settings for clients of the embedded broker (see [`Kafka::embedded`]); also
/// right for other processes that use it (`switchyard broker`).
pub const EMBEDDED_PROPERTIES: [(&str, &str); 3] = [
    ("fetch.wait.max.ms", "1"),
    ("session.timeout.ms", "2000"),
    ("heartbeat.interval.ms", "500"),
];

/// Settings of the Kafka backend (the `[broker.kafka]` manifest section).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// How long to wait for the cluster at start-up before giving up, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Create missing topics at start-up (needs the CreateTopics permission).
    #[serde(default = "default_true")]
    pub create_topics: bool,
    /// Replication factor for created topics; `-1` uses the broker's default.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// librdkafka properties passed through as they are, for producer and consumer alike
    /// (`security.protocol`, `sasl.*`, `compression.type`, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}

fn default_true() -> bool {
    true
}

fn default_replication() -> i32 {
    -1
}

impl KafkaConfig {
    /// Settings for a cluster at `bootstrap_servers`, defaults otherwise.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            connect_timeout_ms: default_connect_timeout_ms(),
            create_topics: true,
            replication_factor: default_replication(),
            properties: BTreeMap::new(),
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        // librdkafka logs connection refusals at error level every second; they reach the user
        // as one clear error instead (see `Kafka::connect`).
        config.set("log_level", "3");
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}

/// A Kafka cluster (or the embedded broker).
pub struct Kafka {
    config: KafkaConfig,
    // Declared before `embedded` so the producer is gone before the embedded broker stops.
    producer: tokio::sync::OnceCell<Arc<KafkaPublisher>>,
    embedded: Option<Arc<EmbeddedKafka>>,
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
        let kafka = Self {
            config,
            embedded: None,
            producer: tokio::sync::OnceCell::new(),
        };
        kafka.check_reachable().await?;
        Ok(kafka)
    }

    /// Uses an embedded broker of this process; topics are created through its mock API.
    pub fn embedded(broker: Arc<EmbeddedKafka>) -> Self {
        let mut config = KafkaConfig::new(broker.bootstrap_servers());
        // The mock broker answers an empty fetch only when fetch.wait.max.ms has passed, even
        // if data arrives meanwhile (a real broker answers at once): poll briefly instead of
        // adding half a second to every message's latency.
        //
        // When the last member leaves a group, the mock keeps the group rebalancing for the
        // session timeout minus one second before a new member may join; a short session
        // timeout keeps a restarted consumer from waiting 44 s. It also bounds how long the
        // partitions of a member that died (kill -9) wait: 2 s to notice, then one join round
        // of 1 s (measured in crash_safety.rs: a restarted host resumes 2.8 s after it starts,
        // 4.8 s with a 3 s session).
        for (key, value) in EMBEDDED_PROPERTIES {
            config.properties.insert(key.to_string(), value.to_string());
        }
        Self {
            config,
            embedded: Some(broker),
            producer: tokio::sync::OnceCell::new(),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    async fn check_reachable(&self) -> Result<(), BrokerError> {
        let config = self.config.clone();
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        // A producer, because polling it serves the error callback (an admin client's does not).
        let probe: BaseProducer<ConnectionErrors> = config
            .client_config()
            .create_with_context(ConnectionErrors::default())
            .map_err(config_error)?;
        let (result, probe) = tokio::task::spawn_blocking(move || {
            let result = probe.client().fetch_metadata(None, timeout).map(|_| ());
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

/// Keeps the last connection error librdkafka reported: its metadata call says only
/// "transport failure" or "timed out", while the reason (a failed TLS handshake, a refused
/// login) arrives through the error callback.
#[derive(Default)]
struct ConnectionErrors {
    last: std::sync::Mutex<Option<String>>,
}

impl ConnectionErrors {
    fn last(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ClientContext for ConnectionErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!("librdkafka: {error}: {reason}");
        // "1/1 brokers are down" follows the reason and would hide it.
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        }
    }
}

impl rdkafka::producer::ProducerContext for ConnectionErrors {
    type DeliveryOpaque = ();

    // The probe sends nothing.
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// The kind and the fix of a connection failure whose reason names TLS or SASL, which a
/// wrong `security.protocol`, certificate or credentials cause.
fn connection_fix(reason: &str) -> Option<(ErrorKind, &'static str)> {
    let reason = reason.to_ascii_lowercase();
    if reason.contains("ssl") || reason.contains("certificate") {
        Some((
            ErrorKind::Config,
            "The TLS connection failed: security.protocol=SSL or SASL_SSL needs a TLS listener \
             (PLAINTEXT and SASL_PLAINTEXT a plain one), and a broker certificate the host \
             trusts (ssl.ca.location names the CA file when it is not a system one)",
        ))
    } else if reason.contains("sasl") || reason.contains("authentication") {
        Some((
            ErrorKind::PermissionDenied,
            "The broker refused the login: check sasl.mechanisms (PLAIN, SCRAM-SHA-256, \
             SCRAM-SHA-512 or OAUTHBEARER), sasl.username and sasl.password, and that \
             security.protocol is SASL_SSL or SASL_PLAINTEXT as the listener expects",
        ))
    } else {
        None
    }
}

/// Checks a Kafka-legal topic name: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
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

fn config_error(e: KafkaError) -> BrokerError {
    BrokerError::config(
        "invalid Kafka settings. Check the [broker.kafka] properties against librdkafka's \
         CONFIGURATION.md",
    )
    .with_source(e)
}

/// The librdkafka error code of an error, admin operations included (rdkafka's own accessor
/// leaves those out).
fn error_code(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    match e {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    }
}

/// Whether a broker's error passes by itself: the request may succeed when tried again.
fn is_transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::RebalanceInProgress
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::CoordinatorLoadInProgress
            | RDKafkaErrorCode::CoordinatorNotAvailable
            | RDKafkaErrorCode::NotCoordinator
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
            | RDKafkaErrorCode::KafkaStorageError
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::OperationTimedOut
    )
}

/// The kind of a librdkafka error, by its code; errors without a code (a client that could
/// not be created) are configuration errors.
fn error_kind(e: &KafkaError) -> ErrorKind {
    let Some(code) = error_code(e) else {
        return match e {
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorKind::Config,
            KafkaError::Canceled => ErrorKind::Closed,
            _ => ErrorKind::Unavailable,
        };
    };
    match code {
        RDKafkaErrorCode::MessageTimedOut
        | RDKafkaErrorCode::RequestTimedOut
        | RDKafkaErrorCode::OperationTimedOut => ErrorKind::Timeout,
        RDKafkaErrorCode::TopicAuthorizationFailed
        | RDKafkaErrorCode::GroupAuthorizationFailed
        | RDKafkaErrorCode::ClusterAuthorizationFailed
        | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
        | RDKafkaErrorCode::DelegationTokenAuthorizationFailed
        | RDKafkaErrorCode::SaslAuthenticationFailed
        | RDKafkaErrorCode::Authentication => ErrorKind::PermissionDenied,
        RDKafkaErrorCode::UnknownTopicOrPartition
        | RDKafkaErrorCode::UnknownTopic
        | RDKafkaErrorCode::UnknownPartition => ErrorKind::NotFound,
        RDKafkaErrorCode::InvalidTopic
        | RDKafkaErrorCode::MessageSizeTooLarge
        | RDKafkaErrorCode::InvalidMessageSize
        | RDKafkaErrorCode::InvalidMessage
        | RDKafkaErrorCode::InvalidRecord
        | RDKafkaErrorCode::MessageBatchTooLarge
        | RDKafkaErrorCode::PolicyViolation
        | RDKafkaErrorCode::InvalidPartitions
        | RDKafkaErrorCode::InvalidReplicationFactor
        | RDKafkaErrorCode::InvalidConfig
        | RDKafkaErrorCode::InvalidRequest
        | RDKafkaErrorCode::UnsupportedVersion => ErrorKind::Rejected,
        RDKafkaErrorCode::BrokerDestroy => ErrorKind::Closed,
        // The transient codes (`is_transient`), and those unknown to this table: librdkafka
        // retries most errors by itself, so treat them as ones that may pass.
        _ => ErrorKind::Unavailable,
    }
}

/// A librdkafka error as a [`BrokerError`]: its kind, its code and the error itself.
fn kafka_error(what: &str, e: &KafkaError) -> BrokerError {
    let kind = error_kind(e);
    let message = match kind {
        ErrorKind::PermissionDenied => format!(
            "{what}: the broker refused the credentials or their rights. Check sasl.username, \
             sasl.password and the ACLs of the topic and the group"
        ),
        _ => what.to_string(),
    };
    BrokerError::new(kind, message)
        .with_code_if(error_code(e))
        .with_source(e.clone())
}

/// A topic operation's refusal as a [`BrokerError`]: missing rights stay
/// [`ErrorKind::PermissionDenied`], a request the broker can serve later stays transient, and
/// the rest is [`ErrorKind::Rejected`].
fn admin_op_error(what: &str, code: RDKafkaErrorCode) -> BrokerError {
    let kind = match error_kind(&KafkaError::AdminOp(code)) {
        kind @ (ErrorKind::PermissionDenied | ErrorKind::Unavailable | ErrorKind::Timeout) => kind,
        _ => ErrorKind::Rejected,
    };
    let fix = match kind {
        ErrorKind::PermissionDenied => ": the credentials lack the rights (ACLs) for it",
        ErrorKind::Unavailable | ErrorKind::Timeout => ": the cluster cannot do it now; try again",
        _ => "",
    };
    BrokerError::new(kind, format!("{what}: {code}{fix}")).with_code(format!("{code:?}"))
}

/// Whether an admin operation on one topic changed it: `false` when the broker answered
/// `unchanged` (the topic existed already, or did not exist).
fn one_topic_changed(
    what: &str,
    results: KafkaResult<Vec<TopicResult>>,
    unchanged: RDKafkaErrorCode,
) -> Result<bool, BrokerError> {
    let results = results.map_err(|e| kafka_error(what, &e))?;
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(true),
        Some(Err((_, code))) if code == unchanged => Ok(false),
        Some(Err((_, code))) => Err(admin_op_error(what, code)),
        None => Err(BrokerError::unavailable(format!(
            "{what}: the broker answered nothing"
        ))),
    }
}

/// What a Kafka cluster's metadata says about its topics.
struct ClusterTopics {
    /// Every topic, internal ones included, sorted by name.
    topics: Vec<TopicInfo>,
    /// Whether the cluster is librdkafka's mock cluster (the embedded broker, perhaps another
    /// process's): it has no CreateTopics or DeleteTopics API, and creates topics on first use.
    is_mock: bool,
}

impl Kafka {
    fn admin_client(&self) -> Result<Arc<AdminClient<DefaultClientContext>>, BrokerError> {
        Ok(Arc::new(
            self.config.client_config().create().map_err(config_error)?,
        ))
    }

    fn admin_options(&self) -> AdminOptions {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        AdminOptions::new()
            .operation_timeout(Some(timeout))
            .request_timeout(Some(timeout))
    }

    async fn cluster_topics(
        &self,
        admin: &Arc<AdminClient<DefaultClientContext>>,
    ) -> Result<ClusterTopics, BrokerError> {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let admin = admin.clone();
        // librdkafka's metadata call blocks its thread.
        tokio::task::spawn_blocking(move || {
            let metadata = admin.inner().fetch_metadata(None, timeout)?;
            let mut topics: Vec<TopicInfo> = metadata
                .topics()
                .iter()
                .map(|topic| TopicInfo {
                    name: topic.name().to_string(),
                    partitions: i32::try_from(topic.partitions().len()).ok(),
                })
                .collect();
            topics.sort_by(|a, b| a.name.cmp(&b.name));
            let is_mock = admin
                .inner()
                .fetch_cluster_id(timeout)
                .is_some_and(|id| id.starts_with("mockCluster"));
            Ok::<_, KafkaError>(ClusterTopics { topics, is_mock })
        })
        .await
        .map_err(|e| BrokerError::unavailable("listing topics stopped").with_source(e))?
        .map_err(|e| kafka_error("listing topics", &e))
    }

    /// Refuses what librdkafka's mock cluster cannot do, saying what can be done instead.
    fn refuse_on_mock(&self, what: &str, instead: &str) -> BrokerError {
        BrokerError::rejected(format!(
            "the embedded broker at {} cannot {what}: it is librdkafka's mock cluster, which \
             has no CreateTopics or DeleteTopics API. {instead}",
            self.config.bootstrap_servers
        ))
    }
}

#[async_trait]
impl Broker for Kafka {
    fn messaging_system(&self) -> &'static str {
        super::system::KAFKA
    }

    fn describe(&self) -> String {
        match self.embedded {
            Some(_) => format!("embedded ({})", self.config.bootstrap_servers),
            None => format!("kafka://{}", self.config.bootstrap_servers),
        }
    }

    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), BrokerError> {
        for topic in topics {
            check_topic_name(&topic.name)?;
        }
        if let Some(embedded) = &self.embedded {
            return topics
                .iter()
                .try_for_each(|t| embedded.create_topic(t).map(|_created| ()));
        }
        if !self.config.create_topics || topics.is_empty() {
            return Ok(());
        }
        let admin = self.admin_client()?;
        // Ask only for what is missing: a broker may refuse CreateTopics (permissions, or no
        // such API, like another process's embedded broker) for topics that already exist.
        let cluster = self.cluster_topics(&admin).await?;
        let missing: Vec<&TopicSpec> = topics
            .iter()
            .filter(|t| !cluster.topics.iter().any(|known| known.name == t.name))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if cluster.is_mock {
            tracing::debug!("embedded broker: topics are created on first use");
            return Ok(());
        }
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    &t.name,
                    t.partitions,
                    TopicReplication::Fixed(self.config.replication_factor),
                )
            })
            .collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(timeout))
            .request_timeout(Some(timeout));
        let names: Vec<&str> = missing.iter().map(|t| t.name.as_str()).collect();
        let results = match admin.create_topics(&new_topics, &options).await {
            Ok(results) => results,
            // Brokers without the CreateTopics API (such as another process's embedded
            // broker) never answer it; many of those create topics on first use instead, so
            // carry on and let a truly missing topic surface when it is used.
            Err(e)
                if matches!(
                    error_code(&e),
                    Some(
                        RDKafkaErrorCode::OperationTimedOut
                            | RDKafkaErrorCode::UnsupportedVersion
                            | RDKafkaErrorCode::InvalidRequest
                    )
                ) =>
            {
                tracing::warn!(
                    "the broker did not create topics {names:?} ({e}); continuing on the \
                     assumption that it creates them on first use. If it does not, create \
                     them yourself"
                );
                return Ok(());
            }
            Err(e) => {
                return Err(kafka_error(
                    &format!(
                        "creating topics {names:?} (create them yourself, or set \
                         create_topics = false if the broker creates them on first use)"
                    ),
                    &e,
                ));
            }
        };
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((
                    _,
                    RDKafkaErrorCode::UnsupportedVersion | RDKafkaErrorCode::InvalidRequest,
                )) => {
                    tracing::info!("broker cannot create topics; they are created on first use");
                }
                Err((name, code)) => {
                    let kind = match error_kind(&KafkaError::AdminOp(code)) {
                        ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                        _ => ErrorKind::Rejected,
                    };
                    return Err(BrokerError::new(
                        kind,
                        format!(
                            "cannot create topic {name:?}: {code}. Create it yourself, or set \
                             create_topics = false if it exists and the check lacks permission"
                        ),
                    )
                    .with_code(format!("{code:?}")));
                }
            }
        }
        Ok(())
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>, BrokerError> {
        let admin = self.admin_client()?;
        let mut topics = self.cluster_topics(&admin).await?.topics;
        topics.retain(|topic| !topic.name.starts_with("__"));
        Ok(topics)
    }

    async fn create_topic(&self, topic: &TopicSpec) -> Result<bool, BrokerError> {
        check_topic_name(&topic.name)?;
        if let Some(embedded) = &self.embedded {
            return embedded.create_topic(topic);
        }
        let admin = self.admin_client()?;
        let cluster = self.cluster_topics(&admin).await?;
        if cluster.topics.iter().any(|known| known.name == topic.name) {
            return Ok(false);
        }
        if cluster.is_mock {
            return Err(self.refuse_on_mock(
                "create topics on request",
                &format!(
                    "Name the topic when you start it (`switchyard broker --topic {}:{}`), or \
                     publish to it: it creates a topic on first use, with 4 partitions",
                    topic.name, topic.partitions
                ),
            ));
        }
        let new_topic = NewTopic::new(
            &topic.name,
            topic.partitions,
            TopicReplication::Fixed(self.config.replication_factor),
        );
        let results = admin
            .create_topics([&new_topic], &self.admin_options())
            .await;
        one_topic_changed(
            &format!("creating topic {:?}", topic.name),
            results,
            RDKafkaErrorCode::TopicAlreadyExists,
        )
    }

    async fn delete_topic(&self, name: &str) -> Result<bool, BrokerError> {
        check_topic_name(name)?;
        let admin = self.admin_client()?;
        let cluster = self.cluster_topics(&admin).await?;
        if !cluster.topics.iter().any(|known| known.name == name) {
            return Ok(false);
        }
        if cluster.is_mock {
            return Err(self.refuse_on_mock(
                "delete topics",
                "Restart it to start with no topics (it keeps nothing on disk)",
            ));
        }
        let results = admin.delete_topics(&[name], &self.admin_options()).await;
        one_topic_changed(
            &format!("deleting topic {name:?}"),
            results,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        )
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>, BrokerError> {
        let publisher = self
            .producer
            .get_or_try_init(|| async {
                let mut config = self.config.client_config();
                let mut defaults = vec![("enable.idempotence", "true")];
                if self.embedded.is_none() {
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
                    if !self.config.properties.contains_key(key) {
                        config.set(key, value);
                    }
                }
                let outage = Arc::new(OutageLog::new(format!(
                    "the Kafka producer for {}",
                    self.config.bootstrap_servers
                )));
                let producer: FutureProducer<ClientErrors> = config
                    .create_with_context(ClientErrors {
                        outage: outage.clone(),
                    })
                    .map_err(config_error)?;
                Ok::<_, BrokerError>(Arc::new(KafkaPublisher { producer, outage }))
            })
            .await?;
        Ok(publisher.clone())
    }

    async fn subscribe(&self, spec: &SubscriptionSpec) -> Result<Arc<dyn Subscriber>, BrokerError> {
        spec.check()?;
        for topic in &spec.topics {
            check_topic_name(topic)?;
        }
        let tracker = Arc::new(OffsetTracker::default());
        let mut config = self.config.client_config();
        config
            .set("group.id", &spec.group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match spec.start {
                    StartPosition::Earliest => "earliest",
                    StartPosition::Latest => "latest",
                },
            );
        // librdkafka reports each partition's lag in its statistics, which it only gathers
        // when asked to (a small JSON document per interval).
        if config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", LAG_REPORT_INTERVAL_MS);
        }
        let (joined, joined_receiver) = watch::channel(false);
        let (lag, lag_receiver) = watch::channel(Vec::new());
        let outage = Arc::new(OutageLog::new(format!(
            "group {:?} receiving from {:?}",
            spec.group, spec.topics
        )));
        let context = GroupContext {
            tracker: tracker.clone(),
            joined,
            lag,
            errors: ClientErrors {
                outage: outage.clone(),
            },
        };
        let consumer: StreamConsumer<GroupContext> =
            config.create_with_context(context).map_err(config_error)?;
        let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| kafka_error(&format!("subscribing to {topics:?}"), &e))?;
        Ok(Arc::new(KafkaSubscriber {
            consumer: std::sync::Mutex::new(Some(Arc::new(consumer))),
            tracker,
            joined: joined_receiver,
            lag: lag_receiver,
            outage,
        }))
    }
}

struct KafkaPublisher {
    producer: FutureProducer<ClientErrors>,
    outage: Arc<OutageLog>,
}

/// Sends librdkafka's own error reports (a broker unreachable, each failed reconnect) to an
/// outage log instead of rdkafka's default of one error line each, which floods the log for
/// as long as a broker is away. Its clients retry by themselves; what fails for good reaches
/// the caller as a delivery or receive error.
struct ClientErrors {
    outage: Arc<OutageLog>,
}

impl ClientContext for ClientErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        self.outage.error(&kafka_error(reason, &error));
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, message: OutgoingMessage) -> Result<DeliveryReceipt, BrokerError> {
        check_topic_name(&message.topic)?;
        let sent_headers = wire::outgoing_headers(&message);
        let mut headers = OwnedHeaders::new_with_capacity(sent_headers.len());
        for (key, value) in sent_headers {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record = FutureRecord::to(&message.topic)
            .payload(&message.payload)
            .headers(headers);
        if let Some(key) = wire::outgoing_key(&message) {
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

/// Commits what was acknowledged when a rebalance takes partitions away, then forgets their
/// in-flight offsets, so acknowledgements that arrive after it do not commit on behalf of the
/// new owner.
struct GroupContext {
    tracker: Arc<OffsetTracker>,
    /// Set once the group gave this member its first assignment (see [`Subscriber::joined`]).
    joined: watch::Sender<bool>,
    /// The lag of the partitions this member holds, from librdkafka's last statistics.
    lag: watch::Sender<Vec<PartitionLag>>,
    errors: ClientErrors,
}

/// How often librdkafka reports a group member's lag (its `statistics.interval.ms`, unless
/// the broker's properties set one).
const LAG_REPORT_INTERVAL_MS: &str = "5000";

impl ClientContext for GroupContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.error(error, reason);
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut lag: Vec<PartitionLag> = statistics
            .topics
            .into_iter()
            .flat_map(|(topic, stats)| {
                stats
                    .partitions
                    .into_values()
                    // Partition -1 is librdkafka's internal queue; `desired` means assigned
                    // to this member; a lag of -1 means not known yet (nothing committed).
                    .filter(|p| p.partition >= 0 && p.desired && p.consumer_lag >= 0)
                    .map(move |p| PartitionLag {
                        topic: topic.clone(),
                        partition: p.partition,
                        messages: p.consumer_lag,
                    })
            })
            .collect();
        lag.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        self.lag.send_if_modified(|shown| {
            let changed = *shown != lag;
            *shown = std::mem::take(&mut lag);
            changed
        });
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                // Commit what was acknowledged before the partitions go, so the next owner
                // does not handle it again.
                match consumer.commit_consumer_state(CommitMode::Sync) {
                    Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                    Err(e) => tracing::debug!("commit before revoking partitions failed: {e}"),
                }
                for element in partitions.elements() {
                    self.tracker.revoke(element.topic(), element.partition());
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!("rebalance failed: {e}"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // An assignment, even of no partitions (more members than partitions), means the
        // member is in the group.
        if let Rebalance::Assign(_) = rebalance {
            self.joined.send_replace(true);
        }
    }
}

type GroupConsumer = StreamConsumer<GroupContext>;

/// The consumer is the only strong reference to the librdkafka handle (deliveries hold weak
/// ones), so `close` can drop it, which leaves the group at once instead of after the
/// session timeout.
struct KafkaSubscriber {
    consumer: std::sync::Mutex<Option<Arc<GroupConsumer>>>,
    tracker: Arc<OffsetTracker>,
    joined: watch::Receiver<bool>,
    lag: watch::Receiver<Vec<PartitionLag>>,
    outage: Arc<OutageLog>,
}

impl KafkaSubscriber {
    fn consumer(&self) -> Result<Arc<GroupConsumer>, BrokerError> {
        self.consumer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(BrokerError::closed)
    }
}

#[async_trait]
impl Subscriber for KafkaSubscriber {
    async fn joined(&self) -> Result<(), BrokerError> {
        let mut joined = self.joined.clone();
        joined
            .wait_for(|joined| *joined)
            .await
            .map(|_| ())
            .map_err(|_| BrokerError::closed())
    }

    fn lag(&self) -> Option<watch::Receiver<Vec<PartitionLag>>> {
        Some(self.lag.clone())
    }

    async fn next(&self) -> Result<Delivery, BrokerError> {
        let consumer = self.consumer()?;
        loop {
            let message = match consumer.recv().await {
                Ok(message) => message,
                Err(e) => {
                    let error = kafka_error("receiving", &e);
                    match error.kind() {
                        ErrorKind::PermissionDenied | ErrorKind::NotFound | ErrorKind::Rejected => {
                            return Err(error);
                        }
                        // Passes by itself (a broker restart, a rebalance): librdkafka
                        // reconnects on its own.
                        _ => self.outage.error(&error),
                    }
                    continue;
                }
            };
            self.outage.received();
            let headers = message.headers().into_iter().flat_map(|headers| {
                headers.iter().map(|header| {
                    let value = String::from_utf8_lossy(header.value.unwrap_or_default());
                    (header.key.to_string(), value.into_owned())
                })
            });
            let mut incoming = wire::incoming_message(
                message.topic(),
                format!("{}@{}", message.partition(), message.offset()),
                message.key(),
                message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                headers,
                None,
            );
            incoming.partition_offset = Some((message.partition(), message.offset()));
            let in_flight =
                self.tracker
                    .delivered(message.topic(), message.partition(), message.offset());
            let settle = KafkaSettle {
                consumer: Arc::downgrade(&consumer),
                tracker: self.tracker.clone(),
                in_flight,
            };
            return Ok(Delivery::new(incoming, Box::new(settle)));
        }
    }

    async fn close(&self) -> Result<(), BrokerError> {
        let taken = self
            .consumer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(consumer) = taken else {
            return Ok(());
        };
        // A thread of its own rather than tokio's blocking pool: librdkafka's close can wait
        // forever (seen on the mock cluster when the group rebalances at that moment: the
        // revoke's assign() never returns). The wait below is bounded, and a stuck thread must
        // not hold up the runtime's shutdown as a blocking task would.
        let (done, finished) = tokio::sync::oneshot::channel();
        let closer = move || {
            let mut result = consumer.commit_consumer_state(CommitMode::Sync);
            // A group that is rebalancing, or a broker that answers with a passing error (a
            // moved coordinator or leader, a timeout), refuses commits for a moment; try again
            // briefly (measured in broker_faults.rs: injected NotLeaderForPartition).
            for _ in 0..20 {
                match &result {
                    Err(KafkaError::ConsumerCommit(code)) if is_transient(*code) => {
                        std::thread::sleep(Duration::from_millis(100));
                        result = consumer.commit_consumer_state(CommitMode::Sync);
                    }
                    _ => break,
                }
            }
            let result = match result {
                // Nothing was acknowledged since the last commit.
                Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
                // Still refused, or the partitions moved meanwhile: what was acknowledged since
                // the last commit is delivered again to the next owner (at-least-once).
                Err(KafkaError::ConsumerCommit(
                    RDKafkaErrorCode::RebalanceInProgress
                    | RDKafkaErrorCode::IllegalGeneration
                    | RDKafkaErrorCode::UnknownMemberId,
                )) => {
                    tracing::warn!(
                        "the group kept rebalancing; the last acknowledgements were not \
                         committed and will be delivered again"
                    );
                    Ok(())
                }
                other => other,
            };
            // The last strong reference: dropping it leaves the group (librdkafka's
            // consumer close), so the partitions move to the other members now.
            drop(consumer);
            let _ = done.send(result);
        };
        std::thread::Builder::new()
            .name("kafka-close".into())
            .spawn(closer)
            .map_err(|e| BrokerError::unavailable("cannot start closing").with_source(e))?;
        match tokio::time::timeout(CLOSE_TIMEOUT, finished).await {
            Ok(Ok(result)) => {
                result.map_err(|e| kafka_error("committing offsets on close", &e))?;
            }
            Ok(Err(_)) => {
                return Err(BrokerError::unavailable(
                    "closing the consumer failed before it finished",
                ));
            }
            Err(_) => tracing::warn!(
                "leaving the consumer group took over {CLOSE_TIMEOUT:?}; going on without it. \
                 Its partitions move to other members after the session timeout, and what was \
                 not committed is delivered again"
            ),
        }
        self.tracker.revoke_all();
        Ok(())
    }
}

impl Drop for KafkaSubscriber {
    /// A member dropped without [`Subscriber::close`] (its owner panicked, say) still leaves
    /// its group, but on a thread of its own: librdkafka's close runs the revoke (and its
    /// synchronous commit), which can wait for a long time, and must never hold one of the
    /// async runtime's few worker threads (seen: a test's runtime starved by one).
    fn drop(&mut self) {
        let taken = self
            .consumer
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(consumer) = taken {
            let leave = move || drop(consumer);
            if let Err(e) = std::thread::Builder::new()
                .name("kafka-drop".into())
                .spawn(leave)
            {
                tracing::warn!("cannot leave the consumer group off the runtime: {e}");
            }
        }
    }
}

/// How long closing a consumer (final commit, leaving the group) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

struct KafkaSettle {
    consumer: std::sync::Weak<GroupConsumer>,
    tracker: Arc<OffsetTracker>,
    in_flight: InFlight,
}

impl Settle for KafkaSettle {
    fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        let Some(position) = self.tracker.complete(&self.in_flight) else {
            return Ok(());
        };
        // Closed meanwhile: the message goes to the next member, as promised.
        let Some(consumer) = self.consumer.upgrade() else {
            return Ok(());
        };
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(
            &self.in_flight.topic,
            self.in_flight.partition,
            Offset::Offset(position),
        )
        .map_err(|e| kafka_error("recording the offset", &e))?;
        match consumer.store_offsets(&list) {
            Ok(()) => Ok(()),
            // The partition moved to another member meanwhile; it will redeliver.
            Err(e) => {
                tracing::debug!("offset {position} not stored: {e}");
                Ok(())
            }
        }
    }

    fn nack(self: Box<Self>) -> Result<(), BrokerError> {
        // The offset stays in flight, so nothing past it is committed; rewinding makes this
        // member fetch it again (and what followed it, which may arrive twice).
        let Some(consumer) = self.consumer.upgrade() else {
            return Ok(());
        };
        let InFlight {
            topic,
            partition,
            offset,
            ..
        } = &self.in_flight;
        match consumer.seek(
            topic,
            *partition,
            Offset::Offset(*offset),
            Duration::from_secs(5),
        ) {
            Ok(()) => Ok(()),
            // Not assigned here any more: the new owner starts from the committed offset,
            // which is at or before this one.
            Err(e) => {
                tracing::debug!("cannot rewind {topic}/{partition} to {offset}: {e}");
                Ok(())
            }
        }
    }
}
