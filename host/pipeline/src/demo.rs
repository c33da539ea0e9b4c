//! The Fashion-MNIST demo: producer → requests → classifier → predictions → consumer, all three
//! as components in this host, and a summary of what happened.
//!
//! The demo builds the components from this source tree when it runs from it (so one command
//! does everything on a fresh clone), writes no manifest file (it builds the same
//! [`Manifest`] that `components/pipeline.toml` describes) and reads its numbers from the
//! results store the consumer writes one row per prediction into (not from the consumer's
//! memory, which a trap or a second worker would split): accuracy, latency from `sent-at` to
//! arrival, and throughput from the first request sent to the last prediction.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pipeline_core::row::PREDICTIONS_TABLE;
use pipeline_core::wire::{ENGINE_WASI_NN, ENGINE_WASM, unix_ms};
use serde::Serialize;

use crate::build::{BuildError, ComponentBuild};
use switchyard_broker::window::PublishWindow;
use switchyard_broker::{Broker, BrokerConfig, ErrorKind, StartPosition};
use switchyard_runtime::app::App;

use crate::report::RunReport;
use switchyard_runtime::manifest::{
    ComponentConfig, DeliveryGuarantee, Limits, Manifest, Preopen, TopicConfig,
};
use switchyard_runtime::nn::NnEngine;
use switchyard_runtime::progress::Progress;
use switchyard_runtime::results::{Results, ResultsConfig};
use switchyard_runtime::{CommandOutcome, RuntimeError, RuntimeOptions};

/// Topic of classification requests.
pub const REQUESTS_TOPIC: &str = "requests";
/// Topic of predictions.
pub const PREDICTIONS_TOPIC: &str = "predictions";
/// The three pipeline components, by crate name.
pub const COMPONENTS: [&str; 3] = ["producer", "classifier", "consumer"];

/// The source tree this program runs from: the first directory holding switchyard's sources
/// (`wit/switchyard.wit` and `components/pipeline.toml`) above the package directory cargo
/// names to `cargo run` and `cargo test` (`CARGO_MANIFEST_DIR`), else above this crate's
/// directory as it was when this program was built.
///
/// The runtime value comes first because cargo decides freshness by file times, not paths:
/// two clones sharing one `CARGO_TARGET_DIR` (CI's clean clone and a working copy) share one
/// binary, and the path baked into it may name the other clone, which may be gone by now.
pub fn workspace_root() -> PathBuf {
    let is_source_tree = |dir: &Path| {
        dir.join("wit/switchyard.wit").is_file() && dir.join("components/pipeline.toml").is_file()
    };
    let at_run_time = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    let at_build_time = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    at_run_time
        .into_iter()
        .chain([at_build_time.clone()])
        .find_map(|dir| {
            dir.ancestors()
                .find(|d| is_source_tree(d))
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| at_build_time.join("../.."))
}

/// `models/` in the source tree: the ONNX model and the committed test set.
pub fn models_dir() -> PathBuf {
    workspace_root().join("models")
}

/// Where component builds go: `components/` under the cargo target directory
/// (`$CARGO_TARGET_DIR`, else the one this binary sits in, else `target/`). A target
/// directory of its own lets a build run while another cargo holds the main one.
pub fn components_target_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let profile_dir = exe.parent()?;
            let target = profile_dir.parent()?;
            // Test binaries live one level deeper, in target/<profile>/deps.
            let target = if profile_dir.ends_with("deps") {
                target.parent()?
            } else {
                target
            };
            target
                .join("CACHEDIR.TAG")
                .is_file()
                .then(|| target.to_path_buf())
        })
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("components")
}

/// A build of components of this source tree into [`components_target_dir`]; add packages with
/// [`ComponentBuild::packages`].
pub fn source_build() -> ComponentBuild {
    ComponentBuild::new(workspace_root(), components_target_dir())
}

/// Where the built `.wasm` files are.
pub fn components_dir() -> PathBuf {
    source_build().output_dir()
}

/// Builds the three components (profile `component`, wasm32-wasip2, adding the target when it
/// is missing) with cargo and returns their directory. Cargo makes this a no-op when nothing
/// changed.
pub fn build_components() -> Result<PathBuf, BuildError> {
    source_build().packages(COMPONENTS).build()
}

