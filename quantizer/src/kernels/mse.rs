//! The `mse` quantizer: per group, the MLX affine scale and bias (as stored, in bf16) that
//! minimise the squared reconstruction error, weighted per input channel by calibration
//! statistics (mean x²) when given and uniformly otherwise.
//!
//! Per group of `g` weights `w` with importances `a`, and `n = 2^bits - 1`:
//! 1. candidates: the full range `[min, max]` and ranges with 5% or 12% of it clipped off the top
//!    or off the bottom; for each, codes `clamp(rint((w-lo)/step), 0, n)`, then the weighted
//!    least-squares (scale, bias) for those codes, the bias rounded to bf16 and the scale refitted
//!    to that bias and rounded to bf16; each scored by the weighted error of its codes under those
//!    stored values (computed from sums, no second pass);
//! 2. the best candidate gets the nearest codes for its stored values and is compared with mlx's
//!    own output for the group (its codes, computed from f32 parameters, under the bf16 scale and
//!    bias it stores), in f32 sums when they differ by more than their rounding and in f64
//!    otherwise: a group never ends up with a larger weighted error than `mx.quantize` gives it.

use half::bf16;

use crate::kernels::affine::{avx2_dispatch, group_codes, pack_codes, packed_row_bytes, range_params, NonFinite};

/// Fractions of the range clipped off the top or the bottom of a group (a heavy tail is usually
/// on one side); chosen by measuring the error of the trained model's 3-bit experts.
const CLIPS: [f32; 2] = [0.05, 0.12];

avx2_dispatch! {
    /// Quantizes one row choosing each group's (scale, bias) to minimise the squared error
    /// weighted by `importance` (one non-negative weight per column; `None`: uniform). Same
    /// outputs as [`crate::kernels::affine::quantize_row`].
    pub fn quantize_row_mse(
        row: &[f32],
        importance: Option<&[f32]>,
        bits: u32,
        group_size: usize,
        packed: &mut [u8],
        scales: &mut [bf16],
        biases: &mut [bf16],
    ) -> Result<(), NonFinite> => quantize_row_mse_portable;
}

#[inline(always)]
fn quantize_row_mse_portable(
    row: &[f32],
    importance: Option<&[f32]>,
    bits: u32,
    group_size: usize,
    packed: &mut [u8],
    scales: &mut [bf16],
    biases: &mut [bf16],
) -> Result<(), NonFinite> {
    debug_assert_eq!(row.len() % group_size, 0);
    debug_assert_eq!(packed.len(), packed_row_bytes(row.len(), bits));
    match group_size {
        32 if importance.is_some() => quantize_groups::<32, true>(row, importance, bits, packed, scales, biases),
        64 if importance.is_some() => quantize_groups::<64, true>(row, importance, bits, packed, scales, biases),
        128 if importance.is_some() => quantize_groups::<128, true>(row, importance, bits, packed, scales, biases),
        32 => quantize_groups::<32, false>(row, importance, bits, packed, scales, biases),
        64 => quantize_groups::<64, false>(row, importance, bits, packed, scales, biases),
        128 => quantize_groups::<128, false>(row, importance, bits, packed, scales, biases),
        other => unreachable!("group size {other} is rejected when recipes are parsed"),
    }
}

/// The row loop for one group size, known at compile time so that every group loop has a fixed
/// trip count and vectorises; `W` says whether the importances are real (else all 1, folded away).
#[inline(always)]
fn quantize_groups<const G: usize, const W: bool>(
    row: &[f32],
    importance: Option<&[f32]>,
    bits: u32,
    packed: &mut [u8],
    scales: &mut [bf16],
    biases: &mut [bf16],
) -> Result<(), NonFinite> {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let group_bytes = G * bits as usize / 8;
    let ones = [1f32; G];
    let mut codes = [0u8; G];
    for (g, ((group, out), (s, b))) in row
        .chunks_exact(G)
        .zip(packed.chunks_exact_mut(group_bytes))
        .zip(scales.iter_mut().zip(biases.iter_mut()))
        .enumerate()
    {
        let group: &[f32; G] = group.try_into().expect("chunks_exact yields G elements");
        let a: &[f32; G] = match importance {
            Some(imp) => imp[g * G..(g + 1) * G].try_into().expect("a slice of G elements"),
            None => &ones,
        };
        let sums = GroupSums::of::<G, W>(group, a).map_err(|i| NonFinite { index: g * G + i, value: group[i] })?;
        let (scale, bias) = search_group::<G, W>(group, a, n_bins, &sums, &mut codes);
        pack_codes(&codes, bits, out);
        *s = scale;
        *b = bias;
    }
    Ok(())
}

