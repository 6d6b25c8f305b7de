// Per token: the k experts with the largest router logits (the lower id first on ties) and a
// softmax over those k logits.

struct RouterParams {
    experts: u32,
    k: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(1) var<uniform> rt: RouterParams;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read_write> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> weights: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    if (t >= step.tokens) {
        return;
    }
    let base = t * rt.experts;
    var chosen: array<u32, 32>;
    var vals: array<f32, 32>;
    for (var j = 0u; j < rt.k; j++) {
        var best = 0xffffffffu;
        var best_v = 0.0;
        for (var e = 0u; e < rt.experts; e++) {
            var taken = false;
            for (var i = 0u; i < j; i++) {
                taken = taken || chosen[i] == e;
            }
            let v = logits[base + e];
            if (!taken && (best == 0xffffffffu || v > best_v)) {
                best = e;
                best_v = v;
            }
        }
        chosen[j] = best;
        vals[j] = best_v;
    }
    var sum = 0.0;
    let top = vals[0];
    for (var j = 0u; j < rt.k; j++) {
        vals[j] = exp(vals[j] - top);
        sum += vals[j];
    }
    for (var j = 0u; j < rt.k; j++) {
        ids[t * rt.k + j] = chosen[j];
        weights[t * rt.k + j] = vals[j] / sum;
    }
}
