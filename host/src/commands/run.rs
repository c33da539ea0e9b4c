//! `switchyard run`: serves a manifest until Ctrl-C or SIGTERM (through [`switchyard_runtime::serve`]),
//! then prints each handler's reports and counters.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use switchyard_broker::BrokerConfig;
use switchyard_runtime::RuntimeOptions;
use switchyard_runtime::results::ResultsConfig;
use switchyard_runtime::serve::{self, ServeOptions, Serving};

use crate::signals::StopSignals;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The manifest (TOML).
    pub manifest: PathBuf,
    /// Override the manifest's broker: `embedded`, kafka://HOST:PORT or pubsub://PROJECT.
    #[arg(long, env = "BROKER")]
    pub broker: Option<String>,
    /// How long stopping (on Ctrl-C or SIGTERM) may take to finish the messages in hand,
    /// commit and leave the groups, in seconds; past it, or at a second Ctrl-C, the host
    /// exits with code 1 and what it did not settle is delivered again to the next member.
    #[arg(
        long,
        env = "SWITCHYARD_STOP_TIMEOUT",
        default_value_t = 30,
        value_name = "SECONDS"
    )]
    pub stop_timeout: u64,
    /// Where to listen for `switchyard deploy` (default: a socket in
    /// $XDG_RUNTIME_DIR/switchyard or /tmp/switchyard-UID named after the manifest's
    /// path, which `deploy MANIFEST` finds by itself).
    #[arg(long, env = "SWITCHYARD_ADMIN_SOCKET", value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Override the manifest's results store: a SQLite file (PATH or sqlite:PATH) or
    /// postgres://USER@HOST/DATABASE.
    #[arg(long, env = "SWITCHYARD_RESULTS", value_name = "URL")]
    pub results: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (127.0.0.1:9464, say; port 0 takes
    /// a free one and logs it). Overrides the manifest's [metrics]; off when neither asks.
    #[arg(long, env = "SWITCHYARD_METRICS", value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

pub async fn run(args: RunArgs, options: RuntimeOptions) -> anyhow::Result<ExitCode> {
    let RunArgs {
        manifest,
        broker,
        stop_timeout,
        admin_socket,
        results,
        metrics,
    } = args;
    let serve = ServeOptions {
        broker: broker.as_deref().map(BrokerConfig::from_url).transpose()?,
        results: results
            .as_deref()
            .map(ResultsConfig::from_url)
            .transpose()?,
        metrics,
        stop_timeout: Duration::from_secs(stop_timeout),
        admin_socket,
        // `run` shows its commands' progress (a producer's bar); the demo its own.
        runtime: RuntimeOptions {
            show_progress: true,
            ..options
        },
    };
    run_manifest(&manifest, serve).await
}

/// `switchyard run`: serves the manifest until Ctrl-C or SIGTERM, then prints each handler's
/// reports and counters.
async fn run_manifest(path: &std::path::Path, options: ServeOptions) -> anyhow::Result<ExitCode> {
    let serving = Serving::start(path, options).await?;
    // Listening before the host says how to stop it (in `serve`): a signal that comes before
    // its listener exists is lost.
    let (stop, requests) = serve::stop_requests();
    let listening = StopSignals::listen();
    let not_listening = match listening {
        Ok(signals) => {
            tokio::spawn(signals.forward(stop));
            None
        }
        Err(e) => {
            stop.stop("no signal listener");
            Some(e)
        }
    };
    let served = serving.serve(requests).await;
    for (name, reports) in &served.reports {
        for report in reports {
            println!("{name}: {report}");
        }
    }
    // After the stop, so the counts include the messages finished while stopping.
    for (name, counts) in &served.counts {
        println!("{name}: {counts}");
    }
    let succeeded = served.succeeded();
    match (served.failure, not_listening) {
        (Some(failure), _) => Err(failure.into()),
        (None, Some(e)) => Err(serve::ServeError::Signals(e).into()),
        (None, None) if succeeded => Ok(ExitCode::SUCCESS),
        (None, None) => Ok(ExitCode::FAILURE),
    }
}
