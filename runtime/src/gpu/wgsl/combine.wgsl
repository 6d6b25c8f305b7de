// x[t] += sum over the token's experts (in ascending expert id) of weight * expert output.

struct CombineParams {
    width: u32,   // hidden size
    slots: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(1) var<uniform> cp: CombineParams;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read> down: array<f32>;
@group(0) @binding(5) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= step.tokens * cp.width) {
        return;
    }
    let t = i / cp.width;
    let r = i % cp.width;
    var acc = 0.0;
    var last = -1;
    for (var n = 0u; n < cp.slots; n++) {
        // The slot with the smallest expert id above the last one taken.
        var pick = 0u;
        var pick_id = -1;
        for (var j = 0u; j < cp.slots; j++) {
            let e = i32(ids[t * cp.slots + j]);
            if (e > last && (pick_id < 0 || e < pick_id)) {
                pick = j;
                pick_id = e;
            }
        }
        last = pick_id;
        let q = t * cp.slots + pick;
        acc += weights[q] * down[q * cp.width + r];
    }
    x[i] = x[i] + acc;
}
