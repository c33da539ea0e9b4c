//! Exactly-once processing on Kafka: the messages sent for the messages a member handled, and
//! the offsets of those messages, commit in one Kafka transaction, or none of them does.
//!
//! Delivery semantics: **exactly-once** for what stays in Kafka, as Kafka defines it: a reader
//! with `isolation.level=read_committed` (librdkafka's default) sees the outputs of each input
//! message once, however often the member crashes, is restarted or loses its partitions. Effects
//! outside Kafka (a database write) stay at-least-once.
//!
//! How. The member has one transactional producer, named by the `transactional.id` its owner
//! gives. A restarted host that uses the same id fences the producer of the host it replaces
//! (whose open transaction the broker then aborts at once instead of after
//! `transaction.timeout.ms`); the consumer group's metadata goes with the offsets (KIP-447), so
//! a broker refuses the commit of a member that lost its partitions in a rebalance.
//!
//! Acknowledging a message hands it, with what its handler sent, to this member's transaction
//! thread. A message joins a transaction only together with its offset, and its partition's
//! offset moves only over messages that are all acknowledged (the offset tracker), so a
//! transaction never commits past a message whose outputs it does not hold. The thread does
//! not wait on a clock: it commits what is ready as soon as the last commit is done, so at a
//! low rate a message commits alone and under load one commit serves many.
//!
//! A transaction the broker refuses for a while (a broker away, a coordinator moving) is
//! aborted and tried again, with backoff, for as long as it takes: nothing is committed
//! meanwhile and nothing is lost. Messages of partitions this member no longer holds are left
//! out (their new owner handles them again) and their receipts say so. A producer that was
//! fenced (another member took its transactional id) ends the subscription: everything not
//! committed goes to whoever holds the partitions now.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use super::KafkaConfig;
use super::errors::{ClientErrors, config_error, kafka_error};
use super::offsets::{InFlight, OffsetTracker};
use super::publisher::record_headers;
use super::subscriber::GroupConsumer;
use crate::outage::OutageLog;
use crate::{BrokerError, ErrorKind, OutgoingMessage, check_topic_name, conversions};

/// How long one transactional call (init, offsets, commit, abort) may wait for the broker.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The first wait before trying a refused transaction again; it doubles up to
/// [`RETRY_BACKOFF_MAX`].
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One acknowledged message waiting for its transaction.
struct Entry {
    in_flight: InFlight,
    outputs: Vec<OutgoingMessage>,
    committed: oneshot::Sender<Result<(), BrokerError>>,
}

/// What the thread is asked to do.
enum Request {
    Commit(Entry),
    /// Commit what is ready, then end (the member is leaving).
    Finish,
}

/// The member's side of the transaction thread.
pub(super) struct Transactions {
    requests: std::sync::Mutex<Option<mpsc::Sender<Request>>>,
    /// Hears (by its closing) that the thread ended.
    ended: std::sync::Mutex<Option<mpsc::Receiver<()>>>,
    /// The largest message the producer takes (`message.max.bytes`): a larger output is
    /// refused when it is acknowledged, before it can stall a transaction.
    max_message_bytes: usize,
    tracker: Arc<OffsetTracker>,
    /// Why the producer cannot go on, once it cannot (fenced): the member then receives no
    /// more.
    fenced: Arc<std::sync::OnceLock<String>>,
}

impl Transactions {
    /// Creates the member's transactional producer (`init_transactions` fences an earlier
    /// producer with the same id) and starts its thread. Blocks.
    pub(super) fn start(
        kafka: &KafkaConfig,
        transactional_id: &str,
        consumer: Weak<GroupConsumer>,
        tracker: Arc<OffsetTracker>,
    ) -> Result<Self, BrokerError> {
        let mut config = kafka.client_config();
        config.set("transactional.id", transactional_id);
        let max_message_bytes = config
            .get("message.max.bytes")
            .and_then(|bytes| bytes.parse().ok())
            .unwrap_or(1_000_000);
        let outage = Arc::new(OutageLog::new(format!(
            "the transactional producer {transactional_id:?}"
        )));
        let producer: ThreadedProducer<ClientErrors> = config
            .create_with_context(ClientErrors {
                outage: outage.clone(),
            })
            .map_err(config_error)?;
        producer.init_transactions(CALL_TIMEOUT).map_err(|e| {
            kafka_error(
                &format!("starting the transactions of {transactional_id:?}"),
                &e,
            )
        })?;
        let (requests, received) = mpsc::channel();
        let fenced = Arc::new(std::sync::OnceLock::new());
        let committer = Committer {
            fenced: fenced.clone(),
            producer,
            consumer,
            tracker: tracker.clone(),
            outage,
            waiting: BTreeMap::new(),
            positions: HashMap::new(),
        };
        let (ending, ended) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("kafka-transactions".into())
            .spawn(move || {
                let _ending = ending;
                committer.run(&received);
            })
            .map_err(|e| BrokerError::unavailable("cannot start a thread").with_source(e))?;
        Ok(Self {
            requests: std::sync::Mutex::new(Some(requests)),
            ended: std::sync::Mutex::new(Some(ended)),
            max_message_bytes,
            tracker,
            fenced,
        })
    }

