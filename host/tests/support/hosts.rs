//! Real `switchyard` processes for the tests of the binary (`cli_run`, crash safety, scale-out,
//! three terminals):
//! started, waited on by their log lines, killed with SIGKILL or stopped with a signal; for the
//! pipeline tests, the classifier and the producer against a standalone broker, and the
//! predictions they make counted by request id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_broker::BrokerConfig;
use switchyard_broker::kafka::EmbeddedKafka;
use switchyard_broker::kafka::{Kafka, KafkaConfig};
use switchyard_broker::{Broker, TopicSpec};
use switchyard_runtime::results::{Results, ResultsConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// How long any one step may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(120);

/// How long a host killed by a crash test stays dead before it is started again: part of the
/// scenario (a supervisor's restart delay), not a wait for anything.
pub const DOWNTIME: Duration = Duration::from_secs(1);

/// A standalone broker: the test's client for it, and the URL `switchyard run --broker` takes.
pub struct StandaloneBroker {
    /// The test's own client.
    pub client: Arc<dyn Broker>,
    /// What `--broker` takes.
    pub url: String,
    /// The second Kafka broker's process, killed with the test, when it is one.
    pub second_kafka: Option<super::SecondKafka>,
}

/// The embedded Kafka-protocol broker, listening on a free loopback port for other processes
/// (with the client settings `switchyard broker` prints for it).
pub async fn kafka() -> StandaloneBroker {
    let cluster = Arc::new(
        EmbeddedKafka::start(Some("127.0.0.1:0".parse().unwrap()))
            .await
            .expect("embedded broker"),
    );
    let url = BrokerConfig::Kafka(KafkaConfig::for_embedded(cluster.bootstrap_servers())).to_url();
    StandaloneBroker {
        client: Arc::new(Kafka::embedded(cluster)),
        url,
        second_kafka: None,
    }
}

/// Google's Pub/Sub emulator (see [`super::emulator_endpoint`]).
pub async fn pubsub() -> StandaloneBroker {
    let config = super::pubsub_config().await;
    let url = BrokerConfig::Pubsub(config.clone()).to_url();
    StandaloneBroker {
        client: super::pubsub().await,
        url,
        second_kafka: None,
    }
}

/// The second Kafka-protocol broker (see [`super::second_kafka`]), with the client settings
/// the README gives for it ([`super::SecondKafka::kafka_config`]); `None`, said on standard
/// error, without one.
pub async fn second_kafka(test: &str) -> Option<StandaloneBroker> {
    let second = super::second_kafka(test)?;
    let client = Kafka::connect(second.kafka_config())
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", second.name));
    Some(StandaloneBroker {
        client: Arc::new(client),
        url: second.url(),
        second_kafka: Some(second),
    })
}

/// The `HOST:PORT` that follows `marker` in `line` (`listening on 127.0.0.1:40123 (kcat …`).
pub fn address_after(line: &str, marker: &str) -> String {
    let (_, rest) = line
        .split_once(marker)
        .unwrap_or_else(|| panic!("{marker:?} not in {line:?}"));
    rest.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no address after {marker:?} in {line:?}"))
        .trim_end_matches([',', ';', ')'])
        .to_string()
}

/// Where `switchyard broker --port 0` listens, as it prints it: a broker that takes a free
/// port itself leaves no moment in which another test could take it first.
pub async fn listening_address(broker: &mut Host) -> String {
    loop {
        let line = broker
            .next_output_line()
            .await
            .expect("the broker says where it listens");
        if line.contains("listening on") {
            return address_after(&line, "listening on ");
        }
    }
}

/// A `switchyard` process whose log lines (standard error) and output lines (standard output)
/// the test can wait for.
pub struct Host {
    name: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    output_lines: mpsc::UnboundedReceiver<String>,
    /// Everything it wrote to standard output, complete once `output_done` has finished.
    output: Arc<std::sync::Mutex<String>>,
    output_done: tokio::task::JoinHandle<()>,
}

/// `XDG_DATA_HOME` for the hosts a test binary starts: a temporary directory, removed when
/// the binary ends, so their default results store is `results_home()/switchyard/results.sqlite3`.
pub fn results_home() -> &'static Path {
    static HOME: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    HOME.get_or_init(|| tempfile::tempdir().expect("a temporary directory"))
        .path()
}