/// What the demo should do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Broker; the embedded one by default.
    pub broker: BrokerConfig,
    /// How many requests to send; past the 10,000 test images the producer starts again at
    /// the first. At most [`WINDOW`] are in flight at once.
    pub images: usize,
    /// Requests per second the producer paces itself to; `None`: as fast as it can.
    pub rate: Option<f64>,
    /// Classifier instances.
    pub classifier_workers: usize,
    /// The most requests the classifier takes in one call (its manifest's `batch`).
    pub classifier_batch: usize,
    /// Where the classifier runs its model: on the host through `wasi:nn` with this engine, or
    /// (`None`) inside its Wasm.
    pub inference: Option<NnEngine>,
    /// Why `inference` is not the fastest engine that was asked for (ONNX Runtime could not be
    /// had), for the report to say beside it.
    pub inference_note: Option<String>,
    /// Directory with producer.wasm, classifier.wasm and consumer.wasm.
    pub components: PathBuf,
    /// Directory with lenet.onnx and the t10k files.
    pub models: PathBuf,
    /// Print one line per prediction.
    pub show_predictions: bool,
    /// Give up when no prediction arrived for this long.
    pub stall_timeout: Duration,
    /// Runtime options (cache directory).
    pub runtime: RuntimeOptions,
    /// Where the consumer stores the predictions.
    pub results: ResultsConfig,
    /// Whether to show progress on standard error (a bar on a terminal, lines otherwise).
    pub progress: bool,
    /// Where to serve Prometheus metrics while it runs, if anywhere.
    pub metrics: Option<switchyard_runtime::manifest::MetricsConfig>,
    /// The classifier's delivery; `None`: exactly-once where the broker offers it (a Kafka
    /// cluster that keeps transactions), else at-least-once.
    pub delivery: Option<DeliveryGuarantee>,
}

/// What a demo run gives: its summary, and the report of its predictions (read once from the
/// store, for the summary and for the report page).
#[derive(Debug)]
pub struct Demo {
    /// The summary, also the demo's last output line as JSON.
    pub report: DemoReport,
    /// The run's predictions as `switchyard report` shows them.
    pub run: RunReport,
}

/// The demo's result: its last output line, as JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemoReport {
    /// The broker it ran on.
    pub broker: String,
    /// Where its predictions are: the SQLite file, or the PostgreSQL URL without a password.
    pub results: String,
    /// The run's id: its rows' `run_id`, `switchyard report --run` takes it.
    pub run: String,
    /// The run's `report.html`, once written (`switchyard demo` writes it after the run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    /// Images sent.
    pub images: u64,
    /// Distinct predictions received.
    pub predictions: u64,
    /// Top-1 accuracy over the predictions.
    pub accuracy: Option<f64>,
    /// Images per second from the first request sent to the last prediction.
    pub images_per_s: Option<f64>,
    /// Median latency from `sent-at` to the prediction's arrival, in ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile of that latency, in ms.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile of that latency, in ms.
    pub p999_ms: Option<f64>,
    /// Seconds from the start of the run (before the broker starts and the components load) to
    /// the first prediction.
    pub first_prediction_s: Option<f64>,
    /// Predictions received more than once (counted once).
    pub duplicates: u64,
    /// Requests the classifier gave up on.
    pub failed: u64,
    /// The host process's peak resident memory in MiB (Linux: `VmHWM`), broker included when it
    /// is the embedded one.
    pub peak_rss_mb: Option<f64>,
    /// What computed the predictions: `wasi-nn (tract)` on the host, or `wasm (tract)` inside
    /// the classifier (both, with counts, if they were mixed).
    pub inference: String,
    /// Why the host ran tract where the fastest engine was asked for (ONNX Runtime not
    /// installed, and why it could not be), with the way to get it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference_note: Option<String>,
    /// The classifier's delivery (`exactly-once`, `at-least-once`) and why it was chosen.
    pub delivery: String,
}

