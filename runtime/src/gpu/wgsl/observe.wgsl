// Calibration statistics of one linear-layer input, added to the session's statistics buffer for
// the tokens of this chunk: Σ x² per channel (GRAM false) or Σ x xᵀ (GRAM true, the full
// width × width matrix). At a token site every row counts; at a routed site (experts > 0) the
// row of token t's slot s, t * row_token + s * row_slot, counts for the expert that slot chose,
// and the channel-0 thread of Σ x² also adds the number of rows each expert got.
// One thread per output entry; each loops over the chunk's rows in order, so a sum is the same
// on every run.

struct ObserveParams {
    width: u32,
    experts: u32,      // 0: a token site
    slots: u32,        // experts per token (routed sites)
    row_token: u32,
    row_slot: u32,
    offset: u32,       // first entry of this site's sums in `stats`
    count_offset: u32, // first entry of its per-expert row counts (routed Σ x²)
    _pad: u32,
}

@group(0) @binding(1) var<uniform> op: ObserveParams;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let idx = gid.x + gid.y * groups.x * 256u;
    let w = op.width;
    var per_expert = w;
    if (GRAM) {
        per_expert = w * w;
    }
    let e = idx / per_expert;
    if (e >= max(op.experts, 1u)) {
        return;
    }
    let r = idx % per_expert;
    var i = r;
    var j = r;
    if (GRAM) {
        i = r / w;
        j = r % w;
    }
    var acc = 0.0;
    var rows = 0u;
    if (op.experts == 0u) {
        for (var t = 0u; t < step.tokens; t++) {
            acc += x[t * w + i] * x[t * w + j];
        }
    } else {
        for (var t = 0u; t < step.tokens; t++) {
            for (var s = 0u; s < op.slots; s++) {
                if (ids[t * op.slots + s] == e) {
                    let row = (t * op.row_token + s * op.row_slot) * w;
                    acc += x[row + i] * x[row + j];
                    rows += 1u;
                }
            }
        }
        if (!GRAM && r == 0u) {
            stats[op.count_offset + e] += f32(rows);
        }
    }
    stats[op.offset + idx] += acc;
}
