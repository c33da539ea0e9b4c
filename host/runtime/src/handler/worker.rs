//! One worker of a handler: a warm instance it reuses message after message, the call that
//! hands it one message (`handle`) or several (`handle-batch`), and replacing the instance
//! when it traps or its component's build changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;
use wasmtime::Store;
use wasmtime::component::Instance;

use super::Control;
use super::settle::{Failure, Job, Settling, describe, outcome};
use crate::LoadedComponent;
use crate::bindings::exports::switchyard::host::batch::Guest as BatchExport;
use crate::bindings::exports::wasi::messaging::incoming_handler::Guest as HandleExport;
use crate::instance::{
    Deadline, InstanceState, MAX_CALL_LIMIT, Shared, new_store, within_deadline,
};
use crate::interfaces::messaging::{CallOutputs, ReceiptSink};
use crate::manifest::DeliveryGuarantee;
use switchyard_broker::{Delivery, Publisher};

/// The most messages a worker hands `component` in one call.
pub(super) fn batch_bound(component: &LoadedComponent) -> usize {
    if component.takes_batches() {
        component.config.batch.max(1)
    } else {
        1
    }
}

/// A warm instance.
pub(super) struct Live {
    store: Store<InstanceState>,
    instance: Instance,
    handle: HandleExport,
    batch: Option<BatchExport>,
}

/// The longest an instance's `switchyard:host/warm-up` may take (reading and planning a model
/// inside Wasm takes a second or two; a minute means it is stuck).
const WARM_UP_LIMIT: Duration = Duration::from_secs(60);
/// [`WARM_UP_LIMIT`] as the error of a warm-up that overran it names it.
const WARM_UP_LIMIT_NAME: &str = "the 60 s warm-up limit";

/// Messages handled but not yet settled (waiting for the broker's acknowledgements, or for a
/// retry's backoff) per handler; past it the workers wait, so a stalled broker cannot make
/// the host hold unbounded work.
pub(super) const MAX_UNSETTLED: usize = 1024;

pub(super) struct Worker {
    pub(super) index: usize,
    pub(super) engine: wasmtime::Engine,
    pub(super) publisher: Arc<dyn Publisher>,
    pub(super) nn: Arc<crate::nn::NnHost>,
    pub(super) tables: Arc<crate::results::Tables>,
    pub(super) results: Option<Arc<crate::results::Results>>,
    pub(super) component: LoadedComponent,
    pub(super) settling: Settling,
    pub(super) unsettled: Arc<Semaphore>,
    pub(super) live: Option<Live>,
    /// Counts the workers whose first instance is made and warmed up (or failed to be): the
    /// group is ready once every worker has counted itself.
    pub(super) warmed: Arc<watch::Sender<usize>>,
}

