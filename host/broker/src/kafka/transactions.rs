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

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rdkafka::consumer::Consumer;
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
use crate::{
    BrokerError, ErrorKind, OutgoingMessage, TRANSACTION_HEADER, check_topic_name, conversions,
};

/// How long one transactional call (init, offsets, commit, abort) may wait for the broker.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The first wait before trying a refused transaction again; it doubles up to
/// [`RETRY_BACKOFF_MAX`].
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Messages handled together (one handler call), acknowledged with what the call sent: they
/// commit in one transaction, all of them or none.
struct Unit {
    messages: Vec<InFlight>,
    outputs: Vec<OutgoingMessage>,
    committed: oneshot::Sender<Result<(), BrokerError>>,
}

/// A partition, as the committer keys it.
type Partition = (String, i32);

fn partition_of(message: &InFlight) -> Partition {
    (message.topic.clone(), message.partition)
}

/// What the thread is asked to do.
enum Request {
    Commit(Unit),
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
        let session = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis());
        let committer = Committer {
            tag_prefix: format!("{transactional_id}/{session}/"),
            begun: 0,
            fenced: fenced.clone(),
            producer,
            consumer,
            tracker: tracker.clone(),
            outage,
            waiting: Vec::new(),
            positions: HashMap::new(),
            committed: HashMap::new(),
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

    /// Hands `messages`, handled together, to the next transaction with `outputs`; the
    /// receiver resolves once that transaction committed (or why it will not).
    pub(super) fn commit(
        &self,
        messages: Vec<InFlight>,
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
            .send(Request::Commit(Unit {
                messages,
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
    /// `TRANSACTIONAL_ID/SESSION/`: what each transaction's [`TRANSACTION_HEADER`] starts with.
    tag_prefix: String,
    /// Transactions begun so far.
    begun: u64,
    fenced: Arc<std::sync::OnceLock<String>>,
    producer: ThreadedProducer<ClientErrors>,
    consumer: Weak<GroupConsumer>,
    tracker: Arc<OffsetTracker>,
    outage: Arc<OutageLog>,
    /// Acknowledged units, until a transaction takes them.
    waiting: Vec<Unit>,
    /// Each partition's position past its acknowledged messages (the tracker's), as it moves,
    /// and in which hold of the partition (a position from an earlier hold means nothing).
    positions: HashMap<Partition, (u64, i64)>,
    /// What this member last committed of each partition, and in which hold of it.
    committed: HashMap<Partition, (u64, i64)>,
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
            let (ready, limits) = self.take_ready();
            if ready.is_empty() {
                if finishing {
                    self.give_back_all("the member left before all earlier messages were handled");
                    break;
                }
                continue;
            }
            self.begun += 1;
            let tag = format!("{}{}", self.tag_prefix, self.begun);
            match self.transaction(&ready, &limits, &tag) {
                Ok(committed) => {
                    self.outage.received();
                    backoff = RETRY_BACKOFF_MIN;
                    self.committed.extend(committed);
                    for unit in ready {
                        let _ = unit.committed.send(Ok(()));
                    }
                }
                Err(Refused::Again(error)) => {
                    self.outage.error(&error);
                    // Said of each one (at most one per backoff): on a broker that shows
                    // aborted records, a reader can tell what this one wrote by its tag.
                    tracing::info!("aborted transaction {tag} ({error}); trying again");
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
                        "{error:#}: aborted transaction {tag} and stopped committing; what \
                         this member handled since its last commit is handled again by whoever \
                         holds its partitions now"
                    );
                    for unit in ready {
                        let _ = unit.committed.send(Err(again(&error)));
                    }
                    self.give_back_all("the transactional producer was fenced");
                    self.tracker.revoke_all();
                    // Drain what still comes, refusing it, until the member closes.
                    while let Ok(request) = requests.recv() {
                        match request {
                            Request::Commit(unit) => {
                                let _ = unit.committed.send(Err(again(&error)));
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
        let unit = match request {
            Request::Finish => return true,
            Request::Commit(unit) => unit,
        };
        let owned = unit
            .messages
            .iter()
            .filter(|message| self.tracker.owns(message))
            .count();
        if owned < unit.messages.len() {
            self.give_back_revoked(unit, owned);
            return false;
        }
        for message in &unit.messages {
            if let Some(position) = self.tracker.complete(message) {
                self.positions
                    .insert(partition_of(message), (message.generation(), position));
            }
        }
        self.waiting.push(unit);
        false
    }

    /// Gives back a unit some of whose partitions moved to another member (`owned` of its
    /// messages are still this member's). Its new owners handle the moved messages again; the
    /// others were acknowledged here, so the partition's offset could pass them without their
    /// outputs: their partitions are read again from where this member last committed them.
    fn give_back_revoked(&mut self, unit: Unit, owned: usize) {
        if owned > 0 {
            let still_here: Vec<InFlight> = unit
                .messages
                .iter()
                .filter(|message| self.tracker.owns(message))
                .cloned()
                .collect();
            for message in &still_here {
                self.rewind(message);
            }
        }
        give_back(unit, "some of its partitions moved to another member");
    }

    /// Reads `message`'s partition again from this member's last commit of it (or from where
    /// its hold began), as a new hold: what was delivered since goes back.
    fn rewind(&mut self, message: &InFlight) {
        let partition = partition_of(message);
        let last_commit = self
            .committed
            .get(&partition)
            .filter(|(generation, _)| *generation == message.generation())
            .map(|(_, offset)| *offset);
        let Some(start) = last_commit.or_else(|| self.tracker.hold_start(message)) else {
            return;
        };
        self.tracker.revoke(&message.topic, message.partition);
        self.positions.remove(&partition);
        self.committed.remove(&partition);
        if let Some(consumer) = self.consumer.upgrade()
            && let Err(e) = consumer.seek(
                &message.topic,
                message.partition,
                Offset::Offset(start),
                Duration::from_secs(5),
            )
        {
            tracing::warn!(
                "cannot read {}/{} again from {start}: {e}; its next owner will",
                message.topic,
                message.partition
            );
        }
    }

    /// Each partition's limit: its position, lowered to the first message of any unit that is
    /// not ready (so no commit passes a message whose outputs it does not hold). A unit is
    /// ready when every one of its messages is below its partition's limit; lowering a limit
    /// may make another unit not ready, hence the loop (it ends: limits only go down).
    fn limits(&self) -> HashMap<Partition, (u64, i64)> {
        limits(&self.positions, &self.waiting)
    }

    fn has_ready(&self) -> bool {
        let limits = self.limits();
        self.waiting.iter().any(|unit| is_ready(unit, &limits))
    }

    /// Gives back the units with a message of a partition this member no longer holds.
    fn drop_revoked(&mut self) {
        while let Some(index) = self.waiting.iter().position(|unit| {
            unit.messages
                .iter()
                .any(|message| !self.tracker.owns(message))
        }) {
            let unit = self.waiting.swap_remove(index);
            let owned = unit
                .messages
                .iter()
                .filter(|message| self.tracker.owns(message))
                .count();
            for message in &unit.messages {
                if !self.tracker.owns(message) {
                    self.positions.remove(&partition_of(message));
                }
            }
            self.give_back_revoked(unit, owned);
        }
    }

    /// Takes the ready units, with the limits their transaction commits.
    fn take_ready(&mut self) -> (Vec<Unit>, HashMap<Partition, (u64, i64)>) {
        let limits = self.limits();
        let (ready, waiting) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|unit| is_ready(unit, &limits));
        self.waiting = waiting;
        (ready, limits)
    }

    /// Puts a refused transaction's units back, to go in the next one.
    fn put_back(&mut self, units: Vec<Unit>) {
        self.waiting.extend(units);
    }

    fn give_back_all(&mut self, why: &str) {
        for unit in std::mem::take(&mut self.waiting) {
            give_back(unit, why);
        }
        self.positions.clear();
    }

    /// One transaction: `ready`'s outputs, and the offsets of their partitions at `limits`.
    /// Returns what it committed of each partition.
    fn transaction(
        &self,
        ready: &[Unit],
        limits: &HashMap<Partition, (u64, i64)>,
        tag: &str,
    ) -> Result<HashMap<Partition, (u64, i64)>, Refused> {
        let mut committed = HashMap::new();
        for message in ready.iter().flat_map(|unit| &unit.messages) {
            let partition = partition_of(message);
            // Ready means the limit is of the message's hold and above it.
            let limit = limits
                .get(&partition)
                .copied()
                .unwrap_or((message.generation(), message.offset + 1));
            committed.insert(partition, limit);
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), (_, limit)) in &committed {
            offsets
                .add_partition_offset(topic, *partition, Offset::Offset(*limit))
                .map_err(|e| Refused::Again(kafka_error("recording the offsets", &e)))?;
        }
        let consumer = self
            .consumer
            .upgrade()
            .ok_or_else(|| Refused::Fatal(BrokerError::closed()))?;
        let group = Consumer::group_metadata(consumer.as_ref()).ok_or_else(|| {
            Refused::Again(BrokerError::unavailable(
                "the consumer has no group metadata yet (it is joining its group)",
            ))
        })?;
        drop(consumer);
        self.producer
            .begin_transaction()
            .map_err(|e| refused("beginning a transaction", &e))?;
        for unit in ready {
            for output in &unit.outputs {
                self.produce(output, tag)?;
            }
        }
        self.producer
            .send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT)
            .map_err(|e| refused("adding the offsets to the transaction", &e))?;
        let mut tries = 0;
        loop {
            match self.producer.commit_transaction(CALL_TIMEOUT) {
                Ok(()) => return Ok(committed),
                Err(KafkaError::Transaction(e)) if e.is_retriable() && tries < 3 => tries += 1,
                Err(e) => return Err(refused("committing the transaction", &e)),
            }
        }
    }

    fn produce(&self, message: &OutgoingMessage, tag: &str) -> Result<(), Refused> {
        let headers = record_headers(message).insert(rdkafka::message::Header {
            key: TRANSACTION_HEADER,
            value: Some(tag),
        });
        let mut record = BaseRecord::to(&message.topic)
            .payload(&message.payload)
            .headers(headers);
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
    use rdkafka::consumer::BaseConsumer;

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
    if super::admin::is_mock_cluster(consumer.client(), timeout) {
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

/// See [`Committer::limits`].
fn limits(
    positions: &HashMap<Partition, (u64, i64)>,
    waiting: &[Unit],
) -> HashMap<Partition, (u64, i64)> {
    let mut limits = positions.clone();
    loop {
        let mut lowered = false;
        for unit in waiting {
            if is_ready(unit, &limits) {
                continue;
            }
            for message in &unit.messages {
                if let Some((generation, limit)) = limits.get_mut(&partition_of(message))
                    && *generation == message.generation()
                    && message.offset < *limit
                {
                    *limit = message.offset;
                    lowered = true;
                }
            }
        }
        if !lowered {
            return limits;
        }
    }
}

/// Whether every message of `unit` is below its partition's limit.
fn is_ready(unit: &Unit, limits: &HashMap<Partition, (u64, i64)>) -> bool {
    unit.messages.iter().all(|message| {
        limits
            .get(&partition_of(message))
            .is_some_and(|&(generation, limit)| {
                generation == message.generation() && message.offset < limit
            })
    })
}

/// Tells a unit's owner that its messages will be handled again elsewhere.
fn give_back(unit: Unit, why: &str) {
    let positions: Vec<String> = unit
        .messages
        .iter()
        .map(|message| format!("{}@{}", message.partition, message.offset))
        .collect();
    let _ = unit.committed.send(Err(BrokerError::new(
        ErrorKind::Closed,
        format!("{} was not committed: {why}", positions.join(", ")),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(messages: Vec<InFlight>) -> Unit {
        Unit {
            messages,
            outputs: Vec::new(),
            committed: oneshot::channel().0,
        }
    }

    fn ready(positions: &HashMap<Partition, (u64, i64)>, waiting: &[Unit]) -> Vec<usize> {
        let limits = limits(positions, waiting);
        (0..waiting.len())
            .filter(|&i| is_ready(&waiting[i], &limits))
            .collect()
    }

    #[test]
    fn a_unit_waits_for_all_its_partitions_and_holds_back_what_follows_it() {
        let tracker = OffsetTracker::default();
        let p0_10 = tracker.delivered("t", 0, 10);
        let p0_11 = tracker.delivered("t", 0, 11);
        let p1_4 = tracker.delivered("t", 1, 4);
        let p1_5 = tracker.delivered("t", 1, 5);
        let mut positions = HashMap::new();
        let complete = |message: &InFlight, positions: &mut HashMap<_, _>| {
            if let Some(position) = tracker.complete(message) {
                positions.insert(partition_of(message), (message.generation(), position));
            }
        };
        // A batch of 10 (partition 0) and 5 (partition 1), and a call with 11 alone.
        let waiting = [
            unit(vec![p0_10.clone(), p1_5.clone()]),
            unit(vec![p0_11.clone()]),
        ];
        for message in [&p0_10, &p1_5, &p0_11] {
            complete(message, &mut positions);
        }
        // Partition 1's 4 is still being handled: the batch may not commit, and 11 may not
        // either, since committing partition 0 past 11 would pass the batch's 10.
        assert_eq!(ready(&positions, &waiting), Vec::<usize>::new());
        let found = limits(&positions, &waiting);
        assert_eq!(found[&("t".to_string(), 0)].1, 10);
        complete(&p1_4, &mut positions);
        assert_eq!(ready(&positions, &waiting), [0, 1]);
        let found = limits(&positions, &waiting);
        assert_eq!(found[&("t".to_string(), 0)].1, 12);
        assert_eq!(found[&("t".to_string(), 1)].1, 6);
    }

    #[test]
    fn a_position_from_an_earlier_hold_readies_nothing() {
        let tracker = OffsetTracker::default();
        let old = tracker.delivered("t", 0, 100);
        let mut positions = HashMap::new();
        positions.insert(partition_of(&old), (old.generation(), 101));
        tracker.revoke("t", 0);
        // Assigned again, from 90: 95 is acknowledged while 90 is still being handled.
        let _held = tracker.delivered("t", 0, 90);
        let acked = tracker.delivered("t", 0, 95);
        assert_eq!(tracker.complete(&acked), None);
        assert_eq!(ready(&positions, &[unit(vec![acked])]), Vec::<usize>::new());
    }
}
