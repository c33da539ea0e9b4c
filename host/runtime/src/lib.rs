//! switchyard's WebAssembly runtime: runs sandboxed components against a broker through
//! `wasi:messaging@0.2.0-draft`, with exactly what each one's manifest entry grants.
//!
//! This crate is the host without any particular application: it knows components, manifests,
//! brokers (through `switchyard-broker`) and a results store whose tables the embedding
//! program declares; the Fashion-MNIST demo (`switchyard-pipeline`) and the `switchyard`
//! command line are built on it. The pieces:
//!
//! - [`Runtime`] (this module): compiles (or loads from cache) each component, instantiates it
//!   with exactly what its manifest entry grants, and either runs it once (a command) or feeds
//!   it messages from its subscription through a pool of warm instances (a handler);
//! - [`engine`], [`cache`]: the wasmtime engine and the signed on-disk cache of compiled
//!   components; [`world`]: a component's imports and exports checked against its role before
//!   anything is compiled; [`bindings`] and [`interfaces`]: the host side of every WIT
//!   interface, one module each;
//! - [`manifest`]: the TOML manifest;
//! - [`app`]: starting a whole manifest and deploying a changed one into it; [`serve`]: serving
//!   one until asked to stop (what `switchyard run` does, callable in-process); [`admin`]: the
//!   local socket `switchyard deploy` reaches a running host through;
//! - [`nn`]: inference on the host, the engines behind `wasi:nn`;
//! - [`results`]: the results store (SQLite or PostgreSQL) components write rows into;
//! - [`metrics`]: what a running host counts, served to Prometheus; [`progress`]: progress
//!   bars on a terminal, plain lines elsewhere.
//!
//! Isolation is per instance: a trap, a call past its deadline or a memory limit hit costs
//! that one instance, which is thrown away and replaced; the message is retried, and settled
//! only once handled or given up on after the retry policy's attempts.
#![deny(missing_docs)]

pub mod admin;
pub mod app;
pub mod bindings;
pub mod cache;
pub mod engine;
mod handler;
mod instance;
pub mod interfaces;
pub mod manifest;
pub mod metrics;
pub mod nn;
pub mod private_dir;
pub mod progress;
pub mod results;
pub mod serve;
pub mod world;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use wasmtime::Engine;
use wasmtime::component::{Component, ComponentExportIndex, InstancePre, Linker};

use crate::manifest::ComponentConfig;
use crate::metrics::Metrics;
use crate::nn::NnHost;
use crate::results::{Results, Tables};
use bindings::exports::switchyard::host::batch::GuestIndices as BatchIndices;
use bindings::exports::switchyard::host::warm_up::GuestIndices as WarmUpIndices;
use bindings::exports::wasi::messaging::incoming_handler::GuestIndices as IncomingHandlerIndices;
use engine::{CacheOutcome, EpochTicker, PoolSize};
use instance::{Deadline, InstanceState, MAX_CALL_LIMIT, Shared, new_store, within_deadline};
use interfaces::messaging::ReceiptSink;
use interfaces::progress::ProgressCtx;
use interfaces::test_support::{SentLog, UnitTestBroker};
use switchyard_broker::{Broker, BrokerError, Publisher};

