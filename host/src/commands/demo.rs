//! `switchyard demo`: the Fashion-MNIST pipeline on a broker (the embedded one by default;
//! Google's emulator started for `pubsub://` without an endpoint), its summary, its report
//! page, and a last line of JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use switchyard_broker::BrokerConfig;
use switchyard_broker::pubsub::PubSubEmulator;
use switchyard_pipeline::demo::{self, DemoOptions};
use switchyard_pipeline::report::default_reports_dir;
use switchyard_runtime::RuntimeOptions;
use switchyard_runtime::manifest::{DeliveryGuarantee, MetricsConfig};
use switchyard_runtime::nn::NnEngine;
use switchyard_runtime::nn::onnxruntime::{self, IfMissing};
use switchyard_runtime::results::ResultsConfig;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Broker: `embedded` (default), kafka://HOST:PORT or pubsub://PROJECT (which starts
    /// Google's Pub/Sub emulator unless PUBSUB_EMULATOR_HOST or ?endpoint= names one).
    #[arg(long, env = "BROKER", default_value = "embedded")]
    pub broker: String,
    /// Number of requests to send (at least 1). Past the 10,000 test images it starts again
    /// at the first, each request with an id of its own; at most 16,384 are in flight.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub images: u64,
    /// Send at most this many requests per second (default: as fast as possible, which
    /// measures throughput; a rate below it measures latency without queueing).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Classifier instances.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// The most requests a classifier instance takes in one call (1: one at a time). It
    /// takes what is already waiting, never waiting for more.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub batch: u64,
    /// Where the classifier runs LeNet: `host` (natively through wasi:nn, with ONNX
    /// Runtime when installed, else tract), `tract`, `onnxruntime`, or `wasm` (tract inside
    /// the component).
    #[arg(long, value_enum, default_value_t = Inference::Host)]
    pub inference: Inference,
    /// Directory with producer.wasm, classifier.wasm and consumer.wasm; when absent they
    /// are built from this source tree.
    #[arg(long)]
    pub components: Option<PathBuf>,
    /// Directory with lenet.onnx and the t10k files.
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Print a line per prediction, as the consumer does in three-terminal mode.
    #[arg(long)]
    pub show_predictions: bool,
    /// Where the predictions are stored: a SQLite file (PATH or sqlite:PATH) or
    /// postgres://USER@HOST/DATABASE (default: results.sqlite3 in
    /// $XDG_DATA_HOME/switchyard, else ~/.local/share/switchyard).
    #[arg(long, env = "SWITCHYARD_RESULTS", value_name = "URL")]
    pub results: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics while it runs (127.0.0.1:9464, say).
    #[arg(long, env = "SWITCHYARD_METRICS", value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// The classifier's delivery: `auto` is exactly-once where the broker keeps Kafka
    /// transactions (a Kafka cluster; not the embedded broker, `switchyard broker` or
    /// Pub/Sub), else at-least-once; the summary says which ran.
    #[arg(long, value_enum, default_value_t = Delivery::Auto)]
    pub delivery: Delivery,
    /// Do not install ONNX Runtime when it is missing. By default `--inference host` (and
    /// `onnxruntime`) installs it once, with pip, into ~/.cache/switchyard when python3 has pip;
    /// with this flag, or SWITCHYARD_NO_INSTALL_ONNXRUNTIME=1, the host runs tract instead.
    #[arg(
        long,
        env = NO_INSTALL_ENV,
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    pub no_install_onnxruntime: bool,
}

/// The variable that turns off the demo's install of ONNX Runtime.
const NO_INSTALL_ENV: &str = "SWITCHYARD_NO_INSTALL_ONNXRUNTIME";

/// The demo classifier's delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Delivery {
    /// Exactly-once where the broker offers it, else at-least-once.
    Auto,
    /// Each request answered at least once; the results store keeps one row per request.
    AtLeastOnce,
    /// Predictions and the requests' offsets commit in Kafka transactions; on Pub/Sub,
    /// its exactly-once delivery (a confirmed request never comes again).
    ExactlyOnce,
}

impl Delivery {
    fn guarantee(self) -> Option<DeliveryGuarantee> {
        match self {
            Delivery::Auto => None,
            Delivery::AtLeastOnce => Some(DeliveryGuarantee::AtLeastOnce),
            Delivery::ExactlyOnce => Some(DeliveryGuarantee::ExactlyOnce),
        }
    }
}

