//! The performance table (BENCHMARKS.md): every row measured in one run on one machine, so
//! the rows compare with each other. Our machines are shared and noisy: absolute numbers move
//! from run to run, ratios much less, so read the ratios.
//!
//! 1. Broker ceiling: the embedded Kafka broker through the unified API, messages the size of
//!    a request, published and taken back (the pipeline crosses it twice: requests, then
//!    predictions).
//! 2. Inference ceiling, µs per image on one thread, at batch 1 and at the classifier's batch:
//!    tract natively and in Wasm (the classifier's `ceiling` example, built both ways, the Wasm
//!    one run by `switchyard exec`), the host's `wasi:nn` engines (tract, and ONNX Runtime when
//!    installed), and ONNX Runtime from Python as a reference when `python3 -c "import
//!    onnxruntime"` works (`pip install onnxruntime`; `SWITCHYARD_PYTHON` names another
//!    interpreter, such as a venv's); otherwise that row says it was skipped.
//! 3. The pipeline: `switchyard demo` as a child process per run, 10,000 images on the
//!    embedded broker: each engine at full speed, batches against none, one classifier worker
//!    against two, and paced at 2,000 requests/s. Images/s, p50, p99 and the process's peak RSS.
//!    The cases alternate round by round and the table gives medians.
//! 4. Start: the first prediction with an empty compile cache (cold) and a warm one.
//! 5. Scale: the first pipeline case again over 100,000, 300,000 and 1,000,000 requests (the
//!    producer cycles through the test set), once each: throughput should stay level against
//!    the 10,000-image rounds and the peak RSS flat against the run before, and the rows say
//!    whether they did.
//!
//! 6. The careful Python rebuild the performance issue measures switchyard against
//!    (`benches/python/careful_pipeline.py`: confluent-kafka, batched polling, ONNX Runtime at
//!    batch 64, one process per role) and `switchyard demo`, each against a standalone
//!    `switchyard broker` of its own, alternating round by round; skipped with the reason when
//!    the Python cannot import confluent_kafka, onnxruntime and numpy.
//!
//! It prints one Markdown table and writes the same rows as JSON to
//! `<target dir>/bench/pipeline.json`.
//!
//! ```sh
//! just bench                                      # 3 rounds
//! cargo bench -p switchyard --bench pipeline -- 5  # rounds
//! ```

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use switchyard::nn::{Encoding, NnEngine, NnHost, Tensor, TensorType};
use switchyard::pipeline;
use switchyard_broker::BrokerConfig;
use switchyard_broker::kafka::EmbeddedKafka;
use switchyard_broker::kafka::{Kafka, KafkaConfig};

/// The classifier's default `batch`, the bound the batched rows use.
const BATCH: usize = 32;
/// Images per inference-ceiling measurement.
const CEILING_IMAGES: usize = 2048;
/// A request on the wire: the 784-byte image plus its headers.
const REQUEST_BYTES: usize = 900;
const PACED_RATE: u32 = 2000;
/// Request counts of the scale rows.
const SCALES: [u64; 3] = [100_000, 300_000, 1_000_000];
/// Throughput at scale counts as level from this share of the 10,000-image median (the
/// machine's run-to-run noise is 10 to 20 %).
const LEVEL: f64 = 0.8;
/// Peak RSS at scale counts as flat up to this many MiB above the run with ten times fewer
/// requests.
const FLAT_MB: f64 = 32.0;

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
struct Row {
    section: &'static str,
    case: String,
    /// The main figure, in `unit`.
    value: Option<f64>,
    unit: &'static str,
    /// Everything else worth saying about it.
    detail: String,
}

impl Row {
    fn new(
        section: &'static str,
        case: impl Into<String>,
        value: Option<f64>,
        unit: &'static str,
    ) -> Self {
        Self {
            section,
            case: case.into(),
            value,
            unit,
            detail: String::new(),
        }
    }

    fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// What one `switchyard demo` run printed as its last line.
#[derive(Debug, Clone, serde::Deserialize)]
struct Demo {
    images_per_s: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    first_prediction_s: Option<f64>,
    peak_rss_mb: Option<f64>,
    accuracy: Option<f64>,
    predictions: u64,
    images: u64,
}

struct Paths {
    switchyard: PathBuf,
    workspace: PathBuf,
    target: PathBuf,
    components: PathBuf,
    models: PathBuf,
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; the number is ours.
    let rounds = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse::<usize>().ok())
        .unwrap_or(3)
        .max(1);
    let components_target = pipeline::components_target_dir();
    let paths = Paths {
        switchyard: PathBuf::from(env!("CARGO_BIN_EXE_switchyard")),
        workspace: pipeline::workspace_root(),
        target: components_target
            .parent()
            .map(Path::to_path_buf)
            .context("the components' target directory has no parent")?,
        components: pipeline::build_components().context("building the components")?,
        models: pipeline::models_dir(),
    };
    let onnxruntime = NnEngine::Onnxruntime.check_available().is_ok();
    let mut rows = Vec::new();

    eprintln!("broker ceiling…");
    rows.push(broker_ceiling()?);

    eprintln!("inference ceilings…");
    let native = ceiling_native(&paths)?;
    let wasm = ceiling_wasm(&paths, &components_target)?;
    rows.extend(ceiling_rows(
        "tract, native (the classifier's code)",
        &native,
    ));
    rows.extend(ceiling_rows("tract, in Wasm (the same code)", &wasm));
    let onnx = std::fs::read(paths.models.join("lenet.onnx"))?;
    let images = test_images(&paths.models)?;
    let host_tract = ceiling_host(&onnx, &images, NnEngine::Tract)?;
    rows.extend(ceiling_rows("wasi:nn on the host, tract", &host_tract));
    let host_ort = if onnxruntime {
        let measured = ceiling_host(&onnx, &images, NnEngine::Onnxruntime)?;
        rows.extend(ceiling_rows("wasi:nn on the host, ONNX Runtime", &measured));
        Some(measured)
    } else {
        rows.push(skipped(
            "wasi:nn on the host, ONNX Runtime",
            "not installed: `switchyard install-onnxruntime`",
        ));
        None
    };
    match ceiling_python(&paths) {
        Ok(measured) => rows.extend(ceiling_rows(
            "ONNX Runtime from Python (reference)",
            &measured,
        )),
        Err(e) => rows.push(skipped(
            "ONNX Runtime from Python (reference)",
            &format!("skipped: {e:#}; `pip install onnxruntime` adds it"),
        )),
    }