pub use handler::{HandlerCounts, HandlerGroup, HandlerStats};
pub use interfaces::messaging::{DELIVERY_ATTEMPT_METADATA, SENT_BY_HEADER};

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
    /// The inference engine a manifest entry asks for cannot run on this host.
    #[error(
        "{component}: its manifest entry asks for nn = \"{}\", but {reason}; or choose \
         nn = \"auto\" or \"tract\"",
        engine.manifest_value()
    )]
    NnUnavailable {
        /// The component's name.
        component: String,
        /// The engine asked for.
        engine: crate::nn::NnEngine,
        /// Why it cannot run, and how to make it able (in the message, not also a source).
        reason: crate::nn::onnxruntime::Unavailable,
    },
    /// A directory the manifest entry preopens cannot be opened.
    #[error("component {component}: cannot open preopen {}: {error}", path.display())]
    Preopen {
        /// The component's name.
        component: String,
        /// The host directory.
        path: PathBuf,
        /// What failed.
        error: String,
    },
    /// An instance of the component could not be made.
    #[error("component {component}: cannot instantiate: {error}")]
    Instantiate {
        /// The component's name.
        component: String,
        /// What failed.
        error: String,
    },
    /// A component's manifest entry grants a results table the host does not keep.
    #[error(
        "{component}: `results` names table {table:?}, which this host does not keep; it keeps \
         {kept}"
    )]
    UnknownTable {
        /// The component's name.
        component: String,
        /// The table it names.
        table: String,
        /// The tables the host keeps.
        kept: String,
    },
    /// The component trapped (or hit a limit) outside message handling: in a command's run.
    #[error("component {component}: trapped: {trap}")]
    Trapped {
        /// The component's name.
        component: String,
        /// The trap, with its Wasm backtrace.
        trap: String,
        /// Whether the trap is a Rust panic of the guest (its backtrace passes through the
        /// standard library's panic machinery): the panic's own message, printed on the
        /// guest's standard error, says more than the backtrace.
        rust_panic: bool,
    },
    /// A handler was asked to take a build that cannot replace it between messages.
    #[error(
        "component {component}: {replacement} cannot replace it in place: its name, subscription \
         (`subscribe`, `group`, `start`) or pool (`workers`, `batch`) differs; stop it and start \
         the new one"
    )]
    NotReplaceable {
        /// The running handler.
        component: String,
        /// The build offered in its place.
        replacement: String,
    },
    /// A deploy asked to replace a handler that is not running.
    #[error("component {component}: it is not running, so it cannot be replaced")]
    NotRunning {
        /// The component's name.
        component: String,
    },
    /// Tasks of the host itself panicked (a bug in switchyard, never a guest's trap).
    #[error(
        "component {component}: {count} of its worker tasks panicked (a bug in switchyard; \
         please report it): {first}"
    )]
    HostPanicked {
        /// The component whose tasks they were.
        component: String,
        /// How many panicked.
        count: usize,
        /// The first panic's message.
        first: String,
    },
}

/// Checks what can be checked of a component before anything is compiled or any broker is
/// reached: its world against the role its manifest entry gives it (from its bytes), and the
/// inference engine the entry asks for. A component that cannot run is refused at once, with
/// the fix. Returns the component's imports and exports.
pub fn check_before_compiling(
    name: &str,
    config: &ComponentConfig,
    tables: &Tables,
) -> Result<world::Shape, RuntimeError> {
    check_as(name, config, world::Role::of(config), tables)
}

