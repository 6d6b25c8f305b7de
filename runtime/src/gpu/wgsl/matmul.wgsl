// y = W x (+ bias) for a chunk of tokens. Dense products take a tile of TILE tokens per
// workgroup (each decoded weight chunk is reused across the tile); expert products take one
// (token, slot) pair per workgroup, with the expert id read from `route` on the GPU.
// Each workgroup covers ROWS rows with LANES lanes per row; a lane decodes 32 columns at a time.

@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read> x: array<f32>;
@group(0) @binding(7) var<storage, read_write> y: array<f32>;
@group(0) @binding(8) var<storage, read> route: array<u32>;

const LANES: u32 = 32u;
const ROWS: u32 = 8u;
const TILE: u32 = select(8u, 1u, EXPERTS);

var<workgroup> partial: array<f32, 2048>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let lane = li % LANES;
    let r = p.row_base + wid.x * ROWS + li / LANES;
    var n_tokens = step.tokens;
    if (p.x_last == 1u) {
        n_tokens = 1u;
    }
    var t0 = wid.y * TILE;
    var n = min(TILE, n_tokens - min(t0, n_tokens));
    var logical = r;
    var expert = 0u;
    if (EXPERTS) {
        n = select(0u, 1u, wid.y < n_tokens * p.slots);
        expert = route[min(wid.y, n_tokens * p.slots - 1u)];
        logical = expert * p.rows + r;
    }
    let s = stored_row(logical);
    let live = r < p.rows && n > 0u && in_part(s);
    let ls = s - p.part_first;
    var acc: array<f32, TILE>;
    if (live) {
        var vals: array<f32, 32>;
        let chunks = p.cols / 32u;
        for (var c = lane; c < chunks; c += LANES) {
            decode_chunk(ls, c, &vals);
            for (var t = 0u; t < TILE; t++) {
                if (t < n) {
                    var xi = t0 + t;
                    if (EXPERTS) {
                        xi = select(wid.y / p.slots, wid.y, p.x_per_slot == 1u);
                    } else if (p.x_last == 1u) {
                        xi = step.tokens - 1u;
                    }
                    let xb = xi * p.x_stride + c * 32u;
                    var sum = 0.0;
                    for (var i = 0u; i < 32u; i++) {
                        sum += vals[i] * x[xb + i];
                    }
                    acc[t] += sum;
                }
            }
        }
    }
    for (var t = 0u; t < TILE; t++) {
        partial[li * TILE + t] = acc[t];
    }
    workgroupBarrier();
    for (var stride = LANES / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            for (var t = 0u; t < TILE; t++) {
                partial[li * TILE + t] += partial[(li + stride) * TILE + t];
            }
        }
        workgroupBarrier();
    }
    if (lane == 0u && live) {
        for (var t = 0u; t < TILE; t++) {
            if (t < n) {
                var v = partial[li * TILE + t];
                var yi = (t0 + t) * p.y_stride + r;
                if (EXPERTS) {
                    yi = wid.y * p.y_stride + r;
                    if (p.has_bias == 1u) {
                        v += bias[expert * p.rows + r];
                    }
                } else if (p.has_bias == 1u) {
                    v += bias[r];
                }
                if (p.accumulate == 1u) {
                    y[yi] = y[yi] + v;
                } else {
                    y[yi] = v;
                }
            }
        }
    }
}
