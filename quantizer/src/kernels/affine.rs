//! MLX affine group quantization, bit-identical to `mx.quantize` on the CPU.
//!
//! Per group of `group_size` elements: take min and max, `scale = max((max-min)/(2^b-1), 1e-7)`,
//! negated unless the minimum has the larger magnitude; the larger-magnitude edge is snapped to be
//! exactly representable (`scale = edge / rint(edge/scale)`, `bias = edge`) unless it rounds to
//! code 0; codes are `clamp(rint((w - bias)/scale), 0, 2^b-1)`, packed as one little-endian bit
//! stream per row. Scales and biases are stored as bf16 (round to nearest even).

use half::bf16;

pub use mixq_loader::format::{AFFINE_BITS, AFFINE_GROUP_SIZES};

/// A non-finite weight met while quantizing.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("non-finite value {value} at element {index} of the row")]
pub struct NonFinite {
    /// Position within the row.
    pub index: usize,
    /// The offending value.
    pub value: f32,
}

/// Round to nearest, ties to even, as C's `rint` in the default rounding mode; written so that
/// it vectorises on baseline x86-64 (no SSE4.1 `roundps`).
#[inline(always)]
fn rint(x: f32) -> f32 {
    const TWO_23: f32 = 8_388_608.0;
    let a = x.abs();
    // In [2^23, 2^24) f32 spacing is 1, so the sum rounds |x| to an integer, ties to even.
    let r = ((a + TWO_23) - TWO_23).copysign(x);
    // From 2^23 on every f32 is already an integer.
    if a < TWO_23 {
        r
    } else {
        x
    }
}

/// Packed bytes of one row of `cols` elements at `bits` bits.
pub fn packed_row_bytes(cols: usize, bits: u32) -> usize {
    cols * bits as usize / 8
}

/// Defines a public function that runs an `#[inline(always)]` portable body, compiled a second
/// time for AVX2 (8-lane division and rounding) and used where the CPU has it. No FMA is enabled,
/// and Rust never contracts `a * b + c` on its own, so results are bit-identical to the portable
/// build.
macro_rules! avx2_dispatch {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty => $portable:ident;) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}
pub(crate) use avx2_dispatch;

avx2_dispatch! {
    /// Quantizes one row into `packed` (`cols*bits/8` bytes), `scales` and `biases` (`cols/group_size` each).
    pub fn quantize_row(
        row: &[f32],
        bits: u32,
        group_size: usize,
        packed: &mut [u8],
        scales: &mut [bf16],
        biases: &mut [bf16],
    ) -> Result<(), NonFinite> => quantize_row_portable;
}

#[inline(always)]
fn quantize_row_portable(
    row: &[f32],
    bits: u32,
    group_size: usize,
    packed: &mut [u8],
    scales: &mut [bf16],
    biases: &mut [bf16],
) -> Result<(), NonFinite> {
    debug_assert_eq!(row.len() % group_size, 0);
    debug_assert_eq!(packed.len(), packed_row_bytes(row.len(), bits));
    let n_bins = ((1u32 << bits) - 1) as f32;
    let group_bytes = group_size * bits as usize / 8;
    let mut codes = [0u8; 128];
    for (g, ((group, out), (s, b))) in row
        .chunks_exact(group_size)
        .zip(packed.chunks_exact_mut(group_bytes))
        .zip(scales.iter_mut().zip(biases.iter_mut()))
        .enumerate()
    {
        let (scale, bias) = group_params(group, n_bins).map_err(|i| NonFinite { index: g * group_size + i, value: group[i] })?;
        let codes = &mut codes[..group_size];
        group_codes(group, scale, bias, n_bins, codes);
        pack_codes(codes, bits, out);
        *s = bf16::from_f32(scale);
        *b = bf16::from_f32(bias);
    }
    Ok(())
}

/// The codes of one group under (scale, bias): `clamp(rint((w - bias)/scale), 0, n_bins)`, as mlx.
#[inline(always)]
pub(crate) fn group_codes(group: &[f32], scale: f32, bias: f32, n_bins: f32, codes: &mut [u8]) {
    for (c, &w) in codes.iter_mut().zip(group) {
        let q = rint((w - bias) / scale);
        let q = if q < 0.0 { 0.0 } else { q };
        let q = if n_bins < q { n_bins } else { q };
        // q is an integer in [0, 255]: adding 2^23 puts it in the low mantissa bits, which
        // vectorises where a float-to-int cast does not.
        *c = (q + 8_388_608.0).to_bits() as u8;
    }
}

/// The (scale, bias) of one group, in f32 before rounding to bf16; `Err(i)` names a non-finite element.
#[inline(always)]
pub(crate) fn group_params(group: &[f32], n_bins: f32) -> Result<(f32, f32), usize> {
    let (w_min, w_max) = group_range(group)?;
    Ok(range_params(w_min, w_max, n_bins))
}

/// The (min, max) of one group; `Err(i)` names a non-finite element.
#[inline(always)]
fn group_range(group: &[f32]) -> Result<(f32, f32), usize> {
    let mut w_min = f32::INFINITY;
    let mut w_max = f32::NEG_INFINITY;
    let mut poison = 0.0f32;
    for &w in group {
        w_max = if w_max < w { w } else { w_max };
        w_min = if w < w_min { w } else { w_min };
        poison += w * 0.0;
    }
    if poison.is_nan() {
        return Err(group.iter().position(|w| !w.is_finite()).unwrap_or(0));
    }
    Ok((w_min, w_max))
}

