//! A second, independent Kafka-protocol broker, so the Kafka backend is not proven only against
//! librdkafka's own mock cluster (the same library at both ends of the wire hides what a
//! different broker does with groups, fetches and admin calls).
//!
//! No Apache Kafka distribution installs on our machines; Tansu does (a Kafka-protocol broker
//! written from scratch in Rust, memory-only here). `.ci/install-tansu` puts its release
//! binary under `~/.cache/switchyard/tools`, and every test that asks gets a broker of its
//! own, on a port of its own, killed with the test. `KAFKA_BOOTSTRAP=host:port` names a
//! running cluster instead (a real Apache Kafka, say). Without either, the tests of the second
//! broker say so loudly and pass, unless `SWITCHYARD_REQUIRE_SECOND_KAFKA` is set (as `.ci/run`
//! sets it), which makes a missing broker a failure.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use switchyard_broker::BrokerConfig;
use switchyard_broker::kafka::KafkaConfig;

/// The Tansu release the tests know, and whose defects they name.
pub const TANSU_VERSION: &str = "0.6.0";

/// How long Tansu may take to say it is ready (it takes milliseconds).
const READY_WITHIN: Duration = Duration::from_secs(15);

/// A second Kafka-protocol broker for one test.
pub struct SecondKafka {
    /// Its bootstrap address, `host:port`.
    pub bootstrap: String,
    /// What it is, for messages: `Tansu 0.6.0`, or the address `KAFKA_BOOTSTRAP` names.
    pub name: String,
    /// Whether it is Tansu, whose known defects a test may have to step around.
    pub tansu: bool,
    /// The broker's process, when this test started it.
    process: Option<Child>,
}

/// A defect of Tansu 0.6.0 that a test steps around where it bites, skipping only the step it
/// breaks, and saying so (see [`SecondKafka::has`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TansuDefect {
    /// ListOffsets for the latest offset answers the base offset of the partition's last record
    /// batch plus one, not the offset after its last record (measured: 11 records produced in
    /// one batch, high watermark 1). So a new group starting at `latest` also gets the last
    /// batch published before it.
    LatestOffsetInsideLastBatch,
}

impl TansuDefect {
    fn describe(self) -> &'static str {
        match self {
            Self::LatestOffsetInsideLastBatch => {
                "its ListOffsets(latest) answers the last record batch's base offset + 1, not the \
                 end of the partition, so a group starting at `latest` also gets the last batch \
                 published before it"
            }
        }
    }
}

impl SecondKafka {
    /// The client configuration for it that the README gives: `session.timeout.ms=6000`,
    /// because Tansu holds every group join for half the session timeout (22.5 s with
    /// librdkafka's default of 45 s); 6 s is the smallest a Kafka cluster allows by default.
    pub fn kafka_config(&self) -> KafkaConfig {
        let mut config = KafkaConfig::new(self.bootstrap.clone());
        config
            .properties
            .insert("session.timeout.ms".into(), "6000".into());
        config
    }

    /// [`SecondKafka::kafka_config`] as a `--broker` URL.
    pub fn url(&self) -> String {
        BrokerConfig::Kafka(self.kafka_config()).to_url()
    }

    /// Whether this broker has `defect`. When it has, says so on the terminal (past the test
    /// harness's capture, so a passing test shows it too), naming the broker's version and the
    /// `step` of `test` that is not checked because of it.
    pub fn has(&self, defect: TansuDefect, test: &str, step: &str) -> bool {
        if !self.tansu {
            return false;
        }
        say(&format!(
            "{test}: STEP SKIPPED on Tansu {TANSU_VERSION} ({step}): {}",
            defect.describe()
        ));
        true
    }
}

/// Writes a line to standard error directly: `eprintln!` in a test goes to the harness's
/// capture, which shows it only when the test fails.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

impl Drop for SecondKafka {
    fn drop(&mut self) {
        if let Some(process) = &mut self.process {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// Where the Tansu binary is: `$SWITCHYARD_TANSU`, else where `.ci/install-tansu` puts it.
pub fn tansu_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SWITCHYARD_TANSU") {
        return Some(PathBuf::from(path));
    }
    let installed = dirs::cache_dir()?
        .join("switchyard/tools")
        .join(format!("tansu-{TANSU_VERSION}"))
        .join("tansu");
    installed.is_file().then_some(installed)
}

/// The second Kafka broker for a test: the cluster `KAFKA_BOOTSTRAP` names, else a Tansu of
/// the test's own. `None`, said on standard error, when there is neither; a panic then instead
/// when `SWITCHYARD_REQUIRE_SECOND_KAFKA` is set.
pub fn second_kafka(test: &str) -> Option<SecondKafka> {
    if let Ok(bootstrap) = std::env::var("KAFKA_BOOTSTRAP") {
        return Some(SecondKafka {
            name: format!("the Kafka cluster at {bootstrap}"),
            bootstrap,
            tansu: false,
            process: None,
        });
    }
    let Some(binary) = tansu_binary() else {
        let missing = format!(
            "{test}: NOT RUN against a second Kafka broker: none is installed (run \
             `.ci/install-tansu`, or set KAFKA_BOOTSTRAP=host:port to a running cluster)"
        );
        assert!(
            std::env::var_os("SWITCHYARD_REQUIRE_SECOND_KAFKA").is_none(),
            "{missing}"
        );
        say(&missing);
        return None;
    };
    // A port free a moment ago may be taken by the time Tansu binds it: then it says so and
    // never becomes ready, and another port is tried.
    let mut failures = Vec::new();
    for _ in 0..3 {
        match start_tansu(&binary) {
            Ok(started) => return Some(started),
            Err(failure) => failures.push(failure),
        }
    }
    panic!(
        "Tansu ({}) did not start: {}",
        binary.display(),
        failures.join("; ")
    );
}

/// Starts Tansu, memory-only, on a free port of 127.0.0.1 and waits until it says it is ready.
fn start_tansu(binary: &std::path::Path) -> Result<SecondKafka, String> {
    let port = crate::free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let mut process = Command::new(binary)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let stdout = process.stdout.take().ok_or("no standard output")?;
    // Tansu prints `ready in …` once it listens; its output is read to the end so it never
    // blocks on a full pipe.
    let (ready, said_ready) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("ready in") {
                let _ = ready.send(());
            }
        }
    });
    match said_ready.recv_timeout(READY_WITHIN) {
        Ok(()) => Ok(SecondKafka {
            bootstrap: format!("127.0.0.1:{port}"),
            name: format!("Tansu {TANSU_VERSION}"),
            tansu: true,
            process: Some(process),
        }),
        Err(_) => {
            let _ = process.kill();
            let _ = process.wait();
            Err(format!("not ready on port {port} within {READY_WITHIN:?}"))
        }
    }
}
