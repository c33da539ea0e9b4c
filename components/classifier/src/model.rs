//! LeNet-5 loaded from ONNX and run by tract.
//!
//! Input contract (see models/README.md): a batch of 28 × 28 gray8 images, fed to the graph as
//! `N × 1 × 28 × 28` f32 pixels divided by 255; the graph normalises them itself. Output: ten
//! logits per image.

use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;

use pipeline_core::{IMAGE_BYTES, IMAGE_SIDE};

/// Why the model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// tract could not read, type or optimise the graph.
    #[error(
        "cannot load the ONNX model: {0:#}. Is it models/lenet.onnx (or a model with the same \
         input contract: N x 1 x 28 x 28 f32, output N x 10)?"
    )]
    Load(TractError),
    /// tract failed while running the graph.
    #[error("inference failed: {0:#}")]
    Run(TractError),
    /// The graph returned something other than ten logits per image.
    #[error("the model returned shape {0:?}, expected [batch, 10]")]
    OutputShape(Vec<usize>),
}

/// Number of classes the model predicts.
pub const CLASSES: usize = 10;

/// The name of the graph's input.
pub const INPUT_NAME: &str = "image";
/// The name of the graph's output.
pub const OUTPUT_NAME: &str = "logits";

/// The most images the classifier hands an engine in one model run.
///
/// An engine may prepare per input shape: the host's tract builds one optimized plan per batch
/// size, 2 to 3.5 ms each (BENCHMARKS.md), so a batch of a size it had not met would wait for
/// one. The classifier therefore runs a batch in pieces whose sizes are powers of two up to
/// this ([`run_sizes`]): six shapes in all, each run once in warm-up ([`planned_run_sizes`]).
/// Per image this costs next to nothing, as both engines take about as long per image at batch
/// 1 as at batch 32.
pub const LARGEST_RUN: usize = 32;
const _: () = assert!(LARGEST_RUN.is_power_of_two());

/// The sizes of the model runs for a batch of `images` images, in order: powers of two, largest
/// first, none larger than [`LARGEST_RUN`]. `37` runs as `32, 4, 1`.
pub fn run_sizes(images: usize) -> impl Iterator<Item = usize> {
    let mut left = images;
    std::iter::from_fn(move || {
        let size = match left {
            0 => return None,
            left if left >= LARGEST_RUN => LARGEST_RUN,
            left => 1 << left.ilog2(),
        };
        left -= size;
        Some(size)
    })
}

/// Every size [`run_sizes`] can yield, smallest first: what a warm-up runs once each.
pub fn planned_run_sizes() -> impl Iterator<Item = usize> {
    (0..=LARGEST_RUN.ilog2()).map(|power| 1 << power)
}

/// `lenet5-` and the first four bytes of the model file's SHA-256: names exactly which weights
/// produced a prediction.
pub fn version_of(onnx: &[u8]) -> String {
    let digest = Sha256::digest(onnx);
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("lenet5-{hex}")
}

/// Writes images into the graph's input: each gray8 pixel divided by 255, one image after
/// the other (`N × 1 × 28 × 28`); slots without an image keep their value.
pub fn fill_input(input: &mut [f32], images: &[&[u8; IMAGE_BYTES]]) {
    for (slot, image) in input.chunks_exact_mut(IMAGE_BYTES).zip(images) {
        for (x, &p) in slot.iter_mut().zip(image.iter()) {
            *x = f32::from(p) / 255.0;
        }
    }
}

/// A loaded, optimised LeNet-5 for a fixed batch size.
pub struct Lenet {
    plan: Arc<TypedRunnableModel>,
    batch: usize,
    version: String,
}

impl std::fmt::Debug for Lenet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lenet")
            .field("batch", &self.batch)
            .field("version", &self.version)
            .finish()
    }
}