    let engine = if onnxruntime { "onnxruntime" } else { "tract" };
    let mut cases: Vec<(String, Vec<String>)> = vec![
        (
            format!("{engine}, batch {BATCH}, 2 workers"),
            args(engine, BATCH, 2, None),
        ),
        (
            format!("{engine}, batch 1, 2 workers"),
            args(engine, 1, 2, None),
        ),
        (
            format!("{engine}, batch {BATCH}, 1 worker"),
            args(engine, BATCH, 1, None),
        ),
    ];
    if onnxruntime {
        cases.push((
            format!("tract, batch {BATCH}, 2 workers"),
            args("tract", BATCH, 2, None),
        ));
    }
    cases.push((
        format!("wasm, batch {BATCH}, 2 workers"),
        args("wasm", BATCH, 2, None),
    ));
    cases.push((
        format!("{engine}, batch {BATCH}, paced at {PACED_RATE}/s"),
        args(engine, BATCH, 2, Some(PACED_RATE)),
    ));
    let mut runs: Vec<Vec<Demo>> = cases.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for ((name, case_args), into) in cases.iter().zip(runs.iter_mut()) {
            let demo = run_demo(&paths, case_args, None)?;
            eprintln!(
                "  round {} {name:<36} {:>6.0} images/s  p50 {:>7.1} ms  p99 {:>7.1} ms  {:>4.0} MiB",
                round + 1,
                demo.images_per_s.unwrap_or(0.0),
                demo.p50_ms.unwrap_or(0.0),
                demo.p99_ms.unwrap_or(0.0),
                demo.peak_rss_mb.unwrap_or(0.0)
            );
            into.push(demo);
        }
    }
    let medians: Vec<Option<f64>> = runs
        .iter()
        .map(|demos| median_of(demos.iter().map(|d| d.images_per_s)))
        .collect();
    for ((name, _), demos) in cases.iter().zip(&runs) {
        let throughput = median_of(demos.iter().map(|d| d.images_per_s));
        rows.push(
            Row::new("pipeline", name.clone(), throughput, "images/s").detail(format!(
                "p50 {} ms, p99 {} ms, peak RSS {} MiB, accuracy {}",
                fmt(median_of(demos.iter().map(|d| d.p50_ms)), 1),
                fmt(median_of(demos.iter().map(|d| d.p99_ms)), 1),
                fmt(median_of(demos.iter().map(|d| d.peak_rss_mb)), 0),
                fmt(
                    median_of(demos.iter().map(|d| d.accuracy.map(|a| a * 100.0))),
                    2
                ),
            )),
        );
    }

    eprintln!("against the careful Python rebuild, each on a standalone broker…");
    let mut standalone: Vec<(Demo, Demo)> = Vec::new();
    let mut python_skipped = None;
    for round in 0..rounds {
        let python = match careful_python(&paths) {
            Ok(python) => python,
            Err(e) => {
                python_skipped = Some(format!("{e:#}"));
                break;
            }
        };
        let ours = on_standalone_broker(&paths, &cases[0].1)?;
        eprintln!(
            "  round {} careful Python {:>6.0} images/s, switchyard {:>6.0} images/s",
            round + 1,
            python.images_per_s.unwrap_or(0.0),
            ours.images_per_s.unwrap_or(0.0)
        );
        standalone.push((python, ours));
    }
    let python_median = median_of(standalone.iter().map(|(p, _)| p.images_per_s));
    match &python_skipped {
        Some(why) => rows.push(skipped(
            "careful Python rebuild",
            &format!(
                "skipped: {why}; `pip install confluent-kafka onnxruntime numpy` in the \
                 interpreter SWITCHYARD_PYTHON names adds it"
            ),
        )),
        None => {
            let pythons: Vec<&Demo> = standalone.iter().map(|(python, _)| python).collect();
            let ours: Vec<&Demo> = standalone.iter().map(|(_, ours)| ours).collect();
            for (name, demos) in [
                (
                    "careful Python rebuild, standalone broker".to_string(),
                    pythons,
                ),
                (
                    format!("switchyard demo, {}, standalone broker", cases[0].0),
                    ours,
                ),
            ] {
                rows.push(
                    Row::new(
                        "against Python",
                        name,
                        median_of(demos.iter().map(|d| d.images_per_s)),
                        "images/s",
                    )
                    .detail(format!(
                        "p50 {} ms, p99 {} ms, accuracy {}",
                        fmt(median_of(demos.iter().map(|d| d.p50_ms)), 1),
                        fmt(median_of(demos.iter().map(|d| d.p99_ms)), 1),
                        fmt(
                            median_of(demos.iter().map(|d| d.accuracy.map(|a| a * 100.0))),
                            2
                        ),
                    )),
                );
            }
        }
    }

    eprintln!("start, cold and warm…");
    let cold_cache = tempfile::tempdir()?;
    let mut start_args = args(engine, BATCH, 2, None);
    start_args.extend(["--images".to_string(), "200".to_string()]);
    let cold = run_demo(&paths, &start_args, Some(cold_cache.path()))?;
    let warm = run_demo(&paths, &start_args, None)?;
    rows.push(
        Row::new(
            "start",
            "cold: compiling the components",
            cold.first_prediction_s,
            "s",
        )
        .detail("to the first prediction, empty compile cache"),
    );
    rows.push(
        Row::new(
            "start",
            "warm: from the compile cache",
            warm.first_prediction_s,
            "s",
        )
        .detail("to the first prediction"),
    );
    // Each scale row's RSS is compared with the row before it: memory that grows with the
    // work keeps growing from one to the next, while buffers that fill once (the embedded
    // broker keeps up to 5 MiB per partition) stop.
    let mut previous = (10_000, median_of(runs[0].iter().map(|d| d.peak_rss_mb)));
    for images in SCALES {
        eprintln!("scale, {images} requests…");
        let mut scale_args = cases[0].1.clone();
        scale_args.extend(["--images".to_string(), images.to_string()]);
        let demo = run_demo(&paths, &scale_args, None)?;
        let level = ratio(demo.images_per_s, medians[0]);
        let growth = match (demo.peak_rss_mb, previous.1) {
            (Some(rss), Some(before)) => Some(rss - before),
            _ => None,
        };
        let verdict = |holds: Option<bool>, yes: &str, no: &str| match holds {
            Some(true) => yes.to_string(),
            Some(false) => no.to_string(),
            None => "not measured".to_string(),
        };
        rows.push(
            Row::new(
                "scale",
                format!("{}, {} requests", cases[0].0, thousands(images)),
                demo.images_per_s,
                "images/s",
            )
            .detail(format!(
                "{} x the 10,000-image median ({}); peak RSS {} MiB, {} MiB against {} ({}); \
                 accuracy {}",
                fmt(level, 2),
                verdict(level.map(|l| l >= LEVEL), "level", "NOT level"),
                fmt(demo.peak_rss_mb, 0),
                growth.map_or("-".to_string(), |g| format!("{g:+.0}")),
                thousands(previous.0),
                verdict(growth.map(|g| g <= FLAT_MB), "flat", "NOT flat"),
                fmt(demo.accuracy.map(|a| a * 100.0), 2),
            )),
        );
        previous = (images, demo.peak_rss_mb);
    }

    // The ratios the performance issue sets targets for.
    let best = medians[0];
    let broker = rows[0].value;
    let inference_batched = host_ort
        .as_ref()
        .unwrap_or(&host_tract)
        .iter()
        .find(|(batch, _)| *batch == BATCH)
        .map(|(_, us)| *us);
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let ceiling = match (broker, inference_batched) {
        (Some(broker), Some(us)) => Some((broker / 2.0).min(cores * 1e6 / us)),
        _ => None,
    };
    rows.push(
        Row::new("ratio", "pipeline / its ceiling", ratio(best, ceiling), "x").detail(format!(
            "ceiling = min(broker ceiling / 2 hops, {cores} cores x the host engine at batch \
             {BATCH}) = {} images/s; target >= 0.70",
            fmt(ceiling, 0)
        )),
    );
    rows.push(
        Row::new(
            "ratio",
            "pipeline (embedded broker) / careful Python",
            ratio(best, python_median),
            "x",
        )
        .detail("images/s; target >= 2"),
    );
    rows.push(
        Row::new(
            "ratio",
            "pipeline / careful Python, both on a standalone broker",
            median_of(
                standalone
                    .iter()
                    .map(|(python, ours)| ratio(ours.images_per_s, python.images_per_s)),
            ),
            "x",
        )
        .detail("images/s, median of the rounds' ratios"),
    );
    let wasm_vs_native = |batch: usize| {
        let find = |measured: &[(usize, f64)]| {
            measured
                .iter()
                .find(|(b, _)| *b == batch)
                .map(|(_, us)| *us)
        };
        ratio(find(&wasm), find(&native))
    };
    rows.push(
        Row::new(
            "ratio",
            "Wasm / native tract, batch 1",
            wasm_vs_native(1),
            "x",
        )
        .detail("time per image, same code; target <= 1.3"),
    );
    // Ratios of pipeline cases are taken round by round, where both ran minutes apart at most,
    // and the median of those is reported.
    let per_round = |a: usize, b: usize| {
        median_of(
            runs[a]
                .iter()
                .zip(&runs[b])
                .map(|(x, y)| ratio(x.images_per_s, y.images_per_s)),
        )
    };
    rows.push(
        Row::new("ratio", "2 workers / 1 worker", per_round(0, 2), "x")
            .detail("pipeline images/s, median of the rounds' ratios; target >= 1.6"),
    );
    rows.push(
        Row::new(
            "ratio",
            format!("batch {BATCH} / batch 1"),
            per_round(0, 1),
            "x",
        )
        .detail("pipeline images/s, median of the rounds' ratios"),
    );

    print_table(&rows, rounds);
    let out = paths.target.join("bench");
    std::fs::create_dir_all(&out)?;
    let json = out.join("pipeline.json");
    std::fs::write(&json, serde_json::to_string_pretty(&rows)?)?;
    eprintln!("\nwritten to {}", json.display());
    Ok(())
}