/// The demo's summary for a terminal: what its last line says as JSON, one field a line.
impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
        writeln!(f, "switchyard demo on {}", self.broker)?;
        writeln!(f, "  images sent        {}", self.images)?;
        writeln!(
            f,
            "  predictions        {} ({} duplicates ignored, {} requests failed)",
            self.predictions, self.duplicates, self.failed
        )?;
        if let Some(accuracy) = self.accuracy {
            writeln!(f, "  accuracy           {:.2} %", accuracy * 100.0)?;
        }
        if let Some(rate) = self.images_per_s {
            writeln!(f, "  throughput         {rate:.0} images/s")?;
        }
        writeln!(
            f,
            "  latency            p50 {} · p99 {} · p99.9 {}",
            ms(self.p50_ms),
            ms(self.p99_ms),
            ms(self.p999_ms)
        )?;
        writeln!(f, "  inference          {}", self.inference)?;
        if let Some(note) = &self.inference_note {
            writeln!(f, "                     ({note})")?;
        }
        writeln!(f, "  delivery           {}", self.delivery)?;
        if let Some(first) = self.first_prediction_s {
            writeln!(f, "  first prediction   {first:.2} s after start")?;
        }
        if let Some(rss) = self.peak_rss_mb {
            writeln!(
                f,
                "  peak memory        {rss:.0} MiB (this process, broker included)"
            )?;
        }
        writeln!(
            f,
            "  results            {} (run {})",
            self.results, self.run
        )
    }
}

/// The manifest of the pipeline: the same one `components/pipeline.toml` spells out, with the
/// classifier's `delivery`.
pub fn manifest(options: &DemoOptions, run_id: &str, delivery: DeliveryGuarantee) -> Manifest {
    let component =
        |name: &str| ComponentConfig::new(options.components.join(format!("{name}.wasm")));
    let models = Preopen {
        host: options.models.clone(),
        guest: "/models".into(),
        writable: false,
    };
    let mut producer_args: Vec<String> = [
        "--images",
        "/models/t10k-images-idx3-ubyte.gz",
        "--labels",
        "/models/t10k-labels-idx1-ubyte.gz",
        "--topic",
        REQUESTS_TOPIC,
        "--count",
        &options.images.to_string(),
        "--run-id",
        run_id,
    ]
    .map(String::from)
    .to_vec();
    if let Some(rate) = options.rate {
        producer_args.extend(["--rate".to_string(), rate.to_string()]);
    }
    let producer = ComponentConfig {
        publish: vec![REQUESTS_TOPIC.into()],
        args: producer_args,
        preopens: vec![models.clone()],
        limits: Limits {
            max_call_ms: 0,
            ..Limits::default()
        },
        ..component("producer")
    };
    let classifier = ComponentConfig {
        subscribe: vec![REQUESTS_TOPIC.into()],
        group: Some("switchyard-classifier".into()),
        publish: vec![PREDICTIONS_TOPIC.into()],
        workers: options.classifier_workers.max(1),
        batch: options.classifier_batch.max(1),
        nn: options.inference,
        args: [
            "--model",
            "/models/lenet.onnx",
            "--predictions-topic",
            PREDICTIONS_TOPIC,
        ]
        .map(String::from)
        .to_vec(),
        preopens: vec![models],
        delivery,
        ..component("classifier")
    };
    let mut consumer_args = vec!["--run-id".to_string(), run_id.to_string()];
    if !options.show_predictions {
        consumer_args.push("--quiet".into());
    }
    let consumer = ComponentConfig {
        subscribe: vec![PREDICTIONS_TOPIC.into()],
        // A group of the run's own that starts where the topic ends now: a broker that
        // outlives runs keeps their predictions, which this run's consumer would otherwise
        // read (and skip) from the first, counting them as progress.
        group: Some(format!("switchyard-consumer-{run_id}")),
        start: StartPosition::Latest,
        results: vec![PREDICTIONS_TABLE.into()],
        args: consumer_args,
        ..component("consumer")
    };
    Manifest {
        broker: options.broker.clone(),
        topics: [REQUESTS_TOPIC, PREDICTIONS_TOPIC]
            .map(|name| TopicConfig {
                name: name.into(),
                partitions: 8,
            })
            .to_vec(),
        components: BTreeMap::from([
            ("producer".to_string(), producer),
            ("classifier".to_string(), classifier),
            ("consumer".to_string(), consumer),
        ]),
        results: Some(options.results.clone()),
        metrics: options.metrics,
    }
}

/// A run's id: when it started (hex milliseconds, so ids sort by time), then the process and
/// a count of runs in it, because two demos that start in the same millisecond on one results
/// store (two tests, say) would otherwise share their request ids, and each would find the
/// other's predictions already stored.
fn new_run_id() -> String {
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{:x}{:05x}{:02x}",
        unix_ms() as u64,
        std::process::id() & 0xf_ffff,
        run & 0xff
    )
}

