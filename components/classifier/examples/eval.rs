//! Evaluates models/lenet.onnx with tract over the 10,000 Fashion-MNIST test images: top-1
//! accuracy, per-class accuracy and the confusion matrix. These are the numbers the model card
//! publishes, measured by the same code the classifier component runs.
//!
//! ```text
//! cargo run --release -p classifier --example eval -- [MODELS_DIR]   # or: just eval
//! ```

use std::path::PathBuf;
use std::time::Instant;

use classifier::model::{CLASSES, Lenet};
use pipeline_core::idx::IdxArray;
use pipeline_core::wire::argmax;
use pipeline_core::{CLASS_NAMES, IMAGE_BYTES};

const BATCH: usize = 100;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")));
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    let model = Lenet::load(&read("lenet.onnx")?, BATCH)?;
    let images = IdxArray::images(&read("t10k-images-idx3-ubyte.gz")?)?;
    let labels = IdxArray::labels(&read("t10k-labels-idx1-ubyte.gz")?)?;

    let started = Instant::now();
    let mut confusion = [[0u32; CLASSES]; CLASSES];
    let all: Vec<&[u8; IMAGE_BYTES]> = images
        .iter()
        .map(|image| image.try_into().expect("28x28 images"))
        .collect();
    for (batch, truth) in all.chunks(BATCH).zip(labels.chunks(BATCH)) {
        for (logits, &label) in model.logits(batch)?.iter().zip(truth) {
            confusion[usize::from(label)][argmax(logits)] += 1;
        }
    }
    let elapsed = started.elapsed();

    let total: u32 = confusion.iter().flatten().sum();
    let correct: u32 = (0..CLASSES).map(|c| confusion[c][c]).sum();
    println!(
        "model {}  ({} images, {:.2} s with tract)",
        model.version(),
        total,
        elapsed.as_secs_f64()
    );
    println!(
        "top-1 accuracy: {:.2} %  ({correct}/{total})\n",
        100.0 * f64::from(correct) / f64::from(total)
    );
    println!("| class | accuracy |");
    println!("| --- | ---: |");
    for (c, row) in confusion.iter().enumerate() {
        let n: u32 = row.iter().sum();
        println!(
            "| {} {} | {:.1} % |",
            c,
            CLASS_NAMES[c],
            100.0 * f64::from(row[c]) / f64::from(n.max(1))
        );
    }
    println!("\nconfusion matrix (rows: true class, columns: predicted)\n");
    print!("| true \\ predicted |");
    for c in 0..CLASSES {
        print!(" {c} |");
    }
    println!();
    println!("|{}", " --- |".repeat(CLASSES + 1));
    for (c, row) in confusion.iter().enumerate() {
        print!("| {c} {} |", CLASS_NAMES[c]);
        for v in row {
            print!(" {v} |");
        }
        println!();
    }
    Ok(())
}
