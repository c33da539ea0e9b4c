//! One instance's store: what it holds (WASI, its resource table, its memory limit, each
//! interface's context, the deadline of the call in progress), how a fresh one is made with
//! exactly the grants of its manifest entry, and how calls into it are bounded in time.
//!
//! The interfaces in [`super::interfaces`] never see this state: [`add_to_linker`] hands each
//! of them a projection into its own view.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use switchyard_broker::Publisher;

use super::interfaces::messaging::{self, MessageLimits, MessagingCtx, MessagingView, ReceiptSink};
use super::interfaces::progress::{self, ProgressCtx};
use super::interfaces::results::{self, Grants, ResultsCtx, ResultsView};
use super::interfaces::test_support::{self, SentLog, TestSupportView};
use super::interfaces::wasi_nn::{self, NnCtx, NnView};
use super::{LoadedComponent, RuntimeError};
use crate::metrics::ComponentMetrics;
use crate::nn::NnHost;
use crate::results::{Results, Tables};

/// Everything an instance's store holds.
pub struct InstanceState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    /// `wasi:messaging`.
    pub messaging: MessagingCtx,
    /// `wasi:nn`.
    pub nn: NnCtx,
    /// `switchyard:host/results`.
    pub results: ResultsCtx,
    /// `switchyard:host/progress` (shown only for commands the host shows).
    pub progress: ProgressCtx,
    /// Where sends are recorded for `switchyard:host/test-support` (test mode only).
    pub test_support: Option<Arc<SentLog>>,
    /// When the current call must have returned, if it is limited.
    pub deadline: Option<Deadline>,
}

/// The limit of handler calls and command runs, as errors name it.
pub(crate) const MAX_CALL_LIMIT: &str =
    "its max_call_ms limit (limits.max_call_ms in the manifest)";

/// When a guest call must have returned, and the limit that says so, which the error names.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// The moment.
    pub at: Instant,
    /// The limit, as the error says it: `its max_call_ms limit`, `the 60 s warm-up limit`.
    pub limit: &'static str,
}

impl Deadline {
    /// `after` from now, under `limit`.
    pub fn after(after: Duration, limit: &'static str) -> Self {
        Self {
            at: Instant::now() + after,
            limit,
        }
    }
}

impl InstanceState {
    /// The instance's messaging, as its host calls see it.
    pub fn messaging(&mut self) -> MessagingView<'_> {
        MessagingView {
            ctx: &mut self.messaging,
            table: &mut self.table,
        }
    }

    fn nn(&mut self) -> NnView<'_> {
        NnView {
            ctx: &self.nn,
            table: &mut self.table,
        }
    }

    fn results(&mut self) -> ResultsView<'_> {
        ResultsView {
            ctx: &self.results,
            table: &mut self.table,
        }
    }

    fn test_support(&mut self) -> TestSupportView<'_> {
        TestSupportView {
            messaging: MessagingView {
                ctx: &mut self.messaging,
                table: &mut self.table,
            },
            sent: self.test_support.as_deref(),
        }
    }

    /// Switches the instance to test mode (`switchyard test`): its sends are recorded in
    /// `sent` and may go to any topic, and it may write any results table (into the test
    /// store).
    pub fn for_unit_tests(
        &mut self,
        sent: Arc<SentLog>,
        tables: Arc<Tables>,
        results: Option<Arc<Results>>,
    ) {
        self.test_support = Some(sent);
        self.messaging.grant_every_topic();
        self.results = ResultsCtx::new(
            self.messaging.component().clone(),
            Grants::Every,
            tables,
            results,
        );
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Adds what every instance may import to a linker: WASI 0.2, `wasi:messaging`,
/// `switchyard:host/results` and `progress`, `wasi:nn`, and in test mode
/// `switchyard:host/test-support`.
pub fn add_to_linker(linker: &mut Linker<InstanceState>, test_mode: bool) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    messaging::add_to_linker(linker, InstanceState::messaging)?;
    results::add_to_linker(linker, InstanceState::results)?;
    progress::add_to_linker(linker, |state| &mut state.progress)?;
    wasi_nn::add_to_linker(linker, InstanceState::nn)?;
    if test_mode {
        test_support::add_to_linker(linker, InstanceState::test_support)?;
    }
    Ok(())
}

/// What the instances of a runtime share: the engine and the host's services.
pub(crate) struct Shared<'a> {
    /// The engine.
    pub engine: &'a Engine,
    /// Where the instances send.
    pub publisher: &'a Arc<dyn Publisher>,
    /// The inference engines behind `wasi:nn`.
    pub nn: &'a Arc<NnHost>,
    /// The tables the host keeps.
    pub tables: &'a Arc<Tables>,
    /// The results store, if the host has one.
    pub results: Option<&'a Arc<Results>>,
}

/// A fresh store for `component` with exactly its grants: its arguments, its preopened
/// directories, no environment variables, no network, its memory limit, and an epoch callback
/// that yields every tick and traps once the call's deadline has passed.
pub(crate) fn new_store(
    shared: &Shared<'_>,
    component: &LoadedComponent,
    receipts: ReceiptSink,
    metrics: ComponentMetrics,
) -> Result<Store<InstanceState>, RuntimeError> {
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
            .map_err(|e| RuntimeError::Preopen {
                component: component.name.to_string(),
                path: preopen.host.clone(),
                error: format!("{e:#}"),
            })?;
    }
    let limits = StoreLimitsBuilder::new()
        .memory_size(usize::try_from(config.limits.max_memory_mb << 20).unwrap_or(usize::MAX))
        .trap_on_grow_failure(true)
        .build();
    let mut table = ResourceTable::new();
    table.set_max_capacity(usize::try_from(config.limits.max_resources).unwrap_or(usize::MAX));
    let state = InstanceState {
        wasi: wasi.build(),
        table,
        limits,
        messaging: MessagingCtx::new(
            component.name.clone(),
            &component.version,
            shared.publisher.clone(),
            Arc::new(config.publish.iter().cloned().collect::<HashSet<_>>()),
            receipts,
            MessageLimits::from(&config.limits),
            metrics,
        ),
        nn: NnCtx::new(component.name.clone(), config.nn, shared.nn.clone()),
        results: ResultsCtx::new(
            component.name.clone(),
            Grants::Tables(Arc::new(config.results.iter().cloned().collect())),
            shared.tables.clone(),
            shared.results.cloned(),
        ),
        progress: ProgressCtx::hidden(),
        test_support: None,
        deadline: None,
    };
    let mut store = Store::new(shared.engine, state);
    store.limiter(|state| &mut state.limits as &mut dyn ResourceLimiter);
    let name = component.name.clone();
    store.epoch_deadline_callback(move |context| match context.data().deadline {
        Some(deadline) if Instant::now() >= deadline.at => Err(wasmtime::Error::msg(format!(
            "component {name} exceeded {}",
            deadline.limit
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
pub(crate) async fn within_deadline<T>(
    component: &str,
    deadline: Option<Deadline>,
    call: impl std::future::Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    let Some(deadline) = deadline else {
        return call.await;
    };
    let cut_off = tokio::time::Instant::from_std(deadline.at) + HOST_WAIT_GRACE;
    match tokio::time::timeout_at(cut_off, call).await {
        Ok(result) => result,
        Err(_) => Err(wasmtime::Error::msg(format!(
            "component {component} exceeded {} while waiting in a host call",
            deadline.limit
        ))),
    }
}
