//! Weight matrices kept packed in the memory map, with products that decode one row at a time.
//!
//! A product `y = W x` (or `Y = X W^T` for several tokens) walks the rows of `W`: each row is
//! decoded once into a small f32 scratch (`scale * q + bias` for affine codes, `lut[q] * 2^e` for
//! MXFP4, a widening for BF16 and F16: exactly the reference's dequantized values) and dotted with
//! every input; one token times affine codes is summed per group from the codes themselves
//! instead (`scale · Σ q x + bias · Σ x`). The model is never dequantized as a whole; rows are
//! spread over threads.

use std::borrow::Cow;

use mixq_loader::decode::{float_at, floats_to_f32, mxfp4_row_to_f32};
pub use mixq_loader::RowMap;
use mixq_loader::{FloatDtype, QuantFormat};
use rayon::prelude::*;

/// How a matrix's rows are stored.
#[derive(Debug, Clone, Copy)]
pub enum Codes<'a> {
    /// Unquantized floats (BF16 as mixq writes them; F16 or F32 as mlx-lm may).
    Dense {
        /// `[stored_rows, cols]` little-endian floats.
        data: &'a [u8],
        /// Their type.
        dtype: FloatDtype,
    },
    /// Unquantized floats stored transposed, as transformers stores dense experts: stored row `s`
    /// is column `s % map.src_per` of block `s / map.src_per` of a `[blocks, cols, src_per]`
    /// tensor, gathered in place (a row's elements lie `src_per` values apart).
    Columns {
        /// `[blocks, cols, src_per]` little-endian floats.
        data: &'a [u8],
        /// Their type.
        dtype: FloatDtype,
    },
    /// MLX affine: `bits`-bit codes in a little-endian bit stream per row, scales and biases.
    Affine {
        /// Packed codes, `cols * bits / 8` bytes per row.
        weight: &'a [u8],
        /// Scales, `cols / group_size` per row.
        scales: &'a [u8],
        /// Biases, `cols / group_size` per row.
        biases: &'a [u8],
        /// The float type of the scales and biases (BF16 as mixq writes them).
        floats: FloatDtype,
        /// Bits per code.
        bits: u32,
        /// Elements per group.
        group_size: usize,
    },
    /// MXFP4: FP4 E2M1 codes (low nibble first) with one E8M0 scale per 32 elements.
    Mxfp4 {
        /// `cols / 2` bytes per row.
        blocks: &'a [u8],
        /// `cols / 32` bytes per row.
        scales: &'a [u8],
    },
}

impl Codes<'_> {
    /// The storage format these codes are in.
    pub fn format(&self) -> QuantFormat {
        match *self {
            Codes::Dense { .. } | Codes::Columns { .. } => QuantFormat::Bf16,
            Codes::Affine { bits, group_size, .. } => QuantFormat::Affine { bits, group_size: group_size as u32 },
            Codes::Mxfp4 { .. } => QuantFormat::Mxfp4,
        }
    }

    /// The float type of the stored values, scales and biases (BF16 for MXFP4, which has none).
    pub fn floats(&self) -> FloatDtype {
        match *self {
            Codes::Dense { dtype, .. } | Codes::Columns { dtype, .. } => dtype,
            Codes::Affine { floats, .. } => floats,
            Codes::Mxfp4 { .. } => FloatDtype::BF16,
        }
    }
}

/// A packed weight matrix `[rows, cols]` (for experts, all experts' rows stacked).
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    /// Storage.
    pub codes: Codes<'a>,
    /// Logical rows.
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Logical-to-stored row map.
    pub map: RowMap,
}

impl<'a> Matrix<'a> {
    /// Bytes of packed weight data read per row (for bandwidth figures).
    pub fn row_bytes(&self) -> usize {
        let (codes, scales, biases) = self.codes.format().stored_row_parts(self.cols, self.codes.floats());
        codes + scales + biases
    }

    /// Bytes of the stored tensor (codes, scales and biases), all rows.
    pub fn stored_bytes(&self) -> usize {
        match self.codes {
            Codes::Dense { data, .. } | Codes::Columns { data, .. } => data.len(),
            Codes::Affine { weight, scales, biases, .. } => weight.len() + scales.len() + biases.len(),
            Codes::Mxfp4 { blocks, scales } => blocks.len() + scales.len(),
        }
    }

    /// For [`Codes::Columns`]: the element index of stored row `s`'s first value, column
    /// `s % src_per` of block `s / src_per` of the `[blocks, cols, src_per]` tensor (its later
    /// values follow `src_per` elements apart).
    #[inline(always)]
    fn column_start(&self, s: usize) -> usize {
        let per = self.map.src_per;
        (s / per) * self.cols * per + s % per
    }

