//! A handler component's pool of workers.
//!
//! One dispatcher takes deliveries from the subscription and hands them to `workers` tasks,
//! each owning one warm instance (a store plus the instantiated component) that it reuses
//! message after message. A delivery is acknowledged only after `handle` returned `ok` and the
//! broker stored every message the handler sent; that wait happens in a small task of its own,
//! so the worker is already handling the next message (the offset tracker commits in order
//! anyway). A failure (an `error` from the guest, a trap, a publish the broker refused) is
//! retried after an exponential backoff, again off the worker, up to the retry policy's
//! attempts; a trap also replaces the instance. Where the broker counts deliveries (Pub/Sub
//! with a dead-letter policy), a redelivered message starts at the broker's count, so a
//! message that keeps failing across restarts still runs out of attempts.
//!
//! After the last attempt the message goes to its dead-letter topic (`<topic>.dlq` unless the
//! manifest names another, see [`switchyard_broker::dead_letter`] for what it carries), and only
//! once the broker has stored the dead letter is the original acknowledged: a dead letter that
//! cannot be written leaves the original unsettled, and writing it is tried again with a
//! backoff until it succeeds or the handler stops (then the next member gets the original).
//! With `dead_letter = false` the message is logged, counted and acknowledged so its partition
//! moves on.
//!
//! A component that exports `switchyard:host/batch` gets, in one `handle-batch` call, the
//! message the worker waited for plus whatever else is already waiting, up to the manifest's
//! `batch`. The worker never waits to fill a batch, so at a low rate every call still carries
//! one message and latency is what it would be without batching; under load the call's fixed
//! costs are shared. Each message keeps its own outcome: one that fails is retried alone
//! through `handle`. A call that traps says nothing about which message caused it, so its
//! messages go again one by one without counting an attempt, and only the culprit is charged:
//! a poison message never costs its neighbours an attempt. What the batch sent
//! is one set of broker acknowledgements, so the batch's successes are settled together once
//! all of them are stored (or retried together if the broker refused one).
//!
//! Stopping stops the intake, lets the workers finish what they hold and every handled message
//! settle, and commits before the member leaves its group; a message waiting for a retry is
//! left unsettled for redelivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Semaphore, mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;
use wasmtime::Store;
use wasmtime::component::Instance;

use super::bindings::exports::switchyard::host::batch::Guest as BatchExport;
use super::bindings::exports::wasi::messaging::incoming_handler::Guest as HandleExport;
use super::bindings::wasi::messaging::types::Error as WitError;
use super::instance::{InstanceState, Shared, new_store, within_deadline};
use super::interfaces::messaging::ReceiptSink;
use super::{LoadedComponent, Runtime, RuntimeError};
use crate::metrics::{ComponentMetrics, FailureKind};
use switchyard_broker::dead_letter::{self, Reason};
use switchyard_broker::{
    Delivery, DeliveryReceipt, ErrorKind, PartitionLag, Publisher, Subscriber, SubscriptionSpec,
    TopicSpec,
};

/// Counters of one handler component, updated as it works. Each count also goes to the
/// runtime's [`Metrics`](crate::metrics::Metrics), by topic where it has one, so what
/// `switchyard run` prints when it stops and what `/metrics` shows are counted in one place.
/// Read them with [`HandlerStats::snapshot`].
#[derive(Debug)]
pub struct HandlerStats {
    received: AtomicU64,
    handled: AtomicU64,
    gave_up: AtomicU64,
    dead_lettered: AtomicU64,
    retries: AtomicU64,
    traps: AtomicU64,
    /// Deliveries settled so far (handled, or given up on): a watch, so whoever waits for a
    /// handler's progress wakes when it moves instead of polling.
    settled: watch::Sender<u64>,
    metrics: ComponentMetrics,
}

/// A handler's counters at one moment; `Display` writes them as `switchyard run` prints them
/// when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HandlerCounts {
    /// Deliveries taken from the subscription.
    pub received: u64,
    /// Deliveries handled successfully and acknowledged.
    pub handled: u64,
    /// Attempts that failed and were retried.
    pub retried: u64,
    /// Deliveries given up on after the last attempt, and settled: dead-lettered, or dropped
    /// when dead letters are off.
    pub gave_up: u64,
    /// Of those, the ones written to a dead-letter topic.
    pub dead_lettered: u64,
    /// Instances lost to a trap and replaced.
    pub traps: u64,
}

