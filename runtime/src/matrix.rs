//! Weight matrices kept packed in the memory map, with products that decode one row at a time.
//!
//! A product `y = W x` (or `Y = X W^T` for several tokens) walks the rows of `W`: each row is
//! decoded once into a small f32 scratch (`scale * q + bias` for affine codes, `lut[q] * 2^e` for
//! MXFP4, a widening for BF16 and F16: exactly the reference's dequantized values) and dotted with
//! every input. The model is never dequantized as a whole; rows are spread over threads.

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
            Codes::Affine { weight, scales, biases, floats, bits, group_size } => {
                let row_bytes = c * bits as usize / 8;
                let group_bytes = c / group_size * floats.size();
                let packed = &weight[s * row_bytes..(s + 1) * row_bytes];
                let groups = Groups {
                    scales: &scales[s * group_bytes..(s + 1) * group_bytes],
                    biases: &biases[s * group_bytes..(s + 1) * group_bytes],
                    floats,
                    size: group_size,
                };
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
    pub fn matmul_rows(&self, first: usize, out_rows: usize, xs: &[f32], out: &mut [f32]) {
        let n = xs.len() / self.cols;
        debug_assert_eq!(out.len(), n * out_rows);
        const BLOCK: usize = 16;
        // Rows in parallel blocks; each block fills a [rows, n] tile, transposed into `out`.
        let tiles: Vec<(usize, Vec<f32>)> = (0..out_rows.div_ceil(BLOCK))
            .into_par_iter()
            .map_init(
                || vec![0f32; self.cols],
                |row, b| {
                    let r0 = b * BLOCK;
                    let r1 = (r0 + BLOCK).min(out_rows);
                    let mut tile = vec![0f32; (r1 - r0) * n];
                    self.rows_times(first + r0, first + r1, xs, row, &mut tile);
                    (r0, tile)
                },
            )
            .collect();
        for (r0, tile) in tiles {
            let rows_here = tile.len() / n.max(1);
            for i in 0..rows_here {
                for t in 0..n {
                    out[t * out_rows + r0 + i] = tile[i * n + t];
                }
            }
        }
    }

    /// Fills `tile[(r - r0) * n + t] = row_r · xs[t]` for rows `r0..r1`, picking the widest
    /// vector unit the CPU has (same operations, so the same results, on every path).
    fn rows_times(&self, r0: usize, r1: usize, xs: &[f32], row: &mut [f32], tile: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { self.rows_times_avx2(r0, r1, xs, row, tile) };
            }
        }
        self.rows_times_portable(r0, r1, xs, row, tile)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn rows_times_avx2(&self, r0: usize, r1: usize, xs: &[f32], row: &mut [f32], tile: &mut [f32]) {
        self.rows_times_portable(r0, r1, xs, row, tile)
    }

    #[inline(always)]
    fn rows_times_portable(&self, r0: usize, r1: usize, xs: &[f32], row: &mut [f32], tile: &mut [f32]) {
        let n = xs.len() / self.cols;
        for r in r0..r1 {
            self.decode_row(r, row);
            for (t, x) in xs.chunks_exact(self.cols).enumerate() {
                tile[(r - r0) * n + t] = dot(row, x);
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
}
