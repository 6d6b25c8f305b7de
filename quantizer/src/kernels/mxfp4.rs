//! MLX MXFP4 encoding (`mode: mxfp4`, group 32), byte-identical to `mx.quantize(w, group_size=32,
//! bits=4, mode="mxfp4")` of mlx 0.32.4 on the CPU, for dense expert weights that a recipe keeps
//! as MXFP4.
//!
//! mlx's rules (`fp_quantize` in mlx/ops.cpp, with "Round MX block scales up to avoid
//! saturation"; confirmed against mlx by `tests/interop/test_mxfp4_interop.py`), per group of 32:
//! - `d = max|w| / 6`, computed in the tensor's own float type (bf16 and f16 round the quotient,
//!   which changes the scale only in the type's subnormal range);
//! - the scale exponent is `e = ceil(log2 d)`, the smallest power of two `>= d` (mlx rounds
//!   `log2 d` and adds one where `2^e < d`), stored as the E8M0 byte `e + 127`; a zero `d` gives
//!   `e = 0` (byte 127);
//! - each `w / 2^e` (exact) gets the E2M1 code of its nearest value, ties to the smaller
//!   magnitude (mlx takes the first minimum of `|w/2^e - lut|` over 0, .5, 1, 1.5, 2, 3, 4, 6, -0,
//!   -.5, ...), so anything that rounds to zero is code 0, never the -0 code 8, and magnitudes
//!   above 6 saturate to 6;
//! - codes are packed two per byte, the even element in the low nibble (one little-endian
//!   `uint32` per 8 codes), exactly the upstream `*_blocks` layout.
//!
//! Where mlx would store garbage, this refuses: a NaN or infinity (mlx writes scale 128 and all
//! codes 0), and a group whose `d` is below 2^-127 (mlx's `e + 127` wraps around the byte).

use mixq_loader::format::MXFP4_BLOCK;
use mixq_loader::FloatDtype;

/// Why a row cannot be encoded as MXFP4.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum Mxfp4Error {
    /// A NaN or infinity in the row.
    #[error("non-finite value {value} at element {index} of the row")]
    NonFinite {
        /// Position within the row.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A group so small that its scale is below E8M0's smallest, 2^-127.
    #[error("the group at element {index} has max |w| = {amax:e}, below 6 * 2^-127: no E8M0 scale holds it (mx.quantize would wrap the scale byte)")]
    ScaleUnderflow {
        /// First element of the group.
        index: usize,
        /// The group's largest magnitude.
        amax: f32,
    },
    /// The row or the output buffers do not have the sizes MXFP4 needs.
    #[error("a row of {cols} values needs a multiple of 32 values, {} code bytes and {} scale bytes; got {blocks} and {scales}", cols / 2, cols / MXFP4_BLOCK)]
    Size {
        /// Row length.
        cols: usize,
        /// Code bytes given.
        blocks: usize,
        /// Scale bytes given.
        scales: usize,
    },
}

/// Encodes one row whose values are exact in `precision` (the source tensor's float type) into
/// `cols/2` code bytes and `cols/32` E8M0 scale bytes, as `mx.quantize(mode="mxfp4")` does.
pub fn encode_row(row: &[f32], precision: FloatDtype, blocks: &mut [u8], scales: &mut [u8]) -> Result<(), Mxfp4Error> {
    let cols = row.len();
    if !cols.is_multiple_of(MXFP4_BLOCK) || blocks.len() * 2 != cols || scales.len() * MXFP4_BLOCK != cols {
        return Err(Mxfp4Error::Size { cols, blocks: blocks.len(), scales: scales.len() });
    }
    if let Some(index) = row.iter().position(|v| !v.is_finite()) {
        return Err(Mxfp4Error::NonFinite { index, value: row[index] });
    }
    for (g, ((group, codes), scale)) in row
        .chunks_exact(MXFP4_BLOCK)
        .zip(blocks.chunks_exact_mut(MXFP4_BLOCK / 2))
        .zip(scales.iter_mut())
        .enumerate()
    {
        let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
        let e = scale_exponent(amax, precision).ok_or(Mxfp4Error::ScaleUnderflow { index: g * MXFP4_BLOCK, amax })?;
        *scale = (e + 127) as u8;
        let step = pow2(e);
        for (byte, pair) in codes.iter_mut().zip(group.chunks_exact(2)) {
            *byte = e2m1_code(pair[0] / step) | (e2m1_code(pair[1] / step) << 4);
        }
    }
    Ok(())
}

