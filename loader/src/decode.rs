//! Decoding stored numbers to f32: BF16, F16, F32 and MXFP4 (FP4 E2M1 codes with E8M0 scales).

use half::f16;

use crate::dtype::FloatDtype;
use crate::format::MXFP4_BLOCK;

/// The 16 FP4 E2M1 values, by code.
pub const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Decodes little-endian BF16 bytes into f32 (`out.len()` elements).
#[inline]
pub fn bf16_to_f32(bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * 2);
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f32::from_bits((u32::from(u16::from_le_bytes([b[0], b[1]]))) << 16);
    }
}

/// Decodes little-endian floats of type `dtype` into f32 (`out.len()` elements); every BF16 and
/// F16 value is exact in f32.
#[inline]
pub fn floats_to_f32(dtype: FloatDtype, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    match dtype {
        FloatDtype::BF16 => bf16_to_f32(bytes, out),
        FloatDtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        FloatDtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// Element `i` of little-endian floats of type `dtype`, as f32.
#[inline(always)]
pub fn float_at(dtype: FloatDtype, bytes: &[u8], i: usize) -> f32 {
    match dtype {
        FloatDtype::BF16 => f32::from_bits(u32::from(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])) << 16),
        FloatDtype::F16 => f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
        FloatDtype::F32 => f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]),
    }
}

/// The value of an E8M0 scale byte, 2^(s-127); 255 is NaN.
#[inline]
pub fn e8m0_to_f32(s: u8) -> f32 {
    match s {
        0 => f32::from_bits(0x0040_0000),
        255 => f32::NAN,
        s => f32::from_bits(u32::from(s) << 23),
    }
}

/// Decodes one MXFP4 row: `blocks` holds cols/2 bytes (low nibble = even element), `scales` cols/32 bytes.
#[inline]
pub fn mxfp4_row_to_f32(blocks: &[u8], scales: &[u8], out: &mut [f32]) {
    debug_assert_eq!(blocks.len() * 2, out.len());
    debug_assert_eq!(scales.len() * MXFP4_BLOCK, out.len());
    for ((o, b), &s) in out
        .chunks_exact_mut(MXFP4_BLOCK)
        .zip(blocks.chunks_exact(MXFP4_BLOCK / 2))
        .zip(scales)
    {
        let scale = e8m0_to_f32(s);
        for (pair, &byte) in o.chunks_exact_mut(2).zip(b) {
            pair[0] = FP4_VALUES[usize::from(byte & 0x0f)] * scale;
            pair[1] = FP4_VALUES[usize::from(byte >> 4)] * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trips_known_values() {
        let vals = [1.0f32, -2.5, 0.0, 3.140625];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
        let mut out = [0f32; 4];
        bf16_to_f32(&bytes, &mut out);
        assert_eq!(out, vals);
    }

    #[test]
    fn every_float_type_decodes_to_the_same_values() {
        // Values exact in all three types, written by `half` (an independent encoder).
        let vals = [1.0f32, -2.5, 0.0, 3.140625, -0.0078125, 57344.0];
        for dtype in FloatDtype::ALL {
            let bytes: Vec<u8> = vals
                .iter()
                .flat_map(|&v| match dtype {
                    FloatDtype::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                    FloatDtype::F16 => f16::from_f32(v).to_le_bytes().to_vec(),
                    FloatDtype::F32 => v.to_le_bytes().to_vec(),
                })
                .collect();
            let mut out = [0f32; 6];
            floats_to_f32(dtype, &bytes, &mut out);
            assert_eq!(out, vals, "{dtype}");
            let one_by_one: Vec<f32> = (0..vals.len()).map(|i| float_at(dtype, &bytes, i)).collect();
            assert_eq!(one_by_one, vals, "{dtype}");
        }
    }

    #[test]
    fn mxfp4_low_nibble_is_even_element() {
        let mut blocks = [0u8; 16];
        blocks[0] = 0x72; // element 0: code 2 (1.0), element 1: code 7 (6.0)
        blocks[15] = 0x9f; // element 30: code 15 (-6.0), element 31: code 9 (-0.5)
        let scales = [128u8]; // 2^1
        let mut out = [0f32; 32];
        mxfp4_row_to_f32(&blocks, &scales, &mut out);
        assert_eq!(out[0], 2.0);
        assert_eq!(out[1], 12.0);
        assert_eq!(out[30], -12.0);
        assert_eq!(out[31], -1.0);
        assert_eq!(out[2], 0.0);
    }

    #[test]
    fn e8m0_extremes() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert!(e8m0_to_f32(255).is_nan());
    }
}
