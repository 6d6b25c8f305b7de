//! The `gptq` quantizer: MLX affine groups (static, so the output is plain MLX) whose rounding
//! errors are fed forward through the input Hessian, as GPTQ/OPTQ does.
//!
//! With `H = E[x xᵀ]` over a layer's calibration inputs, the output error of a row `w` quantized
//! to `q` is `(w − q) H (w − q)ᵀ`. Columns are quantized in order; after column `i` its error,
//! scaled by `1 / U_ii`, is subtracted from the columns not yet quantized along row `i` of `U`,
//! the upper Cholesky factor of the damped `H⁻¹` (`H⁻¹ = Uᵀ U`). When a group's first column is
//! reached, its stored (bf16) scale and bias are chosen by the `mse` search on the
//! error-updated weights, weighted by `1 / U_ii²`, and every column of the
//! group then takes the nearest code under them. Columns are processed in blocks of
//! [`BLOCK`]: inside a block updates touch only the block, and the rest of the row is updated
//! once per block by one matrix product (lazy batch updates, `matrixmultiply`'s sgemm), so the
//! bulk is a matrix multiply. The factorisations are `faer`'s, in f64.
//! Rows are independent given `H`: bands of rows run in parallel.

use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, Side};
use half::bf16;
use rayon::prelude::*;

use crate::kernels::affine::{pack_codes, packed_row_bytes, NonFinite};
use crate::kernels::mse::quantize_row_mse;

/// Columns per lazy-update block; a multiple of every group size.
pub const BLOCK: usize = 128;
/// The least damping added to a Hessian's diagonal, as a fraction of its mean diagonal (GPTQ's 1%).
pub const MIN_DAMPING: f64 = 0.01;

/// Damping of an `n x n` Hessian measured over `rows` rows, as a fraction of its mean diagonal:
/// `n / rows` (the relative noise of a sample second moment), at least [`MIN_DAMPING`]. An
/// expert's own Hessian comes from the few thousand rows routed to it and needs more than a
/// layer's shared one: on the bundled model a fixed 1% gave a held-out KL of 0.0128 at the 3.6-bit
/// recipe where 10% gave 0.0114, while at 4 bits the shared attention Hessians did best near 1-3%.
pub fn damping_fraction(n: usize, rows: f64) -> f64 {
    (n as f64 / rows.max(1.0)).max(MIN_DAMPING)
}
/// Rows per parallel band.
const BAND_ROWS: usize = 16;

/// A damped input Hessian factored for error feedback: the upper Cholesky factor of its inverse,
/// and the group search's importance `1 / U_ii²` (the cost of column `i`'s error once the
/// columns before it have absorbed what they can: GPTQ's own per-column weight; it measured
/// better than `diag(H)`, 0.0114 against 0.0118 held-out KL).
#[derive(Debug, Clone)]
pub struct HessianFactor {
    cols: usize,
    /// `U`, row-major `cols x cols`, upper triangular, `H⁻¹ = Uᵀ U`.
    upper: Vec<f32>,
    /// `1 / U_ii²` per column.
    importance: Vec<f32>,
}

impl HessianFactor {
    /// Factors a symmetric `n x n` Hessian (row-major) measured over `rows` rows (which sets its
    /// damping, [`damping_fraction`]). `None` when it carries nothing to feed
    /// errors through: a zero or non-finite diagonal (an expert no token reached), or a matrix
    /// that stays indefinite after damping it up to 10,000 times more.
    pub fn new(h: &[f64], n: usize, rows: f64) -> Option<Self> {
        if h.len() != n * n {
            return None;
        }
        Self::from_fn(n, rows, |i, j| h[i * n + j])
    }

    /// [`HessianFactor::new`] of a Hessian stored as its packed upper triangle (row by row, as
    /// calibration files keep it), without unpacking it first.
    pub fn from_packed(packed: &[f32], n: usize, rows: f64) -> Option<Self> {
        if packed.len() != n * (n + 1) / 2 {
            return None;
        }
        // Row i of the triangle starts after rows 0..i, of n, n - 1, ... elements.
        let at = |i: usize, j: usize| {
            let (i, j) = if i <= j { (i, j) } else { (j, i) };
            f64::from(packed[i * n - i * i.saturating_sub(1) / 2 + (j - i)])
        };
        Self::from_fn(n, rows, at)
    }

