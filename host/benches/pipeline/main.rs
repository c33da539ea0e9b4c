//! The performance table (BENCHMARKS.md): every row measured in one run on one machine, so
//! the rows compare with each other. Our machines are shared and noisy: absolute numbers move
//! from run to run, ratios much less, so read the ratios.
//!
//! 1. Broker ceiling: the embedded Kafka broker through the unified API, messages the size of
//!    a request, published and taken back (the pipeline crosses it twice: requests, then
//!    predictions).
//! 2. Inference ceiling, µs per image on one thread, at batch 1 and at the classifier's batch:
//!    tract natively and in Wasm (the classifier's `ceiling` example, built both ways, the Wasm
//!    one run by `switchyard exec`), the host's `wasi:nn` engines (tract, and ONNX Runtime,
//!    which the bench installs once with pip when it is missing, as the demo does), and ONNX
//!    Runtime from Python as a reference when `python3 -c "import onnxruntime"` works (`pip
//!    install onnxruntime`; `SWITCHYARD_PYTHON` names another interpreter, such as a venv's);
//!    otherwise that row says it was skipped.
//! 3. The pipeline: `switchyard demo` as a child process per run, 10,000 images on the
//!    embedded broker: each engine at full speed, batches against none, one classifier worker
//!    against two. Images/s, p50, p99 and the process's peak RSS. The cases alternate round
//!    by round and the table gives medians.
//! 4. Paced: the fastest engine (and tract beside ONNX Runtime) paced at 2,000 requests/s, at
//!    least 5 runs each, alternating: the tail is judged run by run, so the rows give every
//!    run's p99 and p99.9, their spread and the worst (the target: p99 at most 20 ms in every
//!    run). `just bench 5 paced` runs this section alone.
//! 5. Start: the first prediction with an empty compile cache (cold) and a warm one.
//! 6. Scale: the first pipeline case again over 100,000, 300,000 and 1,000,000 requests (the
//!    producer cycles through the test set), once each: throughput should stay level against
//!    the 10,000-image rounds and the peak RSS flat against the run before, and the rows say
//!    whether they did.
//!
//! 7. The careful Python rebuild the performance issue measures switchyard against
//!    (`benches/python/careful_pipeline.py`: confluent-kafka, batched polling, ONNX Runtime at
//!    batch 64, one process per role) and `switchyard demo`, each against a standalone
//!    `switchyard broker` of its own, alternating round by round; skipped with the reason when
//!    the Python cannot import confluent_kafka, onnxruntime and numpy.
//!
//! 8. Brokers: the first pipeline case on each broker the suite runs against, alternating round
//!    by round: the embedded broker in the demo's process, a standalone `switchyard broker`, the
//!    second Kafka-protocol broker (Tansu 0.6.0, `.ci/install-tansu`; a row saying so when it
//!    is missing) and Google's Pub/Sub emulator. On the second Kafka broker, the one here that
//!    keeps transactions, the classifier runs at-least-once and exactly-once (a transaction
//!    per call), each at full speed and paced at 2,000 requests/s: the cost of exactly-once in
//!    throughput and in p50/p99. `just bench 3 brokers` runs this section alone.
//!
//! 9. CPU per image, the figure a noisy machine moves least: the CPU time (user + system) of
//!    the `switchyard demo` process at full rate with the broker in its own process (a
//!    standalone `switchyard broker`), beside the host's inference engine alone (µs per image
//!    on one thread, batch 32) and the careful Python rebuild's three processes, each
//!    broker's own CPU beside them. Each is the difference between a 30,000- and a
//!    10,000-request run divided by 20,000, so start-up and draining cancel out; medians of
//!    the rounds. From them a bound: the most any pipeline of this model could reach against
//!    the Python rebuild on this machine's cores, if nothing but the engine and the broker
//!    spent CPU (a throughput target above it cannot be met here). `just bench 3 cpu` runs
//!    this section alone.
//!
//! It prints one Markdown table and writes the same rows as JSON to
//! `<target dir>/bench/pipeline.json`.
//!
//! ```sh
//! just bench                                      # 3 rounds
//! cargo bench -p switchyard --bench pipeline -- 5  # rounds
//! just bench 3 brokers                            # one section: brokers, paced or cpu
//! ```

mod ceilings;
#[path = "../common/mod.rs"]
mod common;
mod cpu;
mod demo;
mod paced;
mod table;

use std::path::{Path, PathBuf};

use anyhow::Context;
use switchyard_pipeline::demo as source;
use switchyard_runtime::nn::NnEngine;
use switchyard_runtime::nn::onnxruntime::{self, IfMissing};