/// Where the demo's classifier runs its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Inference {
    /// On the host, natively, through wasi:nn: ONNX Runtime when installed, else tract.
    Host,
    /// On the host with tract.
    Tract,
    /// On the host with ONNX Runtime (`switchyard install-onnxruntime`).
    Onnxruntime,
    /// Inside the component, with tract compiled to Wasm.
    Wasm,
}

impl Inference {
    fn engine(self) -> Option<NnEngine> {
        match self {
            Inference::Host => Some(NnEngine::Auto),
            Inference::Tract => Some(NnEngine::Tract),
            Inference::Onnxruntime => Some(NnEngine::Onnxruntime),
            Inference::Wasm => None,
        }
    }
}

pub async fn run(args: DemoArgs, options: RuntimeOptions) -> anyhow::Result<ExitCode> {
    let DemoArgs {
        broker,
        images,
        rate,
        workers,
        batch,
        components,
        models,
        show_predictions,
        inference,
        results,
        metrics,
        delivery,
        no_install_onnxruntime,
    } = args;
    let results = match results {
        Some(url) => ResultsConfig::from_url(&url)?,
        None => ResultsConfig::default_store(),
    };
    let components = match components {
        Some(dir) => dir,
        None => {
            eprintln!("building the components (cargo build --target wasm32-wasip2)…");
            demo::build_components().context(
                "building the components; or build them elsewhere and pass \
                 --components DIR",
            )?
        }
    };
    let inference_note = match inference {
        Inference::Host | Inference::Onnxruntime => {
            let if_missing = if no_install_onnxruntime {
                IfMissing::Leave {
                    how: format!("--no-install-onnxruntime or {NO_INSTALL_ENV}"),
                }
            } else {
                IfMissing::Install
            };
            let provided = tokio::task::spawn_blocking(move || {
                onnxruntime::provide(if_missing, |dir| {
                    eprintln!(
                        "installing ONNX Runtime {} into {}, once (pip download, a 28 MB wheel; \
                         --no-install-onnxruntime skips it)…",
                        onnxruntime::VERSION,
                        dir.display()
                    )
                })
            })
            .await?;
            match provided {
                Ok(_) => None,
                Err(why) if inference == Inference::Host => Some(why.to_string()),
                Err(why) => return Err(anyhow::Error::new(why).context("--inference onnxruntime")),
            }
        }
        Inference::Tract | Inference::Wasm => None,
    };
    let mut broker = BrokerConfig::from_url(&broker)?;
    // The demo needs no Google account: without an endpoint it starts the emulator.
    let _emulator = match &mut broker {
        BrokerConfig::Pubsub(pubsub)
            if pubsub.endpoint.is_none() && std::env::var_os("PUBSUB_EMULATOR_HOST").is_none() =>
        {
            eprintln!(
                "starting Google's Pub/Sub emulator (give ?endpoint=URL or set \
                 PUBSUB_EMULATOR_HOST to use another one, or Google's service)…"
            );
            let emulator = tokio::task::spawn_blocking(|| PubSubEmulator::start(None)).await??;
            pubsub.endpoint = Some(emulator.endpoint());
            pubsub.anonymous = true;
            Some(emulator)
        }
        _ => None,
    };
    let demo = DemoOptions {
        broker,
        images: usize::try_from(images)?,
        rate,
        classifier_workers: workers,
        classifier_batch: usize::try_from(batch)?,
        inference: inference.engine(),
        inference_note,
        components,
        models: models.unwrap_or_else(demo::models_dir),
        show_predictions,
        stall_timeout: Duration::from_secs(60),
        runtime: options,
        results,
        progress: true,
        metrics: metrics.map(|listen| MetricsConfig { listen }),
        delivery: delivery.guarantee(),
    };
    let demo::Demo { mut report, run } = demo::run(&demo).await?;
    eprint!("\n{report}");
    // The run's report beside the others, from the predictions the demo read; a run whose
    // report cannot be written still ran, so that is a warning with the command that retries.
    let page = run.write(&default_reports_dir(&report.run));
    match page {
        Ok(page) => {
            eprintln!("  report             {}", page.display());
            report.report = Some(page.display().to_string());
        }
        Err(e) => eprintln!(
            "  report             not written ({e:#}); `switchyard report --run {} --out DIR`",
            report.run
        ),
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(if report.predictions == report.images {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
