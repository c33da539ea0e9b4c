//! Starting a whole manifest: connect the broker, create the topics, load every component, start
//! the handlers, run the commands. `switchyard run` and the demo both go through here.
//!
//! A running manifest also takes a changed version of itself ([`App::prepare`], then
//! [`App::apply`]): that is `switchyard deploy`. The two steps are apart so that everything
//! that can refuse a deploy (the manifest, a component's world, compiling it, the pool's size)
//! happens before anything running is touched: a bad deploy leaves the old versions running,
//! and a host asked to stop while compiling can drop the plan without having changed a thing.
//! Applying then stops what went away, swaps builds in place where the subscription stays
//! (between messages, see [`HandlerGroup::replace`]), and starts what is new.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use switchyard_broker::{BrokerConfig, ConnectedBroker, Publisher, TopicSpec};

use crate::engine::PoolSize;
use crate::manifest::{ComponentConfig, Manifest};
use crate::metrics::MetricsServer;
use crate::results::{Results, ResultsConfig};
use crate::{CommandOutcome, HandlerGroup, LoadedComponent, Runtime, RuntimeError, RuntimeOptions};

/// Sizes the instance pool for a manifest: every worker, every command, and room to replace
/// instances that trapped.
pub fn pool_size(manifest: &Manifest) -> PoolSize {
    let instances: usize = manifest.components.values().map(|c| c.workers).sum();
    let max_memory_mb = manifest
        .components
        .values()
        .map(|c| c.limits.max_memory_mb)
        .max()
        .unwrap_or(256);
    PoolSize {
        instances: u32::try_from(instances * 2 + 8).unwrap_or(u32::MAX),
        max_memory_bytes: usize::try_from(max_memory_mb << 20).unwrap_or(usize::MAX),
    }
}

/// Every topic a manifest mentions, with the partitions its `[[topics]]` entry gives (8 when
/// it has none).
pub fn topics(manifest: &Manifest) -> Vec<TopicSpec> {
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for component in manifest.components.values() {
        names.extend(component.subscribe.iter().map(String::as_str));
        names.extend(component.publish.iter().map(String::as_str));
    }
    let mut specs: Vec<TopicSpec> = manifest
        .topics
        .iter()
        .map(|t| TopicSpec {
            name: t.name.clone(),
            partitions: t.partitions,
        })
        .collect();
    for name in names {
        if !specs.iter().any(|s| s.name == name) {
            specs.push(TopicSpec {
                name: name.to_string(),
                partitions: 8,
            });
        }
    }
    specs
}

/// Instances the pool holds beyond what the starting manifest needs, so a deploy may add
/// workers or components (a deploy that needs more is refused, naming the restart that
/// grows it). Only address space is reserved for them until they are used.
pub const DEPLOY_HEADROOM: u32 = 16;

/// How long [`App::start`] waits for its handlers to join their groups.
const JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// The results store a manifest needs: its `[results]`, else the default SQLite file when a
/// component is granted `results`; `None` when nothing writes results.
pub fn results_store(manifest: &Manifest) -> Option<ResultsConfig> {
    let writes = manifest.components.values().any(|c| !c.results.is_empty());
    match &manifest.results {
        Some(config) => Some(config.clone()),
        None if writes => Some(ResultsConfig::default_store()),
        None => None,
    }
}

/// A manifest, running.
pub struct App {
    /// The broker connection (and embedded broker) the components use.
    pub broker: ConnectedBroker,
    /// The runtime.
    pub runtime: Arc<Runtime>,
    /// Running handler components.
    pub handlers: Vec<HandlerGroup>,
    /// Command components, loaded but not yet run.
    pub commands: Vec<LoadedComponent>,
    /// The broker it started with: a deploy may not change it.
    pub broker_config: BrokerConfig,
    /// The results store it opened, if any: a deploy may not change it.
    pub results_config: Option<ResultsConfig>,
    /// Where it serves `/metrics`, when the manifest asked (it stops with the app).
    pub metrics: Option<MetricsServer>,
    /// Every component of the manifest as it runs now (deploys change it), by name.
    pub running: BTreeMap<String, Running>,
    /// Commands that deploys started, running in the background.
    pub deployed_commands: JoinSet<()>,
}

