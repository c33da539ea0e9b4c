//! Topic administration on Kafka: creating what a manifest needs, and `switchyard topics`
//! (list, create, delete). librdkafka's mock cluster (the embedded broker) has no
//! CreateTopics or DeleteTopics API, so it is recognized and handled apart.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication, TopicResult};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};

use super::Kafka;
use super::errors::{admin_op_error, config_error, error_code, error_kind, kafka_error};
use crate::{BrokerError, ErrorKind, TopicInfo, TopicSpec, check_topic_name};

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

/// How librdkafka's mock cluster's id begins.
const MOCK_CLUSTER_ID_PREFIX: &str = "mockCluster";

/// Whether `client` is connected to librdkafka's mock cluster (the embedded broker, perhaps
/// another process's, as `switchyard broker` runs it), which says what it is in its cluster
/// id. Blocks the thread for up to `timeout`.
pub(super) fn is_mock_cluster<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    timeout: Duration,
) -> bool {
    client
        .fetch_cluster_id(timeout)
        .is_some_and(|id| id.starts_with(MOCK_CLUSTER_ID_PREFIX))
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

    /// Every topic of the cluster, internal ones included, sorted by name.
    async fn cluster_topics(
        &self,
        admin: &Arc<AdminClient<DefaultClientContext>>,
    ) -> Result<Vec<TopicInfo>, BrokerError> {
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
            Ok::<_, KafkaError>(topics)
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

    /// Creates the topics that are missing (see [`crate::Broker::ensure_topics`]).
    pub(super) async fn create_missing(&self, topics: &[TopicSpec]) -> Result<(), BrokerError> {
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
        let known = self.cluster_topics(&admin).await?;
        let missing: Vec<&TopicSpec> = topics
            .iter()
            .filter(|t| !known.iter().any(|existing| existing.name == t.name))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if self.on_mock {
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

    /// The cluster's topics without its internal ones.
    pub(super) async fn topic_list(&self) -> Result<Vec<TopicInfo>, BrokerError> {
        let admin = self.admin_client()?;
        let mut topics = self.cluster_topics(&admin).await?;
        topics.retain(|topic| !topic.name.starts_with("__"));
        Ok(topics)
    }

    /// Creates one topic; `false` when it existed.
    pub(super) async fn create_one(&self, topic: &TopicSpec) -> Result<bool, BrokerError> {
        check_topic_name(&topic.name)?;
        if let Some(embedded) = &self.embedded {
            return embedded.create_topic(topic);
        }
        let admin = self.admin_client()?;
        let known = self.cluster_topics(&admin).await?;
        if known.iter().any(|existing| existing.name == topic.name) {
            return Ok(false);
        }
        if self.on_mock {
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

    /// Deletes one topic; `false` when there was none.
    pub(super) async fn delete_one(&self, name: &str) -> Result<bool, BrokerError> {
        check_topic_name(name)?;
        let admin = self.admin_client()?;
        let known = self.cluster_topics(&admin).await?;
        if !known.iter().any(|existing| existing.name == name) {
            return Ok(false);
        }
        if self.on_mock {
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
}