    /// Stored rows `lo..hi` of an unquantized matrix as contiguous little-endian floats: the
    /// stored bytes themselves, or for [`Codes::Columns`] the columns gathered into rows (`None`
    /// for quantized codes).
    pub fn float_rows(&self, lo: usize, hi: usize) -> Option<Cow<'a, [u8]>> {
        let c = self.cols;
        match self.codes {
            Codes::Dense { data, dtype } => Some(Cow::Borrowed(&data[lo * c * dtype.size()..hi * c * dtype.size()])),
            Codes::Columns { data, dtype } => {
                let (f, per) = (dtype.size(), self.map.src_per);
                let mut out = Vec::with_capacity((hi - lo) * c * f);
                for s in lo..hi {
                    let base = self.column_start(s);
                    for j in 0..c {
                        let at = (base + j * per) * f;
                        out.extend_from_slice(&data[at..at + f]);
                    }
                }
                Some(Cow::Owned(out))
            }
            Codes::Affine { .. } | Codes::Mxfp4 { .. } => None,
        }
    }

    /// Decodes logical row `r` into `out` (`cols` values).
    #[inline(always)]
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        let s = self.map.stored(r);
        let c = self.cols;
        match self.codes {
            Codes::Dense { data, dtype } => floats_to_f32(dtype, &data[s * c * dtype.size()..(s + 1) * c * dtype.size()], out),
            Codes::Columns { data, dtype } => {
                let (per, base) = (self.map.src_per, self.column_start(s));
                for (j, o) in out.iter_mut().enumerate() {
                    *o = float_at(dtype, data, base + j * per);
                }
            }
            Codes::Mxfp4 { blocks, scales } => {
                let (bb, sb) = (c / 2, c / 32);
                mxfp4_row_to_f32(&blocks[s * bb..(s + 1) * bb], &scales[s * sb..(s + 1) * sb], out)
            }
            Codes::Affine { .. } => {
                let Some((rest, groups, bits)) = affine_parts(self, r) else {
                    unreachable!("affine codes have affine parts");
                };
                let packed = &rest[..c * bits as usize / 8];
                match bits {
                    2 => decode_affine::<2>(packed, groups, out),
                    3 => decode_affine::<3>(packed, groups, out),
                    4 => decode_affine::<4>(packed, groups, out),
                    5 => decode_affine::<5>(packed, groups, out),
                    6 => decode_affine::<6>(packed, groups, out),
                    8 => decode_affine::<8>(packed, groups, out),
                    other => unreachable!("affine matrices are built from a validated QuantFormat; {other} bits is not one"),
                }
            }
        }
    }

    /// `out[t][r] = row_r · xs[t]` for rows `first..first+out_rows`, tokens `t` (`xs` is `[n, cols]`,
    /// `out` is `[n, out_rows]`).
    ///
    /// Rows are decoded [`ROW_BLOCK`] at a time into an f32 scratch (once per row, whatever the
    /// token count) and multiplied with every token by a register-blocked kernel
    /// ([`ROW_BLOCK`] rows by up to [`TOKEN_BLOCK`] tokens of FMA accumulators). Each product is
    /// summed in one fixed order (eight lanes of fused multiply-adds over the columns, then a fixed
    /// pairwise reduction), so results do not depend on the blocking or the number of threads,
    /// and every code path (AVX-512, AVX2+FMA, portable) gives the same bits. One token (decode) times
    /// affine codes is the exception to token-count independence: it reads the codes once with
    /// scales and biases folded out of the groups ([`folded_affine_dot`], as mlx's `qmv` does),
    /// since decoding is bound by reading the codes, not by the multiply-adds.
    pub fn matmul_rows(&self, first: usize, out_rows: usize, xs: &[f32], out: &mut [f32]) {
        let c = self.cols;
        let n = xs.len() / c;
        debug_assert_eq!(out.len(), n * out_rows);
        if n == 0 || out_rows == 0 {
            return;
        }
        // Columns padded to whole lanes with zeros (which add nothing: 0 * 0 is exact).
        let kp = c.next_multiple_of(LANES);
        let xs: Cow<'_, [f32]> = if kp == c {
            Cow::Borrowed(xs)
        } else {
            let mut padded = vec![0f32; n * kp];
            for (dst, src) in padded.chunks_exact_mut(kp).zip(xs.chunks_exact(c)) {
                dst[..c].copy_from_slice(src);
            }
            Cow::Owned(padded)
        };
        // Rows per task: enough weights (about 64 Ki) to amortize the scheduling.
        let chunk = (65_536 / c).next_multiple_of(FUSED_ROWS).clamp(FUSED_ROWS, 64);
        let simd = Simd::detect();
        if n == 1 {
            // One token: the outputs are contiguous, so tasks write into `out` in place.
            let folded = match self.codes {
                Codes::Affine { bits, group_size, .. } => FoldedInput::new(simd, &xs[..c], bits, group_size),
                _ => FoldedInput::default(),
            };
            out.par_chunks_mut(chunk).enumerate().for_each_init(
                || vec![0f32; ROW_BLOCK * kp],
                |scratch, (b, tile)| self.rows_times(simd, first + b * chunk, tile.len(), &xs, &folded, kp, scratch, tile),
            );
            return;
        }
        let tiles: Vec<(usize, Vec<f32>)> = (0..out_rows.div_ceil(chunk))
            .into_par_iter()
            .map_init(
                || vec![0f32; ROW_BLOCK * kp],
                |scratch, b| {
                    let r0 = b * chunk;
                    let rows = chunk.min(out_rows - r0);
                    let mut tile = vec![0f32; rows * n];
                    self.rows_times(simd, first + r0, rows, &xs, &FoldedInput::default(), kp, scratch, &mut tile);
                    (r0, tile)
                },
            )
            .collect();
        for (r0, tile) in tiles {
            let rows = tile.len() / n;
            for (t, dst) in out.chunks_exact_mut(out_rows).enumerate() {
                for (i, o) in dst[r0..r0 + rows].iter_mut().enumerate() {
                    *o = tile[t * rows + i];
                }
            }
        }
    }

    /// Fills `tile[t * rows + i] = row_(r0+i) · xs[t]` (`xs` is `[n, kp]`, zero-padded), on the
    /// widest vector unit `simd` names. `folded` is a single affine token's [`FoldedInput`] (empty
    /// otherwise).
    #[allow(clippy::too_many_arguments)]
    fn rows_times(&self, simd: Simd, r0: usize, rows: usize, xs: &[f32], folded: &FoldedInput, kp: usize, scratch: &mut [f32], tile: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if matches!(simd, Simd::Avx512 | Simd::Avx512Vbmi) && xs.len() == kp && matches!(self.codes, Codes::Affine { .. }) {
            // SAFETY: `Simd::detect` found AVX-512 F and BW, AVX2 and FMA on this CPU (and VBMI
            // for `Avx512Vbmi`, though the kernel only needs it to be fast).
            return unsafe {
                match simd {
                    Simd::Avx512Vbmi => self.rows_times_avx512::<true>(r0, rows, xs, folded, kp, scratch, tile),
                    _ => self.rows_times_avx512::<false>(r0, rows, xs, folded, kp, scratch, tile),
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        if simd.has_avx2() {
            // SAFETY: `Simd::detect` found AVX2 and FMA on this CPU. An AVX-512 `folded` (laid out
            // for that kernel) only comes with one affine token, which took the branch above.
            return unsafe { self.rows_times_avx2(r0, rows, xs, folded, kp, scratch, tile) };
        }
        self.rows_times_with::<Portable>(r0, rows, xs, folded, kp, scratch, tile)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_times_avx512<const WORDS: bool>(&self, r0: usize, rows: usize, xs: &[f32], folded: &FoldedInput, kp: usize, scratch: &mut [f32], tile: &mut [f32]) {
        self.rows_times_with::<x86::Avx512<WORDS>>(r0, rows, xs, folded, kp, scratch, tile)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_times_avx2(&self, r0: usize, rows: usize, xs: &[f32], folded: &FoldedInput, kp: usize, scratch: &mut [f32], tile: &mut [f32]) {
        self.rows_times_with::<x86::Avx2>(r0, rows, xs, folded, kp, scratch, tile)
    }

    /// The body of [`Matrix::rows_times`] for one kernel: decode a block of rows, run every
    /// token block past it.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn rows_times_with<K: Kernel>(&self, r0: usize, rows: usize, xs: &[f32], folded: &FoldedInput, kp: usize, scratch: &mut [f32], tile: &mut [f32]) {
        let c = self.cols;
        let n = xs.len() / kp;
        if n == 1 && matches!(self.codes, Codes::Affine { .. }) && K::fused_rows(self, r0, xs, folded, scratch, &mut tile[..rows]) {
            return;
        }
        for b0 in (0..rows).step_by(ROW_BLOCK) {
            let here = ROW_BLOCK.min(rows - b0);
            for i in 0..here {
                K::decode_row(self, r0 + b0 + i, &mut scratch[i * kp..i * kp + c]);
            }
            // Rows past the end keep whatever the scratch held: their sums are computed and dropped.
            let mut t = 0;
            while t < n {
                let tb = TOKEN_BLOCK.min(n - t);
                let mut sums = [[0f32; TOKEN_BLOCK]; ROW_BLOCK];
                match tb {
                    3 => K::block::<3>(scratch, &xs[t * kp..], kp, &mut sums),
                    2 => K::block::<2>(scratch, &xs[t * kp..], kp, &mut sums),
                    _ => K::block::<1>(scratch, &xs[t * kp..], kp, &mut sums),
                }
                for (i, row) in sums.iter().enumerate().take(here) {
                    for (j, &v) in row.iter().enumerate().take(tb) {
                        tile[(t + j) * rows + b0 + i] = v;
                    }
                }
                t += tb;
            }
        }
    }

    /// `Y = X W^T` over all rows.
    pub fn matmul(&self, xs: &[f32], out: &mut [f32]) {
        self.matmul_rows(0, self.rows, xs, out);
    }
}

/// Per-lane shifts of codes 0-3 and 4-7 within their 32-bit windows, by bit width.
const LANE_SHIFTS: [[u32; 8]; 9] = {
    let mut t = [[0u32; 8]; 9];
    let mut b = 1;
    while b <= 8 {
        let mut k = 0;
        while k < 8 {
            t[b][k] = ((k % 4) * b) as u32;
            k += 1;
        }
        b += 1;
    }
    t
};

/// One affine row's scales and biases.
#[derive(Clone, Copy)]
struct Groups<'a> {
    scales: &'a [u8],
    biases: &'a [u8],
    floats: FloatDtype,
    /// Elements per group.
    size: usize,
}

/// Decodes one affine row of `B`-bit codes: every 8 codes occupy `B` bytes of the bit stream.
#[inline(always)]
fn decode_affine<const B: usize>(packed: &[u8], groups: Groups<'_>, out: &mut [f32]) {
    let mask = (1u32 << B) - 1;
    let group_bytes = groups.size * B / 8;
    for (g, (src, dst)) in packed.chunks_exact(group_bytes).zip(out.chunks_exact_mut(groups.size)).enumerate() {
        let scale = float_at(groups.floats, groups.scales, g);
        let bias = float_at(groups.floats, groups.biases, g);
        for (eight, o) in src.chunks_exact(B).zip(dst.chunks_exact_mut(8)) {
            let mut word = [0u8; 8];
            word[..B].copy_from_slice(eight);
            let w = u64::from_le_bytes(word);
            // Codes 0-3 sit in the low 4B bits and codes 4-7 in the next 4B (4B <= 32), so eight
            // 32-bit lanes with per-lane shifts extract them: one vector shift with AVX2.
            let (lo, hi) = (w as u32, (w >> (4 * B)) as u32);
            let words = [lo, lo, lo, lo, hi, hi, hi, hi];
            for ((v, &word), &shift) in o.iter_mut().zip(&words).zip(&LANE_SHIFTS[B]) {
                *v = scale * ((word >> shift) & mask) as i32 as f32 + bias;
            }
        }
    }
}

/// Dot product with several accumulators so it vectorises; f32 throughout.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Rows decoded and multiplied together (the kernel's register block height).
const ROW_BLOCK: usize = 4;
/// Tokens multiplied together (the kernel's register block width): 4 x 3 accumulators plus the
/// 4 + 3 operands fit AVX2's 16 registers.
const TOKEN_BLOCK: usize = 3;
/// Lanes of one accumulator: column `k` is summed into lane `k % LANES`.
const LANES: usize = 8;
/// Rows of one token's fused affine product taken in one pass over their codes.
const FUSED_ROWS: usize = 8;
/// Lanes of one token's fused affine sums ([`folded_affine_dot`]).
const FUSED_LANES: usize = 16;

/// The vector unit a product runs on, detected once per product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Simd {
    /// x86-64 with AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// x86-64 with AVX-512 (F and BW) besides AVX2 and FMA: one token's affine products take
    /// sixteen columns a step; everything else runs as on [`Simd::Avx2Fma`].
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// [`Simd::Avx512`] on a CPU that also has AVX-512 VBMI (Ice Lake and later, Zen 4), where a
    /// word permutation is one micro-op: codes wider than 4 bits are permuted as 16-bit words
    /// straight from memory instead of broadcast and byte-shuffled (Skylake-X and Cascade Lake,
    /// without VBMI, take two micro-ops for it). The same lanes, the same bits.
    #[cfg(target_arch = "x86_64")]
    Avx512Vbmi,
    /// Anything else: plain Rust with `f32::mul_add`, which the compiler vectorises (NEON's
    /// fused multiply-add on Apple silicon).
    Portable,
}

impl Simd {
    /// The widest unit this CPU has.
    pub(crate) fn detect() -> Simd {
        Simd::available()[0]
    }

    /// Every unit this CPU has, widest first (the last is always [`Simd::Portable`]).
    pub(crate) fn available() -> Vec<Simd> {
        let mut units = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
                if std::arch::is_x86_feature_detected!("avx512vbmi") {
                    units.push(Simd::Avx512Vbmi);
                }
                units.push(Simd::Avx512);
            }
            units.push(Simd::Avx2Fma);
        }
        units.push(Simd::Portable);
        units
    }

    /// Whether AVX2 and FMA are there (the 256-bit kernels run).
    pub(crate) fn has_avx2(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if matches!(self, Simd::Avx2Fma | Simd::Avx512 | Simd::Avx512Vbmi) {
            return true;
        }
        false
    }
}

/// A register-blocked product of [`ROW_BLOCK`] decoded rows with `T` tokens.
trait Kernel {
    /// Decodes logical row `r` of `m` into `out`, with the same values as [`Matrix::decode_row`].
    #[inline(always)]
    fn decode_row(m: &Matrix<'_>, r: usize, out: &mut [f32]) {
        m.decode_row(r, out)
    }

    /// `sums[i][j] = w_i · x_j` for rows `w_i = w[i*kp..(i+1)*kp]` and tokens
    /// `x_j = xs[j*kp..(j+1)*kp]`: per product, lane `l` accumulates `fma(w[k], x[k], acc)` over
    /// `k = l, l + 8, ...` in order, then the lanes reduce as [`reduce_lanes`] does.
    fn block<const T: usize>(w: &[f32], xs: &[f32], kp: usize, sums: &mut [[f32; TOKEN_BLOCK]; ROW_BLOCK]);