use ceilings::{
    broker_ceiling, ceiling_host, ceiling_native, ceiling_python, ceiling_rows, ceiling_wasm,
    test_images,
};
use demo::{
    Case, Demo, Paths, StandaloneBroker, alternate, args, careful_python, demo_case,
    on_pubsub_emulator, on_second_kafka, on_standalone_broker, run_demo,
};
use table::{Figure, Row, demos_row, fmt, median_of, print_table, ratio, skipped, thousands};

/// The classifier's default `batch`, the bound the batched rows use.
pub(crate) const BATCH: usize = 32;
/// Images per inference-ceiling measurement.
const CEILING_IMAGES: usize = 2048;
/// A request on the wire: the 784-byte image plus its headers.
const REQUEST_BYTES: usize = 900;
/// The rate of the paced runs, requests per second.
pub(crate) const PACED_RATE: u32 = 2000;
/// The test set: the requests of a pipeline run.
pub(crate) const TEST_IMAGES: usize = 10_000;
/// Request counts of the scale rows.
const SCALES: [u64; 3] = [100_000, 300_000, 1_000_000];
/// Throughput at scale counts as level from this share of the 10,000-image median (the
/// machine's run-to-run noise is 10 to 20 %).
const LEVEL: f64 = 0.8;
/// Peak RSS at scale counts as flat up to this many MiB above the run with ten times fewer
/// requests.
const FLAT_MB: f64 = 32.0;

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; the number is ours.
    let rounds = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse::<usize>().ok())
        .unwrap_or(3)
        .max(1);
    let section = std::env::args()
        .skip(1)
        .find(|arg| !arg.starts_with('-') && arg.parse::<usize>().is_err());
    if let Some(other) = section
        .as_deref()
        .filter(|section| !["brokers", "paced", "cpu"].contains(section))
    {
        anyhow::bail!("no section {other:?}: those that run alone are brokers, paced and cpu");
    }
    let components_target = source::components_target_dir();
    let paths = Paths {
        switchyard: PathBuf::from(env!("CARGO_BIN_EXE_switchyard")),
        workspace: source::workspace_root(),
        target: components_target
            .parent()
            .map(Path::to_path_buf)
            .context("the components' target directory has no parent")?,
        components: source::build_components().context("building the components")?,
        models: source::models_dir(),
    };
    // The fastest engine there is, as the demo gets it: installed once when pip is there.
    let onnxruntime = match onnxruntime::provide(IfMissing::Install, |dir| {
        eprintln!("installing ONNX Runtime into {}…", dir.display())
    }) {
        Ok(_) => true,
        Err(why) => {
            eprintln!("tract only: {why}");
            false
        }
    };
    let mut rows = Vec::new();
    let engine = if onnxruntime { "onnxruntime" } else { "tract" };
    let cases = pipeline_cases(engine, onnxruntime);
    let paced_engines: &[&str] = if onnxruntime {
        &["onnxruntime", "tract"]
    } else {
        &["tract"]
    };
    let nn_engine = if onnxruntime {
        NnEngine::Onnxruntime
    } else {
        NnEngine::Tract
    };
    if let Some(section) = section {
        match section.as_str() {
            "brokers" => broker_rows(&paths, &cases[0], rounds, &mut rows)?,
            "paced" => paced::paced_rows(&paths, paced_engines, rounds, &mut rows)?,
            _ => cpu::cpu_rows(&paths, &cases[0], nn_engine, rounds, &mut rows)?,
        }
        print_table(&rows, rounds);
        return Ok(());
    }

    eprintln!("broker ceiling…");
    rows.push(broker_ceiling()?);
    eprintln!("inference ceilings…");
    let ceilings = inference_ceilings(&paths, &components_target, onnxruntime, &mut rows)?;

    let runs = run_cases(&paths, &cases, rounds, &mut rows)?;
    paced::paced_rows(&paths, paced_engines, rounds, &mut rows)?;
    let medians: Vec<Option<f64>> = runs
        .iter()
        .map(|demos| median_of(demos.iter().map(|d| d.images_per_s)))
        .collect();

    eprintln!("against the careful Python rebuild, each on a standalone broker…");
    let standalone = against_python(&paths, &cases[0], rounds, &mut rows)?;

    eprintln!("start, cold and warm…");
    start_rows(&paths, engine, &mut rows)?;
    let first_rss = median_of(runs[0].iter().map(|d| d.peak_rss_mb));
    scale_rows(&paths, &cases[0], medians[0], first_rss, &mut rows)?;
    ratio_rows(&ceilings, &runs, &standalone, &mut rows);
    broker_rows(&paths, &cases[0], rounds, &mut rows)?;
    cpu::cpu_rows(&paths, &cases[0], nn_engine, rounds, &mut rows)?;

    print_table(&rows, rounds);
    let out = paths.target.join("bench");
    std::fs::create_dir_all(&out)?;
    let json = out.join("pipeline.json");
    std::fs::write(&json, serde_json::to_string_pretty(&rows)?)?;
    eprintln!("\nwritten to {}", json.display());
    Ok(())
}

