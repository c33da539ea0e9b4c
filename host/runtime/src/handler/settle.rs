//! Settling what a handler call did: acknowledge what was handled once the broker stored
//! what the call sent, retry a failure after a backoff up to the retry policy's attempts, and
//! after the last one write the dead letter and acknowledge the original only once it is
//! stored. Off the worker, in tasks of their own, so the worker moves on to the next message.
//! Exactly-once handlers commit instead: the outputs with the acknowledgement, in one
//! transaction.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::HandlerStats;
use crate::bindings::wasi::messaging::types::Error as WitError;
use crate::interfaces::messaging::CallOutputs;
use crate::manifest::DeliveryGuarantee;
use crate::metrics::FailureKind;
use switchyard_broker::dead_letter::{self, Reason};
use switchyard_broker::{AckRefused, BrokerError, Delivery, OutgoingMessage, Publisher};

/// Why one attempt at a message failed.
#[derive(Clone)]
pub(super) enum Failure {
    /// The guest returned a WIT error.
    Handler(String),
    /// The guest trapped (or hit a limit): its instance is gone.
    Trap(String),
    /// A message the handler sent was not stored by the broker.
    Publish(String),
}

impl Failure {
    fn kind(&self) -> FailureKind {
        match self {
            Failure::Handler(_) => FailureKind::Error,
            Failure::Trap(_) => FailureKind::Trap,
            Failure::Publish(_) => FailureKind::Publish,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Handler(m) => write!(f, "the handler returned an error: {m}"),
            Failure::Trap(m) => write!(f, "the instance trapped: {m}"),
            Failure::Publish(m) => write!(f, "a message it sent was not delivered: {m}"),
        }
    }
}

pub(super) fn outcome(result: Result<(), WitError>) -> Result<(), Failure> {
    result.map_err(|error| Failure::Handler(describe(&error)))
}

pub(super) fn describe(error: &WitError) -> String {
    match error {
        WitError::Timeout => "timeout".into(),
        WitError::Connection(m) => format!("connection: {m}"),
        WitError::PermissionDenied(m) => format!("permission denied: {m}"),
        WitError::Other(m) => m.clone(),
    }
}

/// One message and how many times it has been tried.
pub(super) struct Job {
    pub(super) delivery: Delivery,
    pub(super) attempt: u32,
    /// Whether this is a retry in this process (retries go alone, never in a batch).
    pub(super) retry: bool,
}

impl Job {
    /// A delivery's first attempt here: the broker's delivery count when it keeps one (a
    /// redelivered message has been tried before), else 1.
    pub(super) fn first(delivery: Delivery) -> Self {
        let attempt = delivery.message.delivery_attempt.unwrap_or(1).max(1);
        Self {
            delivery,
            attempt,
            retry: false,
        }
    }
}

/// Partitions of a dead-letter topic switchyard creates: dead letters are few, and their
/// order within a key is kept by the key.
pub(super) const DEAD_LETTER_PARTITIONS: i32 = 1;

/// The longest wait between two tries at writing a dead letter.
const MAX_DEAD_LETTER_BACKOFF: Duration = Duration::from_secs(30);

/// What the worker and its settle tasks share: where retries go, the counters, the policy.
#[derive(Clone)]
pub(super) struct Settling {
    pub(super) name: Arc<str>,
    pub(super) version: Arc<str>,
    pub(super) group: Arc<str>,
    pub(super) config: Arc<crate::manifest::ComponentConfig>,
    pub(super) publisher: Arc<dyn Publisher>,
    pub(super) policy: crate::manifest::RetryPolicy,
    pub(super) stats: Arc<HandlerStats>,
    pub(super) retries: mpsc::UnboundedSender<Job>,
    pub(super) stopped: watch::Receiver<bool>,
    /// OpenTelemetry's `messaging.system` of the broker (`kafka`, `gcp_pubsub`).
    pub(super) system: &'static str,
}

impl Settling {
    /// The span of one call and the settling of its messages, with OpenTelemetry's messaging
    /// attribute names (semantic conventions 1.27+), so a tracing subscriber that exports to
    /// OpenTelemetry (or prints JSON) carries them as a messaging consumer would. At debug
    /// level, as tower-http's request spans are: the default log stays one line per event.
    pub(super) fn process_span(&self, jobs: &[Job]) -> tracing::Span {
        use tracing::field::Empty;
        let Some(first_job) = jobs.first() else {
            return tracing::Span::none();
        };
        let first = &first_job.delivery.message;
        let span = tracing::debug_span!(
            "process",
            "otel.name" = format!("process {}", first.topic),
            "otel.kind" = "consumer",
            "messaging.system" = self.system,
            "messaging.operation.type" = "process",
            "messaging.operation.name" = "handle",
            "messaging.destination.name" = %first.topic,
            "messaging.consumer.group.name" = %self.group,
            "messaging.batch.message_count" = Empty,
            "messaging.message.id" = Empty,
            "messaging.destination.partition.id" = Empty,
            "messaging.kafka.offset" = Empty,
            "messaging.message.body.size" = Empty,
            "switchyard.component" = %self.name,
            "switchyard.component.version" = %self.version,
            "switchyard.attempt" = first_job.attempt,
        );
        if span.is_disabled() {
            return span;
        }
        match jobs {
            [job] => {
                let message = &job.delivery.message;
                span.record("messaging.message.body.size", message.payload.len());
                match message.partition_offset {
                    Some((partition, offset)) => {
                        span.record("messaging.destination.partition.id", partition.to_string());
                        span.record("messaging.kafka.offset", offset);
                    }
                    // Pub/Sub's position is the message id.
                    None => {
                        span.record("messaging.message.id", message.position.as_str());
                    }
                }
            }
            _ => {
                span.record("messaging.batch.message_count", jobs.len());
            }
        }
        span
    }

