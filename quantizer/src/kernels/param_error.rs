//! One parameter quantized in memory, with the (importance-weighted) squared error it leaves:
//! what sensitivity measurements swap into a model and what their proxy cost is made of.

use half::bf16;
use mixq_loader::Checkpoint;
use rayon::prelude::*;

use crate::kernels::affine::{dequantize_row, packed_row_bytes, NonFinite};
use crate::error::ConvertError;
use crate::kernels::importance::Importance;
use mixq_loader::schema::Param;
use crate::writer::rows::RowSource;
use crate::kernels::method::QuantMethod;

/// A weight quantized to MLX affine bytes, rows in the MLX module's order.
#[derive(Debug, Clone)]
pub struct QuantizedUnit {
    /// Packed codes, `cols * bits / 8` bytes per row.
    pub weight: Vec<u8>,
    /// bf16 scales, little-endian bytes.
    pub scales: Vec<u8>,
    /// bf16 biases, little-endian bytes.
    pub biases: Vec<u8>,
    /// Σ over rows of `row_weight(row) * Σ_j a_j (ŵ_j − w_j)²` (`a`: the importance, or 1).
    pub error: f64,
    /// The same sum of `a_j w_j²`: the output energy the error is relative to.
    pub signal: f64,
}

/// Quantizes one row into `packed`/`scales`/`biases`, dequantizes it into `back`, and returns
/// (Σ_j a_j (ŵ_j − w_j)², Σ_j a_j w_j²) with `a` the importance, or 1.
#[allow(clippy::too_many_arguments)]
pub fn quantize_measured(
    row: &[f32],
    importance: Option<&[f32]>,
    bits: u32,
    group_size: usize,
    method: QuantMethod,
    packed: &mut [u8],
    scales: &mut [bf16],
    biases: &mut [bf16],
    back: &mut [f32],
) -> Result<(f64, f64), NonFinite> {
    method.quantize_row(row, importance, bits, group_size, packed, scales, biases)?;
    dequantize_row(packed, scales, biases, bits, group_size, back);
    let (mut error, mut signal) = (0.0, 0.0);
    for (j, (w, q)) in row.iter().zip(back.iter()).enumerate() {
        let a = importance.map_or(1.0, |a| f64::from(a[j]));
        error += a * f64::from(q - w).powi(2);
        signal += a * f64::from(*w).powi(2);
    }
    Ok((error, signal))
}

/// Quantizes `param` of the upstream checkpoint `ckpt` with `bits`/`group_size` and `method`;
/// the error weighs each row by `row_weight(row)` (e.g. how often its expert is used).
pub fn quantize_unit(
    ckpt: &Checkpoint,
    param: &Param,
    bits: u32,
    group_size: usize,
    method: QuantMethod,
    importance: Option<&Importance>,
    row_weight: &(dyn Fn(usize) -> f64 + Sync),
) -> Result<QuantizedUnit, ConvertError> {
    let src = RowSource::for_param(ckpt, param)?;
    let cols = src.cols();
    let rows = param.numel() / cols;
    let (rb, gpr) = (packed_row_bytes(cols, bits), cols / group_size);
    let mut weight = vec![0u8; rows * rb];
    let mut scales = vec![bf16::ZERO; rows * gpr];
    let mut biases = vec![bf16::ZERO; rows * gpr];
    let (error, signal): (f64, f64) = weight
        .par_chunks_mut(rb)
        .zip(scales.par_chunks_mut(gpr))
        .zip(biases.par_chunks_mut(gpr))
        .enumerate()
        .map_init(
            || (vec![0f32; cols], vec![0f32; cols]),
            |(row, back), (r, ((p, s), b))| -> Result<(f64, f64), ConvertError> {
                src.row_f32(r, row);
                let imp = importance.and_then(|m| m.row(r));
                let (e, sig) = quantize_measured(row, imp, bits, group_size, method, p, s, b, back)
                    .map_err(|e| ConvertError::NonFinite { tensor: param.name(), row: r, col: e.index, value: e.value })?;
                Ok((e * row_weight(r), sig * row_weight(r)))
            },
        )
        .try_fold(|| (0.0, 0.0), |acc, x| x.map(|(e, s)| (acc.0 + e, acc.1 + s)))
        .try_reduce(|| (0.0, 0.0), |a, b| Ok((a.0 + b.0, a.1 + b.1)))?;
    let bytes = |v: Vec<bf16>| bytemuck::cast_slice::<bf16, u8>(&v).to_vec();
    Ok(QuantizedUnit { weight, scales: bytes(scales), biases: bytes(biases), error, signal })
}