/// Inference alone, µs per image at batch 1 and [`BATCH`]: each engine measured.
struct Ceilings {
    native: Vec<(usize, f64)>,
    wasm: Vec<(usize, f64)>,
    host_tract: Vec<(usize, f64)>,
    host_ort: Option<Vec<(usize, f64)>>,
}

fn inference_ceilings(
    paths: &Paths,
    components_target: &Path,
    onnxruntime: bool,
    rows: &mut Vec<Row>,
) -> anyhow::Result<Ceilings> {
    let native = ceiling_native(paths)?;
    let wasm = ceiling_wasm(paths, components_target)?;
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
    match ceiling_python(paths) {
        Ok(measured) => rows.extend(ceiling_rows(
            "ONNX Runtime from Python (reference)",
            &measured,
        )),
        Err(e) => rows.push(skipped(
            "ONNX Runtime from Python (reference)",
            &format!("skipped: {e:#}; `pip install onnxruntime` adds it"),
        )),
    }
    Ok(Ceilings {
        native,
        wasm,
        host_tract,
        host_ort,
    })
}

/// The pipeline's cases: the first is the best engine at full speed, which the later
/// sections compare against.
fn pipeline_cases(engine: &str, onnxruntime: bool) -> Vec<(String, Vec<String>)> {
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
    cases
}

/// Runs every case `rounds` times, alternating, and adds their medians to the table.
fn run_cases(
    paths: &Paths,
    cases: &[(String, Vec<String>)],
    rounds: usize,
    rows: &mut Vec<Row>,
) -> anyhow::Result<Vec<Vec<Demo>>> {
    let runnable: Vec<Case> = cases
        .iter()
        .map(|(name, args)| demo_case(paths, name.clone(), args.clone()))
        .collect();
    let runs = alternate(rounds, &runnable, |demo| {
        format!(
            "{:>6.0} images/s  p50 {:>7.1} ms  p99 {:>7.1} ms  {:>4.0} MiB",
            demo.images_per_s.unwrap_or(0.0),
            demo.p50_ms.unwrap_or(0.0),
            demo.p99_ms.unwrap_or(0.0),
            demo.peak_rss_mb.unwrap_or(0.0)
        )
    })?;
    for ((name, _), demos) in cases.iter().zip(&runs) {
        rows.push(demos_row(
            "pipeline",
            name.clone(),
            demos,
            &[Figure::PeakRss, Figure::Accuracy],
        ));
    }
    Ok(runs)
}

/// The careful Python rebuild and switchyard's first case, each on a standalone broker of its
/// own, alternating round by round; the pairs, for the ratio rows.
fn against_python(
    paths: &Paths,
    first_case: &(String, Vec<String>),
    rounds: usize,
    rows: &mut Vec<Row>,
) -> anyhow::Result<Vec<(Demo, Demo)>> {
    let mut standalone: Vec<(Demo, Demo)> = Vec::new();
    let mut python_skipped = None;
    for round in 0..rounds {
        let python = match StandaloneBroker::start(paths)
            .and_then(|broker| careful_python(paths, &broker, TEST_IMAGES))
        {
            Ok(python) => python,
            Err(e) => {
                python_skipped = Some(format!("{e:#}"));
                break;
            }
        };
        let ours = on_standalone_broker(paths, &first_case.1)?;
        eprintln!(
            "  round {} careful Python {:>6.0} images/s, switchyard {:>6.0} images/s",
            round + 1,
            python.images_per_s.unwrap_or(0.0),
            ours.images_per_s.unwrap_or(0.0)
        );
        standalone.push((python, ours));
    }
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
                    format!("switchyard demo, {}, standalone broker", first_case.0),
                    ours,
                ),
            ] {
                rows.push(demos_row(
                    "against Python",
                    name,
                    &demos,
                    &[Figure::Accuracy],
                ));
            }
        }
    }
    Ok(standalone)
}

