//! The quantizer interface: a method and what it knows about a weight's inputs, applied to a
//! block of whole rows of a matrix (a cross-column method such as `gptq` needs the whole row and
//! the input Hessian shared by all rows; per-group methods just run row by row).

use std::fmt;

use half::bf16;
use rayon::prelude::*;

use crate::kernels::affine::{packed_row_bytes, quantize_row, NonFinite};
use crate::kernels::gptq::{quantize_rows_gptq, HessianFactor};
use crate::kernels::mse::quantize_row_mse;

/// How the scale and bias of each affine group are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantMethod {
    /// mlx's own choice (`mx.quantize`): the group's min and max, byte-identical to mlx.
    MinMax,
    /// The scale and bias that minimise the (importance-weighted) squared error.
    Mse,
    /// The `mse` search on weights updated by error feedback through the input Hessian
    /// (GPTQ/OPTQ): each column's rounding error is carried into the columns not yet quantized.
    Gptq,
}

impl QuantMethod {
    /// Every method, in CLI order.
    pub const ALL: [QuantMethod; 3] = [QuantMethod::MinMax, QuantMethod::Mse, QuantMethod::Gptq];

    /// The CLI and recipe spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantMethod::MinMax => "minmax",
            QuantMethod::Mse => "mse",
            QuantMethod::Gptq => "gptq",
        }
    }

    /// Parses `minmax`, `mse` or `gptq`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// Whether the method needs input Hessians (`mixq calibrate --hessian`).
    pub fn needs_hessians(self) -> bool {
        self == QuantMethod::Gptq
    }

    /// Quantizes one row with a per-group method; `importance` weights the `mse` search (`minmax`
    /// ignores it; `gptq` without a Hessian is `mse`).
    #[allow(clippy::too_many_arguments)]
    pub fn quantize_row(
        self,
        row: &[f32],
        importance: Option<&[f32]>,
        bits: u32,
        group_size: usize,
        packed: &mut [u8],
        scales: &mut [bf16],
        biases: &mut [bf16],
    ) -> Result<(), NonFinite> {
        match self {
            QuantMethod::MinMax => quantize_row(row, bits, group_size, packed, scales, biases),
            QuantMethod::Mse | QuantMethod::Gptq => quantize_row_mse(row, importance, bits, group_size, packed, scales, biases),
        }
    }

    /// Quantizes whole rows (`rows.len() / cols` of them, row-major) into packed codes, scales and
    /// biases, rows in parallel. `gptq` with a Hessian updates `rows` in place as it feeds errors
    /// forward; every other case leaves them as they are. A non-finite weight is reported as
    /// (row within the block, its column and value).
    #[allow(clippy::too_many_arguments)]
    pub fn quantize_rows(
        self,
        rows: &mut [f32],
        cols: usize,
        inputs: InputStats<'_>,
        (bits, group_size): (u32, usize),
        packed: &mut [u8],
        scales: &mut [bf16],
        biases: &mut [bf16],
    ) -> Result<(), (usize, NonFinite)> {
        let gpr = cols / group_size;
        if let (QuantMethod::Gptq, InputStats::Hessian(h)) = (self, inputs) {
            return quantize_rows_gptq(rows, h, (bits, group_size), packed, scales, biases);
        }
        let importance = match inputs {
            InputStats::None => None,
            InputStats::Importance(a) => Some(a),
            InputStats::Hessian(h) => Some(h.importance()),
        };
        rows.par_chunks(cols)
            .zip(packed.par_chunks_mut(packed_row_bytes(cols, bits)))
            .zip(scales.par_chunks_mut(gpr).zip(biases.par_chunks_mut(gpr)))
            .enumerate()
            .try_for_each(|(i, ((row, p), (s, b)))| self.quantize_row(row, importance, bits, group_size, p, s, b).map_err(|e| (i, e)))
    }
}

impl fmt::Display for QuantMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a quantizer knows about the inputs a block of rows multiplies.
#[derive(Debug, Clone, Copy)]
pub enum InputStats<'a> {
    /// Nothing: every column weighs the same.
    None,
    /// Per-column importance (floored mean x²).
    Importance(&'a [f32]),
    /// The input Hessian, factored for error feedback (its floored diagonal is the importance).
    Hessian(&'a HessianFactor),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse() {
        assert_eq!(QuantMethod::parse("mse"), Some(QuantMethod::Mse));
        assert_eq!(QuantMethod::parse("minmax"), Some(QuantMethod::MinMax));
        assert_eq!(QuantMethod::parse("gptq"), Some(QuantMethod::Gptq));
        assert_eq!(QuantMethod::parse("awq"), None);
        assert!(QuantMethod::Gptq.needs_hessians() && !QuantMethod::Mse.needs_hessians());
    }
}