/// [`check_before_compiling`] for a component run as `role`.
fn check_as(
    name: &str,
    config: &ComponentConfig,
    role: world::Role,
    tables: &Tables,
) -> Result<world::Shape, RuntimeError> {
    if let Some(table) = config
        .results
        .iter()
        .find(|table| tables.get(table).is_none())
    {
        return Err(RuntimeError::UnknownTable {
            component: name.to_string(),
            table: table.clone(),
            kept: tables.names(),
        });
    }
    let world_error = |problem| RuntimeError::World {
        component: name.to_string(),
        problem: Box::new(problem),
    };
    let shape = world::shape_of_file(&config.wasm).map_err(world_error)?;
    world::check(&config.wasm, &shape, role).map_err(world_error)?;
    if let Some(engine) = config.nn {
        engine
            .check_available()
            .map_err(|reason| RuntimeError::NnUnavailable {
                component: name.to_string(),
                engine,
                reason,
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
    /// The results tables the host keeps, which components may be granted (the embedding
    /// program declares them; none by default).
    pub tables: Tables,
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
            tables: Tables::default(),
        }
    }
}

/// The engine, the linker and the broker connection shared by every component of a host.
pub struct Runtime {
    engine: Engine,
    linker: Linker<InstanceState>,
    // Before `broker`: the publisher must go before the broker (an embedded one stops with it).
    publisher: Arc<dyn Publisher>,
    broker: Arc<dyn Broker>,
    nn: Arc<NnHost>,
    /// The results tables the host keeps.
    tables: Arc<Tables>,
    /// Where components' `switchyard:host/results` rows go, when the host has a store.
    results: Option<Arc<Results>>,
    cache: Option<cache::ArtifactCache>,
    /// Test mode (`switchyard test`): where sends are recorded, and `test-support` is linked.
    sent_log: Option<Arc<SentLog>>,
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
    pre: InstancePre<InstanceState>,
    report: Option<ComponentExportIndex>,
    /// Where its `wasi:messaging/incoming-handler` export is (handlers only).
    handle: Option<IncomingHandlerIndices>,
    /// Where its `switchyard:host/batch` export is, when it has one.
    batch: Option<BatchIndices>,
    /// Where its `switchyard:host/warm-up` export is, when it has one.
    warm_up: Option<WarmUpIndices>,
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

impl CommandOutcome {
    /// Whether it exited with 0 and the broker stored every message it sent.
    pub fn succeeded(&self) -> bool {
        self.exit_code == 0 && self.failed == 0
    }
}

/// `exited with 0 (120 messages delivered, 0 failed)`, and the first delivery error if any.
impl std::fmt::Display for CommandOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exited with {} ({} messages delivered, {} failed",
            self.exit_code, self.delivered, self.failed
        )?;
        if let Some(error) = &self.first_error {
            write!(f, "; first delivery error: {error}")?;
        }
        f.write_str(")")
    }
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
        let broker = UnitTestBroker::default();
        let sent = broker.sent().clone();
        Self::assemble(Arc::new(broker), options, Some(sent)).await
    }

    async fn assemble(
        broker: Arc<dyn Broker>,
        options: RuntimeOptions,
        sent_log: Option<Arc<SentLog>>,
    ) -> Result<Self, RuntimeError> {
        let engine = engine::engine(options.pool)?;
        let mut linker = Linker::new(&engine);
        instance::add_to_linker(&mut linker, sent_log.is_some())
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let publisher = broker.publisher().await?;
        // Test mode writes results into a store in memory, which each test run starts empty.
        let results = match sent_log {
            Some(_) => Some(Arc::new(Results::in_memory(&options.tables)?)),
            None => None,
        };
        let metrics = Metrics::new()?;
        Ok(Self {
            results,
            tables: Arc::new(options.tables),
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

    /// The results tables it keeps.
    pub fn tables(&self) -> &Arc<Tables> {
        &self.tables
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
        check_as(name, config, role, &self.tables)?;
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
        let (handle, batch, warm_up) = if config.is_handler() {
            let handle = IncomingHandlerIndices::new(&pre).map_err(|_| {
                role_error(
                    "switchyard:host/handler",
                    "wasi:messaging/incoming-handler@0.2.0-draft",
                )
            })?;
            (
                Some(handle),
                BatchIndices::new(&pre).ok(),
                WarmUpIndices::new(&pre).ok(),
            )
        } else {
            wasmtime_wasi::p2::bindings::CommandPre::new(pre.clone())
                .map_err(|_| role_error("switchyard:host/producer", "wasi:cli/run@0.2.x"))?;
            (None, None, None)
        };
        let report = report_export(&component);
        Ok(LoadedComponent {
            name: name.into(),
            config: Arc::new(config.clone()),
            pre,
            report,
            handle,
            batch,
            warm_up,
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

        let instantiate = |e: wasmtime::Error| RuntimeError::Instantiate {
            component: component.name.to_string(),
            error: format!("{e:#}"),
        };
        let shared = Shared {
            publisher,
            ..self.shared()
        };
        let mut store = new_store(
            &shared,
            component,
            ReceiptSink::Forward(sender),
            self.metrics.component(&component.name),
        )?;
        let max_call_ms = component.config.limits.max_call_ms;
        let deadline = (max_call_ms > 0)
            .then(|| Deadline::after(Duration::from_millis(max_call_ms), MAX_CALL_LIMIT));
        let state = store.data_mut();
        state.deadline = deadline;
        state.progress = ProgressCtx::new(component.name.clone(), self.show_progress);
        if let Some(sent_log) = &self.sent_log {
            state.for_unit_tests(sent_log.clone(), self.tables.clone(), self.results.clone());
        }
        let command = wasmtime_wasi::p2::bindings::CommandPre::new(component.pre.clone())
            .map_err(instantiate)?
            .instantiate_async(&mut store)
            .await
            .map_err(instantiate)?;
        let run = command.wasi_cli_run().call_run(&mut store);
        let exit_code = match within_deadline(&component.name, deadline, run).await {
            Ok(Ok(())) => 0,
            Ok(Err(())) => 1,
            Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) => exit.0,
                None => {
                    return Err(RuntimeError::Trapped {
                        component: component.name.to_string(),
                        rust_panic: is_rust_panic(&e),
                        trap: format!("{e:#}"),
                    });
                }
            },
        };
        store.data_mut().progress.finish();
        drop(store);
        let (delivered, failed_count, first_error) =
            counter.await.map_err(|e| RuntimeError::HostPanicked {
                component: component.name.to_string(),
                count: 1,
                first: format!("counting its deliveries: {e}"),
            })?;
        Ok(CommandOutcome {
            exit_code,
            delivered,
            failed: failed_count,
            first_error,
        })
    }

    /// What its instances share.
    fn shared(&self) -> Shared<'_> {
        Shared {
            engine: &self.engine,
            publisher: &self.publisher,
            nn: &self.nn,
            tables: &self.tables,
            results: self.results.as_ref(),
        }
    }

    /// Subscribes a handler component and starts its workers.
    pub async fn start_handler(
        &self,
        component: &LoadedComponent,
    ) -> Result<HandlerGroup, RuntimeError> {
        handler::start(self, component).await
    }
}

/// Whether a trap is a Rust panic of the guest: on wasm32 a panic aborts through the standard
/// library's panic machinery, whose frames the trap's Wasm backtrace names.
fn is_rust_panic(trap: &wasmtime::Error) -> bool {
    trap.downcast_ref::<wasmtime::WasmBacktrace>()
        .is_some_and(|backtrace| {
            backtrace.frames().iter().any(|frame| {
                frame
                    .func_name()
                    .is_some_and(|name| name.contains("::panicking::"))
            })
        })
}

fn report_export(component: &Component) -> Option<ComponentExportIndex> {
    let interface = component.get_export_index(None, REPORT_INTERFACE)?;
    component.get_export_index(Some(&interface), "report")
}

/// `NAME` in switchyard's per-user cache (`$XDG_CACHE_HOME/switchyard/NAME`, else
/// `$HOME/.cache/switchyard/NAME` on Linux); `None` without either. What is kept there
/// (compiled components, the emulator's fix) is code that runs, so it is never a shared
/// directory.
pub fn user_cache_dir(name: &str) -> Option<std::path::PathBuf> {
    Some(dirs::cache_dir()?.join("switchyard").join(name))
}

/// `NAME` in switchyard's per-user data directory (`$XDG_DATA_HOME/switchyard/NAME`, else
/// `$HOME/.local/share/switchyard/NAME` on Linux); `None` without either. Results and reports
/// live there: what a user keeps, unlike the cache.
pub fn user_data_dir(name: &str) -> Option<std::path::PathBuf> {
    Some(dirs::data_dir()?.join("switchyard").join(name))
}
