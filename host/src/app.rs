//! Starting a whole manifest: connect the broker, create the topics, load every component, start
//! the handlers, run the commands. `switchyard run` and the demo both go through here.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::broker::embedded::EmbeddedKafka;
use crate::broker::kafka::Kafka;
use crate::broker::pubsub::PubSub;
use crate::broker::{Broker, BrokerError, Publisher, TopicSpec};
use crate::config::{BrokerConfig, Manifest};
use crate::runtime::engine::PoolSize;
use crate::runtime::{
    CommandOutcome, HandlerGroup, LoadedComponent, Runtime, RuntimeError, RuntimeOptions,
};

/// A connected broker, and the embedded broker behind it if there is one (kept alive here).
pub struct ConnectedBroker {
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// The embedded broker, when the manifest asked for one.
    pub embedded: Option<Arc<EmbeddedKafka>>,
}

/// Connects to the broker a manifest names, starting the embedded one if asked to.
pub async fn connect(config: &BrokerConfig) -> Result<ConnectedBroker, BrokerError> {
    match config {
        BrokerConfig::Embedded(embedded) => {
            let cluster = Arc::new(EmbeddedKafka::start(embedded.listen).await?);
            Ok(ConnectedBroker {
                broker: Arc::new(Kafka::embedded(cluster.clone())),
                embedded: Some(cluster),
            })
        }
        BrokerConfig::Kafka(kafka) => Ok(ConnectedBroker {
            broker: Arc::new(Kafka::connect(kafka.clone()).await?),
            embedded: None,
        }),
        BrokerConfig::Pubsub(pubsub) => Ok(ConnectedBroker {
            broker: Arc::new(PubSub::connect(pubsub.clone()).await?),
            embedded: None,
        }),
    }
}

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

/// How long [`App::start`] waits for its handlers to join their groups.
const JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// A manifest, running.
pub struct App {
    /// The broker connection (and embedded broker) the components use.
    pub broker: ConnectedBroker,
    /// The runtime.
    pub runtime: Runtime,
    /// Running handler components.
    pub handlers: Vec<HandlerGroup>,
    /// Command components, loaded but not yet run.
    pub commands: Vec<LoadedComponent>,
}

impl App {
    /// Connects, creates topics, loads every component and starts the handlers. Commands are
    /// loaded (so a broken one fails now) but run by [`App::run_commands`].
    pub async fn start(
        manifest: &Manifest,
        mut options: RuntimeOptions,
    ) -> Result<Self, RuntimeError> {
        // A component that cannot run is refused before the broker is reached.
        for (name, config) in &manifest.components {
            crate::runtime::check_before_compiling(name, config)?;
        }
        let broker = connect(&manifest.broker).await?;
        broker.broker.ensure_topics(&topics(manifest)).await?;
        options.pool = pool_size(manifest);
        let runtime = Runtime::new(broker.broker.clone(), options).await?;
        let mut loaded = Vec::new();
        for (name, config) in &manifest.components {
            let component = runtime.load(name, config)?;
            tracing::info!(
                "{name}: {} in {:.0?}",
                match component.cache {
                    crate::runtime::engine::CacheOutcome::Hit => "loaded from cache",
                    crate::runtime::engine::CacheOutcome::Compiled => "compiled",
                },
                component.load_time
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
        // Commands run after every handler has joined its group, so their first messages are
        // handled at once instead of waiting for the joins. A join that takes longer than this
        // (a slow or far broker) only delays those first messages, so the start goes on.
        let joins = futures::future::try_join_all(handlers.iter().map(HandlerGroup::joined));
        match tokio::time::timeout(JOIN_WAIT, joins).await {
            Ok(joined) => {
                joined?;
            }
            Err(_) => tracing::warn!(
                "not every handler has joined its group after {JOIN_WAIT:?}; starting anyway \
                 (the first messages wait for the join)"
            ),
        }
        Ok(Self {
            broker,
            runtime,
            handlers,
            commands,
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

    /// Stops every handler (committing what it acknowledged) and returns their final reports.
    /// A handler that fails to stop does not keep the others running: every one is stopped,
    /// and then the first failure is returned.
    pub async fn stop(self) -> Result<Vec<(String, Vec<String>)>, RuntimeError> {
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
