// Packed weight storage and its decoding, shared by the kernels that read checkpoint weights.
// The prelude defines FORMAT (0 unquantized, 1 affine, 2 mxfp4), BITS, GROUP and WIDE (unquantized
// values, scales and biases stored as f32 words rather than packed bf16 pairs).


// Where one part of a (possibly split) weight tensor lives, and how rows are addressed.
struct WeightParams {
    rows: u32,        // logical rows (per expert for expert products)
    cols: u32,
    row_words: u32,   // u32 words of codes per stored row
    groups: u32,      // scales per stored row
    map_per: u32,     // row map: stored = (r / per) * src_per + start + (r % per) * step
    map_src_per: u32,
    map_start: u32,
    map_step: u32,
    part_first: u32,  // first stored row held by this part's buffers
    part_rows: u32,   // stored rows held by this part
    row_base: u32,    // first logical row of this dispatch
    x_stride: u32,    // floats between input vectors
    y_stride: u32,    // floats between output vectors
    accumulate: u32,  // 1: add into y instead of overwriting
    slots: u32,       // experts per token (expert products)
    x_per_slot: u32,  // expert input is per (token, slot) rather than per token
    has_bias: u32,
    x_last: u32,      // dense: read only the chunk's last input vector
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(1) var<uniform> p: WeightParams;
@group(0) @binding(2) var<storage, read> codes: array<u32>;
@group(0) @binding(3) var<storage, read> scales: array<u32>;
@group(0) @binding(4) var<storage, read> biases: array<u32>;

const MASK: u32 = (1u << BITS) - 1u;

fn stored_row(r: u32) -> u32 {
    return (r / p.map_per) * p.map_src_per + p.map_start + (r % p.map_per) * p.map_step;
}

fn bf16_in(words_index: u32, which: u32) -> f32 {
    return bitcast<f32>(select(words_index << 16u, words_index & 0xffff0000u, which == 1u));
}

fn group_scale(i: u32) -> f32 {
    if (WIDE) {
        return bitcast<f32>(scales[i]);
    }
    return bf16_in(scales[i >> 1u], i & 1u);
}

fn group_bias(i: u32) -> f32 {
    if (WIDE) {
        return bitcast<f32>(biases[i]);
    }
    return bf16_in(biases[i >> 1u], i & 1u);
}

fn e8m0(i: u32) -> f32 {
    let e = (scales[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
    if (e == 0u) {
        return bitcast<f32>(0x00400000u);
    }
    if (e == 255u) {
        return bitcast<f32>(0x7fc00000u);
    }
    return bitcast<f32>(e << 23u);
}

fn fp4(code: u32) -> f32 {
    let m = code & 7u;
    let e = m >> 1u;
    let mant = f32(m & 1u);
    let mag = select(mant * 0.5, (1.0 + 0.5 * mant) * f32(1u << (max(e, 1u) - 1u)), e > 0u);
    return select(mag, -mag, (code & 8u) != 0u);
}

// The 32 values of chunk `c` (columns 32c..32c+32) of local stored row `ls`.
fn decode_chunk(ls: u32, c: u32, vals: ptr<function, array<f32, 32>>) {
    if (FORMAT == 0u && WIDE) {
        let base = ls * p.row_words + c * 32u;
        for (var k = 0u; k < 32u; k++) {
            (*vals)[k] = bitcast<f32>(codes[base + k]);
        }
    } else if (FORMAT == 0u) {
        let base = ls * p.row_words + c * 16u;
        for (var k = 0u; k < 16u; k++) {
            let w = codes[base + k];
            (*vals)[2u * k] = bitcast<f32>(w << 16u);
            (*vals)[2u * k + 1u] = bitcast<f32>(w & 0xffff0000u);
        }
    } else if (FORMAT == 1u) {
        let base = ls * p.row_words + c * BITS;
        var w: array<u32, 9>;
        for (var k = 0u; k < BITS; k++) {
            w[k] = codes[base + k];
        }
        w[BITS] = 0u;
        let g = ls * p.groups + (c * 32u) / GROUP;
        let scale = group_scale(g);
        let bias = group_bias(g);
        for (var i = 0u; i < 32u; i++) {
            let bit = i * BITS;
            let sh = bit & 31u;
            var q = w[bit >> 5u] >> sh;
            if (sh + BITS > 32u) {
                q = q | (w[(bit >> 5u) + 1u] << (32u - sh));
            }
            (*vals)[i] = scale * f32(q & MASK) + bias;
        }
    } else {
        let base = ls * p.row_words + c * 4u;
        let scale = e8m0(ls * p.groups + c);
        for (var k = 0u; k < 4u; k++) {
            let w = codes[base + k];
            for (var n = 0u; n < 8u; n++) {
                (*vals)[8u * k + n] = fp4((w >> (4u * n)) & 15u) * scale;
            }
        }
    }
}

// One value: column `col` of local stored row `ls`.
fn decode_value(ls: u32, col: u32) -> f32 {
    if (FORMAT == 0u && WIDE) {
        return bitcast<f32>(codes[ls * p.cols + col]);
    } else if (FORMAT == 0u) {
        let i = ls * p.cols + col;
        return bf16_in(codes[i >> 1u], i & 1u);
    } else if (FORMAT == 1u) {
        let bit = col * BITS;
        let base = ls * p.row_words + (bit >> 5u);
        let sh = bit & 31u;
        var q = codes[base] >> sh;
        if (sh + BITS > 32u) {
            q = q | (codes[base + 1u] << (32u - sh));
        }
        let g = ls * p.groups + col / GROUP;
        return group_scale(g) * f32(q & MASK) + group_bias(g);
    } else {
        let w = codes[ls * p.row_words + (col >> 3u)];
        return fp4((w >> (4u * (col & 7u))) & 15u) * e8m0(ls * p.groups + (col >> 5u));
    }
}

// Whether stored row `s` lies in this part.
fn in_part(s: u32) -> bool {
    return s >= p.part_first && s < p.part_first + p.part_rows;
}