impl Host {
    /// Starts `switchyard run MANIFEST --broker URL`.
    pub fn spawn(name: &str, manifest: &Path, broker_url: &str) -> Self {
        Self::start(
            name,
            &["run", manifest.to_str().unwrap(), "--broker", broker_url],
        )
    }

    /// Starts `switchyard ARGS…`.
    pub fn start(name: &str, args: &[&str]) -> Self {
        Self::start_in(name, args, &std::env::current_dir().unwrap(), &[])
    }

    /// Starts `switchyard ARGS…` in directory `dir`, with environment variables `env` added.
    /// Its default results store is in a directory of this test binary's
    /// ([`results_home`]), not the user's.
    pub fn start_in(name: &str, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .current_dir(dir)
            .env_remove("BROKER")
            .env("RUST_LOG", "info")
            .env("XDG_DATA_HOME", results_home())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("running switchyard");
        let stdout = child.stdout.take().unwrap();
        let (printed, output_lines) = mpsc::unbounded_channel();
        let output = Arc::new(std::sync::Mutex::new(String::new()));
        let output_done = tokio::spawn({
            let output = output.clone();
            async move {
                let mut stdout = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = stdout.next_line().await {
                    let mut output = output.lock().unwrap();
                    output.push_str(&line);
                    output.push('\n');
                    let _ = printed.send(line);
                }
            }
        });
        let stderr = child.stderr.take().unwrap();
        let (said, lines) = mpsc::unbounded_channel();
        let prefix = name.to_string();
        tokio::spawn(async move {
            let mut stderr = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = stderr.next_line().await {
                eprintln!("{prefix}: {line}");
                let _ = said.send(line);
            }
        });
        Self {
            name: name.to_string(),
            child,
            lines,
            output_lines,
            output,
            output_done,
        }
    }

    /// The next line it writes to standard output; `None` once it has exited.
    pub async fn next_output_line(&mut self) -> Option<String> {
        let name = &self.name;
        tokio::time::timeout(WAIT, self.output_lines.recv())
            .await
            .unwrap_or_else(|_| panic!("{name} printed nothing within {WAIT:?}"))
    }

    /// Waits until the host says its handlers are running.
    pub async fn running(mut self) -> Self {
        self.wait_for("press Ctrl-C").await;
        self
    }

    /// Waits for a log line containing `needle`, and returns it.
    pub async fn wait_for(&mut self, needle: &str) -> String {
        let name = &self.name;
        let lines = &mut self.lines;
        tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.recv().await {
                if line.contains(needle) {
                    return line;
                }
            }
            panic!("{name} exited before saying {needle:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("{name} did not say {needle:?} within {WAIT:?}"))
    }

    /// SIGKILL: the process gets no chance to commit, settle or leave its group.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// [`Host::kill`], then the lines it wrote to standard error that [`Host::wait_for`] has
    /// not taken.
    pub async fn kill_with_log(mut self) -> Vec<String> {
        self.child.kill().await.unwrap();
        let mut log = Vec::new();
        // The reader of standard error ends, and drops its sender, at the end of the stream.
        while let Some(line) = self.lines.recv().await {
            log.push(line);
        }
        log
    }

    /// SIGTERM; checks the exit status (0) and returns standard output.
    pub async fn stop(self) -> String {
        self.signal(libc::SIGTERM).await
    }

    /// Sends `signal` (SIGINT is Ctrl-C); checks the exit status (0) and returns standard
    /// output.
    pub async fn signal(self, signal: libc::c_int) -> String {
        self.send_signal(signal);
        self.exit().await
    }

    /// Sends `signal` and returns at once.
    pub fn send_signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id().unwrap()).unwrap();
        // SAFETY: kill(2) with the pid of a child this test spawned and has not waited for.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Waits for the process to exit by itself (a host of commands only); checks the exit
    /// status (0) and returns standard output.
    pub async fn exit(self) -> String {
        let name = self.name.clone();
        let (status, stdout) = self.finish().await;
        assert!(status.success(), "{name}: {status}: {stdout}");
        stdout
    }

    /// Waits for the process to exit; returns its status, standard output, and the lines it
    /// wrote to standard error that [`Host::wait_for`] has not taken.
    pub async fn finish_with_log(mut self) -> (std::process::ExitStatus, String, Vec<String>) {
        let mut lines = std::mem::replace(&mut self.lines, mpsc::unbounded_channel().1);
        let (status, stdout) = self.finish().await;
        let mut log = Vec::new();
        // The reader of standard error ends, and drops its sender, at the end of the stream.
        while let Some(line) = lines.recv().await {
            log.push(line);
        }
        (status, stdout, log)
    }

