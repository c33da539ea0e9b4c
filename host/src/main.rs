//! The `switchyard` command line: run a manifest and deploy changes into it, run the embedded
//! broker, run the demo, scaffold, validate and unit-test components, or run one command
//! component.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use switchyard::admin;
use switchyard::config::{ComponentConfig, Limits, Manifest, MetricsConfig, Preopen};
use switchyard::nn::{NnEngine, onnxruntime};
use switchyard::pipeline::{self, DemoOptions};
use switchyard::report::{RunReport, default_reports_dir};
use switchyard::results::{Results, ResultsConfig};
use switchyard::runtime::{Runtime, RuntimeOptions};
use switchyard::serve::{self, ServeOptions, Serving};
use switchyard_broker::kafka::EmbeddedKafka;
use switchyard_broker::pubsub::PubSubEmulator;
use switchyard_broker::{BrokerConfig, EmbeddedConfig, TopicSpec};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Runs sandboxed WebAssembly components against Kafka through one messaging interface",
    after_help = "Exit codes: 0 success; 1 an error (named on standard error, with the fix), a \
                  refused manifest or deploy, a demo that lost predictions, a run that could not \
                  stop in time; 2 a usage error; `exec` and `test` exit with the component's own \
                  code (101: a unit test failed or trapped).\n\nExample:\n  switchyard demo"
)]
struct Cli {
    /// Directory for compiled components (default: ~/.cache/switchyard/compiled).
    #[arg(long, global = true, env = "SWITCHYARD_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run the components of a manifest until Ctrl-C (or until its commands finish, when it
    /// has no handlers). While it runs, `switchyard deploy` applies changes to the manifest
    /// and its .wasm files.
    #[command(
        after_help = "Example:\n  switchyard run components/pipeline.toml --broker kafka://127.0.0.1:9092"
    )]
    Run {
        /// The manifest (TOML).
        manifest: PathBuf,
        /// Override the manifest's broker: `embedded`, kafka://HOST:PORT or pubsub://PROJECT.
        #[arg(long, env = "BROKER")]
        broker: Option<String>,
        /// How long stopping (on Ctrl-C or SIGTERM) may take to finish the messages in hand,
        /// commit and leave the groups, in seconds; past it, or at a second Ctrl-C, the host
        /// exits with code 1 and what it did not settle is delivered again to the next member.
        #[arg(
            long,
            env = "SWITCHYARD_STOP_TIMEOUT",
            default_value_t = 30,
            value_name = "SECONDS"
        )]
        stop_timeout: u64,
        /// Where to listen for `switchyard deploy` (default: a socket in
        /// $XDG_RUNTIME_DIR/switchyard or /tmp/switchyard-UID named after the manifest's
        /// path, which `deploy MANIFEST` finds by itself).
        #[arg(long, env = "SWITCHYARD_ADMIN_SOCKET", value_name = "PATH")]
        admin_socket: Option<PathBuf>,
        /// Override the manifest's results store: a SQLite file (PATH or sqlite:PATH) or
        /// postgres://USER@HOST/DATABASE.
        #[arg(long, env = "SWITCHYARD_RESULTS", value_name = "URL")]
        results: Option<String>,
        /// Serve Prometheus metrics at http://ADDR/metrics (127.0.0.1:9464, say; port 0 takes
        /// a free one and logs it). Overrides the manifest's [metrics]; off when neither asks.
        #[arg(long, env = "SWITCHYARD_METRICS", value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Apply the changes to a manifest, and to the .wasm files it names, to the `switchyard
    /// run` running it, without a restart. Changed and added components are checked and
    /// compiled first: one that would not run is refused and the old versions keep running.
    /// A handler whose subscription stays takes its new build between messages (nothing
    /// lost, nothing handled twice); one whose subscription or workers changed, or that is
    /// gone from the manifest, commits and leaves its group first; added handlers start;
    /// added or changed commands run. Exits 1 if the deploy was refused.
    #[command(after_help = "Example:\n  switchyard deploy components/pipeline.toml")]
    Deploy {
        /// The manifest the host was started with, edited.
        manifest: PathBuf,
        /// The socket the host listens at, when it was started with --admin-socket.
        #[arg(long, env = "SWITCHYARD_ADMIN_SOCKET", value_name = "PATH")]
        admin_socket: Option<PathBuf>,
    },
    /// Check a manifest and every component it names, without compiling anything or
    /// reaching a broker: each component's world against its role (a handler exports
    /// wasi:messaging/incoming-handler, a command wasi:cli/run; every import is one switchyard
    /// provides) and the inference engine it asks for. Exits 1 if any would not run.
    #[command(after_help = "Example:\n  switchyard validate components/pipeline.toml")]
    Validate {
        /// The manifest (TOML).
        manifest: PathBuf,
    },
    /// Publish messages to a topic on any backend: --payload, --file, or one message per line
    /// of standard input (like `kcat -P`).
    #[command(
        after_help = "Example:\n  echo '{\"hello\":1}' | switchyard publish -t requests --broker kafka://127.0.0.1:9092"
    )]
    Publish(messages::PublishArgs),
    /// Read messages from a topic on any backend, one JSON object per line on standard output
    /// (like `kcat -C -J`), acknowledging each.
    #[command(
        after_help = "Example:\n  switchyard consume -t predictions --broker kafka://127.0.0.1:9092 --count 10"
    )]
    Consume(messages::ConsumeArgs),
    /// Send dead letters back to the topic they failed on (`-t requests.dlq`), without their
    /// dead-letter headers, acknowledging each once the broker stored it.
    #[command(
        after_help = "Example:\n  switchyard replay -t requests.dlq --broker kafka://127.0.0.1:9092"
    )]
    Replay(messages::ReplayArgs),
    /// List, create or delete topics on any backend (like `kafka-topics.sh` and `gcloud
    /// pubsub topics`).
    #[command(after_help = "Example:\n  switchyard topics list --broker kafka://127.0.0.1:9092")]
    Topics {
        #[command(subcommand)]
        command: topics::TopicsCommand,
    },
    /// Run Google's Pub/Sub emulator (from the Cloud SDK) until Ctrl-C, with a capped heap.
    #[command(after_help = "Example:\n  switchyard pubsub-emulator --port 8085")]
    PubsubEmulator {
        /// Port to listen on (127.0.0.1).
        #[arg(long, default_value_t = 8085)]
        port: u16,
    },
    /// Run the embedded Kafka-protocol broker alone, for other switchyard processes and kcat.
    #[command(
        after_help = "Example:\n  switchyard broker --port 9092 --topic requests:8 --topic predictions:8"
    )]
    Broker {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// Port to listen on.
        #[arg(long, default_value_t = 9092)]
        port: u16,
        /// Topics to create, as NAME or NAME:PARTITIONS (others are created on first use with
        /// 4 partitions).
        #[arg(long = "topic", default_values_t = ["requests:8".to_string(), "predictions:8".to_string()])]
        topics: Vec<String>,
    },
    /// Run the Fashion-MNIST pipeline (producer → classifier → consumer) and report accuracy,
    /// throughput and latency. The last output line is JSON.
    #[command(
        after_help = "Example:\n  switchyard demo --images 2000 --rate 500 --results postgres://postgres@127.0.0.1/test"
    )]
    Demo {
        /// Broker: `embedded` (default), kafka://HOST:PORT or pubsub://PROJECT (which starts
        /// Google's Pub/Sub emulator unless PUBSUB_EMULATOR_HOST or ?endpoint= names one).
        #[arg(long, env = "BROKER", default_value = "embedded")]
        broker: String,
        /// Number of requests to send (at least 1). Past the 10,000 test images it starts again
        /// at the first, each request with an id of its own; at most 16,384 are in flight.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
        images: u64,
        /// Send at most this many requests per second (default: as fast as possible, which
        /// measures throughput; a rate below it measures latency without queueing).
        #[arg(long)]
        rate: Option<f64>,
        /// Classifier instances.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// The most requests a classifier instance takes in one call (1: one at a time). It
        /// takes what is already waiting, never waiting for more.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
        batch: u64,
        /// Where the classifier runs LeNet: `host` (natively through wasi:nn, with ONNX
        /// Runtime when installed, else tract), `tract`, `onnxruntime`, or `wasm` (tract inside
        /// the component).
        #[arg(long, value_enum, default_value_t = Inference::Host)]
        inference: Inference,
        /// Directory with producer.wasm, classifier.wasm and consumer.wasm; when absent they
        /// are built from this source tree.
        #[arg(long)]
        components: Option<PathBuf>,
        /// Directory with lenet.onnx and the t10k files.
        #[arg(long)]
        models: Option<PathBuf>,
        /// Print a line per prediction, as the consumer does in three-terminal mode.
        #[arg(long)]
        show_predictions: bool,
        /// Where the predictions are stored: a SQLite file (PATH or sqlite:PATH) or
        /// postgres://USER@HOST/DATABASE (default: results.sqlite3 in
        /// $XDG_DATA_HOME/switchyard, else ~/.local/share/switchyard).
        #[arg(long, env = "SWITCHYARD_RESULTS", value_name = "URL")]
        results: Option<String>,
        /// Serve Prometheus metrics at http://ADDR/metrics while it runs (127.0.0.1:9464, say).
        #[arg(long, env = "SWITCHYARD_METRICS", value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Report on a run from the results store: accuracy, per-class accuracy, the confusion
    /// matrix, latency percentiles and throughput; with --out, also report.html with plots.
    #[command(
        after_help = "Example:\n  switchyard report --out report/   (the latest run in the default store)"
    )]
    Report {
        /// The results store: a SQLite file (PATH or sqlite:PATH) or
        /// postgres://USER@HOST/DATABASE (default: the demo's, results.sqlite3 in
        /// $XDG_DATA_HOME/switchyard, else ~/.local/share/switchyard).
        #[arg(env = "SWITCHYARD_RESULTS", value_name = "RESULTS")]
        results: Option<String>,
        /// The run (the demo's summary names it; default: the latest).
        #[arg(long, value_name = "ID")]
        run: Option<String>,
        /// Write report.html (the plots inline) and the plots as SVG files into this directory.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Build components of this source tree for wasm32-wasip2 (adding the target with rustup
    /// when the toolchain lacks it) and print the directory of the `.wasm` files.
    #[command(after_help = "Example:\n  switchyard build -p classifier")]
    Build {
        /// A package to build; repeatable (default: producer, classifier and consumer).
        #[arg(short = 'p', long = "package")]
        packages: Vec<String>,
    },
    /// Install ONNX Runtime for the host's wasi:nn: pip downloads the `onnxruntime` wheel
    /// from PyPI and its shared library is kept in ~/.cache/switchyard. Prints its path.
    #[command(after_help = "Example:\n  switchyard install-onnxruntime")]
    InstallOnnxruntime,
    /// Create a component crate that builds, tests (`cargo test`, inside Wasm) and runs as
    /// generated: a handler, or with --command a command; with its WIT (the published
    /// wasi:messaging), its .cargo/config.toml, a manifest and a unit test.
    #[command(after_help = "Example:\n  switchyard new shout && cd shout && cargo test")]
    New {
        /// The component's name: its directory, crate, WIT world and topic prefix.
        name: String,
        /// A command (run once, sends messages) instead of a handler.
        #[arg(long)]
        command: bool,
    },
    /// Run a component's unit-test binary: cargo's runner for wasm32-wasip2 (`runner =
    /// "switchyard test"` in .cargo/config.toml), so `cargo test --target wasm32-wasip2` runs
    /// a component crate's tests inside Wasm. No broker: what the tests send is recorded for
    /// switchyard:host/test-support. The current directory is preopened read-only (as `.` and
    /// at its own path) and a fresh writable directory as /tmp. Exits with the tests' code.
    #[command(
        after_help = "Example (in .cargo/config.toml, as cargo's runner):\n  [target.wasm32-wasip2]\n  runner = \"switchyard test\""
    )]
    Test {
        /// Another host directory to preopen read-only, as HOST::GUEST or HOST alone (then at
        /// its own absolute path); a relative HOST is taken from the current directory, the
        /// package's when cargo runs the tests. Repeatable.
        #[arg(long = "dir", value_name = "HOST[::GUEST]")]
        dirs: Vec<String>,
        /// The test binary (cargo passes it).
        wasm: PathBuf,
        /// Arguments for the test binary: cargo passes the test filter and flags such as
        /// --nocapture.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run one command component (a WASI command that may send messages) against a broker;
    /// exits with its exit code.
    #[command(
        after_help = "Example:\n  switchyard exec producer.wasm --dir models::/models --publish requests -- --count 10"
    )]
    Exec {
        /// The component.
        wasm: PathBuf,
        /// Broker: `embedded` (default) or kafka://HOST:PORT.
        #[arg(long, env = "BROKER", default_value = "embedded")]
        broker: String,
        /// Host directory to preopen, as HOST::GUEST (read-only); repeatable.
        #[arg(long = "dir")]
        dirs: Vec<String>,
        /// Topics the component may send to.
        #[arg(long = "publish")]
        publish: Vec<String>,
        /// Arguments for the component.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

mod messages;
mod topics;

/// Where the demo's classifier runs its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Inference {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    // As cargo's test runner, only what goes wrong: the tests' own output is the report.
    let default_level = match cli.command {
        Commands::Test { .. } => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(switchyard::progress::BarAwareStderr::new)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime_options(cache_dir: Option<PathBuf>) -> RuntimeOptions {
    let mut options = RuntimeOptions::default();
    if let Some(dir) = cache_dir {
        options.cache_dir = Some(dir);
    }
    options
}

fn broker_config(url: &str) -> anyhow::Result<BrokerConfig> {
    Ok(BrokerConfig::from_url(url)?)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let options = runtime_options(cli.cache_dir);
    match cli.command {
        Commands::Publish(args) => {
            messages::publish(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Consume(args) => {
            messages::consume(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Replay(args) => {
            messages::replay(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Topics { command } => {
            topics::run(command).await?;
            Ok(ExitCode::SUCCESS)
        }
        Commands::Validate { manifest } => validate(&manifest),
        Commands::Run {
            manifest,
            broker,
            stop_timeout,
            admin_socket,
            results,
            metrics,
        } => {
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
        Commands::Deploy {
            manifest,
            admin_socket,
        } => deploy(&manifest, admin_socket).await,
        Commands::PubsubEmulator { port } => {
            let emulator =
                tokio::task::spawn_blocking(move || PubSubEmulator::start(Some(port))).await??;
            let mut signals = StopSignals::listen().context("listening for Ctrl-C")?;
            println!(
                "Pub/Sub emulator listening on {}; use PUBSUB_EMULATOR_HOST={} or --broker \
                 'pubsub://PROJECT?endpoint={}&anonymous=true'. Ctrl-C stops it.",
                emulator.host(),
                emulator.host(),
                emulator.endpoint()
            );
            signals.next().await;
            drop(emulator);
            Ok(ExitCode::SUCCESS)
        }
        Commands::Broker { host, port, topics } => {
            run_broker(SocketAddr::new(host, port), &topics).await
        }
        Commands::Demo {
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
        } => {
            let results = match results {
                Some(url) => ResultsConfig::from_url(&url)?,
                None => ResultsConfig::default_store(),
            };
            let components = match components {
                Some(dir) => dir,
                None => {
                    eprintln!("building the components (cargo build --target wasm32-wasip2)…");
                    pipeline::build_components().context(
                        "building the components; or build them elsewhere and pass \
                         --components DIR",
                    )?
                }
            };
            let mut broker = broker_config(&broker)?;
            // The demo needs no Google account: without an endpoint it starts the emulator.
            let _emulator = match &mut broker {
                BrokerConfig::Pubsub(pubsub)
                    if pubsub.endpoint.is_none()
                        && std::env::var_os("PUBSUB_EMULATOR_HOST").is_none() =>
                {
                    eprintln!(
                        "starting Google's Pub/Sub emulator (give ?endpoint=URL or set \
                         PUBSUB_EMULATOR_HOST to use another one, or Google's service)…"
                    );
                    let emulator =
                        tokio::task::spawn_blocking(|| PubSubEmulator::start(None)).await??;
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
                components,
                models: models.unwrap_or_else(pipeline::models_dir),
                show_predictions,
                stall_timeout: Duration::from_secs(60),
                runtime: options,
                results,
                progress: true,
                metrics: metrics.map(|listen| MetricsConfig { listen }),
            };
            let results = demo.results.clone();
            let mut report = pipeline::run(&demo).await?;
            print_summary(&report);
            // The run's report beside the others; a run whose report cannot be written still
            // ran, so that is a warning with the command that retries it.
            let page = write_report(&results, &report.run, &default_reports_dir(&report.run)).await;
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
        Commands::InstallOnnxruntime => {
            eprintln!(
                "installing ONNX Runtime {} (pip download onnxruntime=={})…",
                onnxruntime::VERSION,
                onnxruntime::VERSION
            );
            let path = tokio::task::spawn_blocking(onnxruntime::install).await??;
            println!("{}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Commands::Build { packages } => {
            let packages = if packages.is_empty() {
                pipeline::COMPONENTS.map(String::from).to_vec()
            } else {
                packages
            };
            let output = pipeline::source_build().packages(packages).build()?;
            println!("{}", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Commands::Report { results, run, out } => {
            let config = match results {
                Some(url) => ResultsConfig::from_url(&url)?,
                None => ResultsConfig::default_store(),
            };
            if let ResultsConfig::Sqlite { path } = &config
                && !path.is_file()
            {
                anyhow::bail!(
                    "no results store at {}: run `switchyard demo` first, or name the store \
                     (a SQLite file or postgres://…)",
                    path.display()
                );
            }
            let store = Results::open(&config).await?;
            let report = RunReport::read(&store, run.as_deref()).await?;
            print!("{}", report.to_text());
            if let Some(dir) = out {
                let page = report.write(&dir)?;
                println!("\nreport: {}", page.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Commands::New { name, command } => new_component(&name, command),
        Commands::Test { dirs, wasm, args } => unit_tests(wasm, &dirs, args, options).await,
        Commands::Exec {
            wasm,
            broker,
            dirs,
            publish,
            args,
        } => exec(wasm, &broker, &dirs, publish, args, options).await,
    }
}

/// Writes run `run`'s report from the store `results` into `dir`; returns the page.
async fn write_report(
    results: &ResultsConfig,
    run: &str,
    dir: &std::path::Path,
) -> anyhow::Result<PathBuf> {
    let store = Results::open(results).await?;
    let report = RunReport::read(&store, Some(run)).await?;
    Ok(report.write(dir)?)
}

fn print_summary(report: &pipeline::DemoReport) {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    eprintln!();
    eprintln!("switchyard demo on {}", report.broker);
    eprintln!("  images sent        {}", report.images);
    eprintln!(
        "  predictions        {} ({} duplicates ignored, {} requests failed)",
        report.predictions, report.duplicates, report.failed
    );
    if let Some(accuracy) = report.accuracy {
        eprintln!("  accuracy           {:.2} %", accuracy * 100.0);
    }
    if let Some(rate) = report.images_per_s {
        eprintln!("  throughput         {rate:.0} images/s");
    }
    eprintln!(
        "  latency p50 / p99  {} / {}",
        ms(report.p50_ms),
        ms(report.p99_ms)
    );
    eprintln!("  inference          {}", report.inference);
    if report.inference.contains("tract, native") && onnxruntime::library_path().is_none() {
        eprintln!(
            "                     (ONNX Runtime is faster: `switchyard install-onnxruntime`)"
        );
    }
    if let Some(first) = report.first_prediction_s {
        eprintln!("  first prediction   {first:.2} s after start");
    }
    if let Some(rss) = report.peak_rss_mb {
        eprintln!("  peak memory        {rss:.0} MiB (this process, broker included)");
    }
    eprintln!(
        "  results            {} (run {})",
        report.results, report.run
    );
}

/// `switchyard validate`: one line per component, what it is or why it would not run.
fn validate(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let manifest = Manifest::load(path)?;
    let mut refused = 0usize;
    for (name, config) in &manifest.components {
        match switchyard::runtime::check_before_compiling(name, config) {
            Ok(shape) => println!("{name}: ok, {}", describe(config, &shape)),
            Err(e) => {
                refused += 1;
                eprintln!("{e}");
            }
        }
    }
    let total = manifest.components.len();
    if refused > 0 {
        eprintln!(
            "{}: {refused} of {total} component(s) would not run",
            path.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    println!("{}: {total} component(s) ok", path.display());
    Ok(ExitCode::SUCCESS)
}

/// What a valid component is, as `validate` reports it.
fn describe(config: &ComponentConfig, shape: &switchyard::runtime::world::Shape) -> String {
    let mut what = if config.is_handler() {
        format!("handler of {}", config.subscribe.join(", "))
    } else {
        "command".to_string()
    };
    if !config.publish.is_empty() {
        what.push_str(&format!(", sends to {}", config.publish.join(", ")));
    }
    if !config.results.is_empty() {
        what.push_str(&format!(
            ", writes results to {}",
            config.results.join(", ")
        ));
    }
    let exports = |prefix: &str| shape.exports.iter().any(|name| name.starts_with(prefix));
    let mut extras = Vec::new();
    if exports("switchyard:host/batch@") {
        extras.push("takes batches");
    }
    if exports("switchyard:host/report@") {
        extras.push("reports");
    }
    if shape
        .imports
        .iter()
        .any(|name| name.starts_with("wasi:nn/"))
    {
        extras.push("may use wasi:nn");
    }
    if !extras.is_empty() {
        what.push_str(&format!(" ({})", extras.join(", ")));
    }
    what
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

/// `switchyard deploy`: asks the host running `manifest` to deploy it again, and prints what
/// changed.
async fn deploy(manifest: &std::path::Path, socket: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let socket = match socket {
        Some(socket) => socket,
        None => {
            let socket = admin::default_socket(manifest)?;
            admin::check_default_dir(&socket)?;
            socket
        }
    };
    let request = admin::Request::Deploy {
        manifest: admin::absolute_manifest(manifest)?,
    };
    eprintln!(
        "deploying {} (checking and compiling what changed)…",
        manifest.display()
    );
    match admin::request(&socket, &request).await? {
        admin::Response::Deployed(report) => {
            for change in &report.changes {
                println!("{change}");
            }
            Ok(ExitCode::SUCCESS)
        }
        admin::Response::Failed { error } => {
            eprintln!("error: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Ctrl-C (SIGINT) and SIGTERM (what `kill`, systemd and Kubernetes send), listened for from
/// the moment this exists.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Starts listening. Create it before saying how to stop: a signal that comes before the
    /// listener exists is lost, and for a process started with SIGINT ignored (a background
    /// job of a non-interactive shell) it is dropped for good, so the process would never stop
    /// (seen once in CI: Ctrl-C sent right after "press Ctrl-C").
    fn listen() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next one, and names it.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }

    /// Turns every signal into a stop request of `stop`.
    async fn forward(mut self, stop: serve::StopHandle) {
        loop {
            stop.stop(self.next().await);
        }
    }
}

async fn run_broker(listen: SocketAddr, topics: &[String]) -> anyhow::Result<ExitCode> {
    let broker = EmbeddedKafka::start(Some(listen)).await?;
    for topic in topics {
        let (name, partitions) = match topic.split_once(':') {
            Some((name, partitions)) => (
                name,
                partitions
                    .parse()
                    .with_context(|| format!("--topic {topic}: partitions must be a number"))?,
            ),
            None => (topic.as_str(), 8),
        };
        switchyard_broker::check_topic_name(name)?;
        broker.create_topic(&TopicSpec {
            name: name.to_string(),
            partitions,
        })?;
    }
    let servers = broker.bootstrap_servers();
    let mut signals = StopSignals::listen().context("listening for Ctrl-C")?;
    println!(
        "embedded Kafka broker listening on {servers} (kcat -b {servers} -L); Ctrl-C stops it."
    );
    println!(
        "switchyard processes connect with --broker '{}'",
        messages::embedded_broker_url(servers)
    );
    signals.next().await;
    Ok(ExitCode::SUCCESS)
}

async fn exec(
    wasm: PathBuf,
    broker: &str,
    dirs: &[String],
    publish: Vec<String>,
    args: Vec<String>,
    mut options: RuntimeOptions,
) -> anyhow::Result<ExitCode> {
    let mut preopens = Vec::new();
    for dir in dirs {
        let Some((host, guest)) = dir.split_once("::") else {
            bail!("--dir {dir}: use HOST::GUEST, such as --dir .::/");
        };
        preopens.push(Preopen {
            host: host.into(),
            guest: guest.into(),
            writable: false,
        });
    }
    let (name, config) = one_off(&wasm, publish, args, preopens, &mut options);
    let broker = match broker_config(broker)? {
        BrokerConfig::Embedded(_) => BrokerConfig::Embedded(EmbeddedConfig::default()),
        other => other,
    };
    let connected = broker.connect().await?;
    let runtime = Runtime::new(connected.broker.clone(), options).await?;
    let component = runtime.load(&name, &config)?;
    let outcome = runtime.run_command(&component).await?;
    Ok(ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(1)))
}

/// `switchyard new`: creates the crate, makes sure cargo can build it for Wasm, and says what
/// to do next.
fn new_component(name: &str, command: bool) -> anyhow::Result<ExitCode> {
    use switchyard::scaffold::{self, Kind};
    let kind = if command {
        Kind::Command
    } else {
        Kind::Handler
    };
    let current = std::env::current_dir().context("reading the current directory")?;
    let root = scaffold::create(&current, name, kind)?;
    switchyard::build::ensure_wasm_target(&root)?;
    let run_hint = match kind {
        Kind::Handler => format!(
            "  switchyard run {name}.toml          # then, in another terminal:\n  \
             switchyard publish -t {name}-in --payload hello\n  \
             switchyard consume -t {name}-out"
        ),
        Kind::Command => format!(
            "  switchyard run {name}.toml          # sends its args; then:\n  \
             switchyard consume -t {name}-out"
        ),
    };
    println!(
        "created {}\n\n  cd {name}\n  cargo test                          # inside Wasm, through \
         `switchyard test`\n  cargo build --release\n  switchyard validate {name}.toml\n{run_hint}",
        root.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// A command run by hand (`exec`, `test`), named after its file: no call deadline and up to
/// 1 GiB of memory, since a one-off job or a test binary is not a service to protect from
/// itself.
fn one_off(
    wasm: &std::path::Path,
    publish: Vec<String>,
    args: Vec<String>,
    preopens: Vec<Preopen>,
    options: &mut RuntimeOptions,
) -> (String, ComponentConfig) {
    options.pool.max_memory_bytes = 1 << 30;
    let name = wasm
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "component".into());
    let config = ComponentConfig {
        publish,
        args,
        preopens,
        limits: Limits {
            max_call_ms: 0,
            max_memory_mb: 1024,
            ..Limits::default()
        },
        ..ComponentConfig::new(wasm.to_path_buf())
    };
    (name, config)
}

/// `switchyard test`: runs a unit-test binary in test mode (see [`Runtime::for_unit_tests`]).
async fn unit_tests(
    wasm: PathBuf,
    dirs: &[String],
    args: Vec<String>,
    mut options: RuntimeOptions,
) -> anyhow::Result<ExitCode> {
    // Test binaries change with every edit: caching their compiled code would only fill the
    // cache with builds nobody runs again.
    options.cache_dir = None;
    let current = std::env::current_dir().context("reading the current directory")?;
    let scratch = tempfile::Builder::new()
        .prefix("switchyard-test-")
        .tempdir()
        .context("creating the tests' /tmp")?;
    let read_only = |host: PathBuf| Preopen {
        guest: host.to_string_lossy().into_owned(),
        host,
        writable: false,
    };
    let mut preopens = vec![
        Preopen {
            guest: ".".into(),
            ..read_only(current.clone())
        },
        read_only(current.clone()),
        Preopen {
            host: scratch.path().to_path_buf(),
            guest: "/tmp".into(),
            writable: true,
        },
    ];
    for dir in dirs {
        let (host, guest) = match dir.split_once("::") {
            Some((host, guest)) => (host, Some(guest)),
            None => (dir.as_str(), None),
        };
        // Canonical, so `../../models` becomes a path the guest can name without `..`.
        let host = current.join(host).canonicalize().with_context(|| {
            format!(
                "--dir {dir}: no directory {host} (relative paths are taken from {})",
                current.display()
            )
        })?;
        if !host.is_dir() {
            bail!("--dir {dir}: {} is not a directory", host.display());
        }
        preopens.push(match guest {
            Some(guest) => Preopen {
                guest: guest.into(),
                ..read_only(host)
            },
            None => read_only(host),
        });
    }
    // A failing test panics, and on wasm32-wasip2 a panic aborts the whole binary: libtest
    // never gets to print the output it captured, the panic's message among it. So output is
    // not captured here (libtest's own switch, which a test binary always accepts).
    let capture_switches = ["--nocapture", "--no-capture", "--list"];
    let args = if args
        .iter()
        .any(|arg| capture_switches.contains(&arg.as_str()))
    {
        args
    } else {
        std::iter::once("--nocapture".to_string())
            .chain(args)
            .collect()
    };
    let (name, config) = one_off(&wasm, Vec::new(), args, preopens, &mut options);
    let runtime = Runtime::for_unit_tests(options).await?;
    let component = runtime.load(&name, &config)?;
    match runtime.run_command(&component).await {
        Ok(outcome) => Ok(ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(1))),
        Err(switchyard::runtime::RuntimeError::Trapped {
            trap, rust_panic, ..
        }) => {
            // A panic's message, above, says where it happened; its trap's Wasm backtrace
            // would only bury it. Any other trap has only the backtrace to tell.
            let details = if rust_panic {
                String::new()
            } else {
                format!("\n{trap}")
            };
            eprintln!(
                "error: {name} stopped: a test failed (its message is above) or trapped; on \
                 wasm32-wasip2 either ends the whole test binary (Wasm cannot unwind), so the \
                 tests after it did not run{details}"
            );
            // libtest's code for failed tests.
            Ok(ExitCode::from(101))
        }
        Err(e) => Err(e.into()),
    }
}