    /// Why this member can commit nothing more (its producer was fenced), if so.
    pub(super) fn fenced(&self) -> Option<&str> {
        self.fenced.get().map(String::as_str)
    }

    /// Hands `in_flight`, handled, to the next transaction with `outputs`; the receiver
    /// resolves once that transaction committed (or why it will not).
    pub(super) fn commit(
        &self,
        in_flight: InFlight,
        outputs: Vec<OutgoingMessage>,
    ) -> Result<oneshot::Receiver<Result<(), BrokerError>>, BrokerError> {
        for output in &outputs {
            check_topic_name(&output.topic)?;
            let headers: usize = output.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
            let size = output.payload.len() + output.key.as_ref().map_or(0, Vec::len) + headers;
            if size > self.max_message_bytes {
                return Err(BrokerError::rejected(format!(
                    "a message of {size} bytes for topic {:?} is larger than the producer \
                     takes (message.max.bytes = {})",
                    output.topic, self.max_message_bytes
                )));
            }
        }
        let (committed, receipt) = oneshot::channel();
        let sender = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(BrokerError::closed)?;
        sender
            .send(Request::Commit(Entry {
                in_flight,
                outputs,
                committed,
            }))
            .map_err(|_| BrokerError::closed())?;
        Ok(receipt)
    }

    /// Commits what is ready and stops the thread, waiting at most `timeout`. What was not
    /// ready stays uncommitted: the next owner of its partitions handles it again.
    pub(super) fn finish(&self, timeout: Duration) {
        if let Some(requests) = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = requests.send(Request::Finish);
        }
        let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(ended) = ended
            && let Err(RecvTimeoutError::Timeout) = ended.recv_timeout(timeout)
        {
            tracing::warn!(
                "the last transaction took over {timeout:?}; leaving without it (its \
                 messages are handled again by the next owner)"
            );
        }
        self.tracker.revoke_all();
    }
}

/// The transaction thread's state.
struct Committer {
    fenced: Arc<std::sync::OnceLock<String>>,
    producer: ThreadedProducer<ClientErrors>,
    consumer: Weak<GroupConsumer>,
    tracker: Arc<OffsetTracker>,
    outage: Arc<OutageLog>,
    /// Acknowledged messages by partition and offset, until a transaction takes them.
    waiting: BTreeMap<(String, i32), BTreeMap<i64, Entry>>,
    /// Each partition's committable position (the tracker's), as it moves.
    positions: HashMap<(String, i32), i64>,
}

/// Why a transaction did not commit.
enum Refused {
    /// Abort, and try again later.
    Again(BrokerError),
    /// The producer cannot go on (fenced, or a fatal error).
    Fatal(BrokerError),
}