    /// Settles what one call handled: each message that succeeded once every message the call
    /// sent is stored; the others (and all of them, if the broker refused one) go to
    /// [`Settling::failed`]. An exactly-once call's outputs were held: they commit with its
    /// message instead.
    pub(super) async fn settle(
        &self,
        jobs: Vec<Job>,
        outputs: CallOutputs,
        outcomes: Vec<Result<(), Failure>>,
    ) {
        let receipts = match outputs {
            CallOutputs::Sent(receipts) => receipts,
            CallOutputs::Held(held) => return self.commit(jobs, held, outcomes).await,
        };
        let mut refused = None;
        if outcomes.iter().any(Result::is_ok) {
            for receipt in receipts {
                if let Err(e) = receipt.wait().await {
                    refused = Some(Failure::Publish(e.to_string()));
                    break;
                }
            }
        }
        let mut failures = Vec::new();
        let mut handled = Vec::with_capacity(jobs.len());
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            match (outcome, &refused) {
                (Ok(()), None) => handled.push(job),
                (Ok(()), Some(failure)) => failures.push(self.failed(job, failure.clone())),
                (Err(failure), _) => failures.push(self.failed(job, failure)),
            }
        }
        self.stats.count_handled(
            handled
                .iter()
                .map(|job| job.delivery.message.topic.as_str()),
        );
        for job in handled {
            self.acknowledge(job);
        }
        futures::future::join_all(failures).await;
    }

    /// Exactly-once: commits the call's messages with what it sent, in one transaction. A call
    /// with a failure commits nothing: its outputs are dropped (nothing of a failed attempt is
    /// ever seen; a batch's outputs cannot be told apart by message), the failed messages are
    /// retried, and the others go again alone without being charged an attempt.
    async fn commit(
        &self,
        jobs: Vec<Job>,
        outputs: Vec<OutgoingMessage>,
        outcomes: Vec<Result<(), Failure>>,
    ) {
        let mut failures = Vec::new();
        if outcomes.iter().any(Result::is_err) {
            let call = jobs.len();
            for (job, outcome) in jobs.into_iter().zip(outcomes) {
                match outcome {
                    Err(failure) => failures.push(self.failed(job, failure)),
                    Ok(()) => {
                        tracing::debug!(
                            "{}: {} goes again alone (a batch of {call} with a failure commits \
                             nothing)",
                            self.name,
                            job.delivery.message.position
                        );
                        let _ = self.retries.send(Job { retry: true, ..job });
                    }
                }
            }
            futures::future::join_all(failures).await;
            return;
        }
        let attempts: Vec<(u32, bool)> = jobs.iter().map(|job| (job.attempt, job.retry)).collect();
        let described: Vec<(String, String)> = jobs
            .iter()
            .map(|job| {
                let message = &job.delivery.message;
                (message.topic.clone(), message.position.clone())
            })
            .collect();
        let deliveries = jobs.into_iter().map(|job| job.delivery).collect();
        match Delivery::ack_together(deliveries, outputs) {
            Ok(receipt) => match receipt.wait().await {
                Ok(()) => {
                    self.stats
                        .count_handled(described.iter().map(|(topic, _)| topic.as_str()));
                }
                Err(e) => {
                    let positions: Vec<&str> = described.iter().map(|(_, p)| p.as_str()).collect();
                    self.committed_elsewhere(&positions.join(", "), &e);
                }
            },
            Err(AckRefused { error, deliveries }) => {
                for (delivery, (attempt, retry)) in deliveries.into_iter().zip(attempts) {
                    let job = Job {
                        delivery,
                        attempt,
                        retry,
                    };
                    failures.push(self.failed(job, Failure::Publish(error.to_string())));
                }
            }
        }
        futures::future::join_all(failures).await;
    }

    /// A message whose outputs and acknowledgement will not commit (on Kafka its partition
    /// moved, or another host took this one's transactional id; on Pub/Sub the ack was not
    /// confirmed): the broker delivers it again, to whichever member holds it now, which
    /// handles it again, so it is not retried here.
    fn committed_elsewhere(&self, position: &str, error: &BrokerError) {
        tracing::info!(
            "{}: {position} was not committed here ({error}); it is delivered again, to the \
             member that holds it now, and handled again",
            self.name
        );
    }

    /// Acknowledges a handled message (counted by the caller, with the rest of its call).
    fn acknowledge(&self, job: Job) {
        let position = job.delivery.message.position.clone();
        if let Err(e) = job.delivery.ack() {
            tracing::warn!(
                "{}: handled {position} but could not settle it: {e}",
                self.name
            );
        }
    }

    /// Schedules another attempt after the backoff, or gives up after the last one.
    async fn failed(&self, job: Job, failure: Failure) {
        self.stats.metrics.failed(failure.kind());
        let name = &self.name;
        let position = format!(
            "{}:{}",
            job.delivery.message.topic, job.delivery.message.position
        );
        if job.attempt >= self.policy.max_attempts {
            match self.config.dead_letter_topic(&job.delivery.message.topic) {
                Some(topic) => self.dead_letter(job, failure, &topic, &position).await,
                None => {
                    self.stats.count_gave_up(&job.delivery.message.topic, false);
                    tracing::error!(
                        "{name}: giving up on message {position} after {} attempt(s): \
                         {failure}. Dead letters are off (`dead_letter = false`), so it is \
                         dropped and its partition moves on",
                        job.attempt
                    );
                    if let Err(e) = job.delivery.ack() {
                        tracing::warn!("{name}: could not settle {position}: {e}");
                    }
                }
            }
            return;
        }
        self.stats.count_retry();
        let backoff = Duration::from_millis(self.policy.backoff_ms)
            .saturating_mul(1 << (job.attempt - 1).min(16));
        tracing::warn!(
            "{name}: attempt {} at {position} failed: {failure}; retrying in {backoff:?}",
            job.attempt
        );
        let mut stopped = self.stopped.clone();
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => {
                tracing::info!("{name}: stopping; {position} is left unsettled for redelivery");
            }
            _ = tokio::time::sleep(backoff) => {
                let retry = Job { delivery: job.delivery, attempt: job.attempt + 1, retry: true };
                if self.retries.send(retry).is_err() {
                    tracing::info!("{name}: stopping; {position} is left unsettled for redelivery");
                }
            }
        }
    }
}

