//! How a parameter is stored: bf16, MLX affine (bits × group size) or MXFP4; each format's output
//! tensors, their shapes and bytes, and the bits-per-weight figure, defined once.

use std::fmt;

use crate::dtype::{Dtype, FloatDtype};

/// Bit widths MLX affine quantization supports.
pub const AFFINE_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
/// Group sizes MLX affine quantization supports.
pub const AFFINE_GROUP_SIZES: [u32; 3] = [32, 64, 128];
/// Elements per MXFP4 block (one shared E8M0 scale).
pub const MXFP4_BLOCK: usize = 32;
/// What a quantization entry may say, for error messages.
pub const SUPPORTED_QUANTIZATION: &str =
    "supported: mode affine with bits 2, 3, 4, 5, 6 or 8 and group_size 32, 64 or 128; mode mxfp4 with bits 4 and group_size 32";

/// One MLX per-module quantization setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    /// Bits per code.
    pub bits: u32,
    /// Elements sharing one scale.
    pub group_size: u32,
    /// `affine` or `mxfp4`.
    pub mode: QuantMode,
}

/// MLX quantization modes mixq reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantMode {
    /// `scale * q + bias` with bf16 scales and biases.
    Affine,
    /// FP4 E2M1 codes with E8M0 scales per 32 elements.
    Mxfp4,
}

impl QuantMode {
    /// The name used in config.json.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantMode::Affine => "affine",
            QuantMode::Mxfp4 => "mxfp4",
        }
    }
}


/// The storage format of one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantFormat {
    /// Kept in bf16.
    Bf16,
    /// MLX affine quantization: `scale * q + bias` per group, bf16 scales and biases.
    Affine {
        /// Bits per code (one of [`AFFINE_BITS`]).
        bits: u32,
        /// Elements per scale/bias (one of [`AFFINE_GROUP_SIZES`]).
        group_size: u32,
    },
    /// MLX `mxfp4` mode: E2M1 codes with an E8M0 scale per 32 elements (the upstream experts).
    Mxfp4,
}

/// A tensor as a layout requires it: name, dtype and shape (an upstream source tensor, or an
/// output tensor of a parameter in the MLX checkpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Stored shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of data.
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Bits per weight as mlx-lm computes it: 8 × tensor bytes / parameters (0 for no parameters).
pub fn bits_per_weight(bytes: usize, params: usize) -> f64 {
    if params == 0 {
        0.0
    } else {
        8.0 * bytes as f64 / params as f64
    }
}

impl QuantFormat {
    /// An affine format, if MLX supports that bit width and group size.
    pub fn affine(bits: u32, group_size: u32) -> Result<Self, String> {
        if !AFFINE_BITS.contains(&bits) {
            return Err(format!("affine bits must be one of {AFFINE_BITS:?}, found {bits}"));
        }
        if !AFFINE_GROUP_SIZES.contains(&group_size) {
            return Err(format!("affine group_size must be one of {AFFINE_GROUP_SIZES:?}, found {group_size}"));
        }
        Ok(QuantFormat::Affine { bits, group_size })
    }

    /// The format of an MLX quantization-map entry, checked against what MLX supports.
    pub fn from_spec(spec: QuantSpec) -> Result<Self, String> {
        match spec.mode {
            QuantMode::Affine => Self::affine(spec.bits, spec.group_size),
            QuantMode::Mxfp4 if spec.bits == 4 && spec.group_size == MXFP4_BLOCK as u32 => Ok(QuantFormat::Mxfp4),
            QuantMode::Mxfp4 => Err(format!(
                "mxfp4 needs bits 4 and group_size {MXFP4_BLOCK}, found bits {} and group_size {}",
                spec.bits, spec.group_size
            )),
        }
    }

    /// The quantization-map entry of a module stored this way (`None` for bf16).
    pub fn spec(self) -> Option<QuantSpec> {
        match self {
            QuantFormat::Bf16 => None,
            QuantFormat::Affine { bits, group_size } => Some(QuantSpec { bits, group_size, mode: QuantMode::Affine }),
            QuantFormat::Mxfp4 => Some(QuantSpec { bits: 4, group_size: MXFP4_BLOCK as u32, mode: QuantMode::Mxfp4 }),
        }
    }

    /// Whether the format quantizes (has codes and scales).
    pub fn is_quantized(self) -> bool {
        self != QuantFormat::Bf16
    }

    /// What the input dimension must be a multiple of.
    pub fn input_multiple(self) -> usize {
        match self {
            QuantFormat::Bf16 => 1,
            QuantFormat::Affine { group_size, .. } => group_size as usize,
            QuantFormat::Mxfp4 => MXFP4_BLOCK,
        }
    }

