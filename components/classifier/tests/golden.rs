//! Proves that tract, running models/lenet.onnx, computes the same logits PyTorch computed at
//! training time (models/golden_logits.json, first 16 test images) within 1e-4, that the
//! model card's accuracy floor holds on the whole test set, and that switchyard's max-pool
//! kernel changes no logit by a single bit against tract's own on all 10,000 test images.
//!
//! Natively, and inside Wasm (`cargo test --target wasm32-wasip2` here, which the
//! `switchyard test` runner runs with `models/` preopened at `/models`): the component runs
//! tract compiled to Wasm, so these are the component's own numbers. The two tests over all
//! 10,000 images are skipped in unoptimized Wasm builds, where they take minutes; pass
//! `--release` to run them.

use classifier::model::Lenet;
use pipeline_core::IMAGE_BYTES;
use pipeline_core::idx::IdxArray;
use pipeline_core::wire::argmax;

/// `models/` of this repository; inside Wasm, where the runner preopens it (see
/// `.cargo/config.toml`).
const MODELS: &str = if cfg!(target_family = "wasm") {
    "/models"
} else {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")
};

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{MODELS}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn test_images() -> Vec<[u8; IMAGE_BYTES]> {
    IdxArray::images(&read("t10k-images-idx3-ubyte.gz"))
        .unwrap()
        .iter()
        .map(|i| i.try_into().unwrap())
        .collect()
}

#[test]
fn tract_logits_match_pytorch_within_1e_4() {
    let golden: serde_json::Value = serde_json::from_slice(&read("golden_logits.json")).unwrap();
    let expected: Vec<Vec<f32>> = serde_json::from_value(golden["logits"].clone()).unwrap();
    assert_eq!(expected.len(), 16);
    let images = test_images();
    let model = Lenet::load(&read("lenet.onnx"), 16).unwrap();
    let refs: Vec<&[u8; IMAGE_BYTES]> = images[..16].iter().collect();
    let actual = model.logits(&refs).unwrap();
    let mut worst = 0f32;
    for (row, (want, got)) in expected.iter().zip(&actual).enumerate() {
        for (class, (w, g)) in want.iter().zip(got).enumerate() {
            let diff = (w - g).abs();
            worst = worst.max(diff);
            assert!(
                diff <= 1e-4,
                "image {row} class {class}: pytorch {w}, tract {g}"
            );
        }
    }
    eprintln!("largest difference {worst:e}");

    // Batch size must not change the answer: one image at a time gives the same logits.
    let single = Lenet::load(&read("lenet.onnx"), 1).unwrap();
    for (image, want) in refs.iter().zip(&actual) {
        let got = single.logits_one(image).unwrap();
        for (w, g) in want.iter().zip(got) {
            assert!((w - g).abs() <= 1e-5);
        }
    }
}

#[test]
#[cfg_attr(
    all(target_family = "wasm", debug_assertions),
    ignore = "minutes in unoptimized Wasm: run with --release"
)]
fn accuracy_on_the_test_set_is_at_least_91_percent() {
    let labels = IdxArray::labels(&read("t10k-labels-idx1-ubyte.gz")).unwrap();
    let images = test_images();
    let model = Lenet::load(&read("lenet.onnx"), 500).unwrap();
    let mut correct = 0;
    for (batch, truth) in images.chunks(500).zip(labels.chunks(500)) {
        let refs: Vec<&[u8; IMAGE_BYTES]> = batch.iter().collect();
        for (logits, &label) in model.logits(&refs).unwrap().iter().zip(truth) {
            correct += usize::from(argmax(logits) == usize::from(label));
        }
    }
    let accuracy = correct as f64 / labels.len() as f64;
    assert!(accuracy >= 0.91, "tract accuracy {accuracy}");
}

#[test]
fn a_file_that_is_not_onnx_is_refused_with_a_clear_error() {
    let err = Lenet::load(b"definitely not a model", 1).unwrap_err();
    assert!(
        err.to_string().contains("cannot load the ONNX model"),
        "{err}"
    );
}

#[test]
#[cfg_attr(
    all(target_family = "wasm", debug_assertions),
    ignore = "minutes in unoptimized Wasm: run with --release"
)]
fn switchyard_pooling_gives_tract_logits_bit_for_bit() {
    let onnx = read("lenet.onnx");
    let images = test_images();
    let refs: Vec<&[u8; IMAGE_BYTES]> = images.iter().collect();
    for batch in [1, 64] {
        let ours = Lenet::load(&onnx, batch).unwrap();
        let tracts = Lenet::load_tract_kernels_only(&onnx, batch).unwrap();
        for (chunk_index, chunk) in refs.chunks(batch).enumerate() {
            let want = tracts.logits(chunk).unwrap();
            let got = ours.logits(chunk).unwrap();
            for (row, (w, g)) in want.iter().zip(&got).enumerate() {
                let bits = |logits: &[f32; 10]| logits.map(f32::to_bits);
                assert_eq!(
                    bits(w),
                    bits(g),
                    "batch {batch}: image {} differs",
                    chunk_index * batch + row
                );
            }
        }
    }
}
