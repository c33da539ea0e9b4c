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
//! An exactly-once handler (`delivery = "exactly-once"`) sends nothing during a call: the
//! messaging interface holds what the call sent, and a success commits it with the message's
//! offset in one Kafka transaction (see `switchyard_broker::kafka`'s transactions), so a host
//! that dies between the two leaves neither. On Pub/Sub, which has no transactions, a success
//! stores what the call sent and then confirms the message's acknowledgement (Pub/Sub's
//! exactly-once delivery): a confirmed message never comes again, but a host that dies between
//! the two sends the outputs again when the message is handled again. A failed attempt's outputs are dropped;
//! a dead letter is the output of its original's transaction. A transaction that will not
//! commit (the partition moved, the member was fenced) leaves the message to whoever holds it
//! now, which handles it again, so it is not retried here. A batch commits as a whole: a call
//! with a failure commits nothing, and its other messages go again alone, uncharged.
//!
//! Stopping stops the intake, lets the workers finish what they hold and every handled message
//! settle, and commits before the member leaves its group; a message waiting for a retry is
//! left unsettled for redelivery.

mod settle;
mod stats;
mod transactional_id;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::{LoadedComponent, Runtime, RuntimeError};
use crate::manifest::DeliveryGuarantee;
use settle::DEAD_LETTER_PARTITIONS;
use settle::Settling;
pub use stats::{HandlerCounts, HandlerStats};
use switchyard_broker::{
    Delivery, ErrorKind, Guarantee, PartitionLag, Subscriber, SubscriptionSpec, TopicSpec,
};
use worker::{MAX_UNSETTLED, Worker, batch_bound};

use crate::metrics::ComponentMetrics;

pub(super) enum Control {
    Report(oneshot::Sender<Option<String>>),
    /// Handle the next messages with this build (answering once it does): the call in
    /// progress, and the settling of what it handled, finish on the build that started them.
    Replace(LoadedComponent, oneshot::Sender<()>),
}

/// A running handler component. Stop it with [`HandlerGroup::stop`] to commit what it did.
pub struct HandlerGroup {
    name: Arc<str>,
    /// The manifest entry it started with (what [`HandlerGroup::replace`] may not change).
    config: Arc<crate::manifest::ComponentConfig>,
    stats: Arc<HandlerStats>,
    subscriber: Arc<dyn Subscriber>,
    stop: watch::Sender<bool>,
    dispatcher: JoinHandle<()>,
    workers: Vec<(JoinHandle<()>, mpsc::Sender<Control>)>,
    /// An exactly-once member's transactional id, held until the member has left.
    transactional_id: Option<transactional_id::TransactionalId>,
    /// How many workers have made (and warmed up) their first instance.
    warmed: watch::Receiver<usize>,
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
    /// [`Subscriber::joined`](switchyard_broker::Subscriber::joined)) and every worker has its
    /// first instance made and warmed up (`switchyard:host/warm-up`), so a message sent now
    /// waits for neither.
    pub async fn joined(&self) -> Result<(), RuntimeError> {
        self.subscriber.joined().await?;
        let workers = self.workers.len();
        // An error means every worker has ended (the group is stopping): nothing to wait for.
        let _ = self
            .warmed
            .clone()
            .wait_for(|warmed| *warmed >= workers)
            .await;
        Ok(())
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
    /// [`ComponentConfig::can_replace_in_place`](crate::manifest::ComponentConfig::can_replace_in_place).
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
        drop(self.transactional_id);
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

pub(crate) async fn start(
    runtime: &Runtime,
    component: &LoadedComponent,
) -> Result<HandlerGroup, RuntimeError> {
    let config = &component.config;
    let group = config
        .group
        .clone()
        .unwrap_or_else(|| component.name.to_string());
    // Only Kafka's transactions need a producer id; Pub/Sub's exactly-once delivery has none.
    let kafka = runtime.broker.messaging_system() == switchyard_broker::system::KAFKA;
    let exactly_once = config.delivery == DeliveryGuarantee::ExactlyOnce;
    let transactional_id = match exactly_once && kafka {
        true => Some(transactional_id::take(&group)?),
        false => None,
    };
    let guarantee = match (exactly_once, &transactional_id) {
        (false, _) => Guarantee::AtLeastOnce,
        (true, held) => Guarantee::ExactlyOnce {
            transactional_id: held
                .as_ref()
                .map_or_else(|| group.clone(), |held| held.id.clone()),
        },
    };
    let spec = SubscriptionSpec {
        group,
        topics: config.subscribe.clone(),
        start: config.start,
        guarantee,
        isolation: Default::default(),
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
    let (warmed_sender, warmed) = watch::channel(0);
    let warmed_sender = Arc::new(warmed_sender);
    let mut workers = Vec::with_capacity(config.workers);
    for index in 0..config.workers {
        let (control, controls) = mpsc::channel(1);
        let worker = Worker {
            index,
            engine: runtime.engine.clone(),
            publisher: runtime.publisher.clone(),
            nn: runtime.nn.clone(),
            tables: runtime.tables.clone(),
            results: runtime.results.clone(),
            component: component.clone(),
            settling: settling.clone(),
            unsettled: unsettled.clone(),
            live: None,
            warmed: warmed_sender.clone(),
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
        transactional_id,
        warmed,
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
