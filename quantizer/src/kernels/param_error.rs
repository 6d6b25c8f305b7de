//! One parameter quantized in memory, with the (importance-weighted) squared error it leaves:
//! what sensitivity measurements swap into a model and what their proxy cost is made of.

use half::bf16;
use mixq_loader::decode::mxfp4_row_to_f32;
use mixq_loader::format::MXFP4_BLOCK;
use mixq_loader::{Checkpoint, QuantFormat};
use rayon::prelude::*;

use crate::kernels::affine::{dequantize_row, packed_row_bytes, NonFinite};
use crate::kernels::mxfp4::encode_row;
use crate::error::ConvertError;
use crate::kernels::importance::Importance;
use mixq_loader::schema::Param;
use crate::writer::rows::RowSource;
use crate::kernels::method::QuantMethod;

/// A weight quantized to MLX bytes (affine or mxfp4), rows in the MLX module's order.
#[derive(Debug, Clone)]
pub struct QuantizedUnit {
    /// The format the bytes are in.
    pub format: QuantFormat,
    /// Packed codes: `cols * bits / 8` bytes per row (affine), `cols / 2` (mxfp4).
    pub weight: Vec<u8>,
    /// bf16 scales as little-endian bytes (affine), E8M0 scale bytes (mxfp4).
    pub scales: Vec<u8>,
    /// bf16 biases, little-endian bytes (empty for mxfp4).
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
    Ok(weighted_error(row, back, importance))
}

/// (Σ_j a_j (ŵ_j − w_j)², Σ_j a_j w_j²) of a row `w` and its dequantized `ŵ`, `a` the importance or 1.
fn weighted_error(row: &[f32], back: &[f32], importance: Option<&[f32]>) -> (f64, f64) {
    let (mut error, mut signal) = (0.0, 0.0);
    for (j, (w, q)) in row.iter().zip(back.iter()).enumerate() {
        let a = importance.map_or(1.0, |a| f64::from(a[j]));
        error += a * f64::from(q - w).powi(2);
        signal += a * f64::from(*w).powi(2);
    }
    (error, signal)
}

/// Quantizes `param` of the source checkpoint `ckpt` to `format` (affine with `method`, or
/// mxfp4) as conversion would; the error weighs each row by `row_weight(row)` (e.g. how often its
/// expert is used).
pub fn quantize_unit(
    ckpt: &Checkpoint,
    param: &Param,
    format: QuantFormat,
    method: QuantMethod,
    importance: Option<&Importance>,
    row_weight: &(dyn Fn(usize) -> f64 + Sync),
) -> Result<QuantizedUnit, ConvertError> {
    let src = RowSource::for_param(ckpt, param)?;
    match format {
        QuantFormat::Affine { bits, group_size } => affine_unit(&src, param, bits, group_size as usize, method, importance, row_weight),
        QuantFormat::Mxfp4 => mxfp4_unit(&src, param, importance, row_weight),
        QuantFormat::Bf16 => Err(ConvertError::NotQuantized(param.name())),
    }
}

fn affine_unit(
    src: &RowSource<'_>,
    param: &Param,
    bits: u32,
    group_size: usize,
    method: QuantMethod,
    importance: Option<&Importance>,
    row_weight: &(dyn Fn(usize) -> f64 + Sync),
) -> Result<QuantizedUnit, ConvertError> {
    let (cols, rows) = (src.cols(), param.numel() / src.cols());
    let (rb, gpr) = (packed_row_bytes(cols, bits), cols / group_size);
    let mut weight = vec![0u8; rows * rb];
    let mut scales = vec![bf16::ZERO; rows * gpr];
    let mut biases = vec![bf16::ZERO; rows * gpr];
    let outputs = weight.par_chunks_mut(rb).zip(scales.par_chunks_mut(gpr)).zip(biases.par_chunks_mut(gpr));
    let (error, signal) = weighted_rows(src, outputs, row_weight, |r, row, back, ((p, s), b)| {
        quantize_measured(row, importance.and_then(|m| m.row(r)), bits, group_size, method, p, s, b, back)
            .map_err(|e| ConvertError::NonFinite { tensor: param.name(), row: r, col: e.index, value: e.value })
    })?;
    let bytes = |v: Vec<bf16>| bytemuck::cast_slice::<bf16, u8>(&v).to_vec();
    let format = QuantFormat::Affine { bits, group_size: group_size as u32 };
    Ok(QuantizedUnit { format, weight, scales: bytes(scales), biases: bytes(biases), error, signal })
}

/// Σ over the source's rows of `row_weight(r) ×` the (error, signal) that `quantize(r, row,
/// back, outputs)` gives for row `r` (its source values in `row`, a scratch row `back`): rows in
/// parallel, summed in row order (the same bits on any number of threads).
fn weighted_rows<O: IndexedParallelIterator>(
    src: &RowSource<'_>,
    outputs: O,
    row_weight: &(dyn Fn(usize) -> f64 + Sync),
    quantize: impl Fn(usize, &[f32], &mut [f32], O::Item) -> Result<(f64, f64), ConvertError> + Sync + Send,
) -> Result<(f64, f64), ConvertError> {
    let cols = src.cols();
    let per_row: Vec<(f64, f64)> = outputs
        .enumerate()
        .map_init(
            || (vec![0f32; cols], vec![0f32; cols]),
            |(row, back), (r, out)| {
                src.row_f32(r, row);
                let (e, sig) = quantize(r, row, back, out)?;
                Ok((e * row_weight(r), sig * row_weight(r)))
            },
        )
        .collect::<Result<_, ConvertError>>()?;
    Ok(per_row.iter().fold((0.0, 0.0), |acc, x| (acc.0 + x.0, acc.1 + x.1)))
}

/// The unit in MLX mxfp4: upstream MXFP4 rows copied (no error), dense rows encoded as
/// `mx.quantize(mode="mxfp4")` encodes the source's float type.
fn mxfp4_unit(
    src: &RowSource<'_>,
    param: &Param,
    importance: Option<&Importance>,
    row_weight: &(dyn Fn(usize) -> f64 + Sync),
) -> Result<QuantizedUnit, ConvertError> {
    let (cols, rows) = (src.cols(), param.numel() / src.cols());
    let (bb, sb) = (cols / 2, cols / MXFP4_BLOCK);
    let mut weight = vec![0u8; rows * bb];
    let mut scales = vec![0u8; rows * sb];
    let outputs = weight.par_chunks_mut(bb).zip(scales.par_chunks_mut(sb));
    let (error, signal) = weighted_rows(src, outputs, row_weight, |r, row, back, (b, s)| {
        match (src.row_mxfp4(r), src.float_dtype()) {
            (Some((blocks, block_scales)), _) => {
                b.copy_from_slice(blocks);
                s.copy_from_slice(block_scales);
            }
            (None, precision) => encode_row(row, precision.unwrap_or(mixq_loader::FloatDtype::BF16), b, s)
                .map_err(|error| ConvertError::Mxfp4 { tensor: param.name(), row: r, error })?,
        }
        mxfp4_row_to_f32(b, s, back);
        Ok(weighted_error(row, back, importance.and_then(|m| m.row(r))))
    })?;
    Ok(QuantizedUnit { format: QuantFormat::Mxfp4, weight, scales, biases: Vec::new(), error, signal })
}
