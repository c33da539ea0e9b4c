//! Receiving from Kafka as a member of a consumer group, with the offset of a message stored
//! for commit only once it and every earlier message of its partition are acknowledged.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;

use super::KafkaConfig;
use super::errors::{ClientErrors, config_error, is_transient, kafka_error};
use super::offsets::{InFlight, OffsetTracker};
use super::transactions::Transactions;
use crate::outage::OutageLog;
use crate::{
    BrokerError, Delivery, DeliveryReceipt, ErrorKind, Guarantee, OutgoingMessage, PartitionLag,
    Settle, StartPosition, Subscriber, SubscriptionSpec, check_topic_name, conversions,
};

/// Commits what was acknowledged when a rebalance takes partitions away, then forgets their
/// in-flight offsets, so acknowledgements that arrive after it do not commit on behalf of the
/// new owner.
pub(super) struct GroupContext {
    tracker: Arc<OffsetTracker>,
    /// Set once the group gave this member its first assignment (see [`Subscriber::joined`]).
    joined: watch::Sender<bool>,
    /// The lag of the partitions this member holds, from librdkafka's last statistics.
    lag: watch::Sender<Vec<PartitionLag>>,
    errors: ClientErrors,
    /// Failed offset commits, apart from the other errors: a member that receives well while
    /// its commits fail is still failing.
    commits: OutageLog,
}

/// How often librdkafka reports a group member's lag (its `statistics.interval.ms`, unless
/// the broker's properties set one).
const LAG_REPORT_INTERVAL_MS: &str = "5000";

/// How often a member refreshes its metadata, finding topics created since it subscribed (and
/// new partitions): one small request per interval.
const METADATA_REFRESH_MS: &str = "5000";

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

    /// librdkafka commits the stored offsets every second in the background and tries again
    /// at the next interval when the broker refuses; a refusal that goes on (a group the
    /// credentials may not write, a coordinator that keeps moving) would pass unseen while
    /// ever more handled messages wait to be handled again after the next restart. So it is
    /// logged, at once and then at a readable rate, and so is the first commit that succeeds.
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => self.commits.received(),
            // Nothing new to commit.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => self.commits.error(&kafka_error(
                &format!(
                    "the broker refused to commit the offsets of {} partition(s); what was \
                     handled since the last commit is handled again if this member stops",
                    offsets.count()
                ),
                &e,
            )),
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

pub(super) type GroupConsumer = StreamConsumer<GroupContext>;

