//! Weight matrices kept packed in the memory map, with products that decode one row at a time.
//!
//! A product `y = W x` (or `Y = X W^T` for several tokens) walks the rows of `W`: each row is
//! decoded once into a small f32 scratch (`scale * q + bias` for affine codes, `lut[q] * 2^e` for
//! MXFP4, a widening for BF16: exactly the reference's dequantized values) and dotted with every
//! input. The model is never dequantized as a whole; rows are spread over threads.

use half::bf16;
use mixq_loader::decode::{bf16_to_f32, mxfp4_row_to_f32};
pub use mixq_loader::RowMap;
use mixq_loader::QuantFormat;
use rayon::prelude::*;

/// How a matrix's rows are stored.
#[derive(Debug, Clone, Copy)]
pub enum Codes<'a> {
    /// Dense BF16.
    Bf16 {
        /// `[stored_rows, cols]` little-endian bf16.
        data: &'a [u8],
    },
    /// MLX affine: `bits`-bit codes in a little-endian bit stream per row, bf16 scales and biases.
    Affine {
        /// Packed codes, `cols * bits / 8` bytes per row.
        weight: &'a [u8],
        /// bf16 scales, `cols / group_size` per row.
        scales: &'a [u8],
        /// bf16 biases, `cols / group_size` per row.
        biases: &'a [u8],
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
            Codes::Bf16 { .. } => QuantFormat::Bf16,
            Codes::Affine { bits, group_size, .. } => QuantFormat::Affine { bits, group_size: group_size as u32 },
            Codes::Mxfp4 { .. } => QuantFormat::Mxfp4,
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

fn bf16_at(bytes: &[u8], i: usize) -> f32 {
    bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
}

impl<'a> Matrix<'a> {
    /// Bytes of packed weight data read per row (for bandwidth figures).
    pub fn row_bytes(&self) -> usize {
        self.codes.format().row_bytes(self.cols)
    }

    /// Bytes of the stored tensor (codes, scales and biases), all rows.
    pub fn stored_bytes(&self) -> usize {
        match self.codes {
            Codes::Bf16 { data } => data.len(),
            Codes::Affine { weight, scales, biases, .. } => weight.len() + scales.len() + biases.len(),
            Codes::Mxfp4 { blocks, scales } => blocks.len() + scales.len(),
        }
    }

    /// Decodes logical row `r` into `out` (`cols` values).
    #[inline(always)]
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        let s = self.map.stored(r);
        let c = self.cols;
        match self.codes {
            Codes::Bf16 { data } => bf16_to_f32(&data[s * c * 2..(s + 1) * c * 2], out),
            Codes::Mxfp4 { blocks, scales } => {
                let (bb, sb) = (c / 2, c / 32);
                mxfp4_row_to_f32(&blocks[s * bb..(s + 1) * bb], &scales[s * sb..(s + 1) * sb], out)
            }
            Codes::Affine { weight, scales, biases, bits, group_size } => {
                let row_bytes = c * bits as usize / 8;
                let groups = c / group_size;
                let packed = &weight[s * row_bytes..(s + 1) * row_bytes];
                let scales = &scales[s * groups * 2..(s + 1) * groups * 2];
                let biases = &biases[s * groups * 2..(s + 1) * groups * 2];
                match bits {
                    2 => decode_affine::<2>(packed, scales, biases, group_size, out),
                    3 => decode_affine::<3>(packed, scales, biases, group_size, out),
                    4 => decode_affine::<4>(packed, scales, biases, group_size, out),
                    5 => decode_affine::<5>(packed, scales, biases, group_size, out),
                    6 => decode_affine::<6>(packed, scales, biases, group_size, out),
                    8 => decode_affine::<8>(packed, scales, biases, group_size, out),
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

/// Decodes one affine row of `B`-bit codes: every 8 codes occupy `B` bytes of the bit stream.
#[inline(always)]
fn decode_affine<const B: usize>(packed: &[u8], scales: &[u8], biases: &[u8], group_size: usize, out: &mut [f32]) {
    let mask = (1u32 << B) - 1;
    let group_bytes = group_size * B / 8;
    for (g, (src, dst)) in packed.chunks_exact(group_bytes).zip(out.chunks_exact_mut(group_size)).enumerate() {
        let scale = bf16_at(scales, g);
        let bias = bf16_at(biases, g);
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

    #[test]
    fn affine_rows_decode_as_scale_q_plus_bias() {
        // One row of 32 codes at 3 bits: codes 0..7 repeated, scale 0.5, bias -1.
        let codes: Vec<u8> = (0..32).map(|i| (i % 8) as u8).collect();
        let mut packed = vec![0u8; 12];
        for (eight, dst) in codes.chunks(8).zip(packed.chunks_mut(3)) {
            let w: u64 = eight.iter().enumerate().map(|(k, &c)| u64::from(c) << (3 * k)).sum();
            dst.copy_from_slice(&w.to_le_bytes()[..3]);
        }
        let scales = bf16::from_f32(0.5).to_bits().to_le_bytes();
        let biases = bf16::from_f32(-1.0).to_bits().to_le_bytes();
        let m = Matrix {
            codes: Codes::Affine { weight: &packed, scales: &scales, biases: &biases, bits: 3, group_size: 32 },
            rows: 1,
            cols: 32,
            map: RowMap::identity(1),
        };
        let mut out = vec![0f32; 32];
        m.decode_row(0, &mut out);
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, 0.5 * (i % 8) as f32 - 1.0);
        }
        let x = vec![1.0f32; 32];
        let mut y = [0f32];
        m.matmul(&x, &mut y);
        assert_eq!(y[0], out.iter().sum::<f32>());
    }

    #[test]
    fn matmul_of_several_tokens_matches_one_by_one() {
        let data: Vec<u8> = (0..6 * 32).flat_map(|i| bf16::from_f32((i % 7) as f32 - 3.0).to_bits().to_le_bytes()).collect();
        let m = Matrix { codes: Codes::Bf16 { data: &data }, rows: 6, cols: 32, map: RowMap::identity(6) };
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