    /// For one token `x` (with its [`FoldedInput`]): `tile[i] = row_(r0+i) · x` for the rows of
    /// an affine `m`, in one pass over their codes as [`folded_affine_dot`] defines it; `false`
    /// (and `tile` not all written) where these codes have no such path. `scratch` holds at least
    /// `cols / 2` floats.
    fn fused_rows(m: &Matrix<'_>, r0: usize, x: &[f32], folded: &FoldedInput, scratch: &mut [f32], tile: &mut [f32]) -> bool;
}

/// What one token's product with affine codes uses besides the token, computed once per product.
#[derive(Default)]
struct FoldedInput {
    /// [`group_totals`] of the token.
    totals: Vec<f32>,
    /// The token as the vector kernel reads it, each column times `2^-shift` where the kernel
    /// leaves its code where it lies in its bytes (`q · 2^shift`, exact as a float), which gives
    /// the same product as `q · x` unless `x · 2^-shift` falls below f32's normal range
    /// (|x| < 2^-96 at most): for AVX2 in column order ([`code_shift`]), for AVX-512 each sixteen
    /// columns in lane order `0, 8, 1, 9, ...` ([`pair_shift`]); empty for the portable kernel.
    scaled: Vec<f32>,
}

impl FoldedInput {
    /// The inputs of the kernel on `simd` for token `x` times `bits`-bit codes in groups of
    /// `group_size`.
    fn new(simd: Simd, x: &[f32], bits: u32, group_size: usize) -> FoldedInput {
        let bits = bits as usize;
        let pow2 = |shift: u32| f32::from_bits((127 - shift) << 23);
        let scaled = match simd {
            Simd::Portable => Vec::new(),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma => in_lane_order(x, std::array::from_fn::<_, LANES, _>(|k| (k, pow2(code_shift(bits, k))))),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 | Simd::Avx512Vbmi => in_lane_order(x, std::array::from_fn::<_, FUSED_LANES, _>(|lane| (pair_column(lane), pow2(pair_shift(bits, lane))))),
        };
        FoldedInput { totals: group_totals(x, group_size), scaled }
    }
}

/// `x` step by step of `W` columns, lane `k` of a step taking column `lanes[k].0` of it times
/// `lanes[k].1` (whole steps only).
#[cfg(target_arch = "x86_64")]
fn in_lane_order<const W: usize>(x: &[f32], lanes: [(usize, f32); W]) -> Vec<f32> {
    let mut out = vec![0f32; x.len() / W * W];
    for (o, step) in out.chunks_exact_mut(W).zip(x.chunks_exact(W)) {
        for (v, &(column, factor)) in o.iter_mut().zip(&lanes) {
            *v = step[column] * factor;
        }
    }
    out
}

/// The column (of sixteen) that a 512-bit kernel's lane `lane` takes: `0, 8, 1, 9, ...`, the lane
/// order of [`folded_affine_dot`]'s `(c, l)` pairs.
#[inline(always)]
const fn pair_column(lane: usize) -> usize {
    8 * (lane % 2) + lane / 2
}

/// Where the code of lane `lane` ([`pair_column`]) lies in the 32-bit word that lane reads
/// sixteen `bits`-bit codes from: up to 4 bits, the even lanes read the word that ends where the
/// first eight codes do and the odd lanes the word that starts where the next eight do (one
/// 64-bit load for both); wider codes come from the start of the 16-bit word that holds their
/// first bit.
#[inline(always)]
const fn pair_shift(bits: usize, lane: usize) -> u32 {
    let (column, eight) = (pair_column(lane), lane / 2);
    if bits > 4 {
        (column * bits % 16) as u32
    } else if lane.is_multiple_of(2) {
        (eight * bits + 32 - 8 * bits) as u32
    } else {
        (eight * bits) as u32
    }
}

/// Where code `k` of eight `bits`-bit codes lies within the window a vector kernel reads it
/// from: for 2 and 3 bits all eight lie in one 32-bit word (code `k` from bit `k · bits`), wider
/// codes from the start of the byte that holds their first bit.
#[inline(always)]
const fn code_shift(bits: usize, k: usize) -> u32 {
    if bits <= 3 {
        (k * bits) as u32
    } else {
        (k * bits % 8) as u32
    }
}

/// Logical row `r` of an affine matrix: its packed codes (from the row's first byte to the end of
/// the tensor, so that vector loads may read past the row), its groups and the bit width; `None`
/// for other codes.
#[inline(always)]
fn affine_parts<'m>(m: &Matrix<'m>, r: usize) -> Option<(&'m [u8], Groups<'m>, u32)> {
    affine_row_at(m, r).map(|(weight, at, groups, bits)| (&weight[at..], groups, bits))
}

/// Logical row `r` of an affine matrix as the whole tensor's packed codes and the row's first byte
/// in them (so that vector loads may also read before the row), its groups and the bit width;
/// `None` for other codes.
#[inline(always)]
fn affine_row_at<'m>(m: &Matrix<'m>, r: usize) -> Option<(&'m [u8], usize, Groups<'m>, u32)> {
    let Codes::Affine { weight, scales, biases, floats, bits, group_size } = m.codes else {
        return None;
    };
    let (s, c) = (m.map.stored(r), m.cols);
    let row_bytes = c * bits as usize / 8;
    let group_bytes = c / group_size * floats.size();
    let groups = Groups {
        scales: &scales[s * group_bytes..(s + 1) * group_bytes],
        biases: &biases[s * group_bytes..(s + 1) * group_bytes],
        floats,
        size: group_size,
    };
    Some((weight, s * row_bytes, groups, bits))
}

/// The sum of each group of `size` inputs, added in column order, then zeros up to a whole
/// number of [`FUSED_LANES`]: the `Σx` of [`folded_affine_dot`], once per token.
fn group_totals(x: &[f32], size: usize) -> Vec<f32> {
    let mut totals: Vec<f32> = x.chunks_exact(size).map(|group| group.iter().fold(0.0, |a, &v| a + v)).collect();
    totals.resize(totals.len().next_multiple_of(FUSED_LANES), 0.0);
    totals
}

/// One affine row times one token with the scale and bias folded out of each group, as mlx's
/// Metal `qmv` computes it: `Σ_g scale_g · (Σ_{k in g} q_k x_k) + Σ_g bias_g · (Σ_{k in g} x_k)`.
/// The order, which every kernel follows bit for bit, in [`FUSED_LANES`] lanes: lane `(c, l)`
/// (`c` in 0..2, `l` in 0..8) accumulates `fma(q_k, x_k, ·)` over the group's columns
/// `k = 16j + 8c + l` in order, from zero per group, then takes that times the group's scale into
/// the row's lane `(c, l)` with one fma; the bias term is a dot product over groups, lane
/// `g % 16` taking `fma(bias_g, totals[g], ·)` ([`group_totals`]). The scaled lanes reduce as
/// `reduce_lanes` of the eight `(0, l) + (1, l)`, the bias lanes as `reduce_lanes` of the eight
/// `b_l + b_(l+8)`, and the two are added. Sixteen lanes let a 512-bit unit take sixteen columns
/// a step and an AVX2 one eight (two chains per row, which hide the FMA latency).
/// This is the portable kernel's path and the reference for the others.
#[inline(always)]
fn folded_affine_dot<const B: usize>(packed: &[u8], groups: Groups<'_>, x: &[f32], totals: &[f32]) -> f32 {
    let mask = (1u32 << B) - 1;
    let group_bytes = groups.size * B / 8;
    let mut total = [[0f32; LANES]; 2];
    let mut biased = [0f32; FUSED_LANES];
    let parts = packed.chunks_exact(group_bytes).zip(x.chunks_exact(groups.size)).zip(totals);
    for (g, ((src, xg), &xsum)) in parts.enumerate() {
        let mut chains = [[0f32; LANES]; 2];
        for (e, (eight, xe)) in src.chunks_exact(B).zip(xg.chunks_exact(LANES)).enumerate() {
            let mut word = [0u8; 8];
            word[..B].copy_from_slice(eight);
            let w = u64::from_le_bytes(word);
            for (k, (l, &xv)) in chains[e % 2].iter_mut().zip(xe).enumerate() {
                let q = ((w >> (k * B)) as u32 & mask) as f32;
                *l = q.mul_add(xv, *l);
            }
        }
        let scale = float_at(groups.floats, groups.scales, g);
        for (t, chain) in total.iter_mut().zip(&chains) {
            for (t, &l) in t.iter_mut().zip(chain) {
                *t = scale.mul_add(l, *t);
            }
        }
        let bias = float_at(groups.floats, groups.biases, g);
        biased[g % FUSED_LANES] = bias.mul_add(xsum, biased[g % FUSED_LANES]);
    }
    let pairs: [f32; LANES] = std::array::from_fn(|l| total[0][l] + total[1][l]);
    let halves: [f32; LANES] = std::array::from_fn(|l| biased[l] + biased[l + LANES]);
    reduce_lanes(&pairs) + reduce_lanes(&halves)
}

