//! Serving a manifest until asked to stop: what `switchyard run` does, as a library call, so a
//! program (or a test) runs a host in-process and stops it without a signal.
//!
//! The lifecycle: [`Serving::start`] loads the manifest (with the command line's overrides),
//! starts the app and runs its commands; [`Serving::serve`] then takes deploys from the admin
//! socket until the first stop request, and stops: the handlers finish the messages in hand,
//! commit and leave their groups, within `stop_timeout`. A second stop request while stopping,
//! or the timeout, ends the wait: what was not committed is delivered again to the next member
//! (at-least-once).
//!
//! Stop requests are whatever the caller sends through a [`StopHandle`]; the CLI turns SIGINT
//! and SIGTERM into them, a test calls [`StopHandle::stop`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

use switchyard_broker::BrokerConfig;

use crate::admin::{self, AdminError, AdminSocket};
use crate::app::{App, DeployError};
use crate::manifest::{ConfigError, Manifest, MetricsConfig};
use crate::results::ResultsConfig;
use crate::{CommandOutcome, HandlerCounts, RuntimeError, RuntimeOptions};

/// What serving a manifest is told besides the manifest itself.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The broker to use instead of the manifest's.
    pub broker: Option<BrokerConfig>,
    /// The results store to use instead of the manifest's.
    pub results: Option<ResultsConfig>,
    /// Where to serve metrics instead of the manifest's `[metrics]`.
    pub metrics: Option<SocketAddr>,
    /// How long stopping may take (finishing messages in hand, committing, leaving groups).
    pub stop_timeout: Duration,
    /// Where to take deploys; `None`: the manifest's default socket, given up (with a
    /// warning) when another host of the same manifest already holds it.
    pub admin_socket: Option<PathBuf>,
    /// The runtime's options.
    pub runtime: RuntimeOptions,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            broker: None,
            results: None,
            metrics: None,
            stop_timeout: Duration::from_secs(30),
            admin_socket: None,
            runtime: RuntimeOptions::default(),
        }
    }
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The manifest cannot be read or is invalid.
    #[error(transparent)]
    Manifest(#[from] ConfigError),
    /// The host failed: starting, running a command, or stopping.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A command could not be run at all.
    #[error("running {component}: {error}")]
    Command {
        /// The command.
        component: String,
        /// What failed.
        error: Box<RuntimeError>,
    },
    /// A deploy was refused or failed.
    #[error(transparent)]
    Deploy(#[from] DeployError),
    /// The admin socket cannot be served.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// Listening for stop requests failed.
    #[error("listening for Ctrl-C: {0}")]
    Signals(#[source] std::io::Error),
    /// Stopping took longer than it may.
    #[error(
        "stopping took over {}s (--stop-timeout): exiting without finishing; what was not \
         committed or acknowledged is delivered again to the next member",
        .0.as_secs()
    )]
    StopTimedOut(Duration),
    /// A second stop request came while stopping.
    #[error(
        "{0} again while stopping: exiting without finishing; what was not committed or \
         acknowledged is delivered again to the next member"
    )]
    StoppedAgain(&'static str),
}