/// A component as it runs now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// Its manifest entry.
    pub config: ComponentConfig,
    /// Its build (see [`LoadedComponent::version`]).
    pub version: String,
}

/// Refuses a component that cannot run, before anything is compiled or connected.
fn check_components(manifest: &Manifest, options: &RuntimeOptions) -> Result<(), RuntimeError> {
    for (name, config) in &manifest.components {
        crate::check_before_compiling(name, config, &options.tables)?;
    }
    Ok(())
}

impl App {
    /// Connects, creates topics, loads every component and starts the handlers. Commands are
    /// loaded (so a broken one fails now) but run by [`App::run_commands`].
    pub async fn start(manifest: &Manifest, options: RuntimeOptions) -> Result<Self, RuntimeError> {
        // A component that cannot run is refused before the broker is reached.
        check_components(manifest, &options)?;
        let broker = manifest.broker.connect().await?;
        Self::start_connected(broker, manifest, options).await
    }

    /// [`App::start`] on a broker already connected to what `manifest.broker` names: for a
    /// caller that asks the broker something before it decides the manifest (the demo asks
    /// whether it can run exactly-once).
    pub async fn start_on(
        broker: ConnectedBroker,
        manifest: &Manifest,
        options: RuntimeOptions,
    ) -> Result<Self, RuntimeError> {
        check_components(manifest, &options)?;
        Self::start_connected(broker, manifest, options).await
    }

    async fn start_connected(
        broker: ConnectedBroker,
        manifest: &Manifest,
        mut options: RuntimeOptions,
    ) -> Result<Self, RuntimeError> {
        broker.broker.ensure_topics(&topics(manifest)).await?;
        let needed = pool_size(manifest);
        options.pool = PoolSize {
            instances: needed.instances.saturating_add(DEPLOY_HEADROOM),
            ..needed
        };
        let mut runtime = Runtime::new(broker.broker.clone(), options).await?;
        let results_config = results_store(manifest);
        if let Some(config) = &results_config {
            let results = Results::open(config, runtime.tables()).await?;
            tracing::info!("results go to {}", results.describe());
            runtime = runtime.with_results(Arc::new(results));
        }
        let runtime = Arc::new(runtime);
        // Before any component runs, so a scrape sees every message from the first.
        let metrics = match &manifest.metrics {
            Some(config) => {
                let server = MetricsServer::start(config.listen, runtime.metrics().clone()).await?;
                tracing::info!("metrics at {}", server.url());
                Some(server)
            }
            None => None,
        };
        let mut loaded = Vec::new();
        let mut running = BTreeMap::new();
        for (name, config) in &manifest.components {
            let component = runtime.load(name, config)?;
            log_loaded(&component);
            running.insert(
                name.clone(),
                Running {
                    config: config.clone(),
                    version: component.version().to_string(),
                },
            );
            loaded.push((config.is_handler(), component));
        }
        let mut handlers = Vec::new();
        let mut commands = Vec::new();
        for (is_handler, component) in loaded {
            if is_handler {
                handlers.push(runtime.start_handler(&component).await?);
            } else {
                commands.push(component);
            }
        }
        // Commands run after every handler has joined its group and warmed up its instances,
        // so their first messages are handled at once instead of waiting for either.
        wait_for_joins(handlers.iter()).await?;
        Ok(Self {
            broker,
            runtime,
            handlers,
            commands,
            broker_config: manifest.broker.clone(),
            results_config,
            metrics,
            running,
            deployed_commands: JoinSet::new(),
        })
    }