/// `x` rounded to bf16 (nearest, ties to even), as an f32; the same rounding as `half`'s.
#[inline(always)]
fn to_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let b = x.to_bits();
    f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
}

/// Lanes of the partial sums: sums are kept per lane (and added up at the end) so that the loops
/// vectorise, which a single running f32 sum would forbid.
const LANES: usize = 8;

/// An importance, or 1 when the group is unweighted (`W` false: the multiplications fold away).
#[inline(always)]
fn weight<const W: bool>(a: f32) -> f32 {
    if W {
        a
    } else {
        1.0
    }
}

/// The sum of the lanes, pairwise.
#[inline(always)]
fn lane_sum(x: [f32; LANES]) -> f64 {
    let h = [x[0] + x[4], x[1] + x[5], x[2] + x[6], x[3] + x[7]];
    f64::from((h[0] + h[2]) + (h[1] + h[3]))
}

/// `clamp(rint(x), 0, n_bins)`.
#[inline(always)]
fn code(x: f32, n_bins: f32) -> f32 {
    let q = x.round_ties_even();
    let q = if q < 0.0 { 0.0 } else { q };
    if n_bins < q { n_bins } else { q }
}

/// The same error in f64, dequantizing as mlx does (`scale*q + bias` in f32), for given codes.
#[inline(always)]
fn exact_error<const G: usize, const W: bool>(w: &[f32; G], a: &[f32; G], scale: f32, bias: f32, codes: &[u8; G]) -> f64 {
    let mut acc = [0f64; LANES];
    for ((wc, ac), cc) in w.chunks_exact(LANES).zip(a.chunks_exact(LANES)).zip(codes.chunks_exact(LANES)) {
        for k in 0..LANES {
            let d = f64::from(scale * f32::from(cc[k]) + bias) - f64::from(wc[k]);
            acc[k] += f64::from(weight::<W>(ac[k])) * d * d;
        }
    }
    acc.iter().sum()
}

/// Weighted sums over one code assignment `l`: Σa·l, Σa·l², Σa·l·w (in f64 once summed).
#[derive(Debug, Clone, Copy)]
struct CodeSums {
    l: f64,
    ll: f64,
    lw: f64,
}

/// What a group's search needs before any codes: its range and the weighted sums Σa, Σa·w, Σa·w².
#[derive(Debug, Clone, Copy)]
struct GroupSums {
    lo: f32,
    hi: f32,
    a: f64,
    w: f64,
    ww: f64,
}

impl GroupSums {
    /// One pass over the group; `Err(i)` names a non-finite element.
    #[inline(always)]
    fn of<const G: usize, const W: bool>(w: &[f32; G], a: &[f32; G]) -> Result<Self, usize> {
        let (mut lo, mut hi, mut poison) = ([f32::INFINITY; LANES], [f32::NEG_INFINITY; LANES], [0f32; LANES]);
        let (mut sa, mut sw, mut sww) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        for (wc, ac) in w.chunks_exact(LANES).zip(a.chunks_exact(LANES)) {
            for k in 0..LANES {
                let x = wc[k];
                lo[k] = if x < lo[k] { x } else { lo[k] };
                hi[k] = if hi[k] < x { x } else { hi[k] };
                poison[k] += x * 0.0;
                let a = weight::<W>(ac[k]);
                sa[k] += a;
                sw[k] += a * x;
                sww[k] += a * x * x;
            }
        }
        if lane_sum(poison).is_nan() {
            return Err(w.iter().position(|x| !x.is_finite()).unwrap_or(0));
        }
        let lo = lo.iter().fold(f32::INFINITY, |m, &x| m.min(x));
        let hi = hi.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        Ok(GroupSums { lo, hi, a: lane_sum(sa), w: lane_sum(sw), ww: lane_sum(sww) })
    }

    /// Σa·(scale·l + bias − w)² for the codes summed in `c`.
    #[inline(always)]
    fn error(&self, c: &CodeSums, scale: f32, bias: f32) -> f64 {
        let (s, b) = (f64::from(scale), f64::from(bias));
        self.ww - 2.0 * s * c.lw - 2.0 * b * self.w + s * s * c.ll + 2.0 * s * b * c.l + b * b * self.a
    }

