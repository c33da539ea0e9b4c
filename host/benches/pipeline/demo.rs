//! Running `switchyard demo` and the careful Python rebuild as child processes, each on a
//! broker it is given or one of its own, and reading back what they report.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use switchyard_broker::BrokerConfig;
use switchyard_broker::kafka::KafkaConfig;

/// What one `switchyard demo` run printed as its last line.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Demo {
    pub images_per_s: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub first_prediction_s: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub accuracy: Option<f64>,
    pub predictions: u64,
    pub images: u64,
}

/// One case of a section: its name, and a run of it (`None`: it cannot run on this machine,
/// such as a broker that is not installed).
pub type Case<'a> = (String, Box<dyn Fn() -> anyhow::Result<Option<Demo>> + 'a>);

/// The case `name`: a `switchyard demo` run with `args`.
pub fn demo_case<'a>(paths: &'a Paths, name: String, args: Vec<String>) -> Case<'a> {
    (
        name,
        Box::new(move || run_demo(paths, &args, None).map(Some)),
    )
}

/// Runs every case once a round for `rounds` rounds, case after case within a round, so the
/// machine's slow spells fall on every case alike and their ratios can be read side by side;
/// prints a line per run (`line` says what of it). Returns each case's runs, in case order.
pub fn alternate(
    rounds: usize,
    cases: &[Case],
    line: impl Fn(&Demo) -> String,
) -> anyhow::Result<Vec<Vec<Demo>>> {
    let width = cases.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let mut runs: Vec<Vec<Demo>> = cases.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for ((name, run), into) in cases.iter().zip(runs.iter_mut()) {
            if let Some(demo) = run()? {
                eprintln!("  round {} {name:<width$}  {}", round + 1, line(&demo));
                into.push(demo);
            }
        }
    }
    Ok(runs)
}

pub struct Paths {
    pub switchyard: PathBuf,
    pub workspace: PathBuf,
    pub target: PathBuf,
    pub components: PathBuf,
    pub models: PathBuf,
}

pub fn args(inference: &str, batch: usize, workers: usize, rate: Option<u32>) -> Vec<String> {
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

pub fn run_demo(paths: &Paths, args: &[String], cache: Option<&Path>) -> anyhow::Result<Demo> {
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
pub struct StandaloneBroker {
    child: Child,
    bootstrap: String,
}

impl StandaloneBroker {
    pub fn start(paths: &Paths) -> anyhow::Result<Self> {
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

    /// The `--broker` URL of it, with the client settings the README gives for it (the
    /// embedded broker's: the mock answers an empty fetch only after `fetch.wait.max.ms`, 500
    /// ms by default).
    pub fn url(&self) -> String {
        BrokerConfig::Kafka(KafkaConfig::for_embedded(&self.bootstrap)).to_url()
    }

    /// The CPU seconds (user and system) the broker process has used so far.
    pub fn cpu_s(&self) -> anyhow::Result<f64> {
        crate::cpu::process_cpu_s(self.child.id())
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

/// The demo's first case against a fresh standalone broker.
pub fn on_standalone_broker(paths: &Paths, case_args: &[String]) -> anyhow::Result<Demo> {
    let broker = StandaloneBroker::start(paths)?;
    on_broker(paths, &broker, case_args)
}

/// The demo's case against `broker`.
pub fn on_broker(
    paths: &Paths,
    broker: &StandaloneBroker,
    case_args: &[String],
) -> anyhow::Result<Demo> {
    let mut args = case_args.to_vec();
    args.extend(["--broker".to_string(), broker.url()]);
    run_demo(paths, &args, None)
}

/// The careful Python rebuild over `images` requests (cycling through the 10,000 test images)
/// against `broker`, which it must have to itself: its consumer and classifier first, the
/// producer once both have joined their groups.
pub fn careful_python(
    paths: &Paths,
    broker: &StandaloneBroker,
    images: usize,
) -> anyhow::Result<Demo> {
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
    let run = format!("careful{}", std::process::id());
    let count = images;
    let images = images.to_string();
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
    if report.predictions != count as u64 {
        bail!(
            "the careful Python consumer counted {} predictions",
            report.predictions
        );
    }
    Ok(report)
}

/// The demo's first case on the second Kafka-protocol broker (Tansu, a fresh one per run, or
/// the cluster `KAFKA_BOOTSTRAP` names), with the client setting the README gives for it
/// (`session.timeout.ms=6000`: Tansu holds a group join for half the session timeout); `None`
/// when there is none (`.ci/install-tansu` installs it).
pub fn on_second_kafka(paths: &Paths, case_args: &[String]) -> anyhow::Result<Option<Demo>> {
    let Some(broker) = switchyard_testing::second_kafka("the brokers section") else {
        return Ok(None);
    };
    let mut args = case_args.to_vec();
    args.extend(["--broker".to_string(), broker.url()]);
    run_demo(paths, &args, None).map(Some)
}

/// The demo's first case through Google's Pub/Sub emulator, which the demo starts for the run
/// (its start is in the first prediction's time, not in the throughput).
pub fn on_pubsub_emulator(paths: &Paths, case_args: &[String]) -> anyhow::Result<Demo> {
    let mut args = case_args.to_vec();
    args.extend([
        "--broker".to_string(),
        "pubsub://switchyard-demo".to_string(),
    ]);
    run_demo(paths, &args, None)
}