impl Lenet {
    /// Loads ONNX bytes and optimises the graph for batches of `batch` images, with
    /// switchyard's 2×2 max-pool kernel in place of tract's (see [`tract_kernels`]).
    pub fn load(onnx: &[u8], batch: usize) -> Result<Self, ModelError> {
        Self::load_with(onnx, batch, true)
    }

    /// Loads the graph exactly as tract optimises it, without switchyard's kernels: the
    /// reference the tests compare [`Lenet::load`] with.
    pub fn load_tract_kernels_only(onnx: &[u8], batch: usize) -> Result<Self, ModelError> {
        Self::load_with(onnx, batch, false)
    }

    fn load_with(onnx: &[u8], batch: usize, fast_pools: bool) -> Result<Self, ModelError> {
        let batch = batch.max(1);
        let plan = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])
            .and_then(|m| {
                m.with_input_fact(0, f32::fact([batch, 1, IMAGE_SIDE, IMAGE_SIDE]).into())
            })
            .and_then(|m| m.into_optimized())
            .and_then(|mut m| {
                if fast_pools {
                    tract_kernels::use_fast_max_pools(&mut m)?;
                }
                m.into_runnable()
            })
            .map_err(ModelError::Load)?;
        Ok(Self {
            plan,
            batch,
            version: version_of(onnx),
        })
    }

    /// `lenet5-` and the first four bytes of the model file's SHA-256: names exactly which
    /// weights produced a prediction.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Batch size the graph was optimised for.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Logits for each image; `images.len()` must not exceed the batch size (a short batch is
    /// padded with blank images).
    pub fn logits(&self, images: &[&[u8; IMAGE_BYTES]]) -> Result<Vec<[f32; CLASSES]>, ModelError> {
        assert!(
            images.len() <= self.batch,
            "more images than the batch size"
        );
        let mut input = vec![0f32; self.batch * IMAGE_BYTES];
        fill_input(&mut input, images);
        let tensor = Tensor::from_shape(&[self.batch, 1, IMAGE_SIDE, IMAGE_SIDE], &input)
            .map_err(ModelError::Run)?;
        let outputs = self
            .plan
            .run(tvec!(tensor.into()))
            .map_err(ModelError::Run)?;
        let output = &outputs[0];
        if output.shape() != [self.batch, CLASSES] {
            return Err(ModelError::OutputShape(output.shape().to_vec()));
        }
        let view = output
            .to_plain_array_view::<f32>()
            .map_err(ModelError::Run)?;
        let flat: Vec<f32> = view.iter().copied().collect();
        Ok(flat
            .chunks_exact(CLASSES)
            .take(images.len())
            .map(|row| {
                let mut logits = [0f32; CLASSES];
                logits.copy_from_slice(row);
                logits
            })
            .collect())
    }

    /// Logits of one image.
    pub fn logits_one(&self, image: &[u8; IMAGE_BYTES]) -> Result<[f32; CLASSES], ModelError> {
        let mut rows = self.logits(&[image])?;
        rows.pop().ok_or(ModelError::OutputShape(vec![0, CLASSES]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_runs_in_planned_sizes_largest_first() {
        let planned: Vec<usize> = planned_run_sizes().collect();
        assert_eq!(planned, [1, 2, 4, 8, 16, 32]);
        assert_eq!(run_sizes(0).count(), 0);
        assert_eq!(run_sizes(37).collect::<Vec<_>>(), [32, 4, 1]);
        assert_eq!(run_sizes(100).collect::<Vec<_>>(), [32, 32, 32, 4]);
        for images in 0..=3 * LARGEST_RUN {
            let sizes: Vec<usize> = run_sizes(images).collect();
            assert_eq!(sizes.iter().sum::<usize>(), images, "{images}: {sizes:?}");
            assert!(sizes.iter().all(|size| planned.contains(size)), "{sizes:?}");
            assert!(sizes.windows(2).all(|pair| pair[0] >= pair[1]), "{sizes:?}");
        }
    }
}
