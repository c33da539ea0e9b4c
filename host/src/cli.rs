//! The command line's shape: every subcommand, its help and where its arguments are (each
//! command's arguments live beside its body in `commands/`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::commands;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Runs sandboxed WebAssembly components against Apache Kafka and Google Cloud Pub/Sub \
             through one messaging interface",
    after_help = "Exit codes: 0 success; 1 an error (named on standard error, with the fix), a \
                  refused manifest or deploy, a demo that lost predictions, a run that could not \
                  stop in time; 2 a usage error; `exec` and `test` exit with the component's own \
                  code (101: a unit test failed or trapped).\n\nExample:\n  switchyard demo"
)]
pub struct Cli {
    /// Directory for compiled components (default: ~/.cache/switchyard/compiled).
    #[arg(long, global = true, env = "SWITCHYARD_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Subcommand)]
pub enum Commands {
    /// Run the components of a manifest until Ctrl-C (or until its commands finish, when it
    /// has no handlers). While it runs, `switchyard deploy` applies changes to the manifest
    /// and its .wasm files.
    #[command(
        after_help = "Example:\n  switchyard run components/pipeline.toml --broker kafka://127.0.0.1:9092"
    )]
    Run(commands::run::RunArgs),
    /// Apply the changes to a manifest, and to the .wasm files it names, to the `switchyard
    /// run` running it, without a restart. Changed and added components are checked and
    /// compiled first: one that would not run is refused and the old versions keep running.
    /// A handler whose subscription stays takes its new build between messages (nothing
    /// lost, nothing handled twice); one whose subscription or workers changed, or that is
    /// gone from the manifest, commits and leaves its group first; added handlers start;
    /// added or changed commands run. Exits 1 if the deploy was refused.
    #[command(after_help = "Example:\n  switchyard deploy components/pipeline.toml")]
    Deploy(commands::deploy::DeployArgs),
    /// Check a manifest and every component it names, without compiling anything or
    /// reaching a broker: each component's world against its role (a handler exports
    /// wasi:messaging/incoming-handler, a command wasi:cli/run; every import is one switchyard
    /// provides) and the inference engine it asks for. Exits 1 if any would not run.
    #[command(after_help = "Example:\n  switchyard validate components/pipeline.toml")]
    Validate(commands::validate::ValidateArgs),
    /// Publish messages to a topic on any backend: --payload, --file, or one message per line
    /// of standard input (like `kcat -P`).
    #[command(
        after_help = "Example:\n  echo '{\"hello\":1}' | switchyard publish -t requests --broker kafka://127.0.0.1:9092"
    )]
    Publish(commands::messages::PublishArgs),
    /// Read messages from a topic on any backend, one JSON object per line on standard output
    /// (like `kcat -C -J`), acknowledging each.
    #[command(
        after_help = "Example:\n  switchyard consume -t predictions --broker kafka://127.0.0.1:9092 --count 10"
    )]
    Consume(commands::messages::ConsumeArgs),
    /// Send dead letters back to the topic they failed on (`-t requests.dlq`), without their
    /// dead-letter headers, acknowledging each once the broker stored it.
    #[command(
        after_help = "Example:\n  switchyard replay -t requests.dlq --broker kafka://127.0.0.1:9092"
    )]
    Replay(commands::messages::ReplayArgs),
    /// List, create or delete topics on any backend (like `kafka-topics.sh` and `gcloud
    /// pubsub topics`).
    #[command(after_help = "Example:\n  switchyard topics list --broker kafka://127.0.0.1:9092")]
    Topics {
        #[command(subcommand)]
        command: commands::topics::TopicsCommand,
    },
    /// Run Google's Pub/Sub emulator (from the Cloud SDK) until Ctrl-C, with a capped heap.
    #[command(after_help = "Example:\n  switchyard pubsub-emulator --port 8085")]
    PubsubEmulator(commands::broker::PubsubEmulatorArgs),
    /// Run the embedded Kafka-protocol broker alone, for other switchyard processes and kcat.
    #[command(
        after_help = "Example:\n  switchyard broker --port 9092 --topic requests:8 --topic predictions:8"
    )]
    Broker(commands::broker::BrokerArgs),
    /// Run the Fashion-MNIST pipeline (producer → classifier → consumer) and report accuracy,
    /// throughput and latency. The last output line is JSON.
    #[command(
        after_help = "Example:\n  switchyard demo --images 2000 --rate 500 --results postgres://postgres@127.0.0.1/test"
    )]
    Demo(commands::demo::DemoArgs),
    /// Report on a run from the results store: accuracy, per-class accuracy, the confusion
    /// matrix, latency percentiles and throughput; with --out, also report.html with plots.
    #[command(
        after_help = "Example:\n  switchyard report --out report/   (the latest run in the default store)"
    )]
    Report(commands::report::ReportArgs),
    /// Build components of this source tree for wasm32-wasip2 (adding the target with rustup
    /// when the toolchain lacks it) and print the directory of the `.wasm` files.
    #[command(after_help = "Example:\n  switchyard build -p classifier")]
    Build(commands::build::BuildArgs),
    /// Install ONNX Runtime for the host's wasi:nn: pip downloads the `onnxruntime` wheel
    /// from PyPI and its shared library is kept in ~/.cache/switchyard. Prints its path.
    #[command(after_help = "Example:\n  switchyard install-onnxruntime")]
    InstallOnnxruntime,
    /// Create a component crate that builds, tests (`cargo test`, inside Wasm) and runs as
    /// generated: a handler, or with --command a command; with its WIT (the published
    /// wasi:messaging), its .cargo/config.toml, a manifest and a unit test.
    #[command(after_help = "Example:\n  switchyard new shout && cd shout && cargo test")]
    New(commands::new::NewArgs),
    /// Run a component's unit-test binary: cargo's runner for wasm32-wasip2 (`runner =
    /// "switchyard test"` in .cargo/config.toml), so `cargo test --target wasm32-wasip2` runs
    /// a component crate's tests inside Wasm. No broker: what the tests send is recorded for
    /// switchyard:host/test-support. The current directory is preopened read-only (as `.` and
    /// at its own path) and a fresh writable directory as /tmp. Exits with the tests' code.
    #[command(
        after_help = "Example (in .cargo/config.toml, as cargo's runner):\n  [target.wasm32-wasip2]\n  runner = \"switchyard test\""
    )]
    Test(commands::exec::TestArgs),
    /// Run one command component (a WASI command that may send messages) against a broker;
    /// exits with its exit code.
    #[command(
        after_help = "Example:\n  switchyard exec producer.wasm --dir models::/models --publish requests -- --count 10"
    )]
    Exec(commands::exec::ExecArgs),
}