impl Worker {
    pub(super) async fn run(
        mut self,
        deliveries: Arc<Mutex<mpsc::Receiver<Delivery>>>,
        retries: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
        mut controls: mpsc::Receiver<Control>,
    ) {
        let mut tasks = JoinSet::new();
        let mut controlled = true;
        let mut bound = batch_bound(&self.component);
        // The first instance is made, and warmed up, before the group counts as started, so
        // no request waits for it.
        self.warm_up().await;
        self.warmed.send_modify(|warmed| *warmed += 1);
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
                            self.warm_up().await;
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
            // A first attempt takes along what else is already waiting, and what comes within
            // the manifest's wait; retries go alone.
            let wait = Duration::from_millis(self.component.config.batch_max_wait_ms);
            if !jobs[0].retry && bound > 1 {
                if wait.is_zero() {
                    if let Ok(mut waiting) = deliveries.try_lock() {
                        while jobs.len() < bound {
                            match waiting.try_recv() {
                                Ok(delivery) => jobs.push(Job::first(delivery)),
                                Err(_) => break,
                            }
                        }
                    }
                } else {
                    let until = tokio::time::Instant::now() + wait;
                    let mut waiting = deliveries.lock().await;
                    while jobs.len() < bound {
                        match tokio::time::timeout_at(until, waiting.recv()).await {
                            Ok(Some(delivery)) => jobs.push(Job::first(delivery)),
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
            }
            let permits = u32::try_from(jobs.len()).unwrap_or(u32::MAX);
            let Ok(permit) = self.unsettled.clone().acquire_many_owned(permits).await else {
                break;
            };
            let settling = self.settling.clone();
            let span = settling.process_span(&jobs);
            let (outputs, outcomes) = match self.call(&jobs).instrument(span.clone()).await {
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
                Err(failure) => (CallOutputs::Sent(Vec::new()), vec![Err(failure)]),
            };
            // The broker's acknowledgements are awaited off the worker, which moves on to the
            // next message; offsets are committed in order regardless.
            tasks.spawn(
                async move {
                    let _permit = permit;
                    settling.settle(jobs, outputs, outcomes).await;
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

    /// Makes a warm instance now rather than at the next message; one that cannot be made is
    /// logged here and tried again at the next message, which then fails with the reason.
    async fn warm_up(&mut self) {
        if let Err(failure) = self.live().await {
            tracing::warn!(
                "{} worker {}: no instance yet ({failure}); trying again at the first message",
                self.component.name,
                self.index
            );
        }
    }

    async fn live(&mut self) -> Result<&mut Live, Failure> {
        if self.live.is_none() {
            let shared = Shared {
                engine: &self.engine,
                publisher: &self.publisher,
                nn: &self.nn,
                tables: &self.tables,
                results: self.results.as_ref(),
            };
            let sink = match self.component.config.delivery {
                DeliveryGuarantee::AtLeastOnce => ReceiptSink::Collect(Vec::new()),
                DeliveryGuarantee::ExactlyOnce => ReceiptSink::Hold(Vec::new()),
            };
            let mut store = new_store(
                &shared,
                &self.component,
                sink,
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
            if let Some(indices) = &self.component.warm_up {
                let warm_up = indices.load(&mut store, &instance).map_err(exports_error)?;
                let started = Instant::now();
                let deadline = Deadline::after(WARM_UP_LIMIT, WARM_UP_LIMIT_NAME);
                store.data_mut().deadline = Some(deadline);
                store.data_mut().messaging.set_warming_up(true);
                let call = warm_up.call_warm_up(&mut store);
                let result = within_deadline(&self.component.name, Some(deadline), call).await;
                store.data_mut().deadline = None;
                store.data_mut().messaging.set_warming_up(false);
                match result {
                    Ok(Ok(())) => tracing::debug!(
                        "{} worker {}: warmed up in {:?}",
                        self.component.name,
                        self.index,
                        started.elapsed()
                    ),
                    Ok(Err(error)) => {
                        return Err(Failure::Handler(format!("warm-up: {}", describe(&error))));
                    }
                    Err(trap) => {
                        self.settling.stats.count_trap();
                        return Err(Failure::Trap(format!("its warm-up trapped: {trap:#}")));
                    }
                }
            }
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
    /// returns what it sent and one outcome per job; `Err` when the call as a whole failed
    /// (the instance trapped or could not be made).
    async fn call(
        &mut self,
        jobs: &[Job],
    ) -> Result<(CallOutputs, Vec<Result<(), Failure>>), Failure> {
        let max_call_ms = self.component.config.limits.max_call_ms;
        let name = self.component.name.clone();
        let stats = self.settling.stats.clone();
        let live = self.live().await?;
        let state = live.store.data_mut();
        // The limit is per message, so a batch gets the time its messages would get one by one.
        let budget = max_call_ms.saturating_mul(jobs.len() as u64);
        state.deadline = (max_call_ms > 0)
            .then(|| Deadline::after(Duration::from_millis(budget), MAX_CALL_LIMIT));
        let mut messages = Vec::with_capacity(jobs.len());
        for job in jobs {
            let message = state
                .messaging()
                .push_incoming(&job.delivery.message, job.attempt)
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
        let outputs = state.messaging.take_outputs();
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
            Ok(outcomes) => Ok((outputs, outcomes)),
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
        let deadline = Deadline::after(Duration::from_secs(5), "the 5 s report limit");
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