    /// Runs every command component concurrently and returns how each ended.
    pub async fn run_commands(&self) -> Vec<(String, Result<CommandOutcome, RuntimeError>)> {
        self.run_commands_through(self.runtime.publisher()).await
    }

    /// [`App::run_commands`], the commands sending through `publisher`.
    pub async fn run_commands_through(
        &self,
        publisher: &Arc<dyn Publisher>,
    ) -> Vec<(String, Result<CommandOutcome, RuntimeError>)> {
        let runs = self.commands.iter().map(|command| async {
            (
                command.name().to_string(),
                self.runtime.run_command_through(command, publisher).await,
            )
        });
        futures::future::join_all(runs).await
    }

    /// The handler component named `name`.
    pub fn handler(&self, name: &str) -> Option<&HandlerGroup> {
        self.handlers.iter().find(|h| h.name() == name)
    }

    /// Checks and compiles what `manifest` changes against what runs, without touching
    /// anything running: the plan [`App::apply`] carries out. Refused when the broker
    /// changed, when a changed or added component does not fit its role or does not compile,
    /// or when the pool is too small for the new manifest.
    pub async fn prepare(&self, manifest: &Manifest) -> Result<DeployPlan, DeployError> {
        if manifest.broker != self.broker_config {
            return Err(DeployError::BrokerChanged);
        }
        if let Some(wanted) = results_store(manifest)
            && Some(&wanted) != self.results_config.as_ref()
        {
            return Err(DeployError::ResultsChanged {
                wanted: wanted.describe(),
                have: self
                    .results_config
                    .as_ref()
                    .map_or("none".to_string(), ResultsConfig::describe),
            });
        }
        let serving = self.metrics.as_ref().map(MetricsServer::asked_for);
        if manifest.metrics.map(|m| m.listen) != serving {
            tracing::warn!(
                "the manifest's [metrics] changed; a running host keeps the endpoint it started \
                 with ({}): restart `switchyard run` to move it",
                self.metrics
                    .as_ref()
                    .map_or("none".to_string(), MetricsServer::url)
            );
        }
        let needed = pool_size(manifest);
        let have = self.runtime.pool();
        if needed.instances > have.instances || needed.max_memory_bytes > have.max_memory_bytes {
            return Err(DeployError::PoolTooSmall { needed, have });
        }
        let mut steps = Vec::new();
        for (name, config) in &manifest.components {
            let running = self.running.get(name);
            if let Some(running) = running
                && running.config == *config
                && running.version == crate::engine::version_of(&config.wasm)?
            {
                steps.push(Step::Keep(name.clone()));
                continue;
            }
            // Loading checks the world before it compiles.
            let loaded = compile(&self.runtime, name, config)?;
            log_loaded(&loaded);
            steps.push(match running {
                None => Step::Start(loaded),
                Some(running) if running.config.can_replace_in_place(config) => Step::Replace {
                    loaded,
                    previous: running.version.clone(),
                },
                Some(running) => Step::Restart {
                    loaded,
                    previous: running.version.clone(),
                },
            });
        }
        for (name, running) in &self.running {
            if !manifest.components.contains_key(name) {
                steps.push(Step::Stop {
                    name: name.clone(),
                    previous: running.version.clone(),
                });
            }
        }
        Ok(DeployPlan {
            steps,
            topics: topics(manifest),
        })
    }