impl Committer {
    fn run(mut self, requests: &mpsc::Receiver<Request>) {
        let mut finishing = false;
        let mut backoff = RETRY_BACKOFF_MIN;
        loop {
            // Wait for work only when nothing is ready: a refused transaction is retried
            // after its backoff even if nothing new arrives.
            let wait = if self.has_ready() {
                Some(Duration::ZERO)
            } else {
                None
            };
            if !finishing {
                let first = match wait {
                    None => requests.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    Some(wait) => requests.recv_timeout(wait),
                };
                match first {
                    Ok(request) => finishing |= self.take(request),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => finishing = true,
                }
                while let Ok(request) = requests.try_recv() {
                    finishing |= self.take(request);
                }
            }
            self.drop_revoked();
            let ready = self.take_ready();
            if ready.is_empty() {
                if finishing {
                    self.give_back_all("the member left before all earlier messages were handled");
                    break;
                }
                continue;
            }
            match self.transaction(&ready) {
                Ok(()) => {
                    self.outage.received();
                    backoff = RETRY_BACKOFF_MIN;
                    for entry in ready {
                        let _ = entry.committed.send(Ok(()));
                    }
                }
                Err(Refused::Again(error)) => {
                    self.outage.error(&error);
                    if let Err(abort) = self.producer.abort_transaction(CALL_TIMEOUT) {
                        tracing::debug!("aborting the refused transaction: {abort}");
                    }
                    self.put_back(ready);
                    if finishing {
                        // Leaving: what did not commit goes to the next owner.
                        self.give_back_all("the member left before its transaction committed");
                        break;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
                Err(Refused::Fatal(error)) => {
                    let _ = self.fenced.set(error.to_string());
                    tracing::error!(
                        "{error:#}; this member stops committing, and what it handled since its \
                         last commit is handled again by whoever holds its partitions now"
                    );
                    for entry in ready {
                        let _ = entry.committed.send(Err(again(&error)));
                    }
                    self.give_back_all("the transactional producer was fenced");
                    self.tracker.revoke_all();
                    // Drain what still comes, refusing it, until the member closes.
                    while let Ok(request) = requests.recv() {
                        match request {
                            Request::Commit(entry) => {
                                let _ = entry.committed.send(Err(again(&error)));
                            }
                            Request::Finish => break,
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Files a request; returns whether the member is finishing.
    fn take(&mut self, request: Request) -> bool {
        match request {
            Request::Finish => true,
            Request::Commit(entry) => {
                let key = (entry.in_flight.topic.clone(), entry.in_flight.partition);
                if !self.tracker.owns(&entry.in_flight) {
                    give_back(entry, "its partition moved to another member");
                    return false;
                }
                if let Some(position) = self.tracker.complete(&entry.in_flight) {
                    self.positions.insert(key.clone(), position);
                }
                self.waiting
                    .entry(key)
                    .or_default()
                    .insert(entry.in_flight.offset, entry);
                false
            }
        }
    }

    fn has_ready(&self) -> bool {
        self.waiting.iter().any(|(key, entries)| {
            let position = self.positions.get(key).copied().unwrap_or(i64::MIN);
            entries
                .keys()
                .next()
                .is_some_and(|&offset| offset < position)
        })
    }

    /// Leaves out the messages of partitions this member no longer holds.
    fn drop_revoked(&mut self) {
        let tracker = &self.tracker;
        let mut revoked = Vec::new();
        self.waiting.retain(|_, entries| {
            let owned = entries
                .values()
                .next()
                .is_none_or(|entry| tracker.owns(&entry.in_flight));
            if !owned {
                revoked.extend(std::mem::take(entries).into_values());
            }
            owned
        });
        for entry in revoked {
            self.positions
                .remove(&(entry.in_flight.topic.clone(), entry.in_flight.partition));
            give_back(entry, "its partition moved to another member");
        }
    }

    /// Takes every message below its partition's committable position.
    fn take_ready(&mut self) -> Vec<Entry> {
        let mut ready = Vec::new();
        for (key, entries) in &mut self.waiting {
            let Some(&position) = self.positions.get(key) else {
                continue;
            };
            let later = entries.split_off(&position);
            ready.extend(std::mem::replace(entries, later).into_values());
        }
        self.waiting.retain(|_, entries| !entries.is_empty());
        ready
    }

    /// Puts a refused transaction's messages back, to go in the next one.
    fn put_back(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            let key = (entry.in_flight.topic.clone(), entry.in_flight.partition);
            self.waiting
                .entry(key)
                .or_default()
                .insert(entry.in_flight.offset, entry);
        }
    }

    fn give_back_all(&mut self, why: &str) {
        for entries in std::mem::take(&mut self.waiting).into_values() {
            for entry in entries.into_values() {
                give_back(entry, why);
            }
        }
        self.positions.clear();
    }

    /// One transaction: `ready`'s outputs, and the positions past them.
    fn transaction(&self, ready: &[Entry]) -> Result<(), Refused> {
        let mut offsets = TopicPartitionList::new();
        let mut positions: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for entry in ready {
            let key = (entry.in_flight.topic.as_str(), entry.in_flight.partition);
            let position = self
                .positions
                .get(&(entry.in_flight.topic.clone(), entry.in_flight.partition))
                .copied()
                .unwrap_or(entry.in_flight.offset + 1);
            positions.insert(key, position);
        }
        for ((topic, partition), position) in &positions {
            offsets
                .add_partition_offset(topic, *partition, Offset::Offset(*position))
                .map_err(|e| Refused::Again(kafka_error("recording the offsets", &e)))?;
        }
        let consumer = self
            .consumer
            .upgrade()
            .ok_or_else(|| Refused::Fatal(BrokerError::closed()))?;
        let group =
            rdkafka::consumer::Consumer::group_metadata(consumer.as_ref()).ok_or_else(|| {
                Refused::Again(BrokerError::unavailable(
                    "the consumer has no group metadata yet (it is joining its group)",
                ))
            })?;
        drop(consumer);
        self.producer
            .begin_transaction()
            .map_err(|e| refused("beginning a transaction", &e))?;
        for entry in ready {
            for output in &entry.outputs {
                self.produce(output)?;
            }
        }
        self.producer
            .send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT)
            .map_err(|e| refused("adding the offsets to the transaction", &e))?;
        let mut tries = 0;
        loop {
            match self.producer.commit_transaction(CALL_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(e)) if e.is_retriable() && tries < 3 => tries += 1,
                Err(e) => return Err(refused("committing the transaction", &e)),
            }
        }
    }

    fn produce(&self, message: &OutgoingMessage) -> Result<(), Refused> {
        let mut record = BaseRecord::to(&message.topic)
            .payload(&message.payload)
            .headers(record_headers(message));
        if let Some(key) = conversions::outgoing_key(message) {
            record = record.key(key);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    return Err(refused(
                        &format!("sending to {:?} in a transaction", message.topic),
                        &e,
                    ));
                }
            }
        }
    }
}

/// Whether the cluster keeps the offsets a transaction commits, which exactly-once rests on:
/// librdkafka's mock cluster (the embedded broker, and `switchyard broker` reached through
/// kafka://) accepts transactions and stores nothing, so a restarted member would handle
/// everything again. Asked of the cluster itself: a throwaway producer commits offset 0 of
/// `topic`'s partition 0 for a throwaway group in a transaction, and the group's committed
/// offset is read back; the group is deleted afterwards (the mock is known by its cluster id
/// without asking). `None` when `topic` does not exist (nothing to commit an offset of).
/// Blocks for a few round trips.
pub(super) fn keeps_transactional_offsets(
    kafka: &KafkaConfig,
    topic: &str,
) -> Result<Option<bool>, BrokerError> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let timeout = Duration::from_millis(kafka.connect_timeout_ms).max(CALL_TIMEOUT);
    let name = format!(
        "switchyard.probe.{}.{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let probing =
        |e: &KafkaError| kafka_error("asking the cluster whether it keeps transactions", e);
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", &name)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(config_error)?;
    // The mock says what it is in its cluster id: no need to ask it anything else (and it
    // creates topics only on first use, so there may be none to commit an offset of yet).
    if consumer
        .client()
        .fetch_cluster_id(timeout)
        .is_some_and(|id| id.starts_with(super::admin::MOCK_CLUSTER_ID_PREFIX))
    {
        return Ok(Some(false));
    }
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| probing(&e))?;
    let exists = metadata
        .topics()
        .iter()
        .any(|t| t.error().is_none() && !t.partitions().is_empty());
    if !exists {
        return Ok(None);
    }
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = kafka
        .client_config()
        .set("transactional.id", &name)
        .create()
        .map_err(config_error)?;
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(topic, 0, Offset::Offset(0))
        .map_err(|e| probing(&e))?;
    let group = consumer
        .group_metadata()
        .ok_or_else(|| BrokerError::unavailable("the probe consumer has no group metadata"))?;
    producer
        .init_transactions(timeout)
        .map_err(|e| probing(&e))?;
    producer.begin_transaction().map_err(|e| probing(&e))?;
    producer
        .send_offsets_to_transaction(&offsets, &group, timeout)
        .map_err(|e| probing(&e))?;
    producer
        .commit_transaction(timeout)
        .map_err(|e| probing(&e))?;
    let committed = consumer
        .committed_offsets(offsets, timeout)
        .map_err(|e| probing(&e))?;
    let kept = committed
        .elements()
        .iter()
        .any(|element| element.offset() == Offset::Offset(0));
    drop(consumer);
    // The throwaway group is litter in the user's cluster; a failure to delete it is not
    // worth failing the subscription for.
    if let Ok(admin) = kafka
        .client_config()
        .create::<AdminClient<DefaultClientContext>>()
    {
        let groups = [name.as_str()];
        let options = AdminOptions::new().operation_timeout(Some(timeout));
        if let Err(e) = futures::executor::block_on(admin.delete_groups(&groups, &options)) {
            tracing::debug!("deleting the probe group {name:?}: {e}");
        }
    }
    Ok(Some(kept))
}

/// The same error again, for each receipt it answers.
fn again(error: &BrokerError) -> BrokerError {
    BrokerError::new(error.kind(), error.to_string())
}

/// Tells an entry's owner that its message will be handled again elsewhere.
fn give_back(entry: Entry, why: &str) {
    let _ = entry.committed.send(Err(BrokerError::new(
        ErrorKind::Closed,
        format!(
            "{}@{} was not committed: {why}",
            entry.in_flight.partition, entry.in_flight.offset
        ),
    )));
}

/// Sorts a transactional call's failure: fenced or fatal ends the producer, the rest is tried
/// again.
fn refused(what: &str, error: &KafkaError) -> Refused {
    let fenced = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                | RDKafkaErrorCode::Fenced
        )
    );
    let fatal = matches!(error, KafkaError::Transaction(e) if e.is_fatal());
    let broker_error = kafka_error(what, error);
    if fenced || fatal {
        Refused::Fatal(BrokerError::new(
            ErrorKind::Closed,
            format!(
                "{what}: the transactional producer was fenced or failed for good ({error}): \
                 another member with the same transactional id took over"
            ),
        ))
    } else {
        Refused::Again(broker_error)
    }
}
