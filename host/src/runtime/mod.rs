//! Runs components: compiles (or loads from cache) each one, instantiates it with exactly what
//! its manifest entry grants, and either runs it once (a command) or feeds it messages from its
//! subscription through a pool of warm instances (a handler).
//!
//! Isolation is per instance: a trap, a call past its deadline or a memory limit hit costs
//! that one instance, which is thrown away and replaced; the message is retried, and settled
//! only once handled or given up on after the retry policy's attempts.

pub mod cache;
pub mod engine;
pub mod host;
pub mod nn;
pub mod progress;
pub mod results;
pub mod test_support;
mod worker;
pub mod world;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use wasmtime::component::{Component, ComponentExportIndex, InstancePre, Linker};
use wasmtime::{Engine, Store, StoreLimitsBuilder};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::config::ComponentConfig;
use crate::metrics::{ComponentMetrics, Metrics};
use crate::nn::NnHost;
use crate::results::Results;
use engine::{CacheOutcome, EpochTicker, PoolSize};
use host::bindings::exports::switchyard::host::batch::GuestIndices as BatchIndices;
use host::bindings::exports::wasi::messaging::incoming_handler::GuestIndices as IncomingHandlerIndices;
use host::{ComponentState, MessageLimits, MessagingCtx, ReceiptSink};
use nn::NnCtx;
use results::ResultsCtx;
use switchyard_broker::{Broker, BrokerError, Publisher};

pub use worker::{HandlerGroup, HandlerStats};

/// Name of the optional report export (`switchyard:host/report`).
pub const REPORT_INTERFACE: &str = "switchyard:host/report@0.1.0";

/// Why the runtime could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine could not be configured.
    #[error("cannot start the WebAssembly engine: {0}")]
    Engine(String),
    /// A component could not be read, compiled or linked.
    #[error("component {path}: {message}")]
    Component {
        /// The `.wasm` path.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A component does not fit the role its manifest entry gives it.
    #[error("{component}: {problem}")]
    World {
        /// The component's name in the manifest.
        component: String,
        /// What does not fit, and the fix (its text is part of this error's, so it is not
        /// also a `source`, which `{:#}` would print twice).
        problem: Box<world::WorldError>,
    },
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The results store cannot be opened.
    #[error(transparent)]
    Results(#[from] crate::results::ResultsError),
    /// The metrics cannot be registered or served.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// A component trapped or failed outside of message handling.
    #[error("component {component}: {message}")]
    Failed {
        /// The component's name.
        component: String,
        /// What happened.
        message: String,
    },
}

/// Checks what can be checked of a component before anything is compiled or any broker is
/// reached: its world against the role its manifest entry gives it (from its bytes), and the
/// inference engine the entry asks for. A component that cannot run is refused at once, with
/// the fix. Returns the component's imports and exports.
pub fn check_before_compiling(
    name: &str,
    config: &ComponentConfig,
) -> Result<world::Shape, RuntimeError> {
    check_as(name, config, world::Role::of(config))
}

/// [`check_before_compiling`] for a component run as `role`.
fn check_as(
    name: &str,
    config: &ComponentConfig,
    role: world::Role,
) -> Result<world::Shape, RuntimeError> {
    let world_error = |problem| RuntimeError::World {
        component: name.to_string(),
        problem: Box::new(problem),
    };
    let shape = world::shape_of_file(&config.wasm).map_err(world_error)?;
    world::check(&config.wasm, &shape, role).map_err(world_error)?;
    if let Some(engine) = config.nn {
        engine
            .check_available()
            .map_err(|reason| RuntimeError::Failed {
                component: name.to_string(),
                message: format!(
                    "its manifest entry asks for nn = \"{}\", but {reason}; or choose \
                     nn = \"auto\" or \"tract\"",
                    engine.manifest_value()
                ),
            })?;
    }
    Ok(shape)
}

/// Options for a [`Runtime`].
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Where compiled components are cached; `None` compiles every component at every start.
    pub cache_dir: Option<PathBuf>,
    /// Instance pool size.
    pub pool: PoolSize,
    /// Whether commands' `switchyard:host/progress` is shown on standard error.
    pub show_progress: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            cache_dir: engine::default_cache_dir(),
            pool: PoolSize {
                instances: 32,
                max_memory_bytes: 256 << 20,
            },
            show_progress: false,
        }
    }
}