    /// Carries out a plan of [`App::prepare`]: creates the new topics, stops the handlers of
    /// removed (and restarted) components, which commit and leave their groups, replaces
    /// builds in place between messages, starts added handlers, and runs added or changed
    /// commands in the background (their outcomes are logged). A step that fails stops the
    /// deploy there; the error says what had been applied.
    pub async fn apply(&mut self, plan: DeployPlan) -> Result<DeployReport, DeployError> {
        self.broker
            .broker
            .ensure_topics(&plan.topics)
            .await
            .map_err(|error| DeployError::Applying {
                done: Vec::new(),
                error: Box::new(error.into()),
            })?;
        while self.deployed_commands.try_join_next().is_some() {}
        let mut changes = Vec::new();
        // Stops before starts: a restarted handler leaves its group before its successor joins.
        let (stops, others): (Vec<Step>, Vec<Step>) = plan
            .steps
            .into_iter()
            .partition(|step| matches!(step, Step::Stop { .. } | Step::Restart { .. }));
        let mut started = Vec::new();
        for step in stops.into_iter().chain(others) {
            let outcome = self.apply_step(step, &mut started).await;
            match outcome {
                Ok(Some(change)) => changes.push(change),
                Ok(None) => {}
                Err(error) => {
                    return Err(DeployError::Applying {
                        done: changes,
                        error: Box::new(error),
                    });
                }
            }
        }
        let joining = self
            .handlers
            .iter()
            .filter(|handler| started.iter().any(|name| name == handler.name()));
        wait_for_joins(joining)
            .await
            .map_err(|error| DeployError::Applying {
                done: changes.clone(),
                error: Box::new(error),
            })?;
        for change in &changes {
            tracing::info!("deploy: {change}");
        }
        Ok(DeployReport { changes })
    }

    /// One step of [`App::apply`]. A restart is one step: the old handler stops (committing
    /// and leaving its group) before the new one starts; [`App::apply`] runs the restarts
    /// with the stops, before every other step.
    async fn apply_step(
        &mut self,
        step: Step,
        started: &mut Vec<String>,
    ) -> Result<Option<Change>, RuntimeError> {
        match step {
            Step::Keep(name) => {
                let version = self.running.get(&name).map(|r| r.version.clone());
                Ok(Some(Change {
                    previous: version.clone(),
                    version,
                    component: name,
                    action: Action::Unchanged,
                }))
            }
            Step::Stop { name, previous } => {
                self.stop_one(&name).await?;
                self.running.remove(&name);
                Ok(Some(Change {
                    component: name,
                    action: Action::Stopped,
                    version: None,
                    previous: Some(previous),
                }))
            }
            Step::Replace { loaded, previous } => {
                let name = loaded.name().to_string();
                let Some(handler) = self.handlers.iter().find(|h| h.name() == name) else {
                    return Err(RuntimeError::NotRunning { component: name });
                };
                handler.replace(&loaded).await?;
                self.record(&loaded);
                Ok(Some(Change {
                    component: name,
                    action: Action::Replaced,
                    version: Some(loaded.version().to_string()),
                    previous: Some(previous),
                }))
            }
            Step::Restart { loaded, previous } => {
                let name = loaded.name().to_string();
                self.stop_one(&name).await?;
                self.running.remove(&name);
                self.start_one(loaded.clone(), started).await?;
                Ok(Some(Change {
                    component: name,
                    action: Action::Restarted,
                    version: Some(loaded.version().to_string()),
                    previous: Some(previous),
                }))
            }
            Step::Start(loaded) => {
                let name = loaded.name().to_string();
                let version = loaded.version().to_string();
                self.start_one(loaded, started).await?;
                Ok(Some(Change {
                    component: name,
                    action: Action::Started,
                    version: Some(version),
                    previous: None,
                }))
            }
        }
    }

    fn record(&mut self, loaded: &LoadedComponent) {
        self.running.insert(
            loaded.name().to_string(),
            Running {
                config: loaded.config().clone(),
                version: loaded.version().to_string(),
            },
        );
    }