    /// Scale groups per row of `cols` elements (0 for bf16).
    pub fn groups(self, cols: usize) -> usize {
        match self {
            QuantFormat::Bf16 => 0,
            _ => cols / self.input_multiple(),
        }
    }

    /// Bytes of packed codes per row of `cols` elements (bf16: the values).
    pub fn code_bytes(self, cols: usize) -> usize {
        match self {
            QuantFormat::Bf16 => cols * 2,
            QuantFormat::Affine { bits, .. } => cols * bits as usize / 8,
            QuantFormat::Mxfp4 => cols / 2,
        }
    }

    /// Bytes stored per row of `cols` elements in each of the codes, the scales (bf16 for affine,
    /// E8M0 bytes for mxfp4) and the biases (bf16, affine only), as mixq writes them.
    pub fn row_parts(self, cols: usize) -> (usize, usize, usize) {
        self.stored_row_parts(cols, FloatDtype::BF16)
    }

    /// [`QuantFormat::row_parts`] for a checkpoint whose floats (unquantized values, affine scales
    /// and biases) are stored as `floats`, as mlx-lm may write them.
    pub fn stored_row_parts(self, cols: usize, floats: FloatDtype) -> (usize, usize, usize) {
        let groups = self.groups(cols);
        let f = floats.size();
        match self {
            QuantFormat::Bf16 => (cols * f, 0, 0),
            QuantFormat::Affine { .. } => (self.code_bytes(cols), f * groups, f * groups),
            QuantFormat::Mxfp4 => (self.code_bytes(cols), groups, 0),
        }
    }

    /// Bytes stored per row of `cols` elements: codes, scales and biases.
    pub fn row_bytes(self, cols: usize) -> usize {
        let (codes, scales, biases) = self.row_parts(cols);
        codes + scales + biases
    }

    /// The tensors a parameter `{module}.{leaf}` of logical shape `[..., out, in]` becomes.
    pub fn outputs(self, module: &str, leaf: &str, shape: &[usize]) -> Vec<TensorSpec> {
        let (outer, last) = shape.split_at(shape.len().saturating_sub(1));
        let cols = last.first().copied().unwrap_or(0);
        let with_last = |n: usize| outer.iter().copied().chain([n]).collect::<Vec<_>>();
        let t = |leaf: &str, dtype, shape| TensorSpec { name: format!("{module}.{leaf}"), dtype, shape };
        match self {
            QuantFormat::Bf16 => vec![t(leaf, Dtype::BF16, shape.to_vec())],
            QuantFormat::Affine { bits, .. } => vec![
                t("weight", Dtype::U32, with_last(cols * bits as usize / 32)),
                t("scales", Dtype::BF16, with_last(self.groups(cols))),
                t("biases", Dtype::BF16, with_last(self.groups(cols))),
            ],
            QuantFormat::Mxfp4 => {
                vec![t("weight", Dtype::U32, with_last(cols / 8)), t("scales", Dtype::U8, with_last(self.groups(cols)))]
            }
        }
    }

    /// Bytes of every output tensor of a parameter of logical shape `shape`.
    pub fn nbytes(self, shape: &[usize]) -> usize {
        let cols = shape.last().copied().unwrap_or(0);
        let rows: usize = shape.iter().rev().skip(1).product();
        rows * self.row_bytes(cols)
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantFormat::Bf16 => f.write_str("bf16"),
            QuantFormat::Affine { bits, group_size } => write!(f, "affine {bits}-bit gs{group_size}"),
            QuantFormat::Mxfp4 => f.write_str("mxfp4"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_agree_with_output_tensors() {
        let shape = [4, 64, 256];
        for f in [QuantFormat::Bf16, QuantFormat::Mxfp4]
            .into_iter()
            .chain(AFFINE_BITS.iter().flat_map(|&b| AFFINE_GROUP_SIZES.iter().map(move |&g| QuantFormat::Affine { bits: b, group_size: g })))
        {
            let sum: usize = f.outputs("m", "weight", &shape).iter().map(TensorSpec::nbytes).sum();
            assert_eq!(f.nbytes(&shape), sum, "{f}");
        }
        assert_eq!(QuantFormat::Affine { bits: 3, group_size: 64 }.row_bytes(2880), 2880 * 3 / 8 + 4 * 45);
    }

    #[test]
    fn unsupported_settings_are_refused() {
        assert!(QuantFormat::affine(7, 64).unwrap_err().contains("bits"));
        assert!(QuantFormat::affine(4, 0).unwrap_err().contains("group_size"));
        let bad = QuantSpec { bits: 4, group_size: 64, mode: QuantMode::Mxfp4 };
        assert!(QuantFormat::from_spec(bad).is_err());
        assert_eq!(bits_per_weight(10, 0), 0.0);
    }
}