impl Settling {
    /// Writes `job`'s dead letter to `topic` and, once the broker has stored it, acknowledges
    /// the original. Until then the original stays unsettled: a refused dead letter is tried
    /// again after a backoff, and if the handler stops first the original is left for
    /// redelivery.
    async fn dead_letter(&self, job: Job, failure: Failure, topic: &str, position: &str) {
        let name = &self.name;
        let Job {
            mut delivery,
            attempt,
            ..
        } = job;
        let source_topic = delivery.message.topic.clone();
        let error = failure.to_string();
        let letter = dead_letter::dead_letter(
            &delivery.message,
            topic,
            &Reason {
                error: &error,
                component: name,
                version: &self.version,
                group: &self.group,
                attempts: attempt,
            },
        );
        let exactly_once = self.config.delivery == DeliveryGuarantee::ExactlyOnce;
        let mut backoff = Duration::from_millis(self.policy.backoff_ms.max(10));
        loop {
            let refused = if exactly_once {
                // The dead letter commits with the original's acknowledgement.
                match delivery.ack_with(vec![letter.clone()]) {
                    Ok(receipt) => {
                        match receipt.wait().await {
                            Ok(()) => {
                                self.stats.count_gave_up(&source_topic, true);
                                self.gave_up_to(topic, position, attempt, &failure);
                            }
                            Err(e) => self.committed_elsewhere(position, &e),
                        }
                        return;
                    }
                    Err(AckRefused {
                        error,
                        mut deliveries,
                    }) => match deliveries.pop() {
                        Some(back) => {
                            delivery = back;
                            error
                        }
                        // Given one, it gives one back; were it not so, the message would be
                        // left unsettled, for redelivery.
                        None => return,
                    },
                }
            } else {
                let written = match self.publisher.publish(letter.clone()).await {
                    Ok(receipt) => receipt.wait().await,
                    Err(e) => Err(e),
                };
                match written {
                    Ok(()) => {
                        self.stats.count_gave_up(&source_topic, true);
                        self.gave_up_to(topic, position, attempt, &failure);
                        if let Err(e) = delivery.ack() {
                            tracing::warn!("{name}: could not settle {position}: {e}");
                        }
                        return;
                    }
                    Err(e) => e,
                }
            };
            tracing::error!(
                "{name}: cannot write the dead letter of {position} to {topic:?}: {refused}. \
                 The message stays unsettled; trying again in {backoff:?}"
            );
            let mut stopped = self.stopped.clone();
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => {
                    tracing::info!("{name}: stopping; {position} is left unsettled for redelivery");
                    return;
                }
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = backoff.saturating_mul(2).min(MAX_DEAD_LETTER_BACKOFF);
        }
    }

    fn gave_up_to(&self, topic: &str, position: &str, attempts: u32, failure: &Failure) {
        tracing::error!(
            "{}: message {position} failed {attempts} attempt(s), the last with: {failure}. It \
             is in the dead-letter topic {topic:?} (`switchyard consume -t {topic}` shows it, \
             `switchyard replay -t {topic}` sends it back)",
            self.name
        );
    }
}