    /// Waits for the process to exit; returns its status and standard output.
    pub async fn finish(mut self) -> (std::process::ExitStatus, String) {
        let name = self.name;
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} did not exit within {WAIT:?}"))
            .unwrap();
        self.output_done.await.unwrap();
        let stdout = self.output.lock().unwrap().clone();
        (status, stdout)
    }
}

/// The `handled` count of the counters line `switchyard run` prints for `component` when it
/// stops (`NAME: received N, handled N, …`).
pub fn handled(stdout: &str, component: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|line| line.starts_with(&format!("{component}: received")))
        .unwrap_or_else(|| panic!("no counters for {component} in {stdout:?}"));
    let handled = line
        .split(", ")
        .find_map(|part| part.strip_prefix("handled "))
        .unwrap_or_else(|| panic!("no handled count in {line:?}"));
    handled.parse().unwrap()
}

/// One pipeline run on its own topics: manifests for the classifier and the producer.
pub struct Pipeline {
    /// The requests topic.
    pub requests: String,
    /// The predictions topic.
    pub predictions: String,
    dir: tempfile::TempDir,
}

impl Pipeline {
    /// Creates the run's topics: `requests` with `partitions` partitions, `predictions` with one.
    pub async fn new(broker: &dyn Broker, partitions: i32) -> Self {
        let pipeline = Self {
            requests: super::unique("requests"),
            predictions: super::unique("predictions"),
            dir: tempfile::tempdir().unwrap(),
        };
        broker
            .ensure_topics(&[
                TopicSpec {
                    name: pipeline.requests.clone(),
                    partitions,
                },
                TopicSpec {
                    name: pipeline.predictions.clone(),
                    partitions: 1,
                },
            ])
            .await
            .unwrap();
        pipeline
    }

    /// A manifest for the classifier as `components/classifier.toml` runs it (batches of up
    /// to 32, LeNet natively through tract) with `workers` instances, on this run's topics;
    /// every host started from it joins one group.
    pub fn classifier(&self, workers: usize) -> PathBuf {
        self.classifier_with(workers, &super::component("classifier"))
    }

    /// [`Pipeline::classifier`] with the classifier's `.wasm` at `wasm`.
    pub fn classifier_with(&self, workers: usize, wasm: &Path) -> PathBuf {
        let path = self.dir.path().join(format!("classifier-{workers}.toml"));
        std::fs::write(&path, self.classifier_entry(workers, wasm)).unwrap();
        path
    }

    /// [`Pipeline::classifier`] with the manifest's `delivery` (`at-least-once`,
    /// `exactly-once`).
    pub fn classifier_delivering(&self, workers: usize, delivery: &str) -> PathBuf {
        let path = self.dir.path().join(format!("classifier-{delivery}.toml"));
        let entry = self.classifier_entry(workers, &super::component("classifier"));
        std::fs::write(&path, format!("{entry}delivery = {delivery:?}\n")).unwrap();
        path
    }

    fn classifier_entry(&self, workers: usize, wasm: &Path) -> String {
        format!(
            "[components.classifier]\n\
             wasm = {wasm:?}\n\
             subscribe = [{requests:?}]\n\
             group = {group:?}\n\
             publish = [{predictions:?}]\n\
             workers = {workers}\n\
             batch = 32\n\
             args = [\"--model\", \"/models/lenet.onnx\", \"--predictions-topic\", {predictions:?}]\n\
             nn = \"tract\"\n\
             preopens = [{{ host = {models:?}, guest = \"/models\" }}]\n\
             retry = {{ max_attempts = 3, backoff_ms = 100 }}\n",
            requests = self.requests,
            predictions = self.predictions,
            group = format!("{}-classifier", self.requests),
            models = super::models(),
        )
    }

    /// A manifest for the producer sending `count` test images at `rate` per second, with
    /// request ids `run-0`, `run-1`, ….
    pub fn producer(&self, count: u64, rate: u64) -> PathBuf {
        let path = self.dir.path().join("producer.toml");
        std::fs::write(&path, self.producer_entry(count, rate)).unwrap();
        path
    }

