//! Kernels of switchyard's own for tract plans, and the pass that puts them in place of
//! tract's: a 2×2, stride-2 max-pool. The classifier uses it inside Wasm, the host's `wasi:nn`
//! natively, so both run the same arithmetic.
//!
//! Why: profiled on models/lenet.onnx, tract 0.23.9 spends 45 % of a native inference (and,
//! in Wasm, 27 % of the classifier's time, 17 points of it in calls to `fmaxf`) in its
//! `OptMaxPool`. Its fast path covers stride 1 only; a stride-2 window goes through a scalar
//! loop with bounds checks on every tap and `f32::max`, which is a libm call on Wasm. LeNet's
//! two pools are 2×2 with stride 2, the most common pool there is.
//!
//! This kernel takes the maximum of two rows first (contiguous, so it vectorises on x86 and on
//! Wasm SIMD alike) and then of neighbouring pairs, with a plain comparison instead of
//! `f32::max`. A maximum picks one of its inputs, so the result is the same value tract
//! computes for every finite input; the classifier's `golden.rs` checks the logits bit for bit
//! on the whole test set.
#![deny(missing_docs)]

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::OptMaxPool;
use tract_onnx::tract_core::ops::cnn::PaddingSpec;
use tract_onnx::tract_core::ops::nn::DataFormat;

/// Max-pooling over 2×2 windows with stride 2 and no padding, on an `N × C × H × W` f32 tensor
/// (an odd last row or column is dropped, as ONNX's floor rounding does).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaxPool2x2;

impl Op for MaxPool2x2 {
    fn name(&self) -> StaticName {
        "MaxPool2x2".into()
    }

    op_as_typed_op!();
}

impl EvalOp for MaxPool2x2 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let &[n, c, h, w] = input.shape() else {
            bail!("MaxPool2x2 expects N x C x H x W, got {:?}", input.shape());
        };
        let view = input.try_as_plain_ram()?;
        let pixels = view.as_slice::<f32>()?;
        let mut output = Tensor::zero::<f32>(&[n, c, h / 2, w / 2])?;
        {
            let mut out_view = output.try_as_plain_ram_mut()?;
            max_pool_2x2(pixels, h, w, out_view.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for MaxPool2x2 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = &inputs[0].shape;
        if shape.len() != 4 {
            bail!("MaxPool2x2 expects a rank-4 input, got {shape:?}");
        }
        let half = |axis: usize| shape[axis].clone() / 2;
        Ok(tvec!(f32::fact([
            shape[0].clone(),
            shape[1].clone(),
            half(2),
            half(3)
        ])))
    }

    as_op!();
}

/// `output[plane][oy][ox]` = the largest of the four pixels at rows `2·oy`, `2·oy + 1` and
/// columns `2·ox`, `2·ox + 1` of `input[plane]`, for planes of `h × w` pixels.
pub fn max_pool_2x2(input: &[f32], h: usize, w: usize, output: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    if oh == 0 || ow == 0 {
        return;
    }
    let mut rows = vec![0f32; w];
    for (plane, out_plane) in input
        .chunks_exact(h * w)
        .zip(output.chunks_exact_mut(oh * ow))
    {
        for (oy, out_row) in out_plane.chunks_exact_mut(ow).enumerate() {
            let top = &plane[2 * oy * w..][..w];
            let bottom = &plane[(2 * oy + 1) * w..][..w];
            for ((m, &a), &b) in rows.iter_mut().zip(top).zip(bottom) {
                *m = larger(a, b);
            }
            for (o, pair) in out_row.iter_mut().zip(rows.chunks_exact(2)) {
                *o = larger(pair[0], pair[1]);
            }
        }
    }
}

/// The larger of two values as one comparison and a select, which compiles to `maxps` on x86
/// and `f32x4.pmax` on Wasm, where `f32::max` (IEEE maxNum, NaN-aware) is a libm call.
#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if a < b { b } else { a }
}

/// Replaces every tract max-pool of `model` that is 2×2, stride 2, unpadded, undilated, NCHW,
/// f32 and without index outputs by [`MaxPool2x2`]; other pools keep tract's kernel. Returns how
/// many it replaced.
pub fn use_fast_max_pools(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(pool) = node.op_as::<OptMaxPool>() else {
            continue;
        };
        let spec = &pool.pool_spec;
        let fits = pool.with_index_outputs.is_none()
            && spec.data_format == DataFormat::NCHW
            && spec.kernel_shape[..] == [2, 2]
            && spec.strides.as_deref().is_some_and(|s| s == [2, 2])
            && spec.dilations.as_deref().is_none_or(|d| d == [1, 1])
            && spec.padding == PaddingSpec::Valid
            && model.outlet_fact(node.inputs[0])?.datum_type == f32::datum_type()
            && model.outlet_fact(node.inputs[0])?.rank() == 4;
        if !fits {
            continue;
        }
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, MaxPool2x2)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_both_of_lenets_pools() {
        let onnx = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../models/lenet.onnx"
        ))
        .unwrap();
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])
            .unwrap()
            .with_input_fact(0, f32::fact([4, 1, 28, 28]).into())
            .unwrap()
            .into_optimized()
            .unwrap();
        assert_eq!(use_fast_max_pools(&mut model).unwrap(), 2);
        let plan = model.into_runnable().unwrap();
        let ops: Vec<String> = plan
            .order_without_consts()
            .iter()
            .map(|&id| plan.model().node(id).op().name().to_string())
            .collect();
        assert_eq!(ops.iter().filter(|op| *op == "MaxPool2x2").count(), 2);
        assert!(
            !ops.iter()
                .any(|op| op.contains("MaxPool") && op != "MaxPool2x2")
        );
    }

    #[test]
    fn pools_every_window_and_drops_an_odd_edge() {
        // Two planes of 3 x 5: the last row and column fall outside every window.
        let input: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let mut output = vec![0f32; 2 * 2];
        max_pool_2x2(&input, 3, 5, &mut output);
        let at = |p: usize, y: usize, x: usize| input[p * 15 + y * 5 + x];
        for p in 0..2 {
            for ox in 0..2 {
                let want = [
                    at(p, 0, 2 * ox),
                    at(p, 0, 2 * ox + 1),
                    at(p, 1, 2 * ox),
                    at(p, 1, 2 * ox + 1),
                ]
                .into_iter()
                .fold(f32::MIN, f32::max);
                assert_eq!(output[p * 2 + ox], want, "plane {p} column {ox}");
            }
        }
    }
}