/// Asks a [`Serving`] host to stop; cheap to clone. The first request stops it gracefully; a
/// second one while it stops ends the wait.
#[derive(Debug, Clone)]
pub struct StopHandle(mpsc::UnboundedSender<&'static str>);

impl StopHandle {
    /// Asks the host to stop, saying why (`SIGINT`, `SIGTERM`, a test's name).
    pub fn stop(&self, why: &'static str) {
        // A host that already ended needs no request.
        let _ = self.0.send(why);
    }
}

/// The stop requests a [`Serving`] host waits on.
#[derive(Debug)]
pub struct StopRequests(mpsc::UnboundedReceiver<&'static str>);

impl StopRequests {
    /// The next request, and why; never, once every [`StopHandle`] is gone.
    async fn next(&mut self) -> &'static str {
        match self.0.recv().await {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }
}

/// A way to stop a host, and what it waits on.
pub fn stop_requests() -> (StopHandle, StopRequests) {
    let (sender, receiver) = mpsc::unbounded_channel();
    (StopHandle(sender), StopRequests(receiver))
}

/// How a served manifest ended.
#[derive(Debug)]
pub struct Served {
    /// How each command ended (or why it could not run), in manifest order.
    pub commands: Vec<(String, Result<CommandOutcome, String>)>,
    /// Each handler's final reports (`switchyard:host/report`), when it stopped cleanly.
    pub reports: Vec<(String, Vec<String>)>,
    /// Each handler's counters once stopped (the handlers running at the end, after deploys).
    pub counts: Vec<(String, HandlerCounts)>,
    /// Why it did not end cleanly: a command that could not run, a stop that failed or took
    /// too long. The counters above are there all the same.
    pub failure: Option<ServeError>,
}

impl Served {
    /// Whether everything ended well: no failure, and every command exited 0 with every
    /// message stored.
    pub fn succeeded(&self) -> bool {
        self.failure.is_none()
            && self
                .commands
                .iter()
                .all(|(_, outcome)| outcome.as_ref().is_ok_and(CommandOutcome::succeeded))
    }
}

/// A manifest, started: its handlers run, its commands have run.
pub struct Serving {
    app: App,
    manifest: PathBuf,
    options: ServeOptions,
    commands: Vec<(String, Result<CommandOutcome, String>)>,
    failure: Option<ServeError>,
}

/// The manifest at `path`, with the broker, results store and metrics endpoint the options
/// give instead of its own.
pub fn load_manifest(path: &Path, options: &ServeOptions) -> Result<Manifest, ConfigError> {
    let mut manifest = Manifest::load(path)?;
    if let Some(broker) = &options.broker {
        manifest.broker = broker.clone();
    }
    if let Some(results) = &options.results {
        manifest.results = Some(results.clone());
    }
    if let Some(listen) = options.metrics {
        manifest.metrics = Some(MetricsConfig { listen });
    }
    Ok(manifest)
}

impl Serving {
    /// Loads the manifest at `path`, starts it (connects, creates topics, loads every
    /// component, starts the handlers) and runs its commands to their end.
    pub async fn start(path: &Path, options: ServeOptions) -> Result<Self, ServeError> {
        let manifest = load_manifest(path, &options)?;
        let app = App::start(&manifest, options.runtime.clone()).await?;
        if let Some(embedded) = &app.broker.embedded {
            tracing::info!("embedded broker at {}", embedded.bootstrap_servers());
        }
        let mut commands = Vec::new();
        let mut failure = None;
        for (name, outcome) in app.run_commands().await {
            match outcome {
                Ok(outcome) => {
                    if outcome.succeeded() {
                        tracing::info!("{name} {outcome}");
                    } else {
                        tracing::error!("{name} {outcome}");
                    }
                    commands.push((name, Ok(outcome)));
                }
                Err(error) => {
                    commands.push((name.clone(), Err(error.to_string())));
                    failure.get_or_insert(ServeError::Command {
                        component: name,
                        error: Box::new(error),
                    });
                }
            }
        }
        Ok(Self {
            app,
            manifest: path.to_path_buf(),
            options,
            commands,
            failure,
        })
    }

    /// The running app.
    pub fn app(&self) -> &App {
        &self.app
    }

    /// Serves deploys until the first stop request (at once when a command failed, or when
    /// there is no handler to serve), then stops, and says how it all ended.
    pub async fn serve(mut self, mut stops: StopRequests) -> Served {
        let mut failure = self.failure.take();
        if failure.is_none() && !self.app.handlers.is_empty() {
            match self.open_admin_socket() {
                Ok(mut admin) => {
                    tracing::info!("running; press Ctrl-C (or send SIGTERM) to stop");
                    let why = self.take_deploys(&mut stops, admin.as_mut()).await;
                    drop(admin);
                    tracing::info!(
                        "{why}: stopping: finishing in-flight messages and committing (at \
                         most {}s; Ctrl-C again to exit at once)",
                        self.options.stop_timeout.as_secs()
                    );
                }
                Err(e) => failure = Some(e),
            }
        }
        // Taken now, after the deploys, so they name the handlers that run at the end; read
        // after the stop, so the counts include the messages finished while stopping.
        let stats: Vec<_> = self
            .app
            .handlers
            .iter()
            .map(|h| (h.name().to_string(), h.stats().clone()))
            .collect();
        let mut reports = Vec::new();
        tokio::select! {
            stopped = tokio::time::timeout(self.options.stop_timeout, self.app.stop()) => {
                match stopped {
                    Ok(Ok(stopped)) => reports = stopped,
                    Ok(Err(e)) => {
                        failure.get_or_insert(e.into());
                    }
                    Err(_) => {
                        failure.get_or_insert(ServeError::StopTimedOut(self.options.stop_timeout));
                    }
                }
            }
            why = stops.next() => {
                failure.get_or_insert(ServeError::StoppedAgain(why));
            }
        }
        Served {
            commands: self.commands,
            reports,
            counts: stats
                .into_iter()
                .map(|(name, stats)| (name, stats.snapshot()))
                .collect(),
            failure,
        }
    }

    /// Listens for `switchyard deploy`: at the chosen socket when one was given (failing if
    /// it cannot), else at the manifest's default socket, where another host of the same
    /// manifest (a scale-out on one machine) may already listen: then this one runs without
    /// taking deploys.
    fn open_admin_socket(&self) -> Result<Option<AdminSocket>, ServeError> {
        if let Some(path) = &self.options.admin_socket {
            return Ok(Some(AdminSocket::bind(path, false)?));
        }
        let path = admin::default_socket(&self.manifest)?;
        match AdminSocket::bind(&path, true) {
            Ok(socket) => Ok(Some(socket)),
            Err(e @ AdminError::InUse { .. }) => {
                tracing::warn!("{e}; this host takes no deploys");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Serves deploys until a stop request, and names it. Deploys are taken one at a time; a
    /// request while one compiles drops it (nothing has changed yet), and one while it is
    /// applied waits for it to finish, so no handler is left half replaced.
    async fn take_deploys(
        &mut self,
        stops: &mut StopRequests,
        mut admin: Option<&mut AdminSocket>,
    ) -> &'static str {
        if let Some(admin) = &admin {
            tracing::info!(
                "deploy changes with `switchyard deploy {}` (admin socket {})",
                self.manifest.display(),
                admin.path().display()
            );
        }
        let ours = admin::absolute_manifest(&self.manifest).ok();
        loop {
            let next_request = async {
                match admin.as_mut() {
                    Some(admin) => admin.next().await,
                    None => std::future::pending().await,
                }
            };
            let (request, reply) = tokio::select! {
                why = stops.next() => return why,
                Some(next) = next_request => next,
            };
            let admin::Request::Deploy { manifest: asked } = request;
            if ours.as_ref() != Some(&asked) {
                let _ = reply.send(admin::Response::Failed {
                    error: format!(
                        "this host runs {}, not {}: deploy that manifest, or find the socket \
                         of the host that runs yours",
                        self.manifest.display(),
                        asked.display()
                    ),
                });
                continue;
            }
            tracing::info!("deploy: reading {} again", self.manifest.display());
            let plan = tokio::select! {
                why = stops.next() => {
                    let _ = reply.send(admin::Response::Failed {
                        error: format!("the host is stopping ({why}): nothing was deployed"),
                    });
                    return why;
                }
                plan = self.prepare() => plan,
            };
            let response = match plan {
                Err(e) => Err(format!(
                    "refused: {:#}; nothing was changed, the running versions go on",
                    anyhow::Error::new(e)
                )),
                Ok(plan) => self
                    .app
                    .apply(plan)
                    .await
                    .map_err(|e| format!("failed: {:#}", anyhow::Error::new(e))),
            };
            let response = match response {
                Ok(report) => admin::Response::Deployed(report),
                Err(error) => {
                    tracing::error!("deploy {error}");
                    admin::Response::Failed {
                        error: format!("deploy {error}"),
                    }
                }
            };
            let _ = reply.send(response);
        }
    }

    /// Reads the manifest again and plans its deploy.
    async fn prepare(&self) -> Result<crate::app::DeployPlan, ServeError> {
        let manifest = load_manifest(&self.manifest, &self.options)?;
        Ok(self.app.prepare(&manifest).await?)
    }
}