impl std::fmt::Display for HandlerCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received {}, handled {}, retried {}, gave up {} ({} dead-lettered), traps {}",
            self.received, self.handled, self.retried, self.gave_up, self.dead_lettered, self.traps
        )
    }
}

impl HandlerStats {
    fn new(metrics: ComponentMetrics) -> Self {
        Self {
            received: AtomicU64::default(),
            handled: AtomicU64::default(),
            gave_up: AtomicU64::default(),
            dead_lettered: AtomicU64::default(),
            retries: AtomicU64::default(),
            traps: AtomicU64::default(),
            settled: watch::Sender::new(0),
            metrics,
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn count_received(&self, topic: &str) {
        Self::bump(&self.received);
        self.metrics.received(topic);
    }

    fn count_handled(&self, topic: &str) {
        Self::bump(&self.handled);
        self.metrics.handled(topic);
        self.settled.send_modify(|settled| *settled += 1);
    }

    fn count_gave_up(&self, topic: &str, dead_lettered: bool) {
        if dead_lettered {
            Self::bump(&self.dead_lettered);
        }
        Self::bump(&self.gave_up);
        self.metrics.gave_up(topic, dead_lettered);
        self.settled.send_modify(|settled| *settled += 1);
    }

    fn count_retry(&self) {
        Self::bump(&self.retries);
        self.metrics.retried();
    }

    fn count_trap(&self) {
        Self::bump(&self.traps);
        self.metrics.trapped();
    }

    /// Watches how many deliveries have been settled (handled or given up on).
    pub fn settled(&self) -> watch::Receiver<u64> {
        self.settled.subscribe()
    }

    /// The counters now.
    pub fn snapshot(&self) -> HandlerCounts {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        HandlerCounts {
            received: read(&self.received),
            handled: read(&self.handled),
            retried: read(&self.retries),
            gave_up: read(&self.gave_up),
            dead_lettered: read(&self.dead_lettered),
            traps: read(&self.traps),
        }
    }
}

enum Control {
    Report(oneshot::Sender<Option<String>>),
    /// Handle the next messages with this build (answering once it does): the call in
    /// progress, and the settling of what it handled, finish on the build that started them.
    Replace(LoadedComponent, oneshot::Sender<()>),
}

/// A running handler component. Stop it with [`HandlerGroup::stop`] to commit what it did.
pub struct HandlerGroup {
    name: Arc<str>,
    /// The manifest entry it started with (what [`HandlerGroup::replace`] may not change).
    config: Arc<crate::config::ComponentConfig>,
    stats: Arc<HandlerStats>,
    subscriber: Arc<dyn Subscriber>,
    stop: watch::Sender<bool>,
    dispatcher: JoinHandle<()>,
    workers: Vec<(JoinHandle<()>, mpsc::Sender<Control>)>,
}

impl HandlerGroup {
    /// The component's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Live counters.
    pub fn stats(&self) -> &Arc<HandlerStats> {
        &self.stats
    }

    /// Waits until its subscription is receiving (see
    /// [`Subscriber::joined`](switchyard_broker::Subscriber::joined)).
    pub async fn joined(&self) -> Result<(), RuntimeError> {
        Ok(self.subscriber.joined().await?)
    }

    /// Asks every worker's instance for its `switchyard:host/report`; components without the
    /// export give none.
    pub async fn reports(&self) -> Vec<String> {
        let mut reports = Vec::new();
        for (_, control) in &self.workers {
            let (reply, answer) = oneshot::channel();
            if control.send(Control::Report(reply)).await.is_ok()
                && let Ok(Some(report)) = answer.await
            {
                reports.push(report);
            }
        }
        reports
    }

    /// Replaces the component's build between messages, without leaving the group: each
    /// worker finishes the call it is in on the old build, drops its warm instance and handles
    /// the next messages with `component`. Nothing is redelivered (the subscription stays), so
    /// nothing is lost or handled twice. Returns once every worker has switched.
    ///
    /// Only what an instance is made from may change: see
    /// [`ComponentConfig::can_replace_in_place`](crate::config::ComponentConfig::can_replace_in_place).
    pub async fn replace(&self, component: &LoadedComponent) -> Result<(), RuntimeError> {
        let same_subscription =
            component.name == self.name && self.config.can_replace_in_place(&component.config);
        if !same_subscription {
            return Err(RuntimeError::NotReplaceable {
                component: self.name.to_string(),
                replacement: component.name.to_string(),
            });
        }
        let mut switched = Vec::with_capacity(self.workers.len());
        for (_, control) in &self.workers {
            let (done, answer) = oneshot::channel();
            if control
                .send(Control::Replace(component.clone(), done))
                .await
                .is_ok()
            {
                switched.push(answer);
            }
        }
        for answer in switched {
            // A worker that ended (the group is stopping) has nothing left to switch.
            let _ = answer.await;
        }
        tracing::info!("{}: now running {}", self.name, component.version);
        Ok(())
    }

    /// Stops taking deliveries, lets the workers finish the ones they hold, commits, and
    /// leaves the group.
    ///
    /// A worker or dispatcher that panicked (a bug in the host, never a guest's trap) is
    /// reported as an error, after the group has been left all the same.
    pub async fn stop(self) -> Result<(), RuntimeError> {
        let _ = self.stop.send(true);
        let mut panics = Vec::new();
        let mut record = |ended: Result<(), tokio::task::JoinError>| {
            if let Err(e) = ended
                && e.is_panic()
            {
                let payload = e.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|m| m.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_string());
                tracing::error!("{}: a worker task panicked: {message}", self.name);
                panics.push(message);
            }
        };
        record(self.dispatcher.await);
        for (worker, control) in self.workers {
            drop(control);
            record(worker.await);
        }
        self.subscriber.close().await?;
        match panics.first() {
            Some(first) => Err(RuntimeError::HostPanicked {
                component: self.name.to_string(),
                count: panics.len(),
                first: first.clone(),
            }),
            None => Ok(()),
        }
    }
}

pub(super) async fn start(
    runtime: &Runtime,
    component: &LoadedComponent,
) -> Result<HandlerGroup, RuntimeError> {
    let config = &component.config;
    let spec = SubscriptionSpec {
        group: config
            .group
            .clone()
            .unwrap_or_else(|| component.name.to_string()),
        topics: config.subscribe.clone(),
        start: config.start,
    };
    // Dead-letter topics exist before the first failure, so a dead letter is never refused
    // for want of its topic (and on Pub/Sub is kept until someone reads it).
    let dead_letter_topics: Vec<TopicSpec> = config
        .dead_letter_topics()
        .into_iter()
        .map(|name| TopicSpec {
            name,
            partitions: DEAD_LETTER_PARTITIONS,
        })
        .collect();
    runtime
        .broker
        .ensure_kept_topics(&dead_letter_topics)
        .await?;
    let subscriber = runtime.broker.subscribe(&spec).await?;
    let metrics = runtime.metrics.handler(&component.name, &spec.topics);
    let stats = Arc::new(HandlerStats::new(metrics.clone()));
    let (stop, stopped) = watch::channel(false);
    // Room for every worker's next batch, so a worker that finishes one finds the next waiting.
    let (sender, receiver) = mpsc::channel::<Delivery>(config.workers * batch_bound(component));
    let receiver = Arc::new(Mutex::new(receiver));

    let (retry_sender, retry_receiver) = mpsc::unbounded_channel();
    let retry_receiver = Arc::new(Mutex::new(retry_receiver));
    let settling = Settling {
        name: component.name.clone(),
        version: component.version.clone(),
        group: spec.group.clone().into(),
        config: component.config.clone(),
        publisher: runtime.publisher.clone(),
        policy: config.retry,
        stats: stats.clone(),
        retries: retry_sender,
        stopped: stopped.clone(),
        system: runtime.broker.messaging_system(),
    };
    let unsettled = Arc::new(Semaphore::new(MAX_UNSETTLED));
    let mut workers = Vec::with_capacity(config.workers);
    for index in 0..config.workers {
        let (control, controls) = mpsc::channel(1);
        let worker = Worker {
            index,
            engine: runtime.engine.clone(),
            publisher: runtime.publisher.clone(),
            nn: runtime.nn.clone(),
            results: runtime.results.clone(),
            component: component.clone(),
            settling: settling.clone(),
            unsettled: unsettled.clone(),
            live: None,
        };
        let run = worker.run(receiver.clone(), retry_receiver.clone(), controls);
        workers.push((tokio::spawn(run), control));
    }
    drop(settling);
    if let Some(lag) = subscriber.lag() {
        tokio::spawn(show_lag(lag, metrics, stopped.clone()));
    }
    let dispatcher = tokio::spawn(dispatch(
        subscriber.clone(),
        sender,
        stats.clone(),
        stopped,
        component.name.clone(),
    ));
    Ok(HandlerGroup {
        name: component.name.clone(),
        config: component.config.clone(),
        stats,
        subscriber,
        stop,
        dispatcher,
        workers,
    })
}

/// The first wait before receiving again after an error that did not pass by itself; it
/// doubles at every error in a row up to [`RECEIVE_BACKOFF_MAX`].
const RECEIVE_BACKOFF_MIN: Duration = Duration::from_secs(1);

/// The longest wait between two attempts to receive after errors.
const RECEIVE_BACKOFF_MAX: Duration = Duration::from_secs(30);

async fn dispatch(
    subscriber: Arc<dyn Subscriber>,
    sender: mpsc::Sender<Delivery>,
    stats: Arc<HandlerStats>,
    mut stopped: watch::Receiver<bool>,
    name: Arc<str>,
) {
    let mut receive_backoff = RECEIVE_BACKOFF_MIN;
    loop {
        let next = tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            next = subscriber.next() => next,
        };
        match next {
            Ok(delivery) => {
                receive_backoff = RECEIVE_BACKOFF_MIN;
                stats.count_received(&delivery.message.topic);
                if sender.send(delivery).await.is_err() {
                    return;
                }
            }
            Err(error) if error.kind() == ErrorKind::Closed => return,
            Err(error) => {
                // The backend retries what passes by itself and logs its outages; what
                // reaches here needs a person (a deleted subscription, revoked rights), so
                // it is logged at a rate that keeps the log readable until fixed.
                tracing::error!(
                    "{name}: cannot receive: {error:#}; trying again in {:?}",
                    receive_backoff
                );
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(receive_backoff) => {}
                }
                receive_backoff = (receive_backoff * 2).min(RECEIVE_BACKOFF_MAX);
            }
        }
    }
}