    /// A manifest for the consumer, storing each prediction of run `run` once in this
    /// pipeline's results store ([`Pipeline::results`]).
    pub fn consumer(&self) -> PathBuf {
        let path = self.dir.path().join("consumer.toml");
        std::fs::write(&path, self.consumer_entry() + &self.results_section()).unwrap();
        path
    }

    /// A manifest for the classifier (two workers) and the consumer in one host.
    pub fn handlers(&self) -> PathBuf {
        let path = self.dir.path().join("handlers.toml");
        let wasm = super::component("classifier");
        let manifest = self.classifier_entry(2, &wasm) + &self.consumer_entry();
        std::fs::write(&path, manifest + &self.results_section()).unwrap();
        path
    }

    /// A manifest for all three components in one host, as the demo runs them: the producer
    /// sends `count` requests at `rate` per second once the handlers have joined.
    pub fn all_three(&self, count: u64, rate: u64) -> PathBuf {
        let path = self.dir.path().join("all-three.toml");
        let wasm = super::component("classifier");
        let manifest = self.producer_entry(count, rate)
            + &self.classifier_entry(2, &wasm)
            + &self.consumer_entry();
        std::fs::write(&path, manifest + &self.results_section()).unwrap();
        path
    }

    /// Where this pipeline's consumer stores its predictions: a SQLite file of its own.
    pub fn results(&self) -> ResultsConfig {
        ResultsConfig::Sqlite {
            path: self.dir.path().join("results.sqlite3"),
        }
    }

    /// The request ids of run `run` in [`Pipeline::results`] (none before the consumer
    /// created the store).
    pub async fn stored(&self) -> Vec<String> {
        let ResultsConfig::Sqlite { path } = self.results() else {
            unreachable!("a SQLite store");
        };
        if !path.exists() {
            return Vec::new();
        }
        let results = Results::open(&self.results(), &switchyard_pipeline::predictions::tables())
            .await
            .expect("opening the pipeline's results store");
        switchyard_pipeline::predictions::read(&results, "run")
            .await
            .expect("reading the pipeline's results store")
            .into_iter()
            .map(|record| record.prediction.request_id)
            .collect()
    }

    fn results_section(&self) -> String {
        let ResultsConfig::Sqlite { path } = self.results() else {
            unreachable!("a SQLite store");
        };
        format!("[results.sqlite]\npath = {path:?}\n")
    }

    fn consumer_entry(&self) -> String {
        format!(
            "[components.consumer]\n\
             wasm = {wasm:?}\n\
             subscribe = [{predictions:?}]\n\
             group = {group:?}\n\
             args = [\"--quiet\", \"--run-id\", \"run\"]\n\
             results = [\"predictions\"]\n",
            wasm = super::component("consumer"),
            predictions = self.predictions,
            group = format!("{}-consumer", self.predictions),
        )
    }

    fn producer_entry(&self, count: u64, rate: u64) -> String {
        format!(
            "[components.producer]\n\
             wasm = {wasm:?}\n\
             publish = [{requests:?}]\n\
             args = [\"--images\", \"/models/t10k-images-idx3-ubyte.gz\", \
                     \"--labels\", \"/models/t10k-labels-idx1-ubyte.gz\", \
                     \"--topic\", {requests:?}, \"--count\", \"{count}\", \
                     \"--rate\", \"{rate}\", \"--run-id\", \"run\"]\n\
             preopens = [{{ host = {models:?}, guest = \"/models\" }}]\n\
             limits = {{ max_call_ms = 0 }}\n",
            wasm = super::component("producer"),
            requests = self.requests,
            models = super::models(),
        )
    }

    /// Reads the predictions topic in a group of its own (subscribed before this returns, so
    /// on Pub/Sub it misses nothing).
    pub async fn predictions(&self, broker: &dyn Broker) -> Predictions {
        let (sender, arrivals) = mpsc::unbounded_channel();
        let (read, read_count) = tokio::sync::watch::channel(0usize);
        let topic = &self.predictions;
        let reader = super::member(broker, &format!("{topic}-reader"), topic).await;
        tokio::spawn(async move {
            loop {
                let delivery = reader.next().await.expect("reading predictions");
                let arrived = Instant::now();
                let prediction: serde_json::Value =
                    serde_json::from_slice(&delivery.message.payload).expect("a prediction");
                let request = prediction["request_id"]
                    .as_str()
                    .expect("a prediction names its request")
                    .to_string();
                let answer = Answer {
                    sent_by: super::sent_by(&delivery.message),
                    transaction: delivery
                        .message
                        .headers
                        .iter()
                        .find(|(name, _)| name == switchyard_broker::TRANSACTION_HEADER)
                        .map(|(_, tag)| tag.clone()),
                };
                delivery.ack().unwrap();
                read.send_modify(|read| *read += 1);
                if sender.send((request, arrived, answer)).is_err() {
                    break;
                }
            }
            reader.close().await.unwrap();
        });
        Predictions {
            arrivals,
            read: read_count,
            answers: HashMap::new(),
        }
    }
}