    /// Starts a handler, or runs a command in the background.
    async fn start_one(
        &mut self,
        loaded: LoadedComponent,
        started: &mut Vec<String>,
    ) -> Result<(), RuntimeError> {
        if loaded.config().is_handler() {
            self.handlers
                .push(self.runtime.start_handler(&loaded).await?);
            started.push(loaded.name().to_string());
        } else {
            let runtime = self.runtime.clone();
            let command = loaded.clone();
            self.deployed_commands.spawn(async move {
                let name = command.name();
                match runtime.run_command(&command).await {
                    Ok(outcome) if outcome.succeeded() => {
                        tracing::info!("{name} ({}) {outcome}", command.version());
                    }
                    Ok(outcome) => tracing::error!("{name} ({}) {outcome}", command.version()),
                    Err(e) => tracing::error!("{name} ({}): {e}", command.version()),
                }
            });
        }
        self.record(&loaded);
        Ok(())
    }

    /// Stops the handler named `name`, if one runs (a command has nothing to stop: one a
    /// deploy started finishes in the background), logging its final reports.
    async fn stop_one(&mut self, name: &str) -> Result<(), RuntimeError> {
        let Some(index) = self.handlers.iter().position(|h| h.name() == name) else {
            return Ok(());
        };
        let handler = self.handlers.remove(index);
        for report in handler.reports().await {
            tracing::info!("{name}: {report}");
        }
        let stats = handler.stats().clone();
        handler.stop().await?;
        tracing::info!("{name}: stopped: {}", stats.snapshot());
        Ok(())
    }

    /// Stops every handler (committing what it acknowledged) and returns their final reports.
    /// A handler that fails to stop does not keep the others running: every one is stopped,
    /// and then the first failure is returned. Commands a deploy started and that are still
    /// running are stopped where they are.
    pub async fn stop(mut self) -> Result<Vec<(String, Vec<String>)>, RuntimeError> {
        if !self.deployed_commands.is_empty() {
            tracing::warn!(
                "stopping {} command(s) started by a deploy before they finished",
                self.deployed_commands.len()
            );
            self.deployed_commands.shutdown().await;
        }
        let mut reports = Vec::new();
        let mut first_failure = None;
        for handler in self.handlers {
            let report = handler.reports().await;
            let name = handler.name().to_string();
            if let Err(e) = handler.stop().await {
                tracing::error!("stopping {name}: {e}");
                first_failure.get_or_insert(e);
            }
            reports.push((name, report));
        }
        match first_failure {
            Some(failure) => Err(failure),
            None => Ok(reports),
        }
    }
}

fn log_loaded(component: &LoadedComponent) {
    tracing::info!(
        "{}: {} {} in {:.0?}",
        component.name(),
        component.version(),
        match component.cache {
            crate::engine::CacheOutcome::Hit => "loaded from cache",
            crate::engine::CacheOutcome::Compiled => "compiled",
        },
        component.load_time
    );
}

/// Compiles a component off the async workers where the runtime has others to run them
/// (compiling the classifier takes seconds, and the handlers keep working meanwhile).
fn compile(
    runtime: &Runtime,
    name: &str,
    config: &ComponentConfig,
) -> Result<LoadedComponent, RuntimeError> {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(|| runtime.load(name, config))
    } else {
        runtime.load(name, config)
    }
}

/// Waits for `handlers` to join their groups. A join that takes longer than [`JOIN_WAIT`] (a
/// slow or far broker) only delays their first messages, so it is logged and not waited for.
async fn wait_for_joins<'a>(
    handlers: impl Iterator<Item = &'a HandlerGroup>,
) -> Result<(), RuntimeError> {
    let joins = futures::future::try_join_all(handlers.map(HandlerGroup::joined));
    match tokio::time::timeout(JOIN_WAIT, joins).await {
        Ok(joined) => joined.map(drop),
        Err(_) => {
            tracing::warn!(
                "not every handler has joined its group after {JOIN_WAIT:?}; going on (their \
                 first messages wait for the join)"
            );
            Ok(())
        }
    }
}

/// What [`App::prepare`] found to do: checked and compiled, not yet applied.
pub struct DeployPlan {
    steps: Vec<Step>,
    topics: Vec<TopicSpec>,
}