/// mlx's (scale, bias) for a group ranging over `[w_min, w_max]`, in f32.
#[inline(always)]
pub(crate) fn range_params(w_min: f32, w_max: f32, n_bins: f32) -> (f32, f32) {
    let mask = w_min.abs() > w_max.abs();
    let mut scale = (w_max - w_min) / n_bins;
    scale = if scale < 1e-7 { 1e-7 } else { scale };
    scale = if mask { scale } else { -scale };
    let edge = if mask { w_min } else { w_max };
    let q0 = (edge / scale).round_ties_even();
    let mut bias = 0.0;
    if q0 != 0.0 {
        scale = edge / q0;
        bias = edge;
    }
    (scale, bias)
}

/// Packs codes (each < 2^bits) as a little-endian bit stream; `codes.len()` is a multiple of 8.
#[inline(always)]
pub fn pack_codes(codes: &[u8], bits: u32, out: &mut [u8]) {
    let b = bits as usize;
    for (eight, dst) in codes.chunks_exact(8).zip(out.chunks_exact_mut(b)) {
        let mut word = 0u64;
        for (k, &c) in eight.iter().enumerate() {
            word |= u64::from(c) << (k * b);
        }
        dst.copy_from_slice(&word.to_le_bytes()[..b]);
    }
}

/// Reads code `i` of a packed row.
pub fn unpack_code(packed: &[u8], bits: u32, i: usize) -> u32 {
    let bit = i * bits as usize;
    let mut v = 0u32;
    for k in 0..bits as usize {
        let p = bit + k;
        v |= u32::from((packed[p / 8] >> (p % 8)) & 1) << k;
    }
    v
}

/// Dequantizes one packed row (`scale*q + bias` in f32, as `mx.dequantize`).
pub fn dequantize_row(packed: &[u8], scales: &[bf16], biases: &[bf16], bits: u32, group_size: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        let g = i / group_size;
        *o = scales[g].to_f32() * unpack_code(packed, bits, i) as f32 + biases[g].to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rint_matches_round_ties_even() {
        let mut x = -300.0f32;
        while x < 300.0 {
            assert_eq!(rint(x), x.round_ties_even(), "{x}");
            x += 0.125;
        }
        for x in [0.5f32, 1.5, 2.5, -0.5, -2.5, 1e7, -3e9, 4_194_303.5, 8_388_607.5, 0.49999997] {
            assert_eq!(rint(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn pack_round_trips_every_width() {
        for bits in AFFINE_BITS {
            let codes: Vec<u8> = (0..64).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
            let mut out = vec![0u8; packed_row_bytes(64, bits)];
            pack_codes(&codes, bits, &mut out);
            for (i, &c) in codes.iter().enumerate() {
                assert_eq!(unpack_code(&out, bits, i), u32::from(c), "bits {bits} code {i}");
            }
        }
    }

    #[test]
    fn quantize_error_is_bounded_and_edges_exact() {
        let row: Vec<f32> = (0..128).map(|i| bf16::from_f32(((i as f32) * 0.37).sin() * 0.1).to_f32()).collect();
        for bits in AFFINE_BITS {
            let mut packed = vec![0u8; packed_row_bytes(128, bits)];
            let (mut s, mut b) = (vec![bf16::ZERO; 2], vec![bf16::ZERO; 2]);
            quantize_row(&row, bits, 64, &mut packed, &mut s, &mut b).unwrap();
            let mut back = vec![0f32; 128];
            dequantize_row(&packed, &s, &b, bits, 64, &mut back);
            let step = 0.2 / ((1u32 << bits) - 1) as f32;
            for (a, r) in back.iter().zip(&row) {
                assert!((a - r).abs() <= step + 1e-3, "bits {bits}: {a} vs {r}");
            }
        }
    }

    #[test]
    fn dispatched_and_portable_paths_agree() {
        let row: Vec<f32> = (0..256).map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) * 0.013).to_f32()).collect();
        for bits in AFFINE_BITS {
            for gs in [32usize, 64, 128] {
                let n = 256 / gs;
                let mut a = (vec![0u8; packed_row_bytes(256, bits)], vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
                let mut b = a.clone();
                quantize_row(&row, bits, gs, &mut a.0, &mut a.1, &mut a.2).unwrap();
                quantize_row_portable(&row, bits, gs, &mut b.0, &mut b.1, &mut b.2).unwrap();
                assert_eq!(a, b, "bits {bits} gs {gs}");
            }
        }
    }

    #[test]
    fn non_finite_is_reported_with_position() {
        let mut row = vec![0.5f32; 64];
        row[37] = f32::NAN;
        let mut packed = vec![0u8; 32];
        let (mut s, mut b) = ([bf16::ZERO], [bf16::ZERO]);
        let e = quantize_row(&row, 4, 64, &mut packed, &mut s, &mut b).unwrap_err();
        assert_eq!(e.index, 37);
        row[37] = f32::INFINITY;
        assert_eq!(quantize_row(&row, 4, 64, &mut packed, &mut s, &mut b).unwrap_err().index, 37);
    }
}