/// One prediction of a request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The build that made it (`switchyard-sent-by`).
    pub sent_by: String,
    /// The Kafka transaction that wrote it (`switchyard-transaction`), when an exactly-once
    /// handler sent it.
    pub transaction: Option<String>,
}

/// The predictions read so far, counted by request id.
pub struct Predictions {
    arrivals: mpsc::UnboundedReceiver<(String, Instant, Answer)>,
    /// Predictions read from the topic so far, duplicates included, counted as they arrive
    /// (before [`Predictions::until`] takes them).
    read: tokio::sync::watch::Receiver<usize>,
    /// The predictions of each request.
    answers: HashMap<String, Vec<Answer>>,
}

impl Predictions {
    /// Watches how many predictions have arrived, duplicates included: a sender keeping a
    /// window of requests in flight waits on it.
    pub fn arrived(&self) -> tokio::sync::watch::Receiver<usize> {
        self.read.clone()
    }

    /// Reads until `distinct` requests have a prediction; returns when the last one arrived
    /// and when the first one read by this call did.
    pub async fn until(&mut self, distinct: usize) -> (Instant, Option<Instant>) {
        let mut first = None;
        let mut last = Instant::now();
        while self.answers.len() < distinct {
            let (request, arrived, answer) = tokio::time::timeout(WAIT, self.arrivals.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{} of {distinct} requests answered after {WAIT:?} more",
                        self.answers.len()
                    )
                })
                .unwrap();
            first.get_or_insert(arrived);
            last = arrived;
            self.record(request, answer);
        }
        (last, first)
    }

    /// Reads what has arrived, without waiting.
    pub fn drain(&mut self) {
        while let Ok((request, _, answer)) = self.arrivals.try_recv() {
            self.record(request, answer);
        }
    }

    /// Reads until nothing arrives for `quiet`: duplicates that come late (a redelivery storm
    /// would show here).
    pub async fn until_quiet(&mut self, quiet: Duration) {
        while let Ok(Some((request, _, answer))) =
            tokio::time::timeout(quiet, self.arrivals.recv()).await
        {
            self.record(request, answer);
        }
    }

    fn record(&mut self, request: String, answer: Answer) {
        self.answers.entry(request).or_default().push(answer);
    }

    /// The builds that answered `request`, as their `switchyard-sent-by` header names them.
    pub fn builds_of(&self, request: &str) -> Vec<String> {
        self.answers
            .get(request)
            .into_iter()
            .flatten()
            .map(|answer| answer.sent_by.clone())
            .collect()
    }

    /// How many predictions each build made.
    pub fn per_build(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for answer in self.answers.values().flatten() {
            *counts.entry(answer.sent_by.clone()).or_default() += 1;
        }
        counts
    }

    /// Every prediction read, by request id.
    pub fn answers(&self) -> &HashMap<String, Vec<Answer>> {
        &self.answers
    }

    /// Requests with at least one prediction.
    pub fn distinct(&self) -> usize {
        self.answers.len()
    }

    /// Predictions read, duplicates included.
    pub fn total(&self) -> usize {
        self.answers.values().map(Vec::len).sum()
    }

    /// Predictions beyond the first of their request.
    pub fn duplicates(&self) -> usize {
        self.total() - self.answers.len()
    }

    /// Whether every request `run-0` … `run-{count-1}` has a prediction (and no other does).
    pub fn answers_exactly(&self, count: u64) -> bool {
        self.answers.len() as u64 == count
            && (0..count).all(|index| self.answers.contains_key(&format!("run-{index}")))
    }

    /// How many times the most repeated request was answered.
    pub fn most_repeated(&self) -> usize {
        self.answers.values().map(Vec::len).max().unwrap_or(0)
    }
}
