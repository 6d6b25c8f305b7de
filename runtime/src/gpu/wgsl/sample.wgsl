// The next token from the chunk's last logits: the first largest logit (greedy), or with a
// temperature the Gumbel-max trick over logit / T with noise hashed from (seed, counter, id).

struct SampleParams {
    vocab: u32,
    row: u32,    // which logits row holds the last token
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(1) var<uniform> sp: SampleParams;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read_write> next: array<u32>;

var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32) {
    let base = sp.row * sp.vocab;
    var bv = -3.4e38;
    var bi = 0xffffffffu;
    let mix = hash(step.seed ^ hash(step.counter * 0x9e3779b9u));
    for (var i = li; i < sp.vocab; i += 256u) {
        var v = logits[base + i];
        if (step.temperature > 0.0) {
            let u = (f32(hash(mix ^ hash(i + 0x632be5abu)) >> 8u) + 0.5) / 16777216.0;
            v = v / step.temperature - log(-log(u));
        }
        if (bi == 0xffffffffu || v > bv) {
            bv = v;
            bi = i;
        }
    }
    best_v[li] = bv;
    best_i[li] = bi;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride = stride / 2u) {
        if (li < stride) {
            let ov = best_v[li + stride];
            let oi = best_i[li + stride];
            if (oi != 0xffffffffu && (best_i[li] == 0xffffffffu || ov > best_v[li] || (ov == best_v[li] && oi < best_i[li]))) {
                best_v[li] = ov;
                best_i[li] = oi;
            }
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        next[0] = best_i[0];
    }
}