/// This process's peak resident set so far, from `/proc/self/status` (Linux only).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The most requests in flight (sent, not yet predicted and counted): the producer waits
/// beyond it. Well within what the embedded broker keeps (5 MiB per partition, 8 partitions,
/// about 1 KiB a request), and far more than keeps two classifier workers busy, so it bounds
/// the backlog and the memory of a long run without slowing it.
pub const WINDOW: usize = 16_384;

/// Why the demo did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The host failed: a component would not start, the broker or the store went away.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The results store failed while the run was read back.
    #[error(transparent)]
    Results(#[from] switchyard_runtime::results::ResultsError),
    /// The demo's manifest names a results store, so its host always opens one.
    #[error("the demo's host opened no results store")]
    NoResultsStore,
    /// The producer waited for predictions that did not come.
    #[error("producer: {0}")]
    Stalled(String),
    /// The producer ended badly: a non-zero exit, or messages the broker did not store.
    #[error("{component} {outcome}")]
    CommandFailed {
        /// The command.
        component: String,
        /// How it ended.
        outcome: CommandOutcome,
    },
}

/// How often, at most, the demo counts the run's rows in the results store while waiting.
const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// Waits until `settled` moves; `false` when it never will (no such handler, or it stopped).
async fn changed(settled: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match settled {
        Some(settled) => settled.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// How many of run `run_id`'s predictions the store holds; 0, with a warning, when it cannot
/// say (the caller looks again, or reports what it has).
async fn count_stored(results: &Results, run_id: &str) -> u64 {
    crate::predictions::count(results, run_id)
        .await
        .inspect_err(|e| tracing::warn!("counting the run's predictions: {e}"))
        .unwrap_or(0)
}

/// A handler's counts, to say which hop holds missing messages: the classifier's intake, its
/// output, or the consumer's intake.
fn hop_counts(app: &App, name: &str) -> String {
    app.handler(name).map_or("not running".to_string(), |h| {
        h.stats().snapshot().to_string()
    })
}

/// Names what computed the predictions, from the engines the predictions name.
fn describe_engines(engines: &BTreeMap<String, u64>, granted: Option<NnEngine>) -> String {
    let name = |engine: &str| match engine {
        ENGINE_WASI_NN => format!("wasi-nn ({}, native)", granted.map_or("?", NnEngine::name)),
        ENGINE_WASM => "wasm (tract)".to_string(),
        other => format!("{other:?}"),
    };
    match engines.len() {
        0 => "none".to_string(),
        1 => engines.keys().map(|e| name(e)).collect(),
        _ => engines
            .iter()
            .map(|(engine, count)| format!("{} for {count}", name(engine)))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// How the demo's wait ended.
enum Ended {
    /// Every one of this many requests was answered or given up on.
    Answered(u64),
    /// Nothing settled for the stall timeout while the producer waited for room.
    StalledSending,
    /// Nothing settled for the stall timeout after the producer sent this many requests.
    StalledAnswering(u64),
    /// The producer failed.
    Failed(DemoError),
}

/// How many requests the producer sent, or how it failed.
fn requests_sent(
    outcomes: Vec<(String, Result<CommandOutcome, RuntimeError>)>,
) -> Result<u64, DemoError> {
    let mut sent = 0;
    for (name, outcome) in outcomes {
        match outcome {
            Ok(outcome) if outcome.succeeded() => sent += outcome.delivered,
            Ok(outcome) => {
                return Err(DemoError::CommandFailed {
                    component: name,
                    outcome,
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(sent)
}

/// The classifier's delivery: the one asked for, else exactly-once where `broker` offers it
/// for the requests topic as a transaction (a Kafka cluster that keeps them), else
/// at-least-once; with a word on why, for the summary. Pub/Sub's exactly-once delivery is not
/// chosen by itself: it still sends a prediction again when a host dies mid-call, which the
/// store absorbs either way, and each confirmed acknowledgement waits for a round trip.
async fn choose_delivery(
    broker: &dyn Broker,
    asked: Option<DeliveryGuarantee>,
) -> Result<(DeliveryGuarantee, String), DemoError> {
    if let Some(asked) = asked {
        return Ok((asked, format!("{} (as asked)", asked.name())));
    }
    if broker.messaging_system() == switchyard_broker::system::GCP_PUBSUB {
        return Ok((
            DeliveryGuarantee::AtLeastOnce,
            "at-least-once (Pub/Sub has no transactions; `--delivery exactly-once` runs its \
             exactly-once delivery; the store keeps one row per request)"
                .into(),
        ));
    }
    match broker.offers_exactly_once(&[REQUESTS_TOPIC.into()]).await {
        Ok(()) => Ok((
            DeliveryGuarantee::ExactlyOnce,
            "exactly-once (predictions and offsets commit in Kafka transactions)".into(),
        )),
        Err(e) if e.kind() == ErrorKind::Config => {
            tracing::info!("the classifier runs at-least-once: {e}");
            Ok((
                DeliveryGuarantee::AtLeastOnce,
                "at-least-once (this broker has no exactly-once; the store keeps one row \
                 per request)"
                    .into(),
            ))
        }
        Err(e) => Err(RuntimeError::from(e).into()),
    }
}

/// Runs the pipeline once and reports.
pub async fn run(options: &DemoOptions) -> Result<Demo, DemoError> {
    let run_id = new_run_id();
    let started_ms = unix_ms();
    // The demo's components write its table, whatever else the host keeps.
    let runtime = RuntimeOptions {
        tables: crate::predictions::tables(),
        ..options.runtime.clone()
    };
    let connected = options.broker.connect().await.map_err(RuntimeError::from)?;
    // The broker says whether it can run exactly-once on the requests topic once it exists
    // (the topics are the same whatever the delivery).
    let topics = switchyard_runtime::app::topics(&manifest(
        options,
        &run_id,
        DeliveryGuarantee::AtLeastOnce,
    ));
    connected
        .broker
        .ensure_topics(&topics)
        .await
        .map_err(RuntimeError::from)?;
    let (delivery, delivery_said) =
        choose_delivery(connected.broker.as_ref(), options.delivery).await?;
    let manifest = manifest(options, &run_id, delivery);
    let app = App::start_on(connected, &manifest, runtime).await?;
    let broker = app.runtime.broker().describe();
    let Some(results) = app.runtime.results().cloned() else {
        app.stop().await?;
        return Err(DemoError::NoResultsStore);
    };
    let classifier_failed = |app: &App| {
        app.handler("classifier")
            .map_or(0, |h| h.stats().snapshot().gave_up)
    };
    let watch = |name: &str| app.handler(name).map(|h| h.stats().settled());

    let progress = options
        .progress
        .then(|| Progress::new("predictions", options.images as u64));
    let show = |done: u64| {
        if let Some(progress) = &progress {
            progress.set(done);
        }
    };
    let producer_started_ms = unix_ms();
    // One loop watches the consumer and the classifier settle messages, woken by their
    // watches, from the first request to the last prediction. While the producer runs, what
    // they settle opens room in the window it sends through; once it has ended, the loop
    // waits for an answer to every request it sent.
    let window = PublishWindow::new(WINDOW);
    let windowed = window.publisher(app.runtime.publisher().clone());
    let mut commands = Box::pin(app.run_commands_through(&windowed));
    let (mut consumer_settled, mut classifier_settled) = (watch("consumer"), watch("classifier"));
    // How many requests the producer sent, once it has ended.
    let mut sent: Option<u64> = None;
    let mut last_count: Option<Instant> = None;
    let (mut last_progress, mut last_done) = (Instant::now(), 0u64);
    let ended = loop {
        let consumed = consumer_settled
            .as_mut()
            .map_or(0, |settled| *settled.borrow_and_update());
        let done = consumed + classifier_failed(&app);
        window.completed(done);
        show(done);
        if done != last_done {
            (last_progress, last_done) = (Instant::now(), done);
        }
        let stalled = last_progress.elapsed() >= options.stall_timeout;
        // The store is counted only once the consumer's count can be complete, and at most
        // every REPORT_INTERVAL (the topics may hold other runs' predictions too).
        let mut recount = None;
        if let Some(sent) = sent.filter(|&sent| done >= sent) {
            let due = last_count.map_or(Duration::ZERO, |at| {
                REPORT_INTERVAL.saturating_sub(at.elapsed())
            });
            if due.is_zero() {
                last_count = Some(Instant::now());
                if count_stored(&results, &run_id).await + classifier_failed(&app) >= sent {
                    break Ended::Answered(sent);
                }
                recount = Some(REPORT_INTERVAL);
            } else {
                recount = Some(due);
            }
        }
        match sent {
            // The producer waits for room only while predictions come; without them it
            // would wait for ever.
            None if window.room() == 0 && stalled => break Ended::StalledSending,
            Some(sent) if stalled => break Ended::StalledAnswering(sent),
            _ => {}
        }
        let moved = tokio::select! {
            outcomes = &mut commands, if sent.is_none() => match requests_sent(outcomes) {
                Ok(count) => {
                    // The wait for the answers starts now, however long sending took.
                    (sent, last_progress) = (Some(count), Instant::now());
                    true
                }
                Err(failed) => break Ended::Failed(failed),
            },
            moved = changed(&mut consumer_settled) => moved,
            moved = changed(&mut classifier_settled) => moved,
            _ = tokio::time::sleep(recount.unwrap_or(options.stall_timeout)) => true,
        };
        // A handler that stopped settles nothing more.
        if !moved {
            break sent.map_or(Ended::StalledSending, Ended::StalledAnswering);
        }
    };
    // The windowed publisher holds the runtime's publisher, which must go before the broker
    // (an embedded one stops when the app does).
    drop(commands);
    drop(windowed);
    let hops = || {
        format!(
            "classifier: {}; consumer: {}",
            hop_counts(&app, "classifier"),
            hop_counts(&app, "consumer")
        )
    };
    let sent = match ended {
        Ended::Answered(sent) => sent,
        Ended::StalledAnswering(sent) => {
            let seen = count_stored(&results, &run_id).await;
            tracing::error!(
                "no prediction for {:?}: stopping with {seen} of {sent} ({})",
                options.stall_timeout,
                hops()
            );
            sent
        }
        Ended::StalledSending => {
            let stalled = format!(
                "the producer waited {:?} for predictions with {WINDOW} requests in flight ({})",
                last_progress.elapsed(),
                hops()
            );
            app.stop().await?;
            return Err(DemoError::Stalled(stalled));
        }
        Ended::Failed(failed) => {
            // The handlers commit what they settled and leave their groups before the error.
            if let Err(e) = app.stop().await {
                tracing::error!("stopping after {failed}: {e}");
            }
            return Err(failed);
        }
    };
    let failed = classifier_failed(&app);
    if let Some(progress) = &progress {
        progress.finish();
    }
    app.stop().await?;
    // Read once, a page at a time, for the demo's summary and for its report page.
    let run = RunReport::of_run(&results, &run_id).await?;
    let summary = &run.summary;
    let duplicates = results.counts().already_there;
    // From the first request sent, as a broker benchmark counts: the producer's start-up
    // (instantiating it, reading the images) is not the pipeline's throughput.
    let first_sent_ms = summary.first_sent_ms.unwrap_or(producer_started_ms);
    let images_per_s = summary.last_received_ms.and_then(|last| {
        let seconds = (last - first_sent_ms) / 1000.0;
        (seconds > 0.0).then(|| summary.predictions as f64 / seconds)
    });
    let report = DemoReport {
        broker,
        results: results.describe(),
        run: run_id,
        report: None,
        images: sent,
        predictions: summary.predictions,
        accuracy: summary.accuracy,
        images_per_s,
        p50_ms: summary.p50_ms,
        p99_ms: summary.p99_ms,
        p999_ms: summary.p999_ms,
        first_prediction_s: summary.first_received_ms.map(|f| (f - started_ms) / 1000.0),
        duplicates,
        failed,
        peak_rss_mb: peak_rss_mb(),
        inference: match summary.mean_batch {
            Some(batch) => format!(
                "{}, {batch:.1} images per model run on average",
                describe_engines(&summary.engines, options.inference)
            ),
            None => describe_engines(&summary.engines, options.inference),
        },
        inference_note: options.inference_note.clone(),
        delivery: delivery_said,
    };
    Ok(Demo { report, run })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_started_in_one_millisecond_get_different_ids() {
        let (first, second) = (new_run_id(), new_run_id());
        assert_ne!(first, second);
        assert_eq!(first.len(), second.len());
        // The time comes first, so ids of later runs sort after.
        assert!(first[..11] <= second[..11], "{first} {second}");
        assert!(
            !first.contains('-'),
            "a run id is what precedes the last '-'"
        );
    }
}