/// The consumer is the only strong reference to the librdkafka handle (deliveries hold weak
/// ones), so `close` can drop it, which leaves the group at once instead of after the
/// session timeout.
pub(super) struct KafkaSubscriber {
    consumer: std::sync::Mutex<Option<Arc<GroupConsumer>>>,
    tracker: Arc<OffsetTracker>,
    joined: watch::Receiver<bool>,
    lag: watch::Receiver<Vec<PartitionLag>>,
    outage: Arc<OutageLog>,
    /// The member's transactions, for an exactly-once subscription.
    transactions: Option<Arc<Transactions>>,
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
        if let Some(why) = self.transactions.as_ref().and_then(|t| t.fenced()) {
            return Err(BrokerError::new(
                ErrorKind::Closed,
                format!("this member receives no more: {why}"),
            ));
        }
        let consumer = self.consumer()?;
        loop {
            let message = match consumer.recv().await {
                Ok(message) => message,
                Err(e) => {
                    let error = kafka_error("receiving", &e);
                    match error.kind() {
                        ErrorKind::PermissionDenied | ErrorKind::Rejected => {
                            return Err(error);
                        }
                        // Passes by itself (a broker restart, a rebalance): librdkafka
                        // reconnects on its own. A subscribed topic missing from the broker's
                        // metadata passes too: librdkafka says so at each metadata refresh and
                        // reads the topic once it exists, as Kafka's own consumer waits for
                        // it; it is a topic created after subscribing, or one whose creation
                        // has not reached the broker that answered yet (measured on Tansu,
                        // moments after CreateTopics succeeded).
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
            let mut incoming = conversions::incoming_message(
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
                transactions: self.transactions.clone(),
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
        let transactions = self.transactions.clone();
        let closer = move || {
            // An exactly-once member commits what is ready in its last transaction; it has
            // no other offsets to commit.
            if let Some(transactions) = transactions {
                transactions.finish(CLOSE_TIMEOUT);
            }
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
    transactions: Option<Arc<Transactions>>,
}

impl Settle for KafkaSettle {
    fn ack_with(
        self: Box<Self>,
        together: Vec<Box<dyn Settle>>,
        outputs: Vec<OutgoingMessage>,
    ) -> Result<DeliveryReceipt, (BrokerError, Vec<Box<dyn Settle>>)> {
        let refuse = |error: BrokerError, this: Box<Self>, together: Vec<Box<dyn Settle>>| {
            let mut all: Vec<Box<dyn Settle>> = vec![this];
            all.extend(together);
            Err((error, all))
        };
        let Some(transactions) = self.transactions.clone() else {
            return refuse(crate::at_least_once_refusal(), self, together);
        };
        let mut messages = vec![self.in_flight.clone()];
        for other in &together {
            match other.as_any().downcast_ref::<KafkaSettle>() {
                Some(other)
                    if other
                        .transactions
                        .as_ref()
                        .is_some_and(|t| Arc::ptr_eq(t, &transactions)) =>
                {
                    messages.push(other.in_flight.clone());
                }
                _ => {
                    let error = BrokerError::rejected(
                        "messages acknowledged together must come from one exactly-once \
                         subscription",
                    );
                    return refuse(error, self, together);
                }
            }
        }
        match transactions.commit(messages, outputs) {
            Ok(committed) => Ok(DeliveryReceipt::new(Box::pin(async move {
                committed.await.map_err(|_| BrokerError::closed())?
            }))),
            Err(error) => refuse(error, self, together),
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        if self.transactions.is_some() {
            // Its offset commits in the next transaction; nothing waits for that.
            return self
                .ack_with(Vec::new(), Vec::new())
                .map(drop)
                .map_err(|(error, _)| error);
        }
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

/// Gives a group its start position in each partition where it has none yet, by committing
/// the partition's start (for [`StartPosition::Earliest`]) or end (for
/// [`StartPosition::Latest`]) as it is now, before this member joins. Returns whether every
/// partition of the topics now has a position, so that any partition still without one (of a
/// topic created later) holds only what was published since, and the member can read it from
/// the start (`auto.offset.reset=earliest`).
///
/// Why, for "latest": librdkafka resolves `auto.offset.reset=latest` only once the member has
/// joined and been assigned its partitions, which takes from milliseconds to seconds, and it
/// skips what was published in between; for a topic that does not exist yet it resolves
/// "latest" after the topic's first messages, and skips them too (measured: the demo's consumer
/// on a standalone embedded broker received none of 300 predictions). With the ends committed
/// here, "latest" means "after `subscribe` was called", as a new Pub/Sub subscription does.
///
/// Why, for "earliest": librdkafka waits 100 ms before it asks for the start of a partition
/// that has no committed offset (a fixed backoff in its offset reset), and fetches nothing
/// meanwhile, so a member that had joined let the first 100 ms of messages wait: measured in
/// the paced demo, requests sent in the first 40 ms after the classifier joined were all handled
/// at +45 to +54 ms, in batches of 32. With the start committed, the member's first fetch
/// follows its assignment at once.
///
/// Partitions the group already has a position in keep it. When the commit is refused (other
/// members hold the group) or the broker does not answer, returns `false` and librdkafka's
/// own reset applies. Blocks (librdkafka calls).
fn commit_start_for_new_group(kafka: &KafkaConfig, spec: &SubscriptionSpec) -> bool {
    let timeout = Duration::from_millis(kafka.connect_timeout_ms);
    let attempt = || -> Result<(), KafkaError> {
        let consumer: BaseConsumer = kafka
            .client_config()
            .set("group.id", &spec.group)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut partitions = TopicPartitionList::new();
        for topic in &spec.topics {
            let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
            // A topic that does not exist yet has no partitions to position.
            for found in metadata.topics().iter().filter(|t| t.error().is_none()) {
                for partition in found.partitions() {
                    partitions.add_partition(topic, partition.id());
                }
            }
        }
        if partitions.count() == 0 {
            return Ok(());
        }
        let committed = consumer.committed_offsets(partitions, timeout)?;
        let mut starts = TopicPartitionList::new();
        for element in committed.elements() {
            if element.offset() == Offset::Invalid {
                let (topic, partition) = (element.topic(), element.partition());
                let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
                let start = match spec.start {
                    StartPosition::Earliest => low,
                    StartPosition::Latest => high,
                };
                starts.add_partition_offset(topic, partition, Offset::Offset(start))?;
            }
        }
        if starts.count() > 0 {
            consumer.commit(&starts, CommitMode::Sync)?;
        }
        Ok(())
    };
    match attempt() {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(
                "group {:?}: no start committed ({e}); librdkafka finds it once the member has \
                 joined",
                spec.group
            );
            false
        }
    }
}

impl KafkaSubscriber {
    /// Joins `spec.group` on the cluster `config` names (a new group first gets its start
    /// committed, see [`commit_start_for_new_group`]).
    pub(super) async fn subscribe_at_start(
        kafka: &KafkaConfig,
        spec: &SubscriptionSpec,
    ) -> Result<Self, BrokerError> {
        spec.check()?;
        for topic in &spec.topics {
            check_topic_name(topic)?;
        }
        let (kafka_for_commit, spec_for_commit) = (kafka.clone(), spec.clone());
        let positioned = tokio::task::spawn_blocking(move || {
            commit_start_for_new_group(&kafka_for_commit, &spec_for_commit)
        })
        .await
        .map_err(|e| {
            BrokerError::unavailable("committing a new group's start stopped").with_source(e)
        })?;
        let reset = match spec.start {
            StartPosition::Latest if !positioned => "latest",
            _ => "earliest",
        };
        let mut subscriber = Self::subscribe(kafka, spec, reset)?;
        if let Guarantee::ExactlyOnce { transactional_id } = &spec.guarantee {
            let consumer = Arc::downgrade(&subscriber.consumer()?);
            let (kafka, id, tracker) = (
                kafka.clone(),
                transactional_id.clone(),
                subscriber.tracker.clone(),
            );
            let transactions = tokio::task::spawn_blocking(move || {
                Transactions::start(&kafka, &id, consumer, tracker)
            })
            .await
            .map_err(|e| {
                BrokerError::unavailable("starting the member's transactions stopped")
                    .with_source(e)
            })??;
            subscriber.transactions = Some(Arc::new(transactions));
        }
        Ok(subscriber)
    }

    /// Joins `spec.group` on the cluster `config` names (`spec` already checked); partitions
    /// without a committed position start at `reset` (librdkafka's `auto.offset.reset`).
    fn subscribe(
        kafka: &KafkaConfig,
        spec: &SubscriptionSpec,
        reset: &str,
    ) -> Result<Self, BrokerError> {
        let tracker = Arc::new(OffsetTracker::default());
        let mut config = kafka.client_config();
        config
            .set("group.id", &spec.group)
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", reset)
            .set("isolation.level", spec.isolation.kafka_name());
        match spec.guarantee {
            Guarantee::AtLeastOnce => {
                config
                    .set("enable.auto.commit", "true")
                    .set("auto.commit.interval.ms", "1000");
            }
            // Offsets commit in the member's transactions (and only committed data is read:
            // `check` refuses anything else).
            Guarantee::ExactlyOnce { .. } => {
                config.set("enable.auto.commit", "false");
            }
        }
        // librdkafka reports each partition's lag in its statistics, which it only gathers
        // when asked to (a small JSON document per interval).
        if config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", LAG_REPORT_INTERVAL_MS);
        }
        // librdkafka looks for a subscribed topic that is missing only when it refreshes its
        // metadata, every 5 minutes by default: a member that subscribed before its topic was
        // created waited that long for it (measured on Tansu: nothing within 60 s). Kafka's
        // own consumer asks again for a missing topic at once.
        if config.get("topic.metadata.refresh.interval.ms").is_none() {
            config.set("topic.metadata.refresh.interval.ms", METADATA_REFRESH_MS);
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
            commits: OutageLog::new(format!("group {:?} committing offsets", spec.group)),
        };
        let consumer: StreamConsumer<GroupContext> =
            config.create_with_context(context).map_err(config_error)?;
        let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| kafka_error(&format!("subscribing to {topics:?}"), &e))?;
        Ok(Self {
            consumer: std::sync::Mutex::new(Some(Arc::new(consumer))),
            tracker,
            joined: joined_receiver,
            lag: lag_receiver,
            outage,
            transactions: None,
        })
    }
}
