//! The WGSL kernels of the GPU backend and the variants the weight formats need.
//!
//! Kernels that read packed weights are specialised per format at module-build time: a prelude of
//! constants (`FORMAT`, `BITS`, `GROUP`, `EXPERTS`) is put in front of the shared decoding code
//! and the kernel body, so every variant is one self-contained WGSL module.

/// How a weight matrix is stored on the GPU (the checkpoint's bytes, unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// Dense BF16, two values per u32.
    Bf16,
    /// MLX affine: `bits`-bit codes, bf16 scale and bias per `group` columns.
    Affine {
        /// Bits per code: 2, 3, 4, 5, 6 or 8.
        bits: u32,
        /// Columns per group: 32, 64 or 128.
        group: u32,
    },
    /// FP4 E2M1 codes with one E8M0 scale per 32 columns (upstream gpt-oss and MLX `mxfp4`).
    Mxfp4,
}

impl WeightFormat {
    /// Every format the kernels are built for.
    pub fn all() -> Vec<WeightFormat> {
        let mut v = vec![WeightFormat::Bf16, WeightFormat::Mxfp4];
        for bits in [2, 3, 4, 5, 6, 8] {
            for group in [32, 64, 128] {
                v.push(WeightFormat::Affine { bits, group });
            }
        }
        v
    }

    /// Whether the kernels support this format.
    pub fn supported(&self) -> bool {
        match *self {
            WeightFormat::Affine { bits, group } => matches!(bits, 2..=6 | 8) && matches!(group, 32 | 64 | 128),
            _ => true,
        }
    }

    fn prelude(&self, experts: bool) -> String {
        let (format, bits, group) = match *self {
            WeightFormat::Bf16 => (0, 4, 32),
            WeightFormat::Affine { bits, group } => (1, bits, group),
            WeightFormat::Mxfp4 => (2, 4, 32),
        };
        format!("const FORMAT: u32 = {format}u;\nconst BITS: u32 = {bits}u;\nconst GROUP: u32 = {group}u;\nconst EXPERTS: bool = {experts};\n\n")
    }
}

/// One compute kernel (entry point `main`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Dense `y = W x (+ b)` over a tile of tokens.
    Matmul(WeightFormat),
    /// Routed-expert products for the k experts each token selected.
    ExpertMatmul(WeightFormat),
    /// Embedding rows of token ids.
    Embed(WeightFormat),
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
        for f in WeightFormat::all() {
            v.extend([Kernel::Matmul(f), Kernel::ExpertMatmul(f), Kernel::Embed(f)]);
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
        ]);
        v
    }

    /// A short name for labels and test messages.
    pub fn name(&self) -> String {
        match self {
            Kernel::Matmul(f) => format!("matmul {f:?}"),
            Kernel::ExpertMatmul(f) => format!("expert matmul {f:?}"),
            Kernel::Embed(f) => format!("embed {f:?}"),
            k => format!("{k:?}").to_lowercase(),
        }
    }

    /// The complete WGSL source of this kernel.
    pub fn source(&self) -> String {
        let weights = |f: &WeightFormat, experts: bool, body: &str| format!("{}{STEP}\n{WEIGHTS}\n{body}", f.prelude(experts));
        let plain = |body: &str| format!("{STEP}\n{body}");
        match self {
            Kernel::Matmul(f) => weights(f, false, include_str!("wgsl/matmul.wgsl")),
            Kernel::ExpertMatmul(f) => weights(f, true, include_str!("wgsl/matmul.wgsl")),
            Kernel::Embed(f) => weights(f, false, include_str!("wgsl/embed.wgsl")),
            Kernel::Norm => plain(include_str!("wgsl/norm.wgsl")),
            Kernel::Rope => plain(include_str!("wgsl/rope.wgsl")),
            Kernel::Attention => plain(include_str!("wgsl/attention.wgsl")),
            Kernel::Router => plain(include_str!("wgsl/router.wgsl")),
            Kernel::Swiglu => plain(include_str!("wgsl/swiglu.wgsl")),
            Kernel::Combine => plain(include_str!("wgsl/combine.wgsl")),
            Kernel::Sample => format!("{HASH}\n{}", plain(include_str!("wgsl/sample.wgsl"))),
            Kernel::Fill => format!("{HASH}\n{}", plain(include_str!("wgsl/fill.wgsl"))),
        }
    }

    /// The bindings of group 0, in binding order (binding 0 is always the step uniform).
    pub fn bindings(&self) -> &'static [Binding] {
        use Binding::{Read as R, ReadWrite as W, Uniform as U};
        match self {
            Kernel::Matmul(_) | Kernel::ExpertMatmul(_) => &[U, U, R, R, R, R, R, W, R],
            Kernel::Embed(_) => &[U, U, R, R, R, R, W],
            Kernel::Norm => &[U, U, R, R, W],
            Kernel::Rope => &[U, U, R, W, R, R, W, W],
            Kernel::Attention => &[U, U, R, R, R, R, W],
            Kernel::Router => &[U, U, R, W, W],
            Kernel::Swiglu => &[U, U, W, R],
            Kernel::Combine => &[U, U, R, R, R, W],
            Kernel::Sample => &[U, U, R, W],
            Kernel::Fill => &[U, U, W],
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
        assert_eq!(all.len(), 20 * 3 + 8);
    }
}