/// The first case on every broker, alternating round by round (see the file's point 8).
fn broker_rows(
    paths: &Paths,
    first_case: &(String, Vec<String>),
    rounds: usize,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    eprintln!("the first case on every broker…");
    let with = |extra: &[&str]| {
        let mut args = first_case.1.clone();
        args.extend(extra.iter().map(|arg| arg.to_string()));
        args
    };
    let paced = PACED_RATE.to_string();
    let second_kafka_cases = [
        ("at-least-once", vec!["--delivery", "at-least-once"]),
        ("exactly-once", vec!["--delivery", "exactly-once"]),
        (
            "at-least-once, paced",
            vec!["--delivery", "at-least-once", "--rate", &paced],
        ),
        (
            "exactly-once, paced",
            vec!["--delivery", "exactly-once", "--rate", &paced],
        ),
    ];
    let mut brokers: Vec<Case> = vec![
        demo_case(
            paths,
            "embedded broker, in the demo's process".into(),
            first_case.1.clone(),
        ),
        (
            "standalone `switchyard broker`".into(),
            Box::new(|| on_standalone_broker(paths, &first_case.1).map(Some)),
        ),
    ];
    for (delivery, extra) in &second_kafka_cases {
        let args = with(extra);
        brokers.push((
            format!(
                "second Kafka-protocol broker (Tansu 0.6.0, or KAFKA_BOOTSTRAP's), {}",
                delivery.replace("paced", &format!("paced at {PACED_RATE}/s"))
            ),
            Box::new(move || on_second_kafka(paths, &args)),
        ));
    }
    brokers.push((
        "Pub/Sub emulator".into(),
        Box::new(|| on_pubsub_emulator(paths, &first_case.1).map(Some)),
    ));
    let runs = alternate(rounds, &brokers, |demo| {
        format!(
            "{:>6.0} images/s  p50 {:>7.1} ms  first prediction {:>5.1} s",
            demo.images_per_s.unwrap_or(0.0),
            demo.p50_ms.unwrap_or(0.0),
            demo.first_prediction_s.unwrap_or(0.0),
        )
    })?;
    for ((name, _), demos) in brokers.iter().zip(&runs) {
        // Only the second Kafka broker's cases run as `None` (not installed).
        if demos.is_empty() && rounds > 0 {
            rows.push(skipped(
                &format!("brokers: {name}"),
                "skipped: not installed; `.ci/install-tansu` installs it",
            ));
            continue;
        }
        rows.push(demos_row(
            "brokers",
            format!("{}, {name}", first_case.0),
            demos,
            &[Figure::FirstPrediction],
        ));
    }
    Ok(())
}

/// The first prediction with an empty compile cache, and with a warm one.
fn start_rows(paths: &Paths, engine: &str, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let cold_cache = tempfile::tempdir()?;
    let mut start_args = args(engine, BATCH, 2, None);
    start_args.extend(["--images".to_string(), "200".to_string()]);
    let cold = run_demo(paths, &start_args, Some(cold_cache.path()))?;
    let warm = run_demo(paths, &start_args, None)?;
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
    Ok(())
}

/// The first case over more requests than the test set: throughput should stay level and
/// the peak RSS flat.
fn scale_rows(
    paths: &Paths,
    first_case: &(String, Vec<String>),
    first_median: Option<f64>,
    first_rss: Option<f64>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    // Each scale row's RSS is compared with the row before it: memory that grows with the
    // work keeps growing from one to the next, while buffers that fill once (the embedded
    // broker keeps up to 5 MiB per partition) stop.
    let mut previous = (10_000, first_rss);
    for images in SCALES {
        eprintln!("scale, {images} requests…");
        let mut scale_args = first_case.1.clone();
        scale_args.extend(["--images".to_string(), images.to_string()]);
        let demo = run_demo(paths, &scale_args, None)?;
        let level = ratio(demo.images_per_s, first_median);
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
                format!("{}, {} requests", first_case.0, thousands(images)),
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
    Ok(())
}

/// The ratios the performance issue sets targets for.
fn ratio_rows(
    ceilings: &Ceilings,
    runs: &[Vec<Demo>],
    standalone: &[(Demo, Demo)],
    rows: &mut Vec<Row>,
) {
    let best = median_of(runs[0].iter().map(|d| d.images_per_s));
    let python_median = median_of(standalone.iter().map(|(p, _)| p.images_per_s));
    let broker = rows[0].value;
    let inference_batched = ceilings
        .host_ort
        .as_ref()
        .unwrap_or(&ceilings.host_tract)
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
        .detail(
            "images/s; target >= 2 (the cpu section's bound says whether these cores allow it)",
        ),
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
        ratio(find(&ceilings.wasm), find(&ceilings.native))
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
}