    fn from_fn(n: usize, rows: f64, h: impl Fn(usize, usize) -> f64) -> Option<Self> {
        if n == 0 || (0..n).any(|i| !h(i, i).is_finite()) {
            return None;
        }
        let mean_diag = (0..n).map(|i| h(i, i)).sum::<f64>() / n as f64;
        if mean_diag.is_nan() || mean_diag <= 0.0 {
            return None;
        }
        let mut damping = damping_fraction(n, rows) * mean_diag;
        for _ in 0..5 {
            let finite = std::cell::Cell::new(true);
            let damped = Mat::<f64>::from_fn(n, n, |i, j| {
                let v = h(i, j) + if i == j { damping } else { 0.0 };
                finite.set(finite.get() && v.is_finite());
                v
            });
            if !finite.get() {
                return None;
            }
            if let Some(upper) = inverse_upper_factor(damped) {
                let importance = (0..n).map(|i| 1.0 / (upper[i * n + i] * upper[i * n + i])).collect();
                return Some(HessianFactor { cols: n, upper, importance });
            }
            damping *= 10.0;
        }
        None
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The group search's per-column importance.
    pub fn importance(&self) -> &[f32] {
        &self.importance
    }
}

/// `U` with `H⁻¹ = Uᵀ U`, row-major f32, for a symmetric positive definite `H`.
fn inverse_upper_factor(h: Mat<f64>) -> Option<Vec<f32>> {
    // Each step drops what it no longer needs: at most two n x n f64 matrices live at once.
    let n = h.nrows();
    let factor = h.llt(Side::Lower).ok()?;
    drop(h);
    let inverse = factor.inverse();
    drop(factor);
    let lower = inverse.llt(Side::Lower).ok()?;
    drop(inverse);
    let l = lower.L();
    // U = Lᵀ: row i of U is column i of L.
    let mut upper = vec![0f32; n * n];
    for i in 0..n {
        for j in i..n {
            upper[i * n + j] = l[(j, i)] as f32;
        }
    }
    upper.iter().all(|x| x.is_finite()).then_some(upper)
}

/// Quantizes whole rows with error feedback through `h` (rows are updated in place), bands of
/// rows in parallel; outputs as [`crate::kernels::affine::quantize_row`], row by row.
pub fn quantize_rows_gptq(
    rows: &mut [f32],
    h: &HessianFactor,
    (bits, group_size): (u32, usize),
    packed: &mut [u8],
    scales: &mut [bf16],
    biases: &mut [bf16],
) -> Result<(), (usize, NonFinite)> {
    let cols = h.cols;
    let (rb, gpr) = (packed_row_bytes(cols, bits), cols / group_size);
    rows.par_chunks_mut(BAND_ROWS * cols)
        .zip(packed.par_chunks_mut(BAND_ROWS * rb))
        .zip(scales.par_chunks_mut(BAND_ROWS * gpr).zip(biases.par_chunks_mut(BAND_ROWS * gpr)))
        .enumerate()
        .try_for_each(|(band, ((w, p), (s, b)))| {
            quantize_band(w, h, (bits, group_size), p, s, b).map_err(|(r, e)| (band * BAND_ROWS + r, e))
        })
}

/// One band of rows: the blocked GPTQ loop.
fn quantize_band(
    w: &mut [f32],
    h: &HessianFactor,
    (bits, group_size): (u32, usize),
    packed: &mut [u8],
    scales: &mut [bf16],
    biases: &mut [bf16],
) -> Result<(), (usize, NonFinite)> {
    let cols = h.cols;
    let n_rows = w.len() / cols;
    let gpr = cols / group_size;
    for (r, row) in w.chunks_exact(cols).enumerate() {
        if let Some(index) = row.iter().position(|x| !x.is_finite()) {
            return Err((r, NonFinite { index, value: row[index] }));
        }
    }
    let n_bins = ((1u32 << bits) - 1) as f32;
    let mut codes = vec![0u8; n_rows * cols];
    // The current group's stored scale and bias per row, as f32.
    let mut params = vec![(0f32, 0f32); n_rows];
    let mut group_packed = vec![0u8; packed_row_bytes(group_size, bits)];
    let u = &h.upper;
    for start in (0..cols).step_by(BLOCK) {
        let end = (start + BLOCK).min(cols);
        let width = end - start;
        let mut err = vec![0f32; n_rows * width];
        for i in start..end {
            if i % group_size == 0 {
                let g = i / group_size;
                let imp = &h.importance[i..i + group_size];
                for r in 0..n_rows {
                    let group = &w[r * cols + i..r * cols + i + group_size];
                    let (s, b) = (&mut scales[r * gpr + g], &mut biases[r * gpr + g]);
                    quantize_row_mse(group, Some(imp), bits, group_size, &mut group_packed, std::slice::from_mut(s), std::slice::from_mut(b))
                        .map_err(|e| (r, NonFinite { index: i + e.index, value: e.value }))?;
                    params[r] = (s.to_f32(), b.to_f32());
                }
            }
            let d = u[i * cols + i];
            let tail = &u[i * cols + i + 1..i * cols + end];
            for r in 0..n_rows {
                let row = &mut w[r * cols..(r + 1) * cols];
                let (scale, bias) = params[r];
                let code = nearest_code(row[i], scale, bias, n_bins);
                codes[r * cols + i] = code as u8;
                let e = (row[i] - (scale * code + bias)) / d;
                for (x, &uij) in row[i + 1..end].iter_mut().zip(tail) {
                    *x -= e * uij;
                }
                err[r * width + (i - start)] = e;
            }
        }
        if end < cols {
            // The rest of every row: W[:, end..] -= Err · U[start..end, end..].
            let rest = cols - end;
            let (dst, rhs) = (&mut w[end..], &u[start * cols + end..]);
            assert!(dst.len() >= (n_rows - 1) * cols + rest && rhs.len() >= (width - 1) * cols + rest && err.len() == n_rows * width);
            // SAFETY: the asserts above keep every strided access inside `dst`, `rhs` and `err`.
            unsafe {
                matrixmultiply::sgemm(
                    n_rows, width, rest, -1.0,
                    err.as_ptr(), width as isize, 1,
                    rhs.as_ptr(), cols as isize, 1,
                    1.0,
                    dst.as_mut_ptr(), cols as isize, 1,
                );
            }
        }
    }
    for (c, p) in codes.chunks_exact(cols).zip(packed.chunks_exact_mut(packed_row_bytes(cols, bits))) {
        pack_codes(c, bits, p);
    }
    Ok(())
}

/// `clamp(rint((w - bias) / scale), 0, n_bins)`; code 0 for a zero scale (a constant group).
#[inline(always)]
fn nearest_code(w: f32, scale: f32, bias: f32, n_bins: f32) -> f32 {
    if scale == 0.0 {
        return 0.0;
    }
    let q = ((w - bias) / scale).round_ties_even();
    q.clamp(0.0, n_bins)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::affine::dequantize_row;

    /// A deterministic pseudo-random stream in [-1, 1): the mse tests' uniform one, stretched.
    fn noise(seed: u64) -> impl FnMut() -> f32 {
        let mut u = crate::kernels::mse::tests::uniform(seed);
        move || 2.0 * u() - 1.0
    }

    /// Correlated inputs: each token's features are a shared factor plus noise, with a few
    /// channels ten times louder and a few dead.
    fn inputs(tokens: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut u = noise(seed);
        (0..tokens)
            .flat_map(|_| {
                let shared: Vec<f32> = (0..4).map(|_| u()).collect();
                (0..n).map(|j| if j % 31 == 30 { 0.0 } else { (shared[j % 4] + 0.3 * u()) * if j % 17 == 0 { 10.0 } else { 1.0 } }).collect::<Vec<_>>()
            })
            .collect()
    }

    fn gram(x: &[f32], n: usize) -> Vec<f64> {
        let t = x.len() / n;
        let mut h = vec![0f64; n * n];
        for row in x.chunks_exact(n) {
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += f64::from(row[i]) * f64::from(row[j]) / t as f64;
                }
            }
        }
        h
    }

    /// Σ over tokens and rows of (x·(w − ŵ))², the layer's output error on `x`.
    fn output_error(x: &[f32], w: &[f32], q: &[f32], n: usize) -> f64 {
        let diff: Vec<f64> = w.iter().zip(q).map(|(a, b)| f64::from(*a) - f64::from(*b)).collect();
        x.chunks_exact(n).map(|xt| diff.chunks_exact(n).map(|d| d.iter().zip(xt).map(|(a, b)| a * f64::from(*b)).sum::<f64>().powi(2)).sum::<f64>()).sum()
    }

    fn quantize(method: &str, w: &[f32], n: usize, h: &HessianFactor, bits: u32, gs: usize) -> Vec<f32> {
        let rows = w.len() / n;
        let mut packed = vec![0u8; rows * packed_row_bytes(n, bits)];
        let (mut s, mut b) = (vec![bf16::ZERO; rows * n / gs], vec![bf16::ZERO; rows * n / gs]);
        let mut work = w.to_vec();
        match method {
            "gptq" => quantize_rows_gptq(&mut work, h, (bits, gs), &mut packed, &mut s, &mut b).unwrap(),
            _ => {
                for r in 0..rows {
                    let g = n / gs;
                    quantize_row_mse(&w[r * n..(r + 1) * n], Some(h.importance()), bits, gs, &mut packed[r * packed_row_bytes(n, bits)..(r + 1) * packed_row_bytes(n, bits)], &mut s[r * g..(r + 1) * g], &mut b[r * g..(r + 1) * g]).unwrap();
                }
            }
        }
        let mut back = vec![0f32; w.len()];
        for r in 0..rows {
            let g = n / gs;
            let rb = packed_row_bytes(n, bits);
            dequantize_row(&packed[r * rb..(r + 1) * rb], &s[r * g..(r + 1) * g], &b[r * g..(r + 1) * g], bits, gs, &mut back[r * n..(r + 1) * n]);
        }
        back
    }

    #[test]
    fn feedback_cuts_the_output_error_on_held_out_inputs() {
        let (n, rows) = (256, 40);
        let mut u = noise(11);
        let w: Vec<f32> = (0..rows * n).map(|_| u() * 0.05).collect();
        let h = HessianFactor::new(&gram(&inputs(2048, n, 1), n), n, 2048.0).expect("a positive definite Hessian");
        let held_out = inputs(512, n, 2);
        for (bits, gs) in [(3, 64), (4, 32), (2, 128)] {
            let e_mse = output_error(&held_out, &w, &quantize("mse", &w, n, &h, bits, gs), n);
            let e_gptq = output_error(&held_out, &w, &quantize("gptq", &w, n, &h, bits, gs), n);
            assert!(e_gptq < 0.8 * e_mse, "{bits}-bit g{gs}: gptq {e_gptq:.4e} vs mse {e_mse:.4e}");
        }
    }

    #[test]
    fn a_packed_hessian_factors_as_the_full_one() {
        let n = 48;
        let h = gram(&inputs(200, n, 4), n);
        let packed: Vec<f32> = (0..n).flat_map(|i| (i..n).map(move |j| (i, j))).map(|(i, j)| h[i * n + j] as f32).collect();
        let full: Vec<f64> = (0..n * n).map(|k| f64::from(h[k] as f32)).collect();
        let (a, b) = (HessianFactor::from_packed(&packed, n, 200.0).unwrap(), HessianFactor::new(&full, n, 200.0).unwrap());
        assert_eq!(a.upper, b.upper);
        assert!(HessianFactor::from_packed(&packed[1..], n, 200.0).is_none(), "a wrong length is refused");
    }

    #[test]
    fn the_factor_inverts_the_damped_hessian() {
        let n = 64;
        let h = gram(&inputs(500, n, 5), n);
        let f = HessianFactor::new(&h, n, 1e9).unwrap();
        let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
        // Uᵀ U (H + λI) = I.
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n)
                    .map(|k| {
                        let utu: f64 = (0..n).map(|m| f64::from(f.upper[m * n + i]) * f64::from(f.upper[m * n + k])).sum();
                        utu * (h[k * n + j] + if k == j { MIN_DAMPING * mean } else { 0.0 })
                    })
                    .sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-3, "({i}, {j}): {v}");
            }
        }
    }

    #[test]
    fn degenerate_hessians_never_give_nan() {
        let n = 64;
        assert!(HessianFactor::new(&vec![0.0; n * n], n, 1e9).is_none(), "a zero Hessian has nothing to feed through");
        assert!(HessianFactor::new(&vec![f64::NAN; n * n], n, 1e9).is_none());
        // Rank one (one token seen): damping makes it definite; the result is finite.
        let x: Vec<f32> = (0..n).map(|j| (j as f32 * 0.1).sin()).collect();
        let f = HessianFactor::new(&gram(&x, n), n, 1.0).expect("damped rank-one Hessian");
        let mut u = noise(3);
        let w: Vec<f32> = (0..4 * n).map(|_| u()).collect();
        let q = quantize("gptq", &w, n, &f, 3, 32);
        assert!(q.iter().all(|v| v.is_finite()));
        // A near-zero Hessian scales out: the output error is that of a normal-sized one.
        let x = inputs(300, n, 9);
        let h = gram(&x, n);
        let tiny: Vec<f64> = h.iter().map(|v| v * 1e-30).collect();
        let e_tiny = output_error(&x, &w, &quantize("gptq", &w, n, &HessianFactor::new(&tiny, n, 1e9).unwrap(), 3, 32), n);
        let e_normal = output_error(&x, &w, &quantize("gptq", &w, n, &HessianFactor::new(&h, n, 1e9).unwrap(), 3, 32), n);
        assert!((e_tiny / e_normal - 1.0).abs() < 0.01, "{e_tiny} vs {e_normal}");
    }

    #[test]
    fn a_non_finite_weight_is_named() {
        let n = 64;
        let f = HessianFactor::new(&gram(&inputs(300, n, 9), n), n, 300.0).unwrap();
        let mut w = vec![0.5f32; 3 * n];
        w[n + 7] = f32::NAN;
        let mut packed = vec![0u8; 3 * packed_row_bytes(n, 4)];
        let (mut s, mut b) = (vec![bf16::ZERO; 6], vec![bf16::ZERO; 6]);
        let (row, e) = quantize_rows_gptq(&mut w, &f, (4, 32), &mut packed, &mut s, &mut b).unwrap_err();
        assert_eq!((row, e.index), (1, 7));
    }
}
