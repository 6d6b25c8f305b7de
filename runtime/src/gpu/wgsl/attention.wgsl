// Attention of one query head at one position over the KV cache, with the head's sink logit and
// an optional sliding window; an online softmax over tiles of 64 positions.

struct AttnParams {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    capacity: u32,
    window: u32,     // 0: full attention
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(1) var<uniform> ap: AttnParams;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> k_cache: array<f32>;
@group(0) @binding(4) var<storage, read> v_cache: array<f32>;
@group(0) @binding(5) var<storage, read> sinks: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;
const MAX_DIMS: u32 = 4u; // head_dim <= 256

var<workgroup> qs: array<f32, 256>;
var<workgroup> scores: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let head = wid.x;
    let t = wid.y;
    let hd = ap.head_dim;
    let kvh = head / (ap.heads / ap.kv_heads);
    let pos = step.pos0 + t;
    var lo = 0u;
    if (ap.window > 0u && pos + 1u > ap.window) {
        lo = pos + 1u - ap.window;
    }
    for (var d = li; d < hd; d += WG) {
        qs[d] = q[(t * ap.heads + head) * hd + d];
    }
    workgroupBarrier();
    var m = sinks[head];
    var l = 1.0;
    var acc: array<f32, MAX_DIMS>;
    for (var start = lo; start <= pos; start += WG) {
        let p = start + li;
        var s = -3.0e38;
        if (p <= pos) {
            let kb = ((p % ap.capacity) * ap.kv_heads + kvh) * hd;
            var dot = 0.0;
            for (var d = 0u; d < hd; d++) {
                dot += qs[d] * k_cache[kb + d];
            }
            s = dot * ap.scale;
        }
        scores[li] = s;
        workgroupBarrier();
        let n = min(WG, pos + 1u - start);
        var tile_max = m;
        for (var i = 0u; i < n; i++) {
            tile_max = max(tile_max, scores[i]);
        }
        workgroupBarrier();
        if (li < n) {
            scores[li] = exp(s - tile_max);
        }
        workgroupBarrier();
        let correction = exp(m - tile_max);
        l = l * correction;
        for (var j = 0u; j < MAX_DIMS; j++) {
            acc[j] = acc[j] * correction;
        }
        for (var i = 0u; i < n; i++) {
            let w = scores[i];
            l += w;
            let vb = (((start + i) % ap.capacity) * ap.kv_heads + kvh) * hd;
            for (var j = 0u; j < MAX_DIMS; j++) {
                let d = li + j * WG;
                if (d < hd) {
                    acc[j] += w * v_cache[vb + d];
                }
            }
        }
        m = tile_max;
        workgroupBarrier();
    }
    for (var j = 0u; j < MAX_DIMS; j++) {
        let d = li + j * WG;
        if (d < hd) {
            out[(t * ap.heads + head) * hd + d] = acc[j] / l;
        }
    }
}