/// The group's scale exponent `ceil(log2(max|w| / 6))` with the quotient rounded to `precision`
/// (0 for a zero quotient); `None` below E8M0's range.
fn scale_exponent(amax: f32, precision: FloatDtype) -> Option<i32> {
    let d = match precision {
        FloatDtype::BF16 => half::bf16::from_f32(amax / 6.0).to_f32(),
        FloatDtype::F16 => half::f16::from_f32(amax / 6.0).to_f32(),
        FloatDtype::F32 => amax / 6.0,
    };
    if d == 0.0 {
        return Some(0);
    }
    let e = ceil_log2(d);
    (-127..=127).contains(&e).then_some(e)
}

/// `ceil(log2 d)` of a positive finite f32, exactly (from its bits).
fn ceil_log2(d: f32) -> i32 {
    let bits = d.to_bits();
    let (exp, man) = ((bits >> 23) & 0xff, bits & 0x7f_ffff);
    if exp == 0 {
        // Subnormal: d = man * 2^-149.
        let floor = 31 - man.leading_zeros() as i32 - 149;
        floor + i32::from(!man.is_power_of_two())
    } else {
        exp as i32 - 127 + i32::from(man != 0)
    }
}

/// 2^e as f32, for e in -127..=127 (2^-127 is subnormal).
fn pow2(e: i32) -> f32 {
    if e >= -126 {
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        f32::from_bits(1 << (e + 149))
    }
}