/// The engine, the linker and the broker connection shared by every component of a host.
pub struct Runtime {
    engine: Engine,
    linker: Linker<ComponentState>,
    // Before `broker`: the publisher must go before the broker (an embedded one stops with it).
    publisher: Arc<dyn Publisher>,
    broker: Arc<dyn Broker>,
    nn: Arc<NnHost>,
    /// Where components' `switchyard:host/results` rows go, when the host has a store.
    results: Option<Arc<Results>>,
    cache: Option<cache::ArtifactCache>,
    /// Test mode (`switchyard test`): where sends are recorded, and `test-support` is linked.
    sent_log: Option<Arc<test_support::SentLog>>,
    pool: engine::PoolSize,
    /// Whether commands' progress is shown.
    show_progress: bool,
    /// What its components did, for `/metrics`.
    metrics: Arc<Metrics>,
    _ticker: EpochTicker,
}

/// A compiled component, ready to be instantiated many times.
#[derive(Clone)]
pub struct LoadedComponent {
    name: Arc<str>,
    config: Arc<ComponentConfig>,
    pre: InstancePre<ComponentState>,
    report: Option<ComponentExportIndex>,
    /// Where its `wasi:messaging/incoming-handler` export is (handlers only).
    handle: Option<IncomingHandlerIndices>,
    /// Where its `switchyard:host/batch` export is, when it has one.
    batch: Option<BatchIndices>,
    /// Which build of it this is (`sha256:` and 12 hex digits of the `.wasm`).
    version: Arc<str>,
    /// Whether it was compiled now or loaded from the cache.
    pub cache: CacheOutcome,
    /// How long compiling or loading took.
    pub load_time: Duration,
}

impl LoadedComponent {
    /// The component's name in the manifest.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which build of it this is: `sha256:` and the first 12 hex digits of its `.wasm`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Its manifest entry.
    pub fn config(&self) -> &ComponentConfig {
        &self.config
    }

    /// Whether the host hands it several messages per call (it exports
    /// `switchyard:host/batch`).
    pub fn takes_batches(&self) -> bool {
        self.batch.is_some()
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    /// The exit code (0: success).
    pub exit_code: i32,
    /// Messages the broker acknowledged.
    pub delivered: u64,
    /// Messages the broker refused or lost, with the first error.
    pub failed: u64,
    /// The first delivery error, if any.
    pub first_error: Option<String>,
}

impl Runtime {
    /// Creates a runtime on a broker.
    pub async fn new(
        broker: Arc<dyn Broker>,
        options: RuntimeOptions,
    ) -> Result<Self, RuntimeError> {
        Self::assemble(broker, options, None).await
    }

    /// Creates a runtime in test mode, as `switchyard test` runs a component's unit tests: no
    /// broker (sends are recorded and acknowledged at once, nothing can subscribe) and
    /// `switchyard:host/test-support` linked, through which the tests read what was sent.
    pub async fn for_unit_tests(options: RuntimeOptions) -> Result<Self, RuntimeError> {
        let broker = test_support::UnitTestBroker::default();
        let sent = broker.sent().clone();
        Self::assemble(Arc::new(broker), options, Some(sent)).await
    }

    async fn assemble(
        broker: Arc<dyn Broker>,
        options: RuntimeOptions,
        sent_log: Option<Arc<test_support::SentLog>>,
    ) -> Result<Self, RuntimeError> {
        let engine = engine::engine(options.pool)?;
        let mut linker = Linker::new(&engine);
        let linked = host::add_to_linker(&mut linker).and_then(|()| match sent_log {
            Some(_) => test_support::add_to_linker(&mut linker),
            None => Ok(()),
        });
        linked.map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let publisher = broker.publisher().await?;
        // Test mode writes results into a store in memory, which each test run starts empty.
        let results = match sent_log {
            Some(_) => Some(Arc::new(Results::in_memory()?)),
            None => None,
        };
        let metrics = Metrics::new()?;
        Ok(Self {
            results,
            metrics: Arc::new(metrics),
            _ticker: EpochTicker::start(&engine),
            engine,
            linker,
            broker,
            publisher,
            nn: Arc::new(NnHost::new()),
            cache: match options.cache_dir {
                Some(dir) => cache::ArtifactCache::open(&dir)
                    .inspect_err(|e| tracing::warn!("not caching compiled components: {e}"))
                    .ok(),
                // Test mode runs without a cache on purpose (see `switchyard test`).
                None if sent_log.is_some() => None,
                None => {
                    let reason = cache::CacheError::NoDirectory;
                    tracing::warn!("not caching compiled components: {reason}");
                    None
                }
            },
            sent_log,
            pool: options.pool,
            show_progress: options.show_progress,
        })
    }

    /// Sends components' `switchyard:host/results` rows to `results` (without a store, their
    /// inserts return the `unavailable` error).
    pub fn with_results(mut self, results: Arc<Results>) -> Self {
        self.results = Some(results);
        self
    }

    /// The results store, if it has one.
    pub fn results(&self) -> Option<&Arc<Results>> {
        self.results.as_ref()
    }

    /// Its metrics (served by a [`crate::metrics::MetricsServer`] when the host asks for one).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The size of its instance pool, fixed when it was created.
    pub fn pool(&self) -> engine::PoolSize {
        self.pool
    }

