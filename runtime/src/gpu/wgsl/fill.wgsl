// Synthetic weights made in GPU memory: random codes, small bf16 scales and biases, or E8M0
// scales near 2^-5, hashed from (seed, index). Used to time shapes whose files do not exist.

struct FillParams {
    words: u32,
    kind: u32,    // 0 codes, 1 bf16 scales, 2 bf16 biases, 3 e8m0 bytes, 4 bf16 weights
    seed: u32,
    offset: u32,  // first word (fills run in slices of at most 65535 * 256 words)
}

@group(0) @binding(1) var<uniform> fp: FillParams;
@group(0) @binding(2) var<storage, read_write> data: array<u32>;

fn small_bf16(h: u32, lo: f32, hi: f32) -> u32 {
    let u = f32(h & 0xffffu) / 65535.0;
    return bitcast<u32>(lo + (hi - lo) * u) >> 16u;
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = fp.offset + gid.x;
    if (i >= fp.words) {
        return;
    }
    let h = hash(i ^ hash(fp.seed));
    var w = h;
    if (fp.kind == 1u) {
        w = small_bf16(h, 0.002, 0.01) | (small_bf16(h >> 16u, 0.002, 0.01) << 16u);
    } else if (fp.kind == 2u) {
        w = small_bf16(h, -0.02, 0.02) | (small_bf16(h >> 16u, -0.02, 0.02) << 16u);
    } else if (fp.kind == 3u) {
        w = 0x7a7a7a7au + (h & 0x03030303u);
    } else if (fp.kind == 4u) {
        w = small_bf16(h, -0.03, 0.03) | (small_bf16(h >> 16u, -0.03, 0.03) << 16u);
    }
    data[i] = w;
}
