//! The ceilings the pipeline is measured against: the broker alone, and inference alone
//! (tract natively and in Wasm, the host's `wasi:nn` engines, ONNX Runtime from Python).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use switchyard_broker::kafka::{EmbeddedKafka, Kafka};
use switchyard_runtime::nn::{Encoding, NnEngine, NnHost, Tensor, TensorType};

use crate::demo::Paths;
use crate::table::Row;
use crate::{BATCH, CEILING_IMAGES, REQUEST_BYTES, common};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
pub async fn broker_ceiling() -> anyhow::Result<Row> {
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

pub fn ceiling_native(paths: &Paths) -> anyhow::Result<Vec<(usize, f64)>> {
    build_ceiling(paths, &paths.target, &["--release"])?;
    let output = Command::new(paths.target.join("release/examples/ceiling"))
        .arg(&paths.models)
        .arg(CEILING_IMAGES.to_string())
        .args(["1", &BATCH.to_string()])
        .output()?;
    parse_ceiling(&output.stdout).context("the native ceiling example")
}

pub fn ceiling_wasm(paths: &Paths, components_target: &Path) -> anyhow::Result<Vec<(usize, f64)>> {
    switchyard_pipeline::build::ensure_wasm_target(&paths.workspace)?;
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

pub fn test_images(models: &Path) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::read(models.join("t10k-images-idx3-ubyte.gz"))?;
    let images = pipeline_core::idx::IdxArray::images(&file)?;
    Ok(images
        .iter()
        .take(CEILING_IMAGES)
        .flat_map(|image| image.iter().copied())
        .collect())
}

/// The host's engine, as the classifier uses it through `wasi:nn`.
pub fn ceiling_host(
    onnx: &[u8],
    images: &[u8],
    engine: NnEngine,
) -> anyhow::Result<Vec<(usize, f64)>> {
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

pub fn ceiling_python(paths: &Paths) -> anyhow::Result<Vec<(usize, f64)>> {
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

pub fn ceiling_rows(case: &str, measured: &[(usize, f64)]) -> Vec<Row> {
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
