//! The WGSL kernels of the GPU backend and the variants the weight formats need.
//!
//! Kernels that read packed weights are specialised per format at module-build time: a prelude of
//! constants (`FORMAT`, `BITS`, `GROUP`, `WIDE`, `EXPERTS`) is put in front of the shared decoding
//! code and the kernel body, so every variant is one self-contained WGSL module.

use mixq_loader::{FloatDtype, QuantFormat};

/// Every weight format the kernels are built for, with the float type of its unquantized values,
/// scales and biases in GPU memory (BF16 or F32; MXFP4 has none, so BF16 only).
pub fn all_formats() -> Vec<(QuantFormat, FloatDtype)> {
    let mut formats = vec![QuantFormat::Bf16, QuantFormat::Mxfp4];
    for bits in mixq_loader::format::AFFINE_BITS {
        for group_size in mixq_loader::format::AFFINE_GROUP_SIZES {
            formats.push(QuantFormat::Affine { bits, group_size });
        }
    }
    let floats = |f: &QuantFormat| if *f == QuantFormat::Mxfp4 { vec![FloatDtype::BF16] } else { vec![FloatDtype::BF16, FloatDtype::F32] };
    formats.iter().flat_map(|f| floats(f).into_iter().map(move |d| (*f, d))).collect()
}

/// The constants that specialise a kernel to one weight format.
fn prelude(format: &QuantFormat, floats: FloatDtype, experts: bool) -> String {
    let (format, bits, group) = match *format {
        QuantFormat::Bf16 => (0, 4, 32),
        QuantFormat::Affine { bits, group_size } => (1, bits, group_size),
        QuantFormat::Mxfp4 => (2, 4, 32),
    };
    let wide = floats == FloatDtype::F32;
    format!(
        "const FORMAT: u32 = {format}u;\nconst BITS: u32 = {bits}u;\nconst GROUP: u32 = {group}u;\nconst WIDE: bool = {wide};\nconst EXPERTS: bool = {experts};\n\n"
    )
}
/// One compute kernel (entry point `main`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Dense `y = W x (+ b)` over a tile of tokens.
    Matmul(QuantFormat, FloatDtype),
    /// Routed-expert products for the k experts each token selected.
    ExpertMatmul(QuantFormat, FloatDtype),
    /// Embedding rows of token ids.
    Embed(QuantFormat, FloatDtype),
    /// RMSNorm.
    Norm,
    /// RoPE of q and k, and the KV-cache store.
    Rope,
    /// Attention with sinks and sliding window.
    Attention,
    /// Router top-k and softmax.
    Router,
    /// SwiGLU-OAI.
    Swiglu,
    /// Weighted sum of expert outputs into the residual stream.
    Combine,
    /// Greedy or temperature sampling of the next token.
    Sample,
    /// Synthetic weights.
    Fill,
    /// Calibration sums of one input site: Σ x² per channel (`false`) or Σ x xᵀ (`true`).
    Observe(bool),
}

/// How a kernel binding is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// A uniform buffer.
    Uniform,
    /// A read-only storage buffer.
    Read,
    /// A read-write storage buffer.
    ReadWrite,
}

const STEP: &str = include_str!("wgsl/step.wgsl");
const WEIGHTS: &str = include_str!("wgsl/weights.wgsl");
const HASH: &str = include_str!("wgsl/hash.wgsl");

impl Kernel {
    /// Every kernel variant the backend can build.
    pub fn all() -> Vec<Kernel> {
        let mut v = Vec::new();
        for (f, d) in all_formats() {
            v.extend([Kernel::Matmul(f, d), Kernel::ExpertMatmul(f, d), Kernel::Embed(f, d)]);
        }
        v.extend([
            Kernel::Norm,
            Kernel::Rope,
            Kernel::Attention,
            Kernel::Router,
            Kernel::Swiglu,
            Kernel::Combine,
            Kernel::Sample,
            Kernel::Fill,
            Kernel::Observe(false),
            Kernel::Observe(true),
        ]);
        v
    }

    /// A short name for labels and test messages.
    pub fn name(&self) -> String {
        match self {
            Kernel::Matmul(f, d) => format!("matmul {f:?} {d}"),
            Kernel::ExpertMatmul(f, d) => format!("expert matmul {f:?} {d}"),
            Kernel::Embed(f, d) => format!("embed {f:?} {d}"),
            k => format!("{k:?}").to_lowercase(),
        }
    }

    /// The complete WGSL source of this kernel.
    pub fn source(&self) -> String {
        let weights =
            |f: &QuantFormat, d: &FloatDtype, experts: bool, body: &str| format!("{}{STEP}\n{WEIGHTS}\n{body}", prelude(f, *d, experts));
        let plain = |body: &str| format!("{STEP}\n{body}");
        match self {
            Kernel::Matmul(f, d) => weights(f, d, false, include_str!("wgsl/matmul.wgsl")),
            Kernel::ExpertMatmul(f, d) => weights(f, d, true, include_str!("wgsl/matmul.wgsl")),
            Kernel::Embed(f, d) => weights(f, d, false, include_str!("wgsl/embed.wgsl")),
            Kernel::Norm => plain(include_str!("wgsl/norm.wgsl")),
            Kernel::Rope => plain(include_str!("wgsl/rope.wgsl")),
            Kernel::Attention => plain(include_str!("wgsl/attention.wgsl")),
            Kernel::Router => plain(include_str!("wgsl/router.wgsl")),
            Kernel::Swiglu => plain(include_str!("wgsl/swiglu.wgsl")),
            Kernel::Combine => plain(include_str!("wgsl/combine.wgsl")),
            Kernel::Sample => format!("{HASH}\n{}", plain(include_str!("wgsl/sample.wgsl"))),
            Kernel::Fill => format!("{HASH}\n{}", plain(include_str!("wgsl/fill.wgsl"))),
            Kernel::Observe(gram) => format!("const GRAM: bool = {gram};\n{}", plain(include_str!("wgsl/observe.wgsl"))),
        }
    }

    /// The bindings of group 0, in binding order (binding 0 is always the step uniform).
    pub fn bindings(&self) -> &'static [Binding] {
        use Binding::{Read as R, ReadWrite as W, Uniform as U};
        match self {
            Kernel::Matmul(..) | Kernel::ExpertMatmul(..) => &[U, U, R, R, R, R, R, W, R],
            Kernel::Embed(..) => &[U, U, R, R, R, R, W],
            Kernel::Norm => &[U, U, R, R, W],
            Kernel::Rope => &[U, U, R, W, R, R, W, W],
            Kernel::Attention => &[U, U, R, R, R, R, W],
            Kernel::Router => &[U, U, R, W, W],
            Kernel::Swiglu => &[U, U, W, R],
            Kernel::Combine => &[U, U, R, R, R, W],
            Kernel::Sample => &[U, U, R, W],
            Kernel::Fill => &[U, U, W],
            Kernel::Observe(_) => &[U, U, R, R, W],
        }
    }
}

/// Rows of a product per workgroup (see matmul.wgsl).
pub const MATMUL_ROWS: u32 = 8;
/// Tokens per workgroup of a dense product.
pub const MATMUL_TILE: u32 = 8;
/// Threads per workgroup of the element-wise kernels.
pub const WORKGROUP: u32 = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_is_distinct_source() {
        let all = Kernel::all();
        let sources: std::collections::HashSet<String> = all.iter().map(Kernel::source).collect();
        assert_eq!(sources.len(), all.len());
        // bf16 and 18 affine formats with BF16 or F32 floats, mxfp4 with none.
        assert_eq!(all.len(), (19 * 2 + 1) * 3 + 10);
    }
}
