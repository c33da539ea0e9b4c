//! The inference ceiling: microseconds per image for LeNet-5 with tract on one thread, at batch
//! 1 and at a larger batch, with the classifier's own model code. It is built natively and for
//! wasm32-wasip2, so `just bench` can run the same code both ways and compare.
//!
//! ```text
//! cargo run --release -p classifier --example ceiling -- [MODELS_DIR] [IMAGES] [BATCH...]
//! ```
//!
//! Prints one JSON line per batch size: `{"batch":1,"us_per_image":81.2}`.

use std::path::PathBuf;
use std::time::Instant;

use classifier::model::Lenet;
use pipeline_core::IMAGE_BYTES;
use pipeline_core::idx::IdxArray;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")));
    let count: usize = args.next().map_or(Ok(2048), |n| n.parse())?;
    let mut batches: Vec<usize> = args.map(|b| b.parse()).collect::<Result<_, _>>()?;
    if batches.is_empty() {
        batches = vec![1, 32];
    }
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    let onnx = read("lenet.onnx")?;
    let images = IdxArray::images(&read("t10k-images-idx3-ubyte.gz")?)?;
    let all: Vec<&[u8; IMAGE_BYTES]> = images
        .iter()
        .take(count)
        .map(|image| image.try_into())
        .collect::<Result<_, _>>()?;
    for batch in batches {
        let model = Lenet::load(&onnx, batch)?;
        // One pass to warm caches and tract's buffers, then the timed one.
        for chunk in all.chunks_exact(batch).take(8) {
            model.logits(chunk)?;
        }
        let started = Instant::now();
        let mut done = 0;
        for chunk in all.chunks_exact(batch) {
            model.logits(chunk)?;
            done += chunk.len();
        }
        let us = started.elapsed().as_secs_f64() * 1e6 / done.max(1) as f64;
        println!("{{\"batch\":{batch},\"us_per_image\":{us:.1}}}");
    }
    Ok(())
}