/// Shows the group's lag, as the backend reports it, in `/metrics` until the group stops.
async fn show_lag(
    mut lag: watch::Receiver<Vec<PartitionLag>>,
    metrics: ComponentMetrics,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            changed = lag.changed() => match changed {
                Ok(()) => metrics.set_lag(&lag.borrow_and_update()),
                Err(_) => break,
            },
        }
    }
    // A member that left holds no partitions: its lag is another member's to show.
    metrics.clear_lag();
}

/// The most messages a worker hands `component` in one call.
fn batch_bound(component: &LoadedComponent) -> usize {
    if component.takes_batches() {
        component.config.batch.max(1)
    } else {
        1
    }
}

/// A warm instance.
struct Live {
    store: Store<InstanceState>,
    instance: Instance,
    handle: HandleExport,
    batch: Option<BatchExport>,
}

/// Why one attempt at a message failed.
#[derive(Clone)]
enum Failure {
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

fn outcome(result: Result<(), WitError>) -> Result<(), Failure> {
    result.map_err(|error| Failure::Handler(describe(&error)))
}

fn describe(error: &WitError) -> String {
    match error {
        WitError::Timeout => "timeout".into(),
        WitError::Connection(m) => format!("connection: {m}"),
        WitError::PermissionDenied(m) => format!("permission denied: {m}"),
        WitError::Other(m) => m.clone(),
    }
}

/// One message and how many times it has been tried.
struct Job {
    delivery: Delivery,
    attempt: u32,
    /// Whether this is a retry in this process (retries go alone, never in a batch).
    retry: bool,
}

impl Job {
    /// A delivery's first attempt here: the broker's delivery count when it keeps one (a
    /// redelivered message has been tried before), else 1.
    fn first(delivery: Delivery) -> Self {
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
const DEAD_LETTER_PARTITIONS: i32 = 1;

/// The longest wait between two tries at writing a dead letter.
const MAX_DEAD_LETTER_BACKOFF: Duration = Duration::from_secs(30);

/// What the worker and its settle tasks share: where retries go, the counters, the policy.
#[derive(Clone)]
struct Settling {
    name: Arc<str>,
    version: Arc<str>,
    group: Arc<str>,
    config: Arc<crate::config::ComponentConfig>,
    publisher: Arc<dyn Publisher>,
    policy: crate::config::RetryPolicy,
    stats: Arc<HandlerStats>,
    retries: mpsc::UnboundedSender<Job>,
    stopped: watch::Receiver<bool>,
    /// OpenTelemetry's `messaging.system` of the broker (`kafka`, `gcp_pubsub`).
    system: &'static str,
}

impl Settling {
    /// The span of one call and the settling of its messages, with OpenTelemetry's messaging
    /// attribute names (semantic conventions 1.27+), so a tracing subscriber that exports to
    /// OpenTelemetry (or prints JSON) carries them as a messaging consumer would. At debug
    /// level, as tower-http's request spans are: the default log stays one line per event.
    fn process_span(&self, jobs: &[Job]) -> tracing::Span {
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
    /// [`Settling::failed`].
    async fn settle(
        &self,
        jobs: Vec<Job>,
        receipts: Vec<DeliveryReceipt>,
        outcomes: Vec<Result<(), Failure>>,
    ) {
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
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            match (outcome, &refused) {
                (Ok(()), None) => self.succeeded(job),
                (Ok(()), Some(failure)) => failures.push(self.failed(job, failure.clone())),
                (Err(failure), _) => failures.push(self.failed(job, failure)),
            }
        }
        futures::future::join_all(failures).await;
    }

    fn succeeded(&self, job: Job) {
        self.stats.count_handled(&job.delivery.message.topic);
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
        let error = failure.to_string();
        let letter = dead_letter::dead_letter(
            &job.delivery.message,
            topic,
            &Reason {
                error: &error,
                component: name,
                version: &self.version,
                group: &self.group,
                attempts: job.attempt,
            },
        );
        let mut backoff = Duration::from_millis(self.policy.backoff_ms.max(10));
        loop {
            let written = match self.publisher.publish(letter.clone()).await {
                Ok(receipt) => receipt.wait().await,
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(
                        "{name}: cannot write the dead letter of {position} to {topic:?}: {e}. \
                         The message stays unsettled; trying again in {backoff:?}"
                    );
                    let mut stopped = self.stopped.clone();
                    tokio::select! {
                        _ = stopped.wait_for(|s| *s) => {
                            tracing::info!(
                                "{name}: stopping; {position} is left unsettled for redelivery"
                            );
                            return;
                        }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = backoff.saturating_mul(2).min(MAX_DEAD_LETTER_BACKOFF);
                }
            }
        }
        self.stats.count_gave_up(&job.delivery.message.topic, true);
        tracing::error!(
            "{name}: message {position} failed {} attempt(s), the last with: {failure}. It is \
             in the dead-letter topic {topic:?} (`switchyard consume -t {topic}` shows it, \
             `switchyard replay -t {topic}` sends it back)",
            job.attempt
        );
        if let Err(e) = job.delivery.ack() {
            tracing::warn!("{name}: could not settle {position}: {e}");
        }
    }
}

/// Messages handled but not yet settled (waiting for the broker's acknowledgements, or for a
/// retry's backoff) per handler; past it the workers wait, so a stalled broker cannot make
/// the host hold unbounded work.
const MAX_UNSETTLED: usize = 1024;

struct Worker {
    index: usize,
    engine: wasmtime::Engine,
    publisher: Arc<dyn Publisher>,
    nn: Arc<crate::nn::NnHost>,
    results: Option<Arc<crate::results::Results>>,
    component: LoadedComponent,
    settling: Settling,
    unsettled: Arc<Semaphore>,
    live: Option<Live>,
}

impl Worker {
    async fn run(
        mut self,
        deliveries: Arc<Mutex<mpsc::Receiver<Delivery>>>,
        retries: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
        mut controls: mpsc::Receiver<Control>,
    ) {
        let mut tasks = JoinSet::new();
        let mut controlled = true;
        let mut bound = batch_bound(&self.component);
        loop {
            while tasks.try_join_next().is_some() {}
            let job = tokio::select! {
                biased;
                control = controls.recv(), if controlled => {
                    match control {
                        Some(Control::Report(reply)) => {
                            let _ = reply.send(self.report().await);
                        }
                        Some(Control::Replace(component, done)) => {
                            self.replace(component);
                            bound = batch_bound(&self.component);
                            let _ = done.send(());
                        }
                        // The group is stopping: drain what the dispatcher already handed over.
                        None => controlled = false,
                    }
                    continue;
                }
                Some(job) = async { retries.lock().await.recv().await } => job,
                delivery = async { deliveries.lock().await.recv().await } => match delivery {
                    Some(delivery) => Job::first(delivery),
                    None => break,
                },
            };
            let mut jobs = vec![job];
            // A first attempt takes along what else is already waiting; retries go alone.
            if !jobs[0].retry
                && let Ok(mut waiting) = deliveries.try_lock()
            {
                while jobs.len() < bound {
                    match waiting.try_recv() {
                        Ok(delivery) => jobs.push(Job::first(delivery)),
                        Err(_) => break,
                    }
                }
            }
            let permits = u32::try_from(jobs.len()).unwrap_or(u32::MAX);
            let Ok(permit) = self.unsettled.clone().acquire_many_owned(permits).await else {
                break;
            };
            let settling = self.settling.clone();
            let span = settling.process_span(&jobs);
            let (receipts, outcomes) = match self.call(&jobs).instrument(span.clone()).await {
                Ok(done) => done,
                // A batch that failed as a whole (a trap) says nothing about which message
                // caused it: each goes again alone, without counting an attempt, so only the
                // culprit is charged and its neighbours are handled.
                Err(failure) if jobs.len() > 1 => {
                    tracing::warn!(
                        "{}: a batch of {} failed as a whole ({failure}); handling its messages \
                         one by one",
                        self.component.name,
                        jobs.len()
                    );
                    for job in jobs {
                        let _ = self.settling.retries.send(Job { retry: true, ..job });
                    }
                    continue;
                }
                Err(failure) => (Vec::new(), vec![Err(failure)]),
            };
            // The broker's acknowledgements are awaited off the worker, which moves on to the
            // next message; offsets are committed in order regardless.
            tasks.spawn(
                async move {
                    let _permit = permit;
                    settling.settle(jobs, receipts, outcomes).await;
                }
                .instrument(span),
            );
        }
        // Stopping: let every handled message settle before the group commits.
        tasks.join_all().await;
    }

    /// Switches to another build of the component: the next message gets a fresh instance
    /// of it, and the messages it handles are settled (retried, dead-lettered) as its.
    fn replace(&mut self, component: LoadedComponent) {
        tracing::debug!(
            "{} worker {}: {} replaces {}",
            self.component.name,
            self.index,
            component.version,
            self.component.version
        );
        self.settling.version = component.version.clone();
        self.settling.config = component.config.clone();
        self.settling.policy = component.config.retry;
        self.component = component;
        self.live = None;
    }

    async fn live(&mut self) -> Result<&mut Live, Failure> {
        if self.live.is_none() {
            let shared = Shared {
                engine: &self.engine,
                publisher: &self.publisher,
                nn: &self.nn,
                results: self.results.as_ref(),
            };
            let mut store = new_store(
                &shared,
                &self.component,
                ReceiptSink::Collect(Vec::new()),
                self.settling.stats.metrics.clone(),
            )
            .map_err(|e| Failure::Trap(e.to_string()))?;
            let instance = self
                .component
                .pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| Failure::Trap(format!("cannot instantiate: {e:#}")))?;
            let exports_error = |e: wasmtime::Error| Failure::Trap(format!("{e:#}"));
            let handle = self
                .component
                .handle
                .as_ref()
                .ok_or_else(|| Failure::Trap("not a handler: it has no incoming-handler".into()))?
                .load(&mut store, &instance)
                .map_err(exports_error)?;
            let batch = match &self.component.batch {
                Some(indices) => Some(indices.load(&mut store, &instance).map_err(exports_error)?),
                None => None,
            };
            tracing::debug!(
                "{} worker {}: new instance",
                self.component.name,
                self.index
            );
            self.live = Some(Live {
                store,
                instance,
                handle,
                batch,
            });
        }
        self.live
            .as_mut()
            .ok_or_else(|| Failure::Trap("no instance".into()))
    }

    /// Hands `jobs` to the instance in one call (`handle` for one, `handle-batch` for more) and
    /// returns the receipts of the messages it sent and one outcome per job; `Err` when the
    /// call as a whole failed (the instance trapped or could not be made).
    async fn call(
        &mut self,
        jobs: &[Job],
    ) -> Result<(Vec<DeliveryReceipt>, Vec<Result<(), Failure>>), Failure> {
        let max_call_ms = self.component.config.limits.max_call_ms;
        let name = self.component.name.clone();
        let stats = self.settling.stats.clone();
        let live = self.live().await?;
        let state = live.store.data_mut();
        // The limit is per message, so a batch gets the time its messages would get one by one.
        let budget = max_call_ms.saturating_mul(jobs.len() as u64);
        state.deadline = (max_call_ms > 0).then(|| Instant::now() + Duration::from_millis(budget));
        let mut messages = Vec::with_capacity(jobs.len());
        for job in jobs {
            let message = state
                .messaging()
                .push_incoming(&job.delivery.message)
                .map_err(|e| Failure::Trap(format!("{e:#}")))?;
            messages.push(message);
        }
        state.messaging.begin_call(jobs.len());
        let deadline = state.deadline;
        let call = async {
            match (&live.batch, messages.len()) {
                (Some(batch), 2..) => batch
                    .call_handle_batch(&mut live.store, &messages)
                    .await
                    .map(|outcomes| outcomes.into_iter().map(outcome).collect::<Vec<_>>()),
                _ => match messages.pop() {
                    Some(message) => live
                        .handle
                        .call_handle(&mut live.store, message)
                        .await
                        .map(|result| vec![outcome(result)]),
                    None => Ok(Vec::new()),
                },
            }
        };
        let started = Instant::now();
        let result = within_deadline(&name, deadline, call).await;
        stats.metrics.call_took(started.elapsed());
        let state = live.store.data_mut();
        state.deadline = None;
        state.messaging.end_call();
        let receipts = state.messaging.take_receipts();
        match result {
            Err(trap) => {
                self.settling.stats.count_trap();
                self.live = None;
                Err(Failure::Trap(format!("{trap:#}")))
            }
            Ok(outcomes) if outcomes.len() != jobs.len() => Err(Failure::Handler(format!(
                "handle-batch returned {} outcomes for {} messages; it must return one per \
                 message, in order",
                outcomes.len(),
                jobs.len()
            ))),
            Ok(outcomes) => Ok((receipts, outcomes)),
        }
    }

    async fn report(&mut self) -> Option<String> {
        let index = self.component.report?;
        let name = self.component.name.clone();
        let live = self.live().await.ok()?;
        let function = live
            .instance
            .get_typed_func::<(), (String,)>(&mut live.store, &index)
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        live.store.data_mut().deadline = Some(deadline);
        let call = function.call_async(&mut live.store, ());
        let result = within_deadline(&name, Some(deadline), call).await;
        live.store.data_mut().deadline = None;
        match result {
            Ok((report,)) => Some(report),
            Err(e) => {
                tracing::warn!("{}: report failed: {e:#}", self.component.name);
                self.live = None;
                None
            }
        }
    }
}