enum Step {
    Keep(String),
    Stop {
        name: String,
        previous: String,
    },
    Replace {
        loaded: LoadedComponent,
        previous: String,
    },
    Restart {
        loaded: LoadedComponent,
        previous: String,
    },
    Start(LoadedComponent),
}

/// What a deploy did, component by component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployReport {
    /// One per component of the old or the new manifest, in name order (stops first).
    pub changes: Vec<Change>,
}

/// What a deploy did to one component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Its name in the manifest.
    pub component: String,
    /// What happened to it.
    pub action: Action,
    /// The build running now (`None` once stopped).
    pub version: Option<String>,
    /// The build that ran before (`None` for a new one).
    pub previous: Option<String>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unknown = "?";
        let version = self.version.as_deref().unwrap_or(unknown);
        let previous = self.previous.as_deref().unwrap_or(unknown);
        let name = &self.component;
        match self.action {
            Action::Unchanged => write!(f, "{name}: unchanged ({version})"),
            Action::Replaced => write!(
                f,
                "{name}: {previous} -> {version}, replaced between messages"
            ),
            Action::Restarted => write!(
                f,
                "{name}: {previous} -> {version}, restarted (its subscription, workers or role \
                 changed)"
            ),
            Action::Started => write!(f, "{name}: {version} started"),
            Action::Stopped => write!(f, "{name}: {previous} stopped (gone from the manifest)"),
        }
    }
}

/// What a deploy did to a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Its entry and its `.wasm` are as they were: it runs on untouched.
    Unchanged,
    /// A handler took its new build between messages, keeping its subscription.
    Replaced,
    /// Its subscription, pool or role changed: stopped (committing, leaving its group), then
    /// started again (a command: run again).
    Restarted,
    /// New in the manifest: a handler started, a command is running in the background.
    Started,
    /// Gone from the manifest: its handler committed and left its group.
    Stopped,
}

/// Why a deploy was refused or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The manifest's broker differs from the one the host started with.
    #[error(
        "the manifest's broker changed: a running host keeps the broker it started with; \
         restart `switchyard run` to move to another"
    )]
    BrokerChanged,
    /// The manifest's results store differs from the one the host opened at start.
    #[error(
        "the manifest's results store is {wanted}, and this host writes to {have}: a running \
         host keeps the store it opened at start; restart `switchyard run` to move to another"
    )]
    ResultsChanged {
        /// What the new manifest names.
        wanted: String,
        /// What the host opened (`none`).
        have: String,
    },
    /// The new manifest needs more instances, or larger memories, than the pool holds.
    #[error(
        "the manifest needs a pool of {} instances of up to {} MiB, and this host's holds {} \
         of up to {} MiB (sized at start, with room for {} more instances): restart \
         `switchyard run` to size it anew",
        needed.instances,
        needed.max_memory_bytes >> 20,
        have.instances,
        have.max_memory_bytes >> 20,
        DEPLOY_HEADROOM
    )]
    PoolTooSmall {
        /// What the new manifest needs.
        needed: PoolSize,
        /// What the host has.
        have: PoolSize,
    },
    /// A component was refused (it does not fit its role, does not compile, cannot be
    /// read): nothing changed.
    #[error(transparent)]
    Refused(#[from] RuntimeError),
    /// Applying failed part way.
    #[error(
        "{error} (the deploy stopped there; applied before it: {})",
        applied(done)
    )]
    Applying {
        /// What had been applied.
        done: Vec<Change>,
        /// What failed (its text is part of this error's).
        error: Box<RuntimeError>,
    },
}

/// What a deploy that stopped part way had applied, for its error.
fn applied(done: &[Change]) -> String {
    let applied: Vec<String> = done
        .iter()
        .filter(|change| change.action != Action::Unchanged)
        .map(Change::to_string)
        .collect();
    if applied.is_empty() {
        "nothing".into()
    } else {
        applied.join("; ")
    }
}