    /// The broker this runtime uses.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Compiles (or loads from cache) and links a component, checking it fits its role: a
    /// handler must export `wasi:messaging/incoming-handler`, a command `wasi:cli/run`.
    pub fn load(
        &self,
        name: &str,
        config: &ComponentConfig,
    ) -> Result<LoadedComponent, RuntimeError> {
        let started = Instant::now();
        let path = config.wasm.clone();
        let role = match self.sent_log {
            Some(_) => world::Role::UnitTests,
            None => world::Role::of(config),
        };
        check_as(name, config, role)?;
        let engine::Compiled {
            component,
            outcome: cache,
            version,
        } = engine::load_component(&self.engine, &path, self.cache.as_ref())?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| RuntimeError::Component {
                path: path.clone(),
                message: format!(
                    "it needs imports this host does not provide ({e:#}); switchyard provides WASI \
                 0.2, wasi:messaging@0.2.0-draft, switchyard:host/results and progress @0.1.0, and \
                 wasi:nn@0.2.0-rc-2024-10-28"
                ),
            })?;
        let role_error = |world: &str, export: &str| RuntimeError::Component {
            path: path.clone(),
            message: format!(
                "{role} must export {export}: build it against the {world} world in wit/",
                role = if config.is_handler() {
                    "a component with `subscribe` topics"
                } else {
                    "a component without `subscribe` topics (a command)"
                }
            ),
        };
        let (handle, batch) = if config.is_handler() {
            let handle = IncomingHandlerIndices::new(&pre).map_err(|_| {
                role_error(
                    "switchyard:host/handler",
                    "wasi:messaging/incoming-handler@0.2.0-draft",
                )
            })?;
            (Some(handle), BatchIndices::new(&pre).ok())
        } else {
            wasmtime_wasi::p2::bindings::CommandPre::new(pre.clone())
                .map_err(|_| role_error("switchyard:host/producer", "wasi:cli/run@0.2.x"))?;
            (None, None)
        };
        let report = report_export(&component);
        Ok(LoadedComponent {
            name: name.into(),
            config: Arc::new(config.clone()),
            pre,
            report,
            handle,
            batch,
            version: version.into(),
            cache,
            load_time: started.elapsed(),
        })
    }

    /// The publisher every component sends through.
    pub fn publisher(&self) -> &Arc<dyn Publisher> {
        &self.publisher
    }

    /// Runs a command component once (its `wasi:cli/run`), waits until the broker has
    /// acknowledged or refused every message it sent, and reports how it ended.
    pub async fn run_command(
        &self,
        component: &LoadedComponent,
    ) -> Result<CommandOutcome, RuntimeError> {
        self.run_command_through(component, &self.publisher).await
    }

    /// [`Runtime::run_command`], sending through `publisher` (a
    /// [`switchyard_broker::window::PublishWindow`] around [`Runtime::publisher`], say).
    pub async fn run_command_through(
        &self,
        component: &LoadedComponent,
        publisher: &Arc<dyn Publisher>,
    ) -> Result<CommandOutcome, RuntimeError> {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let counter = tokio::spawn(async move {
            let (mut delivered, mut failed, mut first_error) = (0u64, 0u64, None);
            while let Some(receipt) = receiver.recv().await {
                match switchyard_broker::DeliveryReceipt::wait(receipt).await {
                    Ok(()) => delivered += 1,
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (delivered, failed, first_error)
        });

        let failed = |message: String| RuntimeError::Failed {
            component: component.name.to_string(),
            message,
        };
        let mut store = new_store(
            &self.engine,
            publisher,
            &self.nn,
            self.results.as_ref(),
            component,
            ReceiptSink::Forward(sender),
            self.metrics.component(&component.name),
        )?;
        let max_call_ms = component.config.limits.max_call_ms;
        let deadline =
            (max_call_ms > 0).then(|| Instant::now() + Duration::from_millis(max_call_ms));
        store.data_mut().deadline = deadline;
        store.data_mut().progress =
            progress::ProgressCtx::new(component.name.clone(), self.show_progress);
        if let Some(sent_log) = &self.sent_log {
            store.data_mut().test_support = Some(sent_log.clone());
            store.data_mut().messaging.grant_every_topic();
            store.data_mut().results = ResultsCtx::new(
                component.name.clone(),
                results::Grants::Every,
                self.results.clone(),
            );
        }
        let command = wasmtime_wasi::p2::bindings::CommandPre::new(component.pre.clone())
            .map_err(|e| failed(format!("{e:#}")))?
            .instantiate_async(&mut store)
            .await
            .map_err(|e| failed(format!("cannot instantiate: {e:#}")))?;
        let run = command.wasi_cli_run().call_run(&mut store);
        let exit_code = match within_deadline(&component.name, deadline, run).await {
            Ok(Ok(())) => 0,
            Ok(Err(())) => 1,
            Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) => exit.0,
                None => return Err(failed(format!("trapped: {e:#}"))),
            },
        };
        store.data_mut().progress.finish();
        drop(store);
        let (delivered, failed_count, first_error) = counter
            .await
            .map_err(|e| failed(format!("delivery counter failed: {e}")))?;
        Ok(CommandOutcome {
            exit_code,
            delivered,
            failed: failed_count,
            first_error,
        })
    }