/// The fixed reduction of eight lanes: `((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))`.
#[inline(always)]
fn reduce_lanes(l: &[f32; LANES]) -> f32 {
    let h = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// The kernel in plain Rust.
struct Portable;

impl Kernel for Portable {
    #[inline(always)]
    fn fused_rows(m: &Matrix<'_>, r0: usize, x: &[f32], folded: &FoldedInput, _scratch: &mut [f32], tile: &mut [f32]) -> bool {
        let totals = &folded.totals;
        for (i, dot) in tile.iter_mut().enumerate() {
            let Some((packed, groups, bits)) = affine_parts(m, r0 + i) else {
                return false;
            };
            let row = &packed[..m.cols * bits as usize / 8];
            *dot = match bits {
                2 => folded_affine_dot::<2>(row, groups, x, totals),
                3 => folded_affine_dot::<3>(row, groups, x, totals),
                4 => folded_affine_dot::<4>(row, groups, x, totals),
                5 => folded_affine_dot::<5>(row, groups, x, totals),
                6 => folded_affine_dot::<6>(row, groups, x, totals),
                8 => folded_affine_dot::<8>(row, groups, x, totals),
                _ => return false,
            };
        }
        true
    }

    #[inline(always)]
    fn block<const T: usize>(w: &[f32], xs: &[f32], kp: usize, sums: &mut [[f32; TOKEN_BLOCK]; ROW_BLOCK]) {
        let mut acc = [[[0f32; LANES]; T]; ROW_BLOCK];
        for k in (0..kp).step_by(LANES) {
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let wv = &w[i * kp + k..i * kp + k + LANES];
                for (j, a) in acc_i.iter_mut().enumerate() {
                    let xv = &xs[j * kp + k..j * kp + k + LANES];
                    for l in 0..LANES {
                        a[l] = wv[l].mul_add(xv[l], a[l]);
                    }
                }
            }
        }
        for (s, a) in sums.iter_mut().zip(&acc) {
            for j in 0..T {
                s[j] = reduce_lanes(&a[j]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{affine_parts, code_shift, Codes, float_at, floats_to_f32, pair_column, pair_shift, FloatDtype, FoldedInput, Groups, Kernel, Matrix, FUSED_LANES, FUSED_ROWS, LANES, ROW_BLOCK, TOKEN_BLOCK};
    use std::arch::x86_64::*;

    /// The kernel on AVX2 with FMA; only reached after `Simd::detect` found both.
    pub(super) struct Avx2;

    impl Kernel for Avx2 {
        #[inline(always)]
        fn fused_rows(m: &Matrix<'_>, r0: usize, _x: &[f32], folded: &FoldedInput, _scratch: &mut [f32], tile: &mut [f32]) -> bool {
            // A plain loop: a closure would not inherit the caller's target features, and the
            // intrinsics would become calls.
            for b0 in (0..tile.len()).step_by(ROW_BLOCK) {
                let here = ROW_BLOCK.min(tile.len() - b0);
                let Some(dots) = affine_dot(m, r0 + b0, here, folded) else {
                    return false;
                };
                tile[b0..b0 + here].copy_from_slice(&dots[..here]);
            }
            true
        }

        #[inline(always)]
        fn decode_row(m: &Matrix<'_>, r: usize, out: &mut [f32]) {
            let Some((rest, groups, bits)) = affine_parts(m, r) else {
                return m.decode_row(r, out);
            };
            let packed = &rest[..m.cols * bits as usize / 8];
            // SAFETY: only compiled into functions with AVX2 enabled, called after detection.
            unsafe {
                match bits {
                    2 => affine_row::<2>(packed, groups, out),
                    3 => affine_row::<3>(packed, groups, out),
                    4 => affine_row::<4>(packed, groups, out),
                    5 => affine_row::<5>(packed, groups, out),
                    6 => affine_row::<6>(packed, groups, out),
                    8 => affine_row::<8>(packed, groups, out),
                    _ => m.decode_row(r, out),
                }
            }
        }

        #[inline(always)]
        fn block<const T: usize>(w: &[f32], xs: &[f32], kp: usize, sums: &mut [[f32; TOKEN_BLOCK]; ROW_BLOCK]) {
            assert!(w.len() >= ROW_BLOCK * kp && xs.len() >= T * kp && kp.is_multiple_of(LANES));
            // SAFETY: every load below is within `w[..ROW_BLOCK * kp]` or `xs[..T * kp]` (checked
            // above), and this is only compiled into functions with AVX2 and FMA enabled, which
            // are only called after runtime detection.
            unsafe {
                let (wp, xp) = (w.as_ptr(), xs.as_ptr());
                let mut acc = [[_mm256_setzero_ps(); T]; ROW_BLOCK];
                let mut k = 0;
                while k < kp {
                    let mut xv = [_mm256_setzero_ps(); T];
                    for (j, v) in xv.iter_mut().enumerate() {
                        *v = _mm256_loadu_ps(xp.add(j * kp + k));
                    }
                    for (i, acc_i) in acc.iter_mut().enumerate() {
                        let wv = _mm256_loadu_ps(wp.add(i * kp + k));
                        for (a, &x) in acc_i.iter_mut().zip(&xv) {
                            *a = _mm256_fmadd_ps(wv, x, *a);
                        }
                    }
                    k += LANES;
                }
                for (s, a) in sums.iter_mut().zip(&acc) {
                    for j in 0..T {
                        s[j] = reduce(a[j]);
                    }
                }
            }
        }
    }

    /// Eight `B`-bit codes starting at byte `at` of a packed row, one per 32-bit lane: the `B`
    /// bytes read as one little-endian word, codes 0-3 from its low 32 bits and 4-7 from the
    /// 32 above bit `4B`, each lane shifted and masked.
    #[inline(always)]
    unsafe fn codes8<const B: usize>(packed: &[u8], at: usize) -> __m256i {
        let b = B as i32;
        let shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 0, b, 2 * b, 3 * b);
        let spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        // Eight bytes from `at` where the row has them, else its last B bytes copied.
        let w = if at + 8 <= packed.len() {
            std::ptr::read_unaligned(packed.as_ptr().add(at) as *const u64)
        } else {
            let mut word = [0u8; 8];
            word[..B].copy_from_slice(&packed[at..at + B]);
            u64::from_le_bytes(word)
        };
        let pair = (w & 0xffff_ffff) | ((w >> (4 * B)) << 32);
        let v = _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(_mm_cvtsi64_si128(pair as i64)), spread);
        _mm256_and_si256(_mm256_srlv_epi32(v, shifts), _mm256_set1_epi32((1 << B) - 1))
    }

    /// The byte shuffle and lane masks that isolate code `k` of eight `B`-bit codes in lane `k`,
    /// left where it lies ([`code_shift`]), so that the lane holds `q · 2^shift`. Codes of 2 and
    /// 3 bits come from one 32-bit word broadcast to every lane (no shuffle); wider ones from a
    /// 16-byte window repeated in both 128-bit halves, lane `k` taking bytes `kB/8` and
    /// `kB/8 + 1` of it.
    #[inline(always)]
    unsafe fn code_lanes<const B: usize>() -> (__m256i, __m256i) {
        let mut pick = [-1i8; 32];
        let mut masks = [0i32; 8];
        for (k, mask) in masks.iter_mut().enumerate() {
            let (byte, at) = (k * B / 8, (k % 4) * 4 + (k / 4) * 16);
            pick[at] = byte as i8;
            pick[at + 1] = byte as i8 + 1;
            *mask = ((1 << B) - 1) << code_shift(B, k);
        }
        (_mm256_loadu_si256(pick.as_ptr() as *const __m256i), _mm256_loadu_si256(masks.as_ptr() as *const __m256i))
    }

    /// Float `g` of a row's scales or biases, broadcast: a BF16 one is widened in the register
    /// (a 16-bit broadcast shifted into the high half of each lane).
    #[inline(always)]
    unsafe fn group_float(floats: FloatDtype, bytes: &[u8], g: usize) -> __m256 {
        match floats {
            FloatDtype::BF16 => {
                debug_assert!(2 * g + 2 <= bytes.len());
                let w = _mm256_set1_epi16(std::ptr::read_unaligned(bytes.as_ptr().add(2 * g) as *const i16));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
            }
            floats => _mm256_set1_ps(float_at(floats, bytes, g)),
        }
    }

    /// The eight `B`-bit codes whose window starts at `p` (see [`code_lanes`]) as floats
    /// `q · 2^shift`; reads 4 bytes from `p` for 2 and 3 bits, 16 otherwise.
    #[inline(always)]
    unsafe fn eight_codes<const B: usize>(p: *const u8, pick: __m256i, masks: __m256i) -> __m256 {
        let window = if B <= 3 {
            _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
        } else {
            _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i)), pick)
        };
        _mm256_cvtepi32_ps(_mm256_and_si256(window, masks))
    }

    /// [`eight_codes`] at byte `at` of `packed`, reading zeros past its end.
    #[inline(always)]
    unsafe fn eight_codes_checked<const B: usize>(packed: &[u8], at: usize, pick: __m256i, masks: __m256i) -> __m256 {
        let mut bytes = [0u8; 16];
        let n = packed.len().saturating_sub(at).min(16);
        bytes[..n].copy_from_slice(&packed[at..at + n]);
        eight_codes::<B>(bytes.as_ptr(), pick, masks)
    }

    /// Rows `r0..r0 + here` (at most [`ROW_BLOCK`]) of an affine `m` times one token in one
    /// pass, as `folded_affine_dot` computes each (rows past `here` repeat the last and are
    /// dropped): per eight columns a mask (after a byte shuffle above 3 bits) isolates each row's
    /// codes (`q · 2^shift`), which are converted and fused-multiply-added with the token scaled
    /// by `2^-shift` into the row's chain for lanes `(0, ·)` or `(1, ·)`; per group each chain
    /// times the group's scale goes into the row's total; then the bias dot products.
    #[inline(always)]
    pub(super) fn affine_dot(m: &Matrix<'_>, r0: usize, here: usize, folded: &FoldedInput) -> Option<[f32; ROW_BLOCK]> {
        let parts: [Option<(&[u8], Groups<'_>, u32)>; ROW_BLOCK] = std::array::from_fn(|i| affine_parts(m, r0 + i.min(here - 1)));
        let [Some(a), Some(b), Some(c), Some(d)] = parts else {
            return None;
        };
        let rows = [(a.0, a.1), (b.0, b.1), (c.0, c.1), (d.0, d.1)];
        let (x, totals) = (&folded.scaled[..m.cols], &folded.totals[..]);
        // SAFETY: only compiled into functions with AVX2 and FMA enabled, called after detection.
        unsafe {
            Some(match a.2 {
                2 => affine_dot_rows::<2>(&rows, x, totals),
                3 => affine_dot_rows::<3>(&rows, x, totals),
                4 => affine_dot_rows::<4>(&rows, x, totals),
                5 => affine_dot_rows::<5>(&rows, x, totals),
                6 => affine_dot_rows::<6>(&rows, x, totals),
                8 => affine_dot_rows::<8>(&rows, x, totals),
                _ => return None,
            })
        }
    }

    /// [`affine_dot`] at `B` bits.
    #[inline(always)]
    unsafe fn affine_dot_rows<const B: usize>(rows: &[(&[u8], Groups<'_>); ROW_BLOCK], x: &[f32], totals: &[f32]) -> [f32; ROW_BLOCK] {
        let size = rows[0].1.size;
        let group_bytes = size * B / 8;
        let cols = x.len();
        let groups = cols / size;
        assert!(size.is_multiple_of(16) && cols.is_multiple_of(size) && totals.len() >= groups.next_multiple_of(FUSED_LANES));
        assert!(rows.iter().all(|(packed, _)| packed.len() >= cols * B / 8));
        assert!(rows.iter().all(|(_, gr)| gr.scales.len() >= groups * gr.floats.size() && gr.biases.len() >= groups * gr.floats.size()));
        let (pick, masks) = code_lanes::<B>();
        let [(p0, ref g0), (p1, ref g1), (p2, ref g2), (p3, ref g3)] = *rows;
        // Groups whose every 16-byte window lies inside every row's slice are read without checks.
        let readable = p0.len().min(p1.len()).min(p2.len()).min(p3.len());
        let fast = (0..groups).take_while(|g| (g + 1) * group_bytes - B + 16 <= readable).count();
        // Each row's codes are prefetched one fused block of rows ahead: where the rows lie one
        // after another (most matrices), that is the same place in the next block's row.
        let ahead = FUSED_ROWS * cols * B / 8;
        // Each row's totals over lanes (0, ·) and (1, ·).
        let mut t = [_mm256_setzero_ps(); 2 * ROW_BLOCK];
        let (mut q0, mut q1, mut q2, mut q3) = (p0.as_ptr(), p1.as_ptr(), p2.as_ptr(), p3.as_ptr());
        let mut xp = x.as_ptr();
        for g in 0..fast {
            for q in [q0, q1, q2, q3] {
                _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(ahead) as *const i8);
            }
            let (mut l0, mut l1, mut l2, mut l3) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            let (mut m0, mut m1, mut m2, mut m3) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            for _ in 0..size / 16 {
                let xv = _mm256_loadu_ps(xp);
                l0 = _mm256_fmadd_ps(eight_codes::<B>(q0, pick, masks), xv, l0);
                l1 = _mm256_fmadd_ps(eight_codes::<B>(q1, pick, masks), xv, l1);
                l2 = _mm256_fmadd_ps(eight_codes::<B>(q2, pick, masks), xv, l2);
                l3 = _mm256_fmadd_ps(eight_codes::<B>(q3, pick, masks), xv, l3);
                let xv = _mm256_loadu_ps(xp.add(8));
                m0 = _mm256_fmadd_ps(eight_codes::<B>(q0.add(B), pick, masks), xv, m0);
                m1 = _mm256_fmadd_ps(eight_codes::<B>(q1.add(B), pick, masks), xv, m1);
                m2 = _mm256_fmadd_ps(eight_codes::<B>(q2.add(B), pick, masks), xv, m2);
                m3 = _mm256_fmadd_ps(eight_codes::<B>(q3.add(B), pick, masks), xv, m3);
                (q0, q1, q2, q3, xp) = (q0.add(2 * B), q1.add(2 * B), q2.add(2 * B), q3.add(2 * B), xp.add(16));
            }
            fold_group(&mut t[0..2], [l0, m0], g0, g);
            fold_group(&mut t[2..4], [l1, m1], g1, g);
            fold_group(&mut t[4..6], [l2, m2], g2, g);
            fold_group(&mut t[6..8], [l3, m3], g3, g);
        }
        for g in fast..groups {
            let mut l = [[_mm256_setzero_ps(); ROW_BLOCK]; 2];
            for e in 0..size / 8 {
                let xv = _mm256_loadu_ps(x.as_ptr().add(g * size + e * 8));
                let at = g * group_bytes + e * B;
                for (li, (packed, _)) in l[e % 2].iter_mut().zip(rows) {
                    *li = _mm256_fmadd_ps(eight_codes_checked::<B>(packed, at, pick, masks), xv, *li);
                }
            }
            for (i, (_, gr)) in rows.iter().enumerate() {
                fold_group(&mut t[2 * i..2 * i + 2], [l[0][i], l[1][i]], gr, g);
            }
        }
        std::array::from_fn(|i| {
            let (lo, hi) = bias_dot(&rows[i].1, groups, totals);
            reduce(_mm256_add_ps(t[2 * i], t[2 * i + 1])) + reduce(_mm256_add_ps(lo, hi))
        })
    }

    /// Adds group `g`'s chains (lanes `(0, ·)` and `(1, ·)`) times its scale to a row's totals.
    #[inline(always)]
    unsafe fn fold_group(t: &mut [__m256], chains: [__m256; 2], groups: &Groups<'_>, g: usize) {
        let scale = group_float(groups.floats, groups.scales, g);
        for (t, chain) in t.iter_mut().zip(chains) {
            *t = _mm256_fmadd_ps(scale, chain, *t);
        }
    }

    /// A row's bias dot product over its `count` groups as `folded_affine_dot` orders it: lanes
    /// `g % 16` below 8 and from 8, eight groups a load.
    #[inline(always)]
    unsafe fn bias_dot(groups: &Groups<'_>, count: usize, totals: &[f32]) -> (__m256, __m256) {
        let mut b = [_mm256_setzero_ps(); 2];
        for g in (0..count).step_by(LANES) {
            let half = &mut b[g / LANES % 2];
            *half = _mm256_fmadd_ps(eight_floats(groups.floats, groups.biases, g, count), _mm256_loadu_ps(totals.as_ptr().add(g)), *half);
        }
        (b[0], b[1])
    }

    /// Floats `from..from + 8` of a row's `count` scales or biases, zeros past `count`: eight
    /// BF16 ones are widened in the register.
    #[inline(always)]
    unsafe fn eight_floats(floats: FloatDtype, bytes: &[u8], from: usize, count: usize) -> __m256 {
        if floats == FloatDtype::BF16 && from + LANES <= count {
            let words = _mm_loadu_si128(bytes[2 * from..2 * from + 16].as_ptr() as *const __m128i);
            return _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(words)));
        }
        let v: [f32; LANES] = std::array::from_fn(|l| if from + l < count { float_at(floats, bytes, from + l) } else { 0.0 });
        _mm256_loadu_ps(v.as_ptr())
    }

    /// The kernel on AVX-512 (F and BW) for one token's affine products, sixteen columns per
    /// register; everything else as [`Avx2`]. Only reached after `Simd::detect` found AVX-512.
    /// (`WORDS`: codes wider than 4 bits permuted as words from memory, see [`pair_lanes`].)
    pub(super) struct Avx512<const WORDS: bool>;

    impl<const WORDS: bool> Kernel for Avx512<WORDS> {
        #[inline(always)]
        fn fused_rows(m: &Matrix<'_>, r0: usize, _x: &[f32], folded: &FoldedInput, scratch: &mut [f32], tile: &mut [f32]) -> bool {
            let Codes::Affine { bits, .. } = m.codes else {
                return false;
            };
            // SAFETY: only compiled into functions with AVX-512 F and BW enabled, called after
            // detection.
            unsafe {
                match bits {
                    2 => wide_rows::<2, WORDS>(m, r0, folded, scratch, tile),
                    3 => wide_rows::<3, WORDS>(m, r0, folded, scratch, tile),
                    4 => wide_rows::<4, WORDS>(m, r0, folded, scratch, tile),
                    5 => wide_rows::<5, WORDS>(m, r0, folded, scratch, tile),
                    6 => wide_rows::<6, WORDS>(m, r0, folded, scratch, tile),
                    8 => wide_rows::<8, WORDS>(m, r0, folded, scratch, tile),
                    _ => return false,
                }
            }
            true
        }

        #[inline(always)]
        fn decode_row(m: &Matrix<'_>, r: usize, out: &mut [f32]) {
            <Avx2 as Kernel>::decode_row(m, r, out)
        }

        #[inline(always)]
        fn block<const T: usize>(w: &[f32], xs: &[f32], kp: usize, sums: &mut [[f32; TOKEN_BLOCK]; ROW_BLOCK]) {
            <Avx2 as Kernel>::block::<T>(w, xs, kp, sums)
        }
    }

    /// The permutation (above 4 bits) and lane masks that isolate the code of each of sixteen
    /// lanes ([`pair_column`]) where it lies ([`pair_shift`]). Up to 4 bits, the even lanes take
    /// the low half of the 64-bit word that starts `4 - B` bytes before the sixteen codes and the
    /// odd lanes its high half. Wider codes come from the 16-bit word that holds their first bit
    /// and the next, lane `k` taking them as its low and high halves: with `WORDS`, a word
    /// permutation of the 64 bytes from the codes' first byte; without, a byte shuffle of their
    /// 16-byte window repeated in every 128-bit quarter (zeros past it, where no code's bits lie).
    #[inline(always)]
    unsafe fn pair_lanes<const B: usize, const WORDS: bool>() -> (__m512i, __m512i) {
        let mut words = [0u16; 2 * FUSED_LANES];
        let mut bytes = [-1i8; 4 * FUSED_LANES];
        let mut masks = [0i32; FUSED_LANES];
        for (lane, mask) in masks.iter_mut().enumerate() {
            let word = pair_column(lane) * B / 16;
            (words[2 * lane], words[2 * lane + 1]) = (word as u16, word as u16 + 1);
            for (k, byte) in bytes[4 * lane..4 * lane + 4].iter_mut().enumerate() {
                if 2 * word + k < 16 {
                    *byte = (2 * word + k) as i8;
                }
            }
            *mask = (((1u32 << B) - 1) << pair_shift(B, lane)) as i32;
        }
        let pick = if WORDS { _mm512_loadu_si512(words.as_ptr() as *const _) } else { _mm512_loadu_si512(bytes.as_ptr() as *const _) };
        (pick, _mm512_loadu_si512(masks.as_ptr() as *const _))
    }

    /// Bytes a sixteen-code window reads before the codes' first byte, and in all: above 4 bits
    /// the word permutation (`words`) takes a whole 64-byte operand, the byte shuffle 16 bytes.
    const fn pair_window(bits: usize, words: bool) -> (usize, usize) {
        if bits <= 4 {
            (4 - bits, 8)
        } else if words {
            (0, 64)
        } else {
            (0, 16)
        }
    }

    /// The sixteen `B`-bit codes whose window ([`pair_window`]) starts at `p` as floats
    /// `q · 2^shift`, in lane order ([`pair_lanes`]).
    #[inline(always)]
    unsafe fn sixteen_codes<const B: usize, const WORDS: bool>(p: *const u8, pick: __m512i, masks: __m512i) -> __m512 {
        let window = if B <= 4 {
            _mm512_set1_epi64(std::ptr::read_unaligned(p as *const i64))
        } else if WORDS {
            _mm512_permutexvar_epi16(pick, _mm512_loadu_si512(p as *const _))
        } else {
            _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i)), pick)
        };
        _mm512_cvtepu32_ps(_mm512_and_si512(window, masks))
    }

    /// [`sixteen_codes`] for the codes at byte `at` of `weight`, reading zeros outside it.
    #[inline(always)]
    unsafe fn sixteen_codes_checked<const B: usize, const WORDS: bool>(weight: &[u8], at: usize, pick: __m512i, masks: __m512i) -> __m512 {
        let (back, span) = pair_window(B, WORDS);
        let mut bytes = [0u8; 64];
        for (i, byte) in bytes.iter_mut().enumerate().take(span) {
            if let Some(&b) = (at + i).checked_sub(back).and_then(|k| weight.get(k)) {
                *byte = b;
            }
        }
        sixteen_codes::<B, WORDS>(bytes.as_ptr(), pick, masks)
    }

    /// `tile[i] = row_(r0+i) · x` for the rows of the affine `m` at `B` bits, as
    /// `folded_affine_dot` computes each, [`FUSED_ROWS`] rows at a time (the last block repeats
    /// its last row): one chain of sixteen lanes per row; per sixteen columns a 64-bit load (above
    /// 4 bits a word permutation or a byte shuffle, [`pair_lanes`]) and a mask leave each code
    /// where it lies, converted and fused-multiply-added with the token in lane order scaled by
    /// `2^-shift`; per group the chain times the group's scale goes into the row's total; then the
    /// bias dot products, sixteen groups a load. What depends only on the matrix is worked out
    /// once, not per block.
    #[inline(always)]
    unsafe fn wide_rows<const B: usize, const WORDS: bool>(m: &Matrix<'_>, r0: usize, folded: &FoldedInput, scratch: &mut [f32], tile: &mut [f32]) {
        let Codes::Affine { weight, scales, biases, floats, group_size: size, .. } = m.codes else {
            unreachable!("wide_rows is only called for affine codes");
        };
        let cols = m.cols;
        let (x, totals) = (&folded.scaled[..cols], &folded.totals[..]);
        let (groups, group_bytes, row_bytes) = (cols / size, size * B / 8, cols * B / 8);
        let float_row = groups * floats.size();
        assert!(size.is_multiple_of(FUSED_LANES) && cols.is_multiple_of(size) && totals.len() >= groups.next_multiple_of(FUSED_LANES));
        // Stored rows that the codes, the scales and the biases all hold.
        let stored = (weight.len() / row_bytes).min(scales.len() / float_row).min(biases.len() / float_row);
        let (pick, masks) = pair_lanes::<B, WORDS>();
        let (back, span) = pair_window(B, WORDS);
        // Group `g` of a row at byte `at` is read without checks while `at + (g + 1) * group_bytes
        // + span` stays within `limit`.
        let limit = weight.len() + 2 * B + back;
        // Each row's codes are prefetched one block of rows ahead.
        let ahead = FUSED_ROWS * row_bytes;
        // The rows' scales widened once per block, row by row (`wide[i * groups + g]`), so that
        // each is a broadcast operand of its fused multiply-add.
        let wide = &mut scratch[..groups * FUSED_ROWS];
        for b0 in (0..tile.len()).step_by(FUSED_ROWS) {
            let here = FUSED_ROWS.min(tile.len() - b0);
            let s: [usize; FUSED_ROWS] = std::array::from_fn(|i| m.map.stored(r0 + b0 + i.min(here - 1)));
            assert!(s.iter().all(|&s| s < stored));
            if s.iter().enumerate().all(|(i, &si)| si == s[0] + i) {
                floats_to_f32(floats, &scales[s[0] * float_row..(s[0] + FUSED_ROWS) * float_row], wide);
            } else {
                for (&si, row) in s.iter().zip(wide.chunks_exact_mut(groups)) {
                    floats_to_f32(floats, &scales[si * float_row..(si + 1) * float_row], row);
                }
            }
            let row_at = s.map(|si| si * row_bytes);
            let (first, last) = row_at.iter().fold((usize::MAX, 0), |(lo, hi), &at| (lo.min(at), hi.max(at)));
            // Groups whose every window lies inside `weight` for every row are read without checks.
            let fast_from = usize::from(first < back);
            // (A block whose last group's window is inside the tensor skips the division.)
            let fast_to = if last + groups * group_bytes + span <= limit { groups } else { (limit.saturating_sub(last + span) / group_bytes).min(groups) };
            let fast_to = fast_to.max(fast_from);
            let mut t = [_mm512_setzero_ps(); FUSED_ROWS];
            let fast = Fast { weight, row_at: &row_at, wide, groups, size, x: x.as_ptr(), back, ahead, pick, masks };
            fast.checked_groups::<B, WORDS>(0..fast_from, &mut t);
            // The common group sizes take their sixteen-column steps fully unrolled.
            match size / FUSED_LANES {
                2 => fast.groups::<B, 2, WORDS>(fast_from..fast_to, &mut t),
                4 => fast.groups::<B, 4, WORDS>(fast_from..fast_to, &mut t),
                8 => fast.groups::<B, 8, WORDS>(fast_from..fast_to, &mut t),
                _ => fast.groups::<B, 0, WORDS>(fast_from..fast_to, &mut t),
            }
            fast.checked_groups::<B, WORDS>(fast_to..groups, &mut t);
            let mut b = [_mm512_setzero_ps(); FUSED_ROWS];
            for (bi, &si) in b.iter_mut().zip(&s) {
                *bi = wide_bias_dot(floats, &biases[si * float_row..(si + 1) * float_row], groups, totals);
            }
            let mut dots = [0f32; FUSED_ROWS];
            _mm256_storeu_ps(dots.as_mut_ptr(), row_sums(&t, &b));
            tile[b0..b0 + here].copy_from_slice(&dots[..here]);
        }
    }

    /// The eight rows' products from their scaled lanes `t[i]` (lane `2l + c` holding `(c, l)`)
    /// and bias lanes `b[i]` (lane `g % 16`), reduced as `folded_affine_dot` reduces each row,
    /// the same additions in the same order, but two to sixteen rows per instruction.
    #[inline(always)]
    unsafe fn row_sums(t: &[__m512; FUSED_ROWS], b: &[__m512; FUSED_ROWS]) -> __m256 {
        // Eight lanes `v` per row, two rows a register: `(0, l) + (1, l)`, and the bias's `b_l + b_(l+8)`.
        // (No closures here: they would not inherit the caller's target features.)
        let scaled = [add_picked(t[0], EVENS, ODDS, t[1]), add_picked(t[2], EVENS, ODDS, t[3]), add_picked(t[4], EVENS, ODDS, t[5]), add_picked(t[6], EVENS, ODDS, t[7])];
        const LOWS: [i32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23];
        const HIGHS: [i32; 16] = [8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31];
        let biased = [add_picked(b[0], LOWS, HIGHS, b[1]), add_picked(b[2], LOWS, HIGHS, b[3]), add_picked(b[4], LOWS, HIGHS, b[5]), add_picked(b[6], LOWS, HIGHS, b[7])];
        _mm256_add_ps(reduce_eights(scaled), reduce_eights(biased))
    }

    /// The even and the odd lanes of two registers (the second's numbered from 16).
    const EVENS: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
    const ODDS: [i32; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];

    /// `reduce_lanes` of eight rows' eight lanes (two rows a register), one row a lane:
    /// `h_k = v_k + v_(k+4)` (four rows a register), then `h_k + h_(k+2)` (eight rows), then the
    /// two of those added.
    #[inline(always)]
    unsafe fn reduce_eights(v: [__m512; 4]) -> __m256 {
        let (front, back) = ([0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27], [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31]);
        let (h0, h1) = (add_picked(v[0], front, back, v[1]), add_picked(v[2], front, back, v[3]));
        let q = add_picked(h0, [0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29], [2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31], h1);
        _mm512_castps512_ps256(add_picked(q, EVENS, ODDS, q))
    }

    /// Lane `k`: lane `first[k]` plus lane `second[k]` of `a` and `c` together (`c`'s lanes
    /// numbered from 16).
    #[inline(always)]
    unsafe fn add_picked(a: __m512, first: [i32; 16], second: [i32; 16], c: __m512) -> __m512 {
        let (first, second) = (_mm512_loadu_si512(first.as_ptr() as *const _), _mm512_loadu_si512(second.as_ptr() as *const _));
        _mm512_add_ps(_mm512_permutex2var_ps(a, first, c), _mm512_permutex2var_ps(a, second, c))
    }

    /// `t[i] += scale · l[i]` for each row `i` of a block, its scale of group `g` at
    /// `wide[i * groups + g]`: a group's sums into the rows' totals.
    #[inline(always)]
    unsafe fn fold_scaled(t: &mut [__m512; FUSED_ROWS], wide: &[f32], groups: usize, g: usize, l: [__m512; FUSED_ROWS]) {
        assert!(g < groups && wide.len() >= FUSED_ROWS * groups);
        let w = wide.as_ptr().add(g);
        for i in 0..FUSED_ROWS {
            t[i] = _mm512_fmadd_ps(_mm512_set1_ps(*w.add(i * groups)), l[i], t[i]);
        }
    }

    /// What the groups of [`wide_rows`] read: rows of codes from bytes `row_at[i]` of
    /// `weight`, their scales widened row by row (`wide[i * groups + g]`), groups of `size`
    /// columns of the token `x`, windows starting `back` bytes before their codes, each row
    /// prefetched `ahead` bytes on.
    struct Fast<'r> {
        weight: &'r [u8],
        row_at: &'r [usize; FUSED_ROWS],
        wide: &'r [f32],
        groups: usize,
        size: usize,
        x: *const f32,
        back: usize,
        ahead: usize,
        pick: __m512i,
        masks: __m512i,
    }

    impl Fast<'_> {
        /// Folds each group of `range` into `t` ([`fold_scaled`]), every window read without
        /// checks; `STEPS` is the group's sixteen-column steps (0: `size / 16`, known at run time
        /// only).
        #[inline(never)]
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw")]
        unsafe fn groups<const B: usize, const STEPS: usize, const WORDS: bool>(&self, range: std::ops::Range<usize>, t: &mut [__m512; FUSED_ROWS]) {
            let mut totals = *t;
            for g in range {
                fold_scaled(&mut totals, self.wide, self.groups, g, self.group::<B, STEPS, WORDS>(g));
            }
            *t = totals;
        }

        /// [`Fast::groups`] for groups whose windows may reach past `weight` (read as zeros there).
        #[inline(always)]
        unsafe fn checked_groups<const B: usize, const WORDS: bool>(&self, range: std::ops::Range<usize>, t: &mut [__m512; FUSED_ROWS]) {
            for g in range {
                fold_scaled(t, self.wide, self.groups, g, self.checked_group::<B, WORDS>(g));
            }
        }

        /// [`Fast::group`] for group `g`, reading every window through [`sixteen_codes_checked`].
        #[inline(always)]
        unsafe fn checked_group<const B: usize, const WORDS: bool>(&self, g: usize) -> [__m512; FUSED_ROWS] {
            let group_bytes = self.size * B / 8;
            let xp = self.x.add(g * self.size);
            let mut l = [_mm512_setzero_ps(); FUSED_ROWS];
            for e in 0..self.size / FUSED_LANES {
                let xv = _mm512_loadu_ps(xp.add(e * FUSED_LANES));
                for (li, &at) in l.iter_mut().zip(self.row_at) {
                    *li = _mm512_fmadd_ps(sixteen_codes_checked::<B, WORDS>(self.weight, at + g * group_bytes + e * 2 * B, self.pick, self.masks), xv, *li);
                }
            }
            l
        }

        /// Group `g`'s sums of codes times the token for each row.
        #[inline(always)]
        unsafe fn group<const B: usize, const STEPS: usize, const WORDS: bool>(&self, g: usize) -> [__m512; FUSED_ROWS] {
            let steps = if STEPS == 0 { self.size / FUSED_LANES } else { STEPS };
            let group_bytes = self.size * B / 8;
            let q: [*const u8; FUSED_ROWS] = std::array::from_fn(|i| self.weight.as_ptr().add(self.row_at[i] + g * group_bytes).wrapping_sub(self.back));
            for p in q {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(self.ahead) as *const i8);
            }
            let xp = self.x.add(g * self.size);
            let mut l = [_mm512_setzero_ps(); FUSED_ROWS];
            for e in 0..steps {
                let xv = _mm512_loadu_ps(xp.add(e * FUSED_LANES));
                step::<B, WORDS>(&q, e * 2 * B, xv, self.pick, self.masks, &mut l);
            }
            l
        }
    }

    /// One sixteen-column step of [`Fast::group`]: for each row `i`, `l[i] += codes · xv` with the
    /// codes' window at `q[i] + at`, as [`sixteen_codes`] reads it. Written out, as LLVM otherwise
    /// merges neighbouring windows into wide loads and shuffles, or hoists the loads and spills:
    /// up to 4 bits three instructions a row (a mask with a broadcast memory operand, a
    /// conversion, an FMA); wider codes, instead of the broadcast, a word permutation of a 64-byte
    /// memory operand (`WORDS`) or a 128-bit broadcast load and a byte shuffle.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw")]
    unsafe fn step<const B: usize, const WORDS: bool>(q: &[*const u8; FUSED_ROWS], at: usize, xv: __m512, pick: __m512i, masks: __m512i, l: &mut [__m512; FUSED_ROWS]) {
        // The codes of row pointer `p` into register `t`.
        macro_rules! codes {
            (narrow, $t:literal, $p:literal) => {
                concat!("vpandq {", $t, "}, {m}, qword ptr [{", $p, "} + {at}]{{1to8}}\n")
            };
            (words, $t:literal, $p:literal) => {
                concat!(
                    "vpermw {", $t, "}, {pick}, zmmword ptr [{", $p, "} + {at}]\n",
                    "vpandd {", $t, "}, {", $t, "}, {m}\n",
                )
            };
            (bytes, $t:literal, $p:literal) => {
                concat!(
                    "vbroadcasti32x4 {", $t, "}, xmmword ptr [{", $p, "} + {at}]\n",
                    "vpshufb {", $t, "}, {", $t, "}, {pick}\n",
                    "vpandd {", $t, "}, {", $t, "}, {m}\n",
                )
            };
        }
        // Two rows: their codes, converted, times the token into their sums.
        macro_rules! two_rows {
            ($kind:ident, $pa:literal, $pb:literal, $la:literal, $lb:literal) => {
                concat!(
                    codes!($kind, "t0", $pa),
                    codes!($kind, "t1", $pb),
                    "vcvtudq2ps {t0}, {t0}\n",
                    "vcvtudq2ps {t1}, {t1}\n",
                    "vfmadd231ps {", $la, "}, {t0}, {x}\n",
                    "vfmadd231ps {", $lb, "}, {t1}, {x}",
                )
            };
        }
        macro_rules! eight_rows {
            ($kind:ident $(, $extra:ident = $value:expr)?) => {
                std::arch::asm!(
                    two_rows!($kind, "p0", "p1", "l0", "l1"),
                    two_rows!($kind, "p2", "p3", "l2", "l3"),
                    two_rows!($kind, "p4", "p5", "l4", "l5"),
                    two_rows!($kind, "p6", "p7", "l6", "l7"),
                    p0 = in(reg) q[0],
                    p1 = in(reg) q[1],
                    p2 = in(reg) q[2],
                    p3 = in(reg) q[3],
                    p4 = in(reg) q[4],
                    p5 = in(reg) q[5],
                    p6 = in(reg) q[6],
                    p7 = in(reg) q[7],
                    at = in(reg) at,
                    m = in(zmm_reg) masks,
                    x = in(zmm_reg) xv,
                    $($extra = in(zmm_reg) $value,)?
                    t0 = out(zmm_reg) _,
                    t1 = out(zmm_reg) _,
                    l0 = inout(zmm_reg) l[0],
                    l1 = inout(zmm_reg) l[1],
                    l2 = inout(zmm_reg) l[2],
                    l3 = inout(zmm_reg) l[3],
                    l4 = inout(zmm_reg) l[4],
                    l5 = inout(zmm_reg) l[5],
                    l6 = inout(zmm_reg) l[6],
                    l7 = inout(zmm_reg) l[7],
                    options(pure, readonly, nostack, preserves_flags),
                )
            };
        }
        if B <= 4 {
            eight_rows!(narrow);
        } else if WORDS {
            eight_rows!(words, pick = pick);
        } else {
            eight_rows!(bytes, pick = pick);
        }
    }

    /// A row's bias dot product over its `count` groups in sixteen lanes (`g % 16`), sixteen
    /// groups a load (BF16 ones widened in the register), zeros past `count`.
    #[inline(always)]
    unsafe fn wide_bias_dot(floats: FloatDtype, biases: &[u8], count: usize, totals: &[f32]) -> __m512 {
        let mut b = _mm512_setzero_ps();
        for g in (0..count).step_by(FUSED_LANES) {
            let biases = if floats == FloatDtype::BF16 && g + FUSED_LANES <= count {
                let words = _mm256_loadu_si256(biases[2 * g..2 * g + 32].as_ptr() as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(words)))
            } else {
                let v: [f32; FUSED_LANES] = std::array::from_fn(|l| if g + l < count { float_at(floats, biases, g + l) } else { 0.0 });
                _mm512_loadu_ps(v.as_ptr())
            };
            b = _mm512_fmadd_ps(biases, _mm512_loadu_ps(totals.as_ptr().add(g)), b);
        }
        b
    }

    /// `decode_affine` eight codes per register ([`codes8`]), then `scale * q + bias` (a
    /// multiply, then an add: the same roundings as the scalar decoder).
    #[inline(always)]
    unsafe fn affine_row<const B: usize>(packed: &[u8], groups: Groups<'_>, out: &mut [f32]) {
        let group_bytes = groups.size * B / 8;
        assert!(packed.len() == out.len() * B / 8 && out.len().is_multiple_of(groups.size) && groups.size.is_multiple_of(8));
        let o = out.as_mut_ptr();
        for g in 0..out.len() / groups.size {
            let scale = _mm256_set1_ps(float_at(groups.floats, groups.scales, g));
            let bias = _mm256_set1_ps(float_at(groups.floats, groups.biases, g));
            for e in 0..groups.size / 8 {
                let q = codes8::<B>(packed, g * group_bytes + e * B);
                let f = _mm256_add_ps(_mm256_mul_ps(scale, _mm256_cvtepi32_ps(q)), bias);
                _mm256_storeu_ps(o.add(g * groups.size + e * 8), f);
            }
        }
    }

    /// `reduce_lanes` on a register: the same additions in the same order.
    #[inline(always)]
    unsafe fn reduce(v: __m256) -> f32 {
        // [l0+l4, l1+l5, l2+l6, l3+l7]
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        // [h0+h2, h1+h3, ..]
        let q = _mm_add_ps(h, _mm_movehl_ps(h, h));
        // (h0+h2) + (h1+h3)
        _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `v` stored as `dtype`, written by `half` (an encoder independent of the decoder).
    fn stored(dtype: FloatDtype, v: f32) -> Vec<u8> {
        match dtype {
            FloatDtype::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            FloatDtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
            FloatDtype::F32 => v.to_le_bytes().to_vec(),
        }
    }

    #[test]
    fn affine_rows_decode_as_scale_q_plus_bias() {
        // One row of 64 codes at 3 bits in two groups of 32: codes 0..7 repeated, scales 0.5 and
        // 0.25, biases -1 and 3, with the scales and biases in each float type mlx-lm writes.
        let codes: Vec<u8> = (0..64).map(|i| (i % 8) as u8).collect();
        let mut packed = vec![0u8; 24];
        for (eight, dst) in codes.chunks(8).zip(packed.chunks_mut(3)) {
            let w: u64 = eight.iter().enumerate().map(|(k, &c)| u64::from(c) << (3 * k)).sum();
            dst.copy_from_slice(&w.to_le_bytes()[..3]);
        }
        for floats in FloatDtype::ALL {
            let scales = [stored(floats, 0.5), stored(floats, 0.25)].concat();
            let biases = [stored(floats, -1.0), stored(floats, 3.0)].concat();
            let m = Matrix {
                codes: Codes::Affine { weight: &packed, scales: &scales, biases: &biases, floats, bits: 3, group_size: 32 },
                rows: 1,
                cols: 64,
                map: RowMap::identity(1),
            };
            let mut out = vec![0f32; 64];
            m.decode_row(0, &mut out);
            for (i, v) in out.iter().enumerate() {
                let (scale, bias) = if i < 32 { (0.5, -1.0) } else { (0.25, 3.0) };
                assert_eq!(*v, scale * (i % 8) as f32 + bias, "{floats} element {i}");
            }
            let x = vec![1.0f32; 64];
            let mut y = [0f32];
            m.matmul(&x, &mut y);
            assert_eq!(y[0], out.iter().sum::<f32>());
            assert_eq!(m.row_bytes(), 24 + 4 * floats.size(), "{floats}");
        }
    }

    #[test]
    fn dense_rows_decode_in_every_float_type() {
        let vals: Vec<f32> = (0..2 * 32).map(|i| (i % 7) as f32 * 0.25 - 0.75).collect();
        for dtype in FloatDtype::ALL {
            let data: Vec<u8> = vals.iter().flat_map(|&v| stored(dtype, v)).collect();
            let m = Matrix { codes: Codes::Dense { data: &data, dtype }, rows: 2, cols: 32, map: RowMap::identity(2) };
            let mut row = vec![0f32; 32];
            m.decode_row(1, &mut row);
            assert_eq!(row, vals[32..], "{dtype}");
            assert_eq!(m.row_bytes(), 32 * dtype.size());
        }
    }

    #[test]
    fn matmul_of_several_tokens_matches_one_by_one() {
        let data: Vec<u8> = (0..6 * 32).flat_map(|i| stored(FloatDtype::BF16, (i % 7) as f32 - 3.0)).collect();
        let m = Matrix { codes: Codes::Dense { data: &data, dtype: FloatDtype::BF16 }, rows: 6, cols: 32, map: RowMap::identity(6) };
        let xs: Vec<f32> = (0..3 * 32).map(|i| (i as f32).sin()).collect();
        let mut all = vec![0f32; 18];
        m.matmul(&xs, &mut all);
        for t in 0..3 {
            let mut one = vec![0f32; 6];
            m.matmul(&xs[t * 32..(t + 1) * 32], &mut one);
            assert_eq!(&all[t * 6..(t + 1) * 6], &one[..]);
        }
    }
    /// A deterministic pseudo-random stream in [0, 1).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// The bytes of a test matrix and its weights as the reference computes them (in f64, from
    /// the codes, scales and biases directly, not through the decoder).
    struct Case {
        name: String,
        bytes: [Vec<u8>; 3],
        rows: usize,
        cols: usize,
        values: Vec<f64>,
        kind: Kind,
    }

    #[derive(Clone, Copy)]
    enum Kind {
        Dense(FloatDtype),
        Columns(FloatDtype, RowMap),
        Affine(FloatDtype, u32, usize, RowMap),
        Mxfp4,
    }

    impl Case {
        fn matrix(&self) -> Matrix<'_> {
            let [a, b, c] = &self.bytes;
            let (codes, map) = match self.kind {
                Kind::Dense(dtype) => (Codes::Dense { data: a, dtype }, RowMap::identity(self.rows)),
                Kind::Columns(dtype, map) => (Codes::Columns { data: a, dtype }, map),
                Kind::Affine(floats, bits, group_size, map) => (Codes::Affine { weight: a, scales: b, biases: c, floats, bits, group_size }, map),
                Kind::Mxfp4 => (Codes::Mxfp4 { blocks: a, scales: b }, RowMap::identity(self.rows)),
            };
            Matrix { codes, rows: self.rows, cols: self.cols, map }
        }
    }

    /// A float stored as `dtype`, and the value it holds.
    fn rounded(dtype: FloatDtype, v: f32) -> (Vec<u8>, f64) {
        let b = stored(dtype, v);
        let back = match dtype {
            FloatDtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
            FloatDtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
            FloatDtype::F32 => f64::from(v),
        };
        (b, back)
    }

    fn dense_case(dtype: FloatDtype, rows: usize, cols: usize, rng: &mut Lcg) -> Case {
        let (mut data, mut values) = (Vec::new(), Vec::new());
        for _ in 0..rows * cols {
            let (b, v) = rounded(dtype, (rng.next() * 2.0 - 1.0) as f32);
            data.extend(b);
            values.push(v);
        }
        Case { name: format!("dense {dtype} {rows}x{cols}"), bytes: [data, vec![], vec![]], rows, cols, values, kind: Kind::Dense(dtype) }
    }

    /// Transposed experts: a `[blocks, cols, 6]` tensor read as 3 rows per block (stored columns
    /// 1, 3, 5), like the up half of interleaved gate/up columns.
    fn columns_case(dtype: FloatDtype, blocks: usize, cols: usize, rng: &mut Lcg) -> Case {
        let map = RowMap { per: 3, src_per: 6, start: 1, step: 2 };
        let stored_vals: Vec<(Vec<u8>, f64)> = (0..blocks * cols * 6).map(|_| rounded(dtype, (rng.next() * 2.0 - 1.0) as f32)).collect();
        let rows = blocks * 3;
        let mut values = vec![0f64; rows * cols];
        for r in 0..rows {
            let (blk, col) = (r / 3, 1 + 2 * (r % 3));
            for j in 0..cols {
                values[r * cols + j] = stored_vals[(blk * cols + j) * 6 + col].1;
            }
        }
        let data = stored_vals.into_iter().flat_map(|(b, _)| b).collect();
        Case { name: format!("columns {dtype} {rows}x{cols}"), bytes: [data, vec![], vec![]], rows, cols, values, kind: Kind::Columns(dtype, map) }
    }

    fn affine_case(floats: FloatDtype, bits: u32, group: usize, rows: usize, cols: usize, rng: &mut Lcg) -> Case {
        let levels = 1u64 << bits;
        let (mut packed, mut scales, mut biases, mut values) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rows {
            let codes: Vec<u64> = (0..cols).map(|_| ((rng.next() * levels as f64) as u64).min(levels - 1)).collect();
            // The row as one little-endian bit stream, code k at bit k * bits.
            let mut row = vec![0u8; cols * bits as usize / 8];
            for (k, &q) in codes.iter().enumerate() {
                for b in 0..bits as usize {
                    if q >> b & 1 == 1 {
                        let at = k * bits as usize + b;
                        row[at / 8] |= 1 << (at % 8);
                    }
                }
            }
            packed.extend(row);
            for g in 0..cols / group {
                let (sb, scale) = rounded(floats, (0.01 + rng.next() * 0.2) as f32);
                let (bb, bias) = rounded(floats, (rng.next() - 0.5) as f32);
                scales.extend(sb);
                biases.extend(bb);
                for &q in &codes[g * group..(g + 1) * group] {
                    values.push(scale * q as f64 + bias);
                }
            }
        }
        Case {
            name: format!("affine {bits}-bit group {group} {floats} {rows}x{cols}"),
            bytes: [packed, scales, biases],
            rows,
            cols,
            values,
            kind: Kind::Affine(floats, bits, group, RowMap::identity(rows)),
        }
    }

    /// `case` (affine, identity map) read through a map that takes every other stored row from
    /// the second, as upstream's interleaved gate rows are read: stored rows are not consecutive.
    fn odd_rows(case: Case) -> Case {
        let Kind::Affine(floats, bits, group, _) = case.kind else {
            unreachable!("odd_rows takes an affine case");
        };
        let (rows, c) = (case.rows / 2, case.cols);
        let map = RowMap { per: rows, src_per: case.rows, start: 1, step: 2 };
        let values = (0..rows).flat_map(|r| case.values[map.stored(r) * c..(map.stored(r) + 1) * c].to_vec()).collect();
        Case { name: format!("{}, odd rows", case.name), rows, values, kind: Kind::Affine(floats, bits, group, map), ..case }
    }

    fn mxfp4_case(rows: usize, cols: usize, rng: &mut Lcg) -> Case {
        const E2M1: [f64; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        let (mut blocks, mut scales, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rows {
            let codes: Vec<u8> = (0..cols).map(|_| (rng.next() * 16.0) as u8 & 15).collect();
            for pair in codes.chunks(2) {
                blocks.push(pair[0] | pair[1] << 4);
            }
            for block in codes.chunks(32) {
                let e = 120 + (rng.next() * 10.0) as u8;
                scales.push(e);
                for &q in block {
                    let mag = E2M1[usize::from(q & 7)] * 2f64.powi(i32::from(e) - 127);
                    values.push(if q & 8 != 0 { -mag } else { mag });
                }
            }
        }
        Case { name: format!("mxfp4 {rows}x{cols}"), bytes: [blocks, scales, vec![]], rows, cols, values, kind: Kind::Mxfp4 }
    }

    /// Every storage: dense and transposed columns in each float type (one width not a multiple
    /// of the 8 lanes), affine at every bit width and group size (one group count not a multiple
    /// of the 8 lanes), MXFP4. 70 rows: more than one task's rows, not a multiple of the 4-row
    /// block.
    fn every_case() -> Vec<Case> {
        let mut rng = Lcg(7);
        let mut cases = Vec::new();
        for dtype in FloatDtype::ALL {
            cases.push(dense_case(dtype, 70, 256, &mut rng));
            cases.push(dense_case(dtype, 9, 36, &mut rng));
            cases.push(columns_case(dtype, 23, 96, &mut rng));
        }
        for bits in [2, 3, 4, 5, 6, 8] {
            for group in [32, 64, 128] {
                cases.push(affine_case(FloatDtype::BF16, bits, group, 70, 256, &mut rng));
            }
            cases.push(affine_case(FloatDtype::F16, bits, 64, 13, 128, &mut rng));
            cases.push(affine_case(FloatDtype::F32, bits, 32, 13, 128, &mut rng));
            // 12 groups: not a multiple of the 8 lanes; 20: one whole load of 16 biases and a part.
            cases.push(affine_case(FloatDtype::BF16, bits, 32, 9, 384, &mut rng));
            cases.push(affine_case(FloatDtype::BF16, bits, 32, 11, 640, &mut rng));
            // A group size without an unrolled kernel (mlx writes 32, 64 and 128).
            cases.push(affine_case(FloatDtype::BF16, bits, 256, 9, 512, &mut rng));
            cases.push(odd_rows(affine_case(FloatDtype::BF16, bits, 64, 38, 256, &mut rng)));
        }
        cases.push(mxfp4_case(70, 256, &mut rng));
        cases
    }

    /// Checks `matmul_rows(first, rows)` for `n` tokens against an f64 sum of the reference's
    /// weights times the inputs: within f32 rounding of the sum of magnitudes.
    fn check_against_f64(case: &Case, first: usize, rows: usize, n: usize, rng: &mut Lcg) -> Vec<f32> {
        let m = case.matrix();
        let c = case.cols;
        let xs: Vec<f32> = (0..n * c).map(|_| (rng.next() * 4.0 - 2.0) as f32).collect();
        let mut out = vec![f32::NAN; n * rows];
        m.matmul_rows(first, rows, &xs, &mut out);
        for t in 0..n {
            for r in 0..rows {
                let w = &case.values[(first + r) * c..(first + r + 1) * c];
                let x = &xs[t * c..(t + 1) * c];
                let exact: f64 = w.iter().zip(x).map(|(w, &x)| w * f64::from(x)).sum();
                let mag: f64 = w.iter().zip(x).map(|(w, &x)| (w * f64::from(x)).abs()).sum();
                let got = f64::from(out[t * rows + r]);
                assert!(
                    (got - exact).abs() <= 1e-6 * mag + 1e-30,
                    "{}: {n} tokens, row {} token {t}: {got} vs f64 {exact} (magnitude {mag})",
                    case.name,
                    first + r
                );
            }
        }
        // The same bits token by token (the sum order does not depend on the token count), except
        // that one token times affine codes folds scales and biases out of the groups (checked
        // against f64 above when `n` is 1).
        if n > 1 && !matches!(case.kind, Kind::Affine(..)) {
            for t in 0..n {
                let mut one = vec![0f32; rows];
                m.matmul_rows(first, rows, &xs[t * c..(t + 1) * c], &mut one);
                assert_eq!(one, out[t * rows..(t + 1) * rows], "{}: token {t} of {n} alone", case.name);
            }
        }
        out
    }

    #[test]
    fn products_match_an_f64_reference_for_every_storage_and_token_count() {
        let mut rng = Lcg(11);
        for case in every_case() {
            // 1, 2, 3 (one token block), odd counts with every remainder, more than a row task.
            for n in [1, 2, 3, 4, 5, 7, 11, 67] {
                check_against_f64(&case, 0, case.rows, n, &mut rng);
            }
            // A slice of rows, as one expert's rows of a stacked matrix.
            let (first, rows) = (case.rows / 3, case.rows / 2);
            check_against_f64(&case, first, rows, 5, &mut rng);
        }
    }

    #[test]
    fn every_kernel_gives_the_same_bits() {
        let mut rng = Lcg(5);
        for case in every_case() {
            let m = case.matrix();
            let (c, kp) = (case.cols, case.cols.next_multiple_of(LANES));
            // One token takes the fused decode-and-multiply path where there is one.
            for n in [1, 7] {
                let mut xs = vec![0f32; n * kp];
                for x in xs.chunks_exact_mut(kp) {
                    x[..c].iter_mut().for_each(|v| *v = (rng.next() * 2.0 - 1.0) as f32);
                }
                let folded = |simd| match (n, m.codes) {
                    (1, Codes::Affine { bits, group_size, .. }) => FoldedInput::new(simd, &xs[..c], bits, group_size),
                    _ => FoldedInput::default(),
                };
                let mut scratch = vec![0f32; ROW_BLOCK * kp];
                let mut portable = vec![0f32; n * m.rows];
                m.rows_times_with::<Portable>(0, m.rows, &xs, &folded(Simd::Portable), kp, &mut scratch, &mut portable);
                for simd in Simd::available() {
                    let mut other = vec![0f32; n * m.rows];
                    m.rows_times(simd, 0, m.rows, &xs, &folded(simd), kp, &mut scratch, &mut other);
                    assert_eq!(portable, other, "{}, {n} tokens, {simd:?}", case.name);
                }
            }
        }
    }

    #[test]
    fn products_do_not_depend_on_the_thread_count() {
        let case = affine_case(FloatDtype::BF16, 4, 64, 200, 1024, &mut Lcg(3));
        let m = case.matrix();
        let xs: Vec<f32> = (0..5 * 1024).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
            let mut out = vec![0f32; 5 * 200];
            pool.install(|| m.matmul(&xs, &mut out));
            out
        };
        assert_eq!(run(1), run(3));
    }
}