fn args(inference: &str, batch: usize, workers: usize, rate: Option<u32>) -> Vec<String> {
    let mut args = vec![
        "--inference".to_string(),
        inference.to_string(),
        "--batch".to_string(),
        batch.to_string(),
        "--workers".to_string(),
        workers.to_string(),
    ];
    if let Some(rate) = rate {
        args.extend(["--rate".to_string(), rate.to_string()]);
    }
    args
}

fn run_demo(paths: &Paths, args: &[String], cache: Option<&Path>) -> anyhow::Result<Demo> {
    let mut command = Command::new(&paths.switchyard);
    command
        .arg("demo")
        .arg("--components")
        .arg(&paths.components)
        .arg("--models")
        .arg(&paths.models)
        .args(args);
    if let Some(cache) = cache {
        command.env("SWITCHYARD_CACHE_DIR", cache);
    }
    let output = command.output().context("running switchyard demo")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let demo: Demo = serde_json::from_str(last).with_context(|| {
        format!(
            "switchyard demo {args:?} ended with {} and no report: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    if demo.predictions != demo.images {
        bail!(
            "switchyard demo {args:?}: {} predictions for {} images",
            demo.predictions,
            demo.images
        );
    }
    Ok(demo)
}

/// A `switchyard broker` child on a free port, killed when dropped.
struct StandaloneBroker {
    child: Child,
    bootstrap: String,
}

impl StandaloneBroker {
    fn start(paths: &Paths) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(&paths.switchyard)
            .args(["broker", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting switchyard broker")?;
        let bootstrap = format!("127.0.0.1:{port}");
        let started = Instant::now();
        while std::net::TcpStream::connect(&bootstrap).is_err() {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("switchyard broker did not listen on {bootstrap} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, bootstrap })
    }
}

impl Drop for StandaloneBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed when dropped (the Python classifier never exits by itself).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The demo's first case against a fresh standalone broker, with the client settings the
/// README gives for it (the embedded broker's: the mock answers an empty fetch only after
/// `fetch.wait.max.ms`, 500 ms by default).
fn on_standalone_broker(paths: &Paths, case_args: &[String]) -> anyhow::Result<Demo> {
    let broker = StandaloneBroker::start(paths)?;
    let mut args = case_args.to_vec();
    args.extend([
        "--broker".to_string(),
        BrokerConfig::Kafka(KafkaConfig::for_embedded(&broker.bootstrap)).to_url(),
    ]);
    run_demo(paths, &args, None)
}

/// The careful Python rebuild over the 10,000 test images against a fresh standalone broker:
/// its consumer and classifier first, the producer once both have joined their groups.
fn careful_python(paths: &Paths) -> anyhow::Result<Demo> {
    let python = std::env::var_os("SWITCHYARD_PYTHON").unwrap_or_else(|| "python3".into());
    let check = Command::new(&python)
        .args(["-c", "import confluent_kafka, onnxruntime, numpy"])
        .output()
        .with_context(|| format!("cannot run {}", python.to_string_lossy()))?;
    if !check.status.success() {
        let stderr = String::from_utf8_lossy(&check.stderr);
        bail!(
            "{} cannot import its modules ({})",
            python.to_string_lossy(),
            stderr.lines().last().unwrap_or("no output")
        );
    }
    let script = paths
        .workspace
        .join("host/benches/python/careful_pipeline.py");
    let broker = StandaloneBroker::start(paths)?;
    let run = format!("careful{}", std::process::id());
    let images = 10_000.to_string();
    let role = |args: &[&std::ffi::OsStr]| {
        Command::new(&python)
            .arg(&script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the careful Python pipeline")
    };
    let mut consumer = Killed(role(&[
        "consumer".as_ref(),
        broker.bootstrap.as_ref(),
        run.as_ref(),
        images.as_ref(),
    ])?);
    let mut classifier = Killed(role(&[
        "classifier".as_ref(),
        broker.bootstrap.as_ref(),
        paths.models.join("lenet.onnx").as_os_str(),
    ])?);
    let mut consumer_lines = BufReader::new(consumer.0.stdout.take().context("no stdout")?).lines();
    let mut classifier_lines =
        BufReader::new(classifier.0.stdout.take().context("no stdout")?).lines();
    for lines in [&mut consumer_lines, &mut classifier_lines] {
        match lines.next() {
            Some(Ok(line)) if line == "ready" => {}
            other => bail!("the careful Python pipeline did not join its group: {other:?}"),
        }
    }
    let producer = Command::new(&python)
        .arg(&script)
        .arg("producer")
        .arg(&broker.bootstrap)
        .arg(paths.models.join("t10k-images-idx3-ubyte.gz"))
        .arg(paths.models.join("t10k-labels-idx1-ubyte.gz"))
        .arg(&run)
        .arg(&images)
        .status()?;
    if !producer.success() {
        bail!("the careful Python producer failed: {producer}");
    }
    let report = consumer_lines
        .find_map(|line| serde_json::from_str::<Demo>(&line.ok()?).ok())
        .context("the careful Python consumer ended without its report")?;
    if report.predictions != 10_000 {
        bail!(
            "the careful Python consumer counted {} predictions",
            report.predictions
        );
    }
    Ok(report)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn broker_ceiling() -> anyhow::Result<Row> {
    let cluster = Arc::new(EmbeddedKafka::start(None).await?);
    let case = common::Case {
        name: "kafka (embedded)".into(),
        broker: Arc::new(Kafka::embedded(cluster.clone())),
    };
    let mut samples = Vec::new();
    for round in 0..3 {
        samples.push(common::run_once(&case, round, 10_000, REQUEST_BYTES).await?);
    }
    let end_to_end = common::median(samples.iter().map(|s| s.end_to_end_per_s).collect());
    let publish = common::median(samples.iter().map(|s| s.publish_per_s).collect());
    Ok(Row::new(
        "broker ceiling",
        format!("embedded Kafka, {REQUEST_BYTES} B messages, end to end"),
        Some(end_to_end),
        "msg/s",
    )
    .detail(format!("publish alone {publish:.0} msg/s; median of 3")))
}

/// Parses the `{"batch":B,"us_per_image":U}` lines the ceiling programs print.
fn parse_ceiling(stdout: &[u8]) -> anyhow::Result<Vec<(usize, f64)>> {
    #[derive(serde::Deserialize)]
    struct Line {
        batch: usize,
        us_per_image: f64,
    }
    let measured: Vec<(usize, f64)> = String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Line>(line).ok())
        .map(|line| (line.batch, line.us_per_image))
        .collect();
    if measured.is_empty() {
        bail!("no measurement in its output");
    }
    Ok(measured)
}

/// Builds the classifier's `ceiling` example into `target_dir` with `profile` (cargo's profile
/// and target options).
fn build_ceiling(paths: &Paths, target_dir: &Path, profile: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&paths.workspace)
        .env("CARGO_TARGET_DIR", target_dir)
        .args(["build", "-q", "-p", "classifier", "--example", "ceiling"])
        .args(profile)
        .status()?;
    if !status.success() {
        bail!("building the ceiling example ({profile:?}) failed");
    }
    Ok(())
}

fn ceiling_native(paths: &Paths) -> anyhow::Result<Vec<(usize, f64)>> {
    build_ceiling(paths, &paths.target, &["--release"])?;
    let output = Command::new(paths.target.join("release/examples/ceiling"))
        .arg(&paths.models)
        .arg(CEILING_IMAGES.to_string())
        .args(["1", &BATCH.to_string()])
        .output()?;
    parse_ceiling(&output.stdout).context("the native ceiling example")
}

fn ceiling_wasm(paths: &Paths, components_target: &Path) -> anyhow::Result<Vec<(usize, f64)>> {
    switchyard::build::ensure_wasm_target(&paths.workspace)?;
    build_ceiling(
        paths,
        components_target,
        &["--profile", "component", "--target", "wasm32-wasip2"],
    )?;
    let wasm = components_target.join("wasm32-wasip2/component/examples/ceiling.wasm");
    let output = Command::new(&paths.switchyard)
        .arg("exec")
        .arg(&wasm)
        .arg("--dir")
        .arg(format!("{}::/models", paths.models.display()))
        .args([
            "--",
            "/models",
            &CEILING_IMAGES.to_string(),
            "1",
            &BATCH.to_string(),
        ])
        .output()?;
    parse_ceiling(&output.stdout).with_context(|| {
        format!(
            "the Wasm ceiling example: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn test_images(models: &Path) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::read(models.join("t10k-images-idx3-ubyte.gz"))?;
    let images = pipeline_core::idx::IdxArray::images(&file)?;
    Ok(images
        .iter()
        .take(CEILING_IMAGES)
        .flat_map(|image| image.iter().copied())
        .collect())
}

/// The host's engine, as the classifier uses it through `wasi:nn`.
fn ceiling_host(onnx: &[u8], images: &[u8], engine: NnEngine) -> anyhow::Result<Vec<(usize, f64)>> {
    let host = NnHost::new();
    let graph = host.load(&[onnx.to_vec()], Encoding::Onnx, engine)?;
    let mut session = graph.session()?;
    let pixels = pipeline_core::IMAGE_BYTES;
    let mut measured = Vec::new();
    for batch in [1, BATCH] {
        let tensors: Vec<Tensor> = images
            .chunks_exact(batch * pixels)
            .map(|chunk| Tensor {
                dimensions: vec![batch as u32, 1, 28, 28],
                ty: TensorType::Fp32,
                data: chunk
                    .iter()
                    .flat_map(|&p| (f32::from(p) / 255.0).to_le_bytes())
                    .collect(),
            })
            .collect();
        for tensor in tensors.iter().take(8) {
            session.compute(vec![("image".into(), tensor.clone())])?;
        }
        let started = Instant::now();
        for tensor in &tensors {
            session.compute(vec![("image".into(), tensor.clone())])?;
        }
        let done = tensors.len() * batch;
        measured.push((batch, started.elapsed().as_secs_f64() * 1e6 / done as f64));
    }
    Ok(measured)
}

const PYTHON_CEILING: &str = r#"
import json, sys, time
import numpy as np
import onnxruntime as ort
model, count = sys.argv[1], int(sys.argv[2])
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
images = np.random.default_rng(0).random((count, 1, 28, 28), dtype=np.float32)
for batch in map(int, sys.argv[3:]):
    chunks = [images[i:i + batch] for i in range(0, count - batch + 1, batch)]
    for chunk in chunks[:8]:
        session.run(None, {name: chunk})
    started = time.perf_counter()
    for chunk in chunks:
        session.run(None, {name: chunk})
    us = (time.perf_counter() - started) * 1e6 / (len(chunks) * batch)
    print(json.dumps({"batch": batch, "us_per_image": round(us, 1)}))
"#;

fn ceiling_python(paths: &Paths) -> anyhow::Result<Vec<(usize, f64)>> {
    let python = std::env::var_os("SWITCHYARD_PYTHON").unwrap_or_else(|| "python3".into());
    let output = Command::new(&python)
        .arg("-c")
        .arg(PYTHON_CEILING)
        .arg(paths.models.join("lenet.onnx"))
        .arg(CEILING_IMAGES.to_string())
        .args(["1", &BATCH.to_string(), "64"])
        .output()
        .with_context(|| format!("cannot run {}", python.to_string_lossy()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "python3 cannot run ONNX Runtime ({})",
            stderr.lines().last().unwrap_or("no output")
        );
    }
    parse_ceiling(&output.stdout)
}

fn ceiling_rows(case: &str, measured: &[(usize, f64)]) -> Vec<Row> {
    measured
        .iter()
        .map(|&(batch, us)| {
            Row::new(
                "inference ceiling",
                format!("{case}, batch {batch}"),
                Some(us),
                "µs/image",
            )
            .detail(format!("{:.0} images/s on one thread", 1e6 / us))
        })
        .collect()
}

fn skipped(case: &str, why: &str) -> Row {
    Row::new("skipped", case.to_string(), None, "").detail(why.to_string())
}

fn median_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let values: Vec<f64> = values.flatten().collect();
    (!values.is_empty()).then(|| common::median(values))
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

/// 1000000 as 1,000,000.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.decimals$}"))
}

fn print_table(rows: &[Row], rounds: usize) {
    println!();
    println!("| section | case | result | details |");
    println!("| --- | --- | ---: | --- |");
    for row in rows {
        let decimals = match row.unit {
            "x" => 2,
            "s" | "µs/image" => 1,
            _ => 0,
        };
        let value = match row.value {
            Some(_) => format!("{} {}", fmt(row.value, decimals), row.unit),
            None => "-".to_string(),
        };
        println!(
            "| {} | {} | {value} | {} |",
            row.section, row.case, row.detail
        );
    }
    println!(
        "\npipeline rows: medians of {rounds} round(s), 10,000 images each; scale rows: one run \
         each; {} cores",
        std::thread::available_parallelism().map_or(1, usize::from)
    );
}
