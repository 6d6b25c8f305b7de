//! How an MLX checkpoint stores each parameter, read the way mlx-lm's loader reads it: a module
//! named in the quantization map takes its entry (`false`: not quantized); a quantizable module
//! with no entry but a `.scales` tensor is quantized with the setting its tensor shapes imply;
//! anything else is bf16.

use crate::checkpoint::Checkpoint;
use crate::dtype::Dtype;
use crate::error::{LoaderError, Result};
use crate::format::{QuantFormat, MXFP4_BLOCK};
use crate::schema::Param;

/// The storage format of `param` in the MLX checkpoint `ckpt`.
pub fn param_format(ckpt: &Checkpoint, param: &Param) -> Result<QuantFormat> {
    let config = ckpt.config();
    let Some(map) = config.quantization.as_ref().filter(|_| param.is_quantizable()) else {
        return Ok(QuantFormat::Bf16);
    };
    let bad = |message: String| LoaderError::Config { path: config.path.clone(), message };
    if let Some(spec) = map.module(&param.module) {
        return QuantFormat::from_spec(spec).map_err(|m| bad(format!("field `quantization.{}`: {m}", param.module)));
    }
    let explicit_false = config.raw.get("quantization").and_then(|q| q.get(&param.module)).is_some_and(|v| v == false);
    let scales_name = format!("{}.scales", param.module);
    if explicit_false || !ckpt.contains(&scales_name) {
        return Ok(QuantFormat::Bf16);
    }
    infer_from_shapes(ckpt, param, &scales_name)
}

/// mlx-lm's `infer_quant_config`: group size from the scales' last dimension, bits from the packed
/// weight's, mode from the scales' dtype (uint8: mxfp4; else affine).
fn infer_from_shapes(ckpt: &Checkpoint, param: &Param, scales_name: &str) -> Result<QuantFormat> {
    let cols = param.in_features();
    let scales = ckpt.tensor(scales_name)?;
    let weight_name = format!("{}.weight", param.module);
    let weight = ckpt.tensor(&weight_name)?;
    let last = |shape: &[usize]| shape.last().copied().unwrap_or(0);
    let groups = last(&scales.info.shape);
    if groups == 0 || !cols.is_multiple_of(groups) {
        return Err(LoaderError::tensor(scales_name, format!("has {groups} groups per row, which does not divide the {cols} input features")));
    }
    let group_size = u32::try_from(cols / groups).unwrap_or(u32::MAX);
    let bits = u32::try_from(last(&weight.info.shape).saturating_mul(32) / cols.max(1)).unwrap_or(u32::MAX);
    let format = if scales.info.dtype == Dtype::U8 {
        if (bits, group_size as usize) == (4, MXFP4_BLOCK) {
            Ok(QuantFormat::Mxfp4)
        } else {
            Err(format!("uint8 scales mean mxfp4 (4 bits, group size 32), but the shapes imply {bits} bits, group size {group_size}"))
        }
    } else {
        QuantFormat::affine(bits, group_size)
    };
    format.map_err(|m| {
        LoaderError::tensor(&weight_name, format!("has no quantization entry in config.json and its shapes are unsupported: {m}"))
    })
}