    /// Stored (bf16) scale and bias fitted to code sums: the least-squares bias rounded to bf16,
    /// then the scale refitted for that bias and rounded. `None` when the codes are all equal.
    #[inline(always)]
    fn fit(&self, c: &CodeSums) -> Option<(f32, f32)> {
        let det = self.a * c.ll - c.l * c.l;
        if det <= 1e-9 * self.a * c.ll || c.ll <= 0.0 {
            return None;
        }
        let bias = to_bf16(((c.ll * self.w - c.l * c.lw) / det) as f32);
        let scale = to_bf16(((c.lw - f64::from(bias) * c.l) / c.ll) as f32);
        (scale.is_finite() && bias.is_finite() && scale != 0.0).then_some((scale, bias))
    }
}

/// Code sums of the assignment `clamp(rint((w - lo) * inv_step), 0, n_bins)`.
#[inline(always)]
fn code_sums<const G: usize, const W: bool>(w: &[f32; G], a: &[f32; G], lo: f32, inv_step: f32, n_bins: f32) -> CodeSums {
    let (mut sl, mut sll, mut slw) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    for (wc, ac) in w.chunks_exact(LANES).zip(a.chunks_exact(LANES)) {
        for k in 0..LANES {
            let l = code((wc[k] - lo) * inv_step, n_bins);
            let al = weight::<W>(ac[k]) * l;
            sl[k] += al;
            sll[k] += al * l;
            slw[k] += al * wc[k];
        }
    }
    CodeSums { l: lane_sum(sl), ll: lane_sum(sll), lw: lane_sum(slw) }
}

/// Chooses the stored (scale, bias) of one group and writes its codes.
#[inline(always)]
fn search_group<const G: usize, const W: bool>(w: &[f32; G], a: &[f32; G], n_bins: f32, g: &GroupSums, codes: &mut [u8; G]) -> (bf16, bf16) {
    let (lo, hi) = (g.lo, g.hi);
    let minmax = range_params(lo, hi, n_bins);
    let mm = (bf16::from_f32(minmax.0), bf16::from_f32(minmax.1));
    let (s_mm, b_mm) = (mm.0.to_f32(), mm.1.to_f32());
    let range = hi - lo;
    if !(range > 0.0 && range.is_finite() && g.a > 0.0 && g.ww.is_finite()) {
        group_codes(w, minmax.0, minmax.1, n_bins, codes);
        return mm;
    }

    // Candidate clipping ranges, each scored by the error of its own codes under the fitted
    // stored values (an upper bound of the error with the nearest codes for those values).
    let mut ranges = [(lo, hi); 1 + 2 * CLIPS.len()];
    for (k, &f) in CLIPS.iter().enumerate() {
        ranges[1 + 2 * k] = (lo, hi - f * range);
        ranges[2 + 2 * k] = (lo + f * range, hi);
    }
    let mut best = None;
    let mut best_err = f64::INFINITY;
    for (l, h) in ranges {
        let c = code_sums::<G, W>(w, a, l, n_bins / (h - l), n_bins);
        if let Some((s, b)) = g.fit(&c) {
            let e = g.error(&c, s, b);
            if e < best_err {
                (best, best_err) = (Some((s, b)), e);
            }
        }
    }
    let Some(best) = best else {
        group_codes(w, minmax.0, minmax.1, n_bins, codes);
        return mm;
    };
    // Against mlx's min-max result (its own codes, computed from f32 parameters): f32 sums decide
    // unless the two are within their rounding, then f64 sums do.
    nearest_codes(w, best.0, best.1, n_bins, codes);
    let e_best = stored_error::<G, W>(w, a, best.0, best.1, codes);
    let mut mm_codes = [0u8; G];
    group_codes(w, minmax.0, minmax.1, n_bins, &mut mm_codes);
    let e_mm = stored_error::<G, W>(w, a, s_mm, b_mm, &mm_codes);
    const MARGIN: f32 = 1e-4;
    let best_wins = if e_mm > 1e-30 && e_best < e_mm * (1.0 - MARGIN) {
        true
    } else if e_best > 1e-30 && e_mm < e_best * (1.0 - MARGIN) {
        false
    } else {
        exact_error::<G, W>(w, a, best.0, best.1, codes) < exact_error::<G, W>(w, a, s_mm, b_mm, &mm_codes)
    };
    if best_wins {
        (bf16::from_f32(best.0), bf16::from_f32(best.1))
    } else {
        *codes = mm_codes;
        mm
    }
}

