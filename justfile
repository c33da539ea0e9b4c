# Day-to-day targets. `just --list` shows them. Every target runs from a fresh clone: rustup
# installs the pinned toolchain (rust-toolchain.toml), cargo fetches the crates, and the host
# adds the wasm32-wasip2 target when it builds components.

# The broker the three-terminal targets use: by default `just broker`'s, with the client
# settings that suit it (`switchyard broker` prints them).
broker_url := env_var_or_default("BROKER", "kafka://127.0.0.1:9092?fetch.wait.max.ms=1&heartbeat.interval.ms=500&session.timeout.ms=2000")
target := env_var_or_default("CARGO_TARGET_DIR", justfile_directory() / "target")
export SWITCHYARD_COMPONENTS := target / "components/wasm32-wasip2/component"

# Show the targets.
default:
    @just --list

# Build the three components for wasm32-wasip2 (into $CARGO_TARGET_DIR/components), adding the
# target to the toolchain when it is missing.
[doc("Build the three components for wasm32-wasip2")]
components:
    cargo run --release -- build

# Check a manifest and its components (world against role, imports, inference engine) without
# compiling anything or reaching a broker, e.g. `just validate components/pipeline.toml`.
[doc("Check a manifest and its components without compiling or reaching a broker")]
validate MANIFEST: components
    cargo run --release -- validate {{MANIFEST}}

# Apply the changes to a manifest and its .wasm files to the `switchyard run` running it, e.g.
# `just deploy components/pipeline.toml` (see README, "Deploying a component").
[no-cd]
[doc("Deploy a changed manifest or .wasm into the host running it")]
deploy MANIFEST:
    cargo run --release --manifest-path '{{justfile_directory()}}/Cargo.toml' -- deploy {{MANIFEST}}

# Create a component crate NAME where you run this (pass --command for a command), e.g.
# `just new shout`: it builds, tests and runs as generated (see README, "Write a component").
[no-cd]
[doc("Create a component crate NAME here (--command for a command)")]
new NAME *ARGS:
    cargo run --release --manifest-path '{{justfile_directory()}}/Cargo.toml' -- new {{NAME}} {{ARGS}}

# Run a component crate's unit tests inside Wasm, as `cargo test --target wasm32-wasip2` in its
# directory does, with the host just built on the PATH as the runner (`switchyard test`), e.g.
# `just test-component consumer`; pass cargo's test arguments after the name.
[doc("Run a component crate's unit tests inside Wasm, e.g. consumer")]
test-component NAME *ARGS:
    cargo build --release
    rustup target add wasm32-wasip2
    cd components/{{NAME}} && PATH="{{target}}/release:$PATH" cargo test --release --target wasm32-wasip2 {{ARGS}}

# Run the whole pipeline on the embedded broker and print the summary (pass e.g. --images 1000).
demo *ARGS:
    cargo run --release -- demo {{ARGS}}

# The same demo through Google's Pub/Sub emulator (started for the run; PUBSUB_EMULATOR_HOST
# or ?endpoint= picks a running one).
[doc("The demo through Google's Pub/Sub emulator")]
demo-pubsub *ARGS:
    cargo run --release -- demo --broker pubsub://switchyard-demo {{ARGS}}

# ONNX Runtime for the host's wasi:nn (pip downloads the onnxruntime wheel; kept in
# ~/.cache/switchyard). Then `nn = "auto"` and `demo --inference host` use it.
[doc("Install ONNX Runtime for the host's wasi:nn")]
onnxruntime:
    cargo run --release -- install-onnxruntime

# Tansu 0.6.0, the second Kafka-protocol broker the tests prove the Kafka backend against
# (kept in ~/.cache/switchyard/tools; see README, "Brokers"). Tests that need it start it.
[doc("Install Tansu, the tests' second Kafka-protocol broker")]
install-tansu:
    .ci/install-tansu

# Google's Pub/Sub emulator on 127.0.0.1:8085 (capped heap), until Ctrl-C.
pubsub-emulator:
    cargo run --release -- pubsub-emulator --port 8085

# Every test: unit, integration, in-Wasm, end-to-end. Same command as the README and CI.
test:
    cargo test --release --workspace

# The performance table (BENCHMARKS.md): broker and inference ceilings, the pipeline per
# engine, batch and worker count, paced latency, cold and warm start, brokers, CPU per image
# (pass ROUNDS, e.g. `just bench 5`, and a section to run it alone: `just bench 5 paced`,
# `brokers` or `cpu`). Also written as JSON to $CARGO_TARGET_DIR/bench/pipeline.json.
[doc("The performance table (BENCHMARKS.md); pass ROUNDS")]
bench *ARGS:
    cargo bench -p switchyard --bench pipeline -- {{ARGS}}

# Broker throughput side by side: embedded Kafka, Pub/Sub emulator with 1 and 4 streams
# (pass N ROUNDS, e.g. `just bench-brokers 20000 5`).
[doc("Broker throughput side by side; pass N ROUNDS")]
bench-brokers *ARGS:
    cargo bench -p switchyard --bench broker_throughput -- {{ARGS}}

# Three-terminal mode, 1/4: the embedded Kafka broker on 127.0.0.1:9092.
broker:
    cargo run --release -- broker

# Three-terminal mode, 2/4: the classifier, subscribed to `requests`.
classifier: components
    cargo run --release -- run components/classifier.toml --broker '{{broker_url}}'

# Three-terminal mode, 3/4: the consumer, printing one line per prediction.
consumer: components
    cargo run --release -- run components/consumer.toml --broker '{{broker_url}}'

# Three-terminal mode, 4/4: send the 10,000 test images as requests.
producer: components
    cargo run --release -- run components/producer.toml --broker '{{broker_url}}'

# Evaluate models/lenet.onnx with tract on the 10,000 test images.
eval:
    cargo run --release -p classifier --example eval

# Retrain the model (CPU, about 10 minutes on 2 cores); see models/README.md.
train:
    python3 -m venv {{target}}/venv
    {{target}}/venv/bin/pip install -r models/requirements.txt
    {{target}}/venv/bin/python models/train.py --data ../shared/data/fashion-mnist --out models

# Format, lint, test: what CI runs.
ci:
    .ci/run