    /// Subscribes a handler component and starts its workers.
    pub async fn start_handler(
        &self,
        component: &LoadedComponent,
    ) -> Result<HandlerGroup, RuntimeError> {
        worker::start(self, component).await
    }
}

/// A fresh store for `component` with exactly its grants: its arguments, its preopened
/// directories, no environment variables, no network, its memory limit, and an epoch callback
/// that yields every tick and traps once the call's deadline has passed.
fn new_store(
    engine: &Engine,
    publisher: &Arc<dyn Publisher>,
    nn: &Arc<NnHost>,
    results: Option<&Arc<Results>>,
    component: &LoadedComponent,
    receipts: ReceiptSink,
    metrics: ComponentMetrics,
) -> Result<Store<ComponentState>, RuntimeError> {
    let config = &component.config;
    let mut wasi = WasiCtxBuilder::new();
    wasi.inherit_stdout()
        .stderr(crate::progress::GuestStderr::new())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .arg(component.name.as_ref())
        .args(&config.args);
    for preopen in &config.preopens {
        let perms = if preopen.writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        wasi.preopened_dir(&preopen.host, &preopen.guest, perms)
            .map_err(|e| RuntimeError::Failed {
                component: component.name.to_string(),
                message: format!("cannot open preopen {}: {e:#}", preopen.host.display()),
            })?;
    }
    let limits = StoreLimitsBuilder::new()
        .memory_size(usize::try_from(config.limits.max_memory_mb << 20).unwrap_or(usize::MAX))
        .trap_on_grow_failure(true)
        .build();
    let messaging = MessagingCtx::new(
        component.name.clone(),
        &component.version,
        publisher.clone(),
        Arc::new(config.publish.iter().cloned().collect::<HashSet<_>>()),
        receipts,
        MessageLimits::from(&config.limits),
        metrics,
    );
    let nn = NnCtx::new(component.name.clone(), config.nn, nn.clone());
    let results = ResultsCtx::new(
        component.name.clone(),
        results::Grants::Tables(Arc::new(config.results.iter().cloned().collect())),
        results.cloned(),
    );
    let max_resources = usize::try_from(config.limits.max_resources).unwrap_or(usize::MAX);
    let mut store = Store::new(
        engine,
        ComponentState::new(wasi.build(), limits, max_resources, messaging, nn, results),
    );
    store.limiter(|state| state.limiter());
    let name = component.name.clone();
    store.epoch_deadline_callback(move |context| match context.data().deadline {
        Some(deadline) if Instant::now() >= deadline => Err(wasmtime::Error::msg(format!(
            "component {name} exceeded its max_call_ms limit"
        ))),
        // Yield to the async executor each tick so one busy guest cannot starve the
        // others and the broker's tasks.
        _ => Ok(wasmtime::UpdateDeadline::Yield(1)),
    });
    store.set_epoch_deadline(1);
    Ok(store)
}

/// How long past its deadline a call waiting in a host call is cut off. Running Wasm is
/// stopped at the deadline by the epoch callback; this only catches a guest blocked in the
/// host, so it leaves that callback time to act first.
const HOST_WAIT_GRACE: Duration = Duration::from_millis(250);

/// Runs one guest call under `deadline`. The epoch callback stops a guest that is running Wasm
/// past its deadline, but never runs while the guest waits in a host call (sleeping on a
/// clock, polling a socket), so such a call is dropped here instead: it costs the instance,
/// as a trap does, and never the worker.
async fn within_deadline<T>(
    component: &str,
    deadline: Option<Instant>,
    call: impl std::future::Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    let Some(deadline) = deadline else {
        return call.await;
    };
    let cut_off = tokio::time::Instant::from_std(deadline) + HOST_WAIT_GRACE;
    match tokio::time::timeout_at(cut_off, call).await {
        Ok(result) => result,
        Err(_) => Err(wasmtime::Error::msg(format!(
            "component {component} exceeded its max_call_ms limit while waiting in a host call"
        ))),
    }
}

fn report_export(component: &Component) -> Option<ComponentExportIndex> {
    let interface = component.get_export_index(None, REPORT_INTERFACE)?;
    component.get_export_index(Some(&interface), "report")
}