/// The nearest codes of a group under (scale, bias), by multiplication with `1/scale`.
#[inline(always)]
fn nearest_codes<const G: usize>(w: &[f32; G], scale: f32, bias: f32, n_bins: f32, codes: &mut [u8; G]) {
    let inv = 1.0 / scale;
    for (c, &x) in codes.iter_mut().zip(w) {
        // An integer in [0, 255]: adding 2^23 puts it in the low mantissa bits.
        *c = (code((x - bias) * inv, n_bins) + 8_388_608.0).to_bits() as u8;
    }
}

/// Weighted squared error of given codes under (scale, bias), summed in f32 lanes.
#[inline(always)]
fn stored_error<const G: usize, const W: bool>(w: &[f32; G], a: &[f32; G], scale: f32, bias: f32, codes: &[u8; G]) -> f32 {
    let mut acc = [0f32; LANES];
    for ((wc, ac), cc) in w.chunks_exact(LANES).zip(a.chunks_exact(LANES)).zip(codes.chunks_exact(LANES)) {
        for k in 0..LANES {
            let d = scale * f32::from(cc[k]) + bias - wc[k];
            acc[k] += weight::<W>(ac[k]) * d * d;
        }
    }
    lane_sum(acc) as f32
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::affine::{dequantize_row, quantize_row, AFFINE_BITS, AFFINE_GROUP_SIZES};

    /// Weighted squared error per group of a quantized row, in f64.
    fn group_errors(row: &[f32], imp: &[f32], q: &(Vec<u8>, Vec<bf16>, Vec<bf16>), bits: u32, gs: usize) -> Vec<f64> {
        let mut back = vec![0f32; row.len()];
        dequantize_row(&q.0, &q.1, &q.2, bits, gs, &mut back);
        row.chunks(gs)
            .zip(back.chunks(gs))
            .zip(imp.chunks(gs))
            .map(|((r, b), a)| r.iter().zip(b).zip(a).map(|((x, y), w)| f64::from(*w) * (f64::from(*y) - f64::from(*x)).powi(2)).sum())
            .collect()
    }

    fn quantize(row: &[f32], imp: Option<&[f32]>, bits: u32, gs: usize, mse: bool) -> (Vec<u8>, Vec<bf16>, Vec<bf16>) {
        let n = row.len() / gs;
        let mut out = (vec![0u8; packed_row_bytes(row.len(), bits)], vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
        if mse {
            quantize_row_mse(row, imp, bits, gs, &mut out.0, &mut out.1, &mut out.2).unwrap();
        } else {
            quantize_row(row, bits, gs, &mut out.0, &mut out.1, &mut out.2).unwrap();
        }
        out
    }

    /// A deterministic pseudo-random stream in [0, 1).
    pub(crate) fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    fn bf16_exact(x: f32) -> f32 {
        bf16::from_f32(x).to_f32()
    }

    /// Rows of the kinds that break quantizers: constants, zeros, one-signed, ties, outliers,
    /// heavy tails, tiny and huge magnitudes, MXFP4-like values.
    fn adversarial_rows(cols: usize) -> Vec<Vec<f32>> {
        let mut rows = Vec::new();
        let mut u = uniform(7);
        for kind in 0..14 {
            let row: Vec<f32> = (0..cols)
                .map(|j| {
                    let r = u();
                    let gauss = (r * std::f32::consts::TAU).cos() * (-2.0 * (u().max(1e-7)).ln()).sqrt();
                    bf16_exact(match kind {
                        0 => 0.0,
                        1 => -0.75,
                        2 => -(gauss.abs()) - 0.01,
                        3 => gauss.abs() * 0.05,
                        4 => (u() * 15.0).round() / 2.0,
                        5 => if j % 16 == 0 { 1.0 } else { (r - 0.5) * 0.1 },
                        6 => gauss * 1e-30,
                        7 => gauss * 1e30,
                        8 => if j % 2 == 0 { 1.0 } else { 1.0078125 },
                        9 => gauss / (u().max(1e-3)).sqrt() * 0.02,
                        10 => if j % 64 < 32 { 0.0 } else { gauss },
                        11 => if j % 32 == 5 { -8.0 } else { gauss * 0.01 },
                        12 => [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0][(u() * 8.0) as usize % 8] * if r < 0.5 { -0.25 } else { 0.25 },
                        _ => 100.0 + gauss * 0.01,
                    })
                })
                .collect();
            rows.push(row);
        }
        rows
    }

    #[test]
    fn never_worse_than_minmax_for_any_group() {
        let cols = 256;
        let rows = adversarial_rows(cols);
        let mut u = uniform(3);
        let importances: Vec<Vec<f32>> = vec![
            vec![1.0; cols],
            (0..cols).map(|_| u() * u() * 10.0).collect(),
            (0..cols).map(|j| if j % 7 == 0 { 0.0 } else { u() }).collect(),
            (0..cols).map(|j| if j % 50 == 0 { 1e4 } else { 1e-3 }).collect(),
        ];
        for row in &rows {
            for imp in &importances {
                for bits in AFFINE_BITS {
                    for gs in AFFINE_GROUP_SIZES {
                        let gs = gs as usize;
                        let mm = group_errors(row, imp, &quantize(row, None, bits, gs, false), bits, gs);
                        let ours = group_errors(row, imp, &quantize(row, Some(imp), bits, gs, true), bits, gs);
                        for (g, (a, b)) in ours.iter().zip(&mm).enumerate() {
                            assert!(a <= b, "bits {bits} gs {gs} group {g}: mse {a} > minmax {b} (row {:?}...)", &row[..4]);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn clearly_better_on_gaussian_and_heavy_tailed_weights() {
        let mut u = uniform(11);
        let cols = 4096;
        let row: Vec<f32> = (0..cols)
            .map(|_| bf16_exact((u() * std::f32::consts::TAU).cos() * (-2.0 * u().max(1e-7).ln()).sqrt() * 0.02))
            .collect();
        let ones = vec![1.0; cols];
        for bits in [2, 3, 4] {
            let mm: f64 = group_errors(&row, &ones, &quantize(&row, None, bits, 64, false), bits, 64).iter().sum();
            let ours: f64 = group_errors(&row, &ones, &quantize(&row, None, bits, 64, true), bits, 64).iter().sum();
            eprintln!("bits {bits}: mse/minmax error {:.3}", ours / mm);
            assert!(ours < 0.85 * mm, "bits {bits}: mse error {ours} vs minmax {mm}");
        }
    }

    #[test]
    fn importance_moves_the_error_to_unimportant_columns() {
        let mut u = uniform(5);
        let cols = 2048;
        let row: Vec<f32> = (0..cols).map(|_| bf16_exact(u() - 0.5)).collect();
        let imp: Vec<f32> = (0..cols).map(|j| if j % 4 == 0 { 100.0 } else { 0.01 }).collect();
        let weighted = group_errors(&row, &imp, &quantize(&row, Some(&imp), 3, 64, true), 3, 64).iter().sum::<f64>();
        let uniform_fit = group_errors(&row, &imp, &quantize(&row, None, 3, 64, true), 3, 64).iter().sum::<f64>();
        assert!(weighted < 0.8 * uniform_fit, "weighted {weighted} vs unweighted {uniform_fit}");
    }

    /// Single-thread speed of both quantizers (`cargo test --release -- --ignored --nocapture speed`).
    #[test]
    #[ignore]
    fn speed() {
        let mut u = uniform(1);
        let cols = 2880;
        let rows: Vec<f32> = (0..cols * 2048).map(|_| bf16_exact((u() - 0.5) * 0.1)).collect();
        let n = rows.len() as f64;
        for (name, mse) in [("minmax", false), ("mse", true)] {
            let t = std::time::Instant::now();
            for row in rows.chunks(cols) {
                std::hint::black_box(quantize(row, None, 3, 64, mse));
            }
            eprintln!("{name}: {:.2} ns/element", t.elapsed().as_secs_f64() * 1e9 / n);
        }
    }

    #[test]
    fn non_finite_is_reported_with_position() {
        let mut row = vec![0.5f32; 128];
        row[77] = f32::NEG_INFINITY;
        let mut packed = vec![0u8; 48];
        let (mut s, mut b) = ([bf16::ZERO; 2], [bf16::ZERO; 2]);
        let e = quantize_row_mse(&row, None, 3, 64, &mut packed, &mut s, &mut b).unwrap_err();
        assert_eq!((e.index, e.value), (77, f32::NEG_INFINITY));
    }

    #[test]
    fn bf16_rounding_is_halfs() {
        for x in [1.0f32, 1.0 + 1.0 / 256.0, -2.5e-3, 3.3e9, 0.0] {
            assert_eq!(to_bf16(x), bf16::from_f32(x).to_f32(), "{x}");
        }
    }
}