/// The E2M1 code nearest `q`, ties to the smaller magnitude, zero as code 0.
fn e2m1_code(q: f32) -> u8 {
    const UPPER: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];
    let a = q.abs();
    let m = UPPER.iter().position(|&t| a <= t).unwrap_or(UPPER.len()) as u8;
    if m != 0 && q < 0.0 {
        m | 8
    } else {
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One group of 32: `head` then zeros.
    fn group(head: &[f32]) -> Vec<f32> {
        let mut g = head.to_vec();
        g.resize(32, 0.0);
        g
    }

    fn encode(row: &[f32], precision: FloatDtype) -> (Vec<u8>, Vec<u8>) {
        let (mut b, mut s) = (vec![0u8; row.len() / 2], vec![0u8; row.len() / 32]);
        encode_row(row, precision, &mut b, &mut s).unwrap();
        (b, s)
    }

    #[test]
    fn known_codes_and_scales() {
        // max 6 at scale 2^0: every E2M1 value is its own code, ties go to the smaller magnitude,
        // and anything rounding to zero (including -0.0 and -0.25) is code 0. Hand-derived.
        let head = [6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, -6.0, -0.5, 0.25, -0.25, 0.75, -0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.0, 0.26, 7.0];
        let (b, s) = encode(&group(&head), FloatDtype::F32);
        // 7.0 makes max/6 = 7/6, so the scale rounds up to 2^1: half of every value.
        assert_eq!(s, [128]);
        let codes: Vec<u8> = b.iter().flat_map(|x| [x & 15, x >> 4]).collect();
        // At scale 2: 3, .25, .5, .75, 1, 1.5, 2, -3, -.25, .125, -.125, .375, -.375, .625, .875, 1.25, 1.75, 2.5, -2.5, -0, .13, 3.5
        assert_eq!(&codes[..22], &[5, 0, 1, 1, 2, 3, 4, 13, 0, 0, 0, 1, 9, 1, 2, 2, 3, 4, 12, 0, 0, 5]);
        assert!(codes[22..].iter().all(|&c| c == 0));

        let (b, s) = encode(&group(&head[..21]), FloatDtype::F32);
        assert_eq!(s, [127]);
        let codes: Vec<u8> = b.iter().flat_map(|x| [x & 15, x >> 4]).collect();
        assert_eq!(&codes[..21], &[7, 1, 2, 3, 4, 5, 6, 15, 9, 0, 0, 1, 9, 2, 3, 4, 5, 6, 14, 0, 1]);
        // Low nibble is the even element: 6.0 (code 7) then 0.5 (code 1).
        assert_eq!(b[0], 0x17);
    }

    #[test]
    fn scale_is_the_smallest_power_of_two_at_least_max_over_6() {
        // max 4 * 2^k keeps 2^k (4/6 rounds up to 1); max 3 * 2^k is exactly 2^(k-1); a max just
        // above 6 * 2^k needs 2^(k+1); an all-zero group has scale byte 127.
        for (max, byte) in [(4.0, 127u8), (3.0, 126), (1.0, 125), (6.0, 127), (6.0000005, 128), (48.0, 130), (0.0, 127), (6.0 * 2f64.powi(-127) as f32, 0)] {
            assert_eq!(encode(&group(&[max]), FloatDtype::F32).1, [byte], "max {max}");
        }
        // The quotient is rounded to the tensor's type: f16's smallest subnormal, 2^-24, over 6
        // rounds to 0 in f16 (scale 2^0, code 0) but is 2^-26.6 in f32 (scale 2^-26, 4 = code 6).
        let x = 2f32.powi(-24);
        assert_eq!(encode(&group(&[x]), FloatDtype::F16), (vec![0; 16], vec![127]));
        let (b, s) = encode(&group(&[x]), FloatDtype::F32);
        assert_eq!((b[0], s[0]), (6, 101));
    }

    #[test]
    fn subnormal_groups() {
        // Smallest f32 subnormal max: d rounds to 0 in f32 and bf16, so scale 2^0 and codes 0.
        let tiny = f32::from_bits(1);
        assert_eq!(encode(&group(&[tiny]), FloatDtype::F32), (vec![0; 16], vec![127]));
        // 6 * 2^-127 is the smallest max with a scale; anything smaller but non-zero in d is refused.
        let err = encode_row(&group(&[3.0 * 2f64.powi(-127) as f32]), FloatDtype::F32, &mut [0; 16], &mut [0; 1]);
        assert_eq!(err, Err(Mxfp4Error::ScaleUnderflow { index: 0, amax: 3.0 * 2f64.powi(-127) as f32 }));
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut row = group(&[1.0]);
        row[5] = f32::NAN;
        assert!(matches!(encode_row(&row, FloatDtype::BF16, &mut [0; 16], &mut [0; 1]), Err(Mxfp4Error::NonFinite { index: 5, .. })));
        row[5] = f32::NEG_INFINITY;
        assert!(matches!(encode_row(&row, FloatDtype::BF16, &mut [0; 16], &mut [0; 1]), Err(Mxfp4Error::NonFinite { index: 5, .. })));
        assert!(matches!(encode_row(&row[..31], FloatDtype::BF16, &mut [0; 16], &mut [0; 1]), Err(Mxfp4Error::Size { cols: 31, .. })));
    }

    #[test]
    fn ceil_log2_is_exact() {
        for e in -149..=127 {
            let p = 2f64.powi(e) as f32;
            assert_eq!(ceil_log2(p), e, "2^{e}");
            if e < 127 {
                assert_eq!(ceil_log2(f32::from_bits(p.to_bits() + 1)), e + 1, "just above 2^{e}");
            }
        }
    }
}
